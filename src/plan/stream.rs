//! A domain's row stream in motion: the state a cursor records ([`StreamState`], its
//! [`Tail`]s) and the [`Stream`] that hands out a step's worth of rows at a time from the
//! packed windows that state points at, including batch grouping's waiting and spanning
//! blocks. What never changes during a run lives in `domain`.

use std::sync::Arc;

use super::domain::{expand_row, DomainData, Geometry, GroupWalks, UnitKind};
use super::pack::Window;
use super::permute::{chained, derive_key, Permutation, Reshuffle};
use super::stage::{self, geometry, CarryLevel, Upsampling};
use super::Row;
use crate::config::plan::GroupMode;

/// The changing part of a domain's stream; what the cursor records.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StreamState {
    /// Epochs started so far, minus one (the current epoch).
    pub epoch: u32,
    /// Whether the current epoch shuffles groups rather than documents.
    pub grouped: bool,
    /// Seed in force when the current epoch began.
    pub epoch_seed: u64,
    /// Reseeds of the current epoch's remaining positions.
    pub pos_chain: Vec<Reshuffle>,
    /// First position of the current window.
    pub window_start: u64,
    /// Next emission index within the current window.
    pub next_block: u32,
    /// Reseeds of the current window's emission order.
    pub block_chain: Vec<Reshuffle>,
    /// Blocks of the current window begun or passed over, in order: (block id, rows
    /// already taken). A long group continues here in the next step; in batch grouping a
    /// group that did not fit what was left of a batch waits here for the next.
    pub pending: Vec<(u32, u32)>,
    /// Reseeds already applied.
    pub reseeds: u32,
    /// Whether the stream has started (the first epoch is opened lazily).
    pub started: bool,
    /// Rows handed out over the run.
    pub rows: u64,
    /// Real tokens handed out over the run.
    pub tokens: u64,
    /// Groups that fit one batch but were spread over consecutive batches (batch
    /// grouping ran out of rows to fill a batch around them).
    pub split_groups: u64,
    /// Earlier windows whose batch-grouped blocks are still being handed out, oldest
    /// first (see [`Tail`]).
    pub tails: Vec<Tail>,
    /// The stage whose shape the current window is packed at (`plan/stage.rs`).
    pub stage: u32,
    /// The stage switches the current window went through, oldest first: its units
    /// not emitted before them are what it still holds.
    pub carry: Vec<CarryLevel>,
    /// Tokens dropped at stage switches: rows of batch-grouped groups still spanning
    /// batches in an earlier window (a tail) when the switch came.
    pub dropped: u64,
    /// The current epoch's long-document upsampling: the stage's in force when it
    /// began (`plan/stage.rs`), kept until it ends.
    pub upsample: Upsampling,
}

/// A window whose blocks have all been drawn but some of which still span batches.
/// Batch grouping keeps handing their rows out in the following steps, at most the cap
/// per batch and in consecutive batches, while the next window (or epoch) supplies the
/// rest of the domain's rows. It names its window the way [`StreamState`] does, so a
/// restore repacks it; tails hold only spanning blocks, so there are at most as many as
/// the domain has rows in a step (about `1 / max_share` when the cap is 2 rows or more).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Tail {
    /// The window's epoch.
    pub epoch: u32,
    /// Whether that epoch shuffled groups.
    pub grouped: bool,
    /// Seed in force when that epoch began.
    pub epoch_seed: u64,
    /// Reseeds of that epoch's positions, as they were when the window ended.
    pub pos_chain: Vec<Reshuffle>,
    /// First position of the window.
    pub window_start: u64,
    /// Its blocks still spanning: (block id, rows already taken, > 0).
    pub pending: Vec<(u32, u32)>,
    /// The stage switches the window went through (tails are in the stream's stage).
    pub carry: Vec<CarryLevel>,
    /// That epoch's upsampling.
    pub upsample: Upsampling,
}

impl Tail {
    /// The stream state that packs this window (at `stage`, the stream's).
    fn as_state(&self, stage: u32) -> StreamState {
        StreamState {
            epoch: self.epoch,
            grouped: self.grouped,
            epoch_seed: self.epoch_seed,
            pos_chain: self.pos_chain.clone(),
            window_start: self.window_start,
            started: true,
            stage,
            carry: self.carry.clone(),
            upsample: self.upsample,
            ..StreamState::default()
        }
    }

