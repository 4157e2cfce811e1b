//! `[[plan.stage]]`: the shape a run switches to at a plan step (a long-context stage),
//! and each stage's per-domain upsampling, parsed and checked like the rest of `[plan]`.
//! Pure data and checks, part of what the planner reads (`src/plan/stage.rs` applies it).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{
    bad, PlanConfig, SettingError, Upsample, MAX_BATCH_ROWS, MAX_SEQ_LEN, MAX_STEP, MAX_WINDOW,
};

/// A stage's long-document upsampling for one domain (`[[plan.stage]] upsample_long =
/// { code = { min_tokens, factor }, web = "off" }`): it applies from the domain's first
/// epoch that begins at or after the stage's step (docs/DESIGN.md, "Stages").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StageUpsample {
    /// `"off"`: no unit is repeated.
    Off,
    /// `{ min_tokens, factor }`: units longer than `min_tokens` appear `factor` times
    /// per epoch (factor 1 is the same as off).
    Long(Upsample),
}

impl StageUpsample {
    /// The setting as a domain's `upsample_long` says it: `None` for off or factor 1.
    pub fn setting(self) -> Option<Upsample> {
        match self {
            StageUpsample::Long(u) if u.factor > 1 => Some(u),
            _ => None,
        }
    }
}

impl Serialize for StageUpsample {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            StageUpsample::Off => s.serialize_str("off"),
            StageUpsample::Long(u) => u.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for StageUpsample {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = StageUpsample;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("\"off\" or { min_tokens, factor }")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<StageUpsample, E> {
                match v {
                    "off" => Ok(StageUpsample::Off),
                    _ => Err(E::invalid_value(serde::de::Unexpected::Str(v), &self)),
                }
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<StageUpsample, A::Error> {
                let d = serde::de::value::MapAccessDeserializer::new(map);
                Upsample::deserialize(d).map(StageUpsample::Long)
            }
        }
        d.deserialize_any(V)
    }
}

/// `[[plan.stage]]`: from plan step `step` on, rows have another shape (a long-context
/// stage). Each domain's epoch continues across the switch (docs/DESIGN.md, "Stages").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stage {
    /// First plan step (unskipped numbering, as schedules use) with the new shape.
    pub step: u64,
    /// Tokens a row trains on from `step` on.
    pub seq_len: u32,
    /// Rows per global batch from `step` on.
    pub global_batch_rows: u32,
    /// Units per packing window from `step` on (default: the previous stage's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub best_fit_window: Option<u64>,
    /// In `sequence`-grouped domains (best_fit), chain units longer than a row: a
    /// window's long groups run on in one stream of full rows, a book's end and the next
    /// one's start sharing a row, instead of each ending in a row topped up with short
    /// units (which pads where a domain has few: books at 131072 tokens).
    #[serde(default)]
    pub chain_groups: bool,
    /// Per domain, the long-document upsampling of its epochs that begin from `step` on
    /// (a domain not named keeps the previous stage's; the first stage's is the
    /// domain's own `upsample_long`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub upsample_long: BTreeMap<String, StageUpsample>,
}

/// Most `[[plan.stage]]` entries: a recipe has two or three; each costs a packed window
/// per domain at plan build and a few words in every cursor.
pub const MAX_STAGES: usize = 16;

/// Most tokens one step may hold (`global_batch_rows` rows of `seq_len + 1`):
/// `cu_seqlens` is int32 over a rank's flattened step, as are the flattened positions a
/// client derives them from (`seq_len + 1` per row), and one rank may take the whole
/// step (dp 1), so a step of 2^31 tokens or more would wrap them.
pub const MAX_STEP_TOKENS: u64 = i32::MAX as u64;

/// Why a step of `rows` rows of `seq_len` tokens cannot be served, if it cannot: its
/// tokens pass [`MAX_STEP_TOKENS`]. `[plan]`, `[[plan.stage]]` and a live stage change
/// all judge their shape by it.
pub fn step_tokens_problem(seq_len: u32, rows: u32) -> Option<String> {
    let tokens = (seq_len as u64 + 1) * rows as u64;
    (tokens > MAX_STEP_TOKENS).then(|| {
        format!(
            "{rows} with seq_len {seq_len} makes a step of {tokens} tokens ({rows} x \
             {}), over {MAX_STEP_TOKENS}: cu_seqlens is int32 over a rank's step, and \
             one rank may take it all (fewer rows or a shorter seq_len)",
            seq_len as u64 + 1
        )
    })
}

impl PlanConfig {
    /// Checks `[[plan.stage]]`: steps after 0 and increasing, shapes in range; and that
    /// no stage's step (`[plan]`'s own included) passes [`MAX_STEP_TOKENS`].
    pub(super) fn validate_stages(&self) -> Result<(), SettingError> {
        if let Some(why) = step_tokens_problem(self.seq_len, self.global_batch_rows) {
            return Err(bad("plan.global_batch_rows", why));
        }
        if self.stage.len() > MAX_STAGES {
            return Err(bad(
                "plan.stage",
                format!("{} stages, at most {MAX_STAGES}", self.stage.len()),
            ));
        }
        let mut prev = 0u64;
        for (i, st) in self.stage.iter().enumerate() {
            let field = format!("plan.stage[{i}]");
            if st.step <= prev {
                let what = if i == 0 {
                    "must be after step 0 (the first stage is [plan] itself)".to_string()
                } else {
                    format!("steps must increase: {} follows {prev}", st.step)
                };
                return Err(bad(format!("{field}.step"), what));
            }
            if st.step > MAX_STEP {
                return Err(bad(
                    format!("{field}.step"),
                    format!("{} is beyond {MAX_STEP}", st.step),
                ));
            }
            prev = st.step;
            if st.seq_len < 1 || st.seq_len > MAX_SEQ_LEN {
                return Err(bad(
                    format!("{field}.seq_len"),
                    format!("{} is outside 1..={MAX_SEQ_LEN}", st.seq_len),
                ));
            }
            if st.global_batch_rows < 1 || st.global_batch_rows > MAX_BATCH_ROWS {
                return Err(bad(
                    format!("{field}.global_batch_rows"),
                    format!("{} is outside 1..={MAX_BATCH_ROWS}", st.global_batch_rows),
                ));
            }
            if let Some(why) = step_tokens_problem(st.seq_len, st.global_batch_rows) {
                return Err(bad(format!("{field}.global_batch_rows"), why));
            }
            if let Some(w) = st.best_fit_window.filter(|w| !(1..=MAX_WINDOW).contains(w)) {
                return Err(bad(
                    format!("{field}.best_fit_window"),
                    format!("{w} is outside 1..={MAX_WINDOW}"),
                ));
            }
        }
        Ok(())
    }
}

impl PlanConfig {
    /// Checks each stage's `upsample_long`: domains of the corpus, factors 1..=1000.
    pub(super) fn validate_stage_upsampling(&self, domains: &[&str]) -> Result<(), SettingError> {
        for (i, st) in self.stage.iter().enumerate() {
            for (name, u) in &st.upsample_long {
                let field = format!("plan.stage[{i}].upsample_long.{name}");
                if !domains.contains(&name.as_str()) {
                    return Err(bad(
                        field,
                        format!(
                            "stage at step {}: no such domain {name} (domains: {})",
                            st.step,
                            domains.join(", ")
                        ),
                    ));
                }
                if let StageUpsample::Long(u) = u {
                    if !(1..=1000).contains(&u.factor) {
                        return Err(bad(
                            format!("{field}.factor"),
                            format!("{} is outside 1..=1000", u.factor),
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}
