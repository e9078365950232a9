//! The device head ([`DeviceHead`]) against the CPU float64 head ([`CpuHead<f64>`]) on the
//! same inputs, step after step with the state carried. Runs on the CPU execution of the
//! kernels, and on a CUDA GPU too when one is present (otherwise prints "CUDA part skipped:
//! <reason>"); `IMPLICIT_ETF_DEVICE=cpu|cuda` restricts it to one backend.
//!
//! Tolerances (the issue's): `P` and `W` relative (Frobenius) error <= 1e-5,
//! `max |P^T P - I| <= 1e-6`, feature gradient relative error <= 1e-4, logits <= 1e-5. They
//! are set by the float32 parts of the device head (statistics and classifier: relative
//! rounding ~6e-8 per operation, sums of up to ~1e3 terms), amplified in `P` by at most
//! `s_max / (s_i + s_j)` (~1e2 here); the float64 solve adds ~eps cond(G)^2 ~1e-10.
//! Measured worst cases are printed with `--nocapture`.

mod common;
use common::*;
use half::{bf16, f16};
use implicit_etf::runtime::{Buffer, Device};
use implicit_etf::*;

const TOL_PW: f64 = 1e-5;
const TOL_ORTH: f64 = 1e-6;
const TOL_GRAD: f64 = 1e-4;
const TOL_LOGITS: f64 = 1e-5;

fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// Feature storage of a test batch.
#[derive(Clone, Copy, Debug)]
enum Feat {
    F32,
    F16,
    BF16,
}

/// Uploads `x` in `feat`; returns the buffer and the values the device sees (as f64).
fn upload_feat(dev: &Device, x: &[f32], feat: Feat) -> (Buffer, Vec<f64>) {
    match feat {
        Feat::F32 => (dev.upload(x).unwrap(), f64s(x)),
        Feat::F16 => {
            let h: Vec<f16> = x.iter().map(|&v| f16::from_f32(v)).collect();
            let seen = h.iter().map(|v| v.to_f64()).collect();
            (dev.upload(&h).unwrap(), seen)
        }
        Feat::BF16 => {
            let h: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
            let seen = h.iter().map(|v| v.to_f64()).collect();
            (dev.upload(&h).unwrap(), seen)
        }
    }
}

/// A batch of `n` labels over `k` classes with classes `absent..` missing when `absent > 0`
/// (classes `k - absent .. k` do not occur).
fn labels(rng: &mut Rng, n: usize, k: usize, absent: usize) -> Vec<u32> {
    let present = k - absent;
    (0..n)
        .map(|i| {
            if i < present {
                i as u32
            } else {
                rng.below(present) as u32
            }
        })
        .collect()
}

/// Class-structured features: `mean_y + noise`, as f32.
fn features(rng: &mut Rng, means: &[f64], y: &[u32], d: usize) -> Vec<f32> {
    let mut x = Vec::with_capacity(y.len() * d);
    for &c in y {
        for j in 0..d {
            x.push((means[c as usize * d + j] + 0.5 * rng.normal()) as f32);
        }
    }
    x
}

#[derive(Default, Debug)]
struct Worst {
    p: f64,
    w: f64,
    orth: f64,
    grad: f64,
    logits: f64,
    sweeps: usize,
}

