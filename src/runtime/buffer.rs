//! Device buffers: element types, the host types that map to them, and the typed allocation
//! a [`Device`](super::Device) hands out.

use super::memory::Mem;
use super::types::DType;
use std::sync::Arc;

/// A typed device allocation (`len` elements of `dtype`).
#[derive(Debug)]
pub struct Buffer {
    pub(super) dtype: DType,
    pub(super) len: usize,
    /// The allocation; shared with a head's workspace (see [`memory`]), a [`Graph`] that
    /// uses it, or a head's second handle to the same tensor.
    pub(super) mem: Arc<Mem>,
}

impl Buffer {
    /// Element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    /// Number of elements.
    pub fn len(&self) -> usize {
        self.len
    }
    /// `true` when it holds no element.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Size in bytes.
    pub fn bytes(&self) -> usize {
        self.len * self.dtype.size()
    }
    /// A second handle to the same memory (no copy): for a head keeping a tensor in two
    /// places (e.g. `Y` in the pending backward and in the last solve).
    pub(crate) fn share(&self) -> Buffer {
        self.prefix(self.len)
    }

    /// A handle to the first `len <= self.len()` elements (no copy): for a kernel or product
    /// that reads or fills the front of a larger buffer (a data-parallel step's packed one).
    pub(crate) fn prefix(&self, len: usize) -> Buffer {
        debug_assert!(len <= self.len);
        Buffer {
            dtype: self.dtype,
            len: len.min(self.len),
            mem: self.mem.clone(),
        }
    }
}
