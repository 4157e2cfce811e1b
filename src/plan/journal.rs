//! The change journal: every live mixture change a run has accepted, in order.
//!
//! A change is "from plan step `at` on, the weights follow this curve". The journal lives
//! in the [`Plan`](super::Plan) (which overlays it on the config's schedule) and in every
//! cursor blob, so a trainer resuming after a reload gets the same stream even from a
//! daemon that never saw the reload, and two nodes given the same changes plan the same
//! batches. Changes compare bit for bit: two journals agree when one is a prefix of the
//! other, or when the newer one dropped a tail of the older that a later change
//! superseded ([`append`], [`compare`]).
//!
//! A change may instead add a stage ([`StageChange`]): "from plan step `at` on, rows have
//! this shape", a `[[plan.stage]]` added live. It layers over the stages like a weights
//! change over the schedule (every stage at or after `at` gives way to it), and follows
//! the same agreement rules; it supersedes only stage changes, never weights.

use super::mix::Points;
use crate::config::plan::MAX_STEP;

/// Most changes one journal may hold: a blob's lists hold at most 4096 entries. What
/// fits in practice is set by the bytes the daemon reserves for the journal (`[serve]
/// live_changes`), since every blob carries the whole journal.
pub const MAX_CHANGES: usize = 4096;
/// Most points one change's curve may hold.
pub const MAX_POINTS: usize = 64;

/// One accepted change of the mixture.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    /// First plan step the change shapes.
    pub at: u64,
    /// The weights from `at` on: `(plan step, raw weight per domain)`, the first at `at`.
    /// Empty for a stage change.
    pub points: Points,
    /// The stage this change adds at `at` (then `points` is empty), so a long-context
    /// stage can start without a restart.
    pub stage: Option<StageChange>,
}

/// The row shape a stage change puts in force, as `[[plan.stage]]` spells it (the
/// window resolved: a live change names it or keeps the one in force).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StageChange {
    /// Tokens a row trains on.
    pub seq_len: u32,
    /// Rows per global batch.
    pub rows: u32,
    /// Units per packing window.
    pub window: u64,
    /// Whether `sequence`-grouped domains chain their long groups.
    pub chain_groups: bool,
}

impl Change {
    /// Bitwise equality, so NaN-free weights compare exactly as the blob stores them.
    fn same(&self, other: &Change) -> bool {
        self.at == other.at
            && self.stage == other.stage
            && self.points.len() == other.points.len()
            && self.points.iter().zip(&other.points).all(|(a, b)| {
                a.0 == b.0
                    && a.1.len() == b.1.len()
                    && a.1
                        .iter()
                        .zip(&b.1)
                        .all(|(x, y)| x.to_bits() == y.to_bits())
            })
    }

    /// Structural checks against a plan of `domains` domains; the error names the fault.
    pub fn check(&self, domains: usize) -> Result<(), ChangeError> {
        let at = self.at;
        if let Some(st) = self.stage {
            return check_stage(at, st, self.points.len());
        }
        if self.points.is_empty() || self.points.len() > MAX_POINTS {
            return Err(ChangeError::Points {
                at,
                points: self.points.len(),
            });
        }
        if self.points[0].0 != at {
            return Err(ChangeError::CurveStart {
                at,
                start: self.points[0].0,
            });
        }
        for (i, (step, w)) in self.points.iter().enumerate() {
            let step = *step;
            if i > 0 && step <= self.points[i - 1].0 {
                return Err(ChangeError::Unordered {
                    at,
                    step,
                    previous: self.points[i - 1].0,
                });
            }
            if w.len() != domains {
                return Err(ChangeError::Weights {
                    at,
                    weights: w.len(),
                    domains,
                });
            }
            if w.iter().any(|x| !x.is_finite() || *x < 0.0) {
                return Err(ChangeError::NotFinite { at });
            }
            let sum = w.iter().sum::<f64>();
            if sum <= 0.0 {
                return Err(ChangeError::AllZero { at, step });
            }
            // Weights each finite can still sum to infinity (1e308 twice), which would
            // make every share 0 (as the config's check refuses).
            if !sum.is_finite() {
                return Err(ChangeError::NotFinite { at });
            }
        }
        Ok(())
    }
}

