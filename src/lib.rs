//! # implicit-etf
//!
//! The implicit-ETF classifier head of *Guiding Neural Collapse: Optimising Towards the
//! Nearest Simplex Equiangular Tight Frame* (Markou, Ajanthan, Gould, NeurIPS 2024), computed
//! exactly in closed form.
//!
//! At every training step the head sets the classifier to the simplex ETF nearest to the
//! current (moving) class means of the features, and differentiates through that choice
//! with the implicit function theorem. The authors' code runs an iterative trust-region solver
//! and a dense `O(K^6)` linear solve in the backward pass (52 s per step at `K = 100`); this
//! crate computes the same quantities with one `K x K` symmetric eigendecomposition:
//!
//! * forward: `P = polar(G)`, `G = c Y M + delta Prox` (orthogonal Procrustes), polished by
//!   Riemannian Newton steps to rounding level ([`cpu::solve`]);
//! * backward: the Lagrangian Hessian contraction in the eigenbasis of `B = sym(P^T G)`,
//!   `O(d K^2 + K^3)` ([`cpu::backward`]).
//!
//! ## Two levels of API
//!
//! The stateful head, for a training loop:
//!
//! ```
//! use implicit_etf::{cross_entropy, CpuHead, HeadConfig};
//! let (n, d, k) = (8, 16, 4);
//! let mut head = CpuHead::<f32>::new(HeadConfig::new(d, k))?;
//! let raw: Vec<f32> = (0..n * d).map(|i| ((i * 29 % 13) as f32) - 6.0).collect();
//! let labels: Vec<u32> = (0..n as u32).map(|i| i % k as u32).collect();
//! for _step in 0..3 {
//!     let logits = head.forward(&raw, &labels)?;        // N x K
//!     let (loss, d_logits) = cross_entropy(&logits, &labels, k)?;
//!     let d_raw = head.backward(&d_logits)?;            // dL/d(raw features), all paths
//!     assert!(loss.is_finite() && d_raw.len() == n * d);
//! }
//! let logits = head.infer(&raw)?;                       // changes no state
//! # assert_eq!(logits.len(), n * k);
//! # Ok::<(), implicit_etf::Error>(())
//! ```
//!
//! and the stateless solve with its vector-Jacobian product ([`solve_etf`],
//! [`EtfSolution::vjp`]) on plain row-major slices.
//!
//! ## Layout
//!
//! | layer | module | what |
//! |---|---|---|
//! | core | [`core`] | configuration, the head's state, solve reports, shared constants, input validation (backend-neutral) |
//! | | `dense` (internal) | allocation-free dense kernels over faer: products split over threads, the Gram matrix's lower triangle, a symmetric eigensolver with its scratch |
//! | | [`stiefel`] | the Stiefel-manifold pieces both solves and backwards share: the factor of a solve, the tangent-space solve |
//! | CPU head | [`cpu`] | one module per stage (below), and [`CpuHead`] |
//! | GPU head | [`gpu`] | the same stages on a [`runtime::Device`], and [`DeviceHead`] |
//! | runtime | [`runtime`] | device handle, buffers, launches, workspaces, graphs; CUDA through cudarc and the CPU execution of the CUDA sources; knows nothing of the head |
//! | kernels | [`kernels`] | the CUDA sources of `kernels/` as typed (`unsafe`) launches, one module per file |
//! | | [`metrics`] | neural-collapse metrics NC1-NC4 |
//! | adapters | `candle` | the head on candle tensors, in candle's autograd (feature `candle`; CUDA tensors with `candle-cuda`) |
//!
//! | stage | CPU module | GPU module |
//! |---|---|---|
//! | feature normalisation, class statistics | [`cpu::stats`] | `gpu::stats` |
//! | moving class means, Frobenius normalisation | `cpu::moving` | `gpu::moving` |
//! | nearest-ETF solve | [`cpu::solve`] | `gpu::solve` |
//! | implicit backward | [`cpu::backward`] | `gpu::backward` |
//! | classifier, cross-entropy | `cpu::classifier` | `gpu::classifier` |
//! | the stateful head | [`cpu::head`] | [`gpu::head`] |
//! | dense products, eigensolvers | `cpu::linalg` | [`gpu::linalg`] |
//!
//! The derivations behind every stage are in the crate's `docs/` folder: `docs/head.md` (the
//! stages), `docs/solve.md` (the nearest ETF), `docs/backward.md` (the implicit gradient),
//! `docs/reference.md` (the authors' semantics and the goldens), `docs/testing.md` (the test
//! oracles and their tolerances), `docs/metrics.md`.
//!
//! All matrices are row-major slices at the API: features `N x d`, moving means and `P`
//! `d x K`, `W` `K x d`, logits `N x K`. `f64` is the reference precision; `f32` storage is
//! supported, with the `K x K` factorisations always in `f64`.
//!
//! Errors are one type, [`Error`]; validation precedes any state change, so a failed call
//! leaves a head exactly as it was.
#![warn(missing_docs)]
// `!(x > 0.0)` is used on purpose throughout: unlike `x <= 0.0` it also rejects NaN.
#![allow(clippy::neg_cmp_op_on_partial_ord)]

#[cfg(feature = "candle")]
pub mod candle;
pub mod collective;
pub mod core;
pub mod cpu;
pub(crate) mod dense;
pub mod error;
pub mod etf;
#[cfg(device)]
pub mod gpu;
pub mod head;
#[cfg(device)]
pub mod kernels;
pub mod metrics;
#[cfg(device)]
pub mod runtime;
pub mod stiefel;

pub use crate::core::config::{AbsentClassPolicy, HeadConfig, MovingAverage, SolveMethod};
pub use crate::core::real::Real;
pub use crate::core::report::{Solution, SolveReport};
pub use crate::core::state::{HeadState, MovingMeans};
pub use crate::core::validate::Label;
pub use collective::Collective;
pub use cpu::head::CpuHead;
pub use error::{DeviceSource, Error, Result};
pub use etf::{cross_entropy, solve_etf, EtfGrads, EtfSolution};
#[cfg(device)]
pub use gpu::head::{DeviceHead, DeviceOptions, Validation};
pub use head::Head;
pub use metrics::{nc_metrics, MetricsAccumulator, NcMetrics, SecondPass};

/// The README's code blocks, compiled and run as doctests so the README stays true.
#[cfg(all(doctest, feature = "cpu-exec"))]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;

/// `docs/candle.md`'s training step, compiled and run as a doctest under the `candle` feature.
#[cfg(all(doctest, feature = "candle"))]
#[doc = include_str!("../docs/candle.md")]
struct CandleDocDoctests;
