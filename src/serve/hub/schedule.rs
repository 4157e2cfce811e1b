//! Scheduling: the materializer threads claim the emptiest ring's next step (planned by
//! the plan thread, `jobplan`, or inline when it has not), hint it, copy it outside the
//! lock and publish in order; shards that change or fault under the daemon are poisoned
//! here.

use std::sync::Arc;
use std::time::Instant;

use tracing::{error, warn};

use super::jobplan::{keep, wake_at, Take};
use super::peers::{Armed, PAGE_BACKSTOP};
use super::phase::Copied;
use super::{
    Claimed, Cursor, Failure, Filled, Hub, Planned, RingEntry, State, SHARD_CHECK,
    SHARD_CHECK_BUDGET,
};
use crate::plan::{Planner, Row};
use crate::serve::fill::{fill_slot, will_need, RankRows, SlotJob};
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
    pub(super) fn poison_at(&self, addr: usize, during: &str) -> String {
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
            entry.fail(Failure::new(Code::Materialize, why));
        }
    }

    /// One materializer thread: claim a slot, fill it outside the lock, publish in order.
    pub fn worker(&self) {
        // The eventfds of peers a publish must wake, signalled once the lock is dropped.
        let mut wake: Vec<Arc<EventFd>> = Vec::new();
        loop {
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
                        (None, _) => {}
                    }
                    if std::mem::take(&mut st.plan_kick) {
                        self.plan_wake.notify_one();
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
            // `claim` handed this step to this worker alone (it is in `in_flight` until we
            // return), and the step is at least `slots` ahead of nothing a peer still
            // holds (next_fill < base + slots); the ring refuses a second writer anyway.
            let t0 = Instant::now();
            let result = ring
                .claim(job.step)
                .and_then(|mut slot| fill_slot(&mut slot, ring.layout(), &job, &self.source));
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
                    if entry.publish_in_order(&key, &mut wake) {
                        entry.clocks(self.settings.slots, Instant::now());
                        let published = entry.published;
                        st.watermark = st.watermark.max(published);
                    }
                }
                Err(e) => {
                    error!(job = %key.0, dp_rank = key.1, "{e}; this ring stops");
                    entry.fail(Failure::new(Code::Materialize, e.to_string()));
                }
            }
            // A wake is a syscall and, for a peer blocked in poll, an inter-processor
            // interrupt: outside the lock, so that the connections' releases and the
            // other workers' claims do not wait behind it.
            drop(st);
            for w in wake.drain(..) {
                w.signal();
            }
        }
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
    /// `skip`.
    fn pick(&self, st: &State, skip: &[(String, u32)]) -> Option<(String, u32)> {
        let slots = self.settings.slots;
        // Serve the emptiest ring first (fewest steps filled or in flight ahead of what
        // its peers hold), and among equally empty rings the one claimed longest ago.
        // Without that tie-break free-running consumers keep their rings empty, and the
        // same few rings (first in the map's order) won every claim while the rest
        // starved: 25 vs 21,296 steps in 40 s over 16 ranks.
        let mut best: Option<(&String, u32, (u64, u64))> = None;
        for (name, job) in st.jobs.iter() {
            for (&r, e) in job.rings.iter() {
                let key = (e.next_fill - e.base(), e.stats.last_claim);
                if e.claimable(slots)
                    && best.is_none_or(|(_, _, k)| key < k)
                    && !skip.iter().any(|(n, s)| n == name && *s == r)
                {
                    best = Some((name, r, key));
                }
            }
        }
        best.map(|(n, r, _)| (n.clone(), r))
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
        let hint = |rows: &[Row]| {
            if self.settings.hints {
                self.hint(rows);
            }
        };
        // The job's planner passing a checkpoint step offers its state (the blob is the
        // slot's, encoded anyway); the disk write happens on the keeper's thread.
        let mut offer =
            |p: &Planner, b: &Planned| self.keeper.offer(p.plan(), p.plan_step(), &b.blob);
        let taken = job.take(
            r,
            Take {
                plan: &plan,
                prefetch: u64::from(self.settings.prefetch),
                ahead: st.plan_thread,
                keep: keep(
                    slots,
                    self.settings.prefetch,
                    plan.config().global_batch_rows,
                ),
                hint: &hint,
                planned: &mut offer,
            },
        );
        let waits = matches!(taken, Ok(None));
        st.plan_waiters |= waits;
        if st.plan_idle
            && (waits
                || job.short(slots, self.settings.prefetch)
                    >= wake_at(slots, self.settings.prefetch))
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

impl RingEntry {
    /// Publishes every filled step that is next in order (a later slot may finish first)
    /// and adds the peers' eventfds to `wake`; a peer that joined ahead is checked when
    /// the ring reaches its step. Returns whether anything was published.
    fn publish_in_order(&mut self, key: &(String, u32), wake: &mut Vec<Arc<EventFd>>) -> bool {
        let before = self.published;
        while let Some(f) = self.filled.remove(&self.published) {
            let sums = &mut self.stats.domain_tokens;
            if sums.len() < f.tokens.len() {
                sums.resize(f.tokens.len(), 0);
            }
            for (s, t) in sums.iter_mut().zip(&f.tokens) {
                *s += t;
            }
            // The step is filled and not yet visible: no worker holds it.
            if let Err(e) = self.ring.stamp(self.published) {
                error!(job = %key.0, dp_rank = key.1, "{e}");
            }
            self.published += 1;
            let at = self.published;
            for p in self.peers.values_mut() {
                if let Some(why) = p.reach(at, &f.blob).map(|w| w.to_string()) {
                    warn!(job = %key.0, dp_rank = key.1, replica = %p.replica, "{why}");
                    p.kick.notify_one();
                }
            }
            self.cursors.push_back(Cursor {
                step: at,
                blob: f.blob,
                mark: f.mark,
            });
        }
        if self.published == before {
            return false;
        }
        self.ring.publish(self.published);
        wake.extend(self.peers.values().map(|p| p.ready.clone()));
        true
    }
}
