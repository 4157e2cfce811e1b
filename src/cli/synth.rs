//! `millrace synth`: write a deterministic synthetic corpus and a config for it.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};

use millrace::corpus::DType;
use millrace::{synth, util};

#[derive(clap::Args)]
pub struct SynthArgs {
    /// Output directory (created if missing; a millrace.toml there that synth did not
    /// write is refused, not replaced).
    #[arg(long)]
    out: PathBuf,
    /// Total tokens, e.g. 1e9, 500M, 10G.
    #[arg(long, default_value = "1e8", value_parser = millrace::util::parse_count)]
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
    #[arg(long, default_value = "2.5e8", value_parser = millrace::util::parse_count)]
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

/// What `synth` writes: Megatron's two token dtypes.
fn parse_megatron_token_dtype(s: &str) -> Result<DType, String> {
    match DType::from_name(s) {
        Some(d @ (DType::Uint16 | DType::Int32)) => Ok(d),
        _ => Err(format!(
            "Megatron token shards are uint16 or int32 (as Megatron picks by vocabulary), not {s:?}"
        )),
    }
}

/// What every config synth writes begins with; a `millrace.toml` that does not is the
/// user's own.
const WRITTEN_BY_SYNTH: &str = "# Written by `millrace synth";

/// Refuses an `--out` whose `millrace.toml` synth did not write: synth replaced it
/// without a word (`millrace synth --out .` in a run's directory took its config).
fn check_config_is_ours(out: &std::path::Path) -> Result<()> {
    let config = out.join("millrace.toml");
    match std::fs::read(&config) {
        Ok(bytes) if !bytes.starts_with(WRITTEN_BY_SYNTH.as_bytes()) => anyhow::bail!(
            "{}: exists and was not written by synth; refusing to replace it (choose \
             another --out, or remove it)",
            config.display()
        ),
        _ => Ok(()),
    }
}

pub fn run_synth(args: SynthArgs) -> Result<()> {
    check_config_is_ours(&args.out)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    /// `synth --out DIR` replaced a `DIR/millrace.toml` it had not written.
    #[test]
    fn a_config_synth_did_not_write_is_not_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let args = || SynthArgs {
            out: dir.path().to_path_buf(),
            tokens: 10_000,
            domains: 1,
            vocab: 1000,
            dtype: None,
            seed: 0,
            shard_tokens: 1_000_000,
            threads: Some(1),
            sparse: false,
            length_scale: 1,
            json: true,
        };
        let config = dir.path().join("millrace.toml");
        std::fs::write(&config, "# my run\n[corpus]\n").unwrap();
        let e = format!("{:#}", run_synth(args()).unwrap_err());
        assert!(
            e.contains("millrace.toml: exists and was not written by synth"),
            "{e}"
        );
        assert_eq!(
            std::fs::read_to_string(&config).unwrap(),
            "# my run\n[corpus]\n"
        );
        assert!(!dir.path().join("web").exists());
        // synth's own config is rewritten, so a rerun with other flags works.
        std::fs::remove_file(&config).unwrap();
        run_synth(args()).unwrap();
        run_synth(SynthArgs { seed: 1, ..args() }).unwrap();
        let text = std::fs::read_to_string(&config).unwrap();
        assert!(text.starts_with("# Written by `millrace synth"), "{text}");
    }
}
