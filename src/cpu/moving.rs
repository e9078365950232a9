//! Stage 2: moving class means and their Frobenius normalisation (`docs/head.md#moving-class-means`, `#frobenius-normalisation`).
//!
//! State: `E` (`d x K`, zero at start), step count `t`, EMA weight `alpha` (starts at 1),
//! and per-class *seen* flags. One update forms `E_new` column by column:
//!
//! | class in batch | policy | `E_new[:,k]` | gradient to |
//! |---|---|---|---|
//! | present | any | `w c_k + (1 - w) E[:,k]` | `c_k` (weight `w`) |
//! | absent | `Hold` | `E[:,k]` | nothing |
//! | absent, `t = 0` | `Reference` | `w mu + (1 - w) E[:,k]` | `mu` (weight `w`) |
//! | absent, not seen, `t > 0` | `Reference` | `mu` (stored column overwritten) | `mu` (weight 1) |
//! | absent, seen, `t > 0` | `Reference` | `E[:,k]` | nothing |
//!
//! with `w = alpha` (EMA: `alpha <- 2/(t+2)` while the previous `alpha > alpha_floor`, else
//! `alpha_floor`) or `w = 1/(t+1)` (cumulative average). Under `Reference` the seen flags are
//! updated (`seen |= present`) only on batches in which some class is absent — the reference's
//! quirk, kept on purpose; under `Hold` they are updated on every batch (they are informative
//! only). Then `Y = E_new / ||E_new||_F`.

use crate::core::config::{AbsentClassPolicy, MovingAverage};
use crate::core::state::MovingMeans;
use crate::cpu::stats::ClassStats;
use crate::Real;

/// Where a column of `E_new` came from, which decides where its gradient goes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ColumnSource {
    /// `w c_k + (1 - w) E[:,k]`: gradient `w dE_new[:,k]` to the centred mean `c_k`.
    Centred,
    /// `weight * mu + (1 - weight) E[:,k]`: gradient `weight dE_new[:,k]` to `mu`.
    GlobalMean {
        /// The weight of `mu`.
        weight: f64,
    },
    /// `E[:,k]` unchanged: no gradient.
    Held,
}

/// The result of one moving-mean update (not yet committed to the state).
#[derive(Debug, Clone, PartialEq)]
pub struct MovingUpdate<T> {
    /// `E_new` (`d x K`).
    pub e_new: Vec<T>,
    /// The origin of each column.
    pub sources: Vec<ColumnSource>,
    /// Weight `w` of the batch's centred means.
    pub weight: f64,
    /// The state after this step (`E = E_new`, `t + 1`, new `alpha` and flags).
    pub next: MovingMeans<T>,
}

/// Computes `E_new` from the state and the batch statistics (the state is not modified).
pub fn update<T: Real>(
    state: &MovingMeans<T>,
    stats: &ClassStats<T>,
    average: MovingAverage,
    policy: AbsentClassPolicy,
    alpha_floor: f64,
) -> MovingUpdate<T> {
    let k = stats.counts.len();
    let d = stats.mu.len();
    let t = state.step;
    let (weight, alpha) = match average {
        MovingAverage::Exponential => {
            let a = if state.alpha > alpha_floor {
                2.0 / (t as f64 + 2.0)
            } else {
                alpha_floor
            };
            (a, a)
        }
        MovingAverage::Cumulative => {
            let w = 1.0 / (t as f64 + 1.0);
            (w, w)
        }
    };
    let any_absent = stats.counts.contains(&0);
    let sources: Vec<ColumnSource> = (0..k)
        .map(|c| {
            if stats.counts[c] > 0 {
                ColumnSource::Centred
            } else {
                match policy {
                    AbsentClassPolicy::Hold => ColumnSource::Held,
                    AbsentClassPolicy::Reference if t == 0 => ColumnSource::GlobalMean { weight },
                    AbsentClassPolicy::Reference if !state.seen[c] => {
                        ColumnSource::GlobalMean { weight: 1.0 }
                    }
                    AbsentClassPolicy::Reference => ColumnSource::Held,
                }
            }
        })
        .collect();
    let mut e_new = state.e.clone();
    for j in 0..d {
        let mu = stats.mu[j].to_f64();
        for (c, src) in sources.iter().enumerate() {
            let idx = j * k + c;
            let old = state.e[idx].to_f64();
            let v = match *src {
                ColumnSource::Centred => {
                    weight * stats.centred[idx].to_f64() + (1.0 - weight) * old
                }
                ColumnSource::GlobalMean { weight: w } => w * mu + (1.0 - w) * old,
                ColumnSource::Held => continue,
            };
            e_new[idx] = T::from_f64(v);
        }
    }
    let mut seen = state.seen.clone();
    let update_seen = match policy {
        AbsentClassPolicy::Hold => true,
        AbsentClassPolicy::Reference => any_absent,
    };
    if update_seen {
        for (s, &n) in seen.iter_mut().zip(&stats.counts) {
            *s |= n > 0;
        }
    }
    MovingUpdate {
        next: MovingMeans {
            e: e_new.clone(),
            step: (t + 1).min(crate::core::state::MAX_STEP),
            alpha,
            seen,
        },
        e_new,
        sources,
        weight,
    }
}

/// Backward of [`update`]: from `dL/dE_new` (`d x K`) to `(dL/dcentred (d x K), dL/dmu (d))`.
pub fn update_backward<T: Real>(upd: &MovingUpdate<T>, d_e_new: &[T]) -> (Vec<T>, Vec<T>) {
    let k = upd.sources.len();
    let d = upd.e_new.len() / k;
    let mut d_centred = vec![T::from_f64(0.0); d * k];
    let mut d_mu = vec![T::from_f64(0.0); d];
    for j in 0..d {
        let mut acc = 0.0f64;
        for (c, src) in upd.sources.iter().enumerate() {
            let g = d_e_new[j * k + c].to_f64();
            match *src {
                ColumnSource::Centred => d_centred[j * k + c] = T::from_f64(upd.weight * g),
                ColumnSource::GlobalMean { weight } => acc += weight * g,
                ColumnSource::Held => {}
            }
        }
        d_mu[j] = T::from_f64(acc);
    }
    (d_centred, d_mu)
}

/// `Y = E / ||E||_F`; returns `(Y, ||E||_F)`. A zero `E` gives a zero `Y` and norm 0 (the
/// head refuses that case with [`Error::DegenerateMeans`](crate::Error::DegenerateMeans)).
pub fn frobenius_normalise<T: Real>(e: &[T]) -> (Vec<T>, f64) {
    let (norm, _) = crate::cpu::stats::norm2(e);
    if norm == 0.0 {
        return (vec![T::from_f64(0.0); e.len()], 0.0);
    }
    (
        e.iter().map(|&v| T::from_f64(v.to_f64() / norm)).collect(),
        norm,
    )
}

/// Backward of [`frobenius_normalise`]: `dE = (dY - Y <Y, dY>) / ||E||`.
pub fn frobenius_normalise_backward<T: Real>(y: &[T], norm: f64, dy: &[T]) -> Vec<T> {
    let dot: f64 = y
        .iter()
        .zip(dy)
        .map(|(&a, &b)| a.to_f64() * b.to_f64())
        .sum();
    y.iter()
        .zip(dy)
        .map(|(&a, &b)| T::from_f64((b.to_f64() - a.to_f64() * dot) / norm))
        .collect()
}
