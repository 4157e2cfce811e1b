//! The Megatron writer: a shard written the way megatron-core's builder writes one, through
//! temporary names renamed into place only when complete (what `synth` and `tokenize`
//! use). Split from `megatron` (the reader) to keep each file to one concept.
//!
//! Also the two helpers every writer of a file that must survive a crash shares: a
//! temporary file removed unless it was renamed into place (`TempPath`), and a whole
//! file written durably (file fsynced before its rename, directory fsynced after it:
//! `write_durably`), so that after a power loss a file under its final name is whole.

use std::fs::File;
use std::io::{BufWriter, Seek, Write};
use std::path::{Path, PathBuf};

use super::error::{CorpusError, Result};
use super::megatron::{with_suffix, HEADER_LEN, MAGIC};
use super::tokens::DType;

/// A temporary file that is removed when dropped unless [`TempPath::persist`] renamed it
/// into place: a writer that fails or is dropped midway leaves nothing behind.
#[derive(Debug)]
pub(crate) struct TempPath {
    /// Emptied once the file was renamed away (no flag: writers hold one per file and
    /// their size matters to the enums that carry them).
    path: PathBuf,
}

impl TempPath {
    /// Takes charge of `path`, a file the caller just created.
    pub(crate) fn new(path: PathBuf) -> TempPath {
        TempPath { path }
    }

    /// The temporary name.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Renames the file to `to`, then fsyncs `to`'s directory so that the rename itself
    /// survives a power loss. On a failed rename the file is still removed on drop.
    pub(crate) fn persist(self, to: &Path) -> Result<()> {
        self.rename_to(to)?;
        sync_dir_of(to)
    }

    /// Renames the file to `to` without making the rename durable (for caches, which a
    /// checksum guards); on a failed rename the file is still removed on drop.
    pub(crate) fn rename_to(mut self, to: &Path) -> Result<()> {
        std::fs::rename(&self.path, to).map_err(|e| CorpusError::io(to, "rename", e))?;
        self.path = PathBuf::new();
        Ok(())
    }
}

impl Drop for TempPath {
    fn drop(&mut self) {
        if !self.path.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Fsyncs the directory that holds `path`, which makes a rename or a creation in it
/// durable (a file's own fsync does not cover its directory entry).
pub(crate) fn sync_dir_of(path: &Path) -> Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| CorpusError::io(dir, "fsync directory", e))
}

/// Writes `bytes` to `path` through the temporary name `tmp`: written, fsynced, renamed
/// over `path`, and the directory fsynced. A reader (or a reboot) sees the whole new file
/// or the old state, never a missing or empty one; on error `tmp` is removed.
pub(crate) fn write_durably(path: &Path, tmp: &Path, bytes: &[u8]) -> Result<()> {
    write_synced(tmp, bytes)?.persist(path)
}

/// Writes `bytes` to the temporary file `tmp` and fsyncs it, for a later
/// [`TempPath::persist`]; on error (and if the result is dropped) `tmp` is removed.
pub(crate) fn write_synced(tmp: &Path, bytes: &[u8]) -> Result<TempPath> {
    let mut file = File::create(tmp).map_err(|e| CorpusError::io(tmp, "create", e))?;
    let guard = TempPath::new(tmp.to_path_buf());
    file.write_all(bytes)
        .map_err(|e| CorpusError::io(tmp, "write", e))?;
    file.sync_all()
        .map_err(|e| CorpusError::io(tmp, "fsync", e))?;
    Ok(guard)
}

/// Writes a Megatron shard the way megatron-core's builder does (one sequence per
/// document), through temporary names that are renamed into place only by
/// [`MegatronWriter::finish`], so an interrupted writer never leaves a shard that opens.
pub struct MegatronWriter {
    prefix: PathBuf,
    bin: BufWriter<File>,
    /// `<prefix>.bin.tmp`, removed if the writer is dropped before [`Self::finish`].
    bin_tmp: TempPath,
    dtype: DType,
    lengths: Vec<i32>,
    /// Bytes of sparse documents not yet skipped over in `.bin`.
    hole: u64,
}

impl MegatronWriter {
    /// Starts a shard at `prefix` with token dtype `dtype` (any dtype with a Megatron code).
    pub fn create(prefix: &Path, dtype: DType) -> Result<MegatronWriter> {
        if dtype.megatron_code().is_none() {
            return Err(CorpusError::invalid(
                prefix,
                format!("Megatron has no dtype code for {dtype}; use int32"),
            ));
        }
        let bin_tmp = with_suffix(prefix, "bin.tmp");
        let file = File::create(&bin_tmp).map_err(|e| CorpusError::io(&bin_tmp, "create", e))?;
        let bin_tmp = TempPath::new(bin_tmp);
        Ok(MegatronWriter {
            prefix: prefix.to_path_buf(),
            bin: BufWriter::with_capacity(8 << 20, file),
            bin_tmp,
            dtype,
            lengths: Vec::new(),
            hole: 0,
        })
    }

