//! The batch-grouping promise checked from the outside, on what a trainer would see: for
//! one batch-grouped domain, every group (epoch, shard, group id) has rows in one batch
//! or in consecutive batches of that domain (batches in which the domain has no rows do
//! not count), and never more rows than the cap in one batch. Shared by the property
//! tests (over planned batches) and the CLI tests (over `millrace explain --json`), so
//! both hold the planner to the same reading of docs/DESIGN.md ("Grouping").
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};

/// One global batch as the checker needs it: whether the domain had rows, and for each
/// of its rows the epoch and the (shard, group id) pairs the row holds.
#[derive(Debug, Clone, Default)]
pub struct Batch {
    /// Trainer step, for messages.
    pub step: u64,
    /// Rows the domain has in this batch (its allotment).
    pub domain_rows: u32,
    /// The domain's rows: (epoch, groups in the row).
    pub rows: Vec<(u32, BTreeSet<(String, u64)>)>,
}

/// What the check found.
#[derive(Debug, Default)]
pub struct Report {
    /// Distinct groups seen.
    pub groups: usize,
    /// Groups whose rows span more than one batch.
    pub spanning: usize,
    /// Most rows one group took in one batch.
    pub max_rows: u64,
    /// "group ... skipped step ..." for each group that is not in consecutive batches.
    pub gaps: Vec<String>,
    /// "group ... took N rows at step ..." for each (group, batch) above the cap.
    pub over_cap: Vec<String>,
}

/// Checks `batches` (in step order, consecutive) against the promise with cap `cap`.
pub fn check(batches: &[Batch], cap: u64) -> Report {
    // Ordinal of each batch among those in which the domain has rows.
    let mut ordinal = Vec::with_capacity(batches.len());
    let mut k = 0u64;
    for b in batches {
        ordinal.push(k);
        if b.domain_rows > 0 {
            k += 1;
        }
    }
    let mut occ: BTreeMap<(u32, String, u64), BTreeMap<usize, u64>> = BTreeMap::new();
    for (i, b) in batches.iter().enumerate() {
        for (epoch, groups) in &b.rows {
            for (shard, g) in groups {
                *occ.entry((*epoch, shard.clone(), *g))
                    .or_default()
                    .entry(i)
                    .or_default() += 1;
            }
        }
    }
    let mut r = Report {
        groups: occ.len(),
        ..Report::default()
    };
    for ((epoch, shard, g), per) in &occ {
        if per.len() > 1 {
            r.spanning += 1;
        }
        let mut prev: Option<usize> = None;
        for (&i, &n) in per {
            r.max_rows = r.max_rows.max(n);
            if n > cap {
                r.over_cap.push(format!(
                    "group {g} ({shard}, epoch {epoch}) took {n} rows at step {} (cap {cap})",
                    batches[i].step
                ));
            }
            if let Some(p) = prev {
                if ordinal[i] != ordinal[p] + 1 {
                    r.gaps.push(format!(
                        "group {g} ({shard}, epoch {epoch}) has rows at steps {} and {} but none in between",
                        batches[p].step, batches[i].step
                    ));
                }
            }
            prev = Some(i);
        }
    }
    r
}
