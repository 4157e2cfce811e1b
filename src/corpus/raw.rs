//! Raw token arrays: flat little-endian uint16/uint32 files (OLMo- and nanoGPT-style),
//! with documents delimited by an EOS id.
//!
//! Such a file has no index, so the first open scans it once for EOS and writes the
//! document boundaries to a cache file (next to the data, or in the configured cache
//! dir), named for the dtype and EOS it was built for, so that two domains reading one
//! file with different EOS ids keep one cache each. The cache is keyed to the data file's
//! device, inode, size, mtime, ctime and a hash of its first and last 64 KiB, plus the
//! dtype and EOS, and carries a checksum of itself; any mismatch rebuilds it.
//! A document is the tokens up to and including its EOS; tokens after the last EOS form
//! a final document without one. So the documents, concatenated, are exactly the file.

use std::path::{Path, PathBuf};

use memmap2::Mmap;

use super::error::{CorpusError, Result};
use super::tokens::{DType, Tokens};
use super::{le_u64, map_file, FileStamp};

/// Magic of the boundary cache file.
const CACHE_MAGIC: &[u8; 8] = b"MRDOCIX1";
/// Version of the cache layout (2 added the device, inode and ctime to the key).
const CACHE_VERSION: u32 = 2;
/// Size of the cache header; the u64 array that follows is 8-byte aligned.
const CACHE_HEADER: usize = 104;
/// Offset of the checksum, which covers every byte of the cache but its own eight.
const CHECKSUM_AT: usize = 64;
/// Bytes sampled from each end of the data file for the content key.
const SAMPLE: usize = 64 << 10;
/// Extension of cache files.
pub const CACHE_EXT: &str = "mrdocs";

/// How to read a raw token file: the fields a Megatron header would otherwise give.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawOptions {
    /// uint16 or uint32.
    pub dtype: DType,
    /// The id that ends every document.
    pub eos: u64,
    /// Where boundary caches go; `None` puts them next to the data file.
    pub cache_dir: Option<PathBuf>,
}

/// Document end offsets (exclusive, in tokens), mapped from the cache or held in memory
/// when no cache could be written.
#[derive(Debug)]
enum DocEnds {
    Mapped(Mmap, u64),
    Owned(Vec<u64>),
}

impl DocEnds {
    fn len(&self) -> u64 {
        match self {
            DocEnds::Mapped(_, n) => *n,
            DocEnds::Owned(v) => v.len() as u64,
        }
    }

    fn get(&self, i: u64) -> u64 {
        match self {
            DocEnds::Mapped(map, _) => le_u64(map, CACHE_HEADER + 8 * i as usize),
            DocEnds::Owned(v) => v[i as usize],
        }
    }
}

/// The identity of a data file's content as far as a cache can tell without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct CacheKey {
    item_size: u32,
    eos: u64,
    file_len: u64,
    mtime_s: i64,
    mtime_ns: u32,
    /// xxh3 of the first and last 64 KiB: catches a same-size rewrite that kept its mtime.
    sample: u64,
    /// Device and inode: another file renamed over the path (a copy that kept size,
    /// mtime and both ends) is another file.
    dev: u64,
    ino: u64,
    /// ctime, which no write can set back: an in-place rewrite that restored the mtime
    /// (`touch -d`, `cp -p` onto the file) still moves it.
    ctime_s: i64,
    ctime_ns: u32,
}

impl CacheKey {
    /// The key of the data file in the state `stamp` (of the mapped descriptor) describes.
    fn new(opts: &RawOptions, stamp: &FileStamp, sample: u64) -> CacheKey {
        let split = |ns: i128| {
            (
                ns.div_euclid(1_000_000_000) as i64,
                ns.rem_euclid(1_000_000_000) as u32,
            )
        };
        let (mtime_s, mtime_ns) = split(stamp.mtime_ns);
        let (ctime_s, ctime_ns) = split(stamp.ctime_ns);
        CacheKey {
            item_size: opts.dtype.size() as u32,
            eos: opts.eos,
            file_len: stamp.size,
            mtime_s,
            mtime_ns,
            sample,
            dev: stamp.dev,
            ino: stamp.ino,
            ctime_s,
            ctime_ns,
        }
    }
}

