//! Unconstrained feature model (UFM) training with three classifier heads.
//!
//! Shared by the `ufm` example (`examples/ufm.rs`) and its integration test (`tests/ufm.rs`):
//! argument parsing, data, the `standard` and `fixed` heads, SGD with momentum and weight
//! decay, and the per-epoch evaluation (accuracy, loss, neural-collapse metrics).
#![allow(dead_code)]

use std::fmt;
use std::path::PathBuf;

use implicit_etf::cpu::stats::{tau_normalise, tau_normalise_backward};
use implicit_etf::metrics::{nc_metrics, NcMetrics};
use implicit_etf::runtime::Device;
use implicit_etf::Collective;
use implicit_etf::{cross_entropy, CpuHead, DeviceHead, HeadConfig};

/// One of the three heads the paper compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadKind {
    /// Learned `K x d` classifier, no bias, rows re-normalised to unit norm after each step.
    Standard,
    /// Fixed canonical simplex ETF `sqrt(K/(K-1)) M E^T`, `E = I_{d x K}`, bias `-W mu`.
    Fixed,
    /// This crate's implicit-ETF head (`CpuHead`, or `DeviceHead` with `--backend cuda`).
    Implicit,
}

impl HeadKind {
    /// All heads, in the order they are run and reported.
    pub const ALL: [HeadKind; 3] = [HeadKind::Standard, HeadKind::Fixed, HeadKind::Implicit];

    /// The name used on the command line, in the CSV and in the table.
    pub fn name(self) -> &'static str {
        match self {
            HeadKind::Standard => "standard",
            HeadKind::Fixed => "fixed",
            HeadKind::Implicit => "implicit",
        }
    }

    fn parse(s: &str) -> Result<Self, String> {
        match s {
            "standard" => Ok(HeadKind::Standard),
            "fixed" => Ok(HeadKind::Fixed),
            "implicit" => Ok(HeadKind::Implicit),
            other => Err(format!(
                "unknown head '{other}' in --heads (expected standard, fixed or implicit)"
            )),
        }
    }
}

impl fmt::Display for HeadKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Where the implicit head runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Cpu,
    Cuda,
}

/// A complete run configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub classes: usize,
    pub dim: usize,
    pub samples: usize,
    pub epochs: usize,
    pub batch: usize,
    pub lr: f64,
    pub momentum: f64,
    pub weight_decay: f64,
    pub tau: f64,
    pub seed: u64,
    pub heads: Vec<HeadKind>,
    pub backend: Backend,
    /// Output directory; `None`: the default folder under the working directory.
    pub out: Option<PathBuf>,
    /// Compute the neural-collapse metrics at the end of every epoch.
    pub metrics: bool,
    /// Data-parallel ranks of the implicit head (threads of this process, each with its
    /// shard of every batch; `--backend cpu` only).
    pub ranks: usize,
}

impl Default for Config {
    /// The K=10 row of `docs/metrics.md#training-expectations`.
    fn default() -> Self {
        Config {
            classes: 10,
            dim: 512,
            samples: 1000,
            epochs: 25,
            batch: 128,
            lr: 0.05,
            momentum: 0.9,
            weight_decay: 5e-4,
            tau: 5.0,
            seed: 0,
            heads: HeadKind::ALL.to_vec(),
            backend: Backend::Cpu,
            out: None,
            metrics: true,
            ranks: 1,
        }
    }
}

