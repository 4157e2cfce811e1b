//! `millrace consume`: one process standing in for a trainer rank, streaming steps and
//! summarizing throughput, latency and the realized mixture (what `demo` and `bench`
//! run several of).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use super::gpu::{Device, DeviceFigures, DeviceSink, Gpu};
use super::{from_hex, monotonic_ns, to_hex, Client, ClientError, Hello, SlotLayout};

/// Arguments of `millrace consume`.
#[derive(clap::Args, Debug, Clone)]
pub struct ConsumeArgs {
    /// The daemon's socket [default: --config's `[serve] socket`, else the daemon's
    /// default, as for `status`, `ctl` and `top`].
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// Data-parallel rank.
    #[arg(long)]
    pub dp_rank: u32,
    /// Data-parallel size (at least 1).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub dp_size: u32,
    /// Job name.
    #[arg(long, default_value = "default")]
    pub job: String,
    /// This client's name among its dp rank's peers.
    #[arg(long, default_value = "0")]
    pub replica: String,
    /// Peers of this dp rank on this node.
    #[arg(long, default_value_t = 1)]
    pub replicas: u32,
    /// Rows per micro-batch (default: global_batch_rows / dp_size / micro_batches from
    /// --config, or without --config the daemon's default, the whole slice).
    #[arg(long)]
    pub micro_batch_rows: Option<u32>,
    /// Micro-batches per step.
    #[arg(long, default_value_t = 1)]
    pub micro_batches: u32,
    /// The run's config: its `[serve] socket` (without --socket) and --micro-batch-rows.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Steps to read (at least 1).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..))]
    pub steps: u64,
    /// Resume from the cursor in this file (hex text, or the raw blob).
    #[arg(long)]
    pub cursor_file: Option<PathBuf>,
    /// Seek to this step (without a cursor).
    #[arg(long)]
    pub start_step: Option<u64>,
    /// Refuse unless the daemon's plan fingerprint is this.
    #[arg(long)]
    pub fingerprint: Option<String>,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
    /// Write the last step's cursor (hex) here at the end, through a temporary file
    /// renamed over it (so it may be the --cursor-file: a kill leaves the old one whole).
    #[arg(long)]
    pub save_cursor: Option<PathBuf>,
    /// When the daemon goes away, reconnect with the last cursor for up to SECS.
    #[arg(long, value_name = "SECS", default_value_t = 0.0, value_parser = parse_secs_or_0)]
    pub reconnect_timeout: f64,
    /// Also read every other byte the slot stores (labels, loss_mask, position_ids when
    /// expanded; document starts and real counts when compact), in place, as a trainer's
    /// host-to-device copy would.
    #[arg(long)]
    pub touch: bool,
    /// Batches kept unreleased while the next is read (at most the ring's slots less
    /// one; more is warned of and lowered).
    #[arg(long, default_value_t = 0)]
    pub hold: u64,
    /// Give up when one batch, or the daemon's WELCOME (a seek), takes longer than SECS.
    #[arg(long, value_name = "SECS", default_value_t = 120.0, value_parser = parse_secs_or_0)]
    pub timeout: f64,
    /// The slot layout to ask for (`compact` or `expanded`) [default: the daemon's,
    /// compact]; `--touch` reads what the layout stores (deriving a compact slot's
    /// arrays is the trainer's, on its device).
    #[arg(long, value_parser = parse_layout)]
    pub slot_layout: Option<SlotLayout>,
    /// Where each batch goes: `cpu` reads it in place in the ring; `cuda:N` copies each
    /// slot to device N (one host-to-device copy per step from the ring, registered
    /// read-only with the CUDA driver; the slot is released once the copy completed) and
    /// reports GB/s and ready->device latency. `cuda:N` needs libcuda at run time.
    #[arg(long, default_value = "cpu", value_parser = parse_device)]
    pub device: Device,
    /// With `--device cuda:N`: read every copy back and compare it with the slot (slow;
    /// for checks, not measurements).
    #[arg(long)]
    pub verify_device: bool,
    /// Print `{"progress": STEPS}` lines on stderr a few times a second (for `bench`).
    #[arg(long, hide = true)]
    pub progress: bool,
}

