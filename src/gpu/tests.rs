//! Statistics-stage kernels (and their composition) against the crate's CPU f64 reference
//! (`cpu::stats`, `cpu::moving`). Runs on the CPU execution of the kernels, and on a CUDA
//! GPU too when one is present (otherwise prints "CUDA part skipped: <reason>").
//! `IMPLICIT_ETF_DEVICE=cpu|cuda` restricts the run to one backend.

use crate::cpu::{moving, stats};
use crate::gpu::moving as dmoving;
use crate::gpu::pipeline as dpipe;
use crate::gpu::stats as dstats;
use crate::runtime::{Buffer, DType, Device};
use crate::{AbsentClassPolicy, Error, MovingAverage};
use half::{bf16, f16};

#[path = "../../tests/common/rng.rs"]
mod rng;
use rng::Rng;
#[path = "../../tests/common/devices.rs"]
mod devices;
use devices::devices;

/// f32 tolerance (relative, norm-wise) of the issue.
const TOL: f64 = 1e-5;

fn rel_err(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    let num: f64 = got
        .iter()
        .zip(want)
        .map(|(&g, &w)| (g as f64 - w).powi(2))
        .sum::<f64>()
        .sqrt();
    let den: f64 = want.iter().map(|w| w * w).sum::<f64>().sqrt();
    if den == 0.0 {
        num
    } else {
        num / den
    }
}

fn assert_close(what: &str, got: &[f32], want: &[f64], tol: f64) {
    let e = rel_err(got, want);
    assert!(e <= tol, "{what}: relative error {e:e} > {tol:e}");
}

/// Like [`assert_close`], relative to `max(||want||, floor)`: for results that are a
/// cancellation of terms of size `floor` (e.g. the tau-normalisation backward at d = 1, whose
/// exact value is 0).
fn assert_close_floor(what: &str, got: &[f32], want: &[f64], floor: f64, tol: f64) {
    let den = want.iter().map(|w| w * w).sum::<f64>().sqrt().max(floor);
    let num = got
        .iter()
        .zip(want)
        .map(|(&g, &w)| (g as f64 - w).powi(2))
        .sum::<f64>()
        .sqrt();
    assert!(
        num <= tol * den,
        "{what}: error {:e} relative to {den:e} > {tol:e}",
        num / den
    );
}

/// Size of the first term of the tau-normalisation backward, `tau / ||r_i|| * dx_i`.
fn tau_term_scale(raw: &[f64], dx: &[f64], n: usize, d: usize, tau: f64) -> f64 {
    (0..n)
        .map(|i| {
            let r: f64 = raw[i * d..(i + 1) * d]
                .iter()
                .map(|v| v * v)
                .sum::<f64>()
                .sqrt();
            let g: f64 = dx[i * d..(i + 1) * d].iter().map(|v| v * v).sum::<f64>();
            (tau / r.max(1e-12)).powi(2) * g
        })
        .sum::<f64>()
        .sqrt()
}

#[derive(Clone, Copy, Debug)]
enum Feat {
    F32,
    F16,
    BF16,
}

/// Uploads features in `ft`; returns the buffer and the exactly representable f64 values.
fn upload_features(dev: &Device, v: &[f64], ft: Feat) -> (Buffer, Vec<f64>) {
    match ft {
        Feat::F32 => {
            let h: Vec<f32> = v.iter().map(|&x| x as f32).collect();
            (
                dev.upload(&h).unwrap(),
                h.iter().map(|&x| x as f64).collect(),
            )
        }
        Feat::F16 => {
            let h: Vec<f16> = v.iter().map(|&x| f16::from_f64(x)).collect();
            (
                dev.upload(&h).unwrap(),
                h.iter().map(|x| x.to_f64()).collect(),
            )
        }
        Feat::BF16 => {
            let h: Vec<bf16> = v.iter().map(|&x| bf16::from_f64(x)).collect();
            (
                dev.upload(&h).unwrap(),
                h.iter().map(|x| x.to_f64()).collect(),
            )
        }
    }
}

fn upload_labels(dev: &Device, y: &[usize], wide: bool) -> Buffer {
    if wide {
        dev.upload(&y.iter().map(|&v| v as i64).collect::<Vec<_>>())
            .unwrap()
    } else {
        dev.upload(&y.iter().map(|&v| v as u32).collect::<Vec<_>>())
            .unwrap()
    }
}

/// (N, d, K, absent classes): N < K, absent classes, d not a multiple of the block, N = 1.
const SHAPES: &[(usize, usize, usize, usize)] = &[
    (1, 7, 3, 2),
    (5, 300, 10, 5),
    (24, 257, 5, 0),
    (33, 64, 4, 1),
    (40, 513, 12, 3),
    (16, 1, 2, 0),
];

