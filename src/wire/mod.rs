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
}
