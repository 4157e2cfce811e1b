//! The messages of docs/PROTOCOL.md that frames carry: the protocol version, the HELLO a
//! client opens with, the WELCOME, the REFUSED and ERROR reasons with their codes, and
//! the hex of cursor blobs. Frames are [`super::frame`]'s, CONTROL requests
//! [`super::control`]'s.
//!
//! Parsing is total over arbitrary bytes so that a property test can throw anything at
//! it; the connection code only feeds it what a frame carried.

use serde::{Deserialize, Serialize};

use crate::config::plan::{MAX_BATCH_ROWS, MAX_STEP};
use crate::wire::frame::{MAX_FRAME, MAX_JSON_FRAME};

/// Version of the control protocol (the `protocol` key of CONTROL requests), spoken by
/// the daemon, `millrace ctl` and `millrace.Control` alike. Control requests did not
/// change with compact slots, so it stays 1.
pub const VERSION: u32 = 1;
/// Version of the trainer protocol (the `protocol` key of HELLO and WELCOME). 2 since
/// slots come in two layouts ([`SlotLayout`]): a version-1 client would read a compact
/// slot as garbage, so it is refused (`protocol`) and told to upgrade.
pub const TRAINER_VERSION: u32 = 2;

/// What a slot holds (docs/PROTOCOL.md section 4), chosen per ring by the HELLO that
/// creates it: compact (the default) carries only what cannot be derived and lets the
/// client derive the rest; expanded carries ready arrays for consumers that want them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SlotLayout {
    /// Per row the `seq_len + 1` tokens in the shards' dtype, a bitmap of document
    /// starts, the real-token count; domain and loss-token count per row; the cursor.
    #[default]
    Compact,
    /// tokens, labels, loss_mask, position_ids, cu_seqlens, domain, row_loss_tokens,
    /// cursor: everything ready to hand to a model.
    Expanded,
}

impl SlotLayout {
    /// The name on the wire and in logs.
    pub fn as_str(self) -> &'static str {
        match self {
            SlotLayout::Compact => "compact",
            SlotLayout::Expanded => "expanded",
        }
    }
}
/// The stable codes of REFUSED and ERROR frames and of refused CONTROL replies
/// (docs/PROTOCOL.md sections 2 and 7): one enum, so the daemon can only send a code the
/// page lists, and it serializes to exactly those strings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Code {
    /// `protocol`: the request breaks the protocol (framing, version, JSON).
    Protocol,
    /// `bad_hello`: a HELLO field is missing, mistyped or out of range.
    BadHello,
    /// `limit`: a number past the daemon's bounds.
    Limit,
    /// `replicas`: a peer past the declared `replicas`, or disagreeing with it.
    Replicas,
    /// `memory`: the ring would exceed `[serve] ring_memory_bytes`.
    Memory,
    /// `cancelled`: the client left while its start step was sought (only logged).
    Cancelled,
    /// `dp_size`: `dp_size` does not divide the batch or differs from the job's.
    DpSize,
    /// `layout`: the micro-batch split does not match the rank's rows or its peers.
    Layout,
    /// `duplicate`: the same (job, dp_rank, replica) is connected.
    Duplicate,
    /// `fingerprint`: the plan fingerprint is not the daemon's.
    Fingerprint,
    /// `access`: the peer's uid/gid is not allowed.
    Access,
    /// `cursor`: the cursor blob does not decode or belongs elsewhere.
    Cursor,
    /// `peer_position`: the live ring does not hold the client's step or blob.
    PeerPosition,
    /// `materialize`: a shard faulted while the client's batches were made.
    Materialize,
    /// `busy`: retry later: draining, full, racing a change, or an internal error.
    Busy,
    /// `shutdown`: the daemon is stopping.
    Shutdown,
    /// `idle`: the client sent nothing for too long.
    Idle,
    /// `late`: a live change names a step that can no longer change.
    Late,
    /// `invalid`: a live change or config is not valid.
    Invalid,
}

