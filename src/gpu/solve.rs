//! The nearest simplex ETF on the device (`docs/solve.md`), float64 throughout:
//!
//! ```text
//! Y = E/||E||, G = c Y M + delta Prox            build_g (row-mean removal fused)
//! G^T G = Q diag(s^2) Q^T                        gemms, one-block Jacobi (warm: (G Q0)^T G Q0),
//!                                                or Ogita–Aishima refinement + Jacobi (large K)
//! U   = G (Q diag(1/s)),  P = U Q^T              gemm, gemm
//! ```
//!
//! This is the CPU head's Procrustes (Gram) route without its polish: `P` is the polar factor
//! to `~eps cond(G)^2` (`1e-10` at the default `delta = 1e-3`), and `B = sym(P^T G)` equals
//! `Q diag(s) Q^T` to the same order, which is what the backward uses. Optional Riemannian
//! Newton steps (see [`super::head::DeviceOptions::max_newton_steps`]) polish further.
//!
//! Warm start: the eigenvectors of the previous step, `Q0`, nearly diagonalise this step's
//! Gram matrix (the class means move little between steps), so Jacobi runs on
//! `Q0^T (G^T G) Q0` from `V = Q0` and needs one to three sweeps instead of six to ten.

use crate::kernels;
use crate::kernels::elementwise::ops as elementwise;
use crate::kernels::head::solve as ksolve;

use super::linalg::{
    congruence, identity, jacobi_factor, refine, sym_eig, EigenSolver, FactorOut, Gemm, GemmKernel,
};
use super::status::Status;
use super::stiefel::{tangent_solve, FactorDev};
use crate::core::validate::check_len;
use crate::error::Result;
use crate::runtime::{grid_stride, Buffer, DType, Device, LaunchConfig};

/// `c = 2 / sqrt(K - 1)`.
fn c_of(k: usize) -> f64 {
    crate::core::constants::c_of(k)
}

/// `Y = E_new / ||E_new||` into `y` (f32 d x K) and `G = c Y M + delta Prox` (`prox` f64
/// d x K) into a new f64 buffer, in one launch; `norm` is `||E_new||` (1 f32).
#[allow(clippy::too_many_arguments)]
pub fn build_g(
    dev: &Device,
    e_new: &Buffer,
    norm: &Buffer,
    prox: &Buffer,
    y: &mut Buffer,
    d: usize,
    k: usize,
    delta: f64,
) -> Result<Buffer> {
    check_len("E_new", d * k, e_new.len())?;
    check_len("norm", 1, norm.len())?;
    check_len("Y", d * k, y.len())?;
    check_len("Prox", d * k, prox.len())?;
    let mut g = dev.alloc(DType::F64, d * k)?;
    // SAFETY: `e_new`, `y` (f32) and `prox` (f64) hold `d K` (checked above), `norm` 1, `g`
    // `d K` (allocated here).
    unsafe {
        kernels::head::solve::build_g_f64(
            dev,
            // One row group (a warp on a GPU) per row.
            grid_stride(dev, super::shape::row_lanes(dev) * d.max(1)),
            e_new,
            norm,
            prox,
            d as i32,
            k as i32,
            c_of(k),
            delta,
            y,
            &mut g,
            super::shape::row_lanes(dev) as i32,
        )
    }?;
    Ok(g)
}

