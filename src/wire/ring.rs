//! The byte layout of the shared-memory ring (docs/PROTOCOL.md section 4): the ring
//! header and the slot header, as `#[repr(C)]` types whose field offsets are the one
//! definition the daemon writes at and the Rust client reads at.
//!
//! The types describe the bytes; nobody builds them. The ring is shared memory that
//! peers read while the daemon writes, so both sides move single little-endian words at
//! the offsets below (with atomics where the protocol says so) rather than copying whole
//! structs. Compile-time assertions pin every offset to the table in PROTOCOL.md.

use std::mem::offset_of;

/// Bytes before slot 0: the ring header, padded to a page.
pub const RING_HEADER: u64 = 4096;
/// Bytes at the start of each slot: the slot header, padded for the arrays' alignment.
pub const SLOT_HEADER: usize = 256;
/// First bytes of a ring, so a wrong fd is caught before anything is trusted.
pub const MAGIC: &[u8; 8] = b"MRRING01";
/// Ring layout version (PROTOCOL.md section 4).
pub const LAYOUT_VERSION: u32 = 1;

/// The start of the ring header (all integers little-endian).
#[repr(C)]
pub struct RingHeader {
    /// [`MAGIC`].
    pub magic: [u8; 8],
    /// [`LAYOUT_VERSION`].
    pub version: u32,
    /// Slots in the ring.
    pub slots: u32,
    /// Stride between slots.
    pub slot_bytes: u64,
    /// Byte offset of slot 0 ([`RING_HEADER`]).
    pub slot_offset: u64,
    /// The ring's first step.
    pub first_step: u64,
    /// Unused; zero.
    pub reserved: [u64; 3],
    /// Every step below this is ready; written atomically with release ordering.
    pub published: u64,
}

/// The start of every slot (all integers little-endian); the client's `BatchView`
/// carries these values decoded.
#[repr(C)]
pub struct SlotHeader {
    /// Offset 0: the trainer step this slot holds.
    pub step: u64,
    /// Offset 8: that step's unskipped plan step.
    pub plan_step: u64,
    /// Offset 16: rows written.
    pub rows: u32,
    /// Offset 20: inputs per row.
    pub seq_len: u32,
    /// Offset 24: entries of `cu_seqlens` in use, the leading 0 included.
    pub cu_len: u32,
    /// Offset 28: the longest entry-to-entry span of `cu_seqlens`.
    pub max_seqlen: u32,
    /// Offset 32: ones in `loss_mask`.
    pub loss_tokens: u64,
    /// Offset 40: non-padding tokens over the rows.
    pub real_tokens: u64,
    /// Offset 48: bytes of the cursor blob in the `cursor` field.
    pub cursor_len: u32,
    /// Offset 52: unused; zero.
    pub reserved: u32,
    /// Offset 56: CLOCK_MONOTONIC ns when the daemon published the slot.
    pub publish_ns: u64,
    /// Offset 64: the byte offset (from the slot's start) of each array of this slot,
    /// in the order of [`EXPANDED_FIELDS`] or [`COMPACT_FIELDS`], unused entries zero;
    /// with `rows` and `seq_len` it tells a client where everything is, so a slot of a
    /// stage WELCOME did not list (one added live) is readable.
    pub field_offsets: [u64; FIELD_SLOTS],
    /// Offset 128: the cursor blob's plan state digest, equal on every node that plans
    /// the same batches whatever journal it holds (0 from a daemon before 2026-12-06).
    pub plan_state: u64,
}

/// Entries of the slot header's field-offset table.
pub const FIELD_SLOTS: usize = 8;
/// The arrays of an expanded slot, in the order of the header's offset table.
pub const EXPANDED_FIELDS: [&str; 8] = [
    "tokens",
    "labels",
    "loss_mask",
    "position_ids",
    "cu_seqlens",
    "domain",
    "row_loss_tokens",
    "cursor",
];
/// The arrays of a compact slot, in the order of the header's offset table.
/// `row_bounds` (since 2026-12-06) comes after the cursor, in the table and in the slot,
/// so clients that predate it read the six entries before it unchanged.
pub const COMPACT_FIELDS: [&str; 7] = [
    "rows",
    "doc_starts",
    "row_real_tokens",
    "domain",
    "row_loss_tokens",
    "cursor",
    "row_bounds",
];
/// Bytes of a peer's release page (one page; PROTOCOL.md section 5).
pub const RELEASE_PAGE_BYTES: usize = 4096;

/// A peer's release page, a memfd the daemon creates per peer that asked for it (HELLO
/// `release_page`) and both sides map read-write: the client publishes its cumulative
/// `released` here instead of a RELEASE frame per slot, and the daemon raises
/// `daemon_waiting` when it found the ring full (all integers little-endian, each word
/// on its own cache line so the two writers do not share one).
#[repr(C)]
pub struct ReleasePageHeader {
    /// Offset 0: every step below this is released; written by the client only, with
    /// release ordering (its reads of the slots happen before).
    pub released: u64,
    /// Unused; zero.
    pub reserved: [u64; 7],
    /// Offset 64: non-zero while the daemon waits for this peer's release (the ring is
    /// full): a client that sees it after storing `released` sends one RELEASE frame.
    /// Written by the daemon only.
    pub daemon_waiting: u64,
}