/// Runs `steps` training steps on both heads and compares each; returns the worst errors.
#[allow(clippy::too_many_arguments)]
fn compare(
    dev: Device,
    cfg: HeadConfig,
    opt: DeviceOptions,
    n: usize,
    steps: usize,
    absent: &[usize],
    feat: Feat,
    i64_labels: bool,
    seed: u64,
) -> Worst {
    let (d, k) = (cfg.dim, cfg.classes);
    let name = dev.name();
    let mut rng = Rng(seed);
    let means = rng.normals(k * d);
    let mut cpu = CpuHead::<f64>::new(cfg.clone()).unwrap();
    let mut gpu = DeviceHead::with_options(dev, cfg, opt).unwrap();
    let mut worst = Worst::default();
    for s in 0..steps {
        let ctx = format!("{name} d={d} K={k} N={n} {feat:?} step {s}");
        let y = labels(&mut rng, n, k, absent[s % absent.len()]);
        let x = features(&mut rng, &means, &y, d);
        let (xb, x64) = upload_feat(gpu.device(), &x, feat);
        let yb = if i64_labels {
            let v: Vec<i64> = y.iter().map(|&c| c as i64).collect();
            gpu.device().upload(&v).unwrap()
        } else {
            gpu.device().upload(&y).unwrap()
        };
        let out = fwd(&mut cpu, &x64, &y).unwrap();
        let logits_b = gpu.forward(&xb, &yb).unwrap();
        let logits: Vec<f32> = gpu.device().download(&logits_b).unwrap();
        let sol = gpu.last_solution().unwrap();
        let p: Vec<f64> = gpu.device().download(sol.p).unwrap();
        let w: Vec<f32> = gpu.device().download(sol.w).unwrap();
        let (ep, ew) = (rel(&p, &out.p), rel(&f64s(&w), &out.w));
        let eo = orth_err(&to_mat(&p, d, k));
        let el = rel(&f64s(&logits), &out.logits);
        assert!(ep <= TOL_PW, "{ctx}: P rel {ep:.2e}");
        assert!(ew <= TOL_PW, "{ctx}: W rel {ew:.2e}");
        assert!(eo <= TOL_ORTH, "{ctx}: orthogonality {eo:.2e}");
        assert!(el <= TOL_LOGITS, "{ctx}: logits rel {el:.2e}");
        // The same dL/dlogits into both backwards (from the CPU logits).
        let (_, dz) = cross_entropy(&out.logits, &y, k).unwrap();
        let dz32: Vec<f32> = dz.iter().map(|&v| v as f32).collect();
        let d_raw_cpu = cpu.backward(&f64s(&dz32)).unwrap();
        let dzb = gpu.device().upload(&dz32).unwrap();
        let d_raw_b = gpu.backward(&dzb).unwrap();
        let d_raw: Vec<f32> = gpu.device().download(&d_raw_b).unwrap();
        let eg = rel(&f64s(&d_raw), &d_raw_cpu);
        assert!(eg <= TOL_GRAD, "{ctx}: feature gradient rel {eg:.2e}");
        let rep = gpu.solve_report().unwrap().unwrap();
        assert_eq!(rep.first_step, s == 0, "{ctx}: first_step flag");
        worst.p = worst.p.max(ep);
        worst.w = worst.w.max(ew);
        worst.orth = worst.orth.max(eo);
        worst.grad = worst.grad.max(eg);
        worst.logits = worst.logits.max(el);
        worst.sweeps = worst.sweeps.max(rep.sweeps);
    }
    // The carried state agrees too.
    let sc = cpu.export_state().unwrap();
    let sg = gpu.export_state().unwrap();
    assert_eq!(sc.moving.step, sg.moving.step);
    assert_eq!(sc.moving.seen, sg.moving.seen);
    assert!((sc.moving.alpha - sg.moving.alpha).abs() < 1e-15);
    assert!(rel(&f64s(&sg.moving.e), &sc.moving.e) <= TOL_PW);
    assert!(rel(sg.prox.as_ref().unwrap(), sc.prox.as_ref().unwrap()) <= TOL_PW);
    worst
}

