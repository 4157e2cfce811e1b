//! The identity cache: a shard's content identity ([`ShardIdentity`]) remembered between
//! starts, so that a start costs a few syscalls and pages per shard instead of a read of
//! every `.idx` (issue 16, item 1; docs/DESIGN.md, "Start in time proportional to shards").
//!
//! One small JSON file per shard, under `<cache_dir>/identity/` (docs/FORMATS.md,
//! "Identity cache"). An entry is trusted only when every file behind the shard still has
//! the device, inode, size, mtime and ctime it had when the identity was computed, and a
//! sample of its index pages (the first, the last and a few between) still hashes the same.
//! Anything else (no entry, another file's entry, a stale, corrupt or foreign entry)
//! means computing the identity as before and writing the entry again: the cache can make
//! a start faster, never different. The value is exactly [`Shard::identity`]'s, so every
//! manifest and plan fingerprint stays what it was.
//!
//! A shard with a group sidecar also gets its group runs cached (a `.runs` file beside
//! the entry, 16 bytes per group), trusted on the same terms for the sidecar, so that
//! a start reads O(groups) bytes instead of the sidecar's 8 bytes per document; a domain
//! that upsamples gets each shard's long units listed beside the entry ([`super::long`]).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{FileStamp, Groups, LongUnits, RawOptions, Result, Shard, ShardIdentity};

/// What an entry's `format` field must say: a JSON file that is not ours is ignored.
const FORMAT: &str = "millrace-identity-cache";
/// The entry layout version; an entry of another version is recomputed and rewritten.
pub const VERSION: u32 = 1;
/// Bytes per sampled page.
const PAGE: u64 = 4096;
/// Sampled pages between the first and the last.
const MIDDLE_PAGES: u64 = 4;

/// Where shard identities are cached, or nowhere (every identity is then computed).
#[derive(Debug, Clone)]
pub struct IdentityCache {
    dir: Option<PathBuf>,
    /// Canonical form of each shard directory seen: a start names thousands of shards
    /// in a few directories, and canonicalizing costs a readlink and a stat per path
    /// component.
    dirs: std::sync::Arc<std::sync::Mutex<HashMap<PathBuf, PathBuf>>>,
}

/// One file behind a shard as an entry records it. Only the stamps are compared (see
/// [`FileKey::same_file_state`]): `path` is for people reading the entry, and differs
/// when a start resolves the shard from another working directory.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct FileKey {
    path: PathBuf,
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: String,
    ctime_ns: String,
}

impl FileKey {
    fn of(path: &Path, s: &FileStamp) -> FileKey {
        FileKey {
            path: path.to_path_buf(),
            dev: s.dev,
            ino: s.ino,
            size: s.size,
            // Strings: nanosecond timestamps need 128 bits, which JSON numbers lose.
            mtime_ns: s.mtime_ns.to_string(),
            ctime_ns: s.ctime_ns.to_string(),
        }
    }

    /// Same device, inode, size, mtime and ctime.
    fn same_file_state(&self, o: &FileKey) -> bool {
        (
            self.dev,
            self.ino,
            self.size,
            &self.mtime_ns,
            &self.ctime_ns,
        ) == (o.dev, o.ino, o.size, &o.mtime_ns, &o.ctime_ns)
    }
}

/// The sampled pages of the index and their hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Sample {
    /// Byte offsets of the sampled pages (each `PAGE` bytes, or to the end of the file).
    offsets: Vec<u64>,
    /// xxh3-64 of the sampled bytes in `offsets` order, hex.
    hash: String,
}

