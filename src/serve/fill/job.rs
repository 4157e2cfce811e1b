//! What one slot fill is given: the step, the rank's rows and the cursor after the step.
//! The rows are a range of the job's planned global batch, shared by every rank's fill
//! rather than copied into each (one planner per job hands the same batch to 8 rings).

use std::ops::{Deref, Range};
use std::sync::Arc;

use crate::plan::{rank_range, GlobalBatch, Row};

/// One step's slice for one rank, planned and waiting to be copied.
pub struct SlotJob {
    /// Trainer step.
    pub step: u64,
    /// Unskipped plan step.
    pub plan_step: u64,
    /// Tokens a row trains on at this step's stage: with the rows, the slot's shape.
    pub seq_len: u32,
    /// The rank's rows.
    pub rows: RankRows,
    /// Cursor blob as of the end of the step.
    pub cursor: Vec<u8>,
    /// Its plan state digest (`crate::plan::cursor::encode_with_state`; 0 for none).
    pub plan_state: u64,
}

/// A rank's rows of a global batch that every rank's fill shares: reads as `[Row]`.
#[derive(Clone, Debug)]
pub struct RankRows {
    batch: Arc<GlobalBatch>,
    range: Range<usize>,
}

impl RankRows {
    /// Rank `r` of `ranks`'s rows of `batch` ([`GlobalBatch::rank_rows`]), without a copy.
    pub fn of(batch: Arc<GlobalBatch>, r: u32, ranks: u32) -> RankRows {
        let (a, b) = rank_range(batch.rows.len() as u64, r, ranks);
        RankRows {
            batch,
            range: a as usize..b as usize,
        }
    }
}

impl From<Vec<Row>> for RankRows {
    /// Rows planned on their own (benchmarks, tests): a batch of exactly these rows.
    fn from(rows: Vec<Row>) -> RankRows {
        let range = 0..rows.len();
        let batch = GlobalBatch {
            step: 0,
            plan_step: 0,
            rows,
            counts: Vec::new(),
        };
        RankRows {
            batch: Arc::new(batch),
            range,
        }
    }
}

impl Deref for RankRows {
    type Target = [Row];

    fn deref(&self) -> &[Row] {
        self.batch.rows.get(self.range.clone()).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::Segment;

    fn row(doc: u64) -> Row {
        let seg = Segment {
            shard: 0,
            doc,
            start: 0,
            len: 3,
            doc_len: 3,
            group: None,
        };
        Row::new(0, 0, vec![seg], 3)
    }

    #[test]
    fn rank_rows_are_the_batch_rank_rows_and_share_the_batch() {
        let rows: Vec<Row> = (0..10).map(row).collect();
        let batch = Arc::new(GlobalBatch {
            step: 7,
            plan_step: 7,
            rows,
            counts: vec![10],
        });
        for ranks in [1, 3, 4] {
            for r in 0..ranks {
                let got = RankRows::of(batch.clone(), r, ranks);
                assert_eq!(&*got, batch.rank_rows(r, ranks), "rank {r} of {ranks}");
            }
        }
        assert!(
            Arc::strong_count(&batch) == 1,
            "the fills dropped their references"
        );
        let own = RankRows::from(vec![row(1), row(2)]);
        assert_eq!(own.len(), 2);
        assert_eq!(own[1].segments[0].doc, 2);
    }
}
