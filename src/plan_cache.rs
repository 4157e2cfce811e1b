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
//!
//! A directory holds at most [`MAX_CHECKPOINTS`] files and [`MAX_CHECKPOINT_BYTES`]
//! bytes. A store that would pass either is thinned evenly: the spacing of the kept
//! checkpoints doubles (every other one is removed) until they fill half of both, and
//! only steps of the new spacing are written from then on (recorded in a marker file,
//! so later processes keep to it). A long run therefore keeps
//! checkpoints over its whole length, at most a spacing apart, and a seek anywhere in it
//! replays at most that many steps.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::thread::ThreadId;

use tracing::{info, warn};

use crate::config::Config;
use crate::plan::{CheckpointKey, Checkpoints, Plan};

/// Largest checkpoint file read; a cursor blob is a few hundred bytes per domain, so a
/// larger file is not one.
const MAX_BLOB: u64 = 64 << 20;

/// File name suffix of a checkpoint.
const SUFFIX: &str = ".ckpt";

/// File name prefix of the empty file that records a thinned directory's stride (16 hex
/// digits follow); not a checkpoint name, so listing ignores it.
const STRIDE_PREFIX: &str = "stride-";

/// Most checkpoint files kept per plan fingerprint: what keeps a client's far
/// `start_step` (up to `MAX_STEP`) from turning its seek into millions of files.
pub const MAX_CHECKPOINTS: u64 = 1 << 16;

/// Most bytes of checkpoint files kept per plan fingerprint. A checkpoint is a cursor
/// blob, about 125 bytes per domain: without this bound a 400-domain run of a 1024-way
/// job (8192 rows a step, a checkpoint every 8 steps) reached the file cap at 3.6 GB on
/// every node.
pub const MAX_CHECKPOINT_BYTES: u64 = 256 << 20;

/// The checkpoint files and directories each thread reads or writes now, innermost
/// last. A seek blocked in one (a `cache_dir` on a network filesystem that stopped
/// answering) is named by it in the stuck-work watchdog's warning, which otherwise says
/// only that the seek goes on. Taken a few times per seek, never per step.
static IN_PROGRESS: Mutex<Vec<(ThreadId, String)>> = Mutex::new(Vec::new());

/// One entry of [`IN_PROGRESS`], removed when dropped.
#[must_use = "the entry is removed when this value is dropped"]
struct Noted(ThreadId);

impl Noted {
    /// Notes that this thread does `what` (for example "reading the plan checkpoint
    /// /cache/..."), until the returned value is dropped.
    fn new(what: String) -> Noted {
        let me = std::thread::current().id();
        lock_in_progress().push((me, what));
        Noted(me)
    }
}

impl Drop for Noted {
    fn drop(&mut self) {
        let mut all = lock_in_progress();
        if let Some(i) = all.iter().rposition(|(t, _)| *t == self.0) {
            all.remove(i);
        }
    }
}

fn lock_in_progress() -> std::sync::MutexGuard<'static, Vec<(ThreadId, String)>> {
    IN_PROGRESS.lock().unwrap_or_else(|p| p.into_inner())
}

/// What thread `thread` reads or writes of the plan checkpoints now, in words (its
/// innermost such access), if anything: the stuck-work watchdog's name for a seek that
/// hangs there.
pub fn in_progress(thread: ThreadId) -> Option<String> {
    let all = lock_in_progress();
    all.iter()
        .rev()
        .find(|(t, _)| *t == thread)
        .map(|(_, w)| w.clone())
}

/// Checkpoints of one plan kept in files (see the module comment).
pub struct CheckpointDir {
    dir: PathBuf,
    /// Files it may hold ([`MAX_CHECKPOINTS`]).
    max_files: u64,
    /// Bytes it may hold ([`MAX_CHECKPOINT_BYTES`]).
    max_bytes: u64,
    /// What it holds, counted from the directory at the first store (`None` again after
    /// an entry was refused and removed).
    held: Mutex<Option<Held>>,
}

/// The checkpoints of a directory, counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Held {
    files: u64,
    bytes: u64,
    /// Plan steps between the checkpoints written: a power of two, the largest that
    /// divides every step held (1 for an empty directory), doubled by each thinning.
    stride: u64,
}

