//! Real images: the UCI 8 x 8 handwritten digits (1,797 images, `examples/data/`), one candle
//! MLP backbone trained end to end with three classifier heads: a learned linear layer, a fixed
//! simplex ETF, and this crate's implicit ETF (`implicit_etf::candle::CandleHead`).
//!
//! ```text
//! cargo run --release --features candle --example digits
//! cargo run --release --features candle --example digits -- --epochs 40 --seed 3
//! ```
//!
//! Same backbone initialisation (one seed), optimiser (AdamW), mini-batch order and fixed
//! train/test split for every head. Per epoch it prints the mean training loss, train and test
//! accuracy and NC1-NC3 of the penultimate features, and it writes `digits.csv` and
//! `digits.svg` (accuracy and loss per epoch, with axis labels, legend and title) to `--out`.
//! With `candle-cuda` and a GPU, `--cuda` runs everything on CUDA device 0.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use candle_core::{DType, Device, Module, Tensor, Var, D};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use clap::Parser;
use implicit_etf::candle::CandleHead;
use implicit_etf::metrics::nc_metrics;
use implicit_etf::HeadConfig;
use indicatif::{ProgressBar, ProgressStyle};
use plotters::prelude::*;

/// The data: 1,797 records of 65 bytes, 64 pixels (0..=16, row-major 8 x 8) then the label.
const DIGITS: &[u8] = include_bytes!("data/digits.u8");
const PIXELS: usize = 64;
const CLASSES: usize = 10;

/// Train a candle MLP on the UCI 8x8 digits with a learned linear, a fixed-ETF and the
/// implicit-ETF head, and compare them epoch by epoch.
#[derive(Parser, Debug, Clone)]
#[command(about, long_about = None)]
struct Args {
    /// Training epochs.
    #[arg(long, default_value_t = 30)]
    epochs: usize,
    /// Mini-batch size.
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// AdamW learning rate.
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    /// Seed of the initialisation, the split and the batch order.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Hidden width of the backbone.
    #[arg(long, default_value_t = 128)]
    hidden: usize,
    /// Feature dimension d (the backbone's output, at least 10).
    #[arg(long, default_value_t = 32)]
    dim: usize,
    /// Feature normalisation temperature tau (all three heads see tau x / ||x||).
    #[arg(long, default_value_t = 5.0)]
    tau: f64,
    /// Fraction of the images held out for testing.
    #[arg(long, default_value_t = 0.25)]
    test_fraction: f64,
    /// Output folder for digits.csv and digits.svg.
    #[arg(long, default_value = "digits-out")]
    out: PathBuf,
    /// Run on CUDA device 0 (needs the `candle-cuda` feature and a GPU).
    #[arg(long)]
    cuda: bool,
}

/// SplitMix64: the seedable generator of the initialisation, the split and the batch order.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in `[-1, 1)`.
    fn symmetric(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 52) as f64 - 1.0
    }
    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = (self.next_u64() % (i as u64 + 1)) as usize;
            v.swap(i, j);
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HeadKind {
    Linear,
    Fixed,
    Implicit,
}

impl HeadKind {
    const ALL: [HeadKind; 3] = [HeadKind::Linear, HeadKind::Fixed, HeadKind::Implicit];
    fn name(self) -> &'static str {
        match self {
            HeadKind::Linear => "linear",
            HeadKind::Fixed => "fixed ETF",
            HeadKind::Implicit => "implicit ETF",
        }
    }
    fn color(self) -> RGBColor {
        match self {
            HeadKind::Linear => RGBColor(31, 119, 180),
            HeadKind::Fixed => RGBColor(214, 39, 40),
            HeadKind::Implicit => RGBColor(44, 160, 44),
        }
    }
}

type Res<T> = Result<T, Box<dyn std::error::Error>>;

/// Images (`N x 64`, pixels scaled to `[0, 1]`) and labels of one part of the split.
struct Split {
    x: Tensor,
    y: Tensor,
    labels: Vec<u32>,
}

