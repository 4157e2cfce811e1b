//! Stages: the row shape (`seq_len`, rows per global batch, packing window) changing at
//! a plan step (`[[plan.stage]]`, a long-context stage), and what a domain's stream does
//! at the switch.
//!
//! The switch never restarts an epoch. A stream switches lazily, at its first take at or
//! after the stage's step (a domain without rows in between switches when it next has
//! some, possibly across several stages at once). At the switch, whatever the current
//! window had not emitted is *carried*: units none of whose rows went out, and the
//! token ranges of partly emitted ones (the rows of a long document not yet handed
//! out, the rest of a group in reading order), in window order, are packed again at the
//! new shape and emitted before the epoch continues with the next window (cut at the new
//! stage's window size). Only batch grouping's *tails* (spanning groups of earlier
//! windows) are not carried: their remaining rows are dropped and counted in the
//! stream's `dropped` tokens, the one truncation a switch makes.
//!
//! So within an epoch no token repeats across the switch and none is lost besides
//! `dropped`, and the carried state is small: per switch the cursor records which blocks
//! of the window had been emitted ([`CarryLevel`]), and a resume repacks the window at
//! each shape it went through.

use rayon::prelude::*;
use serde::Serialize;

use super::domain::{
    first_window, pack_units, pack_window, window_units, DomainData, Geometry, UnitKind,
};
use super::journal::StageChange;
use super::mix::StageMix;
use super::pack::Window;
use super::permute::{chained, derive_key, Permutation, Reshuffle};
use super::stream::{Stream, StreamError, StreamState, MAX_DEFERRED};
use super::Plan;
use crate::config::plan::{DomainSettings, Packing, PlanConfig, Upsample};

/// The row shape of one stage, from its first plan step on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Shape {
    /// First plan step of the stage (0 for the first).
    pub step: u64,
    /// Tokens a row trains on (a row holds `seq_len + 1`).
    pub seq_len: u32,
    /// Rows per global batch.
    pub rows: u32,
    /// Units per packing window (domains with their own `window` keep it).
    pub window: u64,
    /// Whether `sequence`-grouped domains chain their long groups
    /// ([`crate::plan::pack::pack_with`]).
    pub chain_groups: bool,
}

/// The stages of a config, the first being `[plan]`'s own shape from step 0.
pub(crate) fn shapes(cfg: &PlanConfig) -> Vec<Shape> {
    let mut out = vec![Shape {
        step: 0,
        seq_len: cfg.seq_len,
        rows: cfg.global_batch_rows,
        window: cfg.best_fit_window,
        chain_groups: false,
    }];
    for st in &cfg.stage {
        let window = st
            .best_fit_window
            .unwrap_or_else(|| out.last().map_or(cfg.best_fit_window, |s| s.window));
        out.push(Shape {
            step: st.step,
            seq_len: st.seq_len,
            rows: st.global_batch_rows,
            window,
            chain_groups: st.chain_groups,
        });
    }
    out
}

/// Which long-document upsampling an epoch uses: what a stream records per epoch (and
/// the cursor per stream and tail), so a resume rebuilds the epoch's units exactly. An
/// epoch takes the setting of the stage in force when it begins; the one in progress at
/// a switch keeps its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Upsampling {
    /// The domain's own `upsample_long` (or none): every epoch before a stage overrides
    /// it, and what blobs of layouts before 9 mean.
    #[default]
    Domain,
    /// A stage's `"off"`, over a domain that upsamples.
    Off,
    /// A stage's `{ min_tokens, factor }`, other than the domain's own.
    Long(Upsample),
}

