//! The device head ([`DeviceHead`]) against the CPU float64 head ([`CpuHead<f64>`]) on three
//! spectra of `G = c Y M + delta Prox` that `tests/device_head.rs` (Gaussian class means,
//! 3-4 steps) does not stress:
//!
//! * **clustered**: collapsed features, the class means a simplex ETF plus relative noise
//!   `1e-3`, `1e-5`, `1e-6`, so `G` has `K - 1` singular values equal to within about the noise
//!   (what late training produces). A warm-started eigensolver starts from eigenvectors that
//!   are arbitrary inside the cluster.
//! * **graded**: the batch class means are `U diag(sigma) V^T` with `sigma` geometric from 1 to
//!   `1e-8`, plus per-sample noise that cancels inside each class. `c Y M` then has singular
//!   values over 8 orders of magnitude; the first step's null-direction cut-off
//!   (`NULL_RTOL = 1e-6`) falls inside the range, and later `G` has a cluster of singular
//!   values at about `delta` (every `c sigma_i <= 1e-3` is swamped by `delta Prox`).
//! * **moving**: 50 consecutive steps whose class means rotate by about `1e-3` rad and shift
//!   by `1e-3` (relative) per step, as in training (Gaussian and nearly collapsed means): the
//!   warm start is always close, and errors could accumulate through the carried state.
//!
//! `K = 100`, `d = 128` versions of the three are `#[ignore = "slow: ..."]`.
//!
//! Every case runs with `DeviceOptions::default()` and with
//! `EigenSolver::OneBlock` and `EigenSolver::Refine` (the loop over [`SOLVERS`]; the fast
//! tier's small cases with one of them each, the slow tier with the other), `f32`
//! features, on the CPU execution and on a CUDA GPU when one is present (otherwise "CUDA
//! part skipped: <reason>"; `IMPLICIT_ETF_DEVICE=cpu|cuda` restricts it). The CPU head gets
//! the very same `f32` features widened exactly to `f64`, the same labels, the same
//! `dL/dlogits`; every quantity is compared with it after every step (the first step's gauge
//! rule runs on the host in both heads, from each head's own `Y`).
//!
//! Tolerances, and why (`u = 2^-24 = 6e-8`, the `f32` unit roundoff):
//!
//! * `P`, `W`: **max abs** error `<= 1e-5` ([`TOL_PW`]). Both are scale-free (`P` has
//!   orthonormal columns, `W` unit rows), so an absolute entry error is already relative to
//!   the unit scale of a column or row, and a max-abs test sees a single wrong entry, which a
//!   Frobenius norm averages away. The error budget: the device's `Y` is `f32`
//!   (statistics, moving means and normalisation in `f32`: a few `u` relative); the `f64`
//!   solve maps a perturbation of `G` into `P` amplified by at most `s_max / (s_i + s_j)` over
//!   pairs of singular values of `G` (`~1e2..3e2` here: `s_max ~ 2/sqrt(K-1)`, and `s_i + s_j`
//!   is at least about `2 delta` only in pairs that the perturbation barely reaches); the
//!   Gram route adds `~eps cond(G)^2 ~ 1e-10`. The first step is the exception the graded
//!   case probes: its gauge rule (`docs/solve.md`) inverts every singular value of `c Y M`
//!   above `1e-6 s_max` (`U_r = A Q_r / s_r`), so a perturbation of `Y` can reach `P` amplified
//!   by up to `s_max / s_r ~ 1e6`, and `P_1` becomes the next `Prox`, which pins the
//!   directions with `s < delta` in every later step. So the graded case's first step is held
//!   to [`FIRST_STEP_TOL_GRADED`] and the device head then continues from the CPU head's
//!   state, every later step held to `1e-5`.
//! * `max |P^T P - I| <= 1e-6` ([`TOL_ORTH`]), evaluated here from the downloaded `P`: the Gram
//!   route leaves `P` orthonormal to `~eps cond(G)^2 ~ 1e-10` at the default `delta`.
//! * `Y`: max abs `<= 1e-6` ([`TOL_Y`]): entries are at most 1 (unit Frobenius norm) and carry
//!   the `f32` roundings of the statistics (class sums of `N/K <= 10` rows, the batch mean of
//!   `N <= 400`, whose roundings of random sign grow like `sqrt(N) u ~ 1.2e-6` of the feature
//!   scale, the moving average, the norm); it locates a failure in the statistics rather than
//!   the solve.
//! * logits: max abs error `<= 1e-5 max_i ||x_i - mu||` ([`TOL_LOGITS`]), `x` the normalised
//!   features, computed here in `f64`. A logit is `W_k . (x_i - mu)` with unit rows `W_k`, so
//!   its error is at most `||dW_k|| ||x_i - mu||` plus the `f32` dot product's rounding (`d u
//!   ||x_i - mu|| <= 7.7e-6 ||x_i - mu||` at `d = 128`, `~sqrt(d) u ~ 7e-7` typical); `||x_i - mu||`
//!   is the scale of every logit of row `i` (`|z_ik| <= ||x_i - mu||`), which a relative test
//!   against `max |z|` would not be when the logits happen to be small.
//! * feature gradients: max abs error `<= 1e-4 max |dL/dR_cpu|` ([`TOL_GRAD`]): the implicit
//!   backward divides by `s_i` and `s_i + s_j`, up to `1/delta = 1e3` in the gauge and (graded
//!   case) in the cluster at `delta`; the final `M` cancels the gauge part in exact arithmetic
//!   but leaves `~u * 1e3` of the `f32` storage (`docs/testing.md`, f32 against f64).
//! * state after the last step: step count, `alpha` (`1e-15`) and seen flags exact, the moving
//!   means within `1e-5` of their max magnitude ([`TOL_STATE`]: the same `f32` statistics as
//!   `Y`, `sqrt(N) u ~ 1.2e-6` at `N = 400`, averaged over the steps by the moving average),
//!   `Prox` (the last `P`) within [`TOL_PW`] max abs.
//!
//! A real mistake (a wrong rotation in the eigensolver, a warm start taken for converged, a
//! lost gradient path) gives errors of `1e-3..1`, far above these bounds. Measured worst cases
//! are printed with `--nocapture`.

