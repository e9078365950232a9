//! Stage 3: the nearest simplex ETF (`docs/solve.md`).
//!
//! ```text
//! P* = argmin_{P in St(d,K)} ||Y - P M / sqrt(K-1)||^2 + (delta/2) ||P - Prox||^2
//!    = argmax_{P in St(d,K)} tr(P^T G),      G = c Y M + delta Prox,  c = 2/sqrt(K-1)
//! ```
//!
//! **Procrustes (default).** The global maximiser is the polar factor of `G`. From the `K x K`
//! Gram matrix `G^T G = Q diag(s^2) Q^T` (float64 eigendecomposition):
//! `U = G Q diag(1/s)`, `P = U Q^T`. Then `B = sym(P^T G) = Q diag(s) Q^T`, which is exactly
//! what the implicit backward needs, so the forward hands `(U, Q, s)` to it. `s_min` is about
//! `delta` (because `G 1 = delta Prox 1`), so `cond(G^T G) ~ (s_max/delta)^2`; in float64 that
//! leaves `P` orthonormal to ~`eps (s_max/s_min)^2` (`1e-16..1e-10`). The Riemannian gradient
//! `G - P sym(P^T G)` and `P^T P - I` are then checked directly; when either is above
//! rounding level (`grad_tol`, `ORTH_TOL`: `docs/solve.md#the-optimality-certificate`), a Newton–Schulz retraction and Riemannian
//! Newton steps (the tangent-space solve of `docs/backward.md`) polish `P`, normally in one step (at most
//! `MAX_POLISH`). The factor handed to the backward is always the eigendecomposition of
//! `sym(P^T G)` at the returned `P` (to rounding).
//!
//! When `eps cond(G)^2` exceeds `GRAM_MAX_LOSS` (a tiny `delta`, nearly coincident class
//! means) the Gram route would lose more than half the digits, so the polar factor is taken
//! from a Householder QR of `G` and the SVD of its `K x K` factor instead (backward stable,
//! no squared condition number); the same polish follows. A solve that still does not reach
//! a feasible optimum returns [`Error::Numerical`] rather than a non-orthonormal `P`.
//!
//! **First step (no `Prox`).** The reference solves without the proximal term from
//! `J = I_{d x K}` and uses the answer as `Prox`. Without `Prox`, `A = c Y M` has rank
//! `r <= K - 1` and its maximisers differ in the null directions. Tie-break (deterministic):
//! `P_1 = lim_{eta -> 0} polar(A + eta J)`, computed exactly as
//! `P_1 = U_r Q_r^T + polar((I - U_r U_r^T) J Q_n) Q_n^T`, where `(Q_r, s_r)` are the
//! eigenpairs of `A^T A` with `s > NULL_RTOL * s_max`, `U_r = A Q_r diag(1/s_r)` and `Q_n`
//! spans the rest. This is the minimiser closest to `J`, matches the reference's `W` to
//! ~`1e-7`, and is orthonormal to rounding in its null directions (it becomes `Prox`). The
//! step then solves with `Prox = P_1` (treated as a constant, as the reference does), which
//! returns `P_1` up to `O(eta / delta)`.
//!
//! **Riemannian (option).** The paper's route: Newton iterations on St(d,K) started from
//! `Prox` (from `J` on the first step, without then with the proximal term), with a gradient
//! step and backtracking whenever Newton does not increase `tr(P^T G)`, at most `max_iters`.
//! For `d = K` it never leaves the determinant component of its start.

use faer::{Mat, MatRef};

use crate::core::config::SolveMethod;
use crate::core::constants::{c_of, grad_tol, ORTH_TOL};
use crate::core::report::SolveReport;
use crate::cpu::linalg::{ab, abt, atb, center_rows, fro, scale_cols, sym, sym_eig};
use crate::error::{Error, Result};
use crate::stiefel::{orthogonality_error, Factor};

/// Largest `eps cond(G)^2` the Gram route is used for (it loses that much relative accuracy
/// in `P`); beyond it the QR + SVD route is taken.
pub const GRAM_MAX_LOSS: f64 = 1e-6;
/// At most this many Newton polishing steps after the Procrustes solution.
pub const MAX_POLISH: usize = 3;
/// First step: singular values of `c Y M` below `NULL_RTOL * s_max` count as null directions.
/// Rounding puts the null singular values of a Gram-based computation at about
/// `sqrt(K eps) s_max` (`~3e-7` at `K = 1000`), so the cut-off sits above that.
pub const NULL_RTOL: f64 = 1e-6;

