//! WELCOME turned into checked numbers, and the mapped ring checked against them: every
//! offset the client later reads at is validated here once, so reading a slot cannot
//! go out of bounds whatever the daemon sent. Both slot layouts (compact, expanded).

use std::os::fd::OwnedFd;
use std::sync::atomic::Ordering;

use super::{
    io_err, ClientError, Welcome, PROTOCOL, PUBLISHED_OFFSET, RING_MAGIC, RING_VERSION,
    SLOT_HEADER_BYTES,
};
use crate::corpus::DType;
use crate::sys::Shm;
use crate::wire::ring::{ring_at, COMPACT_FIELDS, EXPANDED_FIELDS, FIELD_SLOTS};
use crate::wire::{FieldSpec, SlotLayout};

/// A validated array location: byte offset in the slot, dtype and element count.
#[derive(Debug, Clone, Copy)]
pub(super) struct Field {
    pub(super) offset: usize,
    pub(super) dtype: DType,
    pub(super) len: usize,
}

impl Field {
    pub(super) fn bytes(&self) -> usize {
        self.len * self.dtype.size()
    }
}

/// The arrays that differ between the two slot layouts (docs/PROTOCOL.md section 4).
#[derive(Debug, Clone)]
pub(super) enum Arrays {
    /// Ready arrays; `cu_seqlens` has room for the most entries a slot can use.
    Expanded {
        tokens: Field,
        labels: Field,
        loss_mask: Field,
        position_ids: Field,
        cu_seqlens: Field,
    },
    /// `rows` is `[rows, seq_len + 1]`, `doc_starts` `[rows, starts_bytes]`.
    Compact {
        rows: Field,
        doc_starts: Field,
        row_real_tokens: Field,
        /// `[rows, 2]`; absent from a daemon that predates it.
        row_bounds: Option<Field>,
    },
}

/// WELCOME turned into checked numbers.
#[derive(Debug, Clone)]
pub(super) struct Layout {
    pub(super) slots: u64,
    pub(super) slot_offset: usize,
    pub(super) slot_bytes: usize,
    pub(super) ring_bytes: usize,
    pub(super) rows: usize,
    pub(super) seq_len: usize,
    pub(super) arrays: Arrays,
    pub(super) domain: Field,
    pub(super) row_loss_tokens: Field,
    pub(super) cursor: Field,
}

/// What a slot header says about where its arrays are: `rows`, `seq_len` and the
/// field-offset table (docs/PROTOCOL.md section 4), the key a client's decoded
/// [`Layout`] of that shape is kept under.
pub(super) type SlotShape = (u32, u32, [u64; FIELD_SLOTS]);

fn usize_of(v: u64, what: &str) -> Result<usize, ClientError> {
    usize::try_from(v).map_err(|_| ClientError::Protocol(format!("{what} {v} does not fit")))
}

impl Layout {
    /// WELCOME's first stage (its top-level fields), with each entry of `stages` (for
    /// information: a client may size buffers by it) checked to fit a slot.
    pub(super) fn from_welcome(w: &Welcome) -> Result<Layout, ClientError> {
        let first = Layout::one_stage(w)?;
        let mut prev = 0u64;
        for (i, st) in w.stages.iter().enumerate() {
            let same = st.rows == w.rows && st.seq_len == w.seq_len && st.fields == w.fields;
            if i == 0 {
                if st.step != 0 || !same {
                    return Err(ClientError::Protocol(format!(
                        "WELCOME: stage 0 (step {}, {} rows of {}) is not the top-level shape",
                        st.step, st.rows, st.seq_len
                    )));
                }
                continue;
            }
            if st.step <= prev {
                return Err(ClientError::Protocol(format!(
                    "WELCOME: stage {i} starts at plan step {}, not after {prev}",
                    st.step
                )));
            }
            prev = st.step;
            let staged = Welcome {
                rows: st.rows,
                seq_len: st.seq_len,
                micro_batch_rows: st.micro_batch_rows,
                fields: st.fields.clone(),
                stages: Vec::new(),
                ..w.clone()
            };
            Layout::one_stage(&staged)?;
        }
        Ok(first)
    }