/// Seconds for `--timeout` and `--reconnect-timeout`: 0 (their "no limit" and "no
/// reconnect") up to a year. Refused here: `inf` or `1e30` made `Duration` panic when
/// the daemon went away, and `nan` silently meant 0.
fn parse_secs_or_0(s: &str) -> Result<f64, String> {
    const YEAR: f64 = 365.0 * 86_400.0;
    let v: f64 = (s.trim().parse())
        .map_err(|_| format!("`{s}` is not a number of seconds (e.g. 10 or 0.5)"))?;
    if !(0.0..=YEAR).contains(&v) {
        return Err(format!("{s} s is outside 0..={YEAR} (a year)"));
    }
    Ok(v)
}

fn parse_layout(s: &str) -> Result<SlotLayout, String> {
    match s {
        "compact" => Ok(SlotLayout::Compact),
        "expanded" => Ok(SlotLayout::Expanded),
        other => Err(format!("{other:?}: expected \"compact\" or \"expanded\"")),
    }
}

fn parse_device(s: &str) -> Result<Device, String> {
    s.parse()
}

/// Percentiles of publish-to-wake latency.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Latency {
    /// Batches the client had to wait for (the others were already published).
    pub samples: u64,
    /// Median, microseconds.
    pub p50_us: f64,
    /// 99th percentile, microseconds.
    pub p99_us: f64,
    /// Maximum, microseconds.
    pub max_us: f64,
}

