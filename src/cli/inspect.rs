//! `millrace inspect`: what is in a set of shards, checked end to end.
//!
//! The report is built from the indexes alone (document lengths, groups), never from the
//! token bytes, so it costs one pass over each `.idx` however large the `.bin` is. It is
//! also the strictest reader: it runs the full linear validation of every shard, so a
//! corpus that inspects clean is one the daemon will serve.

use std::fmt::Write as _;
use std::io::Write as _;
use std::ops::Range;
use std::path::PathBuf;

use anyhow::bail;
use serde::Serialize;

use millrace::config::Config;
use millrace::corpus::{self, DType, Format, RawOptions, Result, Shard};
use millrace::plan::mix::Schedule;
use millrace::plan::report::first_weighted;
use millrace::util::thousands;

#[derive(clap::Args)]
pub struct InspectArgs {
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
            let end = a.checked_add(1).ok_or_else(|| {
                format!("document index {a} is too large (at most {})", u64::MAX - 1)
            })?;
            Ok(a..end)
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

/// Runs `millrace inspect`.
pub fn run_inspect(args: InspectArgs) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    let opened = std::time::Instant::now();
    let mut shards: Vec<Shard> = Vec::new();
    let mut domains: Vec<DomainShards> = Vec::new();
    if let Some(path) = &args.config {
        let cfg = Config::load(path)?;
        let opened = cfg.open_corpus()?;
        let names: Vec<&str> = opened.iter().map(|(n, _)| n.as_str()).collect();
        // A config without a usable [plan] still inspects; it just names no entry steps.
        let schedule = cfg
            .plan_config()
            .ok()
            .map(|p| Schedule::new(&p.points(), &names));
        for (d, (name, domain)) in opened.iter().enumerate() {
            let weighted_from = schedule.as_ref().and_then(|s| first_weighted(s, d));
            domains.push(DomainShards {
                name: name.clone(),
                shards: domain
                    .iter()
                    .map(|s| s.path().display().to_string())
                    .collect(),
                weighted_from,
            });
        }
        shards.extend(opened.into_iter().flat_map(|(_, d)| d));
    }
    let from_config = shards.len();
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
        let docs = dump_documents(&shards, range)?;
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
    let mut report = inspect(&shards)?;
    // Float tokens make a valid Megatron file but no shard to serve: a run's domains
    // (`--config`) are refused as `check-config` and the daemon refuse them (they passed
    // here, and operators are sent here to check a shard); a file named alone is shown,
    // with a warning.
    for (i, shard) in shards.iter().enumerate() {
        if let Some(e) = shard.float_tokens() {
            if i < from_config {
                return Err(e.into());
            }
            eprintln!("warning: {e} (check-config and the daemon refuse it)");
        }
    }
    report.domains = domains;
    let check_time = checked.elapsed();
    if args.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&report)?)?;
    } else {
        write!(out, "{}", render(&report))?;
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

/// Document-length percentiles (nearest rank) over a set of documents.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LengthStats {
    /// Shortest document.
    pub min: u64,
    /// Median.
    pub p50: u64,
    /// 90th percentile.
    pub p90: u64,
    /// 99th percentile.
    pub p99: u64,
    /// Longest document.
    pub max: u64,
    /// Mean length.
    pub mean: f64,
}

/// One bucket of the log2 length histogram: documents with `lo <= len < hi`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Bucket {
    /// Inclusive lower bound (0 or a power of two).
    pub lo: u64,
    /// Exclusive upper bound.
    pub hi: u64,
    /// Documents in the bucket.
    pub count: u64,
}

/// Everything `inspect` says about one shard.
#[derive(Debug, Clone, Serialize)]
pub struct ShardReport {
    /// Prefix or file, as resolved.
    pub path: String,
    /// "megatron" or "raw".
    pub format: &'static str,
    /// Token dtype.
    pub dtype: &'static str,
    /// Documents.
    pub documents: u64,
    /// Sequences (more than documents when the shard was sentence-split).
    pub sequences: u64,
    /// Tokens.
    pub tokens: u64,
    /// Groups in the sidecar, `None` without one.
    pub groups: Option<u64>,
    /// Bytes of token data.
    pub bytes: u64,
    /// Length percentiles.
    pub lengths: LengthStats,
    /// Non-empty log2 buckets, ascending.
    pub histogram: Vec<Bucket>,
}

/// The sum over all shards.
#[derive(Debug, Clone, Serialize)]
pub struct TotalReport {
    /// Number of shards.
    pub shards: u64,
    /// Documents.
    pub documents: u64,
    /// Sequences.
    pub sequences: u64,
    /// Tokens.
    pub tokens: u64,
    /// Sum of groups, `None` when no shard has a sidecar.
    pub groups: Option<u64>,
    /// Bytes of token data.
    pub bytes: u64,
    /// Length percentiles over all documents.
    pub lengths: LengthStats,
    /// Histogram over all documents.
    pub histogram: Vec<Bucket>,
}

