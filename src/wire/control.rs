//! CONTROL requests (docs/PROTOCOL.md section 7) as the daemon parses them: the ops,
//! their fields and the checks that refuse a malformed request with a message. Parsing
//! is total over arbitrary bytes, like the frame decoder.

use serde::Deserialize;

use super::VERSION;

/// One decoded control request (docs/PROTOCOL.md, control connections).
#[derive(Debug, Clone, PartialEq)]
pub enum Control {
    /// The daemon's status.
    Status,
    /// The journal of live changes.
    Journal,
    /// Re-read the config file, as SIGHUP does.
    Reload,
    /// Change mixture weights from a step on.
    SetWeights {
        /// Raw weights of the named domains.
        weights: std::collections::BTreeMap<String, f64>,
        /// Trainer step; `None` = the first that can still change.
        at_step: Option<u64>,
        /// Move a late change to the first changeable step instead of refusing it.
        late_next: bool,
        /// "ctl" or "client" (the trainer itself), for the journal.
        source: &'static str,
    },
    /// Add a stage from a step on: a `[[plan.stage]]` by a live change (a
    /// long-context stage without a restart).
    SetStage {
        /// Tokens a row trains on.
        seq_len: u32,
        /// Rows per global batch.
        global_batch_rows: u32,
        /// Units per packing window; `None` keeps the one in force.
        best_fit_window: Option<u64>,
        /// Whether `sequence`-grouped domains chain their long groups.
        chain_groups: bool,
        /// Trainer step; `None` = the first that can still change.
        at_step: Option<u64>,
        /// Move a late change to the first changeable step instead of refusing it.
        late_next: bool,
        /// "ctl" or "client", for the journal.
        source: &'static str,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawControl {
    protocol: u32,
    op: String,
    #[serde(default)]
    weights: Option<UniqueWeights>,
    #[serde(default)]
    at_step: Option<u64>,
    #[serde(default)]
    late: Option<String>,
    #[serde(default)]
    source: Option<String>,
    #[serde(default)]
    seq_len: Option<u32>,
    #[serde(default)]
    global_batch_rows: Option<u32>,
    #[serde(default)]
    best_fit_window: Option<u64>,
    #[serde(default)]
    chain_groups: Option<bool>,
}

/// The `weights` of a request: a map that refuses a domain named twice (as `ctl
/// set-weights` does) instead of keeping the last of the two weights, as a JSON map would.
struct UniqueWeights(std::collections::BTreeMap<String, f64>);

impl<'de> Deserialize<'de> for UniqueWeights {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = UniqueWeights;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a map of domain names to weights")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<UniqueWeights, A::Error> {
                let mut out = std::collections::BTreeMap::new();
                while let Some((name, w)) = map.next_entry::<String, f64>()? {
                    if out.contains_key(&name) {
                        let m = format!("weights names domain {name:?} twice");
                        return Err(serde::de::Error::custom(m));
                    }
                    out.insert(name, w);
                }
                Ok(UniqueWeights(out))
            }
        }
        d.deserialize_map(V)
    }
}