    fn kind(&self) -> UnitKind {
        if self.grouped {
            UnitKind::Group
        } else {
            UnitKind::Doc
        }
    }
}

/// Why a restored stream state does not fit the domain it claims to be of.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StreamError {
    /// Tails recorded before the stream's first epoch opened.
    #[error("tails in a stream that has not started")]
    TailsBeforeStart,
    /// The current window starts past the end of the epoch.
    #[error("window start {start} is past the epoch's {units} units")]
    WindowPastEpoch {
        /// The window's first position.
        start: u64,
        /// Positions in the epoch.
        units: u64,
    },
    /// A grouped epoch in a domain that has no groups.
    #[error("grouped epoch in a domain without groups")]
    GroupedWithoutGroups,
    /// The next block is past the end of the window.
    #[error("block {block} of a window with {blocks}")]
    BlockPastWindow {
        /// The next block.
        block: u32,
        /// Blocks in the window.
        blocks: usize,
    },
    /// More pending blocks than a window and the deferral limit allow.
    #[error("too many pending blocks")]
    TooManyPending {
        /// How many the state holds.
        pending: usize,
    },
    /// A tail's window starts past the end of its epoch.
    #[error("tail window start {start} is past the epoch's {units} units")]
    TailPastEpoch {
        /// The tail window's first position.
        start: u64,
        /// Positions in its epoch.
        units: u64,
    },
    /// A grouped tail in a domain that has no groups.
    #[error("grouped tail in a domain without groups")]
    GroupedTailWithoutGroups,
    /// A tail with nothing left to hand out (tails are dropped when empty).
    #[error("tail without pending blocks")]
    EmptyTail,
    /// More tails than groups of the domain can span batches at once (each tail is a
    /// window packed on resume, so a forged list would pack thousands).
    #[error("{tails} tails, but at most {most} groups of this domain span batches at once")]
    TooManyTails {
        /// Tails the state lists.
        tails: usize,
        /// The most the plan allows ([`crate::config::plan::group_spans`]).
        most: usize,
    },
    /// Two tails naming one window (a window ends once).
    #[error("two tails of the window at position {start} of epoch {epoch}")]
    DuplicateTail {
        /// The window's epoch.
        epoch: u32,
        /// Its first position.
        start: u64,
    },
    /// A pending block that is not in its window, or has no rows left.
    #[error("pending block {block} (+{done} rows) is not in the window")]
    PendingNotInWindow {
        /// The block id.
        block: u32,
        /// Rows the state says were taken.
        done: u32,
    },
    /// An epoch (or a tail's) with an upsampling setting no stage of the plan gives the
    /// domain.
    #[error("an epoch upsamples units over {min_tokens} tokens x{factor}, which no stage of this plan sets for the domain")]
    Upsampling {
        /// The setting's threshold.
        min_tokens: u64,
        /// Its factor.
        factor: u32,
    },
    /// A stage out of order, or past the stage of the step the stream resumes at.
    #[error("stage {stage} is out of order or not reached yet (the plan has {stages})")]
    Stage {
        /// The stage named.
        stage: u32,
        /// Stages in the plan.
        stages: usize,
    },
}

/// Names a packed current window: (window start, stage, carry depth).
type WindowKey = (u64, u32, usize);

/// Most blocks a batch-grouped domain passes over while looking for ones that fit.
pub const MAX_DEFERRED: usize = 16;

/// A domain's stream: state plus the window cache.
pub(crate) struct Stream {
    pub(crate) state: StreamState,
    /// The current window, keyed by (window start, stage, carry depth).
    pub(super) cache: Option<(WindowKey, Arc<Window>, Permutation)>,
    /// Packed tail windows, by (epoch, window start).
    pub(super) tail_cache: Vec<((u32, u64), Arc<Window>)>,
    /// Where expanding rows of long groups left off ([`GroupWalks`]).
    walks: GroupWalks,
    /// The rows of the current window's blocks handed out so far ([`Handed`]), kept up
    /// as blocks are drawn so progress costs no walk of the window.
    handed: Option<Handed>,
}

/// A running count of the rows handed out of one packed window, in emission order.
struct Handed {
    /// The window counted (held, so its address names it while it is counted).
    window: Arc<Window>,
    /// The epoch it was counted in (a window is reused across epochs).
    epoch: u32,
    /// Blocks counted: emission positions `0..blocks`.
    blocks: u32,
    /// Their rows.
    rows: u64,
    /// All rows of the window.
    total: u64,
}

