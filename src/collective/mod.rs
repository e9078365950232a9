//! Collectives: the sum of a buffer over the ranks of a data-parallel job
//! (`docs/data-parallel.md`). Backend-neutral: the thread implementation needs no device
//! (the CPU head uses it with `default-features = false`); device buffers and NCCL come with
//! the device features.
//!
//! A [`Collective`] is one rank's handle on a group of `world_size` ranks. Its one operation
//! is an in-place all-reduce (sum) of a buffer: of a host `f64` slice
//! ([`Collective::all_reduce_host`]) or of an `f32`/`f64` device buffer
//! (`Collective::all_reduce`, with the `cuda` or `cpu-exec` feature). Two implementations:
//!
//! - **Threads** ([`Collective::threads`]): ranks are threads of one process. The sum is
//!   formed once, in `f64`, in rank order, and copied to every rank, so every rank receives
//!   the same bits. A device buffer goes through the host (a download and a write, so not
//!   inside a graph capture). This is what the tests, CI and the CPU heads use.
//! - **NCCL** (feature `cuda`; `Collective::nccl`, `Collective::from_env`): one rank per GPU,
//!   across processes and machines; the all-reduce is queued on the device's own stream, so
//!   it is ordered with the head's kernels without a host synchronisation and can be captured
//!   in a graph. NCCL's ring and tree algorithms give every rank the same result.
//!
//! Every rank must make the same sequence of calls with buffers of the same length; a length
//! that differs between ranks is an error on every rank. A rank that stops taking part (its
//! handle dropped, or a wait longer than the timeout) makes the others' calls fail with
//! [`Error::Collective`] instead of waiting forever.
//!
//! ```
//! use implicit_etf::Collective;
//! let ranks = Collective::threads(3).unwrap();
//! let sums: Vec<Vec<f64>> = std::thread::scope(|s| {
//!     let hs: Vec<_> = ranks
//!         .iter()
//!         .map(|c| s.spawn(move || {
//!             let mut v = vec![c.rank() as f64, 1.0];
//!             c.all_reduce_host(&mut v).map(|_| v)
//!         }))
//!         .collect();
//!     hs.into_iter().map(|h| h.join().unwrap().unwrap()).collect()
//! });
//! assert!(sums.iter().all(|v| v == &[3.0, 3.0]));
//! ```

pub mod rendezvous;

pub use rendezvous::{share_id, Rendezvous, RendezvousSpec};

use std::fmt;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
#[cfg(device)]
use crate::runtime::{Buffer, DType, Device};

/// How long a thread rank waits for the others by default.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

/// One rank's handle on a group of ranks (see the [module documentation](self)).
pub struct Collective {
    rank: usize,
    world: usize,
    imp: Imp,
}

enum Imp {
    Threads(Arc<ThreadGroup>),
    #[cfg(feature = "cuda")]
    Nccl(crate::runtime::nccl::NcclComm),
}

impl fmt::Debug for Collective {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Collective")
            .field("kind", &self.kind())
            .field("rank", &self.rank)
            .field("world_size", &self.world)
            .finish()
    }
}

impl Collective {
    /// `world_size` handles on one group whose ranks are threads of this process: hand
    /// handle `r` (rank `r`) to the thread of rank `r`.
    pub fn threads(world_size: usize) -> Result<Vec<Collective>> {
        Collective::threads_with_timeout(world_size, DEFAULT_TIMEOUT)
    }

    /// [`threads`](Self::threads) with the longest wait for the other ranks: a call still
    /// waiting after `timeout` fails with [`Error::Collective`] (and so does every later
    /// call of the group).
    pub fn threads_with_timeout(world_size: usize, timeout: Duration) -> Result<Vec<Collective>> {
        if world_size == 0 {
            return Err(Error::InvalidParameter {
                name: "world_size",
                reason: "a group needs at least one rank".into(),
            });
        }
        let group = Arc::new(ThreadGroup {
            world: world_size,
            timeout,
            state: Mutex::new(GroupState {
                slots: vec![None; world_size],
                arrived: 0,
                round: 0,
                result: None,
                readers_left: 0,
                broken: None,
            }),
            cv: Condvar::new(),
        });
        Ok((0..world_size)
            .map(|rank| Collective {
                rank,
                world: world_size,
                imp: Imp::Threads(group.clone()),
            })
            .collect())
    }

    /// Rank `rank` of a `world_size`-rank NCCL group with id `id`, on `dev` (a CUDA
    /// device; its stream carries the all-reduces). Every rank calls this with the same id
    /// and world size; it returns when all have joined (`ncclCommInitRank` blocks until
    /// then). Errors: the CPU execution, no loadable `libnccl`, `rank >= world_size`, or
    /// NCCL's own.
    #[cfg(feature = "cuda")]
    pub fn nccl(
        dev: &Device,
        id: &crate::runtime::nccl::NcclId,
        rank: usize,
        world_size: usize,
    ) -> Result<Collective> {
        Ok(Collective {
            rank,
            world: world_size,
            imp: Imp::Nccl(crate::runtime::nccl::NcclComm::new(
                dev, id, rank, world_size,
            )?),
        })
    }

