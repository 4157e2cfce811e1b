//! The shared-memory ring of one data-parallel rank: its layout (which arrays a slot
//! holds, at which offsets), the token type trainers receive, and the sealed memfd the
//! slots live in (docs/PROTOCOL.md, section 4). What fills a slot is [`super::fill`].
//!
//! A ring is one sealed memfd. The daemon maps it read-write once and pre-faults every
//! page; clients get a read-only fd to the same pages, so a batch is written once and
//! read in place by every peer of the rank. Slots are reused, never allocated per batch.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use rustix::fs::{fcntl_add_seals, memfd_create, MemfdFlags, SealFlags};

use crate::corpus::DType;
use crate::sys::Shm;
use crate::wire::ring::{
    put_u32, put_u64, ring_at, slot_at, LAYOUT_VERSION, MAGIC, RING_HEADER, SLOT_HEADER,
};
use crate::wire::{FieldSpec, SlotLayout};

/// Why a ring could not be made or a slot could not be filled.
#[derive(Debug, thiserror::Error)]
pub enum RingError {
    /// memfd_create, ftruncate, fcntl, mmap or the read-only reopen failed.
    #[error("ring memory: {what}: {source}")]
    Os {
        /// The call that failed.
        what: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// The plan handed the materializer something it cannot place (a bug, or a shard
    /// that changed under the daemon).
    #[error("materialize step {step}: {message}")]
    Materialize {
        /// The step being filled.
        step: u64,
        /// What went wrong, naming shard and document.
        message: String,
    },
}

fn os(what: &'static str) -> impl FnOnce(std::io::Error) -> RingError {
    move |source| RingError::Os { what, source }
}

/// The element type trainers receive tokens in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenType(pub DType);

impl TokenType {
    /// Chooses the output dtype: `int32`, `int64`, or `shard` (the shards' own dtype,
    /// which must then be one integer dtype across all domains). Refuses an output that
    /// cannot hold every id a shard's dtype can store, so no token is ever truncated,
    /// unless `[plan] vocab_size` bounds the ids below the output's largest: the fill
    /// fails a ring on any id at or above it before one is written, so uint32 shards of a
    /// vocabulary of 100k ids (OLMo's) fit `int32`.
    pub fn choose(
        setting: &str,
        shard_dtypes: &[(String, DType)],
        vocab_size: Option<u64>,
    ) -> Result<TokenType, TokenTypeError> {
        let out = match setting {
            "int32" => DType::Int32,
            "int64" => DType::Int64,
            "shard" => {
                let mut it = shard_dtypes.iter();
                let Some((first_domain, first)) = it.next() else {
                    return Err(TokenTypeError::NoShards);
                };
                if let Some((name, other)) = it.find(|(_, d)| d != first) {
                    return Err(TokenTypeError::Mixed {
                        first_domain: first_domain.clone(),
                        first: *first,
                        domain: name.clone(),
                        other: *other,
                    });
                }
                *first
            }
            other => return Err(TokenTypeError::Unknown(other.to_string())),
        };
        let bounded = vocab_size.is_some_and(|v| id_bound(out).is_some_and(|max| v <= max));
        for (name, d) in shard_dtypes {
            let served = fits(*d, out) || (bounded && id_bound(*d).is_some());
            if !served {
                return Err(TokenTypeError::DoesNotFit {
                    domain: name.clone(),
                    stored: *d,
                    out,
                    bound: id_bound(out).unwrap_or(0),
                });
            }
        }
        Ok(TokenType(out))
    }
}

/// Why `[serve] token_dtype` cannot be served from these shards.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TokenTypeError {
    /// `shard` with no shards to take the dtype from.
    #[error("token_dtype = \"shard\" needs at least one shard")]
    NoShards,
    /// `shard` over domains of different dtypes.
    #[error(
        "token_dtype = \"shard\" needs one dtype across domains, but {first_domain} is {first} \
         and {domain} is {other}; set token_dtype = \"int32\" or \"int64\""
    )]
    Mixed {
        /// The first domain.
        first_domain: String,
        /// Its dtype.
        first: DType,
        /// The first domain whose dtype differs.
        domain: String,
        /// That dtype.
        other: DType,
    },
    /// Not one of the three settings.
    #[error("token_dtype = {0:?}: expected \"int32\", \"int64\" or \"shard\"")]
    Unknown(String),
    /// A domain's ids may not fit the output type.
    #[error(
        "domain {domain} stores {stored} tokens, which do not all fit token_dtype {out}; \
         use \"int64\", or set [plan] vocab_size (ids at or above it fail the ring) to at \
         most {bound}"
    )]
    DoesNotFit {
        /// The domain.
        domain: String,
        /// What its shards store.
        stored: DType,
        /// The output type asked for.
        out: DType,
        /// The largest `vocab_size` that would let it serve them ([`id_bound`]).
        bound: u64,
    },
}

