//! Stages 2-4 on the device: moving class means (EMA or cumulative, absent-class policies)
//! and their Frobenius normalisation `Y = E / ||E||_F`, with their backward; the mirror of
//! `cpu::moving`. See `docs/head.md` for the definitions.

use super::shape::block;
use super::stats::{Bookkeeping, ClassStatsDev};
use super::status::Status;
use crate::core::validate::{check_len, fits_i32};
use crate::error::{Error, Result};
use crate::kernels;
use crate::runtime::{grid_stride, Buffer, DType, Device, LaunchConfig};

/// Moving class means state on the device (`docs/head.md#moving-class-means`). The step count and the
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
    /// device, unless `status` (see [`super::status`]) records a forward error, in which
    /// case nothing changes. No host synchronisation.
    pub fn commit(&mut self, dev: &Device, u: &MovingUpdateDev, status: &Buffer) -> Result<()> {
        let (d, k) = (self.d, self.k);
        check_len("E_new", d * k, u.e_new.len())?;
        check_len("seen_new", k, u.seen_new.len())?;
        check_len("weights", 4, u.w.len())?;
        check_len("status", super::status::LEN, status.len())?;
        // SAFETY: `self.e` and `u.e_new` hold `d K`, `self.seen` and `u.seen_new` `K`, `self.scal` 2 and `u.w` 4 (all made for this `d`, `K`; `u` checked above), `status` `LEN`.
        unsafe {
            kernels::head::moving::moving_commit_f32(
                dev,
                LaunchConfig::linear((d * k).max(k).max(1), block(dev)),
                &mut self.e,
                &mut self.seen,
                &mut self.scal,
                &u.e_new,
                &u.seen_new,
                &u.w,
                fits_i32(d, "d")?,
                fits_i32(k, "K")?,
                status,
            )
        }
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
    /// 2 set to `mu` (with gradient), 3 hold (no gradient). See `kernels/head/moving.cu`.
    pub source: Buffer,
    /// `[a, b, alpha_new, t]` (f64): `E_new = a C + b E` on the updated columns.
    pub w: Buffer,
    /// `||E_new||_F` (1 f32).
    pub norm: Buffer,
}

/// One moving-mean update, without touching `state`: `moving_update_norm_f32` (one launch,
/// element-wise over d x K, with the weights and per-class plan that
/// [`super::stats::step_begin`] put on the device) gives `E_new` and `||E_new||_F` (a zero or
/// non-finite norm is recorded in entry 2 of `status`). Commit it with
/// [`MovingStateDev::commit`]. No host synchronisation.
pub fn moving_update(
    dev: &Device,
    state: &MovingStateDev,
    s: &ClassStatsDev,
    bk: &Bookkeeping,
    status: &mut Status,
) -> Result<MovingUpdateDev> {
    let (d, k) = (state.d, state.k);
    check_len("E", d * k, state.e.len())?;
    check_len("centred means", d * k, s.centred.len())?;
    check_len("mu", d, s.mu.len())?;
    check_len("sources", k, bk.source.len())?;
    check_len("seen_new", k, bk.seen_new.len())?;
    check_len("weights", 4, bk.w.len())?;
    if s.d != d || s.k != k {
        return Err(Error::ShapeMismatch {
            what: "moving means (d x K)",
            expected: d * k,
            got: s.d * s.k,
        });
    }
    let (source, w) = (bk.source.share(), bk.w.share());
    let mut e_new = dev.alloc(DType::F32, d * k)?;
    let mut norm = dev.alloc(DType::F32, 1)?;
    let cfg = grid_stride(dev, (d * k).max(1));
    let mut partials = dev.alloc(DType::F64, cfg.grid.0 as usize)?;
    // SAFETY: `state.e`, `s.centred`, `e_new` hold `d K`, `s.mu` `d`, `source` `K`, `w` 4
    // (checked above or allocated here), `partials` one per block of this 1D launch, `norm` 1,
    // the ticket (zero between launches) and the status word from `status`.
    unsafe {
        kernels::head::moving::moving_update_norm_f32(
            dev,
            cfg,
            &state.e,
            &s.centred,
            &s.mu,
            &source,
            fits_i32(d, "d")?,
            fits_i32(k, "K")?,
            &w,
            &mut e_new,
            &mut partials,
            &mut status.ticket,
            &mut norm,
            &mut status.buf,
        )
    }?;
    Ok(MovingUpdateDev {
        e_new,
        seen_new: bk.seen_new.share(),
        source,
        w,
        norm,
    })
}

/// The backward of the Frobenius normalisation, the moving-mean update `u` and the batch mean
/// of `n` rows (the device's `n_total[0]` when given: a data-parallel step's) with class
/// `counts` (`moving_backward_f32`, one launch): from `Y` and `dY`
/// (d x K), `dot = <Y, dY>` (1 f64) and the
/// gradient reaching `mu` by other paths, `d_mu` (d), to `dct` (K x d, the gradient on the
/// centred class means, transposed) and `gm` (d, the per-row share of the batch mean's
/// gradient: `(d_mu_total - sum_{c present} dct[c]) / N`).
#[allow(clippy::too_many_arguments)]
pub fn moving_backward(
    dev: &Device,
    u: &MovingUpdateDev,
    y: &Buffer,
    counts: &Buffer,
    n: usize,
    n_total: Option<&Buffer>,
    dy: &Buffer,
    dot: &Buffer,
    d_mu: &Buffer,
) -> Result<(Buffer, Buffer)> {
    let (d, k) = (d_mu.len(), u.source.len());
    check_len("dY", d * k, dy.len())?;
    check_len("Y", d * k, y.len())?;
    check_len("E_new", d * k, u.e_new.len())?;
    check_len("norm", 1, u.norm.len())?;
    check_len("dot", 1, dot.len())?;
    check_len("sources", k, u.source.len())?;
    check_len("counts", k, counts.len())?;
    check_len("weights", 4, u.w.len())?;
    check_len("d_mu", d, d_mu.len())?;
    if let Some(t) = n_total {
        check_len("N over the ranks", 1, t.len())?;
    }
    let mut dct = dev.alloc(DType::F32, k * d)?;
    let mut gm = dev.alloc(DType::F32, d)?;
    if d > 0 {
        // SAFETY: `dy`, `f.y` hold `d K`, `dct` `K d`, `gm` and `d_mu` `d`, `source` and
        // `counts` `K`, `w` 4, `norm`, `dot` and `n_total` 1 (checked above or allocated here).
        unsafe {
            kernels::head::moving::moving_backward_f32(
                dev,
                // One row group (a warp on a GPU) per feature.
                grid_stride(dev, super::shape::row_lanes(dev) * d),
                dy,
                y,
                &u.norm,
                dot,
                &u.source,
                counts,
                &u.w,
                d_mu,
                fits_i32(n, "N")?,
                n_total,
                fits_i32(d, "d")?,
                fits_i32(k, "K")?,
                &mut dct,
                &mut gm,
                super::shape::row_lanes(dev) as i32,
            )
        }?;
    }
    Ok((dct, gm))
}
