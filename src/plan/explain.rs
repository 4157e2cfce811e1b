//! `millrace explain`: the provenance of one step for one rank, every token of every
//! row traced to its domain, epoch, shard, document and range. It reads a planned
//! batch and the plan's names, nothing else, so what it prints is what the daemon
//! served for that step (tests hold the served bytes to it).

use serde::Serialize;

use super::report::{render_positions, DomainPosition};
use super::{GlobalBatch, Plan};

/// One row of `millrace explain`: where every token of it comes from.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct RowProvenance {
    /// Position in the global batch.
    pub row: u64,
    /// Domain name.
    pub domain: String,
    /// The domain's epoch (0-based).
    pub epoch: u32,
    /// Real tokens.
    pub tokens: u32,
    /// Padding tokens.
    pub padding: u32,
    /// Label positions counted by the loss.
    pub loss_tokens: u32,
    /// Documents in row order.
    pub segments: Vec<SegmentProvenance>,
}

/// One document range of a row.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SegmentProvenance {
    /// Shard path as configured on this node.
    pub shard: String,
    /// Document within the shard.
    pub doc: u64,
    /// Token range `[start, end)` within the document.
    pub start: u64,
    /// End of the range (exclusive).
    pub end: u64,
    /// Document length.
    pub doc_len: u64,
    /// Group id, if the shard has groups.
    pub group: Option<u64>,
}

/// `millrace explain`'s answer for one step and rank.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Explanation {
    /// Trainer step.
    pub step: u64,
    /// Step in the unskipped numbering.
    pub plan_step: u64,
    /// The step's stage, and its shape.
    pub stage: u32,
    /// Tokens a row trains on in that stage.
    pub seq_len: u32,
    /// Rows per global batch in that stage.
    pub global_batch_rows: u32,
    /// Rank asked about.
    pub dp_rank: u32,
    /// Ranks.
    pub dp_size: u32,
    /// Rows per domain over the whole global batch.
    pub counts: Vec<(String, u32)>,
    /// The rank's rows.
    pub rows: Vec<RowProvenance>,
    /// Each domain's epoch position before the step ([`super::report::positions`]; empty unless the
    /// caller has the planner and fills it in).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub domains: Vec<DomainPosition>,
}

/// Builds the provenance of `batch` for rank `r` of `ranks`.
pub fn explain(plan: &Plan, batch: &GlobalBatch, r: u32, ranks: u32) -> Explanation {
    let (a, _) = super::rank_range(batch.rows.len() as u64, r, ranks);
    let names = plan.domain_names();
    let stage = plan.stage_at(batch.plan_step);
    let shape = plan.shape(stage);
    let rows = batch
        .rank_rows(r, ranks)
        .iter()
        .enumerate()
        .map(|(i, row)| RowProvenance {
            row: a + i as u64,
            domain: names
                .get(row.domain as usize)
                .map_or_else(String::new, |n| n.to_string()),
            epoch: row.epoch,
            tokens: row.tokens,
            padding: (shape.seq_len + 1).saturating_sub(row.tokens),
            loss_tokens: row.loss_tokens,
            segments: row
                .segments
                .iter()
                .map(|s| SegmentProvenance {
                    shard: plan
                        .shard_names(row.domain as usize)
                        .get(s.shard as usize)
                        .cloned()
                        .unwrap_or_default(),
                    doc: s.doc,
                    start: s.start,
                    end: s.start + s.len as u64,
                    doc_len: s.doc_len,
                    group: s.group,
                })
                .collect(),
        })
        .collect();
    Explanation {
        step: batch.step,
        plan_step: batch.plan_step,
        stage,
        seq_len: shape.seq_len,
        global_batch_rows: shape.rows,
        dp_rank: r,
        dp_size: ranks,
        counts: names
            .iter()
            .zip(&batch.counts)
            .map(|(n, &c)| (n.to_string(), c))
            .collect(),
        rows,
        domains: Vec::new(),
    }
}

/// Human-readable provenance.
pub fn render_explain(e: &Explanation) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    // Domains without a row this step are summed up, not listed: a plan of thousands of
    // domains printed each of them with its 0 on this one line.
    let mut counts: Vec<String> = e
        .counts
        .iter()
        .filter(|(_, c)| *c > 0)
        .map(|(n, c)| format!("{n} {c}"))
        .collect();
    let idle = e.counts.len() - counts.len();
    if idle > 0 {
        counts.push(format!("{idle} other domains 0"));
    }
    let _ = writeln!(
        s,
        "step {} (plan step {}), dp rank {} of {}; global batch rows: {}; stage {}: {} rows \
         of {} tokens",
        e.step,
        e.plan_step,
        e.dp_rank,
        e.dp_size,
        counts.join(", "),
        e.stage,
        e.global_batch_rows,
        e.seq_len
    );
    for r in &e.rows {
        let _ = writeln!(
            s,
            "row {:>5}  {:<12} epoch {:<3} tokens {:>6}  pad {:>6}  loss {:>6}",
            r.row, r.domain, r.epoch, r.tokens, r.padding, r.loss_tokens
        );
        for g in &r.segments {
            let group = g.group.map(|x| format!("  group {x}")).unwrap_or_default();
            let _ = writeln!(
                s,
                "           {} doc {} [{}, {}) of {}{group}",
                g.shard, g.doc, g.start, g.end, g.doc_len
            );
        }
    }
    if !e.domains.is_empty() {
        s += &render_positions("domains before the step:", &e.domains, &[]);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The header lists the domains that have rows this step and sums up the rest, so a
    /// plan of thousands of domains still prints one readable line.
    #[test]
    fn the_header_lists_domains_with_rows_and_counts_the_rest() {
        let e = Explanation {
            step: 7,
            plan_step: 7,
            stage: 0,
            seq_len: 64,
            global_batch_rows: 8,
            dp_rank: 0,
            dp_size: 1,
            counts: (0..100)
                .map(|k| (format!("d{k}"), [5, 3].get(k).copied().unwrap_or(0)))
                .collect(),
            rows: Vec::new(),
            domains: Vec::new(),
        };
        let head = render_explain(&e)
            .lines()
            .next()
            .unwrap_or_default()
            .to_string();
        assert!(
            head.contains("global batch rows: d0 5, d1 3, 98 other domains 0; stage 0"),
            "{head}"
        );
    }
}
