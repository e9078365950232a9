//! The nearest simplex ETF on the device (`method.md` §3), float64 throughout:
//!
//! ```text
//! G   = c Y M + delta Prox                       build_g (row-mean removal fused)
//! G^T G = Q diag(s^2) Q^T                        gemm, Jacobi (warm: Q0^T G^T G Q0)
//! U   = G Q diag(1/s),  P = U Q^T                gemm, scale_cols_f64, gemm
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

use faer::MatRef;

use super::linalg::{congruence, identity, sym_eig, EigenSolver, Gemm, GemmKernel};
use super::status::Status;
use super::{grid_stride, Arg, Buffer, DType, Device, LaunchConfig};
use crate::cpu::linalg::to_row_major;
use crate::cpu::solve::Factor;
use crate::error::Result;

/// `P`, its factorisation `B = sym(P^T G) = Q diag(s) Q^T` with `U = P Q`, and `G`, on the
/// device (all f64, row-major: `p`, `u`, `g` d x K; `q` K x K; `s`, `s_inv` K).
#[derive(Debug)]
pub struct FactorDev {
    /// `P`.
    pub p: Buffer,
    /// `U = P Q`.
    pub u: Buffer,
    /// Eigenvectors of `B` (columns).
    pub q: Buffer,
    /// Eigenvalues of `B` (the singular values of `G`), unsorted.
    pub s: Buffer,
    /// `1 / s`.
    pub s_inv: Buffer,
    /// `G = c Y M + delta Prox`.
    pub g: Buffer,
    /// Jacobi sweeps used by the last eigensolve (i32, 1).
    pub sweeps: Buffer,
    /// Newton polish counters (i32, 2): steps taken, stopping checks made.
    pub newton: Buffer,
}

impl FactorDev {
    /// Uploads a CPU factor (the first step's, solved on the host) with its `G`.
    pub fn upload(dev: &Device, f: &Factor, g: MatRef<'_, f64>) -> Result<FactorDev> {
        let inv: Vec<f64> = f.s.iter().map(|v| 1.0 / v).collect();
        Ok(FactorDev {
            p: dev.upload(&to_row_major::<f64>(f.p.as_ref()))?,
            u: dev.upload(&to_row_major::<f64>(f.u.as_ref()))?,
            q: dev.upload(&to_row_major::<f64>(f.q.as_ref()))?,
            s: dev.upload(&f.s)?,
            s_inv: dev.upload(&inv)?,
            g: dev.upload(&to_row_major::<f64>(g))?,
            sweeps: dev.upload(&[0i32])?,
            newton: dev.upload(&[0i32; 2])?,
        })
    }
}

/// `c = 2 / sqrt(K - 1)`.
fn c_of(k: usize) -> f64 {
    crate::cpu::solve::c_of(k)
}

/// `G = c Y M + delta Prox` (`y` f32 d x K, `prox` f64 d x K) into a new f64 buffer.
pub fn build_g(
    dev: &Device,
    y: &Buffer,
    prox: &Buffer,
    d: usize,
    k: usize,
    delta: f64,
) -> Result<Buffer> {
    let g = dev.alloc_zeros(DType::F64, d * k)?;
    dev.launch(
        "build_g",
        grid_stride(dev, d),
        &[
            Arg::Buf(y),
            Arg::Buf(prox),
            Arg::I32(d as i32),
            Arg::I32(k as i32),
            Arg::F64(c_of(k)),
            Arg::F64(delta),
            Arg::Buf(&g),
        ],
    )?;
    Ok(g)
}

