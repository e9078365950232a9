//! Stage markers: where the time of a step goes, stage by stage, on both backends.
//!
//! ```text
//! dev.set_profiling(true);        // this device records marks from now on
//! dev.mark("step")?;              // the first mark only starts the clock
//! ... stage A ...
//! dev.mark("A")?;                 // a mark ends the stage it names
//! ... stage B ...
//! dev.mark("B")?;
//! for (label, us) in dev.stage_times()? { .. }   // [("A", t_A), ("B", t_B)], marks cleared
//! dev.set_profiling(false);
//! ```
//!
//! - [`Device::set_profiling`] turns recording on or off for one device (off by default);
//! - [`Device::mark`] records the position of the stream at this point of the host program.
//!   **Off, it does nothing but one atomic load** (no stream operation, no allocation, no
//!   lock), so a head can leave its marks in place (while another device of the process
//!   profiles, a mark of a device that does not also takes a lock and scans the table: still
//!   no stream operation, no allocation). On, it records a CUDA event on the
//!   device's stream (events with timing, created on the first steps and reused, so a step
//!   creates none once the pool is as large as its number of marks), or on the CPU execution
//!   (synchronous) takes `Instant::now()`. A mark is never a stream operation in the sense of
//!   [`Device::stream_ops`]: profiling changes no count.
//! - [`Device::stage_times`] synchronises and returns, for every mark after the first, its
//!   label and the microseconds since the previous mark; then clears the marks.
//!   [`Device::stages`] is the same with the stream operations issued in each stage (the
//!   difference of [`Device::stream_ops`] between the two marks).
//!
//! **During a graph capture marks are skipped** ([`Device::is_capturing`]): they return
//! `Ok(())` and record nothing, so a head's marks do not stop its step from being captured,
//! and a graph never contains them (a replayed step is timed as a whole). Per-stage times are
//! therefore those of uncaptured steps: on a GPU a stage that is host-bound (launches issued
//! more slowly than the GPU runs them) shows the launch time, not the kernels' time, which is
//! exactly what a graph removes. [`Device::stage_times`] itself synchronises, so it is
//! refused during a capture (a typed [`Error::Capture`](crate::Error::Capture); the marks
//! are kept).
//!
//! The timing is the stream's own on CUDA (`cuEventElapsedTime`, resolution about 0.5 us),
//! wall-clock on the CPU execution.
//!
//! Implementation note: a [`Device`] has no field for this state (the runtime's core is kept
//! unchanged), so it lives in one process-wide table keyed by the device's counters (an
//! allocation that does not move with the `Device` value); entries of dropped devices are
//! pruned by the next profiling call of any device. A counter of devices with profiling on
//! is what [`Device::mark`] loads when off.

use super::memory::Counters;
use super::{DevInner, Device};
use crate::error::Result;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Instant;

/// How many devices of the process have profiling on. While zero, [`Device::mark`] returns
/// after loading it.
static PROFILING: AtomicUsize = AtomicUsize::new(0);
/// The state of every device with profiling on.
static STATES: Mutex<Vec<State>> = Mutex::new(Vec::new());

/// One stage of a profiled interval (see [`Device::stages`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stage {
    /// The label of the mark that ended the stage.
    pub label: &'static str,
    /// Microseconds from the previous mark to this one (on CUDA, of the stream's timeline).
    pub micros: f64,
    /// Stream operations ([`Device::stream_ops`]) issued between the two marks.
    pub stream_ops: u64,
}

/// The profiling state of one device.
struct State {
    /// The device's counters: its identity (kept allocated by the `Weak`, so never reused
    /// by another device while this entry exists).
    device: Weak<Counters>,
    marks: Vec<Mark>,
    /// Timing events, reused: mark `i` of an interval is recorded into event `i`.
    #[cfg(feature = "cuda")]
    events: Vec<cudarc::driver::CudaEvent>,
}

struct Mark {
    label: &'static str,
    /// `Device::stream_ops` at the mark.
    ops: u64,
    /// The host time (CPU execution); `None` on CUDA, where event `i` holds the time.
    at: Option<Instant>,
}

fn table() -> MutexGuard<'static, Vec<State>> {
    STATES.lock().unwrap_or_else(|p| p.into_inner())
}

/// Drops the entries of devices that no longer exist (and their share of [`PROFILING`]).
fn prune(states: &mut Vec<State>) {
    let before = states.len();
    states.retain(|s| s.device.strong_count() > 0);
    PROFILING.fetch_sub(before - states.len(), Ordering::Relaxed);
}

