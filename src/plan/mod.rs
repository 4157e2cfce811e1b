//! The plan: which tokens fill every row of every global batch, as a pure function of
//! the corpus manifest, the plan config and the step.
//!
//! Pure by construction: no files, no clocks, no threads. It reads only document lengths
//! and group runs through [`DocSource`], so property tests drive it with vectors and the
//! daemon with mapped shards, and both compute the same thing. The flow is
//! [`permute`] (epoch shuffle) -> [`pack`] (rows of one window) -> `domain` (a domain's
//! windows) -> `stream` (a domain's row stream) -> [`mix`] (rows per domain per step) ->
//! [`Planner::next_batch`] (the global batch, positions shuffled) ->
//! [`GlobalBatch::rank_rows`] (one rank's slice). [`cursor`] records where a [`Planner`]
//! is; `resume` checks a blob against the plan and `fingerprint` names what it is for
//! (plan-wide, and per domain: `evolve` maps a blob's domains onto the config's by name);
//! `checkpoint` lets a seek start from a stored planner instead of step 0.

mod checkpoint;
pub mod cursor;
mod domain;
mod evolve;
pub mod explain;
mod fingerprint;
pub mod journal;
pub mod mix;
pub mod pack;
pub mod permute;
mod planner;
pub mod report;
mod resume;
mod room;
mod stage;
mod stream;
mod warnings;

use std::sync::Arc;

use rayon::prelude::*;
use serde::Serialize;

use crate::config::plan::{
    validate_weights, DomainSettings, GroupMode, PlanConfig, SchedulePoint, SettingError,
};
pub use checkpoint::{CheckpointKey, Checkpoints, MemCheckpoints, CHECKPOINT_ROWS, MAX_TRIES};
pub use cursor::CursorError;
pub use domain::{DocSource, DomainInput, MemShard};
pub use journal::{Change, ChangeError, StageChange};
pub use planner::Planner;
pub use resume::Resumed;
pub use room::CARRY_BYTES;
pub use stage::{CarryLevel, Shape, Upsampling};
pub use stream::{StreamError, StreamState, Tail, MAX_DEFERRED};

use domain::{DomainData, Geometry};
use mix::{Mixer, Schedule};
use permute::derive_key;

/// [`PLAN_VERSION`] as a literal, so that `millrace --version` can spell it at compile
/// time (`concat!`).
#[macro_export]
macro_rules! plan_version {
    () => {
        1
    };
}

/// The planner's version: which rows a given corpus, config and history put in every
/// step. A change to the planner that makes any step of any plan hold other rows (the
/// shuffle, mixing, packing, grouping, stages, skips or reseeds) must raise it, and
/// `determinism_planner_version_pins_every_scenario` in tests/plan_props.rs fails until
/// it does. A blob or plan checkpoint made by another version is refused
/// ([`CursorError::PlanVersion`]) rather than continued with other data, and from 2 on
/// the version is part of [`Plan::fingerprint`], so nodes that run different versions
/// show different fingerprints and keep their plan checkpoints apart.
pub const PLAN_VERSION: u32 = plan_version!();

/// Plan steps a seek replays per chunk: its mixer counts (4 bytes per domain per step)
/// are all it holds, so a seek to any step needs at most a few MB (chunks shrink past
/// 256 domains, to keep within 64 MiB).
pub const SEEK_CHUNK: u64 = 1 << 16;

/// Why a plan could not be built.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PlanError {
    /// A setting is wrong.
    #[error(transparent)]
    Setting(#[from] SettingError),
    /// The corpus has no domains.
    #[error("the corpus has no domains")]
    NoDomains,
    /// More domains than a cursor blob lists ([`crate::config::MAX_DOMAINS`]): the
    /// plan's own blobs would not resume.
    #[error(
        "{domains} domains; at most {} (every cursor blob lists every domain)",
        crate::config::MAX_DOMAINS
    )]
    TooManyDomains {
        /// Domains in the corpus.
        domains: usize,
    },
    /// A grouped domain with a shard that has no group sidecar.
    #[error("domain {domain}: grouping is {mode:?} but shard {shard} has no .groups.npy sidecar")]
    NoSidecar {
        /// The domain's name.
        domain: String,
        /// The shard's display name.
        shard: String,
        /// The grouping configured.
        mode: GroupMode,
    },
    /// A domain that the config weights but that holds no tokens.
    #[error("domain {domain} (corpus.domain[{index}]) has weight but no tokens")]
    NoTokens {
        /// The domain's name.
        domain: String,
        /// Its index in the corpus.
        index: usize,
    },
    /// A live change that weights a domain that holds no tokens.
    #[error("domain {domain} has weight at step {step} but no tokens")]
    NoTokensAt {
        /// The domain's name.
        domain: String,
        /// The change point's plan step.
        step: u64,
    },
    /// More live changes than a journal keeps.
    #[error("the journal holds {changes} live changes, at most {max} are kept: write the mixture into the config and restart")]
    JournalFull {
        /// Changes offered.
        changes: usize,
        /// [`journal::MAX_CHANGES`].
        max: usize,
    },
    /// A live change that does not fit the plan.
    #[error(transparent)]
    Change(#[from] journal::ChangeError),
}