/// The whole `inspect` result; this is also its `--json` schema.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Per shard, in argument order.
    pub shards: Vec<ShardReport>,
    /// Totals.
    pub total: TotalReport,
    /// With `--config`: each domain's shards and the step it enters (empty without).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub domains: Vec<DomainShards>,
}

/// One domain of `inspect --config`: which shards it holds and from which step the
/// schedule weights it, so an operator sees which shards enter later (an increment is
/// a domain of its own added at a step; docs/DESIGN.md "Corpus evolution").
#[derive(Debug, Clone, Serialize)]
pub struct DomainShards {
    /// Domain name.
    pub name: String,
    /// Its shards, as resolved.
    pub shards: Vec<String>,
    /// The first schedule step that gives it weight (`None`: never weighted).
    pub weighted_from: Option<u64>,
}

/// One document as `inspect --doc` prints it.
#[derive(Debug, Clone, Serialize)]
pub struct DocDump {
    /// Shard path.
    pub shard: String,
    /// Index across all shards, in argument order.
    pub index: u64,
    /// Index within its shard.
    pub local_index: u64,
    /// Its group id, if the shard has a sidecar.
    pub group: Option<u64>,
    /// Its tokens.
    pub tokens: Vec<serde_json::Value>,
}

/// Validates every shard and builds the report. `shards` must be non-empty.
///
/// Memory is bounded by the largest shard's document count (its lengths are read into
/// one reused buffer), not by the corpus: the statistics are kept as exact
/// [`LengthCounts`], so a multi-billion-document corpus inspects in bounded space.
pub fn inspect(shards: &[Shard]) -> Result<Report> {
    let mut buf: Vec<u64> = Vec::new();
    let mut all = LengthCounts::default();
    let mut reports = Vec::with_capacity(shards.len());
    for shard in shards {
        shard.validate()?;
        buf.clear();
        shard.doc_lengths_into(&mut buf)?;
        let mut mine = LengthCounts::default();
        for &l in &buf {
            mine.add(l);
        }
        all.merge(&mine);
        reports.push(ShardReport {
            path: shard.path().display().to_string(),
            format: shard.format().name(),
            dtype: shard.dtype().name(),
            documents: shard.documents(),
            sequences: shard.sequences(),
            tokens: shard.tokens(),
            groups: shard.groups().map(|g| g.len() as u64),
            bytes: shard.data_bytes(),
            histogram: mine.histogram(),
            lengths: mine.stats(),
        });
    }
    let groups = reports.iter().filter_map(|r| r.groups).reduce(|a, b| a + b);
    let total = TotalReport {
        shards: reports.len() as u64,
        documents: reports.iter().map(|r| r.documents).sum(),
        sequences: reports.iter().map(|r| r.sequences).sum(),
        tokens: reports.iter().map(|r| r.tokens).sum(),
        groups,
        bytes: reports.iter().map(|r| r.bytes).sum(),
        histogram: all.histogram(),
        lengths: all.stats(),
    };
    Ok(Report {
        shards: reports,
        total,
        domains: Vec::new(),
    })
}

/// Lengths below this are counted in a dense table; longer ones are kept as values.
const DENSE: usize = 1 << 16;

/// Exact document-length statistics in bounded memory: a count per length below 2^16
/// (512 KiB) plus the rare longer documents themselves. Percentiles come out exact, and
/// two sets of counts merge by addition, so per-shard and total statistics cost one pass
/// over the lengths.
#[derive(Debug, Clone)]
pub struct LengthCounts {
    dense: Vec<u64>,
    long: Vec<u64>,
    n: u64,
    sum: u128,
    min: u64,
    max: u64,
}

impl Default for LengthCounts {
    fn default() -> Self {
        LengthCounts {
            dense: vec![0; DENSE],
            long: Vec::new(),
            n: 0,
            sum: 0,
            min: u64::MAX,
            max: 0,
        }
    }
}

impl LengthCounts {
    /// Counts one document of `len` tokens.
    pub fn add(&mut self, len: u64) {
        match usize::try_from(len)
            .ok()
            .and_then(|i| self.dense.get_mut(i))
        {
            Some(c) => *c += 1,
            None => self.long.push(len),
        }
        self.n += 1;
        self.sum += u128::from(len);
        self.min = self.min.min(len);
        self.max = self.max.max(len);
    }

    /// Adds `other`'s documents to these.
    pub fn merge(&mut self, other: &LengthCounts) {
        for (a, b) in self.dense.iter_mut().zip(&other.dense) {
            *a += b;
        }
        self.long.extend_from_slice(&other.long);
        self.n += other.n;
        self.sum += other.sum;
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
    }

