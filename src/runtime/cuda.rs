//! CUDA backend (cudarc driver API). Never panics when `libcuda` is absent: before the first
//! cudarc call the driver library is probed here ([`lib_present`]), with the names cudarc's
//! run-time loading tries. The probe is the crate's own, not cudarc's `is_culib_present`,
//! because that one exists only in cudarc's loading modes: a program that also depends on a
//! crate selecting cudarc's `dynamic-linking` (candle with `cuda`) links the library instead,
//! and the probe then simply finds it loaded.

use super::types::{BackendArg, KernelFile, KernelSig, LaunchConfig};
use crate::error::{Error, Result};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, DevicePtrMut,
};
use cudarc::nvrtc::Ptx;
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex};

/// The driver library's names (Linux, Windows).
pub(super) const DRIVER: &[&str] = &["cuda", "nvcuda"];
/// NVRTC's.
const NVRTC: &[&str] = &["nvrtc"];
/// The CUDA version the crate is built against (cudarc's `cuda-13000`).
const CUDA_MAJOR_MINOR: (u32, u32) = (13, 0);

/// The file names cudarc's run-time loading tries for `lib` (its `get_lib_name_candidates`
/// at this crate's CUDA version).
fn candidates(lib: &str) -> Vec<String> {
    use std::env::consts::{DLL_PREFIX as P, DLL_SUFFIX as S};
    let w = usize::BITS;
    let (ma, mi) = CUDA_MAJOR_MINOR;
    let mut v = vec![
        format!("{P}{lib}{S}"),
        format!("{P}{lib}{w}{S}"),
        format!("{P}{lib}{w}_{ma}{S}"),
        format!("{P}{lib}{w}_{ma}{mi}{S}"),
        format!("{P}{lib}{w}_{ma}{mi}_0{S}"),
        format!("{P}{lib}{w}_{ma}0_{mi}{S}"),
        format!("{P}{lib}{w}_{ma}0_0{S}"),
    ];
    for old in ["9", "10", "11", "12"] {
        v.push(format!("{P}{lib}{w}_{old}{S}"));
    }
    for ver in [ma.to_string().as_str(), "12", "11", "10", "9", "1"] {
        v.push(format!("{P}{lib}{S}.{ver}"));
    }
    v
}

/// Whether one of the names of `libs` can be loaded.
pub(super) fn lib_present(libs: &[&str]) -> bool {
    libs.iter().flat_map(|l| candidates(l)).any(|name| {
        // SAFETY: loading the CUDA driver or NVRTC runs only their own initialisers, which
        // are made to be loaded this way (cudarc loads them exactly so); the handle is dropped
        // again at once.
        unsafe { libloading::Library::new(name) }.is_ok()
    })
}

/// A kernel handle kept by a captured graph (it holds its module).
pub(super) type Function = CudaFunction;
/// A captured CUDA graph.
pub(super) type Graph = cudarc::driver::CudaGraph;

/// Replays a captured graph on its stream.
pub(super) fn launch_graph(g: &Graph) -> Result<()> {
    g.launch().map_err(|e| dev_err("graph launch", e))
}

fn dev_err(op: impl Into<String>, e: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::Device {
        op: op.into(),
        message: e.to_string(),
        source: Some(crate::error::DeviceSource::new(e)),
    }
}

/// A device allocation (at least one byte, so that empty buffers are valid too). The slice is
/// behind a lock because cudarc's write path (`device_ptr_mut`, which records the write for
/// cudarc's cross-stream event tracking) needs `&mut`, while a buffer is shared (`Arc`);
/// [`with_ptrs`] takes it once per stream operation.
#[derive(Debug)]
pub(super) struct CudaBuf {
    slice: Mutex<CudaSlice<u8>>,
    bytes: usize,
}

