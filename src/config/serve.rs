//! The `[serve]` table: the daemon's settings, their defaults and checks, and where its
//! socket goes when none is named (docs/OPERATIONS.md lists every key).
//!
//! Pure settings: `serve` reads them at start-up, `ctl` and the clients read the socket
//! path from them, and `check-config` checks the socket path before `serve` binds it.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::{Config, ConfigError};

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
    /// Plan each job's batches on a thread of its own, outside the hub's lock, instead
    /// of on the copy thread that claims the step (docs/DESIGN.md, "Planning runs on a
    /// thread of its own"): with 2 copy threads (the default) the second no longer
    /// waits for the lock behind a planner (docs/BENCHMARKS.md, "The plan thread by
    /// default"). `false` plans inline, as before.
    #[serde(default = "default_plan_thread")]
    pub plan_thread: bool,
    /// `int32`, `int64` or `shard`.
    #[serde(default = "default_dtype")]
    pub token_dtype: String,
    /// Steps planned ahead of the copies, with their page-cache hints issued.
    #[serde(default = "default_prefetch")]
    pub prefetch_steps: u32,
    /// Hint the kernel about the shards' pages: MADV_HUGEPAGE on the token mappings for
    /// [`Reader::Mmap`]; MADV_RANDOM on shards and MADV_WILLNEED on planned spans for
    /// [`Reader::MmapWillneed`], which `false` makes plain `mmap`. The io_uring readers
    /// never hint.
    #[serde(default = "default_true")]
    pub page_hints: bool,
    /// How compact slots read the shards' token bytes (docs/OPERATIONS.md, "Readers").
    #[serde(default)]
    pub reader: Reader,
    /// Most clients at once.
    #[serde(default = "default_max_clients")]
    pub max_clients: usize,
    /// Most bytes all rings together may take; unset: a quarter of the machine's memory
    /// or the unit's cgroup limit, whichever is smaller ([`crate::serve::budget::default_ring_budget`]).
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
    /// The percent of each of the daemon's caps (`max_clients`, `max_control_connections`,
    /// the bytes buffered before admission, `ring_memory_bytes`) one uid may hold, so
    /// that one user cannot refuse every other user's trainers on a node users share; the
    /// daemon's own uid and root are not held to it. 100, the default, turns it off: on a
    /// node of one trainer user a share would only take part of every cap from it.
    #[serde(default = "default_uid_share")]
    pub uid_share_percent: u32,
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
    /// uids that may change the plan over control connections (`set_weights`,
    /// `set_stage`, `reload`) besides the daemon's own and root, so that on a node users
    /// share the trainers may read `status` and the journal without steering the run;
    /// unset (the default), every peer that may connect may change it.
    #[serde(default)]
    pub control_uids: Option<Vec<u32>>,
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
    /// Tokens per dp rank per step that every ring's slots are sized for at least, so a
    /// stage added later by a live change (`millrace ctl set-stage`) fits the rings
    /// already streaming; 0 (default): slots fit the config's stages only.
    #[serde(default)]
    pub stage_reserve_tokens: u64,
    /// Interrupt coalescing for slot wakes: a publish that leaves its ring fillable may
    /// hold its consumer's wake back this many microseconds at most, so that one wake
    /// finds two slots ready (docs/DESIGN.md, "Coalesced wakes"); 0 wakes at every
    /// publish (the lowest latency, the most wake-ups).
    #[serde(default = "default_wake_coalesce")]
    pub wake_coalesce_us: u64,
    /// One-point live mixture changes (`ctl set-weights`, a file or SIGHUP reload) every
    /// cursor blob has room for, at any number of domains. Each costs 8 bytes per domain
    /// in every slot's cursor field; a run whose mixture a controller moves every few
    /// hundred steps raises it (docs/OPERATIONS.md, "Limits of live changes").
    #[serde(default = "default_live_changes")]
    pub live_changes: u32,
    /// Seconds a slot fill, a seek or a read under the hub's lock may take before the
    /// stuck-fill watchdog names it (log, STATUS `stuck_fills`, `millrace_stuck_fills`):
    /// a read hung on a network filesystem. A warm copy takes milliseconds; a shard on
    /// a slow disk, or a seek of a long run, may need a larger bound.
    #[serde(default = "default_stuck_fill")]
    pub stuck_fill_seconds: u64,
}

