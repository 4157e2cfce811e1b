//! `millrace tokenize`: turns JSONL text into a Megatron `.bin`/`.idx` shard with a
//! HuggingFace `tokenizer.json`, plus the `.groups.npy` sidecar that repo/book grouping
//! needs (which Megatron's own preprocessing cannot write).
//!
//! The pipeline is bounded everywhere. One reader thread decompresses the inputs (plain,
//! gzip or zstd, recognised by their magic bytes) and cuts them into chunks of whole
//! lines; worker threads parse and tokenize chunks; the calling thread puts the results
//! back in input order and writes them. A fixed number of chunk slots bounds what is in
//! flight, so memory does not grow with the input or behind one slow chunk, and the
//! output is a pure function of the inputs and options: the thread count changes only
//! the speed. A line longer than `--max-line-bytes` is counted as bad and dropped as it
//! streams past, never held whole, and large documents enter the tokenizer (which needs
//! ~130 bytes per byte) only as far as an `EncodeGate` budget allows, so no input can
//! make a run's memory grow without bound.
//!
//! Without grouping, documents stream into the shard in input order. With a group field,
//! pass 1 appends each document's tokens to a spill file and keeps a small record (group
//! key, order key, input position, spill offset, length); records are sorted in memory up
//! to a budget, in sorted runs on disk past it, then merged, and pass 2 copies the spans
//! from the spill file into the shard in sorted order while writing the sidecar. Groups
//! therefore come out contiguous, ordered by their key (documents without a group first,
//! each its own group), and within a group by the order field, ties by input order.
//!
//! Outputs are trustworthy: old outputs at the prefix are removed before writing starts,
//! everything is written under temporary names, and the `.idx` (which makes a shard
//! openable) is the very last rename. An interrupted run leaves nothing that opens, a
//! failed run leaves nothing at all, and a rerun replaces everything.
//!
//! At corpus scale (`--shard-tokens`, `--num-shards N --shard-index i`) a run writes many
//! shards `<out>-<run>-<k>` and a manifest, and `--merge` lists the shards of all runs;
//! see `shards` for who writes what.
//!
//! The files follow a document through the run: this one holds the options, the summary
//! and the driver; `setup` the tokenizer, EOS and dtype; `input` files -> chunks of
//! lines; `pipeline` chunk -> tokens and keys; `sink` results -> shards or spill file;
//! `sort` the external sort of group records; `shards` the run's share and the shard
//! cutting; `manifest` the manifests and `--merge`; `report` the errors and the summary.
//! Each file's unit tests sit beside what they test.

use std::borrow::Cow;
use std::cmp::Ordering as CmpOrdering;
use std::collections::{BTreeMap, BinaryHeap};
use std::fmt;
use std::fmt::Write as _;
use std::fs::File;
use std::io::{self, BufRead, BufReader, BufWriter, IsTerminal, Read, Write};
use std::os::unix::fs::FileExt;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use tokenizers::{Model, OffsetReferential, OffsetType, PreTokenizer, Tokenizer};

use crate::corpus::groups::GroupsWriter;
use crate::corpus::megatron::with_suffix;
use crate::corpus::{CorpusError, DType, MegatronWriter, Shard};

mod input;
mod manifest;
mod pipeline;
mod report;
mod setup;
mod shards;
mod sink;
mod sort;

use input::*;
use manifest::{inputs_digest, run_manifest, write_manifest};
pub use manifest::{merge, read_manifest, render_merge, Manifest, MANIFEST_FORMAT};
pub use pipeline::encode_ids;
use pipeline::*;
pub use report::*;
use setup::*;
use shards::*;
pub use shards::{run_manifest_path, shard_prefix, OutputShard};
use sink::*;
use sort::*;

