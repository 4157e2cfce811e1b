//! The mixer: how many rows of each domain fill global step s.
//!
//! Weights are token shares on a piecewise-linear schedule. They become row shares
//! through each domain's fill (real tokens per row), and then exact integer counts by
//! largest remainder with the error carried from step to step. All bookkeeping is in
//! fixed point (2^-24 of a row), so every node computes bit-identical counts and the
//! carried error never drifts.

use crate::config::plan::SchedulePoint;

/// Fixed-point units per row.
pub const TICKS: i64 = 1 << 24;

/// Points of a piecewise-linear curve: `(step, raw weights)`, steps increasing.
pub type Points = Vec<(u64, Vec<f64>)>;

/// Piecewise-linear token weights over steps, one column per domain: the config's curve,
/// overlaid by the live changes of the journal (each a curve of its own from its first
/// step on, cutting off whatever was in force from there).
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    points: Points,
    /// `(start, curve)` in increasing start order.
    layers: Vec<(u64, Points)>,
}

/// The value of a curve at `step`: linear between points, flat outside them.
fn eval(points: &[(u64, Vec<f64>)], step: u64) -> Vec<f64> {
    let i = points.partition_point(|(s, _)| *s <= step);
    if i == 0 {
        return points.first().map(|p| p.1.clone()).unwrap_or_default();
    }
    let (s0, w0) = &points[i - 1];
    match points.get(i) {
        None => w0.clone(),
        Some((s1, w1)) => {
            let t = (step - s0) as f64 / (s1 - s0) as f64;
            w0.iter().zip(w1).map(|(a, b)| a + (b - a) * t).collect()
        }
    }
}

impl Schedule {
    /// Builds the schedule from config points; `names` fixes the column order.
    pub fn new(points: &[SchedulePoint], names: &[&str]) -> Schedule {
        let points = points
            .iter()
            .map(|p| {
                let w = names
                    .iter()
                    .map(|n| p.weights.get(*n).copied().unwrap_or(0.0))
                    .collect();
                (p.step, w)
            })
            .collect();
        Schedule {
            points,
            layers: Vec::new(),
        }
    }

    /// Puts `curve` in force from `start` on, cutting off the layers that start at or
    /// after it: in place, so a journal of thousands of changes is laid in linear time
    /// (copying the schedule per change made one live change at 3,700 entries take
    /// 470 ms).
    pub fn add_layer(&mut self, start: u64, curve: Points) {
        self.layers.retain(|(b, _)| *b < start);
        self.layers.push((start, curve));
    }

    /// Token weights in force at `step` (not normalised).
    pub fn weights(&self, step: u64) -> Vec<f64> {
        let i = self.layers.partition_point(|(s, _)| *s <= step);
        match i {
            0 => eval(&self.points, step),
            _ => eval(&self.layers[i - 1].1, step),
        }
    }

    /// Token shares at `step`, summing to 1.
    pub fn shares(&self, step: u64) -> Vec<f64> {
        normalise(self.weights(step))
    }

    /// The curve from `from` on as points: its value at `from`, then every knot after.
    pub fn tail(&self, from: u64) -> Points {
        let mut out = vec![(from, self.weights(from))];
        for k in self.knots_before(u64::MAX) {
            if k > from {
                out.push((k, self.weights(k)));
            }
        }
        out
    }

    /// Steps below `end` that, with their values, pin the curve on `[0, end)`: every
    /// point, and both sides of a layer's jump once the jump itself is before `end`.
    /// Lines between consecutive knots are then fixed by their ends.
    pub fn knots_before(&self, end: u64) -> Vec<u64> {
        let first = self.layers.first().map_or(u64::MAX, |l| l.0);
        let mut out: Vec<u64> = self
            .points
            .iter()
            .map(|p| p.0)
            .filter(|&s| s < first && s < end)
            .collect();
        for (i, (start, curve)) in self.layers.iter().enumerate() {
            if *start >= end {
                break;
            }
            let next = self.layers.get(i + 1).map_or(u64::MAX, |l| l.0);
            out.extend(start.checked_sub(1));
            out.push(*start);
            out.extend(
                curve
                    .iter()
                    .map(|p| p.0)
                    .filter(|&s| s > *start && s < next && s < end),
            );
        }
        out.sort_unstable();
        out.dedup();
        out
    }