/// Byte offsets in a release page.
pub mod page_at {
    use super::*;
    /// `released`.
    pub const RELEASED: usize = offset_of!(ReleasePageHeader, released);
    /// `daemon_waiting`.
    pub const DAEMON_WAITING: usize = offset_of!(ReleasePageHeader, daemon_waiting);
}

/// Byte offsets in the ring header.
pub mod ring_at {
    use super::*;
    /// `magic`.
    pub const MAGIC: usize = offset_of!(RingHeader, magic);
    /// `version`.
    pub const VERSION: usize = offset_of!(RingHeader, version);
    /// `slots`.
    pub const SLOTS: usize = offset_of!(RingHeader, slots);
    /// `slot_bytes`.
    pub const SLOT_BYTES: usize = offset_of!(RingHeader, slot_bytes);
    /// `slot_offset`.
    pub const SLOT_OFFSET: usize = offset_of!(RingHeader, slot_offset);
    /// `first_step`.
    pub const FIRST_STEP: usize = offset_of!(RingHeader, first_step);
    /// `published`.
    pub const PUBLISHED: usize = offset_of!(RingHeader, published);
}

/// Byte offsets in a slot header.
pub mod slot_at {
    use super::*;
    /// `step`.
    pub const STEP: usize = offset_of!(SlotHeader, step);
    /// `plan_step`.
    pub const PLAN_STEP: usize = offset_of!(SlotHeader, plan_step);
    /// `rows`.
    pub const ROWS: usize = offset_of!(SlotHeader, rows);
    /// `seq_len`.
    pub const SEQ_LEN: usize = offset_of!(SlotHeader, seq_len);
    /// `cu_len`.
    pub const CU_LEN: usize = offset_of!(SlotHeader, cu_len);
    /// `max_seqlen`.
    pub const MAX_SEQLEN: usize = offset_of!(SlotHeader, max_seqlen);
    /// `loss_tokens`.
    pub const LOSS_TOKENS: usize = offset_of!(SlotHeader, loss_tokens);
    /// `real_tokens`.
    pub const REAL_TOKENS: usize = offset_of!(SlotHeader, real_tokens);
    /// `cursor_len`.
    pub const CURSOR_LEN: usize = offset_of!(SlotHeader, cursor_len);
    /// `publish_ns`.
    pub const PUBLISH_NS: usize = offset_of!(SlotHeader, publish_ns);
    /// `field_offsets[0]`; entry `i` is at `FIELD_OFFSETS + 8 * i`.
    pub const FIELD_OFFSETS: usize = offset_of!(SlotHeader, field_offsets);
    /// `plan_state`.
    pub const PLAN_STATE: usize = offset_of!(SlotHeader, plan_state);
}

// The tables of PROTOCOL.md section 4, checked at compile time: reordering a field above
// would change the wire, so it must fail to build.
const _: () = {
    assert!(ring_at::MAGIC == 0 && ring_at::VERSION == 8 && ring_at::SLOTS == 12);
    assert!(ring_at::SLOT_BYTES == 16 && ring_at::SLOT_OFFSET == 24);
    assert!(ring_at::FIRST_STEP == 32 && ring_at::PUBLISHED == 64);
    assert!(page_at::RELEASED == 0 && page_at::DAEMON_WAITING == 64);
    assert!(std::mem::size_of::<ReleasePageHeader>() <= RELEASE_PAGE_BYTES);
    assert!(std::mem::size_of::<RingHeader>() <= RING_HEADER as usize);
    assert!(slot_at::STEP == 0 && slot_at::PLAN_STEP == 8 && slot_at::ROWS == 16);
    assert!(slot_at::SEQ_LEN == 20 && slot_at::CU_LEN == 24 && slot_at::MAX_SEQLEN == 28);
    assert!(slot_at::LOSS_TOKENS == 32 && slot_at::REAL_TOKENS == 40);
    assert!(slot_at::CURSOR_LEN == 48 && slot_at::PUBLISH_NS == 56);
    assert!(slot_at::FIELD_OFFSETS == 64 && slot_at::PLAN_STATE == 128);
    assert!(std::mem::size_of::<SlotHeader>() <= SLOT_HEADER);
};

/// Writes `v` little-endian at `at` of a header the daemon owns (`at` from [`ring_at`]
/// or [`slot_at`], inside the header by the assertions above).
pub fn put_u32(header: &mut [u8], at: usize, v: u32) {
    header[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

/// Writes `v` little-endian at `at`, as [`put_u32`].
pub fn put_u64(header: &mut [u8], at: usize, v: u64) {
    header[at..at + 8].copy_from_slice(&v.to_le_bytes());
}