/// Most `[serve] stuck_fill_seconds`: a day, past which the watchdog would never speak.
pub const MAX_STUCK_FILL_SECONDS: u64 = 86_400;

/// Most `[serve] wake_coalesce_us`: 100 ms, beyond which a held-back wake would be a
/// stall rather than a batching of wake-ups.
pub const MAX_WAKE_COALESCE_US: u64 = 100_000;

/// Most bytes of every cursor blob `[serve] live_changes` may reserve: with the rest of
/// the blob, twice that (as hex) stays within a HELLO frame (`wire::MAX_JSON_FRAME`).
pub const MAX_LIVE_CHANGE_BYTES: usize = 16 << 20;

/// Most `[serve] stage_reserve_tokens`: 2^32 tokens per dp rank per step, a slot of
/// several GiB, beyond anything a trainer's step holds.
pub const MAX_STAGE_RESERVE: u64 = 1 << 32;

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

/// `[serve] reader`: how a compact slot whose dtype is the shards' gets their bytes.
/// Expanded slots and dtype conversions always copy from the mappings; so does every
/// reader where io_uring is unavailable (the daemon logs why, once, at start).
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Reader {
    /// Chosen at start by the corpus's size against the memory the page cache can count
    /// on: `mmap` when it fits, `uring-direct` when it does not (docs/DESIGN.md, "Page
    /// cache", has the measurements).
    #[default]
    Auto,
    /// Copy from the mappings, advised MADV_HUGEPAGE (with `page_hints`): a fault reads
    /// a 2 MiB folio that one page-table entry maps.
    Mmap,
    /// Copy from mappings advised MADV_RANDOM, with MADV_WILLNEED over each planned
    /// step's spans `prefetch_steps` ahead.
    MmapWillneed,
    /// io_uring READs through the page cache, straight into the slot.
    Uring,
    /// io_uring READs with O_DIRECT (no page cache), straight into the slot where the
    /// span is aligned, else through aligned bounce buffers.
    UringDirect,
}

impl Reader {
    /// The name the config uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Reader::Auto => "auto",
            Reader::Mmap => "mmap",
            Reader::MmapWillneed => "mmap-willneed",
            Reader::Uring => "uring",
            Reader::UringDirect => "uring-direct",
        }
    }
}

fn default_stuck_fill() -> u64 {
    crate::serve::fill::STUCK_FILL.as_secs()
}

fn default_live_changes() -> u32 {
    32
}

fn default_wake_coalesce() -> u64 {
    300
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
    let uid = crate::sys::euid();
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

/// The `[serve] socket` of the config file at `path`, read from it alone (the default
/// when it names none), resolved as [`ServeConfig::from_config`] resolves it: what
/// `status`, `top` and `ctl` need to reach a daemon, so that a mistake elsewhere in the
/// file (the one a refused reload names) does not keep the operator from it. `None` when
/// the file does not read as TOML or its socket is not a usable path.
pub fn socket_of_file(path: &Path) -> Option<PathBuf> {
    let bytes = super::Config::read_bytes(path).ok()?;
    let table: toml::Table = toml::from_str(std::str::from_utf8(&bytes).ok()?).ok()?;
    let socket = match table.get("serve").and_then(|s| s.get("socket")) {
        None => return Some(default_socket()),
        Some(v) => PathBuf::from(v.as_str()?),
    };
    if super::path_problem(&socket).is_some() {
        return None;
    }
    let base = (path.parent())
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    Some(base.join(socket))
}

/// Refuses to trust `socket` when it is `uid`'s fallback path
/// (`/tmp/millrace-UID/millrace.sock`) and its directory is not that user's own (or is a
/// symlink): `/tmp` is world-writable, so another user could make `millrace-UID` before
/// this user's daemon and listen there, and a client would stream that user's data (the
/// daemon itself refuses such a directory, so the real one never starts). Other paths
/// are the operator's choice, and a missing directory is left to the connect to report.
pub fn check_fallback_socket_dir(socket: &Path, uid: u32) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let fallback = default_socket_for(None, uid);
    let Some(dir) = fallback.parent().filter(|d| socket.parent() == Some(*d)) else {
        return Ok(());
    };
    match std::fs::symlink_metadata(dir) {
        Ok(m) if m.file_type().is_symlink() || m.uid() != uid => Err(format!(
            "{} is {}, not this user's (uid {uid}), in world-writable /tmp: another user may \
             be impersonating the daemon there; refusing to connect (remove it, or set \
             $XDG_RUNTIME_DIR or the socket path)",
            dir.display(),
            if m.file_type().is_symlink() {
                "a symlink".to_string()
            } else {
                format!("owned by uid {}", m.uid())
            }
        )),
        _ => Ok(()),
    }
}

