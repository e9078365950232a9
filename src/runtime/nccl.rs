//! The NCCL implementation of `Collective` (`crate::collective`): one rank per GPU, through cudarc's `nccl`
//! bindings, with `libnccl` loaded at run time like the driver (a build needs no NCCL).
//!
//! A communicator is made from an [`NcclId`] (made by rank 0, passed to the others: see
//! `crate::collective::rendezvous` for the environment-variable helper) and a rank, on the [`Device`]'s
//! own stream: every all-reduce is queued there, after the head's kernels and before the
//! next, with no host synchronisation, and can be captured in a CUDA graph.

use std::sync::Mutex;

use cudarc::nccl::{result as nccl, sys};

use super::memory::BufInner;
use super::{cuda, Buffer, DType, DevInner, Device};
use crate::error::{Error, Result};

/// NCCL's library name (`libnccl.so`, `libnccl.so.2` needs a `libnccl.so` link beside it, as
/// cudarc loads it; `scripts/gpu-check.sh` makes one).
const NCCL: &[&str] = &["nccl"];

/// Whether `libnccl` can be loaded.
pub fn nccl_available() -> bool {
    cuda::lib_present(NCCL)
}

fn nccl_error(op: &'static str, e: nccl::NcclError) -> Error {
    Error::Collective {
        op,
        reason: format!("NCCL: {e:?}"),
    }
}

fn no_nccl() -> Error {
    Error::Collective {
        op: "NCCL",
        reason: "libnccl cannot be loaded (not installed, or not on the library path as \
                 libnccl.so)"
            .into(),
    }
}

/// An NCCL unique id: the 128 bytes rank 0 makes ([`NcclId::new`]) and every rank passes to
/// [`crate::Collective::nccl`].
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct NcclId(pub [u8; 128]);

impl std::fmt::Debug for NcclId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NcclId({})", self.to_hex())
    }
}

impl NcclId {
    /// A new id (rank 0 makes it; needs `libnccl`).
    pub fn new() -> Result<NcclId> {
        if !nccl_available() {
            return Err(no_nccl());
        }
        let id = nccl::get_uniqueid().map_err(|e| nccl_error("ncclGetUniqueId", e))?;
        let mut out = [0u8; 128];
        for (o, &c) in out.iter_mut().zip(id.internal.iter()) {
            *o = c as u8;
        }
        Ok(NcclId(out))
    }

    /// The id as 256 hex digits (to write to a file or an environment variable).
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Parses [`to_hex`](Self::to_hex)'s text.
    pub fn from_hex(s: &str) -> Result<NcclId> {
        let s = s.trim();
        let bad = || Error::InvalidParameter {
            name: "NCCL id",
            reason: format!("expected 256 hex digits, got {} characters", s.len()),
        };
        if s.len() != 256 || !s.is_ascii() {
            return Err(bad());
        }
        let mut out = [0u8; 128];
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
        }
        Ok(NcclId(out))
    }
}

/// The raw communicator.
struct CommPtr(sys::ncclComm_t);

// SAFETY: an NCCL communicator may be used from any thread as long as calls on it are not
// concurrent; `NcclComm` keeps it behind a mutex, so every call holds the lock.
unsafe impl Send for CommPtr {}

/// One rank's NCCL communicator.
pub(crate) struct NcclComm {
    comm: Mutex<CommPtr>,
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        let c = self.comm.get_mut().unwrap_or_else(|p| p.into_inner());
        // SAFETY: the communicator was made by `comm_init_rank` and is destroyed once, here;
        // nothing uses it afterwards. Errors at teardown are ignored (nothing to report to).
        let _ = unsafe { nccl::comm_destroy(c.0) };
    }
}

