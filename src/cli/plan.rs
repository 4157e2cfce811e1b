//! `millrace plan` (N steps of a config's plan, summarized per window) and `millrace
//! explain` (the documents behind every row of one step).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};

use millrace::config::plan::MAX_STEP;
use millrace::config::Config;
use millrace::plan::cursor;
use millrace::plan::report::{positions, DomainPosition};
use millrace::plan::{Plan, Planner};
use millrace::plan_cache::CheckpointDir;
use millrace::wire::protocol::decode_hex;

#[derive(clap::Args)]
pub struct PlanArgs {
    /// The run's config.
    #[arg(long)]
    config: PathBuf,
    /// Steps to plan (at least 1).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    steps: u64,
    /// First step (reached by recomputation, from the nearest stored plan checkpoint;
    /// with --resume-blob, by planning on from the blob) [default: 0, or the step the
    /// blob resumes at].
    #[arg(long)]
    from: Option<u64>,
    /// Start from this cursor blob (hex, as `consume --save-cursor` writes it, or raw
    /// bytes): an old run's final blob continues under this config (continual
    /// pretraining), and the report says how much of each domain's epoch it had seen.
    #[arg(long)]
    resume_blob: Option<PathBuf>,
    /// Replay from step 0, neither reading nor writing plan checkpoints.
    #[arg(long)]
    no_checkpoints: bool,
    /// Steps per reported window (default: steps / 10).
    #[arg(long)]
    window: Option<u64>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
pub struct ExplainArgs {
    /// The run's config.
    #[arg(long)]
    config: PathBuf,
    /// Trainer step (reached from the nearest stored plan checkpoint, or from
    /// --resume-blob).
    #[arg(long)]
    step: u64,
    /// Start from this cursor blob (hex or raw bytes) instead of step 0: --step must be
    /// at or after the step the blob resumes at (one past the step it was saved at).
    #[arg(long)]
    resume_blob: Option<PathBuf>,
    /// Replay from step 0, neither reading nor writing plan checkpoints.
    #[arg(long)]
    no_checkpoints: bool,
    /// Data-parallel rank whose rows to list (rows [rG/R, (r+1)G/R) of G; all rows with
    /// the default --dp-size 1).
    #[arg(long, default_value_t = 0)]
    dp_rank: u32,
    /// Data-parallel size.
    #[arg(long, default_value_t = 1)]
    dp_size: u32,
    /// Explain this many consecutive steps, at least 1 (with --json: one JSON object
    /// per line).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    count: u64,
    /// Print JSON (stable, for comparing runs).
    #[arg(long)]
    json: bool,
}

pub fn run_plan(args: PlanArgs) -> Result<()> {
    use millrace::plan::report::{render_positions, render_upsampling, render_windows, Tally};
    let t0 = std::time::Instant::now();
    within_reach("--from", args.from.unwrap_or(0), 1)?;
    let config = Config::load(&args.config)?;
    let loaded = config.load_plan()?;
    for w in loaded.plan.warnings() {
        eprintln!("warning: {}: {w}", args.config.display());
    }
    let load_ms = t0.elapsed().as_secs_f64() * 1e3;
    let t1 = std::time::Instant::now();
    let Start {
        plan,
        mut planner,
        resumed,
    } = start_at(
        &config,
        &loaded.plan,
        args.from,
        args.resume_blob.as_deref(),
        args.no_checkpoints,
    )?;
    let from = planner.step();
    within_reach("--steps", from, args.steps)?;
    warn_of_live_changes(&config, &plan, from + args.steps.saturating_sub(1));
    let seek_ms = t1.elapsed().as_secs_f64() * 1e3;
    let at_start = positions(&planner);
    let window = args.window.unwrap_or((args.steps / 10).max(1)).max(1);
    let mut tally = Tally::new(&plan);
    tally.observe(&planner, None, planner.plan_step());
    let mut windows = Vec::new();
    let mut first_ms = 0.0;
    let mut in_window = 0u64;
    for i in 0..args.steps {
        let t2 = std::time::Instant::now();
        let batch = planner.next_batch();
        if i == 0 {
            first_ms = t2.elapsed().as_secs_f64() * 1e3;
        }
        let stage = plan.stage_at(batch.plan_step);
        tally.observe(&planner, Some(batch.step), batch.plan_step);
        tally.add(batch);
        in_window += 1;
        // Windows also end at a stage switch, so each reports one shape.
        let next_stage = plan.stage_at(plan.plan_step_of(planner.step()));
        if in_window == window || i + 1 == args.steps || next_stage != stage {
            windows.push(tally.finish_at(&planner));
            in_window = 0;
        }
    }
    refuse_poisoned(&loaded.shards)?;
    // Plan-time check of eod_token (never in the daemon's hot path): see src/eod.rs.
    let eod = millrace::eod::check_plan(&plan, &loaded.shards)?;
    let mut out = std::io::stdout().lock();
    if args.json {
        let names = plan.domain_names();
        let json = serde_json::json!({
            "fingerprint": format!("{:032x}", plan.fingerprint()),
            "domains": names,
            "fill": plan.fill(),
            "stages": plan.stages(),
            "upsampling": tally.upsampling(),
            "eod": eod.as_ref().map(|(_, r)| r),
            "windows": windows,
            "start": at_start,
            "end": positions(&planner),
            "first_rows": tally.first_rows(),
            "resumed": resumed,
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
            "opened and identified the corpus and built the plan in {load_ms:.1} ms; \
             reached step {from} in {seek_ms:.1} ms; planned its batch in {first_ms:.2} ms"
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
        if plan.stages().len() > 1 {
            let stages: Vec<String> = plan
                .stages()
                .iter()
                .map(|s| {
                    format!(
                        "from step {}: {} rows of {} tokens",
                        s.step, s.rows, s.seq_len
                    )
                })
                .collect();
            writeln!(out, "stages: {}", stages.join("; "))?;
        }
        write!(out, "{}", render_upsampling(&tally.upsampling()))?;
        if let Some((e, r)) = &eod {
            write!(out, "{}", millrace::eod::render(r, *e))?;
        }
        write!(out, "{}", render_windows(&windows))?;
        if let Some(r) = &resumed {
            write!(out, "{}", r.render())?;
        }
        let title = format!("domains after step {}:", planner.step().saturating_sub(1));
        let end = positions(&planner);
        write!(
            out,
            "{}",
            render_positions(&title, &end, tally.first_rows())
        )?;
    }
    if let (true, Some((e, r))) = (args.json, &eod) {
        for w in r.iter().filter_map(|d| millrace::eod::warning(d, *e)) {
            eprintln!("{w}");
        }
    }
    Ok(())
}

pub fn run_explain(args: ExplainArgs) -> Result<()> {
    use millrace::plan::explain::{explain, render_explain};
    if args.dp_size == 0 || args.dp_rank >= args.dp_size {
        bail!(
            "--dp-rank {} is not below --dp-size {}",
            args.dp_rank,
            args.dp_size
        );
    }
    within_reach("--step", args.step, 1)?;
    within_reach("--count", args.step, args.count)?;
    let config = Config::load(&args.config)?;
    let loaded = config.load_plan()?;
    // Refused as the daemon refuses it: before seeking, which may replay many steps,
    // and after, as a blob's journal may add stages.
    let divides = |plan: &Plan| match plan.dp_size_problem(args.dp_size) {
        Some(why) => Err(anyhow!("--dp-size {why}: the daemon refuses this dp_size")),
        None => Ok(()),
    };
    divides(&loaded.plan)?;
    let start = start_at(
        &config,
        &loaded.plan,
        Some(args.step),
        args.resume_blob.as_deref(),
        args.no_checkpoints,
    )?;
    let (plan, mut planner) = (start.plan, start.planner);
    divides(&plan)?;
    warn_of_live_changes(&config, &plan, args.step + args.count.saturating_sub(1));
    let mut out = std::io::stdout().lock();
    for _ in 0..args.count {
        let domains = positions(&planner);
        let batch = planner.next_batch();
        refuse_poisoned(&loaded.shards)?;
        let mut e = explain(&plan, &batch, args.dp_rank, args.dp_size);
        e.domains = domains;
        if args.json {
            writeln!(out, "{}", serde_json::to_string(&e)?)?;
        } else {
            write!(out, "{}", render_explain(&e))?;
        }
    }
    Ok(())
}

/// Warns when the daemon on the config's socket serves this plan with live changes that
/// reach `last` and that `plan` (the config's, or a blob's journal adopted) lacks:
/// `plan` and `explain` then show, from the first such change on, rows the daemon did
/// not serve (a review's `explain` after a `set-stage` printed 4 rows of 8 tokens for a
/// step served as 8 rows of 2; with a blob saved before the change, the same). Nothing
/// is said when no daemon answers within 2 s, or one serves another plan.
fn warn_of_live_changes(config: &Config, plan: &Plan, last: u64) {
    use millrace::config::serve::ServeConfig;
    use serde::Deserialize;
    let Ok(serve) = ServeConfig::from_config(config) else {
        return;
    };
    if !serve.socket.exists() {
        return;
    }
    let request = millrace::control::status_request();
    let timeout = std::time::Duration::from_secs(2);
    let Ok(reply) = millrace::control::request(&serve.socket, &request, timeout) else {
        return;
    };
    let Some(status) = reply
        .get("status")
        .and_then(|s| millrace::wire::status::Status::deserialize(s).ok())
    else {
        return;
    };
    if status.fingerprint != format!("{:032x}", plan.fingerprint()) {
        return;
    }
    // Changes are told apart by their first plan step (a later one at the same step
    // supersedes). The journal's first entries are always listed (only a middle gap is
    // left out), so the first change missing here is among them.
    let known: Vec<u64> = plan.journal().iter().map(|c| c.at).collect();
    let missing = (status.journal.iter())
        .filter(|e| !known.contains(&e.plan_step))
        .map(|e| e.at_step)
        .min();
    let Some(first) = missing.filter(|&first| first <= last) else {
        return;
    };
    let whose = match known.is_empty() {
        true => "the config alone",
        false => "the config and the blob's journal",
    };
    eprintln!(
        "warning: the daemon on {} serves this config with {} live change(s), of which this \
         plan lacks the one at step {first}; this reads {whose}, so from step {first} on it \
         shows rows the daemon did not serve: pass --resume-blob with a cursor blob saved \
         after the last change (a trainer checkpoint's, or `millrace consume --save-cursor`)",
        serve.socket.display(),
        status.journal_changes
    );
}

/// Refuses `count` steps from `first` when they reach past [`MAX_STEP`], as the daemon
/// refuses such a seek: the planner replays every step before the last, so a mistyped
/// step (2^64 - 1) ran for ever instead of failing.
fn within_reach(flag: &str, first: u64, count: u64) -> Result<()> {
    let last = first.saturating_add(count.saturating_sub(1));
    if last > MAX_STEP {
        bail!(
            "{flag}: step {last} is beyond {MAX_STEP}, the most a run may reach (the plan \
             is replayed up to it)"
        );
    }
    Ok(())
}

/// Fails when planning found a corrupt document: the planner reads an index it was not
/// told is valid (start no longer validates in full), counts a bad document as empty and
/// poisons its shard, so a plan over it would show rows the daemon cannot serve.
fn refuse_poisoned(shards: &[Vec<std::sync::Arc<millrace::corpus::Shard>>]) -> Result<()> {
    for s in shards.iter().flatten() {
        if let Some(why) = s.poisoned() {
            bail!(
                "{} is corrupt: {why}; `millrace check-config` validates every shard",
                s.path().display()
            );
        }
    }
    Ok(())
}

/// Where `plan` or `explain` starts: the plan in force (a blob's journal adopted), a
/// planner at the first step, and what a resumed blob had seen.
struct Start {
    plan: Arc<Plan>,
    planner: Planner,
    resumed: Option<ResumedFrom>,
}

/// What an old run's blob brings to a new config (continual pretraining): its step, and
/// per domain of the new config whether the blob knew it and, if so, how far into its
/// current epoch the old run had gone.
#[derive(serde::Serialize)]
struct ResumedFrom {
    /// The blob's file.
    blob: String,
    /// The blob's trainer step: the new run's first.
    step: u64,
    /// Per domain of this config, its position at the blob and whether the blob knew it.
    domains: Vec<(DomainPosition, bool)>,
}

impl ResumedFrom {
    /// The report's "seen before this run" block.
    fn render(&self) -> String {
        let mut s = format!(
            "resumed from {} at step {}: per domain, its current epoch as seen before this run\n",
            self.blob, self.step
        );
        for (p, known) in &self.domains {
            if *known {
                s += &format!(
                    "    {:<12} epoch {} {:>7.3}% seen before step {}  rows {}\n",
                    p.name,
                    p.epoch,
                    100.0 * p.epoch_fraction,
                    self.step,
                    p.rows
                );
            } else {
                s += &format!("    {:<12} new: starts at epoch 0\n", p.name);
            }
        }
        s
    }
}

/// The planner at trainer step `step` (default 0, or the blob's step): resumed from the
/// cursor blob in `blob` and planned on to `step`, else as [`seek`] finds it.
fn start_at(
    config: &Config,
    plan: &Arc<Plan>,
    step: Option<u64>,
    blob: Option<&Path>,
    plain: bool,
) -> Result<Start> {
    let Some(path) = blob else {
        return Ok(Start {
            plan: plan.clone(),
            planner: seek(config, plan, step.unwrap_or(0), plain),
            resumed: None,
        });
    };
    let bytes = read_blob(path)?;
    let known: Vec<String> = cursor::decode(&bytes)
        .map(|c| c.domains.into_iter().map(|d| d.name).collect())
        .map_err(|e| anyhow!("{}: cursor blob refused: {e}", path.display()))?;
    // No daemon cursor field to fit: a preview takes any journal the blob carries.
    let resumed = plan
        .resume(&bytes, usize::MAX)
        .map_err(|e| anyhow!("{}: cursor blob refused: {e}", path.display()))?;
    let mut planner = resumed.planner;
    let at = planner.step();
    let to = step.unwrap_or(at);
    if to < at {
        bail!(
            "step {to} is before step {at}, where the blob {} resumes (it was saved at the end \
             of step {}): a resumed run starts there",
            path.display(),
            at.saturating_sub(1)
        );
    }
    let domains = positions(&planner)
        .into_iter()
        .map(|p| {
            // A layout 6 or older blob has no domain records: it knew every domain.
            let k = known.is_empty() || known.contains(&p.name);
            (p, k)
        })
        .collect();
    while planner.step() < to {
        planner.skip_batch();
    }
    Ok(Start {
        plan: resumed.plan,
        planner,
        resumed: Some(ResumedFrom {
            blob: path.display().to_string(),
            step: at,
            domains,
        }),
    })
}

/// A cursor blob from a file: hex (what `consume --save-cursor` writes, surrounding
/// whitespace allowed) or the raw bytes.
fn read_blob(path: &Path) -> Result<Vec<u8>> {
    let bytes = std::fs::read(path)
        .with_context(|| format!("reading the cursor blob {}", path.display()))?;
    let hex = std::str::from_utf8(&bytes)
        .ok()
        .and_then(|t| decode_hex(t.trim()))
        .filter(|b| !b.is_empty());
    Ok(hex.unwrap_or(bytes))
}

/// The planner at trainer step `step`: from the nearest plan checkpoint in the config's
/// cache (leaving new ones behind), or by the plain replay from step 0 with `plain` or
/// when there is no cache directory. The daemon's seeks take the same path.
fn seek(config: &Config, plan: &Arc<Plan>, step: u64, plain: bool) -> Planner {
    let store = (!plain)
        .then(|| CheckpointDir::for_config(config, plan))
        .flatten();
    let never = AtomicBool::new(false);
    store
        .and_then(|s| plan.seek_with(step, &s, &never))
        .unwrap_or_else(|| plan.seek(step))
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