    /// This rank, `0..world_size`.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// The number of ranks.
    pub fn world_size(&self) -> usize {
        self.world
    }

    /// `"threads"` or `"nccl"`.
    pub fn kind(&self) -> &'static str {
        match &self.imp {
            Imp::Threads(_) => "threads",
            #[cfg(feature = "cuda")]
            Imp::Nccl(_) => "nccl",
        }
    }

    /// Sums `buf` over the ranks, in place (every rank passes a buffer of the same length and
    /// receives the same sum). Host memory: thread groups only (an NCCL group reduces device
    /// buffers, [`all_reduce`](Self::all_reduce)).
    pub fn all_reduce_host(&self, buf: &mut [f64]) -> Result<()> {
        match &self.imp {
            Imp::Threads(g) => g.all_reduce(self.rank, buf),
            #[cfg(feature = "cuda")]
            Imp::Nccl(_) => Err(Error::InvalidParameter {
                name: "collective",
                reason: "an NCCL group reduces device buffers; a CPU head needs \
                         Collective::threads"
                    .into(),
            }),
        }
    }

    /// Sums the `f32` or `f64` buffer `buf` of `dev` over the ranks, in place. NCCL: queued
    /// on `dev`'s stream (no synchronisation; capturable). Threads: through the host, in
    /// `f64` (the `f32` sum is rounded once), so not during a capture.
    #[cfg(device)]
    pub fn all_reduce(&self, dev: &Device, buf: &mut Buffer) -> Result<()> {
        if !matches!(buf.dtype(), DType::F32 | DType::F64) {
            return Err(Error::InvalidParameter {
                name: "buffer",
                reason: format!("all-reduce takes f32 or f64 buffers, got {:?}", buf.dtype()),
            });
        }
        match &self.imp {
            Imp::Threads(g) => {
                let mut host: Vec<f64> = match buf.dtype() {
                    DType::F64 => dev.download::<f64>(buf)?,
                    _ => dev
                        .download::<f32>(buf)?
                        .into_iter()
                        .map(f64::from)
                        .collect(),
                };
                g.all_reduce(self.rank, &mut host)?;
                match buf.dtype() {
                    DType::F64 => dev.write(buf, &host),
                    _ => {
                        let v: Vec<f32> = host.iter().map(|&x| x as f32).collect();
                        dev.write(buf, &v)
                    }
                }
            }
            #[cfg(feature = "cuda")]
            Imp::Nccl(c) => c.all_reduce(dev, buf),
        }
    }
}

impl Drop for Collective {
    fn drop(&mut self) {
        #[allow(irrefutable_let_patterns)] // one variant without the `cuda` feature
        if let Imp::Threads(g) = &self.imp {
            g.leave(self.rank);
        }
    }
}

/// The shared state of a thread group.
struct ThreadGroup {
    world: usize,
    timeout: Duration,
    state: Mutex<GroupState>,
    cv: Condvar,
}

struct GroupState {
    /// Each rank's contribution to the round being formed.
    slots: Vec<Option<Vec<f64>>>,
    arrived: usize,
    /// Rounds completed.
    round: u64,
    /// The last round's sum (or why it failed), until every rank has read it.
    result: Option<Arc<std::result::Result<Vec<f64>, String>>>,
    readers_left: usize,
    /// Why the group can no longer be used.
    broken: Option<String>,
}

fn collective_error(reason: String) -> Error {
    Error::Collective {
        op: "all-reduce",
        reason,
    }
}

