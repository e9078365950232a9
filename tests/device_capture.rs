//! A training step captured once and replayed: [`DeviceHead::forward_into`] /
//! [`DeviceHead::backward_into`] allocate nothing after the first step, and a step recorded
//! with [`Device::begin_capture`] / [`Device::end_capture`] and replayed with
//! [`Graph::launch`](implicit_etf::runtime::Graph::launch) on refilled input buffers gives the
//! same logits, feature gradients, state and solve report as the same steps called one by
//! one.
//!
//! Oracle: a twin head on the same device, fed the same batches through the ordinary calls.
//! The kernels are deterministic (no floating-point atomics), so the comparison is bit for
//! bit: any difference means the replay ran different work or read a stale buffer. On the
//! CPU execution the capture is the crate's recording of launches; on a GPU it is a CUDA
//! stream capture (that part prints "CUDA part skipped: <reason>" without a GPU).

mod common;
use common::Rng;
use implicit_etf::runtime::cudarc::driver::CudaContext;
use implicit_etf::runtime::{Arg, Backend, DType, Device, LaunchConfig, MemoryStats};
use implicit_etf::{DeviceHead, DeviceOptions, Error, HeadConfig, Validation};

const N: usize = 24;
const D: usize = 12;
const K: usize = 4;

/// A batch: features (N x d f32), labels (u32, every class present), `dL/dlogits`.
struct Batch {
    raw: Vec<f32>,
    labels: Vec<u32>,
    d_logits: Vec<f32>,
}

fn batches(count: usize, n: usize, seed: u64) -> Vec<Batch> {
    let mut rng = Rng(seed);
    let means = rng.normals(K * D);
    (0..count)
        .map(|_| {
            let labels: Vec<u32> = (0..n).map(|i| ((i + rng.below(3)) % K) as u32).collect();
            let raw = (0..n * D)
                .map(|j| (2.0 * means[labels[j / D] as usize * D + j % D] + rng.normal()) as f32)
                .collect();
            let d_logits = (0..n * K).map(|_| (0.01 * rng.normal()) as f32).collect();
            Batch {
                raw,
                labels,
                d_logits,
            }
        })
        .collect()
}

fn deferred() -> DeviceOptions {
    DeviceOptions::default().with_validation(Validation::Deferred)
}

/// Pairs of devices sharing one queue, from [`Device::all_available`]: the CPU execution,
/// and on a GPU two devices on one non-default stream with cudarc's event tracking off (what
/// a capture needs).
fn device_pairs() -> Vec<(Device, Device)> {
    let (devs, skipped) = Device::all_available();
    if let Some(why) = &skipped {
        println!("CUDA part skipped: {why}");
    }
    assert!(!devs.is_empty(), "no device to test on: {skipped:?}");
    devs.into_iter()
        .map(|dev| match dev.backend() {
            Backend::Cpu => (Device::cpu(), Device::cpu()),
            Backend::Cuda => {
                let ctx = CudaContext::new(0).unwrap();
                // SAFETY: every launch and copy of this test on this context is queued on the
                // one stream below, so cudarc's cross-stream events are not needed.
                unsafe { ctx.disable_event_tracking() };
                let stream = ctx.new_stream().unwrap();
                (
                    Device::cuda_on_stream(stream.clone()).unwrap(),
                    Device::cuda_on_stream(stream).unwrap(),
                )
            }
        })
        .collect()
}

/// Step-wise outputs of a head: logits and feature gradients per step.
type Outputs = Vec<(Vec<f32>, Vec<f32>)>;

/// Runs `bs` through `head` with the `_into` calls; returns the outputs of every step.
fn run_steps(head: &mut DeviceHead, bs: &[Batch]) -> Outputs {
    let dev = head.device();
    let mut z = dev.alloc_zeros(DType::F32, N * K).unwrap();
    let mut g = dev.alloc_zeros(DType::F32, N * D).unwrap();
    let mut out = Vec::new();
    for b in bs {
        let x = head.device().upload(&b.raw).unwrap();
        let y = head.device().upload(&b.labels).unwrap();
        let dz = head.device().upload(&b.d_logits).unwrap();
        head.forward_into(&x, &y, &mut z).unwrap();
        head.backward_into(&dz, &mut g).unwrap();
        let dev = head.device();
        out.push((dev.download(&z).unwrap(), dev.download(&g).unwrap()));
    }
    head.check().unwrap();
    out
}

