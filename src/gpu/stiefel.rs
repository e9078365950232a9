//! The Stiefel-manifold pieces on the device, shared by the solve (its Newton polish) and the
//! backward, the mirror of [`crate::stiefel`]: the factor a solve leaves, and the
//! tangent-space solve `u = D^{-1}(V)` in the eigenbasis of `B = sym(P^T G)`
//! (`docs/backward.md#the-tangent-space-solve`), float64.
//!
//! ```text
//! Z = U^T (V Q)                                   gemm, gemm
//! T_ij = (Z_ij s_i + Z_ji s_j) / (s_i + s_j)      tangent_t_f64
//! u = (U T - V Q) (Q diag(1/s))^T                 gemm (beta = -1, in place), gemm
//! ```

use super::linalg::{Gemm, GemmKernel};
use super::status::Status;
use crate::core::validate::check_len;
use crate::cpu::linalg::to_row_major;
use crate::error::Result;
use crate::kernels;
use crate::runtime::{grid_stride, Buffer, DType, Device};
use crate::stiefel::Factor;
use faer::MatRef;

/// `P`, its factorisation `B = sym(P^T G) = Q diag(s) Q^T` with `U = P Q`, and `G`, on the
/// device (all f64, row-major: `p`, `u`, `g` d x K; `q` K x K; `s`, `s_inv` K).
#[derive(Debug)]
pub struct FactorDev {
    /// `P`.
    pub p: Buffer,
    /// `U = P Q`.
    pub u: Buffer,
    /// Eigenvectors of `B` (columns).
    pub q: Buffer,
    /// Eigenvalues of `B` (the singular values of `G`), unsorted.
    pub s: Buffer,
    /// `1 / s`.
    pub s_inv: Buffer,
    /// `Q diag(1/s)` (K x K): `U = G Q diag(1/s)` and the backward's last product use it.
    pub vs: Buffer,
    /// `max |s|` (1 f64): the scale of the backward's singularity test.
    pub s_max: Buffer,
    /// `G = c Y M + delta Prox`.
    pub g: Buffer,
    /// Jacobi sweeps used by the last eigensolve, and 1 when a refined solve fell back to
    /// the plain warm Jacobi (i32, 2).
    pub sweeps: Buffer,
    /// Newton polish counters (i32, 2): steps taken, stopping checks made. Written only by
    /// the polish (unspecified when it is off).
    pub newton: Buffer,
}

impl FactorDev {
    /// Checks every buffer's length for a `d x K` problem (the sizes the kernels are given).
    pub fn check(&self, d: usize, k: usize) -> Result<()> {
        for (what, b, len) in [
            ("factor P", &self.p, d * k),
            ("factor U", &self.u, d * k),
            ("factor G", &self.g, d * k),
            ("factor Q", &self.q, k * k),
            ("factor s", &self.s, k),
            ("factor 1/s", &self.s_inv, k),
            ("factor Q diag(1/s)", &self.vs, k * k),
            ("factor max |s|", &self.s_max, 1),
            ("factor sweeps", &self.sweeps, 2),
            ("factor newton", &self.newton, 2),
        ] {
            check_len(what, len, b.len())?;
        }
        Ok(())
    }

    /// Uploads a CPU factor (the first step's, solved on the host) with its `G`.
    pub fn upload(dev: &Device, f: &Factor, g: MatRef<'_, f64>) -> Result<FactorDev> {
        let inv: Vec<f64> = f.s.iter().map(|v| 1.0 / v).collect();
        let q = to_row_major::<f64>(f.q.as_ref());
        let k = f.s.len();
        let vs: Vec<f64> = q.iter().enumerate().map(|(e, v)| v * inv[e % k]).collect();
        let s_max = f.s.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        Ok(FactorDev {
            p: dev.upload(&to_row_major::<f64>(f.p.as_ref()))?,
            u: dev.upload(&to_row_major::<f64>(f.u.as_ref()))?,
            q: dev.upload(&q)?,
            s: dev.upload(&f.s)?,
            s_inv: dev.upload(&inv)?,
            vs: dev.upload(&vs)?,
            s_max: dev.upload(&[s_max])?,
            g: dev.upload(&to_row_major::<f64>(g))?,
            sweeps: dev.upload(&[0i32; 2])?,
            newton: dev.upload(&[0i32; 2])?,
        })
    }
}

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
    f.check(d, k)?;
    check_len("V", d * k, v.len())?;
    // `vq <- V Q`, then `vq <- U T - vq` in place, then `u = vq (Q diag(1/s))^T`.
    let mut vq = dev.alloc(DType::F64, d * k)?;
    Gemm::new(false, false, d, k, k).run_gated(dev, gk, gate, v, &f.q, &mut vq)?;
    let mut z = dev.alloc(DType::F64, k * k)?;
    Gemm::new(true, false, k, k, d).run_gated(dev, gk, gate, &f.u, &vq, &mut z)?;
    let mut t = dev.alloc(DType::F64, k * k)?;
    // SAFETY: `z`, `t` hold `K K` (allocated here), `f.s` `K` and `f.s_max` 1 (checked above),
    // the status word `LEN`.
    unsafe {
        kernels::head::backward::tangent_t_f64(
            dev,
            grid_stride(dev, k * k),
            &z,
            &f.s,
            &f.s_max,
            k as i32,
            &mut t,
            &mut status.buf,
        )
    }?;
    let mut ut = Gemm::new(false, false, d, k, k);
    ut.beta = -1.0;
    ut.run_gated(dev, gk, gate, &f.u, &t, &mut vq)?;
    let mut u = dev.alloc(DType::F64, d * k)?;
    Gemm::new(false, true, d, k, k).run_gated(dev, gk, gate, &vq, &f.vs, &mut u)?;
    Ok(u)
}