mod common;
use common::*;
use implicit_etf::gpu::linalg::EigenSolver;
use implicit_etf::runtime::{Backend, Device};
use implicit_etf::*;

/// `P` and `W`, max abs (see the module documentation).
const TOL_PW: f64 = 1e-5;
/// `max |P^T P - I|`.
const TOL_ORTH: f64 = 1e-6;
/// `Y`, max abs.
const TOL_Y: f64 = 1e-6;
/// Logits, max abs relative to `max_i ||x_i - mu||`.
const TOL_LOGITS: f64 = 1e-5;
/// Feature gradients, max abs relative to their max magnitude.
const TOL_GRAD: f64 = 1e-4;
/// Moving means after the last step, max abs relative to their max magnitude.
const TOL_STATE: f64 = 1e-5;

/// The eigensolver paths every case runs through: the one-block Jacobi, and the warm-started
/// refinement (`Refine`, which falls back to the one-block Jacobi on clusters).
const SOLVERS: [EigenSolver; 2] = [EigenSolver::OneBlock, EigenSolver::Refine];

fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// A fresh device of `backend` (a `Device` is not `Clone`; each run gets its own).
fn fresh(backend: Backend) -> Device {
    match backend {
        Backend::Cpu => Device::cpu(),
        Backend::Cuda => Device::cuda(0).unwrap(),
    }
}

/// One batch: `N x d` features (the values both heads see) and `N` labels.
struct Batch {
    x: Vec<f32>,
    y: Vec<u32>,
}

/// A spectrum case: the configuration and its batches, generated once and fed to every
/// device and solver.
struct Case {
    name: String,
    cfg: HeadConfig,
    batches: Vec<Batch>,
    /// The `P`/`W` bound of the first step, and whether the device head then continues from
    /// the CPU head's state (see [`FIRST_STEP_TOL_GRADED`]). [`TOL_PW`] and no hand-over for
    /// every case but the graded one.
    first_step_tol: f64,
}

/// The graded case's first-step bound on `P` and `W`, max abs. Both heads solve the first
/// step with the same host code (the gauge rule, `docs/solve.md`), each from its own `Y`;
/// the device's `Y` differs from the CPU head's by the `f32` roundings of its statistics
/// (measured `<= 7e-8`), and the gauge rule amplifies a perturbation of `Y` by up to
/// `s_max / s_r` for the smallest singular value it keeps (`s_r >= 1e-6 s_max`, so up to
/// `1e6`): `1e-3` bounds that for the designed spectrum (measured `1.4e-5..6e-5`). That is the
/// problem's conditioning, not the device's arithmetic, and `P_1` becomes the next `Prox`,
/// which carries it into every later step. So after the first step the device head imports
/// the CPU head's state (`import_state`), and every later step, the device's own statistics,
/// solve and backward from a common state, is held to [`TOL_PW`].
const FIRST_STEP_TOL_GRADED: f64 = 1e-3;

/// `n / k` labels of each class in a random order (a balanced sampler, so the batch mean
/// removes nothing of the ETF structure).
fn balanced_labels(rng: &mut Rng, n: usize, k: usize) -> Vec<u32> {
    assert_eq!(n % k, 0);
    let mut y: Vec<u32> = (0..n).map(|i| (i % k) as u32).collect();
    for i in (1..n).rev() {
        y.swap(i, rng.below(i + 1));
    }
    y
}

