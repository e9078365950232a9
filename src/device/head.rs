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
//! `backward` read that word back at the end (one 24-byte copy) and return the typed error, like
//! the CPU head. With [`Validation::Deferred`] they never synchronise and never copy to the
//! host, so a trainer can overlap steps or capture them in a CUDA graph; errors are then read
//! with [`DeviceHead::check`] whenever the trainer chooses (a failed step has left the state
//! unchanged, and its logits and gradient are meaningless). The first step is the exception:
//! its gauge rule (`method.md` §3, the tie-break among the maximisers without `Prox`) runs on
//! the host in float64 (exactly the CPU head's code), which reads `Y` back once.
//!
//! ```
//! use implicit_etf::device::{Device, DType};
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

use super::classifier::{self, ClassifierGradsDev};
use super::linalg::{EigenSolver, GemmKernel};
use super::solve::{self, FactorDev};
use super::stats::{self, MovingStateDev, StatsForward, StatsOptions};
use super::status::{Part, Status};
use super::{backward, grid_stride, Arg, Buffer, DType, Device};
use crate::config::{HeadConfig, SolveMethod};
use crate::cpu::head::{check_state, HeadState};
use crate::cpu::linalg::{from_row_major, orthogonality_error, to_row_major};
use crate::cpu::moving::MovingMeans;
use crate::cpu::solve::{objective, riemannian_gradient_norm, SolveReport};
use crate::error::{Error, Result};

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

/// Options of the device head beyond [`HeadConfig`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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

/// What the device head reports about its last solve (read from the device on request).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DeviceSolveReport {
    /// Riemannian gradient, orthogonality and objective at the returned `P`, computed on the
    /// host in float64 from `P`, `G`, `Y` and `Prox` (`steps`: the Newton steps the device
    /// polish took, at most [`DeviceOptions::max_newton_steps`]; 0 on the first step).
    pub solve: SolveReport,
    /// Jacobi sweeps the eigensolver used (0 on the first step, solved on the host).
    pub sweeps: usize,
}

/// The last forward's solve, kept for the backward and for [`DeviceHead::solve_report`].
#[derive(Debug)]
struct LastSolve {
    factor: FactorDev,
    y: Buffer,
    prox_used: Buffer,
    first_step: bool,
    w: Buffer,
    b: Buffer,
}

