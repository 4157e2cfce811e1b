//! The `millrace` command line: parse flags, call the library, print. Nothing else.

use std::io::Write;
use std::ops::Range;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

use millrace::config::Config;
use millrace::corpus::{self, DType, Format, RawOptions, Shard};
use millrace::{inspect, synth, tokenize, util};

/// millrace: feeds tokenized pretraining data to GPU trainers.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Validate shards and report documents, tokens, groups and length statistics.
    Inspect(InspectArgs),
    /// Write a deterministic synthetic corpus and a config for it.
    Synth(SynthArgs),
    /// Plan N steps and report mixture, epochs, padding, truncation, groups, duplicates.
    Plan(PlanArgs),
    /// List the documents behind every row of one step (for one dp rank).
    Explain(ExplainArgs),
    /// Tokenize JSONL text into a Megatron shard, with a groups sidecar when asked.
    Tokenize(TokenizeArgs),
    /// Run the daemon: plan batches and stream them to trainer ranks over shared memory.
    Serve(millrace::serve::ServeArgs),
    /// Check a daemon config as `serve` would (shards, [serve], socket group), then exit.
    CheckConfig(millrace::serve::CheckArgs),
    /// Connect to a daemon as one trainer rank and read every token (a built-in consumer).
    Consume(millrace::client::ConsumeArgs),
    /// Synthesize a small corpus, start the daemon, stream to consumers, report, exit.
    Demo(millrace::demo::DemoArgs),
    /// Measure delivered tokens/s, latency and CPU cost against this machine's memcpy.
    Bench(millrace::bench::BenchArgs),
    /// Change a running daemon's mixture, reload its config, or read its change journal.
    Ctl(millrace::ctl::CtlArgs),
    /// Print a running daemon's state (clients, rings, mixture); --json for scripts.
    Status(millrace::ctl::StatusArgs),
    /// A live terminal view of a running daemon: steps, rates, rings, stalls, mixture.
    Top(millrace::ctl::TopArgs),
}

