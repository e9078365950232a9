//! Neural-collapse metrics (`docs/metrics.md#definitions`).
//!
//! Over a data set of features `x_i` (`N x d`, row-major), labels `y_i` in `0..K`, a classifier
//! `W` (`K x d`, row-major) and a bias `b` (`K`), everything computed in `f64` whatever the
//! storage type `T`:
//!
//! * class counts `n_k`, class means `mu_k = (1/n_k) sum_{y_i = k} x_i`, global mean
//!   `mu_G = (1/N) sum_i x_i` (the mean of all samples), centred means
//!   `H = [mu_k - mu_G]` (`d x K`, column `h_k`);
//! * `M_m = I_m - 1 1^T / m`, `||.||` the Frobenius norm.
//!
//! | metric | formula |
//! |---|---|
//! | [`nc1`](NcMetrics::nc1) | `tr(Sigma_W Sigma_B^+) / K`, `Sigma_W = (1/N) sum_i (x_i - mu_{y_i})(x_i - mu_{y_i})^T`, `Sigma_B = (1/K) sum_k h_k h_k^T` |
//! | [`nc2`](NcMetrics::nc2) | `\|\| W W^T / \|\|W W^T\|\| - M_K / sqrt(K-1) \|\|` |
//! | [`nc3`](NcMetrics::nc3) | `\|\| W H / \|\|W H\|\| - M_K / sqrt(K-1) \|\|` |
//! | [`nc4`](NcMetrics::nc4) | `\|\| W mu_G + b \|\|_2` |
//! | [`equinorm_w`](NcMetrics::equinorm_w) | `std / mean` of the row norms `\|\|w_k\|\|` |
//! | [`equinorm_h`](NcMetrics::equinorm_h) | `std / mean` of the column norms `\|\|h_k\|\|` |
//! | [`ncc_agreement`](NcMetrics::ncc_agreement) | `100 * #{i : argmax_k (W x_i + b)_k = argmin_k \|\|x_i - mu_k\|\|} / N` |
//! | [`cosine_margin`](NcMetrics::cosine_margin) | `(1/N) sum_i [cos(w_{y_i}, x_i - mu_G) - max_{k != y_i} cos(w_k, x_i - mu_G)]` |
//!
//! `std` is the **population** standard deviation (divide by the number of norms, not by one
//! less).
//!
//! # NC1 without `d x d` matrices
//!
//! `Sigma_B = (1/K) H H^T` has rank `<= K - 1` (`H n = 0` for the count vector `n`). With the
//! thin SVD `H = U S V^T` (`U` is `d x K`, cost `O(d K^2)`), `Sigma_B^+ = K U_r S_r^{-2} U_r^T`
//! over the `r` kept singular values, so
//!
//! ```text
//! NC1 = tr(Sigma_W Sigma_B^+) / K = (1/N) sum_i sum_{j<r} (u_j^T (x_i - mu_{y_i}))^2 / s_j^2 .
//! ```
//!
//! Neither `Sigma_W` nor `Sigma_B` is formed; the projections cost `O(N d K)`.
//!
//! **Rank cut-off.** An eigenvalue of `Sigma_B` is kept when
//! `lambda_j > lambda_max * max(d, K) * f64::EPSILON`: the default relative tolerance of
//! `scipy.linalg.pinv` applied to the `d x d` matrix `Sigma_B`, so the result is what a dense
//! pseudo-inverse of `Sigma_B` gives. On the singular values of `H` (`lambda_j = s_j^2 / K`)
//! this is `s_j > s_max * sqrt(max(d, K) * eps)` (about `1.5e-8 * sqrt(max(d, K)) * s_max`).
//! The structural null direction of `H` (and any direction in which the class means are
//! degenerate) is computed as rounding noise of size `~ eps * max_k ||mu_k||`, which stays far
//! below this cut-off unless the global offset exceeds the spread of the means by ~`1e7`;
//! inverting such a noise direction would blow it up to the size of NC1 itself, so a tighter
//! cut-off (on `s_j` at `eps` level) would be unsafe for uncentred features. If all class
//! means coincide (`s_max = 0`), `Sigma_B^+ = 0` and NC1 is `0`.
//!
//! # Classes without samples
//!
//! A class with no sample has no mean. Such classes are **excluded** from every quantity that
//! needs a class mean; with `P` the set of present classes and `K' = |P|`:
//!
//! * NC1 uses `Sigma_B = (1/K') sum_{k in P} h_k h_k^T` and divides by `K'`;
//! * NC3 uses the rows of `W` and the columns of `H` of the present classes and `M_{K'}`;
//! * `equinorm_h` runs over the present columns; the nearest class centre runs over `P`.
//!
//! Quantities of the classifier alone use all `K` rows: NC2, NC4, `equinorm_w`, the prediction
//! `argmax_k (W x_i + b)_k` and the competing rows of the cosine margin. With every class
//! present this is exactly the table above. Fewer than two present classes is
//! [`Error::TooFewClasses`] (with the number of present classes).
//!
//! # Conventions
//!
//! * Ties in `argmax` / `argmin` go to the smallest class index. The logits are evaluated as
//!   `w_k . (x_i - mu_G) + (W mu_G + b)_k`, the same numbers as `W x_i + b` up to rounding.
//! * A cosine with a zero vector is `0`.
//! * If `W W^T` (or `W H`) is zero, its normalisation is taken as the zero matrix, so NC2
//!   (NC3) is `||M|| / sqrt(K-1) = 1`.
//! * An equinorm whose norms are all zero (mean `0`) is `0`.
//!
//! # Streaming
//!
//! [`nc_metrics`] takes the whole data set at once. For data that arrive in batches,
//! [`MetricsAccumulator`] runs the same computation in two passes (the nearest-centre
//! agreement, the cosine margin and the NC1 projections need the final means):
//!
//! 1. [`MetricsAccumulator::add_batch`] for every batch: class sums and counts;
//! 2. [`MetricsAccumulator::begin_second_pass`] with the classifier gives a [`SecondPass`]
//!    (means, SVD of `H`, every classifier-only metric);
//! 3. [`SecondPass::add_batch`] for the same samples again (any batching, any order);
//! 4. [`SecondPass::finish`] checks that the second pass saw exactly the class counts of the
//!    first and returns the [`NcMetrics`].
//!
//! Per-sample work is done sample by sample in the order given, so the result does not depend
//! on how the samples are cut into batches: [`nc_metrics`] is itself this protocol with one
//! batch.
//!
//! # Example
//!
//! Perfectly collapsed features on an exact simplex ETF (`K = 3`, `d = 3`), the classifier the
//! same ETF:
//!
//! ```
//! use implicit_etf::metrics::nc_metrics;
//! let k = 3;
//! let s = (3.0f64 / 2.0).sqrt();
//! // W = sqrt(K/(K-1)) (I - 1 1^T / K): rows form a simplex ETF.
//! let w: Vec<f64> = (0..9)
//!     .map(|i| s * (if i / 3 == i % 3 { 1.0 } else { 0.0 } - 1.0 / 3.0))
//!     .collect();
//! let b = vec![0.0; k];
//! // two samples per class, each exactly on its class's ETF vertex
//! let labels = [0usize, 1, 2, 2, 1, 0];
//! let features: Vec<f64> = labels.iter().flat_map(|&y| w[3 * y..3 * y + 3].to_vec()).collect();
//! let m = nc_metrics(&features, &labels, 6, 3, k, &w, &b).unwrap();
//! assert!(m.nc1.abs() < 1e-12);
//! assert!(m.nc2 < 1e-12 && m.nc3 < 1e-12 && m.nc4 < 1e-12);
//! assert!(m.equinorm_w < 1e-12 && m.equinorm_h < 1e-12);
//! assert_eq!(m.ncc_agreement, 100.0);
//! // own cosine 1, the others -1/(K-1): margin K/(K-1)
//! assert!((m.cosine_margin - 1.5).abs() < 1e-12);
//! ```