#[test]
fn steady_state_steps_allocate_and_free_nothing() {
    for validation in [Validation::Eager, Validation::Deferred] {
        let (devs, skipped) = Device::all_available();
        if let Some(why) = skipped {
            println!("CUDA part skipped: {why}");
        }
        for dev in devs {
            let name = format!("{} {validation:?}", dev.name());
            let opt = DeviceOptions::default()
                .with_validation(validation)
                .with_max_newton_steps(1);
            let mut head = DeviceHead::with_options(dev, HeadConfig::new(D, K), opt).unwrap();
            let bs = batches(6, N, 5);
            let d = head.device();
            let mut x = d.upload(&bs[0].raw).unwrap();
            let mut y = d.upload(&bs[0].labels).unwrap();
            let mut dz = d.upload(&bs[0].d_logits).unwrap();
            let mut z = d.alloc_zeros(DType::F32, N * K).unwrap();
            let mut g = d.alloc_zeros(DType::F32, N * D).unwrap();
            let mut before = MemoryStats::default();
            for (t, b) in bs.iter().enumerate() {
                // The first step solves on the host; the next two fill the two forward
                // workspaces; from the fourth on nothing changes.
                if t == 3 {
                    before = head.device().memory_stats();
                }
                let d = head.device();
                d.write(&mut x, &b.raw).unwrap();
                d.write(&mut y, &b.labels).unwrap();
                d.write(&mut dz, &b.d_logits).unwrap();
                head.forward_into(&x, &y, &mut z).unwrap();
                head.backward_into(&dz, &mut g).unwrap();
            }
            let after = head.device().memory_stats();
            assert_eq!(
                after, before,
                "{name}: steps 4-6 created or released device allocations"
            );
            assert!(head.device().workspace_bytes() > 0, "{name}: no workspace");
            // The scratch plan: every slot with its size and requesting line. Both forward
            // workspaces run the same code, so they hold the same plan; and it is the one a
            // later step uses (nothing was reallocated above).
            let plan = head.device().workspace_plan();
            let of = |w: usize| -> Vec<(usize, &str, u32)> {
                plan.iter()
                    .filter(|e| e.workspace == w)
                    .map(|e| (e.bytes, e.site.file(), e.site.line()))
                    .collect()
            };
            assert!(of(0).len() > 20, "{name}: forward plan {:?}", of(0));
            assert_eq!(of(0), of(1), "{name}: the two forward workspaces differ");
            assert!(!of(2).is_empty(), "{name}: no backward plan");
            assert!(
                plan.iter().all(|e| e.site.file().starts_with("src/gpu/")),
                "{name}: a slot requested outside the GPU head's stages"
            );
            // The allocating calls create exactly their outputs.
            let s0 = head.device().memory_stats();
            let logits = head.forward(&x, &y).unwrap();
            let grad = head.backward(&dz).unwrap();
            drop((logits, grad));
            let s1 = head.device().memory_stats();
            assert_eq!(
                (s1.created - s0.created, s1.released - s0.released),
                (2, 2),
                "{name}: forward/backward should allocate only the logits and the gradient"
            );
        }
    }
}

