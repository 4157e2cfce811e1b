//! Live changes in words: the reply to `set-weights` or `reload`, and the change journal
//! as a table (`ctl journal`, and the tail of `status`).

use std::fmt::Write as _;

use serde_json::Value;

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
        // The daemon's message often restates the step said above; say it once.
        let restated = reply
            .get("applied_step")
            .and_then(Value::as_u64)
            .is_some_and(|a| m.contains(&format!("applied from step {a}")));
        if !m.is_empty() && !restated {
            let _ = writeln!(s, "  {m}");
        }
    }
    s
}

/// The change journal as a table, oldest first.
pub fn render_journal(entries: &[Value]) -> String {
    if entries.is_empty() {
        return "no changes: the config's schedule is in force\n".into();
    }
    let mut s = format!(
        "{:>10} {:>10}  {:<7} points\n",
        "at step", "plan step", "source"
    );
    for e in entries {
        let points: Vec<String> = e
            .get("points")
            .and_then(Value::as_array)
            .map(|ps| ps.iter().map(point_text).collect())
            .unwrap_or_default();
        let _ = writeln!(
            s,
            "{:>10} {:>10}  {:<7} {}",
            num_or_dash(e.get("at_step")),
            num_or_dash(e.get("plan_step")),
            e.get("source").and_then(Value::as_str).unwrap_or("-"),
            points.join("; ")
        );
    }
    s
}

pub(super) fn point_text(p: &Value) -> String {
    let weights = p
        .get("weights")
        .and_then(Value::as_object)
        .map(|w| {
            w.iter()
                .map(|(k, v)| format!("{k}={}", v.as_f64().map_or("?".into(), trim_float)))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default();
    format!("step {}: {weights}", num_or_dash(p.get("step")))
}

pub(super) fn trim_float(f: f64) -> String {
    let s = format!("{f:.4}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s.is_empty() || s == "-" {
        "0".into()
    } else {
        s.into()
    }
}

pub(super) fn num_or_dash(v: Option<&Value>) -> String {
    match v {
        Some(Value::Number(n)) => n.to_string(),
        _ => "-".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

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
        let j = render_journal(&[json!({"at_step": 7, "plan_step": 7, "source": "file",
                                         "points": [{"step": 7, "weights": {"web": 1.0}}]})]);
        assert!(j.contains("file") && j.contains("step 7: web=1"), "{j}");
    }
}
