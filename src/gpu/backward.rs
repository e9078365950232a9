//! The implicit backward on the device (`docs/backward.md`): the tangent-space solve in the
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
use crate::error::Result;
use crate::kernels;
use crate::runtime::{grid_stride, Buffer, DType, Device};

/// `u = D^{-1}(V)` of `docs/backward.md#the-tangent-space-solve` for `V = dL/dP` (d x K f64). A singular Lagrangian
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
    status: &mut Status,
    gate: Option<&Buffer>,
) -> Result<Buffer> {
    let mut vq = dev.alloc_zeros(DType::F64, d * k)?;
    Gemm::new(false, false, d, k, k).run_gated(dev, gk, gate, v, &f.q, &mut vq)?;
    let mut z = dev.alloc_zeros(DType::F64, k * k)?;
    Gemm::new(true, false, k, k, d).run_gated(dev, gk, gate, &f.u, &vq, &mut z)?;
    let mut t = dev.alloc_zeros(DType::F64, k * k)?;
    unsafe {
        kernels::head::backward::tangent_t_f64(
            dev,
            grid_stride(dev, k * k),
            &z,
            &f.s,
            k as i32,
            &mut t,
            &mut status.buf,
        )
    }?;
    let mut w = dev.alloc_zeros(DType::F64, d * k)?;
    Gemm::new(false, false, d, k, k).run_gated(dev, gk, gate, &f.u, &t, &mut w)?;
    unsafe {
        kernels::head::backward::sub_scale_cols_f64(
            dev,
            grid_stride(dev, d * k),
            &mut w,
            &vq,
            &f.s_inv,
            d as i32,
            k as i32,
        )
    }?;
    let mut u = dev.alloc_zeros(DType::F64, d * k)?;
    Gemm::new(false, true, d, k, k).run_gated(dev, gk, gate, &w, &f.q, &mut u)?;
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
    status: &mut Status,
) -> Result<Buffer> {
    let u = tangent_solve(dev, gk, f, dl_dp, d, k, status, None)?;
    let mut dy = dev.alloc_zeros(DType::F32, d * k)?;
    unsafe {
        kernels::head::backward::dy_from_u_f64(
            dev,
            grid_stride(dev, d),
            &u,
            d as i32,
            k as i32,
            crate::core::constants::c_of(k),
            &mut dy,
        )
    }?;
    Ok(dy)
}
