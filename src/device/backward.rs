//! The implicit backward on the device (`method.md` §4): the tangent-space solve in the
//! eigenbasis of `B = sym(P^T G) = Q diag(s) Q^T` (with `U = P Q`), float64.
//!
//! ```text
//! Z = U^T (V Q)                                   gemm, gemm
//! T_ij = (Z_ij s_i + Z_ji s_j) / (s_i + s_j)      tangent_t
//! u = (U T - V Q) diag(1/s) Q^T                   gemm, sub_scale_cols_f64, gemm
//! dL/dY = -c u M                                  dy_from_u (to f32)
//! ```
//!
//! Same algebra as [`crate::cpu::backward::tangent_solve`]; the CPU version is the oracle in
//! the tests.

use super::linalg::{Gemm, GemmKernel};
use super::solve::FactorDev;
use super::status::Status;
use super::{grid_stride, Arg, Buffer, DType, Device};
use crate::error::Result;

/// `u = D^{-1}(V)` of `method.md` §4 for `V = dL/dP` (d x K f64). A singular Lagrangian
/// Hessian is recorded in entry 5 of `status`. `gate`: a device flag that skips the products
/// when nonzero (the Newton polish's stop; the result is then not meaningful and not used).
#[allow(clippy::too_many_arguments)]
pub fn tangent_solve(
    dev: &Device,
    gk: GemmKernel,
    f: &FactorDev,
    v: &Buffer,
    d: usize,
    k: usize,
    status: &Status,
    gate: Option<&Buffer>,
) -> Result<Buffer> {
    let vq = dev.alloc_zeros(DType::F64, d * k)?;
    Gemm::new(false, false, d, k, k).run_gated(dev, gk, gate, v, &f.q, &vq)?;
    let z = dev.alloc_zeros(DType::F64, k * k)?;
    Gemm::new(true, false, k, k, d).run_gated(dev, gk, gate, &f.u, &vq, &z)?;
    let t = dev.alloc_zeros(DType::F64, k * k)?;
    dev.launch(
        "tangent_t",
        grid_stride(dev, k * k),
        &[
            Arg::Buf(&z),
            Arg::Buf(&f.s),
            Arg::I32(k as i32),
            Arg::Buf(&t),
            Arg::Buf(&status.buf),
        ],
    )?;
    let w = dev.alloc_zeros(DType::F64, d * k)?;
    Gemm::new(false, false, d, k, k).run_gated(dev, gk, gate, &f.u, &t, &w)?;
    dev.launch(
        "sub_scale_cols_f64",
        grid_stride(dev, d * k),
        &[
            Arg::Buf(&w),
            Arg::Buf(&vq),
            Arg::Buf(&f.s_inv),
            Arg::I32(d as i32),
            Arg::I32(k as i32),
        ],
    )?;
    let u = dev.alloc_zeros(DType::F64, d * k)?;
    Gemm::new(false, true, d, k, k).run_gated(dev, gk, gate, &w, &f.q, &u)?;
    Ok(u)
}

/// `dL/dY = -c u M` (f32 d x K) from `dL/dP` (f64 d x K): the gradient the statistics
/// stage's backward takes.
#[allow(clippy::too_many_arguments)]
pub fn solve_backward(
    dev: &Device,
    gk: GemmKernel,
    f: &FactorDev,
    dl_dp: &Buffer,
    d: usize,
    k: usize,
    status: &Status,
) -> Result<Buffer> {
    let u = tangent_solve(dev, gk, f, dl_dp, d, k, status, None)?;
    let dy = dev.alloc_zeros(DType::F32, d * k)?;
    dev.launch(
        "dy_from_u",
        grid_stride(dev, d),
        &[
            Arg::Buf(&u),
            Arg::I32(d as i32),
            Arg::I32(k as i32),
            Arg::F64(crate::cpu::solve::c_of(k)),
            Arg::Buf(&dy),
        ],
    )?;
    Ok(dy)
}