/// A complete solve: the factor for the backward, `G`, the `Prox` used, and the report.
#[derive(Debug, Clone)]
pub struct EtfSolve {
    /// `P` and its factorisation.
    pub factor: Factor,
    /// `G = c Y M + delta Prox`.
    pub g: Mat<f64>,
    /// The `Prox` used (`P_1` on a first step).
    pub prox: Mat<f64>,
    /// The report.
    pub report: SolveReport,
}

/// Solves for the nearest ETF of `y` (`d x K`, float64).
pub fn solve(
    y: MatRef<'_, f64>,
    prox: Option<MatRef<'_, f64>>,
    delta: f64,
    method: SolveMethod,
) -> Result<EtfSolve> {
    let (d, k) = (y.nrows(), y.ncols());
    crate::core::validate::check_sizes(d, k)?;
    if let Some(p) = prox {
        same_shape("Prox", p, y)?;
    }
    let mut a = y.to_owned();
    center_rows(&mut a);
    let c = c_of(k);
    a *= faer::Scale(c);
    let first_step = prox.is_none();
    let prox: Mat<f64> = match (prox, method) {
        (Some(p), _) => p.to_owned(),
        (None, SolveMethod::Procrustes) => first_step_gauge(a.as_ref())?,
        (None, SolveMethod::Riemannian { max_iters }) => {
            let j = Mat::from_fn(d, k, |i, jj| if i == jj { 1.0 } else { 0.0 });
            riemannian(a.as_ref(), j, max_iters)?.0.p
        }
    };
    let mut g = prox.clone();
    g *= faer::Scale(delta);
    g += &a;
    let Polished {
        factor,
        steps,
        grad: grad_norm,
        orth: orthogonality,
    } = match method {
        SolveMethod::Procrustes => {
            // The Gram route squares cond(G); when that would cost more than half of the
            // float64 digits (tiny delta, nearly coincident class means), or fails, use the
            // QR + SVD route, which does not square it.
            let f0 = match polar_gram(g.as_ref()) {
                Ok(f) if f64::EPSILON * cond_of(&f.s).powi(2) <= GRAM_MAX_LOSS => f,
                _ => polar_svd(g.as_ref())?,
            };
            let out = polish(g.as_ref(), f0)?;
            if !(out.grad <= 1e-8 * fro(g.as_ref()) && out.orth <= 1e-10) {
                return Err(Error::Numerical {
                    what: "the nearest-ETF solve did not reach a feasible optimum (G is too ill-conditioned)",
                });
            }
            out
        }
        SolveMethod::Riemannian { max_iters } => {
            let (factor, steps) = riemannian(g.as_ref(), prox.clone(), max_iters)?;
            Polished {
                grad: grad_norm_unchecked(factor.p.as_ref(), g.as_ref()),
                orth: orthogonality_error(factor.p.as_ref()),
                factor,
                steps,
            }
        }
    };
    let objective = objective_unchecked(y, factor.p.as_ref(), prox.as_ref(), delta);
    Ok(EtfSolve {
        factor,
        g,
        prox,
        report: SolveReport {
            steps,
            grad_norm,
            objective,
            orthogonality,
            first_step,
            sweeps: 0,
        },
    })
}

/// `||Y - P M/sqrt(K-1)||^2 + (delta/2) ||P - Prox||^2`.
pub fn objective(
    y: MatRef<'_, f64>,
    p: MatRef<'_, f64>,
    prox: MatRef<'_, f64>,
    delta: f64,
) -> Result<f64> {
    crate::core::validate::check_sizes(y.nrows(), y.ncols())?;
    same_shape("P", p, y)?;
    same_shape("Prox", prox, y)?;
    Ok(objective_unchecked(y, p, prox, delta))
}

