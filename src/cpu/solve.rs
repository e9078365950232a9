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

use faer::reborrow::ReborrowMut;
use faer::{unzip, zip, Accum, Mat, MatMut, MatRef};

use crate::core::config::SolveMethod;
use crate::core::constants::{c_of, grad_tol, grad_tol_rel, ORTH_TOL};
use crate::core::report::SolveReport;
use crate::cpu::linalg::{ab, abt, atb, center_rows, fro, scale_cols, sym, sym_eig};
use crate::dense::{center_scale_into, gemm, gram_lower, mirror_lower, row_means, SymEig};
use crate::error::{Error, Result};
use crate::stiefel::{orthogonality_error, tangent_solve_into, Factor, TangentWork};

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

/// Solves for the nearest ETF of `y` (`d x K`, float64). One-shot form of [`Solver`] (which
/// keeps its memory across calls).
pub fn solve(
    y: MatRef<'_, f64>,
    prox: Option<MatRef<'_, f64>>,
    delta: f64,
    method: SolveMethod,
) -> Result<EtfSolve> {
    let (d, k) = (y.nrows(), y.ncols());
    let mut s = Solver::new(d, k)?;
    let report = s.solve(y, prox, delta, method)?;
    Ok(EtfSolve {
        factor: s.factor,
        g: s.g,
        prox: s.prox,
        report,
    })
}

/// The nearest-ETF solve and its implicit backward with their memory held across calls:
/// after the first call of a shape, a Procrustes solve with a `Prox` and its backward
/// allocate nothing (`docs/performance.md`).
///
/// ```
/// use faer::Mat;
/// use implicit_etf::cpu::solve::Solver;
/// use implicit_etf::SolveMethod;
/// let (d, k) = (6, 3);
/// let y = Mat::from_fn(d, k, |i, j| ((i * 3 + j * 5) % 7) as f64 - 3.0);
/// let y = &y * faer::Scale(1.0 / y.norm_l2());
/// let mut s = Solver::new(d, k).unwrap();
/// let first = s.solve(y.as_ref(), None, 1e-3, SolveMethod::Procrustes).unwrap();
/// assert!(first.first_step);
/// let prox = s.factor().p.clone();
/// let report = s.solve(y.as_ref(), Some(prox.as_ref()), 1e-3, SolveMethod::Procrustes).unwrap();
/// assert!(report.orthogonality < 1e-13);
/// let v = Mat::from_fn(d, k, |i, j| (i + j) as f64);
/// let (mut dy, mut dprox) = (Mat::zeros(d, k), Mat::zeros(d, k));
/// s.backward_into(v.as_ref(), 1e-3, dy.as_mut(), Some(dprox.as_mut())).unwrap();
/// ```
#[derive(Debug, Clone)]
pub struct Solver {
    d: usize,
    k: usize,
    /// `G` of the last solve.
    g: Mat<f64>,
    /// The `Prox` of the last solve.
    prox: Mat<f64>,
    /// The last solve's factor.
    factor: Factor,
    eig: SymEig,
    lam: Vec<f64>,
    /// `K x K` scratch.
    kk: [Mat<f64>; 3],
    /// `d x K` scratch.
    dk: Mat<f64>,
    /// `d` scratch.
    means: Vec<f64>,
    tangent: TangentWork,
    solved: bool,
}

impl Solver {
    /// Memory for `d x K` problems (`d >= K >= 2`).
    pub fn new(d: usize, k: usize) -> Result<Solver> {
        crate::core::validate::check_sizes(d, k)?;
        crate::core::validate::size2("d * K", d, k)
            .and_then(|dk| crate::core::validate::size2("d * K * 8 bytes", dk, 64))?;
        crate::dense::warm_threads(d.saturating_mul(k).saturating_mul(k));
        Ok(Solver {
            d,
            k,
            g: Mat::zeros(d, k),
            prox: Mat::zeros(d, k),
            factor: Factor {
                p: Mat::zeros(d, k),
                u: Mat::zeros(d, k),
                q: Mat::zeros(k, k),
                s: vec![0.0; k],
            },
            eig: SymEig::new(k),
            lam: vec![0.0; k],
            kk: [Mat::zeros(k, k), Mat::zeros(k, k), Mat::zeros(k, k)],
            dk: Mat::zeros(d, k),
            means: vec![0.0; d],
            tangent: TangentWork::new(d, k),
            solved: false,
        })
    }

