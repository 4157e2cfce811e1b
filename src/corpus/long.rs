//! The long units of `upsample_long`, listed per shard and cached beside the shard's
//! identity entry, so that a start that upsamples stays O(shards + long units) instead of
//! reading every document length of the domain (issue 16, item 1; docs/DESIGN.md,
//! "Start in time proportional to shards").
//!
//! A list depends only on the shard's document lengths (and group runs) and the
//! threshold. The identity cache already decides whether an entry still describes the
//! files (stamps and sampled pages); a list file is used only with an identity the cache
//! trusts, and records that identity's index hash, documents, tokens, runs and threshold,
//! so it is never paired with another state of the shard. Anything that does not match
//! costs one pass over the lengths, as every start did before, and a rewrite.

use std::path::{Path, PathBuf};

use super::identity::{write_atomically, Miss};
use super::{GroupRun, Shard, ShardIdentity};

/// What a list file starts with; the digit is its version.
const MAGIC: &[u8; 8] = b"MRLONG01";
/// Words of the key that follows the magic.
const KEY_WORDS: usize = 6;

/// The units of one shard longer than a threshold: what upsampling repeats.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LongUnits {
    /// A unit is long when it has more than this many tokens (`upsample_long.min_tokens`).
    pub min_tokens: u64,
    /// Long documents, ascending, numbered within the shard.
    pub docs: Vec<u64>,
    /// Long groups (indexes into the shard's runs), ascending, when the shard has groups.
    pub groups: Option<Vec<u64>>,
}

/// A document source with its long units listed beforehand, so that the planner takes
/// the lists instead of reading every length (the planner reads it as a `DocSource`).
#[derive(Debug, Clone)]
pub struct Listed<S> {
    /// The shard (or any source of the same lengths).
    pub source: S,
    /// Its long units, one list per threshold the plan asks for (a domain's own
    /// `upsample_long`, a stage's); each must be what [`LongUnits::scan`] gives for
    /// `source` at its threshold.
    pub long: Vec<LongUnits>,
}

impl LongUnits {
    /// One pass over `documents` lengths (`len(doc)`) and the group `runs`: the planner's
    /// own definition of a long unit (more than `min_tokens` tokens).
    pub fn scan(
        min_tokens: u64,
        documents: u64,
        runs: Option<&[GroupRun]>,
        len: impl Fn(u64) -> u64,
    ) -> LongUnits {
        let docs = (0..documents).filter(|&d| len(d) > min_tokens).collect();
        let groups = runs.map(|runs| {
            let group_len =
                |r: &GroupRun| (r.first_doc..r.first_doc + r.docs).map(&len).sum::<u64>();
            (0..runs.len() as u64)
                .filter(|&g| group_len(&runs[g as usize]) > min_tokens)
                .collect()
        });
        LongUnits {
            min_tokens,
            docs,
            groups,
        }
    }

    /// [`LongUnits::scan`] of an opened shard, with the reads the planner makes (a
    /// corrupt length reads as 0 and poisons the shard, naming the document).
    pub fn of_shard(shard: &Shard, min_tokens: u64) -> LongUnits {
        let runs = shard.groups().map(|g| g.runs());
        LongUnits::scan(min_tokens, shard.documents(), runs, |d| {
            shard.doc_len_validated(d)
        })
    }

    /// The file's bytes (docs/FORMATS.md, "Identity cache"): [`MAGIC`], the key, the
    /// two list lengths, the lists, and an xxh3-64 of everything before it, as
    /// little-endian u64s.
    fn encode(&self, key: &[u64; KEY_WORDS]) -> Vec<u8> {
        let groups = self.groups.as_deref().unwrap_or(&[]);
        let words = key.len() + 2 + self.docs.len() + groups.len();
        let mut out = Vec::with_capacity(16 + 8 * words);
        out.extend_from_slice(MAGIC);
        let lens = [self.docs.len() as u64, groups.len() as u64];
        for w in key.iter().chain(&lens).chain(&self.docs).chain(groups) {
            out.extend_from_slice(&w.to_le_bytes());
        }
        let sum = xxhash_rust::xxh3::xxh3_64(&out);
        out.extend_from_slice(&sum.to_le_bytes());
        out
    }

