//! `millrace demo`: the README's first command. It synthesizes a small corpus (unless
//! the directory has one), starts `millrace serve` as a child, streams a few hundred
//! steps to K consumer processes (the Python client when `import millrace, numpy`
//! works, else `millrace consume`), and prints throughput, the realized mixture next to
//! the plan's target, and the provenance of one step. It never leaves a child behind:
//! the daemon and consumers are killed on drop, whatever the error.
//!
//! The child-process helpers ([`Daemon`], [`ChildGuard`]) are shared with `millrace bench`.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::client::ConsumeSummary;
use crate::config::Config;
use crate::plan::report::{explain, render_explain, Tally};

/// What the columns of `millrace explain` mean, printed under the demo's provenance: a
/// first-time reader sees `tokens 4097` with seq_len 4096 and has no way to know why.
pub fn provenance_legend(seq_len: u32) -> String {
    format!(
        "how to read the provenance:\n\
         \x20 row N      the row's index in the global batch; its domain and that domain's epoch\n\
         \x20 tokens     real tokens in the row: a row holds seq_len + 1 = {} (the inputs, plus\n\
         \x20            the label of the last input)\n\
         \x20 pad        padding tokens filling the rest of the row\n\
         \x20 loss       positions the loss counts: predictions that stay inside one document\n\
         \x20 indented   one document piece per line: shard, document index, [a, b) the token\n\
         \x20            range of the document placed here, of n its length (a piece of a long\n\
         \x20            document when b - a < n); group: its repository or book\n",
        u64::from(seq_len) + 1
    )
}

/// How long a daemon may take to open its corpus and accept connections.
pub const DAEMON_START_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a daemon may take to exit after SIGTERM before it is killed.
pub const DAEMON_STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// Which consumer `millrace demo` runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ConsumerKind {
    /// Python when `python3 -c "import millrace, numpy"` works, else Rust.
    Auto,
    /// `millrace consume` child processes.
    Rust,
    /// The Python client (`python/millrace`).
    Python,
}

