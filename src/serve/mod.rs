//! The daemon (`millrace serve`): loads the plan, binds the unix socket, admits trainer
//! ranks and streams their slices of every global batch through shared-memory rings.
//!
//! - [`protocol`]: frames, HELLO/WELCOME, fd passing (docs/PROTOCOL.md).
//! - [`ring`]: the sealed memfd ring of one dp rank and the slot materializer.
//! - [`hub`]: jobs, rings, peers, the materializer threads, and live mixture changes.
//! - [`access`]: the socket's group and the SO_PEERCRED allowlist.
//! - [`notify`]: systemd's Type=notify handshake and watchdog.
//! - [`limits`]: the fd limit, the control-connection cap, rate-limited warnings.
//! - this file: `[serve]` settings, the socket, one tokio task per connection (trainer or
//!   control), the reload routes (file watch, SIGHUP, CONTROL), metrics, and the drain.
//!
//! The tokio runtime only moves small frames; token copies run on the hub's threads, so a
//! connection never waits for a copy and a copy never waits for a socket.

pub mod access;
pub mod budget;
pub mod hub;
pub mod limits;
pub mod notify;
pub mod ring;

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tracing::{error, info, warn};

use crate::config::Config;
use crate::plan::config::{PlanConfig, SchedulePoint};
use crate::wire::control::{self, Control};
use crate::wire::frame::{self, kind, Frame};
use crate::wire::protocol::{self, Code, Hello};
use crate::wire::status::{ControlConnections, FdLimitStatus, ReloadOutcome, Status};
use hub::{ChangeError, ChangeRequest, Hub, HubSettings, Late, Proposal};
use notify::Notifier;
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
    /// Unix socket path (default: [`default_socket`], creatable without root).
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
    /// Most bytes all rings together may take; unset: a quarter of the machine's memory
    /// or the unit's cgroup limit, whichever is smaller ([`budget::default_ring_budget`]).
    #[serde(default)]
    pub ring_memory_bytes: Option<u64>,
    /// How long a new connection has to send its HELLO.
    #[serde(default = "default_handshake")]
    pub handshake_timeout_ms: u64,
    /// Most control connections (`millrace ctl`, `status`, `top`) open at once; more are
    /// refused at once (REFUSED `busy`), so they cannot use up the daemon's fds.
    #[serde(default = "default_max_control")]
    pub max_control_connections: usize,
    /// A control connection that sends no request for this long is closed (ERROR `idle`).
    #[serde(default = "default_control_idle")]
    pub control_idle_timeout_ms: u64,
    /// Group that owns the socket (mode 0660), so trainer users in it may connect.
    #[serde(default)]
    pub socket_group: Option<String>,
    /// uids allowed to connect besides the daemon's own (SO_PEERCRED); with
    /// `allowed_gids` also unset, anyone who can open the socket may.
    #[serde(default)]
    pub allowed_uids: Option<Vec<u32>>,
    /// Primary gids allowed to connect.
    #[serde(default)]
    pub allowed_gids: Option<Vec<u32>>,
    /// Prometheus listen address (`host:port`); no exporter when unset.
    #[serde(default)]
    pub metrics_addr: Option<String>,
    /// Reload the mixture when the config file changes on disk.
    #[serde(default = "default_true")]
    pub watch_config: bool,
    /// How often the config file is checked.
    #[serde(default = "default_watch")]
    pub watch_interval_ms: u64,
    /// What a file or SIGHUP reload does with a change for a step already published.
    #[serde(default)]
    pub late_changes: LateSetting,
    /// How long SIGTERM waits for clients to release what they hold.
    #[serde(default = "default_drain")]
    pub drain_timeout_ms: u64,
}

/// `[serve] late_changes`.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LateSetting {
    /// Refuse the change and keep the old weights (the default: nothing moves silently).
    #[default]
    Refuse,
    /// Apply it from the first step that can still change.
    Next,
}

impl LateSetting {
    fn late(self) -> Late {
        match self {
            LateSetting::Refuse => Late::Refuse,
            LateSetting::Next => Late::Next,
        }
    }
}

fn default_watch() -> u64 {
    1000
}
fn default_drain() -> u64 {
    10_000
}
/// The socket used when `[serve] socket` is absent: one that an unprivileged user can
/// create, so a config written by `millrace synth` serves without root. (The systemd
/// unit's config names `/run/millrace/millrace.sock`, which its RuntimeDirectory makes.)
pub fn default_socket() -> PathBuf {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let uid = unsafe { libc::geteuid() };
    default_socket_for(std::env::var_os("XDG_RUNTIME_DIR").as_deref(), uid)
}

/// [`default_socket`] for a given `$XDG_RUNTIME_DIR` and uid: `$XDG_RUNTIME_DIR/millrace.sock`
/// when it is set to an absolute path (the XDG spec ignores others), else
/// `/tmp/millrace-UID/millrace.sock`. The Python client's `default_socket()` mirrors it.
pub fn default_socket_for(xdg_runtime_dir: Option<&std::ffi::OsStr>, uid: u32) -> PathBuf {
    match xdg_runtime_dir.map(Path::new) {
        Some(dir) if dir.is_absolute() => dir.join("millrace.sock"),
        _ => PathBuf::from(format!("/tmp/millrace-{uid}/millrace.sock")),
    }
}

