//! Filling a compact slot (docs/PROTOCOL.md section 4): each row's tokens copied span
//! by span from the mapped shards, or read into the slot with io_uring (`[serve]
//! reader`, [`super::Readers`]), a bit per document start, the real-token count and the
//! row's bounds in `cu_seqlens`. The shared checks (guards, bounds, vocabulary) and the
//! header are the parent's.

use crate::corpus::{Shard, Tokens};
use crate::plan::Segment;
use crate::serve::uring::{segment_span, ReadError, Span};

use super::{
    bad_token, carve, check_job, convert, fail_at, faulted, needs_check, out_of_range,
    prefetch_index, read_piece, typed, write_header, zeroed_or_faulted, Layout, Out, RingError,
    SlotJob, Source, Sums,
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

/// A piece resolved (guarded, bounds-checked) and waiting for its copy: where it goes in
/// the slot's rows, and what to name in an error about it.
struct Piece<'a> {
    /// Index of its first token in the rows array.
    at: usize,
    row: usize,
    seg: &'a Segment,
    shard: &'a Shard,
    piece: Tokens<'a>,
}

/// How many pieces ahead of the one being copied the copy prefetches, and how many of
/// that piece's bytes: far enough that the lines (and the page walk) of a span at a
/// random place of the shards arrive while the previous spans are copied, not so far
/// or so much that they are evicted before their copy.
const PREFETCH_AHEAD: usize = 2;
const PREFETCH_BYTES: usize = 2048;

