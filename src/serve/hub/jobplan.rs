//! One planner per job: each global batch is planned once per daemon, its cursor blob
//! encoded once, and every dp rank's ring of the job takes its own rows from it.
//!
//! The job's planner runs at the job's frontier and keeps the batches it planned in a
//! window ([`JobPlan`]); a ring reads its next step there. The window is bounded
//! ([`keep`]: `ring_slots + prefetch_steps` batches plus [`JOB_LAG_ROWS`] rows' worth,
//! at least [`JOB_LAG`] batches): a batch leaves it once every rank of the job has
//! passed it, and in any case when it is that far behind the frontier. A ring outside the window (a rank resumed from an older blob, one stalled
//! while the others ran on, one created ahead) plans with a private planner of its own,
//! as every ring did before, until it is inside the window again; a stalled rank thus
//! costs the daemon at most `keep` batches and never holds the other ranks back. Every
//! way gives the same batches, since the plan is a pure function of the step: the
//! private planner is restored from the ring's own cursor.
//!
//! With `[serve] plan_thread` (the default), the job's planner runs on the daemon's plan
//! thread ([`super::Hub::plan_ahead`]), outside the hub's lock: the thread checks the
//! planner out of the [`JobPlan`] under the lock, plans the steps every ring of the job
//! may claim now (their prefetch, and [`super::ahead::thread_ahead`] more) without it, and
//! puts the planner and the batches back unless the plan was reset meanwhile. A worker
//! plans inline only when the planner is in and the window lacks its step; while it is
//! out, the worker leaves the ring for another or waits for the thread.

use std::collections::VecDeque;
use std::sync::Arc;

use super::ahead::thread_ahead;
use super::{Job, Mark};
use crate::plan::{GlobalBatch, Plan, Planner, Row};

/// The fewest steps a rank may trail the job's most advanced ring and still read the
/// job's batches (beyond its slots and prefetch): ranks of a job connect one after
/// another while the first already streams.
pub(super) const JOB_LAG: u64 = 64;

/// Rows a rank may trail the job's most advanced ring and still read the job's batches
/// (beyond its slots and prefetch), when that is more than [`JOB_LAG`] steps. Ranks
/// drift apart in time (a consumer descheduled, a slower host), so by a number of rows
/// rather than of steps: 8 free-running ranks of 32-row steps on 2 cores drifted
/// 140-230 steps apart, and each rank beyond 64 planned every batch again privately
/// (daemon CPU per token 3x the 2-rank figure; BENCHMARKS.md, "Per-rank costs").
/// 2^15 rows of plans are a few MB at a few domains (a row is ~50 bytes plus ~56 per
/// document in it, a batch its cursor blob besides); [`LAG_BYTES`] bounds them where
/// the blobs are large.
pub(super) const JOB_LAG_ROWS: u64 = 1 << 15;

/// The most bytes of batches a job's window keeps for a rank that trails, where
/// [`JOB_LAG_ROWS`] would keep more: a batch holds its cursor blob, which grows with the
/// domains (about 110 KB at 1000), so 2048 steps of 16 rows held 225 MB, and 1.1 GB at
/// 4096 domains, while one rank stalled.
pub(super) const LAG_BYTES: u64 = 64 << 20;

/// The most batches one job's plan holds: the bound on what a stalled rank can make the
/// daemon keep. What the rings may claim and prefetch, what the plan thread plans beyond
/// that (`ahead`, [`Job::ahead`]), and the `lag` a rank may trail by ([`Job::lag`]):
/// without the thread's share a rank could trail by that much less, and two
/// free-running consumers 1,000-1,300 steps apart (2 x 8 rows at 10^10 tokens) crossed
/// the bound when the thread planned 512 steps ahead, the laggard planning every batch
/// again on its own.
pub(super) fn keep(slots: u32, prefetch: u32, ahead: u64, lag: u64) -> usize {
    (u64::from(slots) + u64::from(prefetch) + ahead + lag) as usize
}

/// Steps a rank may trail the job's most advanced ring and still read the job's batches
/// (beyond its slots, prefetch and the plan thread's reach): [`JOB_LAG_ROWS`] rows'
/// worth, at least [`JOB_LAG`] steps.
pub(super) fn job_lag(batch_rows: u32) -> u64 {
    (JOB_LAG_ROWS / u64::from(batch_rows.max(1))).max(JOB_LAG)
}