/// Why `serve` could not bind `socket` as this user, found without binding it, so that
/// `check-config` fails exactly where `serve` would: the path is too long for a unix
/// socket, or its directory cannot be created or written.
pub fn socket_problem(socket: &Path) -> Option<String> {
    use std::os::unix::ffi::OsStrExt;
    // sun_path holds 108 bytes, one of them the terminating NUL.
    let len = socket.as_os_str().as_bytes().len();
    if len > 107 {
        return Some(format!(
            "socket path {} is {len} bytes; a unix socket path may have at most 107",
            socket.display()
        ));
    }
    let dir = match socket.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    // The nearest directory that exists is where serve must create (or bind) something.
    let mut existing = dir;
    while !existing.exists() {
        match existing.parent() {
            Some(p) if !p.as_os_str().is_empty() => existing = p,
            _ => {
                existing = Path::new(".");
                break;
            }
        }
    }
    if !existing.is_dir() {
        return Some(format!(
            "cannot create the socket {}: {} is not a directory",
            socket.display(),
            existing.display()
        ));
    }
    let Ok(c) = std::ffi::CString::new(existing.as_os_str().as_bytes()) else {
        return Some(format!(
            "socket path {} contains a NUL byte",
            socket.display()
        ));
    };
    // SAFETY: geteuid has no preconditions and cannot fail.
    let uid = unsafe { libc::geteuid() };
    // The /tmp fallback's directory must be this user's: whoever owns it could replace
    // the socket with their own and read every trainer's requests.
    if existing == dir && dir == default_socket_for(None, uid).parent().unwrap_or(dir) {
        use std::os::unix::fs::MetadataExt;
        if let Ok(meta) = std::fs::metadata(dir) {
            if meta.uid() != uid {
                return Some(format!(
                    "{} belongs to uid {}, not to uid {uid}; remove it, or set [serve] socket",
                    dir.display(),
                    meta.uid()
                ));
            }
        }
    }
    // SAFETY: c is a valid NUL-terminated path; access only reads it.
    let writable = unsafe { libc::access(c.as_ptr(), libc::W_OK | libc::X_OK) } == 0;
    if writable {
        return None;
    }
    let what = if existing == dir {
        format!(
            "cannot create the socket {} in {}",
            socket.display(),
            dir.display()
        )
    } else {
        format!(
            "cannot create the socket directory {} in {}",
            dir.display(),
            existing.display()
        )
    };
    Some(format!(
        "{what}: uid {uid} may not write there; set [serve] socket (or --socket) to a path \
         you may create (without it, serve uses {})",
        default_socket().display()
    ))
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
fn default_max_control() -> usize {
    64
}
fn default_control_idle() -> u64 {
    60_000
}

impl ServeConfig {
    /// Reads `[serve]` from a config (defaults when absent); a relative socket path is
    /// resolved against the config file's directory.
    pub fn from_config(cfg: &Config) -> Result<ServeConfig> {
        let table = cfg.serve.clone().unwrap_or_default();
        let mut s: ServeConfig =
            toml::Value::Table(table)
                .try_into()
                .map_err(|e: toml::de::Error| {
                    anyhow::anyhow!(
                        "{}: [serve]: {}",
                        cfg.source.display(),
                        crate::plan::config::one_line(&e.to_string())
                    )
                })?;
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
        if !(1..=65_536).contains(&s.max_control_connections) {
            return bad("max_control_connections", "must be 1..=65536");
        }
        if !(100..=86_400_000).contains(&s.control_idle_timeout_ms) {
            return bad("control_idle_timeout_ms", "must be 100..=86400000 (a day)");
        }
        if s.ring_memory_bytes == Some(0) {
            return bad("ring_memory_bytes", "must be positive");
        }
        if !(50..=3_600_000).contains(&s.watch_interval_ms) {
            return bad("watch_interval_ms", "must be 50..=3600000");
        }
        if s.drain_timeout_ms > 3_600_000 {
            return bad("drain_timeout_ms", "must be at most 3600000 (an hour)");
        }
        if let Some(a) = &s.metrics_addr {
            if a.parse::<std::net::SocketAddr>().is_err() {
                return bad(
                    "metrics_addr",
                    &format!(
                        "{a:?} is not host:port with a numeric host (e.g. \"127.0.0.1:9464\")"
                    ),
                );
            }
        }
        Ok(s)
    }
}

/// Arguments of `millrace check-config`.
#[derive(clap::Args, Debug)]
pub struct CheckArgs {
    /// The config file to check.
    #[arg(long)]
    pub config: PathBuf,
    /// Also read each document's last token and warn where it is not `eod_token`, as
    /// `millrace plan` does. Off by default: it touches one page of `.bin` per document,
    /// which the unit's ExecStartPre must not pay at every start on a large corpus.
    #[arg(long)]
    pub check_eod: bool,
}

/// What `millrace serve` loads before it binds: the config, `[serve]`, the validated
/// shards and plan, and the token type. `check-config` stops here.
struct Loaded {
    cfg: Config,
    hash: u64,
    serve: ServeConfig,
    plan: Arc<crate::plan::Plan>,
    shards: Vec<Vec<Arc<crate::corpus::Shard>>>,
    token: TokenType,
}

/// Reads and parses the config once, returning the hash of exactly the bytes parsed, so
/// the watcher compares against what was applied and not against a later read.
fn read_config(path: &Path) -> Result<(Config, u64), String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let text = String::from_utf8(bytes).map_err(|e| {
        format!(
            "{}: not UTF-8 at byte {}",
            path.display(),
            e.utf8_error().valid_up_to()
        )
    })?;
    let base = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let cfg = Config::parse(&text, path, base).map_err(|e| e.to_string())?;
    Ok((cfg, xxhash_rust::xxh3::xxh3_64(text.as_bytes())))
}

fn load(config: &Path) -> Result<Loaded> {
    let (cfg, hash) = read_config(config).map_err(|e| anyhow::anyhow!(e))?;
    let serve = ServeConfig::from_config(&cfg)?;
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
    if let Some(g) = &serve.socket_group {
        access::resolve_group(g).map_err(|e| anyhow::anyhow!("{}: {e}", cfg.source.display()))?;
    }
    Ok(Loaded {
        cfg,
        hash,
        serve,
        plan: loaded.plan,
        shards: loaded.shards,
        token,
    })
}