/// Per stage, per domain: the upsampling an epoch beginning in that stage uses. A stage
/// that does not name a domain keeps the previous stage's; a setting equal to the
/// domain's own (or off where it has none) is [`Upsampling::Domain`], so a plan whose
/// stages change nothing writes the blobs it always wrote.
pub(crate) fn upsampling(
    cfg: &PlanConfig,
    domains: &[(&str, DomainSettings)],
) -> Vec<Vec<Upsampling>> {
    let mut now = vec![Upsampling::Domain; domains.len()];
    let mut out = vec![now.clone()];
    for st in &cfg.stage {
        for (d, (name, settings)) in domains.iter().enumerate() {
            if let Some(u) = st.upsample_long.get(*name) {
                now[d] = match u.setting() {
                    u if u == settings.upsample_long => Upsampling::Domain,
                    None => Upsampling::Off,
                    Some(u) => Upsampling::Long(u),
                };
            }
        }
        out.push(now.clone());
    }
    out
}

/// Lays a live stage change (the journal's) over `shapes` and their `upsampling`: every
/// stage at or after `at` gives way to it, as a weights change cuts the schedule's later
/// points. A live stage keeps the upsampling in force before it.
pub(crate) fn layer(
    shapes: &mut Vec<Shape>,
    upsampling: &mut Vec<Vec<Upsampling>>,
    at: u64,
    st: StageChange,
) {
    let kept = shapes.iter().filter(|s| s.step < at || s.step == 0).count();
    upsampling.truncate(kept);
    if let Some(last) = upsampling.last().cloned() {
        upsampling.push(last);
    }
    shapes.retain(|s| s.step < at || s.step == 0);
    shapes.push(Shape {
        step: at,
        seq_len: st.seq_len,
        rows: st.rows,
        window: st.window,
        chain_groups: st.chain_groups,
    });
}

/// Each stage's packing constants.
pub(crate) fn geometries(shapes: &[Shape], packing: Packing) -> Vec<Geometry> {
    shapes
        .iter()
        .map(|s| Geometry {
            capacity: s.seq_len + 1,
            packing,
            window: s.window,
            chain: s.chain_groups,
        })
        .collect()
}

/// The mixer's view of the later stages: each one's fill per domain, from the domain's
/// first window packed at its shape (`known` fills, by geometry, are reused).
pub(crate) fn stage_mixes(
    domains: &[DomainData],
    shapes: &[Shape],
    geometries: &[Geometry],
    seed: u64,
    known: &[(Geometry, &[f64])],
) -> Vec<StageMix> {
    shapes
        .iter()
        .zip(geometries)
        .skip(1)
        .map(|(s, &g)| StageMix {
            step: s.step,
            rows: s.rows,
            fill: match known.iter().find(|k| same(k.0, g)) {
                Some(k) => k.1.to_vec(),
                None => domains
                    .par_iter()
                    .map(|d| first_window(d, g, seed).fill)
                    .collect(),
            },
        })
        .collect()
}

/// Whether two geometries pack alike (`Geometry` is shared and has no `PartialEq`).
fn same(a: Geometry, b: Geometry) -> bool {
    (a.capacity, a.packing, a.window, a.chain) == (b.capacity, b.packing, b.window, b.chain)
}

/// How far a window had been emitted when a stage switch came: which of its blocks went
/// out (the first `next_block` of its emission order, less the pending ones' remaining
/// rows). With the window's stage this names the units that were carried.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CarryLevel {
    /// The stage whose shape the window was packed at.
    pub stage: u32,
    /// Blocks drawn from its emission order.
    pub next_block: u32,
    /// Reseeds of its emission order.
    pub block_chain: Vec<Reshuffle>,
    /// Its blocks waiting (0 rows taken) or spanning (some taken) at the switch.
    pub pending: Vec<(u32, u32)>,
}

impl Plan {
    /// The stages, first to last (one when the config has no `[[plan.stage]]`).
    pub fn stages(&self) -> &[Shape] {
        &self.shapes
    }

    /// The stages this plan would have under `journal` (its stage changes layered over
    /// the config's), without packing a window: what a caller checks against its rings
    /// before [`Plan::with_history`] packs one per domain for each new shape.
    pub fn stages_with(&self, journal: &[super::Change]) -> Vec<Shape> {
        let mut shapes = shapes(&self.cfg);
        let mut upsampling = vec![Vec::new(); shapes.len()];
        for change in journal {
            if let Some(st) = change.stage {
                layer(&mut shapes, &mut upsampling, change.at, st);
            }
        }
        shapes
    }

