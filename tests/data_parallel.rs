//! Data-parallel steps of the CPU head (issue 15): R heads, one per thread-rank of a
//! `Collective::threads` group, each given its shard of a batch, against one head over the
//! whole batch (the oracle: the same step without sharding).
//!
//! Tolerances: 1e-12 (f64) and 1e-5 (f32), relative to the largest magnitude of the compared
//! quantity. Sharding changes only the order in which the batch sums are added (per-class
//! sums, counts, feature sum; `X^T dZ` and `1^T dZ` in the backward), a relative change of a
//! few units of rounding in each sum, which the solve amplifies by its conditioning
//! (`s_max / s_min` of the moving means, below 100 for these batches).

use implicit_etf::Collective;
use implicit_etf::{AbsentClassPolicy, CpuHead, Error, HeadConfig, HeadState, Real};

mod common;
use common::parallel::{batch, ce_grad, rel};

/// What a sequence of steps gives: per step the logits and `d_raw` (rows in global order),
/// and at the end the state and `P`.
#[derive(Debug)]
struct Run<T> {
    logits: Vec<Vec<T>>,
    d_raw: Vec<Vec<T>>,
    state: HeadState<T>,
    p: Vec<T>,
}

fn cast<T: Real>(v: &[f64]) -> Vec<T> {
    v.iter().map(|&x| T::from_f64(x)).collect()
}

/// One head over the whole batches.
fn single<T: Real>(cfg: &HeadConfig, steps: &[(Vec<f64>, Vec<u32>)]) -> Run<T> {
    let k = cfg.classes;
    let mut head = CpuHead::<T>::new(cfg.clone()).unwrap();
    let (mut logits, mut d_raw) = (Vec::new(), Vec::new());
    for (raw, labels) in steps {
        let z = head.forward(&cast::<T>(raw), labels).unwrap();
        let g = ce_grad(&z, labels, k, labels.len());
        d_raw.push(head.backward(&g).unwrap());
        logits.push(z);
    }
    Run {
        logits,
        d_raw,
        state: head.export_state().unwrap(),
        p: head.last_solution().unwrap().p.to_vec(),
    }
}

