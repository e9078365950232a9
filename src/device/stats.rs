//! GPU-side orchestration of the head's statistics stage (`method.md` §2 steps 1-4), written
//! once against [`Device`]: buffer layout, launch shapes and kernel order. It runs unchanged on
//! a CUDA GPU and on the CPU execution.
//!
//! Layouts: features N x d row-major (`f32`, `f16` or `bf16`), labels N (`u32` or `i64`),
//! centred means and moving means d x K row-major, mu length d. Arithmetic is `f32`;
//! gradients are `f32`. Every reduction runs in a fixed order (no float atomics), so results
//! are bitwise reproducible from run to run.

use super::status::Status;
use super::{Arg, Buffer, DType, Device, LaunchConfig};
use crate::config::{AbsentClassPolicy, MovingAverage};
use crate::error::{Error, Result};

/// Threads per block of the element-wise and per-feature kernels.
pub const BLOCK: u32 = 256;

fn feat_suffix(b: &Buffer, what: &'static str) -> Result<&'static str> {
    match b.dtype() {
        DType::F32 => Ok("f32"),
        DType::F16 => Ok("f16"),
        DType::BF16 => Ok("bf16"),
        other => Err(Error::InvalidParameter {
            name: what,
            reason: format!("features must be f32, f16 or bf16, got {other:?}"),
        }),
    }
}

fn check_len(b: &Buffer, what: &'static str, expected: usize) -> Result<()> {
    if b.len() != expected {
        return Err(Error::ShapeMismatch {
            what,
            expected,
            got: b.len(),
        });
    }
    Ok(())
}

fn i32_dim(v: usize, what: &'static str) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::InvalidParameter {
        name: what,
        reason: format!("{v} exceeds the i32 range of the kernels"),
    })
}

fn cols(d: usize) -> u32 {
    (d.div_ceil(BLOCK as usize)).max(1) as u32
}

/// Validates labels (`u32` or `i64`, length `n`) and converts them to `i32` on the device.
/// A label outside `0..k` gives [`Error::LabelOutOfRange`] (first offending position).
pub fn labels_to_i32(dev: &Device, labels: &Buffer, n: usize, k: usize) -> Result<Buffer> {
    let status = Status::new(dev)?;
    let out = labels_to_i32_deferred(dev, labels, n, k, &status)?;
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
    status: &Status,
) -> Result<Buffer> {
    check_len(labels, "labels", n)?;
    let kernel = match labels.dtype() {
        DType::U32 => "labels_to_i32_u32",
        DType::I64 => "labels_to_i32_i64",
        other => {
            return Err(Error::InvalidParameter {
                name: "labels",
                reason: format!("labels must be u32 or i64, got {other:?}"),
            })
        }
    };
    let (ni, ki) = (i32_dim(n, "N")?, i32_dim(k, "K")?);
    let out = dev.alloc_zeros(DType::I32, n)?;
    // Entry 0 of the status word is the kernel's `bad` slot (it starts at i32::MAX).
    dev.launch(
        kernel,
        LaunchConfig::linear(n, BLOCK),
        &[
            Arg::Buf(labels),
            Arg::I32(ni),
            Arg::I32(ki),
            Arg::Buf(&out),
            Arg::Buf(&status.buf),
        ],
    )?;
    // The offending label's value, for the error message (no host read of the labels).
    dev.launch(
        &kernel.replace("labels_to_i32", "record_bad_label"),
        LaunchConfig::new((1, 1, 1), (32, 1, 1)),
        &[Arg::Buf(labels), Arg::I32(ni), Arg::Buf(&status.buf)],
    )?;
    Ok(out)
}

/// `x_i = tau * r_i / max(||r_i||, 1e-12)`: `raw` N x d (f32/f16/bf16) to `x` N x d f32.
pub fn tau_normalise(dev: &Device, raw: &Buffer, n: usize, d: usize, tau: f64) -> Result<Buffer> {
    check_len(raw, "raw features", n * d)?;
    let sfx = feat_suffix(raw, "raw features")?;
    let x = dev.alloc_zeros(DType::F32, n * d)?;
    if n == 0 || d == 0 {
        return Ok(x);
    }
    dev.launch(
        &format!("tau_normalise_{sfx}"),
        LaunchConfig::new((n as u32, 1, 1), (BLOCK, 1, 1)),
        &[
            Arg::Buf(raw),
            Arg::I32(i32_dim(d, "d")?),
            Arg::F32(tau as f32),
            Arg::Buf(&x),
        ],
    )?;
    Ok(x)
}