/// The Procrustes solve of `G` (d x K f64): the polar factor and the factor of `B`.
/// `warm`: the previous eigenvectors `Q0` (K x K), or `None` for a cold start. Failures
/// (rank-deficient `G`, no convergence) are recorded in entry 3 of `status`.
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
    status: &Status,
) -> Result<FactorDev> {
    let gram = dev.alloc_zeros(DType::F64, k * k)?;
    Gemm::new(true, false, k, k, d).run(dev, gk, &g, &g, &gram)?;
    let (a, q) = match warm {
        Some(q0) => {
            // A' = Q0^T (G^T G) Q0, V = Q0.
            (congruence(dev, gk, None, &gram, q0, k)?, dev.copy(q0)?)
        }
        None => {
            let q = dev.alloc_zeros(DType::F64, k * k)?;
            identity(dev, &q, k)?;
            (gram, q)
        }
    };
    let lam = dev.alloc_zeros(DType::F64, k)?;
    let sweeps = dev.alloc_zeros(DType::I32, 1)?;
    sym_eig(dev, eig, &a, &q, k, max_sweeps, &lam, &sweeps, status, None)?;
    let s = dev.alloc_zeros(DType::F64, k)?;
    let s_inv = dev.alloc_zeros(DType::F64, k)?;
    dev.launch(
        "singular_values",
        LaunchConfig::new((1, 1, 1), (32, 1, 1)),
        &[
            Arg::Buf(&lam),
            Arg::I32(k as i32),
            Arg::Buf(&s),
            Arg::Buf(&s_inv),
            Arg::Buf(&status.buf),
        ],
    )?;
    let u = dev.alloc_zeros(DType::F64, d * k)?;
    Gemm::new(false, false, d, k, k).run(dev, gk, &g, &q, &u)?;
    scale_cols(dev, &u, &s_inv, d, k)?;
    let p = dev.alloc_zeros(DType::F64, d * k)?;
    Gemm::new(false, true, d, k, k).run(dev, gk, &u, &q, &p)?;
    Ok(FactorDev {
        p,
        u,
        q,
        s,
        s_inv,
        g,
        sweeps,
        newton: dev.alloc_zeros(DType::I32, 2)?,
    })
}

/// `x[i][c] *= s[c]` (rows x k f64).
pub fn scale_cols(dev: &Device, x: &Buffer, s: &Buffer, rows: usize, k: usize) -> Result<()> {
    dev.launch(
        "scale_cols_f64",
        grid_stride(dev, rows * k),
        &[
            Arg::Buf(x),
            Arg::Buf(s),
            Arg::I32(rows as i32),
            Arg::I32(k as i32),
        ],
    )
}

