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

use std::borrow::Cow;
use std::cmp::Ordering as CmpOrdering;
use std::collections::{BTreeMap, BinaryHeap};
use std::fmt;
use std::fmt::Write as _;
use std::fs::File;
use std::io::{self, BufRead, BufReader, BufWriter, IsTerminal, Read, Write};
use std::os::unix::fs::FileExt;
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
        }
    }
}

/// Why a tokenize run failed; every variant names the file (and line or byte) at fault.
#[derive(Debug, thiserror::Error)]
pub enum TokenizeError {
    /// An OS-level failure on a file.
    #[error("{path}: {op}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// The OS error.
        source: io::Error,
    },
    /// An input that cannot be read to the end (a truncated or corrupt compressed file).
    #[error("{path}: {what}")]
    Input {
        /// The input file.
        path: PathBuf,
        /// What went wrong, and where.
        what: String,
    },
    /// The tokenizer file cannot be loaded or used as asked.
    #[error("{path}: {what}")]
    Tokenizer {
        /// The tokenizer file.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// Options that contradict each other or the tokenizer.
    #[error("{0}")]
    Options(String),
    /// A token id that the output dtype cannot hold.
    #[error("{path}:{line}: token id {id} does not fit the output dtype {dtype}")]
    TokenRange {
        /// The input file.
        path: PathBuf,
        /// The line (1-based).
        line: u64,
        /// The id.
        id: u32,
        /// The output dtype.
        dtype: DType,
    },
    /// More bad lines than `--max-bad` allows.
    #[error(
        "{bad} bad input lines, more than --max-bad {max}; nothing was written. First bad lines:\n  {}",
        first.iter().map(|b| b.to_string()).collect::<Vec<_>>().join("\n  ")
    )]
    TooManyBad {
        /// Bad lines seen when the run stopped.
        bad: u64,
        /// The threshold.
        max: u64,
        /// The first few, with file:line.
        first: Vec<BadLine>,
    },
    /// Every line was blank or bad: a shard needs at least one document.
    #[error("no documents: {lines} input lines, {bad} of them bad; nothing was written")]
    Empty {
        /// Lines read.
        lines: u64,
        /// Bad lines among them.
        bad: u64,
    },
    /// Writing or re-checking the shard failed.
    #[error(transparent)]
    Corpus(#[from] CorpusError),
}

/// Wraps an I/O error with its file and operation.
fn io_err(path: &Path, op: &'static str) -> impl FnOnce(io::Error) -> TokenizeError {
    let path = path.to_path_buf();
    move |source| TokenizeError::Io { path, op, source }
}

/// Result alias for this module.
pub type Result<T, E = TokenizeError> = std::result::Result<T, E>;

/// Why an input line was skipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadKind {
    /// Not a JSON object.
    InvalidJson,
    /// Not valid UTF-8.
    NonUtf8,
    /// The text field is absent or null.
    MissingField,
    /// The text field is not a string, or the group/order field not a string or number.
    WrongType,
    /// The text is the empty string.
    EmptyText,
    /// The tokenizer refused the text.
    EncodeFailed,
    /// More tokens than a Megatron sequence length (i32) can hold.
    TooLong,
    /// A line longer than `--max-line-bytes`, skipped unread.
    LineTooLong,
}

impl BadKind {
    /// The name used in reports and JSON.
    pub fn name(self) -> &'static str {
        match self {
            BadKind::InvalidJson => "invalid_json",
            BadKind::NonUtf8 => "non_utf8",
            BadKind::MissingField => "missing_field",
            BadKind::WrongType => "wrong_type",
            BadKind::EmptyText => "empty_text",
            BadKind::EncodeFailed => "encode_failed",
            BadKind::TooLong => "too_long",
            BadKind::LineTooLong => "line_too_long",
        }
    }
}

/// Bad lines by kind, for the summary.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct BadCounts {
    /// Lines that are not a JSON object.
    pub invalid_json: u64,
    /// Lines that are not UTF-8.
    pub non_utf8: u64,
    /// Lines without the text field (or with null).
    pub missing_field: u64,
    /// Lines whose fields have the wrong JSON type.
    pub wrong_type: u64,
    /// Lines whose text is empty.
    pub empty_text: u64,
    /// Lines the tokenizer failed on.
    pub encode_failed: u64,
    /// Documents too long for a Megatron sequence.
    pub too_long: u64,
    /// Lines longer than `--max-line-bytes`.
    pub line_too_long: u64,
}

impl BadCounts {
    fn add(&mut self, kind: BadKind) {
        let c = match kind {
            BadKind::InvalidJson => &mut self.invalid_json,
            BadKind::NonUtf8 => &mut self.non_utf8,
            BadKind::MissingField => &mut self.missing_field,
            BadKind::WrongType => &mut self.wrong_type,
            BadKind::EmptyText => &mut self.empty_text,
            BadKind::EncodeFailed => &mut self.encode_failed,
            BadKind::TooLong => &mut self.too_long,
            BadKind::LineTooLong => &mut self.line_too_long,
        };
        *c += 1;
    }

    /// All bad lines.
    pub fn total(&self) -> u64 {
        self.invalid_json
            + self.non_utf8
            + self.missing_field
            + self.wrong_type
            + self.empty_text
            + self.encode_failed
            + self.too_long
            + self.line_too_long
    }
}

/// One reported bad line: where it is and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BadLine {
    /// The input file, as given.
    pub file: PathBuf,
    /// 1-based line number within the (decompressed) file.
    pub line: u64,
    /// [`BadKind::name`].
    pub kind: &'static str,
    /// Details (the parser's message, the field, the byte).
    pub detail: String,
}

impl fmt::Display for BadLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}: {}: {}",
            self.file.display(),
            self.line,
            self.kind,
            self.detail
        )
    }
}

/// What a run did, printed at the end (and as JSON with `--json`).
#[derive(Debug, Clone, Serialize)]
pub struct TokenizeSummary {
    /// The output prefix.
    pub prefix: PathBuf,
    /// The sidecar, when grouping.
    pub groups_file: Option<PathBuf>,
    /// Output token dtype.
    pub dtype: DType,
    /// One more than the largest token id of the tokenizer.
    pub vocab: u64,
    /// The id appended to every document, if any.
    pub eos: Option<u32>,
    /// Input files.
    pub files: usize,
    /// Input lines (blank and bad included).
    pub lines: u64,
    /// Whitespace-only lines, skipped without counting as bad.
    pub blank_lines: u64,
    /// Documents written.
    pub documents: u64,
    /// Tokens written (EOS included).
    pub tokens: u64,
    /// Groups in the sidecar, when grouping.
    pub groups: Option<u64>,
    /// Groups whose every row was dropped (empty text, or another bad line whose group
    /// could be read), so they have no documents and are not in the sidecar; when
    /// grouping. Reported because otherwise such a group disappears without a word.
    pub vanished_groups: Option<u64>,
    /// Bad lines by kind.
    pub bad: BadCounts,
    /// The first few bad lines.
    pub first_bad: Vec<BadLine>,
    /// Bytes of the input files as stored (compressed size for .gz/.zst).
    pub bytes_in: u64,
    /// Bytes of JSONL after decompression.
    pub text_bytes: u64,
    /// Wall-clock seconds, start to the last rename.
    pub seconds: f64,
    /// Decompressed JSONL megabytes (10^6) per second.
    pub mb_per_s: f64,
    /// Tokens per second.
    pub tokens_per_s: f64,
    /// Documents per second.
    pub docs_per_s: f64,
    /// Tokenizer threads used.
    pub threads: usize,
    /// Sorted runs the group sort spilled to disk (0: it fit in memory).
    pub sort_runs: usize,
}

