//! The NCCL collective ([`Collective::nccl`]) on a GPU: a world-size-1 group, whose
//! all-reduce is the identity, so a [`DeviceHead`] with it must give what the same head
//! without one gives on the same inputs.
//!
//! - `nccl_world_size_one_step` (GPU): runs when `IMPLICIT_ETF_DEVICE=cuda`, CUDA device 0
//!   opens and `libnccl` loads (`libnccl.so`: PyTorch's `nvidia-nccl-cu13` ships
//!   `libnccl.so.2`, for which `scripts/gpu-check.sh` makes the link). It checks that an
//!   all-reduce of an `f32` and an `f64` buffer leaves them bit for bit unchanged, then runs 3
//!   training steps of a head with the collective against a head without one: logits,
//!   feature gradients and `export_state()` within 1e-6 relative (both run the same kernels
//!   and a one-rank sum is exact, so any difference is a plumbing error: a stats buffer
//!   packed or unpacked wrongly, a reduction on the wrong stream). Otherwise it prints
//!   `NCCL check skipped: <reason>` (to stderr) and passes; on success it prints
//!   `NCCL world-size-1 step: pass`, which `scripts/gpu-check.sh` reads (it runs this test
//!   with `--nocapture`).
//! - The rest runs everywhere: the typed errors of an NCCL group without a GPU, and the NCCL
//!   id's hex form.

#![cfg(feature = "cuda")]

mod common;
use common::{rel, Rng};
use implicit_etf::collective::RendezvousSpec;
use implicit_etf::runtime::nccl::{nccl_available, NcclId};
use implicit_etf::runtime::{DType, Device};
use implicit_etf::Collective;
use implicit_etf::{DeviceHead, DeviceOptions, Error, HeadConfig};
use std::io::Write;

const N: usize = 64;
const D: usize = 32;
const K: usize = 10;
const STEPS: usize = 3;
/// Relative (Frobenius) tolerance between the heads with and without the collective.
const TOL: f64 = 1e-6;

/// CUDA device 0 with a loadable libnccl, or `None` after printing why the GPU part is
/// skipped.
fn cuda_with_nccl() -> Option<Device> {
    let skip = |why: String| {
        // One write, so that the line stays whole among the harness's output.
        let line = format!("NCCL check skipped: {why}\n");
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
        None
    };
    match std::env::var("IMPLICIT_ETF_DEVICE").as_deref() {
        Ok("cuda") => {}
        Ok(other) => return skip(format!("IMPLICIT_ETF_DEVICE={other}, not cuda")),
        Err(_) => return skip("IMPLICIT_ETF_DEVICE is not cuda (not set)".into()),
    }
    let dev = match Device::cuda(0) {
        Ok(d) => d,
        Err(e) => return skip(e.to_string()),
    };
    if !nccl_available() {
        return skip(
            "libnccl cannot be loaded (cudarc loads libnccl.so: for a lone libnccl.so.2, put a \
             libnccl.so link to it on LD_LIBRARY_PATH, as scripts/gpu-check.sh does)"
                .into(),
        );
    }
    Some(dev)
}

fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| f64::from(x)).collect()
}

/// A batch: features (N x D), labels (every class present), `dL/dlogits`.
struct Batch {
    raw: Vec<f32>,
    labels: Vec<u32>,
    d_logits: Vec<f32>,
}

fn batch(rng: &mut Rng, means: &[f64]) -> Batch {
    let labels: Vec<u32> = (0..N)
        .map(|i| if i < K { i } else { rng.below(K) } as u32)
        .collect();
    let raw = (0..N * D)
        .map(|j| (2.0 * means[labels[j / D] as usize * D + j % D] + rng.normal()) as f32)
        .collect();
    let d_logits = (0..N * K).map(|_| (0.01 * rng.normal()) as f32).collect();
    Batch {
        raw,
        labels,
        d_logits,
    }
}

/// `rel(a, b) <= TOL`, with the measured value in the message.
fn close(what: &str, step: usize, a: &[f64], b: &[f64]) {
    assert_eq!(a.len(), b.len(), "{what} at step {step}: lengths");
    let e = rel(a, b);
    assert!(
        e <= TOL,
        "{what} at step {step}: relative error {e:.3e} > {TOL:e}"
    );
}

