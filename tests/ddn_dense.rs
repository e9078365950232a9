//! The closed-form implicit backward (`docs/backward.md`) against the dense DDN formula of
//! Gould et al. (Prop. 4.5), built explicitly for small sizes:
//!
//! ```text
//! H = I_d (x) B   (dK x dK, row-major vec of P),  B = (2/(K-1)) M + delta I - Lambda,
//! Lambda = sym(P^T grad_P f),  grad_P f = (2/(K-1)) P M + delta P - G,
//! A = Jacobian of the K(K+1)/2 constraints (P^T P)_{ab}, a <= b   (K(K+1)/2 x dK),
//! u = -H^{-1} v + H^{-1} A^T (A H^{-1} A^T)^{-1} A H^{-1} v,
//! dL/dY = -c u M,   dL/dProx = -delta u.
//! ```
//!
//! `Lambda` is computed in its general form (not the optimum-only simplification
//! `B = sym(P^T G)`), so the same oracle also serves at non-optimal points of the manifold.
//! All solves are dense full-pivoting LU in float64.

mod common;
use common::*;
use faer::linalg::solvers::Solve;
use faer::Mat;
use faer::Scale;
use implicit_etf::cpu::{backward, solve};
use implicit_etf::solve_etf;

const SIZES: [(usize, usize); 5] = [(4, 2), (5, 3), (6, 6), (8, 4), (12, 5)];
const DELTAS: [f64; 2] = [1e-3, 0.1];

/// Dense DDN vector-Jacobian product at a point `p` of St(d,K) for the problem with data
/// `(y, prox, delta)`. Returns `(dL/dY, dL/dProx)` as `d x K` matrices.
fn dense_ddn(
    y: &Mat<f64>,
    prox: &Mat<f64>,
    p: &Mat<f64>,
    delta: f64,
    v: &Mat<f64>,
) -> (Mat<f64>, Mat<f64>) {
    let (d, k) = (p.nrows(), p.ncols());
    let m = centering(k);
    let c = 2.0 / ((k - 1) as f64).sqrt();
    let g = g_of(y, prox, delta);
    // Gradient of f(P) = ||Y - P M/sqrt(K-1)||^2 + (delta/2)||P - Prox||^2 (general form).
    let grad_f = p * &m * Scale(2.0 / (k - 1) as f64) + p * Scale(delta) - &g;
    let lambda = sym(&(p.transpose() * &grad_f));
    let eye = Mat::<f64>::identity(k, k);
    let b = &m * Scale(2.0 / (k - 1) as f64) + &eye * Scale(delta) - &lambda;
    let n = d * k;
    // H = I_d (x) B in the row-major vectorisation idx(i, a) = i K + a.
    let h = Mat::from_fn(n, n, |r, s| {
        let (i, a) = (r / k, r % k);
        let (j, bb) = (s / k, s % k);
        if i == j {
            b[(a, bb)]
        } else {
            0.0
        }
    });
    // A: row (a, b), a <= b, is d(p_a . p_b)/dP.
    let pairs: Vec<(usize, usize)> = (0..k).flat_map(|a| (a..k).map(move |b| (a, b))).collect();
    assert_eq!(pairs.len(), k * (k + 1) / 2);
    let amat = Mat::from_fn(pairs.len(), n, |r, s| {
        let (a, bb) = pairs[r];
        let (i, cc) = (s / k, s % k);
        let mut val = 0.0;
        if cc == a {
            val += p[(i, bb)];
        }
        if cc == bb {
            val += p[(i, a)];
        }
        val
    });
    let vv = Mat::from_fn(n, 1, |r, _| v[(r / k, r % k)]);
    let hlu = h.full_piv_lu();
    let hinv_v = hlu.solve(&vv);
    let hinv_at = hlu.solve(amat.transpose().to_owned());
    let s = &amat * &hinv_at;
    let w = s.full_piv_lu().solve(&amat * &hinv_v);
    let uvec = &hinv_at * &w - &hinv_v;
    let u = Mat::from_fn(d, k, |i, a| uvec[(i * k + a, 0)]);
    // Sanity of the oracle itself: u is tangent (A u = 0) to rounding.
    let au = &amat * &uvec;
    assert!(
        au.norm_l2() <= 1e-9 * uvec.norm_l2(),
        "oracle u not tangent: {:e}",
        au.norm_l2()
    );
    let dy = &u * &m * Scale(-c);
    let dprox = &u * Scale(-delta);
    (dy, dprox)
}

/// A random tangent vector at `p` (unit Frobenius norm).
fn random_tangent(rng: &mut Rng, p: &Mat<f64>) -> Mat<f64> {
    let z = gaussian(rng, p.nrows(), p.ncols());
    let x = &z - p * sym(&(p.transpose() * &z));
    let nx = fro(&x);
    x * Scale(1.0 / nx)
}

