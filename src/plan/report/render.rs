//! The text of the reports: what `millrace plan` and `explain` print from the figures
//! that [`super::Tally`] and [`super::positions`] compute (the JSON is those figures).

use super::{DomainPosition, UpsampleSwitch, WindowFigures};
use crate::config::plan::Upsample;

/// Human-readable positions: one line per domain, with the step it first had rows in
/// the steps reported (`first_rows`, from [`Tally::first_rows`]; empty to leave out).
pub fn render_positions(title: &str, at: &[DomainPosition], first_rows: &[Option<u64>]) -> String {
    use std::fmt::Write;
    let mut s = format!("{title}\n");
    for (i, p) in at.iter().enumerate() {
        let weighted = p.weighted_from.map_or("never weighted".to_string(), |w| {
            format!("weighted from step {w}")
        });
        let rows = match first_rows.get(i) {
            Some(Some(f)) => format!("  rows in these steps from step {f}"),
            Some(None) => "  no rows in these steps".to_string(),
            None => String::new(),
        };
        let mut ups = match p.upsample {
            Some(u) => format!("  upsampling {}", render_upsample(Some(u))),
            None => String::new(),
        };
        if let Some((step, u)) = p.next_upsample {
            let _ = write!(
                ups,
                "  next epoch: upsampling {} (stage from step {step})",
                render_upsample(u)
            );
        }
        let _ = writeln!(
            s,
            "    {:<12} epoch {} {:>7.3}% consumed  rows {:>8}  {weighted}{rows}{ups}",
            p.name,
            p.epoch,
            100.0 * p.epoch_fraction,
            p.rows
        );
    }
    s
}

/// An upsampling setting in a line of text: `x2 over 32768 tokens`, or `off`.
pub fn render_upsample(u: Option<Upsample>) -> String {
    match u {
        Some(u) => format!("x{} over {} tokens", u.factor, u.min_tokens),
        None => "off".to_string(),
    }
}

/// Human-readable upsampling switches ([`Tally::upsampling`]): per domain and stage,
/// the setting and the epoch that took it.
pub fn render_upsampling(switches: &[UpsampleSwitch]) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    for w in switches {
        let effect = match (w.epoch, w.from_step) {
            (Some(e), Some(step)) => format!("epoch {e}, begun at step {step}"),
            (Some(e), None) => format!("epoch {e}, begun before the steps planned"),
            _ => "no epoch began with it in the steps planned".to_string(),
        };
        let _ = writeln!(
            s,
            "upsampling {}: {} for epochs beginning from step {} (stage {}); first used by {effect}",
            w.domain,
            render_upsample(w.upsample),
            w.stage_step,
            w.stage
        );
    }
    s
}

/// Human-readable window figures, one block per window.
pub fn render_windows(windows: &[WindowFigures]) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    for w in windows {
        let buckets: Vec<String> = w
            .by_length
            .iter()
            .map(|b| {
                let label = match b.max_doc_len {
                    u64::MAX => "longer".to_string(),
                    m => format!("<={m}"),
                };
                format!(
                    "{label} {:.2} docs {:.0} tokens",
                    b.docs_per_row, b.tokens_per_row
                )
            })
            .collect();
        let _ = writeln!(
            s,
            "steps {}..={}: padding {:.3}%  truncation {:.3}%  docs/row mean {:.2} p50 {} p99 {}  groups/batch mean {:.1} max {}  duplicates {}  split groups {}  over-cap groups {}",
            w.first_step,
            w.last_step,
            w.padding_pct,
            w.truncation_pct,
            w.docs_per_row[0],
            w.docs_per_row[1],
            w.docs_per_row[2],
            w.groups_per_batch[0],
            w.groups_per_batch[1],
            w.duplicates,
            w.split_groups,
            w.capped_groups
        );
        let _ = writeln!(
            s,
            "    stage {} ({} rows of {} tokens)  dropped at the switch {} tokens  \
             single-group rows {:.1}%\n    per row by document length: {}",
            w.stage,
            w.rows_per_batch,
            w.seq_len,
            w.dropped_tokens,
            w.single_group_rows_pct,
            buckets.join(", ")
        );
        for d in &w.domains {
            let _ = writeln!(
                s,
                "    {:<12} share {:>7.3}% (target {:>7.3}%)  rows {:>8}  epochs {:.4}",
                d.name,
                100.0 * d.token_share,
                100.0 * d.target_share,
                d.rows,
                d.epochs
            );
        }
    }
    s
}
