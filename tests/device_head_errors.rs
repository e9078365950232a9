//! Bad input to the device head returns a typed error and leaves the head unchanged: the
//! exported state is identical, a pending backward survives, and the next valid step gives
//! bit-identical results to a head that never saw the bad call. Both validation modes: with
//! `Validation::Deferred` the failed step is reported by `check()`, and the device-side commit
//! was skipped all the same. Also: the goldens (`Reference` policy, stepwise) on the device
//! head, and state export/import between the device and CPU heads.

mod common;
use common::*;
use implicit_etf::runtime::{Buffer, DType, Device};
use implicit_etf::MovingMeans;
use implicit_etf::*;

fn fresh(dev: &Device) -> Device {
    match dev.backend() {
        implicit_etf::runtime::Backend::Cpu => Device::cpu(),
        implicit_etf::runtime::Backend::Cuda => Device::cuda(0).unwrap(),
    }
}

const D: usize = 12;
const K: usize = 4;
const N: usize = 10;

fn batch(seed: u64) -> (Vec<f32>, Vec<u32>) {
    let mut rng = Rng(seed);
    let y: Vec<u32> = (0..N).map(|i| (i % K) as u32).collect();
    let x = (0..N * D)
        .map(|i| (rng.normal() + (i % 5) as f64) as f32)
        .collect();
    (x, y)
}

/// One valid step: (logits, d_raw) downloaded.
fn step(h: &mut DeviceHead, seed: u64) -> (Vec<f32>, Vec<f32>) {
    let (x, y) = batch(seed);
    let xb = h.device().upload(&x).unwrap();
    let yb = h.device().upload(&y).unwrap();
    let lb = h.forward(&xb, &yb).unwrap();
    let logits: Vec<f32> = h.device().download(&lb).unwrap();
    let dz = h.device().upload(&[0.01f32; N * K]).unwrap();
    let gb = h.backward(&dz).unwrap();
    (logits, h.device().download(&gb).unwrap())
}

fn state(h: &DeviceHead) -> HeadState<f32> {
    h.export_state().unwrap()
}

