//! Stage 1: feature normalisation and batch class statistics (`docs/head.md#feature-normalisation`, `#batch-class-statistics`).
//!
//! * `x_i = tau * r_i / max(||r_i||, 1e-12)` (optional; the reference model does it just before
//!   the head);
//! * `mu = (1/N) sum_i x_i`, class counts `n_k`, and for each class present in the batch the
//!   centred mean `c_k = (1/n_k) sum_{y_i = k} x_i - mu`.
//!
//! Matrices are row-major: features `N x d`, centred means `d x K` (column `k` is `c_k`, as in
//! `docs/reference.md#the-golden-vectors`). Sums are accumulated in `f64` whatever `T` is, so the `f32`
//! results are the correctly rounded `f64` results up to one rounding per output.

use crate::core::validate::{check_len, size2};
use crate::error::{Error, Result};
use crate::Real;

/// Smallest row norm the normalisation divides by (the reference's `1e-12`).
pub const NORM_FLOOR: f64 = 1e-12;

/// `x_i = tau * r_i / max(||r_i||, 1e-12)` for every row of `raw` (`n x d`, row-major).
pub fn tau_normalise<T: Real>(raw: &[T], n: usize, d: usize, tau: f64) -> Result<Vec<T>> {
    check_normalise(raw.len(), n, d, tau)?;
    Ok(tau_normalise_unchecked(raw, n, d, tau))
}

/// The shape and `tau` checks of [`tau_normalise`] and its backward.
fn check_normalise(len: usize, n: usize, d: usize, tau: f64) -> Result<()> {
    check_len("raw", size2("N * d", n, d)?, len)?;
    if !(tau.is_finite() && tau > 0.0) {
        return Err(Error::InvalidParameter {
            name: "tau",
            reason: format!("must be finite and > 0, got {tau}"),
        });
    }
    Ok(())
}

/// [`tau_normalise`] of a checked shape (the head's own calls).
pub(crate) fn tau_normalise_unchecked<T: Real>(raw: &[T], n: usize, d: usize, tau: f64) -> Vec<T> {
    debug_assert_eq!(raw.len(), n * d);
    let mut x = vec![T::from_f64(0.0); n * d];
    for i in 0..n {
        let row = &raw[i * d..(i + 1) * d];
        let norm = row_norm(row);
        let s = tau / norm.max(NORM_FLOOR);
        for (o, &r) in x[i * d..(i + 1) * d].iter_mut().zip(row) {
            *o = T::from_f64(r.to_f64() * s);
        }
    }
    x
}

/// Backward of [`tau_normalise`]: given `dL/dx`, returns `dL/draw`.
///
/// For `||r|| > 1e-12`: `dr = (tau/||r||) (dx - r_hat <r_hat, dx>)` with `r_hat = r/||r||`;
/// below the floor the map is linear, `dr = (tau/1e-12) dx`.
pub fn tau_normalise_backward<T: Real>(
    raw: &[T],
    dx: &[T],
    n: usize,
    d: usize,
    tau: f64,
) -> Result<Vec<T>> {
    check_normalise(raw.len(), n, d, tau)?;
    check_len("dx", raw.len(), dx.len())?;
    Ok(tau_normalise_backward_unchecked(raw, dx, n, d, tau))
}

/// [`tau_normalise_backward`] of checked shapes (the head's own calls).
pub(crate) fn tau_normalise_backward_unchecked<T: Real>(
    raw: &[T],
    dx: &[T],
    n: usize,
    d: usize,
    tau: f64,
) -> Vec<T> {
    debug_assert_eq!(raw.len(), n * d);
    debug_assert_eq!(dx.len(), n * d);
    let mut dr = vec![T::from_f64(0.0); n * d];
    for i in 0..n {
        let row = &raw[i * d..(i + 1) * d];
        let g = &dx[i * d..(i + 1) * d];
        // With `r = m r'` (m = 1 unless the plain sum of squares overflows):
        // r <r, g> / ||r||^2 = r' <r', g> / ||r'||^2.
        let (norm, m) = norm2(row);
        let out = &mut dr[i * d..(i + 1) * d];
        if norm > NORM_FLOOR {
            let nr = norm / m;
            let proj: f64 = row
                .iter()
                .zip(g)
                .map(|(&r, &gv)| (r.to_f64() / m) * gv.to_f64())
                .sum::<f64>()
                / (nr * nr);
            let s = tau / norm;
            for j in 0..d {
                out[j] = T::from_f64(s * (g[j].to_f64() - (row[j].to_f64() / m) * proj));
            }
        } else {
            let s = tau / NORM_FLOOR;
            for j in 0..d {
                out[j] = T::from_f64(s * g[j].to_f64());
            }
        }
    }
    dr
}

