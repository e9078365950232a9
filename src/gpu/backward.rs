//! The implicit backward on the device (`docs/backward.md`): the tangent-space solve in the
//! eigenbasis of `B = sym(P^T G) = Q diag(s) Q^T` (with `U = P Q`), float64.
//!
//! ```text
//! Z = U^T (V Q)                                   gemm, gemm
//! T_ij = (Z_ij s_i + Z_ji s_j) / (s_i + s_j)      tangent_t
//! u = (U T - V Q) (Q diag(1/s))^T                 gemm (beta = -1), gemm
//! dL/dY = -c u M                                  dy_from_u (to f32)
//! ```
//!
//! Same algebra as [`crate::cpu::backward::tangent_solve`]; the CPU version is the oracle in
//! the tests.

use super::linalg::GemmKernel;
use super::status::Status;
use super::stiefel::{tangent_solve, FactorDev};
use crate::core::validate::check_len;
use crate::error::Result;
use crate::kernels;
use crate::runtime::{grid_stride, Buffer, DType, Device};

/// `dL/dY = -c u M` (f32 d x K) from `dL/dP` (f64 d x K), and `<Y, dL/dY>` (1 f64, the
/// Frobenius normalisation's backward needs it; a deterministic multi-block sum in the same
/// launch): what the statistics stage's backward takes.
#[allow(clippy::too_many_arguments)]
pub fn solve_backward(
    dev: &Device,
    gk: GemmKernel,
    f: &FactorDev,
    y: &Buffer,
    dl_dp: &Buffer,
    d: usize,
    k: usize,
    status: &mut Status,
) -> Result<(Buffer, Buffer)> {
    check_len("Y", d * k, y.len())?;
    let u = tangent_solve(dev, gk, f, dl_dp, d, k, status, None)?;
    let mut dy = dev.alloc(DType::F32, d * k)?;
    let mut dot = dev.alloc(DType::F64, 1)?;
    // One row group (a warp on a GPU) per row.
    let cfg = grid_stride(dev, super::shape::row_lanes(dev) * d.max(1));
    let mut partials = dev.alloc(DType::F64, cfg.grid.0 as usize)?;
    // SAFETY: `u` holds `d K` f64 (the tangent solve's output), `y` `d K` f32 (checked above),
    // `dy` `d K`, `dot` 1 and `partials` one per block of this 1D launch (allocated here), the
    // ticket (zero between launches).
    unsafe {
        kernels::head::backward::dy_from_u_f64(
            dev,
            cfg,
            &u,
            y,
            d as i32,
            k as i32,
            crate::core::constants::c_of(k),
            &mut dy,
            &mut partials,
            &mut status.ticket,
            &mut dot,
            super::shape::row_lanes(dev) as i32,
        )
    }?;
    Ok((dy, dot))
}