/// Column `c` of a row-major `d x k` matrix.
fn col(m: &[f64], d: usize, k: usize, c: usize) -> Vec<f64> {
    (0..d).map(|j| m[j * k + c]).collect()
}

fn norm(v: &[f64]) -> f64 {
    v.iter().map(|a| a * a).sum::<f64>().sqrt()
}

/// Collapsed features: class `c` has mean `3 (m_c + 0.8 o)` with `m_c` the columns of a
/// simplex ETF (`sqrt(K/(K-1)) B M`, unit columns) and `o` a unit vector orthogonal to them
/// (a global offset, as after a ReLU), plus Gaussian noise of relative size `noise`. All
/// rows have the same norm before the noise, so the head's normalisation to `tau` keeps the
/// ETF, and the batch's centred class means are the ETF to within the noise.
fn clustered(seed: u64, d: usize, k: usize, n: usize, steps: usize, noise: f64) -> Case {
    let mut rng = Rng(seed);
    let b = random_stiefel(&mut rng, d, k + 1);
    let s = (k as f64 / (k - 1) as f64).sqrt();
    let mean = |c: usize, j: usize| -> f64 {
        let row_mean: f64 = (0..k).map(|l| b[(j, l)]).sum::<f64>() / k as f64;
        3.0 * (s * (b[(j, c)] - row_mean) + 0.8 * b[(j, k)])
    };
    // ||m_c + 0.8 o|| = sqrt(1 + 0.64), times 3.
    let sd = noise * 3.0 * (1.64f64).sqrt() / (d as f64).sqrt();
    let batches = (0..steps)
        .map(|_| {
            let y = balanced_labels(&mut rng, n, k);
            let x = y
                .iter()
                .flat_map(|&c| (0..d).map(move |j| (c, j)))
                .map(|(c, j)| (mean(c as usize, j) + sd * rng.normal()) as f32)
                .collect();
            Batch { x, y }
        })
        .collect();
    Case {
        name: format!("clustered noise={noise:.0e} d={d} K={k} N={n}"),
        cfg: HeadConfig::new(d, k), // tau = 5, delta = 1e-3: the defaults
        batches,
        first_step_tol: TOL_PW,
    }
}

/// The design singular values of the graded case: `K - 1` values geometric from 1 to `1e-8`.
fn graded_sigma(k: usize) -> Vec<f64> {
    (0..k - 1)
        .map(|i| 10f64.powf(-8.0 * i as f64 / (k - 2) as f64))
        .collect()
}

/// Graded class means `C = U diag(sigma) V^T` (`V`: an orthonormal basis of `1^perp` in
/// `R^K`, so the columns of `C` sum to zero; `U`: `K - 1` coordinate axes at random positions),
/// plus a global offset and per-sample noise that both scale like `sigma` in each graded
/// coordinate. Keeping row `i` of everything at the scale `sigma_i` keeps the `f32`
/// roundings of the features at `u sigma_i` too, so the spectrum survives `f32` storage (a
/// dense `U` would bury every `sigma < ~1e-7` under the roundings of the large entries). The
/// noise is centred inside each class before rounding, and the other coordinates carry noise
/// only (`1e-2`, also centred), so the batch class means are `C` to within `f32` rounding.
/// `tau = None`: the features are the class means as built.
fn graded(seed: u64, d: usize, k: usize, n: usize, steps: usize) -> Case {
    let mut rng = Rng(seed);
    let sigma = graded_sigma(k);
    // K - 1 distinct coordinates in random positions, so the graded directions are not tied
    // to the first K coordinates (the columns of J that the first step's gauge rule uses).
    let mut perm: Vec<usize> = (0..d).collect();
    for i in 0..d - 1 {
        perm.swap(i, i + rng.below(d - i));
    }
    let axes = &perm[..k - 1];
    let v = polar(&(centering(k) * gaussian(&mut rng, k, k - 1)));
    let scale = 2.0;
    let mut mean = vec![0.0f64; d * k]; // d x K row-major, offset included
    let mut row_scale = vec![1e-2f64; d]; // noise scale per coordinate
    for (i, &a) in axes.iter().enumerate() {
        let off = sigma[i] * scale * rng.normal();
        for c in 0..k {
            mean[a * k + c] = scale * sigma[i] * v[(c, i)] + off;
        }
        row_scale[a] = 0.1 * scale * sigma[i];
    }
    let batches = (0..steps)
        .map(|_| {
            let y = balanced_labels(&mut rng, n, k);
            let mut noise: Vec<f64> = (0..n * d)
                .map(|t| row_scale[t % d] * rng.normal())
                .collect();
            // Centre the noise inside each class.
            for c in 0..k as u32 {
                let rows: Vec<usize> = (0..n).filter(|&i| y[i] == c).collect();
                for j in 0..d {
                    let m = rows.iter().map(|&i| noise[i * d + j]).sum::<f64>() / rows.len() as f64;
                    rows.iter().for_each(|&i| noise[i * d + j] -= m);
                }
            }
            let x = (0..n * d)
                .map(|t| {
                    let (i, j) = (t / d, t % d);
                    (mean[j * k + y[i] as usize] + noise[t]) as f32
                })
                .collect();
            Batch { x, y }
        })
        .collect();
    Case {
        name: format!("graded 1..1e-8 d={d} K={k} N={n}"),
        cfg: HeadConfig::new(d, k).with_tau(None),
        batches,
        first_step_tol: FIRST_STEP_TOL_GRADED,
    }
}

