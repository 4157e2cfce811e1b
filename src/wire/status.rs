//! STATUS and the journal as typed structs (docs/PROTOCOL.md, control connections): the
//! daemon builds one [`Status`], and `status --json`, `top` and the Prometheus exporter
//! read the same fields by name instead of by string key.
//!
//! Fields are declared in alphabetical order so that the serialized JSON is byte for byte
//! what the daemon wrote when STATUS was a `serde_json::Value` (whose maps sort their
//! keys). Every struct defaults its missing fields when read, so a `ctl` talking to a
//! daemon one release apart still shows what both know.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The journal's first changes STATUS lists at most when their JSON, all of them, would
/// pass [`STATUS_JOURNAL_BYTES`] (docs/PROTOCOL.md, STATUS).
pub const STATUS_JOURNAL_HEAD: usize = 4;
/// The journal's last changes STATUS lists at most when they would not all fit.
pub const STATUS_JOURNAL_TAIL: usize = 16;
/// Most bytes (as JSON) of the changes STATUS lists: with 4,096 domains of 4,096-byte
/// names (18 MB of `domains[]`) STATUS stays well within its 64 MiB frame.
pub const STATUS_JOURNAL_BYTES: usize = 8 << 20;

/// Poisoned shards STATUS lists at most: a filesystem lost under a corpus of 10^5 shards
/// poisons every one, and their paths and reasons (a few hundred bytes each) would pass
/// the 64 MiB frame and take `status`, `top` and the exporter with them.
pub const STATUS_POISONED_SHARDS: usize = 1024;

/// How long STATUS waits for the hub's lock before it answers without the figures that
/// need it ([`Status::hub_busy`]): the lock is held a millisecond at most unless a read
/// under it hangs.
pub const STATUS_LOCK_WAIT_MS: u64 = 2000;

/// Everything `millrace status` reports: the hub's figures and the process's own.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Status {
    /// Trainer connections admitted and not yet gone.
    pub clients: u64,
    /// The config file the daemon runs from.
    pub config: String,
    /// Control connections open against their cap.
    pub control_connections: ControlConnections,
    /// Per domain: target and realized shares, epochs, tokens.
    pub domains: Vec<DomainStatus>,
    /// Stopping (SIGTERM): no new slot is filled and no connection accepted; clients
    /// finish the slots they hold, for at most `[serve] drain_timeout_ms`.
    pub draining: bool,
    /// Reloads and changes refused since start.
    pub failed_reloads: u64,
    /// Refused reloads per source (file, sighup, ctl, client, cursor).
    pub failed_reloads_by_source: BTreeMap<String, u64>,
    /// The fd limit and how much of it is used.
    pub fd_limit: FdLimitStatus,
    /// The plan fingerprint (32 hex digits) that cursor blobs must carry.
    pub fingerprint: String,
    /// The earliest trainer step a live change may still take effect at.
    pub first_changeable_step: u64,
    /// The hub's lock could not be taken within [`STATUS_LOCK_WAIT_MS`] (work under it
    /// is stuck: `stuck_fills` names it): only the fields that need no lock are filled
    /// (the process's own, `poisoned_shards`, `reader`, `stuck_fills`).
    pub hub_busy: bool,
    /// Each job and its rings.
    pub jobs: Vec<JobStatus>,
    /// The live changes the plan follows, in order: every one when their JSON fits
    /// [`STATUS_JOURNAL_BYTES`], else the first and last ones (`journal_omitted` says
    /// which are left out).
    pub journal: Vec<JournalEntry>,
    /// Changes in the journal, all of them (`journal` may list fewer).
    pub journal_changes: u64,
    /// The changes `journal` leaves out to stay within a frame; null when it lists all.
    pub journal_omitted: Option<JournalGap>,
    /// Changes dropped from the journal because a later one replaced them.
    pub journal_superseded: u64,
    /// The outcome of the last reload or change, if any.
    pub last_reload: Option<ReloadOutcome>,
    /// Fraction of copied positions that are padding.
    pub padding_fraction: f64,
    /// The daemon's process id.
    pub pid: u32,
    /// The plan step of the most advanced ring's published cursor.
    pub plan_step: u64,
    /// Shards that changed under the daemon; no ring reads them until a restart (the
    /// first [`STATUS_POISONED_SHARDS`] of them).
    pub poisoned_shards: Vec<PoisonedShard>,
    /// Poisoned shards, all of them (`poisoned_shards` may list fewer).
    pub poisoned_shards_total: u64,
    /// The reader that fills compact slots now (`mmap`, `mmap-willneed`, `uring`,
    /// `uring-direct`): `mmap-willneed` (`mmap` without `page_hints`) while io_uring,
    /// having failed under a running daemon, waits for a retry or was given up.
    pub reader: String,
    /// Why the configured `[serve] reader` is not the one in use; null when it is.
    pub reader_fallback: Option<String>,
    /// While io_uring waits to be tried again after failures that may pass (memory,
    /// descriptors), and slots are copied from the mappings meanwhile; null otherwise.
    pub reader_retry: Option<ReaderRetry>,
    /// Connections refused since start (REFUSED frames), per code.
    pub refused_by_code: BTreeMap<String, u64>,
    /// Reloads and changes applied since start.
    pub reloads: u64,
    /// Applied reloads per source.
    pub reloads_by_source: BTreeMap<String, u64>,
    /// Shared memory held by rings against the budget.
    pub ring_memory: RingMemory,
    /// The socket the daemon listens on.
    pub socket: String,
    /// Slot fills, seeks and reads under the hub's lock in flight for longer than
    /// `[serve] stuck_fill_seconds` (a read hung on a network filesystem?), the longest
    /// first, each naming the file and bytes it reads.
    pub stuck_fills: Vec<StuckFill>,
    /// Fraction of copied documents cut at a row's end.
    pub truncation_fraction: f64,
    /// Seconds since the daemon started.
    pub uptime_s: f64,
    /// The daemon's release (Cargo version).
    pub version: String,
    /// For /metrics only (not part of STATUS): rings gone since the exporter's last
    /// STATUS, by job, with their last figures, so it counts their last steps.
    #[serde(skip)]
    pub departed_rings: Vec<(String, RingStatus)>,
    /// For /metrics only: jobs gone since the exporter's last STATUS, with their
    /// planners' last figures.
    #[serde(skip)]
    pub departed_jobs: Vec<(String, JobPlanCounts)>,
}

