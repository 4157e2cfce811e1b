//! Filling a compact slot (docs/PROTOCOL.md section 4): each row's tokens copied span
//! by span from the mapped shards, or read into the slot with io_uring (`[serve]
//! reader`, [`super::Readers`]), a bit per document start, the real-token count. The
//! shared checks (guards, bounds, vocabulary) and the header are the parent's.

use crate::corpus::{guard, Shard, Tokens};
use crate::plan::Segment;
use crate::serve::uring::{segment_span, ReadError, Span};

use super::{
    bad_token, carve, check_job, convert, fail_at, faulted, needs_check, out_of_range, read_piece,
    typed, write_header, Layout, Out, RingError, SlotJob, Source, Sums,
};

/// A span handed to io_uring: its row, segment, shard and mapped tokens, to word an
/// error about it.
struct Queued<'a> {
    span: Span,
    row: usize,
    seg: &'a Segment,
    shard: &'a Shard,
    piece: Tokens<'a>,
}

/// Fills a compact slot: per row the tokens of its pieces, one after the other, then
/// padding; a bit per piece start; the real-token count. When the slot's dtype is the
/// shard's, each piece is one `copy_from_slice` of its bytes (a memcpy), and its ids
/// are checked only when the dtype can hold one outside the vocabulary, by one pass
/// over the copied span while it is in cache ([`out_of_range`]). With an io_uring
/// reader those pieces are instead read straight into the slot, all of a step's in one
/// batch of READs, and checked after it.
pub(super) fn fill_compact<T: Out>(
    slot: &mut [u8],
    layout: &Layout,
    job: &SlotJob,
    src: &Source,
) -> Result<u64, RingError> {
    let fail = fail_at(job.step);
    check_job(layout, job, &fail)?;
    let (l, cap, sb) = (
        layout.seq_len as usize,
        layout.seq_len as usize + 1,
        layout.starts_bytes,
    );
    let (header, mut f) = carve(slot, layout);
    let [rows, starts, row_real, domain, row_loss, cursor] = &mut f[..] else {
        return Err(fail("slot layout has the wrong number of fields".into()));
    };
    let rows: &mut [T] = typed(rows);
    let row_real: &mut [i32] = typed(row_real);
    let domain: &mut [i32] = typed(domain);
    let row_loss: &mut [i32] = typed(row_loss);
    let pad = T::from_i64(src.pad_token as i64);
    let limit = src.id_limit();
    let check = needs_check::<T>(limit);
    let mut sums = Sums {
        cu_len: 1,
        max_seqlen: 0,
        loss: 0,
        real: 0,
    };
    let uring = src.readers.uring();
    let size = std::mem::size_of::<T>();
    let mut queued: Vec<Queued<'_>> = Vec::new();
    starts.fill(0);
    for (r, row) in job.rows.iter().enumerate() {
        let out = &mut rows[r * cap..(r + 1) * cap];
        let bits = &mut starts[r * sb..(r + 1) * sb];
        let shards = src
            .shards
            .get(row.domain as usize)
            .ok_or_else(|| fail(format!("row {r}: domain {} does not exist", row.domain)))?;
        let (mut p, mut loss) = (0usize, 0u64);
        for s in &row.segments {
            let n = s.len as usize;
            let Some((shard, piece)) = read_piece(shards, row.domain, r, s, p, cap, &fail)? else {
                continue;
            };
            let dst = &mut out[p..p + n];
            let bad = if piece.dtype() == layout.token.0 && uring {
                let file = src.readers.file(row.domain, s.shard);
                let at = ((r * cap + p) * size) as u64;
                if let Some(span) =
                    segment_span(shard, file, s, at).map_err(|e| fail(format!("row {r}: {e}")))?
                {
                    queued.push(Queued {
                        span,
                        row: r,
                        seg: s,
                        shard,
                        piece,
                    });
                }
                false
            } else if piece.dtype() == layout.token.0 {
                bytemuck::cast_slice_mut::<T, u8>(dst).copy_from_slice(piece.as_bytes());
                check && out_of_range(dst, limit)
            } else {
                convert::<T, true>(piece, dst, limit)
            };
            if let Some(addr) = guard::take_fault() {
                return Err(faulted(shard, r, s.doc, addr, &fail));
            }
            if bad {
                return Err(fail(bad_token(src, shard, r, s, piece)));
            }
            bits[p / 8] |= 1 << (p % 8);
            if p < l {
                let end = (p + n).min(l);
                loss += ((p + n - 1).min(l) - p) as u64;
                sums.cu_len += 1;
                sums.max_seqlen = sums.max_seqlen.max((end - p) as u32);
            }
            p += n;
        }
        out[p..].fill(pad);
        if p < l {
            sums.cu_len += 1;
            sums.max_seqlen = sums.max_seqlen.max((l - p) as u32);
        }
        row_real[r] = p as i32;
        domain[r] = row.domain as i32;
        row_loss[r] = loss as i32;
        sums.loss += loss;
        sums.real += p as u64;
    }
    if !queued.is_empty() {
        let spans: Vec<Span> = queued.iter().map(|q| q.span).collect();
        src.readers
            .read(&spans, bytemuck::cast_slice_mut::<T, u8>(rows))
            .map_err(|e| read_failed(src, &queued, e, &fail))?;
        for q in queued.iter().filter(|_| check) {
            let at = q.span.dst as usize / size;
            if out_of_range(&rows[at..at + q.span.len as usize / size], limit) {
                return Err(fail(bad_token(src, q.shard, q.row, q.seg, q.piece)));
            }
        }
    }
    cursor[..job.cursor.len()].copy_from_slice(&job.cursor);
    write_header(header, layout, job, &sums);
    Ok(sums.real)
}

/// The error of an io_uring read, naming the row and document of the span it was part
/// of. A shard that ended before a planned span was truncated under the daemon: it is
/// poisoned, as when the mmap copy faults on it, so nothing reads it again.
fn read_failed(
    src: &Source,
    queued: &[Queued<'_>],
    e: ReadError,
    fail: &dyn Fn(String) -> RingError,
) -> RingError {
    let at = match &e {
        ReadError::Read { offset, .. } | ReadError::Truncated { offset, .. } => Some(*offset),
        _ => None,
    };
    let q = queued.iter().find(|q| {
        src.readers.path(q.span.file) == e.path()
            && at.is_some_and(|o| (q.span.offset..q.span.offset + q.span.len).contains(&o))
    });
    let mut why = format!("reading with io_uring: {e}");
    if let (ReadError::Truncated { .. }, Some(q)) = (&e, q) {
        why.push_str(
            " (the file shrank under the daemon: truncated or rewritten in place?); the \
             shard is poisoned until restart",
        );
        q.shard.poison(why.clone());
    }
    match q {
        Some(q) => fail(format!("row {}: document {}: {why}", q.row, q.seg.doc)),
        None => fail(why),
    }
}
