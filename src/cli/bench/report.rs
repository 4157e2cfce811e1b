//! The figures `millrace bench` reports (its JSON) and their rendering as markdown tables.

use std::path::PathBuf;

use serde::Serialize;

use millrace::client::Latency;

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
    /// Of those, bytes mapped by 2 MiB entries (smaps_rollup FilePmdMapped): how much of
    /// the corpus the page cache held in huge folios, which the warm copy costs about a
    /// fifth less CPU from at 10^10 tokens (docs/BENCHMARKS.md, "Huge folios and the
    /// served rows").
    pub daemon_file_pmd_bytes: u64,
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
    /// Cache-line round trip between the first two CPUs, ns, just before the daemon
    /// started and just after it stopped (`None`: one CPU, or the measure gave up): the
    /// vCPUs' placement, which moves this run's figures and not the baseline's.
    pub core_round_trip_ns: [Option<f64>; 2],
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
    /// Cache-line round trip between the first two CPUs, ns (machine.rs,
    /// `core_round_trip_ns`; `None` with one CPU).
    pub core_round_trip_ns: Option<f64>,
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

/// The ranks run (`--ranks`): the same rows per consumer, more consumers, alternated;
/// the medians by daemon CPU per token of each side.
#[derive(Debug, Clone, Serialize)]
pub struct RanksFigures {
    /// `--consumers` consumers.
    pub base: RunFigures,
    /// `--ranks` consumers.
    pub many: RunFigures,
    /// `many`'s daemon CPU per token over `base`'s (the issue asks at most 1.2 for 8
    /// consumers against 2).
    pub ratio: f64,
}

/// One pair of the versus run: a millrace warm run, then the nanoGPT best form's and
/// the rows form's (the same bytes per token as millrace's slots), back to back.
#[derive(Debug, Clone, Serialize)]
pub struct VersusPair {
    /// The millrace run.
    pub millrace: RunFigures,
    /// The best form's run right after it.
    pub baseline: BaselineFigures,
    /// millrace's tokens/s over the best form's.
    pub ratio: f64,
    /// The rows form's run after that.
    pub rows: BaselineFigures,
    /// millrace's tokens/s over the rows form's.
    pub rows_ratio: f64,
}

/// `a` over `b`, 0 where `b` measured nothing (a run too short to time): a ratio over
/// no measurement is no figure, and the report says so rather than print 10^20.
pub(super) fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        0.0
    }
}

impl VersusPair {
    /// The triple of these runs, with its ratios.
    pub fn of(
        millrace: RunFigures,
        baseline: BaselineFigures,
        rows: BaselineFigures,
    ) -> VersusPair {
        VersusPair {
            ratio: ratio(millrace.tokens_per_s, baseline.tokens_per_s),
            rows_ratio: ratio(millrace.tokens_per_s, rows.tokens_per_s),
            millrace,
            baseline,
            rows,
        }
    }
}

/// The versus run (`--versus`): millrace warm against the nanoGPT best form warm,
/// alternated, and the spread of their ratios.
#[derive(Debug, Clone, Serialize)]
pub struct VersusFigures {
    /// `[serve] materialize_threads` of the millrace side.
    pub materialize_threads: u32,
    /// The pairs, in the order they ran.
    pub pairs: Vec<VersusPair>,
    /// The median of the pairs' ratios (the mean of the middle two for an even count).
    pub median_ratio: f64,
    /// The lowest pair ratio.
    pub min_ratio: f64,
    /// The highest pair ratio.
    pub max_ratio: f64,
    /// Pairs whose ratio is 2 or more (the warm target).
    pub pairs_at_2x: usize,
    /// The median of the pairs' ratios over the rows form.
    pub rows_median_ratio: f64,
    /// The lowest ratio over the rows form.
    pub rows_min_ratio: f64,
    /// The highest ratio over the rows form.
    pub rows_max_ratio: f64,
}

