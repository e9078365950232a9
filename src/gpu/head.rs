//! The implicit-ETF head on a [`Device`]: every stage on the GPU (or on the CPU execution of
//! the same kernels), with device buffers in and out.
//!
//! One training step is [`DeviceHead::forward`] (features and labels to logits; advances the
//! state) then [`DeviceHead::backward`] (`dL/dlogits` to `dL/dfeatures`). Semantics are the
//! CPU head's ([`crate::CpuHead`]): the same configuration, absent-class policies, EMA/CMA
//! means, first-step gauge and state export/import; the tests compare the two.
//!
//! **Precision.** Features `f32`, `f16` or `bf16` (arithmetic in `f32`); labels `u32` or
//! `i64`. The ETF solve and the implicit backward (`G`, the Gram matrix, the eigensolver, `P`,
//! the tangent solve) are float64; the statistics and the classifier are float32.
//!
//! **No host synchronisation after the first step.** Data-dependent errors (a label out of
//! range, a non-finite value, degenerate means, a numerical failure) are recorded in a device
//! status word ([`super::status`]); the kernels that commit the state read it and change
//! nothing when the step failed. With [`Validation::Eager`] (the default) `forward` and
//! `backward` read that word back at the end (one 32-byte copy) and return the typed error, like
//! the CPU head. With [`Validation::Deferred`] they never synchronise and never copy to the
//! host, so a trainer can overlap steps or capture them in a CUDA graph; errors are then read
//! with [`DeviceHead::check`] whenever the trainer chooses (a failed step has left the state
//! unchanged, and its logits and gradient are meaningless). The first step is the exception:
//! its gauge rule (`docs/solve.md#the-first-step-gauge-rule`) runs on
//! the host in float64 (exactly the CPU head's code), which reads `Y` back once.
//!
//! **No allocation after the third step.** Every intermediate buffer comes from the head's
//! workspaces ([`crate::runtime::memory`]): two forward workspaces used alternately (so the
//! previous step's saved tensors stay intact while a new step runs or is rejected), one for
//! the backward, one for the first step (dropped by the second). The second and third steps
//! fill the two forward workspaces; from the fourth on, [`DeviceHead::forward_into`] and
//! [`DeviceHead::backward_into`] (outputs in caller-owned buffers) allocate and free nothing,
//! and with [`Validation::Deferred`] such a step can be captured with
//! [`Device::begin_capture`] and replayed with [`crate::runtime::Graph::launch`]
//! (`tests/device_capture.rs`; README, "Capturing a step in a CUDA graph"). A change of batch
//! size refills the workspaces (two more uncaptured steps).
//!
//! ```
//! use implicit_etf::runtime::{Device, DType};
//! use implicit_etf::{DeviceHead, HeadConfig};
//! let dev = Device::cpu(); // or Device::cuda(0)?
//! let (n, d, k) = (6, 8, 3);
//! let mut head = DeviceHead::new(dev, HeadConfig::new(d, k)).unwrap();
//! let raw: Vec<f32> = (0..n * d).map(|i| ((i * 37 % 11) as f32) - 5.0).collect();
//! let labels: Vec<u32> = vec![0, 1, 2, 0, 1, 2];
//! let x = head.device().upload(&raw).unwrap();
//! let y = head.device().upload(&labels).unwrap();
//! for _ in 0..2 {
//!     let logits = head.forward(&x, &y).unwrap(); // N x K f32, on the device
//!     assert_eq!((logits.len(), logits.dtype()), (n * k, DType::F32));
//!     // ... the trainer's loss gives dL/dlogits on the device:
//!     let d_logits = head.device().upload(&vec![0.01f32; n * k]).unwrap();
//!     let d_raw = head.backward(&d_logits).unwrap(); // N x d f32, on the device
//!     assert_eq!(d_raw.len(), n * d);
//! }
//! ```

use super::backward;
use super::classifier::{self, ClassifierGradsDev};
use super::collective;
use super::linalg::{EigenSolver, GemmKernel};
use super::moving::MovingStateDev;
use super::pipeline::{self, StatsForward, StatsOptions};
use super::shape::check_buffer;
use super::solve;
use super::stats;
use super::status::{Part, Status};
use super::stiefel::FactorDev;
use crate::collective::Collective;
use crate::core::config::{HeadConfig, SolveMethod};
use crate::core::report::{Solution, SolveReport};
use crate::core::state::MovingMeans;
use crate::core::state::{check_state, HeadState};
use crate::core::validate::{check_len, rows_of, size2};
use crate::cpu::linalg::{from_row_major, to_row_major};
use crate::cpu::solve::{objective, riemannian_gradient_norm};
use crate::error::{Error, Result};
use crate::kernels;
use crate::runtime::{grid_stride, Buffer, DType, Device};
use crate::stiefel::orthogonality_error;

/// When data-dependent errors reach the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Validation {
    /// `forward`/`backward` read the device status word back and return the typed error
    /// (one small synchronising copy per call). The default.
    #[default]
    Eager,
    /// No synchronisation and no device-to-host copy in `forward`/`backward` (after the first
    /// step); call [`DeviceHead::check`] to learn about failed steps.
    Deferred,
}