/// How many bad lines are kept with their file:line for the report.
pub const REPORTED_BAD_LINES: usize = 10;
/// Default size of the line chunks handed to workers.
pub const DEFAULT_CHUNK_BYTES: usize = 1 << 20;
/// Default longest input line kept (`--max-line-bytes`): far above a long book or source
/// file, far below what would exhaust memory (the tokenizer needs ~130 bytes per byte).
pub const DEFAULT_MAX_LINE_BYTES: u64 = 8_000_000;
/// Lines at least this long encode one at a time through [`EncodeGate`] (up to
/// `--max-line-bytes` of them together), so that `--threads` large documents never meet
/// in the tokenizer at once; shorter ones cost at most ~130 MB per thread.
const GATED_LINE_BYTES: usize = 1 << 20;
/// The spill offset of a sort record that stands for a dropped row: it writes nothing,
/// but tells pass 2 that its group existed.
const DROPPED_ROW: u64 = u64::MAX;
/// Most sorted runs merged at once; more are merged in several passes.
const MERGE_FAN_IN: usize = 128;
/// Special tokens taken as the end of a document when the tokenizer names no EOS itself.
const EOS_CANDIDATES: &[&str] = &[
    "<|endoftext|>",
    "</s>",
    "<|end_of_text|>",
    "<eos>",
    "<|eos|>",
];

/// Which token ends each document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Eos {
    /// The tokenizer's own EOS: `eos_token` of a `tokenizer_config.json` beside the
    /// tokenizer, else the first of the usual EOS spellings among its special tokens.
    Auto,
    /// This id.
    Id(u32),
    /// The id of this token.
    Token(String),
    /// No EOS is appended.
    Off,
}

/// What to tokenize and how; [`TokenizeOptions::new`] gives the CLI defaults.
#[derive(Debug, Clone)]
pub struct TokenizeOptions {
    /// JSONL inputs, read in this order (plain, gzip or zstd).
    pub inputs: Vec<PathBuf>,
    /// A HuggingFace `tokenizer.json`.
    pub tokenizer: PathBuf,
    /// Output prefix: `<out>.bin`, `<out>.idx` and, when grouping, `<out>.groups.npy`.
    pub out: PathBuf,
    /// The JSON field holding the document text.
    pub text_field: String,
    /// Which token to append to every document.
    pub eos: Eos,
    /// Output dtype; by default uint16 below 65,500 ids, else int32 (Megatron's rule).
    pub dtype: Option<DType>,
    /// Field whose value groups documents (a repository, a book id).
    pub group_field: Option<String>,
    /// Field whose value orders documents within a group (a path, a chapter number).
    pub order_field: Option<String>,
    /// Tokenizer threads.
    pub threads: usize,
    /// Memory for the pipeline and the in-memory part of the group sort, in bytes.
    pub mem_budget: u64,
    /// Abort (writing nothing) once more than this many lines are bad; `None`: never.
    pub max_bad: Option<u64>,
    /// Where the spill and sort files go (default: beside the output).
    pub tmp_dir: Option<PathBuf>,
    /// Size of the line chunks handed to workers.
    pub chunk_bytes: usize,
    /// Longer lines (newline excluded) are skipped as bad without ever being held in
    /// memory whole, which bounds what one line can cost.
    pub max_line_bytes: u64,
    /// Draw a progress bar on stderr (only when stderr is a terminal).
    pub progress: bool,
    /// Cut the output into shards `<out>-<run>-<k>` of about this many tokens (closed
    /// at the next document or group boundary); `None`: one shard at `<out>`, unless
    /// `num_shards` > 1.
    pub shard_tokens: Option<u64>,
    /// Runs that share this job (`--num-shards`); each writes its share, see `shards`.
    pub num_shards: u64,
    /// Which of them this is (`--shard-index`), from 0.
    pub shard_index: u64,
}