impl Latency {
    /// Summarizes nanosecond samples (sorted in place).
    pub fn from_ns(v: &mut [u64]) -> Latency {
        if v.is_empty() {
            return Latency::default();
        }
        v.sort_unstable();
        let q = |p: f64| {
            let i = ((p * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1;
            v[i] as f64 / 1e3
        };
        Latency {
            samples: v.len() as u64,
            p50_us: q(0.5),
            p99_us: q(0.99),
            max_us: v[v.len() - 1] as f64 / 1e3,
        }
    }
}

/// Seconds from the first consumer's first batch to the last consumer's last: the
/// wall-clock span that throughput over several consumer processes is measured on.
pub fn span_seconds(summaries: &[ConsumeSummary]) -> f64 {
    let first = summaries
        .iter()
        .map(|s| s.first_batch_ns)
        .min()
        .unwrap_or(0);
    let last = summaries.iter().map(|s| s.last_batch_ns).max().unwrap_or(0);
    last.saturating_sub(first) as f64 / 1e9
}

/// What `millrace consume --json` prints; demo and bench read it back (missing fields
/// default, so the Python consumer of `millrace demo` may print a subset).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct ConsumeSummary {
    /// dp rank.
    pub dp_rank: u32,
    /// Plan fingerprint.
    pub fingerprint: String,
    /// First step received.
    pub first_step: u64,
    /// Last step received.
    pub last_step: u64,
    /// Steps received.
    pub steps: u64,
    /// Input positions received (rows * seq_len per step).
    pub tokens: u64,
    /// Non-padding tokens (each row holds seq_len + 1).
    pub real_tokens: u64,
    /// Loss tokens.
    pub loss_tokens: u64,
    /// Bytes of the arrays a trainer copies, received ([`crate::client::BatchView::payload_bytes`]):
    /// tokens, labels, loss_mask and position_ids of expanded slots; rows, doc_starts
    /// and row_real_tokens of compact ones (the default).
    pub payload_bytes: u64,
    /// Seconds from the first batch to the last.
    pub seconds: f64,
    /// Tokens per second over that span (the first batch excluded).
    pub tokens_per_s: f64,
    /// `CLOCK_MONOTONIC` ns at the first batch, to combine several consumers.
    pub first_batch_ns: u64,
    /// `CLOCK_MONOTONIC` ns at the last batch.
    pub last_batch_ns: u64,
    /// Publish-to-wake latency.
    pub wake_latency: Latency,
    /// Raw latency samples in ns, so several consumers' percentiles can be pooled.
    #[serde(default)]
    pub wake_latency_ns: Vec<u64>,
    /// Wrapping sum of every value read (tokens, and with --touch every array).
    pub checksum: i64,
    /// xxh3-64 of all token bytes, in step order.
    pub digest: String,
    /// What the digest hashed ([`super::BatchView::token_bytes_kind`]): two digests
    /// compare only when this is equal too (the same tokens in the other layout, or in a
    /// wider dtype, hash differently).
    pub digest_of: String,
    /// Real tokens per domain name (for the realized mixture).
    pub domain_tokens: BTreeMap<String, u64>,
    /// Reconnects after the daemon went away.
    pub reconnects: u64,
    /// This consumer process's CPU time (user + system) at the end.
    pub cpu_seconds: f64,
    /// With `--device cuda:N`: the copies to the device.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device: Option<DeviceFigures>,
}

/// CPU time (user + system) of this process so far, in seconds.
pub use crate::sys::process_cpu_seconds;

/// Reads a cursor file: hex text, or the raw blob. At most [`super::MAX_JSON_FRAME_LEN`]
/// bytes are read (no HELLO can carry a longer blob, as hex or raw): a wrong path (a
/// shard, `/dev/zero`) is refused naming the file, not read until memory runs out.
pub fn read_cursor_file(path: &Path) -> anyhow::Result<String> {
    use std::io::Read as _;
    let limit = super::MAX_JSON_FRAME_LEN as u64;
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(limit + 1).read_to_end(&mut bytes))
        .with_context(|| format!("reading cursor file {}", path.display()))?;
    if bytes.len() as u64 > limit {
        anyhow::bail!(
            "cursor file {} holds more than {limit} bytes: not a cursor blob (hex, as \
             --save-cursor writes it, or raw)",
            path.display()
        );
    }
    if let Ok(text) = std::str::from_utf8(&bytes) {
        let t = text.trim();
        if !t.is_empty() && from_hex(t).is_some() {
            return Ok(t.to_ascii_lowercase());
        }
    }
    Ok(to_hex(&bytes))
}

/// Writes a cursor blob (hex and a newline) to `path` through a temporary file beside
/// it, fsynced and renamed over it: a consumer killed mid-write (or a full disk) leaves
/// the previous cursor whole, never a truncated one that a resume would refuse. A
/// resume loop that reads and saves one file (`--cursor-file F --save-cursor F`) may
/// then be killed at any moment.
///
/// Through a symbolic link the file it names is replaced, not the link; a path that is
/// not a regular file (`/dev/stdout`, a FIFO) is written in place: it holds no previous
/// cursor to lose, and no temporary file can be made beside it.
fn save_cursor_file(path: &Path, blob: &[u8]) -> anyhow::Result<()> {
    let text = format!("{}\n", to_hex(blob));
    let context = || format!("writing the cursor file {}", path.display());
    let target = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    if std::fs::metadata(&target).is_ok_and(|m| !m.is_file()) {
        return std::fs::write(&target, text).with_context(context);
    }
    let mut tmp = target.as_os_str().to_owned();
    tmp.push(format!(".tmp.{}", std::process::id()));
    crate::corpus::writer::write_durably(&target, Path::new(&tmp), text.as_bytes())
        .with_context(context)
}

