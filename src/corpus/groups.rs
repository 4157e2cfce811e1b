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
use super::map_file;

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
        let (map, _) = map_file(path)?;
        let bytes: &[u8] = map.as_deref().unwrap_or(&[]);
        let bad = |what: String| CorpusError::invalid(path, what);
        let mut cursor = Cursor::new(bytes);
        let header = npyz::NpyHeader::from_reader(&mut cursor)
            .map_err(|e| bad(format!("groups sidecar is not a valid .npy file: {e}")))?;
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
        if (body.len() as u64) < n * 8 {
            return Err(bad(format!(
                "groups sidecar is truncated: {} data bytes for {n} entries (byte {})",
                body.len(),
                data_at + body.len()
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
    tmp: PathBuf,
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
        let npy = npyz::WriteOptions::<u64>::new()
            .default_dtype()
            .shape(&[documents])
            .writer(BufWriter::with_capacity(1 << 20, file))
            .begin_nd()
            .map_err(|e| CorpusError::io(&tmp, "write", e))?;
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
            .map_err(|e| CorpusError::io(&self.tmp, "write", e))
    }

    /// Checks the count, flushes and fsyncs the temporary file, and renames it into place.
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
                &tmp,
                format!("groups sidecar got {written} ids for {expected} documents"),
            ));
        }
        npy.finish()
            .map_err(|e| CorpusError::io(&tmp, "flush", e))?;
        File::open(&tmp)
            .and_then(|f| f.sync_all())
            .map_err(|e| CorpusError::io(&tmp, "fsync", e))?;
        std::fs::rename(&tmp, &path).map_err(|e| CorpusError::io(&path, "rename", e))?;
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
