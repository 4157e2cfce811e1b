//! The `Type=notify` handshake of systemd/millrace.service, with the real `millrace serve`
//! binary and a fake service manager: a unix datagram socket this test binds and names in
//! NOTIFY_SOCKET (sd_notify(3)). It checks what the unit relies on: READY=1 only once the
//! socket accepts, WATCHDOG=1 pings at half of WATCHDOG_USEC, RELOADING=1 (with
//! MONOTONIC_USEC) then READY=1 around SIGHUP, STOPPING=1 and exit 0 on SIGTERM, and no
//! READY=1 from a daemon that cannot start.

mod common;

use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::Serve;

/// WATCHDOG_USEC given to the daemon: it must ping every second.
const WATCHDOG_USEC: u64 = 2_000_000;

/// A small corpus and its config, in a temp dir that lives as long as this value.
struct Fixture {
    corpus: common::Corpus,
    config: PathBuf,
    socket: PathBuf,
    notify: PathBuf,
}

/// Writes a 2-domain corpus and a config with a small geometry (as tests/serve_client.rs).
fn fixture() -> Fixture {
    let corpus = common::corpus(300_000, 2, 11, 100_000);
    let socket = corpus.dir.join("s.sock");
    let serve = format!(
        "socket = {:?}\nring_slots = 2\nmaterialize_threads = 1\n",
        socket.to_str().unwrap()
    );
    Fixture {
        config: common::write_config(&corpus.dir, "test.toml", 128, 4, &[&serve]),
        socket,
        notify: corpus.tmp.path().join("notify.sock"),
        corpus,
    }
}

/// Breaks the magic of one of the corpus's shard indexes; returns its path.
fn break_an_index(dir: &Path) -> PathBuf {
    let idx = glob::glob(&format!("{}/**/*.idx", dir.display()))
        .unwrap()
        .filter_map(Result::ok)
        .next()
        .expect("synth wrote an .idx");
    let mut bytes = std::fs::read(&idx).unwrap();
    bytes[..8].copy_from_slice(b"NOTMAGIC");
    std::fs::write(&idx, bytes).unwrap();
    idx
}

/// The fake service manager: every datagram the daemon sent, in order of arrival.
struct Manager {
    sock: UnixDatagram,
    seen: Vec<(Instant, String)>,
}

impl Manager {
    fn bind(path: &Path) -> Manager {
        let sock = UnixDatagram::bind(path).unwrap();
        Manager {
            sock,
            seen: Vec::new(),
        }
    }

    /// The next datagram within `timeout`, or `None`.
    fn next(&mut self, timeout: Duration) -> Option<String> {
        self.sock
            .set_read_timeout(Some(timeout.max(Duration::from_millis(1))))
            .unwrap();
        let mut buf = [0u8; 4096];
        match self.sock.recv(&mut buf) {
            Ok(n) => {
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                self.seen.push((Instant::now(), msg.clone()));
                Some(msg)
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                None
            }
            Err(e) => panic!("recv on the notify socket: {e}"),
        }
    }

    /// Reads datagrams until one has the assignment `line`, for up to `timeout`; each
    /// datagram before it is passed to `before`.
    fn wait_for(
        &mut self,
        line: &str,
        timeout: Duration,
        mut before: impl FnMut(&str),
    ) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            let msg = self.next(left)?;
            if has(&msg, line) {
                return Some(msg);
            }
            before(&msg);
        }
    }

    fn transcript(&self) -> String {
        let t0 = self.seen.first().map(|s| s.0);
        self.seen
            .iter()
            .map(|(t, m)| {
                let dt = t0.map(|t0| t.duration_since(t0)).unwrap_or_default();
                format!("  +{:.3}s {:?}\n", dt.as_secs_f64(), m)
            })
            .collect()
    }
}

/// Whether a datagram holds the assignment `line` (sd_notify messages are
/// newline-separated `KEY=VALUE`s).
fn has(msg: &str, line: &str) -> bool {
    msg.lines().any(|l| l == line)
}

/// `millrace serve` under the fake manager (NOTIFY_SOCKET, WATCHDOG_USEC), not waited
/// for: the test waits for READY=1 instead.
fn start_daemon(f: &Fixture) -> Serve {
    Serve::spawn(&f.config, &f.corpus.dir.join("serve.log"), |cmd| {
        cmd.arg("--socket")
            .arg(&f.socket)
            .env("NOTIFY_SOCKET", &f.notify)
            .env("WATCHDOG_USEC", WATCHDOG_USEC.to_string())
            .env_remove("WATCHDOG_PID")
            .env("MILLRACE_LOG", "info");
    })
}

