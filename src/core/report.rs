//! What a solve reports, the same for both heads.

/// What a solve did and how good its answer is.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
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
    /// Jacobi sweeps of the GPU head's eigensolver (0 for the CPU head, whose eigensolver
    /// is LAPACK-style, and for the first step, solved on the host).
    pub sweeps: usize,
    /// `true` when the GPU head's refined eigensolver (`EigenSolver::Refine`) found its
    /// refinement diverged (a warm start too far from this step's matrix) and solved with the
    /// plain warm Jacobi instead (always `false` for the CPU head and the other solvers).
    pub refine_fallback: bool,
}

/// The last training forward's solution, reported the same way by both heads
/// ([`crate::CpuHead::last_solution`] with host slices, `DeviceHead::last_solution` with
/// device buffers).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Solution<B> {
    /// The nearest ETF's `P` (`d x K`; `f64` on the device).
    pub p: B,
    /// The classifier `W = sqrt(K/(K-1)) (P M)^T` (`K x d`).
    pub w: B,
    /// The bias `b = -W mu` (`K`).
    pub b: B,
    /// The normalised moving means `Y = E_new / ||E_new||_F` (`d x K`).
    pub y: B,
    /// The batch mean `mu` of the (normalised) features (`d`).
    pub mu: B,
}