/// `millrace check-config`: everything `serve` checks before it binds (config, shards,
/// `[serve]`, the socket group, that `metrics_addr` is free), so a unit's ExecStartPre
/// fails with the reason.
pub fn check_config(args: CheckArgs) -> Result<()> {
    let l = load(&args.config)?;
    if let Some(addr) = &l.serve.metrics_addr {
        // `serve` exits when it cannot listen there, so the check tries it too (and lets
        // go at once).
        std::net::TcpListener::bind(addr.as_str()).map_err(|e| {
            anyhow::anyhow!(
                "{}: [serve] metrics_addr {addr:?}: cannot listen: {e} (`serve` would exit)",
                args.config.display()
            )
        })?;
    }
    if let Some(why) = socket_problem(&l.serve.socket) {
        bail!("{}: [serve] socket: {why}", args.config.display());
    }
    for w in l.plan.config().unweighted_warnings(&l.plan.domain_names()) {
        eprintln!("warning: {}: {w}", args.config.display());
    }
    let eod = if args.check_eod {
        crate::eod::check_plan(&l.plan, &l.shards)?
    } else {
        None
    };
    if let Some((eod, results)) = eod {
        for w in results.iter().filter_map(|d| crate::eod::warning(d, eod)) {
            eprintln!("{}: {w}", args.config.display());
        }
    }
    let shards: usize = l.shards.iter().map(Vec::len).sum();
    println!(
        "{}: ok: {} domains, {} shards, plan fingerprint {:032x}, socket {}, tokens as {}",
        args.config.display(),
        l.plan.domain_names().len(),
        shards,
        l.plan.fingerprint(),
        l.serve.socket.display(),
        l.token.0.name()
    );
    Ok(())
}