impl Status {
    /// The newest change when `journal` lists it, else `None`: where the newest change is
    /// too large for STATUS and older ones fit, `journal` ends with an older one (the
    /// gap of `journal_omitted` reaches the end), which `top` showed as the last change.
    pub fn newest_change(&self) -> Option<&JournalEntry> {
        match &self.journal_omitted {
            Some(gap) if self.journal.len() as u64 <= gap.after => None,
            _ => self.journal.last(),
        }
    }
}

/// Open control connections and their cap (`[serve] max_control_connections`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ControlConnections {
    /// The cap.
    pub max: u64,
    /// Open now.
    pub open: u64,
}

/// One domain's mixture figures.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DomainStatus {
    /// Tokens the domain's shards hold.
    pub corpus_tokens: u64,
    /// Epochs the planner has drawn of the domain (fractional).
    pub epochs: f64,
    /// The domain's name.
    pub name: String,
    /// Share of real tokens delivered so far.
    pub realized_share: f64,
    /// Rows the mixer gave the domain up to `plan_step`.
    pub rows: u64,
    /// Row share the mixer aims for at `plan_step`.
    pub target_row_share: f64,
    /// Token share the schedule asks for at `plan_step`.
    pub target_share: f64,
    /// Real tokens delivered from the domain.
    pub tokens: u64,
}

/// The process's fd limit (soft raised at start) and the fds open.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct FdLimitStatus {
    /// The soft limit found at start.
    pub at_start: u64,
    /// The hard limit.
    pub hard: u64,
    /// Fds open now, when /proc could be read.
    pub open: Option<u64>,
    /// The soft limit in force.
    pub soft: u64,
}

/// One job (a training run's dp group) and its rings.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct JobStatus {
    /// The job's dp_size.
    pub dp_size: u32,
    /// The job's name.
    pub job: String,
    /// One per dp rank that has a ring, by rank.
    pub rings: Vec<RingStatus>,
    /// What the job's planner did, for /metrics only (not part of STATUS).
    #[serde(skip)]
    pub planner: JobPlanCounts,
}