impl Device {
    fn profile_entry<'a>(&self, states: &'a mut [State]) -> Option<&'a mut State> {
        let me = Arc::as_ptr(&self.counters);
        states
            .iter_mut()
            .find(|s| std::ptr::eq(s.device.as_ptr(), me))
    }

    /// Turns stage marks on or off for this device (off when a device is made). Either way
    /// the marks not yet read are discarded; off also releases the device's timing events.
    pub fn set_profiling(&self, on: bool) {
        let mut states = table();
        prune(&mut states);
        let me = Arc::as_ptr(&self.counters);
        let at = states
            .iter()
            .position(|s| std::ptr::eq(s.device.as_ptr(), me));
        match (at, on) {
            (Some(i), true) => states[i].marks.clear(),
            (Some(i), false) => {
                states.swap_remove(i);
                PROFILING.fetch_sub(1, Ordering::Relaxed);
            }
            (None, true) => {
                states.push(State {
                    device: Arc::downgrade(&self.counters),
                    marks: Vec::new(),
                    #[cfg(feature = "cuda")]
                    events: Vec::new(),
                });
                PROFILING.fetch_add(1, Ordering::Relaxed);
            }
            (None, false) => {}
        }
    }

    /// Whether stage marks are on for this device ([`Device::set_profiling`]).
    pub fn is_profiling(&self) -> bool {
        if PROFILING.load(Ordering::Relaxed) == 0 {
            return false;
        }
        self.profile_entry(&mut table()).is_some()
    }

    /// Marks the end of the stage `label` at this point of the device's stream (see the
    /// [module documentation](self)). Off: one atomic load, nothing else. Skipped (`Ok`,
    /// nothing recorded) during a graph capture. Never counted as a stream operation.
    /// Errors: on CUDA, creating or recording the timing event failed.
    #[inline]
    pub fn mark(&self, label: &'static str) -> Result<()> {
        if PROFILING.load(Ordering::Relaxed) == 0 {
            return Ok(());
        }
        self.mark_on(label)
    }

    #[cold]
    fn mark_on(&self, label: &'static str) -> Result<()> {
        if self.is_capturing() {
            return Ok(());
        }
        let mut states = table();
        prune(&mut states);
        let Some(state) = self.profile_entry(&mut states) else {
            return Ok(());
        };
        let ops = self.counters.ops();
        match &self.inner {
            DevInner::Cpu => state.marks.push(Mark {
                label,
                ops,
                at: Some(Instant::now()),
            }),
            #[cfg(feature = "cuda")]
            DevInner::Cuda(c) => {
                let i = state.marks.len();
                if state.events.len() <= i {
                    let flags = cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT;
                    let ev = c
                        .stream()
                        .context()
                        .new_event(Some(flags))
                        .map_err(|e| event_err("create a timing event", e))?;
                    state.events.push(ev);
                }
                state.events[i]
                    .record(c.stream())
                    .map_err(|e| event_err("record a timing event", e))?;
                state.marks.push(Mark {
                    label,
                    ops,
                    at: None,
                });
            }
            #[cfg(not(feature = "cuda"))]
            DevInner::Cuda(c) => match **c {},
        }
        Ok(())
    }

    /// The stages since profiling was turned on or last read: for every mark after the first,
    /// its label and the microseconds since the previous mark, in mark order; then clears the
    /// marks (the next interval starts empty: mark its start again). Synchronises the device.
    /// Empty when profiling is off or fewer than two marks were recorded. Errors: a capture in
    /// progress (marks kept), or an error of the device's pending work.
    pub fn stage_times(&self) -> Result<Vec<(&'static str, f64)>> {
        Ok(self
            .stages()?
            .into_iter()
            .map(|s| (s.label, s.micros))
            .collect())
    }

    /// [`stage_times`](Self::stage_times) with the stream operations of each stage.
    pub fn stages(&self) -> Result<Vec<Stage>> {
        if PROFILING.load(Ordering::Relaxed) == 0 {
            return Ok(Vec::new());
        }
        self.synchronize()?;
        let mut states = table();
        prune(&mut states);
        let Some(state) = self.profile_entry(&mut states) else {
            return Ok(Vec::new());
        };
        let marks = std::mem::take(&mut state.marks);
        let mut out = Vec::with_capacity(marks.len().saturating_sub(1));
        for (i, w) in marks.windows(2).enumerate() {
            let micros = match (w[0].at, w[1].at) {
                (Some(a), Some(b)) => b.saturating_duration_since(a).as_secs_f64() * 1e6,
                #[cfg(feature = "cuda")]
                _ => {
                    let ms = state.events[i]
                        .elapsed_ms(&state.events[i + 1])
                        .map_err(|e| event_err("read a timing event", e))?;
                    f64::from(ms).max(0.0) * 1e3
                }
                #[cfg(not(feature = "cuda"))]
                _ => unreachable!("marks without a host time exist only on CUDA (index {i})"),
            };
            out.push(Stage {
                label: w[1].label,
                micros,
                stream_ops: w[1].ops - w[0].ops,
            });
        }
        Ok(out)
    }
}

#[cfg(feature = "cuda")]
fn event_err(op: &str, e: cudarc::driver::DriverError) -> crate::error::Error {
    crate::error::Error::Device {
        op: op.into(),
        message: e.to_string(),
        source: Some(crate::error::DeviceSource::new(e)),
    }
}

