//! The head on [candle](https://github.com/huggingface/candle) tensors, registered in candle's
//! autograd (feature `candle`; CUDA tensors with `candle-cuda`).
//!
//! [`CandleHead::forward`] takes the backbone's features (`N x d`, `f32`, `f16` or `bf16`; or
//! `f64` for a head made with [`CandleHead::new_f64`]) and the labels (`N`, `u8`, `u32` or
//! `i64`) and returns the logits (`N x K`, `f32`, or `f64` for an `f64` head). The logits are
//! the output of a candle `CustomOp2` of the features and the labels, so `loss.backward()`
//! runs the head's implicit backward and hands the backbone `dL/dfeatures` in the features'
//! own dtype; the labels get no gradient.
//!
//! **Where it runs.** CPU tensors go to a [`CpuHead`] (`f32`, or `f64`), whose results the
//! tests compare with the same head driven by hand. With `candle-cuda`, CUDA tensors go to a
//! [`DeviceHead`](crate::DeviceHead) on candle's own stream (`CudaDevice::cuda_stream`),
//! device to device: the features and `dL/dlogits` are copied once into the head's buffers on
//! that stream (a device-to-device copy, no host round trip), logits and gradients are moved
//! out without a copy. `candle-cuda` builds candle's own kernels with nvcc, so it needs a CUDA
//! toolkit at build time; CI lints it without one (candle's kernels stubbed,
//! `scripts/check-candle-cuda.sh`) and builds it with the pinned toolchain
//! (`scripts/ci-cuda.sh`). It has not run on a GPU yet.
//!
//! **One backward per forward, in order.** Each forward is numbered. Its backward (run by
//! candle's `backward`) must belong to the head's latest forward: the backward of a forward
//! that a later forward replaced fails with [`Error::StaleBackward`], a second backward of
//! the same forward (or one after a state import) with [`Error::BackwardWithoutForward`],
//! and the head is left unchanged.
//! Inside candle's `backward` these errors arrive as a `candle_core::Error`; [`head_error`]
//! recovers the typed [`Error`].
//!
//! **Misuse is a typed error**, checked before the state changes: a features tensor that is not
//! `N x d` or labels that are not `N` ([`Error::ShapeMismatch`]), an element type the head does
//! not take ([`Error::DType`]), features on another device than the head's, or labels on
//! another device than the features ([`Error::Device`]). Non-contiguous inputs are made
//! contiguous.
//!
//! **Checkpoints.** [`CandleHead::state_tensors`] and [`CandleHead::load_state_tensors`] turn
//! the head's state into named tensors (merge them into your model's safetensors file), and
//! [`CandleHead::save`] / [`CandleHead::load`] write and read a file of their own with
//! `candle_core::safetensors`. Every value round-trips exactly, so training resumes bit-exactly.
//!
//! ```
//! use candle_core::{DType, Device, Tensor, Var};
//! use implicit_etf::candle::CandleHead;
//! use implicit_etf::HeadConfig;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let (n, d, k) = (6, 8, 3);
//! let dev = Device::Cpu;
//! let mut head = CandleHead::new(HeadConfig::new(d, k), &dev)?;
//! let feats = Var::from_tensor(&Tensor::randn(0f32, 1.0, (n, d), &dev)?)?; // backbone output
//! let labels = Tensor::new(&[0u32, 1, 2, 0, 1, 2], &dev)?;
//! let logits = head.forward(feats.as_tensor(), &labels)?; // N x K, in candle's graph
//! let loss = candle_nn::loss::cross_entropy(&logits, &labels)?;
//! let grads = loss.backward()?; // runs the head's implicit backward
//! let d_feats = grads.get(feats.as_tensor()).unwrap(); // dL/dfeatures, N x d, f32
//! assert_eq!(d_feats.dims(), &[n, d]);
//! let eval = head.infer(feats.as_tensor())?; // no state change, no graph
//! assert_eq!((eval.dims(), eval.dtype()), (&[n, k][..], DType::F32));
//! # Ok(())
//! # }
//! ```

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};

use crate::core::config::HeadConfig;
use crate::core::report::SolveReport;
use crate::core::state::{HeadState, MovingMeans};
use crate::cpu::head::CpuHead;
use crate::error::{Error, Result};

/// The prefix of every tensor name in a checkpoint of the head.
pub const STATE_PREFIX: &str = "implicit_etf.";

/// The backend a [`CandleHead`] drives.
enum Backend {
    F32(CpuHead<f32>),
    F64(CpuHead<f64>),
    #[cfg(feature = "candle-cuda")]
    Cuda(Box<cuda::CudaBackend>),
}