    /// `(d, K)`.
    pub fn shape(&self) -> (usize, usize) {
        (self.d, self.k)
    }

    /// The last solve's factor (`P`, `U`, `Q`, `s`); zeros before the first solve.
    pub fn factor(&self) -> &Factor {
        &self.factor
    }

    /// `G = c Y M + delta Prox` of the last solve.
    pub fn g(&self) -> MatRef<'_, f64> {
        self.g.as_ref()
    }

    /// The `Prox` the last solve used (`P_1` on a first step).
    pub fn prox(&self) -> MatRef<'_, f64> {
        self.prox.as_ref()
    }

    /// Solves for the nearest ETF of `y` (`d x K`); see the module docs. On error the
    /// previous solution is no longer available ([`factor`](Self::factor) is undefined).
    pub fn solve(
        &mut self,
        y: MatRef<'_, f64>,
        prox: Option<MatRef<'_, f64>>,
        delta: f64,
        method: SolveMethod,
    ) -> Result<SolveReport> {
        same_shape("Y", y, self.g.as_ref())?;
        if let Some(p) = prox {
            same_shape("Prox", p, y)?;
        }
        self.solved = false;
        let k = self.k;
        let c = c_of(k);
        let first_step = prox.is_none();
        match prox {
            Some(p) => {
                self.prox.copy_from(p);
                center_scale_into(y, c, Some((delta, p)), &mut self.means, self.g.as_mut());
            }
            None => {
                // First step: A = c Y M in `g`, then Prox from the gauge rule.
                center_scale_into(y, c, None, &mut self.means, self.g.as_mut());
                let p1 = match method {
                    SolveMethod::Procrustes => first_step_gauge(self.g.as_ref())?,
                    SolveMethod::Riemannian { max_iters } => {
                        let j = Mat::from_fn(self.d, k, |i, jj| if i == jj { 1.0 } else { 0.0 });
                        riemannian(self.g.as_ref(), j, max_iters)?.0.p
                    }
                };
                self.prox.copy_from(&p1);
                let (g, pr) = (self.g.as_mut(), self.prox.as_ref());
                zip!(g, pr).for_each(|unzip!(g, p)| *g += delta * *p);
            }
        }
        let (steps, grad_norm, orthogonality) = match method {
            SolveMethod::Procrustes => {
                let out = self.procrustes()?;
                let gn = fro(self.g.as_ref());
                if !(out.1 <= 1e-8 * gn && out.2 <= 1e-10) {
                    return Err(Error::Numerical {
                        what: "the nearest-ETF solve did not reach a feasible optimum (G is too ill-conditioned)",
                    });
                }
                out
            }
            SolveMethod::Riemannian { max_iters } => {
                let (factor, steps) = riemannian(self.g.as_ref(), self.prox.clone(), max_iters)?;
                let grad = grad_norm_unchecked(factor.p.as_ref(), self.g.as_ref());
                let orth = orthogonality_error(factor.p.as_ref());
                self.factor = factor;
                (steps, grad, orth)
            }
        };
        let objective = objective_with(
            y,
            self.factor.p.as_ref(),
            self.prox.as_ref(),
            delta,
            &mut self.means,
        );
        self.solved = true;
        Ok(SolveReport {
            steps,
            grad_norm,
            objective,
            orthogonality,
            first_step,
            sweeps: 0,
            refine_fallback: false,
        })
    }

    /// The Procrustes route into `self.factor`; returns `(Newton steps, gradient norm,
    /// orthogonality)`.
    ///
    /// Gram route: `G^T G = Q Lambda Q^T`; `U = G Q diag(1/s)` with `s` the column norms of
    /// `G Q` (not `sqrt(lambda)`: a small eigenvalue carries an absolute error of
    /// `eps ||G||^2`, the column norm only `eps ||G|| s`). Certificate in `K x K` space:
    /// with `E = U^T U - I`, `G Q = U diag(s)` holds to rounding, so at `P = U Q^T`
    /// `P^T P - I = Q E Q^T` and the Riemannian gradient is `-U sym(E diag(s)) Q^T`. When
    /// either is above rounding level, one Newton step is taken in `K x K` space
    /// ([`Self::newton_in_k_space`]) and the result is checked directly.
    fn procrustes(&mut self) -> Result<(usize, f64, f64)> {
        let (d, k) = (self.d, self.k);
        let [gram, e, _] = &mut self.kk;
        gram_lower(gram.as_mut(), self.g.as_ref());
        self.eig
            .run(gram.as_ref(), self.factor.q.as_mut(), &mut self.lam)?;
        // A Gram matrix without a clear positive spectrum, or a condition number whose
        // square would cost more than half the digits: the QR + SVD route (it reports rank
        // deficiency itself), then the classic polish (allocating; only for very
        // ill-conditioned G: tiny delta, nearly coincident class means).
        let lmax = self.lam[k - 1];
        let mut gram_ok = lmax > 0.0 && self.lam[0] > lmax * 1e-28;
        if gram_ok {
            gemm(
                self.factor.u.as_mut(),
                Accum::Replace,
                self.g.as_ref(),
                self.factor.q.as_ref(),
                1.0,
            );
            for j in 0..k {
                self.factor.s[j] = self.factor.u.col(j).norm_l2();
            }
            let smax = self.factor.s.iter().fold(0.0f64, |m, &v| m.max(v));
            let smin = self.factor.s.iter().fold(f64::INFINITY, |m, &v| m.min(v));
            gram_ok = smin > 0.0 && f64::EPSILON * (smax / smin).powi(2) <= GRAM_MAX_LOSS;
        }
        if !gram_ok {
            let f0 = polar_svd(self.g.as_ref())?;
            let out = polish(self.g.as_ref(), f0)?;
            self.factor = out.factor;
            return Ok((out.steps, out.grad, out.orth));
        }
        for j in 0..k {
            let inv = 1.0 / self.factor.s[j];
            self.factor.u.col_mut(j).iter_mut().for_each(|x| *x *= inv);
        }
        // E = U^T U - I (lower triangle, then mirrored).
        gram_lower(e.as_mut(), self.factor.u.as_ref());
        mirror_lower(e.as_mut());
        for i in 0..k {
            e[(i, i)] -= 1.0;
        }
        let (grad, orth) = certificate(e.as_ref(), &self.factor.s);
        let gnorm = fro(self.g.as_ref());
        let tol = grad_tol_rel(d, k) * gnorm;
        gemm(
            self.factor.p.as_mut(),
            Accum::Replace,
            self.factor.u.as_ref(),
            self.factor.q.transpose(),
            1.0,
        );
        let mut orth = orth;
        if grad <= tol && orth > ORTH_TOL {
            // max |E| over-states max |P^T P - I| = max |Q E Q^T| when the large entries of E
            // sit in the rows of small singular values: evaluate the latter (two K x K x K
            // products, only when the cheap bound does not settle it).
            let [a, e, b] = &mut self.kk;
            gemm(
                b.as_mut(),
                Accum::Replace,
                self.factor.q.as_ref(),
                e.as_ref(),
                1.0,
            );
            gemm(
                a.as_mut(),
                Accum::Replace,
                b.as_ref(),
                self.factor.q.transpose(),
                1.0,
            );
            orth = a
                .as_ref()
                .col_iter()
                .flat_map(|c| c.iter().copied())
                .fold(0.0f64, |m, v| m.max(v.abs()));
        }
        if grad <= tol && orth <= ORTH_TOL {
            return Ok((0, grad, orth));
        }
        self.newton_in_k_space()?;
        let (grad, orth) = self.direct_check();
        if grad <= tol && orth <= ORTH_TOL {
            return Ok((1, grad, orth));
        }
        // Still above rounding level (rare): the classic polish from here (allocating).
        let f0 = self.factor.clone();
        let out = polish(self.g.as_ref(), f0)?;
        self.factor = out.factor;
        Ok((1 + out.steps, out.grad, out.orth))
    }

    /// One Riemannian Newton step from `P = U Q^T`, computed in `K x K` space from
    /// `E = U^T U - I` (in `kk[1]`) and `s`, and the new factor of `B = sym(P^T G)`.
    ///
    /// With `G Q = U S` (`S = diag(s)`), the Newton–Schulz factor `N1 = I - E/2` makes
    /// `U N1` orthonormal to `O(E^2)`, and `(U N1)^T G Q = (I + E/2) S`. Its polar factor is
    /// `I + Omega` to first order, `Omega` skew with `Omega S + S Omega = skew(E S)`:
    /// `Omega_ij = E_ij (s_j - s_i) / (2 (s_i + s_j))`. So `P' = U N Q^T` with
    /// `N = N1 (I + Omega)`, and `Q^T sym(P'^T G) Q = D = S + sym(E S)/2 - sym(Omega S)`
    /// (to `O(E^2)`), factored `D = R diag(s') R^T`: the new factor is `Q' = Q R`,
    /// `U' = U N R`, `s'`.
    fn newton_in_k_space(&mut self) -> Result<()> {
        let k = self.k;
        let s = &self.factor.s;
        let [a, e, b] = &mut self.kk;
        // b = D, a = N - I = -E/2 + Omega (N = N1 (I + Omega) to first order; the dropped
        // E Omega / 2 is O(E^2), below rounding for the E this is called with).
        for j in 0..k {
            for i in 0..k {
                let eij = e[(i, j)];
                let om = eij * (s[j] - s[i]) / (2.0 * (s[i] + s[j]));
                let id = if i == j { 1.0 } else { 0.0 };
                b[(i, j)] = id * s[i] + eij * (s[i] + s[j]) / 4.0 - om * (s[j] - s[i]) / 2.0;
                a[(i, j)] = -0.5 * eij + om;
            }
        }
        // R in e, s' in lam.
        self.eig.run(b.as_ref(), e.as_mut(), &mut self.lam)?;
        // P' = U N Q^T = P + P Delta with Delta = Q (N - I) Q^T: the correction is formed
        // on its own, so P' carries no more rounding than P (a product with the dense
        // Q N Q^T would add ~eps sqrt(K) to P'^T P').
        gemm(
            b.as_mut(),
            Accum::Replace,
            self.factor.q.as_ref(),
            a.as_ref(),
            1.0,
        );
        gemm(
            a.as_mut(),
            Accum::Replace,
            b.as_ref(),
            self.factor.q.transpose(),
            1.0,
        );
        self.dk.copy_from(&self.factor.p);
        gemm(
            self.dk.as_mut(),
            Accum::Add,
            self.factor.p.as_ref(),
            a.as_ref(),
            1.0,
        );
        std::mem::swap(&mut self.dk, &mut self.factor.p);
        // Q' = Q R; U' = P' Q'.
        gemm(
            b.as_mut(),
            Accum::Replace,
            self.factor.q.as_ref(),
            e.as_ref(),
            1.0,
        );
        std::mem::swap(b, &mut self.factor.q);
        gemm(
            self.factor.u.as_mut(),
            Accum::Replace,
            self.factor.p.as_ref(),
            self.factor.q.as_ref(),
            1.0,
        );
        self.factor.s.copy_from_slice(&self.lam);
        Ok(())
    }

    /// `(||G - P sym(P^T G)||_F, max |P^T P - I|)` evaluated directly at `self.factor.p`.
    fn direct_check(&mut self) -> (f64, f64) {
        let k = self.k;
        let [a, e, _] = &mut self.kk;
        gemm(
            a.as_mut(),
            Accum::Replace,
            self.factor.p.transpose(),
            self.g.as_ref(),
            1.0,
        );
        for j in 0..k {
            for i in 0..j {
                let v = 0.5 * (a[(i, j)] + a[(j, i)]);
                a[(i, j)] = v;
                a[(j, i)] = v;
            }
        }
        self.dk.copy_from(&self.g);
        gemm(
            self.dk.as_mut(),
            Accum::Add,
            self.factor.p.as_ref(),
            a.as_ref(),
            -1.0,
        );
        let grad = fro(self.dk.as_ref());
        gram_lower(e.as_mut(), self.factor.p.as_ref());
        let mut orth = 0.0f64;
        for j in 0..k {
            for i in j..k {
                let t = if i == j { 1.0 } else { 0.0 };
                orth = orth.max((e[(i, j)] - t).abs());
            }
        }
        (grad, orth)
    }

    /// The last solve's factor, mutable: a caller that keeps factors of several solves
    /// swaps its own in and out (the solve overwrites it completely).
    pub fn factor_mut(&mut self) -> &mut Factor {
        &mut self.factor
    }

    /// The implicit backward of the last solve: `dL/dP` (`d x K`) to `dL/dY` into `dy` and,
    /// if given, `dL/dProx` into `dprox` ([`crate::cpu::backward`]).
    pub fn backward_into(
        &mut self,
        dl_dp: MatRef<'_, f64>,
        delta: f64,
        dy: MatMut<'_, f64>,
        dprox: Option<MatMut<'_, f64>>,
    ) -> Result<()> {
        if !self.solved {
            return Err(Error::BackwardWithoutForward);
        }
        let f = std::mem::replace(&mut self.factor, empty_factor());
        let out = self.backward_with(&f, dl_dp, delta, dy, dprox);
        self.factor = f;
        out
    }

    /// The implicit backward at a given factor of this shape (a solve kept elsewhere), with
    /// this solver's scratch memory.
    pub fn backward_with(
        &mut self,
        f: &Factor,
        dl_dp: MatRef<'_, f64>,
        delta: f64,
        mut dy: MatMut<'_, f64>,
        dprox: Option<MatMut<'_, f64>>,
    ) -> Result<()> {
        same_shape("dL/dP", dl_dp, self.g.as_ref())?;
        same_shape("P", f.p.as_ref(), self.g.as_ref())?;
        same_shape("U", f.u.as_ref(), self.g.as_ref())?;
        if f.q.nrows() != self.k || f.q.ncols() != self.k || f.s.len() != self.k {
            return Err(Error::ShapeMismatch {
                what: "Q",
                expected: self.k * self.k,
                got: f.q.nrows() * f.q.ncols(),
            });
        }
        same_shape("dL/dY", dy.as_ref(), self.g.as_ref())?;
        if let Some(p) = &dprox {
            same_shape("dL/dProx", p.as_ref(), self.g.as_ref())?;
        }
        tangent_solve_into(f, dl_dp, self.dk.as_mut(), &mut self.tangent)?;
        center_scale_into(
            self.dk.as_ref(),
            -c_of(self.k),
            None,
            &mut self.means,
            dy.rb_mut(),
        );
        if let Some(mut p) = dprox {
            let u = self.dk.as_ref();
            zip!(p.rb_mut(), u).for_each(|unzip!(p, u)| *p = -delta * *u);
        }
        Ok(())
    }
}