/// One past the largest id `d` can hold (a `vocab_size` at most this keeps every
/// delivered id in `d`); `None` for floats, which hold no ids.
fn id_bound(d: DType) -> Option<u64> {
    use DType::*;
    Some(match d {
        Uint8 => 1 << 8,
        Int8 => 1 << 7,
        Int16 => 1 << 15,
        Uint16 => 1 << 16,
        Int32 => 1 << 31,
        Uint32 => 1 << 32,
        Int64 => 1 << 63,
        Float32 | Float64 => return None,
    })
}

/// True when every value of `from` is representable in `to` (floats never are ids).
fn fits(from: DType, to: DType) -> bool {
    use DType::*;
    let range = |d: DType| -> Option<(i128, i128)> {
        Some(match d {
            Uint8 => (0, u8::MAX as i128),
            Int8 => (i8::MIN as i128, i8::MAX as i128),
            Int16 => (i16::MIN as i128, i16::MAX as i128),
            Uint16 => (0, u16::MAX as i128),
            Int32 => (i32::MIN as i128, i32::MAX as i128),
            Uint32 => (0, u32::MAX as i128),
            Int64 => (i64::MIN as i128, i64::MAX as i128),
            Float32 | Float64 => return None,
        })
    };
    match (range(from), range(to)) {
        (Some((a, b)), Some((c, d))) => c <= a && b <= d,
        _ => false,
    }
}

impl TokenType {
    /// The dtype compact slots carry tokens in: the shards' own when every shard has the
    /// same integer dtype (so filling a slot copies spans, no per-token conversion),
    /// else the narrowest of uint16, int32 and int64 that holds every shard's ids
    /// exactly. Float shards are refused at start-up by `token_dtype`; should one get
    /// here it is served as int64, as the expanded layout does.
    pub fn compact(shard_dtypes: impl IntoIterator<Item = DType>) -> TokenType {
        let all: Vec<DType> = shard_dtypes.into_iter().collect();
        if let Some(&first) = all.first() {
            if all.iter().all(|&d| d == first) && fits(first, DType::Int64) {
                return TokenType(first);
            }
        }
        let out = [DType::Uint16, DType::Int32]
            .into_iter()
            .find(|&to| all.iter().all(|&d| fits(d, to)))
            .unwrap_or(DType::Int64);
        TokenType(out)
    }
}

/// One array inside a slot, as announced in WELCOME.
#[derive(Debug, Clone)]
pub struct Field {
    /// Byte offset from the slot's start (a multiple of 64).
    pub offset: usize,
    /// numpy dtype name.
    pub dtype: &'static str,
    /// Array shape.
    pub shape: Vec<u64>,
    pub(super) bytes: usize,
}

/// One array of a slot before it is placed: name, numpy dtype, element size, shape.
type ArraySpec = (&'static str, &'static str, usize, Vec<u64>);

