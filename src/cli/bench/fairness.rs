//! The fairness run of `millrace bench`: free-running consumers of one job, and how far
//! apart the steps their rings published end up (issue 14 item 9).

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Deserialize;

use millrace::util::harness::{socket_path_in, write_config, Daemon};
use millrace::wire::status::Status;

use super::report::FairnessFigures;
use super::BenchArgs;

/// Published step of each ring of `job`, by dp rank, from the daemon's STATUS.
pub(super) fn published_steps(socket: &Path, job: &str, ranks: u32) -> Result<Vec<u64>> {
    let r = millrace::control::request(
        socket,
        &millrace::control::status_request(),
        Duration::from_secs(30),
    )?;
    let status = Status::deserialize(&r["status"])
        .with_context(|| format!("{}: the daemon's STATUS does not read", socket.display()))?;
    let mut out = vec![None; ranks as usize];
    for ring in status
        .jobs
        .iter()
        .filter(|j| j.job == job)
        .flat_map(|j| &j.rings)
    {
        if let Some(slot) = out.get_mut(ring.dp_rank as usize) {
            *slot = Some(ring.published_step);
        }
    }
    out.into_iter()
        .enumerate()
        .map(|(r, s)| s.with_context(|| format!("STATUS lists no ring for {job} rank {r}")))
        .collect()
}

/// The fairness run: a daemon, `ranks` in-process consumers of one job that take each
/// batch as soon as it is published, and the steps each ring published over `seconds`
/// once all are connected.
pub(super) fn fairness(
    args: &BenchArgs,
    dir: &Path,
    base_cfg: &Path,
    exe: &Path,
    threads: u32,
) -> Result<FairnessFigures> {
    use millrace::client::{Client, Hello};
    use std::sync::atomic::AtomicBool;
    const JOB: &str = "fairness";
    const SLOTS: u32 = 4;
    let ranks = args.fairness_ranks;
    if ranks == 0 || !(args.fairness_seconds > 0.0 && args.fairness_seconds.is_finite()) {
        bail!("--fairness-ranks and --fairness-seconds must be positive");
    }
    let cfg = dir.join("bench-fairness.toml");
    let socket = socket_path_in(dir, "bench-fairness.sock");
    write_config(
        base_cfg,
        &cfg,
        &[
            (
                "socket",
                toml::Value::String(socket.to_string_lossy().to_string()),
            ),
            ("materialize_threads", toml::Value::Integer(threads.into())),
            ("ring_slots", toml::Value::Integer(SLOTS.into())),
            ("token_dtype", toml::Value::String(args.token_dtype.clone())),
        ],
        &[
            ("seq_len", toml::Value::Integer(args.seq_len.into())),
            (
                "global_batch_rows",
                toml::Value::Integer(i64::from(args.rows) * i64::from(ranks)),
            ),
        ],
    )?;
    let mut daemon = Daemon::start_polling(
        exe,
        &cfg,
        &socket,
        &dir.join("serve-fairness.log"),
        Duration::from_millis(10),
    )?;
    let stop = Arc::new(AtomicBool::new(false));
    let start = Arc::new(std::sync::Barrier::new(ranks as usize + 1));
    let mut consumers = Vec::new();
    for r in 0..ranks {
        let mut hello = Hello::whole_slice(r, ranks);
        hello.job = JOB.into();
        let mut c = Client::connect(&socket, &hello)
            .with_context(|| format!("fairness consumer {r} connecting"))?;
        c.set_timeout(Some(Duration::from_secs(120)));
        let (stop, start) = (stop.clone(), start.clone());
        consumers.push(std::thread::spawn(move || -> Result<()> {
            start.wait();
            while !stop.load(Ordering::Relaxed) {
                c.next_batch()
                    .with_context(|| format!("fairness consumer {r}"))?;
            }
            Ok(())
        }));
    }
    start.wait();
    let before = published_steps(&socket, JOB, ranks);
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs_f64(args.fairness_seconds));
    let after = published_steps(&socket, JOB, ranks);
    let seconds = t0.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for c in consumers {
        match c.join() {
            Ok(r) => r?,
            Err(_) => bail!("a fairness consumer thread panicked"),
        }
    }
    daemon.stop();
    let steps: Vec<u64> = after?
        .iter()
        .zip(before?)
        .map(|(a, b)| a.saturating_sub(b))
        .collect();
    let min_steps = steps.iter().copied().min().unwrap_or(0);
    let max_steps = steps.iter().copied().max().unwrap_or(0);
    Ok(FairnessFigures {
        ranks,
        seconds,
        materialize_threads: threads,
        ring_slots: SLOTS,
        ratio: max_steps as f64 / min_steps as f64,
        steps,
        min_steps,
        max_steps,
    })
}
