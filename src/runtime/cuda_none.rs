//! The CUDA backend when the crate is built without its `cuda` feature: the same interface as
//! `cuda.rs`, with types that cannot be constructed. [`CudaDevice::new`] reports that CUDA is
//! not compiled in, so no other method can ever be reached (each matches on its uninhabited
//! receiver).

use super::types::{BackendArg, KernelSig, LaunchConfig};
use crate::error::{Error, Result};

/// No device allocation can exist.
#[derive(Debug)]
pub(super) enum CudaBuf {}
/// No device can exist.
#[derive(Debug)]
pub(super) enum CudaDevice {}
/// No kernel handle can exist.
#[derive(Debug)]
pub(super) enum Function {}
/// No captured graph can exist.
#[derive(Debug)]
pub(super) enum Graph {}

pub(super) fn launch_graph(g: &Graph) -> Result<()> {
    match *g {}
}

impl CudaDevice {
    pub(super) fn new(_ordinal: usize) -> Result<CudaDevice> {
        Err(Error::NoDevice {
            reason: "implicit-etf was built without its `cuda` feature".into(),
        })
    }
    pub(super) fn name(&self) -> String {
        match *self {}
    }
    pub(super) fn alloc_zeros(&self, _bytes: usize) -> Result<CudaBuf> {
        match *self {}
    }
    pub(super) fn alloc(&self, _bytes: usize) -> Result<CudaBuf> {
        match *self {}
    }
    pub(super) fn max_shared_optin(&self) -> usize {
        match *self {}
    }
    pub(super) fn upload(&self, _data: &[u8]) -> Result<CudaBuf> {
        match *self {}
    }
    pub(super) fn write(&self, _b: &CudaBuf, _data: &[u8]) -> Result<()> {
        match *self {}
    }
    pub(super) fn zero(&self, _b: &CudaBuf) -> Result<()> {
        match *self {}
    }
    pub(super) fn copy_into(&self, _dst: &CudaBuf, _src: &CudaBuf) -> Result<()> {
        match *self {}
    }
    pub(super) fn begin_capture(&self) -> Result<()> {
        match *self {}
    }
    pub(super) fn end_capture(&self) -> Result<Graph> {
        match *self {}
    }
    pub(super) fn read(&self, _b: &CudaBuf, _dst: &mut [u8]) -> Result<()> {
        match *self {}
    }
    pub(super) fn copy(&self, _b: &CudaBuf) -> Result<CudaBuf> {
        match *self {}
    }
    pub(super) fn synchronize(&self) -> Result<()> {
        match *self {}
    }
    pub(super) fn function(&self, _sig: &KernelSig) -> Result<Function> {
        match *self {}
    }
    pub(super) fn launch(
        &self,
        _sig: &KernelSig,
        _cfg: LaunchConfig,
        _args: &[BackendArg<'_, CudaBuf>],
    ) -> Result<()> {
        match *self {}
    }
}