    /// The first step at which `other` gives different raw weights, if any. Both are
    /// linear between their knots, so checking the knots finds it: if they agree at one
    /// knot and differ at the next, they differ from the step after the first on.
    pub fn first_difference(&self, other: &Schedule) -> Option<u64> {
        let mut at = vec![0];
        at.extend(self.knots_before(u64::MAX));
        at.extend(other.knots_before(u64::MAX));
        at.sort_unstable();
        at.dedup();
        let same = |s: u64| {
            let (a, b) = (self.weights(s), other.weights(s));
            a.len() == b.len() && a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits())
        };
        let mut agreed: Option<u64> = None;
        for s in at {
            if !same(s) {
                return Some(agreed.map_or(0, |a| a + 1));
            }
            agreed = Some(s);
        }
        None
    }
}

fn normalise(mut w: Vec<f64>) -> Vec<f64> {
    let t: f64 = w.iter().sum();
    if t > 0.0 {
        for x in &mut w {
            *x /= t;
        }
    }
    w
}

/// Splits `total` ticks in proportion to `shares` exactly: floors, then one tick each to
/// the largest remainders (ties to the lower index).
pub fn apportion(total: i64, shares: &[f64]) -> Vec<i64> {
    let sum: f64 = shares.iter().sum();
    if sum.is_nan() || sum <= 0.0 || total <= 0 {
        return vec![0; shares.len()];
    }
    let raw: Vec<f64> = shares.iter().map(|s| s / sum * total as f64).collect();
    let mut out: Vec<i64> = raw.iter().map(|r| r.floor() as i64).collect();
    let mut left = total - out.iter().sum::<i64>();
    let mut order: Vec<usize> = (0..shares.len()).collect();
    order.sort_by(|&a, &b| {
        let fa = raw[a] - out[a] as f64;
        let fb = raw[b] - out[b] as f64;
        fb.total_cmp(&fa).then(a.cmp(&b))
    });
    let mut k = 0;
    while left > 0 && !order.is_empty() {
        out[order[k % order.len()]] += 1;
        left -= 1;
        k += 1;
    }
    while left < 0 {
        // Only from float rounding at the extremes: take back from the largest.
        if let Some(i) = (0..out.len()).max_by_key(|&i| out[i]) {
            out[i] -= 1;
        }
        left += 1;
    }
    out
}

/// The mixer's state: cumulative rows and carried error per domain.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MixState {
    /// Rows given to each domain so far.
    pub rows: Vec<u64>,
    /// Target minus given, in ticks (so `|deficit| < TICKS` means within one row).
    pub deficit: Vec<i64>,
}

/// A bursty domain whose cycles owe more rows than its cycle-start steps leave it
/// ([`Mixer::bursty_overload`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Overload {
    /// A plan step where it happens.
    pub step: u64,
    /// `(domain, period)`.
    pub domain: (usize, u32),
    /// Its row share at `step`.
    pub share: f64,
    /// `(domain, period, share of its cycle starts)` of the bursty domains served
    /// before it in those steps.
    pub ahead: Vec<(usize, u32, f64)>,
    /// Batches its cycle and theirs need per batch of its cycle-start steps.
    pub load: f64,
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a.max(1)
    } else {
        gcd(b, a % b)
    }
}

impl MixState {
    /// The state before step 0.
    pub fn new(domains: usize) -> MixState {
        MixState {
            rows: vec![0; domains],
            deficit: vec![0; domains],
        }
    }
}

