//! Rendezvous of a multi-process job: who is which rank, and how rank 0's NCCL id reaches the
//! others, from `torchrun`-style environment variables.
//!
//! | variable | meaning |
//! |---|---|
//! | `WORLD_SIZE` | number of ranks (processes, one GPU each); absent: 1 (then `RANK` must be absent or 0) |
//! | `RANK` | this process's rank, `0..WORLD_SIZE`; required when `WORLD_SIZE` is set |
//! | `LOCAL_RANK` | which GPU of this machine to use (its CUDA ordinal); default `RANK` (0 where the launcher gives each process one GPU through `CUDA_VISIBLE_DEVICES`) |
//! | `IMPLICIT_ETF_RENDEZVOUS` | `file:/shared/path` or `tcp:HOST:PORT` (below); needed when `WORLD_SIZE > 1` |
//! | `MASTER_ADDR`, `MASTER_PORT` | `torchrun`'s: taken as `tcp:MASTER_ADDR:MASTER_PORT` when `IMPLICIT_ETF_RENDEZVOUS` is absent, `MASTER_PORT + 1` under torchrun (below) |
//! | `IMPLICIT_ETF_RENDEZVOUS_TIMEOUT` | seconds to wait for the other ranks (default 300) |
//!
//! The two rendezvous methods exchange one opaque line of text (the NCCL id as 256 hex
//! digits, [`NcclId::to_hex`](crate::runtime::nccl::NcclId::to_hex)):
//!
//! - **`file:PATH`**, `PATH` on a file system every rank sees (NFS, Lustre, a local disk
//!   for a one-machine job). Rank 0 writes the id to a temporary file beside `PATH` and
//!   renames it into place (atomic: a reader sees all of it or nothing); every other rank
//!   polls until `PATH` appears, reads it, and leaves an acknowledgement `PATH.ack.RANK`.
//!   Rank 0 returns once every rank has acknowledged, and removes `PATH` and the
//!   acknowledgements, so the same path can serve the next run. A `PATH` that already exists
//!   when rank 0 starts (left by a job that died mid-rendezvous) is an error: remove it, or
//!   give each job a path of its own (e.g. with the scheduler's job id in it).
//! - **`tcp:HOST:PORT`**, `HOST` the machine of rank 0 (a name or an address; `[::1]` for
//!   IPv6). Rank 0 listens on `PORT` on all interfaces and sends the id to each of the
//!   `WORLD_SIZE - 1` other ranks as they connect; the others retry connecting until rank 0
//!   is up. Each says its rank and world size first, so a rank of a job with another world
//!   size is refused (an error on both sides) and a rank that connects twice is counted once.
//!   Rank 0 returns once every rank has the id.
//!
//! Under `torchrun`, `MASTER_PORT` is already taken: torchrun's agent serves its own store
//! there, and says so to its workers with `TORCHELASTIC_USE_AGENT_STORE=True`. With that
//! variable set, the `MASTER_ADDR`/`MASTER_PORT` fallback listens on `MASTER_PORT + 1`
//! instead (29501 for torchrun's default 29500; it must be free, and open between the
//! machines). `IMPLICIT_ETF_RENDEZVOUS` chooses any other port or a file. Launchers that only
//! set the variables (Slurm scripts, `mpirun` wrappers, a shell loop) get `MASTER_PORT`
//! itself.
//!
//! Waits end after the timeout with [`Error::Collective`]; a missing or malformed variable
//! is [`Error::InvalidParameter`] naming the variable. The parsing and the exchange
//! ([`RendezvousSpec`], [`share_id`]) know nothing of NCCL; `Collective::from_env` (feature
//! `cuda`) puts them together with the device and the communicator.
//!
//! # Launching a 2-node job (8 GPUs each)
//!
//! With `torchrun` as the launcher (it sets `RANK`, `WORLD_SIZE`, `LOCAL_RANK`,
//! `MASTER_ADDR`, `MASTER_PORT`) and rank 0's machine `node0`, run on each machine
//! (`--node-rank 1` on the second); the id goes over `node0:29501`:
//!
//! ```text
//! torchrun --nnodes 2 --node-rank 0 --nproc-per-node 8 \
//!          --master-addr node0 --master-port 29500 --no-python ./target/release/train
//! ```
//!
//! or, without torchrun, with a shared directory (on node 1: `RANK=$((8 + r))`):
//!
//! ```text
//! for r in 0 1 2 3 4 5 6 7; do
//!   RANK=$r LOCAL_RANK=$r WORLD_SIZE=16 IMPLICIT_ETF_RENDEZVOUS=file:/shared/job-$JOB_ID.nccl \
//!     ./target/release/train &
//! done; wait
//! ```
//!
//! and in `train`, one call makes this rank's GPU and its communicator:
//!
//! ```no_run
//! # #[cfg(feature = "cuda")]
//! # fn main() -> implicit_etf::Result<()> {
//! use implicit_etf::Collective;
//! let (dev, collective) = Collective::from_env()?; // Device::cuda(LOCAL_RANK), NCCL group
//! let mut stats = dev.upload(&[1.0f32; 8])?;
//! collective.all_reduce(&dev, &mut stats)?; // the sum over the ranks, on dev's stream
//! // A head takes it with `DeviceHead::with_collective(collective)`.
//! # Ok(())
//! # }
//! # #[cfg(not(feature = "cuda"))]
//! # fn main() {}
//! ```
//!
//! The exchange alone, here for a one-process job (no variable needed):
//!
//! ```
//! use implicit_etf::collective::rendezvous::{share_id, RendezvousSpec};
//! let spec = RendezvousSpec::from_vars(|_| None).unwrap();
//! assert_eq!((spec.rank, spec.world_size, spec.local_rank), (0, 1, 0));
//! let id = share_id(&spec, || Ok("0a1b".to_string())).unwrap();
//! assert_eq!(id, "0a1b");
//! ```