/// The command line (clap derive; `--help` is generated from these doc comments).
#[derive(clap::Parser, Debug)]
#[command(
    name = "ufm",
    about = "Unconstrained feature model: trains free features with the standard, fixed-ETF \
             and implicit-ETF heads and compares them.",
    override_usage = "cargo run --release --example ufm -- [OPTIONS]"
)]
struct Cli {
    /// Number of classes K.
    #[arg(long, value_name = "K", default_value_t = Config::default().classes, allow_hyphen_values = true)]
    classes: usize,
    /// Feature dimension d (at least K).
    #[arg(long, value_name = "D", default_value_t = Config::default().dim, allow_hyphen_values = true)]
    dim: usize,
    /// Number of samples N (a multiple of K: balanced labels).
    #[arg(long, value_name = "N", default_value_t = Config::default().samples, allow_hyphen_values = true)]
    samples: usize,
    /// Training epochs.
    #[arg(long, value_name = "E", default_value_t = Config::default().epochs, allow_hyphen_values = true)]
    epochs: usize,
    /// Mini-batch size.
    #[arg(long, value_name = "B", default_value_t = Config::default().batch, allow_hyphen_values = true)]
    batch: usize,
    /// SGD learning rate.
    #[arg(long, value_name = "LR", default_value_t = Config::default().lr, allow_hyphen_values = true)]
    lr: f64,
    /// Seed of the features, labels and initialisations.
    #[arg(long, value_name = "S", default_value_t = Config::default().seed, allow_hyphen_values = true)]
    seed: u64,
    /// Heads to train, comma-separated.
    #[arg(long, value_name = "LIST", default_value = "standard,fixed,implicit")]
    heads: String,
    /// Where the implicit head runs: cpu or cuda (CUDA device 0).
    #[arg(long, value_name = "cpu|cuda", default_value = "cpu")]
    backend: String,
    /// Output folder (default: ufm-out/K{K}_d{D}_N{N}_seed{S}).
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Data-parallel ranks of the implicit head: R threads, each a CpuHead with its shard of
    /// every batch, their statistics summed by a thread collective (--backend cpu).
    #[arg(
        long,
        value_name = "R",
        default_value_t = 1,
        allow_hyphen_values = true
    )]
    ranks: usize,
}

/// The `--help` text.
pub fn usage() -> String {
    use clap::CommandFactory;
    Cli::command().render_help().to_string()
}

/// What the command line asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    Run(Config),
    Help,
}

/// One line from a clap error, in this example's wording for the common cases.
fn clap_message(e: &clap::Error) -> String {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    let ctx = |k| match e.get(k) {
        Some(ContextValue::String(s)) => s.clone(),
        _ => String::new(),
    };
    let text = e.to_string();
    let first = text
        .lines()
        .next()
        .unwrap_or("")
        .trim_start_matches("error: ");
    let arg = ctx(ContextKind::InvalidArg);
    let flag = arg.split_whitespace().next().unwrap_or("").to_string();
    match e.kind() {
        ErrorKind::UnknownArgument => format!("unknown argument '{arg}' (see --help)"),
        _ if first.starts_with("a value is required") => format!("missing value for {flag}"),
        _ => first.to_string(),
    }
}

/// Parses the arguments (without the program name) and validates the result.
pub fn parse_args<I, S>(args: I) -> Result<Command, String>
where
    I: IntoIterator<Item = S>,
    S: Into<String>,
{
    use clap::Parser;
    let argv = std::iter::once("ufm".to_string()).chain(args.into_iter().map(Into::into));
    let cli = match Cli::try_parse_from(argv) {
        Ok(c) => c,
        Err(e) if e.kind() == clap::error::ErrorKind::DisplayHelp => return Ok(Command::Help),
        Err(e) => return Err(clap_message(&e)),
    };
    let mut heads = Vec::new();
    for h in cli
        .heads
        .split(',')
        .map(str::trim)
        .filter(|h| !h.is_empty())
    {
        let h = HeadKind::parse(h)?;
        if heads.contains(&h) {
            return Err(format!("head '{h}' given twice in --heads"));
        }
        heads.push(h);
    }
    let backend = match cli.backend.as_str() {
        "cpu" => Backend::Cpu,
        "cuda" => Backend::Cuda,
        other => {
            return Err(format!(
                "invalid value '{other}' for --backend: expected cpu or cuda"
            ))
        }
    };
    if cli.out.as_ref().is_some_and(|o| o.as_os_str().is_empty()) {
        return Err("empty value for --out".into());
    }
    let cfg = Config {
        classes: cli.classes,
        dim: cli.dim,
        samples: cli.samples,
        epochs: cli.epochs,
        batch: cli.batch,
        lr: cli.lr,
        seed: cli.seed,
        heads,
        backend,
        out: cli.out,
        ranks: cli.ranks,
        ..Config::default()
    };
    validate(&cfg)?;
    Ok(Command::Run(cfg))
}

