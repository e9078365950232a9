//! Dense products through cuBLAS, loaded at run time like the driver.
//!
//! [`Device::blas_gemm`] runs one row-major product `C = alpha op(A) op(B) + beta C` with
//! `cublasDgemm` (f64) or `cublasSgemm` (f32) on the device's stream, and returns `false`
//! without doing anything where cuBLAS is not available (the CPU execution, a build without
//! the `cuda` feature, or no loadable libcublas), so that the caller launches its own product
//! kernel instead:
//!
//! ```text
//! if !dev.blas_gemm(ta, tb, m, n, l, alpha, &a, &b, beta, &mut c)? {
//!     // the crate's own kernel (`gpu::linalg::Gemm`)
//! }
//! ```
//!
//! **The handle.** A CUDA device sets cuBLAS up on its first use ([`Device::blas_name`],
//! [`Device::blas_gemm`], or [`Device::name`]): it probes libcublas with the names cudarc
//! loads (a missing library, or a handle that cannot be created, makes cuBLAS unavailable for
//! the device's lifetime, never an error), creates one handle bound to the device's stream,
//! sets its math mode to `CUBLAS_DEFAULT_MATH` explicitly (so `Sgemm` computes in f32 and never
//! in TF32, whose 10-bit mantissa the head's gradient tolerances do not allow; `Dgemm` keeps
//! cuBLAS's defaults, FP64 tensor cores on Hopper, which are IEEE f64), and gives it a preset
//! workspace of [`BLAS_WORKSPACE_BYTES`].
//!
//! **Why a preset workspace.** Without one cuBLAS takes its scratch memory itself: before CUDA
//! 12.2 a new workspace for every captured graph (device memory that grows with each capture),
//! since then stream-ordered allocations that a capture records into the graph. With it, a
//! product allocates nothing: it is captured by the stream capture like a kernel launch (see
//! [`super::graph`]), and a [`Graph`](super::Graph) that contains it keeps the workspace alive
//! with the product's buffers. The workspace is one allocation of this device (counted by
//! [`Device::memory_stats`], its zero fill by [`Device::stream_ops`]), made when the handle is
//! created, which is therefore refused during a capture: use cuBLAS once (or call
//! [`Device::blas_name`]) before capturing.

#[cfg(feature = "cuda")]
use super::foreign;
#[cfg(feature = "cuda")]
use super::memory::{BufInner, Mem};
use super::{Buffer, DType, Device};
use crate::error::{Error, Result};
use std::sync::Arc;

/// Bytes of the workspace a CUDA device gives cuBLAS (one allocation per device, made with the
/// handle): 32 MiB, the size cuBLAS itself uses on Hopper (4 MiB on older GPUs), so that no
/// product is slowed down by a smaller one.
pub const BLAS_WORKSPACE_BYTES: usize = 32 << 20;

/// A device's cuBLAS state: empty until the first use; then the handle, or nothing when cuBLAS
/// is not available.
#[derive(Default)]
pub(super) struct BlasState {
    #[cfg(feature = "cuda")]
    handle: std::sync::OnceLock<Option<Cublas>>,
    /// Held while the handle is created (one creation per device).
    #[cfg(feature = "cuda")]
    init: std::sync::Mutex<()>,
}

impl std::fmt::Debug for BlasState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        #[cfg(feature = "cuda")]
        if let Some(state) = self.handle.get() {
            return match state {
                Some(c) => write!(f, "BlasState({})", c.name),
                None => write!(f, "BlasState(unavailable)"),
            };
        }
        write!(f, "BlasState(not set up)")
    }
}

/// A cuBLAS handle on a device's stream, with its workspace.
#[cfg(feature = "cuda")]
struct Cublas {
    /// Dropped first (fields drop in declaration order): the handle goes before its workspace.
    blas: cudarc::cublas::CudaBlas,
    /// The preset workspace (an allocation of the device; kept by every graph that captures a
    /// product).
    workspace: Arc<Mem>,
    /// "cuBLAS 13.0".
    name: String,
}

/// The cuBLAS library's names (Linux, Windows: `cublas64_13.dll`).
#[cfg(feature = "cuda")]
const CUBLAS: &[&str] = &["cublas"];