impl Backend {
    /// See `CpuHead::fail_step`.
    fn fail_step(&mut self, backward: bool) {
        match self {
            Backend::F32(h) => h.fail_step(backward),
            Backend::F64(h) => h.fail_step(backward),
            #[cfg(feature = "candle-cuda")]
            Backend::Cuda(h) => h.head.fail_step(backward),
        }
    }
}

/// What the head and the autograd ops it made share.
struct Inner {
    backend: Backend,
    /// The number of the forward whose backward is pending.
    pending: Option<u64>,
    /// The number the next forward gets.
    next: u64,
}

/// The implicit-ETF head on candle tensors. See the [module documentation](self).
pub struct CandleHead {
    cfg: HeadConfig,
    device: candle_core::Device,
    inner: Arc<Mutex<Inner>>,
    /// One rank of a data-parallel group ([`CandleHead::with_collective`]).
    parallel: bool,
}

impl std::fmt::Debug for CandleHead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CandleHead")
            .field("cfg", &self.cfg)
            .field("device", &self.device.location())
            .field("dtype", &self.dtype())
            .finish()
    }
}

/// Locks the shared state. No code here panics while holding the lock, so a poisoned lock
/// (a panic elsewhere in the same thread of the user's program) still holds a consistent head.
fn lock(inner: &Mutex<Inner>) -> MutexGuard<'_, Inner> {
    inner.lock().unwrap_or_else(|e| e.into_inner())
}

/// A candle error as the crate's, naming the operation.
fn framework(op: &'static str) -> impl FnOnce(candle_core::Error) -> Error {
    move |e| Error::Framework {
        op,
        message: e.to_string(),
    }
}

impl From<Error> for candle_core::Error {
    /// Wraps the crate's error so that [`head_error`] can recover it.
    fn from(e: Error) -> Self {
        candle_core::Error::WrappedContext {
            wrapped: Box::new(e),
            context: "implicit-etf".into(),
        }
    }
}

/// The crate's [`Error`] inside a candle error (the error of `loss.backward()` when the
/// head's backward refused), if there is one.
///
/// ```
/// use implicit_etf::candle::head_error;
/// use implicit_etf::Error;
/// let e: candle_core::Error = Error::BackwardWithoutForward.into();
/// assert_eq!(head_error(&e), Some(&Error::BackwardWithoutForward));
/// assert_eq!(head_error(&candle_core::Error::Msg("other".into())), None);
/// ```
pub fn head_error(e: &candle_core::Error) -> Option<&Error> {
    use candle_core::Error as E;
    match e {
        E::WrappedContext { wrapped, .. } => wrapped.downcast_ref::<Error>(),
        E::Context { inner, .. } | E::WithPath { inner, .. } | E::WithBacktrace { inner, .. } => {
            head_error(inner)
        }
        _ => None,
    }
}

fn same_device(a: &candle_core::Device, b: &candle_core::Device) -> bool {
    a.same_device(b)
}

/// Row-major host values of a tensor in `T` (made contiguous and converted first).
fn host_values<T: candle_core::WithDType>(t: &Tensor, op: &'static str) -> Result<Vec<T>> {
    t.to_dtype(T::DTYPE)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<T>())
        .map_err(framework(op))
}

/// Host labels as `i64` (any of the label dtypes the head takes).
fn host_labels(labels: &Tensor) -> Result<Vec<i64>> {
    let flat = labels.flatten_all().map_err(framework("labels"))?;
    let v = match labels.dtype() {
        DType::I64 => flat.to_vec1::<i64>(),
        DType::U32 => flat
            .to_vec1::<u32>()
            .map(|v| v.into_iter().map(i64::from).collect()),
        DType::U8 => flat
            .to_vec1::<u8>()
            .map(|v| v.into_iter().map(i64::from).collect()),
        _ => unreachable_dtype(),
    };
    v.map_err(framework("labels"))
}

/// Label dtypes are checked before [`host_labels`] runs; this arm is never taken, and returns
/// an error rather than panicking if it were.
fn unreachable_dtype<T>() -> candle_core::Result<T> {
    Err(candle_core::Error::Msg(
        "label dtype checked earlier".into(),
    ))
}

