//! The ring lifecycle: a ring waits for the peers it was announced with (joining),
//! streams, replans after a live change (regenerating) or stops (failed). Each change of
//! phase is a method of [`RingEntry`] that says when it may happen; the rest of the hub
//! asks the phase instead of reading loose flags.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use super::{Cursor, Filled, Own, Peer, Planned, RingEntry, RingStats};
use crate::plan::{cursor, journal, Planner};
use crate::serve::ring::Ring;
use crate::wire::protocol::Code;

/// Why a peer is disconnected: the ERROR code its connection sends and the detail,
/// chosen where the failure happens (not guessed from the message later).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Failure {
    /// `materialize` when the ring stopped, `peer_position` when the peer's own resume
    /// point turned out wrong.
    pub code: Code,
    /// What happened, naming the shard, step or checkpoint.
    pub message: String,
}

impl Failure {
    /// A failure with `code`.
    pub fn new(code: Code, message: impl Into<String>) -> Failure {
        Failure {
            code,
            message: message.into(),
        }
    }
}

/// Where a ring is in its life.
pub(super) enum Phase {
    /// Resumed from a blob and waiting for the rest of the peers its first client
    /// announced: TP peers may have consumed different numbers of steps before a daemon
    /// restart, so nothing is produced until all have joined, and a peer that resumes
    /// earlier moves the ring back to its step ([`RingEntry::move_back`]).
    Joining,
    /// Workers fill it. A fresh ring (no blob) streams at once, holding its first step
    /// for the peers still to come.
    Streaming,
    /// A live change replanned everything past `published` while workers were copying
    /// steps of the older plan: those copies (`stale`) are discarded when they end, and
    /// until then no fresh copy may write their slots. Workers fill the other steps.
    Regenerating {
        /// Steps whose stale copy is still running.
        stale: BTreeSet<u64>,
    },
    /// A copy or a planning read failed: nothing more is filled, and every peer is told
    /// why when it is kicked.
    Failed(Failure),
}

/// What [`RingEntry::move_back`] replaced: a joining ring's start, planner and cursors,
/// and the peers it put ahead, so that a join refused after it leaves the ring as it was.
pub(super) struct MovedBack {
    own: Option<Own>,
    taken: Option<Arc<Planned>>,
    hinted: u64,
    filled: BTreeMap<u64, Filled>,
    start: u64,
    next_fill: u64,
    published: u64,
    cursors: VecDeque<Cursor>,
    /// The peers that read at the old start and wait ahead of the new one.
    ahead: Vec<u64>,
}

/// Where a peer stands against its ring's stream.
pub(super) enum Standing {
    /// It reads the steps as the ring publishes them.
    Reading,
    /// It joined ahead of the ring (it had consumed more before a daemon restart), or
    /// the ring moved back below it: when the ring publishes up to `step`, the ring's
    /// cursor there must be `blob`.
    Ahead {
        /// The step it starts at.
        step: u64,
        /// The blob it resumed from.
        blob: Vec<u8>,
    },
    /// The ring reached its step with another cursor: it is kicked with this failure.
    Misplaced(Failure),
    /// Its release page held a value that goes back or passes the published steps: it
    /// is kicked with this failure (`protocol`, naming the value).
    BadRelease(Failure),
}

/// Whether the ring's `cursor` is the position a peer's `blob` names: the same bytes, or
/// the same blob but for live changes the ring took while the peer waited, all of them
/// from the blob's step on (so its past, the history digest included, is the same). The
/// first changeable step counts a waiting peer's step ([`RingEntry::ahead_step`]), so
/// those are the only changes a ring can have taken meanwhile.
fn same_position(blob: &[u8], cursor: &[u8]) -> bool {
    if blob == cursor {
        return true;
    }
    let (Ok(mut mine), Ok(ring)) = (cursor::decode(blob), cursor::decode(cursor)) else {
        return false;
    };
    let ours = journal::compare(
        &ring.journal,
        ring.superseded,
        &mine.journal,
        mine.superseded,
    );
    let later = ring.journal[journal::common_prefix(&ring.journal, &mine.journal)..]
        .iter()
        .all(|c| c.at >= mine.plan_step);
    if ours != journal::Order::OursAhead || !later {
        return false;
    }
    mine.journal = ring.journal.clone();
    mine.superseded = ring.superseded;
    mine == ring
}

