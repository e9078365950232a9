//! Dense linear algebra on the device: products (`kernels/linalg/gemm.cu`) and the symmetric
//! eigensolvers (`kernels/linalg/jacobi.cu`: one-block and block Jacobi), used by the ETF solve and
//! the implicit backward.

use super::shape::check_buffer;
use super::status::Status;
use crate::core::validate::fits_i32;
use crate::error::{Error, Result};
use crate::kernels;
use crate::runtime::{grid_stride, Backend, Buffer, DType, Device, LaunchConfig};

/// Which product kernel runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GemmKernel {
    /// cuBLAS on a GPU when libcublas loads ([`Device::blas_name`]; `Dgemm` on Hopper's FP64
    /// tensor cores, `Sgemm` without TF32), for every product that is not behind a device
    /// gate (the Newton polish's); else the tiled kernel on a GPU, the direct one on the CPU
    /// execution.
    #[default]
    Auto,
    /// 64 x 64 shared-memory tiles, 256 threads per block (the GPU path).
    Tiled,
    /// No shared memory, no barrier, 4 x 4 outputs per thread (the CPU execution's path, and
    /// a fallback).
    Direct,
}

impl GemmKernel {
    fn resolve(self, dev: &Device) -> GemmKernel {
        match (self, dev.backend()) {
            (GemmKernel::Auto, Backend::Cuda) => GemmKernel::Tiled,
            (GemmKernel::Auto, Backend::Cpu) => GemmKernel::Direct,
            (k, _) => k,
        }
    }
}

/// Checks an optional gate flag (one i32; `None` means "always run").
pub(crate) fn check_gate(gate: Option<&Buffer>) -> Result<Option<&Buffer>> {
    if let Some(g) = gate {
        check_buffer(g, "gate", 1, DType::I32)?;
    }
    Ok(gate)
}

/// One product `C = alpha op(A) op(B) + beta C` (row-major; `op(A)` is `m x l`, `op(B)` is
/// `l x n`; `ta`/`tb` transpose the stored matrix). All three buffers are f64, or all f32.
#[derive(Debug, Clone, Copy)]
pub struct Gemm {
    /// Transpose A (stored `l x m`).
    pub ta: bool,
    /// Transpose B (stored `n x l`).
    pub tb: bool,
    /// Rows of C.
    pub m: usize,
    /// Columns of C.
    pub n: usize,
    /// Inner dimension.
    pub l: usize,
    /// Scale of the product.
    pub alpha: f64,
    /// Scale of the old C (0 overwrites without reading it).
    pub beta: f64,
}

impl Gemm {
    /// `C = op(A) op(B)`.
    pub fn new(ta: bool, tb: bool, m: usize, n: usize, l: usize) -> Gemm {
        Gemm {
            ta,
            tb,
            m,
            n,
            l,
            alpha: 1.0,
            beta: 0.0,
        }
    }

    /// Launches it.
    pub fn run(
        &self,
        dev: &Device,
        kernel: GemmKernel,
        a: &Buffer,
        b: &Buffer,
        c: &mut Buffer,
    ) -> Result<()> {
        self.run_gated(dev, kernel, None, a, b, c)
    }

