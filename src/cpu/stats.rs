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
    let mut x = vec![T::from_f64(0.0); n * d];
    tau_normalise_into(raw, d, tau, &mut x);
    x
}

/// [`tau_normalise`] into `x` (same length as `raw`, a multiple of `d`), unchecked.
pub(crate) fn tau_normalise_into<T: Real>(raw: &[T], d: usize, tau: f64, x: &mut [T]) {
    debug_assert_eq!(raw.len(), x.len());
    for (row, out) in raw.chunks_exact(d).zip(x.chunks_exact_mut(d)) {
        let norm = row_norm(row);
        let s = tau / norm.max(NORM_FLOOR);
        for (o, &r) in out.iter_mut().zip(row) {
            *o = T::from_f64(r.to_f64() * s);
        }
    }
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
    let mut dr = vec![T::from_f64(0.0); n * d];
    tau_normalise_backward_into(raw, dx, d, tau, &mut dr);
    dr
}

/// [`tau_normalise_backward`] into `dr`, unchecked (`raw`, `dx`, `dr` of one length, a
/// multiple of `d`).
pub(crate) fn tau_normalise_backward_into<T: Real>(
    raw: &[T],
    dx: &[T],
    d: usize,
    tau: f64,
    dr: &mut [T],
) {
    debug_assert_eq!(raw.len(), dx.len());
    debug_assert_eq!(raw.len(), dr.len());
    for ((row, g), out) in raw
        .chunks_exact(d)
        .zip(dx.chunks_exact(d))
        .zip(dr.chunks_exact_mut(d))
    {
        let (norm, m) = norm2(row);
        if norm > NORM_FLOOR {
            let nr = norm / m;
            let proj: f64 = row
                .iter()
                .zip(g)
                .map(|(&r, &gv)| (r.to_f64() / m) * gv.to_f64())
                .sum::<f64>()
                / (nr * nr);
            let s = tau / norm;
            for ((o, &gv), &r) in out.iter_mut().zip(g).zip(row) {
                *o = T::from_f64(s * (gv.to_f64() - (r.to_f64() / m) * proj));
            }
        } else {
            let s = tau / NORM_FLOOR;
            for (o, &gv) in out.iter_mut().zip(g) {
                *o = T::from_f64(s * gv.to_f64());
            }
        }
    }
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
/// Rows per tile of the `K x d <-> d x K` transposes of the statistics.
const TILE: usize = 32;

/// Batch statistics into caller-held buffers: `counts` (`K`), `mu` (`d`), `centred`
/// (`d x K`, row-major: `centred[j K + c] = mean of class c - mu`, zero for absent classes).
/// `sums` (`K x d`) and `total` (`d`) are scratch. Labels are valid indices.
#[cfg(test)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn class_stats_into<T: Real>(
    x: &[T],
    labels: &[usize],
    d: usize,
    sums: &mut [f64],
    total: &mut [f64],
    counts: &mut [usize],
    mu: &mut [T],
    centred: &mut [T],
) {
    class_sums_into(x, labels, d, sums, total, counts);
    class_means_into(sums, total, counts, labels.len(), mu, centred);
}

/// The additive part of the statistics (what a data-parallel step sums over the ranks):
/// per-class feature sums `sums` (`K x d`), the feature sum `total` (`d`) and the class
/// counts (`K`), all overwritten. Labels are valid indices.
pub(crate) fn class_sums_into<T: Real>(
    x: &[T],
    labels: &[usize],
    d: usize,
    sums: &mut [f64],
    total: &mut [f64],
    counts: &mut [usize],
) {
    debug_assert_eq!(x.len(), labels.len() * d);
    sums.iter_mut().for_each(|v| *v = 0.0);
    total.iter_mut().for_each(|v| *v = 0.0);
    counts.iter_mut().for_each(|v| *v = 0);
    for (row, &y) in x.chunks_exact(d).zip(labels) {
        counts[y] += 1;
        for ((s, t), &v) in sums[y * d..(y + 1) * d]
            .iter_mut()
            .zip(total.iter_mut())
            .zip(row)
        {
            let v = v.to_f64();
            *s += v;
            *t += v;
        }
    }
}

