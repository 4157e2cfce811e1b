//! Admission: a HELLO becomes a joined peer in named steps. The HELLO is checked against
//! the plan ([`Shape`]); a blob is resumed (decoded, its journal compared, its planner
//! restored) or the start step sought, off the lock; then under the lock the rank's ring
//! is joined ([`Joiner::join`]) or created, a blob's live changes are adopted, and the
//! client gets its WELCOME.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use tracing::{info, warn};

use super::join::{Joined, Joiner};
use super::seeks::{NotAdmitted, NotSought, SeekFlights, SeekTicket};
use super::shape::{refuse_cursor, served_live, stale_ranks, Shape};
use super::{Admission, EventFd, Freed, Hub, Job, ReleasePage, RingEntry, Standing, State};
use crate::config::plan::MAX_STEP;
use crate::plan::journal;
use crate::plan::{Plan, Planner, Resumed};
use crate::serve::fill::Doing;
use crate::serve::limits::UidShare;
use crate::serve::ring::{Layout, Ring};
use crate::wire::protocol::{Code, Hello, Refusal, SlotLayout, StageSpec, Welcome};

/// A client as admission sees it: who it is (SO_PEERCRED) and what its uid may do.
#[derive(Debug, Clone, Default)]
pub struct PeerCred {
    /// Its pid, for the logs.
    pub pid: Option<i32>,
    /// Its uid: a job belongs to the uid of its first client.
    pub uid: Option<u32>,
    /// The share of the daemon's caps its uid is held to, if any.
    pub share: Option<UidShare>,
    /// Why its uid may not change the plan (`[serve] control_uids`), if it may not. The
    /// live changes a cursor blob brings in change the plan every job reads, and a blob
    /// proves nothing about who made them, so such a client's blob may not bring any.
    pub no_control: Option<crate::serve::access::Denied>,
}

impl Hub {
    /// Admits a client (its pid and uid from SO_PEERCRED, and the share of the caps its
    /// uid is held to, if any): checks its HELLO against the plan and the job (its
    /// dp_size, the uid that created it), then joins it to its dp rank's ring (creating
    /// the ring at the client's step if none is live).
    /// Restoring or seeking a planner can take a while, so it happens before the lock; a
    /// live change landing meanwhile makes the attempt start over.
    ///
    /// `cancel` is set by the connection when its client hangs up: a seek in progress
    /// then stops at its next chunk and the attempt is refused with `cancelled`.
    ///
    /// `seek` is the seek this admission needs ([`Hub::seek_ticket`]), shared with the
    /// other admissions of its plan and step, and whether it holds a seek slot to run
    /// it in; when the seek is not in its hands it answers [`NotAdmitted::Wait`].
    /// Without one, a client that turns out to
    /// need a seek past step 0 (its rank's ring went away meanwhile) is refused `busy`,
    /// to retry for a seek slot.
    pub fn admit(
        &self,
        hello: &Hello,
        peer: PeerCred,
        cancel: &AtomicBool,
        seek: Option<(&SeekTicket, bool)>,
    ) -> Result<Admission, NotAdmitted> {
        // Seeking or restoring a planner reads shard indexes: guarded like the copy.
        // Seeks replay domains on rayon's threads: their faults count too.
        let guard = crate::corpus::guard::enter();
        let _ = crate::corpus::guard::take_fault();
        let mark = crate::corpus::guard::zeroed_pages();
        let r = self.admit_unguarded(hello, &peer, cancel, seek);
        let fault = self.planning_fault(mark);
        drop(guard);
        match fault {
            None => r,
            Some(addr) => {
                let why = self.poison_at(addr, "while planning this client's start");
                if let Ok(a) = r {
                    self.leave(&hello.job, hello.dp_rank, a.peer);
                }
                Err(Refusal::new(Code::Materialize, why).into())
            }
        }
    }

    fn admit_unguarded(
        &self,
        hello: &Hello,
        peer: &PeerCred,
        cancel: &AtomicBool,
        seek: Option<(&SeekTicket, bool)>,
    ) -> Result<Admission, NotAdmitted> {
        for _ in 0..8 {
            if let Some(a) = self.try_admit(hello, peer, cancel, seek)? {
                return Ok(a);
            }
        }
        Err(Refusal::new(
            Code::Busy,
            "the mixture kept changing while this client joined; retry",
        )
        .into())
    }