/// Checks a configuration; the message is one line.
pub fn validate(cfg: &Config) -> Result<(), String> {
    if cfg.classes < 2 {
        return Err(format!("--classes must be at least 2, got {}", cfg.classes));
    }
    if cfg.dim < cfg.classes {
        return Err(format!(
            "--dim ({}) must be at least --classes ({})",
            cfg.dim, cfg.classes
        ));
    }
    if cfg.samples == 0 || cfg.samples % cfg.classes != 0 {
        return Err(format!(
            "--samples ({}) must be a positive multiple of --classes ({}) for balanced labels",
            cfg.samples, cfg.classes
        ));
    }
    if cfg.epochs == 0 {
        return Err("--epochs must be at least 1".into());
    }
    if cfg.batch == 0 {
        return Err("--batch must be at least 1".into());
    }
    if !(cfg.lr.is_finite() && cfg.lr > 0.0) {
        return Err(format!("--lr must be finite and > 0, got {}", cfg.lr));
    }
    if cfg.heads.is_empty() {
        return Err("--heads is empty (expected some of standard,fixed,implicit)".into());
    }
    if cfg.ranks == 0 {
        return Err("--ranks must be at least 1".into());
    }
    if cfg.ranks > 1 && cfg.backend != Backend::Cpu {
        return Err("--ranks above 1 needs --backend cpu (thread ranks)".into());
    }
    Ok(())
}

/// SplitMix64: small, seedable, good enough for initialisations and shuffles.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x5851_f42d_4c95_7f2d)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in `(0, 1]`.
    fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64
    }
    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let (u, v) = (self.uniform(), self.uniform());
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    }
    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i + 1);
            v.swap(i, j);
        }
    }
}

/// The training set: free features and balanced, shuffled labels.
#[derive(Debug, Clone)]
pub struct Data {
    /// `N x d`, row-major, init `N(0, 1/d)`.
    pub h: Vec<f64>,
    pub labels: Vec<usize>,
}

impl Data {
    pub fn new(cfg: &Config) -> Self {
        let (n, d, k) = (cfg.samples, cfg.dim, cfg.classes);
        let mut rng = Rng::new(cfg.seed);
        let sd = 1.0 / (d as f64).sqrt();
        let h = (0..n * d).map(|_| sd * rng.normal()).collect();
        let mut labels: Vec<usize> = (0..n).map(|i| i % k).collect();
        rng.shuffle(&mut labels);
        Data { h, labels }
    }
}

/// What one epoch measured, on the whole training set at its end.
#[derive(Debug, Clone)]
pub struct EpochRecord {
    /// 1-based.
    pub epoch: usize,
    /// Mean of the mini-batch losses during the epoch.
    pub train_loss: f64,
    /// Mean cross-entropy of the whole set under the current head at the epoch's end.
    pub eval_loss: f64,
    /// Train accuracy (%) of the whole set under the current head at the epoch's end.
    pub accuracy: f64,
    /// Neural-collapse metrics (normalised features, current `W`, `b`).
    pub metrics: Option<NcMetrics>,
}

/// A head's whole run.
#[derive(Debug, Clone)]
pub struct HeadRun {
    pub kind: HeadKind,
    pub records: Vec<EpochRecord>,
    pub seconds: f64,
}

impl HeadRun {
    pub fn first_epoch_accuracy(&self) -> f64 {
        self.records.first().map_or(f64::NAN, |r| r.accuracy)
    }
    /// First epoch (1-based) with every training sample classified correctly.
    pub fn first_epoch_at_100(&self) -> Option<usize> {
        self.records
            .iter()
            .find(|r| r.accuracy >= 100.0)
            .map(|r| r.epoch)
    }
    pub fn last(&self) -> Option<&EpochRecord> {
        self.records.last()
    }
}

/// Progress events for a progress bar.
#[derive(Debug, Clone, Copy)]
pub enum Event<'a> {
    Step { loss: f64 },
    Epoch(&'a EpochRecord),
}

/// Number of mini-batches per epoch (the last one may be short).
pub fn batches_per_epoch(cfg: &Config) -> usize {
    cfg.samples.div_ceil(cfg.batch)
}

/// SGD with momentum and weight decay (PyTorch's rule): `g += wd p; v = m v + g; p -= lr v`.
#[derive(Debug, Clone)]
struct Sgd {
    lr: f64,
    momentum: f64,
    wd: f64,
    v: Vec<f64>,
}

impl Sgd {
    fn new(cfg: &Config, len: usize) -> Self {
        Sgd {
            lr: cfg.lr,
            momentum: cfg.momentum,
            wd: cfg.weight_decay,
            v: vec![0.0; len],
        }
    }
    /// `grad` is the full gradient (zero outside the batch), like a dense PyTorch parameter.
    fn step(&mut self, p: &mut [f64], grad: &[f64]) {
        for ((p, v), &g) in p.iter_mut().zip(&mut self.v).zip(grad) {
            let g = g + self.wd * *p;
            *v = self.momentum * *v + g;
            *p -= self.lr * *v;
        }
    }
}