#[test]
fn bad_input_is_a_typed_error_and_changes_nothing() {
    for dev in devices() {
        for validation in [Validation::Eager, Validation::Deferred] {
            let opt = DeviceOptions::default().with_validation(validation);
            let mut h = DeviceHead::with_options(fresh(&dev), HeadConfig::new(D, K), opt).unwrap();
            let mut twin =
                DeviceHead::with_options(fresh(&dev), HeadConfig::new(D, K), opt).unwrap();
            assert!(matches!(
                h.backward(&h.device().upload(&[0.0f32; N * K]).unwrap()),
                Err(Error::BackwardWithoutForward)
            ));
            // Two valid steps (the first one runs its gauge rule on the host).
            step(&mut h, 1);
            step(&mut twin, 1);
            step(&mut h, 2);
            step(&mut twin, 2);
            let (x, y) = batch(3);
            let dv = h.device();
            let xb = dv.upload(&x).unwrap();
            let yb = dv.upload(&y).unwrap();
            let mut bad_label = y.clone();
            bad_label[7] = K as u32;
            let mut nan_x = x.clone();
            nan_x[5 * D + 3] = f32::NAN;
            let bad: Vec<(&str, Buffer, Buffer, Option<Error>)> = vec![
                (
                    "label out of range",
                    dv.upload(&x).unwrap(),
                    dv.upload(&bad_label).unwrap(),
                    Some(Error::LabelOutOfRange {
                        index: 7,
                        label: K as i64,
                        classes: K,
                    }),
                ),
                (
                    "negative i64 label",
                    dv.upload(&x).unwrap(),
                    dv.upload(
                        &y.iter()
                            .enumerate()
                            .map(|(i, &v)| if i == 2 { -1 } else { v as i64 })
                            .collect::<Vec<i64>>(),
                    )
                    .unwrap(),
                    Some(Error::LabelOutOfRange {
                        index: 2,
                        label: -1,
                        classes: K,
                    }),
                ),
                (
                    // Needs both 32-bit halves of the recorded value.
                    "i64 label beyond 32 bits",
                    dv.upload(&x).unwrap(),
                    dv.upload(
                        &y.iter()
                            .enumerate()
                            .map(|(i, &v)| if i >= 4 { -5_000_000_003 } else { v as i64 })
                            .collect::<Vec<i64>>(),
                    )
                    .unwrap(),
                    Some(Error::LabelOutOfRange {
                        index: 4,
                        label: -5_000_000_003,
                        classes: K,
                    }),
                ),
                (
                    "u32::MAX label",
                    dv.upload(&x).unwrap(),
                    dv.upload(
                        &y.iter()
                            .enumerate()
                            .map(|(i, &v)| if i == N - 1 { u32::MAX } else { v })
                            .collect::<Vec<u32>>(),
                    )
                    .unwrap(),
                    Some(Error::LabelOutOfRange {
                        index: N - 1,
                        label: i64::from(u32::MAX),
                        classes: K,
                    }),
                ),
                (
                    "NaN feature",
                    dv.upload(&nan_x).unwrap(),
                    dv.upload(&y).unwrap(),
                    Some(Error::NonFinite {
                        what: "raw",
                        index: 5 * D + 3,
                    }),
                ),
                (
                    "short features",
                    dv.upload(&x[..D * 3]).unwrap(),
                    dv.upload(&y).unwrap(),
                    None,
                ),
                (
                    "f64 features",
                    dv.upload(&vec![0.0f64; N * D]).unwrap(),
                    dv.upload(&y).unwrap(),
                    None,
                ),
                (
                    "i32 labels",
                    dv.upload(&x).unwrap(),
                    dv.upload(&[0i32; N]).unwrap(),
                    None,
                ),
                (
                    "no samples",
                    dv.upload(&[0.0f32; 0]).unwrap(),
                    dv.upload(&[0u32; 0]).unwrap(),
                    None,
                ),
            ];
            let before = state(&h);
            for (what, xb_bad, yb_bad, data_err) in bad {
                let r = h.forward(&xb_bad, &yb_bad);
                let ctx = format!("{} {validation:?}: {what}", dev.name());
                match (&data_err, validation) {
                    // Data-dependent errors in deferred mode: Ok now, reported by check().
                    (Some(e), Validation::Deferred) => {
                        assert!(r.is_ok(), "{ctx}: {r:?}");
                        // The same typed error, label value included (recorded on the
                        // device).
                        assert_eq!(&h.check().unwrap_err(), e, "{ctx}");
                    }
                    (Some(e), Validation::Eager) => assert_eq!(r.unwrap_err(), *e, "{ctx}"),
                    (None, _) => assert!(
                        matches!(
                            r,
                            Err(Error::ShapeMismatch { .. }
                                | Error::InvalidParameter { .. }
                                | Error::EmptyBatch)
                        ),
                        "{ctx}: {r:?}"
                    ),
                }
                assert_eq!(state(&h), before, "{ctx}: state changed");
            }
            // Degenerate means: all-zero features without tau on a fresh head.
            let mut z =
                DeviceHead::with_options(fresh(&dev), HeadConfig::new(D, K).with_tau(None), opt)
                    .unwrap();
            let zb = z.device().upload(&vec![0.0f32; N * D]).unwrap();
            let yz = z.device().upload(&y).unwrap();
            // The first step checks eagerly in both modes (host gauge rule).
            assert_eq!(z.forward(&zb, &yz).unwrap_err(), Error::DegenerateMeans);
            assert_eq!(state(&z).moving.step, 0);
            assert!(state(&z).prox.is_none());

            // Backward: bad d_logits keep the pending forward.
            let lb = h.forward(&xb, &yb).unwrap();
            let lt = twin
                .forward(
                    &twin.device().upload(&x).unwrap(),
                    &twin.device().upload(&y).unwrap(),
                )
                .unwrap();
            assert_eq!(
                h.device().download::<f32>(&lb).unwrap(),
                twin.device().download::<f32>(&lt).unwrap()
            );
            let mut dz = vec![0.01f32; N * K];
            assert!(matches!(
                h.backward(&h.device().upload(&dz[..N]).unwrap()),
                Err(Error::ShapeMismatch { .. })
            ));
            assert!(matches!(
                h.backward(&h.device().upload(&vec![0.0f64; N * K]).unwrap()),
                Err(Error::InvalidParameter { .. })
            ));
            dz[9] = f32::INFINITY;
            let r = h.backward(&h.device().upload(&dz).unwrap());
            let want = Error::NonFinite {
                what: "d_logits",
                index: 9,
            };
            match validation {
                Validation::Eager => assert_eq!(r.unwrap_err(), want),
                Validation::Deferred => {
                    assert!(r.is_ok());
                    assert_eq!(h.check().unwrap_err(), want);
                }
            }
            if validation == Validation::Eager {
                // Still pending: the valid backward now gives the twin's gradient, bitwise.
                let ok = vec![0.01f32; N * K];
                let g1 = h.backward(&h.device().upload(&ok).unwrap()).unwrap();
                let g2 = twin.backward(&twin.device().upload(&ok).unwrap()).unwrap();
                assert_eq!(
                    h.device().download::<f32>(&g1).unwrap(),
                    twin.device().download::<f32>(&g2).unwrap()
                );
            } else {
                let ok = vec![0.01f32; N * K];
                twin.backward(&twin.device().upload(&ok).unwrap()).unwrap();
            }
            // And the next step is bit-identical to the twin's.
            assert_eq!(
                step(&mut h, 4),
                step(&mut twin, 4),
                "{}: after errors",
                dev.name()
            );
            assert!(h.check().is_ok());
        }
        // Configurations the device head refuses.
        let riem = HeadConfig::new(D, K).with_solve(SolveMethod::Riemannian { max_iters: 30 });
        assert!(matches!(
            DeviceHead::new(fresh(&dev), riem),
            Err(Error::InvalidParameter { name: "solve", .. })
        ));
        // K > 1024: the one-block eigensolver refuses it; Auto takes the block solver.
        let one_block = DeviceOptions::default()
            .with_eigensolver(implicit_etf::gpu::linalg::EigenSolver::OneBlock);
        assert!(matches!(
            DeviceHead::with_options(fresh(&dev), HeadConfig::new(1100, 1025), one_block),
            Err(Error::InvalidParameter {
                name: "eigensolver",
                ..
            })
        ));
        assert!(DeviceHead::new(fresh(&dev), HeadConfig::new(1100, 1025)).is_ok());
        assert!(matches!(
            DeviceHead::new(fresh(&dev), HeadConfig::new(3, 4)),
            Err(Error::DimensionBelowClasses { .. })
        ));
        let h = DeviceHead::new(fresh(&dev), HeadConfig::new(D, K)).unwrap();
        assert_eq!(
            h.infer(&h.device().upload(&[1.0f32; D]).unwrap())
                .unwrap_err(),
            Error::Untrained
        );
    }
}

