//! The daemon (`millrace serve`): loads the plan, binds the unix socket, admits trainer
//! ranks and streams their slices of every global batch through shared-memory rings.
//!
//! - `load`: what serve reads and checks before it binds; `check-config` stops there.
//! - `connections`: the socket, the accept loop, one task per trainer or control client.
//! - `reload`: live changes from the config file (watcher, SIGHUP) and CONTROL requests.
//! - [`ring`]: the sealed memfd ring of one dp rank and the slot materializer.
//! - [`hub`]: jobs, rings, peers, the materializer threads, and live mixture changes.
//! - [`access`]: the socket's group and the SO_PEERCRED allowlist.
//! - [`notify`]: systemd's Type=notify handshake and watchdog.
//! - [`limits`]: the fd limit, the control-connection cap, rate-limited warnings.
//! - this file: start-up (threads, runtime, metrics exporter), the daemon's shared state,
//!   its signals and ticks, and the drain at shutdown.
//!
//! The `[serve]` table itself is [`crate::config::serve`]; the wire is [`crate::wire`].
//!
//! The tokio runtime only moves small frames; token copies run on the hub's threads, so a
//! connection never waits for a copy and a copy never waits for a socket.

pub mod access;
pub mod budget;
pub mod fill;
pub mod hub;
pub mod limits;
pub mod notify;
pub mod ring;
pub mod uring;

mod connections;
mod exporter;
mod load;
mod reload;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tracing::{info, warn};

use crate::config::serve::{socket_problem, ServeConfig};
use crate::wire::status::{ControlConnections, FdLimitStatus, ReloadOutcome, Status};
use fill::Source;
use hub::{Hub, HubSettings};
use load::load;
pub use load::{check_config, CheckArgs};
use notify::Notifier;
use reload::Running;

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

