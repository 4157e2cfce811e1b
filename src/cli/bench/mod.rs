//! `millrace bench`: the end-to-end benchmark (issue 6). One run on one corpus measures
//! millrace next to the physical limits of the machine and next to the loader users would
//! otherwise pick, so every figure comes with a reference taken in the same minute on the
//! same (shared, noisy) machine.
//!
//! In order, on a synthetic corpus of `--tokens` tokens (written when the directory has
//! none):
//! 1. references: single-thread memcpy, a cold sequential read of the shard files (after
//!    `posix_fadvise(DONTNEED)`), and a page-cache read of the same bytes through `mmap`;
//! 2. millrace cold: the shards are evicted, `millrace serve` starts, C
//!    `millrace consume --touch` children (reading every byte of every slot) stream the
//!    run; time to first batch, tokens/s, bytes the daemon read from disk, its RSS and CPU;
//! 3. millrace warm, for each `--threads` value, `--repeat` times (the median reported):
//!    the same steps, now in the page cache;
//! 4. latency: a fresh daemon per try, consumers starting from step 0, from the cursor
//!    blob the cold run's consumers saved (resume), and from `--seek-step` (seek);
//! 5. the baseline (`scripts/nanogpt-baseline.py`, embedded): nanoGPT's get_batch over
//!    numpy memmaps of the same `.bin` files, cold and warm, in its best form and as
//!    nanoGPT writes it, with the same number of processes, rows and sequence length;
//! 6. fairness: `--fairness-ranks` free-running consumers of one job for
//!    `--fairness-seconds`; the max/min of the steps their rings published (issue 14
//!    item 9: a ring must not wait while another runs far ahead).

use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::{Deserialize, Serialize};

use crate::client::{ConsumeSummary, Latency};
use crate::util::harness::{
    collect_summary, cpu_seconds, ensure_corpus, socket_path_in, spawn_rust_consumer, write_config,
    ChildGuard, Daemon,
};

/// The baseline loader, embedded so the bench runs from any directory.
const BASELINE_PY: &str = include_str!("../scripts/nanogpt-baseline.py");

/// How long any one streaming child may run.
const CHILD_TIMEOUT: Duration = Duration::from_secs(1800);

/// Arguments of `millrace bench`.
#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// Corpus directory: reused when it holds a millrace.toml, else synthesized there
    /// (default: $TMPDIR/millrace-bench-<tokens>).
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
    /// Consumer processes (dp ranks); the baseline runs as many processes.
    #[arg(long, default_value_t = 2)]
    pub consumers: u32,
    /// Steps per streaming run (default: two passes over --tokens, at most 10^9 tokens).
    #[arg(long)]
    pub steps: Option<u64>,
    /// Materializer thread counts of the warm runs, comma-separated.
    #[arg(long, default_value = "1,2", value_delimiter = ',')]
    pub threads: Vec<u32>,
    /// Warm runs per thread count (and warm baseline runs); the median is reported.
    #[arg(long, default_value_t = 5)]
    pub repeat: u32,
    /// Token dtype the daemon delivers.
    #[arg(long, default_value = "int32")]
    pub token_dtype: String,
    /// Skip the cold run (the warm runs then read the whole corpus once first).
    #[arg(long)]
    pub no_cold: bool,
    /// Before each cold run also `sync; echo 3 > /proc/sys/vm/drop_caches` (root only;
    /// a warning otherwise). The shard files are always evicted with posix_fadvise.
    #[arg(long)]
    pub drop_caches: bool,
    /// Step the seek test starts from (default: the step after the streaming run, where
    /// the resume test's cursor points).
    #[arg(long)]
    pub seek_step: Option<u64>,
    /// Tries of each latency test (fresh daemon each); the median is reported.
    #[arg(long, default_value_t = 3)]
    pub latency_repeat: u32,
    /// Bytes of shard files the disk and mmap references read.
    #[arg(long, default_value = "1e9", value_parser = crate::synth::parse_count)]
    pub ref_bytes: u64,
    /// Skip the Python baseline.
    #[arg(long)]
    pub no_baseline: bool,
    /// Python interpreter with numpy for the baseline.
    #[arg(long, default_value = "python3")]
    pub python: String,
    /// Steps per baseline process (default: the streaming steps; the nanoGPT form runs
    /// half as many).
    #[arg(long)]
    pub baseline_steps: Option<u64>,
    /// Seconds of the fairness run (0 skips it): `--fairness-ranks` free-running
    /// consumers of one job, and the max/min of the steps their rings published.
    #[arg(long, default_value_t = 10.0)]
    pub fairness_seconds: f64,
    /// Ranks (dp_size) of the fairness run.
    #[arg(long, default_value_t = 16)]
    pub fairness_ranks: u32,
    /// Run only the fairness figure (no references, streaming, latency or baseline).
    #[arg(long)]
    pub fairness_only: bool,
    /// Write the results as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// No progress display.
    #[arg(long)]
    pub quiet: bool,
}

/// One streaming run of millrace (one daemon, C consumers).
#[derive(Debug, Clone, Serialize)]
pub struct RunFigures {
    /// "cold" or "warm".
    pub cache: String,
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
    /// Daemon spawn to its socket accepting connections (corpus opened, plan built).
    pub daemon_start_s: f64,
    /// Consumers spawned to every consumer holding its first batch.
    pub connect_to_first_batch_s: f64,
    /// Daemon spawn to every consumer holding its first batch.
    pub time_to_first_batch_s: f64,
    /// First batch (any consumer) to last batch (any consumer).
    pub seconds: f64,
    /// Delivered tokens per second (each consumer's first batch excluded).
    pub tokens_per_s: f64,
    /// Delivered payload GB/s (10^9 bytes).
    pub payload_gb_per_s: f64,
    /// payload_gb_per_s / single-thread memcpy GB/s.
    pub ratio_to_memcpy: f64,
    /// Shard bytes behind the delivered tokens per second (tokens/s x source dtype size).
    pub source_gb_per_s: f64,
    /// source_gb_per_s / the page-cache mmap read GB/s (warm) or cold disk read GB/s (cold).
    pub source_ratio_to_read: f64,
    /// Bytes the daemon read from storage (/proc/PID/io read_bytes).
    pub daemon_read_bytes: u64,
    /// Publish-to-wake latency pooled over the consumers.
    pub wake_latency: Latency,
    /// Daemon utime + stime while streaming.
    pub daemon_cpu_seconds: f64,
    /// Daemon CPU seconds per 10^9 delivered tokens.
    pub daemon_cpu_s_per_1e9_tokens: f64,
    /// Daemon CPU per 10^9 tokens / the time one memcpy of their payload takes.
    pub daemon_cpu_ratio_to_memcpy: f64,
    /// Daemon CPU seconds per delivered payload GB.
    pub daemon_cpu_s_per_gb: f64,
    /// Consumer processes' CPU seconds (whole process lives) per 10^9 tokens.
    pub consumer_cpu_s_per_1e9_tokens: f64,
    /// Daemon peak RSS (VmHWM), bytes: includes the shard pages it touched (file-backed).
    pub daemon_vmhwm_bytes: u64,
    /// Daemon anonymous RSS at the end of the run, bytes (its own memory).
    pub daemon_rss_anon_bytes: u64,
    /// Daemon file-backed RSS at the end (mapped shard and index pages, reclaimable).
    pub daemon_rss_file_bytes: u64,
    /// Daemon shared-memory RSS at the end (the rings).
    pub daemon_rss_shmem_bytes: u64,
    /// Daemon minor page faults over its life (first touches of mapped shard pages).
    pub daemon_minor_faults: u64,
    /// Daemon major page faults (a fault that waited for the disk).
    pub daemon_major_faults: u64,
    /// Every consumer's digest of its tokens, equal across runs.
    pub digests: Vec<String>,
    /// tokens/s of every repetition, in run order (the figures above are the median's).
    pub repeats_tokens_per_s: Vec<f64>,
}