/// One cache file.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Entry {
    format: String,
    version: u32,
    /// How the shard is read, where that changes its documents: a raw file's dtype and
    /// EOS id (the same bytes split on another id are another corpus); empty for Megatron.
    reader: String,
    files: Vec<FileKey>,
    sample: Sample,
    identity: ShardIdentity,
    /// The shard's cached group runs, when it has a sidecar (entries written before the
    /// runs were cached have none, and get them at the next start).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    groups: Option<GroupsKey>,
    /// Set once these files passed the full validation (`check-config`, or the daemon's
    /// background pass): whether every document is one sequence. A start that trusts
    /// the entry turns the index's fast paths on at once instead of after its own pass.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    one_seq_per_doc: Option<bool>,
    /// xxh3-64 (hex) of the entry's JSON without this key ([`encode_entry`]): an entry
    /// edited or corrupted in a way that still parses (a digit of `index_hash`) changed
    /// the plan fingerprint silently, and a valid blob was then refused as "changed
    /// content". Entries written before it have none, and are taken as they are.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    checksum: Option<String>,
}

/// The checksum `entry` should carry: the xxh3-64 (hex) of its JSON without `checksum`.
fn entry_sum(entry: &Entry) -> serde_json::Result<String> {
    let mut e = entry.clone();
    e.checksum = None;
    let body = serde_json::to_vec(&e)?;
    Ok(format!("{:016x}", xxhash_rust::xxh3::xxh3_64(&body)))
}

/// An entry's bytes: its JSON, with its checksum ([`entry_sum`]).
fn encode_entry(entry: &Entry) -> serde_json::Result<Vec<u8>> {
    let mut e = entry.clone();
    e.checksum = Some(entry_sum(entry)?);
    serde_json::to_vec(&e)
}

/// Which sidecar state an entry's runs file was read from.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct GroupsKey {
    /// The `.groups.npy` when its runs were read.
    file: FileKey,
    /// Sampled pages of the sidecar, as [`Entry::sample`] samples the index.
    sample: Sample,
    /// Groups in the runs file.
    runs: u64,
    /// The checksum that ends the runs file (hex): pairs the entry with its runs file.
    runs_sum: String,
}

/// Why a cached entry was not used, for the log and the tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Miss {
    /// No cache directory, or no entry for this shard yet.
    Absent,
    /// The file is not an entry of this version (corrupt, foreign or older): rewritten.
    Unreadable(String),
    /// A file behind the shard is not the one the entry was computed from.
    Stale,
    /// The stamps match but the sampled pages do not: the content changed in place.
    SampleChanged,
}

impl IdentityCache {
    /// A cache in `dir` (the config's `[corpus] cache_dir`), else in the per-user default
    /// (`$XDG_CACHE_HOME/millrace`, else `~/.cache/millrace`). When no directory can be
    /// created, identities are computed at every start, as before the cache existed.
    pub fn new(dir: Option<&Path>) -> IdentityCache {
        let base = dir.map(Path::to_path_buf).or_else(default_cache_root);
        let dir = base
            .map(|b| b.join("identity"))
            .filter(|d| match std::fs::create_dir_all(d) {
                Ok(()) => true,
                Err(e) => {
                    tracing::warn!(
                        "{}: cannot create the identity cache ({e}); every start hashes \
                         each shard's index in full",
                        d.display()
                    );
                    false
                }
            });
        IdentityCache {
            dir,
            dirs: Default::default(),
        }
    }

    /// The directory entries are written to, if any.
    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    /// Opens the shard at `path` and takes its identity and groups from its entry where
    /// the entry still describes the files behind it: what a start does per shard, a few
    /// `stat`s and pages plus O(groups) bytes of runs. What the entry cannot vouch for is
    /// computed as [`Shard::open`] and [`Shard::identity`] would, and the entry rewritten.
    /// `full` (`check-config`) validates the index in full and computes everything.
    pub fn open(
        &self,
        path: &Path,
        raw: Option<&RawOptions>,
        full: bool,
    ) -> Result<(Shard, ShardIdentity)> {
        let mut shard = Shard::open_without_groups(path, raw)?;
        if full {
            shard.validate()?;
        }
        let at = self.entry_path(&shard);
        let entry = match (&at, full) {
            (Some(at), false) => read_entry(at),
            _ => Err(Miss::Absent),
        };
        let mut stale = false;
        let id = match entry.as_ref().map_err(Miss::clone) {
            Ok(e) => check_identity(e, &shard),
            Err(m) => Err(m),
        };
        let id = match id {
            Ok(id) => {
                if let Some(one_seq) = entry.as_ref().ok().and_then(|e| e.one_seq_per_doc) {
                    shard.assume_validated(one_seq);
                }
                id
            }
            Err(miss) => {
                warn_unreadable(&miss);
                stale = true;
                shard.identity()?
            }
        };
        if shard.sidecar.is_some() {
            let cached = match (&entry, &at) {
                (Ok(e), Some(at)) => cached_groups(e, at, &shard),
                _ => Err(Miss::Absent),
            };
            match cached {
                Ok(g) => shard.attach_groups(g),
                Err(miss) => {
                    warn_unreadable(&miss);
                    stale = true;
                    // Read from the sidecar, whose stamp is then that of the file read:
                    // what the runs written back below are keyed by.
                    shard.read_sidecar()?;
                }
            }
        }
        if let (true, Some(at)) = (stale, at) {
            self.store_at(&at, &shard, &id);
        }
        Ok((shard, id))
    }