#[test]
fn captured_step_replays_like_eager_steps() {
    for (dev_a, dev_b) in device_pairs() {
        let name = dev_a.name();
        let bs = batches(7, N, 11);
        let cfg = HeadConfig::new(D, K);
        let opt = deferred().with_max_newton_steps(2);
        let mut a = DeviceHead::with_options(dev_a, cfg.clone(), opt).unwrap();
        let reference = run_steps(&mut a, &bs);

        let mut b = DeviceHead::with_options(dev_b, cfg, opt).unwrap();
        let first = run_steps(&mut b, &bs[..3]);
        assert_eq!(first[..], reference[..3], "{name}: the eager steps differ");
        let dev = b.device();
        let mut x = dev.upload(&bs[3].raw).unwrap();
        let mut y = dev.upload(&bs[3].labels).unwrap();
        let mut dz = dev.upload(&bs[3].d_logits).unwrap();
        let mut z = dev.upload(&vec![7.0f32; N * K]).unwrap();
        let mut g = dev.upload(&vec![7.0f32; N * D]).unwrap();
        let stats = dev.memory_stats();
        dev.begin_capture().unwrap();
        b.forward_into(&x, &y, &mut z).unwrap();
        b.backward_into(&dz, &mut g).unwrap();
        let graph = b.device().end_capture().unwrap();
        let dev = b.device();
        assert_eq!(dev.memory_stats(), stats, "{name}: the capture allocated");
        assert!(graph.buffers() > 10, "{name}: {graph:?}");
        // Recorded, not run: the outputs still hold what they held.
        assert_eq!(dev.download::<f32>(&z).unwrap(), vec![7.0; N * K]);
        assert_eq!(dev.download::<f32>(&g).unwrap(), vec![7.0; N * D]);
        for (t, batch) in bs.iter().enumerate().skip(3) {
            let dev = b.device();
            dev.write(&mut x, &batch.raw).unwrap();
            dev.write(&mut y, &batch.labels).unwrap();
            dev.write(&mut dz, &batch.d_logits).unwrap();
            graph.launch().unwrap();
            let got = (dev.download(&z).unwrap(), dev.download(&g).unwrap());
            assert!(
                got == reference[t],
                "{name}: replay of step {} differs from the eager step",
                t + 1
            );
        }
        b.check().unwrap();
        assert_eq!(dev_state(&b), dev_state(&a), "{name}: states differ");
        assert_eq!(
            b.solve_report().unwrap(),
            a.solve_report().unwrap(),
            "{name}: the solve report does not see the replayed step"
        );
        // A replayed step with a bad label fails on the device like an uncaptured one: the
        // typed error (index and value, recorded on the device) and an unchanged state.
        let before = dev_state(&b);
        let mut bad = bs[6].labels.clone();
        bad[5] = K as u32 + 2;
        b.device().write(&mut y, &bad).unwrap();
        graph.launch().unwrap();
        assert_eq!(
            b.check(),
            Err(Error::LabelOutOfRange {
                index: 5,
                label: K as i64 + 2,
                classes: K
            }),
            "{name}"
        );
        assert_eq!(
            dev_state(&b),
            before,
            "{name}: a failed replay changed the state"
        );
        // The replayed head goes on with ordinary calls like the twin.
        let more = batches(2, N, 12);
        assert_eq!(
            run_steps(&mut b, &more),
            run_steps(&mut a, &more),
            "{name}: steps after the replays differ"
        );
    }
}

/// The state as host vectors (moving means, step, alpha, seen flags, `Prox`), for exact
/// comparison.
fn dev_state(h: &DeviceHead) -> (Vec<f32>, u64, f64, Vec<bool>, Option<Vec<f64>>) {
    let s = h.export_state().unwrap();
    (
        s.moving.e,
        s.moving.step,
        s.moving.alpha,
        s.moving.seen,
        s.prox,
    )
}

fn expect_capture_error<T: std::fmt::Debug>(r: Result<T, Error>, want_op: &str) {
    match r {
        Err(Error::Capture { op, reason }) => {
            assert_eq!(op, want_op, "{reason}");
            assert!(reason.contains("captur"), "{reason}");
        }
        other => panic!("expected a capture error from {want_op}, got {other:?}"),
    }
}

