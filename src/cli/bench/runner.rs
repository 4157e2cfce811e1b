//! One streaming run of `millrace bench`: a daemon and its consumers on the bench's
//! corpus, from a start (step 0, a cursor, a step), timed into [`RunFigures`].

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use millrace::client::{ConsumeSummary, Latency};
use millrace::util::harness::{
    collect_summary, cpu_seconds, socket_path_in, spawn_rust_consumer, write_config, Daemon,
};

use super::machine::{
    core_round_trip_ns, io_read_bytes, now_ns, page_faults, smaps_bytes, status_bytes,
};
use super::report::{References, RunFigures};
use super::{BenchArgs, CHILD_TIMEOUT};

pub(super) fn bar(show: bool, len: u64, prefix: String) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr_with_hz(4));
    let style = ProgressStyle::with_template(
        "{prefix:>22} [{elapsed_precise}] [{bar:30}] {pos}/{len} steps {msg}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("=> ");
    pb.set_style(style);
    pb.set_prefix(prefix);
    pb
}

/// Where a streaming run starts.
#[derive(Debug, Clone)]
pub(super) enum Start {
    Zero,
    /// One hex cursor file per rank.
    Cursor(Vec<PathBuf>),
    Step(u64),
}

/// What a streaming run measured, before it becomes [`RunFigures`].
pub(super) struct Streamed {
    pub(super) summaries: Vec<ConsumeSummary>,
    pub(super) daemon_start_s: f64,
    pub(super) connect_to_first_batch_s: f64,
    pub(super) time_to_first_batch_s: f64,
    pub(super) daemon_cpu: f64,
    pub(super) read_bytes: u64,
    pub(super) vmhwm: u64,
    pub(super) rss_anon: u64,
    pub(super) rss_file: u64,
    pub(super) file_pmd: u64,
    pub(super) rss_shmem: u64,
    pub(super) faults: (u64, u64),
    /// [`core_round_trip_ns`] just before the daemon started and just after it stopped.
    pub(super) core_round_trip_ns: [Option<f64>; 2],
}

/// Everything a run needs that does not change between runs.
pub(super) struct Ctx<'a> {
    pub(super) args: &'a BenchArgs,
    pub(super) dir: &'a Path,
    pub(super) base_cfg: PathBuf,
    pub(super) exe: PathBuf,
    pub(super) show: bool,
    pub(super) refs: References,
    pub(super) source_bytes_per_token: f64,
}

