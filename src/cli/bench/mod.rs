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
//!
//! `--gpu` runs only the GPU figures instead ([`gpu`]: host-to-device rates from the
//! registered ring against pinned and pageable memory, and the consumer's cost per step
//! when it copies every slot to the device); without CUDA it says why and exits 0.

mod baseline;
mod fairness;
mod gpu;
mod machine;
mod report;
mod runner;

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use millrace::util::harness::ensure_corpus;

use baseline::{python_problem, run_baseline};
use fairness::fairness;
use machine::{
    cpu_model, data_files, drop_caches, evict, memcpy_gb_per_s, references, resident_fraction,
    shard_files, warm, DataFile,
};
use report::{
    median_by, ratio, render, render_fairness, BenchReport, LatencyFigures, RanksFigures,
    RunFigures, VersusFigures, VersusPair,
};
use runner::{Ctx, Start};

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
    #[arg(long, default_value = "2e8", value_parser = millrace::util::parse_count)]
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
    /// `[serve] token_dtype` of the daemons: the dtype of expanded slots only. The
    /// bench's consumers read compact slots, which carry the shards' own dtype.
    #[arg(long, default_value = "int32")]
    pub token_dtype: String,
    /// `[serve] reader` of the daemons the bench starts (default: the daemon's default).
    #[arg(long)]
    pub reader: Option<String>,
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
    #[arg(long, default_value = "1e9", value_parser = millrace::util::parse_count)]
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
    #[arg(long, default_value_t = 10.0, value_parser = parse_fairness_secs)]
    pub fairness_seconds: f64,
    /// Ranks (dp_size) of the fairness run.
    #[arg(long, default_value_t = 16)]
    pub fairness_ranks: u32,
    /// Consumers of the ranks run (0 skips it): warm runs of this many consumers, each
    /// with `--rows` rows as in the streaming runs, alternated with runs of
    /// `--consumers`, one materializer thread count (the first of `--threads`),
    /// `--repeat` pairs. Reports the daemon's CPU per token of the one against the other
    /// from the same run: what one node of 8 GPUs costs against one of 2, the issue's
    /// "8 consumers" figure (docs/BENCHMARKS.md, "8 consumers at the slot").
    #[arg(long, default_value_t = 0)]
    pub ranks: u32,
    /// Pairs of the versus run (0 skips it; needs the baseline): a millrace warm run at
    /// the thread count whose median led the warm runs, then the nanoGPT best form
    /// warm, back to back, this many times. Reports each pair's ratio of tokens/s and
    /// their median: the warm "2x the best form" as a figure of one moment,
    /// where the warm runs and the baseline's otherwise run minutes apart
    /// (docs/BENCHMARKS.md, "The 2x over the nanoGPT best form").
    #[arg(long, default_value_t = 0)]
    pub versus: u32,
    /// Run only the fairness figure (no references, streaming, latency or baseline).
    #[arg(long)]
    pub fairness_only: bool,
    /// Run only the GPU figures (module `gpu`): H2D GB/s from the registered ring, a
    /// pinned and a pageable buffer, and the consumer's cost per step copying every slot
    /// to the device. Without CUDA it prints why and exits 0.
    #[arg(long)]
    pub gpu: bool,
    /// Print only the cache-line round trip between the first two CPUs, in ns (`-` when
    /// it cannot be measured), and exit: for scripts that time their own runs, such as
    /// `scripts/steady-bench`, to record where the VM's vCPUs sat (machine.rs).
    #[arg(long)]
    pub core_round_trip: bool,
    /// The CUDA device ordinal of `--gpu` (one the driver does not have is an error).
    #[arg(long, default_value_t = 0)]
    pub gpu_device: u32,
    /// Timed steps of the `--gpu` per-step run (after 10 untimed ones).
    #[arg(long, default_value_t = 1000)]
    pub gpu_steps: u64,
    /// Write the results as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// No progress display.
    #[arg(long)]
    pub quiet: bool,
}

