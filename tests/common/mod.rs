//! Shared helpers of the integration tests: golden loading, random data, norms.
#![allow(dead_code)]

use serde_json::Value;

/// Reads `tests/data/NAME`.
pub fn golden(name: &str) -> Value {
    let path = format!("{}/tests/data/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).unwrap()
}

/// A nested-list matrix as (rows, cols, row-major data).
pub fn mat(v: &Value) -> (usize, usize, Vec<f64>) {
    let rows = v.as_array().expect("matrix");
    let r = rows.len();
    let c = rows[0].as_array().unwrap().len();
    let mut out = Vec::with_capacity(r * c);
    for row in rows {
        for x in row.as_array().unwrap() {
            out.push(x.as_f64().unwrap());
        }
    }
    (r, c, out)
}

/// A flat list of numbers.
pub fn vecf(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

/// `||a - b|| / ||b||` (Frobenius).
pub fn rel(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let num: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y) * (x - y))
        .sum::<f64>()
        .sqrt();
    let den: f64 = b.iter().map(|y| y * y).sum::<f64>().sqrt();
    num / den.max(1e-300)
}

/// `max |a - b|`.
pub fn max_abs(a: &[f64], b: &[f64]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

/// Removes the row means of a row-major `rows x cols` matrix (`A M`).
pub fn center_rows(a: &[f64], rows: usize, cols: usize) -> Vec<f64> {
    let mut out = a.to_vec();
    for i in 0..rows {
        let m: f64 = out[i * cols..(i + 1) * cols].iter().sum::<f64>() / cols as f64;
        out[i * cols..(i + 1) * cols]
            .iter_mut()
            .for_each(|x| *x -= m);
    }
    out
}

/// A small deterministic generator (SplitMix64) so the tests need no RNG crate.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = self.uniform().max(1e-300);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
    pub fn normals(&mut self, n: usize) -> Vec<f64> {
        (0..n).map(|_| self.normal()).collect()
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}
