//! One training step of the GPU head on the CPU execution, so that the kernels and the CPU
//! runtime are linked into this binary; scripts/check-symbols.sh then reads its symbol table.
use implicit_etf::runtime::Device;
use implicit_etf::{DeviceHead, HeadConfig};

fn main() -> Result<(), implicit_etf::Error> {
    let (n, d, k) = (8, 6, 3);
    let mut head = DeviceHead::new(Device::cpu(), HeadConfig::new(d, k))?;
    let x: Vec<f32> = (0..n * d).map(|i| ((i * 7 % 13) as f32) - 6.0).collect();
    let labels: Vec<u32> = (0..n as u32).map(|i| i % k as u32).collect();
    let feats = head.device().upload(&x)?;
    let labels = head.device().upload(&labels)?;
    let logits = head.forward(&feats, &labels)?;
    let grad = head.backward(&head.device().upload(&vec![0.01f32; n * k])?)?;
    println!("logits {}, gradient {}", logits.len(), grad.len());
    Ok(())
}