impl Peer {
    /// The ring published up to `at` with `cursor` there: a peer waiting for that step
    /// reads on when its blob matches, and is misplaced (the failure returned, to log
    /// and kick) when it does not.
    pub(super) fn reach(&mut self, at: u64, cursor: &[u8]) -> Option<&Failure> {
        let Standing::Ahead { step, blob } = &self.standing else {
            return None;
        };
        if *step != at {
            return None;
        }
        if same_position(blob, cursor) {
            self.standing = Standing::Reading;
            return None;
        }
        self.standing = Standing::Misplaced(Failure::new(
            Code::PeerPosition,
            format!(
                "this client resumed at step {step} with a cursor its peers' stream does not \
                 reach; peers of one dp rank must resume from the same checkpoint"
            ),
        ));
        match &self.standing {
            Standing::Misplaced(f) => Some(f),
            _ => None,
        }
    }

    /// Why this peer is disconnected, when it is its own fault (its resume point).
    pub(super) fn failure(&self) -> Option<&Failure> {
        match &self.standing {
            Standing::Misplaced(f) | Standing::BadRelease(f) => Some(f),
            _ => None,
        }
    }
}

/// How a worker's copy ended, as far as its ring is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Copied {
    /// Of the plan in force: publish it (or report its error).
    Current,
    /// Of a plan a live change replaced meanwhile: discard it.
    Stale,
}

impl RingEntry {
    /// A ring that starts at `cursor`, with no peer yet: [`RingEntry::join`] its first.
    /// A ring resumed from a blob joins its announced peers before it streams; any other
    /// ring streams at once. `planner` (at `cursor`) is its own until it joins its job's
    /// window.
    pub(super) fn new(
        ring: Arc<Ring>,
        planner: Planner,
        cursor: Cursor,
        replicas: u32,
        micro: (u32, u32),
        resumed: bool,
    ) -> RingEntry {
        let step = cursor.step;
        RingEntry {
            ring,
            own: Some(Own::new(planner)),
            hinted: step,
            taken: None,
            next_fill: step,
            filled: BTreeMap::new(),
            published: step,
            cursors: VecDeque::from([cursor]),
            peers: HashMap::new(),
            replicas,
            joined: HashSet::new(),
            start: step,
            micro,
            resumed,
            phase: if resumed {
                Phase::Joining
            } else {
                Phase::Streaming
            },
            in_flight: BTreeSet::new(),
            generation: 0,
            wake_deferred: None,
            wakes_held: 0,
            stats: RingStats::default(),
        }
    }

    /// Whether the ring has left [`Phase::Joining`]: its start step is fixed.
    pub(super) fn started(&self) -> bool {
        !matches!(self.phase, Phase::Joining)
    }

    /// Why the ring stopped, if it did.
    pub(super) fn failure(&self) -> Option<&Failure> {
        match &self.phase {
            Phase::Failed(f) => Some(f),
            _ => None,
        }
    }

    /// Whether a worker should fill this ring now. (No refill hysteresis: a consumer
    /// that holds several slots may be waiting for the one free slot.)
    pub(super) fn claimable(&self, slots: u32) -> bool {
        let slot_free = |step: &u64| {
            !self.in_flight.contains(step)
                && match &self.phase {
                    Phase::Streaming => true,
                    Phase::Regenerating { stale } => !stale.contains(step),
                    Phase::Joining | Phase::Failed(_) => false,
                }
        };
        !self.peers.is_empty() && self.free(slots) > 0 && slot_free(&self.next_fill)
    }

    /// Whether every announced replica has joined (at least once): until then the ring
    /// holds its start step for the ones to come, and a resumed ring waits.
    pub(super) fn all_joined(&self) -> bool {
        self.joined.len() >= self.replicas as usize
    }

    /// Joins peer `id` (its checks passed). The last announced replica of a joining ring
    /// starts it; a replica that reconnects is not a new one. Returns whether this was
    /// the replica's first join, for [`RingEntry::unjoin`].
    pub(super) fn join(&mut self, id: u64, peer: Peer) -> bool {
        let first = self.joined.insert(peer.replica.clone());
        self.peers.insert(id, peer);
        if matches!(self.phase, Phase::Joining) && self.all_joined() {
            self.phase = Phase::Streaming;
        }
        first
    }

