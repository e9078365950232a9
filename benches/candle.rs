//! The candle adapter's overhead (feature `candle`): one training step of the head at
//! `N = 256` driven by hand with host vectors (`CpuHead<f32>`: forward, then backward of a
//! fixed `dL/dlogits`), against the same step through `CandleHead` and candle's autograd
//! (forward, `sum(logits * G)`, `backward`). The difference is what the adapter adds: the
//! tensor checks, the copies to and from host vectors, and candle's graph. On a GPU the
//! adapter's copies are device to device instead (`docs/candle.md#cuda`); not measured here.
//!
//! `cargo bench --features candle --bench candle`

use std::hint::black_box;
use std::time::Duration;

use candle_core::{Device, Tensor, Var};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use implicit_etf::candle::CandleHead;
use implicit_etf::{CpuHead, HeadConfig};

#[path = "../tests/common/rng.rs"]
mod rng;

const SIZES: [(usize, usize); 2] = [(512, 10), (512, 100)];
const N: usize = 256;

fn data(len: usize, seed: u64) -> Vec<f32> {
    let mut r = rng::Rng(seed);
    (0..len).map(|_| (2.0 * r.uniform() - 1.0) as f32).collect()
}

fn benches(c: &mut Criterion) {
    let mut g = c.benchmark_group("candle");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    for &(d, k) in &SIZES {
        let id = format!("{d}x{k}/f32");
        let raw = data(N * d, 1);
        let labels: Vec<u32> = (0..N as u32).map(|i| i % k as u32).collect();
        let dz = data(N * k, 2);
        let mut head = CpuHead::<f32>::new(HeadConfig::new(d, k)).unwrap();
        g.bench_function(BenchmarkId::new("step by hand", &id), |b| {
            b.iter(|| {
                black_box(head.forward(&raw, &labels).unwrap());
                black_box(head.backward(&dz).unwrap());
            })
        });
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::from_vec(raw.clone(), (N, d), &dev).unwrap()).unwrap();
        let y = Tensor::new(labels.as_slice(), &dev).unwrap();
        let gz = Tensor::from_vec(dz.clone(), (N, k), &dev).unwrap();
        let mut head = CandleHead::new(HeadConfig::new(d, k), &dev).unwrap();
        g.bench_function(BenchmarkId::new("step through candle", &id), |b| {
            b.iter(|| {
                let logits = head.forward(x.as_tensor(), &y).unwrap();
                let loss = (&logits * &gz).unwrap().sum_all().unwrap();
                black_box(loss.backward().unwrap());
            })
        });
    }
    g.finish();
}

criterion_group!(candle, benches);
criterion_main!(candle);