/// Checks a label tensor: rank 1, `n` entries, an integer type, on the features' device.
fn check_labels(labels: &Tensor, n: usize, dev: &candle_core::Device) -> Result<()> {
    if labels.rank() != 1 {
        return Err(Error::ShapeMismatch {
            what: "labels rank",
            expected: 1,
            got: labels.rank(),
        });
    }
    if labels.elem_count() != n {
        return Err(Error::ShapeMismatch {
            what: "labels",
            expected: n,
            got: labels.elem_count(),
        });
    }
    if !matches!(labels.dtype(), DType::U8 | DType::U32 | DType::I64) {
        return Err(Error::DType {
            what: "labels",
            expected: "u8, u32 or i64",
            got: labels.dtype().as_str().into(),
        });
    }
    if !same_device(labels.device(), dev) {
        return Err(Error::Device {
            op: "forward".into(),
            message: format!(
                "labels on {:?}, features on {:?}",
                labels.device().location(),
                dev.location()
            ),
            source: None,
        });
    }
    Ok(())
}

impl CandleHead {
    /// A head for features on `device`: a [`CpuHead<f32>`] for [`Device::Cpu`](candle_core::Device::Cpu),
    /// a [`DeviceHead`](crate::DeviceHead) on the device's stream for a CUDA device (feature
    /// `candle-cuda`). Features may be `f32`, `f16` or `bf16`; logits are `f32`.
    ///
    /// Errors: an invalid configuration; a CUDA device without `candle-cuda`, or a Metal
    /// device ([`Error::Device`]).
    pub fn new(cfg: HeadConfig, device: &candle_core::Device) -> Result<Self> {
        let backend = match device {
            candle_core::Device::Cpu => Backend::F32(CpuHead::new(cfg.clone())?),
            #[cfg(feature = "candle-cuda")]
            candle_core::Device::Cuda(d) => {
                Backend::Cuda(Box::new(cuda::CudaBackend::new(cfg.clone(), d.clone())?))
            }
            other => {
                return Err(Error::Device {
                    op: "CandleHead::new".into(),
                    message: format!(
                        "no head for {:?} tensors in this build (CUDA tensors need the \
                         `candle-cuda` feature)",
                        other.location()
                    ),
                    source: None,
                })
            }
        };
        Ok(Self::wrap(cfg, device.clone(), backend))
    }

    /// A head in `f64` on the CPU (a [`CpuHead<f64>`]): features and logits are `f64`.
    pub fn new_f64(cfg: HeadConfig) -> Result<Self> {
        let backend = Backend::F64(CpuHead::new(cfg.clone())?);
        Ok(Self::wrap(cfg, candle_core::Device::Cpu, backend))
    }

    fn wrap(cfg: HeadConfig, device: candle_core::Device, backend: Backend) -> Self {
        CandleHead {
            cfg,
            device,
            inner: Arc::new(Mutex::new(Inner {
                backend,
                pending: None,
                next: 0,
            })),
            parallel: false,
        }
    }

    /// Makes this head one rank of a data-parallel group (`docs/data-parallel.md`), as
    /// [`CpuHead::with_collective`] (CPU tensors: a [`Collective::threads`](crate::Collective::threads)
    /// group) and `DeviceHead::with_collective` (CUDA tensors). Every rank calls `forward`
    /// and `loss.backward()` together; the loss must be the rank's share of the global loss
    /// (for a mean over the global batch of `N` rows: this rank's mean times `n_rank / N`).
    /// A rank's features may have zero rows. An error on one rank, the adapter's checks
    /// included, fails the step on every rank ([`Error::PeerFailed`] on the others).
    ///
    /// ```
    /// use candle_core::{Device, Tensor, Var};
    /// use implicit_etf::candle::CandleHead;
    /// use implicit_etf::{Collective, HeadConfig};
    /// let (d, k) = (8, 3);
    /// let feats: Vec<f32> = (0..6 * d).map(|i| ((i * 7 % 11) as f32) - 5.0).collect();
    /// let labels = [0u32, 1, 2, 2, 1, 0];
    /// std::thread::scope(|s| {
    ///     for c in Collective::threads(2).unwrap() {
    ///         let (feats, labels) = (&feats, &labels);
    ///         s.spawn(move || {
    ///             let r = c.rank(); // rank r takes rows 3r..3r+3 of the global batch of 6
    ///             let mut head = CandleHead::new(HeadConfig::new(d, k), &Device::Cpu)
    ///                 .unwrap()
    ///                 .with_collective(c)
    ///                 .unwrap();
    ///             let x = Tensor::from_slice(&feats[3 * r * d..3 * (r + 1) * d], (3, d), &Device::Cpu).unwrap();
    ///             let x = Var::from_tensor(&x).unwrap();
    ///             let y = Tensor::from_slice(&labels[3 * r..3 * r + 3], 3, &Device::Cpu).unwrap();
    ///             let logits = head.forward(x.as_tensor(), &y).unwrap();
    ///             let loss = (candle_nn::loss::cross_entropy(&logits, &y).unwrap() * 0.5).unwrap();
    ///             let grads = loss.backward().unwrap();
    ///             assert_eq!(grads.get(x.as_tensor()).unwrap().dims(), &[3, d]);
    ///         });
    ///     }
    /// });
    /// ```
    pub fn with_collective(mut self, collective: crate::Collective) -> Result<Self> {
        match &mut lock(&self.inner).backend {
            Backend::F32(h) => h.set_collective(collective)?,
            Backend::F64(h) => h.set_collective(collective)?,
            #[cfg(feature = "candle-cuda")]
            Backend::Cuda(h) => h.head.set_collective(collective)?,
        }
        self.parallel = true;
        Ok(self)
    }