    /// The layout of a slot whose header says `shape`: each array at the header's
    /// offset, with the dtype WELCOME gave it and the shape that `rows` and `seq_len`
    /// give it (docs/PROTOCOL.md section 4), checked like WELCOME's fields, so a
    /// header pointing past the slot is a protocol error, never a read out of bounds.
    pub(super) fn of_slot(w: &Welcome, shape: &SlotShape) -> Result<Layout, ClientError> {
        let &(rows, seq_len, offsets) = shape;
        let (r, l) = (u64::from(rows), u64::from(seq_len));
        let cursor = w
            .fields
            .get("cursor")
            .map_or(0, |f| f.shape.iter().product());
        let shape_of = |name: &str| -> Vec<u64> {
            match name {
                "tokens" | "labels" | "loss_mask" | "position_ids" => vec![r, l],
                "cu_seqlens" => vec![r * l + 1],
                "rows" => vec![r, l + 1],
                "doc_starts" => vec![r, (l + 1).div_ceil(8)],
                "row_bounds" => vec![r, 2],
                "cursor" => vec![cursor],
                _ => vec![r],
            }
        };
        let names: &[&str] = match w.slot_layout {
            SlotLayout::Expanded => &EXPANDED_FIELDS,
            SlotLayout::Compact => &COMPACT_FIELDS,
        };
        let mut fields = std::collections::BTreeMap::new();
        for (&name, &offset) in names.iter().zip(&offsets) {
            if offset == 0 && name == "row_bounds" {
                continue; // a daemon that predates it leaves the entry 0
            }
            let dtype = w
                .fields
                .get(name)
                .map_or_else(String::new, |f| f.dtype.clone());
            let spec = FieldSpec {
                dtype,
                offset,
                shape: shape_of(name),
            };
            fields.insert(name.to_string(), spec);
        }
        let slot = Welcome {
            rows,
            seq_len,
            fields,
            stages: Vec::new(),
            ..w.clone()
        };
        Layout::one_stage(&slot).map_err(|e| match e {
            ClientError::Protocol(m) => ClientError::Protocol(format!(
                "slot header ({rows} rows of {seq_len}, field offsets {offsets:?}): {}",
                m.trim_start_matches("WELCOME: ")
            )),
            e => e,
        })
    }