/// `out (n x k) = x (n x d) W^T (W: k x d)`, plus `b` if given.
fn logits(x: &[f64], n: usize, d: usize, w: &[f64], k: usize, b: Option<&[f64]>) -> Vec<f64> {
    let mut out = vec![0.0; n * k];
    for i in 0..n {
        let xi = &x[i * d..(i + 1) * d];
        for c in 0..k {
            let wc = &w[c * d..(c + 1) * d];
            let dot: f64 = xi.iter().zip(wc).map(|(a, b)| a * b).sum();
            out[i * k + c] = dot + b.map_or(0.0, |b| b[c]);
        }
    }
    out
}

/// `dx (n x d) = dl (n x k) W (k x d)`.
fn logits_dx(dl: &[f64], n: usize, k: usize, w: &[f64], d: usize) -> Vec<f64> {
    let mut dx = vec![0.0; n * d];
    for i in 0..n {
        let row = &mut dx[i * d..(i + 1) * d];
        for c in 0..k {
            let g = dl[i * k + c];
            if g != 0.0 {
                for (o, &wv) in row.iter_mut().zip(&w[c * d..(c + 1) * d]) {
                    *o += g * wv;
                }
            }
        }
    }
    dx
}

/// `dW (k x d) = dl^T (k x n) x (n x d)`.
fn logits_dw(dl: &[f64], x: &[f64], n: usize, k: usize, d: usize) -> Vec<f64> {
    let mut dw = vec![0.0; k * d];
    for i in 0..n {
        let xi = &x[i * d..(i + 1) * d];
        for c in 0..k {
            let g = dl[i * k + c];
            for (o, &xv) in dw[c * d..(c + 1) * d].iter_mut().zip(xi) {
                *o += g * xv;
            }
        }
    }
    dw
}

fn column_mean(x: &[f64], n: usize, d: usize) -> Vec<f64> {
    let mut mu = vec![0.0; d];
    for row in x.chunks_exact(d) {
        for (m, &v) in mu.iter_mut().zip(row) {
            *m += v;
        }
    }
    mu.iter_mut().for_each(|m| *m /= n as f64);
    mu
}

/// `b = -W mu`.
fn bias_of(w: &[f64], mu: &[f64], k: usize, d: usize) -> Vec<f64> {
    (0..k)
        .map(|c| {
            -w[c * d..(c + 1) * d]
                .iter()
                .zip(mu)
                .map(|(a, b)| a * b)
                .sum::<f64>()
        })
        .collect()
}

fn normalise_rows(w: &mut [f64], d: usize) {
    for row in w.chunks_exact_mut(d) {
        let norm = row.iter().map(|v| v * v).sum::<f64>().sqrt().max(1e-12);
        row.iter_mut().for_each(|v| *v /= norm);
    }
}

/// The canonical simplex ETF `sqrt(K/(K-1)) M E^T` (`K x d`), `E = I_{d x K}`,
/// `M = I_K - 11^T/K`: row `c` is `sqrt(K/(K-1)) (e_c - (1/K) sum_j e_j)`.
pub fn canonical_etf(k: usize, d: usize) -> Vec<f64> {
    let a = (k as f64 / (k - 1) as f64).sqrt();
    let mut w = vec![0.0; k * d];
    for c in 0..k {
        for j in 0..k {
            w[c * d + j] = a * (if c == j { 1.0 } else { 0.0 } - 1.0 / k as f64);
        }
    }
    w
}

fn accuracy(logits: &[f64], labels: &[usize], k: usize) -> f64 {
    let correct = logits
        .chunks_exact(k)
        .zip(labels)
        .filter(|(row, &y)| {
            // Strictly above every other class (a tie counts as wrong).
            row.iter().enumerate().all(|(c, &v)| c == y || v < row[y])
        })
        .count();
    100.0 * correct as f64 / labels.len() as f64
}

