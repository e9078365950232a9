//! The CPU execution when the crate is built without its `cpu-exec` feature (no C++ compiler
//! needed): the same interface as `cpu.rs`, with a buffer type that cannot be constructed.
//! [`Device::cpu`](super::Device) does not exist then, so nothing here is ever reached; the
//! functions that do not take a buffer report that the CPU execution is not compiled in.

use super::types::{BackendArg, LaunchConfig};
use crate::error::{Error, Result};
use std::ffi::{CStr, CString};

/// No CPU-execution allocation can exist.
#[derive(Debug)]
pub(super) enum CpuBuf {}

fn missing(op: &str) -> Error {
    Error::NoDevice {
        reason: format!("{op}: implicit-etf was built without its `cpu-exec` feature"),
    }
}

impl CpuBuf {
    pub(super) fn zeroed(_bytes: usize) -> Result<CpuBuf> {
        Err(missing("allocate"))
    }
    pub(super) fn write(&self, _src: &[u8]) {
        match *self {}
    }
    pub(super) fn read(&self, _dst: &mut [u8]) {
        match *self {}
    }
    pub(super) fn clone_buf(&self) -> Result<CpuBuf> {
        match *self {}
    }
    pub(super) fn fill_zero(&self) {
        match *self {}
    }
    pub(super) fn fill_poison(&self) {
        match *self {}
    }
    pub(super) fn copy_from(&self, _src: &CpuBuf) {
        match *self {}
    }
}

pub(super) fn slots(_args: &[BackendArg<'_, CpuBuf>]) -> Vec<u64> {
    Vec::new()
}

pub(super) fn c_name(name: &str) -> Result<CString> {
    CString::new(name).map_err(|_| missing("launch"))
}

pub(super) fn launch(
    name: &str,
    _cfg: LaunchConfig,
    _args: &[BackendArg<'_, CpuBuf>],
) -> Result<()> {
    Err(missing(name))
}

pub(super) fn launch_slots(cname: &CStr, _cfg: LaunchConfig, _slots: &mut [u64]) -> Result<()> {
    Err(missing(&cname.to_string_lossy()))
}