/// Options of the device head beyond [`HeadConfig`], set with the `with_*` builders.
///
/// ```
/// use implicit_etf::{DeviceOptions, Validation};
/// let opt = DeviceOptions::default()
///     .with_validation(Validation::Deferred)
///     .with_max_newton_steps(1);
/// assert_eq!(opt.validation, Validation::Deferred);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct DeviceOptions {
    /// Product kernel (tiled on a GPU, direct on the CPU execution by default).
    pub gemm: GemmKernel,
    /// Symmetric eigensolver: one block for small `K`, block Jacobi over many blocks for
    /// large `K` on a GPU (see [`EigenSolver::Auto`]).
    pub eigensolver: EigenSolver,
    /// Jacobi sweep cap of the eigensolver (a cold start takes 6-10, a warm start 1-3). The
    /// block solver launches all of them (`2 nb - 1` launches each), turning those after
    /// convergence into no-ops on the device, so a lower cap saves launch overhead there.
    pub max_sweeps: usize,
    /// Start the eigensolver from the previous step's eigenvectors.
    pub warm_start: bool,
    /// When errors reach the host.
    pub validation: Validation,
    /// At most this many Riemannian Newton steps after the Procrustes solve (0: none, the
    /// default). The Gram route leaves `P` within `~eps cond(G)^2` of the optimum (`1e-10`
    /// at the default `delta`, well inside the tests' tolerances); one step takes it to
    /// rounding level, which matters for a tiny `delta`. The polish stops on the device once
    /// the Riemannian gradient and `P^T P - I` are at rounding level (the CPU head's rule);
    /// the remaining steps' kernels then return at once. A step costs about ten
    /// `d x K x K` products and a warm Jacobi.
    pub max_newton_steps: usize,
}

impl DeviceOptions {
    /// Sets the product kernel.
    pub fn with_gemm(mut self, gemm: GemmKernel) -> Self {
        self.gemm = gemm;
        self
    }
    /// Sets the eigensolver.
    pub fn with_eigensolver(mut self, eigensolver: EigenSolver) -> Self {
        self.eigensolver = eigensolver;
        self
    }
    /// Sets the Jacobi sweep cap.
    pub fn with_max_sweeps(mut self, max_sweeps: usize) -> Self {
        self.max_sweeps = max_sweeps;
        self
    }
    /// Turns the eigensolver's warm start on or off.
    pub fn with_warm_start(mut self, warm_start: bool) -> Self {
        self.warm_start = warm_start;
        self
    }
    /// Sets when errors reach the host.
    pub fn with_validation(mut self, validation: Validation) -> Self {
        self.validation = validation;
        self
    }
    /// Sets the Newton step cap.
    pub fn with_max_newton_steps(mut self, max_newton_steps: usize) -> Self {
        self.max_newton_steps = max_newton_steps;
        self
    }
}

impl Default for DeviceOptions {
    fn default() -> Self {
        DeviceOptions {
            gemm: GemmKernel::Auto,
            eigensolver: EigenSolver::Auto,
            max_sweeps: 30,
            warm_start: true,
            validation: Validation::Eager,
            max_newton_steps: 0,
        }
    }
}

/// The last forward's solve, kept for the backward and for [`DeviceHead::solve_report`].
#[derive(Debug)]
struct LastSolve {
    factor: FactorDev,
    y: Buffer,
    mu: Buffer,
    prox_used: Buffer,
    first_step: bool,
    w: Buffer,
    b: Buffer,
}

/// What a backward needs from its forward.
#[derive(Debug)]
struct Pending {
    n: usize,
    /// The statistics stage's forward (with the features the classifier saw, f32).
    stats: StatsForward,
}

/// The implicit-ETF head on a device (a CUDA GPU, or the CPU execution of the kernels).
/// See the [module documentation](self) for the step, the precision and the synchronisation
/// rules.
#[derive(Debug)]
pub struct DeviceHead {
    dev: Device,
    cfg: HeadConfig,
    opt: DeviceOptions,
    moving: MovingStateDev,
    /// `Prox` (d x K f64); `None` before the first successful step.
    prox: Option<Buffer>,
    /// The `Prox` buffer of a head whose state was imported without one: the next first step
    /// writes its `P` there, so a graph captured earlier keeps addressing the head's `Prox`.
    spare_prox: Option<Buffer>,
    /// 1 i32 on the device: 1 while the head has a `Prox` (a captured step may replay), 0
    /// after `import_state` without one (a replay then fails; see `step_begin_*` in `kernels/head/stats.cu`).
    armed: Buffer,
    /// The previous eigenvectors (K x K f64), for the warm start.
    q_warm: Option<Buffer>,
    status: Status,
    last: Option<LastSolve>,
    pending: Option<Pending>,
    /// The forward workspace of the next ordinary step (0 or 1).
    arena: usize,
    /// What filled each forward workspace last: the ordinary step it served (see
    /// [`StepKey`]); a step with the same key reuses every slot.
    filled: [Option<StepKey>; 2],
    /// The batch size and first-step flag the backward workspace was filled with.
    bwd_filled: Option<(usize, bool)>,
    /// Whether the status word's backward half may hold a returned backward error (reset
    /// before the next backward; a forward resets it anyway).
    bwd_dirty: bool,
    /// The data-parallel group, if any ([`DeviceHead::with_collective`]).
    collective: Option<Collective>,
}

