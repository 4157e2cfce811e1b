//! The plan thread (`millrace-plan`, `[serve] plan_thread`, on by default): keeps each
//! job's window ([`super::jobplan`]) planned ahead of its rings, planning outside the
//! hub's lock, and frees the batches every rank passed (docs/DESIGN.md, "Planning runs on
//! a thread of its own").

use std::collections::VecDeque;

use tracing::error;

use super::jobplan::{plan_chunk, Planned};
use super::Hub;
use crate::plan::Planner;
use crate::serve::fill::Doing;

/// The most batches the plan thread plans per checkout: bounds how long a worker that
/// needs the job's next step can wait for it.
const CHUNK: u64 = 32;

/// Rows the plan thread keeps planned beyond what a worker's claim would plan inline (a
/// ring's slots and prefetch past its peers' release), as steps by [`thread_ahead`].
/// With the window only a few steps ahead, the thread was woken every few steps and the
/// copy thread waited for it or for the wake (2 x 8 rows, one copy thread: no faster than
/// planning inline). 32 steps more were enough at 2 x 10^8 tokens, but at 10^10 they are
/// about 1.6 ms of copying: on 2 vCPUs shared with the copy threads and the consumers the
/// thread, preempted in the middle of a chunk for over 5 ms some 25 times a second, left
/// the workers waiting for it 6-8% of their time (docs/BENCHMARKS.md, "The plan thread's
/// reach"). In rows, so that a job of small batches plans far enough ahead in time while
/// one of 8192-row batches does not hold hundreds of MB of plans.
pub(super) const AHEAD_ROWS: u64 = 1 << 13;

/// The fewest and the most steps the plan thread plans ahead (see [`AHEAD_ROWS`]): at
/// least the 32 it planned before the bound was in rows, which jobs of 256 rows a step
/// and more keep; at most 512, about 3 MB of plans at 16 rows a step, with which the
/// workers' waits for the thread fell from 1,279 to 120 in a 17 s run.
const AHEAD_STEPS: (u64, u64) = (32, 512);

/// Steps the plan thread plans beyond a worker's reach for a job of `batch_rows` rows a
/// global batch: [`AHEAD_ROWS`] rows' worth, within [`AHEAD_STEPS`].
pub(super) fn thread_ahead(batch_rows: u32) -> u64 {
    (AHEAD_ROWS / u64::from(batch_rows.max(1))).clamp(AHEAD_STEPS.0, AHEAD_STEPS.1)
}

/// The most bytes of plans the plan thread holds planned ahead for one job, where
/// [`thread_ahead`]'s steps would hold more. A batch's cursor blob grows with the
/// domains (about 110 bytes each: 110 KB a step at 1000 domains) and with the journal of
/// live changes (about 50 bytes a change), so 512 steps of them held 56 MB per job at
/// 1000 domains, where the 512 steps of 16 rows of 4 domains take about 2.8 MB
/// (docs/BENCHMARKS.md, "The plan thread's reach and the lag in bytes").
pub(super) const AHEAD_BYTES: u64 = 4 << 20;

/// The plan thread's reach for a job whose batches take `step_bytes` each (0: not
/// known yet): `ahead` steps, or as many as [`AHEAD_BYTES`] holds when that is fewer,
/// but never fewer than [`AHEAD_STEPS`]' least, what every job had before.
pub(super) fn reach(ahead: u64, step_bytes: usize) -> u64 {
    let by_bytes = AHEAD_BYTES / (step_bytes as u64).max(1);
    ahead.min(by_bytes.max(AHEAD_STEPS.0))
}

/// How many steps short of its reach a job's window is when a worker wakes the plan
/// thread (and the thread plans it): half of what the thread plans ahead (`ahead`, from
/// [`thread_ahead`]) and half the ring and its prefetch, at most a chunk, so that the
/// thread plans many steps per wake-up, and workers still find their step.
pub(super) fn wake_at(slots: u32, prefetch: u32, ahead: u64) -> u64 {
    ((u64::from(slots) + u64::from(prefetch)) / 2 + ahead / 2).clamp(1, CHUNK)
}

