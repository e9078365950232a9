//! Every error variant of the public API, and the promise that a failing call changes
//! nothing: after each error the head's `export_state()` equals the state before the call,
//! a pending backward survives, and the following valid calls give bit-for-bit the results of
//! a head that never saw the bad call.

mod common;
use common::*;
use implicit_etf::etf::solve_etf_with;
use implicit_etf::MovingMeans;
use implicit_etf::{
    cross_entropy, solve_etf, AbsentClassPolicy, CpuHead, Error, HeadConfig, HeadState, SolveMethod,
};

const D: usize = 6;
const K: usize = 3;

fn bits(v: &[f64]) -> Vec<u64> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn same_output(a: &Fwd<f64>, b: &Fwd<f64>) {
    assert_eq!(bits(&a.logits), bits(&b.logits));
    assert_eq!(bits(&a.w), bits(&b.w));
    assert_eq!(bits(&a.b), bits(&b.b));
    assert_eq!(bits(&a.y), bits(&b.y));
    assert_eq!(bits(&a.mu), bits(&b.mu));
    assert_eq!(bits(&a.p), bits(&b.p));
}

fn same_state(a: &HeadState<f64>, b: &HeadState<f64>) {
    assert_eq!(bits(&a.moving.e), bits(&b.moving.e));
    assert_eq!(a.moving.step, b.moving.step);
    assert_eq!(a.moving.alpha.to_bits(), b.moving.alpha.to_bits());
    assert_eq!(a.moving.seen, b.moving.seen);
    assert_eq!(
        a.prox.as_ref().map(|p| bits(p)),
        b.prox.as_ref().map(|p| bits(p))
    );
    assert_eq!(a, b);
}

fn is_invalid(e: &Error, which: &str) -> bool {
    matches!(e, Error::InvalidParameter { name, .. } if *name == which)
}

#[test]
fn config_errors() {
    let e = CpuHead::<f64>::new(HeadConfig::new(2, 3)).unwrap_err();
    assert_eq!(e, Error::DimensionBelowClasses { dim: 2, classes: 3 });
    for k in [0, 1] {
        let e = CpuHead::<f64>::new(HeadConfig::new(4, k)).unwrap_err();
        assert_eq!(e, Error::TooFewClasses { classes: k });
        let e = CpuHead::<f32>::new(HeadConfig::new(4, k)).unwrap_err();
        assert_eq!(e, Error::TooFewClasses { classes: k });
    }
    for delta in [0.0, -1e-3, f64::NAN, f64::INFINITY] {
        let e = CpuHead::<f64>::new(HeadConfig::new(D, K).with_delta(delta)).unwrap_err();
        assert!(is_invalid(&e, "delta"), "{e:?}");
    }
    for tau in [0.0, -5.0, f64::NAN, f64::INFINITY] {
        let e = CpuHead::<f64>::new(HeadConfig::new(D, K).with_tau(Some(tau))).unwrap_err();
        assert!(is_invalid(&e, "tau"), "{e:?}");
    }
    for floor in [0.0, 1.5, f64::NAN] {
        let mut cfg = HeadConfig::new(D, K);
        cfg.alpha_floor = floor;
        let e = CpuHead::<f64>::new(cfg).unwrap_err();
        assert!(is_invalid(&e, "alpha_floor"), "{e:?}");
    }
    let e = CpuHead::<f64>::new(
        HeadConfig::new(D, K).with_solve(SolveMethod::Riemannian { max_iters: 0 }),
    )
    .unwrap_err();
    assert!(is_invalid(&e, "max_iters"), "{e:?}");
    // Display never panics and names the problem.
    assert!(format!("{e}").contains("max_iters"));
}

fn batch(rng: &mut Rng, n: usize, absent: Option<usize>) -> (Vec<f64>, Vec<i64>) {
    let present: Vec<i64> = (0..K as i64)
        .filter(|&c| Some(c as usize) != absent)
        .collect();
    let labels: Vec<i64> = (0..n).map(|i| present[i % present.len()]).collect();
    (rng.normals(n * D), labels)
}

