//! Helpers of the data-parallel tests (`tests/data_parallel*.rs`): batches, the global
//! cross-entropy gradient, and a relative error.
use implicit_etf::Real;

/// A deterministic generator (splitmix64).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64 - 0.5
    }
}

/// One batch: features around class centres, and labels from `classes` (a subset of 0..K).
pub fn batch(seed: u64, n: usize, d: usize, classes: &[u32]) -> (Vec<f64>, Vec<u32>) {
    let mut r = Rng(seed);
    let labels: Vec<u32> = (0..n)
        .map(|i| classes[(i * 7 + seed as usize) % classes.len()])
        .collect();
    let mut raw = Vec::with_capacity(n * d);
    for &y in &labels {
        for j in 0..d {
            let centre = if j % 7 == y as usize % 7 {
                2.0 + 0.3 * y as f64
            } else {
                0.0
            };
            raw.push(centre + 0.5 * r.next());
        }
    }
    (raw, labels)
}

/// `dL/dlogits` of the mean cross-entropy over a global batch of `n_total` rows, for the rows
/// `logits` (`n x K`) with `labels`.
pub fn ce_grad<T: Real>(logits: &[T], labels: &[u32], k: usize, n_total: usize) -> Vec<T> {
    let mut g = vec![T::from_f64(0.0); logits.len()];
    for (i, &y) in labels.iter().enumerate() {
        let row = &logits[i * k..(i + 1) * k];
        let m = row.iter().fold(f64::NEG_INFINITY, |m, v| m.max(v.to_f64()));
        let z: f64 = row.iter().map(|v| (v.to_f64() - m).exp()).sum();
        for c in 0..k {
            let p = (row[c].to_f64() - m).exp() / z;
            let t = if c == y as usize { 1.0 } else { 0.0 };
            g[i * k + c] = T::from_f64((p - t) / n_total as f64);
        }
    }
    g
}

/// `max |a - b| / max(1, max |b|)`.
pub fn rel<T: Real>(a: &[T], b: &[T]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(1.0f64, |m, v| m.max(v.to_f64().abs()));
    a.iter()
        .zip(b)
        .fold(0.0f64, |m, (x, y)| m.max((x.to_f64() - y.to_f64()).abs()))
        / scale
}