    /// Launches it behind a device flag: `gate` (one i32) nonzero at run time makes the launch
    /// a no-op, without a host decision. `None` always runs.
    pub fn run_gated(
        &self,
        dev: &Device,
        kernel: GemmKernel,
        gate: Option<&Buffer>,
        a: &Buffer,
        b: &Buffer,
        c: &mut Buffer,
    ) -> Result<()> {
        let dt = c.dtype();
        let gate = check_gate(gate)?;
        let (mi, ni, li) = (
            fits_i32(self.m, "m")?,
            fits_i32(self.n, "n")?,
            fits_i32(self.l, "l")?,
        );
        check_buffer(a, "gemm A", self.m * self.l, dt)?;
        check_buffer(b, "gemm B", self.l * self.n, dt)?;
        check_buffer(c, "gemm C", self.m * self.n, dt)?;
        if self.m == 0 || self.n == 0 {
            return Ok(());
        }
        if kernel == GemmKernel::Auto
            && gate.is_none()
            && dev.blas_gemm(
                self.ta, self.tb, self.m, self.n, self.l, self.alpha, a, b, self.beta, c,
            )?
        {
            return Ok(());
        }
        let kind = kernel.resolve(dev);
        let (name, cfg) = match kind {
            GemmKernel::Tiled => {
                let tiles = self.m.div_ceil(64) * self.n.div_ceil(64);
                (
                    "tiled",
                    LaunchConfig::new((tiles.min(65535) as u32, 1, 1), (256, 1, 1)),
                )
            }
            _ => (
                "direct",
                grid_stride(dev, self.m.div_ceil(4) * self.n.div_ceil(4)),
            ),
        };
        let (ta, tb) = (i32::from(self.ta), i32::from(self.tb));
        use kernels::linalg::gemm;
        let (alpha, beta) = (self.alpha, self.beta);
        // SAFETY: `a`, `b`, `c` hold `m l`, `l n`, `m n` elements of `dt` and `gate` one i32
        // (checked above), which is all a product reads and writes; `c` is `&mut`, so it
        // aliases neither input.
        unsafe {
            match (dt, name) {
                (DType::F64, "tiled") => {
                    gemm::gemm_tiled_f64(dev, cfg, ta, tb, mi, ni, li, alpha, a, b, beta, c, gate)
                }
                (DType::F64, _) => {
                    gemm::gemm_direct_f64(dev, cfg, ta, tb, mi, ni, li, alpha, a, b, beta, c, gate)
                }
                (DType::F32, "tiled") => gemm::gemm_tiled_f32(
                    dev,
                    cfg,
                    ta,
                    tb,
                    mi,
                    ni,
                    li,
                    alpha as f32,
                    a,
                    b,
                    beta as f32,
                    c,
                    gate,
                ),
                (DType::F32, _) => gemm::gemm_direct_f32(
                    dev,
                    cfg,
                    ta,
                    tb,
                    mi,
                    ni,
                    li,
                    alpha as f32,
                    a,
                    b,
                    beta as f32,
                    c,
                    gate,
                ),
                (other, _) => Err(Error::InvalidParameter {
                    name: "gemm C",
                    reason: format!("products take f64 or f32, got {other:?}"),
                }),
            }
        }
    }
}

/// Largest `K` the one-block Jacobi eigensolver takes.
pub const MAX_JACOBI_K: usize = 1024;
/// Widest column block of the block-Jacobi eigensolver (its `2b x 2b` sub-problems and tiles
/// live in shared memory: `2 (2b)^2` doubles = 36 KiB at `b = 24`).
pub const MAX_BLOCK_WIDTH: usize = 24;
/// Largest `K` that [`EigenSolver::Auto`] gives to the one-block solver; above it (up to
/// [`MAX_JACOBI_K`]) it picks [`EigenSolver::Refine`]. At `K <= 128` a warm one-block Jacobi
/// is one launch of one or two sweeps over a matrix that fits in an SM's cache; above, its
/// `K - 1` rounds per sweep (a barrier each) on one SM cost more than the refinement's
/// products on the whole GPU (`BENCHMARKS.md`, the GPU cost model).
pub const AUTO_ONE_BLOCK_MAX_K: usize = 128;
/// Ogita–Aishima iterations of [`EigenSolver::Refine`] per solve (each takes the error `e`
/// of a well-separated pair to about `e^2 / gap`: two take a warm start's `1e-3` to `1e-12`;
/// the Jacobi after them rotates the rest).
pub const REFINE_ITERATIONS: usize = 2;
/// Newton–Schulz orthonormalisation steps after the iterations (each takes a defect `r` to
/// `3/4 r^2`: two take `1e-3` to `4e-13`).
pub const REFINE_NS_STEPS: usize = 2;
/// Relative rotation threshold of the Jacobi that finishes [`EigenSolver::Refine`]: pairs
/// whose off-diagonal is below `1e-10 sqrt(|a_pp a_qq|)` after the refinement are left, which
/// changes `P` by about as much relative (far inside the head's `1e-8` agreement with the CPU
/// head), and lets a converged refinement skip the sweeps (a one-pass check instead).
pub const REFINE_JACOBI_TOL: f64 = 1e-10;

