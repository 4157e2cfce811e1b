//! Quality figures over a stretch of planned batches: realized vs target share, epochs,
//! padding, truncation, documents per row, distinct groups per batch, duplicates, and
//! batch-grouped groups that broke their promise (split or over the cap).
//!
//! This is what `millrace plan` prints and what property tests assert on, so the
//! numbers an operator reads are the ones the tests hold to.

use std::collections::{BTreeSet, HashMap};

use serde::Serialize;

use super::mix::Schedule;
use super::{GlobalBatch, Plan, Planner};
use crate::config::plan::Upsample;

mod render;
pub use render::{render_positions, render_upsample, render_upsampling, render_windows};

/// Upper ends of the document-length buckets in [`WindowFigures::by_length`]: the
/// buckets a long-context recipe is judged by (documents longer than 8192 tokens are the
/// ones a long stage upsamples and groups).
pub const LENGTH_BUCKETS: [u64; 4] = [1024, 8192, 32768, u64::MAX];

/// Documents and tokens per row from documents of one length bucket.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct LengthBucket {
    /// Documents in the bucket are at most this long (`u64::MAX`: no bound).
    pub max_doc_len: u64,
    /// Document pieces per row.
    pub docs_per_row: f64,
    /// Tokens per row.
    pub tokens_per_row: f64,
}

/// Figures for one domain over a window of steps.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct DomainFigures {
    /// Domain name.
    pub name: String,
    /// Rows planned.
    pub rows: u64,
    /// Real tokens.
    pub tokens: u64,
    /// Realized share of real tokens.
    pub token_share: f64,
    /// Target token share (schedule mean over the window).
    pub target_share: f64,
    /// Epoch progress at the window's end.
    pub epochs: f64,
}

/// Figures for a window of steps.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct WindowFigures {
    /// First trainer step.
    pub first_step: u64,
    /// Last trainer step.
    pub last_step: u64,
    /// The stage of the last step (`millrace plan` ends a window at each switch).
    pub stage: u32,
    /// Its `seq_len`.
    pub seq_len: u32,
    /// Its rows per global batch.
    pub rows_per_batch: u32,
    /// Tokens dropped at stage switches in the window (the rest of units partly
    /// emitted before a switch; `plan/stage.rs`).
    pub dropped_tokens: u64,
    /// Per document-length bucket ([`LENGTH_BUCKETS`]): documents and tokens per row.
    pub by_length: Vec<LengthBucket>,
    /// Rows of grouped domains that hold one group only, percent of those rows.
    pub single_group_rows_pct: f64,
    /// Per domain.
    pub domains: Vec<DomainFigures>,
    /// Padding tokens over capacity, percent.
    pub padding_pct: f64,
    /// Documents that fit a row but were cut, over documents started, percent.
    pub truncation_pct: f64,
    /// Documents per row: mean, p50, p99.
    pub docs_per_row: [f64; 3],
    /// Distinct groups per batch: mean and max (0 without grouped domains).
    pub groups_per_batch: [f64; 2],
    /// Pieces seen more often than allowed within their domain epoch.
    pub duplicates: u64,
    /// Batch-grouped groups with rows in this window that skipped a batch in which
    /// their domain had rows (not in one batch or consecutive ones); counted from the
    /// rows themselves, so it checks the planner rather than repeating its counters.
    pub split_groups: u64,
    /// (group, batch) pairs of batch-grouped domains with more rows than the cap
    /// (`max_share` of the global batch).
    pub capped_groups: u64,
}

/// A window's figures as its batches are added: the batches themselves are not kept (a
/// window of 5,000 steps of 256 rows held gigabytes, `plan --steps 50000` 8.5 GB).
#[derive(Default)]
struct WindowSums {
    batches: u64,
    first_step: Option<u64>,
    last_step: u64,
    last_plan_step: u64,
    capacity: u64,
    by_length: [(u64, u64); LENGTH_BUCKETS.len()],
    grouped_rows: u64,
    single: u64,
    rows: Vec<u64>,
    tokens: Vec<u64>,
    target: Vec<f64>,
    trunc: u64,
    started: u64,
    /// Documents per row, one entry a row (for its percentiles).
    per_row: Vec<u32>,
    /// Distinct groups per batch.
    groups: Vec<usize>,
}

