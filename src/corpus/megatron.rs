//! Megatron-LM indexed datasets: the `.idx` + `.bin` pair that megatron-core's
//! `IndexedDatasetBuilder` writes, read zero-copy from memory maps.
//!
//! Layout of `.idx` (all little-endian; see docs/FORMATS.md):
//!
//! ```text
//! 0   9 bytes  magic "MMIDIDX\0\0"
//! 9   u64      version, always 1
//! 17  u8       dtype code (1..=8)
//! 18  u64      S = sequence count
//! 26  u64      D = document_indices count (documents + 1)
//! 34  i32[S]   sequence lengths, in tokens
//!     i64[S]   sequence pointers, byte offsets into .bin
//!     i64[D]   document_indices: document d is sequences [di[d], di[d+1])
//!     i8[S]    optional sequence modes (multimodal builds)
//! ```
//!
//! The arrays start at byte 34, so they are not naturally aligned: they are read with
//! `from_le_bytes` rather than cast. Opening checks only what is O(1) (header, sizes and
//! the two ends of every array) so that a multi-TB shard opens in microseconds;
//! [`MegatronShard::validate`] makes the single linear pass over the index that proves
//! every pointer, and every per-document accessor re-checks the few sequences it touches
//! and their neighbours' ends, so nothing ever reads outside the mapping, or another
//! document's bytes through one bad pointer, even for a shard that was never validated.

use std::path::{Path, PathBuf};

use memmap2::Mmap;

use super::error::{CorpusError, Result};
use super::tokens::{DType, Tokens};
use super::{le_i32, le_i64, le_u64, map_file, FileStamp};

pub use super::writer::MegatronWriter;

/// The 9-byte magic every Megatron `.idx` starts with.
pub const MAGIC: &[u8; 9] = b"MMIDIDX\x00\x00";
/// Bytes before the first array.
pub const HEADER_LEN: usize = 34;

/// One opened Megatron shard: both files mapped, the header decoded, nothing copied.
#[derive(Debug)]
pub struct MegatronShard {
    prefix: PathBuf,
    idx_path: PathBuf,
    bin_path: PathBuf,
    idx: Mmap,
    bin: Option<Mmap>,
    bin_len: u64,
    /// The mapped `.idx` and `.bin` as they were when mapped (fstat of the descriptors).
    idx_stamp: FileStamp,
    bin_stamp: FileStamp,
    dtype: DType,
    sequences: u64,
    /// Entries of document_indices (documents + 1).
    doc_index_len: u64,
    lengths_at: usize,
    pointers_at: usize,
    doc_index_at: usize,
    /// Set by a successful [`MegatronShard::validate`] when every document is exactly one
    /// sequence (the common case): a document's length is then one read, not three.
    one_seq_per_doc: std::sync::atomic::AtomicBool,
}

