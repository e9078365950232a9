//! GPU-side orchestration of the head's statistics stage (`docs/head.md#the-stages`), written
//! once against [`Device`]: buffer layout, launch shapes and kernel order. It runs unchanged on
//! a CUDA GPU and on the CPU execution.
//!
//! Layouts: features N x d row-major (`f32`, `f16` or `bf16`), labels N (`u32` or `i64`),
//! centred means and moving means d x K row-major, mu length d. Arithmetic is `f32`;
//! gradients are `f32`. Every reduction runs in a fixed order (no float atomics), so results
//! are bitwise reproducible from run to run.

use super::shape::{block, feat_suffix, Feat};
use super::status::Status;
use crate::core::validate::{check_len, fits_i32, fits_u32};
use crate::error::{Error, Result};
use crate::kernels;
use crate::kernels::head::normalise as kstats_norm;
use crate::kernels::head::stats as kstats;
use crate::runtime::{Buffer, DType, Device, LaunchConfig};

fn cols(dev: &Device, d: usize) -> u32 {
    (d.div_ceil(block(dev) as usize)).max(1) as u32
}

#[cfg(test)]
/// Validates labels (`u32` or `i64`, length `n`) and converts them to `i32` on the device.
/// A label outside `0..k` gives [`Error::LabelOutOfRange`] (first offending position).
pub fn labels_to_i32(dev: &Device, labels: &Buffer, n: usize, k: usize) -> Result<Buffer> {
    let mut status = Status::new(dev)?;
    let out = labels_to_i32_deferred(dev, labels, n, k, &mut status)?;
    status.read(dev)?.forward_error(k, "labels")?;
    Ok(out)
}

/// Deferred [`labels_to_i32`]: converts without checking on the host; the first offending
/// position is recorded in entry 0 of the step status word (see [`super::status`]), and the
/// converted label there is 0 (so later kernels stay in bounds). No host synchronisation.
pub fn labels_to_i32_deferred(
    dev: &Device,
    labels: &Buffer,
    n: usize,
    k: usize,
    status: &mut Status,
) -> Result<Buffer> {
    check_len("labels", n, labels.len())?;
    let (ni, ki) = (fits_i32(n, "N")?, fits_i32(k, "K")?);
    let mut out = dev.alloc(DType::I32, n)?;
    let (cfg, one) = (
        LaunchConfig::linear(n, block(dev)),
        LaunchConfig::new((1, 1, 1), (32, 1, 1)),
    );
    let st = &mut status.buf;
    // Entry 0 of the status word is the conversion's `bad` slot (it starts at i32::MAX); the
    // second kernel records the offending label's value, for the error message (no host read
    // of the labels).
    // SAFETY: `labels` and `out` hold `n` elements (checked above and allocated here), the
    // status word `LEN` i32.
    unsafe {
        match labels.dtype() {
            DType::U32 => {
                kstats::labels_to_i32_u32(dev, cfg, labels, ni, ki, &mut out, st)?;
                kstats::record_bad_label_u32(dev, one, labels, ni, st)?;
            }
            DType::I64 => {
                kstats::labels_to_i32_i64(dev, cfg, labels, ni, ki, &mut out, st)?;
                kstats::record_bad_label_i64(dev, one, labels, ni, st)?;
            }
            other => {
                return Err(Error::InvalidParameter {
                    name: "labels",
                    reason: format!("labels must be u32 or i64, got {other:?}"),
                })
            }
        }
    }
    Ok(out)
}

/// `x_i = tau * r_i / max(||r_i||, 1e-12)`: `raw` N x d (f32/f16/bf16) to `x` N x d f32.
pub fn tau_normalise(dev: &Device, raw: &Buffer, n: usize, d: usize, tau: f64) -> Result<Buffer> {
    check_len("raw features", n * d, raw.len())?;
    let sfx = feat_suffix(raw, "raw features")?;
    let mut x = dev.alloc(DType::F32, n * d)?;
    if n == 0 || d == 0 {
        return Ok(x);
    }
    let (cfg, di, t) = (
        LaunchConfig::new((fits_u32(n, "N")?, 1, 1), (block(dev), 1, 1)),
        fits_i32(d, "d")?,
        tau as f32,
    );
    // SAFETY: `raw` and `x` hold `n d` elements (checked above, allocated here); one block
    // per row.
    unsafe {
        match sfx {
            Feat::F32 => kstats_norm::tau_normalise_f32(dev, cfg, raw, di, t, &mut x),
            Feat::F16 => kstats_norm::tau_normalise_f16(dev, cfg, raw, di, t, &mut x),
            Feat::BF16 => kstats_norm::tau_normalise_bf16(dev, cfg, raw, di, t, &mut x),
        }
    }?;
    Ok(x)
}