/// What decides the buffer requests of an ordinary forward: the batch size, the feature type
/// and whether a warm start is kept (the configuration and options are fixed per head).
type StepKey = (usize, DType, bool);

/// Workspace of the backward's scratch buffers (none outlives a backward).
const BACKWARD_WORKSPACE: usize = 2;
/// Workspace of the first step (solved on the host; a different request sequence), dropped
/// by the next ordinary step.
const FIRST_WORKSPACE: usize = 3;
/// Largest [`DeviceOptions::max_sweeps`] (a cold Jacobi takes 6-10 sweeps, a hard spectrum
/// about 16): the block solver launches every sweep up to the cap.
pub const MAX_SWEEPS: usize = 100;
/// Largest [`DeviceOptions::max_newton_steps`]: the polish converges quadratically, and every
/// step takes its own workspace slots.
pub const MAX_NEWTON_STEPS: usize = 8;

impl DeviceHead {
    /// A fresh head on `dev` with the default [`DeviceOptions`].
    pub fn new(dev: Device, cfg: HeadConfig) -> Result<Self> {
        Self::with_options(dev, cfg, DeviceOptions::default())
    }

    /// A fresh head with explicit options. Errors: an invalid configuration, an eigensolver
    /// that cannot take `K` (the one-block solver stops at 1024, a block width must be 1 to
    /// 24), dimensions beyond the kernels' `i32` range, or
    /// [`SolveMethod::Riemannian`] (the device head solves in closed form only).
    pub fn with_options(dev: Device, cfg: HeadConfig, opt: DeviceOptions) -> Result<Self> {
        cfg.validate()?;
        if !matches!(cfg.solve, SolveMethod::Procrustes) {
            return Err(Error::InvalidParameter {
                name: "solve",
                reason: "the device head implements the Procrustes solve only".into(),
            });
        }
        opt.eigensolver
            .resolve(&dev, cfg.classes)
            .validate(cfg.classes)?;
        if i32::try_from(size2("d * K", cfg.dim, cfg.classes)?).is_err() {
            return Err(Error::InvalidParameter {
                name: "dim",
                reason: "d * K exceeds the i32 range of the kernels".into(),
            });
        }
        if !(1..=MAX_SWEEPS).contains(&opt.max_sweeps) {
            return Err(Error::InvalidParameter {
                name: "max_sweeps",
                reason: format!("must be 1..={MAX_SWEEPS}, got {}", opt.max_sweeps),
            });
        }
        if opt.max_newton_steps > MAX_NEWTON_STEPS {
            return Err(Error::InvalidParameter {
                name: "max_newton_steps",
                reason: format!(
                    "must be at most {MAX_NEWTON_STEPS} (one step reaches rounding level), got {}",
                    opt.max_newton_steps
                ),
            });
        }
        // The kernels' second and third grid dimensions (classes in the class sums) are at
        // most 65535, and so is the batch (rows in the backward's scatter; checked per call).
        if cfg.classes > 65535 {
            return Err(Error::InvalidParameter {
                name: "classes",
                reason: format!(
                    "the device head takes at most 65535 classes, got {}",
                    cfg.classes
                ),
            });
        }
        let moving = MovingStateDev::new(&dev, cfg.dim, cfg.classes)?;
        let armed = dev.alloc_zeros(DType::I32, 1)?;
        let status = Status::new(&dev)?;
        Ok(DeviceHead {
            dev,
            cfg,
            opt,
            moving,
            prox: None,
            spare_prox: None,
            armed,
            q_warm: None,
            status,
            last: None,
            pending: None,
            arena: 0,
            filled: [None; 2],
            bwd_filled: None,
            bwd_dirty: false,
            collective: None,
        })
    }

    /// Makes this head one rank of a data-parallel group (`docs/data-parallel.md`): each
    /// forward sums the batch statistics over the ranks (one all-reduce of `K d + K + d + 2`
    /// f32 values, queued on the device's stream), each backward the classifier's gradient
    /// sums (`K d + K + 1` values), so that every rank solves the same `P` and returns the
    /// logits and feature gradients of its own rows of the global batch as one head over the
    /// whole batch would. Every rank calls `forward`/`backward` together, with heads of the
    /// same configuration and state; an invalid input on one rank fails the step on every
    /// rank ([`Error::PeerFailed`] on the others, through the status word, so with
    /// [`Validation::Deferred`] at [`check`](Self::check)) and no rank commits. A rank's
    /// batch may be empty. Errors: an NCCL group on the CPU execution. A thread group on a
    /// CUDA device works through the host (a synchronisation per all-reduce, no capture).
    pub fn with_collective(mut self, collective: Collective) -> Result<Self> {
        self.set_collective(collective)?;
        Ok(self)
    }