/// The head being trained, with its parameters.
enum Head {
    Standard {
        w: Vec<f64>,
        opt: Sgd,
    },
    Fixed {
        w: Vec<f64>,
    },
    Implicit(Box<CpuHead<f64>>),
    /// The implicit head data-parallel over `--ranks` thread ranks (one `CpuHead` each).
    ImplicitRanks(Vec<CpuHead<f64>>),
    /// The implicit head on the GPU (`--backend cuda`).
    ImplicitDevice(Box<DeviceHead>),
}

fn lib_err(what: &str) -> impl Fn(implicit_etf::Error) -> String + '_ {
    move |e| format!("{what}: {e}")
}

impl Head {
    fn new(kind: HeadKind, cfg: &Config) -> Result<Self, String> {
        let (d, k) = (cfg.dim, cfg.classes);
        Ok(match kind {
            HeadKind::Standard => {
                let mut rng = Rng::new(cfg.seed.wrapping_add(0x57a2_d0a1));
                let mut w: Vec<f64> = (0..k * d).map(|_| 0.01 * rng.normal()).collect();
                normalise_rows(&mut w, d);
                Head::Standard {
                    w,
                    opt: Sgd::new(cfg, k * d),
                }
            }
            HeadKind::Fixed => Head::Fixed {
                w: canonical_etf(k, d),
            },
            HeadKind::Implicit if cfg.backend == Backend::Cuda => {
                let hc = HeadConfig::new(d, k).with_tau(Some(cfg.tau));
                let dev = Device::cuda(0).map_err(lib_err("--backend cuda"))?;
                Head::ImplicitDevice(Box::new(
                    DeviceHead::new(dev, hc).map_err(lib_err("implicit head"))?,
                ))
            }
            HeadKind::Implicit if cfg.ranks > 1 => {
                let hc = HeadConfig::new(d, k).with_tau(Some(cfg.tau));
                let group = Collective::threads(cfg.ranks).map_err(lib_err("--ranks"))?;
                let heads = group
                    .into_iter()
                    .map(|c| CpuHead::<f64>::new(hc.clone())?.with_collective(c))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(lib_err("implicit head"))?;
                Head::ImplicitRanks(heads)
            }
            HeadKind::Implicit => {
                let hc = HeadConfig::new(d, k).with_tau(Some(cfg.tau));
                Head::Implicit(Box::new(
                    CpuHead::<f64>::new(hc).map_err(lib_err("implicit head"))?,
                ))
            }
        })
    }