#[derive(clap::Args)]
struct InspectArgs {
    /// Megatron prefixes (or .bin/.idx paths), raw token files, directories or globs.
    #[arg(required_unless_present = "config")]
    paths: Vec<PathBuf>,
    /// Inspect every domain of this config instead of (or besides) PATHS.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Print JSON instead of tables.
    #[arg(long)]
    json: bool,
    /// Print the tokens of document N, or of documents N..M (M exclusive), counted
    /// across all shards in argument order.
    #[arg(long, value_name = "N|N..M", value_parser = parse_range)]
    doc: Option<Range<u64>>,
    /// Shard format of PATHS.
    #[arg(long, value_enum, default_value = "megatron")]
    format: FormatArg,
    /// Token dtype of raw files: uint16 or uint32 [default: uint16].
    #[arg(long, value_parser = parse_raw_dtype)]
    dtype: Option<DType>,
    /// EOS id that ends each document in raw files (`--eos` is the old spelling).
    #[arg(long = "eos-id", alias = "eos")]
    eos: Option<u64>,
    /// Where raw files' boundary caches go (default: next to each file).
    #[arg(long)]
    cache_dir: Option<PathBuf>,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum FormatArg {
    Megatron,
    Raw,
}

#[derive(clap::Args)]
struct SynthArgs {
    /// Output directory (created if missing).
    #[arg(long)]
    out: PathBuf,
    /// Total tokens, e.g. 1e9, 500M, 10G.
    #[arg(long, default_value = "1e8", value_parser = synth::parse_count)]
    tokens: u64,
    /// Number of domains: web, code (repo groups), books (book groups), wiki, web2, ...
    #[arg(long, default_value_t = 4)]
    domains: usize,
    /// Vocabulary size.
    #[arg(long, default_value_t = 50304)]
    vocab: u32,
    /// Token dtype of the shards: uint16 or int32 [default: uint16 below 65,500 ids,
    /// else int32, as Megatron picks].
    #[arg(long, value_parser = parse_megatron_token_dtype)]
    dtype: Option<DType>,
    /// Seed; the corpus is a pure function of it and the other flags.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Upper bound on tokens per shard.
    #[arg(long, default_value = "2.5e8", value_parser = synth::parse_count)]
    shard_tokens: u64,
    /// Writer threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// A scale-test corpus: real .idx files over sparse .bin files that read as zeros.
    #[arg(long)]
    sparse: bool,
    /// With --sparse, multiply every document length by this (e.g. 100 keeps a 1e13-token
    /// corpus near 1e8 documents).
    #[arg(long, default_value_t = 1, requires = "sparse")]
    length_scale: u64,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct PlanArgs {
    /// The run's config.
    #[arg(long)]
    config: PathBuf,
    /// Steps to plan.
    #[arg(long, default_value_t = 1000)]
    steps: u64,
    /// First step (reached by recomputation).
    #[arg(long, default_value_t = 0)]
    from: u64,
    /// Steps per reported window (default: steps / 10).
    #[arg(long)]
    window: Option<u64>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct ExplainArgs {
    /// The run's config.
    #[arg(long)]
    config: PathBuf,
    /// Trainer step.
    #[arg(long)]
    step: u64,
    /// Data-parallel rank whose rows to list (rows [rG/R, (r+1)G/R) of G; all rows with
    /// the default --dp-size 1).
    #[arg(long, default_value_t = 0)]
    dp_rank: u32,
    /// Data-parallel size.
    #[arg(long, default_value_t = 1)]
    dp_size: u32,
    /// Explain this many consecutive steps (with --json: one JSON object per line).
    #[arg(long, default_value_t = 1)]
    count: u64,
    /// Print JSON (stable, for comparing runs).
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct TokenizeArgs {
    /// JSONL inputs (plain, .gz or .zst), read in this order (every run of a job must be
    /// given the same list).
    #[arg(required_unless_present = "merge")]
    inputs: Vec<PathBuf>,
    /// HuggingFace tokenizer.json.
    #[arg(long, required_unless_present = "merge")]
    tokenizer: Option<PathBuf>,
    /// Output prefix: PREFIX.bin, PREFIX.idx (and PREFIX.groups.npy); replaced if present.
    /// With --shard-tokens or --num-shards: shards PREFIX-RUN-K and PREFIX-RUN.manifest.json.
    #[arg(long)]
    out: PathBuf,
    /// Cut the output into shards of about this many tokens (e.g. 1e9), each closed at the
    /// next document, or the next group with --group-field.
    #[arg(long, value_parser = synth::parse_count)]
    shard_tokens: Option<u64>,
    /// Runs sharing this job (e.g. a Slurm array); each writes its share: input files
    /// i, i+N, ..., or with --group-field the groups whose key hashes to i.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    num_shards: u64,
    /// Which of the --num-shards runs this is, from 0.
    #[arg(long, default_value_t = 0)]
    shard_index: u64,
    /// Check that all --num-shards runs of PREFIX finished with the same settings, write
    /// PREFIX.manifest.json and print the shards for a config; tokenizes nothing.
    #[arg(long, conflicts_with_all = ["inputs", "shard_index", "shard_tokens"])]
    merge: bool,
    /// JSON field holding the text.
    #[arg(long, default_value = "text")]
    text_field: String,
    /// Id appended to every document (default: the tokenizer's EOS).
    #[arg(long, conflicts_with_all = ["eos_token", "no_eos"])]
    eos_id: Option<u32>,
    /// Token appended to every document, by its text (e.g. "</s>").
    #[arg(long, conflicts_with = "no_eos")]
    eos_token: Option<String>,
    /// Append no EOS.
    #[arg(long)]
    no_eos: bool,
    /// Token dtype of the shard: uint16 or int32, or another Megatron dtype that holds
    /// every id [default: uint16 below 65,500 ids, else int32, as Megatron picks].
    #[arg(long, value_parser = parse_dtype)]
    dtype: Option<DType>,
    /// Field whose value groups documents (e.g. repo, book_id); writes PREFIX.groups.npy.
    #[arg(long)]
    group_field: Option<String>,
    /// Field giving the reading order within a group (e.g. path, chapter).
    #[arg(long, requires = "group_field")]
    order_field: Option<String>,
    /// Tokenizer threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Memory for the pipeline and the in-memory group sort, in bytes (e.g. 1G, 256M).
    #[arg(long, default_value = "1G", value_parser = synth::parse_count)]
    mem_budget: u64,
    /// Abort, writing nothing, once more than N lines are bad (default: never).
    #[arg(long, value_name = "N")]
    max_bad: Option<u64>,
    /// Directory for the spill and sort files (default: beside the output).
    #[arg(long)]
    tmp_dir: Option<PathBuf>,
    /// Skip (as bad, never reading them whole) lines longer than this many bytes (e.g. 8M).
    #[arg(long, default_value_t = tokenize::DEFAULT_MAX_LINE_BYTES, value_parser = synth::parse_count)]
    max_line_bytes: u64,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
}

fn parse_range(s: &str) -> Result<Range<u64>, String> {
    let num = |t: &str| {
        t.trim()
            .parse::<u64>()
            .map_err(|_| format!("{t:?} is not a document index"))
    };
    match s.split_once("..") {
        Some((a, b)) => {
            let (a, b) = (num(a)?, num(b)?);
            if a >= b {
                return Err(format!("empty range {a}..{b} (the end is exclusive)"));
            }
            Ok(a..b)
        }
        None => {
            let a = num(s)?;
            Ok(a..a + 1)
        }
    }
}

/// Raw token arrays are unsigned: the two widths `Shard::open` reads.
fn parse_raw_dtype(s: &str) -> Result<DType, String> {
    match DType::from_name(s) {
        Some(d @ (DType::Uint16 | DType::Uint32)) => Ok(d),
        _ => Err(format!("raw token files are uint16 or uint32, not {s:?}")),
    }
}

/// What `synth` writes: Megatron's two token dtypes.
fn parse_megatron_token_dtype(s: &str) -> Result<DType, String> {
    match DType::from_name(s) {
        Some(d @ (DType::Uint16 | DType::Int32)) => Ok(d),
        _ => Err(format!(
            "Megatron token shards are uint16 or int32 (as Megatron picks by vocabulary), not {s:?}"
        )),
    }
}

fn parse_dtype(s: &str) -> Result<DType, String> {
    DType::from_name(s).ok_or_else(|| format!("unknown dtype {s:?} (uint8, int8, int16, int32, int64, float32, float64, uint16, uint32)"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The daemon reports its life at info level (journald keeps it); tools stay quiet.
    let default_level = match cli.command {
        Command::Serve(_) | Command::Demo(_) => "info",
        _ => "warn",
    };
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_env("MILLRACE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let log = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        // journald and log files get plain text; a terminal gets colour.
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(filter);
    // journald stamps every line itself (JOURNAL_STREAM is set when stderr goes there).
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        log.without_time().init();
    } else {
        log.init();
    }
    let result = match cli.command {
        Command::Inspect(args) => run_inspect(args),
        Command::Synth(args) => run_synth(args),
        Command::Tokenize(args) => run_tokenize(args),
        Command::Plan(args) => run_plan(args),
        Command::Explain(args) => run_explain(args),
        Command::Serve(args) => millrace::serve::run_cli(args),
        Command::CheckConfig(args) => millrace::serve::check_config(args),
        Command::Consume(args) => millrace::client::run_consume(args),
        Command::Demo(args) => millrace::demo::run(args),
        Command::Bench(args) => millrace::bench::run(args),
        Command::Ctl(args) => millrace::ctl::run_ctl(args),
        Command::Status(args) => millrace::ctl::run_status(args),
        Command::Top(args) => millrace::ctl::run_top(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // `millrace inspect ... | head` closing the pipe early is not an error.
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", error_text(&e));
            ExitCode::FAILURE
        }
    }
}

/// `e` and its causes joined by ": ", leaving out a cause whose text the message already
/// ends with: many errors quote their source in their own text, and `{:#}` would then say
/// "x: no such file: no such file".
fn error_text(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.is_empty() {
            out = text;
        } else if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
    }
    out
}

/// True when `e` is stdout's reader having gone away.
fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

fn run_inspect(args: InspectArgs) -> Result<()> {
    let mut out = std::io::stdout().lock();
    let opened = std::time::Instant::now();
    let mut shards: Vec<Shard> = Vec::new();
    if let Some(path) = &args.config {
        let cfg = Config::load(path)?;
        for (_, domain) in cfg.open_corpus()? {
            shards.extend(domain);
        }
    }
    let (format, raw) = match args.format {
        FormatArg::Megatron => {
            if args.dtype.is_some() || args.eos.is_some() || args.cache_dir.is_some() {
                bail!("--dtype, --eos-id and --cache-dir describe raw token files; add --format raw (Megatron shards carry their own dtype)");
            }
            (Format::Megatron, None)
        }
        FormatArg::Raw => {
            let Some(eos) = args.eos else {
                bail!("--format raw needs --eos-id ID (the token that ends each document)");
            };
            (
                Format::Raw,
                Some(RawOptions {
                    dtype: args.dtype.unwrap_or(DType::Uint16),
                    eos,
                    cache_dir: args.cache_dir.clone(),
                }),
            )
        }
    };
    for arg in &args.paths {
        for path in corpus::resolve(arg, format)? {
            shards.push(Shard::open(&path, raw.as_ref())?);
        }
    }
    if let Some(range) = args.doc {
        let docs = inspect::dump_documents(&shards, range)?;
        if args.json {
            writeln!(
                out,
                "{}",
                serde_json::to_string(&serde_json::json!({ "documents": docs }))?
            )?;
        } else {
            for d in docs {
                let group = d.group.map(|g| format!(" group {g}")).unwrap_or_default();
                writeln!(
                    out,
                    "# document {} ({} #{}{group}, {} tokens)",
                    d.index,
                    d.shard,
                    d.local_index,
                    d.tokens.len()
                )?;
                let ids: Vec<String> = d.tokens.iter().map(|t| t.to_string()).collect();
                writeln!(out, "{}", ids.join(" "))?;
            }
        }
        return Ok(());
    }
    let open_time = opened.elapsed();
    let checked = std::time::Instant::now();
    let report = inspect::inspect(&shards)?;
    let check_time = checked.elapsed();
    if args.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&report)?)?;
    } else {
        write!(out, "{}", inspect::render(&report))?;
        writeln!(
            out,
            "\nopened {} shards in {:.1} ms; validated every index and measured every document in {:.1} ms",
            shards.len(),
            open_time.as_secs_f64() * 1e3,
            check_time.as_secs_f64() * 1e3
        )?;
    }
    Ok(())
}

fn run_synth(args: SynthArgs) -> Result<()> {
    let mut out = std::io::stdout().lock();
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
    let opts = synth::SynthOptions {
        out: args.out.clone(),
        tokens: args.tokens,
        domains: args.domains,
        vocab: args.vocab,
        dtype: args
            .dtype
            .unwrap_or_else(|| util::default_dtype(args.vocab)),
        seed: args.seed,
        shard_tokens: args.shard_tokens,
        threads,
        progress: !args.json,
    };
    let summary = if args.sparse {
        let sparse = synth::Sparse {
            length_scale: args.length_scale,
        };
        synth::synth_sparse(&opts, sparse)
    } else {
        synth::synth(&opts)
    };
    let summary =
        summary.with_context(|| format!("writing a synthetic corpus to {}", args.out.display()))?;
    if args.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&summary)?)?;
        return Ok(());
    }
    for d in &summary.domains {
        writeln!(
            out,
            "{:<8} {:>4} shards {:>14} documents {:>16} tokens {:>10} groups",
            d.name,
            d.shards.len(),
            util::thousands(d.documents),
            util::thousands(d.tokens),
            util::thousands(d.groups)
        )?;
    }
    let bytes = summary.tokens as f64 * opts.dtype.size() as f64;
    let rate = if args.sparse {
        "sparse .bin files, tokens not written".to_string()
    } else {
        format!("{:.0} MB/s", bytes / summary.seconds.max(1e-9) / 1e6)
    };
    writeln!(
        out,
        "wrote {} tokens in {} documents in {:.1} s ({rate}); config: {}",
        util::thousands(summary.tokens),
        util::thousands(summary.documents),
        summary.seconds,
        summary.config.display()
    )?;
    Ok(())
}