/// Backward of [`tau_normalise`]: `dx` N x d f32 to `d_raw` N x d f32.
pub fn tau_normalise_backward(
    dev: &Device,
    raw: &Buffer,
    dx: &Buffer,
    n: usize,
    d: usize,
    tau: f64,
) -> Result<Buffer> {
    let dr = dev.alloc_zeros(DType::F32, n * d)?;
    tau_normalise_backward_into(dev, raw, dx, n, d, tau, &dr)?;
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
    dr: &Buffer,
) -> Result<()> {
    check_len(raw, "raw features", n * d)?;
    check_len(dx, "dx", n * d)?;
    check_len(dr, "d_raw", n * d)?;
    let sfx = feat_suffix(raw, "raw features")?;
    if n == 0 || d == 0 {
        return Ok(());
    }
    dev.launch(
        &format!("tau_normalise_backward_{sfx}"),
        LaunchConfig::new((n as u32, 1, 1), (BLOCK, 1, 1)),
        &[
            Arg::Buf(raw),
            Arg::Buf(dx),
            Arg::I32(i32_dim(d, "d")?),
            Arg::F32(tau as f32),
            Arg::Buf(dr),
        ],
    )
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
    check_len(x, "features", n * d)?;
    check_len(&labels, "labels", n)?;
    let sfx = feat_suffix(x, "features")?;
    let (ni, di, ki) = (i32_dim(n, "N")?, i32_dim(d, "d")?, i32_dim(k, "K")?);
    let counts = dev.alloc_zeros(DType::I32, k)?;
    let offsets = dev.alloc_zeros(DType::I32, k + 1)?;
    let members = dev.alloc_zeros(DType::I32, n)?;
    let sums = dev.alloc_zeros(DType::F32, k * d)?;
    let mu = dev.alloc_zeros(DType::F32, d)?;
    let centred = dev.alloc_zeros(DType::F32, d * k)?;
    let per_class = LaunchConfig::linear(k, BLOCK);
    dev.launch(
        "class_counts",
        per_class,
        &[
            Arg::Buf(&labels),
            Arg::I32(ni),
            Arg::I32(ki),
            Arg::Buf(&counts),
        ],
    )?;
    dev.launch(
        "class_offsets",
        LaunchConfig::new((1, 1, 1), (1, 1, 1)),
        &[Arg::Buf(&counts), Arg::I32(ki), Arg::Buf(&offsets)],
    )?;
    dev.launch(
        "class_members",
        per_class,
        &[
            Arg::Buf(&labels),
            Arg::I32(ni),
            Arg::I32(ki),
            Arg::Buf(&offsets),
            Arg::Buf(&members),
        ],
    )?;
    if d > 0 {
        dev.launch(
            &format!("class_sums_{sfx}"),
            LaunchConfig::new((cols(d), k as u32, 1), (BLOCK, 1, 1)),
            &[
                Arg::Buf(x),
                Arg::I32(di),
                Arg::Buf(&offsets),
                Arg::Buf(&members),
                Arg::Buf(&sums),
            ],
        )?;
        dev.launch(
            "class_means",
            LaunchConfig::linear(d, BLOCK),
            &[
                Arg::Buf(&sums),
                Arg::Buf(&counts),
                Arg::I32(ni),
                Arg::I32(di),
                Arg::I32(ki),
                Arg::Buf(&mu),
                Arg::Buf(&centred),
            ],
        )?;
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
    check_len(d_centred, "d_centred", d * k)?;
    check_len(d_mu, "d_mu", d)?;
    let dx = dev.alloc_zeros(DType::F32, n * d)?;
    class_stats_backward_into(dev, s, d_centred, d_mu, &dx)?;
    Ok(dx)
}

/// [`class_stats_backward`] into an existing `dx` (N x d f32, overwritten).
pub fn class_stats_backward_into(
    dev: &Device,
    s: &ClassStatsDev,
    d_centred: &Buffer,
    d_mu: &Buffer,
    dx: &Buffer,
) -> Result<()> {
    let (n, d, k) = (s.n, s.d, s.k);
    check_len(d_centred, "d_centred", d * k)?;
    check_len(d_mu, "d_mu", d)?;
    check_len(dx, "dx", n * d)?;
    let (ni, di, ki) = (i32_dim(n, "N")?, i32_dim(d, "d")?, i32_dim(k, "K")?);
    if d == 0 {
        return Ok(());
    }
    let g = dev.alloc_zeros(DType::F32, d)?;
    dev.launch(
        "class_stats_backward_prep",
        LaunchConfig::linear(d, BLOCK),
        &[
            Arg::Buf(d_centred),
            Arg::Buf(d_mu),
            Arg::Buf(&s.counts),
            Arg::I32(ni),
            Arg::I32(di),
            Arg::I32(ki),
            Arg::Buf(&g),
        ],
    )?;
    dev.launch(
        "class_stats_backward_scatter",
        LaunchConfig::new((cols(d), n as u32, 1), (BLOCK, 1, 1)),
        &[
            Arg::Buf(&s.labels),
            Arg::Buf(&s.counts),
            Arg::Buf(d_centred),
            Arg::Buf(&g),
            Arg::I32(di),
            Arg::I32(ki),
            Arg::Buf(dx),
        ],
    )
}

/// Moving class means state on the device (`method.md` §2 step 3). The step count and the
/// EMA weight live on the device too (`scal`), so a step needs no host round trip.
#[derive(Debug)]
pub struct MovingStateDev {
    /// `E`, f32, d x K (zero at start).
    pub e: Buffer,
    /// `[t, alpha]` (f64): step count and current EMA weight (starts at `[0, 1]`).
    pub scal: Buffer,
    /// `seen` flags, `i32` 0/1, length K (all 0 at start).
    pub seen: Buffer,
    /// Feature dimension.
    pub d: usize,
    /// Classes.
    pub k: usize,
}

impl MovingStateDev {
    /// The initial state: `E = 0`, `t = 0`, `alpha = 1`, nothing seen.
    pub fn new(dev: &Device, d: usize, k: usize) -> Result<Self> {
        Ok(MovingStateDev {
            e: dev.alloc_zeros(DType::F32, d * k)?,
            scal: dev.upload(&[0.0f64, 1.0])?,
            seen: dev.alloc_zeros(DType::I32, k)?,
            d,
            k,
        })
    }

    /// `(t, alpha)`, read back from the device (a synchronisation).
    pub fn scalars(&self, dev: &Device) -> Result<(u64, f64)> {
        let v = dev.download::<f64>(&self.scal)?;
        Ok((v[0] as u64, v[1]))
    }

    /// Commits `u` (`E <- E_new`, `seen <- seen_new`, `t += 1`, `alpha <- alpha_new`) on the
    /// device, unless `status` (see [`crate::device::head`]) records a forward error, in which
    /// case nothing changes. No host synchronisation.
    pub fn commit(&mut self, dev: &Device, u: &MovingUpdateDev, status: &Buffer) -> Result<()> {
        let (d, k) = (self.d, self.k);
        dev.launch(
            "moving_commit",
            LaunchConfig::linear((d * k).max(k).max(1), BLOCK),
            &[
                Arg::Buf(&self.e),
                Arg::Buf(&self.seen),
                Arg::Buf(&self.scal),
                Arg::Buf(&u.e_new),
                Arg::Buf(&u.seen_new),
                Arg::Buf(&u.w),
                Arg::I32(i32_dim(d, "d")?),
                Arg::I32(i32_dim(k, "K")?),
                Arg::Buf(status),
            ],
        )
    }
}

/// Result of one moving-mean update (what the backward needs, and what a commit writes).
#[derive(Debug)]
pub struct MovingUpdateDev {
    /// `E_new`, f32, d x K.
    pub e_new: Buffer,
    /// The `seen` flags after this step (`i32`, K).
    pub seen_new: Buffer,
    /// Per-class column source (`i32`, K): 0 update from `c_k`, 1 update from `mu`,
    /// 2 set to `mu` (with gradient), 3 hold (no gradient). See `kernels/moving.cu`.
    pub source: Buffer,
    /// `[a, b, alpha_new, t]` (f64): `E_new = a C + b E` on the updated columns.
    pub w: Buffer,
}

/// The weights `(a, b)` of `E_new = a C + b E` and the new `alpha` for step `t` (host
/// mirror of the `moving_weights` kernel, for tests and documentation).
pub fn moving_weights(
    avg: MovingAverage,
    step: u64,
    alpha: f64,
    alpha_floor: f64,
) -> (f64, f64, f64) {
    match avg {
        MovingAverage::Exponential => {
            let a = if alpha > alpha_floor {
                2.0 / (step as f64 + 2.0)
            } else {
                alpha_floor
            };
            (a, 1.0 - a, a)
        }
        MovingAverage::Cumulative => {
            let w = 1.0 / (step as f64 + 1.0);
            (w, 1.0 - w, w)
        }
    }
}

/// One moving-mean update, without touching `state`: `moving_weights` (device scalars),
/// `moving_plan` (per-class sources, new `seen` flags), then `moving_update` (element-wise
/// over d x K). Commit it with [`MovingStateDev::commit`]. No host synchronisation.
pub fn moving_update(
    dev: &Device,
    state: &MovingStateDev,
    s: &ClassStatsDev,
    avg: MovingAverage,
    policy: AbsentClassPolicy,
    alpha_floor: f64,
) -> Result<MovingUpdateDev> {
    let (d, k) = (state.d, state.k);
    if s.d != d || s.k != k {
        return Err(Error::ShapeMismatch {
            what: "moving means (d x K)",
            expected: d * k,
            got: s.d * s.k,
        });
    }
    let w = dev.alloc_zeros(DType::F64, 4)?;
    dev.launch(
        "moving_weights",
        LaunchConfig::new((1, 1, 1), (32, 1, 1)),
        &[
            Arg::Buf(&state.scal),
            Arg::I32(i32::from(avg == MovingAverage::Cumulative)),
            Arg::F64(alpha_floor),
            Arg::Buf(&w),
        ],
    )?;
    let source = dev.alloc_zeros(DType::I32, k)?;
    let seen_new = dev.alloc_zeros(DType::I32, k)?;
    let pol = match policy {
        AbsentClassPolicy::Hold => 0,
        AbsentClassPolicy::Reference => 1,
    };
    dev.launch(
        "moving_plan",
        LaunchConfig::new((1, 1, 1), (BLOCK, 1, 1)),
        &[
            Arg::Buf(&s.counts),
            Arg::I32(i32_dim(k, "K")?),
            Arg::Buf(&w),
            Arg::I32(pol),
            Arg::Buf(&state.seen),
            Arg::Buf(&seen_new),
            Arg::Buf(&source),
        ],
    )?;
    let e_new = dev.alloc_zeros(DType::F32, d * k)?;
    if d * k > 0 {
        dev.launch(
            "moving_update",
            LaunchConfig::linear(d * k, BLOCK),
            &[
                Arg::Buf(&state.e),
                Arg::Buf(&s.centred),
                Arg::Buf(&s.mu),
                Arg::Buf(&source),
                Arg::I32(i32_dim(d, "d")?),
                Arg::I32(i32_dim(k, "K")?),
                Arg::Buf(&w),
                Arg::Buf(&e_new),
            ],
        )?;
    }
    Ok(MovingUpdateDev {
        e_new,
        seen_new,
        source,
        w,
    })
}

/// Backward of [`moving_update`]: `d_e_new` (d x K) to `(d_centred, d_mu)`. When
/// `d_mu_in` is given (e.g. the gradient reaching `mu` through the bias), the result is added
/// to it.
pub fn moving_update_backward(
    dev: &Device,
    u: &MovingUpdateDev,
    d_e_new: &Buffer,
    d_mu_in: Option<&Buffer>,
    d: usize,
    k: usize,
) -> Result<(Buffer, Buffer)> {
    check_len(d_e_new, "d_e_new", d * k)?;
    let d_centred = dev.alloc_zeros(DType::F32, d * k)?;
    let d_mu = match d_mu_in {
        Some(m) => {
            check_len(m, "d_mu", d)?;
            dev.copy(m)?
        }
        None => dev.alloc_zeros(DType::F32, d)?,
    };
    if d > 0 {
        dev.launch(
            "moving_update_backward",
            LaunchConfig::linear(d, BLOCK),
            &[
                Arg::Buf(d_e_new),
                Arg::Buf(&u.source),
                Arg::I32(i32_dim(d, "d")?),
                Arg::I32(i32_dim(k, "K")?),
                Arg::Buf(&u.w),
                Arg::I32(i32::from(d_mu_in.is_some())),
                Arg::Buf(&d_centred),
                Arg::Buf(&d_mu),
            ],
        )?;
    }
    Ok((d_centred, d_mu))
}

/// `Y = E / ||E||_F`. Returns `(Y, norm buffer (1 f32), norm)`; [`Error::DegenerateMeans`] if
/// the norm is zero.
pub fn frobenius_normalise(dev: &Device, e: &Buffer) -> Result<(Buffer, Buffer, f32)> {
    let status = Status::new(dev)?;
    let (y, norm) = frobenius_normalise_deferred(dev, e, &status)?;
    status.read(dev)?.forward_error(1, "E")?;
    let nv = dev.download::<f32>(&norm)?[0];
    Ok((y, norm, nv))
}

/// Deferred [`frobenius_normalise`]: `(Y, norm buffer)`; a zero or non-finite norm is
/// recorded in entry 2 of the step status word instead of returned. No host synchronisation.
pub fn frobenius_normalise_deferred(
    dev: &Device,
    e: &Buffer,
    status: &Status,
) -> Result<(Buffer, Buffer)> {
    let len = e.len();
    let li = i32_dim(len, "d*K")?;
    let norm = dev.alloc_zeros(DType::F32, 1)?;
    dev.launch(
        "dot_single_block",
        LaunchConfig::new((1, 1, 1), (1024, 1, 1)),
        &[
            Arg::Buf(e),
            Arg::Buf(e),
            Arg::I32(li),
            Arg::I32(1),
            Arg::Buf(&norm),
        ],
    )?;
    dev.launch(
        "norm_check",
        LaunchConfig::new((1, 1, 1), (32, 1, 1)),
        &[Arg::Buf(&norm), Arg::Buf(&status.buf)],
    )?;
    let y = dev.alloc_zeros(DType::F32, len)?;
    dev.launch(
        "frobenius_scale",
        LaunchConfig::linear(len, BLOCK),
        &[Arg::Buf(e), Arg::Buf(&norm), Arg::I32(li), Arg::Buf(&y)],
    )?;
    Ok((y, norm))
}

/// Backward of [`frobenius_normalise`]: `dE = (dY - Y <Y, dY>) / ||E||`.
pub fn frobenius_normalise_backward(
    dev: &Device,
    y: &Buffer,
    norm: &Buffer,
    dy: &Buffer,
) -> Result<Buffer> {
    let len = y.len();
    check_len(dy, "dY", len)?;
    let li = i32_dim(len, "d*K")?;
    let dot = dev.alloc_zeros(DType::F32, 1)?;
    dev.launch(
        "dot_single_block",
        LaunchConfig::new((1, 1, 1), (1024, 1, 1)),
        &[
            Arg::Buf(y),
            Arg::Buf(dy),
            Arg::I32(li),
            Arg::I32(0),
            Arg::Buf(&dot),
        ],
    )?;
    let de = dev.alloc_zeros(DType::F32, len)?;
    dev.launch(
        "frobenius_normalise_backward",
        LaunchConfig::linear(len, BLOCK),
        &[
            Arg::Buf(y),
            Arg::Buf(dy),
            Arg::Buf(norm),
            Arg::Buf(&dot),
            Arg::I32(li),
            Arg::Buf(&de),
        ],
    )?;
    Ok(de)
}

/// Everything the statistics stage's forward leaves on the device for its backward.
#[derive(Debug)]
pub struct StatsForward {
    /// Normalised features `x` (f32, N x d) when `tau` was given.
    pub x: Option<Buffer>,
    /// Batch statistics.
    pub stats: ClassStatsDev,
    /// The moving-mean update (not yet committed to the state).
    pub update: MovingUpdateDev,
    /// `Y = E_new / ||E_new||`, f32, d x K.
    pub y: Buffer,
    /// `||E_new||` on the device (1 f32).
    pub norm_buf: Buffer,
    /// `tau` of the feature normalisation.
    pub tau: Option<f64>,
}

/// Options of the statistics stage.
#[derive(Debug, Clone, Copy)]
pub struct StatsOptions {
    /// Feature normalisation temperature (`None`: rows fed unchanged).
    pub tau: Option<f64>,
    /// Exponential or cumulative moving means.
    pub average: MovingAverage,
    /// Absent-class policy.
    pub policy: AbsentClassPolicy,
    /// Floor of the EMA weight (reference `1e-4`).
    pub alpha_floor: f64,
}

/// The statistics stage (steps 1-4) without host synchronisation: `raw` (N x d,
/// f32/f16/bf16) and `labels` (N, u32/i64) to `Y` (d x K). Label range, non-finite features
/// and degenerate means are recorded in `status` (entries 0-2); `state` is not changed (commit
/// `update` with [`MovingStateDev::commit`]). Shape and type errors are returned at once.
pub fn forward_deferred(
    dev: &Device,
    raw: &Buffer,
    labels: &Buffer,
    n: usize,
    state: &MovingStateDev,
    opt: StatsOptions,
    status: &Status,
) -> Result<StatsForward> {
    let (d, k) = (state.d, state.k);
    if n == 0 {
        return Err(Error::EmptyBatch);
    }
    check_len(raw, "raw features", n * d)?;
    feat_suffix(raw, "raw features")?;
    i32_dim(n * d, "N*d")?;
    let lab = labels_to_i32_deferred(dev, labels, n, k, status)?;
    super::status::check_finite(dev, raw, status, 1)?;
    let x = match opt.tau {
        Some(t) => Some(tau_normalise(dev, raw, n, d, t)?),
        None => None,
    };
    let stats = class_stats(dev, x.as_ref().unwrap_or(raw), lab, n, d, k)?;
    let update = moving_update(dev, state, &stats, opt.average, opt.policy, opt.alpha_floor)?;
    let (y, norm_buf) = frobenius_normalise_deferred(dev, &update.e_new, status)?;
    Ok(StatsForward {
        x,
        stats,
        update,
        y,
        norm_buf,
        tau: opt.tau,
    })
}

/// The composed statistics stage (steps 1-4), checked: [`forward_deferred`], then the status
/// word is read back (one synchronisation) and the update committed to `state` only if the
/// step is valid. Errors: [`Error::LabelOutOfRange`], [`Error::NonFinite`],
/// [`Error::DegenerateMeans`], shape errors; `state` is then unchanged.
pub fn forward(
    dev: &Device,
    raw: &Buffer,
    labels: &Buffer,
    n: usize,
    state: &mut MovingStateDev,
    opt: StatsOptions,
) -> Result<StatsForward> {
    let status = Status::new(dev)?;
    let f = forward_deferred(dev, raw, labels, n, state, opt, &status)?;
    let k = state.k;
    status.read(dev)?.forward_error(k, "raw features")?;
    state.commit(dev, &f.update, &status.buf)?;
    Ok(f)
}

/// Backward of [`forward`]: `dY` (d x K) and an optional extra gradient on `mu` (d) to the
/// gradient on `raw` (N x d, f32). Gradients reaching `x` by other paths (e.g. logits) are
/// added through `dx_extra` (N x d f32) before the feature normalisation's backward.
pub fn backward(
    dev: &Device,
    f: &StatsForward,
    raw: &Buffer,
    dy: &Buffer,
    d_mu_extra: Option<&Buffer>,
    dx_extra: Option<&Buffer>,
) -> Result<Buffer> {
    let out = dev.alloc_zeros(DType::F32, f.stats.n * f.stats.d)?;
    backward_into(dev, f, raw, dy, d_mu_extra, dx_extra, &out)?;
    Ok(out)
}

/// [`backward`] into an existing `d_raw` (N x d f32, overwritten). Without `tau`, `raw` is
/// not read.
pub fn backward_into(
    dev: &Device,
    f: &StatsForward,
    raw: &Buffer,
    dy: &Buffer,
    d_mu_extra: Option<&Buffer>,
    dx_extra: Option<&Buffer>,
    d_raw: &Buffer,
) -> Result<()> {
    let (n, d, k) = (f.stats.n, f.stats.d, f.stats.k);
    check_len(d_raw, "d_raw", n * d)?;
    let de = frobenius_normalise_backward(dev, &f.y, &f.norm_buf, dy)?;
    let (dc, dmu) = moving_update_backward(dev, &f.update, &de, d_mu_extra, d, k)?;
    // Without `tau` the class statistics' gradient is the result: written in place.
    let with_tau;
    let dx = match f.tau {
        Some(_) => {
            with_tau = class_stats_backward(dev, &f.stats, &dc, &dmu)?;
            &with_tau
        }
        None => {
            class_stats_backward_into(dev, &f.stats, &dc, &dmu, d_raw)?;
            d_raw
        }
    };
    if let Some(extra) = dx_extra {
        check_len(extra, "dx_extra", n * d)?;
        dev.launch(
            "add_f32",
            super::grid_stride(dev, n * d),
            &[Arg::Buf(dx), Arg::Buf(extra), Arg::I64((n * d) as i64)],
        )?;
    }
    match f.tau {
        Some(t) => tau_normalise_backward_into(dev, raw, dx, n, d, t, d_raw),
        None => Ok(()),
    }
}