/// The human-readable summary.
pub fn render(s: &TokenizeSummary) -> String {
    use crate::util::thousands;
    let mut t = String::new();
    let _ = writeln!(
        t,
        "wrote {} documents, {} tokens ({}, eos {}) to {}.bin/.idx",
        thousands(s.documents),
        thousands(s.tokens),
        s.dtype,
        s.eos.map_or("none".to_string(), |e| e.to_string()),
        s.prefix.display()
    );
    if let (Some(g), Some(path)) = (s.groups, &s.groups_file) {
        let _ = writeln!(
            t,
            "{} groups in {} ({} sorted runs spilled); {} more had only empty or bad rows \
             and are not in it",
            thousands(g),
            path.display(),
            s.sort_runs,
            thousands(s.vanished_groups.unwrap_or(0))
        );
    }
    let b = &s.bad;
    let _ = writeln!(
        t,
        "{} lines in {} files, {} blank; bad: {} (invalid_json {}, non_utf8 {}, missing_field {}, \
         wrong_type {}, empty_text {}, encode_failed {}, too_long {}, line_too_long {})",
        thousands(s.lines),
        s.files,
        thousands(s.blank_lines),
        thousands(b.total()),
        b.invalid_json,
        b.non_utf8,
        b.missing_field,
        b.wrong_type,
        b.empty_text,
        b.encode_failed,
        b.too_long,
        b.line_too_long
    );
    for bad in &s.first_bad {
        let _ = writeln!(t, "  {bad}");
    }
    let _ = writeln!(
        t,
        "read {:.1} MB ({:.1} MB of JSONL) in {:.1} s: {:.1} MB/s, {} tokens/s, {} docs/s, {} threads",
        s.bytes_in as f64 / 1e6,
        s.text_bytes as f64 / 1e6,
        s.seconds,
        s.mb_per_s,
        thousands(s.tokens_per_s as u64),
        thousands(s.docs_per_s as u64),
        s.threads
    );
    t
}

