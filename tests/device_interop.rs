//! Interoperation with a trainer's cudarc stream and buffers: [`Device::cuda_on_stream`],
//! [`Device::from_cuda_slice`], [`Device::into_cuda_slice`].
//!
//! On a GPU: a head on a trainer's non-blocking stream, fed with the trainer's slices (moved
//! in without a copy) and handing its outputs back as slices, gives bit-identical logits and
//! feature gradients to a head on the default stream fed through host uploads (the kernels
//! are deterministic, so any difference is a plumbing error: wrong stream order, wrong
//! length, wrong bytes). Without a GPU that part prints "CUDA part skipped: <reason>"; the
//! typed errors of the CPU execution are tested everywhere.

mod common;
use common::Rng;
use implicit_etf::runtime::cudarc::driver::CudaContext;
use implicit_etf::runtime::{DType, Device};
use implicit_etf::{DeviceHead, Error, HeadConfig};

#[test]
fn cpu_execution_has_no_cuda_slices() {
    let dev = Device::cpu();
    assert!(dev.cuda_stream().is_none());
    let buf = dev.upload(&[1.0f32, 2.0]).unwrap();
    // Wrong element type first, then the backend.
    match dev.into_cuda_slice::<f64>(buf) {
        Err(Error::Device { op, message, .. }) => {
            assert_eq!(op, "into_cuda_slice");
            assert!(message.contains("F32"), "{message}");
        }
        other => panic!("expected a type error, got {other:?}"),
    }
    let buf = dev.upload(&[1.0f32, 2.0]).unwrap();
    match dev.into_cuda_slice::<f32>(buf) {
        Err(Error::Device { op, .. }) => assert_eq!(op, "into_cuda_slice"),
        other => panic!("expected a backend error, got {other:?}"),
    }
}

#[test]
fn head_on_a_trainer_stream_matches_the_default_stream() {
    let reference_dev = match Device::cuda(0) {
        Ok(d) => d,
        Err(e) => {
            println!("CUDA part skipped: {e}");
            return;
        }
    };
    let ctx = CudaContext::new(0).unwrap();
    let stream = ctx.new_stream().unwrap();
    let dev = Device::cuda_on_stream(stream.clone()).unwrap();
    assert_eq!(
        dev.cuda_stream().unwrap().cu_stream(),
        stream.cu_stream(),
        "the device does not queue on the caller's stream"
    );
    let (n, d, k) = (48, 20, 6);
    let cfg = HeadConfig::new(d, k);
    let mut head = DeviceHead::new(dev, cfg.clone()).unwrap();
    let mut reference = DeviceHead::new(reference_dev, cfg).unwrap();
    let mut rng = Rng(17);
    let means = rng.normals(k * d);
    // A second trainer stream: a slice written there must be seen after from_cuda_slice.
    let other = ctx.new_stream().unwrap();
    for step in 0..3 {
        let y: Vec<u32> = (0..n).map(|i| ((i + step) % k) as u32).collect();
        let x: Vec<f32> = (0..n * d)
            .map(|e| (means[y[e / d] as usize * d + e % d] + 0.3 * rng.normal()) as f32)
            .collect();
        let dz: Vec<f32> = (0..n * k).map(|_| (1e-2 * rng.normal()) as f32).collect();

        let xs = if step == 1 {
            other.clone_htod(&x).unwrap()
        } else {
            stream.clone_htod(&x).unwrap()
        };
        let xb = head.device().from_cuda_slice(xs).unwrap();
        let yb = head
            .device()
            .from_cuda_slice(stream.clone_htod(&y).unwrap())
            .unwrap();
        assert_eq!((xb.dtype(), xb.len()), (DType::F32, n * d));
        let logits = head.forward(&xb, &yb).unwrap();
        let dzb = head
            .device()
            .from_cuda_slice(stream.clone_htod(&dz).unwrap())
            .unwrap();
        let d_raw = head.backward(&dzb).unwrap();
        let logits_s = head.device().into_cuda_slice::<f32>(logits).unwrap();
        let d_raw_s = head.device().into_cuda_slice::<f32>(d_raw).unwrap();
        let logits_h = stream.clone_dtoh(&logits_s).unwrap();
        let d_raw_h = stream.clone_dtoh(&d_raw_s).unwrap();

        let rdev = reference.device();
        let (rx, ry) = (rdev.upload(&x).unwrap(), rdev.upload(&y).unwrap());
        let rl = reference.forward(&rx, &ry).unwrap();
        let rdz = reference.device().upload(&dz).unwrap();
        let rg = reference.backward(&rdz).unwrap();
        let want_l: Vec<f32> = reference.device().download(&rl).unwrap();
        let want_g: Vec<f32> = reference.device().download(&rg).unwrap();
        assert!(logits_h == want_l, "step {step}: logits differ");
        assert!(d_raw_h == want_g, "step {step}: feature gradients differ");
    }
    // Typed errors on the GPU too; an empty slice is an empty buffer.
    let buf = head.device().upload(&[1.0f32]).unwrap();
    assert!(matches!(
        head.device().into_cuda_slice::<f64>(buf),
        Err(Error::Device { .. })
    ));
    let empty = head
        .device()
        .from_cuda_slice(stream.alloc_zeros::<f32>(0).unwrap())
        .unwrap();
    assert!(empty.is_empty());
}