    /// Why `dp_size` ranks cannot split this plan's steps, if they cannot: it does not
    /// divide some stage's rows, so the daemon refuses it (`dp_size`) and a listing of a
    /// rank's rows (`explain`) would show rows no rank is served, or none.
    pub fn dp_size_problem(&self, dp_size: u32) -> Option<String> {
        let s = self
            .shapes
            .iter()
            .find(|s| dp_size == 0 || s.rows % dp_size != 0)?;
        Some(match s.step {
            0 => format!("{dp_size} does not divide global_batch_rows {}", s.rows),
            step => format!(
                "{dp_size} does not divide global_batch_rows {} of the stage at plan step \
                 {step}",
                s.rows
            ),
        })
    }

    /// The stage plan step `plan_step` is in.
    pub fn stage_at(&self, plan_step: u64) -> u32 {
        (self.shapes.partition_point(|s| s.step <= plan_step) as u32).saturating_sub(1)
    }

    /// `(seq_len, rows per global batch)` at plan step `plan_step`: what a ring serving
    /// that step must hold.
    pub fn shape_at(&self, plan_step: u64) -> (u32, u32) {
        let s = self.shape(self.stage_at(plan_step));
        (s.seq_len, s.rows)
    }

    /// The largest `seq_len` and the most rows over all stages, so a ring can be sized
    /// once for the whole run.
    pub fn largest_shape(&self) -> (u32, u32) {
        let seq = self.shapes.iter().map(|s| s.seq_len).max().unwrap_or(0);
        let rows = self.shapes.iter().map(|s| s.rows).max().unwrap_or(0);
        (seq, rows)
    }

    /// Stage `i`'s shape (the last one for an index past the end).
    pub(super) fn shape(&self, i: u32) -> Shape {
        let last = self.shapes.len().saturating_sub(1);
        self.shapes[(i as usize).min(last)]
    }

    /// History words for the stages that begin before `end`, none without stages (so
    /// the digest of a plan without stages is what it always was). A stage's
    /// upsampling adds words only where it changes a domain's (of `over`, all for
    /// `None`), keyed by the domain's name, so plans without overrides keep their
    /// digests and a domain added to the config does not move them.
    pub(super) fn stage_words(&self, end: u64, over: Option<&[usize]>) -> Vec<u64> {
        let mut words = Vec::new();
        for (i, s) in self.shapes.iter().enumerate().skip(1) {
            if s.step >= end {
                continue;
            }
            words.extend([u64::MAX, s.step, s.seq_len as u64, s.rows as u64, s.window]);
            words.push(s.chain_groups as u64);
            let (now, before) = (&self.upsampling[i], &self.upsampling[i - 1]);
            let all: Vec<usize> = (0..now.len()).collect();
            for &d in over.unwrap_or(&all) {
                if now.get(d) == before.get(d) {
                    continue;
                }
                let key = self.domains.get(d).map_or(0, |d| d.key);
                words.extend(match now.get(d).copied().unwrap_or_default() {
                    Upsampling::Domain => [u64::MAX - 1, key, 0, 0, 0],
                    Upsampling::Off => [u64::MAX - 1, key, 1, 0, 0],
                    Upsampling::Long(u) => [u64::MAX - 1, key, 2, u.min_tokens, u.factor as u64],
                });
            }
        }
        words
    }

    /// The upsampling an epoch of domain `d` beginning in stage `stage` uses.
    pub(super) fn upsampling_at(&self, stage: u32, d: usize) -> Upsampling {
        let last = self.upsampling.len().saturating_sub(1);
        let row = self.upsampling.get((stage as usize).min(last));
        row.and_then(|r| r.get(d)).copied().unwrap_or_default()
    }