/// A token range of one document placed in a row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Segment {
    /// Shard index within the domain.
    pub shard: u32,
    /// Document within the shard.
    pub doc: u64,
    /// First token within the document.
    pub start: u64,
    /// Tokens.
    pub len: u32,
    /// The whole document's length, so cuts are visible.
    pub doc_len: u64,
    /// Group id from the sidecar, if any; in the rows the daemon serves
    /// ([`Planner::next_batch_served`]) only a group unit's pieces carry it.
    pub group: Option<u64>,
}

/// One row of a global batch: up to `seq_len + 1` tokens of one domain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Row {
    /// Domain index.
    pub domain: u16,
    /// The domain's epoch this row comes from (0-based).
    pub epoch: u32,
    /// Documents in order; padding follows them.
    pub segments: Vec<Segment>,
    /// Real tokens.
    pub tokens: u32,
    /// Label positions that count towards the loss: predictions inside a document.
    /// Predictions across a document boundary and into padding are masked.
    pub loss_tokens: u32,
}

impl Row {
    /// Builds a row and counts its loss tokens.
    pub fn new(domain: u16, epoch: u32, segments: Vec<Segment>, tokens: u32) -> Row {
        let loss_tokens = segments.iter().map(|s| s.len.saturating_sub(1)).sum();
        Row {
            domain,
            epoch,
            segments,
            tokens,
            loss_tokens,
        }
    }

    /// Documents that would fit a row but were cut (start here, continue elsewhere).
    pub fn truncated(&self, capacity: u32) -> u32 {
        self.segments
            .iter()
            .filter(|s| s.start == 0 && (s.len as u64) < s.doc_len && s.doc_len <= capacity as u64)
            .count() as u32
    }

    /// Documents that begin in this row.
    pub fn docs_started(&self) -> u32 {
        self.segments.iter().filter(|s| s.start == 0).count() as u32
    }
}

/// The rows of one global step, in their final (shuffled) positions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GlobalBatch {
    /// Trainer step.
    pub step: u64,
    /// Step in the unskipped numbering that schedules and skips use.
    pub plan_step: u64,
    /// All rows, `global_batch_rows` of them.
    pub rows: Vec<Row>,
    /// Rows per domain.
    pub counts: Vec<u32>,
}

impl GlobalBatch {
    /// Rank `r` of `ranks` gets rows `[r*G/R, (r+1)*G/R)`; TP/PP peers call this with the
    /// same `r` and get the same rows.
    pub fn rank_rows(&self, r: u32, ranks: u32) -> &[Row] {
        let (a, b) = rank_range(self.rows.len() as u64, r, ranks);
        &self.rows[a as usize..b as usize]
    }
}

/// The row range of rank `r` of `ranks` in a batch of `g` rows.
pub fn rank_range(g: u64, r: u32, ranks: u32) -> (u64, u64) {
    let ranks = ranks.max(1) as u64;
    let r = (r as u64).min(ranks - 1);
    (r * g / ranks, (r + 1) * g / ranks)
}

