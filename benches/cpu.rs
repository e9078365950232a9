//! CPU benchmarks, each with a baseline measured in the same run:
//!
//! * the ETF solve + implicit backward (`Solver`, memory reused; and the one-shot
//!   `solve_etf` + `vjp`), against a minimal closed form written with faer: the polar factor
//!   from one thin SVD of `G` and the backward's four products (no optimality check);
//! * the whole head's forward and backward at `N = 256` (`forward_into` + `backward_into`),
//!   against a plain linear classifier head (logits `X W^T` and its backward, three GEMMs);
//!   and the same head as one rank of a data-parallel thread group of one (`f64`, up to
//!   `(2048, 100)`), against the head alone.
//!
//! `cargo bench --bench cpu` (all sizes; ~10 minutes on 2 cores), or filter, e.g.
//! `cargo bench --bench cpu -- "512x100"`.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, MatRef};
use implicit_etf::cpu::solve::Solver;
use implicit_etf::{cross_entropy, solve_etf, CpuHead, HeadConfig, Real, SolveMethod};

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

/// The minimal closed form with faer, as a user would write it: `G = c Y M + delta Prox`,
/// `P = U_G V_G^T` from one thin SVD, and the implicit backward of `docs/backward.md`
/// (`dL/dY = -c u M` with `u = (U T - V Q) diag(1/s) Q^T`). Returns `(P, dL/dY)`.
fn faer_minimal(
    y: MatRef<'_, f64>,
    prox: MatRef<'_, f64>,
    v: MatRef<'_, f64>,
    delta: f64,
) -> (Mat<f64>, Mat<f64>) {
    let (d, k) = (y.nrows(), y.ncols());
    let c = 2.0 / ((k - 1) as f64).sqrt();
    let m = Mat::<f64>::from_fn(k, k, |i, j| f64::from(u8::from(i == j)) - 1.0 / k as f64);
    let g = &(y * &m) * faer::Scale(c) + prox * faer::Scale(delta);
    let svd = g.thin_svd().unwrap();
    let (u, q) = (svd.U(), svd.V());
    let s: Vec<f64> = (0..k).map(|i| svd.S()[i]).collect();
    let p = u * q.transpose();
    let vq = v * q;
    let z = u.transpose() * &vq;
    let t = Mat::<f64>::from_fn(k, k, |i, j| {
        (z[(i, j)] * s[i] + z[(j, i)] * s[j]) / (s[i] + s[j])
    });
    let w = u * &t - &vq;
    let w = Mat::<f64>::from_fn(d, k, |i, j| w[(i, j)] / s[j]);
    let du = &w * q.transpose();
    let dy = &(&du * &m) * faer::Scale(-c);
    (p, dy)
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
        if ty == "f64" {
            // The solve works in f64 whatever the storage type: one set of rows.
            let ym = Mat::from_fn(d, k, |i, j| y[i * k + j].to_f64());
            let pm = Mat::from_fn(d, k, |i, j| p[i * k + j].to_f64());
            let vm = Mat::from_fn(d, k, |i, j| v[i * k + j].to_f64());
            let mut solver = Solver::new(d, k).unwrap();
            let mut dy = Mat::zeros(d, k);
            // The baseline computes the same thing: P and dL/dY agree with the crate's to
            // 1e-8 relative (the SVD's gauge column is as accurate as the polish's).
            solver
                .solve(
                    ym.as_ref(),
                    Some(pm.as_ref()),
                    1e-3,
                    SolveMethod::Procrustes,
                )
                .unwrap();
            solver
                .backward_into(vm.as_ref(), 1e-3, dy.as_mut(), None)
                .unwrap();
            let (pb, dyb) = faer_minimal(ym.as_ref(), pm.as_ref(), vm.as_ref(), 1e-3);
            let rel = |a: MatRef<'_, f64>, b: MatRef<'_, f64>| (a - b).norm_l2() / b.norm_l2();
            let (ep, ey) = (
                rel(solver.factor().p.as_ref(), pb.as_ref()),
                rel(dy.as_ref(), dyb.as_ref()),
            );
            assert!(
                ep < 1e-8 && ey < 1e-8,
                "{id}: baseline differs: P {ep:e}, dL/dY {ey:e}"
            );
            g.bench_function(BenchmarkId::new("solve+backward", &id), |b| {
                b.iter(|| {
                    solver
                        .solve(
                            black_box(ym.as_ref()),
                            Some(pm.as_ref()),
                            1e-3,
                            SolveMethod::Procrustes,
                        )
                        .unwrap();
                    solver
                        .backward_into(vm.as_ref(), 1e-3, dy.as_mut(), None)
                        .unwrap();
                    black_box(&dy);
                })
            });
            g.bench_function(BenchmarkId::new("solve_etf+vjp (one-shot API)", &id), |b| {
                b.iter(|| {
                    let sol = solve_etf(black_box(&y), Some(&p), d, k, 1e-3).unwrap();
                    black_box(sol.vjp(&v).unwrap());
                })
            });
            g.bench_function(
                BenchmarkId::new("faer SVD closed form (baseline)", &id),
                |b| {
                    b.iter(|| {
                        black_box(faer_minimal(
                            black_box(ym.as_ref()),
                            pm.as_ref(),
                            vm.as_ref(),
                            1e-3,
                        ))
                    })
                },
            );
        }
        // Whole head, forward + backward: consecutive training steps (each with a Prox), as in
        // a training loop. The memory is reused: nothing is allocated per step.
        let dz: Vec<T> = data(N * k, 3)
            .into_iter()
            .map(|x| T::from_f64(x / N as f64))
            .collect();
        let mut logits = vec![T::from_f64(0.0); N * k];
        let mut d_raw = vec![T::from_f64(0.0); N * d];
        g.bench_function(BenchmarkId::new("head fwd+bwd", &id), |b| {
            b.iter(|| {
                head.forward_into(black_box(&raw), &labels, &mut logits)
                    .unwrap();
                head.backward_into(&dz, &mut d_raw).unwrap();
                black_box((&logits, &d_raw));
            })
        });
        // The same step as one rank of a data-parallel thread group of one: the cost of the
        // collective's packing and its two all-reduces (f64 sums of K d + K + d + 2 and
        // K d + K + 1 values), against "head fwd+bwd" above.
        if ty == "f64" && d * k <= 2048 * 100 {
            let c = implicit_etf::Collective::threads(1).unwrap().pop().unwrap();
            let mut dp = warm_head::<T>(d, k, &raw, &labels)
                .with_collective(c)
                .unwrap();
            g.bench_function(
                BenchmarkId::new("head fwd+bwd, thread group of 1", &id),
                |b| {
                    b.iter(|| {
                        dp.forward_into(black_box(&raw), &labels, &mut logits)
                            .unwrap();
                        dp.backward_into(&dz, &mut d_raw).unwrap();
                        black_box((&logits, &d_raw));
                    })
                },
            );
        }
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