impl NcclComm {
    /// All-reduce (sum) of `buf` in place on `dev`'s stream.
    pub(crate) fn all_reduce(&self, dev: &Device, buf: &mut Buffer) -> Result<()> {
        dev.own(&buf.mem, "NCCL all-reduce")?;
        let ty = match buf.dtype() {
            DType::F32 => sys::ncclDataType_t::ncclFloat32,
            DType::F64 => sys::ncclDataType_t::ncclFloat64,
            other => {
                return Err(Error::InvalidParameter {
                    name: "buffer",
                    reason: format!("all-reduce takes f32 or f64 buffers, got {other:?}"),
                })
            }
        };
        let (DevInner::Cuda(c), BufInner::Cuda(b)) = (&dev.inner, &buf.mem.buf) else {
            return Err(Error::Collective {
                op: "NCCL all-reduce",
                reason: "an NCCL group reduces CUDA buffers of a CUDA device".into(),
            });
        };
        let count = buf.len();
        dev.counters
            .op(|| format!("NCCL all-reduce {} B", count * buf.dtype().size()));
        let comm = self.comm.lock().unwrap_or_else(|p| p.into_inner());
        let stream = c.stream();
        cuda::with_ptrs(stream, &[(b, true)], |p| {
            // SAFETY: `p[0]` addresses `count` elements of type `ty` (the buffer's length and
            // type), reduced in place; the operation is queued on the device's stream, which
            // orders it with every kernel reading or writing the buffer; the communicator is
            // held locked for the call.
            unsafe {
                nccl::all_reduce(
                    p[0] as *const std::ffi::c_void,
                    p[0] as *mut std::ffi::c_void,
                    count,
                    ty,
                    sys::ncclRedOp_t::ncclSum,
                    comm.0,
                    stream.cu_stream() as sys::cudaStream_t,
                )
            }
        })
        .map(|_| ())
        .map_err(|e| nccl_error("ncclAllReduce", e))
    }
}

impl NcclComm {
    /// Joins rank `rank` of a `world_size`-rank group (see `crate::Collective::nccl`).
    pub(crate) fn new(
        dev: &Device,
        id: &NcclId,
        rank: usize,
        world_size: usize,
    ) -> Result<NcclComm> {
        if rank >= world_size {
            return Err(Error::InvalidParameter {
                name: "rank",
                reason: format!("rank {rank} is not below the world size {world_size}"),
            });
        }
        let DevInner::Cuda(c) = &dev.inner else {
            return Err(Error::Collective {
                op: "NCCL",
                reason: "an NCCL group needs a CUDA device, not the CPU execution".into(),
            });
        };
        if !nccl_available() {
            return Err(no_nccl());
        }
        let (r, w) = (
            i32::try_from(rank).map_err(|_| no_fit("rank"))?,
            i32::try_from(world_size).map_err(|_| no_fit("world_size"))?,
        );
        let mut internal = [0 as std::ffi::c_char; 128];
        for (o, &b) in internal.iter_mut().zip(id.0.iter()) {
            *o = b as std::ffi::c_char;
        }
        // NCCL binds the communicator to the current device: the device's context.
        c.stream()
            .context()
            .bind_to_thread()
            .map_err(|e| Error::Device {
                op: "bind context".into(),
                message: e.to_string(),
                source: Some(crate::error::DeviceSource::new(e)),
            })?;
        let mut comm = std::mem::MaybeUninit::uninit();
        // SAFETY: `comm` is written by a successful `ncclCommInitRank` before it is read;
        // the id is 128 bytes as NCCL defines it.
        let comm = unsafe {
            nccl::comm_init_rank(comm.as_mut_ptr(), w, sys::ncclUniqueId { internal }, r)
                .map_err(|e| nccl_error("ncclCommInitRank", e))?;
            comm.assume_init()
        };
        Ok(NcclComm {
            comm: Mutex::new(CommPtr(comm)),
        })
    }
}

fn no_fit(name: &'static str) -> Error {
    Error::InvalidParameter {
        name,
        reason: "does not fit an i32".into(),
    }
}