#[test]
fn type_notify_handshake_watchdog_reload_and_stop() {
    let f = fixture();
    let mut m = Manager::bind(&f.notify);
    let mut d = start_daemon(&f);
    let why = |m: &Manager, d: &mut Serve, what: &str| {
        format!(
            "{what}\ndaemon exit status: {:?}\ndatagrams received:\n{}daemon log:\n{}",
            d.exited(),
            m.transcript(),
            d.log_text()
        )
    };

    // 1. READY=1, and only once the socket exists and accepts. Polled in short waits so
    // a daemon that dies during start-up fails the test at once.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut ready = None;
    while ready.is_none() && Instant::now() < deadline && d.exited().is_none() {
        ready = m.wait_for("READY=1", Duration::from_millis(250), |msg| {
            assert!(
                !has(msg, "STOPPING=1") && !has(msg, "RELOADING=1"),
                "{msg:?} before READY=1"
            );
        });
    }
    let ready_at = Instant::now();
    assert!(
        ready.is_some(),
        "{}",
        why(&m, &mut d, "no READY=1 within 60 s")
    );
    assert!(
        f.socket.exists(),
        "{}",
        why(&m, &mut d, "READY=1 arrived before the socket file existed")
    );
    assert!(
        UnixStream::connect(&f.socket).is_ok(),
        "{}",
        why(&m, &mut d, "READY=1 arrived before the socket accepted")
    );
    assert!(
        d.exited().is_none(),
        "{}",
        why(&m, &mut d, "exited after READY")
    );

    // 2. Watchdog pings at half of WATCHDOG_USEC: at least 2 within ~3 s of READY.
    let mut pings = 0;
    while ready_at.elapsed() < Duration::from_millis(3200) {
        let left = Duration::from_millis(3200).saturating_sub(ready_at.elapsed());
        match m.next(left) {
            Some(msg) if has(&msg, "WATCHDOG=1") => pings += 1,
            _ => {}
        }
    }
    assert!(
        pings >= 2,
        "{}",
        why(
            &m,
            &mut d,
            &format!("{pings} WATCHDOG=1 within 3.2 s of READY=1 (WATCHDOG_USEC=2000000)")
        )
    );

    // 3. SIGHUP (ExecReload): RELOADING=1 with MONOTONIC_USEC, then READY=1; still serving.
    d.signal(libc::SIGHUP);
    let reloading = m.wait_for("RELOADING=1", Duration::from_secs(10), |_| {});
    assert!(
        reloading.is_some(),
        "{}",
        why(&m, &mut d, "no RELOADING=1 within 10 s of SIGHUP")
    );
    let reloading = reloading.unwrap_or_default();
    let usec = reloading
        .lines()
        .find_map(|l| l.strip_prefix("MONOTONIC_USEC="))
        .and_then(|v| v.parse::<u64>().ok());
    assert!(
        usec.is_some_and(|u| u > 0),
        "{}",
        why(
            &m,
            &mut d,
            "RELOADING=1 without MONOTONIC_USEC (systemd >= 253 fails the reload)"
        )
    );
    let reloaded = m.wait_for("READY=1", Duration::from_secs(10), |msg| {
        assert!(!has(msg, "STOPPING=1"), "{msg:?} during a reload");
    });
    assert!(
        reloaded.is_some(),
        "{}",
        why(&m, &mut d, "no READY=1 within 10 s of RELOADING=1")
    );
    assert!(
        d.exited().is_none() && UnixStream::connect(&f.socket).is_ok(),
        "{}",
        why(&m, &mut d, "not serving after the reload")
    );

    // 4. SIGTERM (systemctl stop): STOPPING=1, then exit 0.
    d.signal(libc::SIGTERM);
    let stopping = m.wait_for("STOPPING=1", Duration::from_secs(10), |_| {});
    assert!(
        stopping.is_some(),
        "{}",
        why(&m, &mut d, "no STOPPING=1 within 10 s of SIGTERM")
    );
    let status = d.wait_exit(Duration::from_secs(15));
    assert!(
        status.is_some_and(|s| s.success()),
        "{}",
        why(
            &m,
            &mut d,
            &format!("after SIGTERM: {status:?}, want exit 0")
        )
    );
}

