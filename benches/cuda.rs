//! Criterion benchmark of the whole implicit-ETF head on a CUDA GPU: forward + backward at
//! N = 256 and (d, K) = (512, 10), (2048, 100), (2048, 1000), f32 features, against a plain
//! linear classifier head (logits `X W^T`, backward `dX = dZ W` and `dW = dZ^T X`: one
//! product forward, two backward) measured in the same run as the baseline ratio.
//!
//! Everything runs on non-default streams of one context with cudarc's event tracking off
//! (`Device::cuda_on_stream(ctx.new_stream())`, `unsafe { ctx.disable_event_tracking() }`),
//! as a trainer that captures its steps would run the head. The head runs with
//! `Validation::Deferred` (no host synchronisation inside a step), `forward_into` +
//! `backward_into` (no allocation per step) and one `synchronize` per iteration.
//! `implicit_etf_graph` is the same step captured once in a CUDA graph and replayed with one
//! `Graph::launch` per iteration: its gap to `implicit_etf` is the launch overhead of the
//! head's many small kernels. Without a GPU it prints "CUDA part skipped: <reason>" and
//! measures nothing (the CPU execution's timings say nothing about a GPU).
//! `scripts/gpu-check.sh` runs it briefly: `cuda -- --warm-up-time 1 --measurement-time 2`.
//!
//! After that group, `cuda_stages` (not criterion) profiles the head's stages at (2048, 100)
//! and (2048, 1000): [`STAGE_STEPS`] uncaptured steps with the device's stage marks on
//! (`Device::set_profiling`; the head marks the end of each stage, the bench marks the start
//! of the step and the ends of `forward_into` and `backward_into`), and prints, in a fixed
//! format that `scripts/gpu-check.sh` parses:
//!
//! ```text
//! STAGE d=2048 K=100 forward: solve 12.3 us 9 ops  (median over the steps; its stream ops)
//! STAGETOTAL d=2048 K=100 95.1 us 25 ops           (median of the per-step sums)
//! STEP d=2048 K=100 wall 120.4 us                  (profiling off: one synchronised step, host)
//! OPS d=2048 K=100 step 25                         (profiling off: stream_ops() of one step)
//! ```
//!
//! `forward: rest` / `backward: rest` are whatever ran after the head's last mark of the call
//! (the whole call while the head has no marks). It runs when the bench runs (`--bench`), with
//! no filter or a filter that names it (`cuda_stages`, `cuda`, `cuda_head|cuda_stages`).
//! `IMPLICIT_ETF_STAGES_CPU=1 cargo bench --bench cuda` runs it alone on the CPU execution at
//! (d, K) = (128, 10) for 3 steps (about a minute), to check the labels and stream-op counts
//! without a GPU (its times are the CPU execution's).
//!
//! A last group, `cuda_eig`, times the symmetric eigensolvers alone (what decides
//! [`EigenSolver::Auto`]'s threshold and the K = 1000 target): the one-block Jacobi and the
//! block Jacobi (widths 16 and 24) at K = 100 and 1000, cold (`V = I` on a Gram matrix) and
//! warm (rotated into the eigenvectors of a matrix 1e-4 away, as between training steps),
//! with the default cap of 30 sweeps, plus the block solver with a cap of 8 (the difference is
//! the cost of the no-op launches after convergence). Each iteration copies the input on the
//! device (included) and synchronises once.
//!
//! Between the stage profile and `cuda_eig`, `cuda_allreduce` times the data-parallel
//! head's per-step collective at (d, K) = (2048, 1000): one in-place all-reduce of the
//! forward's packed statistics, `K d + K + d + 2` f32 values (8.2 MB), on a one-rank NCCL group
//! (`nccl_world1`), against a device-to-device copy of as many values (`d2d_copy_baseline`),
//! each iteration synchronised once. With one rank no byte leaves the GPU, so `nccl_world1`
//! is the fixed cost a step pays for the call on its stream (the world-size-1 overhead), not
//! a transfer; the copy says what reading and writing the bytes once costs. Without a loadable
//! `libnccl` it prints "NCCL all-reduce skipped: <reason>" and times only the copy.