/// Plans `n` batches with `planner`, calling `planned` with each (checkpoints are
/// offered there); the plan thread does so outside the hub's lock.
pub(super) fn plan_chunk(
    planner: &mut Planner,
    n: u64,
    planned: &mut dyn FnMut(&Planner, &Planned),
) -> Vec<Arc<Planned>> {
    (0..n)
        .map(|_| {
            let b = Arc::new(Planned::next(planner));
            planned(planner, &b);
            b
        })
        .collect()
}

/// One planned global batch with the cursor after it: shared by every ring that fills
/// the step.
pub(super) struct Planned {
    /// Shared with the slot jobs that copy its ranks' rows.
    pub(super) batch: Arc<GlobalBatch>,
    /// The cursor for "every step up to this one was delivered", the same for every
    /// rank, encoded once.
    pub(super) blob: Vec<u8>,
    /// The mark of `blob`.
    pub(super) mark: Mark,
    /// `blob`'s plan state digest, which every slot of the step carries.
    pub(super) state: u64,
    /// About the bytes it holds (the blob, the rows and their documents, the mark):
    /// what bounds the plan thread's reach by memory ([`super::ahead::reach`]).
    pub(super) bytes: usize,
}

impl Planned {
    /// Plans `planner`'s next batch.
    pub(super) fn next(planner: &mut Planner) -> Planned {
        let batch = Arc::new(planner.next_batch_served());
        // The planner is past the batch now: its cursor, and the mark of that cursor,
        // say where the step after it starts.
        let mark = Mark {
            plan_step: planner.plan_step(),
            rows: planner.mix_state().rows.clone(),
        };
        let (blob, state) = planner.cursor_with_state();
        let segments: usize = batch.rows.iter().map(|r| r.segments.len()).sum();
        let bytes = blob.len()
            + 8 * mark.rows.len()
            + 4 * batch.counts.len()
            + std::mem::size_of::<crate::plan::Row>() * batch.rows.len()
            + std::mem::size_of::<crate::plan::Segment>() * segments;
        Planned {
            batch,
            blob,
            mark,
            state,
            bytes,
        }
    }
}

/// A ring's private planner (outside the job's window), with the steps it planned and
/// hinted ahead of the ring's next fill.
pub(super) struct Own {
    pub(super) planner: Planner,
    /// Steps `[next_fill, planner.step())`.
    pub(super) planned: VecDeque<Arc<Planned>>,
}

impl Own {
    pub(super) fn new(planner: Planner) -> Own {
        Own {
            planner,
            planned: VecDeque::new(),
        }
    }
}

/// The job's planner while the plan thread has it out: which checkout it is, and what
/// the planner said when it left.
struct Out {
    /// The checkout's number, unique in the hub: a reset (or a job gone and made
    /// again) no longer holds it, and the thread's batches are then dropped.
    id: u64,
    /// The planner's step when it left (the window's frontier meanwhile).
    frontier: u64,
    /// Its epoch progress then, for `status`.
    epochs: Vec<f64>,
}

/// The job's planner and the window of batches it planned.
#[derive(Default)]
pub(super) struct JobPlan {
    planner: Option<Planner>,
    /// Set while the plan thread plans with the planner, outside the lock.
    out: Option<Out>,
    /// Steps `[frontier - len, frontier)`, oldest first.
    batches: VecDeque<Arc<Planned>>,
    /// Batches the job's planner planned, and batches rings planned privately: what
    /// `status` reports (through /metrics) so that planning once per job is observable.
    pub(super) planned: u64,
    pub(super) private: u64,
    /// Of `planned`, the batches the plan thread planned outside the lock.
    pub(super) ahead: u64,
    /// The bytes of the batch planned last ([`Planned::bytes`]; 0 before the first):
    /// how many steps the plan thread's reach holds ([`Job::ahead`]).
    step_bytes: usize,
    /// Claims that found their step not planned while the plan thread had the planner
    /// out: each set a ring aside, and a worker with no other ring to fill waited. More
    /// than a few a minute says the plan thread does not keep up (too little CPU for it,
    /// or a plan that costs much per step).
    pub(super) waits: u64,
    /// Batches every rank passed, kept for the plan thread to free (with the thread
    /// on): it allocated them, and a copy thread freeing them under the hub's lock
    /// waited on the allocator's lock behind the thread (glibc frees into the arena
    /// that allocated), which was 39% of the copy thread's sleeps in a steady 2 x 8 run.
    retired: Vec<Arc<Planned>>,
}

