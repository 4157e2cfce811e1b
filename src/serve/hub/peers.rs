//! A joined peer's way through its ring: it releases the steps it is done with (by a
//! RELEASE frame or through its release page, one code path), is told
//! why when its ring fails, and leaves (its ring goes with its last peer); and the
//! daemon's own way out, drain and stop.

use std::time::Instant;

use tracing::{debug, info, warn};

use super::{Failure, Freed, Hub, Peer, RingEntry, Standing, State};
use crate::plan::Plan;
use crate::wire::protocol::Code;

impl Hub {
    /// Records a RELEASE frame from `peer`: every step below `upto` is done with. For a
    /// peer with a release page the frame is its wake-up (it saw `daemon_waiting`), and
    /// the daemon reads the page instead of `upto`: the page may be ahead of the frame.
    pub fn release(
        &self,
        job: &str,
        dp_rank: u32,
        peer: u64,
        upto: u64,
    ) -> Result<(), ReleaseError> {
        let mut st = self.lock();
        let plan = st.plan.clone();
        let dp_size = st.jobs.get(job).map_or(1, |j| j.dp_size.max(1));
        let Some(entry) = Self::find(&mut st, job, dp_rank) else {
            return Err(ReleaseError::NoRing);
        };
        let before = entry.base();
        let published = entry.published;
        let Some(p) = entry.peers.get_mut(&peer) else {
            return Err(ReleaseError::NotJoined);
        };
        entry.stats.release_frames += 1;
        match &p.page {
            Some(page) => {
                // The release itself was read from the page: it counts as one, whichever
                // of the frame and the workers' page reads saw it first.
                let value = page.released();
                let moved = value != p.released;
                take_release(p, value, published).map_err(ReleaseError::on_page)?;
                if moved {
                    entry.stats.page_releases += 1;
                }
            }
            None => take_release(p, upto, published)?,
        }
        let wake = entry.released_from(before, &plan, dp_size, self.settings.slots);
        drop(st);
        if wake {
            self.work.notify_one();
        }
        Ok(())
    }

    /// Reads every peer's release page and applies what moved, as a RELEASE frame would
    /// (a value that goes back or passes `published` kicks that peer with ERROR
    /// `protocol`). Returns whether a ring the workers were sleeping on (a page had
    /// `daemon_waiting` raised) has a free slot now, so the caller wakes a worker.
    pub(super) fn sync_pages(&self, st: &mut State) -> bool {
        let plan = st.plan.clone();
        let slots = self.settings.slots;
        let mut woke = false;
        for (name, job) in st.jobs.iter_mut() {
            let dp_size = job.dp_size.max(1);
            for (&rank, entry) in job.rings.iter_mut() {
                woke |= entry.sync_pages(&plan, dp_size, slots, name, rank);
            }
        }
        woke
    }

    /// Before a worker sleeps: raises `daemon_waiting` in the page of every peer that
    /// holds a full ring back (its `released` is the ring's base), then re-reads
    /// `released` (fenced, [`crate::sys::ReleasePage::arm`]). Says whether one moved
    /// meanwhile (do not sleep), or whether any page was armed (sleep at most
    /// [`PAGE_BACKSTOP`]).
    pub(super) fn arm_pages(&self, st: &State) -> Armed {
        let slots = self.settings.slots;
        let mut armed = Armed::None;
        for entry in st.jobs.values().flat_map(|j| j.rings.values()) {
            if !entry.started() || !entry.all_joined() || entry.free(slots) > 0 {
                continue; // not held back by its peers' releases
            }
            let base = entry.base();
            for p in entry.peers.values() {
                let Some(page) = p.page.as_ref().filter(|_| p.released == base) else {
                    continue;
                };
                if p.failure().is_some() {
                    continue;
                }
                if page.arm() != p.released {
                    return Armed::Moved;
                }
                armed = Armed::Waiting;
            }
        }
        armed
    }

    /// Removes a peer; drops its ring when it was the last one, after the lock.
    pub fn leave(&self, job: &str, dp_rank: u32, peer: u64) {
        let mut st = self.lock();
        // The releases its page holds and the daemon has not read yet count before it
        // goes: the steps a trainer released just before hanging up were not delivered.
        let plan = st.plan.clone();
        if let Some(j) = st.jobs.get_mut(job) {
            let dp_size = j.dp_size.max(1);
            if let Some(e) = j.rings.get_mut(&dp_rank) {
                e.sync_pages(&plan, dp_size, self.settings.slots, job, dp_rank);
            }
        }
        let freed = st.leave(job, dp_rank, peer);
        drop(st);
        drop(freed);
        self.work.notify_all();
    }

    /// Why a peer is being disconnected: its own error, or its ring's failure; a ring
    /// that is gone or stopped without a reason reads as `materialize`.
    pub fn failure(&self, job: &str, dp_rank: u32, peer: u64) -> Failure {
        let mut st = self.lock();
        Self::find(&mut st, job, dp_rank)
            .and_then(|e| {
                e.peers
                    .get(&peer)
                    .and_then(|p| p.failure())
                    .or_else(|| e.failure())
                    .cloned()
            })
            .unwrap_or_else(|| Failure::new(Code::Materialize, "the ring stopped"))
    }

