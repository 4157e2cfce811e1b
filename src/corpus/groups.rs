//! The group sidecar: `<prefix>.groups.npy`, one uint64/int64 per document naming the
//! repository or book it belongs to.
//!
//! A group's documents must be contiguous and in reading order, so the whole sidecar
//! reduces to a list of runs. The planner works on runs (a group is one unit to shuffle,
//! or one long sequence to pack), so that is what opening builds: one pass over the
//! ids, O(groups) memory, and the sidecar mapping is dropped afterwards.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Cursor};
use std::path::{Path, PathBuf};

use npyz::WriterBuilder;

use serde::Serialize;

use super::error::{CorpusError, Result};
use super::writer::TempPath;
use super::{map_file, FileStamp};

/// What a group runs file ([`Groups::encode`]) starts with; the digit is its version.
const RUNS_MAGIC: &[u8; 8] = b"MRRUNS01";

/// The deepest a sidecar's `.npy` header text nests brackets: a dict holding a shape
/// tuple is 2, and 3 leaves room for a list in `descr`. npyz parses the text with a
/// backtracking parser whose time grows exponentially with the nesting (a 250-byte
/// header of 53 `{` did not finish in minutes), so deeper text is refused before it.
const NPY_MAX_NESTING: usize = 3;

/// The fixed start of a numpy `.npy` file: magic, format version and the header's length,
/// read without trusting that length (npyz allocates it before reading the header).
#[derive(Debug, Clone, Copy)]
pub(crate) struct NpyPreamble {
    /// Format version, major (1 to 3) and minor (0).
    pub(crate) major: u8,
    pub(crate) minor: u8,
    /// Where the header text starts (10 in version 1, 12 after).
    pub(crate) text_at: usize,
    /// The header text's length as the file claims it; `None` when the file ends first.
    pub(crate) header_len: Option<u64>,
}

impl NpyPreamble {
    /// The preamble, when `bytes` start with the `.npy` magic and a version numpy defined.
    pub(crate) fn of(bytes: &[u8]) -> Option<NpyPreamble> {
        let (&major, &minor) = (bytes.get(6)?, bytes.get(7)?);
        if !bytes.starts_with(b"\x93NUMPY") || !(1..=3).contains(&major) || minor != 0 {
            return None;
        }
        // A u16 at byte 8 in version 1, a u32 in versions 2 and 3.
        let (len_bytes, text_at) = if major == 1 { (2, 10) } else { (4, 12) };
        let header_len = bytes
            .get(8..8 + len_bytes)
            .map(|b| b.iter().rev().fold(0u64, |acc, &x| acc << 8 | u64::from(x)));
        Some(NpyPreamble {
            major,
            minor,
            text_at,
            header_len,
        })
    }

    /// The header text, when the file holds all of it.
    pub(crate) fn text<'a>(&self, bytes: &'a [u8]) -> Option<&'a [u8]> {
        let end = self
            .text_at
            .checked_add(usize::try_from(self.header_len?).ok()?)?;
        bytes.get(self.text_at..end)
    }

    /// Where the header text first nests brackets more than [`NPY_MAX_NESTING`] deep
    /// (outside quoted strings), as a byte of the file; `None` when it never does or the
    /// text is not whole.
    pub(crate) fn nested_too_deep(&self, bytes: &[u8]) -> Option<usize> {
        let mut depth = 0usize;
        let mut quote = None;
        for (i, &b) in self.text(bytes)?.iter().enumerate() {
            match (quote, b) {
                (Some(q), _) if b == q => quote = None,
                (Some(_), _) => {}
                (None, b'\'' | b'"') => quote = Some(b),
                (None, b'{' | b'[' | b'(') => {
                    depth += 1;
                    if depth > NPY_MAX_NESTING {
                        return Some(self.text_at + i);
                    }
                }
                (None, b'}' | b']' | b')') => depth = depth.saturating_sub(1),
                _ => {}
            }
        }
        None
    }

    /// The dimensions of every `shape` value in the header's top-level dict, each as its
    /// text, read by py_literal, the parser npyz itself uses: so the check sees the
    /// header as npyz will, whatever its quotes, escapes in the key, or tuple or list.
    /// Empty when the text does not parse (npyz then refuses it, with no product taken).
    pub(crate) fn shapes(&self, bytes: &[u8]) -> Vec<Vec<String>> {
        let Some(text) = self.text(bytes).and_then(|t| std::str::from_utf8(t).ok()) else {
            return Vec::new();
        };
        let Ok(py_literal::Value::Dict(items)) = text.trim().parse::<py_literal::Value>() else {
            return Vec::new();
        };
        items
            .iter()
            .filter(|(k, _)| matches!(k, py_literal::Value::String(s) if s == "shape"))
            .filter_map(|(_, v)| match v {
                py_literal::Value::Tuple(d) | py_literal::Value::List(d) => {
                    Some(d.iter().map(|x| x.to_string()).collect())
                }
                _ => None,
            })
            .collect()
    }
}