/// The batches one job's planner holds and planned, for the exporter's per-job series.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JobPlanCounts {
    /// Global batches held for the job's rings to take.
    pub held: u64,
    /// Global batches the job's planner planned.
    pub planned: u64,
    /// Batches rings planned on private planners.
    pub private: u64,
    /// Of `planned`, those the plan thread planned outside the hub's lock.
    pub ahead: u64,
    /// Claims that found the job's next step not yet planned by the plan thread: the
    /// sign that the copy threads wait for planning.
    pub waits: u64,
    /// The job's own number in this daemon: a job that returns under its name has
    /// another, and its figures start from zero.
    pub serial: u64,
}

/// One dp rank's ring.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RingStatus {
    /// Batches its peers have released.
    pub batches_delivered: u64,
    /// Seconds the consumer waited on an empty ring.
    pub consumer_wait_s: f64,
    /// The dp rank.
    pub dp_rank: u32,
    /// Replicas that have joined: below `replicas`, the ring waits for the rest and
    /// fills no more than its first slots (a launcher that starts too few TP peers).
    pub joined: u32,
    /// Published slots not yet released by every peer.
    pub occupancy: u64,
    /// Releases the daemon read from its peers' release pages (no frame sent).
    pub page_releases: u64,
    /// The replicas (TP/CP peers) reading the ring.
    pub peers: Vec<PeerStatus>,
    /// Seconds the producer waited on a full ring.
    pub producer_wait_s: f64,
    /// The last step published (exclusive).
    pub published_step: u64,
    /// RELEASE frames its peers sent; for peers with a release page each is a wake-up
    /// after the daemon found the ring full.
    pub release_frames: u64,
    /// The lowest step every peer has released.
    pub released_step: u64,
    /// Replicas the ring's first HELLO announced (0 from a daemon that did not send it).
    pub replicas: u32,
    /// The ring's own number in this daemon: a ring made again under the same job and
    /// rank has another, and its figures start from zero, so `top` and the exporter take
    /// no difference across two rings (0 from a daemon that did not send it).
    pub serial: u64,
    /// Slots in the ring.
    pub slots: u32,
    /// Tokens delivered (batches x tokens per step).
    pub tokens_delivered: u64,
    /// Eventfd signals the daemon sent its peers for published slots (one per peer per
    /// wake-up; with coalesced wakes fewer than the slots published).
    pub wakes: u64,
    /// Publishes whose wake-up was held back and sent with a later one
    /// (`[serve] wake_coalesce_us`).
    pub wakes_deferred: u64,
}

/// One replica reading a ring.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PeerStatus {
    /// Its process id, from SO_PEERCRED.
    pub pid: Option<i32>,
    /// Whether it releases through a release page (HELLO `release_page`).
    pub release_page: bool,
    /// The step it has released.
    pub released_step: u64,
    /// Its replica name.
    pub replica: String,
}

/// Ring memory in use against `[serve] ring_memory_bytes`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RingMemory {
    /// The budget.
    pub budget_bytes: u64,
    /// In use now.
    pub used_bytes: u64,
}

/// io_uring's retry after failures that may pass (STATUS `reader_retry`): how the
/// operator tells a node that reads with io_uring again soon from one that gave it up.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ReaderRetry {
    /// The last failure.
    pub error: String,
    /// Failures in a row so far.
    pub failures: u32,
    /// The failure in a row that gives io_uring up until restart.
    pub give_up_after: u32,
    /// Milliseconds until a fill tries io_uring again.
    pub retry_in_ms: u64,
}

/// A shard the daemon stopped reading, and why.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PoisonedShard {
    /// What happened (a fault, a changed size...).
    pub reason: String,
    /// The shard's path.
    pub shard: String,
}

/// A slot fill (or a seek, or a read under the hub's lock) that has taken longer than
/// `[serve] stuck_fill_seconds` and goes on: the ring's clients wait for its step.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct StuckFill {
    /// The ring's rank.
    pub dp_rank: u32,
    /// The ring's job.
    pub job: String,
    /// The shard file and byte range it reads (or that it has not begun to copy).
    pub reading: String,
    /// How long it has taken so far.
    pub seconds: f64,
    /// The step it fills.
    pub step: u64,
}

