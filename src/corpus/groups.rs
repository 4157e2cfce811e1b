//! The group sidecar: `<prefix>.groups.npy`, one uint64/int64 per document naming the
//! repository or book it belongs to.
//!
//! A group's documents must be contiguous and in reading order, so the whole sidecar
//! reduces to a list of runs. The planner works on runs (a group is one unit to shuffle,
//! or one long sequence to pack), so that is what opening builds: one pass over the
//! ids, O(groups) memory, and the sidecar mapping is dropped afterwards.

use std::collections::HashMap;
use std::io::Cursor;
use std::path::Path;

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
