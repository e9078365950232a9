//! CPU benchmarks: the ETF solve + implicit backward alone, the whole head's forward and
//! backward at `N = 256`, and, as the baseline measured in the same run, a plain linear
//! classifier head (logits `X W^T` and its backward, two GEMMs) at the same sizes.
//!
//! `cargo bench --bench cpu` (all sizes; ~10 minutes on 2 cores), or filter, e.g.
//! `cargo bench --bench cpu -- "512x100"`.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, MatRef};
use implicit_etf::{cross_entropy, solve_etf, CpuHead, HeadConfig, Real};

const SIZES: [(usize, usize); 4] = [(512, 10), (512, 100), (2048, 100), (2048, 1000)];
const N: usize = 256;

#[path = "../tests/common/rng.rs"]
mod rng;

/// Deterministic pseudo-random numbers in [-1, 1) (the tests' SplitMix64).
fn data(len: usize, seed: u64) -> Vec<f64> {
    let mut r = rng::Rng(seed);
    (0..len).map(|_| 2.0 * r.uniform() - 1.0).collect()
}

fn configure(c: &mut Criterion) -> criterion::BenchmarkGroup<'_, criterion::measurement::WallTime> {
    let mut g = c.benchmark_group("cpu");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    g
}

/// A head that has taken a few steps (so the solve has a `Prox`, as in training).
fn warm_head<T: Real>(d: usize, k: usize, raw: &[T], labels: &[u32]) -> CpuHead<T> {
    let mut head = CpuHead::<T>::new(HeadConfig::new(d, k)).unwrap();
    for _ in 0..2 {
        let logits = head.forward(raw, labels).unwrap();
        let (_, dz) = cross_entropy(&logits, labels, k).unwrap();
        head.backward(&dz).unwrap();
    }
    head
}

fn bench_type<T: Real>(c: &mut Criterion, ty: &str) {
    let mut g = configure(c);
    for &(d, k) in &SIZES {
        let id = format!("{d}x{k}/{ty}");
        // Solve + backward alone: Y from a warm head's state, Prox = its P.
        let raw: Vec<T> = data(N * d, 1).into_iter().map(T::from_f64).collect();
        let labels: Vec<u32> = (0..N as u32).map(|i| i % k as u32).collect();
        let mut head = warm_head::<T>(d, k, &raw, &labels);
        head.forward(&raw, &labels).unwrap();
        let last = head.last_solution().unwrap();
        let (y, p) = (last.y.to_vec(), last.p.to_vec());
        let v: Vec<T> = data(d * k, 2).into_iter().map(T::from_f64).collect();
        g.bench_function(BenchmarkId::new("solve+backward", &id), |b| {
            b.iter(|| {
                let sol = solve_etf(black_box(&y), Some(&p), d, k, 1e-3).unwrap();
                black_box(sol.vjp(&v).unwrap());
            })
        });
        // Whole head, forward + backward (state restored each iteration).
        let state = head.export_state().unwrap();
        let dz: Vec<T> = data(N * k, 3)
            .into_iter()
            .map(|x| T::from_f64(x / N as f64))
            .collect();
        g.bench_function(BenchmarkId::new("head fwd+bwd", &id), |b| {
            b.iter(|| {
                head.import_state(state.clone()).unwrap();
                black_box(head.forward(black_box(&raw), &labels).unwrap());
                black_box(head.backward(&dz).unwrap());
            })
        });
        // Baseline: linear head, logits = X W^T (forward), dX = dZ W and dW = dZ^T X.
        let x = MatRef::from_row_major_slice(&raw, N, d);
        let w: Mat<T> = Mat::from_fn(k, d, |i, j| T::from_f64(data(1, (i * d + j) as u64)[0]));
        let dzm = MatRef::from_row_major_slice(&dz, N, k);
        let par = faer::get_global_parallelism();
        g.bench_function(BenchmarkId::new("linear fwd+bwd (baseline)", &id), |b| {
            let mut z: Mat<T> = Mat::zeros(N, k);
            let mut dx: Mat<T> = Mat::zeros(N, d);
            let mut dw: Mat<T> = Mat::zeros(k, d);
            b.iter(|| {
                matmul(
                    z.as_mut(),
                    Accum::Replace,
                    x,
                    w.transpose(),
                    T::from_f64(1.0),
                    par,
                );
                matmul(
                    dx.as_mut(),
                    Accum::Replace,
                    dzm,
                    w.as_ref(),
                    T::from_f64(1.0),
                    par,
                );
                matmul(
                    dw.as_mut(),
                    Accum::Replace,
                    dzm.transpose(),
                    x,
                    T::from_f64(1.0),
                    par,
                );
                black_box((&z, &dx, &dw));
            })
        });
    }
    g.finish();
}

fn benches(c: &mut Criterion) {
    bench_type::<f64>(c, "f64");
    bench_type::<f32>(c, "f32");
}

criterion_group!(cpu, benches);
criterion_main!(cpu);
