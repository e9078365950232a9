//! The CPU execution model of the kernels (and the device layer's checks), through the
//! self-test kernels of `kernels/test/selftest.cu`. The well-behaved ones also run on a CUDA GPU
//! when present; the deliberately wrong ones run on the CPU execution only.

mod common;
use common::devices;
use half::{bf16, f16};
use implicit_etf::runtime::{Arg, Device, LaunchConfig};
use implicit_etf::Error;

fn device_error(r: implicit_etf::Result<()>) -> String {
    match r {
        Err(Error::Device { message, .. }) => message,
        other => panic!("expected Error::Device, got {other:?}"),
    }
}

#[test]
fn block_sum_is_exact_on_integers() {
    for dev in devices() {
        for block in [32u32, 64, 256, 1024] {
            let blocks = 3u32;
            let n = (block * blocks) as usize;
            let v: Vec<f32> = (0..n).map(|i| (i % 17) as f32).collect();
            let out = dev
                .alloc_zeros(implicit_etf::runtime::DType::F32, blocks as usize)
                .unwrap();
            // SAFETY: every buffer is allocated for the sizes and launch shape given.
            unsafe {
                dev.launch(
                    implicit_etf::kernels::by_name("selftest_block_sum_f32").unwrap(),
                    LaunchConfig::new((blocks, 1, 1), (block, 1, 1)),
                    &[Arg::Buf(&dev.upload(&v).unwrap()), Arg::Buf(&out)],
                )
            }
            .unwrap();
            let got = dev.download::<f32>(&out).unwrap();
            for b in 0..blocks as usize {
                let want: f32 = v[b * block as usize..(b + 1) * block as usize].iter().sum();
                assert_eq!(got[b], want, "{} block {block}", dev.name());
            }
        }
    }
}

#[test]
fn shuffles_and_ballot_follow_cuda_semantics() {
    for dev in devices() {
        let nt = 64usize;
        let v: Vec<i32> = (0..nt as i32).map(|i| i * 7 + 1).collect();
        let out = dev
            .alloc_zeros(implicit_etf::runtime::DType::I32, nt * 5)
            .unwrap();
        // SAFETY: every buffer is allocated for the sizes and launch shape given.
        unsafe {
            dev.launch(
                implicit_etf::kernels::by_name("selftest_shuffles_i32").unwrap(),
                LaunchConfig::new((1, 1, 1), (nt as u32, 1, 1)),
                &[Arg::Buf(&dev.upload(&v).unwrap()), Arg::Buf(&out)],
            )
        }
        .unwrap();
        let o = dev.download::<i32>(&out).unwrap();
        for t in 0..nt {
            let (lane, base) = (t % 32, t - t % 32);
            assert_eq!(o[5 * t], v[base + 3]);
            assert_eq!(o[5 * t + 1], if lane + 1 < 32 { v[t + 1] } else { v[t] });
            assert_eq!(o[5 * t + 2], if lane >= 2 { v[t - 2] } else { v[t] });
            assert_eq!(o[5 * t + 3], v[base + (lane ^ 5)]);
            let ballot = (0..32).fold(0u32, |m, l| m | (((v[base + l] & 1) as u32) << l));
            assert_eq!(o[5 * t + 4] as u32, ballot);
        }
    }
}