/// The Procrustes solve of `G` (d x K f64): the polar factor and the factor of `B`.
/// `warm`: the previous eigenvectors `Q0` (K x K), or `None` for a cold start. Failures
/// (rank-deficient `G`, no convergence) are recorded in entry 3 of `status`.
///
/// Per eigensolver (after [`EigenSolver::resolve`]):
/// - one block, warm: `H = G Q0`, `A = H^T H` (two products), then `jacobi_factor` from
///   `V = Q0` (one launch; it also writes `s`, `1/s`, `Q diag(1/s)`, `max |s|`);
/// - one block, cold (and [`EigenSolver::Refine`] without a warm start): `A = G^T G`, then
///   `jacobi_factor` from the identity;
/// - refinement, warm: `A = G^T G`, the Ogita–Aishima iterations from `Q0`
///   ([`super::linalg::refine`]), then `jacobi_factor` on what they leave;
/// - blocks: `A` as above, the host-driven block Jacobi, then `jacobi_factor` on its diagonal
///   result (a check pass and the singular values);
///
/// then `U = G (Q diag(1/s))` and `P = U Q^T` (two products).
#[allow(clippy::too_many_arguments)]
pub fn procrustes(
    dev: &Device,
    gk: GemmKernel,
    eig: EigenSolver,
    g: Buffer,
    warm: Option<&Buffer>,
    d: usize,
    k: usize,
    max_sweeps: usize,
    status: &mut Status,
) -> Result<FactorDev> {
    let solver = eig.resolve(dev, k);
    solver.validate(k)?;
    let gram = |dev: &Device| -> Result<Buffer> {
        let mut a = dev.alloc(DType::F64, k * k)?;
        Gemm::new(true, false, k, k, d).run(dev, gk, &g, &g, &mut a)?;
        Ok(a)
    };
    let mut q = dev.alloc(DType::F64, k * k)?;
    let mut s = dev.alloc(DType::F64, k)?;
    let mut s_inv = dev.alloc(DType::F64, k)?;
    let mut vs = dev.alloc(DType::F64, k * k)?;
    let mut s_max = dev.alloc(DType::F64, 1)?;
    let mut sweeps = dev.alloc(DType::I32, 2)?;
    let out = FactorOut {
        v: &mut q,
        s: &mut s,
        s_inv: &mut s_inv,
        vs: &mut vs,
        s_max: &mut s_max,
        info: &mut sweeps,
    };
    let eps = f64::EPSILON;
    match (solver, warm) {
        (EigenSolver::Refine, Some(q0)) => {
            // In the previous eigenbasis: H = G Q0, A' = H^T H; refined from the identity to
            // A' = V diag(s^2) V^T; then Q = Q0 V and Q diag(1/s) = Q0 (V diag(1/s)).
            let mut h = dev.alloc(DType::F64, d * k)?;
            Gemm::new(false, false, d, k, k).run(dev, gk, &g, q0, &mut h)?;
            let mut a = dev.alloc(DType::F64, k * k)?;
            Gemm::new(true, false, k, k, d).run(dev, gk, &h, &h, &mut a)?;
            let mut v = dev.alloc(DType::F64, k * k)?;
            let mut v_s = dev.alloc(DType::F64, k * k)?;
            let out = FactorOut {
                v: &mut v,
                vs: &mut v_s,
                ..out
            };
            refine(dev, gk, &mut a, k, max_sweeps, out, status)?;
            let square = Gemm::new(false, false, k, k, k);
            square.run(dev, gk, q0, &v, &mut q)?;
            square.run(dev, gk, q0, &v_s, &mut vs)?;
            // U = G Q diag(1/s) = H (V diag(1/s)).
            let mut u = dev.alloc(DType::F64, d * k)?;
            Gemm::new(false, false, d, k, k).run(dev, gk, &h, &v_s, &mut u)?;
            return finish(dev, gk, g, u, q, s, s_inv, vs, s_max, sweeps, d, k);
        }
        (EigenSolver::Blocked { .. }, _) => {
            // The host-driven block solver, then the factor from its (diagonal) result.
            let mut a = gram(dev)?;
            let mut v = dev.alloc(DType::F64, k * k)?;
            match warm {
                Some(q0) => {
                    a = congruence(dev, gk, None, &a, q0, k)?;
                    dev.copy_into(&mut v, q0)?;
                }
                None => identity(dev, &mut v, k)?,
            }
            let mut lam = dev.alloc(DType::F64, k)?;
            let mut info = dev.alloc(DType::I32, 1)?;
            sym_eig(
                dev, solver, &mut a, &mut v, k, max_sweeps, &mut lam, &mut info, status, None,
            )?;
            jacobi_factor(dev, &mut a, Some(&v), k, 1, eps, true, out, status, None)?;
        }
        (_, Some(q0)) => {
            // A' = (G Q0)^T (G Q0), from V = Q0.
            let mut h = dev.alloc(DType::F64, d * k)?;
            Gemm::new(false, false, d, k, k).run(dev, gk, &g, q0, &mut h)?;
            let mut a = dev.alloc(DType::F64, k * k)?;
            Gemm::new(true, false, k, k, d).run(dev, gk, &h, &h, &mut a)?;
            jacobi_factor(
                dev,
                &mut a,
                Some(q0),
                k,
                max_sweeps,
                eps,
                true,
                out,
                status,
                None,
            )?;
        }
        (_, None) => {
            let mut a = gram(dev)?;
            jacobi_factor(
                dev, &mut a, None, k, max_sweeps, eps, true, out, status, None,
            )?;
        }
    }
    let mut u = dev.alloc(DType::F64, d * k)?;
    Gemm::new(false, false, d, k, k).run(dev, gk, &g, &vs, &mut u)?;
    finish(dev, gk, g, u, q, s, s_inv, vs, s_max, sweeps, d, k)
}

