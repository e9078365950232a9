//! No allocation in steady state: after its first steps, a `CpuHead` training step made of
//! `forward_into` and `backward_into` allocates nothing, on any thread (the products run on
//! rayon's pool; `docs/performance.md`).
//!
//! A counting global allocator counts every allocation and reallocation of the process. The
//! binary has one test function, so nothing else runs while it counts.
//!
//! The steps run inside rayon's pool (`rayon::scope`), as a trainer that wants no allocation
//! at all runs them: a product's panels are then queued on the worker's own deque. Called
//! from a thread outside the pool, each product's panels go through rayon's global injector,
//! which allocates a 1.5 KB block every 63 jobs; the test also measures that case and
//! bounds it (`docs/performance.md`).

mod common;
use common::Rng;
use implicit_etf::{cross_entropy, AbsentClassPolicy, CpuHead, HeadConfig, Real};
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

struct Counting;
static ALLOCS: AtomicUsize = AtomicUsize::new(0);
static BYTES: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards every call to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::SeqCst);
        BYTES.fetch_add(l.size(), Ordering::SeqCst);
        // SAFETY: the caller's contract is passed on unchanged.
        unsafe { System.alloc(l) }
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::SeqCst);
        BYTES.fetch_add(l.size(), Ordering::SeqCst);
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, size: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::SeqCst);
        BYTES.fetch_add(size, Ordering::SeqCst);
        // SAFETY: as above.
        unsafe { System.realloc(p, l, size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Runs `warm` steps, then counts the allocations of `counted` more; returns
/// `(allocations, bytes, Newton steps of the counted solves)`.
fn steady_state<T: Real>(
    cfg: HeadConfig,
    n: usize,
    warm: usize,
    counted: usize,
    seed: u64,
    in_pool: bool,
) -> (usize, usize, usize) {
    let (d, k) = (cfg.dim, cfg.classes);
    let mut head = CpuHead::<T>::new(cfg).unwrap();
    let mut rng = Rng(seed);
    // Batches, logits, gradients: all made before counting.
    let batches: Vec<(Vec<T>, Vec<u32>)> = (0..warm + counted)
        .map(|s| {
            let raw: Vec<T> = rng.normals(n * d).into_iter().map(T::from_f64).collect();
            // Class s % K absent from every other batch (the absent-class paths run too).
            let labels: Vec<u32> = (0..n as u32)
                .map(|i| {
                    let c = i % k as u32;
                    if s % 2 == 1 && c == (s % k) as u32 {
                        (c + 1) % k as u32
                    } else {
                        c
                    }
                })
                .collect();
            (raw, labels)
        })
        .collect();
    let mut logits = vec![T::from_f64(0.0); n * k];
    let mut run = || -> (usize, usize, usize) {
        let mut d_raw = vec![T::from_f64(0.0); n * d];
        let mut d_logits = vec![T::from_f64(0.0); n * k];
        let (mut allocs, mut bytes, mut newton) = (0, 0, 0);
        for (s, (raw, labels)) in batches.iter().enumerate() {
            // The loss gradient is computed outside the counted region (cross_entropy allocates).
            let counting = s >= warm;
            let (a0, b0) = (ALLOCS.load(Ordering::SeqCst), BYTES.load(Ordering::SeqCst));
            head.forward_into(raw, labels, &mut logits).unwrap();
            let (a1, b1) = (ALLOCS.load(Ordering::SeqCst), BYTES.load(Ordering::SeqCst));
            let (_, g) = cross_entropy(&logits, labels, k).unwrap();
            d_logits.copy_from_slice(&g);
            drop(g);
            let (a2, b2) = (ALLOCS.load(Ordering::SeqCst), BYTES.load(Ordering::SeqCst));
            head.backward_into(&d_logits, &mut d_raw).unwrap();
            let (a3, b3) = (ALLOCS.load(Ordering::SeqCst), BYTES.load(Ordering::SeqCst));
            if counting {
                eprintln!(
                    "step {s}: fwd {} allocs {} bytes, bwd {} allocs; report {:?}",
                    a1 - a0,
                    b1 - b0,
                    a3 - a2,
                    head.solve_report().unwrap().unwrap()
                );
                allocs += (a1 - a0) + (a3 - a2);
                bytes += (b1 - b0) + (b3 - b2);
                newton += head.solve_report().unwrap().unwrap().steps;
            }
        }
        assert!(d_raw.iter().all(|v| v.to_f64().is_finite()));
        (allocs, bytes, newton)
    };
    if in_pool {
        let mut out = (0, 0, 0);
        rayon::scope(|_| out = run());
        out
    } else {
        run()
    }
}

#[test]
fn a_training_step_allocates_nothing_after_the_first_steps() {
    // Start rayon's global pool and run a job on every worker first: the workers initialise
    // themselves (thread-local state, deques) asynchronously after the pool is built, which
    // must not fall into a counted step.
    rayon::broadcast(|_| ());
    // (d, K, N): small; products above the parallel threshold (2^21 multiply-adds: the
    // d K K products at (512, 100), the N d K ones at N = 96), so rayon's panels run; and
    // K = 6 with a large condition number of G, where the K x K Newton step runs.
    let shapes = [(40usize, 6usize, 24usize), (512, 100, 96)];
    let mut newton_seen = 0;
    for &(d, k, n) in &shapes {
        for policy in [AbsentClassPolicy::Hold, AbsentClassPolicy::Reference] {
            for tau in [Some(5.0), None] {
                let cfg = HeadConfig::new(d, k).with_policy(policy).with_tau(tau);
                let what = format!("d={d} K={k} N={n} {policy:?} tau={tau:?}");
                let (a, b, nw) = steady_state::<f64>(cfg.clone(), n, 3, 3, 0xa110c, true);
                assert_eq!(
                    (a, b),
                    (0, 0),
                    "CpuHead<f64> {what}: allocations (count, bytes)"
                );
                newton_seen += nw;
                let (a, b, nw) = steady_state::<f32>(cfg, n, 3, 3, 0xa110c, true);
                assert_eq!(
                    (a, b),
                    (0, 0),
                    "CpuHead<f32> {what}: allocations (count, bytes)"
                );
                newton_seen += nw;
            }
        }
    }
    // The counted steps took the K x K Newton step somewhere, so that path is covered too.
    assert!(
        newton_seen > 0,
        "no counted solve took the K x K Newton step"
    );
    // Outside the pool: only rayon's injector blocks (1520 bytes per 63 jobs; a step at
    // (512, 100) queues about 10 panel jobs), so at most one block per counted step.
    let cfg = HeadConfig::new(512, 100);
    let (a, b, _) = steady_state::<f32>(cfg, 96, 3, 6, 0xa110c, false);
    assert!(
        a <= 6 && b <= 6 * 1600,
        "outside the pool: {a} allocations, {b} bytes"
    );
}