#[test]
fn closed_form_vjp_matches_dense_ddn_at_the_optimum() {
    let mut rng = Rng(0x5eed_dd01);
    let mut worst = 0.0f64;
    for &(d, k) in &SIZES {
        for &delta in &DELTAS {
            for first_step in [false, true] {
                let y = random_y(&mut rng, d, k);
                let prox_in = random_stiefel(&mut rng, d, k);
                let prox_rm = from_mat(&prox_in);
                let sol = solve_etf(
                    &from_mat(&y),
                    if first_step { None } else { Some(&prox_rm[..]) },
                    d,
                    k,
                    delta,
                )
                .unwrap();
                // On a first step the solve uses Prox = P_1 (constant); the oracle uses the
                // same Prox.
                let prox = to_mat(&sol.prox, d, k);
                let p = to_mat(&sol.p, d, k);
                let v = gaussian(&mut rng, d, k);
                let grads = sol.vjp(&from_mat(&v)).unwrap();
                let (dy, dprox) = dense_ddn(&y, &prox, &p, delta, &v);
                let e_dy = rel(&grads.dy, &from_mat(&dy));
                let e_dprox = rel(&grads.dprox, &from_mat(&dprox));
                worst = worst.max(e_dy).max(e_dprox);
                // Tolerance 1e-10: both sides are exact formulas for the same tangent solve;
                // the only error is float64 rounding amplified by cond(B) ~ s_max/s_min
                // ~ 1/delta <= 1e3 (gauge direction; docs/testing.md#dense-ddn-formula: ~1e-13 agreement).
                // 1e-10 leaves ~100x margin over eps * cond * dK.
                assert!(
                    e_dy <= 1e-10,
                    "dY (d={d},K={k},delta={delta},first={first_step}): rel {e_dy:e}"
                );
                // dProx = -delta u keeps the gauge component 1/s_min that M removes from dY;
                // same tolerance and reasoning.
                assert!(
                    e_dprox <= 1e-10,
                    "dProx (d={d},K={k},delta={delta},first={first_step}): rel {e_dprox:e}"
                );
            }
        }
    }
    println!("worst relative error at the optimum: {worst:e}");
}

#[test]
fn closed_form_backward_matches_dense_ddn_off_the_optimum() {
    let mut rng = Rng(0x5eed_dd02);
    let mut worst = 0.0f64;
    for &(d, k) in &SIZES {
        for &delta in &DELTAS {
            let y = random_y(&mut rng, d, k);
            let prox = random_stiefel(&mut rng, d, k);
            let sol = solve_etf(&from_mat(&y), Some(&from_mat(&prox)), d, k, delta).unwrap();
            let p_opt = to_mat(&sol.p, d, k);
            // P' = polar(P* + eps X), X a unit tangent: on the manifold, not optimal.
            // eps = delta/2 keeps sym(P'^T G) well away from singular (its smallest
            // eigenvalue ~ delta moves by O(eps delta) + O(eps^2 s_max)).
            let eps = 0.5 * delta;
            let x = random_tangent(&mut rng, &p_opt);
            let p1 = polar(&(&p_opt + &x * Scale(eps)));
            assert!(orth_err(&p1) <= 1e-14);
            let g = solve::g_matrix(y.as_ref(), prox.as_ref(), delta).unwrap();
            // Genuinely off the optimum: the Riemannian gradient is far above rounding.
            let gr = riem_grad(&p1, &g);
            assert!(gr > 1e-6 * fro(&g), "P' is (nearly) optimal: {gr:e}");
            let f = solve::factor_at(p1.clone(), g.as_ref()).unwrap();
            let v = gaussian(&mut rng, d, k);
            let got = backward::solve_backward(&f, v.as_ref(), delta).unwrap();
            let (dy, dprox) = dense_ddn(&y, &prox, &p1, delta, &v);
            let e_dy = rel_mat(&got.dy, &dy);
            let e_dprox = rel_mat(&got.dprox, &dprox);
            worst = worst.max(e_dy).max(e_dprox);
            // Same tolerance and reasoning as at the optimum: on St(d,K) the general
            // B = (2/(K-1))M + delta I - sym(P^T grad f) equals sym(P^T G) identically, so
            // both sides solve the same tangent-space equation exactly.
            assert!(
                e_dy <= 1e-10,
                "dY off-optimum (d={d},K={k},delta={delta}): rel {e_dy:e}"
            );
            assert!(
                e_dprox <= 1e-10,
                "dProx off-optimum (d={d},K={k},delta={delta}): rel {e_dprox:e}"
            );
        }
    }
    println!("worst relative error off the optimum: {worst:e}");
}

#[test]
fn tangent_solve_satisfies_its_defining_equations() {
    // Direct check of `backward::tangent_solve`: sym(P^T u) = 0 and Proj_T(u B + V) = 0,
    // Proj_T(Z) = Z - P sym(P^T Z), at an optimum and with B = sym(P^T G).
    let mut rng = Rng(0x5eed_dd03);
    for &(d, k) in &SIZES {
        let delta = 1e-3;
        let y = random_y(&mut rng, d, k);
        let prox = random_stiefel(&mut rng, d, k);
        let s = solve::solve(
            y.as_ref(),
            Some(prox.as_ref()),
            delta,
            implicit_etf::SolveMethod::Procrustes,
        )
        .unwrap();
        let p = s.factor.p.clone();
        let b = sym(&(p.transpose() * &s.g));
        let v = gaussian(&mut rng, d, k);
        let u = implicit_etf::stiefel::tangent_solve(&s.factor, v.as_ref()).unwrap();
        let tang = sym(&(p.transpose() * &u));
        // Tolerance: |u| ~ |V|/s_min ~ 1e3; rounding of P^T u is ~ eps * |u| * sqrt(d K).
        assert!(
            fro(&tang) <= 1e-12 * fro(&u),
            "not tangent: {:e}",
            fro(&tang)
        );
        let z = &u * &b + &v;
        let proj = &z - &p * sym(&(p.transpose() * &z));
        // Residual relative to the terms: |u B| ~ |V|; rounding ~ eps * cond(B).
        assert!(
            fro(&proj) <= 1e-11 * fro(&v),
            "residual {:e} (d={d},K={k})",
            fro(&proj)
        );
    }
}
