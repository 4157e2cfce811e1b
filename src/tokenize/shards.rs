//! tokenize, Output shards: which inputs and documents belong to run i of N, how a run's
//! output is cut into shards of a size and named, and the writer that does the cutting.
//!
//! A corpus of 10^12 tokens is tokenized by many runs at once (a Slurm array, a Ray or
//! Kubernetes job, xargs), each writing many shards. What run i writes must be a pure
//! function of the inputs and options, never of timing or threads, so:
//! - without a group field, run i takes input files i, i+N, i+2N, ... (in the order
//!   given), and reads no other file;
//! - with a group field, every run reads every file, and a document belongs to run
//!   `xxh3(group key) mod N`, so a group never spans runs; a document without a group
//!   (each its own group) and a bad line belong to `xxh3(file index, line) mod N`.
//!
//! Within a run, a shard is closed once it holds `--shard-tokens` tokens, at the next
//! document (ungrouped) or the next group boundary (grouped), so a group never spans
//! shards either: a group larger than the limit makes one larger shard.

use super::*;

use xxhash_rust::xxh3::xxh3_64;

/// Run `index` of `count` runs that share one tokenize job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Share {
    pub(super) count: u64,
    pub(super) index: u64,
}

impl Share {
    /// Whether this run takes input file `file` of an ungrouped job.
    pub(super) fn owns_file(&self, file: usize) -> bool {
        file as u64 % self.count == self.index
    }

    /// Whether this run takes the group whose encoded key is `key`.
    pub(super) fn owns_group(&self, key: &[u8]) -> bool {
        xxh3_64(key) % self.count == self.index
    }

    /// Whether this run takes line `line` of input `file` (an ungrouped document of a
    /// grouped job, or a bad line, so that bad lines are counted by exactly one run).
    pub(super) fn owns_line(&self, file: usize, line: u64) -> bool {
        let mut k = [0u8; 16];
        k[..8].copy_from_slice(&(file as u64).to_le_bytes());
        k[8..].copy_from_slice(&line.to_le_bytes());
        xxh3_64(&k) % self.count == self.index
    }
}

/// Where a run's output goes.
#[derive(Debug, Clone)]
pub(super) enum Layout {
    /// One shard at the `--out` prefix itself (no `--shard-tokens`, one run).
    Single(PathBuf),
    /// Shards `<out>-<run>-<k>` (at least five digits each), cut after `limit` tokens.
    Sharded { out: PathBuf, run: u64, limit: u64 },
}

impl Layout {
    /// The prefix of output shard `k`.
    pub(super) fn prefix(&self, k: usize) -> PathBuf {
        match self {
            Layout::Single(p) => p.clone(),
            Layout::Sharded { out, run, .. } => shard_prefix(out, *run, k),
        }
    }

    fn limit(&self) -> u64 {
        match self {
            Layout::Single(_) => u64::MAX,
            Layout::Sharded { limit, .. } => *limit,
        }
    }
}

/// `<out>-<run>-<k>`: the prefix of shard `k` written by run `run`.
pub fn shard_prefix(out: &Path, run: u64, k: usize) -> PathBuf {
    let mut s = out.as_os_str().to_owned();
    s.push(format!("-{run:05}-{k:05}"));
    PathBuf::from(s)
}

/// `<out>-<run>.manifest.json`: what run `run` wrote, the last file it writes.
pub fn run_manifest_path(out: &Path, run: u64) -> PathBuf {
    with_suffix(&shard_prefix_stem(out, run), "manifest.json")
}

/// `<out>-<run>`: what every file of run `run` starts with.
pub(super) fn shard_prefix_stem(out: &Path, run: u64) -> PathBuf {
    let mut s = out.as_os_str().to_owned();
    s.push(format!("-{run:05}"));
    PathBuf::from(s)
}

/// One output shard of a run, for the summary and the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputShard {
    /// The shard prefix (`.bin`, `.idx`, and `.groups.npy` when grouped).
    pub prefix: PathBuf,
    /// Documents in it.
    pub documents: u64,
    /// Tokens in it (EOS included).
    pub tokens: u64,
    /// Groups in its sidecar, when grouping.
    pub groups: Option<u64>,
}