/// The outcome of one reload or live change, kept for `status`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ReloadOutcome {
    /// The refusal code, when refused.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    /// What was applied or why it was refused.
    pub message: String,
    /// Whether it was applied.
    pub ok: bool,
    /// Where it came from (file, sighup, ctl, client, cursor).
    pub source: String,
    /// When, in seconds since the Unix epoch.
    pub unix_s: u64,
}

/// One live change in the journal.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct JournalEntry {
    /// The trainer step it takes effect at.
    pub at_step: u64,
    /// The plan step it takes effect at (differs from `at_step` after skips).
    pub plan_step: u64,
    /// The schedule points it sets from there on.
    pub points: Vec<JournalPoint>,
    /// Where it came from.
    pub source: String,
    /// The stage it adds from there on (a `set_stage`; then `points` is empty).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stage: Option<JournalStage>,
}

/// The row shape a stage change puts in force, as `[[plan.stage]]` names its fields.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct JournalStage {
    /// Tokens a row trains on.
    pub seq_len: u32,
    /// Rows per global batch.
    pub global_batch_rows: u32,
    /// Units per packing window.
    pub best_fit_window: u64,
    /// Whether `sequence`-grouped domains chain their long groups.
    pub chain_groups: bool,
}

/// The changes STATUS's `journal` leaves out: consecutive, after its first `after`
/// entries (`millrace ctl journal` lists them).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct JournalGap {
    /// Entries `journal` lists before the gap.
    pub after: u64,
    /// Changes left out there.
    pub changes: u64,
}

/// One schedule point of a journal entry.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct JournalPoint {
    /// The plan step the weights hold from.
    pub step: u64,
    /// Raw weight per domain name.
    pub weights: BTreeMap<String, f64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The typed struct writes exactly the keys, in exactly the order, that the
    /// `serde_json::Value` it replaced wrote: a consumer of `status --json` sees the same
    /// bytes.
    #[test]
    fn status_serializes_as_sorted_json() {
        let mut s = Status {
            clients: 2,
            fingerprint: "ab".into(),
            jobs: vec![JobStatus {
                dp_size: 2,
                job: "j".into(),
                rings: vec![RingStatus {
                    dp_rank: 1,
                    peers: vec![PeerStatus {
                        pid: Some(7),
                        release_page: true,
                        released_step: 3,
                        replica: "0".into(),
                    }],
                    ..RingStatus::default()
                }],
                ..JobStatus::default()
            }],
            journal: vec![JournalEntry {
                at_step: 5,
                plan_step: 5,
                points: vec![JournalPoint {
                    step: 5,
                    weights: [("a".to_string(), 1.0)].into(),
                }],
                source: "ctl".into(),
                stage: None,
            }],
            last_reload: Some(ReloadOutcome {
                code: Some("late".into()),
                message: "m".into(),
                ok: false,
                source: "file".into(),
                unix_s: 9,
            }),
            ..Status::default()
        };
        s.domains.push(DomainStatus {
            name: "web".into(),
            ..DomainStatus::default()
        });
        let typed = serde_json::to_string(&s).unwrap();
        let value: serde_json::Value = serde_json::from_str(&typed).unwrap();
        // serde_json::Value sorts map keys (no preserve_order in this tree): re-encoding
        // through it gives the old bytes, which must equal the typed ones.
        assert_eq!(serde_json::to_string(&value).unwrap(), typed);
        let back: Status = serde_json::from_value(value).unwrap();
        assert_eq!(back, s);
    }

    /// A status from a daemon that lacks a field still reads, with the field's default.
    #[test]
    fn missing_fields_default() {
        let s: Status = serde_json::from_str(r#"{"clients": 3, "jobs": [{"job": "x"}]}"#).unwrap();
        assert_eq!(s.clients, 3);
        assert_eq!(s.jobs[0].job, "x");
        assert!(s.jobs[0].rings.is_empty());
        assert_eq!(s.last_reload, None);
    }
}