    /// Per domain, the stages whose upsampling differs from the stage before: `(stage,
    /// its first plan step, the setting, None for off)`. An epoch beginning at or after
    /// that step uses it (`millrace plan` reports these).
    pub fn upsampling_changes(&self, d: usize) -> Vec<(u32, u64, Option<Upsample>)> {
        let mut out = Vec::new();
        for (i, s) in self.shapes.iter().enumerate().skip(1) {
            let (now, before) = (
                self.upsampling_at(i as u32, d),
                self.upsampling_at(i as u32 - 1, d),
            );
            if now != before {
                out.push((i as u32, s.step, self.domains[d].setting(now)));
            }
        }
        out
    }
}

/// The geometry of stage `i` (the last one for an index past the end).
pub(crate) fn geometry(geo: &[Geometry], i: u32) -> Geometry {
    geo[(i as usize).min(geo.len().saturating_sub(1))]
}

/// The stage whose window size cut the current window: the first carry level's, or the
/// stream's own when nothing was carried.
pub(crate) fn origin(s: &StreamState) -> u32 {
    s.carry.first().map_or(s.stage, |c| c.stage)
}

/// Key of the emission order of a window packed at carry depth `depth` (0: the window as
/// first packed, keyed as it always was) and stage `stage`.
pub(crate) fn emission_key(d: &DomainData, s: &StreamState, depth: usize, stage: u32) -> u64 {
    let mut words = vec![s.epoch_seed, d.key, s.epoch as u64, s.window_start, 2];
    if depth > 0 {
        words.extend([depth as u64, stage as u64]);
    }
    derive_key(&words)
}

/// Packs the window state `s` points at, at its stage's shape: the plain window, or
/// (after a switch) the units the switches carried.
pub(crate) fn pack_current(
    d: &DomainData,
    s: &StreamState,
    kind: UnitKind,
    geo: &[Geometry],
) -> Window {
    let g = geometry(geo, s.stage);
    if s.carry.is_empty() {
        return pack_window(d, s, kind, g);
    }
    pack_units(d, &carried(d, s, kind, geo).unwrap_or_default(), kind, g)
}

/// What the current window still holds after its switches, in window order: `(unit,
/// first token, tokens)`, a whole unit when none of it was emitted before a switch,
/// else each range of it no emitted row held. Errors name a carry level that does not
/// fit its window (a forged or stale cursor).
pub(crate) fn carried(
    d: &DomainData,
    s: &StreamState,
    kind: UnitKind,
    geo: &[Geometry],
) -> Result<Vec<(u64, u64, u64)>, StreamError> {
    let len = d.window_len(geometry(geo, origin(s)));
    let mut units: Vec<(u64, u64, u64)> = window_units(d, s, kind, len)
        .into_iter()
        .map(|(u, l)| (u, 0, l))
        .collect();
    for (depth, level) in s.carry.iter().enumerate() {
        let g = geometry(geo, level.stage);
        // Labelled by position: packing depends on lengths and order only, and a unit
        // upsampled twice into one window stays two units.
        let labelled: Vec<(u64, u64, u64)> = units
            .iter()
            .enumerate()
            .map(|(i, &(_, base, l))| (i as u64, base, l))
            .collect();
        let w = pack_units(d, &labelled, kind, g);
        let mut emitted = emitted_ranges(&w, level, emission_key(d, s, depth, level.stage))?;
        let mut kept = Vec::with_capacity(units.len());
        for (i, &(unit, base, l)) in units.iter().enumerate() {
            let ranges = emitted.get_mut(i).map(std::mem::take).unwrap_or_default();
            let mut at = base;
            for (a, b) in merged(ranges) {
                if a > at {
                    kept.push((unit, at, a - at));
                }
                at = at.max(b);
            }
            if base + l > at {
                kept.push((unit, at, base + l - at));
            }
        }
        units = kept;
    }
    Ok(units)
}

/// Ranges sorted and overlaps merged (concat rows share a boundary token).
fn merged(mut r: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    r.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(r.len());
    for (a, b) in r {
        match out.last_mut() {
            Some(last) if a <= last.1 => last.1 = last.1.max(b),
            _ => out.push((a, b)),
        }
    }
    out
}

