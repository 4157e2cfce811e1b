//! Scheduling: the materializer threads claim the emptiest ring's next step (a ring far
//! behind its job's others first; planned by the plan thread, `jobplan`, or inline when
//! it has not), hint it, copy it outside the lock and publish it (`publish`: in order,
//! waking the ring's peers or coalescing the wake); shards that change or fault under
//! the daemon are poisoned here.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{error, warn};

use super::ahead::wake_at;
use super::jobplan::Take;
use super::peers::{Armed, PAGE_BACKSTOP};
use super::phase::Copied;
use super::publish::hold_most;
use super::{
    Claimed, Failure, Filled, Hub, Planned, RingEntry, State, SHARD_CHECK, SHARD_CHECK_BUDGET,
};
use crate::config::plan::MAX_STEP;
use crate::plan::{Planner, Row};
use crate::serve::fill::{fill_slot, will_need, Doing, RankRows, SlotJob, STUCK_REPEAT};
use crate::sys::EventFd;
use crate::wire::protocol::Code;

impl Hub {
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
    /// A fault of planning work (a seek, a restore, a stage window) begun at `mark`
    /// ([`crate::corpus::guard::zeroed_pages`]): one of this thread's, or a page zeroed
    /// meanwhile that planning could have read (a shard's index, or memory no shard
    /// holds). A page of a `.bin` zeroed meanwhile is a copy's, whose own ring stops.
    pub(super) fn planning_fault(&self, mark: usize) -> Option<usize> {
        crate::corpus::guard::fault_since_in(mark, |addr| {
            let mut shards = self.source.shards.iter().flatten();
            match shards.find(|s| s.file_at(addr).is_some()) {
                Some(s) => s.index_holds(addr),
                None => true,
            }
        })
    }

