//! Reads straight into the ring (issue 15 item 4): the five ways of filling compact
//! slots from shard files, on the spans of real planned steps, warm and cold, in one run
//! so that the ratios between them are comparable on a shared machine.
//!
//! 1. `mmap+willneed`: copy from mappings advised MADV_RANDOM, with MADV_WILLNEED over
//!    the spans of the step `--prefetch` steps ahead (what the daemon does today);
//! 2. `mmap`: copy from plain mappings, relying on the kernel's readahead;
//! 3. `pread`: one `pread` per span ([`PreadReader`], the io_uring fallback);
//! 4. `uring`: io_uring READs through the page cache ([`UringReader`]);
//! 5. `uring-direct`: io_uring READs with O_DIRECT (aligned bounce reads).
//!
//! Each run fills one slot buffer of `global_batch_rows x (seq_len + 1)` tokens per step
//! (the compact layout: the shard's own dtype, bytes unchanged). Cold runs first drop
//! the shard files from the page cache with posix_fadvise(DONTNEED); warm runs follow a
//! pass that read every span. Per run: wall time, tokens/s, CPU seconds of the process
//! (getrusage, io-wq workers included), and bytes read from storage (`read_bytes` of
//! /proc/self/io) against bytes delivered. Before timing, every method's first steps are
//! checked byte for byte against pread's.
//!
//!     cargo bench --bench uring -- --tokens 1e9 --dir /work/bench-corpora/c9 [--bytes 1e9]
//!         [--repeat 3] [--cold-repeat 1] [--prefetch 4] [--depth 256]
//!
//! The corpus is synthesized into `--dir` (as `millrace bench` does) when it holds no
//! `millrace.toml`. Results go to docs/BENCHMARKS.md ("Reads straight into the ring").
//! Under `cargo test --benches` (no `--bench` argument) it is a test instead: a 10^6-token
//! corpus in a temporary directory, every method checked against pread, nothing timed.

use std::fs::File;
use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use memmap2::{Advice, Mmap};
use millrace::config::Config;
use millrace::serve::uring::{
    data_path, segment_span, PreadReader, ReadError, Span, UringOptions, UringReader,
};

/// Command-line options (`cargo bench` adds `--bench`, which is ignored).
struct Args {
    dir: Option<PathBuf>,
    tokens: u64,
    bytes: u64,
    repeat: usize,
    cold_repeat: usize,
    prefetch: usize,
    depth: u32,
    methods: Vec<String>,
    /// `cargo bench` passes `--bench`; without it (`cargo test --benches`) the run is a
    /// test: a small corpus, the byte-for-byte check, no timings.
    bench: bool,
}

fn args() -> Result<Args> {
    let mut a = Args {
        dir: None,
        tokens: 1_000_000_000,
        bytes: 1_000_000_000,
        repeat: 3,
        cold_repeat: 1,
        prefetch: 4,
        depth: UringOptions::default().depth,
        methods: METHODS.iter().map(|m| m.to_string()).collect(),
        bench: false,
    };
    if !std::env::args().any(|x| x == "--bench") {
        (a.tokens, a.bytes) = (1_000_000, 10_000_000);
    }
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || it.next().with_context(|| format!("{k} needs a value"));
        let count = |s: String| millrace::util::parse_count(&s).map_err(anyhow::Error::msg);
        match k.as_str() {
            "--dir" => a.dir = Some(PathBuf::from(v()?)),
            "--tokens" => a.tokens = count(v()?)?,
            "--bytes" => a.bytes = count(v()?)?,
            "--repeat" => a.repeat = v()?.parse()?,
            "--cold-repeat" => a.cold_repeat = v()?.parse()?,
            "--prefetch" => a.prefetch = v()?.parse()?,
            "--depth" => a.depth = v()?.parse()?,
            "--methods" => a.methods = v()?.split(',').map(str::to_string).collect(),
            "--bench" => a.bench = true,
            other => bail!("unknown argument {other}"),
        }
    }
    Ok(a)
}

const METHODS: [&str; 5] = ["mmap+willneed", "mmap", "pread", "uring", "uring-direct"];

/// The spans of every step, and the slot size they fill.
struct Steps {
    files: Vec<PathBuf>,
    steps: Vec<Vec<Span>>,
    slot: usize,
    token_size: usize,
}