/// The socket `consume` connects to: `--socket`, else the config's, else the default.
fn consume_socket(args: &ConsumeArgs) -> anyhow::Result<PathBuf> {
    if let Some(s) = &args.socket {
        return Ok(s.clone());
    }
    if let Some(path) = &args.config {
        let cfg = crate::config::Config::load(path)?;
        return Ok(crate::config::serve::ServeConfig::from_config(&cfg)?.socket);
    }
    Ok(crate::config::serve::default_socket())
}

/// Why `dp_size` ranks of `micro_batches` micro-batches each cannot split the steps of
/// `plan`'s stages, in the terms of `consume`'s flags, when they cannot: the check the
/// daemon makes at HELLO (`Plan::dp_size_problem`, then each rank's rows into equal
/// micro-batches), made before connecting. `micro_batches` is judged only when
/// `micro_batch_rows` is derived from the config (`derive`); a given one the daemon
/// judges by its own name.
fn split_problem(
    plan: &crate::config::plan::PlanConfig,
    dp_size: u32,
    micro_batches: u32,
    derive: bool,
) -> Option<String> {
    let stages = std::iter::once((0, plan.global_batch_rows))
        .chain(plan.stage.iter().map(|s| (s.step, s.global_batch_rows)));
    for (step, rows) in stages {
        let which = match step {
            0 => format!("global_batch_rows {rows}"),
            step => format!("global_batch_rows {rows} of the stage at plan step {step}"),
        };
        if dp_size == 0 || rows % dp_size != 0 {
            return Some(format!("--dp-size {dp_size} does not divide {which}"));
        }
        let per_rank = rows / dp_size;
        if derive && per_rank % micro_batches.max(1) != 0 {
            let how = if micro_batches > per_rank {
                "is more than"
            } else {
                "does not divide"
            };
            return Some(format!(
                "--micro-batches {micro_batches} {how} the {per_rank} rows per dp rank \
                 ({which} / --dp-size {dp_size})"
            ));
        }
    }
    None
}

