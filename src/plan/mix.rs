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
    let mut t: f64 = w.iter().sum();
    if t.is_infinite() {
        // Weights each finite, and finite in sum at every point, can still overflow in
        // sum between points (f64::MAX ramping from one domain to another): scaled by
        // the largest first, they keep their shares instead of all becoming 0.
        let most = w.iter().copied().fold(0.0, f64::max);
        for x in &mut w {
            *x /= most;
        }
        t = w.iter().sum();
    }
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

/// Gives `diff` more rows (taking `-diff` back when negative) one at a time: each to
/// the domain with the largest remainder `owed - give * TICKS` when short, from the
/// smallest among those given any when over, ties to the lower index. A heap keeps
/// each pick O(log n): the scan it replaces cost rows x domains a step (4096 domains
/// and 4096 rows: 43% of `plan`'s time). The picks are the scan's, in order: the key
/// with its index is a strict total order, and a pick moves only its own key.
fn settle(give: &mut [i64], owed: &[i64], mut diff: i64) {
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;
    let rem = |i: usize, give: &[i64]| owed[i] - give[i] * TICKS;
    if diff > 0 {
        let mut heap: BinaryHeap<(i64, Reverse<usize>)> = (0..give.len())
            .map(|i| (rem(i, give), Reverse(i)))
            .collect();
        while diff > 0 {
            let Some((r, Reverse(i))) = heap.pop() else {
                break;
            };
            give[i] += 1;
            diff -= 1;
            heap.push((r - TICKS, Reverse(i)));
        }
    } else if diff < 0 {
        let mut heap: BinaryHeap<Reverse<(i64, usize)>> = (0..give.len())
            .filter(|&i| give[i] > 0)
            .map(|i| Reverse((rem(i, give), i)))
            .collect();
        while diff < 0 {
            let Some(Reverse((r, i))) = heap.pop() else {
                break;
            };
            give[i] -= 1;
            diff += 1;
            if give[i] > 0 {
                heap.push(Reverse((r + TICKS, i)));
            }
        }
    }
}

/// The mixer's state: cumulative rows and carried error per domain.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MixState {
    /// Rows given to each domain so far.
    pub rows: Vec<u64>,
    /// Target minus given, in ticks (so `|deficit| < TICKS` means within one row).
    pub deficit: Vec<i64>,
}

