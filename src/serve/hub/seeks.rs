//! Shared seeks: the admissions that seek one plan to one start step (a rank's TP peers,
//! a job's dp ranks) run one replay between them. The first runs it; the others wait
//! for it and take a copy of its planner; a client that leaves ends only its own wait.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use tracing::info;

use crate::plan::{Plan, Planner};

/// Seeks of start steps in progress (or done, while an admission still wants them), by
/// plan and step: a rank's TP peers and a job's dp ranks all seek one global step, and
/// each running the replay took its CPU and memory as many times over (four TP peers
/// took 12 s where one took 3 s). The first admission runs the seek; the others wait for
/// it and take a copy of its planner.
#[derive(Default)]
pub struct SeekFlights {
    flights: Mutex<Vec<Arc<Flight>>>,
}

/// One seek that admissions share.
struct Flight {
    /// The plan it seeks in (compared by pointer: a reload or live change is another).
    plan: Arc<Plan>,
    step: u64,
    /// The tickets held for it; it leaves the registry with the last one. Changed only
    /// under the registry's lock.
    tickets: std::sync::atomic::AtomicUsize,
    state: Mutex<Sought>,
    /// Wakes admissions waiting for the seek in another's hands.
    changed: Condvar,
    /// Set once the planner is there: what a connection waiting for an admission slot
    /// watches (it then needs no seek slot).
    done: tokio::sync::watch::Sender<bool>,
}

/// Where a shared seek stands.
enum Sought {
    /// Nobody runs it: the next admission that needs it does (also after a run was
    /// cancelled by its client leaving, so the others are not refused with it).
    Idle,
    Running,
    Done(Planner),
}

/// A hold on a shared seek: while any is held, its result stays for the holders.
pub struct SeekTicket {
    flights: Arc<SeekFlights>,
    flight: Arc<Flight>,
}

/// How often an admission waiting for another's seek looks at its own client's cancel.
const FLIGHT_POLL: Duration = Duration::from_millis(50);

impl SeekFlights {
    /// A ticket for the seek of `plan` to `step`, registering it if nobody had.
    pub fn ticket(self: &Arc<Self>, plan: &Arc<Plan>, step: u64) -> SeekTicket {
        let mut all = lock(&self.flights);
        let found = all
            .iter()
            .find(|f| f.step == step && Arc::ptr_eq(&f.plan, plan))
            .cloned();
        let flight = found.unwrap_or_else(|| {
            let f = Arc::new(Flight {
                plan: plan.clone(),
                step,
                tickets: Default::default(),
                state: Mutex::new(Sought::Idle),
                changed: Condvar::new(),
                done: tokio::sync::watch::Sender::new(false),
            });
            all.push(f.clone());
            f
        });
        flight.tickets.fetch_add(1, Ordering::Relaxed);
        SeekTicket {
            flights: self.clone(),
            flight,
        }
    }
}

impl Drop for SeekTicket {
    fn drop(&mut self) {
        let mut all = lock(&self.flights.flights);
        if self.flight.tickets.fetch_sub(1, Ordering::Relaxed) == 1 {
            all.retain(|f| !Arc::ptr_eq(f, &self.flight));
        }
    }
}

impl SeekTicket {
    /// Whether this ticket is for a seek of `plan` (a reload or live change since the
    /// ticket was taken makes the seek of the new plan another).
    pub(super) fn is_of(&self, plan: &Arc<Plan>) -> bool {
        Arc::ptr_eq(&self.flight.plan, plan)
    }

    /// A ticket from the same registry for `plan` at `step`.
    pub(super) fn renewed(&self, plan: &Arc<Plan>, step: u64) -> SeekTicket {
        self.flights.ticket(plan, step)
    }

    /// Whether the seek's planner is there (taking it needs no seek).
    pub fn done(&self) -> bool {
        *self.flight.done.borrow()
    }

    /// Resolves once the seek's planner is there.
    pub async fn finished(&self) {
        let mut rx = self.flight.done.subscribe();
        // The sender lives in the flight, which this ticket holds: never closed.
        let _ = rx.wait_for(|d| *d).await;
    }