/// A maximal run of documents sharing one group id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct GroupRun {
    /// The id from the sidecar.
    pub id: u64,
    /// First document of the run, within the shard.
    pub first_doc: u64,
    /// Number of documents in the run (at least 1).
    pub docs: u64,
}

/// The groups of one shard, as runs in document order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Groups {
    runs: Vec<GroupRun>,
}

impl Groups {
    /// Reads and checks `path` against a shard of `documents` documents.
    pub fn open(path: &Path, documents: u64) -> Result<Groups> {
        Groups::open_stamped(path, documents).map(|(g, _)| g)
    }

    /// [`Groups::open`], with the state of the very file that was read (from the mapped
    /// descriptor), for callers that key a cache of the runs by it.
    pub(crate) fn open_stamped(path: &Path, documents: u64) -> Result<(Groups, FileStamp)> {
        let mapped = map_file(path)?;
        let stamp = mapped.stamp;
        let bytes: &[u8] = mapped.map.as_deref().unwrap_or(&[]);
        let bad = |what: String| CorpusError::invalid(path, what);
        // npyz allocates the length the header claims before it reads the header (4 GiB
        // for a 12-byte file of format 2, which aborts a process under `ulimit -v` or
        // strict overcommit): a claim past the end of the file is refused first.
        if let Some(pre) = NpyPreamble::of(bytes) {
            if let (None, Some(n)) = (pre.text(bytes), pre.header_len) {
                return Err(bad(format!(
                    "groups sidecar is not a valid .npy file: its header claims {n} bytes \
                     from byte {}, past the end of the {}-byte file",
                    pre.text_at,
                    bytes.len()
                )));
            }
        }
        if let Some(at) = NpyPreamble::of(bytes).and_then(|pre| pre.nested_too_deep(bytes)) {
            return Err(bad(format!(
                "groups sidecar is not a valid .npy file: its header nests brackets more \
                 than {NPY_MAX_NESTING} deep at byte {at}"
            )));
        }
        // npyz multiplies the dimensions while it parses the header, which overflows (a
        // panic where overflow checks are on) for a shape like (2^32, 2^32): a shape of
        // more than one dimension is refused from the text first, however the header
        // writes it (either quote, an escaped key, a tuple or a list).
        let shapes = NpyPreamble::of(bytes).map_or_else(Vec::new, |pre| pre.shapes(bytes));
        if let Some(dims) = shapes.iter().find(|dims| dims.len() != 1) {
            return Err(bad(format!(
                "groups sidecar has shape [{}]; expected one dimension",
                dims.join(", ")
            )));
        }
        let mut cursor = Cursor::new(bytes);
        let header = npyz::NpyHeader::from_reader(&mut cursor).map_err(|e| {
            // npyz's parse errors draw a caret diagram over several lines: one line
            // here, so the message stays one log entry.
            let e = e
                .to_string()
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ");
            bad(format!("groups sidecar is not a valid .npy file: {e}"))
        })?;
        let data_at = cursor.position() as usize;
        let npy = npyz::NpyFile::with_header(header, Cursor::new(&bytes[data_at..]));
        let descr = npy.dtype().descr();
        let signed = match descr.as_str() {
            "'<u8'" => false,
            "'<i8'" => true,
            other => {
                return Err(bad(format!(
                    "groups sidecar has dtype {other}; expected little-endian uint64 ('<u8') \
                     or int64 ('<i8')"
                )))
            }
        };
        if npy.shape().len() != 1 {
            return Err(bad(format!(
                "groups sidecar has shape {:?}; expected one dimension",
                npy.shape()
            )));
        }
        let n = npy.shape()[0];
        if n != documents {
            return Err(bad(format!(
                "groups sidecar has {n} entries but the shard has {documents} documents"
            )));
        }
        let body = &bytes[data_at..];
        // u128: `n` comes from the file (checked equal to `documents`, but no smaller).
        let want = 8 * u128::from(n);
        let have = body.len() as u128;
        if have < want {
            return Err(bad(format!(
                "groups sidecar is truncated: {} data bytes for {n} entries (byte {})",
                body.len(),
                data_at + body.len()
            )));
        }
        if have > want {
            return Err(bad(format!(
                "groups sidecar has {} unexpected bytes after its {n} entries (from byte {}; \
                 the file is {} bytes)",
                have - want,
                data_at as u128 + want,
                bytes.len()
            )));
        }
        let mut runs: Vec<GroupRun> = Vec::new();
        let mut first_run_of: HashMap<u64, usize> = HashMap::new();
        for (doc, chunk) in body.chunks_exact(8).take(n as usize).enumerate() {
            let raw = u64::from_le_bytes([
                chunk[0], chunk[1], chunk[2], chunk[3], chunk[4], chunk[5], chunk[6], chunk[7],
            ]);
            if signed && (raw as i64) < 0 {
                return Err(bad(format!(
                    "group id {} at document {doc} is negative; every document needs a group",
                    raw as i64
                )));
            }
            match runs.last_mut() {
                Some(run) if run.id == raw => run.docs += 1,
                _ => {
                    if let Some(&r) = first_run_of.get(&raw) {
                        let prev = runs[r];
                        return Err(bad(format!(
                            "group {raw} is not contiguous: documents {}..{} and again at \
                             document {doc}",
                            prev.first_doc,
                            prev.first_doc + prev.docs
                        )));
                    }
                    first_run_of.insert(raw, runs.len());
                    runs.push(GroupRun {
                        id: raw,
                        first_doc: doc as u64,
                        docs: 1,
                    });
                }
            }
        }
        Ok((Groups { runs }, stamp))
    }

