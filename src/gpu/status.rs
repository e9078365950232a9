//! The step status word: data-dependent errors recorded on the device.
//!
//! Label range, finiteness, degenerate means and numerical failures depend on the data, so
//! checking them on the host would cost a synchronisation per step. Instead the kernels record
//! them in a small `i32` buffer (layout in `kernels/head/status.cu`), and every kernel that changes
//! the head's state first reads it and does nothing when the step failed: a failed step leaves
//! the state exactly as it was, with or without the host looking. [`Status::read`] (one
//! 32-byte download) turns the word into the typed [`Error`] a checked call returns.

use super::shape::{feat_suffix, Feat};
use crate::core::validate::fits_i32;
use crate::error::{Error, Result};
use crate::kernels;
use crate::runtime::{Buffer, DType, Device, LaunchConfig};

/// "No error" value of the index-valued entries.
pub const NONE: i32 = i32::MAX;
/// Length of the status word.
pub const LEN: usize = 8;

/// Which half of the status word a reset clears.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// Entries 0-3 (labels, features, degenerate means, solve).
    Forward,
    /// Entries 4-5 (`d_logits`, backward solve).
    Backward,
}

/// A device status word.
#[derive(Debug)]
pub struct Status {
    /// The `i32` buffer (length [`LEN`]; made only by [`Status::new`], so the kernels may rely
    /// on that length).
    pub(crate) buf: Buffer,
}

/// The status word as read back on the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusWord(pub [i32; LEN]);

impl Status {
    /// A status word with both halves reset.
    pub fn new(dev: &Device) -> Result<Status> {
        let mut s = Status {
            buf: dev.alloc_zeros(DType::I32, LEN)?,
        };
        s.reset(dev, Part::Forward)?;
        s.reset(dev, Part::Backward)?;
        Ok(s)
    }

    /// Clears one half (a kernel launch, no host synchronisation).
    pub fn reset(&mut self, dev: &Device, part: Part) -> Result<()> {
        // SAFETY: the word holds `LEN` i32, all the kernel touches.
        unsafe {
            kernels::head::status::status_reset_i32(
                dev,
                LaunchConfig::new((1, 1, 1), (32, 1, 1)),
                &mut self.buf,
                i32::from(part == Part::Backward),
            )
        }
    }

    /// Reads the word back (synchronises with the device).
    pub fn read(&self, dev: &Device) -> Result<StatusWord> {
        let v = dev.download::<i32>(&self.buf)?;
        let mut w = [0; LEN];
        w.copy_from_slice(&v);
        Ok(StatusWord(w))
    }
}

impl StatusWord {
    /// The forward's error, if any, in the order the CPU head checks: labels, features,
    /// degenerate means, solve. A bad label is reported with its index and value (entries 6
    /// and 7 hold the value).
    pub fn forward_error(&self, classes: usize, what: &'static str) -> Result<()> {
        let w = self.0;
        if w[0] != NONE {
            let label = (u64::from(w[6] as u32) | (u64::from(w[7] as u32) << 32)) as i64;
            return Err(Error::LabelOutOfRange {
                index: w[0] as usize,
                label,
                classes,
            });
        }
        if w[1] != NONE {
            return Err(Error::NonFinite {
                what,
                index: w[1] as usize,
            });
        }
        if w[2] == 2 {
            return Err(Error::Capture {
                op: "graph launch".into(),
                reason: "the state was imported without a Prox after this step was captured: \
                         the next step is a first step, solved on the host, which a graph \
                         cannot replay; take one uncaptured step, then replay"
                    .into(),
            });
        }
        if w[2] != 0 {
            return Err(Error::DegenerateMeans);
        }
        numerical(w[3])
    }

    /// The backward's error, if any.
    pub fn backward_error(&self) -> Result<()> {
        let w = self.0;
        if w[4] != NONE {
            return Err(Error::NonFinite {
                what: "d_logits",
                index: w[4] as usize,
            });
        }
        numerical(w[5])
    }
}

fn numerical(code: i32) -> Result<()> {
    match code {
        0 => Ok(()),
        1 => Err(Error::Numerical {
            what: "G is rank deficient (no unique nearest ETF)",
        }),
        2 => Err(Error::Numerical {
            what: "the Jacobi eigensolver did not converge",
        }),
        _ => Err(Error::Numerical {
            what: "singular Lagrangian Hessian (s_i + s_j = 0) in the implicit backward",
        }),
    }
}

/// Records in entry `entry` (one of the index entries, 1 or 4) of `status` the first element of
/// `x` (f32/f16/bf16) that is non-finite or above `1e30` in magnitude.
pub(crate) fn check_finite(
    dev: &Device,
    x: &Buffer,
    status: &mut Status,
    entry: usize,
) -> Result<()> {
    if entry != 1 && entry != 4 {
        return Err(Error::InvalidParameter {
            name: "entry",
            reason: format!("{entry} is not an index entry of the status word (1 or 4)"),
        });
    }
    let feat = feat_suffix(x, "features")?;
    if x.is_empty() {
        return Ok(());
    }
    let (cfg, len, st, e) = (
        crate::runtime::grid_stride(dev, x.len()),
        x.len() as i64,
        &mut status.buf,
        fits_i32(entry, "status entry")?,
    );
    use kernels::head::status::{check_finite_bf16, check_finite_f16, check_finite_f32};
    // SAFETY: the kernel reads `x.len()` elements of `x` and one entry of the `LEN`-entry
    // status word.
    unsafe {
        match feat {
            Feat::F32 => check_finite_f32(dev, cfg, x, len, st, e),
            Feat::F16 => check_finite_f16(dev, cfg, x, len, st, e),
            Feat::BF16 => check_finite_bf16(dev, cfg, x, len, st, e),
        }
    }
}
