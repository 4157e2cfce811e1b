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

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{FileStamp, Result, Shard, ShardIdentity};

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
        IdentityCache { dir }
    }

    /// The directory entries are written to, if any.
    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    /// The identity of `shard`: from its entry when the entry still describes the shard's
    /// files, else computed in full and written back.
    pub fn identity(&self, shard: &Shard) -> Result<ShardIdentity> {
        match self.lookup(shard) {
            Ok(id) => Ok(id),
            Err(miss) => {
                if let Miss::Unreadable(why) = &miss {
                    tracing::warn!("identity cache: {why}; recomputing and rewriting it");
                }
                let id = shard.identity()?;
                self.store(shard, &id);
                Ok(id)
            }
        }
    }

    /// The cached identity of `shard`, or why there is none that can be trusted.
    pub fn lookup(&self, shard: &Shard) -> std::result::Result<ShardIdentity, Miss> {
        let path = self.entry_path(shard).ok_or(Miss::Absent)?;
        let text = match std::fs::read(&path) {
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
        match sample_with(shard, &entry.sample.offsets) {
            Some(s) if s == entry.sample => Ok(entry.identity),
            _ => Err(Miss::SampleChanged),
        }
    }

    /// Writes `shard`'s entry (tmp file + rename, so a reader never sees half of one).
    /// A failure to write only costs the next start a full hash: logged, not returned.
    pub fn store(&self, shard: &Shard, id: &ShardIdentity) {
        let Some(path) = self.entry_path(shard) else {
            return;
        };
        let entry = Entry {
            format: FORMAT.into(),
            version: VERSION,
            reader: reader(shard),
            files: keys(shard),
            sample: sample(shard),
            identity: id.clone(),
        };
        // Unique per process and call: a shard listed twice is stored by two threads.
        static CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = path.with_extension(format!("tmp.{}.{n}", std::process::id()));
        let written = serde_json::to_vec(&entry)
            .map_err(std::io::Error::other)
            .and_then(|bytes| std::fs::write(&tmp, bytes))
            .and_then(|()| std::fs::rename(&tmp, &path));
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            tracing::warn!("{}: cannot write the identity cache: {e}", path.display());
        }
    }

    /// `<dir>/<name>-<xxh3 of the absolute index path>.json`: two shards of one name
    /// never share an entry.
    pub fn entry_path(&self, shard: &Shard) -> Option<PathBuf> {
        let dir = self.dir.as_ref()?;
        let (first, _) = shard.stamps.first()?;
        let abs = std::fs::canonicalize(first).ok()?;
        let hash = xxhash_rust::xxh3::xxh3_64(abs.as_os_str().as_encoded_bytes());
        Some(dir.join(format!("{}-{hash:016x}.json", shard_name(shard))))
    }
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
    shard
        .path()
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
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

/// A fresh sample: the first and last pages and [`MIDDLE_PAGES`] between, at offsets
/// that depend on the shard's name and size so that shards do not all share them.
fn sample(shard: &Shard) -> Sample {
    let len = index_bytes(shard).len() as u64;
    let pages = len.div_ceil(PAGE);
    let mut offsets = vec![0];
    let seed = xxhash_rust::xxh3::xxh3_64(format!("{}:{len}", shard_name(shard)).as_bytes());
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
    // Offsets come from the file's own size, so they are in bounds.
    sample_with(shard, &offsets).unwrap_or(Sample {
        offsets,
        hash: String::new(),
    })
}

/// The sample at `offsets`, or `None` when one lies outside the index (a stale entry).
fn sample_with(shard: &Shard, offsets: &[u64]) -> Option<Sample> {
    let bytes = index_bytes(shard);
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
        std::fs::write(&entry_path, serde_json::to_vec(&entry).unwrap()).unwrap();
        assert_eq!(cache.lookup(&s), Err(Miss::SampleChanged));
        let fresh = cache.identity(&s).unwrap();
        assert_eq!(fresh, s.identity().unwrap());
        assert_ne!(fresh.index_hash, id.index_hash);
    }

    #[test]
    fn a_sample_covers_the_first_and_last_pages_in_bounds() {
        let dir = tempfile::tempdir().unwrap();
        let s = Shard::open(&shard(dir.path(), 5000), None).unwrap();
        let len = s.as_megatron().unwrap().idx_bytes().len() as u64;
        let got = sample(&s);
        assert_eq!(got.offsets.first(), Some(&0));
        assert_eq!(got.offsets.last(), Some(&((len.div_ceil(PAGE) - 1) * PAGE)));
        assert!(got.offsets.len() >= 3 && got.offsets.iter().all(|&o| o < len));
        assert!(sample_with(&s, &[len + 1]).is_none());
    }
}