    /// The identity of `shard`: from its entry when the entry still describes the shard's
    /// files, else computed in full and written back.
    pub fn identity(&self, shard: &Shard) -> Result<ShardIdentity> {
        match self.lookup(shard) {
            Ok(id) => Ok(id),
            Err(miss) => {
                warn_unreadable(&miss);
                let id = shard.identity()?;
                self.store(shard, &id);
                Ok(id)
            }
        }
    }

    /// The cached identity of `shard`, or why there is none that can be trusted.
    pub fn lookup(&self, shard: &Shard) -> std::result::Result<ShardIdentity, Miss> {
        let path = self.entry_path(shard).ok_or(Miss::Absent)?;
        check_identity(&read_entry(&path)?, shard)
    }

    /// The cached group runs of `shard` (opened with its sidecar), or why there are none
    /// that can be trusted.
    pub fn lookup_groups(&self, shard: &Shard) -> std::result::Result<Groups, Miss> {
        let path = self.entry_path(shard).ok_or(Miss::Absent)?;
        cached_groups(&read_entry(&path)?, &path, shard)
    }

    /// The units of `shard` (as [`Self::open`] opened it, with identity `id`) longer than
    /// `min_tokens`, for `upsample_long`: from the list file beside its entry when that
    /// was written for this state of the shard, else one pass over the lengths, written
    /// back ([`super::long`]).
    pub fn long_units(&self, shard: &Shard, id: &ShardIdentity, min_tokens: u64) -> LongUnits {
        super::long::cached(self.entry_path(shard).as_deref(), shard, id, min_tokens)
    }

    /// The cached long units of `shard` for `min_tokens`, or why there are none that fit.
    pub fn lookup_long(
        &self,
        shard: &Shard,
        id: &ShardIdentity,
        min_tokens: u64,
    ) -> std::result::Result<LongUnits, Miss> {
        let path = self.entry_path(shard).ok_or(Miss::Absent)?;
        super::long::lookup(&path, shard, id, min_tokens)
    }

    /// Writes `shard`'s entry, and its runs file when it has groups (each through a
    /// temporary name and a rename, the runs first, so a reader never sees half of one).
    /// A failure to write only costs the next start a full hash: logged, not returned.
    pub fn store(&self, shard: &Shard, id: &ShardIdentity) {
        if let Some(path) = self.entry_path(shard) {
            self.store_at(&path, shard, id);
        }
    }

    /// Records in `shard`'s entry that it passed the full validation (the daemon's
    /// background pass), if the entry still describes its files, so that the next start
    /// takes the fast paths at once. Nothing happens otherwise: it is only a hint.
    pub fn record_validated(&self, shard: &Shard) {
        let Some(path) = self.entry_path(shard) else {
            return;
        };
        let Ok(entry) = read_entry(&path) else {
            return;
        };
        let layout = shard.validated_layout();
        if layout.is_some() && entry.one_seq_per_doc != layout {
            if let Ok(id) = check_identity(&entry, shard) {
                // Rewritten whole: its runs file is rewritten too when the shard has
                // groups, and the entry keeps vouching for it.
                self.store_at(&path, shard, &id);
            }
        }
    }