/// Where everything sits in a ring: fixed for the ring's life, sent to clients once.
#[derive(Debug, Clone)]
pub struct Layout {
    /// Rows per slot (the rank's share of the global batch).
    pub rows: u32,
    /// Input positions per row.
    pub seq_len: u32,
    /// Slots in the ring.
    pub slots: u32,
    /// Token element type.
    pub token: TokenType,
    /// Which arrays the slots hold.
    pub kind: SlotLayout,
    /// Bytes per row of the compact layout's `doc_starts` bitmap (0 when expanded).
    pub starts_bytes: usize,
    /// Stride between slots.
    pub slot_bytes: u64,
    /// Size of the memfd.
    pub ring_bytes: u64,
    /// Expanded: tokens, labels, loss_mask, position_ids, cu_seqlens, domain,
    /// row_loss_tokens, cursor. Compact: rows, doc_starts, row_real_tokens, domain,
    /// row_loss_tokens, cursor, row_bounds. In this (increasing offset) order, the
    /// order of the slot header's offset table ([`crate::wire::ring::FIELD_SLOTS`]).
    pub fields: Vec<(&'static str, Field)>,
}

const fn align(x: usize, a: usize) -> usize {
    x.div_ceil(a) * a
}

impl Layout {
    /// Lays out `slots` expanded slots of `rows` rows of `seq_len` positions, with room
    /// for a cursor blob of `cursor_cap` bytes.
    pub fn new(rows: u32, seq_len: u32, slots: u32, token: TokenType, cursor_cap: usize) -> Layout {
        let (r, l) = (rows as u64, seq_len as u64);
        let mut spec = vec![
            ("tokens", token.0.name(), token.0.size(), vec![r, l]),
            ("labels", token.0.name(), token.0.size(), vec![r, l]),
            ("loss_mask", "uint8", 1, vec![r, l]),
            ("position_ids", "int32", 4, vec![r, l]),
            ("cu_seqlens", "int32", 4, vec![r * l + 1]),
        ];
        spec.extend(Layout::common(r, cursor_cap));
        Layout::place(rows, seq_len, slots, token, SlotLayout::Expanded, spec)
    }

    /// Lays out `slots` compact slots: per row the `seq_len + 1` tokens, a bitmap of
    /// where document pieces start (one bit per token, so it holds any number of
    /// documents exactly), and the real-token count; nothing a client must derive
    /// per token. After the cursor, each row's `cu_seqlens` end and longest piece
    /// (`row_bounds`), so that a trainer splitting the step into micro-batches finds
    /// their bounds without unpacking the starts on its CPU (docs/PROTOCOL.md section 4).
    pub fn compact(
        rows: u32,
        seq_len: u32,
        slots: u32,
        token: TokenType,
        cursor_cap: usize,
    ) -> Layout {
        let (r, l) = (rows as u64, seq_len as u64);
        let starts = (l + 1).div_ceil(8);
        let mut spec = vec![
            ("rows", token.0.name(), token.0.size(), vec![r, l + 1]),
            ("doc_starts", "uint8", 1, vec![r, starts]),
            ("row_real_tokens", "int32", 4, vec![r]),
        ];
        spec.extend(Layout::common(r, cursor_cap));
        // Past the cursor, so that the offset table lists it after the cursor too: a
        // client that predates it reads the entries it knows and ignores the rest.
        spec.push(("row_bounds", "int32", 4, vec![r, 2]));
        Layout::place(rows, seq_len, slots, token, SlotLayout::Compact, spec)
    }

    /// The layout of `kind`.
    pub fn of(
        kind: SlotLayout,
        rows: u32,
        seq_len: u32,
        slots: u32,
        token: TokenType,
        cursor_cap: usize,
    ) -> Layout {
        match kind {
            SlotLayout::Compact => Layout::compact(rows, seq_len, slots, token, cursor_cap),
            SlotLayout::Expanded => Layout::new(rows, seq_len, slots, token, cursor_cap),
        }
    }

    /// The arrays both layouts have after their own, for `r` rows: domain,
    /// row_loss_tokens and the cursor field of `cursor_cap` bytes.
    fn common(r: u64, cursor_cap: usize) -> [ArraySpec; 3] {
        [
            ("domain", "int32", 4, vec![r]),
            ("row_loss_tokens", "int32", 4, vec![r]),
            ("cursor", "uint8", 1, vec![cursor_cap as u64]),
        ]
    }