    /// [`with_collective`](Self::with_collective) in place (the candle adapter's).
    pub(crate) fn set_collective(&mut self, collective: Collective) -> Result<()> {
        if collective.kind() == "nccl" && self.dev.backend() != crate::runtime::Backend::Cuda {
            return Err(Error::InvalidParameter {
                name: "collective",
                reason: "an NCCL group needs a CUDA device; the CPU execution takes \
                         Collective::threads"
                    .into(),
            });
        }
        self.collective = Some(collective);
        Ok(())
    }

    /// For a caller whose own checks failed before it called `forward` (`backward`: false)
    /// or `backward` (true): takes part in that step's all-reduce with this rank's failure
    /// flag, so that the other ranks fail too. Nothing without a collective.
    #[cfg_attr(not(feature = "candle-cuda"), allow(dead_code))]
    pub(crate) fn fail_step(&self, backward: bool) {
        let (d, k) = (self.cfg.dim, self.cfg.classes);
        let len = if backward {
            collective::backward_len(d, k)
        } else {
            collective::forward_len(d, k)
        };
        let _ = self.fail_with_peers(Error::EmptyBatch, len);
    }

    /// The data-parallel group of this head, if any.
    pub fn collective(&self) -> Option<&Collective> {
        self.collective.as_ref()
    }

    /// A step that failed on the host before its all-reduce still takes part in it (with
    /// this rank's failure flag), so that the other ranks fail too instead of waiting; returns
    /// `err`.
    fn fail_with_peers(&self, err: Error, len: usize) -> Error {
        if let Some(c) = &self.collective {
            let mut v = vec![0.0f32; len];
            v[len - 1] = 1.0;
            let sent = self
                .dev
                .upload(&v)
                .and_then(|mut b| c.all_reduce(&self.dev, &mut b));
            if let Err(e) = sent {
                return e;
            }
        }
        err
    }

    /// The device (to upload inputs and download results).
    pub fn device(&self) -> &Device {
        &self.dev
    }

    /// The configuration.
    pub fn config(&self) -> &HeadConfig {
        &self.cfg
    }

    /// The options.
    pub fn options(&self) -> &DeviceOptions {
        &self.opt
    }

    fn stats_options(&self) -> StatsOptions {
        StatsOptions {
            tau: self.cfg.tau,
            average: self.cfg.moving_average,
            policy: self.cfg.policy,
            alpha_floor: self.cfg.alpha_floor,
        }
    }

    /// Host-side checks of a batch: returns `N`.
    fn batch_shape(&self, raw: &Buffer, labels: &Buffer) -> Result<usize> {
        let n = labels.len();
        if n == 0 && self.collective.is_none() {
            return Err(Error::EmptyBatch);
        }
        if !matches!(labels.dtype(), DType::U32 | DType::I64) {
            return Err(Error::InvalidParameter {
                name: "labels",
                reason: format!("labels must be u32 or i64, got {:?}", labels.dtype()),
            });
        }
        if !matches!(raw.dtype(), DType::F32 | DType::F16 | DType::BF16) {
            return Err(Error::InvalidParameter {
                name: "raw",
                reason: format!("features must be f32, f16 or bf16, got {:?}", raw.dtype()),
            });
        }
        check_len("raw", size2("raw", n, self.cfg.dim)?, raw.len())?;
        if i32::try_from(raw.len()).is_err() {
            return Err(Error::InvalidParameter {
                name: "raw",
                reason: "N * d exceeds the i32 range of the kernels".into(),
            });
        }
        if n > 65535 {
            return Err(Error::InvalidParameter {
                name: "raw",
                reason: format!(
                    "the device head takes batches of at most 65535 rows (a grid dimension of \
                     its backward), got {n}"
                ),
            });
        }
        Ok(n)
    }

    /// One training forward: `raw` (N x d; f32, f16 or bf16) and `labels` (N; u32 or i64) to
    /// the logits (N x K f32, a new buffer). Advances the state (moving means, `Prox`) on the
    /// device and keeps what [`backward`](Self::backward) needs. Errors leave the head
    /// unchanged (see [`Validation`] for when data-dependent ones are returned).
    /// [`forward_into`](Self::forward_into) writes into a buffer of yours instead.
    pub fn forward(&mut self, raw: &Buffer, labels: &Buffer) -> Result<Buffer> {
        let mut logits = self
            .dev
            .alloc(DType::F32, labels.len() * self.cfg.classes)?;
        self.forward_into(raw, labels, &mut logits)?;
        Ok(logits)
    }