/// Runs `millrace serve` until SIGTERM or SIGINT.
pub fn run_cli(args: ServeArgs) -> Result<()> {
    let notifier = Arc::new(Notifier::from_env());
    let t0 = std::time::Instant::now();
    // Before the first cache write: past RLIMIT_FSIZE a write fails, it does not kill.
    crate::sys::ignore_file_size_signal();
    // Before anything uses rayon: seeks and stage windows read shard indexes there.
    if let Err(e) = crate::corpus::guard::guard_rayon_pool() {
        warn!("cannot guard rayon's threads ({e}); a shard truncated while a seek reads it will stop the daemon");
    }
    // The runtime and the SIGHUP handler come before the load: a reload sent while the
    // corpus opens (which can take minutes) must not kill the daemon. One that arrives
    // then is kept and runs once the daemon serves (the file is read again then).
    // Blocking threads (reloads, admissions, control requests) are kept once started:
    // tokio panics in `spawn_blocking` when the OS refuses a thread (RLIMIT_NPROC, a
    // cgroup's pids.max) and none is left to queue the work on, which took the daemon
    // down at a SIGHUP once its idle threads had exited. With one started here and none
    // ever exiting, such work waits for a busy thread instead.
    let runtime = start_runtime()?;
    let hup = {
        let _in_runtime = runtime.enter();
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .context("installing the SIGHUP handler")?
    };
    let mut l = load(&args.config, false)?;
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
    // The socket directories this run creates go when it stops (as root, `/run/millrace`
    // would otherwise stay behind), deepest first: every missing ancestor, not only the
    // socket's own directory (`a/new1/new2/s.sock` left `new1` behind). One that
    // existed, like systemd's RuntimeDirectory, stays.
    let made_dirs: Vec<PathBuf> = (l.serve.socket.ancestors().skip(1))
        .take_while(|d| !d.as_os_str().is_empty() && !d.exists())
        .map(Path::to_path_buf)
        .collect();
    for w in l.plan.warnings() {
        warn!("{}: {w}", args.config.display());
    }
    info!(
        fingerprint = %format!("{:032x}", l.plan.fingerprint()),
        domains = l.plan.domain_names().len(),
        shards = l.shards.iter().map(Vec::len).sum::<usize>(),
        ms = t0.elapsed().as_millis() as u64,
        "corpus opened and plan built"
    );
    // Checked in full after READY, on a thread of its own (load::validate_in_background).
    let unchecked = load::Unchecked::of(&l);
    let pad_token = l.plan.config().pad_token;
    let serve = l.serve.clone();
    // One fd per connection and two per ring (memfd, eventfd), plus slack; the io_uring
    // readers' shard files come out of what is left.
    let clients_fds = (serve.max_clients as u64)
        .saturating_mul(3)
        .saturating_add(serve.max_control_connections as u64)
        .saturating_add(256);
    let fd_limit = limits::raise_fd_limit(clients_fds);
    let spare_fds = (fd_limit.soft)
        .saturating_sub(limits::open_fds().unwrap_or(0))
        .saturating_sub(clients_fds);
    let readers =
        fill::Readers::open_within(serve.reader, &l.shards, Some(spare_fds), serve.page_hints);
    let hub = Arc::new(Hub::new(
        l.plan.clone(),
        Source {
            shards: l.shards,
            pad_token,
            vocab_size: l.plan.config().vocab_size,
            readers,
        },
        HubSettings {
            slots: serve.ring_slots,
            prefetch: serve.prefetch_steps,
            token: l.token,
            max_clients: serve.max_clients,
            ring_budget: serve
                .ring_memory_bytes
                .unwrap_or_else(budget::default_ring_budget),
            stage_reserve: serve.stage_reserve_tokens,
            checkpoints: crate::plan_cache::cache_root(&l.cfg),
            wake_coalesce: Duration::from_micros(serve.wake_coalesce_us),
            live_changes: serve.live_changes as usize,
            stuck_fill: Duration::from_secs(serve.stuck_fill_seconds),
        },
    ));
    let daemon = Arc::new(Daemon {
        hub: hub.clone(),
        config: args.config.clone(),
        policy: access::Policy::new(serve.allowed_uids.clone(), serve.allowed_gids.clone())
            .with_control(serve.control_uids.clone()),
        started: Instant::now(),
        notifier: notifier.clone(),
        running: Mutex::new(Running::of(&l.cfg, l.plan.config(), l.hash)),
        pending: Mutex::new(None),
        control: limits::ControlSlots::new(serve.max_control_connections),
        fd_limit,
        warn_conn: limits::Throttle::new("refused connections", 20, Duration::from_secs(10)),
        warn_control: limits::Throttle::new(
            "refused control requests",
            20,
            Duration::from_secs(10),
        ),
        warn_accept: limits::Throttle::new("failed accepts", 5, Duration::from_secs(10)),
        last_reload: Mutex::new(None),
        admissions: Arc::new(tokio::sync::Semaphore::new(
            limits::admission_slots() - limits::seek_slots(),
        )),
        seeks: Arc::new(tokio::sync::Semaphore::new(limits::seek_slots())),
        flights: Arc::default(),
        socket_flag: from_flag,
        exporter: Mutex::default(),
        serve,
    });
    let workers: Vec<_> = (0..daemon.serve.materialize_threads)
        .map(|i| {
            let hub = hub.clone();
            std::thread::Builder::new()
                .name(format!("millrace-copy-{i}"))
                .spawn(move || hub.worker())
        })
        .collect::<std::io::Result<_>>()
        .context("starting materializer threads")?;
    // Plans each job's batches ahead of its rings, outside the hub's lock (`[serve]
    // plan_thread`); without it the copy threads plan under the lock.
    let planner = if daemon.serve.plan_thread {
        let hub = hub.clone();
        let t = std::thread::Builder::new()
            .name("millrace-plan".into())
            .spawn(move || hub.plan_ahead())
            .context("starting the plan thread")?;
        Some(t)
    } else {
        None
    };
    // Names the fills stuck longer than 30 s (a hung network filesystem), off the
    // materializer threads, which such a read blocks.
    let watchdog = {
        let hub = hub.clone();
        std::thread::Builder::new()
            .name("millrace-watch".into())
            .spawn(move || hub.watch_fills())
            .context("starting the stuck-fill watchdog")?
    };
    let result = runtime.block_on(serve_socket(daemon.clone(), unchecked, hup));
    hub.stop();
    // A thread stuck in a read that never returns (a copy, or the planner in a shard
    // index) is left behind: the process exits.
    let mut threads = workers;
    threads.extend(planner);
    hub.join_workers(threads, WORKERS_STOP);
    let _ = watchdog.join();
    runtime.shutdown_timeout(Duration::from_secs(2));
    for dir in made_dirs {
        // remove_dir removes only an empty directory: nothing else there is touched, and
        // a directory something else now holds keeps its ancestors too.
        if std::fs::remove_dir(dir).is_err() {
            break;
        }
    }
    result
}

/// How long the materializer and plan threads have to end after the drain: a copy or a
/// plan takes milliseconds, and one stuck in a read of a hung filesystem never ends.
const WORKERS_STOP: Duration = Duration::from_secs(5);

