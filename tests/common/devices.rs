//! The devices the device tests run on (also included by the crate's unit tests, which bring
//! their own `Device` into the including module's scope).
use super::Device;

/// [`Device::all_available`], saying why the CUDA part is skipped; fails when there is no
/// device at all (`IMPLICIT_ETF_DEVICE=cuda` without a usable GPU), so that no test passes
/// having tested nothing.
pub fn devices() -> Vec<Device> {
    let (devs, skipped) = Device::all_available();
    if let Some(reason) = &skipped {
        println!("CUDA part skipped: {reason}");
    }
    assert!(!devs.is_empty(), "no device to test on: {skipped:?}");
    devs
}
