//! The mixer's tests: shares within a row, ramps, and the leftover rows' picks against
//! the scan they replaced.

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

/// The scan `settle` replaced: one pass over every domain per row given or taken.
fn settle_by_scan(give: &mut [i64], owed: &[i64], mut diff: i64) {
    while diff != 0 {
        let pick = if diff > 0 {
            (0..give.len()).max_by(|&a, &b| {
                (owed[a] - give[a] * TICKS)
                    .cmp(&(owed[b] - give[b] * TICKS))
                    .then(b.cmp(&a))
            })
        } else {
            (0..give.len()).filter(|&i| give[i] > 0).min_by(|&a, &b| {
                (owed[a] - give[a] * TICKS)
                    .cmp(&(owed[b] - give[b] * TICKS))
                    .then(a.cmp(&b))
            })
        };
        let Some(i) = pick else { break };
        give[i] += diff.signum();
        diff -= diff.signum();
    }
}

proptest::proptest! {
    /// The heap picks what the scan picked, row for row, ties and negative
    /// remainders included, so no plan changes.
    #[test]
    fn settle_gives_what_the_scan_gave(
        owed in proptest::collection::vec(-3 * TICKS..3 * TICKS, 0..40),
        diff in -60i64..60,
        ties in proptest::bool::ANY,
    ) {
        // Coarse remainders make ties common.
        let owed: Vec<i64> = match ties {
            true => owed.iter().map(|o| o / (TICKS / 4) * (TICKS / 4)).collect(),
            false => owed,
        };
        let give0: Vec<i64> = owed.iter().map(|&q| q.div_euclid(TICKS).max(0)).collect();
        let (mut a, mut b) = (give0.clone(), give0);
        settle(&mut a, &owed, diff);
        settle_by_scan(&mut b, &owed, diff);
        proptest::prop_assert_eq!(a, b);
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
