//! The crate's one error type.
//!
//! Every fallible entry point returns [`Result<T>`](crate::Result). Validation happens
//! before any state is touched, so a call that returns an error leaves a head exactly as it
//! was before the call.

use std::fmt;

/// Everything that can go wrong in `implicit-etf`.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Error {
    /// `K < 2`: a simplex ETF needs at least two classes.
    TooFewClasses {
        /// The number of classes asked for.
        classes: usize,
    },
    /// `d < K`: the Stiefel manifold `St(d, K)` is empty.
    DimensionBelowClasses {
        /// Feature dimension `d`.
        dim: usize,
        /// Number of classes `K`.
        classes: usize,
    },
    /// A buffer has the wrong length.
    ShapeMismatch {
        /// Which argument.
        what: &'static str,
        /// The length the call needed.
        expected: usize,
        /// The length it got.
        got: usize,
    },
    /// A label is negative or `>= K`.
    LabelOutOfRange {
        /// Position of the label in the batch.
        index: usize,
        /// The offending label.
        label: i64,
        /// Number of classes `K`.
        classes: usize,
    },
    /// An input holds NaN or an infinity (for features and `dL/dlogits`: or a magnitude above
    /// [`MAX_MAGNITUDE`](crate::core::validate::MAX_MAGNITUDE), where `f32` arithmetic could
    /// overflow).
    NonFinite {
        /// Which argument.
        what: &'static str,
        /// Flat (row-major) index of the first non-finite entry.
        index: usize,
    },
    /// The batch has no samples.
    EmptyBatch,
    /// `backward` was called with no pending `forward` (or twice for one forward).
    BackwardWithoutForward,
    /// The backward of a forward that is not the head's latest: a later forward replaced it
    /// (for example two `forward`s of the `candle` module's head, then candle's backward
    /// through the first). The head is unchanged, and the latest forward's backward, if not
    /// taken yet, still pends.
    StaleBackward {
        /// The forward whose backward was asked for (counted from 0 per head).
        requested: u64,
        /// The head's latest forward.
        latest: u64,
    },
    /// A tensor of an element type the call does not take (a framework adapter's check; the
    /// slice and buffer APIs enforce types at compile time or with [`Error::Device`]).
    DType {
        /// Which argument.
        what: &'static str,
        /// The types the call takes.
        expected: &'static str,
        /// The type it got.
        got: String,
    },
    /// An error of the tensor framework below an adapter (candle), other than the misuses
    /// above, which get their own variants.
    Framework {
        /// The operation that failed.
        op: &'static str,
        /// The framework's message.
        message: String,
    },
    /// Inference was asked of a head that has not taken a training step (no classifier yet).
    Untrained,
    /// A configuration value is out of its domain.
    InvalidParameter {
        /// The parameter's name.
        name: &'static str,
        /// Why it was refused.
        reason: String,
    },
    /// The moving class means are all zero (for example a batch whose only class equals the
    /// global mean), so `Y = E / ||E||` is undefined. The state is left unchanged.
    DegenerateMeans,
    /// A dense factorisation failed to converge or met a singular matrix.
    Numerical {
        /// What failed.
        what: &'static str,
    },
    /// A size computed from the inputs (`d * K`, `N * d`, a byte count) does not fit the
    /// address space.
    SizeOverflow {
        /// The size that overflows.
        what: &'static str,
    },
    /// An allocation failed: the memory is not there.
    OutOfMemory {
        /// Bytes asked for.
        bytes: usize,
    },
    /// No usable CUDA device (no driver, no GPU, or the device layer was not built).
    NoDevice {
        /// Why.
        reason: String,
    },
    /// A CUDA driver, NVRTC or kernel-launch error, or a failure of the CPU execution of a
    /// kernel (bad launch shape, barrier misuse, ...), or a buffer of another device.
    Device {
        /// The operation that failed.
        op: String,
        /// The message of the underlying layer.
        message: String,
        /// The underlying error (cudarc's), when there is one; also [`std::error::Error::source`].
        source: Option<DeviceSource>,
    },
    /// What a graph capture cannot hold (an allocation, a host copy, a synchronisation, a step
    /// that is not capturable yet), or a capture API used out of order.
    Capture {
        /// The operation refused.
        op: String,
        /// Why.
        reason: String,
    },
    /// A collective operation failed: ranks passed buffers of different lengths, a rank left
    /// the group or did not arrive in time, or NCCL reported an error.
    Collective {
        /// The operation.
        op: &'static str,
        /// Why.
        reason: String,
    },
    /// A data-parallel step failed on another rank (its input was invalid: a label out of
    /// range, a non-finite value, a wrong shape), so it failed on every rank, and no rank
    /// changed its state. The rank with the bad input returns that input's own error.
    PeerFailed {
        /// `"forward"` or `"backward"`.
        phase: &'static str,
        /// How many other ranks failed.
        ranks: usize,
    },
}

