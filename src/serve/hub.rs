//! The daemon's shared state: jobs, one ring per (job, dp rank), the peers reading each
//! ring, and the materializer threads that plan, prefetch and fill slots.
//!
//! Everything mutable sits behind one mutex that is held only for bookkeeping and for
//! planning a step (a millisecond at most); copying tokens into a slot happens outside
//! it, on a worker that has claimed the slot. A ring advances when its own peers release
//! slots, so a slow rank stalls nobody else.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use tracing::{debug, error, info, warn};

use super::protocol::{Hello, Refusal};
use super::ring::{
    fill_slot, random_access, stamp, will_need, Layout, Ring, SlotJob, Source, TokenType,
};
use crate::plan::{Plan, Planner};

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
}

/// An eventfd the daemon writes to when a slot is published.
pub struct EventFd(OwnedFd);

impl EventFd {
    fn new() -> std::io::Result<EventFd> {
        // SAFETY: plain syscall; the result is checked and owned.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a fresh fd nobody else owns.
        Ok(EventFd(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    fn signal(&self) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a live buffer; EAGAIN (counter saturated) means the
        // client already has a wake-up pending, so errors are ignored.
        unsafe { libc::write(self.0.as_raw_fd(), one.as_ptr() as *const libc::c_void, 8) };
    }

    /// The descriptor to pass to the client.
    pub fn fd(&self) -> &OwnedFd {
        &self.0
    }
}

/// What a successful HELLO gets: the reply, the fds to pass, and the peer's handle.
pub struct Admission {
    /// Identifies the peer in later calls.
    pub peer: u64,
    /// WELCOME JSON.
    pub welcome: serde_json::Value,
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
    filled: BTreeMap<u64, Vec<u8>>,
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
        self.failed.is_none() && self.started() && !self.peers.is_empty() && self.free(slots) > 0
    }
}

struct Job {
    dp_size: u32,
    rings: HashMap<u32, RingEntry>,
}

struct State {
    jobs: HashMap<String, Job>,
    next_peer: u64,
    clients: usize,
    stopping: bool,
}

/// Shared by the accept loop, every connection and every materializer thread.
pub struct Hub {
    plan: Arc<Plan>,
    source: Source,
    settings: HubSettings,
    cursor_cap: usize,
    state: Mutex<State>,
    work: Condvar,
}

impl Hub {
    /// A hub over a built plan and its mapped shards; hints the shards for random access.
    pub fn new(plan: Arc<Plan>, source: Source, settings: HubSettings) -> Hub {
        if settings.hints {
            for shard in source.shards.iter().flatten() {
                random_access(shard.data());
            }
        }
        let domains = plan.domain_names().len();
        let reseeds = plan.config().reseed.len();
        let cursor_cap = 1024 + domains * (512 + 32 * reseeds);
        Hub {
            plan,
            source,
            settings,
            cursor_cap,
            state: Mutex::new(State {
                jobs: HashMap::new(),
                next_peer: 1,
                clients: 0,
                stopping: false,
            }),
            work: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A worker that panicked mid-update would be a bug; keep serving the rest.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Admits a client: checks its HELLO against the plan and the job, then joins it to
    /// its dp rank's ring (creating the ring at the client's step if none is live).
    /// Restoring or seeking a planner can take a while, so it happens before the lock.
    pub fn admit(&self, hello: &Hello, pid: Option<i32>) -> Result<Admission, Refusal> {
        let cfg = self.plan.config();
        let g = cfg.global_batch_rows;
        if g % hello.dp_size != 0 {
            return Err(Refusal::new(
                "dp_size",
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
                "layout",
                format!(
                    "micro_batch_rows {mbr} x micro_batches {} != {rows} rows per dp rank \
                     (global_batch_rows {g} / dp_size {})",
                    hello.micro_batches, hello.dp_size
                ),
            ));
        }
        let fp = format!("{:032x}", self.plan.fingerprint());
        if let Some(want) = &hello.fingerprint {
            if !want.eq_ignore_ascii_case(&fp) {
                return Err(Refusal::new(
                    "fingerprint",
                    format!("client expects plan fingerprint {want}, this daemon serves {fp}"),
                ));
            }
        }
        let blob = hello.cursor_bytes()?;
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
                Some(b) => self
                    .plan
                    .restore(b)
                    .map_err(|e| Refusal::new("cursor", format!("cursor blob refused: {e}")))?,
                None => self.plan.seek(hello.start_step.unwrap_or(0)),
            })
        };
        let ready =
            Arc::new(EventFd::new().map_err(|e| Refusal::new("busy", format!("eventfd: {e}")))?);
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
        if st.stopping {
            return Err(Refusal::new("busy", "the daemon is shutting down"));
        }
        if st.clients >= self.settings.max_clients {
            return Err(Refusal::new(
                "busy",
                format!(
                    "the daemon serves its limit of {} clients",
                    self.settings.max_clients
                ),
            ));
        }
        let peer_id = st.next_peer;
        st.next_peer += 1;
        let job = st.jobs.entry(hello.job.clone()).or_insert_with(|| Job {
            dp_size: hello.dp_size,
            rings: HashMap::new(),
        });
        if job.dp_size != hello.dp_size {
            return Err(Refusal::new(
                "dp_size",
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
                            "duplicate",
                            format!(
                                "job {:?} dp_rank {} replica {:?} is already connected",
                                hello.job, hello.dp_rank, hello.replica
                            ),
                        ));
                    }
                    if entry.micro != (mbr, hello.micro_batches) || entry.replicas != hello.replicas
                    {
                        break 'join Err(Refusal::new(
                            "layout",
                            format!(
                                "peers of dp_rank {} use micro_batch_rows {} x micro_batches {} with \
                                 replicas {}; this client asks {mbr} x {} with replicas {}",
                                hello.dp_rank,
                                entry.micro.0,
                                entry.micro.1,
                                entry.replicas,
                                hello.micro_batches,
                                hello.replicas
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
                                "busy",
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
                            Some((_, c)) if step >= lo && blob.as_ref().map_or(true, |b| b == c) => {}
                            _ => {
                                break 'join Err(Refusal::new(
                                    "peer_position",
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
                    entry.joined += 1;
                    entry.peers.insert(peer_id, new_peer(step, expect));
                    Ok((step, entry.ring.clone()))
                }
                None => {
                    let Some(planner) = planner else {
                        // The ring we saw vanished while we waited for the lock: its peers
                        // left. Ask the client to retry rather than seek under the lock.
                        break 'join Err(Refusal::new(
                            "busy",
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
                    let r = Ring::create(&format!("{}:{}", hello.job, hello.dp_rank), layout, step)
                        .map_err(|e| Refusal::new("busy", e.to_string()))?;
                    let r = Arc::new(r);
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
                        },
                    );
                    info!(job = %hello.job, dp_rank = hello.dp_rank, step, bytes = r.layout().ring_bytes, "ring created");
                    Ok((step, r))
                }
            }
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
        let layout = ring.layout();
        let welcome = serde_json::json!({
            "protocol": super::protocol::VERSION,
            "fingerprint": fp,
            "start_step": start_step,
            "dp_rank": hello.dp_rank,
            "dp_size": hello.dp_size,
            "rows": rows,
            "seq_len": cfg.seq_len,
            "micro_batch_rows": mbr,
            "micro_batches": hello.micro_batches,
            "token_dtype": layout.token.0.name(),
            "pad_token": cfg.pad_token,
            "eod_token": cfg.eod_token,
            "domains": self.plan.domain_names(),
            "slots": layout.slots,
            "slot_offset": super::ring::RING_HEADER,
            "slot_bytes": layout.slot_bytes,
            "ring_bytes": layout.ring_bytes,
            "fields": layout.fields_json(),
        });
        Ok(Admission {
            peer: peer_id,
            welcome,
            ring,
            ready,
            kick,
        })
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
        while entry.cursors.len() > 1 && entry.cursors.front().is_some_and(|(s, _)| *s < base) {
            entry.cursors.pop_front();
        }
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
            j.rings.remove(&dp_rank);
            if j.rings.is_empty() {
                st.jobs.remove(job);
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

    /// Stops the workers; new HELLOs are refused.
    pub fn stop(&self) {
        self.lock().stopping = true;
        self.work.notify_all();
    }

    /// One materializer thread: claim a slot, fill it outside the lock, publish in order.
    pub fn worker(&self) {
        loop {
            let (key, ring, job) = {
                let mut st = self.lock();
                let claimed = loop {
                    if st.stopping {
                        return;
                    }
                    if let Some(c) = self.claim(&mut st) {
                        break c;
                    }
                    st = self.work.wait(st).unwrap_or_else(|p| p.into_inner());
                };
                claimed
            };
            // SAFETY: `claim` handed this step to this worker alone, and the step is at
            // least `slots` ahead of nothing a peer still holds (next_fill < base + slots).
            let slot = unsafe { ring.slot_mut(job.step) };
            let result = fill_slot(slot, ring.layout(), &job, &self.source);
            let mut st = self.lock();
            let Some(entry) = Self::find(&mut st, &key.0, key.1) else {
                continue;
            };
            if !Arc::ptr_eq(&entry.ring, &ring) {
                continue; // the ring was replaced while we copied
            }
            match result {
                Ok(_) => {
                    entry.filled.insert(job.step, job.cursor);
                    let before = entry.published;
                    while let Some(cursor) = entry.filled.remove(&entry.published) {
                        // SAFETY: the step is filled and not yet visible; only this
                        // thread (holding the lock) touches it now.
                        stamp(unsafe { ring.slot_mut(entry.published) });
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
    fn claim(&self, st: &mut State) -> Option<((String, u32), Arc<Ring>, SlotJob)> {
        let slots = self.settings.slots;
        let prefetch = self.settings.prefetch as usize;
        // Serve the ring that is furthest behind first: fair across ranks.
        let mut best: Option<(&String, u32, u64)> = None;
        for (name, job) in st.jobs.iter() {
            for (&r, e) in job.rings.iter() {
                if e.claimable(slots) && best.map_or(true, |(_, _, s)| e.next_fill - e.base() < s) {
                    best = Some((name, r, e.next_fill - e.base()));
                }
            }
        }
        let (name, r) = best.map(|(n, r, _)| (n.clone(), r))?;
        let dp_size = st.jobs.get(&name)?.dp_size;
        let entry = Self::find(st, &name, r)?;
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
        Some(((name, r), entry.ring.clone(), job))
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
