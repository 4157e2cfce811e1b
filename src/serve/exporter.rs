//! The Prometheus exporter (`[serve] metrics_addr`; docs/OPERATIONS.md lists the
//! metrics): every second the daemon's STATUS is published as gauges and counters.
//!
//! A ring's (and a job's planner's) figures start from zero when it is created again: a
//! trainer that restarts, a job that returns under its name. The exporter's counters
//! only move forward (`Counter::absolute` keeps the largest value it was given), so they
//! are advanced by what each series delivered since the last export instead, counting a
//! new ring's figures from its start. Set from the raw figures, a rank whose trainer came
//! back within the series' idle time showed no tokens delivered until the new ring had
//! delivered more than the old one.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use anyhow::{Context, Result};
use metrics::{counter, gauge};

use super::reload::RELOAD_SOURCES;
use crate::wire::status::Status;

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
const JOB_COUNTERS: [&str; 3] = [
    "millrace_job_batches_planned_total",
    "millrace_private_batches_planned_total",
    "millrace_job_batches_planned_ahead_total",
];

/// Starts the HTTP listener on `addr` and creates the series that exist from the start.
pub(super) fn install(addr: &str) -> Result<()> {
    let addr: std::net::SocketAddr = addr
        .parse()
        .with_context(|| format!("[serve] metrics_addr {addr:?}"))?;
    use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
    use metrics_util::MetricKindMask;
    // Buckets make the latency a real histogram (quantiles across nodes in PromQL).
    let buckets = [
        1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0, 2.5,
    ];
    PrometheusBuilder::new()
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
        .install()
        .with_context(|| format!("starting the metrics exporter on {addr}"))?;
    // Every series exists from the start, so rate() and alerts see zeros, not gaps.
    for source in RELOAD_SOURCES {
        counter!("millrace_reloads_total", "source" => source).absolute(0);
        counter!("millrace_reload_failures_total", "source" => source).absolute(0);
    }
    Ok(())
}

/// What each ring's and job's counters said at the last export, to advance the exported
/// counters by the difference. Only the series of the last export are kept, so it holds
/// no more than the daemon's rings and jobs.
#[derive(Default)]
pub(super) struct Exporter {
    rings: HashMap<(String, u32), [u64; RING_COUNTERS.len()]>,
    jobs: HashMap<String, [u64; JOB_COUNTERS.len()]>,
}

/// How far each counter of one series moved from `before` (its last export, if it had
/// one) to `now`. A series absent last time, or one of whose figures went back, is a new
/// ring or job: all of its figures are new.
fn advance<const N: usize>(before: Option<&[u64; N]>, now: &[u64; N]) -> [u64; N] {
    match before {
        Some(b) if b.iter().zip(now).all(|(b, n)| n >= b) => std::array::from_fn(|i| now[i] - b[i]),
        _ => *now,
    }
}

impl Exporter {
    /// Publishes `status` (derived from the same snapshot as `millrace status`, so the
    /// two never disagree). Every series that should stay is set on every call: one that
    /// is not ages out ([`METRICS_IDLE`]).
    pub(super) fn export(&mut self, status: &Status) {
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
        gauge!("millrace_poisoned_shards").set(status.poisoned_shards.len() as f64);
        gauge!("millrace_padding_fraction").set(status.padding_fraction);
        gauge!("millrace_truncation_fraction").set(status.truncation_fraction);
        for d in &status.domains {
            let name = d.name.clone();
            gauge!("millrace_domain_target_share", "domain" => name.clone()).set(d.target_share);
            gauge!("millrace_domain_realized_share", "domain" => name.clone())
                .set(d.realized_share);
            gauge!("millrace_domain_epochs", "domain" => name).set(d.epochs);
        }
        let mut rings = HashMap::new();
        let mut jobs = HashMap::new();
        for j in &status.jobs {
            let label = [("job", j.job.clone())];
            let p = &j.planner;
            gauge!("millrace_job_batches_held", &label).set(p.held as f64);
            let now = [p.planned, p.private, p.ahead];
            let by = advance(self.jobs.get(&j.job), &now);
            for (name, n) in JOB_COUNTERS.into_iter().zip(by) {
                counter!(name, &label).increment(n);
            }
            jobs.insert(j.job.clone(), now);
            for r in &j.rings {
                let labels = [("job", j.job.clone()), ("dp_rank", r.dp_rank.to_string())];
                let key = (j.job.clone(), r.dp_rank);
                let now = [
                    r.tokens_delivered,
                    r.batches_delivered,
                    r.release_frames,
                    r.page_releases,
                    r.wakes,
                    r.wakes_deferred,
                ];
                let by = advance(self.rings.get(&key), &now);
                for (name, n) in RING_COUNTERS.into_iter().zip(by) {
                    counter!(name, &labels).increment(n);
                }
                rings.insert(key, now);
                gauge!("millrace_step", &labels).set(r.published_step as f64);
                gauge!("millrace_ring_occupancy", &labels).set(r.occupancy as f64);
                gauge!("millrace_ring_slots", &labels).set(r.slots as f64);
                gauge!("millrace_consumer_wait_seconds_total", &labels).set(r.consumer_wait_s);
                gauge!("millrace_producer_wait_seconds_total", &labels).set(r.producer_wait_s);
            }
        }
        self.rings = rings;
        self.jobs = jobs;
    }
}

#[cfg(test)]
mod tests {
    use super::advance;

    #[test]
    fn a_series_advances_by_its_figures_since_the_last_export() {
        assert_eq!(advance(None, &[5, 0, 7]), [5, 0, 7]);
        assert_eq!(advance(Some(&[5, 0, 7]), &[9, 0, 7]), [4, 0, 0]);
        // A figure that went back: a new ring under the same labels, counted from its
        // start, not held at the old ring's total.
        assert_eq!(advance(Some(&[900, 30, 7]), &[40, 2, 9]), [40, 2, 9]);
        assert_eq!(advance(Some(&[900, 30, 7]), &[950, 2, 9]), [950, 2, 9]);
    }
}