/// Parses a CONTROL payload; the error is `(op as far as known, message)`. Total over
/// arbitrary bytes, like [`super::frame::parse_frame`].
pub fn parse_control(payload: &[u8]) -> Result<Control, (String, String)> {
    let raw: RawControl =
        serde_json::from_slice(payload).map_err(|e| match field_at_fault(payload) {
            Some((op, why)) => (op, format!("CONTROL is not a valid request: {why}")),
            None => (
                String::new(),
                format!("CONTROL is not a valid request: {e}"),
            ),
        })?;
    let op = raw.op.clone();
    let fail = |m: String| Err((op.clone(), m));
    if raw.protocol != VERSION {
        return fail(format!(
            "protocol {} is not spoken here (this daemon speaks {VERSION})",
            raw.protocol
        ));
    }
    let stage = raw.seq_len.is_some()
        || raw.global_batch_rows.is_some()
        || raw.best_fit_window.is_some()
        || raw.chain_groups.is_some();
    let extra = raw.weights.is_some() || raw.at_step.is_some() || raw.late.is_some() || stage;
    let late_next = match raw.late.as_deref() {
        None | Some("refuse") => false,
        Some("next") => true,
        Some(other) => return fail(format!("late {other:?} is not \"refuse\" or \"next\"")),
    };
    let source = match raw.source.as_deref() {
        None | Some("ctl") => "ctl",
        Some("client") => "client",
        Some(other) => return fail(format!("source {other:?} is not \"ctl\" or \"client\"")),
    };
    match raw.op.as_str() {
        "status" | "journal" | "reload" if extra => fail(format!(
            "op {op:?} takes no weights, stage, at_step or late"
        )),
        "status" => Ok(Control::Status),
        "journal" => Ok(Control::Journal),
        "reload" => Ok(Control::Reload),
        "set_weights" if stage => fail(
            "set_weights takes no seq_len, global_batch_rows, best_fit_window or chain_groups \
             (set_stage does)"
                .into(),
        ),
        "set_weights" => {
            let Some(UniqueWeights(weights)) = raw.weights else {
                return fail("set_weights needs \"weights\": {domain: weight}".into());
            };
            // An empty map would change no weight yet still hold the weights of its step
            // over the schedule's later points (ctl and the Python client refuse it too).
            if weights.is_empty() {
                return fail("set_weights needs at least one domain in \"weights\"".into());
            }
            Ok(Control::SetWeights {
                weights,
                at_step: raw.at_step,
                late_next,
                source,
            })
        }
        "set_stage" => {
            if raw.weights.is_some() {
                return fail("set_stage takes no weights (set_weights does)".into());
            }
            let (Some(seq_len), Some(global_batch_rows)) = (raw.seq_len, raw.global_batch_rows)
            else {
                return fail("set_stage needs \"seq_len\" and \"global_batch_rows\"".into());
            };
            Ok(Control::SetStage {
                seq_len,
                global_batch_rows,
                best_fit_window: raw.best_fit_window,
                chain_groups: raw.chain_groups.unwrap_or(false),
                at_step: raw.at_step,
                late_next,
                source,
            })
        }
        other => fail(format!(
            "unknown op {other:?} (status, set_weights, set_stage, reload, journal)"
        )),
    }
}