/// Why a socket cannot be bound in `dir` though the directory is writable (a
/// filesystem that takes no sockets, such as sysfs: `bind` fails with EPERM), found by
/// binding a probe socket there and removing it. `None` when it binds, or when the
/// probe's name would not fit a socket address (nothing is known then).
fn bind_problem(dir: &Path) -> Option<String> {
    use std::os::unix::ffi::OsStrExt;
    let probe = dir.join(format!(".millrace-probe.{:x}", std::process::id()));
    if probe.as_os_str().as_bytes().len() > 107 {
        return None;
    }
    let _ = std::fs::remove_file(&probe);
    match std::os::unix::net::UnixListener::bind(&probe) {
        Ok(listener) => {
            drop(listener);
            let _ = std::fs::remove_file(&probe);
            None
        }
        Err(e) => Some(format!("cannot bind a socket in {}: {e}", dir.display())),
    }
}

/// Why `serve` could not bind `socket` as this user, found without binding it (but for a
/// probe socket beside it, removed at once: [`bind_problem`]), so that
/// `check-config` fails exactly where `serve` would: the path is too long for a unix
/// socket, something other than a socket is there already, or its directory cannot be
/// created or written.
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
    // No path the kernel takes holds a NUL; one ending in '/' names a directory.
    let bytes = socket.as_os_str().as_bytes();
    if bytes.contains(&0) {
        return Some(format!(
            "socket path {:?} contains a NUL byte",
            socket.as_os_str()
        ));
    }
    if bytes.ends_with(b"/") {
        return Some(format!(
            "socket path {} ends with '/', which names a directory, not a socket",
            socket.display()
        ));
    }
    // serve removes only a stale socket there; anything else it refuses to bind over.
    if let Ok(meta) = std::fs::symlink_metadata(socket) {
        use std::os::unix::fs::FileTypeExt;
        let ft = meta.file_type();
        if !ft.is_socket() {
            return Some(format!(
                "socket path {} exists and is {}, not a socket; serve would not replace it \
                 (choose another [serve] socket or --socket, or remove it yourself)",
                socket.display(),
                crate::corpus::file_kind(&ft)
            ));
        }
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
    let uid = crate::sys::euid();
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
    let writable = crate::sys::can_write_dir(existing);
    if writable {
        return (existing == dir).then(|| bind_problem(dir)).flatten();
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
fn default_plan_thread() -> bool {
    true
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
/// The most clients `[serve] max_clients` may allow (each costs a few fds).
pub const MAX_CLIENTS: usize = 1_048_576;

fn default_max_clients() -> usize {
    512
}
fn default_uid_share() -> u32 {
    100
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
    pub fn from_config(cfg: &Config) -> Result<ServeConfig, ConfigError> {
        /// `[serve]` alone, read from the text for the position of a mistake.
        #[derive(Deserialize)]
        struct ServeOnly {
            #[allow(dead_code)]
            serve: ServeConfig,
        }
        let table = cfg.serve.clone().unwrap_or_default();
        let mut s: ServeConfig =
            toml::Value::Table(table)
                .try_into()
                .map_err(|e: toml::de::Error| ConfigError::Parse {
                    path: cfg.source.clone(),
                    message: format!(
                        "[serve]: {}{}",
                        super::plan::one_line(&e.to_string()),
                        cfg.position_of::<ServeOnly>()
                    ),
                })?;
        let bad = |field: &str, what: &str| -> Result<ServeConfig, ConfigError> {
            Err(ConfigError::Invalid {
                path: cfg.source.clone(),
                field: format!("[serve] {field}"),
                what: what.to_string(),
            })
        };
        if let Some(what) = super::path_problem(&s.socket) {
            return bad("socket", &what);
        }
        s.socket = cfg.resolve_path(&s.socket);
        if !(2..=1024).contains(&s.ring_slots) {
            return bad("ring_slots", "must be 2..=1024");
        }
        if !(1..=256).contains(&s.materialize_threads) {
            return bad("materialize_threads", "must be 1..=256");
        }
        if s.prefetch_steps > 1024 {
            return bad("prefetch_steps", "must be at most 1024");
        }
        if !(1..=MAX_CLIENTS).contains(&s.max_clients) {
            return bad("max_clients", &format!("must be 1..={MAX_CLIENTS}"));
        }
        if !(100..=600_000).contains(&s.handshake_timeout_ms) {
            return bad("handshake_timeout_ms", "must be 100..=600000 (ten minutes)");
        }
        if !(1..=65_536).contains(&s.max_control_connections) {
            return bad("max_control_connections", "must be 1..=65536");
        }
        if !(100..=86_400_000).contains(&s.control_idle_timeout_ms) {
            return bad("control_idle_timeout_ms", "must be 100..=86400000 (a day)");
        }
        if !(1..=100).contains(&s.uid_share_percent) {
            return bad(
                "uid_share_percent",
                "must be 1..=100 (100: no share per uid)",
            );
        }
        if s.ring_memory_bytes == Some(0) {
            return bad("ring_memory_bytes", "must be positive");
        }
        if !(50..=3_600_000).contains(&s.watch_interval_ms) {
            return bad("watch_interval_ms", "must be 50..=3600000");
        }
        if s.stage_reserve_tokens > MAX_STAGE_RESERVE {
            return bad(
                "stage_reserve_tokens",
                &format!("must be at most {MAX_STAGE_RESERVE} (tokens per dp rank per step)"),
            );
        }
        if !(1..=crate::plan::journal::MAX_CHANGES as u32).contains(&s.live_changes) {
            return bad(
                "live_changes",
                &format!(
                    "must be 1..={} (the most changes a journal holds)",
                    crate::plan::journal::MAX_CHANGES
                ),
            );
        }
        let domains = cfg.corpus.domains.len();
        let room = s.live_changes as usize * crate::plan::cursor::one_point_change_bytes(domains);
        if room > MAX_LIVE_CHANGE_BYTES {
            return bad(
                "live_changes",
                &format!(
                    "{} changes of {domains} domains take {room} bytes of every cursor blob; \
                     at most {MAX_LIVE_CHANGE_BYTES} (a HELLO carries the blob as hex)",
                    s.live_changes
                ),
            );
        }
        if s.wake_coalesce_us > MAX_WAKE_COALESCE_US {
            return bad(
                "wake_coalesce_us",
                &format!(
                    "must be at most {MAX_WAKE_COALESCE_US} (microseconds; 0 turns coalescing off)"
                ),
            );
        }
        if !(1..=MAX_STUCK_FILL_SECONDS).contains(&s.stuck_fill_seconds) {
            return bad(
                "stuck_fill_seconds",
                &format!("must be 1..={MAX_STUCK_FILL_SECONDS} (seconds; a day at most)"),
            );
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The fallback socket's directory in /tmp must be the user's own: one made by
    /// another user (here: this test's uid, for a uid that is not ours) or a symlink is
    /// refused, naming it; any other path is not judged.
    #[test]
    fn a_fallback_socket_dir_of_another_user_is_refused() {
        let me = crate::sys::euid();
        let other = 4_000_000_000 - (std::process::id() % 1000);
        let sock = default_socket_for(None, other);
        let dir = sock.parent().unwrap();
        let _ = std::fs::remove_dir(dir);
        let _ = std::fs::remove_file(dir);
        assert_eq!(check_fallback_socket_dir(&sock, other), Ok(()), "missing");
        std::fs::create_dir(dir).unwrap();
        let e = check_fallback_socket_dir(&sock, other).unwrap_err();
        assert!(e.contains(&format!("owned by uid {me}")), "{e}");
        assert!(e.contains(&dir.display().to_string()), "{e}");
        std::fs::remove_dir(dir).unwrap();
        std::os::unix::fs::symlink("/tmp", dir).unwrap();
        let e = check_fallback_socket_dir(&sock, other).unwrap_err();
        assert!(e.contains("a symlink"), "{e}");
        std::fs::remove_file(dir).unwrap();
        // Any path that is not a fallback is not judged.
        let tmp = tempfile::tempdir().unwrap();
        assert_eq!(
            check_fallback_socket_dir(&tmp.path().join("s.sock"), other),
            Ok(())
        );
    }
}
