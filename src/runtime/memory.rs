//! Device memory bookkeeping: the shared allocation behind a [`Buffer`](super::Buffer),
//! counters of what a [`Device`](super::Device) created and released, and the workspaces
//! that make a head's steady-state step allocation-free.
//!
//! **Why workspaces.** A training step needs a few dozen intermediate buffers. Allocating
//! and freeing them every step is cheap with CUDA's stream-ordered allocator, but it stops a
//! step from being captured in a CUDA graph: during capture, `cuMemFreeAsync` accepts only
//! allocations made by the same graph, and a graph that allocates memory it does not free
//! cannot be launched again. So a head runs each stage inside a *workspace scope*
//! (`Device::workspace`, crate-internal): the `n`-th scratch request of the scope
//! (`alloc_zeros`, `copy` or `upload`) gets the `n`-th slot of that workspace, allocated on the first
//! step and reused by every later step with the same shapes (the request sequence of a step
//! depends only on `N`, `d`, `K` and the options). Reuse means no allocation and no free;
//! a slot whose size no longer matches (a new batch size) is replaced.
//!
//! A slot also remembers the source line of its request (`#[track_caller]` on the
//! allocating calls): a later step reuses slot `n` only for a request of the same size from
//! the same line, so a step whose requests differ gets fresh memory rather than a buffer meant
//! for another request (and, during a capture, the typed error that allocation is). The
//! resulting plan, every slot with its size and line, is [`Device::workspace_plan`](super::Device::workspace_plan).
//!
//! A buffer handed out from a slot *aliases* the slot: the next scope of the same workspace
//! overwrites it. The head therefore alternates two forward workspaces (the previous step's
//! saved tensors stay intact while a new step runs, and while a failed step is rejected) and
//! never hands a slot buffer over to the caller (logits and gradients go to caller-owned
//! buffers; `DeviceHead::last_solution` lends slot buffers, which the next steps, or the
//! replays of a captured step, overwrite).

use super::{cpu, cuda};
use std::panic::Location;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// The backend allocation.
#[derive(Debug)]
pub(super) enum BufInner {
    Cpu(cpu::CpuBuf),
    Cuda(cuda::CudaBuf),
    /// Moved out to a caller (`Device::into_cuda_slice`); never seen by a live `Buffer`.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    Moved,
}

/// One allocation, shared by a [`Buffer`](super::Buffer) and, for workspace slots, by the
/// workspace. Counts its release on the device that created it.
#[derive(Debug)]
pub(super) struct Mem {
    pub(super) buf: BufInner,
    bytes: usize,
    counters: Arc<Counters>,
}

impl Mem {
    pub(super) fn bytes(&self) -> usize {
        self.bytes
    }
    /// Whether the device with these counters created this allocation.
    pub(super) fn owned_by(&self, counters: &Arc<Counters>) -> bool {
        Arc::ptr_eq(&self.counters, counters)
    }
}

impl Drop for Mem {
    fn drop(&mut self) {
        self.counters.released.fetch_add(1, Ordering::Relaxed);
    }
}

/// Counters of one device.
#[derive(Debug, Default)]
pub(super) struct Counters {
    created: AtomicU64,
    released: AtomicU64,
    /// Stream operations issued (kernel launches, memsets, copies, graph launches).
    ops: AtomicU64,
    /// When on, the name of every stream operation, in issue order (diagnostics).
    trace: std::sync::Mutex<Option<Vec<String>>>,
}

impl Counters {
    /// Wraps a new allocation (counted as created).
    pub(super) fn track(self: &Arc<Self>, buf: BufInner, bytes: usize) -> Arc<Mem> {
        self.created.fetch_add(1, Ordering::Relaxed);
        Arc::new(Mem {
            buf,
            bytes,
            counters: self.clone(),
        })
    }

    /// Counts one stream operation; `what` names it in the trace, if one is on.
    pub(super) fn op(&self, what: impl FnOnce() -> String) {
        self.ops.fetch_add(1, Ordering::Relaxed);
        let mut t = self.trace.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(v) = t.as_mut() {
            v.push(what());
        }
    }

    /// Stream operations issued so far.
    pub(super) fn ops(&self) -> u64 {
        self.ops.load(Ordering::Relaxed)
    }

    /// Turns the trace on (emptied) or off; returns what it held.
    pub(super) fn set_trace(&self, on: bool) -> Vec<String> {
        let mut t = self.trace.lock().unwrap_or_else(|p| p.into_inner());
        let old = t.take().unwrap_or_default();
        if on {
            *t = Some(Vec::new());
        }
        old
    }