/// Fills a compact slot: per row the tokens of its pieces, one after the other, then
/// padding; a bit per piece start; the real-token count. When the slot's dtype is the
/// shard's, each piece is one copy of its ids, checked against the vocabulary in the
/// same pass ([`Out::copy_outside`]) when the dtype can hold one outside it, else one
/// `copy_from_slice` (a memcpy). With an io_uring reader those pieces are instead read
/// straight into the slot, all of a step's in one batch of READs, and checked after it
/// ([`out_of_range`]).
///
/// Two passes: the first resolves every piece of the slot (index lookups, whose cache
/// misses are prefetched for the whole slot first) and does the bookkeeping; the second
/// copies, prefetching the span [`PREFETCH_AHEAD`] pieces on. A slot's pieces are short
/// (hundreds of tokens) and scattered over the shards, so without the prefetches each
/// lookup and each span's first lines were a miss waiting alone.
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
    let [rows, starts, row_real, domain, row_loss, cursor, bounds] = &mut f[..] else {
        return Err(fail("slot layout has the wrong number of fields".into()));
    };
    let rows: &mut [T] = typed(rows);
    let row_real: &mut [i32] = typed(row_real);
    let bounds: &mut [i32] = typed(bounds);
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
    prefetch_index(job, src);
    let mut pieces: Vec<Piece<'_>> =
        Vec::with_capacity(job.rows.iter().map(|r| r.segments.len()).sum());
    starts.fill(0);
    for (r, row) in job.rows.iter().enumerate() {
        let out = &mut rows[r * cap..(r + 1) * cap];
        let bits = &mut starts[r * sb..(r + 1) * sb];
        let shards = src
            .shards
            .get(row.domain as usize)
            .ok_or_else(|| fail(format!("row {r}: domain {} does not exist", row.domain)))?;
        let (mut p, mut loss, mut longest) = (0usize, 0u64, 0u32);
        for s in &row.segments {
            let n = s.len as usize;
            let Some((shard, piece)) = read_piece(shards, row.domain, r, s, p, cap, &fail)? else {
                continue;
            };
            if piece.dtype() == layout.token.0 && uring {
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
            } else {
                pieces.push(Piece {
                    at: r * cap + p,
                    row: r,
                    seg: s,
                    shard,
                    piece,
                });
            }
            bits[p / 8] |= 1 << (p % 8);
            if p < l {
                let end = (p + n).min(l);
                loss += ((p + n - 1).min(l) - p) as u64;
                sums.cu_len += 1;
                longest = longest.max((end - p) as u32);
            }
            p += n;
        }
        out[p..].fill(pad);
        if p < l {
            sums.cu_len += 1;
            longest = longest.max((l - p) as u32);
        }
        sums.max_seqlen = sums.max_seqlen.max(longest);
        // The row's last cu_seqlens entry (its end) and its longest piece: a micro-batch
        // of rows a..b spans entries bounds[a-1][0] ..= bounds[b-1][0].
        bounds[2 * r] = (sums.cu_len - 1) as i32;
        bounds[2 * r + 1] = longest as i32;
        row_real[r] = p as i32;
        domain[r] = row.domain as i32;
        row_loss[r] = loss as i32;
        sums.loss += loss;
        sums.real += p as u64;
    }
    if !queued.is_empty() {
        let spans: Vec<Span> = queued.iter().map(|q| q.span).collect();
        super::watch::reading_spans(&spans);
        match src
            .readers
            .read(&spans, bytemuck::cast_slice_mut::<T, u8>(rows))
        {
            Ok(()) => {
                for q in queued.iter().filter(|_| check) {
                    let at = q.span.dst as usize / size;
                    if out_of_range(&rows[at..at + q.span.len as usize / size], limit) {
                        return Err(fail(bad_token(src, q.shard, q.row, q.seg, q.piece)));
                    }
                }
            }
            // io_uring itself failed, not a file (the readers back off or give it up,
            // saying why): the same spans are copied from the mappings below.
            Err(e) if e.is_io_uring() => pieces.extend(queued.drain(..).map(|q| Piece {
                at: q.span.dst as usize / size,
                row: q.row,
                seg: q.seg,
                shard: q.shard,
                piece: q.piece,
            })),
            Err(e) => return Err(read_failed(src, &queued, e, &fail)),
        }
    }
    for (i, pc) in pieces.iter().enumerate() {
        if let Some(next) = pieces.get(i + PREFETCH_AHEAD) {
            crate::sys::prefetch_to_l2(next.piece.as_bytes(), PREFETCH_BYTES);
        }
        super::watch::reading_mapped(pc.piece.as_bytes());
        let dst = &mut rows[pc.at..pc.at + pc.piece.len()];
        let same = match bytemuck::try_cast_slice::<u8, T>(pc.piece.as_bytes()) {
            Ok(ids) if pc.piece.dtype() == layout.token.0 => Some(ids),
            _ => None,
        };
        let bad = if let Some(ids) = same {
            if check {
                T::copy_outside(ids, dst, limit)
            } else {
                dst.copy_from_slice(ids);
                false
            }
        } else {
            convert::<T, true>(pc.piece, dst, limit)
        };
        // A fault of this thread's read, or a page another thread's fault zeroed.
        if let Some(addr) = zeroed_or_faulted(pc.piece.as_bytes(), pc.shard) {
            return Err(faulted(pc.shard, pc.row, pc.seg.doc, addr, &fail));
        }
        if bad {
            return Err(fail(bad_token(src, pc.shard, pc.row, pc.seg, pc.piece)));
        }
    }
    cursor[..job.cursor.len()].copy_from_slice(&job.cursor);
    write_header(header, layout, job, &sums);
    Ok(sums.real)
}

