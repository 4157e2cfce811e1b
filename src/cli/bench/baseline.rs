//! The baseline loader of `millrace bench`: nanoGPT's `get_batch` over numpy memmaps
//! (`scripts/nanogpt-baseline.py`, embedded), run with the same processes and shapes.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Deserialize;

use millrace::util::harness::ChildGuard;

use super::machine::{now_ns, DataFile};
use super::report::BaselineFigures;
use super::{BenchArgs, CHILD_TIMEOUT};

/// The baseline loader, embedded so the bench runs from any directory.
const BASELINE_PY: &str = include_str!("../../../scripts/nanogpt-baseline.py");

/// The JSON line `scripts/nanogpt-baseline.py` prints.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub(super) struct BaselineLine {
    error: Option<String>,
    tokens: u64,
    steps: u64,
    import_ns: u64,
    first_batch_ns: u64,
    last_batch_ns: u64,
    cpu_seconds: f64,
    cpu_after_first_batch: f64,
    vmhwm_kb: u64,
    rss_anon_kb: u64,
    minor_faults: u64,
    major_faults: u64,
}

/// None when `python` can import numpy; else why not.
pub(super) fn python_problem(python: &str) -> Option<String> {
    match Command::new(python)
        .args(["-c", "import numpy"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
    {
        Ok(o) if o.status.success() => None,
        Ok(o) => Some(format!(
            "{python} cannot import numpy ({}); pass --python with an interpreter that has it",
            String::from_utf8_lossy(&o.stderr)
                .lines()
                .last()
                .unwrap_or("")
                .trim()
        )),
        Err(e) => Some(format!("cannot run {python}: {e}")),
    }
}

/// Runs the baseline with `--consumers` processes; returns its figures.
pub(super) fn run_baseline(
    args: &BenchArgs,
    files: &[DataFile],
    mode: &str,
    cache: &str,
    steps: u64,
    show: bool,
) -> Result<BaselineFigures> {
    let dtype = files
        .first()
        .map(|f| f.dtype.name())
        .context("the corpus has no token files")?;
    if files.iter().any(|f| f.dtype.name() != dtype) {
        bail!("the baseline needs one token dtype over all shards");
    }
    let pb = if show {
        let pb = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr_with_hz(4));
        pb.set_style(
            ProgressStyle::with_template("{prefix:>22} [{elapsed_precise}] {spinner}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        pb.set_prefix(format!("baseline {mode} {cache}"));
        pb
    } else {
        ProgressBar::hidden()
    };
    // The processes start their timed loops together (the script's --barrier).
    let barrier = Barrier::new()?;
    let t_spawn = now_ns();
    let mut children = Vec::new();
    for r in 0..args.consumers {
        let mut cmd = Command::new(&args.python);
        cmd.arg("-c")
            .arg(BASELINE_PY)
            .args(["--dtype", dtype])
            .args(["--seq-len", &args.seq_len.to_string()])
            .args(["--rows", &args.rows.to_string()])
            .args(["--steps", &steps.to_string()])
            .args(["--rank", &r.to_string()])
            .args(["--mode", mode])
            .arg("--barrier")
            .arg(&barrier.dir)
            .arg("--files")
            .args(files.iter().map(|f| f.path.as_os_str()))
            .arg("--offsets")
            .args(files.iter().map(|f| f.offset.to_string()))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", args.python))?;
        children.push(ChildGuard::new(child, format!("baseline process {r}")));
    }
    barrier.release_when_ready(&mut children, args.consumers)?;
    let mut lines = Vec::new();
    for mut g in children {
        let (mut out, mut err) = (String::new(), String::new());
        if let Some(c) = g.child_mut() {
            let mut so = c.stdout.take();
            let mut se = c.stderr.take();
            let t = std::thread::spawn(move || {
                let mut e = String::new();
                if let Some(se) = se.as_mut() {
                    let _ = se.read_to_string(&mut e);
                }
                e
            });
            while !pb.is_hidden() && matches!(g.try_wait(), Ok(None)) {
                pb.tick();
                std::thread::sleep(Duration::from_millis(100));
            }
            if let Some(so) = so.as_mut() {
                so.read_to_string(&mut out)
                    .context("reading the baseline's output")?;
            }
            err = t.join().unwrap_or_default();
        }
        let status = g.wait_timeout(CHILD_TIMEOUT)?;
        let line = out
            .lines()
            .rev()
            .find(|l| l.trim_start().starts_with('{'))
            .with_context(|| format!("the baseline printed no JSON ({status}): {}", err.trim()))?;
        let b: BaselineLine = serde_json::from_str(line)
            .with_context(|| format!("the baseline printed JSON that does not parse: {line}"))?;
        if let Some(e) = b.error {
            bail!("the baseline failed: {e}");
        }
        if !status.success() {
            bail!("the baseline failed ({status}): {}", err.trim());
        }
        lines.push(b);
    }
    pb.finish_and_clear();
    let first = lines.iter().map(|l| l.first_batch_ns).min().unwrap_or(0);
    let last = lines.iter().map(|l| l.last_batch_ns).max().unwrap_or(0);
    let secs = last.saturating_sub(first) as f64 / 1e9;
    let tokens: u64 = lines.iter().map(|l| l.tokens).sum();
    let after: f64 = lines
        .iter()
        .map(|l| l.tokens as f64 * (1.0 - 1.0 / l.steps.max(1) as f64))
        .sum();
    let s = |a: u64| a.saturating_sub(t_spawn) as f64 / 1e9;
    Ok(BaselineFigures {
        mode: mode.to_string(),
        cache: cache.to_string(),
        processes: args.consumers,
        steps,
        tokens,
        import_s: s(lines.iter().map(|l| l.import_ns).max().unwrap_or(0)),
        time_to_first_batch_s: s(lines.iter().map(|l| l.first_batch_ns).max().unwrap_or(0)),
        seconds: secs,
        tokens_per_s: if secs > 0.0 { after / secs } else { 0.0 },
        ratio_to_millrace: 0.0,
        cpu_s_per_1e9_tokens: lines.iter().map(|l| l.cpu_seconds).sum::<f64>()
            / (tokens as f64 / 1e9).max(1e-12),
        steady_cpu_s_per_1e9_tokens: lines.iter().map(|l| l.cpu_after_first_batch).sum::<f64>()
            / (after / 1e9).max(1e-12),
        vmhwm_bytes: lines.iter().map(|l| l.vmhwm_kb * 1024).max().unwrap_or(0),
        rss_anon_bytes: lines
            .iter()
            .map(|l| l.rss_anon_kb * 1024)
            .max()
            .unwrap_or(0),
        minor_faults: lines.iter().map(|l| l.minor_faults).sum(),
        major_faults: lines.iter().map(|l| l.major_faults).sum(),
        repeats_tokens_per_s: Vec::new(),
    })
}

/// The directory through which the baseline's processes start together: each creates
/// `ready-RANK` once set up, and waits for `go`. Removed when dropped.
struct Barrier {
    dir: std::path::PathBuf,
}

impl Barrier {
    fn new() -> Result<Barrier> {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("millrace-bench-barrier-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Barrier { dir })
    }

    /// Creates `go` once all `n` processes are ready, or at once when one has exited
    /// (its error is read with its output).
    fn release_when_ready(&self, children: &mut [ChildGuard], n: u32) -> Result<()> {
        let deadline = std::time::Instant::now() + CHILD_TIMEOUT;
        loop {
            let ready = (0..n)
                .filter(|r| self.dir.join(format!("ready-{r}")).exists())
                .count();
            let exited = children
                .iter_mut()
                .any(|c| matches!(c.try_wait(), Ok(Some(_))));
            if ready == n as usize || exited || std::time::Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let go = self.dir.join("go");
        std::fs::write(&go, b"").with_context(|| format!("creating {}", go.display()))
    }
}

impl Drop for Barrier {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