    /// Places the arrays of `spec`, in its order, after the slot header, each
    /// 64-aligned, slots page-aligned.
    fn place(
        rows: u32,
        seq_len: u32,
        slots: u32,
        token: TokenType,
        kind: SlotLayout,
        spec: Vec<ArraySpec>,
    ) -> Layout {
        let mut at = SLOT_HEADER;
        let mut fields = Vec::with_capacity(spec.len());
        for (name, dtype, size, shape) in spec {
            let bytes = shape.iter().product::<u64>() as usize * size;
            fields.push((
                name,
                Field {
                    offset: at,
                    dtype,
                    shape,
                    bytes,
                },
            ));
            at = align(at + bytes, 64);
        }
        let slot_bytes = align(at, 4096) as u64;
        Layout {
            rows,
            seq_len,
            slots,
            token,
            kind,
            starts_bytes: match kind {
                SlotLayout::Compact => (seq_len as usize + 1).div_ceil(8),
                SlotLayout::Expanded => 0,
            },
            slot_bytes,
            ring_bytes: RING_HEADER + slot_bytes * slots as u64,
            fields,
        }
    }

    /// Lays out a ring for every stage: `shapes` are `(rows per rank, seq_len)`, the
    /// first being the stage at step 0, whose offsets the layout keeps. The slot
    /// stride is the largest over the stages and over `reserve` (room for `reserve.0`
    /// tokens per step, [`Layout::reserve`]), so the ring never changes size, a stage
    /// added live fits while it needs no more, and a client reads any slot by its
    /// header (docs/PROTOCOL.md section 4, "Stages").
    pub fn staged(
        kind: SlotLayout,
        shapes: &[(u32, u32)],
        reserve: u64,
        slots: u32,
        token: TokenType,
        cursor_cap: usize,
    ) -> Layout {
        let &(rows, seq) = shapes.first().unwrap_or(&(1, 1));
        let mut first = Layout::of(kind, rows, seq, slots, token, cursor_cap);
        let most = (shapes.iter())
            .map(|&(r, q)| Layout::of(kind, r, q, slots, token, cursor_cap).slot_bytes)
            .chain([first.reserve(reserve)])
            .max()
            .unwrap_or(first.slot_bytes);
        first.slot_bytes = most;
        first.ring_bytes = RING_HEADER + most * slots as u64;
        first
    }

    /// The slot bytes that `tokens` tokens per step take, so that a stage added later
    /// with no more rows than this layout's and no more tokens per step fits: the
    /// larger of the slot of this layout's rows sharing them and that of one row of
    /// them all (a slot's size grows linearly in the rows between the two), page
    /// rounded. 0 for no reserve.
    pub fn reserve(&self, tokens: u64) -> u64 {
        if tokens == 0 {
            return 0;
        }
        let t = tokens.min(u32::MAX as u64) as u32;
        let (rows, cap) = (self.rows.max(1), self.cursor_cap());
        let at = |r: u32, q: u32| Layout::of(self.kind, r, q, 1, self.token, cap).slot_bytes;
        // 64-byte alignment of each field can add up to a cache line per field between
        // the two ends; a page of slack covers it.
        at(rows, t.div_ceil(rows)).max(at(1, t)) + 4096
    }

    /// The layout of a slot of `rows` rows of `seq_len` (a stage of the plan, from the
    /// config or added live) in this ring, or the bytes it would need when it does not
    /// fit this ring's slots.
    pub fn stage(&self, rows: u32, seq_len: u32) -> Result<Layout, u64> {
        let cap = self.cursor_cap();
        let mut l = Layout::of(self.kind, rows, seq_len, self.slots, self.token, cap);
        if l.slot_bytes > self.slot_bytes {
            return Err(l.slot_bytes);
        }
        l.slot_bytes = self.slot_bytes;
        l.ring_bytes = self.ring_bytes;
        Ok(l)
    }

    /// The fields as WELCOME announces them.
    pub fn field_specs(&self) -> BTreeMap<String, FieldSpec> {
        self.fields
            .iter()
            .map(|(n, f)| {
                let spec = FieldSpec {
                    dtype: f.dtype.to_string(),
                    offset: f.offset as u64,
                    shape: f.shape.clone(),
                };
                (n.to_string(), spec)
            })
            .collect()
    }