impl Stream {
    pub(crate) fn new(state: StreamState) -> Stream {
        Stream {
            state,
            cache: None,
            tail_cache: Vec::new(),
            walks: GroupWalks::default(),
            handed: None,
        }
    }

    /// Checks a restored state against the window it points at, so a forged or stale
    /// blob is refused rather than indexing out of bounds later.
    pub(crate) fn check(
        &mut self,
        d: &DomainData,
        g: &[Geometry],
        stage_now: u32,
        max_tails: usize,
    ) -> Result<(), StreamError> {
        if !self.state.started {
            if !self.state.tails.is_empty() {
                return Err(StreamError::TailsBeforeStart);
            }
            return Ok(());
        }
        for u in [self.state.upsample]
            .into_iter()
            .chain(self.state.tails.iter().map(|t| t.upsample))
        {
            if let (false, Upsampling::Long(u)) = (d.knows(u), u) {
                return Err(StreamError::Upsampling {
                    min_tokens: u.min_tokens,
                    factor: u.factor,
                });
            }
        }
        let n = d.virtual_units(self.kind(), self.state.upsample);
        if self.state.window_start >= n.max(1) {
            return Err(StreamError::WindowPastEpoch {
                start: self.state.window_start,
                units: n,
            });
        }
        if self.state.grouped && d.units(UnitKind::Group) == 0 {
            return Err(StreamError::GroupedWithoutGroups);
        }
        stage::check(d, &self.state, self.kind(), g, stage_now)?;
        let (w, _) = self.window(d, g);
        if self.state.next_block as usize > w.blocks.len() {
            return Err(StreamError::BlockPastWindow {
                block: self.state.next_block,
                blocks: w.blocks.len(),
            });
        }
        if self.state.pending.len() > MAX_DEFERRED + w.blocks.len() {
            return Err(StreamError::TooManyPending {
                pending: self.state.pending.len(),
            });
        }
        check_pending(&self.state.pending, &w)?;
        if self.state.tails.len() > max_tails {
            return Err(StreamError::TooManyTails {
                tails: self.state.tails.len(),
                most: max_tails,
            });
        }
        for t in 0..self.state.tails.len() {
            let tail = &self.state.tails[t];
            let key = (tail.epoch, tail.window_start);
            if self.state.tails[..t]
                .iter()
                .any(|o| (o.epoch, o.window_start) == key)
            {
                return Err(StreamError::DuplicateTail {
                    epoch: key.0,
                    start: key.1,
                });
            }
            let n = d.virtual_units(tail.kind(), tail.upsample);
            if tail.window_start >= n.max(1) {
                return Err(StreamError::TailPastEpoch {
                    start: tail.window_start,
                    units: n,
                });
            }
            if tail.grouped && d.units(UnitKind::Group) == 0 {
                return Err(StreamError::GroupedTailWithoutGroups);
            }
            if tail.pending.is_empty() {
                return Err(StreamError::EmptyTail);
            }
            // Its carry levels as the stream's own are checked (in order, before now),
            // after the cheap checks: they repack the window at each level.
            if !tail.carry.is_empty() {
                let state = tail.as_state(self.state.stage);
                stage::check(d, &state, tail.kind(), g, stage_now)?;
            }
            let tw = self.tail_window(d, g, t);
            check_pending(&self.state.tails[t].pending, &tw)?;
        }
        Ok(())
    }

    /// Packs (or fetches) the window of tail `t`.
    pub(super) fn tail_window(&mut self, d: &DomainData, g: &[Geometry], t: usize) -> Arc<Window> {
        let tail = &self.state.tails[t];
        let key = (tail.epoch, tail.window_start);
        if let Some((_, w)) = self.tail_cache.iter().find(|(k, _)| *k == key) {
            return w.clone();
        }
        let state = tail.as_state(self.state.stage);
        let w = Arc::new(stage::pack_current(d, &state, tail.kind(), g));
        self.tail_cache.push((key, w.clone()));
        w
    }

    /// Moves the current window's pending blocks into a tail (its blocks are all drawn).
    fn push_tail(&mut self) {
        let s = &mut self.state;
        let tail = Tail {
            epoch: s.epoch,
            grouped: s.grouped,
            epoch_seed: s.epoch_seed,
            pos_chain: s.pos_chain.clone(),
            window_start: s.window_start,
            pending: std::mem::take(&mut s.pending),
            carry: s.carry.clone(),
            upsample: s.upsample,
        };
        if let Some((_, w, _)) = &self.cache {
            self.tail_cache
                .push(((tail.epoch, tail.window_start), w.clone()));
        }
        self.state.tails.push(tail);
    }