/// [`objective`] of matching shapes.
pub(crate) fn objective_unchecked(
    y: MatRef<'_, f64>,
    p: MatRef<'_, f64>,
    prox: MatRef<'_, f64>,
    delta: f64,
) -> f64 {
    let k = y.ncols();
    let mut pm = p.to_owned();
    center_rows(&mut pm);
    let s = 1.0 / ((k - 1) as f64).sqrt();
    let mut f = 0.0;
    let mut r = 0.0;
    for j in 0..k {
        for i in 0..y.nrows() {
            let e = y[(i, j)] - s * pm[(i, j)];
            f += e * e;
            let q = p[(i, j)] - prox[(i, j)];
            r += q * q;
        }
    }
    f + 0.5 * delta * r
}

/// `||G - P B||_F` with `B = Q diag(s) Q^T` the factored `sym(P^T G)`: the Riemannian
/// gradient norm of `-tr(P^T G)` (one product, the eigendecomposition being backward stable).
fn riemannian_grad(f: &Factor, g: MatRef<'_, f64>) -> f64 {
    // P B = U diag(s) Q^T
    let mut us = f.u.clone();
    scale_cols(&mut us, &f.s);
    let pb = abt(us.as_ref(), f.q.as_ref());
    fro((g - pb).as_ref())
}

/// Polar factor of a full-rank `G` through the eigendecomposition of `G^T G`.
pub(crate) fn polar_gram(g: MatRef<'_, f64>) -> Result<Factor> {
    let gram = atb(g, g);
    let (q, lam) = sym_eig(gram.as_ref())?;
    let lmax = lam.last().copied().unwrap_or(0.0);
    if !(lmax > 0.0) || !(lam[0] > lmax * 1e-28) {
        return Err(Error::Numerical {
            what: "G is rank deficient (no unique nearest ETF)",
        });
    }
    let s: Vec<f64> = lam.iter().map(|l| l.sqrt()).collect();
    let mut u = ab(g, q.as_ref());
    let inv: Vec<f64> = s.iter().map(|v| 1.0 / v).collect();
    scale_cols(&mut u, &inv);
    let p = abt(u.as_ref(), q.as_ref());
    Ok(Factor { p, u, q, s })
}

/// `s_max / s_min` of positive singular values.
fn cond_of(s: &[f64]) -> f64 {
    let smin = s.iter().fold(f64::INFINITY, |m, &v| m.min(v));
    let smax = s.iter().fold(0.0f64, |m, &v| m.max(v));
    smax / smin
}

/// Polar factor through `G = Q_R R` (Householder QR) and the SVD `R = U_r S V_r^T`:
/// `P = Q_R U_r V_r^T`, `B = V_r S V_r^T`, `U = Q_R U_r`. Backward stable without squaring
/// `cond(G)`; slower than the Gram route, so used only when that one would lose digits.
pub(crate) fn polar_svd(g: MatRef<'_, f64>) -> Result<Factor> {
    let qr = g.qr();
    let qt = qr.compute_thin_Q();
    let r = qr.thin_R().to_owned();
    let svd = r.thin_svd().map_err(|_| Error::Numerical {
        what: "SVD did not converge",
    })?;
    let k = r.ncols();
    let s: Vec<f64> = (0..k).map(|i| svd.S()[i]).collect();
    let smax = s.iter().fold(0.0f64, |m, &v| m.max(v));
    if !(s.iter().all(|&v| v > 0.0)
        && s.iter().fold(f64::INFINITY, |m, &v| m.min(v)) > smax * 1e-14)
    {
        return Err(Error::Numerical {
            what: "G is rank deficient (no unique nearest ETF)",
        });
    }
    let u = ab(qt.as_ref(), svd.U());
    let q = svd.V().to_owned();
    let p = abt(u.as_ref(), q.as_ref());
    Ok(Factor { p, u, q, s })
}

/// Factors `B = sym(P^T G)` at a given `P` on the manifold (not necessarily optimal), for
/// the backward at an arbitrary point.
pub fn factor_at(p: Mat<f64>, g: MatRef<'_, f64>) -> Result<Factor> {
    crate::core::validate::check_sizes(g.nrows(), g.ncols())?;
    same_shape("P", p.as_ref(), g)?;
    let b = sym(atb(p.as_ref(), g).as_ref());
    let (q, s) = sym_eig(b.as_ref())?;
    let u = ab(p.as_ref(), q.as_ref());
    Ok(Factor { p, u, q, s })
}