#[cfg(test)]
/// Backward of [`tau_normalise`]: `dx` N x d f32 to `d_raw` N x d f32.
pub fn tau_normalise_backward(
    dev: &Device,
    raw: &Buffer,
    dx: &Buffer,
    n: usize,
    d: usize,
    tau: f64,
) -> Result<Buffer> {
    let mut dr = dev.alloc(DType::F32, n * d)?;
    tau_normalise_backward_into(dev, raw, dx, n, d, tau, &mut dr)?;
    Ok(dr)
}

/// [`tau_normalise_backward`] into an existing `dr` (N x d f32, overwritten).
pub fn tau_normalise_backward_into(
    dev: &Device,
    raw: &Buffer,
    dx: &Buffer,
    n: usize,
    d: usize,
    tau: f64,
    dr: &mut Buffer,
) -> Result<()> {
    check_len("raw features", n * d, raw.len())?;
    check_len("dx", n * d, dx.len())?;
    check_len("d_raw", n * d, dr.len())?;
    let sfx = feat_suffix(raw, "raw features")?;
    if n == 0 || d == 0 {
        return Ok(());
    }
    let (cfg, di, t) = (
        LaunchConfig::new((fits_u32(n, "N")?, 1, 1), (block(dev), 1, 1)),
        fits_i32(d, "d")?,
        tau as f32,
    );
    // SAFETY: `raw`, `dx` and `dr` hold `n d` elements (checked above); one block per row.
    unsafe {
        match sfx {
            Feat::F32 => kstats_norm::tau_normalise_backward_f32(dev, cfg, raw, dx, di, t, dr),
            Feat::F16 => kstats_norm::tau_normalise_backward_f16(dev, cfg, raw, dx, di, t, dr),
            Feat::BF16 => kstats_norm::tau_normalise_backward_bf16(dev, cfg, raw, dx, di, t, dr),
        }
    }
}

/// Batch statistics on the device (all buffers stay there).
#[derive(Debug)]
pub struct ClassStatsDev {
    /// Samples `N`.
    pub n: usize,
    /// Feature dimension `d`.
    pub d: usize,
    /// Classes `K`.
    pub k: usize,
    /// Validated labels, `i32`, length N.
    pub labels: Buffer,
    /// Class counts, `i32`, length K.
    pub counts: Buffer,
    /// Global mean `mu`, `f32`, length d.
    pub mu: Buffer,
    /// Centred class means `c_k = mean_k - mu`, `f32`, d x K (zero column if absent).
    pub centred: Buffer,
}

