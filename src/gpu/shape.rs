//! Launch shapes and the features' element type, shared by the stages.

use crate::error::{Error, Result};
use crate::runtime::{Backend, Buffer, DType, Device};

/// Threads per block of the element-wise, per-row and per-feature kernels: 256 on a GPU, 32
/// on the CPU execution, whose block threads are real host threads (a 256-thread block there
/// costs 256 thread wake-ups per launch, and its barriers far more, for no gain). Every such
/// kernel takes any multiple of 32.
pub(crate) fn block(dev: &Device) -> u32 {
    match dev.backend() {
        Backend::Cpu => 32,
        Backend::Cuda => 256,
    }
}

/// Threads per row of the row kernels (`etf::RowGroups` in `kernels/etf_cuda.h`): a warp on
/// a GPU (coalesced rows), one thread on the CPU execution (where a warp shuffle synchronises
/// host threads).
pub(crate) fn row_lanes(dev: &Device) -> usize {
    match dev.backend() {
        Backend::Cpu => 1,
        Backend::Cuda => 32,
    }
}

/// Threads of the single-block reductions: 1024 on a GPU, 32 on the CPU execution.
pub(crate) fn single_block(dev: &Device) -> u32 {
    match dev.backend() {
        Backend::Cpu => 32,
        Backend::Cuda => 1024,
    }
}

/// The element type of a feature buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Feat {
    F32,
    F16,
    BF16,
}

/// The features' element type; anything but f32, f16 or bf16 is an error.
pub(crate) fn feat_suffix(b: &Buffer, what: &'static str) -> Result<Feat> {
    match b.dtype() {
        DType::F32 => Ok(Feat::F32),
        DType::F16 => Ok(Feat::F16),
        DType::BF16 => Ok(Feat::BF16),
        other => Err(Error::InvalidParameter {
            name: what,
            reason: format!("features must be f32, f16 or bf16, got {other:?}"),
        }),
    }
}

/// `b` holds `len` elements of `dtype` ([`Error::ShapeMismatch`] or
/// [`Error::InvalidParameter`] otherwise).
pub(crate) fn check_buffer(b: &Buffer, what: &'static str, len: usize, dtype: DType) -> Result<()> {
    crate::core::validate::check_len(what, len, b.len())?;
    if b.dtype() != dtype {
        return Err(Error::InvalidParameter {
            name: what,
            reason: format!("expected {dtype:?}, got {:?}", b.dtype()),
        });
    }
    Ok(())
}
