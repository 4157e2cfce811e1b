//! Live changes in words: the reply to `set-weights` or `reload`, and the change journal
//! as a table (`ctl journal`, and the tail of `status`).

use std::fmt::Write as _;

use serde_json::Value;

use millrace::wire::status::{JournalEntry, JournalPoint};

/// The reply to `set_weights` or `reload`, in words.
pub fn describe_change(reply: &Value) -> String {
    let mut s = String::new();
    let op = reply.get("op").and_then(Value::as_str).unwrap_or("change");
    match reply.get("applied_step").and_then(Value::as_u64) {
        None => {
            let _ = writeln!(s, "{op}: nothing changed");
        }
        Some(applied) => {
            let requested = reply.get("requested_step").and_then(Value::as_u64);
            let moved = reply.get("moved").and_then(Value::as_bool) == Some(true);
            match (requested, moved) {
                (Some(r), true) => {
                    let _ = writeln!(
                        s,
                        "{op}: step {r} was already handed out; applied from step {applied} instead"
                    );
                }
                _ => {
                    let _ = writeln!(s, "{op}: applied from step {applied}");
                }
            }
        }
    }
    if let Some(m) = reply.get("message").and_then(Value::as_str) {
        // The daemon's message often restates the step said above; say it once, and
        // what follows it (a reload's note on [serve]) on its own line.
        let step = reply
            .get("applied_step")
            .and_then(Value::as_u64)
            .map(|a| format!("applied from step {a}"));
        let rest = match step.and_then(|p| m.find(&p).map(|i| &m[i + p.len()..])) {
            // ", the first that could still change" qualifies the step the line above
            // gave ("instead"): it printed alone as "  , the first ...".
            Some(rest) => match rest.strip_prefix(',') {
                Some(clause) => clause.split_once(';').map_or("", |(_, after)| after),
                None => rest,
            }
            .trim_start_matches(';')
            .trim_start(),
            None => m,
        };
        if !rest.is_empty() {
            let _ = writeln!(s, "  {rest}");
        }
    }
    s
}

/// The change journal as a table, oldest first.
pub fn render_journal(entries: &[JournalEntry]) -> String {
    if entries.is_empty() {
        return "no changes: the config's schedule is in force\n".into();
    }
    let mut s = format!(
        "{:>10} {:>10}  {:<7} points\n",
        "at step", "plan step", "source"
    );
    for e in entries {
        let _ = writeln!(
            s,
            "{:>10} {:>10}  {:<7} {}",
            e.at_step,
            e.plan_step,
            if e.source.is_empty() { "-" } else { &e.source },
            change_text(e)
        );
    }
    s
}

/// What one change sets, in words: its schedule points, or the stage it adds.
pub(super) fn change_text(e: &JournalEntry) -> String {
    let mut points: Vec<String> = e.points.iter().map(point_text).collect();
    if let Some(st) = &e.stage {
        points.push(format!(
            "stage: {} tokens x {} rows, window {}{}",
            st.seq_len,
            st.global_batch_rows,
            st.best_fit_window,
            if st.chain_groups { ", chained" } else { "" }
        ));
    }
    points.join("; ")
}

/// One schedule point as `step N: name=w name=w`, names in order.
pub(super) fn point_text(p: &JournalPoint) -> String {
    let weights = p
        .weights
        .iter()
        .map(|(k, v)| format!("{k}={}", trim_float(*v)))
        .collect::<Vec<_>>()
        .join(" ");
    format!("step {}: {weights}", p.step)
}

