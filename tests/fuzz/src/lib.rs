//! What the fuzz targets share: the plans a cursor blob is judged under and the sealing
//! that lets mutated blobs past their checksum (tests/common/blobs.rs), scratch files
//! on tmpfs, and the seed inputs each target starts from (valid bytes from the
//! project's own writers), written when `MILLRACE_FUZZ_SEEDS` names a directory (see
//! `scripts/fuzz`).

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use millrace::corpus::{DType, MegatronWriter};
use millrace::plan::Plan;

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

/// The plans of tests/decoders.rs (every feature a blob records: grouping tails, a
/// bursty and an upsampled domain, a skip, a reseed, a stage switch, a live journal),
/// and the sealing that lets the fuzzer's edits of a blob reach its structural checks.
#[path = "../../common/blobs.rs"]
mod blobs;
pub use blobs::seal;

/// [`blobs::plans`], built once per process.
pub fn plans() -> &'static [Arc<Plan>] {
    static PLANS: OnceLock<Vec<Arc<Plan>>> = OnceLock::new();
    PLANS.get_or_init(blobs::plans)
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
