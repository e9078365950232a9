//! GPU-side orchestration of the head's statistics stage (`docs/head.md#the-stages`), written
//! once against [`Device`]: buffer layout, launch shapes and kernel order. It runs unchanged on
//! a CUDA GPU and on the CPU execution.
//!
//! Layouts: features N x d row-major (`f32`, `f16` or `bf16`), labels N (`u32` or `i64`),
//! centred means and moving means d x K row-major, mu length d. Arithmetic is `f32`;
//! gradients are `f32`. Every reduction runs in a fixed order (no float atomics), so results
//! are bitwise reproducible from run to run.

use super::shape::{block, feat_suffix, single_block, Feat};
use super::status::Status;
use crate::core::config::{AbsentClassPolicy, MovingAverage};
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
/// Validates labels (`u32` or `i64`, length `n`) and converts them to `i32` on the device
/// (through [`step_begin`] on a fresh state). A label outside `0..k` gives
/// [`Error::LabelOutOfRange`] (first offending position).
pub fn labels_to_i32(dev: &Device, labels: &Buffer, n: usize, k: usize) -> Result<Buffer> {
    Ok(bookkeeping(dev, labels, n, k)?.labels)
}

#[cfg(test)]
/// [`step_begin`] on a fresh state, checked (the labels' errors returned).
pub fn bookkeeping(dev: &Device, labels: &Buffer, n: usize, k: usize) -> Result<Bookkeeping> {
    let mut status = Status::new(dev)?;
    // A fresh moving-mean state: step 0, alpha 1, nothing seen.
    let (scal, seen) = (dev.upload(&[0.0f64, 1.0])?, dev.upload(&vec![0i32; k])?);
    let bk = step_begin(
        dev,
        labels,
        n,
        k,
        &scal,
        &seen,
        MovingAverage::Exponential,
        AbsentClassPolicy::Hold,
        1e-4,
        None,
        &mut status,
    )?;
    status.read(dev)?.forward_error(k, "labels")?;
    Ok(bk)
}

/// What a forward decides from the labels and the state scalars ([`step_begin`]), on the
/// device.
#[derive(Debug)]
pub struct Bookkeeping {
    /// Validated labels, `i32`, length N (an out-of-range label is 0 here).
    pub labels: Buffer,
    /// Class counts, `i32`, length K.
    pub counts: Buffer,
    /// Exclusive prefix sum of the counts, `i32`, length K + 1.
    pub offsets: Buffer,
    /// The samples of each class in increasing order, `i32`, length N.
    pub members: Buffer,
    /// Moving-mean weights `[a, b, alpha_new, t]`, f64 (see `kernels/head/moving.cu`).
    pub w: Buffer,
    /// Per-class source of the moving-mean update, `i32`, length K.
    pub source: Buffer,
    /// `seen` after the step, `i32`, length K.
    pub seen_new: Buffer,
}

