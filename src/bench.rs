//! `millrace bench`: end-to-end measurements of daemon delivery (issue 4), with this
//! machine's single-thread memcpy bandwidth measured in the same run as the yardstick.
//!
//! For each materializer thread count it starts `millrace serve` as a child with a
//! config whose `[serve]` table sets that count, runs C `millrace consume --touch`
//! children that read every byte of every slot, and reports delivered tokens/s and
//! payload GB/s (also as a ratio to memcpy), publish-to-wake latency, and the daemon's
//! CPU seconds per delivered GB (from /proc/PID/stat). A later issue adds scenarios.

use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;

use crate::client::{ConsumeSummary, Latency};
use crate::demo::{
    collect_summary, cpu_seconds, ensure_corpus, socket_path_in, spawn_rust_consumer, write_config,
    Daemon,
};

/// Arguments of `millrace bench`.
#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// Corpus directory: reused when it holds a millrace.toml, else synthesized there
    /// (default: $TMPDIR/millrace-bench).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Tokens of the synthetic corpus, when one has to be written.
    #[arg(long, default_value = "2e8", value_parser = crate::synth::parse_count)]
    pub tokens: u64,
    /// Inputs per row.
    #[arg(long, default_value_t = 4096)]
    pub seq_len: u32,
    /// Rows per consumer (dp rank) per step.
    #[arg(long, default_value_t = 8)]
    pub rows: u32,
    /// Consumer processes (dp ranks).
    #[arg(long, default_value_t = 2)]
    pub consumers: u32,
    /// Steps per run (default: two passes over --tokens across all consumers).
    #[arg(long)]
    pub steps: Option<u64>,
    /// Materializer thread counts to run, comma-separated.
    #[arg(long, default_value = "1,2", value_delimiter = ',')]
    pub threads: Vec<u32>,
    /// Runs per thread count; the median (by tokens/s) is reported.
    #[arg(long, default_value_t = 5)]
    pub repeat: u32,
    /// Token dtype the daemon delivers.
    #[arg(long, default_value = "int32")]
    pub token_dtype: String,
    /// Write the results as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// No progress display.
    #[arg(long)]
    pub quiet: bool,
}

/// One run's figures (one materializer thread count).
#[derive(Debug, Clone, Serialize)]
pub struct RunFigures {
    /// `[serve] materialize_threads`.
    pub materialize_threads: u32,
    /// Steps each consumer read.
    pub steps: u64,
    /// Consumers.
    pub consumers: u32,
    /// Input tokens delivered over all consumers.
    pub tokens: u64,
    /// Payload bytes delivered (tokens + labels + loss_mask + position_ids).
    pub payload_bytes: u64,
    /// First batch (any consumer) to last batch (any consumer).
    pub seconds: f64,
    /// Delivered tokens per second (each consumer's first batch excluded).
    pub tokens_per_s: f64,
    /// Delivered payload GB/s (10^9 bytes).
    pub payload_gb_per_s: f64,
    /// payload_gb_per_s / memcpy_gb_per_s.
    pub ratio_to_memcpy: f64,
    /// Publish-to-wake latency pooled over the consumers.
    pub wake_latency: Latency,
    /// Daemon utime + stime while streaming.
    pub daemon_cpu_seconds: f64,
    /// Daemon CPU seconds per delivered payload GB.
    pub daemon_cpu_s_per_gb: f64,
    /// Consumer processes' CPU seconds (whole process lives) per delivered payload GB.
    pub consumer_cpu_s_per_gb: f64,
    /// Every consumer's digest of its tokens, equal across thread counts.
    pub digests: Vec<String>,
    /// tokens/s of every repetition, in run order (the figures above are the median's).
    pub repeats_tokens_per_s: Vec<f64>,
}

/// The whole report.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// Cores this process may use.
    pub cpus: usize,
    /// Best single-thread memcpy bandwidth, GB/s (10^9 bytes copied per second).
    pub memcpy_gb_per_s: f64,
    /// Corpus directory.
    pub corpus: PathBuf,
    /// Bytes of shard files read to warm the page cache, and how fast.
    pub warm_bytes: u64,
    /// GB/s of that read.
    pub warm_gb_per_s: f64,
    /// Inputs per row.
    pub seq_len: u32,
    /// Rows per consumer per step.
    pub rows: u32,
    /// Token dtype delivered.
    pub token_dtype: String,
    /// One entry per thread count.
    pub runs: Vec<RunFigures>,
}

/// Best-of-`reps` single-thread copy of a `bytes` buffer, in GB/s.
pub fn memcpy_gb_per_s(bytes: usize, reps: usize) -> f64 {
    let src: Vec<u8> = (0..bytes).map(|i| (i * 31 % 251) as u8).collect();
    let mut dst = vec![0u8; bytes];
    dst.copy_from_slice(&src); // fault the pages in before timing
    let mut best = f64::MAX;
    for _ in 0..reps.max(1) {
        let t = Instant::now();
        dst.copy_from_slice(std::hint::black_box(&src));
        std::hint::black_box(&mut dst);
        best = best.min(t.elapsed().as_secs_f64());
    }
    bytes as f64 / best.max(1e-12) / 1e9
}