/// A stage change's checks: the bounds `[[plan.stage]]` has, after step 0, no weights.
fn check_stage(at: u64, st: StageChange, points: usize) -> Result<(), ChangeError> {
    use crate::config::plan::{MAX_BATCH_ROWS, MAX_SEQ_LEN, MAX_WINDOW};
    let bad = |field: &'static str, what: String| ChangeError::Stage { at, field, what };
    if points != 0 {
        return Err(bad(
            "weights",
            format!("{points} points (a stage change carries none)"),
        ));
    }
    if at == 0 || at > MAX_STEP {
        return Err(bad(
            "step",
            format!("must be in 1..={MAX_STEP} (step 0's shape is [plan]'s)"),
        ));
    }
    if !(1..=MAX_SEQ_LEN).contains(&st.seq_len) {
        return Err(bad(
            "seq_len",
            format!("{} is outside 1..={MAX_SEQ_LEN}", st.seq_len),
        ));
    }
    if !(1..=MAX_BATCH_ROWS).contains(&st.rows) {
        let what = format!("{} is outside 1..={MAX_BATCH_ROWS}", st.rows);
        return Err(bad("global_batch_rows", what));
    }
    if let Some(why) = crate::config::plan::step_tokens_problem(st.seq_len, st.rows) {
        return Err(bad("global_batch_rows", why));
    }
    if !(1..=MAX_WINDOW).contains(&st.window) {
        let what = format!("{} is outside 1..={MAX_WINDOW}", st.window);
        return Err(bad("best_fit_window", what));
    }
    Ok(())
}

/// Most plan steps a change a cursor blob carries may reach past the blob's own plan
/// step. A live change may name a step at most [`MAX_STEP`] past the first changeable
/// step, which is at most the fastest rank's step; a rank's blob may lag that rank, and
/// plan steps run ahead of trainer steps by the skipped ranges: twice the bound leaves
/// room for both. A change reaching farther (one at 2^64-1) no daemon accepted, so the
/// blob is forged or corrupt, and adopting it would sit in every blob of the run.
pub const BLOB_HORIZON: u64 = 2 * MAX_STEP;

/// Most superseded changes a cursor blob may claim: a change supersedes only changes
/// accepted before it, so the count is below the changes a run accepted, and 2^32 of
/// those (one every 9 ms, the hub lock's time per change, for over a year) is more than
/// any run makes. A larger count is forged or corrupt; adopted, it saturated the
/// daemon's count, after which its own rings' cursors compared as diverged and every
/// later live change was refused `busy`.
pub const MAX_SUPERSEDED: u64 = MAX_STEP;

/// Refuses what a cursor blob may not bring into a daemon's journal: a change (its
/// start or any point) reaching more than [`BLOB_HORIZON`] plan steps past `plan_step`,
/// the blob's own, or a superseded count above [`MAX_SUPERSEDED`].
pub fn check_carried(
    journal: &[Change],
    superseded: u64,
    plan_step: u64,
) -> Result<(), ChangeError> {
    if superseded > MAX_SUPERSEDED {
        return Err(ChangeError::Superseded {
            count: superseded,
            max: MAX_SUPERSEDED,
        });
    }
    let max = plan_step.saturating_add(BLOB_HORIZON);
    for c in journal {
        let reach = c.points.iter().map(|p| p.0).fold(c.at, u64::max);
        if reach > max {
            return Err(ChangeError::Reach {
                at: c.at,
                reach,
                plan_step,
                horizon: BLOB_HORIZON,
            });
        }
    }
    Ok(())
}

