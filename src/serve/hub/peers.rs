//! A joined peer's way through its ring: it releases the steps it is done with, is told
//! why when its ring fails, and leaves (its ring goes with its last peer); and the
//! daemon's own way out, drain and stop.

use std::time::Instant;

use tracing::{debug, info};

use super::{Failure, Hub};
use crate::wire::protocol::Code;

impl Hub {
    /// Records that `peer` is done with every step below `upto`.
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
        let published = entry.published;
        let before = entry.base();
        let Some(p) = entry.peers.get_mut(&peer) else {
            return Err(ReleaseError::NotJoined);
        };
        if upto < p.released || upto > published {
            return Err(ReleaseError::OutOfRange {
                upto,
                released: p.released,
                published,
            });
        }
        p.released = upto;
        let base = entry.base();
        if base > before && entry.joined >= entry.replicas {
            entry.stats.batches_delivered += base - before;
            // Each step at its own stage's shape (at most a ring's slots per release).
            entry.stats.tokens_delivered += (before..base)
                .map(|s| {
                    let (seq_len, rows) = plan.shape_at(plan.plan_step_of(s));
                    u64::from(rows / dp_size) * u64::from(seq_len)
                })
                .sum::<u64>();
        }
        while entry.cursors.len() > 1 && entry.cursors.front().is_some_and(|c| c.step < base) {
            entry.cursors.pop_front();
        }
        entry.clocks(self.settings.slots, Instant::now());
        let wake = entry.claimable(self.settings.slots);
        drop(st);
        if wake {
            self.work.notify_one();
        }
        Ok(())
    }

    /// Removes a peer; drops its ring when it was the last one.
    pub fn leave(&self, job: &str, dp_rank: u32, peer: u64) {
        let mut guard = self.lock();
        let st = &mut *guard;
        st.clients = st.clients.saturating_sub(1);
        let Some(j) = st.jobs.get_mut(job) else {
            return;
        };
        let Some(entry) = j.rings.get_mut(&dp_rank) else {
            return;
        };
        if let Some(p) = entry.peers.remove(&peer) {
            debug!(job, dp_rank, replica = %p.replica, pid = ?p.pid, released = p.released, "peer left");
        }
        if entry.peers.is_empty() {
            info!(
                job,
                dp_rank,
                published = entry.published,
                "last peer left; ring dropped"
            );
            let removed = j.rings.remove(&dp_rank);
            if let Some(e) = removed {
                let (tokens, best) = &mut st.retired;
                tokens.resize(tokens.len().max(e.stats.domain_tokens.len()), 0);
                for (s, t) in tokens.iter_mut().zip(&e.stats.domain_tokens) {
                    *s += t;
                }
                e.keep_furthest(j.plan.planner(), best);
            }
            if j.rings.is_empty() {
                st.jobs.remove(job);
            }
        }
        drop(guard);
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
        let st = self.lock();
        st.jobs
            .values()
            .flat_map(|j| j.rings.values())
            .all(|e| e.peers.values().all(|p| p.released >= e.published))
    }

    /// Stops the workers; new HELLOs are refused.
    pub fn stop(&self) {
        self.lock().stopping = true;
        self.work.notify_all();
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

#[cfg(test)]
mod tests {
    use super::ReleaseError;

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
