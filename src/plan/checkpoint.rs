//! Seeking from planner checkpoints: a seek starts from the nearest stored planner state
//! at or before its target instead of replaying from step 0, and leaves checkpoints
//! behind it every [`Plan::checkpoint_every`] plan steps, so the next seek anywhere in
//! the run replays at most that many steps.
//!
//! A checkpoint is a cursor blob, and [`Plan::restore`] validates it like any other
//! (fingerprint, journal, history digest of schedules/skips/reseeds before its step,
//! structure): one made before a live change, a new skip or reseed that rewrites its
//! past, for another corpus, or corrupted on disk is refused, and the seek falls back
//! to an earlier one or to step 0. Its name carries the history a little further (the
//! bursty lookahead, `Plan::lookahead`), which the cursor's own digest does not cover. The plain replay ([`Plan::seek`]) stays the
//! reference, and tests/plan_props.rs checks the two agree bit for bit.
//!
//! Pure like the rest of the plan: where checkpoints live is the [`Checkpoints`]
//! implementation's business (`crate::plan_cache` keeps them in files).

use std::collections::BTreeMap;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use super::cursor::CursorError;
use super::permute::derive_key;
use super::planner::Planner;
use super::{Plan, SEEK_CHUNK};

/// Rows a seek replays at most between two checkpoints (rounded to a power of two of
/// plan steps): 256 steps of 256 rows, about 50 ms of replay on the quiet 2-core bench
/// machine (docs/BENCHMARKS.md).
pub const CHECKPOINT_ROWS: u64 = 1 << 16;

/// Stored checkpoints a seek tries before it falls back to replaying from step 0, so a
/// cache full of refused entries cannot make a seek slower than the plain replay by
/// more than a few restores.
pub const MAX_TRIES: usize = 8;

/// Names a checkpoint: the plan step it holds the planner at, plus the digests a seek
/// filters on before it reads a blob (the plan's history before that step and the
/// bursty lookahead after it, and its journal of live changes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CheckpointKey {
    /// Plan steps replayed before the checkpoint.
    pub plan_step: u64,
    /// [`Plan::history`] at `plan_step` plus the longest bursty period: what shaped
    /// the planner's state at `plan_step`.
    pub history: u64,
    /// [`Plan::journal_digest`] of the plan that wrote it.
    pub journal: u64,
}

/// Where checkpoints of one plan fingerprint live. Implementations never fail: a store
/// that cannot read or write says so in its own way (a warning) and carries on, since
/// a checkpoint only ever saves time.
pub trait Checkpoints {
    /// The checkpoints held, in any order.
    fn list(&self) -> Vec<CheckpointKey>;
    /// Whether `key` is held (a seek does not rewrite one it passes).
    fn has(&self, key: &CheckpointKey) -> bool;
    /// The blob stored under `key`, if it can be read.
    fn load(&self, key: &CheckpointKey) -> Option<Vec<u8>>;
    /// Keeps `blob`, the planner at `key.plan_step`.
    fn store(&self, key: &CheckpointKey, blob: &[u8]);
    /// Told when the blob under `key` was refused (corrupt, or not for this plan): it was
    /// ignored, and the store may warn about it or drop it.
    fn refused(&self, key: &CheckpointKey, why: &str);
}

impl Plan {
    /// Plan steps between checkpoints: [`CHECKPOINT_ROWS`] rows' worth, a power of two.
    pub fn checkpoint_every(&self) -> u64 {
        let steps = (CHECKPOINT_ROWS / self.cfg.global_batch_rows.max(1) as u64).max(1);
        1 << (63 - steps.leading_zeros())
    }

    /// A digest of the journal of live changes in force (stage changes with their
    /// shapes, and the count superseded), so checkpoints written under different
    /// journals keep apart.
    pub fn journal_digest(&self) -> u64 {
        let mut words = vec![self.journal.len() as u64, self.superseded];
        for c in &self.journal {
            words.extend([c.at, c.points.len() as u64]);
            // A stage change has no points: its shape tells two of them at one step apart
            // (weights-only journals keep the digest they always had).
            if let Some(st) = c.stage {
                let chain = st.chain_groups as u64;
                words.extend([
                    u64::MAX,
                    st.seq_len as u64,
                    st.rows as u64,
                    st.window,
                    chain,
                ]);
            }
            for (step, w) in &c.points {
                words.push(*step);
                words.extend(w.iter().map(|x| x.to_bits()));
            }
        }
        derive_key(&words)
    }

    /// Plan steps past a checkpoint whose weights its state already depends on: a
    /// bursty domain takes a whole cycle's rows at the cycle's first step, computed from
    /// the weights of the cycle's later steps. So a checkpoint at `p` is named by the
    /// history up to `p` plus this, and one whose plan changed weights in
    /// `[p, p + lookahead)` is not a candidate (a cursor's own history, which covers
    /// steps before `p` only, would let it through).
    pub(super) fn lookahead(&self) -> u64 {
        self.mixer
            .bursty
            .iter()
            .flatten()
            .map(|&(period, _)| period as u64)
            .max()
            .unwrap_or(0)
    }