use crate::core::validate::{self, check_finite};
use crate::{Error, Label, Real, Result};
use faer::Mat;

/// The neural-collapse metrics of a data set and a classifier (see the [module
/// docs](self) for every formula).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NcMetrics {
    /// NC1, variability collapse: `tr(Sigma_W Sigma_B^+) / K`.
    pub nc1: f64,
    /// NC2, the classifier is a simplex ETF: `||W W^T/||W W^T|| - M/sqrt(K-1)||`.
    pub nc2: f64,
    /// NC3, self-duality: `||W H/||W H|| - M/sqrt(K-1)||`.
    pub nc3: f64,
    /// NC4 (bias collapse, as the reference names it): `||W mu_G + b||_2`.
    pub nc4: f64,
    /// Population `std / mean` of the row norms of `W`.
    pub equinorm_w: f64,
    /// Population `std / mean` of the column norms of `H` (present classes).
    pub equinorm_h: f64,
    /// Percentage (0 to 100) of samples whose classifier prediction is their nearest class
    /// centre.
    pub ncc_agreement: f64,
    /// Mean over samples of the cosine of `x_i - mu_G` with its own class's row of `W` minus
    /// the largest cosine with another row.
    pub cosine_margin: f64,
}

/// All metrics of a whole data set in one call.
///
/// `features` is `n x d` row-major, `labels` has `n` entries in `0..k`, `w` is `k x d`
/// row-major, `b` has `k` entries. Equivalent to the two-pass [`MetricsAccumulator`] protocol
/// with a single batch.
///
/// # Errors
/// [`Error::TooFewClasses`] if `k < 2` or fewer than two classes have samples;
/// [`Error::InvalidParameter`] if `d = 0`; [`Error::ShapeMismatch`] for a buffer of the wrong
/// length; [`Error::EmptyBatch`] if `n = 0`; [`Error::LabelOutOfRange`] for a label `>= k`;
/// [`Error::NonFinite`] for NaN or an infinity in `features`, `w` or `b`;
/// [`Error::Numerical`] if the SVD of `H` fails.
pub fn nc_metrics<T: Real, L: Label>(
    features: &[T],
    labels: &[L],
    n: usize,
    d: usize,
    k: usize,
    w: &[T],
    b: &[T],
) -> Result<NcMetrics> {
    check_dims(d, k)?;
    validate::check_len("labels", n, labels.len())?;
    check_len("features", features.len(), n, d)?;
    check_classifier(w, b, d, k)?;
    if n == 0 {
        return Err(Error::EmptyBatch);
    }
    let mut acc = MetricsAccumulator::new(d, k)?;
    acc.add_batch(features, labels)?;
    let mut second = acc.begin_second_pass(w, b)?;
    second.add_batch(features, labels)?;
    second.finish()
}