/// Which symmetric eigensolver runs (`kernels/linalg/jacobi.cu`). Both are cyclic Jacobi with the
/// same rotation test, so they end at the same accuracy; they differ in how the work is
/// spread over the GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EigenSolver {
    /// One block for `K <=` [`AUTO_ONE_BLOCK_MAX_K`], [`EigenSolver::Refine`] up to
    /// [`MAX_JACOBI_K`], blocks of width [`MAX_BLOCK_WIDTH`] above (the same on both
    /// backends, so CI runs the GPU's path).
    #[default]
    Auto,
    /// The whole matrix in one CUDA block (`K <=` [`MAX_JACOBI_K`]). A round streams all of
    /// `A` through one SM.
    OneBlock,
    /// Block Jacobi over many CUDA blocks, any `K` (the only solver above
    /// [`MAX_JACOBI_K`]; its sweeps are launched from the host, `2 nb - 1` launches each, so it
    /// is far from the stream-operation budget): column blocks of `width` (1 to
    /// [`MAX_BLOCK_WIDTH`]) are paired round-robin; each pair's `2 width` square
    /// sub-problem is diagonalised in its own block, then every tile of `A` is rotated in
    /// its own block. `2 (ceil(K / width) rounded up to even) - 1` launches per sweep.
    Blocked {
        /// Column-block width.
        width: usize,
    },
    /// Warm-started refinement made of products (large `K`): Ogita–Aishima iterations on the
    /// previous step's eigenvectors, then the one-block Jacobi on what they leave (clusters
    /// of nearly equal eigenvalues, or a start too far away), its sweep loop on the device.
    /// Needs `K <=` [`MAX_JACOBI_K`]; a cold start (no previous eigenvectors) runs the
    /// one-block Jacobi alone.
    Refine,
}

impl EigenSolver {
    /// The solver that runs for a `k x k` problem on `dev` (with a warm start available; a
    /// cold start runs [`EigenSolver::Refine`]'s Jacobi alone).
    pub fn resolve(self, dev: &Device, k: usize) -> EigenSolver {
        let _ = dev;
        match self {
            EigenSolver::Auto if k <= AUTO_ONE_BLOCK_MAX_K => EigenSolver::OneBlock,
            EigenSolver::Auto if k <= MAX_JACOBI_K => EigenSolver::Refine,
            EigenSolver::Auto => EigenSolver::Blocked {
                width: MAX_BLOCK_WIDTH,
            },
            s => s,
        }
    }

    /// Checks the choice against `k`.
    pub fn validate(self, k: usize) -> Result<()> {
        match self {
            EigenSolver::OneBlock | EigenSolver::Refine if k > MAX_JACOBI_K => Err(Error::InvalidParameter {
                name: "eigensolver",
                reason: format!(
                    "the one-block eigensolver takes K <= {MAX_JACOBI_K}, got {k} (use Blocked or Auto)"
                ),
            }),
            EigenSolver::Blocked { width } if width == 0 || width > MAX_BLOCK_WIDTH => {
                Err(Error::InvalidParameter {
                    name: "eigensolver",
                    reason: format!("block width must be 1..={MAX_BLOCK_WIDTH}, got {width}"),
                })
            }
            _ => Ok(()),
        }
    }
}