use criterion::{criterion_group, BenchmarkId, Criterion};
use implicit_etf::gpu::linalg::{congruence, identity, sym_eig, EigenSolver, Gemm, GemmKernel};
use implicit_etf::gpu::status::Status;
use implicit_etf::runtime::cudarc::driver::CudaContext;
use implicit_etf::runtime::nccl::{nccl_available, NcclId};
use implicit_etf::runtime::{Buffer, DType, Device};
use implicit_etf::Collective;
use implicit_etf::{DeviceHead, DeviceOptions, HeadConfig, Validation};
use std::sync::Arc;
use std::time::Instant;

const N: usize = 256;
const SHAPES: [(usize, usize); 3] = [(512, 10), (2048, 100), (2048, 1000)];
/// The shapes of the stage profile.
const STAGE_SHAPES: [(usize, usize); 2] = [(2048, 100), (2048, 1000)];
/// Profiled steps per shape (the medians are over these).
const STAGE_STEPS: usize = 20;
/// The stage profile's name, for the command line's filter.
const STAGES_NAME: &str = "cuda_stages";

/// One CUDA context for the whole bench, with cudarc's event tracking off (all the work of a
/// device is queued on its own stream, and nothing crosses streams); `None` (and the skip
/// message) without a GPU.
fn context() -> Option<Arc<CudaContext>> {
    // The crate's own probe first: cudarc panics when the driver library is absent.
    if let Err(e) = Device::cuda(0) {
        println!("CUDA part skipped: {e}");
        return None;
    }
    let ctx = CudaContext::new(0).unwrap();
    // SAFETY: each device of this bench queues all its work on one stream of its own, and
    // no buffer is used on two streams.
    unsafe { ctx.disable_event_tracking() };
    Some(ctx)
}

/// A device on a new non-default stream of `ctx`.
fn stream_device(ctx: &Arc<CudaContext>) -> Device {
    Device::cuda_on_stream(ctx.new_stream().unwrap()).unwrap()
}

fn inputs(d: usize, k: usize) -> (Vec<f32>, Vec<u32>) {
    let raw: Vec<f32> = (0..N * d)
        .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0 + (i / d % k) as f32 * 0.01)
        .collect();
    (raw, (0..N).map(|i| (i % k) as u32).collect())
}

fn options() -> DeviceOptions {
    DeviceOptions::default().with_validation(Validation::Deferred)
}

/// A head on its own stream with its step's buffers, warm: the first step (host gauge rule),
/// then two that fill both forward workspaces, so the next step allocates nothing.
struct Bench {
    head: DeviceHead,
    x: Buffer,
    y: Buffer,
    dz: Buffer,
    z: Buffer,
    dx: Buffer,
}

impl Bench {
    fn new(dev: Device, d: usize, k: usize) -> Bench {
        let head = DeviceHead::with_options(dev, HeadConfig::new(d, k), options()).unwrap();
        let (raw, labels) = inputs(d, k);
        let dev = head.device();
        let x = dev.upload(&raw).unwrap();
        let y = dev.upload(&labels).unwrap();
        let dz = dev.upload(&vec![1e-3f32; N * k]).unwrap();
        let z = dev.alloc_zeros(DType::F32, N * k).unwrap();
        let dx = dev.alloc_zeros(DType::F32, N * d).unwrap();
        let mut b = Bench {
            head,
            x,
            y,
            dz,
            z,
            dx,
        };
        for _ in 0..3 {
            b.step();
        }
        b.head.check().unwrap();
        b
    }

    /// One forward + backward, queued (no synchronisation).
    fn step(&mut self) {
        self.head
            .forward_into(&self.x, &self.y, &mut self.z)
            .unwrap();
        self.head.backward_into(&self.dz, &mut self.dx).unwrap();
    }
}