/// Drifting class means: `means_t = R(t) (A + t h S)`, `R(t)` a rotation by `t theta omega_j`
/// (`omega_j` in `[0.5, 1.5]`) in the coordinate planes of a random orthonormal basis, so
/// every class mean turns by about `theta = 1e-3` rad per step, and `S` a fixed random
/// direction per class of the size of its mean, so each mean also shifts by `h = 1e-3`
/// (relative) per step. `A` is an ETF mixed with Gaussian means (`collapse` in `[0, 1]`:
/// 1 is a simplex ETF). Per-sample noise `0.05` relative. `tau = None`: the drift is the
/// features' own, and 50 steps stay cheap on the CPU execution, where the row normalisation's
/// kernels (forward and backward) took ~0.8 s of a ~0.9 s step at `N = 80` (measured; the
/// clustered case runs them).
fn moving(seed: u64, d: usize, k: usize, n: usize, steps: usize, collapse: f64) -> Case {
    let (theta, h) = (1e-3, 1e-3);
    let mut rng = Rng(seed);
    let b = random_stiefel(&mut rng, d, d);
    let etf = random_stiefel(&mut rng, d, k) * centering(k);
    let g = gaussian(&mut rng, d, k) * faer::Scale(1.0 / (d as f64).sqrt());
    let a = etf * faer::Scale(collapse * (k as f64 / (k - 1) as f64).sqrt())
        + g * faer::Scale(1.0 - collapse);
    let shift = gaussian(&mut rng, d, k);
    let shift = faer::Mat::from_fn(d, k, |i, c| {
        let cn = (0..d).map(|j| a[(j, c)].powi(2)).sum::<f64>().sqrt();
        let sn = (0..d).map(|j| shift[(j, c)].powi(2)).sum::<f64>().sqrt();
        shift[(i, c)] * cn / sn
    });
    let omega: Vec<f64> = (0..d / 2).map(|_| 0.5 + rng.uniform()).collect();
    let batches = (0..steps)
        .map(|t| {
            let t = t as f64;
            // In the basis B: rotate the plane pairs (2j, 2j+1).
            let m = &a + &shift * faer::Scale(t * h);
            let mut z = b.transpose() * &m;
            for (j, &w) in omega.iter().enumerate() {
                let (cs, sn) = ((t * theta * w).cos(), (t * theta * w).sin());
                for c in 0..k {
                    let (p, q) = (z[(2 * j, c)], z[(2 * j + 1, c)]);
                    z[(2 * j, c)] = cs * p - sn * q;
                    z[(2 * j + 1, c)] = sn * p + cs * q;
                }
            }
            let means = from_mat(&(&b * z));
            let y = balanced_labels(&mut rng, n, k);
            let x = y
                .iter()
                .flat_map(|&c| {
                    let mc = col(&means, d, k, c as usize);
                    let sd = 0.05 * norm(&mc) / (d as f64).sqrt();
                    mc.into_iter().map(move |v| (v, sd))
                })
                .map(|(v, sd)| (v + sd * rng.normal()) as f32)
                .collect();
            Batch { x, y }
        })
        .collect();
    Case {
        name: format!("moving collapse={collapse} d={d} K={k} N={n} steps={steps}"),
        cfg: HeadConfig::new(d, k).with_tau(None),
        batches,
        first_step_tol: TOL_PW,
    }
}

/// Largest errors of a run (each with the step where it occurred) and the most Jacobi sweeps.
#[derive(Default, Debug)]
struct Worst {
    p: (f64, usize),
    w: (f64, usize),
    orth: (f64, usize),
    y: (f64, usize),
    logits: (f64, usize),
    grad: (f64, usize),
    state: f64,
    sweeps: usize,
}

