//! The change journal: every live mixture change a run has accepted, in order.
//!
//! A change is "from plan step `at` on, the weights follow this curve". The journal lives
//! in the [`Plan`](super::Plan) (which overlays it on the config's schedule) and in every
//! cursor blob, so a trainer resuming after a reload gets the same stream even from a
//! daemon that never saw the reload, and two nodes given the same changes plan the same
//! batches. Changes compare bit for bit: two journals agree when one is a prefix of the
//! other.

use super::mix::Points;

/// Most changes one journal may hold, so a blob stays small enough for a HELLO frame.
pub const MAX_CHANGES: usize = 256;
/// Most points one change's curve may hold.
pub const MAX_POINTS: usize = 64;

/// One accepted change of the mixture.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    /// First plan step the change shapes.
    pub at: u64,
    /// The weights from `at` on: `(plan step, raw weight per domain)`, the first at `at`.
    pub points: Points,
}

impl Change {
    /// Bitwise equality, so NaN-free weights compare exactly as the blob stores them.
    fn same(&self, other: &Change) -> bool {
        self.at == other.at
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

    /// Structural checks against a plan of `domains` domains; the message names the fault.
    pub fn check(&self, domains: usize) -> Result<(), String> {
        if self.points.is_empty() || self.points.len() > MAX_POINTS {
            return Err(format!(
                "change at plan step {} has {} points (1..={MAX_POINTS} allowed)",
                self.at,
                self.points.len()
            ));
        }
        if self.points[0].0 != self.at {
            return Err(format!(
                "change at plan step {} starts its curve at step {}",
                self.at, self.points[0].0
            ));
        }
        for (i, (step, w)) in self.points.iter().enumerate() {
            if i > 0 && *step <= self.points[i - 1].0 {
                return Err(format!(
                    "change at plan step {}: point steps must increase ({step} follows {})",
                    self.at,
                    self.points[i - 1].0
                ));
            }
            if w.len() != domains {
                return Err(format!(
                    "change at plan step {}: {} weights for {domains} domains",
                    self.at,
                    w.len()
                ));
            }
            if w.iter().any(|x| !x.is_finite() || *x < 0.0) {
                return Err(format!(
                    "change at plan step {}: weights must be finite and non-negative",
                    self.at
                ));
            }
            if w.iter().sum::<f64>() <= 0.0 {
                return Err(format!(
                    "change at plan step {}: the weights at step {step} are all zero",
                    self.at
                ));
            }
        }
        Ok(())
    }
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

/// Compares two journals by prefix.
pub fn compare(ours: &[Change], theirs: &[Change]) -> Order {
    let common = ours.len().min(theirs.len());
    if let Some(i) = (0..common).find(|&i| !ours[i].same(&theirs[i])) {
        return Order::Diverged(i);
    }
    match ours.len().cmp(&theirs.len()) {
        std::cmp::Ordering::Equal => Order::Same,
        std::cmp::Ordering::Greater => Order::OursAhead,
        std::cmp::Ordering::Less => Order::TheirsAhead,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ch(at: u64, w: f64) -> Change {
        Change {
            at,
            points: vec![(at, vec![w, 1.0])],
        }
    }

    #[test]
    fn prefixes_order_journals() {
        let a = vec![ch(10, 0.5)];
        let b = vec![ch(10, 0.5), ch(20, 0.7)];
        assert_eq!(compare(&a, &a), Order::Same);
        assert_eq!(compare(&b, &a), Order::OursAhead);
        assert_eq!(compare(&a, &b), Order::TheirsAhead);
        assert_eq!(compare(&[ch(10, 0.25)], &b), Order::Diverged(0));
        assert_eq!(compare(&[], &[]), Order::Same);
    }

    #[test]
    fn checks_name_the_fault() {
        assert!(ch(5, 0.5).check(2).is_ok());
        assert!(ch(5, 0.5).check(3).unwrap_err().contains("3 domains"));
        let mut c = ch(5, f64::NAN);
        assert!(c.check(2).unwrap_err().contains("finite"));
        c = ch(5, 0.0);
        c.points[0].1[1] = 0.0;
        assert!(c.check(2).unwrap_err().contains("all zero"));
        c = ch(5, 1.0);
        c.points[0].0 = 6;
        assert!(c.check(2).unwrap_err().contains("starts its curve"));
    }
}
