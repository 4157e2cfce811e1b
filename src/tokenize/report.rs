//! tokenize, What a run reports: its errors, its bad lines by kind, and its summary.

use super::*;

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
        "{bad} bad input lines, more than --max-bad {max}; nothing was written{}",
        first_bad_lines(first)
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
    #[error(
        "no documents: {lines} input lines, {bad} of them bad; nothing was written{}",
        first_bad_lines(first)
    )]
    Empty {
        /// Lines read.
        lines: u64,
        /// Bad lines among them.
        bad: u64,
        /// The first few bad lines, with file:line (what is wrong with them all, often:
        /// a misspelt --text-field).
        first: Vec<BadLine>,
    },
    /// Another run is writing the same output right now (it holds the lock file).
    #[error(
        "{out}: another tokenize run is writing this output now (it holds {lock}); \
         wait for it to end or give another --out (or --shard-index)"
    )]
    OutputInUse {
        /// The output prefix.
        out: PathBuf,
        /// The lock file the other run holds.
        lock: PathBuf,
    },
    /// Outputs of the same prefix that are not of this job (runs outside it, shards no
    /// manifest lists, a single-shard output): a config naming the directory would serve
    /// them beside the job's shards, so the operator must remove them first.
    #[error(
        "{dir} holds {} of this --out that {} not of this job of {runs} runs: {}; \
         a config naming the directory would serve them beside the job's shards (stale or \
         duplicate documents). They are left by an earlier job into the same --out: \
         remove them, then {then}",
        if files.len() == 1 { "1 file".to_string() } else { format!("{} files", files.len()) },
        if files.len() == 1 { "is" } else { "are" },
        name_some(files)
    )]
    ForeignOutputs {
        /// The output directory.
        dir: PathBuf,
        /// Runs in this job (`--num-shards`).
        runs: u64,
        /// The files, by name, each manifest with the job it says it is of.
        files: Vec<String>,
        /// What to do once they are removed.
        then: &'static str,
    },
    /// Writing or re-checking the shard failed.
    #[error(transparent)]
    Corpus(#[from] CorpusError),
}

/// The first 12 of `names`, comma-separated, then how many more there are: an error
/// naming a million leftover shards stays readable.
fn name_some(names: &[String]) -> String {
    const SHOWN: usize = 12;
    let mut out = names
        .iter()
        .take(SHOWN)
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > SHOWN {
        let _ = write!(out, " and {} more", names.len() - SHOWN);
    }
    out
}

/// The first bad lines, for an error that gave up on them: ". First bad lines:" and one
/// `file:line: kind: detail` a line; empty when there were none.
fn first_bad_lines(first: &[BadLine]) -> String {
    let mut out = String::new();
    for (i, b) in first.iter().enumerate() {
        out.push_str(if i == 0 {
            ". First bad lines:\n  "
        } else {
            "\n  "
        });
        out.push_str(&b.to_string());
    }
    out
}

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
    pub(super) fn add(&mut self, kind: BadKind) {
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
    /// Every shard written, in order (one, at `prefix`, unless sharded).
    pub shards: Vec<OutputShard>,
    /// This run's index and the number of runs of the job.
    pub run: [u64; 2],
    /// Documents read but left to the other runs of the job (grouped jobs read every input).
    pub other_runs_documents: u64,
    /// The run's manifest, when sharded.
    pub manifest: Option<PathBuf>,
}

/// The human-readable summary.
pub fn render(s: &TokenizeSummary) -> String {
    use crate::util::thousands;
    let mut t = String::new();
    let _ = writeln!(
        t,
        "wrote {} documents, {} tokens ({}, eos {}) to {}",
        thousands(s.documents),
        thousands(s.tokens),
        s.dtype,
        s.eos.map_or("none".to_string(), |e| e.to_string()),
        match s.manifest {
            None => format!("{}.bin/.idx", s.prefix.display()),
            Some(_) => format!(
                "{} shards {}-*",
                s.shards.len(),
                shard_prefix_stem(&s.prefix, s.run[0]).display()
            ),
        }
    );
    if let Some(g) = s.groups {
        let path = s.groups_file.as_ref();
        let _ = writeln!(
            t,
            "{} groups in {} ({} sorted runs spilled); {} more had only empty or bad rows \
             and are not in it",
            thousands(g),
            path.map_or("the shards' sidecars".into(), |p| p.display().to_string()),
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
    if let Some(m) = &s.manifest {
        let [run, runs] = s.run;
        let _ = writeln!(
            t,
            "run {run} of {runs}: {} shards, listed in {}; {} documents left to the other runs",
            s.shards.len(),
            m.display(),
            thousands(s.other_runs_documents)
        );
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