/// The error of the layer below (cudarc's driver or NVRTC error), shared so that [`Error`]
/// stays `Clone`. Two sources compare equal when their messages do.
#[derive(Clone)]
pub struct DeviceSource(pub std::sync::Arc<dyn std::error::Error + Send + Sync>);

impl DeviceSource {
    /// Wraps an error.
    pub fn new(e: impl std::error::Error + Send + Sync + 'static) -> Self {
        DeviceSource(std::sync::Arc::new(e))
    }
}

impl fmt::Debug for DeviceSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl PartialEq for DeviceSource {
    fn eq(&self, other: &Self) -> bool {
        self.0.to_string() == other.0.to_string()
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::TooFewClasses { classes } => {
                write!(f, "need at least 2 classes, got K = {classes}")
            }
            Error::DimensionBelowClasses { dim, classes } => write!(
                f,
                "feature dimension d = {dim} is below the number of classes K = {classes} (need d >= K)"
            ),
            Error::ShapeMismatch { what, expected, got } => {
                write!(f, "`{what}` has length {got}, expected {expected}")
            }
            Error::LabelOutOfRange {
                index,
                label,
                classes,
            } => write!(
                f,
                "label {label} at position {index} is outside 0..{classes}"
            ),
            Error::NonFinite { what, index } => {
                write!(
                    f,
                    "`{what}` holds a non-finite value (or one above 1e30 in magnitude) at index {index}"
                )
            }
            Error::EmptyBatch => write!(f, "the batch is empty"),
            Error::BackwardWithoutForward => {
                write!(f, "backward called without a pending forward")
            }
            Error::StaleBackward { requested, latest } => write!(
                f,
                "backward of forward {requested} asked for, but a later forward ({latest}) has replaced it"
            ),
            Error::DType {
                what,
                expected,
                got,
            } => write!(f, "`{what}` has element type {got}, expected {expected}"),
            Error::Framework { op, message } => write!(f, "tensor framework error in {op}: {message}"),
            Error::Untrained => write!(f, "the head has no classifier yet (no training step taken)"),
            Error::InvalidParameter { name, reason } => {
                write!(f, "invalid parameter `{name}`: {reason}")
            }
            Error::DegenerateMeans => write!(
                f,
                "the moving class means are all zero, so the nearest ETF is undefined"
            ),
            Error::Numerical { what } => write!(f, "numerical failure: {what}"),
            Error::SizeOverflow { what } => write!(f, "`{what}` overflows the address space"),
            Error::OutOfMemory { bytes } => write!(f, "out of memory allocating {bytes} bytes"),
            Error::NoDevice { reason } => write!(f, "no CUDA device: {reason}"),
            Error::Device { op, message, .. } => write!(f, "device error in {op}: {message}"),
            Error::Capture { op, reason } => write!(f, "`{op}` during a graph capture: {reason}"),
            Error::Collective { op, reason } => write!(f, "collective {op} failed: {reason}"),
            Error::PeerFailed { phase, ranks } => write!(
                f,
                "the {phase} failed on {ranks} other rank(s) (invalid input there); no rank changed its state"
            ),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Device {
                source: Some(s), ..
            } => Some(&*s.0),
            _ => None,
        }
    }
}

/// `Result` with the crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