    pub(super) fn cursor_cap(&self) -> usize {
        (self.fields.iter())
            .find(|(n, _)| *n == "cursor")
            .map_or(0, |(_, f)| f.bytes)
    }
}

/// A sealed memfd mapped read-write by the daemon, with a read-only fd for clients.
pub struct Ring {
    layout: Layout,
    /// The mapping: header words go through its atomics, slots through `slot_mut`.
    shm: Shm,
    /// Read-only reopen of the memfd, handed to every peer.
    ro: OwnedFd,
    /// Per slot: whether a [`SlotMut`] of it is alive (see [`Ring::claim`]).
    busy: Box<[AtomicBool]>,
}

/// A slot held by one writer (the hub's worker filling it, or the publisher stamping
/// it): its bytes, writable; the slot is free again when this is dropped.
pub struct SlotMut<'a> {
    bytes: &'a mut [u8],
    busy: &'a AtomicBool,
}

impl std::ops::Deref for SlotMut<'_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.bytes
    }
}

impl std::ops::DerefMut for SlotMut<'_> {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.bytes
    }
}

impl Drop for SlotMut<'_> {
    fn drop(&mut self) {
        self.busy.store(false, Ordering::Release);
    }
}

impl Ring {
    /// Creates, sizes, pre-faults and seals a ring whose first step is `first_step`.
    pub fn create(name: &str, layout: Layout, first_step: u64) -> Result<Ring, RingError> {
        let cname = std::ffi::CString::new(format!("millrace:{name}"))
            .unwrap_or_else(|_| c"millrace".to_owned());
        let fd = memfd_create(&cname, MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING)
            .map_err(|e| os("memfd_create")(e.into()))?;
        let file = File::from(fd);
        file.set_len(layout.ring_bytes).map_err(os("ftruncate"))?;
        let shm = Shm::create(&file, |map| {
            // Pre-fault every page now, so no batch ever pays a page fault on a fresh slot.
            map.fill(0);
            map[ring_at::MAGIC..ring_at::MAGIC + MAGIC.len()].copy_from_slice(MAGIC);
            put_u32(map, ring_at::VERSION, LAYOUT_VERSION);
            put_u32(map, ring_at::SLOTS, layout.slots);
            put_u64(map, ring_at::SLOT_BYTES, layout.slot_bytes);
            put_u64(map, ring_at::SLOT_OFFSET, RING_HEADER);
            put_u64(map, ring_at::FIRST_STEP, first_step);
            put_u64(map, ring_at::PUBLISHED, first_step);
        })
        .map_err(os("mmap"))?;
        seal(&file)?;
        let ro = reopen_read_only(&file)?;
        let busy = (0..layout.slots).map(|_| AtomicBool::new(false)).collect();
        Ok(Ring {
            layout,
            shm,
            ro,
            busy,
        })
    }

    /// The layout clients are told about.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The read-only descriptor to pass to clients.
    pub fn client_fd(&self) -> &OwnedFd {
        &self.ro
    }

    fn published_word(&self) -> &AtomicU64 {
        self.shm.atomic_u64(ring_at::PUBLISHED)
    }

    /// Moves a ring that has published nothing back to start at `step` (a peer resuming
    /// from an earlier batch joined before production began). Peers already mapped see
    /// `published` at or below their own step and keep waiting.
    pub fn restart_at(&self, step: u64) {
        self.shm
            .atomic_u64(ring_at::FIRST_STEP)
            .store(step, Ordering::Relaxed);
        self.publish(step);
    }

    /// The `published` word clients read: tests check that a ring moved back and put
    /// back tells its clients where it is.
    #[cfg(test)]
    pub(crate) fn published(&self) -> u64 {
        self.published_word().load(Ordering::Acquire)
    }

    /// Makes every step `< upto` visible to clients (release ordering: slot contents
    /// first, then the counter).
    pub fn publish(&self, upto: u64) {
        self.published_word().store(upto, Ordering::Release);
    }