/// Arguments of `millrace demo`.
#[derive(clap::Args, Debug, Clone)]
pub struct DemoArgs {
    /// Working directory: corpus, config, socket and daemon log (default: a fresh
    /// directory under $TMPDIR, removed at the end unless --keep).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Steps to stream.
    #[arg(long, default_value_t = 500)]
    pub steps: u64,
    /// Consumer processes (data-parallel ranks).
    #[arg(long, default_value_t = 2)]
    pub consumers: u32,
    /// Keep the working directory.
    #[arg(long)]
    pub keep: bool,
    /// Which consumer to run.
    #[arg(long, value_enum, default_value = "auto")]
    pub consumer: ConsumerKind,
    /// Tokens of the synthetic corpus, when one has to be written.
    #[arg(long, default_value = "5e7", value_parser = crate::synth::parse_count)]
    pub tokens: u64,
}

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
        if let Ok(pid) = libc::pid_t::try_from(c.id()) {
            // SAFETY: signals our own child, which has not been reaped yet.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
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
    // SAFETY: sysconf has no preconditions.
    let tck = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
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
        dtype: crate::synth::default_dtype(50304),
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

/// The consumer script for the Python client: prints the same JSON as
/// `millrace consume --json` (the fields the demo reads).
const PY_CONSUMER: &str = r#"
import json, sys, time
import numpy as np
import millrace

sock, rank, size, rows, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
c = millrace.Client(sock, dp_rank=rank, dp_size=size, job="demo-py", micro_batch_rows=rows,
                    micro_batches=1, reconnect_timeout=0)
domains = list(c.domains)
pad = int(c.welcome["pad_token"])
dom_tokens = [0] * len(domains)
tokens = real = 0
first = last = first_tokens = 0
checksum = 0
for i in range(steps):
    b = c.next_batch()
    now = time.monotonic_ns()
    t, lab, mask, dom = b.tokens, b.labels, b.loss_mask, b.domain
    if i == 0:
        first, first_tokens = now, t.size
    last = now
    tokens += t.size
    real += b.real_tokens
    checksum = (checksum + int(t.sum(dtype=np.int64))) & 0x7FFFFFFFFFFFFFFF
    n = t.shape[1]
    for r in range(t.shape[0]):
        # Real tokens of the row: t[0..=n] minus the trailing padding (pad, no loss into it).
        k = n + 1
        while k > 0:
            j = k - 1
            v = t[r, j] if j < n else lab[r, n - 1]
            if v != pad or (j > 0 and mask[r, j - 1] != 0):
                break
            k -= 1
        dom_tokens[int(dom[r])] += k
c.close()
secs = (last - first) / 1e9
print(json.dumps({"dp_rank": rank, "steps": steps, "tokens": tokens, "real_tokens": real,
                  "seconds": secs,
                  "tokens_per_s": (tokens - first_tokens) / secs if secs > 0 else 0.0,
                  "first_batch_ns": first, "last_batch_ns": last, "checksum": checksum,
                  "domain_tokens": dict(zip(domains, dom_tokens))}))
"#;

fn python_ok() -> bool {
    Command::new("python3")
        .args(["-c", "import millrace, numpy"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn run_consumers(
    kind: ConsumerKind,
    socket: &Path,
    ranks: u32,
    rows: u32,
    steps: u64,
) -> Result<Vec<ConsumeSummary>> {
    let mut children = Vec::new();
    for r in 0..ranks {
        let g = match kind {
            ConsumerKind::Python => {
                let child = Command::new("python3")
                    .args(["-c", PY_CONSUMER])
                    .arg(socket)
                    .args([r.to_string(), ranks.to_string(), rows.to_string()])
                    .arg(steps.to_string())
                    .stdin(Stdio::null())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .context("starting python3")?;
                ChildGuard::new(child, format!("python consumer {r}"))
            }
            _ => spawn_rust_consumer(socket, r, ranks, rows, steps, &["--job", "demo"])?,
        };
        children.push(g);
    }
    let timeout = Duration::from_secs(600);
    children
        .iter_mut()
        .map(|g| collect_summary(g, timeout, None))
        .collect()
}

fn fresh_dir() -> PathBuf {
    std::env::temp_dir().join(format!("millrace-demo-{}", std::process::id()))
}

/// Removes the demo's own directory on drop unless asked to keep it.
struct DirCleanup(Option<PathBuf>);

impl Drop for DirCleanup {
    fn drop(&mut self) {
        if let Some(d) = self.0.take() {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

/// Runs `millrace demo`.
pub fn run(args: DemoArgs) -> Result<()> {
    if args.consumers == 0 || args.steps == 0 {
        bail!("--consumers and --steps must be at least 1");
    }
    let own_dir = args.dir.is_none();
    let dir = args.dir.clone().unwrap_or_else(fresh_dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let _cleanup = DirCleanup((own_dir && !args.keep).then(|| dir.clone()));
    let mut out = std::io::stdout().lock();

    let t0 = Instant::now();
    let wrote = ensure_corpus(&dir, args.tokens, false)?;
    if wrote {
        writeln!(
            out,
            "wrote a {} token synthetic corpus to {} in {:.1} s",
            crate::inspect::thousands(args.tokens),
            dir.display(),
            t0.elapsed().as_secs_f64()
        )?;
    } else {
        writeln!(out, "using the corpus in {}", dir.display())?;
    }
    let base_cfg = dir.join("millrace.toml");
    let cfg_path = dir.join("demo.toml");
    let socket = socket_path_in(&dir, "millrace.sock");
    let k = args.consumers;
    // A corpus written by this or an earlier demo gets a small geometry so the demo
    // takes seconds; a corpus of the user's keeps its own plan.
    let demo_corpus = wrote || cfg_path.is_file();
    let plan_keys: Vec<(&str, toml::Value)> = if demo_corpus {
        vec![
            ("seq_len", toml::Value::Integer(4096)),
            ("global_batch_rows", toml::Value::Integer(i64::from(8 * k))),
        ]
    } else {
        Vec::new()
    };
    let socket_str = socket.to_string_lossy().to_string();
    write_config(
        &base_cfg,
        &cfg_path,
        &[("socket", toml::Value::String(socket_str))],
        &plan_keys,
    )?;
    let cfg = Config::load(&cfg_path)?;
    let loaded = cfg.load_plan()?;
    let plan = loaded.plan;
    let g = plan.config().global_batch_rows;
    if g % k != 0 {
        bail!(
            "--consumers {k} does not divide global_batch_rows {g} of {}",
            cfg_path.display()
        );
    }
    let rows = g / k;

    let mut daemon = Daemon::start(&cfg_path, &socket, &dir.join("serve.log"))?;
    writeln!(
        out,
        "millrace serve (pid {}) is listening on {}",
        daemon.pid(),
        socket.display()
    )?;
    let kind = match args.consumer {
        ConsumerKind::Auto if python_ok() => ConsumerKind::Python,
        ConsumerKind::Auto => ConsumerKind::Rust,
        k => k,
    };
    let mut kind = kind;
    let summaries = match run_consumers(kind, &socket, k, rows, args.steps) {
        Ok(s) => s,
        Err(e) if args.consumer == ConsumerKind::Auto && kind == ConsumerKind::Python => {
            writeln!(
                out,
                "the Python consumer failed ({e:#}); using millrace consume instead"
            )?;
            kind = ConsumerKind::Rust;
            run_consumers(kind, &socket, k, rows, args.steps)?
        }
        Err(e) => {
            bail!(
                "{e:#}\nthe daemon's log ({}) ends with:\n{}",
                daemon.log.display(),
                daemon.log_tail()
            );
        }
    };
    let status = daemon.stop();

    // Throughput over all consumers, first batch to last.
    let tokens: u64 = summaries.iter().map(|s| s.tokens).sum();
    let secs = crate::client::span_seconds(&summaries);
    let who = if kind == ConsumerKind::Python {
        "Python client"
    } else {
        "millrace consume"
    };
    writeln!(
        out,
        "\nstreamed {} steps to {k} consumers ({who}, {rows} rows x {} tokens each per step): \
         {} tokens in {secs:.2} s = {:.3e} tokens/s",
        args.steps,
        plan.config().seq_len,
        crate::inspect::thousands(tokens),
        if secs > 0.0 {
            tokens as f64 / secs
        } else {
            0.0
        }
    )?;

    // Realized mixture over the streamed steps vs the plan.
    let mut tally = Tally::new(&plan);
    let mut planner = plan.start();
    let mut step0 = None;
    for i in 0..args.steps {
        let b = planner.next_batch();
        if i == 0 {
            step0 = Some(b.clone());
        }
        tally.add(b);
    }
    let window = tally.finish(&planner.epochs());
    let mut delivered = std::collections::BTreeMap::<String, u64>::new();
    for s in &summaries {
        for (d, t) in &s.domain_tokens {
            *delivered.entry(d.clone()).or_default() += t;
        }
    }
    let total: u64 = delivered.values().sum();
    writeln!(
        out,
        "\nmixture over steps 0..{} (share of real tokens):",
        args.steps
    )?;
    writeln!(
        out,
        "    {:<10} {:>10} {:>10} {:>10}",
        "domain", "delivered", "planned", "target"
    )?;
    for d in &window.domains {
        let got = delivered.get(&d.name).copied().unwrap_or(0);
        writeln!(
            out,
            "    {:<10} {:>9.3}% {:>9.3}% {:>9.3}%",
            d.name,
            100.0 * got as f64 / total.max(1) as f64,
            100.0 * d.token_share,
            100.0 * d.target_share
        )?;
    }
    let planned: u64 = window.domains.iter().map(|d| d.tokens).sum();
    writeln!(
        out,
        "    delivered {} real tokens; the plan says {}{}",
        crate::inspect::thousands(total),
        crate::inspect::thousands(planned),
        if total == planned { " (equal)" } else { "" }
    )?;

    if let Some(b) = step0 {
        let e = explain(&plan, &b, 0, k);
        writeln!(
            out,
            "\nprovenance of step 0, dp rank 0 of {k} (millrace explain --config {} --step 0 --dp-size {k}):",
            cfg_path.display()
        )?;
        write!(out, "{}", render_explain(&e))?;
        write!(out, "{}", provenance_legend(plan.config().seq_len))?;
    }
    match status {
        Some(s) if s.success() => writeln!(out, "\nstopped the daemon (SIGTERM): {s}")?,
        Some(s) => writeln!(out, "\nstopped the daemon: {s}")?,
        None => writeln!(out, "\nthe daemon had already exited")?,
    }
    if !own_dir || args.keep {
        writeln!(out, "kept {}", dir.display())?;
    }
    Ok(())
}