/// First pass of the streamed metrics: class sums and counts.
///
/// See the [module docs](self#streaming) for the protocol. A call that returns an error leaves
/// the accumulator unchanged.
///
/// ```
/// use implicit_etf::metrics::{nc_metrics, MetricsAccumulator};
/// let (d, k) = (2, 2);
/// let x = [1.0f64, 0.1, 0.9, -0.1, -1.0, 0.2, -1.1, 0.0];
/// let y = [0usize, 0, 1, 1];
/// let (w, b) = ([1.0f64, 0.0, -1.0, 0.0], [0.0f64, 0.0]);
/// let mut acc = MetricsAccumulator::new(d, k).unwrap();
/// acc.add_batch(&x[..4], &y[..2]).unwrap();
/// acc.add_batch(&x[4..], &y[2..]).unwrap();
/// let mut second = acc.begin_second_pass(&w, &b).unwrap();
/// second.add_batch(&x[..6], &y[..3]).unwrap();
/// second.add_batch(&x[6..], &y[3..]).unwrap();
/// let streamed = second.finish().unwrap();
/// assert_eq!(streamed, nc_metrics(&x, &y, 4, d, k, &w, &b).unwrap());
/// ```
#[derive(Debug, Clone)]
pub struct MetricsAccumulator {
    d: usize,
    k: usize,
    /// `k x d` row-major class sums.
    sums: Vec<f64>,
    counts: Vec<usize>,
    n: usize,
}