impl Ctx<'_> {
    /// Writes the config for `threads` and returns (config, socket).
    pub(super) fn config(&self, threads: u32) -> Result<(PathBuf, PathBuf)> {
        let cfg = self.dir.join(format!("bench-t{threads}.toml"));
        let socket = socket_path_in(self.dir, &format!("bench-t{threads}.sock"));
        let global = i64::from(self.args.rows) * i64::from(self.args.consumers);
        write_config(
            &self.base_cfg,
            &cfg,
            &[
                (
                    "socket",
                    toml::Value::String(socket.to_string_lossy().to_string()),
                ),
                ("materialize_threads", toml::Value::Integer(threads.into())),
                ("ring_slots", toml::Value::Integer(4)),
                (
                    "token_dtype",
                    toml::Value::String(self.args.token_dtype.clone()),
                ),
            ],
            &[
                ("seq_len", toml::Value::Integer(self.args.seq_len.into())),
                ("global_batch_rows", toml::Value::Integer(global)),
            ],
        )?;
        if let Some(r) = &self.args.reader {
            write_config(&cfg, &cfg, &[("reader", r.as_str().into())], &[])?;
        }
        Ok((cfg, socket))
    }

    /// Starts a daemon and `consumers` consumers from `start`, streams `steps` steps.
    pub(super) fn stream(
        &self,
        threads: u32,
        steps: u64,
        start: &Start,
        save_cursors: Option<&[PathBuf]>,
        label: &str,
    ) -> Result<Streamed> {
        let args = self.args;
        let (cfg, socket) = self.config(threads)?;
        // Where the VM's vCPUs sit now (machine.rs): before and after, since it can move.
        let rtt_before = core_round_trip_ns();
        let t_spawn = now_ns();
        let mut daemon = Daemon::start_polling(
            &self.exe,
            &cfg,
            &socket,
            &self.dir.join(format!("serve-t{threads}.log")),
            Duration::from_millis(1),
        )?;
        let t_accept = now_ns();
        let pid = daemon.pid();
        let cpu0 = cpu_seconds(pid).context("reading the daemon's /proc/PID/stat")?;
        let pb = bar(
            self.show && steps > 50,
            steps * u64::from(args.consumers),
            label.to_string(),
        );
        let mut workers = Vec::new();
        let mut progress = Vec::new();
        let t_consumers = now_ns();
        for r in 0..args.consumers {
            let mut extra: Vec<String> = ["--touch", "--progress", "--job", "bench"]
                .iter()
                .map(|s| s.to_string())
                .collect();
            match start {
                Start::Zero => {}
                Start::Step(s) => extra.extend(["--start-step".to_string(), s.to_string()]),
                Start::Cursor(files) => {
                    let f = files
                        .get(r as usize)
                        .context("no cursor file for this rank")?;
                    extra.extend(["--cursor-file".to_string(), f.display().to_string()]);
                }
            }
            if let Some(files) = save_cursors {
                if let Some(f) = files.get(r as usize) {
                    extra.extend(["--save-cursor".to_string(), f.display().to_string()]);
                }
            }
            let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
            let mut g = spawn_rust_consumer(&socket, r, args.consumers, args.rows, steps, &extra)?;
            let p = Arc::new(AtomicU64::new(0));
            progress.push(p.clone());
            workers.push(std::thread::spawn(move || {
                collect_summary(&mut g, CHILD_TIMEOUT, Some(p))
            }));
        }
        while workers.iter().any(|w| !w.is_finished()) {
            pb.set_position(progress.iter().map(|p| p.load(Ordering::Relaxed)).sum());
            std::thread::sleep(Duration::from_millis(50));
        }
        let mut summaries: Vec<ConsumeSummary> = Vec::new();
        for w in workers {
            match w.join() {
                Ok(Ok(s)) => summaries.push(s),
                Ok(Err(e)) => {
                    pb.abandon();
                    bail!(
                        "{e:#}\nthe daemon's log ({}) ends with:\n{}",
                        daemon.log.display(),
                        daemon.log_tail()
                    );
                }
                Err(_) => bail!("a consumer thread panicked"),
            }
        }
        let cpu1 = cpu_seconds(pid).context("reading the daemon's /proc/PID/stat")?;
        let st = |f: &str| status_bytes(pid, f).unwrap_or(0);
        let (vmhwm, rss_anon, rss_file, rss_shmem) =
            (st("VmHWM"), st("RssAnon"), st("RssFile"), st("RssShmem"));
        let file_pmd = smaps_bytes(pid, "FilePmdMapped").unwrap_or(0);
        let read_bytes = io_read_bytes(pid).unwrap_or(0);
        let faults = page_faults(pid).unwrap_or((0, 0));
        pb.finish_and_clear();
        daemon.stop();
        let rtt_after = core_round_trip_ns();
        let first = summaries
            .iter()
            .map(|s| s.first_batch_ns)
            .max()
            .unwrap_or(0);
        let s = |a: u64, b: u64| a.saturating_sub(b) as f64 / 1e9;
        Ok(Streamed {
            daemon_start_s: s(t_accept, t_spawn),
            connect_to_first_batch_s: s(first, t_consumers),
            time_to_first_batch_s: s(first, t_spawn),
            summaries,
            daemon_cpu: cpu1 - cpu0,
            read_bytes,
            vmhwm,
            rss_anon,
            rss_file,
            file_pmd,
            rss_shmem,
            faults,
            core_round_trip_ns: [rtt_before, rtt_after],
        })
    }

    /// A streaming run's figures.
    pub(super) fn figures(&self, cache: &str, threads: u32, steps: u64, x: Streamed) -> RunFigures {
        let summaries = &x.summaries;
        let memcpy = self.refs.memcpy_gb_per_s;
        let tokens: u64 = summaries.iter().map(|s| s.tokens).sum();
        let payload: u64 = summaries.iter().map(|s| s.payload_bytes).sum();
        let secs = millrace::client::span_seconds(summaries);
        // Each consumer's first batch arrives at the start of the span: not counted.
        let first_share = 1.0 / steps.max(1) as f64;
        let tokens_after = tokens as f64 * (1.0 - first_share);
        let payload_after = payload as f64 * (1.0 - first_share);
        let rate = |v: f64| if secs > 0.0 { v / secs } else { 0.0 };
        let mut lat: Vec<u64> = summaries
            .iter()
            .flat_map(|s| s.wake_latency_ns.iter().copied())
            .collect();
        let gbps = rate(payload_after) / 1e9;
        let tok_rate = rate(tokens_after);
        let source = tok_rate * self.source_bytes_per_token / 1e9;
        let read_ref = if cache == "cold" {
            self.refs.disk_cold_read_gb_per_s
        } else {
            self.refs.mmap_read_gb_per_s
        };
        let per_1e9 = |v: f64| v / (tokens as f64 / 1e9).max(1e-12);
        let payload_per_token = payload as f64 / (tokens as f64).max(1.0);
        let memcpy_s_per_1e9 = payload_per_token / memcpy.max(1e-12);
        let cpu_1e9 = per_1e9(x.daemon_cpu);
        RunFigures {
            cache: cache.to_string(),
            materialize_threads: threads,
            steps,
            consumers: self.args.consumers,
            tokens,
            payload_bytes: payload,
            daemon_start_s: x.daemon_start_s,
            connect_to_first_batch_s: x.connect_to_first_batch_s,
            time_to_first_batch_s: x.time_to_first_batch_s,
            seconds: secs,
            tokens_per_s: tok_rate,
            payload_gb_per_s: gbps,
            ratio_to_memcpy: gbps / memcpy.max(1e-12),
            source_gb_per_s: source,
            source_ratio_to_read: source / read_ref.max(1e-12),
            daemon_read_bytes: x.read_bytes,
            wake_latency: Latency::from_ns(&mut lat),
            daemon_cpu_seconds: x.daemon_cpu,
            daemon_cpu_s_per_1e9_tokens: cpu_1e9,
            daemon_cpu_ratio_to_memcpy: cpu_1e9 / memcpy_s_per_1e9.max(1e-12),
            daemon_cpu_s_per_gb: x.daemon_cpu / (payload as f64 / 1e9).max(1e-12),
            consumer_cpu_s_per_1e9_tokens: per_1e9(
                summaries.iter().map(|s| s.cpu_seconds).sum::<f64>(),
            ),
            daemon_vmhwm_bytes: x.vmhwm,
            daemon_rss_anon_bytes: x.rss_anon,
            daemon_rss_file_bytes: x.rss_file,
            daemon_file_pmd_bytes: x.file_pmd,
            daemon_rss_shmem_bytes: x.rss_shmem,
            daemon_minor_faults: x.faults.0,
            daemon_major_faults: x.faults.1,
            digests: summaries.iter().map(|s| s.digest.clone()).collect(),
            repeats_tokens_per_s: Vec::new(),
            core_round_trip_ns: x.core_round_trip_ns,
        }
    }
}