impl CudaBuf {
    fn new(slice: CudaSlice<u8>, bytes: usize) -> CudaBuf {
        CudaBuf {
            slice: Mutex::new(slice),
            bytes,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CudaSlice<u8>> {
        self.slice.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn into_slice(self) -> CudaSlice<u8> {
        self.slice.into_inner().unwrap_or_else(|p| p.into_inner())
    }
}

/// Runs `f` with the device pointers of `bufs` (each with whether the operation writes it),
/// in order, for one operation queued on `stream`: a written buffer goes through cudarc's
/// write path (`device_ptr_mut`: waits for the buffer's pending reads and writes on other
/// streams and records this write when cudarc tracks events), a read one through the read
/// path. A buffer listed twice is taken once (written if either use writes it); the locks
/// are taken in address order, so concurrent operations on shared buffers cannot deadlock.
pub(super) fn with_ptrs<R>(
    stream: &CudaStream,
    bufs: &[(&CudaBuf, bool)],
    f: impl FnOnce(&[u64]) -> R,
) -> R {
    let mut uniq: Vec<(&CudaBuf, bool)> = Vec::with_capacity(bufs.len());
    let idx: Vec<usize> = bufs
        .iter()
        .map(
            |&(b, w)| match uniq.iter().position(|(u, _)| std::ptr::eq(*u, b)) {
                Some(i) => {
                    uniq[i].1 |= w;
                    i
                }
                None => {
                    uniq.push((b, w));
                    uniq.len() - 1
                }
            },
        )
        .collect();
    let mut order: Vec<usize> = (0..uniq.len()).collect();
    order.sort_by_key(|&i| uniq[i].0 as *const CudaBuf as usize);
    let mut guards: Vec<Option<std::sync::MutexGuard<'_, CudaSlice<u8>>>> =
        (0..uniq.len()).map(|_| None).collect();
    for &i in &order {
        guards[i] = Some(uniq[i].0.lock());
    }
    let mut ptrs = vec![0u64; uniq.len()];
    let mut syncs = Vec::with_capacity(uniq.len());
    for ((g, &(_, written)), p) in guards.iter_mut().zip(&uniq).zip(ptrs.iter_mut()) {
        let Some(g) = g.as_mut() else {
            continue;
        };
        let (ptr, sync) = if written {
            g.device_ptr_mut(stream)
        } else {
            g.device_ptr(stream)
        };
        *p = ptr;
        syncs.push(sync);
    }
    let out: Vec<u64> = idx.iter().map(|&i| ptrs[i]).collect();
    let r = f(&out);
    // The syncs record the events (after the operation is queued), then the locks go.
    drop(syncs);
    drop(guards);
    r
}

/// One CUDA context and stream, with the kernel modules loaded on first use.
pub(super) struct CudaDevice {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    cc: (i32, i32),
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    funcs: Mutex<HashMap<&'static str, CudaFunction>>,
}

impl std::fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CudaDevice({})", self.name())
    }
}

impl CudaDevice {
    pub(super) fn new(ordinal: usize) -> Result<CudaDevice> {
        if !lib_present(DRIVER) {
            return Err(Error::NoDevice {
                reason: "the CUDA driver library (libcuda) is not installed".into(),
            });
        }
        let ctx = std::panic::catch_unwind(|| CudaContext::new(ordinal))
            .map_err(|_| Error::NoDevice {
                reason: "the CUDA driver could not be loaded".into(),
            })?
            .map_err(|e| Error::NoDevice {
                reason: format!("no CUDA device {ordinal}: {e:?}"),
            })?;
        // SAFETY: cudarc's contract for turning tracking off: the caller orders its streams
        // itself. This context handle is this device's own (`CudaContext::new` makes a new
        // one), and the device queues everything on the one stream made below, so no
        // cross-stream ordering is needed; buffers handed out or taken in
        // (`into_cuda_slice`, `from_cuda_slice`) say how to order them.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx
            .new_stream()
            .map_err(|e| dev_err("create a stream", e))?;
        CudaDevice::on_stream(stream)
    }

    /// On a caller's stream (its context and device).
    pub(super) fn on_stream(stream: Arc<CudaStream>) -> Result<CudaDevice> {
        let ctx = stream.context().clone();
        let cc = ctx
            .compute_capability()
            .map_err(|e| dev_err("compute capability", e))?;
        Ok(CudaDevice {
            ctx,
            stream,
            cc,
            modules: Mutex::new(HashMap::new()),
            funcs: Mutex::new(HashMap::new()),
        })
    }

