//! The stateful CPU head: every stage composed, with the state a trainer carries.

use std::sync::Arc;

use faer::{Mat, MatRef};

use crate::collective::Collective;
use crate::core::config::HeadConfig;
use crate::core::report::{Solution, SolveReport};
use crate::core::state::{check_state, HeadState, MovingMeans};
use crate::core::validate::{
    check_len, check_magnitude, rows_of, size2, validate_labels_into, Label,
};
use crate::cpu::classifier;
use crate::cpu::linalg::{from_row_major, load_row_major, store_row_major, to_row_major};
use crate::cpu::moving::{self, ColumnSource};
use crate::cpu::solve::Solver;
use crate::cpu::stats;
use crate::error::{Error, Result};
use crate::stiefel::Factor;
use crate::Real;

/// What a forward leaves for its backward and for [`CpuHead::last_solution`]. Two slots
/// alternate: a forward writes the one not holding the last solution, so that a failed
/// forward leaves the pending backward and the last solution as they were.
#[derive(Debug, Clone)]
struct Slot<T> {
    raw: Vec<T>,
    x: Vec<T>,
    labels: Vec<usize>,
    /// Class counts and rows of the step: over every rank's rows with a collective.
    counts: Vec<usize>,
    n_total: usize,
    mu: Vec<T>,
    sources: Vec<ColumnSource>,
    weight: f64,
    y: Vec<T>,
    e_norm: f64,
    factor: Factor,
    /// `P` row-major (`d x K`, f64), its row means, `W^T = a P M` and `P` in `T`.
    p_rm: Vec<f64>,
    pmean: Vec<f64>,
    wt: Vec<T>,
    p_t: Vec<T>,
    /// `W` (`K x d` row-major), `b` (`K`).
    w_t: Vec<T>,
    b: Vec<T>,
    report: SolveReport,
}

impl<T: Real> Slot<T> {
    fn new(d: usize, k: usize) -> Slot<T> {
        let z = T::from_f64(0.0);
        Slot {
            raw: Vec::new(),
            x: Vec::new(),
            labels: Vec::new(),
            counts: vec![0; k],
            n_total: 0,
            mu: vec![z; d],
            sources: vec![ColumnSource::Held; k],
            weight: 0.0,
            y: vec![z; d * k],
            e_norm: 0.0,
            factor: Factor {
                p: Mat::zeros(d, k),
                u: Mat::zeros(d, k),
                q: Mat::zeros(k, k),
                s: vec![0.0; k],
            },
            p_rm: vec![0.0; d * k],
            pmean: vec![0.0; d],
            wt: vec![z; d * k],
            p_t: vec![z; d * k],
            w_t: vec![z; d * k],
            b: vec![z; k],
            report: SolveReport {
                steps: 0,
                grad_norm: 0.0,
                objective: 0.0,
                orthogonality: 0.0,
                first_step: false,
                sweeps: 0,
                refine_fallback: false,
            },
        }
    }
}

/// Scratch shared by every step (its contents do not outlive a call).
#[derive(Debug, Clone)]
struct Scratch<T> {
    sums: Vec<f64>,
    total: Vec<f64>,
    centred: Vec<T>,
    next: MovingMeans<T>,
    y64: Mat<f64>,
    prox64: Mat<f64>,
    solver: Solver,
    b64: Vec<f64>,
    db: Vec<f64>,
    xtdz: Vec<T>,
    v: Vec<f64>,
    dy: Mat<f64>,
    dy_t: Vec<T>,
    de: Vec<T>,
    d_centred: Vec<T>,
    d_mu: Vec<f64>,
    dmu_cls: Vec<f64>,
    per_class: Vec<f64>,
    g_mu: Vec<f64>,
    dx: Vec<T>,
}

