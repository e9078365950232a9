//! The runtime's plain data types, which every other runtime file may use (and which use
//! nothing of them): element types, kernel signatures, launch shapes, and a launch argument as
//! a backend sees it.

/// Element type of a [`Buffer`](super::Buffer) (and of kernel pointer / scalar parameters).
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

/// A kernel parameter kind, as parsed from the C signature by `build.rs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Param {
    /// A pointer to `dtype` elements (`writable`: not `const`).
    Ptr {
        /// Element type.
        dtype: DType,
        /// `false` for `const T*`.
        writable: bool,
    },
    /// A scalar passed by value.
    Scalar(DType),
}

/// Signature of one kernel of `kernels/*.cu`.
#[derive(Debug, Clone, Copy)]
pub struct KernelSig {
    /// The `extern "C"` name.
    pub name: &'static str,
    /// The source file it is compiled from.
    pub file: &'static KernelFile,
    /// Parameters in order.
    pub params: &'static [Param],
}

/// One CUDA source file as embedded by `build.rs`: a module the runtime loads once per device.
#[derive(Debug, Clone, Copy)]
pub struct KernelFile {
    /// Its path under `kernels/`, without `.cu` (unique; the module's key).
    pub name: &'static str,
    /// Self-contained source (local includes inlined), for NVRTC.
    pub source: &'static str,
    /// PTX for `compute_75`, if `nvcc` was available.
    pub ptx: Option<&'static str>,
    /// `sm_90` cubin, if `nvcc` was available.
    pub cubin_sm90: Option<&'static [u8]>,
}

/// Launch shape: like `cuLaunchKernel`'s grid, block and dynamic shared memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LaunchConfig {
    /// Blocks per grid (x, y, z).
    pub grid: (u32, u32, u32),
    /// Threads per block (x, y, z).
    pub block: (u32, u32, u32),
    /// Dynamic shared memory per block, in bytes (at most
    /// [`MAX_DYNAMIC_SHARED_BYTES`](super::MAX_DYNAMIC_SHARED_BYTES); above 48 KiB only where
    /// [`Device::max_shared_bytes`](super::Device::max_shared_bytes) allows).
    pub shared_bytes: u32,
}

impl LaunchConfig {
    /// A 1-D launch of `ceil(n / block)` blocks of `block` threads.
    /// A `block` of 0 gives a zero-sized block, which the launch refuses (a typed error); a
    /// grid too large for a `u32` saturates, which the launch refuses too.
    pub fn linear(n: usize, block: u32) -> Self {
        let blocks = n.div_ceil(block.max(1) as usize).max(1);
        LaunchConfig {
            grid: (u32::try_from(blocks).unwrap_or(u32::MAX), 1, 1),
            block: (block, 1, 1),
            shared_bytes: 0,
        }
    }
    /// `grid` x `block` with no dynamic shared memory.
    pub fn new(grid: (u32, u32, u32), block: (u32, u32, u32)) -> Self {
        LaunchConfig {
            grid,
            block,
            shared_bytes: 0,
        }
    }
}

/// A kernel argument resolved for one backend: a buffer of that backend's own type, or the
/// 8-byte parameter slot of a scalar or null pointer. The device resolves [`Arg`]s into these,
/// so a backend file sees only its own buffer type.
#[derive(Debug, Clone, Copy)]
pub(super) enum BackendArg<'a, B> {
    /// A buffer of the backend.
    Buf(&'a B),
    /// A scalar or a null pointer, as its parameter slot.
    Slot(u64),
}
