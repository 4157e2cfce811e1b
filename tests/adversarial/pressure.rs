//! Adversarial tests: resource pressure (see main.rs). A real `millrace serve` whose
//! cache directory cannot take its writes (the caches are an optimisation, so the
//! daemon must serve on, say so once, and leave no partial file behind), or that can
//! start no more threads.

use std::io::Read;
use std::os::unix::ffi::OsStringExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::common;
use millrace::client::{Client, Hello};
use millrace::util::harness::ChildGuard;

/// A daemon whose output goes through a pipe into memory (a log file would itself be
/// held to the daemon's RLIMIT_FSIZE).
struct Piped {
    guard: ChildGuard,
    log: Arc<Mutex<String>>,
}

impl Piped {
    /// Starts `millrace serve --config <config>`, `tweak` setting up its process, and
    /// waits until `socket` accepts.
    fn start(config: &Path, socket: &Path, tweak: impl FnOnce(&mut Command)) -> Piped {
        let mut cmd = common::bin();
        cmd.args(["serve", "--config"]).arg(config);
        tweak(&mut cmd);
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("millrace serve starts");
        let mut err = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let sink = log.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = err.read(&mut buf) {
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        let mut p = Piped {
            guard: ChildGuard::new(child, "millrace serve"),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while UnixStream::connect(socket).is_err() {
            if let Some(status) = p.guard.try_wait().unwrap() {
                panic!("millrace serve exited ({status}):\n{}", p.log());
            }
            assert!(Instant::now() < deadline, "not listening:\n{}", p.log());
            std::thread::sleep(Duration::from_millis(20));
        }
        p
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Lines of the log that contain `what`.
    fn lines(&self, what: &str) -> usize {
        self.log().lines().filter(|l| l.contains(what)).count()
    }
}

impl Drop for Piped {
    fn drop(&mut self) {
        self.guard.kill();
    }
}

/// Every file under `dir`, at any depth.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                todo.push(e.path());
            } else {
                out.push(e.path());
            }
        }
    }
    out
}