/// Small and edge shapes, every policy and average, absent classes, 4 steps each.
#[test]
fn matches_cpu_head_across_shapes_and_policies() {
    let shapes: [(usize, usize, usize, Option<f64>); 6] = [
        (2, 2, 6, Some(5.0)),  // K = 2, d = K
        (3, 2, 5, None),       // K = 2, d = K + 1
        (5, 5, 12, Some(5.0)), // d = K
        (8, 7, 20, Some(5.0)), // d = K + 1
        (32, 10, 40, Some(5.0)),
        (70, 12, 9, None), // N < K, crosses a 64-wide tile
    ];
    for dev in devices() {
        let mut all = Worst::default();
        for (i, &(d, k, n, tau)) in shapes.iter().enumerate() {
            for (j, (policy, avg)) in [
                (AbsentClassPolicy::Hold, MovingAverage::Exponential),
                (AbsentClassPolicy::Reference, MovingAverage::Exponential),
                (AbsentClassPolicy::Hold, MovingAverage::Cumulative),
            ]
            .into_iter()
            .enumerate()
            {
                let cfg = HeadConfig::new(d, k)
                    .with_tau(tau)
                    .with_policy(policy)
                    .with_moving_average(avg);
                let absent: &[usize] = if k > 2 { &[1, 0, 2, 0] } else { &[0] };
                let dd = match dev.backend() {
                    implicit_etf::runtime::Backend::Cpu => Device::cpu(),
                    implicit_etf::runtime::Backend::Cuda => Device::cuda(0).unwrap(),
                };
                let w = compare(
                    dd,
                    cfg,
                    DeviceOptions::default(),
                    n,
                    4,
                    absent,
                    Feat::F32,
                    false,
                    100 + (i * 3 + j) as u64,
                );
                all.p = all.p.max(w.p);
                all.w = all.w.max(w.w);
                all.orth = all.orth.max(w.orth);
                all.grad = all.grad.max(w.grad);
                all.logits = all.logits.max(w.logits);
                all.sweeps = all.sweeps.max(w.sweeps);
            }
        }
        println!("{}: worst {all:?}", dev.name());
    }
}

/// f16 / bf16 features, i64 labels; tiled products, a cold eigensolver and one Newton polish
/// step on the CPU execution too (the GPU's default kernels).
#[test]
fn matches_cpu_head_with_half_features_and_gpu_kernels() {
    for dev in devices() {
        let backend = dev.backend();
        let fresh = || match backend {
            implicit_etf::runtime::Backend::Cpu => Device::cpu(),
            implicit_etf::runtime::Backend::Cuda => Device::cuda(0).unwrap(),
        };
        for (feat, i64l) in [(Feat::F16, true), (Feat::BF16, false)] {
            let cfg = HeadConfig::new(24, 6);
            let w = compare(
                fresh(),
                cfg,
                DeviceOptions::default(),
                30,
                3,
                &[0, 1],
                feat,
                i64l,
                7,
            );
            println!("{} {feat:?}: {w:?}", dev.name());
        }
        let opt = DeviceOptions::default()
            .with_gemm(implicit_etf::gpu::linalg::GemmKernel::Tiled)
            .with_warm_start(false)
            .with_max_newton_steps(1);
        let w = compare(
            fresh(),
            HeadConfig::new(66, 9),
            opt,
            70,
            3,
            &[0, 2],
            Feat::F32,
            false,
            9,
        );
        println!("{} tiled, cold: {w:?}", dev.name());
        // The block eigensolver (what a GPU runs for K > 96), in the solve and in the
        // Newton polish's re-factorisation.
        let opt = DeviceOptions::default()
            .with_eigensolver(implicit_etf::gpu::linalg::EigenSolver::Blocked { width: 4 })
            .with_max_newton_steps(2);
        let w = compare(
            fresh(),
            HeadConfig::new(30, 11),
            opt,
            40,
            3,
            &[0],
            Feat::F32,
            false,
            13,
        );
        println!("{} block eigensolver + Newton: {w:?}", dev.name());
    }
}

/// K = 1000 (d = K + 1): the first step on the host, then a device step with the
/// eigensolver warm-started from the first step's eigenvectors (~100 s on the 2-core CPU
/// execution, measured; 11 sweeps). Under AddressSanitizer (`scripts/ci-cuda.sh`, which
/// reruns every test instrumented) the CPU execution is 2-3x slower, so there it runs at
/// K = 200 instead and says so; the plain `cargo test` run covers K = 1000.
#[test]
#[ignore = "slow: ~100 s on the 2-core CPU execution; CI runs it (cargo test -- --ignored)"]
fn matches_cpu_head_at_k1000() {
    for dev in devices() {
        let name = dev.name();
        let k = if implicit_etf::kernels::cpu_asan()
            && dev.backend() == implicit_etf::runtime::Backend::Cpu
        {
            println!("{name}: K=1000 replaced by K=200 under AddressSanitizer (cost); the uninstrumented run covers K=1000");
            200
        } else {
            1000
        };
        let t = std::time::Instant::now();
        let cfg = HeadConfig::new(k + 1, k);
        let w = compare(
            dev,
            cfg,
            DeviceOptions::default(),
            256,
            2,
            &[0],
            Feat::F32,
            false,
            11,
        );
        println!("{name} K={k}: {w:?} in {:.1} s", t.elapsed().as_secs_f64());
    }
}

