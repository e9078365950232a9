//! Hostile input through the public API only: one regression test per case of the hostile
//! review (issue "No panic, abort, hang or out-of-bounds access from any input"), each named
//! after its case. Every case must end in a typed error (or a correct result), never a panic,
//! an abort, a hang or an out-of-bounds access, and an error must leave the head unchanged.

mod common;
use common::Rng;
use implicit_etf::core::state::MAX_STEP;
use implicit_etf::gpu::linalg::{Gemm, GemmKernel};
use implicit_etf::runtime::{Arg, DType, Device, LaunchConfig};
use implicit_etf::{
    cross_entropy, solve_etf, CpuHead, DeviceHead, DeviceOptions, Error, HeadConfig, Validation,
};

fn overflow(r: Result<impl std::fmt::Debug, Error>) {
    match r {
        Err(Error::SizeOverflow { .. }) => {}
        other => panic!("expected Error::SizeOverflow, got {other:?}"),
    }
}

fn batch(n: usize, d: usize, k: usize, seed: u64, scale: f64) -> (Vec<f64>, Vec<u32>) {
    let mut rng = Rng(seed);
    let y: Vec<u32> = (0..n).map(|i| (i % k) as u32).collect();
    let x = (0..n * d)
        .map(|j| scale * (rng.normal() + 3.0 * f64::from(y[j / d] as usize == j % d)))
        .collect();
    (x, y)
}

#[test]
fn case01_launch_past_buffers() {
    // The typed launches and `Device::launch` are `unsafe` (see the `compile_fail` doctests of
    // `implicit_etf::kernels`). The safe entry that takes sizes checks them against the buffers.
    let dev = Device::cpu();
    let a = dev.alloc_zeros(DType::F64, 4).unwrap();
    let b = dev.alloc_zeros(DType::F64, 4).unwrap();
    let mut c = dev.alloc_zeros(DType::F64, 4).unwrap();
    let r = Gemm::new(false, false, 100, 100, 100).run(&dev, GemmKernel::Auto, &a, &b, &mut c);
    assert!(matches!(r, Err(Error::ShapeMismatch { .. })), "{r:?}");
}

#[test]
fn case02_alloc_of_overflowing_bytes() {
    overflow(Device::cpu().alloc_zeros(DType::F32, 1 << 62));
}

#[test]
fn case03_alloc_usize_max_and_a_device_head_of_max_size() {
    overflow(Device::cpu().alloc_zeros(DType::I32, usize::MAX));
    overflow(DeviceHead::new(
        Device::cpu(),
        HeadConfig::new(usize::MAX, usize::MAX),
    ));
}

#[test]
fn case04_cpu_head_whose_size_wraps() {
    overflow(CpuHead::<f32>::new(HeadConfig::new(1 << 63, 2)));
}

#[test]
fn case05_cpu_head_of_max_size() {
    overflow(CpuHead::<f32>::new(HeadConfig::new(usize::MAX, usize::MAX)));
}

#[test]
fn case06_cpu_head_larger_than_memory() {
    // 4 TB of f32 state, and 2^59 bytes of f64: refused by the allocator, reported, not
    // aborted.
    let overcommit = std::fs::read_to_string("/proc/sys/vm/overcommit_memory").unwrap_or_default();
    if overcommit.trim() == "1" {
        println!("skipped: vm.overcommit_memory = 1 grants any allocation (the OOM killer would act instead)");
        return;
    }
    for r in [
        CpuHead::<f32>::new(HeadConfig::new(1_000_000, 1_000_000)).map(|_| ()),
        CpuHead::<f64>::new(HeadConfig::new(1 << 28, 1 << 28)).map(|_| ()),
    ] {
        assert!(matches!(r, Err(Error::OutOfMemory { .. })), "{r:?}");
    }
}

#[test]
fn case07_device_head_whose_size_wraps() {
    overflow(DeviceHead::new(Device::cpu(), HeadConfig::new(1 << 63, 2)));
}

#[test]
fn case08_solve_etf_whose_size_wraps() {
    overflow(solve_etf::<f64>(&[], None, (1 << 63) + 1, 2, 1e-3));
}

#[test]
fn case09_cross_entropy_whose_size_wraps() {
    overflow(cross_entropy::<f64, u32>(&[], &[0, 1], 1 << 63));
}