/// At most four decimals, trailing zeros dropped: `0.5`, `1`, `0.3333`; below 0.001,
/// four significant digits (`3e-5`, `1.235e-4`), since a weight that small is in force
/// and its domain served, and four decimals printed it as `0`.
pub(super) fn trim_float(f: f64) -> String {
    if f != 0.0 && f.abs() < 1e-3 {
        let s = format!("{f:.3e}");
        return match s.split_once('e') {
            Some((m, e)) => {
                let m = m.trim_end_matches('0').trim_end_matches('.');
                format!("{m}e{e}")
            }
            None => s,
        };
    }
    let s = format!("{f:.4}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s.is_empty() || s == "-" {
        "0".into()
    } else {
        s.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A weight below 0.00005 printed as `0` (the journal's JSON had it right).
    #[test]
    fn small_weights_keep_their_digits() {
        for (f, want) in [
            (0.5, "0.5"),
            (1.0, "1"),
            (1.0 / 3.0, "0.3333"),
            (0.0, "0"),
            (0.0012, "0.0012"),
            (3e-5, "3e-5"),
            (1.23456e-4, "1.235e-4"),
            (1e-9, "1e-9"),
        ] {
            assert_eq!(trim_float(f), want, "{f}");
        }
    }

    #[test]
    fn a_restated_step_is_said_once() {
        let reply = json!({"ok": true, "op": "set_weights", "applied_step": 51,
                           "requested_step": 51, "moved": false,
                           "message": "applied from step 51"});
        assert_eq!(
            describe_change(&reply),
            "set_weights: applied from step 51\n"
        );
    }

    /// A late change's reply: its qualifier printed alone, as "  , the first that could
    /// still change".
    #[test]
    fn a_late_change_says_its_step_once_without_a_dangling_clause() {
        let reply = json!({"ok": true, "op": "set_weights", "applied_step": 11,
                           "requested_step": 5, "moved": true,
                           "message": "step 5 was already published; applied from step 11, \
                                       the first that could still change; note: reload kept [serve]"});
        assert_eq!(
            describe_change(&reply),
            "set_weights: step 5 was already handed out; applied from step 11 instead\n  \
             note: reload kept [serve]\n"
        );
        let reply = json!({"ok": true, "op": "set_weights", "applied_step": 11,
                           "requested_step": 5, "moved": true,
                           "message": "step 5 was already published; applied from step 11, \
                                       the first that could still change"});
        assert_eq!(
            describe_change(&reply),
            "set_weights: step 5 was already handed out; applied from step 11 instead\n"
        );
    }

    #[test]
    fn change_replies_in_words() {
        let t = describe_change(
            &json!({"ok": true, "op": "set_weights", "requested_step": 5,
                                         "applied_step": 9, "moved": true, "message": "m"}),
        );
        assert!(
            t.contains("step 5 was already handed out; applied from step 9"),
            "{t}"
        );
        let t = describe_change(&json!({"ok": true, "op": "reload", "requested_step": null,
                                         "applied_step": null, "moved": false, "message": "no change"}));
        assert!(
            t.contains("nothing changed") && t.contains("no change"),
            "{t}"
        );
        let entry = serde_json::from_value(json!({"at_step": 7, "plan_step": 7, "source": "file",
                                                  "points": [{"step": 7, "weights": {"web": 1.0}}]}))
        .unwrap();
        let j = render_journal(&[entry]);
        assert!(j.contains("file") && j.contains("step 7: web=1"), "{j}");
        // A stage added live (`set_stage`): its shape instead of points.
        let entry = serde_json::from_value(json!({"at_step": 9, "plan_step": 9, "source": "ctl",
            "points": [], "stage": {"seq_len": 4096, "global_batch_rows": 8,
                                    "best_fit_window": 64, "chain_groups": true}}))
        .unwrap();
        let j = render_journal(&[entry]);
        assert!(
            j.contains("stage: 4096 tokens x 8 rows, window 64, chained"),
            "{j}"
        );
        // The exact layout: right-aligned steps, the source padded, points in name order.
        let entry = serde_json::from_value(json!({"at_step": 40, "plan_step": 41, "source": "ctl",
            "points": [{"step": 41, "weights": {"web": 0.5, "code": 0.33333}},
                       {"step": 90, "weights": {"web": 0.0}}]}))
        .unwrap();
        assert_eq!(
            render_journal(&[entry]),
            "   at step  plan step  source  points\n        40         41  ctl     \
             step 41: code=0.3333 web=0.5; step 90: web=0\n"
        );
    }
}