    /// [`forward`](Self::forward) writing the logits into `logits` (N x K f32, caller-owned,
    /// overwritten). After the first step this allocates and frees nothing on the device:
    /// every intermediate lives in the head's workspaces (see [`crate::runtime::memory`]), so
    /// with [`Validation::Deferred`] a step made of `forward_into` and
    /// [`backward_into`](Self::backward_into) can be captured with
    /// [`Device::begin_capture`] and replayed with [`crate::runtime::Graph::launch`]
    /// (refill the input buffers with [`Device::write`] or your own kernels between
    /// launches). Errors as [`forward`](Self::forward), plus: `logits` of the wrong length or
    /// type, and, during a capture, [`Validation::Eager`] or a first step (both read the
    /// device from the host).
    pub fn forward_into(
        &mut self,
        raw: &Buffer,
        labels: &Buffer,
        logits: &mut Buffer,
    ) -> Result<()> {
        let (d, k) = (self.cfg.dim, self.cfg.classes);
        let n = match self
            .batch_shape(raw, labels)
            .and_then(|n| check_buffer(logits, "logits", n * k, DType::F32).map(|()| n))
        {
            Ok(n) => n,
            Err(e) => return Err(self.fail_with_peers(e, collective::forward_len(d, k))),
        };
        let first_step = self.prox.is_none();
        let key: StepKey = (n, raw.dtype(), self.q_warm.is_some());
        if self.dev.is_capturing() {
            self.check_capturable()?;
            // A warm start not yet kept would be allocated (after the first step, or after
            // `import_state`).
            let keeps_warm = self.q_warm.is_some();
            if first_step || !keeps_warm || self.filled[self.arena] != Some(key) {
                return Err(not_filled());
            }
        } else if !first_step {
            // Refilled below; marked again only if the step succeeds.
            self.filled[self.arena] = None;
        }
        let dev = &self.dev;
        let gk = self.opt.gemm;
        // Every scratch buffer of this step comes from forward workspace `arena`; the other
        // one holds the previous step's saved tensors (`last`, `pending`).
        let scope = dev.workspace(if first_step {
            FIRST_WORKSPACE
        } else {
            self.arena
        });
        self.bwd_dirty = false;
        let mut sf = pipeline::forward_deferred(
            dev,
            raw,
            labels,
            n,
            &self.moving,
            self.stats_options(),
            (!first_step).then_some(&self.armed),
            self.collective.as_ref(),
            &mut self.status,
        )?;
        // Stage markers (`Device::set_profiling`; one atomic load when off).
        dev.mark("forward: statistics")?;
        let (factor, prox_used) = match &self.prox {
            None => {
                // First step: the gauge rule on the host (reads Y back once).
                pipeline::write_y(dev, &mut sf)?;
                self.status.read(dev)?.forward_error(k, "raw")?;
                let y: Vec<f32> = dev.download(&sf.y)?;
                let sol = crate::cpu::solve::solve(
                    from_row_major(&y, d, k).as_ref(),
                    None,
                    self.cfg.delta,
                    SolveMethod::Procrustes,
                )?;
                let f = FactorDev::upload(dev, &sol.factor, sol.g.as_ref())?;
                let prox = dev.upload(&to_row_major::<f64>(sol.prox.as_ref()))?;
                (f, prox)
            }
            Some(prox) => {
                let g = solve::build_g(
                    dev,
                    &sf.update.e_new,
                    &sf.norm_buf,
                    prox,
                    &mut sf.y,
                    d,
                    k,
                    self.cfg.delta,
                )?;
                let warm = if self.opt.warm_start {
                    self.q_warm.as_ref()
                } else {
                    None
                };
                let eig = self.opt.eigensolver;
                let f = solve::procrustes(
                    dev,
                    gk,
                    eig,
                    g,
                    warm,
                    d,
                    k,
                    self.opt.max_sweeps,
                    &mut self.status,
                )?;
                let f = solve::newton_polish(
                    dev,
                    gk,
                    eig,
                    f,
                    d,
                    k,
                    self.opt.max_newton_steps,
                    self.opt.max_sweeps,
                    &mut self.status,
                )?;
                // Written by the commit below (the Prox this step solved with).
                let used = match &self.q_warm {
                    Some(_) => dev.alloc(DType::F64, d * k)?,
                    None => dev.copy(prox)?,
                };
                (f, used)
            }
        };
        dev.mark("forward: solve")?;
        let w = classifier::weights(dev, &factor.p, d, k)?;
        let b = classifier::logits_into(dev, gk, &sf.x, &w, &sf.stats.mu, n, d, k, logits)?;
        dev.mark("forward: classifier")?;
        // `Y` and `mu` are only read from here on: the last solve shares the pending
        // backward's.
        let y_kept = sf.y.share();
        let mu_kept = sf.stats.mu.share();
        let mut prox_used = prox_used;
        // The state below outlives every workspace.
        drop(scope);
        // Ownership moves only after every fallible call, so an error keeps the buffers that
        // a captured graph may address.
        match (self.prox.as_mut(), self.q_warm.as_mut()) {
            (Some(p), Some(q)) => {
                // The steady state: one launch commits everything (skipped by the kernel when
                // the status word records an error) and keeps the Prox this step used.
                commit_step(
                    dev,
                    &mut self.moving,
                    &sf.update,
                    p,
                    &factor.p,
                    &mut prox_used,
                    q,
                    &factor.q,
                    &self.status,
                )?;
            }
            (prox, _) => {
                self.moving.commit(dev, &sf.update, &self.status.buf)?;
                if let Some(p) = prox {
                    commit(dev, p, &factor.p, &self.status)?;
                } else {
                    // The first step (its status was checked above): into the buffer kept
                    // from an import without a `Prox`, if any.
                    match self.spare_prox.as_mut() {
                        Some(p) => dev.copy_into(p, &factor.p)?,
                        None => self.spare_prox = Some(dev.copy(&factor.p)?),
                    }
                    dev.write(&mut self.armed, &[1i32])?;
                    self.prox = self.spare_prox.take();
                }
                // The warm start's buffer (kept also without warm starts: the steady-state
                // commit writes it).
                if self.q_warm.is_none() {
                    self.q_warm = Some(dev.copy(&factor.q)?);
                }
            }
        }
        dev.mark("forward: commit")?;
        if self.opt.validation == Validation::Eager && !first_step {
            let word = self.status.read(dev)?;
            word.forward_error(k, "raw")?;
        }
        self.last = Some(LastSolve {
            factor,
            y: y_kept,
            mu: mu_kept,
            prox_used,
            first_step,
            w,
            b,
        });
        self.pending = Some(Pending { n, stats: sf });
        if !first_step {
            self.filled[self.arena] = Some(key);
            self.arena = 1 - self.arena;
            // Nothing aliases the first step's workspace any more.
            self.dev.clear_workspace(FIRST_WORKSPACE);
        }
        Ok(())
    }