/// The group ids of the shard being written: streamed to a sidecar whose length is known
/// up front (one output), or held until the shard is cut (its length is known then).
enum Sidecar {
    None,
    Stream(GroupsWriter),
    Held(Vec<u64>),
}

/// Writes documents into the shards of a [`Layout`], cutting a new shard at a boundary
/// once the current one is full; an unfinished shard's temporary files go on drop.
pub(super) struct ShardWriter {
    layout: Layout,
    dtype: DType,
    /// Documents of the whole output when one grouped shard is written (the sidecar is
    /// then streamed); `None` otherwise.
    grouped: Option<u64>,
    cur: Option<(MegatronWriter, Sidecar, OutputShard)>,
    /// The first global group id of the current shard (ids restart at 0 per sidecar).
    group_base: u64,
    done: Vec<OutputShard>,
}

impl ShardWriter {
    /// `grouped`: `Some(total documents)` when a sidecar is written.
    pub(super) fn new(layout: Layout, dtype: DType, grouped: Option<u64>) -> ShardWriter {
        ShardWriter {
            layout,
            dtype,
            grouped,
            cur: None,
            group_base: 0,
            done: Vec::new(),
        }
    }

    /// A place where a shard may end (before a document, or before a group); ends the
    /// current shard if it is full. `next_group` is the global id of the group to come.
    pub(super) fn boundary(&mut self, next_group: u64) -> Result<()> {
        if self
            .cur
            .as_ref()
            .is_some_and(|c| c.2.tokens >= self.layout.limit())
        {
            self.close()?;
        }
        if self.cur.is_none() {
            self.group_base = next_group;
        }
        Ok(())
    }

    /// Appends one document (raw bytes of the dtype), of global group `group` if grouped.
    pub(super) fn add(&mut self, bytes: &[u8], group: Option<u64>) -> Result<()> {
        if self.cur.is_none() {
            let prefix = self.layout.prefix(self.done.len());
            let writer = MegatronWriter::create(&prefix, self.dtype)?;
            let groups = with_suffix(&prefix, "groups.npy");
            let sidecar = match (self.grouped, &self.layout) {
                (None, _) => Sidecar::None,
                (Some(n), Layout::Single(_)) => Sidecar::Stream(GroupsWriter::create(&groups, n)?),
                (Some(_), Layout::Sharded { .. }) => Sidecar::Held(Vec::new()),
            };
            let shard = OutputShard {
                prefix,
                documents: 0,
                tokens: 0,
                groups: self.grouped.map(|_| 0),
            };
            self.cur = Some((writer, sidecar, shard));
        }
        let Some((writer, sidecar, shard)) = self.cur.as_mut() else {
            return Ok(());
        };
        writer.add_document_bytes(bytes)?;
        if let Some(g) = group {
            let local = g - self.group_base;
            match sidecar {
                Sidecar::None => {}
                Sidecar::Stream(w) => w.push(local)?,
                Sidecar::Held(ids) => ids.push(local),
            }
            shard.groups = Some(local + 1);
        }
        shard.documents += 1;
        shard.tokens += (bytes.len() / self.dtype.size()) as u64;
        Ok(())
    }

    /// Renames the current shard into place: the sidecar first, the `.idx` last.
    fn close(&mut self) -> Result<()> {
        let Some((writer, sidecar, shard)) = self.cur.take() else {
            return Ok(());
        };
        let groups = with_suffix(&shard.prefix, "groups.npy");
        match sidecar {
            Sidecar::None => {}
            Sidecar::Stream(w) => {
                w.finish()?;
            }
            Sidecar::Held(ids) => {
                crate::corpus::groups::write(&groups, &ids)?;
            }
        }
        writer.finish()?;
        self.done.push(shard);
        Ok(())
    }

    /// Closes the last shard and returns every shard written, in order.
    pub(super) fn finish(mut self) -> Result<Vec<OutputShard>> {
        self.close()?;
        Ok(std::mem::take(&mut self.done))
    }
}