impl MetricsAccumulator {
    /// An empty accumulator for features of dimension `d` and `k` classes.
    ///
    /// # Errors
    /// [`Error::TooFewClasses`] if `k < 2`, [`Error::InvalidParameter`] if `d = 0` or
    /// `k * d` overflows.
    pub fn new(d: usize, k: usize) -> Result<Self> {
        check_dims(d, k)?;
        let kd = k.checked_mul(d).ok_or_else(|| Error::InvalidParameter {
            name: "d",
            reason: format!("k * d = {k} * {d} overflows usize"),
        })?;
        Ok(MetricsAccumulator {
            d,
            k,
            sums: vec![0.0; kd],
            counts: vec![0; k],
            n: 0,
        })
    }

    /// Feature dimension `d`.
    pub fn dim(&self) -> usize {
        self.d
    }

    /// Number of classes `K`.
    pub fn classes(&self) -> usize {
        self.k
    }

    /// Number of samples accumulated so far.
    pub fn samples(&self) -> usize {
        self.n
    }

    /// Samples per class so far (`K` entries); a zero marks a class that will be excluded.
    pub fn class_counts(&self) -> &[usize] {
        &self.counts
    }

    /// Pass 1: adds a batch of `labels.len()` samples (`features` is `labels.len() x d`
    /// row-major). An empty batch is a no-op.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`], [`Error::LabelOutOfRange`], [`Error::NonFinite`]; the
    /// accumulator is then unchanged.
    pub fn add_batch<T: Real, L: Label>(&mut self, features: &[T], labels: &[L]) -> Result<()> {
        let labels = check_batch(features, labels, self.d, self.k)?;
        let d = self.d;
        for (x, &y) in features.chunks_exact(d).zip(&labels) {
            let s = &mut self.sums[y * d..(y + 1) * d];
            for (si, &xi) in s.iter_mut().zip(x) {
                *si += xi.to_f64();
            }
            self.counts[y] += 1;
        }
        self.n += labels.len();
        Ok(())
    }