    /// The history digest a cursor at `plan_step` carries (layout 6 on): everything
    /// that shaped the steps before it, up to [`Plan::first_safe_change`], so that
    /// bursty cycles it had begun are covered to their end.
    pub fn cursor_history(&self, plan_step: u64) -> u64 {
        self.history_span(plan_step, self.first_safe_change(plan_step))
    }

    /// Whether `other`, a plan of the same config under another journal, plans every
    /// step before plan step `end` as this one does: the same raw weights at each step
    /// and the same stages begun before `end` (skips and reseeds are the config's). By
    /// value, not by journal: a live change that repeats what the config file already
    /// says alters nothing. `end` must be a [`Plan::first_safe_change`], so that bursty
    /// cycles reaching past it are covered.
    pub fn plans_alike_before(&self, other: &Plan, end: u64) -> bool {
        let weights = self.mixer.schedule.first_difference(&other.mixer.schedule);
        weights.is_none_or(|d| d >= end)
            && self.stage_words(end, None) == other.stage_words(end, None)
    }

    /// The first plan step a change may start at once every step before `first` has been
    /// served: `first`, or later when a bursty cycle begun before `first` reaches past it
    /// (that cycle's rows were computed from its later steps' weights, so a change inside
    /// it would rewrite a served step). A live change moved here, not to `first`, keeps
    /// the served past and the resumed stream equal.
    pub fn first_safe_change(&self, first: u64) -> u64 {
        self.first_safe_change_over(first, None)
    }

    /// [`Plan::first_safe_change`] over the bursty domains among `over` only (all for
    /// `None`): a layout 7 blob's run knew only its own domains.
    pub(super) fn first_safe_change_over(&self, first: u64, over: Option<&[usize]>) -> u64 {
        let mut at = first;
        let bursty = self
            .mixer
            .bursty
            .iter()
            .enumerate()
            .filter(|(d, _)| over.is_none_or(|o| o.contains(d)))
            .filter_map(|(_, b)| *b);
        for (period, phase) in bursty {
            let (period, phase) = (period as u64, phase as u64);
            if first == 0 || first <= phase {
                continue;
            }
            // The last cycle start before `first`: a served step.
            let last = first - 1;
            let start = last - (last + period - phase) % period;
            if start >= phase {
                at = at.max(start + period);
            }
        }
        at
    }

    /// What names this plan's checkpoint store: the fingerprint, and for a plan with a
    /// grouped domain whose shards have group sidecars, every domain's identity too, so
    /// a checkpoint made before a sidecar was rewritten is never a candidate (blobs
    /// written before sidecars joined the identity would otherwise pass as current).
    pub fn checkpoint_store_id(&self) -> u128 {
        if !self.identities.iter().any(|i| i.has_legacy()) {
            return self.fingerprint();
        }
        let mut b = self.fingerprint().to_le_bytes().to_vec();
        for id in self.identities.iter() {
            b.extend_from_slice(&id.prefix(id.shards()).to_le_bytes());
        }
        xxhash_rust::xxh3::xxh3_128(&b)
    }

    /// The key a checkpoint at plan step `plan_step` of this plan is stored under: public
    /// so the daemon stores what its job planners pass under the name a seek looks up.
    pub fn checkpoint_key(&self, plan_step: u64) -> CheckpointKey {
        CheckpointKey {
            plan_step,
            history: self.history(plan_step.saturating_add(self.lookahead())),
            journal: self.journal_digest(),
        }
    }

    /// The checkpoint blob of planner `p`, which the replay has left at a plan step: a
    /// cursor whose trainer step is the one that reads that plan step (or the next one
    /// not skipped), so [`Plan::restore`] accepts it.
    pub(super) fn checkpoint_blob(&self, p: &Planner) -> Vec<u8> {
        p.blob(self.trainer_step_of(p.plan_step))
    }

    /// [`Plan::seek`] from the nearest valid checkpoint in `store` at or before the
    /// target, leaving checkpoints every [`Plan::checkpoint_every`] plan steps as it
    /// goes; `None` when `cancel` is set (between chunks). Equal to [`Plan::seek`], bit
    /// for bit, whatever `store` holds.
    pub fn seek_with(
        self: &Arc<Self>,
        step: u64,
        store: &dyn Checkpoints,
        cancel: &AtomicBool,
    ) -> Option<Planner> {
        self.seek_checkpointed(step, SEEK_CHUNK, self.checkpoint_every(), store, cancel)
    }

