//! Connections: the socket (bind, a stale socket cleared), the accept loop, and one task
//! per connection, a trainer (HELLO, WELCOME with fds, RELEASE frames until it leaves;
//! with a release page those are only wake-ups) or
//! a control client (CONTROL requests, one reply each).
//!
//! Everything here only moves small frames: admission runs on the blocking pool and
//! token copies on the hub's threads, so no socket waits for a copy.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio::io::AsyncWriteExt;
use tokio::net::{UnixListener, UnixStream};
use tracing::{error, info, warn};

use super::{access, hub, limits, Daemon};
use crate::wire::frame::{self, kind, Frame};
use crate::wire::protocol::{self, Code, Hello};

/// Accepts connections, one task each, until the daemon drops this future (it never
/// ends by itself). A failed accept (EMFILE, ENFILE) pauses accepting with a growing
/// backoff instead of ending it, so the clients already served keep their data.
pub(super) async fn accept_loop(
    d: Arc<Daemon>,
    listener: &UnixListener,
    timeout: Duration,
    shutdown: tokio::sync::watch::Receiver<bool>,
) -> std::convert::Infallible {
    let mut flush_tick = tokio::time::interval(Duration::from_secs(10));
    flush_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut pause = limits::AcceptPause::default();
    loop {
        tokio::select! {
            accepted = listener.accept(), if pause.accepting() => match accepted {
                Ok((stream, _)) => {
                    pause.accepted();
                    let (d, shutdown) = (d.clone(), shutdown.clone());
                    tokio::spawn(async move { connection(d, stream, timeout, shutdown).await });
                }
                Err(e) => {
                    // EMFILE, ENFILE, ENOBUFS: keep serving the clients we have; accept
                    // again once connections closed (or the pause ran out).
                    let paused = pause.failed();
                    if let Some(k) = d.warn_accept.allow() {
                        warn!(
                            fd_limit = d.fd_limit.soft,
                            open_fds = ?limits::open_fds(),
                            "accept failed: {e}; pausing accepts for {} ms{}",
                            paused.as_millis(),
                            limits::suppressed_note(k)
                        );
                    }
                }
            },
            _ = pause.over() => pause.resume(),
            _ = flush_tick.tick() => {
                d.warn_conn.flush();
                d.warn_control.flush();
                d.warn_accept.flush();
            }
        }
    }
}

pub(super) async fn bind(path: &Path, group: Option<&str>) -> Result<UnixListener> {
    if let Some(dir) = path.parent() {
        if !dir.as_os_str().is_empty() {
            let existed = std::fs::symlink_metadata(dir).is_ok();
            let fallback = crate::config::serve::default_socket_for(None, crate::sys::euid());
            create_socket_dir(dir, fallback.parent() == Some(dir))
                .with_context(|| format!("creating the socket directory {}", dir.display()))?;
            check_private_dir(dir, !existed)?;
        }
    }
    remove_stale_socket(path).await?;
    // Bound under a name of its own and linked into place once its mode and group are
    // set (access::place_socket): a client of another uid that connected to a socket
    // bound in place before its chmod (a trainer retrying while the daemon restarts) got
    // EACCES, which no client retries.
    if let Some(staged) = access::staging_path(path) {
        access::remove_own_socket(&staged).map_err(|e| anyhow::anyhow!("{e}"))?;
        let listener =
            UnixListener::bind(&staged).with_context(|| format!("binding {}", staged.display()))?;
        let e = match access::place_socket(&staged, path, group) {
            Ok(_) => return Ok(listener),
            Err(e) => e,
        };
        drop(listener);
        let _ = std::fs::remove_file(&staged);
        match e {
            // A filesystem without links for sockets: bound in place, as below.
            access::AccessError::Link { .. } => info!("{e}; binding the socket in place"),
            e => return Err(anyhow::anyhow!("{e}")),
        }
    } else {
        info!(
            "{}: a hidden staging name beside it would pass the {} bytes of a socket \
             address; binding the socket in place",
            path.display(),
            access::SOCKET_PATH_MAX
        );
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    // A socket whose mode or group could not be set is not left behind: the next start
    // (or `check-config`) must not meet it.
    if let Err(e) = access::secure_socket(path, group) {
        drop(listener);
        let _ = std::fs::remove_file(path);
        return Err(anyhow::anyhow!("{e}"));
    }
    Ok(listener)
}

/// Creates the socket's directory and its parents. A `private` one (the default
/// fallback, `/tmp/millrace-UID`) is made mode 0700 by `mkdir` itself: made with the umask's mode
/// and chmodded after, it stood open for a moment under a umask of 0, long enough for
/// another user to plant an impostor socket in it that outlives the chmod.
fn create_socket_dir(dir: &Path, private: bool) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if !private {
        return std::fs::create_dir_all(dir);
    }
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)?;
    }
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        other => other,
    }
}