fn run_tokenize(args: TokenizeArgs) -> Result<()> {
    if args.merge {
        let m = tokenize::merge(&args.out, args.num_shards)
            .with_context(|| format!("merging the runs of {}", args.out.display()))?;
        let mut out = std::io::stdout().lock();
        if args.json {
            writeln!(out, "{}", serde_json::to_string_pretty(&m)?)?;
            return Ok(());
        }
        write!(out, "{}", tokenize::render_merge(&m, &args.out))?;
        return Ok(());
    }
    let tokenizer = args.tokenizer.unwrap_or_default();
    let mut opts = tokenize::TokenizeOptions::new(args.inputs, tokenizer, args.out);
    opts.shard_tokens = args.shard_tokens;
    opts.num_shards = args.num_shards;
    opts.shard_index = args.shard_index;
    opts.text_field = args.text_field;
    opts.eos = match (args.eos_id, args.eos_token, args.no_eos) {
        (Some(id), _, _) => tokenize::Eos::Id(id),
        (None, Some(t), _) => tokenize::Eos::Token(t),
        (None, None, true) => tokenize::Eos::Off,
        (None, None, false) => tokenize::Eos::Auto,
    };
    opts.dtype = args.dtype;
    opts.group_field = args.group_field;
    opts.order_field = args.order_field;
    opts.threads = args.threads.unwrap_or(opts.threads);
    opts.mem_budget = args.mem_budget;
    opts.max_bad = args.max_bad;
    opts.tmp_dir = args.tmp_dir;
    opts.max_line_bytes = args.max_line_bytes;
    opts.progress = !args.quiet;
    let summary = tokenize::tokenize(&opts)
        .with_context(|| format!("tokenizing into {}", opts.out.display()))?;
    let mut out = std::io::stdout().lock();
    if args.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&summary)?)?;
    } else {
        write!(out, "{}", tokenize::render(&summary))?;
    }
    Ok(())
}

