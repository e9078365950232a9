//! Stages 1-4 composed on the device: raw features and labels to `Y = E_new / ||E_new||_F`
//! (feature normalisation, class statistics, moving means, Frobenius normalisation), and the
//! backward of the composition. The head calls this between its label check and the solve.

use super::moving::{
    frobenius_normalise_backward, frobenius_normalise_deferred, moving_update,
    moving_update_backward, MovingStateDev, MovingUpdateDev,
};
use super::shape::feat_suffix;
use super::stats::{
    class_stats, class_stats_backward, class_stats_backward_into, step_begin, tau_normalise,
    tau_normalise_backward_into, ClassStatsDev,
};
use super::status::Status;
use crate::core::config::{AbsentClassPolicy, MovingAverage};
use crate::core::validate::{check_len, fits_i32};
use crate::error::{Error, Result};
use crate::kernels::elementwise::ops as elementwise;
use crate::runtime::{grid_stride, Buffer, Device};

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
    status: &mut Status,
) -> Result<StatsForward> {
    let (d, k) = (state.d, state.k);
    if n == 0 {
        return Err(Error::EmptyBatch);
    }
    check_len("raw features", n * d, raw.len())?;
    feat_suffix(raw, "raw features")?;
    fits_i32(n * d, "N*d")?;
    let bk = step_begin(
        dev,
        labels,
        n,
        state,
        opt.average,
        opt.policy,
        opt.alpha_floor,
        armed,
        status,
    )?;
    super::status::check_finite(dev, raw, status, 1)?;
    let x = match opt.tau {
        Some(t) => Some(tau_normalise(dev, raw, n, d, t)?),
        None => None,
    };
    let stats = class_stats(dev, x.as_ref().unwrap_or(raw), &bk, n, d, k)?;
    let update = moving_update(dev, state, &stats, &bk)?;
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
    let f = forward_deferred(dev, raw, labels, n, state, opt, None, &mut status)?;
    let k = state.k;
    status.read(dev)?.forward_error(k, "raw features")?;
    state.commit(dev, &f.update, &status.buf)?;
    Ok(f)
}

#[cfg(test)]
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
    let mut out = dev.alloc(crate::runtime::DType::F32, f.stats.n * f.stats.d)?;
    backward_into(dev, f, raw, dy, d_mu_extra, dx_extra, &mut out)?;
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
    d_raw: &mut Buffer,
) -> Result<()> {
    let (n, d, k) = (f.stats.n, f.stats.d, f.stats.k);
    check_len("d_raw", n * d, d_raw.len())?;
    let de = frobenius_normalise_backward(dev, &f.y, &f.norm_buf, dy)?;
    let (dc, dmu) = moving_update_backward(dev, &f.update, &de, d_mu_extra, d, k)?;
    if let Some(extra) = dx_extra {
        check_len("dx_extra", n * d, extra.len())?;
    }
    // `dx += dx_extra` (N x d f32).
    let add_extra = |dx: &mut Buffer| -> Result<()> {
        match dx_extra {
            // SAFETY: `dx` and `extra` hold `n d` elements (checked above and by the callee
            // that produced `dx`).
            Some(extra) => unsafe {
                elementwise::add_assign_f32(dev, grid_stride(dev, n * d), dx, extra, (n * d) as i64)
            },
            None => Ok(()),
        }
    };
    match f.tau {
        Some(t) => {
            let mut dx = class_stats_backward(dev, &f.stats, &dc, &dmu)?;
            add_extra(&mut dx)?;
            tau_normalise_backward_into(dev, raw, &dx, n, d, t, d_raw)
        }
        None => {
            // Without `tau` the class statistics' gradient is the result: written in place.
            class_stats_backward_into(dev, &f.stats, &dc, &dmu, d_raw)?;
            add_extra(d_raw)
        }
    }
}