/// Streams `args.steps` steps as one trainer rank and summarizes them.
pub fn consume(args: &ConsumeArgs) -> anyhow::Result<ConsumeSummary> {
    if args.micro_batches == 0 {
        anyhow::bail!("--micro-batches 0: a step needs at least one micro-batch");
    }
    // With the run's config, a --dp-size or --micro-batches that cannot split its steps
    // is refused here, in the flags' terms: the daemon's refusal names HELLO fields
    // (`micro_batch_rows`) that the user did not set.
    let plan = match &args.config {
        Some(cfg) => {
            let plan = crate::config::Config::load(cfg)?.plan_config()?;
            let derive = args.micro_batch_rows.is_none();
            if let Some(why) = split_problem(&plan, args.dp_size, args.micro_batches, derive) {
                anyhow::bail!("{why} (--config {}): the daemon refuses it", cfg.display());
            }
            Some(plan)
        }
        None => None,
    };
    let micro_batch_rows = match (args.micro_batch_rows, &plan) {
        (Some(m), _) => Some(m),
        (None, Some(plan)) => Some(plan.global_batch_rows / args.dp_size / args.micro_batches),
        (None, None) => None,
    };
    let mut hello = Hello::whole_slice(args.dp_rank, args.dp_size);
    hello.slot_layout = args.slot_layout;
    hello.micro_batch_rows = micro_batch_rows;
    hello.micro_batches = args.micro_batches;
    hello.job = args.job.clone();
    hello.replica = args.replica.clone();
    hello.replicas = args.replicas;
    hello.start_step = args.start_step;
    hello.fingerprint = args.fingerprint.clone();
    if let Some(f) = &args.cursor_file {
        hello.cursor = Some(read_cursor_file(f)?);
    }
    // The device before the daemon: without CUDA, say so before taking a ring.
    let gpu = match args.device {
        Device::Cpu => None,
        Device::Cuda(n) => Some(Gpu::open(n).with_context(|| format!("--device {}", args.device))?),
    };
    let socket = consume_socket(args)?;
    // The error names the socket itself.
    // --timeout 0 waits as long as it takes, for WELCOME as for batches.
    let handshake = match args.timeout {
        t if t > 0.0 => {
            Duration::try_from_secs_f64(t).map_err(|e| anyhow::anyhow!("--timeout {t}: {e}"))?
        }
        _ => Duration::from_secs(365 * 24 * 3600),
    };
    let mut client = Client::connect_within(&socket, &hello, handshake).map_err(|e| {
        // The daemon judges the blob, not the file: name the file it came from.
        match (&e, &args.cursor_file) {
            (ClientError::Refused { code, .. }, Some(f)) if code == "cursor" => {
                anyhow::Error::new(e).context(format!("--cursor-file {}", f.display()))
            }
            _ => e.into(),
        }
    })?;
    client.set_hold(args.hold);
    if client.hold() < args.hold {
        // Said, not silently less: the ring cannot hold more (the Python client refuses).
        eprintln!(
            "warning: --hold {}: the ring has {} slots, so at most {} batches are held; \
             holding {}",
            args.hold,
            client.welcome().slots,
            client.hold(),
            client.hold()
        );
    }
    // Copies in flight: the held steps and the newest; each slot stays unreleased until
    // its copy completed.
    let mut keep = client.hold() as usize;
    let mut sink = match gpu {
        // SAFETY: the sink is unregistered before every reconnect and dropped before the
        // client (declared after it), and each step is retired down to the hold right
        // after its submit, before the next `next_batch` releases anything.
        Some(gpu) => Some(
            unsafe { DeviceSink::new(gpu, &client, keep + 1, args.verify_device) }
                .with_context(|| format!("--device {}", args.device))?,
        ),
        None => None,
    };
    if args.timeout > 0.0 {
        client.set_timeout(Some(Duration::from_secs_f64(args.timeout)));
    }
    let domains = client.welcome().domains.clone();
    let mut s = ConsumeSummary {
        dp_rank: args.dp_rank,
        fingerprint: client.welcome().fingerprint.clone(),
        first_step: client.next_step(),
        ..ConsumeSummary::default()
    };
    let mut digest = twox_hash::XxHash3_64::new();
    let mut domain_tokens = vec![0u64; domains.len()];
    let mut first_tokens = 0u64;
    let mut received = 0u64;
    let mut last_progress = 0u64;
    while received < args.steps {
        let b = match client.next_batch() {
            Ok(b) => b,
            Err(e) if e.is_transient() && args.reconnect_timeout > 0.0 => {
                tracing::warn!("{e}; reconnecting");
                // The registration goes before the mapping it pins does.
                if let Some(sink) = &mut sink {
                    sink.unregister().context("finishing the copies")?;
                }
                client
                    .reconnect(Duration::from_secs_f64(args.reconnect_timeout))
                    .context("reconnecting")?;
                if let Some(sink) = &mut sink {
                    // SAFETY: as for `DeviceSink::new` above.
                    unsafe { sink.register(&client) }.context("registering the new ring")?;
                }
                // A ring of fewer slots lowers the hold: no more copies than it may stay
                // in flight, or a slot would be released under its DMA.
                keep = client.hold() as usize;
                s.reconnects += 1;
                continue;
            }
            Err(e) => {
                return Err(
                    anyhow::Error::new(e).context(format!("reading step {}", client.next_step()))
                )
            }
        };
        let now = monotonic_ns();
        if let Some(sink) = &mut sink {
            // Copy first, and wait for all but the held copies: ready->device is then the
            // copy alone, and the steps the next call releases are on the device.
            sink.submit(&b, now)
                .and_then(|()| sink.retire(keep))
                .with_context(|| format!("copying step {} to {}", b.step, args.device))?;
        }
        if received == 0 {
            s.first_batch_ns = now;
            s.first_step = b.step;
            first_tokens = u64::from(b.rows) * u64::from(b.seq_len);
        }
        s.last_batch_ns = now;
        s.last_step = b.step;
        s.steps += 1;
        s.tokens += u64::from(b.rows) * u64::from(b.seq_len);
        s.real_tokens += b.real_tokens;
        s.loss_tokens += b.loss_tokens;
        s.payload_bytes += b.payload_bytes();
        std::hash::Hasher::write(&mut digest, b.token_bytes());
        if received == 0 {
            s.digest_of = b.token_bytes_kind();
        }
        s.checksum = s.checksum.wrapping_add(b.inputs_sum());
        if args.touch {
            // Every byte the slot stores, read in place: what a trainer's one copy reads.
            s.checksum = s.checksum.wrapping_add(b.stored_sum());
        }
        if let Some(ns) = b.wake_latency_ns {
            s.wake_latency_ns.push(ns);
        }
        for (r, &d) in b.domain.iter().enumerate() {
            if let Some(slot) = usize::try_from(d)
                .ok()
                .and_then(|d| domain_tokens.get_mut(d))
            {
                *slot += u64::from(b.row_real_tokens(r));
            }
        }
        received += 1;
        if args.progress && now.saturating_sub(last_progress) > 200_000_000 {
            last_progress = now;
            eprintln!("{{\"progress\": {received}}}");
        }
    }
    if let Some(mut sink) = sink.take() {
        sink.retire(0).context("finishing the copies")?;
        s.device = Some(sink.figures());
        // Dropped here: the ring is unregistered before `bye` unmaps it.
    }
    client.release(client.next_step()).ok();
    s.seconds = s.last_batch_ns.saturating_sub(s.first_batch_ns) as f64 / 1e9;
    s.tokens_per_s = if s.seconds > 0.0 {
        (s.tokens - first_tokens) as f64 / s.seconds
    } else {
        0.0
    };
    s.wake_latency = Latency::from_ns(&mut s.wake_latency_ns.clone());
    s.digest = format!("{:016x}", std::hash::Hasher::finish(&digest));
    s.cpu_seconds = process_cpu_seconds();
    s.domain_tokens = domains.into_iter().zip(domain_tokens).collect();
    if let Some(path) = &args.save_cursor {
        let blob = client
            .last_cursor()
            .context("no step was read, so there is no cursor to save")?;
        save_cursor_file(path, blob)?;
    }
    client.bye().ok();
    Ok(s)
}