use std::fmt;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// The rank variable.
pub const RANK: &str = "RANK";
/// The world-size variable.
pub const WORLD_SIZE: &str = "WORLD_SIZE";
/// The local-rank (GPU ordinal) variable.
pub const LOCAL_RANK: &str = "LOCAL_RANK";
/// The rendezvous variable (`file:PATH` or `tcp:HOST:PORT`).
pub const RENDEZVOUS: &str = "IMPLICIT_ETF_RENDEZVOUS";
/// The timeout variable (seconds).
pub const RENDEZVOUS_TIMEOUT: &str = "IMPLICIT_ETF_RENDEZVOUS_TIMEOUT";
/// torchrun's address of rank 0.
pub const MASTER_ADDR: &str = "MASTER_ADDR";
/// torchrun's port on rank 0.
pub const MASTER_PORT: &str = "MASTER_PORT";
/// Set to `True` by torchrun when its agent serves a store on `MASTER_PORT` (the fallback
/// then uses `MASTER_PORT + 1`).
pub const TORCHELASTIC_USE_AGENT_STORE: &str = "TORCHELASTIC_USE_AGENT_STORE";

/// How long the ranks wait for each other by default.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

/// Longest line accepted from a peer (an id of 256 hex digits fits many times over).
const MAX_LINE: u64 = 4096;
/// The first line a rank sends to rank 0.
const HELLO: &str = "implicit-etf rendezvous v1";

/// How the id travels from rank 0 to the others.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rendezvous {
    /// Through a file on a shared file system (`file:PATH`).
    File(PathBuf),
    /// Over TCP to rank 0's machine (`tcp:HOST:PORT`).
    Tcp {
        /// Rank 0's host name or address (an IPv6 address without its brackets).
        host: String,
        /// The port rank 0 listens on.
        port: u16,
    },
}

impl fmt::Display for Rendezvous {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rendezvous::File(p) => write!(f, "file:{}", p.display()),
            Rendezvous::Tcp { host, port } if host.contains(':') => {
                write!(f, "tcp:[{host}]:{port}")
            }
            Rendezvous::Tcp { host, port } => write!(f, "tcp:{host}:{port}"),
        }
    }
}

impl Rendezvous {
    /// Parses `file:PATH` or `tcp:HOST:PORT` (`HOST` may be `[IPv6]`); `var` names the
    /// variable in the error.
    pub fn parse(var: &'static str, s: &str) -> Result<Rendezvous> {
        let bad = |reason: String| Error::InvalidParameter { name: var, reason };
        if let Some(path) = s.strip_prefix("file:") {
            if path.is_empty() || Path::new(path).file_name().is_none() {
                return Err(bad(format!(
                    "`{s}`: `file:` needs the path of a file, e.g. file:/shared/job.nccl"
                )));
            }
            return Ok(Rendezvous::File(PathBuf::from(path)));
        }
        if let Some(addr) = s.strip_prefix("tcp:") {
            let (host, port) = addr
                .rsplit_once(':')
                .ok_or_else(|| bad(format!("`{s}`: expected tcp:HOST:PORT")))?;
            let host = host
                .strip_prefix('[')
                .and_then(|h| h.strip_suffix(']'))
                .unwrap_or(host);
            if host.is_empty() {
                return Err(bad(format!("`{s}`: no host before the port")));
            }
            return Ok(Rendezvous::Tcp {
                host: host.to_string(),
                port: parse_port(var, port)?,
            });
        }
        Err(bad(format!("`{s}` is neither file:PATH nor tcp:HOST:PORT")))
    }
}

fn parse_port(var: &'static str, s: &str) -> Result<u16> {
    match s.trim().parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(Error::InvalidParameter {
            name: var,
            reason: format!("`{s}` is not a port number (1 to 65535)"),
        }),
    }
}

/// One rank's place in a job, as the environment describes it (see the [module
/// documentation](self)).
#[derive(Debug, Clone, PartialEq)]
pub struct RendezvousSpec {
    /// This process's rank, `0..world_size`.
    pub rank: usize,
    /// Number of ranks.
    pub world_size: usize,
    /// Which GPU of this machine to use (CUDA ordinal).
    pub local_rank: usize,
    /// How the id is shared; `None` only for a one-rank job, which needs none.
    pub method: Option<Rendezvous>,
    /// Longest wait for the other ranks.
    pub timeout: Duration,
}

impl RendezvousSpec {
    /// From the process environment ([`from_vars`](Self::from_vars) over `std::env`).
    pub fn from_env() -> Result<RendezvousSpec> {
        RendezvousSpec::from_vars(|name| {
            std::env::var_os(name).map(|v| v.to_string_lossy().into_owned())
        })
    }