/// A built plan: immutable, shared by every planner and every thread. A live change makes
/// a new `Plan` ([`Plan::with_journal`]) that shares the domains with the old one.
#[derive(Clone)]
pub struct Plan {
    cfg: PlanConfig,
    domains: Arc<Vec<DomainData>>,
    /// The config's schedule, before the journal's layers.
    base: Schedule,
    journal: Vec<Change>,
    /// Changes accepted but dropped from `journal` as superseded ([`journal::append`]).
    superseded: u64,
    mixer: Mixer,
    /// Per stage: packing constants, and the shape they come from.
    geometries: Vec<Geometry>,
    shapes: Vec<Shape>,
    /// Per stage, per domain: the upsampling of epochs beginning in that stage.
    upsampling: Vec<Vec<stage::Upsampling>>,
    fingerprint: u128,
    /// The fingerprint blobs of layouts 1-4 carry.
    legacy_fingerprint: u128,
    /// The plan-wide fingerprint blobs of layout 7 carry.
    settings_fingerprint: u128,
    /// Per domain, what layout 7 blobs record of it (`fingerprint::DomainIdentity`).
    identities: Arc<Vec<fingerprint::DomainIdentity>>,
    /// The records every blob carries, computed once: a cursor is encoded every step.
    records: Arc<Vec<cursor::DomainRecord>>,
    reseeds: Vec<(u64, u64)>,
    skips: Vec<(u64, u64)>,
}

impl Plan {
    /// Builds a plan. `manifest` identifies the corpus content (the caller hashes shard
    /// identities; the plan never reads files). Each domain's own identity (cursor layout
    /// 7) then knows its shards by documents and tokens only: callers with content
    /// identities use [`Plan::with_content`].
    pub fn new(inputs: &[DomainInput], cfg: PlanConfig, manifest: u128) -> Result<Plan, PlanError> {
        Plan::with_content(inputs, cfg, manifest, &[])
    }

    /// [`Plan::new`] with `content[d][k]`, the caller's 128-bit content identity of shard
    /// k of domain d, in each domain's identity: a shard rewritten with the same counts
    /// then refuses blobs that knew it, naming it (docs/DESIGN.md, "Corpus evolution").
    pub fn with_content(
        inputs: &[DomainInput],
        cfg: PlanConfig,
        manifest: u128,
        content: &[Vec<u128>],
    ) -> Result<Plan, PlanError> {
        Plan::with_content_since(inputs, cfg, manifest, content, &[])
    }