/// One latency test (fresh daemon per try, shards warm).
#[derive(Debug, Clone, Serialize)]
pub struct LatencyFigures {
    /// "step 0", "resume from cursor blob", "seek".
    pub what: String,
    /// The step the consumers start at.
    pub step: u64,
    /// Consumers spawned to every consumer holding its first batch, median of the tries.
    pub connect_to_first_batch_s: f64,
    /// Every try.
    pub tries_s: Vec<f64>,
    /// Over the same figure from step 0.
    pub ratio_to_step0: f64,
}

/// The physical references, measured in the same run.
#[derive(Debug, Clone, Serialize)]
pub struct References {
    /// Best single-thread memcpy bandwidth, GB/s (10^9 bytes copied per second).
    pub memcpy_gb_per_s: f64,
    /// Bytes of shard files the two read references cover.
    pub read_bytes: u64,
    /// Sequential `read(2)` of those files just evicted from the page cache, GB/s.
    pub disk_cold_read_gb_per_s: f64,
    /// Share of those files' pages still resident after eviction (should be ~0).
    pub resident_after_evict: f64,
    /// One thread reading them through a fresh mapping (page faults included), GB/s.
    pub mmap_first_touch_gb_per_s: f64,
    /// One thread reading them again through the same mapping, GB/s (the reference).
    pub mmap_read_gb_per_s: f64,
}

/// One baseline run (all processes together).
#[derive(Debug, Clone, Serialize)]
pub struct BaselineFigures {
    /// "best" or "nanogpt".
    pub mode: String,
    /// "cold" or "warm".
    pub cache: String,
    /// Processes.
    pub processes: u32,
    /// Steps per process.
    pub steps: u64,
    /// Tokens of x produced over all processes.
    pub tokens: u64,
    /// Spawn to every process's interpreter having imported numpy.
    pub import_s: f64,
    /// Spawn to every process holding its first batch.
    pub time_to_first_batch_s: f64,
    /// First batch (any process) to last batch (any process).
    pub seconds: f64,
    /// Tokens per second (each process's first batch excluded).
    pub tokens_per_s: f64,
    /// tokens_per_s / millrace's (same cache state, first thread count).
    pub ratio_to_millrace: f64,
    /// CPU seconds of all processes per 10^9 tokens (whole process lives).
    pub cpu_s_per_1e9_tokens: f64,
    /// CPU seconds after the first batch per 10^9 tokens after it: the steady cost a
    /// trainer pays in its own process.
    pub steady_cpu_s_per_1e9_tokens: f64,
    /// Largest peak RSS (VmHWM) of one process, bytes (includes touched file pages).
    pub vmhwm_bytes: u64,
    /// Largest anonymous RSS of one process at its end, bytes.
    pub rss_anon_bytes: u64,
    /// Minor page faults over all processes.
    pub minor_faults: u64,
    /// Major page faults over all processes.
    pub major_faults: u64,
    /// tokens/s of every repetition.
    pub repeats_tokens_per_s: Vec<f64>,
}

/// The fairness run: free-running ranks of one job, each consuming as fast as it can,
/// so every difference in their progress is the daemon's filling order.
#[derive(Debug, Clone, Serialize)]
pub struct FairnessFigures {
    /// Ranks (rings) of the job.
    pub ranks: u32,
    /// Seconds measured (after every rank connected).
    pub seconds: f64,
    /// `[serve] materialize_threads`.
    pub materialize_threads: u32,
    /// `[serve] ring_slots`.
    pub ring_slots: u32,
    /// Steps each ring published in the window, by dp rank.
    pub steps: Vec<u64>,
    /// Fewest steps of any ring.
    pub min_steps: u64,
    /// Most steps of any ring.
    pub max_steps: u64,
    /// max / min (infinite, written as null, when a ring published nothing).
    pub ratio: f64,
}

/// The whole report.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// Cores this process may use.
    pub cpus: usize,
    /// CPU model (/proc/cpuinfo).
    pub cpu_model: String,
    /// Load average when the run started.
    pub loadavg: String,
    /// Corpus directory.
    pub corpus: PathBuf,
    /// Tokens in the corpus.
    pub corpus_tokens: u64,
    /// Bytes of token data (.bin) in the corpus.
    pub corpus_bytes: u64,
    /// Seconds spent writing the corpus in this run (0 when reused).
    pub corpus_write_s: f64,
    /// Inputs per row.
    pub seq_len: u32,
    /// Rows per consumer per step.
    pub rows: u32,
    /// Token dtype delivered.
    pub token_dtype: String,
    /// Single-thread memcpy GB/s (also in `references`; kept at the top level for
    /// readers of the issue-4 report).
    pub memcpy_gb_per_s: f64,
    /// The physical references.
    pub references: References,
    /// The cold run (absent with --no-cold).
    pub cold: Option<RunFigures>,
    /// One warm entry per thread count.
    pub runs: Vec<RunFigures>,
    /// Latency tests.
    pub latency: Vec<LatencyFigures>,
    /// Baseline runs (empty when skipped).
    pub baseline: Vec<BaselineFigures>,
    /// Why the baseline was skipped, if it was.
    pub baseline_skipped: Option<String>,
    /// The fairness run (absent with `--fairness-seconds 0`).
    pub fairness: Option<FairnessFigures>,
    /// Whether every millrace run delivered the same tokens.
    pub same_tokens: bool,
    /// Wall seconds of the whole bench.
    pub wall_s: f64,
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

