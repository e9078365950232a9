//! Criterion benchmark of the whole implicit-ETF head on a CUDA GPU: forward + backward at
//! N = 256 and (d, K) = (512, 10), (2048, 100), (2048, 1000), f32 features, against a plain
//! linear classifier head (logits `X W^T`, backward `dX = dZ W` and `dW = dZ^T X`: one
//! product forward, two backward) measured in the same run as the baseline ratio.
//!
//! Both run with `Validation::Deferred` (no host synchronisation inside a step) and one
//! `synchronize` per iteration. `implicit_etf_graph` is the same head step captured once in a
//! CUDA graph (`forward_into` + `backward_into` between `begin_capture` and `end_capture`)
//! and replayed with one `Graph::launch` per iteration: the difference to `implicit_etf` is
//! the launch overhead of the head's many small kernels. Without a GPU it prints "CUDA part skipped: <reason>" and
//! measures nothing (the CPU execution's timings say nothing about a GPU).
//! `scripts/gpu-check.sh` runs it briefly: `cuda -- --warm-up-time 1 --measurement-time 2`.
//!
//! A second group, `cuda_eig`, times the symmetric eigensolvers alone (what decides
//! [`EigenSolver::Auto`]'s threshold and the K = 1000 target): the one-block Jacobi and the
//! block Jacobi (widths 16 and 24) at K = 100 and 1000, cold (`V = I` on a Gram matrix) and
//! warm (rotated into the eigenvectors of a matrix 1e-4 away, as between training steps),
//! with the default cap of 30 sweeps, plus the block solver with a cap of 8 (the difference is
//! the cost of the no-op launches after convergence). Each iteration copies the input on the
//! device (included) and synchronises once.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use implicit_etf::gpu::linalg::{congruence, identity, sym_eig, EigenSolver, Gemm, GemmKernel};
use implicit_etf::gpu::status::Status;
use implicit_etf::runtime::cudarc::driver::CudaContext;
use implicit_etf::runtime::{DType, Device};
use implicit_etf::{DeviceHead, DeviceOptions, HeadConfig, Validation};

const N: usize = 256;
const SHAPES: [(usize, usize); 3] = [(512, 10), (2048, 100), (2048, 1000)];

fn gpu() -> Option<Device> {
    match Device::cuda(0) {
        Ok(d) => Some(d),
        Err(e) => {
            println!("CUDA part skipped: {e}");
            None
        }
    }
}

fn inputs(dev: &Device, d: usize, k: usize) -> (Vec<f32>, Vec<u32>) {
    let raw: Vec<f32> = (0..N * d)
        .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0 + (i / d % k) as f32 * 0.01)
        .collect();
    let _ = dev;
    (raw, (0..N).map(|i| (i % k) as u32).collect())
}

fn bench(c: &mut Criterion) {
    let Some(probe) = gpu() else { return };
    println!("device: {}", probe.name());
    drop(probe);
    let mut g = c.benchmark_group("cuda_head_fwd_bwd");
    g.sample_size(20);
    for &(d, k) in &SHAPES {
        let id = format!("N{N}_d{d}_K{k}");
        // The implicit-ETF head.
        let dev = Device::cuda(0).unwrap();
        let opt = DeviceOptions::default().with_validation(Validation::Deferred);
        let mut head = DeviceHead::with_options(dev, HeadConfig::new(d, k), opt).unwrap();
        let (raw, y) = inputs(head.device(), d, k);
        let xb = head.device().upload(&raw).unwrap();
        let yb = head.device().upload(&y).unwrap();
        let dz = head.device().upload(&vec![1e-3f32; N * k]).unwrap();
        // The first step (host gauge rule) and a warm-up step outside the measurement.
        for _ in 0..2 {
            head.forward(&xb, &yb).unwrap();
            head.backward(&dz).unwrap();
        }
        head.check().unwrap();
        g.bench_function(BenchmarkId::new("implicit_etf", &id), |b| {
            b.iter(|| {
                head.forward(&xb, &yb).unwrap();
                head.backward(&dz).unwrap();
                head.device().synchronize().unwrap();
            })
        });
        head.check().unwrap();
        drop(head);
        // The same step captured once in a CUDA graph and replayed: what launch overhead
        // costs (the head's dozens of small launches become one graph launch).
        let ctx = CudaContext::new(0).unwrap();
        // SAFETY: all of this benchmark's work on this context is queued on one stream.
        unsafe { ctx.disable_event_tracking() };
        let dev = Device::cuda_on_stream(ctx.new_stream().unwrap()).unwrap();
        let mut head = DeviceHead::with_options(dev, HeadConfig::new(d, k), opt).unwrap();
        let dev = head.device();
        let xb = dev.upload(&raw).unwrap();
        let yb = dev.upload(&y).unwrap();
        let dz = dev.upload(&vec![1e-3f32; N * k]).unwrap();
        let mut z = dev.alloc_zeros(DType::F32, N * k).unwrap();
        let mut dx = dev.alloc_zeros(DType::F32, N * d).unwrap();
        // The first step, then two that fill the workspaces; the fourth is captured.
        for _ in 0..3 {
            head.forward_into(&xb, &yb, &mut z).unwrap();
            head.backward_into(&dz, &mut dx).unwrap();
        }
        head.device().begin_capture().unwrap();
        head.forward_into(&xb, &yb, &mut z).unwrap();
        head.backward_into(&dz, &mut dx).unwrap();
        let graph = head.device().end_capture().unwrap();
        g.bench_function(BenchmarkId::new("implicit_etf_graph", &id), |b| {
            b.iter(|| {
                graph.launch().unwrap();
                head.device().synchronize().unwrap();
            })
        });
        head.check().unwrap();
        drop(graph);
        // The baseline: a linear head, one product forward, two backward.
        let dev = Device::cuda(0).unwrap();
        let w = dev.upload(&vec![1e-2f32; k * d]).unwrap();
        let x = dev.upload(&raw).unwrap();
        let mut z = dev.alloc_zeros(DType::F32, N * k).unwrap();
        let mut dx = dev.alloc_zeros(DType::F32, N * d).unwrap();
        let mut dw = dev.alloc_zeros(DType::F32, k * d).unwrap();
        let gk = GemmKernel::Auto;
        g.bench_function(BenchmarkId::new("linear_baseline", &id), |b| {
            b.iter(|| {
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
    let Some(dev) = gpu() else { return };
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

criterion_group!(benches, bench, bench_eig);
criterion_main!(benches);