#[cfg(all(test, feature = "cpu-exec"))]
mod tests {
    use super::super::DType;
    use super::*;
    use crate::error::Error;
    use std::time::Duration;

    /// Some stream operations: an allocation (its memset) and a download (a copy).
    fn work(dev: &Device) -> u64 {
        let before = dev.stream_ops();
        let b = dev.alloc_zeros(DType::F32, 64).unwrap();
        let _: Vec<f32> = dev.download(&b).unwrap();
        dev.stream_ops() - before
    }

    #[test]
    fn marks_give_labelled_stages_and_clear() {
        let dev = Device::cpu();
        dev.set_profiling(true);
        assert!(dev.is_profiling());
        dev.mark("start").unwrap();
        let ops = work(&dev);
        dev.mark("work").unwrap();
        std::thread::sleep(Duration::from_millis(3));
        dev.mark("sleep").unwrap();
        dev.mark("nothing").unwrap();
        let s = dev.stages().unwrap();
        let labels: Vec<_> = s.iter().map(|s| s.label).collect();
        assert_eq!(labels, ["work", "sleep", "nothing"]);
        assert!(s.iter().all(|s| s.micros >= 0.0 && s.micros.is_finite()));
        assert!(s[1].micros >= 3000.0, "{s:?}");
        assert_eq!(ops, 2);
        assert_eq!(
            s.iter().map(|s| s.stream_ops).collect::<Vec<_>>(),
            [ops, 0, 0]
        );
        // Read once: the next interval starts empty.
        assert!(dev.stage_times().unwrap().is_empty());
        dev.mark("a").unwrap();
        dev.mark("b").unwrap();
        let t = dev.stage_times().unwrap();
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].0, "b");
        dev.set_profiling(false);
        assert!(!dev.is_profiling());
    }

    #[test]
    fn off_records_nothing() {
        let dev = Device::cpu();
        assert!(!dev.is_profiling());
        dev.mark("a").unwrap();
        work(&dev);
        dev.mark("b").unwrap();
        assert!(dev.stage_times().unwrap().is_empty());
        // Turned off: the marks not read are discarded, later marks ignored.
        dev.set_profiling(true);
        dev.mark("a").unwrap();
        dev.mark("b").unwrap();
        dev.set_profiling(false);
        dev.mark("c").unwrap();
        assert!(dev.stage_times().unwrap().is_empty());
        // Turned on again: starts empty.
        dev.set_profiling(true);
        dev.mark("d").unwrap();
        assert!(dev.stage_times().unwrap().is_empty());
        dev.set_profiling(false);
    }

    #[test]
    fn marks_are_not_stream_operations() {
        let dev = Device::cpu();
        for on in [false, true] {
            dev.set_profiling(on);
            let before = (dev.stream_ops(), dev.memory_stats());
            for _ in 0..10 {
                dev.mark("m").unwrap();
            }
            assert_eq!((dev.stream_ops(), dev.memory_stats()), before);
            let _ = dev.stage_times().unwrap();
            // Reading the stages synchronises, but issues no stream operation either.
            assert_eq!(dev.stream_ops(), before.0);
        }
        dev.set_profiling(false);
    }

    #[test]
    fn marks_are_per_device_and_skipped_in_a_capture() {
        let dev = Device::cpu();
        let other = Device::cpu();
        dev.set_profiling(true);
        other.mark("x").unwrap();
        other.mark("y").unwrap();
        assert!(!other.is_profiling());
        assert!(other.stage_times().unwrap().is_empty());

        let mut buf = dev.alloc_zeros(DType::F32, 8).unwrap();
        let src = dev.alloc_zeros(DType::F32, 8).unwrap();
        dev.mark("start").unwrap();
        dev.begin_capture().unwrap();
        dev.mark("captured").unwrap(); // skipped
        dev.copy_into(&mut buf, &src).unwrap();
        // Reading the stages synchronises: refused during a capture, the marks are kept.
        assert!(matches!(dev.stage_times(), Err(Error::Capture { .. })));
        let graph = dev.end_capture().unwrap();
        graph.launch().unwrap();
        dev.mark("after").unwrap();
        let s = dev.stages().unwrap();
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].label, "after");
        // The recorded copy and the graph launch.
        assert_eq!(s[0].stream_ops, 2);
        dev.set_profiling(false);
    }

    #[test]
    fn a_dropped_device_leaves_no_entry() {
        let dev = Device::cpu();
        dev.set_profiling(true);
        dev.mark("a").unwrap();
        let me = Arc::as_ptr(&dev.counters);
        drop(dev);
        // Any profiling call prunes it.
        let other = Device::cpu();
        other.set_profiling(false);
        assert!(!table().iter().any(|s| std::ptr::eq(s.device.as_ptr(), me)));
    }
}