#[test]
fn capture_refuses_what_cannot_be_replayed() {
    let dev = Device::cpu();
    let bs = batches(5, N, 21);
    let up = |d: &Device, b: &Batch| {
        (
            d.upload(&b.raw).unwrap(),
            d.upload(&b.labels).unwrap(),
            d.upload(&b.d_logits).unwrap(),
        )
    };
    // The device itself: no host traffic, no allocation, no nesting.
    let buf = dev.upload(&[1.0f32; 4]).unwrap();
    let mut buf2 = dev.upload(&[1.0f32; 4]).unwrap();
    let spare = dev.upload(&[1.0f32; 4]).unwrap();
    assert!(matches!(dev.end_capture(), Err(Error::Capture { .. })));
    dev.begin_capture().unwrap();
    assert!(dev.is_capturing());
    assert!(matches!(dev.begin_capture(), Err(Error::Capture { .. })));
    expect_capture_error(dev.alloc_zeros(DType::F32, 4), "allocate");
    expect_capture_error(dev.upload(&[1.0f32]), "upload");
    expect_capture_error(dev.download::<f32>(&buf), "download");
    expect_capture_error(dev.write(&mut buf2, &[2.0f32; 4]), "write");
    expect_capture_error(dev.synchronize(), "synchronize");
    expect_capture_error(dev.copy(&buf), "copy to a new buffer");
    dev.copy_into(&mut buf2, &buf).unwrap(); // capturable
    drop(buf); // kept alive by the recording: no release
    drop(spare); // released during the capture
    match dev.end_capture() {
        Err(Error::Capture { op, reason }) => {
            assert_eq!(op, "end_capture");
            assert!(reason.contains("released"), "{reason}");
        }
        other => panic!("a release during capture must fail end_capture, got {other:?}"),
    }
    assert!(!dev.is_capturing());

    // The head: only Deferred steps whose workspaces are filled (the fourth step on), and only
    // the `_into` calls. Without `tau` (the other tests use the default `tau`), so the
    // backward's raw-feature substitution is compared too.
    let cfg = HeadConfig::new(D, K).with_tau(None);
    let mut head = DeviceHead::with_options(Device::cpu(), cfg.clone(), deferred()).unwrap();
    let mut twin = DeviceHead::with_options(Device::cpu(), cfg.clone(), deferred()).unwrap();
    let mut z = head.device().alloc_zeros(DType::F32, N * K).unwrap();
    let mut g = head.device().alloc_zeros(DType::F32, N * D).unwrap();
    // One step on both heads (the head through `_into`, the twin allocating), comparing
    // the outputs bit for bit.
    let step = |head: &mut DeviceHead, twin: &mut DeviceHead, z: &mut _, g: &mut _, b| {
        let (x, y, dz) = up(head.device(), b);
        head.forward_into(&x, &y, z).unwrap();
        head.backward_into(&dz, g).unwrap();
        let (tx, ty, tdz) = up(twin.device(), b);
        let tz = twin.forward(&tx, &ty).unwrap();
        let tg = twin.backward(&tdz).unwrap();
        assert_eq!(
            head.device().download::<f32>(z).unwrap(),
            twin.device().download::<f32>(&tz).unwrap()
        );
        assert_eq!(
            head.device().download::<f32>(g).unwrap(),
            twin.device().download::<f32>(&tg).unwrap()
        );
    };
    for (t, b) in bs.iter().enumerate().take(3) {
        // Steps 1-3 cannot be captured (host solve, then empty workspaces): refused before
        // any work, so the uncaptured step that follows matches the twin's.
        let (x, y, _) = up(head.device(), b);
        head.device().begin_capture().unwrap();
        expect_capture_error(head.forward(&x, &y), "allocate");
        match head.forward_into(&x, &y, &mut z) {
            Err(Error::Capture { op, .. }) => assert_eq!(op, "forward_into"),
            other => panic!("step {} cannot be captured, got {other:?}", t + 1),
        }
        let graph = head.device().end_capture().unwrap();
        assert_eq!(
            graph.recorded_ops(),
            Some(0),
            "a refused step recorded work"
        );
        step(&mut head, &mut twin, &mut z, &mut g, b);
    }
    // Step 4 can, through the `_into` calls only.
    let (x, y, dz) = up(head.device(), &bs[3]);
    head.device().begin_capture().unwrap();
    expect_capture_error(head.forward(&x, &y), "allocate");
    head.forward_into(&x, &y, &mut z).unwrap();
    expect_capture_error(head.backward(&dz), "allocate");
    let graph = head.device().end_capture().unwrap();
    // A steady-state forward is 14 to 16 stream operations (`tests/stream_ops.rs`).
    assert!(graph.recorded_ops().unwrap() >= 14);
    drop(graph); // never launched: the step did not run, though the host saw it
                 // A trainer abandoning a capture resynchronises the state; then the heads agree again.
    head.import_state(twin.export_state().unwrap()).unwrap();
    twin.import_state(twin.export_state().unwrap()).unwrap();
    step(&mut head, &mut twin, &mut z, &mut g, &bs[4]);

    // Eager validation reads the status word back: refused before any work.
    let mut eager = DeviceHead::new(Device::cpu(), cfg).unwrap();
    // Outputs on the eager head's own device (a buffer of another device is an error).
    let mut z = eager.device().alloc_zeros(z.dtype(), z.len()).unwrap();
    let (x, y, _) = up(eager.device(), &bs[0]);
    eager.forward_into(&x, &y, &mut z).unwrap();
    let before = dev_state(&eager);
    eager.device().begin_capture().unwrap();
    match eager.forward_into(&x, &y, &mut z) {
        Err(Error::Capture { op, reason }) => {
            assert_eq!(op, "forward_into");
            assert!(reason.contains("Deferred"), "{reason}");
        }
        other => panic!("an Eager step cannot be captured, got {other:?}"),
    }
    let graph = eager.device().end_capture().unwrap();
    assert_eq!(graph.recorded_ops(), Some(0));
    assert_eq!(dev_state(&eager), before);
}