/// Tokenizes `opts.inputs` into the shard at `opts.out`; see the module docs.
pub fn tokenize(opts: &TokenizeOptions) -> Result<TokenizeSummary> {
    let started = Instant::now();
    let setup = Setup::new(opts)?;
    let threads = opts.threads.max(1);
    let bytes_in = check_inputs(&opts.inputs)?;

    let out_dir = match opts.out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&out_dir).map_err(io_err(&out_dir, "create_dir"))?;
    let stem = opts
        .out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| {
            TokenizeError::Options(format!(
                "--out {} has no file name to use as the shard prefix",
                opts.out.display()
            ))
        })?;
    let tmp_dir = opts.tmp_dir.clone().unwrap_or_else(|| out_dir.clone());
    std::fs::create_dir_all(&tmp_dir).map_err(io_err(&tmp_dir, "create_dir"))?;

    // Old outputs go first, the .idx before the rest, so that from here on the prefix
    // never opens until this run's final rename.
    let idx_path = with_suffix(&opts.out, "idx");
    let bin_path = with_suffix(&opts.out, "bin");
    let groups_path = with_suffix(&opts.out, "groups.npy");
    for p in [&idx_path, &bin_path, &groups_path] {
        match std::fs::remove_file(p) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(p, "remove")(e)),
        }
    }
    remove_stale_runs(&tmp_dir, &stem)?;
    let spill_path = tmp_dir.join(format!("{stem}.spill.tmp"));
    let _guard = TempFiles(vec![
        with_suffix(&opts.out, "bin.tmp"),
        with_suffix(&opts.out, "idx.tmp"),
        with_suffix(&opts.out, "groups.npy.tmp"),
        spill_path.clone(),
    ]);

    // Pipeline memory: each slot holds a chunk of text and its tokens (about as large).
    let slots = 2 * threads + 2;
    let pipeline = (slots * opts.chunk_bytes * 3) as u64;
    // The floor is tiny on purpose: tests force the on-disk path with a tiny budget.
    let sort_budget = opts.mem_budget.saturating_sub(pipeline).max(1 << 10) as usize;

    let progress = bar(bytes_in, opts.progress, "tokenizing", "starting");
    let grouped = setup.grouped;
    let mut sink = Sink {
        inputs: &opts.inputs,
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
            Out::Stream(MegatronWriter::create(&opts.out, setup.dtype)?)
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
        let inputs = &opts.inputs;
        let reader = s.spawn(move || {
            read_inputs(inputs, chunk_bytes, max_line, &work_tx, &slot_rx, &consumed)
        });
        let gate = Arc::new(EncodeGate::new(setup.max_line));
        let work_rx = Arc::new(Mutex::new(work_rx));
        for _ in 0..threads {
            let work_rx = work_rx.clone();
            let done_tx = done_tx.clone();
            let worker = setup.worker(&gate);
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
    if stats.documents == 0 {
        return Err(TokenizeError::Empty {
            lines: stats.lines,
            bad: stats.bad.total(),
        });
    }
    let mut groups = None;
    let mut vanished_groups = None;
    let mut sort_runs = 0;
    match out {
        Out::Stream(writer) => {
            writer.finish()?;
        }
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
            let written = write_grouped(
                &opts.out,
                &groups_path,
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
        }
    }
    drop(_guard);

    // The strictest reader re-checks what was written: the shard and its sidecar open,
    // and the index passes the full validation `millrace inspect` runs.
    let shard = Shard::open(&opts.out, None)?;
    shard.validate()?;
    if shard.documents() != stats.documents || shard.tokens() != stats.tokens {
        return Err(TokenizeError::Corpus(CorpusError::invalid(
            &idx_path,
            format!(
                "re-opened shard holds {} documents and {} tokens, but {} and {} were written",
                shard.documents(),
                shard.tokens(),
                stats.documents,
                stats.tokens
            ),
        )));
    }

    let seconds = started.elapsed().as_secs_f64().max(1e-9);
    Ok(TokenizeSummary {
        prefix: opts.out.clone(),
        groups_file: grouped.then_some(groups_path),
        dtype: setup.dtype,
        vocab: setup.vocab,
        eos: setup.eos,
        files: opts.inputs.len(),
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
    })
}

/// Sum of the input sizes; fails before anything is touched if an input is missing.
fn check_inputs(inputs: &[PathBuf]) -> Result<u64> {
    if inputs.is_empty() {
        return Err(TokenizeError::Options("no input files".into()));
    }
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
fn remove_stale_runs(dir: &Path, stem: &str) -> Result<()> {
    let entries = std::fs::read_dir(dir).map_err(io_err(dir, "read_dir"))?;
    let start = format!("{stem}.sort-");
    for e in entries {
        let e = e.map_err(io_err(dir, "read_dir"))?;
        let name = e.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(&start) && name.ends_with(".tmp") {
            let p = e.path();
            std::fs::remove_file(&p).map_err(io_err(&p, "remove"))?;
        }
    }
    Ok(())
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

// ---------------------------------------------------------------------------------------
// Set-up: the tokenizer, the EOS, the dtype.

/// What every worker needs, resolved once.
struct Setup {
    tokenizer: Tokenizer,
    eos: Option<u32>,
    dtype: DType,
    vocab: u64,
    text_field: String,
    group_field: Option<String>,
    order_field: Option<String>,
    grouped: bool,
    max_line: u64,
}

impl Setup {
    fn new(opts: &TokenizeOptions) -> Result<Setup> {
        if opts.order_field.is_some() && opts.group_field.is_none() {
            return Err(TokenizeError::Options(
                "--order-field orders documents within a group; it needs --group-field".into(),
            ));
        }
        for f in [&opts.group_field, &opts.order_field].into_iter().flatten() {
            if *f == opts.text_field {
                return Err(TokenizeError::Options(format!(
                    "field {f:?} cannot be both the text and a group or order key"
                )));
            }
        }
        if let (Some(g), Some(o)) = (&opts.group_field, &opts.order_field) {
            if g == o {
                return Err(TokenizeError::Options(format!(
                    "--group-field and --order-field are both {g:?}"
                )));
            }
        }
        let path = &opts.tokenizer;
        let tok_err = |what: String| TokenizeError::Tokenizer {
            path: path.clone(),
            what,
        };
        let mut tokenizer = Tokenizer::from_file(path)
            .map_err(|e| tok_err(format!("cannot load a HuggingFace tokenizer.json: {e}")))?;
        // A tokenizer.json may carry truncation (e.g. to 512) or padding meant for
        // fine-tuning; either would silently change documents here.
        tokenizer
            .with_truncation(None)
            .map_err(|e| tok_err(format!("cannot disable truncation: {e}")))?;
        tokenizer.with_padding(None);

        let vocab = tokenizer
            .get_vocab(true)
            .values()
            .map(|&id| u64::from(id) + 1)
            .max()
            .unwrap_or(0);
        if vocab == 0 {
            return Err(tok_err("the tokenizer has an empty vocabulary".into()));
        }
        let eos = match &opts.eos {
            Eos::Off => None,
            Eos::Id(id) => {
                if u64::from(*id) >= vocab {
                    return Err(tok_err(format!(
                        "--eos-id {id} is outside the vocabulary (ids 0..{vocab})"
                    )));
                }
                Some(*id)
            }
            Eos::Token(t) => Some(
                tokenizer
                    .token_to_id(t)
                    .ok_or_else(|| tok_err(format!("no token {t:?} in the vocabulary")))?,
            ),
            Eos::Auto => Some(discover_eos(&tokenizer, path)?),
        };
        let dtype = opts
            .dtype
            .unwrap_or_else(|| crate::util::default_dtype(vocab.min(u64::from(u32::MAX)) as u32));
        let max = max_id(dtype).ok_or_else(|| {
            TokenizeError::Options(format!(
                "--dtype {dtype} cannot hold token ids in a Megatron shard \
                 (use uint16 or int32)"
            ))
        })?;
        if vocab - 1 > max {
            return Err(TokenizeError::Options(format!(
                "the tokenizer's largest id is {}, which {dtype} cannot hold (at most {max})",
                vocab - 1
            )));
        }
        if opts.max_line_bytes == 0 {
            return Err(TokenizeError::Options(
                "--max-line-bytes 0 would skip every line".into(),
            ));
        }
        let grouped = opts.group_field.is_some();
        Ok(Setup {
            tokenizer,
            eos,
            dtype,
            vocab,
            text_field: opts.text_field.clone(),
            group_field: opts.group_field.clone(),
            order_field: opts.order_field.clone(),
            grouped,
            max_line: opts.max_line_bytes,
        })
    }

    fn worker(&self, gate: &Arc<EncodeGate>) -> Worker {
        Worker {
            tokenizer: self.tokenizer.clone(),
            eos: self.eos,
            dtype: self.dtype,
            max: max_id(self.dtype).unwrap_or(0),
            text_field: self.text_field.clone(),
            group_field: self.group_field.clone(),
            order_field: self.order_field.clone(),
            grouped: self.grouped,
            max_line: self.max_line,
            gate: gate.clone(),
        }
    }
}

/// The largest token id `dtype` holds in a Megatron shard; `None` for float dtypes and
/// for uint32, which Megatron has no code for.
fn max_id(dtype: DType) -> Option<u64> {
    match dtype {
        DType::Uint8 => Some(u64::from(u8::MAX)),
        DType::Int8 => Some(i8::MAX as u64),
        DType::Int16 => Some(i16::MAX as u64),
        DType::Uint16 => Some(u64::from(u16::MAX)),
        DType::Int32 => Some(i32::MAX as u64),
        DType::Int64 => Some(u64::from(u32::MAX)),
        DType::Float32 | DType::Float64 | DType::Uint32 => None,
    }
}

/// The tokenizer's EOS: `tokenizer_config.json`'s `eos_token` when that file sits beside
/// the tokenizer, else a special token with one of the usual EOS spellings.
fn discover_eos(tokenizer: &Tokenizer, path: &Path) -> Result<u32> {
    let err = |what: String| TokenizeError::Tokenizer {
        path: path.to_path_buf(),
        what,
    };
    let config = path.with_file_name("tokenizer_config.json");
    if let Ok(text) = std::fs::read_to_string(&config) {
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
            err(format!(
                "{} beside it is not valid JSON ({e}); pass --eos-id or --eos-token",
                config.display()
            ))
        })?;
        let name = match v.get("eos_token") {
            Some(serde_json::Value::String(s)) => Some(s.as_str()),
            Some(o) => o.get("content").and_then(|c| c.as_str()),
            None => None,
        };
        if let Some(name) = name {
            return tokenizer.token_to_id(name).ok_or_else(|| {
                err(format!(
                    "{} names eos_token {name:?}, which is not in the vocabulary",
                    config.display()
                ))
            });
        }
    }
    let specials = tokenizer.get_added_tokens_decoder();
    for want in EOS_CANDIDATES {
        if let Some((&id, _)) = specials
            .iter()
            .filter(|(_, t)| t.special && t.content == *want)
            .min_by_key(|(&id, _)| id)
        {
            return Ok(id);
        }
    }
    Err(err(format!(
        "cannot tell which token is EOS (no tokenizer_config.json with eos_token beside it, \
         and none of the special tokens is one of {EOS_CANDIDATES:?}); pass --eos-id N, \
         --eos-token TOKEN or --no-eos"
    )))
}

// ---------------------------------------------------------------------------------------
// Reading: files -> chunks of whole lines.

/// A run of whole lines of one input file.
struct Chunk {
    seq: u64,
    file: usize,
    first_line: u64,
    /// Input bytes as stored (compressed) read up to the end of this chunk, over all
    /// files: the progress bar's position once the chunk is written.
    stored_end: u64,
    /// The kept lines, back to back with their newlines.
    data: Vec<u8>,
    /// Lines longer than the limit, left out of `data`: (index of the line within the
    /// chunk, its length without the newline), in order.
    skipped: Vec<(u64, u64)>,
    /// Bytes of the skipped lines, newlines included (they count as read).
    skipped_bytes: u64,
}

/// Counts the bytes read from an input as stored, for the progress bar.
struct Counting<R> {
    inner: R,
    count: Arc<AtomicU64>,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

/// Opens an input, decompressing gzip or zstd when its first bytes say so. Buffered, so
/// that lines are cut from the reader's own buffer without a copy per line.
fn open_input(path: &Path, count: &Arc<AtomicU64>) -> Result<Box<dyn BufRead + Send>> {
    let file = File::open(path).map_err(io_err(path, "open"))?;
    let mut raw = BufReader::with_capacity(
        1 << 20,
        Counting {
            inner: file,
            count: count.clone(),
        },
    );
    let head = raw.fill_buf().map_err(io_err(path, "read"))?;
    if head.starts_with(&[0x1f, 0x8b]) {
        let d = flate2::bufread::MultiGzDecoder::new(raw);
        Ok(Box::new(BufReader::with_capacity(1 << 20, d)))
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        let d = zstd::stream::read::Decoder::with_buffer(raw).map_err(io_err(path, "zstd init"))?;
        Ok(Box::new(BufReader::with_capacity(1 << 20, d)))
    } else {
        Ok(Box::new(raw))
    }
}

/// What a [`LineCutter`] hands over for one chunk (see [`Chunk`] for the fields).
struct Cut {
    data: Vec<u8>,
    lines: u64,
    skipped: Vec<(u64, u64)>,
    skipped_bytes: u64,
}

/// Cuts one file's bytes, as they arrive, into chunks of whole lines, leaving out lines
/// longer than the limit as it goes: it holds at most one chunk plus one line of the
/// limit's length, whatever the input (a 100 MB line costs nothing).
struct LineCutter {
    max_line: usize,
    /// Kept whole lines, then the kept start of the current, unfinished line.
    buf: Vec<u8>,
    /// Where the unfinished line starts in `buf`.
    line_start: usize,
    /// Bytes seen of the current line once it is known to be too long (none are kept).
    skipping: Option<u64>,
    /// Lines finished in this chunk, kept or skipped.
    lines: u64,
    skipped: Vec<(u64, u64)>,
    skipped_bytes: u64,
}

impl LineCutter {
    fn new(max_line: usize) -> LineCutter {
        LineCutter {
            max_line,
            buf: Vec::new(),
            line_start: 0,
            skipping: None,
            lines: 0,
            skipped: Vec::new(),
            skipped_bytes: 0,
        }
    }

    /// Takes lines from `data` until the chunk holds `chunk` bytes of whole lines;
    /// returns how many bytes of `data` it took.
    fn feed(&mut self, data: &[u8], chunk: usize) -> usize {
        let mut at = 0;
        while at < data.len() && !self.full(chunk) {
            let rest = &data[at..];
            let nl = memchr::memchr(b'\n', rest);
            if let Some(seen) = &mut self.skipping {
                let n = nl.unwrap_or(rest.len());
                *seen += n as u64;
                self.skipped_bytes += n as u64;
                at += n;
                if nl.is_some() {
                    self.skipped_bytes += 1;
                    at += 1;
                    let len = *seen;
                    self.skipping = None;
                    self.skipped.push((self.lines, len));
                    self.lines += 1;
                }
                continue;
            }
            let held = self.buf.len() - self.line_start;
            let room = self.max_line - held;
            match nl {
                Some(i) if i <= room => {
                    self.buf.extend_from_slice(&rest[..=i]);
                    self.line_start = self.buf.len();
                    self.lines += 1;
                    at += i + 1;
                }
                Some(i) => {
                    self.buf.truncate(self.line_start);
                    self.skipped.push((self.lines, (held + i) as u64));
                    self.skipped_bytes += (held + i + 1) as u64;
                    self.lines += 1;
                    at += i + 1;
                }
                None if rest.len() <= room => {
                    self.buf.extend_from_slice(rest);
                    at += rest.len();
                }
                None => {
                    // Too long already, with no end in sight: drop what is held and
                    // count the rest as it streams past.
                    self.buf.truncate(self.line_start);
                    let seen = (held + rest.len()) as u64;
                    self.skipping = Some(seen);
                    self.skipped_bytes += seen;
                    at += rest.len();
                }
            }
        }
        at
    }

    /// Whether the chunk should go: enough whole lines, or many skipped ones.
    fn full(&self, chunk: usize) -> bool {
        self.line_start >= chunk || self.skipped.len() >= 1024
    }

    /// Ends the file: an unfinished last line (no newline) is a line too.
    fn finish(&mut self) {
        if let Some(len) = self.skipping.take() {
            self.skipped.push((self.lines, len));
            self.lines += 1;
        } else if self.buf.len() > self.line_start {
            self.line_start = self.buf.len();
            self.lines += 1;
        }
    }

    /// Hands over the finished lines (kept and skipped), keeping the unfinished one.
    fn take(&mut self) -> Cut {
        let carry = self.buf[self.line_start..].to_vec();
        let mut data = std::mem::replace(&mut self.buf, carry);
        data.truncate(self.line_start);
        self.line_start = 0;
        Cut {
            data,
            lines: std::mem::take(&mut self.lines),
            skipped: std::mem::take(&mut self.skipped),
            skipped_bytes: std::mem::take(&mut self.skipped_bytes),
        }
    }

    /// Whether there is nothing finished to hand over.
    fn is_empty(&self) -> bool {
        self.lines == 0
    }
}

/// The reader thread: every input, in order, cut into chunks of about `chunk` bytes of
/// whole lines by a [`LineCutter`]. Waits for a free slot before each chunk, and stops
/// quietly when the writer has gone (it has its own error to report).
fn read_inputs(
    inputs: &[PathBuf],
    chunk: usize,
    max_line: usize,
    work: &SyncSender<Chunk>,
    slots: &Receiver<()>,
    consumed: &Arc<AtomicU64>,
) -> Result<()> {
    let mut seq = 0u64;
    for (file, path) in inputs.iter().enumerate() {
        let mut reader = open_input(path, consumed)?;
        let mut cutter = LineCutter::new(max_line);
        let mut line = 1u64; // first line of the next chunk
        let mut offset = 0u64; // decompressed bytes read
        loop {
            let data = match reader.fill_buf() {
                Ok(d) => d,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    return Err(TokenizeError::Input {
                        path: path.clone(),
                        what: format!(
                        "cannot read past decompressed byte {offset} (in or after line {}): {e}",
                        line + cutter.lines
                    ),
                    })
                }
            };
            let eof = data.is_empty();
            if eof {
                cutter.finish();
            } else {
                let n = cutter.feed(data, chunk);
                reader.consume(n);
                offset += n as u64;
                if !cutter.full(chunk) {
                    continue;
                }
            }
            if !cutter.is_empty() {
                let Cut {
                    data,
                    lines,
                    skipped,
                    skipped_bytes,
                } = cutter.take();
                if slots.recv().is_err() {
                    return Ok(());
                }
                let c = Chunk {
                    seq,
                    file,
                    first_line: line,
                    stored_end: consumed.load(Ordering::Relaxed),
                    data,
                    skipped,
                    skipped_bytes,
                };
                if work.send(c).is_err() {
                    return Ok(());
                }
                seq += 1;
                line += lines;
            }
            if eof {
                break;
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Workers: chunk -> tokens, keys and bad lines.

/// One document of a processed chunk.
struct Doc {
    /// Tokens, EOS included.
    ntok: u64,
    /// Its group key in [`Done::keys`]; `None` when the group field is absent or null.
    group: Option<(usize, usize)>,
    /// Its order key in [`Done::keys`].
    order: (usize, usize),
}

/// A processed chunk.
struct Done {
    seq: u64,
    file: usize,
    stored_end: u64,
    lines: u64,
    blank: u64,
    text_bytes: u64,
    /// The documents' tokens back to back, little-endian in the output dtype.
    tokens: Vec<u8>,
    docs: Vec<Doc>,
    keys: Vec<u8>,
    /// Group keys (in `keys`) of rows dropped as bad after their group was read.
    dropped: Vec<(usize, usize)>,
    bad: Vec<(u64, BadKind, String)>,
    fatal: Option<TokenizeError>,
    /// Scratch for one document's ids, reused across the chunk.
    ids: Vec<u32>,
}

/// A worker's own copy of everything it needs.
struct Worker {
    tokenizer: Tokenizer,
    eos: Option<u32>,
    dtype: DType,
    max: u64,
    text_field: String,
    group_field: Option<String>,
    order_field: Option<String>,
    grouped: bool,
    max_line: u64,
    gate: Arc<EncodeGate>,
}

impl Worker {
    fn run(&self, work: &Mutex<Receiver<Chunk>>, done: &SyncSender<Done>) {
        loop {
            let chunk = {
                let Ok(rx) = work.lock() else { return };
                match rx.recv() {
                    Ok(c) => c,
                    Err(_) => return,
                }
            };
            if done.send(self.process(chunk)).is_err() {
                return;
            }
        }
    }

    fn process(&self, chunk: Chunk) -> Done {
        let mut d = Done {
            seq: chunk.seq,
            file: chunk.file,
            stored_end: chunk.stored_end,
            lines: 0,
            blank: 0,
            text_bytes: chunk.data.len() as u64 + chunk.skipped_bytes,
            tokens: Vec::with_capacity(chunk.data.len() / 2),
            docs: Vec::new(),
            keys: Vec::new(),
            dropped: Vec::new(),
            bad: Vec::new(),
            fatal: None,
            ids: Vec::new(),
        };
        let data = &chunk.data[..];
        let mut skipped = chunk.skipped.iter().peekable();
        // A UTF-8 byte-order mark opening a file is not part of its first line.
        let opens_file = chunk.first_line == 1 && skipped.peek().is_none_or(|s| s.0 > 0);
        let mut start = if opens_file && data.starts_with(b"\xEF\xBB\xBF") {
            3
        } else {
            0
        };
        loop {
            let line_no = chunk.first_line + d.lines;
            // Lines the reader left out come back in their place, so bad lines are
            // reported in input order.
            if let Some(&(_, len)) = skipped.next_if(|s| s.0 == d.lines || start >= data.len()) {
                d.lines += 1;
                d.bad.push((
                    line_no,
                    BadKind::LineTooLong,
                    format!(
                        "{len} bytes, more than --max-line-bytes {}; skipped unread",
                        self.max_line
                    ),
                ));
                continue;
            }
            if start >= data.len() {
                break;
            }
            let end = memchr::memchr(b'\n', &data[start..]).map_or(data.len(), |i| start + i);
            d.lines += 1;
            if let Err(fatal) = self.line(&data[start..end], line_no, &mut d) {
                d.fatal = Some(fatal);
                return d;
            }
            start = end + 1;
        }
        d
    }

    /// Handles one line: a document, a blank, or a bad line. Errs only on what must stop
    /// the run (a token id the dtype cannot hold).
    fn line(&self, bytes: &[u8], line_no: u64, d: &mut Done) -> Result<()> {
        if bytes.iter().all(u8::is_ascii_whitespace) {
            d.blank += 1;
            return Ok(());
        }
        let mut bad = |kind: BadKind, what: String| d.bad.push((line_no, kind, what));
        let text = match std::str::from_utf8(bytes) {
            Ok(t) => t,
            Err(e) => {
                bad(
                    BadKind::NonUtf8,
                    format!("invalid UTF-8 at byte {} of the line", e.valid_up_to()),
                );
                return Ok(());
            }
        };
        let pick = Pick {
            text: &self.text_field,
            group: self.group_field.as_deref(),
            order: self.order_field.as_deref(),
        };
        let mut de = serde_json::Deserializer::from_str(text);
        let picked = match pick.deserialize(&mut de).and_then(|p| de.end().map(|()| p)) {
            Ok(p) => p,
            Err(e) => {
                bad(BadKind::InvalidJson, e.to_string());
                return Ok(());
            }
        };
        let body = match picked.text {
            Val::Str(s) if s.is_empty() => Err((
                BadKind::EmptyText,
                format!("field {:?} is an empty string", self.text_field),
            )),
            Val::Str(s) => Ok(s),
            Val::Absent => Err((
                BadKind::MissingField,
                format!("no field {:?}", self.text_field),
            )),
            Val::Null => Err((
                BadKind::MissingField,
                format!("field {:?} is null", self.text_field),
            )),
            other => Err((
                BadKind::WrongType,
                format!(
                    "field {:?} is {}; expected a string",
                    self.text_field,
                    other.describe()
                ),
            )),
        };
        let body = match body {
            Ok(b) => b,
            Err((kind, what)) => {
                bad(kind, what);
                if self.grouped {
                    // The row's group still counts as seen, so that a group left with
                    // no rows at all is reported rather than silently gone.
                    let at = d.keys.len();
                    match push_key(&mut d.keys, &picked.group) {
                        Ok(true) => d.dropped.push((at, d.keys.len() - at)),
                        _ => d.keys.truncate(at),
                    }
                }
                return Ok(());
            }
        };
        let keys_at = d.keys.len();
        let mut group = None;
        let mut order = (d.keys.len(), 0);
        if self.grouped {
            let field = self.group_field.as_deref().unwrap_or_default();
            match push_key(&mut d.keys, &picked.group) {
                Ok(true) => group = Some((keys_at, d.keys.len() - keys_at)),
                Ok(false) => {}
                Err(what) => {
                    bad(BadKind::WrongType, format!("field {field:?} is {what}"));
                    return Ok(());
                }
            }
            let at = d.keys.len();
            let field = self.order_field.as_deref().unwrap_or_default();
            match push_key(&mut d.keys, &picked.order) {
                Ok(true) => {}
                Ok(false) => d.keys.push(0),
                Err(what) => {
                    drop_keys(d, keys_at, group);
                    let what = format!("field {field:?} is {what}");
                    d.bad.push((line_no, BadKind::WrongType, what));
                    return Ok(());
                }
            }
            order = (at, d.keys.len() - at);
        }
        let mut ids = std::mem::take(&mut d.ids);
        ids.clear();
        let permit = (body.len() >= GATED_LINE_BYTES).then(|| self.gate.enter(body.len() as u64));
        let encoded = encode_ids(&self.tokenizer, body.as_ref(), &mut ids);
        drop(permit);
        if let Err(e) = encoded {
            d.ids = ids;
            drop_keys(d, keys_at, group);
            d.bad.push((line_no, BadKind::EncodeFailed, e.to_string()));
            return Ok(());
        }
        let result = self.push_doc(d, &ids, line_no, keys_at, group, order);
        d.ids = ids;
        result
    }

    /// Appends one document's tokens (and EOS) to the chunk's output.
    fn push_doc(
        &self,
        d: &mut Done,
        ids: &[u32],
        line_no: u64,
        keys_at: usize,
        group: Option<(usize, usize)>,
        order: (usize, usize),
    ) -> Result<()> {
        let ntok = ids.len() as u64 + u64::from(self.eos.is_some());
        if ntok > i32::MAX as u64 {
            drop_keys(d, keys_at, group);
            d.bad.push((
                line_no,
                BadKind::TooLong,
                format!(
                    "{ntok} tokens; a Megatron sequence holds at most {}",
                    i32::MAX
                ),
            ));
            return Ok(());
        }
        let before = d.tokens.len();
        let pushed = push_ids(&mut d.tokens, self.dtype, self.max, ids)
            .and_then(|()| push_ids(&mut d.tokens, self.dtype, self.max, self.eos.as_slice()));
        if let Err(id) = pushed {
            d.tokens.truncate(before);
            // The path is filled in by the writer, which knows the file names.
            return Err(TokenizeError::TokenRange {
                path: PathBuf::new(),
                line: line_no,
                id,
                dtype: self.dtype,
            });
        }
        d.docs.push(Doc { ntok, group, order });
        Ok(())
    }
}

/// Forgets a dropped row's keys but keeps its group key, noted in [`Done::dropped`].
fn drop_keys(d: &mut Done, keys_at: usize, group: Option<(usize, usize)>) {
    match group {
        Some((at, n)) => {
            d.keys.truncate(at + n);
            d.dropped.push((at, n));
        }
        None => d.keys.truncate(keys_at),
    }
}

/// Bounds the text being encoded at once in large documents: the tokenizer needs ~130
/// bytes per byte of a document, so `--threads` documents of `--max-line-bytes` each
/// together could exhaust the machine. A document enters once the others inside leave
/// room in the budget; one alone always enters, so nothing waits forever.
struct EncodeGate {
    budget: u64,
    inside: Mutex<u64>,
    left: Condvar,
}

/// A document's place in the [`EncodeGate`], given back when dropped.
struct Permit<'g> {
    gate: &'g EncodeGate,
    bytes: u64,
}

impl EncodeGate {
    fn new(budget: u64) -> EncodeGate {
        EncodeGate {
            budget,
            inside: Mutex::new(0),
            left: Condvar::new(),
        }
    }

    /// Waits until `bytes` more fit the budget (or nothing else is inside).
    fn enter(&self, bytes: u64) -> Permit<'_> {
        // A poisoned lock only means another worker panicked; the count is still right.
        let mut inside = self.inside.lock().unwrap_or_else(PoisonError::into_inner);
        while *inside > 0 && *inside + bytes > self.budget {
            inside = self
                .left
                .wait(inside)
                .unwrap_or_else(PoisonError::into_inner);
        }
        *inside += bytes;
        Permit { gate: self, bytes }
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        let mut inside = self
            .gate
            .inside
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        *inside -= self.bytes;
        self.gate.left.notify_all();
    }
}

/// The ids `tokenizer.encode_fast(text, false)` gives, without building an `Encoding`
/// (its per-token strings, offsets and masks cost about a fifth of the time): the same
/// steps (added tokens, normalizer, pre-tokenizer, model) in the same order. Without
/// special tokens, no post-processor adds or changes ids, so none runs here; the tests
/// check this against `encode_fast`.
pub fn encode_ids(tokenizer: &Tokenizer, text: &str, out: &mut Vec<u32>) -> tokenizers::Result<()> {
    let mut pre = tokenizer
        .get_added_vocabulary()
        .extract_and_normalize(tokenizer.get_normalizer(), text);
    if let Some(pt) = tokenizer.get_pre_tokenizer() {
        pt.pre_tokenize(&mut pre)?;
    }
    let model = tokenizer.get_model();
    pre.tokenize(|n| model.tokenize(n.get()))?;
    for (_, _, tokens) in pre.get_splits(OffsetReferential::Original, OffsetType::None) {
        if let Some(tokens) = tokens {
            out.extend(tokens.iter().map(|t| t.id));
        }
    }
    Ok(())
}

/// Appends `ids` in `dtype`, little-endian; `Err(id)` for an id above `max`.
fn push_ids(
    out: &mut Vec<u8>,
    dtype: DType,
    max: u64,
    ids: &[u32],
) -> std::result::Result<(), u32> {
    if let Some(&bad) = ids.iter().find(|&&id| u64::from(id) > max) {
        return Err(bad);
    }
    match dtype.size() {
        1 => out.extend(ids.iter().map(|&id| id as u8)),
        2 => {
            out.reserve(ids.len() * 2);
            for &id in ids {
                out.extend_from_slice(&(id as u16).to_le_bytes());
            }
        }
        4 => {
            out.reserve(ids.len() * 4);
            for &id in ids {
                out.extend_from_slice(&id.to_le_bytes());
            }
        }
        _ => {
            out.reserve(ids.len() * 8);
            for &id in ids {
                out.extend_from_slice(&u64::from(id).to_le_bytes());
            }
        }
    }
    Ok(())
}

/// Appends the sort key of a group or order value: bytes whose order is the values' order
/// (numbers numerically, before strings, which compare bytewise). `Ok(false)` for an
/// absent or null value (nothing appended), `Err` naming the type of an unusable one.
fn push_key(out: &mut Vec<u8>, v: &Val<'_>) -> std::result::Result<bool, String> {
    match v {
        Val::Absent | Val::Null => Ok(false),
        Val::Str(s) => {
            out.push(2);
            out.extend_from_slice(s.as_bytes());
            Ok(true)
        }
        Val::Int(i) => {
            out.push(1);
            out.extend_from_slice(&f64_key(*i as f64));
            out.extend_from_slice(&((*i as u128) ^ (1 << 127)).to_be_bytes());
            Ok(true)
        }
        Val::Float(f) => {
            out.push(1);
            out.extend_from_slice(&f64_key(*f));
            out.extend_from_slice(&((*f as i128 as u128) ^ (1 << 127)).to_be_bytes());
            Ok(true)
        }
        Val::Other(what) => Err(format!("{what}; expected a string or a number")),
    }
}

/// Big-endian bytes of `f` that sort as `f` does (IEEE total order).
fn f64_key(f: f64) -> [u8; 8] {
    let bits = f.to_bits();
    let key = if bits >> 63 == 1 {
        !bits
    } else {
        bits | 1 << 63
    };
    key.to_be_bytes()
}

// ---------------------------------------------------------------------------------------
// JSON: pull three fields out of an object without building it.

/// The fields to pull out of each line.
struct Pick<'f> {
    text: &'f str,
    group: Option<&'f str>,
    order: Option<&'f str>,
}

/// The fields pulled out of one line.
struct Picked<'a> {
    text: Val<'a>,
    group: Val<'a>,
    order: Val<'a>,
}

/// A field's value, borrowed from the line when it has no escapes.
enum Val<'a> {
    Absent,
    Null,
    Str(Cow<'a, str>),
    Int(i128),
    Float(f64),
    Other(&'static str),
}

impl Val<'_> {
    fn describe(&self) -> &'static str {
        match self {
            Val::Absent => "absent",
            Val::Null => "null",
            Val::Str(_) => "a string",
            Val::Int(_) | Val::Float(_) => "a number",
            Val::Other(what) => what,
        }
    }
}

