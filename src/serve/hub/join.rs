//! Joining a rank's ring that exists: where a client stands against it. Before a joining
//! ring's start the ring moves back to the client; ahead of it the client waits for the
//! ring to get there; otherwise its step and blob must be ones the ring holds. Admission
//! (`admission.rs`) prepares the [`Joiner`] off the lock and calls [`Joiner::join`] under
//! it; a [`Joined`] says what to take back if a later step of admission refuses.

use std::sync::Arc;

use tracing::info;

use super::phase::MovedBack;
use super::shape::Shape;
use super::{Cursor, EventFd, Mark, Peer, ReleasePage, RingEntry, Standing};
use crate::plan::Planner;
use crate::serve::ring::Ring;
use crate::wire::protocol::{Code, Hello, Refusal};

/// How far past its ring a peer may resume (or a ring's slots, if more): a trainer's TP
/// peers run within a ring of each other, so a larger gap is a peer resumed from another
/// checkpoint, refused before it holds the first changeable step of every job.
const PEER_AHEAD: u64 = 1024;

/// A client joined to its rank's ring, with what a refusal later in admission needs to
/// take the join back ([`Hub::unjoin`]).
pub(super) struct Joined {
    /// The step it starts at.
    pub(super) step: u64,
    /// Its rank's ring.
    pub(super) ring: Arc<Ring>,
    /// Whether this was its replica's first join of the ring ([`RingEntry::join`]).
    pub(super) first: bool,
    /// What the join replaced when it moved a joining ring back to the client's step.
    pub(super) moved: Option<MovedBack>,
}

/// A client on its way in, with what was prepared for it before the lock.
pub(super) struct Joiner<'a> {
    pub(super) hello: &'a Hello,
    pub(super) shape: &'a Shape,
    pub(super) pid: Option<i32>,
    pub(super) ready: Arc<EventFd>,
    pub(super) kick: Arc<tokio::sync::Notify>,
    /// The blob it resumes from.
    pub(super) blob: Option<Vec<u8>>,
    /// Its release page, when its HELLO asked for one.
    pub(super) page: Option<Arc<ReleasePage>>,
}

