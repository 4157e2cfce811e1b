//! One domain as the plan sees it: units (documents, or whole groups) shuffled per epoch
//! and packed window by window.
//!
//! [`DomainData`] is what never changes during a run (the domain's shards, unit counts,
//! its long-unit list for upsampling, its fill); [`pack_window`] packs the window a
//! stream state points at. [`StreamState`] (in `stream`) is everything that does
//! change, kept explicit and small so that the cursor blob can carry it; the packed
//! windows are only a cache of what the state determines.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use crate::corpus::{GroupRun, Listed};

use super::pack::{self, Piece, Window};
use super::permute::{chained, derive_key, Permutation};
use super::stage::Upsampling;
use super::stream::StreamState;
use super::{PlanError, Row, Segment};
use crate::config::plan::{DomainSettings, GroupMode, Upsample};

/// Where a domain's document lengths and groups come from: a mapped shard in the daemon,
/// a plain vector in property tests. The plan reads nothing else.
pub trait DocSource: Send + Sync {
    /// Documents in the shard.
    fn documents(&self) -> u64;
    /// Tokens in the shard (the sum of all document lengths).
    fn tokens(&self) -> u64;
    /// Tokens of document `doc` (< `documents()`); the shard has been validated.
    fn doc_len(&self, doc: u64) -> u64;
    /// A hint that [`DocSource::doc_len`] of `doc` comes soon: a source whose lengths
    /// sit in memory that misses the CPU's caches pulls that entry in, so that a
    /// window's lookups overlap instead of waiting one by one. Changes nothing but time.
    fn prefetch_len(&self, _doc: u64) {}
    /// Group runs in document order, when the shard has a sidecar.
    fn groups(&self) -> Option<&[GroupRun]>;
    /// Documents longer than `min_tokens`, ascending, when the source has them listed
    /// already (the identity cache keeps the list per shard); `None` makes the planner
    /// read every length, which is what `upsample_long` cost at every start before.
    fn long_docs(&self, _min_tokens: u64) -> Option<&[u64]> {
        None
    }
    /// Groups (indexes into [`DocSource::groups`]) longer than `min_tokens`, ascending,
    /// when listed already; `None` makes the planner sum every group's lengths.
    fn long_groups(&self, _min_tokens: u64) -> Option<&[u64]> {
        None
    }
}

/// A shard with its long units listed (see [`Listed`]): the planner takes the lists
/// whose threshold it asks for (the domain's, a stage's), and reads everything else from
/// the shard.
impl<S: DocSource + ?Sized> DocSource for Listed<Arc<S>> {
    fn documents(&self) -> u64 {
        self.source.documents()
    }
    fn tokens(&self) -> u64 {
        self.source.tokens()
    }
    fn doc_len(&self, doc: u64) -> u64 {
        self.source.doc_len(doc)
    }
    fn prefetch_len(&self, doc: u64) {
        self.source.prefetch_len(doc)
    }
    fn groups(&self) -> Option<&[GroupRun]> {
        self.source.groups()
    }
    fn long_docs(&self, min_tokens: u64) -> Option<&[u64]> {
        let long = self.long.iter().find(|l| l.min_tokens == min_tokens)?;
        Some(long.docs.as_slice())
    }
    fn long_groups(&self, min_tokens: u64) -> Option<&[u64]> {
        let long = self.long.iter().find(|l| l.min_tokens == min_tokens)?;
        long.groups.as_deref()
    }
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
    /// Long units repeated by upsampling, one list per threshold (the domain's own
    /// `upsample_long`, the stages' overrides).
    long: Vec<LongList>,
    /// The stages' upsampling settings for this domain (other than its own): what a
    /// restored epoch may name.
    pub(crate) overrides: Vec<Upsample>,
    pub(crate) tokens: u64,
    /// The first window, once packed (see [`first_window`]).
    pub(crate) first: Option<FirstWindow>,
}