fn load(args: &Args, dev: &Device) -> Res<(Split, Split)> {
    let rec = PIXELS + 1;
    if DIGITS.len() % rec != 0 {
        return Err("examples/data/digits.u8: not a whole number of 65-byte records".into());
    }
    let n = DIGITS.len() / rec;
    let mut order: Vec<usize> = (0..n).collect();
    Rng(args.seed ^ 0x5eed_5917).shuffle(&mut order);
    let n_test = ((n as f64) * args.test_fraction).round() as usize;
    let part = |idx: &[usize]| -> Res<Split> {
        let mut x = Vec::with_capacity(idx.len() * PIXELS);
        let mut labels = Vec::with_capacity(idx.len());
        for &i in idx {
            let r = &DIGITS[i * rec..(i + 1) * rec];
            x.extend(r[..PIXELS].iter().map(|&p| f32::from(p) / 16.0));
            labels.push(u32::from(r[PIXELS]));
        }
        Ok(Split {
            x: Tensor::from_vec(x, (idx.len(), PIXELS), dev)?,
            y: Tensor::new(labels.as_slice(), dev)?,
            labels,
        })
    };
    Ok((part(&order[n_test..])?, part(&order[..n_test])?))
}

/// A dense layer with Kaiming-uniform weights from the run's seed (so that every head starts
/// from the same backbone, whatever candle's own generator does).
struct Dense {
    w: Var,
    b: Var,
}

impl Dense {
    fn new(rng: &mut Rng, fan_in: usize, fan_out: usize, dev: &Device) -> Res<Self> {
        let bound = (6.0 / fan_in as f64).sqrt();
        let w: Vec<f32> = (0..fan_in * fan_out)
            .map(|_| (bound * rng.symmetric()) as f32)
            .collect();
        Ok(Dense {
            w: Var::from_tensor(&Tensor::from_vec(w, (fan_out, fan_in), dev)?)?,
            b: Var::zeros(fan_out, DType::F32, dev)?,
        })
    }
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.matmul(&self.w.as_tensor().t()?)?
            .broadcast_add(self.b.as_tensor())
    }
}

/// The backbone: 64 -> hidden -> ReLU -> hidden -> ReLU -> d.
struct Mlp {
    layers: Vec<Dense>,
}

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut h = x.clone();
        for (i, l) in self.layers.iter().enumerate() {
            h = l.forward(&h)?;
            if i + 1 < self.layers.len() {
                h = h.relu()?;
            }
        }
        Ok(h)
    }
}

impl Mlp {
    fn new(args: &Args, dev: &Device) -> Res<Self> {
        let mut rng = Rng(args.seed);
        Ok(Mlp {
            layers: vec![
                Dense::new(&mut rng, PIXELS, args.hidden, dev)?,
                Dense::new(&mut rng, args.hidden, args.hidden, dev)?,
                Dense::new(&mut rng, args.hidden, args.dim, dev)?,
            ],
        })
    }
    fn vars(&self) -> Vec<Var> {
        self.layers
            .iter()
            .flat_map(|l| [l.w.clone(), l.b.clone()])
            .collect()
    }
}

/// `tau x / max(||x||, 1e-12)` per row: what every head's classifier sees.
fn normalise(x: &Tensor, tau: f64) -> candle_core::Result<Tensor> {
    let norm = x
        .sqr()?
        .sum_keepdim(1)?
        .sqrt()?
        .clamp(1e-12, f64::INFINITY)?;
    x.broadcast_div(&norm)? * tau
}

/// The canonical simplex ETF `sqrt(K/(K-1)) (I_K - 11^T/K) E^T` (`K x d`), `E = I_{d x K}`.
fn canonical_etf(k: usize, d: usize, dev: &Device) -> candle_core::Result<Tensor> {
    let a = (k as f64 / (k - 1) as f64).sqrt();
    let w: Vec<f32> = (0..k * d)
        .map(|i| {
            let (c, j) = (i / d, i % d);
            if j >= k {
                0.0
            } else {
                (a * (f64::from(u8::from(c == j)) - 1.0 / k as f64)) as f32
            }
        })
        .collect();
    Tensor::from_vec(w, (k, d), dev)
}

/// A head and its trainable parameters.
enum Head {
    /// `W x + b`, both learned.
    Linear(Dense),
    /// `W x - W mu` with the fixed canonical ETF `W` and the batch mean `mu`.
    Fixed(Tensor),
    Implicit(Box<CandleHead>),
}

impl Head {
    fn new(kind: HeadKind, args: &Args, dev: &Device) -> Res<Self> {
        Ok(match kind {
            HeadKind::Linear => Head::Linear(Dense::new(
                &mut Rng(args.seed ^ 0x11ea5),
                args.dim,
                CLASSES,
                dev,
            )?),
            HeadKind::Fixed => Head::Fixed(canonical_etf(CLASSES, args.dim, dev)?),
            HeadKind::Implicit => {
                let cfg = HeadConfig::new(args.dim, CLASSES).with_tau(Some(args.tau));
                Head::Implicit(Box::new(CandleHead::new(cfg, dev)?))
            }
        })
    }