/// `P = U Q^T` and the factor.
#[allow(clippy::too_many_arguments)]
fn finish(
    dev: &Device,
    gk: GemmKernel,
    g: Buffer,
    u: Buffer,
    q: Buffer,
    s: Buffer,
    s_inv: Buffer,
    vs: Buffer,
    s_max: Buffer,
    sweeps: Buffer,
    d: usize,
    k: usize,
) -> Result<FactorDev> {
    let mut p = dev.alloc(DType::F64, d * k)?;
    Gemm::new(false, true, d, k, k).run(dev, gk, &u, &q, &mut p)?;
    Ok(FactorDev {
        p,
        u,
        q,
        s,
        s_inv,
        vs,
        s_max,
        g,
        sweeps,
        newton: dev.alloc(DType::I32, 2)?,
    })
}

/// `x[i][c] *= s[c]` (rows x k f64).
pub fn scale_cols(dev: &Device, x: &mut Buffer, s: &Buffer, rows: usize, k: usize) -> Result<()> {
    check_len("scale_cols x", rows * k, x.len())?;
    check_len("scale_cols s", k, s.len())?;
    // SAFETY: `x` holds `rows k` and `s` `k` elements (checked above).
    unsafe {
        kernels::head::solve::scale_cols_f64(
            dev,
            grid_stride(dev, rows * k),
            x,
            s,
            rows as i32,
            k as i32,
        )
    }
}

