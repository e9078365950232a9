//! Dense float64 kernels over `faer` that allocate nothing: matrix products split over
//! rayon's threads, the lower triangle of a Gram matrix, and a symmetric eigendecomposition
//! with its scratch memory held by the caller. The CPU head's steady-state step is made of
//! these (`docs/performance.md`).
//!
//! Why not faer's own parallel products: with `Par::Rayon` they allocate their task
//! bookkeeping on every call (about ten allocations per product, and hundreds per
//! parallel eigendecomposition). Here a product is cut into column panels, each panel is
//! a sequential faer product (no allocation), and the panels run on rayon's pool through
//! `rayon::join`, whose jobs live on the stack.

use faer::dyn_stack::{MemBuffer, MemStack};
use faer::linalg::evd::{
    self_adjoint_evd, self_adjoint_evd_scratch, ComputeEigenvectors, SelfAdjointEvdParams,
};
use faer::linalg::matmul::matmul;
use faer::linalg::matmul::triangular::{matmul as tri_matmul, BlockStructure};
use faer::reborrow::ReborrowMut;
use faer::{Accum, MatMut, MatRef, Par};

use crate::error::{Error, Result};

/// Products below this many multiply-adds run on one thread: spreading them costs more than
/// it saves (measured with `benches/cpu.rs`).
pub const PAR_MIN_WORK: usize = 1 << 21;