#[test]
fn case10_launch_config_with_a_zero_block() {
    let dev = Device::cpu();
    let cfg = LaunchConfig::linear(10, 0); // no panic
    let x = dev.alloc_zeros(DType::F32, 10).unwrap();
    let sig = implicit_etf::kernels::by_name("add_assign_f32").unwrap();
    // SAFETY: refused before any memory access (zero-sized block); the buffers would fit.
    let r = unsafe { dev.launch(sig, cfg, &[Arg::Buf(&x), Arg::Buf(&x), Arg::I64(10)]) };
    match r {
        Err(Error::Device { message, .. }) => assert!(message.contains("zero-sized block")),
        other => panic!("{other:?}"),
    }
}

#[test]
fn case11_cpu_execution_grid_too_large() {
    let dev = Device::cpu();
    let x = dev.alloc_zeros(DType::F32, 10).unwrap();
    let sig = implicit_etf::kernels::by_name("add_assign_f32").unwrap();
    let t = std::time::Instant::now();
    let cfg = LaunchConfig::new((i32::MAX as u32, 1, 1), (32, 1, 1));
    // SAFETY: the grid-stride kernel touches 10 elements whatever the grid; refused anyway.
    let r = unsafe { dev.launch(sig, cfg, &[Arg::Buf(&x), Arg::Buf(&x), Arg::I64(10)]) };
    assert!(matches!(r, Err(Error::Device { .. })), "{r:?}");
    // The same grid of one-thread blocks (2^31 blocks, each a host-thread hand-off).
    let cfg = LaunchConfig::new((i32::MAX as u32, 1, 1), (1, 1, 1));
    // SAFETY: as above.
    let r = unsafe { dev.launch(sig, cfg, &[Arg::Buf(&x), Arg::Buf(&x), Arg::I64(10)]) };
    assert!(matches!(r, Err(Error::Device { .. })), "{r:?}");
    assert!(t.elapsed().as_secs() < 5, "refused, not run");
    // Beyond CUDA's limits on any backend.
    let cfg = LaunchConfig::new((1, 70_000, 1), (32, 1, 1));
    // SAFETY: as above.
    let r = unsafe { dev.launch(sig, cfg, &[Arg::Buf(&x), Arg::Buf(&x), Arg::I64(10)]) };
    assert!(matches!(r, Err(Error::Device { .. })), "{r:?}");
}

#[test]
fn case12_buffers_of_another_device() {
    let (n, d, k) = (8, 6, 3);
    let mut h = DeviceHead::new(Device::cpu(), HeadConfig::new(d, k)).unwrap();
    let (x, y) = batch(n, d, k, 1, 1.0);
    let x32: Vec<f32> = x.iter().map(|&v| v as f32).collect();
    let dev = h.device();
    h.forward(&dev.upload(&x32).unwrap(), &dev.upload(&y).unwrap())
        .unwrap();
    let before = h.export_state().unwrap();
    let other = Device::cpu();
    let r = h.forward(&other.upload(&x32).unwrap(), &other.upload(&y).unwrap());
    assert!(matches!(r, Err(Error::Device { .. })), "{r:?}");
    assert_eq!(h.export_state().unwrap(), before);
}

#[test]
fn case13_work_from_another_thread_during_a_capture() {
    let dev = Device::cpu();
    let mut x = dev.upload(&[1.0f32, 2.0]).unwrap();
    let y = dev.upload(&[10.0f32, 20.0]).unwrap();
    let mut z = dev.upload(&[5.0f32, 5.0]).unwrap();
    let sig = implicit_etf::kernels::by_name("add_assign_f32").unwrap();
    let cfg = LaunchConfig::new((1, 1, 1), (32, 1, 1));
    dev.begin_capture().unwrap();
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: both buffers hold the 2 elements the kernel adds.
            let r = unsafe { dev.launch(sig, cfg, &[Arg::Buf(&z), Arg::Buf(&y), Arg::I64(2)]) };
            assert!(matches!(r, Err(Error::Capture { .. })), "{r:?}");
            let e = dev.end_capture();
            assert!(matches!(e, Err(Error::Capture { .. })), "{e:?}");
        });
    });
    let r = dev.copy_into(&mut z, &y); // the capturing thread may copy on the device
    assert!(r.is_ok());
    // SAFETY: as above.
    unsafe { dev.launch(sig, cfg, &[Arg::Buf(&x), Arg::Buf(&y), Arg::I64(2)]) }.unwrap();
    let g = dev.end_capture().unwrap();
    assert_eq!(
        g.recorded_ops(),
        Some(2),
        "only the capturing thread's work"
    );
    g.launch().unwrap();
    assert_eq!(dev.download::<f32>(&x).unwrap(), [11.0, 22.0]);
    assert_eq!(dev.download::<f32>(&z).unwrap(), [10.0, 20.0]);
    dev.write(&mut x, &[0.0f32, 0.0]).unwrap();
}