/// Riemannian Newton steps on St(d, K) from `f` (the Procrustes factor), with the CPU head's
/// stopping rule, decided on the device. Before each step, `newton_check` measures the
/// Riemannian gradient `||P B - G||_F` and `max |P^T P - I|` and sets a device flag once both
/// are at rounding level (`grad <= eps max(16, sqrt(dK)/4) ||G||_F`, the CPU head's
/// [`grad_tol`](crate::cpu::solve::grad_tol), and orthogonality `<=`
/// [`ORTH_TOL`](crate::core::constants::ORTH_TOL)), or once a step no longer gains a factor 10.
/// Every later kernel of the polish reads that flag: the products and the eigensolver return at
/// once, and the step's result is not committed. So at most `max_steps` steps run, the host
/// makes no decision (no synchronisation), and a converged polish costs one check and a few
/// empty launches per remaining step.
///
/// A step, as the CPU head's polish: the Newton direction `X` solves `Proj_T(X B) = G - P B`
/// (the backward's tangent-space solve with `V = P B - G`), then `P <- NS(P + X)` (two
/// Newton–Schulz retraction steps) and `B = sym(P^T G)` is factored again by Jacobi
/// warm-started from the previous eigenvectors. Convergence is quadratic: one step takes the
/// Gram route's `eps cond(G)^2` error to rounding level unless `G` is extremely
/// ill-conditioned. The steps taken are counted in `f.newton[0]`.
#[allow(clippy::too_many_arguments)]
pub fn newton_polish(
    dev: &Device,
    gk: GemmKernel,
    eig: EigenSolver,
    mut f: FactorDev,
    d: usize,
    k: usize,
    max_steps: usize,
    max_sweeps: usize,
    status: &mut Status,
) -> Result<FactorDev> {
    f.check(d, k)?;
    const NS_ITERS: usize = 2;
    if max_steps == 0 {
        return Ok(f);
    }
    let _ = eig;
    f.newton = dev.alloc_zeros(DType::I32, 2)?;
    let mut done = dev.alloc_zeros(DType::I32, 1)?;
    let mut hist = dev.alloc_zeros(DType::F64, 3)?;
    let grad_rel = crate::core::constants::grad_tol_rel(d, k);
    let check_threads = match dev.backend() {
        crate::runtime::Backend::Cpu => 32,
        crate::runtime::Backend::Cuda => 256,
    };
    for _ in 0..max_steps {
        // V = P B - G = U diag(s) Q^T - G, and P^T P: the stopping rule.
        let mut us = dev.copy(&f.u)?;
        scale_cols(dev, &mut us, &f.s, d, k)?;
        let mut v = dev.copy(&f.g)?;
        let mut gm = Gemm::new(false, true, d, k, k);
        gm.beta = -1.0;
        gm.run_gated(dev, gk, Some(&done), &us, &f.q, &mut v)?;
        let mut ptp = dev.alloc(DType::F64, k * k)?;
        Gemm::new(true, false, k, k, d).run_gated(dev, gk, Some(&done), &f.p, &f.p, &mut ptp)?;
        // SAFETY: `v`, `f.g` hold `d K`, `ptp` `K K`, `done` 1, `f.newton` 2 (checked by `f.check`), `hist` 3 (allocated here); one block.
        unsafe {
            kernels::head::solve::newton_check_f64(
                dev,
                LaunchConfig::new((1, 1, 1), (check_threads, 1, 1)),
                &v,
                &ptp,
                &f.g,
                d as i32,
                k as i32,
                grad_rel,
                crate::core::constants::ORTH_TOL,
                &mut done,
                &mut f.newton,
                &mut hist,
            )
        }?;
        // The step (every product and the eigensolver behind the flag).
        let x = tangent_solve(dev, gk, &f, &v, d, k, status, Some(&done))?;
        let mut z = dev.alloc(DType::F64, d * k)?;
        // SAFETY (this and the launches below): every buffer was allocated above, or checked
        // by `FactorDev`, at the `d x K` / `K x K` sizes the kernels are given.
        unsafe {
            elementwise::add_f64(
                dev,
                grid_stride(dev, d * k),
                &f.p,
                &x,
                (d * k) as i64,
                &mut z,
            )
        }?;
        for _ in 0..NS_ITERS {
            let mut ztz = dev.alloc(DType::F64, k * k)?;
            Gemm::new(true, false, k, k, d).run_gated(dev, gk, Some(&done), &z, &z, &mut ztz)?;
            let mut m = dev.alloc(DType::F64, k * k)?;
            // SAFETY: `ztz` and `m` hold `K K` (allocated here).
            unsafe {
                ksolve::newton_schulz_factor_f64(
                    dev,
                    grid_stride(dev, k * k),
                    &ztz,
                    k as i32,
                    &mut m,
                )
            }?;
            let mut zn = dev.alloc(DType::F64, d * k)?;
            Gemm::new(false, false, d, k, k).run_gated(dev, gk, Some(&done), &z, &m, &mut zn)?;
            z = zn;
        }
        // B = sym(P^T G), factored from the previous eigenvectors.
        let mut ptg = dev.alloc(DType::F64, k * k)?;
        Gemm::new(true, false, k, k, d).run_gated(dev, gk, Some(&done), &z, &f.g, &mut ptg)?;
        let mut b = dev.alloc(DType::F64, k * k)?;
        // SAFETY: `ptg` and `b` hold `K K` (allocated here).
        unsafe { ksolve::symmetrise_f64(dev, grid_stride(dev, k * k), &ptg, k as i32, &mut b) }?;
        let mut a = congruence(dev, gk, Some(&done), &b, &f.q, k)?;
        let mut q = dev.alloc(DType::F64, k * k)?;
        // `B`'s eigenvalues are `s` itself (mode 0), written into the factor directly: the
        // gate keeps them when the polish has stopped.
        jacobi_factor(
            dev,
            &mut a,
            Some(&f.q),
            k,
            max_sweeps,
            f64::EPSILON,
            false,
            FactorOut {
                v: &mut q,
                s: &mut f.s,
                s_inv: &mut f.s_inv,
                vs: &mut f.vs,
                s_max: &mut f.s_max,
                info: &mut f.sweeps,
            },
            status,
            Some(&done),
        )?;
        let mut u = dev.alloc(DType::F64, d * k)?;
        Gemm::new(false, false, d, k, k).run_gated(dev, gk, Some(&done), &z, &q, &mut u)?;
        // Commit the step unless the check stopped the polish.
        for (dst, src, len) in [
            (&mut f.p, &z, d * k),
            (&mut f.u, &u, d * k),
            (&mut f.q, &q, k * k),
        ] {
            // SAFETY: `dst` and `src` hold `len` f64 (the factor, checked by `f.check`, and the step's buffers of the same sizes), `done` 1.
            unsafe {
                ksolve::take_step_f64(
                    dev,
                    grid_stride(dev, len),
                    dst,
                    src,
                    len as i64,
                    Some(&done),
                )
            }?;
        }
    }
    Ok(f)
}