/// The most passed batches a job keeps for the plan thread to free; beyond, the claim
/// frees them itself (the thread is behind or stopped).
const RETIRED_MAX: usize = 1024;

impl JobPlan {
    /// The epoch progress of the job's planner (empty without one), for `status`.
    pub(super) fn epochs(&self) -> Vec<f64> {
        match (&self.planner, &self.out) {
            (Some(p), _) => p.epochs(),
            (None, Some(o)) => o.epochs.clone(),
            (None, None) => Vec::new(),
        }
    }

    /// Batches held now.
    pub(super) fn held(&self) -> usize {
        self.batches.len()
    }

    /// The step the job's planner plans next (where it left, while it is out).
    fn frontier(&self) -> Option<u64> {
        match (&self.planner, &self.out) {
            (Some(p), _) => Some(p.step()),
            (None, Some(o)) => Some(o.frontier),
            (None, None) => None,
        }
    }

    /// The oldest step held (the frontier when none is).
    fn low(&self) -> Option<u64> {
        Some(self.frontier()? - self.batches.len() as u64)
    }

    /// Whether a ring that fills `step` next can read the job's batches from here on.
    fn covers(&self, step: u64) -> bool {
        match (self.low(), self.frontier()) {
            (Some(lo), Some(hi)) => lo <= step && step <= hi,
            _ => false,
        }
    }

    /// Starts over at `planner` with `ahead` (batches it planned already, from its step
    /// back) as the window.
    /// A planner the plan thread has out is forgotten: its batches are dropped when it
    /// comes back.
    pub(super) fn reset(&mut self, planner: Option<Planner>, ahead: VecDeque<Arc<Planned>>) {
        self.planner = planner;
        self.out = None;
        self.batches = ahead;
    }

    /// Hands the planner to the plan thread as checkout `id`; `None` when it has none or
    /// the thread has it already.
    pub(super) fn check_out(&mut self, id: u64) -> Option<Planner> {
        let p = self.planner.take()?;
        self.out = Some(Out {
            id,
            frontier: p.step(),
            epochs: p.epochs(),
        });
        Some(p)
    }

    /// Takes the planner of checkout `id` back with the batches it planned since
    /// (from where it left, in order), holding at most `keep`. Returns false, dropping
    /// both, when the plan was reset meanwhile.
    pub(super) fn check_in(
        &mut self,
        id: u64,
        planner: Planner,
        chunk: Vec<Arc<Planned>>,
        keep: usize,
    ) -> bool {
        let Some(out) = self.out.take_if(|o| o.id == id) else {
            return false;
        };
        debug_assert_eq!(
            chunk.first().map(|b| b.batch.step),
            (!chunk.is_empty()).then_some(out.frontier)
        );
        self.ahead += chunk.len() as u64;
        for b in chunk {
            self.push(b, keep);
        }
        self.planner = Some(planner);
        true
    }

    /// Whether the plan thread has the planner out now as checkout `id`.
    pub(super) fn is_checkout(&self, id: u64) -> bool {
        self.out.as_ref().is_some_and(|o| o.id == id)
    }

    /// Whether the plan thread has the planner out now.
    pub(super) fn is_out(&self) -> bool {
        self.out.is_some()
    }

    /// Adds the batch at the frontier, holding at most `keep`.
    fn push(&mut self, b: Arc<Planned>, keep: usize) {
        self.step_bytes = b.bytes;
        self.batches.push_back(b);
        self.planned += 1;
        if self.batches.len() > keep {
            self.batches.pop_front();
        }
    }

    /// Plans up to (not including) step `upto`, holding at most `keep` batches; calls
    /// `planned` with every batch it plans (checkpoints are offered there). Nothing while
    /// the plan thread has the planner out.
    fn plan_to(&mut self, upto: u64, keep: usize, planned: &mut dyn FnMut(&Planner, &Planned)) {
        let Some(p) = self.planner.as_mut() else {
            return;
        };
        let n = upto.saturating_sub(p.step());
        for b in plan_chunk(p, n, planned) {
            self.push(b, keep);
        }
    }

    fn get(&self, step: u64) -> Option<&Arc<Planned>> {
        let i = step.checked_sub(self.low()?)?;
        self.batches.get(usize::try_from(i).ok()?)
    }