/// Sets the limit `resource` (soft and hard) of the process `cmd` starts to `value`.
pub(super) fn child_rlimit(cmd: &mut Command, resource: libc::__rlimit_resource_t, value: u64) {
    // SAFETY: setrlimit is async-signal-safe and touches only the child.
    unsafe {
        cmd.pre_exec(move || {
            let rl = libc::rlimit {
                rlim_cur: value as libc::rlim_t,
                rlim_max: value as libc::rlim_t,
            };
            if libc::setrlimit(resource, &rl) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Runs the process `cmd` starts in a mount namespace of its own where `dir` (which
/// exists) is a 4 KiB tmpfs already full: every write under it fails with ENOSPC, as on
/// a full disk. Its files are seen from outside under `/proc/<pid>/root`.
fn full_tmpfs_at(cmd: &mut Command, dir: &Path) {
    use std::ffi::CString;
    let target = CString::new(dir.as_os_str().as_encoded_bytes()).unwrap();
    let fill = CString::new(dir.join("fill").as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: only system calls on memory owned by the closure, in the child.
    unsafe {
        cmd.pre_exec(move || {
            common::mount_in_own_namespace(c"tmpfs", &target, Some(c"size=4k"))?;
            let fd = libc::open(fill.as_ptr(), libc::O_WRONLY | libc::O_CREAT, 0o600);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            static ZEROS: [u8; 4096] = [0; 4096];
            while libc::write(fd, ZEROS.as_ptr().cast(), ZEROS.len()) > 0 {}
            libc::close(fd);
            Ok(())
        });
    }
}

/// A 300k-token corpus in 15 shards and a config with 128-token rows, 1024 rows a step
/// (a plan checkpoint is due every 64 plan steps) and `[corpus] cache_dir` set; returns
/// the corpus, the config, the socket and the cache dir (created, empty).
fn cache_fixture() -> (common::Corpus, PathBuf, PathBuf, PathBuf) {
    let corpus = common::corpus(300_000, 2, 21, 20_000);
    let socket = corpus.dir.join("s.sock");
    let serve = common::serve_toml(&socket, 4, 2);
    let config = common::write_config(&corpus.dir, "test.toml", 128, 1024, &[&serve]);
    let cache = corpus.dir.join("cache");
    std::fs::create_dir(&cache).unwrap();
    let mut doc: toml::Table = toml::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    doc["corpus"]
        .as_table_mut()
        .unwrap()
        .insert("cache_dir".into(), cache.to_str().unwrap().into());
    std::fs::write(&config, toml::to_string(&doc).unwrap()).unwrap();
    (corpus, config, socket, cache)
}

/// Cache files whose names say they were being written (`.tmp`) under `dir`.
fn partial_files(dir: &Path) -> Vec<PathBuf> {
    files_under(dir)
        .into_iter()
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().contains(".tmp"))
        })
        .collect()
}

/// A file-size limit smaller than any cache file (a batch scheduler passes the user's
/// `ulimit -f` on). The daemon was killed by SIGXFSZ at its first identity-cache write,
/// before it listened; it must instead start, warn once for all the shards whose entries
/// it cannot write, leave no partial file, and answer. No ring fits such a limit
/// either (a memfd is held to it): trainers are refused `memory`, naming the memfd, not
/// `busy`, which they retried for their whole reconnect timeout.
#[test]
fn a_file_size_limit_costs_the_caches_not_the_daemon() {
    let (_corpus, config, socket, cache) = cache_fixture();
    let mut d = Piped::start(&config, &socket, |cmd| {
        child_rlimit(cmd, libc::RLIMIT_FSIZE, 100)
    });
    let status = millrace::control::request(
        &socket,
        &millrace::control::status_request(),
        Duration::from_secs(20),
    )
    .unwrap_or_else(|e| panic!("status: {e}\n{}", d.log()));
    assert_eq!(status["ok"], true, "{status}");
    let refused = Client::connect(&socket, &Hello::whole_slice(0, 1))
        .err()
        .map(|e| e.to_string());
    // Refused as `memory` (retrying does not help), naming the memfd.
    assert!(
        refused
            .as_deref()
            .is_some_and(|e| e.contains("(memory)") && e.contains("memfd")),
        "{refused:?}"
    );
    assert!(d.guard.try_wait().unwrap().is_none(), "{}", d.log());
    assert_eq!(d.lines("cannot write"), 1, "{}", d.log());
    assert_eq!(partial_files(&cache), Vec::<PathBuf>::new());
}

/// A full cache directory (ENOSPC on every write): the daemon streams as usual, warns
/// once for the identity cache and once for the plan checkpoints, and leaves no partial
/// file. Each failed checkpoint write left its empty temporary file behind, one more at
/// every checkpoint step, never removed; and each client's seek warned again.
#[test]
fn a_full_cache_dir_costs_the_caches_and_leaves_no_partial_file() {
    if common::skip_unless_root("a_full_cache_dir", "mounting a tmpfs") {
        return;
    }
    let (_corpus, config, socket, cache) = cache_fixture();
    let mut d = Piped::start(&config, &socket, |cmd| full_tmpfs_at(cmd, &cache));
    let pid = d.guard.id();
    let seen = PathBuf::from(format!("/proc/{pid}/root")).join(cache.strip_prefix("/").unwrap());
    let mut hello = Hello::whole_slice(0, 1);
    hello.job = "full".into();
    let mut c = Client::connect(&socket, &hello).unwrap_or_else(|e| panic!("connect: {e}"));
    c.set_timeout(Some(Duration::from_secs(60)));
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut steps = 0u64;
    while d.lines("cannot write plan checkpoints") == 0 || steps < 300 {
        c.next_batch()
            .unwrap_or_else(|e| panic!("step {steps}: {e}\n{}", d.log()));
        steps += 1;
        assert!(
            Instant::now() < deadline,
            "no checkpoint write:\n{}",
            d.log()
        );
    }
    // Clients that seek store checkpoints of their own: still the one warning.
    for job in ["seek-a", "seek-b"] {
        let mut hello = Hello::whole_slice(0, 1);
        hello.job = job.into();
        hello.start_step = Some(300);
        let mut s = Client::connect(&socket, &hello).unwrap_or_else(|e| panic!("{job}: {e}"));
        s.set_timeout(Some(Duration::from_secs(60)));
        assert_eq!(
            s.next_batch().map(|b| b.step).ok(),
            Some(300),
            "{}",
            d.log()
        );
    }
    assert!(d.guard.try_wait().unwrap().is_none(), "{}", d.log());
    assert_eq!(d.lines("cannot write plan checkpoints"), 1, "{}", d.log());
    assert_eq!(d.lines("cannot write the identity cache"), 1, "{}", d.log());
    assert!(
        seen.join("fill").is_file(),
        "the daemon's view of {}",
        seen.display()
    );
    assert_eq!(partial_files(&seen), Vec::<PathBuf>::new());
}

/// A pids cgroup of its own under the v1 `pids` hierarchy, removed on drop; `None`
/// where there is none to make (cgroup v2 only, or not root).
struct PidsCgroup(PathBuf);

impl PidsCgroup {
    /// A fresh cgroup for `test`, or `None` (said on stderr) where the test must skip.
    fn for_test(test: &str) -> Option<PidsCgroup> {
        if common::skip_unless_root(test, "a pids cgroup") {
            return None;
        }
        let dir = Path::new("/sys/fs/cgroup/pids").join(format!("{test}-{}", std::process::id()));
        if let Err(e) = std::fs::create_dir(&dir) {
            eprintln!(
                "skipping {test}: no cgroup v1 pids hierarchy to limit the daemon's threads ({e})"
            );
            return None;
        }
        Some(PidsCgroup(dir))
    }

    /// Moves `pid` (every thread of it) in and allows no more tasks than it has now.
    fn hold(&self, pid: u32) {
        std::fs::write(self.0.join("cgroup.procs"), pid.to_string()).unwrap();
        let now = std::fs::read_to_string(self.0.join("pids.current")).unwrap();
        std::fs::write(self.0.join("pids.max"), now.trim()).unwrap();
    }
}

impl Drop for PidsCgroup {
    fn drop(&mut self) {
        // The daemon has been killed and reaped by then (declared after the cgroup).
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// A daemon that can start no more threads (a cgroup's pids.max, RLIMIT_NPROC) once it
/// serves: a SIGHUP made tokio start a blocking thread, the OS refused, and tokio
/// panicked ("OS can't spawn worker thread") in the serving loop, which ended the
/// daemon. It must reload and admit trainers on the threads it has.
#[test]
fn a_daemon_that_can_start_no_thread_reloads_and_admits() {
    let Some(cg) = PidsCgroup::for_test("a_daemon_that_can_start_no_thread") else {
        return;
    };
    let (_corpus, config, socket, _cache) = cache_fixture();
    let d = Piped::start(&config, &socket, |_| {});
    cg.hold(d.guard.id());
    // SAFETY: kill(2) on our own child, not reaped before `d` drops.
    assert_eq!(
        unsafe { libc::kill(d.guard.id() as libc::pid_t, libc::SIGHUP) },
        0
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while d.lines("reload:") == 0 {
        assert!(Instant::now() < deadline, "no reload:\n{}", d.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut hello = Hello::whole_slice(0, 1);
    hello.job = "nproc".into();
    let mut c =
        Client::connect(&socket, &hello).unwrap_or_else(|e| panic!("connect: {e}\n{}", d.log()));
    c.set_timeout(Some(Duration::from_secs(20)));
    for step in 0..20 {
        c.next_batch()
            .unwrap_or_else(|e| panic!("step {step}: {e}\n{}", d.log()));
    }
    let mut d = d;
    assert!(d.guard.try_wait().unwrap().is_none(), "{}", d.log());
    assert!(!d.log().contains("panicked"), "{}", d.log());
}

/// A daemon started where only a few threads are allowed (pids.max from 1 to 12): each
/// start either serves or exits at once with an error; none panics or hangs. tokio
/// panicked when the OS refused one of its threads ("OS can't spawn worker thread"),
/// and at some limits the panic's unwinding waited forever for the threads it had.
#[test]
fn a_start_at_the_thread_limit_exits_with_an_error() {
    let Some(cg) = PidsCgroup::for_test("a_start_at_the_thread_limit") else {
        return;
    };
    let (_corpus, config, socket, _cache) = cache_fixture();
    let procs =
        std::ffi::CString::new(cg.0.join("cgroup.procs").into_os_string().into_vec()).unwrap();
    let mut refused = 0;
    for max in 1..=12 {
        std::fs::write(cg.0.join("pids.max"), max.to_string()).unwrap();
        let log = config.with_file_name(format!("start-{max}.log"));
        let procs = procs.clone();
        let mut s = common::Serve::spawn(&config, &log, move |cmd| {
            // SAFETY: open, write and close on memory the closure owns, in the child.
            unsafe {
                cmd.pre_exec(move || {
                    let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
                    if fd < 0 || libc::write(fd, c"0".as_ptr().cast(), 1) != 1 {
                        return Err(std::io::Error::last_os_error());
                    }
                    libc::close(fd);
                    Ok(())
                });
            }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = s.exited() {
                let text = s.log_text();
                assert!(!status.success(), "max {max}: {status}\n{text}");
                assert_eq!(status.code(), Some(1), "max {max}: {status}\n{text}");
                assert!(text.contains("error: starting"), "max {max}:\n{text}");
                refused += 1;
                break;
            }
            if UnixStream::connect(&socket).is_ok() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "max {max}: hung\n{}",
                s.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // Drop kills it and fails on a panic in its log.
        drop(s);
        let _ = std::fs::remove_file(&socket);
    }
    assert!(refused > 0, "every start served");
}
