//! One domain's row stream: units (documents, or whole groups) shuffled per epoch,
//! packed window by window, and handed out a step's worth of rows at a time.
//!
//! [`DomainData`] is what never changes during a run (the domain's shards, unit counts,
//! its long-unit list for upsampling, its fill). [`StreamState`] is everything that
//! does change, kept explicit and small so that the cursor blob can carry it; the packed
//! windows are only a cache of what the state determines.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::corpus::GroupRun;

use super::pack::{self, Piece, Window};
use super::permute::{chained, derive_key, Permutation, Reshuffle};
use super::{Row, Segment};
use crate::config::plan::{DomainSettings, GroupMode, PlanConfig};

/// Where a domain's document lengths and groups come from: a mapped shard in the daemon,
/// a plain vector in property tests. The plan reads nothing else.
pub trait DocSource: Send + Sync {
    /// Documents in the shard.
    fn documents(&self) -> u64;
    /// Tokens in the shard (the sum of all document lengths).
    fn tokens(&self) -> u64;
    /// Tokens of document `doc` (< `documents()`); the shard has been validated.
    fn doc_len(&self, doc: u64) -> u64;
    /// Group runs in document order, when the shard has a sidecar.
    fn groups(&self) -> Option<&[GroupRun]>;
}

/// A shard held in memory: document lengths and optional groups. Used by tests and by
/// anything that plans without files.
#[derive(Debug, Clone, Default)]
pub struct MemShard {
    /// Length of each document.
    pub lengths: Vec<u32>,
    /// Group runs, if grouped.
    pub groups: Option<Vec<GroupRun>>,
}

impl DocSource for MemShard {
    fn documents(&self) -> u64 {
        self.lengths.len() as u64
    }
    fn tokens(&self) -> u64 {
        self.lengths.iter().map(|&l| l as u64).sum()
    }
    fn doc_len(&self, doc: u64) -> u64 {
        self.lengths.get(doc as usize).copied().unwrap_or(0) as u64
    }
    fn groups(&self) -> Option<&[GroupRun]> {
        self.groups.as_deref()
    }
}

/// A domain as the caller hands it to the planner.
#[derive(Clone)]
pub struct DomainInput {
    /// Unique name; keys its randomness and names it in weights.
    pub name: String,
    /// Shards in their fixed order, with display names for provenance.
    pub shards: Vec<(String, Arc<dyn DocSource>)>,
    /// Grouping, upsampling, bursty and window settings.
    pub settings: DomainSettings,
}

/// The immutable part of a domain.
pub struct DomainData {
    pub(crate) name: String,
    pub(crate) key: u64,
    pub(crate) shard_names: Vec<String>,
    shards: Vec<Arc<dyn DocSource>>,
    doc_prefix: Vec<u64>,
    group_prefix: Option<Vec<u64>>,
    pub(crate) settings: DomainSettings,
    pub(crate) window: u64,
    /// Long units (by kind: documents, groups) repeated by upsampling, ascending.
    long_docs: Vec<u64>,
    long_groups: Vec<u64>,
    pub(crate) tokens: u64,
    /// The first window, once packed (see [`first_window`]).
    pub(crate) first: Option<FirstWindow>,
}

/// Which kind of unit an epoch shuffles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum UnitKind {
    Doc,
    Group,
}

impl DomainData {
    /// Indexes a domain: O(shards) unless upsampling asks for the long-unit list, which
    /// is one pass over the document lengths.
    pub(crate) fn new(input: &DomainInput, cfg: &PlanConfig) -> Result<DomainData, String> {
        let mut doc_prefix = vec![0u64];
        let mut group_prefix = Some(vec![0u64]);
        let mut tokens = 0u64;
        for (name, s) in &input.shards {
            doc_prefix.push(doc_prefix.last().copied().unwrap_or(0) + s.documents());
            match (s.groups(), group_prefix.as_mut()) {
                (Some(g), Some(gp)) => {
                    let last = gp.last().copied().unwrap_or(0);
                    gp.push(last + g.len() as u64);
                }
                (None, _) => {
                    if input.settings.grouping.mode != GroupMode::Off {
                        return Err(format!(
                            "domain {}: grouping is {:?} but shard {name} has no .groups.npy sidecar",
                            input.name, input.settings.grouping.mode
                        ));
                    }
                    group_prefix = None;
                }
                _ => {}
            }
            tokens += s.tokens();
        }
        let mut data = DomainData {
            name: input.name.clone(),
            key: super::permute::name_key(&input.name),
            shard_names: input.shards.iter().map(|(n, _)| n.clone()).collect(),
            shards: input.shards.iter().map(|(_, s)| s.clone()).collect(),
            doc_prefix,
            group_prefix,
            settings: input.settings,
            window: input.settings.window.unwrap_or(cfg.best_fit_window),
            long_docs: Vec::new(),
            long_groups: Vec::new(),
            tokens,
            first: None,
        };
        let threshold = input.settings.upsample_long.map(|u| u.min_tokens);
        if let Some(t) = threshold {
            let n = data.units(UnitKind::Doc);
            data.long_docs = (0..n)
                .filter(|&u| data.unit_len(UnitKind::Doc, u) > t)
                .collect();
        }
        if let (Some(t), true) = (threshold, data.group_prefix.is_some()) {
            if input.settings.grouping.mode != GroupMode::Off {
                let n = data.units(UnitKind::Group);
                data.long_groups = (0..n)
                    .filter(|&g| data.unit_len(UnitKind::Group, g) > t)
                    .collect();
            }
        }
        Ok(data)
    }

