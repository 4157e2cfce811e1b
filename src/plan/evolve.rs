//! Corpus evolution: how the domains of a cursor blob (layout 7) map onto this plan's,
//! by name, so that a config may add a domain, or weight one 0, without invalidating
//! the run's blobs (issue 20; docs/DESIGN.md, "Corpus evolution").
//!
//! Each domain's stream depends only on its own name, settings and shards, and the
//! mixer gives a domain of weight 0 no rows and leaves its carried error alone. So a
//! domain the blob does not know is, at the blob's step, exactly where a run that had
//! it at weight 0 from step 0 would have it (epoch 0, nothing taken), provided the
//! config really gives it weight 0 before that step: checked here, else the resume
//! would rewrite steps already served. A domain the blob knows must have the blob's
//! identity (settings and shards); one it knew that the config lacks is refused, since
//! its position would be lost.

use super::cursor::{CursorData, CursorError, DomainRecord};
use super::fingerprint::DomainIdentity;
use super::{DomainInput, Plan};

/// Per domain of this plan, the index of the blob's domain of the same name, or `None`
/// for a domain new to the blob.
pub(super) type DomainMap = Vec<Option<usize>>;

/// The records of domains `inputs` with identities `ids`, as [`Plan::new`] keeps them.
pub(super) fn records(inputs: &[DomainInput], ids: &[DomainIdentity]) -> Vec<DomainRecord> {
    inputs
        .iter()
        .zip(ids)
        .map(|(d, id)| DomainRecord {
            name: d.name.clone(),
            shards: id.shards() as u32,
            identity: id.prefix(id.shards()),
            tags: id.tags(),
        })
        .collect()
}

impl Plan {
    /// Bytes the domain records add to a layout 7 blob: the daemon's cursor field must
    /// hold them besides the stream states (names are the config's, of any length).
    pub fn cursor_domain_bytes(&self) -> usize {
        self.records
            .iter()
            .map(|r| 2 + r.name.len() + 4 + 16 + 2 + 4 * r.tags.len())
            .sum()
    }

    /// A cursor blob decoded, its journal's weights (per blob domain) re-expressed per
    /// domain of this plan ([`Plan::journal_by_name`]), so the journal compares with
    /// this plan's and applies to it.
    pub(super) fn decode_by_name(&self, blob: &[u8]) -> Result<CursorData, CursorError> {
        let mut c = super::cursor::decode(blob)?;
        self.journal_by_name(&mut c);
        Ok(c)
    }

    /// Rewrites the weights of `c`'s live changes, which a layout 7 blob holds per blob
    /// domain in the blob's order, per domain of this plan, by name: a domain the blob
    /// does not know gets weight 0 in every point, as it had at every step the blob's
    /// run planned (checked by [`Plan::map_domains`]). Every blob of a run that took a
    /// live change carries it for good, so refusing such a journal under a config that
    /// adds a domain refused every later blob of the run: a run that had ever used
    /// `set-weights` could never add a source. A blob that names a domain this plan
    /// lacks, or one twice, is left as it is (refused by name by `map_domains`).
    fn journal_by_name(&self, c: &mut CursorData) {
        let names = self.domain_names();
        let to: Option<Vec<usize>> = (c.domains.iter())
            .map(|r| names.iter().position(|n| *n == r.name))
            .collect();
        let Some(to) = to else { return };
        let mut seen = vec![false; names.len()];
        if c.domains.is_empty() || to.iter().any(|&d| std::mem::replace(&mut seen[d], true)) {
            return;
        }
        if to.len() == names.len() && to.iter().enumerate().all(|(b, &d)| b == d) {
            return;
        }
        for (_, w) in c.journal.iter_mut().flat_map(|ch| ch.points.iter_mut()) {
            // A point of another length is refused by the journal's checks as it is.
            if w.len() == to.len() {
                let mut ours = vec![0.0; names.len()];
                for (b, &d) in to.iter().enumerate() {
                    ours[d] = w[b];
                }
                *w = ours;
            }
        }
    }

    /// Maps a layout 7 blob's domains onto this plan's by name and checks them: each
    /// blob domain exists here with the identity the blob recorded, and each new one has
    /// weight 0 before the blob's step.
    pub(super) fn map_domains(&self, c: &CursorData) -> Result<DomainMap, CursorError> {
        let mut map: DomainMap = vec![None; self.domains.len()];
        for (i, rec) in c.domains.iter().enumerate() {
            let Some(d) = self.domains.iter().position(|d| d.name == rec.name) else {
                return Err(CursorError::DomainGone {
                    domain: rec.name.clone(),
                });
            };
            if map[d].is_some() {
                return Err(CursorError::DuplicateDomain {
                    domain: rec.name.clone(),
                });
            }
            self.check_identity(d, rec)?;
            map[d] = Some(i);
        }
        // A new domain's past is "weight 0": its weights at every knot before the end
        // of what the blob's run planned (a bursty cycle it began included) and at the
        // last step before it pin the piecewise-linear curve there.
        let end = self.first_safe_change(c.plan_step).max(c.plan_step);
        if end > 0 {
            let mut at = vec![0, end - 1];
            at.extend(self.mixer.schedule.knots_before(end));
            // Earliest first: the refusal names the first step that has weight.
            at.sort_unstable();
            at.dedup();
            for (d, _) in map.iter().enumerate().filter(|(_, b)| b.is_none()) {
                if let Some(&step) = at
                    .iter()
                    .find(|&&s| self.mixer.schedule.weights(s)[d] > 0.0)
                {
                    return Err(CursorError::DomainEarly {
                        domain: self.domains[d].name.clone(),
                        step,
                        plan_step: end,
                    });
                }
            }
        }
        Ok(map)
    }