/// Logits and feature gradients of one head's last step.
type Out = (Vec<f64>, Vec<f64>);

/// `CpuHead<f32>` and `DeviceHead` on the same batch; returns both logits and gradients.
fn both_heads(cfg: HeadConfig, x: &[f64], y: &[u32], steps: usize) -> (Out, Out) {
    let k = cfg.classes;
    let x32: Vec<f32> = x.iter().map(|&v| v as f32).collect();
    let mut cpu = CpuHead::<f32>::new(cfg.clone()).unwrap();
    let mut dev = DeviceHead::new(Device::cpu(), cfg).unwrap();
    let f = |v: &[f32]| v.iter().map(|&a| f64::from(a)).collect::<Vec<_>>();
    let mut out = None;
    for _ in 0..steps {
        let lc = cpu.forward(&x32, y).unwrap();
        // The mean cross-entropy's gradient at the CPU logits, fed to both heads.
        let dz = cross_entropy(&lc, y, k).unwrap().1;
        let gc = cpu.backward(&dz).unwrap();
        let d = dev.device();
        let (xb, yb, dzb) = (
            d.upload(&x32).unwrap(),
            d.upload(y).unwrap(),
            d.upload(&dz).unwrap(),
        );
        let ld = dev.forward(&xb, &yb).unwrap();
        let gd = dev.backward(&dzb).unwrap();
        let d = dev.device();
        out = Some((
            (f(&lc), f(&gc)),
            (
                f(&d.download::<f32>(&ld).unwrap()),
                f(&d.download::<f32>(&gd).unwrap()),
            ),
        ));
    }
    out.unwrap()
}

#[test]
fn case14_huge_features_without_tau() {
    let (n, d, k) = (12, 8, 4);
    let (x, y) = batch(n, d, k, 3, 1e20);
    let ((lc, _), (ld, _)) = both_heads(HeadConfig::new(d, k).with_tau(None), &x, &y, 3);
    assert!(lc.iter().chain(&ld).all(|v| v.is_finite()));
    // Logits of size 1e20: the device's f32 statistics agree to f32 level.
    let e = common::rel(&ld, &lc);
    assert!(e < 1e-4, "logits rel {e:.2e}");
    // Above 1e30, where an f32 step could overflow: refused by both heads like a NaN.
    let (x, y) = batch(n, d, k, 3, 1e31);
    let x32: Vec<f32> = x.iter().map(|&v| v as f32).collect();
    let cfg = HeadConfig::new(d, k).with_tau(None);
    let mut cpu = CpuHead::<f32>::new(cfg.clone()).unwrap();
    let mut dev = DeviceHead::new(Device::cpu(), cfg).unwrap();
    let dv = dev.device();
    let (xb, yb) = (dv.upload(&x32).unwrap(), dv.upload(&y).unwrap());
    assert!(matches!(
        cpu.forward(&x32, &y),
        Err(Error::NonFinite { .. })
    ));
    assert!(matches!(
        dev.forward(&xb, &yb),
        Err(Error::NonFinite { .. })
    ));
}

#[test]
fn case15_huge_features_with_tau() {
    let (n, d, k) = (12, 8, 4);
    let (x, y) = batch(n, d, k, 4, 1.0);
    let big: Vec<f64> = x.iter().map(|v| v * 1e20).collect();
    // The feature normalisation is scale-invariant: 1e20 times the batch gives the same
    // logits as the batch itself (f32 rounding of the inputs aside), on both heads.
    let ((lc, gc), (ld, gd)) = both_heads(HeadConfig::new(d, k), &x, &y, 2);
    let ((lcb, gcb), (ldb, gdb)) = both_heads(HeadConfig::new(d, k), &big, &y, 2);
    assert!(
        ldb.iter().any(|&v| v != 0.0),
        "a finite row normalised to zero"
    );
    for (what, a, b) in [("cpu", &lcb, &lc), ("device", &ldb, &ld)] {
        let e = common::rel(a, b);
        assert!(e < 1e-5, "{what} logits rel {e:.2e}");
    }
    // The gradient scales as 1/1e20 (d(tau r/|r|)/dr), on both heads.
    for (what, big_g, g) in [("cpu", &gcb, &gc), ("device", &gdb, &gd)] {
        let scaled: Vec<f64> = big_g.iter().map(|v| v * 1e20).collect();
        let e = common::rel(&scaled, g);
        assert!(e < 1e-4, "{what} gradient rel {e:.2e}");
    }
    // The f64 head above the f64 overflow of a plain sum of squares (|r| ~ 1e160).
    let huge: Vec<f64> = x.iter().map(|v| v * 1e160).collect();
    let mut h1 = CpuHead::<f64>::new(HeadConfig::new(d, k)).unwrap();
    let mut h2 = CpuHead::<f64>::new(HeadConfig::new(d, k)).unwrap();
    let (l1, l2) = (h1.forward(&x, &y).unwrap(), h2.forward(&huge, &y).unwrap());
    let e = common::rel(&l2, &l1);
    assert!(e < 1e-12, "f64 logits rel {e:.2e}");
}