/// CLOCK_MONOTONIC in ns: the clock the consumers and the baseline stamp batches with.
fn now_ns() -> u64 {
    crate::serve::ring::monotonic_ns()
}

/// Every shard-like file (.bin, .idx, .npy) under `dir`.
fn shard_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
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
            if is_shard {
                out.push(p);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// One file of token data, as the baseline memmaps it.
#[derive(Debug, Clone)]
struct DataFile {
    path: PathBuf,
    /// Where the tokens start (0 for a Megatron .bin, the header for .npy).
    offset: u64,
    bytes: u64,
    dtype: crate::corpus::DType,
}

/// The token-data files of the corpus a config names (opened and closed again).
fn data_files(cfg_path: &Path) -> Result<Vec<DataFile>> {
    let cfg = crate::config::Config::load(cfg_path)?;
    let mut out = Vec::new();
    for (_, shards) in cfg.open_corpus()? {
        for s in shards {
            let bytes = s.data_bytes();
            let (path, offset) = match (s.as_megatron(), s.as_raw()) {
                (Some(m), _) => (m.bin_path().to_path_buf(), 0),
                (None, Some(r)) => (r.path().to_path_buf(), r.file_len().saturating_sub(bytes)),
                (None, None) => continue,
            };
            out.push(DataFile {
                path,
                offset,
                bytes,
                dtype: s.dtype(),
            });
        }
    }
    Ok(out)
}

/// Writes back and drops `files` from the page cache (`fdatasync` first: dirty pages
/// are not dropped).
fn evict(files: &[PathBuf]) -> Result<()> {
    use std::os::fd::AsRawFd;
    for p in files {
        let f = std::fs::File::open(p).with_context(|| format!("opening {}", p.display()))?;
        f.sync_data()
            .with_context(|| format!("fdatasync {}", p.display()))?;
        // SAFETY: a valid open descriptor; fadvise only changes caching.
        let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        if rc != 0 {
            bail!(
                "posix_fadvise(DONTNEED) on {} failed: errno {rc}",
                p.display()
            );
        }
    }
    Ok(())
}

/// `sync; echo 3 > /proc/sys/vm/drop_caches`; false when not permitted.
fn drop_caches() -> bool {
    // SAFETY: sync has no preconditions.
    unsafe { libc::sync() };
    std::fs::write("/proc/sys/vm/drop_caches", "3\n").is_ok()
}

/// Share of the pages of `files` resident in the page cache (mincore).
fn resident_fraction(files: &[PathBuf]) -> Result<f64> {
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize;
    let (mut resident, mut total) = (0u64, 0u64);
    for p in files {
        let f = std::fs::File::open(p).with_context(|| format!("opening {}", p.display()))?;
        let len = f.metadata()?.len() as usize;
        if len == 0 {
            continue;
        }
        // SAFETY: read-only mapping that is never dereferenced (mincore only).
        let map = unsafe { memmap2::Mmap::map(&f) }
            .with_context(|| format!("mapping {}", p.display()))?;
        let pages = len.div_ceil(page);
        let mut vec = vec![0u8; pages];
        // SAFETY: the mapping covers `len` bytes and `vec` has one byte per page.
        let rc = unsafe { libc::mincore(map.as_ptr() as *mut libc::c_void, len, vec.as_mut_ptr()) };
        if rc != 0 {
            bail!(
                "mincore on {}: {}",
                p.display(),
                std::io::Error::last_os_error()
            );
        }
        resident += vec.iter().filter(|&&b| b & 1 == 1).count() as u64;
        total += pages as u64;
    }
    Ok(if total == 0 {
        0.0
    } else {
        resident as f64 / total as f64
    })
}

/// Sums a byte range as u64 words: one thread reading every byte once.
fn sum_words(bytes: &[u8]) -> u64 {
    let mut acc = [0u64; 4];
    let mut chunks = bytes.chunks_exact(32);
    for c in &mut chunks {
        for (k, a) in acc.iter_mut().enumerate() {
            let mut w = [0u8; 8];
            w.copy_from_slice(&c[8 * k..8 * k + 8]);
            *a = a.wrapping_add(u64::from_le_bytes(w));
        }
    }
    let tail: u64 = chunks.remainder().iter().map(|&b| u64::from(b)).sum();
    acc.iter().fold(tail, |x, y| x.wrapping_add(*y))
}

/// The disk and page-cache references over the first `limit` bytes of the data files.
fn references(files: &[DataFile], limit: u64, memcpy: f64) -> Result<References> {
    let mut chosen: Vec<(PathBuf, u64)> = Vec::new();
    let mut left = limit.max(1 << 20);
    for f in files {
        if left == 0 {
            break;
        }
        let n = f.bytes.min(left);
        chosen.push((f.path.clone(), n));
        left -= n;
    }
    let paths: Vec<PathBuf> = chosen.iter().map(|(p, _)| p.clone()).collect();
    evict(&paths)?;
    let resident = resident_fraction(&paths)?;
    let mut buf = vec![0u8; 8 << 20];
    let mut total = 0u64;
    let t = Instant::now();
    for (p, n) in &chosen {
        let mut f = std::fs::File::open(p).with_context(|| format!("opening {}", p.display()))?;
        let mut left = *n;
        while left > 0 {
            let want = (left as usize).min(buf.len());
            let got = f
                .read(&mut buf[..want])
                .with_context(|| format!("reading {}", p.display()))?;
            if got == 0 {
                break;
            }
            left -= got as u64;
            total += got as u64;
        }
    }
    let disk = total as f64 / t.elapsed().as_secs_f64().max(1e-9) / 1e9;
    // Page-cache reads through mappings: first touch (faults) and a second pass.
    let mut maps = Vec::new();
    for (p, n) in &chosen {
        let f = std::fs::File::open(p).with_context(|| format!("opening {}", p.display()))?;
        // SAFETY: read-only mapping of a file nobody truncates during the bench.
        let m = unsafe { memmap2::MmapOptions::new().len(*n as usize).map(&f) }
            .with_context(|| format!("mapping {}", p.display()))?;
        maps.push(m);
    }
    let mut sink = 0u64;
    let t = Instant::now();
    for m in &maps {
        sink = sink.wrapping_add(sum_words(m));
    }
    let first = total as f64 / t.elapsed().as_secs_f64().max(1e-9) / 1e9;
    let mut best = f64::MAX;
    for _ in 0..2 {
        let t = Instant::now();
        for m in &maps {
            sink = sink.wrapping_add(sum_words(m));
        }
        best = best.min(t.elapsed().as_secs_f64());
    }
    std::hint::black_box(sink);
    Ok(References {
        memcpy_gb_per_s: memcpy,
        read_bytes: total,
        disk_cold_read_gb_per_s: disk,
        resident_after_evict: resident,
        mmap_first_touch_gb_per_s: first,
        mmap_read_gb_per_s: total as f64 / best.max(1e-9) / 1e9,
    })
}

/// Reads every file under `dir` once so the shards are in the page cache; returns bytes.
fn warm(dir: &Path) -> Result<u64> {
    let mut total = 0u64;
    let mut buf = vec![0u8; 1 << 22];
    for p in shard_files(dir)? {
        let mut f = std::fs::File::open(&p).with_context(|| format!("opening {}", p.display()))?;
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            total += n as u64;
        }
    }
    Ok(total)
}