    /// Drops tails with nothing left, and cached windows no tail names.
    fn prune_tails(&mut self) {
        self.state.tails.retain(|t| !t.pending.is_empty());
        let tails = &self.state.tails;
        self.tail_cache
            .retain(|(k, _)| tails.iter().any(|t| (t.epoch, t.window_start) == *k));
    }

    /// The share of the cached current window's rows already taken, if it is packed:
    /// the rows of the blocks handed out, less what their pending blocks still owe. By
    /// rows, not blocks: a group that spans thousands of rows counted as taken at its
    /// first, so a domain of one large group read 100% of an epoch after one row. The
    /// blocks handed out are the first `next_block` in *emission* order; summing the
    /// first in packing order read 75% of an epoch after one step of a domain whose
    /// large group packs first.
    pub(crate) fn window_taken(&self) -> Option<f64> {
        let Some((k, w, perm)) = &self.cache else {
            return None;
        };
        if *k != self.cache_key() {
            return None;
        }
        let next = self.state.next_block.min(w.blocks.len() as u32);
        let (handed, total) = match &self.handed {
            Some(h) if self.counts(h, w) && h.blocks == next => (h.rows, h.total),
            // Not yet counted (a restored stream before its first step): count now.
            _ => (
                self.rows_handed(w, perm, 0..next),
                w.blocks.iter().map(|b| u64::from(b.rows)).sum(),
            ),
        };
        let owed: u64 = (self.state.pending.iter())
            .filter_map(|&(b, done)| {
                w.blocks
                    .get(b as usize)
                    .map(|blk| blk.rows.saturating_sub(done))
            })
            .map(u64::from)
            .sum();
        Some(match total {
            0 => 0.0,
            t => (handed.saturating_sub(owed) as f64 / t as f64).min(1.0),
        })
    }

    /// Whether `h` counts window `w` of the current epoch.
    fn counts(&self, h: &Handed, w: &Arc<Window>) -> bool {
        Arc::ptr_eq(&h.window, w) && h.epoch == self.state.epoch
    }

    /// Rows of the blocks at emission positions `at` of window `w`.
    fn rows_handed(&self, w: &Window, perm: &Permutation, at: std::ops::Range<u32>) -> u64 {
        at.map(|i| chained(perm, &self.state.block_chain, u64::from(i)))
            .filter_map(|b| w.blocks.get(b as usize))
            .map(|b| u64::from(b.rows))
            .sum()
    }

    /// Counts block `next_block - 1` of `w`, of `rows` rows, as handed out.
    fn hand(&mut self, w: &Arc<Window>, rows: u32) {
        let (next, epoch) = (self.state.next_block, self.state.epoch);
        match &mut self.handed {
            Some(h) if Arc::ptr_eq(&h.window, w) && h.epoch == epoch && h.blocks + 1 == next => {
                h.blocks = next;
                h.rows += u64::from(rows);
            }
            _ => self.count_handed(),
        }
    }

    /// Brings the count of rows handed out up to the blocks drawn, after a step, so
    /// [`Stream::window_taken`] is a lookup: counts the blocks drawn since the last
    /// count, or all of them when the window or the epoch changed.
    fn count_handed(&mut self) {
        let Some((_, w, perm)) = &self.cache else {
            self.handed = None;
            return;
        };
        let next = self.state.next_block.min(w.blocks.len() as u32);
        let (from, rows, total) = match &self.handed {
            Some(h) if self.counts(h, w) && h.blocks <= next => (h.blocks, h.rows, h.total),
            _ => (0, 0, w.blocks.iter().map(|b| u64::from(b.rows)).sum()),
        };
        let rows = rows + self.rows_handed(w, perm, from..next);
        self.handed = Some(Handed {
            window: w.clone(),
            epoch: self.state.epoch,
            blocks: next,
            rows,
            total,
        });
    }

    fn kind(&self) -> UnitKind {
        if self.state.grouped {
            UnitKind::Group
        } else {
            UnitKind::Doc
        }
    }