    /// The configuration.
    pub fn config(&self) -> &HeadConfig {
        &self.cfg
    }

    /// The device the head's tensors live on.
    pub fn device(&self) -> &candle_core::Device {
        &self.device
    }

    /// The dtype of the logits (and of the state's moving means): `f32`, or `f64` for a head
    /// made with [`new_f64`](Self::new_f64).
    pub fn dtype(&self) -> DType {
        match lock(&self.inner).backend {
            Backend::F64(_) => DType::F64,
            _ => DType::F32,
        }
    }

    /// The feature dtypes this head takes.
    fn feature_dtypes(&self) -> (&'static [DType], &'static str) {
        match self.dtype() {
            DType::F64 => (&[DType::F64], "f64 (an f64 head)"),
            _ => (
                &[DType::F32, DType::F16, DType::BF16],
                "f32, f16 or bf16 (an f32 head)",
            ),
        }
    }

    /// Checks a features tensor: `N x d`, a dtype this head takes, on the head's device.
    /// Returns `N`.
    fn check_features(&self, features: &Tensor, op: &'static str) -> Result<usize> {
        if !same_device(features.device(), &self.device) {
            return Err(Error::Device {
                op: op.into(),
                message: format!(
                    "features on {:?}, head on {:?}",
                    features.device().location(),
                    self.device.location()
                ),
                source: None,
            });
        }
        if features.rank() != 2 {
            return Err(Error::ShapeMismatch {
                what: "features rank",
                expected: 2,
                got: features.rank(),
            });
        }
        let (n, d) = (features.dims()[0], features.dims()[1]);
        if d != self.cfg.dim {
            return Err(Error::ShapeMismatch {
                what: "features columns",
                expected: self.cfg.dim,
                got: d,
            });
        }
        let (ok, expected) = self.feature_dtypes();
        if !ok.contains(&features.dtype()) {
            return Err(Error::DType {
                what: "features",
                expected,
                got: features.dtype().as_str().into(),
            });
        }
        if n == 0 && !(self.parallel && op == "forward") {
            return Err(Error::EmptyBatch);
        }
        Ok(n)
    }

    /// One training forward: features (`N x d`) and labels (`N`) to logits (`N x K`),
    /// advancing the head's state. The logits are recorded in candle's graph when the
    /// features are (a `Var`, or computed from one): `backward` on a loss of them runs the
    /// head's backward. Any error leaves the head unchanged.
    pub fn forward(&mut self, features: &Tensor, labels: &Tensor) -> Result<Tensor> {
        // With a collective, an error before the head's own forward still takes part in the
        // step's all-reduce, so the other ranks fail with it instead of waiting.
        let checked = self
            .check_features(features, "forward")
            .and_then(|n| check_labels(labels, n, features.device()).map(|()| n));
        let n = match checked {
            Ok(n) => n,
            Err(e) => {
                lock(&self.inner).backend.fail_step(false);
                return Err(e);
            }
        };
        let k = self.cfg.classes;
        let mut inner = lock(&self.inner);
        let out = match &mut inner.backend {
            Backend::F32(h) => {
                let xy = host_values::<f32>(features, "forward")
                    .and_then(|x| Ok((x, host_labels(labels)?)));
                let (x, y) = xy.inspect_err(|_| h.fail_step(false))?;
                Stash::Cpu(CpuStorage::F32(h.forward(&x, &y)?))
            }
            Backend::F64(h) => {
                let xy = host_values::<f64>(features, "forward")
                    .and_then(|x| Ok((x, host_labels(labels)?)));
                let (x, y) = xy.inspect_err(|_| h.fail_step(false))?;
                Stash::Cpu(CpuStorage::F64(h.forward(&x, &y)?))
            }
            #[cfg(feature = "candle-cuda")]
            Backend::Cuda(h) => Stash::Cuda(h.forward(features, labels)?),
        };
        let id = inner.next;
        inner.next += 1;
        inner.pending = Some(id);
        drop(inner);
        let op = HeadOp {
            inner: Arc::clone(&self.inner),
            id,
            out: Mutex::new(Some(out)),
            shape: Shape::from((n, k)),
        };
        features.apply_op2(labels, op).map_err(framework("forward"))
    }