/// How often each piece (shard, document, start) of one domain epoch was seen.
type PiecesSeen = HashMap<(u32, u64, u64), u32>;

/// Batches without a row of an epoch after which, its domain having a later one, it is
/// taken to be over (and its pieces forgotten): far more than a tail of spanning groups
/// or pending blocks takes to drain.
const EPOCH_OVER: u64 = 256;

/// Accumulates batches into windows.
pub struct Tally<'p> {
    plan: &'p Plan,
    window: WindowSums,
    /// Pieces seen, per (domain, epoch): an epoch's map is dropped once its domain has
    /// a later epoch and no row of it came for [`EPOCH_OVER`] batches (its tail has
    /// drained), so memory follows the epochs in flight, not the run (one flat map grew
    /// by 100 KB a step: `plan --steps 50000` took 8.5 GB).
    seen: HashMap<(u16, u32), PiecesSeen>,
    /// Per (domain, epoch), the ordinal of the last batch with a row of it.
    epoch_last: HashMap<(u16, u32), u64>,
    /// Batches of the windows already closed.
    batches_before: u64,
    duplicates: u64,
    /// Per domain, the batches so far in which it had rows.
    domain_batches: Vec<u64>,
    /// Batch-grouped groups (domain, epoch, shard, group): the ordinal (in
    /// `domain_batches`) of the last batch they had rows in.
    last_batch: HashMap<(u16, u32, u32, u64), u64>,
    split_groups: u64,
    capped_groups: u64,
    /// Tokens dropped at switches, over all domains, when the last window closed.
    dropped: u64,
    /// Per domain, the first trainer step added with rows of it.
    first_rows: Vec<Option<u64>>,
    /// Per domain, the stages that change its upsampling and where each took effect.
    upsampling: Vec<Vec<UpsampleSwitch>>,
    /// Per domain, the epoch last seen by [`Tally::observe`].
    last_epoch: Vec<Option<u32>>,
}

/// A stage's change of one domain's long-document upsampling, and the epoch that first
/// used it (an epoch takes the setting of the stage in force when it begins): what
/// `millrace plan` reports, so an operator sees when an override takes effect.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct UpsampleSwitch {
    /// Domain name.
    pub domain: String,
    /// The stage that sets it.
    pub stage: u32,
    /// Its first plan step.
    pub stage_step: u64,
    /// The setting (`None`: off).
    pub upsample: Option<Upsample>,
    /// The first epoch that used it, if seen (`None`: not within the steps planned,
    /// or never: a later stage's setting came before the domain's next epoch did).
    pub epoch: Option<u32>,
    /// The trainer step whose batch that epoch began in (`None` with an `epoch`: it
    /// began before the first step planned).
    pub from_step: Option<u64>,
}