/// The long units (by kind: documents, groups) at one threshold, ascending.
struct LongList {
    min_tokens: u64,
    docs: Vec<u64>,
    groups: Vec<u64>,
}

/// Which kind of unit an epoch shuffles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum UnitKind {
    Doc,
    Group,
}

impl DomainData {
    /// Indexes a domain: O(shards), plus O(long units) per threshold when upsampling
    /// (its own, or a stage's `overrides`) asks for the long-unit lists and the shards
    /// have them listed ([`DocSource::long_docs`]); a shard that has not is one pass over
    /// its lengths per threshold.
    pub(crate) fn new(
        input: &DomainInput,
        overrides: &[Upsample],
    ) -> Result<DomainData, PlanError> {
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
                        return Err(PlanError::NoSidecar {
                            domain: input.name.clone(),
                            shard: name.clone(),
                            mode: input.settings.grouping.mode,
                        });
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
            long: Vec::new(),
            overrides: Vec::new(),
            tokens,
            first: None,
        };
        let own = input.settings.upsample_long.into_iter();
        for u in own.chain(overrides.iter().copied()) {
            if !data.overrides.contains(&u) && Some(u) != input.settings.upsample_long {
                data.overrides.push(u);
            }
            if data.long.iter().any(|l| l.min_tokens == u.min_tokens) {
                continue;
            }
            let t = u.min_tokens;
            let docs = data.list_long(UnitKind::Doc, t);
            let grouped = data.group_prefix.is_some();
            let groups = if grouped && input.settings.grouping.mode != GroupMode::Off {
                data.list_long(UnitKind::Group, t)
            } else {
                Vec::new()
            };
            data.long.push(LongList {
                min_tokens: t,
                docs,
                groups,
            });
        }
        Ok(data)
    }

    /// The domain's units of a kind longer than `t` tokens, ascending: each shard's own
    /// list where it has one that fits (ascending, in range), else a pass over its units.
    fn list_long(&self, kind: UnitKind, t: u64) -> Vec<u64> {
        let mut out = Vec::new();
        for (s, shard) in self.shards.iter().enumerate() {
            let (prefix, listed) = match kind {
                UnitKind::Doc => (&self.doc_prefix, shard.long_docs(t)),
                UnitKind::Group => match &self.group_prefix {
                    Some(gp) => (gp, shard.long_groups(t)),
                    None => return out,
                },
            };
            let (first, end) = (prefix[s], prefix[s + 1]);
            let fits = |l: &[u64]| {
                l.windows(2).all(|w| w[0] < w[1]) && l.last().is_none_or(|&u| u < end - first)
            };
            match listed.filter(|l| fits(l)) {
                Some(l) => out.extend(l.iter().map(|&u| first + u)),
                None => out.extend((first..end).filter(|&u| self.unit_len(kind, u) > t)),
            }
        }
        out
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

    /// The setting an epoch with upsampling `u` uses (`None`: no upsampling).
    pub(crate) fn setting(&self, u: Upsampling) -> Option<Upsample> {
        match u {
            Upsampling::Domain => self.settings.upsample_long,
            Upsampling::Off => None,
            Upsampling::Long(u) => Some(u),
        }
    }

    /// Whether an epoch may name upsampling `u`: the domain's own, off, or one of its
    /// stages' settings (a restored blob's is checked).
    pub(crate) fn knows(&self, u: Upsampling) -> bool {
        match u {
            Upsampling::Long(u) => self.overrides.contains(&u),
            _ => true,
        }
    }

    /// Virtual units of an epoch with upsampling `u`: every unit once, long ones
    /// `factor` times.
    pub(crate) fn virtual_units(&self, kind: UnitKind, u: Upsampling) -> u64 {
        let extra = match self.setting(u) {
            Some(s) => (s.factor as u64 - 1) * self.long(kind, u).len() as u64,
            None => 0,
        };
        self.units(kind) + extra
    }

    /// The long units of a kind that upsampling `u` repeats.
    fn long(&self, kind: UnitKind, u: Upsampling) -> &[u64] {
        let Some(s) = self.setting(u) else {
            return &[];
        };
        match self.long.iter().find(|l| l.min_tokens == s.min_tokens) {
            Some(l) if kind == UnitKind::Doc => &l.docs,
            Some(l) => &l.groups,
            None => &[],
        }
    }

    /// The unit behind a virtual index of an epoch with upsampling `u`.
    pub(crate) fn resolve(&self, kind: UnitKind, u: Upsampling, v: u64) -> u64 {
        let n = self.units(kind);
        if v < n {
            return v;
        }
        let long = self.long(kind, u);
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

    /// Shard, first document, document count and group id (from the sidecar, if the
    /// shard is grouped) of a unit: [`DomainData::unit_docs`] and the group with one
    /// search of the prefix arrays, as expanding a row's pieces needs both. Without
    /// `groups` a document unit's group is not looked up (`None`).
    fn unit_place(&self, kind: UnitKind, u: u64, groups: bool) -> (usize, u64, u64, Option<u64>) {
        match kind {
            UnitKind::Group => {
                let gp = match &self.group_prefix {
                    Some(g) => g,
                    None => return (0, 0, 0, None),
                };
                let s = gp.partition_point(|&p| p <= u).saturating_sub(1);
                let local = (u - gp[s]) as usize;
                match self.shards[s].groups().and_then(|g| g.get(local)) {
                    Some(run) => (s, run.first_doc, run.docs, Some(run.id)),
                    None => (s, 0, 0, None),
                }
            }
            UnitKind::Doc => {
                let (s, doc, n) = self.unit_docs(kind, u);
                let docs = self.doc_prefix[s + 1] - self.doc_prefix[s];
                let group = self.shards[s].groups().filter(|_| groups).and_then(|runs| {
                    let i = run_of(runs, doc, docs)?;
                    runs.get(i).map(|r| r.id)
                });
                (s, doc, n, group)
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

    /// Units per window at geometry `g`: the domain's own `window`, else the stage's.
    pub(crate) fn window_len(&self, g: Geometry) -> u64 {
        self.settings.window.unwrap_or(g.window)
    }

    /// Whether this domain chains its long groups at geometry `g` (sequence grouping).
    pub(crate) fn chains(&self, g: Geometry) -> bool {
        g.chain && self.settings.grouping.mode == GroupMode::Sequence
    }

    pub(crate) fn grouping_active(&self, step: u64) -> bool {
        self.settings.grouping.mode != GroupMode::Off && step >= self.settings.grouping.from_step
    }
}

/// Index of the last of `runs` (ascending by first document, covering `docs`
/// documents) that starts at or before `doc`: `partition_point(first_doc <= doc) - 1`,
/// found by a guess from the mean run length and a gallop from there. A lookup then
/// touches a few neighbouring runs instead of a binary search's path through the whole
/// list, most of it cache misses (the planner looks a group up for every piece of an
/// ungrouped domain that has a sidecar).
fn run_of(runs: &[GroupRun], doc: u64, docs: u64) -> Option<usize> {
    let n = runs.len();
    if n == 0 {
        return None;
    }
    let le = |i: usize| runs[i].first_doc <= doc;
    let guess = (doc as u128 * n as u128 / docs.max(1) as u128).min(n as u128 - 1) as usize;
    // The partition point lies in `[lo, hi]`: runs before `lo` start at or before `doc`,
    // runs from `hi` on after it.
    let (mut lo, mut hi);
    let mut step = 1usize;
    if le(guess) {
        lo = guess + 1;
        loop {
            let j = lo.saturating_add(step - 1);
            if j >= n {
                hi = n;
                break;
            }
            if le(j) {
                lo = j + 1;
                step = step.saturating_mul(2);
            } else {
                hi = j;
                break;
            }
        }
    } else {
        hi = guess;
        loop {
            if hi < step {
                lo = 0;
                break;
            }
            let j = hi - step;
            if le(j) {
                lo = j + 1;
                break;
            }
            hi = j;
            step = step.saturating_mul(2);
        }
    }
    (lo + runs[lo..hi].partition_point(|r| r.first_doc <= doc)).checked_sub(1)
}

/// Packing constants of one stage, shared by all streams.
#[derive(Clone, Copy)]
pub(crate) struct Geometry {
    pub capacity: u32,
    pub packing: crate::config::plan::Packing,
    /// The stage's `best_fit_window` (a domain's own `window` overrides it).
    pub window: u64,
    /// The stage's `chain_groups`.
    pub chain: bool,
}

/// Packs the window the state points at, at geometry `g` (whose window size cuts it).
pub(crate) fn pack_window(d: &DomainData, s: &StreamState, kind: UnitKind, g: Geometry) -> Window {
    pack_units(d, &window_units(d, s, kind, d.window_len(g)), kind, g)
}

/// Packs `units` of domain `d` at geometry `g`: grouped units kept together, chained
/// when the stage asks and the domain's grouping is `sequence`.
pub(crate) fn pack_units<S: pack::Span>(
    d: &DomainData,
    units: &[S],
    kind: UnitKind,
    g: Geometry,
) -> Window {
    let keep_together = kind == UnitKind::Group;
    pack::pack_with(units, g.capacity, g.packing, keep_together, d.chains(g))
}

/// `(unit, length)` of the `len` positions from the state's window start, in window
/// order (fewer at the epoch's end).
pub(crate) fn window_units(
    d: &DomainData,
    s: &StreamState,
    kind: UnitKind,
    len: u64,
) -> Vec<(u64, u64)> {
    let n = d.virtual_units(kind, s.upsample);
    let perm = Permutation::new(
        n,
        derive_key(&[s.epoch_seed, d.key, s.epoch as u64, s.grouped as u64, 1]),
    );
    let end = (s.window_start + len).min(n);
    // Two passes: first every unit id (compute-bound), then every length. The length
    // loop's iterations are independent random reads, so the CPU keeps many cache misses
    // in flight instead of one per permutation step.
    let mut units: Vec<(u64, u64)> = if s.pos_chain.is_empty() {
        let mut ids = Vec::new();
        perm.apply_range(s.window_start, end, &mut ids);
        ids.into_iter()
            .map(|v| (d.resolve(kind, s.upsample, v), 0))
            .collect()
    } else {
        (s.window_start..end)
            .map(|pos| {
                (
                    d.resolve(kind, s.upsample, chained(&perm, &s.pos_chain, pos)),
                    0,
                )
            })
            .collect()
    };
    if kind == UnitKind::Doc {
        // A document's length is one index entry at a random place of the shards: with
        // the entry [`LEN_AHEAD`] units on prefetched, that many misses are in flight.
        let places: Vec<(usize, u64)> = (units.iter())
            .map(|&(u, _)| {
                let (s, doc, _) = d.unit_docs(kind, u);
                (s, doc)
            })
            .collect();
        for (i, (_, len)) in units.iter_mut().enumerate() {
            if let Some(&(s, doc)) = places.get(i + LEN_AHEAD) {
                d.shards[s].prefetch_len(doc);
            }
            let (s, doc) = places[i];
            *len = d.doc_len(s, doc);
        }
    } else {
        for (u, len) in units.iter_mut() {
            *len = d.unit_len(kind, *u);
        }
    }
    units
}

/// How many document units ahead [`window_units`] prefetches a length.
const LEN_AHEAD: usize = 16;

/// Where expanding a group's rows left off: per epoch and group unit (a batch-grouped
/// group may span batches in two epochs at once), a document of it and that document's
/// token offset within the group. A group's rows are expanded in order, so
/// the next row's walk starts there instead of at the group's first document: a group
/// of n documents costs O(n) per epoch instead of O(n) per row (a domain held in one
/// group of 20,000 ten-token documents took 5 s for 347 steps of 64 rows). A cache of
/// facts about the domain, never of the stream's position: the rows do not depend on it.
#[derive(Default)]
pub(crate) struct GroupWalks {
    at: HashMap<(u32, u64), (u64, u64)>,
}

/// Groups whose walk position [`GroupWalks`] keeps; past this it starts over (as many
/// as spanning groups may be, [`crate::config::plan::MAX_GROUP_SPANS`], and then some).
const MAX_WALKS: usize = 8192;

/// Turns a row's unit-level pieces into document segments with provenance (a document
/// unit's group only with `groups`, [`super::stream::RowsOut`]).
#[allow(clippy::too_many_arguments)]
pub(crate) fn expand_row(
    d: &DomainData,
    kind: UnitKind,
    domain: u16,
    epoch: u32,
    pieces: &[Piece],
    tokens: u32,
    walks: &mut GroupWalks,
    groups: bool,
) -> Row {
    let mut segments = Vec::with_capacity(pieces.len());
    for p in pieces {
        let (shard, first, ndocs, group) = d.unit_place(kind, p.unit, groups);
        if kind == UnitKind::Doc || ndocs <= 1 {
            // A whole one-document unit's length is the piece's: no second read.
            let doc_len = if p.whole && ndocs == 1 {
                p.len as u64
            } else {
                d.doc_len(shard, first)
            };
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
        // Walk the group's documents to the piece's offset, from where the last walk
        // of this group stopped when that is not past it.
        let (a, b) = (p.start, p.start + p.len as u64);
        let (mut doc, mut off) = match walks.at.get(&(epoch, p.unit)) {
            Some(&(doc, at)) if at <= a && (first..first + ndocs).contains(&doc) => (doc, at),
            _ => (first, 0),
        };
        // Whether the group goes on past this piece: only then may a later row need
        // the walk (a group a row holds whole, the usual case, keeps no entry).
        let mut more = false;
        while doc < first + ndocs {
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
            if off + l >= b {
                more = b < off + l || doc + 1 < first + ndocs;
                break;
            }
            off += l;
            doc += 1;
        }
        let key = (epoch, p.unit);
        if !more {
            walks.at.remove(&key);
            continue;
        }
        if walks.at.len() >= MAX_WALKS && !walks.at.contains_key(&key) {
            walks.at.clear();
        }
        // The document the piece ends in, and its offset: where the group's next row
        // begins (or a document before it).
        walks.at.insert(key, (doc, off));
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
    pub(crate) seed: u64,
    pub(crate) grouped: bool,
    pub(crate) fill: f64,
    pub(crate) window: Arc<Window>,
}

/// Per-domain summary for reports.
pub(crate) fn describe(d: &DomainData) -> BTreeMap<&'static str, u64> {
    let mut m = BTreeMap::new();
    m.insert("documents", d.units(UnitKind::Doc));
    m.insert("groups", d.units(UnitKind::Group));
    m.insert("tokens", d.tokens);
    m.insert(
        "long_documents",
        d.long(UnitKind::Doc, Upsampling::Domain).len() as u64,
    );
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The galloping search finds what a binary search of the whole list finds, for
    /// runs of even and of very uneven lengths, and for documents past the last run.
    #[test]
    fn run_of_matches_binary_search() {
        let mut x = 7u64;
        for case in 0..60u64 {
            let mut runs = Vec::new();
            let mut first = 0u64;
            for id in 0..(case * 7 % 90) {
                x = super::super::permute::splitmix64(x);
                let docs = match case % 3 {
                    0 => 1 + x % 4,
                    1 => 1 + x % 64,
                    _ => 1 + (x % 1000).pow(2) / 1000,
                };
                runs.push(GroupRun {
                    id,
                    first_doc: first,
                    docs,
                });
                first += docs;
            }
            for doc in 0..first + 3 {
                let want = runs.partition_point(|r| r.first_doc <= doc).checked_sub(1);
                assert_eq!(run_of(&runs, doc, first), want, "case {case} doc {doc}");
            }
        }
    }
}
