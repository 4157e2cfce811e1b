//! The plan's settings: the `[plan]` table and the per-domain planning keys of
//! `[[corpus.domain]]`, parsed with serde and checked before anything is planned.
//!
//! Every check names the field it rejects, because a config is usually edited by hand
//! minutes before a thousand GPUs start on it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A rejected setting: the dotted field and what is wrong with it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{field}: {what}")]
pub struct SettingError {
    /// Dotted field path, e.g. `plan.schedule[1].weights.code`.
    pub field: String,
    /// What is wrong.
    pub what: String,
}

fn bad(field: impl Into<String>, what: impl Into<String>) -> SettingError {
    SettingError {
        field: field.into(),
        what: what.into(),
    }
}

/// How documents become rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Packing {
    /// Megatron's concatenate-and-chunk: no padding, documents cut at row edges.
    Concat,
    /// Best-fit-decreasing over a bounded window: only documents longer than a row are cut.
    #[default]
    BestFit,
}

/// How a domain's repo/book groups are kept together.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GroupMode {
    /// Documents are shuffled one by one.
    #[default]
    Off,
    /// A group's documents, in reading order, form one long unit filling consecutive rows.
    Sequence,
    /// As `sequence`, and all of a group's rows land in one global batch (or consecutive
    /// ones when it is larger than its cap).
    Batch,
}

/// `grouping = { mode, max_share, from_step }` on a domain.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Grouping {
    /// off, sequence or batch.
    #[serde(default)]
    pub mode: GroupMode,
    /// In `batch` mode, the largest fraction of one global batch a single group may take.
    #[serde(default = "default_max_share")]
    pub max_share: f64,
    /// Grouping starts at this step (the field notes advise late in training); before it
    /// the domain's documents are shuffled one by one.
    #[serde(default)]
    pub from_step: u64,
}

fn default_max_share() -> f64 {
    0.25
}

impl Default for Grouping {
    fn default() -> Self {
        Grouping {
            mode: GroupMode::Off,
            max_share: default_max_share(),
            from_step: 0,
        }
    }
}

/// `upsample_long = { min_tokens, factor }`: per-source length upsampling (Fu et al. 2024).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Upsample {
    /// Units longer than this many tokens are repeated.
    pub min_tokens: u64,
    /// How many times each such unit appears per epoch (2 or more).
    pub factor: u32,
}

/// `bursty = { period }`: the domain takes all of a `period`-step cycle's rows in the
/// cycle's first step and none in the others (the field notes' "10% of one batch, then
/// skip two"), keeping its long-run share exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bursty {
    /// Steps per cycle (2 or more).
    pub period: u32,
}

/// Planning keys of one `[[corpus.domain]]`.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct DomainSettings {
    /// Repo/book grouping.
    #[serde(default)]
    pub grouping: Grouping,
    /// Long-document upsampling.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upsample_long: Option<Upsample>,
    /// Bursty exposure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bursty: Option<Bursty>,
    /// Units per packing window for this domain (default: `plan.best_fit_window`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<u64>,
}

/// `[[plan.schedule]]`: the token weights in force at `step`; weights ramp linearly to
/// the next point and stay after the last.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SchedulePoint {
    /// Global step of this point.
    pub step: u64,
    /// Token share per domain name; normalised, so they need not sum to 1. A domain left
    /// out has weight 0 at this point.
    pub weights: BTreeMap<String, f64>,
}

/// `[[plan.skip]]`: global steps whose data is planned but never delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Skip {
    /// `[first, last]`, inclusive, in the numbering of the unskipped stream.
    pub steps: [u64; 2],
}

/// `[[plan.reseed]]`: from `step` on, what remains of every domain's epoch is shuffled
/// again with `seed` (loss-spike recovery), without repeating or dropping data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reseed {
    /// First trainer step that sees the new order.
    pub step: u64,
    /// The new seed.
    pub seed: u64,
}