/// Plans steps from the start of the corpus's plan until `bytes` would be delivered.
fn plan(cfg: &Path, bytes: u64) -> Result<Steps> {
    let cfg = Config::load(cfg)?;
    let loaded = cfg.load_plan()?;
    let pc = loaded.plan.config().clone();
    let mut files = Vec::new();
    let mut index = Vec::new();
    for shards in &loaded.shards {
        index.push(files.len() as u32);
        files.extend(shards.iter().map(|s| data_path(s).to_path_buf()));
    }
    let token_size = loaded.shards[0][0].dtype().size();
    let row = (pc.seq_len as usize + 1) * token_size;
    let slot = pc.global_batch_rows as usize * row;
    let mut planner = loaded.plan.start();
    let mut steps = Vec::new();
    while (steps.len() * slot) < bytes as usize {
        let batch = planner.next_batch();
        let mut spans = Vec::new();
        for (r, row_plan) in batch.rows.iter().enumerate() {
            let mut at = (r * row) as u64;
            let d = row_plan.domain as usize;
            for seg in &row_plan.segments {
                let shard = &loaded.shards[d][seg.shard as usize];
                if shard.dtype().size() != token_size {
                    bail!("{}: a compact slot needs one dtype", shard.path().display());
                }
                let file = index[d] + seg.shard;
                if let Some(s) = segment_span(shard, file, seg, at)? {
                    at += s.len;
                    spans.push(s);
                }
            }
        }
        steps.push(spans);
    }
    Ok(Steps {
        files,
        steps,
        slot,
        token_size,
    })
}

/// CPU seconds (user + system) of this process so far.
fn cpu_s() -> f64 {
    // SAFETY: getrusage writes one rusage struct into the zeroed value it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let t = |v: libc::timeval| v.tv_sec as f64 + v.tv_usec as f64 / 1e6;
    t(u.ru_utime) + t(u.ru_stime)
}

/// `read_bytes` of /proc/self/io: bytes this process caused to be read from storage.
fn read_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/io")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("read_bytes:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Drops the files from the page cache (nothing may map them at the time).
fn evict(files: &[PathBuf]) -> Result<()> {
    for p in files {
        let f = File::open(p).with_context(|| format!("open {}", p.display()))?;
        rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::DontNeed)
            .with_context(|| format!("posix_fadvise(DONTNEED) on {}", p.display()))?;
    }
    Ok(())
}

/// Fills the slot for `steps` with `method`, calling `each` on every filled slot.
fn run(
    method: &str,
    s: &Steps,
    steps: &[Vec<Span>],
    a: &Args,
    mut each: impl FnMut(&[u8]),
) -> Result<()> {
    // The slot is 4 KiB-aligned as a ring slot is, so aligned spans could go direct.
    let mut mem = vec![0u8; s.slot + 4096];
    let at = mem.as_ptr().align_offset(4096);
    let slot = &mut mem[at..at + s.slot];
    match method {
        "mmap+willneed" | "mmap" => {
            let maps = s
                .files
                .iter()
                .map(|p| {
                    let f = File::open(p)?;
                    // SAFETY: the benchmark's own files, which nothing truncates meanwhile.
                    let m = unsafe { Mmap::map(&f)? };
                    Ok(m)
                })
                .collect::<Result<Vec<Mmap>>>()?;
            let hints = method == "mmap+willneed";
            let hint = |spans: &[Span]| -> Result<()> {
                for sp in spans {
                    maps[sp.file as usize].advise_range(
                        Advice::WillNeed,
                        sp.offset as usize,
                        sp.len as usize,
                    )?;
                }
                Ok(())
            };
            if hints {
                for m in &maps {
                    m.advise(Advice::Random)?;
                }
                for st in steps.iter().take(a.prefetch) {
                    hint(st)?;
                }
            }
            for (i, st) in steps.iter().enumerate() {
                if hints {
                    if let Some(ahead) = steps.get(i + a.prefetch) {
                        hint(ahead)?;
                    }
                }
                for sp in st {
                    let (f, d) = (sp.offset as usize, sp.dst as usize);
                    let n = sp.len as usize;
                    slot[d..d + n].copy_from_slice(&maps[sp.file as usize][f..f + n]);
                }
                each(slot);
            }
        }
        "pread" => {
            let mut r = PreadReader::open(&s.files)?;
            for st in steps {
                r.read(st, slot)?;
                each(slot);
            }
        }
        "uring" | "uring-direct" => {
            let opts = UringOptions {
                depth: a.depth,
                direct: method == "uring-direct",
                ..UringOptions::default()
            };
            let mut r = UringReader::open(&s.files, opts)?;
            for st in steps {
                r.read(st, slot)?;
                each(slot);
            }
        }
        other => bail!("unknown method {other}; one of {METHODS:?}"),
    }
    Ok(())
}