/// The ranks run (`--ranks n`): warm runs of `n` consumers and of `--consumers`, the
/// same rows each and about the same tokens, alternated `--repeat` times with
/// `threads` materializer threads; the medians of each and the ratio of their daemon
/// CPU per token. Alternated, because a ratio of figures taken minutes apart on a
/// shared machine is mostly the machine's drift.
fn ranks_run(ctx: &Ctx<'_>, n: u32, steps: u64, threads: u32) -> Result<RanksFigures> {
    let args = ctx.args;
    let wide_args = BenchArgs {
        consumers: n,
        ..args.clone()
    };
    let wide = Ctx {
        args: &wide_args,
        dir: ctx.dir,
        base_cfg: ctx.base_cfg.clone(),
        exe: ctx.exe.clone(),
        show: ctx.show,
        refs: ctx.refs.clone(),
        source_bytes_per_token: ctx.source_bytes_per_token,
    };
    // The same tokens as the streaming runs: a step of n consumers is wider.
    let wide_steps = (steps * u64::from(args.consumers) / u64::from(n)).max(1);
    let (mut base, mut many) = (Vec::new(), Vec::new());
    for i in 0..args.repeat.max(1) {
        for (c, st, out) in [(ctx, steps, &mut base), (&wide, wide_steps, &mut many)] {
            let label = format!("ranks {} #{}", c.args.consumers, i + 1);
            let x = c.stream(threads, st, &Start::Zero, None, &label)?;
            out.push(c.figures("warm", threads, st, x));
        }
    }
    // Each side's runs deliver the same tokens (the two sides' batches differ).
    for side in [&base, &many] {
        if side.windows(2).any(|w| w[0].digests != w[1].digests) {
            bail!(
                "ranks: runs of {} consumers delivered different tokens",
                side[0].consumers
            );
        }
    }
    let cpu = |r: &RunFigures| r.daemon_cpu_s_per_1e9_tokens;
    let (Some(base), Some(many)) = (median_by(base, cpu), median_by(many, cpu)) else {
        bail!("ranks: no run");
    };
    Ok(RanksFigures {
        ratio: cpu(&many) / cpu(&base).max(1e-12),
        base,
        many,
    })
}

/// The versus run (`--versus n`): `n` pairs of a millrace warm run with `threads`
/// materializer threads and the nanoGPT best form's warm run of `bsteps` steps, each
/// pair back to back, and each pair's ratio of tokens/s. Alternated, as the ranks run
/// is, so that each ratio compares the two loaders in the same minute.
fn versus_run(
    ctx: &Ctx<'_>,
    files: &[DataFile],
    n: u32,
    (steps, bsteps): (u64, u64),
    threads: u32,
) -> Result<VersusFigures> {
    let mut pairs = Vec::new();
    for i in 0..n {
        let label = format!("versus #{}: millrace", i + 1);
        let x = ctx.stream(threads, steps, &Start::Zero, None, &label)?;
        let millrace = ctx.figures("warm", threads, steps, x);
        let mut baseline = run_baseline(ctx.args, files, "best", "warm", bsteps, ctx.show)?;
        baseline.ratio_to_millrace = ratio(baseline.tokens_per_s, millrace.tokens_per_s);
        let mut rows = run_baseline(ctx.args, files, "rows", "warm", bsteps, ctx.show)?;
        rows.ratio_to_millrace = ratio(rows.tokens_per_s, millrace.tokens_per_s);
        pairs.push(VersusPair::of(millrace, baseline, rows));
    }
    Ok(VersusFigures::of(threads, pairs))
}

/// The materializer thread count of the warm run that delivered the most tokens/s.
fn fastest_threads(runs: &[RunFigures]) -> Option<u32> {
    runs.iter()
        .max_by(|a, b| a.tokens_per_s.total_cmp(&b.tokens_per_s))
        .map(|r| r.materialize_threads)
}

/// The corpus directory: `--dir`, else one per `--tokens` under $TMPDIR.
fn corpus_dir(args: &BenchArgs) -> PathBuf {
    args.dir
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join(format!("millrace-bench-{}", args.tokens)))
}

/// Creates the corpus directory: `--dir` as given; the default one under $TMPDIR is
/// reused (its cached corpus) only if this user owns it.
fn prepare_corpus_dir(args: &BenchArgs, dir: &std::path::Path) -> Result<()> {
    if args.dir.is_some() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))
    } else {
        super::demo::own_temp_dir(dir)
    }
}

/// `--fairness-seconds`: 0 (skip the run) up to a day. `1e30` passed the old check
/// (positive and finite) and panicked in `Duration::from_secs_f64`; `nan` and negative
/// values skipped the run without a word.
fn parse_fairness_secs(s: &str) -> Result<f64, String> {
    let v: f64 = (s.trim().parse())
        .map_err(|_| format!("`{s}` is not a number of seconds (e.g. 10 or 0.5)"))?;
    if !(0.0..=86_400.0).contains(&v) {
        return Err(format!(
            "{s} s is outside 0..=86400 (0 skips the fairness run)"
        ));
    }
    Ok(v)
}