/// Rows per batch and fill from a later stage's first step on (`plan/stage.rs`).
#[derive(Debug, Clone, PartialEq)]
pub struct StageMix {
    /// First plan step of the stage.
    pub step: u64,
    /// Rows per global batch in the stage.
    pub rows: u32,
    /// Real tokens per row over capacity, per domain, at the stage's shape.
    pub fill: Vec<f64>,
}

/// Everything the mixer needs besides its state.
#[derive(Debug, Clone)]
pub struct Mixer {
    /// Token weights.
    pub schedule: Schedule,
    /// Real tokens per row, as a fraction of capacity, per domain (first stage).
    pub fill: Vec<f64>,
    /// Rows per global batch (first stage).
    pub rows: u32,
    /// Per domain: `(period, phase)` when bursty.
    pub bursty: Vec<Option<(u32, u32)>>,
    /// Later stages, in step order: the mixer counts in rows of the stage in force.
    pub stages: Vec<StageMix>,
}

impl Mixer {
    /// The later stage in force at `step`, if any.
    fn stage(&self, step: u64) -> Option<&StageMix> {
        let i = self.stages.partition_point(|s| s.step <= step);
        i.checked_sub(1).map(|i| &self.stages[i])
    }

    /// Rows per global batch at `step`.
    pub fn rows_at(&self, step: u64) -> u32 {
        self.stage(step).map_or(self.rows, |s| s.rows)
    }

    /// Fill per domain at `step`.
    pub fn fill_at(&self, step: u64) -> &[f64] {
        self.stage(step).map_or(&self.fill, |s| &s.fill)
    }

    /// The first overload of a bursty domain, if any: at some step where a domain that
    /// is not bursty has weight, its cycle owes more rows than the batches of its
    /// cycle-start steps leave it. It then gets less than its weight, and its carried
    /// error grows without bound (blobs are refused once it passes their check, and at
    /// 2^20 rows it overflows).
    ///
    /// [`Mixer::counts`] serves bursty domains in domain order, each taking what its
    /// cycle owes from what is left of the batch. So domain `d` of period `p` has, on
    /// average over its cycle-start steps, one batch less what the bursty domains
    /// before it take in those steps: each such `e` starts a cycle in a share
    /// `p / lcm(p, p_e)` of them when their phases agree modulo `gcd(p, p_e)` (Chinese
    /// remainder theorem), and takes `share_e * p_e` batches there. `d` needs
    /// `share_d * p` batches a cycle. The shares are ratios of linear functions of the
    /// step between knots of the schedule and stage starts, so the sums are largest at
    /// one of them (or, where the others' weight starts or ends there, at the step next
    /// to it).
    pub fn bursty_overload(&self) -> Option<Overload> {
        let bursty: Vec<(usize, u32, u32)> = (self.bursty.iter().enumerate())
            .filter_map(|(d, b)| b.map(|(p, ph)| (d, p, ph)))
            .collect();
        if bursty.is_empty() {
            return None;
        }
        // For each bursty domain, those before it that share its cycle starts, with
        // the share of its starts they share.
        let before: Vec<Vec<(usize, f64)>> = (0..bursty.len())
            .map(|i| {
                let (_, p, ph) = bursty[i];
                (0..i)
                    .filter_map(|j| {
                        let (_, q, qh) = bursty[j];
                        let g = gcd(p as u64, q as u64);
                        let meet = ph as u64 % g == qh as u64 % g;
                        meet.then(|| (j, g as f64 / q as f64))
                    })
                    .collect()
            })
            .collect();
        let mut steps = self.schedule.knots_before(u64::MAX);
        for s in &self.stages {
            steps.extend([s.step.saturating_sub(1), s.step]);
        }
        steps.push(0);
        steps.sort_unstable();
        steps.dedup();
        // When only bursty domains have weight they also take the rest of each batch,
        // which repays them; the rest goes to the others whenever one has weight.
        let checked = (steps.iter()).flat_map(|&k| [k.saturating_sub(1), k, k.saturating_add(1)]);
        let mut checked: Vec<u64> = checked.collect();
        checked.dedup();
        for step in checked {
            let shares = self.row_shares(step);
            let others = (0..shares.len()).any(|d| self.bursty[d].is_none() && shares[d] > 0.0);
            if !others {
                continue;
            }
            let takes = |j: usize| shares[bursty[j].0] * bursty[j].1 as f64;
            for (i, first) in before.iter().enumerate() {
                let ahead: f64 = first.iter().map(|&(j, meet)| takes(j) * meet).sum();
                let load = takes(i) + ahead;
                if load > 1.0 + 1e-9 && takes(i) > 0.0 {
                    let ahead = (first.iter())
                        .filter(|&&(j, _)| takes(j) > 0.0)
                        .map(|&(j, meet)| (bursty[j].0, bursty[j].1, meet))
                        .collect();
                    return Some(Overload {
                        step,
                        domain: (bursty[i].0, bursty[i].1),
                        share: shares[bursty[i].0],
                        ahead,
                        load,
                    });
                }
            }
        }
        None
    }