/// All the ways a forward can be refused on a batch of `n` rows (valid data in `raw`).
fn bad_forwards(raw: &[f64], labels: &[i64]) -> Vec<(&'static str, Vec<f64>, Vec<i64>, Error)> {
    let n = labels.len();
    let mut v = Vec::new();
    v.push((
        "raw too short",
        raw[..n * D - 1].to_vec(),
        labels.to_vec(),
        Error::ShapeMismatch {
            what: "raw",
            expected: n * D,
            got: n * D - 1,
        },
    ));
    let mut l2 = labels.to_vec();
    l2.push(0);
    v.push((
        "labels longer than raw",
        raw.to_vec(),
        l2,
        Error::ShapeMismatch {
            what: "raw",
            expected: (n + 1) * D,
            got: n * D,
        },
    ));
    let mut l3 = labels.to_vec();
    l3[2] = K as i64;
    v.push((
        "label = K",
        raw.to_vec(),
        l3,
        Error::LabelOutOfRange {
            index: 2,
            label: K as i64,
            classes: K,
        },
    ));
    let mut l4 = labels.to_vec();
    l4[n - 1] = -1;
    v.push((
        "negative label",
        raw.to_vec(),
        l4,
        Error::LabelOutOfRange {
            index: n - 1,
            label: -1,
            classes: K,
        },
    ));
    for (what, val) in [
        ("NaN", f64::NAN),
        ("+Inf", f64::INFINITY),
        ("-Inf", f64::NEG_INFINITY),
    ] {
        let mut r = raw.to_vec();
        r[7] = val;
        v.push((
            what,
            r,
            labels.to_vec(),
            Error::NonFinite {
                what: "raw",
                index: 7,
            },
        ));
    }
    v.push(("empty", vec![], vec![], Error::EmptyBatch));
    v
}

fn bad_backwards(n: usize) -> Vec<(&'static str, Vec<f64>, Error)> {
    let good = vec![0.01; n * K];
    let mut v = vec![
        (
            "d_logits too long",
            vec![0.01; n * K + 1],
            Error::ShapeMismatch {
                what: "d_logits",
                expected: n * K,
                got: n * K + 1,
            },
        ),
        (
            "d_logits empty",
            vec![],
            Error::ShapeMismatch {
                what: "d_logits",
                expected: n * K,
                got: 0,
            },
        ),
    ];
    for (what, val) in [("NaN", f64::NAN), ("Inf", f64::INFINITY)] {
        let mut g = good.clone();
        g[n * K - 1] = val;
        v.push((
            what,
            g,
            Error::NonFinite {
                what: "d_logits",
                index: n * K - 1,
            },
        ));
    }
    v
}

fn bad_states(good: &HeadState<f64>) -> Vec<(&'static str, HeadState<f64>, Error)> {
    let mut v = Vec::new();
    let mut s = good.clone();
    s.moving.e.pop();
    v.push((
        "e short",
        s,
        Error::ShapeMismatch {
            what: "state.moving.e",
            expected: D * K,
            got: D * K - 1,
        },
    ));
    let mut s = good.clone();
    s.moving.seen.push(true);
    v.push((
        "seen long",
        s,
        Error::ShapeMismatch {
            what: "state.moving.seen",
            expected: K,
            got: K + 1,
        },
    ));
    let mut s = good.clone();
    s.moving.e[4] = f64::NAN;
    v.push((
        "e NaN",
        s,
        Error::NonFinite {
            what: "state.moving.e",
            index: 4,
        },
    ));
    for alpha in [0.0, 1.5, f64::NAN, -0.5] {
        let mut s = good.clone();
        s.moving.alpha = alpha;
        v.push((
            "alpha",
            s,
            Error::InvalidParameter {
                name: "state.moving.alpha",
                reason: String::new(),
            },
        ));
    }
    let prox = good
        .prox
        .clone()
        .unwrap_or_else(|| from_mat(&random_stiefel(&mut Rng(5), D, K)));
    let mut s = good.clone();
    s.prox = Some(prox[1..].to_vec());
    v.push((
        "prox short",
        s,
        Error::ShapeMismatch {
            what: "state.prox",
            expected: D * K,
            got: D * K - 1,
        },
    ));
    let mut s = good.clone();
    let mut p = prox.clone();
    p[3] = f64::INFINITY;
    s.prox = Some(p);
    v.push((
        "prox Inf",
        s,
        Error::NonFinite {
            what: "state.prox",
            index: 3,
        },
    ));
    // Not orthonormal: scaled by 1.001 (|P^T P - I| = 2e-3 > the 1e-6 acceptance) and a
    // random matrix.
    let mut s = good.clone();
    s.prox = Some(prox.iter().map(|x| x * 1.001).collect());
    v.push((
        "prox scaled",
        s,
        Error::InvalidParameter {
            name: "state.prox",
            reason: String::new(),
        },
    ));
    let mut s = good.clone();
    s.prox = Some(Rng(9).normals(D * K));
    v.push((
        "prox random",
        s,
        Error::InvalidParameter {
            name: "state.prox",
            reason: String::new(),
        },
    ));
    v
}