impl TokenizeOptions {
    /// Options with the CLI defaults: field `text`, the tokenizer's EOS, all cores, 1 GB.
    pub fn new(inputs: Vec<PathBuf>, tokenizer: PathBuf, out: PathBuf) -> TokenizeOptions {
        TokenizeOptions {
            inputs,
            tokenizer,
            out,
            text_field: "text".into(),
            eos: Eos::Auto,
            dtype: None,
            group_field: None,
            order_field: None,
            threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
            mem_budget: 1_000_000_000,
            max_bad: None,
            tmp_dir: None,
            chunk_bytes: DEFAULT_CHUNK_BYTES,
            max_line_bytes: DEFAULT_MAX_LINE_BYTES,
            progress: false,
            shard_tokens: None,
            num_shards: 1,
            shard_index: 0,
        }
    }

    /// Whether the output is shards `<out>-<run>-<k>` with a manifest, not `<out>` itself.
    pub fn sharded(&self) -> bool {
        self.shard_tokens.is_some() || self.num_shards > 1
    }
}

/// Wraps an I/O error with its file and operation.
fn io_err(path: &Path, op: &'static str) -> impl FnOnce(io::Error) -> TokenizeError {
    let path = path.to_path_buf();
    move |source| TokenizeError::Io { path, op, source }
}