    /// The largest carried error domain `d` can have in a real run, with room to spare:
    /// `4 * (cycle + 1)` of the largest batch, a cycle being its period (one step for a
    /// domain that is not bursty). A plain domain's error stays within a row or two, and a bursty one's
    /// within its cycle's rows (it takes them at the cycle's start) plus what the
    /// domains served before it defer. A cursor blob's larger error is forged, and
    /// would make [`Mixer::counts`] hand out whole batches, a row per scan, for
    /// thousands of steps.
    pub fn deficit_bound(&self, d: usize) -> u64 {
        let rows = (self.stages.iter().map(|s| s.rows)).fold(self.rows, u32::max) as u64;
        let cycle = self
            .bursty
            .get(d)
            .copied()
            .flatten()
            .map_or(1, |b| b.0 as u64);
        4 * (cycle + 1) * (rows + 1) * TICKS as u64
    }

    /// Row shares at `step`: token shares divided by fill, normalised.
    pub fn row_shares(&self, step: u64) -> Vec<f64> {
        let w = self.schedule.shares(step);
        normalise(
            w.iter()
                .zip(self.fill_at(step))
                .map(|(w, f)| if *f > 0.0 { w / f } else { 0.0 })
                .collect(),
        )
    }

    /// Nominal ticks per domain at `step` (what each is owed if none were bursty), in
    /// rows of the stage in force.
    pub fn nominal(&self, step: u64) -> Vec<i64> {
        apportion(self.rows_at(step) as i64 * TICKS, &self.row_shares(step))
    }