    /// Takes back a join that a later step of admission refused (under the same lock, so
    /// nothing was filled meanwhile): its replica no longer counts as joined when this
    /// was its `first` join ([`RingEntry::join`]), and a resumed ring that this join
    /// started waits again. Returns whether the peer was there.
    pub(super) fn unjoin(&mut self, id: u64, first: bool) -> bool {
        let Some(p) = self.peers.remove(&id) else {
            return false;
        };
        if first {
            self.joined.remove(&p.replica);
        }
        if self.resumed && !self.all_joined() && matches!(self.phase, Phase::Streaming) {
            self.phase = Phase::Joining;
        }
        true
    }

    /// Moves a joining ring back to `cursor`, the start of a peer that resumes earlier
    /// than the peers already waiting; those are checked when the ring reaches their
    /// steps. Only while joining: a streaming ring may already have published. Returns
    /// what it replaced, for [`RingEntry::restore`] when the join is refused after all.
    pub(super) fn move_back(&mut self, planner: Planner, cursor: Cursor) -> MovedBack {
        debug_assert!(matches!(self.phase, Phase::Joining));
        let mut ahead = Vec::new();
        for (&id, p) in self.peers.iter_mut() {
            if let (Standing::Reading, Some(blob)) = (&p.standing, &p.blob) {
                p.standing = Standing::Ahead {
                    step: p.released,
                    blob: blob.clone(),
                };
                ahead.push(id);
            }
        }
        let step = cursor.step;
        let was = MovedBack {
            own: self.own.replace(Own::new(planner)),
            taken: self.taken.take(),
            hinted: std::mem::replace(&mut self.hinted, step),
            filled: std::mem::take(&mut self.filled),
            start: std::mem::replace(&mut self.start, step),
            next_fill: std::mem::replace(&mut self.next_fill, step),
            published: std::mem::replace(&mut self.published, step),
            cursors: std::mem::replace(&mut self.cursors, VecDeque::from([cursor])),
            ahead,
        };
        self.ring.restart_at(step);
        was
    }

    /// Undoes a [`RingEntry::move_back`] whose join was refused later in admission
    /// (under the same lock, so nothing was filled meanwhile): the ring starts where it
    /// did, with its own planner and cursors, and the peers it put ahead read again.
    pub(super) fn restore(&mut self, was: MovedBack) {
        for id in &was.ahead {
            if let Some(p) = self.peers.get_mut(id) {
                p.standing = Standing::Reading;
            }
        }
        self.own = was.own;
        self.taken = was.taken;
        self.hinted = was.hinted;
        self.filled = was.filled;
        self.start = was.start;
        self.next_fill = was.next_fill;
        self.published = was.published;
        self.cursors = was.cursors;
        self.ring.restart_at(was.start);
        self.ring.publish(was.published);
    }

    /// Stops the ring for good (a later failure replaces the reason) and kicks its peers.
    pub(super) fn fail(&mut self, failure: Failure) {
        self.phase = Phase::Failed(failure);
        for p in self.peers.values() {
            p.kick.notify_one();
        }
    }

    /// Stops the ring for good as [`RingEntry::fail`] does, and takes back the steps
    /// from `step` on that it published: its stream is wrong from there (it lacks a live
    /// change another rank of its job brought), so its peers read the steps before
    /// `step` and then get `failure` instead of more. A copy running now is dropped when
    /// it ends, never published.
    pub(super) fn fail_from(&mut self, step: u64, failure: Failure) {
        self.regenerate_with(None);
        self.fail(failure);
        self.ring.publish(self.published.min(step));
    }

    /// Replans everything not yet published with `planner` (already at `published`).
    /// Copies running now become stale: a streaming ring regenerates until they end; a
    /// joining ring has none, and a failed ring stays failed.
    #[cfg(test)]
    pub(super) fn regenerate(&mut self, planner: Planner) {
        self.regenerate_with(Some(planner));
    }

    /// [`RingEntry::regenerate`] with a private planner, or (`None`) reading the job's
    /// new window from `published` on.
    pub(super) fn regenerate_with(&mut self, planner: Option<Planner>) {
        self.own = planner.map(Own::new);
        self.taken = None;
        self.hinted = self.published;
        self.filled.clear();
        self.next_fill = self.published;
        self.generation += 1;
        let running = std::mem::take(&mut self.in_flight);
        match &mut self.phase {
            Phase::Streaming if !running.is_empty() => {
                self.phase = Phase::Regenerating { stale: running }
            }
            Phase::Regenerating { stale } => stale.extend(running),
            Phase::Streaming | Phase::Joining | Phase::Failed(_) => {}
        }
    }