impl Code {
    /// Every code, so tests can hold docs/PROTOCOL.md to the enum both ways.
    #[cfg(test)]
    pub(crate) const ALL: [Code; 19] = [
        Code::Protocol,
        Code::BadHello,
        Code::Limit,
        Code::Replicas,
        Code::Memory,
        Code::Cancelled,
        Code::DpSize,
        Code::Layout,
        Code::Duplicate,
        Code::Fingerprint,
        Code::Access,
        Code::Cursor,
        Code::PeerPosition,
        Code::Materialize,
        Code::Busy,
        Code::Shutdown,
        Code::Idle,
        Code::Late,
        Code::Invalid,
    ];

    /// The code as it stands on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Code::Protocol => "protocol",
            Code::BadHello => "bad_hello",
            Code::Limit => "limit",
            Code::Replicas => "replicas",
            Code::Memory => "memory",
            Code::Cancelled => "cancelled",
            Code::DpSize => "dp_size",
            Code::Layout => "layout",
            Code::Duplicate => "duplicate",
            Code::Fingerprint => "fingerprint",
            Code::Access => "access",
            Code::Cursor => "cursor",
            Code::PeerPosition => "peer_position",
            Code::Materialize => "materialize",
            Code::Busy => "busy",
            Code::Shutdown => "shutdown",
            Code::Idle => "idle",
            Code::Late => "late",
            Code::Invalid => "invalid",
        }
    }
}

impl std::fmt::Display for Code {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Lets tests and logs compare a code with its wire string.
impl PartialEq<&str> for Code {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

/// The `{code, message}` payload of REFUSED and ERROR frames, both ways.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reason {
    /// A stable code from docs/PROTOCOL.md.
    pub code: String,
    /// Human-readable detail.
    #[serde(default)]
    pub message: String,
}

impl Reason {
    /// Decodes a REFUSED or ERROR payload.
    pub fn decode(payload: &[u8]) -> Result<Reason, serde_json::Error> {
        serde_json::from_slice(payload)
    }
}

/// A REFUSED or ERROR payload.
pub fn reason(code: Code, message: &str) -> Vec<u8> {
    let r = Reason {
        code: code.as_str().into(),
        message: message.into(),
    };
    // A struct of two strings always serializes.
    serde_json::to_vec(&r).unwrap_or_default()
}

/// A client's HELLO (docs/PROTOCOL.md, section 2): what the Rust client sends and the
/// daemon parses, one type so the two cannot drift. Optional fields the client leaves
/// out are not sent; the daemon fills in their defaults.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hello {
    /// Must be [`TRAINER_VERSION`].
    pub protocol: u32,
    /// Job id: namespaces rings and dp_size.
    pub job: String,
    /// Data-parallel rank.
    pub dp_rank: u32,
    /// Data-parallel world size.
    pub dp_size: u32,
    /// This client's name among the peers of its dp rank.
    #[serde(default = "default_replica")]
    pub replica: String,
    /// Peers of this dp rank that connect to this daemon.
    #[serde(default = "one")]
    pub replicas: u32,
    /// Rows per micro-batch (`None`: not sent, and the daemon takes the whole slice).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub micro_batch_rows: Option<u32>,
    /// Micro-batches per step.
    #[serde(default = "one")]
    pub micro_batches: u32,
    /// Hex cursor blob to resume from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cursor: Option<String>,
    /// Step to seek to when there is no cursor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_step: Option<u64>,
    /// Refuse unless the daemon's plan fingerprint is this (32 hex digits).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
    /// The slot layout of the ring this client creates (`None`: compact); a peer of a
    /// live ring must ask for the ring's layout or leave it out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot_layout: Option<SlotLayout>,
    /// The client reads each slot's shape from its header and WELCOME `stages`, so it
    /// may be served a plan whose shape changes at a step (`[[plan.stage]]`); a client
    /// that does not say so is refused such a plan (`protocol`) rather than misread it.
    /// The Rust [`crate::client::Client`] reads slots so and always sends `true`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stages: bool,
    /// The client publishes its releases in a release page (docs/PROTOCOL.md section 5)
    /// instead of a RELEASE frame per slot: the daemon passes the page as WELCOME's third
    /// fd. [`Hello::new`] asks for it; a client that leaves it out sends frames as before.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub release_page: bool,
}