/// Runs `millrace serve` until SIGTERM or SIGINT.
pub fn run_cli(args: ServeArgs) -> Result<()> {
    let notifier = Arc::new(Notifier::from_env());
    let t0 = std::time::Instant::now();
    let mut l = load(&args.config)?;
    let from_flag = args.socket.is_some();
    if let Some(s) = args.socket {
        l.serve.socket = s;
    }
    if let Some(why) = socket_problem(&l.serve.socket) {
        if from_flag {
            bail!("--socket: {why}");
        }
        bail!("{}: [serve] socket: {why}", args.config.display());
    }
    // A socket directory this run creates goes when it stops (as root, `/run/millrace`
    // would otherwise stay behind); one that existed, like systemd's RuntimeDirectory,
    // stays.
    let made_dir = l
        .serve
        .socket
        .parent()
        .filter(|d| !d.as_os_str().is_empty() && !d.exists())
        .map(Path::to_path_buf);
    for w in l.plan.config().unweighted_warnings(&l.plan.domain_names()) {
        warn!("{}: {w}", args.config.display());
    }
    info!(
        fingerprint = %format!("{:032x}", l.plan.fingerprint()),
        domains = l.plan.domain_names().len(),
        shards = l.shards.iter().map(Vec::len).sum::<usize>(),
        ms = t0.elapsed().as_millis() as u64,
        "corpus validated and plan built"
    );
    let pad_token = l.plan.config().pad_token;
    let serve = l.serve.clone();
    // One fd per connection and two per ring (memfd, eventfd), plus shards and slack.
    let fd_limit = limits::raise_fd_limit(
        3 * serve.max_clients as u64 + serve.max_control_connections as u64 + 256,
    );
    let hub = Arc::new(Hub::new(
        l.plan.clone(),
        Source {
            shards: l.shards,
            pad_token,
            vocab_size: l.plan.config().vocab_size,
        },
        HubSettings {
            slots: serve.ring_slots,
            prefetch: serve.prefetch_steps,
            token: l.token,
            max_clients: serve.max_clients,
            hints: serve.page_hints,
            ring_budget: serve
                .ring_memory_bytes
                .unwrap_or_else(budget::default_ring_budget),
        },
    ));
    let daemon = Arc::new(Daemon {
        hub: hub.clone(),
        config: args.config.clone(),
        policy: access::Policy::new(serve.allowed_uids.clone(), serve.allowed_gids.clone()),
        started: Instant::now(),
        notifier: notifier.clone(),
        running: Mutex::new(Running::of(&l.cfg, l.plan.config(), l.hash)),
        pending: Mutex::new(None),
        control: limits::ControlSlots::new(serve.max_control_connections),
        fd_limit,
        warn_conn: limits::Throttle::new("refused connections", 20, Duration::from_secs(10)),
        warn_accept: limits::Throttle::new("failed accepts", 5, Duration::from_secs(10)),
        last_reload: Mutex::new(None),
        serve,
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("millrace-io")
        .build()
        .context("starting the tokio runtime")?;
    let workers: Vec<_> = (0..daemon.serve.materialize_threads)
        .map(|i| {
            let hub = hub.clone();
            std::thread::Builder::new()
                .name(format!("millrace-copy-{i}"))
                .spawn(move || hub.worker())
        })
        .collect::<std::io::Result<_>>()
        .context("starting materializer threads")?;
    let result = runtime.block_on(serve_socket(daemon.clone()));
    hub.stop();
    for w in workers {
        let _ = w.join();
    }
    runtime.shutdown_timeout(Duration::from_secs(2));
    if let Some(dir) = made_dir {
        // remove_dir removes only an empty directory: nothing else there is touched.
        let _ = std::fs::remove_dir(dir);
    }
    result
}

/// The running daemon, shared by every connection and the reload routes.
struct Daemon {
    hub: Arc<Hub>,
    config: PathBuf,
    serve: ServeConfig,
    policy: access::Policy,
    started: Instant,
    notifier: Arc<Notifier>,
    /// What the config file said when it was last applied.
    running: Mutex<Running>,
    /// The watcher's candidate: a hash seen once, applied if the next tick sees it too.
    pending: Mutex<Option<u64>>,
    /// Open control connections, against `[serve] max_control_connections`.
    control: Arc<limits::ControlSlots>,
    /// RLIMIT_NOFILE after start-up, for `status`.
    fd_limit: limits::FdLimit,
    /// Warnings about connections refused or dropped before admission: a peer can
    /// repeat those at will.
    warn_conn: limits::Throttle,
    /// Warnings about failed accepts (EMFILE, ENFILE).
    warn_accept: limits::Throttle,
    /// The outcome of the last reload (file, SIGHUP or ctl), for `status` and `top`: a
    /// refused file edit must be seen where people look, not only in the log.
    last_reload: Mutex<Option<ReloadOutcome>>,
}

/// The parts of the config file a reload compares against.
struct Running {
    /// `[corpus]`, which a reload may not change.
    corpus: Option<toml::Value>,
    /// `[plan]` without its weights and schedule, which a reload may not change either.
    fixed: PlanConfig,
    /// The file's schedule, the base a reload's first difference is measured from.
    points: Vec<SchedulePoint>,
    /// `[serve]`, only to warn that changes there need a restart.
    serve: Option<toml::Table>,
    /// Hash of the file's bytes when last applied or refused, for the watcher.
    seen: Option<u64>,
}

impl Running {
    fn of(cfg: &Config, plan: &PlanConfig, hash: u64) -> Running {
        Running {
            corpus: toml::Value::try_from(&cfg.corpus).ok(),
            fixed: fixed_part(plan),
            points: plan.points(),
            serve: cfg.serve.clone(),
            seen: Some(hash),
        }
    }
}

fn fixed_part(p: &PlanConfig) -> PlanConfig {
    let mut p = p.clone();
    p.weights = None;
    p.schedule.clear();
    p
}

impl Daemon {
    /// Logs a warning about a connection refused or dropped before admission, through
    /// the throttle: a peer can repeat those at will, and the log must not grow with it.
    fn warn_peer(&self, pid: Option<i32>, what: std::fmt::Arguments<'_>) {
        if let Some(k) = self.warn_conn.allow() {
            warn!(?pid, "{what}{}", limits::suppressed_note(k));
        }
    }

    /// Re-reads the config file and applies its schedule from its first difference with
    /// the one last applied. Anything else that changed in `[corpus]` or `[plan]` refuses
    /// the reload as a whole (it needs a restart); `[serve]` changes are only warned about.
    fn reload_file(&self, source: &'static str) -> Result<hub::Applied, ChangeError> {
        let r = self.reload_file_once(source);
        let unix_s = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let outcome = match &r {
            Ok(a) => ReloadOutcome {
                source: source.to_string(),
                ok: true,
                unix_s,
                code: None,
                message: a.message.clone(),
            },
            Err(e) => ReloadOutcome {
                source: source.to_string(),
                ok: false,
                unix_s,
                code: Some(e.code.as_str().to_string()),
                message: e.message.clone(),
            },
        };
        *self.last_reload.lock().unwrap_or_else(|p| p.into_inner()) = Some(outcome);
        r
    }

    /// One reload, as [`Daemon::reload_file`] describes; that wrapper records the outcome.
    fn reload_file_once(&self, source: &'static str) -> Result<hub::Applied, ChangeError> {
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        let parsed = (|| -> Result<(Config, PlanConfig), String> {
            let (cfg, hash) = read_config(&self.config)?;
            // Seen, whatever comes of it: the watcher does not retry a refused file.
            running.seen = Some(hash);
            let plan = cfg.plan_config().map_err(|e| e.to_string())?;
            if toml::Value::try_from(&cfg.corpus).ok() != running.corpus {
                return Err(format!(
                    "{}: [corpus] changed; a reload only changes [plan] weights and schedule \
                     (restart the daemon to change the corpus)",
                    self.config.display()
                ));
            }
            if fixed_part(&plan) != running.fixed {
                return Err(format!(
                    "{}: [plan] settings other than weights and schedule changed; restart \
                     the daemon to apply them",
                    self.config.display()
                ));
            }
            Ok((cfg, plan))
        })();
        let (cfg, plan) = match parsed {
            Ok(x) => x,
            Err(m) => {
                self.hub.reload_failed(source);
                warn!(source, "reload refused, the old weights stay: {m}");
                return Err(ChangeError {
                    code: Code::Invalid,
                    message: m,
                    first_changeable: None,
                });
            }
        };
        if cfg.serve != running.serve {
            warn!(
                source,
                "[serve] changed in {}; those settings apply at the next restart",
                self.config.display()
            );
            running.serve = cfg.serve.clone();
        }
        let points = plan.points();
        let r = self
            .hub
            .change(&ChangeRequest {
                proposal: Proposal::Schedule {
                    old: running.points.clone(),
                    new: points.clone(),
                },
                at_step: None,
                late: self.serve.late_changes.late(),
                source,
            })
            .map_err(|mut e| {
                // Say why the edit reaches back that far when a ramp is the reason.
                // (Both are in the schedule's own steps, as its points are.)
                let at = self.hub.plan().points_difference(&running.points, &points);
                let note = at.and_then(|p| crate::plan::config::ramp_note(&points, p));
                if let (Some(note), Code::Late) = (note, e.code) {
                    e.message = format!("{}; {note}", e.message);
                }
                e
            });
        match &r {
            Ok(a) => {
                running.points = points;
                info!(source, "reload: {}", a.message);
            }
            Err(e) => warn!(
                source,
                code = e.code.as_str(),
                "reload refused, the old weights stay: {}",
                e.message
            ),
        }
        r
    }

    /// The file watcher's check: reloads when the file's bytes changed since they were
    /// last applied and have stayed the same for one more interval (an editor's partial
    /// write is not applied).
    fn watch_tick(&self) {
        // One tick at a time: a tick that finds the previous one still reloading skips.
        let Ok(mut pending) = self.pending.try_lock() else {
            return;
        };
        let Ok(bytes) = std::fs::read(&self.config) else {
            return; // mid-rename, or gone for a moment: look again next tick
        };
        let h = xxhash_rust::xxh3::xxh3_64(&bytes);
        let seen = self.running.lock().unwrap_or_else(|p| p.into_inner()).seen;
        if Some(h) == seen {
            *pending = None;
            return;
        }
        if *pending == Some(h) {
            *pending = None;
            info!(config = %self.config.display(), "config file changed; reloading");
            let _ = self.reload_file("file");
        } else {
            *pending = Some(h);
        }
    }

    /// Answers one CONTROL payload.
    fn control(&self, payload: &[u8]) -> serde_json::Value {
        let req = match control::parse_control(payload) {
            Ok(r) => r,
            Err((op, message)) => {
                return serde_json::json!({"ok": false, "op": op, "code": Code::Protocol, "message": message})
            }
        };
        let (op, result) = match req {
            Control::Status => {
                return serde_json::json!({"ok": true, "op": "status", "status": self.status()})
            }
            Control::Journal => {
                return serde_json::json!({"ok": true, "op": "journal", "journal": self.hub.journal()})
            }
            Control::Reload => ("reload", self.reload_file("ctl")),
            Control::SetWeights {
                weights,
                at_step,
                late_next,
                source,
            } => {
                let r = self.hub.change(&ChangeRequest {
                    proposal: Proposal::Weights(weights),
                    at_step,
                    late: if late_next { Late::Next } else { Late::Refuse },
                    source,
                });
                match &r {
                    Ok(a) => info!(source, "set_weights: {}", a.message),
                    Err(e) => warn!(
                        source,
                        code = e.code.as_str(),
                        "set_weights refused, the old weights stay: {}",
                        e.message
                    ),
                }
                ("set_weights", r)
            }
        };
        match result {
            Ok(a) => serde_json::json!({
                "ok": true,
                "op": op,
                "requested_step": a.requested_step,
                "applied_step": a.applied_step,
                "moved": a.moved,
                "journal": self.hub.journal(),
                "message": a.message,
            }),
            Err(e) => {
                let mut v = serde_json::json!({"ok": false, "op": op, "code": e.code, "message": e.message});
                if let Some(fc) = e.first_changeable {
                    v["first_changeable_step"] = serde_json::json!(fc);
                }
                v
            }
        }
    }

    /// STATUS (docs/PROTOCOL.md): the hub's figures and the process's own.
    fn status(&self) -> Status {
        let mut s = self.hub.status();
        s.version = env!("CARGO_PKG_VERSION").to_string();
        s.pid = std::process::id();
        s.uptime_s = self.started.elapsed().as_secs_f64();
        s.config = self.config.display().to_string();
        s.socket = self.serve.socket.display().to_string();
        s.fd_limit = FdLimitStatus {
            soft: self.fd_limit.soft,
            hard: self.fd_limit.hard,
            at_start: self.fd_limit.was,
            open: limits::open_fds(),
        };
        s.control_connections = ControlConnections {
            open: self.control.open() as u64,
            max: self.control.cap() as u64,
        };
        s.last_reload = self
            .last_reload
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        s
    }
}

/// Where a reload or change can come from; each has its reload counters from the start.
const RELOAD_SOURCES: [&str; 5] = ["file", "sighup", "ctl", "client", "cursor"];

/// A counter or gauge not set for this long is dropped from /metrics: every live series
/// is set each second, so only the series of departed jobs (and rings) age out.
const METRICS_IDLE: Duration = Duration::from_secs(5);

/// Publishes the status figures as Prometheus metrics (docs/OPERATIONS.md lists them).
/// Derived from the same snapshot as `status`, so the two never disagree. Every series
/// that should stay is set on every call: one that is not ages out ([`METRICS_IDLE`]).
fn export_metrics(status: &Status) {
    use metrics::{counter, gauge};
    gauge!("millrace_clients").set(status.clients as f64);
    for (m, name) in [
        (&status.reloads_by_source, "millrace_reloads_total"),
        (
            &status.failed_reloads_by_source,
            "millrace_reload_failures_total",
        ),
    ] {
        let mut sources: std::collections::BTreeSet<&str> = RELOAD_SOURCES.into_iter().collect();
        sources.extend(m.keys().map(String::as_str));
        for source in sources {
            let n = m.get(source).copied().unwrap_or(0);
            counter!(name, "source" => source.to_string()).absolute(n);
        }
    }
    gauge!("millrace_control_connections").set(status.control_connections.open as f64);
    if let Some(n) = status.fd_limit.open {
        gauge!("millrace_open_fds").set(n as f64);
    }
    gauge!("millrace_padding_fraction").set(status.padding_fraction);
    gauge!("millrace_truncation_fraction").set(status.truncation_fraction);
    for d in &status.domains {
        let name = d.name.clone();
        gauge!("millrace_domain_target_share", "domain" => name.clone()).set(d.target_share);
        gauge!("millrace_domain_realized_share", "domain" => name.clone()).set(d.realized_share);
        gauge!("millrace_domain_epochs", "domain" => name).set(d.epochs);
    }
    for j in &status.jobs {
        for r in &j.rings {
            let labels = [("job", j.job.clone()), ("dp_rank", r.dp_rank.to_string())];
            counter!("millrace_tokens_delivered_total", &labels).absolute(r.tokens_delivered);
            counter!("millrace_batches_delivered_total", &labels).absolute(r.batches_delivered);
            gauge!("millrace_step", &labels).set(r.published_step as f64);
            gauge!("millrace_ring_occupancy", &labels).set(r.occupancy as f64);
            gauge!("millrace_ring_slots", &labels).set(r.slots as f64);
            gauge!("millrace_consumer_wait_seconds_total", &labels).set(r.consumer_wait_s);
            gauge!("millrace_producer_wait_seconds_total", &labels).set(r.producer_wait_s);
        }
    }
}

/// Binds the socket (refusing to steal one a live daemon is serving), sets its mode and
/// group, says READY, and serves until SIGTERM/SIGINT; then drains.
async fn serve_socket(d: Arc<Daemon>) -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let serve = d.serve.clone();
    let path = serve.socket.clone();
    // Signal handlers before READY: a reload right after start-up must not kill us.
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    if let Some(addr) = &serve.metrics_addr {
        let addr: std::net::SocketAddr = addr
            .parse()
            .with_context(|| format!("[serve] metrics_addr {addr:?}"))?;
        use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
        use metrics_util::MetricKindMask;
        // Buckets make the latency a real histogram (quantiles across nodes in PromQL).
        let buckets = [
            1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0, 2.5,
        ];
        PrometheusBuilder::new()
            .with_http_listener(addr)
            // Every live counter and gauge is set each second (export_metrics), so one
            // left alone this long belongs to a job that left: dropping it keeps the
            // exporter from growing with every job ever seen (2,000 short jobs left
            // 2,064 series). The latency histogram is process-wide and stays.
            .idle_timeout(
                MetricKindMask::COUNTER | MetricKindMask::GAUGE,
                Some(METRICS_IDLE),
            )
            .set_buckets_for_metric(
                Matcher::Full("millrace_materialize_seconds".into()),
                &buckets,
            )
            .with_context(|| "[serve] metrics_addr: histogram buckets")?
            .install()
            .with_context(|| format!("starting the metrics exporter on {addr}"))?;
        // Every series exists from the start, so rate() and alerts see zeros, not gaps.
        for source in RELOAD_SOURCES {
            metrics::counter!("millrace_reloads_total", "source" => source).absolute(0);
            metrics::counter!("millrace_reload_failures_total", "source" => source).absolute(0);
        }
        info!(%addr, "metrics at http://{addr}/metrics");
    }
    let listener = bind(&path, serve.socket_group.as_deref()).await?;
    info!(socket = %path.display(), threads = serve.materialize_threads, slots = serve.ring_slots, "serving");
    d.notifier.ready(&format!("serving {}", path.display()));
    let timeout = Duration::from_millis(serve.handshake_timeout_ms);
    let (shutdown_tx, shutdown) = tokio::sync::watch::channel(false);
    let mut watchdog = d.notifier.watchdog_interval().map(tokio::time::interval);
    let mut watch = tokio::time::interval(Duration::from_millis(serve.watch_interval_ms));
    watch.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut metrics_tick = tokio::time::interval(Duration::from_secs(1));
    metrics_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut flush_tick = tokio::time::interval(Duration::from_secs(10));
    flush_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // After a failed accept: no accepting until then (the pending connection keeps the
    // listener readable, so retrying at once would spin), and the next pause is longer.
    let mut paused: Option<tokio::time::Instant> = None;
    let mut backoff = ACCEPT_BACKOFF_MIN;
    loop {
        tokio::select! {
            accepted = listener.accept(), if paused.is_none() => match accepted {
                Ok((stream, _)) => {
                    backoff = ACCEPT_BACKOFF_MIN;
                    let (d, shutdown) = (d.clone(), shutdown.clone());
                    tokio::spawn(async move { connection(d, stream, timeout, shutdown).await });
                }
                Err(e) => {
                    // EMFILE, ENFILE, ENOBUFS: keep serving the clients we have; accept
                    // again once connections closed (or the pause ran out).
                    if let Some(k) = d.warn_accept.allow() {
                        warn!(
                            fd_limit = d.fd_limit.soft,
                            open_fds = ?limits::open_fds(),
                            "accept failed: {e}; pausing accepts for {} ms{}",
                            backoff.as_millis(),
                            limits::suppressed_note(k)
                        );
                    }
                    paused = Some(tokio::time::Instant::now() + backoff);
                    backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                }
            },
            _ = async { match paused { Some(t) => tokio::time::sleep_until(t).await, None => std::future::pending::<()>().await } } => {
                paused = None;
            }
            _ = flush_tick.tick() => {
                d.warn_conn.flush();
                d.warn_accept.flush();
            }
            _ = async { match watchdog.as_mut() { Some(w) => { w.tick().await; } None => std::future::pending::<()>().await } } => {
                // A hub stuck on its lock would stop these pings, and systemd restarts us.
                let _ = d.hub.plan();
                d.notifier.watchdog();
            }
            _ = watch.tick(), if serve.watch_config => {
                // Off the loop: a reload restores planners, and accepting must go on.
                let d = d.clone();
                tokio::task::spawn_blocking(move || d.watch_tick());
            }
            _ = metrics_tick.tick(), if serve.metrics_addr.is_some() => {
                let d = d.clone();
                tokio::task::spawn_blocking(move || export_metrics(&d.status()));
            }
            _ = hup.recv() => {
                info!("SIGHUP: reloading {}", d.config.display());
                let d = d.clone();
                tokio::task::spawn_blocking(move || {
                    d.notifier.reloading();
                    let line = match d.reload_file("sighup") {
                        Ok(a) => format!("reloaded: {}", a.message),
                        Err(e) => format!("reload refused ({}): {}", e.code, e.message),
                    };
                    d.notifier.reloaded(&line);
                });
            }
            _ = term.recv() => { info!("SIGTERM: draining"); break; }
            _ = int.recv() => { info!("SIGINT: draining"); break; }
        }
    }
    d.notifier
        .stopping("draining: clients finish the slots they hold");
    drop(listener);
    let _ = std::fs::remove_file(&path);
    d.hub.drain();
    let deadline = Instant::now() + Duration::from_millis(serve.drain_timeout_ms);
    while !d.hub.drained() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if d.hub.drained() {
        info!("drained: every client released what was published");
    } else {
        warn!(
            "drain bound of {} ms reached with slots still held; closing",
            serve.drain_timeout_ms
        );
    }
    let _ = shutdown_tx.send(true);
    // Let connections say why they close.
    tokio::time::sleep(Duration::from_millis(100)).await;
    Ok(())
}

/// The first pause after a failed accept; each further failure in a row doubles it.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
/// The longest pause between accepts while they keep failing.
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

async fn bind(path: &Path, group: Option<&str>) -> Result<UnixListener> {
    if let Some(dir) = path.parent() {
        if !dir.as_os_str().is_empty() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("creating the socket directory {}", dir.display()))?;
        }
    }
    remove_stale_socket(path).await?;
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .with_context(|| format!("chmod 0660 {}", path.display()))?;
    if let Some(g) = group {
        access::set_socket_group(path, g).map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    Ok(listener)
}

