//! The Megatron writer: a shard written the way megatron-core's builder writes one, through
//! temporary names renamed into place only when complete (what `synth` and `tokenize`
//! use). Split from `megatron` (the reader) to keep each file to one concept.

use std::fs::File;
use std::io::{BufWriter, Seek, Write};
use std::path::{Path, PathBuf};

use super::error::{CorpusError, Result};
use super::megatron::{with_suffix, HEADER_LEN, MAGIC};
use super::tokens::DType;

/// Writes a Megatron shard the way megatron-core's builder does (one sequence per
/// document), through temporary names that are renamed into place only by
/// [`MegatronWriter::finish`], so an interrupted writer never leaves a shard that opens.
pub struct MegatronWriter {
    prefix: PathBuf,
    bin: BufWriter<File>,
    bin_tmp: PathBuf,
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
                .map_err(|e| CorpusError::io(&self.bin_tmp, "seek", e))?;
        }
        self.bin
            .write_all(bytes)
            .map_err(|e| CorpusError::io(&self.bin_tmp, "write", e))?;
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
    /// crash in between leaves an `.idx`-less prefix that no reader accepts).
    pub fn finish(self) -> Result<PathBuf> {
        let MegatronWriter {
            prefix,
            bin,
            bin_tmp,
            dtype,
            lengths,
            hole,
        } = self;
        let mut file = bin
            .into_inner()
            .map_err(|e| CorpusError::io(&bin_tmp, "flush", e.into_error()))?;
        if hole > 0 {
            // Trailing sparse documents: the length says where `.bin` ends.
            let end = file
                .stream_position()
                .map_err(|e| CorpusError::io(&bin_tmp, "seek", e))?;
            file.set_len(end + hole)
                .map_err(|e| CorpusError::io(&bin_tmp, "set_len", e))?;
        }
        file.sync_all()
            .map_err(|e| CorpusError::io(&bin_tmp, "fsync", e))?;
        drop(file);

        let idx_tmp = with_suffix(&prefix, "idx.tmp");
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
        std::fs::write(&idx_tmp, &out).map_err(|e| CorpusError::io(&idx_tmp, "write", e))?;
        let bin_path = with_suffix(&prefix, "bin");
        let idx_path = with_suffix(&prefix, "idx");
        // An old .idx must not pair with the new .bin while we rename.
        match std::fs::remove_file(&idx_path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(CorpusError::io(&idx_path, "remove", e)),
        }
        std::fs::rename(&bin_tmp, &bin_path)
            .map_err(|e| CorpusError::io(&bin_path, "rename", e))?;
        std::fs::rename(&idx_tmp, &idx_path)
            .map_err(|e| CorpusError::io(&idx_path, "rename", e))?;
        Ok(prefix)
    }
}
