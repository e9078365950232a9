//! Shared helpers of the integration tests: golden loading, random data, norms.
#![allow(dead_code)]

use serde_json::Value;

use implicit_etf::runtime::Device;
mod devices;
pub mod parallel;
#[allow(unused_imports)] // not every test file runs on devices
pub use devices::devices;

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

mod rng;
pub use rng::Rng;

// ---------------------------------------------------------------------------------------
// Dense linear-algebra helpers for the oracle tests (faer, float64, row-major <-> Mat).
// ---------------------------------------------------------------------------------------

use faer::Mat;

/// Row-major slice -> column-major faer matrix.
pub fn to_mat(v: &[f64], rows: usize, cols: usize) -> Mat<f64> {
    assert_eq!(v.len(), rows * cols);
    Mat::from_fn(rows, cols, |i, j| v[i * cols + j])
}

/// faer matrix -> row-major vector.
pub fn from_mat(m: &Mat<f64>) -> Vec<f64> {
    let mut out = Vec::with_capacity(m.nrows() * m.ncols());
    for i in 0..m.nrows() {
        for j in 0..m.ncols() {
            out.push(m[(i, j)]);
        }
    }
    out
}

/// A `rows x cols` matrix of standard normals.
pub fn gaussian(rng: &mut Rng, rows: usize, cols: usize) -> Mat<f64> {
    Mat::from_fn(rows, cols, |_, _| rng.normal())
}

/// Polar factor `U V^T` of a full-column-rank `x` (thin SVD, independent of the crate's
/// Gram-matrix route).
pub fn polar(x: &Mat<f64>) -> Mat<f64> {
    let svd = x.thin_svd().expect("svd");
    svd.U() * svd.V().transpose()
}

/// Singular values (descending) of `x`.
pub fn singular_values(x: &Mat<f64>) -> Vec<f64> {
    let mut s = x.singular_values().expect("svd");
    s.sort_by(|a, b| b.partial_cmp(a).unwrap());
    s
}

/// A random point of St(d, K): the polar factor of a Gaussian matrix.
pub fn random_stiefel(rng: &mut Rng, d: usize, k: usize) -> Mat<f64> {
    polar(&gaussian(rng, d, k))
}

/// Frobenius norm.
pub fn fro(m: &Mat<f64>) -> f64 {
    m.norm_l2()
}

/// `max |P^T P - I|`.
pub fn orth_err(p: &Mat<f64>) -> f64 {
    let g = p.transpose() * p;
    let mut e = 0.0f64;
    for i in 0..g.nrows() {
        for j in 0..g.ncols() {
            let t = if i == j { 1.0 } else { 0.0 };
            e = e.max((g[(i, j)] - t).abs());
        }
    }
    e
}

/// `sym(A) = (A + A^T) / 2`.
pub fn sym(a: &Mat<f64>) -> Mat<f64> {
    let n = a.nrows();
    Mat::from_fn(n, n, |i, j| 0.5 * (a[(i, j)] + a[(j, i)]))
}

/// `M = I_K - 1 1^T / K`.
pub fn centering(k: usize) -> Mat<f64> {
    Mat::from_fn(k, k, |i, j| {
        (if i == j { 1.0 } else { 0.0 }) - 1.0 / k as f64
    })
}

/// `G = c Y M + delta Prox`, `c = 2/sqrt(K-1)`, built independently of the crate.
pub fn g_of(y: &Mat<f64>, prox: &Mat<f64>, delta: f64) -> Mat<f64> {
    let k = y.ncols();
    let c = 2.0 / ((k - 1) as f64).sqrt();
    y * centering(k) * faer::Scale(c) + prox * faer::Scale(delta)
}

/// `||Y - P M / sqrt(K-1)||^2 + (delta/2) ||P - Prox||^2`, built independently of the crate.
pub fn objective_of(y: &Mat<f64>, p: &Mat<f64>, prox: &Mat<f64>, delta: f64) -> f64 {
    let k = y.ncols();
    let r = y - p * centering(k) * faer::Scale(1.0 / ((k - 1) as f64).sqrt());
    let q = p - prox;
    r.norm_l2().powi(2) + 0.5 * delta * q.norm_l2().powi(2)
}

/// Riemannian gradient norm `||G - P sym(P^T G)||_F`.
pub fn riem_grad(p: &Mat<f64>, g: &Mat<f64>) -> f64 {
    let b = sym(&(p.transpose() * g));
    fro(&(g - p * b))
}

