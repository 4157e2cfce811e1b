//! The plans whose cursor blobs the decoder tests forge, shared by tests/decoders.rs
//! and the fuzzer's `cursor` target (tests/fuzz): plans with every feature a blob
//! records, and the sealing that lets an edited blob past its length and checksum.

use std::collections::BTreeMap;
use std::sync::Arc;

use millrace::config::plan::{
    Bursty, DomainSettings, GroupMode, Grouping, Packing, PlanConfig, Reseed, Skip, Stage, Upsample,
};
use millrace::corpus::GroupRun;
use millrace::plan::{DocSource, DomainInput, MemShard, Plan};
use rand::{Rng, SeedableRng};
use rand_pcg::Pcg64;

/// A domain of two shards of `docs` documents with lengths around `cap`, in groups.
fn domain(rng: &mut Pcg64, name: &str, docs: usize, cap: u32, s: DomainSettings) -> DomainInput {
    let shards = (0..2)
        .map(|i| {
            let lengths: Vec<u32> = (0..docs)
                .map(|_| match rng.gen_range(0..10) {
                    0 => rng.gen_range(cap..4 * cap),
                    _ => rng.gen_range(1..cap),
                })
                .collect();
            // Groups of three documents (the last one shorter).
            let docs = docs as u64;
            let groups = (0..docs)
                .step_by(3)
                .map(|first| GroupRun {
                    id: 1000 + first,
                    first_doc: first,
                    docs: 3.min(docs - first),
                })
                .collect();
            let src: Arc<dyn DocSource> = Arc::new(MemShard {
                lengths,
                groups: Some(groups),
            });
            (format!("{name}/shard{i}"), src)
        })
        .collect();
    DomainInput {
        name: name.to_string(),
        shards,
        settings: s,
    }
}

fn grouped(mode: GroupMode) -> DomainSettings {
    DomainSettings {
        grouping: Grouping {
            mode,
            ..Grouping::default()
        },
        ..DomainSettings::default()
    }
}

/// Plans with every feature a blob records: grouping tails, bursty and upsampled
/// domains, skips, reseeds, a stage switch with its carry levels and a live journal.
pub fn plans() -> Vec<Arc<Plan>> {
    let mut rng = Pcg64::seed_from_u64(0xdec0de);
    let cap = 24;
    let mut up = grouped(GroupMode::Off);
    up.upsample_long = Some(Upsample {
        min_tokens: 30,
        factor: 2,
    });
    let mut bursty = grouped(GroupMode::Sequence);
    bursty.bursty = Some(Bursty { period: 3 });
    let inputs = vec![
        domain(&mut rng, "web", 60, cap, grouped(GroupMode::Off)),
        domain(&mut rng, "code", 60, cap, grouped(GroupMode::Batch)),
        domain(&mut rng, "books", 40, cap, bursty),
        domain(&mut rng, "long", 40, cap, up),
    ];
    let weights: BTreeMap<String, f64> =
        [("web", 3.0), ("code", 2.0), ("books", 1.0), ("long", 1.0)]
            .iter()
            .map(|(n, w)| (n.to_string(), *w))
            .collect();
    let cfg = PlanConfig {
        seed: 3,
        seq_len: cap,
        global_batch_rows: 16,
        packing: Packing::BestFit,
        best_fit_window: 16,
        eod_token: None,
        pad_token: 0,
        vocab_size: None,
        weights: Some(weights.clone()),
        schedule: Vec::new(),
        skip: vec![Skip { steps: [7, 8] }],
        reseed: vec![Reseed { step: 12, seed: 5 }],
        stage: Vec::new(),
    };
    let plain = Arc::new(Plan::new(&inputs, cfg.clone(), 1).expect("plan builds"));
    let mut staged_cfg = cfg.clone();
    staged_cfg.stage = vec![Stage {
        step: 10,
        seq_len: 2 * cap,
        global_batch_rows: 8,
        best_fit_window: None,
        chain_groups: true,
        upsample_long: BTreeMap::new(),
    }];
    let staged = Arc::new(Plan::new(&inputs, staged_cfg, 1).expect("staged plan builds"));
    // A live journal: a weights change and a stage change.
    let w: BTreeMap<String, f64> = [("web".to_string(), 0.5)].into();
    let journal = vec![
        plain.weights_change(5, &w).expect("weights change"),
        plain.stage_change(9, 2 * cap, 8, None, false),
    ];
    let live = Arc::new(plain.with_journal(journal).expect("journal applies"));
    vec![plain, staged, live]
}

/// `blob` with its length field and checksum made right again (docs/FORMATS.md).
pub fn seal(mut blob: Vec<u8>) -> Vec<u8> {
    if blob.len() < 24 {
        return blob;
    }
    let len = blob.len() as u32;
    blob[12..16].copy_from_slice(&len.to_le_bytes());
    let body = blob.len() - 8;
    let sum = xxhash_rust::xxh3::xxh3_64(&blob[..body]);
    blob[body..].copy_from_slice(&sum.to_le_bytes());
    blob
}
