//! A position in the run: the [`Planner`] that produces global batches one after
//! another, and the ways to get one (from step 0, or by seeking to any step without
//! building rows). Restoring one from a cursor blob is in `resume`; seeking from a
//! stored checkpoint instead of step 0 is in `checkpoint`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use rayon::prelude::*;

use super::checkpoint::Checkpoints;
use super::cursor;
use super::mix::MixState;
use super::permute::{derive_key, Permutation};
use super::stream::{self, RowsOut, Stream, StreamState};
use super::{GlobalBatch, Plan, Row, SEEK_CHUNK};

/// Most bytes a seek's chunk of mixer counts takes ([`super::SEEK_CHUNK`] steps unless
/// the domains are many).
const SEEK_COUNT_BYTES: u64 = 64 << 20;

impl Plan {
    /// A planner at step 0.
    pub fn start(self: &Arc<Self>) -> Planner {
        Planner {
            plan: self.clone(),
            step: 0,
            plan_step: 0,
            mix: MixState::new(self.domains.len()),
            streams: self
                .domains
                .iter()
                .map(|_| Stream::new(StreamState::default()))
                .collect(),
        }
    }

    /// A planner at trainer step `step`, by recomputation from step 0 without building
    /// rows or reading a token.
    ///
    /// The mixer runs first (it needs nothing but the schedule); then each domain replays
    /// its own share of rows. Domains never interact, so they replay on parallel threads
    /// and the result is identical to a sequential replay whatever the thread count. Both
    /// go [`SEEK_CHUNK`] plan steps at a time, so memory stays bounded at any step.
    pub fn seek(self: &Arc<Self>, step: u64) -> Planner {
        let mut p = self.start();
        self.replay(&mut p, step, SEEK_CHUNK, None, &AtomicBool::new(false));
        p
    }

    /// [`Plan::seek`] that gives up (`None`) between chunks once `cancel` is set: the
    /// daemon sets it when the client that asked has gone, so nobody pays for a seek
    /// whose result nobody will read.
    pub fn seek_cancellable(self: &Arc<Self>, step: u64, cancel: &AtomicBool) -> Option<Planner> {
        self.seek_chunked(step, SEEK_CHUNK, cancel)
    }

    /// [`Plan::seek_cancellable`] with `chunk` plan steps per chunk (at least 1); the
    /// result does not depend on `chunk`, which tests check with small ones.
    pub fn seek_chunked(
        self: &Arc<Self>,
        step: u64,
        chunk: u64,
        cancel: &AtomicBool,
    ) -> Option<Planner> {
        let mut p = self.start();
        self.replay(&mut p, step, chunk, None, cancel).then_some(p)
    }

    /// Moves planner `p` (at or before trainer step `step`'s plan step) to `step`,
    /// `chunk` plan steps at a time: mixer counts for a chunk (O(domains x chunk)
    /// memory), then every domain replays them, then the next chunk. With `keep`, chunks
    /// also end at every multiple of its interval, where the planner is offered to the
    /// store as a checkpoint. Returns false, with `p` part-way, when cancelled.
    pub(super) fn replay(
        &self,
        p: &mut Planner,
        step: u64,
        chunk: u64,
        keep: Option<(u64, &dyn Checkpoints)>,
        cancel: &AtomicBool,
    ) -> bool {
        let target = self.plan_step_of(step);
        let n = self.domains.len();
        // The mixer counts of a chunk take 4 bytes per domain per step: at most
        // SEEK_COUNT_BYTES (4096 domains would take 1 GiB at the default chunk).
        let chunk = chunk.clamp(1, (SEEK_COUNT_BYTES / 4 / n.max(1) as u64).max(1));
        let mut from = p.plan_step;
        let cap = chunk.min(target.saturating_sub(from)) as usize;
        let mut counts: Vec<Vec<u32>> = vec![Vec::with_capacity(cap); n];
        let mut done = true;
        while from < target {
            if cancel.load(Ordering::Relaxed) {
                done = false;
                break;
            }
            let mut to = target.min(from.saturating_add(chunk));
            if let Some((every, _)) = keep {
                let every = every.max(1);
                to = to.min((from / every).saturating_add(1).saturating_mul(every));
            }
            for c in counts.iter_mut() {
                c.clear();
            }
            for ps in from..to {
                let c = self.mixer.counts(&mut p.mix, ps);
                for (d, &k) in c.iter().enumerate() {
                    counts[d].push(k);
                }
            }
            let replay = |d: usize, stream: &mut Stream| {
                for (ps, &k) in (from..to).zip(&counts[d]) {
                    let stage = self.stage_at(ps);
                    stream.take(
                        &self.domains[d],
                        d as u16,
                        &self.geometries,
                        (stage, self.upsampling_at(stage, d)),
                        k,
                        ps,
                        self.seed_at(ps),
                        &self.reseeds,
                        self.group_cap(d, stage),
                        None,
                    );
                }
            };
            // Each domain's stream is touched by exactly one task, so the outcome is the
            // sequential replay's whatever rayon's thread count.
            p.streams
                .par_iter_mut()
                .enumerate()
                .for_each(|(d, stream)| replay(d, stream));
            from = to;
            p.plan_step = to;
            if let Some((every, store)) = keep {
                if to % every.max(1) == 0 {
                    let key = self.checkpoint_key(to);
                    if !store.has(&key) {
                        store.store(&key, &self.checkpoint_blob(p));
                    }
                }
            }
        }
        if done {
            p.plan_step = target;
            p.step = step;
        }
        done
    }
}

/// A position in the run: produces global batches one after another.
pub struct Planner {
    pub(super) plan: Arc<Plan>,
    pub(super) step: u64,
    pub(super) plan_step: u64,
    pub(super) mix: MixState,
    pub(super) streams: Vec<Stream>,
}