/// Polishing of a Procrustes solution. The Gram route leaves `P` off the manifold by
/// ~`eps cond(G)^2`; a Newton–Schulz retraction puts it back to rounding level, after which
/// the Riemannian gradient is ~`1e-12 ||G||`. Newton steps (quadratic convergence) then bring
/// it to rounding level, normally in one step. Returns the factor of `B = sym(P^T G)` at the
/// final `P` and the number of Newton steps.
fn polish(g: MatRef<'_, f64>, f0: Factor) -> Result<Polished> {
    let tol = grad_tol(g);
    let smin = f0.s.iter().fold(f64::INFINITY, |m, &v| m.min(v));
    let smax = f0.s.iter().fold(0.0f64, |m, &v| m.max(v));
    let cond = smax / smin;
    if f64::EPSILON * cond * cond <= ORTH_TOL {
        // Well-conditioned G: the Gram route's error eps cond^2 is at rounding level
        // already. Verify it directly; polish only if the check disagrees.
        let grad = grad_norm_unchecked(f0.p.as_ref(), g);
        let orth = orthogonality_error(f0.p.as_ref());
        if grad <= tol && orth <= ORTH_TOL {
            return Ok(Polished {
                factor: f0,
                steps: 0,
                grad,
                orth,
            });
        }
    }
    // Back onto the manifold (the Gram route's error is ~eps cond^2, ~1e-10 for
    // delta = 1e-3, where one Newton–Schulz update reaches rounding level; iterate for
    // worse-conditioned G). There B = sym(P^T G) equals the Gram
    // factor Q diag(s) Q^T to ~1e-12 relative, so the first Newton direction reuses it
    // (saving an eigendecomposition); Newton converges quadratically, to rounding level in
    // one step.
    let p = retract_newton_schulz(f0.p);
    let u = ab(p.as_ref(), f0.q.as_ref());
    let mut f = Factor {
        p,
        u,
        q: f0.q,
        s: f0.s,
    };
    let mut steps = 0;
    let mut grad = f64::INFINITY;
    let mut prev;
    while steps < MAX_POLISH && f.s.iter().all(|&v| v > 0.0) {
        let x = newton_direction(&f, g)?;
        f = factor_at(retract_newton_schulz(f.p + x), g)?;
        steps += 1;
        prev = grad;
        grad = riemannian_grad(&f, g);
        // Done at rounding level, or when a step no longer gains a factor 10 (the floor).
        if grad <= tol || grad > 0.1 * prev {
            break;
        }
    }
    let orth = orthogonality_error(f.p.as_ref());
    Ok(Polished {
        factor: f,
        steps,
        grad,
        orth,
    })
}

/// A polished solution with its checks.
struct Polished {
    factor: Factor,
    steps: usize,
    grad: f64,
    orth: f64,
}

/// `||G - P sym(P^T G)||_F` evaluated directly (no factor identities assumed): the Riemannian
/// gradient norm of `-tr(P^T G)` at any `P`, for diagnostics and tests.
pub fn riemannian_gradient_norm(p: MatRef<'_, f64>, g: MatRef<'_, f64>) -> Result<f64> {
    same_shape("P", p, g)?;
    Ok(grad_norm_unchecked(p, g))
}

/// [`riemannian_gradient_norm`] of matching shapes.
fn grad_norm_unchecked(p: MatRef<'_, f64>, g: MatRef<'_, f64>) -> f64 {
    let b = sym(atb(p, g).as_ref());
    fro((g - ab(p, b.as_ref())).as_ref())
}

/// An error unless `a` has `b`'s shape.
pub(crate) fn same_shape(what: &'static str, a: MatRef<'_, f64>, b: MatRef<'_, f64>) -> Result<()> {
    crate::core::validate::check_len(what, b.nrows() * b.ncols(), a.nrows() * a.ncols())?;
    if a.nrows() != b.nrows() {
        return Err(Error::ShapeMismatch {
            what,
            expected: b.nrows(),
            got: a.nrows(),
        });
    }
    Ok(())
}