impl<'de> Deserialize<'de> for Val<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        d.deserialize_any(ValVisitor)
    }
}

struct ValVisitor;

impl<'de> Visitor<'de> for ValVisitor {
    type Value = Val<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_borrowed_str<E>(self, v: &'de str) -> std::result::Result<Val<'de>, E> {
        Ok(Val::Str(Cow::Borrowed(v)))
    }
    fn visit_str<E>(self, v: &str) -> std::result::Result<Val<'de>, E> {
        Ok(Val::Str(Cow::Owned(v.to_owned())))
    }
    fn visit_string<E>(self, v: String) -> std::result::Result<Val<'de>, E> {
        Ok(Val::Str(Cow::Owned(v)))
    }
    fn visit_i64<E>(self, v: i64) -> std::result::Result<Val<'de>, E> {
        Ok(Val::Int(i128::from(v)))
    }
    fn visit_u64<E>(self, v: u64) -> std::result::Result<Val<'de>, E> {
        Ok(Val::Int(i128::from(v)))
    }
    fn visit_f64<E>(self, v: f64) -> std::result::Result<Val<'de>, E> {
        Ok(Val::Float(v))
    }
    fn visit_bool<E>(self, _: bool) -> std::result::Result<Val<'de>, E> {
        Ok(Val::Other("a boolean"))
    }
    fn visit_unit<E>(self) -> std::result::Result<Val<'de>, E> {
        Ok(Val::Null)
    }
    fn visit_none<E>(self) -> std::result::Result<Val<'de>, E> {
        Ok(Val::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<Val<'de>, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Val::Other("an array"))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<Val<'de>, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Val::Other("an object"))
    }
}