    /// Stops filling new slots and refuses new HELLOs; peers may still read and release
    /// what is published. Returns at once; see [`Hub::drained`].
    pub fn drain(&self) {
        self.lock().draining = true;
    }

    /// Whether every peer has released every published step (or left).
    pub fn drained(&self) -> bool {
        let mut st = self.lock();
        if self.sync_pages(&mut st) {
            self.work.notify_all();
        }
        st.jobs
            .values()
            .flat_map(|j| j.rings.values())
            .all(|e| e.peers.values().all(|p| p.released >= e.published))
    }

    /// Stops the workers; new HELLOs are refused.
    pub fn stop(&self) {
        self.lock().stopping = true;
        self.fills.stop();
        self.work.notify_all();
        self.plan_wake.notify_all();
    }
}

impl State {
    /// [`Hub::leave`] under the lock: removes the peer, and its ring when it was the last
    /// one (its job with its last ring), handing them back to be dropped after the lock.
    fn leave(&mut self, job: &str, dp_rank: u32, peer: u64) -> Freed {
        let mut freed = Freed::default();
        self.clients = self.clients.saturating_sub(1);
        let Some(j) = self.jobs.get_mut(job) else {
            return freed;
        };
        let Some(entry) = j.rings.get_mut(&dp_rank) else {
            return freed;
        };
        if let Some(p) = entry.peers.remove(&peer) {
            debug!(job, dp_rank, replica = %p.replica, pid = %crate::serve::connections::PeerPid(p.pid), released = p.released, "peer left");
        }
        if entry.peers.is_empty() {
            info!(
                job,
                dp_rank,
                published = entry.published,
                "last peer left; ring dropped"
            );
            if let Some(e) = j.rings.remove(&dp_rank) {
                if let Some(d) = self.departed.as_mut() {
                    d.ring(job, dp_rank, &e);
                }
                let (tokens, best) = &mut self.retired;
                tokens.resize(tokens.len().max(e.stats.domain_tokens.len()), 0);
                for (s, t) in tokens.iter_mut().zip(&e.stats.domain_tokens) {
                    *s += t;
                }
                e.keep_furthest(&j.plan, best);
                freed.entries.push(e);
            }
            if j.rings.is_empty() {
                if let Some(d) = self.departed.as_mut() {
                    d.job(job, j);
                }
                freed.jobs.extend(self.jobs.remove(job));
            }
        }
        freed
    }
}

/// How long a worker sleeps at most while a ring is full and its peers' pages are armed:
/// a client that cannot fence (Python) may miss `daemon_waiting`, and then the daemon
/// finds its release at the next look. A full ring holds `slots` ready steps, so a
/// trainer reading them does not wait for this (docs/DESIGN.md, "Release pages").
pub(super) const PAGE_BACKSTOP: std::time::Duration = std::time::Duration::from_millis(2);

/// What [`Hub::arm_pages`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Armed {
    /// No full ring waits on a release page: sleep until notified.
    None,
    /// Pages are armed: sleep at most [`PAGE_BACKSTOP`].
    Waiting,
    /// A peer released while its page was armed: look again, do not sleep.
    Moved,
}

/// Moves `p`'s release to `upto` after checking it neither goes back nor passes
/// `published`: the one check a RELEASE frame and a release page both go through.
fn take_release(p: &mut Peer, upto: u64, published: u64) -> Result<(), ReleaseError> {
    if upto < p.released || upto > published {
        return Err(ReleaseError::OutOfRange {
            upto,
            released: p.released,
            published,
        });
    }
    p.released = upto;
    Ok(())
}

impl RingEntry {
    /// After peers' releases moved the ring's base up from `before`: counts the steps
    /// delivered, drops cursors no peer can resume from, settles the stall clocks, and
    /// lowers `daemon_waiting` in the pages once a slot is free. Returns whether a worker
    /// may fill the ring now.
    fn released_from(&mut self, before: u64, plan: &Plan, dp_size: u32, slots: u32) -> bool {
        let base = self.base();
        if base > before && self.all_joined() {
            self.stats.batches_delivered += base - before;
            // Each step at its own stage's shape (at most a ring's slots per release).
            self.stats.tokens_delivered += (before..base)
                .map(|s| {
                    let (seq_len, rows) = plan.shape_at(plan.plan_step_of(s));
                    u64::from(rows / dp_size) * u64::from(seq_len)
                })
                .sum::<u64>();
        }
        while self.cursors.len() > 1 && self.cursors.front().is_some_and(|c| c.step < base) {
            self.cursors.pop_front();
        }
        self.clocks(slots, Instant::now());
        let wake = self.claimable(slots);
        if wake {
            self.disarm_pages();
        }
        wake
    }