fn bump(slot: &mut (f64, usize), v: f64, step: usize) {
    if v > slot.0 || v.is_nan() {
        *slot = (v, step);
    }
}

/// `max |a - b|`, NaN when any entry is NaN (`f64::max` would skip it, and a NaN on the
/// device would pass every bound).
fn err_max(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).fold(0.0f64, |m, (x, y)| {
        let e = (x - y).abs();
        if e.is_nan() || m.is_nan() {
            f64::NAN
        } else {
            m.max(e)
        }
    })
}

/// `max |a - b| / max |b|` (NaN as in [`err_max`]).
fn rel_max(a: &[f64], b: &[f64]) -> f64 {
    err_max(a, b) / b.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-300)
}

/// The normalised features the classifier sees, as the CPU head builds them (`f64`).
fn normalised(raw: &[f64], d: usize, tau: Option<f64>) -> Vec<f64> {
    match tau {
        None => raw.to_vec(),
        Some(tau) => raw
            .chunks(d)
            .flat_map(|r| {
                let s = tau / norm(r).max(1e-12);
                r.iter().map(move |v| v * s)
            })
            .collect(),
    }
}

/// Singular values (descending) of `G = c Y M + delta Prox` at a step of the CPU head.
fn spectrum_of_g(y: &[f64], prox: &[f64], d: usize, k: usize, delta: f64) -> Vec<f64> {
    singular_values(&g_of(&to_mat(y, d, k), &to_mat(prox, d, k), delta))
}

/// A case's own check of its spectrum: called with the step and the CPU head's `Y`, `P` and
/// `Prox` (all `d x K` row-major, `f64`).
type CaseCheck<'a> = dyn FnMut(usize, &[f64], &[f64], &[f64]) + 'a;

/// Records a violated bound (every step, quantity and solver is checked, and a failing
/// test lists all of them rather than the first).
fn check(fails: &mut Vec<String>, ok: bool, msg: impl FnOnce() -> String) {
    if !ok {
        let m = msg();
        println!("  FAIL {m}");
        fails.push(m);
    }
}

