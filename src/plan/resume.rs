//! Resuming from a cursor blob: decoding it once and checking it against this plan
//! (fingerprint, journal, history, structure) before a planner continues from it.

use std::sync::Arc;

use super::cursor::{self, CursorError};
use super::journal::{self, Change};
use super::mix;
use super::planner::Planner;
use super::stream::Stream;
use super::Plan;

impl Plan {
    /// A planner restored from a cursor blob.
    pub fn restore(self: &Arc<Self>, blob: &[u8]) -> Result<Planner, CursorError> {
        let c = cursor::decode(blob)?;
        if c.fingerprint != self.fingerprint {
            return Err(CursorError::Fingerprint {
                blob: c.fingerprint,
                ours: self.fingerprint,
            });
        }
        match journal::compare(&self.journal, self.superseded, &c.journal, c.superseded) {
            journal::Order::Same => {}
            journal::Order::OursAhead => {
                // Later changes are fine as long as they leave the blob's past alone.
                let extra = &self.journal[journal::common_prefix(&self.journal, &c.journal)..];
                if let Some(ch) = extra.iter().find(|ch| ch.at < c.plan_step) {
                    return Err(CursorError::Journal(format!(
                        "this plan carries a change from plan step {} that the blob (at plan \
                         step {}) does not: it would rewrite batches the blob's run already \
                         received",
                        ch.at, c.plan_step
                    )));
                }
            }
            journal::Order::TheirsAhead => {
                return Err(CursorError::Journal(format!(
                    "the blob carries {} live changes, this plan only {}: load the blob's \
                     journal first",
                    c.journal.len(),
                    self.journal.len()
                )))
            }
            journal::Order::Diverged(i) => {
                let at = |j: &[Change]| {
                    j.get(i)
                        .map_or("none".to_string(), |c| format!("from plan step {}", c.at))
                };
                return Err(CursorError::Journal(format!(
                    "change #{} differs (blob: {}, daemon: {}; {} and {} changes accepted in \
                     all); the two runs received different changes",
                    i + 1,
                    at(&c.journal),
                    at(&self.journal),
                    c.journal.len() as u64 + c.superseded,
                    self.journal.len() as u64 + self.superseded,
                )));
            }
        }
        let ours = self.history(c.plan_step);
        if c.history != ours {
            return Err(CursorError::History {
                step: c.step,
                blob: c.history,
                ours,
            });
        }
        // The blob's plan step may trail the step's mapping only by skipped steps (a
        // skip that starts where the blob stopped, added before the resume).
        let expected = self.plan_step_of(c.step);
        if c.streams.len() != self.domains.len()
            || c.plan_step > expected
            || !self.all_skipped(c.plan_step, expected)
        {
            return Err(CursorError::Malformed(format!(
                "{} domains at step {} (plan step {}) do not fit this plan ({} domains, plan step {expected})",
                c.streams.len(),
                c.step,
                c.plan_step,
                self.domains.len()
            )));
        }
        // A carried error is below one burst cycle's rows in any real run; a larger one
        // is forged and would make the mixer spin, so it is refused.
        let bound = (self.cfg.global_batch_rows as i64 + 1) * mix::TICKS * 10_001;
        if c.mix
            .deficit
            .iter()
            .any(|d| d.unsigned_abs() > bound as u64)
        {
            return Err(CursorError::Malformed(
                "mixer carried error out of range".into(),
            ));
        }
        let mut p = Planner {
            plan: self.clone(),
            step: c.step,
            plan_step: c.plan_step,
            mix: c.mix,
            streams: c.streams.into_iter().map(Stream::new).collect(),
        };
        // Structural checks that need the packed window.
        for (d, s) in p.streams.iter_mut().enumerate() {
            s.check(&self.domains[d], self.geometry).map_err(|e| {
                CursorError::Malformed(format!("domain {}: {e}", self.domains[d].name))
            })?;
        }
        Ok(p)
    }
}
