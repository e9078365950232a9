//! The whole head's gradient `d(loss)/d(raw)` from `CpuHead::backward` against central finite
//! differences of `forward` + `cross_entropy` in float64, over several consecutive steps,
//! for both absent-class policies, both moving averages, with and without `tau`, with batches
//! that lack classes.
//!
//! What is compared, exactly:
//!
//! * Step `t > 0`: the state before the step is exported; the oracle is
//!   `L(raw) = cross_entropy(forward_{state}(raw))` evaluated on fresh heads that import that
//!   state (`Prox` = previous `P`, a constant of the step). This is literally the function
//!   the head differentiates.
//! * Step 0 (no `Prox`): the head computes `P_1` from the batch and then solves with
//!   `Prox = P_1` *treated as a constant* (the reference's semantics). Differentiating through
//!   `P_1(raw)` as well would give a different derivative (by `O(delta/s)`), so the oracle is
//!   the step with the same (initial) moving state and `Prox = P_1` imported as a fixed
//!   constant. We first check that this imported step reproduces the first step's forward and
//!   gradient (it is the same computation at the unperturbed point), then FD it.
//!
//! Batch design (K = 4 unless stated): step 0 lacks class K-1 (one absent class: under
//! `Reference` the first step's rank stays K-1, so `P_1` is well defined and the later
//! problems well conditioned); step 1 is complete; step 2 lacks {1, K-1}; step 3 lacks
//! {0, K-1}. Under `Reference` class K-1 is then never flagged seen (the seen flags only
//! update on incomplete batches and K-1 is absent from all of them), so steps 2 and 3
//! exercise the "overwrite with mu, with gradient" path, and class 1 / class 0 the "held"
//! path; under `Hold` they are held columns.
//!
//! Conditioning of the first step: under `Reference` the absent class's column is `mu`, so
//! `c Y M` keeps rank K-1 (only the gauge direction `1` is null). Under `Hold` the absent
//! column is zero and the present centred means satisfy `sum_k n_k c_k = 0`, so `c Y M` has
//! rank K-2: one extra null direction fixed by the gauge rule, where `G = c Y M + delta P_1`
//! has singular value `delta`. That is the harder case for FD (the loss depends on `P_1`'s
//! choice there at O(1), so FD *through* `P_1` differs from the head's gradient by up to
//! ~50%, printed below for information); with `Prox = P_1` fixed it is smooth and the
//! agreement is ~1e-7, still well inside the tolerance. First-step batches with 2+ absent
//! classes under `Reference` (rank K-2 as well) are not used.

mod common;
use common::*;
use implicit_etf::MovingMeans;
use implicit_etf::{
    cross_entropy, solve_etf, AbsentClassPolicy, CpuHead, HeadConfig, HeadState, MovingAverage,
};

/// Relative FD step: `h_i = H_REL * max(1, |r_i|)`. Truncation error of the central
/// difference is O(h^2) ~ 1e-10 relative; rounding error is ~ eps |L| / h ~ 1e-10 absolute;
/// the forward itself is smooth to ~1e-15 (Procrustes + Newton polish to rounding level).
const H_REL: f64 = 1e-6;

fn loss_of(cfg: &HeadConfig, state: &HeadState<f64>, raw: &[f64], labels: &[u32]) -> f64 {
    let mut h = CpuHead::<f64>::new(cfg.clone()).unwrap();
    h.import_state(state.clone()).unwrap();
    let out = fwd(&mut h, raw, labels).unwrap();
    cross_entropy(&out.logits, labels, cfg.classes).unwrap().0
}

fn fd_gradient(cfg: &HeadConfig, state: &HeadState<f64>, raw: &[f64], labels: &[u32]) -> Vec<f64> {
    let mut r = raw.to_vec();
    (0..raw.len())
        .map(|i| {
            let h = H_REL * raw[i].abs().max(1.0);
            r[i] = raw[i] + h;
            let lp = loss_of(cfg, state, &r, labels);
            r[i] = raw[i] - h;
            let lm = loss_of(cfg, state, &r, labels);
            r[i] = raw[i];
            (lp - lm) / (2.0 * h)
        })
        .collect()
}

/// Labels for step `t`: every class present except the listed ones, shuffled.
fn labels_for(rng: &mut Rng, n: usize, k: usize, absent: &[usize]) -> Vec<u32> {
    let present: Vec<usize> = (0..k).filter(|c| !absent.contains(c)).collect();
    assert!(n >= present.len());
    let mut l: Vec<u32> = (0..n)
        .map(|i| {
            if i < present.len() {
                present[i] as u32
            } else {
                present[rng.below(present.len())] as u32
            }
        })
        .collect();
    for i in (1..n).rev() {
        let j = rng.below(i + 1);
        l.swap(i, j);
    }
    l
}

fn absent_sets(k: usize) -> Vec<Vec<usize>> {
    vec![vec![k - 1], vec![], vec![1, k - 1], vec![0, k - 1]]
}

