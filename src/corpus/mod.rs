//! The corpus layer: token shards on disk, mapped and checked, handed out as zero-copy
//! documents.
//!
//! This is the first stop of a token's trip to the GPU. A [`Shard`] is either a
//! Megatron `.idx`/`.bin` pair ([`megatron`]) or a raw token array ([`raw`]), with an
//! optional group sidecar ([`groups`]). [`resolve`] turns what a user typed (a prefix, a
//! directory, a glob) into shard paths, and [`Shard::open`] maps them. [`writer`] writes
//! Megatron shards; [`identity`] remembers each shard's content identity between starts,
//! and [`long`] the long units that upsampling repeats.
//!
//! Shards should be immutable while mapped (replace them by writing new files and
//! renaming). What happens when one is not: a read past a truncated end is caught by
//! [`guard`] and poisons the shard ([`Shard::poison`]); [`Shard::changed`] notices a
//! file whose size or mtime moved since it was opened (docs/OPERATIONS.md).

pub mod error;
pub mod groups;
pub mod guard;
pub mod identity;
pub mod long;
pub mod maps;
pub mod megatron;
pub mod raw;
mod resolve;
pub mod tokens;
pub mod writer;

use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use serde::{Deserialize, Serialize};

pub use error::{CorpusError, Result};
pub use groups::{GroupRun, Groups};
pub use identity::IdentityCache;
pub use long::{Listed, LongUnits};
pub use megatron::{MegatronShard, MegatronWriter};
pub use raw::{RawOptions, RawShard};
use resolve::not_regular;
pub use resolve::{file_kind, resolve};
pub use tokens::{DType, Tokens};

#[cfg(target_endian = "big")]
compile_error!(
    "millrace reads little-endian token files by mapping them; big-endian hosts are not supported"
);

/// The on-disk format of a shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// Megatron `.idx` + `.bin`.
    #[default]
    Megatron,
    /// A flat token array split on an EOS id.
    Raw,
}

impl Format {
    /// The name used in configs and reports.
    pub fn name(self) -> &'static str {
        match self {
            Format::Megatron => "megatron",
            Format::Raw => "raw",
        }
    }
}

/// An opened shard of either format, with its groups if a sidecar exists.
#[derive(Debug)]
pub struct Shard {
    body: Body,
    groups: Option<Groups>,
    path: PathBuf,
    /// The files behind the mappings as they were when opened, for [`Shard::changed`].
    stamps: Vec<(PathBuf, FileStamp)>,
    /// The group sidecar and its state when opened, if the shard has one: what the
    /// identity cache keys the shard's cached group runs by.
    sidecar: Option<(PathBuf, FileStamp)>,
    /// Why the shard must not be read again (it changed or faulted under a mapping).
    poisoned: std::sync::OnceLock<String>,
    /// Set once the full validation passed (or the identity cache vouches that it did
    /// for these very files): what the cache records so the next start knows it.
    validated: std::sync::atomic::AtomicBool,
}

/// What identifies one state of a file: which inode, how big, when last written (and,
/// for the identity cache, when its inode last changed: a write cannot set that back).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FileStamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl FileStamp {
    /// The state of the file the path names now (a stat).
    fn of(path: &Path) -> Result<FileStamp> {
        let m = std::fs::metadata(path).map_err(|e| CorpusError::io(path, "stat", e))?;
        Ok(FileStamp::from_meta(&m))
    }

    /// The state of the file behind an open descriptor (an fstat): what a mapping of it
    /// holds, whatever the path names by now.
    fn of_file(file: &File, path: &Path) -> Result<FileStamp> {
        let m = file
            .metadata()
            .map_err(|e| CorpusError::io(path, "stat", e))?;
        Ok(FileStamp::from_meta(&m))
    }

    fn from_meta(m: &std::fs::Metadata) -> FileStamp {
        use std::os::unix::fs::MetadataExt;
        FileStamp {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
            ctime_ns: i128::from(m.ctime()) * 1_000_000_000 + i128::from(m.ctime_nsec()),
        }
    }
}

/// The format-specific part of a [`Shard`].
#[derive(Debug)]
enum Body {
    Megatron(MegatronShard),
    Raw(RawShard),
}

/// Dispatches a call to whichever reader backs the shard.
macro_rules! body {
    ($self:expr, $s:ident => $e:expr) => {
        match &$self.body {
            Body::Megatron($s) => $e,
            Body::Raw($s) => $e,
        }
    };
}