    /// During a capture, only steps that never read the device from the host can be
    /// recorded (call only while capturing).
    fn check_capturable(&self) -> Result<()> {
        if self.opt.validation == Validation::Eager {
            return Err(Error::Capture {
                op: "forward_into".into(),
                reason: "a captured step needs Validation::Deferred (Eager reads the status \
                         word back after every call)"
                    .into(),
            });
        }
        Ok(())
    }

    /// Backward of the last forward: `d_logits` (N x K f32) to `dL/draw` (N x d f32, a new
    /// buffer), through every path (logits, bias, and `W -> P -> Y -> moving means -> class
    /// means and mu`). Consumes the pending forward (an error keeps it).
    /// [`backward_into`](Self::backward_into) writes into a buffer of yours instead.
    pub fn backward(&mut self, d_logits: &Buffer) -> Result<Buffer> {
        let n = self
            .pending
            .as_ref()
            .ok_or(Error::BackwardWithoutForward)?
            .n;
        let mut d_raw = self.dev.alloc(DType::F32, n * self.cfg.dim)?;
        self.backward_into(d_logits, &mut d_raw)?;
        Ok(d_raw)
    }

    /// [`backward`](Self::backward) writing `dL/draw` into `d_raw` (N x d f32, caller-owned,
    /// overwritten); allocates and frees nothing on the device (see
    /// [`forward_into`](Self::forward_into) for capturing a step). Errors as
    /// [`backward`](Self::backward), plus `d_raw` of the wrong length or type.
    pub fn backward_into(&mut self, d_logits: &Buffer, d_raw: &mut Buffer) -> Result<()> {
        let (d, k) = (self.cfg.dim, self.cfg.classes);
        let checked = match (self.pending.as_ref(), self.last.as_ref()) {
            (Some(p), Some(_)) => check_buffer(d_logits, "d_logits", p.n * k, DType::F32)
                .and_then(|()| check_buffer(d_raw, "d_raw", p.n * d, DType::F32)),
            _ => Err(Error::BackwardWithoutForward),
        };
        if let Err(e) = checked {
            return Err(self.fail_with_peers(e, collective::backward_len(d, k)));
        }
        let p = self.pending.as_ref().ok_or(Error::BackwardWithoutForward)?;
        let last = self.last.as_ref().ok_or(Error::BackwardWithoutForward)?;
        let n = p.n;
        let bwd_key = (n, last.first_step);
        if self.dev.is_capturing() {
            self.check_capturable()?;
            if self.bwd_filled != Some(bwd_key) {
                return Err(not_filled());
            }
        } else {
            self.bwd_filled = None;
        }
        let dev = &self.dev;
        let gk = self.opt.gemm;
        let scope = dev.workspace(BACKWARD_WORKSPACE);
        if self.bwd_dirty {
            // A backward since the last forward left its half of the status word set (its
            // error was returned); the forward's `step_begin` resets both halves otherwise.
            self.status.reset(dev, Part::Backward)?;
        }
        self.bwd_dirty = true;
        let sf = &p.stats;
        let ClassifierGradsDev { dx, dp, dmu } = classifier::backward(
            dev,
            gk,
            &sf.x,
            d_logits,
            &last.w,
            &sf.stats.mu,
            n,
            d,
            k,
            self.collective.as_ref(),
            &mut self.status,
        )?;
        dev.mark("backward: classifier")?;
        let (dy, dot) =
            backward::solve_backward(dev, gk, &last.factor, &sf.y, &dp, d, k, &mut self.status)?;
        dev.mark("backward: solve")?;
        pipeline::backward_into(dev, sf, &dy, &dot, &dmu, &dx, d_raw)?;
        dev.mark("backward: statistics")?;
        drop(scope);
        if self.opt.validation == Validation::Eager {
            self.status.read(dev)?.backward_error()?;
        }
        self.pending = None;
        self.bwd_dirty = false;
        self.bwd_filled = Some(bwd_key);
        Ok(())
    }

