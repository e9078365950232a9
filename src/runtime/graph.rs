//! Capturing device work once and replaying it: CUDA graphs on a GPU, and the same contract
//! on the CPU execution (so that CI tests what a captured head step does).
//!
//! Between [`Device::begin_capture`](super::Device::begin_capture) and
//! [`Device::end_capture`](super::Device::end_capture) kernel launches, device-side copies
//! and zero fills are *recorded, not run*; [`Graph::launch`] then runs the whole recording
//! with one call, as often as wanted, on the buffers it was recorded with (their contents
//! may change between launches: that is how a trainer feeds the next batch). What a CUDA
//! graph cannot hold is refused during capture with a typed error: allocating, uploading,
//! downloading and synchronising; releasing a buffer is detected and makes `end_capture`
//! fail. A [`Graph`] keeps every buffer it touches and, on a GPU, every kernel module it
//! calls alive, so a launch never touches freed memory or unloaded code, on either backend,
//! even after the device (or the head) that recorded it is dropped.
//!
//! On a GPU the capture is a cudarc stream capture (`CU_STREAM_CAPTURE_MODE_THREAD_LOCAL`)
//! of the device's stream, which must be a caller's non-default stream
//! ([`Device::cuda_on_stream`](super::Device::cuda_on_stream)) in a context with cudarc's
//! event tracking off (a capture must not wait on events recorded outside it); begin and end
//! it on the same thread.

use super::memory::{BufInner, Mem};
use super::{cpu, cuda, LaunchConfig};
use crate::error::Result;
use std::ffi::CString;
use std::sync::Arc;

/// One recorded operation of the CPU execution.
#[derive(Debug)]
pub(super) enum CpuOp {
    /// A kernel launch with its parameter slots (pointers already resolved).
    Launch {
        name: CString,
        cfg: LaunchConfig,
        slots: Vec<u64>,
    },
    /// Fill with zero bytes.
    Zero(Arc<Mem>),
    /// `dst <- src` (same size).
    Copy { dst: Arc<Mem>, src: Arc<Mem> },
}

/// A capture in progress.
#[derive(Debug)]
pub(super) struct Recording {
    /// The device's counters when the capture began.
    pub(super) start: super::MemoryStats,
    /// Every allocation the recorded work touches.
    pub(super) keep: Vec<Arc<Mem>>,
    /// The CPU execution's recorded operations (empty on CUDA, where the driver records).
    pub(super) ops: Vec<CpuOp>,
    /// On CUDA, the kernels launched (each holds its module, so the graph's code stays
    /// loaded for as long as the graph lives, even after the device is dropped).
    pub(super) funcs: Vec<cuda::Function>,
    /// The thread that began the capture: only it may queue work until the capture ends.
    pub(super) thread: std::thread::ThreadId,
}

impl Recording {
    pub(super) fn new(start: super::MemoryStats) -> Recording {
        Recording {
            thread: std::thread::current().id(),
            start,
            keep: Vec::new(),
            ops: Vec::new(),
            funcs: Vec::new(),
        }
    }

    /// Keeps `m` alive for as long as the graph lives (once per allocation).
    pub(super) fn keep(&mut self, m: &Arc<Mem>) {
        if !self.keep.iter().any(|k| Arc::ptr_eq(k, m)) {
            self.keep.push(m.clone());
        }
    }
}

pub(super) enum GraphKind {
    Cpu(Vec<CpuOp>),
    Cuda(cuda::Graph),
}

/// Recorded device work, replayed by [`launch`](Graph::launch). Made by
/// [`Device::end_capture`](super::Device::end_capture); see the [module documentation](self).
/// Not `Send`: CUDA graphs must not be used from several threads at once.
pub struct Graph {
    pub(super) kind: GraphKind,
    pub(super) keep: Vec<Arc<Mem>>,
    /// The recording device's counters (a launch is one stream operation).
    pub(super) counters: Arc<super::memory::Counters>,
    /// Held only to be dropped after `kind` (fields drop in declaration order): the CUDA
    /// graph goes before the modules it calls.
    #[allow(dead_code)]
    pub(super) funcs: Vec<cuda::Function>,
}

impl std::fmt::Debug for Graph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.kind {
            GraphKind::Cpu(ops) => write!(f, "Graph(CPU execution, {} operations", ops.len())?,
            GraphKind::Cuda(_) => write!(f, "Graph(CUDA")?,
        }
        write!(f, ", {} buffers)", self.keep.len())
    }
}

impl Graph {
    /// Runs the recorded work once: on a GPU one `cuGraphLaunch` on the device's stream
    /// (asynchronous, ordered with the stream's other work); on the CPU execution every
    /// recorded operation in order, to completion.
    pub fn launch(&self) -> Result<()> {
        self.counters.op(|| "graph launch".into());
        match &self.kind {
            GraphKind::Cuda(g) => cuda::launch_graph(g),
            GraphKind::Cpu(ops) => {
                for op in ops {
                    match op {
                        CpuOp::Launch { name, cfg, slots } => {
                            cpu::launch_slots(name, *cfg, &mut slots.clone())?
                        }
                        CpuOp::Zero(m) => {
                            if let BufInner::Cpu(b) = &m.buf {
                                b.fill_zero();
                            }
                        }
                        CpuOp::Copy { dst, src } => {
                            if let (BufInner::Cpu(d), BufInner::Cpu(s)) = (&dst.buf, &src.buf) {
                                d.copy_from(s);
                            }
                        }
                    }
                }
                Ok(())
            }
        }
    }

    /// Operations recorded (CPU execution), or `None` on a GPU (the driver holds them).
    pub fn recorded_ops(&self) -> Option<usize> {
        match &self.kind {
            GraphKind::Cpu(ops) => Some(ops.len()),
            GraphKind::Cuda(_) => None,
        }
    }

    /// Distinct buffers the graph reads or writes (kept alive by it).
    pub fn buffers(&self) -> usize {
        self.keep.len()
    }
}
