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
mod tests;
