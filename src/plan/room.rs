//! How much room a plan's cursor blobs take at most: the bounds the daemon sizes each
//! slot's cursor field from, and that a resume holds a blob's tails to. They follow from
//! the plan alone (domains, reseeds, stages, batch grouping's spanning groups), never
//! from the corpus, so a field sized at start holds every blob the run writes.

use super::stage::Shape;
use super::stream::MAX_DEFERRED;
use super::Plan;
use crate::config::plan::GroupMode;

/// Cursor bytes budgeted per domain for its carry record of one stage switch
/// ([`Plan::carry_bound`]), besides a batch-grouped domain's spanning groups.
pub const CARRY_BYTES: usize = 256;

impl Plan {
    /// Most bytes a cursor blob of this plan takes, its journal and the switches of
    /// stages added live aside, while its stages are `shapes`: what the daemon sizes
    /// every slot's cursor field from, so no blob it writes mid-run outgrows it.
    ///
    /// Per domain its stream (512 bytes typical), a reseed chain entry per reseed, and
    /// its identity record; a batch-grouped domain adds room for its spanning groups
    /// ([`crate::config::plan::group_spans`]), each a pending entry and at worst a tail
    /// record of its own. Each of the config's stage switches adds
    /// [`Plan::carry_bound`].
    pub fn cursor_bound(&self, shapes: &[Shape]) -> usize {
        let reseeds = self.cfg.reseed.len();
        let streams = self.domains.len() * (512 + 32 * reseeds);
        let spans: usize = self
            .group_spans(shapes)
            .map(|s| s * (72 + 16 * reseeds))
            .sum();
        let switches = self.cfg.stage.len() * self.carry_bound(shapes);
        1024 + streams + spans + switches + self.cursor_domain_bytes()
    }

    /// Most bytes one stage switch's carry records add to a blob while the stages are
    /// `shapes`: a record per domain with its window's reseed chain, and for a
    /// batch-grouped domain its spanning and deferred blocks, listed in its stream and
    /// in the one tail that can carry them.
    pub fn carry_bound(&self, shapes: &[Shape]) -> usize {
        let listed: usize = (self.group_spans(shapes))
            .map(|s| 2 * ((s + MAX_DEFERRED) * 8 + 32))
            .sum();
        // Each level (the stream's and the one tail copy) holds its window's reseeds.
        let reseeds = 2 * 16 * self.cfg.reseed.len();
        self.domains.len() * (CARRY_BYTES + reseeds) + listed
    }

    /// The most tails domain `d`'s stream can hold: one per group spanning batches at
    /// once, for a batch-grouped domain at this plan's stages; none for another.
    pub(crate) fn max_tails(&self, d: usize) -> usize {
        let settings = self.domains[d].settings.grouping;
        if settings.mode != GroupMode::Batch {
            return 0;
        }
        (self.shapes.iter())
            .map(|s| crate::config::plan::group_spans(s.rows, settings.max_share))
            .max()
            .unwrap_or(0) as usize
    }

    /// For each batch-grouped domain, the most groups that span batches at once in a
    /// batch of at most the largest of `shapes`' rows: `group_spans` is not monotone in
    /// the rows (its cap is a floor), and a stage of fewer rows must never need more
    /// room than the field was sized with ([`crate::config::plan::group_spans_upto`]).
    fn group_spans<'a>(&'a self, shapes: &'a [Shape]) -> impl Iterator<Item = usize> + 'a {
        let rows = shapes.iter().map(|s| s.rows).max().unwrap_or(0);
        (self.domains.iter())
            .filter(|d| d.settings.grouping.mode == GroupMode::Batch)
            .map(move |d| {
                let share = d.settings.grouping.max_share;
                crate::config::plan::group_spans_upto(rows, share) as usize
            })
    }
}