    fn store_at(&self, path: &Path, shard: &Shard, id: &ShardIdentity) {
        let groups = match (shard.groups(), &shard.sidecar) {
            (Some(g), Some((sidecar, stamp))) => {
                let bytes = g.encode();
                let sum = Groups::encoded_sum(&bytes).unwrap_or_default();
                let runs = runs_path(path);
                let offsets = sample_offsets(stamp.size, sidecar);
                let sampled = sample_file(sidecar, stamp, &offsets);
                match (write_atomically(&runs, &bytes), sampled) {
                    (Ok(()), Some(sample)) => Some(GroupsKey {
                        file: FileKey::of(sidecar, stamp),
                        sample,
                        runs: g.len() as u64,
                        runs_sum: format!("{sum:016x}"),
                    }),
                    (Err(e), _) => {
                        write_failed(&runs, "the group runs", &e);
                        None
                    }
                    (Ok(()), None) => None,
                }
            }
            _ => None,
        };
        let entry = Entry {
            format: FORMAT.into(),
            version: VERSION,
            reader: reader(shard),
            files: keys(shard),
            sample: sample_of(index_bytes(shard), shard.path()),
            identity: id.clone(),
            groups,
            one_seq_per_doc: shard.validated_layout(),
            checksum: None,
        };
        let written = encode_entry(&entry)
            .map_err(std::io::Error::other)
            .and_then(|bytes| write_atomically(path, &bytes));
        if let Err(e) = written {
            write_failed(path, "the identity cache", &e);
        }
    }

    /// `<dir>/<name>-<xxh3 of the absolute index path>.json`: two shards of one name
    /// never share an entry. A raw file's reading (dtype, EOS) joins the hash, so two
    /// configs that read one file differently keep an entry each (they rewrote one
    /// entry at every start); a Megatron shard's name is what it was.
    pub fn entry_path(&self, shard: &Shard) -> Option<PathBuf> {
        let dir = self.dir.as_ref()?;
        let (first, _) = shard.stamps.first()?;
        let abs = self.absolute(first)?;
        let mut key = abs.as_os_str().as_encoded_bytes().to_vec();
        key.extend_from_slice(reader(shard).as_bytes());
        let hash = xxhash_rust::xxh3::xxh3_64(&key);
        Some(dir.join(format!("{}-{hash:016x}.json", shard_name(shard))))
    }

    /// `path` in its canonical directory (resolved once per directory). The file name
    /// itself is not resolved: a shard reached through a link to its `.idx` gets an entry
    /// of its own, which costs one more entry, never a wrong one.
    fn absolute(&self, path: &Path) -> Option<PathBuf> {
        // A poisoned lock only means another thread panicked mid-insert: the map is
        // still a valid memo.
        let mut dirs = self.dirs.lock().unwrap_or_else(|e| e.into_inner());
        in_canonical_dir(path, &mut dirs)
    }
}

/// `path` with its directory canonicalized, once per directory (`dirs` remembers them):
/// a start names thousands of shards in a few directories, and canonicalizing costs a
/// syscall per path component. The file name itself is not resolved.
pub fn in_canonical_dir(path: &Path, dirs: &mut HashMap<PathBuf, PathBuf>) -> Option<PathBuf> {
    let name = path.file_name()?;
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if let Some(c) = dirs.get(parent) {
        return Some(c.join(name));
    }
    let c = std::fs::canonicalize(parent).ok()?;
    dirs.insert(parent.to_path_buf(), c.clone());
    Some(c.join(name))
}

/// The cache directory used when the config names none: systemd's `$CACHE_DIRECTORY`
/// (the unit's `CacheDirectory=`), else `$XDG_CACHE_HOME/millrace`, else
/// `$HOME/.cache/millrace` (absolute paths only). Shard identities and plan checkpoints
/// both live under it.
pub fn default_cache_root() -> Option<PathBuf> {
    let absolute = |v: &str| {
        std::env::var_os(v)
            .map(PathBuf::from)
            .filter(|p| p.is_absolute())
    };
    // systemd may list several, colon-separated; the first is the unit's own.
    let systemd = std::env::var_os("CACHE_DIRECTORY").and_then(|v| {
        let first = v.to_string_lossy().split(':').next()?.to_string();
        Some(PathBuf::from(first)).filter(|p| p.is_absolute())
    });
    systemd.or_else(|| {
        absolute("XDG_CACHE_HOME")
            .or_else(|| absolute("HOME").map(|h| h.join(".cache")))
            .map(|c| c.join("millrace"))
    })
}

