//! The daemon (`millrace serve`): loads the plan, binds the unix socket, admits trainer
//! ranks and streams their slices of every global batch through shared-memory rings.
//!
//! - [`protocol`]: frames, HELLO/WELCOME, fd passing (docs/PROTOCOL.md).
//! - [`ring`]: the sealed memfd ring of one dp rank and the slot materializer.
//! - [`hub`]: jobs, rings, peers, and the materializer threads.
//! - this file: `[serve]` settings, the socket, one tokio task per connection, signals.
//!
//! The tokio runtime only moves small frames; token copies run on the hub's threads, so a
//! connection never waits for a copy and a copy never waits for a socket.

pub mod hub;
pub mod protocol;
pub mod ring;

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tracing::{error, info, warn};

use crate::config::Config;
use hub::{Hub, HubSettings};
use protocol::{kind, Frame, Hello};
use ring::{Source, TokenType};

/// Arguments of `millrace serve`.
#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// The run's config file.
    #[arg(long)]
    pub config: PathBuf,
    /// Listen here instead of `[serve] socket`.
    #[arg(long)]
    pub socket: Option<PathBuf>,
}

/// The `[serve]` table (docs/OPERATIONS.md lists every key).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServeConfig {
    /// Unix socket path.
    #[serde(default = "default_socket")]
    pub socket: PathBuf,
    /// Slots per dp-rank ring: how many steps a rank may have ready ahead.
    #[serde(default = "default_slots")]
    pub ring_slots: u32,
    /// Threads copying tokens into slots.
    #[serde(default = "default_threads")]
    pub materialize_threads: usize,
    /// `int32`, `int64` or `shard`.
    #[serde(default = "default_dtype")]
    pub token_dtype: String,
    /// Steps planned ahead of the copies, with their page-cache hints issued.
    #[serde(default = "default_prefetch")]
    pub prefetch_steps: u32,
    /// Hint the kernel (MADV_RANDOM on shards, MADV_WILLNEED on planned spans).
    #[serde(default = "default_true")]
    pub page_hints: bool,
    /// Most clients at once.
    #[serde(default = "default_max_clients")]
    pub max_clients: usize,
    /// How long a new connection has to send its HELLO.
    #[serde(default = "default_handshake")]
    pub handshake_timeout_ms: u64,
    /// Group that owns the socket (mode 0660); reserved for access control.
    #[serde(default)]
    pub socket_group: Option<String>,
    /// uids allowed to connect; reserved for access control.
    #[serde(default)]
    pub allowed_uids: Option<Vec<u32>>,
    /// Prometheus listen address; reserved for metrics.
    #[serde(default)]
    pub metrics_addr: Option<String>,
    /// Reload the schedule when the file changes; reserved for hot reload.
    #[serde(default)]
    pub watch_config: Option<bool>,
}

fn default_socket() -> PathBuf {
    PathBuf::from("/run/millrace/millrace.sock")
}
fn default_slots() -> u32 {
    4
}
fn default_threads() -> usize {
    2
}
fn default_dtype() -> String {
    "int32".into()
}
fn default_prefetch() -> u32 {
    4
}
fn default_true() -> bool {
    true
}
fn default_max_clients() -> usize {
    512
}
fn default_handshake() -> u64 {
    10_000
}

impl ServeConfig {
    /// Reads `[serve]` from a config (defaults when absent); a relative socket path is
    /// resolved against the config file's directory.
    pub fn from_config(cfg: &Config) -> Result<ServeConfig> {
        let table = cfg.serve.clone().unwrap_or_default();
        let mut s: ServeConfig = toml::Value::Table(table)
            .try_into()
            .with_context(|| format!("{}: [serve]", cfg.source.display()))?;
        s.socket = cfg.resolve_path(&s.socket);
        let bad = |field: &str, what: &str| -> Result<ServeConfig> {
            bail!("{}: [serve] {field}: {what}", cfg.source.display())
        };
        if !(2..=1024).contains(&s.ring_slots) {
            return bad("ring_slots", "must be 2..=1024");
        }
        if !(1..=256).contains(&s.materialize_threads) {
            return bad("materialize_threads", "must be 1..=256");
        }
        if s.prefetch_steps > 1024 {
            return bad("prefetch_steps", "must be at most 1024");
        }
        if s.max_clients == 0 {
            return bad("max_clients", "must be positive");
        }
        Ok(s)
    }
}

