//! The GPU head: the implicit-ETF head's stages written once against the device
//! [`runtime`](crate::runtime), so they run unchanged on a CUDA GPU and on the CPU execution
//! of the same kernels. One module per stage, mirroring [`crate::cpu`]:
//!
//! | stage | GPU module | CPU module |
//! |---|---|---|
//! | feature normalisation, class statistics | `gpu::stats` | [`crate::cpu::stats`] |
//! | moving class means, Frobenius normalisation | `gpu::moving` | `cpu::moving` |
//! | nearest-ETF solve | `gpu::solve` | [`crate::cpu::solve`] |
//! | implicit backward | `gpu::backward` | [`crate::cpu::backward`] |
//! | classifier | `gpu::classifier` | `cpu::classifier` |
//! | the stateful head | [`head`] | [`crate::cpu::head`] |
//! | dense products, eigensolvers | [`linalg`] | `cpu::linalg` |
//!
//! plus `gpu::pipeline` (stages 1-4 composed) and [`status`] (the device-side status word
//! that records data errors without a host synchronisation). The stage modules are
//! crate-internal: their buffers' sizes are the head's to check, and [`DeviceHead`](crate::DeviceHead) does. [`linalg`] stays public because every entry checks its buffers.

pub(crate) mod backward;
pub(crate) mod classifier;
pub(crate) mod collective;
pub mod head;
pub mod linalg;
pub(crate) mod moving;
pub(crate) mod pipeline;
pub(crate) mod shape;
pub(crate) mod solve;
pub(crate) mod stats;
pub mod status;
pub(crate) mod stiefel;

#[cfg(test)]
mod tests;