/// The most blocking threads the runtime keeps. They never exit (see `run_cli`), so a
/// burst of requests must not leave hundreds of idle ones counted against the thread
/// limit they guard against (80 `status` calls at once left 17 more for good, and
/// tokio's default cap is 512): admissions run at most 16 at once (`admission_slots`),
/// and the rest (control requests, reloads, the once-a-second status and shard watch)
/// take milliseconds, so work past this many waits briefly for a thread.
const BLOCKING_THREADS: usize = 48;

/// How long the tokio runtime's threads may take to start before `serve` gives up.
const THREADS_START: Duration = Duration::from_secs(10);

/// Builds the tokio runtime and starts the first of its blocking threads (see
/// `run_cli`), or says why not. tokio panics, rather than fail, when the OS refuses one
/// of its threads (a process at RLIMIT_NPROC or its cgroup's pids.max), and unwinding
/// that panic could wait forever for the threads it had started: the daemon printed a
/// panic and hung instead of exiting. Such a panic now ends the process at once with
/// an error; a refused thread that tokio queued instead ends it when the first blocking
/// task does not run within [`THREADS_START`].
fn start_runtime() -> Result<tokio::runtime::Runtime> {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|info| {
        let msg = (info.payload().downcast_ref::<&str>().map(|s| s.to_string()))
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_default();
        eprintln!("error: starting the tokio runtime: {msg}; {THREAD_LIMIT}");
        std::process::exit(1);
    }));
    let built = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("millrace-io")
        .thread_keep_alive(Duration::MAX)
        .max_blocking_threads(BLOCKING_THREADS)
        .build();
    let first = built.as_ref().ok().map(|runtime| {
        runtime.block_on(async {
            tokio::time::timeout(THREADS_START, tokio::task::spawn_blocking(|| ())).await
        })
    });
    std::panic::set_hook(hook);
    let runtime = built.context("starting the tokio runtime")?;
    match first {
        Some(Ok(Ok(()))) => Ok(runtime),
        Some(Ok(Err(e))) => bail!("starting the tokio runtime: {e}"),
        _ => {
            // Dropping it would wait for the threads it queued.
            std::mem::forget(runtime);
            bail!(
                "starting the tokio runtime: its threads did not start within {} s; {THREAD_LIMIT}",
                THREADS_START.as_secs()
            )
        }
    }
}

/// What a thread the OS refused at start-up means.
const THREAD_LIMIT: &str =
    "the process or its cgroup is at its thread limit (RLIMIT_NPROC, pids.max)";

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
    /// Warnings about changes refused `access` (`[serve] control_uids`): a peer can
    /// repeat those at will too.
    warn_control: limits::Throttle,
    /// Warnings about failed accepts (EMFILE, ENFILE).
    warn_accept: limits::Throttle,
    /// The outcome of the last reload (file, SIGHUP or ctl), for `status` and `top`: a
    /// refused file edit must be seen where people look, not only in the log.
    last_reload: Mutex<Option<ReloadOutcome>>,
    /// Admissions other than seeks running at once (the [`limits::admission_slots`]
    /// that [`limits::seek_slots`] leaves); the rest wait their turn without a thread.
    admissions: Arc<tokio::sync::Semaphore>,
    /// Seeks running at once ([`limits::seek_slots`]): a far one runs for hours, and
    /// must not hold the slots a blob restore or a step-0 start needs.
    seeks: Arc<tokio::sync::Semaphore>,
    /// Seeks in progress, shared by the admissions seeking one plan to one step.
    flights: Arc<hub::SeekFlights>,
    /// The socket path came from `--socket`: a reloaded file's `[serve] socket` is not
    /// the one the next start (with the same flag) binds.
    socket_flag: bool,
    /// What the last export to /metrics saw, to advance its counters.
    exporter: Mutex<exporter::Exporter>,
}

impl Daemon {
    /// Publishes a STATUS to /metrics. The exporter is held while the STATUS is taken, so
    /// two exports that overlap (a slow one) publish their snapshots in order.
    fn export_metrics(&self) {
        let mut e = self.exporter.lock().unwrap_or_else(|p| p.into_inner());
        e.export(&self.process_status(self.hub.status_for_export()));
    }

    /// STATUS (docs/PROTOCOL.md): the hub's figures and the process's own.
    fn status(&self) -> Status {
        self.process_status(self.hub.status())
    }

    /// The hub's STATUS `s` with the process's own fields.
    fn process_status(&self, mut s: Status) -> Status {
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
        s.refused_by_code = connections::refusals();
        s.last_reload = self
            .last_reload
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        s
    }
}

