//! The UFM reproduction check (`method.md` §7) and the example's argument validation.

#[path = "../examples/ufm/train.rs"]
mod train;

use train::{parse_args, train_head, Command, Config, Data, HeadKind};

#[test]
fn smoke() {
    let cfg = Config {
        dim: 64,
        samples: 200,
        epochs: 3,
        metrics: false,
        ..Config::default()
    };
    let data = Data::new(&cfg);
    for kind in HeadKind::ALL {
        let r = train_head(kind, &cfg, &data, &mut |_| {}).unwrap();
        eprintln!(
            "{kind}: {:?}",
            r.records.iter().map(|e| e.accuracy).collect::<Vec<_>>()
        );
    }
}