fn row_norm<T: Real>(row: &[T]) -> f64 {
    norm2(row).0
}

/// `(||v||, m)` with `||v|| = m ||v / m||`: the plain sum of squares when it neither overflows
/// nor underflows (`m = 1`, so ordinary inputs get exactly the plain result), else the sum of
/// `(v / max|v|)^2` scaled back (`m = max|v|`): a finite vector never has an infinite or a
/// zero norm unless it is zero.
pub(crate) fn norm2<T: Real>(v: &[T]) -> (f64, f64) {
    let ss: f64 = v.iter().map(|&x| x.to_f64() * x.to_f64()).sum();
    if ss.is_finite() && ss > f64::MIN_POSITIVE {
        return (ss.sqrt(), 1.0);
    }
    let m = v.iter().fold(0.0f64, |a, &x| a.max(x.to_f64().abs()));
    if !(m > 0.0 && m.is_finite()) {
        return (ss.sqrt(), 1.0);
    }
    let s: f64 = v.iter().map(|&x| (x.to_f64() / m) * (x.to_f64() / m)).sum();
    (m * s.sqrt(), m)
}

/// Statistics of one batch.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ClassStats<T> {
    /// Global batch mean `mu` (length `d`).
    pub mu: Vec<T>,
    /// Class counts `n_k` (length `K`).
    pub counts: Vec<usize>,
    /// Centred class means `c_k = mean_k - mu` as a `d x K` row-major matrix; the column of a
    /// class absent from the batch is zero.
    pub centred: Vec<T>,
}

/// Batch statistics of `x` (`n x d`) with labels in `0..k` (already validated).
pub(crate) fn class_stats<T: Real>(
    x: &[T],
    labels: &[usize],
    n: usize,
    d: usize,
    k: usize,
) -> ClassStats<T> {
    debug_assert_eq!(x.len(), n * d);
    debug_assert_eq!(labels.len(), n);
    let mut sums = vec![0.0f64; k * d]; // K x d, class-major while accumulating
    let mut total = vec![0.0f64; d];
    let mut counts = vec![0usize; k];
    for (i, &y) in labels.iter().enumerate() {
        counts[y] += 1;
        let row = &x[i * d..(i + 1) * d];
        let s = &mut sums[y * d..(y + 1) * d];
        for j in 0..d {
            let v = row[j].to_f64();
            s[j] += v;
            total[j] += v;
        }
    }
    let mu64: Vec<f64> = total.iter().map(|t| t / n as f64).collect();
    let mut centred = vec![T::from_f64(0.0); d * k];
    for c in 0..k {
        if counts[c] == 0 {
            continue;
        }
        // Divide exactly as `mu` is divided (not multiply by a rounded reciprocal): a batch
        // with a single class then has `sums == total`, `n_k == N` and a centred mean that is
        // exactly zero, so the degenerate case is detected instead of normalising noise.
        let nk = counts[c] as f64;
        for j in 0..d {
            centred[j * k + c] = T::from_f64(sums[c * d + j] / nk - mu64[j]);
        }
    }
    ClassStats {
        mu: mu64.into_iter().map(T::from_f64).collect(),
        counts,
        centred,
    }
}

/// Backward of [`class_stats`]: `dL/dx` (`n x d`) from `dL/dcentred` (`d x K`; columns of
/// absent classes are ignored) and an extra direct gradient `dL/dmu` (`d`).
///
/// `c_k = (1/n_k) sum_{y_i=k} x_i - mu` and `mu = (1/N) sum_i x_i` give
/// `dx_i = dc_{y_i} / n_{y_i} + (dmu - sum_{k present} dc_k) / N`.
pub(crate) fn class_stats_backward<T: Real>(
    labels: &[usize],
    counts: &[usize],
    n: usize,
    d: usize,
    k: usize,
    d_centred: &[T],
    d_mu: &[T],
) -> Vec<T> {
    debug_assert_eq!(d_centred.len(), d * k);
    debug_assert_eq!(d_mu.len(), d);
    let mut g_mu: Vec<f64> = d_mu.iter().map(|v| v.to_f64()).collect();
    for j in 0..d {
        for c in 0..k {
            if counts[c] > 0 {
                g_mu[j] -= d_centred[j * k + c].to_f64();
            }
        }
    }
    let inv_n = 1.0 / n as f64;
    let mut dx = vec![T::from_f64(0.0); n * d];
    for (i, &y) in labels.iter().enumerate() {
        let inv = 1.0 / counts[y] as f64;
        let out = &mut dx[i * d..(i + 1) * d];
        for j in 0..d {
            out[j] = T::from_f64(d_centred[j * k + y].to_f64() * inv + g_mu[j] * inv_n);
        }
    }
    dx
}