fn labels_for(rng: &mut Rng, n: usize, k: usize, absent: usize) -> Vec<usize> {
    let present = (k - absent).max(1);
    // Present classes are the first `present` ones, shuffled into the batch; every one of
    // them occurs when n allows.
    (0..n)
        .map(|i| {
            if i < present {
                i
            } else {
                (rng.next_u64() % present as u64) as usize
            }
        })
        .collect()
}

/// The forward's feature rows (`prepare_rows`): the `tau` normalisation and the plain
/// conversion to f32, against the f64 reference; the backward is checked through the composed
/// stage below.
#[test]
fn prepare_rows_match_reference() {
    for dev in devices() {
        let mut rng = Rng(0x1234_5678_9abc_def1);
        for &(n, d, _, _) in SHAPES {
            for ft in [Feat::F32, Feat::F16, Feat::BF16] {
                let raw: Vec<f64> = (0..n * d).map(|_| rng.normal()).collect();
                let (buf, raw64) = upload_features(&dev, &raw, ft);
                let tau = 5.0;
                let mut st = crate::gpu::status::Status::new(&dev).unwrap();
                let (x, scale) =
                    dstats::prepare_rows(&dev, &buf, n, d, Some(tau), &mut st).unwrap();
                assert!(scale.is_some());
                let want = stats::tau_normalise(&raw64, n, d, tau).unwrap();
                let what = format!("{} prepare_rows {ft:?} n={n} d={d}", dev.name());
                assert_close(&what, &dev.download::<f32>(&x).unwrap(), &want, TOL);
                let (x, scale) = dstats::prepare_rows(&dev, &buf, n, d, None, &mut st).unwrap();
                assert!(scale.is_none());
                assert_close(
                    &format!("{what} without tau"),
                    &dev.download::<f32>(&x).unwrap(),
                    &raw64,
                    0.0,
                );
                st.read(&dev).unwrap().forward_error(1, "raw").unwrap();
            }
        }
    }
}

#[test]
fn class_stats_and_backward_match_reference() {
    for dev in devices() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for &(n, d, k, absent) in SHAPES {
            for (ft, wide) in [(Feat::F32, false), (Feat::F16, true), (Feat::BF16, false)] {
                let x: Vec<f64> = (0..n * d).map(|_| rng.normal() + 0.5).collect();
                let (xb, x64) = upload_features(&dev, &x, ft);
                let y = labels_for(&mut rng, n, k, absent);
                let yb = upload_labels(&dev, &y, wide);
                let bk = dstats::bookkeeping(&dev, &yb, n, k).unwrap();
                let s = dstats::class_stats(&dev, &xb, &bk, n, d, k).unwrap();
                let r = stats::class_stats(&x64, &y, n, d, k);
                let what = format!("{} class_stats {ft:?} n={n} d={d} k={k}", dev.name());
                let counts: Vec<usize> = dev
                    .download::<i32>(&s.counts)
                    .unwrap()
                    .into_iter()
                    .map(|c| c as usize)
                    .collect();
                assert_eq!(counts, r.counts, "{what}: counts");
                assert_close(
                    &format!("{what} mu"),
                    &dev.download(&s.mu).unwrap(),
                    &r.mu,
                    TOL,
                );
                assert_close(
                    &format!("{what} centred"),
                    &dev.download(&s.centred).unwrap(),
                    &r.centred,
                    TOL,
                );
            }
        }
    }
}

#[test]
fn labels_out_of_range_are_reported() {
    for dev in devices() {
        let y = dev.upload(&[0i64, 2, -1, 5]).unwrap();
        match dstats::labels_to_i32(&dev, &y, 4, 3) {
            Err(Error::LabelOutOfRange {
                index: 2,
                label: -1,
                classes: 3,
            }) => {}
            other => panic!(
                "{}: expected LabelOutOfRange at 2, got {other:?}",
                dev.name()
            ),
        }
        let y = dev.upload(&[0u32, 1, 7]).unwrap();
        assert!(matches!(
            dstats::labels_to_i32(&dev, &y, 3, 3),
            Err(Error::LabelOutOfRange {
                index: 2,
                label: 7,
                ..
            })
        ));
    }
}

