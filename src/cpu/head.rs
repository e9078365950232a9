//! The stateful CPU head: every stage composed, with the state a trainer carries.

use faer::Mat;

use crate::core::config::HeadConfig;
use crate::core::report::{Solution, SolveReport};
use crate::core::state::{check_state, HeadState, MovingMeans};
use crate::core::validate::{check_len, check_magnitude, rows_of, size2, validate_labels, Label};
use crate::cpu::linalg::{from_row_major, to_row_major};
use crate::cpu::moving::{self, MovingUpdate};
use crate::cpu::solve;
use crate::cpu::{backward, classifier, stats};
use crate::error::{Error, Result};
use crate::stiefel::Factor;
use crate::Real;

/// The last forward's solution and report, kept until the next forward or import.
#[derive(Debug, Clone)]
struct Last<T> {
    p: Vec<T>,
    w: Vec<T>,
    b: Vec<T>,
    y: Vec<T>,
    mu: Vec<T>,
    report: SolveReport,
}

/// Everything a backward needs from its forward.
#[derive(Debug, Clone)]
struct Cache<T> {
    raw: Vec<T>,
    x: Vec<T>,
    labels: Vec<usize>,
    counts: Vec<usize>,
    mu: Vec<T>,
    update: MovingUpdate<T>,
    y: Vec<T>,
    e_norm: f64,
    factor: Factor,
    w: Mat<f64>,
}

/// The implicit-ETF head on the CPU, generic over `f32`/`f64` storage.
///
/// One training step is `forward` (which advances the state, as the reference does) followed
/// by `backward` with `dL/dlogits`. Any error leaves the head exactly as before the call.
///
/// ```
/// use implicit_etf::{CpuHead, HeadConfig, cross_entropy};
/// let (n, d, k) = (6, 8, 3);
/// let mut head = CpuHead::<f64>::new(HeadConfig::new(d, k)).unwrap();
/// let raw: Vec<f64> = (0..n * d).map(|i| ((i * 37 % 11) as f64) - 5.0).collect();
/// let labels: Vec<u32> = vec![0, 1, 2, 0, 1, 2];
/// let logits = head.forward(&raw, &labels).unwrap();
/// let (loss, d_logits) = cross_entropy(&logits, &labels, k).unwrap();
/// let d_raw = head.backward(&d_logits).unwrap();
/// assert!(loss.is_finite() && d_raw.len() == n * d);
/// ```
#[derive(Debug, Clone)]
pub struct CpuHead<T: Real> {
    cfg: HeadConfig,
    state: HeadState<T>,
    cache: Option<Cache<T>>,
    last: Option<Last<T>>,
}

