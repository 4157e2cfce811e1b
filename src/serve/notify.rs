//! The systemd notification protocol (sd_notify(3)) for `millrace serve` under
//! `Type=notify`: READY=1 once the shards are validated and the socket accepts, RELOADING=1
//! and READY=1 around a SIGHUP reload, STOPPING=1 on SIGTERM, STATUS= lines for
//! `systemctl status`, and WATCHDOG=1 pings for `WatchdogSec=`.
//!
//! The `sd-notify` crate formats the messages ([`NotifyState`]); this module sends them to
//! the socket it read from the environment once, at start-up. Nothing later depends on
//! the process environment, and tests aim a notifier at a datagram socket they bound
//! themselves ([`Notifier::with_socket`]) without touching process-wide state. Outside
//! systemd (no `NOTIFY_SOCKET`) every call is a no-op.

use std::ffi::OsStr;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sd_notify::NotifyState;
use tracing::{debug, info, warn};

/// Talks to systemd (or whatever set NOTIFY_SOCKET); every call is a no-op when not under systemd.
#[derive(Debug)]
pub struct Notifier {
    /// Where notifications go; `None` outside systemd.
    target: Option<SocketAddr>,
    /// `NOTIFY_SOCKET` as given, for log lines.
    name: String,
    /// The watchdog timeout (`WATCHDOG_USEC`) when it applies to this process.
    watchdog: Option<Duration>,
    /// Set by a failed send, cleared by a successful one: one warning per outage, not one
    /// per watchdog ping.
    failing: AtomicBool,
}

impl Notifier {
    /// Reads `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID` once, so the daemon never
    /// consults its environment again.
    pub fn from_env() -> Notifier {
        Notifier::from_vars(
            std::env::var_os("NOTIFY_SOCKET").as_deref(),
            std::env::var_os("WATCHDOG_USEC").as_deref(),
            std::env::var_os("WATCHDOG_PID").as_deref(),
            std::process::id(),
        )
    }

    /// A notifier for an explicit socket (a path, or `@name` for an abstract socket), so
    /// tests need not set process-wide environment variables.
    pub fn with_socket(path: impl AsRef<OsStr>, watchdog_usec: Option<u64>) -> Notifier {
        let mut n = Notifier::new(Some(path.as_ref()));
        if n.target.is_some() {
            n.watchdog = watchdog_usec.filter(|&u| u > 0).map(Duration::from_micros);
        }
        n
    }

    /// [`Notifier::from_env`] on given values: `pid` is this process's id, compared with
    /// `WATCHDOG_PID` (a watchdog meant for another process is not ours to feed).
    fn from_vars(
        socket: Option<&OsStr>,
        usec: Option<&OsStr>,
        watchdog_pid: Option<&OsStr>,
        pid: u32,
    ) -> Notifier {
        let mut n = Notifier::new(socket);
        if n.target.is_none() {
            return n;
        }
        let usec = match usec.map(|u| u.to_str().and_then(|s| s.trim().parse::<u64>().ok())) {
            None => return n,
            Some(Some(u)) if u > 0 => u,
            Some(_) => {
                warn!(
                    "WATCHDOG_USEC={:?} is not a positive integer; not sending watchdog pings",
                    usec.unwrap_or_default()
                );
                return n;
            }
        };
        let ours = match watchdog_pid {
            None => true,
            Some(p) => p.to_str().and_then(|s| s.trim().parse::<u32>().ok()) == Some(pid),
        };
        if ours {
            n.watchdog = Some(Duration::from_micros(usec));
        } else {
            debug!("WATCHDOG_PID={watchdog_pid:?} is not this process; no watchdog pings");
        }
        n
    }

    /// The target named by a `NOTIFY_SOCKET` value, or a disabled notifier.
    fn new(socket: Option<&OsStr>) -> Notifier {
        let name = socket
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let target = match socket.map(OsStr::as_bytes) {
            None | Some(b"") => None,
            Some(b) if b[0] == b'@' => SocketAddr::from_abstract_name(&b[1..])
                .map_err(|e| warn!("NOTIFY_SOCKET={name:?}: {e}; not notifying systemd"))
                .ok(),
            Some(b) if b[0] == b'/' => SocketAddr::from_pathname(OsStr::from_bytes(b))
                .map_err(|e| warn!("NOTIFY_SOCKET={name:?}: {e}; not notifying systemd"))
                .ok(),
            Some(_) => {
                // vsock: and relative paths are not for a local service.
                warn!("NOTIFY_SOCKET={name:?} is neither an absolute path nor @abstract; not notifying systemd");
                None
            }
        };
        Notifier {
            target,
            name,
            watchdog: None,
            failing: AtomicBool::new(false),
        }
    }

    /// Whether a service manager is listening, e.g. to skip work only it would see.
    pub fn enabled(&self) -> bool {
        self.target.is_some()
    }

