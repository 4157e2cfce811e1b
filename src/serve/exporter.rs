//! The Prometheus exporter (`[serve] metrics_addr`; docs/OPERATIONS.md lists the
//! metrics): every second the daemon's STATUS is published as gauges and counters.
//!
//! A ring's (and a job's planner's) figures start from zero when it is created again: a
//! trainer that restarts, a job that returns under its name. The exporter's counters
//! only move forward (`Counter::absolute` keeps the largest value it was given), so they
//! are advanced by what each series delivered since the last export instead. Rings and
//! jobs are told apart by their serials, not by figures going back (a new ring already
//! past the old one's figures looked like its growth), and those gone since the last
//! export count their last figures (`Status::departed_rings`): without them the old
//! ring's last steps, and every step of a ring made and gone between two exports, were
//! lost.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use anyhow::{Context, Result};
use metrics::{counter, gauge};

use super::reload::RELOAD_SOURCES;
use crate::wire::status::{JobPlanCounts, RingStatus, Status};

/// A counter or gauge not set for this long is dropped from /metrics: every live series
/// is set each second, so only the series of departed jobs (and rings) age out.
const METRICS_IDLE: Duration = Duration::from_secs(5);

/// The per-ring counters, in the order [`Exporter::export`] keeps their figures.
const RING_COUNTERS: [&str; 6] = [
    "millrace_tokens_delivered_total",
    "millrace_batches_delivered_total",
    "millrace_release_frames_total",
    "millrace_page_releases_total",
    "millrace_wakes_total",
    "millrace_wakes_deferred_total",
];

/// The per-job counters, likewise.
const JOB_COUNTERS: [&str; 4] = [
    "millrace_job_batches_planned_total",
    "millrace_private_batches_planned_total",
    "millrace_job_batches_planned_ahead_total",
    "millrace_job_plan_waits_total",
];

/// Exports between two renders that drop the series idle past [`METRICS_IDLE`]
/// ([`Exporter::expire`]): one every 10 s.
const EXPIRE_EVERY: u64 = 10;

/// Starts the HTTP listener on `addr` and creates the series that exist from the start;
/// returns the recorder's handle, which [`Exporter::expire`] renders. Must run inside the
/// daemon's tokio runtime, which serves the listener.
pub(super) fn install(addr: &str) -> Result<metrics_exporter_prometheus::PrometheusHandle> {
    let addr: std::net::SocketAddr = addr
        .parse()
        .with_context(|| format!("[serve] metrics_addr {addr:?}"))?;
    use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
    use metrics_util::MetricKindMask;
    // Buckets make the latency a real histogram (quantiles across nodes in PromQL).
    let buckets = [
        1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0, 2.5,
    ];
    let (recorder, listener) = PrometheusBuilder::new()
        .with_http_listener(addr)
        // Every live counter and gauge is set each second (Exporter::export), so one left
        // alone this long belongs to a job that left: dropping it keeps the exporter from
        // growing with every job ever seen (2,000 short jobs left 2,064 series). The
        // latency histogram is process-wide and stays.
        .idle_timeout(
            MetricKindMask::COUNTER | MetricKindMask::GAUGE,
            Some(METRICS_IDLE),
        )
        .set_buckets_for_metric(
            Matcher::Full("millrace_materialize_seconds".into()),
            &buckets,
        )
        .with_context(|| "[serve] metrics_addr: histogram buckets")?
        // What `install` does, keeping the recorder's handle.
        .build()
        .with_context(|| format!("starting the metrics exporter on {addr}"))?;
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder)
        .with_context(|| format!("starting the metrics exporter on {addr}"))?;
    tokio::spawn(async move {
        if let Err(e) = listener.await {
            tracing::error!("the metrics exporter on {addr} stopped: {e:?}");
        }
    });
    // Every series exists from the start, so rate() and alerts see zeros, not gaps.
    for source in RELOAD_SOURCES {
        counter!("millrace_reloads_total", "source" => source).absolute(0);
        counter!("millrace_reload_failures_total", "source" => source).absolute(0);
    }
    Ok(handle)
}

/// A ring's (job, dp rank).
type RingKey = (String, u32);