    /// Units of a kind.
    pub(crate) fn units(&self, kind: UnitKind) -> u64 {
        match kind {
            UnitKind::Doc => self.doc_prefix.last().copied().unwrap_or(0),
            UnitKind::Group => self
                .group_prefix
                .as_ref()
                .and_then(|g| g.last().copied())
                .unwrap_or(0),
        }
    }

    /// Virtual units of an epoch: every unit once, long ones `factor` times.
    pub(crate) fn virtual_units(&self, kind: UnitKind) -> u64 {
        let extra = match self.settings.upsample_long {
            Some(u) => (u.factor as u64 - 1) * self.long(kind).len() as u64,
            None => 0,
        };
        self.units(kind) + extra
    }

    fn long(&self, kind: UnitKind) -> &[u64] {
        match kind {
            UnitKind::Doc => &self.long_docs,
            UnitKind::Group => &self.long_groups,
        }
    }

    /// The unit behind a virtual index.
    pub(crate) fn resolve(&self, kind: UnitKind, v: u64) -> u64 {
        let n = self.units(kind);
        if v < n {
            return v;
        }
        let long = self.long(kind);
        if long.is_empty() {
            return v % n.max(1);
        }
        long[((v - n) % long.len() as u64) as usize]
    }

    /// Shard, first document and document count of a unit.
    pub(crate) fn unit_docs(&self, kind: UnitKind, u: u64) -> (usize, u64, u64) {
        match kind {
            UnitKind::Doc => {
                let s = self
                    .doc_prefix
                    .partition_point(|&p| p <= u)
                    .saturating_sub(1);
                (s, u - self.doc_prefix[s], 1)
            }
            UnitKind::Group => {
                let gp = match &self.group_prefix {
                    Some(g) => g,
                    None => return (0, 0, 0),
                };
                let s = gp.partition_point(|&p| p <= u).saturating_sub(1);
                let local = (u - gp[s]) as usize;
                match self.shards[s].groups().and_then(|g| g.get(local)) {
                    Some(run) => (s, run.first_doc, run.docs),
                    None => (s, 0, 0),
                }
            }
        }
    }

    /// Group id (from the sidecar) of a unit's documents, if the shard is grouped.
    fn group_id(&self, kind: UnitKind, u: u64) -> Option<u64> {
        match kind {
            UnitKind::Group => {
                let gp = self.group_prefix.as_ref()?;
                let s = gp.partition_point(|&p| p <= u).saturating_sub(1);
                let local = (u - gp[s]) as usize;
                self.shards[s].groups()?.get(local).map(|r| r.id)
            }
            UnitKind::Doc => {
                let (s, doc, _) = self.unit_docs(kind, u);
                let runs = self.shards[s].groups()?;
                let i = runs
                    .partition_point(|r| r.first_doc <= doc)
                    .checked_sub(1)?;
                runs.get(i).map(|r| r.id)
            }
        }
    }

    /// Tokens of a unit.
    pub(crate) fn unit_len(&self, kind: UnitKind, u: u64) -> u64 {
        let (s, first, n) = self.unit_docs(kind, u);
        let shard = &self.shards[s];
        (first..first + n).map(|d| shard.doc_len(d)).sum()
    }

    pub(crate) fn doc_len(&self, shard: usize, doc: u64) -> u64 {
        self.shards[shard].doc_len(doc)
    }

    pub(crate) fn grouping_active(&self, step: u64) -> bool {
        self.settings.grouping.mode != GroupMode::Off && step >= self.settings.grouping.from_step
    }
}

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
}

