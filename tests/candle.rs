//! The candle adapter (`implicit_etf::candle`, feature `candle`) against its oracle: the same
//! `CpuHead` driven by hand with host slices.
//!
//! * Logits and feature gradients through candle's autograd. The loss is `sum(logits * G)` for
//!   a fixed random `G`, so candle hands the head `dL/dlogits = G` exactly and the oracle's
//!   `backward(G)` sees the same numbers. The adapter does no arithmetic of its own (it copies
//!   and converts), so the results are expected to be identical; the tolerances asked of it are
//!   1e-12 in `f64` and 1e-5 in `f32` (relative to the largest entry). With `f16`/`bf16`
//!   features the head computes in `f32` on the widened features (exactly the oracle's input)
//!   and the gradient is rounded once to the features' type, so it must lie within half an
//!   ulp of the oracle: `2^-11` (f16) or `2^-8` (bf16) relative, plus the smallest normal of
//!   the type for entries that round to subnormals or zero.
//! * Training: a few SGD steps of a linear backbone with the head lower the loss.
//! * Checkpoints: 3 steps, save, load into a fresh head; the next step is bit-identical to the
//!   uninterrupted run (exact, since every stored value round-trips exactly).
//! * Misuse: every case returns its `Error` variant and leaves the head unchanged (state, and a
//!   pending backward still usable).
//! * Data-parallel: 3 thread ranks of `CandleHead::with_collective` (shards of 5, 0 and 7
//!   rows), with the loss `sum(logits * G)` of the rank's rows of one global `G`, against the
//!   same `CpuHead` driven by hand over the whole batch: 1e-12 (`f64`; sharding reorders the
//!   batch sums only). A wrong-shaped label tensor on one rank (an adapter check, before the
//!   head) fails every rank's forward, and the next step still matches.
//! * CUDA (feature `candle-cuda` with a GPU): the CUDA path within the device head's
//!   tolerances of the CPU path; otherwise it prints `CUDA part skipped: <reason>`.
#![cfg(feature = "candle")]

#[path = "common/rng.rs"]
mod rng;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::Optimizer;
use implicit_etf::candle::{head_error, CandleHead};
use implicit_etf::{Collective, CpuHead, Error, HeadConfig};
use rng::Rng;

const N: usize = 12;
const D: usize = 8;
const K: usize = 4;

fn cfg() -> HeadConfig {
    HeadConfig::new(D, K)
}

/// `n x d` features with class structure, labels cycling through `0..K`.
fn batch(seed: u64, n: usize) -> (Vec<f64>, Vec<u32>) {
    let mut rng = Rng(seed);
    let y: Vec<u32> = (0..n).map(|i| (i % K) as u32).collect();
    let x = (0..n * D)
        .map(|j| rng.normal() + 2.0 * f64::from(u8::from(y[j / D] as usize == j % D)))
        .collect();
    (x, y)
}

fn max_abs(v: &[f64]) -> f64 {
    v.iter().fold(0.0f64, |m, x| m.max(x.abs()))
}

/// `max |a - b| <= tol * max(1, max |b|)`.
fn close(a: &[f64], b: &[f64], tol: f64, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    let scale = max_abs(b).max(1.0);
    let err = a
        .iter()
        .zip(b)
        .fold(0.0f64, |m, (x, y)| m.max((x - y).abs()));
    assert!(
        err <= tol * scale,
        "{what}: max error {err:e} > {tol:e} x {scale}"
    );
}

fn to_f64(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
}

/// One step through candle: logits and `dL/dfeatures` for the loss `sum(logits * g)`.
fn candle_step(head: &mut CandleHead, x: &Var, y: &Tensor, g: &Tensor) -> (Tensor, Tensor) {
    let logits = head.forward(x.as_tensor(), y).unwrap();
    let loss = (&logits * g).unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    let dx = grads
        .get(x.as_tensor())
        .expect("a feature gradient")
        .clone();
    (logits, dx)
}