    /// The runs as the identity cache keeps them (docs/FORMATS.md, "Identity cache"):
    /// [`RUNS_MAGIC`], the number of runs, each run's id and document count, and an
    /// xxh3-64 of all of that, as little-endian u64s. 16 bytes per group, so a start
    /// reads O(groups) instead of the sidecar's 8 bytes per document.
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(24 + 16 * self.runs.len());
        out.extend_from_slice(RUNS_MAGIC);
        out.extend_from_slice(&(self.runs.len() as u64).to_le_bytes());
        for r in &self.runs {
            out.extend_from_slice(&r.id.to_le_bytes());
            out.extend_from_slice(&r.docs.to_le_bytes());
        }
        let sum = xxhash_rust::xxh3::xxh3_64(&out);
        out.extend_from_slice(&sum.to_le_bytes());
        out
    }

    /// The checksum that ends [`Groups::encode`]'s bytes, which an identity cache entry
    /// records to pair itself with its runs file.
    pub(crate) fn encoded_sum(bytes: &[u8]) -> Option<u64> {
        let at = bytes.len().checked_sub(8)?;
        Some(super::le_u64(bytes, at))
    }

    /// Reads [`Groups::encode`]'s bytes back for a shard of `documents` documents, or
    /// says why they are not that: the cache is checked before it is trusted, so a
    /// truncated, corrupt or foreign file costs a read of the sidecar, never a wrong plan.
    pub(crate) fn decode(bytes: &[u8], documents: u64) -> std::result::Result<Groups, String> {
        if bytes.len() < 24 || &bytes[..8] != RUNS_MAGIC {
            return Err(format!("not a group runs file ({} bytes)", bytes.len()));
        }
        let n = super::le_u64(bytes, 8);
        let want = n.checked_mul(16).and_then(|b| b.checked_add(24));
        if want != Some(bytes.len() as u64) {
            return Err(format!("{} bytes for {n} runs", bytes.len()));
        }
        let body = &bytes[..bytes.len() - 8];
        let sum = Groups::encoded_sum(bytes).unwrap_or_default();
        if xxhash_rust::xxh3::xxh3_64(body) != sum {
            return Err("checksum mismatch".into());
        }
        let mut runs = Vec::with_capacity(n as usize);
        let mut first_doc = 0u64;
        for pair in body[16..].chunks_exact(16) {
            let (id, docs) = (super::le_u64(pair, 0), super::le_u64(pair, 8));
            if docs == 0 {
                return Err(format!("group {id} has no documents"));
            }
            runs.push(GroupRun {
                id,
                first_doc,
                docs,
            });
            first_doc = first_doc.saturating_add(docs);
        }
        if first_doc != documents {
            return Err(format!(
                "the runs cover {first_doc} documents, the shard has {documents}"
            ));
        }
        Ok(Groups { runs })
    }

    /// The runs, in document order.
    pub fn runs(&self) -> &[GroupRun] {
        &self.runs
    }

    /// Number of groups.
    pub fn len(&self) -> usize {
        self.runs.len()
    }

    /// True for a sidecar over zero documents (never for an opened shard).
    pub fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }

    /// The group id of document `doc` (binary search over the runs).
    pub fn group_of(&self, doc: u64) -> Option<u64> {
        let i = self.runs.partition_point(|r| r.first_doc <= doc);
        let run = self.runs.get(i.checked_sub(1)?)?;
        (doc < run.first_doc + run.docs).then_some(run.id)
    }
}

