//! Cursor blobs (a trainer's checkpoint, handed back in HELLO) and plan checkpoint
//! blobs (read by a seek from the plan cache). Byte 0 picks the plan (low 2 bits) and
//! the path (bits 2-3: `Plan::resume`, `Plan::restore` and `restore_alike`, a seek
//! that finds the blob as a checkpoint, a seek that finds it written under another
//! journal); bit 4 leaves the blob unsealed. A blob that is accepted must give a
//! planner that keeps producing full batches.
#![no_main]

use std::sync::atomic::AtomicBool;

use libfuzzer_sys::fuzz_target;
use millrace::plan::{cursor, CheckpointKey, Checkpoints, MemCheckpoints};
use millrace_fuzz::{cursor_seeds, plans, seal, write_seeds_and_exit_if_asked};

fuzz_target!(
    init: {
        write_seeds_and_exit_if_asked(cursor_seeds);
        plans();
    },
    |data: &[u8]| {
    let Some((&sel, blob)) = data.split_first() else {
        return;
    };
    let plans = plans();
    let plan = &plans[(sel & 3) as usize % plans.len()];
    let blob = if sel & 0x10 != 0 {
        blob.to_vec()
    } else {
        seal(blob.to_vec())
    };
    let rows = |p: &mut millrace::plan::Planner| {
        for _ in 0..3 {
            let g = p.next_batch();
            assert!(!g.rows.is_empty(), "an accepted blob plans empty batches");
        }
    };
    match (sel >> 2) & 3 {
        0 => {
            if let Ok(r) = plan.resume(&blob, 1 << 16) {
                let mut p = r.planner;
                rows(&mut p);
            }
        }
        1 => {
            if let Ok(mut p) = plan.restore(&blob) {
                rows(&mut p);
            }
            if let Ok(mut p) = plan.restore_alike(&blob) {
                rows(&mut p);
            }
        }
        mode => {
            // The blob as the checkpoint file of its own plan step (under this plan's
            // journal, or another one's), found by a seek a few steps past it.
            let Ok(c) = cursor::decode(&blob) else {
                return;
            };
            if c.plan_step == 0 || c.plan_step > 40 {
                return;
            }
            let mut key: CheckpointKey = plan.checkpoint_key(c.plan_step);
            if mode == 3 {
                key.journal ^= 0x5a5a;
            }
            let store = MemCheckpoints::new();
            store.put(key, blob);
            let target = plan.trainer_step_of(c.plan_step) + 2;
            let cancel = AtomicBool::new(false);
            if let Some(mut p) = plan.seek_checkpointed(target, 4, 4, &store, &cancel) {
                rows(&mut p);
            }
            let _ = store.list();
        }
    }
});