fn dl_dlogits(seed: u64) -> Vec<f64> {
    Rng(seed).normals(N * K)
}

#[test]
fn data_parallel_ranks_match_one_cpu_head() {
    let sizes = [5usize, 0, 7];
    let steps: Vec<_> = (0..3)
        .map(|s| (batch(40 + s, N), dl_dlogits(50 + s)))
        .collect();
    let mut oracle = CpuHead::<f64>::new(cfg()).unwrap();
    let want: Vec<(Vec<f64>, Vec<f64>)> = steps
        .iter()
        .map(|((x, y), g)| (oracle.forward(x, y).unwrap(), oracle.backward(g).unwrap()))
        .collect();
    let ranks = Collective::threads(sizes.len()).unwrap();
    // Per rank, per step: logits, feature gradient, and the failed first try of step 1.
    type RankRun = Vec<(Vec<f64>, Vec<f64>, Option<Error>)>;
    let got: Vec<RankRun> = std::thread::scope(|sc| {
        let hs: Vec<_> = ranks
            .into_iter()
            .map(|c| {
                let steps = &steps;
                let start: usize = sizes[..c.rank()].iter().sum();
                let rows = start..start + sizes[c.rank()];
                sc.spawn(move || {
                    let rank = c.rank();
                    let mut head = CandleHead::new_f64(cfg())
                        .unwrap()
                        .with_collective(c)
                        .unwrap();
                    let mut out = Vec::new();
                    for (s, ((x, y), g)) in steps.iter().enumerate() {
                        let n = rows.len();
                        let xt = Tensor::from_vec(
                            x[rows.start * D..rows.end * D].to_vec(),
                            (n, D),
                            &Device::Cpu,
                        );
                        let xv = Var::from_tensor(&xt.unwrap()).unwrap();
                        let yt = Tensor::new(&y[rows.clone()], &Device::Cpu).unwrap();
                        // Step 1 is first tried with rank 2's labels one short: every rank fails.
                        let failed = (s == 1).then(|| {
                            let bad = if rank == 2 {
                                Tensor::new(&y[rows.start..rows.end - 1], &Device::Cpu).unwrap()
                            } else {
                                yt.clone()
                            };
                            let e = head.forward(xv.as_tensor(), &bad).unwrap_err();
                            // Nothing pends: step 0's backward was taken, step 1 failed.
                            assert!(!head.backward_pending(), "rank {rank}");
                            e
                        });
                        let gt = Tensor::from_vec(
                            g[rows.start * K..rows.end * K].to_vec(),
                            (n, K),
                            &Device::Cpu,
                        );
                        let (logits, dx) = candle_step(&mut head, &xv, &yt, &gt.unwrap());
                        out.push((to_f64(&logits), to_f64(&dx), failed));
                    }
                    out
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (s, (wz, wg)) in want.iter().enumerate() {
        let z: Vec<f64> = got.iter().flat_map(|r| r[s].0.clone()).collect();
        let g: Vec<f64> = got.iter().flat_map(|r| r[s].1.clone()).collect();
        close(&z, wz, 1e-12, "data-parallel logits");
        close(&g, wg, 1e-12, "data-parallel feature gradient");
    }
    let errs: Vec<Option<Error>> = got.iter().map(|r| r[1].2.clone()).collect();
    assert!(
        matches!(errs[2], Some(Error::ShapeMismatch { .. })),
        "{errs:?}"
    );
    for e in &errs[..2] {
        assert_eq!(
            *e,
            Some(Error::PeerFailed {
                phase: "forward",
                ranks: 1
            })
        );
    }
}

#[test]
fn f64_matches_cpu_head_by_hand() {
    let mut head = CandleHead::new_f64(cfg()).unwrap();
    let mut oracle = CpuHead::<f64>::new(cfg()).unwrap();
    for step in 0..3 {
        let (x, y) = batch(10 + step, N);
        let g = dl_dlogits(20 + step);
        let xv =
            Var::from_tensor(&Tensor::from_vec(x.clone(), (N, D), &Device::Cpu).unwrap()).unwrap();
        let yt = Tensor::new(y.as_slice(), &Device::Cpu).unwrap();
        let gt = Tensor::from_vec(g.clone(), (N, K), &Device::Cpu).unwrap();
        let (logits, dx) = candle_step(&mut head, &xv, &yt, &gt);
        assert_eq!((logits.dtype(), dx.dtype()), (DType::F64, DType::F64));
        let want_logits = oracle.forward(&x, &y).unwrap();
        let want_dx = oracle.backward(&g).unwrap();
        close(&to_f64(&logits), &want_logits, 1e-12, "f64 logits");
        close(&to_f64(&dx), &want_dx, 1e-12, "f64 feature gradient");
    }
}

#[test]
fn f32_matches_cpu_head_by_hand() {
    let mut head = CandleHead::new(cfg(), &Device::Cpu).unwrap();
    let mut oracle = CpuHead::<f32>::new(cfg()).unwrap();
    for step in 0..3 {
        let (x, y) = batch(30 + step, N);
        let x: Vec<f32> = x.iter().map(|&v| v as f32).collect();
        let g: Vec<f32> = dl_dlogits(40 + step).iter().map(|&v| v as f32).collect();
        let xv =
            Var::from_tensor(&Tensor::from_vec(x.clone(), (N, D), &Device::Cpu).unwrap()).unwrap();
        // i64 labels this time (u32 above, u8 in the half test).
        let yi: Vec<i64> = y.iter().map(|&v| i64::from(v)).collect();
        let yt = Tensor::new(yi.as_slice(), &Device::Cpu).unwrap();
        let gt = Tensor::from_vec(g.clone(), (N, K), &Device::Cpu).unwrap();
        let (logits, dx) = candle_step(&mut head, &xv, &yt, &gt);
        assert_eq!((logits.dtype(), dx.dtype()), (DType::F32, DType::F32));
        let want_logits = oracle.forward(&x, &y).unwrap();
        let want_dx = oracle.backward(&g).unwrap();
        let widen = |v: &[f32]| v.iter().map(|&a| f64::from(a)).collect::<Vec<_>>();
        close(&to_f64(&logits), &widen(&want_logits), 1e-5, "f32 logits");
        close(&to_f64(&dx), &widen(&want_dx), 1e-5, "f32 feature gradient");
    }
}

/// f16 and bf16 features: logits as the f32 oracle's on the widened features, the gradient
/// in the features' type within half an ulp of the oracle's (see the file header).
#[test]
fn half_features_match_cpu_head_by_hand() {
    for (dtype, half_ulp, min_normal) in [
        (DType::F16, 2f64.powi(-11), 6.1e-5),
        (DType::BF16, 2f64.powi(-8), 1.2e-38),
    ] {
        let mut head = CandleHead::new(cfg(), &Device::Cpu).unwrap();
        let mut oracle = CpuHead::<f32>::new(cfg()).unwrap();
        for step in 0..3 {
            let (x, y) = batch(50 + step, N);
            let xh = Tensor::from_vec(x, (N, D), &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            // What the head computes on: the half values, widened to f32 exactly.
            let x32 = xh
                .to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let g: Vec<f32> = dl_dlogits(60 + step).iter().map(|&v| v as f32).collect();
            let xv = Var::from_tensor(&xh).unwrap();
            let y8: Vec<u8> = y.iter().map(|&v| v as u8).collect();
            let yt = Tensor::new(y8.as_slice(), &Device::Cpu).unwrap();
            let gt = Tensor::from_vec(g.clone(), (N, K), &Device::Cpu).unwrap();
            let (logits, dx) = candle_step(&mut head, &xv, &yt, &gt);
            assert_eq!((logits.dtype(), dx.dtype()), (DType::F32, dtype));
            let want_logits: Vec<f64> = oracle
                .forward(&x32, &y)
                .unwrap()
                .iter()
                .map(|&v| f64::from(v))
                .collect();
            let want_dx: Vec<f64> = oracle
                .backward(&g)
                .unwrap()
                .iter()
                .map(|&v| f64::from(v))
                .collect();
            close(
                &to_f64(&logits),
                &want_logits,
                1e-5,
                "logits of half features",
            );
            for (i, (a, b)) in to_f64(&dx).iter().zip(&want_dx).enumerate() {
                assert!(
                    (a - b).abs() <= half_ulp * b.abs() + min_normal,
                    "{dtype:?} gradient entry {i}: {a} vs {b}"
                );
            }
        }
    }
}

/// A few SGD steps of a linear backbone with the head lower the cross-entropy.
#[test]
fn training_steps_lower_the_loss() {
    let dev = Device::Cpu;
    let (n, p) = (40, 6);
    let mut rng = Rng(7);
    let y: Vec<u32> = (0..n).map(|i| (i % K) as u32).collect();
    let inputs: Vec<f32> = (0..n * p)
        .map(|j| (rng.normal() + 2.0 * f64::from(u8::from((y[j / p] as usize) == j % p))) as f32)
        .collect();
    let inputs = Tensor::from_vec(inputs, (n, p), &dev).unwrap();
    let yt = Tensor::new(y.as_slice(), &dev).unwrap();
    let w0: Vec<f32> = (0..p * D).map(|_| (0.3 * rng.normal()) as f32).collect();
    let w = Var::from_tensor(&Tensor::from_vec(w0, (p, D), &dev).unwrap()).unwrap();
    let mut opt = candle_nn::SGD::new(vec![w.clone()], 0.5).unwrap();
    let mut head = CandleHead::new(cfg(), &dev).unwrap();
    let mut losses = Vec::new();
    for _ in 0..15 {
        let feats = inputs.matmul(w.as_tensor()).unwrap();
        let logits = head.forward(&feats, &yt).unwrap();
        let loss = candle_nn::loss::cross_entropy(&logits, &yt).unwrap();
        losses.push(loss.to_scalar::<f32>().unwrap());
        opt.backward_step(&loss).unwrap();
    }
    let (first, last) = (losses[0], *losses.last().unwrap());
    assert!(
        last < 0.8 * first,
        "loss did not fall: {losses:?} (the moving means start at zero, so the first steps \
         only fill them; a fall by a fifth within 15 steps is the least the oracle-checked \
         gradient gives here)"
    );
}

/// Train 3 steps, save, load into a fresh head: the 4th step is bit-identical to the
/// uninterrupted run's, for both precisions.
#[test]
fn checkpoint_resumes_bit_exactly() {
    let dir = std::env::temp_dir().join(format!("implicit-etf-candle-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for f64_head in [false, true] {
        let make = || {
            if f64_head {
                CandleHead::new_f64(cfg()).unwrap()
            } else {
                CandleHead::new(cfg(), &Device::Cpu).unwrap()
            }
        };
        let dtype = if f64_head { DType::F64 } else { DType::F32 };
        let inputs = |s: u64| {
            let (x, y) = batch(70 + s, N);
            let x = Tensor::from_vec(x, (N, D), &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let g = Tensor::from_vec(dl_dlogits(80 + s), (N, K), &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            (
                Var::from_tensor(&x).unwrap(),
                Tensor::new(y.as_slice(), &Device::Cpu).unwrap(),
                g,
            )
        };
        let mut run = make();
        for s in 0..3 {
            let (x, y, g) = inputs(s);
            candle_step(&mut run, &x, &y, &g);
        }
        let path = dir.join(format!("head-{f64_head}.safetensors"));
        run.save(&path).unwrap();
        let mut resumed = make();
        resumed.load(&path).unwrap();
        assert_eq!(
            to_f64(&resumed.classifier().unwrap().unwrap()),
            to_f64(&run.classifier().unwrap().unwrap())
        );
        let (x, y, g) = inputs(3);
        let (l1, d1) = candle_step(&mut run, &x, &y, &g);
        let (l2, d2) = candle_step(&mut resumed, &x, &y, &g);
        let bits = |t: &Tensor| to_f64(t).iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(
            bits(&l1),
            bits(&l2),
            "logits after resuming (f64 head: {f64_head})"
        );
        assert_eq!(
            bits(&d1),
            bits(&d2),
            "gradient after resuming (f64 head: {f64_head})"
        );
        let (a, b) = (
            run.state_tensors().unwrap(),
            resumed.state_tensors().unwrap(),
        );
        for (name, t) in &a {
            assert_eq!(bits(t), bits(&b[name]), "{name} after the 4th step");
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// The head's state and pending flag, to show an error changed nothing.
fn snapshot(head: &CandleHead) -> (Vec<(String, Vec<u64>)>, bool) {
    let mut v: Vec<(String, Vec<u64>)> = head
        .state_tensors()
        .unwrap()
        .into_iter()
        .map(|(k, t)| (k, to_f64(&t).iter().map(|x| x.to_bits()).collect()))
        .collect();
    v.sort();
    (v, head.backward_pending())
}

/// Whether an error is the one a case expects.
type IsExpected = fn(&Error) -> bool;

fn expect<T: std::fmt::Debug>(r: Result<T, Error>, pred: impl Fn(&Error) -> bool, what: &str) {
    match r {
        Err(e) if pred(&e) => {}
        other => panic!("{what}: got {other:?}"),
    }
}

#[test]
fn two_forwards_then_the_first_backward_is_refused() {
    let dev = Device::Cpu;
    let mut head = CandleHead::new_f64(cfg()).unwrap();
    let mut oracle = CpuHead::<f64>::new(cfg()).unwrap();
    let (x, y) = batch(90, N);
    let g = dl_dlogits(91);
    let xv = Var::from_tensor(&Tensor::from_vec(x.clone(), (N, D), &dev).unwrap()).unwrap();
    let yt = Tensor::new(y.as_slice(), &dev).unwrap();
    let gt = Tensor::from_vec(g.clone(), (N, K), &dev).unwrap();
    let first = head.forward(xv.as_tensor(), &yt).unwrap();
    let second = head.forward(xv.as_tensor(), &yt).unwrap();
    oracle.forward(&x, &y).unwrap();
    oracle.forward(&x, &y).unwrap();
    let before = snapshot(&head);
    let loss1 = (&first * &gt).unwrap().sum_all().unwrap();
    let err = loss1.backward().unwrap_err();
    assert_eq!(
        head_error(&err),
        Some(&Error::StaleBackward {
            requested: 0,
            latest: 1
        }),
        "{err}"
    );
    assert_eq!(
        snapshot(&head),
        before,
        "a refused backward changed the head"
    );
    // The second forward's backward still works, and is the oracle's.
    let loss2 = (&second * &gt).unwrap().sum_all().unwrap();
    let dx = loss2
        .backward()
        .unwrap()
        .get(xv.as_tensor())
        .unwrap()
        .clone();
    close(
        &to_f64(&dx),
        &oracle.backward(&g).unwrap(),
        1e-12,
        "gradient of the second forward",
    );
    // A second backward of the same forward: nothing pends any more.
    let err = loss2.backward().unwrap_err();
    assert_eq!(
        head_error(&err),
        Some(&Error::BackwardWithoutForward),
        "{err}"
    );
    // A loss over both forwards' logits reaches the stale one too (whichever candle visits
    // first, the latest forward's backward may run; the stale one is refused either way).
    let a = head.forward(xv.as_tensor(), &yt).unwrap();
    let b = head.forward(xv.as_tensor(), &yt).unwrap();
    let both = ((&a + &b).unwrap() * &gt).unwrap().sum_all().unwrap();
    let err = both.backward().unwrap_err();
    assert!(
        matches!(head_error(&err), Some(Error::StaleBackward { .. })),
        "{err}"
    );
}

#[test]
fn wrong_dtype_shape_or_batch_is_a_typed_error_and_changes_nothing() {
    let dev = Device::Cpu;
    let mut head = CandleHead::new(cfg(), &dev).unwrap();
    let (x, y) = batch(100, N);
    let x32 = Tensor::from_vec(x, (N, D), &dev)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let yt = Tensor::new(y.as_slice(), &dev).unwrap();
    // Before any step: inference has no classifier.
    expect(
        head.infer(&x32),
        |e| *e == Error::Untrained,
        "infer before training",
    );
    head.forward(&x32, &yt).unwrap(); // a pending backward, to see it survive
    let before = snapshot(&head);
    let dtype = |e: &Error| matches!(e, Error::DType { .. });
    let shape = |e: &Error| matches!(e, Error::ShapeMismatch { .. });
    let cases: Vec<(&str, Tensor, Tensor, IsExpected)> = vec![
        (
            "f64 features on an f32 head",
            x32.to_dtype(DType::F64).unwrap(),
            yt.clone(),
            dtype,
        ),
        (
            "integer features",
            x32.to_dtype(DType::U32).unwrap(),
            yt.clone(),
            dtype,
        ),
        (
            "float labels",
            x32.clone(),
            yt.to_dtype(DType::F32).unwrap(),
            dtype,
        ),
        (
            "f16 labels",
            x32.clone(),
            yt.to_dtype(DType::F16).unwrap(),
            dtype,
        ),
        (
            "features of rank 1",
            x32.flatten_all().unwrap(),
            yt.clone(),
            shape,
        ),
        (
            "features of rank 3",
            x32.reshape((2, N / 2, D)).unwrap(),
            yt.clone(),
            shape,
        ),
        (
            "features with d - 1 columns",
            x32.narrow(1, 0, D - 1).unwrap(),
            yt.clone(),
            shape,
        ),
        (
            "labels of another length",
            x32.clone(),
            yt.narrow(0, 0, N - 1).unwrap(),
            shape,
        ),
        (
            "labels of rank 2",
            x32.clone(),
            yt.reshape((N, 1)).unwrap(),
            shape,
        ),
        (
            "an empty batch",
            x32.narrow(0, 0, 0).unwrap(),
            yt.narrow(0, 0, 0).unwrap(),
            |e| *e == Error::EmptyBatch,
        ),
        (
            "a label out of range",
            x32.clone(),
            Tensor::new(&[9u32; N], &dev).unwrap(),
            |e| matches!(e, Error::LabelOutOfRange { .. }),
        ),
        (
            "a NaN feature",
            (x32.clone() * f64::NAN).unwrap(),
            yt.clone(),
            |e| matches!(e, Error::NonFinite { .. }),
        ),
    ];
    for (what, x, y, pred) in cases {
        expect(head.forward(&x, &y), pred, what);
        assert_eq!(snapshot(&head), before, "{what} changed the head");
    }
    expect(
        head.infer(&x32.to_dtype(DType::F64).unwrap()),
        dtype,
        "infer, f64 features",
    );
    expect(
        head.infer(&x32.narrow(1, 0, D - 1).unwrap()),
        shape,
        "infer, d - 1 columns",
    );
    // An f64 head takes only f64 features.
    let mut h64 = CandleHead::new_f64(cfg()).unwrap();
    expect(h64.forward(&x32, &yt), dtype, "f32 features on an f64 head");
    expect(
        h64.forward(&x32.to_dtype(DType::BF16).unwrap(), &yt),
        dtype,
        "bf16 on an f64 head",
    );
    assert_eq!(snapshot(&head), before);
}

/// Non-contiguous features (a transposed view) give the contiguous input's results.
#[test]
fn non_contiguous_features_are_made_contiguous() {
    let dev = Device::Cpu;
    let (x, y) = batch(110, N);
    let xt: Vec<f64> = (0..D * N).map(|i| x[(i % N) * D + i / N]).collect(); // D x N
    let strided = Tensor::from_vec(xt, (D, N), &dev).unwrap().t().unwrap();
    assert!(!strided.is_contiguous());
    let dense = Tensor::from_vec(x, (N, D), &dev).unwrap();
    let yt = Tensor::new(y.as_slice(), &dev).unwrap();
    let (mut a, mut b) = (
        CandleHead::new_f64(cfg()).unwrap(),
        CandleHead::new_f64(cfg()).unwrap(),
    );
    let (la, lb) = (
        a.forward(&strided, &yt).unwrap(),
        b.forward(&dense, &yt).unwrap(),
    );
    assert_eq!(to_f64(&la), to_f64(&lb));
    assert_eq!(
        to_f64(&a.infer(&strided).unwrap()),
        to_f64(&b.infer(&dense).unwrap())
    );
}

/// `infer` records no graph and changes no state; without a `Var` the forward records none.
#[test]
fn infer_changes_nothing_and_records_no_graph() {
    let dev = Device::Cpu;
    let (x, y) = batch(120, N);
    let xv = Var::from_tensor(&Tensor::from_vec(x, (N, D), &dev).unwrap()).unwrap();
    let yt = Tensor::new(y.as_slice(), &dev).unwrap();
    let mut head = CandleHead::new_f64(cfg()).unwrap();
    let logits = head.forward(xv.as_tensor(), &yt).unwrap();
    assert!(logits.track_op(), "training logits are in the graph");
    let before = snapshot(&head);
    let z = head.infer(xv.as_tensor()).unwrap();
    assert!(!z.track_op(), "inference recorded a graph");
    assert_eq!(snapshot(&head), before);
    assert_eq!(z.dims(), &[N, K]);
}

#[test]
fn bad_checkpoints_are_typed_errors_and_change_nothing() {
    let dev = Device::Cpu;
    let mut head = CandleHead::new(cfg(), &dev).unwrap();
    let (x, y) = batch(130, N);
    let x32 = Tensor::from_vec(x, (N, D), &dev)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    head.forward(&x32, &Tensor::new(y.as_slice(), &dev).unwrap())
        .unwrap();
    let good = head.state_tensors().unwrap();
    let before = snapshot(&head);
    let key = |s: &str| format!("{}{s}", implicit_etf::candle::STATE_PREFIX);
    let mut missing = good.clone();
    missing.remove(&key("moving.alpha"));
    let mut wrong_type = good.clone();
    wrong_type.insert(
        key("moving.e"),
        good[&key("moving.e")].to_dtype(DType::F64).unwrap(),
    );
    let mut wrong_size = good.clone();
    wrong_size.insert(
        key("moving.seen"),
        Tensor::zeros(K + 1, DType::U8, &dev).unwrap(),
    );
    let mut bad_alpha = good.clone();
    bad_alpha.insert(key("moving.alpha"), Tensor::new(&[2.0f64], &dev).unwrap());
    let mut bad_prox = good.clone();
    bad_prox.insert(key("prox"), Tensor::ones((D, K), DType::F64, &dev).unwrap());
    let cases: Vec<(&str, _, IsExpected)> = vec![
        ("missing alpha", missing, |e| {
            matches!(e, Error::InvalidParameter { .. })
        }),
        ("f64 means for an f32 head", wrong_type, |e| {
            matches!(e, Error::DType { .. })
        }),
        ("K + 1 seen flags", wrong_size, |e| {
            matches!(e, Error::ShapeMismatch { .. })
        }),
        ("alpha = 2", bad_alpha, |e| {
            matches!(e, Error::InvalidParameter { .. })
        }),
        ("a non-orthonormal prox", bad_prox, |e| {
            matches!(e, Error::InvalidParameter { .. })
        }),
    ];
    for (what, t, pred) in cases {
        expect(head.load_state_tensors(&t), pred, what);
        assert_eq!(snapshot(&head), before, "{what} changed the head");
    }
    expect(
        head.load("/nonexistent/implicit-etf.safetensors"),
        |e| matches!(e, Error::Framework { .. }),
        "a missing file",
    );
    head.load_state_tensors(&good).unwrap();
    assert!(
        !head.backward_pending(),
        "an import drops the pending backward"
    );
}

/// The CUDA path (feature `candle-cuda`, with a GPU): the same steps as the CPU path, within
/// the device head's tolerances (logits 1e-5, gradients 1e-4; `tests/device_head.rs`), and
/// labels on another device than the features refused.
#[test]
fn cuda_matches_cpu_path() {
    #[cfg(not(feature = "candle-cuda"))]
    {
        println!("CUDA part skipped: built without the `candle-cuda` feature");
    }
    #[cfg(feature = "candle-cuda")]
    {
        let gpu = match Device::new_cuda(0) {
            Ok(d) => d,
            Err(e) => {
                println!("CUDA part skipped: no CUDA device ({e})");
                return;
            }
        };
        let mut on_gpu = CandleHead::new(cfg(), &gpu).unwrap();
        let mut on_cpu = CandleHead::new(cfg(), &Device::Cpu).unwrap();
        for step in 0..3 {
            let (x, y) = batch(140 + step, N);
            let g = dl_dlogits(150 + step);
            let mk = |dev: &Device| {
                let x = Tensor::from_vec(x.clone(), (N, D), dev)
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap();
                let g = Tensor::from_vec(g.clone(), (N, K), dev)
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap();
                (
                    Var::from_tensor(&x).unwrap(),
                    Tensor::new(y.as_slice(), dev).unwrap(),
                    g,
                )
            };
            let (xg, yg, gg) = mk(&gpu);
            let (xc, yc, gc) = mk(&Device::Cpu);
            let (lg, dg) = candle_step(&mut on_gpu, &xg, &yg, &gg);
            let (lc, dc) = candle_step(&mut on_cpu, &xc, &yc, &gc);
            close(&to_f64(&lg), &to_f64(&lc), 1e-5, "CUDA logits");
            close(&to_f64(&dg), &to_f64(&dc), 1e-4, "CUDA feature gradient");
            if step == 2 {
                let yc = Tensor::new(y.as_slice(), &Device::Cpu).unwrap();
                expect(
                    on_gpu.forward(xg.as_tensor(), &yc),
                    |e| matches!(e, Error::Device { .. }),
                    "labels on the CPU, features on the GPU",
                );
                expect(
                    on_cpu.forward(xg.as_tensor(), &yg),
                    |e| matches!(e, Error::Device { .. }),
                    "CUDA features on a CPU head",
                );
            }
        }
    }
}

/// The README's "Use with candle" lines are the middle of `docs/candle.md`'s program, which
/// runs as a doctest under this feature: each code line of the README block (comments aside)
/// must appear there verbatim.
#[test]
fn readme_lines_are_the_tested_program() {
    let root = env!("CARGO_MANIFEST_DIR");
    let readme = std::fs::read_to_string(format!("{root}/README.md")).unwrap();
    let doc = std::fs::read_to_string(format!("{root}/docs/candle.md")).unwrap();
    let start = readme.find("### Use with candle").expect("README section");
    let block = readme[start..]
        .split("```")
        .nth(1)
        .expect("README code block");
    let lines: Vec<&str> = block
        .lines()
        .skip(1)
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("//"))
        .collect();
    assert!(lines.len() >= 5, "{lines:?}");
    for l in lines {
        assert!(
            doc.lines().any(|d| d.trim() == l),
            "README line not in docs/candle.md: {l}"
        );
    }
}