/// An object key, borrowed when it has no escapes.
struct Key<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object key")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> std::result::Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> std::result::Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v.to_owned())))
            }
        }
        d.deserialize_str(KeyVisitor)
    }
}

impl<'de> DeserializeSeed<'de> for Pick<'_> {
    type Value = Picked<'de>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> std::result::Result<Picked<'de>, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for Pick<'_> {
    type Value = Picked<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(
        self,
        mut map: A,
    ) -> std::result::Result<Picked<'de>, A::Error> {
        let mut out = Picked {
            text: Val::Absent,
            group: Val::Absent,
            order: Val::Absent,
        };
        while let Some(Key(key)) = map.next_key::<Key<'de>>()? {
            let key = key.as_ref();
            if key == self.text {
                out.text = map.next_value()?;
            } else if Some(key) == self.group {
                out.group = map.next_value()?;
            } else if Some(key) == self.order {
                out.order = map.next_value()?;
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(out)
    }
}

// ---------------------------------------------------------------------------------------
// Writing: results back in input order, into the shard or the spill file.

#[derive(Default)]
struct Stats {
    lines: u64,
    blank: u64,
    text_bytes: u64,
    documents: u64,
    tokens: u64,
    bad: BadCounts,
}

enum Out {
    Stream(MegatronWriter),
    Grouped {
        spill: BufWriter<File>,
        spill_path: PathBuf,
        spill_at: u64,
        sorter: Sorter,
    },
}

