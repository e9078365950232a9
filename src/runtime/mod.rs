//! The device runtime: allocate, copy, launch a kernel, capture a graph, synchronise. It
//! knows nothing of the implicit-ETF head: kernels come in as [`KernelSig`]s (the crate's
//! table is [`crate::kernels`]), buffers as typed allocations.
//!
//! Two implementations behind one [`Device`]:
//! - **CUDA** (cudarc, driver API): kernels come from the PTX / `sm_90` cubin that `build.rs`
//!   compiled with `nvcc`, or, when the crate was built without `nvcc`, from the embedded
//!   sources compiled at run time with NVRTC.
//! - **CPU execution**: the same `kernels/*.cu` compiled by the host C++ compiler against
//!   `kernels/cpu/cuda_cpu.h`; the threads of a block run as real host threads, so barriers,
//!   shuffles and atomics have their CUDA semantics (see `kernels/README.md`).
//!
//! The head's stages are written once against [`Device`] (see [`crate::gpu`]), so CI runs
//! the real orchestration on the CPU.
//!
//! A launch takes a [`KernelSig`] and a list of [`Arg`]s, checked against the kernel's C
//! signature (parsed by `build.rs`): argument count, scalar types, pointer element types, and
//! that every buffer belongs to this device. Sizes cannot be checked from a signature, so
//! [`Device::launch`] is `unsafe`; the typed wrappers of [`crate::kernels`] are the usual way
//! in.
//!
//! Dense products can also go through cuBLAS ([`blas`]): [`Device::blas_gemm`] runs a
//! row-major f32/f64 product on the device's stream, capturable in a graph, and returns `false`
//! where there is no cuBLAS (the CPU execution, or no loadable libcublas, which cudarc loads at
//! run time like the driver), so the caller launches its own kernel; [`Device::blas_name`] says
//! which library is in use.

pub mod blas;
pub mod buffer;
#[cfg_attr(not(feature = "cpu-exec"), path = "cpu_none.rs")]
mod cpu;
#[cfg_attr(not(feature = "cuda"), path = "cuda_none.rs")]
mod cuda;
pub mod graph;
pub mod launch;
pub mod memory;
#[cfg(feature = "cuda")]
pub mod nccl;
pub mod profile;
pub mod types;

#[cfg(feature = "cuda")]
/// The `cudarc` this crate is built against (for [`Device::cuda_on_stream`],
/// [`Device::from_cuda_slice`] and [`Device::into_cuda_slice`]: their types must come from
/// this version).
pub use cudarc;

pub use buffer::Buffer;
pub use graph::Graph;
pub use launch::{grid_stride, Arg};
pub use memory::{MemoryStats, PlanEntry};
pub use types::{DType, DeviceScalar, KernelFile, KernelSig, LaunchConfig, Param};

use crate::error::{Error, Result};
use graph::{CpuOp, GraphKind, Recording};
use memory::{BufInner, Counters, Mem, Workspaces};
use std::panic::Location;
use std::sync::{Arc, Mutex};

/// Which implementation a [`Device`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// CUDA GPU through the driver API.
    Cuda,
    /// The CPU execution of the kernels.
    Cpu,
}

/// A device: CUDA GPU or CPU execution of the kernels.
#[derive(Debug)]
pub struct Device {
    inner: DevInner,
    counters: Arc<Counters>,
    workspaces: Mutex<Workspaces>,
    capture: Mutex<Option<Recording>>,
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    blas: blas::BlasState,
}

#[derive(Debug)]
enum DevInner {
    #[cfg_attr(not(feature = "cpu-exec"), allow(dead_code))]
    Cpu,
    Cuda(Box<cuda::CudaDevice>),
}

/// Restores the previous workspace scope when dropped (see [`Device::workspace`]).
#[derive(Debug)]
pub(crate) struct WorkspaceScope<'a> {
    dev: &'a Device,
    prev: Option<usize>,
}