/// One stage of the plan as WELCOME describes it (docs/PROTOCOL.md section 3): from
/// plan step `step` on, a slot holds `rows` rows of `seq_len` at these `fields`, so a
/// client can size its buffers ahead and read any slot by its header's `plan_step`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageSpec {
    /// Arrays inside a slot of this stage, by name.
    pub fields: std::collections::BTreeMap<String, FieldSpec>,
    /// Rows per micro-batch in this stage (`rows / micro_batches`).
    pub micro_batch_rows: u32,
    /// Rows per step for this rank.
    pub rows: u32,
    /// Inputs per row.
    pub seq_len: u32,
    /// First plan step of the stage (0 for the first).
    pub step: u64,
}

/// One array of a slot as WELCOME describes it. Fields are in the order the daemon
/// has always sent them (alphabetical), so the WELCOME bytes did not change when this
/// type replaced a JSON literal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldSpec {
    /// numpy-style dtype name.
    pub dtype: String,
    /// Offset from the slot's start.
    pub offset: u64,
    /// Array shape.
    pub shape: Vec<u64>,
}

/// The WELCOME reply (docs/PROTOCOL.md, section 3): built by the daemon, checked by the
/// Rust client. Fields are alphabetical, the order the daemon's JSON always had.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    /// Domain names, indexed by the slots' `domain` array.
    pub domains: Vec<String>,
    /// Data-parallel rank.
    pub dp_rank: u32,
    /// Data-parallel size.
    pub dp_size: u32,
    /// End-of-document id, if the plan has one.
    #[serde(default)]
    pub eod_token: Option<i64>,
    /// Arrays inside a slot, by name.
    pub fields: std::collections::BTreeMap<String, FieldSpec>,
    /// Plan fingerprint (32 hex digits).
    pub fingerprint: String,
    /// Rows per micro-batch.
    pub micro_batch_rows: u32,
    /// Micro-batches per step.
    pub micro_batches: u32,
    /// Padding id.
    pub pad_token: i64,
    /// Protocol version, [`TRAINER_VERSION`].
    pub protocol: u32,
    /// The HELLO asked for a release page and WELCOME carries it as its third fd
    /// ([ring_fd, ready_fd, page_fd]).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub release_page: bool,
    /// Size of the memfd.
    pub ring_bytes: u64,
    /// Rows per step for this rank.
    pub rows: u32,
    /// Inputs per row.
    pub seq_len: u32,
    /// Stride between slots.
    pub slot_bytes: u64,
    /// What the slots hold, and so which `fields` there are.
    pub slot_layout: SlotLayout,
    /// Byte offset of slot 0.
    pub slot_offset: u64,
    /// Slots in the ring.
    pub slots: u32,
    /// The plan's stages, first to last (one for a plan of one shape); the top-level
    /// `rows`, `seq_len`, `micro_batch_rows` and `fields` are the first stage's.
    #[serde(default)]
    pub stages: Vec<StageSpec>,
    /// The first step this client will receive.
    pub start_step: u64,
    /// dtype of tokens and labels.
    pub token_dtype: String,
    /// The tokenizer's vocabulary size, if the plan names one.
    #[serde(default)]
    pub vocab_size: Option<u64>,
}

/// Most peers one dp rank may announce (`replicas`): a node's TP x PP x CP peers.
pub const MAX_REPLICAS: u32 = 1024;
/// Longest job or replica name, in bytes.
pub const MAX_NAME: usize = 128;