fn bench(c: &mut Criterion) {
    let Some(ctx) = context() else { return };
    println!("device: {}", stream_device(&ctx).name());
    let mut g = c.benchmark_group("cuda_head_fwd_bwd");
    for &(d, k) in &SHAPES {
        let id = format!("N{N}_d{d}_K{k}");
        // Criterion runs at least `n (n + 1) / 2` iterations of `n` samples: fewer samples keep
        // a millisecond step inside `scripts/gpu-check.sh`'s time.
        g.sample_size(if k >= 1000 { 10 } else { 20 });
        // The implicit-ETF head, one launch per kernel.
        let mut b = Bench::new(stream_device(&ctx), d, k);
        g.bench_function(BenchmarkId::new("implicit_etf", &id), |bn| {
            bn.iter(|| {
                b.step();
                b.head.device().synchronize().unwrap();
            })
        });
        b.head.check().unwrap();
        // The same step captured once in a CUDA graph and replayed: what launch overhead
        // costs (the head's dozens of small launches become one graph launch).
        b.head.device().begin_capture().unwrap();
        b.step();
        let graph = b.head.device().end_capture().unwrap();
        g.bench_function(BenchmarkId::new("implicit_etf_graph", &id), |bn| {
            bn.iter(|| {
                graph.launch().unwrap();
                b.head.device().synchronize().unwrap();
            })
        });
        b.head.check().unwrap();
        drop(graph);
        drop(b);
        // The baseline: a linear head, one product forward, two backward.
        let dev = stream_device(&ctx);
        let (raw, _) = inputs(d, k);
        let w = dev.upload(&vec![1e-2f32; k * d]).unwrap();
        let x = dev.upload(&raw).unwrap();
        let mut z = dev.alloc_zeros(DType::F32, N * k).unwrap();
        let mut dx = dev.alloc_zeros(DType::F32, N * d).unwrap();
        let mut dw = dev.alloc_zeros(DType::F32, k * d).unwrap();
        let gk = GemmKernel::Auto;
        g.bench_function(BenchmarkId::new("linear_baseline", &id), |bn| {
            bn.iter(|| {
                Gemm::new(false, true, N, k, d)
                    .run(&dev, gk, &x, &w, &mut z)
                    .unwrap();
                Gemm::new(false, false, N, d, k)
                    .run(&dev, gk, &z, &w, &mut dx)
                    .unwrap();
                Gemm::new(true, false, k, d, N)
                    .run(&dev, gk, &z, &x, &mut dw)
                    .unwrap();
                dev.synchronize().unwrap();
            })
        });
    }
    g.finish();
}

/// The median of `v` (sorted in place; the mean of the middle two for an even length).
fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}

/// Whether this run includes the stage profile: a measuring run (`--bench`, not `--list`)
/// with no filter, or a filter that names it (criterion's filter is the first positional
/// argument; it selects the profile when one contains the other: `cuda`, `cuda_stages`,
/// `cuda_head|cuda_stages`).
fn stages_selected() -> bool {
    const VALUE_OPTS: &[&str] = &[
        "-s",
        "--save-baseline",
        "-b",
        "--baseline",
        "--baseline-lenient",
        "--load-baseline",
        "--format",
        "--profile-time",
        "--sample-size",
        "--warm-up-time",
        "--measurement-time",
        "--nresamples",
        "--noise-threshold",
        "--confidence-level",
        "--significance-level",
        "--plotting-backend",
        "--output-format",
        "-c",
        "--color",
    ];
    let args: Vec<String> = std::env::args().skip(1).collect();
    if !args.iter().any(|a| a == "--bench") || args.iter().any(|a| a == "--list") {
        return false;
    }
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if VALUE_OPTS.contains(&a.as_str()) {
            it.next();
        } else if !a.starts_with('-') {
            return STAGES_NAME.contains(a.as_str()) || a.contains(STAGES_NAME);
        }
    }
    true
}