struct Sink<'a> {
    inputs: &'a [PathBuf],
    dtype: DType,
    max_bad: Option<u64>,
    out: Out,
    stats: Stats,
    first_bad: Vec<BadLine>,
    progress: &'a ProgressBar,
    started: Instant,
    last_tick: Instant,
}

/// Receives processed chunks, puts them back in input order and writes them, returning a
/// slot to the reader for each one written.
fn collect(done: Receiver<Done>, slots: SyncSender<()>, sink: &mut Sink<'_>) -> Result<()> {
    let mut pending: BTreeMap<u64, Done> = BTreeMap::new();
    let mut next = 0u64;
    for d in done.iter() {
        pending.insert(d.seq, d);
        while let Some(d) = pending.remove(&next) {
            sink.take(d)?;
            next += 1;
            let _ = slots.send(());
        }
    }
    Ok(())
}

impl Sink<'_> {
    fn take(&mut self, d: Done) -> Result<()> {
        let path = &self.inputs[d.file];
        if let Some(mut fatal) = d.fatal {
            if let TokenizeError::TokenRange { path: p, .. } = &mut fatal {
                *p = path.clone();
            }
            return Err(fatal);
        }
        self.stats.lines += d.lines;
        self.stats.blank += d.blank;
        self.stats.text_bytes += d.text_bytes;
        for (line, kind, detail) in d.bad {
            self.stats.bad.add(kind);
            if self.first_bad.len() < REPORTED_BAD_LINES {
                self.first_bad.push(BadLine {
                    file: path.clone(),
                    line,
                    kind: kind.name(),
                    detail,
                });
            }
        }
        if let Some(max) = self.max_bad {
            let bad = self.stats.bad.total();
            if bad > max {
                return Err(TokenizeError::TooManyBad {
                    bad,
                    max,
                    first: self.first_bad.clone(),
                });
            }
        }
        let size = self.dtype.size() as u64;
        let mut at = 0usize;
        for doc in &d.docs {
            let len = (doc.ntok * size) as usize;
            let bytes = &d.tokens[at..at + len];
            at += len;
            match &mut self.out {
                Out::Stream(w) => w.add_document_bytes(bytes)?,
                Out::Grouped {
                    spill,
                    spill_path,
                    spill_at,
                    sorter,
                } => {
                    spill
                        .write_all(bytes)
                        .map_err(io_err(spill_path, "write"))?;
                    let seq = self.stats.documents;
                    let own;
                    let g: &[u8] = match doc.group {
                        Some((a, n)) => &d.keys[a..a + n],
                        None => {
                            let mut k = [0u8; 9];
                            k[1..].copy_from_slice(&seq.to_be_bytes());
                            own = k;
                            &own
                        }
                    };
                    let (oa, on) = doc.order;
                    sorter.push(g, &d.keys[oa..oa + on], seq, *spill_at, doc.ntok)?;
                    *spill_at += len as u64;
                }
            }
            self.stats.documents += 1;
            self.stats.tokens += doc.ntok;
        }
        if let Out::Grouped { sorter, .. } = &mut self.out {
            for &(a, n) in &d.dropped {
                sorter.push(&d.keys[a..a + n], &[], u64::MAX, DROPPED_ROW, 0)?;
            }
        }
        self.progress.set_position(d.stored_end);
        let now = Instant::now();
        if now.duration_since(self.last_tick) >= Duration::from_millis(250) {
            self.last_tick = now;
            let secs = now.duration_since(self.started).as_secs_f64().max(1e-9);
            self.progress.set_message(format!(
                "{} docs/s, {} tok/s, {:.1} MB/s",
                crate::util::si(self.stats.documents as f64 / secs),
                crate::util::si(self.stats.tokens as f64 / secs),
                self.stats.text_bytes as f64 / secs / 1e6
            ));
        }
        Ok(())
    }
}