/// Eigendecomposition of the symmetric `k x k` f64 matrix `a` (destroyed) by cyclic Jacobi
/// (`kernels/linalg/jacobi.cu`; `solver` picks the one-block or the block solver). `v` holds the
/// start basis on entry (identity for a cold start, the previous eigenvectors for a warm
/// start with `a` already rotated into that basis) and the eigenvectors (columns) on return;
/// `lam` (k f64) the eigenvalues, unsorted; `info[0]` (i32) the sweeps used. No convergence
/// within `max_sweeps` sets entry 3 of `status` to 2. A nonzero `gate` flag at run time makes
/// it a no-op. No host synchronisation.
#[allow(clippy::too_many_arguments)]
pub fn sym_eig(
    dev: &Device,
    solver: EigenSolver,
    a: &mut Buffer,
    v: &mut Buffer,
    k: usize,
    max_sweeps: usize,
    lam: &mut Buffer,
    info: &mut Buffer,
    status: &mut Status,
    gate: Option<&Buffer>,
) -> Result<()> {
    let solver = solver.resolve(dev, k);
    solver.validate(k)?;
    check_buffer(a, "eig A", k * k, DType::F64)?;
    check_buffer(v, "eig V", k * k, DType::F64)?;
    check_buffer(lam, "eig lambda", k, DType::F64)?;
    check_buffer(info, "eig info", 1, DType::I32)?;
    let ki = fits_i32(k, "K")?;
    let sweeps = fits_i32(max_sweeps, "max_sweeps")?;
    let width = match solver {
        EigenSolver::Blocked { width } => width,
        _ => {
            let threads = match dev.backend() {
                // Real host threads: a barrier costs ~0.1 ms, so keep the block small.
                Backend::Cpu => 32,
                Backend::Cuda if k <= 64 => 64,
                Backend::Cuda if k <= 256 => 256,
                Backend::Cuda => 1024,
            };
            // SAFETY: `a`, `v` hold `K K`, `lam` `K`, `info` 1 (checked above), the status word `LEN`, the gate 1 i32 (`check_gate`); one block, as the kernel requires.
            return unsafe {
                kernels::linalg::jacobi::jacobi_eig_f64(
                    dev,
                    LaunchConfig::new((1, 1, 1), (threads, 1, 1)),
                    a,
                    v,
                    ki,
                    sweeps,
                    lam,
                    info,
                    &mut status.buf,
                    check_gate(gate)?,
                )
            };
        }
    };
    // Block Jacobi: a fixed launch sequence; a device flag ends it early.
    let nb = k.div_ceil(width).max(2);
    let nb = nb + (nb & 1);
    let npairs = nb / 2;
    let n2 = 2 * width;
    let (t_local, t_apply) = match dev.backend() {
        Backend::Cpu => (32, 32),
        Backend::Cuda => (64, 256),
    };
    let mut fl = dev.alloc_zeros(DType::F64, 1)?;
    let mut flags = dev.alloc_zeros(DType::I32, 3)?;
    let mut rot = dev.alloc(DType::F64, npairs * n2 * n2)?;
    let mut act = dev.alloc_zeros(DType::I32, npairs)?;
    let g = check_gate(gate)?;
    // SAFETY: `a` holds `K K` (checked above), `fl` 1, `flags` 3 (allocated here), the gate 1 i32.
    unsafe {
        kernels::linalg::jacobi::bj_init_f64(
            dev,
            LaunchConfig::new((1, 1, 1), (t_apply, 1, 1)),
            a,
            ki,
            &mut fl,
            &mut flags,
            g,
        )
    }?;
    let (wi, nbi) = (fits_i32(width, "width")?, fits_i32(nb, "blocks")?);
    let local_cfg = LaunchConfig {
        shared_bytes: (n2 * n2 * 8) as u32,
        ..LaunchConfig::new((npairs.min(65535) as u32, 1, 1), (t_local, 1, 1))
    };
    let tiles = npairs * npairs + k.div_ceil(n2) * npairs;
    let apply_cfg = LaunchConfig {
        shared_bytes: (2 * n2 * n2 * 8) as u32,
        ..LaunchConfig::new((tiles.min(65535) as u32, 1, 1), (t_apply, 1, 1))
    };
    const MAX_INNER_SWEEPS: i32 = 30;
    for _ in 0..max_sweeps {
        for r in 0..nb - 1 {
            let ri = r as i32;
            // SAFETY: `a` holds `K K` (checked above); `fl`, `rot` (`npairs (2b)^2`), `act` (`npairs`), `flags` (3) were allocated here for this `nb` and width; shared memory is `(2b)^2` doubles.
            unsafe {
                kernels::linalg::jacobi::bj_local_f64(
                    dev,
                    local_cfg,
                    a,
                    ki,
                    wi,
                    ri,
                    nbi,
                    MAX_INNER_SWEEPS,
                    &fl,
                    &mut rot,
                    &mut act,
                    &mut flags,
                    g,
                )
            }?;
            // SAFETY: `a`, `v` hold `K K` (checked above); `rot`, `act`, `flags` as for `bj_local_f64`; shared memory is `2 (2b)^2` doubles.
            unsafe {
                kernels::linalg::jacobi::bj_apply_f64(
                    dev, apply_cfg, a, v, ki, wi, ri, nbi, &rot, &act, &flags, g,
                )
            }?;
        }
        // SAFETY: `flags` holds 3 i32 (allocated here), the gate 1 i32.
        unsafe {
            kernels::linalg::jacobi::bj_sweep_end_i32(
                dev,
                LaunchConfig::new((1, 1, 1), (32, 1, 1)),
                &mut flags,
                g,
            )
        }?;
    }
    // SAFETY: `a` holds `K K`, `lam` `K`, `info` 1 (checked above), `flags` 3, the status word `LEN`.
    unsafe {
        kernels::linalg::jacobi::bj_finish_f64(
            dev,
            grid_stride(dev, k),
            a,
            ki,
            &flags,
            lam,
            info,
            &mut status.buf,
            g,
        )
    }
}