    /// [`Plan::with_content`] where `legacy[d][k]` is shard k's content identity as
    /// earlier builds computed it, when it differs from `content[d][k]` (a group
    /// sidecar now counts): blobs those builds wrote keep resuming.
    pub fn with_content_since(
        inputs: &[DomainInput],
        cfg: PlanConfig,
        manifest: u128,
        content: &[Vec<u128>],
        legacy: &[Vec<u128>],
    ) -> Result<Plan, PlanError> {
        if inputs.is_empty() {
            return Err(PlanError::NoDomains);
        }
        // Also keeps domain indexes within a row's u16.
        if inputs.len() > crate::config::MAX_DOMAINS {
            return Err(PlanError::TooManyDomains {
                domains: inputs.len(),
            });
        }
        let settings: Vec<(&str, DomainSettings)> = inputs
            .iter()
            .map(|d| (d.name.as_str(), d.settings))
            .collect();
        cfg.validate(&settings)?;
        let shapes = stage::shapes(&cfg);
        let upsampling = stage::upsampling(&cfg, &settings);
        let geometries = stage::geometries(&shapes, cfg.packing);
        let geometry = geometries[0];
        let mut domains = Vec::with_capacity(inputs.len());
        for (d, input) in inputs.iter().enumerate() {
            // The stages' own settings: their long-unit lists are built (or taken from
            // the shards' lists) once, with the domain's.
            let overrides: Vec<_> = upsampling
                .iter()
                .filter_map(|row| match row[d] {
                    stage::Upsampling::Long(u) => Some(u),
                    _ => None,
                })
                .collect();
            domains.push(DomainData::new(input, &overrides)?);
        }
        let names: Vec<&str> = inputs.iter().map(|d| d.name.as_str()).collect();
        let points = cfg.points();
        let schedule = Schedule::new(&points, &names);
        // A domain that is ever weighted must have tokens. (The points once cloned per
        // domain: 4 s of every start at 4096 domains and 4 points.)
        let weighted: std::collections::HashSet<&str> = (points.iter())
            .flat_map(|p| p.weights.iter().filter(|(_, &w)| w > 0.0))
            .map(|(n, _)| n.as_str())
            .collect();
        for (i, d) in domains.iter().enumerate() {
            if weighted.contains(d.name.as_str()) && d.tokens == 0 {
                return Err(PlanError::NoTokens {
                    domain: d.name.clone(),
                    index: i,
                });
            }
        }
        // First windows (and so fills), in parallel across domains: they are independent,
        // and collect keeps domain order, so the result does not depend on thread count.
        let firsts: Vec<domain::FirstWindow> = domains
            .par_iter()
            .map(|d| domain::first_window(d, geometry, cfg.seed))
            .collect();
        let fill = firsts.iter().map(|f| f.fill).collect();
        for (d, f) in domains.iter_mut().zip(firsts) {
            d.first = Some(f);
        }
        // Later stages' fills, from the same first window packed at their shape: the
        // mixer counts in rows of the stage in force.
        let stages = stage::stage_mixes(&domains, &shapes, &geometries, cfg.seed, &[]);
        let mut phase = 0u32;
        let bursty: Vec<Option<(u32, u32)>> = domains
            .iter()
            .map(|d| {
                d.settings.bursty.map(|b| {
                    let p = phase % b.period;
                    phase += 1;
                    (b.period, p)
                })
            })
            .collect();
        let identities: Vec<fingerprint::DomainIdentity> = inputs
            .iter()
            .zip(&bursty)
            .enumerate()
            .map(|(d, (input, b))| {
                let ids = content.get(d).map_or(&[][..], |c| c.as_slice());
                let id = fingerprint::DomainIdentity::new(input, b.map(|b| b.1), ids);
                match legacy.get(d) {
                    Some(old) => id.also_accepting(input, old),
                    None => id,
                }
            })
            .collect();
        let mixer = Mixer {
            schedule,
            fill,
            rows: cfg.global_batch_rows,
            bursty,
            stages,
        };
        let fingerprint = fingerprint::fingerprint(&cfg, inputs, manifest);
        let legacy_fingerprint = fingerprint::legacy_json_fingerprint(&cfg, inputs, manifest);
        let settings_fingerprint = fingerprint::settings_fingerprint(&cfg);
        let plan = Plan {
            reseeds: cfg.reseed.iter().map(|r| (r.step, r.seed)).collect(),
            skips: cfg.skip.iter().map(|s| (s.steps[0], s.steps[1])).collect(),
            cfg,
            base: mixer.schedule.clone(),
            journal: Vec::new(),
            superseded: 0,
            domains: Arc::new(domains),
            mixer,
            geometries,
            shapes,
            upsampling,
            fingerprint,
            legacy_fingerprint,
            settings_fingerprint,
            records: Arc::new(evolve::records(inputs, &identities)),
            identities: Arc::new(identities),
        };
        Ok(plan)
    }

    /// The validated config.
    pub fn config(&self) -> &PlanConfig {
        &self.cfg
    }

    /// Live changes in force, oldest first.
    pub fn journal(&self) -> &[Change] {
        &self.journal
    }

    /// How many accepted changes were dropped from the journal as superseded.
    pub fn superseded(&self) -> u64 {
        self.superseded
    }

    /// The weights schedule in force: the config's, overlaid by the journal.
    pub fn schedule(&self) -> &Schedule {
        &self.mixer.schedule
    }

    /// This plan under another journal (which must extend or equal this one's where it
    /// matters: callers check the delivered past). Cheap: the domains are shared.
    pub fn with_journal(&self, journal: Vec<Change>) -> Result<Plan, PlanError> {
        self.with_history(journal, 0)
    }