/// A field of /proc/PID/status in bytes (`VmHWM`, `RssAnon`, ...).
fn status_bytes(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = text.lines().find(|l| l.split(':').next() == Some(field))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// (minor, major) page faults of process `pid` so far (/proc/PID/stat fields 10 and 12).
fn page_faults(pid: u32) -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state): field 10 is index 7, field 12 index 9.
    Some((f.get(7)?.parse().ok()?, f.get(9)?.parse().ok()?))
}

/// `read_bytes` of /proc/PID/io: bytes the process caused to be read from storage.
fn io_read_bytes(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/io")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("read_bytes:"))
        .and_then(|v| v.trim().parse().ok())
}

fn bar(show: bool, len: u64, prefix: String) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr_with_hz(4));
    let style = ProgressStyle::with_template(
        "{prefix:>22} [{elapsed_precise}] [{bar:30}] {pos}/{len} steps {msg}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("=> ");
    pb.set_style(style);
    pb.set_prefix(prefix);
    pb
}

/// Where a streaming run starts.
#[derive(Debug, Clone)]
enum Start {
    Zero,
    /// One hex cursor file per rank.
    Cursor(Vec<PathBuf>),
    Step(u64),
}

/// What a streaming run measured, before it becomes [`RunFigures`].
struct Streamed {
    summaries: Vec<ConsumeSummary>,
    daemon_start_s: f64,
    connect_to_first_batch_s: f64,
    time_to_first_batch_s: f64,
    daemon_cpu: f64,
    read_bytes: u64,
    vmhwm: u64,
    rss_anon: u64,
    rss_file: u64,
    rss_shmem: u64,
    faults: (u64, u64),
}

/// Everything a run needs that does not change between runs.
struct Ctx<'a> {
    args: &'a BenchArgs,
    dir: &'a Path,
    base_cfg: PathBuf,
    exe: PathBuf,
    show: bool,
    refs: References,
    source_bytes_per_token: f64,
}

impl Ctx<'_> {
    /// Writes the config for `threads` and returns (config, socket).
    fn config(&self, threads: u32) -> Result<(PathBuf, PathBuf)> {
        let cfg = self.dir.join(format!("bench-t{threads}.toml"));
        let socket = socket_path_in(self.dir, &format!("bench-t{threads}.sock"));
        let global = i64::from(self.args.rows) * i64::from(self.args.consumers);
        write_config(
            &self.base_cfg,
            &cfg,
            &[
                (
                    "socket",
                    toml::Value::String(socket.to_string_lossy().to_string()),
                ),
                ("materialize_threads", toml::Value::Integer(threads.into())),
                ("ring_slots", toml::Value::Integer(4)),
                (
                    "token_dtype",
                    toml::Value::String(self.args.token_dtype.clone()),
                ),
            ],
            &[
                ("seq_len", toml::Value::Integer(self.args.seq_len.into())),
                ("global_batch_rows", toml::Value::Integer(global)),
            ],
        )?;
        Ok((cfg, socket))
    }

    /// Starts a daemon and `consumers` consumers from `start`, streams `steps` steps.
    fn stream(
        &self,
        threads: u32,
        steps: u64,
        start: &Start,
        save_cursors: Option<&[PathBuf]>,
        label: &str,
    ) -> Result<Streamed> {
        let args = self.args;
        let (cfg, socket) = self.config(threads)?;
        let t_spawn = now_ns();
        let mut daemon = Daemon::start_polling(
            &self.exe,
            &cfg,
            &socket,
            &self.dir.join(format!("serve-t{threads}.log")),
            Duration::from_millis(1),
        )?;
        let t_accept = now_ns();
        let pid = daemon.pid();
        let cpu0 = cpu_seconds(pid).context("reading the daemon's /proc/PID/stat")?;
        let pb = bar(
            self.show && steps > 50,
            steps * u64::from(args.consumers),
            label.to_string(),
        );
        let mut workers = Vec::new();
        let mut progress = Vec::new();
        let t_consumers = now_ns();
        for r in 0..args.consumers {
            let mut extra: Vec<String> = ["--touch", "--progress", "--job", "bench"]
                .iter()
                .map(|s| s.to_string())
                .collect();
            match start {
                Start::Zero => {}
                Start::Step(s) => extra.extend(["--start-step".to_string(), s.to_string()]),
                Start::Cursor(files) => {
                    let f = files
                        .get(r as usize)
                        .context("no cursor file for this rank")?;
                    extra.extend(["--cursor-file".to_string(), f.display().to_string()]);
                }
            }
            if let Some(files) = save_cursors {
                if let Some(f) = files.get(r as usize) {
                    extra.extend(["--save-cursor".to_string(), f.display().to_string()]);
                }
            }
            let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
            let mut g = spawn_rust_consumer(&socket, r, args.consumers, args.rows, steps, &extra)?;
            let p = Arc::new(AtomicU64::new(0));
            progress.push(p.clone());
            workers.push(std::thread::spawn(move || {
                collect_summary(&mut g, CHILD_TIMEOUT, Some(p))
            }));
        }
        while workers.iter().any(|w| !w.is_finished()) {
            pb.set_position(progress.iter().map(|p| p.load(Ordering::Relaxed)).sum());
            std::thread::sleep(Duration::from_millis(50));
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
        let st = |f: &str| status_bytes(pid, f).unwrap_or(0);
        let (vmhwm, rss_anon, rss_file, rss_shmem) =
            (st("VmHWM"), st("RssAnon"), st("RssFile"), st("RssShmem"));
        let read_bytes = io_read_bytes(pid).unwrap_or(0);
        let faults = page_faults(pid).unwrap_or((0, 0));
        pb.finish_and_clear();
        daemon.stop();
        let first = summaries
            .iter()
            .map(|s| s.first_batch_ns)
            .max()
            .unwrap_or(0);
        let s = |a: u64, b: u64| a.saturating_sub(b) as f64 / 1e9;
        Ok(Streamed {
            daemon_start_s: s(t_accept, t_spawn),
            connect_to_first_batch_s: s(first, t_consumers),
            time_to_first_batch_s: s(first, t_spawn),
            summaries,
            daemon_cpu: cpu1 - cpu0,
            read_bytes,
            vmhwm,
            rss_anon,
            rss_file,
            rss_shmem,
            faults,
        })
    }

    /// A streaming run's figures.
    fn figures(&self, cache: &str, threads: u32, steps: u64, x: Streamed) -> RunFigures {
        let summaries = &x.summaries;
        let memcpy = self.refs.memcpy_gb_per_s;
        let tokens: u64 = summaries.iter().map(|s| s.tokens).sum();
        let payload: u64 = summaries.iter().map(|s| s.payload_bytes).sum();
        let secs = crate::client::span_seconds(summaries);
        // Each consumer's first batch arrives at the start of the span: not counted.
        let first_share = 1.0 / steps.max(1) as f64;
        let tokens_after = tokens as f64 * (1.0 - first_share);
        let payload_after = payload as f64 * (1.0 - first_share);
        let rate = |v: f64| if secs > 0.0 { v / secs } else { 0.0 };
        let mut lat: Vec<u64> = summaries
            .iter()
            .flat_map(|s| s.wake_latency_ns.iter().copied())
            .collect();
        let gbps = rate(payload_after) / 1e9;
        let tok_rate = rate(tokens_after);
        let source = tok_rate * self.source_bytes_per_token / 1e9;
        let read_ref = if cache == "cold" {
            self.refs.disk_cold_read_gb_per_s
        } else {
            self.refs.mmap_read_gb_per_s
        };
        let per_1e9 = |v: f64| v / (tokens as f64 / 1e9).max(1e-12);
        let payload_per_token = payload as f64 / (tokens as f64).max(1.0);
        let memcpy_s_per_1e9 = payload_per_token / memcpy.max(1e-12);
        let cpu_1e9 = per_1e9(x.daemon_cpu);
        RunFigures {
            cache: cache.to_string(),
            materialize_threads: threads,
            steps,
            consumers: self.args.consumers,
            tokens,
            payload_bytes: payload,
            daemon_start_s: x.daemon_start_s,
            connect_to_first_batch_s: x.connect_to_first_batch_s,
            time_to_first_batch_s: x.time_to_first_batch_s,
            seconds: secs,
            tokens_per_s: tok_rate,
            payload_gb_per_s: gbps,
            ratio_to_memcpy: gbps / memcpy.max(1e-12),
            source_gb_per_s: source,
            source_ratio_to_read: source / read_ref.max(1e-12),
            daemon_read_bytes: x.read_bytes,
            wake_latency: Latency::from_ns(&mut lat),
            daemon_cpu_seconds: x.daemon_cpu,
            daemon_cpu_s_per_1e9_tokens: cpu_1e9,
            daemon_cpu_ratio_to_memcpy: cpu_1e9 / memcpy_s_per_1e9.max(1e-12),
            daemon_cpu_s_per_gb: x.daemon_cpu / (payload as f64 / 1e9).max(1e-12),
            consumer_cpu_s_per_1e9_tokens: per_1e9(
                summaries.iter().map(|s| s.cpu_seconds).sum::<f64>(),
            ),
            daemon_vmhwm_bytes: x.vmhwm,
            daemon_rss_anon_bytes: x.rss_anon,
            daemon_rss_file_bytes: x.rss_file,
            daemon_rss_shmem_bytes: x.rss_shmem,
            daemon_minor_faults: x.faults.0,
            daemon_major_faults: x.faults.1,
            digests: summaries.iter().map(|s| s.digest.clone()).collect(),
            repeats_tokens_per_s: Vec::new(),
        }
    }
}