impl Drop for ShardWriter {
    fn drop(&mut self) {
        if let Some((writer, _, shard)) = self.cur.take() {
            drop(writer);
            for ext in ["bin.tmp", "idx.tmp", "groups.npy.tmp"] {
                let _ = std::fs::remove_file(with_suffix(&shard.prefix, ext));
            }
        }
    }
}

/// The strictest reader re-checks what was written: each shard and its sidecar open,
/// each index passes the full validation `millrace inspect` runs, and the shards hold
/// the `documents` and `tokens` that were read.
pub(super) fn recheck(
    shards: &[OutputShard],
    out: &Path,
    documents: u64,
    tokens: u64,
) -> Result<()> {
    let (mut docs, mut toks) = (0, 0);
    for s in shards {
        let shard = Shard::open(&s.prefix, None)?;
        shard.validate()?;
        if shard.documents() != s.documents || shard.tokens() != s.tokens {
            return Err(TokenizeError::Corpus(CorpusError::invalid(
                with_suffix(&s.prefix, "idx"),
                format!(
                    "re-opened shard holds {} documents and {} tokens, but {} and {} were written",
                    shard.documents(),
                    shard.tokens(),
                    s.documents,
                    s.tokens
                ),
            )));
        }
        docs += s.documents;
        toks += s.tokens;
    }
    if (docs, toks) != (documents, tokens) {
        return Err(TokenizeError::Corpus(CorpusError::invalid(
            out,
            format!(
                "the shards hold {docs} documents and {toks} tokens, but {documents} and \
                 {tokens} were read"
            ),
        )));
    }
    Ok(())
}

/// What a run writes under `out`, removed on drop unless the run kept it: a failed run
/// leaves nothing a reader opens, not the shards a run of a sharded job (`run`) had
/// finished, nor a single shard renamed into place before the run failed (a failed
/// `.idx` write after the sidecar's, or a shard that fails the re-check).
pub(super) struct Outputs {
    out: PathBuf,
    /// The run of a sharded job; `None`: the one shard `<out>.idx`, `.bin`, `.groups.npy`.
    run: Option<u64>,
    keep: bool,
}

impl Outputs {
    /// Removes what an earlier run left (a single shard's `.idx` first, so that from
    /// here on the prefix never opens until this run's final rename).
    pub(super) fn clear(out: &Path, run: Option<u64>) -> Result<Outputs> {
        let mut outputs = Outputs {
            out: out.to_path_buf(),
            run,
            keep: true, // a failed removal leaves the rest to the caller's error
        };
        outputs.remove()?;
        outputs.keep = false;
        Ok(outputs)
    }

    /// The run finished (its shards passed the re-check, its manifest is written): its
    /// outputs stay.
    pub(super) fn keep(mut self) {
        self.keep = true;
    }

    fn remove(&self) -> Result<()> {
        match self.run {
            Some(run) => remove_run_outputs(&self.out, run),
            None => remove_single_outputs(&self.out),
        }
    }
}

impl Drop for Outputs {
    fn drop(&mut self) {
        if !self.keep {
            let _ = self.remove();
        }
    }
}

/// Held for the whole run: two runs writing the same output at once would share its
/// temporary files and remove each other's finished shards, so that a run reports
/// success over a shard that is gone or holds the other run's tokens. The lock is an
/// `flock` on `<out>.lock` (`<out>-<run>.lock` for a run of a sharded job), released
/// by the kernel when the process dies however it dies, and the file is removed when
/// the run ends (a killed run's stale file is simply taken over).
pub(super) struct OutputLock {
    path: PathBuf,
    /// The locked descriptor: closing it releases the lock.
    _held: File,
}