    pub(super) fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The opt-in maximum of dynamic shared memory per block (48 KiB if unreadable).
    pub(super) fn max_shared_optin(&self) -> usize {
        self.ctx
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
            )
            .map_or(48 * 1024, |v| v.max(0) as usize)
    }

    /// Takes ownership of a caller's slice (no copy): this stream first waits for the
    /// slice's stream when they differ, then owns the allocation (freed on this stream).
    pub(super) fn adopt<T>(&self, slice: CudaSlice<T>) -> Result<CudaBuf> {
        if **slice.context() != *self.ctx {
            return Err(Error::InvalidParameter {
                name: "slice",
                reason: "the slice belongs to another CUDA context than this device".into(),
            });
        }
        let bytes = slice.len() * std::mem::size_of::<T>();
        if bytes == 0 {
            return self.alloc_zeros(0);
        }
        if slice.stream().cu_stream() != self.stream.cu_stream() {
            self.stream
                .join(slice.stream())
                .map_err(|e| dev_err("order after the slice's stream", e))?;
        }
        let ptr = slice.leak();
        // SAFETY: `ptr` is the live allocation just released by `leak` (of `bytes` bytes, in
        // this context), now owned by exactly one slice again; u8 is valid for any bits.
        let slice = unsafe { self.stream.upgrade_device_ptr::<u8>(ptr, bytes) };
        Ok(CudaBuf::new(slice, bytes))
    }

    /// Gives the allocation away as a typed slice of `len` elements on this stream (no copy).
    pub(super) fn release<T>(&self, b: CudaBuf, len: usize) -> CudaSlice<T> {
        let ptr = b.into_slice().leak();
        // SAFETY: `ptr` is the live allocation just released by `leak`, of at least
        // `len * size_of::<T>()` bytes (the buffer's length in its own element type T, checked
        // by the caller), written by this crate's kernels or uploads with values of type T.
        unsafe { self.stream.upgrade_device_ptr::<T>(ptr, len) }
    }

    pub(super) fn name(&self) -> String {
        let n = self.ctx.name().unwrap_or_else(|_| "CUDA device".into());
        format!("{n} (sm_{}{})", self.cc.0, self.cc.1)
    }

    pub(super) fn alloc_zeros(&self, bytes: usize) -> Result<CudaBuf> {
        let slice = self
            .stream
            .alloc_zeros::<u8>(bytes.max(1))
            .map_err(|e| dev_err("alloc", e))?;
        Ok(CudaBuf::new(slice, bytes))
    }

    /// A stream-ordered allocation whose contents are unspecified (no memset).
    pub(super) fn alloc(&self, bytes: usize) -> Result<CudaBuf> {
        // SAFETY: the memory is only ever used as bytes through raw device pointers (kernels,
        // copies); no `CudaSlice<T>` value of it is read before a write by this crate.
        let slice =
            unsafe { self.stream.alloc::<u8>(bytes.max(1)) }.map_err(|e| dev_err("alloc", e))?;
        Ok(CudaBuf::new(slice, bytes))
    }

    pub(super) fn upload(&self, data: &[u8]) -> Result<CudaBuf> {
        let b = self.alloc(data.len())?;
        self.write(&b, data)?;
        Ok(b)
    }