/// One timed run's figures.
#[derive(Clone, Copy)]
struct Figures {
    wall: f64,
    cpu: f64,
    disk: u64,
}

fn timed(method: &str, s: &Steps, a: &Args, cold: bool) -> Result<Figures> {
    if cold {
        evict(&s.files)?;
    }
    let (t, c, d) = (Instant::now(), cpu_s(), read_bytes());
    run(method, s, &s.steps, a, |slot| {
        black_box(slot);
    })?;
    Ok(Figures {
        wall: t.elapsed().as_secs_f64(),
        cpu: cpu_s() - c,
        disk: read_bytes() - d,
    })
}

fn main() -> Result<()> {
    let a = args()?;
    let scratch = tempfile::tempdir()?;
    let dir = match (&a.dir, a.bench) {
        (Some(d), _) => d.clone(),
        (None, true) => std::env::temp_dir().join(format!("millrace-bench-{}", a.tokens)),
        (None, false) => scratch.path().to_path_buf(),
    };
    let t = Instant::now();
    if millrace::util::harness::ensure_corpus(&dir, a.tokens, false)? {
        eprintln!(
            "synthesized {} tokens into {} in {:.1} s",
            a.tokens,
            dir.display(),
            t.elapsed().as_secs_f64()
        );
    }
    let s = plan(&dir.join("millrace.toml"), a.bytes)?;
    // Token bytes the spans deliver (the slots' padding is not read).
    let delivered: u64 = s.steps.iter().flatten().map(|x| x.len).sum();
    let spans: usize = s.steps.iter().map(Vec::len).sum();
    println!(
        "corpus {} ({} files), {} steps, {} spans ({:.1} KiB mean), {:.3} GB delivered per run",
        dir.display(),
        s.files.len(),
        s.steps.len(),
        spans,
        delivered as f64 / spans.max(1) as f64 / 1024.0,
        delivered as f64 / 1e9
    );
    // Every method fills the first steps byte for byte as pread does.
    let check = &s.steps[..s.steps.len().min(8)];
    let mut want = Vec::new();
    run("pread", &s, check, &a, |slot| {
        want.push(xxhash_rust::xxh3::xxh3_64(slot))
    })?;
    for m in &a.methods {
        let mut got = Vec::new();
        let ran = run(m, &s, check, &a, |slot| {
            got.push(xxhash_rust::xxh3::xxh3_64(slot))
        });
        // As a test on a machine without io_uring or O_DIRECT (tmpfs), say so and go on.
        let refused = |e: &anyhow::Error| match e.downcast_ref::<ReadError>() {
            Some(ReadError::Unavailable { .. }) => true,
            Some(ReadError::Open { direct, source, .. }) => {
                *direct && source.raw_os_error() == Some(libc::EINVAL)
            }
            _ => false,
        };
        match ran {
            Err(e) if !a.bench && refused(&e) => println!("{m}: skipped: {e}"),
            Err(e) => return Err(e),
            Ok(()) if got != want => bail!("{m} filled different bytes than pread"),
            Ok(()) => println!("{m}: {} steps byte for byte as pread", got.len()),
        }
    }
    if !a.bench {
        return Ok(());
    }
    let tokens = delivered as f64 / s.token_size as f64;
    for (state, cold, reps) in [("cold", true, a.cold_repeat), ("warm", false, a.repeat)] {
        if !cold {
            run("pread", &s, &s.steps, &a, |_| {})?;
        }
        let mut runs: Vec<Vec<Figures>> = vec![Vec::new(); a.methods.len()];
        for _ in 0..reps.max(1) {
            for (i, m) in a.methods.iter().enumerate() {
                runs[i].push(timed(m, &s, &a, cold)?);
            }
        }
        println!(
            "\n{state} ({} run(s) each, median by wall time)\n",
            reps.max(1)
        );
        println!("| method | wall s | tokens/s | x first | CPU s | CPU s per 10^9 tokens | disk read / delivered |");
        println!("| --- | --- | --- | --- | --- | --- | --- |");
        let mut first = None;
        for (m, r) in a.methods.iter().zip(&mut runs) {
            r.sort_by(|x, y| x.wall.total_cmp(&y.wall));
            let f = r[r.len() / 2];
            let rate = tokens / f.wall;
            let base = *first.get_or_insert(rate);
            println!(
                "| {m} | {:.2} | {:.3e} | {:.2} | {:.2} | {:.2} | {:.2} |",
                f.wall,
                rate,
                rate / base,
                f.cpu,
                f.cpu / tokens * 1e9,
                f.disk as f64 / delivered as f64
            );
        }
    }
    Ok(())
}
