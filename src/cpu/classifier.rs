//! Stage 5: the classifier `W = sqrt(K/(K-1)) M P^T`, `b = -W mu`, logits `X W^T + b`
//! (`docs/head.md#the-classifier-and-logits`), its backward, and the mean cross-entropy.

use faer::{Accum, Mat, MatMut, MatRef};

use crate::dense::gemm_t;
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

/// From `P` stored row-major (`d x K`, `f64`): its row means `pmean` (`d`), the transposed
/// classifier `W^T = a P M` (`d x K` row-major, storage type) and `P` in the storage type.
pub fn classifier_from_rows<T: Real>(
    p: &[f64],
    k: usize,
    pmean: &mut [f64],
    wt: &mut [T],
    p_t: &mut [T],
) {
    let a = scale_of(k);
    for (((row, m), w), pt) in p
        .chunks_exact(k)
        .zip(pmean.iter_mut())
        .zip(wt.chunks_exact_mut(k))
        .zip(p_t.chunks_exact_mut(k))
    {
        *m = row.iter().sum::<f64>() / k as f64;
        for ((o, q), &v) in w.iter_mut().zip(pt.iter_mut()).zip(row) {
            *o = T::from_f64(a * (v - *m));
            *q = T::from_f64(v);
        }
    }
}

/// `W` (`K x d` row-major) from `W^T` (`d x K` row-major): a tiled transpose.
pub fn transpose_into<T: Copy>(wt: &[T], d: usize, k: usize, w: &mut [T]) {
    const B: usize = 32;
    for j0 in (0..d).step_by(B) {
        for c0 in (0..k).step_by(B) {
            for j in j0..(j0 + B).min(d) {
                for c in c0..(c0 + B).min(k) {
                    w[c * d + j] = wt[j * k + c];
                }
            }
        }
    }
}

/// The bias `b = -W mu` (`K`) in `f64`, from `P` row-major, its row means and `mu`.
pub fn bias_into<T: Real>(p: &[f64], pmean: &[f64], mu: &[T], b: &mut [f64]) {
    let k = b.len();
    let a = scale_of(k);
    b.iter_mut().for_each(|v| *v = 0.0);
    for ((row, &m), &u) in p.chunks_exact(k).zip(pmean).zip(mu) {
        let u = u.to_f64();
        for (o, &v) in b.iter_mut().zip(row) {
            *o += a * (v - m) * u;
        }
    }
    b.iter_mut().for_each(|v| *v = -*v);
}

/// Logits `X W^T + 1 b^T` (`N x K` row-major) into `out`, from `X` (`N x d`) and `W^T`
/// (`d x K` row-major, storage type) and the bias.
pub fn logits_into<T: Real>(x: &[T], d: usize, wt: &[T], b: &[f64], out: &mut [T]) {
    let k = b.len();
    let n = x.len() / d;
    for row in out.chunks_exact_mut(k) {
        for (o, &v) in row.iter_mut().zip(b) {
            *o = T::from_f64(v);
        }
    }
    gemm_t(
        MatMut::from_row_major_slice_mut(out, n, k),
        Accum::Add,
        MatRef::from_row_major_slice(x, n, d),
        MatRef::from_row_major_slice(wt, d, k),
        T::from_f64(1.0),
    );
}

/// Backward of [`logits_into`] with `W = a M P^T` and `b = -W mu`, first part: what reads
/// the rows, `db = 1^T dZ` (`K`) and `xtdz = X^T dZ` (`d x K`) (the sums a data-parallel
/// step adds over the ranks), and the direct path `dx = dZ W` (`N x d`). All written.
pub(crate) fn logits_backward_rows<T: Real>(
    x: &[T],
    dz: &[T],
    d: usize,
    wt: &[T],
    db: &mut [f64],
    xtdz: &mut [T],
    dx: &mut [T],
) {
    let k = db.len();
    let n = x.len() / d;
    db.iter_mut().for_each(|v| *v = 0.0);
    for row in dz.chunks_exact(k) {
        for (o, &g) in db.iter_mut().zip(row) {
            *o += g.to_f64();
        }
    }
    let xm = MatRef::from_row_major_slice(x, n, d);
    let dzm = MatRef::from_row_major_slice(dz, n, k);
    // X^T dZ (d x K) in the storage type, as the matching product of a linear head.
    gemm_t(
        MatMut::from_row_major_slice_mut(xtdz, d, k),
        Accum::Replace,
        xm.transpose(),
        dzm,
        T::from_f64(1.0),
    );
    // dx = dZ W = dZ (W^T)^T.
    gemm_t(
        MatMut::from_row_major_slice_mut(dx, n, d),
        Accum::Replace,
        dzm,
        MatRef::from_row_major_slice(wt, d, k).transpose(),
        T::from_f64(1.0),
    );
}

/// Second part of the backward of [`logits_into`], from the sums `xtdz` and `db` of
/// [`logits_backward_rows`]: `V = dL/dP` (`d x K` row-major `f64`, through `W` and `b`) and
/// `dL/dmu = -W^T db` (`d`), written.
pub(crate) fn logits_backward_params<T: Real>(
    xtdz: &[T],
    db: &[f64],
    p: &[f64],
    pmean: &[f64],
    mu: &[T],
    v: &mut [f64],
    dmu: &mut [f64],
) {
    let k = db.len();
    let a = scale_of(k);
    // dW^T = X^T dZ - mu db^T; V = dL/dP = a (dW^T) M (row means removed).
    for ((vrow, grow), &m) in v.chunks_exact_mut(k).zip(xtdz.chunks_exact(k)).zip(mu) {
        let m = m.to_f64();
        for ((o, &g), &bb) in vrow.iter_mut().zip(grow).zip(db.iter()) {
            *o = g.to_f64() - bb * m;
        }
        let mean = vrow.iter().sum::<f64>() / k as f64;
        vrow.iter_mut().for_each(|o| *o = a * (*o - mean));
    }
    // dL/dmu = -W^T db, in f64 from P.
    for ((o, row), &pm) in dmu.iter_mut().zip(p.chunks_exact(k)).zip(pmean) {
        let s: f64 = row.iter().zip(db.iter()).map(|(&q, &g)| (q - pm) * g).sum();
        *o = -a * s;
    }
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
