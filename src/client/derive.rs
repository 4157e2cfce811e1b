//! What a compact slot leaves out, derived on the client (docs/PROTOCOL.md section 4):
//! inputs and labels are the rows without their last and first token, and the document
//! starts plus each row's real-token count give positions, loss mask and `cu_seqlens`.
//! The Python client does the same with numpy; a test holds both to the expanded slots.

use crate::corpus::Tokens;

/// A step's arrays as the expanded layout carries them, owned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expanded {
    /// `[rows * seq_len]` inputs.
    pub tokens: Vec<i64>,
    /// `[rows * seq_len]` next tokens.
    pub labels: Vec<i64>,
    /// `[rows * seq_len]` 0/1: the label is in the input's document piece.
    pub loss_mask: Vec<u8>,
    /// `[rows * seq_len]` positions within document pieces (padding counts from 0).
    pub position_ids: Vec<i32>,
    /// Flash-attention varlen boundaries over the flattened inputs, the leading 0 included.
    pub cu_seqlens: Vec<i32>,
}

/// Every id of `t`, widened.
pub(super) fn ids(t: Tokens<'_>) -> Vec<i64> {
    (0..t.len()).map(|i| t.get_i64(i).unwrap_or(0)).collect()
}

/// Derives the expanded arrays of `rows` rows of `seq_len` inputs from a compact slot's
/// `[rows, seq_len + 1]` ids, its start bitmap and its real-token counts. A piece starts
/// where a bit is set, at position 0, and where padding starts (`row_real_tokens`);
/// out-of-range counts are clamped, so a malformed slot gives wrong numbers, never a panic.
pub(super) fn from_compact(
    ids_: Tokens<'_>,
    starts: &[u8],
    real: &[i32],
    rows: usize,
    seq_len: usize,
) -> Expanded {
    let (l, w) = (seq_len, seq_len + 1);
    let sb = w.div_ceil(8);
    let n = rows * l;
    let mut e = Expanded {
        tokens: Vec::with_capacity(n),
        labels: Vec::with_capacity(n),
        loss_mask: Vec::with_capacity(n),
        position_ids: Vec::with_capacity(n),
        cu_seqlens: vec![0],
    };
    let all = ids(ids_);
    for r in 0..rows {
        let row = all.get(r * w..(r + 1) * w).unwrap_or(&[]);
        // In i64: `w as i32` is negative past 2^31 - 1 (a shape no daemon sends), and
        // `clamp` panics when its bounds cross.
        let real = real
            .get(r)
            .map_or(0, |&v| i64::from(v).clamp(0, w as i64) as usize);
        let bit = |j: usize| {
            starts
                .get(r * sb + j / 8)
                .is_some_and(|b| b >> (j % 8) & 1 == 1)
        };
        let start = |j: usize| j == 0 || j == real || bit(j);
        let mut first = 0usize;
        for i in 0..l {
            if start(i) {
                first = i;
                if i > 0 {
                    e.cu_seqlens.push((r * l + i) as i32);
                }
            }
            e.tokens.push(row.get(i).copied().unwrap_or(0));
            e.labels.push(row.get(i + 1).copied().unwrap_or(0));
            e.position_ids.push((i - first) as i32);
            e.loss_mask.push(u8::from(i + 1 < real && !start(i + 1)));
        }
        e.cu_seqlens.push((r * l + l) as i32);
    }
    e
}
