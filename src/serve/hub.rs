//! The daemon's shared state: jobs, one ring per (job, dp rank), the peers reading each
//! ring, and the materializer threads that plan, prefetch and fill slots.
//!
//! Everything mutable sits behind one mutex that is held only for bookkeeping and for
//! planning a step (a millisecond at most); copying tokens into a slot happens outside
//! it, on a worker that has claimed the slot. A ring advances when its own peers release
//! slots, so a slow rank stalls nobody else.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tracing::{debug, error, info, warn};

use super::fill::{fill_slot, random_access, will_need, SlotJob, Source};
use super::ring::{Layout, Ring, TokenType};
use crate::config::plan::{SchedulePoint, MAX_STEP};
use crate::plan::journal::{self, Order};
use crate::plan::{cursor, Change, Plan, Planner};
use crate::wire::protocol::{Code, Hello, Refusal, Welcome};
use crate::wire::status::{
    DomainStatus, JobStatus, JournalEntry, JournalPoint, PeerStatus, PoisonedShard, RingMemory,
    RingStatus, Status,
};

/// Settings the hub needs from `[serve]`.
#[derive(Debug, Clone)]
pub struct HubSettings {
    /// Slots per ring.
    pub slots: u32,
    /// Planned steps kept ahead of the copies, with page-cache hints issued.
    pub prefetch: u32,
    /// Token element type.
    pub token: TokenType,
    /// Most clients connected at once.
    pub max_clients: usize,
    /// Issue MADV_WILLNEED for planned spans.
    pub hints: bool,
    /// Most bytes all rings together may take (`[serve] ring_memory_bytes`): a job whose
    /// ring would pass it is refused with `memory`.
    pub ring_budget: u64,
}

pub use crate::sys::EventFd;

/// What a successful HELLO gets: the reply, the fds to pass, and the peer's handle.
pub struct Admission {
    /// Identifies the peer in later calls.
    pub peer: u64,
    /// The WELCOME reply.
    pub welcome: Welcome,
    /// The ring (kept alive while its fd is sent).
    pub ring: Arc<Ring>,
    /// The peer's ready eventfd.
    pub ready: Arc<EventFd>,
    /// Fired when the peer's ring fails, so its connection can say why and close.
    pub kick: Arc<tokio::sync::Notify>,
}

struct Peer {
    replica: String,
    released: u64,
    ready: Arc<EventFd>,
    kick: Arc<tokio::sync::Notify>,
    pid: Option<i32>,
    /// A peer that joined ahead of the ring: its step and blob, checked against the
    /// ring's own cursor when the ring gets there.
    expect: Option<(u64, Vec<u8>)>,
    /// Why this peer is being disconnected.
    error: Option<String>,
    /// The blob it resumed from, if any.
    blob: Option<Vec<u8>>,
}

struct RingEntry {
    ring: Arc<Ring>,
    planner: Planner,
    /// Planned, hinted, not yet claimed.
    planned: VecDeque<SlotJob>,
    /// Next step to hand to a worker.
    next_fill: u64,
    /// Filled but not yet published (a later slot finished first), with its cursor.
    filled: BTreeMap<u64, (Vec<u8>, Vec<u64>)>,
    /// Every step below this is visible to clients.
    published: u64,
    /// Cursor at the start of each step in [oldest held, published].
    cursors: VecDeque<(u64, Vec<u8>)>,
    peers: HashMap<u64, Peer>,
    replicas: u32,
    joined: u32,
    /// The step the ring starts at (moves back while peers are still joining).
    start: u64,
    micro: (u32, u32),
    failed: Option<String>,
    /// Created from a blob: see `started`.
    wait_for_peers: bool,
    /// Steps a worker is copying now. A step whose plan was replaced by a live change
    /// stays here until its (discarded) copy ends, so no second worker writes its slot.
    in_flight: BTreeSet<u64>,
    /// Bumped when a live change regenerates the ring; copies of older generations are
    /// dropped when they finish.
    generation: u64,
    /// Counters and clocks for status and metrics.
    stats: RingStats,
}

/// What `status` and the metrics report about one ring.
#[derive(Default)]
struct RingStats {
    batches_delivered: u64,
    tokens_per_step: u64,
    /// Real tokens per domain in the steps this ring published.
    domain_tokens: Vec<u64>,
    /// Since when a peer has released every published step (the trainer waits for us).
    starved_since: Option<Instant>,
    consumer_wait: Duration,
    /// Since when every slot has held an unreleased step (we wait for the trainer).
    full_since: Option<Instant>,
    producer_wait: Duration,
    /// The hub's claim counter when a worker last claimed a step of this ring: among
    /// equally empty rings the one served longest ago goes first (round-robin), so no
    /// ring waits while its neighbours run ahead (issue 14 item 9).
    last_claim: u64,
}

impl RingStats {
    fn settle(since: &mut Option<Instant>, total: &mut Duration, now: Instant) {
        if let Some(t) = since.take() {
            *total += now.saturating_duration_since(t);
        }
    }

    fn waits(&self, now: Instant) -> (f64, f64) {
        let open =
            |s: Option<Instant>| s.map_or(Duration::ZERO, |t| now.saturating_duration_since(t));
        (
            (self.consumer_wait + open(self.starved_since)).as_secs_f64(),
            (self.producer_wait + open(self.full_since)).as_secs_f64(),
        )
    }
}

impl RingEntry {
    /// Whether workers may fill the ring. A ring resumed from a blob waits until every
    /// announced peer has joined: TP peers may have consumed different numbers of steps
    /// before a daemon restart, and the ring must start at the lowest. A fresh ring (no
    /// blob) starts at once, holding its first step for the peers still to come.
    fn started(&self) -> bool {
        self.joined >= self.replicas || !self.wait_for_peers
    }

    /// The oldest step some peer (present or still expected) may read.
    fn base(&self) -> u64 {
        if self.joined < self.replicas {
            return self.start;
        }
        self.peers
            .values()
            .map(|p| p.released)
            .min()
            .unwrap_or(self.published)
    }

    /// Slots a worker may fill now.
    fn free(&self, slots: u32) -> u64 {
        (self.base() + slots as u64).saturating_sub(self.next_fill)
    }

    /// Whether a worker should fill this ring now. (No refill hysteresis: a consumer
    /// that holds several slots may be waiting for the one free slot.)
    fn claimable(&self, slots: u32) -> bool {
        self.failed.is_none()
            && self.started()
            && !self.peers.is_empty()
            && self.free(slots) > 0
            && !self.in_flight.contains(&self.next_fill)
    }

    /// Updates the stall clocks after `published` or a peer's release moved.
    fn clocks(&mut self, slots: u32, now: Instant) {
        let starved = self.started() && self.peers.values().any(|p| p.released >= self.published);
        match (starved, self.stats.starved_since.is_some()) {
            (true, false) => self.stats.starved_since = Some(now),
            (false, true) => RingStats::settle(
                &mut self.stats.starved_since,
                &mut self.stats.consumer_wait,
                now,
            ),
            _ => {}
        }
        let full = !self.peers.is_empty() && self.published >= self.base() + slots as u64;
        match (full, self.stats.full_since.is_some()) {
            (true, false) => self.stats.full_since = Some(now),
            (false, true) => RingStats::settle(
                &mut self.stats.full_since,
                &mut self.stats.producer_wait,
                now,
            ),
            _ => {}
        }
    }