impl Tail {
    /// The stream state that packs this window.
    fn as_state(&self) -> StreamState {
        StreamState {
            epoch: self.epoch,
            grouped: self.grouped,
            epoch_seed: self.epoch_seed,
            pos_chain: self.pos_chain.clone(),
            window_start: self.window_start,
            started: true,
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

/// Most blocks a batch-grouped domain passes over while looking for ones that fit.
pub const MAX_DEFERRED: usize = 16;

/// A domain's stream: state plus the window cache.
pub(crate) struct Stream {
    pub(crate) state: StreamState,
    cache: Option<(u64, Arc<Window>, Permutation)>,
    /// Packed tail windows, by (epoch, window start).
    tail_cache: Vec<((u32, u64), Arc<Window>)>,
}

/// Packing constants shared by all streams.
#[derive(Clone, Copy)]
pub(crate) struct Geometry {
    pub capacity: u32,
    pub packing: crate::config::plan::Packing,
}

impl Stream {
    pub(crate) fn new(state: StreamState) -> Stream {
        Stream {
            state,
            cache: None,
            tail_cache: Vec::new(),
        }
    }

    /// Checks a restored state against the window it points at, so a forged or stale
    /// blob is refused rather than indexing out of bounds later.
    pub(crate) fn check(&mut self, d: &DomainData, g: Geometry) -> Result<(), String> {
        if !self.state.started {
            if !self.state.tails.is_empty() {
                return Err("tails in a stream that has not started".into());
            }
            return Ok(());
        }
        let n = d.virtual_units(self.kind());
        if self.state.window_start >= n.max(1) {
            return Err(format!(
                "window start {} is past the epoch's {n} units",
                self.state.window_start
            ));
        }
        if self.state.grouped && d.units(UnitKind::Group) == 0 {
            return Err("grouped epoch in a domain without groups".into());
        }
        let (w, _) = self.window(d, g);
        if self.state.next_block as usize > w.blocks.len() {
            return Err(format!(
                "block {} of a window with {}",
                self.state.next_block,
                w.blocks.len()
            ));
        }
        if self.state.pending.len() > MAX_DEFERRED + w.blocks.len() {
            return Err("too many pending blocks".into());
        }
        check_pending(&self.state.pending, &w)?;
        for t in 0..self.state.tails.len() {
            let tail = &self.state.tails[t];
            let n = d.virtual_units(tail.kind());
            if tail.window_start >= n.max(1) {
                return Err(format!(
                    "tail window start {} is past the epoch's {n} units",
                    tail.window_start
                ));
            }
            if tail.grouped && d.units(UnitKind::Group) == 0 {
                return Err("grouped tail in a domain without groups".into());
            }
            if tail.pending.is_empty() {
                return Err("tail without pending blocks".into());
            }
            let tw = self.tail_window(d, g, t);
            check_pending(&self.state.tails[t].pending, &tw)?;
        }
        Ok(())
    }

    /// Packs (or fetches) the window of tail `t`.
    fn tail_window(&mut self, d: &DomainData, g: Geometry, t: usize) -> Arc<Window> {
        let tail = &self.state.tails[t];
        let key = (tail.epoch, tail.window_start);
        if let Some((_, w)) = self.tail_cache.iter().find(|(k, _)| *k == key) {
            return w.clone();
        }
        let w = Arc::new(pack_window(d, &tail.as_state(), tail.kind(), g));
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

    /// Blocks in the cached current window, if packed.
    pub(crate) fn cached_blocks(&self) -> Option<usize> {
        match &self.cache {
            Some((ws, w, _)) if *ws == self.state.window_start => Some(w.blocks.len()),
            _ => None,
        }
    }

    fn kind(&self) -> UnitKind {
        if self.state.grouped {
            UnitKind::Group
        } else {
            UnitKind::Doc
        }
    }

    fn window_end(&self, d: &DomainData) -> u64 {
        let n = d.virtual_units(self.kind());
        (self.state.window_start + d.window).min(n)
    }

    /// Packs (or fetches) the current window and its emission permutation.
    fn window(&mut self, d: &DomainData, g: Geometry) -> (Arc<Window>, Permutation) {
        if let Some((ws, w, p)) = &self.cache {
            if *ws == self.state.window_start {
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
        });
        let w = match reuse {
            Some(f) => f.window.clone(),
            None => Arc::new(pack_window(d, &self.state, self.kind(), g)),
        };
        let p = Permutation::new(
            w.blocks.len() as u64,
            derive_key(&[
                self.state.epoch_seed,
                d.key,
                self.state.epoch as u64,
                self.state.window_start,
                2,
            ]),
        );
        self.cache = Some((self.state.window_start, w.clone(), p.clone()));
        (w, p)
    }

    fn open_epoch(&mut self, d: &DomainData, step: u64, seed: u64, next_epoch: bool) {
        let s = &mut self.state;
        if next_epoch {
            s.epoch = s.epoch.saturating_add(1); // a forged cursor may be at the maximum
        }
        s.grouped = d.grouping_active(step);
        s.epoch_seed = seed;
        s.pos_chain.clear();
        s.window_start = 0;
        s.next_block = 0;
        s.block_chain.clear();
        s.pending.clear();
        s.started = true;
        self.cache = None;
    }

    /// Brings the stream to `step`: opens the first epoch, switches to grouped units when
    /// grouping starts, and applies reseeds that are due.
    fn prepare(
        &mut self,
        d: &DomainData,
        g: Geometry,
        step: u64,
        seed: u64,
        reseeds: &[(u64, u64)],
    ) {
        if !self.state.started {
            self.open_epoch(d, step, seed, false);
        } else if !self.state.grouped && d.grouping_active(step) {
            self.open_epoch(d, step, seed, true);
        }
        while (self.state.reseeds as usize) < reseeds.len() {
            let (rstep, rseed) = reseeds[self.state.reseeds as usize];
            if rstep > step {
                break;
            }
            let (w, _) = self.window(d, g);
            let end = self.window_end(d);
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

    /// Advances to the next window (or epoch) when the current one is used up.
    /// Returns false when the domain has no units at all.
    fn advance_window(&mut self, d: &DomainData, step: u64, seed: u64) -> bool {
        let end = self.window_end(d);
        let n = d.virtual_units(self.kind());
        if n == 0 {
            return false;
        }
        if end >= n {
            self.open_epoch(d, step, seed, true);
        } else {
            self.state.window_start = end;
            self.state.next_block = 0;
            self.state.block_chain.clear();
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
    /// keeps the mixture exact and the promise at window and epoch ends.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn take(
        &mut self,
        d: &DomainData,
        domain: u16,
        g: Geometry,
        n: u32,
        step: u64,
        seed: u64,
        reseeds: &[(u64, u64)],
        cap: u32,
        mut out: Option<&mut Vec<Row>>,
    ) {
        if n == 0 {
            return;
        }
        self.prepare(d, g, step, seed, reseeds);
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
        let mut empty_windows = 0u32;
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
                    empty_windows += 1;
                    if empty_windows > 1_000_000 {
                        return; // only empty documents: nothing to give
                    }
                }
                if !self.advance_window(d, step, seed) {
                    return;
                }
                (w, perm) = self.window(d, g);
                continue;
            }
            let b = chained(&perm, &self.state.block_chain, self.state.next_block as u64) as u32;
            self.state.next_block += 1;
            let rows = w.blocks[b as usize].rows;
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
    }

    /// Window, epoch and unit kind of pending source `t`: a tail, or (at
    /// `t == tails.len()`) the current window.
    fn source(&mut self, d: &DomainData, g: Geometry, t: usize) -> (Arc<Window>, u32, UnitKind) {
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
            self.state.split_groups += 1;
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
        out: &mut Option<&mut Vec<Row>>,
    ) {
        let block = w.blocks[b as usize];
        for r in from..from + count {
            let row = block.first_row + r;
            let tokens = w.rows.get(row as usize).map_or(0, |r| r.tokens);
            self.state.rows += 1;
            self.state.tokens += tokens as u64;
            if let Some(out) = out.as_deref_mut() {
                out.push(expand_row(
                    d,
                    kind,
                    domain,
                    epoch,
                    w.row_pieces(row),
                    tokens,
                ));
            }
        }
    }
}

/// Checks that restored pending blocks name blocks of `w` with rows still to take.
fn check_pending(pending: &[(u32, u32)], w: &Window) -> Result<(), String> {
    for &(b, done) in pending {
        match w.blocks.get(b as usize) {
            Some(blk) if done < blk.rows => {}
            _ => {
                return Err(format!(
                    "pending block {b} (+{done} rows) is not in the window"
                ))
            }
        }
    }
    Ok(())
}

/// Packs the window the state points at.
pub(crate) fn pack_window(d: &DomainData, s: &StreamState, kind: UnitKind, g: Geometry) -> Window {
    let n = d.virtual_units(kind);
    let perm = Permutation::new(
        n,
        derive_key(&[s.epoch_seed, d.key, s.epoch as u64, s.grouped as u64, 1]),
    );
    let end = (s.window_start + d.window).min(n);
    // Two passes: first every unit id (compute-bound), then every length. The length
    // loop's iterations are independent random reads, so the CPU keeps many cache misses
    // in flight instead of one per permutation step.
    let mut units: Vec<(u64, u64)> = (s.window_start..end)
        .map(|pos| (d.resolve(kind, chained(&perm, &s.pos_chain, pos)), 0))
        .collect();
    for (u, len) in units.iter_mut() {
        *len = d.unit_len(kind, *u);
    }
    pack::pack(&units, g.capacity, g.packing, kind == UnitKind::Group)
}

/// Turns a row's unit-level pieces into document segments with provenance.
fn expand_row(
    d: &DomainData,
    kind: UnitKind,
    domain: u16,
    epoch: u32,
    pieces: &[Piece],
    tokens: u32,
) -> Row {
    let mut segments = Vec::with_capacity(pieces.len());
    for p in pieces {
        let (shard, first, ndocs) = d.unit_docs(kind, p.unit);
        let group = d.group_id(kind, p.unit);
        if kind == UnitKind::Doc || ndocs <= 1 {
            let doc_len = d.doc_len(shard, first);
            segments.push(Segment {
                shard: shard as u32,
                doc: first,
                start: p.start,
                len: p.len,
                doc_len,
                group,
            });
            continue;
        }
        // Walk the group's documents to the piece's offset.
        let (a, b) = (p.start, p.start + p.len as u64);
        let mut off = 0u64;
        for doc in first..first + ndocs {
            let l = d.doc_len(shard, doc);
            let (s, e) = (a.max(off), b.min(off + l));
            if e > s {
                segments.push(Segment {
                    shard: shard as u32,
                    doc,
                    start: s - off,
                    len: (e - s) as u32,
                    doc_len: l,
                    group,
                });
            }
            off += l;
            if off >= b {
                break;
            }
        }
    }
    Row::new(domain, epoch, segments, tokens)
}

/// Packs a domain's first window (epoch 0, as step 0 sees it) and estimates the domain's
/// fill from it (real tokens per row over capacity), so token weights can become row
/// counts before anything is served. The window is kept for the stream's first use.
pub(crate) fn first_window(d: &DomainData, g: Geometry, seed: u64) -> FirstWindow {
    let state = StreamState {
        grouped: d.grouping_active(0),
        epoch_seed: seed,
        ..StreamState::default()
    };
    let kind = if state.grouped {
        UnitKind::Group
    } else {
        UnitKind::Doc
    };
    let w = pack_window(d, &state, kind, g);
    let fill = if w.rows.is_empty() {
        1.0
    } else {
        w.tokens() as f64 / (w.rows.len() as f64 * g.capacity as f64)
    };
    FirstWindow {
        seed,
        grouped: state.grouped,
        fill: if fill > 0.0 { fill } else { 1.0 },
        window: Arc::new(w),
    }
}

/// A domain's first packed window, shared by the fill estimate and the first batch.
pub(crate) struct FirstWindow {
    seed: u64,
    grouped: bool,
    pub(crate) fill: f64,
    window: Arc<Window>,
}

/// Epoch progress of a stream: completed epochs plus the fraction of the current one
/// (window start plus the share of the window's blocks already handed out).
pub(crate) fn epoch_progress(d: &DomainData, s: &StreamState, blocks: Option<usize>) -> f64 {
    if !s.started {
        return 0.0;
    }
    let kind = if s.grouped {
        UnitKind::Group
    } else {
        UnitKind::Doc
    };
    let n = d.virtual_units(kind).max(1);
    let end = (s.window_start + d.window).min(n);
    let within = match blocks {
        Some(b) if b > 0 => (s.next_block as f64 / b as f64).min(1.0),
        _ => 0.0,
    };
    s.epoch as f64 + (s.window_start as f64 + within * (end - s.window_start) as f64) / n as f64
}

/// Per-domain summary for reports.
pub(crate) fn describe(d: &DomainData) -> BTreeMap<&'static str, u64> {
    let mut m = BTreeMap::new();
    m.insert("documents", d.units(UnitKind::Doc));
    m.insert("groups", d.units(UnitKind::Group));
    m.insert("tokens", d.tokens);
    m.insert("long_documents", d.long_docs.len() as u64);
    m
}
