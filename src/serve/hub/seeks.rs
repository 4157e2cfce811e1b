//! Shared seeks: the admissions that seek one plan to one start step (a rank's TP peers,
//! a job's dp ranks) run one replay between them. The first runs it, in a seek slot;
//! the others wait for it in no slot and no thread (the connection watches the seek's
//! [`SeekPhase`]) and then take a copy of its planner; a client that leaves ends only its
//! own part.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

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
    /// The state's phase, for connections that wait for it without a thread: changed
    /// under `state`'s lock with it.
    phase: tokio::sync::watch::Sender<SeekPhase>,
}

/// Where a shared seek stands.
enum Sought {
    /// Nobody runs it: the next admission in a seek slot does (also after a run was
    /// cancelled by its client leaving, so the others are not refused with it).
    Idle,
    Running,
    Done(Planner),
}

/// [`Sought`] without its planner: what a connection deciding its admission slot
/// watches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SeekPhase {
    /// Nobody runs it: a seek slot is needed to run it.
    Idle,
    /// Another admission runs it: wait, holding no slot.
    Running,
    /// Its planner is there: an ordinary slot takes a copy.
    Done,
}

impl Sought {
    fn phase(&self) -> SeekPhase {
        match self {
            Sought::Idle => SeekPhase::Idle,
            Sought::Running => SeekPhase::Running,
            Sought::Done(_) => SeekPhase::Done,
        }
    }
}

/// Why [`SeekTicket::seek`] gave no planner.
#[derive(Debug, PartialEq, Eq)]
pub enum NotSought {
    /// The client left, or its own run was cancelled.
    Cancelled,
    /// Not in this admission's hands: another runs it, or it is idle and this admission
    /// holds no seek slot, or the ticket is of a plan no longer in force. The
    /// connection waits for the seek's phase to change, in no slot, and tries again.
    Wait,
}

/// Why an admission let its client in neither way: refused, or told to wait for a seek
/// in another admission's hands ([`NotSought::Wait`]), which the connection does in no
/// slot and no thread before it tries again.
#[derive(Debug)]
pub enum NotAdmitted {
    /// The client is refused (or the seek was cancelled by its leaving).
    Refused(crate::wire::Refusal),
    /// Wait for the seek's phase to change, then try again.
    Wait,
}

impl From<crate::wire::Refusal> for NotAdmitted {
    fn from(r: crate::wire::Refusal) -> NotAdmitted {
        NotAdmitted::Refused(r)
    }
}

/// A hold on a shared seek: while any is held, its result stays for the holders.
pub struct SeekTicket {
    flights: Arc<SeekFlights>,
    flight: Arc<Flight>,
}

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
                phase: tokio::sync::watch::Sender::new(SeekPhase::Idle),
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

impl Flight {
    /// Sets the state and its phase together.
    fn set(&self, st: &mut Sought, to: Sought) {
        *st = to;
        self.phase.send_replace(st.phase());
    }
}

impl SeekTicket {
    /// Whether this ticket is for a seek of `plan` (a reload or live change since the
    /// ticket was taken makes the seek of the new plan another).
    pub(super) fn is_of(&self, plan: &Arc<Plan>) -> bool {
        Arc::ptr_eq(&self.flight.plan, plan)
    }

    /// Where the seek stands now.
    pub fn phase(&self) -> SeekPhase {
        *self.flight.phase.borrow()
    }

    /// Resolves once the seek's phase is other than `seen`.
    pub async fn changed_from(&self, seen: SeekPhase) {
        let mut rx = self.flight.phase.subscribe();
        // The sender lives in the flight, which this ticket holds: never closed.
        let _ = rx.wait_for(|p| *p != seen).await;
    }