    /// End of the current window: its start plus the window size of the stage that
    /// first cut it (a carried window keeps its units' range).
    fn window_end(&self, d: &DomainData, g: &[Geometry]) -> u64 {
        let n = d.virtual_units(self.kind(), self.state.upsample);
        let len = d.window_len(geometry(g, stage::origin(&self.state)));
        (self.state.window_start + len).min(n)
    }

    fn cache_key(&self) -> WindowKey {
        let s = &self.state;
        (s.window_start, s.stage, s.carry.len())
    }

    /// Packs (or fetches) the current window and its emission permutation.
    fn window(&mut self, d: &DomainData, g: &[Geometry]) -> (Arc<Window>, Permutation) {
        let key = self.cache_key();
        if let Some((k, w, p)) = &self.cache {
            if *k == key {
                return (w.clone(), p.clone());
            }
        }
        let s = &self.state;
        let reuse = d.first.as_ref().filter(|f| {
            s.epoch == 0
                && s.window_start == 0
                && s.pos_chain.is_empty()
                && s.epoch_seed == f.seed
                && s.grouped == f.grouped
                && s.stage == 0
                && s.carry.is_empty()
                && s.upsample == Upsampling::Domain
        });
        let w = match reuse {
            Some(f) => f.window.clone(),
            None => Arc::new(stage::pack_current(d, &self.state, self.kind(), g)),
        };
        let p = Permutation::new(
            w.blocks.len() as u64,
            stage::emission_key(d, s, s.carry.len(), s.stage),
        );
        self.cache = Some((key, w.clone(), p.clone()));
        (w, p)
    }

    /// Opens the next epoch (or, without `next_epoch`, the first) at `step`, with the
    /// upsampling `ups` of the stage in force.
    fn open_epoch(
        &mut self,
        d: &DomainData,
        step: u64,
        seed: u64,
        next_epoch: bool,
        ups: Upsampling,
    ) {
        let s = &mut self.state;
        if next_epoch {
            s.epoch = s.epoch.saturating_add(1); // a forged cursor may be at the maximum
        }
        s.upsample = ups;
        s.grouped = d.grouping_active(step);
        s.epoch_seed = seed;
        s.pos_chain.clear();
        s.window_start = 0;
        s.next_block = 0;
        s.block_chain.clear();
        s.pending.clear();
        s.carry.clear();
        s.started = true;
        self.cache = None;
    }

    /// Brings the stream to `step` of stage `stage` (whose upsampling is `ups`): opens
    /// the first epoch, switches stage, switches to grouped units when grouping starts,
    /// and applies reseeds that are due.
    fn prepare(
        &mut self,
        d: &DomainData,
        g: &[Geometry],
        (stage, ups): (u32, Upsampling),
        step: u64,
        seed: u64,
        reseeds: &[(u64, u64)],
    ) {
        if !self.state.started {
            self.state.stage = stage;
            self.open_epoch(d, step, seed, false, ups);
        } else if self.state.stage != stage {
            self.switch_stage(d, g, stage);
        }
        if !self.state.grouped && d.grouping_active(step) {
            self.open_epoch(d, step, seed, true, ups);
        }
        while (self.state.reseeds as usize) < reseeds.len() {
            let (rstep, rseed) = reseeds[self.state.reseeds as usize];
            if rstep > step {
                break;
            }
            let (w, _) = self.window(d, g);
            let end = self.window_end(d, g);
            let s = &mut self.state;
            let e = s.epoch as u64;
            s.pos_chain.push(Reshuffle {
                start: end,
                key: derive_key(&[rseed, d.key, e, s.reseeds as u64, 3]),
            });
            if (s.next_block as usize) < w.blocks.len() {
                s.block_chain.push(Reshuffle {
                    start: s.next_block as u64,
                    key: derive_key(&[rseed, d.key, e, s.window_start, s.reseeds as u64, 4]),
                });
            }
            s.reseeds += 1;
        }
    }

    /// Advances to the next window (or epoch, with upsampling `ups`) when the current
    /// one is used up. Returns false when the domain has no units at all.
    fn advance_window(
        &mut self,
        d: &DomainData,
        g: &[Geometry],
        step: u64,
        seed: u64,
        ups: Upsampling,
    ) -> bool {
        let end = self.window_end(d, g);
        let n = d.virtual_units(self.kind(), self.state.upsample);
        if n == 0 {
            return false;
        }
        if end >= n {
            self.open_epoch(d, step, seed, true, ups);
        } else {
            self.state.window_start = end;
            self.state.next_block = 0;
            self.state.block_chain.clear();
            self.state.carry.clear();
        }
        true
    }

