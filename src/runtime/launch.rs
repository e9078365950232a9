//! Kernel launches: signatures (parsed from the CUDA sources by `build.rs`), launch shapes and
//! arguments.

use super::buffer::Buffer;
use super::types::LaunchConfig;
use super::{Backend, Device};

/// A kernel argument.
#[derive(Debug, Clone, Copy)]
pub enum Arg<'a> {
    /// A device buffer, passed as a pointer to its first element.
    Buf(&'a Buffer),
    /// A null pointer, for an optional pointer parameter (such as the `gate` of the products
    /// and the eigensolver: null means "always run").
    Null,
    /// `int`
    I32(i32),
    /// `unsigned int`
    U32(u32),
    /// `long long`
    I64(i64),
    /// `unsigned long long`
    U64(u64),
    /// `float`
    F32(f32),
    /// `double`
    F64(f64),
}

impl Arg<'_> {
    /// The 8-byte parameter slot of a scalar or null argument (as in cuLaunchKernel's
    /// parameter buffer; little-endian, so a 4-byte scalar read from the start of its slot is
    /// the value). `None` for a buffer, whose slot holds a backend-specific pointer.
    pub(crate) fn scalar_slot(&self) -> Option<u64> {
        Some(match *self {
            Arg::Buf(_) => return None,
            Arg::Null => 0,
            Arg::I32(v) => u64::from(v as u32),
            Arg::U32(v) => u64::from(v),
            Arg::I64(v) => v as u64,
            Arg::U64(v) => v,
            Arg::F32(v) => u64::from(v.to_bits()),
            Arg::F64(v) => v.to_bits(),
        })
    }
}

/// Launch shape of a grid-stride kernel over `n` items: on a GPU enough 256-thread blocks to
/// cover `n` (at most 4096 blocks); on the CPU execution one block of 32 threads, because its
/// blocks run one after another and each block's threads are real host threads.
pub fn grid_stride(dev: &Device, n: usize) -> LaunchConfig {
    match dev.backend() {
        Backend::Cpu => LaunchConfig::new((1, 1, 1), (32, 1, 1)),
        Backend::Cuda => {
            LaunchConfig::new(((n.div_ceil(256)).clamp(1, 4096) as u32, 1, 1), (256, 1, 1))
        }
    }
}