/// What each ring's and job's counters said at the last export, with the ring's (job's)
/// serial, to advance the exported counters by the difference. Only the series of the
/// last export are kept, so it holds no more than the daemon's rings and jobs.
#[derive(Default)]
pub(super) struct Exporter {
    rings: HashMap<RingKey, (u64, [u64; RING_COUNTERS.len()])>,
    jobs: HashMap<String, (u64, [u64; JOB_COUNTERS.len()])>,
    /// The recorder's handle, once it is installed ([`Exporter::expire`]).
    pub(super) handle: Option<metrics_exporter_prometheus::PrometheusHandle>,
    /// Exports so far.
    exports: u64,
}

/// How far each counter of one series moved from `before` (its last export: the serial of
/// the ring or job it was, and its figures) to `now` of ring (job) `serial`. Another
/// serial is a ring made again under the same labels: all of its figures are new.
fn advance<const N: usize>(
    before: Option<&(u64, [u64; N])>,
    serial: u64,
    now: &[u64; N],
) -> [u64; N] {
    match before {
        Some((s, b)) if *s == serial => std::array::from_fn(|i| now[i].saturating_sub(b[i])),
        _ => *now,
    }
}

/// One ring's counters in [`RING_COUNTERS`] order.
fn ring_figures(r: &RingStatus) -> [u64; RING_COUNTERS.len()] {
    [
        r.tokens_delivered,
        r.batches_delivered,
        r.release_frames,
        r.page_releases,
        r.wakes,
        r.wakes_deferred,
    ]
}

/// One job's counters in [`JOB_COUNTERS`] order.
fn job_figures(p: &JobPlanCounts) -> [u64; JOB_COUNTERS.len()] {
    [p.planned, p.private, p.ahead, p.waits]
}

/// What one export adds to each ring's and job's counters.
#[derive(Debug, Default, PartialEq)]
struct Increments {
    rings: Vec<(RingKey, [u64; RING_COUNTERS.len()])>,
    jobs: Vec<(String, [u64; JOB_COUNTERS.len()])>,
}

impl Exporter {
    /// How far every counter moved since the last export, and what to compare the next
    /// one with. Rings and jobs that went since then count their last figures first
    /// (`departed_rings`, `departed_jobs`); a live one under labels another had counts
    /// all of its figures.
    fn increments(&mut self, status: &Status) -> Increments {
        let mut out = Increments::default();
        for (job, r) in &status.departed_rings {
            let key = (job.clone(), r.dp_rank);
            let by = advance(self.rings.get(&key), r.serial, &ring_figures(r));
            if self.rings.get(&key).is_some_and(|(s, _)| *s == r.serial) {
                self.rings.remove(&key);
            }
            out.rings.push((key, by));
        }
        for (job, p) in &status.departed_jobs {
            let by = advance(self.jobs.get(job), p.serial, &job_figures(p));
            if self.jobs.get(job).is_some_and(|(s, _)| *s == p.serial) {
                self.jobs.remove(job);
            }
            out.jobs.push((job.clone(), by));
        }
        let mut rings = HashMap::new();
        let mut jobs = HashMap::new();
        for j in &status.jobs {
            let now = job_figures(&j.planner);
            let by = advance(self.jobs.get(&j.job), j.planner.serial, &now);
            out.jobs.push((j.job.clone(), by));
            jobs.insert(j.job.clone(), (j.planner.serial, now));
            for r in &j.rings {
                let key = (j.job.clone(), r.dp_rank);
                let now = ring_figures(r);
                let by = advance(self.rings.get(&key), r.serial, &now);
                out.rings.push((key.clone(), by));
                rings.insert(key, (r.serial, now));
            }
        }
        self.rings = rings;
        self.jobs = jobs;
        out
    }