    /// Row counts for `step`, updating `state`. The counts sum to the batch size.
    pub fn counts(&self, state: &mut MixState, step: u64) -> Vec<u32> {
        let n = self.fill.len();
        let g = self.rows_at(step) as i64;
        let nominal = self.nominal(step);
        let mut counts = vec![0u32; n];
        let mut left = g;
        // Bursty domains: a whole cycle's rows at the cycle's start, none otherwise.
        for d in 0..n {
            let Some((period, phase)) = self.bursty[d] else {
                continue;
            };
            if step % period as u64 == phase as u64 {
                let mut owed = state.deficit[d];
                for t in step..step + period as u64 {
                    owed += if t == step {
                        nominal[d]
                    } else {
                        self.nominal(t)[d]
                    };
                }
                let rows = ((owed + TICKS / 2).div_euclid(TICKS)).clamp(0, left);
                counts[d] = rows as u32;
                left -= rows;
            }
            state.deficit[d] += nominal[d] - counts[d] as i64 * TICKS;
        }
        // Everyone else shares what is left, in proportion to their row shares.
        let shares = self.row_shares(step);
        let mut rest: Vec<usize> = (0..n)
            .filter(|&d| self.bursty[d].is_none() && shares[d] > 0.0)
            .collect();
        if rest.is_empty() {
            // Only bursty domains have weight: they absorb the rest as carried error.
            rest = (0..n).filter(|&d| shares[d] > 0.0).collect();
        }
        if rest.is_empty() {
            rest = (0..n).collect();
        }
        let sub: Vec<f64> = rest.iter().map(|&d| shares[d]).collect();
        let ticks = apportion(left * TICKS, &sub);
        let owed: Vec<i64> = rest
            .iter()
            .zip(&ticks)
            .map(|(&d, &t)| state.deficit[d] + t)
            .collect();
        let mut give: Vec<i64> = owed.iter().map(|&q| q.div_euclid(TICKS).max(0)).collect();
        let mut diff = left - give.iter().sum::<i64>();
        while diff != 0 {
            // Largest remainder when short, smallest when over; ties to the lower index.
            let pick = if diff > 0 {
                (0..rest.len()).max_by(|&a, &b| {
                    (owed[a] - give[a] * TICKS)
                        .cmp(&(owed[b] - give[b] * TICKS))
                        .then(b.cmp(&a))
                })
            } else {
                (0..rest.len()).filter(|&i| give[i] > 0).min_by(|&a, &b| {
                    (owed[a] - give[a] * TICKS)
                        .cmp(&(owed[b] - give[b] * TICKS))
                        .then(a.cmp(&b))
                })
            };
            let Some(i) = pick else { break };
            give[i] += diff.signum();
            diff -= diff.signum();
        }
        for (i, &d) in rest.iter().enumerate() {
            counts[d] += give[i] as u32;
            state.deficit[d] = owed[i] - give[i] * TICKS;
            if self.bursty[d].is_some() {
                // A bursty domain absorbing rest rows already had its nominal added.
                state.deficit[d] -= ticks[i];
            }
        }
        // A domain with no share now keeps its carried error unchanged.
        for (rows, &c) in state.rows.iter_mut().zip(&counts) {
            *rows = rows.saturating_add(c as u64);
        }
        counts
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn mixer(weights: &[f64], rows: u32) -> Mixer {
        let names: Vec<String> = (0..weights.len()).map(|i| format!("d{i}")).collect();
        let refs: Vec<&str> = names.iter().map(|s| s.as_str()).collect();
        let w: BTreeMap<String, f64> = names.iter().cloned().zip(weights.iter().copied()).collect();
        Mixer {
            schedule: Schedule::new(
                &[SchedulePoint {
                    step: 0,
                    weights: w,
                }],
                &refs,
            ),
            fill: vec![1.0; weights.len()],
            rows,
            bursty: vec![None; weights.len()],
            stages: Vec::new(),
        }
    }

    #[test]
    fn apportion_is_exact() {
        let a = apportion(100, &[1.0, 1.0, 1.0]);
        assert_eq!(a.iter().sum::<i64>(), 100);
        assert_eq!(a, vec![34, 33, 33]);
    }

    #[test]
    fn constant_weights_stay_within_a_row() {
        let m = mixer(&[0.5, 0.3, 0.15, 0.05], 7);
        let mut s = MixState::new(4);
        for step in 0..1000u64 {
            let c = m.counts(&mut s, step);
            assert_eq!(c.iter().sum::<u32>(), 7);
            for (d, w) in [0.5, 0.3, 0.15, 0.05].iter().enumerate() {
                let target = w * 7.0 * (step + 1) as f64;
                assert!((s.rows[d] as f64 - target).abs() <= 1.0, "step {step} d{d}");
            }
        }
    }

    #[test]
    fn ramp_interpolates() {
        let names = ["a", "b"];
        let p = |step, a, b| SchedulePoint {
            step,
            weights: [("a".to_string(), a), ("b".to_string(), b)]
                .into_iter()
                .collect(),
        };
        let s = Schedule::new(&[p(10, 1.0, 0.0), p(20, 0.0, 1.0)], &names);
        assert_eq!(s.weights(0), vec![1.0, 0.0]);
        assert_eq!(s.weights(15), vec![0.5, 0.5]);
        assert_eq!(s.weights(99), vec![0.0, 1.0]);
    }
}