    /// From the variables `get` returns (`None`: not set), so that tests and launchers can
    /// pass a map instead of the process environment. Empty values count as not set.
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<RendezvousSpec> {
        let var = |name: &str| get(name).filter(|v| !v.trim().is_empty());
        let world_size = match var(WORLD_SIZE) {
            Some(v) => parse_count(WORLD_SIZE, &v)?,
            None => 1,
        };
        if world_size == 0 {
            return Err(Error::InvalidParameter {
                name: WORLD_SIZE,
                reason: "a job needs at least one rank".into(),
            });
        }
        let rank = match (var(RANK), var(WORLD_SIZE)) {
            (Some(v), _) => parse_count(RANK, &v)?,
            (None, None) => 0,
            (None, Some(_)) => {
                return Err(Error::InvalidParameter {
                    name: RANK,
                    reason: format!("not set, but {WORLD_SIZE} is ({world_size})"),
                })
            }
        };
        if rank >= world_size {
            return Err(Error::InvalidParameter {
                name: RANK,
                reason: format!(
                    "rank {rank} is not below the world size {world_size}{}",
                    if var(WORLD_SIZE).is_none() {
                        format!(" ({WORLD_SIZE} is not set)")
                    } else {
                        String::new()
                    }
                ),
            });
        }
        let local_rank = match var(LOCAL_RANK) {
            Some(v) => parse_count(LOCAL_RANK, &v)?,
            None => rank,
        };
        let timeout = match var(RENDEZVOUS_TIMEOUT) {
            Some(v) => match v.trim().parse::<f64>() {
                Ok(s) if s > 0.0 && s <= 1e9 => Duration::from_secs_f64(s),
                _ => {
                    return Err(Error::InvalidParameter {
                        name: RENDEZVOUS_TIMEOUT,
                        reason: format!("`{v}` is not a positive number of seconds"),
                    })
                }
            },
            None => DEFAULT_TIMEOUT,
        };
        let method = match (var(RENDEZVOUS), var(MASTER_ADDR), var(MASTER_PORT)) {
            (Some(r), _, _) => Some(Rendezvous::parse(RENDEZVOUS, r.trim())?),
            (None, Some(addr), Some(port)) => {
                let addr = addr.trim();
                let host = addr
                    .strip_prefix('[')
                    .and_then(|h| h.strip_suffix(']'))
                    .unwrap_or(addr);
                let mut port = parse_port(MASTER_PORT, &port)?;
                // torchrun's agent listens on MASTER_PORT itself: take the next one.
                if var(TORCHELASTIC_USE_AGENT_STORE).as_deref().map(str::trim) == Some("True") {
                    port = port.checked_add(1).ok_or_else(|| Error::InvalidParameter {
                        name: MASTER_PORT,
                        reason: format!(
                            "65535 under torchrun leaves no port for the rendezvous (it uses \
                             {MASTER_PORT} + 1): set {RENDEZVOUS}"
                        ),
                    })?;
                }
                Some(Rendezvous::Tcp {
                    host: host.to_string(),
                    port,
                })
            }
            (None, Some(_), None) if world_size > 1 => {
                return Err(Error::InvalidParameter {
                    name: MASTER_PORT,
                    reason: format!("not set, but {MASTER_ADDR} is"),
                })
            }
            (None, None, Some(_)) if world_size > 1 => {
                return Err(Error::InvalidParameter {
                    name: MASTER_ADDR,
                    reason: format!("not set, but {MASTER_PORT} is"),
                })
            }
            _ if world_size > 1 => {
                return Err(Error::InvalidParameter {
                    name: RENDEZVOUS,
                    reason: format!(
                        "{WORLD_SIZE} is {world_size}: set {RENDEZVOUS}=file:/shared/path or \
                         tcp:HOST:PORT (or {MASTER_ADDR} and {MASTER_PORT})"
                    ),
                })
            }
            _ => None,
        };
        Ok(RendezvousSpec {
            rank,
            world_size,
            local_rank,
            method,
            timeout,
        })
    }
}

fn parse_count(var: &'static str, v: &str) -> Result<usize> {
    v.trim()
        .parse::<usize>()
        .map_err(|_| Error::InvalidParameter {
            name: var,
            reason: format!("`{v}` is not a non-negative integer"),
        })
}

fn rdv_error(reason: String) -> Error {
    Error::Collective {
        op: "rendezvous",
        reason,
    }
}

/// Gives every rank rank 0's id: on rank 0 calls `make_id` (only there) and returns its id
/// once every other rank has it; on the others waits for it and returns it. A one-rank job
/// returns `make_id()`'s id at once, without a rendezvous. The id is one line of printable
/// text without spaces (an [`Error::InvalidParameter`] otherwise, on rank 0). Errors: a
/// timeout, an I/O error, a rank of another world size ([`Error::Collective`]), or
/// `make_id`'s error.
pub fn share_id(spec: &RendezvousSpec, make_id: impl FnOnce() -> Result<String>) -> Result<String> {
    if spec.rank >= spec.world_size {
        return Err(Error::InvalidParameter {
            name: RANK,
            reason: format!(
                "rank {} is not below the world size {}",
                spec.rank, spec.world_size
            ),
        });
    }
    if spec.world_size == 1 {
        return make_id().and_then(checked_id);
    }
    let Some(method) = &spec.method else {
        return Err(Error::InvalidParameter {
            name: RENDEZVOUS,
            reason: format!("a {}-rank job needs a rendezvous", spec.world_size),
        });
    };
    let deadline = Instant::now() + spec.timeout;
    match method {
        Rendezvous::File(path) => {
            if spec.rank == 0 {
                let id = make_id().and_then(checked_id)?;
                file_publish(path, &id, spec.world_size, deadline)?;
                Ok(id)
            } else {
                file_fetch(path, spec.rank, deadline)
            }
        }
        Rendezvous::Tcp { host, port } => {
            if spec.rank == 0 {
                let id = make_id().and_then(checked_id)?;
                let listener = tcp_listen(host, *port)?;
                tcp_serve(&listener, &id, spec.world_size, deadline)?;
                Ok(id)
            } else {
                let addrs = resolve(host, *port)?;
                tcp_fetch(&addrs, spec.rank, spec.world_size, deadline)
            }
        }
    }
}