/// The forward's bookkeeping in one launch of one block (`step_begin_*` of
/// `kernels/head/stats.cu`): resets the status word (both halves), records a missing `Prox`
/// when `armed` is given and holds 0, validates and converts the labels (the first
/// out-of-range position and its value go to the status word; no host synchronisation),
/// builds the class counts, offsets and stable member lists, and the moving-mean weights and
/// per-class plan from the moving-mean state's scalars `scal` (`[t, alpha]`, f64) and `seen`
/// flags (K i32).
#[allow(clippy::too_many_arguments)]
pub fn step_begin(
    dev: &Device,
    labels: &Buffer,
    n: usize,
    k: usize,
    scal: &Buffer,
    seen: &Buffer,
    avg: MovingAverage,
    policy: AbsentClassPolicy,
    alpha_floor: f64,
    armed: Option<&Buffer>,
    status: &mut Status,
) -> Result<Bookkeeping> {
    check_len("labels", n, labels.len())?;
    check_len("t, alpha", 2, scal.len())?;
    check_len("seen", k, seen.len())?;
    if let Some(a) = armed {
        check_len("armed", 1, a.len())?;
    }
    let (ni, ki) = (fits_i32(n, "N")?, fits_i32(k, "K")?);
    let mut bk = Bookkeeping {
        labels: dev.alloc(DType::I32, n)?,
        counts: dev.alloc(DType::I32, k)?,
        offsets: dev.alloc(DType::I32, k + 1)?,
        members: dev.alloc(DType::I32, n)?,
        w: dev.alloc(DType::F64, 4)?,
        source: dev.alloc(DType::I32, k)?,
        seen_new: dev.alloc(DType::I32, k)?,
    };
    let cfg = LaunchConfig::new((1, 1, 1), (single_block(dev), 1, 1));
    let cum = i32::from(avg == MovingAverage::Cumulative);
    let pol = match policy {
        AbsentClassPolicy::Hold => 0,
        AbsentClassPolicy::Reference => 1,
    };
    let Bookkeeping {
        labels: lab,
        counts,
        offsets,
        members,
        w,
        source,
        seen_new,
    } = &mut bk;
    let (sc, st) = (scal, &mut status.buf);
    // SAFETY: `labels` and `lab`, `members` hold `N`, `counts`, `source`, `seen_new` and
    // `state.seen` `K`, `offsets` `K + 1`, `w` 4, `state.scal` 2 (checked above or allocated
    // here), `armed` 1 (checked above), the status word `LEN`; one block of at most 1024
    // threads, a multiple of 32.
    unsafe {
        match labels.dtype() {
            DType::U32 => kstats::step_begin_u32(
                dev,
                cfg,
                labels,
                ni,
                ki,
                armed,
                sc,
                cum,
                alpha_floor,
                pol,
                seen,
                st,
                lab,
                counts,
                offsets,
                members,
                w,
                seen_new,
                source,
            ),
            DType::I64 => kstats::step_begin_i64(
                dev,
                cfg,
                labels,
                ni,
                ki,
                armed,
                sc,
                cum,
                alpha_floor,
                pol,
                seen,
                st,
                lab,
                counts,
                offsets,
                members,
                w,
                seen_new,
                source,
            ),
            other => Err(Error::InvalidParameter {
                name: "labels",
                reason: format!("labels must be u32 or i64, got {other:?}"),
            }),
        }
    }?;
    Ok(bk)
}

/// The forward's features in one launch (`prepare_rows_*`, one block per row): `raw`
/// (N x d, f32/f16/bf16) to `x` (N x d f32), `x_i = tau r_i / max(||r_i||, 1e-12)` with
/// `tau`, else `x = raw` as f32; the first non-finite element (or one above `1e30`) is
/// recorded in entry 1 of `status`. Returns `x` and, with `tau`, the rows' scales (N f32,
/// negative where the `1e-12` floor applied), which the backward uses instead of `raw`.
pub fn prepare_rows(
    dev: &Device,
    raw: &Buffer,
    n: usize,
    d: usize,
    tau: Option<f64>,
    status: &mut Status,
) -> Result<(Buffer, Option<Buffer>)> {
    check_len("raw features", n * d, raw.len())?;
    let sfx = feat_suffix(raw, "raw features")?;
    let mut x = dev.alloc(DType::F32, n * d)?;
    let mut scale = dev.alloc(DType::F32, if tau.is_some() { n } else { 1 })?;
    if n == 0 || d == 0 {
        return Ok((x, tau.map(|_| scale)));
    }
    let (cfg, di, t) = (
        LaunchConfig::new((fits_u32(n, "N")?, 1, 1), (block(dev), 1, 1)),
        fits_i32(d, "d")?,
        tau.unwrap_or(0.0) as f32,
    );
    let st = &mut status.buf;
    // SAFETY: `raw` and `x` hold `n d` elements (checked above, allocated here), `scale` `n`
    // when `tau` is given (the kernel writes it only then), the status word `LEN`; one block
    // per row.
    unsafe {
        match sfx {
            Feat::F32 => {
                kstats_norm::prepare_rows_f32(dev, cfg, raw, di, t, &mut x, &mut scale, st)
            }
            Feat::F16 => {
                kstats_norm::prepare_rows_f16(dev, cfg, raw, di, t, &mut x, &mut scale, st)
            }
            Feat::BF16 => {
                kstats_norm::prepare_rows_bf16(dev, cfg, raw, di, t, &mut x, &mut scale, st)
            }
        }
    }?;
    Ok((x, tau.map(|_| scale)))
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
    /// Class counts, `i32`, length K (over every rank's rows in a data-parallel step).
    pub counts: Buffer,
    /// A data-parallel step's rows over every rank (1 `i32`, on the device); `None`: `n`.
    pub n_total: Option<Buffer>,
    /// Global mean `mu`, `f32`, length d.
    pub mu: Buffer,
    /// Centred class means `c_k = mean_k - mu`, `f32`, d x K (zero column if absent).
    pub centred: Buffer,
}