#[test]
fn a_daemon_that_cannot_start_never_says_ready() {
    let f = fixture();
    // Break one shard's index: start-up validation must fail.
    break_an_index(&f.corpus.dir);
    let mut m = Manager::bind(&f.notify);
    let mut d = start_daemon(&f);
    let status = d.wait_exit(Duration::from_secs(60));
    assert!(
        status.is_some_and(|s| !s.success()),
        "want a non-zero exit, got {status:?}\n{}",
        d.log_text()
    );
    while m.next(Duration::from_millis(200)).is_some() {}
    assert!(
        !m.seen.iter().any(|(_, msg)| has(msg, "READY=1")),
        "READY=1 from a daemon that failed to start:\n{}",
        m.transcript()
    );
    assert!(
        d.log_text().contains("bad magic"),
        "the log names the fault:\n{}",
        d.log_text()
    );
}

/// `millrace check-config --config CONFIG`, run to its end.
fn check(config: &Path) -> std::process::Output {
    common::bin()
        .args(["check-config", "--config"])
        .arg(config)
        .output()
        .expect("millrace runs")
}

/// ExecStartPre: `millrace check-config` passes a good config and prints what it found,
/// and fails, naming the file and the fault, on a broken shard, a bad `[serve]` key, an
/// unknown socket group, a metrics address that is not host:port or is in use, and a
/// skip beyond the step limit.
#[test]
fn check_config_names_the_fault() {
    let f = fixture();
    let out = check(&f.config);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("ok: 2 domains"), "{text}");

    let base = std::fs::read_to_string(&f.config).unwrap();
    for (key, value, want) in [
        ("socket_group", "\"no-such-group-xyz\"", "no-such-group-xyz"),
        ("metrics_addr", "\"localhost\"", "metrics_addr"),
        ("late_changes", "\"later\"", "late_changes"),
        ("watch_interval_ms", "1", "watch_interval_ms"),
    ] {
        let bad = f.corpus.dir.join(format!("bad-{key}.toml"));
        std::fs::write(
            &bad,
            base.replace("[serve]\n", &format!("[serve]\n{key} = {value}\n")),
        )
        .unwrap();
        let out = check(&bad);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{key} = {value} passed");
        assert!(err.contains(want), "{key} = {value}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }

    // A metrics address another process listens on: `serve` would exit 1, so the
    // check fails too, naming the address; and a skip so far that the first client's
    // seek would replay it for hours is refused (it aborted the daemon before the seek
    // was chunked).
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = busy.local_addr().unwrap().to_string();
    let skip = "[[plan.skip]]\nsteps = [0, 1000000000000]\n";
    for (name, text, want) in [
        (
            "bad-busy-metrics.toml",
            base.replace("[serve]\n", &format!("[serve]\nmetrics_addr = {addr:?}\n")),
            format!("metrics_addr \"{addr}\": cannot listen"),
        ),
        (
            "bad-far-skip.toml",
            format!("{base}\n{skip}"),
            "plan.skip[0].steps".to_string(),
        ),
    ] {
        let bad = f.corpus.dir.join(name);
        std::fs::write(&bad, text).unwrap();
        let out = check(&bad);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{name} passed");
        assert!(err.contains(&want), "{name}: {err}");
    }
    drop(busy);

    let idx = break_an_index(&f.corpus.dir);
    let out = check(&f.config);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("bad magic") && err.contains(idx.file_name().unwrap().to_str().unwrap()),
        "{err}"
    );
}

