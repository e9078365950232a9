//! The one interface of both heads, for a trainer that switches between them: the same
//! verbs with the same meaning, on host slices ([`CpuHead`](crate::CpuHead)) or device
//! buffers (`DeviceHead`). Each head also has the same methods inherently (with
//! `CpuHead::forward` generic over the label type, and `last_solution` on both).
//!
//! ```
//! use implicit_etf::{cross_entropy, CpuHead, Head, HeadConfig};
//!
//! /// One training step of any head, given the loss gradient as a function of the logits.
//! fn step<H: Head>(
//!     head: &mut H,
//!     x: &H::Input,
//!     y: &H::Labels,
//!     loss_grad: impl Fn(&H::Output) -> H::Output,
//! ) -> implicit_etf::Result<H::Output>
//! where
//!     H::Output: std::ops::Deref<Target = H::Input>,
//! {
//!     let logits = head.forward(x, y)?;
//!     head.backward(&loss_grad(&logits))
//! }
//!
//! let (n, d, k) = (6, 8, 3);
//! let mut head = CpuHead::<f32>::new(HeadConfig::new(d, k))?;
//! let x: Vec<f32> = (0..n * d).map(|i| ((i * 37 % 11) as f32) - 5.0).collect();
//! let y: Vec<u32> = vec![0, 1, 2, 0, 1, 2];
//! let dx = step(&mut head, &x[..], &y[..], |z| cross_entropy(z, &y, k).unwrap().1)?;
//! assert_eq!(dx.len(), n * d);
//! assert!(head.solve_report()?.is_some() && head.classifier()?.is_some());
//! # Ok::<(), implicit_etf::Error>(())
//! ```

use crate::core::config::HeadConfig;
use crate::core::report::SolveReport;
use crate::core::state::HeadState;
use crate::error::Result;

/// A trainable implicit-ETF head.
pub trait Head {
    /// Features and `dL/dlogits`: `[T]` on the CPU, a device `Buffer` on a device.
    type Input: ?Sized;
    /// Labels: `[u32]` on the CPU (the inherent `CpuHead::forward` takes any
    /// [`Label`](crate::Label) type), a `u32` or `i64` buffer on a device.
    type Labels: ?Sized;
    /// Logits, feature gradients and the classifier: `Vec<T>` or a device `Buffer`.
    type Output;
    /// The storage type of the exported state's moving means.
    type Scalar;

    /// The configuration.
    fn config(&self) -> &HeadConfig;
    /// One training forward: advances the state, returns the logits (`N x K`).
    fn forward(&mut self, raw: &Self::Input, labels: &Self::Labels) -> Result<Self::Output>;
    /// The backward of the last forward: `dL/dlogits` to `dL/draw` (`N x d`).
    fn backward(&mut self, d_logits: &Self::Input) -> Result<Self::Output>;
    /// Logits with the current classifier, changing no state.
    fn infer(&self, raw: &Self::Input) -> Result<Self::Output>;
    /// The current classifier `W` (`K x d`), if a step was taken.
    fn classifier(&self) -> Result<Option<Self::Output>>;
    /// The last forward's solve report, if there was one.
    fn solve_report(&self) -> Result<Option<SolveReport>>;
    /// A copy of the full state, to resume bit-exactly.
    fn export_state(&self) -> Result<HeadState<Self::Scalar>>;
    /// Replaces the state (validated first); drops a pending backward.
    fn import_state(&mut self, state: HeadState<Self::Scalar>) -> Result<()>;
}

impl<T: crate::Real> Head for crate::CpuHead<T> {
    type Input = [T];
    type Labels = [u32];
    type Output = Vec<T>;
    type Scalar = T;
    fn config(&self) -> &HeadConfig {
        crate::CpuHead::config(self)
    }
    fn forward(&mut self, raw: &[T], labels: &[u32]) -> Result<Vec<T>> {
        crate::CpuHead::forward(self, raw, labels)
    }
    fn backward(&mut self, d_logits: &[T]) -> Result<Vec<T>> {
        crate::CpuHead::backward(self, d_logits)
    }
    fn infer(&self, raw: &[T]) -> Result<Vec<T>> {
        crate::CpuHead::infer(self, raw)
    }
    fn classifier(&self) -> Result<Option<Vec<T>>> {
        crate::CpuHead::classifier(self)
    }
    fn solve_report(&self) -> Result<Option<SolveReport>> {
        crate::CpuHead::solve_report(self)
    }
    fn export_state(&self) -> Result<HeadState<T>> {
        crate::CpuHead::export_state(self)
    }
    fn import_state(&mut self, state: HeadState<T>) -> Result<()> {
        crate::CpuHead::import_state(self, state)
    }
}

#[cfg(device)]
impl Head for crate::DeviceHead {
    type Input = crate::runtime::Buffer;
    type Labels = crate::runtime::Buffer;
    type Output = crate::runtime::Buffer;
    type Scalar = f32;
    fn config(&self) -> &HeadConfig {
        crate::DeviceHead::config(self)
    }
    fn forward(&mut self, raw: &Self::Input, labels: &Self::Labels) -> Result<Self::Output> {
        crate::DeviceHead::forward(self, raw, labels)
    }
    fn backward(&mut self, d_logits: &Self::Input) -> Result<Self::Output> {
        crate::DeviceHead::backward(self, d_logits)
    }
    fn infer(&self, raw: &Self::Input) -> Result<Self::Output> {
        crate::DeviceHead::infer(self, raw)
    }
    fn classifier(&self) -> Result<Option<Self::Output>> {
        crate::DeviceHead::classifier(self)
    }
    fn solve_report(&self) -> Result<Option<SolveReport>> {
        crate::DeviceHead::solve_report(self)
    }
    fn export_state(&self) -> Result<HeadState<f32>> {
        crate::DeviceHead::export_state(self)
    }
    fn import_state(&mut self, state: HeadState<f32>) -> Result<()> {
        crate::DeviceHead::import_state(self, state)
    }
}