/// The statistics from their sums over `n > 0` rows: `mu = total / n` (`total` becomes
/// `mu`) and `centred` (`d x K`) from `sums` (`K x d`) and `counts`.
pub(crate) fn class_means_into<T: Real>(
    sums: &[f64],
    total: &mut [f64],
    counts: &[usize],
    n: usize,
    mu: &mut [T],
    centred: &mut [T],
) {
    let k = counts.len();
    let d = total.len();
    for (m, t) in mu.iter_mut().zip(total.iter_mut()) {
        *t /= n as f64;
        *m = T::from_f64(*t);
    }
    // The transpose K x d -> d x K in tiles of TILE rows of `centred`.
    for (jt, rows) in centred.chunks_mut(TILE * k).enumerate() {
        let j0 = jt * TILE;
        for (c, &nc) in counts.iter().enumerate() {
            let s = &sums[c * d + j0..c * d + j0 + rows.len() / k];
            let nk = nc as f64;
            for (jj, (&sv, &tv)) in s.iter().zip(&total[j0..]).enumerate() {
                rows[jj * k + c] = T::from_f64(if nc == 0 { 0.0 } else { sv / nk - tv });
            }
        }
    }
}

/// Backward of [`class_sums_into`] and [`class_means_into`]: `d_centred` (`d x K` row-major) and `d_mu` (`d`) into
/// `dx` (`N x d`, added to). `counts` and `n_total` are the statistics' (over every rank's
/// rows in a data-parallel step; `labels` are this rank's). `per_class` (`K x d`) and
/// `g_mu` (`d`) are scratch.
#[allow(clippy::too_many_arguments)]
pub(crate) fn class_stats_backward_add<T: Real>(
    labels: &[usize],
    counts: &[usize],
    n_total: usize,
    d: usize,
    d_centred: &[T],
    d_mu: &[f64],
    per_class: &mut [f64],
    g_mu: &mut [f64],
    dx: &mut [T],
) {
    let k = counts.len();
    // Gradient to mu: its own plus minus the sum over present classes of dL/dc_k.
    g_mu.copy_from_slice(d_mu);
    for (g, row) in g_mu.iter_mut().zip(d_centred.chunks_exact(k)) {
        for c in 0..k {
            if counts[c] > 0 {
                *g -= row[c].to_f64();
            }
        }
    }
    // Per class (K x d, contiguous rows): dL/dc_k / n_k + g_mu / N.
    let inv_n = 1.0 / n_total as f64;
    // The transpose d x K -> K x d in tiles of TILE rows of `d_centred`.
    for (jt, rows) in d_centred.chunks(TILE * k).enumerate() {
        let j0 = jt * TILE;
        let m = rows.len() / k;
        for (c, &nc) in counts.iter().enumerate() {
            if nc == 0 {
                continue;
            }
            let inv = 1.0 / nc as f64;
            let out = &mut per_class[c * d + j0..c * d + j0 + m];
            for (jj, (o, &g)) in out.iter_mut().zip(&g_mu[j0..]).enumerate() {
                *o = rows[jj * k + c].to_f64() * inv + g * inv_n;
            }
        }
    }
    for (row, &y) in dx.chunks_exact_mut(d).zip(labels) {
        for (o, &g) in row.iter_mut().zip(&per_class[y * d..(y + 1) * d]) {
            *o = T::from_f64(o.to_f64() + g);
        }
    }
}

/// Batch statistics (allocating form of [`class_stats_into`], the device tests' oracle).
#[cfg(test)]
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ClassStats<T> {
    /// `mu` (`d`).
    pub mu: Vec<T>,
    /// Class counts (`K`).
    pub counts: Vec<usize>,
    /// Centred class means (`d x K` row-major).
    pub centred: Vec<T>,
}

/// [`class_stats_into`] into new vectors.
#[cfg(test)]
pub(crate) fn class_stats<T: Real>(
    x: &[T],
    labels: &[usize],
    n: usize,
    d: usize,
    k: usize,
) -> ClassStats<T> {
    debug_assert_eq!(labels.len(), n);
    let z = T::from_f64(0.0);
    let (mut sums, mut total) = (vec![0.0; k * d], vec![0.0; d]);
    let mut s = ClassStats {
        mu: vec![z; d],
        counts: vec![0; k],
        centred: vec![z; d * k],
    };
    class_stats_into(
        x,
        labels,
        d,
        &mut sums,
        &mut total,
        &mut s.counts,
        &mut s.mu,
        &mut s.centred,
    );
    s
}

/// [`class_stats_backward_add`] into a new `dx`.
#[cfg(test)]
pub(crate) fn class_stats_backward<T: Real>(
    labels: &[usize],
    counts: &[usize],
    n: usize,
    d: usize,
    k: usize,
    d_centred: &[T],
    d_mu: &[T],
) -> Vec<T> {
    let mut dx = vec![T::from_f64(0.0); n * d];
    let d_mu: Vec<f64> = d_mu.iter().map(|v| v.to_f64()).collect();
    let (mut per, mut g) = (vec![0.0; k * d], vec![0.0; d]);
    class_stats_backward_add(
        labels, counts, n, d, d_centred, &d_mu, &mut per, &mut g, &mut dx,
    );
    dx
}