/// A bursty domain the final mixture cannot give its weight ([`Mixer::bursty_shortfall`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Shortfall {
    /// The plan step from which the mixture holds.
    pub step: u64,
    /// The domain.
    pub domain: usize,
    /// Its period.
    pub period: u32,
    /// Its row share by weight.
    pub share: f64,
    /// The row share it gets in the long run (at most: `1/period` for a domain too
    /// heavy alone).
    pub got: f64,
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

    /// A bursty domain that the mixture the schedule ends with (in force from its last
    /// knot or stage start on, for the rest of the run) cannot give its weight, if any.
    ///
    /// A bursty domain of period `p` takes a whole cycle's rows in one step, so it can
    /// have at most `1/p` of the rows, and less where bursty domains served before it
    /// (in domain order) start their cycles in the same steps. Past that its cycles are
    /// cut to what the batch holds and its carried error grows every cycle until it
    /// reaches [`Mixer::deficit_cap`], where the rest is written off: the domain gets
    /// less than its weight for good (its blobs still resume). Transient overloads (a warm-up, a spike)
    /// are repaid once the weights come down, so only the last segment is judged (a
    /// long overloaded segment before it is not: see docs/DESIGN.md, "Mixture").
    ///
    /// Decided by running this mixer itself on that mixture, from no carried error, for
    /// two stretches of at least 2048 steps and 16 cycles of the longest period (whole
    /// hyperperiods where those are at most 2^16 steps). A domain is short when its
    /// error grew in the second by more than 1% of the rows it was owed or by more than
    /// a thousandth of a batch a step (past two batches of noise). Not decided (`None`)
    /// where that run would take more than 2^22 domain-scans (about 0.13 s), since a
    /// live change runs it under the hub's lock: many domains with long periods.
    /// Closed forms miss the carry between domains: one cut short in one step takes its
    /// shortfall at its next start, which may be a later domain's, so a simple sum of
    /// shares times periods both misses overloads and refuses mixtures that hold.
    pub fn bursty_shortfall(&self) -> Option<Shortfall> {
        let mut from = self
            .schedule
            .knots_before(u64::MAX)
            .last()
            .copied()
            .unwrap_or(0);
        if let Some(s) = self.stages.last() {
            from = from.max(s.step);
        }
        let shares = self.row_shares(from);
        let n = shares.len();
        let weighted = |d: usize| self.bursty[d].is_some() && shares[d] > 0.0;
        let others = (0..n).any(|d| self.bursty[d].is_none() && shares[d] > 0.0);
        if !others || !(0..n).any(weighted) {
            // Without others the bursty domains also take the rest of every batch.
            return None;
        }
        let load = |d: usize| shares[d] * self.bursty[d].map_or(0, |b| b.0) as f64;
        if (0..n).filter(|&d| weighted(d)).map(load).sum::<f64>() <= 1.0 {
            // Even in a step where every one starts a cycle, each gets its cycle's rows.
            return None;
        }
        let alone = (0..n).filter(|&d| weighted(d) && load(d) > 1.0 + 1e-9);
        if let Some(d) = alone.max_by(|&a, &b| load(a).total_cmp(&load(b)).then(b.cmp(&a))) {
            // Too heavy alone: it gets at most 1/period, whatever the others do.
            let period = self.bursty[d].map_or(1, |b| b.0);
            return Some(Shortfall {
                step: from,
                domain: d,
                period,
                share: shares[d],
                got: 1.0 / period as f64,
            });
        }
        // Each domain is sampled at the same point of its own cycle, 16 cycles or more
        // apart (a domain falls behind by at most a batch a cycle, against two batches
        // of noise), over whole hyperperiods where they are short.
        let periods = (0..n)
            .filter(|&d| weighted(d))
            .filter_map(|d| self.bursty[d].map(|b| b.0 as u64));
        let longest = periods.clone().max().unwrap_or(1);
        let lcm = periods.fold(1u64, |l, p| (l / gcd(l, p)).saturating_mul(p));
        let mut half = 2048u64.max(16 * longest);
        if lcm <= 1 << 16 {
            half = half.div_ceil(lcm).saturating_mul(lcm);
        }
        // A step costs about a domain-scan per domain and per weighted bursty one (its
        // cycle's nominal rows), and a live change runs this under the hub's lock: past
        // 2^22 such scans (about 0.13 s on a 2-vCPU VM) it is not decided, and nothing
        // is reported.
        let bursts = (0..n).filter(|&d| weighted(d)).count() as u64;
        if (2 * half).saturating_mul(n as u64 * (1 + bursts)) > 1 << 22 {
            return None;
        }
        let stationary = Mixer {
            schedule: Schedule {
                points: vec![(0, self.schedule.weights(from))],
                layers: Vec::new(),
            },
            fill: self.fill_at(from).to_vec(),
            rows: self.rows_at(from),
            bursty: self.bursty.clone(),
            stages: Vec::new(),
        };
        // Each domain's error is compared at the same point of its own cycle, the
        // steps before `half` and `2 * half` that its period divides.
        let marks: Vec<(usize, u64, u64)> = (0..n)
            .filter(|&d| weighted(d))
            .filter_map(|d| {
                let p = self.bursty[d]?.0 as u64;
                Some((d, half / p * p, 2 * half / p * p))
            })
            .collect();
        let mut seen = vec![(0i64, 0i64); n];
        let mut st = MixState::new(n);
        for step in 0..=2 * half {
            for &(d, a, b) in &marks {
                if step == a {
                    seen[d].0 = st.deficit[d];
                }
                if step == b {
                    seen[d].1 = st.deficit[d];
                }
            }
            if step < 2 * half {
                // Unsaturated: a domain at the cap would seem to grow no more. Its error
                // is at most what it was owed: at most 2 x (16 x 10,000 + 2^16) steps of
                // 2^44 ticks (2^20 rows), plus a cycle's owed at a cycle start, within
                // i64.
                stationary.counts_unsaturated(&mut st, step);
            }
        }
        // Short when the error grew, past two batches of noise, by more than 1% of what
        // the domain was owed, or by more than a thousandth of a batch a step (which
        // reaches what a resume accepts, 10,001 batches, within 10^7 steps).
        let rows = stationary.rows as f64;
        marks
            .iter()
            .filter_map(|&(d, a, b)| {
                let grew = (seen[d].1 - seen[d].0) as f64 / TICKS as f64;
                let span = (b - a) as f64;
                let owed = shares[d] * rows * span;
                let rate = (0.01 * shares[d]).min(0.001) * rows;
                (grew > 2.0 * rows + rate * span).then_some((d, 1.0 - grew / owed))
            })
            .min_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)))
            .map(|(d, got)| Shortfall {
                step: from,
                domain: d,
                period: self.bursty[d].map_or(1, |b| b.0),
                share: shares[d],
                got: shares[d] * got,
            })
    }

    /// The largest carried error domain `d` can have in a real run, with room to spare:
    /// what a resume accepts ([`Mixer::deficit_cap`] at the largest stage of the plan).
    /// A domain that is not bursty ends every step with less than a row of it (its rows
    /// are its owed ticks rounded, give or take one): 4 batches. A bursty one takes a
    /// cycle's rows at the cycle's start and may fall behind for as long as a warm-up or
    /// spike overloads it (a warm-up of all weight on one, then 0.2, reached 350 batches
    /// before repaying them), and one that cannot get its weight saturates at the cap:
    /// 10,001 batches. A cursor blob's larger error is forged, and would make
    /// [`Mixer::counts`] hand out whole batches, a row per scan, for thousands of steps.
    pub fn deficit_bound(&self, d: usize) -> u64 {
        self.deficit_cap(d, u64::MAX)
    }

    /// The carried error domain `d` saturates at from `step` on: 10,001 batches for a
    /// bursty domain, 4 for another, of the largest batch of the stages in force by
    /// `step`. Only stages up to `step` count, so the cap is history: a stage added or
    /// dropped later (a config edit of the future, a live change) moves no step before
    /// it, and any plan that accepts a blob's history accepts its error
    /// ([`Mixer::deficit_bound`] is this over all stages).
    pub fn deficit_cap(&self, d: usize, step: u64) -> u64 {
        self.cap_of(d, self.largest_rows_by(step))
    }

    /// Rows of the largest batch of the stages in force by `step`.
    fn largest_rows_by(&self, step: u64) -> u64 {
        (self.stages.iter())
            .take_while(|s| s.step <= step)
            .map(|s| s.rows)
            .fold(self.rows, u32::max) as u64
    }

    /// [`Mixer::deficit_cap`] of domain `d` where the largest batch so far is `rows`.
    fn cap_of(&self, d: usize, rows: u64) -> u64 {
        let batches = match self.bursty.get(d).copied().flatten() {
            None => 4,
            Some(_) => 10_001,
        };
        batches * (rows + 1) * TICKS as u64
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
    ///
    /// Each domain's carried error then saturates at [`Mixer::deficit_cap`]: a bursty
    /// domain that cannot get its weight (see [`Mixer::bursty_shortfall`]) falls behind
    /// every cycle, and unchecked its error passed what a resume accepts (every blob of
    /// the run refused from then on) and at 2^20 rows overflowed i64. A run whose errors
    /// stay within the cap is not changed by it; a short domain gets its best, every row
    /// the batch has left at each cycle start, and is owed at most the cap once its
    /// weight comes down. Streaming, seeking and resuming all come through here, so they
    /// saturate at the same steps.
    pub fn counts(&self, state: &mut MixState, step: u64) -> Vec<u32> {
        let counts = self.counts_unsaturated(state, step);
        let rows = self.largest_rows_by(step);
        for (d, e) in state.deficit.iter_mut().enumerate() {
            let cap = self.cap_of(d, rows) as i64;
            *e = (*e).clamp(-cap, cap);
        }
        counts
    }

    /// [`Mixer::counts`] with the carried error unchecked: what
    /// [`Mixer::bursty_shortfall`] measures the growth of.
    fn counts_unsaturated(&self, state: &mut MixState, step: u64) -> Vec<u32> {
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
        let diff = left - give.iter().sum::<i64>();
        settle(&mut give, &owed, diff);
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
mod tests;