impl VersusFigures {
    /// The figures of these pairs, run with `threads` materializer threads.
    pub fn of(threads: u32, pairs: Vec<VersusPair>) -> VersusFigures {
        let mut r: Vec<f64> = pairs.iter().map(|p| p.ratio).collect();
        r.sort_by(f64::total_cmp);
        let mut rows: Vec<f64> = pairs.iter().map(|p| p.rows_ratio).collect();
        rows.sort_by(f64::total_cmp);
        VersusFigures {
            materialize_threads: threads,
            rows_median_ratio: median_of(&rows),
            rows_min_ratio: rows.first().copied().unwrap_or(0.0),
            rows_max_ratio: rows.last().copied().unwrap_or(0.0),
            median_ratio: median_of(&r),
            min_ratio: r.first().copied().unwrap_or(0.0),
            max_ratio: r.last().copied().unwrap_or(0.0),
            pairs_at_2x: r.iter().filter(|&&x| x >= 2.0).count(),
            pairs,
        }
    }
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
    /// Token dtype delivered, and the slot layout (compact: the shards' dtype).
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
    /// The ranks run (absent without `--ranks`).
    pub ranks: Option<RanksFigures>,
    /// The versus run (absent without `--versus` or without the baseline).
    pub versus: Option<VersusFigures>,
    /// Whether every millrace run delivered the same tokens.
    pub same_tokens: bool,
    /// Wall seconds of the whole bench.
    pub wall_s: f64,
}

/// The median element of `v` by `key`, the lower one of an even count: with `--repeat
/// 2` the upper one was the better run, and the wider a side's spread the more that
/// flattered it.
pub(super) fn median_by<T: Clone>(mut v: Vec<T>, key: impl Fn(&T) -> f64) -> Option<T> {
    v.sort_by(|a, b| key(a).total_cmp(&key(b)));
    let n = v.len();
    (n > 0).then(|| v.swap_remove((n - 1) / 2))
}