impl MegatronShard {
    /// Opens `<prefix>.idx` and `<prefix>.bin`, with the O(1) checks described above.
    pub fn open(prefix: &Path) -> Result<MegatronShard> {
        let idx_path = with_suffix(prefix, "idx");
        let bin_path = with_suffix(prefix, "bin");
        let idx_mapped = map_file(&idx_path)?;
        let (idx_len, idx_stamp) = (idx_mapped.len, idx_mapped.stamp);
        let idx = idx_mapped.map.ok_or_else(|| {
            CorpusError::invalid(&idx_path, "truncated index: the file is empty (0 bytes)")
        })?;
        // Before the first touch: a start reads a few places of each index (header, ends,
        // sampled pages, one window's lengths), and without this hint each first touch of
        // a cold index reads the read-ahead window around it (8 MiB on some VMs: the whole
        // 2.2 GB index set of a 10^13-token corpus). The full pass asks for read-ahead
        // itself (see `validate`).
        crate::sys::advise(&idx, crate::sys::Advice::Random);
        let bad = |what: String| CorpusError::invalid(&idx_path, what);

        if idx_len < HEADER_LEN as u64 {
            if idx[..idx.len().min(9)] != MAGIC[..idx.len().min(9)] {
                return Err(bad(format!(
                    "bad magic at byte 0: expected {:?}, found {:?}",
                    String::from_utf8_lossy(MAGIC),
                    String::from_utf8_lossy(&idx[..idx.len().min(9)])
                )));
            }
            return Err(bad(format!(
                "truncated index: {idx_len} bytes, shorter than the {HEADER_LEN}-byte header"
            )));
        }
        if &idx[..9] != MAGIC {
            return Err(bad(format!(
                "bad magic at byte 0: expected {:?}, found {:?} (not a Megatron index)",
                String::from_utf8_lossy(MAGIC),
                String::from_utf8_lossy(&idx[..9])
            )));
        }
        let version = le_u64(&idx, 9);
        if version != 1 {
            return Err(bad(format!(
                "unsupported index version {version} at byte 9 (only version 1 exists)"
            )));
        }
        let code = idx[17];
        let dtype = DType::from_megatron_code(code).ok_or_else(|| {
            bad(format!(
                "unsupported dtype code {code} at byte 17 (Megatron defines codes 1 to 8)"
            ))
        })?;
        let sequences = le_u64(&idx, 18);
        let doc_index_len = le_u64(&idx, 26);

        // Sizes in u128 so that a corrupt count cannot overflow the arithmetic.
        let s = u128::from(sequences);
        let d = u128::from(doc_index_len);
        let needed = HEADER_LEN as u128 + 12 * s + 8 * d;
        let have = u128::from(idx_len);
        if have < needed {
            return Err(bad(format!(
                "truncated index: {idx_len} bytes, but the header's {sequences} sequences and \
                 {doc_index_len} document boundaries need {needed} bytes"
            )));
        }
        if have != needed && have != needed + s {
            return Err(bad(format!(
                "index has {} unexpected trailing bytes after byte {needed} \
                 (header: {sequences} sequences, {doc_index_len} document boundaries)",
                have - needed
            )));
        }
        if doc_index_len == 0 {
            return Err(bad(
                "document_indices is empty: a valid index holds at least its leading 0".into(),
            ));
        }
        let lengths_at = HEADER_LEN;
        let pointers_at = lengths_at + 4 * sequences as usize;
        let doc_index_at = pointers_at + 8 * sequences as usize;

        let bin = map_file(&bin_path)?;
        let shard = MegatronShard {
            prefix: prefix.to_path_buf(),
            idx_path,
            bin_path,
            idx,
            bin: bin.map,
            bin_len: bin.len,
            idx_stamp,
            bin_stamp: bin.stamp,
            dtype,
            sequences,
            doc_index_len,
            lengths_at,
            pointers_at,
            doc_index_at,
            one_seq_per_doc: std::sync::atomic::AtomicBool::new(false),
        };
        shard.check_ends()?;
        Ok(shard)
    }

    /// The O(1) consistency checks between the arrays and the `.bin` size.
    fn check_ends(&self) -> Result<()> {
        let size = self.dtype.size() as u64;
        if self.bin_len % size != 0 {
            return Err(CorpusError::invalid(
                &self.bin_path,
                format!(
                    "bin size {} bytes is not a multiple of the {} item size ({size} bytes)",
                    self.bin_len, self.dtype
                ),
            ));
        }
        let first = self.doc_index(0);
        if first != 0 {
            return Err(self.bad_idx(format!(
                "document_indices[0] is {first}, expected 0 (document 0 must start at sequence 0)"
            )));
        }
        if self.documents() == 0 {
            return Err(self.bad_idx("empty shard: the index holds no documents".into()));
        }
        let last = self.doc_index(self.doc_index_len - 1);
        if last != self.sequences as i64 {
            return Err(self.bad_idx(format!(
                "document_indices ends at {last}, expected the sequence count {} \
                 (document {} does not end where the sequences do)",
                self.sequences,
                self.doc_index_len - 2
            )));
        }
        // The bytes the index describes must be exactly the .bin.
        let described = if self.sequences == 0 {
            0
        } else {
            let first_ptr = self.pointer(0);
            if first_ptr != 0 {
                return Err(self.bad_idx(format!(
                    "sequence 0 pointer is {first_ptr}, expected 0 (byte {})",
                    self.pointers_at
                )));
            }
            let i = self.sequences - 1;
            let end = self.sequence_end(i)?;
            end as u64
        };
        if described != self.bin_len {
            return Err(CorpusError::invalid(
                &self.bin_path,
                format!(
                    "bin is {} bytes but {} describes {described} bytes \
                     (the last sequence ends at byte {described})",
                    self.bin_len,
                    self.idx_path.display()
                ),
            ));
        }
        Ok(())
    }

