//! Stages 2-4 on the device: moving class means (EMA or cumulative, absent-class policies)
//! and their Frobenius normalisation `Y = E / ||E||_F`, with their backward; the mirror of
//! `cpu::moving`. See `docs/head.md` for the definitions.

use super::shape::{block, single_block};
use super::stats::{Bookkeeping, ClassStatsDev};
use super::status::Status;
use crate::core::validate::{check_len, fits_i32};
use crate::error::{Error, Result};
use crate::kernels;
use crate::runtime::{Buffer, DType, Device, LaunchConfig};

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
}

/// One moving-mean update, without touching `state`: `moving_update` (element-wise over
/// d x K) with the weights and per-class plan that [`super::stats::step_begin`] put on the
/// device. Commit it with [`MovingStateDev::commit`]. No host synchronisation.
pub fn moving_update(
    dev: &Device,
    state: &MovingStateDev,
    s: &ClassStatsDev,
    bk: &Bookkeeping,
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
    if d * k > 0 {
        // SAFETY: `state.e`, `s.centred` and `e_new` hold `d K`, `s.mu` `d`, `source` `K`, `w` 4 (checked above / allocated here).
        unsafe {
            kernels::head::moving::moving_update_f32(
                dev,
                LaunchConfig::linear(d * k, block(dev)),
                &state.e,
                &s.centred,
                &s.mu,
                &source,
                fits_i32(d, "d")?,
                fits_i32(k, "K")?,
                &w,
                &mut e_new,
            )
        }?;
    }
    Ok(MovingUpdateDev {
        e_new,
        seen_new: bk.seen_new.share(),
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
    check_len("sources", k, u.source.len())?;
    check_len("weights", 4, u.w.len())?;
    check_len("d_e_new", d * k, d_e_new.len())?;
    let mut d_centred = dev.alloc(DType::F32, d * k)?;
    let mut d_mu = match d_mu_in {
        Some(m) => {
            check_len("d_mu", d, m.len())?;
            dev.copy(m)?
        }
        None => dev.alloc(DType::F32, d)?,
    };
    if d > 0 {
        // SAFETY: `d_e_new` holds `d K`, `d_mu` `d` (checked above), `u.source` `K`, `u.w` 4, `d_centred` `d K` (allocated here).
        unsafe {
            kernels::head::moving::moving_update_backward_f32(
                dev,
                LaunchConfig::linear(d, block(dev)),
                d_e_new,
                &u.source,
                fits_i32(d, "d")?,
                fits_i32(k, "K")?,
                &u.w,
                i32::from(d_mu_in.is_some()),
                &mut d_centred,
                &mut d_mu,
            )
        }?;
    }
    Ok((d_centred, d_mu))
}

#[cfg(test)]
/// `Y = E / ||E||_F`. Returns `(Y, norm buffer (1 f32), norm)`; [`Error::DegenerateMeans`] if
/// the norm is zero.
pub fn frobenius_normalise(dev: &Device, e: &Buffer) -> Result<(Buffer, Buffer, f32)> {
    let mut status = Status::new(dev)?;
    let (y, norm) = frobenius_normalise_deferred(dev, e, &mut status)?;
    status.read(dev)?.forward_error(1, "E")?;
    let nv = dev.download::<f32>(&norm)?[0];
    Ok((y, norm, nv))
}

/// Deferred [`frobenius_normalise`]: `(Y, norm buffer)`; a zero or non-finite norm is
/// recorded in entry 2 of the step status word instead of returned. No host synchronisation.
pub fn frobenius_normalise_deferred(
    dev: &Device,
    e: &Buffer,
    status: &mut Status,
) -> Result<(Buffer, Buffer)> {
    let len = e.len();
    let li = fits_i32(len, "d*K")?;
    let mut norm = dev.alloc(DType::F32, 1)?;
    // SAFETY: `e` holds `len` f32 (its length), `norm` one.
    unsafe {
        kernels::head::normalise::norm_single_block_f32(
            dev,
            LaunchConfig::new((1, 1, 1), (single_block(dev), 1, 1)),
            e,
            li,
            &mut norm,
        )
    }?;
    // SAFETY: `norm` holds 1 f32 (allocated here), the status word `LEN`.
    unsafe {
        kernels::head::status::norm_check_f32(
            dev,
            LaunchConfig::new((1, 1, 1), (32, 1, 1)),
            &norm,
            &mut status.buf,
        )
    }?;
    let mut y = dev.alloc(DType::F32, len)?;
    // SAFETY: `e` and `y` hold `len` f32 (`y` allocated here), `norm` 1.
    unsafe {
        kernels::head::normalise::frobenius_scale_f32(
            dev,
            LaunchConfig::linear(len, block(dev)),
            e,
            &norm,
            li,
            &mut y,
        )
    }?;
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
    check_len("dY", len, dy.len())?;
    check_len("norm", 1, norm.len())?;
    let li = fits_i32(len, "d*K")?;
    let mut dot = dev.alloc(DType::F32, 1)?;
    // SAFETY: `y` and `dy` hold `len` f32 (checked above), `dot` 1 (allocated here); one block.
    unsafe {
        kernels::head::normalise::dot_single_block_f32(
            dev,
            LaunchConfig::new((1, 1, 1), (single_block(dev), 1, 1)),
            y,
            dy,
            li,
            &mut dot,
        )
    }?;
    let mut de = dev.alloc(DType::F32, len)?;
    // SAFETY: `y`, `dy` and `de` hold `len` f32 (checked above / allocated here), `norm` and `dot` 1.
    unsafe {
        kernels::head::normalise::frobenius_normalise_backward_f32(
            dev,
            LaunchConfig::linear(len, block(dev)),
            y,
            dy,
            norm,
            &dot,
            li,
            &mut de,
        )
    }?;
    Ok(de)
}
