//! Configuration of the head: sizes, proximal weight, feature normalisation, moving-average
//! kind, absent-class policy and solve method.

use crate::core::validate::{check_sizes, size2};
use crate::error::{Error, Result};

/// What happens to the moving mean of a class that is absent from a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AbsentClassPolicy {
    /// Sound default: an absent class keeps its stored column unchanged (no update, no
    /// gradient); a class never yet present keeps zeros.
    #[default]
    Hold,
    /// The authors' reference rules, quirks included (`docs/head.md#absent-classes`):
    /// at step 0 an absent class's column of `C` is the *uncentred* global mean `mu`;
    /// later, a class not flagged *seen* has its stored column overwritten by `mu` *with
    /// gradient* (so `E_new[:,k] = mu`); a seen class keeps its column (no gradient).
    /// The *seen* flags are updated (`seen |= present`) only on batches in which some class
    /// is absent, so a class that only ever appeared in complete batches counts as unseen.
    /// The goldens were produced under this policy.
    Reference,
}

/// How the moving class means are averaged over steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MovingAverage {
    /// Exponential average (the reference default): `alpha <- 2/(t+2)` while the previous
    /// `alpha > 1e-4`, else `1e-4`; `E_new = alpha C + (1 - alpha) E`.
    #[default]
    Exponential,
    /// Cumulative average: `E_new = (t E + C) / (t + 1)`.
    Cumulative,
}

/// How the nearest ETF is found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SolveMethod {
    /// Default: the exact orthogonal-Procrustes solution (polar factor of `G`), polished by
    /// Riemannian Newton steps until the Riemannian gradient is at rounding level.
    #[default]
    Procrustes,
    /// The paper's route, for ablations: Riemannian Newton iterations (with a gradient-step
    /// safeguard, a simple trust-region rule) started from the warm start `Prox`, at most
    /// `max_iters` of them (the reference uses 30). For `d = K` it stays in the
    /// determinant component of its start, like the reference. From a warm start (the
    /// training regime: the previous step's `P`) it converges in a few iterations; from a
    /// far start with `delta = 1e-3`, where `sym(P^T G)` is indefinite and only safeguarded
    /// gradient steps are taken, it can need hundreds (measured in `tests/optimality.rs`),
    /// and stops at `max_iters` with the report saying so (`grad_norm`).
    Riemannian {
        /// Iteration cap.
        max_iters: usize,
    },
}

/// Configuration of an implicit-ETF head.
///
/// ```
/// use implicit_etf::{HeadConfig, AbsentClassPolicy};
/// let cfg = HeadConfig::new(512, 10)
///     .with_delta(1e-3)
///     .with_tau(Some(5.0))
///     .with_policy(AbsentClassPolicy::Reference);
/// assert!(cfg.validate().is_ok());
/// assert!(HeadConfig::new(4, 10).validate().is_err()); // d < K
/// ```
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct HeadConfig {
    /// Feature dimension `d` (must be `>= classes`).
    pub dim: usize,
    /// Number of classes `K` (must be `>= 2`).
    pub classes: usize,
    /// Proximal weight `delta` (reference: `1e-3`), `> 0`.
    pub delta: f64,
    /// Feature normalisation `x = tau r / max(||r||, 1e-12)`; `None` feeds rows unchanged.
    /// Default `Some(5.0)`, as in the reference model.
    pub tau: Option<f64>,
    /// Exponential (default) or cumulative moving means.
    pub moving_average: MovingAverage,
    /// Absent-class policy (default [`AbsentClassPolicy::Hold`]).
    pub policy: AbsentClassPolicy,
    /// Solve method (default [`SolveMethod::Procrustes`]).
    pub solve: SolveMethod,
    /// Floor of the EMA weight (reference: `1e-4`).
    pub alpha_floor: f64,
}

impl HeadConfig {
    /// The reference configuration for `dim` features and `classes` classes.
    pub fn new(dim: usize, classes: usize) -> Self {
        HeadConfig {
            dim,
            classes,
            delta: 1e-3,
            tau: Some(5.0),
            moving_average: MovingAverage::Exponential,
            policy: AbsentClassPolicy::Hold,
            solve: SolveMethod::Procrustes,
            alpha_floor: 1e-4,
        }
    }
    /// Sets the proximal weight.
    pub fn with_delta(mut self, delta: f64) -> Self {
        self.delta = delta;
        self
    }
    /// Sets (or, with `None`, turns off) the feature normalisation temperature.
    pub fn with_tau(mut self, tau: Option<f64>) -> Self {
        self.tau = tau;
        self
    }
    /// Sets the absent-class policy.
    pub fn with_policy(mut self, policy: AbsentClassPolicy) -> Self {
        self.policy = policy;
        self
    }
    /// Sets the moving-average kind.
    pub fn with_moving_average(mut self, m: MovingAverage) -> Self {
        self.moving_average = m;
        self
    }
    /// Sets the solve method.
    pub fn with_solve(mut self, s: SolveMethod) -> Self {
        self.solve = s;
        self
    }
    /// Sets the floor of the EMA weight.
    pub fn with_alpha_floor(mut self, alpha_floor: f64) -> Self {
        self.alpha_floor = alpha_floor;
        self
    }

    /// Checks every field; the head constructors call this.
    pub fn validate(&self) -> Result<()> {
        check_sizes(self.dim, self.classes)?;
        // Every `d x K` matrix of the head must be addressable (in bytes, as f64).
        size2("d * K", self.dim, self.classes).and_then(|dk| size2("d * K * 8 bytes", dk, 8))?;
        if !(self.delta.is_finite() && self.delta > 0.0) {
            return Err(Error::InvalidParameter {
                name: "delta",
                reason: format!("must be finite and > 0, got {}", self.delta),
            });
        }
        if let Some(t) = self.tau {
            if !(t.is_finite() && t > 0.0) {
                return Err(Error::InvalidParameter {
                    name: "tau",
                    reason: format!("must be finite and > 0, got {t}"),
                });
            }
        }
        if !(self.alpha_floor.is_finite() && self.alpha_floor > 0.0 && self.alpha_floor <= 1.0) {
            return Err(Error::InvalidParameter {
                name: "alpha_floor",
                reason: format!("must lie in (0, 1], got {}", self.alpha_floor),
            });
        }
        if let SolveMethod::Riemannian { max_iters } = self.solve {
            if max_iters == 0 {
                return Err(Error::InvalidParameter {
                    name: "max_iters",
                    reason: "must be at least 1".into(),
                });
            }
        }
        Ok(())
    }
}
