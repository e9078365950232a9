//! The Stiefel manifold `St(d, K) = {P : P^T P = I}` pieces shared by the solve and the
//! backward of both heads: the factorisation a solve leaves (`P`, and the eigenbasis of the
//! Lagrangian Hessian `B = sym(P^T G)`), the tangent-space solve that gives both the implicit
//! backward and the Riemannian Newton step, and the orthogonality measure. See
//! `docs/backward.md` for the derivation.

use faer::{Mat, MatRef};

use crate::error::{Error, Result};

/// The factorisation a solve leaves for the backward: `P`, and `B = sym(P^T G) = Q diag(s) Q^T`
/// with `U = P Q`.
#[derive(Debug, Clone)]
pub struct Factor {
    /// The solution `P` (`d x K`).
    pub p: Mat<f64>,
    /// `U = P Q` (`d x K`).
    pub u: Mat<f64>,
    /// Eigenvectors of `B` (`K x K`).
    pub q: Mat<f64>,
    /// Eigenvalues of `B` (ascending).
    pub s: Vec<f64>,
}

/// The tangent-space solve: `u` with `sym(P^T u) = 0` and `Proj_T(u B) = -Proj_T(v)`.
pub fn tangent_solve(f: &Factor, v: MatRef<'_, f64>) -> Result<Mat<f64>> {
    let k = f.s.len();
    let vq = v * f.q.as_ref();
    let z = f.u.transpose() * vq.as_ref();
    let scale = f.s.iter().fold(0.0f64, |m, x| m.max(x.abs()));
    let mut t = Mat::zeros(k, k);
    for j in 0..k {
        for i in 0..k {
            let den = f.s[i] + f.s[j];
            if !(den.abs() > 1e-300 && den.abs() > 1e-15 * scale) {
                return Err(Error::Numerical {
                    what: "singular Lagrangian Hessian (s_i + s_j = 0) in the implicit backward",
                });
            }
            t[(i, j)] = (z[(i, j)] * f.s[i] + z[(j, i)] * f.s[j]) / den;
        }
    }
    let mut w = f.u.as_ref() * t.as_ref() - vq;
    for (j, sj) in f.s.iter().enumerate() {
        let inv = 1.0 / sj;
        for i in 0..w.nrows() {
            w[(i, j)] *= inv;
        }
    }
    Ok(w.as_ref() * f.q.transpose())
}

/// `max |a^T a - I|` for a `d x K` matrix with orthonormal columns expected.
pub fn orthogonality_error(a: MatRef<'_, f64>) -> f64 {
    let g = a.transpose() * a;
    let mut m = 0.0f64;
    for i in 0..g.nrows() {
        for j in 0..g.ncols() {
            let t = if i == j { 1.0 } else { 0.0 };
            m = m.max((g[(i, j)] - t).abs());
        }
    }
    m
}