/// The median of sorted values, the mean of the middle two for an even count (0 for
/// none): the versus run's pairs are few, and an even count's upper middle would
/// report its better half.
pub(super) fn median_of(sorted: &[f64]) -> f64 {
    let n = sorted.len();
    match n {
        0 => 0.0,
        _ if n % 2 == 1 => sorted[n / 2],
        _ => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// "min-max" of the repetitions, "-" for one.
pub(super) fn range(v: &[f64]) -> String {
    if v.len() < 2 {
        return "-".into();
    }
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(0.0, f64::max);
    format!("{lo:.2e}-{hi:.2e}")
}

pub(super) fn mb(b: u64) -> String {
    format!("{:.0} MB", b as f64 / 1e6)
}

pub(super) fn ms(s: f64) -> String {
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
        millrace::util::thousands(r.corpus_tokens),
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
    let _ = writeln!(
        s,
        "\ncache-line round trip between the first two CPUs: {} ns (the vCPUs' placement; \
         each run's, before and after it, is in its row)",
        rtt(f.core_round_trip_ns)
    );
    let _ = writeln!(s, "\nmillrace streaming (consumers read every byte):");
    let _ = writeln!(
        s,
        "| cache | threads | steps | daemon start | first batch | tokens/s (median) | min-max | payload GB/s | / memcpy | source GB/s | / read ref | disk read | wake p50/p99 us | daemon CPU s per 1e9 tok | / memcpy time | consumer CPU s per 1e9 | daemon VmHWM | RssAnon | RssFile (PMD-mapped) | RssShmem | faults minor/major | core round trip ns, before/after |"
    );
    let _ = writeln!(s, "|{}", " --- |".repeat(22));
    for x in r.cold.iter().chain(&r.runs) {
        let file = format!(
            "{} ({})",
            mb(x.daemon_rss_file_bytes),
            mb(x.daemon_file_pmd_bytes)
        );
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {:.3e} | {} | {:.3} | {:.3} | {:.3} | {:.3} | {} | {:.0}/{:.0} | {:.2} | {:.2} | {:.2} | {} | {} | {} | {} | {}/{} | {}/{} |",
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
            file,
            mb(x.daemon_rss_shmem_bytes),
            x.daemon_minor_faults,
            x.daemon_major_faults,
            rtt(x.core_round_trip_ns[0]),
            rtt(x.core_round_trip_ns[1]),
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
    if let Some(k) = &r.ranks {
        let (b, m) = (&k.base, &k.many);
        let _ = writeln!(
            s,
            "\nranks: {} consumers against {}, {} rows each, {} materializer threads, \
             alternated (medians by daemon CPU):",
            m.consumers, b.consumers, r.rows, b.materialize_threads
        );
        let _ = writeln!(
            s,
            "| consumers | steps | tokens/s | daemon CPU s per 1e9 tok | consumer CPU s per 1e9 | wake p50/p99 us | core round trip ns, before/after |"
        );
        let _ = writeln!(s, "|{}", " --- |".repeat(7));
        for x in [b, m] {
            let _ = writeln!(
                s,
                "| {} | {} | {:.3e} | {:.2} | {:.2} | {:.0}/{:.0} | {}/{} |",
                x.consumers,
                x.steps,
                x.tokens_per_s,
                x.daemon_cpu_s_per_1e9_tokens,
                x.consumer_cpu_s_per_1e9_tokens,
                x.wake_latency.p50_us,
                x.wake_latency.p99_us,
                rtt(x.core_round_trip_ns[0]),
                rtt(x.core_round_trip_ns[1]),
            );
        }
        let _ = writeln!(
            s,
            "daemon CPU per token, {} consumers / {}: {:.2}",
            m.consumers, b.consumers, k.ratio
        );
    }
    if let Some(v) = &r.versus {
        s.push_str(&render_versus(v));
    }
    if let Some(f) = &r.fairness {
        s.push('\n');
        s.push_str(&render_fairness(f));
    }
    s
}

/// The versus run's table: each pair, then the median and spread of their ratios.
fn render_versus(v: &VersusFigures) -> String {
    use std::fmt::Write as _;
    let mut s = format!(
        "\nversus: {} alternated pairs, millrace ({} materializer threads) against the \
         nanoGPT best form (int64 x and y) and the rows form (one array of the shards' \
         dtype, as millrace's slots), warm; baseline CPU is steady (after the first \
         batch):\n",
        v.pairs.len(),
        v.materialize_threads
    );
    s.push_str(
        "| pair | millrace tokens/s | daemon CPU s per 1e9 tok | consumer CPU s per 1e9 | \
         best form tokens/s | best form CPU s per 1e9 tok | millrace / best form | \
         rows form tokens/s | rows form CPU s per 1e9 tok | millrace / rows form |\n",
    );
    s.push('|');
    s.push_str(&" --- |".repeat(10));
    s.push('\n');
    for (i, p) in v.pairs.iter().enumerate() {
        let (m, b) = (&p.millrace, &p.baseline);
        let _ = writeln!(
            s,
            "| {} | {:.3e} | {:.2} | {:.2} | {:.3e} | {:.2} | {} | {:.3e} | {:.2} | {} |",
            i + 1,
            m.tokens_per_s,
            m.daemon_cpu_s_per_1e9_tokens,
            m.consumer_cpu_s_per_1e9_tokens,
            b.tokens_per_s,
            b.steady_cpu_s_per_1e9_tokens,
            shown(p.ratio),
            p.rows.tokens_per_s,
            p.rows.steady_cpu_s_per_1e9_tokens,
            shown(p.rows_ratio),
        );
    }
    let _ = writeln!(
        s,
        "millrace / best form: median {:.2} ({:.2}-{:.2}); {} of {} pairs at 2x or more",
        v.median_ratio,
        v.min_ratio,
        v.max_ratio,
        v.pairs_at_2x,
        v.pairs.len()
    );
    let _ = writeln!(
        s,
        "millrace / rows form (the same bytes delivered): median {:.2} ({:.2}-{:.2})",
        v.rows_median_ratio, v.rows_min_ratio, v.rows_max_ratio,
    );
    if v.pairs
        .iter()
        .any(|p| p.ratio == 0.0 || p.rows_ratio == 0.0)
    {
        let _ = writeln!(
            s,
            "(a ratio of 0 is no figure: that baseline run measured nothing; give more \
             --baseline-steps)"
        );
    }
    s
}

/// A ratio for the tables: two decimals, `-` where it is no figure ([`ratio`]).
fn shown(r: f64) -> String {
    if r > 0.0 {
        format!("{r:.2}")
    } else {
        "-".into()
    }
}

/// The fairness figure as a line of text.
pub(super) fn render_fairness(f: &FairnessFigures) -> String {
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

/// A core round trip for the tables: whole ns, or `-` where none was measured.
pub(super) fn rtt(ns: Option<f64>) -> String {
    ns.map_or_else(|| "-".to_string(), |v| format!("{v:.0}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_range() {
        let m = median_by(vec![3.0, 1.0, 2.0], |x| *x);
        assert_eq!(m, Some(2.0));
        assert_eq!(median_by(vec![5.0, 9.0], |x| *x), Some(5.0));
        assert_eq!(ratio(3.0, 0.0), 0.0);
        assert_eq!(ratio(3.0, 1.5), 2.0);
        assert_eq!(median_by(Vec::<f64>::new(), |x| *x), None);
        assert_eq!(median_of(&[1.0, 2.0, 4.0]), 2.0);
        assert_eq!(median_of(&[1.0, 2.0, 4.0, 8.0]), 3.0);
        assert_eq!(median_of(&[]), 0.0);
        assert_eq!(range(&[1.0]), "-");
        assert_eq!(range(&[2e8, 1e8]), "1.00e8-2.00e8");
    }
}