    /// Refuses blob domain `rec` unless domain `d` of this plan has the identity it
    /// recorded; names the shard that changed where the blob's tags tell.
    fn check_identity(&self, d: usize, rec: &DomainRecord) -> Result<(), CursorError> {
        let id = &self.identities[d];
        let known = rec.shards as usize;
        let names = self.shard_names(d);
        let changed = |what: String| CursorError::DomainChanged {
            domain: rec.name.clone(),
            what,
        };
        if known > id.shards() {
            return Err(changed(format!(
                "the blob knew {known} shards, the config lists {}: shards were removed",
                id.shards()
            )));
        }
        if id.matches(known, rec.identity) {
            if known < id.shards() {
                return Err(changed(format!(
                    "the config lists {} shards, the blob knew {known}: shards added to a \
                     running domain (from {}) are not supported; add them as a new domain",
                    id.shards(),
                    names.get(known).map_or("?", |n| n.as_str())
                )));
            }
            return Ok(());
        }
        let shard = id.first_changed(known, &rec.tags);
        Err(changed(match shard {
            // A grouped domain's shard identity includes its .groups.npy sidecar, so a
            // grouping mode turned on or off reads as every shard changing: say so, or
            // an operator goes checking data that is fine.
            Some(k) => format!(
                "shard {} (#{k}) changed content since the blob was written, or the \
                 domain's grouping was turned on or off (a grouped domain's shards count \
                 their .groups.npy sidecars as content)",
                names.get(k).map_or("?", |n| n.as_str())
            ),
            None if rec.tags.len() == known => {
                "its settings changed since the blob was written (or its place among the \
                 bursty domains)"
                    .to_string()
            }
            None => format!(
                "its settings or the content of one of its {known} shards ({} .. {}) changed \
                 since the blob was written",
                names.first().map_or("?", |n| n.as_str()),
                names
                    .get(known.saturating_sub(1))
                    .map_or("?", |n| n.as_str())
            ),
        }))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use crate::config::plan::{DomainSettings, PlanConfig};
    use crate::plan::cursor::{self, CursorError};
    use crate::plan::{DocSource, DomainInput, MemShard, Plan};

    /// Domains `names` over small shards, weighted 1 each.
    fn plan(names: &[&str]) -> Arc<Plan> {
        let w: Vec<String> = names.iter().map(|n| format!("{n} = 1.0")).collect();
        let text = format!(
            "seq_len = 15\nglobal_batch_rows = 4\nseed = 3\nweights = {{ {} }}",
            w.join(", ")
        );
        let cfg = PlanConfig::from_table(&toml::from_str(&text).unwrap()).unwrap();
        let inputs: Vec<DomainInput> = names
            .iter()
            .map(|n| DomainInput {
                name: n.to_string(),
                shards: vec![(
                    format!("{n}/0"),
                    Arc::new(MemShard {
                        lengths: (1..200u32).map(|i| i * 5 % 19 + 1).collect(),
                        groups: None,
                    }) as Arc<dyn DocSource>,
                )],
                settings: DomainSettings::default(),
            })
            .collect();
        Arc::new(Plan::new(&inputs, cfg, 1).unwrap())
    }

    /// The same domains in another order: each continues its own stream and mixer state.
    #[test]
    fn reordered_domains_map_by_name() {
        let ab = plan(&["a", "b"]);
        let ba = plan(&["b", "a"]);
        let at = ab.seek(9);
        let r = ba.restore(&at.cursor()).unwrap();
        assert_eq!(r.stream(0), at.stream(1));
        assert_eq!(r.stream(1), at.stream(0));
        let (m, n) = (r.mix_state(), at.mix_state());
        assert_eq!((m.rows[0], m.deficit[0]), (n.rows[1], n.deficit[1]));
        assert_eq!((m.rows[1], m.deficit[1]), (n.rows[0], n.deficit[0]));
    }

    /// Forged records: a name twice, a name that is not UTF-8.
    #[test]
    fn forged_domain_records_are_refused() {
        let ab = plan(&["a", "b"]);
        let mut c = cursor::decode(&ab.seek(5).cursor()).unwrap();
        c.domains[1].name = "a".into();
        assert_eq!(
            ab.restore(&cursor::encode(&c)).err(),
            Some(CursorError::DuplicateDomain { domain: "a".into() })
        );
        c.domains[1].name = "\u{e9}".into();
        let mut blob = cursor::encode(&c);
        let at = blob.windows(2).position(|w| w == [0xc3, 0xa9]).unwrap();
        blob[at] = 0xff;
        let n = blob.len();
        let sum = xxhash_rust::xxh3::xxh3_64(&blob[..n - 8]);
        blob[n - 8..].copy_from_slice(&sum.to_le_bytes());
        assert_eq!(cursor::decode(&blob).err(), Some(CursorError::Name { at }));
    }
}
