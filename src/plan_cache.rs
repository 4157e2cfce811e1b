//! Planner checkpoints on disk: the [`Checkpoints`] store that `plan --from`, `explain
//! --step` and the daemon's seeks share, so a seek replays at most
//! [`Plan::checkpoint_every`] plan steps once any earlier seek has passed that far.
//!
//! One directory per plan fingerprint, `<root>/plan-checkpoints/<fingerprint>/`, one
//! small file per checkpoint named by its [`CheckpointKey`]. The root is `[corpus]
//! cache_dir` when set, else [`crate::corpus::identity::default_cache_root`] (systemd's
//! `$CACHE_DIRECTORY`, `$XDG_CACHE_HOME/millrace` or
//! `~/.cache/millrace`). Nothing here can make a seek fail or change its result: every
//! blob is checked by [`Plan::restore`] before use, an entry that is refused is dropped
//! with a warning, and a directory that cannot be written costs one warning and the
//! checkpoints it would have held.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tracing::warn;

use crate::config::Config;
use crate::plan::{CheckpointKey, Checkpoints, Plan};

/// Largest checkpoint file read; a cursor blob is a few hundred bytes per domain, so a
/// larger file is not one.
const MAX_BLOB: u64 = 64 << 20;

/// File name suffix of a checkpoint.
const SUFFIX: &str = ".ckpt";

/// Most checkpoint files kept per plan fingerprint: 2^16 of a few hundred bytes each,
/// which at one per 2^16 rows covers 2^32 rows (beyond any run). The bound is what keeps
/// a client's `start_step` (up to `MAX_STEP`) from turning its seek into millions of
/// files; past it a seek still works, it only stops leaving checkpoints behind.
pub const MAX_CHECKPOINTS: u64 = 1 << 16;

/// Checkpoints of one plan kept in files (see the module comment).
pub struct CheckpointDir {
    dir: PathBuf,
    /// Set once a write failed (or the cap was reached) and was reported, so a
    /// read-only or full cache warns once.
    warned: AtomicBool,
    /// Files it may hold ([`MAX_CHECKPOINTS`]).
    cap: u64,
    /// Files it holds, counted from the directory at the first store.
    held: std::sync::OnceLock<AtomicU64>,
}

impl CheckpointDir {
    /// The store for `plan`'s fingerprint under cache root `root`.
    pub fn new(root: &Path, plan: &Plan) -> CheckpointDir {
        CheckpointDir {
            dir: root
                .join("plan-checkpoints")
                .join(format!("{:032x}", plan.fingerprint())),
            warned: AtomicBool::new(false),
            cap: MAX_CHECKPOINTS,
            held: std::sync::OnceLock::new(),
        }
    }

    /// The store for `plan` under `config`'s cache root, if there is one.
    pub fn for_config(config: &Config, plan: &Plan) -> Option<CheckpointDir> {
        cache_root(config).map(|root| CheckpointDir::new(&root, plan))
    }

    /// The directory its files go in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, key: &CheckpointKey) -> PathBuf {
        self.dir.join(format!(
            "{:016x}-{:016x}-{:016x}{SUFFIX}",
            key.plan_step, key.history, key.journal
        ))
    }

    fn write(&self, key: &CheckpointKey, blob: &[u8]) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        let path = self.path(key);
        // Written aside and renamed, so a reader never sees half a blob (and one that
        // did would refuse it by its checksum).
        // Unique per writer: the daemon seeks for several clients at once.
        static WRITES: AtomicU64 = AtomicU64::new(0);
        let tmp = self.dir.join(format!(
            ".{}.{}.{}.tmp",
            path.file_name().and_then(|n| n.to_str()).unwrap_or("ckpt"),
            std::process::id(),
            WRITES.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&tmp, blob)?;
        std::fs::rename(&tmp, &path).inspect_err(|_| {
            let _ = std::fs::remove_file(&tmp);
        })
    }
}

/// Where checkpoints go for `config`: `[corpus] cache_dir`, else the per-user cache
/// directory; `None` when neither is known (no checkpoints are kept).
pub fn cache_root(config: &Config) -> Option<PathBuf> {
    if let Some(dir) = &config.corpus.cache_dir {
        return Some(config.resolve_path(dir));
    }
    crate::corpus::identity::default_cache_root()
}