/// `Q^T X Q` (k x k f64) into a new buffer: the matrix `X` in the basis `Q`, how a warm start
/// hands Jacobi a nearly diagonal matrix. Two products, behind `gate` like [`Gemm::run_gated`].
pub fn congruence(
    dev: &Device,
    kernel: GemmKernel,
    gate: Option<&Buffer>,
    x: &Buffer,
    q: &Buffer,
    k: usize,
) -> Result<Buffer> {
    let mut t = dev.alloc(DType::F64, k * k)?;
    Gemm::new(false, false, k, k, k).run_gated(dev, kernel, gate, x, q, &mut t)?;
    let mut a = dev.alloc(DType::F64, k * k)?;
    Gemm::new(true, false, k, k, k).run_gated(dev, kernel, gate, q, &t, &mut a)?;
    Ok(a)
}

/// `v <- I` (k x k f64).
pub fn identity(dev: &Device, v: &mut Buffer, k: usize) -> Result<()> {
    check_buffer(v, "identity", k * k, DType::F64)?;
    // SAFETY: `v` holds `K K` f64 (checked above).
    unsafe {
        kernels::elementwise::ops::identity_f64(dev, grid_stride(dev, k * k), v, fits_i32(k, "K")?)
    }
}

/// The factorisation a polar decomposition needs, in one launch of one block
/// (`jacobi_factor_f64` of `kernels/linalg/jacobi.cu`): cyclic Jacobi on `a` (K x K,
/// destroyed) from the basis `v0` (`None`: the identity) with the rotation test
/// `|a_pq| > tol_rel sqrt(|a_pp a_qq|)`, then, per `gram`, `s = sqrt(lambda)` (`a` a Gram
/// matrix) or `s = lambda` (`a` symmetric), `s_inv = 1/s`, `vs = V diag(1/s)` and
/// `s_max = max |s|`. `v` gets the eigenvectors (columns), `info[0]` the sweeps (0 when a
/// first pass found nothing to rotate). Failures go to entry 3 of `status` (1: singular, 2: no
/// convergence within `max_sweeps`). A nonzero `gate` at run time makes it a no-op.
#[allow(clippy::too_many_arguments)]
pub(crate) fn jacobi_factor(
    dev: &Device,
    a: &mut Buffer,
    v0: Option<&Buffer>,
    k: usize,
    max_sweeps: usize,
    tol_rel: f64,
    gram: bool,
    out: FactorOut<'_>,
    status: &mut Status,
    gate: Option<&Buffer>,
) -> Result<()> {
    if k > MAX_JACOBI_K {
        return Err(Error::InvalidParameter {
            name: "eigensolver",
            reason: format!("the one-block eigensolver takes K <= {MAX_JACOBI_K}, got {k}"),
        });
    }
    check_buffer(a, "eig A", k * k, DType::F64)?;
    if let Some(v0) = v0 {
        check_buffer(v0, "eig V0", k * k, DType::F64)?;
    }
    out.check(k)?;
    let threads = factor_threads(dev, k);
    // A and V in shared memory when they fit beside the sweeps' static arrays.
    let smem = 2 * k * k * 8;
    let in_shared = smem + JACOBI_STATIC_SHARED <= dev.max_shared_bytes();
    let cfg = LaunchConfig {
        shared_bytes: if in_shared { smem as u32 } else { 0 },
        ..LaunchConfig::new((1, 1, 1), (threads, 1, 1))
    };
    // SAFETY: `a`, `v0`, `v`, `vs` hold `K K`, `s`, `s_inv` `K`, `s_max` 1, `info` 2 (checked
    // above), the status word `LEN`, the gate 1 i32 (`check_gate`); one block of a multiple of
    // 32 threads and `K <= 1024`, as the kernel requires; with `in_shared`, `2 K^2` doubles of
    // dynamic shared memory, within what the device takes (checked just above).
    unsafe {
        kernels::linalg::jacobi::jacobi_factor_f64(
            dev,
            cfg,
            a,
            v0,
            out.v,
            fits_i32(k, "K")?,
            fits_i32(max_sweeps, "max_sweeps")?,
            tol_rel,
            i32::from(gram),
            i32::from(in_shared),
            out.s,
            out.s_inv,
            out.vs,
            out.s_max,
            out.info,
            &mut status.buf,
            check_gate(gate)?,
        )
    }
}

