//! The state a head carries between steps, the same for both heads: enough to resume training
//! bit-exactly (`docs/head.md`, moving class means).

use crate::core::config::HeadConfig;
use crate::core::real::Real;
use crate::core::validate::{check_finite, check_len};
use crate::error::{Error, Result};
use crate::stiefel::orthogonality_error;

/// The moving-mean state of a head.
#[derive(Debug, Clone, PartialEq)]
pub struct MovingMeans<T> {
    /// Moving class means `E` (`d x K`, row-major).
    pub e: Vec<T>,
    /// Steps taken so far (`t`).
    pub step: u64,
    /// Last EMA weight (`1` before the first step).
    pub alpha: f64,
    /// Per-class seen flags (see the module docs for when they change).
    pub seen: Vec<bool>,
}

impl<T: Real> MovingMeans<T> {
    /// The initial state: zeros, `t = 0`, `alpha = 1`, nothing seen.
    pub fn new(d: usize, k: usize) -> Self {
        MovingMeans {
            e: vec![T::from_f64(0.0); d * k],
            step: 0,
            alpha: 1.0,
            seen: vec![false; k],
        }
    }

    /// [`new`](Self::new), with sizes that overflow as [`Error::SizeOverflow`] and memory
    /// that is not there as [`Error::OutOfMemory`] (not an abort).
    pub fn try_new(d: usize, k: usize) -> Result<Self> {
        let len = crate::core::validate::size2("d * K", d, k)?;
        let mut e = Vec::new();
        e.try_reserve_exact(len).map_err(|_| Error::OutOfMemory {
            bytes: len.saturating_mul(std::mem::size_of::<T>()),
        })?;
        e.resize(len, T::from_f64(0.0));
        let mut seen = Vec::new();
        seen.try_reserve_exact(k)
            .map_err(|_| Error::OutOfMemory { bytes: k })?;
        seen.resize(k, false);
        Ok(MovingMeans {
            e,
            step: 0,
            alpha: 1.0,
            seen,
        })
    }
}

/// The step counter's ceiling, `2^53`: the largest count a `f64` (the device head's counter)
/// holds exactly. Counting saturates there on both heads, and an imported state may not
/// exceed it, so the count round-trips exactly. (At a step a microsecond, it is reached
/// after 285 years; the EMA weight sits at its floor long before.)
pub const MAX_STEP: u64 = 1 << 53;

/// The complete state of a head: enough to resume training bit-exactly.
#[derive(Debug, Clone, PartialEq)]
pub struct HeadState<T> {
    /// Moving class means (`d x K`), step count, `alpha`, seen flags.
    pub moving: MovingMeans<T>,
    /// The previous step's `P` (`d x K`, row-major, float64), `None` before the first step.
    pub prox: Option<Vec<f64>>,
}

/// Validates a state for a head of configuration `cfg` (shared by the CPU and device heads).
pub(crate) fn check_state<T: Real>(cfg: &HeadConfig, state: &HeadState<T>) -> Result<()> {
    let (d, k) = (cfg.dim, cfg.classes);
    check_len("state.moving.e", d * k, state.moving.e.len())?;
    check_len("state.moving.seen", k, state.moving.seen.len())?;
    check_finite("state.moving.e", &state.moving.e)?;
    if state.moving.step > MAX_STEP {
        return Err(Error::InvalidParameter {
            name: "state.moving.step",
            reason: format!(
                "must be at most 2^53 = {MAX_STEP}, got {}",
                state.moving.step
            ),
        });
    }
    if !(state.moving.alpha > 0.0 && state.moving.alpha <= 1.0) {
        return Err(Error::InvalidParameter {
            name: "state.moving.alpha",
            reason: format!("must lie in (0, 1], got {}", state.moving.alpha),
        });
    }
    if let Some(p) = &state.prox {
        check_len("state.prox", d * k, p.len())?;
        check_finite("state.prox", p)?;
        let err = orthogonality_error(faer::MatRef::from_row_major_slice(&p[..], d, k));
        if err > 1e-6 {
            return Err(Error::InvalidParameter {
                name: "state.prox",
                reason: format!("columns are not orthonormal (max |P^T P - I| = {err:.3e})"),
            });
        }
    }
    Ok(())
}