    /// Reads [`LongUnits::encode`]'s bytes back: `None` when they were written for
    /// another key (another state of the shard, an ordinary miss), an error saying why
    /// when they are not such a file. Either costs a scan, never a wrong plan.
    fn decode(bytes: &[u8], key: &[u64; KEY_WORDS]) -> Result<Option<LongUnits>, String> {
        let head = 8 + 8 * (KEY_WORDS + 2);
        if bytes.len() < head + 8 || &bytes[..8] != MAGIC {
            return Err(format!("not a long-unit list ({} bytes)", bytes.len()));
        }
        let word = |i: usize| super::le_u64(bytes, 8 + 8 * i);
        let body = &bytes[..bytes.len() - 8];
        if xxhash_rust::xxh3::xxh3_64(body) != super::le_u64(bytes, body.len()) {
            return Err("checksum mismatch".into());
        }
        if (0..KEY_WORDS).any(|i| word(i) != key[i]) {
            return Ok(None);
        }
        let (nd, ng) = (word(KEY_WORDS), word(KEY_WORDS + 1));
        let want = nd.checked_add(ng).and_then(|n| n.checked_mul(8));
        if want != Some((body.len() - head) as u64) {
            return Err(format!("{} bytes for {nd} + {ng} units", bytes.len()));
        }
        let list = |from: u64, n: u64| -> Vec<u64> {
            (from..from + n)
                .map(|i| word(KEY_WORDS + 2 + i as usize))
                .collect()
        };
        let (docs, groups) = (list(0, nd), list(nd, ng));
        let (documents, runs) = (key[1], key[4]);
        let fits = |l: &[u64], end: u64| {
            l.windows(2).all(|w| w[0] < w[1]) && l.last().is_none_or(|&u| u < end)
        };
        if !fits(&docs, documents) || !fits(&groups, runs) {
            return Err("a list is not ascending within the shard".into());
        }
        Ok(Some(LongUnits {
            min_tokens: key[0],
            docs,
            groups: (runs != NO_RUNS).then_some(groups),
        }))
    }
}

/// The key's runs word for a shard without groups.
const NO_RUNS: u64 = u64::MAX;

/// What a list file must have been written for: the threshold, and the shard's state as
/// its trusted identity and runs say.
fn key(shard: &Shard, id: &ShardIdentity, min_tokens: u64) -> [u64; KEY_WORDS] {
    let (runs, runs_sum) = match shard.groups() {
        Some(g) => (
            g.len() as u64,
            super::Groups::encoded_sum(&g.encode()).unwrap_or_default(),
        ),
        None => (NO_RUNS, 0),
    };
    // decode reads the documents at 1 and the runs at 4.
    [
        min_tokens,
        id.documents,
        id.tokens,
        xxhash_rust::xxh3::xxh3_64(id.index_hash.as_bytes()),
        runs,
        runs_sum,
    ]
}

/// The list file for `min_tokens` beside the identity entry at `entry`.
fn list_path(entry: &Path, min_tokens: u64) -> PathBuf {
    entry.with_extension(format!("long-{min_tokens}"))
}

/// The cached list of `shard` for `min_tokens`, if the file beside the entry at `entry`
/// was written for the state `id` (a trusted identity) and the shard's runs describe.
pub(super) fn lookup(
    entry: &Path,
    shard: &Shard,
    id: &ShardIdentity,
    min_tokens: u64,
) -> Result<LongUnits, Miss> {
    let path = list_path(entry, min_tokens);
    let bytes = crate::util::read_regular(&path, None).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Miss::Absent,
        _ => Miss::Unreadable(format!("{}: {e}", path.display())),
    })?;
    match LongUnits::decode(&bytes, &key(shard, id, min_tokens)) {
        Ok(Some(long)) => Ok(long),
        Ok(None) => Err(Miss::Stale),
        Err(why) => Err(Miss::Unreadable(format!("{}: {why}", path.display()))),
    }
}

/// The list of `shard` for `min_tokens`: cached beside the entry at `entry` (if any),
/// else scanned and written there. A scan that found a corrupt length (the shard is
/// poisoned) is not written: the next start must find the corruption again.
pub(super) fn cached(
    entry: Option<&Path>,
    shard: &Shard,
    id: &ShardIdentity,
    min_tokens: u64,
) -> LongUnits {
    let found = match entry {
        Some(at) => lookup(at, shard, id, min_tokens),
        None => Err(Miss::Absent),
    };
    match found {
        Ok(l) => l,
        Err(miss) => {
            if let Miss::Unreadable(why) = &miss {
                tracing::warn!("identity cache: {why}; scanning the lengths and rewriting it");
            }
            let long = LongUnits::of_shard(shard, min_tokens);
            if let (Some(at), None) = (entry, shard.poisoned()) {
                let path = list_path(at, min_tokens);
                let bytes = long.encode(&key(shard, id, min_tokens));
                if let Err(e) = write_atomically(&path, &bytes) {
                    tracing::warn!("{}: cannot write the long-unit list: {e}", path.display());
                }
            }
            long
        }
    }
}