/// Whether `b` may appear in a job or replica name: names go into logs, metrics labels
/// and memfd names, so nothing that could forge a log line or a label (newlines, quotes,
/// spaces, control bytes) is allowed.
pub fn name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-_.:@+=/".contains(&b)
}

/// Checks a job or replica name: 1..=[`MAX_NAME`] bytes of [`name_byte`]s; the refusal
/// names the field and the first bad byte.
fn check_name(field: &str, name: &str) -> Result<(), Refusal> {
    if name.is_empty() || name.len() > MAX_NAME {
        return Err(Refusal::new(
            Code::BadHello,
            format!(
                "HELLO field `{field}` must be 1..={MAX_NAME} bytes, got {}",
                name.len()
            ),
        ));
    }
    if let Some(i) = name.bytes().position(|b| !name_byte(b)) {
        return Err(Refusal::new(
            Code::BadHello,
            format!(
                "HELLO field `{field}` has byte 0x{:02x} at offset {i}: names may hold only \
                 ASCII letters, digits and - _ . : @ + = /",
                name.as_bytes()[i]
            ),
        ));
    }
    Ok(())
}

fn default_replica() -> String {
    "0".into()
}

fn one() -> u32 {
    1
}

/// A refusal: a stable code and a message naming the field and the values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// One of the codes in docs/PROTOCOL.md.
    pub code: Code,
    /// Human-readable detail.
    pub message: String,
}