/// Reads every file under `dir` once so the shards are in the page cache; returns bytes.
fn warm(dir: &Path) -> Result<u64> {
    let mut total = 0u64;
    let mut stack = vec![dir.to_path_buf()];
    let mut buf = vec![0u8; 1 << 22];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).with_context(|| format!("listing {}", d.display()))? {
            let p = e?.path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            let is_shard = p
                .extension()
                .and_then(|x| x.to_str())
                .is_some_and(|x| matches!(x, "bin" | "idx" | "npy"));
            if !is_shard {
                continue;
            }
            let mut f =
                std::fs::File::open(&p).with_context(|| format!("opening {}", p.display()))?;
            loop {
                let n = f.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                total += n as u64;
            }
        }
    }
    Ok(total)
}

fn bar(show: bool, len: u64, prefix: String) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr_with_hz(4));
    let style = ProgressStyle::with_template(
        "{prefix} [{elapsed_precise}] [{bar:30}] {pos}/{len} steps {msg}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("=> ");
    pb.set_style(style);
    pb.set_prefix(prefix);
    pb
}

/// One daemon run at `threads` materializer threads.
#[allow(clippy::too_many_arguments)]
fn run_one(
    args: &BenchArgs,
    dir: &Path,
    base_cfg: &Path,
    threads: u32,
    steps: u64,
    memcpy: f64,
    show: bool,
) -> Result<RunFigures> {
    let cfg = dir.join(format!("bench-t{threads}.toml"));
    let socket = socket_path_in(dir, &format!("bench-t{threads}.sock"));
    let global = i64::from(args.rows) * i64::from(args.consumers);
    write_config(
        base_cfg,
        &cfg,
        &[
            (
                "socket",
                toml::Value::String(socket.to_string_lossy().to_string()),
            ),
            ("materialize_threads", toml::Value::Integer(threads.into())),
            ("ring_slots", toml::Value::Integer(4)),
            ("token_dtype", toml::Value::String(args.token_dtype.clone())),
        ],
        &[
            ("seq_len", toml::Value::Integer(args.seq_len.into())),
            ("global_batch_rows", toml::Value::Integer(global)),
        ],
    )?;
    let mut daemon = Daemon::start(&cfg, &socket, &dir.join(format!("serve-t{threads}.log")))?;
    let pid = daemon.pid();
    let cpu0 = cpu_seconds(pid).context("reading the daemon's /proc/PID/stat")?;
    let pb = bar(
        show,
        steps * u64::from(args.consumers),
        format!("threads={threads}"),
    );
    let mut workers = Vec::new();
    let mut progress = Vec::new();
    for r in 0..args.consumers {
        let mut g = spawn_rust_consumer(
            &socket,
            r,
            args.consumers,
            args.rows,
            steps,
            &["--touch", "--progress", "--job", "bench"],
        )?;
        let p = Arc::new(AtomicU64::new(0));
        progress.push(p.clone());
        workers.push(std::thread::spawn(move || {
            collect_summary(&mut g, Duration::from_secs(1800), Some(p))
        }));
    }
    while workers.iter().any(|w| !w.is_finished()) {
        pb.set_position(progress.iter().map(|p| p.load(Ordering::Relaxed)).sum());
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut summaries: Vec<ConsumeSummary> = Vec::new();
    for w in workers {
        match w.join() {
            Ok(Ok(s)) => summaries.push(s),
            Ok(Err(e)) => {
                pb.abandon();
                bail!(
                    "{e:#}\nthe daemon's log ({}) ends with:\n{}",
                    daemon.log.display(),
                    daemon.log_tail()
                );
            }
            Err(_) => bail!("a consumer thread panicked"),
        }
    }
    let cpu1 = cpu_seconds(pid).context("reading the daemon's /proc/PID/stat")?;
    pb.finish_and_clear();
    daemon.stop();

    let tokens: u64 = summaries.iter().map(|s| s.tokens).sum();
    let payload: u64 = summaries.iter().map(|s| s.payload_bytes).sum();
    let secs = crate::client::span_seconds(&summaries);
    // Each consumer's first batch arrives at the start of the span: not counted.
    let first_share = 1.0 / steps.max(1) as f64;
    let tokens_after = tokens as f64 * (1.0 - first_share);
    let payload_after = payload as f64 * (1.0 - first_share);
    let rate = |x: f64| if secs > 0.0 { x / secs } else { 0.0 };
    let mut lat: Vec<u64> = summaries
        .iter()
        .flat_map(|s| s.wake_latency_ns.iter().copied())
        .collect();
    let gbps = rate(payload_after) / 1e9;
    let cpu = cpu1 - cpu0;
    Ok(RunFigures {
        materialize_threads: threads,
        steps,
        consumers: args.consumers,
        tokens,
        payload_bytes: payload,
        seconds: secs,
        tokens_per_s: rate(tokens_after),
        payload_gb_per_s: gbps,
        ratio_to_memcpy: gbps / memcpy.max(1e-12),
        wake_latency: Latency::from_ns(&mut lat),
        daemon_cpu_seconds: cpu,
        daemon_cpu_s_per_gb: cpu / (payload as f64 / 1e9).max(1e-12),
        consumer_cpu_s_per_gb: summaries.iter().map(|s| s.cpu_seconds).sum::<f64>()
            / (payload as f64 / 1e9).max(1e-12),
        digests: summaries.iter().map(|s| s.digest.clone()).collect(),
        repeats_tokens_per_s: Vec::new(),
    })
}

/// Renders the report as a table.
pub fn render(r: &BenchReport) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{} cpus; single-thread memcpy {:.2} GB/s; corpus {} ({:.2} GB warmed at {:.2} GB/s); \
         {} rows x {} per consumer per step, {}",
        r.cpus,
        r.memcpy_gb_per_s,
        r.corpus.display(),
        r.warm_bytes as f64 / 1e9,
        r.warm_gb_per_s,
        r.rows,
        r.seq_len,
        r.token_dtype
    );
    let _ = writeln!(
        s,
        "| materialize threads | consumers | steps | tokens/s (median) | tokens/s (min-max) | payload GB/s | / memcpy | wake p50 us | wake p99 us | daemon CPU s per GB | consumer CPU s per GB |"
    );
    let _ = writeln!(
        s,
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    );
    for x in &r.runs {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {:.3e} | {:.2e}-{:.2e} | {:.3} | {:.3} | {:.1} | {:.1} | {:.3} | {:.3} |",
            x.materialize_threads,
            x.consumers,
            x.steps,
            x.tokens_per_s,
            x.repeats_tokens_per_s
                .iter()
                .copied()
                .fold(f64::INFINITY, f64::min),
            x.repeats_tokens_per_s.iter().copied().fold(0.0, f64::max),
            x.payload_gb_per_s,
            x.ratio_to_memcpy,
            x.wake_latency.p50_us,
            x.wake_latency.p99_us,
            x.daemon_cpu_s_per_gb,
            x.consumer_cpu_s_per_gb
        );
    }
    s
}

