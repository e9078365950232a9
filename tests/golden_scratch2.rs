mod common;
use common::*;
use implicit_etf::cpu::moving::MovingMeans;
use implicit_etf::*;

#[test]
fn scratch_head() {
    for name in [
        "head_d8_k3.json",
        "head_d16_k5.json",
        "head_d32_k10.json",
        "head_d12_k12.json",
    ] {
        let g = golden(name);
        let (d, k) = (
            g["d"].as_u64().unwrap() as usize,
            g["K"].as_u64().unwrap() as usize,
        );
        let cfg = HeadConfig::new(d, k)
            .with_tau(Some(g["tau"].as_f64().unwrap()))
            .with_delta(g["delta"].as_f64().unwrap())
            .with_policy(AbsentClassPolicy::Reference);
        let mut carried = CpuHead::<f64>::new(cfg.clone()).unwrap();
        for (si, st) in g["steps"].as_array().unwrap().iter().enumerate() {
            let sb = &st["state_before"];
            let mut head = CpuHead::<f64>::new(cfg.clone()).unwrap();
            let state = HeadState {
                moving: MovingMeans {
                    e: mat(&sb["ema_prev"]).2,
                    step: sb["count"].as_u64().unwrap(),
                    alpha: sb["alpha"].as_f64().unwrap(),
                    seen: sb["has_sampled"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|b| b.as_bool().unwrap())
                        .collect(),
                },
                prox: if sb["prox"].is_null() {
                    None
                } else {
                    Some(mat(&sb["prox"]).2)
                },
            };
            let cs = carried.export_state();
            println!("{name} step {si}: carried state ema rel {:.2e} count {} vs {} alpha {} vs {} seen {:?} vs {:?}", rel(&cs.moving.e, &state.moving.e), cs.moving.step, state.moving.step, cs.moving.alpha, state.moving.alpha, cs.moving.seen, state.moving.seen);
            head.import_state(state).unwrap();
            let labels: Vec<i64> = st["labels"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_i64().unwrap())
                .collect();
            let raw = mat(&st["raw"]).2;
            for (tag, h) in [("imported", &mut head), ("carried", &mut carried)] {
                let out = h.forward(&raw, &labels).unwrap();
                let (loss, dz) = cross_entropy(&out.logits, &labels, k).unwrap();
                let dr = h.backward(&dz).unwrap();
                println!("  {tag}: mu {:.2e} Y {:.2e} PM {:.2e} W {:.2e} b {:.2e} logits {:.2e} loss {:.2e} d_raw {:.2e}",
              rel(&out.mu, &vecf(&st["mu_G"])), rel(&out.y, &mat(&st["Y"]).2), rel(&center_rows(&out.p,d,k), &center_rows(&mat(&st["P"]).2,d,k)), rel(&out.w, &mat(&st["W"]).2), rel(&out.b, &vecf(&st["b"])), rel(&out.logits, &mat(&st["logits"]).2), (loss - st["loss"].as_f64().unwrap()).abs(), rel(&dr, &mat(&st["d_raw"]).2));
            }
        }
    }
}