/// Static shared memory of the one-block Jacobi (`jacobi_sweeps<512>`'s round arrays, the
/// reductions' scratch), rounded up: what the dynamic `A` and `V` must leave free.
const JACOBI_STATIC_SHARED: usize = 24 * 1024;

/// Threads of the one-block factor kernels.
fn factor_threads(dev: &Device, k: usize) -> u32 {
    match dev.backend() {
        // Real host threads: a barrier costs ~0.1 ms, so keep the block small.
        Backend::Cpu => 32,
        Backend::Cuda if k <= 64 => 64,
        Backend::Cuda if k <= 256 => 256,
        Backend::Cuda => 1024,
    }
}

/// The outputs of [`jacobi_factor`] and [`refine`].
#[derive(Debug)]
pub(crate) struct FactorOut<'a> {
    /// Eigenvectors (K x K, columns).
    pub v: &'a mut Buffer,
    /// `s` (K).
    pub s: &'a mut Buffer,
    /// `1/s` (K).
    pub s_inv: &'a mut Buffer,
    /// `V diag(1/s)` (K x K).
    pub vs: &'a mut Buffer,
    /// `max |s|` (1).
    pub s_max: &'a mut Buffer,
    /// Sweeps used and whether the refinement's fallback ran (2 i32).
    pub info: &'a mut Buffer,
}

impl FactorOut<'_> {
    /// Checks every output's type and length for a `k x k` problem (what the kernels write).
    fn check(&self, k: usize) -> Result<()> {
        check_buffer(self.v, "eig V", k * k, DType::F64)?;
        check_buffer(self.s, "s", k, DType::F64)?;
        check_buffer(self.s_inv, "1/s", k, DType::F64)?;
        check_buffer(self.vs, "V diag(1/s)", k * k, DType::F64)?;
        check_buffer(self.s_max, "max |s|", 1, DType::F64)?;
        check_buffer(self.info, "eig info", 2, DType::I32)
    }
}