/// Runs `millrace bench`.
pub fn run(args: BenchArgs) -> Result<()> {
    let wall = Instant::now();
    if args.consumers == 0 || args.rows == 0 || args.seq_len == 0 || args.threads.is_empty() {
        bail!("--consumers, --rows, --seq-len and --threads must be positive");
    }
    // Counts that only a later stage reads: refused here, not after the corpus, the
    // references and the streaming runs (`--steps 0` failed as "consumer 0 failed: no
    // step was read", `--gpu-steps 0` reported the whole process's CPU as per step).
    let fairness_ranks = match args.fairness_seconds > 0.0 {
        true => Some(u64::from(args.fairness_ranks)),
        false => None,
    };
    for (flag, v) in [
        ("--steps", args.steps),
        ("--baseline-steps", args.baseline_steps),
        ("--gpu-steps", Some(args.gpu_steps)),
        ("--fairness-ranks", fairness_ranks),
    ] {
        if v == Some(0) {
            bail!("{flag} 0: must be at least 1");
        }
        // Both loaders are timed from their first batch to their last: one step is no
        // measurement (a baseline of 1 step once printed a ratio of 10^20).
        if v == Some(1) && ["--steps", "--baseline-steps"].contains(&flag) {
            bail!(
                "{flag} 1: must be at least 2 (each run is timed from its first step to its last)"
            );
        }
    }
    if args.core_round_trip {
        println!("{}", report::rtt(machine::core_round_trip_ns()));
        return Ok(());
    }
    if args.gpu {
        // Before the corpus is written: without CUDA this says why and returns at once.
        return gpu::run_gpu(&args);
    }
    let show = !args.quiet && std::io::stderr().is_terminal();
    let say = |m: &str| {
        if !args.quiet {
            eprintln!("{m}");
        }
    };
    let dir = corpus_dir(&args);
    prepare_corpus_dir(&args, &dir)?;
    let loadavg = std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default();
    let t = Instant::now();
    let mut corpus_write_s = 0.0;
    if ensure_corpus(&dir, args.tokens, show)? {
        corpus_write_s = t.elapsed().as_secs_f64();
        say(&format!(
            "wrote a {} token corpus to {} in {corpus_write_s:.1} s",
            millrace::util::thousands(args.tokens),
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

    let ranks = match args.ranks {
        0 => None,
        n => {
            say(&format!(
                "ranks: {n} consumers against {}, {} rows each, alternated",
                args.consumers, args.rows
            ));
            Some(ranks_run(&ctx, n, steps, threads0)?)
        }
    };

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
            b.ratio_to_millrace = ratio(b.tokens_per_s, mill_cold);
            baseline.push(b);
        }
        // The best form (int64 x and y, as nanoGPT feeds its model), then the rows form
        // (the bytes millrace's slots carry), alternated repetition by repetition.
        let mut reps = [Vec::new(), Vec::new()];
        for _ in 0..args.repeat.max(1) {
            for (i, mode) in ["best", "rows"].into_iter().enumerate() {
                reps[i].push(run_baseline(&args, &files, mode, "warm", bsteps, show)?);
            }
        }
        for reps in reps {
            let all: Vec<f64> = reps.iter().map(|r| r.tokens_per_s).collect();
            if let Some(mut m) = median_by(reps, |r| r.tokens_per_s) {
                m.repeats_tokens_per_s = all;
                m.ratio_to_millrace = ratio(m.tokens_per_s, mill_warm);
                baseline.push(m);
            }
        }
        // nanoGPT as written: warm (its windows are the best form's first ones).
        let mut b = run_baseline(&args, &files, "nanogpt", "warm", (bsteps / 2).max(2), show)?;
        b.ratio_to_millrace = ratio(b.tokens_per_s, mill_warm);
        baseline.push(b);
    }

    let versus = match (args.versus, &baseline_skipped) {
        (0, _) | (_, Some(_)) => None,
        (n, None) => {
            let threads = fastest_threads(&runs).unwrap_or(threads0);
            say(&format!(
                "versus: {n} alternated pairs, millrace at {threads} materializer threads \
                 against the nanoGPT best form"
            ));
            let bsteps = args.baseline_steps.unwrap_or(steps);
            let v = versus_run(&ctx, &files, n, (steps, bsteps), threads)?;
            for p in &v.pairs {
                check(&p.millrace.digests);
            }
            Some(v)
        }
    };

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
        // What the consumers received: compact slots in the shards' dtype.
        token_dtype: format!(
            "{} (compact slots)",
            files.first().map_or("?", |f| f.dtype.name())
        ),
        memcpy_gb_per_s: refs.memcpy_gb_per_s,
        references: refs,
        cold,
        runs,
        latency,
        baseline,
        baseline_skipped,
        fairness: fairness_figures,
        ranks,
        versus,
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
    fn bench(extra: &[&str]) -> Result<f64, String> {
        match crate::cli::parse_command(["bench", "--fairness-only"].iter().chain(extra))? {
            crate::cli::Command::Bench(b) => Ok(b.fairness_seconds),
            _ => Err("not bench".into()),
        }
    }

    #[test]
    fn fairness_seconds_out_of_range_are_refused_naming_the_flag() {
        assert_eq!(bench(&[]), Ok(10.0));
        assert_eq!(bench(&["--fairness-seconds", "0"]), Ok(0.0));
        assert_eq!(bench(&["--fairness-seconds", "0.5"]), Ok(0.5));
        for v in ["1e30", "inf", "nan", "-1", "86401", "ten"] {
            let e = bench(&[&format!("--fairness-seconds={v}")]).unwrap_err();
            assert!(
                e.contains("--fairness-seconds") && e.contains(v),
                "{v}: {e}"
            );
        }
    }
}
