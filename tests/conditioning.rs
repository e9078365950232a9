//! Ill-conditioned solves: a tiny proximal weight `delta` makes `cond(G) ~ s_max / delta`,
//! which the Gram route squares. The solve must then switch to its QR + SVD route and still
//! return a feasible optimum at rounding level (or a typed error), never a silently
//! non-orthonormal `P`. Oracles: orthonormality and the Riemannian gradient recomputed here
//! from `G` (built independently), and the objective of the polar factor from faer's thin
//! SVD of `G` itself.

mod common;
use common::*;
use implicit_etf::solve_etf;

#[test]
fn tiny_delta_still_gives_an_exact_solution() {
    let mut rng = Rng(99);
    for &(d, k) in &[(40usize, 12usize), (9, 9), (64, 10)] {
        let y = rng.normals(d * k);
        for delta in [1e-6, 1e-9, 1e-12] {
            let first = solve_etf(&y, None, d, k, delta).unwrap();
            let prox = to_mat(&first.prox, d, k);
            // A Prox a little away from the answer, so the second solve has work to do.
            let noisy: Vec<f64> = first.p.iter().map(|v| v + 1e-3 * rng.normal()).collect();
            let prox2 = polar(&to_mat(&noisy, d, k));
            for (what, pr) in [("first", prox), ("later", prox2)] {
                let sol = solve_etf(&y, Some(&from_mat(&pr)), d, k, delta).unwrap();
                let p = to_mat(&sol.p, d, k);
                let g = g_of(&to_mat(&y, d, k), &pr, delta);
                let ctx = format!("d={d} K={k} delta={delta:e} {what}");
                // Rounding level: orthonormal to 1e-13, gradient <= 1e-12 ||G|| (the same
                // bounds as the well-conditioned tests in optimality.rs).
                assert!(
                    orth_err(&p) <= 1e-13,
                    "{ctx}: orthonormality {:.2e}",
                    orth_err(&p)
                );
                let gr = riem_grad(&p, &g) / fro(&g);
                assert!(gr <= 1e-12, "{ctx}: gradient {gr:.2e}");
                // No worse than the polar factor of G by an independent SVD (1e-12: rounding
                // of an O(1) objective).
                let yy = to_mat(&y, d, k);
                let ours = objective_of(&yy, &p, &pr, delta);
                let svd = objective_of(&yy, &polar(&g), &pr, delta);
                assert!(ours <= svd + 1e-12, "{ctx}: objective {ours} > {svd}");
                // The backward stays finite.
                let v = rng.normals(d * k);
                assert!(
                    sol.vjp(&v).unwrap().dy.iter().all(|x| x.is_finite()),
                    "{ctx}: vjp"
                );
            }
        }
    }
}