/// One raw token file, mapped, with its document boundaries.
#[derive(Debug)]
pub struct RawShard {
    path: PathBuf,
    map: Option<Mmap>,
    len: u64,
    /// The mapped file as it was when mapped (fstat of the descriptor).
    stamp: FileStamp,
    dtype: DType,
    eos: u64,
    ends: DocEnds,
    cache_path: PathBuf,
    cache_rebuilt: bool,
}

impl RawShard {
    /// Opens `path`, using or (re)building its boundary cache.
    pub fn open(path: &Path, opts: &RawOptions) -> Result<RawShard> {
        if !matches!(opts.dtype, DType::Uint16 | DType::Uint32) {
            return Err(CorpusError::invalid(
                path,
                format!("raw token arrays are uint16 or uint32, not {}", opts.dtype),
            ));
        }
        let max_id = if opts.dtype == DType::Uint16 {
            u64::from(u16::MAX)
        } else {
            u64::from(u32::MAX)
        };
        if opts.eos > max_id {
            return Err(CorpusError::invalid(
                path,
                format!("eos id {} does not fit in {}", opts.eos, opts.dtype),
            ));
        }
        let mapped = map_file(path)?;
        let (len, stamp) = (mapped.len, mapped.stamp);
        let size = opts.dtype.size() as u64;
        if len % size != 0 {
            return Err(CorpusError::invalid(
                path,
                format!(
                    "file size {len} bytes is not a multiple of the {} item size ({size} bytes)",
                    opts.dtype
                ),
            ));
        }
        let map = match mapped.map {
            Some(m) if len > 0 => m,
            _ => {
                return Err(CorpusError::invalid(
                    path,
                    "empty shard: the token file holds no tokens",
                ))
            }
        };
        if let Some(why) = npy_header(&map) {
            return Err(CorpusError::invalid(path, why));
        }
        let key = CacheKey::new(opts, &stamp, sample_hash(&map));
        let cache_path = cache_path(path, opts)?;
        let (ends, cache_rebuilt) = match read_cache(&cache_path, &key) {
            Some(ends) => (ends, false),
            None => {
                let ends = scan(&map, opts.dtype, opts.eos);
                let ends = match write_cache(&cache_path, &key, &ends) {
                    Ok(()) => match read_cache(&cache_path, &key) {
                        Some(mapped) => mapped,
                        None => DocEnds::Owned(ends),
                    },
                    Err(e) => {
                        tracing::warn!(
                            "{}: cannot write the document boundary cache ({e}); \
                             keeping it in memory, and the next open scans again",
                            cache_path.display()
                        );
                        DocEnds::Owned(ends)
                    }
                };
                (ends, true)
            }
        };
        Ok(RawShard {
            path: path.to_path_buf(),
            map: Some(map),
            len,
            stamp,
            dtype: opts.dtype,
            eos: opts.eos,
            ends,
            cache_path,
            cache_rebuilt,
        })
    }

    /// The data file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The state of the mapped file when it was mapped, for [`super::Shard::changed`].
    pub(crate) fn stamp(&self) -> FileStamp {
        self.stamp
    }

    /// Where the boundary cache lives.
    pub fn cache_path(&self) -> &Path {
        &self.cache_path
    }

    /// True when this open had to scan the file (no cache, or a stale one).
    pub fn cache_rebuilt(&self) -> bool {
        self.cache_rebuilt
    }

    /// uint16 or uint32.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The EOS id the boundaries were built for.
    pub fn eos(&self) -> u64 {
        self.eos
    }

    /// Number of documents.
    pub fn documents(&self) -> u64 {
        self.ends.len()
    }

    /// Number of tokens in the file.
    pub fn tokens(&self) -> u64 {
        self.len / self.dtype.size() as u64
    }

    /// File size in bytes.
    pub fn file_len(&self) -> u64 {
        self.len
    }