#[test]
fn atomics_count_every_thread() {
    for dev in devices() {
        let (blocks, threads) = (5u32, 96u32);
        let total = (blocks * threads) as i32;
        let ci = dev.upload(&[0i32]).unwrap();
        let cu = dev.upload(&[0u32]).unwrap();
        let cull = dev.upload(&[0u64]).unwrap();
        let cf = dev.upload(&[0f32]).unwrap();
        let cd = dev.upload(&[0f64]).unwrap();
        let mx = dev.upload(&[-1i32]).unwrap();
        let mn = dev.upload(&[i32::MAX]).unwrap();
        // SAFETY: every buffer is allocated for the sizes and launch shape given.
        unsafe {
            dev.launch(
                implicit_etf::kernels::by_name("selftest_atomics_i32").unwrap(),
                LaunchConfig::new((blocks, 1, 1), (threads, 1, 1)),
                &[
                    Arg::Buf(&ci),
                    Arg::Buf(&cu),
                    Arg::Buf(&cull),
                    Arg::Buf(&cf),
                    Arg::Buf(&cd),
                    Arg::Buf(&mx),
                    Arg::Buf(&mn),
                ],
            )
        }
        .unwrap();
        assert_eq!(dev.download::<i32>(&ci).unwrap()[0], total);
        assert_eq!(dev.download::<u32>(&cu).unwrap()[0], total as u32);
        assert_eq!(dev.download::<u64>(&cull).unwrap()[0], total as u64);
        assert_eq!(dev.download::<f32>(&cf).unwrap()[0], total as f32);
        assert_eq!(dev.download::<f64>(&cd).unwrap()[0], total as f64);
        assert_eq!(dev.download::<i32>(&mx).unwrap()[0], total - 1);
        assert_eq!(dev.download::<i32>(&mn).unwrap()[0], 0);
    }
}

#[test]
fn dynamic_shared_memory_is_per_launch() {
    for dev in devices() {
        for nt in [32u32, 100, 512] {
            let blocks = 2u32;
            let v: Vec<f32> = (0..(nt * blocks)).map(|i| i as f32).collect();
            let out = dev
                .alloc_zeros(implicit_etf::runtime::DType::F32, v.len())
                .unwrap();
            let mut cfg = LaunchConfig::new((blocks, 1, 1), (nt, 1, 1));
            cfg.shared_bytes = nt * 4;
            // SAFETY: every buffer is allocated for the sizes and launch shape given.
            unsafe {
                dev.launch(
                    implicit_etf::kernels::by_name("selftest_dynamic_shared_f32").unwrap(),
                    cfg,
                    &[Arg::Buf(&dev.upload(&v).unwrap()), Arg::Buf(&out)],
                )
            }
            .unwrap();
            let o = dev.download::<f32>(&out).unwrap();
            for b in 0..blocks as usize {
                for t in 0..nt as usize {
                    assert_eq!(
                        o[b * nt as usize + t],
                        v[b * nt as usize + nt as usize - 1 - t]
                    );
                }
            }
        }
    }
}

#[test]
fn half_conversions_round_to_nearest_even() {
    let mut vals = vec![
        0.0f32,
        -0.0,
        1.0,
        -2.5,
        65504.0,
        65520.0,
        1e-8,
        6e-8,
        3.0e-5,
        1.0 / 3.0,
        1e30,
        -1e-40,
        f32::INFINITY,
    ];
    let mut s = 12345u32;
    for _ in 0..2000 {
        s = s.wrapping_mul(1664525).wrapping_add(1013904223);
        let e = (s >> 24) as i32 % 40 - 25;
        vals.push(
            f32::from_bits(s >> 9 | 0x3f80_0000)
                * 2f32.powi(e)
                * if s & 1 == 1 { -1.0 } else { 1.0 },
        );
    }
    let n = vals.len();
    for dev in devices() {
        let h = dev
            .alloc_zeros(implicit_etf::runtime::DType::F16, n)
            .unwrap();
        let b = dev
            .alloc_zeros(implicit_etf::runtime::DType::BF16, n)
            .unwrap();
        let hb = dev
            .alloc_zeros(implicit_etf::runtime::DType::F32, n)
            .unwrap();
        let bb = dev
            .alloc_zeros(implicit_etf::runtime::DType::F32, n)
            .unwrap();
        // SAFETY: every buffer is allocated for the sizes and launch shape given.
        unsafe {
            dev.launch(
                implicit_etf::kernels::by_name("selftest_half_f32").unwrap(),
                LaunchConfig::linear(n, 128),
                &[
                    Arg::Buf(&dev.upload(&vals).unwrap()),
                    Arg::I32(n as i32),
                    Arg::Buf(&h),
                    Arg::Buf(&b),
                    Arg::Buf(&hb),
                    Arg::Buf(&bb),
                ],
            )
        }
        .unwrap();
        let (h, b) = (
            dev.download::<f16>(&h).unwrap(),
            dev.download::<bf16>(&b).unwrap(),
        );
        let (hb, bb) = (
            dev.download::<f32>(&hb).unwrap(),
            dev.download::<f32>(&bb).unwrap(),
        );
        for i in 0..n {
            assert_eq!(
                h[i].to_bits(),
                f16::from_f32(vals[i]).to_bits(),
                "f16 of {:e}",
                vals[i]
            );
            assert_eq!(
                b[i].to_bits(),
                bf16::from_f32(vals[i]).to_bits(),
                "bf16 of {:e}",
                vals[i]
            );
            assert_eq!(hb[i].to_bits(), f16::from_f32(vals[i]).to_f32().to_bits());
            assert_eq!(bb[i].to_bits(), bf16::from_f32(vals[i]).to_f32().to_bits());
        }
    }
}