/// `InvalidParameter` compares by name only (the reason is a message).
fn same_error(got: &Error, want: &Error) -> bool {
    match (got, want) {
        (Error::InvalidParameter { name: a, .. }, Error::InvalidParameter { name: b, .. }) => {
            a == b
        }
        _ => got == want,
    }
}

/// A head that receives every bad call between its valid calls, against a clean twin.
fn run_dirty_vs_clean(policy: AbsentClassPolicy) {
    let cfg = HeadConfig::new(D, K).with_policy(policy);
    let mut clean = CpuHead::<f64>::new(cfg.clone()).unwrap();
    let mut dirty = CpuHead::<f64>::new(cfg.clone()).unwrap();
    let mut rng = Rng(0xe770);
    let n = 9;

    // Before any forward: backward and infer are refused.
    assert_eq!(
        dirty.backward(&vec![0.0; n * K]).unwrap_err(),
        Error::BackwardWithoutForward
    );
    let probe = rng.normals(4 * D);
    assert_eq!(dirty.infer(&probe).unwrap_err(), Error::Untrained);
    assert_eq!(dirty.classifier(), Ok(None));
    // A batch whose only class is the global mean: under Hold, E_new = 0 on a fresh head.
    if policy == AbsentClassPolicy::Hold {
        let raw = rng.normals(5 * D);
        let before = dirty.export_state().unwrap();
        assert_eq!(
            fwd(&mut dirty, &raw, &[1i64; 5]).unwrap_err(),
            Error::DegenerateMeans
        );
        same_state(&dirty.export_state().unwrap(), &before);
    }

    for step in 0..4 {
        let absent = if step % 2 == 0 { Some(step % K) } else { None };
        let (raw, labels) = batch(&mut rng, n, absent);
        // Bad forwards (no pending backward on the first step, a pending one afterwards is
        // dropped only by a *successful* forward).
        for (what, r, l, want) in bad_forwards(&raw, &labels) {
            let before = dirty.export_state().unwrap();
            let got = fwd(&mut dirty, &r, &l).unwrap_err();
            assert!(same_error(&got, &want), "{what}: {got:?} vs {want:?}");
            same_state(&dirty.export_state().unwrap(), &before);
        }
        // Labels of other integer types: u64 beyond i64 saturates in the message.
        let mut l_u64: Vec<u64> = labels.iter().map(|&l| l as u64).collect();
        l_u64[0] = u64::MAX;
        let before = dirty.export_state().unwrap();
        assert_eq!(
            fwd(&mut dirty, &raw, &l_u64).unwrap_err(),
            Error::LabelOutOfRange {
                index: 0,
                label: i64::MAX,
                classes: K
            }
        );
        same_state(&dirty.export_state().unwrap(), &before);
        // Bad imports.
        for (what, s, want) in bad_states(&dirty.export_state().unwrap()) {
            let before = dirty.export_state().unwrap();
            let got = dirty.import_state(s).unwrap_err();
            assert!(same_error(&got, &want), "{what}: {got:?} vs {want:?}");
            same_state(&dirty.export_state().unwrap(), &before);
        }

        let oc = fwd(&mut clean, &raw, &labels).unwrap();
        let od = fwd(&mut dirty, &raw, &labels).unwrap();
        same_output(&oc, &od);

        // With a backward pending: bad forwards, bad imports and bad backwards keep it.
        for (what, r, l, want) in bad_forwards(&raw, &labels) {
            let before = dirty.export_state().unwrap();
            let got = fwd(&mut dirty, &r, &l).unwrap_err();
            assert!(same_error(&got, &want), "pending, {what}: {got:?}");
            same_state(&dirty.export_state().unwrap(), &before);
        }
        for (what, s, want) in bad_states(&dirty.export_state().unwrap()) {
            let before = dirty.export_state().unwrap();
            let got = dirty.import_state(s).unwrap_err();
            assert!(same_error(&got, &want), "pending, {what}: {got:?}");
            same_state(&dirty.export_state().unwrap(), &before);
        }
        for (what, g, want) in bad_backwards(n) {
            let before = dirty.export_state().unwrap();
            let got = dirty.backward(&g).unwrap_err();
            assert!(same_error(&got, &want), "{what}: {got:?} vs {want:?}");
            same_state(&dirty.export_state().unwrap(), &before);
        }
        // Bad inference calls (state untouched).
        let before = dirty.export_state().unwrap();
        assert_eq!(dirty.infer(&[]).unwrap_err(), Error::EmptyBatch);
        assert!(matches!(
            dirty.infer(&probe[..D + 1]).unwrap_err(),
            Error::ShapeMismatch { what: "raw", .. }
        ));
        let mut pn = probe.clone();
        pn[D] = f64::NAN;
        assert_eq!(
            dirty.infer(&pn).unwrap_err(),
            Error::NonFinite {
                what: "raw",
                index: D
            }
        );
        same_state(&dirty.export_state().unwrap(), &before);

        let (_, dz) = cross_entropy(&oc.logits, &labels, K).unwrap();
        let gc = clean.backward(&dz).unwrap();
        let gd = dirty.backward(&dz).unwrap();
        assert_eq!(bits(&gc), bits(&gd), "step {step}: d_raw differs");
        // A second backward for the same forward is refused, state untouched.
        let before = dirty.export_state().unwrap();
        assert_eq!(
            dirty.backward(&dz).unwrap_err(),
            Error::BackwardWithoutForward
        );
        same_state(&dirty.export_state().unwrap(), &before);
        same_state(
            &clean.export_state().unwrap(),
            &dirty.export_state().unwrap(),
        );
        assert_eq!(
            bits(&clean.infer(&probe).unwrap()),
            bits(&dirty.infer(&probe).unwrap())
        );
    }
    // A successful import drops the pending backward.
    let (raw, labels) = batch(&mut rng, n, None);
    fwd(&mut dirty, &raw, &labels).unwrap();
    dirty.import_state(clean.export_state().unwrap()).unwrap();
    assert_eq!(
        dirty.backward(&vec![0.0; n * K]).unwrap_err(),
        Error::BackwardWithoutForward
    );
}