impl<'p> Tally<'p> {
    /// A tally for `plan`.
    pub fn new(plan: &'p Plan) -> Tally<'p> {
        Tally {
            plan,
            window: WindowSums::default(),
            seen: HashMap::new(),
            epoch_last: HashMap::new(),
            batches_before: 0,
            duplicates: 0,
            domain_batches: vec![0; plan.domains.len()],
            last_batch: HashMap::new(),
            split_groups: 0,
            capped_groups: 0,
            dropped: 0,
            first_rows: vec![None; plan.domains.len()],
            upsampling: (0..plan.domains.len())
                .map(|d| {
                    let name = &plan.domains[d].name;
                    (plan.upsampling_changes(d).into_iter())
                        .map(|(stage, stage_step, upsample)| UpsampleSwitch {
                            domain: name.clone(),
                            stage,
                            stage_step,
                            upsample,
                            epoch: None,
                            from_step: None,
                        })
                        .collect()
                })
                .collect(),
            last_epoch: vec![None; plan.domains.len()],
        }
    }

    /// Notes the epochs `planner` is in after planning trainer step `step` (plan step
    /// `plan_step`; call it before the first step too, with `step` `None`): an epoch
    /// that began with a stage's upsampling marks where that setting took effect.
    pub fn observe(&mut self, planner: &Planner, step: Option<u64>, plan_step: u64) {
        let plan = self.plan;
        for d in 0..plan.domains.len() {
            let Some(st) = planner.stream(d).filter(|s| s.started) else {
                continue;
            };
            if self.last_epoch[d] == Some(st.epoch) {
                continue;
            }
            self.last_epoch[d] = Some(st.epoch);
            let setting = plan.domains[d].setting(st.upsample);
            let switches = &mut self.upsampling[d];
            let now = switches
                .iter_mut()
                .rev()
                .find(|s| s.stage_step <= plan_step);
            if let Some(sw) = now.filter(|s| s.epoch.is_none() && s.upsample == setting) {
                sw.epoch = Some(st.epoch);
                sw.from_step = step;
            }
        }
    }

    /// Every domain's upsampling switches, with where each took effect so far
    /// ([`Tally::observe`]); empty when no stage changes a domain's upsampling.
    pub fn upsampling(&self) -> Vec<UpsampleSwitch> {
        self.upsampling.iter().flatten().cloned().collect()
    }

    /// Per domain, the first trainer step added that had rows of it (`None`: none yet):
    /// when a domain added by schedule actually entered the batches.
    pub fn first_rows(&self) -> &[Option<u64>] {
        &self.first_rows
    }

    /// Checks the batch-grouping promise on one batch: every group of a batch-grouped
    /// domain in one batch or in consecutive batches of its domain, never more than the
    /// cap in one. Domains that upsample are left out (a repeated group reappears by
    /// design).
    fn check_grouping(&mut self, batch: &GlobalBatch) {
        let plan = self.plan;
        for (d, dom) in plan.domains.iter().enumerate() {
            if batch.counts.get(d).copied().unwrap_or(0) == 0 {
                continue;
            }
            let ord = self.domain_batches[d];
            self.domain_batches[d] += 1;
            if dom.settings.grouping.mode != crate::config::plan::GroupMode::Batch
                || !dom.grouping_active(batch.plan_step)
                || dom.settings.upsample_long.is_some()
                || !dom.overrides.is_empty()
            {
                continue;
            }
            let mut rows: HashMap<(u16, u32, u32, u64), u64> = HashMap::new();
            for r in batch.rows.iter().filter(|r| r.domain as usize == d) {
                let keys: BTreeSet<(u32, u64)> = r
                    .segments
                    .iter()
                    .filter_map(|s| s.group.map(|g| (s.shard, g)))
                    .collect();
                for (shard, g) in keys {
                    *rows.entry((r.domain, r.epoch, shard, g)).or_insert(0) += 1;
                }
            }
            let cap = plan.group_cap(d, plan.stage_at(batch.plan_step)) as u64;
            for (key, n) in rows {
                if n > cap {
                    self.capped_groups += 1;
                }
                if let Some(last) = self.last_batch.insert(key, ord) {
                    if last + 1 < ord {
                        self.split_groups += 1;
                    }
                }
            }
        }
    }

    /// Adds a batch; duplicates are tracked over everything added.
    pub fn add(&mut self, batch: GlobalBatch) {
        for (first, &n) in self.first_rows.iter_mut().zip(&batch.counts) {
            if first.is_none() && n > 0 {
                *first = Some(batch.step);
            }
        }
        for row in &batch.rows {
            let d = &self.plan.domains[row.domain as usize];
            // In concat rows the first token is the previous row's last (rows overlap by
            // one token), so a document starting right at a row seam shows up at the
            // same start twice: key the first segment by its first label token instead.
            let concat = self.plan.cfg.packing == crate::config::plan::Packing::Concat;
            for (i, s) in row.segments.iter().enumerate() {
                // The most any of the domain's settings repeats the unit (the row does
                // not say which its epoch used).
                let allowed = (d.settings.upsample_long.iter().chain(&d.overrides))
                    .filter(|u| s.doc_len > u.min_tokens || s.group.is_some())
                    .map(|u| u.factor)
                    .max()
                    .unwrap_or(1);
                let start = if concat && i == 0 {
                    if s.len <= 1 {
                        continue;
                    }
                    s.start + 1
                } else {
                    s.start
                };
                let epoch = self.seen.entry((row.domain, row.epoch)).or_default();
                let c = epoch.entry((s.shard, s.doc, start)).or_insert(0);
                *c += 1;
                if *c > allowed {
                    self.duplicates += 1;
                }
            }
        }
        // Epochs whose domain has moved on and that gave no row for EPOCH_OVER batches
        // are over: a tail of spanning groups or pending blocks drains within a few.
        let now = self.window.batches + self.batches_before;
        for r in &batch.rows {
            self.epoch_last.insert((r.domain, r.epoch), now);
        }
        if now % EPOCH_OVER == 0 {
            let mut newest: HashMap<u16, u32> = HashMap::new();
            for &(d, e) in self.epoch_last.keys() {
                let n = newest.entry(d).or_insert(e);
                *n = (*n).max(e);
            }
            let last = &self.epoch_last;
            let over = |d: u16, e: u32| {
                newest.get(&d).is_some_and(|&n| n > e)
                    && last.get(&(d, e)).is_some_and(|&at| at + EPOCH_OVER < now)
            };
            self.seen.retain(|&(d, e), _| !over(d, e));
            self.last_batch.retain(|&(d, e, _, _), _| !over(d, e));
            let stale: Vec<(u16, u32)> = (last.keys().copied())
                .filter(|&(d, e)| over(d, e))
                .collect();
            for k in stale {
                self.epoch_last.remove(&k);
            }
        }
        self.check_grouping(&batch);
        self.count(&batch);
    }

    /// Adds `b` to the window's sums.
    fn count(&mut self, b: &GlobalBatch) {
        let plan = self.plan;
        let n = plan.domains.len();
        let w = &mut self.window;
        if w.rows.is_empty() {
            (w.rows, w.tokens, w.target) = (vec![0; n], vec![0; n], vec![0.0; n]);
        }
        w.batches += 1;
        w.first_step.get_or_insert(b.step);
        (w.last_step, w.last_plan_step) = (b.step, b.plan_step);
        for (d, s) in plan.mixer.schedule.shares(b.plan_step).iter().enumerate() {
            w.target[d] += s;
        }
        let mut distinct = BTreeSet::new();
        let cap = plan.capacity_at(b.plan_step);
        for r in &b.rows {
            w.rows[r.domain as usize] += 1;
            w.tokens[r.domain as usize] += r.tokens as u64;
            w.capacity += cap as u64;
            w.trunc += r.truncated(cap) as u64;
            w.started += r.docs_started() as u64;
            w.per_row.push(r.segments.len() as u32);
            for s in &r.segments {
                if let Some(g) = s.group {
                    distinct.insert((r.domain, s.shard, g));
                }
                let i = LENGTH_BUCKETS.partition_point(|&m| m < s.doc_len);
                let bucket = &mut w.by_length[i.min(LENGTH_BUCKETS.len() - 1)];
                bucket.0 += 1;
                bucket.1 += s.len as u64;
            }
            let grouping = plan.domains[r.domain as usize].settings.grouping.mode;
            if grouping != crate::config::plan::GroupMode::Off {
                w.grouped_rows += 1;
                let groups: BTreeSet<(u32, Option<u64>)> =
                    r.segments.iter().map(|s| (s.shard, s.group)).collect();
                w.single += u64::from(groups.len() == 1);
            }
        }
        w.groups.push(distinct.len());
    }

    /// How many pieces the duplicate check holds: what its memory follows, bounded by
    /// the epochs in flight (tests check that a long run does not grow it).
    pub fn pieces_tracked(&self) -> usize {
        self.seen.values().map(HashMap::len).sum()
    }

    /// Closes the window at `planner` (the planner that produced its batches): its
    /// figures, with the planner's epochs and the tokens its switches dropped.
    pub fn finish_at(&mut self, planner: &Planner) -> WindowFigures {
        let mut w = self.finish(&planner.epochs());
        let dropped: u64 = (0..self.plan.domains.len())
            .filter_map(|d| planner.stream(d))
            .map(|s| s.dropped)
            .sum();
        w.dropped_tokens = dropped.saturating_sub(self.dropped);
        self.dropped = dropped;
        w
    }

    /// Closes the window: its figures, with epochs as of `epochs`.
    pub fn finish(&mut self, epochs: &[f64]) -> WindowFigures {
        let plan = self.plan;
        let n = plan.domains.len();
        let WindowSums {
            batches,
            first_step,
            last_step,
            last_plan_step,
            capacity,
            by_length,
            grouped_rows,
            single,
            mut rows,
            mut tokens,
            mut target,
            trunc,
            started,
            mut per_row,
            groups,
        } = std::mem::take(&mut self.window);
        self.batches_before += batches;
        if rows.is_empty() {
            (rows, tokens, target) = (vec![0; n], vec![0; n], vec![0.0; n]);
        }
        let all_rows: u64 = rows.iter().sum();
        let all_tokens: u64 = tokens.iter().sum();
        per_row.sort_unstable();
        let pct = |q: f64| -> f64 {
            if per_row.is_empty() {
                return 0.0;
            }
            let i = ((q * per_row.len() as f64).ceil() as usize).clamp(1, per_row.len()) - 1;
            per_row[i] as f64
        };
        let nb = batches.max(1) as f64;
        let stage = plan.stage_at(last_plan_step);
        let shape = plan.shape(stage);
        let per = all_rows.max(1) as f64;
        WindowFigures {
            first_step: first_step.unwrap_or(0),
            last_step,
            stage,
            seq_len: shape.seq_len,
            rows_per_batch: shape.rows,
            dropped_tokens: 0,
            by_length: LENGTH_BUCKETS
                .iter()
                .zip(by_length)
                .map(|(&max_doc_len, (docs, toks))| LengthBucket {
                    max_doc_len,
                    docs_per_row: docs as f64 / per,
                    tokens_per_row: toks as f64 / per,
                })
                .collect(),
            single_group_rows_pct: 100.0 * ratio(single, grouped_rows),
            domains: (0..n)
                .map(|d| DomainFigures {
                    name: plan.domains[d].name.clone(),
                    rows: rows[d],
                    tokens: tokens[d],
                    token_share: ratio(tokens[d], all_tokens),
                    target_share: target[d] / nb,
                    epochs: epochs.get(d).copied().unwrap_or(0.0),
                })
                .collect(),
            padding_pct: 100.0 * (1.0 - ratio(all_tokens, capacity)),
            truncation_pct: 100.0 * ratio(trunc, started),
            docs_per_row: [
                per_row.iter().map(|&x| x as f64).sum::<f64>() / per_row.len().max(1) as f64,
                pct(0.5),
                pct(0.99),
            ],
            groups_per_batch: [
                groups.iter().sum::<usize>() as f64 / nb,
                groups.iter().copied().max().unwrap_or(0) as f64,
            ],
            duplicates: std::mem::take(&mut self.duplicates),
            split_groups: std::mem::take(&mut self.split_groups),
            capped_groups: std::mem::take(&mut self.capped_groups),
        }
    }
}

/// Where one domain stands at a planner's position and when the schedule brings it in:
/// what `plan` and `explain` show, so an operator sees how far each domain is into its
/// epoch (issue 20: after a resume or a domain added at a step, how much of the current
/// epoch was already seen).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DomainPosition {
    /// Domain name.
    pub name: String,
    /// The current epoch (0-based).
    pub epoch: u32,
    /// Fraction of the current epoch consumed, in [0, 1].
    pub epoch_fraction: f64,
    /// Rows of the domain over the run before this position.
    pub rows: u64,
    /// The first trainer step at which the schedule gives the domain weight (`None`:
    /// never).
    pub weighted_from: Option<u64>,
    /// The current epoch's long-document upsampling (`None`: none).
    pub upsample: Option<Upsample>,
    /// The upsampling the stage in force gives epochs that begin from here on, when it
    /// differs from the current epoch's: the next epoch takes it (the stage's first plan
    /// step, the setting; `None` inside: off).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_upsample: Option<(u64, Option<Upsample>)>,
}