fn run_plan(args: PlanArgs) -> Result<()> {
    use millrace::plan::report::{render_windows, Tally};
    let t0 = std::time::Instant::now();
    let loaded = Config::load(&args.config)?.load_plan()?;
    let plan = loaded.plan.clone();
    for w in plan.config().unweighted_warnings(&plan.domain_names()) {
        eprintln!("warning: {}: {w}", args.config.display());
    }
    let load_ms = t0.elapsed().as_secs_f64() * 1e3;
    let t1 = std::time::Instant::now();
    let mut planner = plan.seek(args.from);
    let seek_ms = t1.elapsed().as_secs_f64() * 1e3;
    let window = args.window.unwrap_or((args.steps / 10).max(1)).max(1);
    let mut tally = Tally::new(&plan);
    let mut windows = Vec::new();
    let mut first_ms = 0.0;
    for i in 0..args.steps {
        let t2 = std::time::Instant::now();
        let batch = planner.next_batch();
        if i == 0 {
            first_ms = t2.elapsed().as_secs_f64() * 1e3;
        }
        tally.add(batch);
        if (i + 1) % window == 0 || i + 1 == args.steps {
            windows.push(tally.finish(&planner.epochs()));
        }
    }
    // Plan-time check of eod_token (never in the daemon's hot path): see src/eod.rs.
    let eod = millrace::eod::check_plan(&plan, &loaded.shards)?;
    let mut out = std::io::stdout().lock();
    if args.json {
        let names = plan.domain_names();
        let json = serde_json::json!({
            "fingerprint": format!("{:032x}", plan.fingerprint()),
            "domains": names,
            "fill": plan.fill(),
            "eod": eod.as_ref().map(|(_, r)| r),
            "windows": windows,
            "timings_ms": { "load": load_ms, "seek": seek_ms, "first_batch": first_ms },
            "memory_kb": rss_kb(),
        });
        writeln!(out, "{}", serde_json::to_string_pretty(&json)?)?;
    } else {
        let fills: Vec<String> = plan
            .domain_names()
            .iter()
            .zip(plan.fill())
            .map(|(n, f)| format!("{n} {:.2}%", 100.0 * f))
            .collect();
        writeln!(
            out,
            "opened, validated and identified the corpus and built the plan in {load_ms:.1} ms; \
             reached step {} in {seek_ms:.1} ms; planned its batch in {first_ms:.2} ms",
            args.from
        )?;
        let mem: Vec<String> = rss_kb()
            .iter()
            .map(|(k, v)| format!("{k} {:.1} MiB", *v as f64 / 1024.0))
            .collect();
        if !mem.is_empty() {
            writeln!(out, "memory: {}", mem.join(", "))?;
        }
        writeln!(
            out,
            "row fill used to turn token weights into rows: {}",
            fills.join(", ")
        )?;
        if let Some((e, r)) = &eod {
            write!(out, "{}", millrace::eod::render(r, *e))?;
        }
        write!(out, "{}", render_windows(&windows))?;
    }
    if let (true, Some((e, r))) = (args.json, &eod) {
        for w in r.iter().filter_map(|d| millrace::eod::warning(d, *e)) {
            eprintln!("{w}");
        }
    }
    Ok(())
}