/// Per position of window `w` packed at `level`'s stage: the token ranges of it that
/// rows emitted before the switch held.
fn emitted_ranges(
    w: &Window,
    level: &CarryLevel,
    key: u64,
) -> Result<Vec<Vec<(u64, u64)>>, StreamError> {
    let blocks = w.blocks.len();
    if level.next_block as usize > blocks {
        return Err(StreamError::BlockPastWindow {
            block: level.next_block,
            blocks,
        });
    }
    if level.pending.len() > MAX_DEFERRED + blocks {
        return Err(StreamError::TooManyPending {
            pending: level.pending.len(),
        });
    }
    super::stream::check_pending(&level.pending, w)?;
    let units = w.pieces.iter().map(|p| p.unit + 1).max().unwrap_or(0) as usize;
    let mut out: Vec<Vec<(u64, u64)>> = vec![Vec::new(); units];
    let perm = Permutation::new(blocks as u64, key);
    for i in 0..level.next_block as u64 {
        let b = chained(&perm, &level.block_chain, i) as u32;
        let block = w.blocks[b as usize];
        let rows = match level.pending.iter().find(|p| p.0 == b) {
            Some(&(_, done)) => done,
            None => block.rows,
        };
        for r in block.first_row..block.first_row + rows {
            for p in w.row_pieces(r) {
                out[p.unit as usize].push((p.start, p.start + p.len as u64));
            }
        }
    }
    Ok(out)
}

/// Checks a restored stream's stage and carry levels: stages in order and not past the
/// stage of the step it resumes at, and every level fitting its window.
pub(crate) fn check(
    d: &DomainData,
    s: &StreamState,
    kind: UnitKind,
    geo: &[Geometry],
    stage_now: u32,
) -> Result<(), StreamError> {
    let mut prev: Option<u32> = None;
    for level in s.carry.iter().map(|c| c.stage).chain([s.stage]) {
        if level > stage_now || prev.is_some_and(|p| p >= level) {
            return Err(StreamError::Stage {
                stage: level,
                stages: geo.len(),
            });
        }
        prev = Some(level);
    }
    if s.carry.is_empty() {
        // No level to fit: `carried` would only list the window's units, one length
        // sum per unit (95% of a live change's time with 64 domains).
        return Ok(());
    }
    carried(d, s, kind, geo).map(|_| ())
}

impl Stream {
    /// Moves the stream to stage `to` (see `plan/stage.rs`): tails' remaining rows are
    /// dropped, and the current window is recorded as a carry level, so whatever it had
    /// not emitted is packed again at the new shape.
    pub(super) fn switch_stage(&mut self, d: &DomainData, g: &[Geometry], to: u32) {
        let mut dropped = 0u64;
        for t in 0..self.state.tails.len() {
            let w = self.tail_window(d, g, t);
            for &(b, done) in &self.state.tails[t].pending {
                if let Some(blk) = w.blocks.get(b as usize) {
                    let rows = blk.first_row + done..blk.first_row + blk.rows;
                    dropped += rows
                        .filter_map(|r| w.rows.get(r as usize))
                        .map(|r| r.tokens as u64)
                        .sum::<u64>();
                }
            }
        }
        self.state.tails.clear();
        self.tail_cache.clear();
        let s = &mut self.state;
        if s.next_block > 0 || !s.pending.is_empty() || !s.carry.is_empty() {
            s.carry.push(CarryLevel {
                stage: s.stage,
                next_block: s.next_block,
                block_chain: std::mem::take(&mut s.block_chain),
                pending: std::mem::take(&mut s.pending),
            });
            s.next_block = 0;
        }
        // Else nothing of the window went out: it is simply cut and packed at the new
        // stage, as if it had opened there.
        s.stage = to;
        s.dropped = s.dropped.saturating_add(dropped);
        self.cache = None;
    }
}