/// Runs every batch of `case` through a fresh `DeviceHead` (`solver`) and a `CpuHead<f64>`,
/// checking the tolerances of the module documentation after every step and on the final
/// state (violations go to `fails`); returns the worst errors. `check_case` sees the CPU
/// head's `Y`, `P` and `Prox` at each step (the spectrum checks of the case itself).
fn run_case(
    backend: Backend,
    case: &Case,
    solver: EigenSolver,
    check_case: &mut CaseCheck<'_>,
    fails: &mut Vec<String>,
) -> Worst {
    let cfg = case.cfg.clone();
    let (d, k) = (cfg.dim, cfg.classes);
    let opt = DeviceOptions::default().with_eigensolver(solver);
    let mut cpu = CpuHead::<f64>::new(cfg.clone()).unwrap();
    let mut dev = DeviceHead::with_options(fresh(backend), cfg.clone(), opt).unwrap();
    let name = dev.device().name();
    let mut worst = Worst::default();
    let mut prox: Option<Vec<f64>> = None;
    for (s, batch) in case.batches.iter().enumerate() {
        let ctx = format!("{name} {} {solver:?} step {s}", case.name);
        let n = batch.y.len();
        let x64 = f64s(&batch.x);
        let out = fwd(&mut cpu, &x64, &batch.y).unwrap();
        // On the first step Prox is the gauge rule's P_1, which is the step's P itself.
        check_case(s, &out.y, &out.p, prox.as_deref().unwrap_or(&out.p));
        prox = Some(out.p.clone());

        let xb = dev.device().upload(&batch.x).unwrap();
        let yb = dev.device().upload(&batch.y).unwrap();
        let logits_b = match dev.forward(&xb, &yb) {
            Ok(l) => l,
            Err(e) => {
                check(fails, false, || {
                    format!("{ctx}: device forward failed: {e}")
                });
                return worst;
            }
        };
        let logits = f64s(&dev.device().download::<f32>(&logits_b).unwrap());
        let sol = dev.last_solution().unwrap();
        let p: Vec<f64> = dev.device().download(sol.p).unwrap();
        let w = f64s(&dev.device().download::<f32>(sol.w).unwrap());
        let yd = f64s(&dev.device().download::<f32>(sol.y).unwrap());
        let rep = dev.solve_report().unwrap().unwrap();
        check(fails, rep.first_step == (s == 0), || {
            format!("{ctx}: first_step flag {}", rep.first_step)
        });
        worst.sweeps = worst.sweeps.max(rep.sweeps);

        let ey = err_max(&yd, &out.y);
        let ep = err_max(&p, &out.p);
        let ew = err_max(&w, &out.w);
        let eo = orth_err(&to_mat(&p, d, k));
        let xn = normalised(&x64, d, cfg.tau);
        let scale = xn
            .chunks(d)
            .map(|r| {
                norm(
                    &r.iter()
                        .zip(&out.mu)
                        .map(|(a, m)| a - m)
                        .collect::<Vec<_>>(),
                )
            })
            .fold(0.0f64, f64::max);
        let el = err_max(&logits, &out.logits) / scale;
        check(fails, ey <= TOL_Y, || {
            format!("{ctx}: Y max abs {ey:.2e} > {TOL_Y:.0e}")
        });
        let tol_pw = if s == 0 { case.first_step_tol } else { TOL_PW };
        check(fails, ep <= tol_pw, || {
            format!("{ctx}: P max abs {ep:.2e} > {tol_pw:.0e}")
        });
        check(fails, ew <= tol_pw, || {
            format!("{ctx}: W max abs {ew:.2e} > {tol_pw:.0e}")
        });
        check(fails, eo <= TOL_ORTH, || {
            format!("{ctx}: |P^T P - I| {eo:.2e} > {TOL_ORTH:.0e}")
        });
        check(fails, el <= TOL_LOGITS, || {
            format!("{ctx}: logits max abs {el:.2e} max||x - mu|| > {TOL_LOGITS:.0e}")
        });

        // The same dL/dlogits into both backwards: the cross-entropy gradient of the CPU
        // logits, rounded to f32 (what the device takes) and widened back for the CPU head.
        let (_, dz) = cross_entropy(&out.logits, &batch.y, k).unwrap();
        let dz32: Vec<f32> = dz.iter().map(|&v| v as f32).collect();
        let g_cpu = cpu.backward(&f64s(&dz32)).unwrap();
        let dzb = dev.device().upload(&dz32).unwrap();
        let g_b = match dev.backward(&dzb) {
            Ok(g) => g,
            Err(e) => {
                check(fails, false, || {
                    format!("{ctx}: device backward failed: {e}")
                });
                return worst;
            }
        };
        let g_dev = f64s(&dev.device().download::<f32>(&g_b).unwrap());
        assert_eq!(g_dev.len(), n * d);
        let eg = rel_max(&g_dev, &g_cpu);
        check(fails, eg <= TOL_GRAD, || {
            format!("{ctx}: feature gradient max abs {eg:.2e} max|g| > {TOL_GRAD:.0e}")
        });

        if s == 0 && case.first_step_tol > TOL_PW {
            // Continue from the CPU head's state (see FIRST_STEP_TOL_GRADED).
            dev.import_state(state_f32(&cpu.export_state().unwrap()))
                .unwrap();
        }
        bump(&mut worst.y, ey, s);
        bump(&mut worst.p, ep, s);
        bump(&mut worst.w, ew, s);
        bump(&mut worst.orth, eo, s);
        bump(&mut worst.logits, el, s);
        bump(&mut worst.grad, eg, s);
    }
    // The carried state after the last step.
    let ctx = format!("{name} {} {solver:?} final state", case.name);
    let sc = cpu.export_state().unwrap();
    let sg = dev.export_state().unwrap();
    check(fails, sg.moving.step == sc.moving.step, || {
        format!("{ctx}: step count {} vs {}", sg.moving.step, sc.moving.step)
    });
    check(fails, sg.moving.seen == sc.moving.seen, || {
        format!("{ctx}: seen flags differ")
    });
    check(
        fails,
        (sg.moving.alpha - sc.moving.alpha).abs() <= 1e-15,
        || format!("{ctx}: alpha {} vs {}", sg.moving.alpha, sc.moving.alpha),
    );
    let es = rel_max(&f64s(&sg.moving.e), &sc.moving.e);
    check(fails, es <= TOL_STATE, || {
        format!("{ctx}: moving means max abs {es:.2e} max|E| > {TOL_STATE:.0e}")
    });
    let epx = err_max(sg.prox.as_ref().unwrap(), sc.prox.as_ref().unwrap());
    check(fails, epx <= TOL_PW, || {
        format!("{ctx}: Prox max abs {epx:.2e} > {TOL_PW:.0e}")
    });
    worst.state = es;
    worst
}

/// Runs `case` on every device and every solver of `solvers`; `check_case` as in
/// [`run_case`]; violations go to `fails`.
fn run_everywhere(
    case: &Case,
    solvers: &[EigenSolver],
    check_case: &mut CaseCheck<'_>,
    fails: &mut Vec<String>,
) {
    for dev in devices() {
        for &solver in solvers {
            let t = std::time::Instant::now();
            let w = run_case(dev.backend(), case, solver, check_case, fails);
            println!(
                "{} {} {solver:?}: {w:?} in {:.2} s",
                dev.name(),
                case.name,
                t.elapsed().as_secs_f64()
            );
        }
    }
}