impl<T: Real> CpuHead<T> {
    /// A fresh head (zero moving means, no `Prox`).
    pub fn new(cfg: HeadConfig) -> Result<Self> {
        cfg.validate()?;
        let state = HeadState {
            moving: MovingMeans::try_new(cfg.dim, cfg.classes)?,
            prox: None,
        };
        Ok(CpuHead {
            cfg,
            state,
            cache: None,
            last: None,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &HeadConfig {
        &self.cfg
    }

    /// A copy of the full state (fallible only for the device head's sake: the two heads
    /// read the same).
    pub fn export_state(&self) -> Result<HeadState<T>> {
        Ok(self.state.clone())
    }

    /// Replaces the state (validated first: shapes, finiteness, `alpha` in `(0, 1]`, `Prox`
    /// orthonormal to `1e-6`). Drops any pending backward.
    pub fn import_state(&mut self, state: HeadState<T>) -> Result<()> {
        check_state(&self.cfg, &state)?;
        self.state = state;
        self.cache = None;
        self.last = None;
        Ok(())
    }

    /// Checks a batch; returns `(n, labels as indices)`.
    fn validate_batch<L: Label>(&self, raw: &[T], labels: &[L]) -> Result<(usize, Vec<usize>)> {
        let n = labels.len();
        if n == 0 {
            return Err(Error::EmptyBatch);
        }
        check_len("raw", size2("N * d", n, self.cfg.dim)?, raw.len())?;
        let idx = validate_labels(labels, self.cfg.classes)?;
        check_magnitude("raw", raw)?;
        Ok((n, idx))
    }

    /// One training forward: statistics, moving means, nearest ETF, classifier; returns the
    /// logits (`N x K`). Advances the state and keeps what `backward` needs; the solution is
    /// then [`last_solution`](Self::last_solution) and its report
    /// [`solve_report`](Self::solve_report).
    pub fn forward<L: Label>(&mut self, raw: &[T], labels: &[L]) -> Result<Vec<T>> {
        let (n, labels) = self.validate_batch(raw, labels)?;
        let (d, k) = (self.cfg.dim, self.cfg.classes);
        let x = match self.cfg.tau {
            Some(tau) => stats::tau_normalise_unchecked(raw, n, d, tau),
            None => raw.to_vec(),
        };
        let st = stats::class_stats(&x, &labels, n, d, k);
        let update = moving::update(
            &self.state.moving,
            &st,
            self.cfg.moving_average,
            self.cfg.policy,
            self.cfg.alpha_floor,
        );
        let (y, e_norm) = moving::frobenius_normalise(&update.e_new);
        if !(e_norm > 0.0) || !e_norm.is_finite() {
            return Err(Error::DegenerateMeans);
        }
        let prox = self.state.prox.as_ref().map(|p| from_row_major(p, d, k));
        let sol = solve::solve(
            from_row_major(&y, d, k).as_ref(),
            prox.as_ref().map(|p| p.as_ref()),
            self.cfg.delta,
            self.cfg.solve,
        )?;
        let w = classifier::weights(sol.factor.p.as_ref());
        let (logits, b) = classifier::logits(&x, n, d, w.as_ref(), &st.mu);
        // Everything succeeded: commit.
        self.state.moving = update.next.clone();
        self.state.prox = Some(to_row_major::<f64>(sol.factor.p.as_ref()));
        self.last = Some(Last {
            p: to_row_major(sol.factor.p.as_ref()),
            w: to_row_major(w.as_ref()),
            b,
            y: y.clone(),
            mu: st.mu.clone(),
            report: sol.report,
        });
        self.cache = Some(Cache {
            raw: raw.to_vec(),
            x,
            labels,
            counts: st.counts,
            mu: st.mu,
            update,
            y,
            e_norm,
            factor: sol.factor,
            w,
        });
        Ok(logits)
    }

    /// The last forward's `P`, `W`, `b`, `Y` and `mu` (row-major host slices), if a forward
    /// was taken since the head was made or its state imported.
    pub fn last_solution(&self) -> Option<Solution<&[T]>> {
        self.last.as_ref().map(|l| Solution {
            p: &l.p[..],
            w: &l.w[..],
            b: &l.b[..],
            y: &l.y[..],
            mu: &l.mu[..],
        })
    }

    /// The last forward's solve report (`None` before a forward).
    pub fn solve_report(&self) -> Result<Option<SolveReport>> {
        Ok(self.last.as_ref().map(|l| l.report))
    }

    /// Backward of the last forward: from `dL/dlogits` (`N x K`) to `dL/draw` (`N x d`),
    /// through every path (logits, bias, and `W -> P -> Y -> moving means -> class means and
    /// mu`). Consumes the pending forward.
    pub fn backward(&mut self, d_logits: &[T]) -> Result<Vec<T>> {
        let c = self.cache.as_ref().ok_or(Error::BackwardWithoutForward)?;
        let (d, k) = (self.cfg.dim, self.cfg.classes);
        let n = c.labels.len();
        check_len("d_logits", n * k, d_logits.len())?;
        check_magnitude("d_logits", d_logits)?;
        let cg = classifier::logits_backward(&c.x, d_logits, n, d, c.w.as_ref(), &c.mu);
        let v = classifier::weights_backward(cg.dw.as_ref());
        let sg = backward::solve_backward(&c.factor, v.as_ref(), self.cfg.delta)?;
        let dy: Vec<T> = to_row_major(sg.dy.as_ref());
        let de = moving::frobenius_normalise_backward(&c.y, c.e_norm, &dy);
        let (d_centred, d_mu_mov) = moving::update_backward(&c.update, &de);
        let d_mu: Vec<T> = cg
            .dmu
            .iter()
            .zip(&d_mu_mov)
            .map(|(a, b)| T::from_f64(a + b.to_f64()))
            .collect();
        let dx_stats =
            stats::class_stats_backward(&c.labels, &c.counts, n, d, k, &d_centred, &d_mu);
        let dx: Vec<T> = cg.dx.iter().zip(&dx_stats).map(|(&a, &b)| a + b).collect();
        let dr = match self.cfg.tau {
            Some(tau) => stats::tau_normalise_backward_unchecked(&c.raw, &dx, n, d, tau),
            None => dx,
        };
        self.cache = None;
        Ok(dr)
    }

    /// Inference: logits from the current classifier (`W` from the stored `P`), with the bias
    /// `-W mu` taken from this batch's mean, as in training. Changes no state.
    /// Errors with [`Error::Untrained`] before the first training step.
    pub fn infer(&self, raw: &[T]) -> Result<Vec<T>> {
        let d = self.cfg.dim;
        let n = rows_of("raw", raw.len(), d)?;
        check_magnitude("raw", raw)?;
        let p = self.state.prox.as_ref().ok_or(Error::Untrained)?;
        let x = match self.cfg.tau {
            Some(tau) => stats::tau_normalise_unchecked(raw, n, d, tau),
            None => raw.to_vec(),
        };
        let mut mu = vec![0.0f64; d];
        for i in 0..n {
            for j in 0..d {
                mu[j] += x[i * d + j].to_f64();
            }
        }
        let mu: Vec<T> = mu.iter().map(|m| T::from_f64(m / n as f64)).collect();
        let w = classifier::weights(from_row_major(p, d, self.cfg.classes).as_ref());
        Ok(classifier::logits(&x, n, d, w.as_ref(), &mu).0)
    }

    /// The current classifier `W` (`K x d`) from the stored `P`, if a step was taken.
    pub fn classifier(&self) -> Result<Option<Vec<T>>> {
        Ok(self.state.prox.as_ref().map(|p| {
            let w = classifier::weights(from_row_major(p, self.cfg.dim, self.cfg.classes).as_ref());
            to_row_major(w.as_ref())
        }))
    }
}