/// The Riemannian Newton direction: the tangent `X` with `Proj_T(X B) = G - P B`.
fn newton_direction(f: &Factor, g: MatRef<'_, f64>) -> Result<Mat<f64>> {
    // V = P B - G, then X = tangent_solve(V) solves Proj_T(X B) = -Proj_T(V) = G - P B.
    let mut us = f.u.clone();
    scale_cols(&mut us, &f.s);
    let v = abt(us.as_ref(), f.q.as_ref()) - g;
    crate::stiefel::tangent_solve(f, v.as_ref())
}

/// Polar retraction by Newton–Schulz iterations `Z <- Z (3 I - Z^T Z) / 2` (quadratic
/// convergence; a tangent step of norm `e` leaves `Z^T Z = I + O(e^2)`).
pub(crate) fn retract_newton_schulz(mut z: Mat<f64>) -> Mat<f64> {
    let k = z.ncols();
    let mut prev = f64::INFINITY;
    for _ in 0..8 {
        let ztz = atb(z.as_ref(), z.as_ref());
        let mut err = 0.0f64;
        let m = Mat::from_fn(k, k, |i, j| {
            let id = if i == j { 1.0 } else { 0.0 };
            err = err.max((ztz[(i, j)] - id).abs());
            0.5 * (3.0 * id - ztz[(i, j)])
        });
        // Stop at rounding level: exactly orthonormal to the last bit, or no longer
        // improving (quadratic convergence stalls at ~eps sqrt(K)).
        if err < 4.0 * f64::EPSILON || err > 0.5 * prev {
            break;
        }
        prev = err;
        z = ab(z.as_ref(), m.as_ref());
    }
    z
}

/// First-step gauge rule (see module docs): `lim_{eta->0} polar(A + eta J)`.
pub(crate) fn first_step_gauge(a: MatRef<'_, f64>) -> Result<Mat<f64>> {
    let (d, k) = (a.nrows(), a.ncols());
    let gram = atb(a, a);
    let (q, lam) = sym_eig(gram.as_ref())?;
    let smax = lam.last().copied().unwrap_or(0.0).max(0.0).sqrt();
    if !(smax > 0.0) {
        return Err(Error::DegenerateMeans);
    }
    let range: Vec<usize> = (0..k)
        .filter(|&i| lam[i].max(0.0).sqrt() > NULL_RTOL * smax)
        .collect();
    let null: Vec<usize> = (0..k)
        .filter(|&i| lam[i].max(0.0).sqrt() <= NULL_RTOL * smax)
        .collect();
    let qr = Mat::from_fn(k, range.len(), |i, j| q[(i, range[j])]);
    let qn = Mat::from_fn(k, null.len(), |i, j| q[(i, null[j])]);
    let mut ur = ab(a, qr.as_ref());
    let inv: Vec<f64> = range.iter().map(|&i| 1.0 / lam[i].sqrt()).collect();
    scale_cols(&mut ur, &inv);
    let mut p = abt(ur.as_ref(), qr.as_ref());
    if !null.is_empty() {
        // J Q_n: Q_n padded with zero rows to d rows; project out span(U_r) twice.
        let mut jn = Mat::from_fn(d, null.len(), |i, j| if i < k { qn[(i, j)] } else { 0.0 });
        for _ in 0..2 {
            let c = atb(ur.as_ref(), jn.as_ref());
            jn -= ab(ur.as_ref(), c.as_ref());
        }
        let wn = orthonormal_polar(jn, ur.as_ref())?;
        p += abt(wn.as_ref(), qn.as_ref());
    }
    Ok(retract_newton_schulz(p))
}

