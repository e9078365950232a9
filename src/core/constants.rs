//! Constants and tolerances shared by the CPU and the GPU head (`docs/solve.md`).

use faer::MatRef;

/// `c = 2 / sqrt(K - 1)`.
pub fn c_of(k: usize) -> f64 {
    2.0 / ((k - 1) as f64).sqrt()
}

/// Rounding level of the Riemannian gradient: `eps * max(16, sqrt(d K) / 4) * ||G||_F`.
/// Forming `G - P sym(P^T G)` in float64 leaves a floor that grows like `sqrt(d K)`
/// (measured: `1e-15 ||G||` at `d K ~ 1e2`, `3.4e-15` at `2e5`, `1.1e-14` at `2e6`); the
/// bound sits 3-4x above it.
pub fn grad_tol(g: MatRef<'_, f64>) -> f64 {
    grad_tol_rel(g.nrows(), g.ncols()) * g.norm_l2()
}

/// [`grad_tol`] relative to `||G||_F`: `eps * max(16, sqrt(d K) / 4)`.
pub fn grad_tol_rel(d: usize, k: usize) -> f64 {
    f64::EPSILON * (((d * k) as f64).sqrt() / 4.0).max(16.0)
}
/// `max |P^T P - I|` accepted without polishing (rounding level).
pub const ORTH_TOL: f64 = 1e-14;
