//! The materializer: fills one ring slot with one step's rows (docs/PROTOCOL.md, section
//! 4). A compact slot gets each row's tokens copied span by span from the mapped shards
//! and a bit per document start; an expanded one gets tokens, labels, loss mask,
//! position ids and flash-attention `cu_seqlens` built beside them. Plus the page-cache
//! hints that keep the copy from faulting. Offsets are [`super::ring::Layout`]'s.

use crate::corpus::{guard, DType, Shard, Tokens};
use crate::plan::Segment;
use crate::sys::{advise, Advice};
use crate::wire::ring::{put_u32, put_u64, slot_at, FIELD_SLOTS, SLOT_HEADER};
use crate::wire::SlotLayout;

use super::ring::{Layout, RingError, TokenType};

mod compact;
mod ids;
mod job;
mod read;
mod watch;
use compact::fill_compact;
use ids::{convert, first_out_of_range, needs_check, out_of_range, Out};
pub use job::{RankRows, SlotJob};
pub use read::Readers;
pub use watch::{Doing, FillWatch, Watched, STUCK_FILL, STUCK_REPEAT};

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
    /// How compact slots of the shards' dtype are read (`[serve] reader`).
    pub readers: Readers,
}

impl Source {
    /// The exclusive upper bound on delivered ids, compared as u64 so that a negative
    /// id (which wraps to >= 2^63) is out of range whatever the vocabulary.
    fn id_limit(&self) -> u64 {
        self.vocab_size.unwrap_or(1 << 63)
    }

    /// The dtype compact slots carry these shards' tokens in ([`TokenType::compact`]).
    pub fn compact_token(&self) -> TokenType {
        TokenType::compact(self.shards.iter().flatten().map(|s| s.dtype()))
    }
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
    // A step is written at its own stage's shape, in a slot sized for the largest (and
    // the reserve); the hub refuses a stage whose slot does not fit before planning it.
    let rows = job.rows.len() as u32;
    // The ring's own shape is its first stage's, placed the same way (`Layout::staged`):
    // only another stage's is placed here (a dozen small allocations per slot, which the
    // copy thread otherwise made on every fill).
    let staged;
    let layout = if (layout.rows, layout.seq_len) == (rows, job.seq_len) {
        layout
    } else {
        staged = layout
            .stage(rows, job.seq_len)
            .map_err(|need| RingError::Materialize {
                step: job.step,
                message: format!(
                    "a slot of {rows} rows of {} needs {need} bytes, the ring's hold {}",
                    job.seq_len, layout.slot_bytes
                ),
            })?;
        &staged
    };
    let _guard = guard::enter();
    // A fault left over from an unguarded read elsewhere is not this fill's.
    let _ = guard::take_fault();
    macro_rules! by_dtype {
        ($fill:ident) => {
            match layout.token.0 {
                DType::Uint8 => $fill::<u8>(slot, layout, job, src),
                DType::Int8 => $fill::<i8>(slot, layout, job, src),
                DType::Int16 => $fill::<i16>(slot, layout, job, src),
                DType::Uint16 => $fill::<u16>(slot, layout, job, src),
                DType::Int32 => $fill::<i32>(slot, layout, job, src),
                DType::Uint32 => $fill::<u32>(slot, layout, job, src),
                DType::Int64 | DType::Float32 | DType::Float64 => {
                    $fill::<i64>(slot, layout, job, src)
                }
            }
        };
    }
    match layout.kind {
        SlotLayout::Compact => by_dtype!(fill_compact),
        SlotLayout::Expanded => by_dtype!(fill_typed),
    }
}