    /// Reads the status word: the error of the last forward (or of the last backward) if it
    /// failed. With [`Validation::Deferred`] this is how failures reach the host (it
    /// synchronises). A [`Error::LabelOutOfRange`] carries the first offending index and that
    /// label's value, both recorded on the device.
    pub fn check(&self) -> Result<()> {
        let word = self.status.read(&self.dev)?;
        word.forward_error(self.cfg.classes, "raw")?;
        word.backward_error()
    }

    /// Inference: logits (N x K f32) from the current classifier, with the bias `-W mu` from
    /// this batch's mean (as in training). Changes no state. [`Error::Untrained`] before the
    /// first step; a non-finite feature gives [`Error::NonFinite`] (a synchronisation).
    pub fn infer(&self, raw: &Buffer) -> Result<Buffer> {
        let (d, k) = (self.cfg.dim, self.cfg.classes);
        let n = rows_of("raw", raw.len(), d)?;
        let prox = self.prox.as_ref().ok_or(Error::Untrained)?;
        let dev = &self.dev;
        let mut st = Status::new(dev)?;
        let (x, _) = stats::prepare_rows(dev, raw, n, d, self.cfg.tau, &mut st)?;
        st.read(dev)?.forward_error(k, "raw")?;
        let mu = classifier::col_means(dev, &x, n, d)?;
        let w = classifier::weights(dev, prox, d, k)?;
        Ok(classifier::logits(dev, self.opt.gemm, &x, &w, &mu, n, d, k)?.0)
    }

    /// The current classifier `W` (K x d f32, on the device) from the stored `P`, if a step
    /// was taken.
    pub fn classifier(&self) -> Result<Option<Buffer>> {
        match &self.prox {
            None => Ok(None),
            Some(p) => Ok(Some(classifier::weights(
                &self.dev,
                p,
                self.cfg.dim,
                self.cfg.classes,
            )?)),
        }
    }

    /// The last forward's `P` (d x K f64), `W` (K x d f32), `b` (K f32), `Y` (d x K f32) and
    /// `mu` (d f32), on the device (workspace buffers: the next steps overwrite them).
    pub fn last_solution(&self) -> Option<Solution<&Buffer>> {
        self.last.as_ref().map(|l| Solution {
            p: &l.factor.p,
            w: &l.w,
            b: &l.b,
            y: &l.y,
            mu: &l.mu,
        })
    }

    /// The last forward's solve report, computed on the host in float64 (downloads `P`, `G`,
    /// `Y` and `Prox`: a synchronisation; meant for diagnostics, not for every step).
    pub fn solve_report(&self) -> Result<Option<SolveReport>> {
        let Some(l) = &self.last else {
            return Ok(None);
        };
        let (d, k) = (self.cfg.dim, self.cfg.classes);
        let dev = &self.dev;
        let p = from_row_major(&dev.download::<f64>(&l.factor.p)?, d, k);
        let g = from_row_major(&dev.download::<f64>(&l.factor.g)?, d, k);
        let y = from_row_major(&dev.download::<f32>(&l.y)?, d, k);
        let prox = from_row_major(&dev.download::<f64>(&l.prox_used)?, d, k);
        let info = dev.download::<i32>(&l.factor.sweeps)?;
        let sweeps = info[0].max(0) as usize;
        // The polish's counters exist only when it runs (they are not written otherwise).
        let newton = if self.opt.max_newton_steps > 0 && !l.first_step {
            dev.download::<i32>(&l.factor.newton)?[0].max(0) as usize
        } else {
            0
        };
        Ok(Some(SolveReport {
            steps: newton,
            grad_norm: riemannian_gradient_norm(p.as_ref(), g.as_ref())?,
            objective: objective(y.as_ref(), p.as_ref(), prox.as_ref(), self.cfg.delta)?,
            orthogonality: orthogonality_error(p.as_ref()),
            first_step: l.first_step,
            sweeps,
            refine_fallback: info[1] == 1,
        }))
    }

    /// A host copy of the full state (moving means as f32, `Prox` as f64), in the CPU head's
    /// format: `CpuHead::<f32>::import_state` resumes from it, and so does
    /// [`import_state`](Self::import_state).
    pub fn export_state(&self) -> Result<HeadState<f32>> {
        let dev = &self.dev;
        let (step, alpha) = self.moving.scalars(dev)?;
        Ok(HeadState {
            moving: MovingMeans {
                e: dev.download::<f32>(&self.moving.e)?,
                step,
                alpha,
                seen: dev
                    .download::<i32>(&self.moving.seen)?
                    .iter()
                    .map(|&v| v != 0)
                    .collect(),
            },
            prox: match &self.prox {
                Some(p) => Some(dev.download::<f64>(p)?),
                None => None,
            },
        })
    }