#[test]
fn failing_calls_leave_the_head_untouched_hold() {
    run_dirty_vs_clean(AbsentClassPolicy::Hold);
}

#[test]
fn failing_calls_leave_the_head_untouched_reference() {
    run_dirty_vs_clean(AbsentClassPolicy::Reference);
}

#[test]
fn f32_head_refuses_non_finite_input() {
    let mut h = CpuHead::<f32>::new(HeadConfig::new(D, K)).unwrap();
    let mut raw = vec![0.5f32; 3 * D];
    raw[2] = f32::NAN;
    assert_eq!(
        h.forward(&raw, &[0u32, 1, 2]).unwrap_err(),
        Error::NonFinite {
            what: "raw",
            index: 2
        }
    );
    assert_eq!(h.export_state().unwrap().moving, MovingMeans::new(D, K));
}

#[test]
fn stateless_api_errors() {
    let mut rng = Rng(0xe771);
    let y = from_mat(&random_y(&mut rng, D, K));
    let prox = from_mat(&random_stiefel(&mut rng, D, K));
    assert_eq!(
        solve_etf(&y, None, 2, K, 1e-3).unwrap_err(),
        Error::DimensionBelowClasses { dim: 2, classes: K }
    );
    assert_eq!(
        solve_etf(&y[..D], None, D, 1, 1e-3).unwrap_err(),
        Error::TooFewClasses { classes: 1 }
    );
    for delta in [0.0, -1.0, f64::NAN, f64::INFINITY] {
        let e = solve_etf(&y, Some(&prox), D, K, delta).unwrap_err();
        assert!(is_invalid(&e, "delta"), "{e:?}");
    }
    assert_eq!(
        solve_etf(&y[1..], None, D, K, 1e-3).unwrap_err(),
        Error::ShapeMismatch {
            what: "y",
            expected: D * K,
            got: D * K - 1
        }
    );
    assert_eq!(
        solve_etf(&y, Some(&prox[..D]), D, K, 1e-3).unwrap_err(),
        Error::ShapeMismatch {
            what: "prox",
            expected: D * K,
            got: D
        }
    );
    let mut yn = y.clone();
    yn[3] = f64::NAN;
    assert_eq!(
        solve_etf(&yn, None, D, K, 1e-3).unwrap_err(),
        Error::NonFinite {
            what: "y",
            index: 3
        }
    );
    let mut pn = prox.clone();
    pn[0] = f64::NEG_INFINITY;
    assert_eq!(
        solve_etf(&y, Some(&pn), D, K, 1e-3).unwrap_err(),
        Error::NonFinite {
            what: "prox",
            index: 0
        }
    );
    assert_eq!(
        solve_etf(&[0.0; D * K], None, D, K, 1e-3).unwrap_err(),
        Error::DegenerateMeans
    );
    let e = solve_etf_with(
        &y,
        Some(&prox),
        D,
        K,
        1e-3,
        SolveMethod::Riemannian { max_iters: 0 },
    )
    .unwrap_err();
    assert!(is_invalid(&e, "max_iters"), "{e:?}");
    // vjp input errors.
    let sol = solve_etf(&y, Some(&prox), D, K, 1e-3).unwrap();
    assert_eq!(
        sol.vjp(&y[1..]).unwrap_err(),
        Error::ShapeMismatch {
            what: "dl_dp",
            expected: D * K,
            got: D * K - 1
        }
    );
    assert_eq!(
        sol.vjp(&yn).unwrap_err(),
        Error::NonFinite {
            what: "dl_dp",
            index: 3
        }
    );
    // cross_entropy input errors.
    assert_eq!(
        cross_entropy::<f64, u32>(&[], &[], K).unwrap_err(),
        Error::EmptyBatch
    );
    assert_eq!(
        cross_entropy(&[0.0; 5], &[0u32, 1], K).unwrap_err(),
        Error::ShapeMismatch {
            what: "logits",
            expected: 2 * K,
            got: 5
        }
    );
    assert_eq!(
        cross_entropy(&[0.0; 6], &[0i32, -2], K).unwrap_err(),
        Error::LabelOutOfRange {
            index: 1,
            label: -2,
            classes: K
        }
    );
    assert_eq!(
        cross_entropy(&[0.0, f64::NAN, 0.0], &[0u32], K).unwrap_err(),
        Error::NonFinite {
            what: "logits",
            index: 1
        }
    );
}

