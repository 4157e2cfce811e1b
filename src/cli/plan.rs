//! `millrace plan` (N steps of a config's plan, summarized per window) and `millrace
//! explain` (the documents behind every row of one step).

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::{bail, Result};

use millrace::config::Config;
use millrace::plan::{Plan, Planner};
use millrace::plan_cache::CheckpointDir;

#[derive(clap::Args)]
pub struct PlanArgs {
    /// The run's config.
    #[arg(long)]
    config: PathBuf,
    /// Steps to plan.
    #[arg(long, default_value_t = 1000)]
    steps: u64,
    /// First step (reached by recomputation, from the nearest stored plan checkpoint).
    #[arg(long, default_value_t = 0)]
    from: u64,
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
    /// Trainer step (reached from the nearest stored plan checkpoint).
    #[arg(long)]
    step: u64,
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
    /// Explain this many consecutive steps (with --json: one JSON object per line).
    #[arg(long, default_value_t = 1)]
    count: u64,
    /// Print JSON (stable, for comparing runs).
    #[arg(long)]
    json: bool,
}

pub fn run_plan(args: PlanArgs) -> Result<()> {
    use millrace::plan::report::{render_windows, Tally};
    let t0 = std::time::Instant::now();
    let config = Config::load(&args.config)?;
    let loaded = config.load_plan()?;
    let plan = loaded.plan.clone();
    for w in plan.config().unweighted_warnings(&plan.domain_names()) {
        eprintln!("warning: {}: {w}", args.config.display());
    }
    let load_ms = t0.elapsed().as_secs_f64() * 1e3;
    let t1 = std::time::Instant::now();
    let mut planner = seek(&config, &plan, args.from, args.no_checkpoints);
    let seek_ms = t1.elapsed().as_secs_f64() * 1e3;
    let window = args.window.unwrap_or((args.steps / 10).max(1)).max(1);
    let mut tally = Tally::new(&plan);
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
            "opened and identified the corpus and built the plan in {load_ms:.1} ms; \
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

pub fn run_explain(args: ExplainArgs) -> Result<()> {
    use millrace::plan::report::{explain, render_explain};
    if args.dp_size == 0 || args.dp_rank >= args.dp_size {
        bail!(
            "--dp-rank {} is not below --dp-size {}",
            args.dp_rank,
            args.dp_size
        );
    }
    let config = Config::load(&args.config)?;
    let loaded = config.load_plan()?;
    let plan = loaded.plan.clone();
    let mut planner = seek(&config, &plan, args.step, args.no_checkpoints);
    let mut out = std::io::stdout().lock();
    for _ in 0..args.count {
        let batch = planner.next_batch();
        refuse_poisoned(&loaded.shards)?;
        let e = explain(&plan, &batch, args.dp_rank, args.dp_size);
        if args.json {
            writeln!(out, "{}", serde_json::to_string(&e)?)?;
        } else {
            write!(out, "{}", render_explain(&e))?;
        }
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
