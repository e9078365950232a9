//! The data-parallel step on the device (`docs/data-parallel.md`): one all-reduce in the
//! forward, between the batch statistics and the moving means, and one in the backward,
//! between the classifier's row products and `dL/dP` (layouts in
//! `kernels/head/collective.cu`).
//!
//! Cost per step: forward `K d + K + d + 2` f32 values, two launches and the all-reduce;
//! backward `K d + K + 1` values, two launches and the all-reduce. Each rank then solves the
//! same `P` from the same summed statistics: the solve is a fixed sequence of deterministic
//! kernels (fixed-order reductions, no float atomics), and NCCL and the thread collective give
//! every rank the same bits, so ranks on identical GPUs and software hold identical states.

use super::shape::{block, single_block};
use super::stats::{class_sums, Bookkeeping, ClassStatsDev};
use super::status::Status;
use crate::collective::Collective;
use crate::core::config::AbsentClassPolicy;
use crate::core::validate::{check_len, fits_i32};
use crate::error::Result;
use crate::kernels::head::collective as kc;
use crate::runtime::{grid_stride, Buffer, DType, Device, LaunchConfig};

/// Values of the forward's all-reduce: class sums, counts, feature sum, rows, failed ranks.
pub const fn forward_len(d: usize, k: usize) -> usize {
    k * d + k + d + 2
}

/// Values of the backward's all-reduce: `dZ^T X`, `1^T dZ`, failed ranks.
pub const fn backward_len(d: usize, k: usize) -> usize {
    k * d + k + 1
}

/// The batch statistics over every rank: this rank's class sums, counts, feature sum and rows
/// packed (`class_sums_*`, `stats_pack_f32`), summed over the ranks, and unpacked
/// (`stats_unpack_f32`): the global mean, centred means and counts, `N` on the device, the
/// moving-mean plan in `bk` (`source`, `seen_new`) redone from the global counts, and a
/// failure of another rank in `status`. `scal` and `seen` are the moving-mean state's.
#[allow(clippy::too_many_arguments)]
pub fn reduce_stats(
    dev: &Device,
    coll: &Collective,
    x: &Buffer,
    bk: &mut Bookkeeping,
    n: usize,
    d: usize,
    k: usize,
    scal: &Buffer,
    seen: &Buffer,
    policy: AbsentClassPolicy,
    status: &mut Status,
) -> Result<ClassStatsDev> {
    check_len("t, alpha", 2, scal.len())?;
    check_len("seen", k, seen.len())?;
    check_len("source", k, bk.source.len())?;
    check_len("seen_new", k, bk.seen_new.len())?;
    let (ni, di, ki) = (fits_i32(n, "N")?, fits_i32(d, "d")?, fits_i32(k, "K")?);
    let mut packed = dev.alloc(DType::F32, forward_len(d, k))?;
    class_sums(dev, x, bk, n, d, k, &mut packed)?;
    let cols = d.div_ceil(single_block(dev) as usize).max(1) as u32;
    let cfg = LaunchConfig::new((cols, 1, 1), (single_block(dev), 1, 1));
    // SAFETY: `packed` holds `K d + K + d + 2` f32 (allocated here), `counts` `K`, the status
    // word `LEN`; one thread per feature (at least one block).
    unsafe { kc::stats_pack_f32(dev, cfg, &mut packed, &bk.counts, ni, di, ki, &status.buf) }?;
    coll.all_reduce(dev, &mut packed)?;
    let mut counts = dev.alloc(DType::I32, k)?;
    let mut n_total = dev.alloc(DType::I32, 1)?;
    let mut mu = dev.alloc(DType::F32, d)?;
    let mut centred = dev.alloc(DType::F32, d * k)?;
    let pol = i32::from(policy == AbsentClassPolicy::Reference);
    // SAFETY: `packed` holds `K d + K + d + 2` f32, `scal` 2, `seen`, `source`, `seen_new`
    // `K` (checked above), `counts` `K`, `n_total` 1, `mu` `d`, `centred` `d K` (allocated
    // here), the status word `LEN`; blocks of `single_block` threads (a multiple of 32, at
    // most 1024), at least one.
    unsafe {
        kc::stats_unpack_f32(
            dev,
            cfg,
            &packed,
            di,
            ki,
            scal,
            pol,
            seen,
            &mut status.buf,
            &mut counts,
            &mut n_total,
            &mut mu,
            &mut centred,
            &mut bk.source,
            &mut bk.seen_new,
        )
    }?;
    Ok(ClassStatsDev {
        n,
        d,
        k,
        labels: bk.labels.share(),
        counts,
        n_total: Some(n_total),
        mu,
        centred,
    })
}

/// The backward's sums over the ranks: `packed` (`K d + K + 1` f32) holds this rank's
/// `dW^T = dZ^T X` in its first `K d` (the product wrote it); `db` (`K`) is packed beside it
/// with the failure flag (`grads_pack_f32`), the whole is summed over the ranks, and `db`
/// receives the summed `1^T dZ`, `status` a failure of another rank (`grads_unpack_f32`).
pub fn reduce_grads(
    dev: &Device,
    coll: &Collective,
    packed: &mut Buffer,
    db: &mut Buffer,
    d: usize,
    k: usize,
    status: &mut Status,
) -> Result<()> {
    check_len("packed gradients", backward_len(d, k), packed.len())?;
    check_len("db", k, db.len())?;
    let (di, ki) = (fits_i32(d, "d")?, fits_i32(k, "K")?);
    // SAFETY: `packed` holds `K d + K + 1` f32, `db` `K` (checked above), the status word
    // `LEN`.
    unsafe {
        kc::grads_pack_f32(
            dev,
            grid_stride(dev, k * d),
            packed,
            db,
            di,
            ki,
            &status.buf,
        )
    }?;
    coll.all_reduce(dev, packed)?;
    // SAFETY: as above; one block.
    unsafe {
        kc::grads_unpack_f32(
            dev,
            LaunchConfig::new((1, 1, 1), (block(dev), 1, 1)),
            packed,
            di,
            ki,
            db,
            &mut status.buf,
        )
    }
}