/// Why a change cannot apply to a plan: each names the change by its first plan step
/// (a blob's superseded count, which is no one change's, by its value).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChangeError {
    /// No points, or more than [`MAX_POINTS`].
    #[error("change at plan step {at} has {points} points (1..={MAX_POINTS} allowed)")]
    Points {
        /// The change's first plan step.
        at: u64,
        /// Points it holds.
        points: usize,
    },
    /// The curve does not start where the change does.
    #[error("change at plan step {at} starts its curve at step {start}")]
    CurveStart {
        /// The change's first plan step.
        at: u64,
        /// The first point's step.
        start: u64,
    },
    /// Point steps that do not increase.
    #[error("change at plan step {at}: point steps must increase ({step} follows {previous})")]
    Unordered {
        /// The change's first plan step.
        at: u64,
        /// The point out of order.
        step: u64,
        /// The point before it.
        previous: u64,
    },
    /// Not one weight per domain.
    #[error("change at plan step {at}: {weights} weights for {domains} domains")]
    Weights {
        /// The change's first plan step.
        at: u64,
        /// Weights a point holds.
        weights: usize,
        /// Domains in the plan.
        domains: usize,
    },
    /// A negative, infinite or NaN weight, or weights whose sum is infinite.
    #[error("change at plan step {at}: weights must be finite and non-negative, and sum to a finite number")]
    NotFinite {
        /// The change's first plan step.
        at: u64,
    },
    /// Every weight of a point zero.
    #[error("change at plan step {at}: the weights at step {step} are all zero")]
    AllZero {
        /// The change's first plan step.
        at: u64,
        /// The point's step.
        step: u64,
    },
    /// A cursor blob's count of superseded changes above [`MAX_SUPERSEDED`]
    /// ([`check_carried`]).
    #[error("the journal claims {count} superseded changes, more than the {max} any run makes: the blob is forged or corrupt")]
    Superseded {
        /// The count the blob carries.
        count: u64,
        /// [`MAX_SUPERSEDED`].
        max: u64,
    },
    /// A change in a cursor blob reaching farther past the blob's step than any daemon
    /// accepts ([`check_carried`]).
    #[error("change at plan step {at} reaches plan step {reach}, more than {horizon} steps past the blob's plan step {plan_step}: no daemon accepts a change that far ahead, so the blob is forged or corrupt")]
    Reach {
        /// The change's first plan step.
        at: u64,
        /// The farthest step it names.
        reach: u64,
        /// The blob's plan step.
        plan_step: u64,
        /// [`BLOB_HORIZON`].
        horizon: u64,
    },
    /// A stage change with a field out of bounds.
    #[error("stage change at plan step {at}: {field} {what}")]
    Stage {
        /// The change's first plan step.
        at: u64,
        /// The field at fault, as `[[plan.stage]]` names it.
        field: &'static str,
        /// What is wrong with it.
        what: String,
    },
}

/// Appends `change`, dropping the changes it supersedes: the longest tail of `journal`
/// whose entries all start at or after `change.at` and are of its kind (weights or
/// stage). A layer cuts off every layer of its kind that starts at or after its own
/// start, so those entries can no longer shape any step, and the schedule (or the
/// stages) is the same with or without them. Returns how many were dropped; the
/// caller adds them to the journal's superseded count, which blobs carry, so that
/// superseded changes count toward no limit but still order journals ([`compare`]).
pub fn append(journal: &mut Vec<Change>, change: Change) -> u64 {
    let keep = journal
        .iter()
        .rposition(|c| c.at < change.at || c.stage.is_some() != change.stage.is_some())
        .map_or(0, |i| i + 1);
    let dropped = (journal.len() - keep) as u64;
    journal.truncate(keep);
    journal.push(change);
    dropped
}

/// How many leading changes two journals share, bit for bit.
pub fn common_prefix(a: &[Change], b: &[Change]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x.same(y)).count()
}

/// Whether `newer` (with `newer_sup` superseded changes) can be `older` (with
/// `older_sup`) plus later changes that dropped `older`'s tail after their common prefix
/// of `k` entries: the tail's drops are all counted in `newer_sup`, and the first new
/// change starts at or before every change of the dropped tail and is of their kind
/// ([`append`] drops only changes of the new one's kind, so a weights change never
/// replaces a stage change: journals that differ so have diverged).
fn descends(newer: &[Change], newer_sup: u64, older: &[Change], older_sup: u64, k: usize) -> bool {
    let tail = (older.len() - k) as u64;
    if newer_sup < older_sup.saturating_add(tail) {
        return false;
    }
    k == older.len()
        || newer.get(k).is_some_and(|n| {
            older[k..]
                .iter()
                .all(|c| c.at >= n.at && c.stage.is_some() == n.stage.is_some())
        })
}

/// How two journals relate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    /// Identical.
    Same,
    /// Ours holds every change of theirs and more.
    OursAhead,
    /// Theirs holds every change of ours and more.
    TheirsAhead,
    /// They differ at this index: neither can be trusted to describe the other's stream.
    Diverged(usize),
}