/// A socket directory inside a world-writable one (`/tmp/millrace-UID`, the default
/// without `$XDG_RUNTIME_DIR`) could have been made by another user, or be a symlink
/// another user planted: it must be a directory of this user's (not a symlink), and the
/// default one is made mode 0700 (this user owns it, so nobody else keeps a way in). Directories
/// elsewhere (`/run/millrace` from systemd's RuntimeDirectory) are left as they are.
fn check_private_dir(dir: &Path, created: bool) -> Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let in_shared = dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .and_then(|p| std::fs::metadata(p).ok())
        .is_some_and(|m| m.mode() & 0o002 != 0);
    if !in_shared {
        return Ok(());
    }
    let meta = std::fs::symlink_metadata(dir)
        .with_context(|| format!("inspecting the socket directory {}", dir.display()))?;
    if meta.file_type().is_symlink() {
        bail!(
            "socket directory {}: is a symlink inside a world-writable directory; refusing it \
             (remove it, or choose another [serve] socket)",
            dir.display()
        );
    }
    let euid = crate::sys::euid();
    if !meta.is_dir() || meta.uid() != euid {
        bail!(
            "socket directory {}: is owned by uid {}, not this user (uid {euid}), inside a \
             world-writable directory; refusing it (remove it, or choose another [serve] socket)",
            dir.display(),
            meta.uid()
        );
    }
    // The default fallback is private to its user; a directory a config names in /tmp
    // may be shared with trainers on purpose (its group and mode are the operator's).
    let fallback = crate::config::serve::default_socket_for(None, euid);
    if fallback.parent() == Some(dir) && meta.mode() & 0o777 != 0o700 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).with_context(
            || {
                format!(
                    "chmod 0700 the socket directory {}{}",
                    dir.display(),
                    if created { " (just created)" } else { "" }
                )
            },
        )?;
    }
    Ok(())
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