/// The JSON line `scripts/nanogpt-baseline.py` prints.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
struct BaselineLine {
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
fn python_problem(python: &str) -> Option<String> {
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
fn run_baseline(
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

fn median_by<T: Clone>(mut v: Vec<T>, key: impl Fn(&T) -> f64) -> Option<T> {
    v.sort_by(|a, b| key(a).total_cmp(&key(b)));
    let n = v.len();
    (n > 0).then(|| v.swap_remove(n / 2))
}

/// "min-max" of the repetitions, "-" for one.
fn range(v: &[f64]) -> String {
    if v.len() < 2 {
        return "-".into();
    }
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(0.0, f64::max);
    format!("{lo:.2e}-{hi:.2e}")
}

fn mb(b: u64) -> String {
    format!("{:.0} MB", b as f64 / 1e6)
}

fn ms(s: f64) -> String {
    if s < 1.0 {
        format!("{:.1} ms", s * 1e3)
    } else {
        format!("{s:.2} s")
    }
}

/// Renders the report as markdown tables.
pub fn render(r: &BenchReport) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let f = &r.references;
    let _ = writeln!(
        s,
        "{} cpus ({}), load {}; corpus {} ({} tokens, {:.2} GB of tokens{}); {} rows x {} per consumer per step, {}",
        r.cpus,
        r.cpu_model,
        r.loadavg,
        r.corpus.display(),
        crate::util::thousands(r.corpus_tokens),
        r.corpus_bytes as f64 / 1e9,
        if r.corpus_write_s > 0.0 {
            format!(", written in {:.2} s", r.corpus_write_s)
        } else {
            String::new()
        },
        r.rows,
        r.seq_len,
        r.token_dtype
    );
    let _ = writeln!(s, "\nreferences (same run):");
    let _ = writeln!(s, "| reference | GB/s |");
    let _ = writeln!(s, "| --- | --- |");
    let _ = writeln!(s, "| single-thread memcpy | {:.2} |", f.memcpy_gb_per_s);
    let _ = writeln!(
        s,
        "| cold sequential read of {:.2} GB of shards ({:.1}% resident after evict) | {:.2} |",
        f.read_bytes as f64 / 1e9,
        100.0 * f.resident_after_evict,
        f.disk_cold_read_gb_per_s
    );
    let _ = writeln!(
        s,
        "| page-cache read through mmap (first touch / again) | {:.2} / {:.2} |",
        f.mmap_first_touch_gb_per_s, f.mmap_read_gb_per_s
    );
    let _ = writeln!(s, "\nmillrace streaming (consumers read every byte):");
    let _ = writeln!(
        s,
        "| cache | threads | steps | daemon start | first batch | tokens/s (median) | min-max | payload GB/s | / memcpy | source GB/s | / read ref | disk read | wake p50/p99 us | daemon CPU s per 1e9 tok | / memcpy time | consumer CPU s per 1e9 | daemon VmHWM | RssAnon | RssFile | RssShmem | faults minor/major |"
    );
    let _ = writeln!(s, "|{}", " --- |".repeat(21));
    for x in r.cold.iter().chain(&r.runs) {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {:.3e} | {} | {:.3} | {:.3} | {:.3} | {:.3} | {} | {:.0}/{:.0} | {:.2} | {:.2} | {:.2} | {} | {} | {} | {} | {}/{} |",
            x.cache,
            x.materialize_threads,
            x.steps,
            ms(x.daemon_start_s),
            ms(x.time_to_first_batch_s),
            x.tokens_per_s,
            range(&x.repeats_tokens_per_s),
            x.payload_gb_per_s,
            x.ratio_to_memcpy,
            x.source_gb_per_s,
            x.source_ratio_to_read,
            mb(x.daemon_read_bytes),
            x.wake_latency.p50_us,
            x.wake_latency.p99_us,
            x.daemon_cpu_s_per_1e9_tokens,
            x.daemon_cpu_ratio_to_memcpy,
            x.consumer_cpu_s_per_1e9_tokens,
            mb(x.daemon_vmhwm_bytes),
            mb(x.daemon_rss_anon_bytes),
            mb(x.daemon_rss_file_bytes),
            mb(x.daemon_rss_shmem_bytes),
            x.daemon_minor_faults,
            x.daemon_major_faults
        );
    }
    if !r.latency.is_empty() {
        let _ = writeln!(
            s,
            "\nconnect to first batch, fresh daemon, shards warm (consumer spawn included):"
        );
        let _ = writeln!(s, "| start | step | median | tries | / step 0 |");
        let _ = writeln!(s, "| --- | --- | --- | --- | --- |");
        for l in &r.latency {
            let tries: Vec<String> = l.tries_s.iter().map(|t| ms(*t)).collect();
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {:.2} |",
                l.what,
                l.step,
                ms(l.connect_to_first_batch_s),
                tries.join(", "),
                l.ratio_to_step0
            );
        }
    }
    if let Some(why) = &r.baseline_skipped {
        let _ = writeln!(s, "\nbaseline skipped: {why}");
    } else if !r.baseline.is_empty() {
        let _ = writeln!(
            s,
            "\nbaseline: nanoGPT get_batch over numpy memmaps of the same .bin files ({} processes):",
            r.baseline.first().map_or(0, |b| b.processes)
        );
        let _ = writeln!(
            s,
            "| form | cache | steps | numpy imported | first batch | tokens/s (median) | min-max | / millrace | CPU s per 1e9 tok (all / steady) | VmHWM | RssAnon | faults minor/major |"
        );
        let _ = writeln!(s, "|{}", " --- |".repeat(12));
        for b in &r.baseline {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {:.3e} | {} | {:.3} | {:.2} / {:.2} | {} | {} | {}/{} |",
                b.mode,
                b.cache,
                b.steps,
                ms(b.import_s),
                ms(b.time_to_first_batch_s),
                b.tokens_per_s,
                range(&b.repeats_tokens_per_s),
                b.ratio_to_millrace,
                b.cpu_s_per_1e9_tokens,
                b.steady_cpu_s_per_1e9_tokens,
                mb(b.vmhwm_bytes),
                mb(b.rss_anon_bytes),
                b.minor_faults,
                b.major_faults
            );
        }
    }
    if let Some(f) = &r.fairness {
        s.push('\n');
        s.push_str(&render_fairness(f));
    }
    s
}