    /// The seek's planner: a copy of the result when another admission ran it, else
    /// `run`'s (kept for the others when `run` says it may be shared). `None` when
    /// `cancel` is set (this client left) or `run` was cancelled; another admission
    /// waiting then runs it itself, as it does after a run whose result is not shared.
    pub(super) fn seek(
        &self,
        cancel: &AtomicBool,
        run: impl FnOnce() -> Option<(Planner, bool)>,
    ) -> Option<Planner> {
        let f = &self.flight;
        let mut st = lock(&f.state);
        loop {
            match &*st {
                Sought::Done(p) => {
                    info!(
                        step = f.step,
                        "took the planner of a seek another admission ran"
                    );
                    return Some(p.clone());
                }
                Sought::Running => {
                    if cancel.load(Ordering::Relaxed) {
                        return None;
                    }
                    st = (f.changed.wait_timeout(st, FLIGHT_POLL))
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
                Sought::Idle => {
                    *st = Sought::Running;
                    drop(st);
                    // Reset to idle whatever happens, a panic included, so no one
                    // waits on a run nobody makes.
                    let mut idle = ResetIdle(Some(f));
                    let r = run();
                    idle.0 = None;
                    let mut st = lock(&f.state);
                    let mine = match r {
                        Some((p, true)) => {
                            let copy = p.clone();
                            *st = Sought::Done(p);
                            f.done.send_replace(true);
                            Some(copy)
                        }
                        Some((p, false)) => {
                            *st = Sought::Idle;
                            Some(p)
                        }
                        None => {
                            *st = Sought::Idle;
                            None
                        }
                    };
                    f.changed.notify_all();
                    return mine;
                }
            }
        }
    }
}

/// Puts a flight back to idle if its run ends without a result (unwinding).
struct ResetIdle<'a>(Option<&'a Flight>);

impl Drop for ResetIdle<'_> {
    fn drop(&mut self) {
        if let Some(f) = self.0 {
            *lock(&f.state) = Sought::Idle;
            f.changed.notify_all();
        }
    }
}

/// Locks `m`, whatever a panicking holder left (the data stays consistent: every
/// change under these locks is one assignment).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;
    use std::sync::mpsc;

    use super::*;
    use crate::serve::hub::phase::tests::plan;

    /// The admissions of one plan and step share one run, and each gets a planner
    /// that continues as the seek's own does.
    #[test]
    fn tickets_of_one_step_share_one_run() {
        let (plan, flights) = (plan(), Arc::new(SeekFlights::default()));
        let runs = AtomicUsize::new(0);
        let tickets: Vec<SeekTicket> = (0..4).map(|_| flights.ticket(&plan, 7)).collect();
        let no = AtomicBool::new(false);
        let got: Vec<Planner> = std::thread::scope(|s| {
            let joins: Vec<_> = (tickets.iter())
                .map(|t| {
                    s.spawn(|| {
                        t.seek(&no, || {
                            runs.fetch_add(1, Ordering::Relaxed);
                            Some((plan.seek(7), true))
                        })
                    })
                })
                .collect();
            (joins.into_iter())
                .map(|j| j.join().expect("no panic").expect("a planner"))
                .collect()
        });
        assert_eq!(runs.load(Ordering::Relaxed), 1);
        let mut want = plan.seek(7);
        let want = (want.cursor(), want.next_batch(), want.next_batch());
        for mut p in got {
            assert_eq!((p.cursor(), p.next_batch(), p.next_batch()), want);
        }
        // Another plan (a reload makes one) is another seek; the last ticket of a seek
        // takes it out of the registry.
        let other = super::super::phase::tests::plan();
        let t = flights.ticket(&other, 7);
        assert!(!Arc::ptr_eq(&t.flight, &tickets[0].flight));
        drop(t);
        drop(tickets);
        assert!(lock(&flights.flights).is_empty());
    }

    /// The first admission's client leaves mid-seek: the one waiting for it runs the
    /// seek itself instead of being refused with it. A result that read a lost page
    /// (not shared) has the next one run its own too.
    #[test]
    fn a_cancelled_or_unsound_run_is_run_again_by_a_waiter() {
        let (plan, flights) = (plan(), Arc::new(SeekFlights::default()));
        for leader in [None, Some(false)] {
            let (a, b) = (flights.ticket(&plan, 3), flights.ticket(&plan, 3));
            let no = AtomicBool::new(false);
            let ((started, running), (go, wait)) = (mpsc::channel(), mpsc::channel::<()>());
            let runs = AtomicUsize::new(0);
            std::thread::scope(|s| {
                let (a, no, plan) = (&a, &no, &plan);
                let first = s.spawn(move || {
                    a.seek(no, || {
                        started.send(()).expect("the test waits");
                        wait.recv().expect("the test goes on");
                        leader.map(|sound| (plan.seek(3), sound))
                    })
                });
                running.recv().expect("the first run starts");
                let (b, runs) = (&b, &runs);
                let second = s.spawn(move || {
                    b.seek(no, || {
                        runs.fetch_add(1, Ordering::Relaxed);
                        Some((plan.seek(3), true))
                    })
                });
                go.send(()).expect("the first run waits");
                assert_eq!(first.join().expect("no panic").is_some(), leader.is_some());
                let p = second
                    .join()
                    .expect("no panic")
                    .expect("the waiter's planner");
                assert_eq!(p.step(), 3);
            });
            assert_eq!(runs.load(Ordering::Relaxed), 1, "leader {leader:?}");
        }
    }
}
