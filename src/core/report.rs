//! What a solve reports, the same for both heads.

/// What a solve did and how good its answer is.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SolveReport {
    /// Riemannian Newton steps taken (polishing, or iterations of the Riemannian method).
    pub steps: usize,
    /// `||G - P sym(P^T G)||_F` at the returned `P`.
    pub grad_norm: f64,
    /// `||Y - P M/sqrt(K-1)||^2 + (delta/2)||P - Prox||^2` at the returned `P`.
    pub objective: f64,
    /// `max |P^T P - I|`.
    pub orthogonality: f64,
    /// `true` when there was no `Prox` (the first-step gauge rule was used).
    pub first_step: bool,
}