/// Runs `millrace consume`.
pub fn run_consume(args: ConsumeArgs) -> anyhow::Result<()> {
    let mut s = consume(&args)?;
    let mut out = std::io::stdout().lock();
    if args.json {
        writeln!(out, "{}", serde_json::to_string(&s)?)?;
    } else {
        s.wake_latency_ns.clear();
        writeln!(
            out,
            "dp rank {}: steps {}..={} ({} steps), {} tokens in {:.3} s = {:.3e} tokens/s; \
             wake latency p50 {:.1} us p99 {:.1} us ({} waits); digest {} of {}; checksum {}",
            s.dp_rank,
            s.first_step,
            s.last_step,
            s.steps,
            s.tokens,
            s.seconds,
            s.tokens_per_s,
            s.wake_latency.p50_us,
            s.wake_latency.p99_us,
            s.wake_latency.samples,
            s.digest,
            s.digest_of,
            s.checksum
        )?;
        if let Some(d) = &s.device {
            let pinning = d.pinning.as_ref().map_or("?".into(), |p| p.to_string());
            writeln!(
                out,
                "{}: ring {pinning} in {:.2} ms; {} copies of {} bytes, p50 {:.2} GB/s; \
                 ready->device p50 {:.1} us p99 {:.1} us; {} read back and equal",
                d.device,
                d.register_s * 1e3,
                d.copies,
                d.bytes / d.copies.max(1),
                d.copy_gb_per_s_p50,
                d.ready_to_device.p50_us,
                d.ready_to_device.p99_us,
                d.verified
            )?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
