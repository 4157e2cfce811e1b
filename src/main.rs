//! The `millrace` command line: parse flags, call the library, print. Nothing else.

use std::io::Write;
use std::ops::Range;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

use millrace::config::Config;
use millrace::corpus::{self, DType, Format, RawOptions, Shard};
use millrace::{inspect, synth};

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
    /// Token dtype of raw files (uint16 or uint32; default uint16).
    #[arg(long, value_parser = parse_dtype)]
    dtype: Option<DType>,
    /// EOS id that ends each document in raw files.
    #[arg(long)]
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
    /// uint16 or int32 (default: by vocabulary size, as Megatron picks).
    #[arg(long, value_parser = parse_dtype)]
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

fn parse_dtype(s: &str) -> Result<DType, String> {
    DType::from_name(s).ok_or_else(|| format!("unknown dtype {s:?} (uint8, int8, int16, int32, int64, float32, float64, uint16, uint32)"))
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MILLRACE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Inspect(args) => run_inspect(args),
        Command::Synth(args) => run_synth(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // `millrace inspect ... | head` closing the pipe early is not an error.
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
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
                bail!("--dtype, --eos and --cache-dir describe raw token files; add --format raw (Megatron shards carry their own dtype)");
            }
            (Format::Megatron, None)
        }
        FormatArg::Raw => {
            let Some(eos) = args.eos else {
                bail!("--format raw needs --eos ID (the token that ends each document)");
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
            .unwrap_or_else(|| synth::default_dtype(args.vocab)),
        seed: args.seed,
        shard_tokens: args.shard_tokens,
        threads,
        progress: !args.json,
    };
    let summary = synth::synth(&opts)
        .with_context(|| format!("writing a synthetic corpus to {}", args.out.display()))?;
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
            inspect::thousands(d.documents),
            inspect::thousands(d.tokens),
            inspect::thousands(d.groups)
        )?;
    }
    let bytes = summary.tokens as f64 * opts.dtype.size() as f64;
    writeln!(
        out,
        "wrote {} tokens in {} documents in {:.1} s ({:.0} MB/s); config: {}",
        inspect::thousands(summary.tokens),
        inspect::thousands(summary.documents),
        summary.seconds,
        bytes / summary.seconds.max(1e-9) / 1e6,
        summary.config.display()
    )?;
    Ok(())
}