    /// [`Plan::with_journal`] for a journal that has dropped `superseded` changes (a
    /// daemon's after [`journal::append`], or a blob's). Only the changes kept count
    /// toward [`journal::MAX_CHANGES`].
    pub fn with_history(&self, journal: Vec<Change>, superseded: u64) -> Result<Plan, PlanError> {
        if journal.len() > journal::MAX_CHANGES {
            return Err(PlanError::JournalFull {
                changes: journal.len(),
                max: journal::MAX_CHANGES,
            });
        }
        let tokens = self.domain_tokens();
        let mut schedule = self.base.clone();
        let mut shapes = stage::shapes(&self.cfg);
        let settings: Vec<(&str, DomainSettings)> = self
            .domains
            .iter()
            .map(|d| (d.name.as_str(), d.settings))
            .collect();
        let mut upsampling = stage::upsampling(&self.cfg, &settings);
        for change in &journal {
            change.check(self.domains.len())?;
            if let Some(st) = change.stage {
                stage::layer(&mut shapes, &mut upsampling, change.at, st);
                continue;
            }
            for (step, w) in &change.points {
                if let Some(d) = (0..w.len()).find(|&d| w[d] > 0.0 && tokens[d] == 0) {
                    return Err(PlanError::NoTokensAt {
                        domain: self.domains[d].name.clone(),
                        step: *step,
                    });
                }
            }
            schedule.add_layer(change.at, change.points.clone());
        }
        if shapes != self.shapes {
            // A stage's rows change how many groups may span batches at once.
            for (i, d) in self.domains.iter().enumerate() {
                let g = d.settings.grouping;
                if g.mode == GroupMode::Batch {
                    let field = format!("corpus.domain[{i}]");
                    let rows = shapes.iter().map(|s| s.rows);
                    crate::config::plan::check_group_spans(&field, &d.name, g.max_share, rows)?;
                }
            }
        }
        let mut p = self.clone();
        if shapes != self.shapes {
            // Fills already estimated at a shape are kept; only new shapes pack a window.
            let known: Vec<(Geometry, &[f64])> = (self.geometries.iter().skip(1).copied())
                .zip(self.mixer.stages.iter().map(|s| s.fill.as_slice()))
                .collect();
            p.geometries = stage::geometries(&shapes, self.cfg.packing);
            p.mixer.stages =
                stage::stage_mixes(&self.domains, &shapes, &p.geometries, self.cfg.seed, &known);
            p.shapes = shapes;
        }
        p.upsampling = upsampling;
        p.mixer.schedule = schedule;
        p.journal = journal;
        p.superseded = superseded;
        Ok(p)
    }

    /// The change "from plan step `at` on, these weights": named domains take the given
    /// raw weight, the others keep the one in force at `at`. Refused as a whole when a
    /// name is unknown, a weight negative or not finite, or the result all zero.
    pub fn weights_change(
        &self,
        at: u64,
        weights: &std::collections::BTreeMap<String, f64>,
    ) -> Result<Change, SettingError> {
        let names = self.domain_names();
        let index: std::collections::HashMap<&str, usize> =
            names.iter().enumerate().map(|(d, n)| (*n, d)).collect();
        let mut w = self.mixer.schedule.weights(at);
        for (name, &x) in weights {
            let Some(&d) = index.get(name.as_str()) else {
                return Err(SettingError {
                    field: format!("weights.{name}"),
                    what: format!("no such domain (domains: {})", names.join(", ")),
                });
            };
            if !x.is_finite() || x < 0.0 {
                return Err(SettingError {
                    field: format!("weights.{name}"),
                    what: format!("{x} is not a finite non-negative number"),
                });
            }
            w[d] = x;
        }
        let merged: std::collections::BTreeMap<String, f64> = names
            .iter()
            .map(|n| n.to_string())
            .zip(w.iter().copied())
            .collect();
        validate_weights(&merged, &names, "set_weights")?;
        Ok(Change {
            at,
            points: vec![(at, w)],
            stage: None,
        })
    }

    /// The change that makes the schedule follow `points` (a whole new config schedule)
    /// from plan step `at` on.
    pub fn schedule_change(&self, at: u64, points: &[SchedulePoint]) -> Change {
        let names = self.domain_names();
        Change {
            at,
            points: Schedule::new(points, &names).tail(at),
            stage: None,
        }
    }

    /// The change "from plan step `at` on, rows of `seq_len` tokens, `rows` per global
    /// batch": a `[[plan.stage]]` added live. Without a `window` it keeps the packing
    /// window in force at `at`. Checked as a whole by [`Plan::with_history`].
    pub fn stage_change(
        &self,
        at: u64,
        seq_len: u32,
        rows: u32,
        window: Option<u64>,
        chain_groups: bool,
    ) -> Change {
        let window = window.unwrap_or_else(|| self.shape(self.stage_at(at)).window);
        Change {
            at,
            points: Vec::new(),
            stage: Some(journal::StageChange {
                seq_len,
                rows,
                window,
                chain_groups,
            }),
        }
    }

