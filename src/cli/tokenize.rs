//! `millrace tokenize`: tokenize JSONL text into a Megatron shard (and a groups sidecar).

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};

use millrace::corpus::DType;
use millrace::tokenize;

#[derive(clap::Args)]
pub struct TokenizeArgs {
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
    #[arg(long, value_parser = millrace::util::parse_count)]
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
    #[arg(long, default_value = "1G", value_parser = millrace::util::parse_count)]
    mem_budget: u64,
    /// Abort, writing nothing, once more than N lines are bad (default: never).
    #[arg(long, value_name = "N")]
    max_bad: Option<u64>,
    /// Directory for the spill and sort files (default: beside the output).
    #[arg(long)]
    tmp_dir: Option<PathBuf>,
    /// Skip (as bad, never reading them whole) lines longer than this many bytes (e.g. 8M).
    #[arg(long, default_value_t = tokenize::DEFAULT_MAX_LINE_BYTES, value_parser = millrace::util::parse_count)]
    max_line_bytes: u64,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
}

fn parse_dtype(s: &str) -> Result<DType, String> {
    DType::from_name(s).ok_or_else(|| format!("unknown dtype {s:?} (uint8, int8, int16, int32, int64, float32, float64, uint16, uint32)"))
}

pub fn run_tokenize(args: TokenizeArgs) -> Result<()> {
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
