//! The child-process harness shared by `millrace demo` and `millrace bench`: a guard
//! that kills and reaps its child on drop ([`ChildGuard`]), a `millrace serve` child
//! ([`Daemon`]), consumer children and their JSON summaries. Both commands start the same
//! daemon and consumers; keeping one copy means one place that never leaves a child behind.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::client::ConsumeSummary;

/// How long a daemon may take to open its corpus and accept connections.
pub const DAEMON_START_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a daemon may take to exit after SIGTERM before it is killed.
pub const DAEMON_STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// A child process that is killed (SIGKILL) and reaped when dropped, so an error path
/// never leaves it running.
pub struct ChildGuard {
    child: Option<Child>,
    name: String,
}

impl ChildGuard {
    /// Wraps a spawned child; `name` is used in messages.
    pub fn new(child: Child, name: impl Into<String>) -> ChildGuard {
        ChildGuard {
            child: Some(child),
            name: name.into(),
        }
    }

    /// The child's pid.
    pub fn id(&self) -> u32 {
        self.child.as_ref().map_or(0, |c| c.id())
    }

    /// The child itself (to take its pipes).
    pub fn child_mut(&mut self) -> Option<&mut Child> {
        self.child.as_mut()
    }

    /// Returns the exit status if the child has exited.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        match self.child.as_mut() {
            Some(c) => Ok(c.try_wait()?),
            None => bail!("{} was already reaped", self.name),
        }
    }

    /// Waits up to `timeout` for the child to exit by itself; kills it after that.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.try_wait()? {
                self.child = None;
                return Ok(s);
            }
            if Instant::now() >= deadline {
                self.kill();
                bail!(
                    "{} did not finish within {timeout:?} and was killed",
                    self.name
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends SIGTERM, waits up to `grace`, then SIGKILL; returns how it ended.
    pub fn terminate(&mut self, grace: Duration) -> Option<ExitStatus> {
        let mut c = self.child.take()?;
        if let Ok(Some(s)) = c.try_wait() {
            return Some(s);
        }
        // Our own child, not reaped yet, so the pid is still its.
        let _ = rustix::process::kill_process(
            rustix::process::Pid::from_child(&c),
            rustix::process::Signal::TERM,
        );
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(s)) = c.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = c.kill();
        c.wait().ok()
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A `millrace serve` child process, stopped (SIGTERM, then SIGKILL) on drop.
pub struct Daemon {
    guard: ChildGuard,
    /// Its socket.
    pub socket: PathBuf,
    /// Where its stderr goes.
    pub log: PathBuf,
}

impl Daemon {
    /// Starts `millrace serve --config CONFIG --socket SOCKET` (this same executable),
    /// logging to `log`, and waits until the socket accepts connections.
    pub fn start(config: &Path, socket: &Path, log: &Path) -> Result<Daemon> {
        Daemon::start_with(&std::env::current_exe()?, config, socket, log)
    }

    /// [`Daemon::start`] with an explicit `millrace` executable.
    pub fn start_with(exe: &Path, config: &Path, socket: &Path, log: &Path) -> Result<Daemon> {
        Daemon::start_polling(exe, config, socket, log, Duration::from_millis(25))
    }

    /// [`Daemon::start_with`], polling the socket every `poll`: `millrace bench` times
    /// startup to the millisecond, where the default 25 ms poll would dominate.
    pub fn start_polling(
        exe: &Path,
        config: &Path,
        socket: &Path,
        log: &Path,
        poll: Duration,
    ) -> Result<Daemon> {
        // A socket file left by a killed daemon refuses connections: remove it.
        if socket.exists() && std::os::unix::net::UnixStream::connect(socket).is_err() {
            let _ = std::fs::remove_file(socket);
        }
        let log_file = std::fs::File::create(log)
            .with_context(|| format!("creating the daemon log {}", log.display()))?;
        let child = Command::new(exe)
            .arg("serve")
            .arg("--config")
            .arg(config)
            .arg("--socket")
            .arg(socket)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .spawn()
            .with_context(|| format!("starting {} serve", exe.display()))?;
        let mut d = Daemon {
            guard: ChildGuard::new(child, "millrace serve"),
            socket: socket.to_path_buf(),
            log: log.to_path_buf(),
        };
        let deadline = Instant::now() + DAEMON_START_TIMEOUT;
        loop {
            if let Some(status) = d.guard.try_wait()? {
                bail!(
                    "millrace serve exited ({status}) before accepting connections; its log:\n{}",
                    d.log_tail()
                );
            }
            if std::os::unix::net::UnixStream::connect(socket).is_ok() {
                return Ok(d);
            }
            if Instant::now() >= deadline {
                bail!(
                    "millrace serve did not accept connections on {} within {:?}; its log:\n{}",
                    socket.display(),
                    DAEMON_START_TIMEOUT,
                    d.log_tail()
                );
            }
            std::thread::sleep(poll);
        }
    }

    /// The daemon's pid.
    pub fn pid(&self) -> u32 {
        self.guard.id()
    }

    /// True while the daemon runs.
    pub fn running(&mut self) -> bool {
        matches!(self.guard.try_wait(), Ok(None))
    }

    /// The last 40 lines of its log, for error messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// SIGTERM, then SIGKILL after [`DAEMON_STOP_TIMEOUT`]; returns how it ended.
    pub fn stop(&mut self) -> Option<ExitStatus> {
        self.guard.terminate(DAEMON_STOP_TIMEOUT)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}

/// utime + stime of process `pid` in seconds (Linux `/proc/PID/stat`).
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces: split after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of stat(5) are utime and stime; `rest` starts at field 3.
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    let tck = rustix::param::clock_ticks_per_second();
    let tck = if tck > 0 { tck as f64 } else { 100.0 };
    Some((utime + stime) as f64 / tck)
}

/// A unix socket path must fit `sun_path` (108 bytes with its NUL).
pub fn socket_path_in(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    if p.as_os_str().len() < 100 {
        return p;
    }
    std::env::temp_dir().join(format!("millrace-{}-{name}", std::process::id()))
}

/// Writes `cfg_in` with `[serve]` keys set (and `[plan]` keys when given) to `cfg_out`.
pub fn write_config(
    cfg_in: &Path,
    cfg_out: &Path,
    serve: &[(&str, toml::Value)],
    plan: &[(&str, toml::Value)],
) -> Result<()> {
    let text =
        std::fs::read_to_string(cfg_in).with_context(|| format!("reading {}", cfg_in.display()))?;
    let mut doc: toml::Table =
        toml::from_str(&text).with_context(|| format!("parsing {}", cfg_in.display()))?;
    for (table, keys) in [("serve", serve), ("plan", plan)] {
        if keys.is_empty() {
            continue;
        }
        let t = doc
            .entry(table)
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        let Some(t) = t.as_table_mut() else {
            bail!("{}: [{table}] is not a table", cfg_in.display());
        };
        for (k, v) in keys {
            t.insert((*k).to_string(), v.clone());
        }
    }
    // Keep relative shard paths valid: the new file goes next to the old one.
    let same_dir = cfg_in.parent() == cfg_out.parent();
    if !same_dir {
        bail!(
            "{} must be written next to {} (shard paths are relative)",
            cfg_out.display(),
            cfg_in.display()
        );
    }
    std::fs::write(cfg_out, toml::to_string(&doc)?)
        .with_context(|| format!("writing {}", cfg_out.display()))?;
    Ok(())
}

/// Writes a synthetic corpus into `dir` unless `dir/millrace.toml` exists; returns
/// whether it wrote one.
pub fn ensure_corpus(dir: &Path, tokens: u64, progress: bool) -> Result<bool> {
    if dir.join("millrace.toml").is_file() {
        return Ok(false);
    }
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let opts = crate::synth::SynthOptions {
        out: dir.to_path_buf(),
        tokens,
        domains: 4,
        vocab: 50304,
        dtype: super::default_dtype(50304),
        seed: 0,
        shard_tokens: 250_000_000,
        threads,
        progress,
    };
    crate::synth::synth(&opts)
        .with_context(|| format!("writing a synthetic corpus to {}", dir.display()))?;
    Ok(true)
}

/// Starts a `millrace consume --json` child for one rank; its stdout is piped.
pub fn spawn_rust_consumer(
    socket: &Path,
    rank: u32,
    ranks: u32,
    rows: u32,
    steps: u64,
    extra: &[&str],
) -> Result<ChildGuard> {
    let child = Command::new(std::env::current_exe()?)
        .arg("consume")
        .arg("--socket")
        .arg(socket)
        .args(["--dp-rank", &rank.to_string()])
        .args(["--dp-size", &ranks.to_string()])
        .args(["--micro-batch-rows", &rows.to_string()])
        .args(["--steps", &steps.to_string()])
        .arg("--json")
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting millrace consume")?;
    Ok(ChildGuard::new(child, format!("consumer {rank}")))
}

/// Collects a consumer's JSON summary (the last JSON line of its stdout); a thread
/// drains stderr so the child never blocks, calling `on_progress` with each
/// `{"progress": N}` line's N.
pub fn collect_summary(
    guard: &mut ChildGuard,
    timeout: Duration,
    on_progress: Option<Arc<AtomicU64>>,
) -> Result<ConsumeSummary> {
    let (stdout, stderr) = match guard.child_mut() {
        Some(c) => (c.stdout.take(), c.stderr.take()),
        None => (None, None),
    };
    let err_thread = stderr.map(|e| {
        std::thread::spawn(move || {
            let mut kept = String::new();
            for line in BufReader::new(e).lines().map_while(|l| l.ok()) {
                if let Some(n) = progress_value(&line) {
                    if let Some(p) = &on_progress {
                        p.store(n, Ordering::Relaxed);
                    }
                    continue;
                }
                kept.push_str(&line);
                kept.push('\n');
            }
            kept
        })
    });
    let out_thread = stdout.map(|o| {
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = std::io::Read::read_to_string(&mut BufReader::new(o), &mut s);
            s
        })
    });
    let status = guard.wait_timeout(timeout)?;
    let out = out_thread.and_then(|t| t.join().ok()).unwrap_or_default();
    let err = err_thread.and_then(|t| t.join().ok()).unwrap_or_default();
    if !status.success() {
        bail!("{} failed ({status}): {}", guard.name, err.trim());
    }
    let line = out
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))
        .with_context(|| format!("{} printed no JSON summary: {out}", guard.name))?;
    serde_json::from_str(line).with_context(|| {
        format!(
            "{} printed a summary that does not parse: {line}",
            guard.name
        )
    })
}

fn progress_value(line: &str) -> Option<u64> {
    let v: serde_json::Value = serde_json::from_str(line.trim()).ok()?;
    v.get("progress")?.as_u64()
}