/// The stage profile (see the module documentation) on the devices `make` returns.
fn stage_profile(make: impl Fn() -> Device, shapes: &[(usize, usize)], steps: usize) {
    println!(
        "{STAGES_NAME}: N={N}, {steps} uncaptured steps per shape, median per stage \
         (a stage ends at its mark; stream ops per stage)"
    );
    for &(d, k) in shapes {
        let mut b = Bench::new(make(), d, k);
        // Profiling off: the stream operations and the host wall time of one step.
        let before = b.head.device().stream_ops();
        b.step();
        let ops = b.head.device().stream_ops() - before;
        b.head.device().synchronize().unwrap();
        let mut wall: Vec<f64> = (0..steps)
            .map(|_| {
                let t = Instant::now();
                b.step();
                b.head.device().synchronize().unwrap();
                t.elapsed().as_secs_f64() * 1e6
            })
            .collect();
        // Profiling on: per stage, in order of first appearance; a label met twice in a step
        // is summed.
        b.head.device().set_profiling(true);
        let mut rows: Vec<(&'static str, Vec<f64>, Vec<u64>)> = Vec::new();
        let mut totals = Vec::new();
        let mut total_ops = Vec::new();
        for step in 0..steps {
            b.head.device().mark("step").unwrap();
            b.head.forward_into(&b.x, &b.y, &mut b.z).unwrap();
            b.head.device().mark("forward: rest").unwrap();
            b.head.backward_into(&b.dz, &mut b.dx).unwrap();
            b.head.device().mark("backward: rest").unwrap();
            let stages = b.head.device().stages().unwrap();
            totals.push(stages.iter().map(|s| s.micros).sum::<f64>());
            total_ops.push(stages.iter().map(|s| s.stream_ops).sum::<u64>() as f64);
            for s in stages {
                let i = match rows.iter().position(|r| r.0 == s.label) {
                    Some(i) => i,
                    None => {
                        rows.push((s.label, Vec::new(), Vec::new()));
                        rows.len() - 1
                    }
                };
                let r = &mut rows[i];
                if r.1.len() == step + 1 {
                    r.1[step] += s.micros;
                    r.2[step] += s.stream_ops;
                } else {
                    r.1.resize(step, 0.0);
                    r.2.resize(step, 0);
                    r.1.push(s.micros);
                    r.2.push(s.stream_ops);
                }
            }
        }
        b.head.device().set_profiling(false);
        b.head.check().unwrap();
        for (label, mut us, mut n) in rows {
            us.resize(steps, 0.0);
            n.resize(steps, 0);
            n.sort_unstable();
            println!(
                "STAGE d={d} K={k} {label} {:.1} us {} ops",
                median(&mut us),
                n[steps / 2]
            );
        }
        println!(
            "STAGETOTAL d={d} K={k} {:.1} us {} ops",
            median(&mut totals),
            median(&mut total_ops)
        );
        println!("STEP d={d} K={k} wall {:.1} us", median(&mut wall));
        println!("OPS d={d} K={k} step {ops}");
    }
}

/// A symmetric positive definite `k x k` matrix (a Gram matrix of a `2k x k` matrix with a
/// deterministic pseudo-random fill), row-major.
fn gram(k: usize, seed: u64) -> Vec<f64> {
    let rows = 2 * k;
    let mut s = seed;
    let g: Vec<f64> = (0..rows * k)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 11) as f64 / (1u64 << 53) as f64) - 0.5
        })
        .collect();
    let mut a = vec![0.0; k * k];
    for i in 0..k {
        for j in 0..=i {
            let v: f64 = (0..rows).map(|r| g[r * k + i] * g[r * k + j]).sum();
            a[i * k + j] = v;
            a[j * k + i] = v;
        }
    }
    a
}

fn bench_eig(c: &mut Criterion) {
    let Some(ctx) = context() else { return };
    let dev = stream_device(&ctx);
    let mut g = c.benchmark_group("cuda_eig");
    g.sample_size(10);
    let mut status = Status::new(&dev).unwrap();
    for k in [100usize, 1000] {
        let a = gram(k, 1);
        // Warm start: eigenvectors of a nearby matrix, from a converged device solve.
        let near: Vec<f64> = a
            .iter()
            .zip(gram(k, 2))
            .map(|(x, y)| x + 1e-4 * y)
            .collect();
        let q0 = {
            let mut ab = dev.upload(&near).unwrap();
            let mut v = dev.alloc_zeros(DType::F64, k * k).unwrap();
            identity(&dev, &mut v, k).unwrap();
            let mut lam = dev.alloc_zeros(DType::F64, k).unwrap();
            let mut info = dev.alloc_zeros(DType::I32, 1).unwrap();
            sym_eig(
                &dev,
                EigenSolver::Auto,
                &mut ab,
                &mut v,
                k,
                30,
                &mut lam,
                &mut info,
                &mut status,
                None,
            )
            .unwrap();
            v
        };
        let a_cold = dev.upload(&a).unwrap();
        let a_warm = congruence(&dev, GemmKernel::Auto, None, &a_cold, &q0, k).unwrap();
        let mut eye = dev.alloc_zeros(DType::F64, k * k).unwrap();
        identity(&dev, &mut eye, k).unwrap();
        let mut lam = dev.alloc_zeros(DType::F64, k).unwrap();
        let mut info = dev.alloc_zeros(DType::I32, 1).unwrap();
        let cases: [(EigenSolver, usize); 4] = [
            (EigenSolver::OneBlock, 30),
            (EigenSolver::Blocked { width: 16 }, 30),
            (EigenSolver::Blocked { width: 24 }, 30),
            (EigenSolver::Blocked { width: 24 }, 8),
        ];
        for (solver, cap) in cases {
            for (start, a0, v0) in [("cold", &a_cold, &eye), ("warm", &a_warm, &q0)] {
                // One streaming pass of the one-block solver at K = 1000 takes seconds cold.
                if k > 100 && solver == EigenSolver::OneBlock && start == "cold" {
                    continue;
                }
                let name = match solver {
                    EigenSolver::Blocked { width } => format!("blocked{width}_cap{cap}"),
                    _ => format!("one_block_cap{cap}"),
                };
                let id = format!("K{k}_{start}");
                g.bench_function(BenchmarkId::new(name, id), |b| {
                    b.iter(|| {
                        let mut ab = dev.copy(a0).unwrap();
                        let mut vb = dev.copy(v0).unwrap();
                        sym_eig(
                            &dev,
                            solver,
                            &mut ab,
                            &mut vb,
                            k,
                            cap,
                            &mut lam,
                            &mut info,
                            &mut status,
                            None,
                        )
                        .unwrap();
                        dev.synchronize().unwrap();
                    })
                });
                let sweeps = dev.download::<i32>(&info).unwrap()[0];
                println!("{solver:?} cap {cap} K={k} {start}: {sweeps} sweeps");
            }
        }
    }
    g.finish();
}