    /// One admission attempt; `Ok(None)` when the plan changed under it. The steps: check
    /// the HELLO against the plan, restore the blob's resume point (or seek the start
    /// step), then under the lock join the rank's ring or create it, adopt the blob's
    /// live changes, and welcome the client.
    fn try_admit(
        &self,
        hello: &Hello,
        peer: &PeerCred,
        cancel: &AtomicBool,
        seek: Option<(&SeekTicket, bool)>,
    ) -> Result<Option<Admission>, NotAdmitted> {
        let (pid, uid, share) = (peer.pid, peer.uid, peer.share);
        let seen = self.plan();
        let mut shape = Shape::check(&seen, hello)?;
        let blob = hello.cursor_bytes()?;
        // An index that shrank under the daemon reads as zeros wherever its pages were
        // lost: a start planned over it could plan from them, or spin over a domain whose
        // every document now reads empty. Rings already streaming go on (those that read
        // it have stopped); a new start waits for a restart with the shard replaced. (A
        // shard poisoned otherwise, by the validation, a rewrite in place or a shrunk
        // `.bin`, keeps its index: only the rings that read the shard stop.)
        let lost = |s: &&Arc<crate::corpus::Shard>| s.poisoned().is_some() && s.lost_index_pages();
        if let Some(s) = self.source.shards.iter().flatten().find(lost) {
            return Err(Refusal::new(
                Code::Materialize,
                format!(
                    "{}: {}; no new client is served until the daemon is restarted with it \
                     replaced (a new start could plan from its lost pages)",
                    s.path().display(),
                    s.poisoned().unwrap_or_default()
                ),
            )
            .into());
        }
        // A blob that carries changes this daemon has not seen (it restarted, or another
        // node's daemon took them) brings them along: the plan under them is the one the
        // blob's run was following.
        // Decoding and checking the blob is the plan's (`Plan::resume`), once; a journal
        // it would adopt that adds stages would have it pack a window per domain at each
        // new shape first, so those are held to the room and shapes the client will get.
        let adopt = |journal: &[crate::plan::Change]| self.check_blob_stages(&seen, journal, hello);
        let resumed = match &blob {
            Some(b) => Some({
                // Restoring the blob's planner reads shard indexes: watched like a seek.
                let at = hello.start_step.unwrap_or(0);
                let _watched = (self.fills).begin_as(
                    Doing::Seek("restoring the client's cursor"),
                    &hello.job,
                    hello.dp_rank,
                    at,
                );
                seen.resume_with(b, self.journal_cap, &adopt)
                    .map_err(|e| refuse_cursor(e.to_string()))?
            }),
            None => None,
        };
        // An adopted journal takes the room a live change's would, its stages' carry
        // records included (`Plan::resume` counts only its encoding).
        if let Some(r) = resumed.as_ref().filter(|r| r.adopted) {
            if let Some(denied) = &peer.no_control {
                return Err(refuse_uncontrolled(&seen, &r.plan, denied).into());
            }
            let journal = r.plan.journal();
            if super::journal_room(&r.plan, journal) > self.journal_cap {
                let e = crate::plan::CursorError::JournalTooLarge {
                    changes: journal.len(),
                    cap: self.journal_cap,
                };
                return Err(refuse_cursor(e.to_string()).into());
            }
            self.cursor_room(&r.plan, journal)
                .map_err(|e| refuse_cursor(format!("its live changes: {e}")))?;
        }
        // A blob's step has the bound a HELLO's start_step has: the ring's and the
        // daemon's step arithmetic (slots past it, the first changeable step) stays far
        // from u64::MAX, and one client cannot push every job's live changes past it.
        if let Some(step) = resumed.as_ref().map(|r| r.planner.step()) {
            if step > MAX_STEP {
                return Err(refuse_cursor(format!(
                    "its step {step} is beyond {MAX_STEP}, the most a run may reach"
                ))
                .into());
            }
        }
        // A blob whose journal adds a stage (a live `set_stage`) is served at the stages
        // of its plan: a ring this client creates is sized for them too.
        if let Some(r) = resumed.as_ref().filter(|r| r.adopted) {
            shape = Shape::check(&r.plan, hello)?;
        }
        let sought = match resumed {
            Some(_) => None,
            None => self.seek_unless_joining(&seen, hello, cancel, seek)?,
        };
        let mut joiner = Joiner {
            hello,
            shape: &shape,
            pid,
            ready: Arc::new(
                EventFd::new().map_err(|e| Refusal::new(Code::Busy, format!("eventfd: {e}")))?,
            ),
            kick: Arc::new(tokio::sync::Notify::new()),
            blob,
            page: None,
        };
        joiner.ready.name_as(format!(
            "job {} dp_rank {} replica {:?} (pid {})",
            hello.job,
            hello.dp_rank,
            hello.replica,
            pid.map_or("unknown".into(), |p| p.to_string())
        ));
        let mut page_fd = None;
        if hello.release_page {
            let (page, fd) = ReleasePage::create(&format!("{}:{}", hello.job, hello.dp_rank))
                .map_err(|e| os_refusal(format!("release page memfd: {e}"), &e))?;
            joiner.page = Some(Arc::new(page));
            page_fd = Some(fd);
        }
        // Nothing may return between building the ring and taking the lock below, which
        // gives its reservation back. Declared before `st`, so an unused ring is unmapped
        // after the lock is dropped.
        let start =
            (resumed.as_ref().map(|r| r.planner.step())).or(sought.as_ref().map(|p| p.step()));
        let mut built = match start {
            Some(step) => self.build_ring(&joiner, step)?,
            None => None,
        };
        // What a refusal below takes out of the hub (a ring this client created, its
        // job), dropped after the lock like `built`.
        let mut freed = Freed::default();

        let key = (hello.job.clone(), hello.dp_rank);
        let mut st = self.lock();
        if built.is_some() {
            st.ring_reserved.remove(&key);
        }
        if !Arc::ptr_eq(&st.plan, &seen) {
            return Ok(None);
        }
        let room = self.check_room(&st, resumed.as_ref(), &hello.job)?;
        let uid_rings = match share {
            Some(s) => Some((s, self.check_uid_clients(&st, s)?)),
            None => None,
        };
        let adopt = resumed
            .as_ref()
            .filter(|r| r.adopted)
            .map(|r| r.plan.clone());
        let planner = resumed.map(|r| r.planner).or(sought);
        let used = Self::ring_memory_besides(&st, &key);
        let peer_id = st.next_peer;
        st.next_peer += 1;
        let job = st.jobs.entry(hello.job.clone()).or_insert_with(|| Job {
            uid,
            ..Job::new(hello.dp_size)
        });
        // A job is its first client's user's: a client of another uid could otherwise
        // join one of its ranks as a peer and hold its slots (the rank stalls), or
        // create it first with another dp_size so that its own ranks are refused.
        if job.uid != uid {
            let who = |u: Option<u32>| u.map_or("unknown".to_string(), |u| u.to_string());
            return Err(Refusal::new(
                Code::Access,
                format!(
                    "job {:?} is run by uid {}, this client is uid {}: a job's clients \
                     must all run as one user (use another job name)",
                    hello.job,
                    who(job.uid),
                    who(uid)
                ),
            )
            .into());
        }
        if job.dp_size != hello.dp_size {
            return Err(Refusal::new(
                Code::DpSize,
                format!(
                    "job {:?} runs with dp_size {}, this client says {}",
                    hello.job, job.dp_size, hello.dp_size
                ),
            )
            .into());
        }
        // A ring of this rank that lacks the blob's change (a peer of this client resumed
        // from an older blob, or one without a blob) cannot be joined: the change is put
        // in force and that ring stopped, and this client retries once its peers have
        // been told (the connection ends at once).
        if let Some(p) = adopt
            .clone()
            .filter(|_| room.stale.contains(&hello.dp_rank))
        {
            self.adopt(&mut st, &seen, p, hello, &room)?;
            return Err(Refusal::new(
                Code::Busy,
                format!(
                    "the ring of job {:?} dp_rank {} was served steps without the live \
                     change this cursor blob carries (its peers resumed from an older \
                     blob) and stops; the change is in force now: retry",
                    hello.job, hello.dp_rank
                ),
            )
            .into());
        }
        let Some(job) = st.jobs.get_mut(&hello.job) else {
            return Err(Refusal::new(Code::Busy, "the job was just torn down; retry").into());
        };
        // Every refusal below leaves the job as it was; a job this client just created
        // is removed again, so its dp_size does not bind the next client.
        let outcome = match job.rings.get_mut(&hello.dp_rank) {
            Some(entry) => joiner.join(entry, peer_id, planner),
            None => self.create_ring(
                job,
                &joiner,
                peer_id,
                planner,
                (used, uid_rings),
                &mut built,
            ),
        };
        let outcome = match (outcome, adopt) {
            (Ok(x), Some(p)) => match self.adopt(&mut st, &seen, p, hello, &room) {
                Ok(()) => Ok(x),
                Err(r) => {
                    freed.extend(Self::unjoin(&mut st, &hello.job, hello.dp_rank, peer_id, x));
                    return Err(r.into());
                }
            },
            (o, _) => o,
        };
        let Some(job) = st.jobs.get_mut(&hello.job) else {
            freed.rings.extend(outcome.ok().map(|x| x.ring));
            return Err(Refusal::new(Code::Busy, "the job was just torn down; retry").into());
        };
        let Joined {
            step: start_step,
            ring,
            ..
        } = match outcome {
            Ok(x) => x,
            Err(r) => {
                if job.rings.is_empty() {
                    freed.jobs.extend(st.jobs.remove(&hello.job));
                }
                return Err(r.into());
            }
        };
        st.clients += 1;
        drop(st);
        self.work.notify_all();
        let welcome = self.welcome(&seen, &joiner, start_step, &ring);
        Ok(Some(Admission {
            peer: peer_id,
            welcome,
            ring,
            ready: joiner.ready,
            kick: joiner.kick,
            page_fd,
        }))
    }