/// Runs `millrace serve` until SIGTERM or SIGINT.
pub fn run_cli(args: ServeArgs) -> Result<()> {
    let cfg = Config::load(&args.config)?;
    let mut serve = ServeConfig::from_config(&cfg)?;
    if let Some(s) = args.socket {
        serve.socket = s;
    }
    let t0 = std::time::Instant::now();
    let loaded = cfg.load_plan()?;
    let dtypes: Vec<(String, crate::corpus::DType)> = loaded
        .plan
        .domain_names()
        .iter()
        .zip(&loaded.shards)
        .flat_map(|(n, shards)| shards.iter().map(move |s| (n.to_string(), s.dtype())))
        .collect();
    let token = TokenType::choose(&serve.token_dtype, &dtypes)
        .map_err(|e| anyhow::anyhow!("{}: [serve] token_dtype: {e}", cfg.source.display()))?;
    info!(
        fingerprint = %format!("{:032x}", loaded.plan.fingerprint()),
        domains = loaded.plan.domain_names().len(),
        shards = dtypes.len(),
        ms = t0.elapsed().as_millis() as u64,
        "corpus validated and plan built"
    );
    let pad_token = loaded.plan.config().pad_token;
    let hub = Arc::new(Hub::new(
        loaded.plan,
        Source {
            shards: loaded.shards,
            pad_token,
        },
        HubSettings {
            slots: serve.ring_slots,
            prefetch: serve.prefetch_steps,
            token,
            max_clients: serve.max_clients,
            hints: serve.page_hints,
        },
    ));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("millrace-io")
        .build()
        .context("starting the tokio runtime")?;
    let workers: Vec<_> = (0..serve.materialize_threads)
        .map(|i| {
            let hub = hub.clone();
            std::thread::Builder::new()
                .name(format!("millrace-copy-{i}"))
                .spawn(move || hub.worker())
        })
        .collect::<std::io::Result<_>>()
        .context("starting materializer threads")?;
    let result = runtime.block_on(serve_socket(hub.clone(), serve));
    hub.stop();
    for w in workers {
        let _ = w.join();
    }
    runtime.shutdown_timeout(Duration::from_secs(2));
    result
}

/// Binds the socket (refusing to steal one a live daemon is serving), sets its mode, and
/// accepts until a signal.
async fn serve_socket(hub: Arc<Hub>, serve: ServeConfig) -> Result<()> {
    let path = serve.socket.clone();
    let listener = bind(&path).await?;
    info!(socket = %path.display(), threads = serve.materialize_threads, slots = serve.ring_slots, "serving");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .context("installing the SIGINT handler")?;
    let timeout = Duration::from_millis(serve.handshake_timeout_ms);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let hub = hub.clone();
                    tokio::spawn(async move { connection(hub, stream, timeout).await });
                }
                Err(e) => {
                    // EMFILE and friends: keep serving the clients we have.
                    warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = term.recv() => { info!("SIGTERM: shutting down"); break; }
            _ = int.recv() => { info!("SIGINT: shutting down"); break; }
        }
    }
    drop(listener);
    let _ = std::fs::remove_file(&path);
    Ok(())
}