/// Streams a sidecar of a known number of ids to `<path>.tmp` and renames it into place
/// only in [`GroupsWriter::finish`], so writers (`synth`, `tokenize`) never leave a
/// half-written sidecar under the real name and need not hold every id in memory.
pub struct GroupsWriter {
    path: PathBuf,
    /// `<path>.tmp`, removed unless [`GroupsWriter::finish`] renamed it into place.
    tmp: TempPath,
    npy: npyz::NpyWriter<u64, BufWriter<File>>,
    expected: u64,
    written: u64,
}

impl GroupsWriter {
    /// Starts `path` (a `<prefix>.groups.npy`) for exactly `documents` uint64 ids.
    pub fn create(path: &Path, documents: u64) -> Result<GroupsWriter> {
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let file = File::create(&tmp).map_err(|e| CorpusError::io(&tmp, "create", e))?;
        let tmp = TempPath::new(tmp);
        let npy = npyz::WriteOptions::<u64>::new()
            .default_dtype()
            .shape(&[documents])
            .writer(BufWriter::with_capacity(1 << 20, file))
            .begin_nd()
            .map_err(|e| CorpusError::io(tmp.path(), "write", e))?;
        Ok(GroupsWriter {
            path: path.to_path_buf(),
            tmp,
            npy,
            expected: documents,
            written: 0,
        })
    }

    /// Appends the group id of the next document.
    pub fn push(&mut self, id: u64) -> Result<()> {
        self.written += 1;
        self.npy
            .push(&id)
            .map_err(|e| CorpusError::io(self.tmp.path(), "write", e))
    }

    /// Checks the count, flushes and fsyncs the temporary file, and renames it into place
    /// (fsyncing the directory after). On any error the temporary file is removed.
    pub fn finish(self) -> Result<PathBuf> {
        let GroupsWriter {
            path,
            tmp,
            npy,
            expected,
            written,
        } = self;
        if written != expected {
            return Err(CorpusError::invalid(
                tmp.path(),
                format!("groups sidecar got {written} ids for {expected} documents"),
            ));
        }
        npy.finish()
            .map_err(|e| CorpusError::io(tmp.path(), "flush", e))?;
        File::open(tmp.path())
            .and_then(|f| f.sync_all())
            .map_err(|e| CorpusError::io(tmp.path(), "fsync", e))?;
        tmp.persist(&path)?;
        Ok(path)
    }
}

/// Writes a whole sidecar at once (through a temporary name), for ids already in memory.
pub fn write(path: &Path, ids: &[u64]) -> Result<PathBuf> {
    let mut w = GroupsWriter::create(path, ids.len() as u64)?;
    for &id in ids {
        w.push(id)?;
    }
    w.finish()
}