    fn bad_idx(&self, what: String) -> CorpusError {
        CorpusError::invalid(&self.idx_path, what)
    }

    /// Byte just past sequence `i` in `.bin`, checked for sign and overflow.
    fn sequence_end(&self, i: u64) -> Result<i128> {
        let len = self.sequence_length(i);
        if len < 0 {
            return Err(self.bad_idx(format!(
                "sequence {i} has negative length {len} (byte {})",
                self.lengths_at as u64 + 4 * i
            )));
        }
        let ptr = self.pointer(i);
        if ptr < 0 {
            return Err(self.bad_idx(format!(
                "sequence {i} pointer {ptr} is negative (byte {})",
                self.pointers_at as u64 + 8 * i
            )));
        }
        Ok(i128::from(ptr) + i128::from(len) * self.dtype.size() as i128)
    }

    /// The single linear pass over the index: every length is non-negative, every pointer
    /// follows the previous sequence exactly, and document_indices never decreases.
    /// Costs one read of the `.idx` (about 20 bytes per document); the `.bin` is not read.
    ///
    /// The pass only accumulates a "something is wrong" flag, which keeps the loop free
    /// of early exits so it runs at memory speed; a shard that fails is walked again
    /// slowly to name the first bad sequence or document.
    pub fn validate(&self) -> Result<()> {
        // One sequential pass: read the whole index ahead (the mapping is MADV_RANDOM).
        crate::sys::advise(&self.idx, crate::sys::Advice::WillNeed);
        let size = self.dtype.size() as i64;
        let lens = &self.idx[self.lengths_at..self.pointers_at];
        let ptrs = &self.idx[self.pointers_at..self.doc_index_at];
        let mut expected = 0i64;
        let mut bad = false;
        for (l, p) in lens.chunks_exact(4).zip(ptrs.chunks_exact(8)) {
            let len = i32::from_le_bytes([l[0], l[1], l[2], l[3]]);
            let ptr = i64::from_le_bytes([p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7]]);
            // `len * size` fits (at most 2^31 * 8); the running offset may not: a forged
            // index must not wrap past 2^63 back onto pointers it also forged.
            let (next, wrapped) = expected.overflowing_add(i64::from(len) * size);
            bad |= (ptr != expected) | (len < 0) | wrapped;
            expected = next;
        }
        if bad {
            return Err(self.locate_sequence_error());
        }
        let di_end = self.doc_index_at + 8 * self.doc_index_len as usize;
        let mut prev = 0i64;
        let max = self.sequences as i64;
        let mut identity = true;
        for (i, c) in self.idx[self.doc_index_at..di_end]
            .chunks_exact(8)
            .enumerate()
        {
            let v = i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
            bad |= (v < prev) | (v > max);
            identity &= v == i as i64;
            prev = v;
        }
        if bad {
            return Err(self.locate_document_error());
        }
        self.one_seq_per_doc
            .store(identity, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Whether a [`Self::validate`] (or a trusted record of one) proved every document to
    /// be exactly one sequence: the fast paths are on.
    pub(crate) fn one_seq_per_doc(&self) -> bool {
        self.one_seq_per_doc
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Turns the fast paths on as [`Self::validate`] would, on the word of the identity
    /// cache that this very file passed it with one sequence per document. They stay
    /// bounds-checked: a wrong word costs wrong lengths, never a read out of bounds.
    pub(crate) fn assume_one_seq_per_doc(&self) {
        self.one_seq_per_doc
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// The slow walk that names the first bad sequence once [`Self::validate`] saw one.
    fn locate_sequence_error(&self) -> CorpusError {
        let size = self.dtype.size() as i128;
        let mut expected: i128 = 0;
        for i in 0..self.sequences {
            let ptr = self.pointer(i);
            if i128::from(ptr) != expected {
                return self.bad_idx(format!(
                    "{}sequence {i} pointer is {ptr}, expected {expected} \
                     (sequences must be contiguous in the bin; pointer at byte {})",
                    self.document_of(i),
                    self.pointers_at as u64 + 8 * i
                ));
            }
            let len = self.sequence_length(i);
            if len < 0 {
                return self.bad_idx(format!(
                    "{}sequence {i} has negative length {len} (byte {})",
                    self.document_of(i),
                    self.lengths_at as u64 + 4 * i
                ));
            }
            expected += i128::from(len) * size;
        }
        if expected > i128::from(i64::MAX) {
            return self.bad_idx(format!(
                "the sequences end at byte {expected}, past the largest offset (2^63 - 1) \
                 an index can hold"
            ));
        }
        self.bad_idx("sequence lengths and pointers disagree".into())
    }

    /// "document d: " for the document that holds sequence `i`, when document_indices
    /// says (an error message names the document an operator can look up); else "".
    fn document_of(&self, i: u64) -> String {
        let i = i as i64;
        (0..self.documents())
            .find(|&d| self.doc_index(d) <= i && i < self.doc_index(d + 1))
            .map_or(String::new(), |d| format!("document {d}: "))
    }

    /// The slow walk that names the first bad document_indices entry.
    fn locate_document_error(&self) -> CorpusError {
        let mut prev = 0i64;
        for d in 0..self.doc_index_len {
            let v = self.doc_index(d);
            if v < prev || v > self.sequences as i64 {
                return self.bad_idx(format!(
                    "document {}: document_indices[{d}] is {v} after {prev} \
                     (must be non-decreasing and at most {}; byte {})",
                    d.saturating_sub(1),
                    self.sequences,
                    self.doc_index_at as u64 + 8 * d
                ));
            }
            prev = v;
        }
        self.bad_idx("document_indices is inconsistent".into())
    }

    /// Appends every document's length to `out`, in one sequential pass over the index:
    /// what the planner and `inspect` need, without a per-document call. On error `out`
    /// is left as it was.
    pub fn doc_lengths_into(&self, out: &mut Vec<u64>) -> Result<()> {
        let base = out.len();
        let r = self.push_doc_lengths(out);
        if r.is_err() {
            out.truncate(base);
        }
        r
    }

    fn push_doc_lengths(&self, out: &mut Vec<u64>) -> Result<()> {
        let lens = &self.idx[self.lengths_at..self.pointers_at];
        let di_end = self.doc_index_at + 8 * self.doc_index_len as usize;
        let di = &self.idx[self.doc_index_at..di_end];
        out.reserve(self.documents() as usize);
        let mut prev = 0usize;
        for (d, c) in di.chunks_exact(8).skip(1).enumerate() {
            let next = i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
            // Bounded by the sequence count before any arithmetic: the entry comes from
            // a file that may not have been validated.
            let seqs = usize::try_from(next)
                .ok()
                .filter(|&n| n >= prev && n as u64 <= self.sequences)
                .and_then(|n| lens.get(prev * 4..n * 4))
                .ok_or_else(|| {
                    self.bad_idx(format!(
                        "document {d}: document_indices gives sequences {prev}..{next}, \
                         outside 0..{} or decreasing",
                        self.sequences
                    ))
                })?;
            let mut total = 0u64;
            let mut negative = false;
            for l in seqs.chunks_exact(4) {
                let len = i32::from_le_bytes([l[0], l[1], l[2], l[3]]);
                negative |= len < 0;
                total += len as u32 as u64;
            }
            if negative {
                // Name the sequence, as `validate` would.
                let bad = (prev as u64..next as u64)
                    .find(|&i| self.sequence_length(i) < 0)
                    .unwrap_or(prev as u64);
                return Err(self.bad_idx(format!(
                    "document {d}: sequence {bad} has negative length {} (byte {})",
                    self.sequence_length(bad),
                    self.lengths_at as u64 + 4 * bad
                )));
            }
            out.push(total);
            prev = next as usize;
        }
        Ok(())
    }

    /// The `.idx` and `.bin` paths with the state of the files that were mapped, for
    /// [`super::Shard::changed`] and the identity cache.
    pub(crate) fn stamps(&self) -> Vec<(PathBuf, FileStamp)> {
        vec![
            (self.idx_path.clone(), self.idx_stamp),
            (self.bin_path.clone(), self.bin_stamp),
        ]
    }

    /// The prefix this shard was opened from (without `.idx`/`.bin`).
    pub fn prefix(&self) -> &Path {
        &self.prefix
    }

    /// Path of the `.idx` file, for messages and fingerprints.
    pub fn idx_path(&self) -> &Path {
        &self.idx_path
    }

    /// Path of the `.bin` file.
    pub fn bin_path(&self) -> &Path {
        &self.bin_path
    }

    /// The raw `.idx` bytes: hashed for the shard's content identity.
    pub fn idx_bytes(&self) -> &[u8] {
        &self.idx
    }

    /// Token dtype of the `.bin`.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Number of documents (document_indices entries minus one).
    pub fn documents(&self) -> u64 {
        self.doc_index_len - 1
    }

    /// Number of sequences (sentences); equals documents unless the shard was sentence-split.
    pub fn sequences(&self) -> u64 {
        self.sequences
    }

    /// The whole mapped `.bin`, so the daemon can hint the kernel about its access pattern.
    pub fn bin_bytes(&self) -> &[u8] {
        self.bin.as_deref().unwrap_or(&[])
    }

    /// Size of the `.bin` in bytes.
    pub fn bin_len(&self) -> u64 {
        self.bin_len
    }

    /// Total tokens: the `.bin` size over the item size (checked equal to what the index describes).
    pub fn tokens(&self) -> u64 {
        self.bin_len / self.dtype.size() as u64
    }

    /// Length in tokens of sequence `i` as stored (may be negative in a corrupt file).
    /// Panics if `i` is not below [`Self::sequences`]: callers iterate within bounds.
    pub fn sequence_length(&self, i: u64) -> i32 {
        le_i32(&self.idx, self.lengths_at + 4 * i as usize)
    }

    /// Byte pointer of sequence `i` into `.bin`, as stored.
    pub fn pointer(&self, i: u64) -> i64 {
        le_i64(&self.idx, self.pointers_at + 8 * i as usize)
    }

    /// Pulls the index entries [`Self::doc_tokens`] reads for `doc` (its sequence's
    /// pointer and length) into the CPU caches: the fill calls it for a whole slot's
    /// documents before reading any, so their misses overlap instead of queueing one per
    /// span. Only for the one-sequence-per-document layout, which reads exactly these.
    #[inline]
    pub fn prefetch_doc(&self, doc: u64) {
        if doc < self.sequences {
            let (p, l) = (
                self.pointers_at + 8 * doc as usize,
                self.lengths_at + 4 * doc as usize,
            );
            crate::sys::prefetch(self.idx.get(p..p + 8).unwrap_or_default(), 8);
            crate::sys::prefetch(self.idx.get(l..l + 4).unwrap_or_default(), 4);
        }
    }

    /// Pulls the length entry [`Self::doc_len_validated`] reads for `doc` into the CPU
    /// caches: the planner reads a window's lengths at random places of the index, and
    /// prefetched some units ahead their misses overlap. Only for the one-sequence-per-
    /// document layout, whose length is exactly that entry.
    #[inline]
    pub fn prefetch_len(&self, doc: u64) {
        if doc < self.sequences {
            let l = self.lengths_at + 4 * doc as usize;
            crate::sys::prefetch(self.idx.get(l..l + 4).unwrap_or_default(), 4);
        }
    }

    /// Entry `i` of document_indices, as stored (`i` up to and including [`Self::documents`]).
    pub fn doc_index(&self, i: u64) -> i64 {
        le_i64(&self.idx, self.doc_index_at + 8 * i as usize)
    }

    /// The sequence range `[first, end)` of document `doc`, checked against the index.
    fn doc_sequences(&self, doc: u64) -> Result<(u64, u64)> {
        if doc >= self.documents() {
            return Err(CorpusError::DocOutOfRange {
                path: self.prefix.clone(),
                doc,
                count: self.documents(),
            });
        }
        let a = self.doc_index(doc);
        let b = self.doc_index(doc + 1);
        if a < 0 || b < a || b > self.sequences as i64 {
            return Err(self.bad_idx(format!(
                "document {doc}: document_indices gives sequences {a}..{b}, \
                 outside 0..{} or decreasing",
                self.sequences
            )));
        }
        Ok((a as u64, b as u64))
    }

    /// The `.idx` byte ranges a lookup of document `doc` reads: its size and pointer
    /// entries (those of its first sequence, as laid out for one sequence per document)
    /// and its two document_indices entries.
    pub fn entry_bytes(&self, doc: u64) -> [(u64, u64); 3] {
        let (l, p, d) = (
            self.lengths_at as u64 + 4 * doc,
            self.pointers_at as u64 + 8 * doc,
            self.doc_index_at as u64 + 8 * doc,
        );
        [(l, l + 4), (p, p + 8), (d, d + 16)]
    }

    /// Length of document `doc` for the planner's hot loop: one read once
    /// [`Self::validate`] proved every document is one contiguous sequence, else
    /// [`Self::doc_len_checked`] (a shard not validated yet: the daemon validates in the
    /// background after READY, docs/DESIGN.md).
    #[inline]
    pub fn doc_len_validated(&self, doc: u64) -> Result<u64> {
        if self
            .one_seq_per_doc
            .load(std::sync::atomic::Ordering::Relaxed)
            && doc < self.sequences
        {
            let at = self.lengths_at + 4 * doc as usize;
            if let Some(b) = self.idx.get(at..at + 4) {
                return Ok(i32::from_le_bytes([b[0], b[1], b[2], b[3]]).max(0) as u64);
            }
        }
        match self.one_sequence_len(doc) {
            Some(len) => Ok(len),
            None => self.doc_len_checked(doc),
        }
    }

    /// The length of document `doc` when it is exactly sequence `doc` (the common layout),
    /// with the checks of [`Self::doc_len_checked`] in their cheapest form (no error to
    /// build): its two document_indices entries are `doc` and `doc + 1`, and its bytes are
    /// aligned and inside the `.bin`. `None` sends the caller to the general check, which
    /// names what is wrong.
    #[inline]
    fn one_sequence_len(&self, doc: u64) -> Option<u64> {
        if self.sequences != self.documents() || doc >= self.sequences {
            return None;
        }
        let d = doc as usize;
        let di = self
            .idx
            .get(self.doc_index_at + 8 * d..self.doc_index_at + 8 * d + 16)?;
        let first = i64::from_le_bytes(di[..8].try_into().ok()?);
        let end = i64::from_le_bytes(di[8..].try_into().ok()?);
        if first != doc as i64 || end != doc as i64 + 1 {
            return None;
        }
        let len = self.sequence_length(doc);
        let ptr = self.pointer(doc);
        let size = self.dtype.size() as u64;
        let (len, ptr) = (u64::try_from(len).ok()?, u64::try_from(ptr).ok()?);
        let stop = ptr.checked_add(len.checked_mul(size)?)?;
        (stop <= self.bin_len && ptr % size == 0).then_some(len)
    }

    /// Length in tokens of document `doc`, checked as a read of its tokens would be: its
    /// sequences are contiguous and inside the `.bin`. So a length from a shard that was
    /// never validated is never more than the tokens that exist.
    pub fn doc_len_checked(&self, doc: u64) -> Result<u64> {
        let (start, end) = self.doc_bytes(doc)?;
        Ok(((end - start) / self.dtype.size() as i128) as u64)
    }

    /// Length in tokens of document `doc`: the sum of its sequences' lengths.
    pub fn doc_len(&self, doc: u64) -> Result<u64> {
        let (a, b) = self.doc_sequences(doc)?;
        let mut total = 0u64;
        for i in a..b {
            let len = self.sequence_length(i);
            if len < 0 {
                return Err(self.bad_idx(format!(
                    "document {doc}: sequence {i} has negative length {len}"
                )));
            }
            total += len as u64;
        }
        Ok(total)
    }

    /// The byte range `[start, end)` of document `doc` in the `.bin`, checked: its
    /// sequences are contiguous, inside the `.bin` and aligned to the item size, and they
    /// sit where their neighbours put them: the first starts where the sequence before it
    /// ends (at 0 for the first), and the last ends where the one after it starts. So a
    /// pointer aimed at another document's bytes, with lengths, `.bin` size and
    /// document_indices all consistent, is refused at the read, not served until the
    /// background validation finds it. Touches only the document's own index entries and
    /// their neighbours (the same cache lines, mostly), never the `.bin`.
    fn doc_bytes(&self, doc: u64) -> Result<(i128, i128)> {
        let (a, b) = self.doc_sequences(doc)?;
        if a == b {
            // A document of zero sequences: valid, and empty.
            return Ok((0, 0));
        }
        let size = self.dtype.size() as i128;
        let start = self.pointer(a);
        let before = match a {
            0 => 0,
            _ => self.sequence_end(a - 1).map_err(|e| in_doc(doc, e))?,
        };
        if i128::from(start) != before {
            return Err(self.bad_idx(format!(
                "document {doc}: sequence {a} pointer is {start}, expected {before} \
                 (where sequence {} ends: sequences must be contiguous in the bin)",
                a.wrapping_sub(1)
            )));
        }
        let mut end = i128::from(start);
        for i in a..b {
            if i128::from(self.pointer(i)) != end {
                return Err(self.bad_idx(format!(
                    "document {doc}: sequence {i} pointer is {}, expected {end} \
                     (sequences must be contiguous in the bin)",
                    self.pointer(i)
                )));
            }
            end = self.sequence_end(i).map_err(|e| in_doc(doc, e))?;
        }
        if b < self.sequences && i128::from(self.pointer(b)) != end {
            return Err(self.bad_idx(format!(
                "document {doc}: its sequences end at byte {end}, but sequence {b} after \
                 it starts at {} (sequences must be contiguous in the bin)",
                self.pointer(b)
            )));
        }
        let start = i128::from(start);
        if start < 0 || end > i128::from(self.bin_len) || start % size != 0 {
            return Err(self.bad_idx(format!(
                "document {doc}: bytes {start}..{end} fall outside the {}-byte bin \
                 or are not aligned to the {}-byte item size",
                self.bin_len,
                self.dtype.size()
            )));
        }
        Ok((start, end))
    }

    /// The tokens of document `doc`, borrowed from the `.bin` mapping.
    ///
    /// Checks the document's own sequences (contiguous, inside the `.bin`), so this is
    /// safe on a shard that was opened but never [`validate`](Self::validate)d.
    pub fn doc_tokens(&self, doc: u64) -> Result<Tokens<'_>> {
        // The daemon's hot path: once `validate` proved one sequence per document with
        // contiguous, in-bounds pointers, a document is one pointer and one length.
        if self
            .one_seq_per_doc
            .load(std::sync::atomic::Ordering::Relaxed)
            && doc < self.sequences
        {
            let ptr = self.pointer(doc) as usize;
            let len = self.sequence_length(doc).max(0) as usize * self.dtype.size();
            if let Some(t) = self
                .bin
                .as_deref()
                .and_then(|bin| bin.get(ptr..ptr.checked_add(len)?))
                .and_then(|bytes| Tokens::from_bytes(self.dtype, bytes))
            {
                return Ok(t);
            }
        }
        let (start, end) = self.doc_bytes(doc)?;
        let bytes = match &self.bin {
            Some(map) if end > start => &map[start as usize..end as usize],
            _ => &[][..],
        };
        Tokens::from_bytes(self.dtype, bytes).ok_or_else(|| {
            self.bad_idx(format!(
                "document {doc}: bytes {start}..{end} are not aligned for {}",
                self.dtype
            ))
        })
    }
}

/// `prefix` + `.ext`, without treating dots inside the prefix as an extension.
pub fn with_suffix(prefix: &Path, ext: &str) -> PathBuf {
    let mut s = prefix.as_os_str().to_owned();
    s.push(".");
    s.push(ext);
    PathBuf::from(s)
}

/// An index error about a sequence, named as one of document `doc`: its reader wants
/// the document.
fn in_doc(doc: u64, e: CorpusError) -> CorpusError {
    match e {
        CorpusError::Invalid { path, what } => CorpusError::Invalid {
            path,
            what: format!("document {doc}: {what}"),
        },
        e => e,
    }
}