    /// The `rank`-th smallest length (0-based), given the long lengths sorted.
    fn nth(&self, mut rank: u64, long_sorted: &[u64]) -> u64 {
        for (len, &c) in self.dense.iter().enumerate() {
            if rank < c {
                return len as u64;
            }
            rank -= c;
        }
        long_sorted.get(rank as usize).copied().unwrap_or(self.max)
    }

    /// Nearest-rank percentiles: pXX is the ceil(XX% * n)-th smallest length.
    pub fn stats(&self) -> LengthStats {
        if self.n == 0 {
            return LengthStats {
                min: 0,
                p50: 0,
                p90: 0,
                p99: 0,
                max: 0,
                mean: 0.0,
            };
        }
        let mut long = self.long.clone();
        long.sort_unstable();
        let pct = |p: u64| self.nth((p * self.n).div_ceil(100).max(1) - 1, &long);
        LengthStats {
            min: self.min,
            p50: pct(50),
            p90: pct(90),
            p99: pct(99),
            max: self.max,
            mean: self.sum as f64 / self.n as f64,
        }
    }

    /// Log2 buckets: length 0 in [0, 1), otherwise [2^k, 2^(k+1)); non-empty ones only.
    pub fn histogram(&self) -> Vec<Bucket> {
        let mut counts = [0u64; 65];
        for (len, &c) in self.dense.iter().enumerate() {
            counts[bucket_of(len as u64)] += c;
        }
        for &l in &self.long {
            counts[bucket_of(l)] += 1;
        }
        counts
            .iter()
            .enumerate()
            .filter(|(_, &c)| c > 0)
            .map(|(k, &count)| {
                let (lo, hi) = if k == 0 {
                    (0, 1)
                } else {
                    (1u64 << (k - 1), (1u64 << (k - 1)).saturating_mul(2))
                };
                Bucket { lo, hi, count }
            })
            .collect()
    }
}

/// Index of the log2 bucket of a length: 0 for 0, k+1 for [2^k, 2^(k+1)).
fn bucket_of(len: u64) -> usize {
    (64 - len.leading_zeros()) as usize
}

/// Documents `range` of the concatenation of `shards`, with their tokens.
pub fn dump_documents(shards: &[Shard], range: Range<u64>) -> Result<Vec<DocDump>> {
    let total: u64 = shards.iter().map(|s| s.documents()).sum();
    if range.start >= range.end || range.end > total {
        let path = shards
            .first()
            .map(|s| s.path().to_path_buf())
            .unwrap_or_default();
        return Err(corpus::CorpusError::invalid(
            path,
            format!(
                "--doc {}..{} is outside the {total} documents of the given shards",
                range.start, range.end
            ),
        ));
    }
    let mut out = Vec::new();
    let mut base = 0u64;
    for shard in shards {
        let n = shard.documents();
        let lo = range.start.max(base);
        let hi = range.end.min(base + n);
        for global in lo..hi {
            let local = global - base;
            out.push(DocDump {
                shard: shard.path().display().to_string(),
                index: global,
                local_index: local,
                group: shard.groups().and_then(|g| g.group_of(local)),
                tokens: shard.doc_tokens(local)?.to_json(),
            });
        }
        base += n;
    }
    Ok(out)
}

/// The human-readable report: a table of shards, a total line and a length histogram.
pub fn render(report: &Report) -> String {
    let mut out = String::new();
    let t = &report.total;
    let label = format!("total ({} shards)", t.shards);
    // Shard paths past 60 characters are shortened; the total's label never is.
    let name_w = report
        .shards
        .iter()
        .map(|s| s.path.chars().count())
        .max()
        .unwrap_or(5)
        .clamp(5, 60)
        .max(label.chars().count());
    let _ = writeln!(
        out,
        "{:<name_w$}  {:<7} {:>12} {:>16} {:>9} {:>8} {:>8} {:>9} {:>9}",
        "shard", "dtype", "documents", "tokens", "groups", "p50", "p90", "p99", "max"
    );
    let row = |out: &mut String,
               name: &str,
               dtype: &str,
               docs,
               toks,
               groups: Option<u64>,
               l: &LengthStats| {
        let chars = name.chars().count();
        let name = if chars > name_w {
            let tail: String = name.chars().skip(chars - (name_w - 1)).collect();
            format!("…{tail}")
        } else {
            name.to_string()
        };
        let _ = writeln!(
            out,
            "{:<name_w$}  {:<7} {:>12} {:>16} {:>9} {:>8} {:>8} {:>9} {:>9}",
            name,
            dtype,
            thousands(docs),
            thousands(toks),
            groups.map(thousands).unwrap_or_else(|| "-".into()),
            l.p50,
            l.p90,
            l.p99,
            l.max
        );
    };
    for s in &report.shards {
        row(
            &mut out,
            &s.path,
            s.dtype,
            s.documents,
            s.tokens,
            s.groups,
            &s.lengths,
        );
    }
    let dtypes: std::collections::BTreeSet<&str> = report.shards.iter().map(|s| s.dtype).collect();
    let dtype = if dtypes.len() == 1 {
        dtypes.iter().next().copied().unwrap_or("-")
    } else {
        "mixed"
    };
    row(
        &mut out,
        &label,
        dtype,
        t.documents,
        t.tokens,
        t.groups,
        &t.lengths,
    );
    let _ = writeln!(
        out,
        "\n{} bytes of tokens, mean document {:.1} tokens, {} sequences",
        thousands(t.bytes),
        t.lengths.mean,
        thousands(t.sequences)
    );
    let _ = writeln!(
        out,
        "\ndocument lengths (tokens, log2 buckets, all shards):"
    );
    out.push_str(&render_histogram(&t.histogram, t.documents));
    if !report.domains.is_empty() {
        let _ = writeln!(out, "\ndomains (shards, and the step each enters):");
        for d in &report.domains {
            let enters = match d.weighted_from {
                Some(0) => "from the start".to_string(),
                Some(s) => format!("enters at step {s}"),
                None => "never weighted".to_string(),
            };
            let _ = writeln!(out, "  {} ({} shards, {enters})", d.name, d.shards.len());
            for s in &d.shards {
                let _ = writeln!(out, "      {s}");
            }
        }
    }
    out
}