/// What a backward needs from its forward.
#[derive(Debug)]
struct Pending {
    n: usize,
    /// The caller's features (a device copy; needed by the `tau` backward).
    raw: Buffer,
    /// The features the classifier saw (f32).
    x: Buffer,
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
    /// The previous eigenvectors (K x K f64), for the warm start.
    q_warm: Option<Buffer>,
    status: Status,
    last: Option<LastSolve>,
    pending: Option<Pending>,
}

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
        if i32::try_from(cfg.dim * cfg.classes).is_err() {
            return Err(Error::InvalidParameter {
                name: "dim",
                reason: "d * K exceeds the i32 range of the kernels".into(),
            });
        }
        if opt.max_sweeps == 0 {
            return Err(Error::InvalidParameter {
                name: "max_sweeps",
                reason: "must be at least 1".into(),
            });
        }
        let moving = MovingStateDev::new(&dev, cfg.dim, cfg.classes)?;
        let status = Status::new(&dev)?;
        Ok(DeviceHead {
            dev,
            cfg,
            opt,
            moving,
            prox: None,
            q_warm: None,
            status,
            last: None,
            pending: None,
        })
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
        if n == 0 {
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
        if raw.len() != n * self.cfg.dim {
            return Err(Error::ShapeMismatch {
                what: "raw",
                expected: n * self.cfg.dim,
                got: raw.len(),
            });
        }
        if i32::try_from(raw.len()).is_err() {
            return Err(Error::InvalidParameter {
                name: "raw",
                reason: "N * d exceeds the i32 range of the kernels".into(),
            });
        }
        Ok(n)
    }

    /// One training forward: `raw` (N x d; f32, f16 or bf16) and `labels` (N; u32 or i64) to
    /// the logits (N x K f32). Advances the state (moving means, `Prox`) on the device and
    /// keeps what [`backward`](Self::backward) needs. Errors leave the head unchanged (see
    /// [`Validation`] for when data-dependent ones are returned).
    pub fn forward(&mut self, raw: &Buffer, labels: &Buffer) -> Result<Buffer> {
        let n = self.batch_shape(raw, labels)?;
        let (d, k) = (self.cfg.dim, self.cfg.classes);
        let dev = &self.dev;
        let gk = self.opt.gemm;
        self.status.reset(dev, Part::Forward)?;
        let mut sf = stats::forward_deferred(
            dev,
            raw,
            labels,
            n,
            &self.moving,
            self.stats_options(),
            &self.status,
        )?;
        let first_step = self.prox.is_none();
        let (factor, prox_used) = match &self.prox {
            None => {
                // First step: the gauge rule on the host (reads Y back once).
                self.status
                    .read(dev)?
                    .forward_error(k, "raw", |i| stats::label_at(dev, labels, i))?;
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
                let g = solve::build_g(dev, &sf.y, prox, d, k, self.cfg.delta)?;
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
                    &self.status,
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
                    &self.status,
                )?;
                (f, dev.copy(prox)?)
            }
        };
        // The normalised features move to the pending backward (the stats backward does not
        // read them), so no copy.
        let x = match sf.x.take() {
            Some(x) => x,
            None => classifier::to_f32(dev, raw)?,
        };
        let w = classifier::weights(dev, &factor.p, d, k)?;
        let (logits, b) = classifier::logits(dev, gk, &x, &w, &sf.stats.mu, n, d, k)?;
        // Commit (the kernels skip it when the status word records an error).
        self.moving.commit(dev, &sf.update, &self.status.buf)?;
        let new_prox = match self.prox.take() {
            Some(p) => {
                commit(dev, &p, &factor.p, &self.status)?;
                p
            }
            // The first step's status was checked above.
            None => dev.copy(&factor.p)?,
        };
        self.prox = Some(new_prox);
        if self.opt.warm_start {
            match &self.q_warm {
                Some(q) => commit(dev, q, &factor.q, &self.status)?,
                None => self.q_warm = Some(dev.copy(&factor.q)?),
            }
        }
        if self.opt.validation == Validation::Eager && !first_step {
            let word = self.status.read(dev)?;
            word.forward_error(k, "raw", |i| stats::label_at(dev, labels, i))?;
        }
        self.last = Some(LastSolve {
            factor,
            y: dev.copy(&sf.y)?,
            prox_used,
            first_step,
            w,
            b,
        });
        self.pending = Some(Pending {
            n,
            raw: dev.copy(raw)?,
            x,
            stats: sf,
        });
        Ok(logits)
    }

    /// Backward of the last forward: `d_logits` (N x K f32) to `dL/draw` (N x d f32), through
    /// every path (logits, bias, and `W -> P -> Y -> moving means -> class means and mu`).
    /// Consumes the pending forward (an error keeps it).
    pub fn backward(&mut self, d_logits: &Buffer) -> Result<Buffer> {
        let p = self.pending.as_ref().ok_or(Error::BackwardWithoutForward)?;
        let last = self.last.as_ref().ok_or(Error::BackwardWithoutForward)?;
        let (d, k, n) = (self.cfg.dim, self.cfg.classes, p.n);
        if d_logits.len() != n * k {
            return Err(Error::ShapeMismatch {
                what: "d_logits",
                expected: n * k,
                got: d_logits.len(),
            });
        }
        if d_logits.dtype() != DType::F32 {
            return Err(Error::InvalidParameter {
                name: "d_logits",
                reason: format!("expected f32, got {:?}", d_logits.dtype()),
            });
        }
        let dev = &self.dev;
        let gk = self.opt.gemm;
        self.status.reset(dev, Part::Backward)?;
        dev.launch(
            "check_finite_f32",
            grid_stride(dev, n * k),
            &[
                Arg::Buf(d_logits),
                Arg::I64((n * k) as i64),
                Arg::Buf(&self.status.buf),
                Arg::I32(4),
            ],
        )?;
        let ClassifierGradsDev { dx, dp, dmu } =
            classifier::backward(dev, gk, &p.x, d_logits, &last.w, &p.stats.stats.mu, n, d, k)?;
        let dy = backward::solve_backward(dev, gk, &last.factor, &dp, d, k, &self.status)?;
        let d_raw = stats::backward(dev, &p.stats, &p.raw, &dy, Some(&dmu), Some(&dx))?;
        if self.opt.validation == Validation::Eager {
            self.status.read(dev)?.backward_error()?;
        }
        self.pending = None;
        Ok(d_raw)
    }

    /// Reads the status word: the error of the last forward (or of the last backward) if it
    /// failed. With [`Validation::Deferred`] this is how failures reach the host (it
    /// synchronises). A [`Error::LabelOutOfRange`] from here carries the index but not the
    /// label's value (`label: -1`), since the labels buffer is the caller's.
    pub fn check(&self) -> Result<()> {
        let word = self.status.read(&self.dev)?;
        word.forward_error(self.cfg.classes, "raw", |_| Ok(-1))?;
        word.backward_error()
    }

    /// Inference: logits (N x K f32) from the current classifier, with the bias `-W mu` from
    /// this batch's mean (as in training). Changes no state. [`Error::Untrained`] before the
    /// first step; a non-finite feature gives [`Error::NonFinite`] (a synchronisation).
    pub fn infer(&self, raw: &Buffer) -> Result<Buffer> {
        let (d, k) = (self.cfg.dim, self.cfg.classes);
        if raw.is_empty() {
            return Err(Error::EmptyBatch);
        }
        if raw.len() % d != 0 {
            return Err(Error::ShapeMismatch {
                what: "raw",
                expected: (raw.len() / d + 1) * d,
                got: raw.len(),
            });
        }
        let prox = self.prox.as_ref().ok_or(Error::Untrained)?;
        let n = raw.len() / d;
        let dev = &self.dev;
        let st = Status::new(dev)?;
        super::status::check_finite(dev, raw, &st, 1)?;
        st.read(dev)?.forward_error(k, "raw", |_| Ok(-1))?;
        let x = match self.cfg.tau {
            Some(t) => stats::tau_normalise(dev, raw, n, d, t)?,
            None => classifier::to_f32(dev, raw)?,
        };
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

    /// The last forward's `P` (d x K f64), `W` (K x d f32), `b` (K f32) and `Y` (d x K f32).
    pub fn last_solution(&self) -> Option<(&Buffer, &Buffer, &Buffer, &Buffer)> {
        self.last.as_ref().map(|l| (&l.factor.p, &l.w, &l.b, &l.y))
    }

    /// The last forward's solve report, computed on the host in float64 (downloads `P`, `G`,
    /// `Y` and `Prox`: a synchronisation; meant for diagnostics, not for every step).
    pub fn solve_report(&self) -> Result<Option<DeviceSolveReport>> {
        let Some(l) = &self.last else {
            return Ok(None);
        };
        let (d, k) = (self.cfg.dim, self.cfg.classes);
        let dev = &self.dev;
        let p = from_row_major(&dev.download::<f64>(&l.factor.p)?, d, k);
        let g = from_row_major(&dev.download::<f64>(&l.factor.g)?, d, k);
        let y = from_row_major(&dev.download::<f32>(&l.y)?, d, k);
        let prox = from_row_major(&dev.download::<f64>(&l.prox_used)?, d, k);
        let sweeps = dev.download::<i32>(&l.factor.sweeps)?[0].max(0) as usize;
        let newton = dev.download::<i32>(&l.factor.newton)?[0].max(0) as usize;
        Ok(Some(DeviceSolveReport {
            solve: SolveReport {
                steps: newton,
                grad_norm: riemannian_gradient_norm(p.as_ref(), g.as_ref()),
                objective: objective(y.as_ref(), p.as_ref(), prox.as_ref(), self.cfg.delta),
                orthogonality: orthogonality_error(p.as_ref()),
                first_step: l.first_step,
            },
            sweeps,
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

    /// Replaces the state (validated first, as the CPU head does). Drops any pending backward
    /// and the eigensolver's warm start.
    pub fn import_state(&mut self, state: HeadState<f32>) -> Result<()> {
        check_state(&self.cfg, &state)?;
        let dev = &self.dev;
        let seen: Vec<i32> = state.moving.seen.iter().map(|&s| i32::from(s)).collect();
        let moving = MovingStateDev {
            e: dev.upload(&state.moving.e)?,
            scal: dev.upload(&[state.moving.step as f64, state.moving.alpha])?,
            seen: dev.upload(&seen)?,
            d: self.cfg.dim,
            k: self.cfg.classes,
        };
        let prox = match &state.prox {
            Some(p) => Some(dev.upload(p)?),
            None => None,
        };
        self.moving = moving;
        self.prox = prox;
        self.q_warm = None;
        self.pending = None;
        self.last = None;
        Ok(())
    }
}

/// `dst <- src` (f64) unless the status word records a forward error.
fn commit(dev: &Device, dst: &Buffer, src: &Buffer, status: &Status) -> Result<()> {
    dev.launch(
        "commit_f64",
        grid_stride(dev, dst.len()),
        &[
            Arg::Buf(dst),
            Arg::Buf(src),
            Arg::I64(dst.len() as i64),
            Arg::Buf(&status.buf),
        ],
    )
}