/// Several steps of the moving means (state carried on the device and on the host) under
/// both policies and both averages, with absent classes, plus Frobenius normalisation and
/// the backward of both.
#[test]
fn moving_means_and_frobenius_match_reference() {
    for dev in devices() {
        for policy in [AbsentClassPolicy::Hold, AbsentClassPolicy::Reference] {
            for avg in [MovingAverage::Exponential, MovingAverage::Cumulative] {
                let mut rng = Rng(0xdead_beef_cafe_f00d);
                let (d, k) = (37, 6);
                let mut st_dev = dmoving::MovingStateDev::new(&dev, d, k).unwrap();
                let mut st_ref = crate::MovingMeans::<f64>::new(d, k);
                // Batches: absent classes at step 0 and 2 (as in the goldens), complete at 1.
                for (step, &(n, absent)) in [(9usize, 2usize), (16, 0), (4, 3), (12, 1)]
                    .iter()
                    .enumerate()
                {
                    let x: Vec<f64> = (0..n * d).map(|_| rng.normal()).collect();
                    let (xb, x64) = upload_features(&dev, &x, Feat::F32);
                    let mut y = labels_for(&mut rng, n, k, absent);
                    if step == 3 {
                        // a different class absent: class 0
                        y.iter_mut().for_each(|v| *v = 1 + *v % (k - 1));
                    }
                    let mut status = crate::gpu::status::Status::new(&dev).unwrap();
                    let yb = upload_labels(&dev, &y, false);
                    let bk = dstats::step_begin(
                        &dev,
                        &yb,
                        n,
                        k,
                        &st_dev.scal,
                        &st_dev.seen,
                        avg,
                        policy,
                        1e-4,
                        None,
                        &mut status,
                    )
                    .unwrap();
                    let s = dstats::class_stats(&dev, &xb, &bk, n, d, k).unwrap();
                    let r = stats::class_stats(&x64, &y, n, d, k);
                    let u = dmoving::moving_update(&dev, &st_dev, &s, &bk, &mut status).unwrap();
                    // A step whose status word records an error (here: degenerate means)
                    // commits nothing.
                    let mut bad = crate::gpu::status::Status::new(&dev).unwrap();
                    let mut word = bad.read(&dev).unwrap().0;
                    word[2] = 1;
                    dev.write(&mut bad.buf, &word).unwrap();
                    let before = dev.download::<f32>(&st_dev.e).unwrap();
                    st_dev.commit(&dev, &u, &bad.buf).unwrap();
                    assert_eq!(dev.download::<f32>(&st_dev.e).unwrap(), before);
                    assert_eq!(st_dev.scalars(&dev).unwrap().0, step as u64);
                    let ok = crate::gpu::status::Status::new(&dev).unwrap();
                    st_dev.commit(&dev, &u, &ok.buf).unwrap();
                    let ur = moving::update(&st_ref, &r, avg, policy, 1e-4);
                    let what = format!("{} {policy:?} {avg:?} step {step}", dev.name());
                    assert_close(
                        &format!("{what} E_new"),
                        &dev.download(&u.e_new).unwrap(),
                        &ur.e_new,
                        TOL,
                    );
                    let seen: Vec<bool> = dev
                        .download::<i32>(&st_dev.seen)
                        .unwrap()
                        .iter()
                        .map(|&v| v != 0)
                        .collect();
                    assert_eq!(seen, ur.next.seen, "{what}: seen flags");
                    let (t_dev, alpha_dev) = st_dev.scalars(&dev).unwrap();
                    assert_eq!(t_dev, ur.next.step);
                    assert!((alpha_dev - ur.next.alpha).abs() < 1e-15, "{what}: alpha");

                    let (_, norm_r) = moving::frobenius_normalise(&ur.e_new);
                    let norm = dev.download::<f32>(&u.norm).unwrap()[0];
                    assert!(
                        ((norm as f64) - norm_r).abs() <= TOL * norm_r,
                        "{what}: norm"
                    );
                    st_ref = ur.next;
                }
            }
        }
    }
}

