//! Admission: a HELLO checked against the plan and the job, a ring found or created for
//! it, and the peer joined; and the way out again (release, leave, drain).

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use tracing::{debug, info};

use super::{Admission, EventFd, Hub, Job, Peer, RingEntry, RingStats, State};
use crate::plan::journal::{self, Order};
use crate::plan::{cursor, Change, Plan};
use crate::serve::ring::{Layout, Ring};
use crate::wire::protocol::{Code, Hello, Refusal, Welcome};

impl Hub {
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
}
