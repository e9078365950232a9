//! The CPU backend: the exact implementation of every stage of the head.
//!
//! | stage | module |
//! |---|---|
//! | feature normalisation, class statistics | [`stats`] |
//! | moving class means, Frobenius normalisation | [`moving`] |
//! | nearest-ETF solve | [`solve`] |
//! | implicit backward (Lagrangian Hessian contraction) | [`backward`] |
//! | classifier, logits, cross-entropy | [`classifier`] |
//! | the stateful head | [`head`] |

pub(crate) mod linalg;

pub mod backward;
pub mod classifier;
pub mod head;
pub mod moving;
pub mod solve;
pub mod stats;