    /// Drops the batches every rank has passed: `passed` is the lowest step a ring of
    /// the job fills next, or `None` while some rank of the job has no ring here (it may
    /// still join at an old step). With `retire` (the plan thread is on) they wait in
    /// [`JobPlan::take_retired`] for the thread to free them.
    fn drop_passed(&mut self, passed: Option<u64>, retire: bool) {
        let Some(passed) = passed else {
            return;
        };
        while self.batches.front().is_some_and(|b| b.batch.step < passed) {
            if let Some(b) = self.batches.pop_front() {
                if retire && self.retired.len() < RETIRED_MAX {
                    self.retired.push(b);
                }
            }
        }
    }

    /// The passed batches waiting to be freed, for the plan thread to drop outside the
    /// hub's lock.
    pub(super) fn take_retired(&mut self) -> Vec<Arc<Planned>> {
        std::mem::take(&mut self.retired)
    }
}

/// Issues page-cache hints for a rank's rows of a planned batch.
pub(super) type Hint<'a> = dyn Fn(&[Row]) + 'a;

/// What [`Job::take`] needs from the hub besides the job.
pub(super) struct Take<'a> {
    /// The plan in force (private planners are restored under it).
    pub(super) plan: &'a Arc<Plan>,
    /// Steps planned and hinted ahead of the one filled.
    pub(super) prefetch: u64,
    /// The plan thread runs: the job's planner plans inline only the step a ring needs
    /// now, and leaves the steps beyond to the thread.
    pub(super) ahead: bool,
    /// [`keep`].
    pub(super) keep: usize,
    /// Issues page-cache hints for a rank's rows; `None` when the reader takes none
    /// (`mmap`, io_uring in use), so that no planned batch is read for them: each is a
    /// miss to memory on the copy thread, per claim.
    pub(super) hint: Option<&'a Hint<'a>>,
    /// Told of every batch the job's planner plans, with the planner past it.
    pub(super) planned: &'a mut dyn FnMut(&Planner, &Planned),
}

impl Job {
    /// The batch ring `r` fills next (its `next_fill`): from the job's window when the
    /// ring is inside it, else from the ring's private planner; page-cache hints are
    /// issued for the rank's rows up to `prefetch` steps ahead. `None`: the step is not
    /// planned yet and the plan thread has the job's planner out (it plans the step, and
    /// wakes the workers when it puts it back). Err names why the ring's private planner
    /// could not be restored (the ring then stops).
    pub(super) fn take(&mut self, r: u32, t: Take<'_>) -> Result<Option<Arc<Planned>>, String> {
        let dp = self.dp_size;
        // Rings that read the job's window (a stopped ring no longer does).
        let followers = self
            .rings
            .iter()
            .filter(|(&k, e)| k != r && e.own.is_none() && e.failure().is_none())
            .count();
        let Some(e) = self.rings.get_mut(&r) else {
            return Err(format!("dp_rank {r} has no ring"));
        };
        let step = e.next_fill;
        // A ring with a planner of its own joins the window when it is inside it; when
        // no other ring follows the job's planner, the job takes this ring's planner.
        if let Some(own) = e.own.take() {
            if self.plan.covers(step) {
                e.hinted = e.hinted.max(own.planner.step());
            } else if followers == 0 {
                e.hinted = e.hinted.max(own.planner.step());
                self.plan.reset(Some(own.planner), own.planned);
            } else {
                e.own = Some(own);
            }
        }
        // A ring that fell behind the window plans on its own from its cursor.
        if e.own.is_none() && self.plan.low().is_none_or(|lo| step < lo) {
            let blob = match &e.taken {
                Some(p) => &p.blob,
                None => match e.cursors.back() {
                    Some(c) => &c.blob,
                    None => return Err(format!("dp_rank {r} holds no cursor")),
                },
            };
            let planner = t
                .plan
                .restore(blob)
                .map_err(|err| format!("restoring dp_rank {r}'s planner at step {step}: {err}"))?;
            if planner.step() != step {
                return Err(format!(
                    "dp_rank {r}'s cursor says step {}, its ring fills step {step}",
                    planner.step()
                ));
            }
            e.own = Some(Own::new(planner));
        }
        let last = step + t.prefetch;
        let planned = match &mut e.own {
            Some(own) => {
                while own.planned.len() as u64 <= t.prefetch {
                    let p = Arc::new(Planned::next(&mut own.planner));
                    if let Some(hint) = t.hint {
                        hint(p.batch.rank_rows(r, dp));
                    }
                    own.planned.push_back(p);
                    self.plan.private += 1;
                }
                own.planned.pop_front()
            }
            None => {
                let upto = if t.ahead { step + 1 } else { last + 1 };
                self.plan.plan_to(upto, t.keep, t.planned);
                if let Some(hint) = t.hint {
                    for s in e.hinted.max(step)..=last {
                        if let Some(p) = self.plan.get(s) {
                            hint(p.batch.rank_rows(r, dp));
                        }
                    }
                }
                // Steps the plan thread has not planned yet are hinted once it has.
                let planned_to = self.plan.frontier().unwrap_or(last + 1);
                e.hinted = e.hinted.max((last + 1).min(planned_to));
                let got = self.plan.get(step).cloned();
                if got.is_none() && self.plan.is_out() {
                    self.plan.waits += 1;
                    return Ok(None);
                }
                got
            }
        };
        let planned = planned.ok_or_else(|| format!("no batch planned for step {step}"))?;
        if planned.batch.step != step {
            return Err(format!(
                "the planner is at step {} but dp_rank {r}'s ring fills step {step}",
                planned.batch.step
            ));
        }
        e.taken = Some(planned.clone());
        let all_here = self.rings.len() as u64 >= u64::from(dp);
        let passed = all_here
            .then(|| self.rings.values().map(|e| e.next_fill).min())
            .flatten();
        self.plan.drop_passed(passed, t.ahead);
        Ok(Some(planned))
    }