impl Device {
    /// The BLAS library this device's products go through, e.g. `Some("cuBLAS 13.0")`; `None`
    /// on the CPU execution, in a build without the `cuda` feature, when libcublas cannot be
    /// loaded or its handle cannot be made (then [`blas_gemm`](Self::blas_gemm) returns
    /// `false` and products run on the crate's own kernels). On a CUDA device the first call
    /// sets cuBLAS up (loads the library, creates the handle and its workspace of
    /// [`BLAS_WORKSPACE_BYTES`]; see [`blas`](super::blas)); during a capture, before that first
    /// use, it cannot and answers `None`.
    ///
    /// ```
    /// use implicit_etf::runtime::Device;
    /// assert_eq!(Device::cpu().blas_name(), None);
    /// if let Ok(dev) = Device::cuda(0) {
    ///     println!("{}", dev.name()); // e.g. "NVIDIA H200 (sm_90) + cuBLAS 13.0"
    /// }
    /// ```
    pub fn blas_name(&self) -> Option<&str> {
        #[cfg(feature = "cuda")]
        return self.cublas().ok().flatten().map(|c| c.name.as_str());
        #[cfg(not(feature = "cuda"))]
        None
    }

    /// `C = alpha op(A) op(B) + beta C` through cuBLAS, row-major like the crate's own product
    /// kernels: `op(A)` is `m x l` (A stored `m x l`, or `l x m` when `ta`), `op(B)` is `l x n`
    /// (B stored `l x n`, or `n x l` when `tb`), C is `m x n`; `beta = 0` overwrites C without
    /// reading it (NaNs in C do not propagate). All three buffers are f64 (`cublasDgemm`) or
    /// all f32 (`cublasSgemm`, never in TF32; `alpha` and `beta` rounded to f32).
    ///
    /// Returns `Ok(true)` once the product is queued on the device's stream (asynchronous like
    /// a launch; during a capture it is recorded by the stream capture instead, and the graph
    /// keeps the three buffers and cuBLAS's workspace alive). Returns `Ok(false)`, having done
    /// nothing, where cuBLAS is not available ([`blas_name`](Self::blas_name) is `None`: always
    /// on the CPU execution) or a dimension is above `i32::MAX` (cuBLAS's 32-bit interface):
    /// the caller then runs its own kernel. A queued product counts as one stream operation
    /// ([`stream_ops`](Self::stream_ops); traced as `cublasDgemm m x n x l`).
    ///
    /// Safe: every size a product touches is checked first, on every backend, so a call that
    /// returns `false` on the CPU execution reports the same argument errors as on a GPU:
    /// - [`Error::Device`]: a buffer that is not f32 or f64, buffers of different types, a
    ///   buffer of another device, or `c` sharing its memory with `a` or `b`;
    /// - [`Error::ShapeMismatch`]: a buffer with fewer elements than the product reads or
    ///   writes (`m l` for A, `l n` for B, `m n` for C; longer buffers are fine, their tail is
    ///   not touched);
    /// - [`Error::SizeOverflow`]: `m l`, `l n` or `m n` overflows;
    /// - [`Error::Capture`]: a capture in progress on another thread, or, on a GPU, the first
    ///   use of cuBLAS on this device during a capture (setting it up allocates);
    /// - [`Error::Device`] also for a cuBLAS status other than success.
    ///
    /// ```
    /// use implicit_etf::gpu::linalg::{Gemm, GemmKernel};
    /// use implicit_etf::runtime::{DType, Device};
    ///
    /// let dev = Device::cuda(0).unwrap_or_else(|_| Device::cpu());
    /// let a = dev.upload(&[1.0f64, 2.0, 3.0, 4.0, 5.0, 6.0]).unwrap(); // 2 x 3
    /// let b = dev.upload(&[1.0f64, 0.0, 0.0, 1.0, 1.0, 1.0]).unwrap(); // 3 x 2
    /// let mut c = dev.alloc_zeros(DType::F64, 4).unwrap(); // 2 x 2
    /// if !dev.blas_gemm(false, false, 2, 2, 3, 1.0, &a, &b, 0.0, &mut c).unwrap() {
    ///     // No cuBLAS (always so on the CPU execution): the crate's own kernel.
    ///     Gemm::new(false, false, 2, 2, 3).run(&dev, GemmKernel::Auto, &a, &b, &mut c).unwrap();
    /// }
    /// assert_eq!(dev.download::<f64>(&c).unwrap(), [4.0, 5.0, 10.0, 11.0]);
    /// ```
    #[allow(clippy::too_many_arguments)]
    pub fn blas_gemm(
        &self,
        ta: bool,
        tb: bool,
        m: usize,
        n: usize,
        l: usize,
        alpha: f64,
        a: &Buffer,
        b: &Buffer,
        beta: f64,
        c: &mut Buffer,
    ) -> Result<bool> {
        check_gemm(self, m, n, l, a, b, c)?;
        #[cfg(feature = "cuda")]
        return self.cublas_gemm(ta, tb, m, n, l, alpha, a, b, beta, c);
        #[cfg(not(feature = "cuda"))]
        {
            let _ = (ta, tb, alpha, beta);
            Ok(false)
        }
    }