    /// One training step on a batch of raw rows; returns `(loss, dL/draw)` and updates the
    /// head's own parameters.
    fn step(
        &mut self,
        raw: &[f64],
        labels: &[usize],
        cfg: &Config,
    ) -> Result<(f64, Vec<f64>), String> {
        let (d, k, tau) = (cfg.dim, cfg.classes, cfg.tau);
        let n = labels.len();
        match self {
            Head::ImplicitDevice(head) => {
                // Features and labels to the device, logits back for the host loss, the
                // loss gradient to the device, the feature gradient back (a real trainer
                // keeps all of these on the device).
                let e = lib_err("implicit head (device)");
                let x: Vec<f32> = raw.iter().map(|&v| v as f32).collect();
                let y: Vec<u32> = labels.iter().map(|&v| v as u32).collect();
                let xb = head.device().upload(&x).map_err(&e)?;
                let yb = head.device().upload(&y).map_err(&e)?;
                let zb = head.forward(&xb, &yb).map_err(&e)?;
                let z: Vec<f32> = head.device().download(&zb).map_err(&e)?;
                let z: Vec<f64> = z.iter().map(|&v| v as f64).collect();
                let (loss, dl) = cross_entropy(&z, labels, k).map_err(lib_err("cross-entropy"))?;
                let dl: Vec<f32> = dl.iter().map(|&v| v as f32).collect();
                let dlb = head.device().upload(&dl).map_err(&e)?;
                let drb = head.backward(&dlb).map_err(&e)?;
                let dr: Vec<f32> = head.device().download(&drb).map_err(&e)?;
                Ok((loss, dr.iter().map(|&v| v as f64).collect()))
            }
            Head::ImplicitRanks(heads) => {
                // Rank r takes the r-th of R contiguous shards of the batch (sizes differ by
                // at most one; a shard may be empty), in a thread of its own; the loss is the
                // mean over the whole batch, so each rank's gradient is divided by N.
                let r = heads.len();
                let bounds: Vec<usize> = (0..=r).map(|i| i * n / r).collect();
                let parts = std::thread::scope(|s| {
                    let hs: Vec<_> = heads
                        .iter_mut()
                        .enumerate()
                        .map(|(i, head)| {
                            let rows = bounds[i]..bounds[i + 1];
                            let (raw, labels) = (&raw[rows.start * d..rows.end * d], &labels[rows]);
                            s.spawn(move || rank_step(head, raw, labels, k, n))
                        })
                        .collect();
                    hs.into_iter()
                        .map(|h| h.join().map_err(|_| "a rank panicked".to_string())?)
                        .collect::<Result<Vec<_>, String>>()
                })?;
                let loss = parts.iter().map(|p| p.0).sum::<f64>() / n as f64;
                Ok((loss, parts.into_iter().flat_map(|p| p.1).collect()))
            }
            Head::Implicit(head) => {
                let logits = head
                    .forward(raw, labels)
                    .map_err(lib_err("implicit forward"))?;
                let (loss, dl) =
                    cross_entropy(&logits, labels, k).map_err(lib_err("cross-entropy"))?;
                let dr = head.backward(&dl).map_err(lib_err("implicit backward"))?;
                Ok((loss, dr))
            }
            Head::Standard { w, opt } => {
                let x = tau_normalise(raw, n, d, tau).map_err(lib_err("normalise"))?;
                let z = logits(&x, n, d, w, k, None);
                let (loss, dl) = cross_entropy(&z, labels, k).map_err(lib_err("cross-entropy"))?;
                let dx = logits_dx(&dl, n, k, w, d);
                let dw = logits_dw(&dl, &x, n, k, d);
                opt.step(w, &dw);
                normalise_rows(w, d);
                Ok((
                    loss,
                    tau_normalise_backward(raw, &dx, n, d, tau).map_err(lib_err("normalise"))?,
                ))
            }
            Head::Fixed { w } => {
                // logits = (x - mu) W^T; the gradient flows through mu = mean of x.
                let x = tau_normalise(raw, n, d, tau).map_err(lib_err("normalise"))?;
                let mu = column_mean(&x, n, d);
                let b = bias_of(w, &mu, k, d);
                let z = logits(&x, n, d, w, k, Some(&b));
                let (loss, dl) = cross_entropy(&z, labels, k).map_err(lib_err("cross-entropy"))?;
                let mut dx = logits_dx(&dl, n, k, w, d);
                let mean = column_mean(&dx, n, d);
                for row in dx.chunks_exact_mut(d) {
                    row.iter_mut().zip(&mean).for_each(|(v, m)| *v -= m);
                }
                Ok((
                    loss,
                    tau_normalise_backward(raw, &dx, n, d, tau).map_err(lib_err("normalise"))?,
                ))
            }
        }
    }

    /// The current classifier `(W, b)` on the normalised features `x` of the whole set.
    fn classifier(
        &self,
        x: &[f64],
        n: usize,
        cfg: &Config,
    ) -> Result<(Vec<f64>, Vec<f64>), String> {
        let (d, k) = (cfg.dim, cfg.classes);
        match self {
            Head::Standard { w, .. } => Ok((w.clone(), vec![0.0; k])),
            Head::Fixed { w } => Ok((w.clone(), bias_of(w, &column_mean(x, n, d), k, d))),
            Head::Implicit(head) => head_classifier(head, x, n, cfg),
            // Every rank holds the same classifier.
            Head::ImplicitRanks(heads) => head_classifier(&heads[0], x, n, cfg),
            Head::ImplicitDevice(head) => {
                let e = lib_err("implicit head (device)");
                let wb = head
                    .classifier()
                    .map_err(&e)?
                    .ok_or("implicit head: no classifier before the first step")?;
                let w: Vec<f64> = head
                    .device()
                    .download::<f32>(&wb)
                    .map_err(&e)?
                    .iter()
                    .map(|&v| v as f64)
                    .collect();
                let b = bias_of(&w, &column_mean(x, n, d), k, d);
                Ok((w, b))
            }
        }
    }
}

