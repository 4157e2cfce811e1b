//! The only source of the protocol's bytes (docs/PROTOCOL.md): the frame codec with fd
//! passing ([`frame`]), the messages frames carry and the protocol version
//! ([`protocol`], [`control`], [`status`]), and the headers of the shared-memory ring ([`ring`]).
//! The daemon, the Rust client, `millrace ctl` and the tests all encode and decode
//! through here, so a change to the wire is made once and both sides move together.

pub mod control;
pub mod frame;
pub mod protocol;
pub mod ring;
pub mod status;

pub use frame::{kind, MAX_FRAME, MAX_JSON_FRAME};
pub use protocol::{
    decode_hex, request_limit, to_hex, Code, FieldSpec, Hello, Reason, Refusal, SlotLayout,
    StageSpec, Welcome, TRAINER_VERSION, VERSION,
};

#[cfg(test)]
mod tests {
    use super::ring::{ring_at, slot_at, MAGIC};
    use super::*;

    /// A Python `struct` format for little-endian words at `(offset, width)`, with `x`
    /// padding for the gaps: what the Python client must use to read those bytes.
    fn py_format(words: &[(usize, usize)]) -> String {
        let mut out = String::from("<");
        let mut at = 0;
        for &(offset, width) in words {
            if offset > at {
                out += &format!("{}x", offset - at);
            }
            out += match width {
                4 => "I",
                8 => "Q",
                _ => unreachable!("only u32 and u64 words"),
            };
            at = offset + width;
        }
        out
    }