    /// Lowers `daemon_waiting` where it is raised; returns whether any was.
    fn disarm_pages(&self) -> bool {
        let mut any = false;
        for page in self.peers.values().filter_map(|p| p.page.as_ref()) {
            if page.daemon_waiting() {
                page.disarm();
                any = true;
            }
        }
        any
    }

    /// [`Hub::sync_pages`] for this ring (`name`, `rank` for the log).
    fn sync_pages(&mut self, plan: &Plan, dp_size: u32, slots: u32, name: &str, rank: u32) -> bool {
        let before = self.base();
        let published = self.published;
        let mut moved = false;
        for p in self.peers.values_mut() {
            let Some(page) = &p.page else {
                continue;
            };
            let value = page.released();
            if value == p.released || p.failure().is_some() {
                continue;
            }
            match take_release(p, value, published) {
                Ok(()) => {
                    moved = true;
                    self.stats.page_releases += 1;
                }
                Err(e) => {
                    let e = ReleaseError::on_page(e);
                    warn!(job = name, dp_rank = rank, replica = %p.replica, pid = %crate::serve::connections::PeerPid(p.pid),
                        "protocol error: {e}; closing");
                    let failure = Failure::new(Code::Protocol, e.to_string());
                    p.standing = Standing::BadRelease(failure);
                    p.kick.notify_one();
                }
            }
        }
        if !moved {
            return false;
        }
        let waiting = self
            .peers
            .values()
            .any(|p| p.page.as_ref().is_some_and(|g| g.daemon_waiting()));
        self.released_from(before, plan, dp_size, slots) && waiting
    }
}

/// A RELEASE the hub cannot take: the connection answers it with ERROR `protocol`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReleaseError {
    /// The peer's ring is gone (it failed and its last peer left).
    #[error("release for a ring that no longer exists")]
    NoRing,
    /// The peer is not (or no longer) joined to its ring.
    #[error("release from a peer that is not joined")]
    NotJoined,
    /// A release page's value goes back, or past what the ring published.
    #[error(
        "release page value {value} is outside {released}..={published} (it may not go \
         back or pass the published steps)"
    )]
    Page {
        /// The value in the page.
        value: u64,
        /// The peer's release before it.
        released: u64,
        /// The ring's published step.
        published: u64,
    },
    /// `upto` goes back, or past what the ring published.
    #[error(
        "RELEASE upto {upto} is outside {released}..={published} (it may not go back or pass \
         the published steps)"
    )]
    OutOfRange {
        /// The step the RELEASE names.
        upto: u64,
        /// The peer's release before it.
        released: u64,
        /// The ring's published step.
        published: u64,
    },
}

impl ReleaseError {
    /// The same error when the value came from the peer's release page, so its ERROR
    /// names the page rather than a frame it did not send.
    fn on_page(self) -> ReleaseError {
        match self {
            ReleaseError::OutOfRange {
                upto,
                released,
                published,
            } => ReleaseError::Page {
                value: upto,
                released,
                published,
            },
            e => e,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::super::phase::tests::{entry, peer, plan};
    use super::super::{Job, State};
    use super::ReleaseError;

    /// Review, item 2: the ring of a last peer that leaves is handed back, not dropped
    /// under the hub's lock (unmapping a large memfd there stalls every other rank).
    #[test]
    fn the_last_peer_leaving_hands_its_ring_back_to_drop_after_the_lock() {
        let mut st = State::new(plan());
        let mut e = entry(2, false);
        e.join(1, peer("tp0"));
        e.join(2, peer("tp1"));
        let ring = Arc::clone(&e.ring);
        let mut job = Job::new(1);
        job.rings.insert(0, e);
        st.jobs.insert("j".into(), job);
        st.clients = 2;
        let freed = st.leave("j", 0, 1);
        assert!(
            freed.entries.is_empty() && freed.jobs.is_empty(),
            "a peer is left"
        );
        let freed = st.leave("j", 0, 2);
        assert!(st.jobs.is_empty() && st.clients == 0);
        assert_eq!((freed.entries.len(), freed.jobs.len()), (1, 1));
        assert_eq!(Arc::strong_count(&ring), 2, "the ring lives in `freed`");
        drop(freed);
        assert_eq!(Arc::strong_count(&ring), 1);
    }

    /// The ERROR `protocol` messages a bad RELEASE gets are the ones the daemon sent when
    /// they were strings (same bytes on the wire).
    #[test]
    fn release_errors_read_as_before() {
        let e = ReleaseError::OutOfRange {
            upto: 9,
            released: 2,
            published: 5,
        };
        assert_eq!(
            e.to_string(),
            "RELEASE upto 9 is outside 2..=5 (it may not go back or pass the published steps)"
        );
        assert_eq!(
            ReleaseError::NoRing.to_string(),
            "release for a ring that no longer exists"
        );
        assert_eq!(
            ReleaseError::NotJoined.to_string(),
            "release from a peer that is not joined"
        );
    }
}