impl Shard {
    /// Opens the shard at `path` (a Megatron prefix, or a raw file when `raw` is given)
    /// and its `<prefix>.groups.npy` if there is one, read in full (8 bytes per document;
    /// [`IdentityCache::open`] takes the runs from its cache instead).
    pub fn open(path: &Path, raw: Option<&RawOptions>) -> Result<Shard> {
        let mut shard = Shard::open_without_groups(path, raw)?;
        shard.read_sidecar()?;
        Ok(shard)
    }

    /// [`Shard::open`] up to the sidecar, which is only stat'ed: the caller attaches its
    /// groups ([`Shard::attach_groups`]), from the sidecar or from a cache.
    pub(crate) fn open_without_groups(path: &Path, raw: Option<&RawOptions>) -> Result<Shard> {
        let (body, prefix) = match raw {
            None => (
                Body::Megatron(MegatronShard::open(path)?),
                path.to_path_buf(),
            ),
            Some(opts) => (
                Body::Raw(RawShard::open(path, opts)?),
                path.with_extension(""),
            ),
        };
        let sidecar = megatron::with_suffix(&prefix, "groups.npy");
        // The stamps of the very files that were mapped (fstat of their descriptors): a
        // stat of the paths now could describe a file renamed over them since.
        let stamps = match &body {
            Body::Megatron(m) => m.stamps(),
            Body::Raw(r) => vec![(r.path().to_path_buf(), r.stamp())],
        };
        // A sidecar that cannot be stat'ed is no sidecar, as `Path::exists` says.
        let sidecar = FileStamp::of(&sidecar).ok().map(|st| (sidecar, st));
        Ok(Shard {
            body,
            groups: None,
            path: path.to_path_buf(),
            stamps,
            sidecar,
            poisoned: std::sync::OnceLock::new(),
            validated: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Reads the groups from the sidecar (if the shard has one), and takes its stamp from
    /// the file that was read, not from the earlier stat.
    pub(crate) fn read_sidecar(&mut self) -> Result<()> {
        let documents = self.documents();
        if let Some((sidecar, stamp)) = &mut self.sidecar {
            let (groups, read) = Groups::open_stamped(sidecar, documents)?;
            *stamp = read;
            self.groups = Some(groups);
        }
        Ok(())
    }

    /// Gives an opened shard its groups (read from its sidecar or a cache of it).
    pub(crate) fn attach_groups(&mut self, groups: Groups) {
        self.groups = Some(groups);
    }

    /// The path the shard was opened from (a Megatron prefix or a raw file).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Device and inode of the token file that was mapped (`.bin`, or the raw file): what
    /// a reader that opens the file by path again must find there.
    pub(crate) fn data_file(&self) -> (u64, u64) {
        let data = match &self.body {
            Body::Megatron(m) => m.bin_path(),
            Body::Raw(r) => r.path(),
        };
        self.stamps
            .iter()
            .find(|(p, _)| p == data)
            .map_or((0, 0), |(_, s)| (s.dev, s.ino))
    }

    /// Every mapping the shard reads through (`.idx` and `.bin`, or the raw file and its
    /// boundary cache), for [`guard::protect`].
    pub fn mappings(&self) -> Vec<&[u8]> {
        match &self.body {
            Body::Megatron(m) => vec![m.idx_bytes(), m.bin_bytes()],
            Body::Raw(r) => vec![r.data(), r.cache_bytes()],
        }
    }

    /// The file whose mapping holds `addr`, and the byte of it there: what a report of a
    /// faulted read names (the `.idx` or the `.bin`; the raw file or its boundary cache).
    pub fn file_at(&self, addr: usize) -> Option<(&Path, usize)> {
        let files: [&Path; 2] = match &self.body {
            Body::Megatron(m) => [m.idx_path(), m.bin_path()],
            Body::Raw(r) => [r.path(), r.cache_path()],
        };
        self.mappings()
            .into_iter()
            .zip(files)
            .find_map(|(map, file)| {
                let at = addr.checked_sub(map.as_ptr() as usize)?;
                (at < map.len()).then_some((file, at))
            })
    }

    /// Marks the shard as unreadable for the rest of the process's life, with the reason
    /// (the first reason wins). Its mapping may hold zeros where the file shrank, so
    /// nothing may serve from it again.
    pub fn poison(&self, why: String) {
        let _ = self.poisoned.set(why);
    }

    /// Why the shard was poisoned, if it was: one atomic load on the copy path.
    #[inline]
    pub fn poisoned(&self) -> Option<&str> {
        self.poisoned.get().map(String::as_str)
    }

    /// Whether a file behind the shard changed in place since it was opened (same inode,
    /// other size or mtime), and how. A path that now names another inode was replaced
    /// by a rename, which is the supported way: the mapping keeps the old, intact file.
    /// A file that cannot be stat'ed (deleted) is not a change either, for the same reason.
    pub fn changed(&self) -> Option<String> {
        for (path, was) in &self.stamps {
            let Ok(now) = FileStamp::of(path) else {
                continue;
            };
            if (now.dev, now.ino) != (was.dev, was.ino) {
                continue;
            }
            if now.size != was.size {
                return Some(format!(
                    "{}: changed size under the daemon ({} -> {} bytes)",
                    path.display(),
                    was.size,
                    now.size
                ));
            }
            if now.mtime_ns != was.mtime_ns {
                return Some(format!(
                    "{}: modified in place under the daemon (mtime moved by {} ns)",
                    path.display(),
                    now.mtime_ns - was.mtime_ns
                ));
            }
        }
        None
    }

    /// Whether the shard's index lost pages: its `.idx` is now shorter than when it was
    /// mapped (same inode), or the SIGBUS guard zeroed a page of the index (a raw shard's
    /// boundary cache). Those pages read as zeros, so anything planned over the index can
    /// be wrong. Planning reads nothing else: a `.bin` (or raw token file) that lost pages
    /// only fails the copies that read it, as any poisoned shard does.
    pub fn lost_index_pages(&self) -> bool {
        let (index, path) = self.index();
        let shrank = self.stamps.iter().any(|(p, was)| {
            Some(p.as_path()) == path
                && FileStamp::of(p).is_ok_and(|now| {
                    (now.dev, now.ino) == (was.dev, was.ino) && now.size < was.size
                })
        });
        // The mapping's own record, whatever the count of pages zeroed in the process.
        shrank || guard::zeroed_within(index)
    }

    /// The bytes of the index a lookup of document `doc` reads, in words (the stuck-fill
    /// watchdog names them): the file, and for a Megatron index its entries' byte ranges.
    pub fn index_entries(&self, doc: u64) -> String {
        match &self.body {
            Body::Megatron(m) => {
                let ranges: Vec<String> = (m.entry_bytes(doc).iter())
                    .map(|(a, b)| format!("{a}..{b}"))
                    .collect();
                format!("{} bytes {}", m.idx_path().display(), ranges.join(", "))
            }
            Body::Raw(r) => format!(
                "the boundaries of {} (document {doc})",
                r.cache_path().display()
            ),
        }
    }

    /// Whether `addr` is a byte of the mapping planning reads (the `.idx`; a raw shard's
    /// boundary cache): a fault there can be planning's, one elsewhere is a copy's.
    pub fn index_holds(&self, addr: usize) -> bool {
        let index = self.index().0;
        let lo = index.as_ptr() as usize;
        (lo..lo + index.len()).contains(&addr)
    }

    /// The mapping planning reads, and its file where it is one of its own (a raw
    /// shard's boundary cache is the daemon's).
    fn index(&self) -> (&[u8], Option<&Path>) {
        match &self.body {
            Body::Megatron(m) => (m.idx_bytes(), Some(m.idx_path())),
            Body::Raw(r) => (r.cache_bytes(), None),
        }
    }

    /// Which reader backs the shard.
    pub fn format(&self) -> Format {
        match self.body {
            Body::Megatron(_) => Format::Megatron,
            Body::Raw(_) => Format::Raw,
        }
    }

    /// The Megatron reader, for callers that need sequence-level access.
    pub fn as_megatron(&self) -> Option<&MegatronShard> {
        match &self.body {
            Body::Megatron(m) => Some(m),
            Body::Raw(_) => None,
        }
    }

    /// The raw reader, for callers that need its cache details.
    pub fn as_raw(&self) -> Option<&RawShard> {
        match &self.body {
            Body::Raw(r) => Some(r),
            Body::Megatron(_) => None,
        }
    }

    /// Token dtype.
    pub fn dtype(&self) -> DType {
        body!(self, s => s.dtype())
    }

    /// Number of documents.
    pub fn documents(&self) -> u64 {
        body!(self, s => s.documents())
    }

    /// Number of sequences (Megatron sentence splitting); documents for raw files.
    pub fn sequences(&self) -> u64 {
        match &self.body {
            Body::Megatron(m) => m.sequences(),
            Body::Raw(r) => r.documents(),
        }
    }

    /// Number of tokens.
    pub fn tokens(&self) -> u64 {
        body!(self, s => s.tokens())
    }

    /// Bytes of token data (the `.bin` or the raw file).
    pub fn data_bytes(&self) -> u64 {
        match &self.body {
            Body::Megatron(m) => m.bin_len(),
            Body::Raw(r) => r.file_len(),
        }
    }

    /// The whole mapped token data (`.bin` or raw file): the range page-cache hints cover.
    pub fn data(&self) -> &[u8] {
        match &self.body {
            Body::Megatron(m) => m.bin_bytes(),
            Body::Raw(r) => r.data(),
        }
    }

    /// Length of document `doc` in tokens, from the index alone (no token I/O).
    pub fn doc_len(&self, doc: u64) -> Result<u64> {
        body!(self, s => s.doc_len(doc))
    }

    /// Length of document `doc` in a planner's hot loop: the fastest read the format
    /// allows, checked as a read of the document's tokens is (the shard may not have been
    /// validated yet: the daemon validates after READY). A document that fails the check
    /// reads as 0 and poisons the shard with the reason, naming the document, so every
    /// ring that reads the shard fails with it instead of serving a corrupt plan.
    #[inline]
    pub fn doc_len_validated(&self, doc: u64) -> u64 {
        let len = guard::noting_index(self as *const Shard as usize, doc, || match &self.body {
            Body::Megatron(m) => m.doc_len_validated(doc),
            Body::Raw(r) => r.doc_len(doc),
        });
        len.unwrap_or_else(|e| {
            let why = format!("{e} (found while planning; the shard is poisoned)");
            if self.poisoned.set(why.clone()).is_ok() {
                // Once per shard: the rings that read it will say it again, by name.
                tracing::error!("{why}");
            }
            0
        })
    }

    /// Appends every document's length to `out`, in one pass over the index.
    pub fn doc_lengths_into(&self, out: &mut Vec<u64>) -> Result<()> {
        body!(self, s => s.doc_lengths_into(out))
    }

    /// The tokens of document `doc`, borrowed from the mapping.
    pub fn doc_tokens(&self, doc: u64) -> Result<Tokens<'_>> {
        body!(self, s => s.doc_tokens(doc))
    }

    /// Prefetches what [`Shard::doc_tokens`] will read of the index for `doc` (a CPU
    /// cache hint; see [`MegatronShard::prefetch_doc`]). Raw shards: nothing.
    #[inline]
    pub fn prefetch_doc(&self, doc: u64) {
        if let Body::Megatron(m) = &self.body {
            m.prefetch_doc(doc);
        }
    }

    /// Prefetches the index entry [`Shard::doc_len_validated`] will read for `doc` (a
    /// CPU cache hint; see [`MegatronShard::prefetch_len`]). Raw shards: nothing.
    #[inline]
    pub fn prefetch_len(&self, doc: u64) {
        if let Body::Megatron(m) = &self.body {
            m.prefetch_len(doc);
        }
    }

    /// The group sidecar, if the shard has one.
    pub fn groups(&self) -> Option<&Groups> {
        self.groups.as_ref()
    }

    /// The full linear check of the index (see [`MegatronShard::validate`]).
    pub fn validate(&self) -> Result<()> {
        body!(self, s => s.validate())?;
        self.validated
            .store(true, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// The error for a shard whose index says it stores float tokens: no `token_dtype`
    /// holds them, and an index whose dtype code turned from int32 (4) into float32 (7),
    /// or int64 into float64, passes every size check and the linear validation. Names
    /// the byte. The daemon's start, `check-config` and `inspect` all refuse it.
    pub fn float_tokens(&self) -> Option<CorpusError> {
        let dtype = self.dtype();
        if !matches!(dtype, DType::Float32 | DType::Float64) {
            return None;
        }
        let (file, code) = match self.as_megatron() {
            Some(m) => (m.idx_path(), dtype.megatron_code().unwrap_or_default()),
            None => (self.path(), 0),
        };
        Some(CorpusError::Invalid {
            path: file.to_path_buf(),
            what: format!(
                "dtype code {code} ({dtype}) at byte 17: token ids are integers, so no \
                 token_dtype can serve this shard; its dtype code is wrong (int32 is 4, \
                 int64 5, uint16 8) or it holds no token ids"
            ),
        })
    }

    /// What a passed [`Shard::validate`] proved (for the identity cache, and to show that
    /// a start took the fast paths from it): `Some(true)` when every document is one
    /// sequence (the fast paths), `None` before it passed.
    pub fn validated_layout(&self) -> Option<bool> {
        let passed = self.validated.load(std::sync::atomic::Ordering::Relaxed);
        passed.then(|| self.as_megatron().is_some_and(|m| m.one_seq_per_doc()))
    }

    /// Takes a validation the identity cache recorded for these very files as passed,
    /// with the fast paths `one_seq_per_doc` allows (see
    /// [`MegatronShard::assume_one_seq_per_doc`]).
    pub(crate) fn assume_validated(&self, one_seq_per_doc: bool) {
        if let (true, Some(m)) = (one_seq_per_doc, self.as_megatron()) {
            m.assume_one_seq_per_doc();
        }
        self.validated
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// A content identity that does not depend on where the data is mounted: the shard's
    /// file name, its sizes, and a hash of its index (the `.idx`, or for a raw file the
    /// boundaries). The `.bin` is never hashed: it may be terabytes.
    pub fn identity(&self) -> Result<ShardIdentity> {
        let name = self
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let index_hash = match &self.body {
            Body::Megatron(m) => xxhash_rust::xxh3::xxh3_64(m.idx_bytes()),
            Body::Raw(r) => {
                let mut h = xxhash_rust::xxh3::Xxh3::new();
                for d in 0..r.documents() {
                    h.update(&r.doc_len(d)?.to_le_bytes());
                }
                h.digest()
            }
        };
        Ok(ShardIdentity {
            name,
            format: self.format(),
            dtype: self.dtype(),
            documents: self.documents(),
            tokens: self.tokens(),
            index_hash: format!("{index_hash:016x}"),
        })
    }
}

/// What identifies a shard's content across nodes that mount it at different paths.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardIdentity {
    /// File name within its domain.
    pub name: String,
    /// Reader.
    pub format: Format,
    /// Token dtype.
    pub dtype: DType,
    /// Documents.
    pub documents: u64,
    /// Tokens.
    pub tokens: u64,
    /// xxh3-64 of the index, hex.
    pub index_hash: String,
}

/// A file mapped read-only by [`map_file`], with the state of that very file.
#[derive(Debug)]
pub(crate) struct Mapped {
    /// The mapping; `None` for an empty file, which cannot be mapped.
    pub(crate) map: Option<Mmap>,
    /// Its length in bytes: exactly what the mapping covers (`map.len()`), so bounds
    /// checked against it never slice past the mapping.
    pub(crate) len: u64,
    /// The fstat of the mapped descriptor, taken after mapping and equal in size to it.
    pub(crate) stamp: FileStamp,
}

/// Maps a whole file read-only. The length is the mapping's own, and the stamp comes from
/// the descriptor that was mapped, checked to agree in size: a file that changes size
/// while it is being opened is an error naming it, never a slice past a mapping.
pub(crate) fn map_file(path: &Path) -> Result<Mapped> {
    // Stat before open: opening a FIFO would block, and a device maps as something
    // that is not a token file (/dev/zero reads as endless zeros).
    // (A missing file is reported as the open that would have failed.)
    let meta = std::fs::metadata(path).map_err(|e| CorpusError::io(path, "open", e))?;
    if !meta.is_file() {
        return Err(not_regular(path, &meta));
    }
    let file = File::open(path).map_err(|e| CorpusError::io(path, "open", e))?;
    let opened = file
        .metadata()
        .map_err(|e| CorpusError::io(path, "stat", e))?;
    if !opened.is_file() {
        // Replaced between the stat and the open.
        return Err(not_regular(path, &opened));
    }
    if opened.len() == 0 {
        return Ok(Mapped {
            map: None,
            len: 0,
            stamp: FileStamp::from_meta(&opened),
        });
    }
    // Shards are immutable while served (see the module docs); every access is
    // bounds-checked against the mapping's length.
    let map = crate::sys::map_file(&file, None)
        .map_err(|e| CorpusError::io(path, "mmap", maps::explain_enomem(e)))?;
    guard::protect_if_asked(&map);
    let stamp = FileStamp::of_file(&file, path)?;
    let len = map.len() as u64;
    if stamp.size != len {
        return Err(CorpusError::invalid(
            path,
            format!(
                "changed size while being opened ({len} bytes mapped, {} bytes now): a shard \
                 must not be modified in place while it is in use",
                stamp.size
            ),
        ));
    }
    Ok(Mapped {
        map: (len > 0).then_some(map),
        len,
        stamp,
    })
}

/// Reads a little-endian u64 at byte `at`; callers have checked the bounds.
pub(crate) fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

/// Reads a little-endian i64 at byte `at`.
pub(crate) fn le_i64(b: &[u8], at: usize) -> i64 {
    le_u64(b, at) as i64
}

/// Reads a little-endian i32 at byte `at`.
pub(crate) fn le_i32(b: &[u8], at: usize) -> i32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[at..at + 4]);
    i32::from_le_bytes(w)
}