/// Global mean and centred class means of `x` (N x d, f32/f16/bf16) from the forward's
/// [`Bookkeeping`]. Kernel order: `class_sums_*` (grid `ceil(d/256) x K`), `class_means`
/// (one thread per feature).
pub fn class_stats(
    dev: &Device,
    x: &Buffer,
    bk: &Bookkeeping,
    n: usize,
    d: usize,
    k: usize,
) -> Result<ClassStatsDev> {
    if n == 0 {
        return Err(Error::EmptyBatch);
    }
    let ni = fits_i32(n, "N")?;
    let (di, ki) = (fits_i32(d, "d")?, fits_i32(k, "K")?);
    let mut sums = dev.alloc(DType::F32, k * d)?;
    class_sums(dev, x, bk, n, d, k, &mut sums)?;
    let mut mu = dev.alloc(DType::F32, d)?;
    let mut centred = dev.alloc(DType::F32, d * k)?;
    if d > 0 {
        // SAFETY: `sums` holds `K d`, `counts` `K`, `mu` `d`, `centred` `d K` (allocated here
        // or checked by `class_sums`).
        unsafe {
            kernels::head::stats::class_means_f32(
                dev,
                LaunchConfig::linear(d, block(dev)),
                &sums,
                &bk.counts,
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
        labels: bk.labels.share(),
        counts: bk.counts.share(),
        n_total: None,
        mu,
        centred,
    })
}

/// The per-class feature sums of `x` (N x d, f32/f16/bf16; `N` may be 0) into the first
/// `K d` elements of `sums` (K x d row-major f32; a longer buffer, such as a data-parallel
/// step's packed one, keeps the rest), from the forward's [`Bookkeeping`]
/// (`class_sums_*`, grid `ceil(d/256) x K`).
pub fn class_sums(
    dev: &Device,
    x: &Buffer,
    bk: &Bookkeeping,
    n: usize,
    d: usize,
    k: usize,
    sums: &mut Buffer,
) -> Result<()> {
    check_len("features", n * d, x.len())?;
    check_len("labels", n, bk.labels.len())?;
    check_len("members", n, bk.members.len())?;
    check_len("counts", k, bk.counts.len())?;
    check_len("offsets", k + 1, bk.offsets.len())?;
    if sums.len() < k * d || sums.dtype() != DType::F32 {
        return Err(Error::ShapeMismatch {
            what: "class sums (f32)",
            expected: k * d,
            got: sums.len(),
        });
    }
    let sfx = feat_suffix(x, "features")?;
    let di = fits_i32(d, "d")?;
    let (offsets, members) = (&bk.offsets, &bk.members);
    if d > 0 && k > 0 {
        let cfg = LaunchConfig::new((cols(dev, d), fits_u32(k, "K")?, 1), (block(dev), 1, 1));
        // SAFETY: `x` holds `n d` elements, `offsets` `k + 1`, `members` `n` (their values in
        // `0..n`: the bookkeeping's), `sums` at least `k d` (checked above).
        unsafe {
            match sfx {
                Feat::F32 => kstats::class_sums_f32(dev, cfg, x, di, offsets, members, sums),
                Feat::F16 => kstats::class_sums_f16(dev, cfg, x, di, offsets, members, sums),
                Feat::BF16 => kstats::class_sums_bf16(dev, cfg, x, di, offsets, members, sums),
            }
        }?;
    }
    Ok(())
}