/// `sizes.len()` ranks, rank `r` taking the next `sizes[r]` rows of every batch.
fn sharded<T: Real + Send + Sync>(
    cfg: &HeadConfig,
    steps: &[(Vec<f64>, Vec<u32>)],
    sizes: &[usize],
) -> Vec<Run<T>> {
    let (d, k) = (cfg.dim, cfg.classes);
    let ranks = Collective::threads(sizes.len()).unwrap();
    std::thread::scope(|s| {
        let hs: Vec<_> = ranks
            .into_iter()
            .map(|c| {
                let start: usize = sizes[..c.rank()].iter().sum();
                let size = sizes[c.rank()];
                s.spawn(move || {
                    let mut head = CpuHead::<T>::new(cfg.clone())
                        .unwrap()
                        .with_collective(c)
                        .unwrap();
                    let (mut logits, mut d_raw) = (Vec::new(), Vec::new());
                    for (raw, labels) in steps {
                        let rows = start..start + size;
                        let raw_r = cast::<T>(&raw[rows.start * d..rows.end * d]);
                        let lab_r = &labels[rows];
                        let z = head.forward(&raw_r, lab_r).unwrap();
                        let g = ce_grad(&z, lab_r, k, labels.len());
                        d_raw.push(head.backward(&g).unwrap());
                        logits.push(z);
                    }
                    Run {
                        logits,
                        d_raw,
                        state: head.export_state().unwrap(),
                        p: head.last_solution().unwrap().p.to_vec(),
                    }
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn bits<T: Real>(v: &[T]) -> Vec<u64> {
    v.iter().map(|x| x.to_f64().to_bits()).collect()
}

/// Sharded against single over `steps`, to `tol`; also: every rank has the same `P` and
/// state, bit for bit.
fn check<T: Real + Send + Sync>(
    cfg: &HeadConfig,
    steps: &[(Vec<f64>, Vec<u32>)],
    sizes: &[usize],
    tol: f64,
) {
    let one = single::<T>(cfg, steps);
    let many = sharded::<T>(cfg, steps, sizes);
    let what = format!("sizes {sizes:?}, policy {:?}", cfg.policy);
    for (s, _) in steps.iter().enumerate() {
        let z: Vec<T> = many.iter().flat_map(|r| r.logits[s].clone()).collect();
        let g: Vec<T> = many.iter().flat_map(|r| r.d_raw[s].clone()).collect();
        let (ez, eg) = (rel(&z, &one.logits[s]), rel(&g, &one.d_raw[s]));
        assert!(ez <= tol, "{what}: step {s} logits off by {ez:e}");
        assert!(eg <= tol, "{what}: step {s} d_raw off by {eg:e}");
    }
    for r in &many {
        let ep = rel(&r.p, &one.p);
        assert!(ep <= tol, "{what}: P off by {ep:e}");
        let ee = rel(&r.state.moving.e, &one.state.moving.e);
        assert!(ee <= tol, "{what}: moving means off by {ee:e}");
        let prox = r.state.prox.as_ref().unwrap();
        let eprox = rel(prox, one.state.prox.as_ref().unwrap());
        assert!(eprox <= tol, "{what}: Prox off by {eprox:e}");
        assert_eq!(r.state.moving.seen, one.state.moving.seen, "{what}: seen");
        assert_eq!(r.state.moving.step, one.state.moving.step, "{what}: step");
        assert_eq!(
            r.state.moving.alpha, one.state.moving.alpha,
            "{what}: alpha"
        );
        // Every rank solved from the same bits, so holds the same bits.
        assert_eq!(
            bits(&r.p),
            bits(&many[0].p),
            "{what}: P differs between ranks"
        );
        assert_eq!(bits(prox), bits(many[0].state.prox.as_ref().unwrap()));
        assert_eq!(bits(&r.state.moving.e), bits(&many[0].state.moving.e));
    }
}

const D: usize = 12;
const K: usize = 5;

fn steps(n: usize, classes_per_step: &[&[u32]]) -> Vec<(Vec<f64>, Vec<u32>)> {
    classes_per_step
        .iter()
        .enumerate()
        .map(|(s, cl)| batch(11 + s as u64, n, D, cl))
        .collect()
}

fn configs() -> Vec<HeadConfig> {
    [AbsentClassPolicy::Reference, AbsentClassPolicy::Hold]
        .into_iter()
        .map(|p| HeadConfig::new(D, K).with_policy(p).with_tau(Some(1.5)))
        .collect()
}

const ALL: &[u32] = &[0, 1, 2, 3, 4];

#[test]
fn two_ranks_even_split_matches_one_head() {
    let st = steps(16, &[ALL, ALL, ALL]);
    for cfg in configs() {
        check::<f64>(&cfg, &st, &[8, 8], 1e-12);
        check::<f32>(&cfg, &st, &[8, 8], 1e-5);
    }
}

#[test]
fn three_ranks_uneven_split_with_an_empty_shard() {
    // Rank 1 has no rows at all; ranks 0 and 2 unequal.
    let st = steps(17, &[ALL, ALL, ALL]);
    for cfg in configs() {
        check::<f64>(&cfg, &st, &[5, 0, 12], 1e-12);
        check::<f32>(&cfg, &st, &[5, 0, 12], 1e-5);
    }
}

#[test]
fn four_ranks_classes_absent_from_some_shards() {
    // 4-row shards of a batch labelled 0,1,2,3,4,0,... (rows i: label (7 i + seed) % 5):
    // every shard misses a class, and the batch of step 1 has only classes {0, 1, 2}, so
    // classes 3 and 4 are absent from every shard there (and, in step 2, class 4 again).
    let st = steps(16, &[ALL, &[0, 1, 2], &[0, 1, 2, 3]]);
    for cfg in configs() {
        check::<f64>(&cfg, &st, &[4, 4, 4, 4], 1e-12);
        check::<f32>(&cfg, &st, &[4, 4, 4, 4], 1e-5);
    }
}

#[test]
fn class_absent_from_every_shard_from_the_first_step() {
    // Class 4 never appears: under `Reference` its column takes the global mean (which needs
    // the global mean, summed over the ranks), under `Hold` it stays zero.
    let st = steps(15, &[&[0, 1, 2, 3], &[0, 1, 2, 3], &[1, 2, 3, 0]]);
    for cfg in configs() {
        check::<f64>(&cfg, &st, &[3, 7, 5], 1e-12);
        check::<f32>(&cfg, &st, &[3, 7, 5], 1e-5);
    }
}

#[test]
fn without_tau_and_one_rank_holding_everything() {
    let st = steps(12, &[ALL, ALL]);
    let cfg = HeadConfig::new(D, K).with_tau(None);
    check::<f64>(&cfg, &st, &[0, 12, 0], 1e-12);
    check::<f64>(&cfg, &st, &[12], 1e-12);
}

/// A step where rank `bad` has an invalid input: every rank fails, no state changes, and the
/// next (valid) step still matches the single head.
fn failing_step(bad: usize, corrupt: impl Fn(&mut Vec<f64>, &mut Vec<u32>) + Sync) -> Vec<Error> {
    let cfg = HeadConfig::new(D, K).with_tau(Some(1.5));
    let st = steps(12, &[ALL, ALL, ALL]);
    let sizes = [4usize, 4, 4];
    let good = [st[0].clone(), st[2].clone()];
    let one = single::<f64>(&cfg, &good);
    let ranks = Collective::threads(3).unwrap();
    let out: Vec<(Error, Vec<f64>, Vec<f64>)> = std::thread::scope(|s| {
        let hs: Vec<_> = ranks
            .into_iter()
            .map(|c| {
                let (st, corrupt, cfg) = (&st, &corrupt, &cfg);
                s.spawn(move || {
                    let r = c.rank();
                    let rows = r * sizes[r]..(r + 1) * sizes[r];
                    let shard = |s: usize| {
                        let (raw, lab) = &st[s];
                        (
                            raw[rows.start * D..rows.end * D].to_vec(),
                            lab[rows.clone()].to_vec(),
                        )
                    };
                    let mut head = CpuHead::<f64>::new(cfg.clone())
                        .unwrap()
                        .with_collective(c)
                        .unwrap();
                    let (raw, lab) = shard(0);
                    let z = head.forward(&raw, &lab).unwrap();
                    head.backward(&ce_grad(&z, &lab, K, 12)).unwrap();
                    let before = head.export_state().unwrap();
                    let p_before = head.last_solution().unwrap().p.to_vec();
                    let (mut raw, mut lab) = shard(1);
                    if r == bad {
                        corrupt(&mut raw, &mut lab);
                    }
                    let err = head.forward(&raw, &lab).unwrap_err();
                    assert_eq!(
                        head.export_state().unwrap(),
                        before,
                        "rank {r}: state changed"
                    );
                    assert_eq!(head.last_solution().unwrap().p, &p_before[..]);
                    // No backward is pending for the failed step; the last one was taken.
                    assert_eq!(
                        head.backward(&[]).unwrap_err(),
                        Error::BackwardWithoutForward
                    );
                    let (raw, lab) = shard(2);
                    let z = head.forward(&raw, &lab).unwrap();
                    let g = head.backward(&ce_grad(&z, &lab, K, 12)).unwrap();
                    (err, z, g)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let z: Vec<f64> = out.iter().flat_map(|o| o.1.clone()).collect();
    let g: Vec<f64> = out.iter().flat_map(|o| o.2.clone()).collect();
    assert!(rel(&z, &one.logits[1]) <= 1e-12);
    assert!(rel(&g, &one.d_raw[1]) <= 1e-12);
    out.into_iter().map(|o| o.0).collect()
}

#[test]
fn a_bad_label_on_one_rank_fails_every_rank_and_changes_no_state() {
    let errs = failing_step(1, |_, lab| lab[2] = K as u32);
    assert!(
        matches!(errs[1], Error::LabelOutOfRange { index: 2, .. }),
        "{:?}",
        errs[1]
    );
    for r in [0, 2] {
        assert_eq!(
            errs[r],
            Error::PeerFailed {
                phase: "forward",
                ranks: 1
            }
        );
    }
}

#[test]
fn a_nan_or_a_wrong_shape_on_one_rank_fails_every_rank() {
    let errs = failing_step(0, |raw, _| raw[5] = f64::NAN);
    assert!(
        matches!(errs[0], Error::NonFinite { index: 5, .. }),
        "{:?}",
        errs[0]
    );
    assert!(matches!(errs[2], Error::PeerFailed { ranks: 1, .. }));
    let errs = failing_step(2, |raw, _| raw.truncate(raw.len() - 1));
    assert!(
        matches!(errs[2], Error::ShapeMismatch { .. }),
        "{:?}",
        errs[2]
    );
    assert!(matches!(errs[1], Error::PeerFailed { ranks: 1, .. }));
}

#[test]
fn a_bad_gradient_on_one_rank_fails_every_backward_which_can_be_retried() {
    let cfg = HeadConfig::new(D, K).with_tau(Some(1.5));
    let st = steps(12, &[ALL]);
    let one = single::<f64>(&cfg, &st);
    let ranks = Collective::threads(2).unwrap();
    let out: Vec<(Error, Vec<f64>)> = std::thread::scope(|s| {
        let hs: Vec<_> = ranks
            .into_iter()
            .map(|c| {
                let (st, cfg) = (&st, &cfg);
                s.spawn(move || {
                    let r = c.rank();
                    let rows = r * 6..(r + 1) * 6;
                    let (raw, lab) = (&st[0].0[rows.start * D..rows.end * D], &st[0].1[rows]);
                    let mut head = CpuHead::<f64>::new(cfg.clone())
                        .unwrap()
                        .with_collective(c)
                        .unwrap();
                    let z = head.forward(raw, lab).unwrap();
                    let g = ce_grad(&z, lab, K, 12);
                    let mut bad = g.clone();
                    if r == 1 {
                        bad[3] = f64::INFINITY;
                    }
                    let err = head.backward(&bad).unwrap_err();
                    (err, head.backward(&g).unwrap())
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(matches!(
        out[1].0,
        Error::NonFinite {
            what: "d_logits",
            index: 3
        }
    ));
    assert_eq!(
        out[0].0,
        Error::PeerFailed {
            phase: "backward",
            ranks: 1
        }
    );
    let g: Vec<f64> = out.iter().flat_map(|o| o.1.clone()).collect();
    assert!(rel(&g, &one.d_raw[0]) <= 1e-12);
}

#[test]
fn an_empty_global_batch_is_refused_on_every_rank() {
    let ranks = Collective::threads(2).unwrap();
    let errs: Vec<Error> = std::thread::scope(|s| {
        let hs: Vec<_> = ranks
            .into_iter()
            .map(|c| {
                s.spawn(move || {
                    let mut head = CpuHead::<f64>::new(HeadConfig::new(D, K))
                        .unwrap()
                        .with_collective(c)
                        .unwrap();
                    let e = head.forward(&[], &[] as &[u32]).unwrap_err();
                    assert_eq!(head.export_state().unwrap().prox, None);
                    e
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(errs.iter().all(|e| *e == Error::EmptyBatch), "{errs:?}");
}
