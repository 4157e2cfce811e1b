//! Tests of the job's window of planned batches (`jobplan`): what a worker's claim takes
//! from it, what the plan thread puts back, and what it holds and for how long.

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