/// The device and inode of the file at `path`, to tell the socket this daemon bound from
/// one another daemon bound there later.
fn socket_identity(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

/// Binds the socket (refusing to steal one a live daemon is serving), sets its mode and
/// group, says READY, and serves until SIGTERM/SIGINT; then drains.
/// `hup` was installed before the load (a SIGHUP then is not lost, and does not kill).
async fn serve_socket(
    d: Arc<Daemon>,
    unchecked: load::Unchecked,
    mut hup: tokio::signal::unix::Signal,
) -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let serve = d.serve.clone();
    let path = serve.socket.clone();
    // Signal handlers before READY: a reload right after start-up must not kill us.
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    if let Some(addr) = &serve.metrics_addr {
        let (listener, handle) = exporter::install(addr)?;
        tokio::spawn(exporter::serve_http(listener, handle.clone()));
        d.exporter.lock().unwrap_or_else(|p| p.into_inner()).handle = Some(handle);
        info!(%addr, "metrics at http://{addr}/metrics");
    }
    let listener = connections::bind(&path, serve.socket_group.as_deref()).await?;
    let bound = socket_identity(&path);
    info!(socket = %path.display(), threads = serve.materialize_threads, slots = serve.ring_slots, "serving");
    d.notifier.ready(&format!("serving {}", path.display()));
    if let Err(e) = load::validate_in_background(unchecked) {
        // Serving stays safe without it: every read checks the document it reads.
        warn!("cannot start the background shard validation: {e}");
    }
    let timeout = Duration::from_millis(serve.handshake_timeout_ms);
    let (shutdown_tx, shutdown) = tokio::sync::watch::channel(false);
    let mut watchdog = d.notifier.watchdog_interval().map(tokio::time::interval);
    let mut watch = tokio::time::interval(Duration::from_millis(serve.watch_interval_ms));
    watch.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut metrics_tick = tokio::time::interval(Duration::from_secs(1));
    metrics_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    {
        // Accepting runs beside the signals and ticks, in this task; leaving the loop
        // drops it, and with it its borrow of the listener, before the drain.
        let accepting = connections::accept_loop(d.clone(), &listener, timeout, shutdown);
        tokio::pin!(accepting);
        loop {
            tokio::select! {
                never = &mut accepting => match never {},
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
                    tokio::task::spawn_blocking(move || d.export_metrics());
                }
                _ = hup.recv() => {
                    info!("SIGHUP: reloading {}", d.config.display());
                    let d = d.clone();
                    tokio::task::spawn_blocking(move || d.sighup());
                }
                _ = term.recv() => { info!("SIGTERM: draining"); break; }
                _ = int.recv() => { info!("SIGINT: draining"); break; }
            }
        }
    }
    d.notifier
        .stopping("draining: clients finish the slots they hold");
    drop(listener);
    // Only the socket this daemon bound: one removed while it served (a tmpfiles
    // cleanup of /run, a hand) may since be another daemon's, started on the same path.
    if bound.is_some() && socket_identity(&path) == bound {
        let _ = std::fs::remove_file(&path);
    } else {
        warn!(
            socket = %path.display(),
            "the socket was removed or replaced while serving; leaving the path as it is"
        );
    }
    d.hub.drain();
    let deadline = Instant::now() + Duration::from_millis(serve.drain_timeout_ms);
    // One look decides and reports: a copy claimed before the drain may still publish
    // after it, so a second look could say "slots still held" of a drain that ended
    // (CI saw that line 77 us after SIGTERM).
    // A second SIGTERM or SIGINT (Ctrl-C twice) ends the wait at once: it was swallowed,
    // and the operator waited the whole bound.
    let mut again = None;
    let drained = loop {
        if d.hub.drained() {
            break true;
        }
        if Instant::now() >= deadline {
            break false;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            _ = term.recv() => { again = Some("SIGTERM"); break false; }
            _ = int.recv() => { again = Some("SIGINT"); break false; }
        }
    };
    match (drained, again) {
        (true, _) => info!("drained: every client released what was published"),
        (false, Some(sig)) => warn!("a second {sig}: closing with slots still held"),
        (false, None) => warn!(
            "drain bound of {} ms reached with slots still held; closing",
            serve.drain_timeout_ms
        ),
    }
    let _ = shutdown_tx.send(true);
    // Let connections say why they close.
    tokio::time::sleep(Duration::from_millis(100)).await;
    Ok(())
}
