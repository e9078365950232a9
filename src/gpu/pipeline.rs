//! Stages 1-4 composed on the device: raw features and labels to `E_new` and its norm
//! (bookkeeping, feature rows, class statistics, moving means), and the backward of the
//! composition. The head calls this before the solve, whose `build_g` writes
//! `Y = E_new / ||E_new||_F` together with `G` (the first step, solved on the host, writes it
//! with [`write_y`]).

use super::moving::{moving_backward, moving_update, MovingStateDev, MovingUpdateDev};
use super::shape::{block, feat_suffix};
use super::stats::{class_stats, prepare_rows, step_begin, ClassStatsDev};
use super::status::Status;
use crate::collective::Collective;
use crate::core::config::{AbsentClassPolicy, MovingAverage};
use crate::core::validate::{check_len, fits_i32, fits_u32};
use crate::error::{Error, Result};
use crate::kernels;
use crate::runtime::{Buffer, DType, Device, LaunchConfig};

/// Everything the statistics stage's forward leaves on the device for its backward.
#[derive(Debug)]
pub struct StatsForward {
    /// The features the classifier sees (f32, N x d): normalised with `tau`, else `raw` as
    /// f32.
    pub x: Buffer,
    /// The rows' normalisation scales (N f32, negative where the `1e-12` floor applied), with
    /// `tau`.
    pub scale: Option<Buffer>,
    /// Batch statistics.
    pub stats: ClassStatsDev,
    /// The moving-mean update (not yet committed to the state).
    pub update: MovingUpdateDev,
    /// `Y = E_new / ||E_new||`, f32, d x K: written by the solve's `build_g` (or by
    /// [`write_y`]), not by [`forward_deferred`].
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
/// f32/f16/bf16) and `labels` (N, u32/i64) to `Y` (d x K). Resets `status` (both halves; a
/// missing `Prox` is recorded when `armed` holds 0, see [`super::stats::step_begin`]). Label
/// range, non-finite features and degenerate means are recorded in `status` (entries 0-2); `state` is not changed (commit
/// `update` with [`MovingStateDev::commit`]). Shape and type errors are returned at once.
#[allow(clippy::too_many_arguments)]
pub fn forward_deferred(
    dev: &Device,
    raw: &Buffer,
    labels: &Buffer,
    n: usize,
    state: &MovingStateDev,
    opt: StatsOptions,
    armed: Option<&Buffer>,
    coll: Option<&Collective>,
    status: &mut Status,
) -> Result<StatsForward> {
    let (d, k) = (state.d, state.k);
    if n == 0 && coll.is_none() {
        return Err(Error::EmptyBatch);
    }
    check_len("raw features", n * d, raw.len())?;
    feat_suffix(raw, "raw features")?;
    fits_i32(n * d, "N*d")?;
    let mut bk = step_begin(
        dev,
        labels,
        n,
        k,
        &state.scal,
        &state.seen,
        opt.average,
        opt.policy,
        opt.alpha_floor,
        armed,
        status,
    )?;
    let (x, scale) = prepare_rows(dev, raw, n, d, opt.tau, status)?;
    let stats = match coll {
        None => class_stats(dev, &x, &bk, n, d, k)?,
        // The statistics over every rank's rows (one all-reduce).
        Some(c) => super::collective::reduce_stats(
            dev,
            c,
            &x,
            &mut bk,
            n,
            d,
            k,
            &state.scal,
            &state.seen,
            opt.policy,
            status,
        )?,
    };
    let update = moving_update(dev, state, &stats, &bk, status)?;
    let norm_buf = update.norm.share();
    let y = dev.alloc(DType::F32, d * k)?;
    Ok(StatsForward {
        x,
        scale,
        stats,
        update,
        y,
        norm_buf,
        tau: opt.tau,
    })
}

/// `Y = E_new / ||E_new||` into `f.y` (one launch): the first step's, whose solve runs on the
/// host (the steady-state solve's `build_g` writes `Y` itself).
pub fn write_y(dev: &Device, f: &mut StatsForward) -> Result<()> {
    let len = f.update.e_new.len();
    check_len("Y", len, f.y.len())?;
    check_len("norm", 1, f.norm_buf.len())?;
    // SAFETY: `e_new` and `y` hold `len` f32 (checked above), `norm` 1.
    unsafe {
        kernels::head::normalise::frobenius_scale_f32(
            dev,
            LaunchConfig::linear(len.max(1), block(dev)),
            &f.update.e_new,
            &f.norm_buf,
            fits_i32(len, "d*K")?,
            &mut f.y,
        )
    }
}

#[cfg(test)]
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
    let mut status = Status::new(dev)?;
    let mut f = forward_deferred(dev, raw, labels, n, state, opt, None, None, &mut status)?;
    write_y(dev, &mut f)?;
    let k = state.k;
    status.read(dev)?.forward_error(k, "raw features")?;
    state.commit(dev, &f.update, &status.buf)?;
    Ok(f)
}

