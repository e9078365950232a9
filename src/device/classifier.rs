//! The classifier stage on the device (`method.md` §2 step 6), f32 with f64 `V`:
//!
//! ```text
//! W = sqrt(K/(K-1)) (P M)^T (K x d)    b = -W mu     logits = X W^T + b
//! backward: db = 1^T dZ,  dW = dZ^T X - db mu^T,  V = dL/dP = a dW^T M (f64),
//!           dX = dZ W (direct path),  dmu = -W^T db (bias path)
//! ```

use super::linalg::{Gemm, GemmKernel};
use super::{grid_stride, Arg, Buffer, DType, Device};
use crate::error::Result;

/// `sqrt(K / (K - 1))`.
fn scale(k: usize) -> f64 {
    crate::cpu::classifier::scale_of(k)
}

/// `W` (K x d f32) from `P` (d x K f64).
pub fn weights(dev: &Device, p: &Buffer, d: usize, k: usize) -> Result<Buffer> {
    let w = dev.alloc_zeros(DType::F32, k * d)?;
    dev.launch(
        "weights_from_p",
        grid_stride(dev, d),
        &[
            Arg::Buf(p),
            Arg::I32(d as i32),
            Arg::I32(k as i32),
            Arg::F64(scale(k)),
            Arg::Buf(&w),
        ],
    )?;
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
    let z = dev.alloc_zeros(DType::F32, n * k)?;
    let b = logits_into(dev, gk, x, w, mu, n, d, k, &z)?;
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
    z: &Buffer,
) -> Result<Buffer> {
    let b = dev.alloc_zeros(DType::F32, k)?;
    dev.launch(
        "bias_from_w",
        grid_stride(dev, k),
        &[
            Arg::Buf(w),
            Arg::Buf(mu),
            Arg::I32(k as i32),
            Arg::I32(d as i32),
            Arg::Buf(&b),
        ],
    )?;
    Gemm::new(false, true, n, k, d).run(dev, gk, x, w, z)?;
    dev.launch(
        "add_bias_rows",
        grid_stride(dev, n * k),
        &[
            Arg::Buf(z),
            Arg::Buf(&b),
            Arg::I32(n as i32),
            Arg::I32(k as i32),
        ],
    )?;
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

/// Backward of [`weights`] and [`logits`] from `dz = dL/dlogits` (N x K f32).
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
) -> Result<ClassifierGradsDev> {
    let db = dev.alloc_zeros(DType::F32, k)?;
    dev.launch(
        "col_sums_f32",
        grid_stride(dev, k),
        &[
            Arg::Buf(dz),
            Arg::I32(n as i32),
            Arg::I32(k as i32),
            Arg::F32(1.0),
            Arg::Buf(&db),
        ],
    )?;
    let dwt = dev.alloc_zeros(DType::F32, k * d)?;
    Gemm::new(true, false, k, d, n).run(dev, gk, dz, x, &dwt)?;
    let dp = dev.alloc_zeros(DType::F64, d * k)?;
    dev.launch(
        "weights_backward",
        grid_stride(dev, d),
        &[
            Arg::Buf(&dwt),
            Arg::Buf(&db),
            Arg::Buf(mu),
            Arg::I32(k as i32),
            Arg::I32(d as i32),
            Arg::F64(scale(k)),
            Arg::Buf(&dp),
        ],
    )?;
    let dx = dev.alloc_zeros(DType::F32, n * d)?;
    Gemm::new(false, false, n, d, k).run(dev, gk, dz, w, &dx)?;
    let dmu = dev.alloc_zeros(DType::F32, d)?;
    dev.launch(
        "dmu_bias",
        grid_stride(dev, d),
        &[
            Arg::Buf(w),
            Arg::Buf(&db),
            Arg::I32(k as i32),
            Arg::I32(d as i32),
            Arg::Buf(&dmu),
        ],
    )?;
    Ok(ClassifierGradsDev { dx, dp, dmu })
}

/// Column means of `x` (N x d f32): the batch mean `mu` (inference).
pub fn col_means(dev: &Device, x: &Buffer, n: usize, d: usize) -> Result<Buffer> {
    let mu = dev.alloc_zeros(DType::F32, d)?;
    dev.launch(
        "col_sums_f32",
        grid_stride(dev, d),
        &[
            Arg::Buf(x),
            Arg::I32(n as i32),
            Arg::I32(d as i32),
            Arg::F32(1.0 / n as f32),
            Arg::Buf(&mu),
        ],
    )?;
    Ok(mu)
}

/// `raw` (N x d, f32/f16/bf16) as f32: a copy for f32, widened otherwise.
pub fn to_f32(dev: &Device, raw: &Buffer) -> Result<Buffer> {
    let name = match raw.dtype() {
        DType::F32 => return dev.copy(raw),
        DType::F16 => "widen_f16",
        DType::BF16 => "widen_bf16",
        other => {
            return Err(crate::error::Error::InvalidParameter {
                name: "raw features",
                reason: format!("features must be f32, f16 or bf16, got {other:?}"),
            })
        }
    };
    let x = dev.alloc_zeros(DType::F32, raw.len())?;
    dev.launch(
        name,
        grid_stride(dev, raw.len()),
        &[Arg::Buf(raw), Arg::I64(raw.len() as i64), Arg::Buf(&x)],
    )?;
    Ok(x)
}