fn shard_name(shard: &Shard) -> String {
    file_name(shard.path())
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Logs an entry that exists but cannot be used (the others are ordinary misses).
fn warn_unreadable(miss: &Miss) {
    if let Miss::Unreadable(why) = miss {
        tracing::warn!("identity cache: {why}; recomputing and rewriting it");
    }
}

/// The entry at `path`, if it is one of ours, of this version.
fn read_entry(path: &Path) -> std::result::Result<Entry, Miss> {
    // Bounded, and never a FIFO or a device: one under an entry's name hung the start
    // before READY (and `plan` for ever), and a link to /dev/zero read until memory ran out.
    let text = match crate::util::read_regular(path, None) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(Miss::Absent),
        Err(e) => return Err(Miss::Unreadable(format!("{}: {e}", path.display()))),
    };
    let entry: Entry = serde_json::from_slice(&text).map_err(|e| {
        Miss::Unreadable(format!(
            "{}: not an identity cache entry: {e}",
            path.display()
        ))
    })?;
    if entry.format != FORMAT || entry.version != VERSION {
        return Err(Miss::Unreadable(format!(
            "{}: format {:?} version {}, expected {FORMAT:?} version {VERSION}",
            path.display(),
            entry.format,
            entry.version
        )));
    }
    if let Some(sum) = &entry.checksum {
        if entry_sum(&entry).ok().as_ref() != Some(sum) {
            return Err(Miss::Unreadable(format!(
                "{}: its checksum does not match its contents (edited or corrupt)",
                path.display()
            )));
        }
    }
    Ok(entry)
}

/// The entry's identity, if the files behind `shard` are still the ones it was computed
/// from (stamps, reader, shape and sampled index pages).
fn check_identity(entry: &Entry, shard: &Shard) -> std::result::Result<ShardIdentity, Miss> {
    let now = keys(shard);
    let same = entry.files.len() == now.len()
        && entry
            .files
            .iter()
            .zip(&now)
            .all(|(a, b)| a.same_file_state(b));
    let id = &entry.identity;
    let shape = (&id.name, id.format, id.dtype, id.documents, id.tokens);
    let now_shape = (
        &shard_name(shard),
        shard.format(),
        shard.dtype(),
        shard.documents(),
        shard.tokens(),
    );
    if !same || entry.reader != reader(shard) || shape != now_shape {
        return Err(Miss::Stale);
    }
    match sample_with(index_bytes(shard), &entry.sample.offsets) {
        Some(s) if s == entry.sample => Ok(entry.identity.clone()),
        _ => Err(Miss::SampleChanged),
    }
}

/// The entry's group runs (from the runs file beside it at `at`), if `shard`'s sidecar
/// is still the one they were read from: same stamps and sampled pages, as for the index.
fn cached_groups(entry: &Entry, at: &Path, shard: &Shard) -> std::result::Result<Groups, Miss> {
    let (Some(key), Some((sidecar, stamp))) = (&entry.groups, &shard.sidecar) else {
        return Err(Miss::Absent);
    };
    if !key.file.same_file_state(&FileKey::of(sidecar, stamp)) {
        return Err(Miss::Stale);
    }
    match sample_file(sidecar, stamp, &key.sample.offsets) {
        Some(s) if s == key.sample => {}
        _ => return Err(Miss::SampleChanged),
    }
    let runs = runs_path(at);
    let bytes = crate::util::read_regular(&runs, None).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Miss::Absent,
        _ => Miss::Unreadable(format!("{}: {e}", runs.display())),
    })?;
    let sum = Groups::encoded_sum(&bytes).map(|s| format!("{s:016x}"));
    if sum.as_deref() != Some(key.runs_sum.as_str()) {
        // Another start's write of another sidecar state: ordinary, not worth a warning.
        return Err(Miss::Stale);
    }
    let groups = Groups::decode(&bytes, shard.documents())
        .map_err(|why| Miss::Unreadable(format!("{}: {why}", runs.display())))?;
    if groups.len() as u64 != key.runs {
        return Err(Miss::Unreadable(format!(
            "{}: {} runs, its entry says {}",
            runs.display(),
            groups.len(),
            key.runs
        )));
    }
    Ok(groups)
}