/// The fairness figure as a line of text.
fn render_fairness(f: &FairnessFigures) -> String {
    format!(
        "fairness: {} free-running ranks for {:.0} s ({} materialize threads, {} slots): \
         published steps per ring min {} max {}, max/min {:.2}\nper rank: {:?}\n",
        f.ranks,
        f.seconds,
        f.materialize_threads,
        f.ring_slots,
        f.min_steps,
        f.max_steps,
        f.ratio,
        f.steps
    )
}

/// Published step of each ring of `job`, by dp rank, from the daemon's STATUS.
fn published_steps(socket: &Path, job: &str, ranks: u32) -> Result<Vec<u64>> {
    let r = crate::ctl::request(
        socket,
        &crate::ctl::status_request(),
        Duration::from_secs(30),
    )?;
    let mut out = vec![None; ranks as usize];
    for j in r["status"]["jobs"].as_array().into_iter().flatten() {
        if j["job"].as_str() != Some(job) {
            continue;
        }
        for ring in j["rings"].as_array().into_iter().flatten() {
            let rank = ring["dp_rank"]
                .as_u64()
                .context("STATUS ring without dp_rank")?;
            let step = ring["published_step"]
                .as_u64()
                .context("STATUS ring without published_step")?;
            if let Some(slot) = out.get_mut(rank as usize) {
                *slot = Some(step);
            }
        }
    }
    out.into_iter()
        .enumerate()
        .map(|(r, s)| s.with_context(|| format!("STATUS lists no ring for {job} rank {r}")))
        .collect()
}

