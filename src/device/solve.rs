//! The nearest simplex ETF on the device (`method.md` §3), float64 throughout:
//!
//! ```text
//! G   = c Y M + delta Prox                       build_g (row-mean removal fused)
//! G^T G = Q diag(s^2) Q^T                        gemm, jacobi_eig_f64 (warm: Q0^T G^T G Q0)
//! U   = G Q diag(1/s),  P = U Q^T                gemm, scale_cols_f64, gemm
//! ```
//!
//! This is the CPU head's Procrustes (Gram) route without its polish: `P` is the polar factor
//! to `~eps cond(G)^2` (`1e-10` at the default `delta = 1e-3`), and `B = sym(P^T G)` equals
//! `Q diag(s) Q^T` to the same order, which is what the backward uses. Optional Riemannian
//! Newton steps (see [`super::head::DeviceOptions::newton_steps`]) polish further.
//!
//! Warm start: the eigenvectors of the previous step, `Q0`, nearly diagonalise this step's
//! Gram matrix (the class means move little between steps), so Jacobi runs on
//! `Q0^T (G^T G) Q0` from `V = Q0` and needs one to three sweeps instead of six to ten.

use faer::MatRef;

use super::linalg::{identity, sym_eig, Gemm, GemmKernel};
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
    /// Jacobi sweeps used (i32, 1).
    pub sweeps: Buffer,
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
            let t = dev.alloc_zeros(DType::F64, k * k)?;
            Gemm::new(false, false, k, k, k).run(dev, gk, &gram, q0, &t)?;
            let a = dev.alloc_zeros(DType::F64, k * k)?;
            Gemm::new(true, false, k, k, k).run(dev, gk, q0, &t, &a)?;
            (a, dev.copy(q0)?)
        }
        None => {
            let q = dev.alloc_zeros(DType::F64, k * k)?;
            identity(dev, &q, k)?;
            (gram, q)
        }
    };
    let lam = dev.alloc_zeros(DType::F64, k)?;
    let sweeps = dev.alloc_zeros(DType::I32, 1)?;
    sym_eig(dev, &a, &q, k, max_sweeps, &lam, &sweeps, status)?;
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

/// Riemannian Newton steps on St(d, K) from `f` (the Procrustes factor), as the CPU head's
/// polish does: the Newton direction `X` solves `Proj_T(X B) = G - P B` (the backward's
/// tangent-space solve with `V = P B - G`), then `P <- NS(P + X)` (`ns_iters` Newton–Schulz
/// retraction steps) and `B = sym(P^T G)` is factored again by Jacobi warm-started from the
/// previous eigenvectors. `steps` fixed steps (no host decision, so no synchronisation);
/// convergence is quadratic, so one step takes the Gram route's `eps cond(G)^2` error to
/// rounding level unless `G` is extremely ill-conditioned.
#[allow(clippy::too_many_arguments)]
pub fn newton_polish(
    dev: &Device,
    gk: GemmKernel,
    mut f: FactorDev,
    d: usize,
    k: usize,
    steps: usize,
    max_sweeps: usize,
    status: &Status,
) -> Result<FactorDev> {
    const NS_ITERS: usize = 2;
    for _ in 0..steps {
        // V = P B - G = U diag(s) Q^T - G.
        let us = dev.copy(&f.u)?;
        scale_cols(dev, &us, &f.s, d, k)?;
        let v = dev.copy(&f.g)?;
        let mut gm = Gemm::new(false, true, d, k, k);
        gm.beta = -1.0;
        gm.run(dev, gk, &us, &f.q, &v)?;
        let x = super::backward::tangent_solve(dev, gk, &f, &v, d, k, status)?;
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
            Gemm::new(true, false, k, k, d).run(dev, gk, &z, &z, &ztz)?;
            let m = dev.alloc_zeros(DType::F64, k * k)?;
            launch_k(
                dev,
                "newton_schulz_factor",
                &[Arg::Buf(&ztz), Arg::I32(k as i32), Arg::Buf(&m)],
                k * k,
            )?;
            let zn = dev.alloc_zeros(DType::F64, d * k)?;
            Gemm::new(false, false, d, k, k).run(dev, gk, &z, &m, &zn)?;
            z = zn;
        }
        // B = sym(P^T G), factored from the previous eigenvectors.
        let ptg = dev.alloc_zeros(DType::F64, k * k)?;
        Gemm::new(true, false, k, k, d).run(dev, gk, &z, &f.g, &ptg)?;
        let b = dev.alloc_zeros(DType::F64, k * k)?;
        launch_k(
            dev,
            "symmetrise_f64",
            &[Arg::Buf(&ptg), Arg::I32(k as i32), Arg::Buf(&b)],
            k * k,
        )?;
        let t = dev.alloc_zeros(DType::F64, k * k)?;
        Gemm::new(false, false, k, k, k).run(dev, gk, &b, &f.q, &t)?;
        let a = dev.alloc_zeros(DType::F64, k * k)?;
        Gemm::new(true, false, k, k, k).run(dev, gk, &f.q, &t, &a)?;
        let q = dev.copy(&f.q)?;
        let lam = dev.alloc_zeros(DType::F64, k)?;
        sym_eig(dev, &a, &q, k, max_sweeps, &lam, &f.sweeps, status)?;
        dev.launch(
            "eigenvalues_inv",
            LaunchConfig::new((1, 1, 1), (32, 1, 1)),
            &[
                Arg::Buf(&lam),
                Arg::I32(k as i32),
                Arg::Buf(&f.s),
                Arg::Buf(&f.s_inv),
                Arg::Buf(&status.buf),
            ],
        )?;
        let u = dev.alloc_zeros(DType::F64, d * k)?;
        Gemm::new(false, false, d, k, k).run(dev, gk, &z, &q, &u)?;
        f = FactorDev {
            p: z,
            u,
            q,
            s: f.s,
            s_inv: f.s_inv,
            g: f.g,
            sweeps: f.sweeps,
        };
    }
    Ok(f)
}
