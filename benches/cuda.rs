//! Short timing of the statistics stage on the device (CUDA when present, else the CPU
//! execution; `IMPLICIT_ETF_DEVICE=cpu|cuda` forces one). Prints one table row per shape:
//! `device  N  d  K  forward_ms  backward_ms`. Used by `scripts/gpu-check.sh`.

use implicit_etf::device::stats as dstats;
use implicit_etf::device::Device;
use implicit_etf::{AbsentClassPolicy, MovingAverage};
use std::time::Instant;

fn main() {
    let dev = match Device::from_env() {
        Ok(d) => d,
        Err(e) => {
            eprintln!("cuda bench: {e}");
            std::process::exit(1);
        }
    };
    let cpu = dev.backend() == implicit_etf::device::Backend::Cpu;
    if cpu {
        let why = match Device::cuda(0) {
            Ok(_) => "IMPLICIT_ETF_DEVICE=cpu".to_string(),
            Err(e) => e.to_string(),
        };
        eprintln!("CUDA part skipped: {why}; timing the CPU execution of the kernels instead (not a GPU number)");
    }
    let shapes: &[(usize, usize, usize)] = if cpu {
        &[(64, 128, 10)]
    } else {
        &[(256, 512, 10), (1024, 512, 100), (4096, 2048, 1000)]
    };
    let reps = if cpu { 2 } else { 20 };
    println!("device\tN\td\tK\tforward_ms\tbackward_ms");
    for &(n, d, k) in shapes {
        let raw: Vec<f32> = (0..n * d)
            .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
            .collect();
        let y: Vec<u32> = (0..n).map(|i| (i % k) as u32).collect();
        let rb = dev.upload(&raw).unwrap();
        let yb = dev.upload(&y).unwrap();
        let dy = dev.upload(&vec![1e-3f32; d * k]).unwrap();
        let opt = dstats::StatsOptions {
            tau: Some(5.0),
            average: MovingAverage::Exponential,
            policy: AbsentClassPolicy::Reference,
            alpha_floor: 1e-4,
        };
        let mut st = dstats::MovingStateDev::new(&dev, d, k).unwrap();
        // Warm-up (module loading).
        let f = dstats::forward(&dev, &rb, &yb, n, &mut st, opt).unwrap();
        dstats::backward(&dev, &f, &rb, &dy, None, None).unwrap();
        dev.synchronize().unwrap();
        let (mut tf, mut tb) = (0.0, 0.0);
        for _ in 0..reps {
            let t0 = Instant::now();
            let f = dstats::forward(&dev, &rb, &yb, n, &mut st, opt).unwrap();
            dev.synchronize().unwrap();
            let t1 = Instant::now();
            let _ = dstats::backward(&dev, &f, &rb, &dy, None, None).unwrap();
            dev.synchronize().unwrap();
            tf += (t1 - t0).as_secs_f64();
            tb += t1.elapsed().as_secs_f64();
        }
        println!(
            "{}\t{n}\t{d}\t{k}\t{:.3}\t{:.3}",
            dev.name().replace(' ', "_"),
            1e3 * tf / reps as f64,
            1e3 * tb / reps as f64
        );
    }
}