/// Class counts, global mean and centred class means of `x` (N x d, f32/f16/bf16) with
/// validated `i32` labels (see [`labels_to_i32`]). Kernel order: `class_counts`,
/// `class_offsets`, `class_members` (stable per-class member lists), `class_sums_*`
/// (grid `ceil(d/256) x K`), `class_means` (one thread per feature).
pub fn class_stats(
    dev: &Device,
    x: &Buffer,
    labels: Buffer,
    n: usize,
    d: usize,
    k: usize,
) -> Result<ClassStatsDev> {
    if n == 0 {
        return Err(Error::EmptyBatch);
    }
    check_len("features", n * d, x.len())?;
    check_len("labels", n, labels.len())?;
    let sfx = feat_suffix(x, "features")?;
    let (ni, di, ki) = (fits_i32(n, "N")?, fits_i32(d, "d")?, fits_i32(k, "K")?);
    let mut counts = dev.alloc(DType::I32, k)?;
    let mut offsets = dev.alloc(DType::I32, k + 1)?;
    let mut members = dev.alloc(DType::I32, n)?;
    let mut sums = dev.alloc(DType::F32, k * d)?;
    let mut mu = dev.alloc(DType::F32, d)?;
    let mut centred = dev.alloc(DType::F32, d * k)?;
    let per_class = LaunchConfig::linear(k, block(dev));
    // SAFETY: `labels` holds `N` i32 (converted above), `counts` `K` (allocated here).
    unsafe {
        kernels::head::stats::class_counts_i32(dev, per_class, &labels, ni, ki, &mut counts)
    }?;
    // SAFETY: `counts` holds `K`, `offsets` `K + 1` (allocated here); one thread.
    unsafe {
        kernels::head::stats::class_offsets_i32(
            dev,
            LaunchConfig::new((1, 1, 1), (1, 1, 1)),
            &counts,
            ki,
            &mut offsets,
        )
    }?;
    // SAFETY: `labels` and `members` hold `N`, `offsets` `K + 1` (allocated here).
    unsafe {
        kernels::head::stats::class_members_i32(
            dev,
            per_class,
            &labels,
            ni,
            ki,
            &offsets,
            &mut members,
        )
    }?;
    if d > 0 {
        let cfg = LaunchConfig::new((cols(dev, d), fits_u32(k, "K")?, 1), (block(dev), 1, 1));
        // SAFETY: `x` holds `n d` elements (checked above), `offsets` `k + 1`, `members` `n`
        // and `sums` `k d` (allocated here).
        unsafe {
            match sfx {
                Feat::F32 => kstats::class_sums_f32(dev, cfg, x, di, &offsets, &members, &mut sums),
                Feat::F16 => kstats::class_sums_f16(dev, cfg, x, di, &offsets, &members, &mut sums),
                Feat::BF16 => {
                    kstats::class_sums_bf16(dev, cfg, x, di, &offsets, &members, &mut sums)
                }
            }
        }?;
        // SAFETY: `sums` holds `K d`, `counts` `K`, `mu` `d`, `centred` `d K` (allocated here).
        unsafe {
            kernels::head::stats::class_means_f32(
                dev,
                LaunchConfig::linear(d, block(dev)),
                &sums,
                &counts,
                ni,
                di,
                ki,
                &mut mu,
                &mut centred,
            )
        }?;
    }
    Ok(ClassStatsDev {
        n,
        d,
        k,
        labels,
        counts,
        mu,
        centred,
    })
}

/// Backward of [`class_stats`]: `d_centred` (d x K) and `d_mu` (d) to `dx` (N x d, f32):
/// `dx_i = d_centred[:, y_i] / n_{y_i} + (d_mu - sum_{k present} d_centred[:, k]) / N`.
pub fn class_stats_backward(
    dev: &Device,
    s: &ClassStatsDev,
    d_centred: &Buffer,
    d_mu: &Buffer,
) -> Result<Buffer> {
    let (n, d, k) = (s.n, s.d, s.k);
    check_len("d_centred", d * k, d_centred.len())?;
    check_len("d_mu", d, d_mu.len())?;
    let mut dx = dev.alloc(DType::F32, n * d)?;
    class_stats_backward_into(dev, s, d_centred, d_mu, &mut dx)?;
    Ok(dx)
}

/// [`class_stats_backward`] into an existing `dx` (N x d f32, overwritten).
pub fn class_stats_backward_into(
    dev: &Device,
    s: &ClassStatsDev,
    d_centred: &Buffer,
    d_mu: &Buffer,
    dx: &mut Buffer,
) -> Result<()> {
    let (n, d, k) = (s.n, s.d, s.k);
    check_len("d_centred", d * k, d_centred.len())?;
    check_len("d_mu", d, d_mu.len())?;
    check_len("dx", n * d, dx.len())?;
    let (ni, di, ki) = (fits_i32(n, "N")?, fits_i32(d, "d")?, fits_i32(k, "K")?);
    if d == 0 {
        return Ok(());
    }
    let mut g = dev.alloc(DType::F32, d)?;
    // SAFETY: `d_centred` holds `d K`, `d_mu` `d` (checked above), `s.counts` `K`, `g` `d` (allocated here).
    unsafe {
        kernels::head::stats::class_stats_backward_prep_f32(
            dev,
            LaunchConfig::linear(d, block(dev)),
            d_centred,
            d_mu,
            &s.counts,
            ni,
            di,
            ki,
            &mut g,
        )
    }?;
    // SAFETY: `s.labels` holds `N`, `s.counts` `K`, `d_centred` `d K`, `g` `d`, `dx` `N d` (checked above).
    unsafe {
        kernels::head::stats::class_stats_backward_scatter_f32(
            dev,
            LaunchConfig::new((cols(dev, d), n as u32, 1), (block(dev), 1, 1)),
            &s.labels,
            &s.counts,
            d_centred,
            &g,
            di,
            ki,
            dx,
        )
    }
}
