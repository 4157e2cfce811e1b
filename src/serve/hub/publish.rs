//! Publishing a filled slot: steps become visible to the ring's clients in order, and
//! the wake that tells its peers goes out at once or waits to be coalesced with the
//! ring's next publish (docs/DESIGN.md, "Coalesced wakes").

use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{error, warn};

use super::phase::Phase;
use super::{Cursor, Hub, RingEntry, State};
use crate::sys::EventFd;

impl Hub {
    /// Adds to `wake` the peers of every ring whose wake is held back: with `due` =
    /// (bound, now), only those held at least the bound (a worker checks after each
    /// copy it ends); without, all of them (a worker about to sleep). Returns whether
    /// any was sent.
    pub(super) fn send_wakes(
        st: &mut State,
        due: Option<(Duration, Instant)>,
        wake: &mut Vec<Arc<EventFd>>,
    ) -> bool {
        let mut sent = false;
        for e in st.jobs.values_mut().flat_map(|j| j.rings.values_mut()) {
            let Some(since) = e.wake_deferred else {
                continue;
            };
            if let Some((bound, now)) = due {
                if now.saturating_duration_since(since) < bound {
                    continue;
                }
            }
            e.wake(wake);
            sent = true;
        }
        sent
    }
}

/// How many publishes of one ring may wait for a single wake: one less than the ring
/// holds (a full ring wakes at once anyway), and one less than the rings the workers
/// fill or than half the ring, whichever is more. While a ring's consumer sleeps through
/// its held publishes the workers fill the other rings, or the ring's free half; with
/// only one other ring to fill, a ring held until full would leave both full and the
/// workers idle while its consumer wakes (2 rings of 4 slots: 25% fewer tokens/s than
/// holding one publish), while with 8 rings holding until full cut the daemon's CPU per
/// token 6-10% against holding one (docs/BENCHMARKS.md, "Coalesced wakes by the number
/// of rings").
pub(super) fn hold_most(slots: u32, rings: usize) -> u32 {
    let others = u32::try_from(rings.saturating_sub(1)).unwrap_or(u32::MAX);
    slots
        .saturating_sub(1)
        .min(others.max((slots / 2).saturating_sub(1)))
        .max(1)
}

impl RingEntry {
    /// Publishes every filled step that is next in order (a later slot may finish first);
    /// a peer that joined ahead is checked when the ring reaches its step. Returns
    /// whether anything was published (the caller then wakes the peers, or holds the
    /// wake back: [`RingEntry::wake_or_hold`]).
    pub(super) fn publish_in_order(&mut self, key: &(String, u32)) -> bool {
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
        true
    }

    /// After a publish: wakes the peers now, or (`hold` gives the time and how many
    /// publishes may wait, [`hold_most`]; coalescing is on and the daemon is not
    /// draining) holds the wake back so that a later publish of this ring sends one wake
    /// for several slots. A wake is held only while fewer than that many publishes wait
    /// and the ring will publish again without its peers doing anything: a step of it
    /// is being copied, or a worker may claim its next one (it streams, a slot is free).
    /// A full, failed, joining or regenerating ring wakes at once; a held wake that
    /// nothing else sends goes out before a worker sleeps or once older than `[serve]
    /// wake_coalesce_us` ([`Hub::send_wakes`]). Every peer of the ring is woken by the
    /// same wake.
    pub(super) fn wake_or_hold(
        &mut self,
        hold: Option<(Instant, u32)>,
        slots: u32,
        wake: &mut Vec<Arc<EventFd>>,
    ) {
        let again = !self.in_flight.is_empty()
            || (matches!(self.phase, Phase::Streaming) && self.claimable(slots));
        match hold {
            Some((now, most)) if again && self.wakes_held < most => {
                self.wake_deferred.get_or_insert(now);
                self.wakes_held += 1;
                self.stats.wakes_deferred += 1;
            }
            _ => self.wake(wake),
        }
    }

