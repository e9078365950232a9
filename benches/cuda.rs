//! Criterion benchmark of the whole implicit-ETF head on a CUDA GPU: forward + backward at
//! N = 256 and (d, K) = (512, 10), (2048, 100), (2048, 1000), f32 features, against a plain
//! linear classifier head (logits `X W^T`, backward `dX = dZ W` and `dW = dZ^T X`: one
//! product forward, two backward) measured in the same run as the baseline ratio.
//!
//! Both run with `Validation::Deferred` (no host synchronisation inside a step) and one
//! `synchronize` per iteration. Without a GPU it prints "CUDA part skipped: <reason>" and
//! measures nothing (the CPU execution's timings say nothing about a GPU).
//! `scripts/gpu-check.sh` runs it briefly: `cuda -- --warm-up-time 1 --measurement-time 2`.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use implicit_etf::device::linalg::{Gemm, GemmKernel};
use implicit_etf::device::{DType, Device};
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
        let opt = DeviceOptions {
            validation: Validation::Deferred,
            ..DeviceOptions::default()
        };
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
        // The baseline: a linear head, one product forward, two backward.
        let dev = Device::cuda(0).unwrap();
        let w = dev.upload(&vec![1e-2f32; k * d]).unwrap();
        let x = dev.upload(&raw).unwrap();
        let z = dev.alloc_zeros(DType::F32, N * k).unwrap();
        let dx = dev.alloc_zeros(DType::F32, N * d).unwrap();
        let dw = dev.alloc_zeros(DType::F32, k * d).unwrap();
        let gk = GemmKernel::Auto;
        g.bench_function(BenchmarkId::new("linear_baseline", &id), |b| {
            b.iter(|| {
                Gemm::new(false, true, N, k, d)
                    .run(&dev, gk, &x, &w, &z)
                    .unwrap();
                Gemm::new(false, false, N, d, k)
                    .run(&dev, gk, &z, &w, &dx)
                    .unwrap();
                Gemm::new(true, false, k, d, N)
                    .run(&dev, gk, &z, &x, &dw)
                    .unwrap();
                dev.synchronize().unwrap();
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