/// Fails the test with every recorded violation.
fn assert_none(fails: &[String]) {
    assert!(
        fails.is_empty(),
        "{} bound(s) violated:\n{}",
        fails.len(),
        fails.join("\n")
    );
}

/// The clustered case's own check: the top `K - 1` singular values of `G` are equal to
/// within `spread` (relative), the last one (the gauge) at about `delta`.
fn clustered_check(
    d: usize,
    k: usize,
    delta: f64,
    spread: f64,
) -> impl FnMut(usize, &[f64], &[f64], &[f64]) {
    move |s, y, _p, prox| {
        let sv = spectrum_of_g(y, prox, d, k, delta);
        let rel = sv[0] / sv[k - 2] - 1.0;
        if s == 0 {
            println!(
                "  G spectrum: top K-1 within {rel:.1e}, s_min {:.2e}",
                sv[k - 1]
            );
        }
        assert!(
            rel <= spread,
            "step {s}: top K-1 singular values spread {rel:.2e}"
        );
        assert!(
            sv[k - 1] <= 2.0 * delta,
            "step {s}: s_min {:.2e}",
            sv[k - 1]
        );
    }
}

/// Collapsed features at three noise levels, 3 steps each (the first on the host).
#[test]
fn clustered_spectrum_matches_cpu_head() {
    clustered_small(&[EigenSolver::Refine]);
}

/// The small clustered cases with `solvers`.
fn clustered_small(solvers: &[EigenSolver]) {
    let (d, k, n) = (32, 10, 80);
    let mut fails = Vec::new();
    for (i, noise) in [1e-3, 1e-5, 1e-6].into_iter().enumerate() {
        let case = clustered(200 + i as u64, d, k, n, 3, noise);
        // Relative noise e on each row averages to about e / sqrt(N/K) in a class mean;
        // the spread of the cluster stays below 10 e (and is at least f32 rounding).
        let spread = (10.0 * noise).max(1e-5);
        run_everywhere(
            &case,
            solvers,
            &mut clustered_check(d, k, case.cfg.delta, spread),
            &mut fails,
        );
    }
    assert_none(&fails);
}

/// The graded case's own check: at the first step the singular values of `Y M` span the
/// designed range (1 to `1e-8`, at least 7 orders of it kept through `f32` storage).
fn graded_check(d: usize, k: usize) -> impl FnMut(usize, &[f64], &[f64], &[f64]) {
    let want = graded_sigma(k);
    move |s, y, _p, _prox| {
        if s != 0 {
            return;
        }
        let sv = singular_values(&to_mat(&center_rows(y, d, k), d, k));
        let ratios: Vec<f64> = sv[..k - 1].iter().map(|v| v / sv[0]).collect();
        let shown: Vec<String> = ratios.iter().map(|r| format!("{r:.1e}")).collect();
        println!("  Y M singular values / max: {}", shown.join(" "));
        for (i, (&r, &w)) in ratios.iter().zip(&want).enumerate() {
            assert!(
                (r / w - 1.0).abs() <= 0.1,
                "sigma_{i}/sigma_0 = {r:.2e}, designed {w:.2e}"
            );
        }
    }
}

/// Class means with singular values from 1 to 1e-8, 4 steps; the first step held to
/// [`FIRST_STEP_TOL_GRADED`], the later ones, from the CPU head's state, to [`TOL_PW`].
///
/// Why: with [`TOL_PW`] at every step and no hand-over, this failed on the CPU execution for
/// both solvers: `P` max abs `1.37e-5`
/// and `W` `1.44e-5` at step 0 (the first step, solved on the host from each head's own
/// `Y`), carried unchanged through steps 1-3 and into the final `Prox` by the proximal term;
/// the feature gradient (`1.9e-5`), logits, `Y` (`5e-8`) and the moving means were within
/// bounds. The device's `Y` is as accurate as its `f32` statistics allow (a few `u` of each
/// coordinate's summands); the SVD-exact first-step `P` of the device's `Y` is as far
/// (`1.4e-5`) from that of the CPU head's `Y`, i.e. the first step's gauge rule amplifies
/// the `f32` statistics through `1/s_r` for the smallest kept singular value
/// (`2.5e-6 s_max` here). Seeds 300-305 at `(d, K)` = `(40, 12)`, `(32, 9)`, `(48, 16)` gave
/// `1.3e-5..6.0e-5`. (Both heads' step-0 `P` are also `1.5e-4` from that SVD-exact `P_1` of
/// their own `Y`: the host gauge rule's Gram route; the two share it, so this comparison does
/// not see it.)
#[test]
fn graded_spectrum_matches_cpu_head() {
    graded_small(&[EigenSolver::OneBlock]);
}

