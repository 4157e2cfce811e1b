//! One step's data as the client hands it out: views borrowed from the mapped slot,
//! valid until the next call on the client. A compact slot carries only the rows of
//! tokens and the document starts; [`BatchView::expanded`] derives the rest.

use super::derive::{self, Expanded};
use crate::corpus::Tokens;

/// The arrays of one slot, as its layout (WELCOME `slot_layout`) has them.
#[derive(Debug, Clone, Copy)]
pub enum SlotArrays<'a> {
    /// Ready arrays.
    Expanded {
        /// `[rows, seq_len]` inputs.
        tokens: Tokens<'a>,
        /// `[rows, seq_len]` next tokens.
        labels: Tokens<'a>,
        /// `[rows, seq_len]` 0/1.
        loss_mask: &'a [u8],
        /// `[rows, seq_len]` positions within document pieces.
        position_ids: Tokens<'a>,
        /// The `cu_len` entries in use.
        cu_seqlens: &'a [i32],
    },
    /// Only what cannot be derived (per token), plus per-row bounds. Non-exhaustive:
    /// a later daemon may add per-row metadata here, as it added `row_bounds`.
    #[non_exhaustive]
    Compact {
        /// `[rows, seq_len + 1]` tokens: inputs are `[:, :-1]`, labels `[:, 1:]`.
        rows: Tokens<'a>,
        /// `[rows, ceil((seq_len + 1) / 8)]`: bit `j % 8` of byte `j / 8` is set where a
        /// document piece starts at position `j` of the row.
        doc_starts: &'a [u8],
        /// Real (non-padding) tokens per row, out of `seq_len + 1`.
        row_real_tokens: &'a [i32],
        /// `[rows, 2]`: row `r`'s last `cu_seqlens` entry (its end) and its longest
        /// piece, so micro-batch bounds need no pass over the starts (None from a daemon
        /// that predates it). Rows `a..b` span entries `bounds[a-1][0] ..= bounds[b-1][0]`.
        /// Checked when read: entries rise to `cu_len - 1`, pieces are `1..=seq_len`.
        row_bounds: Option<&'a [i32]>,
    },
}

/// One step's data, borrowed from the mapped slot until the next call on the client.
#[derive(Debug, Clone, Copy)]
pub struct BatchView<'a> {
    /// Trainer step.
    pub step: u64,
    /// The unskipped plan step.
    pub plan_step: u64,
    /// Rows.
    pub rows: u32,
    /// Inputs per row.
    pub seq_len: u32,
    /// Entries of `cu_seqlens` in use.
    pub cu_len: u32,
    /// Longest span of `cu_seqlens`.
    pub max_seqlen: u32,
    /// Ones in `loss_mask`.
    pub loss_tokens: u64,
    /// Non-padding tokens over the rows (each row holds `seq_len + 1`).
    pub real_tokens: u64,
    /// `CLOCK_MONOTONIC` ns when the daemon published the slot.
    pub publish_ns: u64,
    /// Publish-to-wake latency, when the client had to wait for this step.
    pub wake_latency_ns: Option<u64>,
    /// The padding id from WELCOME, for [`BatchView::row_real_tokens`].
    pub pad_token: i64,
    /// The layout's arrays.
    pub arrays: SlotArrays<'a>,
    /// Domain index per row.
    pub domain: &'a [i32],
    /// Loss tokens per row.
    pub row_loss_tokens: &'a [i32],
    /// The cursor blob as of the end of this step.
    pub cursor: &'a [u8],
    /// The blob's plan state digest: equal on every node whose daemon plans the same
    /// batches, whatever journals they hold; what a job compares across nodes (0 from a
    /// daemon before 2026-12-06).
    pub plan_state: u64,
    /// Every array of the slot but the cursor, as the one contiguous byte range they lie
    /// in (from the lowest offset in WELCOME `fields` to the end of the last): what a
    /// trainer's one host-to-device copy moves (src/client/gpu.rs).
    pub copy_bytes: &'a [u8],
}