    /// The slot of `step`, writable, held until the returned value is dropped. A slot
    /// already held (a second writer: a hub bug) is an error, never a second reference.
    ///
    /// Which slot may be written is the hub's call: one released by every peer (clients
    /// read a slot only between its publication and their release of it).
    pub fn claim(&self, step: u64) -> Result<SlotMut<'_>, RingError> {
        let i = (step % self.layout.slots as u64) as usize;
        let busy = &self.busy[i];
        if busy.swap(true, Ordering::Acquire) {
            return Err(RingError::Materialize {
                step,
                message: format!("slot {i} is already being written"),
            });
        }
        let start = RING_HEADER as usize + i * self.layout.slot_bytes as usize;
        // SAFETY: `busy[i]` was false and is now set by us, so no other `SlotMut` of this
        // slot lives in this process until ours drops; the ring hands out no other
        // reference into its slots (its atomics are header words before RING_HEADER,
        // and its `Shm` is private).
        let bytes = unsafe { self.shm.bytes_mut(start, self.layout.slot_bytes as usize) };
        Ok(SlotMut { bytes, busy })
    }

    /// Stamps the publish time (CLOCK_MONOTONIC ns, the clock clients compare it
    /// against) into the slot of `step`, filled and about to be published.
    pub fn stamp(&self, step: u64) -> Result<(), RingError> {
        put_u64(
            &mut self.claim(step)?,
            slot_at::PUBLISH_NS,
            crate::sys::monotonic_ns(),
        );
        Ok(())
    }
}

fn seal(file: &File) -> Result<(), RingError> {
    fcntl_add_seals(file, SealFlags::SHRINK | SealFlags::GROW)
        .map_err(|e| os("fcntl(F_ADD_SEALS)")(e.into()))?;
    // No new writable mapping or write(2) from now on (Linux >= 5.1); on older kernels
    // the read-only fd and the memfd's mode (0400, `reopen_read_only`) keep clients
    // from writing.
    let _ = fcntl_add_seals(file, SealFlags::FUTURE_WRITE);
    fcntl_add_seals(file, SealFlags::SEAL).map_err(|e| os("fcntl(F_SEAL_SEAL)")(e.into()))
}