/// State export/import between the device head and the CPU head, and inference.
#[test]
fn state_round_trips_and_inference() {
    for dev in devices() {
        let cfg = HeadConfig::new(D, K);
        let mut h = DeviceHead::new(fresh(&dev), cfg.clone()).unwrap();
        step(&mut h, 1);
        step(&mut h, 2);
        let s = state(&h);
        // CPU head resumed from the device state.
        let mut cpu = CpuHead::<f32>::new(cfg.clone()).unwrap();
        cpu.import_state(s.clone()).unwrap();
        // Another device head resumed from it: identical next step.
        let mut h2 = DeviceHead::new(fresh(&dev), cfg.clone()).unwrap();
        h2.import_state(s.clone()).unwrap();
        assert_eq!(state(&h2), s);
        let (x, y) = batch(5);
        let out = fwd(&mut cpu, &x, &y).unwrap();
        let lb = h2
            .forward(
                &h2.device().upload(&x).unwrap(),
                &h2.device().upload(&y).unwrap(),
            )
            .unwrap();
        let l: Vec<f32> = h2.device().download(&lb).unwrap();
        let to64 = |v: &[f32]| v.iter().map(|&a| a as f64).collect::<Vec<_>>();
        // f32 CPU head vs device head: both float32 data, float64 solve; 1e-5 as elsewhere.
        assert!(
            rel(&to64(&l), &to64(&out.logits)) < 1e-5,
            "{}: resumed logits",
            dev.name()
        );
        // Inference against the CPU head's (same state: after this step).
        let (xi, _) = batch(6);
        let li: Vec<f32> = h2
            .device()
            .download(&h2.infer(&h2.device().upload(&xi).unwrap()).unwrap())
            .unwrap();
        let lc = cpu.infer(&xi).unwrap();
        assert!(
            rel(&to64(&li), &to64(&lc)) < 1e-5,
            "{}: inference",
            dev.name()
        );
        let wd: Vec<f32> = h2
            .device()
            .download(&h2.classifier().unwrap().unwrap())
            .unwrap();
        assert!(rel(&to64(&wd), &to64(&cpu.classifier().unwrap().unwrap())) < 1e-5);
        // Invalid states are refused and change nothing.
        let mut badp = s.clone();
        badp.prox.as_mut().unwrap()[0] += 0.1;
        assert!(matches!(
            h2.import_state(badp),
            Err(Error::InvalidParameter {
                name: "state.prox",
                ..
            })
        ));
        let mut bada = s.clone();
        bada.moving = MovingMeans {
            alpha: 0.0,
            ..bada.moving
        };
        assert!(h2.import_state(bada).is_err());
        assert_ne!(state(&h2), s, "a step was taken since");
    }
}