impl ThreadGroup {
    fn lock(&self) -> std::sync::MutexGuard<'_, GroupState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits on the condition variable until `done` holds, the group breaks, or the
    /// deadline passes.
    fn wait_until<'a>(
        &self,
        mut st: std::sync::MutexGuard<'a, GroupState>,
        deadline: Instant,
        what: &str,
        done: impl Fn(&GroupState) -> bool,
    ) -> Result<std::sync::MutexGuard<'a, GroupState>> {
        loop {
            if done(&st) {
                return Ok(st);
            }
            if let Some(why) = &st.broken {
                return Err(collective_error(why.clone()));
            }
            let now = Instant::now();
            if now >= deadline {
                let why = format!(
                    "timed out after {:?} waiting for {what} (a rank stopped taking part?)",
                    self.timeout
                );
                st.broken = Some(why.clone());
                self.cv.notify_all();
                return Err(collective_error(why));
            }
            st = self
                .cv
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    fn all_reduce(&self, rank: usize, buf: &mut [f64]) -> Result<()> {
        let deadline = Instant::now() + self.timeout;
        let st = self.lock();
        // The previous round's result must be read by every rank first.
        let mut st = self.wait_until(st, deadline, "the previous round", |s| {
            s.readers_left == 0 && s.slots[rank].is_none()
        })?;
        let my_round = st.round;
        st.slots[rank] = Some(buf.to_vec());
        st.arrived += 1;
        if st.arrived == self.world {
            let slots: Vec<Vec<f64>> = st
                .slots
                .iter_mut()
                .map(|s| s.take().unwrap_or_default())
                .collect();
            let len = slots[0].len();
            let res = if let Some((r, s)) = slots.iter().enumerate().find(|(_, s)| s.len() != len) {
                Err(format!(
                    "ranks passed buffers of different lengths (rank 0: {len}, rank {r}: {})",
                    s.len()
                ))
            } else {
                // One sum, in rank order, for everybody: every rank gets the same bits.
                let mut acc = slots[0].clone();
                for s in &slots[1..] {
                    for (a, v) in acc.iter_mut().zip(s) {
                        *a += v;
                    }
                }
                Ok(acc)
            };
            st.result = Some(Arc::new(res));
            st.readers_left = self.world;
            st.arrived = 0;
            st.round += 1;
            self.cv.notify_all();
        }
        let mut st = self.wait_until(st, deadline, "the other ranks", |s| s.round != my_round)?;
        let res = st
            .result
            .clone()
            .expect("set by the last rank of the round");
        st.readers_left -= 1;
        if st.readers_left == 0 {
            st.result = None;
            self.cv.notify_all();
        }
        drop(st);
        match &*res {
            Ok(sum) => {
                buf.copy_from_slice(sum);
                Ok(())
            }
            Err(why) => Err(collective_error(why.clone())),
        }
    }

    fn leave(&self, rank: usize) {
        let mut st = self.lock();
        if st.broken.is_none() {
            st.broken = Some(format!("rank {rank} left the group"));
        }
        self.cv.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run<F, R>(world: usize, f: F) -> Vec<R>
    where
        F: Fn(&Collective) -> R + Sync,
        R: Send,
    {
        let ranks = Collective::threads(world).unwrap();
        std::thread::scope(|s| {
            let hs: Vec<_> = ranks.iter().map(|c| s.spawn(|| f(c))).collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    #[test]
    fn sums_in_rank_order_many_rounds() {
        // Exact oracle: small integers sum exactly in f64.
        let out = run(4, |c| {
            let mut last = Vec::new();
            for round in 0..50 {
                let mut v: Vec<f64> = (0..7)
                    .map(|i| (c.rank() * 100 + i + round) as f64)
                    .collect();
                c.all_reduce_host(&mut v).unwrap();
                last = v;
            }
            last
        });
        let want: Vec<f64> = (0..7).map(|i| (600 + 4 * (i + 49)) as f64).collect();
        for v in out {
            assert_eq!(v, want);
        }
    }

    #[test]
    fn same_bits_on_every_rank() {
        // Values whose sum depends on the order: every rank must still get one result.
        let out = run(3, |c| {
            let mut v = vec![[1e16, 1.0, -1e16][c.rank()], 0.1 * (c.rank() as f64 + 1.0)];
            c.all_reduce_host(&mut v).unwrap();
            v
        });
        assert!(out.iter().all(|v| v
            .iter()
            .zip(&out[0])
            .all(|(a, b)| a.to_bits() == b.to_bits())));
    }

    #[test]
    fn length_mismatch_fails_every_rank() {
        let out = run(2, |c| {
            let mut v = vec![1.0; 3 + c.rank()];
            c.all_reduce_host(&mut v)
        });
        for r in out {
            assert!(matches!(r, Err(Error::Collective { .. })), "{r:?}");
        }
    }

    #[test]
    fn a_departed_rank_fails_the_others() {
        let mut ranks = Collective::threads_with_timeout(2, Duration::from_secs(30)).unwrap();
        let last = ranks.pop().unwrap();
        drop(last);
        let mut v = vec![1.0];
        let r = ranks[0].all_reduce_host(&mut v);
        assert!(matches!(r, Err(Error::Collective { .. })), "{r:?}");
    }

    #[test]
    fn timeout_instead_of_a_hang() {
        let ranks = Collective::threads_with_timeout(2, Duration::from_millis(50)).unwrap();
        let mut v = vec![1.0];
        let r = ranks[0].all_reduce_host(&mut v);
        assert!(matches!(r, Err(Error::Collective { .. })), "{r:?}");
        assert_eq!(v, [1.0]);
    }

    #[test]
    fn zero_ranks_refused() {
        assert!(matches!(
            Collective::threads(0),
            Err(Error::InvalidParameter { .. })
        ));
    }

    #[cfg(feature = "cpu-exec")]
    #[test]
    fn device_buffers_through_the_host() {
        use crate::runtime::Device;
        let out = run(2, |c| {
            let dev = Device::cpu();
            let mut b = dev
                .upload(&[1.5f32 * (c.rank() as f32 + 1.0), 2.0])
                .unwrap();
            c.all_reduce(&dev, &mut b).unwrap();
            let mut i = dev.upload(&[1i32]).unwrap();
            let bad = c.all_reduce(&dev, &mut i);
            (dev.download::<f32>(&b).unwrap(), bad.is_err())
        });
        for (v, bad) in out {
            assert_eq!(v, [4.5, 4.0]);
            assert!(bad);
        }
    }
}
