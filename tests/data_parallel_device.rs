//! Data-parallel steps of the device head (issue 15): R `DeviceHead`s, one per thread-rank of
//! a `Collective::threads` group, each on a device of its own, against one `DeviceHead` over
//! the whole batch. Runs on the CPU execution (CI) and, where a GPU is available, on CUDA too
//! (the thread group then goes through the host; `tests/nccl.rs` checks NCCL).
//!
//! Tolerance 1e-5, relative to the largest magnitude of the compared quantity: the head
//! computes in f32, and sharding changes only the order of the batch sums (class sums,
//! feature sum, `dZ^T X`, `1^T dZ`), by a few f32 roundings, which the solve amplifies by the
//! moving means' conditioning (below 100 here). `P` is compared too (f64 on the device, but
//! solved from f32 statistics: the same 1e-5).

use implicit_etf::runtime::{Backend, Buffer, Device};
use implicit_etf::Collective;
use implicit_etf::{AbsentClassPolicy, DeviceHead, Error, HeadConfig, HeadState};

mod common;
use common::parallel::{batch, ce_grad, rel};

const D: usize = 12;
const K: usize = 5;
const ALL: &[u32] = &[0, 1, 2, 3, 4];
const TOL: f64 = 1e-5;

struct Run {
    logits: Vec<Vec<f32>>,
    d_raw: Vec<Vec<f32>>,
    state: HeadState<f32>,
    p: Vec<f64>,
}

fn new_device(backend: Backend) -> Device {
    match backend {
        Backend::Cpu => Device::cpu(),
        Backend::Cuda => Device::cuda(0).expect("CUDA device listed by devices()"),
    }
}

/// One step's forward and backward of `head` on rows (`raw`, `labels`) of a global batch of
/// `n_total` rows.
fn step(
    head: &mut DeviceHead,
    raw: &[f64],
    labels: &[u32],
    n_total: usize,
) -> Result<(Vec<f32>, Vec<f32>), Error> {
    let dev = head.device();
    let raw_f: Vec<f32> = raw.iter().map(|&v| v as f32).collect();
    let (rb, lb): (Buffer, Buffer) = (dev.upload(&raw_f)?, dev.upload(labels)?);
    let z = head.forward(&rb, &lb)?;
    let zv: Vec<f32> = head.device().download(&z)?;
    let g = ce_grad(&zv, labels, K, n_total);
    let gb = head.device().upload(&g)?;
    let dr = head.backward(&gb)?;
    Ok((zv, head.device().download(&dr)?))
}

fn finish(head: &DeviceHead, logits: Vec<Vec<f32>>, d_raw: Vec<Vec<f32>>) -> Run {
    let p = head.last_solution().unwrap().p;
    Run {
        logits,
        d_raw,
        state: head.export_state().unwrap(),
        p: head.device().download(p).unwrap(),
    }
}

fn single(backend: Backend, cfg: &HeadConfig, steps: &[(Vec<f64>, Vec<u32>)]) -> Run {
    let mut head = DeviceHead::new(new_device(backend), cfg.clone()).unwrap();
    let (mut logits, mut d_raw) = (Vec::new(), Vec::new());
    for (raw, labels) in steps {
        let (z, g) = step(&mut head, raw, labels, labels.len()).unwrap();
        logits.push(z);
        d_raw.push(g);
    }
    finish(&head, logits, d_raw)
}