/// Runs `millrace bench`.
pub fn run(args: BenchArgs) -> Result<()> {
    if args.consumers == 0 || args.rows == 0 || args.seq_len == 0 || args.threads.is_empty() {
        bail!("--consumers, --rows, --seq-len and --threads must be positive");
    }
    let show = !args.quiet && std::io::stderr().is_terminal();
    let dir = args
        .dir
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join("millrace-bench"));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let t = Instant::now();
    if ensure_corpus(&dir, args.tokens, show)? {
        eprintln!(
            "wrote a {} token corpus to {} in {:.1} s",
            crate::inspect::thousands(args.tokens),
            dir.display(),
            t.elapsed().as_secs_f64()
        );
    }
    let t = Instant::now();
    let warm_bytes = warm(&dir)?;
    let warm_gbps = warm_bytes as f64 / t.elapsed().as_secs_f64().max(1e-9) / 1e9;
    let memcpy = memcpy_gb_per_s(256 << 20, 5);
    let per_step = u64::from(args.rows) * u64::from(args.seq_len) * u64::from(args.consumers);
    let steps = args
        .steps
        .unwrap_or_else(|| (2 * args.tokens / per_step.max(1)).max(100));
    let base_cfg = dir.join("millrace.toml");
    let mut runs = Vec::new();
    let mut first_digests: Option<Vec<String>> = None;
    let mut same_tokens = true;
    for &threads in &args.threads {
        let mut reps = Vec::new();
        for _ in 0..args.repeat.max(1) {
            let r = run_one(&args, &dir, &base_cfg, threads, steps, memcpy, show)?;
            match &first_digests {
                None => first_digests = Some(r.digests.clone()),
                Some(d) => same_tokens &= *d == r.digests,
            }
            reps.push(r);
        }
        let all: Vec<f64> = reps.iter().map(|r| r.tokens_per_s).collect();
        reps.sort_by(|a, b| a.tokens_per_s.total_cmp(&b.tokens_per_s));
        let mut median = reps.swap_remove(reps.len() / 2);
        median.repeats_tokens_per_s = all;
        runs.push(median);
    }
    let report = BenchReport {
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        memcpy_gb_per_s: memcpy,
        corpus: dir.clone(),
        warm_bytes,
        warm_gb_per_s: warm_gbps,
        seq_len: args.seq_len,
        rows: args.rows,
        token_dtype: args.token_dtype.clone(),
        runs,
    };
    let mut out = std::io::stdout().lock();
    write!(out, "{}", render(&report))?;
    if same_tokens {
        writeln!(
            out,
            "every run delivered the same tokens (equal xxh3 digests per consumer)"
        )?;
    } else {
        writeln!(
            out,
            "WARNING: the token digests differ between runs: {:?}",
            report.runs.iter().map(|r| &r.digests).collect::<Vec<_>>()
        )?;
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