/// The sum of `t`'s ids, wrapping: a cheap checksum that reads every token.
///
/// Ids narrower than 32 bits are summed in chunks of [`SUM_CHUNK`] into 32-bit lanes
/// (u64 for uint32), which no chunk can overflow, and each chunk's total is added to
/// the i64: the same wrapping sum as a fold into i64, but the compiler vectorizes it
/// 4 or 8 ids per lane-vector instead of widening every id to 64 bits (a consumer's
/// `--touch` spent 43% of its CPU here). AVX2 when the CPU has it ([`crate::sys::with_avx2`]).
pub fn sum_tokens(t: &Tokens<'_>) -> i64 {
    crate::sys::with_avx2(
        #[inline(always)]
        || match t {
            Tokens::Uint8(v) => chunked(v, |x| x as u32, |s| s as i64),
            Tokens::Int8(v) => chunked(v, |x| x as i32, |s| s as i64),
            Tokens::Int16(v) => chunked(v, |x| x as i32, |s| s as i64),
            Tokens::Uint16(v) => chunked(v, |x| x as u32, |s| s as i64),
            Tokens::Uint32(v) => chunked(v, |x| x as u64, |s| s as i64),
            Tokens::Int32(v) => fold(v, |x| x as i64),
            Tokens::Int64(v) => fold(v, |x| x),
            Tokens::Float32(v) => fold(v, |x| x as i64),
            Tokens::Float64(v) => fold(v, |x| x as i64),
        },
    )
}

/// Ids per chunk of [`sum_tokens`]: 2^16 ids of 16 bits sum to less than 2^32 (and, as
/// i16, to within i32), so a chunk's 32-bit total is exact.
const SUM_CHUNK: usize = 1 << 16;

/// The wrapping i64 sum of `v`, each chunk of [`SUM_CHUNK`] summed exactly in the lane
/// type `W` (`widen` maps an id to it; `total` a chunk's sum to i64).
#[inline(always)]
fn chunked<T: Copy, W: Copy + Default + std::ops::Add<Output = W>>(
    v: &[T],
    widen: impl Fn(T) -> W,
    total: impl Fn(W) -> i64,
) -> i64 {
    v.chunks(SUM_CHUNK).fold(0i64, |a, c| {
        a.wrapping_add(total(c.iter().fold(W::default(), |s, &x| s + widen(x))))
    })
}

/// The wrapping i64 sum of `v`, each id widened to i64 by `widen`.
#[inline(always)]
fn fold<T: Copy>(v: &[T], widen: impl Fn(T) -> i64) -> i64 {
    v.iter().fold(0i64, |a, &x| a.wrapping_add(widen(x)))
}