/// `[plan]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanConfig {
    /// Root of all randomness.
    #[serde(default)]
    pub seed: u64,
    /// Tokens a row trains on; a row holds `seq_len + 1` tokens (inputs and labels).
    pub seq_len: u32,
    /// Rows per global batch, over all data-parallel ranks.
    pub global_batch_rows: u32,
    /// concat or best_fit.
    #[serde(default)]
    pub packing: Packing,
    /// Units per packing window (both packings); bounds memory and resume cost.
    #[serde(default = "default_window")]
    pub best_fit_window: u64,
    /// End-of-document id, for the materializer's checks and masks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eod_token: Option<u64>,
    /// Id written into padding.
    #[serde(default)]
    pub pad_token: u64,
    /// Ids the trainer's embedding accepts (`0..vocab_size`): the materializer fails a
    /// ring rather than deliver one outside it. Not part of the fingerprint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vocab_size: Option<u64>,
    /// Constant weights, shorthand for a one-point schedule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weights: Option<BTreeMap<String, f64>>,
    /// Weight schedule.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub schedule: Vec<SchedulePoint>,
    /// Skipped step ranges.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub skip: Vec<Skip>,
    /// Reseeds.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reseed: Vec<Reseed>,
}

fn default_window() -> u64 {
    65536
}

/// Largest `seq_len` accepted: rows are indexed with u32 offsets.
pub const MAX_SEQ_LEN: u32 = 1 << 24;
/// Largest global batch accepted.
pub const MAX_BATCH_ROWS: u32 = 1 << 20;
/// Largest `vocab_size` accepted: ids must fit int32 outputs' positive range.
pub const MAX_VOCAB: u64 = 1 << 31;
/// Largest packing window accepted, in units.
pub const MAX_WINDOW: u64 = 1 << 24;

impl PlanConfig {
    /// Parses the `[plan]` table.
    pub fn from_table(table: &toml::Table) -> Result<PlanConfig, SettingError> {
        PlanConfig::deserialize(toml::Value::Table(table.clone()))
            .map_err(|e| bad("plan", e.to_string().trim().to_string()))
    }

    /// The schedule as points, with the `weights` shorthand folded in.
    pub fn points(&self) -> Vec<SchedulePoint> {
        match (&self.weights, self.schedule.is_empty()) {
            (Some(w), true) => vec![SchedulePoint {
                step: 0,
                weights: w.clone(),
            }],
            _ => self.schedule.clone(),
        }
    }