    /// This CUDA device's cuBLAS handle, set up on the first call (see the module
    /// documentation); `Ok(None)` on the CPU execution or when cuBLAS is not available. An
    /// error only when the handle cannot be set up *now* (a capture in progress), which is
    /// not remembered.
    #[cfg(feature = "cuda")]
    fn cublas(&self) -> Result<Option<&Cublas>> {
        let super::DevInner::Cuda(cd) = &self.inner else {
            return Ok(None);
        };
        if let Some(state) = self.blas.handle.get() {
            return Ok(state.as_ref());
        }
        let _init = super::lock(&self.blas.init);
        if let Some(state) = self.blas.handle.get() {
            return Ok(state.as_ref());
        }
        self.refuse_in_capture("set up cuBLAS (its first use on this device)")?;
        let made = self.make_cublas(cd.stream())?;
        Ok(self.blas.handle.get_or_init(|| made).as_ref())
    }

    /// A cuBLAS handle on `stream` with its workspace and math mode; `Ok(None)` when cuBLAS is
    /// not available. Errors only for a capture begun meanwhile (nothing is remembered then).
    #[cfg(feature = "cuda")]
    fn make_cublas(&self, stream: &Arc<cudarc::driver::CudaStream>) -> Result<Option<Cublas>> {
        use cudarc::cublas::sys;
        if !super::cuda::lib_present(CUBLAS) {
            return Ok(None);
        }
        // cudarc panics on a missing symbol (a libcublas older than the API it binds): that
        // is "not available" here too.
        let made = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            cudarc::cublas::CudaBlas::new(stream.clone())
        }));
        let Ok(Ok(blas)) = made else {
            return Ok(None);
        };
        let workspace = match self.fresh(BLAS_WORKSPACE_BYTES) {
            Ok(w) => w,
            Err(e @ Error::Capture { .. }) => return Err(e),
            Err(_) => return Ok(None),
        };
        let BufInner::Cuda(ws) = &workspace.buf else {
            return Ok(None);
        };
        let handle = *blas.handle();
        let set_up = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            super::cuda::with_ptrs(stream, &[(ws, true)], |p| {
                let ptr = p[0];
                // SAFETY: `handle` is the live handle just created (its context is current on
                // this thread: `CudaBlas::new` bound it); `ptr` addresses a live allocation of
                // BLAS_WORKSPACE_BYTES bytes of this context, aligned to at least 256 bytes (a
                // driver allocation), which `Cublas` keeps alive for as long as the handle (its
                // `blas` field drops first). The stream was set before (cublasSetStream resets the
                // workspace, so it is never called again).
                let ws_status = unsafe {
                    sys::cublasSetWorkspace_v2(
                        handle,
                        ptr as *mut std::ffi::c_void,
                        BLAS_WORKSPACE_BYTES,
                    )
                };
                // SAFETY: `handle` is live; the mode is a valid enumerator.
                let math = unsafe {
                    sys::cublasSetMathMode(handle, sys::cublasMath_t::CUBLAS_DEFAULT_MATH)
                };
                let mut version: std::ffi::c_int = 0;
                // SAFETY: `handle` is live; `version` is a valid place for one int.
                let ver = unsafe { sys::cublasGetVersion_v2(handle, &mut version) };
                (ws_status.result().and(math.result()).and(ver.result())).map(|()| version)
            })
        }));
        let Ok(Ok(version)) = set_up else {
            return Ok(None);
        };
        // CUBLAS_VERSION is major * 10000 + minor * 100 + patch.
        let name = format!("cuBLAS {}.{}", version / 10000, version / 100 % 100);
        Ok(Some(Cublas {
            blas,
            workspace,
            name,
        }))
    }

    /// The cuBLAS half of [`blas_gemm`](Self::blas_gemm), after its checks.
    #[cfg(feature = "cuda")]
    #[allow(clippy::too_many_arguments)]
    fn cublas_gemm(
        &self,
        ta: bool,
        tb: bool,
        m: usize,
        n: usize,
        l: usize,
        alpha: f64,
        a: &Buffer,
        b: &Buffer,
        beta: f64,
        c: &mut Buffer,
    ) -> Result<bool> {
        use cudarc::cublas::sys;
        let Some(blas) = self.cublas()? else {
            return Ok(false);
        };
        let super::DevInner::Cuda(cd) = &self.inner else {
            return Ok(false);
        };
        let int = |x: usize| std::ffi::c_int::try_from(x).ok();
        let (Some(mi), Some(ni), Some(li)) = (int(m), int(n), int(l)) else {
            return Ok(false);
        };
        let (BufInner::Cuda(ab), BufInner::Cuda(bb), BufInner::Cuda(cb)) =
            (&a.mem.buf, &b.mem.buf, &c.mem.buf)
        else {
            return Err(foreign("blas_gemm"));
        };
        // Row-major C (m x n) is column-major C^T (n x m, leading dimension n), so cuBLAS
        // computes C^T = op(B)^T op(A)^T: its first operand is B, its second A. Row-major B
        // (l x n) is column-major B^T (n x l, ld n), already op(B)^T: no transpose; stored
        // n x l (tb) it is column-major op(B) (l x n, ld l): transpose. Likewise for A with m.
        // Leading dimensions are at least 1, as cuBLAS requires even for empty matrices.
        let ld = |x: std::ffi::c_int| x.max(1);
        let op = |t: bool| {
            if t {
                sys::cublasOperation_t::CUBLAS_OP_T
            } else {
                sys::cublasOperation_t::CUBLAS_OP_N
            }
        };
        let (op_b, ld_b) = (op(tb), ld(if tb { li } else { ni }));
        let (op_a, ld_a) = (op(ta), ld(if ta { mi } else { li }));
        let ld_c = ld(ni);
        let handle = *blas.blas.handle();
        let stream = cd.stream();
        // Held until the product is queued: a capture begun meanwhile on another thread must
        // not pick it up (and products of several threads do not interleave on the handle).
        let mut capture = self.recording()?;
        if let Some(rec) = capture.as_mut() {
            rec.keep(&a.mem);
            rec.keep(&b.mem);
            rec.keep(&c.mem);
            rec.keep(&blas.workspace);
        }
        stream
            .context()
            .bind_to_thread()
            .map_err(|e| Error::Device {
                op: "blas_gemm: bind context".into(),
                message: e.to_string(),
                source: Some(crate::error::DeviceSource::new(e)),
            })?;
        // `C` through cudarc's write path, the inputs through the read path (`with_ptrs`).
        let (name, status) =
            super::cuda::with_ptrs(stream, &[(ab, false), (bb, false), (cb, true)], |p| {
                let (pa, pb, pc) = (p[0], p[1], p[2]);
                match c.dtype {
                    DType::F64 => (
                        "cublasDgemm",
                        // SAFETY: `handle` is this device's live handle on `stream`, whose context is
                        // current. In cuBLAS's column-major terms: its A is our B, read as op_b of an
                        // (n x l) matrix with ld_b, which `check_gemm` made sure is inside B's `l n`
                        // f64 elements; its B is our A (`m l` elements, ld_a), its C ours (`m n`
                        // elements, ld_c = n), written only there; C shares memory with neither input
                        // (checked). The scalars are host values (the default host pointer mode),
                        // read before the call returns. The buffers stay alive until the product has
                        // run: their memory is freed stream-ordered on this stream, and a capture keeps
                        // them (above).
                        unsafe {
                            sys::cublasDgemm_v2(
                                handle,
                                op_b,
                                op_a,
                                ni,
                                mi,
                                li,
                                &alpha,
                                pb as *const f64,
                                ld_b,
                                pa as *const f64,
                                ld_a,
                                &beta,
                                pc as *mut f64,
                                ld_c,
                            )
                        },
                    ),
                    _ => {
                        let (alpha, beta) = (alpha as f32, beta as f32);
                        (
                            "cublasSgemm",
                            // SAFETY: as for Dgemm above, with f32 elements (`check_gemm` made sure all
                            // three buffers are f32 here).
                            unsafe {
                                sys::cublasSgemm_v2(
                                    handle,
                                    op_b,
                                    op_a,
                                    ni,
                                    mi,
                                    li,
                                    &alpha,
                                    pb as *const f32,
                                    ld_b,
                                    pa as *const f32,
                                    ld_a,
                                    &beta,
                                    pc as *mut f32,
                                    ld_c,
                                )
                            },
                        )
                    }
                }
            });
        status.result().map_err(|e| Error::Device {
            op: format!("{name} {m} x {n} x {l}"),
            message: e.to_string(),
            source: Some(crate::error::DeviceSource::new(e)),
        })?;
        self.counters.op(|| format!("{name} {m} x {n} x {l}"));
        Ok(true)
    }
}