    /// Replans everything not yet published with `planner` (already at `published`).
    fn regenerate(&mut self, planner: Planner) {
        self.planner = planner;
        self.planned.clear();
        self.filled.clear();
        self.next_fill = self.published;
        self.generation += 1;
    }
}

/// A step handed to a worker: (job, dp rank), the ring, the planned step, and the
/// ring's generation when it was claimed.
type Claimed = ((String, u32), Arc<Ring>, SlotJob, u64);

struct Job {
    dp_size: u32,
    rings: HashMap<u32, RingEntry>,
}

struct State {
    /// The plan in force: the config's, with the journal of live changes.
    plan: Arc<Plan>,
    /// Where each journal entry came from, in journal order.
    sources: Vec<&'static str>,
    jobs: HashMap<String, Job>,
    next_peer: u64,
    clients: usize,
    stopping: bool,
    /// No new slots are filled; peers finish what is published.
    draining: bool,
    /// The highest step any ring ever published: clients may hold anything below it.
    watermark: u64,
    reloads: BTreeMap<&'static str, u64>,
    failed_reloads: BTreeMap<&'static str, u64>,
    /// Steps claimed so far: the clock of `RingStats::last_claim`.
    claims: u64,
    /// Real tokens per domain of rings whose last peer left, and the most advanced of
    /// their published cursors: `status` keeps counting what was delivered after the
    /// clients have gone instead of falling back to zero.
    retired: (Vec<u64>, Option<Published>),
}

/// A ring's last published cursor for `status`: its step, the blob, the planner's epochs.
type Published = (u64, Vec<u8>, Vec<f64>);

impl State {
    /// The first trainer step a change may still shape.
    fn first_changeable(&self) -> u64 {
        let live = self
            .jobs
            .values()
            .flat_map(|j| j.rings.values())
            .map(|e| e.published)
            .max()
            .unwrap_or(0);
        live.max(self.watermark)
    }
}

/// Shared by the accept loop, every connection and every materializer thread.
pub struct Hub {
    source: Source,
    settings: HubSettings,
    cursor_cap: usize,
    /// Bytes of the cursor field left for the journal.
    journal_cap: usize,
    state: Mutex<State>,
    work: Condvar,
    /// Real and padded token positions copied, and documents started and cut, for the
    /// padding and truncation fractions.
    fill: Mutex<FillStats>,
    /// When the shards were last stat'ed for in-place changes ([`SHARD_CHECK`]), and the
    /// shard the next pass starts at.
    shards_checked: Mutex<(Instant, usize)>,
}

/// How often a worker stats shards for a size or mtime that moved since they were
/// opened (a shard rewritten in place), off the hub lock.
const SHARD_CHECK: Duration = Duration::from_secs(1);
/// The most one pass may spend (a few us a file): a corpus of more shards than fit is
/// covered round-robin over several passes, so the check never costs a worker more than
/// 1% of its time.
const SHARD_CHECK_BUDGET: Duration = Duration::from_millis(10);

#[derive(Default, Clone, Copy)]
struct FillStats {
    positions: u64,
    real: u64,
    docs: u64,
    cut: u64,
}

/// What a live mixture change proposes.
#[derive(Debug, Clone)]
pub enum Proposal {
    /// New raw weights for the named domains; the others keep theirs.
    Weights(BTreeMap<String, f64>),
    /// The config file's schedule went from `old` to `new`: the new one applies from
    /// their first difference on.
    Schedule {
        /// The schedule last applied from the file.
        old: Vec<SchedulePoint>,
        /// The file's schedule now.
        new: Vec<SchedulePoint>,
    },
}

/// What to do with a change for a step some client may already have received.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Late {
    /// Refuse it, naming the first step that can still change.
    Refuse,
    /// Apply it at the first step that can still change.
    Next,
}

/// One request to change the mixture, from any of the reload routes.
#[derive(Debug, Clone)]
pub struct ChangeRequest {
    /// The weights or schedule.
    pub proposal: Proposal,
    /// Trainer step it takes effect at (weights only; `None` = first changeable).
    pub at_step: Option<u64>,
    /// Late policy.
    pub late: Late,
    /// Route it came by: file, sighup, ctl, client.
    pub source: &'static str,
}

/// An accepted change, for the caller's reply.
#[derive(Debug, Clone)]
pub struct Applied {
    /// The step asked for (or the first changeable one when none was named).
    pub requested_step: Option<u64>,
    /// The trainer step it applies from; `None` when it changed nothing.
    pub applied_step: Option<u64>,
    /// Whether a late change was moved to the first changeable step.
    pub moved: bool,
    /// One line for logs and callers.
    pub message: String,
}

/// A refused change: the old weights stay in force.
#[derive(Debug, Clone)]
pub struct ChangeError {
    /// late, invalid or busy.
    pub code: Code,
    /// What was wrong, naming the field or step.
    pub message: String,
    /// With `late`: the first step a change may still shape.
    pub first_changeable: Option<u64>,
}

impl ChangeError {
    /// A refusal for bad input.
    pub fn invalid(message: impl Into<String>) -> ChangeError {
        ChangeError {
            code: Code::Invalid,
            message: message.into(),
            first_changeable: None,
        }
    }
}

impl Hub {
    /// A hub over a built plan and its mapped shards; hints the shards for random access.
    pub fn new(plan: Arc<Plan>, source: Source, settings: HubSettings) -> Hub {
        // Reads of a shard truncated under the daemon fail the rings that need it
        // instead of killing the process (corpus::guard).
        if let Err(e) =
            crate::corpus::guard::protect(source.shards.iter().flatten().flat_map(|s| s.mappings()))
        {
            warn!("cannot install the SIGBUS guard ({e}); a shard truncated while served will stop the daemon");
        }
        if settings.hints {
            for shard in source.shards.iter().flatten() {
                random_access(shard.data());
            }
        }
        let domains = plan.domain_names().len();
        let reseeds = plan.config().reseed.len();
        // Room for a journal of a few dozen typical changes; a change that would not fit
        // is refused (write the mixture into the config and restart instead).
        let journal_cap = 16384;
        let cursor_cap = 1024 + domains * (512 + 32 * reseeds) + journal_cap;
        Hub {
            source,
            settings,
            cursor_cap,
            journal_cap,
            state: Mutex::new(State {
                plan,
                sources: Vec::new(),
                jobs: HashMap::new(),
                next_peer: 1,
                clients: 0,
                stopping: false,
                draining: false,
                watermark: 0,
                reloads: BTreeMap::new(),
                failed_reloads: BTreeMap::new(),
                claims: 0,
                retired: (Vec::new(), None),
            }),
            work: Condvar::new(),
            fill: Mutex::new(FillStats::default()),
            shards_checked: Mutex::new((Instant::now(), 0)),
        }
    }

