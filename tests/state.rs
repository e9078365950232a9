//! Export/import of the full state resumes training bit-exactly, and inference changes no
//! state. The oracle is an uninterrupted run of the same head: equality is exact (`==`), since
//! the same operations run on the same numbers in the same order.

mod common;
use common::{fwd, Rng};
use implicit_etf::{cross_entropy, AbsentClassPolicy, CpuHead, HeadConfig, MovingAverage};

fn batches(n: usize, d: usize, k: usize, steps: usize, seed: u64) -> Vec<(Vec<f64>, Vec<u32>)> {
    let mut rng = Rng(seed);
    (0..steps)
        .map(|_| {
            let raw = rng.normals(n * d);
            // Class k-1 is absent from every other batch, to exercise the policies.
            let labels = (0..n).map(|_| rng.below(k - 1) as u32).collect();
            (raw, labels)
        })
        .collect()
}

fn step(head: &mut CpuHead<f64>, raw: &[f64], labels: &[u32], k: usize) -> (Vec<f64>, Vec<f64>) {
    let out = fwd(head, raw, labels).unwrap();
    let (_, dz) = cross_entropy(&out.logits, labels, k).unwrap();
    (out.logits, head.backward(&dz).unwrap())
}

#[test]
fn export_import_resumes_bit_exactly() {
    let (n, d, k) = (12, 9, 4);
    for policy in [AbsentClassPolicy::Hold, AbsentClassPolicy::Reference] {
        for avg in [MovingAverage::Exponential, MovingAverage::Cumulative] {
            let cfg = HeadConfig::new(d, k)
                .with_policy(policy)
                .with_moving_average(avg);
            let data = batches(n, d, k, 6, 11);
            let mut a = CpuHead::<f64>::new(cfg.clone()).unwrap();
            let mut outs_a = Vec::new();
            for (raw, labels) in &data {
                outs_a.push(step(&mut a, raw, labels, k));
            }
            let mut b = CpuHead::<f64>::new(cfg.clone()).unwrap();
            for (raw, labels) in &data[..3] {
                step(&mut b, raw, labels, k);
            }
            let saved = b.export_state().unwrap();
            let mut c = CpuHead::<f64>::new(cfg.clone()).unwrap();
            c.import_state(saved).unwrap();
            for (i, (raw, labels)) in data[3..].iter().enumerate() {
                assert_eq!(
                    step(&mut c, raw, labels, k),
                    outs_a[3 + i],
                    "{policy:?} {avg:?} step {}",
                    3 + i
                );
            }
            assert_eq!(c.export_state().unwrap(), a.export_state().unwrap());
        }
    }
}

#[test]
fn inference_changes_no_state() {
    let (n, d, k) = (10, 6, 3);
    let mut head = CpuHead::<f64>::new(HeadConfig::new(d, k)).unwrap();
    let data = batches(n, d, k, 2, 5);
    step(&mut head, &data[0].0, &data[0].1, k);
    let before = head.export_state().unwrap();
    let logits = head.infer(&data[1].0).unwrap();
    assert_eq!(head.export_state().unwrap(), before);
    // Inference logits equal X W^T - W mu computed here from the exported classifier.
    let w = head.classifier().unwrap().unwrap();
    let x: Vec<f64> = data[1]
        .0
        .chunks(d)
        .flat_map(|r| {
            let nr = r.iter().map(|v| v * v).sum::<f64>().sqrt();
            r.iter().map(move |v| 5.0 * v / nr).collect::<Vec<_>>()
        })
        .collect();
    let mu: Vec<f64> = (0..d)
        .map(|j| (0..n).map(|i| x[i * d + j]).sum::<f64>() / n as f64)
        .collect();
    for i in 0..n {
        for c in 0..k {
            let z: f64 = (0..d).map(|j| w[c * d + j] * (x[i * d + j] - mu[j])).sum();
            // 1e-12: two summation orders of O(1) terms in float64.
            assert!((z - logits[i * k + c]).abs() < 1e-12);
        }
    }
}