    /// Ends pass 1: computes the means, `H` and its SVD, and every metric that needs only the
    /// classifier `w` (`K x d` row-major) and `b` (`K`). The accumulator is left as it is, so
    /// several classifiers can be evaluated against one first pass.
    ///
    /// # Errors
    /// [`Error::EmptyBatch`] if no sample was added; [`Error::TooFewClasses`] if fewer than
    /// two classes have samples; [`Error::ShapeMismatch`] / [`Error::NonFinite`] for `w`, `b`;
    /// [`Error::Numerical`] if the SVD fails.
    pub fn begin_second_pass<T: Real>(&self, w: &[T], b: &[T]) -> Result<SecondPass> {
        let (d, k) = (self.d, self.k);
        check_classifier(w, b, d, k)?;
        if self.n == 0 {
            return Err(Error::EmptyBatch);
        }
        let present: Vec<usize> = (0..k).filter(|&c| self.counts[c] > 0).collect();
        let kp = present.len();
        if kp < 2 {
            return Err(Error::TooFewClasses { classes: kp });
        }
        let mut slot = vec![usize::MAX; k];
        for (p, &c) in present.iter().enumerate() {
            slot[c] = p;
        }

        // Means (present classes), global mean, centred means (kp x d row-major: row p = h).
        let mut means = vec![0.0; kp * d];
        let mut mu_g = vec![0.0; d];
        for (p, &c) in present.iter().enumerate() {
            let inv = 1.0 / self.counts[c] as f64;
            let s = &self.sums[c * d..(c + 1) * d];
            for ((m, g), &si) in means[p * d..(p + 1) * d].iter_mut().zip(&mut mu_g).zip(s) {
                *m = si * inv;
                *g += si;
            }
        }
        let inv_n = 1.0 / self.n as f64;
        for g in &mut mu_g {
            *g *= inv_n;
        }
        let mut h = vec![0.0; kp * d];
        for (hp, mp) in h.chunks_exact_mut(d).zip(means.chunks_exact(d)) {
            for ((hi, &mi), &gi) in hp.iter_mut().zip(mp).zip(&mu_g) {
                *hi = mi - gi;
            }
        }

        // Thin SVD of H (d x kp); keep s_j > s_max * sqrt(max(d, kp) * eps), i.e. the
        // eigenvalues of Sigma_B above lambda_max * max(d, kp) * eps.
        let hmat = Mat::<f64>::from_fn(d, kp, |i, j| h[j * d + i]);
        let svd = hmat.thin_svd().map_err(|_| Error::Numerical {
            what: "thin SVD of the centred class means",
        })?;
        let s = svd.S().column_vector();
        let u = svd.U();
        let nsv = s.nrows();
        let s_max = if nsv > 0 { s[0] } else { 0.0 };
        let tol = s_max * (d.max(kp) as f64 * f64::EPSILON).sqrt();
        let mut basis = Vec::new();
        let mut inv_s2 = Vec::new();
        for j in 0..nsv {
            let sj = s[j];
            if sj > tol {
                inv_s2.push(1.0 / (sj * sj));
                basis.extend((0..d).map(|i| u[(i, j)]));
            }
        }
        if basis.iter().chain(&inv_s2).any(|v| !v.is_finite()) {
            return Err(Error::Numerical {
                what: "thin SVD of the centred class means",
            });
        }

        let w64: Vec<f64> = w.iter().map(|v| v.to_f64()).collect();
        let b64: Vec<f64> = b.iter().map(|v| v.to_f64()).collect();
        let w_norms: Vec<f64> = w64.chunks_exact(d).map(|r| dot(r, r).sqrt()).collect();
        let offset: Vec<f64> = w64
            .chunks_exact(d)
            .zip(&b64)
            .map(|(r, &bk)| dot(r, &mu_g) + bk)
            .collect();
        let nc4 = dot(&offset, &offset).sqrt();

        // NC2: W W^T (k x k).
        let mut gram = vec![0.0; k * k];
        for a in 0..k {
            for c in a..k {
                let v = dot(&w64[a * d..(a + 1) * d], &w64[c * d..(c + 1) * d]);
                gram[a * k + c] = v;
                gram[c * k + a] = v;
            }
        }
        let nc2 = etf_deviation(&gram, k);

        // NC3: W_P H_P (kp x kp).
        let mut wh = vec![0.0; kp * kp];
        for (a, &ca) in present.iter().enumerate() {
            let wa = &w64[ca * d..(ca + 1) * d];
            for c in 0..kp {
                wh[a * kp + c] = dot(wa, &h[c * d..(c + 1) * d]);
            }
        }
        let nc3 = etf_deviation(&wh, kp);

        let h_norms: Vec<f64> = h.chunks_exact(d).map(|r| dot(r, r).sqrt()).collect();
        let equinorm_w = equinorm(&w_norms);
        let equinorm_h = equinorm(&h_norms);

        let rank = inv_s2.len();
        Ok(SecondPass {
            d,
            k,
            slot,
            present,
            means,
            mu_g,
            basis,
            inv_s2,
            w: w64,
            w_norms,
            offset,
            expected_counts: self.counts.clone(),
            counts: vec![0; k],
            n: 0,
            q: vec![0.0; rank],
            agree: 0,
            margin_sum: 0.0,
            nc2,
            nc3,
            nc4,
            equinorm_w,
            equinorm_h,
            xc: vec![0.0; d],
            xr: vec![0.0; d],
            cos: vec![0.0; k],
        })
    }
}

/// Second pass of the streamed metrics, made by [`MetricsAccumulator::begin_second_pass`].
///
/// Feed it the same samples as the first pass (any batching, any order), then call
/// [`finish`](SecondPass::finish). A call that returns an error leaves it unchanged.
#[derive(Debug, Clone)]
pub struct SecondPass {
    d: usize,
    k: usize,
    /// Class -> index among the present classes (`usize::MAX` if absent).
    slot: Vec<usize>,
    present: Vec<usize>,
    /// `kp x d` class means.
    means: Vec<f64>,
    mu_g: Vec<f64>,
    /// `r x d`: the kept left singular vectors of `H`, one per row.
    basis: Vec<f64>,
    inv_s2: Vec<f64>,
    w: Vec<f64>,
    w_norms: Vec<f64>,
    /// `W mu_G + b`.
    offset: Vec<f64>,
    expected_counts: Vec<usize>,
    counts: Vec<usize>,
    n: usize,
    /// `q_j = sum_i (u_j^T (x_i - mu_{y_i}))^2`.
    q: Vec<f64>,
    agree: usize,
    margin_sum: f64,
    nc2: f64,
    nc3: f64,
    nc4: f64,
    equinorm_w: f64,
    equinorm_h: f64,
    xc: Vec<f64>,
    xr: Vec<f64>,
    cos: Vec<f64>,
}