#[cfg(test)]
/// Backward of [`forward`]: `dY` (d x K) and an optional extra gradient on `mu` (d) to the
/// gradient on `raw` (N x d, f32). Gradients reaching `x` by other paths (e.g. logits) are
/// added through `dx_extra` (N x d f32) before the feature normalisation's backward. The dot
/// `<Y, dY>` (which the head's `dy_from_u` computes on the device) is taken on the host.
pub fn backward(
    dev: &Device,
    f: &StatsForward,
    dy: &Buffer,
    d_mu_extra: Option<&Buffer>,
    dx_extra: Option<&Buffer>,
) -> Result<Buffer> {
    let (n, d) = (f.stats.n, f.stats.d);
    let yv = dev.download::<f32>(&f.y)?;
    let dyv = dev.download::<f32>(dy)?;
    let dot: f64 = yv
        .iter()
        .zip(&dyv)
        .map(|(a, b)| f64::from(*a) * f64::from(*b))
        .sum();
    let dot = dev.upload(&[dot])?;
    let zeros_mu = dev.upload(&vec![0.0f32; d])?;
    let zeros_x = dev.upload(&vec![0.0f32; n * d])?;
    let mut out = dev.alloc(DType::F32, n * d)?;
    backward_into(
        dev,
        f,
        dy,
        &dot,
        d_mu_extra.unwrap_or(&zeros_mu),
        dx_extra.unwrap_or(&zeros_x),
        &mut out,
    )?;
    Ok(out)
}

/// The statistics stage's backward into `d_raw` (N x d f32, overwritten), in two launches:
/// `moving_backward_f32` (the Frobenius normalisation's, the moving means' and the batch
/// mean's backward, from `dY`, `dot = <Y, dY>` (1 f64) and the classifier's gradient on `mu`,
/// `d_mu` (d)), then `rows_backward_f32` (one block per row: `dx` (N x d, the classifier's
/// direct gradient) plus the class-mean and mean terms, through the feature normalisation).
pub fn backward_into(
    dev: &Device,
    f: &StatsForward,
    dy: &Buffer,
    dot: &Buffer,
    d_mu: &Buffer,
    dx: &Buffer,
    d_raw: &mut Buffer,
) -> Result<()> {
    let (n, d, k) = (f.stats.n, f.stats.d, f.stats.k);
    check_len("d_raw", n * d, d_raw.len())?;
    check_len("dx", n * d, dx.len())?;
    check_len("x", n * d, f.x.len())?;
    check_len("labels", n, f.stats.labels.len())?;
    check_len("counts", k, f.stats.counts.len())?;
    check_len("Y", d * k, f.y.len())?;
    let (dct, gm) = moving_backward(
        dev,
        &f.update,
        &f.y,
        &f.stats.counts,
        n,
        f.stats.n_total.as_ref(),
        dy,
        dot,
        d_mu,
    )?;
    if d == 0 || n == 0 {
        return Ok(());
    }
    let (tau, scale) = match (&f.tau, &f.scale) {
        (Some(t), Some(s)) => {
            check_len("scale", n, s.len())?;
            (*t as f32, s)
        }
        _ => (0.0, &f.x),
    };
    // SAFETY: `dx`, `f.x`, `d_raw` hold `N d`, `dct` `K d`, `gm` `d` (moving_backward's
    // outputs), `labels` `N` (each in `0..K`: the bookkeeping's conversion), `counts` `K`, the
    // scales `N` (read only with `tau`); one block per row.
    unsafe {
        kernels::head::normalise::rows_backward_f32(
            dev,
            LaunchConfig::new((fits_u32(n, "N")?, 1, 1), (block(dev), 1, 1)),
            dx,
            &dct,
            &gm,
            &f.stats.labels,
            &f.stats.counts,
            &f.x,
            scale,
            fits_i32(d, "d")?,
            tau,
            d_raw,
        )
    }
}