    /// Checks every field against the domain names it will be used with.
    pub fn validate(&self, domains: &[(&str, DomainSettings)]) -> Result<(), SettingError> {
        if self.seq_len < 1 || self.seq_len > MAX_SEQ_LEN {
            return Err(bad(
                "plan.seq_len",
                format!("{} is outside 1..={MAX_SEQ_LEN}", self.seq_len),
            ));
        }
        if self.global_batch_rows < 1 || self.global_batch_rows > MAX_BATCH_ROWS {
            return Err(bad(
                "plan.global_batch_rows",
                format!("{} is outside 1..={MAX_BATCH_ROWS}", self.global_batch_rows),
            ));
        }
        if self.best_fit_window < 1 || self.best_fit_window > MAX_WINDOW {
            return Err(bad(
                "plan.best_fit_window",
                format!("{} is outside 1..={MAX_WINDOW}", self.best_fit_window),
            ));
        }
        if let Some(v) = self.vocab_size {
            if !(1..=MAX_VOCAB).contains(&v) {
                return Err(bad(
                    "plan.vocab_size",
                    format!("{v} is outside 1..={MAX_VOCAB}"),
                ));
            }
            for (field, id) in [
                ("pad_token", Some(self.pad_token)),
                ("eod_token", self.eod_token),
            ] {
                if let Some(id) = id.filter(|&id| id >= v) {
                    return Err(bad(
                        format!("plan.{field}"),
                        format!("{id} is not below plan.vocab_size = {v}"),
                    ));
                }
            }
        }
        if self.weights.is_some() && !self.schedule.is_empty() {
            return Err(bad(
                "plan.weights",
                "give either plan.weights or [[plan.schedule]], not both",
            ));
        }
        let points = self.points();
        if points.is_empty() {
            return Err(bad(
                "plan.schedule",
                "no weights: add plan.weights or at least one [[plan.schedule]]",
            ));
        }
        let names: Vec<&str> = domains.iter().map(|(n, _)| *n).collect();
        for (i, p) in points.iter().enumerate() {
            let field = if self.schedule.is_empty() {
                "plan".to_string()
            } else {
                format!("plan.schedule[{i}]")
            };
            if i > 0 && p.step <= points[i - 1].step {
                return Err(bad(
                    format!("{field}.step"),
                    format!(
                        "steps must increase: {} follows {}",
                        p.step,
                        points[i - 1].step
                    ),
                ));
            }
            validate_weights(&p.weights, &names, &field)?;
        }
        for (i, s) in self.skip.iter().enumerate() {
            if s.steps[0] > s.steps[1] {
                return Err(bad(
                    format!("plan.skip[{i}].steps"),
                    format!("first step {} is after last {}", s.steps[0], s.steps[1]),
                ));
            }
            if i > 0 && s.steps[0] <= self.skip[i - 1].steps[1] {
                return Err(bad(
                    format!("plan.skip[{i}].steps"),
                    "ranges must be in order and must not overlap",
                ));
            }
        }
        for (i, r) in self.reseed.iter().enumerate() {
            if i > 0 && r.step <= self.reseed[i - 1].step {
                return Err(bad(
                    format!("plan.reseed[{i}].step"),
                    "reseeds must be in increasing step order",
                ));
            }
        }
        for (i, (name, d)) in domains.iter().enumerate() {
            let field = format!("corpus.domain[{i}]");
            let g = &d.grouping;
            if !(g.max_share > 0.0 && g.max_share <= 1.0) {
                return Err(bad(
                    format!("{field}.grouping.max_share"),
                    format!("{} is outside (0, 1]", g.max_share),
                ));
            }
            if g.mode == GroupMode::Batch && self.packing == Packing::Concat {
                return Err(bad(
                    format!("{field}.grouping.mode"),
                    format!("domain {name}: batch grouping needs packing = \"best_fit\""),
                ));
            }
            if let Some(u) = d.upsample_long {
                if u.factor < 2 {
                    return Err(bad(
                        format!("{field}.upsample_long.factor"),
                        format!("{} must be 2 or more", u.factor),
                    ));
                }
                if u.factor > 1000 {
                    return Err(bad(
                        format!("{field}.upsample_long.factor"),
                        format!("{} is more than 1000", u.factor),
                    ));
                }
            }
            if let Some(b) = d.bursty {
                if b.period < 2 || b.period > 10_000 {
                    return Err(bad(
                        format!("{field}.bursty.period"),
                        format!("{} is outside 2..=10000", b.period),
                    ));
                }
            }
            if let Some(w) = d.window {
                if !(1..=MAX_WINDOW).contains(&w) {
                    return Err(bad(
                        format!("{field}.window"),
                        format!("{w} is outside 1..={MAX_WINDOW}"),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Checks one set of weights: known domains, finite, non-negative, not all zero. Live
/// reloads use the same check.
pub fn validate_weights(
    weights: &BTreeMap<String, f64>,
    domains: &[&str],
    field: &str,
) -> Result<(), SettingError> {
    let mut total = 0.0;
    for (name, &w) in weights {
        if !domains.contains(&name.as_str()) {
            return Err(bad(
                format!("{field}.weights.{name}"),
                format!("no such domain (domains: {})", domains.join(", ")),
            ));
        }
        if !w.is_finite() || w < 0.0 {
            return Err(bad(
                format!("{field}.weights.{name}"),
                format!("{w} is not a finite non-negative number"),
            ));
        }
        total += w;
    }
    if total <= 0.0 || !total.is_finite() {
        return Err(bad(
            format!("{field}.weights"),
            "weights are all zero (or overflow): nothing to sample",
        ));
    }
    Ok(())
}