/// The checks of [`Device::blas_gemm`], on every backend: element types, lengths, ownership,
/// and that C shares memory with neither input.
fn check_gemm(
    dev: &Device,
    m: usize,
    n: usize,
    l: usize,
    a: &Buffer,
    b: &Buffer,
    c: &Buffer,
) -> Result<()> {
    let bad = |message: String| Error::Device {
        op: "blas_gemm".into(),
        message,
        source: None,
    };
    if !matches!(c.dtype, DType::F32 | DType::F64) {
        return Err(bad(format!(
            "products are f32 or f64, C is a {:?} buffer",
            c.dtype
        )));
    }
    if a.dtype != c.dtype || b.dtype != c.dtype {
        return Err(bad(format!(
            "A, B and C must have one element type, got {:?}, {:?}, {:?}",
            a.dtype, b.dtype, c.dtype
        )));
    }
    for buf in [a, b, c] {
        dev.own(&buf.mem, "blas_gemm")?;
    }
    if Arc::ptr_eq(&c.mem, &a.mem) || Arc::ptr_eq(&c.mem, &b.mem) {
        return Err(bad("C shares its memory with A or B".into()));
    }
    let need = |buf: &Buffer, r: usize, k: usize, what: &'static str| -> Result<()> {
        let want = r.checked_mul(k).ok_or(Error::SizeOverflow { what })?;
        if buf.len < want {
            return Err(Error::ShapeMismatch {
                what,
                expected: want,
                got: buf.len,
            });
        }
        Ok(())
    };
    need(a, m, l, "blas_gemm A (at least m * l elements)")?;
    need(b, l, n, "blas_gemm B (at least l * n elements)")?;
    need(c, m, n, "blas_gemm C (at least m * n elements)")
}