    /// Takes `n` rows for `step`, appending them to `out` (or only counting them).
    ///
    /// In batch grouping a block (a group's rows) goes whole when it fits what is left of
    /// the domain's rows and the cap; one that fits a batch but not what is left waits
    /// for the next step (at most [`MAX_DEFERRED`] wait); anything else *spans*: it
    /// takes at most the cap per step and continues first in every following step until
    /// done, so its rows land in consecutive batches. Spanning blocks outlive their
    /// window as [`Tail`]s while the next window fills the rest of the allotment, which
    /// keeps the mixture exact and the promise at window and epoch ends. `stage` is the
    /// step's stage and the upsampling an epoch beginning in it takes.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn take(
        &mut self,
        d: &DomainData,
        domain: u16,
        g: &[Geometry],
        stage: (u32, Upsampling),
        n: u32,
        step: u64,
        seed: u64,
        reseeds: &[(u64, u64)],
        cap: u32,
        mut out: Option<&mut RowsOut<'_>>,
    ) {
        if n == 0 {
            return;
        }
        self.prepare(d, g, stage, step, seed, reseeds);
        let batch_mode = self.state.grouped && d.settings.grouping.mode == GroupMode::Batch;
        // `limit`: the most rows a block may have and still go whole into this batch.
        let limit = if batch_mode {
            cap.min(n).max(1)
        } else {
            u32::MAX
        };
        let span_cap = if batch_mode { cap.max(1) } else { u32::MAX };
        // Most blocks spanning at once: each needs a row in every following step, and
        // the domain's rows per step move by at most one under constant weights.
        let max_spans = n.saturating_sub(1).max(1) as usize;
        let mut remaining = n;

        // 1. Blocks already spanning batches continue, oldest first (tails, then the
        //    current window), each at most the cap and leaving a row for each one after.
        // 2. Blocks waiting: whole if they fit now; one too large for any batch at this
        //    step's rows starts spanning when there is room for another span.
        let mut owed = self.spanning() as u32;
        for started in [true, false] {
            for t in 0..=self.state.tails.len() {
                if remaining == 0 {
                    break;
                }
                let (w, epoch, kind) = self.source(d, g, t);
                let mut i = 0;
                while i < self.pending_of(t).len() && remaining > 0 {
                    let (b, done) = self.pending_of(t)[i];
                    if (done > 0) != started {
                        i += 1;
                        continue;
                    }
                    let rows = w.blocks[b as usize].rows;
                    let left = rows - done;
                    let take = if started {
                        owed -= 1;
                        left.min(span_cap).min(remaining.saturating_sub(owed))
                    } else if rows <= remaining && rows <= limit {
                        rows
                    } else if rows > limit && self.spanning() < max_spans {
                        rows.min(remaining).min(span_cap)
                    } else {
                        0 // keeps waiting: for room in a batch, or for a span to end
                    };
                    self.emit_rows(d, domain, &w, epoch, kind, b, done, take, &mut out);
                    remaining -= take;
                    if take == left {
                        self.pending_of(t).remove(i);
                    } else {
                        self.pending_of(t)[i].1 = done + take;
                        i += 1;
                    }
                }
            }
        }
        self.prune_tails();

        // 3. New blocks in emission order.
        let (mut w, mut perm) = self.window(d, g);
        prefetch_blocks(
            &w,
            &perm,
            &self.state.block_chain,
            self.state.next_block,
            remaining,
        );
        let mut empty_windows = 0u64;
        while remaining > 0 {
            if self.state.next_block as usize >= w.blocks.len() {
                // A used-up window's waiting blocks start now (past `max_spans` if they
                // must, counted as split), so only spanning blocks outlive their window
                // and a small domain's epochs never run ahead of blocks left waiting.
                let waiting = self.state.pending.iter().position(|p| p.1 == 0);
                if let Some(i) = waiting {
                    let b = self.state.pending[i].0;
                    let rows = w.blocks[b as usize].rows;
                    let take = if rows <= remaining && rows <= limit {
                        rows
                    } else {
                        self.start_span(rows, remaining, span_cap, limit, max_spans)
                    };
                    let (epoch, kind) = (self.state.epoch, self.kind());
                    self.emit_rows(d, domain, &w, epoch, kind, b, 0, take, &mut out);
                    remaining -= take;
                    if take == rows {
                        self.state.pending.remove(i);
                    } else {
                        self.state.pending[i].1 = take;
                    }
                    continue;
                }
                if !self.state.pending.is_empty() {
                    self.push_tail();
                }
                if w.blocks.is_empty() {
                    // Only empty windows for two epochs in a row (every window holds a
                    // unit or more): nothing to give. A domain with tokens never gets here, as
                    // each epoch has a window with rows; a flat million windows cut
                    // short the batches of one with a million empty documents and
                    // `window = 1`, and made every step of a small shard whose documents
                    // all read as 0 (corrupt, not yet validated) search a million.
                    empty_windows += 1;
                    let units = d.virtual_units(self.kind(), self.state.upsample);
                    if empty_windows > units.saturating_mul(2).saturating_add(2) {
                        return;
                    }
                } else {
                    empty_windows = 0;
                }
                if !self.advance_window(d, g, step, seed, stage.1) {
                    return;
                }
                (w, perm) = self.window(d, g);
                let next = self.state.next_block;
                prefetch_blocks(&w, &perm, &self.state.block_chain, next, remaining);
                continue;
            }
            let b = chained(&perm, &self.state.block_chain, self.state.next_block as u64) as u32;
            self.state.next_block += 1;
            let rows = w.blocks[b as usize].rows;
            self.hand(&w, rows);
            let take = if !batch_mode || (rows <= remaining && rows <= limit) {
                rows.min(remaining)
            } else {
                let can_wait = self.waiting() < MAX_DEFERRED;
                if (rows <= limit || self.spanning() >= max_spans) && can_wait {
                    0 // waits for the next step (or for a spanning block to finish)
                } else {
                    self.start_span(rows, remaining, span_cap, limit, max_spans)
                }
            };
            let (epoch, kind) = (self.state.epoch, self.kind());
            self.emit_rows(d, domain, &w, epoch, kind, b, 0, take, &mut out);
            remaining -= take;
            if take < rows {
                self.state.pending.push((b, take));
            }
        }
        self.count_handed();
    }

    /// Window, epoch and unit kind of pending source `t`: a tail, or (at
    /// `t == tails.len()`) the current window.
    fn source(&mut self, d: &DomainData, g: &[Geometry], t: usize) -> (Arc<Window>, u32, UnitKind) {
        match self.state.tails.get(t) {
            Some(tail) => {
                let (epoch, kind) = (tail.epoch, tail.kind());
                (self.tail_window(d, g, t), epoch, kind)
            }
            None => (self.window(d, g).0, self.state.epoch, self.kind()),
        }
    }

    /// Pending blocks of source `t` (see [`Stream::source`]).
    fn pending_of(&mut self, t: usize) -> &mut Vec<(u32, u32)> {
        let s = &mut self.state;
        match s.tails.get_mut(t) {
            Some(tail) => &mut tail.pending,
            None => &mut s.pending,
        }
    }

    /// Rows a block of `rows` that cannot go whole takes now: it starts spanning batches,
    /// at most `span_cap` a batch. A block that fits a batch (`rows <= limit`) is counted
    /// as split, and so is one forced to span past `max_spans` (it may miss a batch).
    fn start_span(
        &mut self,
        rows: u32,
        remaining: u32,
        span_cap: u32,
        limit: u32,
        max_spans: usize,
    ) -> u32 {
        if rows <= limit || self.spanning() >= max_spans {
            self.state.split_groups = self.state.split_groups.saturating_add(1);
        }
        rows.min(remaining).min(span_cap)
    }

    /// Blocks waiting for room (pending, none of their rows taken yet).
    fn waiting(&self) -> usize {
        self.all_pending().filter(|p| p.1 == 0).count()
    }

    /// Blocks spanning batches (pending, some of their rows taken).
    fn spanning(&self) -> usize {
        self.all_pending().filter(|p| p.1 > 0).count()
    }

    fn all_pending(&self) -> impl Iterator<Item = &(u32, u32)> {
        let s = &self.state;
        s.tails
            .iter()
            .flat_map(|t| t.pending.iter())
            .chain(s.pending.iter())
    }

    #[allow(clippy::too_many_arguments)]
    fn emit_rows(
        &mut self,
        d: &DomainData,
        domain: u16,
        w: &Window,
        epoch: u32,
        kind: UnitKind,
        b: u32,
        from: u32,
        count: u32,
        out: &mut Option<&mut RowsOut<'_>>,
    ) {
        let block = w.blocks[b as usize];
        for r in from..from + count {
            let row = block.first_row + r;
            let tokens = w.rows.get(row as usize).map_or(0, |r| r.tokens);
            self.state.rows = self.state.rows.saturating_add(1);
            self.state.tokens = self.state.tokens.saturating_add(tokens as u64);
            if let Some(out) = out.as_deref_mut() {
                out.rows.push(expand_row(
                    d,
                    kind,
                    domain,
                    epoch,
                    w.row_pieces(row),
                    tokens,
                    &mut self.walks,
                    out.groups,
                ));
            }
        }
    }
}