/// Riemannian Newton polish on the device: with a small `delta` (1e-5, so `cond(G) ~ 1e5`),
/// the Gram route leaves `P` off the manifold by ~5e-9 (measured); one Newton step (with its
/// Newton–Schulz retraction) brings it to rounding level: orthonormal to 1e-12 (measured
/// 2.2e-16), at least 100x better than without the step, and the Riemannian gradient stays
/// below 1e-10 (measured 1.1e-12 with the step, 1.9e-12 without; `||G|| ~ 0.8`; its floor
/// here is the tangent solve's `1/s_min ~ 1e5` amplification of float64 rounding).
///
/// The stopping rule runs on the device: allowed 6 steps, the polish stops once the gradient
/// is at rounding level (`16 eps ||G||_F ~ 3e-15` here; measured: 1.1e-12, then 2.7e-16 after
/// 3 steps, the `1/s_min` amplification slowing the quadratic rate), so fewer than 6 are
/// taken, the gradient ends below 1e-14, and the result is bit-identical to a run capped at
/// exactly the steps taken: the gated kernels of the skipped steps leave everything alone.
#[test]
fn newton_polish_reaches_rounding_level_and_stops() {
    for dev in devices() {
        let run = |max_steps: usize| {
            let d2 = match dev.backend() {
                implicit_etf::runtime::Backend::Cpu => Device::cpu(),
                implicit_etf::runtime::Backend::Cuda => Device::cuda(0).unwrap(),
            };
            let opt = DeviceOptions::default().with_max_newton_steps(max_steps);
            let cfg = HeadConfig::new(40, 8).with_delta(1e-5);
            let mut h = DeviceHead::with_options(d2, cfg, opt).unwrap();
            let mut rng = Rng(5);
            let means = rng.normals(8 * 40);
            let mut rep = None;
            for _ in 0..3 {
                let y = labels(&mut rng, 24, 8, 0);
                let x = features(&mut rng, &means, &y, 40);
                let xb = h.device().upload(&x).unwrap();
                let yb = h.device().upload(&y).unwrap();
                h.forward(&xb, &yb).unwrap();
                rep = h.solve_report().unwrap();
            }
            let p: Vec<f64> = h.device().download(h.last_solution().unwrap().p).unwrap();
            let r = rep.unwrap();
            println!("{} max_newton_steps={max_steps}: {r:?}", dev.name());
            assert!(r.grad_norm <= 1e-10, "grad {:.2e}", r.grad_norm);
            (r, p)
        };
        let (r0, _) = run(0);
        assert_eq!(r0.steps, 0);
        let (r1, p1) = run(1);
        assert_eq!(r1.steps, 1);
        assert!(r1.orthogonality <= 1e-12, "orth {:.2e}", r1.orthogonality);
        assert!(
            r1.orthogonality * 100.0 <= r0.orthogonality,
            "no gain from the Newton step: {:.2e} -> {:.2e}",
            r0.orthogonality,
            r1.orthogonality
        );
        let (r6, p6) = run(6);
        assert!(
            (1..6).contains(&r6.steps),
            "the polish did not stop: {} of 6 steps",
            r6.steps
        );
        assert!(r6.grad_norm <= 1e-14, "grad {:.2e}", r6.grad_norm);
        assert!(r6.orthogonality <= 1e-12, "orth {:.2e}", r6.orthogonality);
        let (rn, pn) = if r6.steps == 1 {
            (r1, p1)
        } else {
            run(r6.steps)
        };
        assert_eq!(rn.steps, r6.steps);
        assert!(
            pn == p6,
            "stopping after {} steps changed P compared with a run capped there",
            r6.steps
        );
    }
}