/// The id, refused when it cannot travel as one line.
fn checked_id(id: String) -> Result<String> {
    if id.is_empty() || id.len() > 1024 || !id.chars().all(|c| c.is_ascii_graphic()) {
        return Err(Error::InvalidParameter {
            name: "id",
            reason: "a rendezvous id is 1 to 1024 printable ASCII characters without spaces".into(),
        });
    }
    Ok(id)
}

/// Sleeps before the next poll (10 ms, doubling to 200 ms), never past `deadline`; false once
/// the deadline has passed.
fn pause(wait: &mut Duration, deadline: Instant) -> bool {
    let now = Instant::now();
    if now >= deadline {
        return false;
    }
    std::thread::sleep((*wait).min(deadline - now));
    *wait = (*wait * 2).min(Duration::from_millis(200));
    true
}

fn first_pause() -> Duration {
    Duration::from_millis(10)
}

// ---- file ----

/// `PATH` with `suffix` appended to its file name (same directory).
fn beside(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(suffix);
    path.with_file_name(name)
}

fn ack_path(path: &Path, rank: usize) -> PathBuf {
    beside(path, &format!(".ack.{rank}"))
}

fn io_error(what: &str, path: &Path, e: std::io::Error) -> Error {
    rdv_error(format!("{what} {}: {e}", path.display()))
}

/// Rank 0: writes `id` to `path` atomically, waits for the acknowledgements of ranks
/// `1..world`, removes them and `path`.
fn file_publish(path: &Path, id: &str, world: usize, deadline: Instant) -> Result<()> {
    if path.file_name().is_none() {
        return Err(Error::InvalidParameter {
            name: RENDEZVOUS,
            reason: format!("`{}` does not name a file", path.display()),
        });
    }
    if path.exists() {
        return Err(rdv_error(format!(
            "the rendezvous file {} already exists (left by an earlier job?): remove it, or \
             give each job a path of its own",
            path.display()
        )));
    }
    // Acknowledgements left by an earlier run would count for this one.
    for r in 1..world {
        let ack = ack_path(path, r);
        if let Err(e) = std::fs::remove_file(&ack) {
            if e.kind() != std::io::ErrorKind::NotFound {
                return Err(io_error("cannot remove", &ack, e));
            }
        }
    }
    let tmp = beside(
        path,
        &format!(
            ".tmp.{}.{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        ),
    );
    let written = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(format!("{id}\n").as_bytes())?;
        f.sync_all()
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(io_error("cannot write", &tmp, e));
    }
    if let Err(e) = std::fs::rename(&tmp, path) {
        let _ = std::fs::remove_file(&tmp);
        return Err(io_error("cannot rename the id into", path, e));
    }
    let clean = || {
        let _ = std::fs::remove_file(path);
        for r in 1..world {
            let _ = std::fs::remove_file(ack_path(path, r));
        }
    };
    let mut missing: Vec<usize> = (1..world).collect();
    let mut wait = first_pause();
    loop {
        missing.retain(|&r| !ack_path(path, r).exists());
        if missing.is_empty() {
            clean();
            return Ok(());
        }
        if !pause(&mut wait, deadline) {
            clean();
            return Err(rdv_error(format!(
                "timed out waiting for {} rank(s) to read {} (first missing: rank {})",
                missing.len(),
                path.display(),
                missing[0]
            )));
        }
    }
}

/// Rank `rank > 0`: waits for `path`, reads the id, acknowledges.
fn file_fetch(path: &Path, rank: usize, deadline: Instant) -> Result<String> {
    let mut wait = first_pause();
    loop {
        match std::fs::read_to_string(path) {
            // Renamed into place whole, so a complete line; anything else is not ours.
            Ok(text) if text.ends_with('\n') => {
                let id = checked_id(text.trim().to_string()).map_err(|_| {
                    rdv_error(format!("{} does not hold a rendezvous id", path.display()))
                })?;
                let ack = ack_path(path, rank);
                std::fs::write(&ack, b"")
                    .map_err(|e| io_error("cannot write the acknowledgement", &ack, e))?;
                return Ok(id);
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_error("cannot read", path, e)),
        }
        if !pause(&mut wait, deadline) {
            return Err(rdv_error(format!(
                "timed out waiting for rank 0 to write {}",
                path.display()
            )));
        }
    }
}

// ---- tcp ----