fn run_explain(args: ExplainArgs) -> Result<()> {
    use millrace::plan::report::{explain, render_explain};
    if args.dp_size == 0 || args.dp_rank >= args.dp_size {
        bail!(
            "--dp-rank {} is not below --dp-size {}",
            args.dp_rank,
            args.dp_size
        );
    }
    let loaded = Config::load(&args.config)?.load_plan()?;
    let plan = loaded.plan;
    let mut planner = plan.seek(args.step);
    let mut out = std::io::stdout().lock();
    for _ in 0..args.count {
        let batch = planner.next_batch();
        let e = explain(&plan, &batch, args.dp_rank, args.dp_size);
        if args.json {
            writeln!(out, "{}", serde_json::to_string(&e)?)?;
        } else {
            write!(out, "{}", render_explain(&e))?;
        }
    }
    Ok(())
}

/// This process's resident memory by kind (Linux), to tell the planner's own memory
/// (anonymous) from mapped shard pages (file).
fn rss_kb() -> std::collections::BTreeMap<String, u64> {
    let mut m = std::collections::BTreeMap::new();
    if let Ok(status) = std::fs::read_to_string("/proc/self/status") {
        for line in status.lines() {
            for key in ["VmHWM", "RssAnon", "RssFile"] {
                if let Some(rest) = line.strip_prefix(key).and_then(|r| r.strip_prefix(':')) {
                    if let Some(v) = rest.split_whitespace().next().and_then(|v| v.parse().ok()) {
                        m.insert(key.to_string(), v);
                    }
                }
            }
        }
    }
    m
}