    pub(super) fn stats(&self) -> MemoryStats {
        MemoryStats {
            created: self.created.load(Ordering::Relaxed),
            released: self.released.load(Ordering::Relaxed),
        }
    }
}

/// How many allocations a [`Device`](super::Device) has created (allocated, uploaded,
/// copied to a new buffer, or adopted from a caller) and released (freed, or moved out to
/// a caller), since it was made. Two snapshots around a piece of work tell whether it
/// allocated or freed device memory; a step that does neither can be captured in a CUDA
/// graph and replayed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MemoryStats {
    /// Allocations created.
    pub created: u64,
    /// Allocations released.
    pub released: u64,
}

impl MemoryStats {
    /// Allocations alive now.
    pub fn live(&self) -> u64 {
        self.created - self.released
    }
}

/// A workspace: reusable slots, handed out in request order. Each slot remembers the source
/// line that requested it: a later step reuses slot `i` only for a request of the same size
/// from the same line, so a stage whose requests change (an edited stage, a branch taken on
/// one step and not the next) gets fresh memory instead of another request's buffer, and the
/// plan of a workspace can be read back ([`super::Device::workspace_plan`]).
#[derive(Debug, Default)]
struct Arena {
    slots: Vec<(Arc<Mem>, &'static Location<'static>)>,
    next: usize,
}

/// One slot of a head's workspace: which line of the crate requests it, and its size. The
/// slots of one workspace, in order, are a step's scratch plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlanEntry {
    /// The workspace (a head numbers its own: forward A and B, backward, first step).
    pub workspace: usize,
    /// Position of the request in the scope.
    pub slot: usize,
    /// Bytes.
    pub bytes: usize,
    /// The source line of the request.
    pub site: &'static Location<'static>,
}

/// The workspaces of one device and the one in scope.
#[derive(Debug, Default)]
pub(super) struct Workspaces {
    active: Option<usize>,
    arenas: Vec<Arena>,
}

impl Workspaces {
    /// Enters workspace `id` (restarting its slot sequence); returns the previous scope.
    pub(super) fn enter(&mut self, id: usize) -> Option<usize> {
        if self.arenas.len() <= id {
            self.arenas.resize_with(id + 1, Arena::default);
        }
        self.arenas[id].next = 0;
        self.active.replace(id)
    }

    /// Restores the scope `prev` (returned by [`enter`](Self::enter)).
    pub(super) fn leave(&mut self, prev: Option<usize>) {
        self.active = prev;
    }

    /// The next slot of the workspace in scope, if any, of exactly `bytes` bytes (made by
    /// `fresh` when the slot is new or its size changed). `Ok(None)` outside a scope.
    pub(super) fn take<E>(
        &mut self,
        bytes: usize,
        site: &'static Location<'static>,
        fresh: impl FnOnce() -> Result<Arc<Mem>, E>,
    ) -> Result<Option<Arc<Mem>>, E> {
        let Some(id) = self.active else {
            return Ok(None);
        };
        let arena = &mut self.arenas[id];
        let i = arena.next;
        match arena.slots.get(i) {
            Some((m, s)) if m.bytes() == bytes && *s == site => {}
            Some(_) => arena.slots[i] = (fresh()?, site),
            None => arena.slots.push((fresh()?, site)),
        }
        arena.next += 1;
        Ok(Some(arena.slots[i].0.clone()))
    }

    /// Every slot of every workspace, in order.
    pub(super) fn plan(&self) -> Vec<PlanEntry> {
        let mut v = Vec::new();
        for (workspace, a) in self.arenas.iter().enumerate() {
            for (slot, (m, site)) in a.slots.iter().enumerate() {
                v.push(PlanEntry {
                    workspace,
                    slot,
                    bytes: m.bytes(),
                    site,
                });
            }
        }
        v
    }

    /// Drops workspace `id`'s slots (their memory is freed once no buffer aliases them).
    pub(super) fn clear(&mut self, id: usize) {
        if let Some(a) = self.arenas.get_mut(id) {
            a.slots.clear();
            a.next = 0;
        }
    }

    /// Bytes held by all workspaces.
    pub(super) fn bytes(&self) -> usize {
        self.arenas
            .iter()
            .flat_map(|a| a.slots.iter())
            .map(|(m, _)| m.bytes())
            .sum()
    }
}