/// The composed statistics stage (tau-normalise, class stats, moving update, Frobenius) and
/// its backward, against the reference composed by hand.
#[test]
fn composed_stage_matches_reference() {
    for dev in devices() {
        let mut rng = Rng(0x0123_4567_89ab_cdef);
        for &(n, d, k, absent) in SHAPES {
            for ft in [Feat::F32, Feat::BF16] {
                let raw: Vec<f64> = (0..n * d).map(|_| rng.normal()).collect();
                let (rb, raw64) = upload_features(&dev, &raw, ft);
                let y = labels_for(&mut rng, n, k, absent);
                let yb = upload_labels(&dev, &y, true);
                let opt = dpipe::StatsOptions {
                    tau: Some(5.0),
                    average: MovingAverage::Exponential,
                    policy: AbsentClassPolicy::Reference,
                    alpha_floor: 1e-4,
                };
                let mut st = dmoving::MovingStateDev::new(&dev, d, k).unwrap();
                let f = match dpipe::forward(&dev, &rb, &yb, n, &mut st, opt) {
                    Ok(f) => f,
                    Err(Error::DegenerateMeans) => {
                        // n = 1 with one class: E_new = mu column only when K > 1; skip only
                        // a truly zero E.
                        continue;
                    }
                    Err(e) => panic!("{e}"),
                };
                let x64 = stats::tau_normalise(&raw64, n, d, 5.0).unwrap();
                let r = stats::class_stats(&x64, &y, n, d, k);
                let st_r = crate::MovingMeans::<f64>::new(d, k);
                let ur = moving::update(&st_r, &r, opt.average, opt.policy, 1e-4);
                let (y_r, norm_r) = moving::frobenius_normalise(&ur.e_new);
                if norm_r < 1e-4 {
                    // Degenerate batch (e.g. d = 1 and every class mean equals mu): E_new is
                    // zero up to rounding, so Y is undefined; the f32 result is noise.
                    continue;
                }
                let what = format!("{} composed {ft:?} n={n} d={d} k={k}", dev.name());
                assert_close(
                    &format!("{what} Y"),
                    &dev.download(&f.y).unwrap(),
                    &y_r,
                    TOL,
                );

                let dy: Vec<f32> = (0..d * k).map(|_| rng.normal() as f32).collect();
                let dy64: Vec<f64> = dy.iter().map(|&v| v as f64).collect();
                let dmu: Vec<f32> = (0..d).map(|_| rng.normal() as f32).collect();
                let dmu64: Vec<f64> = dmu.iter().map(|&v| v as f64).collect();
                let dr = dpipe::backward(
                    &dev,
                    &f,
                    &dev.upload(&dy).unwrap(),
                    Some(&dev.upload(&dmu).unwrap()),
                    None,
                )
                .unwrap();
                let de = moving::frobenius_normalise_backward(&y_r, norm_r, &dy64);
                let (dc, dmu_m) = moving::update_backward(&ur, &de);
                let dmu_t: Vec<f64> = dmu_m.iter().zip(&dmu64).map(|(a, b)| a + b).collect();
                let dx = stats::class_stats_backward(&y, &r.counts, n, d, k, &dc, &dmu_t);
                let want = stats::tau_normalise_backward(&raw64, &dx, n, d, 5.0).unwrap();
                // Gradients of a composition: the f32 error of Y (~1e-7) is amplified by the
                // conditioning of the chain; 1e-5 still holds on these shapes.
                assert_close_floor(
                    &format!("{what} d_raw"),
                    &dev.download(&dr).unwrap(),
                    &want,
                    tau_term_scale(&raw64, &dx, n, d, 5.0),
                    TOL,
                );
                assert_eq!(dr.dtype(), DType::F32);
            }
        }
    }
}

/// Same inputs twice give bitwise identical results (no races, fixed reduction order).
#[test]
fn results_are_deterministic() {
    for dev in devices() {
        let mut rng = Rng(42);
        let (n, d, k) = (48, 129, 7);
        let raw: Vec<f32> = (0..n * d).map(|_| rng.normal() as f32).collect();
        let y: Vec<u32> = (0..n).map(|_| (rng.next_u64() % k as u64) as u32).collect();
        let run = || {
            let mut st = dmoving::MovingStateDev::new(&dev, d, k).unwrap();
            let opt = dpipe::StatsOptions {
                tau: Some(5.0),
                average: MovingAverage::Exponential,
                policy: AbsentClassPolicy::Hold,
                alpha_floor: 1e-4,
            };
            let rb = dev.upload(&raw).unwrap();
            let f = dpipe::forward(&dev, &rb, &dev.upload(&y).unwrap(), n, &mut st, opt).unwrap();
            let dy = dev.upload(&vec![0.5f32; d * k]).unwrap();
            let dr = dpipe::backward(&dev, &f, &dy, None, None).unwrap();
            (
                dev.download::<f32>(&f.y).unwrap(),
                dev.download::<f32>(&dr).unwrap(),
            )
        };
        let a = run();
        let b = run();
        assert!(a
            .0
            .iter()
            .zip(&b.0)
            .all(|(p, q)| p.to_bits() == q.to_bits()));
        assert!(a
            .1
            .iter()
            .zip(&b.1)
            .all(|(p, q)| p.to_bits() == q.to_bits()));
    }
}