    /// Start-up is done: shards validated and the socket accepting (READY=1 + STATUS=).
    pub fn ready(&self, status: &str) {
        self.send(&[NotifyState::Ready, NotifyState::Status(&one_line(status))]);
    }

    /// A reload began (RELOADING=1 + MONOTONIC_USEC=, which systemd >= 253 requires).
    pub fn reloading(&self) {
        if self.target.is_none() {
            return;
        }
        match NotifyState::monotonic_usec_now() {
            Ok(now) => self.send(&[NotifyState::Reloading, now]),
            Err(e) => {
                warn!("CLOCK_MONOTONIC: {e}; sending RELOADING=1 without MONOTONIC_USEC");
                self.send(&[NotifyState::Reloading]);
            }
        }
    }

    /// A reload ended, applied or refused: serving again (READY=1 + STATUS=).
    pub fn reloaded(&self, status: &str) {
        self.ready(status);
    }

    /// Shutdown began: draining clients (STOPPING=1 + STATUS=).
    pub fn stopping(&self, status: &str) {
        self.send(&[
            NotifyState::Stopping,
            NotifyState::Status(&one_line(status)),
        ]);
    }

    /// A status line for `systemctl status` (STATUS=).
    pub fn status(&self, status: &str) {
        self.send(&[NotifyState::Status(&one_line(status))]);
    }

    /// Tells the watchdog the serving loop is alive (WATCHDOG=1).
    pub fn watchdog(&self) {
        self.send(&[NotifyState::Watchdog]);
    }

    /// How often to call [`Notifier::watchdog`]: half of `WATCHDOG_USEC`, as sd_notify(3)
    /// advises; `None` when no watchdog is set for this process.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog.map(|d| d / 2)
    }

    /// Sends one datagram; a failure is logged, at warn level once per outage, never raised.
    fn send(&self, states: &[NotifyState]) {
        let Some(addr) = &self.target else {
            return;
        };
        let mut msg = String::new();
        for s in states {
            msg.push_str(&s.to_string());
            msg.push('\n');
        }
        let sent = UnixDatagram::unbound().and_then(|sock| sock.send_to_addr(msg.as_bytes(), addr));
        match sent {
            Ok(n) if n == msg.len() => {
                if self.failing.swap(false, Ordering::Relaxed) {
                    info!(socket = %self.name, "notifying systemd works again");
                }
            }
            Ok(n) => self.failed(&format!("short write ({n} of {} bytes)", msg.len())),
            Err(e) => self.failed(&e.to_string()),
        }
    }

    fn failed(&self, why: &str) {
        if self.failing.swap(true, Ordering::Relaxed) {
            debug!(socket = %self.name, "notifying systemd failed again: {why}");
        } else {
            warn!(socket = %self.name, "notifying systemd failed: {why} (further failures are logged at debug level)");
        }
    }
}