impl OutputLock {
    /// Takes the lock of output `out` (run `run` of a sharded job), or fails at once
    /// with [`TokenizeError::OutputInUse`] when another run holds it.
    pub(super) fn take(out: &Path, run: Option<u64>) -> Result<OutputLock> {
        let path = match run {
            Some(run) => with_suffix(&shard_prefix_stem(out, run), "lock"),
            None => with_suffix(out, "lock"),
        };
        loop {
            let file = File::options()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .map_err(io_err(&path, "create"))?;
            match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
                Ok(()) => {}
                Err(rustix::io::Errno::WOULDBLOCK) => {
                    return Err(TokenizeError::OutputInUse {
                        out: out.to_path_buf(),
                        lock: path,
                    })
                }
                // A file system without flock (Lustre mounted without it, some FUSE):
                // the run goes on unguarded, as it did before there was a lock.
                Err(
                    rustix::io::Errno::NOSYS
                    | rustix::io::Errno::OPNOTSUPP
                    | rustix::io::Errno::NOLCK,
                ) => {
                    return Ok(OutputLock { path, _held: file });
                }
                Err(e) => return Err(io_err(&path, "flock")(e.into())),
            }
            // A run that just ended removed the file it held: the lock taken may be on
            // that removed file, which no later run would see. Take the current one.
            let held = rustix::fs::fstat(&file).map_err(|e| io_err(&path, "stat")(e.into()))?;
            match rustix::fs::stat(&path) {
                Ok(now) if (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino) => {
                    return Ok(OutputLock { path, _held: file });
                }
                Ok(_) => {}
                Err(rustix::io::Errno::NOENT) => {}
                Err(e) => return Err(io_err(&path, "stat")(e.into())),
            }
        }
    }
}

impl Drop for OutputLock {
    fn drop(&mut self) {
        // Removed while still held, so that no run takes a file about to disappear
        // without noticing (see `take`); the lock goes with the descriptor.
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Removes `<out>.idx`, then `<out>.bin` and `<out>.groups.npy`.
fn remove_single_outputs(out: &Path) -> Result<()> {
    for ext in ["idx", "bin", "groups.npy"] {
        let p = with_suffix(out, ext);
        match std::fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&p, "remove")(e)),
        }
    }
    Ok(())
}

/// Removes what an earlier run `run` of `out` wrote (its manifest first, then every
/// `.idx`, so nothing of it opens, then the rest), before this run writes anew.
fn remove_run_outputs(out: &Path, run: u64) -> Result<()> {
    let manifest = run_manifest_path(out, run);
    match std::fs::remove_file(&manifest) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(&manifest, "remove")(e)),
    }
    let mut ours: Vec<(bool, PathBuf)> = prefix_outputs(out)?
        .into_iter()
        .filter_map(|(path, name)| match name {
            OutputName::Shard { run: r, ext, .. } if r == run => Some((ext != ".idx", path)),
            _ => None,
        })
        .collect();
    ours.sort();
    for (_, p) in ours {
        std::fs::remove_file(&p).map_err(io_err(&p, "remove"))?;
    }
    Ok(())
}

/// The extensions of a shard's files, finished and temporary.
const SHARD_EXTS: [&str; 6] = [
    ".bin",
    ".idx",
    ".groups.npy",
    ".bin.tmp",
    ".idx.tmp",
    ".groups.npy.tmp",
];

/// What a file beside an output prefix is to that prefix: the kinds of files tokenize
/// writes there, told apart by name, so that a rerun clears its own and a job can see
/// another's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum OutputName {
    /// `<stem>.idx`, `.bin`, `.groups.npy` (or their `.tmp`): a single-shard output.
    Single,
    /// `<stem>-<run>.manifest.json`.
    Manifest {
        /// The run that wrote it.
        run: u64,
    },
    /// `<stem>-<run>-<k><ext>`: a file of shard `k` of run `run`.
    Shard {
        /// The run that wrote it.
        run: u64,
        /// The shard's prefix, `<stem>-<run>-<k>` (as named in a manifest).
        prefix: String,
        /// One of [`SHARD_EXTS`].
        ext: &'static str,
    },
}

/// What the file `name` is to the output prefix whose file name is `stem`, if anything.
/// Run and shard numbers are `{:05}` (five digits up to 99999, more past it); a name
/// whose numbers are not digits, or fewer than five, is another prefix's.
pub(super) fn output_name(stem: &str, name: &str) -> Option<OutputName> {
    let number = |s: &str| {
        (s.len() >= 5 && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse::<u64>().ok())
            .flatten()
    };
    let rest = name.strip_prefix(stem)?;
    if SHARD_EXTS.contains(&rest) {
        return Some(OutputName::Single);
    }
    let rest = rest.strip_prefix('-')?;
    let (run, rest) = rest.split_at(rest.find(['-', '.']).unwrap_or(rest.len()));
    let run = number(run)?;
    if rest == ".manifest.json" {
        return Some(OutputName::Manifest { run });
    }
    let shard = rest.strip_prefix('-')?;
    let (k, ext) = shard.split_at(shard.find('.').unwrap_or(shard.len()));
    number(k)?;
    let ext = SHARD_EXTS.into_iter().find(|e| *e == ext)?;
    Some(OutputName::Shard {
        run,
        prefix: name[..name.len() - ext.len()].to_string(),
        ext,
    })
}