    /// The planner at the start step of a client without a blob, sought before the lock
    /// (shared with the other admissions seeking `plan` to that step, [`SeekFlights`]).
    /// `None` when the rank's ring covers the step: it is streaming, or it has not
    /// started and starts at or before the step; the client then takes the ring's
    /// position as it is ([`Joiner::join`]), and a seek is only worth its cost when a
    /// ring will start (or move back) to it.
    fn seek_unless_joining(
        &self,
        plan: &Arc<Plan>,
        hello: &Hello,
        cancel: &AtomicBool,
        seek: Option<(&SeekTicket, bool)>,
    ) -> Result<Option<Planner>, NotAdmitted> {
        if self.ring_covers(hello) {
            return Ok(None);
        }
        let step = hello.start_step.unwrap_or(0);
        let run = || {
            if step > 0 {
                info!(job = %hello.job, dp_rank = hello.dp_rank, step, "seeking a client's start step");
            }
            // A far seek reads shard indexes (and a plan checkpoint) for as long as its
            // replay runs: watched, so a read that hangs is named.
            let doing = Doing::Seek("seeking the client's start step");
            let _watched = self.fills.begin_as(doing, &hello.job, hello.dp_rank, step);
            let mark = crate::corpus::guard::zeroed_pages();
            // From the nearest plan checkpoint when the daemon has a cache directory (the
            // same path as `plan --from`); the result is the plain replay's either way.
            let p = match &self.settings.checkpoints {
                Some(root) => plan.seek_with(
                    step,
                    &crate::plan_cache::CheckpointDir::new(root, plan),
                    cancel,
                ),
                None => plan.seek_cancellable(step, cancel),
            };
            // A seek that read a lost page planned from zeros: this admission is refused
            // for it (`Hub::admit`), and none other may copy it.
            let sound = crate::corpus::guard::zeroed_pages() == mark;
            p.map(|p| (p, sound))
        };
        let sought = match seek {
            // Step 0 (or the few skipped plan steps before it) costs nothing to reach.
            _ if step == 0 => run().map(|(p, _)| p).ok_or(NotSought::Cancelled),
            // The plan changed since the ticket was taken (a reload or live change):
            // the seek of the new plan is another, which the connection takes a
            // ticket for and queues or waits for (in an ordinary slot it must not run).
            Some((t, _)) if !t.is_of(plan) => Err(NotSought::Wait),
            Some((t, may_run)) => t.seek(cancel, may_run, run),
            // A seek runs in a seek slot only: in another it could hold the slots blob
            // restores and step-0 starts rely on for hours.
            None => {
                return Err(Refusal::new(
                    Code::Busy,
                    "the ring this client was to join went away while it waited; retry",
                )
                .into())
            }
        };
        match sought {
            Ok(p) => Ok(Some(p)),
            Err(NotSought::Cancelled) => Err(Refusal::new(
                Code::Cancelled,
                format!("the client left while the daemon sought step {step}"),
            )
            .into()),
            Err(NotSought::Wait) => Err(NotAdmitted::Wait),
        }
    }

