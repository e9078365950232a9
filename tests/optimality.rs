//! Forward optimality of the nearest-ETF solve (`docs/solve.md`), checked by oracles that do
//! not share the crate's code path:
//!
//! * feasibility `||P^T P - I||_max` and the Riemannian gradient `||G - P sym(P^T G)||_F`,
//!   with `G` rebuilt independently;
//! * the objective (rebuilt independently) below that of 100 random points of St(d,K) and of
//!   100 small retracted perturbations of `P`;
//! * the paper's route (`SolveMethod::Riemannian`) reaches the same `P` from a start in the
//!   same component, and for `d = K` from the other component a worse (or equal) objective;
//! * the first-step rule: `W` of `P_1` against `polar(c Y M + eta J)` by faer's thin SVD.

mod common;
use common::*;
use faer::{Mat, Scale};
use implicit_etf::cpu::solve;
use implicit_etf::etf::solve_etf_with;
use implicit_etf::{solve_etf, CpuHead, HeadConfig, SolveMethod};

const SIZES: [(usize, usize); 8] = [
    (2, 2),
    (3, 2),
    (5, 5),
    (8, 3),
    (12, 12),
    (20, 10),
    (64, 10),
    (33, 32),
];

fn w_of(p: &Mat<f64>) -> Mat<f64> {
    let k = p.ncols();
    let a = (k as f64 / (k - 1) as f64).sqrt();
    centering(k) * p.transpose() * Scale(a)
}

#[test]
fn procrustes_solution_is_feasible_stationary_and_minimal() {
    let mut rng = Rng(0x0971_0001);
    for &(d, k) in &SIZES {
        for &delta in &[1e-3, 0.1] {
            let y = random_y(&mut rng, d, k);
            let prox = random_stiefel(&mut rng, d, k);
            let sol = solve_etf(&from_mat(&y), Some(&from_mat(&prox)), d, k, delta).unwrap();
            let p = to_mat(&sol.p, d, k);
            let g = g_of(&y, &prox, delta);
            let tag = format!("d={d} K={k} delta={delta}");
            // Feasibility: Newton polish + Newton-Schulz leave P orthonormal to a few ulps
            // (K-term dot products): 1e-13.
            let oe = orth_err(&p);
            assert!(oe <= 1e-13, "{tag}: ||P^T P - I||_max = {oe:e}");
            // Stationarity: the crate polishes to 1e-14 ||G||; evaluating the residual in
            // float64 costs ~eps * ||G|| * sqrt(K), so 1e-12 ||G|| is rounding level.
            let gr = riem_grad(&p, &g);
            assert!(
                gr <= 1e-12 * fro(&g),
                "{tag}: grad {gr:e} vs ||G|| {:e}",
                fro(&g)
            );
            let f = objective_of(&y, &p, &prox, delta);
            // The crate's objective and report agree with the independent one (rounding).
            let fc = solve::objective(y.as_ref(), p.as_ref(), prox.as_ref(), delta).unwrap();
            assert!(
                (fc - f).abs() <= 1e-13 * f.abs().max(1.0),
                "{tag}: objective"
            );
            assert!((sol.report.objective - f).abs() <= 1e-13 * f.abs().max(1.0));
            // Global optimality against random feasible points. Slack 1e-13: the objective is
            // O(1) and evaluated with ~1e-16 rounding; random points are worse by O(1).
            for _ in 0..100 {
                let q = random_stiefel(&mut rng, d, k);
                let fq = objective_of(&y, &q, &prox, delta);
                assert!(f <= fq + 1e-13, "{tag}: random point better: {fq} < {f}");
            }
            // Local optimality against small retracted perturbations polar(P + eps Z),
            // eps in [1e-4, 1e-1]. The smallest curvature is ~ s_min ~ delta, so the increase
            // is >= ~eps^2 delta / 2 >~ 5e-12 >> the 1e-14 slack (rounding of f ~ 1e-16).
            for i in 0..100 {
                let eps = 10f64.powf(-1.0 - 3.0 * (i as f64) / 99.0);
                let z = gaussian(&mut rng, d, k);
                let q = polar(&(&p + &z * Scale(eps / fro(&z))));
                let fq = objective_of(&y, &q, &prox, delta);
                assert!(
                    f <= fq + 1e-14,
                    "{tag}: perturbation eps={eps:e} better: {fq} < {f}"
                );
            }
        }
    }
}

fn riemannian(
    y: &Mat<f64>,
    prox: &[f64],
    delta: f64,
    iters: usize,
) -> implicit_etf::EtfSolution<f64> {
    let (d, k) = (y.nrows(), y.ncols());
    solve_etf_with(
        &from_mat(y),
        Some(prox),
        d,
        k,
        delta,
        SolveMethod::Riemannian { max_iters: iters },
    )
    .unwrap()
}