    /// The seek's planner: a copy of the result when another admission ran it, else
    /// `run`'s (kept for the others when `run` says it may be shared), run only by an
    /// admission in a seek slot (`may_run`). It never waits: while another admission
    /// runs it, or while it is idle and this one may not run it, it answers
    /// [`NotSought::Wait`], and the connection waits for the phase to change holding no
    /// slot and no thread (a waiter that held a seek slot kept every other seek waiting
    /// on one replay; one that held a thread let a flood of one step take a thread
    /// each).
    pub(super) fn seek(
        &self,
        cancel: &AtomicBool,
        may_run: bool,
        run: impl FnOnce() -> Option<(Planner, bool)>,
    ) -> Result<Planner, NotSought> {
        let f = &self.flight;
        let mut st = lock(&f.state);
        match &*st {
            Sought::Done(p) => {
                info!(
                    step = f.step,
                    "took the planner of a seek another admission ran"
                );
                Ok(p.clone())
            }
            Sought::Running => Err(NotSought::Wait),
            Sought::Idle if !may_run => Err(NotSought::Wait),
            Sought::Idle => {
                if cancel.load(Ordering::Relaxed) {
                    return Err(NotSought::Cancelled);
                }
                f.set(&mut st, Sought::Running);
                drop(st);
                // Reset to idle whatever happens, a panic included, so no one waits on
                // a run nobody makes.
                let mut idle = ResetIdle(Some(f));
                let r = run();
                idle.0 = None;
                let mut st = lock(&f.state);
                match r {
                    Some((p, true)) => {
                        let copy = p.clone();
                        f.set(&mut st, Sought::Done(p));
                        Ok(copy)
                    }
                    Some((p, false)) => {
                        f.set(&mut st, Sought::Idle);
                        Ok(p)
                    }
                    None => {
                        f.set(&mut st, Sought::Idle);
                        Err(NotSought::Cancelled)
                    }
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
            let mut st = lock(&f.state);
            f.set(&mut st, Sought::Idle);
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

    /// The admissions of one plan and step share one run: while it runs the others
    /// are told to wait (they hold no slot and no thread meanwhile), then each takes a
    /// planner that continues as the seek's own does. An admission that may not run
    /// the seek never does.
    #[test]
    fn tickets_of_one_step_share_one_run() {
        let (plan, flights) = (plan(), Arc::new(SeekFlights::default()));
        let tickets: Vec<SeekTicket> = (0..4).map(|_| flights.ticket(&plan, 7)).collect();
        let no = AtomicBool::new(false);
        assert_eq!(tickets[1].phase(), SeekPhase::Idle);
        let r = tickets[1].seek(&no, false, || unreachable!("not in a seek slot"));
        assert_eq!(r.err(), Some(NotSought::Wait));
        let ((started, running), (go, wait)) = (mpsc::channel(), mpsc::channel::<()>());
        let got = std::thread::scope(|s| {
            let (t0, no, plan) = (&tickets[0], &no, &plan);
            let first = s.spawn(move || {
                t0.seek(no, true, || {
                    started.send(()).expect("the test waits");
                    wait.recv().expect("the test goes on");
                    Some((plan.seek(7), true))
                })
            });
            running.recv().expect("the run starts");
            for t in &tickets[1..] {
                assert_eq!(t.phase(), SeekPhase::Running);
                let r = t.seek(no, true, || unreachable!("another runs it"));
                assert_eq!(r.err(), Some(NotSought::Wait));
            }
            go.send(()).expect("the run waits");
            first
                .join()
                .expect("no panic")
                .expect("the runner's planner")
        });
        let mut all = vec![got];
        for t in &tickets[1..] {
            assert_eq!(t.phase(), SeekPhase::Done);
            all.push((t.seek(&no, false, || unreachable!("done"))).expect("a copy"));
        }
        let mut want = plan.seek(7);
        let want = (want.cursor(), want.next_batch(), want.next_batch());
        for mut p in all {
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

    /// The first admission's client leaves mid-seek, or its result read a lost page
    /// (not shared): the seek goes back to idle, and the next admission in a seek slot
    /// runs it instead of the others being refused with it.
    #[test]
    fn a_cancelled_or_unsound_run_is_run_again_by_a_waiter() {
        let (plan, flights) = (plan(), Arc::new(SeekFlights::default()));
        for leader in [None, Some(false)] {
            let (a, b) = (flights.ticket(&plan, 3), flights.ticket(&plan, 3));
            let no = AtomicBool::new(false);
            let first = a.seek(&no, true, || leader.map(|sound| (plan.seek(3), sound)));
            assert_eq!(first.is_ok(), leader.is_some());
            assert_eq!(b.phase(), SeekPhase::Idle, "leader {leader:?}");
            let r = b.seek(&no, false, || unreachable!("not in a seek slot"));
            assert_eq!(r.err(), Some(NotSought::Wait));
            let runs = AtomicUsize::new(0);
            let p = b.seek(&no, true, || {
                runs.fetch_add(1, Ordering::Relaxed);
                Some((plan.seek(3), true))
            });
            assert_eq!(p.map(|p| p.step()), Ok(3));
            assert_eq!(runs.load(Ordering::Relaxed), 1, "leader {leader:?}");
        }
    }
}