    /// Whether the ring of `hello`'s rank exists and covers its start step, so that the
    /// client joins it without a planner of its own: the ring streams (the join checks
    /// it holds the step), or it has not started and starts at or before the step.
    fn ring_covers(&self, hello: &Hello) -> bool {
        let step = hello.start_step.unwrap_or(0);
        let st = self.lock();
        (st.jobs.get(&hello.job))
            .and_then(|j| j.rings.get(&hello.dp_rank))
            .is_some_and(|e| e.started() || step >= e.start)
    }

    /// The seek `hello` will need when it is admitted, registered in `flights` from now
    /// on so that a concurrent seek's result waits for it; `None` when it needs none
    /// (it brings a blob, starts at step 0, or its rank's ring covers its step). What
    /// the connection looks at to pick its admission slot.
    pub fn seek_ticket(&self, hello: &Hello, flights: &Arc<SeekFlights>) -> Option<SeekTicket> {
        let step = hello.start_step.unwrap_or(0);
        if hello.cursor.is_some() || step == 0 || self.ring_covers(hello) {
            return None;
        }
        Some(flights.ticket(&self.plan(), step))
    }

    /// Whether the daemon takes one more client now: it is not stopping, has room, and
    /// the blob's changes (if `resumed` adopts any) could not rewrite what clients of
    /// other jobs connected now already received. A blob's changes are adopted only
    /// once every other check has passed, but one like that is refused before anything
    /// else, naming the jobs that received those steps.
    ///
    /// Steps served only to jobs that have left do not bind a blob: a job that reached a
    /// restarted daemon first (an eval job, any client without a blob) read them under
    /// the config's journal, and counting them for good made the daemon refuse the
    /// training job's blobs until yet another restart. `replaces` when the blob's
    /// changes rewrite such steps: its journal then replaces the one they were served
    /// under ([`Hub::adopt`]). Nor do the steps of the blob's own job's ranks that
    /// resumed from blobs saved before its change (`stale`, [`stale_ranks`]): their
    /// rings stop when it is adopted.
    fn check_room(
        &self,
        st: &State,
        resumed: Option<&Resumed>,
        job: &str,
    ) -> Result<Room, Refusal> {
        if st.stopping || st.draining {
            return Err(Refusal::new(Code::Busy, "the daemon is shutting down"));
        }
        let mut room = Room::default();
        if let Some(r) = resumed {
            room.stale = stale_ranks(st, r, job)?;
            room.replaces = r.check_served(st.first_changeable(), &st.plan).is_err();
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
        Ok(room)
    }

    /// The ring bytes `share`'s uid holds now; refused `busy` when its clients are at its
    /// share of `max_clients` (the rest are kept for other users' trainers).
    fn check_uid_clients(&self, st: &State, share: UidShare) -> Result<u64, Refusal> {
        let (clients, bytes) = (st.jobs.values())
            .filter(|j| j.uid == Some(share.uid))
            .flat_map(|j| j.rings.values())
            .fold((0u64, 0u64), |(c, b), e| {
                (c + e.peers.len() as u64, b + e.ring.layout().ring_bytes)
            });
        let max = self.settings.max_clients as u64;
        if clients >= share.of(max) {
            return Err(Refusal::new(
                Code::Busy,
                format!(
                    "uid {} has {clients} clients connected, its share of the {max} the daemon \
                     serves ([serve] uid_share_percent {} of max_clients); the rest are kept \
                     for other users",
                    share.uid, share.percent
                ),
            ));
        }
        Ok(bytes)
    }

    /// The layout of the ring a joiner gets when it creates its rank's ring.
    fn ring_layout(&self, joiner: &Joiner) -> Layout {
        let kind = joiner.hello.slot_layout.unwrap_or_default();
        let token = match kind {
            SlotLayout::Compact => self.source.compact_token(),
            SlotLayout::Expanded => self.settings.token,
        };
        let shapes: Vec<(u32, u32)> = (joiner.shape.stages.iter())
            .map(|s| (s.rows, s.seq_len))
            .collect();
        let (slots, reserve) = (self.settings.slots, self.settings.stage_reserve);
        Layout::staged(kind, &shapes, reserve, slots, token, self.cursor_cap)
    }

    /// The ring a joiner will create, built before the hub's lock when its rank has no
    /// ring now, no other admission is building one for it, and the budget has room:
    /// sizing and pre-faulting a ring takes 0.3 ms at 8 x 4096 compact and 20 ms at
    /// 64 x 8192 expanded, which under the lock every other rank's publish would wait
    /// for. Its bytes stay reserved against the budget, under the rank's key, until the
    /// caller takes the lock and gives them back. `None` leaves the decision (and every
    /// refusal) to the locked path: a peer of a rank being built joins the ring that
    /// admission installs, or builds it there if it comes first; a client the daemon
    /// will refuse (stopping, at `max_clients`, another `dp_size`) builds nothing.
    fn build_ring(&self, joiner: &Joiner, step: u64) -> Result<Option<Arc<Ring>>, Refusal> {
        let hello = joiner.hello;
        let layout = self.ring_layout(joiner);
        let bytes = layout.ring_bytes;
        let key = (hello.job.clone(), hello.dp_rank);
        {
            let mut st = self.lock();
            let job = st.jobs.get(&hello.job);
            let exists = job.is_some_and(|j| j.rings.contains_key(&hello.dp_rank));
            let refused = st.stopping
                || st.draining
                || st.clients >= self.settings.max_clients
                || job.is_some_and(|j| j.dp_size != hello.dp_size);
            let used = Self::ring_memory_besides(&st, &key);
            if exists
                || refused
                || st.ring_reserved.contains_key(&key)
                || used.saturating_add(bytes) > self.settings.ring_budget
            {
                return Ok(None);
            }
            st.ring_reserved.insert(key.clone(), bytes);
        }
        match Ring::create(&format!("{}:{}", hello.job, hello.dp_rank), layout, step) {
            Ok(r) => Ok(Some(Arc::new(r))),
            Err(e) => {
                self.lock().ring_reserved.remove(&key);
                Err(ring_refusal(&e))
            }
        }
    }

    /// Creates the rank's ring at the client's start, within the ring memory budget
    /// (`used` bytes are taken by the rings live now and those being built) and, for a
    /// uid held to a share, within its share of it (`uid_used` bytes are its rings'). `built`
    /// is the ring [`Hub::build_ring`] made before the lock; it is taken only when
    /// the ring is.
    fn create_ring(
        &self,
        job: &mut Job,
        joiner: &Joiner,
        peer_id: u64,
        planner: Option<Planner>,
        (used, uid_used): (u64, Option<(UidShare, u64)>),
        built: &mut Option<Arc<Ring>>,
    ) -> Result<Joined, Refusal> {
        let hello = joiner.hello;
        let Some(planner) = planner else {
            // The ring we saw vanished while we waited for the lock: its peers left.
            // Ask the client to retry rather than seek under the lock.
            return Err(Refusal::new(
                Code::Busy,
                "the ring was just torn down; retry",
            ));
        };
        let layout = self.ring_layout(joiner);
        let step = planner.step();
        if used.saturating_add(layout.ring_bytes) > self.settings.ring_budget {
            return Err(Refusal::new(
                Code::Memory,
                format!(
                    "a ring for job {:?} dp_rank {} takes {} bytes, and the rings \
                     live now take {used} of the {} bytes [serve] \
                     ring_memory_bytes allows",
                    hello.job, hello.dp_rank, layout.ring_bytes, self.settings.ring_budget
                ),
            ));
        }
        if let Some((s, mine)) = uid_used {
            let part = s.of(self.settings.ring_budget);
            if mine.saturating_add(layout.ring_bytes) > part {
                return Err(Refusal::new(
                    Code::Memory,
                    format!(
                        "a ring for job {:?} dp_rank {} takes {} bytes, and uid {}'s rings \
                         take {mine} of its share of {part} bytes ([serve] uid_share_percent \
                         {} of the {} bytes ring_memory_bytes allows); the rest are kept for \
                         other users",
                        hello.job,
                        hello.dp_rank,
                        layout.ring_bytes,
                        s.uid,
                        s.percent,
                        self.settings.ring_budget
                    ),
                ));
            }
        }
        let r = match built.take() {
            Some(r) => r,
            // Its rank had a ring when the client looked (now gone), or the budget had
            // no room then: built here, under the lock.
            None => match Ring::create(&format!("{}:{}", hello.job, hello.dp_rank), layout, step) {
                Ok(r) => Arc::new(r),
                Err(e) => return Err(ring_refusal(&e)),
            },
        };
        // The client's own bytes when it brought a blob: a peer resuming from the same
        // checkpoint then matches byte for byte.
        let cursor = joiner.cursor(&planner);
        let mut entry = RingEntry::new(
            r.clone(),
            planner,
            cursor,
            hello.replicas,
            (joiner.shape.mbr, hello.micro_batches),
            joiner.blob.is_some(),
        );
        let first = entry.join(peer_id, joiner.peer(step, Standing::Reading));
        job.rings.insert(hello.dp_rank, entry);
        info!(job = %hello.job, dp_rank = hello.dp_rank, step, bytes = r.layout().ring_bytes, "ring created");
        Ok(Joined {
            step,
            ring: r,
            first,
            moved: None,
        })
    }

    /// Puts the plan a client's blob brought in force. Its journal extends ours, or
    /// replaced a tail of ours that one of its changes superseded. All or nothing: a
    /// failed install leaves every ring as it was. `room.replaces`: its changes rewrite
    /// steps served only to jobs that have left ([`Hub::check_room`]); what they were
    /// served under no longer bounds the first changeable step, which drops to the steps
    /// of the rings connected now. `room.stale`: the rings of the client's job that were
    /// served steps without its changes stop, from the first step they change on.
    fn adopt(
        &self,
        st: &mut State,
        seen: &Plan,
        plan: Arc<Plan>,
        hello: &Hello,
        room: &Room,
    ) -> Result<(), Refusal> {
        let kept = journal::common_prefix(seen.journal(), plan.journal());
        let n = plan.journal().len() - kept;
        let first = plan
            .journal()
            .get(kept)
            .map(|c| (c.at, plan.trainer_step_of(c.at)));
        let stale = (hello.job.as_str(), room.stale.as_slice());
        self.install_besides(st, plan, stale).map_err(|e| {
            // A stage the rings cannot serve never will: the blob is refused as such.
            let code = match e.code() {
                Code::Invalid => Code::Cursor,
                c => c,
            };
            Refusal::new(code, format!("adopting the blob's journal: {e}"))
        })?;
        super::live::warn_hidden(&st.plan, seen, &st.file_points);
        if let (Some((at, from)), Some(job)) = (first, st.jobs.get_mut(&hello.job)) {
            for &r in &room.stale {
                let Some(e) = job.rings.get_mut(&r) else {
                    continue;
                };
                warn!(job = %hello.job, dp_rank = r, from, by = hello.dp_rank, "a rank's cursor blob carries a live change this rank's stream lacks past its step: this ring stops");
                e.fail_from(from, stale_failure(hello, r, at, from));
            }
        }
        if room.replaces {
            let live = served_live(st);
            let was = std::mem::replace(&mut st.watermark, live);
            info!(job = %hello.job, was, now = live, "a cursor blob's changes rewrite steps served only to jobs that have left: the first changeable step drops to the connected rings'");
        }
        st.sources.resize(kept, "cursor");
        st.sources.extend(std::iter::repeat_n("cursor", n));
        *st.reloads.entry("cursor").or_default() += 1;
        info!(changes = n, job = %hello.job, dp_rank = hello.dp_rank, "adopted live mixture changes from a client's cursor blob");
        Ok(())
    }

    /// The WELCOME for a client that starts at `start_step` of `ring`; `seen` is the
    /// plan its HELLO was checked against (a blob's changes may have replaced it since).
    fn welcome(&self, seen: &Plan, joiner: &Joiner, start_step: u64, ring: &Ring) -> Welcome {
        let (hello, shape) = (joiner.hello, joiner.shape);
        let plan = self.plan();
        let cfg = seen.config();
        let layout = ring.layout();
        Welcome {
            protocol: crate::wire::TRAINER_VERSION,
            release_page: joiner.page.is_some(),
            fingerprint: shape.fingerprint.clone(),
            start_step,
            dp_rank: hello.dp_rank,
            dp_size: hello.dp_size,
            rows: shape.rows,
            seq_len: cfg.seq_len,
            micro_batch_rows: shape.mbr,
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
            slot_layout: layout.kind,
            ring_bytes: layout.ring_bytes,
            fields: layout.field_specs(),
            // Every stage fits the ring: it was sized for them, or a stage added since
            // was checked against it (`Hub::install`). Clients read each slot's shape
            // from its header; this list is for sizing buffers ahead.
            stages: (shape.stages.iter())
                .filter_map(|s| {
                    let l = layout.stage(s.rows, s.seq_len).ok()?;
                    Some(StageSpec {
                        fields: l.field_specs(),
                        micro_batch_rows: s.mbr,
                        rows: s.rows,
                        seq_len: s.seq_len,
                        step: s.step,
                    })
                })
                .collect(),
        }
    }

    /// Takes back a join (`joined`, of `peer`) that a later step of admission refused:
    /// a ring the join moved back starts where it did again. A ring (and job) left
    /// without peers is removed and handed back, with the join's reference to its ring,
    /// to be dropped after the lock.
    fn unjoin(st: &mut State, job: &str, dp_rank: u32, peer: u64, joined: Joined) -> Freed {
        let mut freed = Freed::default();
        freed.rings.push(joined.ring);
        let Some(j) = st.jobs.get_mut(job) else {
            return freed;
        };
        if let Some(e) = j.rings.get_mut(&dp_rank) {
            e.unjoin(peer, joined.first);
            if let Some(was) = joined.moved {
                e.restore(was);
            }
            if e.peers.is_empty() {
                let e = j.rings.remove(&dp_rank);
                if let (Some(d), Some(e)) = (st.departed.as_mut(), &e) {
                    d.ring(job, dp_rank, e);
                }
                freed.entries.extend(e);
            }
        }
        if j.rings.is_empty() {
            if let Some(d) = st.departed.as_mut() {
                d.job(job, j);
            }
            freed.jobs.extend(st.jobs.remove(job));
        }
        freed
    }
}

/// What [`Hub::check_room`] found a blob's changes may rewrite.
#[derive(Default)]
struct Room {
    /// They rewrite steps served only to jobs that have left.
    replaces: bool,
    /// The dp ranks of the client's job whose rings were served steps they change.
    stale: Vec<u32>,
}

/// Why the ring of `job`'s `dp_rank` stops when `hello`'s blob brings a change from plan
/// step `at` (trainer step `from`) that its stream lacks, and what its trainer does now.
fn stale_failure(hello: &Hello, dp_rank: u32, at: u64, from: u64) -> super::Failure {
    super::Failure::new(
        Code::Cursor,
        format!(
            "job {:?} dp_rank {} resumed from a cursor blob carrying a live change from plan \
             step {at} (step {from}) that this rank's blob lacked (it was saved before the \
             change reached the daemon), and this ring was served steps from {from} on \
             without it: the job cannot have two streams for one step, so dp_rank \
             {dp_rank} stops here (steps below {from} were right). The daemon holds the \
             change now: reconnect from a cursor blob of step {from} or earlier and the \
             stream continues with it; a trainer that already trained on step {from} or \
             later must resume from a checkpoint before it",
            hello.job, hello.dp_rank
        ),
    )
}

/// The refusal of a cursor blob whose live changes this daemon lacks, from a client whose
/// uid may not change the plan: adopting them would change it for every job, which
/// `[serve] control_uids` reserves to its uids (a blob's checksum is no signature). It
/// names the first change so that an operator can apply it with `millrace ctl`; the
/// same blob then agrees with the daemon's journal and is admitted.
fn refuse_uncontrolled(
    seen: &Plan,
    theirs: &Plan,
    denied: &crate::serve::access::Denied,
) -> Refusal {
    let kept = journal::common_prefix(seen.journal(), theirs.journal());
    let extra = theirs.journal().len().saturating_sub(kept);
    let first = theirs.journal().get(kept).map_or(String::new(), |c| {
        let what = if c.stage.is_some() {
            "a stage"
        } else {
            "weights"
        };
        format!(
            " (the first: {what} from trainer step {})",
            theirs.trainer_step_of(c.at)
        )
    });
    Refusal::new(
        Code::Access,
        format!(
            "this client's cursor blob carries {extra} live change(s) this daemon lacks{first}, \
             and adopting them would change the plan of every job: {denied}. Apply them \
             with `millrace ctl` as a uid that may, then connect again"
        ),
    )
}

/// The refusal for a system call that failed while making a client's shared memory:
/// `memory` when the OS is out of what it needs (ENOMEM, ENOSPC, or EFBIG from a
/// RLIMIT_FSIZE below the memfd's size), which retrying does not change, else `busy`.
/// All of them were `busy`, so a trainer under such a limit retried for its whole
/// `reconnect_timeout` before failing with what read like a passing condition.
fn os_refusal(message: String, e: &std::io::Error) -> Refusal {
    let code = match e.raw_os_error() {
        Some(libc::ENOMEM | libc::ENOSPC | libc::EFBIG) => Code::Memory,
        _ => Code::Busy,
    };
    // ENOMEM at the mapping limit is no lack of memory: named, or it sent operators to
    // `ring_memory_bytes` while rings were far below it (a 32,000-shard corpus).
    let note = (e.raw_os_error() == Some(libc::ENOMEM))
        .then(crate::corpus::maps::limit_note)
        .flatten();
    match note {
        Some(note) => Refusal::new(code, format!("{message}: {note}")),
        None => Refusal::new(code, message),
    }
}

/// [`os_refusal`] for a ring that could not be created.
fn ring_refusal(e: &crate::serve::ring::RingError) -> Refusal {
    match e {
        crate::serve::ring::RingError::Os { source, .. } => os_refusal(e.to_string(), source),
        _ => Refusal::new(Code::Busy, e.to_string()),
    }
}