impl BatchView<'_> {
    /// Bytes of the slot's arrays a trainer copies (tokens, labels, mask and positions
    /// when expanded; the rows, the starts and the real counts when compact).
    pub fn payload_bytes(&self) -> u64 {
        (match self.arrays {
            SlotArrays::Expanded {
                tokens,
                labels,
                loss_mask,
                position_ids,
                ..
            } => {
                tokens.as_bytes().len()
                    + labels.as_bytes().len()
                    + loss_mask.len()
                    + position_ids.as_bytes().len()
            }
            SlotArrays::Compact {
                rows,
                doc_starts,
                row_real_tokens,
                ..
            } => rows.as_bytes().len() + doc_starts.len() + 4 * row_real_tokens.len(),
        }) as u64
    }

    /// The token bytes of the slot (inputs when expanded, the rows when compact): what
    /// `millrace consume` digests, so two runs of one layout can be compared.
    pub fn token_bytes(&self) -> &[u8] {
        match self.arrays {
            SlotArrays::Expanded { tokens, .. } => tokens.as_bytes(),
            SlotArrays::Compact { rows, .. } => rows.as_bytes(),
        }
    }

    /// What [`BatchView::token_bytes`] holds, for a digest's reader: the layout, the dtype
    /// and which tokens ("compact uint16 rows", "expanded int32 inputs"). Digests of two
    /// runs compare only when this is equal (the bytes differ with it, not the tokens).
    pub fn token_bytes_kind(&self) -> String {
        match self.arrays {
            SlotArrays::Expanded { tokens, .. } => {
                format!("expanded {} inputs", tokens.dtype().name())
            }
            SlotArrays::Compact { rows, .. } => format!("compact {} rows", rows.dtype().name()),
        }
    }

    /// The wrapping sum of the inputs' ids (`rows * seq_len` tokens).
    pub fn inputs_sum(&self) -> i64 {
        match self.arrays {
            SlotArrays::Expanded { tokens, .. } => sum_tokens(&tokens),
            SlotArrays::Compact { rows, .. } => {
                // Every row's last token is a label only.
                let w = self.seq_len as usize + 1;
                (0..self.rows as usize).fold(sum_tokens(&rows), |a, r| {
                    a.wrapping_sub(rows.get_i64(r * w + w - 1).unwrap_or(0))
                })
            }
        }
    }

    /// The wrapping sum of every value the slot stores besides the inputs (labels,
    /// positions and mask when expanded; the document starts and real counts when
    /// compact, whose rows [`BatchView::inputs_sum`] already read whole): with it, a
    /// consumer has read every byte a trainer copies, in place. Deriving a compact
    /// slot's arrays is the trainer's (device ops, or numpy on first access), not this.
    pub fn stored_sum(&self) -> i64 {
        match self.arrays {
            SlotArrays::Expanded {
                labels,
                loss_mask,
                position_ids,
                ..
            } => sum_tokens(&labels)
                .wrapping_add(sum_tokens(&position_ids))
                .wrapping_add(sum_tokens(&Tokens::Uint8(loss_mask))),
            SlotArrays::Compact {
                doc_starts,
                row_real_tokens,
                ..
            } => sum_tokens(&Tokens::Uint8(doc_starts))
                .wrapping_add(sum_tokens(&Tokens::Int32(row_real_tokens))),
        }
    }

    /// The expanded arrays of this step, owned: copied from an expanded slot, derived
    /// from a compact one (PROTOCOL.md section 4 gives the rules).
    pub fn expanded(&self) -> Expanded {
        let (rows, l) = (self.rows as usize, self.seq_len as usize);
        match self.arrays {
            SlotArrays::Expanded {
                tokens,
                labels,
                loss_mask,
                position_ids,
                cu_seqlens,
            } => Expanded {
                tokens: derive::ids(tokens),
                labels: derive::ids(labels),
                loss_mask: loss_mask.to_vec(),
                position_ids: derive::ids(position_ids)
                    .iter()
                    .map(|&v| v as i32)
                    .collect(),
                cu_seqlens: cu_seqlens.to_vec(),
            },
            SlotArrays::Compact {
                rows: ids,
                doc_starts,
                row_real_tokens,
                ..
            } => derive::from_compact(ids, doc_starts, row_real_tokens, rows, l),
        }
    }

    /// Real (non-padding) tokens of row `r`, out of `seq_len + 1`. A compact slot says.
    /// In an expanded one padding is the row's last piece (PROTOCOL.md section 4): its
    /// positions count from 0, it holds `pad_token` throughout, and no loss flows into
    /// or inside it, while a document piece of two or more tokens has loss inside. So the
    /// last piece among the inputs is padding when all of it and the row's last token are
    /// `pad_token` with no loss; one-token documents equal to `pad_token` before it are not
    /// (a scan back over such tokens counted them as padding: `pad_token = eod_token` with
    /// runs of EOS). Only a last piece of one token stays ambiguous, taken as padding.
    pub fn row_real_tokens(&self, r: usize) -> u32 {
        let n = self.seq_len as usize;
        if r >= self.rows as usize || n == 0 {
            return 0;
        }
        let (tokens, labels, loss_mask, positions) = match self.arrays {
            SlotArrays::Compact {
                row_real_tokens, ..
            } => return row_real_tokens.get(r).map_or(0, |&v| v.max(0) as u32),
            SlotArrays::Expanded {
                tokens,
                labels,
                loss_mask,
                position_ids,
                ..
            } => (tokens, labels, loss_mask, position_ids),
        };
        let base = r * n;
        let pad = Some(self.pad_token);
        let mask = |j: usize| loss_mask.get(base + j).copied().unwrap_or(1);
        // The row's last token (label only) is real when it continues the last piece or
        // is not padding's id.
        if labels.get_i64(base + n - 1) != pad || mask(n - 1) != 0 {
            return n as u32 + 1;
        }
        // The last piece among the inputs starts where its position is 0.
        let last = positions.get_i64(base + n - 1).unwrap_or(0);
        let Some(start) = usize::try_from(last)
            .ok()
            .and_then(|p| (n - 1).checked_sub(p))
        else {
            return n as u32;
        };
        let padding = (start..n).all(|j| tokens.get_i64(base + j) == pad && mask(j) == 0);
        match padding {
            true => start as u32,
            false => n as u32,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A row of one 3-token document ending in EOS, two one-token documents that are
    /// EOS alone (runs of EOS in a raw file), then padding, with `pad_token` = EOS (2):
    /// 5 real tokens, read from an expanded slot exactly as a compact one says. The scan
    /// back over `pad_token`s counted the one-token documents as padding (3).
    #[test]
    fn an_expanded_rows_real_tokens_stop_at_padding_not_at_eos_documents() {
        let n = 8;
        // `row_real_tokens` of the expanded arrays derived from one compact row.
        let real_of = |row: &[u16], starts: &[u8], real: i32| {
            let x = super::super::derive::from_compact(Tokens::Uint16(row), starts, &[real], 1, n);
            let view = BatchView {
                step: 0,
                plan_step: 0,
                rows: 1,
                seq_len: n as u32,
                cu_len: 0,
                max_seqlen: 0,
                loss_tokens: 0,
                real_tokens: real as u64,
                publish_ns: 0,
                wake_latency_ns: None,
                pad_token: 2,
                arrays: SlotArrays::Expanded {
                    tokens: Tokens::Int64(&x.tokens),
                    labels: Tokens::Int64(&x.labels),
                    loss_mask: &x.loss_mask,
                    position_ids: Tokens::Int32(&x.position_ids),
                    cu_seqlens: &x.cu_seqlens,
                },
                domain: &[0],
                row_loss_tokens: &[2],
                cursor: &[],
                plan_state: 0,
                copy_bytes: &[],
            };
            view.row_real_tokens(0)
        };
        assert_eq!(
            real_of(&[5, 6, 2, 2, 2, 2, 2, 2, 2], &[0b0001_1001, 0], 5),
            5
        );
        // A last piece of two or more pad-valued tokens with loss inside is a document:
        // all 9 are real.
        assert_eq!(real_of(&[5, 2, 2, 2, 2, 2, 2, 2, 2], &[1, 0], 9), 9);
    }

    /// The naive fold [`sum_tokens`] must equal: every id widened to i64, wrapping.
    fn naive(t: &Tokens<'_>) -> i64 {
        (0..t.len()).fold(0i64, |a, i| a.wrapping_add(t.get_i64(i).unwrap_or(0)))
    }

    /// The chunked sums equal the naive fold for every dtype, on random ids and on runs
    /// of each dtype's extremes (where a lane that could overflow would show), at
    /// lengths that are and are not multiples of the chunk or of a vector.
    #[test]
    fn chunked_sums_equal_the_naive_fold_for_every_dtype() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        // 8-byte words, so that every dtype's view of them is aligned.
        let mut words = |n: usize, fill: Option<u8>| -> Vec<u64> {
            (0..n)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    fill.map_or(x, |b| u64::from_ne_bytes([b; 8]))
                })
                .collect()
        };
        let lens = [
            0,
            1,
            7,
            31,
            33,
            1000,
            SUM_CHUNK - 1,
            SUM_CHUNK,
            3 * SUM_CHUNK + 5,
        ];
        for n in lens {
            // Random bytes, all ones (the unsigned maxima, -1 signed), 0x80 in the top
            // byte (the signed minima) and 0x7f (near the signed maxima).
            for fill in [None, Some(0xff), Some(0x80), Some(0x7f)] {
                let w = words(n, fill);
                let b: &[u8] = bytemuck::cast_slice(&w);
                let ts = [
                    Tokens::Uint8(&b[..n]),
                    Tokens::Int8(bytemuck::cast_slice(&b[..n])),
                    Tokens::Uint16(bytemuck::cast_slice(&b[..2 * n])),
                    Tokens::Int16(bytemuck::cast_slice(&b[..2 * n])),
                    Tokens::Uint32(bytemuck::cast_slice(&b[..4 * n])),
                    Tokens::Int32(bytemuck::cast_slice(&b[..4 * n])),
                    Tokens::Int64(bytemuck::cast_slice(&b[..8 * n])),
                ];
                for t in ts {
                    assert_eq!(
                        sum_tokens(&t),
                        naive(&t),
                        "{:?} x {n}, fill {fill:?}",
                        t.dtype()
                    );
                }
            }
            // Extremes by value, not by byte pattern.
            let u16s = vec![u16::MAX; n];
            let i16s = vec![i16::MIN; n];
            let u32s = vec![u32::MAX; n];
            for t in [
                Tokens::Uint16(&u16s),
                Tokens::Int16(&i16s),
                Tokens::Uint32(&u32s),
            ] {
                assert_eq!(sum_tokens(&t), naive(&t), "{:?} x {n}", t.dtype());
            }
        }
        let f = [1.5f32, -2.5, 3e9];
        assert_eq!(sum_tokens(&Tokens::Float32(&f)), 1 - 2 + 3_000_000_000);
    }
}