    /// Logits (`N x K`) from the current classifier, changing no state and recording no graph
    /// (the bias `-W mu` uses this batch's mean, as in training). Errors with
    /// [`Error::Untrained`] before the first training step.
    pub fn infer(&self, features: &Tensor) -> Result<Tensor> {
        let n = self.check_features(features, "infer")?;
        let k = self.cfg.classes;
        let inner = lock(&self.inner);
        match &inner.backend {
            Backend::F32(h) => {
                let z = h.infer(&host_values::<f32>(features, "infer")?)?;
                Tensor::from_vec(z, (n, k), &self.device).map_err(framework("infer"))
            }
            Backend::F64(h) => {
                let z = h.infer(&host_values::<f64>(features, "infer")?)?;
                Tensor::from_vec(z, (n, k), &self.device).map_err(framework("infer"))
            }
            #[cfg(feature = "candle-cuda")]
            Backend::Cuda(h) => h.infer(features, n, k),
        }
    }

    /// The last forward's solve report (`None` before a forward).
    pub fn solve_report(&self) -> Result<Option<SolveReport>> {
        match &lock(&self.inner).backend {
            Backend::F32(h) => h.solve_report(),
            Backend::F64(h) => h.solve_report(),
            #[cfg(feature = "candle-cuda")]
            Backend::Cuda(h) => h.head.solve_report(),
        }
    }

    /// The current classifier `W` (`K x d`, the logits' dtype, on the head's device) from the
    /// stored `P`, if a training step was taken.
    pub fn classifier(&self) -> Result<Option<Tensor>> {
        let (d, k) = (self.cfg.dim, self.cfg.classes);
        match &lock(&self.inner).backend {
            Backend::F32(h) => h
                .classifier()?
                .map(|w| Tensor::from_vec(w, (k, d), &self.device))
                .transpose()
                .map_err(framework("classifier")),
            Backend::F64(h) => h
                .classifier()?
                .map(|w| Tensor::from_vec(w, (k, d), &self.device))
                .transpose()
                .map_err(framework("classifier")),
            #[cfg(feature = "candle-cuda")]
            Backend::Cuda(h) => h
                .head
                .classifier()?
                .map(|w| h.tensor(w, Shape::from((k, d)), "classifier"))
                .transpose(),
        }
    }

    /// Whether a forward's backward is pending.
    pub fn backward_pending(&self) -> bool {
        lock(&self.inner).pending.is_some()
    }

    /// The head's state as named CPU tensors (names start with [`STATE_PREFIX`]): the moving
    /// means `moving.e` (`d x K`, the head's dtype), `moving.step` (`i64`, one entry),
    /// `moving.alpha` (`f64`, one entry), `moving.seen` (`u8`, `K`) and, after the first
    /// step, `prox` (`f64`, `d x K`). Merge them into a model checkpoint, or use
    /// [`save`](Self::save).
    pub fn state_tensors(&self) -> Result<HashMap<String, Tensor>> {
        let (d, k) = (self.cfg.dim, self.cfg.classes);
        let cpu = candle_core::Device::Cpu;
        let inner = lock(&self.inner);
        let (e, moving, prox) = match &inner.backend {
            Backend::F32(h) => split_state(h.export_state()?, d, k),
            Backend::F64(h) => split_state(h.export_state()?, d, k),
            #[cfg(feature = "candle-cuda")]
            Backend::Cuda(h) => split_state(h.head.export_state()?, d, k),
        };
        drop(inner);
        let f = framework("state_tensors");
        let mut out = HashMap::new();
        out.insert(format!("{STATE_PREFIX}moving.e"), e.map_err(f)?);
        let f = framework("state_tensors");
        let step = i64::try_from(moving.step).map_err(|_| Error::SizeOverflow {
            what: "state.moving.step",
        })?;
        out.insert(
            format!("{STATE_PREFIX}moving.step"),
            Tensor::new(&[step], &cpu).map_err(f)?,
        );
        let f = framework("state_tensors");
        out.insert(
            format!("{STATE_PREFIX}moving.alpha"),
            Tensor::new(&[moving.alpha], &cpu).map_err(f)?,
        );
        let seen: Vec<u8> = moving.seen.iter().map(|&s| u8::from(s)).collect();
        let f = framework("state_tensors");
        out.insert(
            format!("{STATE_PREFIX}moving.seen"),
            Tensor::from_vec(seen, k, &cpu).map_err(f)?,
        );
        if let Some(p) = prox {
            let f = framework("state_tensors");
            out.insert(
                format!("{STATE_PREFIX}prox"),
                Tensor::from_vec(p, (d, k), &cpu).map_err(f)?,
            );
        }
        Ok(out)
    }