#[test]
fn importing_a_valid_state_resumes_bit_exactly() {
    // Not an error path, but the other half of the promise: export/import is lossless.
    let cfg = HeadConfig::new(D, K).with_policy(AbsentClassPolicy::Reference);
    let mut a = CpuHead::<f64>::new(cfg.clone()).unwrap();
    let mut rng = Rng(0xe772);
    for _ in 0..2 {
        let (raw, labels) = batch(&mut rng, 7, Some(1));
        fwd(&mut a, &raw, &labels).unwrap();
    }
    let mut b = CpuHead::<f64>::new(cfg).unwrap();
    b.import_state(a.export_state().unwrap()).unwrap();
    let (raw, labels) = batch(&mut rng, 7, None);
    let oa = fwd(&mut a, &raw, &labels).unwrap();
    let ob = fwd(&mut b, &raw, &labels).unwrap();
    same_output(&oa, &ob);
    let (_, dz) = cross_entropy(&oa.logits, &labels, K).unwrap();
    assert_eq!(
        bits(&a.backward(&dz).unwrap()),
        bits(&b.backward(&dz).unwrap())
    );
}

#[test]
fn into_buffers_of_the_wrong_length_are_refused() {
    // forward_into / backward_into check the caller's output buffer like every input: a
    // ShapeMismatch, no state change, the pending backward kept (it then gives the same
    // gradient as a clean twin's, bit for bit).
    let cfg = HeadConfig::new(D, K);
    let mut clean = CpuHead::<f64>::new(cfg.clone()).unwrap();
    let mut head = CpuHead::<f64>::new(cfg).unwrap();
    let mut rng = Rng(0x1470);
    let (n, labels) = (7, [0i64, 1, 2, 0, 1, 2, 0]);
    let raw = rng.normals(n * D);
    let mut logits = vec![0.0; n * K];
    clean.forward_into(&raw, &labels, &mut logits).unwrap();
    head.forward_into(&raw, &labels, &mut logits).unwrap();
    let before = head.export_state().unwrap();
    for len in [0, n * K - 1, n * K + 1] {
        let mut short = vec![0.0; len];
        assert!(matches!(
            head.forward_into(&raw, &labels, &mut short).unwrap_err(),
            Error::ShapeMismatch { what: "logits", .. }
        ));
        same_state(&head.export_state().unwrap(), &before);
    }
    let (_, dz) = cross_entropy(&logits, &labels, K).unwrap();
    for len in [0, n * D - 1, n * D + 1] {
        let mut short = vec![0.0; len];
        assert!(matches!(
            head.backward_into(&dz, &mut short).unwrap_err(),
            Error::ShapeMismatch { what: "d_raw", .. }
        ));
        same_state(&head.export_state().unwrap(), &before);
    }
    let (mut a, mut b) = (vec![0.0; n * D], vec![0.0; n * D]);
    clean.backward_into(&dz, &mut a).unwrap();
    head.backward_into(&dz, &mut b).unwrap();
    assert_eq!(bits(&a), bits(&b));
}