    /// The layout of a slot of WELCOME's top-level shape.
    fn one_stage(w: &Welcome) -> Result<Layout, ClientError> {
        let bad = |m: String| ClientError::Protocol(format!("WELCOME: {m}"));
        if w.protocol != PROTOCOL {
            return Err(bad(format!(
                "protocol {} (this client speaks {PROTOCOL})",
                w.protocol
            )));
        }
        if w.slots == 0 {
            return Err(bad("slots is 0".into()));
        }
        if w.rows == 0 || w.seq_len == 0 {
            return Err(bad(format!("rows {} seq_len {}", w.rows, w.seq_len)));
        }
        let slot_offset = usize_of(w.slot_offset, "slot_offset")?;
        let slot_bytes = usize_of(w.slot_bytes, "slot_bytes")?;
        let ring_bytes = usize_of(w.ring_bytes, "ring_bytes")?;
        if slot_offset < PUBLISHED_OFFSET + 8 || slot_offset % 8 != 0 {
            return Err(bad(format!(
                "slot_offset {slot_offset} overlaps the ring header or is unaligned"
            )));
        }
        if slot_bytes < SLOT_HEADER_BYTES || slot_bytes % 8 != 0 {
            return Err(bad(format!(
                "slot_bytes {slot_bytes} is too small or unaligned"
            )));
        }
        let end = (w.slots as usize)
            .checked_mul(slot_bytes)
            .and_then(|s| s.checked_add(slot_offset));
        if end.is_none_or(|e| e > ring_bytes) {
            return Err(bad(format!(
                "{} slots of {slot_bytes} bytes at {slot_offset} do not fit ring_bytes {ring_bytes}",
                w.slots
            )));
        }
        let rows = w.rows as usize;
        let seq_len = w.seq_len as usize;
        let cells = rows
            .checked_mul(seq_len)
            .ok_or_else(|| bad("rows * seq_len overflows".into()))?;
        let field = |name: &str, want_len: Option<usize>, dtypes: &[DType]| {
            let f = w
                .fields
                .get(name)
                .ok_or_else(|| bad(format!("no field {name:?}")))?;
            let dtype = DType::from_name(&f.dtype)
                .ok_or_else(|| bad(format!("field {name}: unknown dtype {:?}", f.dtype)))?;
            if !dtypes.is_empty() && !dtypes.contains(&dtype) {
                return Err(bad(format!("field {name}: dtype {dtype} is not expected")));
            }
            let mut len = 1usize;
            for &d in &f.shape {
                len = len
                    .checked_mul(usize_of(d, "shape")?)
                    .ok_or_else(|| bad(format!("field {name}: shape overflows")))?;
            }
            if let Some(want) = want_len {
                if len != want {
                    return Err(bad(format!(
                        "field {name}: shape {:?} holds {len} elements, expected {want}",
                        f.shape
                    )));
                }
            }
            let offset = usize_of(f.offset, "offset")?;
            let bytes = len
                .checked_mul(dtype.size())
                .ok_or_else(|| bad(format!("field {name}: size overflows")))?;
            if offset < SLOT_HEADER_BYTES
                || offset % dtype.size() != 0
                || offset.checked_add(bytes).is_none_or(|e| e > slot_bytes)
            {
                return Err(bad(format!(
                    "field {name}: {bytes} bytes at offset {offset} do not fit a {slot_bytes}-byte slot after its {SLOT_HEADER_BYTES}-byte header (or are unaligned)"
                )));
            }
            Ok(Field { offset, dtype, len })
        };
        use DType::*;
        let ints = [Uint8, Int8, Int16, Uint16, Int32, Uint32, Int64];
        let arrays = match w.slot_layout {
            SlotLayout::Expanded => {
                let cu_seqlens = field("cu_seqlens", None, &[Int32])?;
                if cu_seqlens.len == 0 {
                    return Err(bad("cu_seqlens has no room".into()));
                }
                Arrays::Expanded {
                    tokens: field("tokens", Some(cells), &ints)?,
                    labels: field("labels", Some(cells), &ints)?,
                    loss_mask: field("loss_mask", Some(cells), &[Uint8])?,
                    position_ids: field("position_ids", Some(cells), &ints)?,
                    cu_seqlens,
                }
            }
            SlotLayout::Compact => {
                let width = seq_len + 1;
                let starts_bytes = width.div_ceil(8);
                let total = |per: usize| {
                    rows.checked_mul(per)
                        .ok_or_else(|| bad("rows * (seq_len + 1) overflows".into()))
                };
                Arrays::Compact {
                    rows: field("rows", Some(total(width)?), &ints)?,
                    doc_starts: field("doc_starts", Some(total(starts_bytes)?), &[Uint8])?,
                    row_real_tokens: field("row_real_tokens", Some(rows), &[Int32])?,
                    row_bounds: match w.fields.contains_key("row_bounds") {
                        true => Some(field("row_bounds", Some(total(2)?), &[Int32])?),
                        false => None,
                    },
                }
            }
        };
        Ok(Layout {
            slots: u64::from(w.slots),
            slot_offset,
            slot_bytes,
            ring_bytes,
            rows,
            seq_len,
            arrays,
            domain: field("domain", Some(rows), &[Int32])?,
            row_loss_tokens: field("row_loss_tokens", Some(rows), &[Int32])?,
            cursor: field("cursor", None, &[Uint8])?,
        })
    }
}

/// The ring memfd mapped read-only: the client's side of [`crate::sys::Shm`].
pub(super) struct RingView(Shm);

