//! Megatron `.idx` files (with their `.bin`): open (the O(1) checks), the full
//! validation, and every read that the planner and the fill make of an opened shard,
//! validated or not (the daemon plans before its background validation ends). Input:
//! a u16 length L, L bytes of `.bin`, then the `.idx`. A shard that validates must read
//! every document and plan full batches; any that opens must plan without hanging.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use millrace::config::plan::{DomainSettings, PlanConfig};
use millrace::corpus::{DType, LongUnits, Shard};
use millrace::plan::{DocSource, DomainInput, Plan};
use millrace_fuzz::{megatron_files, put, scratch, write_seeds_and_exit_if_asked};

/// The `[plan]` a start would plan the shard with: rows of 16, four a batch.
const PLAN: &str = "seed = 1\nseq_len = 16\nglobal_batch_rows = 4\npacking = \"best_fit\"\n\
                    best_fit_window = 8\nweights = { d = 1.0 }\n";

fn seeds() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for (dtype, docs) in [
        (DType::Uint16, 5),
        (DType::Int32, 3),
        (DType::Uint8, 9),
        (DType::Int64, 2),
        (DType::Float64, 1),
    ] {
        let (idx, bin) = megatron_files(dtype, docs);
        let mut s = (bin.len() as u16).to_le_bytes().to_vec();
        s.extend(&bin);
        s.extend(&idx);
        out.push(s);
    }
    out
}

fuzz_target!(
    init: {
        write_seeds_and_exit_if_asked(seeds);
    },
    |data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let l = u16::from_le_bytes([data[0], data[1]]) as usize;
    let rest = &data[2..];
    let (bin, idx) = rest.split_at(l.min(rest.len()));
    let prefix = scratch().join("shard");
    put(&prefix.with_extension("bin"), bin);
    put(&prefix.with_extension("idx"), idx);
    let Ok(shard) = Shard::open(&prefix, None) else {
        return;
    };
    let valid = shard.validate().is_ok();
    let docs = shard.documents();
    let mut lengths = Vec::new();
    let listed = shard.doc_lengths_into(&mut lengths).is_ok();
    for d in 0..docs.min(64) {
        let len = shard.doc_len(d);
        let tokens = shard.doc_tokens(d);
        if valid {
            let (Ok(len), Ok(tokens)) = (&len, &tokens) else {
                panic!("document {d} of a validated shard: {len:?} {:?}", tokens.as_ref().err());
            };
            assert_eq!(*len, tokens.len() as u64, "document {d}");
        }
        let _ = shard.doc_len_validated(d);
    }
    if valid {
        assert!(listed, "a validated shard lists its lengths");
        assert_eq!(lengths.iter().sum::<u64>(), shard.tokens());
    }
    let _ = shard.identity();
    let _ = LongUnits::of_shard(&shard, 3);
    // What a start does with it: a plan over the shard, three batches.
    let src: Arc<dyn DocSource> = Arc::new(shard);
    let inputs = [DomainInput {
        name: "d".into(),
        shards: vec![("d/shard".into(), src)],
        settings: DomainSettings::default(),
    }];
    let cfg: PlanConfig = toml::from_str(PLAN).expect("the plan table parses");
    if let Ok(plan) = Plan::new(&inputs, cfg, 1) {
        let mut p = Arc::new(plan).start();
        for _ in 0..3 {
            let rows = p.next_batch().rows.len();
            // Documents that fail their check read as 0 tokens: fewer rows, or none.
            assert!(rows == 4 || !valid, "a validated shard planned {rows} rows of 4");
        }
    }
});