    /// The plan in force now.
    pub fn plan(&self) -> Arc<Plan> {
        self.lock().plan.clone()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A worker that panicked mid-update would be a bug; keep serving the rest.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Admits a client: checks its HELLO against the plan and the job, then joins it to
    /// its dp rank's ring (creating the ring at the client's step if none is live).
    /// Restoring or seeking a planner can take a while, so it happens before the lock; a
    /// live change landing meanwhile makes the attempt start over.
    ///
    /// `cancel` is set by the connection when its client hangs up: a seek in progress
    /// then stops at its next chunk and the attempt is refused with `cancelled`.
    pub fn admit(
        &self,
        hello: &Hello,
        pid: Option<i32>,
        cancel: &AtomicBool,
    ) -> Result<Admission, Refusal> {
        // Seeking or restoring a planner reads shard indexes: guarded like the copy.
        let guard = crate::corpus::guard::enter();
        let _ = crate::corpus::guard::take_fault();
        let r = self.admit_unguarded(hello, pid, cancel);
        let fault = crate::corpus::guard::take_fault();
        drop(guard);
        match fault {
            None => r,
            Some(addr) => {
                let why = self.poison_at(addr, "while planning this client's start");
                if let Ok(a) = r {
                    self.leave(&hello.job, hello.dp_rank, a.peer);
                }
                Err(Refusal::new(Code::Materialize, why))
            }
        }
    }

    fn admit_unguarded(
        &self,
        hello: &Hello,
        pid: Option<i32>,
        cancel: &AtomicBool,
    ) -> Result<Admission, Refusal> {
        for _ in 0..8 {
            if let Some(a) = self.try_admit(hello, pid, cancel)? {
                return Ok(a);
            }
        }
        Err(Refusal::new(
            Code::Busy,
            "the mixture kept changing while this client joined; retry",
        ))
    }

    /// One admission attempt; `Ok(None)` when the plan changed under it.
    fn try_admit(
        &self,
        hello: &Hello,
        pid: Option<i32>,
        cancel: &AtomicBool,
    ) -> Result<Option<Admission>, Refusal> {
        let seen = self.plan();
        let cfg = seen.config();
        let g = cfg.global_batch_rows;
        if g % hello.dp_size != 0 {
            return Err(Refusal::new(
                Code::DpSize,
                format!(
                    "dp_size {} does not divide global_batch_rows {g}",
                    hello.dp_size
                ),
            ));
        }
        let rows = g / hello.dp_size;
        let mbr = hello.micro_batch_rows.unwrap_or(rows / hello.micro_batches);
        if (mbr as u64) * (hello.micro_batches as u64) != rows as u64 {
            return Err(Refusal::new(
                Code::Layout,
                format!(
                    "micro_batch_rows {mbr} x micro_batches {} != {rows} rows per dp rank \
                     (global_batch_rows {g} / dp_size {})",
                    hello.micro_batches, hello.dp_size
                ),
            ));
        }
        let fp = format!("{:032x}", seen.fingerprint());
        if let Some(want) = &hello.fingerprint {
            if !want.eq_ignore_ascii_case(&fp) {
                return Err(Refusal::new(
                    Code::Fingerprint,
                    format!("client expects plan fingerprint {want}, this daemon serves {fp}"),
                ));
            }
        }
        let blob = hello.cursor_bytes()?;
        let refuse = |e: String| Refusal::new(Code::Cursor, format!("cursor blob refused: {e}"));
        // A blob that carries changes this daemon has not seen (it restarted, or another
        // node's daemon took them) brings them along: the plan under them is the one the
        // blob's run was following.
        let mut adopt: Option<Arc<Plan>> = None;
        if let Some(b) = &blob {
            let c = cursor::decode(b).map_err(|e| refuse(e.to_string()))?;
            match journal::compare(seen.journal(), seen.superseded(), &c.journal, c.superseded) {
                Order::Same | Order::OursAhead => {}
                Order::TheirsAhead => {
                    let domains = seen.domain_names().len();
                    if cursor::journal_bytes(&c.journal, domains) > self.journal_cap {
                        return Err(refuse(format!(
                            "its journal of {} live changes is larger than this daemon's cursor \
                             field allows ({} bytes)",
                            c.journal.len(),
                            self.journal_cap
                        )));
                    }
                    let p = seen
                        .with_history(c.journal.clone(), c.superseded)
                        .map_err(|e| refuse(e.to_string()))?;
                    adopt = Some(Arc::new(p));
                }
                Order::Diverged(i) => {
                    let at = |j: &[Change]| {
                        j.get(i)
                            .map_or("none".to_string(), |c| format!("from plan step {}", c.at))
                    };
                    return Err(refuse(format!(
                        "its journal of live mixture changes disagrees with this daemon's at \
                         change #{} (blob: {}, daemon: {}); the blob's run received different \
                         changes, and serving it would change its data",
                        i + 1,
                        at(&c.journal),
                        at(seen.journal())
                    )));
                }
            }
        }
        let plan = adopt.clone().unwrap_or_else(|| seen.clone());
        // Cheap check first: is there a streaming ring this client must join as it is?
        let streaming = {
            let st = self.lock();
            st.jobs
                .get(&hello.job)
                .and_then(|j| j.rings.get(&hello.dp_rank))
                .is_some_and(|e| e.started())
        };
        // A blob is always checked in full (fingerprint, history) before it can join
        // anything; a seek is only worth its cost when a ring will start from it.
        let planner = if streaming && blob.is_none() {
            None
        } else {
            Some(match &blob {
                Some(b) => plan.restore(b).map_err(|e| refuse(e.to_string()))?,
                None => {
                    let step = hello.start_step.unwrap_or(0);
                    plan.seek_cancellable(step, cancel).ok_or_else(|| {
                        Refusal::new(
                            Code::Cancelled,
                            format!("the client left while the daemon sought step {step}"),
                        )
                    })?
                }
            })
        };
        let ready = Arc::new(
            EventFd::new().map_err(|e| Refusal::new(Code::Busy, format!("eventfd: {e}")))?,
        );
        let kick = Arc::new(tokio::sync::Notify::new());
        let new_peer = |step: u64, expect: Option<(u64, Vec<u8>)>| Peer {
            replica: hello.replica.clone(),
            released: step,
            ready: ready.clone(),
            kick: kick.clone(),
            pid,
            expect,
            error: None,
            blob: blob.clone(),
        };

        let mut st = self.lock();
        if !Arc::ptr_eq(&st.plan, &seen) {
            return Ok(None);
        }
        if st.stopping || st.draining {
            return Err(Refusal::new(Code::Busy, "the daemon is shutting down"));
        }
        // A blob's changes are adopted only once every other check has passed (below),
        // but one that could rewrite what other clients already received is refused now.
        if let Some(p) = &adopt {
            let fc = st.first_changeable();
            let fc_p = seen.plan_step_of(fc);
            let extra = &p.journal()[journal::common_prefix(seen.journal(), p.journal())..];
            if let Some(ch) = extra.iter().find(|c| c.at < fc_p) {
                return Err(refuse(format!(
                    "it carries a live change from plan step {} that this daemon does not \
                     have, but step {fc} (plan step {fc_p}) has already been served to other \
                     clients without it",
                    ch.at
                )));
            }
        }
        if st.clients >= self.settings.max_clients {
            return Err(Refusal::new(
                Code::Busy,
                format!(
                    "the daemon serves its limit of {} clients",
                    self.settings.max_clients
                ),
            ));
        }
        let used = Self::ring_memory(&st);
        let peer_id = st.next_peer;
        st.next_peer += 1;
        let job = st.jobs.entry(hello.job.clone()).or_insert_with(|| Job {
            dp_size: hello.dp_size,
            rings: HashMap::new(),
        });
        if job.dp_size != hello.dp_size {
            return Err(Refusal::new(
                Code::DpSize,
                format!(
                    "job {:?} runs with dp_size {}, this client says {}",
                    hello.job, job.dp_size, hello.dp_size
                ),
            ));
        }
        // Every refusal below leaves the job as it was; a job this client just created
        // is removed again, so its dp_size does not bind the next client.
        let outcome: Result<(u64, Arc<Ring>), Refusal> = 'join: {
            match job.rings.get_mut(&hello.dp_rank) {
                Some(entry) => {
                    if entry.peers.values().any(|p| p.replica == hello.replica) {
                        break 'join Err(Refusal::new(
                            Code::Duplicate,
                            format!(
                                "job {:?} dp_rank {} replica {:?} is already connected",
                                hello.job, hello.dp_rank, hello.replica
                            ),
                        ));
                    }
                    if entry.micro != (mbr, hello.micro_batches) {
                        break 'join Err(Refusal::new(
                            Code::Layout,
                            format!(
                                "peers of dp_rank {} use micro_batch_rows {} x micro_batches {}; \
                                 this client asks {mbr} x {}",
                                hello.dp_rank, entry.micro.0, entry.micro.1, hello.micro_batches,
                            ),
                        ));
                    }
                    if entry.replicas != hello.replicas {
                        break 'join Err(Refusal::new(
                            Code::Replicas,
                            format!(
                                "job {:?} dp_rank {} was announced with replicas = {}; this \
                                 client says {}",
                                hello.job, hello.dp_rank, entry.replicas, hello.replicas
                            ),
                        ));
                    }
                    // A blob was restored (and so checked) before the lock.
                    let step = match (&blob, &planner) {
                        (Some(_), Some(p)) => p.step(),
                        _ => hello.start_step.unwrap_or(0),
                    };
                    let (lo, hi) = (entry.base(), entry.published);
                    let mut expect = None;
                    if !entry.started() && step < entry.start {
                        // Nothing is produced until every peer has joined: move the ring back
                        // to this peer's step; peers already waiting further on are checked
                        // when the ring reaches them.
                        let Some(planner) = planner else {
                            break 'join Err(Refusal::new(
                                Code::Busy,
                                "the ring started while this client joined; retry",
                            ));
                        };
                        for p in entry.peers.values_mut() {
                            if p.expect.is_none() {
                                p.expect = p.blob.clone().map(|b| (p.released, b));
                            }
                        }
                        let cursor = blob.clone().unwrap_or_else(|| planner.cursor());
                        entry.planner = planner;
                        entry.planned.clear();
                        entry.filled.clear();
                        entry.start = step;
                        entry.next_fill = step;
                        entry.published = step;
                        entry.cursors = VecDeque::from([(step, cursor)]);
                        entry.ring.restart_at(step);
                        info!(job = %hello.job, dp_rank = hello.dp_rank, step, "ring moved back to a peer that resumes earlier");
                    } else if step > hi {
                        // Ahead of the ring (a peer that had consumed more before a restart):
                        // it waits for the ring to get there, and its blob must match then.
                        expect = blob.clone().map(|b| (step, b));
                    } else {
                        let held = entry.cursors.iter().find(|(s, _)| *s == step);
                        match held {
                            Some((_, c)) if step >= lo && blob.as_ref().is_none_or(|b| b == c) => {}
                            _ => {
                                break 'join Err(Refusal::new(
                                    Code::PeerPosition,
                                    format!(
                                        "the ring of job {:?} dp_rank {} holds steps {lo}..={hi}; this \
                                         client asks for step {step}{}; peers of one dp rank must \
                                         resume from the same checkpoint",
                                        hello.job,
                                        hello.dp_rank,
                                        if held.is_some() { " with a different cursor" } else { "" }
                                    ),
                                ))
                            }
                        }
                    }
                    // The ring holds data for exactly the peers its first client
                    // announced: one past that count (another job's name, a stray
                    // replica) would stall the real ones. A full ring has started, so
                    // nothing above changed it for this client.
                    if entry.peers.len() >= entry.replicas as usize {
                        let mut names: Vec<&str> =
                            entry.peers.values().map(|p| p.replica.as_str()).collect();
                        names.sort_unstable();
                        break 'join Err(Refusal::new(
                            Code::Replicas,
                            format!(
                                "job {:?} dp_rank {} declared replicas = {} and all are \
                                 connected ({}); replica {:?} is one too many",
                                hello.job,
                                hello.dp_rank,
                                entry.replicas,
                                names.join(", "),
                                hello.replica
                            ),
                        ));
                    }
                    entry.joined += 1;
                    entry.peers.insert(peer_id, new_peer(step, expect));
                    Ok((step, entry.ring.clone()))
                }
                None => {
                    let Some(planner) = planner else {
                        // The ring we saw vanished while we waited for the lock: its peers
                        // left. Ask the client to retry rather than seek under the lock.
                        break 'join Err(Refusal::new(
                            Code::Busy,
                            "the ring was just torn down; retry",
                        ));
                    };
                    let layout = Layout::new(
                        rows,
                        cfg.seq_len,
                        self.settings.slots,
                        self.settings.token,
                        self.cursor_cap,
                    );
                    let step = planner.step();
                    if used.saturating_add(layout.ring_bytes) > self.settings.ring_budget {
                        break 'join Err(Refusal::new(
                            Code::Memory,
                            format!(
                                "a ring for job {:?} dp_rank {} takes {} bytes, and the rings \
                                 live now take {used} of the {} bytes [serve] \
                                 ring_memory_bytes allows",
                                hello.job,
                                hello.dp_rank,
                                layout.ring_bytes,
                                self.settings.ring_budget
                            ),
                        ));
                    }
                    let r = match Ring::create(
                        &format!("{}:{}", hello.job, hello.dp_rank),
                        layout,
                        step,
                    ) {
                        Ok(r) => Arc::new(r),
                        // Through the cleanup below, like every other refusal.
                        Err(e) => break 'join Err(Refusal::new(Code::Busy, e.to_string())),
                    };
                    let mut peers = HashMap::new();
                    peers.insert(peer_id, new_peer(step, None));
                    // The client's own bytes when it brought a blob: a peer resuming from
                    // the same checkpoint then matches byte for byte.
                    let cursor = blob.clone().unwrap_or_else(|| planner.cursor());
                    job.rings.insert(
                        hello.dp_rank,
                        RingEntry {
                            ring: r.clone(),
                            planner,
                            planned: VecDeque::new(),
                            next_fill: step,
                            filled: BTreeMap::new(),
                            published: step,
                            cursors: VecDeque::from([(step, cursor)]),
                            peers,
                            replicas: hello.replicas,
                            joined: 1,
                            start: step,
                            wait_for_peers: blob.is_some(),
                            micro: (mbr, hello.micro_batches),
                            failed: None,
                            in_flight: BTreeSet::new(),
                            generation: 0,
                            stats: RingStats {
                                tokens_per_step: rows as u64 * cfg.seq_len as u64,
                                ..RingStats::default()
                            },
                        },
                    );
                    info!(job = %hello.job, dp_rank = hello.dp_rank, step, bytes = r.layout().ring_bytes, "ring created");
                    Ok((step, r))
                }
            }
        };
        let outcome = match (outcome, adopt) {
            (Ok(x), Some(p)) => {
                // The blob's journal extends ours, or replaced a tail of ours that one of
                // its changes superseded.
                let kept = journal::common_prefix(seen.journal(), p.journal());
                let n = p.journal().len() - kept;
                // All or nothing: a failed install leaves every ring as it was.
                match self.install(&mut st, p) {
                    Ok(()) => {
                        st.sources.resize(kept, "cursor");
                        st.sources.extend(std::iter::repeat_n("cursor", n));
                        *st.reloads.entry("cursor").or_default() += 1;
                        info!(changes = n, job = %hello.job, dp_rank = hello.dp_rank, "adopted live mixture changes from a client's cursor blob");
                        Ok(x)
                    }
                    Err(e) => {
                        Self::unjoin(&mut st, &hello.job, hello.dp_rank, peer_id);
                        return Err(Refusal::new(
                            Code::Busy,
                            format!("adopting the blob's journal: {e}"),
                        ));
                    }
                }
            }
            (o, _) => o,
        };
        let Some(job) = st.jobs.get_mut(&hello.job) else {
            return Err(Refusal::new(
                Code::Busy,
                "the job was just torn down; retry",
            ));
        };
        let (start_step, ring) = match outcome {
            Ok(x) => x,
            Err(r) => {
                if job.rings.is_empty() {
                    st.jobs.remove(&hello.job);
                }
                return Err(r);
            }
        };
        st.clients += 1;
        drop(st);
        self.work.notify_all();
        let plan = self.plan();
        let layout = ring.layout();
        let welcome = Welcome {
            protocol: crate::wire::VERSION,
            fingerprint: fp,
            start_step,
            dp_rank: hello.dp_rank,
            dp_size: hello.dp_size,
            rows,
            seq_len: cfg.seq_len,
            micro_batch_rows: mbr,
            micro_batches: hello.micro_batches,
            token_dtype: layout.token.0.name().to_string(),
            // Ids go to the trainer as signed integers, as the ring writes padding.
            pad_token: cfg.pad_token as i64,
            eod_token: cfg.eod_token.map(|t| t as i64),
            vocab_size: cfg.vocab_size,
            domains: plan.domain_names().iter().map(|d| d.to_string()).collect(),
            slots: layout.slots,
            slot_offset: crate::wire::ring::RING_HEADER,
            slot_bytes: layout.slot_bytes,
            ring_bytes: layout.ring_bytes,
            fields: layout.field_specs(),
        };
        Ok(Some(Admission {
            peer: peer_id,
            welcome,
            ring,
            ready,
            kick,
        }))
    }

    /// Bytes of every live ring together, checked against `ring_budget`.
    fn ring_memory(st: &State) -> u64 {
        st.jobs
            .values()
            .flat_map(|j| j.rings.values())
            .map(|e| e.ring.layout().ring_bytes)
            .sum()
    }

    /// Takes back a join that a later step of admission refused.
    fn unjoin(st: &mut State, job: &str, dp_rank: u32, peer: u64) {
        let Some(j) = st.jobs.get_mut(job) else {
            return;
        };
        if let Some(e) = j.rings.get_mut(&dp_rank) {
            if e.peers.remove(&peer).is_some() {
                e.joined = e.joined.saturating_sub(1);
            }
            if e.peers.is_empty() {
                j.rings.remove(&dp_rank);
            }
        }
        if j.rings.is_empty() {
            st.jobs.remove(job);
        }
    }

    fn find<'a>(st: &'a mut State, job: &str, dp_rank: u32) -> Option<&'a mut RingEntry> {
        st.jobs.get_mut(job)?.rings.get_mut(&dp_rank)
    }

    /// Records that `peer` is done with every step below `upto`.
    pub fn release(&self, job: &str, dp_rank: u32, peer: u64, upto: u64) -> Result<(), String> {
        let mut st = self.lock();
        let Some(entry) = Self::find(&mut st, job, dp_rank) else {
            return Err("release for a ring that no longer exists".into());
        };
        let published = entry.published;
        let before = entry.base();
        let Some(p) = entry.peers.get_mut(&peer) else {
            return Err("release from a peer that is not joined".into());
        };
        if upto < p.released || upto > published {
            return Err(format!(
                "RELEASE upto {upto} is outside {}..={published} (it may not go back or pass \
                 the published steps)",
                p.released
            ));
        }
        p.released = upto;
        let base = entry.base();
        if base > before && entry.joined >= entry.replicas {
            entry.stats.batches_delivered += base - before;
        }
        while entry.cursors.len() > 1 && entry.cursors.front().is_some_and(|(s, _)| *s < base) {
            entry.cursors.pop_front();
        }
        entry.clocks(self.settings.slots, Instant::now());
        let wake = entry.claimable(self.settings.slots);
        drop(st);
        if wake {
            self.work.notify_one();
        }
        Ok(())
    }

    /// Removes a peer; drops its ring when it was the last one.
    pub fn leave(&self, job: &str, dp_rank: u32, peer: u64) {
        let mut st = self.lock();
        st.clients = st.clients.saturating_sub(1);
        let Some(j) = st.jobs.get_mut(job) else {
            return;
        };
        let Some(entry) = j.rings.get_mut(&dp_rank) else {
            return;
        };
        if let Some(p) = entry.peers.remove(&peer) {
            debug!(job, dp_rank, replica = %p.replica, pid = ?p.pid, released = p.released, "peer left");
        }
        if entry.peers.is_empty() {
            info!(
                job,
                dp_rank,
                published = entry.published,
                "last peer left; ring dropped"
            );
            let removed = j.rings.remove(&dp_rank);
            if j.rings.is_empty() {
                st.jobs.remove(job);
            }
            if let Some(e) = removed {
                let (tokens, best) = &mut st.retired;
                tokens.resize(tokens.len().max(e.stats.domain_tokens.len()), 0);
                for (s, t) in tokens.iter_mut().zip(&e.stats.domain_tokens) {
                    *s += t;
                }
                if let Some((step, c)) = e.cursors.back() {
                    if best.as_ref().is_none_or(|b| *step > b.0) {
                        *best = Some((*step, c.clone(), e.planner.epochs()));
                    }
                }
            }
        }
        drop(st);
        self.work.notify_all();
    }

    /// Why a peer is being disconnected: its own error, or its ring's failure.
    pub fn failure(&self, job: &str, dp_rank: u32, peer: u64) -> Option<String> {
        let mut st = self.lock();
        let e = Self::find(&mut st, job, dp_rank)?;
        e.peers
            .get(&peer)
            .and_then(|p| p.error.clone())
            .or_else(|| e.failed.clone())
    }

    /// Stops filling new slots and refuses new HELLOs; peers may still read and release
    /// what is published. Returns at once; see [`Hub::drained`].
    pub fn drain(&self) {
        self.lock().draining = true;
    }

    /// Whether every peer has released every published step (or left).
    pub fn drained(&self) -> bool {
        let st = self.lock();
        st.jobs
            .values()
            .flat_map(|j| j.rings.values())
            .all(|e| e.peers.values().all(|p| p.released >= e.published))
    }

    /// Stops the workers; new HELLOs are refused.
    pub fn stop(&self) {
        self.lock().stopping = true;
        self.work.notify_all();
    }

    /// Poisons every shard whose files changed in place since they were opened, at most
    /// once per [`SHARD_CHECK`] over all workers. The rings that read a poisoned shard
    /// fail at their next copy from it; nothing else changes.
    fn check_shards(&self) {
        let Ok(mut checked) = self.shards_checked.try_lock() else {
            return; // another worker is checking
        };
        if checked.0.elapsed() < SHARD_CHECK {
            return;
        }
        let t0 = Instant::now();
        let all: Vec<&std::sync::Arc<crate::corpus::Shard>> =
            self.source.shards.iter().flatten().collect();
        let mut at = checked.1;
        for _ in 0..all.len() {
            at = (at + 1) % all.len();
            let shard = all[at];
            if shard.poisoned().is_none() {
                if let Some(why) = shard.changed() {
                    error!("{why}; the shard is poisoned: rings that read it stop with ERROR materialize");
                    shard.poison(why);
                }
            }
            if t0.elapsed() > SHARD_CHECK_BUDGET {
                break;
            }
        }
        *checked = (Instant::now(), at);
    }

    /// Poisons the shard whose mapping holds `addr`, where a guarded read faulted
    /// `during` something other than a slot copy, and says why.
    fn poison_at(&self, addr: usize, during: &str) -> String {
        let shard = self.source.shards.iter().flatten().find(|s| {
            s.mappings().iter().any(|m| {
                let a = m.as_ptr() as usize;
                (a..a + m.len()).contains(&addr)
            })
        });
        match shard {
            Some(s) => {
                let why = format!(
                    "{}: a read of its index faulted (SIGBUS) {during}: the file shrank \
                     under the daemon's mapping; the shard is poisoned until restart",
                    s.path().display()
                );
                s.poison(why.clone());
                why
            }
            None => format!("a guarded read faulted {during}"),
        }
    }

    /// Fails ring `key` after a guarded read faulted at `addr` outside a slot copy (in
    /// planning or page-cache hints): poisons the shard that holds `addr`.
    fn fail_on_fault(&self, st: &mut State, key: &(String, u32), step: u64, addr: usize) {
        let why = self.poison_at(addr, &format!("while planning step {step}"));
        if let Some(entry) = Self::find(st, &key.0, key.1) {
            error!(job = %key.0, dp_rank = key.1, "materialize: {why}; this ring stops");
            entry.failed = Some(why);
            for p in entry.peers.values() {
                p.kick.notify_one();
            }
        }
    }

    /// One materializer thread: claim a slot, fill it outside the lock, publish in order.
    pub fn worker(&self) {
        loop {
            self.check_shards();
            let (key, ring, job, generation) = {
                let mut st = self.lock();
                let claimed = loop {
                    if st.stopping {
                        return;
                    }
                    // Planning reads shard indexes: guarded like the copy.
                    let g = crate::corpus::guard::enter();
                    let _ = crate::corpus::guard::take_fault();
                    let c = self.claim(&mut st);
                    let fault = crate::corpus::guard::take_fault();
                    drop(g);
                    match (c, fault) {
                        (Some(c), None) => break c,
                        (Some((key, _, job, _)), Some(addr)) => {
                            if let Some(e) = Self::find(&mut st, &key.0, key.1) {
                                e.in_flight.remove(&job.step);
                            }
                            self.fail_on_fault(&mut st, &key, job.step, addr);
                            continue;
                        }
                        (None, _) => {}
                    }
                    st = self.work.wait(st).unwrap_or_else(|p| p.into_inner());
                };
                claimed
            };
            // `claim` handed this step to this worker alone (it is in `in_flight` until we
            // return), and the step is at least `slots` ahead of nothing a peer still
            // holds (next_fill < base + slots); the ring refuses a second writer anyway.
            let t0 = Instant::now();
            let result = ring
                .claim(job.step)
                .and_then(|mut slot| fill_slot(&mut slot, ring.layout(), &job, &self.source));
            let mut per_domain = vec![0u64; self.source.shards.len()];
            for row in &job.rows {
                if let Some(t) = per_domain.get_mut(row.domain as usize) {
                    *t += row.tokens as u64;
                }
            }
            metrics::histogram!("millrace_materialize_seconds").record(t0.elapsed().as_secs_f64());
            if let Ok(real) = result {
                let positions = job.rows.len() as u64 * (ring.layout().seq_len as u64 + 1);
                let cap = ring.layout().seq_len + 1;
                let mut f = self.fill.lock().unwrap_or_else(|p| p.into_inner());
                f.positions += positions;
                f.real += real;
                f.docs += job
                    .rows
                    .iter()
                    .map(|r| r.docs_started() as u64)
                    .sum::<u64>();
                f.cut += job
                    .rows
                    .iter()
                    .map(|r| r.truncated(cap) as u64)
                    .sum::<u64>();
            }
            let mut st = self.lock();
            let Some(entry) = Self::find(&mut st, &key.0, key.1) else {
                continue;
            };
            if !Arc::ptr_eq(&entry.ring, &ring) {
                continue; // the ring was replaced while we copied
            }
            entry.in_flight.remove(&job.step);
            if entry.generation != generation {
                // A live change replanned this step while we copied: the slot is free
                // for the fresh copy now.
                drop(st);
                self.work.notify_all();
                continue;
            }
            match result {
                Ok(_) => {
                    entry.filled.insert(job.step, (job.cursor, per_domain));
                    let before = entry.published;
                    while let Some((cursor, dom)) = entry.filled.remove(&entry.published) {
                        let sums = &mut entry.stats.domain_tokens;
                        if sums.len() < dom.len() {
                            sums.resize(dom.len(), 0);
                        }
                        for (s, t) in sums.iter_mut().zip(&dom) {
                            *s += t;
                        }
                        // The step is filled and not yet visible: no worker holds it.
                        if let Err(e) = ring.stamp(entry.published) {
                            error!(job = %key.0, dp_rank = key.1, "{e}");
                        }
                        entry.published += 1;
                        let at = entry.published;
                        for p in entry.peers.values_mut() {
                            if let Some((s, b)) = p.expect.take_if(|(s, _)| *s == at) {
                                if b != cursor {
                                    let m = format!(
                                        "this client resumed at step {s} with a cursor its \
                                         peers' stream does not reach; peers of one dp rank \
                                         must resume from the same checkpoint"
                                    );
                                    warn!(job = %key.0, dp_rank = key.1, replica = %p.replica, "{m}");
                                    p.error = Some(m);
                                    p.kick.notify_one();
                                }
                            }
                        }
                        entry.cursors.push_back((at, cursor));
                    }
                    if entry.published != before {
                        ring.publish(entry.published);
                        for p in entry.peers.values() {
                            p.ready.signal();
                        }
                        entry.clocks(self.settings.slots, Instant::now());
                        let published = entry.published;
                        st.watermark = st.watermark.max(published);
                    }
                }
                Err(e) => {
                    error!(job = %key.0, dp_rank = key.1, "{e}; this ring stops");
                    entry.failed = Some(e.to_string());
                    for p in entry.peers.values() {
                        p.kick.notify_one();
                    }
                }
            }
        }
    }

    /// Picks a ring with a free slot, plans its next step if needed (issuing page-cache
    /// hints for it and a few beyond), and claims it. Called with the lock held.
    fn claim(&self, st: &mut State) -> Option<Claimed> {
        if st.draining {
            return None;
        }
        let slots = self.settings.slots;
        let prefetch = self.settings.prefetch as usize;
        // Serve the emptiest ring first (fewest steps filled or in flight ahead of what
        // its peers hold), and among equally empty rings the one claimed longest ago.
        // Without that tie-break free-running consumers keep their rings empty, and the
        // same few rings (first in the map's order) won every claim while the rest
        // starved: 25 vs 21,296 steps in 40 s over 16 ranks.
        let mut best: Option<(&String, u32, (u64, u64))> = None;
        for (name, job) in st.jobs.iter() {
            for (&r, e) in job.rings.iter() {
                let key = (e.next_fill - e.base(), e.stats.last_claim);
                if e.claimable(slots) && best.is_none_or(|(_, _, k)| key < k) {
                    best = Some((name, r, key));
                }
            }
        }
        let (name, r) = best.map(|(n, r, _)| (n.clone(), r))?;
        let dp_size = st.jobs.get(&name)?.dp_size;
        st.claims += 1;
        let clock = st.claims;
        let entry = Self::find(st, &name, r)?;
        entry.stats.last_claim = clock;
        while entry.planned.len() <= prefetch {
            let batch = entry.planner.next_batch();
            let rows = batch.rank_rows(r, dp_size).to_vec();
            if self.settings.hints {
                self.hint(&rows);
            }
            entry.planned.push_back(SlotJob {
                step: batch.step,
                plan_step: batch.plan_step,
                rows,
                cursor: entry.planner.cursor(),
            });
        }
        let job = entry.planned.pop_front()?;
        if job.step != entry.next_fill {
            warn!(job = %name, dp_rank = r, "planner at step {} but ring expects {}", job.step, entry.next_fill);
        }
        entry.next_fill = job.step + 1;
        entry.in_flight.insert(job.step);
        Some(((name, r), entry.ring.clone(), job, entry.generation))
    }

    /// Puts `plan` in force: every ring's planner is restored from the cursor at its
    /// published step under the new plan, and everything planned or copied beyond it is
    /// dropped and done again. All or nothing: a ring that cannot be restored leaves
    /// every ring as it was. Runs under the lock, so no step is published meanwhile.
    fn install(&self, st: &mut State, plan: Arc<Plan>) -> Result<(), String> {
        let mut fresh = Vec::new();
        for (name, job) in &st.jobs {
            for (&r, e) in &job.rings {
                let Some((step, blob)) = e.cursors.back() else {
                    return Err(format!("job {name:?} dp_rank {r} holds no cursor"));
                };
                let p = plan
                    .restore(blob)
                    .map_err(|e| format!("job {name:?} dp_rank {r} at step {step}: {e}"))?;
                fresh.push((name.clone(), r, p));
            }
        }
        for (name, r, p) in fresh {
            if let Some(e) = Self::find(st, &name, r) {
                e.regenerate(p);
            }
        }
        st.plan = plan;
        Ok(())
    }

    /// Applies a live mixture change, or refuses it as a whole with the old weights still
    /// in force. Counted per source either way.
    pub fn change(&self, req: &ChangeRequest) -> Result<Applied, ChangeError> {
        let mut st = self.lock();
        let r = self.change_locked(&mut st, req);
        match &r {
            Ok(_) => *st.reloads.entry(req.source).or_default() += 1,
            Err(_) => *st.failed_reloads.entry(req.source).or_default() += 1,
        }
        drop(st);
        self.work.notify_all();
        r
    }

    /// Counts a reload that failed before it reached the hub (a malformed file).
    pub fn reload_failed(&self, source: &'static str) {
        *self.lock().failed_reloads.entry(source).or_default() += 1;
    }

    fn change_locked(&self, st: &mut State, req: &ChangeRequest) -> Result<Applied, ChangeError> {
        if st.draining || st.stopping {
            // Nothing published after now could carry it: it would be lost on restart.
            return Err(ChangeError {
                code: Code::Busy,
                message: "the daemon is stopping; send the change to the next daemon".into(),
                first_changeable: None,
            });
        }
        let plan = st.plan.clone();
        let fc = st.first_changeable();
        let fc_p = plan.plan_step_of(fc);
        let (requested, d) = match &req.proposal {
            Proposal::Weights(_) => {
                let t = req.at_step.unwrap_or(fc);
                // A change far past anything published is a typo or an attack (one at
                // 2^64-1 was accepted before), and would sit in every blob meanwhile.
                let horizon = fc.saturating_add(MAX_STEP);
                if t > horizon {
                    return Err(ChangeError::invalid(format!(
                        "at_step {t} is more than {MAX_STEP} steps beyond the first \
                         changeable step {fc}"
                    )));
                }
                (t, plan.plan_step_of(t))
            }
            Proposal::Schedule { old, new } => match plan.points_difference(old, new) {
                Some(p) => (plan.trainer_step_of(p), p),
                None => {
                    return Ok(Applied {
                        requested_step: None,
                        applied_step: None,
                        moved: false,
                        message: "the schedule in force already matches; nothing changed".into(),
                    })
                }
            },
        };
        let (d, moved) = if d < fc_p {
            match req.late {
                Late::Refuse => {
                    return Err(ChangeError {
                        code: Code::Late,
                        message: format!(
                            "step {requested} may already have been received (steps below \
                             {fc} are published); the first step that can still change is \
                             {fc}"
                        ),
                        first_changeable: Some(fc),
                    })
                }
                Late::Next => (fc_p, true),
            }
        } else {
            (d, false)
        };
        let change: Change = match &req.proposal {
            Proposal::Weights(w) => plan
                .weights_change(d, w)
                .map_err(|e| ChangeError::invalid(e.to_string()))?,
            Proposal::Schedule { new, .. } => plan.schedule_change(d, new),
        };
        // The change drops the entries it supersedes (at its step or later), so repeated
        // or corrected changes never fill the journal; their count travels in blobs.
        let mut journal = plan.journal().to_vec();
        let dropped = journal::append(&mut journal, change);
        let kept = journal.len() - 1;
        let domains = plan.domain_names().len();
        if cursor::journal_bytes(&journal, domains) > self.journal_cap {
            return Err(ChangeError::invalid(format!(
                "the journal of live changes would outgrow the cursor blob ({} changes); \
                 write the mixture into the config and restart",
                journal.len()
            )));
        }
        let next = Arc::new(
            plan.with_history(journal, plan.superseded().saturating_add(dropped))
                .map_err(|e| ChangeError::invalid(e.to_string()))?,
        );
        self.install(st, next.clone()).map_err(|m| ChangeError {
            code: Code::Busy,
            message: format!("regenerating prefetched batches: {m}"),
            first_changeable: None,
        })?;
        st.sources.resize(kept, "cursor");
        st.sources.push(req.source);
        let applied = next.trainer_step_of(d);
        let message = if moved {
            format!("step {requested} was already published; applied from step {applied}, the first that could still change")
        } else {
            format!("applied from step {applied}")
        };
        info!(
            source = req.source,
            requested,
            applied,
            plan_step = d,
            "live mixture change: {message}"
        );
        Ok(Applied {
            requested_step: Some(requested),
            applied_step: Some(applied),
            moved,
            message,
        })
    }

    /// The journal as JOURNAL_ENTRY objects (docs/PROTOCOL.md).
    pub fn journal(&self) -> Vec<JournalEntry> {
        let st = self.lock();
        Self::journal_of(&st)
    }

    fn journal_of(st: &State) -> Vec<JournalEntry> {
        let names = st.plan.domain_names();
        st.plan
            .journal()
            .iter()
            .zip(st.sources.iter().chain(std::iter::repeat(&"cursor")))
            .map(|(c, src)| JournalEntry {
                at_step: st.plan.trainer_step_of(c.at),
                plan_step: c.at,
                source: src.to_string(),
                points: c
                    .points
                    .iter()
                    .map(|(step, w)| JournalPoint {
                        step: *step,
                        weights: names
                            .iter()
                            .map(|n| n.to_string())
                            .zip(w.iter().copied())
                            .collect(),
                    })
                    .collect(),
            })
            .collect()
    }

    /// Everything `status` reports that the hub knows (docs/PROTOCOL.md, STATUS); the
    /// daemon adds the process's own fields.
    pub fn status(&self) -> Status {
        let now = Instant::now();
        let (plan, mut out, best, delivered) = {
            let st = self.lock();
            let mut jobs: Vec<JobStatus> = Vec::new();
            let mut best: Option<Published> = st.retired.1.clone();
            let mut delivered: Vec<u64> = vec![0; st.plan.domain_names().len()];
            for (s, t) in delivered.iter_mut().zip(&st.retired.0) {
                *s += t;
            }
            let mut names: Vec<&String> = st.jobs.keys().collect();
            names.sort();
            for name in names {
                let job = &st.jobs[name];
                let mut ranks: Vec<&u32> = job.rings.keys().collect();
                ranks.sort();
                let rings: Vec<RingStatus> = ranks
                    .into_iter()
                    .map(|r| {
                        let e = &job.rings[r];
                        if let Some((step, c)) = e.cursors.back() {
                            if best.as_ref().is_none_or(|b| *step > b.0) {
                                best = Some((*step, c.clone(), e.planner.epochs()));
                            }
                        }
                        for (s, t) in delivered.iter_mut().zip(&e.stats.domain_tokens) {
                            *s += t;
                        }
                        let (consumer, producer) = e.stats.waits(now);
                        let released = e
                            .peers
                            .values()
                            .map(|p| p.released)
                            .min()
                            .unwrap_or(e.published);
                        let mut peers: Vec<PeerStatus> = e
                            .peers
                            .values()
                            .map(|p| PeerStatus {
                                replica: p.replica.clone(),
                                pid: p.pid,
                                released_step: p.released,
                            })
                            .collect();
                        peers.sort_by(|a, b| a.replica.cmp(&b.replica));
                        RingStatus {
                            dp_rank: *r,
                            published_step: e.published,
                            released_step: released,
                            slots: self.settings.slots,
                            occupancy: e
                                .published
                                .saturating_sub(released)
                                .min(self.settings.slots as u64),
                            peers,
                            tokens_delivered: e.stats.batches_delivered * e.stats.tokens_per_step,
                            batches_delivered: e.stats.batches_delivered,
                            consumer_wait_s: consumer,
                            producer_wait_s: producer,
                        }
                    })
                    .collect();
                jobs.push(JobStatus {
                    job: name.clone(),
                    dp_size: job.dp_size,
                    rings,
                });
            }
            let by_source = |m: &BTreeMap<&'static str, u64>| -> BTreeMap<String, u64> {
                m.iter().map(|(k, v)| (k.to_string(), *v)).collect()
            };
            let out = Status {
                clients: st.clients as u64,
                ring_memory: RingMemory {
                    used_bytes: Self::ring_memory(&st),
                    budget_bytes: self.settings.ring_budget,
                },
                reloads: st.reloads.values().sum::<u64>(),
                failed_reloads: st.failed_reloads.values().sum::<u64>(),
                reloads_by_source: by_source(&st.reloads),
                failed_reloads_by_source: by_source(&st.failed_reloads),
                first_changeable_step: st.first_changeable(),
                journal: Self::journal_of(&st),
                journal_superseded: st.plan.superseded(),
                jobs,
                fingerprint: format!("{:032x}", st.plan.fingerprint()),
                ..Status::default()
            };
            (st.plan.clone(), out, best, delivered)
        };
        // Realized: the share of real tokens each domain got in every slot published so
        // far. Target: the token shares the schedule asks for at the most advanced
        // ring's step. Rows come from that ring's published cursor; epochs from its
        // planner (up to `prefetch_steps` ahead of it).
        let names = plan.domain_names();
        let (plan_step, rows, epochs) =
            match best.and_then(|(_, c, ep)| cursor::decode(&c).ok().map(|d| (d, ep))) {
                Some((d, ep)) => (d.plan_step, d.mix.rows, ep),
                None => (0, vec![0; names.len()], vec![0.0; names.len()]),
            };
        let total: u64 = delivered.iter().sum();
        let target = plan.schedule().shares(plan_step);
        let row_target = plan.mixer().row_shares(plan_step);
        let corpus = plan.domain_tokens();
        out.domains = names
            .iter()
            .enumerate()
            .map(|(d, n)| DomainStatus {
                name: n.to_string(),
                target_share: target.get(d).copied().unwrap_or(0.0),
                realized_share: if total > 0 {
                    delivered[d] as f64 / total as f64
                } else {
                    0.0
                },
                tokens: delivered[d],
                target_row_share: row_target.get(d).copied().unwrap_or(0.0),
                rows: rows.get(d).copied().unwrap_or(0),
                epochs: epochs.get(d).copied().unwrap_or(0.0),
                corpus_tokens: corpus.get(d).copied().unwrap_or(0),
            })
            .collect();
        let f = *self.fill.lock().unwrap_or_else(|p| p.into_inner());
        out.plan_step = plan_step;
        out.padding_fraction = if f.positions > 0 {
            1.0 - f.real as f64 / f.positions as f64
        } else {
            0.0
        };
        out.truncation_fraction = if f.docs > 0 {
            f.cut as f64 / f.docs as f64
        } else {
            0.0
        };
        // Shards that changed under the daemon: no ring reads them until a restart.
        out.poisoned_shards = self
            .source
            .shards
            .iter()
            .flatten()
            .filter_map(|s| {
                let why = s.poisoned()?;
                Some(PoisonedShard {
                    shard: s.path().display().to_string(),
                    reason: why.to_string(),
                })
            })
            .collect();
        out
    }

    /// MADV_WILLNEED over exactly the token spans a planned step will copy.
    fn hint(&self, rows: &[crate::plan::Row]) {
        for row in rows {
            let Some(shards) = self.source.shards.get(row.domain as usize) else {
                continue;
            };
            for s in &row.segments {
                let Some(shard) = shards.get(s.shard as usize) else {
                    continue;
                };
                if let Ok(t) = shard.doc_tokens(s.doc) {
                    let b = t.as_bytes();
                    let size = t.dtype().size();
                    let a = (s.start as usize * size).min(b.len());
                    let e = (a + s.len as usize * size).min(b.len());
                    will_need(&b[a..e]);
                }
            }
        }
    }
}
