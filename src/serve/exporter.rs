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

/// Connections to `metrics_addr` served at once; one more is closed as it is accepted.
/// A scraper needs one. The crate's listener had no cap: 2 x 10,500 idle connections
/// from one host held every fd of a daemon, and new trainers then hung.
const HTTP_CONNECTIONS: usize = 16;
/// How long a connection has to send its request and take the reply. A scraper sends
/// ~100 bytes at once; the crate's listener kept an idle connection for ever.
const HTTP_DEADLINE: Duration = Duration::from_secs(10);
/// The longest request head read (a GET is 100-300 bytes); past it the request is
/// answered 431 and closed.
const HTTP_HEAD_MAX: usize = 8192;

/// Binds `addr` and creates the series that exist from the start; returns the listener,
/// which [`serve_http`] serves, and the recorder's handle, which renders /metrics and
/// which [`Exporter::expire`] keeps up. Must run inside the daemon's tokio runtime.
pub(super) fn install(
    addr: &str,
) -> Result<(
    tokio::net::TcpListener,
    metrics_exporter_prometheus::PrometheusHandle,
)> {
    let addr: std::net::SocketAddr = addr
        .parse()
        .with_context(|| format!("[serve] metrics_addr {addr:?}"))?;
    use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
    use metrics_util::MetricKindMask;
    let listener = std::net::TcpListener::bind(addr)
        .and_then(|l| l.set_nonblocking(true).map(|()| l))
        .and_then(tokio::net::TcpListener::from_std)
        .with_context(|| format!("starting the metrics exporter on {addr}"))?;
    // Buckets make the latency a real histogram (quantiles across nodes in PromQL).
    let buckets = [
        1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0, 2.5,
    ];
    let recorder = PrometheusBuilder::new()
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
        .build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder)
        .with_context(|| format!("starting the metrics exporter on {addr}"))?;
    // Every series exists from the start, so rate() and alerts see zeros, not gaps.
    for source in RELOAD_SOURCES {
        counter!("millrace_reloads_total", "source" => source).absolute(0);
        counter!("millrace_reload_failures_total", "source" => source).absolute(0);
    }
    Ok((listener, handle))
}

/// Serves GET /metrics on `listener` for as long as the daemon runs: one request per
/// connection (`Connection: close`), at most [`HTTP_CONNECTIONS`] at once, each within
/// [`HTTP_DEADLINE`]; failed accepts pause as the trainer socket's do
/// ([`super::limits::AcceptPause`]), their warnings
/// throttled. Its own small server rather than the crate's HTTP listener, which spun on
/// EMFILE and held idle connections for ever (docs/DESIGN.md, "The metrics endpoint").
pub(super) async fn serve_http(
    listener: tokio::net::TcpListener,
    handle: metrics_exporter_prometheus::PrometheusHandle,
) -> std::convert::Infallible {
    use super::limits::{suppressed_note, Throttle};
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(HTTP_CONNECTIONS));
    let failed = Throttle::new("failed metrics accepts", 5, Duration::from_secs(10));
    let full = Throttle::new(
        "metrics connections over the cap",
        5,
        Duration::from_secs(10),
    );
    let mut flush = tokio::time::interval(Duration::from_secs(10));
    flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut pause = super::limits::AcceptPause::default();
    loop {
        tokio::select! {
            accepted = listener.accept(), if pause.accepting() => match accepted {
                Ok((stream, peer)) => {
                    pause.accepted();
                    let Ok(slot) = slots.clone().try_acquire_owned() else {
                        if let Some(k) = full.allow() {
                            tracing::warn!(%peer, "{HTTP_CONNECTIONS} metrics connections are \
                                open; closing this one{}", suppressed_note(k));
                        }
                        continue;
                    };
                    let handle = handle.clone();
                    tokio::spawn(async move {
                        let _ = tokio::time::timeout(HTTP_DEADLINE, answer(stream, &handle)).await;
                        drop(slot);
                    });
                }
                Err(e) => {
                    let paused = pause.failed();
                    if let Some(k) = failed.allow() {
                        tracing::warn!(
                            "metrics accept failed: {e}; pausing its accepts for {} ms{}",
                            paused.as_millis(),
                            suppressed_note(k)
                        );
                    }
                }
            },
            _ = pause.over() => pause.resume(),
            _ = flush.tick() => {
                failed.flush();
                full.flush();
            }
        }
    }
}

/// Reads one request head from `stream` and answers it: the metrics for GET (or HEAD)
/// of `/metrics` or `/`, else 404 or 405, 431 for a head past [`HTTP_HEAD_MAX`].
async fn answer(
    mut stream: tokio::net::TcpStream,
    handle: &metrics_exporter_prometheus::PrometheusHandle,
) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    let complete = loop {
        if head.windows(4).any(|w| w == b"\r\n\r\n") || head.windows(2).any(|w| w == b"\n\n") {
            break true;
        }
        if head.len() > HTTP_HEAD_MAX {
            break false;
        }
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    };
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut words = line.split_whitespace();
    let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let (status, body) = match (complete, method, path) {
        (false, ..) => ("431 Request Header Fields Too Large", String::new()),
        (_, "GET" | "HEAD", "/metrics" | "/") => ("200 OK", handle.render()),
        (_, "GET" | "HEAD", _) => ("404 Not Found", "try /metrics\n".to_string()),
        _ => ("405 Method Not Allowed", String::new()),
    };
    let reply = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(reply.as_bytes()).await?;
    if method != "HEAD" {
        stream.write_all(body.as_bytes()).await?;
    }
    stream.shutdown().await
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
    /// It also runs the recorder's upkeep (histogram buckets drained), which the crate's
    /// listener ran every 5 s.
    fn expire(&self) {
        if let Some(h) = &self.handle {
            h.run_upkeep();
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