    /// Adds every peer's eventfd to `wake` (signalled once the lock is dropped) and ends
    /// a held-back wake.
    fn wake(&mut self, wake: &mut Vec<Arc<EventFd>>) {
        self.wake_deferred = None;
        self.wakes_held = 0;
        self.stats.wakes += self.peers.len() as u64;
        wake.extend(self.peers.values().map(|p| p.ready.clone()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serve::hub::phase::tests::{entry, peer, plan};
    use crate::serve::hub::phase::Copied;
    use crate::serve::hub::{Failure, Filled, Job, Mark};
    use crate::wire::protocol::Code;

    const SLOTS: u32 = 4;

    /// Publishes step `step` of `e` as a worker does (claimed, copied, filled); returns
    /// the eventfds the publish wakes now (`hold`: coalescing on, at that time).
    fn publish(e: &mut RingEntry, step: u64, hold: Option<(Instant, u32)>) -> Vec<Arc<EventFd>> {
        e.claim_step(step);
        assert_eq!(e.copy_ended(step, e.generation), Copied::Current);
        let mark = Mark {
            plan_step: step + 1,
            rows: Vec::new(),
        };
        let filled = Filled {
            blob: Vec::new(),
            mark,
            tokens: Vec::new(),
        };
        e.filled.insert(step, filled);
        assert!(e.publish_in_order(&("j".into(), 0)));
        let mut wake = Vec::new();
        e.wake_or_hold(hold, SLOTS, &mut wake);
        wake
    }

    /// Whether `wake` holds every peer of `e` once.
    fn wakes_all(e: &RingEntry, wake: &[Arc<EventFd>]) -> bool {
        wake.len() == e.peers.len()
            && e.peers
                .values()
                .all(|p| wake.iter().any(|w| Arc::ptr_eq(w, &p.ready)))
    }

    #[test]
    fn a_wake_is_held_for_the_next_publish_and_never_on_a_full_ring() {
        let t = Instant::now();
        let mut e = entry(2, false);
        e.join(1, peer("tp0"));
        e.join(2, peer("tp1"));
        // The ring can fill further: the wake waits for the next publish.
        assert!(publish(&mut e, 0, Some((t, 1))).is_empty());
        assert_eq!(e.wake_deferred, Some(t));
        // The next publish sends one wake for both slots, to both TP peers together.
        let w = publish(&mut e, 1, Some((t, 1)));
        assert!(wakes_all(&e, &w), "both peers are woken together");
        assert_eq!(e.wake_deferred, None);
        assert!(publish(&mut e, 2, Some((t, 1))).is_empty());
        let w = publish(&mut e, 3, Some((t, 1)));
        assert!(wakes_all(&e, &w));
        // The peers release one step: the publish that fills the ring again wakes at once.
        for p in e.peers.values_mut() {
            p.released = 1;
        }
        let w = publish(&mut e, 4, Some((t, 1)));
        assert!(wakes_all(&e, &w), "full: no hold");
        assert_eq!(e.free(SLOTS), 0);
        // Off (or draining): every publish wakes.
        for p in e.peers.values_mut() {
            p.released = 5;
        }
        let w = publish(&mut e, 5, None);
        assert!(wakes_all(&e, &w));
        // A failed ring is never filled again: its last publish wakes at once.
        e.fail(Failure::new(Code::Materialize, "test"));
        let mut w = Vec::new();
        e.wake_or_hold(Some((t, 1)), SLOTS, &mut w);
        assert!(wakes_all(&e, &w), "a failed ring holds no wake");
        assert_eq!((e.stats.wakes_deferred, e.stats.wakes), (2, 5 * 2));
    }

    /// With many rings a wake waits for up to `slots - 1` publishes; with two rings, for
    /// one, or half the ring less one when that is more; never fewer than one.
    #[test]
    fn a_wake_waits_for_more_publishes_when_the_workers_have_more_rings_to_fill() {
        assert_eq!(hold_most(4, 8), 3);
        assert_eq!(hold_most(4, 2), 1);
        assert_eq!(hold_most(4, 1), 1);
        assert_eq!(hold_most(4, 3), 2);
        assert_eq!(hold_most(2, 8), 1);
        assert_eq!(hold_most(1, 8), 1);
        // Half the ring waits when that is more: 8 slots, 2 rings.
        assert_eq!(hold_most(8, 2), 3);
        assert_eq!(hold_most(8, 16), 7);
        let t = Instant::now();
        let mut e = entry(1, false);
        e.join(1, peer("p"));
        // 8 rings, 4 slots: three publishes wait, the fourth (which fills the ring) wakes.
        for step in 0..3 {
            assert!(publish(&mut e, step, Some((t, hold_most(SLOTS, 8)))).is_empty());
            assert_eq!(e.wakes_held, step as u32 + 1);
        }
        let w = publish(&mut e, 3, Some((t, hold_most(SLOTS, 8))));
        assert!(wakes_all(&e, &w));
        assert_eq!((e.wakes_held, e.wake_deferred), (0, None));
        // The consumer reads two: one publish waits, the next wakes (the ring is full).
        for p in e.peers.values_mut() {
            p.released = 2;
        }
        assert!(publish(&mut e, 4, Some((t, 3))).is_empty());
        let w = publish(&mut e, 5, Some((t, 3)));
        assert!(wakes_all(&e, &w), "full: no hold");
        assert_eq!((e.stats.wakes_deferred, e.stats.wakes), (4, 2));
    }

    #[test]
    fn held_wakes_go_out_past_the_bound_or_all_before_a_worker_sleeps() {
        let bound = Duration::from_micros(300);
        let t = Instant::now();
        let mut e = entry(1, false);
        e.join(1, peer("p"));
        assert!(publish(&mut e, 0, Some((t, 1))).is_empty());
        let mut st = State::new(plan());
        st.jobs.insert("j".into(), Job::new(1));
        if let Some(j) = st.jobs.get_mut("j") {
            j.rings.insert(0, e);
        }
        let mut wake = Vec::new();
        let early = t + bound / 2;
        assert!(!Hub::send_wakes(&mut st, Some((bound, early)), &mut wake));
        assert!(wake.is_empty(), "younger than the bound: still held");
        assert!(Hub::send_wakes(
            &mut st,
            Some((bound, t + bound)),
            &mut wake
        ));
        assert_eq!(wake.len(), 1);
        assert!(!Hub::send_wakes(&mut st, None, &mut wake), "sent once");
        let e = st.jobs.get_mut("j").and_then(|j| j.rings.get_mut(&0));
        let e = e.expect("the ring is there");
        assert!(publish(e, 1, Some((t, 1))).is_empty());
        // A worker about to sleep sends every held wake, whatever its age.
        assert!(Hub::send_wakes(&mut st, None, &mut wake));
        assert_eq!(wake.len(), 2);
    }
}
