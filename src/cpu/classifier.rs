//! Stage 5: the classifier `W = sqrt(K/(K-1)) M P^T`, `b = -W mu`, logits `X W^T + b`
//! (`docs/head.md#the-classifier-and-logits`), its backward, and the mean cross-entropy.

use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, MatRef};

use crate::cpu::linalg::par;
use crate::Real;

/// `sqrt(K/(K-1))`.
pub fn scale_of(k: usize) -> f64 {
    (k as f64 / (k - 1) as f64).sqrt()
}

/// `W = sqrt(K/(K-1)) M P^T` (`K x d`) from `P` (`d x K`).
pub fn weights(p: MatRef<'_, f64>) -> Mat<f64> {
    let (d, k) = (p.nrows(), p.ncols());
    let a = scale_of(k);
    let mut w = Mat::zeros(k, d);
    for i in 0..d {
        let m: f64 = (0..k).map(|j| p[(i, j)]).sum::<f64>() / k as f64;
        for j in 0..k {
            w[(j, i)] = a * (p[(i, j)] - m);
        }
    }
    w
}

/// Logits `X W^T + b` with `b = -W mu`; `x` is `n x d` row-major. Returns `(logits, b)`.
pub fn logits<T: Real>(
    x: &[T],
    n: usize,
    d: usize,
    w: MatRef<'_, f64>,
    mu: &[T],
) -> (Vec<T>, Vec<T>) {
    let k = w.nrows();
    let b: Vec<f64> = (0..k)
        .map(|c| -(0..d).map(|j| w[(c, j)] * mu[j].to_f64()).sum::<f64>())
        .collect();
    let wt: Mat<T> = Mat::from_fn(d, k, |j, c| T::from_f64(w[(c, j)]));
    let xm = MatRef::from_row_major_slice(x, n, d);
    // out (n x k), stored transposed in a column-major k x n buffer = row-major n x k.
    let mut out = vec![T::from_f64(0.0); n * k];
    {
        let mut o = faer::MatMut::from_row_major_slice_mut(&mut out, n, k);
        for i in 0..n {
            for c in 0..k {
                o[(i, c)] = T::from_f64(b[c]);
            }
        }
        matmul(
            o.as_mut(),
            Accum::Add,
            xm,
            wt.as_ref(),
            T::from_f64(1.0),
            par(n, d, k),
        );
    }
    (out, b.into_iter().map(T::from_f64).collect())
}

/// Gradients of the classifier's inputs.
#[derive(Debug, Clone)]
pub struct ClassifierGrads<T> {
    /// Direct path `dL/dx = dZ W` (`n x d`).
    pub dx: Vec<T>,
    /// `dL/dW` including the bias path, `dZ^T X - db mu^T` (`K x d`, float64).
    pub dw: Mat<f64>,
    /// `dL/dmu` through the bias, `-W^T db` (`d`).
    pub dmu: Vec<f64>,
}

/// Backward of [`logits`] from `dL/dlogits` (`n x K`).
pub fn logits_backward<T: Real>(
    x: &[T],
    dz: &[T],
    n: usize,
    d: usize,
    w: MatRef<'_, f64>,
    mu: &[T],
) -> ClassifierGrads<T> {
    let k = w.nrows();
    let xm = MatRef::from_row_major_slice(x, n, d);
    let dzm = MatRef::from_row_major_slice(dz, n, k);
    let mut db = vec![0.0f64; k];
    for i in 0..n {
        for c in 0..k {
            db[c] += dz[i * k + c].to_f64();
        }
    }
    // dW = dZ^T X (in T), then the bias path in f64.
    let mut dwt: Mat<T> = Mat::zeros(k, d);
    matmul(
        dwt.as_mut(),
        Accum::Replace,
        dzm.transpose(),
        xm,
        T::from_f64(1.0),
        par(k, n, d),
    );
    let dw = Mat::from_fn(k, d, |c, j| dwt[(c, j)].to_f64() - db[c] * mu[j].to_f64());
    let wt: Mat<T> = Mat::from_fn(k, d, |c, j| T::from_f64(w[(c, j)]));
    let mut dx = vec![T::from_f64(0.0); n * d];
    {
        let o = faer::MatMut::from_row_major_slice_mut(&mut dx, n, d);
        matmul(
            o,
            Accum::Replace,
            dzm,
            wt.as_ref(),
            T::from_f64(1.0),
            par(n, k, d),
        );
    }
    let dmu = (0..d)
        .map(|j| -(0..k).map(|c| w[(c, j)] * db[c]).sum::<f64>())
        .collect();
    ClassifierGrads { dx, dw, dmu }
}

/// `dL/dP` from `dL/dW`: `W = a M P^T` gives `dL/dP = a (dL/dW)^T M` (`d x K`).
pub fn weights_backward(dw: MatRef<'_, f64>) -> Mat<f64> {
    let (k, d) = (dw.nrows(), dw.ncols());
    let a = scale_of(k);
    let mut v = Mat::zeros(d, k);
    for j in 0..d {
        let m: f64 = (0..k).map(|c| dw[(c, j)]).sum::<f64>() / k as f64;
        for c in 0..k {
            v[(j, c)] = a * (dw[(c, j)] - m);
        }
    }
    v
}

/// Mean cross-entropy over the batch and its gradient `dL/dlogits = (softmax - onehot)/N`.
/// Labels must be valid class indices (use the head's validation for untrusted labels).
pub fn cross_entropy<T: Real>(logits: &[T], labels: &[usize], k: usize) -> (f64, Vec<T>) {
    let n = labels.len();
    let mut loss = 0.0;
    let mut grad = vec![T::from_f64(0.0); n * k];
    for (i, &y) in labels.iter().enumerate() {
        let row = &logits[i * k..(i + 1) * k];
        let m = row.iter().fold(f64::NEG_INFINITY, |m, v| m.max(v.to_f64()));
        let z: f64 = row.iter().map(|v| (v.to_f64() - m).exp()).sum();
        let lse = m + z.ln();
        loss += lse - row[y].to_f64();
        for c in 0..k {
            let p = (row[c].to_f64() - lse).exp();
            let t = if c == y { 1.0 } else { 0.0 };
            grad[i * k + c] = T::from_f64((p - t) / n as f64);
        }
    }
    (loss / n as f64, grad)
}