/// Every file in the directory of `out` that tokenize wrote (or would write) for the
/// prefix `out`, with what it is, sorted by name.
pub(super) fn prefix_outputs(out: &Path) -> Result<Vec<(PathBuf, OutputName)>> {
    let dir = out_dir(out);
    let Some(stem) = out.file_name().map(|n| n.to_string_lossy().into_owned()) else {
        return Ok(Vec::new());
    };
    let mut found = Vec::new();
    for e in std::fs::read_dir(&dir).map_err(io_err(&dir, "read_dir"))? {
        let e = e.map_err(io_err(&dir, "read_dir"))?;
        let name = e.file_name();
        let Some(name) = name.to_str() else {
            continue;
        };
        if let Some(kind) = output_name(&stem, name) {
            found.push((e.path(), kind));
        }
    }
    found.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(found)
}

/// Refuses outputs of the prefix `out` that are not of this job of `runs` runs: a
/// single-shard output, and the manifests and shards of runs `runs` and above (an
/// earlier job of more runs into the same `--out`); with `listed` (at a merge, every
/// shard the job's manifests list), also the shards of its own runs that none lists. A
/// config naming the directory would serve their documents beside the job's (stale or
/// duplicate), and nothing of this job would ever remove them. `then` says what to do
/// once they are removed.
pub(super) fn refuse_foreign_outputs(
    out: &Path,
    runs: u64,
    listed: Option<&std::collections::HashSet<&std::ffi::OsStr>>,
    then: &'static str,
) -> Result<()> {
    let foreign: Vec<(PathBuf, OutputName)> = prefix_outputs(out)?
        .into_iter()
        .filter(|(_, kind)| match kind {
            OutputName::Single => true,
            OutputName::Manifest { run } => *run >= runs,
            OutputName::Shard { run, prefix, .. } => {
                *run >= runs || listed.is_some_and(|l| !l.contains(std::ffi::OsStr::new(prefix)))
            }
        })
        .collect();
    if foreign.is_empty() {
        return Ok(());
    }
    Err(TokenizeError::ForeignOutputs {
        dir: out_dir(out),
        runs,
        files: describe_foreign(&foreign),
        then,
    })
}

