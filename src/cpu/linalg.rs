//! Small dense helpers over `faer` used by the solve and the backward (all `f64`).

use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, MatMut, MatRef, Side};

use crate::error::{Error, Result};

use crate::dense::PAR_MIN_WORK;

/// The parallelism for an `m x k` by `k x n` product: faer's global setting for large
/// products, sequential for small ones.
#[inline]
pub(crate) fn par(m: usize, k: usize, n: usize) -> faer::Par {
    if m.saturating_mul(k).saturating_mul(n) < PAR_MIN_WORK {
        faer::Par::Seq
    } else {
        faer::get_global_parallelism()
    }
}

/// Row-major slice -> owned column-major matrix (converted to `f64`).
pub(crate) fn from_row_major<T: crate::Real>(s: &[T], rows: usize, cols: usize) -> Mat<f64> {
    Mat::from_fn(rows, cols, |i, j| s[i * cols + j].to_f64())
}

/// Owned matrix -> row-major `Vec<T>`.
pub(crate) fn to_row_major<T: crate::Real>(m: MatRef<'_, f64>) -> Vec<T> {
    let (r, c) = (m.nrows(), m.ncols());
    let mut out = Vec::with_capacity(r * c);
    for i in 0..r {
        for j in 0..c {
            out.push(T::from_f64(m[(i, j)]));
        }
    }
    out
}

/// `a^T b`.
pub(crate) fn atb(a: MatRef<'_, f64>, b: MatRef<'_, f64>) -> Mat<f64> {
    let mut out = Mat::zeros(a.ncols(), b.ncols());
    matmul(
        out.as_mut(),
        Accum::Replace,
        a.transpose(),
        b,
        1.0,
        par(a.ncols(), a.nrows(), b.ncols()),
    );
    out
}

/// `a b`.
pub(crate) fn ab(a: MatRef<'_, f64>, b: MatRef<'_, f64>) -> Mat<f64> {
    let mut out = Mat::zeros(a.nrows(), b.ncols());
    matmul(
        out.as_mut(),
        Accum::Replace,
        a,
        b,
        1.0,
        par(a.nrows(), a.ncols(), b.ncols()),
    );
    out
}

/// `a b^T`.
pub(crate) fn abt(a: MatRef<'_, f64>, b: MatRef<'_, f64>) -> Mat<f64> {
    let mut out = Mat::zeros(a.nrows(), b.nrows());
    matmul(
        out.as_mut(),
        Accum::Replace,
        a,
        b.transpose(),
        1.0,
        par(a.nrows(), a.ncols(), b.nrows()),
    );
    out
}

/// `sym(a) = (a + a^T)/2` of a square matrix.
pub(crate) fn sym(a: MatRef<'_, f64>) -> Mat<f64> {
    let n = a.nrows();
    Mat::from_fn(n, n, |i, j| 0.5 * (a[(i, j)] + a[(j, i)]))
}

/// Frobenius norm.
pub(crate) fn fro(a: MatRef<'_, f64>) -> f64 {
    a.norm_l2()
}

/// Eigendecomposition of a symmetric matrix: `(Q, lambda)` with `A = Q diag(lambda) Q^T`,
/// eigenvalues in nondecreasing order.
pub(crate) fn sym_eig(a: MatRef<'_, f64>) -> Result<(Mat<f64>, Vec<f64>)> {
    let e = a
        .self_adjoint_eigen(Side::Lower)
        .map_err(|_| Error::Numerical {
            what: "symmetric eigendecomposition did not converge",
        })?;
    let vals: Vec<f64> = (0..a.nrows()).map(|i| e.S()[i]).collect();
    Ok((e.U().to_owned(), vals))
}

/// Columns of `a` scaled: `a diag(s)`.
pub(crate) fn scale_cols(a: &mut Mat<f64>, s: &[f64]) {
    for (j, &f) in s.iter().enumerate().take(a.ncols()) {
        for x in a.col_mut(j).iter_mut() {
            *x *= f;
        }
    }
}

/// `a M` with `M = I - 1 1^T / K`: removes the row means of a `d x K` matrix.
pub(crate) fn center_rows(a: &mut Mat<f64>) {
    let k = a.ncols();
    for i in 0..a.nrows() {
        let mut m = 0.0;
        for j in 0..k {
            m += a[(i, j)];
        }
        m /= k as f64;
        for j in 0..k {
            a[(i, j)] -= m;
        }
    }
}

/// Row-major `rows x cols` slice of any [`Real`](crate::Real) into a column-major `f64` matrix
/// (tiles, so that neither side is read or written with a large stride for long).
pub(crate) fn load_row_major<T: crate::Real>(src: &[T], mut dst: MatMut<'_, f64>) {
    let (rows, cols) = (dst.nrows(), dst.ncols());
    assert_eq!(src.len(), rows * cols);
    const B: usize = 32;
    for j0 in (0..cols).step_by(B) {
        let j1 = (j0 + B).min(cols);
        for i in 0..rows {
            let row = &src[i * cols + j0..i * cols + j1];
            for (jj, v) in row.iter().enumerate() {
                dst[(i, j0 + jj)] = v.to_f64();
            }
        }
    }
}

/// A column-major `f64` matrix into a row-major slice of any [`Real`](crate::Real), scaled.
pub(crate) fn store_row_major<T: crate::Real>(src: MatRef<'_, f64>, scale: f64, dst: &mut [T]) {
    let (rows, cols) = (src.nrows(), src.ncols());
    assert_eq!(dst.len(), rows * cols);
    const B: usize = 32;
    for j0 in (0..cols).step_by(B) {
        let j1 = (j0 + B).min(cols);
        for i in 0..rows {
            let row = &mut dst[i * cols + j0..i * cols + j1];
            for (jj, v) in row.iter_mut().enumerate() {
                *v = T::from_f64(scale * src[(i, j0 + jj)]);
            }
        }
    }
}