    fn vars(&self) -> Vec<Var> {
        match self {
            Head::Linear(l) => vec![l.w.clone(), l.b.clone()],
            _ => vec![],
        }
    }

    /// Training logits (advances the implicit head's state).
    fn train_logits(&mut self, feats: &Tensor, y: &Tensor, tau: f64) -> Res<Tensor> {
        Ok(match self {
            Head::Linear(l) => l.forward(&normalise(feats, tau)?)?,
            Head::Fixed(w) => fixed_logits(w, &normalise(feats, tau)?)?,
            Head::Implicit(h) => h.forward(feats, y)?,
        })
    }

    /// Evaluation logits (no state change).
    fn eval_logits(&self, feats: &Tensor, tau: f64) -> Res<Tensor> {
        Ok(match self {
            Head::Linear(l) => l.forward(&normalise(feats, tau)?)?,
            Head::Fixed(w) => fixed_logits(w, &normalise(feats, tau)?)?,
            Head::Implicit(h) => h.infer(feats)?,
        })
    }

    /// The classifier `W` (`K x d`) and bias `b` (`K`) applied to the normalised features of
    /// `x` (`b = -W mu` for the ETF heads, with `mu` the mean of `x`), for the NC metrics.
    fn classifier(&self, x: &Tensor) -> Res<(Vec<f32>, Vec<f32>)> {
        let w = match self {
            Head::Linear(l) => {
                let w = l.w.as_tensor().flatten_all()?.to_vec1::<f32>()?;
                return Ok((w, l.b.as_tensor().to_vec1::<f32>()?));
            }
            Head::Fixed(w) => w.clone(),
            Head::Implicit(h) => h.classifier()?.ok_or("implicit head has no classifier")?,
        };
        let mu = x.mean_keepdim(0)?;
        let b = mu.matmul(&w.t()?)?.neg()?.flatten_all()?.to_vec1::<f32>()?;
        Ok((w.flatten_all()?.to_vec1::<f32>()?, b))
    }
}

fn fixed_logits(w: &Tensor, x: &Tensor) -> candle_core::Result<Tensor> {
    let mu = x.mean_keepdim(0)?;
    x.broadcast_sub(&mu)?.matmul(&w.t()?)
}

fn accuracy(logits: &Tensor, y: &Tensor) -> Res<f64> {
    let pred = logits.argmax(D::Minus1)?;
    let right = pred
        .eq(y)?
        .to_dtype(DType::F32)?
        .sum_all()?
        .to_scalar::<f32>()?;
    Ok(100.0 * f64::from(right) / y.elem_count() as f64)
}

#[derive(Debug, Clone, Copy)]
struct Epoch {
    epoch: usize,
    train_loss: f64,
    train_acc: f64,
    test_acc: f64,
    nc1: f64,
    nc2: f64,
    nc3: f64,
}

struct Run {
    kind: HeadKind,
    epochs: Vec<Epoch>,
    seconds: f64,
}

impl Run {
    fn first_epoch_at(&self, acc: f64) -> Option<usize> {
        self.epochs
            .iter()
            .find(|e| e.train_acc >= acc)
            .map(|e| e.epoch)
    }
}

