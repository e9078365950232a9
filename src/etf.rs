//! The stateless API: the nearest-ETF solve `Y, Prox, delta -> P` and its vector-Jacobian
//! product `dL/dP -> (dL/dY, dL/dProx)`, on plain row-major slices.

use crate::core::config::SolveMethod;
pub use crate::core::report::SolveReport;
use crate::core::validate::{check_finite, check_len, check_sizes, size2, validate_labels, Label};
use crate::cpu::linalg::{from_row_major, to_row_major};
use crate::cpu::solve;
use crate::cpu::{backward, classifier};
use crate::error::{Error, Result};
use crate::stiefel::Factor;
use crate::Real;

/// A solved nearest-ETF problem, ready for its vector-Jacobian product.
///
/// ```
/// use implicit_etf::etf::solve_etf;
/// let (d, k) = (6, 3);
/// let y: Vec<f64> = (0..d * k).map(|i| ((i * 7 % 5) as f64) - 2.0).collect();
/// let sol = solve_etf(&y, None, d, k, 1e-3).unwrap();
/// // P has orthonormal columns.
/// for a in 0..k { for b in 0..k {
///     let dot: f64 = (0..d).map(|i| sol.p[i * k + a] * sol.p[i * k + b]).sum();
///     assert!((dot - if a == b { 1.0 } else { 0.0 }).abs() < 1e-12);
/// }}
/// let v = vec![1.0; d * k];
/// let g = sol.vjp(&v).unwrap();
/// assert_eq!(g.dy.len(), d * k);
/// ```
#[derive(Debug, Clone)]
pub struct EtfSolution<T> {
    /// `P` (`d x K`, row-major).
    pub p: Vec<T>,
    /// The `Prox` used (the first-step `P_1` when none was given).
    pub prox: Vec<T>,
    /// What the solve did.
    pub report: SolveReport,
    factor: Factor,
    delta: f64,
}

/// Gradients from [`EtfSolution::vjp`].
#[derive(Debug, Clone, PartialEq)]
pub struct EtfGrads<T> {
    /// `dL/dY` (`d x K`).
    pub dy: Vec<T>,
    /// `dL/dProx` (`d x K`); `Prox` is normally a constant, so this is optional to use.
    pub dprox: Vec<T>,
}

/// Solves `argmin_{P in St(d,K)} ||Y - P M/sqrt(K-1)||^2 + (delta/2)||P - Prox||^2` with the
/// default (Procrustes) method. `prox = None` applies the first-step rule.
pub fn solve_etf<T: Real>(
    y: &[T],
    prox: Option<&[T]>,
    d: usize,
    k: usize,
    delta: f64,
) -> Result<EtfSolution<T>> {
    solve_etf_with(y, prox, d, k, delta, SolveMethod::Procrustes)
}

/// [`solve_etf`] with an explicit [`SolveMethod`].
pub fn solve_etf_with<T: Real>(
    y: &[T],
    prox: Option<&[T]>,
    d: usize,
    k: usize,
    delta: f64,
    method: SolveMethod,
) -> Result<EtfSolution<T>> {
    check_sizes(d, k)?;
    size2("d * K", d, k).and_then(|dk| size2("d * K * 8 bytes", dk, 8))?;
    if !(delta.is_finite() && delta > 0.0) {
        return Err(Error::InvalidParameter {
            name: "delta",
            reason: format!("must be finite and > 0, got {delta}"),
        });
    }
    if let SolveMethod::Riemannian { max_iters: 0 } = method {
        return Err(Error::InvalidParameter {
            name: "max_iters",
            reason: "must be at least 1".into(),
        });
    }
    check_len("y", d * k, y.len())?;
    check_finite("y", y)?;
    if let Some(p) = prox {
        check_len("prox", d * k, p.len())?;
        check_finite("prox", p)?;
    }
    if y.iter().all(|v| v.to_f64() == 0.0) {
        return Err(Error::DegenerateMeans);
    }
    let ym = from_row_major(y, d, k);
    let pm = prox.map(|p| from_row_major(p, d, k));
    let sol = solve::solve(ym.as_ref(), pm.as_ref().map(|p| p.as_ref()), delta, method)?;
    Ok(EtfSolution {
        p: to_row_major(sol.factor.p.as_ref()),
        prox: to_row_major(sol.prox.as_ref()),
        report: sol.report,
        factor: sol.factor,
        delta,
    })
}

impl<T: Real> EtfSolution<T> {
    /// The vector-Jacobian product: `dL/dP` (`d x K`) to `dL/dY` and `dL/dProx`.
    pub fn vjp(&self, dl_dp: &[T]) -> Result<EtfGrads<T>> {
        let (d, k) = (self.factor.p.nrows(), self.factor.p.ncols());
        check_len("dl_dp", d * k, dl_dp.len())?;
        check_finite("dl_dp", dl_dp)?;
        let g = backward::solve_backward(
            &self.factor,
            from_row_major(dl_dp, d, k).as_ref(),
            self.delta,
        )?;
        Ok(EtfGrads {
            dy: to_row_major(g.dy.as_ref()),
            dprox: to_row_major(g.dprox.as_ref()),
        })
    }

    /// The classifier `W = sqrt(K/(K-1)) M P^T` (`K x d`).
    pub fn classifier(&self) -> Vec<T> {
        to_row_major(classifier::weights(self.factor.p.as_ref()).as_ref())
    }
}

/// Mean cross-entropy of `logits` (`N x K`) against `labels`, and `dL/dlogits`.
///
/// ```
/// let (loss, g) = implicit_etf::cross_entropy(&[0.0f64, 0.0], &[1u32], 2).unwrap();
/// assert!((loss - std::f64::consts::LN_2).abs() < 1e-15);
/// assert_eq!(g, vec![0.5, -0.5]);
/// ```
pub fn cross_entropy<T: Real, L: Label>(
    logits: &[T],
    labels: &[L],
    k: usize,
) -> Result<(f64, Vec<T>)> {
    if labels.is_empty() {
        return Err(Error::EmptyBatch);
    }
    check_len("logits", size2("N * K", labels.len(), k)?, logits.len())?;
    check_finite("logits", logits)?;
    let idx = validate_labels(labels, k)?;
    Ok(classifier::cross_entropy(logits, &idx, k))
}