thread_local! {
    /// Whether this thread has run [`warm_this_thread`].
    static WARM: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs one large `f32` and one large `f64` product on this thread (once per thread): faer's
/// x86 GEMM keeps a per-thread packing buffer (twice the L3 size, 64 MiB here) that it
/// allocates on the thread's first large product.
fn warm_this_thread() {
    WARM.with(|w| {
        if w.get() {
            return;
        }
        w.set(true);
        const S: usize = 256;
        let a = faer::Mat::<f64>::zeros(S, S);
        let mut c = faer::Mat::<f64>::zeros(S, S);
        matmul(
            c.as_mut(),
            Accum::Replace,
            a.as_ref(),
            a.as_ref(),
            1.0,
            Par::Seq,
        );
        let a = faer::Mat::<f32>::zeros(S, S);
        let mut c = faer::Mat::<f32>::zeros(S, S);
        matmul(
            c.as_mut(),
            Accum::Replace,
            a.as_ref(),
            a.as_ref(),
            1.0,
            Par::Seq,
        );
    });
}

/// Makes the per-thread memory of the products ahead of time, on the calling thread and, when
/// products of `work` multiply-adds are split over threads, on every thread of the current
/// rayon pool, so that a later step allocates nothing whichever thread runs which panel.
/// Called when step memory is made (`Solver::new`, the CPU head's first forward); a thread
/// already warmed costs a flag test.
pub fn warm_threads(work: usize) {
    warm_this_thread();
    if panels(work, usize::MAX) > 1 {
        rayon::broadcast(|_| warm_this_thread());
    }
}

/// How many panels a product of `work` multiply-adds over `cols` output columns is cut into.
fn panels(work: usize, cols: usize) -> usize {
    if work < PAR_MIN_WORK {
        return 1;
    }
    let threads = match faer::get_global_parallelism() {
        Par::Seq => 1,
        Par::Rayon(n) => n.get(),
    };
    threads.min(cols / 8).max(1)
}

/// Runs `f(i)` for `i` in `lo..hi` on rayon's pool (recursive `join`, no allocation).
fn for_each_panel<F: Fn(usize) + Sync>(lo: usize, hi: usize, f: &F) {
    match hi - lo {
        0 => {}
        1 => f(lo),
        n => {
            let mid = lo + n / 2;
            rayon::join(|| for_each_panel(lo, mid, f), || for_each_panel(mid, hi, f));
        }
    }
}

/// A raw view of a destination matrix that panels write disjoint columns of.
struct SendMut<T> {
    ptr: *mut T,
    nrows: usize,
    ncols: usize,
    row_stride: isize,
    col_stride: isize,
}
// SAFETY: the pointer is only turned back into views of pairwise disjoint column ranges,
// each used by one thread, while the original `MatMut` borrow is held by the caller.
unsafe impl<T> Send for SendMut<T> {}
// SAFETY: as above; shared references only copy the pointer.
unsafe impl<T> Sync for SendMut<T> {}

impl<T> Clone for SendMut<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for SendMut<T> {}

impl<T> SendMut<T> {
    fn new(m: MatMut<'_, T>) -> SendMut<T> {
        SendMut {
            nrows: m.nrows(),
            ncols: m.ncols(),
            row_stride: m.row_stride(),
            col_stride: m.col_stride(),
            ptr: m.as_ptr_mut(),
        }
    }

    /// Columns `c0..c1`.
    ///
    /// # Safety
    /// Callers use disjoint column ranges concurrently and none outlives the borrow `new`
    /// was made from.
    unsafe fn cols<'a>(self, c0: usize, c1: usize) -> MatMut<'a, T> {
        debug_assert!(c0 <= c1 && c1 <= self.ncols);
        // SAFETY: in bounds (c0 <= c1 <= ncols, strides from a valid view); disjointness and
        // lifetime are the caller's contract.
        unsafe {
            MatMut::from_raw_parts_mut(
                self.ptr.offset(c0 as isize * self.col_stride),
                self.nrows,
                c1 - c0,
                self.row_stride,
                self.col_stride,
            )
        }
    }
}

/// Column boundary of panel `i` of `n` over `cols` columns.
fn cut(i: usize, n: usize, cols: usize) -> usize {
    cols * i / n
}

/// `dst (accum) alpha a b`, the columns of `dst` cut over rayon's threads when the product
/// is large. Shapes must agree (checked by faer).
pub fn gemm(
    dst: MatMut<'_, f64>,
    accum: Accum,
    a: MatRef<'_, f64>,
    b: MatRef<'_, f64>,
    alpha: f64,
) {
    gemm_cols(dst, accum, a, b, alpha);
}

/// [`gemm`] for a generic element type (the head's `f32`/`f64` storage products), cut into
/// row panels: the head's storage matrices are row-major views, so the product is taken as
/// `dst^T = b^T a^T` with column panels of `dst^T`.
pub fn gemm_t<T: faer::traits::ComplexField + Copy + Send + Sync>(
    dst: MatMut<'_, T>,
    accum: Accum,
    a: MatRef<'_, T>,
    b: MatRef<'_, T>,
    alpha: T,
) {
    gemm_cols(
        dst.transpose_mut(),
        accum,
        b.transpose(),
        a.transpose(),
        alpha,
    );
}

/// The one panel loop: on one thread below [`PAR_MIN_WORK`] multiply-adds, else the columns
/// of `dst` cut into one panel per thread, each a sequential faer product.
fn gemm_cols<T: faer::traits::ComplexField + Copy + Send + Sync>(
    dst: MatMut<'_, T>,
    accum: Accum,
    a: MatRef<'_, T>,
    b: MatRef<'_, T>,
    alpha: T,
) {
    let (m, n, k) = (dst.nrows(), dst.ncols(), a.ncols());
    assert!(
        a.nrows() == m && b.nrows() == k && b.ncols() == n,
        "gemm shapes"
    );
    let np = panels(m.saturating_mul(n).saturating_mul(k), n);
    if np == 1 {
        matmul(dst, accum, a, b, alpha, Par::Seq);
        return;
    }
    let out = SendMut::new(dst);
    for_each_panel(0, np, &|i| {
        let (c0, c1) = (cut(i, np, n), cut(i + 1, np, n));
        // SAFETY: panels cover disjoint column ranges; `dst` stays borrowed until we return.
        let d = unsafe { out.cols(c0, c1) };
        matmul(d, accum, a, b.subcols(c0, c1 - c0), alpha, Par::Seq);
    });
}

/// The lower triangle of `a^T a` (`K x K` from `a`: `d x K`) into `dst`; the strictly upper
/// triangle is left as it was. Half the work of a full product; the columns are cut into
/// panels of equal triangular area.
pub fn gram_lower(dst: MatMut<'_, f64>, a: MatRef<'_, f64>) {
    let (d, k) = (a.nrows(), a.ncols());
    assert!(dst.nrows() == k && dst.ncols() == k, "gram shapes");
    let np = panels(d.saturating_mul(k).saturating_mul(k) / 2, k);
    let out = SendMut::new(dst);
    // Panel i holds columns c0..c1: the triangle dst[c0..c1, c0..c1] and the rectangle
    // dst[c1.., c0..c1]. Equal areas: c_i = K (1 - sqrt(1 - i/n)).
    let bound = |i: usize| -> usize {
        if i >= np {
            return k;
        }
        let f = 1.0 - (1.0 - i as f64 / np as f64).sqrt();
        ((k as f64 * f).round() as usize).min(k)
    };
    let body = |i: usize| {
        let (c0, c1) = (bound(i), bound(i + 1));
        if c1 == c0 {
            return;
        }
        // SAFETY: panels cover disjoint column ranges; `dst` stays borrowed until we return.
        let cols = unsafe { out.cols(c0, c1) };
        let (_, below) = cols.split_at_row_mut(c0);
        let (tri, rect) = below.split_at_row_mut(c1 - c0);
        let ac = a.subcols(c0, c1 - c0);
        tri_matmul(
            tri,
            BlockStructure::TriangularLower,
            Accum::Replace,
            ac.transpose(),
            BlockStructure::Rectangular,
            ac,
            BlockStructure::Rectangular,
            1.0,
            Par::Seq,
        );
        if c1 < k {
            matmul(
                rect,
                Accum::Replace,
                a.subcols(c1, k - c1).transpose(),
                ac,
                1.0,
                Par::Seq,
            );
        }
    };
    if np == 1 {
        body(0);
    } else {
        for_each_panel(0, np, &body);
    }
}

/// Copies the lower triangle of a square matrix onto its upper triangle.
pub fn mirror_lower(mut a: MatMut<'_, f64>) {
    let k = a.nrows();
    for j in 0..k {
        for i in 0..j {
            let v = a[(j, i)];
            a[(i, j)] = v;
        }
    }
}

/// A symmetric eigensolver with its scratch memory: `A = Q diag(lambda) Q^T`, eigenvalues
/// ascending, reading the lower triangle of `A` only.
///
/// It runs faer's tridiagonal QR algorithm, not its divide and conquer: on the clustered
/// spectra the head produces (many classes with nearly equal singular values) divide and
/// conquer left residuals `||A Q - Q Lambda|| / ||A||` of `7.5e-12` at `K = 1000`, the QR
/// algorithm `1e-14`, at a similar cost (measured in `docs/performance.md`). It runs on one
/// thread: faer's parallel tridiagonalisation allocates and was no faster on 2 cores.
pub struct SymEig {
    k: usize,
    mem: MemBuffer,
    params: SelfAdjointEvdParams,
    diag: faer::diag::Diag<f64>,
}

impl std::fmt::Debug for SymEig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SymEig").field("k", &self.k).finish()
    }
}