fn launch_k(dev: &Device, name: &str, args: &[Arg<'_>], n: usize) -> Result<()> {
    dev.launch(name, grid_stride(dev, n), args)
}

/// Riemannian Newton steps on St(d, K) from `f` (the Procrustes factor), with the CPU head's
/// stopping rule, decided on the device. Before each step, `newton_check` measures the
/// Riemannian gradient `||P B - G||_F` and `max |P^T P - I|` and sets a device flag once both
/// are at rounding level (`grad <= eps max(16, sqrt(dK)/4) ||G||_F`, the CPU head's
/// [`grad_tol`](crate::cpu::solve::grad_tol), and orthogonality `<=`
/// [`ORTH_TOL`](crate::cpu::solve::ORTH_TOL)), or once a step no longer gains a factor 10.
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
    f: FactorDev,
    d: usize,
    k: usize,
    max_steps: usize,
    max_sweeps: usize,
    status: &Status,
) -> Result<FactorDev> {
    const NS_ITERS: usize = 2;
    if max_steps == 0 {
        return Ok(f);
    }
    let done = dev.alloc_zeros(DType::I32, 1)?;
    let gate = Some(&done);
    let hist = dev.alloc_zeros(DType::F64, 3)?;
    let grad_rel = crate::cpu::solve::grad_tol_rel(d, k);
    let check_threads = match dev.backend() {
        super::Backend::Cpu => 32,
        super::Backend::Cuda => 256,
    };
    for _ in 0..max_steps {
        // V = P B - G = U diag(s) Q^T - G, and P^T P: the stopping rule.
        let us = dev.copy(&f.u)?;
        scale_cols(dev, &us, &f.s, d, k)?;
        let v = dev.copy(&f.g)?;
        let mut gm = Gemm::new(false, true, d, k, k);
        gm.beta = -1.0;
        gm.run_gated(dev, gk, gate, &us, &f.q, &v)?;
        let ptp = dev.alloc_zeros(DType::F64, k * k)?;
        Gemm::new(true, false, k, k, d).run_gated(dev, gk, gate, &f.p, &f.p, &ptp)?;
        dev.launch(
            "newton_check",
            LaunchConfig::new((1, 1, 1), (check_threads, 1, 1)),
            &[
                Arg::Buf(&v),
                Arg::Buf(&ptp),
                Arg::Buf(&f.g),
                Arg::I32(d as i32),
                Arg::I32(k as i32),
                Arg::F64(grad_rel),
                Arg::F64(crate::cpu::solve::ORTH_TOL),
                Arg::Buf(&done),
                Arg::Buf(&f.newton),
                Arg::Buf(&hist),
            ],
        )?;
        // The step (every product and the eigensolver behind the flag).
        let x = super::backward::tangent_solve(dev, gk, &f, &v, d, k, status, gate)?;
        let mut z = dev.alloc_zeros(DType::F64, d * k)?;
        launch_k(
            dev,
            "add_f64",
            &[
                Arg::Buf(&f.p),
                Arg::Buf(&x),
                Arg::I64((d * k) as i64),
                Arg::Buf(&z),
            ],
            d * k,
        )?;
        for _ in 0..NS_ITERS {
            let ztz = dev.alloc_zeros(DType::F64, k * k)?;
            Gemm::new(true, false, k, k, d).run_gated(dev, gk, gate, &z, &z, &ztz)?;
            let m = dev.alloc_zeros(DType::F64, k * k)?;
            launch_k(
                dev,
                "newton_schulz_factor",
                &[Arg::Buf(&ztz), Arg::I32(k as i32), Arg::Buf(&m)],
                k * k,
            )?;
            let zn = dev.alloc_zeros(DType::F64, d * k)?;
            Gemm::new(false, false, d, k, k).run_gated(dev, gk, gate, &z, &m, &zn)?;
            z = zn;
        }
        // B = sym(P^T G), factored from the previous eigenvectors.
        let ptg = dev.alloc_zeros(DType::F64, k * k)?;
        Gemm::new(true, false, k, k, d).run_gated(dev, gk, gate, &z, &f.g, &ptg)?;
        let b = dev.alloc_zeros(DType::F64, k * k)?;
        launch_k(
            dev,
            "symmetrise_f64",
            &[Arg::Buf(&ptg), Arg::I32(k as i32), Arg::Buf(&b)],
            k * k,
        )?;
        let a = congruence(dev, gk, gate, &b, &f.q, k)?;
        let q = dev.copy(&f.q)?;
        let lam = dev.alloc_zeros(DType::F64, k)?;
        sym_eig(
            dev, eig, &a, &q, k, max_sweeps, &lam, &f.sweeps, status, gate,
        )?;
        dev.launch(
            "eigenvalues_inv",
            LaunchConfig::new((1, 1, 1), (32, 1, 1)),
            &[
                Arg::Buf(&lam),
                Arg::I32(k as i32),
                Arg::Buf(&f.s),
                Arg::Buf(&f.s_inv),
                Arg::Buf(&status.buf),
                Arg::Buf(&done),
            ],
        )?;
        let u = dev.alloc_zeros(DType::F64, d * k)?;
        Gemm::new(false, false, d, k, k).run_gated(dev, gk, gate, &z, &q, &u)?;
        // Commit the step unless the check stopped the polish.
        for (dst, src, len) in [(&f.p, &z, d * k), (&f.u, &u, d * k), (&f.q, &q, k * k)] {
            launch_k(
                dev,
                "take_step_f64",
                &[
                    Arg::Buf(dst),
                    Arg::Buf(src),
                    Arg::I64(len as i64),
                    Arg::Buf(&done),
                ],
                len,
            )?;
        }
    }
    Ok(f)
}