    /// Replaces the state by the one in `tensors` (as written by
    /// [`state_tensors`](Self::state_tensors); other entries are ignored). Validated first:
    /// a missing entry is [`Error::InvalidParameter`], a wrong dtype [`Error::DType`], a wrong
    /// size [`Error::ShapeMismatch`], and the head's own checks follow; on any error the head
    /// is unchanged. Drops a pending backward.
    pub fn load_state_tensors(&mut self, tensors: &HashMap<String, Tensor>) -> Result<()> {
        let get = |name: &'static str, dtype: DType| -> Result<&Tensor> {
            let t = tensors
                .get(&format!("{STATE_PREFIX}{name}"))
                .ok_or_else(|| Error::InvalidParameter {
                    name,
                    reason: format!("no tensor `{STATE_PREFIX}{name}` in the checkpoint"),
                })?;
            if t.dtype() != dtype {
                return Err(Error::DType {
                    what: name,
                    expected: dtype.as_str(),
                    got: t.dtype().as_str().into(),
                });
            }
            Ok(t)
        };
        let one = |name: &'static str, t: &Tensor| -> Result<()> {
            if t.elem_count() != 1 {
                return Err(Error::ShapeMismatch {
                    what: name,
                    expected: 1,
                    got: t.elem_count(),
                });
            }
            Ok(())
        };
        let step_t = get("moving.step", DType::I64)?;
        one("moving.step", step_t)?;
        let step = host_values::<i64>(step_t, "load_state_tensors")?[0];
        let step = u64::try_from(step).map_err(|_| Error::InvalidParameter {
            name: "state.moving.step",
            reason: format!("must be >= 0, got {step}"),
        })?;
        let alpha_t = get("moving.alpha", DType::F64)?;
        one("moving.alpha", alpha_t)?;
        let alpha = host_values::<f64>(alpha_t, "load_state_tensors")?[0];
        let seen = host_values::<u8>(get("moving.seen", DType::U8)?, "load_state_tensors")?;
        let seen: Vec<bool> = seen.into_iter().map(|s| s != 0).collect();
        let prox = match tensors.get(&format!("{STATE_PREFIX}prox")) {
            None => None,
            Some(_) => Some(host_values::<f64>(
                get("prox", DType::F64)?,
                "load_state_tensors",
            )?),
        };
        let mut inner = lock(&self.inner);
        match &mut inner.backend {
            Backend::F32(h) => {
                let e = host_values::<f32>(get("moving.e", DType::F32)?, "load_state_tensors")?;
                h.import_state(state(e, step, alpha, seen, prox))?
            }
            Backend::F64(h) => {
                let e = host_values::<f64>(get("moving.e", DType::F64)?, "load_state_tensors")?;
                h.import_state(state(e, step, alpha, seen, prox))?
            }
            #[cfg(feature = "candle-cuda")]
            Backend::Cuda(h) => {
                let e = host_values::<f32>(get("moving.e", DType::F32)?, "load_state_tensors")?;
                h.head.import_state(state(e, step, alpha, seen, prox))?
            }
        }
        inner.pending = None;
        Ok(())
    }

    /// Writes [`state_tensors`](Self::state_tensors) to a safetensors file.
    pub fn save<P: AsRef<Path>>(&self, path: P) -> Result<()> {
        candle_core::safetensors::save(&self.state_tensors()?, path).map_err(framework("save"))
    }

    /// Reads a safetensors file written by [`save`](Self::save) (or any file holding the
    /// [`state_tensors`](Self::state_tensors) entries) and loads it with
    /// [`load_state_tensors`](Self::load_state_tensors).
    pub fn load<P: AsRef<Path>>(&mut self, path: P) -> Result<()> {
        let t = candle_core::safetensors::load(path, &candle_core::Device::Cpu)
            .map_err(framework("load"))?;
        self.load_state_tensors(&t)
    }
}

