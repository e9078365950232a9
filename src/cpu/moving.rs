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

/// One moving-mean update into `next` (whose buffers are reused): `next.e` is `E_new`, and
/// `sources[c]` says where column `c` came from. Returns the weight `w` of the batch.
/// `counts` (`K`), `mu` (`d`) and `centred` (`d x K`, row-major) are the batch statistics.
#[allow(clippy::too_many_arguments)]
pub fn update_into<T: Real>(
    state: &MovingMeans<T>,
    counts: &[usize],
    mu: &[T],
    centred: &[T],
    average: MovingAverage,
    policy: AbsentClassPolicy,
    alpha_floor: f64,
    next: &mut MovingMeans<T>,
    sources: &mut [ColumnSource],
) -> f64 {
    let k = counts.len();
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
    let any_absent = counts.contains(&0);
    for (c, src) in sources.iter_mut().enumerate().take(k) {
        *src = if counts[c] > 0 {
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
        };
    }
    next.e.clear();
    next.e.extend_from_slice(&state.e);
    for (j, (row, (old, cen))) in next
        .e
        .chunks_exact_mut(k)
        .zip(state.e.chunks_exact(k).zip(centred.chunks_exact(k)))
        .enumerate()
    {
        let m = mu[j].to_f64();
        for c in 0..k {
            let o = old[c].to_f64();
            let v = match sources[c] {
                ColumnSource::Centred => weight * cen[c].to_f64() + (1.0 - weight) * o,
                ColumnSource::GlobalMean { weight: w } => w * m + (1.0 - w) * o,
                ColumnSource::Held => continue,
            };
            row[c] = T::from_f64(v);
        }
    }
    next.seen.clear();
    next.seen.extend_from_slice(&state.seen);
    let update_seen = match policy {
        AbsentClassPolicy::Hold => true,
        AbsentClassPolicy::Reference => any_absent,
    };
    if update_seen {
        for (s, &n) in next.seen.iter_mut().zip(counts) {
            *s |= n > 0;
        }
    }
    next.step = (t + 1).min(crate::core::state::MAX_STEP);
    next.alpha = alpha;
    weight
}

/// Backward of [`update_into`]: `dE_new` (`d x K`) to the centred means (`d x K`, written)
/// and to `mu` (`d`, written).
pub fn update_backward_into<T: Real>(
    sources: &[ColumnSource],
    weight: f64,
    d_e_new: &[T],
    d_centred: &mut [T],
    d_mu: &mut [f64],
) {
    let k = sources.len();
    for ((g, out), dm) in d_e_new
        .chunks_exact(k)
        .zip(d_centred.chunks_exact_mut(k))
        .zip(d_mu.iter_mut())
    {
        let mut acc = 0.0f64;
        for (c, src) in sources.iter().enumerate() {
            let gv = g[c].to_f64();
            out[c] = T::from_f64(match *src {
                ColumnSource::Centred => weight * gv,
                ColumnSource::GlobalMean { weight } => {
                    acc += weight * gv;
                    0.0
                }
                ColumnSource::Held => 0.0,
            });
        }
        *dm = acc;
    }
}

/// `Y = E / ||E||_F` into `y`; returns `||E||_F` (0 leaves `y` zero).
pub fn frobenius_normalise_into<T: Real>(e: &[T], y: &mut [T]) -> f64 {
    let (norm, _) = crate::cpu::stats::norm2(e);
    if norm == 0.0 {
        y.iter_mut().for_each(|v| *v = T::from_f64(0.0));
        return 0.0;
    }
    for (o, &v) in y.iter_mut().zip(e) {
        *o = T::from_f64(v.to_f64() / norm);
    }
    norm
}

/// Backward of the normalisation: `dE = (dY - Y <Y, dY>) / ||E||`, into `de`.
pub fn frobenius_normalise_backward_into<T: Real>(y: &[T], norm: f64, dy: &[T], de: &mut [T]) {
    let dot: f64 = y
        .iter()
        .zip(dy)
        .map(|(&a, &b)| a.to_f64() * b.to_f64())
        .sum();
    for ((o, &a), &b) in de.iter_mut().zip(y).zip(dy) {
        *o = T::from_f64((b.to_f64() - a.to_f64() * dot) / norm);
    }
}

/// One update's results (allocating form of [`update_into`], the device tests' oracle).
#[cfg(test)]
#[derive(Debug, Clone, PartialEq)]
pub struct MovingUpdate<T> {
    /// `E_new` (`d x K`).
    pub e_new: Vec<T>,
    /// Where each column came from.
    pub sources: Vec<ColumnSource>,
    /// The batch weight.
    pub weight: f64,
    /// The state after the step.
    pub next: MovingMeans<T>,
}

/// [`update_into`] into new vectors.
#[cfg(test)]
pub fn update<T: Real>(
    state: &MovingMeans<T>,
    stats: &crate::cpu::stats::ClassStats<T>,
    average: MovingAverage,
    policy: AbsentClassPolicy,
    alpha_floor: f64,
) -> MovingUpdate<T> {
    let k = stats.counts.len();
    let mut next = state.clone();
    let mut sources = vec![ColumnSource::Held; k];
    let weight = update_into(
        state,
        &stats.counts,
        &stats.mu,
        &stats.centred,
        average,
        policy,
        alpha_floor,
        &mut next,
        &mut sources,
    );
    MovingUpdate {
        e_new: next.e.clone(),
        sources,
        weight,
        next,
    }
}

/// [`update_backward_into`] into new vectors (`d_mu` in the storage type).
#[cfg(test)]
pub fn update_backward<T: Real>(upd: &MovingUpdate<T>, d_e_new: &[T]) -> (Vec<T>, Vec<T>) {
    let k = upd.sources.len();
    let d = upd.e_new.len() / k;
    let mut dc = vec![T::from_f64(0.0); d * k];
    let mut dm = vec![0.0; d];
    update_backward_into(&upd.sources, upd.weight, d_e_new, &mut dc, &mut dm);
    (dc, dm.into_iter().map(T::from_f64).collect())
}

/// [`frobenius_normalise_into`] into a new vector.
#[cfg(test)]
pub fn frobenius_normalise<T: Real>(e: &[T]) -> (Vec<T>, f64) {
    let mut y = vec![T::from_f64(0.0); e.len()];
    let n = frobenius_normalise_into(e, &mut y);
    (y, n)
}

/// [`frobenius_normalise_backward_into`] into a new vector.
#[cfg(test)]
pub fn frobenius_normalise_backward<T: Real>(y: &[T], norm: f64, dy: &[T]) -> Vec<T> {
    let mut de = vec![T::from_f64(0.0); y.len()];
    frobenius_normalise_backward_into(y, norm, dy, &mut de);
    de
}
