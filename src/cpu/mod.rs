//! The CPU backend: the exact implementation of every stage of the head.
//!
//! | stage | module |
//! |---|---|
//! | feature normalisation, class statistics | [`stats`] |
//! | moving class means, Frobenius normalisation | `moving` (crate-internal) |
//! | nearest-ETF solve | [`solve`] |
//! | implicit backward (Lagrangian Hessian contraction) | [`backward`] |
//! | classifier, logits, cross-entropy | `classifier` (crate-internal) |
//! | the stateful head | [`head`] |
//!
//! The public stage functions ([`stats`], [`solve`], [`backward`]) check their shapes and
//! return typed errors; the others take the head's validated inputs and are crate-internal.

pub(crate) mod linalg;

pub mod backward;
pub(crate) mod classifier;
pub mod head;
pub(crate) mod moving;
pub mod solve;
pub mod stats;