impl<T: Real> Scratch<T> {
    fn new(d: usize, k: usize) -> Result<Scratch<T>> {
        let z = T::from_f64(0.0);
        Ok(Scratch {
            sums: vec![0.0; k * d],
            total: vec![0.0; d],
            centred: vec![z; d * k],
            next: MovingMeans::try_new(d, k)?,
            y64: Mat::zeros(d, k),
            prox64: Mat::zeros(d, k),
            solver: Solver::new(d, k)?,
            b64: vec![0.0; k],
            db: vec![0.0; k],
            xtdz: vec![z; d * k],
            v: vec![0.0; d * k],
            dy: Mat::zeros(d, k),
            dy_t: vec![z; d * k],
            de: vec![z; d * k],
            d_centred: vec![z; d * k],
            d_mu: vec![0.0; d],
            dmu_cls: vec![0.0; d],
            per_class: vec![0.0; k * d],
            g_mu: vec![0.0; d],
            dx: Vec::new(),
        })
    }
}

/// The memory of a head's steps: made on the first forward, reused after.
#[derive(Debug, Clone)]
struct Work<T> {
    slots: [Slot<T>; 2],
    scratch: Scratch<T>,
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
    work: Option<Box<Work<T>>>,
    /// The slot of the last successful forward.
    cur: usize,
    /// A forward's solution is available (`last_solution`).
    has_last: bool,
    /// A backward is pending for slot `cur`.
    pending: bool,
    /// The data-parallel group, if any (shared by clones of the head).
    collective: Option<Arc<Collective>>,
    /// The buffer the collective sums (forward `K d + K + d + 2`, backward `K d + K + 1`).
    packed: Vec<f64>,
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
            work: None,
            cur: 0,
            has_last: false,
            pending: false,
            collective: None,
            packed: Vec::new(),
        })
    }

    /// Makes this head one rank of a data-parallel group: every step sums the batch
    /// statistics (forward) and the classifier's gradient sums (backward) over the group's
    /// ranks, so that each rank computes the logits and feature gradients of its own rows of
    /// the global batch exactly as one head over the whole batch would (`docs/data-parallel.md`).
    /// Every rank must call `forward`/`backward` together, with heads of the same
    /// configuration and state. An invalid input on one rank fails the step on every rank
    /// ([`Error::PeerFailed`] on the others), and no rank changes its state. A rank's batch
    /// may be empty (the global one may not). `infer` stays local: it uses this rank's batch
    /// mean. Errors: an NCCL group (a CPU head sums host memory: use
    /// [`Collective::threads`]).
    ///
    /// ```
    /// use implicit_etf::Collective;
    /// use implicit_etf::{CpuHead, HeadConfig};
    /// let (d, k) = (4, 2);
    /// let raw: Vec<f64> = (0..6 * d).map(|i| ((i * 7 % 5) as f64) - 2.0).collect();
    /// let labels = [0u32, 1, 0, 1, 1, 0];
    /// let ranks = Collective::threads(2).unwrap();
    /// let logits: Vec<Vec<f64>> = std::thread::scope(|s| {
    ///     let hs: Vec<_> = ranks.into_iter().enumerate().map(|(r, c)| {
    ///         let (raw, labels) = (&raw, &labels);
    ///         s.spawn(move || {
    ///             let mut head = CpuHead::<f64>::new(HeadConfig::new(d, k))
    ///                 .unwrap()
    ///                 .with_collective(c)
    ///                 .unwrap();
    ///             // Rank r takes rows 3r..3r+3.
    ///             head.forward(&raw[3 * r * d..3 * (r + 1) * d], &labels[3 * r..3 * r + 3]).unwrap()
    ///         })
    ///     }).collect();
    ///     hs.into_iter().map(|h| h.join().unwrap()).collect()
    /// });
    /// let whole = CpuHead::<f64>::new(HeadConfig::new(d, k)).unwrap().forward(&raw, &labels).unwrap();
    /// let sharded: Vec<f64> = logits.concat();
    /// assert!(whole.iter().zip(&sharded).all(|(a, b)| (a - b).abs() < 1e-12));
    /// ```
    pub fn with_collective(mut self, collective: Collective) -> Result<Self> {
        self.set_collective(collective)?;
        Ok(self)
    }

    /// [`with_collective`](Self::with_collective) in place (the candle adapter's).
    pub(crate) fn set_collective(&mut self, collective: Collective) -> Result<()> {
        if collective.kind() != "threads" {
            return Err(Error::InvalidParameter {
                name: "collective",
                reason: format!(
                    "a CPU head sums host memory: it needs Collective::threads, got a {} group",
                    collective.kind()
                ),
            });
        }
        self.collective = Some(Arc::new(collective));
        Ok(())
    }

    /// For a caller whose own checks failed before it called `forward` (`backward`: false)
    /// or `backward` (true): takes part in that step's all-reduce with this rank's failure
    /// flag, so that the other ranks fail too instead of waiting. Nothing without a
    /// collective; changes no state.
    #[cfg_attr(not(feature = "candle"), allow(dead_code))]
    pub(crate) fn fail_step(&mut self, backward: bool) {
        let (d, k) = (self.cfg.dim, self.cfg.classes);
        if let Some(c) = self.collective.clone() {
            let (len, phase) = if backward {
                (k * d + k + 1, "backward")
            } else {
                (k * d + k + d + 2, "forward")
            };
            let _ = self.reduce_step(&c, len, phase, Err::<(), _>(Error::EmptyBatch), |_, _| {});
        }
    }

    /// The data-parallel group of this head, if any.
    pub fn collective(&self) -> Option<&Collective> {
        self.collective.as_deref()
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
        self.pending = false;
        self.has_last = false;
        Ok(())
    }

    /// One training forward: statistics, moving means, nearest ETF, classifier; returns the
    /// logits (`N x K`). Advances the state and keeps what `backward` needs; the solution is
    /// then [`last_solution`](Self::last_solution) and its report
    /// [`solve_report`](Self::solve_report).
    pub fn forward<L: Label>(&mut self, raw: &[T], labels: &[L]) -> Result<Vec<T>> {
        // The input's shape first: the logits (N x K, K <= d) are then no larger than `raw`.
        let n = labels.len();
        if n == 0 && self.collective.is_none() {
            return Err(Error::EmptyBatch);
        }
        let mut out = match size2("N * d", n, self.cfg.dim)
            .and_then(|len| check_len("raw", len, raw.len()))
        {
            Ok(()) => vec![T::from_f64(0.0); n * self.cfg.classes],
            // With a collective the error must still go through the step (the other ranks
            // wait for this one).
            Err(_) if self.collective.is_some() => Vec::new(),
            Err(e) => return Err(e),
        };
        self.forward_into(raw, labels, &mut out)?;
        Ok(out)
    }

    /// [`forward`](Self::forward) into `logits` (`N x K`, overwritten). After the first
    /// steps of a shape, a step made of `forward_into` and
    /// [`backward_into`](Self::backward_into) allocates nothing (`docs/performance.md`).
    pub fn forward_into<L: Label>(
        &mut self,
        raw: &[T],
        labels: &[L],
        logits: &mut [T],
    ) -> Result<()> {
        let local = self.forward_rows(raw, labels, logits);
        let n_total = match self.collective.clone() {
            None => local?,
            Some(c) => self.forward_reduce(&c, local)?,
        };
        self.forward_finish(n_total, logits)
    }

    /// The forward's checks and the additive statistics of this rank's rows (into the free
    /// slot and the scratch). Returns `N`.
    fn forward_rows<L: Label>(
        &mut self,
        raw: &[T],
        labels: &[L],
        logits: &mut [T],
    ) -> Result<usize> {
        let (d, k) = (self.cfg.dim, self.cfg.classes);
        let n = labels.len();
        if n == 0 && self.collective.is_none() {
            return Err(Error::EmptyBatch);
        }
        check_len("raw", size2("N * d", n, d)?, raw.len())?;
        check_len("logits", size2("N * K", n, k)?, logits.len())?;
        let (next, tau) = (1 - self.cur, self.cfg.tau);
        let work = self.work_mut(n)?;
        let Work { slots, scratch } = work;
        let slot = &mut slots[next];
        validate_labels_into(labels, k, &mut slot.labels)?;
        check_magnitude("raw", raw)?;
        // Stage 1: features and batch statistics.
        slot.raw.clear();
        slot.raw.extend_from_slice(raw);
        slot.x.resize(n * d, T::from_f64(0.0));
        match tau {
            Some(tau) => stats::tau_normalise_into(raw, d, tau, &mut slot.x),
            None => slot.x.copy_from_slice(raw),
        }
        stats::class_sums_into(
            &slot.x,
            &slot.labels,
            d,
            &mut scratch.sums,
            &mut scratch.total,
            &mut slot.counts,
        );
        Ok(n)
    }

    /// The step's memory, made on the first call (`n`: the rows of that call).
    fn work_mut(&mut self, n: usize) -> Result<&mut Work<T>> {
        let (d, k) = (self.cfg.dim, self.cfg.classes);
        if self.work.is_none() {
            // The products' per-thread memory too (the logits are N x d x K).
            crate::dense::warm_threads(n.saturating_mul(d).saturating_mul(k));
            self.work = Some(Box::new(Work {
                slots: [Slot::new(d, k), Slot::new(d, k)],
                scratch: Scratch::new(d, k)?,
            }));
        }
        Ok(self.work.as_mut().expect("made above"))
    }

    /// Sums the forward's statistics over the ranks (one all-reduce of `K d + K + d + 2`
    /// values: class sums, counts, feature sum, rows, failed ranks). Every rank takes part,
    /// also one whose own checks failed (`local`), so that all fail together. Returns the
    /// global `N`.
    fn forward_reduce(&mut self, c: &Collective, local: Result<usize>) -> Result<usize> {
        let (d, k) = (self.cfg.dim, self.cfg.classes);
        let next = 1 - self.cur;
        let n = *local.as_ref().unwrap_or(&0);
        let mut packed = self.reduce_step(c, k * d + k + d + 2, "forward", local, |w, p| {
            p[..k * d].copy_from_slice(&w.scratch.sums);
            for (o, &cnt) in p[k * d..k * d + k].iter_mut().zip(&w.slots[next].counts) {
                *o = cnt as f64;
            }
            p[k * d + k..k * d + k + d].copy_from_slice(&w.scratch.total);
            p[k * d + k + d] = n as f64;
        })?;
        let n_total = packed[k * d + k + d] as usize;
        let out = if n_total == 0 {
            Err(Error::EmptyBatch)
        } else {
            let w = self.work.as_deref_mut().expect("made by forward_rows");
            w.scratch.sums.copy_from_slice(&packed[..k * d]);
            for (o, &cnt) in w.slots[next]
                .counts
                .iter_mut()
                .zip(&packed[k * d..k * d + k])
            {
                *o = cnt as usize;
            }
            w.scratch
                .total
                .copy_from_slice(&packed[k * d + k..k * d + k + d]);
            Ok(n_total)
        };
        self.packed = std::mem::take(&mut packed);
        out
    }

    /// One all-reduce of a step's `len` values: `fill` packs them when this rank's checks
    /// passed (`local`), else the rank sends zeros; the last value counts the failed ranks.
    /// Returns the summed buffer, or this rank's own error, or [`Error::PeerFailed`].
    fn reduce_step<V>(
        &mut self,
        c: &Collective,
        len: usize,
        phase: &'static str,
        local: Result<V>,
        fill: impl FnOnce(&Work<T>, &mut [f64]),
    ) -> Result<Vec<f64>> {
        let mut packed = std::mem::take(&mut self.packed);
        packed.clear();
        packed.resize(len, 0.0);
        match (&local, self.work.as_deref()) {
            (Ok(_), Some(w)) => fill(w, &mut packed),
            _ => packed[len - 1] = 1.0,
        }
        let reduced = c.all_reduce_host(&mut packed);
        let failed = (packed[len - 1] as usize).saturating_sub(usize::from(local.is_err()));
        let out = reduced.and(local.map(|_| ())).and_then(|()| match failed {
            0 => Ok(()),
            ranks => Err(Error::PeerFailed { phase, ranks }),
        });
        match out {
            Ok(()) => Ok(packed),
            Err(e) => {
                self.packed = packed;
                Err(e)
            }
        }
    }

    /// The forward from the summed statistics over `n_total` rows (this rank's, or every
    /// rank's with a collective) to this rank's logits, then the commit.
    fn forward_finish(&mut self, n_total: usize, logits: &mut [T]) -> Result<()> {
        let (d, k) = (self.cfg.dim, self.cfg.classes);
        let cfg = &self.cfg;
        let next = 1 - self.cur;
        let state = &self.state;
        let Work { slots, scratch } = &mut **self.work.as_mut().expect("made by forward_rows");
        let [s0, s1] = slots;
        let (slot, last) = if next == 0 { (s0, &*s1) } else { (s1, &*s0) };
        slot.n_total = n_total;
        stats::class_means_into(
            &scratch.sums,
            &mut scratch.total,
            &slot.counts,
            n_total,
            &mut slot.mu,
            &mut scratch.centred,
        );
        // Stage 2: moving means, normalised.
        slot.weight = moving::update_into(
            &state.moving,
            &slot.counts,
            &slot.mu,
            &scratch.centred,
            cfg.moving_average,
            cfg.policy,
            cfg.alpha_floor,
            &mut scratch.next,
            &mut slot.sources,
        );
        slot.e_norm = moving::frobenius_normalise_into(&scratch.next.e, &mut slot.y);
        if !(slot.e_norm > 0.0) || !slot.e_norm.is_finite() {
            return Err(Error::DegenerateMeans);
        }
        // Stage 3: the nearest ETF.
        load_row_major(&slot.y, scratch.y64.as_mut());
        // Prox column-major: the last forward's P when it is the state's (no import since),
        // else the imported state's, transposed once.
        let prox = match &state.prox {
            Some(_) if self.has_last => Some(last.factor.p.as_ref()),
            Some(p) => {
                load_row_major(p, scratch.prox64.as_mut());
                Some(scratch.prox64.as_ref())
            }
            None => None,
        };
        slot.report = scratch
            .solver
            .solve(scratch.y64.as_ref(), prox, cfg.delta, cfg.solve)?;
        std::mem::swap(&mut slot.factor, scratch.solver.factor_mut());
        // Stage 4: the classifier and the logits.
        store_row_major(slot.factor.p.as_ref(), 1.0, &mut slot.p_rm);
        classifier::classifier_from_rows(
            &slot.p_rm,
            k,
            &mut slot.pmean,
            &mut slot.wt,
            &mut slot.p_t,
        );
        classifier::transpose_into(&slot.wt, d, k, &mut slot.w_t);
        classifier::bias_into(&slot.p_rm, &slot.pmean, &slot.mu, &mut scratch.b64);
        for (o, &v) in slot.b.iter_mut().zip(&scratch.b64) {
            *o = T::from_f64(v);
        }
        if !logits.is_empty() {
            classifier::logits_into(&slot.x, d, &slot.wt, &scratch.b64, logits);
        }
        // Everything succeeded: commit.
        std::mem::swap(&mut self.state.moving, &mut scratch.next);
        match &mut self.state.prox {
            Some(p) => p.copy_from_slice(&slot.p_rm),
            None => self.state.prox = Some(slot.p_rm.clone()),
        }
        self.cur = next;
        self.has_last = true;
        self.pending = true;
        Ok(())
    }

    /// The last forward's `P`, `W`, `b`, `Y` and `mu` (row-major host slices), if a forward
    /// was taken since the head was made or its state imported.
    pub fn last_solution(&self) -> Option<Solution<&[T]>> {
        let s = &self.work.as_ref().filter(|_| self.has_last)?.slots[self.cur];
        Some(Solution {
            p: &s.p_t[..],
            w: &s.w_t[..],
            b: &s.b[..],
            y: &s.y[..],
            mu: &s.mu[..],
        })
    }

    /// The last forward's solve report (`None` before a forward).
    pub fn solve_report(&self) -> Result<Option<SolveReport>> {
        Ok(self
            .work
            .as_ref()
            .filter(|_| self.has_last)
            .map(|w| w.slots[self.cur].report))
    }

    /// Backward of the last forward: from `dL/dlogits` (`N x K`) to `dL/draw` (`N x d`),
    /// through every path (logits, bias, and `W -> P -> Y -> moving means -> class means and
    /// mu`). Consumes the pending forward. With a collective, `d_logits` is this rank's rows
    /// of the gradient of the global loss (for a mean over the global batch: divided by the
    /// global `N`, not this rank's).
    pub fn backward(&mut self, d_logits: &[T]) -> Result<Vec<T>> {
        if !self.pending && self.collective.is_none() {
            return Err(Error::BackwardWithoutForward);
        }
        let n = match self.work.as_ref().filter(|_| self.pending) {
            Some(w) => w.slots[self.cur].labels.len(),
            None => 0,
        };
        let mut out = vec![T::from_f64(0.0); n * self.cfg.dim];
        self.backward_into(d_logits, &mut out)?;
        Ok(out)
    }

    /// [`backward`](Self::backward) into `d_raw` (`N x d`, overwritten).
    pub fn backward_into(&mut self, d_logits: &[T], d_raw: &mut [T]) -> Result<()> {
        let local = self.backward_rows(d_logits, d_raw);
        if let Some(c) = self.collective.clone() {
            self.backward_reduce(&c, local)?;
        } else {
            local?;
        }
        self.backward_finish(d_raw)
    }

    /// The backward's checks and its products over this rank's rows: `db`, `X^T dZ` and the
    /// direct path `dZ W`.
    fn backward_rows(&mut self, d_logits: &[T], d_raw: &[T]) -> Result<()> {
        if !self.pending {
            return Err(Error::BackwardWithoutForward);
        }
        let (d, k) = (self.cfg.dim, self.cfg.classes);
        let cur = self.cur;
        let Work { slots, scratch } =
            &mut **self.work.as_mut().ok_or(Error::BackwardWithoutForward)?;
        let c = &slots[cur];
        let n = c.labels.len();
        check_len("d_logits", n * k, d_logits.len())?;
        check_len("d_raw", n * d, d_raw.len())?;
        check_magnitude("d_logits", d_logits)?;
        let s = scratch;
        s.dx.resize(n * d, T::from_f64(0.0));
        classifier::logits_backward_rows(
            &c.x,
            d_logits,
            d,
            &c.wt,
            &mut s.db,
            &mut s.xtdz,
            &mut s.dx,
        );
        Ok(())
    }

    /// Sums `X^T dZ` and `db` over the ranks (one all-reduce of `K d + K + 1` values, the
    /// last the failed ranks); every rank takes part, also one whose checks failed.
    fn backward_reduce(&mut self, c: &Collective, local: Result<()>) -> Result<()> {
        let (d, k) = (self.cfg.dim, self.cfg.classes);
        let packed = self.reduce_step(c, k * d + k + 1, "backward", local, |w, p| {
            for (o, v) in p[..k * d].iter_mut().zip(&w.scratch.xtdz) {
                *o = v.to_f64();
            }
            p[k * d..k * d + k].copy_from_slice(&w.scratch.db);
        })?;
        let w = self.work.as_deref_mut().expect("checked by backward_rows");
        for (o, &v) in w.scratch.xtdz.iter_mut().zip(&packed[..k * d]) {
            *o = T::from_f64(v);
        }
        w.scratch.db.copy_from_slice(&packed[k * d..k * d + k]);
        self.packed = packed;
        Ok(())
    }

    /// The backward from the (summed) classifier sums to `d_raw`.
    fn backward_finish(&mut self, d_raw: &mut [T]) -> Result<()> {
        let (d, k) = (self.cfg.dim, self.cfg.classes);
        let cfg = &self.cfg;
        let cur = self.cur;
        let Work { slots, scratch } =
            &mut **self.work.as_mut().ok_or(Error::BackwardWithoutForward)?;
        let c = &slots[cur];
        let s = scratch;
        classifier::logits_backward_params(
            &s.xtdz,
            &s.db,
            &c.p_rm,
            &c.pmean,
            &c.mu,
            &mut s.v,
            &mut s.dmu_cls,
        );
        s.solver.backward_with(
            &c.factor,
            MatRef::from_row_major_slice(&s.v, d, k),
            cfg.delta,
            s.dy.as_mut(),
            None,
        )?;
        store_row_major(s.dy.as_ref(), 1.0, &mut s.dy_t);
        moving::frobenius_normalise_backward_into(&c.y, c.e_norm, &s.dy_t, &mut s.de);
        moving::update_backward_into(&c.sources, c.weight, &s.de, &mut s.d_centred, &mut s.d_mu);
        for (a, &b) in s.d_mu.iter_mut().zip(&s.dmu_cls) {
            *a += b;
        }
        stats::class_stats_backward_add(
            &c.labels,
            &c.counts,
            c.n_total,
            d,
            &s.d_centred,
            &s.d_mu,
            &mut s.per_class,
            &mut s.g_mu,
            &mut s.dx,
        );
        match cfg.tau {
            Some(tau) => stats::tau_normalise_backward_into(&c.raw, &s.dx, d, tau, d_raw),
            None => d_raw.copy_from_slice(&s.dx),
        }
        self.pending = false;
        Ok(())
    }

    /// Inference: logits from the current classifier (`W` from the stored `P`), with the bias
    /// `-W mu` taken from this batch's mean, as in training. Changes no state.
    /// Errors with [`Error::Untrained`] before the first training step.
    pub fn infer(&self, raw: &[T]) -> Result<Vec<T>> {
        let (d, k) = (self.cfg.dim, self.cfg.classes);
        let n = rows_of("raw", raw.len(), d)?;
        check_magnitude("raw", raw)?;
        let p = self.state.prox.as_ref().ok_or(Error::Untrained)?;
        let x = match self.cfg.tau {
            Some(tau) => stats::tau_normalise_unchecked(raw, n, d, tau),
            None => raw.to_vec(),
        };
        let mut mu = vec![0.0f64; d];
        for row in x.chunks_exact(d) {
            for (m, v) in mu.iter_mut().zip(row) {
                *m += v.to_f64();
            }
        }
        let mu: Vec<T> = mu.iter().map(|m| T::from_f64(m / n as f64)).collect();
        let z = T::from_f64(0.0);
        let (mut pmean, mut wt, mut p_t, mut b) =
            (vec![0.0; d], vec![z; d * k], vec![z; d * k], vec![0.0; k]);
        classifier::classifier_from_rows(p, k, &mut pmean, &mut wt, &mut p_t);
        classifier::bias_into(p, &pmean, &mu, &mut b);
        let mut out = vec![z; n * k];
        classifier::logits_into(&x, d, &wt, &b, &mut out);
        Ok(out)
    }

    /// The current classifier `W` (`K x d`) from the stored `P`, if a step was taken.
    pub fn classifier(&self) -> Result<Option<Vec<T>>> {
        Ok(self.state.prox.as_ref().map(|p| {
            let w = classifier::weights(from_row_major(p, self.cfg.dim, self.cfg.classes).as_ref());
            to_row_major(w.as_ref())
        }))
    }
}
