//! The step status word: data-dependent errors recorded on the device.
//!
//! Label range, finiteness, degenerate means and numerical failures depend on the data, so
//! checking them on the host would cost a synchronisation per step. Instead the kernels record
//! them in a small `i32` buffer (layout in `kernels/head/status.cu`), and every kernel that changes
//! the head's state first reads it and does nothing when the step failed: a failed step leaves
//! the state exactly as it was, with or without the host looking. [`Status::read`] (one
//! 32-byte download) turns the word into the typed [`Error`] a checked call returns.

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
    /// The ticket of the kernels that finish a grid-wide sum in their last block
    /// (`etf::grid_sum_last` in `kernels/etf_cuda.h`): one `i32`, zero between launches (each
    /// such launch leaves it at zero), zero-filled once here.
    pub(crate) ticket: Buffer,
}

/// The status word as read back on the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusWord(pub [i32; LEN]);

impl Status {
    /// A status word with both halves reset.
    pub fn new(dev: &Device) -> Result<Status> {
        let mut s = Status {
            buf: dev.alloc_zeros(DType::I32, LEN)?,
            ticket: dev.alloc_zeros(DType::I32, 1)?,
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
        if w[2] < 0 {
            return Err(Error::PeerFailed {
                phase: "forward",
                ranks: w[2].unsigned_abs() as usize,
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
        if w[5] < 0 {
            return Err(Error::PeerFailed {
                phase: "backward",
                ranks: w[5].unsigned_abs() as usize,
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