    /// Hands step `step` to a worker.
    pub(super) fn claim_step(&mut self, step: u64) {
        self.next_fill = step + 1;
        self.in_flight.insert(step);
    }

    /// Records that a worker's copy of `step`, claimed at `generation`, ended; a
    /// regenerating ring whose last stale copy this was streams again.
    pub(super) fn copy_ended(&mut self, step: u64, generation: u64) -> Copied {
        if generation == self.generation {
            self.in_flight.remove(&step);
            return Copied::Current;
        }
        if let Phase::Regenerating { stale } = &mut self.phase {
            stale.remove(&step);
            if stale.is_empty() {
                self.phase = Phase::Streaming;
            }
        }
        Copied::Stale
    }

    /// The oldest step some peer (present or still expected) may read, never above
    /// `published`: a peer waiting ahead of the ring (one resumed from a later blob,
    /// [`Standing::Ahead`]) holds no slot, and counting its step would let the workers
    /// claim more than a ring's slots past `published`, two steps into one slot.
    pub(super) fn base(&self) -> u64 {
        if !self.all_joined() {
            return self.start;
        }
        self.peers
            .values()
            .map(|p| p.released)
            .min()
            .map_or(self.published, |m| m.min(self.published))
    }

    /// The furthest step a peer waits at ahead of the ring ([`Standing::Ahead`]), 0 when
    /// none does: that peer trained on every step before it, so no change may start
    /// below it.
    pub(super) fn ahead_step(&self) -> u64 {
        (self.peers.values())
            .filter_map(|p| match &p.standing {
                Standing::Ahead { step, .. } => Some(*step),
                _ => None,
            })
            .max()
            .unwrap_or(0)
    }

    /// Slots a worker may fill now.
    pub(super) fn free(&self, slots: u32) -> u64 {
        (self.base() + slots as u64).saturating_sub(self.next_fill)
    }