/// Every domain's [`DomainPosition`] at `planner`'s next step.
pub fn positions(planner: &Planner) -> Vec<DomainPosition> {
    let plan = planner.plan();
    let epochs = planner.epochs();
    let stage = plan.stage_at(planner.plan_step());
    plan.domains
        .iter()
        .enumerate()
        .map(|(d, dom)| {
            let state = planner.stream(d);
            let epoch = state.map_or(0, |s| s.epoch);
            let progress = epochs.get(d).copied().unwrap_or(0.0);
            let current = state.filter(|s| s.started).map(|s| s.upsample);
            let upsample = dom.setting(current.unwrap_or_default());
            let next = plan.upsampling_at(stage, d);
            let next_upsample = (current.is_some() && current != Some(next)).then(|| {
                let from = plan.upsampling_changes(d).into_iter().rev();
                let step = from.map(|c| c.1).find(|&s| s <= planner.plan_step());
                (step.unwrap_or(0), dom.setting(next))
            });
            DomainPosition {
                name: dom.name.clone(),
                epoch,
                epoch_fraction: (progress - epoch as f64).clamp(0.0, 1.0),
                rows: state.map_or(0, |s| s.rows),
                weighted_from: first_weighted(plan.schedule(), d).map(|p| plan.trainer_step_of(p)),
                upsample,
                next_upsample,
            }
        })
        .collect()
}