/// The op (as far as known) and the key at fault of a JSON object that does not read as
/// [`RawControl`] because one of its values has the wrong type or range: serde names only
/// the line and column (`invalid value: integer 8589934592, expected u32 at line 1
/// column 62`), which does not say that `seq_len` was the fault. `None` when the payload
/// is not a JSON object or every known key reads alone (a missing or unknown key, which
/// serde's message names itself).
fn field_at_fault(payload: &[u8]) -> Option<(String, String)> {
    use serde_json::{from_value, Value};
    fn reads<T: serde::de::DeserializeOwned>(v: &Value) -> Result<(), String> {
        from_value::<T>(v.clone())
            .map(drop)
            .map_err(|e| e.to_string())
    }
    let Ok(Value::Object(m)) = serde_json::from_slice::<Value>(payload) else {
        return None;
    };
    let op = m
        .get("op")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    m.iter().find_map(|(k, v)| {
        let r = match k.as_str() {
            "protocol" => reads::<u32>(v),
            "op" | "late" | "source" => reads::<Option<String>>(v),
            "weights" => reads::<Option<UniqueWeights>>(v),
            "at_step" | "best_fit_window" => reads::<Option<u64>>(v),
            "seq_len" | "global_batch_rows" => reads::<Option<u32>>(v),
            "chain_groups" => reads::<Option<bool>>(v),
            _ => Ok(()),
        };
        r.err().map(|e| (op.clone(), format!("`{k}`: {e}")))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn control_requests() {
        let p = |s: &str| parse_control(s.as_bytes());
        assert_eq!(p(r#"{"protocol":1,"op":"status"}"#), Ok(Control::Status));
        assert_eq!(
            p(r#"{"protocol":1,"op":"set_weights","weights":{"a":1.5},"at_step":7,"late":"next"}"#),
            Ok(Control::SetWeights {
                weights: [("a".to_string(), 1.5)].into(),
                at_step: Some(7),
                late_next: true,
                source: "ctl"
            })
        );
        assert!(p(r#"{"protocol":2,"op":"status"}"#)
            .unwrap_err()
            .1
            .contains("protocol 2"));
        assert!(p(r#"{"protocol":1,"op":"set_weights"}"#)
            .unwrap_err()
            .1
            .contains("weights"));
        assert!(p(r#"{"protocol":1,"op":"set_weights","weights":{"a":NaN}}"#).is_err());
        // An empty map is refused, not taken as a change that only flattens the schedule.
        let e = p(r#"{"protocol":1,"op":"set_weights","weights":{}}"#).unwrap_err();
        assert!(e.1.contains("at least one domain"), "{e:?}");
        // A domain named twice is refused, not read as the last of its two weights.
        let e = p(r#"{"protocol":1,"op":"set_weights","weights":{"a":1,"a":0}}"#).unwrap_err();
        assert!(e.1.contains(r#"names domain "a" twice"#), "{e:?}");
        assert_eq!(
            p(r#"{"protocol":1,"op":"status","weights":null}"#),
            Ok(Control::Status)
        );
        assert!(p(r#"{"protocol":1,"op":"frob"}"#)
            .unwrap_err()
            .1
            .contains("frob"));
        assert!(p(r#"{"protocol":1,"op":"status","late":"next"}"#).is_err());
        assert_eq!(
            p(r#"{"protocol":1,"op":"set_stage","at_step":9,"seq_len":64,"global_batch_rows":2}"#),
            Ok(Control::SetStage {
                seq_len: 64,
                global_batch_rows: 2,
                best_fit_window: None,
                chain_groups: false,
                at_step: Some(9),
                late_next: false,
                source: "ctl"
            })
        );
        assert!(p(r#"{"protocol":1,"op":"set_stage","seq_len":64}"#)
            .unwrap_err()
            .1
            .contains("global_batch_rows"));
        assert!(
            p(r#"{"protocol":1,"op":"set_stage","seq_len":-1,"global_batch_rows":2}"#).is_err()
        );
        // A value of the wrong type or range names its key (and the op), not a column.
        for (req, key) in [
            (
                r#"{"protocol":1,"op":"set_stage","seq_len":8589934592,"global_batch_rows":2}"#,
                "seq_len",
            ),
            (
                r#"{"protocol":1,"op":"set_stage","seq_len":8,"global_batch_rows":-2}"#,
                "global_batch_rows",
            ),
            (
                r#"{"protocol":1,"op":"set_weights","weights":{"a":1},"at_step":1.5}"#,
                "at_step",
            ),
            (
                r#"{"protocol":1,"op":"set_weights","weights":{"a":"x"}}"#,
                "weights",
            ),
            (
                r#"{"protocol":1,"op":"set_weights","weights":{"a":1},"late":5}"#,
                "late",
            ),
        ] {
            let (op, m) = p(req).unwrap_err();
            assert!(
                m.contains(&format!("`{key}`: ")) && !m.contains("column"),
                "{req}: {m}"
            );
            assert!(!op.is_empty(), "{req}: {m}");
        }
        assert!(
            p(r#"{"protocol":1,"op":"set_weights","weights":{"a":1},"seq_len":64}"#)
                .unwrap_err()
                .1
                .contains("set_stage")
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4096))]
        /// Control requests built from arbitrary JSON values parse or are refused with a
        /// message, never a panic.
        #[test]
        fn control_parser_is_total(op in "[a-z_]{0,12}", at in any::<u64>(), w in any::<f64>(), late in "[a-z]{0,6}") {
            let req = serde_json::json!({"protocol": 1, "op": op, "weights": {"a": w}, "at_step": at, "late": late});
            let _ = parse_control(req.to_string().as_bytes());
        }
    }
}