/// The upgrade procedure (docs/OPERATIONS.md, "Upgrade") runs `check-config` while the
/// daemon it is about to restart still serves: the metrics port that daemon holds is no
/// fault, while one another process holds still is. It failed with `cannot listen:
/// Address already in use`, so a config with `metrics_addr` never passed the check.
#[test]
fn check_config_passes_the_metrics_port_of_the_daemon_it_will_replace() {
    let f = fixture();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let base = std::fs::read_to_string(&f.config).unwrap();
    let with =
        |addr: &str| base.replace("[serve]\n", &format!("[serve]\nmetrics_addr = {addr:?}\n"));
    std::fs::write(&f.config, with(&format!("127.0.0.1:{port}"))).unwrap();
    let mut d = Serve::start(&f.config, &f.socket, &f.corpus.dir.join("serve.log"));
    let out = check(&f.config);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let want = format!("in use by the daemon serving {}", f.socket.display());
    assert!(err.contains(&want), "{err}");
    // A port some other process listens on, with the daemon serving: refused as before.
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let other = f.corpus.dir.join("other.toml");
    std::fs::write(&other, with(&busy.local_addr().unwrap().to_string())).unwrap();
    let out = check(&other);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("cannot listen"), "{err}");
    d.signal(libc::SIGTERM);
    assert!(d
        .wait_exit(Duration::from_secs(20))
        .is_some_and(|s| s.success()));
}

/// The `UMask=` of systemd/millrace.service.
fn unit_umask() -> libc::mode_t {
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/systemd/millrace.service"
    ))
    .unwrap();
    let v = unit
        .lines()
        .find_map(|l| l.strip_prefix("UMask="))
        .expect("the unit sets UMask=");
    libc::mode_t::from_str_radix(v.trim(), 8).unwrap()
}

/// Runs `cmd` with the unit's umask, as systemd would.
fn with_unit_umask(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    let mask = unit_umask();
    // SAFETY: umask is async-signal-safe and cannot fail.
    unsafe {
        cmd.pre_exec(move || {
            libc::umask(mask);
            Ok(())
        });
    }
}

/// Under the unit's umask, what the daemon writes to its CacheDirectory (identity cache,
/// plan checkpoints) is not writable by group `millrace`, the trainers' users: with
/// `UMask=0007` those files were 0660 and their directories 0770, so any trainer user
/// could rewrite the identity entries and plant plan checkpoints that every job's
/// seeks then start from. The socket stays 0660 (the daemon sets its mode itself).
#[test]
fn under_the_unit_umask_the_cache_is_not_group_writable() {
    use std::os::unix::fs::PermissionsExt;
    let f = fixture();
    let cache = f.corpus.tmp.path().join("cache");
    let out = {
        let mut cmd = common::bin();
        cmd.args(["plan", "--config"])
            .arg(&f.config)
            .args(["--from", "300", "--steps", "1"])
            .env("CACHE_DIRECTORY", &cache);
        with_unit_umask(&mut cmd);
        cmd.output().unwrap()
    };
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut seen = (0, 0);
    let mut dirs = vec![cache.clone()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let mode = e.metadata().unwrap().permissions().mode() & 0o777;
            assert_eq!(mode & 0o027, 0, "{} is mode {mode:o}", e.path().display());
            if e.file_type().unwrap().is_dir() {
                dirs.push(e.path());
                seen.0 += 1;
            } else {
                seen.1 += 1;
            }
        }
    }
    assert!(
        seen.0 >= 1 && seen.1 >= 2,
        "dirs and files written: {seen:?}"
    );

    let mut d = Serve::spawn(&f.config, &f.corpus.dir.join("serve.log"), |cmd| {
        cmd.arg("--socket")
            .arg(&f.socket)
            .env("CACHE_DIRECTORY", &cache);
        with_unit_umask(cmd);
    });
    d.wait_listening(&f.socket, Duration::from_secs(30));
    let mode = std::fs::metadata(&f.socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660, "socket mode {mode:o}");
}

/// A socket directory `serve` had to create is removed when it stops, and so is every
/// parent it had to create (`new1/new2/d.sock` left `new1` behind); a directory that
/// existed before stays.
#[test]
fn the_socket_directories_serve_made_are_removed_when_it_stops() {
    let corpus = common::corpus(200_000, 2, 7, 50_000);
    let socket = corpus.dir.join("new1/new2/d.sock");
    let config = common::write_config(
        &corpus.dir,
        "nested.toml",
        64,
        4,
        &[&common::serve_toml(&socket, 4, 2)],
    );
    let mut d = common::Serve::start(&config, &socket, &corpus.dir.join("nested.log"));
    d.signal(libc::SIGTERM);
    let status = d.wait_exit(Duration::from_secs(30));
    assert!(status.is_some_and(|s| s.success()), "{}", d.log_text());
    assert!(!corpus.dir.join("new1").exists(), "{}", d.log_text());
    assert!(corpus.dir.join("nested.toml").exists());
}
