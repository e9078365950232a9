//! The Stiefel manifold `St(d, K) = {P : P^T P = I}` pieces shared by the solve and the
//! backward of both heads: the factorisation a solve leaves (`P`, and the eigenbasis of the
//! Lagrangian Hessian `B = sym(P^T G)`), the tangent-space solve that gives both the implicit
//! backward and the Riemannian Newton step, and the orthogonality measure. See
//! `docs/backward.md` for the derivation.

use faer::{Accum, Mat, MatMut, MatRef};

use crate::dense::gemm;

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

/// Scratch memory of [`tangent_solve_into`] for one `(d, K)`.
#[derive(Debug, Clone)]
pub struct TangentWork {
    /// `d x K`: `-V Q`, then `(U T - V Q) diag(1/s)`.
    w: Mat<f64>,
    /// `K x K`: `Z = U^T V Q`.
    z: Mat<f64>,
    /// `K x K`: `T`.
    t: Mat<f64>,
}

impl TangentWork {
    /// Scratch for `d x K` problems.
    pub fn new(d: usize, k: usize) -> TangentWork {
        TangentWork {
            w: Mat::zeros(d, k),
            z: Mat::zeros(k, k),
            t: Mat::zeros(k, k),
        }
    }

    /// Whether this scratch fits `d x K` problems.
    pub fn fits(&self, d: usize, k: usize) -> bool {
        self.w.nrows() == d && self.w.ncols() == k
    }
}

/// The tangent-space solve: `u` with `sym(P^T u) = 0` and `Proj_T(u B) = -Proj_T(v)`.
pub fn tangent_solve(f: &Factor, v: MatRef<'_, f64>) -> Result<Mat<f64>> {
    let (d, k) = (f.p.nrows(), f.s.len());
    let mut out = Mat::zeros(d, k);
    tangent_solve_into(f, v, out.as_mut(), &mut TangentWork::new(d, k))?;
    Ok(out)
}

/// An error unless `m` is `rows x cols`.
fn shape(what: &'static str, m: (usize, usize), rows: usize, cols: usize) -> Result<()> {
    if m != (rows, cols) {
        return Err(Error::ShapeMismatch {
            what,
            expected: rows * cols,
            got: m.0 * m.1,
        });
    }
    Ok(())
}

/// An error unless the factor's parts and `v` are consistent `d x K` / `K x K` shapes.
fn check_factor(f: &Factor, v: (usize, usize)) -> Result<()> {
    let (d, k) = (f.p.nrows(), f.s.len());
    shape("P", (f.p.nrows(), f.p.ncols()), d, k)?;
    shape("U", (f.u.nrows(), f.u.ncols()), d, k)?;
    shape("Q", (f.q.nrows(), f.q.ncols()), k, k)?;
    shape("V", v, d, k)
}

/// [`tangent_solve`] into `out` (`d x K`) with caller-held scratch: four `d x K x K`
/// products and `O(K^2)` work, no allocation.
///
/// ```text
/// Z = U^T V Q,   T_ij = (Z_ij s_i + Z_ji s_j) / (s_i + s_j),   u = (U T - V Q) diag(1/s) Q^T
/// ```
///
/// Shapes that differ from the factor's `d x K` (of `v`, `out`, the factor's own parts, or
/// `work`) are an [`Error::ShapeMismatch`].
pub fn tangent_solve_into(
    f: &Factor,
    v: MatRef<'_, f64>,
    out: MatMut<'_, f64>,
    work: &mut TangentWork,
) -> Result<()> {
    let (d, k) = (f.p.nrows(), f.s.len());
    check_factor(f, (v.nrows(), v.ncols()))?;
    shape("out", (out.nrows(), out.ncols()), d, k)?;
    if !work.fits(d, k) {
        shape("TangentWork", (work.w.nrows(), work.w.ncols()), d, k)?;
    }
    let scale = f.s.iter().fold(0.0f64, |m, x| m.max(x.abs()));
    for j in 0..k {
        for i in 0..=j {
            let den = f.s[i] + f.s[j];
            if !(den.abs() > 1e-300 && den.abs() > 1e-15 * scale) {
                return Err(Error::Numerical {
                    what: "singular Lagrangian Hessian (s_i + s_j = 0) in the implicit backward",
                });
            }
        }
    }
    let TangentWork { w, z, t } = work;
    // w = -V Q; Z = U^T V Q = -U^T w.
    gemm(w.as_mut(), Accum::Replace, v, f.q.as_ref(), -1.0);
    gemm(
        z.as_mut(),
        Accum::Replace,
        f.u.transpose(),
        w.as_ref(),
        -1.0,
    );
    for j in 0..k {
        for i in 0..k {
            t[(i, j)] = (z[(i, j)] * f.s[i] + z[(j, i)] * f.s[j]) / (f.s[i] + f.s[j]);
        }
    }
    // w = (U T - V Q) diag(1/s); out = w Q^T.
    gemm(w.as_mut(), Accum::Add, f.u.as_ref(), t.as_ref(), 1.0);
    for (j, sj) in f.s.iter().enumerate() {
        let inv = 1.0 / sj;
        w.col_mut(j).iter_mut().for_each(|x| *x *= inv);
    }
    gemm(out, Accum::Replace, w.as_ref(), f.q.transpose(), 1.0);
    Ok(())
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