/// The directory of an output prefix (`.` for a bare name): where the shards, the
/// manifests and, by default, the scratch files go.
fn out_dir(out: &Path) -> PathBuf {
    match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// The file name of `--out`, which every output's name starts with. An `--out` that
/// names a directory (`data/`, `data/.`, `.`) is refused: its outputs would be hidden
/// files (`data/.bin`, `data/-00000-00000.idx`) that `--merge`, a rerun's clean-up and
/// the scratch files would all look for in the directory above. So is one spelt as a
/// file name that is an existing directory (`data/web` with `data/web/` there): its
/// outputs would land beside the directory (`data/web.bin`), and a config naming
/// `data/web` would read the directory instead.
fn out_stem(out: &Path) -> Result<String> {
    let written = out.as_os_str().as_encoded_bytes();
    let last = written.rsplit(|&b| b == b'/').next().unwrap_or_default();
    match out.file_name() {
        Some(name) if name.as_encoded_bytes() == last && !out.is_dir() => {
            Ok(name.to_string_lossy().into_owned())
        }
        _ => Err(TokenizeError::Options(format!(
            "--out {} names a directory, not an output prefix (--out PREFIX writes the \
             files PREFIX.bin, PREFIX.idx, ...); give a file name in it, e.g. --out {}",
            out.display(),
            out.components().collect::<PathBuf>().join("NAME").display()
        ))),
    }
}

thread_local! {
    /// Set while [`catch_quietly`] runs its closure on this thread.
    static QUIET: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` (a call into the tokenizers library), catching a panic with the panic hook
/// silent on this thread meanwhile: the caller turns the panic into a bad line or an
/// error carrying its message, and the default hook printed each one besides (a run
/// whose tokenizer panicked on half of 20,000 lines wrote 30,000 lines to stderr, and
/// with `RUST_BACKTRACE=1` 770,000 lines in 13x the time). Panics elsewhere, and on
/// other threads, still reach the hook that was installed before.
fn catch_quietly<T>(f: impl FnOnce() -> T) -> std::thread::Result<T> {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !QUIET.with(std::cell::Cell::get) {
                previous(info);
            }
        }));
    });
    let was = QUIET.with(|q| q.replace(true));
    let out = std::panic::catch_unwind(AssertUnwindSafe(f));
    QUIET.with(|q| q.set(was));
    out
}

/// The message a caught panic carried, for the error that replaces it.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
        .unwrap_or("no message")
}

/// Result alias for this module.
pub type Result<T, E = TokenizeError> = std::result::Result<T, E>;

/// Tokenizes `opts.inputs` into the shard at `opts.out`; see the module docs.
pub fn tokenize(opts: &TokenizeOptions) -> Result<TokenizeSummary> {
    let started = Instant::now();
    let setup = Setup::new(opts)?;
    let threads = opts.threads.max(1);
    check_inputs(&opts.inputs)?;
    // Taken as the run starts: what `--merge` holds against the other runs' lists.
    let inputs_xxh3 = inputs_digest(&opts.inputs)?;
    if opts.shard_index >= opts.num_shards {
        return Err(TokenizeError::Options(format!(
            "--shard-index {} is not one of the --num-shards {} runs (0..{})",
            opts.shard_index, opts.num_shards, opts.num_shards
        )));
    }
    if opts.shard_tokens == Some(0) {
        return Err(TokenizeError::Options(
            "--shard-tokens 0 would make a shard of every document; give a size".into(),
        ));
    }
    let share = Share {
        count: opts.num_shards,
        index: opts.shard_index,
    };
    // An ungrouped run reads only its own files; a grouped one reads them all.
    let inputs: Vec<PathBuf> = if setup.grouped {
        opts.inputs.clone()
    } else {
        let mine = opts.inputs.iter().enumerate();
        mine.filter(|(j, _)| share.owns_file(*j))
            .map(|(_, p)| p.clone())
            .collect()
    };
    let bytes_in = check_inputs_size(&inputs)?;

    let stem = out_stem(&opts.out)?;
    let out_dir = out_dir(&opts.out);
    std::fs::create_dir_all(&out_dir).map_err(io_err(&out_dir, "create_dir"))?;
    if opts.sharded() {
        // Runs of an earlier job of more runs (or a single shard) at this prefix: no run
        // of this job removes them, and a config naming the directory would serve them.
        // (Runs below --num-shards are not looked at: this job's runs replace those,
        // perhaps at this very moment; `--merge` checks them once all have finished.)
        refuse_foreign_outputs(&opts.out, opts.num_shards, None, "start the run again")?;
    }
    let tmp_dir = opts.tmp_dir.clone().unwrap_or_else(|| out_dir.clone());
    std::fs::create_dir_all(&tmp_dir).map_err(io_err(&tmp_dir, "create_dir"))?;

    // Old outputs go first, the .idx before the rest, so that from here on the prefix
    // never opens until this run's final rename.
    let groups_path = with_suffix(&opts.out, "groups.npy");
    // A failed run leaves nothing: not the shards a sharded run had finished, not a
    // single shard renamed into place before the run failed (or failed its re-check).
    let run = opts.sharded().then_some(opts.shard_index);
    let _lock = OutputLock::take(&opts.out, run)?;
    let outputs = Outputs::clear(&opts.out, run)?;
    let layout = if opts.sharded() {
        Layout::Sharded {
            out: opts.out.clone(),
            run: opts.shard_index,
            limit: opts.shard_tokens.unwrap_or(u64::MAX).max(1),
        }
    } else {
        Layout::Single(opts.out.clone())
    };
    // Runs share scratch directories (runs of one job, and jobs whose outputs have the
    // same file name in other directories): scratch names carry the output's full path
    // and this process, and only a dead process's scratch is removed.
    let stem = match &layout {
        Layout::Single(_) => stem,
        Layout::Sharded { run, .. } => format!("{stem}-{run:05}"),
    };
    let owner = scratch_owner(&out_dir, &stem);
    remove_stale_runs(&tmp_dir, &owner)?;
    let stem = format!("{owner}{}", std::process::id());
    let spill_path = tmp_dir.join(format!("{stem}.spill.tmp"));
    // (A sharded run's shard writer removes its own temporary files.)
    let mut temp = vec![spill_path.clone()];
    if let Layout::Single(out) = &layout {
        temp.extend(["bin.tmp", "idx.tmp", "groups.npy.tmp"].map(|e| with_suffix(out, e)));
    }
    let _guard = TempFiles(temp);

    // Pipeline memory: each slot holds a chunk of text and its tokens (about as large).
    let slots = 2 * threads + 2;
    let pipeline = (slots * opts.chunk_bytes * 3) as u64;
    // The floor is tiny on purpose: tests force the on-disk path with a tiny budget.
    let sort_budget = opts.mem_budget.saturating_sub(pipeline).max(1 << 10) as usize;

    let progress = bar(bytes_in, opts.progress, "tokenizing", "starting");
    let grouped = setup.grouped;
    let mut sink = Sink {
        inputs: &inputs,
        share: (setup.grouped && share.count > 1).then_some(share),
        dtype: setup.dtype,
        max_bad: opts.max_bad,
        out: if grouped {
            Out::Grouped {
                spill: BufWriter::with_capacity(
                    8 << 20,
                    File::options()
                        .read(true)
                        .write(true)
                        .create(true)
                        .truncate(true)
                        .open(&spill_path)
                        .map_err(io_err(&spill_path, "create"))?,
                ),
                spill_path: spill_path.clone(),
                spill_at: 0,
                sorter: Sorter::new(sort_budget, tmp_dir.clone(), stem.clone()),
            }
        } else {
            Out::Stream(ShardWriter::new(layout.clone(), setup.dtype, None))
        },
        stats: Stats::default(),
        first_bad: Vec::new(),
        progress: &progress,
        started,
        last_tick: started,
    };

    let consumed = Arc::new(AtomicU64::new(0));
    let outcome = std::thread::scope(|s| {
        let (work_tx, work_rx) = sync_channel::<Chunk>(threads);
        let (done_tx, done_rx) = sync_channel::<Done>(slots);
        let (slot_tx, slot_rx) = sync_channel::<()>(slots);
        for _ in 0..slots {
            let _ = slot_tx.send(());
        }
        let chunk_bytes = opts.chunk_bytes.max(1);
        let max_line = usize::try_from(setup.max_line).unwrap_or(usize::MAX);
        let inputs = &inputs;
        let reader = s.spawn(move || {
            read_inputs(inputs, chunk_bytes, max_line, &work_tx, &slot_rx, &consumed)
        });
        let gate = Arc::new(EncodeGate::new(setup.max_line));
        let work_rx = Arc::new(Mutex::new(work_rx));
        for _ in 0..threads {
            let work_rx = work_rx.clone();
            let done_tx = done_tx.clone();
            let worker = setup.worker(&gate, sink.share);
            s.spawn(move || worker.run(&work_rx, &done_tx));
        }
        drop(done_tx);
        drop(work_rx);
        let written = collect(done_rx, slot_tx, &mut sink);
        let read = match reader.join() {
            Ok(r) => r,
            Err(panic) => std::panic::resume_unwind(panic),
        };
        written.and(read)
    });
    progress.finish_and_clear();
    outcome?;

    let Sink {
        out,
        stats,
        first_bad,
        ..
    } = sink;
    if stats.documents == 0 && !opts.sharded() {
        return Err(TokenizeError::Empty {
            lines: stats.lines,
            bad: stats.bad.total(),
            first: first_bad,
        });
    }
    let mut groups = None;
    let mut vanished_groups = None;
    let mut sort_runs = 0;
    let shards = match out {
        Out::Stream(writer) => writer.finish()?,
        Out::Grouped {
            spill,
            sorter,
            spill_at,
            ..
        } => {
            let spill = spill
                .into_inner()
                .map_err(|e| io_err(&spill_path, "flush")(e.into_error()))?;
            debug_assert_eq!(spill_at, stats.tokens * setup.dtype.size() as u64);
            let writer = ShardWriter::new(layout.clone(), setup.dtype, Some(stats.documents));
            let written = write_grouped(
                writer,
                setup.dtype,
                stats.documents,
                &spill,
                &spill_path,
                sorter,
                opts.progress,
            )?;
            groups = Some(written.groups);
            vanished_groups = Some(written.vanished);
            sort_runs = written.runs;
            written.shards
        }
    };
    drop(_guard);

    // The strictest reader re-checks what was written: each shard and its sidecar open,
    // and each index passes the full validation `millrace inspect` runs.
    recheck(&shards, &opts.out, stats.documents, stats.tokens)?;
    let manifest = match &layout {
        Layout::Single(_) => None,
        Layout::Sharded { run, .. } => {
            let path = run_manifest_path(&opts.out, *run);
            write_manifest(&path, &run_manifest(opts, &setup, inputs_xxh3, &shards))?;
            Some(path)
        }
    };
    outputs.keep();

    let seconds = started.elapsed().as_secs_f64().max(1e-9);
    Ok(TokenizeSummary {
        prefix: opts.out.clone(),
        groups_file: (grouped && !opts.sharded()).then_some(groups_path),
        dtype: setup.dtype,
        vocab: setup.vocab,
        eos: setup.eos,
        files: inputs.len(),
        lines: stats.lines,
        blank_lines: stats.blank,
        documents: stats.documents,
        tokens: stats.tokens,
        groups,
        vanished_groups,
        bad: stats.bad,
        first_bad,
        bytes_in,
        text_bytes: stats.text_bytes,
        seconds,
        mb_per_s: stats.text_bytes as f64 / seconds / 1e6,
        tokens_per_s: stats.tokens as f64 / seconds,
        docs_per_s: stats.documents as f64 / seconds,
        threads,
        sort_runs,
        shards,
        run: [opts.shard_index, opts.num_shards],
        other_runs_documents: stats.elsewhere,
        manifest,
    })
}

/// Fails before anything is touched if an input is missing, or is given twice.
fn check_inputs(inputs: &[PathBuf]) -> Result<()> {
    if inputs.is_empty() {
        return Err(TokenizeError::Options("no input files".into()));
    }
    check_inputs_size(inputs)?;
    refuse_repeated_inputs(inputs)?;
    for p in inputs {
        let mut head = [0u8; 10];
        let mut file = File::open(p).map_err(io_err(p, "open"))?;
        let mut n = 0;
        while n < head.len() {
            match file.read(&mut head[n..]) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io_err(p, "read")(e)),
            }
        }
        if let Some(format) = unreadable_compression(&head[..n]) {
            return Err(TokenizeError::Input {
                path: p.clone(),
                what: format!(
                    "is {format}-compressed, which tokenize does not read (plain, gzip or \
                     zstd only); decompress it, or recompress it with zstd"
                ),
            });
        }
    }
    Ok(())
}

/// Refuses an input file given twice, by file and not by spelling (`in.jsonl ./in.jsonl`,
/// a symlink or a hard link to it): its documents would be tokenized twice, silently.
fn refuse_repeated_inputs(inputs: &[PathBuf]) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let mut seen: std::collections::HashMap<(u64, u64), (usize, &Path)> =
        std::collections::HashMap::with_capacity(inputs.len());
    for (i, p) in inputs.iter().enumerate() {
        let meta = std::fs::metadata(p).map_err(io_err(p, "stat"))?;
        if let Some((j, first)) = seen.insert((meta.dev(), meta.ino()), (i, p)) {
            return Err(TokenizeError::Input {
                path: p.clone(),
                what: format!(
                    "input {} is the same file as input {} ({}), given twice (or a link to \
                     it); its documents would be tokenized twice: give each file once",
                    i + 1,
                    j + 1,
                    first.display()
                ),
            });
        }
    }
    Ok(())
}

/// The name of a compression format that `open_input` does not decode, recognised by its
/// magic bytes. Such a file read as text is nothing but bad lines: a run would succeed
/// with the whole file dropped, counted as "invalid UTF-8" lines.
fn unreadable_compression(head: &[u8]) -> Option<&'static str> {
    const BZIP2_BLOCK: &[u8] = &[0x31, 0x41, 0x59, 0x26, 0x53, 0x59];
    const BZIP2_END: &[u8] = &[0x17, 0x72, 0x45, 0x38, 0x50, 0x90];
    if head.starts_with(&[0xFD, b'7', b'z', b'X', b'Z', 0x00]) {
        Some("xz")
    } else if head.len() >= 10
        && head.starts_with(b"BZh")
        && (b'1'..=b'9').contains(&head[3])
        && (head[4..10] == *BZIP2_BLOCK || head[4..10] == *BZIP2_END)
    {
        Some("bzip2")
    } else if head.starts_with(&[0x04, 0x22, 0x4D, 0x18]) {
        Some("lz4")
    } else if head.starts_with(&[0x02, 0x21, 0x4C, 0x18]) {
        // `lz4 -l`, the legacy frame.
        Some("lz4 (legacy)")
    } else if head.starts_with(&[0x5D, 0x00, 0x00]) {
        // `xz --format=lzma` (.lzma): the usual properties byte, then a dictionary size
        // whose low bytes are zero; no line of JSON starts with `]` and two NULs.
        Some("lzma")
    } else if head.starts_with(b"PK\x03\x04") {
        Some("zip")
    } else if head.starts_with(&[b'7', b'z', 0xBC, 0xAF, 0x27, 0x1C]) {
        Some("7z")
    } else {
        None
    }
}

/// Sum of the input sizes; each must be a regular file.
fn check_inputs_size(inputs: &[PathBuf]) -> Result<u64> {
    let mut total = 0;
    for p in inputs {
        let meta = std::fs::metadata(p).map_err(io_err(p, "stat"))?;
        if !meta.is_file() {
            return Err(TokenizeError::Input {
                path: p.clone(),
                what: "not a regular file".into(),
            });
        }
        total += meta.len();
    }
    Ok(total)
}

/// Removes sort runs that a killed run with the same prefix left in `dir`.
fn remove_stale_runs(dir: &Path, owner: &str) -> Result<()> {
    let entries = std::fs::read_dir(dir).map_err(io_err(dir, "read_dir"))?;
    for e in entries {
        let e = e.map_err(io_err(dir, "read_dir"))?;
        let name = e.file_name();
        let name = name.to_string_lossy();
        let Some(rest) = name.strip_prefix(owner).filter(|_| name.ends_with(".tmp")) else {
            continue;
        };
        // `<pid>.spill.tmp` or `<pid>.sort-NNNNN.tmp`: a live process's are its own.
        let pid = rest.split('.').next().and_then(|p| p.parse::<i32>().ok());
        let mine = pid == Some(std::process::id() as i32);
        let alive = pid
            .and_then(rustix::process::Pid::from_raw)
            .is_some_and(|p| rustix::process::test_kill_process(p).is_ok());
        if mine || !alive {
            let p = e.path();
            std::fs::remove_file(&p).map_err(io_err(&p, "remove"))?;
        }
    }
    Ok(())
}

/// The start of this output's scratch names, `<stem>.<hash of the output's directory>.`:
/// two outputs of the same file name in other directories never share one.
fn scratch_owner(out_dir: &Path, stem: &str) -> String {
    let dir = std::fs::canonicalize(out_dir).unwrap_or_else(|_| out_dir.to_path_buf());
    let hash = xxhash_rust::xxh3::xxh3_64(dir.as_os_str().as_encoded_bytes());
    format!("{stem}.{hash:016x}.")
}

/// Removes temporary files when a run ends, however it ends (renamed ones are gone).
struct TempFiles(Vec<PathBuf>);

impl Drop for TempFiles {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// A progress bar on stderr, or a hidden one when asked or when stderr is not a terminal.
fn bar(len: u64, show: bool, what: &'static str, msg: &'static str) -> ProgressBar {
    if !show || !io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr_with_hz(4));
    let style = ProgressStyle::with_template(
        "{prefix} [{elapsed_precise}] [{bar:30}] {percent:>3}% {msg} (eta {eta})",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("=> ");
    pb.set_style(style);
    pb.set_prefix(what);
    pb.set_message(msg);
    pb.enable_steady_tick(Duration::from_millis(500));
    pb
}
