//! The shared-memory ring of one data-parallel rank, and the materializer that fills its
//! slots: tokens copied from the mapped shards, labels, loss mask, position ids and
//! flash-attention `cu_seqlens` built beside them (docs/PROTOCOL.md, section 4).
//!
//! A ring is one sealed memfd. The daemon maps it read-write once and pre-faults every
//! page; clients get a read-only fd to the same pages, so a batch is written once and
//! read in place by every peer of the rank. Slots are reused, never allocated per batch.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use rustix::fs::{fcntl_add_seals, memfd_create, MemfdFlags, SealFlags};

use crate::corpus::{guard, DType, Shard, Tokens};
use crate::plan::Row;
use crate::sys::{advise, Advice, Shm};
use crate::wire::ring::{
    put_u32, put_u64, ring_at, slot_at, LAYOUT_VERSION, MAGIC, RING_HEADER, SLOT_HEADER,
};
use crate::wire::FieldSpec;

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
    /// cannot hold every id a shard's dtype can store, so no token is ever truncated.
    pub fn choose(setting: &str, shard_dtypes: &[(String, DType)]) -> Result<TokenType, String> {
        let out = match setting {
            "int32" => DType::Int32,
            "int64" => DType::Int64,
            "shard" => {
                let mut it = shard_dtypes.iter();
                let Some((_, first)) = it.next() else {
                    return Err("token_dtype = \"shard\" needs at least one shard".into());
                };
                if let Some((name, other)) = it.find(|(_, d)| d != first) {
                    return Err(format!(
                        "token_dtype = \"shard\" needs one dtype across domains, but {} is {first} \
                         and {name} is {other}; set token_dtype = \"int32\" or \"int64\"",
                        shard_dtypes[0].0
                    ));
                }
                *first
            }
            other => {
                return Err(format!(
                    "token_dtype = {other:?}: expected \"int32\", \"int64\" or \"shard\""
                ))
            }
        };
        for (name, d) in shard_dtypes {
            if !fits(*d, out) {
                return Err(format!(
                    "domain {name} stores {d} tokens, which do not all fit token_dtype {out}; \
                     use \"int64\""
                ));
            }
        }
        Ok(TokenType(out))
    }
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

/// One array inside a slot, as announced in WELCOME.
#[derive(Debug, Clone)]
pub struct Field {
    /// Byte offset from the slot's start (a multiple of 64).
    pub offset: usize,
    /// numpy dtype name.
    pub dtype: &'static str,
    /// Array shape.
    pub shape: Vec<u64>,
    bytes: usize,
}

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
    /// Stride between slots.
    pub slot_bytes: u64,
    /// Size of the memfd.
    pub ring_bytes: u64,
    /// tokens, labels, loss_mask, position_ids, cu_seqlens, domain, row_loss_tokens,
    /// cursor, in this (increasing offset) order.
    pub fields: Vec<(&'static str, Field)>,
}

const fn align(x: usize, a: usize) -> usize {
    x.div_ceil(a) * a
}

impl Layout {
    /// Lays out `slots` slots of `rows` rows of `seq_len` positions, with room for a
    /// cursor blob of `cursor_cap` bytes.
    pub fn new(rows: u32, seq_len: u32, slots: u32, token: TokenType, cursor_cap: usize) -> Layout {
        let (r, l) = (rows as u64, seq_len as u64);
        let spec: [(&'static str, &'static str, usize, Vec<u64>); 8] = [
            ("tokens", token.0.name(), token.0.size(), vec![r, l]),
            ("labels", token.0.name(), token.0.size(), vec![r, l]),
            ("loss_mask", "uint8", 1, vec![r, l]),
            ("position_ids", "int32", 4, vec![r, l]),
            ("cu_seqlens", "int32", 4, vec![r * l + 1]),
            ("domain", "int32", 4, vec![r]),
            ("row_loss_tokens", "int32", 4, vec![r]),
            ("cursor", "uint8", 1, vec![cursor_cap as u64]),
        ];
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
            slot_bytes,
            ring_bytes: RING_HEADER + slot_bytes * slots as u64,
            fields,
        }
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