/// Reports a failed cache write: a warning the first time in this process, then debug
/// lines. A read-only or full cache directory fails every shard's write at every start,
/// and one warning per shard buried the log of a start over thousands of shards.
fn write_failed(path: &Path, what: &str, e: &std::io::Error) {
    static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
        tracing::debug!("{}: cannot write {what}: {e}", path.display());
    } else {
        tracing::warn!(
            "{}: cannot write {what}: {e}; shards whose entries cannot be written are hashed \
             in full at the next start (further failed cache writes are logged at debug level)",
            path.display()
        );
    }
}

/// The runs file beside the entry at `entry`.
fn runs_path(entry: &Path) -> PathBuf {
    entry.with_extension("runs")
}

/// Writes `bytes` to `path` through a temporary name unique per process and call (a
/// shard listed twice is stored by two threads) and a rename ([`write_through_new`]).
pub(crate) fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let ext = path.extension().map(|e| e.to_string_lossy().into_owned());
    let ext = ext.unwrap_or_default();
    let pid = std::process::id();
    write_through_new(path, bytes, |n| {
        path.with_extension(format!("{ext}.tmp.{pid}.{n}"))
    })
}

/// How many taken temporary names [`write_through_new`] skips before it gives up.
const TMP_TRIES: u32 = 16;

