//! The daemon's shared state: jobs, one ring per (job, dp rank), the peers reading each
//! ring, and the materializer threads that plan, prefetch and fill slots. Each global
//! batch is planned once per job and its rows handed to every dp rank's ring
//! (`jobplan`).
//!
//! Everything mutable sits behind one mutex that is held only for bookkeeping and for
//! planning a step (a millisecond at most); copying tokens into a slot happens outside
//! it, on a worker that has claimed the slot; a ring or job taken out under it is dropped
//! after it ([`Freed`]). A ring advances when its own peers release slots, so a slow rank
//! stalls nobody else.
//!
//! This file holds that state (the hub, its jobs, rings and peers); the rooms around it
//! act on it: `phase` (a ring's lifecycle), `admission` (HELLO to joined peer), `join`
//! (a client against a rank's live ring), `peers`
//! (release, failure, leave, drain), `schedule` (the workers that copy),
//! `jobplan` (one planner per job, and the thread that plans ahead), `keeper` (plan checkpoints written as the daemon
//! serves), `live` (mixture changes) and `status` (what STATUS reports).

mod admission;
mod ahead;
mod jobplan;
mod join;
mod keeper;
mod live;
mod peers;
mod phase;
mod publish;
mod schedule;
mod seeks;
mod shape;
mod status;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tracing::warn;

use super::fill::{SlotJob, Source};
use super::ring::{Ring, TokenType};
use crate::plan::{cursor, Plan, Planner};
use crate::wire::protocol::Welcome;
use crate::wire::status::{JobPlanCounts, RingStatus};
use jobplan::{JobPlan, Own, Planned};
use keeper::Keeper;

pub use admission::PeerCred;
pub use live::{Applied, ChangeError, ChangeRequest, Late, Proposal};
pub use peers::ReleaseError;
pub use phase::Failure;
use phase::{Phase, Standing};
pub use seeks::{NotAdmitted, SeekFlights, SeekPhase, SeekTicket};

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
    /// Most bytes all rings together may take (`[serve] ring_memory_bytes`): a job whose
    /// ring would pass it is refused with `memory`.
    pub ring_budget: u64,
    /// Tokens per dp rank per step every ring's slots have room for at least (`[serve]
    /// stage_reserve_tokens`), so a stage added live fits rings already streaming.
    pub stage_reserve: u64,
    /// Cache root for plan checkpoints (`crate::plan_cache`), so a client's
    /// `start_step` seek starts from the nearest one, and where the job planners leave
    /// one every [`Plan::checkpoint_every`] plan steps as they serve; `None`: seeks
    /// replay from step 0.
    pub checkpoints: Option<std::path::PathBuf>,
    /// How long a publish may hold back its ring's wake (`[serve] wake_coalesce_us`), so
    /// that one wake-up finds two slots ready; zero: every publish wakes at once.
    pub wake_coalesce: Duration,
    /// One-point live changes every blob has room for at any number of domains (`[serve]
    /// live_changes`): sizes the journal's share of the cursor field.
    pub live_changes: usize,
    /// How long a fill, a seek or a read under the hub's lock may take before the
    /// watchdog names it (`[serve] stuck_fill_seconds`).
    pub stuck_fill: Duration,
}

pub use crate::sys::{EventFd, ReleasePage};

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
    /// The memfd of the peer's release page, when its HELLO asked for one (WELCOME's
    /// third fd; closed once sent, the daemon keeps its mapping).
    pub page_fd: Option<std::os::fd::OwnedFd>,
}

/// A client joined to a ring.
struct Peer {
    replica: String,
    released: u64,
    ready: Arc<EventFd>,
    kick: Arc<tokio::sync::Notify>,
    pid: Option<i32>,
    /// Where it stands against its ring's stream.
    standing: Standing,
    /// The blob it resumed from, if any.
    blob: Option<Vec<u8>>,
    /// Whether it reads each slot by its header (HELLO `stages`), so a stage added
    /// live may reach it.
    stages: bool,
    /// Where it publishes `released` instead of sending RELEASE frames, if it asked.
    page: Option<Arc<ReleasePage>>,
}