/// Clears the way for binding `path`: nothing there is fine; a stale socket (a socket
/// file nobody listens on, left by a daemon that died) is removed; anything else (a
/// regular file, a directory, a symlink, a socket another daemon is serving, one we
/// cannot probe) is refused with the path named, because `--socket` typos must never
/// delete a file.
async fn remove_stale_socket(path: &Path) -> Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => bail!("{}: cannot inspect the socket path: {e}", path.display()),
    };
    let ft = meta.file_type();
    if !ft.is_socket() {
        let what = crate::corpus::file_kind(&ft);
        bail!(
            "{}: the socket path exists and is {what}; refusing to remove it (choose another \
             [serve] socket or --socket, or remove it yourself)",
            path.display()
        );
    }
    match UnixStream::connect(path).await {
        Ok(_) => bail!(
            "{}: another daemon is serving this socket; stop it or choose another [serve] socket",
            path.display()
        ),
        // Nobody listens: a socket left behind by a daemon that did not exit cleanly.
        Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {
            std::fs::remove_file(path)
                .with_context(|| format!("removing the stale socket {}", path.display()))?;
            info!(socket = %path.display(), "removed a stale socket");
            Ok(())
        }
        Err(e) => bail!(
            "{}: a socket is there and probing it failed ({e}); refusing to remove it",
            path.display()
        ),
    }
}