/// A factor with no memory (a placeholder while one is borrowed out).
fn empty_factor() -> Factor {
    Factor {
        p: Mat::new(),
        u: Mat::new(),
        q: Mat::new(),
        s: Vec::new(),
    }
}

/// `(||sym(E S)||_F, max |E|)`: the Riemannian gradient and the orthogonality of
/// `P = U Q^T` when `G Q = U S` and `E = U^T U - I` (see [`Solver::procrustes`]).
fn certificate(e: MatRef<'_, f64>, s: &[f64]) -> (f64, f64) {
    let k = s.len();
    let (mut g2, mut orth) = (0.0f64, 0.0f64);
    for j in 0..k {
        for i in 0..k {
            let v = e[(i, j)];
            orth = orth.max(v.abs());
            let t = 0.5 * v * (s[i] + s[j]);
            g2 += t * t;
        }
    }
    (g2.sqrt(), orth)
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
    objective_with(y, p, prox, delta, &mut vec![0.0; y.nrows()])
}

/// [`objective`] with the row means' scratch (`d`) given.
fn objective_with(
    y: MatRef<'_, f64>,
    p: MatRef<'_, f64>,
    prox: MatRef<'_, f64>,
    delta: f64,
    means: &mut [f64],
) -> f64 {
    let k = y.ncols();
    row_means(p, means);
    let s = 1.0 / ((k - 1) as f64).sqrt();
    let mut f = 0.0;
    let mut r = 0.0;
    for j in 0..k {
        let (yc, pc, xc) = (y.col(j), p.col(j), prox.col(j));
        for i in 0..y.nrows() {
            let e = yc[i] - s * (pc[i] - means[i]);
            f += e * e;
            let q = pc[i] - xc[i];
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
            // Accept unless the objective clearly drops: near the optimum a Newton step gains
            // ~grad^2 / s_min, which is below the rounding of `h` itself (a sum of d K
            // products), so a tighter test would reject good steps by chance.
            if h(&cand) >= h0 - 1e-12 * h0.abs() {
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
