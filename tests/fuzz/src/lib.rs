//! What the fuzz targets share: the plans a cursor blob is judged under, the sealing
//! that lets mutated blobs past their checksum, scratch files on tmpfs, and the seed
//! inputs each target starts from (valid bytes from the project's own writers), written
//! when `MILLRACE_FUZZ_SEEDS` names a directory (see `scripts/fuzz`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use millrace::config::plan::{
    Bursty, DomainSettings, GroupMode, Grouping, Packing, PlanConfig, Reseed, Skip, Stage, Upsample,
};
use millrace::corpus::{DType, GroupRun, MegatronWriter};
use millrace::plan::{DocSource, DomainInput, MemShard, Plan};

/// Writes `seeds()` into `$MILLRACE_FUZZ_SEEDS` and exits, when that is set: how a
/// target's corpus directory gets its first inputs without a second build.
pub fn write_seeds_and_exit_if_asked(seeds: impl FnOnce() -> Vec<Vec<u8>>) {
    let Some(dir) = std::env::var_os("MILLRACE_FUZZ_SEEDS") else {
        return;
    };
    let dir = PathBuf::from(dir);
    std::fs::create_dir_all(&dir).expect("seed directory");
    let seeds = seeds();
    for (i, s) in seeds.iter().enumerate() {
        std::fs::write(dir.join(format!("seed-{i:03}")), s).expect("seed written");
    }
    eprintln!("{} seeds written to {}", seeds.len(), dir.display());
    std::process::exit(0);
}

/// A scratch directory on tmpfs (`/dev/shm` where there is one), for decoders that read
/// files: each exec rewrites its files there instead of touching a disk.
pub fn scratch() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let shm = Path::new("/dev/shm");
        let base = if shm.is_dir() {
            shm.to_path_buf()
        } else {
            std::env::temp_dir()
        };
        tempfile::Builder::new()
            .prefix("millrace-fuzz-")
            .tempdir_in(base)
            .expect("scratch directory")
    })
    .path()
}

/// `blob` with its length field and checksum made right (docs/FORMATS.md, cursor blob),
/// so that the fuzzer's edits reach the structural checks behind them.
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

/// One domain of two in-memory shards, `docs` documents each of lengths 1..`4 * cap`,
/// in groups of three.
fn domain(salt: u32, name: &str, docs: u32, cap: u32, settings: DomainSettings) -> DomainInput {
    let shards = (0..2u32)
        .map(|i| {
            let lengths: Vec<u32> = (0..docs)
                .map(|d| {
                    let h = (d + 1).wrapping_mul(2_654_435_761) ^ (salt + i).wrapping_mul(40_503);
                    if h % 10 == 0 {
                        cap + h % (3 * cap)
                    } else {
                        1 + h % (cap - 1)
                    }
                })
                .collect();
            let groups = (0..u64::from(docs))
                .step_by(3)
                .map(|first| GroupRun {
                    id: 1000 + first,
                    first_doc: first,
                    docs: 3.min(u64::from(docs) - first),
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
        settings,
    }
}

fn settings(mode: GroupMode) -> DomainSettings {
    DomainSettings {
        grouping: Grouping {
            mode,
            ..Grouping::default()
        },
        ..DomainSettings::default()
    }
}

/// Plans whose blobs record every feature a blob can: grouping tails, a bursty and an
/// upsampled domain, a skip, a reseed, a stage switch, and a live journal (weights and
/// stage changes). Built once per process.
pub fn plans() -> &'static [Arc<Plan>] {
    static PLANS: OnceLock<Vec<Arc<Plan>>> = OnceLock::new();
    PLANS.get_or_init(|| {
        let cap = 24;
        let mut long = settings(GroupMode::Off);
        long.upsample_long = Some(Upsample {
            min_tokens: 30,
            factor: 2,
        });
        let mut bursty = settings(GroupMode::Sequence);
        bursty.bursty = Some(Bursty { period: 3 });
        let inputs = vec![
            domain(1, "web", 60, cap, settings(GroupMode::Off)),
            domain(2, "code", 60, cap, settings(GroupMode::Batch)),
            domain(3, "books", 40, cap, bursty),
            domain(4, "long", 40, cap, long),
        ];
        let weights: BTreeMap<String, f64> = [("web", 3.0), ("code", 2.0), ("books", 1.0)]
            .iter()
            .map(|(n, w)| (n.to_string(), *w))
            .chain([("long".to_string(), 1.0)])
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
            weights: Some(weights),
            schedule: Vec::new(),
            skip: vec![Skip { steps: [7, 8] }],
            reseed: vec![Reseed { step: 12, seed: 5 }],
            stage: Vec::new(),
        };
        let plain = Arc::new(Plan::new(&inputs, cfg.clone(), 1).expect("plan builds"));
        let mut staged = cfg;
        staged.stage = vec![Stage {
            step: 10,
            seq_len: 2 * cap,
            global_batch_rows: 8,
            best_fit_window: None,
            chain_groups: true,
            upsample_long: BTreeMap::new(),
        }];
        let staged = Arc::new(Plan::new(&inputs, staged, 1).expect("staged plan builds"));
        let w: BTreeMap<String, f64> = [("web".to_string(), 0.5)].into();
        let journal = vec![
            plain.weights_change(5, &w).expect("weights change"),
            plain.stage_change(9, 2 * cap, 8, None, false),
        ];
        let live = Arc::new(plain.with_journal(journal).expect("journal applies"));
        vec![plain, staged, live]
    })
}

/// Real cursor blobs of every plan at a few steps (past the skip, reseed and stage
/// switch too), each behind the selector byte of the `cursor` target.
pub fn cursor_seeds() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for (i, plan) in plans().iter().enumerate() {
        let mut p = plan.start();
        for s in 0..20 {
            if s % 4 == 1 || s == 13 || s == 19 {
                for mode in 0..4u8 {
                    let mut seed = vec![(i as u8) | (mode << 2)];
                    seed.extend(p.cursor());
                    out.push(seed);
                }
            }
            p.next_batch();
        }
    }
    out
}

/// The `.idx` and `.bin` of a small Megatron shard of `dtype` written by
/// [`MegatronWriter`]: `docs` documents of 1..=7 tokens.
pub fn megatron_files(dtype: DType, docs: u64) -> (Vec<u8>, Vec<u8>) {
    let prefix = scratch().join(format!("seed-{}-{docs}", dtype.name()));
    let mut w = MegatronWriter::create(&prefix, dtype).expect("writer");
    for d in 0..docs {
        let n = 1 + (d * 5 + 3) % 7;
        let bytes: Vec<u8> = (0..n * dtype.size() as u64)
            .map(|b| (b + d) as u8 & 0x3f)
            .collect();
        w.add_document_bytes(&bytes).expect("document");
    }
    w.finish().expect("finish");
    let idx = std::fs::read(prefix.with_extension("idx")).expect("idx");
    let bin = std::fs::read(prefix.with_extension("bin")).expect("bin");
    (idx, bin)
}

/// Writes `bytes` to `path`, replacing what was there (a fresh inode, as a writer's
/// rename gives, so no mapping of the old file sees the new bytes).
pub fn put(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("fuzztmp");
    std::fs::write(&tmp, bytes).expect("scratch write");
    std::fs::rename(&tmp, path).expect("scratch rename");
}