/// A state's moving means as a CPU tensor, and the rest of it (with `e` left empty).
fn split_state<T: candle_core::WithDType>(
    mut s: HeadState<T>,
    d: usize,
    k: usize,
) -> (
    candle_core::Result<Tensor>,
    MovingMeans<u8>,
    Option<Vec<f64>>,
) {
    let e = std::mem::take(&mut s.moving.e);
    let rest = MovingMeans {
        e: Vec::new(),
        step: s.moving.step,
        alpha: s.moving.alpha,
        seen: s.moving.seen,
    };
    (
        Tensor::from_vec(e, (d, k), &candle_core::Device::Cpu),
        rest,
        s.prox,
    )
}

fn state<T>(
    e: Vec<T>,
    step: u64,
    alpha: f64,
    seen: Vec<bool>,
    prox: Option<Vec<f64>>,
) -> HeadState<T> {
    HeadState {
        moving: MovingMeans {
            e,
            step,
            alpha,
            seen,
        },
        prox,
    }
}

/// The logits of one forward, handed to candle by the op's forward.
enum Stash {
    Cpu(CpuStorage),
    #[cfg(feature = "candle-cuda")]
    Cuda(candle_core::CudaStorage),
}

/// The autograd node of one forward: its forward hands over the logits the head computed,
/// its backward runs the head's backward if this forward is still the pending one.
struct HeadOp {
    inner: Arc<Mutex<Inner>>,
    id: u64,
    out: Mutex<Option<Stash>>,
    shape: Shape,
}

impl HeadOp {
    fn take(&self) -> candle_core::Result<Stash> {
        self.out
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .ok_or_else(|| candle_core::Error::Msg("implicit-etf: logits already taken".into()))
    }

    /// `dL/dfeatures` from `dL/dlogits`, as a tensor shaped, typed and placed like `features`.
    fn backward(&self, features: &Tensor, grad: &Tensor) -> Result<Tensor> {
        let mut inner = lock(&self.inner);
        let latest = inner.next.saturating_sub(1);
        let refused = if self.id != latest {
            Some(Error::StaleBackward {
                requested: self.id,
                latest,
            })
        } else if inner.pending != Some(self.id) {
            Some(Error::BackwardWithoutForward)
        } else {
            None
        };
        if let Some(e) = refused {
            // With a collective the other ranks' backwards fail with this one.
            inner.backend.fail_step(true);
            return Err(e);
        }
        let shape = features.shape().clone();
        let dev = features.device();
        let dx = match &mut inner.backend {
            Backend::F32(h) => {
                let g = host_values::<f32>(grad, "backward").inspect_err(|_| h.fail_step(true))?;
                let g = h.backward(&g)?;
                Tensor::from_vec(g, shape, dev).map_err(framework("backward"))?
            }
            Backend::F64(h) => {
                let g = host_values::<f64>(grad, "backward").inspect_err(|_| h.fail_step(true))?;
                let g = h.backward(&g)?;
                Tensor::from_vec(g, shape, dev).map_err(framework("backward"))?
            }
            #[cfg(feature = "candle-cuda")]
            Backend::Cuda(h) => h.backward(grad, shape)?,
        };
        inner.pending = None;
        drop(inner);
        dx.to_dtype(features.dtype()).map_err(framework("backward"))
    }
}

impl CustomOp2 for HeadOp {
    fn name(&self) -> &'static str {
        "implicit-etf-head"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        match self.take()? {
            Stash::Cpu(s) => Ok((s, self.shape.clone())),
            #[cfg(feature = "candle-cuda")]
            Stash::Cuda(_) => Err(candle_core::Error::Msg(
                "implicit-etf: CUDA logits for a CPU op".into(),
            )),
        }
    }

    #[cfg(feature = "candle-cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        match self.take()? {
            Stash::Cuda(s) => Ok((s, self.shape.clone())),
            Stash::Cpu(_) => Err(candle_core::Error::Msg(
                "implicit-etf: CPU logits for a CUDA op".into(),
            )),
        }
    }

    fn bwd(
        &self,
        features: &Tensor,
        _labels: &Tensor,
        _logits: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(self.backward(features, grad)?), None))
    }
}