/// The fairness run: a daemon, `ranks` in-process consumers of one job that take each
/// batch as soon as it is published, and the steps each ring published over `seconds`
/// once all are connected.
fn fairness(
    args: &BenchArgs,
    dir: &Path,
    base_cfg: &Path,
    exe: &Path,
    threads: u32,
) -> Result<FairnessFigures> {
    use crate::client::{Client, Hello};
    use std::sync::atomic::AtomicBool;
    const JOB: &str = "fairness";
    const SLOTS: u32 = 4;
    let ranks = args.fairness_ranks;
    if ranks == 0 || !(args.fairness_seconds > 0.0 && args.fairness_seconds.is_finite()) {
        bail!("--fairness-ranks and --fairness-seconds must be positive");
    }
    let cfg = dir.join("bench-fairness.toml");
    let socket = socket_path_in(dir, "bench-fairness.sock");
    write_config(
        base_cfg,
        &cfg,
        &[
            (
                "socket",
                toml::Value::String(socket.to_string_lossy().to_string()),
            ),
            ("materialize_threads", toml::Value::Integer(threads.into())),
            ("ring_slots", toml::Value::Integer(SLOTS.into())),
            ("token_dtype", toml::Value::String(args.token_dtype.clone())),
        ],
        &[
            ("seq_len", toml::Value::Integer(args.seq_len.into())),
            (
                "global_batch_rows",
                toml::Value::Integer(i64::from(args.rows) * i64::from(ranks)),
            ),
        ],
    )?;
    let mut daemon = Daemon::start_polling(
        exe,
        &cfg,
        &socket,
        &dir.join("serve-fairness.log"),
        Duration::from_millis(10),
    )?;
    let stop = Arc::new(AtomicBool::new(false));
    let start = Arc::new(std::sync::Barrier::new(ranks as usize + 1));
    let mut consumers = Vec::new();
    for r in 0..ranks {
        let mut hello = Hello::whole_slice(r, ranks);
        hello.job = JOB.into();
        let mut c = Client::connect(&socket, &hello)
            .with_context(|| format!("fairness consumer {r} connecting"))?;
        c.set_timeout(Some(Duration::from_secs(120)));
        let (stop, start) = (stop.clone(), start.clone());
        consumers.push(std::thread::spawn(move || -> Result<()> {
            start.wait();
            while !stop.load(Ordering::Relaxed) {
                c.next_batch()
                    .with_context(|| format!("fairness consumer {r}"))?;
            }
            Ok(())
        }));
    }
    start.wait();
    let before = published_steps(&socket, JOB, ranks);
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs_f64(args.fairness_seconds));
    let after = published_steps(&socket, JOB, ranks);
    let seconds = t0.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for c in consumers {
        match c.join() {
            Ok(r) => r?,
            Err(_) => bail!("a fairness consumer thread panicked"),
        }
    }
    daemon.stop();
    let steps: Vec<u64> = after?
        .iter()
        .zip(before?)
        .map(|(a, b)| a.saturating_sub(b))
        .collect();
    let min_steps = steps.iter().copied().min().unwrap_or(0);
    let max_steps = steps.iter().copied().max().unwrap_or(0);
    Ok(FairnessFigures {
        ranks,
        seconds,
        materialize_threads: threads,
        ring_slots: SLOTS,
        ratio: max_steps as f64 / min_steps as f64,
        steps,
        min_steps,
        max_steps,
    })
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_default()
}