    /// The first plan step at which schedule `new` differs from schedule `old` (both as
    /// config points), or `None` when they agree everywhere.
    pub fn points_difference(&self, old: &[SchedulePoint], new: &[SchedulePoint]) -> Option<u64> {
        let names = self.domain_names();
        Schedule::new(old, &names).first_difference(&Schedule::new(new, &names))
    }

    /// The first knot (plan step) at which a daemon restarted with `file_points` as its
    /// config's schedule, and this plan's journal, would pin its curve differently from
    /// this plan: blobs record the knots (see [`Plan::history`]), so such a daemon
    /// refuses every blob made after it, though the weights may be equal at every step
    /// (a file edit that adds a point on the line already drawn). `None` when they agree.
    pub fn restart_knot(&self, file_points: &[SchedulePoint]) -> Option<u64> {
        let names = self.domain_names();
        let mut fresh = Schedule::new(file_points, &names);
        for c in self.journal.iter().filter(|c| c.stage.is_none()) {
            fresh.add_layer(c.at, c.points.clone());
        }
        let ours = &self.mixer.schedule;
        let (a, b) = (ours.knots_before(u64::MAX), fresh.knots_before(u64::MAX));
        let same = |s: u64| {
            let (x, y) = (ours.weights(s), fresh.weights(s));
            x.iter().zip(&y).all(|(p, q)| p.to_bits() == q.to_bits())
        };
        let first_apart = a.iter().zip(&b).find(|(x, y)| x != y || !same(**x));
        match first_apart {
            Some((x, y)) => Some(*x.min(y)),
            None if a.len() != b.len() => a.get(b.len()).or(b.get(a.len())).copied(),
            None => None,
        }
    }

    /// Domain names in index order.
    pub fn domain_names(&self) -> Vec<&str> {
        self.domains.iter().map(|d| d.name.as_str()).collect()
    }

    /// Shard display names of domain `d`.
    pub fn shard_names(&self, d: usize) -> &[String] {
        self.domains.get(d).map_or(&[], |d| &d.shard_names)
    }

    /// Tokens per domain.
    pub fn domain_tokens(&self) -> Vec<u64> {
        self.domains.iter().map(|d| d.tokens).collect()
    }

    /// Estimated fill per domain (real tokens per row over capacity).
    pub fn fill(&self) -> &[f64] {
        &self.mixer.fill
    }

    /// The mixer, for reports of targets.
    pub fn mixer(&self) -> &Mixer {
        &self.mixer
    }

    /// Tokens a row holds (`seq_len + 1`) in the first stage.
    pub fn capacity(&self) -> u32 {
        self.geometries[0].capacity
    }

    /// Tokens a row holds at plan step `plan_step` (its stage's `seq_len + 1`).
    pub fn capacity_at(&self, plan_step: u64) -> u32 {
        self.shape_at(plan_step).0 + 1
    }

    /// Identity of corpus + static config, as cursors (layout 5 on), WELCOME and status
    /// carry it.
    pub fn fingerprint(&self) -> u128 {
        self.fingerprint
    }

    /// The same identity as blobs of layouts 1-4 carry it (a hash of JSON text), so old
    /// checkpoints resume and tools can name what an old blob was made for.
    pub fn legacy_fingerprint(&self) -> u128 {
        self.legacy_fingerprint
    }

    /// The plan-wide settings fingerprint cursor blobs carry since layout 7 (seed,
    /// `seq_len`, batch rows, packing): what no change of the corpus may alter.
    pub fn settings_fingerprint(&self) -> u128 {
        self.settings_fingerprint
    }