/// The shape of the all-reduce group: `(d, K)`.
const ALLREDUCE_SHAPE: (usize, usize) = (2048, 1000);

/// `cuda_allreduce` (see the module documentation).
fn bench_allreduce(c: &mut Criterion) {
    let Some(ctx) = context() else { return };
    let dev = stream_device(&ctx);
    let (d, k) = ALLREDUCE_SHAPE;
    // The forward's packed buffer: class sums, class counts, feature sum, row count, status.
    let len = k * d + k + d + 2;
    let id = format!("K{k}_d{d}");
    let mut g = c.benchmark_group("cuda_allreduce");
    g.sample_size(20);
    let src = dev.upload(&vec![0.5f32; len]).unwrap();
    let mut dst = dev.alloc_zeros(DType::F32, len).unwrap();
    g.bench_function(BenchmarkId::new("d2d_copy_baseline", &id), |b| {
        b.iter(|| {
            dev.copy_into(&mut dst, &src).unwrap();
            dev.synchronize().unwrap();
        })
    });
    let group = if nccl_available() {
        NcclId::new().and_then(|nid| Collective::nccl(&dev, &nid, 0, 1))
    } else {
        Err(implicit_etf::Error::Collective {
            op: "NCCL",
            reason: "libnccl cannot be loaded (no libnccl.so on the library path)".into(),
        })
    };
    match group {
        Ok(coll) => {
            let mut buf = dev.upload(&vec![0.5f32; len]).unwrap();
            g.bench_function(BenchmarkId::new("nccl_world1", &id), |b| {
                b.iter(|| {
                    coll.all_reduce(&dev, &mut buf).unwrap();
                    dev.synchronize().unwrap();
                })
            });
            // One rank: the sum is the buffer itself.
            assert!(dev.download::<f32>(&buf).unwrap().iter().all(|&v| v == 0.5));
        }
        Err(e) => println!("NCCL all-reduce skipped: {e}"),
    }
    g.finish();
}

criterion_group!(heads, bench);
criterion_group!(allreduce, bench_allreduce);
criterion_group!(eigensolvers, bench_eig);

/// `criterion_main!` with the stage profile between the two groups.
fn main() {
    if std::env::var_os("IMPLICIT_ETF_STAGES_CPU").is_some() {
        // The stage profile's labels and counts without a GPU (times of the CPU execution).
        stage_profile(Device::cpu, &[(128, 10)], 3);
        return;
    }
    heads();
    if stages_selected() {
        if let Some(ctx) = context() {
            stage_profile(|| stream_device(&ctx), &STAGE_SHAPES, STAGE_STEPS);
        }
    }
    allreduce();
    eigensolvers();
    Criterion::default().configure_from_args().final_summary();
}