fn resolve(host: &str, port: u16) -> Result<Vec<SocketAddr>> {
    let addrs: Vec<SocketAddr> = (host, port)
        .to_socket_addrs()
        .map_err(|e| rdv_error(format!("cannot resolve {host}:{port}: {e}")))?
        .collect();
    if addrs.is_empty() {
        return Err(rdv_error(format!("{host}:{port} resolves to no address")));
    }
    Ok(addrs)
}

/// Rank 0's listener: `port` on every interface (of `host`'s address family).
fn tcp_listen(host: &str, port: u16) -> Result<TcpListener> {
    let v6 = matches!(resolve(host, port)?.first(), Some(SocketAddr::V6(_)));
    let any: IpAddr = if v6 {
        Ipv6Addr::UNSPECIFIED.into()
    } else {
        Ipv4Addr::UNSPECIFIED.into()
    };
    TcpListener::bind((any, port)).map_err(|e| {
        let hint = if e.kind() == std::io::ErrorKind::AddrInUse {
            format!(
                " (another job's, or torchrun's store: set {RENDEZVOUS}=tcp:HOST:<a free \
                 port> or file:/shared/path)"
            )
        } else {
            String::new()
        };
        rdv_error(format!("cannot listen on port {port}: {e}{hint}"))
    })
}

/// Reads one line of at most [`MAX_LINE`] bytes.
fn read_line(stream: &TcpStream) -> std::io::Result<String> {
    let mut line = String::new();
    BufReader::new(stream.take(MAX_LINE)).read_line(&mut line)?;
    if !line.ends_with('\n') {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "connection closed before the end of the line",
        ));
    }
    Ok(line.trim_end().to_string())
}

/// What a connecting rank says: `HELLO rank=R world=W`.
fn parse_hello(line: &str) -> Option<(usize, usize)> {
    let rest = line.strip_prefix(HELLO)?.trim();
    let mut rank = None;
    let mut world = None;
    for kv in rest.split_whitespace() {
        match kv.split_once('=')? {
            ("rank", v) => rank = v.parse().ok(),
            ("world", v) => world = v.parse().ok(),
            _ => return None,
        }
    }
    Some((rank?, world?))
}