async fn bind(path: &Path) -> Result<UnixListener> {
    if let Some(dir) = path.parent() {
        if !dir.as_os_str().is_empty() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("creating the socket directory {}", dir.display()))?;
        }
    }
    if path.exists() {
        if UnixStream::connect(path).await.is_ok() {
            bail!(
                "{}: another daemon is serving this socket; stop it or choose another [serve] socket",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing the stale socket {}", path.display()))?;
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .with_context(|| format!("chmod 0660 {}", path.display()))?;
    Ok(listener)
}

/// Reads frames into `buf` until one is complete.
async fn read_frame(stream: &mut UnixStream, buf: &mut Vec<u8>) -> Result<Option<Frame>, String> {
    loop {
        match protocol::parse_frame(buf) {
            Ok(Some((frame, n))) => {
                buf.drain(..n);
                return Ok(Some(frame));
            }
            Ok(None) => {}
            Err(e) => return Err(e.to_string()),
        }
        let mut chunk = [0u8; 4096];
        match stream.read(&mut chunk).await {
            Ok(0) if buf.is_empty() => return Ok(None),
            Ok(0) => {
                return Err(format!(
                    "connection closed inside a frame ({} bytes pending)",
                    buf.len()
                ))
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => return Err(format!("read: {e}")),
        }
    }
}

/// Sends a REFUSED or ERROR frame; the connection is closed right after, so a failed
/// write changes nothing.
async fn say(stream: &mut UnixStream, kind: u8, code: &str, message: &str) {
    let frame = protocol::encode(kind, &protocol::reason(code, message));
    let _ = stream.write_all(&frame).await;
}

/// One client: HELLO, WELCOME with fds, then RELEASE frames until it leaves.
async fn connection(hub: Arc<Hub>, mut stream: UnixStream, timeout: Duration) {
    let pid = stream.peer_cred().ok().and_then(|c| c.pid());
    let mut buf = Vec::new();
    let hello = match tokio::time::timeout(timeout, read_frame(&mut stream, &mut buf)).await {
        Err(_) => {
            warn!(?pid, "no HELLO within {} ms; closing", timeout.as_millis());
            say(&mut stream, kind::ERROR, "protocol", "no HELLO in time").await;
            return;
        }
        Ok(Ok(Some(Frame::Hello(p)))) => p,
        Ok(Ok(None)) => return,
        Ok(Ok(Some(other))) => {
            let m = format!("expected HELLO first, got {other:?}");
            warn!(?pid, "{m}; closing");
            say(&mut stream, kind::ERROR, "protocol", &m).await;
            return;
        }
        Ok(Err(m)) => {
            warn!(?pid, "protocol error before HELLO: {m}; closing");
            say(&mut stream, kind::ERROR, "protocol", &m).await;
            return;
        }
    };
    let hello = match Hello::parse(&hello) {
        Ok(h) => h,
        Err(r) => {
            warn!(?pid, "refused: {r}");
            say(&mut stream, kind::REFUSED, r.code, &r.message).await;
            return;
        }
    };
    // Restoring or seeking a planner is CPU work: keep it off the I/O threads.
    let admitted = {
        let hub = hub.clone();
        let hello = hello.clone();
        tokio::task::spawn_blocking(move || hub.admit(&hello, pid)).await
    };
    let adm = match admitted {
        Ok(Ok(a)) => a,
        Ok(Err(r)) => {
            warn!(?pid, job = %hello.job, dp_rank = hello.dp_rank, replica = %hello.replica, "refused: {r}");
            say(&mut stream, kind::REFUSED, r.code, &r.message).await;
            return;
        }
        Err(e) => {
            error!(?pid, "admission failed: {e}");
            say(&mut stream, kind::REFUSED, "busy", "internal error").await;
            return;
        }
    };
    let (job, rank, peer) = (hello.job.clone(), hello.dp_rank, adm.peer);
    let welcome = protocol::encode(kind::WELCOME, adm.welcome.to_string().as_bytes());
    let fds = [adm.ring.client_fd().as_raw_fd(), adm.ready.fd().as_raw_fd()];
    if let Err(e) = send_welcome(&mut stream, &welcome, &fds).await {
        warn!(?pid, "sending WELCOME failed: {e}");
        hub.leave(&job, rank, peer);
        return;
    }
    info!(?pid, job = %job, dp_rank = rank, replica = %hello.replica, step = %adm.welcome["start_step"], "client joined");
    let kick = adm.kick.clone();
    drop(adm);
    loop {
        let frame = tokio::select! {
            f = read_frame(&mut stream, &mut buf) => f,
            _ = kick.notified() => {
                let m = hub.failure(&job, rank, peer).unwrap_or_else(|| "the ring stopped".into());
                let code = if m.contains("checkpoint") { "peer_position" } else { "materialize" };
                say(&mut stream, kind::ERROR, code, &m).await;
                break;
            }
        };
        match frame {
            Ok(Some(Frame::Release(upto))) => {
                if let Err(m) = hub.release(&job, rank, peer, upto) {
                    warn!(?pid, job = %job, dp_rank = rank, "protocol error: {m}; closing");
                    say(&mut stream, kind::ERROR, "protocol", &m).await;
                    break;
                }
            }
            Ok(Some(Frame::Bye)) | Ok(None) => break,
            Ok(Some(Frame::Hello(_))) => {
                let m = "a second HELLO on one connection";
                warn!(?pid, job = %job, dp_rank = rank, "protocol error: {m}; closing");
                say(&mut stream, kind::ERROR, "protocol", m).await;
                break;
            }
            Err(m) => {
                warn!(?pid, job = %job, dp_rank = rank, "protocol error: {m}; closing");
                say(&mut stream, kind::ERROR, "protocol", &m).await;
                break;
            }
        }
    }
    hub.leave(&job, rank, peer);
    info!(?pid, job = %job, dp_rank = rank, replica = %hello.replica, "client left");
}

/// Sends WELCOME with the fds on its first byte, then whatever the first sendmsg did not
/// take.
async fn send_welcome(stream: &mut UnixStream, frame: &[u8], fds: &[i32]) -> std::io::Result<()> {
    let sent = loop {
        stream.writable().await?;
        match stream.try_io(tokio::io::Interest::WRITABLE, || {
            protocol::send_with_fds(stream.as_raw_fd(), frame, fds)
        }) {
            Ok(n) => break n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    };
    stream.write_all(&frame[sent..]).await
}