    /// The Python client (python/millrace) keeps its own copy of the wire's constants and
    /// struct formats; this holds it to the Rust definitions, so a change here that is
    /// not made there fails the build's tests instead of a trainer. That includes both
    /// protocol versions (HELLO's and CONTROL's) and each slot layout's field names.
    #[test]
    fn python_client_agrees_with_the_wire() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("python/millrace");
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).expect("python client");
        let (client, control) = (read("client.py"), read("control.py"));
        // The arrays each layout stores, as the daemon lays them out (cursor last).
        use crate::serve::ring::{Layout, TokenType};
        for (kind, py) in [
            ("expanded", "FIELDS"),
            ("compact", "SLOT_FIELDS[\"compact\"]"),
        ] {
            let layout = match kind {
                "compact" => Layout::compact(1, 8, 1, TokenType(crate::corpus::DType::Uint16), 8),
                _ => Layout::new(1, 8, 1, TokenType(crate::corpus::DType::Int32), 8),
            };
            // The header's offset table lists the same arrays in the same order.
            let table: &[&str] = match kind {
                "compact" => &ring::COMPACT_FIELDS,
                _ => &ring::EXPANDED_FIELDS,
            };
            let all: Vec<&str> = layout.fields.iter().map(|(n, _)| *n).collect();
            assert_eq!(all, table, "{kind} slot fields vs the header's table");
            // Python's tuple is the arrays before the cursor (what the GPU copy moves).
            let names: Vec<String> = (layout.fields.iter())
                .take_while(|(n, _)| *n != "cursor")
                .map(|(n, _)| format!("\"{n}\""))
                .collect();
            let want = format!("\"{kind}\": ");
            assert!(client.contains(&want), "client.py has no {kind} layout");
            let tuple = format!("({})", names.join(", "));
            assert!(
                client
                    .split_whitespace()
                    .collect::<Vec<_>>()
                    .join(" ")
                    .contains(&tuple),
                "client.py's {py} is not {tuple}"
            );
            // And its TRAILER_FIELDS are the arrays after the cursor.
            let after: Vec<String> = (layout.fields.iter())
                .skip_while(|(n, _)| *n != "cursor")
                .skip(1)
                .map(|(n, _)| format!("\"{n}\","))
                .collect();
            let trailer = format!("\"{kind}\": ({})", after.join(" "));
            assert!(
                client.contains(&trailer),
                "client.py's TRAILER_FIELDS lack {trailer}"
            );
        }
        let slot = py_format(&[
            (slot_at::STEP, 8),
            (slot_at::PLAN_STEP, 8),
            (slot_at::ROWS, 4),
            (slot_at::SEQ_LEN, 4),
            (slot_at::CU_LEN, 4),
            (slot_at::MAX_SEQLEN, 4),
            (slot_at::LOSS_TOKENS, 8),
            (slot_at::REAL_TOKENS, 8),
            (slot_at::CURSOR_LEN, 4),
            (slot_at::PUBLISH_NS, 8),
        ]);
        // The ring format opens with the 8-byte magic ("8s"), then the words after it.
        let ring = py_format(&[
            (ring_at::VERSION - 8, 4),
            (ring_at::SLOTS - 8, 4),
            (ring_at::SLOT_BYTES - 8, 8),
            (ring_at::SLOT_OFFSET - 8, 8),
            (ring_at::FIRST_STEP - 8, 8),
        ])
        .replacen('<', "<8s", 1);
        assert_eq!(ring_at::MAGIC, 0);
        let magic = String::from_utf8_lossy(MAGIC);
        for want in [
            format!("PROTOCOL_VERSION = {TRAINER_VERSION}\n"),
            format!("MAX_FRAME = {MAX_FRAME}\n"),
            format!("MAX_JSON_FRAME = {MAX_JSON_FRAME}\n"),
            format!(
                "HELLO, WELCOME, REFUSED, RELEASE, ERROR, BYE = {}, {}, {}, {}, {}, {}\n",
                kind::HELLO,
                kind::WELCOME,
                kind::REFUSED,
                kind::RELEASE,
                kind::ERROR,
                kind::BYE
            ),
            format!("_SLOT_HEAD = struct.Struct(\"{slot}\")\n"),
            format!("_RING_HEAD = struct.Struct(\"{ring}\")\n"),
            format!("_RING_MAGIC = b\"{magic}\"\n"),
            format!("_PUBLISHED_AT = {}\n", ring_at::PUBLISHED),
            format!("_FIELD_OFFSETS_AT = {}\n", slot_at::FIELD_OFFSETS),
            format!(
                "_FIELD_OFFSETS = struct.Struct(\"<{}Q\")\n",
                ring::FIELD_SLOTS
            ),
            format!("_SLOT_HEADER_BYTES = {}\n", ring::SLOT_HEADER),
            format!("_PAGE_BYTES = {}\n", super::ring::RELEASE_PAGE_BYTES),
            format!("_PAGE_RELEASED_AT = {}\n", super::ring::page_at::RELEASED),
            format!(
                "_PAGE_DAEMON_WAITING_AT = {}\n",
                super::ring::page_at::DAEMON_WAITING
            ),
        ] {
            assert!(
                client.contains(&want),
                "python/millrace/client.py lacks {want:?}"
            );
        }
        let want = format!(
            "CONTROL, CONTROL_REPLY = {}, {}\n",
            kind::CONTROL,
            kind::CONTROL_REPLY
        );
        assert!(control.contains(&want), "control.py lacks {want:?}");
        let want = format!("CONTROL_VERSION = {VERSION}\n");
        assert!(control.contains(&want), "control.py lacks {want:?}");
        assert!(
            control.contains("body.setdefault(\"protocol\", CONTROL_VERSION)"),
            "control.py must send CONTROL_VERSION"
        );
    }

    /// The rows of the first markdown table after `marker` in `doc`, header and rule
    /// excluded, each as its trimmed cells.
    fn table_after<'a>(doc: &'a str, marker: &str) -> Vec<Vec<&'a str>> {
        let at = doc.find(marker).unwrap_or_else(|| panic!("no {marker:?}"));
        let rows: Vec<Vec<&str>> = doc[at..]
            .lines()
            .skip_while(|l| !l.starts_with('|'))
            .take_while(|l| l.starts_with('|'))
            .map(|l| l.trim_matches('|').split('|').map(str::trim).collect())
            .collect();
        assert!(rows.len() > 2, "no table after {marker:?}");
        rows[2..].to_vec()
    }

    /// The words in backticks in `text`.
    fn ticked(text: &str) -> Vec<&str> {
        text.split('`').skip(1).step_by(2).collect()
    }

    /// Every exact table of docs/PROTOCOL.md (and the cursor and index headers of
    /// docs/FORMATS.md) that an independent implementer reads holds what the wire code
    /// does: frame types, ring, slot and release page offsets and widths, the slot's
    /// offset table order, the journal's caps, and every error code both ways.
    #[test]
    fn protocol_md_tables_match_the_wire() {
        let doc = include_str!("../../docs/PROTOCOL.md");
        // Frame types.
        let frames = table_after(doc, "| type | name | direction | payload |");
        let want = [
            ("HELLO", kind::HELLO),
            ("WELCOME", kind::WELCOME),
            ("REFUSED", kind::REFUSED),
            ("RELEASE", kind::RELEASE),
            ("ERROR", kind::ERROR),
            ("BYE", kind::BYE),
            ("CONTROL", kind::CONTROL),
            ("CONTROL_REPLY", kind::CONTROL_REPLY),
        ];
        let got: Vec<(&str, u8)> = (frames.iter())
            .map(|r| (r[1].trim_matches('`'), r[0].parse().expect("a type number")))
            .collect();
        assert_eq!(got, want, "PROTOCOL.md section 1 frame types");
        assert!(doc.contains(&format!("1 ..= {MAX_FRAME} for `RELEASE` and `BYE`")));
        // Offsets and widths: (what the field cell holds, offset, bytes).
        let width = |ty: &str| match ty {
            "u32" => 4,
            "u64" => 8,
            "8 bytes" => 8,
            "u64 x 8" => 8 * ring::FIELD_SLOTS,
            other => panic!("type {other:?}"),
        };
        let check = |marker: &str, want: &[(&str, usize, usize)]| {
            let rows = table_after(doc, marker);
            assert_eq!(rows.len(), want.len(), "rows of the table after {marker:?}");
            for (row, &(field, at, bytes)) in rows.iter().zip(want) {
                assert!(row[2].contains(field), "{marker:?}: {row:?} is not {field}");
                assert_eq!(row[0], at.to_string(), "{marker:?}: offset of {field}");
                assert_eq!(width(row[1]), bytes, "{marker:?}: width of {field}");
            }
        };
        let magic = format!("magic `{}`", String::from_utf8_lossy(MAGIC));
        let version = format!("layout version, {}", ring::LAYOUT_VERSION);
        check(
            &format!("Ring header (the first {} bytes)", ring::RING_HEADER),
            &[
                (&magic, ring_at::MAGIC, 8),
                (&version, ring_at::VERSION, 4),
                ("`slots`", ring_at::SLOTS, 4),
                ("`slot_bytes`", ring_at::SLOT_BYTES, 8),
                ("`slot_offset`", ring_at::SLOT_OFFSET, 8),
                ("first step", ring_at::FIRST_STEP, 8),
                ("`published`", ring_at::PUBLISHED, 8),
            ],
        );
        check(
            &format!("Slot header (the first {} bytes", ring::SLOT_HEADER),
            &[
                ("`step`", slot_at::STEP, 8),
                ("`plan_step`", slot_at::PLAN_STEP, 8),
                ("`rows`", slot_at::ROWS, 4),
                ("`seq_len`", slot_at::SEQ_LEN, 4),
                ("`cu_len`", slot_at::CU_LEN, 4),
                ("`max_seqlen`", slot_at::MAX_SEQLEN, 4),
                ("`loss_tokens`", slot_at::LOSS_TOKENS, 8),
                ("`real_tokens`", slot_at::REAL_TOKENS, 8),
                ("`cursor_len`", slot_at::CURSOR_LEN, 4),
                ("`publish_ns`", slot_at::PUBLISH_NS, 8),
                (
                    "`field_offsets`",
                    slot_at::FIELD_OFFSETS,
                    8 * ring::FIELD_SLOTS,
                ),
                ("`plan_state`", slot_at::PLAN_STATE, 8),
            ],
        );
        let page = table_after(doc, "| bytes | field | written by |");
        let span = |at: usize| format!("{at}..{}", at + 8);
        assert_eq!(page[0][0], span(ring::page_at::RELEASED));
        assert!(page[0][1].starts_with("`released`"));
        assert_eq!(page[2][0], span(ring::page_at::DAEMON_WAITING));
        assert!(page[2][1].starts_with("`daemon_waiting`"));
        // The slot's offset table, in order.
        let flat = doc.split_whitespace().collect::<Vec<_>>().join(" ");
        let order = flat
            .split("`field_offsets` lists the arrays in this order: expanded slots ")
            .nth(1)
            .expect("the offset table's order");
        let (expanded, rest) = order.split_once("; compact slots ").expect("compact");
        assert_eq!(ticked(expanded), ring::EXPANDED_FIELDS);
        let compact = rest.split_once(", then one zero").expect("then one zero").0;
        assert_eq!(ticked(compact), ring::COMPACT_FIELDS);
        // The journal's caps (section 8).
        use crate::plan::journal::{MAX_CHANGES, MAX_POINTS};
        assert!(flat.contains(&format!("`k`: changes, 0..={MAX_CHANGES}")));
        assert!(flat.contains(&format!("`m`: points, 1..={MAX_POINTS}")));
        // Error codes: every code a table lists is one the wire has, and every code the
        // wire has is in a table (or, for ERROR-only codes, in the ERROR frame's row).
        let mut listed: Vec<&str> = Vec::new();
        for marker in ["### Refusals", "**Failures**"] {
            for row in table_after(doc, marker) {
                listed.push(row[0].trim_matches('`'));
            }
        }
        let error_row = frames.iter().find(|r| r[1] == "`ERROR`").expect("ERROR");
        let error_codes = error_row[3].split("`code` is ").nth(1).expect("codes");
        // The codes are the words in backticks outside the parentheses that explain them.
        let mut depth = 0;
        let outside: String = (error_codes.chars())
            .filter(|&ch| {
                depth += (ch == '(') as i32 - (ch == ')') as i32;
                depth == 0 && ch != ')'
            })
            .collect();
        let error_only: Vec<String> = ticked(&outside).into_iter().map(String::from).collect();
        assert!(error_only.len() >= 5, "ERROR codes: {error_only:?}");
        listed.extend(error_only.iter().map(String::as_str));
        for s in &listed {
            let code: Result<Code, _> = serde_json::from_value(serde_json::json!(s));
            assert!(
                code.is_ok(),
                "PROTOCOL.md lists code `{s}`, not in wire::Code"
            );
        }
        for c in Code::ALL {
            assert!(
                listed.contains(&c.as_str()),
                "no PROTOCOL.md table lists `{c}`"
            );
        }

        let keys = |v: serde_json::Value| -> Vec<String> {
            let mut k: Vec<String> = v.as_object().expect("object").keys().cloned().collect();
            k.sort();
            k
        };
        // HELLO and WELCOME: the examples name every key the wire types have, and no other.
        let example = |heading: &str| -> serde_json::Value {
            let at = doc.find(heading).expect("section");
            let body = doc[at..].split("```json").nth(1).expect("example");
            let body = body.split("```").next().expect("example's end");
            let json: Vec<&str> = (body.lines())
                .map(|l| l.split("//").next().unwrap_or(""))
                .collect();
            let json = json
                .join("\n")
                .replace("{...}", "{}")
                .replace(": ...,", ": 0,");
            serde_json::from_str(&json).unwrap_or_else(|e| panic!("{heading}'s example: {e}"))
        };
        let hello = example("## 2. HELLO");
        let parsed: Hello = serde_json::from_value(hello.clone()).expect("HELLO example");
        assert_eq!(
            keys(serde_json::to_value(parsed).expect("hello")),
            keys(hello)
        );
        let welcome = example("## 3. WELCOME");
        let parsed: Welcome = serde_json::from_value(welcome.clone()).expect("WELCOME example");
        assert_eq!(
            keys(serde_json::to_value(parsed).expect("welcome")),
            keys(welcome)
        );

        // CONTROL: every request of the op table is one the daemon parses, as that op.
        let ops = table_after(doc, "| op | request | reply (`ok: true`) |");
        assert_eq!(ops.len(), 5, "PROTOCOL.md's control ops");
        for row in ops {
            let request = row[1].trim_matches('`');
            let parsed = control::parse_control(request.as_bytes());
            let op = format!(
                "{:?}",
                parsed.unwrap_or_else(|e| panic!("{request}: {e:?}"))
            );
            let name: String = (row[0].trim_matches('`').split('_'))
                .map(|w| w[..1].to_uppercase() + &w[1..])
                .collect();
            assert!(op.starts_with(&name), "{request} parsed as {op}");
        }

        // STATUS: the keys of its tables are the keys the daemon sends, both ways.
        let documented = |marker: &str, nested: &[&str]| -> Vec<String> {
            let mut k: Vec<String> = (table_after(doc, marker).iter())
                .flat_map(|r| ticked(r[0]))
                .map(|w| w.trim_end_matches("[]").to_string())
                .filter(|w| !nested.contains(&w.as_str()))
                .collect();
            k.sort();
            k
        };
        let status = status::Status {
            domains: vec![status::DomainStatus::default()],
            ..Default::default()
        };
        let sent = serde_json::to_value(&status).expect("status");
        assert_eq!(documented("**STATUS**", &["rings"]), keys(sent.clone()));
        assert_eq!(
            documented("`domains[]`, per domain:", &[]),
            keys(sent["domains"][0].clone())
        );

        // FORMATS.md: the versions and headers an independent reader starts from.
        let formats = include_str!("../../docs/FORMATS.md");
        let formats = formats.split_whitespace().collect::<Vec<_>>().join(" ");
        use crate::plan::cursor;
        let magic = String::from_utf8_lossy(cursor::MAGIC);
        assert!(formats.contains(&format!("| 0 | 8 bytes | magic `{magic}` |")));
        assert!(
            formats.contains(&format!("and reads 1 to {}", cursor::VERSION)),
            "FORMATS.md must say this build reads cursor layouts 1 to {}",
            cursor::VERSION
        );
        use crate::corpus::megatron::{HEADER_LEN, MAGIC as IDX_MAGIC};
        assert_eq!(IDX_MAGIC, b"MMIDIDX\x00\x00");
        assert!(formats.contains("| 0 | 9 bytes | magic `MMIDIDX\\x00\\x00` |"));
        assert!(formats.contains(&format!("| {HEADER_LEN} | i32[S] | `sequence_lengths`")));
        let fdoc = include_str!("../../docs/FORMATS.md");
        let codes = table_after(fdoc, "| code | dtype | bytes |");
        assert_eq!(codes.len(), 8, "Megatron defines 8 dtype codes");
        for row in codes {
            let code: u8 = row[0].parse().expect("a dtype code");
            let dtype = crate::corpus::DType::from_megatron_code(code).expect("a code");
            assert_eq!(
                (row[1], row[2]),
                (&*dtype.to_string(), &*dtype.size().to_string())
            );
        }
    }
}
