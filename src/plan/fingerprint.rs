//! The plan fingerprint: a 128-bit identity of the corpus and the static plan config,
//! which every cursor blob carries so that a blob is never resumed on data it was not
//! made for.

use super::{DomainInput, PlanConfig};

pub(super) fn fingerprint(cfg: &PlanConfig, inputs: &[DomainInput], manifest: u128) -> u128 {
    // Only what shapes every step: not the schedule, skips or reseeds (the history digest
    // covers those up to a cursor's step, so the future may be edited).
    let static_part = serde_json::json!({
        "seed": cfg.seed,
        "seq_len": cfg.seq_len,
        "global_batch_rows": cfg.global_batch_rows,
        "packing": cfg.packing,
        "window": cfg.best_fit_window,
        "domains": inputs.iter().map(|d| serde_json::json!({
            "name": d.name,
            "settings": d.settings,
            // Documents and tokens per shard (O(shards)): a blob from a corpus with
            // other lengths is refused even if the caller's manifest missed it.
            "shards": d.shards.iter().map(|(_, s)| [s.documents(), s.tokens()]).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        // Layout 2 only added the journal; blobs of layout 1 still resume.
        "layout": 1u16,
    });
    let mut bytes = manifest.to_le_bytes().to_vec();
    bytes.extend_from_slice(static_part.to_string().as_bytes());
    xxhash_rust::xxh3::xxh3_128(&bytes)
}