#[test]
fn bad_launches_are_errors_not_hangs() {
    let dev = Device::cpu();
    let out = dev
        .alloc_zeros(implicit_etf::runtime::DType::I32, 1024)
        .unwrap();
    let m = device_error(unsafe {
        dev.launch(
            implicit_etf::kernels::by_name("selftest_bad_barrier_exit_i32").unwrap(),
            LaunchConfig::new((2, 1, 1), (64, 1, 1)),
            &[Arg::Buf(&out)],
        )
    });
    assert!(m.contains("deadlock"), "{m}");
    let m = device_error(unsafe {
        dev.launch(
            implicit_etf::kernels::by_name("selftest_bad_divergent_barrier_i32").unwrap(),
            LaunchConfig::new((1, 1, 1), (64, 1, 1)),
            &[Arg::Buf(&out)],
        )
    });
    assert!(m.contains("divergent __syncthreads"), "{m}");
    // The execution still works after failed launches.
    // SAFETY: every buffer is allocated for the sizes and launch shape given.
    unsafe {
        dev.launch(
            implicit_etf::kernels::by_name("selftest_shuffles_i32").unwrap(),
            LaunchConfig::new((1, 1, 1), (32, 1, 1)),
            &[Arg::Buf(&out), Arg::Buf(&out)],
        )
    }
    .unwrap();
}

#[test]
fn launch_shapes_and_signatures_are_checked() {
    for dev in devices() {
        let f = dev
            .alloc_zeros(implicit_etf::runtime::DType::F32, 4)
            .unwrap();
        let i = dev
            .alloc_zeros(implicit_etf::runtime::DType::I32, 4)
            .unwrap();
        let args = [Arg::Buf(&f), Arg::Buf(&f)];
        for (cfg, what) in [
            (LaunchConfig::new((0, 1, 1), (32, 1, 1)), "zero-sized grid"),
            (LaunchConfig::new((1, 1, 1), (2048, 1, 1)), "exceeds"),
            (LaunchConfig::new((1, 1, 1), (0, 1, 1)), "zero-sized block"),
        ] {
            if dev.backend() == implicit_etf::runtime::Backend::Cpu {
                let m = device_error(unsafe {
                    dev.launch(
                        implicit_etf::kernels::by_name("selftest_block_sum_f32").unwrap(),
                        cfg,
                        &args,
                    )
                });
                assert!(m.contains(what), "{m}");
            } else {
                assert!(unsafe {
                    dev.launch(
                        implicit_etf::kernels::by_name("selftest_block_sum_f32").unwrap(),
                        cfg,
                        &args,
                    )
                }
                .is_err());
            }
        }
        let mut cfg = LaunchConfig::new((1, 1, 1), (32, 1, 1));
        cfg.shared_bytes = implicit_etf::runtime::MAX_DYNAMIC_SHARED_BYTES + 1;
        assert!(device_error(unsafe {
            dev.launch(
                implicit_etf::kernels::by_name("selftest_block_sum_f32").unwrap(),
                cfg,
                &args,
            )
        })
        .contains("shared memory"));
        // Wrong pointer type, wrong count, unknown kernel.
        assert!(device_error(unsafe {
            dev.launch(
                implicit_etf::kernels::by_name("selftest_block_sum_f32").unwrap(),
                LaunchConfig::linear(4, 32),
                &[Arg::Buf(&i), Arg::Buf(&f)],
            )
        })
        .contains("pointer"));
        assert!(device_error(unsafe {
            dev.launch(
                implicit_etf::kernels::by_name("selftest_block_sum_f32").unwrap(),
                LaunchConfig::linear(4, 32),
                &[Arg::Buf(&f)],
            )
        })
        .contains("arguments"));
        assert!(implicit_etf::kernels::by_name("no_such_kernel").is_none());
        dev.synchronize().unwrap();
    }
}