/// Runs `millrace bench`.
pub fn run(args: BenchArgs) -> Result<()> {
    let wall = Instant::now();
    if args.consumers == 0 || args.rows == 0 || args.seq_len == 0 || args.threads.is_empty() {
        bail!("--consumers, --rows, --seq-len and --threads must be positive");
    }
    let show = !args.quiet && std::io::stderr().is_terminal();
    let say = |m: &str| {
        if !args.quiet {
            eprintln!("{m}");
        }
    };
    let dir = args
        .dir
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join(format!("millrace-bench-{}", args.tokens)));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let loadavg = std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default();
    let t = Instant::now();
    let mut corpus_write_s = 0.0;
    if ensure_corpus(&dir, args.tokens, show)? {
        corpus_write_s = t.elapsed().as_secs_f64();
        say(&format!(
            "wrote a {} token corpus to {} in {corpus_write_s:.1} s",
            crate::util::thousands(args.tokens),
            dir.display(),
        ));
    }
    let base_cfg = dir.join("millrace.toml");
    if args.fairness_only {
        say(&format!(
            "fairness: {} free-running ranks for {} s",
            args.fairness_ranks, args.fairness_seconds
        ));
        let f = fairness(
            &args,
            &dir,
            &base_cfg,
            &std::env::current_exe()?,
            args.threads[0],
        )?;
        print!("{}", render_fairness(&f));
        if let Some(path) = &args.json {
            std::fs::write(path, serde_json::to_string_pretty(&f)?)
                .with_context(|| format!("writing {}", path.display()))?;
        }
        return Ok(());
    }
    let files = data_files(&base_cfg)?;
    let corpus_bytes: u64 = files.iter().map(|f| f.bytes).sum();
    let corpus_tokens: u64 = files.iter().map(|f| f.bytes / f.dtype.size() as u64).sum();
    let source_bytes_per_token = corpus_bytes as f64 / (corpus_tokens as f64).max(1.0);
    let all_files = shard_files(&dir)?;

    say("measuring references: memcpy, cold disk read, page-cache mmap read");
    let memcpy = memcpy_gb_per_s(256 << 20, 5);
    let refs = references(&files, args.ref_bytes, memcpy)?;

    let per_step = u64::from(args.rows) * u64::from(args.seq_len) * u64::from(args.consumers);
    let steps = args
        .steps
        .unwrap_or_else(|| ((2 * corpus_tokens).min(1_000_000_000) / per_step.max(1)).max(100));
    let ctx = Ctx {
        args: &args,
        dir: &dir,
        base_cfg: base_cfg.clone(),
        exe: std::env::current_exe()?,
        show,
        refs: refs.clone(),
        source_bytes_per_token,
    };
    let cursors: Vec<PathBuf> = (0..args.consumers)
        .map(|r| dir.join(format!("bench-cursor-r{r}.hex")))
        .collect();
    let threads0 = args.threads[0];
    let mut first_digests: Option<Vec<String>> = None;
    let mut same_tokens = true;
    let mut check = |d: &Vec<String>| match &first_digests {
        None => first_digests = Some(d.clone()),
        Some(f) => same_tokens &= f == d,
    };

    let cold_evict = |what: &str| -> Result<()> {
        if args.drop_caches && !drop_caches() {
            say("warning: cannot write /proc/sys/vm/drop_caches (not root?); evicting the shard files only");
        }
        evict(&all_files)?;
        let left = resident_fraction(&all_files)?;
        say(&format!(
            "{what}: evicted the shard files ({:.1}% of their pages still resident)",
            100.0 * left
        ));
        Ok(())
    };

    // Cold: the first run also saves the cursor the resume test starts from.
    let mut cold = None;
    if !args.no_cold {
        cold_evict("millrace cold")?;
        let x = ctx.stream(
            threads0,
            steps,
            &Start::Zero,
            Some(&cursors),
            "millrace cold",
        )?;
        let f = ctx.figures("cold", threads0, steps, x);
        check(&f.digests);
        cold = Some(f);
    } else {
        say("reading the whole corpus into the page cache");
        warm(&dir)?;
    }

    let mut runs = Vec::new();
    for &threads in &args.threads {
        let mut reps = Vec::new();
        for i in 0..args.repeat.max(1) {
            let save = (cold.is_none() && reps.is_empty() && runs.is_empty()).then_some(&cursors);
            let x = ctx.stream(
                threads,
                steps,
                &Start::Zero,
                save.map(|v| v.as_slice()),
                &format!("warm t={threads} #{}", i + 1),
            )?;
            let r = ctx.figures("warm", threads, steps, x);
            check(&r.digests);
            reps.push(r);
        }
        let all: Vec<f64> = reps.iter().map(|r| r.tokens_per_s).collect();
        if let Some(mut m) = median_by(reps, |r| r.tokens_per_s) {
            m.repeats_tokens_per_s = all;
            runs.push(m);
        }
    }

    // Latency: fresh daemon per try; step 0, the saved cursor, a seek.
    say("latency: step 0, resume from the saved cursor blob, seek");
    let seek = args.seek_step.unwrap_or(steps);
    let lat_steps = 4;
    let mut latency = Vec::new();
    let kinds = [
        ("step 0", Start::Zero, 0),
        (
            "resume from cursor blob",
            Start::Cursor(cursors.clone()),
            steps,
        ),
        ("seek (start_step)", Start::Step(seek), seek),
    ];
    for (what, start, step) in kinds {
        let mut tries = Vec::new();
        for _ in 0..args.latency_repeat.max(1) {
            let x = ctx.stream(threads0, lat_steps, &start, None, what)?;
            let first_step = x.summaries.iter().map(|s| s.first_step).min().unwrap_or(0);
            if first_step != step {
                bail!("{what}: the consumers started at step {first_step}, expected {step}");
            }
            tries.push(x.connect_to_first_batch_s);
        }
        let mut sorted = tries.clone();
        sorted.sort_by(f64::total_cmp);
        latency.push(LatencyFigures {
            what: what.to_string(),
            step,
            connect_to_first_batch_s: sorted[sorted.len() / 2],
            tries_s: tries,
            ratio_to_step0: 0.0,
        });
    }
    let step0 = latency.first().map_or(0.0, |l| l.connect_to_first_batch_s);
    for l in &mut latency {
        l.ratio_to_step0 = l.connect_to_first_batch_s / step0.max(1e-12);
    }

    // The baseline, same corpus, same processes x rows x seq_len.
    let mut baseline = Vec::new();
    let baseline_skipped = if args.no_baseline {
        Some("--no-baseline".to_string())
    } else {
        python_problem(&args.python)
    };
    if let Some(why) = &baseline_skipped {
        say(&format!("baseline skipped: {why}"));
    } else {
        let bsteps = args.baseline_steps.unwrap_or(steps);
        let mill_warm = runs.first().map_or(0.0, |r| r.tokens_per_s);
        let mill_cold = cold.as_ref().map_or(mill_warm, |r| r.tokens_per_s);
        if !args.no_cold {
            cold_evict("baseline cold")?;
            let mut b = run_baseline(&args, &files, "best", "cold", bsteps, show)?;
            b.ratio_to_millrace = b.tokens_per_s / mill_cold.max(1e-12);
            baseline.push(b);
        }
        let mut reps = Vec::new();
        for _ in 0..args.repeat.max(1) {
            reps.push(run_baseline(&args, &files, "best", "warm", bsteps, show)?);
        }
        let all: Vec<f64> = reps.iter().map(|r| r.tokens_per_s).collect();
        if let Some(mut m) = median_by(reps, |r| r.tokens_per_s) {
            m.repeats_tokens_per_s = all;
            m.ratio_to_millrace = m.tokens_per_s / mill_warm.max(1e-12);
            baseline.push(m);
        }
        // nanoGPT as written: warm (its windows are the best form's first ones).
        let mut b = run_baseline(&args, &files, "nanogpt", "warm", (bsteps / 2).max(2), show)?;
        b.ratio_to_millrace = b.tokens_per_s / mill_warm.max(1e-12);
        baseline.push(b);
    }

    let fairness_figures = if args.fairness_seconds > 0.0 {
        say(&format!(
            "fairness: {} free-running ranks for {} s",
            args.fairness_ranks, args.fairness_seconds
        ));
        Some(fairness(&args, &dir, &base_cfg, &ctx.exe, threads0)?)
    } else {
        None
    };

    let report = BenchReport {
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        cpu_model: cpu_model(),
        loadavg,
        corpus: dir.clone(),
        corpus_tokens,
        corpus_bytes,
        corpus_write_s,
        seq_len: args.seq_len,
        rows: args.rows,
        token_dtype: args.token_dtype.clone(),
        memcpy_gb_per_s: refs.memcpy_gb_per_s,
        references: refs,
        cold,
        runs,
        latency,
        baseline,
        baseline_skipped,
        fairness: fairness_figures,
        same_tokens,
        wall_s: wall.elapsed().as_secs_f64(),
    };
    let mut out = std::io::stdout().lock();
    write!(out, "{}", render(&report))?;
    if same_tokens {
        writeln!(
            out,
            "\nevery run delivered the same tokens (equal xxh3 digests per consumer)"
        )?;
    } else {
        writeln!(
            out,
            "\nWARNING: the token digests differ between runs: {:?}",
            report
                .cold
                .iter()
                .chain(&report.runs)
                .map(|r| &r.digests)
                .collect::<Vec<_>>()
        )?;
    }
    writeln!(out, "bench wall time {:.1} s", report.wall_s)?;
    if let Some(path) = &args.json {
        let mut doc = serde_json::to_value(&report)?;
        if let Some(o) = doc.as_object_mut() {
            o.insert(
                "generated_by".into(),
                serde_json::Value::String(format!("millrace {}", env!("CARGO_PKG_VERSION"))),
            );
        }
        std::fs::write(path, serde_json::to_string_pretty(&doc)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sum_words_reads_every_byte() {
        let v: Vec<u8> = (0..1000u32).map(|i| (i % 251) as u8).collect();
        let words: u64 = v
            .chunks(8)
            .map(|c| {
                let mut w = [0u8; 8];
                w[..c.len()].copy_from_slice(c);
                u64::from_le_bytes(w)
            })
            .fold(0u64, u64::wrapping_add);
        // 1000 = 31 x 32 + 8: the 8-byte tail is summed per byte.
        let tail: u64 = v[992..].iter().map(|&b| u64::from(b)).sum();
        let head = words.wrapping_sub(u64::from_le_bytes(v[992..1000].try_into().unwrap()));
        assert_eq!(sum_words(&v), head.wrapping_add(tail));
    }

    #[test]
    fn median_and_range() {
        let m = median_by(vec![3.0, 1.0, 2.0], |x| *x);
        assert_eq!(m, Some(2.0));
        assert_eq!(median_by(Vec::<f64>::new(), |x| *x), None);
        assert_eq!(range(&[1.0]), "-");
        assert_eq!(range(&[2e8, 1e8]), "1.00e8-2.00e8");
    }

    #[test]
    fn own_status_and_io() {
        let pid = std::process::id();
        assert!(status_bytes(pid, "VmHWM").is_some_and(|b| b > 0));
        assert_eq!(status_bytes(pid, "NoSuchField"), None);
        // /proc/PID/io needs the same user; present for our own process.
        assert!(io_read_bytes(pid).is_some());
        assert!(page_faults(pid).is_some_and(|(minor, _)| minor > 0));
    }
}