    /// Token range `[start, end)` of document `doc`.
    fn doc_range(&self, doc: u64) -> Result<(u64, u64)> {
        let n = self.documents();
        if doc >= n {
            return Err(CorpusError::DocOutOfRange {
                path: self.path.clone(),
                doc,
                count: n,
            });
        }
        let start = if doc == 0 { 0 } else { self.ends.get(doc - 1) };
        let end = self.ends.get(doc);
        if start > end || end > self.tokens() {
            return Err(CorpusError::invalid(
                &self.cache_path,
                format!(
                    "document {doc}: boundary cache gives tokens {start}..{end}, outside the file"
                ),
            ));
        }
        Ok((start, end))
    }

    /// Length of document `doc` in tokens (its EOS included).
    pub fn doc_len(&self, doc: u64) -> Result<u64> {
        let (a, b) = self.doc_range(doc)?;
        Ok(b - a)
    }

    /// The whole mapped token array (empty for an empty file).
    pub fn data(&self) -> &[u8] {
        self.map.as_deref().unwrap_or(&[])
    }

    /// The mapped boundary cache, if the boundaries are read from one (empty otherwise):
    /// a mapping the daemon's SIGBUS guard must cover too.
    pub fn cache_bytes(&self) -> &[u8] {
        match &self.ends {
            DocEnds::Mapped(map, _) => map,
            DocEnds::Owned(_) => &[],
        }
    }

    /// The tokens of document `doc`, borrowed from the mapping.
    pub fn doc_tokens(&self, doc: u64) -> Result<Tokens<'_>> {
        let (a, b) = self.doc_range(doc)?;
        let size = self.dtype.size() as u64;
        let bytes = match &self.map {
            Some(m) => &m[(a * size) as usize..(b * size) as usize],
            None => &[][..],
        };
        Tokens::from_bytes(self.dtype, bytes).ok_or_else(|| {
            CorpusError::invalid(&self.path, format!("document {doc}: misaligned mapping"))
        })
    }

    /// Appends every document's length to `out` (see `MegatronShard::doc_lengths_into`),
    /// each checked to lie inside the file. On error `out` is left as it was.
    pub fn doc_lengths_into(&self, out: &mut Vec<u64>) -> Result<()> {
        let base = out.len();
        let r = self.push_doc_lengths(out);
        if r.is_err() {
            out.truncate(base);
        }
        r
    }

    fn push_doc_lengths(&self, out: &mut Vec<u64>) -> Result<()> {
        out.reserve(self.documents() as usize);
        let tokens = self.tokens();
        let mut prev = 0u64;
        for d in 0..self.documents() {
            let end = self.ends.get(d);
            if end > tokens {
                return Err(CorpusError::invalid(
                    &self.cache_path,
                    format!(
                        "document {d}: boundary cache gives tokens {prev}..{end}, past the \
                         {tokens} tokens of {}",
                        self.path.display()
                    ),
                ));
            }
            let len = end.checked_sub(prev).ok_or_else(|| {
                CorpusError::invalid(
                    &self.cache_path,
                    format!("document {d}: boundary {end} is before {prev}"),
                )
            })?;
            out.push(len);
            prev = end;
        }
        Ok(())
    }

    /// Re-checks that the boundaries are increasing and end at the file's end: the linear
    /// pass that a Megatron shard's `validate` makes over its index.
    pub fn validate(&self) -> Result<()> {
        let mut prev = 0u64;
        for d in 0..self.documents() {
            let end = self.ends.get(d);
            if end <= prev && d > 0 || end > self.tokens() {
                return Err(CorpusError::invalid(
                    &self.cache_path,
                    format!("document {d}: boundary {end} after {prev} is not increasing or past the end"),
                ));
            }
            prev = end;
        }
        if prev != self.tokens() {
            return Err(CorpusError::invalid(
                &self.cache_path,
                format!(
                    "boundaries end at token {prev}, the file has {}",
                    self.tokens()
                ),
            ));
        }
        Ok(())
    }
}