impl SecondPass {
    /// Number of samples seen by the second pass so far.
    pub fn samples(&self) -> usize {
        self.n
    }

    /// Pass 2: adds a batch (`features` is `labels.len() x d` row-major). An empty batch is a
    /// no-op.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`], [`Error::LabelOutOfRange`], [`Error::NonFinite`], and
    /// [`Error::ShapeMismatch`] (`what = "second-pass class count"`) if the batch would give a
    /// class more samples than the first pass saw; the pass is then unchanged.
    pub fn add_batch<T: Real, L: Label>(&mut self, features: &[T], labels: &[L]) -> Result<()> {
        let (d, k) = (self.d, self.k);
        let labels = check_batch(features, labels, d, k)?;
        let mut batch_counts = vec![0usize; k];
        for &y in &labels {
            batch_counts[y] += 1;
        }
        for (&bc, (&have, &expected)) in batch_counts
            .iter()
            .zip(self.counts.iter().zip(&self.expected_counts))
        {
            if have + bc > expected {
                return Err(Error::ShapeMismatch {
                    what: "second-pass class count",
                    expected,
                    got: have + bc,
                });
            }
        }
        for (x, &y) in features.chunks_exact(d).zip(&labels) {
            self.add_sample(x, y);
        }
        for (c, bc) in self.counts.iter_mut().zip(batch_counts) {
            *c += bc;
        }
        self.n += labels.len();
        Ok(())
    }

    fn add_sample<T: Real>(&mut self, x: &[T], y: usize) {
        let d = self.d;
        let py = self.slot[y];
        let my = &self.means[py * d..(py + 1) * d];
        for (((c, r), &xi), (&g, &m)) in self
            .xc
            .iter_mut()
            .zip(self.xr.iter_mut())
            .zip(x)
            .zip(self.mu_g.iter().zip(my))
        {
            let v = xi.to_f64();
            *c = v - g;
            *r = v - m;
        }
        // NC1 projections.
        for (qj, uj) in self.q.iter_mut().zip(self.basis.chunks_exact(d)) {
            let z = dot(uj, &self.xr);
            *qj += z * z;
        }
        // Logits and cosines.
        let xc_norm = dot(&self.xc, &self.xc).sqrt();
        let mut pred = 0;
        let mut best_logit = f64::NEG_INFINITY;
        for (c, ((wk, &wn), &off)) in self
            .w
            .chunks_exact(d)
            .zip(&self.w_norms)
            .zip(&self.offset)
            .enumerate()
        {
            let s = dot(wk, &self.xc);
            let logit = s + off;
            if logit > best_logit {
                best_logit = logit;
                pred = c;
            }
            let den = wn * xc_norm;
            self.cos[c] = if den > 0.0 { s / den } else { 0.0 };
        }
        let own = self.cos[y];
        let other = self
            .cos
            .iter()
            .enumerate()
            .filter(|&(c, _)| c != y)
            .map(|(_, &v)| v)
            .fold(f64::NEG_INFINITY, f64::max);
        self.margin_sum += own - other;
        // Nearest class centre (present classes).
        let mut nearest = self.present[0];
        let mut best_dist = f64::INFINITY;
        for (&c, m) in self.present.iter().zip(self.means.chunks_exact(d)) {
            let dist = sq_dist(x, m);
            if dist < best_dist {
                best_dist = dist;
                nearest = c;
            }
        }
        if nearest == pred {
            self.agree += 1;
        }
    }