/// Most blocks [`prefetch_blocks`] looks ahead at.
const BLOCKS_AHEAD: usize = 64;

/// Pulls into the CPU's caches what taking the `count` blocks of `w` from emission
/// position `next` on reads: each block, its first row, and that row's pieces, one level
/// at a time so that each level's misses overlap. The blocks are visited in shuffled
/// order, so each row's expansion otherwise waited on three misses in a row, a third of
/// the daemon's plan thread at 10^10 tokens (docs/BENCHMARKS.md, "Huge folios and the
/// served rows"). A hint only: nothing changes, and the blocks taken may be others.
fn prefetch_blocks(w: &Window, perm: &Permutation, chain: &[Reshuffle], next: u32, count: u32) {
    let n = w.blocks.len();
    let first = next as usize;
    let end = n.min(first + (count as usize).min(BLOCKS_AHEAD));
    if end <= first {
        return;
    }
    let mut blocks = [0usize; BLOCKS_AHEAD];
    let blocks = &mut blocks[..end - first];
    for (i, b) in blocks.iter_mut().enumerate() {
        *b = chained(perm, chain, (first + i) as u64) as usize;
        hint(w.blocks.get(*b..*b + 1));
    }
    for &b in blocks.iter() {
        let row = w.blocks.get(b).map(|blk| blk.first_row as usize);
        hint(row.and_then(|r| w.rows.get(r..r + 1)));
    }
    for &b in blocks.iter() {
        let row = w
            .blocks
            .get(b)
            .and_then(|blk| w.rows.get(blk.first_row as usize));
        hint(row.and_then(|r| w.pieces.get(r.first as usize..(r.first + r.count) as usize)));
    }
}