/// The reference's goldens on the device head, stepwise from the reference's own state
/// (as `tests/golden.rs` does for the CPU head; same tolerances, which sit above the
/// reference's float32 level and far below a wrong path's 1e-2..1 errors).
#[test]
fn head_goldens_stepwise_on_device() {
    for dev in devices() {
        for name in ["head_d8_k3.json", "head_d16_k5.json", "head_d32_k10.json"] {
            let g = golden(name);
            let k = g["K"].as_u64().unwrap() as usize;
            let cfg = golden_head_config(&g);
            let steps = golden_head_steps(&g);
            for (si, (step, st)) in steps.iter().zip(g["steps"].as_array().unwrap()).enumerate() {
                let ctx = format!("{} {name} step {si}", dev.name());
                let state = state_f32(&step.state);
                let labels = step.labels.clone();
                let raw: Vec<f32> = step.raw.iter().map(|&v| v as f32).collect();
                let mut h = DeviceHead::new(fresh(&dev), cfg.clone()).unwrap();
                h.import_state(state).unwrap();
                let lb = h
                    .forward(
                        &h.device().upload(&raw).unwrap(),
                        &h.device().upload(&labels).unwrap(),
                    )
                    .unwrap();
                let logits: Vec<f64> = h
                    .device()
                    .download::<f32>(&lb)
                    .unwrap()
                    .iter()
                    .map(|&v| v as f64)
                    .collect();
                let s = h.last_solution().unwrap();
                let (wb, bb) = (s.w, s.b);
                let w: Vec<f64> = h
                    .device()
                    .download::<f32>(wb)
                    .unwrap()
                    .iter()
                    .map(|&v| v as f64)
                    .collect();
                let b: Vec<f64> = h
                    .device()
                    .download::<f32>(bb)
                    .unwrap()
                    .iter()
                    .map(|&v| v as f64)
                    .collect();
                for (what, ours, theirs) in [
                    ("W", &w, mat(&st["W"]).2),
                    ("b", &b, vecf(&st["b"])),
                    ("logits", &logits, mat(&st["logits"]).2),
                ] {
                    let e = rel(ours, &theirs);
                    assert!(e < 1e-5, "{ctx}: {what} rel {e:.2e}");
                }
                let lab: Vec<usize> = labels.iter().map(|&v| v as usize).collect();
                let (_, dz) = cross_entropy(&logits, &lab, k).unwrap();
                let dz32: Vec<f32> = dz.iter().map(|&v| v as f32).collect();
                let gb = h.backward(&h.device().upload(&dz32).unwrap()).unwrap();
                let d_raw: Vec<f64> = h
                    .device()
                    .download::<f32>(&gb)
                    .unwrap()
                    .iter()
                    .map(|&v| v as f64)
                    .collect();
                let ed = rel(&d_raw, &mat(&st["d_raw"]).2);
                // Step 0: the reference's gauge column (see tests/golden.rs), bound 1e-3.
                let tol = if si == 0 { 1e-3 } else { 1e-4 };
                assert!(ed < tol, "{ctx}: d_raw rel {ed:.2e}");
            }
        }
    }
}