    fn cursor_cap(&self) -> usize {
        self.fields.last().map_or(0, |(_, f)| f.bytes)
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

    /// Stamps the publish time into the slot of `step` (filled, about to be published).
    pub fn stamp(&self, step: u64) -> Result<(), RingError> {
        stamp(&mut self.claim(step)?);
        Ok(())
    }

    /// The slot of `step`, writable, without a claim: what the hub used before
    /// [`Ring::claim`]. Goes at merge, once the hub claims (src/sys.rs's report).
    ///
    /// # Safety
    /// The caller must be the only one touching this slot, and no client may be reading
    /// it (it was released by every peer).
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn slot_mut(&self, step: u64) -> &mut [u8] {
        let i = step % self.layout.slots as u64;
        let start = RING_HEADER + i * self.layout.slot_bytes;
        self.shm
            .bytes_mut(start as usize, self.layout.slot_bytes as usize)
    }
}

fn seal(file: &File) -> Result<(), RingError> {
    fcntl_add_seals(file, SealFlags::SHRINK | SealFlags::GROW)
        .map_err(|e| os("fcntl(F_ADD_SEALS)")(e.into()))?;
    // No new writable mapping or write(2) from now on (Linux >= 5.1); older kernels
    // still get the read-only fd, which is what keeps clients from writing.
    let _ = fcntl_add_seals(file, SealFlags::FUTURE_WRITE);
    fcntl_add_seals(file, SealFlags::SEAL).map_err(|e| os("fcntl(F_SEAL_SEAL)")(e.into()))
}

fn reopen_read_only(file: &File) -> Result<OwnedFd, RingError> {
    let path = format!("/proc/self/fd/{}", file.as_raw_fd());
    let ro = std::fs::OpenOptions::new()
        .read(true)
        .open(&path)
        .map_err(os("reopen memfd read-only via /proc/self/fd"))?;
    Ok(OwnedFd::from(ro))
}

/// One step's slice for one rank, planned and waiting to be copied.
pub struct SlotJob {
    /// Trainer step.
    pub step: u64,
    /// Unskipped plan step.
    pub plan_step: u64,
    /// The rank's rows.
    pub rows: Vec<Row>,
    /// Cursor blob as of the end of the step.
    pub cursor: Vec<u8>,
}

/// What the materializer reads: the mapped shards per domain, the pad token and the
/// vocabulary every delivered id must fall in.
pub struct Source {
    /// Shards per domain, in plan order.
    pub shards: Vec<Vec<std::sync::Arc<Shard>>>,
    /// Token used for padding positions.
    pub pad_token: u64,
    /// `[plan] vocab_size`: ids at or above it fail the ring. Without it only negative
    /// ids do (no tokenizer makes them; a wrong dtype code does).
    pub vocab_size: Option<u64>,
}

impl Source {
    /// The exclusive upper bound on delivered ids, compared as u64 so that a negative
    /// id (which wraps to >= 2^63) is out of range whatever the vocabulary.
    fn id_limit(&self) -> u64 {
        self.vocab_size.unwrap_or(1 << 63)
    }
}

/// Integer element types a slot may hold tokens in.
trait Out: bytemuck::Pod {
    fn from_i64(v: i64) -> Self;
}
macro_rules! out {
    ($($t:ty),*) => {$(impl Out for $t { #[inline(always)] fn from_i64(v: i64) -> Self { v as $t } })*};
}
out!(u8, i8, i16, u16, i32, u32, i64);

/// Converts `src` into `dst` (same length) and, with `CHECK`, returns whether some id
/// was outside `0..limit` (the dtype check at start-up guarantees the values fit `T`).
/// The range check rides in the conversion loop as a running min and max in the stored
/// type (one `pmin`/`pmax` per vector of tokens, vectorized with the conversion) instead
/// of a second pass over the tokens; a per-token compare widened to u64 halved the fill's
/// speed. Without `CHECK` the min and max are dead code and compiled out.
fn convert<T: Out, const CHECK: bool>(src: Tokens<'_>, dst: &mut [T], limit: u64) -> bool {
    macro_rules! int {
        ($s:expr, $t:ty) => {{
            let (mut lo, mut hi) = (<$t>::MAX, <$t>::MIN);
            for (d, &v) in dst.iter_mut().zip($s) {
                *d = T::from_i64(v as i64);
                if CHECK {
                    lo = lo.min(v);
                    hi = hi.max(v);
                }
            }
            CHECK && !$s.is_empty() && ((lo as i64) < 0 || hi as i64 as u64 >= limit)
        }};
    }
    // Float dtypes are never meant for ids: convert and compare token by token.
    macro_rules! float {
        ($s:expr) => {{
            let mut bad = false;
            for (d, &v) in dst.iter_mut().zip($s) {
                let w = v as i64;
                *d = T::from_i64(w);
                bad |= CHECK && w as u64 >= limit;
            }
            bad
        }};
    }
    match src {
        Tokens::Uint8(s) => int!(s, u8),
        Tokens::Int8(s) => int!(s, i8),
        Tokens::Int16(s) => int!(s, i16),
        Tokens::Uint16(s) => int!(s, u16),
        Tokens::Int32(s) => int!(s, i32),
        Tokens::Uint32(s) => int!(s, u32),
        Tokens::Int64(s) => int!(s, i64),
        Tokens::Float32(s) => float!(s),
        Tokens::Float64(s) => float!(s),
    }
}

/// The first id of `t` outside `0..limit`, with its index: the slow path that words the
/// error once [`convert`] has found one.
fn first_out_of_range(t: Tokens<'_>, limit: u64) -> Option<(usize, i64)> {
    (0..t.len()).find_map(|i| {
        let v = t.get_i64(i)?;
        (v as u64 >= limit).then_some((i, v))
    })
}

/// Splits the slot into its header and its eight arrays (fields are in offset order).
fn carve<'a>(slot: &'a mut [u8], layout: &Layout) -> (&'a mut [u8], Vec<&'a mut [u8]>) {
    let (header, mut rest) = slot.split_at_mut(SLOT_HEADER);
    let mut at = SLOT_HEADER;
    let mut out = Vec::with_capacity(layout.fields.len());
    for (_, f) in &layout.fields {
        let (_, tail) = std::mem::take(&mut rest).split_at_mut(f.offset - at);
        let (field, tail) = tail.split_at_mut(f.bytes);
        out.push(field);
        rest = tail;
        at = f.offset + f.bytes;
    }
    (header, out)
}

/// Typed view of a field; offsets are 64-aligned in a page-aligned slot, so the cast
/// cannot fail for a layout built by [`Layout::new`].
fn typed<T: bytemuck::Pod>(b: &mut [u8]) -> &mut [T] {
    bytemuck::cast_slice_mut(b)
}

/// Fills `slot` with `job` (everything but the ring's `published` word) and returns the
/// slot's real-token count. `publish_ns` is stamped by the caller just before publishing.
///
/// Shard reads are guarded ([`crate::corpus::guard`]): a shard truncated under the
/// daemon, or one already poisoned, fails this fill with an error naming it, and an id
/// outside the vocabulary fails it naming shard, document and value.
pub fn fill_slot(
    slot: &mut [u8],
    layout: &Layout,
    job: &SlotJob,
    src: &Source,
) -> Result<u64, RingError> {
    let _guard = guard::enter();
    // A fault left over from an unguarded read elsewhere is not this fill's.
    let _ = guard::take_fault();
    match layout.token.0 {
        DType::Uint8 => fill_typed::<u8>(slot, layout, job, src),
        DType::Int8 => fill_typed::<i8>(slot, layout, job, src),
        DType::Int16 => fill_typed::<i16>(slot, layout, job, src),
        DType::Uint16 => fill_typed::<u16>(slot, layout, job, src),
        DType::Int32 => fill_typed::<i32>(slot, layout, job, src),
        DType::Uint32 => fill_typed::<u32>(slot, layout, job, src),
        DType::Int64 | DType::Float32 | DType::Float64 => fill_typed::<i64>(slot, layout, job, src),
    }
}

fn fill_typed<T: Out>(
    slot: &mut [u8],
    layout: &Layout,
    job: &SlotJob,
    src: &Source,
) -> Result<u64, RingError> {
    let fail = |message: String| RingError::Materialize {
        step: job.step,
        message,
    };
    let l = layout.seq_len as usize;
    let cap = l + 1;
    if job.rows.len() != layout.rows as usize {
        return Err(fail(format!(
            "{} rows planned for a {}-row slot",
            job.rows.len(),
            layout.rows
        )));
    }
    if job.cursor.len() > layout.cursor_cap() {
        return Err(fail(format!(
            "cursor blob of {} bytes exceeds the slot's {}",
            job.cursor.len(),
            layout.cursor_cap()
        )));
    }
    let (header, mut f) = carve(slot, layout);
    let [tokens, labels, mask, pos, cu, domain, row_loss, cursor] = &mut f[..] else {
        return Err(fail("slot layout has the wrong number of fields".into()));
    };
    let tokens: &mut [T] = typed(tokens);
    let labels: &mut [T] = typed(labels);
    let pos: &mut [i32] = typed(pos);
    let cu: &mut [i32] = typed(cu);
    let domain: &mut [i32] = typed(domain);
    let row_loss: &mut [i32] = typed(row_loss);

    let pad = T::from_i64(src.pad_token as i64);
    let limit = src.id_limit();

    let mut n_cu = 1usize;
    cu[0] = 0;
    let mut max_seqlen = 0u32;
    let mut loss_total = 0u64;
    let mut real_total = 0u64;
    for (r, row) in job.rows.iter().enumerate() {
        let base = r * l;
        let mut p = 0usize;
        let mut row_loss_n = 0i32;
        // Slots are reused: clear the mask, then set the ones each piece earns.
        mask[base..base + l].fill(0);
        let shards = src
            .shards
            .get(row.domain as usize)
            .ok_or_else(|| fail(format!("row {r}: domain {} does not exist", row.domain)))?;
        for s in &row.segments {
            let shard = shards.get(s.shard as usize).ok_or_else(|| {
                fail(format!(
                    "row {r}: domain {} has no shard {}",
                    row.domain, s.shard
                ))
            })?;
            if let Some(why) = shard.poisoned() {
                return Err(fail(format!(
                    "row {r}: document {} of a poisoned shard: {why}",
                    s.doc
                )));
            }
            // A read that faulted (the file shrank under its mapping) saw zeros: poison
            // the shard so nothing serves those zeros, and fail naming it.
            let faulted = |addr: usize| {
                let why = describe_fault(shard, addr);
                shard.poison(why.clone());
                fail(format!("row {r}: reading document {}: {why}", s.doc))
            };
            let doc = shard.doc_tokens(s.doc);
            if let Some(addr) = guard::take_fault() {
                return Err(faulted(addr));
            }
            let doc = doc.map_err(|e| fail(format!("row {r}: {e}")))?;
            let n = s.len as usize;
            if n == 0 {
                continue;
            }
            let (a, b) = (s.start as usize, s.start as usize + n);
            if b > doc.len() || p + n > cap {
                return Err(fail(format!(
                    "row {r}: {} document {} tokens {a}..{b} do not fit (document has {}, \
                     row position {p} of {cap})",
                    shard.path().display(),
                    s.doc,
                    doc.len()
                )));
            }
            let piece = slice_tokens(doc, a, b);
            // Inputs this piece covers: [p, min(p+n, l)).
            let end = (p + n).min(l);
            // Convert straight into both arrays (no staging row): input position q
            // holds t[q], label position q-1 holds t[q].
            // Every delivered token is a label, except the row's first input (p == 0):
            // the labels' conversion checks the range, and that one token is checked
            // alone, so each token is checked once, not twice.
            let mut bad = false;
            if end > p {
                convert::<T, false>(
                    slice_tokens(piece, 0, end - p),
                    &mut tokens[base + p..base + end],
                    limit,
                );
            }
            let (skip, lab) = if p == 0 { (1, 0) } else { (0, p - 1) };
            if p == 0 {
                bad |= piece.get_i64(0).is_some_and(|v| v as u64 >= limit);
            }
            let lab_end = (p + n - 1).min(l);
            if lab_end > lab {
                bad |= convert::<T, true>(
                    slice_tokens(piece, skip, skip + lab_end - lab),
                    &mut labels[base + lab..base + lab_end],
                    limit,
                );
            }
            if let Some(addr) = guard::take_fault() {
                return Err(faulted(addr));
            }
            if bad {
                let (i, v) = first_out_of_range(piece, limit).unwrap_or((0, -1));
                let bound = match src.vocab_size {
                    Some(v) => format!("outside vocab_size {v} (ids 0..{v})"),
                    None => "negative (token ids never are; is the dtype code right?)".into(),
                };
                return Err(fail(format!(
                    "row {r}: {} document {} token {} has id {v}, {bound}",
                    shard.path().display(),
                    s.doc,
                    a + i
                )));
            }
            if end > p {
                for (i, v) in pos[base + p..base + end].iter_mut().enumerate() {
                    *v = i as i32;
                }
                // A label stays inside the piece for inputs p ..= p+n-2.
                let m_end = (p + n - 1).min(l);
                mask[base + p..base + m_end].fill(1);
                row_loss_n += (m_end - p) as i32;
                cu[n_cu] = (base + end) as i32;
                n_cu += 1;
                max_seqlen = max_seqlen.max((end - p) as u32);
            }
            p += n;
        }
        real_total += p as u64;
        if p < l {
            tokens[base + p..base + l].fill(pad);
        }
        labels[base + p.saturating_sub(1).min(l)..base + l].fill(pad);
        if p < l {
            for (i, v) in pos[base + p..base + l].iter_mut().enumerate() {
                *v = i as i32;
            }
            cu[n_cu] = (base + l) as i32;
            n_cu += 1;
            max_seqlen = max_seqlen.max((l - p) as u32);
        }
        domain[r] = row.domain as i32;
        row_loss[r] = row_loss_n;
        loss_total += row_loss_n as u64;
    }
    cursor[..job.cursor.len()].copy_from_slice(&job.cursor);
    put_u64(header, slot_at::STEP, job.step);
    put_u64(header, slot_at::PLAN_STEP, job.plan_step);
    put_u32(header, slot_at::ROWS, layout.rows);
    put_u32(header, slot_at::SEQ_LEN, layout.seq_len);
    put_u32(header, slot_at::CU_LEN, n_cu as u32);
    put_u32(header, slot_at::MAX_SEQLEN, max_seqlen);
    put_u64(header, slot_at::LOSS_TOKENS, loss_total);
    put_u64(header, slot_at::REAL_TOKENS, real_total);
    put_u32(header, slot_at::CURSOR_LEN, job.cursor.len() as u32);
    Ok(real_total)
}

/// Words a guarded read's fault at `addr`: which file of `shard`, at which byte.
fn describe_fault(shard: &Shard, addr: usize) -> String {
    let files: Vec<std::path::PathBuf> = match shard.as_megatron() {
        Some(m) => vec![m.idx_path().to_path_buf(), m.bin_path().to_path_buf()],
        None => vec![
            shard.path().to_path_buf(),
            format!("{} (its boundary cache)", shard.path().display()).into(),
        ],
    };
    for (map, file) in shard.mappings().into_iter().zip(files) {
        let start = map.as_ptr() as usize;
        if (start..start + map.len()).contains(&addr) {
            return format!(
                "{}: read at byte {} faulted (SIGBUS): the file shrank under the daemon's \
                 mapping (truncated or rewritten in place?); the shard is poisoned until \
                 restart",
                file.display(),
                addr - start
            );
        }
    }
    format!(
        "{}: a read faulted (SIGBUS) at an address outside its mappings; the shard is \
         poisoned until restart",
        shard.path().display()
    )
}

/// Tokens `a..b` of a document (bounds checked by the caller).
fn slice_tokens(t: Tokens<'_>, a: usize, b: usize) -> Tokens<'_> {
    match t {
        Tokens::Uint8(s) => Tokens::Uint8(&s[a..b]),
        Tokens::Int8(s) => Tokens::Int8(&s[a..b]),
        Tokens::Int16(s) => Tokens::Int16(&s[a..b]),
        Tokens::Uint16(s) => Tokens::Uint16(&s[a..b]),
        Tokens::Int32(s) => Tokens::Int32(&s[a..b]),
        Tokens::Uint32(s) => Tokens::Uint32(&s[a..b]),
        Tokens::Int64(s) => Tokens::Int64(&s[a..b]),
        Tokens::Float32(s) => Tokens::Float32(&s[a..b]),
        Tokens::Float64(s) => Tokens::Float64(&s[a..b]),
    }
}

/// Stamps the slot's publish time (CLOCK_MONOTONIC ns) right before it is published.
pub fn stamp(slot: &mut [u8]) {
    put_u64(slot, slot_at::PUBLISH_NS, monotonic_ns());
}

/// CLOCK_MONOTONIC in nanoseconds: the clock clients compare `publish_ns` against.
pub use crate::sys::monotonic_ns;

/// Tells the kernel which pages a planned segment will read, so a cold shard is read
/// with exact spans ahead of the copy instead of faulting (and reading ahead 8 MiB) on
/// the hot path.
pub fn will_need(bytes: &[u8]) {
    advise(bytes, Advice::WillNeed);
}

/// Marks a whole shard mapping as randomly accessed: page faults then read only the
/// pages they need, and `will_need` supplies the lookahead the plan actually knows.
pub fn random_access(bytes: &[u8]) {
    advise(bytes, Advice::Random);
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
        assert!(TokenType::choose("shard", &doms)
            .unwrap_err()
            .contains("one dtype"));
        assert_eq!(TokenType::choose("int64", &doms).unwrap().0, DType::Int64);
        let wide = vec![("c".to_string(), DType::Uint32)];
        assert!(TokenType::choose("int32", &wide)
            .unwrap_err()
            .contains("domain c"));
    }

    #[test]
    fn layout_is_aligned_and_ordered() {
        let l = Layout::new(3, 100, 4, TokenType(DType::Int32), 1000);
        let mut prev = SLOT_HEADER;
        for (_, f) in &l.fields {
            assert_eq!(f.offset % 64, 0);
            assert!(f.offset >= prev);
            prev = f.offset + f.bytes;
        }
        assert!(prev as u64 <= l.slot_bytes);
        assert_eq!(l.slot_bytes % 4096, 0);
        assert_eq!(l.ring_bytes, RING_HEADER + 4 * l.slot_bytes);
    }

    /// One uint16 Megatron shard of 4 documents of 4096 tokens (one page of token bytes
    /// every half document), with ids `id` except token `odd.0` (= `odd.1`), and a one-row
    /// job reading the first 65 tokens of document 3.
    fn shard_and_job(
        dir: &std::path::Path,
        id: u16,
        odd: (usize, u16),
    ) -> (Source, SlotJob, Layout) {
        use crate::corpus::MegatronWriter;
        use crate::plan::Segment;
        let prefix = dir.join("s");
        let mut w = MegatronWriter::create(&prefix, DType::Uint16).unwrap();
        for _ in 0..4 {
            let doc: Vec<u8> = (0..4096)
                .flat_map(|i| if i == odd.0 { odd.1 } else { id }.to_le_bytes())
                .collect();
            w.add_document_bytes(&doc).unwrap();
        }
        w.finish().unwrap();
        let shard = std::sync::Arc::new(Shard::open(&prefix, None).unwrap());
        crate::corpus::guard::protect(shard.mappings()).unwrap();
        let seg = Segment {
            shard: 0,
            doc: 3,
            start: 0,
            len: 65,
            doc_len: 4096,
            group: None,
        };
        let job = SlotJob {
            step: 0,
            plan_step: 0,
            rows: vec![Row::new(0, 0, vec![seg], 65)],
            cursor: vec![],
        };
        let src = Source {
            shards: vec![vec![shard]],
            pad_token: 0,
            vocab_size: Some(1000),
        };
        (src, job, Layout::new(1, 64, 1, TokenType(DType::Int32), 64))
    }

    #[test]
    fn a_shard_truncated_under_the_copy_fails_the_fill_and_is_poisoned() {
        let dir = tempfile::tempdir().unwrap();
        let (src, job, layout) = shard_and_job(dir.path(), 7, (0, 7));
        let ring = Ring::create("t", layout.clone(), 0).unwrap();
        let slot = &mut ring.claim(0).unwrap();
        assert_eq!(fill_slot(slot, &layout, &job, &src).unwrap(), 65);
        std::fs::OpenOptions::new()
            .write(true)
            .open(dir.path().join("s.bin"))
            .unwrap()
            .set_len(4096)
            .unwrap();
        let e = fill_slot(slot, &layout, &job, &src)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("s.bin: read at byte 24576 faulted (SIGBUS)"),
            "{e}"
        );
        assert!(e.contains("document 3"), "{e}");
        assert!(src.shards[0][0].poisoned().is_some());
        // Poisoned: refused before any read, even of pages that are still there.
        let e = fill_slot(slot, &layout, &job, &src)
            .unwrap_err()
            .to_string();
        assert!(e.contains("poisoned shard"), "{e}");
    }

    #[test]
    fn ids_outside_the_vocabulary_fail_the_fill_naming_shard_document_and_value() {
        let dir = tempfile::tempdir().unwrap();
        let (mut src, job, layout) = shard_and_job(dir.path(), 1000, (0, 1000));
        let ring = Ring::create("t", layout.clone(), 0).unwrap();
        let slot = &mut ring.claim(0).unwrap();
        let e = fill_slot(slot, &layout, &job, &src)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("s document 3 token 0 has id 1000, outside vocab_size 1000"),
            "{e}"
        );
        src.vocab_size = Some(1001);
        assert_eq!(fill_slot(slot, &layout, &job, &src).unwrap(), 65);
        // Without a vocabulary, ids still must not be negative.
        src.vocab_size = None;
        assert_eq!(fill_slot(slot, &layout, &job, &src).unwrap(), 65);
        // Each delivered token is checked once: the row's first input alone, every other
        // one as a label (the last token of a row is only a label).
        for at in [0usize, 1, 63, 64] {
            let dir = tempfile::tempdir().unwrap();
            let (src, job, layout) = shard_and_job(dir.path(), 7, (at, 1000));
            let ring = Ring::create("t", layout.clone(), 0).unwrap();
            let slot = &mut ring.claim(0).unwrap();
            let e = fill_slot(slot, &layout, &job, &src)
                .unwrap_err()
                .to_string();
            assert!(e.contains(&format!("token {at} has id 1000")), "{e}");
        }
        let ok = Tokens::Int16(&[5, 7, 9]);
        let bad = Tokens::Int16(&[5, -7, 9]);
        let mut out = [0i32; 3];
        assert!(!convert::<i32, true>(ok, &mut out, src.id_limit()));
        assert!(convert::<i32, true>(bad, &mut out, src.id_limit()));
        assert!(!convert::<i32, false>(bad, &mut out, src.id_limit()));
        assert_eq!(first_out_of_range(bad, src.id_limit()), Some((1, -7)));
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