/// With the CPU execution built under AddressSanitizer (`IMPLICIT_ETF_ASAN=1`), a kernel
/// that writes one element past its buffer must abort the process with an ASan report.
/// Runs the offending launch in a child process (this test binary, filtered to
/// `oob_child`).
#[test]
fn asan_catches_out_of_bounds_writes() {
    if !implicit_etf::kernels::cpu_asan() {
        println!("skipped: the CPU execution was not built with IMPLICIT_ETF_ASAN=1");
        return;
    }
    let exe = std::env::current_exe().unwrap();
    let out = std::process::Command::new(exe)
        .args([
            "--exact",
            "oob_child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("IMPLICIT_ETF_OOB_CHILD", "1")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "the out-of-bounds write went unnoticed"
    );
    assert!(
        err.contains("AddressSanitizer") && err.contains("selftest_bad_oob_write_f32"),
        "{err}"
    );
}

#[test]
#[ignore = "child process of asan_catches_out_of_bounds_writes"]
fn oob_child() {
    if std::env::var("IMPLICIT_ETF_OOB_CHILD").is_err() {
        return;
    }
    let dev = Device::cpu();
    let buf = dev
        .alloc_zeros(implicit_etf::runtime::DType::F32, 10)
        .unwrap();
    // SAFETY: none; this child process exists to show that the CPU execution under ASan
    // aborts on the kernel's deliberate out-of-bounds write.
    unsafe {
        dev.launch(
            implicit_etf::kernels::by_name("selftest_bad_oob_write_f32").unwrap(),
            LaunchConfig::new((1, 1, 1), (32, 1, 1)),
            &[Arg::Buf(&buf), Arg::I32(10)],
        )
    }
    .unwrap();
}

/// Every kernel compiled for sm_90 without register spills (when nvcc was used).
#[test]
fn ptxas_report_has_no_spills() {
    let Some(report) = implicit_etf::kernels::ptxas_report() else {
        println!("skipped: built without nvcc (no ptxas report)");
        return;
    };
    let kernels = implicit_etf::kernels::all();
    let mut rows = 0;
    for line in report.lines().skip(1) {
        let f: Vec<&str> = line.split('\t').collect();
        assert_eq!(f.len(), 7, "{line}");
        assert_eq!(f[3], "0", "spill stores in {}", f[1]);
        assert_eq!(f[4], "0", "spill loads in {}", f[1]);
        assert!(
            f[6].parse::<u32>().unwrap() <= 48 * 1024,
            "static shared memory of {}",
            f[1]
        );
        rows += 1;
    }
    assert_eq!(
        rows,
        kernels.len(),
        "every kernel appears in the ptxas report"
    );
}
