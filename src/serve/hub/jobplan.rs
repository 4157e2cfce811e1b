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

use std::collections::VecDeque;
use std::sync::Arc;

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
/// 2^15 rows of plans are a few MB (a row is ~50 bytes plus ~56 per document in it).
pub(super) const JOB_LAG_ROWS: u64 = 1 << 15;

/// The most batches one job's plan holds (`batch_rows`: rows per global batch): the
/// bound on what a stalled rank can make the daemon keep.
pub(super) fn keep(slots: u32, prefetch: u32, batch_rows: u32) -> usize {
    let lag = (JOB_LAG_ROWS / u64::from(batch_rows.max(1))).max(JOB_LAG);
    slots as usize + prefetch as usize + lag as usize
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
}

impl Planned {
    /// Plans `planner`'s next batch.
    pub(super) fn next(planner: &mut Planner) -> Planned {
        let batch = Arc::new(planner.next_batch());
        // The planner is past the batch now: its cursor, and the mark of that cursor,
        // say where the step after it starts.
        let mark = Mark {
            plan_step: planner.plan_step(),
            rows: planner.mix_state().rows.clone(),
        };
        Planned {
            batch,
            blob: planner.cursor(),
            mark,
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

/// The job's planner and the window of batches it planned.
#[derive(Default)]
pub(super) struct JobPlan {
    planner: Option<Planner>,
    /// Steps `[frontier - len, frontier)`, oldest first.
    batches: VecDeque<Arc<Planned>>,
    /// Batches the job's planner planned, and batches rings planned privately: what
    /// `status` reports (through /metrics) so that planning once per job is observable.
    pub(super) planned: u64,
    pub(super) private: u64,
}

impl JobPlan {
    /// The job's planner, if it has one (for the epochs `status` reports).
    pub(super) fn planner(&self) -> Option<&Planner> {
        self.planner.as_ref()
    }

    /// Batches held now.
    pub(super) fn held(&self) -> usize {
        self.batches.len()
    }

    /// The step the job's planner plans next.
    fn frontier(&self) -> Option<u64> {
        self.planner.as_ref().map(Planner::step)
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
    pub(super) fn reset(&mut self, planner: Option<Planner>, ahead: VecDeque<Arc<Planned>>) {
        self.planner = planner;
        self.batches = ahead;
    }

    /// Plans up to (not including) step `upto`, holding at most `keep` batches; calls
    /// `planned` with every batch it plans (checkpoints are offered there).
    fn plan_to(&mut self, upto: u64, keep: usize, planned: &mut dyn FnMut(&Planner, &Planned)) {
        let Some(p) = self.planner.as_mut() else {
            return;
        };
        while p.step() < upto {
            let b = Arc::new(Planned::next(p));
            planned(p, &b);
            self.batches.push_back(b);
            self.planned += 1;
            if self.batches.len() > keep {
                self.batches.pop_front();
            }
        }
    }

    fn get(&self, step: u64) -> Option<&Arc<Planned>> {
        let i = step.checked_sub(self.low()?)?;
        self.batches.get(usize::try_from(i).ok()?)
    }

    /// Drops the batches every rank has passed: `passed` is the lowest step a ring of
    /// the job fills next, or `None` while some rank of the job has no ring here (it may
    /// still join at an old step).
    fn drop_passed(&mut self, passed: Option<u64>) {
        let Some(passed) = passed else {
            return;
        };
        while self.batches.front().is_some_and(|b| b.batch.step < passed) {
            self.batches.pop_front();
        }
    }
}

/// What [`Job::take`] needs from the hub besides the job.
pub(super) struct Take<'a> {
    /// The plan in force (private planners are restored under it).
    pub(super) plan: &'a Arc<Plan>,
    /// Steps planned and hinted ahead of the one filled.
    pub(super) prefetch: u64,
    /// [`keep`].
    pub(super) keep: usize,
    /// Issues page-cache hints for a rank's rows.
    pub(super) hint: &'a dyn Fn(&[Row]),
    /// Told of every batch the job's planner plans, with the planner past it.
    pub(super) planned: &'a mut dyn FnMut(&Planner, &Planned),
}

impl Job {
    /// The batch ring `r` fills next (its `next_fill`): from the job's window when the
    /// ring is inside it, else from the ring's private planner; page-cache hints are
    /// issued for the rank's rows up to `prefetch` steps ahead. Err names why the ring's
    /// private planner could not be restored (the ring then stops).
    pub(super) fn take(&mut self, r: u32, t: Take<'_>) -> Result<Arc<Planned>, String> {
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
                    (t.hint)(p.batch.rank_rows(r, dp));
                    own.planned.push_back(p);
                    self.plan.private += 1;
                }
                own.planned.pop_front()
            }
            None => {
                self.plan.plan_to(last + 1, t.keep, t.planned);
                for s in e.hinted.max(step)..=last {
                    if let Some(p) = self.plan.get(s) {
                        (t.hint)(p.batch.rank_rows(r, dp));
                    }
                }
                e.hinted = e.hinted.max(last + 1);
                self.plan.get(step).cloned()
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
        self.plan.drop_passed(passed);
        Ok(planned)
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
        let p = job
            .take(
                r,
                Take {
                    plan,
                    prefetch: 4,
                    keep,
                    hint: &|_| {},
                    planned: &mut |_, _| {},
                },
            )
            .expect("the step is planned");
        if let Some(e) = job.rings.get_mut(&r) {
            e.claim_step(p.batch.step);
        }
        p
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
        assert_eq!(SMALL, keep(4, 4, 1 << 20));
        assert_eq!(SMALL, keep(4, 4, JOB_LAG_ROWS as u32 / 8));
        assert_eq!(keep(4, 4, 32), 8 + 1024);
        assert_eq!(
            keep(4, 4, 0),
            8 + JOB_LAG_ROWS as usize,
            "no division by zero"
        );
    }

    #[test]
    fn ranks_drifting_hundreds_of_small_steps_apart_plan_each_batch_once() {
        // 8 free-running ranks of 32-row steps drifted 140-230 steps apart in the bench;
        // with a window of 64 steps the laggards planned every batch again.
        let plan = plan();
        let mut job = job(2);
        let keep = keep(4, 4, 32);
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