struct GroupedWritten {
    groups: u64,
    vanished: u64,
    runs: usize,
}

/// Pass 2: documents in (group, order, input position) order from the spill file into the
/// shard, and the sidecar alongside; the sidecar is renamed before the shard, whose
/// `.idx` is the last file to appear.
#[allow(clippy::too_many_arguments)]
fn write_grouped(
    prefix: &Path,
    groups_path: &Path,
    dtype: DType,
    documents: u64,
    spill: &File,
    spill_path: &Path,
    sorter: Sorter,
    progress: bool,
) -> Result<GroupedWritten> {
    let mut writer = MegatronWriter::create(prefix, dtype)?;
    let mut sidecar = GroupsWriter::create(groups_path, documents)?;
    let pb = bar(documents, progress, "writing", "documents in group order");
    let size = dtype.size() as u64;
    let mut buf: Vec<u8> = Vec::new();
    // The key of the group being read, and its id once it has a document (a group whose
    // every row was dropped gets none and is counted as vanished).
    let mut key: Option<Vec<u8>> = None;
    let mut id: Option<u64> = None;
    let mut groups = 0u64;
    let mut vanished = 0u64;
    let mut n = 0u64;
    let runs = sorter.finish(|g, off, ntok| {
        if key.as_deref() != Some(g) {
            if key.is_some() && id.is_none() {
                vanished += 1;
            }
            key = Some(g.to_vec());
            id = None;
        }
        if off == DROPPED_ROW {
            return Ok(());
        }
        let group = *id.get_or_insert_with(|| {
            groups += 1;
            groups - 1
        });
        let len = (ntok * size) as usize;
        buf.resize(len, 0);
        spill
            .read_exact_at(&mut buf, off)
            .map_err(io_err(spill_path, "read"))?;
        writer.add_document_bytes(&buf)?;
        sidecar.push(group)?;
        n += 1;
        if n % 4096 == 0 {
            pb.set_position(n);
        }
        Ok(())
    })?;
    if key.is_some() && id.is_none() {
        vanished += 1;
    }
    pb.finish_and_clear();
    sidecar.finish()?;
    writer.finish()?;
    Ok(GroupedWritten {
        groups,
        vanished,
        runs,
    })
}

// ---------------------------------------------------------------------------------------
// The external sort of group records.
//
// A record is `glen u32 | olen u32 | group key | order key | seq u64 | offset u64 |
// tokens u64`, little-endian, the same in memory and in run files. Records compare by
// (group key, order key, seq); seq is unique, so the order is total and deterministic.

/// Group records, sorted in memory up to a budget and in runs on disk past it.
struct Sorter {
    arena: Vec<u8>,
    index: Vec<usize>,
    arena_cap: usize,
    index_cap: usize,
    dir: PathBuf,
    stem: String,
    runs: Vec<PathBuf>,
    made: usize,
    buf_bytes: usize,
}

impl Drop for Sorter {
    fn drop(&mut self) {
        for r in &self.runs {
            let _ = std::fs::remove_file(r);
        }
    }
}

fn rec_fields(rec: &[u8]) -> (&[u8], &[u8], u64, u64, u64) {
    let gl = u32::from_le_bytes([rec[0], rec[1], rec[2], rec[3]]) as usize;
    let ol = u32::from_le_bytes([rec[4], rec[5], rec[6], rec[7]]) as usize;
    let g = &rec[8..8 + gl];
    let o = &rec[8 + gl..8 + gl + ol];
    let t = 8 + gl + ol;
    let u = |at: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&rec[at..at + 8]);
        u64::from_le_bytes(w)
    };
    (g, o, u(t), u(t + 8), u(t + 16))
}

fn rec_cmp(a: &[u8], b: &[u8]) -> CmpOrdering {
    let (ga, oa, sa, _, _) = rec_fields(a);
    let (gb, ob, sb, _, _) = rec_fields(b);
    ga.cmp(gb).then_with(|| oa.cmp(ob)).then(sa.cmp(&sb))
}

fn rec_len(rec: &[u8]) -> usize {
    let gl = u32::from_le_bytes([rec[0], rec[1], rec[2], rec[3]]) as usize;
    let ol = u32::from_le_bytes([rec[4], rec[5], rec[6], rec[7]]) as usize;
    8 + gl + ol + 24
}

impl Sorter {
    fn new(budget: usize, dir: PathBuf, stem: String) -> Sorter {
        // Reserved, not touched: pages are committed only as records arrive, and the
        // arena never reallocates (so it never holds twice the budget while copying).
        let arena_cap = budget / 8 * 7;
        let index_cap = (budget / 8 / std::mem::size_of::<usize>()).max(1);
        Sorter {
            arena: Vec::new(),
            index: Vec::new(),
            arena_cap,
            index_cap,
            dir,
            stem,
            runs: Vec::new(),
            made: 0,
            buf_bytes: (budget / 4).clamp(64 << 10, 8 << 20),
        }
    }

    fn push(&mut self, g: &[u8], o: &[u8], seq: u64, off: u64, ntok: u64) -> Result<()> {
        let len = 8 + g.len() + o.len() + 24;
        if self.arena.len() + len > self.arena_cap || self.index.len() >= self.index_cap {
            self.spill()?;
        }
        if self.arena.capacity() == 0 {
            self.arena.reserve_exact(self.arena_cap.max(len));
            self.index.reserve_exact(self.index_cap);
        }
        self.index.push(self.arena.len());
        self.arena
            .extend_from_slice(&(g.len() as u32).to_le_bytes());
        self.arena
            .extend_from_slice(&(o.len() as u32).to_le_bytes());
        self.arena.extend_from_slice(g);
        self.arena.extend_from_slice(o);
        self.arena.extend_from_slice(&seq.to_le_bytes());
        self.arena.extend_from_slice(&off.to_le_bytes());
        self.arena.extend_from_slice(&ntok.to_le_bytes());
        Ok(())
    }

    fn sort_index(&mut self) {
        let arena = &self.arena;
        self.index
            .sort_unstable_by(|&a, &b| rec_cmp(&arena[a..], &arena[b..]));
    }

    fn new_run(&mut self) -> Result<(PathBuf, BufWriter<File>)> {
        let path = self
            .dir
            .join(format!("{}.sort-{:05}.tmp", self.stem, self.made));
        self.made += 1;
        let f = File::create(&path).map_err(io_err(&path, "create"))?;
        self.runs.push(path.clone());
        Ok((path, BufWriter::with_capacity(self.buf_bytes, f)))
    }

    /// Writes the in-memory records, sorted, as a new run and empties memory.
    fn spill(&mut self) -> Result<()> {
        if self.index.is_empty() {
            return Ok(());
        }
        self.sort_index();
        let (path, mut w) = self.new_run()?;
        for &at in &self.index {
            let rec = &self.arena[at..];
            w.write_all(&rec[..rec_len(rec)])
                .map_err(io_err(&path, "write"))?;
        }
        w.flush().map_err(io_err(&path, "write"))?;
        self.arena.clear();
        self.index.clear();
        Ok(())
    }

    /// Calls `f(group key, spill offset, tokens)` for every record in sorted order and
    /// returns how many runs went to disk.
    fn finish(mut self, mut f: impl FnMut(&[u8], u64, u64) -> Result<()>) -> Result<usize> {
        if self.runs.is_empty() {
            self.sort_index();
            for &at in &self.index {
                let (g, _, _, off, ntok) = rec_fields(&self.arena[at..]);
                f(g, off, ntok)?;
            }
            return Ok(0);
        }
        self.spill()?;
        self.arena = Vec::new();
        self.index = Vec::new();
        let spilled = self.runs.len();
        // Merge in passes of at most MERGE_FAN_IN runs, so open files stay bounded.
        while self.runs.len() > MERGE_FAN_IN {
            let batch: Vec<PathBuf> = self.runs.drain(..MERGE_FAN_IN).collect();
            let (path, mut w) = self.new_run()?;
            merge(&batch, self.buf_bytes / MERGE_FAN_IN, |rec| {
                w.write_all(rec).map_err(io_err(&path, "write"))
            })?;
            w.flush().map_err(io_err(&path, "write"))?;
            for r in &batch {
                let _ = std::fs::remove_file(r);
            }
        }
        let runs = self.runs.clone();
        merge(&runs, self.buf_bytes / runs.len().max(1), |rec| {
            let (g, _, _, off, ntok) = rec_fields(rec);
            f(g, off, ntok)
        })?;
        Ok(spilled)
    }
}