/// The names of foreign outputs for [`TokenizeError::ForeignOutputs`], each manifest
/// with the job it says it is of, where it can be read.
pub(super) fn describe_foreign(foreign: &[(PathBuf, OutputName)]) -> Vec<String> {
    foreign
        .iter()
        .map(|(path, kind)| {
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            match kind {
                OutputName::Manifest { .. } => match super::read_manifest(path) {
                    Ok(m) => match m.run {
                        Some(r) => format!("{name} (run {r} of {})", m.runs),
                        None => format!("{name} (a merged manifest)"),
                    },
                    Err(_) => format!("{name} (unreadable)"),
                },
                OutputName::Single => format!("{name} (a single-shard output)"),
                OutputName::Shard { .. } => name.into_owned(),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_group_and_line_has_exactly_one_owner() {
        for count in [1u64, 2, 3, 7] {
            let runs: Vec<Share> = (0..count).map(|index| Share { count, index }).collect();
            for g in 0..200u32 {
                let key = format!("repo-{g}");
                let owners = runs.iter().filter(|r| r.owns_group(key.as_bytes())).count();
                assert_eq!(owners, 1, "group {key} of {count} runs");
                let owners = runs.iter().filter(|r| r.owns_line(3, g.into())).count();
                assert_eq!(owners, 1);
                let owners = runs.iter().filter(|r| r.owns_file(g as usize)).count();
                assert_eq!(owners, 1);
            }
        }
        // Pinned: the owner of a group must not change between releases, or runs of
        // one job built by two versions would write a group twice.
        let owner = |key: &[u8]| (0..4).find(|&index| Share { count: 4, index }.owns_group(key));
        let owners: Vec<Option<u64>> = ["a", "b", "c", "d", "e", "f"]
            .iter()
            .map(|r| owner(format!("\x02org/{r}").as_bytes()))
            .collect();
        assert_eq!(
            owners.iter().flatten().copied().collect::<Vec<_>>(),
            [3, 2, 1, 2, 2, 2]
        );
        let line_owner =
            |file, line| (0..4).find(|&index| Share { count: 4, index }.owns_line(file, line));
        let owners: Vec<u64> = (0..6).filter_map(|line| line_owner(1, line)).collect();
        assert_eq!(owners, [1, 2, 3, 3, 1, 2]);
    }

    /// Regression: shard names grow past five digits at shard 100000 (`{k:05}`), and
    /// a rerun's clean-up once matched five digits only, so those shards outlived it.
    #[test]
    fn run_outputs_past_shard_99999_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("web");
        let mut ours = Vec::new();
        for k in [0usize, 99_999, 100_000, 1_234_567] {
            let prefix = shard_prefix(&out, 3, k);
            for ext in ["bin", "idx", "groups.npy", "idx.tmp"] {
                let p = with_suffix(&prefix, ext);
                std::fs::write(&p, b"x").unwrap();
                ours.push(p);
            }
        }
        assert!(ours.iter().any(|p| p.ends_with("web-00003-100000.idx")));
        std::fs::write(run_manifest_path(&out, 3), b"{}").unwrap();
        // Not run 3's: another run, another prefix, a name that is not a shard number.
        let theirs = [
            with_suffix(&shard_prefix(&out, 4, 100_000), "idx"),
            dir.path().join("web2-00003-00000.idx"),
            dir.path().join("web-00003-1x000.idx"),
            dir.path().join("web-00003-0001.idx"),
        ];
        for p in &theirs {
            std::fs::write(p, b"x").unwrap();
        }
        remove_run_outputs(&out, 3).unwrap();
        let left: Vec<&PathBuf> = ours.iter().filter(|p| p.exists()).collect();
        assert!(left.is_empty(), "left behind: {left:?}");
        assert!(!run_manifest_path(&out, 3).exists());
        for p in &theirs {
            assert!(p.exists(), "removed {}", p.display());
        }
    }

    #[test]
    fn output_names_are_told_apart_from_other_prefixes() {
        let shard = |run, prefix: &str, ext| {
            Some(OutputName::Shard {
                run,
                prefix: prefix.into(),
                ext,
            })
        };
        assert_eq!(output_name("m", "m.idx"), Some(OutputName::Single));
        assert_eq!(
            output_name("m", "m.groups.npy.tmp"),
            Some(OutputName::Single)
        );
        assert_eq!(
            output_name("m", "m-00006.manifest.json"),
            Some(OutputName::Manifest { run: 6 })
        );
        assert_eq!(
            output_name("m", "m-00006-00001.bin"),
            shard(6, "m-00006-00001", ".bin")
        );
        assert_eq!(
            output_name("m", "m-123456-100000.idx.tmp"),
            shard(123_456, "m-123456-100000", ".idx.tmp")
        );
        for other in [
            "m.manifest.json",
            "m.lock",
            "m-00006.lock",
            "m-0006-00001.idx",
            "m-00006-0001.idx",
            "m-00006-00001-00000.idx",
            "m-x-00006-00001.idx",
            "mm-00006-00001.idx",
            "m-00006-00001.npy",
            "m-00006",
        ] {
            assert_eq!(output_name("m", other), None, "{other}");
        }
    }

    #[test]
    fn shard_names() {
        let out = Path::new("/d/web.v2");
        assert_eq!(shard_prefix(out, 3, 12), Path::new("/d/web.v2-00003-00012"));
        assert_eq!(
            run_manifest_path(out, 3),
            Path::new("/d/web.v2-00003.manifest.json")
        );
    }
}