impl RingView {
    /// Maps `len` bytes of the ring after checking the memfd really holds them (a
    /// mapping longer than the file faults when touched) and is sealed against
    /// shrinking (so it keeps holding them).
    pub(super) fn map(fd: &OwnedFd, len: usize) -> Result<RingView, ClientError> {
        let size = rustix::fs::fstat(fd)
            .map_err(|e| io_err("fstat of the ring fd")(e.into()))?
            .st_size;
        if (size as u64) < len as u64 {
            return Err(ClientError::Ring(format!(
                "the ring memfd holds {size} bytes but WELCOME says ring_bytes {len}"
            )));
        }
        if len == 0 {
            return Err(ClientError::Ring("ring_bytes is 0".into()));
        }
        // The size checked above holds only while nobody can shrink the memfd: a ring cut
        // under the mapping raises SIGBUS in this process at the next read of a slot.
        // The daemon seals it (PROTOCOL.md section 3); a ring without that seal is
        // refused here rather than trusted.
        let seals = rustix::fs::fcntl_get_seals(fd).unwrap_or(rustix::fs::SealFlags::empty());
        if !seals.contains(rustix::fs::SealFlags::SHRINK) {
            return Err(ClientError::Ring(format!(
                "the ring memfd is not sealed against shrinking (F_SEAL_SHRINK; seals {seals:?}): \
                 it could be cut under this client's mapping"
            )));
        }
        let shm = Shm::read_only(fd, len).map_err(io_err("mmap of the ring"))?;
        Ok(RingView(shm))
    }

    /// `len` bytes at `off`; the caller has checked `off + len` against the layout.
    pub(super) fn bytes(&self, off: usize, len: usize) -> &[u8] {
        self.0.bytes(off, len)
    }

    pub(super) fn u32_at(&self, off: usize) -> u32 {
        let mut b = [0u8; 4];
        b.copy_from_slice(self.bytes(off, 4));
        u32::from_le_bytes(b)
    }

    pub(super) fn u64_at(&self, off: usize) -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(self.bytes(off, 8));
        u64::from_le_bytes(b)
    }

    /// `published`, read with acquire ordering so the slot it covers is visible.
    pub(super) fn published(&self) -> u64 {
        u64::from_le(self.0.atomic_u64(PUBLISHED_OFFSET).load(Ordering::Acquire))
    }
}

/// Whether the mapped ring's header agrees with WELCOME.
pub(super) fn check_ring_header(ring: &RingView, l: &Layout) -> Result<(), ClientError> {
    let magic = ring.bytes(ring_at::MAGIC, RING_MAGIC.len());
    if magic != RING_MAGIC {
        return Err(ClientError::Ring(format!(
            "magic {magic:02x?}, expected {RING_MAGIC:?}"
        )));
    }
    let version = ring.u32_at(ring_at::VERSION);
    let slots = ring.u32_at(ring_at::SLOTS);
    let slot_bytes = ring.u64_at(ring_at::SLOT_BYTES);
    let slot_offset = ring.u64_at(ring_at::SLOT_OFFSET);
    if version != RING_VERSION
        || u64::from(slots) != l.slots
        || slot_bytes != l.slot_bytes as u64
        || slot_offset != l.slot_offset as u64
    {
        return Err(ClientError::Ring(format!(
            "ring header (version {version}, {slots} slots of {slot_bytes} at {slot_offset}) \
             disagrees with WELCOME ({} slots of {} at {})",
            l.slots, l.slot_bytes, l.slot_offset
        )));
    }
    Ok(())
}

/// WELCOME's payload checked as [`super::Client::connect`] checks it before it maps
/// the ring, then a slot header's `shape` checked against it as each step's read does:
/// the client's decoders of what the daemon sends, with no daemon or memfd needed.
/// For the fuzzer (tests/fuzz, target `wire`); these checks have no public way in.
#[doc(hidden)]
pub fn check_welcome(
    payload: &[u8],
    shape: &(u32, u32, [u64; FIELD_SLOTS]),
) -> Result<(), ClientError> {
    let welcome: Welcome = serde_json::from_slice(payload)
        .map_err(|e| ClientError::Protocol(format!("WELCOME is not valid: {e}")))?;
    Layout::from_welcome(&welcome)?;
    Layout::of_slot(&welcome, shape).map(|_| ())
}
