//! `[[plan.schedule]]`: the weight points of a run, as written (with `ramp = false`
//! step changes) and as the planner reads them (points only), and the notes that name a
//! point the way the user wrote it. Pure data and checks, like the rest of `[plan]`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

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

/// A `[[plan.schedule]]` entry as written: a point, and whether the weights ramp into it.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WrittenPoint {
    step: u64,
    weights: BTreeMap<String, f64>,
    #[serde(default = "ramps")]
    ramp: bool,
}

fn ramps() -> bool {
    true
}

/// Reads `[[plan.schedule]]`, turning `ramp = false` into a step change: a copy of the
/// previous point's weights one step before, so they hold until the new weights start.
/// Written as two points a step change is the same schedule to everything downstream
/// (the planner, reloads, the journal in cursor blobs), so nothing else needs to know.
pub(super) fn schedule_with_steps<'de, D>(d: D) -> Result<Vec<SchedulePoint>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    use serde::de::Error;
    let written = Vec::<WrittenPoint>::deserialize(d)?;
    let mut out: Vec<SchedulePoint> = Vec::with_capacity(written.len());
    for (i, p) in written.into_iter().enumerate() {
        if !p.ramp {
            let Some(prev) = out.last() else {
                return Err(D::Error::custom(format!(
                    "plan.schedule[{i}].ramp = false: the first point has no weights before \
                     it to hold"
                )));
            };
            if p.step > prev.step.saturating_add(1) {
                let held = SchedulePoint {
                    step: p.step - 1,
                    weights: prev.weights.clone(),
                };
                out.push(held);
            }
        }
        out.push(SchedulePoint {
            step: p.step,
            weights: p.weights,
        });
    }
    Ok(out)
}

/// For each of `points`, the index of the `[[plan.schedule]]` entry it was written as;
/// `None` for the copy of the previous weights that [`schedule_with_steps`] adds one step
/// before an entry with `ramp = false`, so errors and warnings name what the user wrote
/// and never a point they did not. A held copy is a point after a lower step with that
/// point's weights, one step before the next point: a hold written out by hand is the
/// same schedule and reads the same (its warnings would repeat the previous entry's).
pub(super) fn written_indices(points: &[SchedulePoint]) -> Vec<Option<usize>> {
    let mut written = 0;
    (0..points.len())
        .map(|i| {
            let held = i > 0
                && points.get(i + 1).is_some_and(|next| {
                    let (prev, p) = (&points[i - 1], &points[i]);
                    prev.step < p.step
                        && p.step.checked_add(1) == Some(next.step)
                        && p.weights == prev.weights
                });
            if held {
                return None;
            }
            written += 1;
            Some(written - 1)
        })
        .collect()
}

/// Why a schedule edit reaches back to step `at`, when the cause is a ramp: `at` is the
/// step after a point whose weights now ramp towards a later point, which surprises
/// whoever added that later point expecting a change there. `None` for other causes.
pub fn ramp_note(new: &[SchedulePoint], at: u64) -> Option<String> {
    let prev = new.iter().rev().find(|p| p.step < at)?;
    let next = new.iter().find(|p| p.step > at)?;
    // A point at `at` is the difference itself; equal weights at both ends are no ramp
    // (the copy a `ramp = false` entry holds is such an end).
    if prev.step.checked_add(1) != Some(at)
        || new.iter().any(|p| p.step == at)
        || prev.weights == next.weights
    {
        return None;
    }
    Some(format!(
        "weights ramp linearly between the points at steps {} and {}, so the point at step \
         {} changes every step from {at} on; to change them at step {} only, add \
         `ramp = false` to that [[plan.schedule]] entry (the weights of step {} then hold \
         until step {})",
        prev.step,
        next.step,
        next.step,
        next.step,
        prev.step,
        next.step - 1
    ))
}