fn train(
    kind: HeadKind,
    args: &Args,
    data: &(Split, Split),
    dev: &Device,
    pb: &ProgressBar,
) -> Res<Run> {
    let t0 = std::time::Instant::now();
    let (train, test) = data;
    let n = train.labels.len();
    let mlp = Mlp::new(args, dev)?;
    let mut head = Head::new(kind, args, dev)?;
    let mut vars = mlp.vars();
    vars.extend(head.vars());
    let mut opt = AdamW::new(
        vars,
        ParamsAdamW {
            lr: args.lr,
            ..ParamsAdamW::default()
        },
    )?;
    let mut order_rng = Rng(args.seed ^ 0x0bad_5eed);
    let mut order: Vec<u32> = (0..n as u32).collect();
    let mut epochs = Vec::new();
    for epoch in 1..=args.epochs {
        order_rng.shuffle(&mut order);
        let (mut loss_sum, mut batches) = (0.0, 0usize);
        for chunk in order.chunks(args.batch) {
            let idx = Tensor::new(chunk, dev)?;
            let (x, y) = (
                train.x.index_select(&idx, 0)?,
                train.y.index_select(&idx, 0)?,
            );
            let feats = mlp.forward(&x)?;
            let logits = head.train_logits(&feats, &y, args.tau)?;
            let loss = candle_nn::loss::cross_entropy(&logits, &y)?;
            opt.backward_step(&loss)?;
            loss_sum += f64::from(loss.to_scalar::<f32>()?);
            batches += 1;
            pb.inc(1);
        }
        let feats_train = mlp.forward(&train.x)?.detach();
        let feats_test = mlp.forward(&test.x)?.detach();
        let train_acc = accuracy(&head.eval_logits(&feats_train, args.tau)?, &train.y)?;
        let test_acc = accuracy(&head.eval_logits(&feats_test, args.tau)?, &test.y)?;
        let xn = normalise(&feats_train, args.tau)?;
        let (w, b) = head.classifier(&xn)?;
        let xs = xn.flatten_all()?.to_vec1::<f32>()?;
        let m = nc_metrics(&xs, &train.labels, n, args.dim, CLASSES, &w, &b)?;
        let e = Epoch {
            epoch,
            train_loss: loss_sum / batches as f64,
            train_acc,
            test_acc,
            nc1: m.nc1,
            nc2: m.nc2,
            nc3: m.nc3,
        };
        pb.set_message(format!(
            "epoch {epoch} loss {:.4} train {:.1}% test {:.1}%",
            e.train_loss, e.train_acc, e.test_acc
        ));
        // Printed above the bar on a terminal, and plainly when the output is a pipe or a file.
        pb.suspend(|| {
            println!(
                "{:>12} epoch {:>3}: loss {:.4}  train acc {:>5.1}%  test acc {:>5.1}%  NC1 {:.3e}  NC2 {:.3e}  NC3 {:.3e}",
                kind.name(),
                epoch,
                e.train_loss,
                e.train_acc,
                e.test_acc,
                e.nc1,
                e.nc2,
                e.nc3
            )
        });
        epochs.push(e);
    }
    Ok(Run {
        kind,
        epochs,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

fn device(args: &Args) -> Res<Device> {
    if !args.cuda {
        return Ok(Device::Cpu);
    }
    if cfg!(feature = "candle-cuda") {
        Ok(Device::new_cuda(0)?)
    } else {
        Err("--cuda needs the `candle-cuda` feature".into())
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

fn run() -> Res<()> {
    let args = Args::parse();
    if args.dim < CLASSES || args.epochs == 0 || args.batch == 0 {
        return Err(format!("need --dim >= {CLASSES}, --epochs >= 1, --batch >= 1").into());
    }
    if !(args.test_fraction > 0.0 && args.test_fraction < 1.0) {
        return Err("--test-fraction must lie in (0, 1)".into());
    }
    let dev = device(&args)?;
    let data = load(&args, &dev)?;
    let n_train = data.0.labels.len();
    println!(
        "UCI 8x8 digits: {} train / {} test images, MLP 64-{}-{}-{} (d = {}), AdamW lr {}, batch {}, {} epochs, tau {}, seed {}, {:?}",
        n_train,
        data.1.labels.len(),
        args.hidden,
        args.hidden,
        args.dim,
        args.dim,
        args.lr,
        args.batch,
        args.epochs,
        args.tau,
        args.seed,
        dev.location()
    );
    let steps = (args.epochs * n_train.div_ceil(args.batch)) as u64;
    let style = ProgressStyle::with_template(
        "{prefix:>12} [{bar:30}] {pos}/{len} steps {elapsed_precise} {msg}",
    )?
    .progress_chars("=> ");
    let mut runs = Vec::new();
    for kind in HeadKind::ALL {
        let pb = ProgressBar::new(steps).with_style(style.clone());
        pb.set_prefix(kind.name());
        let r = train(kind, &args, &data, &dev, &pb);
        pb.finish();
        runs.push(r?);
    }
    print!("{}", table(&runs));
    std::fs::create_dir_all(&args.out)?;
    let csv = args.out.join("digits.csv");
    std::fs::write(&csv, to_csv(&runs))?;
    let svg = args.out.join("digits.svg");
    plot(&svg, &runs, &args)?;
    println!("wrote {} and {}", csv.display(), svg.display());
    Ok(())
}

fn epoch_str(e: Option<usize>) -> String {
    e.map_or("never".into(), |e| e.to_string())
}

fn table(runs: &[Run]) -> String {
    let mut s = String::from(
        "\n| head | train acc after epoch 1 | first epoch at train acc >= 95% | >= 99% | 100% | final train acc | final test acc | best test acc | NC1 | NC2 | NC3 | time |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in runs {
        let Some(last) = r.epochs.last() else {
            continue;
        };
        let best = r.epochs.iter().map(|e| e.test_acc).fold(0.0, f64::max);
        let _ = writeln!(
            s,
            "| {} | {:.1}% | {} | {} | {} | {:.1}% | {:.1}% | {:.1}% | {:.2e} | {:.2e} | {:.2e} | {:.1} s |",
            r.kind.name(),
            r.epochs[0].train_acc,
            epoch_str(r.first_epoch_at(95.0)),
            epoch_str(r.first_epoch_at(99.0)),
            epoch_str(r.first_epoch_at(100.0)),
            last.train_acc,
            last.test_acc,
            best,
            last.nc1,
            last.nc2,
            last.nc3,
            r.seconds
        );
    }
    s
}

fn to_csv(runs: &[Run]) -> String {
    let mut s = String::from("head,epoch,train_loss,train_acc,test_acc,nc1,nc2,nc3\n");
    for r in runs {
        for e in &r.epochs {
            let _ = writeln!(
                s,
                "{},{},{},{},{},{},{},{}",
                r.kind.name(),
                e.epoch,
                e.train_loss,
                e.train_acc,
                e.test_acc,
                e.nc1,
                e.nc2,
                e.nc3
            );
        }
    }
    s
}

/// Train accuracy (solid) and test accuracy (dashed) on the left, log10 of the training loss
/// on the right; one colour per head, with a legend. SVG renders the text without a font.
fn plot(path: &Path, runs: &[Run], args: &Args) -> Res<()> {
    let root = SVGBackend::new(path, (1200, 520)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(
        &format!(
            "UCI 8x8 digits, MLP backbone (d = {}), three classifier heads (seed {})",
            args.dim, args.seed
        ),
        ("sans-serif", 22),
    )?;
    let (left, right) = root.split_horizontally(600);
    let x_max = args.epochs.max(2) as f64;
    let lo = runs
        .iter()
        .flat_map(|r| r.epochs.iter().flat_map(|e| [e.train_acc, e.test_acc]))
        .fold(100.0, f64::min);
    let y_lo = (lo / 10.0).floor() * 10.0;
    let mut chart = ChartBuilder::on(&left)
        .caption("accuracy (solid: train, dashed: test)", ("sans-serif", 16))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(1.0..x_max, y_lo..100.5)?;
    chart
        .configure_mesh()
        .x_desc("epoch")
        .y_desc("accuracy (%)")
        .draw()?;
    for r in runs {
        let c = r.kind.color();
        chart
            .draw_series(LineSeries::new(
                r.epochs.iter().map(|e| (e.epoch as f64, e.train_acc)),
                c.stroke_width(2),
            ))?
            .label(format!("{} (train)", r.kind.name()))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
        chart
            .draw_series(DashedLineSeries::new(
                r.epochs.iter().map(|e| (e.epoch as f64, e.test_acc)),
                6,
                4,
                c.stroke_width(1),
            ))?
            .label(format!("{} (test)", r.kind.name()))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(1)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;

    let logs: Vec<f64> = runs
        .iter()
        .flat_map(|r| r.epochs.iter().map(|e| e.train_loss.max(1e-12).log10()))
        .collect();
    let (l_lo, l_hi) = logs
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| {
            (a.min(v), b.max(v))
        });
    let mut chart = ChartBuilder::on(&right)
        .caption("training loss", ("sans-serif", 16))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(1.0..x_max, (l_lo - 0.1)..(l_hi + 0.1))?;
    chart
        .configure_mesh()
        .x_desc("epoch")
        .y_desc("log10(mean cross-entropy)")
        .draw()?;
    for r in runs {
        let c = r.kind.color();
        chart
            .draw_series(LineSeries::new(
                r.epochs
                    .iter()
                    .map(|e| (e.epoch as f64, e.train_loss.max(1e-12).log10())),
                c.stroke_width(2),
            ))?
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