/// Compares two journals, each with its count of superseded changes. The one that has
/// accepted more changes in all (entries plus superseded) is ahead when it extends the
/// other, or dropped only a tail of it that one of its own changes superseded (see
/// [`append`]); with nothing superseded this is plain prefix order. Anything else, and
/// two different journals of the same count, have diverged.
pub fn compare(ours: &[Change], ours_sup: u64, theirs: &[Change], theirs_sup: u64) -> Order {
    let k = common_prefix(ours, theirs);
    let count = |j: &[Change], sup: u64| (j.len() as u64).saturating_add(sup);
    match count(ours, ours_sup).cmp(&count(theirs, theirs_sup)) {
        std::cmp::Ordering::Equal if k == ours.len() && k == theirs.len() => Order::Same,
        std::cmp::Ordering::Greater if descends(ours, ours_sup, theirs, theirs_sup, k) => {
            Order::OursAhead
        }
        std::cmp::Ordering::Less if descends(theirs, theirs_sup, ours, ours_sup, k) => {
            Order::TheirsAhead
        }
        _ => Order::Diverged(k),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ch(at: u64, w: f64) -> Change {
        Change {
            at,
            points: vec![(at, vec![w, 1.0])],
            stage: None,
        }
    }

    fn stage(at: u64, seq_len: u32) -> Change {
        Change {
            at,
            points: Vec::new(),
            stage: Some(StageChange {
                seq_len,
                rows: 4,
                window: 64,
                chain_groups: false,
            }),
        }
    }

    /// A stage change supersedes stage changes only, and a weights change weights only:
    /// dropping stops at the first entry of the other kind.
    #[test]
    fn stage_changes_supersede_their_own_kind() {
        let mut j = vec![ch(10, 0.5), stage(20, 128), ch(30, 0.9)];
        assert_eq!(append(&mut j, stage(15, 256)), 0);
        assert_eq!(j.len(), 4);
        assert_eq!(append(&mut j, stage(15, 512)), 1);
        assert_eq!(j[3], stage(15, 512));
        assert_eq!(append(&mut j, ch(12, 0.1)), 0);
        let before = j.clone();
        assert_eq!(compare(&j, 1, &before, 1), Order::Same);
        let mut other = before.clone();
        other[1] = stage(20, 64);
        assert_eq!(compare(&other, 1, &before, 1), Order::Diverged(1));
    }

    #[test]
    fn stage_checks_name_the_field() {
        assert!(stage(20, 128).check(2).is_ok());
        let e = stage(20, 0).check(2).unwrap_err();
        assert_eq!(
            e.to_string(),
            "stage change at plan step 20: seq_len 0 is outside 1..=16777216"
        );
        assert!(matches!(
            stage(0, 8).check(2),
            Err(ChangeError::Stage { field: "step", .. })
        ));
        let mut c = stage(20, 8);
        c.points.push((20, vec![1.0, 1.0]));
        assert!(matches!(
            c.check(2),
            Err(ChangeError::Stage {
                field: "weights",
                ..
            })
        ));
    }

    #[test]
    fn prefixes_order_journals() {
        let a = vec![ch(10, 0.5)];
        let b = vec![ch(10, 0.5), ch(20, 0.7)];
        assert_eq!(compare(&a, 0, &a, 0), Order::Same);
        assert_eq!(compare(&b, 0, &a, 0), Order::OursAhead);
        assert_eq!(compare(&a, 0, &b, 0), Order::TheirsAhead);
        assert_eq!(compare(&[ch(10, 0.25)], 0, &b, 0), Order::Diverged(0));
        assert_eq!(compare(&[], 0, &[], 0), Order::Same);
        // Without superseded changes, a journal whose tail differs has diverged.
        assert_eq!(compare(&[ch(5, 0.5)], 0, &a, 0), Order::Diverged(0));
    }

    /// A change drops the tail it supersedes; the journal it makes is ahead of every
    /// journal it came from, and one that dropped nothing of theirs is not.
    #[test]
    fn superseded_changes_are_dropped_and_still_order_journals() {
        let mut j = vec![ch(10, 0.5), ch(20, 0.7), ch(30, 0.9)];
        let before = j.clone();
        assert_eq!(append(&mut j, ch(20, 0.1)), 2);
        assert_eq!(j, vec![ch(10, 0.5), ch(20, 0.1)]);
        assert_eq!(compare(&j, 2, &before, 0), Order::OursAhead);
        assert_eq!(compare(&before, 0, &j, 2), Order::TheirsAhead);
        // The same change again supersedes the last: the journal stays two long.
        let mid = j.clone();
        for _ in 0..1000 {
            assert_eq!(append(&mut j, ch(20, 0.1)), 1);
        }
        assert_eq!(j.len(), 2);
        assert_eq!(compare(&j, 1002, &mid, 2), Order::OursAhead);
        // Same entries, same count: same; same count, other entries: diverged.
        assert_eq!(compare(&mid, 2, &mid, 2), Order::Same);
        let mut other = before.clone();
        append(&mut other, ch(20, 0.3));
        assert_eq!(compare(&other, 2, &mid, 2), Order::Diverged(1));
        // A later change that starts after the tail it claims to replace is no descent.
        assert_eq!(
            compare(&[ch(10, 0.5), ch(40, 0.1)], 2, &before, 0),
            Order::Diverged(1)
        );
        // Dropping is only ever of a tail: an earlier, lower entry stays.
        let mut k = vec![ch(50, 0.5), ch(5, 0.5)];
        assert_eq!(append(&mut k, ch(30, 0.2)), 0);
        assert_eq!(k.len(), 3);
    }

    /// A weights change never supersedes a stage change (nor the reverse), so a journal
    /// whose first new change is of the other kind than the tail it lacks did not come
    /// from it: a daemon that took a stage at 20 and one that took weights at 30 and then
    /// at 15 have diverged, though the second counts more changes, all starting earlier.
    #[test]
    fn a_change_of_the_other_kind_is_no_descent() {
        let staged = vec![stage(20, 64)];
        let mut weights = vec![ch(30, 0.5)];
        assert_eq!(append(&mut weights, ch(15, 0.2)), 1);
        assert_eq!(weights, vec![ch(15, 0.2)]);
        assert_eq!(compare(&weights, 1, &staged, 0), Order::Diverged(0));
        assert_eq!(compare(&staged, 0, &weights, 1), Order::Diverged(0));
        // The same kind does descend: a stage at 15 superseding the one at 20.
        let mut later = staged.clone();
        assert_eq!(append(&mut later, stage(15, 128)), 1);
        assert_eq!(compare(&later, 1, &staged, 0), Order::OursAhead);
    }

    /// A blob may carry a change ahead of its step (a change scheduled in advance), but
    /// none past the horizon: the refusal names the change and how far it reaches.
    #[test]
    fn a_blob_change_past_the_horizon_is_refused_by_name() {
        let mut far = ch(10, 0.5);
        far.points.push((10 + BLOB_HORIZON + 1, vec![1.0, 1.0]));
        assert_eq!(
            check_carried(
                &[ch(10, 0.5), ch(10 + BLOB_HORIZON, 0.5)],
                MAX_SUPERSEDED,
                10
            ),
            Ok(())
        );
        let e = check_carried(&[ch(10, 0.5), far], 0, 10).unwrap_err();
        assert!(
            matches!(e, ChangeError::Reach { at: 10, reach, .. } if reach == 11 + BLOB_HORIZON)
        );
        let e = check_carried(&[ch(u64::MAX, 0.5)], 0, 3).unwrap_err();
        assert!(e.to_string().starts_with(&format!(
            "change at plan step {} reaches plan step {}, more than {BLOB_HORIZON} steps past the blob's plan step 3",
            u64::MAX,
            u64::MAX
        )));
        assert_eq!(
            check_carried(&[], MAX_SUPERSEDED + 1, 3),
            Err(ChangeError::Superseded {
                count: MAX_SUPERSEDED + 1,
                max: MAX_SUPERSEDED
            })
        );
    }

    #[test]
    fn checks_name_the_fault() {
        assert!(ch(5, 0.5).check(2).is_ok());
        let e = ch(5, 0.5).check(3).unwrap_err();
        assert_eq!(
            e,
            ChangeError::Weights {
                at: 5,
                weights: 2,
                domains: 3
            }
        );
        assert_eq!(
            e.to_string(),
            "change at plan step 5: 2 weights for 3 domains"
        );
        let mut c = ch(5, f64::NAN);
        assert_eq!(c.check(2), Err(ChangeError::NotFinite { at: 5 }));
        c = ch(5, 1e308);
        c.points[0].1[1] = 1e308;
        assert_eq!(c.check(2), Err(ChangeError::NotFinite { at: 5 }));
        c = ch(5, 0.0);
        c.points[0].1[1] = 0.0;
        assert_eq!(c.check(2), Err(ChangeError::AllZero { at: 5, step: 5 }));
        c = ch(5, 1.0);
        c.points[0].0 = 6;
        assert_eq!(c.check(2), Err(ChangeError::CurveStart { at: 5, start: 6 }));
        c = ch(5, 1.0);
        c.points.push((5, vec![1.0, 1.0]));
        assert_eq!(
            c.check(2),
            Err(ChangeError::Unordered {
                at: 5,
                step: 5,
                previous: 5
            })
        );
        c.points.clear();
        assert_eq!(c.check(2), Err(ChangeError::Points { at: 5, points: 0 }));
    }
}
