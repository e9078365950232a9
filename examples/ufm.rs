//! Unconstrained feature model: trains free features with the `standard`, `fixed` and
//! `implicit` heads and shows that the implicit-ETF head converges faster
//! (`docs/metrics.md#training-expectations`).
//!
//! ```text
//! cargo run --release --example ufm
//! cargo run --release --example ufm -- --classes 100 --samples 5000 --epochs 20
//! cargo run --release --example ufm -- --heads implicit --ranks 4   # data-parallel, 4 thread ranks
//! ```
//!
//! Writes `ufm.csv` (per-epoch loss, accuracy and neural-collapse metrics of every head),
//! `ufm.svg` (accuracy on the left, log10 of the loss on the right, one line per head, with
//! axis labels, legend and title) and `ufm.png` (the same curves without text: the bitmap
//! backend has no font in this build) to `--out`.

#[path = "ufm/train.rs"]
mod train;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use indicatif::{ProgressBar, ProgressStyle};
use plotters::prelude::*;

use train::{
    batches_per_epoch, parse_args, train_head, Command, Config, Data, Event, HeadKind, HeadRun,
};

fn color(kind: HeadKind) -> RGBColor {
    match kind {
        HeadKind::Standard => RGBColor(31, 119, 180),
        HeadKind::Fixed => RGBColor(214, 39, 40),
        HeadKind::Implicit => RGBColor(44, 160, 44),
    }
}

fn color_name(kind: HeadKind) -> &'static str {
    match kind {
        HeadKind::Standard => "blue",
        HeadKind::Fixed => "red",
        HeadKind::Implicit => "green",
    }
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

fn run() -> Result<(), String> {
    let cfg = match parse_args(std::env::args().skip(1))? {
        Command::Help => {
            println!("{}", train::usage());
            return Ok(());
        }
        Command::Run(cfg) => cfg,
    };
    let out = cfg.out.clone().unwrap_or_else(|| {
        PathBuf::from("ufm-out").join(format!(
            "K{}_d{}_N{}_seed{}",
            cfg.classes, cfg.dim, cfg.samples, cfg.seed
        ))
    });
    std::fs::create_dir_all(&out)
        .map_err(|e| format!("cannot create output folder {}: {e}", out.display()))?;
    println!(
        "UFM: K={} d={} N={} epochs={} batch={} lr={} momentum={} wd={} tau={} seed={} backend={} ranks={}",
        cfg.classes,
        cfg.dim,
        cfg.samples,
        cfg.epochs,
        cfg.batch,
        cfg.lr,
        cfg.momentum,
        cfg.weight_decay,
        cfg.tau,
        cfg.seed,
        format!("{:?}", cfg.backend).to_lowercase(),
        cfg.ranks
    );
    let data = Data::new(&cfg);
    let steps = (cfg.epochs * batches_per_epoch(&cfg)) as u64;
    let style = ProgressStyle::with_template(
        "{prefix:>9} [{bar:30}] {pos}/{len} steps {elapsed_precise} {msg}",
    )
    .map_err(|e| e.to_string())?
    .progress_chars("=> ");
    let mut runs = Vec::new();
    for &kind in &cfg.heads {
        let pb = ProgressBar::new(steps).with_style(style.clone());
        pb.set_prefix(kind.name());
        let mut on_event = |ev: Event<'_>| match ev {
            Event::Step { .. } => pb.inc(1),
            Event::Epoch(r) => pb.set_message(format!(
                "epoch {} loss {:.4} acc {:.1}%",
                r.epoch, r.train_loss, r.accuracy
            )),
        };
        let run = train_head(kind, &cfg, &data, &mut on_event);
        pb.finish();
        runs.push(run?);
    }
    print!("{}", table(&runs));
    let csv = out.join("ufm.csv");
    std::fs::write(&csv, to_csv(&runs))
        .map_err(|e| format!("cannot write {}: {e}", csv.display()))?;
    let png = out.join("ufm.png");
    plot(&png, &runs, &cfg).map_err(|e| format!("cannot draw {}: {e}", png.display()))?;
    let svg = out.join("ufm.svg");
    plot_svg(&svg, &runs, &cfg).map_err(|e| format!("cannot draw {}: {e}", svg.display()))?;
    let legend: Vec<String> = runs
        .iter()
        .map(|r| format!("{}={}", r.kind, color_name(r.kind)))
        .collect();
    println!(
        "wrote {}, {} and {} (the SVG has axis labels, legend and title)",
        csv.display(),
        png.display(),
        svg.display()
    );
    println!(
        "PNG (no text): top accuracy (grid every 25%), bottom log10(mean train loss) (grid every 0.1), x epochs 1..E; lines: {}",
        legend.join(", ")
    );
    println!("output folder: {}", out.display());
    Ok(())
}

fn fmt_metric(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.3e}"))
}

fn table(runs: &[HeadRun]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "\n| head | acc after epoch 1 | first epoch at 100% | final loss | final acc | NC1 | NC2 | NC3 | NC4 | time |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|");
    for r in runs {
        let last = r.last();
        let m = last.and_then(|l| l.metrics);
        let _ = writeln!(
            s,
            "| {} | {:.1}% | {} | {:.4} | {:.1}% | {} | {} | {} | {} | {:.1} s |",
            r.kind,
            r.first_epoch_accuracy(),
            r.first_epoch_at_100()
                .map_or("never".to_string(), |e| e.to_string()),
            last.map_or(f64::NAN, |l| l.train_loss),
            last.map_or(f64::NAN, |l| l.accuracy),
            fmt_metric(m.map(|m| m.nc1)),
            fmt_metric(m.map(|m| m.nc2)),
            fmt_metric(m.map(|m| m.nc3)),
            fmt_metric(m.map(|m| m.nc4)),
            r.seconds
        );
    }
    s
}