/// One rank's share of a data-parallel step: forward on its rows, the gradient of the mean
/// cross-entropy over the global batch of `n_total` rows, backward. Returns the rank's sum of
/// per-row losses and `dL/draw` of its rows.
fn rank_step(
    head: &mut CpuHead<f64>,
    raw: &[f64],
    labels: &[usize],
    k: usize,
    n_total: usize,
) -> Result<(f64, Vec<f64>), String> {
    let logits = head
        .forward(raw, labels)
        .map_err(lib_err("implicit forward"))?;
    let (loss, mut dl) = if labels.is_empty() {
        (0.0, Vec::new())
    } else {
        cross_entropy(&logits, labels, k).map_err(lib_err("cross-entropy"))?
    };
    // `cross_entropy` averages over this rank's rows: rescale to the global mean.
    let share = labels.len() as f64 / n_total as f64;
    dl.iter_mut().for_each(|g| *g *= share);
    let dr = head.backward(&dl).map_err(lib_err("implicit backward"))?;
    Ok((loss * labels.len() as f64, dr))
}

/// The classifier `(W, b)` of a CPU implicit head, with the bias from the mean of `x`.
fn head_classifier(
    head: &CpuHead<f64>,
    x: &[f64],
    n: usize,
    cfg: &Config,
) -> Result<(Vec<f64>, Vec<f64>), String> {
    let (d, k) = (cfg.dim, cfg.classes);
    let w = head
        .classifier()
        .map_err(lib_err("implicit head"))?
        .ok_or("implicit head: no classifier before the first step")?;
    let b = bias_of(&w, &column_mean(x, n, d), k, d);
    Ok((w, b))
}

/// Trains one head from the data's initial features; `on_event` sees every step and epoch.
pub fn train_head(
    kind: HeadKind,
    cfg: &Config,
    data: &Data,
    on_event: &mut dyn FnMut(Event<'_>),
) -> Result<HeadRun, String> {
    validate(cfg)?;
    let start = std::time::Instant::now();
    let (n, d, k) = (cfg.samples, cfg.dim, cfg.classes);
    let mut h = data.h.clone();
    let mut opt_h = Sgd::new(cfg, n * d);
    let mut head = Head::new(kind, cfg)?;
    let mut grad = vec![0.0; n * d];
    let mut order: Vec<usize> = (0..n).collect();
    let mut records = Vec::with_capacity(cfg.epochs);
    for epoch in 1..=cfg.epochs {
        // The same batch order for every head.
        Rng::new(cfg.seed.wrapping_mul(1_000_003).wrapping_add(epoch as u64)).shuffle(&mut order);
        let mut loss_sum = 0.0;
        let mut batches = 0usize;
        for idx in order.chunks(cfg.batch) {
            let mut raw = Vec::with_capacity(idx.len() * d);
            for &i in idx {
                raw.extend_from_slice(&h[i * d..(i + 1) * d]);
            }
            let labels: Vec<usize> = idx.iter().map(|&i| data.labels[i]).collect();
            let (loss, dr) = head.step(&raw, &labels, cfg)?;
            if !loss.is_finite() {
                return Err(format!("{kind} head: loss is not finite at epoch {epoch}"));
            }
            grad.iter_mut().for_each(|g| *g = 0.0);
            for (r, &i) in idx.iter().enumerate() {
                grad[i * d..(i + 1) * d].copy_from_slice(&dr[r * d..(r + 1) * d]);
            }
            opt_h.step(&mut h, &grad);
            loss_sum += loss;
            batches += 1;
            on_event(Event::Step { loss });
        }
        let x = tau_normalise(&h, n, d, cfg.tau).map_err(lib_err("normalise"))?;
        let (w, b) = head.classifier(&x, n, cfg)?;
        let z = match &head {
            // The head's own inference path (stored classifier, bias from the set's mean).
            Head::Implicit(head) => head.infer(&h).map_err(lib_err("implicit infer"))?,
            Head::ImplicitRanks(heads) => heads[0].infer(&h).map_err(lib_err("implicit infer"))?,
            _ => logits(&x, n, d, &w, k, Some(&b)),
        };
        let (eval_loss, _) =
            cross_entropy(&z, &data.labels, k).map_err(lib_err("cross-entropy"))?;
        let metrics = if cfg.metrics {
            Some(nc_metrics(&x, &data.labels, n, d, k, &w, &b).map_err(lib_err("metrics"))?)
        } else {
            None
        };
        let rec = EpochRecord {
            epoch,
            train_loss: loss_sum / batches as f64,
            eval_loss,
            accuracy: accuracy(&z, &data.labels, k),
            metrics,
        };
        on_event(Event::Epoch(&rec));
        records.push(rec);
    }
    Ok(HeadRun {
        kind,
        records,
        seconds: start.elapsed().as_secs_f64(),
    })
}