/// The small graded case with `solvers`.
fn graded_small(solvers: &[EigenSolver]) {
    let (d, k, n) = (40, 12, 96);
    let case = graded(300, d, k, n, 4);
    let mut fails = Vec::new();
    run_everywhere(&case, solvers, &mut graded_check(d, k), &mut fails);
    assert_none(&fails);
}

/// The moving case's own check: `P` changes by at least `1e-5` and at most `1e-1` (max abs)
/// per step, so the case neither stands still nor jumps.
fn moving_check() -> impl FnMut(usize, &[f64], &[f64], &[f64]) {
    let mut worst = (f64::INFINITY, 0.0f64);
    move |s, _y, p, prox| {
        if s == 0 {
            return;
        }
        let dp = err_max(p, prox);
        worst = (worst.0.min(dp), worst.1.max(dp));
        assert!(
            (1e-5..=1e-1).contains(&dp),
            "step {s}: P moved by {dp:.2e} (range so far {:.1e}..{:.1e})",
            worst.0,
            worst.1
        );
    }
}

/// 50 steps of slowly rotating and shifting class means, Gaussian and nearly collapsed.
#[test]
fn moving_spectrum_matches_cpu_head() {
    moving_small(&[EigenSolver::Refine]);
}

/// The small moving cases with `solvers`.
fn moving_small(solvers: &[EigenSolver]) {
    let (d, k, n) = (24, 8, 64);
    let mut fails = Vec::new();
    for (i, collapse) in [0.0, 0.9].into_iter().enumerate() {
        let case = moving(400 + i as u64, d, k, n, 50, collapse);
        run_everywhere(&case, solvers, &mut moving_check(), &mut fails);
    }
    assert_none(&fails);
}

/// The fast tier runs each small case with one solver (clustered and moving: the refinement,
/// whose warm start and cluster path they exercise; graded: the one-block Jacobi); this runs
/// each with the other one.
#[test]
#[ignore = "slow: the small cases again with the other eigensolver, ~30 s on the 2-core CPU execution"]
fn small_spectra_with_the_other_solver() {
    clustered_small(&[EigenSolver::OneBlock]);
    graded_small(&[EigenSolver::Refine]);
    moving_small(&[EigenSolver::OneBlock]);
}

// The same spectra at `K = 100`, `d = 128`, `N = 400` (four rows per class): a cluster of 99
// singular values, a graded spectrum with 99 values over 8 orders (two of them within 10%
// of the first step's cut at `1e-6`), and the sizes `Refine` is meant for.

/// Collapsed features at `K = 100`, noise `1e-4` and `1e-6`, 3 steps each.
#[test]
#[ignore = "slow: ~75 s on the 2-core CPU execution (measured under load); CI runs it with --include-ignored"]
fn clustered_spectrum_at_k100_matches_cpu_head() {
    let (d, k, n) = (128, 100, 400);
    let mut fails = Vec::new();
    for (i, noise) in [1e-4, 1e-6].into_iter().enumerate() {
        let case = clustered(500 + i as u64, d, k, n, 3, noise);
        let spread = (10.0 * noise).max(1e-5);
        run_everywhere(
            &case,
            &SOLVERS,
            &mut clustered_check(d, k, case.cfg.delta, spread),
            &mut fails,
        );
    }
    assert_none(&fails);
}

/// Graded class means at `K = 100`, 3 steps, as the small case (with a single bound and no
/// hand-over it measured `P` max abs `3.2e-5`, `W` `3.1e-5` at step 0, carried through steps
/// 1-2 and the final `Prox`; feature gradients `6.2e-5` of their max).
#[test]
#[ignore = "slow: ~5 s on the 2-core CPU execution (measured under load), with the other K = 100 cases; CI runs it with --include-ignored"]
fn graded_spectrum_at_k100_matches_cpu_head() {
    let (d, k, n) = (128, 100, 400);
    let case = graded(510, d, k, n, 3);
    let mut fails = Vec::new();
    run_everywhere(&case, &SOLVERS, &mut graded_check(d, k), &mut fails);
    assert_none(&fails);
}

/// Nearly collapsed, drifting class means at `K = 100`, 20 steps.
#[test]
#[ignore = "slow: ~40 s on the 2-core CPU execution (measured under load); CI runs it with --include-ignored"]
fn moving_spectrum_at_k100_matches_cpu_head() {
    let (d, k, n) = (128, 100, 400);
    let case = moving(520, d, k, n, 20, 0.9);
    let mut fails = Vec::new();
    run_everywhere(&case, &SOLVERS, &mut moving_check(), &mut fails);
    assert_none(&fails);
}