fn to_csv(runs: &[HeadRun]) -> String {
    let mut s = String::from(
        "head,epoch,train_loss,eval_loss,accuracy,nc1,nc2,nc3,nc4,equinorm_w,equinorm_h,ncc_agreement,cosine_margin\n",
    );
    for r in runs {
        for e in &r.records {
            let _ = write!(
                s,
                "{},{},{},{},{}",
                r.kind, e.epoch, e.train_loss, e.eval_loss, e.accuracy
            );
            match e.metrics {
                Some(m) => {
                    let _ = writeln!(
                        s,
                        ",{},{},{},{},{},{},{},{}",
                        m.nc1,
                        m.nc2,
                        m.nc3,
                        m.nc4,
                        m.equinorm_w,
                        m.equinorm_h,
                        m.ncc_agreement,
                        m.cosine_margin
                    );
                }
                None => s.push_str(",,,,,,,,\n"),
            }
        }
    }
    s
}

/// Accuracy (top) and log10 of the training loss (bottom) per epoch, one line per head.
/// Drawn without text (this build has no font backend); the legend is printed instead.
fn plot(path: &Path, runs: &[HeadRun], cfg: &Config) -> Result<(), Box<dyn std::error::Error>> {
    let root = BitMapBackend::new(path, (1000, 800)).into_drawing_area();
    root.fill(&WHITE)?;
    let (top, bottom) = root.split_vertically(400);
    let x_max = cfg.epochs.max(2) as f64;
    let grey = RGBColor(220, 220, 220);

    // Accuracy.
    let mut chart = ChartBuilder::on(&top)
        .margin(20)
        .build_cartesian_2d(1f64..x_max, 0f64..100f64)?;
    for y in [0.0, 25.0, 50.0, 75.0, 100.0] {
        chart.draw_series(LineSeries::new([(1.0, y), (x_max, y)], &grey))?;
    }
    for r in runs {
        let pts = r.records.iter().map(|e| (e.epoch as f64, e.accuracy));
        chart.draw_series(LineSeries::new(pts, color(r.kind).stroke_width(3)))?;
    }

    // log10 of the mean training loss.
    let logs: Vec<f64> = runs
        .iter()
        .flat_map(|r| r.records.iter().map(|e| e.train_loss.max(1e-12).log10()))
        .collect();
    let lo = logs.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = logs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let pad = 0.05 * (hi - lo).max(0.1);
    let (lo, hi) = if lo.is_finite() && hi.is_finite() {
        (lo - pad, hi + pad)
    } else {
        (-1.0, 1.0)
    };
    let mut chart = ChartBuilder::on(&bottom)
        .margin(20)
        .build_cartesian_2d(1f64..x_max, lo..hi)?;
    // Grid lines at every tenth of a decade.
    let mut y = (lo * 10.0).ceil() / 10.0;
    while y <= hi {
        chart.draw_series(LineSeries::new([(1.0, y), (x_max, y)], &grey))?;
        y += 0.1;
    }
    for r in runs {
        let pts = r
            .records
            .iter()
            .map(|e| (e.epoch as f64, e.train_loss.max(1e-12).log10()));
        chart.draw_series(LineSeries::new(pts, color(r.kind).stroke_width(3)))?;
    }
    root.present()?;
    Ok(())
}

/// Accuracy (left) and log10 of the training loss (right) per epoch, one line per head, with
/// axis labels, a legend and a title. An SVG renders its text without a bundled font.
fn plot_svg(path: &Path, runs: &[HeadRun], cfg: &Config) -> Result<(), Box<dyn std::error::Error>> {
    let root = SVGBackend::new(path, (1200, 500)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(
        &format!(
            "Unconstrained feature model: K = {}, d = {}, N = {}, seed {}",
            cfg.classes, cfg.dim, cfg.samples, cfg.seed
        ),
        ("sans-serif", 22),
    )?;
    let (left, right) = root.split_horizontally(600);
    let x_max = cfg.epochs.max(2) as f64;
    let mut chart = ChartBuilder::on(&left)
        .caption("train accuracy", ("sans-serif", 16))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(1f64..x_max, 0f64..100.5f64)?;
    chart
        .configure_mesh()
        .x_desc("epoch")
        .y_desc("accuracy (%)")
        .draw()?;
    for r in runs {
        let c = color(r.kind);
        let pts = r.records.iter().map(|e| (e.epoch as f64, e.accuracy));
        chart
            .draw_series(LineSeries::new(pts, c.stroke_width(2)))?
            .label(r.kind.name())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    let logs: Vec<f64> = runs
        .iter()
        .flat_map(|r| r.records.iter().map(|e| e.train_loss.max(1e-12).log10()))
        .collect();
    let lo = logs.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = logs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let (lo, hi) = if lo.is_finite() && hi.is_finite() {
        let pad = 0.05 * (hi - lo).max(0.1);
        (lo - pad, hi + pad)
    } else {
        (-1.0, 1.0)
    };
    let mut chart = ChartBuilder::on(&right)
        .caption("training loss", ("sans-serif", 16))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(1f64..x_max, lo..hi)?;
    chart
        .configure_mesh()
        .x_desc("epoch")
        .y_desc("log10(mean cross-entropy)")
        .draw()?;
    for r in runs {
        let c = color(r.kind);
        let pts = r
            .records
            .iter()
            .map(|e| (e.epoch as f64, e.train_loss.max(1e-12).log10()));
        chart
            .draw_series(LineSeries::new(pts, c.stroke_width(2)))?
            .label(r.kind.name())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}