/// Why no frame could be read: the connection is closed with this message (ERROR
/// `protocol`).
#[derive(Debug, thiserror::Error)]
enum ReadError {
    /// The bytes break the framing rules.
    #[error(transparent)]
    Frame(#[from] frame::ProtocolError),
    /// The peer closed the connection with part of a frame sent.
    #[error("connection closed inside a frame ({pending} bytes pending)")]
    Truncated {
        /// Bytes of the unfinished frame.
        pending: usize,
    },
    /// The socket failed.
    #[error("read: {0}")]
    Io(#[from] std::io::Error),
    /// Connections not yet admitted buffer their cap together (refused `busy`).
    #[error(transparent)]
    Full(#[from] limits::PendingFull),
}

/// A connection's share of the bytes that connections before admission may buffer, with
/// the cap they share ([`limits::pending_cap`]).
type Share<'s, 'p> = (&'s mut limits::PendingShare<'p>, usize);

/// Reads frames of at most `max` bytes into `buf` until one is complete; `None` when
/// the peer closed between frames. With a `share`, what `buf` holds is counted in it
/// and may not take it past its cap.
async fn read_frame(
    stream: &mut UnixStream,
    buf: &mut Vec<u8>,
    max: usize,
    mut share: Option<Share<'_, '_>>,
) -> Result<Option<Frame>, ReadError> {
    loop {
        if let Some((frame, n)) = frame::parse_frame(buf, max)? {
            buf.drain(..n);
            return Ok(Some(frame));
        }
        // The chunk is not held across the wait: an idle connection's task is then
        // 4 KiB smaller, and a peer may open as many as the fd limit allows.
        stream.readable().await?;
        let mut chunk = [0u8; 4096];
        let n = match stream.try_read(&mut chunk) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e.into()),
        };
        match n {
            0 if buf.is_empty() => return Ok(None),
            0 => return Err(ReadError::Truncated { pending: buf.len() }),
            n => {
                buf.extend_from_slice(&chunk[..n]);
                // Counted as allocated; a refused growth is freed with the connection.
                if let Some((share, cap)) = share.as_mut() {
                    share.set(limits::CONNECTION_BYTES + buf.capacity(), *cap)?;
                }
            }
        }
    }
}

/// Why [`admit_watching`] cancelled an admission.
enum Cut {
    /// The client hung up (or its socket failed).
    Left,
    /// It sent this many bytes before its WELCOME, more than a frame may hold.
    TooLong(usize),
    /// Its bytes took those of all connections before admission past their cap.
    Full(limits::PendingFull),
}

/// Awaits the admission `task` while watching the client: when it hangs up (or sends
/// more than a frame's worth before its WELCOME, or more than the share of connections
/// before admission allows: `held` bytes of HELLO and `buf`), `cancel` is set, so a seek
/// for a client that is gone stops at its next chunk, and the second value says why.
/// Bytes it sends meanwhile stay in `buf`.
async fn admit_watching<T>(
    stream: &mut UnixStream,
    buf: &mut Vec<u8>,
    (share, cap, held): (&mut limits::PendingShare<'_>, usize, usize),
    task: impl std::future::Future<Output = Result<T, tokio::task::JoinError>>,
    cancel: &std::sync::atomic::AtomicBool,
) -> (Result<T, tokio::task::JoinError>, Option<Cut>) {
    tokio::pin!(task);
    let mut cut = None;
    loop {
        tokio::select! {
            r = &mut task => return (r, cut),
            ready = stream.readable(), if cut.is_none() => {
                let mut chunk = [0u8; 4096];
                cut = match ready.and_then(|()| stream.try_read(&mut chunk)) {
                    Ok(0) => Some(Cut::Left),
                    Ok(n) => {
                        buf.extend_from_slice(&chunk[..n]);
                        if buf.len() > frame::MAX_FRAME + frame::HEADER {
                            Some(Cut::TooLong(buf.len()))
                        } else {
                            share.set(held + buf.capacity(), cap).err().map(Cut::Full)
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => None,
                    Err(_) => Some(Cut::Left),
                };
                if cut.is_some() {
                    cancel.store(true, std::sync::atomic::Ordering::Relaxed);
                }
            }
        }
    }
}

/// Sends a REFUSED or ERROR frame; the connection is closed right after, so a failed
/// write changes nothing. Bounded by [`SAY_TIMEOUT`]: a client that reads nothing while
/// its socket buffer is full must not hold the task (and its fd) forever.
/// A REFUSED frame is counted per code (STATUS `refused_by_code`, /metrics).
async fn say(stream: &mut UnixStream, kind: u8, code: Code, message: &str) {
    if kind == kind::REFUSED {
        let mut n = REFUSED.lock().unwrap_or_else(|p| p.into_inner());
        *n.entry(code.as_str()).or_insert(0) += 1;
    }
    let bytes = frame::encode(kind, &protocol::reason(code, message));
    let _ = tokio::time::timeout(SAY_TIMEOUT, stream.write_all(&bytes)).await;
}

/// Connections refused since start, per REFUSED code: the refusals are otherwise in
/// the (rate-limited) log only.
static REFUSED: std::sync::Mutex<BTreeMap<&'static str, u64>> =
    std::sync::Mutex::new(BTreeMap::new());

/// Connections refused since start, per code, for STATUS.
pub(super) fn refusals() -> BTreeMap<String, u64> {
    let n = REFUSED.lock().unwrap_or_else(|p| p.into_inner());
    n.iter().map(|(k, v)| (k.to_string(), *v)).collect()
}

/// How long a last REFUSED or ERROR frame may take to write.
const SAY_TIMEOUT: Duration = Duration::from_secs(5);

/// The most a refused client's unread bytes are read away before closing (see
/// [`connection`]): a client that keeps writing cannot keep an I/O thread draining.
const REFUSED_DRAIN: usize = 16 * 4096;

/// Reads away (at most [`REFUSED_DRAIN`] bytes of) what a refused client already sent,
/// without waiting: closing then does not reset the connection before it reads the
/// refusal, and a client whose HELLO write fails after this reads the queued REFUSED
/// (src/client/, src/control.rs).
fn read_away(stream: &UnixStream) {
    let mut sink = [0u8; 4096];
    let mut drained = 0;
    while drained < REFUSED_DRAIN {
        match stream.try_read(&mut sink) {
            Ok(n) if n > 0 => drained += n,
            _ => break,
        }
    }
}

/// Refuses a connection whose bytes would take those of all connections before
/// admission past their cap (REFUSED `busy`, which clients retry), and closes it.
/// `when` says at which point, for the log ("before its first frame").
async fn refuse_full(
    d: &Daemon,
    stream: &mut UnixStream,
    pid: Option<i32>,
    e: limits::PendingFull,
    when: &str,
) {
    d.warn_peer(pid, format_args!("refused {when}: {e}"));
    say(stream, kind::REFUSED, Code::Busy, &e.to_string()).await;
    read_away(stream);
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
    let uid = cred.map(|c| c.uid());
    // What this peer's uid may hold of each cap; charged from its first byte on.
    let uid_share = limits::UidShare::of_peer(uid, d.serve.uid_share_percent, d.policy.daemon_uid);
    if !d.policy.open() {
        let verdict = match cred {
            Some(c) => d.policy.authorized(c.uid(), c.gid()),
            None => Err(access::Denied::NoCredentials),
        };
        if let Err(e) = verdict {
            d.warn_peer(pid, format_args!("refused: {e}"));
            say(&mut stream, kind::REFUSED, Code::Access, &e.to_string()).await;
            // Closed at once: lingering for the client (as before) let a denied uid hold
            // an fd per connect.
            read_away(&stream);
            return;
        }
    }
    let mut buf = Vec::new();
    // A HELLO carries a cursor blob, and a blob grows with the plan's domains. What
    // connections buffer until they are admitted is bounded across them all: each may
    // send up to the request limit, and their count only by the fd limit.
    let limit = d.hub.request_limit();
    let cap = limits::pending_cap(limit);
    let mut share = limits::PENDING.share(uid_share);
    if let Err(e) = share.set(limits::CONNECTION_BYTES, cap) {
        refuse_full(&d, &mut stream, pid, e, "before its first frame").await;
        return;
    }
    let first = read_frame(&mut stream, &mut buf, limit, Some((&mut share, cap)));
    let hello = match tokio::time::timeout(timeout, first).await {
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
            let slot = match d.control.take(uid_share) {
                Ok(slot) => slot,
                Err(e) => {
                    d.warn_peer(pid, format_args!("refused a control connection: {e}"));
                    say(&mut stream, kind::REFUSED, Code::Busy, &e.to_string()).await;
                    return;
                }
            };
            drop(share);
            control_connection(d, stream, buf, p, uid, shutdown).await;
            drop(slot);
            return;
        }
        Ok(Ok(None)) => return,
        Ok(Err(ReadError::Full(e))) => {
            refuse_full(&d, &mut stream, pid, e, "before its first frame").await;
            return;
        }
        Ok(Ok(Some(other))) => {
            let m = format!("expected HELLO or CONTROL first, got {other}");
            d.warn_peer(pid, format_args!("{m}; closing"));
            say(&mut stream, kind::ERROR, Code::Protocol, &m).await;
            return;
        }
        Ok(Err(e)) => {
            let mut m = e.to_string();
            if let ReadError::Frame(frame::ProtocolError::Length { len, .. }) = e {
                if len > 0 && len <= frame::MAX_JSON_FRAME as u64 {
                    m.push_str(
                        ": longer than a HELLO carrying this plan's largest cursor blob \
                         (a blob of a plan with more domains does not resume here)",
                    );
                }
            }
            d.warn_peer(
                pid,
                format_args!("protocol error before HELLO: {m}; closing"),
            );
            say(&mut stream, kind::ERROR, Code::Protocol, &m).await;
            return;
        }
    };
    let hub = d.hub.clone();
    // Until admission ends this connection holds its HELLO (parsed, the raw bytes
    // dropped) and what it sends meanwhile: still counted in its share.
    let parsed = Hello::parse(&hello);
    let held = limits::CONNECTION_BYTES + hello.len();
    drop(hello);
    buf.shrink_to_fit();
    share.set(held + buf.capacity(), cap).ok();
    let hello = match parsed {
        Ok(h) => h,
        Err(r) => {
            d.warn_peer(pid, format_args!("refused: {}", r.log_line()));
            say(&mut stream, kind::REFUSED, r.code, &r.message).await;
            return;
        }
    };
    // Restoring or seeking a planner is CPU work: keep it off the I/O threads, and stop
    // it if the client hangs up meanwhile. At most `admission_slots` run at once (a
    // seek holds tens to hundreds of MB, and a job's start sends every rank's HELLO
    // together); the others wait here, holding no thread, and one whose client left
    // while it waited never starts. Seeks (no blob, a start step past 0 that its
    // rank's ring does not cover) take `seek_slots` of them, and the rest are for the
    // others: a far seek runs for hours, and a job resuming from its blobs or starting
    // afresh must not wait for it. A seek another admission is running, once done,
    // needs no seek slot: its result is copied.
    let cancel = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let task = {
        let (hub, hello, cancel) = (hub.clone(), hello.clone(), cancel.clone());
        let (slots, seeks, flights) = (d.admissions.clone(), d.seeks.clone(), d.flights.clone());
        // A blob's live changes change the plan: only a uid that may change it brings them.
        let no_control = d.policy.may_change(uid).err();
        async move {
            let left = || {
                Ok(Err(crate::wire::Refusal::new(
                    Code::Cancelled,
                    "the client left",
                )))
            };
            let mut ticket: Option<Arc<hub::SeekTicket>>;
            loop {
                // Taken anew each time (the plan may have changed), the new one before
                // the old goes, so a finished seek's result stays for this admission.
                ticket = hub.seek_ticket(&hello, &flights).map(Arc::new);
                let (slot, may_run) = match ticket.as_deref().map(|t| (t, t.phase())) {
                    Some((_, hub::SeekPhase::Done)) | None => (
                        slots.clone().acquire_owned().await.ok().map(|s| (s, None)),
                        false,
                    ),
                    // Another admission runs it: wait in no slot and no thread, looking
                    // at this client's cancel now and then.
                    Some((t, hub::SeekPhase::Running)) => {
                        tokio::select! {
                            () = t.changed_from(hub::SeekPhase::Running) => {}
                            () = tokio::time::sleep(Duration::from_millis(50)) => {}
                        }
                        if cancel.load(std::sync::atomic::Ordering::Relaxed) {
                            return left();
                        }
                        continue;
                    }
                    // A uid held to a share queues for its part of the seek slots
                    // first: one uid's far seeks must not hold every slot for hours.
                    Some((t, hub::SeekPhase::Idle)) => tokio::select! {
                        s = async {
                            let mine = match uid_share {
                                Some(u) => {
                                    let q = limits::SEEK_QUEUES.of(u, limits::seek_slots());
                                    Some(q.acquire_owned().await.ok()?)
                                }
                                None => None,
                            };
                            Some((seeks.clone().acquire_owned().await.ok()?, mine))
                        } => (s, true),
                        () = t.changed_from(hub::SeekPhase::Idle) => continue,
                        // A client that leaves while queued goes at once (its fd and its
                        // bytes charged before admission with it), not when a permit
                        // comes: its uid's queue may wait hours behind a far seek. The
                        // acquire stays in place, so the queue's order is kept.
                        () = async {
                            while !cancel.load(std::sync::atomic::Ordering::Relaxed) {
                                tokio::time::sleep(Duration::from_millis(50)).await;
                            }
                        } => return left(),
                    },
                };
                if cancel.load(std::sync::atomic::Ordering::Relaxed) {
                    return left();
                }
                let (hub, hello, cancel, held) =
                    (hub.clone(), hello.clone(), cancel.clone(), ticket.clone());
                let peer = hub::PeerCred {
                    pid,
                    uid,
                    share: uid_share,
                    no_control: no_control.clone(),
                };
                let r = tokio::task::spawn_blocking(move || {
                    let _slot = slot;
                    hub.admit(&hello, peer, &cancel, held.as_deref().map(|t| (t, may_run)))
                })
                .await;
                match r {
                    Ok(Err(hub::NotAdmitted::Wait)) => continue,
                    Ok(Err(hub::NotAdmitted::Refused(refusal))) => return Ok(Err(refusal)),
                    Ok(Ok(a)) => return Ok(Ok(a)),
                    Err(e) => return Err(e),
                }
            }
        }
    };
    let (admitted, cut) = admit_watching(
        &mut stream,
        &mut buf,
        (&mut share, cap, held),
        task,
        &cancel,
    )
    .await;
    drop(share);
    if cancel.load(std::sync::atomic::Ordering::Relaxed) {
        if let Ok(Ok(a)) = &admitted {
            hub.leave(&hello.job, hello.dp_rank, a.peer);
        }
        // A client that broke a rule while it waited is told which, as it would be
        // after its WELCOME; one that left is only logged.
        match cut {
            Some(Cut::TooLong(n)) => {
                let m = format!(
                    "{n} bytes sent before WELCOME, more than one frame holds ({} bytes); \
                     a client sends nothing until its WELCOME",
                    frame::MAX_FRAME + frame::HEADER
                );
                d.warn_peer(pid, format_args!("protocol error during admission: {m}; its admission and any seek were cancelled"));
                say(&mut stream, kind::ERROR, Code::Protocol, &m).await;
                read_away(&stream);
            }
            Some(Cut::Full(e)) => {
                refuse_full(&d, &mut stream, pid, e, "while its admission ran").await
            }
            Some(Cut::Left) | None => {
                info!(pid = %PeerPid(pid), job = %hello.job, dp_rank = hello.dp_rank, "client left during admission; its admission and any seek were cancelled");
            }
        }
        return;
    }
    let adm = match admitted {
        Ok(Ok(a)) => a,
        Ok(Err(r)) => {
            if let Some(k) = d.warn_conn.allow() {
                warn!(pid = %PeerPid(pid), job = %hello.job, dp_rank = hello.dp_rank, replica = %hello.replica, "refused: {}{}", r.log_line(), limits::suppressed_note(k));
            }
            say(&mut stream, kind::REFUSED, r.code, &r.message).await;
            return;
        }
        Err(e) => {
            error!(pid = %PeerPid(pid), "admission failed: {e}");
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
            error!(pid = %PeerPid(pid), "encoding WELCOME failed: {e}");
            hub.leave(&job, rank, peer);
            say(&mut stream, kind::REFUSED, Code::Busy, "internal error").await;
            return;
        }
    };
    let mut fds = vec![adm.ring.client_fd().as_fd(), adm.ready.fd().as_fd()];
    fds.extend(adm.page_fd.as_ref().map(|f| f.as_fd()));
    if let Err(e) = send_welcome(&mut stream, &welcome, &fds).await {
        warn!(pid = %PeerPid(pid), "sending WELCOME failed: {e}");
        hub.leave(&job, rank, peer);
        return;
    }
    info!(pid = %PeerPid(pid), job = %job, dp_rank = rank, replica = %hello.replica, step = adm.welcome.start_step, "client joined");
    let kick = adm.kick.clone();
    drop(adm);
    loop {
        let frame = tokio::select! {
            f = read_frame(&mut stream, &mut buf, frame::MAX_FRAME, None) => f,
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
                    warn!(pid = %PeerPid(pid), job = %job, dp_rank = rank, "protocol error: {e}; closing");
                    say(&mut stream, kind::ERROR, Code::Protocol, &e.to_string()).await;
                    break;
                }
            }
            Ok(Some(Frame::Bye)) | Ok(None) => break,
            Ok(Some(Frame::Hello(_))) | Ok(Some(Frame::Control(_))) => {
                let m = "HELLO or CONTROL on a trainer connection";
                warn!(pid = %PeerPid(pid), job = %job, dp_rank = rank, "protocol error: {m}; closing");
                say(&mut stream, kind::ERROR, Code::Protocol, m).await;
                break;
            }
            Err(m) => {
                warn!(pid = %PeerPid(pid), job = %job, dp_rank = rank, "protocol error: {m}; closing");
                say(&mut stream, kind::ERROR, Code::Protocol, &m.to_string()).await;
                break;
            }
        }
    }
    hub.leave(&job, rank, peer);
    info!(pid = %PeerPid(pid), job = %job, dp_rank = rank, replica = %hello.replica, "client left");
}

/// A control client: one CONTROL_REPLY per CONTROL, in order, until it closes. A request
/// that is not valid JSON gets an `ok: false` reply; a frame that breaks the framing
/// closes the connection with ERROR. Its `uid` (SO_PEERCRED) decides whether it may
/// change the plan (`[serve] control_uids`).
async fn control_connection(
    d: Arc<Daemon>,
    mut stream: UnixStream,
    mut buf: Vec<u8>,
    first: Vec<u8>,
    uid: Option<u32>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let mut next = Some(first);
    let idle = Duration::from_millis(d.serve.control_idle_timeout_ms);
    loop {
        let payload = match next.take() {
            Some(p) => p,
            None => {
                let frame = tokio::select! {
                    f = read_frame(&mut stream, &mut buf, d.hub.request_limit(), None) => f,
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
                        let m = format!("expected CONTROL on a control connection, got {other}");
                        say(&mut stream, kind::ERROR, Code::Protocol, &m).await;
                        return;
                    }
                    Err(m) => {
                        say(&mut stream, kind::ERROR, Code::Protocol, &m.to_string()).await;
                        return;
                    }
                }
            }
        };
        // Changes restore planners and reloads read files: off the I/O threads.
        let d2 = d.clone();
        let reply = match tokio::task::spawn_blocking(move || d2.control(&payload, uid)).await {
            Ok(r) => r,
            Err(e) => {
                serde_json::json!({"ok": false, "op": "", "code": Code::Busy, "message": format!("internal error: {e}")})
            }
        };
        let mut bytes = reply.to_string().into_bytes();
        if bytes.len() + 1 > frame::MAX_JSON_FRAME {
            bytes = serde_json::json!({"ok": false, "op": reply["op"], "code": Code::Busy,
                "message": "the reply exceeds one frame; ask for less (journal)"})
            .to_string()
            .into_bytes();
        }
        // A client that stops reading its replies is closed like an idle one: the write
        // would otherwise wait forever, holding the fd and a place under the cap.
        let out = frame::encode(kind::CONTROL_REPLY, &bytes);
        match tokio::time::timeout(idle, stream.write_all(&out)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return,
            Err(_) => {
                warn!(
                    "control client read no reply for {} ms; closing",
                    idle.as_millis()
                );
                return;
            }
        }
    }
}