impl Joiner<'_> {
    /// The peer it becomes at `step`, with its standing against the ring.
    pub(super) fn peer(&self, step: u64, standing: Standing) -> Peer {
        // The page starts at the peer's own step, the release it holds now.
        if let Some(page) = &self.page {
            page.store_released(step);
        }
        Peer {
            replica: self.hello.replica.clone(),
            released: step,
            ready: self.ready.clone(),
            kick: self.kick.clone(),
            pid: self.pid,
            standing,
            blob: self.blob.clone(),
            stages: self.hello.stages,
            page: self.page.clone(),
        }
    }

    /// The cursor a ring starts from for this client: its own bytes when it brought a
    /// blob, so a peer resuming from the same checkpoint matches byte for byte.
    pub(super) fn cursor(&self, planner: &Planner) -> Cursor {
        Cursor {
            step: planner.step(),
            blob: self.blob.clone().unwrap_or_else(|| planner.cursor()),
            mark: Mark::of(planner),
        }
    }

    /// Joins the rank's live ring as one more of its announced peers, at the ring's
    /// position: before a joining ring's start moves the ring back; ahead of the ring
    /// waits for it (its blob is checked when the ring gets there); otherwise its step
    /// and blob must be one the ring holds. `planner` is the client's own, restored or
    /// sought before the lock (`None`: none was needed).
    pub(super) fn join(
        &self,
        entry: &mut RingEntry,
        peer_id: u64,
        planner: Option<Planner>,
    ) -> Result<Joined, Refusal> {
        let hello = self.hello;
        // A ring stopped by a shard's fault or a bad token stays stopped until its last
        // peer has left. A peer that joins meanwhile (one restarted while its twin's
        // connection is still being torn down) is told that, not that its name or step
        // does not fit the dead ring: it was refused `duplicate` or `peer_position`,
        // which sent its operator to the checkpoints instead of the shard.
        if let Some(f) = entry.failure().filter(|f| f.code == Code::Materialize) {
            return Err(Refusal::new(
                Code::Materialize,
                format!(
                    "job {:?} dp_rank {}'s ring has stopped: {}",
                    hello.job, hello.dp_rank, f.message
                ),
            ));
        }
        if entry.peers.values().any(|p| p.replica == hello.replica) {
            return Err(Refusal::new(
                Code::Duplicate,
                format!(
                    "job {:?} dp_rank {} replica {:?} is already connected",
                    hello.job, hello.dp_rank, hello.replica
                ),
            ));
        }
        if entry.micro != (self.shape.mbr, hello.micro_batches) {
            return Err(Refusal::new(
                Code::Layout,
                format!(
                    "peers of dp_rank {} use micro_batch_rows {} x micro_batches {}; \
                     this client asks {} x {}",
                    hello.dp_rank,
                    entry.micro.0,
                    entry.micro.1,
                    self.shape.mbr,
                    hello.micro_batches,
                ),
            ));
        }
        let kind = entry.ring.layout().kind;
        if hello.slot_layout.is_some_and(|k| k != kind) {
            return Err(Refusal::new(
                Code::Layout,
                format!(
                    "peers of dp_rank {} read {} slots; this client asks slot_layout {}",
                    hello.dp_rank,
                    kind.as_str(),
                    hello.slot_layout.unwrap_or_default().as_str()
                ),
            ));
        }
        if entry.replicas != hello.replicas {
            return Err(Refusal::new(
                Code::Replicas,
                format!(
                    "job {:?} dp_rank {} was announced with replicas = {}; this \
                     client says {}",
                    hello.job, hello.dp_rank, entry.replicas, hello.replicas
                ),
            ));
        }
        // A blob was restored (and so checked) before the lock.
        let step = match (&self.blob, &planner) {
            (Some(_), Some(p)) => p.step(),
            _ => hello.start_step.unwrap_or(0),
        };
        let (lo, hi) = (entry.base(), entry.published);
        let mut standing = Standing::Reading;
        let mut back = None;
        if !entry.started() && step < entry.start {
            // Nothing is produced until every peer has joined: the ring moves back to
            // this peer's step (once every check below passed); peers already waiting
            // further on are checked when the ring reaches them. Not further back than
            // peers of one rank are ever apart: those waiting would then be as far ahead
            // as a peer refused below, and the same two checkpoints were refused or
            // taken by the order the peers came in (taken, they held every job's first
            // changeable step at theirs, and their lockstep twin never got a batch).
            let most = step.saturating_add(u64::from(entry.ring.layout().slots).max(PEER_AHEAD));
            if entry.start > most {
                return Err(Refusal::new(
                    Code::PeerPosition,
                    format!(
                        "peers of job {:?} dp_rank {} wait at step {}; this client resumes at \
                         step {step}, further behind them than peers of one rank ever are (at \
                         most {}); peers of one dp rank must resume from the same checkpoint",
                        hello.job,
                        hello.dp_rank,
                        entry.start,
                        most - step
                    ),
                ));
            }
            let Some(planner) = planner else {
                return Err(Refusal::new(
                    Code::Busy,
                    "the ring started while this client joined; retry",
                ));
            };
            back = Some(planner);
        } else if step > hi {
            // Ahead of the ring (a peer that had consumed more before a restart): it
            // waits for the ring to get there, and its blob must match then. Peers of one
            // rank consume within a ring's slots of each other: a step much further on is
            // from another checkpoint, and waiting for it would hold every job's first
            // changeable step there (live changes count a waiting peer).
            let most = hi.saturating_add(u64::from(entry.ring.layout().slots).max(PEER_AHEAD));
            if step > most {
                return Err(Refusal::new(
                    Code::PeerPosition,
                    format!(
                        "the ring of job {:?} dp_rank {} is at step {hi}; this client resumes \
                         at step {step}, further ahead than peers of one rank ever are (at most \
                         {}); peers of one dp rank must resume from the same checkpoint",
                        hello.job,
                        hello.dp_rank,
                        most - hi
                    ),
                ));
            }
            // Without a blob nothing says its peers' stream reaches its step: refused, as
            // a step the ring does not hold is below.
            let Some(blob) = &self.blob else {
                return Err(Refusal::new(
                    Code::PeerPosition,
                    format!(
                        "the ring of job {:?} dp_rank {} holds steps {lo}..={hi}; this \
                         client asks for step {step} without a cursor blob; a peer joins \
                         ahead of its ring only with the blob of its step, and peers of \
                         one dp rank must resume from the same checkpoint",
                        hello.job, hello.dp_rank
                    ),
                ));
            };
            standing = Standing::Ahead {
                step,
                blob: blob.clone(),
            };
        } else {
            let held = entry.cursors.iter().find(|c| c.step == step);
            match held {
                Some(c) if step >= lo && self.blob.as_ref().is_none_or(|b| *b == c.blob) => {}
                _ => {
                    return Err(Refusal::new(
                        Code::PeerPosition,
                        format!(
                            "the ring of job {:?} dp_rank {} holds steps {lo}..={hi}; this \
                             client asks for step {step}{}; peers of one dp rank must \
                             resume from the same checkpoint",
                            hello.job,
                            hello.dp_rank,
                            if held.is_some() {
                                " with a different cursor"
                            } else {
                                ""
                            }
                        ),
                    ))
                }
            }
        }
        // The ring holds data for exactly the peers its first client announced: one
        // past that count (another job's name, a stray replica) would stall the real
        // ones. Nothing above changed the ring (it moves back only below).
        if entry.peers.len() >= entry.replicas as usize {
            let mut names: Vec<&str> = entry.peers.values().map(|p| p.replica.as_str()).collect();
            names.sort_unstable();
            return Err(Refusal::new(
                Code::Replicas,
                format!(
                    "job {:?} dp_rank {} declared replicas = {} and all are \
                     connected ({}); replica {:?} is one too many",
                    hello.job,
                    hello.dp_rank,
                    entry.replicas,
                    names.join(", "),
                    hello.replica
                ),
            ));
        }
        // Nothing refuses the client from here on in this join; a refusal later in
        // admission puts the ring back ([`Hub::unjoin`]).
        let moved = back.map(|planner| {
            let cursor = self.cursor(&planner);
            info!(job = %hello.job, dp_rank = hello.dp_rank, step, "ring moved back to a peer that resumes earlier");
            entry.move_back(planner, cursor)
        });
        let first = entry.join(peer_id, self.peer(step, standing));
        Ok(Joined {
            step,
            ring: entry.ring.clone(),
            first,
            moved,
        })
    }
}