#[cfg(test)]
mod tests {
    use super::super::{DType, Device};
    use crate::error::Error;

    /// [`Device::all_available`], saying why the CUDA part is skipped (as
    /// `tests/common/devices.rs`, which an inline module cannot include by path).
    fn devices() -> Vec<Device> {
        let (devs, skipped) = Device::all_available();
        if let Some(reason) = &skipped {
            println!("CUDA part skipped: {reason}");
        }
        assert!(!devs.is_empty(), "no device to test on: {skipped:?}");
        devs
    }

    /// Row-major `alpha op(A) op(B) + beta C` in f64, with the bound `alpha sum |a||b| + |beta
    /// c|` of each element (for a rounding tolerance).
    #[allow(clippy::too_many_arguments)]
    fn reference(
        ta: bool,
        tb: bool,
        m: usize,
        n: usize,
        l: usize,
        alpha: f64,
        a: &[f64],
        b: &[f64],
        beta: f64,
        c: &[f64],
    ) -> (Vec<f64>, Vec<f64>) {
        let at = |i: usize, k: usize| if ta { a[k * m + i] } else { a[i * l + k] };
        let bt = |k: usize, j: usize| if tb { b[j * l + k] } else { b[k * n + j] };
        let mut out = vec![0.0; m * n];
        let mut bound = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                let (mut s, mut s_abs) = (0.0, 0.0);
                for k in 0..l {
                    s += at(i, k) * bt(k, j);
                    s_abs += (at(i, k) * bt(k, j)).abs();
                }
                let old = if beta == 0.0 {
                    0.0
                } else {
                    beta * c[i * n + j]
                };
                out[i * n + j] = alpha * s + old;
                bound[i * n + j] = alpha.abs() * s_abs + old.abs();
            }
        }
        (out, bound)
    }

    /// Deterministic values in [-1, 1).
    fn values(len: usize, seed: u64) -> Vec<f64> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 11) as f64 / (1u64 << 52) as f64 - 1.0
            })
            .collect()
    }

    #[test]
    fn runtime_blas_cpu_execution_has_none() {
        let dev = Device::cpu();
        assert_eq!(dev.blas_name(), None);
        assert_eq!(dev.name(), "CPU execution".to_string() + asan_suffix());
        for dt in [DType::F32, DType::F64] {
            let a = dev.alloc_zeros(dt, 6).unwrap();
            let b = dev.alloc_zeros(dt, 6).unwrap();
            let mut c = dev.alloc_zeros(dt, 4).unwrap();
            let before = (dev.stream_ops(), dev.memory_stats());
            for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                let done = dev.blas_gemm(ta, tb, 2, 2, 3, 1.0, &a, &b, 0.0, &mut c);
                assert!(!done.unwrap(), "the CPU execution has no cuBLAS");
            }
            assert_eq!((dev.stream_ops(), dev.memory_stats()), before);
        }
        // Not during a capture either: nothing is recorded.
        let (a, b) = (
            dev.upload(&[1.0f32; 4]).unwrap(),
            dev.upload(&[1.0f32; 4]).unwrap(),
        );
        let mut c = dev.alloc_zeros(DType::F32, 4).unwrap();
        dev.begin_capture().unwrap();
        let done = dev.blas_gemm(false, false, 2, 2, 2, 1.0, &a, &b, 0.0, &mut c);
        let graph = dev.end_capture().unwrap();
        assert!(!done.unwrap());
        assert_eq!(graph.recorded_ops(), Some(0));
    }

    fn asan_suffix() -> &'static str {
        if cfg!(cpu_asan) {
            " (AddressSanitizer)"
        } else {
            ""
        }
    }

    #[test]
    fn runtime_blas_argument_errors() {
        for dev in devices() {
            let name = dev.name();
            let f64s = |len: usize| dev.alloc_zeros(DType::F64, len).unwrap();
            let (a, b) = (f64s(6), f64s(6));
            let mut c = f64s(4);
            // Short buffers: A needs m l = 6, B l n = 6, C m n = 4.
            for (what, (la, lb, lc)) in [("A", (5, 6, 4)), ("B", (6, 5, 4)), ("C", (6, 6, 3))] {
                let (a, b, mut c) = (f64s(la), f64s(lb), f64s(lc));
                match dev.blas_gemm(false, false, 2, 2, 3, 1.0, &a, &b, 0.0, &mut c) {
                    Err(Error::ShapeMismatch {
                        what: w,
                        expected,
                        got,
                    }) => {
                        assert!(w.contains(&format!("blas_gemm {what}")), "{name}: {w}");
                        assert_eq!(got + 1, expected, "{name}: {what}");
                    }
                    r => panic!("{name}: short {what}: {r:?}"),
                }
            }
            // Longer buffers are fine (their tail is not touched).
            let long = f64s(7);
            dev.blas_gemm(false, false, 2, 2, 3, 1.0, &long, &b, 0.0, &mut c)
                .unwrap();
            // Transposed shapes need the same element counts.
            dev.blas_gemm(true, true, 2, 2, 3, 1.0, &a, &b, 0.0, &mut c)
                .unwrap();
            // Mixed and unsupported element types.
            let a32 = dev.alloc_zeros(DType::F32, 6).unwrap();
            let r = dev.blas_gemm(false, false, 2, 2, 3, 1.0, &a32, &b, 0.0, &mut c);
            assert!(matches!(r, Err(Error::Device { .. })), "{name}: {r:?}");
            let (ai, bi) = (
                dev.alloc_zeros(DType::I32, 6).unwrap(),
                dev.alloc_zeros(DType::I32, 6).unwrap(),
            );
            let mut ci = dev.alloc_zeros(DType::I32, 4).unwrap();
            let r = dev.blas_gemm(false, false, 2, 2, 3, 1.0, &ai, &bi, 0.0, &mut ci);
            assert!(matches!(r, Err(Error::Device { .. })), "{name}: {r:?}");
            // Sizes whose products overflow.
            let r = dev.blas_gemm(false, false, usize::MAX, 2, 3, 1.0, &a, &b, 0.0, &mut c);
            assert!(
                matches!(r, Err(Error::SizeOverflow { .. })),
                "{name}: {r:?}"
            );
            // C aliasing an input (a second handle to the same memory).
            let mut alias = a.share();
            let r = dev.blas_gemm(false, false, 2, 2, 3, 1.0, &a, &b, 0.0, &mut alias);
            assert!(matches!(r, Err(Error::Device { .. })), "{name}: {r:?}");
            // A buffer of another device of the same kind.
            let other = match dev.backend() {
                super::super::Backend::Cpu => Device::cpu(),
                super::super::Backend::Cuda => Device::cuda(0).unwrap(),
            };
            let foreign = other.alloc_zeros(DType::F64, 6).unwrap();
            let r = dev.blas_gemm(false, false, 2, 2, 3, 1.0, &foreign, &b, 0.0, &mut c);
            assert!(matches!(r, Err(Error::Device { .. })), "{name}: {r:?}");
        }
    }

    /// cuBLAS against a host f64 reference: both element types, the four transpose
    /// combinations, odd shapes, `beta` zero and nonzero, an empty inner dimension; one stream
    /// operation per product; and a product captured in a graph and replayed.
    #[test]
    fn runtime_blas_gemm_matches_reference_on_gpu() {
        let devs: Vec<Device> = devices()
            .into_iter()
            .filter(|d| d.backend() == super::super::Backend::Cuda)
            .collect();
        for dev in devs {
            let Some(blas) = dev.blas_name().map(str::to_owned) else {
                println!(
                    "cuBLAS part skipped on {}: libcublas not available",
                    dev.name()
                );
                continue;
            };
            assert!(
                dev.name().ends_with(&format!(" + {blas}")),
                "{}",
                dev.name()
            );
            let shapes = [
                (1, 1, 1),
                (7, 5, 3),
                (33, 65, 17),
                (128, 96, 200),
                (5, 4, 0),
            ];
            for (si, &(m, n, l)) in shapes.iter().enumerate() {
                for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                    for (alpha, beta) in [(1.0, 0.0), (-0.75, 0.5)] {
                        let seed = (si * 8 + usize::from(ta) * 2 + usize::from(tb)) as u64;
                        let (a, b, c0) = (
                            values(m * l, seed + 1),
                            values(l * n, seed + 2),
                            values(m * n, seed + 3),
                        );
                        let (want, bound) = reference(ta, tb, m, n, l, alpha, &a, &b, beta, &c0);
                        let what = format!("{blas} m={m} n={n} l={l} ta={ta} tb={tb} beta={beta}");
                        // f64
                        let (da, db) = (dev.upload(&a).unwrap(), dev.upload(&b).unwrap());
                        let mut dc = dev.upload(&c0).unwrap();
                        let ops = dev.stream_ops();
                        let done = dev.blas_gemm(ta, tb, m, n, l, alpha, &da, &db, beta, &mut dc);
                        assert!(done.unwrap(), "{what}");
                        assert_eq!(dev.stream_ops(), ops + 1, "{what}: one stream operation");
                        let got = dev.download::<f64>(&dc).unwrap();
                        for i in 0..m * n {
                            let tol = 1e-13 * (bound[i] + 1e-300) * (l as f64 + 2.0);
                            assert!(
                                (got[i] - want[i]).abs() <= tol,
                                "{what} f64 [{i}]: {} vs {}",
                                got[i],
                                want[i]
                            );
                        }
                        // f32 (no TF32: its 10-bit mantissa would miss 1e-5 by far)
                        let f32s = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<f32>>();
                        let (sa, sb) = (
                            dev.upload(&f32s(&a)).unwrap(),
                            dev.upload(&f32s(&b)).unwrap(),
                        );
                        let mut sc = dev.upload(&f32s(&c0)).unwrap();
                        let done = dev.blas_gemm(ta, tb, m, n, l, alpha, &sa, &sb, beta, &mut sc);
                        assert!(done.unwrap(), "{what}");
                        let got = dev.download::<f32>(&sc).unwrap();
                        for i in 0..m * n {
                            // Inputs rounded to f32 (2^-24 each), then f32 sums.
                            let tol = 2e-7 * (bound[i] + 1e-30) * (l as f64 + 4.0);
                            let e = (f64::from(got[i]) - want[i]).abs();
                            assert!(
                                e <= tol,
                                "{what} f32 [{i}]: {} vs {} (error {e:e}, tol {tol:e})",
                                got[i],
                                want[i]
                            );
                        }
                    }
                }
            }
            sgemm_is_not_tf32(&dev);
            captured_product_replays(&dev);
        }
    }

    /// `1 + 2^-14` has no TF32 representation (10-bit mantissa: it rounds to 1), while every
    /// partial sum of up to 256 of them is exact in f32 (23 bits from `2^8` down to `2^-14`),
    /// whatever the summation order: an f32 product gives `256 + 2^-6` exactly, a TF32 one
    /// `256`.
    fn sgemm_is_not_tf32(dev: &Device) {
        let (m, n, l) = (64, 64, 256);
        let a = dev.upload(&vec![1.0f32 + 2f32.powi(-14); m * l]).unwrap();
        let b = dev.upload(&vec![1.0f32; l * n]).unwrap();
        let mut c = dev.alloc_zeros(DType::F32, m * n).unwrap();
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            assert!(dev
                .blas_gemm(ta, tb, m, n, l, 1.0, &a, &b, 0.0, &mut c)
                .unwrap());
            let got = dev.download::<f32>(&c).unwrap();
            let want = 256.0f32 + 2f32.powi(-6);
            assert!(
                got.iter().all(|&x| x == want),
                "ta={ta} tb={tb}: {} (TF32 gives 256)",
                got[0]
            );
        }
    }

    /// A product captured in a CUDA graph on a non-default stream of the same GPU, replayed
    /// twice with new inputs.
    fn captured_product_replays(dev: &Device) {
        use cudarc::driver::CudaContext;
        let Some(stream) = dev.cuda_stream() else {
            return;
        };
        let ctx: std::sync::Arc<CudaContext> = stream.context().clone();
        let s = ctx.new_stream().unwrap();
        // SAFETY: this test orders its work on one stream itself (cudarc's contract for
        // turning the tracking off); nothing else uses the context meanwhile.
        unsafe { ctx.disable_event_tracking() };
        let dev = Device::cuda_on_stream(s.clone()).unwrap();
        assert!(dev.blas_name().is_some(), "set up before the capture");
        let (m, n, l) = (9, 7, 5);
        let (a, b) = (values(m * l, 40), values(l * n, 41));
        let (da, mut db) = (dev.upload(&a).unwrap(), dev.upload(&b).unwrap());
        let mut dc = dev.alloc_zeros(DType::F64, m * n).unwrap();
        let before = dev.memory_stats();
        dev.begin_capture().unwrap();
        assert!(dev
            .blas_gemm(false, true, m, n, l, 1.0, &da, &db, 0.0, &mut dc)
            .unwrap());
        let graph = dev.end_capture().unwrap();
        assert_eq!(
            dev.download::<f64>(&dc).unwrap(),
            vec![0.0; m * n],
            "recorded, not run"
        );
        for round in 0..2 {
            let b: Vec<f64> = b.iter().map(|x| x * (round as f64 + 1.0)).collect();
            dev.write(&mut db, &b).unwrap();
            graph.launch().unwrap();
            let (want, bound) = reference(false, true, m, n, l, 1.0, &a, &b, 0.0, &[]);
            let got = dev.download::<f64>(&dc).unwrap();
            for i in 0..m * n {
                assert!(
                    (got[i] - want[i]).abs() <= 1e-13 * (bound[i] + 1e-300) * 8.0,
                    "replay {round} [{i}]"
                );
            }
        }
        assert_eq!(
            dev.memory_stats(),
            before,
            "a captured product allocates nothing"
        );
        drop(dev);
        graph.launch().unwrap(); // the graph keeps its buffers and cuBLAS's workspace
        s.synchronize().unwrap();
    }
}