    /// Ends pass 2 and returns the metrics.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] (`what = "second-pass class count"`) if the second pass did
    /// not see exactly the class counts of the first.
    pub fn finish(self) -> Result<NcMetrics> {
        for (&got, &expected) in self.counts.iter().zip(&self.expected_counts) {
            if got != expected {
                return Err(Error::ShapeMismatch {
                    what: "second-pass class count",
                    expected,
                    got,
                });
            }
        }
        let n = self.n as f64;
        let nc1 = self
            .q
            .iter()
            .zip(&self.inv_s2)
            .map(|(q, is)| q * is)
            .sum::<f64>()
            / n;
        Ok(NcMetrics {
            nc1,
            nc2: self.nc2,
            nc3: self.nc3,
            nc4: self.nc4,
            equinorm_w: self.equinorm_w,
            equinorm_h: self.equinorm_h,
            ncc_agreement: 100.0 * self.agree as f64 / n,
            cosine_margin: self.margin_sum / n,
        })
    }
}

fn check_dims(d: usize, k: usize) -> Result<()> {
    if k < 2 {
        return Err(Error::TooFewClasses { classes: k });
    }
    if d == 0 {
        return Err(Error::InvalidParameter {
            name: "d",
            reason: "the feature dimension must be positive".into(),
        });
    }
    Ok(())
}

/// `got == rows * cols` (a product that overflows is [`Error::SizeOverflow`]).
fn check_len(what: &'static str, got: usize, rows: usize, cols: usize) -> Result<()> {
    validate::check_len(what, validate::size2(what, rows, cols)?, got)
}

fn check_classifier<T: Real>(w: &[T], b: &[T], d: usize, k: usize) -> Result<()> {
    check_len("w", w.len(), k, d)?;
    check_len("b", b.len(), k, 1)?;
    check_finite("w", w)?;
    check_finite("b", b)
}

/// Validates a batch; returns its labels as class indices.
fn check_batch<T: Real, L: Label>(
    features: &[T],
    labels: &[L],
    d: usize,
    k: usize,
) -> Result<Vec<usize>> {
    check_len("features", features.len(), labels.len(), d)?;
    let idx = validate::validate_labels(labels, k)?;
    check_finite("features", features)?;
    Ok(idx)
}

/// `|| G / ||G|| - M_m / sqrt(m-1) ||` for an `m x m` row-major `G` (zero `G` normalises to 0).
fn etf_deviation(g: &[f64], m: usize) -> f64 {
    let scale = g.iter().fold(0.0f64, |a, v| a.max(v.abs()));
    let norm = if scale > 0.0 {
        scale
            * g.iter()
                .map(|v| (v / scale) * (v / scale))
                .sum::<f64>()
                .sqrt()
    } else {
        0.0
    };
    let inv = if norm > 0.0 { 1.0 / norm } else { 0.0 };
    let t = 1.0 / ((m - 1) as f64).sqrt();
    let mut acc = 0.0;
    for a in 0..m {
        for c in 0..m {
            let target = (if a == c { 1.0 } else { 0.0 } - 1.0 / m as f64) * t;
            let e = g[a * m + c] * inv - target;
            acc += e * e;
        }
    }
    acc.sqrt()
}

/// Population `std / mean`; `0` if the mean is `0`.
fn equinorm(v: &[f64]) -> f64 {
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    if mean <= 0.0 {
        return 0.0;
    }
    let var = v.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / n;
    var.sqrt() / mean
}

#[inline]
fn dot(a: &[f64], b: &[f64]) -> f64 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0.0f64; 4];
    let (ca, cb) = (a.chunks_exact(4), b.chunks_exact(4));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..4 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut s = (acc[0] + acc[1]) + (acc[2] + acc[3]);
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

#[inline]
fn sq_dist<T: Real>(x: &[T], m: &[f64]) -> f64 {
    let n = x.len().min(m.len());
    let (x, m) = (&x[..n], &m[..n]);
    let mut acc = [0.0f64; 4];
    let (cx, cm) = (x.chunks_exact(4), m.chunks_exact(4));
    let (rx, rm) = (cx.remainder(), cm.remainder());
    for (a, b) in cx.zip(cm) {
        for l in 0..4 {
            let e = a[l].to_f64() - b[l];
            acc[l] += e * e;
        }
    }
    let mut s = (acc[0] + acc[1]) + (acc[2] + acc[3]);
    for (a, b) in rx.iter().zip(rm) {
        let e = a.to_f64() - b;
        s += e * e;
    }
    s
}