#[cfg(feature = "candle-cuda")]
mod cuda {
    //! CUDA tensors through a [`DeviceHead`] on candle's stream. Features and `dL/dlogits` are
    //! copied device to device into buffers the head owns (candle keeps its own storage);
    //! logits and gradients are moved out without a copy.

    use candle_core::backend::BackendStorage;
    use candle_core::op::BackpropOp;
    use candle_core::{CudaDevice, CudaStorage, DType, Shape, Storage, Tensor};

    use super::framework;
    use crate::error::{Error, Result};
    use crate::gpu::head::DeviceHead;
    use crate::runtime::{Buffer, Device};
    use crate::HeadConfig;

    pub(super) struct CudaBackend {
        pub(super) head: DeviceHead,
        cdev: CudaDevice,
    }

    impl CudaBackend {
        pub(super) fn new(cfg: HeadConfig, cdev: CudaDevice) -> Result<Self> {
            let dev = Device::cuda_on_stream(cdev.cuda_stream())?;
            Ok(CudaBackend {
                head: DeviceHead::new(dev, cfg)?,
                cdev,
            })
        }

        /// A device copy of a contiguous CUDA tensor as a head buffer, on candle's stream.
        fn buffer(&self, t: &Tensor, op: &'static str) -> Result<Buffer> {
            let t = t.contiguous().map_err(framework(op))?;
            let (storage, layout) = t.storage_and_layout();
            let Storage::Cuda(cs) = &*storage else {
                return Err(Error::Device {
                    op: op.into(),
                    message: "not a CUDA tensor".into(),
                    source: None,
                });
            };
            let (start, end) = layout
                .contiguous_offsets()
                .ok_or_else(|| Error::Framework {
                    op,
                    message: "tensor not contiguous after contiguous()".into(),
                })?;
            let stream = self.cdev.cuda_stream();
            let dev = self.head.device();
            macro_rules! copy {
                ($t:ty) => {{
                    let s = cs.as_cuda_slice::<$t>().map_err(framework(op))?;
                    let view = s.slice(start..end);
                    let owned = stream.clone_dtod(&view).map_err(|e| Error::Device {
                        op: op.into(),
                        message: e.to_string(),
                        source: Some(crate::error::DeviceSource::new(e)),
                    })?;
                    dev.from_cuda_slice(owned)?
                }};
            }
            Ok(match cs.dtype() {
                DType::F32 => copy!(f32),
                DType::F16 => copy!(half::f16),
                DType::BF16 => copy!(half::bf16),
                DType::U32 => copy!(u32),
                DType::I64 => copy!(i64),
                other => {
                    return Err(Error::DType {
                        what: op,
                        expected: "f32, f16, bf16, u32 or i64",
                        got: other.as_str().into(),
                    })
                }
            })
        }

        /// A head buffer of `f32` moved out as a CUDA tensor of `shape` (no graph).
        pub(super) fn tensor(&self, buf: Buffer, shape: Shape, op: &'static str) -> Result<Tensor> {
            let slice = self.head.device().into_cuda_slice::<f32>(buf)?;
            let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(slice, self.cdev.clone()));
            let _ = op;
            Ok(Tensor::from_storage(
                storage,
                shape,
                BackpropOp::none(),
                false,
            ))
        }

        pub(super) fn forward(
            &mut self,
            features: &Tensor,
            labels: &Tensor,
        ) -> Result<CudaStorage> {
            let x = self.buffer(features, "forward")?;
            let labels = match labels.dtype() {
                DType::U8 => labels.to_dtype(DType::U32).map_err(framework("forward"))?,
                _ => labels.clone(),
            };
            let y = self.buffer(&labels, "forward")?;
            let logits = self.head.forward(&x, &y)?;
            let slice = self.head.device().into_cuda_slice::<f32>(logits)?;
            Ok(CudaStorage::wrap_cuda_slice(slice, self.cdev.clone()))
        }

        pub(super) fn backward(&mut self, grad: &Tensor, shape: Shape) -> Result<Tensor> {
            let g = grad.to_dtype(DType::F32).map_err(framework("backward"))?;
            let g = self.buffer(&g, "backward")?;
            let dx = self.head.backward(&g)?;
            self.tensor(dx, shape, "backward")
        }

        pub(super) fn infer(&self, features: &Tensor, n: usize, k: usize) -> Result<Tensor> {
            let x = self.buffer(features, "infer")?;
            let z = self.head.infer(&x)?;
            self.tensor(z, Shape::from((n, k)), "infer")
        }
    }
}