    /// Replaces the state (validated first, as the CPU head does), writing it into the
    /// head's device buffers in place: a captured step replayed afterwards continues from
    /// it. Drops any pending backward and the eigensolver's warm start (so the next two
    /// steps must run uncaptured before a capture). Not allowed during a capture.
    pub fn import_state(&mut self, state: HeadState<f32>) -> Result<()> {
        check_state(&self.cfg, &state)?;
        if self.dev.is_capturing() {
            return Err(Error::Capture {
                op: "import_state".into(),
                reason: "import_state writes the state from the host; not during a capture".into(),
            });
        }
        let dev = &self.dev;
        let seen: Vec<i32> = state.moving.seen.iter().map(|&s| i32::from(s)).collect();
        // In place (the shapes were validated), so that a captured step replayed later
        // continues from the imported state.
        dev.write(&mut self.moving.e, &state.moving.e)?;
        dev.write(
            &mut self.moving.scal,
            &[state.moving.step as f64, state.moving.alpha],
        )?;
        dev.write(&mut self.moving.seen, &seen)?;
        match &state.prox {
            Some(v) => {
                // Into the head's `Prox` buffer (or the one kept from an earlier import), so
                // that a captured step replays from the imported `Prox`.
                if self.prox.is_none() {
                    self.prox = self.spare_prox.take();
                }
                match self.prox.as_mut() {
                    Some(p) => dev.write(p, v)?,
                    None => self.prox = Some(dev.upload(v)?),
                }
                dev.write(&mut self.armed, &[1i32])?;
            }
            None => {
                if let Some(p) = self.prox.take() {
                    self.spare_prox = Some(p);
                }
                dev.write(&mut self.armed, &[0i32])?;
            }
        }
        self.q_warm = None;
        self.pending = None;
        self.last = None;
        // The next steps take other paths (no warm start yet): refill before capturing.
        self.filled = [None; 2];
        self.bwd_filled = None;
        Ok(())
    }
}

/// The error of a step captured before its workspace was filled.
fn not_filled() -> Error {
    Error::Capture {
        op: "forward_into".into(),
        reason: "this step's workspace has not been filled by an uncaptured step of the same \
                 batch size yet: the first step solves on the host and the next two fill the \
                 two forward workspaces, so capture from the fourth step on (and again only \
                 after two uncaptured steps when the batch size or feature type changes, or after \
                 import_state)"
            .into(),
    }
}

/// The steady-state commit in one launch (`commit_step_f32` of `kernels/head/moving.cu`):
/// the moving means, `Prox <- P` and the warm start `q_warm <- Q`, unless the status word
/// records a forward error; `prox_used` receives the `Prox` the step solved with either way.
#[allow(clippy::too_many_arguments)]
fn commit_step(
    dev: &Device,
    moving: &mut MovingStateDev,
    u: &crate::gpu::moving::MovingUpdateDev,
    prox: &mut Buffer,
    p: &Buffer,
    prox_used: &mut Buffer,
    q_warm: &mut Buffer,
    q: &Buffer,
    status: &Status,
) -> Result<()> {
    let (d, k) = (moving.d, moving.k);
    for (what, b, len) in [
        ("E", &moving.e, d * k),
        ("E_new", &u.e_new, d * k),
        ("seen", &moving.seen, k),
        ("seen_new", &u.seen_new, k),
        ("t, alpha", &moving.scal, 2),
        ("weights", &u.w, 4),
        ("Prox", &*prox, d * k),
        ("P", p, d * k),
        ("Prox used", &*prox_used, d * k),
        ("warm start", &*q_warm, k * k),
        ("Q", q, k * k),
        ("status", &status.buf, super::status::LEN),
    ] {
        check_len(what, len, b.len())?;
    }
    // SAFETY: every buffer holds the length checked above, which is all the kernel touches
    // at these `d`, `K` (grid-stride).
    unsafe {
        kernels::head::moving::commit_step_f32(
            dev,
            grid_stride(dev, (d * k).max(k * k).max(k)),
            &mut moving.e,
            &mut moving.seen,
            &mut moving.scal,
            &u.e_new,
            &u.seen_new,
            &u.w,
            d as i32,
            k as i32,
            prox,
            p,
            prox_used,
            q_warm,
            q,
            &status.buf,
        )
    }
}

/// `dst <- src` (f64) unless the status word records a forward error.
fn commit(dev: &Device, dst: &mut Buffer, src: &Buffer, status: &Status) -> Result<()> {
    check_len("commit", dst.len(), src.len())?;
    // SAFETY: `dst` and `src` hold the same number of f64 (checked above).
    unsafe {
        kernels::head::solve::commit_f64(
            dev,
            grid_stride(dev, dst.len()),
            dst,
            src,
            dst.len() as i64,
            &status.buf,
        )
    }
}