impl Drop for WorkspaceScope<'_> {
    fn drop(&mut self) {
        lock(&self.dev.workspaces).leave(self.prev);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Device {
    fn wrap(inner: DevInner) -> Device {
        Device {
            inner,
            counters: Arc::default(),
            workspaces: Mutex::default(),
            capture: Mutex::default(),
            blas: blas::BlasState::default(),
        }
    }

    /// The CPU execution of the kernels (feature `cpu-exec`, on by default).
    #[cfg(feature = "cpu-exec")]
    pub fn cpu() -> Device {
        Device::wrap(DevInner::Cpu)
    }

    /// CUDA device `ordinal`, on a stream of its own; [`Error::NoDevice`] when there is no
    /// driver or no GPU. The stream is a non-blocking one (`CudaContext::new_stream`), so a
    /// step on it can be captured in a CUDA graph ([`Device::begin_capture`]), and cudarc's
    /// per-buffer event tracking is off for this device's context handle (everything the
    /// device queues is ordered by its one stream). To order the head's work with a trainer's
    /// kernels, use [`Device::cuda_on_stream`] with the trainer's stream instead.
    pub fn cuda(ordinal: usize) -> Result<Device> {
        Ok(Device::wrap(DevInner::Cuda(Box::new(
            cuda::CudaDevice::new(ordinal)?,
        ))))
    }

    /// The GPU of a caller's cudarc stream, with all of this crate's work queued on that
    /// stream: use the stream of your trainer (candle, burn, your own), so that the head's
    /// kernels are ordered with yours, and a non-default stream if you capture steps in a
    /// CUDA graph (the legacy default stream cannot be captured). The stream must belong to
    /// this crate's `cudarc` version
    /// (re-exported as [`cudarc`]).
    ///
    /// Cost to know about: once a context has several streams, cudarc records an event per
    /// buffer per launch (its automatic cross-stream ordering). This crate queues everything
    /// on one stream and does not need them; a trainer that orders its streams itself can
    /// switch them off with `unsafe { ctx.disable_event_tracking() }` (cudarc's contract),
    /// and must do so before [`Device::begin_capture`].
    ///
    /// ```no_run
    /// use implicit_etf::runtime::{cudarc::driver::CudaContext, DType, Device};
    ///
    /// let ctx = CudaContext::new(0).unwrap();
    /// let stream = ctx.new_stream().unwrap(); // the trainer's stream
    /// let dev = Device::cuda_on_stream(stream.clone()).unwrap();
    /// let feats = stream.clone_htod(&[0.5f32; 32]).unwrap(); // a trainer's tensor
    /// let buf = dev.from_cuda_slice(feats).unwrap(); // moved in, no copy
    /// assert_eq!((buf.dtype(), buf.len()), (DType::F32, 32));
    /// let back = dev.into_cuda_slice::<f32>(buf).unwrap(); // moved out, no copy
    /// assert_eq!(back.len(), 32);
    /// ```
    #[cfg(feature = "cuda")]
    pub fn cuda_on_stream(stream: Arc<cudarc::driver::CudaStream>) -> Result<Device> {
        if !cuda::lib_present(cuda::DRIVER) {
            return Err(Error::NoDevice {
                reason: "the CUDA driver library (libcuda) is not installed".into(),
            });
        }
        Ok(Device::wrap(DevInner::Cuda(Box::new(
            cuda::CudaDevice::on_stream(stream)?,
        ))))
    }

    /// The cudarc stream this device queues its work on (`None` on the CPU execution).
    #[cfg(feature = "cuda")]
    pub fn cuda_stream(&self) -> Option<Arc<cudarc::driver::CudaStream>> {
        match &self.inner {
            DevInner::Cpu => None,
            DevInner::Cuda(c) => Some(c.stream().clone()),
        }
    }

    /// A caller's cudarc slice as a [`Buffer`] of this device, without a copy: the buffer
    /// owns the allocation from now on (freed on this device's stream). When the slice's
    /// stream is not this device's, this stream first waits for it, so pending writes to
    /// the slice are seen. Errors: the CPU execution, a slice of another CUDA context, or a
    /// capture in progress.
    #[cfg(feature = "cuda")]
    pub fn from_cuda_slice<T: DeviceScalar>(
        &self,
        slice: cudarc::driver::CudaSlice<T>,
    ) -> Result<Buffer> {
        self.refuse_in_capture("from_cuda_slice")?;
        let len = slice.len();
        match &self.inner {
            DevInner::Cpu => Err(Error::Device {
                op: "from_cuda_slice".into(),
                message: "the CPU execution has no CUDA memory".into(),
                source: None,
            }),
            DevInner::Cuda(c) => {
                let bytes = len * std::mem::size_of::<T>();
                let buf = BufInner::Cuda(c.adopt(slice)?);
                Ok(Buffer {
                    dtype: T::DTYPE,
                    len,
                    mem: self.counters.track(buf, bytes),
                })
            }
        }
    }

    /// A [`Buffer`] of this device as a cudarc slice of `T` on this device's stream, without a
    /// copy (use it on another stream only after that stream waits for this one, e.g.
    /// `CudaStream::join`). Errors: `T` is not the buffer's element type, the buffer is not
    /// a CUDA buffer of this kind of device, or its memory is shared (a head's workspace, a
    /// [`Graph`] that uses it).
    #[cfg(feature = "cuda")]
    pub fn into_cuda_slice<T: DeviceScalar>(
        &self,
        buf: Buffer,
    ) -> Result<cudarc::driver::CudaSlice<T>> {
        check_type::<T>(&buf, "into_cuda_slice")?;
        self.own(&buf.mem, "into_cuda_slice")?;
        let len = buf.len;
        let (DevInner::Cuda(c), BufInner::Cuda(_)) = (&self.inner, &buf.mem.buf) else {
            return Err(Error::Device {
                op: "into_cuda_slice".into(),
                message: "not a CUDA buffer of a CUDA device".into(),
                source: None,
            });
        };
        let mut mem = Arc::try_unwrap(buf.mem).map_err(|_| Error::Device {
            op: "into_cuda_slice".into(),
            message: "the buffer's memory is shared (a workspace or a graph uses it)".into(),
            source: None,
        })?;
        match std::mem::replace(&mut mem.buf, BufInner::Moved) {
            BufInner::Cuda(b) => Ok(c.release::<T>(b, len)),
            _ => Err(foreign("into_cuda_slice")),
        }
    }

    /// Chosen by `IMPLICIT_ETF_DEVICE`: `cpu`, `cuda` (error if unavailable), or `auto`
    /// (the default: CUDA device 0 when available, else the CPU execution).
    pub fn from_env() -> Result<Device> {
        match std::env::var("IMPLICIT_ETF_DEVICE").as_deref() {
            Ok("cpu") => Device::cpu_if_built(),
            Ok("cuda") => Device::cuda(0),
            Ok("auto") | Err(_) => Device::cuda(0).or_else(|_| Device::cpu_if_built()),
            Ok(other) => Err(Error::InvalidParameter {
                name: "IMPLICIT_ETF_DEVICE",
                reason: format!("`{other}` is not one of cpu, cuda, auto"),
            }),
        }
    }

    /// The devices tests should run on: the CPU execution, plus CUDA device 0 when present
    /// (`IMPLICIT_ETF_DEVICE=cpu` or `cuda` keeps only that one). The second value is the
    /// reason the CUDA part is skipped, if it is.
    pub fn all_available() -> (Vec<Device>, Option<String>) {
        let want = std::env::var("IMPLICIT_ETF_DEVICE").unwrap_or_default();
        let mut v = Vec::new();
        if want != "cuda" {
            v.extend(Device::cpu_if_built());
        }
        if want == "cpu" {
            return (v, Some("IMPLICIT_ETF_DEVICE=cpu".into()));
        }
        match Device::cuda(0) {
            Ok(d) => {
                v.push(d);
                (v, None)
            }
            Err(e) => (v, Some(e.to_string())),
        }
    }

    /// [`Device::cpu`], or an error when the crate was built without `cpu-exec`.
    fn cpu_if_built() -> Result<Device> {
        #[cfg(feature = "cpu-exec")]
        return Ok(Device::cpu());
        #[cfg(not(feature = "cpu-exec"))]
        Err(Error::NoDevice {
            reason: "implicit-etf was built without its `cpu-exec` feature".into(),
        })
    }

    /// The most dynamic shared memory one block of a launch may use on this device, in
    /// bytes: the GPU's opt-in maximum (`CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN`:
    /// 227 KiB on Hopper, 48 KiB when the attribute cannot be read), at most
    /// [`MAX_DYNAMIC_SHARED_BYTES`]; [`MAX_DYNAMIC_SHARED_BYTES`] on the CPU execution.
    pub fn max_shared_bytes(&self) -> usize {
        match &self.inner {
            DevInner::Cpu => MAX_DYNAMIC_SHARED_BYTES as usize,
            DevInner::Cuda(c) => c.max_shared_optin().min(MAX_DYNAMIC_SHARED_BYTES as usize),
        }
    }

    /// Which implementation this is.
    pub fn backend(&self) -> Backend {
        match self.inner {
            DevInner::Cpu => Backend::Cpu,
            DevInner::Cuda(_) => Backend::Cuda,
        }
    }

    /// A short description: "CPU execution", or the GPU's name with the BLAS its products go
    /// through when there is one ("NVIDIA H200 (sm_90) + cuBLAS 13.0"; asking sets cuBLAS up,
    /// see [`Device::blas_name`]).
    pub fn name(&self) -> String {
        match &self.inner {
            DevInner::Cpu => {
                if cfg!(cpu_asan) {
                    "CPU execution (AddressSanitizer)".into()
                } else {
                    "CPU execution".into()
                }
            }
            DevInner::Cuda(c) => match self.blas_name() {
                Some(blas) => format!("{} + {blas}", c.name()),
                None => c.name(),
            },
        }
    }

    /// Stream operations issued on this device so far: kernel launches, memsets (including
    /// the zero fill of a new [`alloc_zeros`](Self::alloc_zeros) allocation), copies in any
    /// direction, and graph launches (one each; the operations recorded during a capture are
    /// counted when recorded). The count is the same on both backends for the same work, so
    /// a test on the CPU execution measures what a GPU step issues; the difference of two
    /// readings around a step is its per-step count.
    ///
    /// ```
    /// use implicit_etf::runtime::{DType, Device};
    /// let dev = Device::cpu();
    /// let before = dev.stream_ops();
    /// let buf = dev.alloc_zeros(DType::F32, 16).unwrap(); // one memset
    /// let _host: Vec<f32> = dev.download(&buf).unwrap(); // one copy
    /// assert_eq!(dev.stream_ops() - before, 2);
    /// ```
    pub fn stream_ops(&self) -> u64 {
        self.counters.ops()
    }

    /// Starts (`true`, emptied) or stops recording the name of every stream operation this
    /// device issues, and returns what was recorded until now: which kernels, memsets and
    /// copies a step is made of (diagnostics; the names are the kernels' C names).
    pub fn trace_stream_ops(&self, on: bool) -> Vec<String> {
        self.counters.set_trace(on)
    }

    /// Allocations this device has created and released so far (see [`MemoryStats`]).
    pub fn memory_stats(&self) -> MemoryStats {
        self.counters.stats()
    }

    /// Bytes held by the workspaces of the heads on this device (kept between steps so that
    /// a steady-state step allocates nothing; see [`memory`]).
    pub fn workspace_bytes(&self) -> usize {
        lock(&self.workspaces).bytes()
    }

    /// The scratch plan of the heads on this device: every workspace slot with its size and
    /// the source line that requests it, in request order (see [`memory`]). After a head's
    /// fourth step it is the complete, fixed list of the intermediate buffers of a step.
    pub fn workspace_plan(&self) -> Vec<PlanEntry> {
        lock(&self.workspaces).plan()
    }

    /// Enters workspace `id` until the returned scope drops: scratch requests
    /// ([`alloc_zeros`](Self::alloc_zeros), [`copy`](Self::copy)) then reuse its slots in
    /// order (see [`memory`]). Crate-internal: only the heads know which buffers outlive a
    /// scope.
    pub(crate) fn workspace(&self, id: usize) -> WorkspaceScope<'_> {
        let prev = lock(&self.workspaces).enter(id);
        WorkspaceScope { dev: self, prev }
    }

    /// Drops workspace `id`'s slots (freed once no buffer aliases them).
    pub(crate) fn clear_workspace(&self, id: usize) {
        lock(&self.workspaces).clear(id);
    }

    /// An error unless this device created `m` (a buffer of another device, even of the same
    /// kind, addresses memory this one cannot use).
    fn own(&self, m: &Mem, op: &str) -> Result<()> {
        if m.owned_by(&self.counters) {
            Ok(())
        } else {
            Err(foreign(op))
        }
    }

    /// The capture in progress, if any, when the calling thread is the one that began it; a
    /// capture of another thread is an error (its graph must not pick up this thread's work,
    /// and CUDA's thread-local capture mode refuses it as well).
    fn recording(&self) -> Result<std::sync::MutexGuard<'_, Option<Recording>>> {
        let cap = lock(&self.capture);
        match cap.as_ref() {
            Some(rec) if rec.thread != std::thread::current().id() => Err(Error::Capture {
                op: "queue work".into(),
                reason: "another thread is capturing a graph on this device".into(),
            }),
            _ => Ok(cap),
        }
    }

    /// An error if a capture is in progress (`op` cannot be part of a graph).
    fn refuse_in_capture(&self, op: &str) -> Result<()> {
        if lock(&self.capture).is_some() {
            return Err(Error::Capture {
                op: op.into(),
                reason: "not allowed while capturing a graph (allocation, host copies and \
                         synchronisation cannot be replayed)"
                    .into(),
            });
        }
        Ok(())
    }

    /// A new zero-filled allocation (counted).
    fn fresh(&self, bytes: usize) -> Result<Arc<Mem>> {
        self.refuse_in_capture("allocate")?;
        let buf = match &self.inner {
            DevInner::Cpu => BufInner::Cpu(cpu::CpuBuf::zeroed(bytes)?),
            DevInner::Cuda(c) => BufInner::Cuda(c.alloc_zeros(bytes)?),
        };
        self.counters
            .op(|| format!("memset {bytes} B (new allocation)"));
        Ok(self.counters.track(buf, bytes))
    }

    /// A new allocation with unspecified contents (no memset; poisoned with `0xFF` bytes on
    /// the CPU execution, not counted as a stream operation there).
    fn fresh_uninit(&self, bytes: usize) -> Result<Arc<Mem>> {
        self.refuse_in_capture("allocate")?;
        let buf = match &self.inner {
            DevInner::Cpu => {
                let b = cpu::CpuBuf::zeroed(bytes)?;
                b.fill_poison();
                BufInner::Cpu(b)
            }
            DevInner::Cuda(c) => BufInner::Cuda(c.alloc(bytes)?),
        };
        Ok(self.counters.track(buf, bytes))
    }

    /// The next slot of the workspace in scope (`None` outside a scope).
    fn slot(&self, bytes: usize, site: &'static Location<'static>) -> Result<Option<Arc<Mem>>> {
        lock(&self.workspaces).take(bytes, site, || self.fresh(bytes))
    }

    /// Zero-fills `m` (recorded during a capture on the CPU execution).
    fn zero(&self, m: &Arc<Mem>) -> Result<()> {
        self.own(m, "zero fill")?;
        // Held until the work is queued: a capture begun meanwhile on another thread must not
        // pick it up.
        let mut capture = self.recording()?;
        self.counters.op(|| format!("memset {} B", m.bytes()));
        if let Some(rec) = capture.as_mut() {
            rec.keep(m);
            if let DevInner::Cpu = self.inner {
                rec.ops.push(CpuOp::Zero(m.clone()));
                return Ok(());
            }
        }
        match (&self.inner, &m.buf) {
            (DevInner::Cpu, BufInner::Cpu(b)) => {
                b.fill_zero();
                Ok(())
            }
            (DevInner::Cuda(c), BufInner::Cuda(b)) => c.zero(b),
            _ => Err(foreign("zero fill")),
        }
    }

    /// `dst <- src`, same size (recorded during a capture on the CPU execution).
    fn copy_mem(&self, dst: &Arc<Mem>, src: &Arc<Mem>) -> Result<()> {
        self.own(dst, "copy")?;
        self.own(src, "copy")?;
        if dst.bytes() != src.bytes() {
            return Err(Error::ShapeMismatch {
                what: "device copy (bytes)",
                expected: dst.bytes(),
                got: src.bytes(),
            });
        }
        // Held until the work is queued: a capture begun meanwhile on another thread must not
        // pick it up.
        let mut capture = self.recording()?;
        self.counters
            .op(|| format!("copy {} B device to device", dst.bytes()));
        if let Some(rec) = capture.as_mut() {
            rec.keep(dst);
            rec.keep(src);
            if let DevInner::Cpu = self.inner {
                rec.ops.push(CpuOp::Copy {
                    dst: dst.clone(),
                    src: src.clone(),
                });
                return Ok(());
            }
        }
        match (&self.inner, &dst.buf, &src.buf) {
            (DevInner::Cpu, BufInner::Cpu(d), BufInner::Cpu(s)) => {
                d.copy_from(s);
                Ok(())
            }
            (DevInner::Cuda(c), BufInner::Cuda(d), BufInner::Cuda(s)) => c.copy_into(d, s),
            _ => Err(foreign("copy")),
        }
    }

    /// A zero-filled buffer of `len` elements (a reused slot inside a head's workspace).
    #[track_caller]
    pub fn alloc_zeros(&self, dtype: DType, len: usize) -> Result<Buffer> {
        let site = Location::caller();
        let bytes = len.checked_mul(dtype.size()).ok_or(Error::SizeOverflow {
            what: "buffer bytes",
        })?;
        let mem = match self.slot(bytes, site)? {
            Some(m) => {
                self.zero(&m)?;
                m
            }
            None => self.fresh(bytes)?,
        };
        Ok(Buffer { dtype, len, mem })
    }

    /// A buffer of `len` elements whose contents are unspecified (a reused slot inside a
    /// head's workspace): for outputs that a kernel overwrites completely, so that no memset
    /// is issued for them. No stream operation. On the CPU execution every such request is
    /// filled with `0xFF` bytes (NaN as `f32`/`f64`, `-1` as integers; not a stream
    /// operation), so a kernel that reads an element nobody wrote shows up as NaN in the
    /// tests rather than as a plausible zero.
    ///
    /// ```
    /// use implicit_etf::runtime::{DType, Device};
    /// let dev = Device::cpu();
    /// let before = dev.stream_ops();
    /// let buf = dev.alloc(DType::F64, 4).unwrap();
    /// assert_eq!(dev.stream_ops(), before); // no memset
    /// assert!(dev.download::<f64>(&buf).unwrap().iter().all(|v| v.is_nan())); // CPU poison
    /// ```
    #[track_caller]
    pub fn alloc(&self, dtype: DType, len: usize) -> Result<Buffer> {
        let site = Location::caller();
        let bytes = len.checked_mul(dtype.size()).ok_or(Error::SizeOverflow {
            what: "buffer bytes",
        })?;
        let mem = match lock(&self.workspaces).take(bytes, site, || self.fresh_uninit(bytes))? {
            Some(m) => {
                self.own(&m, "alloc")?;
                if let BufInner::Cpu(b) = &m.buf {
                    b.fill_poison();
                }
                m
            }
            None => self.fresh_uninit(bytes)?,
        };
        Ok(Buffer { dtype, len, mem })
    }

    /// A new buffer holding a copy of `data` (a reused slot inside a head's workspace). Not
    /// allowed during a capture.
    #[track_caller]
    pub fn upload<T: DeviceScalar>(&self, data: &[T]) -> Result<Buffer> {
        let site = Location::caller();
        self.refuse_in_capture("upload")?;
        let bytes: &[u8] = bytemuck::cast_slice(data);
        if let Some(mem) = self.slot(bytes.len(), site)? {
            self.write_mem(&mem, bytes, "upload")?;
            return Ok(Buffer {
                dtype: T::DTYPE,
                len: data.len(),
                mem,
            });
        }
        self.counters
            .op(|| format!("copy {} B host to device", bytes.len()));
        let buf = match &self.inner {
            DevInner::Cpu => {
                let b = cpu::CpuBuf::zeroed(bytes.len())?;
                b.write(bytes);
                BufInner::Cpu(b)
            }
            DevInner::Cuda(c) => BufInner::Cuda(c.upload(bytes)?),
        };
        Ok(Buffer {
            dtype: T::DTYPE,
            len: data.len(),
            mem: self.counters.track(buf, bytes.len()),
        })
    }

    /// Overwrites `buf` with `data` (same type and length): how a trainer refills the input
    /// buffers of a captured step between [`Graph::launch`]es. Not allowed during a capture.
    pub fn write<T: DeviceScalar>(&self, buf: &mut Buffer, data: &[T]) -> Result<()> {
        check_type::<T>(buf, "write")?;
        if data.len() != buf.len {
            return Err(Error::ShapeMismatch {
                what: "device write",
                expected: buf.len,
                got: data.len(),
            });
        }
        self.refuse_in_capture("write")?;
        self.write_mem(&buf.mem, bytemuck::cast_slice(data), "write")
    }

    /// Host bytes into an allocation of this device (of the same size).
    fn write_mem(&self, m: &Mem, bytes: &[u8], op: &str) -> Result<()> {
        self.own(m, op)?;
        self.counters
            .op(|| format!("copy {} B host to device", bytes.len()));
        if m.bytes() != bytes.len() {
            return Err(Error::ShapeMismatch {
                what: "device write (bytes)",
                expected: m.bytes(),
                got: bytes.len(),
            });
        }
        match (&self.inner, &m.buf) {
            (DevInner::Cpu, BufInner::Cpu(b)) => {
                b.write(bytes);
                Ok(())
            }
            (DevInner::Cuda(c), BufInner::Cuda(b)) => c.write(b, bytes),
            _ => Err(foreign(op)),
        }
    }

    /// Copies `buf` back to the host (waits for pending work). Not allowed during a capture.
    pub fn download<T: DeviceScalar>(&self, buf: &Buffer) -> Result<Vec<T>> {
        check_type::<T>(buf, "download")?;
        self.own(&buf.mem, "download")?;
        self.refuse_in_capture("download")?;
        self.counters
            .op(|| format!("copy {} B device to host", buf.bytes()));
        let mut out = vec![T::zeroed(); buf.len];
        let dst: &mut [u8] = bytemuck::cast_slice_mut(&mut out);
        match (&self.inner, &buf.mem.buf) {
            (DevInner::Cpu, BufInner::Cpu(b)) => b.read(dst),
            (DevInner::Cuda(c), BufInner::Cuda(b)) => c.read(b, dst)?,
            _ => return Err(foreign("download")),
        }
        Ok(out)
    }

    /// A new buffer with a copy of `buf`'s contents, device to device (a reused slot inside a
    /// head's workspace).
    #[track_caller]
    pub fn copy(&self, buf: &Buffer) -> Result<Buffer> {
        let site = Location::caller();
        self.own(&buf.mem, "copy")?;
        let mem = match self.slot(buf.bytes(), site)? {
            Some(m) => {
                self.copy_mem(&m, &buf.mem)?;
                m
            }
            None => {
                self.refuse_in_capture("copy to a new buffer")?;
                self.counters
                    .op(|| format!("copy {} B device to device", buf.bytes()));
                let inner = match (&self.inner, &buf.mem.buf) {
                    (DevInner::Cpu, BufInner::Cpu(b)) => BufInner::Cpu(b.clone_buf()?),
                    (DevInner::Cuda(c), BufInner::Cuda(b)) => BufInner::Cuda(c.copy(b)?),
                    _ => return Err(foreign("copy")),
                };
                self.counters.track(inner, buf.bytes())
            }
        };
        Ok(Buffer {
            dtype: buf.dtype,
            len: buf.len,
            mem,
        })
    }

    /// `dst <- src`, device to device, into an existing buffer of the same type and length
    /// (capturable: no allocation).
    pub fn copy_into(&self, dst: &mut Buffer, src: &Buffer) -> Result<()> {
        if dst.dtype != src.dtype {
            return Err(Error::Device {
                op: "copy_into".into(),
                message: format!("{:?} buffer into a {:?} buffer", src.dtype, dst.dtype),
                source: None,
            });
        }
        if dst.len != src.len {
            return Err(Error::ShapeMismatch {
                what: "copy_into",
                expected: dst.len,
                got: src.len,
            });
        }
        self.copy_mem(&dst.mem, &src.mem)
    }

    /// Launches `kernel` (its signature comes from [`crate::kernels`]; the typed wrappers
    /// there are the usual way in). The arguments are checked against its C signature:
    /// their count, every scalar type, every pointer's element type, and that every buffer
    /// belongs to this device (all typed errors). On CUDA the launch is asynchronous (errors of
    /// the kernel itself surface at [`Device::synchronize`] or the next download); on the CPU
    /// it runs to completion before returning. During a capture it is recorded instead (see
    /// [`graph`]).
    ///
    /// # Safety
    /// Sizes are not part of a C signature, so they cannot be checked here:
    /// - every buffer must hold at least as many elements as the kernel reads or writes at the
    ///   sizes passed as scalars and at this launch shape;
    /// - a buffer the kernel writes must not be read or written by another argument unless
    ///   the kernel allows that aliasing;
    /// - the launch shape must be one the kernel supports (block size, shared memory).
    pub unsafe fn launch(
        &self,
        kernel: &'static KernelSig,
        cfg: LaunchConfig,
        args: &[Arg<'_>],
    ) -> Result<()> {
        let sig = kernel;
        let name = sig.name;
        let bad = |message: String| Error::Device {
            op: format!("launch {name}"),
            message,
            source: None,
        };
        if args.len() != sig.params.len() {
            return Err(bad(format!(
                "takes {} arguments, got {}",
                sig.params.len(),
                args.len()
            )));
        }
        for (i, (p, a)) in sig.params.iter().zip(args).enumerate() {
            let ok = match (p, a) {
                (Param::Ptr { dtype, .. }, Arg::Buf(b)) => {
                    if b.dtype != *dtype {
                        return Err(bad(format!(
                            "argument {i}: kernel expects a {dtype:?} pointer, got a {:?} buffer",
                            b.dtype
                        )));
                    }
                    b.mem.owned_by(&self.counters)
                }
                (Param::Ptr { .. }, Arg::Null) => true,
                (Param::Scalar(DType::I32), Arg::I32(_))
                | (Param::Scalar(DType::U32), Arg::U32(_))
                | (Param::Scalar(DType::I64), Arg::I64(_))
                | (Param::Scalar(DType::U64), Arg::U64(_))
                | (Param::Scalar(DType::F32), Arg::F32(_))
                | (Param::Scalar(DType::F64), Arg::F64(_)) => true,
                _ => false,
            };
            if !ok {
                return Err(bad(format!(
                    "argument {i}: kernel expects {p:?}, got {a:?} (or a buffer of another device)"
                )));
            }
        }
        check_shape(&cfg, self.backend()).map_err(bad)?;
        // Held until the work is queued: a capture begun meanwhile on another thread must not
        // pick it up.
        let mut capture = self.recording()?;
        self.counters.op(|| name.to_string());
        if let Some(rec) = capture.as_mut() {
            for a in args {
                if let Arg::Buf(b) = a {
                    rec.keep(&b.mem);
                }
            }
            match &self.inner {
                DevInner::Cpu => {
                    let resolved = resolve(args, name, |m| match m {
                        BufInner::Cpu(b) => Some(b),
                        _ => None,
                    })?;
                    rec.ops.push(CpuOp::Launch {
                        name: cpu::c_name(name)?,
                        cfg,
                        slots: cpu::slots(&resolved),
                    });
                    return Ok(());
                }
                DevInner::Cuda(c) => rec.funcs.push(c.function(sig)?),
            }
        }
        match &self.inner {
            DevInner::Cpu => {
                let resolved = resolve(args, name, |m| match m {
                    BufInner::Cpu(b) => Some(b),
                    _ => None,
                })?;
                cpu::launch(name, cfg, &resolved)
            }
            DevInner::Cuda(c) => {
                let resolved = resolve(args, name, |m| match m {
                    BufInner::Cuda(b) => Some(b),
                    _ => None,
                })?;
                c.launch(sig, cfg, &resolved)
            }
        }
    }

    /// Starts capturing this device's work into a [`Graph`] (see [`graph`]): until
    /// [`end_capture`](Self::end_capture), launches and device-side copies are recorded, not
    /// run, and allocation, uploads, downloads and synchronisation are refused with a typed
    /// error. Errors: a capture already in progress; on a GPU, the legacy default stream (a
    /// [`Device::cuda_on_stream`] of `ctx.default_stream()`) or cudarc's event tracking on.
    ///
    /// ```
    /// use implicit_etf::kernels::elementwise::ops::add_assign_f32;
    /// use implicit_etf::runtime::{Device, LaunchConfig};
    /// let dev = Device::cpu();
    /// let mut x = dev.upload(&[1.0f32, 2.0]).unwrap();
    /// let y = dev.upload(&[10.0f32, 20.0]).unwrap();
    /// dev.begin_capture().unwrap();
    /// let cfg = LaunchConfig::new((1, 1, 1), (32, 1, 1));
    /// // SAFETY: `x` and `y` hold the 2 elements the kernel adds.
    /// unsafe { add_assign_f32(&dev, cfg, &mut x, &y, 2) }.unwrap();
    /// let graph = dev.end_capture().unwrap();
    /// assert_eq!(dev.download::<f32>(&x).unwrap(), [1.0, 2.0]); // recorded, not run
    /// graph.launch().unwrap();
    /// graph.launch().unwrap();
    /// assert_eq!(dev.download::<f32>(&x).unwrap(), [21.0, 42.0]);
    /// dev.write(&mut x, &[0.5f32, 0.5]).unwrap(); // new inputs, same graph
    /// graph.launch().unwrap();
    /// assert_eq!(dev.download::<f32>(&x).unwrap(), [10.5, 20.5]);
    /// ```
    pub fn begin_capture(&self) -> Result<()> {
        let mut cap = lock(&self.capture);
        if cap.is_some() {
            return Err(Error::Capture {
                op: "begin_capture".into(),
                reason: "a capture is already in progress on this device".into(),
            });
        }
        if let DevInner::Cuda(c) = &self.inner {
            c.begin_capture()?;
        }
        *cap = Some(Recording::new(self.counters.stats()));
        Ok(())
    }

    /// Whether a capture is in progress.
    pub fn is_capturing(&self) -> bool {
        lock(&self.capture).is_some()
    }

    /// Ends the capture and returns the [`Graph`]. Errors: no capture in progress; a buffer
    /// was released during the capture (its memory could be reused while the graph still
    /// addresses it); on a GPU, a capture the driver invalidated; a call from another thread
    /// than the one that began the capture (the capture goes on).
    pub fn end_capture(&self) -> Result<Graph> {
        let rec = self
            .recording()
            .map_err(|_| Error::Capture {
                op: "end_capture".into(),
                reason: "the capture was begun on another thread".into(),
            })?
            .take()
            .ok_or_else(|| Error::Capture {
                op: "end_capture".into(),
                reason: "no capture in progress".into(),
            })?;
        let kind = match &self.inner {
            DevInner::Cpu => GraphKind::Cpu(rec.ops),
            DevInner::Cuda(c) => GraphKind::Cuda(c.end_capture()?),
        };
        let now = self.counters.stats();
        if now != rec.start {
            return Err(Error::Capture {
                op: "end_capture".into(),
                reason: format!(
                    "{} allocations were released during the capture; a replayable step must \
                     not free memory (DeviceHead::forward_into / backward_into keep theirs)",
                    now.released - rec.start.released
                ),
            });
        }
        Ok(Graph {
            kind,
            counters: self.counters.clone(),
            keep: rec.keep,
            funcs: rec.funcs,
        })
    }

    /// Waits for all launched work; reports asynchronous kernel errors. Not allowed during a
    /// capture.
    pub fn synchronize(&self) -> Result<()> {
        self.refuse_in_capture("synchronize")?;
        match &self.inner {
            DevInner::Cpu => Ok(()),
            DevInner::Cuda(c) => c.synchronize(),
        }
    }
}