impl Refusal {
    /// A refusal with `code`.
    pub fn new(code: Code, message: impl Into<String>) -> Refusal {
        Refusal {
            code,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl Refusal {
    /// The refusal as one log-safe line: the message may echo client text, so
    /// control characters and quotes are escaped and it is capped by [`log_safe`].
    pub fn log_line(&self) -> String {
        format!("{}: {}", self.code, log_safe(&self.message))
    }
}

/// Most characters of untrusted text a log line echoes (then an ellipsis).
pub const LOG_ECHO_MAX: usize = 256;

/// Untrusted text (a client's field, a message built from one) made safe for a log
/// line: newlines, control characters and the like are escaped (`escape_debug`), and
/// the result is cut at [`LOG_ECHO_MAX`] characters with an ellipsis.
pub fn log_safe(text: &str) -> String {
    let mut out = String::new();
    for (n, c) in text.escape_debug().enumerate() {
        if n == LOG_ECHO_MAX {
            out.push('…');
            break;
        }
        out.push(c);
    }
    out
}

/// Checks a HELLO `fingerprint`: exactly 32 hex digits.
fn check_fingerprint(fp: &str) -> Result<(), Refusal> {
    if fp.len() != 32 || !fp.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(Refusal::new(
            Code::BadHello,
            format!(
                "HELLO field `fingerprint` must be exactly 32 hex digits, got {} bytes{}",
                fp.len(),
                match fp.bytes().position(|b| !b.is_ascii_hexdigit()) {
                    Some(i) => format!(" with byte 0x{:02x} at offset {i}", fp.as_bytes()[i]),
                    None => String::new(),
                }
            ),
        ));
    }
    Ok(())
}

impl Hello {
    /// A HELLO for job "default", replica "0" of 1, starting at step 0, with
    /// `micro_batches` micro-batches of `micro_batch_rows` rows.
    pub fn new(dp_rank: u32, dp_size: u32, micro_batch_rows: u32, micro_batches: u32) -> Hello {
        Hello {
            micro_batch_rows: Some(micro_batch_rows),
            micro_batches,
            ..Hello::whole_slice(dp_rank, dp_size)
        }
    }

    /// A HELLO that leaves the micro-batch split to the daemon (one micro-batch of the
    /// rank's whole slice of `global_batch_rows / dp_size` rows).
    pub fn whole_slice(dp_rank: u32, dp_size: u32) -> Hello {
        Hello {
            protocol: TRAINER_VERSION,
            job: "default".into(),
            dp_rank,
            dp_size,
            replica: default_replica(),
            replicas: 1,
            micro_batch_rows: None,
            micro_batches: 1,
            cursor: None,
            start_step: None,
            fingerprint: None,
            slot_layout: None,
            stages: false,
            release_page: true,
        }
    }

    /// Parses and checks a HELLO payload. The version is checked before the fields so
    /// that a newer client hears "protocol" rather than a field error.
    pub fn parse(payload: &[u8]) -> Result<Hello, Refusal> {
        let value: serde_json::Value = serde_json::from_slice(payload)
            .map_err(|e| Refusal::new(Code::BadHello, format!("HELLO is not JSON: {e}")))?;
        match value.get("protocol").and_then(|v| v.as_u64()) {
            Some(v) if v == TRAINER_VERSION as u64 => {}
            Some(v) => {
                return Err(Refusal::new(
                    Code::Protocol,
                    format!(
                        "HELLO protocol {v} is not supported: this daemon speaks protocol \
                         {TRAINER_VERSION} (compact slots); use a client of the same millrace \
                         release, which sends {TRAINER_VERSION}"
                    ),
                ))
            }
            None => {
                return Err(Refusal::new(
                    Code::BadHello,
                    "HELLO field `protocol` is missing or not an integer",
                ))
            }
        }
        // From the bytes, not the value: a `Value` keeps the last of a key given twice,
        // where the derive refuses it (another reader, a proxy's, may take the first).
        let hello: Hello = serde_json::from_slice(payload)
            .map_err(|e| Refusal::new(Code::BadHello, format!("HELLO: {e}")))?;
        check_name("job", &hello.job)?;
        check_name("replica", &hello.replica)?;
        if let Some(fp) = &hello.fingerprint {
            check_fingerprint(fp)?;
        }
        if hello.dp_size == 0 || hello.dp_rank >= hello.dp_size {
            return Err(Refusal::new(
                Code::BadHello,
                format!(
                    "HELLO field `dp_rank` = {} must be below `dp_size` = {}",
                    hello.dp_rank, hello.dp_size
                ),
            ));
        }
        if hello.replicas == 0 || hello.micro_batches == 0 || hello.micro_batch_rows == Some(0) {
            return Err(Refusal::new(
                Code::BadHello,
                "HELLO fields `replicas`, `micro_batches` and `micro_batch_rows` must be positive",
            ));
        }
        hello.check_limits()?;
        Ok(hello)
    }

    /// The bounds of docs/PROTOCOL.md (refusal `limit`): no number a client sends may
    /// make the daemon allocate or compute in proportion to it beyond these.
    fn check_limits(&self) -> Result<(), Refusal> {
        let over = |field: &str, value: u64, max: u64| {
            Refusal::new(
                Code::Limit,
                format!("HELLO field `{field}` = {value} is above this daemon's limit of {max}"),
            )
        };
        if let Some(s) = self.start_step {
            if s > MAX_STEP {
                return Err(over("start_step", s, MAX_STEP));
            }
        }
        let rows = MAX_BATCH_ROWS as u64;
        for (field, v, max) in [
            ("dp_size", self.dp_size as u64, rows),
            ("micro_batches", self.micro_batches as u64, rows),
            (
                "micro_batch_rows",
                self.micro_batch_rows.unwrap_or(0) as u64,
                rows,
            ),
            ("replicas", self.replicas as u64, MAX_REPLICAS as u64),
        ] {
            if v > max {
                return Err(over(field, v, max));
            }
        }
        Ok(())
    }

    /// The cursor blob, decoded from hex.
    pub fn cursor_bytes(&self) -> Result<Option<Vec<u8>>, Refusal> {
        let Some(hex) = &self.cursor else {
            return Ok(None);
        };
        decode_hex(hex).map(Some).ok_or_else(|| {
            Refusal::new(
                Code::Cursor,
                format!("HELLO field `cursor` {}", hex_fault(hex)),
            )
        })
    }
}

/// The longest HELLO or CONTROL frame a daemon whose cursor blobs are at most
/// `cursor_cap` bytes reads: a blob as hex, and [`MAX_FRAME`] for the rest of the JSON
/// (a `set_weights` of thousands of domains included). It grows with the plan's domains,
/// so a run of hundreds of them resumes from its blobs, and stays a bound on what one
/// connection can make the daemon buffer.
pub fn request_limit(cursor_cap: usize) -> usize {
    cursor_cap
        .saturating_mul(2)
        .saturating_add(MAX_FRAME)
        .min(MAX_JSON_FRAME)
}

/// Lower-case hex of `bytes`.
pub fn to_hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// Why `s` is not hex, for a refusal that names the byte: its first non-hex byte and
/// offset, else its odd length.
pub fn hex_fault(s: &str) -> String {
    match s.bytes().position(|b| !b.is_ascii_hexdigit()) {
        Some(at) => format!(
            "has byte 0x{:02x} at offset {at}: not a hex digit",
            s.as_bytes()[at]
        ),
        None => format!("has {} hex digits: an odd count", s.len()),
    }
}

/// Bytes of a hex string; `None` for odd length or a non-hex digit.
pub fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    s.as_bytes()
        .chunks(2)
        .map(|c| {
            let hi = (c[0] as char).to_digit(16)?;
            let lo = (c[1] as char).to_digit(16)?;
            Some((hi * 16 + lo) as u8)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::control::parse_control;
    use crate::wire::frame::{parse_frame, Frame};
    use proptest::prelude::*;

    /// The bytes the client sends are those it sent before the two HELLO types became
    /// one, and the daemon parses them back to the same value.
    #[test]
    fn hello_bytes_are_fixed_and_round_trip() {
        let h = Hello::new(1, 2, 4, 2);
        let bytes = serde_json::to_vec(&h).unwrap();
        assert_eq!(
            String::from_utf8_lossy(&bytes),
            r#"{"protocol":2,"job":"default","dp_rank":1,"dp_size":2,"replica":"0","replicas":1,"micro_batch_rows":4,"micro_batches":2,"release_page":true}"#
        );
        assert_eq!(Hello::parse(&bytes), Ok(h));
        let mut w = Hello::whole_slice(0, 1);
        w.cursor = Some(to_hex(b"\x01"));
        w.start_step = Some(9);
        w.fingerprint = Some("0123456789abcdef0123456789ABCDEF".into());
        let bytes = serde_json::to_vec(&w).unwrap();
        assert_eq!(
            String::from_utf8_lossy(&bytes),
            r#"{"protocol":2,"job":"default","dp_rank":0,"dp_size":1,"replica":"0","replicas":1,"micro_batches":1,"cursor":"01","start_step":9,"fingerprint":"0123456789abcdef0123456789ABCDEF","release_page":true}"#
        );
        assert_eq!(Hello::parse(&bytes), Ok(w));
    }

    /// A fingerprint that is not 32 hex digits is refused naming the field, and a
    /// refusal's log line escapes what the client sent and caps its length.
    #[test]
    fn fingerprint_format_is_checked_and_logs_are_escaped() {
        for bad in [
            "ab",
            "0123456789abcdef0123456789abcdeg",
            "x\nINJECTED 0123456789abcdef01",
        ] {
            let mut h = Hello::whole_slice(0, 1);
            h.fingerprint = Some(bad.into());
            let r = Hello::parse(&serde_json::to_vec(&h).unwrap()).unwrap_err();
            assert_eq!(r.code, Code::BadHello, "{bad}");
            assert!(r.message.contains("`fingerprint`"), "{}", r.message);
        }
        let r = Refusal::new(Code::BadHello, format!("a\nb{}", "z".repeat(1000)));
        let line = r.log_line();
        assert!(!line.contains('\n'), "{line}");
        assert!(line.contains("a\\nb"), "{line}");
        assert!(line.ends_with('…') && line.chars().count() < 300, "{line}");
    }

    /// Every code serializes to the string PROTOCOL.md lists, and reads back.
    #[test]
    fn codes_are_their_protocol_strings() {
        for (code, s) in [
            (Code::BadHello, "bad_hello"),
            (Code::DpSize, "dp_size"),
            (Code::PeerPosition, "peer_position"),
            (Code::Late, "late"),
        ] {
            assert_eq!(serde_json::to_string(&code).unwrap(), format!("\"{s}\""));
            assert_eq!(code.as_str(), s);
            assert_eq!(
                serde_json::from_str::<Code>(&format!("\"{s}\"")).unwrap(),
                code
            );
        }
        let doc = include_str!("../../docs/PROTOCOL.md");
        for code in Code::ALL {
            assert_eq!(serde_json::to_value(code).unwrap(), code.as_str());
            assert!(
                doc.contains(&format!("`{code}`")),
                "PROTOCOL.md does not list {code}"
            );
        }
    }

    /// REFUSED and ERROR payloads: the daemon's bytes, and what clients read back.
    #[test]
    fn reasons_encode_and_decode() {
        let bytes = reason(Code::Busy, "a \"quoted\" job");
        assert_eq!(bytes, br#"{"code":"busy","message":"a \"quoted\" job"}"#);
        let r = Reason::decode(&bytes).unwrap();
        assert_eq!(
            (r.code.as_str(), r.message.as_str()),
            ("busy", "a \"quoted\" job")
        );
        assert_eq!(Reason::decode(br#"{"code":"x"}"#).unwrap().message, "");
        assert!(Reason::decode(b"[1]").is_err());
    }

    /// A bad `cursor` names its first non-hex byte and offset, or its odd length: it
    /// used to say "not an even-length hex string" for both, which misled at even length.
    #[test]
    fn a_bad_cursor_names_the_byte() {
        let with = |c: &str| {
            let h = Hello::parse(
                format!(r#"{{"protocol":2,"job":"j","dp_rank":0,"dp_size":1,"cursor":"{c}"}}"#)
                    .as_bytes(),
            )
            .unwrap();
            h.cursor_bytes()
        };
        assert_eq!(with("00ff").unwrap(), Some(vec![0, 255]));
        for (c, says) in [
            ("00112g33", "has byte 0x67 at offset 5: not a hex digit"),
            ("00\\u00e90", "has byte 0xc3 at offset 2: not a hex digit"),
            ("00f", "has 3 hex digits: an odd count"),
        ] {
            let e = with(c).unwrap_err();
            assert_eq!(e.code, Code::Cursor, "{e:?}");
            assert_eq!(e.message, format!("HELLO field `cursor` {says}"));
        }
    }

    #[test]
    fn hello_checks() {
        let ok = br#"{"protocol":2,"job":"j","dp_rank":1,"dp_size":2}"#;
        let h = Hello::parse(ok).unwrap();
        assert_eq!(
            (h.replica.as_str(), h.replicas, h.micro_batches),
            ("0", 1, 1)
        );
        // A version-1 client (whose slots would be read as garbage) hears which to use.
        let e = Hello::parse(br#"{"protocol":1,"job":"j"}"#).unwrap_err();
        assert_eq!(e.code, "protocol");
        assert!(
            e.message.contains("protocol 1") && e.message.contains("speaks protocol 2"),
            "{e}"
        );
        let e = Hello::parse(
            br#"{"protocol":2,"job":"j","dp_rank":0,"dp_size":1,"slot_layout":"dense"}"#,
        )
        .unwrap_err();
        assert!(e.code == "bad_hello" && e.message.contains("dense"), "{e}");
        let p = br#"{"protocol":2,"job":"j","dp_rank":0,"dp_size":1,"slot_layout":"expanded"}"#;
        assert_eq!(
            Hello::parse(p).unwrap().slot_layout,
            Some(SlotLayout::Expanded)
        );
        let e = Hello::parse(br#"{"protocol":2,"job":"j","dp_rank":2,"dp_size":2}"#).unwrap_err();
        assert!(e.message.contains("dp_rank"), "{e}");
        let e = Hello::parse(br#"{"protocol":2,"job":"j","dp_rank":0,"dp_size":2,"dp_sise":3}"#)
            .unwrap_err();
        assert!(e.message.contains("dp_sise"), "{e}");
        assert_eq!(Hello::parse(b"\xff\x00").unwrap_err().code, "bad_hello");
        // A key given twice is refused, naming it, not read as its last value (another
        // JSON reader, a proxy's or a log's, may take the first).
        let e = Hello::parse(br#"{"protocol":2,"job":"j","dp_rank":0,"dp_size":2,"dp_rank":1}"#)
            .unwrap_err();
        assert_eq!(e.code, "bad_hello", "{e}");
        assert!(e.message.contains("duplicate field `dp_rank`"), "{e}");
        // Bounds: a far start step or a huge count is refused with `limit`, naming it.
        for (field, v) in [
            ("start_step", (1u64 << 40).to_string()),
            ("start_step", (1u64 << 62).to_string()),
            ("replicas", "1025".to_string()),
            ("micro_batches", "4294967295".to_string()),
        ] {
            let p = format!(r#"{{"protocol":2,"job":"j","dp_rank":0,"dp_size":1,"{field}":{v}}}"#);
            let e = Hello::parse(p.as_bytes()).unwrap_err();
            assert_eq!(e.code, "limit", "{field}={v}: {e}");
            assert!(e.message.contains(field) && e.message.contains(&v), "{e}");
        }
        let p = format!(
            r#"{{"protocol":2,"job":"j","dp_rank":0,"dp_size":1,"start_step":{MAX_STEP}}}"#
        );
        assert!(Hello::parse(p.as_bytes()).is_ok());
        // Names: a newline (log forging) or a space is refused, naming byte and offset.
        let e = Hello::parse(br#"{"protocol":2,"job":"a\nINFO forged","dp_rank":0,"dp_size":1}"#)
            .unwrap_err();
        assert_eq!(e.code, "bad_hello");
        assert!(
            e.message.contains("`job`") && e.message.contains("0x0a at offset 1"),
            "{e}"
        );
        let e =
            Hello::parse(br#"{"protocol":2,"job":"j","replica":"x y","dp_rank":0,"dp_size":1}"#)
                .unwrap_err();
        assert!(
            e.message.contains("`replica`") && e.message.contains("0x20"),
            "{e}"
        );
        assert!(
            Hello::parse(br#"{"protocol":2,"job":"run-7.b/tp:0","dp_rank":0,"dp_size":1}"#).is_ok()
        );
        assert_eq!(
            decode_hex(&to_hex(&[0, 1, 254, 255])),
            Some(vec![0, 1, 254, 255])
        );
        assert_eq!(decode_hex("0g"), None);
        assert_eq!(decode_hex("abc"), None);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4096))]
        /// Whatever arrives, the decoder returns (frame, need-more or error) without
        /// panicking, never claims more bytes than it was given, and HELLO parsing of
        /// any payload is equally total.
        #[test]
        fn decoder_is_total(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let mut rest = &bytes[..];
            while let Ok(Some((frame, n))) = parse_frame(rest, MAX_FRAME) {
                prop_assert!(n > 0 && n <= rest.len());
                match frame {
                    Frame::Hello(p) => { let _ = Hello::parse(&p); }
                    Frame::Control(p) => { let _ = parse_control(&p); }
                    _ => {}
                }
                rest = &rest[n..];
            }
            let _ = Hello::parse(&bytes);
            let _ = parse_control(&bytes);
        }

    }
}