    /// Updates the stall clocks after `published` or a peer's release moved.
    pub(super) fn clocks(&mut self, slots: u32, now: Instant) {
        let every_slot = self.published >= self.base() + slots as u64;
        // A peer that read everything waits on a full ring for a slower peer of its rank
        // (a TP twin), not for data: that is no consumer wait. It read as "the trainer
        // stalled on data" while a stopped peer held every slot (`status` names it).
        let starved = self.started()
            && !every_slot
            && self.peers.values().any(|p| p.released >= self.published);
        // A ring still waiting for announced replicas is held at its first slots by the
        // missing peer, not by its trainers: that is no producer wait (it read as "the
        // trainer is the bottleneck" while a TP peer had never started).
        let full = !self.peers.is_empty() && self.all_joined() && every_slot;
        let s = &mut self.stats;
        RingStats::track(starved, &mut s.starved_since, &mut s.consumer_wait, now);
        RingStats::track(full, &mut s.full_since, &mut s.producer_wait, now);
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::config::plan::PlanConfig;
    use crate::corpus::DType;
    use crate::plan::{DocSource, DomainInput, MemShard, Plan};
    use crate::serve::hub::{EventFd, Mark};
    use crate::serve::ring::{Layout, TokenType};

    const ROWS: u32 = 2;
    const SEQ_LEN: u32 = 16;

    /// A plan over one in-memory domain of 64 short documents.
    pub(in crate::serve::hub) fn plan() -> Arc<Plan> {
        let shard: Arc<dyn DocSource> = Arc::new(MemShard {
            lengths: vec![10; 64],
            groups: None,
        });
        let input = DomainInput {
            name: "a".into(),
            shards: vec![("a/0".into(), shard)],
            settings: Default::default(),
        };
        plan_of(input, SEQ_LEN, ROWS)
    }

    /// A plan over domain `input` alone ("a", weight 1), of rows of `seq_len` tokens,
    /// `rows` a step.
    pub(in crate::serve::hub) fn plan_of(input: DomainInput, seq_len: u32, rows: u32) -> Arc<Plan> {
        let cfg = PlanConfig {
            seed: 0,
            seq_len,
            global_batch_rows: rows,
            packing: Default::default(),
            best_fit_window: 64,
            eod_token: None,
            pad_token: 0,
            vocab_size: None,
            weights: Some([("a".to_string(), 1.0)].into()),
            schedule: Vec::new(),
            skip: Vec::new(),
            reseed: Vec::new(),
            stage: Vec::new(),
        };
        Arc::new(Plan::new(&[input], cfg, 1).expect("a one-domain plan builds"))
    }

    /// A real ring (memfd) at step 0 for `replicas` peers, resumed from a blob or not.
    pub(in crate::serve::hub) fn entry(replicas: u32, resumed: bool) -> RingEntry {
        let planner = plan().seek(0);
        let layout = Layout::new(ROWS, SEQ_LEN, 4, TokenType(DType::Int32), 4096);
        let ring = Arc::new(Ring::create("phase-test", layout, 0).expect("memfd ring"));
        let cursor = Cursor {
            step: 0,
            blob: planner.cursor(),
            mark: Mark::of(&planner),
        };
        RingEntry::new(ring, planner, cursor, replicas, (ROWS, 1), resumed)
    }

    pub(in crate::serve::hub) fn peer(name: &str) -> Peer {
        Peer {
            replica: name.into(),
            released: 0,
            ready: Arc::new(EventFd::new().expect("eventfd")),
            kick: Arc::new(tokio::sync::Notify::new()),
            pid: None,
            standing: Standing::Reading,
            blob: None,
            stages: true,
            page: None,
        }
    }

    /// A peer that read every published step of a full ring waits for its slower twin,
    /// not for data: producer wait, not consumer wait (a review saw 2 s of "consumer
    /// wait" for a 2 s SIGSTOP of one TP peer). Once a slot is free and a peer has read
    /// everything, it is consumer wait again.
    #[test]
    fn a_full_ring_held_by_a_slow_peer_is_no_consumer_wait() {
        use std::time::Duration;
        let slots = 4;
        let mut e = entry(2, false);
        e.join(1, peer("tp0"));
        e.join(2, peer("tp1"));
        e.published = 4;
        e.peers.get_mut(&1).unwrap().released = 4;
        let t0 = Instant::now();
        e.clocks(slots, t0);
        e.clocks(slots, t0 + Duration::from_secs(2));
        let (consumer, producer) = e.stats.waits(t0 + Duration::from_secs(2));
        assert_eq!((consumer, producer), (0.0, 2.0));
        // tp1 releases two steps: slots are free, tp0 has read everything.
        e.peers.get_mut(&2).unwrap().released = 2;
        e.clocks(slots, t0 + Duration::from_secs(2));
        let (consumer, producer) = e.stats.waits(t0 + Duration::from_secs(3));
        assert_eq!((consumer, producer), (1.0, 2.0));
    }

    #[test]
    fn a_resumed_ring_streams_only_once_every_announced_peer_joined() {
        let mut e = entry(2, true);
        e.join(1, peer("tp0"));
        assert!(matches!(e.phase, Phase::Joining));
        assert!(!e.claimable(4), "a joining ring must not be filled");
        assert!(e.join(2, peer("tp1")), "tp1's first join");
        assert!(matches!(e.phase, Phase::Streaming));
        assert!(e.claimable(4));
        // A join taken back (a later admission step refused) makes it wait again.
        assert!(e.unjoin(2, true));
        assert!(matches!(e.phase, Phase::Joining));
        assert!(!e.unjoin(2, true), "the peer is gone already");
    }

    /// Review, item 1: a replica that leaves and joins again is one replica. With 3
    /// announced, "a", "b" and "a" again leave the ring waiting for "c" (its start held,
    /// a resumed ring not started); a refused rejoin taken back leaves "a" counted.
    #[test]
    fn a_replica_that_rejoins_counts_once() {
        for resumed in [false, true] {
            let mut e = entry(3, resumed);
            assert!(e.join(1, peer("a")));
            assert!(e.join(2, peer("b")));
            e.peers.remove(&1); // "a" left
            assert!(!e.join(3, peer("a")), "a rejoin is not a first join");
            assert!(!e.all_joined());
            assert_eq!(e.started(), !resumed, "only the third replica starts it");
            for p in e.peers.values_mut() {
                p.released = 4;
            }
            e.published = 4;
            assert_eq!(e.base(), 0, "step 0 stays for \"c\"");
            assert!(e.unjoin(3, false));
            assert!(e.join(4, peer("c")));
            assert!(
                e.all_joined(),
                "\"a\" still counts after its rejoin was taken back"
            );
            assert!(e.started());
            // Taking back "c"'s first join makes it one to come again.
            assert!(e.unjoin(4, true));
            assert!(!e.all_joined());
        }
    }

    #[test]
    fn a_fresh_ring_streams_at_once_and_holds_its_start_for_missing_peers() {
        let mut e = entry(2, false);
        e.join(1, peer("tp0"));
        assert!(matches!(e.phase, Phase::Streaming));
        assert!(e.claimable(4));
        assert_eq!(e.base(), 0, "step 0 stays for the peer still to come");
    }

    #[test]
    fn a_live_change_makes_running_copies_stale_and_their_slots_wait_for_them() {
        let mut e = entry(1, false);
        e.join(1, peer("p"));
        e.claim_step(0);
        e.claim_step(1);
        let old = e.generation;
        e.regenerate(plan().seek(0));
        assert!(matches!(&e.phase, Phase::Regenerating { stale } if stale.len() == 2));
        assert_eq!(e.next_fill, 0);
        assert!(!e.claimable(4), "step 0's stale copy still writes its slot");
        assert_eq!(e.copy_ended(0, old), Copied::Stale);
        assert!(e.claimable(4), "step 0's slot is free for the fresh copy");
        e.claim_step(0);
        assert!(!e.claimable(4), "step 1's stale copy still runs");
        assert_eq!(e.copy_ended(1, old), Copied::Stale);
        assert!(matches!(e.phase, Phase::Streaming));
        assert_eq!(e.copy_ended(0, e.generation), Copied::Current);
        assert!(e.in_flight.is_empty());
    }

    #[test]
    fn a_failed_ring_stays_failed_says_why_and_is_never_filled() {
        let mut e = entry(1, false);
        e.join(1, peer("p"));
        e.claim_step(0);
        e.fail(Failure::new(Code::Materialize, "shard x faulted"));
        assert!(!e.claimable(4));
        e.regenerate(plan().seek(0));
        let f = e.failure().expect("still failed after a live change");
        assert_eq!(
            (f.code, f.message.as_str()),
            (Code::Materialize, "shard x faulted")
        );
        assert!(!e.claimable(4));
        // The copy that was running when the change landed is discarded.
        assert_eq!(e.copy_ended(0, 0), Copied::Stale);
    }

    #[test]
    fn a_peer_ahead_reads_on_at_its_step_only_with_the_rings_cursor_there() {
        let ahead = |blob: &[u8]| Standing::Ahead {
            step: 5,
            blob: blob.to_vec(),
        };
        let mut p = peer("tp1");
        p.standing = ahead(b"same");
        assert!(p.reach(4, b"other").is_none(), "not its step yet");
        assert!(p.reach(5, b"same").is_none());
        assert!(matches!(p.standing, Standing::Reading));
        assert!(p.failure().is_none());
        p.standing = ahead(b"mine");
        let f = p.reach(5, b"theirs").expect("misplaced").clone();
        assert_eq!(f.code, Code::PeerPosition);
        assert!(f.message.contains("step 5"), "{}", f.message);
        assert_eq!(p.failure(), Some(&f));
    }

    /// A peer waiting ahead of the ring holds no slot: when the peer that reads falls
    /// away, the ring still fills at most its slots past `published` (it used to count
    /// the waiting peer's step as its base and claim two steps into one slot).
    #[test]
    fn a_peer_ahead_does_not_let_the_ring_fill_past_its_slots() {
        let mut e = entry(2, true);
        join_at_7_and_move_back_to_2(&mut e);
        let mut reader = peer("tp1");
        reader.released = 2;
        e.join(2, reader);
        assert!(matches!(e.phase, Phase::Streaming));
        assert_eq!((e.base(), e.free(4)), (2, 4));
        // The reader leaves: only the peer ahead at 7 is left, and nothing is published.
        e.peers.remove(&2);
        assert_eq!((e.base(), e.free(4)), (2, 4), "base stays at published");
        for step in 2..6 {
            assert!(e.claimable(4), "step {step}");
            e.claim_step(step);
        }
        assert!(!e.claimable(4), "step 6 would share a slot with step 2");
    }

    /// A live change the ring took while a peer waited ahead of it, from the peer's step
    /// on, leaves the peer's position as it was: the peer reads on (its blob lacks the
    /// change, the ring's cursor carries it). A change before its step would rewrite what
    /// it trained on, and it is misplaced. The ring's first changeable step counts it.
    #[test]
    fn a_peer_ahead_reads_on_across_live_changes_from_its_step() {
        let base = plan();
        let blob = base.seek(5).cursor();
        let w = BTreeMap::from([("a".to_string(), 2.0)]);
        let changed = |at: u64| {
            let change = base.weights_change(at, &w).unwrap();
            Arc::new(base.with_journal(vec![change]).unwrap())
        };
        let ahead = || Standing::Ahead {
            step: 5,
            blob: blob.clone(),
        };
        let mut p = peer("tp1");
        p.standing = ahead();
        let later = changed(5).seek(5).cursor();
        assert_ne!(later, blob, "the ring's cursor carries the change");
        assert!(p.reach(5, &later).is_none());
        assert!(matches!(p.standing, Standing::Reading));
        p.standing = ahead();
        let earlier = changed(3).seek(5).cursor();
        assert!(
            p.reach(5, &earlier).is_some(),
            "a change at 3 rewrote steps 3 and 4"
        );
        let mut e = entry(2, true);
        let mut q = peer("tp0");
        q.standing = ahead();
        e.join(1, q);
        assert_eq!((e.published, e.ahead_step()), (0, 5));
    }

    /// Peer 1 ("tp0") joins `e` resumed at step 7 with a blob, then the ring moves back
    /// to step 2 (a peer that resumes earlier): peer 1 waits ahead. Returns what the move
    /// replaced.
    fn join_at_7_and_move_back_to_2(e: &mut RingEntry) -> MovedBack {
        let mut p = peer("tp0");
        p.released = 7;
        p.blob = Some(b"tp0 blob".to_vec());
        e.join(1, p);
        let planner = plan().seek(2);
        let cursor = Cursor {
            step: 2,
            blob: planner.cursor(),
            mark: Mark::of(&planner),
        };
        e.move_back(planner, cursor)
    }

    #[test]
    fn moving_a_joining_ring_back_puts_its_resumed_peers_ahead() {
        let mut e = entry(3, true);
        e.join(2, peer("tp1")); // no blob: nothing to check it against
        join_at_7_and_move_back_to_2(&mut e);
        assert_eq!((e.start, e.published, e.next_fill), (2, 2, 2));
        assert!(
            matches!(&e.peers[&1].standing, Standing::Ahead { step: 7, blob } if blob == b"tp0 blob")
        );
        assert!(matches!(e.peers[&2].standing, Standing::Reading));
        assert!(matches!(e.phase, Phase::Joining));
    }

    /// Review, item 3: a join that moved the ring back and was refused later in
    /// admission puts it back as it was: its start, cursors and planner, the ring's
    /// header, and the peers it put ahead reading again.
    #[test]
    fn restoring_a_moved_back_ring_puts_it_where_it_was() {
        let mut e = entry(4, true);
        let mut ahead = peer("tp2");
        ahead.standing = Standing::Ahead {
            step: 5,
            blob: b"tp2 blob".to_vec(),
        };
        e.join(3, ahead);
        let first = e.cursors[0].blob.clone();
        let was = join_at_7_and_move_back_to_2(&mut e);
        assert!(matches!(
            e.peers[&1].standing,
            Standing::Ahead { step: 7, .. }
        ));
        assert_eq!((e.start, e.ring.published()), (2, 2));
        e.restore(was);
        assert_eq!((e.start, e.published, e.next_fill, e.hinted), (0, 0, 0, 0));
        assert_eq!((e.ring.published(), e.cursors.len()), (0, 1));
        assert_eq!(e.cursors[0].blob, first);
        let own = e.own.as_ref().map(|o| o.planner.step());
        assert_eq!(own, Some(0), "the ring's own planner, at its start");
        assert!(matches!(e.peers[&1].standing, Standing::Reading));
        assert!(
            matches!(&e.peers[&3].standing, Standing::Ahead { step: 5, .. }),
            "a peer that joined ahead still waits"
        );
        assert!(matches!(e.phase, Phase::Joining));
    }
}