    /// Appends one document given as raw little-endian bytes of the writer's dtype.
    pub fn add_document_bytes(&mut self, bytes: &[u8]) -> Result<()> {
        let size = self.dtype.size();
        let tokens = bytes.len() / size;
        if bytes.len() % size != 0 || tokens > i32::MAX as usize {
            return Err(CorpusError::invalid(
                &self.prefix,
                format!(
                    "document {} of {} bytes cannot be stored as {} sequence",
                    self.lengths.len(),
                    bytes.len(),
                    self.dtype
                ),
            ));
        }
        if self.hole > 0 {
            let hole = i64::try_from(std::mem::take(&mut self.hole)).unwrap_or(i64::MAX);
            self.bin
                .seek(std::io::SeekFrom::Current(hole))
                .map_err(|e| CorpusError::io(self.bin_tmp.path(), "seek", e))?;
        }
        self.bin
            .write_all(bytes)
            .map_err(|e| CorpusError::io(self.bin_tmp.path(), "write", e))?;
        self.lengths.push(tokens as i32);
        Ok(())
    }

    /// Appends a document of `tokens` tokens that is never written: `.bin` gets a hole
    /// that reads as zeros and takes no disk, so a scale-test corpus (`synth --sparse`)
    /// has a real index over 10^13 tokens in a few GB.
    pub fn add_sparse_document(&mut self, tokens: u64) -> Result<()> {
        let len = i32::try_from(tokens).map_err(|_| {
            CorpusError::invalid(
                &self.prefix,
                format!(
                    "document {} of {tokens} tokens cannot be stored as a Megatron sequence",
                    self.lengths.len()
                ),
            )
        })?;
        self.hole += tokens * self.dtype.size() as u64;
        self.lengths.push(len);
        Ok(())
    }

    /// Documents written so far.
    pub fn documents(&self) -> u64 {
        self.lengths.len() as u64
    }

    /// Flushes `.bin`, writes `.idx`, and renames both into place (`.bin` first, so that a
    /// crash in between leaves an `.idx`-less prefix that no reader accepts). Each file
    /// is fsynced before its rename and the directory after it, so a shard whose `.idx`
    /// survives a power loss is whole. A writer given no document is refused here, with
    /// its temporary file removed: its shard would be one that every reader refuses.
    pub fn finish(self) -> Result<PathBuf> {
        let MegatronWriter {
            prefix,
            bin,
            bin_tmp,
            dtype,
            lengths,
            hole,
        } = self;
        if lengths.is_empty() {
            return Err(CorpusError::invalid(
                with_suffix(&prefix, "idx"),
                "empty shard: no document was written, and a shard without documents is \
                 one no reader opens; nothing was written",
            ));
        }
        let mut file = bin
            .into_inner()
            .map_err(|e| CorpusError::io(bin_tmp.path(), "flush", e.into_error()))?;
        if hole > 0 {
            // Trailing sparse documents: the length says where `.bin` ends.
            let end = file
                .stream_position()
                .map_err(|e| CorpusError::io(bin_tmp.path(), "seek", e))?;
            file.set_len(end + hole)
                .map_err(|e| CorpusError::io(bin_tmp.path(), "set_len", e))?;
        }
        file.sync_all()
            .map_err(|e| CorpusError::io(bin_tmp.path(), "fsync", e))?;
        drop(file);

        let n = lengths.len() as u64;
        let mut out = Vec::with_capacity(HEADER_LEN + lengths.len() * 20 + 16);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&1u64.to_le_bytes());
        out.push(dtype.megatron_code().unwrap_or(4));
        out.extend_from_slice(&n.to_le_bytes());
        out.extend_from_slice(&(n + 1).to_le_bytes());
        for &l in &lengths {
            out.extend_from_slice(&l.to_le_bytes());
        }
        let mut ptr = 0i64;
        for &l in &lengths {
            out.extend_from_slice(&ptr.to_le_bytes());
            ptr += i64::from(l) * dtype.size() as i64;
        }
        for d in 0..=n {
            out.extend_from_slice(&(d as i64).to_le_bytes());
        }
        let idx_tmp = write_synced(&with_suffix(&prefix, "idx.tmp"), &out)?;
        let bin_path = with_suffix(&prefix, "bin");
        let idx_path = with_suffix(&prefix, "idx");
        // An old .idx must not pair with the new .bin while we rename.
        match std::fs::remove_file(&idx_path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(CorpusError::io(&idx_path, "remove", e)),
        }
        bin_tmp.persist(&bin_path)?;
        idx_tmp.persist(&idx_path)?;
        Ok(prefix)
    }
}