    /// [`Plan::seek_with`] with `chunk` plan steps per chunk and a checkpoint every
    /// `every` plan steps (both at least 1); tests use small ones.
    pub fn seek_checkpointed(
        self: &Arc<Self>,
        step: u64,
        chunk: u64,
        every: u64,
        store: &dyn Checkpoints,
        cancel: &AtomicBool,
    ) -> Option<Planner> {
        let target = self.plan_step_of(step);
        let mut p = self
            .nearest_checkpoint(target, store)
            .unwrap_or_else(|| self.start());
        self.replay(&mut p, step, chunk, Some((every.max(1), store)), cancel)
            .then_some(p)
    }

    /// The planner of the nearest checkpoint at or before plan step `target` that
    /// restores under this plan, trying at most [`MAX_TRIES`]. Candidates are those
    /// whose name carries this plan's history up to their step plus the lookahead
    /// (the plan that wrote them planned every step before them as this one does);
    /// at one step, one written under this plan's journal goes first. One written under
    /// another journal restores when that journal plans its past alike
    /// ([`Plan::restore_written_under`]).
    fn nearest_checkpoint(
        self: &Arc<Self>,
        target: u64,
        store: &dyn Checkpoints,
    ) -> Option<Planner> {
        let journal = self.journal_digest();
        let mut histories = BTreeMap::new();
        let mut keys: Vec<CheckpointKey> = store
            .list()
            .into_iter()
            .filter(|k| k.plan_step > 0 && k.plan_step <= target)
            .filter(|k| {
                *histories
                    .entry(k.plan_step)
                    .or_insert_with(|| self.checkpoint_key(k.plan_step).history)
                    == k.history
            })
            .collect();
        keys.sort_by_key(|k| (std::cmp::Reverse(k.plan_step), k.journal != journal));
        let mut made = BTreeMap::new();
        for key in keys.iter().take(MAX_TRIES) {
            let Some(blob) = store.load(key) else {
                continue;
            };
            match self.restore(&blob) {
                Ok(p) if p.plan_step == key.plan_step => return Some(p),
                Ok(p) => store.refused(
                    key,
                    &format!("it holds plan step {}, not {}", p.plan_step, key.plan_step),
                ),
                // Written under a journal that this plan's does not extend: valid for
                // that run, and for this one too when the two plan its past alike (a
                // change that starts after it); otherwise skipped, not an error.
                Err(
                    CursorError::JournalBehind { .. }
                    | CursorError::JournalDiverged { .. }
                    | CursorError::JournalRewrites { .. },
                ) if key.journal != journal => {
                    let p = self.restore_written_under(&blob, key.journal, &mut made);
                    if let Some(p) = p.filter(|p| p.plan_step == key.plan_step) {
                        return Some(p);
                    }
                }
                Err(e) => store.refused(key, &e.to_string()),
            }
        }
        None
    }
}

/// Checkpoints kept in memory: for tests, and for a caller that seeks many times in one
/// process without a cache directory.
#[derive(Default)]
pub struct MemCheckpoints {
    blobs: Mutex<BTreeMap<CheckpointKey, Vec<u8>>>,
    refusals: Mutex<Vec<(CheckpointKey, String)>>,
}

impl MemCheckpoints {
    /// An empty store.
    pub fn new() -> MemCheckpoints {
        MemCheckpoints::default()
    }

    /// The checkpoints held, by key.
    pub fn blobs(&self) -> BTreeMap<CheckpointKey, Vec<u8>> {
        self.blobs.lock().map(|b| b.clone()).unwrap_or_default()
    }

    /// Replaces (or adds) the blob under `key`: tests corrupt and forge entries with it.
    pub fn put(&self, key: CheckpointKey, blob: Vec<u8>) {
        if let Ok(mut b) = self.blobs.lock() {
            b.insert(key, blob);
        }
    }

    /// The refusals reported so far, oldest first.
    pub fn refusals(&self) -> Vec<(CheckpointKey, String)> {
        self.refusals.lock().map(|r| r.clone()).unwrap_or_default()
    }
}

impl Checkpoints for MemCheckpoints {
    fn list(&self) -> Vec<CheckpointKey> {
        self.blobs().into_keys().collect()
    }
    fn has(&self, key: &CheckpointKey) -> bool {
        self.blobs.lock().is_ok_and(|b| b.contains_key(key))
    }
    fn load(&self, key: &CheckpointKey) -> Option<Vec<u8>> {
        self.blobs.lock().ok()?.get(key).cloned()
    }
    fn store(&self, key: &CheckpointKey, blob: &[u8]) {
        self.put(*key, blob.to_vec());
    }
    fn refused(&self, key: &CheckpointKey, why: &str) {
        if let Ok(mut r) = self.refusals.lock() {
            r.push((*key, why.to_string()));
        }
    }
}