/// Resolves once the daemon says every connection must close.
async fn stopped(rx: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

/// Sends WELCOME with the fds on its first byte, then whatever the first sendmsg did not
/// take.
async fn send_welcome(
    stream: &mut UnixStream,
    frame: &[u8],
    fds: &[BorrowedFd<'_>],
) -> std::io::Result<()> {
    let sent = loop {
        stream.writable().await?;
        match stream.try_io(tokio::io::Interest::WRITABLE, || {
            frame::send_fds(&*stream, frame, fds)
        }) {
            Ok(n) => break n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    };
    stream.write_all(&frame[sent..]).await
}

/// A peer's pid as a log field: the number, or `?` where the kernel gave none (the
/// `Option` itself printed as `pid=Some(123)`).
pub(super) struct PeerPid(pub(super) Option<i32>);

impl std::fmt::Display for PeerPid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(pid) => write!(f, "{pid}"),
            None => f.write_str("?"),
        }
    }
}

impl Daemon {
    /// Logs a warning about a connection refused or dropped before admission, through
    /// the throttle: a peer can repeat those at will, and the log must not grow with it.
    fn warn_peer(&self, pid: Option<i32>, what: std::fmt::Arguments<'_>) {
        if let Some(k) = self.warn_conn.allow() {
            warn!(pid = %PeerPid(pid), "{what}{}", limits::suppressed_note(k));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Log lines carry a peer's pid as a number, never as Rust's `Some(..)`.
    #[test]
    fn a_peer_pid_logs_as_a_number_or_a_question_mark() {
        assert_eq!(PeerPid(Some(4242)).to_string(), "4242");
        assert_eq!(PeerPid(None).to_string(), "?");
    }

    /// What `read_frame` makes of `sent`, written on a real socket pair whose writing
    /// end is then closed.
    fn read_after(sent: &[u8]) -> Result<Option<Frame>, ReadError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let (mut ours, mut theirs) = UnixStream::pair().unwrap();
            theirs.write_all(sent).await.unwrap();
            drop(theirs);
            let mut buf = Vec::new();
            read_frame(&mut ours, &mut buf, frame::MAX_FRAME, None).await
        })
    }

    /// The ERROR `protocol` text a peer reads is the same as when these errors were
    /// strings: the typed error changed no byte on the wire.
    #[test]
    fn read_errors_say_what_they_said_as_strings() {
        assert_eq!(read_after(&[]).unwrap(), None);
        let bye = frame::encode(kind::BYE, &[]);
        assert_eq!(read_after(&bye).unwrap(), Some(Frame::Bye));
        let error = |sent: &[u8]| read_after(sent).unwrap_err().to_string();
        assert_eq!(
            error(&[0, 0, 0, 0]),
            format!("frame length 0 is outside 1..={}", frame::MAX_FRAME)
        );
        assert_eq!(
            error(&[2, 0, 0, 0, 99, 0]),
            "unknown or unexpected frame type 99"
        );
        assert_eq!(
            error(&[9, 0, 0, 0, kind::RELEASE]),
            "connection closed inside a frame (5 bytes pending)"
        );
    }

    /// The fallback socket directory is private from the `mkdir` on, whatever the umask
    /// left open: before, it was made with the umask's mode (0755 under 022, 0777 under
    /// 0) and chmodded 0700 only after, and another user could plant a socket in it in
    /// between. Directories named by a config are made as before (with the umask's mode:
    /// their group and mode are the operator's).
    #[test]
    fn the_private_socket_directory_is_0700_when_it_is_made() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let private = tmp.path().join("shared/millrace-1000");
        create_socket_dir(&private, true).unwrap();
        let mode = std::fs::metadata(&private).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700, "{mode:o}");
        // Made twice (a restart): fine, and the mode is left as it is.
        create_socket_dir(&private, true).unwrap();
        let named = tmp.path().join("run/millrace");
        create_socket_dir(&named, false).unwrap();
        assert!(named.is_dir());
    }
}