#[test]
fn nccl_world_size_one_step() {
    let Some(dev) = cuda_with_nccl() else { return };
    println!("device: {}", dev.name());
    let id = NcclId::new().expect("libnccl loads, so it makes an id");
    let c = Collective::nccl(&dev, &id, 0, 1).expect("a one-rank NCCL group");
    assert_eq!((c.rank(), c.world_size(), c.kind()), (0, 1, "nccl"));

    // A one-rank all-reduce is the identity, bit for bit, in f32 and f64 (values of every
    // magnitude and sign, so a scaled or reordered result shows).
    let x32: Vec<f32> = (0..4099)
        .map(|i| ((i as f32) * 0.37).sin() * 10f32.powi(i % 13 - 6))
        .collect();
    let mut b32 = dev.upload(&x32).unwrap();
    c.all_reduce(&dev, &mut b32).unwrap();
    assert_eq!(dev.download::<f32>(&b32).unwrap(), x32, "f32 all-reduce");
    let x64: Vec<f64> = (0..4099)
        .map(|i| ((i as f64) * 0.37).sin() * 10f64.powi(i % 29 - 14))
        .collect();
    let mut b64 = dev.upload(&x64).unwrap();
    c.all_reduce(&dev, &mut b64).unwrap();
    c.all_reduce(&dev, &mut b64).unwrap();
    assert_eq!(
        dev.download::<f64>(&b64).unwrap(),
        x64,
        "f64 all-reduce, twice"
    );
    // What an NCCL group refuses, with typed errors.
    let mut ints = dev.alloc_zeros(DType::I32, 4).unwrap();
    assert!(matches!(
        c.all_reduce(&dev, &mut ints),
        Err(Error::InvalidParameter { .. })
    ));
    assert!(matches!(
        c.all_reduce_host(&mut [1.0]),
        Err(Error::InvalidParameter { .. })
    ));

    // Three steps: a head with the collective against one without, on the same inputs.
    let cfg = HeadConfig::new(D, K);
    let opts = DeviceOptions::default();
    let mut plain = DeviceHead::with_options(Device::cuda(0).unwrap(), cfg.clone(), opts).unwrap();
    let mut dp = DeviceHead::with_options(dev, cfg, opts)
        .unwrap()
        .with_collective(c)
        .expect("DeviceHead::with_collective");
    let mut rng = Rng(15);
    let means = rng.normals(K * D);
    for step in 0..STEPS {
        let b = batch(&mut rng, &means);
        let mut out = Vec::new();
        for head in [&mut plain, &mut dp] {
            let dev = head.device();
            let x = dev.upload(&b.raw).unwrap();
            let y = dev.upload(&b.labels).unwrap();
            let dz = dev.upload(&b.d_logits).unwrap();
            let z = head.forward(&x, &y).unwrap();
            let dx = head.backward(&dz).unwrap();
            head.check().unwrap();
            let dev = head.device();
            out.push((
                f64s(&dev.download::<f32>(&z).unwrap()),
                f64s(&dev.download::<f32>(&dx).unwrap()),
            ));
        }
        close("logits", step, &out[1].0, &out[0].0);
        close("d_raw", step, &out[1].1, &out[0].1);
        let (sp, sd) = (plain.export_state().unwrap(), dp.export_state().unwrap());
        close(
            "state.moving.e",
            step,
            &f64s(&sd.moving.e),
            &f64s(&sp.moving.e),
        );
        close(
            "state.prox",
            step,
            sd.prox.as_deref().expect("a Prox after a step"),
            sp.prox.as_deref().expect("a Prox after a step"),
        );
        assert_eq!(sd.moving.step, sp.moving.step, "step count at step {step}");
        assert_eq!(sd.moving.seen, sp.moving.seen, "seen flags at step {step}");
        assert!(
            (sd.moving.alpha - sp.moving.alpha).abs() <= TOL * sp.moving.alpha.abs(),
            "alpha at step {step}"
        );
    }
    println!("NCCL world-size-1 step: pass ({STEPS} steps, N={N} d={D} K={K})");
}

#[cfg(feature = "cpu-exec")]
#[test]
fn nccl_group_needs_a_cuda_device() {
    // Refused before NCCL is touched, so the same everywhere (with or without libnccl).
    let id = NcclId([7; 128]);
    let cpu = Device::cpu();
    match Collective::nccl(&cpu, &id, 0, 1) {
        Err(Error::Collective { reason, .. }) => assert!(reason.contains("CUDA"), "{reason}"),
        other => panic!("expected Error::Collective, got {other:?}"),
    }
    assert!(matches!(
        Collective::nccl(&cpu, &id, 1, 1),
        Err(Error::InvalidParameter { name: "rank", .. })
    ));
    // The environment's path, one rank: no rendezvous; the id (no libnccl here, or NCCL on the
    // CPU execution) fails as a collective error, not a panic.
    let spec = RendezvousSpec::from_vars(|_| None).unwrap();
    assert!(matches!(
        Collective::from_spec(&cpu, &spec),
        Err(Error::Collective { .. })
    ));
}

#[test]
fn nccl_id_hex_round_trip() {
    let mut bytes = [0u8; 128];
    for (i, b) in bytes.iter_mut().enumerate() {
        *b = (i * 37 % 256) as u8;
    }
    let id = NcclId(bytes);
    let hex = id.to_hex();
    assert_eq!(hex.len(), 256);
    assert!(hex.chars().all(|c| c.is_ascii_hexdigit()));
    assert_eq!(NcclId::from_hex(&hex).unwrap(), id);
    assert_eq!(NcclId::from_hex(&format!(" {hex}\n")).unwrap(), id);
    for bad in [
        &hex[..254],
        "",
        &format!("{}zz", &hex[..254]),
        &format!("{hex}00"),
    ] {
        assert!(
            matches!(NcclId::from_hex(bad), Err(Error::InvalidParameter { .. })),
            "{bad:?}"
        );
    }
}