fn sharded(
    backend: Backend,
    cfg: &HeadConfig,
    steps: &[(Vec<f64>, Vec<u32>)],
    sizes: &[usize],
) -> Vec<Run> {
    let ranks = Collective::threads(sizes.len()).unwrap();
    std::thread::scope(|s| {
        let hs: Vec<_> = ranks
            .into_iter()
            .map(|c| {
                let start: usize = sizes[..c.rank()].iter().sum();
                let rows = start..start + sizes[c.rank()];
                s.spawn(move || {
                    let mut head = DeviceHead::new(new_device(backend), cfg.clone())
                        .unwrap()
                        .with_collective(c)
                        .unwrap();
                    let (mut logits, mut d_raw) = (Vec::new(), Vec::new());
                    for (raw, labels) in steps {
                        let (z, g) = step(
                            &mut head,
                            &raw[rows.start * D..rows.end * D],
                            &labels[rows.clone()],
                            labels.len(),
                        )
                        .unwrap();
                        logits.push(z);
                        d_raw.push(g);
                    }
                    finish(&head, logits, d_raw)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn check(cfg: &HeadConfig, steps: &[(Vec<f64>, Vec<u32>)], sizes: &[usize]) {
    for dev in common::devices() {
        let backend = dev.backend();
        let one = single(backend, cfg, steps);
        let many = sharded(backend, cfg, steps, sizes);
        let what = format!("{backend:?}, sizes {sizes:?}, policy {:?}", cfg.policy);
        for s in 0..steps.len() {
            let z: Vec<f32> = many.iter().flat_map(|r| r.logits[s].clone()).collect();
            let g: Vec<f32> = many.iter().flat_map(|r| r.d_raw[s].clone()).collect();
            let (ez, eg) = (rel(&z, &one.logits[s]), rel(&g, &one.d_raw[s]));
            assert!(ez <= TOL, "{what}: step {s} logits off by {ez:e}");
            assert!(eg <= TOL, "{what}: step {s} d_raw off by {eg:e}");
        }
        for r in &many {
            let ep = rel(&r.p, &one.p);
            assert!(ep <= TOL, "{what}: P off by {ep:e}");
            let ee = rel(&r.state.moving.e, &one.state.moving.e);
            assert!(ee <= TOL, "{what}: moving means off by {ee:e}");
            assert_eq!(r.state.moving.seen, one.state.moving.seen, "{what}: seen");
            assert_eq!(r.state.moving.step, one.state.moving.step, "{what}: step");
            assert_eq!(r.state.moving.alpha, one.state.moving.alpha, "{what}");
            // Same sums, same deterministic kernels: the same bits on every rank.
            assert_eq!(r.p, many[0].p, "{what}: P differs between ranks");
            assert_eq!(
                r.state, many[0].state,
                "{what}: states differ between ranks"
            );
        }
    }
}

fn steps(n: usize, classes: &[&[u32]]) -> Vec<(Vec<f64>, Vec<u32>)> {
    classes
        .iter()
        .enumerate()
        .map(|(s, cl)| batch(11 + s as u64, n, D, cl))
        .collect()
}

fn cfg(policy: AbsentClassPolicy) -> HeadConfig {
    HeadConfig::new(D, K)
        .with_policy(policy)
        .with_tau(Some(1.5))
}

#[test]
#[ignore = "slow: about 5 s on the 2-core CPU execution (the fast tier covers R = 4 with an empty shard)"]
fn device_ranks_even_and_uneven_splits_match_one_head() {
    let st = steps(16, &[ALL, ALL, ALL]);
    let c = cfg(AbsentClassPolicy::Reference);
    check(&c, &st, &[8, 8]);
    check(&c, &st, &[3, 9, 4]);
}

/// Classes absent from some shards, classes 3 and 4 absent from every shard in step 1, class
/// 4 in step 2; rank 2 has no rows.
fn absent_classes_and_an_empty_shard(policy: AbsentClassPolicy) {
    let st = steps(16, &[ALL, &[0, 1, 2], &[0, 1, 2, 3]]);
    check(&cfg(policy), &st, &[4, 4, 0, 8]);
}

#[test]
fn device_ranks_with_absent_classes_and_an_empty_shard() {
    absent_classes_and_an_empty_shard(AbsentClassPolicy::Reference);
}

#[test]
#[ignore = "slow: about 2.5 s on the 2-core CPU execution (the CPU head's tests cover Hold in the fast tier)"]
fn device_ranks_with_absent_classes_and_an_empty_shard_hold() {
    absent_classes_and_an_empty_shard(AbsentClassPolicy::Hold);
}

#[test]
fn a_bad_label_on_one_device_rank_fails_every_rank_and_changes_no_state() {
    let c = cfg(AbsentClassPolicy::Reference);
    let st = steps(12, &[ALL, ALL, ALL]);
    for dev in common::devices() {
        let backend = dev.backend();
        let one = single(backend, &c, &[st[0].clone(), st[2].clone()]);
        let ranks = Collective::threads(3).unwrap();
        let out: Vec<(Error, Error, Vec<f32>, Vec<f32>)> = std::thread::scope(|s| {
            let hs: Vec<_> = ranks
                .into_iter()
                .map(|col| {
                    let (st, c) = (&st, &c);
                    s.spawn(move || {
                        let r = col.rank();
                        let rows = r * 4..(r + 1) * 4;
                        let shard = |s: usize| {
                            let (raw, lab) = &st[s];
                            (
                                raw[rows.start * D..rows.end * D].to_vec(),
                                lab[rows.clone()].to_vec(),
                            )
                        };
                        let mut head = DeviceHead::new(new_device(backend), c.clone())
                            .unwrap()
                            .with_collective(col)
                            .unwrap();
                        let (raw, lab) = shard(0);
                        step(&mut head, &raw, &lab, 12).unwrap();
                        let before = head.export_state().unwrap();
                        // Step 1: rank 1 has a label out of range.
                        let (raw, mut lab) = shard(1);
                        if r == 1 {
                            lab[2] = 9;
                        }
                        let err = step(&mut head, &raw, &lab, 12).unwrap_err();
                        assert_eq!(
                            head.export_state().unwrap(),
                            before,
                            "rank {r}: state changed"
                        );
                        // Step 1 again: rank 0 passes logits of the wrong shape (a host-side
                        // error, before the all-reduce).
                        let (raw, lab) = shard(1);
                        let dev = head.device();
                        let rb = dev
                            .upload(&raw.iter().map(|&v| v as f32).collect::<Vec<_>>())
                            .unwrap();
                        let lb = dev.upload(&lab).unwrap();
                        let mut z = dev
                            .alloc_zeros(
                                implicit_etf::runtime::DType::F32,
                                if r == 0 { 3 } else { 4 * K },
                            )
                            .unwrap();
                        let err2 = head.forward_into(&rb, &lb, &mut z).unwrap_err();
                        assert_eq!(
                            head.export_state().unwrap(),
                            before,
                            "rank {r}: state changed"
                        );
                        let (raw, lab) = shard(2);
                        let (z, g) = step(&mut head, &raw, &lab, 12).unwrap();
                        (err, err2, z, g)
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(
            matches!(
                out[1].0,
                Error::LabelOutOfRange {
                    index: 2,
                    label: 9,
                    ..
                }
            ),
            "{:?}",
            out[1].0
        );
        for r in [0, 2] {
            assert_eq!(
                out[r].0,
                Error::PeerFailed {
                    phase: "forward",
                    ranks: 1
                }
            );
        }
        assert!(
            matches!(out[0].1, Error::ShapeMismatch { .. }),
            "{:?}",
            out[0].1
        );
        for r in [1, 2] {
            assert_eq!(
                out[r].1,
                Error::PeerFailed {
                    phase: "forward",
                    ranks: 1
                }
            );
        }
        // The next valid step matches the single head's second step.
        let z: Vec<f32> = out.iter().flat_map(|o| o.2.clone()).collect();
        let g: Vec<f32> = out.iter().flat_map(|o| o.3.clone()).collect();
        assert!(rel(&z, &one.logits[1]) <= TOL, "{backend:?}");
        assert!(rel(&g, &one.d_raw[1]) <= TOL, "{backend:?}");
    }
}

#[test]
fn a_bad_gradient_on_one_device_rank_fails_every_backward() {
    let c = cfg(AbsentClassPolicy::Hold);
    let st = steps(12, &[ALL]);
    for dev in common::devices() {
        let backend = dev.backend();
        let one = single(backend, &c, &st);
        let ranks = Collective::threads(2).unwrap();
        let out: Vec<(Error, Vec<f32>)> = std::thread::scope(|s| {
            let hs: Vec<_> = ranks
                .into_iter()
                .map(|col| {
                    let (st, c) = (&st, &c);
                    s.spawn(move || {
                        let r = col.rank();
                        let rows = r * 6..(r + 1) * 6;
                        let (raw, lab) = (&st[0].0[rows.start * D..rows.end * D], &st[0].1[rows]);
                        let mut head = DeviceHead::new(new_device(backend), c.clone())
                            .unwrap()
                            .with_collective(col)
                            .unwrap();
                        let dev = head.device();
                        let rb = dev
                            .upload(&raw.iter().map(|&v| v as f32).collect::<Vec<_>>())
                            .unwrap();
                        let lb = dev.upload(lab).unwrap();
                        let zb = head.forward(&rb, &lb).unwrap();
                        let z: Vec<f32> = head.device().download(&zb).unwrap();
                        let g = ce_grad(&z, lab, K, 12);
                        let mut bad = g.clone();
                        if r == 1 {
                            bad[3] = f32::NAN;
                        }
                        let badb = head.device().upload(&bad).unwrap();
                        let err = head.backward(&badb).unwrap_err();
                        let gb = head.device().upload(&g).unwrap();
                        let dr = head.backward(&gb).unwrap();
                        (err, head.device().download(&dr).unwrap())
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(
            matches!(
                out[1].0,
                Error::NonFinite {
                    what: "d_logits",
                    index: 3
                }
            ),
            "{:?}",
            out[1].0
        );
        assert_eq!(
            out[0].0,
            Error::PeerFailed {
                phase: "backward",
                ranks: 1
            }
        );
        let g: Vec<f32> = out.iter().flat_map(|o| o.1.clone()).collect();
        assert!(rel(&g, &one.d_raw[0]) <= TOL, "{backend:?}");
    }
}