fn fill_typed<T: Out>(
    slot: &mut [u8],
    layout: &Layout,
    job: &SlotJob,
    src: &Source,
) -> Result<u64, RingError> {
    let fail = fail_at(job.step);
    let l = layout.seq_len as usize;
    let cap = l + 1;
    check_job(layout, job, &fail)?;
    prefetch_index(job, src);
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
            let n = s.len as usize;
            let Some((shard, piece)) = read_piece(shards, row.domain, r, s, p, cap, &fail)? else {
                continue;
            };
            // Inputs this piece covers: [p, min(p+n, l)).
            let end = (p + n).min(l);
            // Convert straight into both arrays (no staging row): input position q
            // holds t[q], label position q-1 holds t[q].
            // Every delivered token is a label, except the row's first input (p == 0):
            // the labels' conversion checks the range, and that one token is checked
            // alone, so each token is checked once, not twice.
            let mut bad = false;
            watch::reading_mapped(piece.as_bytes());
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
            // A fault of this thread's read, or a page another thread's fault zeroed.
            if let Some(addr) = zeroed_or_faulted(piece.as_bytes(), shard) {
                return Err(faulted(shard, r, s.doc, addr, &fail));
            }
            if bad {
                return Err(fail(bad_token(src, shard, r, s, piece)));
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
    let sums = Sums {
        cu_len: n_cu as u32,
        max_seqlen,
        loss: loss_total,
        real: real_total,
    };
    write_header(header, layout, job, &sums);
    Ok(real_total)
}

/// The slot header's counts, which both layouts carry (clients take `max_seqlen` from
/// here, never from a device sync).
struct Sums {
    cu_len: u32,
    max_seqlen: u32,
    loss: u64,
    real: u64,
}

fn write_header(header: &mut [u8], layout: &Layout, job: &SlotJob, sums: &Sums) {
    put_u64(header, slot_at::STEP, job.step);
    put_u64(header, slot_at::PLAN_STEP, job.plan_step);
    put_u32(header, slot_at::ROWS, layout.rows);
    put_u32(header, slot_at::SEQ_LEN, layout.seq_len);
    put_u32(header, slot_at::CU_LEN, sums.cu_len);
    put_u32(header, slot_at::MAX_SEQLEN, sums.max_seqlen);
    put_u64(header, slot_at::LOSS_TOKENS, sums.loss);
    put_u64(header, slot_at::REAL_TOKENS, sums.real);
    put_u32(header, slot_at::CURSOR_LEN, job.cursor.len() as u32);
    put_u64(header, slot_at::PLAN_STATE, job.plan_state);
    // Where this slot's arrays are: a client reads a slot by its header alone.
    for (i, (_, f)) in layout.fields.iter().enumerate().take(FIELD_SLOTS) {
        put_u64(header, slot_at::FIELD_OFFSETS + 8 * i, f.offset as u64);
    }
}

/// The error of a fill of `step` that failed for `message`.
fn fail_at(step: u64) -> impl Fn(String) -> RingError {
    move |message| RingError::Materialize { step, message }
}

/// Checks a job against the slot it goes to: its row count and cursor size.
fn check_job(
    layout: &Layout,
    job: &SlotJob,
    fail: &dyn Fn(String) -> RingError,
) -> Result<(), RingError> {
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
    Ok(())
}

/// Prefetches the index entries of every document `job` reads, before the first lookup
/// ([`Shard::prefetch_doc`]); unknown domains and shards are the lookups' to report.
fn prefetch_index(job: &SlotJob, src: &Source) {
    for row in job.rows.iter() {
        let Some(shards) = src.shards.get(row.domain as usize) else {
            continue;
        };
        for s in &row.segments {
            if let Some(shard) = shards.get(s.shard as usize) {
                shard.prefetch_doc(s.doc);
            }
        }
    }
}

/// Tokens `start..start+len` of a segment's document, after the guards: the shard
/// exists and is not poisoned, the read did not fault (else the shard is poisoned and
/// the fill fails naming it), the span lies in the document and fits the row from
/// position `p` of `cap`. `None` for an empty segment.
fn read_piece<'s>(
    shards: &'s [std::sync::Arc<Shard>],
    domain: u16,
    r: usize,
    s: &Segment,
    p: usize,
    cap: usize,
    fail: &dyn Fn(String) -> RingError,
) -> Result<Option<(&'s Shard, Tokens<'s>)>, RingError> {
    let shard = shards
        .get(s.shard as usize)
        .ok_or_else(|| fail(format!("row {r}: domain {domain} has no shard {}", s.shard)))?;
    if let Some(why) = shard.poisoned() {
        return Err(fail(format!(
            "row {r}: document {} of a poisoned shard: {why}",
            s.doc
        )));
    }
    watch::reading_index(domain, s.shard, s.doc);
    let doc = shard.doc_tokens(s.doc);
    if let Some(addr) = guard::take_fault() {
        return Err(faulted(shard, r, s.doc, addr, fail));
    }
    let doc = doc.map_err(|e| fail(format!("row {r}: {e}")))?;
    let n = s.len as usize;
    if n == 0 {
        return Ok(None);
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
    Ok(Some((shard, slice_tokens(doc, a, b))))
}

/// A read of `shard` that faulted (the file shrank under its mapping) saw zeros: the
/// shard is poisoned so nothing serves those zeros, and the fill fails naming it.
fn faulted(
    shard: &Shard,
    r: usize,
    doc: u64,
    addr: usize,
    fail: &dyn Fn(String) -> RingError,
) -> RingError {
    let why = describe_fault(shard, addr, "");
    shard.poison(why.clone());
    fail(format!("row {r}: reading document {doc}: {why}"))
}

/// The error for a piece holding an id outside the vocabulary: the slow path that finds
/// and names the first one once a check has seen it.
fn bad_token(src: &Source, shard: &Shard, r: usize, s: &Segment, piece: Tokens<'_>) -> String {
    let (i, v) = first_out_of_range(piece, src.id_limit()).unwrap_or((0, -1));
    let bound = match src.vocab_size {
        Some(v) => format!("outside vocab_size {v} (ids 0..{v})"),
        None => "negative (token ids never are; is the dtype code right?)".into(),
    };
    format!(
        "row {r}: {} document {} token {} has id {v}, {bound}",
        shard.path().display(),
        s.doc,
        s.start as usize + i
    )
}

/// The address to blame when a copy of `bytes` from `shard` must be thrown away: this
/// thread's read faulted, or a page of them was zeroed for another thread's fault, or
/// (past what the guard's table lists) the shard was poisoned meanwhile.
fn zeroed_or_faulted(bytes: &[u8], shard: &Shard) -> Option<usize> {
    guard::take_fault()
        .or_else(|| guard::zeroed_in(bytes))
        .or_else(|| {
            (guard::zeroed_overflowed() && shard.poisoned().is_some())
                .then_some(bytes.as_ptr() as usize)
        })
}

/// Words a guarded read's fault at `addr` (`during`: what the read was for, or empty for
/// a slot's copy): which file of `shard` shrank, at which byte. The file is named as it
/// is, so a raw shard's truncated boundary cache is not blamed on its tokens.
pub(in crate::serve) fn describe_fault(shard: &Shard, addr: usize, during: &str) -> String {
    let during = if during.is_empty() {
        String::new()
    } else {
        format!(" {during}")
    };
    match shard.file_at(addr) {
        Some((file, at)) => format!(
            "{}: read at byte {at} faulted (SIGBUS){during}: the file shrank under the \
             daemon's mapping (truncated or rewritten in place?); the shard is poisoned until \
             restart",
            file.display(),
        ),
        None => format!(
            "{}: a read faulted (SIGBUS){during} at an address outside its mappings; the \
             shard is poisoned until restart",
            shard.path().display()
        ),
    }
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

/// Tells the kernel which pages a planned segment will read, so a cold shard is read
/// with exact spans ahead of the copy instead of faulting (and reading ahead 8 MiB) on
/// the hot path.
pub fn will_need(bytes: &[u8]) {
    advise(bytes, Advice::WillNeed);
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::config::serve::Reader;
    use crate::plan::Row;
    use crate::serve::fill::FillWatch;
    use crate::serve::ring::Ring;

    /// One uint16 Megatron shard of 4 documents of 4096 tokens (one page of token bytes
    /// every half document), with ids `id` except token `odd.0` (= `odd.1`), and a one-row
    /// job reading the first 65 tokens of document 3.
    pub(crate) fn shard_and_job(
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
            seq_len: 64,
            rows: vec![Row::new(0, 0, vec![seg], 65)].into(),
            cursor: vec![],
            plan_state: 0,
        };
        let src = Source {
            shards: vec![vec![shard]],
            pad_token: 0,
            vocab_size: Some(1000),
            readers: Readers::copy(Reader::MmapWillneed),
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
        let first = truncate_and_fill(dir.path(), slot, &layout, &job, &src);
        assert!(
            first.contains("s.bin: read at byte 24576 faulted (SIGBUS)"),
            "{first}"
        );
        assert!(first.contains("document 3"), "{first}");
    }

    /// A copy from a mapping whose page never arrives (a network filesystem that stopped
    /// answering; here the page is handed to userfaultfd, which holds the faulting read
    /// until the test supplies the page) is named by the stuck-fill watchdog: the file
    /// and the bytes being copied. Once the page comes the fill completes.
    #[test]
    fn a_copy_hung_in_a_page_fault_is_named_with_its_file_and_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let (src, job, layout) = shard_and_job(dir.path(), 7, (0, 7));
        // Document 3's first page of tokens.
        let Some(held) = HeldPage::hold(&src, 1, 24576) else {
            return;
        };
        let s_bin = dir.path().join("s.bin");
        let got = fill_stuck_then_release(&src, &job, &layout, "copying", || held.release(&s_bin));
        let want = format!(
            "copying {} bytes 24576..24706 from its mapping",
            s_bin.display()
        );
        assert_eq!(got, (want, Ok(65)));
    }

    /// The same for a read of the shard's index that hangs (the fill looks its
    /// documents up before it copies): the watch names the index read, not the last
    /// copy the fill made before it.
    #[test]
    fn an_index_read_hung_in_a_page_fault_is_named_as_such() {
        let dir = tempfile::tempdir().unwrap();
        let (src, job, layout) = shard_and_job(dir.path(), 7, (0, 7));
        let Some(held) = HeldPage::hold(&src, 0, 0) else {
            return;
        };
        let want = format!(
            "reading the index of {} for document 3",
            dir.path().join("s").display()
        );
        let got = fill_stuck_then_release(&src, &job, &layout, "reading the index", || {
            held.release(&dir.path().join("s.idx"))
        });
        assert_eq!(got, (want, Ok(65)));
    }

    /// A page of a shard's mapping handed to userfaultfd: a read of it waits until
    /// [`HeldPage::release`] supplies the page, as a read of a hung network filesystem
    /// waits for its server.
    pub(crate) struct HeldPage {
        uffd: std::os::fd::OwnedFd,
        page: usize,
        at: u64,
    }

    impl HeldPage {
        /// Holds the page at byte `at` of mapping `map` of `src`'s shard (0: the index,
        /// 1: the tokens), mapped anew (anonymous, so that userfaultfd may hold its
        /// faults) where the shard's mapping had it; `None` (saying why) where
        /// userfaultfd is refused.
        pub(crate) fn hold(src: &Source, map: usize, at: u64) -> Option<HeldPage> {
            use std::os::fd::{FromRawFd, OwnedFd};
            // SAFETY: userfaultfd(2) with flags only (1: UFFD_USER_MODE_ONLY); checked.
            let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | 1) };
            if fd < 0 {
                eprintln!("skipped: userfaultfd: {}", std::io::Error::last_os_error());
                return None;
            }
            // SAFETY: a descriptor just returned to us.
            let uffd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
            let page = src.shards[0][0].mappings()[map].as_ptr() as usize + at as usize;
            let held = HeldPage { uffd, page, at };
            // UFFDIO_API {api, features, ioctls}.
            assert_eq!(held.ioctl(0xC018_AA3F, &mut [0xAA, 0, 0]), 0, "UFFDIO_API");
            // SAFETY: replaces one page inside the shard's own mapping, which outlives it.
            let got = unsafe {
                libc::mmap(
                    page as *mut libc::c_void,
                    4096,
                    libc::PROT_READ,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                    -1,
                    0,
                )
            };
            assert_eq!(got as usize, page);
            // UFFDIO_REGISTER {start, len, mode (1: missing pages), ioctls}.
            let mut reg = [page as u64, 4096, 1, 0];
            assert_eq!(held.ioctl(0xC020_AA00, &mut reg), 0, "UFFDIO_REGISTER");
            Some(held)
        }

        fn ioctl(&self, req: u64, arg: &mut [u64]) -> i32 {
            let raw = std::os::fd::AsRawFd::as_raw_fd(&self.uffd);
            // SAFETY: userfaultfd ioctls on their documented structs (arrays of u64).
            unsafe { libc::ioctl(raw, req as _, arg.as_mut_ptr()) }
        }

        /// Supplies the page: `file`'s bytes there.
        pub(crate) fn release(&self, file: &std::path::Path) {
            use std::os::unix::fs::FileExt;
            let mut bytes = vec![0u8; 4096];
            let f = std::fs::File::open(file).unwrap();
            let n = f.read_at(&mut bytes, self.at).unwrap();
            assert!(n > 0, "{} has no byte at {}", file.display(), self.at);
            // UFFDIO_COPY {dst, src, len, mode, copy}.
            let mut copy = [self.page as u64, bytes.as_ptr() as u64, 4096, 0, 0];
            assert_eq!(self.ioctl(0xC028_AA03, &mut copy), 0, "UFFDIO_COPY");
        }
    }

    /// Fills `job` on a thread of its own, watched as step 0 of rank 1 of job "j", until
    /// the watch reports it stuck reading something that starts with `reading` (30 s at
    /// most), then calls `release`, which must let the read go on. Returns what the
    /// watch reported (after checking its job, rank and step, and that it was warned
    /// about once) and the fill's result; the watch forgets the fill once it ends.
    pub(super) fn fill_stuck_then_release(
        src: &Source,
        job: &SlotJob,
        layout: &Layout,
        reading: &str,
        release: impl FnOnce(),
    ) -> (String, Result<u64, String>) {
        use std::time::{Duration, Instant};
        let ring = Ring::create("t", layout.clone(), 0).unwrap();
        let watch = FillWatch::default();
        let hour = Duration::from_secs(3600);
        let (seen, got) = std::thread::scope(|s| {
            let filler = s.spawn(|| {
                let _watched = watch.begin("j", 1, 0);
                let slot = &mut ring.claim(0).map_err(|e| e.to_string())?;
                fill_slot(slot, layout, job, src).map_err(|e| e.to_string())
            });
            let t0 = Instant::now();
            let mut seen = None;
            while !filler.is_finished() && t0.elapsed().as_secs() < 30 {
                let stuck = watch.stuck(src, Duration::ZERO);
                if stuck.iter().any(|f| f.reading.starts_with(reading)) {
                    // Warned once, then not again before the repeat interval.
                    let warned = watch.warn_stuck(src, Duration::ZERO, hour);
                    let quiet = watch.stuck(src, hour).is_empty();
                    seen = Some((stuck, warned, quiet, filler.is_finished()));
                    break;
                }
                std::thread::yield_now();
            }
            // Released in any case: the scope ends only once the fill does.
            release();
            (seen, filler.join().unwrap())
        });
        let Some((stuck, warned, quiet, finished)) = seen else {
            panic!("the fill was never seen reading {reading:?} (it ended: {got:?})");
        };
        assert_eq!(stuck.len(), 1, "{stuck:?}");
        let f = &stuck[0];
        assert_eq!((f.job.as_str(), f.dp_rank, f.step), ("j", 1, 0), "{f:?}");
        assert_eq!((warned, quiet), (1, true));
        assert!(!finished, "the fill went past a read never answered");
        assert!(
            watch.stuck(src, Duration::ZERO).is_empty(),
            "the fill ended"
        );
        (f.reading.clone(), got)
    }

    /// Truncates `dir`'s shard to one page under `src` and fills `job` into `slot`
    /// again: the fill must fail and poison the shard, so that the next fill is refused
    /// before any read (even of pages that are still there). Returns the first error.
    pub(super) fn truncate_and_fill(
        dir: &std::path::Path,
        slot: &mut [u8],
        layout: &Layout,
        job: &SlotJob,
        src: &Source,
    ) -> String {
        std::fs::OpenOptions::new()
            .write(true)
            .open(dir.join("s.bin"))
            .unwrap()
            .set_len(4096)
            .unwrap();
        let first = fill_slot(slot, layout, job, src).unwrap_err().to_string();
        assert!(src.shards[0][0].poisoned().is_some(), "{first}");
        let e = fill_slot(slot, layout, job, src).unwrap_err().to_string();
        assert!(e.contains("poisoned shard"), "{e}");
        first
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
        // The same in compact slots, whose uint16 spans are copied as bytes and then
        // checked (vocab 1000 < 2^16), the last token (label only) included.
        for at in [0usize, 1, 63, 64] {
            let dir = tempfile::tempdir().unwrap();
            let (mut src, job, _) = shard_and_job(dir.path(), 7, (at, 1000));
            let layout = Layout::compact(1, 64, 1, src.compact_token(), 64);
            assert_eq!(layout.token.0, DType::Uint16);
            let ring = Ring::create("t", layout.clone(), 0).unwrap();
            let slot = &mut ring.claim(0).unwrap();
            let e = fill_slot(slot, &layout, &job, &src)
                .unwrap_err()
                .to_string();
            assert!(
                e.contains(&format!("token {at} has id 1000, outside vocab_size 1000")),
                "{e}"
            );
            // A vocabulary of 2^16 or none: no uint16 id can be outside it.
            for vocab in [Some(65536), None] {
                src.vocab_size = vocab;
                assert!(!needs_check::<u16>(src.id_limit()));
                assert_eq!(fill_slot(slot, &layout, &job, &src).unwrap(), 65);
            }
            let rows: &[u16] = bytemuck::cast_slice(&slot[layout.fields[0].1.offset..][..130]);
            assert_eq!((rows[at], rows[(at + 1) % 65]), (1000, 7));
        }
        assert!(needs_check::<u16>(1000) && needs_check::<i16>(1 << 20));
        let ok = Tokens::Int16(&[5, 7, 9]);
        let bad = Tokens::Int16(&[5, -7, 9]);
        let mut out = [0i32; 3];
        assert!(!convert::<i32, true>(ok, &mut out, src.id_limit()));
        assert!(convert::<i32, true>(bad, &mut out, src.id_limit()));
        assert!(!convert::<i32, false>(bad, &mut out, src.id_limit()));
        assert_eq!(first_out_of_range(bad, src.id_limit()), Some((1, -7)));
    }
}