/// [`REFINE_ITERATIONS`] Ogita–Aishima iterations (`kernels/linalg/refine.cu`) on the
/// symmetric `a` (K x K) from the identity, then the one-block Jacobi on what they leave
/// (`jacobi_refined_f64`), writing the factor of `a` into `out` (Gram mode:
/// `s = sqrt(lambda)`). The head hands it `a = (G Q0)^T (G Q0)`, the Gram matrix in the
/// previous step's eigenbasis: nearly diagonal, and formed from nearly orthogonal columns, so
/// its small eigenvalues keep their relative accuracy (forming `G^T G` first and rotating it
/// would not). The first iteration (`X = I`) is the correction alone; each later one is four
/// products (`X^T X`, `A X`, `X^T A X`, `X (I + E)`) and the correction; then
/// [`REFINE_NS_STEPS`] Newton–Schulz orthonormalisations (`X^T X`, the correction,
/// `X (3I - X^T X)/2`), `A X`, `X^T A X` and the Jacobi: a fixed sequence of
/// `5 REFINE_ITERATIONS + 3 REFINE_NS_STEPS - 1` launches, no host decision.
/// The Jacobi rotates the pairs of nearly equal eigenvalues that the iterations leave, to
/// [`REFINE_JACOBI_TOL`]. When the basis before the Newton–Schulz steps is not orthonormal
/// to `1e-3` in Frobenius norm (the iterations diverged: a start too far away) it runs on `a`
/// itself from the identity instead, to rounding level: the plain warm solve; `info[1]`
/// records that fallback. Failures go to entry 3 of `status`.
pub(crate) fn refine(
    dev: &Device,
    kernel: GemmKernel,
    a: &mut Buffer,
    k: usize,
    max_sweeps: usize,
    out: FactorOut<'_>,
    status: &mut Status,
) -> Result<()> {
    check_buffer(a, "refine A", k * k, DType::F64)?;
    if k > MAX_JACOBI_K {
        return Err(Error::InvalidParameter {
            name: "eigensolver",
            reason: format!("the refinement's Jacobi takes K <= {MAX_JACOBI_K}, got {k}"),
        });
    }
    out.check(k)?;
    let ki = fits_i32(k, "K")?;
    let mut xs = [dev.alloc(DType::F64, k * k)?, dev.alloc(DType::F64, k * k)?];
    let mut c = dev.alloc(DType::F64, k * k)?;
    let mut ax = dev.alloc(DType::F64, k * k)?;
    let mut sx = dev.alloc(DType::F64, k * k)?;
    let mut f = dev.alloc(DType::F64, k * k)?;
    let square = |ta| Gemm::new(ta, false, k, k, k);
    // First iteration, X = I: C = I and S = A, so X_1 = I + E is the correction itself.
    // SAFETY: `a` and `xs[0]` hold `K K` f64 (checked above, allocated here); grid-stride.
    unsafe {
        kernels::linalg::refine::refine_correction_f64(
            dev,
            grid_stride(dev, k * k),
            None,
            a,
            ki,
            0,
            &mut xs[0],
        )
    }?;
    for it in 1..REFINE_ITERATIONS {
        let [xa, xb] = &mut xs;
        let (x, next) = if it % 2 == 1 { (&*xa, xb) } else { (&*xb, xa) };
        square(true).run(dev, kernel, x, x, &mut c)?;
        square(false).run(dev, kernel, a, x, &mut ax)?;
        square(true).run(dev, kernel, x, &ax, &mut sx)?;
        // SAFETY: `c`, `sx`, `f` hold `K K` f64 (allocated here); grid-stride.
        unsafe {
            kernels::linalg::refine::refine_correction_f64(
                dev,
                grid_stride(dev, k * k),
                Some(&c),
                &sx,
                ki,
                0,
                &mut f,
            )
        }?;
        square(false).run(dev, kernel, x, &f, next)?;
    }
    // Newton–Schulz steps, X <- X (3 I - X^T X) / 2, make the basis orthonormal to rounding
    // level: what the Jacobi's rotations preserve. The first step's `X^T X` stays in `c`
    // for the Jacobi's acceptance test.
    let mut c2 = dev.alloc(DType::F64, k * k)?;
    for step in 0..REFINE_NS_STEPS {
        let [xa, xb] = &mut xs;
        let (x, next) = if (REFINE_ITERATIONS - 1 + step) % 2 == 0 {
            (&*xa, xb)
        } else {
            (&*xb, xa)
        };
        let cs = if step == 0 { &mut c } else { &mut c2 };
        square(true).run(dev, kernel, x, x, cs)?;
        // SAFETY: `cs`, `f` hold `K K` f64 (allocated here); `orth_only` reads only `cs`.
        unsafe {
            kernels::linalg::refine::refine_correction_f64(
                dev,
                grid_stride(dev, k * k),
                Some(cs),
                cs,
                ki,
                1,
                &mut f,
            )
        }?;
        square(false).run(dev, kernel, x, &f, next)?;
    }
    let x = &xs[(REFINE_ITERATIONS - 1 + REFINE_NS_STEPS) % 2];
    square(false).run(dev, kernel, a, x, &mut ax)?;
    square(true).run(dev, kernel, x, &ax, &mut sx)?;
    // SAFETY: `sx`, `x`, `c`, `a`, `out.v`, `out.vs` hold `K K`, `out.s`, `out.s_inv`
    // `K`, `out.s_max` 1, `out.info` 2 (allocated here or checked above), the status word
    // `LEN`; one block of a multiple of 32 threads and `K <= 1024`.
    unsafe {
        kernels::linalg::jacobi::jacobi_refined_f64(
            dev,
            LaunchConfig::new((1, 1, 1), (factor_threads(dev, k), 1, 1)),
            &mut sx,
            x,
            &c,
            a,
            None,
            out.v,
            ki,
            fits_i32(max_sweeps, "max_sweeps")?,
            REFINE_JACOBI_TOL,
            out.s,
            out.s_inv,
            out.vs,
            out.s_max,
            out.info,
            &mut status.buf,
        )
    }
}