    /// Publishes `status` (derived from the same snapshot as `millrace status`, so the
    /// two never disagree). Every series that should stay is set on every call: one that
    /// is not ages out ([`METRICS_IDLE`]).
    pub(super) fn export(&mut self, status: &Status) {
        self.exports += 1;
        if self.exports % EXPIRE_EVERY == 0 {
            self.expire();
        }
        gauge!("millrace_poisoned_shards").set(status.poisoned_shards_total as f64);
        gauge!("millrace_stuck_fills").set(status.stuck_fills.len() as f64);
        if status.hub_busy {
            // Taken without the hub's lock (work under it is stuck): the rest is not
            // there, and the counters keep their last figures until it is.
            return;
        }
        gauge!("millrace_clients").set(status.clients as f64);
        for (m, name) in [
            (&status.reloads_by_source, "millrace_reloads_total"),
            (
                &status.failed_reloads_by_source,
                "millrace_reload_failures_total",
            ),
        ] {
            let mut sources: BTreeSet<&str> = RELOAD_SOURCES.into_iter().collect();
            sources.extend(m.keys().map(String::as_str));
            for source in sources {
                let n = m.get(source).copied().unwrap_or(0);
                counter!(name, "source" => source.to_string()).absolute(n);
            }
        }
        for (code, n) in &status.refused_by_code {
            counter!("millrace_refused_connections_total", "code" => code.clone()).absolute(*n);
        }
        gauge!("millrace_control_connections").set(status.control_connections.open as f64);
        if let Some(n) = status.fd_limit.open {
            gauge!("millrace_open_fds").set(n as f64);
        }
        gauge!("millrace_padding_fraction").set(status.padding_fraction);
        gauge!("millrace_truncation_fraction").set(status.truncation_fraction);
        for d in &status.domains {
            let name = d.name.clone();
            gauge!("millrace_domain_target_share", "domain" => name.clone()).set(d.target_share);
            gauge!("millrace_domain_realized_share", "domain" => name.clone())
                .set(d.realized_share);
            gauge!("millrace_domain_epochs", "domain" => name).set(d.epochs);
        }
        let by = self.increments(status);
        for (job, n) in by.jobs {
            let label = [("job", job)];
            for (name, n) in JOB_COUNTERS.into_iter().zip(n) {
                counter!(name, &label).increment(n);
            }
        }
        for ((job, rank), n) in by.rings {
            let labels = [("job", job), ("dp_rank", rank.to_string())];
            for (name, n) in RING_COUNTERS.into_iter().zip(n) {
                counter!(name, &labels).increment(n);
            }
        }
        for j in &status.jobs {
            let label = [("job", j.job.clone())];
            gauge!("millrace_job_batches_held", &label).set(j.planner.held as f64);
            for r in &j.rings {
                let labels = [("job", j.job.clone()), ("dp_rank", r.dp_rank.to_string())];
                gauge!("millrace_step", &labels).set(r.published_step as f64);
                gauge!("millrace_ring_occupancy", &labels).set(r.occupancy as f64);
                gauge!("millrace_ring_slots", &labels).set(r.slots as f64);
                gauge!("millrace_consumer_wait_seconds_total", &labels).set(r.consumer_wait_s);
                gauge!("millrace_producer_wait_seconds_total", &labels).set(r.producer_wait_s);
            }
        }
    }
}