/// A STATUS= value on one line: a newline would end the assignment and start another.
fn one_line(s: &str) -> String {
    s.replace(['\n', '\r'], " ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    /// A datagram socket bound in a fresh temp dir, standing in for systemd.
    fn manager() -> (tempfile::TempDir, std::path::PathBuf, UnixDatagram) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let sock = UnixDatagram::bind(&path).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        (dir, path, sock)
    }

    fn recv(sock: &UnixDatagram) -> String {
        let mut buf = [0u8; 4096];
        let n = sock.recv(&mut buf).unwrap();
        String::from_utf8(buf[..n].to_vec()).unwrap()
    }

    fn nothing_pending(sock: &UnixDatagram) -> bool {
        sock.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 64];
        let r = sock.recv(&mut buf);
        sock.set_nonblocking(false).unwrap();
        matches!(r, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
    }

    #[test]
    fn each_call_sends_its_datagram() {
        let (_dir, path, sock) = manager();
        let n = Notifier::with_socket(&path, None);
        assert!(n.enabled());
        n.ready("serving 4 domains");
        assert_eq!(recv(&sock), "READY=1\nSTATUS=serving 4 domains\n");
        n.status("3 clients");
        assert_eq!(recv(&sock), "STATUS=3 clients\n");
        n.watchdog();
        assert_eq!(recv(&sock), "WATCHDOG=1\n");
        n.reloaded("reloaded");
        assert_eq!(recv(&sock), "READY=1\nSTATUS=reloaded\n");
        n.stopping("draining 2 clients");
        assert_eq!(recv(&sock), "STOPPING=1\nSTATUS=draining 2 clients\n");
        assert!(nothing_pending(&sock));
    }

    #[test]
    fn reloading_carries_the_monotonic_clock() {
        let (_dir, path, sock) = manager();
        let n = Notifier::with_socket(&path, None);
        let before = monotonic_usec();
        n.reloading();
        let after = monotonic_usec();
        let msg = recv(&sock);
        let lines: Vec<&str> = msg.lines().collect();
        assert_eq!(lines[0], "RELOADING=1", "{msg:?}");
        let usec: i128 = lines[1]
            .strip_prefix("MONOTONIC_USEC=")
            .unwrap_or_else(|| panic!("{msg:?}"))
            .parse()
            .unwrap();
        assert!(
            before <= usec && usec <= after,
            "{before} <= {usec} <= {after}"
        );
        assert_eq!(lines.len(), 2);
    }

    fn monotonic_usec() -> i128 {
        match NotifyState::monotonic_usec_now().unwrap() {
            NotifyState::MonotonicUsec(u) => u,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_newline_in_a_status_cannot_forge_an_assignment() {
        let (_dir, path, sock) = manager();
        let n = Notifier::with_socket(&path, None);
        n.status("bad\nREADY=1\r\nx");
        assert_eq!(recv(&sock), "STATUS=bad READY=1  x\n");
    }

    #[test]
    fn abstract_sockets_work() {
        let name = format!("millrace-notify-test-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let sock = UnixDatagram::bind_addr(&addr).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let n = Notifier::with_socket(format!("@{name}"), None);
        assert!(n.enabled());
        n.watchdog();
        assert_eq!(recv(&sock), "WATCHDOG=1\n");
    }

    #[test]
    fn without_a_socket_everything_is_a_no_op() {
        let n = Notifier::from_vars(None, Some(OsStr::new("2000000")), None, 1);
        assert!(!n.enabled());
        assert_eq!(n.watchdog_interval(), None);
        n.ready("x");
        n.reloading();
        n.reloaded("x");
        n.stopping("x");
        n.status("x");
        n.watchdog();
        assert!(!n.failing.load(Ordering::Relaxed));
        for bad in ["", "relative/notify", "vsock:2:1234"] {
            assert!(!Notifier::with_socket(bad, Some(1)).enabled(), "{bad:?}");
        }
        let long = format!("/{}", "x".repeat(200));
        assert!(!Notifier::with_socket(long, None).enabled());
    }

    #[test]
    fn watchdog_interval_is_half_the_timeout_when_the_watchdog_is_ours() {
        let s = Some(OsStr::new("/run/systemd/notify"));
        let us = |v: &'static str| Some(OsStr::new(v));
        let iv = |n: Notifier| n.watchdog_interval();
        let half = Some(Duration::from_secs(1));
        assert_eq!(iv(Notifier::from_vars(s, us("2000000"), None, 7)), half);
        assert_eq!(iv(Notifier::from_vars(s, us("2000000"), us("7"), 7)), half);
        assert_eq!(iv(Notifier::from_vars(s, us("2000000"), us("8"), 7)), None);
        assert_eq!(iv(Notifier::from_vars(s, us("2000000"), us("x"), 7)), None);
        assert_eq!(iv(Notifier::from_vars(s, None, None, 7)), None);
        assert_eq!(iv(Notifier::from_vars(s, us("0"), None, 7)), None);
        assert_eq!(iv(Notifier::from_vars(s, us("-5"), None, 7)), None);
        assert_eq!(iv(Notifier::from_vars(s, us("soon"), None, 7)), None);
        // A watchdog with nobody to ping is no watchdog.
        assert_eq!(iv(Notifier::from_vars(None, us("2000000"), None, 7)), None);
        let t = Notifier::with_socket("/run/systemd/notify", Some(30_000_000));
        assert_eq!(t.watchdog_interval(), Some(Duration::from_secs(15)));
        let t = Notifier::with_socket("/run/systemd/notify", None);
        assert_eq!(t.watchdog_interval(), None);
        let t = Notifier::with_socket("/run/systemd/notify", Some(0));
        assert_eq!(t.watchdog_interval(), None);
    }

    /// Collects what a tracing subscriber writes.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn send_failures_warn_once_per_outage_and_never_panic() {
        let (dir, path, sock) = manager();
        let n = Notifier::with_socket(&path, Some(2_000_000));
        let log = Captured::default();
        let writer = log.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_max_level(tracing::Level::INFO)
            .with_ansi(false)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            drop(sock);
            std::fs::remove_file(&path).unwrap();
            for _ in 0..5 {
                n.watchdog();
            }
            n.stopping("x");
            let text = String::from_utf8(log.0.lock().unwrap().clone()).unwrap();
            assert_eq!(text.matches("WARN").count(), 1, "{text}");
            assert!(text.contains("notifying systemd failed"), "{text}");
            // The manager comes back: an info line says so, and the next outage warns again.
            let sock = UnixDatagram::bind(&path).unwrap();
            sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            n.watchdog();
            assert_eq!(recv(&sock), "WATCHDOG=1\n");
            drop(sock);
            std::fs::remove_file(&path).unwrap();
            n.watchdog();
            n.watchdog();
            let text = String::from_utf8(log.0.lock().unwrap().clone()).unwrap();
            assert_eq!(text.matches("WARN").count(), 2, "{text}");
            assert!(text.contains("works again"), "{text}");
        });
        drop(dir);
    }
}