    pub(super) fn write(&self, b: &CudaBuf, data: &[u8]) -> Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        let len = data.len().min(b.bytes);
        self.bind()?;
        with_ptrs(&self.stream, &[(b, true)], |p| {
            // SAFETY: `p[0]` addresses a live allocation of at least `b.bytes >= len` bytes in
            // this context; the driver stages pageable host memory before returning, so `data`
            // may be dropped afterwards.
            unsafe {
                cudarc::driver::result::memcpy_htod_async(
                    p[0],
                    &data[..len],
                    self.stream.cu_stream(),
                )
            }
        })
        .map_err(|e| dev_err("copy to device", e))
    }

    /// Fills `b` with zero bytes (stream-ordered, capturable).
    pub(super) fn zero(&self, b: &CudaBuf) -> Result<()> {
        self.bind()?;
        with_ptrs(&self.stream, &[(b, true)], |p| {
            // SAFETY: `p[0]` addresses a live allocation of at least `b.bytes` bytes.
            unsafe {
                cudarc::driver::result::memset_d8_async(p[0], 0, b.bytes, self.stream.cu_stream())
            }
        })
        .map_err(|e| dev_err("zero fill", e))
    }

    /// `dst <- src` (the first `dst.bytes` bytes; stream-ordered, capturable).
    pub(super) fn copy_into(&self, dst: &CudaBuf, src: &CudaBuf) -> Result<()> {
        let bytes = dst.bytes.min(src.bytes);
        if bytes == 0 {
            return Ok(());
        }
        if std::ptr::eq(dst, src) {
            return Ok(());
        }
        self.bind()?;
        with_ptrs(&self.stream, &[(dst, true), (src, false)], |p| {
            // SAFETY: both address live allocations of at least `bytes` bytes in this
            // context; distinct buffers never overlap.
            unsafe {
                cudarc::driver::result::memcpy_dtod_async(
                    p[0],
                    p[1],
                    bytes,
                    self.stream.cu_stream(),
                )
            }
        })
        .map_err(|e| dev_err("copy on device", e))
    }

    /// Makes this context current on the calling thread (the raw driver calls need it).
    fn bind(&self) -> Result<()> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| dev_err("bind context", e))
    }

    /// Starts a stream capture. Refused on the legacy default stream (not capturable) and
    /// while cudarc's event tracking is on in a multi-stream context (a capture must not wait
    /// on events recorded outside it).
    pub(super) fn begin_capture(&self) -> Result<()> {
        if self.stream.cu_stream().is_null() {
            return Err(Error::InvalidParameter {
                name: "stream",
                reason: "the legacy default stream cannot be captured; make the device with \
                         Device::cuda_on_stream and a stream of CudaContext::new_stream"
                    .into(),
            });
        }
        if self.ctx.is_in_multi_stream_mode() && self.ctx.is_event_tracking() {
            return Err(Error::InvalidParameter {
                name: "stream",
                reason: "cudarc's event tracking is on for this context: call \
                         `unsafe { ctx.disable_event_tracking() }` before capturing"
                    .into(),
            });
        }
        self.stream
            .begin_capture(
                cudarc::driver::sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL,
            )
            .map_err(|e| dev_err("begin capture", e))
    }

    /// Ends the capture and instantiates the graph.
    pub(super) fn end_capture(&self) -> Result<Graph> {
        self.stream
            .end_capture(cudarc::driver::sys::CUgraphInstantiate_flags(0))
            .map_err(|e| dev_err("end capture", e))?
            .ok_or_else(|| Error::Device {
                op: "end capture".into(),
                message: "the driver returned no graph (the capture was invalidated)".into(),
                source: None,
            })
    }

    pub(super) fn read(&self, b: &CudaBuf, dst: &mut [u8]) -> Result<()> {
        if dst.is_empty() {
            return self.synchronize();
        }
        let slice = b.lock();
        let view = slice.slice(..dst.len());
        self.stream
            .memcpy_dtoh(&view, dst)
            .map_err(|e| dev_err("copy to host", e))?;
        drop(slice);
        self.synchronize()
    }

    pub(super) fn copy(&self, b: &CudaBuf) -> Result<CudaBuf> {
        let slice = self
            .stream
            .clone_dtod(&*b.lock())
            .map_err(|e| dev_err("copy on device", e))?;
        Ok(CudaBuf::new(slice, b.bytes))
    }

    pub(super) fn synchronize(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(|e| dev_err("synchronize", e))
    }

    fn module(&self, kf: &'static KernelFile) -> Result<Arc<CudaModule>> {
        let mut mods = self.modules.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(m) = mods.get(kf.name) {
            return Ok(m.clone());
        }
        let image = match (kf.cubin_sm90, kf.ptx) {
            (Some(c), _) if self.cc == (9, 0) => Ptx::from_binary(c.to_vec()),
            (_, Some(p)) => Ptx::from_src(p),
            _ => {
                if !lib_present(NVRTC) {
                    return Err(Error::NoDevice {
                        reason: "built without nvcc and NVRTC (libnvrtc) is not installed".into(),
                    });
                }
                let opts = cudarc::nvrtc::CompileOptions {
                    options: vec![
                        format!("--gpu-architecture=compute_{}{}", self.cc.0, self.cc.1),
                        "-std=c++17".into(),
                    ],
                    name: Some(format!("{}.cu", kf.name)),
                    ..Default::default()
                };
                cudarc::nvrtc::compile_ptx_with_opts(kf.source, opts)
                    .map_err(|e| dev_err(format!("NVRTC compile of kernels/{}.cu", kf.name), e))?
            }
        };
        let m = self
            .ctx
            .load_module(image)
            .map_err(|e| dev_err(format!("load module kernels/{}.cu", kf.name), e))?;
        mods.insert(kf.name, m.clone());
        Ok(m)
    }

    pub(super) fn function(&self, sig: &KernelSig) -> Result<Function> {
        if let Some(f) = self
            .funcs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(sig.name)
        {
            return Ok(f.clone());
        }
        let f = self
            .module(sig.file)?
            .load_function(sig.name)
            .map_err(|e| dev_err(format!("load function {}", sig.name), e))?;
        self.funcs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(sig.name, f.clone());
        Ok(f)
    }

    pub(super) fn launch(
        &self,
        sig: &KernelSig,
        cfg: LaunchConfig,
        args: &[BackendArg<'_, CudaBuf>],
    ) -> Result<()> {
        let f = self.function(sig)?;
        if cfg.shared_bytes > 48 * 1024 {
            // Above the default limit a kernel must opt in (a host-side attribute, allowed
            // during a stream capture).
            f.set_attribute(
                cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                cfg.shared_bytes as i32,
            )
            .map_err(|e| dev_err(format!("opt in to shared memory for {}", sig.name), e))?;
        }
        // The buffers, with whether the kernel writes them (a non-`const` pointer).
        let bufs: Vec<(&CudaBuf, bool)> = args
            .iter()
            .zip(sig.params)
            .filter_map(|(a, p)| match (a, p) {
                (BackendArg::Buf(c), crate::runtime::Param::Ptr { writable, .. }) => {
                    Some((*c, *writable))
                }
                (BackendArg::Buf(c), _) => Some((*c, true)),
                _ => None,
            })
            .collect();
        self.ctx
            .bind_to_thread()
            .map_err(|e| dev_err("bind context", e))?;
        let r = with_ptrs(&self.stream, &bufs, |ptrs| {
            let mut next = ptrs.iter();
            let mut slots: Vec<u64> = args
                .iter()
                .map(|a| match a {
                    BackendArg::Buf(_) => *next.next().unwrap_or(&0),
                    BackendArg::Slot(s) => *s,
                })
                .collect();
            let mut params: Vec<*mut c_void> = slots
                .iter_mut()
                .map(|s| (s as *mut u64).cast::<c_void>())
                .collect();
            // SAFETY: `params` points at one 8-byte slot per parameter (little-endian, so
            // 4-byte scalars read correctly), matching the kernel's signature (checked by
            // `Device::launch`); every buffer's pointer comes from `with_ptrs`, which keeps the
            // buffers locked until the launch is queued, and `Buffer` drops synchronise through
            // cudarc's stream-ordered free.
            unsafe {
                cudarc::driver::result::launch_kernel(
                    f.cu_function(),
                    cfg.grid,
                    cfg.block,
                    cfg.shared_bytes,
                    self.stream.cu_stream(),
                    &mut params,
                )
            }
        });
        r.map_err(|e| dev_err(format!("launch {}", sig.name), e))
    }
}