/// The read-only descriptor clients get. A memfd is created mode 0777, and a client can
/// reopen the fd it holds through `/proc/self/fd` with any access its mode allows: a
/// client of another uid reopened a ring O_RDWR, and only F_SEAL_FUTURE_WRITE (Linux
/// 5.1 on) then kept it from writing. Once the reopen is done the memfd is made 0400, so
/// a reopen for writing is refused by its mode too (a client of the daemon's own uid,
/// its owner, could change the mode back: that user is trusted with the daemon anyway).
fn reopen_read_only(file: &File) -> Result<OwnedFd, RingError> {
    let path = format!("/proc/self/fd/{}", file.as_raw_fd());
    let ro = std::fs::OpenOptions::new()
        .read(true)
        .open(&path)
        .map_err(os("reopen memfd read-only via /proc/self/fd"))?;
    rustix::fs::fchmod(file, rustix::fs::Mode::from_raw_mode(0o400))
        .map_err(|e| os("fchmod 0400 the memfd")(e.into()))?;
    Ok(OwnedFd::from(ro))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dtype_fit_rules() {
        assert!(fits(DType::Uint16, DType::Int32));
        assert!(!fits(DType::Uint32, DType::Int32));
        assert!(fits(DType::Uint32, DType::Int64));
        assert!(!fits(DType::Float32, DType::Int64));
        let doms = vec![
            ("a".to_string(), DType::Uint16),
            ("b".to_string(), DType::Int32),
        ];
        assert!(TokenType::choose("shard", &doms, None)
            .unwrap_err()
            .to_string()
            .contains("one dtype"));
        assert_eq!(
            TokenType::choose("int64", &doms, None).unwrap().0,
            DType::Int64
        );
        let wide = vec![("c".to_string(), DType::Uint32)];
        assert!(TokenType::choose("int32", &wide, None)
            .unwrap_err()
            .to_string()
            .contains("domain c"));
    }

    #[test]
    fn a_vocabulary_that_fits_lets_wider_shards_into_narrower_slots() {
        // OLMo's uint32 shards, vocabulary 100,278: every id a ring delivers fits int32.
        let wide = vec![("olmo".to_string(), DType::Uint32)];
        let ok = TokenType::choose("int32", &wide, Some(100_278)).unwrap();
        assert_eq!(ok.0, DType::Int32);
        assert!(TokenType::choose("int32", &wide, Some(1 << 31)).is_ok());
        let err = TokenType::choose("int32", &wide, Some((1 << 31) + 1))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("domain olmo") && err.contains("vocab_size") && err.contains("2147483648"),
            "{err}"
        );
        let float = vec![("f".to_string(), DType::Float32)];
        assert!(TokenType::choose("int32", &float, Some(1000)).is_err());
    }

    #[test]
    fn layout_is_aligned_and_ordered() {
        for kind in [SlotLayout::Expanded, SlotLayout::Compact] {
            let l = Layout::of(kind, 3, 100, 4, TokenType(DType::Int32), 1000);
            let mut prev = SLOT_HEADER;
            for (_, f) in &l.fields {
                assert_eq!(f.offset % 64, 0);
                assert!(f.offset >= prev);
                prev = f.offset + f.bytes;
            }
            assert!(prev as u64 <= l.slot_bytes);
            assert_eq!(l.slot_bytes % 4096, 0);
            assert_eq!(l.ring_bytes, RING_HEADER + 4 * l.slot_bytes);
            let cursor_at = l.fields.iter().position(|f| f.0 == "cursor");
            let trailer: &[&str] = match kind {
                SlotLayout::Compact => &["row_bounds"],
                SlotLayout::Expanded => &[],
            };
            assert_eq!(cursor_at, Some(l.fields.len() - 1 - trailer.len()));
            assert_eq!(l.cursor_cap(), 1000);
        }
        // 8 rows of 4096: the compact slot carries 2 bytes per token (uint16) plus one bit
        // of boundaries, against 13 (int32 tokens and labels, positions, mask).
        let c = Layout::compact(8, 4096, 1, TokenType(DType::Uint16), 0);
        let e = Layout::new(8, 4096, 1, TokenType(DType::Int32), 0);
        let data = |l: &Layout| -> usize { l.fields.iter().map(|f| f.1.bytes).sum() };
        assert_eq!(data(&c), 8 * 4097 * 2 + 8 * 513 + 3 * 8 * 4 + 8 * 2 * 4);
        assert!(data(&e) > 6 * data(&c), "{} vs {}", data(&e), data(&c));
    }

    /// A ring for stages has the largest stage's slot stride, and each stage keeps the
    /// offsets of its own shape; a reserve makes room for any stage of no more rows per
    /// rank and no more tokens, and a stage past it is refused with the bytes it needs.
    #[test]
    fn a_staged_layout_is_sized_for_the_largest_stage_and_the_reserve() {
        for kind in [SlotLayout::Expanded, SlotLayout::Compact] {
            let t = TokenType(DType::Uint16);
            let shapes = [(8, 512), (1, 8192), (2, 256)];
            let l = Layout::staged(kind, &shapes, 0, 3, t, 512);
            let own: Vec<Layout> = (shapes.iter())
                .map(|&(r, q)| Layout::of(kind, r, q, 3, t, 512))
                .collect();
            let most = own.iter().map(|o| o.slot_bytes).max().unwrap();
            assert!(own.iter().any(|o| o.slot_bytes < most));
            assert_eq!((l.slot_bytes, l.ring_bytes), (most, RING_HEADER + 3 * most));
            for (&(r, q), o) in shapes.iter().zip(&own) {
                let at = l.stage(r, q).unwrap();
                assert_eq!((at.rows, at.seq_len), (o.rows, o.seq_len));
                assert_eq!(at.field_specs(), o.field_specs());
                assert_eq!(at.slot_bytes, most);
            }
            assert_eq!(l.field_specs(), own[0].field_specs());
            // The ring's own shape placed as a stage is the ring's layout itself, which
            // `fill_slot` therefore uses as it is.
            let s0 = l.stage(8, 512).unwrap();
            assert_eq!(
                (
                    s0.field_specs(),
                    s0.slot_bytes,
                    s0.ring_bytes,
                    s0.starts_bytes
                ),
                (l.field_specs(), l.slot_bytes, l.ring_bytes, l.starts_bytes)
            );
            // No reserve: a stage twice the largest does not fit, and says what it needs.
            let big = Layout::of(kind, 1, 16384, 3, t, 512).slot_bytes;
            assert_eq!(l.stage(1, 16384).unwrap_err(), big);
            // A reserve of 64k tokens per step fits every split of them over at most the
            // first stage's 8 rows.
            let r = Layout::staged(kind, &shapes, 65536, 3, t, 512);
            for rows in 1..=8u32 {
                let fit = r.stage(rows, 65536 / rows);
                assert!(fit.is_ok(), "{kind:?} {rows} rows of {}", 65536 / rows);
            }
            assert!(r.stage(1, 4 * 65536).is_err());
        }
    }

    #[test]
    fn compact_dtype_is_the_shards_own_or_the_narrowest_exact_one() {
        use DType::*;
        assert_eq!(TokenType::compact([Uint16, Uint16]).0, Uint16);
        assert_eq!(TokenType::compact([Uint8, Uint8]).0, Uint8);
        assert_eq!(TokenType::compact([Int32]).0, Int32);
        assert_eq!(TokenType::compact([Uint8, Uint16]).0, Uint16);
        assert_eq!(TokenType::compact([Uint16, Int32]).0, Int32);
        assert_eq!(TokenType::compact([Int16, Uint16]).0, Int32);
        assert_eq!(TokenType::compact([Uint16, Uint32]).0, Int64);
        assert_eq!(TokenType::compact([Float32]).0, Int64);
    }

    #[test]
    fn a_slot_has_one_writer_at_a_time() {
        let layout = Layout::new(1, 16, 2, TokenType(DType::Int32), 64);
        let ring = Ring::create("t", layout.clone(), 0).unwrap();
        let mut a = ring.claim(4).unwrap();
        let e = ring.claim(6).err().expect("slot 0 is held").to_string();
        assert!(e.contains("step 6: slot 0 is already being written"), "{e}");
        assert!(ring.stamp(2).is_err());
        let b = ring.claim(5).unwrap();
        assert_eq!(a.len(), layout.slot_bytes as usize);
        assert_eq!(b.len(), layout.slot_bytes as usize);
        a[..8].copy_from_slice(&9u64.to_le_bytes());
        drop(a);
        ring.stamp(0).unwrap();
        let view = Shm::read_only(ring.client_fd(), layout.ring_bytes as usize).unwrap();
        let slot0 = RING_HEADER as usize;
        assert_eq!(view.bytes(slot0, 8), 9u64.to_le_bytes());
        assert_ne!(view.bytes(slot0 + slot_at::PUBLISH_NS, 8), [0; 8]);
    }

    #[test]
    fn ring_is_sealed_and_client_fd_is_read_only() {
        let layout = Layout::new(2, 16, 3, TokenType(DType::Int32), 256);
        let ring = Ring::create("test", layout, 7).unwrap();
        let fd = ring.client_fd();
        let flags = rustix::fs::fcntl_getfl(fd).unwrap();
        assert_eq!(
            flags & rustix::fs::OFlags::RWMODE,
            rustix::fs::OFlags::RDONLY
        );
        let seals = rustix::fs::fcntl_get_seals(fd).unwrap();
        assert!(seals.contains(SealFlags::GROW | SealFlags::SHRINK | SealFlags::SEAL));
        // A writable shared mapping through the client's fd is refused.
        let e = memmap2::MmapOptions::new()
            .len(4096)
            .map_raw(fd)
            .unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EACCES), "{e}");
        assert_eq!(ring.published_word().load(Ordering::Acquire), 7);
        // The header a client checks is what `create` wrote.
        let view = Shm::read_only(fd, RING_HEADER as usize).unwrap();
        assert_eq!(view.bytes(ring_at::MAGIC, MAGIC.len()), MAGIC);
        assert_eq!(
            view.atomic_u64(ring_at::FIRST_STEP).load(Ordering::Relaxed),
            7
        );
    }
}
