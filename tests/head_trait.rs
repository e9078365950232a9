//! The `Head` trait: one generic training loop drives the CPU head and the device head (on
//! the CPU execution), and the two agree. Oracle: the CPU head in `f32`; tolerances as in
//! `tests/device_head.rs` (the device computes its statistics in `f32` and its solve from a
//! Jacobi eigensolver: `1e-5` on logits and `W`, `1e-4` on feature gradients).

mod common;
use common::{rel, Rng};
use implicit_etf::runtime::Device;
use implicit_etf::{CpuHead, DeviceHead, Head, HeadConfig};

/// One batch for a head: features, labels, `dL/dlogits`.
type Batch<H> = (
    Box<<H as Head>::Input>,
    Box<<H as Head>::Labels>,
    Box<<H as Head>::Input>,
);

/// Training steps of any head; returns the last logits and feature gradient.
fn train<H: Head>(
    head: &mut H,
    batches: &[Batch<H>],
) -> implicit_etf::Result<(H::Output, H::Output)> {
    let mut last = None;
    for (x, y, dz) in batches {
        let logits = head.forward(x, y)?;
        let grad = head.backward(dz)?;
        last = Some((logits, grad));
    }
    Ok(last.expect("at least one batch"))
}

#[test]
fn one_generic_loop_drives_both_heads() {
    let (n, d, k) = (12, 10, 4);
    let mut rng = Rng(17);
    let host: Vec<(Vec<f32>, Vec<u32>, Vec<f32>)> = (0..3)
        .map(|_| {
            let y: Vec<u32> = (0..n).map(|i| (i % k) as u32).collect();
            let x = (0..n * d)
                .map(|j| (rng.normal() + 2.0 * (y[j / d] as usize == j % d) as u8 as f64) as f32)
                .collect();
            let dz = (0..n * k).map(|_| (0.01 * rng.normal()) as f32).collect();
            (x, y, dz)
        })
        .collect();
    let cfg = HeadConfig::new(d, k);

    let mut cpu = CpuHead::<f32>::new(cfg.clone()).unwrap();
    let cpu_batches: Vec<_> = host
        .iter()
        .map(|(x, y, dz)| {
            (
                x.clone().into_boxed_slice(),
                y.clone().into_boxed_slice(),
                dz.clone().into_boxed_slice(),
            )
        })
        .collect();
    let (cl, cg) = train(&mut cpu, &cpu_batches).unwrap();

    let mut dev = DeviceHead::new(Device::cpu(), cfg).unwrap();
    let up = |v: &[f32]| Box::new(dev.device().upload(v).unwrap());
    let dev_batches: Vec<_> = host
        .iter()
        .map(|(x, y, dz)| (up(x), Box::new(dev.device().upload(y).unwrap()), up(dz)))
        .collect();
    let (dl, dg) = train(&mut dev, &dev_batches).unwrap();

    let f64s = |v: &[f32]| v.iter().map(|&a| a as f64).collect::<Vec<_>>();
    let down = |b: &implicit_etf::runtime::Buffer| f64s(&dev.device().download::<f32>(b).unwrap());
    let (el, eg) = (rel(&down(&dl), &f64s(&cl)), rel(&down(&dg), &f64s(&cg)));
    assert!(el <= 1e-5, "logits rel {el:.2e}");
    assert!(eg <= 1e-4, "feature gradients rel {eg:.2e}");
    // The diagnostics read the same way on both.
    let (rc, rd) = (
        Head::solve_report(&cpu).unwrap().unwrap(),
        Head::solve_report(&dev).unwrap().unwrap(),
    );
    assert!(!rc.first_step && !rd.first_step);
    assert!(
        rc.orthogonality < 1e-12 && rd.orthogonality < 1e-6,
        "{rc:?} {rd:?}"
    );
    let wc = Head::classifier(&cpu).unwrap().unwrap();
    let wd = down(&Head::classifier(&dev).unwrap().unwrap());
    let ew = rel(&wd, &f64s(&wc));
    assert!(ew <= 1e-5, "classifier rel {ew:.2e}");
    let (sc, sd) = (
        Head::export_state(&cpu).unwrap(),
        Head::export_state(&dev).unwrap(),
    );
    assert_eq!(sc.moving.step, sd.moving.step);
    let em = rel(&f64s(&sd.moving.e), &f64s(&sc.moving.e));
    assert!(em <= 1e-5, "moving means rel {em:.2e}");
}
