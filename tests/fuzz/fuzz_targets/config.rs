//! The config file (TOML) as every command reads it: parsed and checked
//! (`Config::from_bytes`), its `[serve]` and `[plan]` tables validated, and a plan built
//! from it over small in-memory shards (one per domain, grouped), which must then plan
//! full batches: a config that passes its checks must not panic or hang the planner.
#![no_main]

use std::path::Path;
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use millrace::config::{serve::ServeConfig, Config};
use millrace::corpus::GroupRun;
use millrace::plan::{DocSource, DomainInput, MemShard, Plan};
use millrace_fuzz::write_seeds_and_exit_if_asked;

const SMALL: &str = r#"
[corpus]
[[corpus.domain]]
name = "web"
shards = ["web/part-0"]
[[corpus.domain]]
name = "code"
shards = ["code/*.idx"]
grouping = { mode = "batch", max_share = 0.25 }
upsample_long = { min_tokens = 40, factor = 3 }
[[corpus.domain]]
name = "raw"
shards = ["raw.bin"]
format = "raw"
raw = { dtype = "uint16", eos = 0 }
bursty = { period = 2 }
window = 8

[plan]
seed = 7
seq_len = 32
global_batch_rows = 8
packing = "best_fit"
best_fit_window = 16
eod_token = 0
skip = [{ steps = [3, 4] }]
reseed = [{ step = 6, seed = 9 }]
[[plan.schedule]]
step = 0
weights = { web = 2, code = 1, raw = 1 }
[[plan.schedule]]
step = 5
weights = { web = 1, code = 1, raw = 2 }
[[plan.stage]]
step = 4
seq_len = 64
global_batch_rows = 4
chain_groups = true
upsample_long = { code = "off" }

[serve]
ring_slots = 2
token_dtype = "int32"
"#;

fn seeds() -> Vec<Vec<u8>> {
    let example = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../config/millrace.example.toml"
    );
    let mut out = vec![SMALL.as_bytes().to_vec()];
    if let Ok(b) = std::fs::read(example) {
        out.push(b);
    }
    out.push(
        b"[corpus]\n[[corpus.domain]]\nname = \"a\"\nshards = [\"a\"]\n[plan]\nseed = 1\n\
          seq_len = 16\nglobal_batch_rows = 2\nweights = { a = 1 }\npacking = \"concat\"\n"
            .to_vec(),
    );
    out
}

fn shard(salt: u64) -> Arc<dyn DocSource> {
    let lengths: Vec<u32> = (0..40u64)
        .map(|d| 1 + ((d + 1) * 2_654_435_761 ^ salt * 40_503) as u32 % 90)
        .collect();
    let groups = (0..40u64)
        .step_by(4)
        .map(|first| GroupRun {
            id: first,
            first_doc: first,
            docs: 4,
        })
        .collect();
    Arc::new(MemShard {
        lengths,
        groups: Some(groups),
    })
}

fuzz_target!(
    init: {
        write_seeds_and_exit_if_asked(seeds);
    },
    |data: &[u8]| {
    let Ok(cfg) = Config::from_bytes(Path::new("/fuzz/millrace.toml"), data.to_vec()) else {
        return;
    };
    let _ = ServeConfig::from_config(&cfg);
    let Ok(plan_cfg) = cfg.plan_config() else {
        return;
    };
    let inputs: Vec<DomainInput> = cfg
        .corpus
        .domains
        .iter()
        .enumerate()
        .map(|(i, d)| DomainInput {
            name: d.name.clone(),
            shards: vec![(format!("{}/0", d.name), shard(i as u64))],
            settings: d.settings,
        })
        .collect();
    let Ok(plan) = Plan::new(&inputs, plan_cfg, 1) else {
        return;
    };
    let plan = Arc::new(plan);
    let mut p = plan.start();
    for _ in 0..2 {
        let g = p.next_batch();
        assert!(!g.rows.is_empty());
    }
    let blob = p.cursor();
    assert!(plan.restore(&blob).is_ok(), "a plan restores its own cursor");
});