#[test]
fn case16_step_counter_at_its_limit() {
    let (n, d, k) = (8, 6, 3);
    let (x, y) = batch(n, d, k, 5, 1.0);
    let x32: Vec<f32> = x.iter().map(|&v| v as f32).collect();
    let mut cpu = CpuHead::<f32>::new(HeadConfig::new(d, k)).unwrap();
    let mut dev = DeviceHead::new(Device::cpu(), HeadConfig::new(d, k)).unwrap();
    cpu.forward(&x32, &y).unwrap();
    let base = cpu.export_state().unwrap();
    for step in [u64::MAX, MAX_STEP + 1] {
        let mut s = base.clone();
        s.moving.step = step;
        for r in [cpu.import_state(s.clone()), dev.import_state(s)] {
            assert!(
                matches!(
                    r,
                    Err(Error::InvalidParameter {
                        name: "state.moving.step",
                        ..
                    })
                ),
                "{r:?}"
            );
        }
    }
    // At the limit: accepted, round-trips exactly, and counting saturates there.
    let mut s = base.clone();
    s.moving.step = MAX_STEP - 1;
    cpu.import_state(s.clone()).unwrap();
    dev.import_state(s).unwrap();
    assert_eq!(dev.export_state().unwrap().moving.step, MAX_STEP - 1);
    for _ in 0..2 {
        cpu.forward(&x32, &y).unwrap();
        let d = dev.device();
        dev.forward(&d.upload(&x32).unwrap(), &d.upload(&y).unwrap())
            .unwrap();
    }
    assert_eq!(cpu.export_state().unwrap().moving.step, MAX_STEP);
    assert_eq!(dev.export_state().unwrap().moving.step, MAX_STEP);
}

#[test]
fn case17_replay_after_an_import_without_prox() {
    let (n, d, k) = (8, 6, 3);
    let opt = DeviceOptions::default().with_validation(Validation::Deferred);
    let mut h = DeviceHead::with_options(Device::cpu(), HeadConfig::new(d, k), opt).unwrap();
    let dev = h.device();
    let (x, y) = batch(n, d, k, 6, 1.0);
    let x32: Vec<f32> = x.iter().map(|&v| v as f32).collect();
    let xb = dev.upload(&x32).unwrap();
    let yb = dev.upload(&y).unwrap();
    let dz = dev.upload(&vec![0.01f32; n * k]).unwrap();
    let mut z = dev.alloc_zeros(DType::F32, n * k).unwrap();
    let mut g = dev.alloc_zeros(DType::F32, n * d).unwrap();
    for _ in 0..3 {
        h.forward_into(&xb, &yb, &mut z).unwrap();
        h.backward_into(&dz, &mut g).unwrap();
    }
    h.device().begin_capture().unwrap();
    h.forward_into(&xb, &yb, &mut z).unwrap();
    h.backward_into(&dz, &mut g).unwrap();
    let graph = h.device().end_capture().unwrap();
    graph.launch().unwrap();
    h.check().unwrap();
    // Import a state without a Prox: the replayed step must not run from the old Prox.
    let mut s = h.export_state().unwrap();
    s.prox = None;
    h.import_state(s.clone()).unwrap();
    graph.launch().unwrap();
    assert!(
        matches!(h.check(), Err(Error::Capture { .. })),
        "{:?}",
        h.check()
    );
    assert_eq!(
        h.export_state().unwrap(),
        s,
        "the failed replay changed the state"
    );
    // One uncaptured step (a first step) restores a Prox; the graph then follows the head.
    h.forward_into(&xb, &yb, &mut z).unwrap();
    h.backward_into(&dz, &mut g).unwrap();
    let after_first = h.export_state().unwrap();
    assert!(after_first.prox.is_some());
    graph.launch().unwrap();
    h.check().unwrap();
    let after_replay = h.export_state().unwrap();
    assert_eq!(after_replay.moving.step, after_first.moving.step + 1);
    assert_ne!(
        after_replay.prox, after_first.prox,
        "the replay committed its P"
    );
}
