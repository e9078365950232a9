//! Stage 4: the implicit backward of the ETF solve (`docs/backward.md`).
//!
//! Given `V = dL/dP`, the DDN formula for equality constraints (Gould et al., Prop. 4.5)
//! reduces to the unique tangent vector `u` (`sym(P^T u) = 0`) with `Proj_T(u B) = -Proj_T(V)`,
//! `B = sym(P^T G)` the Lagrangian Hessian on St(d,K). Writing `u = (-V + P S) B^{-1}` with
//! `S` symmetric, tangency gives a Lyapunov equation that is diagonal in the eigenbasis
//! `B = Q diag(s) Q^T`. With `U = P Q`:
//!
//! ```text
//! Z    = U^T V Q                                  (K x K)
//! T_ij = (Z_ij s_i + Z_ji s_j) / (s_i + s_j)
//! u    = (U T - V Q) diag(1/s) Q^T
//! dL/dY = -c u M,   dL/dProx = -delta u
//! ```
//!
//! Cost `O(d K^2 + K^3)` against the reference's dense `O(K^6)` solve. The formula is exact
//! for any `P` on the manifold (not only the optimum), as long as `s_i + s_j != 0`; the same
//! solve gives the Riemannian Newton step of the forward.

use faer::{Mat, MatRef};

use crate::core::constants::c_of;
use crate::cpu::linalg::center_rows;
use crate::error::Result;
use crate::stiefel::{tangent_solve, Factor};

/// Gradients of the solve's inputs.
#[derive(Debug, Clone)]
pub struct SolveGrads {
    /// `dL/dY` (`d x K`).
    pub dy: Mat<f64>,
    /// `dL/dProx` (`d x K`), `-delta u`.
    pub dprox: Mat<f64>,
}

/// Backward of the ETF solve: from `dL/dP` to `dL/dY` and `dL/dProx`.
pub fn solve_backward(f: &Factor, dl_dp: MatRef<'_, f64>, delta: f64) -> Result<SolveGrads> {
    crate::cpu::solve::same_shape("dL/dP", dl_dp, f.p.as_ref())?;
    let k = f.s.len();
    let u = tangent_solve(f, dl_dp)?;
    let mut dy = u.clone();
    center_rows(&mut dy);
    dy *= faer::Scale(-c_of(k));
    let mut dprox = u;
    dprox *= faer::Scale(-delta);
    Ok(SolveGrads { dy, dprox })
}