#[test]
fn riemannian_route_reaches_the_procrustes_solution_for_d_above_k() {
    // St(d,K), d > K, is connected and tr(P^T G) has a single local maximum, so both routes
    // must find the same P. Tolerance 1e-8 (max abs): the Riemannian route stops at
    // grad <= 1e-14 ||G||; the resulting error of P in the gauge direction is
    // ~grad/s_min ~ 1e-11, far below; a failure means non-convergence.
    let mut rng = Rng(0x0971_0002);
    let mut slow = Vec::new();
    for &(d, k) in &SIZES {
        for &delta in &[1e-3, 0.1] {
            // (a) The training regime: Prox = the previous P, close to the answer. The
            // reference's cap of 30 iterations must suffice. (For d = K the warm start is in
            // the answer's component, so this holds for d = K too.)
            let y = random_y(&mut rng, d, k);
            let p0 = solve_etf(&from_mat(&y), None, d, k, delta).unwrap();
            let prox = polar(&(to_mat(&p0.p, d, k) + gaussian(&mut rng, d, k) * Scale(1e-2)));
            let pr = from_mat(&prox);
            let a = solve_etf(&from_mat(&y), Some(&pr), d, k, delta).unwrap();
            let b = riemannian(&y, &pr, delta, 30);
            let e = max_abs(&a.p, &b.p);
            assert!(
                e <= 1e-8,
                "d={d} K={k} delta={delta} warm start: max |P_R - P| = {e:e} (steps {}, grad {:e})",
                b.report.steps,
                b.report.grad_norm
            );
            if d == k {
                continue; // random starts for d = K: see the next test
            }
            // (b) A random Prox (far from P*, still the same connected manifold). The
            // Newton-with-gradient-safeguard route converges, but with delta = 1e-3 it can
            // need far more than 30 iterations (gradient steps while sym(P^T G) is
            // indefinite, convergence rate ~ 1 - delta/s_max); measured up to ~2.5e3. So we
            // assert convergence with a generous cap and record how many steps it took.
            let y = random_y(&mut rng, d, k);
            let pr = from_mat(&random_stiefel(&mut rng, d, k));
            let a = solve_etf(&from_mat(&y), Some(&pr), d, k, delta).unwrap();
            let b = riemannian(&y, &pr, delta, 10_000);
            let e = max_abs(&a.p, &b.p);
            assert!(
                e <= 1e-8,
                "d={d} K={k} delta={delta} random start: max |P_R - P| = {e:e} (steps {}, grad {:e})",
                b.report.steps,
                b.report.grad_norm
            );
            if b.report.steps > 30 {
                slow.push(format!(
                    "d={d} K={k} delta={delta}: {} steps",
                    b.report.steps
                ));
            }
        }
    }
    println!("random starts needing more than the reference's 30 iterations: {slow:?}");
}

#[test]
fn riemannian_route_for_square_case_stays_in_its_component() {
    let mut rng = Rng(0x0971_0003);
    for &(d, k) in SIZES.iter().filter(|(d, k)| d == k) {
        let delta = 1e-3;
        let (mut same, mut other) = (0, 0);
        for _ in 0..40 {
            let y = random_y(&mut rng, d, k);
            let prox = random_stiefel(&mut rng, d, k);
            let pr = from_mat(&prox);
            let a = solve_etf(&from_mat(&y), Some(&pr), d, k, delta).unwrap();
            let b = riemannian(&y, &pr, delta, 10_000);
            let pa = to_mat(&a.p, d, k);
            let pb = to_mat(&b.p, d, k);
            let (sa, sb, sp) = (det(&pa).signum(), det(&pb).signum(), det(&prox).signum());
            // A Riemannian method never leaves the component of its start.
            assert_eq!(sb, sp, "d=K={k}: Riemannian route changed component");
            let fa = objective_of(&y, &pa, &prox, delta);
            let fb = objective_of(&y, &pb, &prox, delta);
            if sa == sp {
                same += 1;
                // Same component: same (global) optimum, tolerance as for d > K.
                let e = max_abs(&a.p, &b.p);
                assert!(e <= 1e-8, "d=K={k}: same component, max |P_R - P| = {e:e}");
            } else {
                other += 1;
                // Wrong component: f = const - tr(P^T G), and the maximum of tr(P^T G) over
                // the other component is attained at U diag(1,..,1,-1) V^T, so the gap is at
                // least 2 s_min(G) (s_min <= delta, the gauge direction). Slack 1e-13 for
                // rounding of the O(1) objectives.
                let s_min = *singular_values(&g_of(&y, &prox, delta)).last().unwrap();
                assert!(fb >= fa - 1e-14, "d=K={k}: wrong component beat Procrustes");
                assert!(
                    fb - fa >= 2.0 * s_min - 1e-13,
                    "d=K={k}: gap {:e} below 2 s_min = {:e}",
                    fb - fa,
                    2.0 * s_min
                );
            }
        }
        assert!(same >= 3 && other >= 3, "d=K={k}: cases {same}/{other}");
    }
}