    pub(super) fn poison_at(&self, addr: usize, during: &str) -> String {
        let shard = (self.source.shards.iter().flatten()).find(|s| s.file_at(addr).is_some());
        match shard {
            Some(s) => {
                let why = crate::serve::fill::describe_fault(s, addr, during);
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
            entry.fail(Failure::new(Code::Materialize, why));
        }
    }

    /// One materializer thread: claim a slot, fill it outside the lock, publish in order.
    pub fn worker(&self) {
        // The eventfds of peers a publish must wake, signalled once the lock is dropped.
        let mut wake: Vec<Arc<EventFd>> = Vec::new();
        let coalesce = self.settings.wake_coalesce;
        loop {
            for w in wake.drain(..) {
                wake_peer(&w);
            }
            self.check_shards();
            let Claimed {
                key,
                ring,
                job,
                mark,
                generation,
            } = {
                let mut st = self.lock();
                let claimed = loop {
                    if st.stopping {
                        return;
                    }
                    // Releases published in pages since the last look (no frame came).
                    if self.sync_pages(&mut st) {
                        self.work.notify_one();
                    }
                    // Planning reads shard indexes: guarded like the copy.
                    let g = crate::corpus::guard::enter();
                    let _ = crate::corpus::guard::take_fault();
                    let c = self.claim(&mut st);
                    let fault = crate::corpus::guard::take_fault();
                    drop(g);
                    match (c, fault) {
                        (Some(c), None) => break c,
                        (Some(c), Some(addr)) => {
                            if let Some(e) = Self::find(&mut st, &c.key.0, c.key.1) {
                                e.copy_ended(c.job.step, c.generation);
                            }
                            self.fail_on_fault(&mut st, &c.key, c.job.step, addr);
                            continue;
                        }
                        (None, Some(addr)) => {
                            // Nothing was claimed, but planning read a shard that shrank:
                            // poison it, so every ring that reads it stops at its next
                            // piece rather than read the zeros mapped over the lost page.
                            let why = self.poison_at(addr, "while planning");
                            error!("materialize: {why}");
                        }
                        (None, None) => {}
                    }
                    if std::mem::take(&mut st.plan_kick) {
                        self.plan_wake.notify_one();
                    }
                    // An idle daemon holds no wake back: send them all before sleeping,
                    // outside the lock, then look for work again.
                    if Self::send_wakes(&mut st, None, &mut wake) {
                        drop(st);
                        for w in wake.drain(..) {
                            wake_peer(&w);
                        }
                        st = self.lock();
                        continue;
                    }
                    st = match self.arm_pages(&st) {
                        Armed::Moved => continue,
                        Armed::Waiting => {
                            // A client without a fence may miss `daemon_waiting`: look at
                            // the pages again after a short while (peers.rs, PAGE_BACKSTOP).
                            self.work
                                .wait_timeout(st, PAGE_BACKSTOP)
                                .unwrap_or_else(|p| p.into_inner())
                                .0
                        }
                        Armed::None => self.work.wait(st).unwrap_or_else(|p| p.into_inner()),
                    };
                };
                let kick = std::mem::take(&mut st.plan_kick);
                drop(st);
                // After the lock, so that the plan thread does not wake to wait for it.
                if kick {
                    self.plan_wake.notify_one();
                }
                claimed
            };
            // A worker that slept in the claim (an idle daemon) stats the shards before it
            // copies: the check at the loop's top ran before the sleep, and a shard
            // rewritten in place meanwhile was served to the first client after it, with
            // no time bound. Rate-limited inside (once a `SHARD_CHECK`), so free here.
            self.check_shards();
            // `claim` handed this step to this worker alone (it is in `in_flight` until we
            // return), and the step is at least `slots` ahead of nothing a peer still
            // holds (next_fill < base + slots); the ring refuses a second writer anyway.
            let t0 = Instant::now();
            let watched = self.fills.begin(&key.0, key.1, job.step);
            let result = ring
                .claim(job.step)
                .and_then(|mut slot| fill_slot(&mut slot, ring.layout(), &job, &self.source));
            drop(watched);
            let mut per_domain = vec![0u64; self.source.shards.len()];
            for row in job.rows.iter() {
                if let Some(t) = per_domain.get_mut(row.domain as usize) {
                    *t += row.tokens as u64;
                }
            }
            metrics::histogram!("millrace_materialize_seconds").record(t0.elapsed().as_secs_f64());
            if let Ok(real) = result {
                let cap = job.seq_len + 1;
                let positions = job.rows.len() as u64 * cap as u64;
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
            let draining = st.draining;
            let rings: usize = st.jobs.values().map(|j| j.rings.len()).sum();
            // The publish's clock read, reused to hold its wake and to age the held ones.
            let mut now = None;
            let Some(entry) = Self::find(&mut st, &key.0, key.1) else {
                continue;
            };
            if !Arc::ptr_eq(&entry.ring, &ring) {
                continue; // the ring was replaced while we copied
            }
            if entry.copy_ended(job.step, generation) == Copied::Stale {
                // A live change replanned this step while we copied: the slot is free
                // for the fresh copy now.
                drop(st);
                self.work.notify_all();
                continue;
            }
            match result {
                Ok(_) => {
                    entry.filled.insert(
                        job.step,
                        Filled {
                            blob: job.cursor,
                            mark,
                            tokens: per_domain,
                        },
                    );
                    if entry.publish_in_order(&key) {
                        let t = *now.insert(Instant::now());
                        entry.clocks(self.settings.slots, t);
                        let hold = !coalesce.is_zero() && !draining;
                        let most = hold_most(self.settings.slots, rings);
                        let hold = hold.then_some((t, most));
                        entry.wake_or_hold(hold, self.settings.slots, &mut wake);
                        let published = entry.published;
                        st.watermark = st.watermark.max(published);
                    }
                }
                Err(e) => {
                    error!(job = %key.0, dp_rank = key.1, "{e}; this ring stops");
                    entry.fail(Failure::new(Code::Materialize, e.to_string()));
                }
            }
            // Wakes held back longer than the bound go out now, whichever ring they are of.
            if !coalesce.is_zero() {
                let now = now.unwrap_or_else(Instant::now);
                Self::send_wakes(&mut st, Some((coalesce, now)), &mut wake);
            }
            // A wake is a syscall and, for a peer blocked in poll, an inter-processor
            // interrupt: outside the lock (at the top of the loop), so that the
            // connections' releases and the other workers' claims do not wait behind it.
            drop(st);
        }
    }

    /// The stuck-fill watchdog's thread: every second, warns about each fill, seek or
    /// read under the hub's lock in flight longer than `[serve] stuck_fill_seconds` (job,
    /// rank, step, and the shard file and bytes it reads), again every [`STUCK_REPEAT`]
    /// while it stays stuck. It takes no lock the stuck work may hold. Returns at
    /// [`Hub::stop`].
    pub fn watch_fills(&self) {
        while !self.fills.wait(Duration::from_secs(1)) {
            self.fills
                .warn_stuck(&self.source, self.settings.stuck_fill, STUCK_REPEAT);
        }
    }

    /// The fills in flight longer than `bound`, the longest first (STATUS's
    /// `stuck_fills` at `[serve] stuck_fill_seconds`).
    pub fn stuck_fills(&self, bound: Duration) -> Vec<crate::wire::status::StuckFill> {
        self.fills.stuck(&self.source, bound)
    }

    /// Waits at most `bound` for the hub's threads (the materializers, the plan thread)
    /// to end after [`Hub::stop`]: one blocked in a read that never returns (a hung
    /// network filesystem, in a copy or in a shard index the planner reads) must not keep
    /// the daemon from exiting at SIGTERM. Returns the names of those that did not end,
    /// after logging them and the fills in flight.
    pub fn join_workers(
        &self,
        threads: Vec<std::thread::JoinHandle<()>>,
        bound: Duration,
    ) -> Vec<String> {
        let left = join_within(threads, bound);
        if !left.is_empty() {
            let stuck = self.stuck_fills(Duration::ZERO);
            let named: Vec<String> = stuck
                .iter()
                .map(|s| {
                    format!(
                        "job {} rank {} step {} ({:.0} s: {})",
                        s.job, s.dp_rank, s.step, s.seconds, s.reading
                    )
                })
                .collect();
            error!(
                "threads {} did not stop within {} ms; exiting without them. Fills in \
                 flight: {}",
                left.join(", "),
                bound.as_millis(),
                if named.is_empty() {
                    "none".into()
                } else {
                    named.join("; ")
                }
            );
        }
        left
    }

    /// Picks a ring with a free slot, takes its next step from its job's plan (issuing
    /// page-cache hints for it and a few beyond), and claims it. Called with the lock
    /// held. A ring whose step cannot be planned stops, and a ring whose step the plan
    /// thread is planning now waits for it; the next ring is tried.
    fn claim(&self, st: &mut State) -> Option<Claimed> {
        if st.draining {
            return None;
        }
        // Each failed try stops a ring or sets it aside: it is not picked again.
        let mut skip = Vec::new();
        let rings: usize = st.jobs.values().map(|j| j.rings.len()).sum();
        for _ in 0..=rings {
            let (name, r) = self.pick(st, &skip)?;
            match self.claim_ring(st, name, r) {
                Ok(c) => return Some(c),
                Err(name) => skip.push((name, r)),
            }
        }
        None
    }

    /// The ring a worker should fill next, if any may be filled, other than those in
    /// `skip` ([`pick_ring`]).
    fn pick(&self, st: &State, skip: &[(String, u32)]) -> Option<(String, u32)> {
        pick_ring(st, self.settings.slots, skip)
    }

    /// Claims the next step of ring `r` of job `name`; Err gives `name` back when the
    /// step could not be planned (the ring stopped) or the plan thread is planning it
    /// now. Has the worker wake the plan thread (`plan_kick`) when the job's window
    /// runs short.
    fn claim_ring(&self, st: &mut State, name: String, r: u32) -> Result<Claimed, String> {
        let slots = self.settings.slots;
        st.claims += 1;
        let clock = st.claims;
        let plan = st.plan.clone();
        let Some(job) = st.jobs.get_mut(&name) else {
            return Err(name);
        };
        let dp_size = job.dp_size;
        // Planning the step and hinting its pages read shard indexes under the hub's
        // lock: a read that hangs there stops every ring, so the watchdog names it.
        let step = job.rings.get(&r).map_or(0, |e| e.next_fill);
        let _watched = self
            .fills
            .begin_as(Doing::Locked("planning a step"), &name, r, step);
        if let Some(entry) = job.rings.get_mut(&r).filter(|e| e.next_fill >= MAX_STEP) {
            // A slot of step MAX_STEP would carry a cursor naming the step after it,
            // past what any daemon resumes (a blob's step is at most MAX_STEP): the run
            // ends here, once its last steps are published (its peers read them before
            // the ERROR), instead of handing out batches whose cursors are refused.
            if entry.published >= entry.next_fill {
                let why = format!(
                    "step {} is past the last step a run may reach ({}): its cursor would \
                     name a step beyond {MAX_STEP}, which no daemon resumes",
                    entry.next_fill,
                    MAX_STEP - 1
                );
                error!(job = %name, dp_rank = r, "{why}; this ring stops");
                entry.fail(Failure::new(Code::Limit, why));
            }
            return Err(name);
        }
        // Asked per claim, not once at start: io_uring's fallback copy hints while
        // io_uring is not in use (fill::Readers::page_hints).
        self.source.readers.advise_access(&self.source.shards);
        let hints = self.source.readers.page_hints();
        let hint = |rows: &[Row]| self.hint(rows);
        // The job's planner passing a checkpoint step offers its state (the blob is the
        // slot's, encoded anyway); the disk write happens on the keeper's thread.
        let mut offer =
            |p: &Planner, b: &Planned| self.keeper.offer(p.plan(), p.plan_step(), &b.blob);
        let keep = job.keep(
            slots,
            self.settings.prefetch,
            plan.config().global_batch_rows,
        );
        let taken = job.take(
            r,
            Take {
                plan: &plan,
                prefetch: u64::from(self.settings.prefetch),
                ahead: st.plan_thread,
                keep,
                hint: hints.then_some(&hint),
                planned: &mut offer,
            },
        );
        let waits = matches!(taken, Ok(None));
        st.plan_waiters |= waits;
        let ahead = job.ahead(plan.config().global_batch_rows);
        let prefetch = self.settings.prefetch;
        if st.plan_idle
            && (waits || job.short(slots, prefetch, ahead) >= wake_at(slots, prefetch, ahead))
        {
            st.plan_idle = false;
            st.plan_kick = true;
        }
        let Some(entry) = job.rings.get_mut(&r) else {
            return Err(name);
        };
        entry.stats.last_claim = clock;
        let planned = match taken {
            Ok(Some(p)) => p,
            Ok(None) => return Err(name),
            Err(why) => {
                error!(job = %name, dp_rank = r, "materialize: {why}; this ring stops");
                entry.fail(Failure::new(Code::Materialize, why));
                return Err(name);
            }
        };
        let step = planned.batch.step;
        let job = SlotJob {
            step,
            plan_step: planned.batch.plan_step,
            seq_len: plan.shape_at(planned.batch.plan_step).0,
            rows: RankRows::of(planned.batch.clone(), r, dp_size),
            cursor: planned.blob.clone(),
            plan_state: planned.state,
        };
        entry.claim_step(step);
        Ok(Claimed {
            key: (name, r),
            ring: entry.ring.clone(),
            job,
            mark: planned.mark.clone(),
            generation: entry.generation,
        })
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
                let at = Arc::as_ptr(shard) as usize;
                let tokens =
                    crate::corpus::guard::noting_index(at, s.doc, || shard.doc_tokens(s.doc));
                if let Ok(t) = tokens {
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

/// Joins the threads of `handles` that end within `bound` (polling: this runs once, at
/// exit); returns the names of those that had not ended by then, which are left running.
pub fn join_within(handles: Vec<std::thread::JoinHandle<()>>, bound: Duration) -> Vec<String> {
    let deadline = Instant::now() + bound;
    let mut left = handles;
    loop {
        let (done, running): (Vec<_>, Vec<_>) = left.into_iter().partition(|h| h.is_finished());
        for h in done {
            let _ = h.join();
        }
        left = running;
        if left.is_empty() || Instant::now() >= deadline {
            let name =
                |h: &std::thread::JoinHandle<()>| h.thread().name().unwrap_or("?").to_string();
            return left.iter().map(name).collect();
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The ring of `st` a worker should fill next (rings of `slots` slots), if any may be
/// filled, other than those in `skip`.
/// Signals a peer's ready eventfd, warning once, by name, when it turns out jammed: its
/// client filled the counter (and may have made it blocking), so it gets no further
/// wake-ups and reads steps only as it polls by itself.
fn wake_peer(w: &EventFd) {
    if w.signal() {
        warn!(
            "{}: its ready eventfd is full (the client wrote to it); it gets no further \
             wake-ups while it stays connected (docs/PROTOCOL.md, section 3)",
            w.name()
        );
    }
}

fn pick_ring(st: &State, slots: u32, skip: &[(String, u32)]) -> Option<(String, u32)> {
    let open = |name: &String, r: u32, e: &RingEntry| {
        e.claimable(slots) && !skip.iter().any(|(n, s)| n == name && *s == r)
    };
    // Serve the emptiest ring first (fewest steps filled or in flight ahead of what its
    // peers hold), and among equally empty rings the one claimed longest ago. Without
    // that tie-break free-running consumers keep their rings empty, and the same few
    // rings (first in the map's order) won every claim while the rest starved: 25 vs
    // 21,296 steps in 40 s over 16 ranks.
    let key = |e: &RingEntry| (e.next_fill - e.base(), e.stats.last_claim);
    let (name, job, r, _) = st
        .jobs
        .iter()
        .flat_map(|(name, job)| job.rings.iter().map(move |(&r, e)| (name, job, r, e)))
        .filter(|&(name, _, r, e)| open(name, r, e))
        .min_by_key(|&(_, _, _, e)| key(e))?;
    // The job whose turn it is gives it to its ring furthest behind, when that one
    // trails the job's most advanced ring by more than [`trails_far`] steps: within the
    // job, so that one job's laggard never takes the other jobs' turns.
    let far = trails_far(job.lag(st.plan.config().global_batch_rows));
    let lead = job
        .rings
        .values()
        .filter(|e| e.started() && !e.peers.is_empty() && e.failure().is_none())
        .map(|e| e.next_fill)
        .max()
        .unwrap_or(0);
    let behind = job
        .rings
        .iter()
        .filter(|&(&q, e)| open(name, q, e) && lead.saturating_sub(e.next_fill) > far)
        .min_by_key(|&(_, e)| e.next_fill)
        .map(|(&q, _)| q);
    Some((name.clone(), behind.unwrap_or(r)))
}

/// Steps a ring may trail its job's most advanced ring before it takes its job's turns
/// ([`pick_ring`]): a quarter of what the job's window keeps for a laggard (`lag`,
/// [`super::Job::lag`]), 512 at 16 rows a step. Ranks of a training job move together
/// (each step ends in a collective), but free-running consumers drift apart like a
/// random walk, and emptiest first does not pull them back: two consumers of 2 x 8 rows at 10^10 tokens drifted
/// 1,000-1,300 steps apart within seconds, and once the plan thread planned 512 steps
/// ahead one fell out of the job's window in 4 of 10 runs (at 8 x 2 rows, in every run)
/// and planned every batch again on its own. A trailing ring whose trainer is slow is
/// full and not claimable, so this never holds the others back; one that can take a step
/// gets its job's turn, and its peers wait for the copy threads meanwhile. Other jobs
/// keep their turns, so a client that resumes far behind cannot starve them. Only
/// started rings lead: one still joining its peers (resumed from a later blob) does not.
fn trails_far(lag: u64) -> u64 {
    lag / 4
}

#[cfg(test)]
mod tests;