/// Writes `bytes` to a temporary file named `tmp(n)` (`n` a counter shared by every
/// call in this process) and renames it to `path`. The temporary file is created new
/// (O_CREAT|O_EXCL): a name already taken, a symlink included, is skipped, never followed
/// or truncated. The names are predictable (pid and counter), and a cache directory may
/// be shared with other users: a link planted there under the next name once made the
/// daemon overwrite whatever file it pointed at with a cache entry.
pub(crate) fn write_through_new(
    path: &Path,
    bytes: &[u8],
    tmp: impl Fn(u64) -> PathBuf,
) -> std::io::Result<()> {
    use std::io::Write;
    static CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let mut tries = 0;
    let (tmp, mut file) = loop {
        let name = tmp(CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
        match std::fs::File::options()
            .write(true)
            .create_new(true)
            .open(&name)
        {
            Ok(f) => break (name, f),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && tries + 1 < TMP_TRIES => {
                tries += 1;
            }
            Err(e) => {
                return Err(std::io::Error::new(
                    e.kind(),
                    format!("creating {}: {e}", name.display()),
                ))
            }
        }
    };
    let written = file.write_all(bytes).and_then(|()| {
        drop(file);
        std::fs::rename(&tmp, path)
    });
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// The entry's `reader` for `shard`.
fn reader(shard: &Shard) -> String {
    match shard.as_raw() {
        Some(r) => format!("raw {} eos {}", r.dtype(), r.eos()),
        None => String::new(),
    }
}

fn keys(shard: &Shard) -> Vec<FileKey> {
    shard
        .stamps
        .iter()
        .map(|(p, s)| FileKey::of(p, s))
        .collect()
}

/// The bytes the identity hashes: the `.idx`, or a raw shard's token file (its boundaries
/// are derived from it).
fn index_bytes(shard: &Shard) -> &[u8] {
    match shard.as_megatron() {
        Some(m) => m.idx_bytes(),
        None => shard.data(),
    }
}

/// A fresh sample of `bytes` (the file at `path`).
fn sample_of(bytes: &[u8], path: &Path) -> Sample {
    let offsets = sample_offsets(bytes.len() as u64, path);
    // Offsets come from the file's own size, so they are in bounds.
    sample_with(bytes, &offsets).unwrap_or(Sample {
        offsets,
        hash: String::new(),
    })
}

/// The pages a fresh sample of a `len`-byte file at `path` reads: the first and last
/// pages and [`MIDDLE_PAGES`] between, at offsets that depend on the file's name and size
/// so that files do not all share them.
fn sample_offsets(len: u64, path: &Path) -> Vec<u64> {
    let pages = len.div_ceil(PAGE);
    let mut offsets = vec![0];
    let seed = xxhash_rust::xxh3::xxh3_64(format!("{}:{len}", file_name(path)).as_bytes());
    for i in 0..MIDDLE_PAGES {
        if pages > 2 {
            let mixed = seed.rotate_left(16 * i as u32) ^ i.wrapping_mul(0x9e37_79b9_7f4a_7c15);
            offsets.push((1 + mixed % (pages - 2)) * PAGE);
        }
    }
    if pages > 1 {
        offsets.push((pages - 1) * PAGE);
    }
    offsets.sort_unstable();
    offsets.dedup();
    offsets
}

/// The sample at `offsets` of the file at `path`, read with `pread` (a file the start
/// does not otherwise map: no mapping to set up and tear down), or `None` when the path
/// no longer names the file `stamp` describes or an offset lies outside it.
fn sample_file(path: &Path, stamp: &FileStamp, offsets: &[u64]) -> Option<Sample> {
    use std::os::unix::fs::{FileExt, MetadataExt};
    let file = std::fs::File::open(path).ok()?;
    let m = file.metadata().ok()?;
    if (m.dev(), m.ino(), m.size()) != (stamp.dev, stamp.ino, stamp.size) {
        return None;
    }
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    let mut page = vec![0u8; PAGE as usize];
    for &at in offsets {
        let n = stamp.size.checked_sub(at)?.min(PAGE) as usize;
        file.read_exact_at(&mut page[..n], at).ok()?;
        h.update(&page[..n]);
    }
    Some(Sample {
        offsets: offsets.to_vec(),
        hash: format!("{:016x}", h.digest()),
    })
}

/// The sample of `bytes` at `offsets`, or `None` when one lies outside (a stale entry).
fn sample_with(bytes: &[u8], offsets: &[u64]) -> Option<Sample> {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    for &at in offsets {
        let at = usize::try_from(at).ok()?;
        let page = bytes.get(at..)?;
        h.update(&page[..page.len().min(PAGE as usize)]);
    }
    Some(Sample {
        offsets: offsets.to_vec(),
        hash: format!("{:016x}", h.digest()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::corpus::{DType, MegatronWriter};

    fn shard(dir: &Path, docs: u32) -> PathBuf {
        let prefix = dir.join("s");
        let mut w = MegatronWriter::create(&prefix, DType::Int32).unwrap();
        for d in 0..docs {
            let toks: Vec<u8> = (0..(d % 7 + 1) as i32).flat_map(i32::to_le_bytes).collect();
            w.add_document_bytes(&toks).unwrap();
        }
        w.finish().unwrap()
    }

    #[test]
    fn a_changed_sampled_page_is_not_trusted_even_when_the_stamps_match() {
        let dir = tempfile::tempdir().unwrap();
        let prefix = shard(dir.path(), 2000);
        let cache = IdentityCache::new(Some(&dir.path().join("cache")));
        let s = Shard::open(&prefix, None).unwrap();
        let id = cache.identity(&s).unwrap();
        assert_eq!(cache.lookup(&s), Ok(id.clone()));
        drop(s);
        // Change one length inside the first page (a sampled one), then forge the entry's
        // stamps to the new file's, as a filesystem that keeps mtime and ctime would.
        let idx = crate::corpus::megatron::with_suffix(&prefix, "idx");
        let mut bytes = std::fs::read(&idx).unwrap();
        bytes[40] ^= 1;
        std::fs::write(&idx, &bytes).unwrap();
        let s = Shard::open(&prefix, None).unwrap();
        let entry_path = cache.entry_path(&s).unwrap();
        let mut entry: Entry =
            serde_json::from_slice(&std::fs::read(&entry_path).unwrap()).unwrap();
        entry.files = keys(&s);
        std::fs::write(&entry_path, encode_entry(&entry).unwrap()).unwrap();
        assert_eq!(cache.lookup(&s), Err(Miss::SampleChanged));
        let fresh = cache.identity(&s).unwrap();
        assert_eq!(fresh, s.identity().unwrap());
        assert_ne!(fresh.index_hash, id.index_hash);
    }

    /// Regression: an entry edited in a way that still parses (one digit of its
    /// `index_hash`) was trusted: the plan fingerprint moved silently, and a valid blob
    /// was refused as "changed content". Its checksum now fails it, and it is rewritten;
    /// an entry written before checksums (none) is still read.
    #[test]
    fn an_entry_edited_in_place_is_not_trusted() {
        let dir = tempfile::tempdir().unwrap();
        let prefix = shard(dir.path(), 300);
        let cache = IdentityCache::new(Some(&dir.path().join("cache")));
        let s = Shard::open(&prefix, None).unwrap();
        let id = cache.identity(&s).unwrap();
        let entry_path = cache.entry_path(&s).unwrap();
        let text = std::fs::read_to_string(&entry_path).unwrap();
        let at = text.find(&id.index_hash).unwrap();
        let digit = if &text[at..at + 1] == "0" { "1" } else { "0" };
        let edited = format!("{}{digit}{}", &text[..at], &text[at + 1..]);
        std::fs::write(&entry_path, &edited).unwrap();
        match cache.lookup(&s) {
            Err(Miss::Unreadable(why)) => assert!(why.contains("checksum"), "{why}"),
            other => panic!("an edited entry was {other:?}"),
        }
        assert_eq!(cache.identity(&s).unwrap(), id, "recomputed");
        let mut old: Entry = serde_json::from_slice(&std::fs::read(&entry_path).unwrap()).unwrap();
        assert!(old.checksum.is_some(), "rewritten with a checksum");
        old.checksum = None;
        std::fs::write(&entry_path, serde_json::to_vec(&old).unwrap()).unwrap();
        assert_eq!(cache.lookup(&s), Ok(id));
    }

    /// The sidecar is sampled with `pread`, the index through its mapping: the same
    /// bytes give the same sample, and a path that names another file gives none.
    #[test]
    fn a_sample_read_from_the_file_equals_one_read_from_its_mapping() {
        let dir = tempfile::tempdir().unwrap();
        let s = Shard::open(&shard(dir.path(), 5000), None).unwrap();
        let (idx, stamp) = &s.stamps[0];
        let bytes = s.as_megatron().unwrap().idx_bytes();
        let want = sample_of(bytes, s.path());
        assert!(
            *want.offsets.last().unwrap() + PAGE > bytes.len() as u64,
            "a cut page"
        );
        assert_eq!(
            sample_file(idx, stamp, &sample_offsets(stamp.size, s.path())),
            Some(want.clone())
        );
        assert_eq!(sample_file(idx, stamp, &[stamp.size + 1]), None);
        let other = dir.path().join("other");
        std::fs::copy(idx, &other).unwrap();
        std::fs::rename(&other, idx).unwrap();
        assert_eq!(
            sample_file(idx, stamp, &want.offsets),
            None,
            "another inode"
        );
    }

    #[test]
    fn a_sample_covers_the_first_and_last_pages_in_bounds() {
        let dir = tempfile::tempdir().unwrap();
        let s = Shard::open(&shard(dir.path(), 5000), None).unwrap();
        let len = s.as_megatron().unwrap().idx_bytes().len() as u64;
        let got = sample_of(index_bytes(&s), s.path());
        assert_eq!(got.offsets.first(), Some(&0));
        assert_eq!(got.offsets.last(), Some(&((len.div_ceil(PAGE) - 1) * PAGE)));
        assert!(got.offsets.len() >= 3 && got.offsets.iter().all(|&o| o < len));
        assert!(sample_with(index_bytes(&s), &[len + 1]).is_none());
    }
}