/// Horizontal bars, one line per bucket, scaled to the largest bucket.
pub fn render_histogram(buckets: &[Bucket], total: u64) -> String {
    const WIDTH: u64 = 40;
    let peak = buckets.iter().map(|b| b.count).max().unwrap_or(1).max(1);
    let mut out = String::new();
    for b in buckets {
        let cells = (b.count * WIDTH * 8).div_ceil(peak);
        let full = (cells / 8) as usize;
        let part = (cells % 8) as usize;
        let mut bar = "█".repeat(full);
        if part > 0 {
            bar.push([' ', '▏', '▎', '▍', '▌', '▋', '▊', '▉'][part]);
        }
        let _ = writeln!(
            out,
            "{:>9} ..{:>9} │{:<40} {:>12} {:>6.2}%",
            thousands(b.lo),
            thousands(b.hi),
            bar,
            thousands(b.count),
            100.0 * b.count as f64 / total.max(1) as f64
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(lens: &[u64]) -> LengthCounts {
        let mut c = LengthCounts::default();
        for &l in lens {
            c.add(l);
        }
        c
    }

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<u64> = (1..=100).rev().collect();
        let s = counts(&v).stats();
        assert_eq!((s.min, s.p50, s.p90, s.p99, s.max), (1, 50, 90, 99, 100));
        let s = counts(&[7]).stats();
        assert_eq!((s.p50, s.p99), (7, 7));
        // Long documents (past the dense table) rank correctly among short ones.
        let s = counts(&[5, 1 << 20, 70_000, 3, 1 << 40]).stats();
        assert_eq!((s.min, s.p50, s.p90, s.max), (3, 70_000, 1 << 40, 1 << 40));
        assert_eq!(s.p50, 70_000);
    }

    #[test]
    fn merged_counts_equal_counts_of_the_union() {
        let a = [1u64, 9, 65_535, 65_536, 400];
        let b = [0u64, 2, 1 << 33];
        let mut m = counts(&a);
        m.merge(&counts(&b));
        let all: Vec<u64> = a.iter().chain(&b).copied().collect();
        assert_eq!(m.stats(), counts(&all).stats());
        assert_eq!(m.histogram(), counts(&all).histogram());
        assert_eq!(m.n, 8);
    }

    #[test]
    fn log2_buckets() {
        let h = counts(&[0, 1, 2, 3, 4, 1023, 1024, 1 << 20]).histogram();
        let got: Vec<(u64, u64, u64)> = h.iter().map(|b| (b.lo, b.hi, b.count)).collect();
        assert_eq!(
            got,
            vec![
                (0, 1, 1),
                (1, 2, 1),
                (2, 4, 2),
                (4, 8, 1),
                (512, 1024, 1),
                (1024, 2048, 1),
                (1 << 20, 1 << 21, 1)
            ]
        );
    }

    /// `--doc 18446744073709551615` panicked on `a + 1`: now a clear error.
    #[test]
    fn the_largest_doc_index_is_an_error_not_a_panic() {
        let e = parse_range("18446744073709551615").unwrap_err();
        assert!(e.contains("too large"), "{e}");
        assert_eq!(
            parse_range("18446744073709551614"),
            Ok(u64::MAX - 1..u64::MAX)
        );
        assert_eq!(parse_range("3..5"), Ok(3..5));
    }
}
