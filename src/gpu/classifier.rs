//! The classifier stage on the device (`docs/head.md#the-classifier-and-logits`), f32 with f64 `V`:
//!
//! ```text
//! W = sqrt(K/(K-1)) (P M)^T (K x d)    b = -W mu (with the logits pre-filled with it)
//! logits = X W^T + b (one product, beta = 1)
//! backward: db = 1^T dZ,  dW = dZ^T X - db mu^T,  V = dL/dP = a dW^T M (f64),
//!           dX = dZ W (direct path),  dmu = -W^T db (bias path)
//! ```

use super::linalg::{Gemm, GemmKernel};
use super::status::Status;
use crate::collective::Collective;
use crate::core::validate::{check_len, fits_u32};
use crate::error::Result;
use crate::kernels;
use crate::runtime::{grid_stride, Buffer, DType, Device};

/// `sqrt(K / (K - 1))`.
fn scale(k: usize) -> f64 {
    crate::cpu::classifier::scale_of(k)
}

/// `W` (K x d f32) from `P` (d x K f64).
pub fn weights(dev: &Device, p: &Buffer, d: usize, k: usize) -> Result<Buffer> {
    check_len("P", d * k, p.len())?;
    let mut w = dev.alloc(DType::F32, k * d)?;
    // SAFETY: `p` holds `d K` (checked above), `w` `K d` (allocated here).
    unsafe {
        kernels::head::classifier::weights_from_p_f64(
            dev,
            // One row group (a warp on a GPU) per feature.
            grid_stride(dev, super::shape::row_lanes(dev) * d.max(1)),
            p,
            d as i32,
            k as i32,
            scale(k),
            &mut w,
            super::shape::row_lanes(dev) as i32,
        )
    }?;
    Ok(w)
}

/// `(logits (N x K), b (K))` from `x` (N x d f32), `W` (K x d) and `mu` (d).
#[allow(clippy::too_many_arguments)]
pub fn logits(
    dev: &Device,
    gk: GemmKernel,
    x: &Buffer,
    w: &Buffer,
    mu: &Buffer,
    n: usize,
    d: usize,
    k: usize,
) -> Result<(Buffer, Buffer)> {
    let mut z = dev.alloc(DType::F32, n * k)?;
    let b = logits_into(dev, gk, x, w, mu, n, d, k, &mut z)?;
    Ok((z, b))
}

/// [`logits`] into an existing `z` (N x K f32, overwritten); returns `b` (K).
#[allow(clippy::too_many_arguments)]
pub fn logits_into(
    dev: &Device,
    gk: GemmKernel,
    x: &Buffer,
    w: &Buffer,
    mu: &Buffer,
    n: usize,
    d: usize,
    k: usize,
    z: &mut Buffer,
) -> Result<Buffer> {
    check_len("x", n * d, x.len())?;
    check_len("W", k * d, w.len())?;
    check_len("mu", d, mu.len())?;
    check_len("logits", n * k, z.len())?;
    let mut b = dev.alloc(DType::F32, k)?;
    // SAFETY: `w` holds `K d`, `mu` `d`, `z` `N K` (checked above), `b` `K` (allocated here);
    // one block per class.
    unsafe {
        kernels::head::classifier::bias_prefill_f32(
            dev,
            crate::runtime::LaunchConfig::new(
                (fits_u32(k, "K")?, 1, 1),
                (super::shape::block(dev), 1, 1),
            ),
            w,
            mu,
            k as i32,
            d as i32,
            n as i32,
            &mut b,
            z,
        )
    }?;
    // logits = X W^T + (the bias rows already in z).
    let mut g = Gemm::new(false, true, n, k, d);
    g.beta = 1.0;
    g.run(dev, gk, x, w, z)?;
    Ok(b)
}

/// What the classifier's backward gives.
#[derive(Debug)]
pub struct ClassifierGradsDev {
    /// Direct path `dZ W` (N x d f32).
    pub dx: Buffer,
    /// `dL/dP` (d x K f64).
    pub dp: Buffer,
    /// Bias path `-W^T db` (d f32).
    pub dmu: Buffer,
}

/// Backward of [`weights`] and [`logits`] from `dz = dL/dlogits` (N x K f32). A non-finite
/// `dz` entry is recorded in entry 4 of `status` (its first flat index). With a collective,
/// `dW^T` and `db` are summed over the ranks ([`super::collective::reduce_grads`]) before
/// `dL/dP` and the bias path are formed from them.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    dev: &Device,
    gk: GemmKernel,
    x: &Buffer,
    dz: &Buffer,
    w: &Buffer,
    mu: &Buffer,
    n: usize,
    d: usize,
    k: usize,
    coll: Option<&Collective>,
    status: &mut Status,
) -> Result<ClassifierGradsDev> {
    check_len("x", n * d, x.len())?;
    check_len("dL/dlogits", n * k, dz.len())?;
    check_len("W", k * d, w.len())?;
    check_len("mu", d, mu.len())?;
    let mut db = dev.alloc(DType::F32, k)?;
    // SAFETY: `dz` holds `N K` (checked above), `db` `K` (allocated here), the status word
    // `LEN` (entry 4 is the backward's first non-finite `d_logits` index).
    unsafe {
        kernels::head::classifier::dlogits_prep_f32(
            dev,
            grid_stride(dev, k),
            dz,
            n as i32,
            k as i32,
            1.0,
            &mut db,
            &mut status.buf,
            4,
        )
    }?;
    // With a collective, `dW^T` is the front of the buffer the ranks sum.
    let mut packed = match coll {
        Some(_) => Some(dev.alloc(DType::F32, super::collective::backward_len(d, k))?),
        None => None,
    };
    let mut dwt = match &packed {
        Some(p) => p.prefix(k * d),
        None => dev.alloc(DType::F32, k * d)?,
    };
    Gemm::new(true, false, k, d, n).run(dev, gk, dz, x, &mut dwt)?;
    if let (Some(c), Some(p)) = (coll, packed.as_mut()) {
        super::collective::reduce_grads(dev, c, p, &mut db, d, k, status)?;
    }
    let mut dp = dev.alloc(DType::F64, d * k)?;
    let mut dmu = dev.alloc(DType::F32, d)?;
    // SAFETY: `dwt` holds `K d`, `db` `K`, `dp` `d K`, `dmu` `d` (allocated here), `mu` `d`
    // and `w` `K d` (checked above).
    unsafe {
        kernels::head::classifier::weights_backward_dmu_f32(
            dev,
            grid_stride(dev, d),
            &dwt,
            &db,
            mu,
            w,
            k as i32,
            d as i32,
            scale(k),
            &mut dp,
            &mut dmu,
        )
    }?;
    let mut dx = dev.alloc(DType::F32, n * d)?;
    Gemm::new(false, false, n, d, k).run(dev, gk, dz, w, &mut dx)?;
    Ok(ClassifierGradsDev { dx, dp, dmu })
}

/// Column means of `x` (N x d f32): the batch mean `mu` (inference).
pub fn col_means(dev: &Device, x: &Buffer, n: usize, d: usize) -> Result<Buffer> {
    check_len("x", n * d, x.len())?;
    let mut mu = dev.alloc(DType::F32, d)?;
    // SAFETY: the input holds `rows x cols` as checked above, the output `cols` (allocated here).
    unsafe {
        kernels::head::classifier::col_sums_f32(
            dev,
            grid_stride(dev, d),
            x,
            n as i32,
            d as i32,
            1.0 / n as f32,
            &mut mu,
        )
    }?;
    Ok(mu)
}