/// A CPU cache hint for the memory of `items` (at most 256 bytes); none for `None`.
fn hint<T>(items: Option<&[T]>) {
    if let Some(items) = items {
        crate::sys::prefetch_items(items, 256);
    }
}

/// Where [`Stream::take`] puts the rows it builds, and whether a piece of a document unit
/// looks its group up in the shard's sidecar ([`super::Segment::group`]). Explain, the
/// report and the property tests read that group; serving a slot never does, and at
/// 10^10 tokens the lookup took a quarter of the daemon's plan thread
/// (docs/BENCHMARKS.md, "Huge folios and the served rows").
pub(crate) struct RowsOut<'a> {
    pub(crate) rows: &'a mut Vec<Row>,
    pub(crate) groups: bool,
}

/// Checks that restored pending blocks name blocks of `w` with rows still to take.
pub(super) fn check_pending(pending: &[(u32, u32)], w: &Window) -> Result<(), StreamError> {
    for &(block, done) in pending {
        match w.blocks.get(block as usize) {
            Some(blk) if done < blk.rows => {}
            _ => return Err(StreamError::PendingNotInWindow { block, done }),
        }
    }
    Ok(())
}

/// Epoch progress of a stream: completed epochs plus the fraction of the current one
/// (window start plus the share of the window's rows already taken,
/// [`Stream::window_taken`]; units are counted as equal within an epoch).
pub(crate) fn epoch_progress(
    d: &DomainData,
    s: &StreamState,
    taken: Option<f64>,
    g: &[Geometry],
) -> f64 {
    if !s.started {
        return 0.0;
    }
    let kind = if s.grouped {
        UnitKind::Group
    } else {
        UnitKind::Doc
    };
    let n = d.virtual_units(kind, s.upsample).max(1);
    let end = (s.window_start + d.window_len(geometry(g, stage::origin(s)))).min(n);
    let within = taken.unwrap_or(0.0);
    s.epoch as f64 + (s.window_start as f64 + within * (end - s.window_start) as f64) / n as f64
}