#[test]
fn devices_heads_and_buffers_cross_threads() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Device>();
    send_sync::<DeviceHead>();
    send_sync::<implicit_etf::runtime::Buffer>();
    // A head moved to another thread after a step goes on exactly like a twin that stayed
    // (the CPU execution serialises memory access across threads).
    let new = || DeviceHead::with_options(Device::cpu(), HeadConfig::new(D, K), deferred());
    let (mut head, mut twin) = (new().unwrap(), new().unwrap());
    let bs = batches(2, N, 31);
    run_steps(&mut head, &bs[..1]);
    let stayed = run_steps(&mut twin, &bs);
    let second = batches(2, N, 31).split_off(1);
    let moved = std::thread::spawn(move || run_steps(&mut head, &second))
        .join()
        .unwrap();
    assert_eq!(moved[..], stayed[1..]);
}

#[test]
fn a_graph_keeps_its_buffers_alive() {
    let dev = Device::cpu();
    let x = dev.upload(&[1.0f32, 2.0]).unwrap();
    let y = dev.upload(&[10.0f32, 20.0]).unwrap();
    dev.begin_capture().unwrap();
    let cfg = LaunchConfig::new((1, 1, 1), (32, 1, 1));
    // SAFETY: every buffer is allocated for the sizes and launch shape given.
    unsafe {
        dev.launch(
            implicit_etf::kernels::by_name("add_assign_f32").unwrap(),
            cfg,
            &[Arg::Buf(&x), Arg::Buf(&y), Arg::I64(2)],
        )
    }
    .unwrap();
    let graph = dev.end_capture().unwrap();
    assert_eq!((graph.recorded_ops(), graph.buffers()), (Some(1), 2));
    let live = dev.memory_stats().live();
    let (xc, yc) = (dev.copy(&x).unwrap(), dev.copy(&y).unwrap());
    drop((x, y));
    // Dropped by the caller, still held by the graph.
    assert_eq!(dev.memory_stats().live(), live + 2);
    graph.launch().unwrap();
    drop(graph);
    assert_eq!(dev.memory_stats().live(), live);
    assert_eq!(dev.download::<f32>(&xc).unwrap(), [1.0, 2.0]);
    assert_eq!(dev.download::<f32>(&yc).unwrap(), [10.0, 20.0]);
}

#[test]
fn into_calls_reject_bad_outputs_and_change_nothing() {
    let new = || DeviceHead::with_options(Device::cpu(), HeadConfig::new(D, K), deferred());
    let (mut head, mut twin) = (new().unwrap(), new().unwrap());
    let bs = batches(2, N, 41);
    run_steps(&mut head, &bs[..1]);
    run_steps(&mut twin, &bs[..1]);
    let dev = head.device();
    let x = dev.upload(&bs[1].raw).unwrap();
    let y = dev.upload(&bs[1].labels).unwrap();
    let dz = dev.upload(&bs[1].d_logits).unwrap();
    let before = dev_state(&head);
    for (mut z, want) in [
        (dev.alloc_zeros(DType::F32, N * K + 1).unwrap(), "shape"),
        (dev.alloc_zeros(DType::F64, N * K).unwrap(), "type"),
    ] {
        match (head.forward_into(&x, &y, &mut z), want) {
            (Err(Error::ShapeMismatch { what, .. }), "shape")
            | (Err(Error::InvalidParameter { name: what, .. }), "type") => {
                assert_eq!(what, "logits")
            }
            (other, _) => panic!("bad logits buffer ({want}): {other:?}"),
        }
    }
    assert_eq!(
        dev_state(&head),
        before,
        "a rejected forward changed the state"
    );
    let mut z = head.device().alloc_zeros(DType::F32, N * K).unwrap();
    head.forward_into(&x, &y, &mut z).unwrap();
    for (mut g, want) in [
        (
            head.device().alloc_zeros(DType::F32, N * D - 1).unwrap(),
            "shape",
        ),
        (
            head.device().alloc_zeros(DType::BF16, N * D).unwrap(),
            "type",
        ),
    ] {
        match (head.backward_into(&dz, &mut g), want) {
            (Err(Error::ShapeMismatch { what, .. }), "shape")
            | (Err(Error::InvalidParameter { name: what, .. }), "type") => {
                assert_eq!(what, "d_raw")
            }
            (other, _) => panic!("bad gradient buffer ({want}): {other:?}"),
        }
    }
    // The pending backward survived: the step completes exactly like the twin's.
    let mut g = head.device().alloc_zeros(DType::F32, N * D).unwrap();
    head.backward_into(&dz, &mut g).unwrap();
    let got = (
        head.device().download::<f32>(&z).unwrap(),
        head.device().download::<f32>(&g).unwrap(),
    );
    assert_eq!(got, run_steps(&mut twin, &bs[1..])[0]);
}
