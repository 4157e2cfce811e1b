//! Plan checkpoints kept as the daemon serves (issue 16): when a job's planner passes a
//! multiple of [`Plan::checkpoint_every`], its cursor there is offered to the
//! checkpoint store that seeks use (`crate::plan_cache`), so a trainer or `explain`
//! seeking late in a long run restores a recent checkpoint instead of replaying from
//! step 0.
//!
//! The copy path never waits for the disk: the planner's blob (encoded anyway for the
//! slot) goes over a bounded channel to a thread of its own, which names it and writes
//! it; an offer that finds the channel full is dropped, since a checkpoint only ever
//! saves time.

use std::path::PathBuf;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;

use tracing::warn;

use crate::plan::{Checkpoints, Plan};
use crate::plan_cache::CheckpointDir;

/// Offers waiting for the writer at most: one is made every few hundred steps, so a
/// full queue means a stuck disk.
const QUEUE: usize = 16;

/// A planner's state at a checkpoint step, on its way to the store.
struct Offer {
    plan: Arc<Plan>,
    plan_step: u64,
    blob: Vec<u8>,
}

/// The daemon's side of the checkpoint writer: offers states, never blocks.
pub(super) struct Keeper {
    tx: Option<SyncSender<Offer>>,
}

impl Keeper {
    /// A keeper writing under cache root `root`; without one (or when its thread cannot
    /// start, which is warned about) offers are dropped.
    pub(super) fn start(root: Option<PathBuf>) -> Keeper {
        let Some(root) = root else {
            return Keeper { tx: None };
        };
        let (tx, rx) = sync_channel(QUEUE);
        let spawned = std::thread::Builder::new()
            .name("millrace-ckpt".into())
            .spawn(move || write_offers(&root, rx));
        match spawned {
            Ok(_) => Keeper { tx: Some(tx) },
            Err(e) => {
                warn!("cannot start the plan checkpoint writer ({e}); the daemon keeps none as it serves");
                Keeper { tx: None }
            }
        }
    }

    /// Offers the state of a planner that has just planned the batch before plan step
    /// `plan_step`, with `blob` its cursor: kept when `plan_step` is a multiple of the
    /// plan's checkpoint interval.
    pub(super) fn offer(&self, plan: &Arc<Plan>, plan_step: u64, blob: &[u8]) {
        let Some(tx) = &self.tx else {
            return;
        };
        if plan_step == 0 || plan_step % plan.checkpoint_every() != 0 {
            return;
        }
        // Full: the writer is behind (a slow disk); this one is dropped.
        let _ = tx.try_send(Offer {
            plan: plan.clone(),
            plan_step,
            blob: blob.to_vec(),
        });
    }
}

/// The writer thread: stores each offer not already held, under the directory of its
/// plan's fingerprint. Ends when the hub goes.
fn write_offers(root: &std::path::Path, rx: Receiver<Offer>) {
    let mut dir: Option<(u128, CheckpointDir)> = None;
    for o in rx {
        let fp = o.plan.fingerprint();
        if dir.as_ref().is_none_or(|(f, _)| *f != fp) {
            dir = Some((fp, CheckpointDir::new(root, &o.plan)));
        }
        let Some((_, store)) = &dir else {
            continue;
        };
        let key = o.plan.checkpoint_key(o.plan_step);
        if !store.has(&key) {
            store.store(&key, &o.blob);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::atomic::AtomicBool;

    use super::*;
    use crate::config::plan::PlanConfig;
    use crate::plan::{DocSource, DomainInput, MemCheckpoints, MemShard};

    /// Two domains, one of them bursty, so the key's lookahead is not zero.
    fn plan() -> Arc<Plan> {
        let input = |name: &str, len: u32, bursty: bool| {
            let shard: Arc<dyn DocSource> = Arc::new(MemShard {
                lengths: vec![len; 300],
                groups: None,
            });
            let mut settings = crate::config::plan::DomainSettings::default();
            if bursty {
                settings.bursty = Some(crate::config::plan::Bursty { period: 3 });
            }
            DomainInput {
                name: name.into(),
                shards: vec![(format!("{name}/0"), shard)],
                settings,
            }
        };
        let cfg = PlanConfig {
            seed: 3,
            seq_len: 16,
            global_batch_rows: 4,
            packing: Default::default(),
            best_fit_window: 64,
            eod_token: None,
            pad_token: 0,
            vocab_size: None,
            // b is bursty with period 3: at most a third of the rows may be its.
            weights: Some([("a".to_string(), 4.0), ("b".to_string(), 1.0)].into()),
            schedule: Vec::new(),
            skip: Vec::new(),
            reseed: Vec::new(),
            stage: Vec::new(),
        };
        let inputs = [input("a", 10, false), input("b", 23, true)];
        Arc::new(Plan::new(&inputs, cfg, 1).expect("a two-domain plan builds"))
    }

    /// What a serving planner offers at a checkpoint step is what a checkpointed seek
    /// stores there: the same key and the same bytes, so the seek finds the daemon's.
    #[test]
    fn a_serving_planner_offers_what_a_seek_would_store() {
        let plan = plan();
        let every = 8;
        let seek = MemCheckpoints::new();
        plan.seek_checkpointed(40, 3, every, &seek, &AtomicBool::new(false))
            .expect("not cancelled");
        let stored = seek.blobs();
        assert_eq!(stored.len(), 5, "checkpoints at 8, 16, ... 40");
        let mut served = BTreeMap::new();
        let mut p = plan.start();
        while p.step() < 40 {
            p.next_batch();
            if p.plan_step() % every == 0 {
                served.insert(plan.checkpoint_key(p.plan_step()), p.cursor());
            }
        }
        assert_eq!(served, stored);
    }
}