/// The first step of `schedule` (its own numbering, the unskipped one) that gives domain
/// `d` weight, if any. The curve is linear between knots and flat outside them, so it is
/// step 0, a knot, or the step after a knot (a ramp up from 0 is positive one step in).
pub fn first_weighted(schedule: &Schedule, d: usize) -> Option<u64> {
    let mut at = vec![0];
    for k in schedule.knots_before(u64::MAX) {
        at.push(k);
        at.push(k.saturating_add(1));
    }
    at.sort_unstable();
    at.dedup();
    at.into_iter()
        .find(|&p| schedule.weights(p).get(d).is_some_and(|&w| w > 0.0))
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 {
        0.0
    } else {
        a as f64 / b as f64
    }
}

#[cfg(test)]
mod tests {
    use super::first_weighted;
    use crate::config::plan::SchedulePoint;
    use crate::plan::mix::Schedule;

    /// The entry step is found on a ramp up from 0 (one step past its knot), on a step
    /// change, from the start, and never for a domain always at 0.
    #[test]
    fn first_weighted_finds_ramps_and_steps() {
        let names = ["ramp", "jump", "always", "never"];
        let p = |step, w: [f64; 4]| SchedulePoint {
            step,
            weights: names.iter().map(|n| n.to_string()).zip(w).collect(),
        };
        let s = Schedule::new(
            &[
                p(0, [0.0, 0.0, 1.0, 0.0]),
                p(10, [0.0, 0.0, 1.0, 0.0]),
                p(20, [1.0, 0.0, 1.0, 0.0]),
                p(29, [1.0, 0.0, 1.0, 0.0]),
                p(30, [1.0, 2.0, 1.0, 0.0]),
            ],
            &names,
        );
        let got: Vec<Option<u64>> = (0..4).map(|d| first_weighted(&s, d)).collect();
        assert_eq!(got, [Some(11), Some(30), Some(0), None]);
    }
}
