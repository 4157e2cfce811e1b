//! Errors of the corpus layer.
//!
//! Every error names the file it is about and, where one exists, the document index,
//! sequence index or byte offset at fault, because an operator facing a bad shard in a
//! multi-TB corpus needs to know exactly which bytes to look at.

use std::path::PathBuf;

/// Why a shard, a sidecar or a cached index could not be used.
#[derive(Debug, thiserror::Error)]
pub enum CorpusError {
    /// An OS-level failure (open, stat, mmap, read, write).
    #[error("{path}: {op}: {source}")]
    Io {
        /// The file the operation was on.
        path: PathBuf,
        /// What was being done ("open", "mmap", ...).
        op: &'static str,
        /// The underlying OS error.
        source: std::io::Error,
    },
    /// The file content does not follow its format; `what` says how, with the offset.
    #[error("{path}: {what}")]
    Invalid {
        /// The file at fault.
        path: PathBuf,
        /// A precise description: what is wrong and where (byte, sequence or document).
        what: String,
    },
    /// A path given on the command line or in the config does not name a shard.
    #[error("{path}: {what}")]
    NotFound {
        /// The path as given.
        path: PathBuf,
        /// What was looked for.
        what: String,
    },
    /// A document index outside the shard.
    #[error("{path}: document {doc} out of range (the shard has {count} documents)")]
    DocOutOfRange {
        /// The shard.
        path: PathBuf,
        /// The index asked for.
        doc: u64,
        /// How many documents exist.
        count: u64,
    },
}

impl CorpusError {
    /// Builds an [`CorpusError::Invalid`]; the common case, so it gets a short name.
    pub fn invalid(path: impl Into<PathBuf>, what: impl Into<String>) -> Self {
        CorpusError::Invalid {
            path: path.into(),
            what: what.into(),
        }
    }

    /// Wraps an I/O error with the path and the operation that failed.
    pub fn io(path: impl Into<PathBuf>, op: &'static str, source: std::io::Error) -> Self {
        CorpusError::Io {
            path: path.into(),
            op,
            source,
        }
    }
}

/// Result alias for the corpus layer.
pub type Result<T, E = CorpusError> = std::result::Result<T, E>;