impl Hub {
    /// The plan thread (`millrace-plan`, one per daemon): keeps each job's window planned
    /// to the reach of its rings ([`super::Job::short`]) without holding the hub's lock while
    /// it plans, so that the copy threads neither plan nor wait for the lock behind a
    /// planner. Sleeps while every job is planned far enough; a worker wakes it.
    pub fn plan_ahead(&self) {
        let (slots, prefetch) = (self.settings.slots, self.settings.prefetch);
        if let Err(e) = crate::sys::batch_scheduling() {
            tracing::debug!("the plan thread stays under the default scheduling policy: {e}");
        }
        let mut st = self.lock();
        st.plan_thread = true;
        loop {
            if st.stopping {
                st.plan_thread = false;
                return;
            }
            // The job furthest short; any job short at all when a worker waits.
            let urgent = st.plan_waiters;
            // Read each time: a reload may install a plan of another batch size.
            let rows = st.plan.config().global_batch_rows;
            let pick = (!st.draining)
                .then(|| {
                    st.jobs
                        .iter()
                        .map(|(name, j)| {
                            let ahead = j.ahead(rows);
                            let n = j.short(slots, prefetch, ahead);
                            (n, n >= wake_at(slots, prefetch, ahead), name)
                        })
                        .filter(|&(n, woke, _)| woke || (urgent && n > 0))
                        .max_by_key(|&(n, _, _)| n)
                        .map(|(n, _, name)| (n, name.clone()))
                })
                .flatten();
            let Some((n, name)) = pick else {
                if std::mem::take(&mut st.plan_waiters) {
                    self.work.notify_all();
                }
                st.plan_idle = true;
                st = self.plan_wake.wait(st).unwrap_or_else(|p| p.into_inner());
                st.plan_idle = false;
                continue;
            };
            st.plan_checkouts += 1;
            let id = st.plan_checkouts;
            let Some(mut planner) = st.jobs.get_mut(&name).and_then(|j| j.plan.check_out(id))
            else {
                continue;
            };
            drop(st);
            // Planning reads shard indexes: guarded like a worker's claim.
            let g = crate::corpus::guard::enter();
            let _ = crate::corpus::guard::take_fault();
            let mut offer =
                |p: &Planner, b: &Planned| self.keeper.offer(p.plan(), p.plan_step(), &b.blob);
            // Watched like a fill: a read that hangs here holds the job's planner, and
            // its rings stop at the first step not planned yet (dp_rank 0: the planner
            // is every rank's; the step is the first one it plans).
            let watched = self.fills.begin_as(Doing::Ahead, &name, 0, planner.step());
            let chunk = plan_chunk(&mut planner, n.min(CHUNK), &mut offer);
            drop(watched);
            let fault = crate::corpus::guard::take_fault();
            drop(g);
            let why = fault.map(|addr| self.poison_at(addr, "while planning ahead"));
            st = self.lock();
            let rows = st.plan.config().global_batch_rows;
            if let Some(job) = st.jobs.get_mut(&name) {
                let keep = job.keep(slots, prefetch, rows);
                match why {
                    // The planner read a shard that shrank: rings plan from their own
                    // cursors again and stop at the poisoned shard.
                    Some(why) if job.plan.is_checkout(id) => {
                        error!(job = %name, "materialize: {why}; the job's planner is dropped");
                        job.plan.reset(None, VecDeque::new());
                    }
                    Some(_) => {}
                    None => {
                        job.plan.check_in(id, planner, chunk, keep);
                    }
                }
            }
            let dead: Vec<_> = st
                .jobs
                .values_mut()
                .flat_map(|j| j.plan.take_retired())
                .collect();
            let waiters = std::mem::take(&mut st.plan_waiters);
            // Outside the lock: the batches this thread allocated are freed here, and the
            // workers do not wake to wait for the lock.
            drop(st);
            drop(dead);
            if waiters {
                self.work.notify_all();
            }
            st = self.lock();
        }
    }
}