/// Rank 0: sends `id` to each of ranks `1..world` as they connect.
fn tcp_serve(listener: &TcpListener, id: &str, world: usize, deadline: Instant) -> Result<()> {
    listener
        .set_nonblocking(true)
        .map_err(|e| rdv_error(format!("listener: {e}")))?;
    let mut served = vec![false; world];
    served[0] = true;
    let mut wait = first_pause();
    while served.iter().any(|s| !s) {
        match listener.accept() {
            Ok((stream, peer)) => {
                wait = first_pause();
                // One peer at a time, each bounded by the deadline (and a stray connection
                // that says nothing by a few seconds).
                let left = deadline.saturating_duration_since(Instant::now());
                let limit = left
                    .min(Duration::from_secs(10))
                    .max(Duration::from_millis(1));
                let _ = stream.set_nonblocking(false);
                let _ = stream.set_read_timeout(Some(limit));
                let _ = stream.set_write_timeout(Some(limit));
                let Ok(line) = read_line(&stream) else {
                    continue; // not a rank, or gone: not counted
                };
                let Some((r, w)) = parse_hello(&line) else {
                    continue; // not ours
                };
                if w != world {
                    let why = format!("rank {r} at {peer} has world size {w}, rank 0 has {world}");
                    let _ = (&stream).write_all(format!("error {why}\n").as_bytes());
                    return Err(rdv_error(why));
                }
                if !(1..world).contains(&r) {
                    continue;
                }
                let sent = (&stream).write_all(format!("id {id}\n").as_bytes()).is_ok()
                    && (&stream).flush().is_ok();
                served[r] |= sent;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if !pause(&mut wait, deadline) {
                    let missing: Vec<usize> = (0..world).filter(|&r| !served[r]).collect();
                    return Err(rdv_error(format!(
                        "timed out waiting for {} rank(s) to connect (first missing: rank {})",
                        missing.len(),
                        missing[0]
                    )));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(rdv_error(format!("accept: {e}"))),
        }
    }
    Ok(())
}

/// Rank `rank > 0`: connects to rank 0 (retrying until `deadline`) and reads the id.
fn tcp_fetch(addrs: &[SocketAddr], rank: usize, world: usize, deadline: Instant) -> Result<String> {
    let mut wait = first_pause();
    let mut last = String::from("no attempt");
    loop {
        for addr in addrs {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            let limit = left.min(Duration::from_secs(5));
            let stream = match TcpStream::connect_timeout(addr, limit) {
                Ok(s) => s,
                Err(e) => {
                    last = format!("{addr}: {e}");
                    continue;
                }
            };
            let left = deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(1));
            let _ = stream.set_read_timeout(Some(left));
            let _ = stream.set_write_timeout(Some(left));
            let reply = (&stream)
                .write_all(format!("{HELLO} rank={rank} world={world}\n").as_bytes())
                .and_then(|_| read_line(&stream));
            match reply {
                Ok(line) => {
                    if let Some(id) = line.strip_prefix("id ") {
                        return checked_id(id.to_string())
                            .map_err(|_| rdv_error(format!("{addr} sent a malformed id")));
                    }
                    if let Some(why) = line.strip_prefix("error ") {
                        return Err(rdv_error(format!("rank 0 at {addr} refused: {why}")));
                    }
                    return Err(rdv_error(format!(
                        "{addr} answered something else than a rendezvous id"
                    )));
                }
                // Rank 0 busy with a stray connection or restarting: try again.
                Err(e) => last = format!("{addr}: {e}"),
            }
        }
        if !pause(&mut wait, deadline) {
            return Err(rdv_error(format!(
                "timed out connecting to rank 0 (last: {last})"
            )));
        }
    }
}

// ---- NCCL ----

#[cfg(feature = "cuda")]
impl super::Collective {
    /// This process's GPU and its NCCL communicator, from the environment (see the [module
    /// documentation](self)): `Device::cuda(LOCAL_RANK)`, rank 0 makes an
    /// [`NcclId`](crate::runtime::nccl::NcclId) and shares it ([`share_id`]), and every rank joins
    /// with [`Collective::nccl`](super::Collective::nccl) (which returns when all have
    /// joined). With no variable set it is a one-rank job on GPU 0 (no rendezvous).
    /// Errors: a missing or malformed variable ([`Error::InvalidParameter`], naming it), no
    /// such GPU ([`Error::NoDevice`]), a rendezvous timeout or I/O error
    /// ([`Error::Collective`]), no loadable `libnccl`, or NCCL's own errors.
    pub fn from_env() -> Result<(crate::runtime::Device, super::Collective)> {
        let spec = RendezvousSpec::from_env()?;
        let dev = crate::runtime::Device::cuda(spec.local_rank)?;
        let c = super::Collective::from_spec(&dev, &spec)?;
        Ok((dev, c))
    }

    /// This rank's NCCL communicator on `dev` (a CUDA device; the one for
    /// `spec.local_rank`), the id shared as `spec` says: [`from_env`](Self::from_env) with
    /// a device and a spec of the caller's.
    pub fn from_spec(
        dev: &crate::runtime::Device,
        spec: &RendezvousSpec,
    ) -> Result<super::Collective> {
        use crate::runtime::nccl::NcclId;
        let hex = share_id(spec, || NcclId::new().map(|id| id.to_hex()))?;
        let id = NcclId::from_hex(&hex)?;
        super::Collective::nccl(dev, &id, spec.rank, spec.world_size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn spec_of(vars: &[(&str, &str)]) -> Result<RendezvousSpec> {
        let m: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        RendezvousSpec::from_vars(|k| m.get(k).cloned())
    }

    fn invalid(r: Result<RendezvousSpec>) -> &'static str {
        match r {
            Err(Error::InvalidParameter { name, .. }) => name,
            other => panic!("expected InvalidParameter, got {other:?}"),
        }
    }

    #[test]
    fn single_process_needs_no_variable() {
        let s = spec_of(&[]).unwrap();
        assert_eq!((s.rank, s.world_size, s.local_rank), (0, 1, 0));
        assert_eq!((s.method, s.timeout), (None, DEFAULT_TIMEOUT));
        let s = spec_of(&[(WORLD_SIZE, "1"), (RANK, "0"), (LOCAL_RANK, "3")]).unwrap();
        assert_eq!(
            (s.rank, s.world_size, s.local_rank, s.method.clone()),
            (0, 1, 3, None)
        );
        // `make_id` is the id, no rendezvous.
        assert_eq!(share_id(&s, || Ok("abc".into())).unwrap(), "abc");
    }

    #[test]
    fn parses_torchrun_style_variables() {
        let s = spec_of(&[
            (WORLD_SIZE, "16"),
            (RANK, "9"),
            (LOCAL_RANK, "1"),
            (RENDEZVOUS, "file:/shared/job.nccl"),
            (RENDEZVOUS_TIMEOUT, "2.5"),
        ])
        .unwrap();
        assert_eq!((s.rank, s.world_size, s.local_rank), (9, 16, 1));
        assert_eq!(s.method, Some(Rendezvous::File("/shared/job.nccl".into())));
        assert_eq!(s.timeout, Duration::from_millis(2500));
        // LOCAL_RANK defaults to RANK.
        let s = spec_of(&[
            (WORLD_SIZE, "4"),
            (RANK, "3"),
            (RENDEZVOUS, "tcp:node0:29501"),
        ])
        .unwrap();
        assert_eq!(s.local_rank, 3);
        let tcp = |h: &str, p| {
            Some(Rendezvous::Tcp {
                host: h.into(),
                port: p,
            })
        };
        assert_eq!(s.method, tcp("node0", 29501));
        // IPv6 in brackets.
        let s = spec_of(&[(WORLD_SIZE, "2"), (RANK, "0"), (RENDEZVOUS, "tcp:[::1]:7")]).unwrap();
        assert_eq!(s.method, tcp("::1", 7));
        assert_eq!(s.method.unwrap().to_string(), "tcp:[::1]:7");
        // torchrun's MASTER_ADDR / MASTER_PORT when IMPLICIT_ETF_RENDEZVOUS is absent ...
        let master = [(MASTER_ADDR, "10.0.0.1"), (MASTER_PORT, "29500")];
        let s = spec_of(&[&[(WORLD_SIZE, "2"), (RANK, "1")][..], &master].concat()).unwrap();
        assert_eq!(s.method, tcp("10.0.0.1", 29500));
        // ... the next port under torchrun, whose agent listens on MASTER_PORT ...
        let torchrun = [(TORCHELASTIC_USE_AGENT_STORE, "True")];
        let s = spec_of(&[&[(WORLD_SIZE, "2"), (RANK, "1")][..], &master, &torchrun].concat());
        assert_eq!(s.unwrap().method, tcp("10.0.0.1", 29501));
        let no_room = [(MASTER_ADDR, "h"), (MASTER_PORT, "65535")];
        let s = spec_of(&[&[(WORLD_SIZE, "2"), (RANK, "1")][..], &no_room, &torchrun].concat());
        assert_eq!(invalid(s), MASTER_PORT);
        // ... and IMPLICIT_ETF_RENDEZVOUS over them.
        let s = spec_of(
            &[
                &[(WORLD_SIZE, "2"), (RANK, "1"), (RENDEZVOUS, "tcp:h:1")][..],
                &master,
            ]
            .concat(),
        )
        .unwrap();
        assert_eq!(s.method, tcp("h", 1));
    }

    #[test]
    fn missing_variables_are_named() {
        assert_eq!(
            invalid(spec_of(&[(WORLD_SIZE, "2"), (RENDEZVOUS, "file:/x")])),
            RANK
        );
        assert_eq!(
            invalid(spec_of(&[(WORLD_SIZE, "2"), (RANK, "1")])),
            RENDEZVOUS
        );
        assert_eq!(
            invalid(spec_of(&[
                (WORLD_SIZE, "2"),
                (RANK, "1"),
                (MASTER_ADDR, "h")
            ])),
            MASTER_PORT
        );
        assert_eq!(
            invalid(spec_of(&[
                (WORLD_SIZE, "2"),
                (RANK, "1"),
                (MASTER_PORT, "1")
            ])),
            MASTER_ADDR
        );
        // RANK without WORLD_SIZE: a one-rank job has no rank 1.
        assert_eq!(invalid(spec_of(&[(RANK, "1")])), RANK);
        // An empty value is not set.
        assert_eq!(invalid(spec_of(&[(WORLD_SIZE, "2"), (RANK, " ")])), RANK);
    }

    #[test]
    fn malformed_variables_are_named() {
        let base = [(WORLD_SIZE, "2"), (RANK, "0")];
        let with = |extra: &[(&'static str, &'static str)]| spec_of(&[&base[..], extra].concat());
        assert_eq!(
            invalid(spec_of(&[(WORLD_SIZE, "two"), (RANK, "0")])),
            WORLD_SIZE
        );
        assert_eq!(
            invalid(spec_of(&[(WORLD_SIZE, "0"), (RANK, "0")])),
            WORLD_SIZE
        );
        assert_eq!(invalid(spec_of(&[(WORLD_SIZE, "2"), (RANK, "-1")])), RANK);
        assert_eq!(invalid(spec_of(&[(WORLD_SIZE, "2"), (RANK, "2")])), RANK);
        assert_eq!(invalid(spec_of(&[(WORLD_SIZE, "4"), (RANK, "7")])), RANK);
        assert_eq!(invalid(with(&[(LOCAL_RANK, "x")])), LOCAL_RANK);
        for bad in [
            "nfs:/x",
            "file:",
            "file:/",
            "tcp:host",
            "tcp::29500",
            "tcp:h:0",
            "tcp:h:70000",
            "tcp:h:p",
        ] {
            assert_eq!(invalid(with(&[(RENDEZVOUS, bad)])), RENDEZVOUS, "{bad}");
        }
        assert_eq!(
            invalid(with(&[(MASTER_ADDR, "h"), (MASTER_PORT, "port")])),
            MASTER_PORT
        );
        for bad in ["0", "-3", "soon", "inf", "NaN"] {
            assert_eq!(
                invalid(with(&[(RENDEZVOUS, "file:/x"), (RENDEZVOUS_TIMEOUT, bad)])),
                RENDEZVOUS_TIMEOUT,
                "{bad}"
            );
        }
    }

    /// Runs `world` ranks as threads, each `share_id` with rank 0's id `id-0-<tag>`.
    fn run_ranks(world: usize, method: Rendezvous, timeout: Duration) -> Vec<Result<String>> {
        std::thread::scope(|s| {
            let hs: Vec<_> = (0..world)
                .map(|rank| {
                    let spec = RendezvousSpec {
                        rank,
                        world_size: world,
                        local_rank: rank,
                        method: Some(method.clone()),
                        timeout,
                    };
                    s.spawn(move || {
                        share_id(&spec, || {
                            assert_eq!(spec.rank, 0, "make_id runs on rank 0 only");
                            Ok(format!("id-{rank}-{world}"))
                        })
                    })
                })
                .collect();
            hs.into_iter()
                .map(|h| h.join().expect("no rank panics"))
                .collect()
        })
    }

    fn temp_dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "implicit-etf-rdv-{tag}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn file_exchange_three_ranks() {
        let dir = temp_dir("file");
        let path = dir.join("job.nccl");
        let out = run_ranks(3, Rendezvous::File(path.clone()), Duration::from_secs(10));
        for r in &out {
            assert_eq!(r.as_ref().unwrap(), "id-0-3");
        }
        // Rank 0 cleaned up after every rank acknowledged: the path serves the next run.
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
        let out = run_ranks(3, Rendezvous::File(path), Duration::from_secs(10));
        assert!(out.iter().all(|r| r.as_deref() == Ok("id-0-3")), "{out:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn file_left_by_an_earlier_job_is_refused_on_rank_0() {
        let dir = temp_dir("stale");
        let path = dir.join("job.nccl");
        std::fs::write(&path, "old\n").unwrap();
        let spec = RendezvousSpec {
            rank: 0,
            world_size: 2,
            local_rank: 0,
            method: Some(Rendezvous::File(path.clone())),
            timeout: Duration::from_secs(1),
        };
        let r = share_id(&spec, || Ok("new".into()));
        assert!(
            matches!(&r, Err(Error::Collective { reason, .. }) if reason.contains("already exists")),
            "{r:?}"
        );
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "old\n");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn tcp_exchange_three_ranks_past_stray_connections() {
        // Rank 0's listener on an ephemeral port of 127.0.0.1, bound before the others start
        // connecting (they retry anyway).
        let listener = TcpListener::bind(("127.0.0.1", 0)).unwrap();
        let addr = listener.local_addr().unwrap();
        // Queued before any rank: one that talks another protocol, one that says nothing and
        // leaves. Neither may take a rank's place.
        let mut http = TcpStream::connect(addr).unwrap();
        http.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
        drop(TcpStream::connect(addr).unwrap());
        let deadline = Instant::now() + Duration::from_secs(10);
        let out: Vec<Result<String>> = std::thread::scope(|s| {
            let l = &listener;
            let r0 = s.spawn(move || tcp_serve(l, "id-0", 3, deadline).map(|_| "id-0".into()));
            let peers: Vec<_> = (1..3)
                .map(|rank| s.spawn(move || tcp_fetch(&[addr], rank, 3, deadline)))
                .collect();
            std::iter::once(r0)
                .chain(peers)
                .map(|h| h.join().unwrap())
                .collect()
        });
        for r in &out {
            assert_eq!(r.as_deref(), Ok("id-0"), "{out:?}");
        }
        drop(http);
    }

    #[test]
    fn tcp_exchange_through_share_id() {
        // The public path: rank 0 binds the port itself (a free one, found by binding port 0).
        let port = TcpListener::bind(("127.0.0.1", 0))
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let method = Rendezvous::Tcp {
            host: "127.0.0.1".into(),
            port,
        };
        let out = run_ranks(3, method, Duration::from_secs(10));
        assert!(out.iter().all(|r| r.as_deref() == Ok("id-0-3")), "{out:?}");
    }

    #[test]
    fn tcp_world_size_mismatch_fails_both_sides() {
        let listener = TcpListener::bind(("127.0.0.1", 0)).unwrap();
        let addr = listener.local_addr().unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        let (r0, r1) = std::thread::scope(|s| {
            let l = &listener;
            let a = s.spawn(move || tcp_serve(l, "id", 2, deadline));
            let b = s.spawn(move || tcp_fetch(&[addr], 1, 3, deadline));
            (a.join().unwrap(), b.join().unwrap())
        });
        assert!(matches!(r0, Err(Error::Collective { .. })), "{r0:?}");
        assert!(
            matches!(&r1, Err(Error::Collective { reason, .. }) if reason.contains("world size")),
            "{r1:?}"
        );
    }

    #[test]
    fn timeouts_instead_of_hangs() {
        let t = Duration::from_millis(150);
        let start = Instant::now();
        // A file rank whose rank 0 never writes.
        let dir = temp_dir("timeout");
        let spec = |rank, method| RendezvousSpec {
            rank,
            world_size: 2,
            local_rank: rank,
            method: Some(method),
            timeout: t,
        };
        let path = dir.join("never.nccl");
        let r = share_id(&spec(1, Rendezvous::File(path.clone())), || unreachable!());
        assert!(matches!(r, Err(Error::Collective { .. })), "{r:?}");
        // A file rank 0 whose peer never reads: it fails and removes its file.
        let r = share_id(&spec(0, Rendezvous::File(path.clone())), || Ok("x".into()));
        assert!(matches!(r, Err(Error::Collective { .. })), "{r:?}");
        assert!(!path.exists());
        // A tcp rank with nobody listening (a port just freed).
        let port = TcpListener::bind(("127.0.0.1", 0))
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let tcp = Rendezvous::Tcp {
            host: "127.0.0.1".into(),
            port,
        };
        let r = share_id(&spec(1, tcp.clone()), || unreachable!());
        assert!(matches!(r, Err(Error::Collective { .. })), "{r:?}");
        // A tcp rank 0 nobody connects to.
        let r = share_id(&spec(0, tcp), || Ok("x".into()));
        assert!(matches!(r, Err(Error::Collective { .. })), "{r:?}");
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "{:?}",
            start.elapsed()
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn bad_ids_and_make_id_errors() {
        let spec = RendezvousSpec::from_vars(|_| None).unwrap();
        for bad in ["", "two words", "line\nbreak"] {
            let r = share_id(&spec, || Ok(bad.to_string()));
            assert!(
                matches!(r, Err(Error::InvalidParameter { name: "id", .. })),
                "{r:?}"
            );
        }
        let r = share_id(&spec, || Err(Error::Untrained));
        assert_eq!(r, Err(Error::Untrained));
        // A hand-made spec with a rank beyond the world size.
        let bad = RendezvousSpec { rank: 2, ..spec };
        assert!(matches!(
            share_id(&bad, || Ok("x".into())),
            Err(Error::InvalidParameter { name: RANK, .. })
        ));
    }
}