fn check_type<T: DeviceScalar>(buf: &Buffer, op: &str) -> Result<()> {
    if buf.dtype != T::DTYPE {
        return Err(Error::Device {
            op: op.into(),
            message: format!("buffer holds {:?}, asked for {:?}", buf.dtype, T::DTYPE),
            source: None,
        });
    }
    Ok(())
}

/// Most dynamic shared memory one launch may ask for: 227 KiB, Hopper's opt-in maximum per
/// block. A launch above 48 KiB (the default limit) opts in on a GPU (the function attribute
/// `CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES`), which fails on a GPU with less; ask
/// [`Device::max_shared_bytes`] first.
pub const MAX_DYNAMIC_SHARED_BYTES: u32 = 227 * 1024;

/// Most blocks one launch may have on the CPU execution, which runs blocks one after another
/// on host threads (a block costs microseconds there): beyond it a launch would run for hours.
/// The head stays below it for batches of up to `2^24` rows.
pub const CPU_MAX_LAUNCH_BLOCKS: u64 = 1 << 24;
/// Most threads one launch may run on the CPU execution (see [`CPU_MAX_LAUNCH_BLOCKS`]).
pub const CPU_MAX_LAUNCH_THREADS: u64 = 1 << 29;

/// A launch shape within CUDA's limits (grid `x < 2^31`, `y`, `z <= 65535`; a block of at
/// most 1024 threads, `z <= 64`; no zero dimension; at most [`MAX_DYNAMIC_SHARED_BYTES`] of
/// dynamic shared memory, see [`Device::max_shared_bytes`] for what a GPU takes),
/// and on the CPU execution within [`CPU_MAX_LAUNCH_BLOCKS`] and [`CPU_MAX_LAUNCH_THREADS`].
fn check_shape(cfg: &LaunchConfig, backend: Backend) -> std::result::Result<(), String> {
    let (g, b) = (cfg.grid, cfg.block);
    if g.0 == 0 || g.1 == 0 || g.2 == 0 {
        return Err(format!("zero-sized grid {g:?}"));
    }
    if b.0 == 0 || b.1 == 0 || b.2 == 0 {
        return Err(format!("zero-sized block {b:?}"));
    }
    if g.0 > i32::MAX as u32 || g.1 > 65535 || g.2 > 65535 {
        return Err(format!(
            "grid {g:?} exceeds CUDA's limits (2^31 - 1, 65535, 65535)"
        ));
    }
    let threads = u64::from(b.0) * u64::from(b.1) * u64::from(b.2);
    if threads > 1024 || b.2 > 64 {
        return Err(format!("block {b:?} exceeds 1024 threads (or z > 64)"));
    }
    if cfg.shared_bytes > MAX_DYNAMIC_SHARED_BYTES {
        return Err(format!(
            "dynamic shared memory {} bytes exceeds the {} KiB limit",
            cfg.shared_bytes,
            MAX_DYNAMIC_SHARED_BYTES / 1024
        ));
    }
    let blocks = u64::from(g.0) * u64::from(g.1) * u64::from(g.2);
    let total = threads * blocks;
    if backend == Backend::Cpu && (blocks > CPU_MAX_LAUNCH_BLOCKS || total > CPU_MAX_LAUNCH_THREADS)
    {
        return Err(format!(
            "{blocks} blocks of {threads} threads exceed the CPU execution's limits \
             ({CPU_MAX_LAUNCH_BLOCKS} blocks, {CPU_MAX_LAUNCH_THREADS} threads per launch)"
        ));
    }
    Ok(())
}

/// The arguments of a launch with every buffer as the backend's own type (`pick`), scalars and
/// null pointers as their parameter slots.
fn resolve<'a, B>(
    args: &[Arg<'a>],
    kernel: &str,
    pick: impl Fn(&'a BufInner) -> Option<&'a B>,
) -> Result<Vec<types::BackendArg<'a, B>>> {
    args.iter()
        .map(|a| match a {
            Arg::Buf(b) => pick(&b.mem.buf)
                .map(types::BackendArg::Buf)
                .ok_or_else(|| foreign(&format!("launch {kernel}"))),
            scalar => Ok(types::BackendArg::Slot(scalar.scalar_slot().unwrap_or(0))),
        })
        .collect()
}

fn foreign(op: &str) -> Error {
    Error::Device {
        op: op.into(),
        message: "the buffer belongs to another device".into(),
        source: None,
    }
}