/// What a cursor blob records that `status` reports, kept beside the blob when it is
/// made so that nothing decodes a blob to report it.
#[derive(Debug, Clone)]
struct Mark {
    /// The next plan step.
    plan_step: u64,
    /// Rows given to each domain so far.
    rows: Vec<u64>,
}

impl Mark {
    /// The mark of `planner`'s cursor now, for a planner just sought or restored (the
    /// workers take theirs from the batch they planned).
    fn of(planner: &Planner) -> Mark {
        Mark {
            plan_step: planner.plan_step(),
            rows: planner.mix_state().rows.clone(),
        }
    }
}

/// A cursor a ring holds: the blob for "every step before `step` was delivered".
struct Cursor {
    step: u64,
    blob: Vec<u8>,
    mark: Mark,
}

/// A step copied but not yet published (a later slot finished first).
struct Filled {
    /// The cursor after the step.
    blob: Vec<u8>,
    mark: Mark,
    /// Real tokens per domain in the step.
    tokens: Vec<u64>,
}

/// One (job, dp rank)'s ring and its peers; [`Phase`] says where it is in its life.
/// It reads its job's planned batches, or plans its own while it is outside the job's
/// window (`jobplan`).
struct RingEntry {
    ring: Arc<Ring>,
    /// Its private planner, while it does not read the job's batches.
    own: Option<Own>,
    /// Steps below this had page-cache hints issued for this rank's rows.
    hinted: u64,
    /// The batch of step `next_fill - 1`, when a worker took it since the ring last
    /// started over: its blob is the cursor at `next_fill`.
    taken: Option<Arc<Planned>>,
    /// Next step to hand to a worker.
    next_fill: u64,
    /// Filled but not yet published, by step.
    filled: BTreeMap<u64, Filled>,
    /// Every step below this is visible to clients.
    published: u64,
    /// Cursor at the start of each step in [oldest held, published].
    cursors: VecDeque<Cursor>,
    peers: HashMap<u64, Peer>,
    replicas: u32,
    /// The replicas that ever joined, by name: one that leaves is not taken back, and
    /// one that reconnects counts once, so the ring holds its start until every
    /// announced peer joined ([`RingEntry::all_joined`]).
    joined: HashSet<String>,
    /// The step the ring starts at (moves back while peers are still joining).
    start: u64,
    micro: (u32, u32),
    /// Created from a blob: it joins its announced peers before it streams.
    resumed: bool,
    phase: Phase,
    /// Steps a worker is copying now under the plan in force (stale copies of a
    /// replaced plan are in [`Phase::Regenerating`]).
    in_flight: BTreeSet<u64>,
    /// Bumped when a live change regenerates the ring; copies of older generations are
    /// dropped when they finish.
    generation: u64,
    /// Since when a publish has held back the wake of this ring's peers (coalesced
    /// wakes, `schedule`): sent with the ring's next publish, when the ring cannot be
    /// filled further, before a worker sleeps, or once older than `wake_coalesce`.
    wake_deferred: Option<Instant>,
    /// Publishes whose wake is held back now (0 with no held wake).
    wakes_held: u32,
    /// Counters and clocks for status and metrics.
    stats: RingStats,
}

/// A number no other ring (or job) of this process had: the exporter tells a ring made
/// again under the same job and rank from the one before by it (`RingStatus::serial`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Serial(u64);

impl Default for Serial {
    fn default() -> Serial {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        Serial(NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
    }
}

/// What `status` and the metrics report about one ring.
#[derive(Default)]
struct RingStats {
    /// This ring's own number (a ring made again under its labels gets another).
    serial: Serial,
    batches_delivered: u64,
    /// Token positions (`rows x seq_len` of each step's own stage) of the steps delivered.
    tokens_delivered: u64,
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
    /// RELEASE frames its peers sent (for a peer with a release page, each one a wake-up).
    release_frames: u64,
    /// Releases the daemon read from its peers' release pages.
    page_releases: u64,
    /// Eventfd signals sent to its peers for published slots (one per peer per wake).
    wakes: u64,
    /// Publishes whose wake was held back to be sent with a later one.
    wakes_deferred: u64,
}

impl RingStats {
    fn settle(since: &mut Option<Instant>, total: &mut Duration, now: Instant) {
        if let Some(t) = since.take() {
            *total += now.saturating_duration_since(t);
        }
    }