/// `polar(X)` for a `d x m` block orthogonal to `span(Ur)`; if `X` is rank deficient (a
/// degenerate corner case), it is completed deterministically by Gram–Schmidt over the
/// coordinate vectors.
fn orthonormal_polar(x: Mat<f64>, ur: MatRef<'_, f64>) -> Result<Mat<f64>> {
    let (d, m) = (x.nrows(), x.ncols());
    let gram = atb(x.as_ref(), x.as_ref());
    let (q, lam) = sym_eig(gram.as_ref())?;
    if lam[0] > 1e-12 * lam[m - 1].max(1e-300) && lam[0] > 1e-24 {
        let mut u = ab(x.as_ref(), q.as_ref());
        let inv: Vec<f64> = lam.iter().map(|l| 1.0 / l.sqrt()).collect();
        scale_cols(&mut u, &inv);
        return Ok(abt(u.as_ref(), q.as_ref()));
    }
    // Fallback: Gram–Schmidt of the columns of X, then of e_1, e_2, ..., against U_r and the
    // vectors already accepted, until m vectors are found.
    let mut basis: Vec<Vec<f64>> = (0..ur.ncols())
        .map(|j| (0..d).map(|i| ur[(i, j)]).collect())
        .collect();
    let nr = basis.len();
    let cands = (0..m)
        .map(|j| (0..d).map(|i| x[(i, j)]).collect::<Vec<f64>>())
        .chain((0..d).map(|e| (0..d).map(|i| if i == e { 1.0 } else { 0.0 }).collect()));
    for mut v in cands {
        if basis.len() == nr + m {
            break;
        }
        for _ in 0..2 {
            for b in &basis {
                let dot: f64 = b.iter().zip(&v).map(|(a, c)| a * c).sum();
                v.iter_mut().zip(b).for_each(|(vi, bi)| *vi -= dot * bi);
            }
        }
        let n: f64 = v.iter().map(|a| a * a).sum::<f64>().sqrt();
        if n > 1e-6 {
            v.iter_mut().for_each(|a| *a /= n);
            basis.push(v);
        }
    }
    if basis.len() != nr + m {
        return Err(Error::Numerical {
            what: "could not complete the first-step null directions",
        });
    }
    Ok(Mat::from_fn(d, m, |i, j| basis[nr + j][i]))
}

/// The Riemannian route: Newton iterations from `p0` with a safeguarded gradient step.
fn riemannian(g: MatRef<'_, f64>, p0: Mat<f64>, max_iters: usize) -> Result<(Factor, usize)> {
    let tol = grad_tol(g);
    let h = |p: &Mat<f64>| -> f64 {
        let mut t = 0.0;
        for j in 0..p.ncols() {
            for i in 0..p.nrows() {
                t += p[(i, j)] * g[(i, j)];
            }
        }
        t
    };
    let mut f = factor_at(retract_exact(p0)?, g)?;
    let mut it = 0;
    while it < max_iters {
        let grad = riemannian_grad(&f, g);
        if grad <= tol {
            break;
        }
        let h0 = h(&f.p);
        let mut next = None;
        if f.s[0] > 0.0 {
            let x = newton_direction(&f, g)?;
            let cand = retract_exact(&f.p + &x)?;
            if h(&cand) >= h0 - 1e-15 * h0.abs() {
                next = Some(cand);
            }
        }
        if next.is_none() {
            // Gradient ascent on tr(P^T G) with backtracking: X = t (G - P B).
            let mut us = f.u.clone();
            scale_cols(&mut us, &f.s);
            let dir = g - abt(us.as_ref(), f.q.as_ref());
            let mut t = 1.0 / f.s.iter().fold(fro(g), |m, v| m.max(v.abs()));
            for _ in 0..40 {
                let cand = retract_exact(&f.p + &dir * faer::Scale(t))?;
                if h(&cand) > h0 {
                    next = Some(cand);
                    break;
                }
                t *= 0.5;
            }
        }
        match next {
            Some(p) => f = factor_at(p, g)?,
            None => break,
        }
        it += 1;
    }
    Ok((f, it))
}

/// Exact polar retraction (through the Gram matrix), for steps of any size.
fn retract_exact(z: Mat<f64>) -> Result<Mat<f64>> {
    Ok(polar_gram(z.as_ref())?.p)
}
/// `G = c Y M + delta Prox`.
pub fn g_matrix(y: MatRef<'_, f64>, prox: MatRef<'_, f64>, delta: f64) -> Result<Mat<f64>> {
    crate::core::validate::check_sizes(y.nrows(), y.ncols())?;
    same_shape("Prox", prox, y)?;
    Ok(g_unchecked(y, prox, delta))
}

/// [`g_matrix`] of matching shapes.
pub(crate) fn g_unchecked(y: MatRef<'_, f64>, prox: MatRef<'_, f64>, delta: f64) -> Mat<f64> {
    let mut a = y.to_owned();
    center_rows(&mut a);
    a *= faer::Scale(c_of(y.ncols()));
    a + prox * faer::Scale(delta)
}