/// Where the cache for `data` read as `opts` lives: `<data>.<dtype>-eos<id>.mrdocs`, or in
/// the cache dir under a name that also hashes the absolute path, so two files of the
/// same name never share a cache. The dtype and EOS are in the name so that two domains
/// reading one file with different EOS ids each keep their own cache instead of
/// rebuilding one in turn.
fn cache_path(data: &Path, opts: &RawOptions) -> Result<PathBuf> {
    let reading = format!("{}-eos{}.{CACHE_EXT}", opts.dtype, opts.eos);
    match opts.cache_dir.as_deref() {
        None => Ok(super::megatron::with_suffix(data, &reading)),
        Some(dir) => {
            let abs = std::fs::canonicalize(data)
                .map_err(|e| CorpusError::io(data, "canonicalize", e))?;
            let hash = xxhash_rust::xxh3::xxh3_64(abs.as_os_str().as_encoded_bytes());
            let name = data
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "tokens".into());
            Ok(dir.join(format!("{name}-{hash:016x}.{reading}")))
        }
    }
}

/// Finds every EOS. Chunks of 64 tokens are tested with a branch-free `any` that the
/// compiler vectorizes; only chunks with a hit are walked token by token.
fn scan(map: &[u8], dtype: DType, eos: u64) -> Vec<u64> {
    fn go<T: Copy + PartialEq + bytemuck::Pod>(tokens: &[T], eos: T) -> Vec<u64> {
        let mut ends = Vec::new();
        for (c, chunk) in tokens.chunks(64).enumerate() {
            if chunk.iter().fold(false, |hit, &t| hit | (t == eos)) {
                for (i, &t) in chunk.iter().enumerate() {
                    if t == eos {
                        ends.push((c * 64 + i + 1) as u64);
                    }
                }
            }
        }
        if ends.last().copied() != Some(tokens.len() as u64) {
            ends.push(tokens.len() as u64);
        }
        ends
    }
    match dtype {
        // The mapping is page-aligned and its length a multiple of the item size (both
        // checked by the caller), so these casts cannot fail; an empty result would
        // surface as a validation error rather than wrong data.
        DType::Uint16 => bytemuck::try_cast_slice::<u8, u16>(map)
            .map(|t| go(t, eos as u16))
            .unwrap_or_default(),
        _ => bytemuck::try_cast_slice::<u8, u32>(map)
            .map(|t| go(t, eos as u32))
            .unwrap_or_default(),
    }
}

/// Why `data` is not a raw token array, when it starts with a numpy `.npy` header (what
/// `np.save` writes): read as tokens, its magic, header dict and padding would be
/// served as the first "document" (uint16 ids such as 20115, under most vocabularies),
/// silently. The magic, a format version numpy has defined (1 to 3) and the header
/// length's field must all be there; no token stream starts with that by chance.
fn npy_header(data: &[u8]) -> Option<String> {
    let pre = super::groups::NpyPreamble::of(data)?;
    let (major, minor, text_at) = (pre.major, pre.minor, pre.text_at);
    let described = match (pre.text(data), pre.header_len) {
        (Some(d), _) => {
            // Escaped, and cut: the header is the file's bytes (a hostile one held 5 MB of
            // terminal escapes and newlines, echoed whole into the error and the log).
            let text = String::from_utf8_lossy(&d[..d.len().min(200)]);
            let cut = if d.len() > 200 { "..." } else { "" };
            let shown: String = (text.trim().chars())
                .map(|c| match c.is_control() {
                    true => c.escape_debug().to_string(),
                    false => c.to_string(),
                })
                .collect();
            format!("its header {shown}{cut}")
        }
        (None, Some(n)) => format!(
            "its header claims {n} bytes from byte {text_at}, past the end of the {}-byte file",
            data.len()
        ),
        (None, None) => "a header cut short".to_string(),
    };
    Some(format!(
        "starts with a numpy .npy header (magic \"\\x93NUMPY\" at byte 0, format version \
         {major}.{minor}; {described}): a raw token file is headerless, and its header would \
         be read as tokens. Write the tokens without one (`array.tofile(path)`, or an \
         `np.memmap` file) or convert the file to a Megatron shard"
    ))
}

/// xxh3 of the first and the last [`SAMPLE`] bytes of the data.
fn sample_hash(data: &[u8]) -> u64 {
    let head = &data[..data.len().min(SAMPLE)];
    let tail = &data[data.len().saturating_sub(SAMPLE)..];
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(head);
    h.update(tail);
    h.digest()
}