/// Compares the head's gradient with the FD oracle; returns the relative error.
fn compare(tag: &str, g: &[f64], fd: &[f64]) -> f64 {
    let e = rel(g, fd);
    let gmax = g.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    // Tolerance 1e-6 (relative, whole gradient vector): FD truncation O(h^2) ~ 1e-12 and
    // rounding ~ eps/h ~ 1e-10 relative to gradients of size ~1e-2..1e-1; docs/testing.md#finite-differences reports
    // ~1e-8 agreement. Anything above 1e-6 is a wrong derivative, not noise.
    assert!(e <= 1e-6, "{tag}: rel error {e:e}");
    // Entry-wise, relative to the largest entry (small entries carry the same absolute
    // FD noise, so a per-entry relative test would be meaningless for them).
    let worst = max_abs(g, fd);
    assert!(
        worst <= 1e-6 * gmax,
        "{tag}: max entry error {worst:e} vs max |g| {gmax:e}"
    );
    e
}

fn run_case(cfg: HeadConfig, n: usize, seed: u64) -> f64 {
    let (d, k) = (cfg.dim, cfg.classes);
    let mut rng = Rng(seed);
    let mut head = CpuHead::<f64>::new(cfg.clone()).unwrap();
    let mut worst = 0.0f64;
    for (t, absent) in absent_sets(k).iter().enumerate() {
        let labels = labels_for(&mut rng, n, k, absent);
        let raw = rng.normals(n * d);
        let before = head.export_state().unwrap();
        let out = fwd(&mut head, &raw, &labels).unwrap();
        let (loss, dz) = cross_entropy(&out.logits, &labels, k).unwrap();
        let g = head.backward(&dz).unwrap();
        let tag = format!(
            "d={d} K={k} delta={} tau={:?} {:?} {:?} step {t}",
            cfg.delta, cfg.tau, cfg.moving_average, cfg.policy
        );
        let oracle_state = if t == 0 {
            assert!(before.prox.is_none());
            // P_1 by the stateless route from the same Y: the Prox the first step used.
            let p1 = solve_etf(&out.y, None, d, k, cfg.delta).unwrap().prox;
            // The first step returns P_1 itself (polar(c Y M + delta P_1) = P_1 exactly in
            // exact arithmetic); 1e-10 allows rounding amplified by 1/delta.
            assert!(max_abs(&out.p, &p1) <= 1e-10, "{tag}: P != P_1");
            HeadState {
                moving: MovingMeans::new(d, k),
                prox: Some(p1),
            }
        } else {
            before
        };
        // The oracle's step at the unperturbed point is the head's step.
        let mut o = CpuHead::<f64>::new(cfg.clone()).unwrap();
        o.import_state(oracle_state.clone()).unwrap();
        let oo = fwd(&mut o, &raw, &labels).unwrap();
        let (oloss, odz) = cross_entropy(&oo.logits, &labels, k).unwrap();
        let og = o.backward(&odz).unwrap();
        // Same computation (t > 0: bit-identical state; t = 0: Prox = P_1 given instead of
        // recomputed, identical up to rounding of P_1): 1e-12.
        assert!(
            (oloss - loss).abs() <= 1e-12,
            "{tag}: loss {oloss} vs {loss}"
        );
        assert!(
            rel(&og, &g) <= 1e-10,
            "{tag}: imported-state gradient differs"
        );
        let fd = fd_gradient(&cfg, &oracle_state, &raw, &labels);
        let e = compare(&tag, &g, &fd);
        if t == 0 {
            // For information only: FD through the true first step, where P_1 moves with the
            // batch, is a different derivative (the head follows the reference and holds
            // Prox = P_1 constant).
            let fresh = HeadState {
                moving: MovingMeans::new(d, k),
                prox: None,
            };
            let fd_true = fd_gradient(&cfg, &fresh, &raw, &labels);
            println!(
                "{tag}: FD through P_1(raw) differs from backward by rel {:.2e}",
                rel(&g, &fd_true)
            );
        }
        println!("{tag}: rel error {e:.2e}");
        worst = worst.max(e);
    }
    worst
}

fn configs(d: usize, k: usize) -> Vec<HeadConfig> {
    let mut v = Vec::new();
    for policy in [AbsentClassPolicy::Hold, AbsentClassPolicy::Reference] {
        for avg in [MovingAverage::Exponential, MovingAverage::Cumulative] {
            for tau in [None, Some(5.0)] {
                v.push(
                    HeadConfig::new(d, k)
                        .with_policy(policy)
                        .with_moving_average(avg)
                        .with_tau(tau),
                );
            }
        }
    }
    v
}

#[test]
fn head_gradient_matches_finite_differences_d7_k4() {
    let mut worst = 0.0f64;
    for (i, cfg) in configs(7, 4).into_iter().enumerate() {
        worst = worst.max(run_case(cfg, 10, 0xfd00 + i as u64));
    }
    println!("worst: {worst:e}");
}

#[test]
fn head_gradient_matches_finite_differences_square_d5_k5() {
    // d = K: St(K,K) is the orthogonal group; the Procrustes solution is still smooth in Y.
    let mut worst = 0.0f64;
    for (i, cfg) in configs(5, 5).into_iter().enumerate().step_by(3) {
        worst = worst.max(run_case(cfg, 12, 0xfd50 + i as u64));
    }
    println!("worst: {worst:e}");
}

#[test]
fn head_gradient_matches_finite_differences_large_delta() {
    // delta = 0.1: the proximal term matters more; same oracle.
    let mut worst = 0.0f64;
    for (i, cfg) in configs(9, 3).into_iter().enumerate().step_by(2) {
        worst = worst.max(run_case(cfg.with_delta(0.1), 8, 0xfd90 + i as u64));
    }
    println!("worst: {worst:e}");
}