/// Parses a checkpoint file name back into its key.
fn parse_name(name: &str) -> Option<CheckpointKey> {
    let mut parts = name.strip_suffix(SUFFIX)?.split('-');
    let mut word = || {
        let p = parts.next()?;
        (p.len() == 16).then(|| u64::from_str_radix(p, 16).ok())?
    };
    let key = CheckpointKey {
        plan_step: word()?,
        history: word()?,
        journal: word()?,
    };
    parts.next().is_none().then_some(key)
}

impl Checkpoints for CheckpointDir {
    fn list(&self) -> Vec<CheckpointKey> {
        // A missing or unreadable directory holds no checkpoints; the seek replays.
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        entries
            .filter_map(|e| e.ok()?.file_name().to_str().and_then(parse_name))
            .collect()
    }

    fn has(&self, key: &CheckpointKey) -> bool {
        self.path(key).is_file()
    }

    fn load(&self, key: &CheckpointKey) -> Option<Vec<u8>> {
        let path = self.path(key);
        let read = std::fs::metadata(&path).and_then(|m| {
            if m.len() > MAX_BLOB {
                Err(std::io::Error::other(format!(
                    "{} bytes, more than any checkpoint",
                    m.len()
                )))
            } else {
                std::fs::read(&path)
            }
        });
        match read {
            Ok(blob) => Some(blob),
            // Removed since it was listed (another process dropped it): nothing to say.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => {
                self.refused(key, &e.to_string());
                None
            }
        }
    }

    fn store(&self, key: &CheckpointKey, blob: &[u8]) {
        let held = self
            .held
            .get_or_init(|| AtomicU64::new(self.list().len() as u64));
        if held.load(Ordering::Relaxed) >= self.cap {
            if !self.warned.swap(true, Ordering::Relaxed) {
                warn!(
                    "{} holds {} plan checkpoints, its limit; no more are written (remove \
                     the directory to start over)",
                    self.dir.display(),
                    self.cap
                );
            }
            return;
        }
        match self.write(key, blob) {
            Ok(()) => {
                held.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                if !self.warned.swap(true, Ordering::Relaxed) {
                    warn!(
                        "cannot write plan checkpoints to {}: {e}; seeks replay from step 0",
                        self.dir.display()
                    );
                }
            }
        }
    }

    fn refused(&self, key: &CheckpointKey, why: &str) {
        let path = self.path(key);
        warn!(
            "ignoring plan checkpoint {}: {why}; removed (the seek replays from an earlier one)",
            path.display()
        );
        if std::fs::remove_file(&path).is_ok() {
            if let Some(held) = self.held.get() {
                let _ = held.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                    Some(n.saturating_sub(1))
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store stops writing at its cap (a client's far `start_step` must not fill the
    /// disk with checkpoints), counting what the directory held before it started.
    #[test]
    fn a_store_writes_no_more_than_its_cap() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("fp");
        let store = |cap| CheckpointDir {
            dir: dir.clone(),
            warned: AtomicBool::new(false),
            cap,
            held: std::sync::OnceLock::new(),
        };
        let key = |plan_step| CheckpointKey {
            plan_step,
            history: 1,
            journal: 2,
        };
        let a = store(3);
        for s in 0..10 {
            a.store(&key(s), b"blob");
        }
        assert_eq!(a.list().len(), 3);
        // A later process counts the files already there.
        let b = store(4);
        for s in 10..20 {
            b.store(&key(s), b"blob");
        }
        assert_eq!(b.list().len(), 4);
        // A refused entry frees its place.
        b.refused(&key(0), "test");
        b.store(&key(30), b"blob");
        assert!(b.has(&key(30)));
        assert_eq!(b.list().len(), 4);
    }

    #[test]
    fn names_round_trip_and_strangers_are_ignored() {
        let key = CheckpointKey {
            plan_step: 4096,
            history: u64::MAX,
            journal: 7,
        };
        let name = "0000000000001000-ffffffffffffffff-0000000000000007.ckpt";
        assert_eq!(parse_name(name), Some(key));
        for bad in [
            "0000000000001000-ffffffffffffffff-0000000000000007",
            "1000-ffffffffffffffff-0000000000000007.ckpt",
            "0000000000001000-ffffffffffffffff-0000000000000007-00.ckpt",
            ".0000000000001000-ffffffffffffffff-0000000000000007.ckpt.12.tmp",
            "000000000000100g-ffffffffffffffff-0000000000000007.ckpt",
        ] {
            assert_eq!(parse_name(bad), None, "{bad}");
        }
    }
}