/// A copy at the same position, for admissions that share one seek's result (the
/// daemon's concurrent seeks of one plan to one step replay once). Packed windows are
/// shared; each group-walk cache starts empty (it never changes the rows, only speed).
impl Clone for Planner {
    fn clone(&self) -> Planner {
        let streams = (self.streams.iter())
            .map(|s| {
                let mut c = Stream::new(s.state.clone());
                c.cache = s.cache.clone();
                c.tail_cache = s.tail_cache.clone();
                c
            })
            .collect();
        Planner {
            plan: self.plan.clone(),
            step: self.step,
            plan_step: self.plan_step,
            mix: self.mix.clone(),
            streams,
        }
    }
}

impl Planner {
    /// The next trainer step this planner will produce.
    pub fn step(&self) -> u64 {
        self.step
    }

    /// The unskipped plan step it will plan next: the one its cursor blob records, which
    /// trails the step's mapping when the blob was taken just before a skipped range.
    pub fn plan_step(&self) -> u64 {
        self.plan_step
    }

    /// The plan it follows.
    pub fn plan(&self) -> &Arc<Plan> {
        &self.plan
    }

    /// Mixer state (cumulative rows and carried error per domain).
    pub fn mix_state(&self) -> &MixState {
        &self.mix
    }

    /// Stream state of domain `d`.
    pub fn stream(&self, d: usize) -> Option<&StreamState> {
        self.streams.get(d).map(|s| &s.state)
    }

    /// Epoch progress per domain (completed epochs plus the fraction of the current one).
    pub fn epochs(&self) -> Vec<f64> {
        self.streams
            .iter()
            .zip(self.plan.domains.iter())
            .map(|(s, d)| {
                stream::epoch_progress(d, &s.state, s.window_taken(), &self.plan.geometries)
            })
            .collect()
    }

    fn is_skipped(&self, p: u64) -> bool {
        self.plan.skips.iter().any(|&(a, b)| a <= p && p <= b)
    }

    /// Plans one plan step; returns its per-domain counts.
    fn advance(&mut self, mut out: Option<&mut RowsOut<'_>>) -> Vec<u32> {
        let plan = self.plan.clone();
        let p = self.plan_step;
        let counts = plan.mixer.counts(&mut self.mix, p);
        let seed = plan.seed_at(p);
        let stage = plan.stage_at(p);
        for (d, stream) in self.streams.iter_mut().enumerate() {
            stream.take(
                &plan.domains[d],
                d as u16,
                &plan.geometries,
                (stage, plan.upsampling_at(stage, d)),
                counts[d],
                p,
                seed,
                &plan.reseeds,
                plan.group_cap(d, stage),
                out.as_deref_mut(),
            );
        }
        self.plan_step += 1;
        counts
    }

    /// The next global batch.
    pub fn next_batch(&mut self) -> GlobalBatch {
        self.batch(true)
    }

    /// The next global batch as serving reads it: [`Planner::next_batch`]'s rows, except
    /// that a piece of a document unit carries no group ([`super::Segment::group`] is
    /// `None` unless the unit is a group). The daemon's planners use it; the tokens, the
    /// cursor and the plan's state are the same.
    pub fn next_batch_served(&mut self) -> GlobalBatch {
        self.batch(false)
    }

    fn batch(&mut self, groups: bool) -> GlobalBatch {
        while self.is_skipped(self.plan_step) {
            self.advance(None);
        }
        let p = self.plan_step;
        let mut rows = Vec::with_capacity(self.plan.shape_at(p).1 as usize);
        let counts = self.advance(Some(&mut RowsOut {
            rows: &mut rows,
            groups,
        }));
        // Interleave domains across positions (and so across ranks).
        let perm = Permutation::new(rows.len() as u64, derive_key(&[self.plan.seed_at(p), p, 5]));
        let mut slots: Vec<Option<Row>> = rows.into_iter().map(Some).collect();
        // Sized once: collecting a filter_map grew the vector three or four times a step.
        let mut rows = Vec::with_capacity(slots.len());
        rows.extend((0..slots.len() as u64).filter_map(|j| slots[perm.apply(j) as usize].take()));
        let step = self.step;
        self.step += 1;
        GlobalBatch {
            step,
            plan_step: p,
            rows,
            counts,
        }
    }

    /// Moves past the next global batch without building its rows.
    pub fn skip_batch(&mut self) {
        while self.is_skipped(self.plan_step) {
            self.advance(None);
        }
        self.advance(None);
        self.step += 1;
    }

    /// The cursor blob for "everything before `step()` has been delivered".
    pub fn cursor(&self) -> Vec<u8> {
        self.blob(self.step)
    }

    /// [`Planner::cursor`] and its plan state digest ([`cursor::encode_with_state`]).
    pub fn cursor_with_state(&self) -> (Vec<u8>, u64) {
        cursor::encode_with_state(&self.data(self.step))
    }

    /// The cursor blob of this planner's state recorded as trainer step `step`.
    pub(super) fn blob(&self, step: u64) -> Vec<u8> {
        cursor::encode(&self.data(step))
    }

    fn data(&self, step: u64) -> cursor::CursorData {
        cursor::CursorData {
            fingerprint: cursor::Fingerprint::Settings(self.plan.settings_fingerprint),
            history: self.plan.cursor_history(self.plan_step),
            lookahead: true,
            step,
            plan_step: self.plan_step,
            mix: self.mix.clone(),
            streams: self.streams.iter().map(|s| s.state.clone()).collect(),
            domains: self.plan.records.to_vec(),
            journal: self.plan.journal.clone(),
            superseded: self.plan.superseded,
            plan_version: super::PLAN_VERSION,
        }
    }
}
