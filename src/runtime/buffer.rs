//! Device buffers: element types, the host types that map to them, and the typed allocation
//! a [`Device`](super::Device) hands out.

use super::memory::Mem;
use std::sync::Arc;

/// Element type of a [`Buffer`] (and of kernel pointer / scalar parameters).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    /// `float`
    F32,
    /// `double`
    F64,
    /// `__half`
    F16,
    /// `__nv_bfloat16`
    BF16,
    /// `int`
    I32,
    /// `unsigned int`
    U32,
    /// `long long`
    I64,
    /// `unsigned long long`
    U64,
    /// `unsigned char`
    U8,
}

impl DType {
    /// Size of one element in bytes.
    pub fn size(self) -> usize {
        match self {
            DType::F64 | DType::I64 | DType::U64 => 8,
            DType::F32 | DType::I32 | DType::U32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::U8 => 1,
        }
    }
}

/// A host type that has a device [`DType`].
pub trait DeviceScalar: bytemuck::Pod {
    /// Its device element type.
    const DTYPE: DType;
}
macro_rules! scalar {
    ($t:ty, $d:ident) => {
        impl DeviceScalar for $t {
            const DTYPE: DType = DType::$d;
        }
    };
}
scalar!(f32, F32);
scalar!(f64, F64);
scalar!(half::f16, F16);
scalar!(half::bf16, BF16);
scalar!(i32, I32);
scalar!(u32, U32);
scalar!(i64, I64);
scalar!(u64, U64);
scalar!(u8, U8);

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
        Buffer {
            dtype: self.dtype,
            len: self.len,
            mem: self.mem.clone(),
        }
    }
}
