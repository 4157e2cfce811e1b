//! tokenize, Manifests: what each run of a sharded job wrote, and `tokenize --merge`,
//! which checks that every run finished with the same settings and lists all shards.
//!
//! A run's manifest (`<out>-<run>.manifest.json`) is the last file it writes, so its
//! presence means the run finished; the merged one (`<out>.manifest.json`) lists every
//! shard of the job for a config. The format is in docs/FORMATS.md.

use super::*;

/// The `format` value of a manifest; bumped if its meaning changes.
pub const MANIFEST_FORMAT: &str = "millrace-tokenize-manifest/1";

/// What a run (or, merged, a whole job) wrote, with the settings that must agree across
/// the runs of one job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// [`MANIFEST_FORMAT`].
    pub format: String,
    /// This run's index; `None` in the merged manifest.
    pub run: Option<u64>,
    /// Runs in the job (`--num-shards`).
    pub runs: u64,
    /// The tokenizer file, as given (runs on other machines may name it otherwise).
    pub tokenizer: PathBuf,
    /// xxh3-64 of the tokenizer file's bytes, hex: what runs of one job must agree on.
    pub tokenizer_xxh3: String,
    /// The text field.
    pub text_field: String,
    /// The group field, if any.
    pub group_field: Option<String>,
    /// The order field, if any.
    pub order_field: Option<String>,
    /// Output dtype.
    pub dtype: DType,
    /// The id appended to every document, if any.
    pub eos: Option<u32>,
    /// `--shard-tokens`, if given.
    pub shard_tokens: Option<u64>,
    /// `--max-line-bytes`: it decides which lines become documents, so runs of one job
    /// must agree on it. `None` in manifests written before it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_line_bytes: Option<u64>,
    /// Input files of the whole job (every run is given the same list).
    pub inputs: u64,
    /// xxh3-64 of the ordered input list, hex ([`inputs_digest`]): file `j` belongs to
    /// run `j mod N`, so runs given the same number of files in another order (a glob
    /// expanded otherwise on another node) would tokenize one file twice and another
    /// never. `None` in manifests written before it was recorded, which `--merge` refuses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inputs_xxh3: Option<String>,
    /// Documents over all shards listed.
    pub documents: u64,
    /// Tokens over all shards listed.
    pub tokens: u64,
    /// The shards, in order; prefixes relative to the manifest's directory.
    pub shards: Vec<OutputShard>,
}