/// The runtime's own guards, through the public API: a buffer of another device (even of the
/// same kind) is a typed error everywhere it could be dereferenced, and leaves the head
/// unchanged; copies and writes of another size, and allocation sizes that overflow, are typed
/// errors, not out-of-bounds accesses or panics.
#[test]
fn runtime_misuse_is_a_typed_error() {
    for dev in devices() {
        let name = dev.name();
        let mut h = DeviceHead::new(fresh(&dev), HeadConfig::new(D, K)).unwrap();
        step(&mut h, 1);
        let before = state(&h);
        // Inputs on another device of the same kind.
        let other = fresh(&dev);
        let (x, y) = batch(2);
        let (xo, yo) = (other.upload(&x).unwrap(), other.upload(&y).unwrap());
        let foreign = |r: Result<Buffer, Error>, what: &str| match r {
            Err(Error::Device { message, .. }) => {
                assert!(
                    message.contains("another device"),
                    "{name} {what}: {message}"
                )
            }
            other => panic!("{name} {what}: expected a foreign-buffer error, got {other:?}"),
        };
        foreign(h.forward(&xo, &yo), "forward, both inputs foreign");
        let yb = h.device().upload(&y).unwrap();
        foreign(h.forward(&xo, &yb), "forward, features foreign");
        assert_eq!(
            state(&h),
            before,
            "{name}: a refused step changed the state"
        );
        // Outputs and gradients on another device: refused, nothing changes.
        let (mut zo, mut go) = (
            other.alloc_zeros(DType::F32, N * K).unwrap(),
            other.alloc_zeros(DType::F32, N * D).unwrap(),
        );
        let (xm, ym) = (
            h.device().upload(&x).unwrap(),
            h.device().upload(&y).unwrap(),
        );
        assert!(
            h.forward_into(&xm, &ym, &mut zo).is_err(),
            "{name}: foreign logits"
        );
        assert_eq!(
            state(&h),
            before,
            "{name}: a refused step changed the state"
        );
        h.forward(&xm, &ym).unwrap();
        let dz = h.device().upload(&[0.01f32; N * K]).unwrap();
        let dzo = other.upload(&[0.01f32; N * K]).unwrap();
        assert!(h.backward(&dzo).is_err(), "{name}: foreign dL/dlogits");
        assert!(
            h.backward_into(&dz, &mut go).is_err(),
            "{name}: foreign d_raw"
        );
        h.backward(&dz).unwrap(); // the pending backward survived the refusals
        let before = state(&h);
        // Host copies and device copies through another device.
        let mine = h.device().upload(&x).unwrap();
        assert!(other.download::<f32>(&mine).is_err(), "{name}: download");
        assert!(other.copy(&mine).is_err(), "{name}: copy");
        let mut dst = other.alloc_zeros(DType::F32, x.len()).unwrap();
        assert!(
            other.copy_into(&mut dst, &mine).is_err(),
            "{name}: copy_into"
        );
        // Sizes.
        let mut short = h.device().alloc_zeros(DType::F32, 3).unwrap();
        assert!(matches!(
            h.device().copy_into(&mut short, &mine),
            Err(Error::ShapeMismatch { .. })
        ));
        assert!(matches!(
            h.device().write(&mut short, &[1.0f32; 4]),
            Err(Error::ShapeMismatch { .. })
        ));
        for (dtype, len) in [(DType::F32, 1usize << 62), (DType::I32, usize::MAX)] {
            assert_eq!(
                h.device().alloc_zeros(dtype, len).map(|b| b.len()),
                Err(Error::SizeOverflow {
                    what: "buffer bytes"
                }),
                "{name}: {dtype:?} x {len}"
            );
        }
        // The head goes on exactly like a twin that took the same valid steps.
        let mut twin = DeviceHead::new(fresh(&dev), HeadConfig::new(D, K)).unwrap();
        step(&mut twin, 1);
        let (tx, ty) = (
            twin.device().upload(&x).unwrap(),
            twin.device().upload(&y).unwrap(),
        );
        twin.forward(&tx, &ty).unwrap();
        twin.backward(&twin.device().upload(&[0.01f32; N * K]).unwrap())
            .unwrap();
        assert_eq!(state(&twin), before, "{name}");
        assert_eq!(step(&mut h, 3), step(&mut twin, 3), "{name}");
    }
}