    /// Steps the plan thread plans beyond a worker's reach for this job, whose global
    /// batches have `batch_rows` rows: [`super::ahead::thread_ahead`] steps, fewer where
    /// its batches are large in bytes ([`super::ahead::reach`]).
    pub(super) fn ahead(&self, batch_rows: u32) -> u64 {
        super::ahead::reach(thread_ahead(batch_rows), self.plan.step_bytes)
    }

    /// Steps a rank of this job may trail its most advanced ring and still read the
    /// job's batches: [`job_lag`] steps, fewer where its batches are large in bytes (at
    /// most [`LAG_BYTES`] of them), never fewer than [`JOB_LAG`].
    pub(super) fn lag(&self, batch_rows: u32) -> u64 {
        let by_bytes = LAG_BYTES / (self.plan.step_bytes as u64).max(1);
        job_lag(batch_rows).min(by_bytes.max(JOB_LAG))
    }

    /// The most batches this job's window holds ([`keep`] with its reach and lag).
    pub(super) fn keep(&self, slots: u32, prefetch: u32, batch_rows: u32) -> usize {
        keep(
            slots,
            prefetch,
            self.ahead(batch_rows),
            self.lag(batch_rows),
        )
    }

    /// Steps the job's planner is short of the plan thread's reach for the rings that
    /// read its window: every step such a ring may claim now (below its peers' release
    /// plus `slots`), `prefetch` beyond, as a worker's claim would plan inline, and
    /// `ahead` more ([`Job::ahead`]). 0 while the planner is out or
    /// absent.
    pub(super) fn short(&self, slots: u32, prefetch: u32, ahead: u64) -> u64 {
        let Some(frontier) = self.plan.planner.as_ref().map(Planner::step) else {
            return 0;
        };
        let reach = self
            .rings
            .values()
            .filter(|e| {
                e.own.is_none() && e.started() && e.failure().is_none() && !e.peers.is_empty()
            })
            .map(|e| e.base() + u64::from(slots) + u64::from(prefetch) + ahead)
            .max();
        reach.map_or(0, |r| r.saturating_sub(frontier))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serve::hub::phase::tests::{entry, peer, plan};

    /// A window of [`JOB_LAG`] steps beyond 4 slots and 4 prefetched (batches too big
    /// for [`JOB_LAG_ROWS`] to give more), so that tests can stall a rank past it.
    const SMALL: usize = 4 + 4 + JOB_LAG as usize;

    /// Job `dp` ranks, each with a fresh ring at step 0 and one peer.
    fn job(dp: u32) -> Job {
        let mut job = Job::new(dp);
        for r in 0..dp {
            let mut e = entry(1, false);
            e.join(1, peer("p"));
            job.rings.insert(r, e);
        }
        job
    }

    /// Rank `r` takes its next step (as a worker's claim does) from a window of [`SMALL`].
    fn take(job: &mut Job, r: u32, plan: &Arc<Plan>) -> Arc<Planned> {
        take_keeping(job, r, plan, SMALL)
    }

    /// Rank `r` takes its next step from a window of at most `keep` batches.
    fn take_keeping(job: &mut Job, r: u32, plan: &Arc<Plan>, keep: usize) -> Arc<Planned> {
        try_take(job, r, plan, keep).expect("the job's planner is in")
    }

    /// Rank `r` takes its next step, if it is planned or can be planned inline (`None`
    /// while the plan thread has the job's planner out and the step is not planned).
    fn try_take(job: &mut Job, r: u32, plan: &Arc<Plan>, keep: usize) -> Option<Arc<Planned>> {
        let p = job
            .take(
                r,
                Take {
                    plan,
                    prefetch: 4,
                    ahead: false,
                    keep,
                    hint: None,
                    planned: &mut |_, _| {},
                },
            )
            .expect("the step is planned")?;
        if let Some(e) = job.rings.get_mut(&r) {
            e.claim_step(p.batch.step);
        }
        Some(p)
    }

    /// What the plan thread does with checkout `id`: the job's planner out, `n` batches
    /// planned without the job, back in. Returns whether they were taken back.
    fn plan_ahead(job: &mut Job, id: u64, n: u64, keep: usize) -> bool {
        let mut planner = job.plan.check_out(id).expect("the planner is in");
        let chunk = plan_chunk(&mut planner, n, &mut |_, _| {});
        job.plan.check_in(id, planner, chunk, keep)
    }

    #[test]
    fn a_worker_never_plans_while_the_planner_is_out() {
        let plan = plan();
        let mut job = job(2);
        let mut want = plan.start();
        assert_eq!(job.short(4, 4, 32), 0, "no planner yet");
        assert_eq!(*take(&mut job, 0, &plan).batch, want.next_batch());
        // Step 0 and the 4 prefetched; the rings may claim up to step 3 and prefetch 4
        // beyond it, and the thread plans `ahead` (here 32) more.
        assert_eq!((job.plan.planned, job.short(4, 4, 32)), (5, 3 + 32));
        let mut planner = job.plan.check_out(1).expect("the planner is in");
        assert!(job.plan.check_out(2).is_none(), "out once");
        assert_eq!(job.short(4, 4, 32), 0, "the thread has it");
        for _ in 1..5 {
            assert_eq!(*take(&mut job, 0, &plan).batch, want.next_batch());
        }
        // Step 5 is not planned: the worker does not plan it, and the ring stays where it
        // was, reading the job's window.
        assert_eq!(job.plan.waits, 0);
        assert!(try_take(&mut job, 0, &plan, SMALL).is_none());
        assert!(try_take(&mut job, 0, &plan, SMALL).is_none());
        assert_eq!((job.plan.planned, job.plan.private), (5, 0));
        assert_eq!(
            job.plan.waits, 2,
            "each claim that found its step unplanned counts"
        );
        assert_eq!(job.rings[&0].next_fill, 5);
        assert!(job.rings[&0].own.is_none());
        // Rank 1 reads the window meanwhile.
        let mut behind = plan.start();
        assert_eq!(*take(&mut job, 1, &plan).batch, behind.next_batch());
        let chunk = plan_chunk(&mut planner, 8, &mut |_, _| {});
        assert!(job.plan.check_in(1, planner, chunk, SMALL));
        assert_eq!((job.plan.planned, job.plan.ahead), (13, 8));
        for _ in 5..13 {
            assert_eq!(*take(&mut job, 0, &plan).batch, want.next_batch());
        }
        assert_eq!(
            job.plan.planned,
            13 + 4,
            "inline again: the prefetch beyond 12"
        );
    }

    /// A job of 2 ranks whose rank 0 took step 0, and a planner past step 0 to check the
    /// batches against.
    fn begun() -> (Arc<Plan>, Job, Planner) {
        let plan = plan();
        let mut job = job(2);
        let mut want = plan.start();
        assert_eq!(*take(&mut job, 0, &plan).batch, want.next_batch());
        (plan, job, want)
    }

    #[test]
    fn a_reset_drops_what_the_plan_thread_planned_meanwhile() {
        let (plan, mut job, mut want) = begun();
        let mut planner = job.plan.check_out(7).expect("the planner is in");
        let chunk = plan_chunk(&mut planner, 8, &mut |_, _| {});
        // A live change restores the job's planner at rank 0's step 1 meanwhile.
        let mut restored = plan.start();
        restored.skip_batch();
        job.plan.reset(Some(restored), VecDeque::new());
        assert!(!job.plan.check_in(7, planner, chunk, SMALL));
        assert_eq!((job.plan.held(), job.plan.ahead), (0, 0));
        for _ in 1..20 {
            assert_eq!(*take(&mut job, 0, &plan).batch, want.next_batch());
        }
        // A job gone and made again under the same name: the old checkout is not its.
        let mut again = self::job(2);
        assert_eq!(*take(&mut again, 0, &plan).batch, plan.start().next_batch());
        let mut old = plan.start();
        let chunk = plan_chunk(&mut old, 3, &mut |_, _| {});
        assert!(!again.plan.check_in(7, old, chunk, SMALL));
        assert!(
            plan_ahead(&mut again, 8, 3, SMALL),
            "its own checkout goes back"
        );
    }

    #[test]
    fn batches_planned_ahead_come_back_in_order_within_keep() {
        let (plan, mut job, mut want) = begun();
        assert_eq!(*take(&mut job, 1, &plan).batch, plan.start().next_batch());
        // Rank 1 stalls at step 1; the thread plans 6 at a time ahead of rank 0, with
        // the workers planning inline in between.
        for i in 1..300u64 {
            if i % 6 == 0 {
                assert!(plan_ahead(&mut job, i, 6, SMALL));
            }
            let p = take(&mut job, 0, &plan);
            assert_eq!(*p.batch, want.next_batch(), "step {i}");
            assert!(job.plan.held() <= SMALL, "{} held", job.plan.held());
        }
        assert_eq!(job.plan.held(), SMALL);
        assert_eq!(job.plan.ahead, 49 * 6);
        assert_eq!(job.plan.planned, 300 + 4, "each step once");
        assert_eq!(job.plan.private, 0);
    }

    #[test]
    fn ranks_in_step_share_each_batch_and_it_leaves_once_all_passed_it() {
        let plan = plan();
        let mut job = job(2);
        let mut want = plan.start();
        for _ in 0..50 {
            let b = want.next_batch();
            let (p0, p1) = (take(&mut job, 0, &plan), take(&mut job, 1, &plan));
            assert!(Arc::ptr_eq(&p0, &p1), "planned once for both ranks");
            assert_eq!((&*p0.batch, &p0.blob), (&b, &want.cursor()));
            assert!(job.plan.held() <= 5, "{} held", job.plan.held());
        }
        // Steps 0..50 and the 4 beyond that prefetch hinted.
        assert_eq!((job.plan.planned, job.plan.private), (54, 0));
    }

    #[test]
    fn a_stalled_rank_costs_at_most_keep_batches_and_then_plans_on_its_own() {
        let plan = plan();
        let mut job = job(2);
        let mut want = plan.start();
        let first = want.next_batch();
        assert_eq!(*take(&mut job, 0, &plan).batch, first);
        assert_eq!(*take(&mut job, 1, &plan).batch, first);
        assert!(
            job.rings[&1].own.is_none(),
            "rank 1 reads the job's batches"
        );
        for _ in 1..200 {
            let p = take(&mut job, 0, &plan);
            assert_eq!(*p.batch, want.next_batch());
            assert!(job.plan.held() <= SMALL);
        }
        assert_eq!(job.plan.held(), SMALL, "rank 1 may still need them");
        assert_eq!(job.plan.private, 0);
        // Rank 1 stalled at step 1, far behind the window: it plans on its own, from
        // the cursor of the step it last took.
        let mut want = plan.start();
        want.skip_batch();
        for _ in 0..10 {
            assert_eq!(*take(&mut job, 1, &plan).batch, want.next_batch());
        }
        assert!(job.rings[&1].own.is_some());
        assert_eq!(job.plan.private, 14, "10 steps and the 4 prefetched");
        assert_eq!(job.plan.held(), SMALL);
    }

    #[test]
    fn the_window_holds_job_lag_rows_and_at_least_job_lag_steps() {
        // Slots and prefetch, the plan thread's steps ahead, and the lag.
        let keep = |slots, prefetch, rows| {
            let job = job(1);
            assert_eq!(
                (job.ahead(rows), job.lag(rows)),
                (thread_ahead(rows), job_lag(rows)),
                "nothing planned: bounded by rows only"
            );
            job.keep(slots, prefetch, rows)
        };
        assert_eq!(keep(4, 4, 1 << 20), 8 + 32 + JOB_LAG as usize);
        assert_eq!(
            keep(4, 4, JOB_LAG_ROWS as u32 / 8),
            8 + 32 + JOB_LAG as usize
        );
        assert_eq!(keep(4, 4, 32), 8 + 256 + 1024);
        assert_eq!(
            keep(4, 4, 0),
            8 + 512 + JOB_LAG_ROWS as usize,
            "no division by zero"
        );
    }

    /// The plan thread's reach is bounded in bytes too: a job whose batches are large
    /// (cursor blobs of many domains, or of a long journal) is planned fewer steps
    /// ahead, never fewer than 32, so that 1000 domains do not hold 64 MB of plans; and
    /// the lag a stalled rank holds is bounded at [`LAG_BYTES`].
    #[test]
    fn the_plan_threads_reach_and_the_lag_are_bounded_in_bytes() {
        use super::super::ahead::{reach, thread_ahead, AHEAD_BYTES};
        assert_eq!(reach(512, 0), 512, "nothing planned yet");
        assert_eq!(reach(512, 4 << 10), 512, "4 domains' batches are a few KB");
        assert_eq!(reach(512, 126_000), AHEAD_BYTES / 126_000);
        assert_eq!(reach(512, 4 << 20), 32, "at least the 32 steps of before");
        assert_eq!(reach(32, 100), 32);
        // A job's reach follows the bytes of the batch it planned last.
        let plan = plan();
        let rows = plan.config().global_batch_rows;
        let mut job = job(2);
        assert_eq!(job.ahead(rows), thread_ahead(rows));
        let p = take(&mut job, 0, &plan);
        let segments: usize = p.batch.rows.iter().map(|r| r.segments.len()).sum();
        assert!(p.bytes > p.blob.len() + segments * std::mem::size_of::<crate::plan::Segment>());
        let last = job.plan.batches.back().expect("planned ahead").bytes;
        assert_eq!(job.plan.step_bytes, last);
        assert_eq!(job.ahead(rows), reach(thread_ahead(rows), last));
        job.plan.step_bytes = 1 << 20;
        assert_eq!(job.ahead(rows), 32);
        // The thread is short of the rings' claims and prefetch, and of that reach.
        assert_eq!(job.short(4, 4, job.ahead(rows)), 4 + 4 + 32 - 5);
        // The lag a rank may trail by is bounded in bytes the same way, at LAG_BYTES,
        // never below JOB_LAG, and the window's bound follows both.
        assert_eq!(job.lag(rows), JOB_LAG, "64 MiB of 1 MiB batches");
        assert_eq!(job.keep(4, 4, rows), 8 + 32 + JOB_LAG as usize);
        job.plan.step_bytes = 32 << 10;
        assert_eq!(job.lag(rows), job_lag(rows).min(2048));
        assert_eq!(job.ahead(rows), thread_ahead(rows).min(128));
        job.plan.step_bytes = 100;
        assert_eq!(
            (job.ahead(rows), job.lag(rows)),
            (thread_ahead(rows), job_lag(rows))
        );
    }

    #[test]
    fn ranks_drifting_hundreds_of_small_steps_apart_plan_each_batch_once() {
        // 8 free-running ranks of 32-row steps drifted 140-230 steps apart in the bench;
        // with a window of 64 steps the laggards planned every batch again.
        let plan = plan();
        let mut job = job(2);
        let keep = job.keep(4, 4, 32);
        let mut want = plan.start();
        let mut behind = plan.start();
        for i in 0..600 {
            assert_eq!(
                *take_keeping(&mut job, 0, &plan, keep).batch,
                want.next_batch()
            );
            if i % 2 == 1 {
                // Rank 1 runs at half speed: 300 steps behind at the end.
                let p = take_keeping(&mut job, 1, &plan, keep);
                assert_eq!(*p.batch, behind.next_batch());
            }
        }
        assert_eq!(job.rings[&0].next_fill - job.rings[&1].next_fill, 300);
        assert!(
            job.rings[&1].own.is_none(),
            "rank 1 reads the job's batches"
        );
        assert_eq!((job.plan.planned, job.plan.private), (604, 0));
        assert!(job.plan.held() <= 305, "{} held", job.plan.held());
    }
}