/// The error of an io_uring read, naming the row and document of the span it was part
/// of. A shard that ended before a planned span was truncated under the daemon, and one
/// whose bytes the device or filesystem could not read (EIO) has lost them: either is
/// poisoned, as when the mmap copy faults on it (a SIGBUS, for an EIO under a mapping
/// too), so nothing reads it again and new clients of it are refused.
fn read_failed(
    src: &Source,
    queued: &[Queued<'_>],
    e: ReadError,
    fail: &dyn Fn(String) -> RingError,
) -> RingError {
    // The byte to blame: a read joins spans that continue each other (the end of one
    // document, the start of the next), so its first byte may lie in a document the file
    // still holds in full; a truncation blames the first byte the file lost.
    let at = match &e {
        ReadError::Truncated {
            offset,
            end,
            file_len,
            ..
        } if (*offset..*end).contains(file_len) => Some(*file_len),
        ReadError::Read { offset, .. } | ReadError::Truncated { offset, .. } => Some(*offset),
        _ => None,
    };
    let q = queued.iter().find(|q| {
        src.readers.path(q.span.file) == e.path()
            && at.is_some_and(|o| (q.span.offset..q.span.offset + q.span.len).contains(&o))
    });
    let mut why = format!("reading with io_uring: {e}");
    let lost = match &e {
        ReadError::Truncated { .. } => {
            Some(" (the file shrank under the daemon: truncated or rewritten in place?)")
        }
        ReadError::Read { .. } => Some(" (the device or filesystem could not read its bytes)"),
        _ => None,
    };
    if let (Some(lost), Some(q)) = (lost, q) {
        why.push_str(lost);
        why.push_str("; the shard is poisoned until restart");
        q.shard.poison(why.clone());
    }
    match q {
        Some(q) => fail(format!("row {}: document {}: {why}", q.row, q.seg.doc)),
        None => fail(why),
    }
}

#[cfg(test)]
mod tests {
    use crate::config::serve::Reader;
    use crate::corpus::DType;
    use crate::plan::{Row, Segment};
    use crate::serve::fill::{fill_slot, RankRows, Readers, SlotJob, Source};
    use crate::serve::ring::{Layout, Ring, TokenType};

    /// What a compact slot must hold for `rows`, built without the fill: each row's
    /// spans read one by one through `Shard::doc_tokens`, then `pad`; the piece starts'
    /// bits; each row's real-token count.
    fn expected(
        src: &Source,
        rows: &[Row],
        cap: usize,
        sb: usize,
    ) -> (Vec<i64>, Vec<u8>, Vec<i32>) {
        let (mut toks, mut bits, mut real) = (Vec::new(), vec![0u8; rows.len() * sb], Vec::new());
        for (r, row) in rows.iter().enumerate() {
            let mut out = Vec::new();
            for s in row.segments.iter().filter(|s| s.len > 0) {
                let shard = &src.shards[row.domain as usize][s.shard as usize];
                let doc = shard.doc_tokens(s.doc).unwrap();
                bits[r * sb + out.len() / 8] |= 1 << (out.len() % 8);
                let a = s.start as usize;
                out.extend((a..a + s.len as usize).map(|i| doc.get_i64(i).unwrap()));
            }
            real.push(out.len() as i32);
            out.resize(cap, src.pad_token as i64);
            toks.extend(out);
        }
        (toks, bits, real)
    }

    /// Compact fills of real planned steps (4 domains, rows packed from many documents,
    /// every rank of several steps, one reused slot) hold exactly the spans the plan
    /// names, whether the rows are the shards' uint16 (one copy per span, with the
    /// prefetches ahead) or int32 (a conversion per span); the index prefetch of a
    /// document past a shard's end is a no-op.
    #[test]
    fn compact_fills_of_planned_steps_hold_exactly_their_spans() {
        let dir = tempfile::tempdir().unwrap();
        crate::util::harness::ensure_corpus(dir.path(), 400_000, false).unwrap();
        let cfg = crate::config::Config::load(&dir.path().join("millrace.toml")).unwrap();
        let loaded = cfg.load_plan().unwrap();
        let plan = loaded.plan.config().clone();
        let src = Source {
            shards: loaded.shards,
            pad_token: plan.pad_token,
            vocab_size: plan.vocab_size,
            readers: Readers::copy(Reader::Mmap),
        };
        for shard in src.shards.iter().flatten() {
            shard.prefetch_doc(u64::MAX);
            shard.prefetch_doc(shard.documents());
        }
        let (rows, ranks) = (8u32, plan.global_batch_rows / 8);
        let mut planner = loaded.plan.start();
        let batches: Vec<_> = (0..3)
            .map(|_| std::sync::Arc::new(planner.next_batch()))
            .collect();
        for token in [src.compact_token(), TokenType(DType::Int32)] {
            let layout = Layout::compact(rows, plan.seq_len, 1, token, 64);
            let ring = Ring::create("t", layout.clone(), 0).unwrap();
            let slot = &mut ring.claim(0).unwrap();
            let (cap, sb) = (plan.seq_len as usize + 1, layout.starts_bytes);
            let field = |slot: &[u8], i: usize| {
                let f = &layout.fields[i].1;
                slot[f.offset..f.offset + f.bytes].to_vec()
            };
            let mut pieces = 0;
            for b in &batches {
                for r in [0, ranks / 2, ranks - 1] {
                    let job = SlotJob {
                        step: b.step,
                        plan_step: b.plan_step,
                        seq_len: plan.seq_len,
                        rows: RankRows::of(b.clone(), r, ranks),
                        cursor: vec![],
                        plan_state: 0,
                    };
                    slot.fill(0xee);
                    let real = fill_slot(slot, &layout, &job, &src).unwrap();
                    let (toks, bits, row_real) = expected(&src, &job.rows, cap, sb);
                    let got: Vec<i64> = match token.0 {
                        DType::Uint16 => bytemuck::cast_slice::<u8, u16>(&field(slot, 0))
                            .iter()
                            .map(|&t| t as i64)
                            .collect(),
                        _ => bytemuck::cast_slice::<u8, i32>(&field(slot, 0))
                            .iter()
                            .map(|&t| t as i64)
                            .collect(),
                    };
                    assert!(
                        got == toks,
                        "{:?} step {} rank {r}: rows differ",
                        token.0,
                        b.step
                    );
                    assert_eq!(field(slot, 1), bits);
                    assert_eq!(
                        bytemuck::cast_slice::<u8, i32>(&field(slot, 2)),
                        &row_real[..]
                    );
                    assert_eq!(real, row_real.iter().map(|&n| n as u64).sum::<u64>());
                    pieces += job.rows.iter().map(|r| r.segments.len()).sum::<usize>();
                }
            }
            // Rows are packed from many documents: the prefetch runs ahead of real copies.
            assert!(pieces > 9 * rows as usize * 2, "{pieces} pieces");
        }
    }

    /// Random documents (half of them one token long) in `count` shards of `dtype` in
    /// `dir`: Megatron, or raw with EOS 1000 after each. Registered with the guard.
    fn random_shards(
        dir: &std::path::Path,
        raw: bool,
        dtype: DType,
        count: usize,
        rng: &mut rand_pcg::Pcg64,
    ) -> Vec<std::sync::Arc<crate::corpus::Shard>> {
        use crate::corpus::{MegatronWriter, RawOptions, Shard};
        use rand::Rng;
        let bytes = |d: &[u32]| -> Vec<u8> {
            match dtype {
                DType::Uint16 => d.iter().flat_map(|&t| (t as u16).to_le_bytes()).collect(),
                _ => d.iter().flat_map(|&t| t.to_le_bytes()).collect(),
            }
        };
        (0..count)
            .map(|i| {
                let docs: Vec<Vec<u32>> = (0..rng.gen_range(5..300))
                    .map(|_| {
                        let n = if rng.gen_bool(0.5) {
                            1
                        } else {
                            rng.gen_range(1..3000)
                        };
                        (0..n).map(|_| rng.gen_range(0..999)).collect()
                    })
                    .collect();
                let shard = if raw {
                    let path = dir.join(format!("r{i}-{dtype}.bin"));
                    let all: Vec<u8> = docs
                        .iter()
                        .flat_map(|d| bytes(&[&d[..], &[1000]].concat()))
                        .collect();
                    std::fs::write(&path, all).unwrap();
                    let opts = RawOptions {
                        dtype,
                        eos: 1000,
                        cache_dir: None,
                    };
                    Shard::open(&path, Some(&opts)).unwrap()
                } else {
                    let prefix = dir.join(format!("m{i}-{dtype}"));
                    let mut w = MegatronWriter::create(&prefix, dtype).unwrap();
                    for d in &docs {
                        w.add_document_bytes(&bytes(d)).unwrap();
                    }
                    w.finish().unwrap();
                    Shard::open(&prefix, None).unwrap()
                };
                crate::corpus::guard::protect(shard.mappings()).unwrap();
                std::sync::Arc::new(shard)
            })
            .collect()
    }

    /// The three readers fill compact slots byte for byte alike, and as the plan says,
    /// for Megatron uint16 and int32, raw uint16 and uint32, and a domain mixing uint16
    /// and int32 shards (the int32 ones read, the uint16 ones converted); at the ring's
    /// shape and at smaller stages; rows of many one-token pieces crossing the O_DIRECT
    /// blocks at both ends.
    #[test]
    fn the_three_readers_fill_compact_slots_alike_for_every_format_and_stage() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_pcg::Pcg64::seed_from_u64(5);
        let kinds = [
            (false, vec![DType::Uint16]),
            (false, vec![DType::Int32]),
            (true, vec![DType::Uint16]),
            (true, vec![DType::Uint32]),
            (false, vec![DType::Uint16, DType::Int32]),
        ];
        for (raw, dtypes) in kinds {
            let dir = tempfile::tempdir().unwrap();
            let shards: Vec<_> = dtypes
                .iter()
                .flat_map(|&d| random_shards(dir.path(), raw, d, 2, &mut rng))
                .collect();
            let sources: Vec<Source> = [Reader::Mmap, Reader::Uring, Reader::UringDirect]
                .into_iter()
                .map(|reader| {
                    let shards = vec![shards.clone()];
                    let readers = Readers::open(reader, &shards);
                    if let Some(why) = readers.fallback() {
                        eprintln!("{why}");
                    }
                    Source {
                        shards,
                        pad_token: 3,
                        vocab_size: Some(1001),
                        readers,
                    }
                })
                .collect();
            let layout = Layout::compact(8, 512, 1, sources[0].compact_token(), 64);
            let ring = Ring::create("t", layout.clone(), 0).unwrap();
            for round in 0..20 {
                let (rows, seq) = match round % 2 {
                    0 => (8, 512),
                    _ => (rng.gen_range(1..8), rng.gen_range(16..512)),
                };
                let rows: Vec<Row> = (0..rows)
                    .map(|_| {
                        let (mut segs, mut p) = (Vec::new(), 0u32);
                        while p <= seq && rng.gen_bool(0.95) {
                            let shard = rng.gen_range(0..shards.len());
                            let doc = rng.gen_range(0..shards[shard].documents());
                            let doc_len = shards[shard].doc_len(doc).unwrap();
                            let start = rng.gen_range(0..doc_len);
                            let len = (rng.gen_range(1..=doc_len - start) as u32).min(seq + 1 - p);
                            segs.push(Segment {
                                shard: shard as u32,
                                doc,
                                start,
                                len,
                                doc_len,
                                group: None,
                            });
                            p += len;
                        }
                        Row::new(0, 0, segs, p)
                    })
                    .collect();
                let job = SlotJob {
                    step: round,
                    plan_step: round,
                    seq_len: seq,
                    rows: rows.into(),
                    cursor: vec![],
                    plan_state: 0,
                };
                let staged = layout.stage(job.rows.len() as u32, seq).unwrap();
                let (cap, sb) = (seq as usize + 1, staged.starts_bytes);
                let (toks, bits, _) = expected(&sources[0], &job.rows, cap, sb);
                let mut filled = Vec::new();
                for src in &sources {
                    let slot = &mut ring.claim(0).unwrap();
                    slot.fill(0xee);
                    fill_slot(slot, &layout, &job, src).unwrap();
                    let f =
                        |i: usize| &slot[staged.fields[i].1.offset..][..staged.fields[i].1.bytes];
                    let got: Vec<i64> = match staged.token.0 {
                        DType::Uint16 => bytemuck::cast_slice::<u8, u16>(f(0))
                            .iter()
                            .map(|&t| t.into())
                            .collect(),
                        DType::Uint32 => bytemuck::cast_slice::<u8, u32>(f(0))
                            .iter()
                            .map(|&t| t.into())
                            .collect(),
                        _ => bytemuck::cast_slice::<u8, i32>(f(0))
                            .iter()
                            .map(|&t| t.into())
                            .collect(),
                    };
                    let what = format!(
                        "{:?} {dtypes:?} raw {raw} round {round}",
                        src.readers.reader()
                    );
                    assert!(got == toks, "{what}: rows differ from the plan");
                    assert!(f(1) == &bits[..], "{what}: starts");
                    filled.push(slot.to_vec());
                }
                assert!(
                    filled.iter().all(|s| *s == filled[0]),
                    "{dtypes:?} raw {raw} round {round}: readers differ"
                );
            }
        }
    }
}