/// One run file being merged, with its current record.
struct RunHead {
    rec: Vec<u8>,
    run: usize,
}

impl PartialEq for RunHead {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == CmpOrdering::Equal
    }
}
impl Eq for RunHead {}
impl PartialOrd for RunHead {
    fn partial_cmp(&self, other: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(other))
    }
}
impl Ord for RunHead {
    // Reversed: BinaryHeap is a max-heap and the merge wants the smallest record.
    fn cmp(&self, other: &Self) -> CmpOrdering {
        rec_cmp(&other.rec, &self.rec)
    }
}

/// Reads the next record of a run into `rec`; `false` at the end of the run.
fn read_rec(r: &mut BufReader<File>, rec: &mut Vec<u8>, path: &Path) -> Result<bool> {
    let mut head = [0u8; 8];
    match r.read_exact(&mut head) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(false),
        Err(e) => return Err(io_err(path, "read")(e)),
    }
    let gl = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
    let ol = u32::from_le_bytes([head[4], head[5], head[6], head[7]]) as usize;
    rec.clear();
    rec.extend_from_slice(&head);
    rec.resize(8 + gl + ol + 24, 0);
    r.read_exact(&mut rec[8..]).map_err(io_err(path, "read"))?;
    Ok(true)
}

/// K-way merge of sorted runs, calling `out` on each record in order.
fn merge(
    runs: &[PathBuf],
    buf_bytes: usize,
    mut out: impl FnMut(&[u8]) -> Result<()>,
) -> Result<()> {
    let mut readers = Vec::with_capacity(runs.len());
    let mut heap = BinaryHeap::with_capacity(runs.len());
    for (i, path) in runs.iter().enumerate() {
        let f = File::open(path).map_err(io_err(path, "open"))?;
        let mut r = BufReader::with_capacity(buf_bytes.max(16 << 10), f);
        let mut rec = Vec::new();
        if read_rec(&mut r, &mut rec, path)? {
            heap.push(RunHead { rec, run: i });
        }
        readers.push(r);
    }
    while let Some(mut head) = heap.pop() {
        out(&head.rec)?;
        let i = head.run;
        if read_rec(&mut readers[i], &mut head.rec, &runs[i])? {
            heap.push(head);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_sort_numbers_numerically_then_strings() {
        let key = |v: Val<'_>| {
            let mut k = Vec::new();
            push_key(&mut k, &v).unwrap();
            k
        };
        let mut ks = [
            key(Val::Str("a".into())),
            key(Val::Int(10)),
            key(Val::Float(2.5)),
            key(Val::Int(-3)),
            key(Val::Int(2)),
            key(Val::Str("B".into())),
        ];
        ks.sort();
        let want = [
            key(Val::Int(-3)),
            key(Val::Int(2)),
            key(Val::Float(2.5)),
            key(Val::Int(10)),
            key(Val::Str("B".into())),
            key(Val::Str("a".into())),
        ];
        assert_eq!(ks, want);
        // Integers beyond f64's precision still order exactly.
        assert!(key(Val::Int((1 << 60) + 1)) > key(Val::Int(1 << 60)));
    }

    /// Feeds `input` to a cutter in `piece`-byte reads, as the reader does, and returns
    /// its chunks (data, lines, skipped) and the most it ever held.
    fn cut(input: &[u8], max_line: usize, chunk: usize, piece: usize) -> (Vec<Cut>, usize) {
        let mut c = LineCutter::new(max_line);
        let mut out = Vec::new();
        let mut most = 0;
        let mut at = 0;
        while at < input.len() {
            let end = (at + piece).min(input.len());
            at += c.feed(&input[at..end], chunk);
            most = most.max(c.buf.capacity());
            if c.full(chunk) {
                out.push(c.take());
            }
        }
        c.finish();
        if !c.is_empty() {
            out.push(c.take());
        }
        (out, most)
    }

    #[test]
    fn a_line_past_the_limit_is_never_held() {
        // 16 MB lines against a 1 MiB limit, read 64 KiB at a time: the cutter never
        // holds more than about the limit plus a chunk (a buffered line would be 16 MB).
        let big = vec![b'x'; 16 << 20];
        let mut input = b"a\n".to_vec();
        input.extend_from_slice(&big);
        input.extend_from_slice(b"\nbb\n");
        input.extend_from_slice(&big);
        let (chunks, most) = cut(&input, 1 << 20, 64 << 10, 64 << 10);
        assert!(most <= 4 << 20, "held {most} bytes");
        let data: Vec<u8> = chunks.iter().flat_map(|c| c.data.clone()).collect();
        assert_eq!(data, b"a\nbb\n");
        let lines: u64 = chunks.iter().map(|c| c.lines).sum();
        assert_eq!(lines, 4);
        // Skipped lines keep their place: line 2 and line 4 (the last, with no newline).
        let mut first = 1;
        let mut skipped = Vec::new();
        for c in &chunks {
            skipped.extend(c.skipped.iter().map(|&(i, len)| (first + i, len)));
            first += c.lines;
        }
        let skipped_bytes: u64 = chunks.iter().map(|c| c.skipped_bytes).sum();
        assert_eq!(
            skipped_bytes,
            2 * (16 << 20) + 1,
            "the newline of line 2 counts"
        );
        assert_eq!(skipped, [(2, 16 << 20), (4, 16 << 20)]);

        // Any read size and chunk size cut the same lines.
        let text = b"one\ntwo two\n\nthree three three\nfour\nxxxxxxxxxxxx\nlast";
        for piece in [1, 2, 5, 64] {
            for chunk in [1, 7, 1000] {
                let (chunks, _) = cut(text, 11, chunk, piece);
                let data: Vec<u8> = chunks.iter().flat_map(|c| c.data.clone()).collect();
                assert_eq!(data, b"one\ntwo two\n\nfour\nlast", "{piece} {chunk}");
                let lines: u64 = chunks.iter().map(|c| c.lines).sum();
                assert_eq!(lines, 7);
            }
        }
    }

    #[test]
    fn the_encode_gate_admits_up_to_its_budget_and_one_alone_always() {
        let gate = Arc::new(EncodeGate::new(10));
        let big = gate.enter(25); // over budget, but alone: admitted
        let (tx, rx) = std::sync::mpsc::channel();
        let waiter = {
            let gate = gate.clone();
            std::thread::spawn(move || {
                let _p = gate.enter(4);
                let _ = tx.send(());
            })
        };
        // It waits while the big one is inside...
        assert!(rx.recv_timeout(Duration::from_millis(200)).is_err());
        drop(big);
        // ...and enters once it has left.
        assert!(rx.recv_timeout(Duration::from_secs(30)).is_ok());
        waiter.join().unwrap();
        let a = gate.enter(6);
        let b = gate.enter(4); // 6 + 4 fits exactly
        drop((a, b));
        assert_eq!(*gate.inside.lock().unwrap(), 0);
    }

    #[test]
    fn sorter_merges_runs_in_order() {
        let dir = std::env::temp_dir().join(format!("millrace-sort-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut s = Sorter::new(4096, dir.clone(), "t".into());
        let n = 2000u64;
        for seq in 0..n {
            let g = format!("g{}", (seq * 7919) % 37);
            s.push(g.as_bytes(), &[0], seq, seq, 1).unwrap();
        }
        assert!(s.runs.len() > 1);
        let mut got = Vec::new();
        let runs = s
            .finish(|g, off, _| {
                got.push((g.to_vec(), off));
                Ok(())
            })
            .unwrap();
        assert!(runs > 1);
        let mut want: Vec<(Vec<u8>, u64)> = (0..n)
            .map(|seq| (format!("g{}", (seq * 7919) % 37).into_bytes(), seq))
            .collect();
        want.sort();
        assert_eq!(got, want);
        let left = std::fs::read_dir(&dir).unwrap().count();
        assert_eq!(left, 0, "run files are removed");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