/// The first-step rule `P_1 = lim_{eta->0} polar(c Y M + eta J)` against faer's thin SVD at
/// a small `eta`. Returns `(rel error in W, eta/s_r)`, `s_r` the smallest nonzero singular
/// value of `c Y M`.
fn first_step_w_error(y: &Mat<f64>, w: &[f64], eta_rel: f64, rank: usize) -> (f64, f64) {
    let (d, k) = (y.nrows(), y.ncols());
    let c = 2.0 / ((k - 1) as f64).sqrt();
    let a = y * centering(k) * Scale(c);
    let eta = eta_rel * fro(&a);
    let j = Mat::from_fn(d, k, |i, jj| if i == jj { 1.0 } else { 0.0 });
    let p_ref = polar(&(&a + &j * Scale(eta)));
    let w_ref = w_of(&p_ref);
    let sv = singular_values(&a);
    let s_r = sv[rank - 1];
    assert!(
        sv[rank] <= 1e-12 * sv[0],
        "test data: rank of c Y M is not {rank}"
    );
    (rel(w, &from_mat(&w_ref)), eta / s_r)
}

#[test]
fn first_step_matches_polar_with_tiny_eta() {
    let mut rng = Rng(0x0971_0004);
    for &(d, k) in &SIZES {
        for case in 0..3 {
            // case 0: generic Y (rank K-1); case 1: two equal columns (rank K-2, as with two
            // absent classes under Reference); case 2: a head's first step (Hold policy, one
            // absent class: rank K-2 because sum_k n_k c_k = 0 and one column is zero).
            if k < 3 && case > 0 {
                continue;
            }
            let (y, w, rank) = match case {
                0 | 1 => {
                    let mut y = random_y(&mut rng, d, k);
                    if case == 1 {
                        for i in 0..d {
                            y[(i, k - 1)] = y[(i, 0)];
                        }
                    }
                    let sol = solve_etf(&from_mat(&y), None, d, k, 1e-3).unwrap();
                    // The step solves with Prox = P_1 and returns P_1 itself (rounding,
                    // amplified by 1/delta in the gauge direction): 1e-10.
                    assert!(max_abs(&sol.p, &sol.prox) <= 1e-10);
                    let p1 = to_mat(&sol.prox, d, k);
                    // P_1 becomes the next Prox: exactly orthonormal, null directions too.
                    assert!(orth_err(&p1) <= 1e-13, "P_1 not orthonormal");
                    (y, sol.classifier(), if case == 0 { k - 1 } else { k - 2 })
                }
                _ => {
                    let n = 3 * k;
                    let labels: Vec<u32> = (0..n).map(|i| (i % (k - 1)) as u32).collect();
                    let raw = rng.normals(n * d);
                    let mut head = CpuHead::<f64>::new(HeadConfig::new(d, k)).unwrap();
                    let out = fwd(&mut head, &raw, &labels).unwrap();
                    let p1 = to_mat(&out.p, d, k);
                    assert!(orth_err(&p1) <= 1e-13, "head P_1 not orthonormal");
                    (to_mat(&out.y, d, k), out.w, k - 2)
                }
            };
            let (e7, r7) = first_step_w_error(&y, &w, 1e-7, rank);
            let (e9, _) = first_step_w_error(&y, &w, 1e-9, rank);
            println!("d={d} K={k} case {case}: W rel err {e7:.2e} (eta/s_r = {r7:.2e}), at eta 1e-9: {e9:.2e}");
            // polar(A + eta J) differs from its eta -> 0 limit by O(eta / s_r): tolerance
            // 10 eta/s_r (and never above 1e-5). With eta = 1e-7 ||A|| this is ~1e-6.
            assert!(
                e7 <= (10.0 * r7).min(1e-5),
                "d={d} K={k} case {case}: W rel err {e7:e}, eta/s_r {r7:e}"
            );
            // Convergence to the limit: 100x smaller eta, error at least ~10x smaller (or at
            // the SVD's own rounding level for the near-null directions, ~eps/eta ~ 1e-7).
            assert!(
                e9 <= 0.1 * e7 + 2e-7,
                "d={d} K={k} case {case}: not converging with eta: {e7:e} -> {e9:e}"
            );
        }
    }
}