/// Determinant of a square matrix.
pub fn det(m: &Mat<f64>) -> f64 {
    m.determinant()
}

/// Random Y (d x K) with unit Frobenius norm, as the head produces.
pub fn random_y(rng: &mut Rng, d: usize, k: usize) -> Mat<f64> {
    let y = gaussian(rng, d, k);
    let n = fro(&y);
    y * faer::Scale(1.0 / n)
}

/// `||a - b||_F / ||b||_F` on matrices.
pub fn rel_mat(a: &Mat<f64>, b: &Mat<f64>) -> f64 {
    fro(&(a - b)) / fro(b).max(1e-300)
}

// ---------------------------------------------------------------------------------------
// The head goldens' format (one parser for every test that reads them).
// ---------------------------------------------------------------------------------------

use implicit_etf::{AbsentClassPolicy, HeadConfig, HeadState, MovingMeans};

/// One step of a head golden (`tests/data/head_*.json`): the reference's state before it,
/// the batch's labels and raw features.
pub struct GoldenStep {
    pub state: HeadState<f64>,
    pub labels: Vec<i64>,
    pub raw: Vec<f64>,
}

/// The steps of a head golden.
pub fn golden_head_steps(g: &serde_json::Value) -> Vec<GoldenStep> {
    g["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|st| {
            let sb = &st["state_before"];
            GoldenStep {
                state: HeadState {
                    moving: MovingMeans {
                        e: mat(&sb["ema_prev"]).2,
                        step: sb["count"].as_u64().unwrap(),
                        alpha: sb["alpha"].as_f64().unwrap(),
                        seen: sb["has_sampled"]
                            .as_array()
                            .unwrap()
                            .iter()
                            .map(|b| b.as_bool().unwrap())
                            .collect(),
                    },
                    prox: (!sb["prox"].is_null()).then(|| mat(&sb["prox"]).2),
                },
                labels: st["labels"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_i64().unwrap())
                    .collect(),
                raw: mat(&st["raw"]).2,
            }
        })
        .collect()
}

/// The head configuration a head golden was produced with (the reference's rules).
pub fn golden_head_config(g: &serde_json::Value) -> HeadConfig {
    let (d, k) = (
        g["d"].as_u64().unwrap() as usize,
        g["K"].as_u64().unwrap() as usize,
    );
    assert_eq!(g["ema"].as_str(), Some("EMA"));
    HeadConfig::new(d, k)
        .with_tau(Some(g["tau"].as_f64().unwrap()))
        .with_delta(g["delta"].as_f64().unwrap())
        .with_policy(AbsentClassPolicy::Reference)
}

/// A float64 state as the `f32` state a device head imports.
pub fn state_f32(s: &HeadState<f64>) -> HeadState<f32> {
    HeadState {
        moving: MovingMeans {
            e: s.moving.e.iter().map(|&v| v as f32).collect(),
            step: s.moving.step,
            alpha: s.moving.alpha,
            seen: s.moving.seen.clone(),
        },
        prox: s.prox.clone(),
    }
}

// ---------------------------------------------------------------------------------------
// A CPU forward with everything it reports, for the tests that check more than the logits.
// ---------------------------------------------------------------------------------------

/// The logits and the solution of one `CpuHead` forward.
#[derive(Debug, Clone)]
pub struct Fwd<T> {
    pub logits: Vec<T>,
    pub w: Vec<T>,
    pub b: Vec<T>,
    pub y: Vec<T>,
    pub mu: Vec<T>,
    pub p: Vec<T>,
    pub report: implicit_etf::SolveReport,
}

/// `head.forward(raw, labels)`, then `last_solution()` and `solve_report()`.
pub fn fwd<T: implicit_etf::Real, L: implicit_etf::Label>(
    head: &mut implicit_etf::CpuHead<T>,
    raw: &[T],
    labels: &[L],
) -> implicit_etf::Result<Fwd<T>> {
    let logits = head.forward(raw, labels)?;
    let s = head.last_solution().expect("a forward was taken");
    Ok(Fwd {
        logits,
        w: s.w.to_vec(),
        b: s.b.to_vec(),
        y: s.y.to_vec(),
        mu: s.mu.to_vec(),
        p: s.p.to_vec(),
        report: head.solve_report()?.expect("a forward was taken"),
    })
}