impl Clone for SymEig {
    fn clone(&self) -> Self {
        SymEig::new(self.k)
    }
}

impl SymEig {
    /// Scratch for `k x k` problems.
    pub fn new(k: usize) -> SymEig {
        let mut params: SelfAdjointEvdParams = faer::Auto::<f64>::auto();
        params.recursion_threshold = usize::MAX;
        let req =
            self_adjoint_evd_scratch::<f64>(k, ComputeEigenvectors::Yes, Par::Seq, params.into());
        SymEig {
            k,
            mem: MemBuffer::new(req),
            params,
            diag: faer::diag::Diag::zeros(k),
        }
    }

    /// Eigendecomposition of the symmetric `a` (lower triangle read) into `q` and `lambda`.
    pub fn run(
        &mut self,
        a: MatRef<'_, f64>,
        q: MatMut<'_, f64>,
        lambda: &mut [f64],
    ) -> Result<()> {
        let k = self.k;
        assert!(
            a.nrows() == k
                && a.ncols() == k
                && q.nrows() == k
                && q.ncols() == k
                && lambda.len() == k
        );
        self_adjoint_evd(
            a,
            self.diag.as_mut(),
            Some(q),
            Par::Seq,
            MemStack::new(&mut self.mem),
            self.params.into(),
        )
        .map_err(|_| Error::Numerical {
            what: "symmetric eigendecomposition did not converge",
        })?;
        for (i, l) in lambda.iter_mut().enumerate() {
            *l = self.diag[i];
        }
        Ok(())
    }
}

/// Row means of a `d x K` matrix into `out` (`d`), reading columns contiguously.
pub fn row_means(a: MatRef<'_, f64>, out: &mut [f64]) {
    let k = a.ncols();
    out.iter_mut().for_each(|v| *v = 0.0);
    for j in 0..k {
        let col = a.col(j);
        for (o, v) in out.iter_mut().zip(col.iter()) {
            *o += *v;
        }
    }
    let inv = 1.0 / k as f64;
    out.iter_mut().for_each(|v| *v *= inv);
}

/// `out = scale (a - row means of a) (+ extra_scale extra)`, all `d x K`; `means` is scratch
/// of length `d`.
pub fn center_scale_into(
    a: MatRef<'_, f64>,
    scale: f64,
    extra: Option<(f64, MatRef<'_, f64>)>,
    means: &mut [f64],
    mut out: MatMut<'_, f64>,
) {
    row_means(a, means);
    for j in 0..a.ncols() {
        let (src, mut dst) = (a.col(j), out.rb_mut().col_mut(j));
        match extra {
            Some((e, x)) => {
                let xc = x.col(j);
                for i in 0..a.nrows() {
                    dst[i] = scale * (src[i] - means[i]) + e * xc[i];
                }
            }
            None => {
                for i in 0..a.nrows() {
                    dst[i] = scale * (src[i] - means[i]);
                }
            }
        }
    }
}