    /// Opens clock `since` when its condition `on` starts, and adds the time to `total`
    /// when it ends.
    fn track(on: bool, since: &mut Option<Instant>, total: &mut Duration, now: Instant) {
        match (on, since.is_some()) {
            (true, false) => *since = Some(now),
            (false, true) => RingStats::settle(since, total, now),
            _ => {}
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

/// A step handed to a worker.
struct Claimed {
    /// (job, dp rank).
    key: (String, u32),
    ring: Arc<Ring>,
    job: SlotJob,
    /// The mark of `job.cursor`.
    mark: Mark,
    /// The ring's generation when it was claimed.
    generation: u64,
}

struct Job {
    dp_size: u32,
    /// The uid of the client that created the job (SO_PEERCRED; `None` without
    /// credentials): every later client of the job must have the same.
    uid: Option<u32>,
    rings: HashMap<u32, RingEntry>,
    /// The job's planner and the batches it planned, read by every ring inside its
    /// window.
    plan: JobPlan,
    /// This job's own number (a job that returns under its name gets another).
    serial: Serial,
}

impl Job {
    fn new(dp_size: u32) -> Job {
        Job {
            dp_size,
            uid: None,
            rings: HashMap::new(),
            plan: JobPlan::default(),
            serial: Serial::default(),
        }
    }
}

struct State {
    /// The plan in force: the config's, with the journal of live changes.
    plan: Arc<Plan>,
    /// Where each journal entry came from, in journal order.
    sources: Vec<&'static str>,
    /// The config file's schedule as last applied (at start, or by an accepted reload):
    /// the points a live change may hide, which its reply names.
    file_points: Vec<crate::config::plan::SchedulePoint>,
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
    /// The plan thread runs ([`Hub::plan_ahead`]): workers leave planning ahead to it.
    plan_thread: bool,
    /// The plan thread sleeps on `plan_wake` (a worker that finds a window short wakes
    /// it; waking costs a syscall, so only then).
    plan_idle: bool,
    /// A worker is to wake the plan thread once it drops the lock.
    plan_kick: bool,
    /// A worker found its step not planned while the plan thread had the job's planner
    /// out, and waits on `work` for the thread to put it back.
    plan_waiters: bool,
    /// Checkouts of job planners by the plan thread so far: each one's number.
    plan_checkouts: u64,
    /// Bytes of the rings admissions are building off the lock now, per (job, dp rank),
    /// held against `ring_budget` so clients joining at once cannot allocate past it
    /// between them. One per rank: its other peers arriving meanwhile build none.
    ring_reserved: HashMap<(String, u32), u64>,
    /// Rings and jobs gone since the exporter last took them, with their last figures
    /// (`Hub::status_for_export`); `None` while no exporter takes them.
    departed: Option<Departed>,
}

/// The last figures of rings and jobs that went between two exports: without them a
/// ring's steps since the last sample were lost when it went, and a ring made and gone
/// between two samples was never counted.
#[derive(Default)]
struct Departed {
    rings: Vec<(String, RingStatus)>,
    jobs: Vec<(String, JobPlanCounts)>,
}

/// Most departures kept for one export: the exporter takes them every second, so only
/// a stalled exporter reaches it (then the oldest are counted and the rest are lost).
const DEPARTED_MAX: usize = 65_536;

impl Departed {
    /// Keeps the last figures of a ring that goes (its peers all left).
    fn ring(&mut self, job: &str, dp_rank: u32, e: &RingEntry) {
        if self.rings.len() < DEPARTED_MAX {
            let last = e.status(dp_rank, 0, Instant::now());
            self.rings.push((job.to_string(), last));
        }
    }

    /// Keeps the last figures of a job's planner as the job goes.
    fn job(&mut self, name: &str, job: &Job) {
        if self.jobs.len() < DEPARTED_MAX {
            self.jobs.push((name.to_string(), job.plan_counts()));
        }
    }
}

/// Rings and jobs taken out of the hub under its lock, to be dropped only after it: the
/// last `Arc<Ring>` unmaps and closes a memfd of up to hundreds of MB (6.8 ms at 34 MiB,
/// 26.5 ms at 132 MiB), which under the lock every other rank's claims, publishes and
/// RELEASE frames would wait for. Hold it in a variable declared before the guard (or
/// drop it after the guard is dropped).
#[derive(Default)]
#[must_use = "dropping it under the hub's lock frees ring memory there"]
struct Freed {
    /// Ring entries removed with their last peer (each holds its `Arc<Ring>`).
    entries: Vec<RingEntry>,
    /// Jobs removed with their last ring (their planners and planned windows).
    jobs: Vec<Job>,
    /// Loose references to rings that may be their last.
    rings: Vec<Arc<Ring>>,
}

impl Freed {
    /// Adds what `other` holds.
    fn extend(&mut self, other: Freed) {
        self.entries.extend(other.entries);
        self.jobs.extend(other.jobs);
        self.rings.extend(other.rings);
    }
}

/// A ring's last published cursor for `status`: its step, its mark, the planner's epochs.
type Published = (u64, Mark, Vec<f64>);

impl State {
    /// A daemon's state before any client: `plan` in force, no jobs.
    fn new(plan: Arc<Plan>) -> State {
        State {
            file_points: plan.config().points(),
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
            plan_thread: false,
            plan_idle: false,
            plan_kick: false,
            plan_waiters: false,
            plan_checkouts: 0,
            ring_reserved: HashMap::new(),
            departed: None,
        }
    }

    /// The first trainer step a change may still shape: past every published step, and
    /// past the step of every peer that waits ahead of its ring (it trained on the steps
    /// before it, in a run before a restart).
    fn first_changeable(&self) -> u64 {
        let live = self
            .jobs
            .values()
            .flat_map(|j| j.rings.values())
            .map(|e| e.published.max(e.ahead_step()))
            .max()
            .unwrap_or(0);
        live.max(self.watermark)
    }
}

/// The journal's share of the cursor field, before the part that grows with the domains.
const JOURNAL_BYTES: usize = 16384;
/// Stages added live (`ctl set-stage`) the journal has room for at any domain count.
const LIVE_STAGES: usize = 4;

/// The bytes of the cursor field that `journal` takes in every blob of `plan` (under
/// any journal): its encoding, and for each stage added live a carry record per domain
/// (a switch the config did not count). At most a hub's `journal_cap`.
fn journal_room(plan: &Plan, journal: &[crate::plan::Change]) -> usize {
    let live_stages = journal.iter().filter(|c| c.stage.is_some()).count();
    let carry = match live_stages {
        0 => 0,
        n => n * plan.carry_bound(&plan.stages_with(journal)),
    };
    cursor::journal_bytes(journal, plan.domain_names().len()) + carry
}

/// The journal's share of the cursor field: room for `live_changes` one-point changes
/// and [`LIVE_STAGES`] stages' carry records, at any number of domains (with a fixed
/// 16 KiB, 400 domains had room for 5 `set-weights` and no stage).
fn journal_cap(plan: &Plan, live_changes: usize) -> usize {
    JOURNAL_BYTES
        + live_changes * cursor::one_point_change_bytes(plan.domain_names().len())
        + plan.carry_bound(plan.stages()) * LIVE_STAGES
}

/// Shared by the accept loop, every connection and every materializer thread.
pub struct Hub {
    source: Source,
    settings: HubSettings,
    cursor_cap: usize,
    /// Bytes of the cursor field for everything but the journal ([`Plan::cursor_bound`]).
    stream_cap: usize,
    /// Bytes of the cursor field left for the journal.
    journal_cap: usize,

    state: Mutex<State>,
    work: Condvar,
    /// The plan thread waits here ([`Hub::plan_ahead`]).
    plan_wake: Condvar,
    /// Real and padded token positions copied, and documents started and cut, for the
    /// padding and truncation fractions.
    fill: Mutex<FillStats>,
    /// Writes the job planners' checkpoints, off the copy path.
    keeper: Keeper,
    /// When the shards were last stat'ed for in-place changes ([`SHARD_CHECK`]), and the
    /// shard the next pass starts at.
    shards_checked: Mutex<(Instant, usize)>,
    /// The fills in flight, for the stuck-fill watchdog ([`Hub::watch_fills`]).
    fills: crate::serve::fill::FillWatch,
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
        source.readers.advise_access(&source.shards);
        if source.readers.huge_pages() {
            source.readers.advise_huge(&source.shards);
        }
        // Room for `[serve] live_changes` one-point changes and a few stages at any number
        // of domains; a change that would not fit is refused (write the mixture into the
        // config and restart instead).
        let journal_cap = journal_cap(&plan, settings.live_changes);
        // The streams' share is the plan's bound at its stages; a live stage whose
        // spanning groups would need more is refused (`Hub::cursor_room`).
        let stream_cap = plan.cursor_bound(plan.stages());
        let cursor_cap = stream_cap + journal_cap;
        let keeper = Keeper::start(settings.checkpoints.clone());
        Hub {
            source,
            settings,
            cursor_cap,
            stream_cap,
            journal_cap,
            state: Mutex::new(State::new(plan)),
            work: Condvar::new(),
            plan_wake: Condvar::new(),
            fill: Mutex::new(FillStats::default()),
            keeper,
            shards_checked: Mutex::new((Instant::now(), 0)),
            fills: Default::default(),
        }
    }

    /// Each shard's domain name and dtype, in plan order: what a reload's `[serve]` is
    /// judged with (`token_dtype`, the ring budget), as the start judged its own.
    pub fn shard_dtypes(&self) -> Vec<(String, crate::corpus::DType)> {
        let plan = self.plan();
        (plan.domain_names().iter().zip(&self.source.shards))
            .flat_map(|(n, shards)| shards.iter().map(move |s| (n.to_string(), s.dtype())))
            .collect()
    }

    /// The plan in force now.
    pub fn plan(&self) -> Arc<Plan> {
        self.lock().plan.clone()
    }

    /// The longest HELLO or CONTROL frame a connection may send: room for the largest
    /// cursor blob this hub writes, as hex ([`crate::wire::request_limit`]).
    pub fn request_limit(&self) -> usize {
        crate::wire::request_limit(self.cursor_cap)
    }

    /// Whether every blob of `plan` under `journal` fits the slots' cursor field: the
    /// journal within its share, and the streams within theirs (a live stage of more
    /// rows lets more batch-grouped groups span batches than the field was sized for).
    fn cursor_room(&self, plan: &Plan, journal: &[crate::plan::Change]) -> Result<(), String> {
        if journal_room(plan, journal) > self.journal_cap {
            return Err(format!(
                "the journal of live changes would outgrow the cursor blob ({} changes, \
                 room for {} bytes); restart with a larger [serve] live_changes (now {}), or \
                 with the mixture written into the config",
                journal.len(),
                self.journal_cap,
                self.settings.live_changes
            ));
        }
        let streams = plan.cursor_bound(&plan.stages_with(journal));
        if streams > self.stream_cap {
            return Err(format!(
                "its stages let batch-grouped groups span more batches at once than the \
                 cursor field was sized for at start ({streams} bytes of stream state, \
                 room for {}); put the stage into the config's [[plan.stage]] and restart",
                self.stream_cap
            ));
        }
        Ok(())
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A worker that panicked mid-update would be a bug; keep serving the rest.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Bytes of every live ring together, checked against `ring_budget`.
    fn ring_memory(st: &State) -> u64 {
        st.jobs
            .values()
            .flat_map(|j| j.rings.values())
            .map(|e| e.ring.layout().ring_bytes)
            .sum()
    }

    /// [`Hub::ring_memory`] with the rings being built for ranks other than `key`'s
    /// that have none live yet (a rank has one ring, whichever of its peers'
    /// admissions makes it; a built one whose rank got its ring meanwhile is dropped).
    fn ring_memory_besides(st: &State, key: &(String, u32)) -> u64 {
        let live = |(job, rank): &(String, u32)| {
            (st.jobs.get(job)).is_some_and(|j| j.rings.contains_key(rank))
        };
        let building: u64 = (st.ring_reserved.iter())
            .filter(|(k, _)| *k != key && !live(k))
            .map(|(_, b)| b)
            .sum();
        Self::ring_memory(st).saturating_add(building)
    }

    fn find<'a>(st: &'a mut State, job: &str, dp_rank: u32) -> Option<&'a mut RingEntry> {
        st.jobs.get_mut(job)?.rings.get_mut(&dp_rank)
    }
}