impl CheckpointDir {
    /// The store for `plan`'s fingerprint under cache root `root`.
    pub fn new(root: &Path, plan: &Plan) -> CheckpointDir {
        CheckpointDir::capped(
            root.join("plan-checkpoints")
                .join(format!("{:032x}", plan.checkpoint_store_id())),
            MAX_CHECKPOINTS,
            MAX_CHECKPOINT_BYTES,
        )
    }

    /// A store in `dir` holding at most `files` files and `bytes` bytes.
    fn capped(dir: PathBuf, files: u64, bytes: u64) -> CheckpointDir {
        CheckpointDir {
            dir,
            max_files: files,
            max_bytes: bytes,
            held: Mutex::new(None),
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

    /// Notes in [`IN_PROGRESS`] that this thread is `doing` ("reading", "writing",
    /// "listing", "looking for", "thinning") `path` of this store, until the returned
    /// value is dropped.
    fn noted(&self, doing: &str, path: &Path) -> Noted {
        let what = if path == self.dir {
            "the plan checkpoint directory"
        } else {
            "the plan checkpoint"
        };
        Noted::new(format!("{doing} {what} {}", path.display()))
    }

    fn path(&self, key: &CheckpointKey) -> PathBuf {
        self.dir.join(format!(
            "{:016x}-{:016x}-{:016x}{SUFFIX}",
            key.plan_step, key.history, key.journal
        ))
    }

    /// Every checkpoint held, with its size in bytes.
    fn sizes(&self) -> Vec<(CheckpointKey, u64)> {
        let _noted = self.noted("listing", &self.dir);
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        entries
            .filter_map(|e| {
                let e = e.ok()?;
                let key = e.file_name().to_str().and_then(parse_name)?;
                Some((key, e.metadata().ok()?.len()))
            })
            .collect()
    }

    /// Counts what the directory holds.
    fn count(&self) -> Held {
        let held = self.sizes();
        Held {
            files: held.len() as u64,
            bytes: held.iter().map(|h| h.1).sum(),
            stride: self.thinned(),
        }
    }

    /// The stride a thinning left, read from its marker file ([`STRIDE_PREFIX`]); 1 when
    /// the directory was never thinned. Not inferred from the checkpoints' steps: a
    /// directory that happens to hold only multiples of a large power of two (one file
    /// the daemon wrote after the directory was deleted, or what a refusal left) would
    /// then be kept that sparse for good, and every seek would replay up to that many
    /// steps.
    fn thinned(&self) -> u64 {
        let _noted = self.noted("listing", &self.dir);
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return 1;
        };
        entries
            .filter_map(|e| {
                let name = e.ok()?.file_name();
                let hex = name.to_str()?.strip_prefix(STRIDE_PREFIX)?;
                let stride = u64::from_str_radix(hex, 16).ok()?;
                (hex.len() == 16 && stride.is_power_of_two()).then_some(stride)
            })
            .max()
            .unwrap_or(1)
    }

    /// Records `stride` as the directory's spacing for later processes (best effort: a
    /// marker that cannot be written costs a thinning in the next process that fills it).
    fn mark_thinned(&self, stride: u64) {
        // Not through a link planted under the name: created, or opened as it is,
        // never truncated.
        use std::os::unix::fs::OpenOptionsExt;
        let _ = std::fs::File::options()
            .write(true)
            .create(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(self.dir.join(format!("{STRIDE_PREFIX}{stride:016x}")));
    }

    /// Doubles the stride until the checkpoints on it fill at most half of both caps,
    /// and removes the others; returns what is left.
    fn thin(&self, was: Held) -> Held {
        let _noted = self.noted("thinning", &self.dir);
        let held = self.sizes();
        let on = |stride: u64| {
            let kept = held.iter().filter(|h| h.0.plan_step % stride == 0);
            (kept.clone().count() as u64, kept.map(|h| h.1).sum::<u64>())
        };
        let mut stride = was.stride.max(self.thinned());
        loop {
            stride = stride.saturating_mul(2);
            let (files, bytes) = on(stride);
            if (files <= self.max_files / 2 && bytes <= self.max_bytes / 2) || stride == u64::MAX {
                break;
            }
        }
        // Marked before the removals, so a process that counts meanwhile keeps to it.
        self.mark_thinned(stride);
        for (key, _) in held.iter().filter(|h| h.0.plan_step % stride != 0) {
            let _ = std::fs::remove_file(self.path(key));
        }
        let now = Held {
            stride,
            ..self.count()
        };
        info!(
            dir = %self.dir.display(),
            files = now.files,
            bytes = now.bytes,
            was_files = was.files,
            was_bytes = was.bytes,
            stride,
            "thinned the plan checkpoints to one every {stride} plan steps (at most {} files and {} bytes a plan)",
            self.max_files,
            self.max_bytes
        );
        now
    }

    fn write(&self, key: &CheckpointKey, blob: &[u8]) -> std::io::Result<()> {
        let path = self.path(key);
        let _noted = self.noted("writing", &path);
        std::fs::create_dir_all(&self.dir)?;
        // Written aside and renamed, so a reader never sees half a blob (and one that
        // did would refuse it by its checksum). Unique per writer (the daemon seeks for
        // several clients at once), created new: never through a link planted there.
        // A write that fails part-way (a full disk, RLIMIT_FSIZE) removes its partial
        // file too: each failed seek step would otherwise leave one more behind.
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("ckpt");
        let pid = std::process::id();
        crate::corpus::identity::write_through_new(&path, blob, |n| {
            self.dir.join(format!(".{name}.{pid}.{n}.tmp"))
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

/// Reads the checkpoint file at `path`: a regular file of at most [`MAX_BLOB`] bytes.
/// Opened without blocking and judged by the open file, so a FIFO or a device under a
/// checkpoint's name (or a file swapped for one after it was listed) is an error at
/// once, not a read that never returns or never ends.
fn read_blob(path: &Path) -> std::io::Result<Vec<u8>> {
    crate::util::read_regular(path, Some((MAX_BLOB, "a checkpoint")))
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
        let _noted = self.noted("listing", &self.dir);
        // A missing or unreadable directory holds no checkpoints; the seek replays.
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        entries
            .filter_map(|e| e.ok()?.file_name().to_str().and_then(parse_name))
            .collect()
    }

    fn has(&self, key: &CheckpointKey) -> bool {
        let path = self.path(key);
        let _noted = self.noted("looking for", &path);
        path.is_file()
    }

    fn load(&self, key: &CheckpointKey) -> Option<Vec<u8>> {
        let path = self.path(key);
        let read = {
            let _noted = self.noted("reading", &path);
            read_blob(&path)
        };
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
        let mut guard = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let held = guard.get_or_insert_with(|| self.count());
        if key.plan_step % held.stride != 0 {
            return;
        }
        let len = blob.len() as u64;
        let full = |h: &Held| h.files >= self.max_files || h.bytes + len > self.max_bytes;
        if full(held) {
            // Counted again before anything is removed: since this count was taken the
            // directory may have been deleted, or another process (a second daemon, a
            // seek) may have thinned it, and thinning on the stale count halved a store
            // that had room.
            let stride = held.stride;
            *held = self.count();
            held.stride = held.stride.max(stride);
        }
        if full(held) {
            *held = self.thin(*held);
            if key.plan_step % held.stride != 0 {
                return;
            }
            if held.files >= self.max_files || held.bytes + len > self.max_bytes {
                // One blob larger than half the budget: nothing to thin.
                return;
            }
        }
        match self.write(key, blob) {
            Ok(()) => {
                held.files += 1;
                held.bytes += len;
            }
            Err(e) => {
                // Once a process: the daemon makes a store per seek, and a read-only or
                // full cache warned once per client that sought.
                static WARNED: AtomicBool = AtomicBool::new(false);
                if !WARNED.swap(true, Ordering::Relaxed) {
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
            // Counted again at the next store.
            *self.held.lock().unwrap_or_else(|p| p.into_inner()) = None;
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Runs `f` while this thread is noted as reading a checkpoint of a store under
    /// `root`, as [`CheckpointDir::load`] is for as long as its read takes (a read that
    /// hangs cannot be made here: the file must be regular, and is opened without
    /// blocking); returns the file and what `f` returned.
    pub(crate) fn noting_a_read<T>(root: &Path, f: impl FnOnce() -> T) -> (PathBuf, T) {
        let d = CheckpointDir::capped(root.join("fp"), 8, 1 << 20);
        let path = d.path(&key(64));
        let _noted = d.noted("reading", &path);
        (path, f())
    }

    /// A thread's innermost checkpoint access names it; another thread's does not, and
    /// each goes when it ends.
    #[test]
    fn checkpoint_accesses_in_progress_are_noted_by_thread() {
        let tmp = tempfile::tempdir().unwrap();
        let d = CheckpointDir::capped(tmp.path().join("fp"), 8, 1 << 20);
        let me = std::thread::current().id();
        assert_eq!(in_progress(me), None);
        {
            let _thin = d.noted("thinning", d.dir());
            let want = format!(
                "thinning the plan checkpoint directory {}",
                d.dir().display()
            );
            assert_eq!(in_progress(me), Some(want.clone()));
            let (path, inner) = noting_a_read(tmp.path(), || in_progress(me));
            let read = format!("reading the plan checkpoint {}", path.display());
            assert_eq!(inner, Some(read));
            assert_eq!(in_progress(me), Some(want.clone()));
            // Read by thread: the watchdog's thread sees this one's note and has none.
            let other = std::thread::spawn(move || {
                (in_progress(me), in_progress(std::thread::current().id()))
            });
            let (seen, own) = other.join().unwrap();
            assert_eq!((seen.as_deref(), own), (Some(want.as_str()), None));
        }
        assert_eq!(in_progress(me), None);
    }

    fn key(plan_step: u64) -> CheckpointKey {
        CheckpointKey {
            plan_step,
            history: 1,
            journal: 2,
        }
    }

    /// The plan steps held, in order.
    fn steps(d: &CheckpointDir) -> Vec<u64> {
        let mut s: Vec<u64> = d.list().iter().map(|k| k.plan_step).collect();
        s.sort_unstable();
        s
    }

    /// Whatever a run offers, a store stays within its caps (a client's far `start_step`
    /// must not fill the disk), and what it keeps covers the whole run evenly: every
    /// multiple of one stride from step 0 up to within a stride of the last offer.
    #[test]
    fn a_store_thins_evenly_and_stays_within_its_caps() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("fp");
        // Files bind: at most 8.
        let a = CheckpointDir::capped(dir.clone(), 8, u64::MAX);
        for s in 0..1000 {
            a.store(&key(s), b"blob");
            assert!(a.list().len() <= 8, "step {s}: {:?}", steps(&a));
        }
        let kept = steps(&a);
        let stride = kept[1] - kept[0];
        assert!(stride.is_power_of_two() && stride >= 128, "{kept:?}");
        assert_eq!(kept, (0..1000).step_by(stride as usize).collect::<Vec<_>>());
        // A later process finds the stride in the names and keeps to it.
        let b = CheckpointDir::capped(dir.clone(), 8, u64::MAX);
        b.store(&key(1001), b"blob");
        b.store(&key(1024), b"blob");
        assert!(!b.has(&key(1001)) && b.has(&key(1024)), "{:?}", steps(&b));
        // Bytes bind: 10 blobs of 100 bytes.
        let c = CheckpointDir::capped(tmp.path().join("bytes"), u64::MAX, 1000);
        for s in (0..4096).step_by(4) {
            c.store(&key(s), &[7u8; 100]);
        }
        let kept = steps(&c);
        assert!(kept.len() <= 10 && kept.len() >= 4, "{kept:?}");
        let stride = kept[1] - kept[0];
        assert_eq!(kept, (0..4096).step_by(stride as usize).collect::<Vec<_>>());
        let bytes: u64 = c.sizes().iter().map(|h| h.1).sum();
        assert!(bytes <= 1000, "{bytes}");
        // A refused entry is removed and the next store counts again.
        c.refused(&key(0), "test");
        assert!(!c.has(&key(0)));
        c.store(&key(4096), &[7u8; 100]);
        assert!(c.has(&key(4096)));
        // A blob larger than the budget is not written, and nothing breaks.
        let d = CheckpointDir::capped(tmp.path().join("big"), 8, 64);
        d.store(&key(0), &[0u8; 100]);
        assert!(d.list().is_empty());
    }

    /// A directory that holds only multiples of a large power of two without ever having
    /// been thinned (the one checkpoint a daemon wrote after the directory was deleted,
    /// or what a refusal left) keeps taking every offer: the stride used to be read off
    /// the steps held, so a lone file at step 1024 made every later process keep one
    /// checkpoint in 1024 steps (and seeks replay up to that many) for good.
    #[test]
    fn a_sparse_directory_that_was_never_thinned_keeps_every_offer() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("fp");
        CheckpointDir::capped(dir.clone(), 8, u64::MAX).store(&key(1024), b"blob");
        let later = CheckpointDir::capped(dir.clone(), 8, u64::MAX);
        for s in [1088, 1152, 2048] {
            later.store(&key(s), b"blob");
        }
        assert_eq!(steps(&later), [1024, 1088, 1152, 2048]);
        // After a refusal the store counts again, and still keeps every offer.
        later.refused(&key(1088), "test");
        later.store(&key(1216), b"blob");
        assert_eq!(steps(&later), [1024, 1152, 1216, 2048]);
    }

    /// A store thins on what the directory holds, not on its own stale count: one whose
    /// directory was deleted when full, or that another process (a second daemon, a
    /// seek) thinned meanwhile, used to double its spacing again anyway, and drop every
    /// other offer or remove half of what was left of a store with room.
    #[test]
    fn a_store_thins_on_what_the_directory_holds_not_on_a_stale_count() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("fp");
        let a = CheckpointDir::capped(dir.clone(), 8, u64::MAX);
        for s in 0..8 {
            a.store(&key(s), b"blob");
        }
        std::fs::remove_dir_all(&dir).unwrap();
        for s in 8..11 {
            a.store(&key(s), b"blob");
        }
        assert_eq!(steps(&a), [8, 9, 10], "the deleted directory had room");
        std::fs::remove_dir_all(&dir).unwrap();

        // b counted a full directory; c then finds it full and thins it to one in 2.
        let b = CheckpointDir::capped(dir.clone(), 8, u64::MAX);
        for s in 0..8 {
            b.store(&key(s), b"blob");
        }
        let c = CheckpointDir::capped(dir.clone(), 8, u64::MAX);
        c.store(&key(8), b"blob");
        assert_eq!(steps(&c), [0, 2, 4, 6, 8]);
        b.store(&key(10), b"blob");
        assert_eq!(steps(&b), [0, 2, 4, 6, 8, 10], "thinned once, not twice");
    }

    /// A checkpoint name that is not a regular file (a FIFO, a link to a device) is
    /// refused at once and removed: opening a FIFO once blocked the seek forever (a
    /// daemon's admission slot with it), and reading /dev/zero never ended.
    #[test]
    fn a_checkpoint_that_is_not_a_regular_file_is_refused_at_once() {
        let tmp = tempfile::tempdir().unwrap();
        let d = CheckpointDir::capped(tmp.path().to_path_buf(), 8, u64::MAX);
        let fifo = d.path(&key(64));
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo with a valid C string.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        std::os::unix::fs::symlink("/dev/zero", d.path(&key(128))).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let dir = d.dir.clone();
        std::thread::spawn(move || {
            let d = CheckpointDir::capped(dir, 8, u64::MAX);
            let got = (d.load(&key(64)).is_none(), d.load(&key(128)).is_none());
            let _ = tx.send((got, d.list().len()));
        });
        let (got, left) = rx
            .recv_timeout(std::time::Duration::from_secs(20))
            .expect("loading a FIFO or a device checkpoint returns");
        assert_eq!(got, (true, true));
        assert_eq!(left, 0, "the entries are removed");
    }

    /// The stride marker is created where it is missing and left alone where it exists,
    /// never opened through a link another user planted under its name (which truncated
    /// the file the link pointed at).
    #[test]
    fn the_stride_marker_never_follows_a_link() {
        let tmp = tempfile::tempdir().unwrap();
        let d = CheckpointDir::capped(tmp.path().join("fp"), 8, u64::MAX);
        std::fs::create_dir_all(d.dir()).unwrap();
        let victim = tmp.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        std::os::unix::fs::symlink(&victim, d.dir().join(format!("{STRIDE_PREFIX}{:016x}", 4)))
            .unwrap();
        d.mark_thinned(4);
        d.mark_thinned(8);
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        assert_eq!(d.thinned(), 8);
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