    /// Per-domain facts for reports.
    pub fn describe(&self, d: usize) -> std::collections::BTreeMap<&'static str, u64> {
        self.domains
            .get(d)
            .map(domain::describe)
            .unwrap_or_default()
    }

    /// The trainer step that reads plan step `p` (or the next one that is not skipped).
    pub fn trainer_step_of(&self, p: u64) -> u64 {
        let mut t = p;
        for &(a, b) in &self.skips {
            if p > b {
                t -= b - a + 1;
            } else if p >= a {
                t -= p - a;
            }
        }
        t
    }

    /// The plan step that trainer step `t` reads, skipping configured ranges.
    pub fn plan_step_of(&self, t: u64) -> u64 {
        let mut p = t;
        for &(a, b) in &self.skips {
            if p >= a {
                // Saturating: a step past u64::MAX is never reached, whatever it maps to.
                p = p.saturating_add(b - a + 1);
            } else {
                break;
            }
        }
        p
    }

    /// True when every plan step in `[a, b)` is skipped.
    fn all_skipped(&self, a: u64, b: u64) -> bool {
        let mut at = a;
        for &(s, e) in &self.skips {
            if at >= b {
                break;
            }
            if s <= at && at <= e {
                at = e + 1;
            }
        }
        at >= b
    }

    fn seed_at(&self, plan_step: u64) -> u64 {
        self.reseeds
            .iter()
            .rev()
            .find(|r| r.0 <= plan_step)
            .map_or(self.cfg.seed, |r| r.1)
    }

    /// Most rows of one group in a batch of stage `stage` (batch grouping).
    fn group_cap(&self, d: usize, stage: u32) -> u32 {
        let share = self.domains[d].settings.grouping.max_share;
        crate::config::plan::group_cap(self.shape(stage).rows, share)
    }

    /// A digest of everything that shaped steps before `plan_step` besides the static
    /// config: schedule values, stages, skips and reseeds. Editing the future keeps it.
    pub fn history(&self, plan_step: u64) -> u64 {
        self.history_span(plan_step, plan_step)
    }

    /// [`Plan::history`] with the schedule's values covered up to `weights_end` (at
    /// least `plan_step`): a bursty cycle begun before `plan_step` took its rows from
    /// the weights of its later steps, while skips and reseeds shape only the steps
    /// they fall on.
    pub(super) fn history_span(&self, plan_step: u64, weights_end: u64) -> u64 {
        self.history_over(plan_step, weights_end, None)
    }

    /// [`Plan::history_span`] with the weights of domains `over` only, in that order
    /// (all, in index order, for `None`, which gives the same value as `Some(0..n)`): a
    /// layout 7 blob's digest covers the domains it knew, so adding a domain that had
    /// weight 0 at every step before the blob (checked apart) keeps it.
    pub(super) fn history_over(
        &self,
        plan_step: u64,
        weights_end: u64,
        over: Option<&[usize]>,
    ) -> u64 {
        let end = weights_end.max(plan_step);
        let mut words: Vec<u64> = vec![plan_step.min(1)];
        if end > 0 {
            let mut at: Vec<u64> = vec![0, end - 1];
            at.extend(self.mixer.schedule.knots_before(end));
            at.sort_unstable();
            at.dedup();
            // Raw weights, not shares: with the weights at the last step before the
            // cursor and at every bend, the lines in between are fixed; shares alone
            // miss a ramp whose far end moved along the same line (tests/plan_props.rs,
            // cursor_history_catches_a_reparametrized_ramp).
            for s in at {
                words.push(s);
                let w = self.mixer.schedule.weights(s);
                match over {
                    None => words.extend(w.iter().map(|w| w.to_bits())),
                    Some(over) => words.extend(
                        over.iter()
                            .map(|&d| w.get(d).copied().unwrap_or(0.0).to_bits()),
                    ),
                }
            }
        }
        // Stages shape rows from their step on and the mixer's counts of bursty cycles
        // reaching them, like weights.
        words.extend(self.stage_words(end, over));
        for &(a, b) in &self.skips {
            if a < plan_step {
                words.extend([a, b.min(plan_step)]);
            }
        }
        for &(s, seed) in &self.reseeds {
            if s < plan_step {
                words.extend([s, seed]);
            }
        }
        derive_key(&words)
    }
}

/// Lets the planner read a mapped shard (validated before planning).
impl DocSource for crate::corpus::Shard {
    fn documents(&self) -> u64 {
        crate::corpus::Shard::documents(self)
    }
    fn tokens(&self) -> u64 {
        crate::corpus::Shard::tokens(self)
    }
    fn doc_len(&self, doc: u64) -> u64 {
        // Validated shards cannot fail here; 0 keeps an impossible error harmless.
        self.doc_len_validated(doc)
    }
    fn prefetch_len(&self, doc: u64) {
        crate::corpus::Shard::prefetch_len(self, doc)
    }
    fn groups(&self) -> Option<&[crate::corpus::GroupRun]> {
        crate::corpus::Shard::groups(self).map(|g| g.runs())
    }
}