impl Manifest {
    /// The settings that must agree between the runs of one job, by name.
    fn settings(&self) -> [(&'static str, String); 11] {
        [
            ("runs", self.runs.to_string()),
            ("inputs", self.inputs.to_string()),
            (
                "inputs_xxh3",
                self.inputs_xxh3
                    .clone()
                    .unwrap_or_else(|| "unrecorded".into()),
            ),
            ("tokenizer_xxh3", self.tokenizer_xxh3.clone()),
            ("text_field", self.text_field.clone()),
            ("group_field", format!("{:?}", self.group_field)),
            ("order_field", format!("{:?}", self.order_field)),
            ("dtype", self.dtype.to_string()),
            ("eos", format!("{:?}", self.eos)),
            ("shard_tokens", format!("{:?}", self.shard_tokens)),
            (
                "max_line_bytes",
                self.max_line_bytes
                    .map_or("unrecorded".into(), |b| b.to_string()),
            ),
        ]
    }
}

/// xxh3-64 of the ordered input list: for each input in order, its path as given (the
/// length of its bytes as a u64 LE, then the bytes) and its size in bytes (u64 LE). What
/// the runs of one job must agree on besides the count (see [`Manifest::inputs_xxh3`]).
pub(super) fn inputs_digest(inputs: &[PathBuf]) -> Result<u64> {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    for p in inputs {
        let size = std::fs::metadata(p).map_err(io_err(p, "stat"))?.len();
        let name = p.as_os_str().as_encoded_bytes();
        h.update(&(name.len() as u64).to_le_bytes());
        h.update(name);
        h.update(&size.to_le_bytes());
    }
    Ok(h.digest())
}

/// The manifest of a finished run: its settings and its shards, named relative to it;
/// `inputs_xxh3` is [`inputs_digest`] of the whole job's input list.
pub(super) fn run_manifest(
    opts: &TokenizeOptions,
    setup: &Setup,
    inputs_xxh3: u64,
    shards: &[OutputShard],
) -> Manifest {
    Manifest {
        format: MANIFEST_FORMAT.into(),
        run: Some(opts.shard_index),
        runs: opts.num_shards,
        tokenizer: opts.tokenizer.clone(),
        tokenizer_xxh3: format!("{:016x}", setup.tokenizer_hash),
        text_field: opts.text_field.clone(),
        group_field: opts.group_field.clone(),
        order_field: opts.order_field.clone(),
        dtype: setup.dtype,
        eos: setup.eos,
        shard_tokens: opts.shard_tokens,
        max_line_bytes: Some(opts.max_line_bytes),
        inputs: opts.inputs.len() as u64,
        inputs_xxh3: Some(format!("{inputs_xxh3:016x}")),
        documents: shards.iter().map(|s| s.documents).sum(),
        tokens: shards.iter().map(|s| s.tokens).sum(),
        shards: shards
            .iter()
            .map(|s| OutputShard {
                prefix: s.prefix.file_name().map(PathBuf::from).unwrap_or_default(),
                ..s.clone()
            })
            .collect(),
    }
}

/// Writes `m` to `path` through a temporary name, so a reader sees all of it or none;
/// fsynced before the rename and the directory after it, so that a run whose manifest
/// survives a power loss has a whole one.
pub(super) fn write_manifest(path: &Path, m: &Manifest) -> Result<()> {
    let tmp = with_suffix(path, "tmp");
    let text = serde_json::to_string_pretty(m)
        .map_err(|e| TokenizeError::Options(format!("cannot encode {}: {e}", path.display())))?;
    crate::corpus::writer::write_durably(path, &tmp, (text + "\n").as_bytes())?;
    Ok(())
}

/// Reads a manifest, naming the file in every error.
pub fn read_manifest(path: &Path) -> Result<Manifest> {
    let text = std::fs::read(path).map_err(io_err(path, "read"))?;
    let m: Manifest = serde_json::from_slice(&text).map_err(|e| TokenizeError::Input {
        path: path.to_path_buf(),
        what: format!("not a tokenize manifest: {e}"),
    })?;
    if m.format != MANIFEST_FORMAT {
        return Err(TokenizeError::Input {
            path: path.to_path_buf(),
            what: format!(
                "format {:?}; this millrace reads {MANIFEST_FORMAT:?}",
                m.format
            ),
        });
    }
    Ok(m)
}

/// Checks the manifests of runs 0..`runs` of the job at `out` (all present, same
/// settings, every shard's `.idx` in place) and writes `<out>.manifest.json` listing
/// every shard, run by run. Returns the merged manifest.
pub fn merge(out: &Path, runs: u64) -> Result<Manifest> {
    if runs == 0 {
        return Err(TokenizeError::Options(
            "--num-shards must be at least 1".into(),
        ));
    }
    out_stem(out)?;
    let dir = out_dir(out);
    let mut merged: Option<(PathBuf, Manifest)> = None;
    for run in 0..runs {
        let path = run_manifest_path(out, run);
        if !path.exists() {
            return Err(TokenizeError::Input {
                path,
                what: format!("missing: run {run} of {runs} has not finished (or never ran)"),
            });
        }
        let m = read_manifest(&path)?;
        if m.run != Some(run) || m.runs != runs {
            return Err(TokenizeError::Input {
                path,
                what: match m.run {
                    Some(r) => format!(
                        "written by run {r} of {}, expected run {run} of {runs} (merge with \
                         the --num-shards of the job that wrote it)",
                        m.runs
                    ),
                    None => {
                        format!("written by a single-run tokenize, expected run {run} of {runs}")
                    }
                },
            });
        }
        if m.inputs_xxh3.is_none() {
            return Err(TokenizeError::Input {
                path,
                what: format!(
                    "run {run} records no digest of its input list (inputs_xxh3: written by \
                     a millrace before it was recorded), so --merge cannot check that every \
                     run was given the same files in the same order (file j belongs to run j \
                     mod N; a list in another order tokenizes a file twice and another \
                     never); refused: rerun the job's runs with this millrace, each given the \
                     same input list, then merge again"
                ),
            });
        }
        check_listed_shards(&path, &dir, &m)?;
        match &mut merged {
            None => merged = Some((path, m)),
            Some((first, all)) => {
                for ((name, a), (_, b)) in all.settings().iter().zip(m.settings()) {
                    if *a != b {
                        let hint = match *name {
                            "inputs" | "inputs_xxh3" => {
                                "; they were given other input lists (paths as given, their \
                                 order or their sizes differ: a glob expanded otherwise, or \
                                 files changed between runs?), and file j belongs to run j mod \
                                 N, so a file would be tokenized twice and another never: rerun \
                                 the runs with one list"
                            }
                            _ => "",
                        };
                        return Err(TokenizeError::Input {
                            path,
                            what: format!(
                                "run {run}'s {name} is {b}, but run 0's ({}) is {a}: runs of \
                                 one job must share their settings{hint}",
                                first.display()
                            ),
                        });
                    }
                }
                let overflow = |what: &str, a: u64, b: u64| TokenizeError::Input {
                    path: path.clone(),
                    what: format!(
                        "its {b} {what} added to the {a} of the runs before it overflow a \
                         64-bit count"
                    ),
                };
                all.documents = all
                    .documents
                    .checked_add(m.documents)
                    .ok_or_else(|| overflow("documents", all.documents, m.documents))?;
                all.tokens = all
                    .tokens
                    .checked_add(m.tokens)
                    .ok_or_else(|| overflow("tokens", all.tokens, m.tokens))?;
                all.shards.extend(m.shards);
            }
        }
    }
    let Some((_, mut all)) = merged else {
        return Err(TokenizeError::Options("no runs to merge".into()));
    };
    if all.shards.is_empty() {
        return Err(TokenizeError::Options(format!(
            "none of the {runs} runs of {} wrote a shard: no documents",
            out.display()
        )));
    }
    // Every file of the prefix that is not the job's, including shards of its own runs
    // that no manifest lists.
    let listed: std::collections::HashSet<&std::ffi::OsStr> =
        all.shards.iter().map(|s| s.prefix.as_os_str()).collect();
    refuse_foreign_outputs(out, runs, Some(&listed), "merge again")?;
    all.run = None;
    write_manifest(&with_suffix(out, "manifest.json"), &all)?;
    Ok(all)
}

/// Checks the shards a run's manifest (at `path`) lists: each one's `.idx` is in place,
/// each opens holding the documents and tokens the manifest gives it, and the manifest's
/// totals are their sums. A manifest edited or written by another tool is refused here,
/// naming it, rather than merged into counts that describe no corpus.
fn check_listed_shards(path: &Path, dir: &Path, m: &Manifest) -> Result<()> {
    let bad = |what: String| TokenizeError::Input {
        path: path.to_path_buf(),
        what,
    };
    let (mut documents, mut tokens) = (0u64, 0u64);
    for s in &m.shards {
        let prefix = dir.join(&s.prefix);
        let idx = with_suffix(&prefix, "idx");
        if !idx.exists() {
            return Err(bad(format!(
                "lists shard {} but {} is missing",
                s.prefix.display(),
                idx.display()
            )));
        }
        // The O(1) open (header and array ends), not the sidecar or a full validation.
        let shard = crate::corpus::MegatronShard::open(&prefix)?;
        if (shard.documents(), shard.tokens()) != (s.documents, s.tokens) {
            return Err(bad(format!(
                "lists shard {} with {} documents and {} tokens, but it holds {} and {}",
                s.prefix.display(),
                s.documents,
                s.tokens,
                shard.documents(),
                shard.tokens()
            )));
        }
        let sums = documents
            .checked_add(s.documents)
            .zip(tokens.checked_add(s.tokens));
        (documents, tokens) = sums.ok_or_else(|| {
            bad(format!(
                "the documents or tokens of its shards, up to {}, overflow a 64-bit count",
                s.prefix.display()
            ))
        })?;
    }
    if (documents, tokens) != (m.documents, m.tokens) {
        return Err(bad(format!(
            "says {} documents and {} tokens, but its {} shards hold {documents} and {tokens}",
            m.documents,
            m.tokens,
            m.shards.len()
        )));
    }
    Ok(())
}

/// What `tokenize --merge` prints: totals, and a `[[corpus.domain]]` entry listing every
/// shard of the job at `out` (named as `out` was given), ready for a config.
pub fn render_merge(m: &Manifest, out: &Path) -> String {
    use crate::util::thousands;
    let dir = out.parent().unwrap_or(Path::new(""));
    let name = out.file_name().unwrap_or_default().to_string_lossy();
    let shards: Vec<String> = m
        .shards
        .iter()
        .map(|s| format!("{:?}", dir.join(&s.prefix).display().to_string()))
        .collect();
    format!(
        "# {} runs, {} shards, {} documents, {} tokens; listed in {}\n\
         [[corpus.domain]]\nname = \"{name}\"\nshards = [{}]\n",
        m.runs,
        m.shards.len(),
        thousands(m.documents),
        thousands(m.tokens),
        with_suffix(out, "manifest.json").display(),
        shards.join(", ")
    )
}
