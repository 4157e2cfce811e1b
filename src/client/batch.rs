//! One step's data as the client hands it out: views borrowed from the mapped slot,
//! valid until the next call on the client.

use crate::corpus::Tokens;

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
    /// `[rows, seq_len]` inputs.
    pub tokens: Tokens<'a>,
    /// `[rows, seq_len]` next tokens.
    pub labels: Tokens<'a>,
    /// `[rows, seq_len]` 0/1.
    pub loss_mask: &'a [u8],
    /// `[rows, seq_len]` positions within document pieces.
    pub position_ids: Tokens<'a>,
    /// The `cu_len` entries in use.
    pub cu_seqlens: &'a [i32],
    /// Domain index per row.
    pub domain: &'a [i32],
    /// Loss tokens per row.
    pub row_loss_tokens: &'a [i32],
    /// The cursor blob as of the end of this step.
    pub cursor: &'a [u8],
}

impl BatchView<'_> {
    /// Bytes of tokens + labels + loss_mask + position_ids: what a trainer copies.
    pub fn payload_bytes(&self) -> u64 {
        (self.tokens.as_bytes().len()
            + self.labels.as_bytes().len()
            + self.loss_mask.len()
            + self.position_ids.as_bytes().len()) as u64
    }

    /// Real (non-padding) tokens of row `r`, out of `seq_len + 1`: the trailing run of
    /// padding is found from the end (padding holds `pad_token` and no loss flows into
    /// it), so only a one-token document piece equal to `pad_token` would be miscounted.
    pub fn row_real_tokens(&self, r: usize) -> u32 {
        let n = self.seq_len as usize;
        if r >= self.rows as usize {
            return 0;
        }
        let base = r * n;
        // t[j] for j in 0..=n: tokens[base + j] for j < n, labels[base + n - 1] for j == n.
        let t = |j: usize| {
            if j < n {
                self.tokens.get_i64(base + j)
            } else {
                self.labels.get_i64(base + n - 1)
            }
        };
        let mut real = n + 1;
        while real > 0 {
            let j = real - 1;
            let is_pad = t(j) == Some(self.pad_token)
                && (j == 0 || self.loss_mask.get(base + j - 1).copied() == Some(0));
            if !is_pad {
                break;
            }
            real -= 1;
        }
        real as u32
    }
}