impl Exporter {
    /// Drops the series set last more than [`METRICS_IDLE`] ago: the exporter drops them
    /// only while it renders /metrics, so a daemon nobody scraped (no Prometheus yet, or
    /// one that is down) kept every departed job's series: its anonymous memory grew
    /// from a mean of 105 MB in the first 5 minutes to 188 MB in the last 5 of a
    /// 15-minute churn of 8,244 short jobs (docs/BENCHMARKS.md, "Series of departed
    /// jobs"). A render a series outlives marks it; one more after it has idled that
    /// long drops it.
    fn expire(&self) {
        if let Some(h) = &self.handle {
            drop(h.render());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::status::JobStatus;

    fn ring(serial: u64, batches: u64) -> RingStatus {
        RingStatus {
            serial,
            batches_delivered: batches,
            tokens_delivered: batches * 10,
            ..RingStatus::default()
        }
    }

    fn status(live: Option<RingStatus>, gone: Vec<RingStatus>) -> Status {
        Status {
            jobs: live
                .into_iter()
                .map(|r| JobStatus {
                    job: "j".into(),
                    rings: vec![r],
                    ..JobStatus::default()
                })
                .collect(),
            departed_rings: gone.into_iter().map(|r| ("j".to_string(), r)).collect(),
            ..Status::default()
        }
    }

    /// A daemon nobody scrapes drops the series of a departed job: every
    /// [`EXPIRE_EVERY`] exports it renders, which marks the series it outlives and
    /// drops those idle past the timeout. Without those renders the first scrape still
    /// lists job "gone" (the exporter had never looked at it), and every job a daemon
    /// ever served stayed in its memory.
    #[test]
    fn series_of_departed_jobs_are_dropped_without_a_scrape() {
        use metrics_exporter_prometheus::PrometheusBuilder;
        use metrics_util::MetricKindMask;
        let idle = Duration::from_millis(20);
        let of = |job: &str| Status {
            jobs: vec![JobStatus {
                job: job.into(),
                rings: vec![ring(1, 3)],
                ..JobStatus::default()
            }],
            ..Status::default()
        };
        // `with_expiry`: whether the exporter holds the handle, as the daemon's does.
        let scrape_after = |with_expiry: bool| {
            let recorder = PrometheusBuilder::new()
                .idle_timeout(MetricKindMask::COUNTER | MetricKindMask::GAUGE, Some(idle))
                .build_recorder();
            let mut e = Exporter::default();
            if with_expiry {
                e.handle = Some(recorder.handle());
            }
            metrics::with_local_recorder(&recorder, || {
                // The job comes and goes within the first ten exports; the daemon goes
                // on with another for ten more, each past the idle timeout.
                for k in 0..2 * EXPIRE_EVERY {
                    e.export(&of(if k < 3 { "gone" } else { "stays" }));
                    std::thread::sleep(idle + Duration::from_millis(5));
                }
            });
            recorder.handle().render()
        };
        let kept = scrape_after(false);
        assert!(kept.contains("job=\"gone\""), "{kept}");
        let dropped = scrape_after(true);
        assert!(!dropped.contains("job=\"gone\""), "{dropped}");
        assert!(dropped.contains("job=\"stays\""), "{dropped}");
    }

    /// The batches each export adds to ring ("j", 0).
    fn batches(e: &mut Exporter, s: &Status) -> u64 {
        let by = e.increments(s);
        by.rings.iter().map(|(_, n)| n[1]).sum()
    }

    #[test]
    fn a_series_advances_by_its_figures_since_the_last_export() {
        assert_eq!(advance(None, 1, &[5, 0, 7]), [5, 0, 7]);
        assert_eq!(advance(Some(&(1, [5, 0, 7])), 1, &[9, 0, 7]), [4, 0, 0]);
        // Another ring under the same labels counts from its start, whether its figures
        // are below the old ring's or already past them.
        assert_eq!(
            advance(Some(&(1, [900, 30, 7])), 2, &[40, 2, 9]),
            [40, 2, 9]
        );
        assert_eq!(
            advance(Some(&(1, [9, 3, 7])), 2, &[950, 32, 9]),
            [950, 32, 9]
        );
    }

    /// A ring remade between two exports: the old one's steps since the last export and
    /// all of the new one's are counted, as is a ring made and gone between two.
    #[test]
    fn rings_remade_between_exports_count_exactly() {
        let mut e = Exporter::default();
        assert_eq!(batches(&mut e, &status(Some(ring(1, 12)), vec![])), 12);
        // Ring 1 went at 20; ring 2 is at 40 already.
        assert_eq!(
            batches(&mut e, &status(Some(ring(2, 40)), vec![ring(1, 20)])),
            8 + 40
        );
        // Ring 2 went at 45, ring 3 came and went at 7, ring 4 is at 1.
        let s = status(Some(ring(4, 1)), vec![ring(2, 45), ring(3, 7)]);
        assert_eq!(batches(&mut e, &s), 5 + 7 + 1);
        assert_eq!(batches(&mut e, &status(Some(ring(4, 3)), vec![])), 2);
        assert_eq!(batches(&mut e, &status(None, vec![ring(4, 3)])), 0);
        assert!(e.rings.is_empty());
    }
}