/// xxh3 of the whole cache file except the checksum field itself.
fn cache_checksum(bytes: &[u8]) -> u64 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(&bytes[..CHECKSUM_AT]);
    h.update(&bytes[CHECKSUM_AT + 8..]);
    h.digest()
}

/// Maps the cache if it exists and matches `key` and its checksum; `None` means rebuild.
fn read_cache(path: &Path, key: &CacheKey) -> Option<DocEnds> {
    let mapped = map_file(path).ok()?;
    let (map, len) = (mapped.map?, mapped.len);
    if (len as usize) < CACHE_HEADER || &map[..8] != CACHE_MAGIC {
        return None;
    }
    let u32_at = |o: usize| u32::from_le_bytes([map[o], map[o + 1], map[o + 2], map[o + 3]]);
    let stored = CacheKey {
        item_size: u32_at(12),
        eos: le_u64(&map, 16),
        file_len: le_u64(&map, 24),
        mtime_s: le_u64(&map, 32) as i64,
        mtime_ns: u32_at(40),
        sample: le_u64(&map, 56),
        dev: le_u64(&map, 72),
        ino: le_u64(&map, 80),
        ctime_s: le_u64(&map, 88) as i64,
        ctime_ns: u32_at(96),
    };
    let count = le_u64(&map, 48);
    // u128: a corrupt count must not wrap the size check.
    let expected = CACHE_HEADER as u128 + 8 * u128::from(count);
    if u32_at(8) != CACHE_VERSION || stored != *key || u128::from(len) != expected {
        return None;
    }
    if cache_checksum(&map) != le_u64(&map, CHECKSUM_AT) {
        tracing::warn!("{}: checksum mismatch; rebuilding", path.display());
        return None;
    }
    Some(DocEnds::Mapped(map, count))
}

/// Writes the cache through a temporary name unique to this process and call, removed
/// on any failure, so a crash never leaves half a cache and a failure leaves nothing.
fn write_cache(path: &Path, key: &CacheKey, ends: &[u64]) -> Result<()> {
    let mut body = Vec::with_capacity(CACHE_HEADER + ends.len() * 8);
    body.extend_from_slice(CACHE_MAGIC);
    body.extend_from_slice(&CACHE_VERSION.to_le_bytes());
    body.extend_from_slice(&key.item_size.to_le_bytes());
    body.extend_from_slice(&key.eos.to_le_bytes());
    body.extend_from_slice(&key.file_len.to_le_bytes());
    body.extend_from_slice(&key.mtime_s.to_le_bytes());
    body.extend_from_slice(&key.mtime_ns.to_le_bytes());
    body.extend_from_slice(&0u32.to_le_bytes());
    body.extend_from_slice(&(ends.len() as u64).to_le_bytes());
    body.extend_from_slice(&key.sample.to_le_bytes());
    body.extend_from_slice(&0u64.to_le_bytes());
    body.extend_from_slice(&key.dev.to_le_bytes());
    body.extend_from_slice(&key.ino.to_le_bytes());
    body.extend_from_slice(&key.ctime_s.to_le_bytes());
    body.extend_from_slice(&key.ctime_ns.to_le_bytes());
    body.extend_from_slice(&0u32.to_le_bytes());
    debug_assert_eq!(body.len(), CACHE_HEADER);
    for &e in ends {
        body.extend_from_slice(&e.to_le_bytes());
    }
    let sum = cache_checksum(&body);
    body[CHECKSUM_AT..CHECKSUM_AT + 8].copy_from_slice(&sum.to_le_bytes());
    if let Some(dir) = path.parent() {
        if !dir.as_os_str().is_empty() {
            std::fs::create_dir_all(dir).map_err(|e| CorpusError::io(dir, "create_dir", e))?;
        }
    }
    // A taken temporary name is skipped, not an error: a write killed between create and
    // rename leaves one, and in a container the daemon is pid 1 at every start, so the
    // same name came back and the cache was never written again. A cache needs no
    // fsync: a torn one fails its checksum and is rebuilt.
    let pid = std::process::id();
    super::identity::write_through_new(path, &body, |n| {
        super::megatron::with_suffix(path, &format!("tmp{pid}-{n}"))
    })
    .map_err(|e| CorpusError::io(path, "write", e))
}