/// Reads frames into `buf` until one is complete.
async fn read_frame(stream: &mut UnixStream, buf: &mut Vec<u8>) -> Result<Option<Frame>, String> {
    loop {
        match frame::parse_frame(buf) {
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

/// Awaits the admission `task` while watching the client: when it hangs up (or sends
/// more than a frame's worth before its WELCOME), `cancel` is set, so a seek for a client
/// that is gone stops at its next chunk. Bytes it sends meanwhile stay in `buf`.
async fn admit_watching<T>(
    stream: &mut UnixStream,
    buf: &mut Vec<u8>,
    task: tokio::task::JoinHandle<T>,
    cancel: &std::sync::atomic::AtomicBool,
) -> Result<T, tokio::task::JoinError> {
    tokio::pin!(task);
    let mut watching = true;
    loop {
        tokio::select! {
            r = &mut task => return r,
            ready = stream.readable(), if watching => {
                let mut chunk = [0u8; 4096];
                let gone = match ready.and_then(|()| stream.try_read(&mut chunk)) {
                    Ok(0) => true,
                    Ok(n) => {
                        buf.extend_from_slice(&chunk[..n]);
                        buf.len() > frame::MAX_FRAME + frame::HEADER
                    }
                    Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
                };
                if gone {
                    cancel.store(true, std::sync::atomic::Ordering::Relaxed);
                    watching = false;
                }
            }
        }
    }
}

/// Sends a REFUSED or ERROR frame; the connection is closed right after, so a failed
/// write changes nothing.
async fn say(stream: &mut UnixStream, kind: u8, code: Code, message: &str) {
    let bytes = frame::encode(kind, &protocol::reason(code, message));
    let _ = stream.write_all(&bytes).await;
}

/// One connection: the access check, then either a trainer (HELLO, WELCOME with fds,
/// RELEASE frames until it leaves) or a control client (CONTROL requests).
async fn connection(
    d: Arc<Daemon>,
    mut stream: UnixStream,
    timeout: Duration,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let cred = stream.peer_cred().ok();
    let pid = cred.and_then(|c| c.pid());
    if !d.policy.open() {
        let verdict = match cred {
            Some(c) => d.policy.authorized(c.uid(), c.gid()),
            None => Err("the peer's credentials (SO_PEERCRED) could not be read".into()),
        };
        if let Err(m) = verdict {
            d.warn_peer(pid, format_args!("refused: {m}"));
            say(&mut stream, kind::REFUSED, Code::Access, &m).await;
            // Closed at once: lingering for the client (as before) let a denied uid hold
            // an fd per connect. What it already sent is read away first, so closing does
            // not reset the connection before it reads the refusal; a client whose HELLO
            // write fails after this reads the queued REFUSED (src/client.rs, ctl.rs).
            let mut sink = [0u8; 4096];
            while matches!(stream.try_read(&mut sink), Ok(n) if n > 0) {}
            return;
        }
    }
    let mut buf = Vec::new();
    let hello = match tokio::time::timeout(timeout, read_frame(&mut stream, &mut buf)).await {
        Err(_) => {
            d.warn_peer(
                pid,
                format_args!("no HELLO within {} ms; closing", timeout.as_millis()),
            );
            say(&mut stream, kind::ERROR, Code::Protocol, "no HELLO in time").await;
            return;
        }
        Ok(Ok(Some(Frame::Hello(p)))) => p,
        Ok(Ok(Some(Frame::Control(p)))) => {
            let Some(slot) = d.control.take() else {
                let m = format!(
                    "{} control connections are open ([serve] max_control_connections); \
                     close one or try again later",
                    d.control.cap()
                );
                d.warn_peer(pid, format_args!("refused a control connection: {m}"));
                say(&mut stream, kind::REFUSED, Code::Busy, &m).await;
                return;
            };
            control_connection(d, stream, buf, p, shutdown).await;
            drop(slot);
            return;
        }
        Ok(Ok(None)) => return,
        Ok(Ok(Some(other))) => {
            let m = format!("expected HELLO or CONTROL first, got {other:?}");
            d.warn_peer(pid, format_args!("{m}; closing"));
            say(&mut stream, kind::ERROR, Code::Protocol, &m).await;
            return;
        }
        Ok(Err(m)) => {
            d.warn_peer(
                pid,
                format_args!("protocol error before HELLO: {m}; closing"),
            );
            say(&mut stream, kind::ERROR, Code::Protocol, &m).await;
            return;
        }
    };
    let hub = d.hub.clone();
    let hello = match Hello::parse(&hello) {
        Ok(h) => h,
        Err(r) => {
            d.warn_peer(pid, format_args!("refused: {r}"));
            say(&mut stream, kind::REFUSED, r.code, &r.message).await;
            return;
        }
    };
    // Restoring or seeking a planner is CPU work: keep it off the I/O threads, and stop
    // it if the client hangs up meanwhile.
    let cancel = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let task = {
        let (hub, hello, cancel) = (hub.clone(), hello.clone(), cancel.clone());
        tokio::task::spawn_blocking(move || hub.admit(&hello, pid, &cancel))
    };
    let admitted = admit_watching(&mut stream, &mut buf, task, &cancel).await;
    if cancel.load(std::sync::atomic::Ordering::Relaxed) {
        if let Ok(Ok(a)) = &admitted {
            hub.leave(&hello.job, hello.dp_rank, a.peer);
        }
        info!(?pid, job = %hello.job, dp_rank = hello.dp_rank, "client left during admission; its admission and any seek were cancelled");
        return;
    }
    let adm = match admitted {
        Ok(Ok(a)) => a,
        Ok(Err(r)) => {
            if let Some(k) = d.warn_conn.allow() {
                warn!(?pid, job = %hello.job, dp_rank = hello.dp_rank, replica = %hello.replica, "refused: {r}{}", limits::suppressed_note(k));
            }
            say(&mut stream, kind::REFUSED, r.code, &r.message).await;
            return;
        }
        Err(e) => {
            error!(?pid, "admission failed: {e}");
            say(&mut stream, kind::REFUSED, Code::Busy, "internal error").await;
            return;
        }
    };
    let (job, rank, peer) = (hello.job.clone(), hello.dp_rank, adm.peer);
    // A struct of strings and integers always serializes; should it not, the peer
    // leaves as on a failed send.
    let welcome = match serde_json::to_vec(&adm.welcome) {
        Ok(bytes) => frame::encode(kind::WELCOME, &bytes),
        Err(e) => {
            error!(?pid, "encoding WELCOME failed: {e}");
            hub.leave(&job, rank, peer);
            say(&mut stream, kind::REFUSED, Code::Busy, "internal error").await;
            return;
        }
    };
    let fds = [adm.ring.client_fd().as_raw_fd(), adm.ready.fd().as_raw_fd()];
    if let Err(e) = send_welcome(&mut stream, &welcome, &fds).await {
        warn!(?pid, "sending WELCOME failed: {e}");
        hub.leave(&job, rank, peer);
        return;
    }
    info!(?pid, job = %job, dp_rank = rank, replica = %hello.replica, step = adm.welcome.start_step, "client joined");
    let kick = adm.kick.clone();
    drop(adm);
    loop {
        let frame = tokio::select! {
            f = read_frame(&mut stream, &mut buf) => f,
            _ = kick.notified() => {
                let f = hub.failure(&job, rank, peer);
                say(&mut stream, kind::ERROR, f.code, &f.message).await;
                break;
            }
            _ = stopped(&mut shutdown) => {
                say(&mut stream, kind::ERROR, Code::Shutdown, "the daemon is stopping; resume from your last cursor blob").await;
                break;
            }
        };
        match frame {
            Ok(Some(Frame::Release(upto))) => {
                if let Err(e) = hub.release(&job, rank, peer, upto) {
                    warn!(?pid, job = %job, dp_rank = rank, "protocol error: {e}; closing");
                    say(&mut stream, kind::ERROR, Code::Protocol, &e.to_string()).await;
                    break;
                }
            }
            Ok(Some(Frame::Bye)) | Ok(None) => break,
            Ok(Some(Frame::Hello(_))) | Ok(Some(Frame::Control(_))) => {
                let m = "HELLO or CONTROL on a trainer connection";
                warn!(?pid, job = %job, dp_rank = rank, "protocol error: {m}; closing");
                say(&mut stream, kind::ERROR, Code::Protocol, m).await;
                break;
            }
            Err(m) => {
                warn!(?pid, job = %job, dp_rank = rank, "protocol error: {m}; closing");
                say(&mut stream, kind::ERROR, Code::Protocol, &m).await;
                break;
            }
        }
    }
    hub.leave(&job, rank, peer);
    info!(?pid, job = %job, dp_rank = rank, replica = %hello.replica, "client left");
}

/// A control client: one CONTROL_REPLY per CONTROL, in order, until it closes. A request
/// that is not valid JSON gets an `ok: false` reply; a frame that breaks the framing
/// closes the connection with ERROR.
async fn control_connection(
    d: Arc<Daemon>,
    mut stream: UnixStream,
    mut buf: Vec<u8>,
    first: Vec<u8>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let mut next = Some(first);
    let idle = Duration::from_millis(d.serve.control_idle_timeout_ms);
    loop {
        let payload = match next.take() {
            Some(p) => p,
            None => {
                let frame = tokio::select! {
                    f = read_frame(&mut stream, &mut buf) => f,
                    _ = stopped(&mut shutdown) => return,
                    // An idle control connection holds an fd and a place under the cap:
                    // 19,985 idle `status` connections once used up the fd limit.
                    _ = tokio::time::sleep(idle) => {
                        let m = format!(
                            "no request for {} ms ([serve] control_idle_timeout_ms); closing",
                            idle.as_millis()
                        );
                        say(&mut stream, kind::ERROR, Code::Idle, &m).await;
                        return;
                    }
                };
                match frame {
                    Ok(Some(Frame::Control(p))) => p,
                    Ok(Some(Frame::Bye)) | Ok(None) => return,
                    Ok(Some(other)) => {
                        let m = format!("expected CONTROL on a control connection, got {other:?}");
                        say(&mut stream, kind::ERROR, Code::Protocol, &m).await;
                        return;
                    }
                    Err(m) => {
                        say(&mut stream, kind::ERROR, Code::Protocol, &m).await;
                        return;
                    }
                }
            }
        };
        // Changes restore planners and reloads read files: off the I/O threads.
        let d2 = d.clone();
        let reply = match tokio::task::spawn_blocking(move || d2.control(&payload)).await {
            Ok(r) => r,
            Err(e) => {
                serde_json::json!({"ok": false, "op": "", "code": Code::Busy, "message": format!("internal error: {e}")})
            }
        };
        let mut bytes = reply.to_string().into_bytes();
        if bytes.len() + 1 > frame::MAX_FRAME {
            bytes = serde_json::json!({"ok": false, "op": reply["op"], "code": Code::Busy,
                "message": "the reply exceeds one frame; ask for less (journal)"})
            .to_string()
            .into_bytes();
        }
        if stream
            .write_all(&frame::encode(kind::CONTROL_REPLY, &bytes))
            .await
            .is_err()
        {
            return;
        }
    }
}

/// Resolves once the daemon says every connection must close.
async fn stopped(rx: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

/// Sends WELCOME with the fds on its first byte, then whatever the first sendmsg did not
/// take.
async fn send_welcome(stream: &mut UnixStream, frame: &[u8], fds: &[i32]) -> std::io::Result<()> {
    let sent = loop {
        stream.writable().await?;
        match stream.try_io(tokio::io::Interest::WRITABLE, || {
            frame::send_with_fds(stream.as_raw_fd(), frame, fds)
        }) {
            Ok(n) => break n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    };
    stream.write_all(&frame[sent..]).await
}
