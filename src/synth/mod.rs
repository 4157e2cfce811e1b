//! `millrace synth`: deterministic synthetic corpora that look like real pretraining
//! data to a loader, for tests, demos and benchmarks.
//!
//! What matters to a loader is the shape of the data, not its meaning: heavy-tailed
//! document lengths (a lognormal body with a median of a few hundred tokens and a tail of
//! book-sized documents up to ~1M tokens), a code domain whose files come in repositories
//! of 1-500 files, and a book domain whose chapters come in books. Groups get a
//! `.groups.npy` sidecar, exactly as `docs/FORMATS.md` specifies.
//!
//! Everything is a pure function of the options: shard `s` of domain `d` draws its
//! lengths from a generator keyed by (seed, d, s), and document `i` of it draws its
//! tokens from one keyed by (seed, d, s, i). The thread count changes only the speed,
//! and any document can be regenerated on its own ([`document_tokens`]) to check a
//! reader or the daemon against it.
//!
//! [`synth_sparse`] writes the same shapes at 10^12-10^13 tokens for scale tests: the
//! `.idx` and `.groups.npy` files are real, the `.bin` files are sparse (sized, never
//! written, reading as zeros), and every length is multiplied by a scale so that such a
//! corpus holds ~10^8 documents in a few GB of disk.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rand::{Rng, RngCore, SeedableRng};
use rand_distr::{Distribution, LogNormal, Pareto};
use rand_pcg::Pcg64Mcg;
use serde::Serialize;

use crate::corpus::{megatron::with_suffix, CorpusError, DType, MegatronWriter, Result};
use crate::plan::permute::splitmix64;

mod config;

/// Token id that ends every synthetic document (as Megatron's `--append-eod` does).
pub const EOD: u32 = 2;
/// Padding id written into the generated config; never appears in the data.
pub const PAD: u32 = 0;
/// Smallest id of ordinary tokens: ids below are reserved for specials.
pub const FIRST_ID: u32 = 3;
/// Longest synthetic document, in tokens.
pub const MAX_DOC: u64 = 1 << 20;

/// What to write.
#[derive(Debug, Clone)]
pub struct SynthOptions {
    /// Output directory: one sub-directory per domain, plus `millrace.toml`.
    pub out: PathBuf,
    /// Total tokens over all domains (exact).
    pub tokens: u64,
    /// Number of domains: web, code, books, wiki, then web2, web3, ...
    pub domains: usize,
    /// Vocabulary size; ids are drawn from [3, vocab).
    pub vocab: u32,
    /// Token dtype (uint16 or int32, as Megatron's preprocessing would pick).
    pub dtype: DType,
    /// Seed of everything.
    pub seed: u64,
    /// Upper bound on tokens per shard.
    pub shard_tokens: u64,
    /// Writer threads.
    pub threads: usize,
    /// Print progress on stderr.
    pub progress: bool,
}

/// What [`synth_sparse`] changes: tokens are never written, and lengths are scaled.
#[derive(Debug, Clone, Copy)]
pub struct Sparse {
    /// Every drawn document length (and the length caps) is multiplied by this, so a
    /// 10^13-token corpus keeps ~10^8 documents and a `.idx` of a few GB.
    pub length_scale: u64,
}

/// The length model of a domain.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    /// Lognormal body (median, sigma) plus a Pareto tail of long documents.
    Prose { median: f64, sigma: f64, tail: f64 },
    /// Repositories of 1-500 files.
    Code,
    /// Books of 8-64 chapters.
    Books,
}

/// A domain of the synthetic corpus.
#[derive(Debug, Clone, PartialEq)]
struct DomainSpec {
    name: String,
    kind: Kind,
    share: f64,
}

fn domain_specs(k: usize) -> Vec<DomainSpec> {
    let base = [
        (
            "web",
            Kind::Prose {
                median: 300.0,
                sigma: 1.1,
                tail: 0.002,
            },
            0.5,
        ),
        ("code", Kind::Code, 0.2),
        ("books", Kind::Books, 0.2),
        (
            "wiki",
            Kind::Prose {
                median: 600.0,
                sigma: 0.9,
                tail: 0.001,
            },
            0.1,
        ),
    ];
    (0..k)
        .map(|i| match base.get(i) {
            Some(&(name, kind, share)) => DomainSpec {
                name: name.into(),
                kind,
                share,
            },
            None => DomainSpec {
                name: format!("web{}", i - base.len() + 2),
                kind: Kind::Prose {
                    median: 250.0 + 50.0 * i as f64,
                    sigma: 1.0,
                    tail: 0.002,
                },
                share: 0.1,
            },
        })
        .collect()
}

/// What was written, for the command's output and for tests.
#[derive(Debug, Clone, Serialize)]
pub struct SynthSummary {
    /// Per domain, in config order.
    pub domains: Vec<DomainSummary>,
    /// The generated config.
    pub config: PathBuf,
    /// Total tokens written.
    pub tokens: u64,
    /// Total documents written.
    pub documents: u64,
    /// Wall time.
    pub seconds: f64,
}

/// One domain of a [`SynthSummary`].
#[derive(Debug, Clone, Serialize)]
pub struct DomainSummary {
    /// Domain name.
    pub name: String,
    /// Shard prefixes, in order.
    pub shards: Vec<PathBuf>,
    /// Documents.
    pub documents: u64,
    /// Tokens.
    pub tokens: u64,
    /// Groups (0 for ungrouped domains).
    pub groups: u64,
}

/// One shard to write.
#[derive(Debug, Clone)]
struct Job {
    domain: usize,
    shard: usize,
    budget: u64,
    prefix: PathBuf,
}

/// How shards are written: token contents, or a sparse `.bin` with scaled lengths.
#[derive(Debug, Clone, Copy)]
enum Mode {
    Dense,
    Sparse(Sparse),
}

impl Mode {
    fn length_scale(self) -> u64 {
        match self {
            Mode::Dense => 1,
            Mode::Sparse(s) => s.length_scale,
        }
    }
}

/// Result of one shard.
#[derive(Debug, Clone)]
struct Written {
    domain: usize,
    shard: usize,
    prefix: PathBuf,
    documents: u64,
    tokens: u64,
    groups: u64,
}

/// A document's seed from its structured key (seed, domain, shard, document). Unlike
/// the plan's `derive_key`, both rounds are full SplitMix64 steps; written corpora are
/// pinned by this exact chain, so it must not be "unified" with the plan's.
fn key(parts: &[u64]) -> u64 {
    parts
        .iter()
        .fold(0x6D69_6C6C_7261_6365, |h, &p| splitmix64(h ^ splitmix64(p)))
}

/// Regenerates the tokens of one document (its EOD included) without reading any file:
/// the independent reference that tests compare readers and the daemon against.
pub fn document_tokens(
    seed: u64,
    domain: usize,
    shard: usize,
    doc: u64,
    len: u64,
    vocab: u32,
) -> Vec<u32> {
    let mut out = Vec::with_capacity(len as usize);
    let mut rng = Pcg64Mcg::seed_from_u64(key(&[seed, domain as u64, shard as u64, doc]));
    let range = u64::from(vocab - FIRST_ID);
    for _ in 1..len {
        let r = rng.next_u32();
        out.push(FIRST_ID + ((u64::from(r) * range) >> 32) as u32);
    }
    if len > 0 {
        out.push(EOD);
    }
    out
}

/// Fills `buf` with document tokens in the shard dtype; the same values as
/// [`document_tokens`], written straight into the output buffer.
fn fill_document(buf: &mut Vec<u8>, dtype: DType, rng: &mut Pcg64Mcg, len: u64, vocab: u32) {
    let range = u64::from(vocab - FIRST_ID);
    let size = if dtype == DType::Uint16 { 2 } else { 4 };
    buf.clear();
    buf.resize(len as usize * size, 0);
    let (body, last) = buf.split_at_mut(len.saturating_sub(1) as usize * size);
    let mut next = || FIRST_ID + ((u64::from(rng.next_u32()) * range) >> 32) as u32;
    if size == 2 {
        for c in body.chunks_exact_mut(2) {
            c.copy_from_slice(&(next() as u16).to_le_bytes());
        }
        if !last.is_empty() {
            last.copy_from_slice(&(EOD as u16).to_le_bytes());
        }
    } else {
        for c in body.chunks_exact_mut(4) {
            c.copy_from_slice(&(next() as i32).to_le_bytes());
        }
        if !last.is_empty() {
            last.copy_from_slice(&(EOD as i32).to_le_bytes());
        }
    }
}

/// Distribution parameters here are constants, so a failure is a bug: reported, not panicked.
fn param<T, E: std::fmt::Display>(r: std::result::Result<T, E>) -> Result<T> {
    r.map_err(|e| CorpusError::invalid("synth", format!("bad length distribution: {e}")))
}

/// Draws document lengths for one shard, calling `emit(len, group)` until `budget`
/// tokens are used; the last document is cut to land exactly on the budget. Each length
/// (and the [`MAX_DOC`] cap) is multiplied by `scale`; 1 gives the pinned corpora.
fn generate_lengths(
    kind: Kind,
    rng: &mut Pcg64Mcg,
    budget: u64,
    scale: u64,
    mut emit: impl FnMut(u64, u64) -> Result<()>,
) -> Result<u64> {
    let mut used = 0u64;
    let mut group = 0u64;
    let cap = MAX_DOC.saturating_mul(scale).min(i32::MAX as u64);
    let mut take = |len: u64, group: u64, used: &mut u64| -> Result<bool> {
        let len = len.saturating_mul(scale).clamp(2, cap).min(budget - *used);
        emit(len, group)?;
        *used += len;
        Ok(*used < budget)
    };
    let tail = param(Pareto::new(16384.0, 1.1))?;
    match kind {
        Kind::Prose {
            median,
            sigma,
            tail: p,
        } => {
            let body = param(LogNormal::new(median.ln(), sigma))?;
            loop {
                let len = if rng.gen_bool(p) {
                    tail.sample(rng)
                } else {
                    body.sample(rng)
                };
                if !take(len as u64, 0, &mut used)? {
                    break;
                }
            }
        }
        Kind::Code => {
            let files = param(Pareto::new(1.0, 0.8))?;
            let file = param(LogNormal::new(350f64.ln(), 1.2))?;
            'repos: loop {
                let n = (files.sample(rng) as u64).clamp(1, 500);
                for _ in 0..n {
                    let len = (file.sample(rng) as u64).min(65536);
                    if !take(len, group, &mut used)? {
                        break 'repos;
                    }
                }
                group += 1;
            }
        }
        Kind::Books => {
            let chapter = param(LogNormal::new(5000f64.ln(), 0.6))?;
            'books: loop {
                let n = rng.gen_range(8..=64u64);
                let mut book = 0u64;
                for _ in 0..n {
                    let len = (chapter.sample(rng) as u64)
                        .min(MAX_DOC.saturating_sub(book))
                        .max(2);
                    book += len;
                    if !take(len, group, &mut used)? {
                        break 'books;
                    }
                    if book >= MAX_DOC {
                        break;
                    }
                }
                group += 1;
            }
        }
    }
    Ok(used)
}

fn write_shard(
    opts: &SynthOptions,
    mode: Mode,
    spec: &DomainSpec,
    job: &Job,
    progress: &AtomicU64,
) -> Result<Written> {
    let mut lengths_rng = Pcg64Mcg::seed_from_u64(key(&[
        opts.seed,
        job.domain as u64,
        job.shard as u64,
        u64::MAX,
    ]));
    let mut writer = MegatronWriter::create(&job.prefix, opts.dtype)?;
    let grouped = matches!(spec.kind, Kind::Code | Kind::Books);
    let mut group_ids: Vec<u64> = Vec::new();
    let mut buf = Vec::new();
    let mut doc = 0u64;
    let mut pending = 0u64;
    let scale = mode.length_scale();
    let tokens = generate_lengths(
        spec.kind,
        &mut lengths_rng,
        job.budget,
        scale,
        |len, group| {
            if let Mode::Sparse(_) = mode {
                writer.add_sparse_document(len)?;
            } else {
                let mut rng = Pcg64Mcg::seed_from_u64(key(&[
                    opts.seed,
                    job.domain as u64,
                    job.shard as u64,
                    doc,
                ]));
                fill_document(&mut buf, opts.dtype, &mut rng, len, opts.vocab);
                writer.add_document_bytes(&buf)?;
            }
            if grouped {
                group_ids.push(((job.shard as u64) << 32) | group);
            }
            doc += 1;
            pending += len;
            if pending >= 1 << 20 {
                progress.fetch_add(pending, Ordering::Relaxed);
                pending = 0;
            }
            Ok(())
        },
    )?;
    progress.fetch_add(pending, Ordering::Relaxed);
    let sidecar = with_suffix(&job.prefix, "groups.npy");
    let groups = if grouped {
        crate::corpus::groups::write(&sidecar, &group_ids)?;
        group_ids.last().map_or(0, |&g| (g & 0xFFFF_FFFF) + 1)
    } else {
        match std::fs::remove_file(&sidecar) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(CorpusError::io(&sidecar, "remove", e))
            }
            _ => 0,
        }
    };
    let documents = writer.documents();
    writer.finish()?;
    Ok(Written {
        domain: job.domain,
        shard: job.shard,
        prefix: job.prefix.clone(),
        documents,
        tokens,
        groups,
    })
}

/// The tokens each domain of `specs` gets of `tokens`: its share, rounded down, and the
/// rest to the last.
fn domain_budgets(specs: &[DomainSpec], tokens: u64) -> Vec<u64> {
    let share_sum: f64 = specs.iter().map(|s| s.share).sum();
    let mut assigned = 0u64;
    (specs.iter().enumerate())
        .map(|(d, spec)| {
            let budget = if d + 1 == specs.len() {
                tokens - assigned
            } else {
                ((tokens as f64 * spec.share / share_sum) as u64).min(tokens - assigned)
            };
            assigned += budget;
            budget
        })
        .collect()
}

/// Writes the corpus and its `millrace.toml`.
pub fn synth(opts: &SynthOptions) -> Result<SynthSummary> {
    write(opts, Mode::Dense)
}

/// Writes a scale-test corpus: real `.idx` and `.groups.npy` files over sparse `.bin`
/// files whose tokens read as zeros (see the module docs), and its `millrace.toml`.
pub fn synth_sparse(opts: &SynthOptions, sparse: Sparse) -> Result<SynthSummary> {
    if sparse.length_scale == 0 {
        return Err(CorpusError::invalid(
            &opts.out,
            "--length-scale 0 would make every document empty",
        ));
    }
    write(opts, Mode::Sparse(sparse))
}

fn write(opts: &SynthOptions, mode: Mode) -> Result<SynthSummary> {
    let started = Instant::now();
    if opts.domains == 0 || opts.tokens == 0 || opts.shard_tokens == 0 {
        return Err(CorpusError::invalid(
            &opts.out,
            "synth needs at least one domain, one token and one token per shard",
        ));
    }
    if opts.domains > crate::config::MAX_DOMAINS {
        return Err(CorpusError::invalid(
            &opts.out,
            format!(
                "{} domains; a config holds at most {}",
                opts.domains,
                crate::config::MAX_DOMAINS
            ),
        ));
    }
    if opts.vocab <= FIRST_ID + 1 {
        return Err(CorpusError::invalid(
            &opts.out,
            format!(
                "vocab {} leaves no ordinary token ids (ids 0-2 are special)",
                opts.vocab
            ),
        ));
    }
    match opts.dtype {
        DType::Uint16 if opts.vocab > 65536 => {
            return Err(CorpusError::invalid(
                &opts.out,
                format!(
                    "vocab {} does not fit uint16; use --dtype int32",
                    opts.vocab
                ),
            ))
        }
        DType::Uint16 | DType::Int32 => {}
        other => {
            return Err(CorpusError::invalid(
                &opts.out,
                format!("synth writes uint16 or int32 shards, not {other}"),
            ))
        }
    }
    let specs = domain_specs(opts.domains);
    let budgets = domain_budgets(&specs, opts.tokens);
    if let Some(d) = budgets.iter().position(|&b| b == 0) {
        // Every domain but the last gets its share rounded down, monotone in the total;
        // the last gets the rest, at least its share: the first total that gives every
        // one a token gives every larger total one too.
        let least = (opts.tokens..)
            .find(|&t| !domain_budgets(&specs, t).contains(&0))
            .unwrap_or(u64::MAX);
        return Err(CorpusError::invalid(
            &opts.out,
            format!(
                "--tokens {} leaves domain {} no token (its share of the {} domains' tokens \
                 rounds to 0), and the config would list a domain with no shard: at least \
                 {least} tokens give every domain a document",
                opts.tokens, specs[d].name, opts.domains
            ),
        ));
    }
    let mut jobs = Vec::new();
    for ((d, spec), &budget) in specs.iter().enumerate().zip(&budgets) {
        let dir = opts.out.join(&spec.name);
        std::fs::create_dir_all(&dir).map_err(|e| CorpusError::io(&dir, "create_dir", e))?;
        let n = budget.div_ceil(opts.shard_tokens).max(1);
        remove_stale_shards(&dir, &spec.name, n)?;
        for s in 0..n {
            let b = budget / n + u64::from(s < budget % n);
            if b == 0 {
                continue;
            }
            jobs.push(Job {
                domain: d,
                shard: s as usize,
                budget: b,
                prefix: dir.join(format!("{}-{:05}", spec.name, s)),
            });
        }
    }
    let next = AtomicUsize::new(0);
    let done = AtomicU64::new(0);
    let results: Mutex<Vec<Result<Written>>> = Mutex::new(Vec::new());
    let finished = AtomicUsize::new(0);
    let threads = opts.threads.max(1).min(jobs.len().max(1));
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(job) = jobs.get(i) else {
                    finished.fetch_add(1, Ordering::Relaxed);
                    break;
                };
                let r = write_shard(opts, mode, &specs[job.domain], job, &done);
                let failed = r.is_err();
                if let Ok(mut v) = results.lock() {
                    v.push(r);
                }
                if failed {
                    next.store(jobs.len(), Ordering::Relaxed);
                }
            });
        }
        if opts.progress {
            report_progress(&done, opts.tokens, started, || {
                finished.load(Ordering::Relaxed) >= threads
            });
        }
    });
    let mut written = Vec::new();
    for r in results.into_inner().unwrap_or_default() {
        written.push(r?);
    }
    written.sort_by_key(|w| (w.domain, w.shard));
    let domains: Vec<DomainSummary> = specs
        .iter()
        .enumerate()
        .map(|(d, spec)| {
            let mine: Vec<&Written> = written.iter().filter(|w| w.domain == d).collect();
            DomainSummary {
                name: spec.name.clone(),
                shards: mine.iter().map(|w| w.prefix.clone()).collect(),
                documents: mine.iter().map(|w| w.documents).sum(),
                tokens: mine.iter().map(|w| w.tokens).sum(),
                groups: mine.iter().map(|w| w.groups).sum(),
            }
        })
        .collect();
    let config = opts.out.join("millrace.toml");
    let text = config::config_text(opts, mode, &specs);
    std::fs::write(&config, text).map_err(|e| CorpusError::io(&config, "write", e))?;
    Ok(SynthSummary {
        tokens: domains.iter().map(|d| d.tokens).sum(),
        documents: domains.iter().map(|d| d.documents).sum(),
        domains,
        config,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Removes shards of an earlier, larger run in `dir` (`<domain>-NNNNN` with N >= `keep`),
/// which the generated config's directory entry would otherwise pick up.
fn remove_stale_shards(dir: &Path, domain: &str, keep: u64) -> Result<()> {
    let entries = std::fs::read_dir(dir).map_err(|e| CorpusError::io(dir, "read_dir", e))?;
    for entry in entries {
        let entry = entry.map_err(|e| CorpusError::io(dir, "read_dir", e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(&format!("{domain}-")) else {
            continue;
        };
        let (num, ext) = rest.split_at(rest.find('.').unwrap_or(rest.len()));
        let ours = matches!(ext, ".bin" | ".idx" | ".groups.npy")
            && num.len() == 5
            && num.bytes().all(|b| b.is_ascii_digit());
        if ours && num.parse::<u64>().is_ok_and(|i| i >= keep) {
            let path = entry.path();
            std::fs::remove_file(&path).map_err(|e| CorpusError::io(&path, "remove", e))?;
        }
    }
    Ok(())
}

/// Prints tokens written and the write rate until `finished()` says the workers are done.
fn report_progress(done: &AtomicU64, total: u64, started: Instant, finished: impl Fn() -> bool) {
    let tty = std::io::stderr().is_terminal();
    let every = if tty {
        Duration::from_millis(250)
    } else {
        Duration::from_secs(10)
    };
    let mut last = Instant::now();
    while !finished() {
        std::thread::sleep(Duration::from_millis(50));
        if last.elapsed() < every {
            continue;
        }
        last = Instant::now();
        let n = done.load(Ordering::Relaxed);
        let secs = started.elapsed().as_secs_f64().max(1e-9);
        let line = format!(
            "synth: {:.2}G of {:.2}G tokens ({:.0}%), {:.0}M tokens/s",
            n as f64 / 1e9,
            total as f64 / 1e9,
            100.0 * n as f64 / total as f64,
            n as f64 / secs / 1e6
        );
        if tty {
            eprint!("\r{line}   ");
        } else {
            eprintln!("{line}");
        }
    }
    if tty {
        eprintln!();
    }
}

/// The path of `domain`'s shard `shard` under `out`, as [`synth`] names it.
pub fn shard_prefix(out: &Path, domain: &str, shard: usize) -> PathBuf {
    out.join(domain).join(format!("{domain}-{shard:05}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A length-scaled corpus's config divides the planner's default window by the
    /// scale, so its windows hold the tokens an unscaled corpus's do.
    #[test]
    fn a_length_scaled_config_scales_the_window_down() {
        let dir = tempfile::tempdir().unwrap();
        let opts = |out: &Path| SynthOptions {
            out: out.to_path_buf(),
            tokens: 400_000,
            domains: 2,
            vocab: 50304,
            dtype: DType::Uint16,
            seed: 0,
            shard_tokens: 200_000,
            threads: 1,
            progress: false,
        };
        let window = |out: &Path| {
            let cfg = crate::config::Config::load(&out.join("millrace.toml")).unwrap();
            cfg.plan_config().unwrap().best_fit_window
        };
        let dense = dir.path().join("dense");
        synth(&opts(&dense)).unwrap();
        assert_eq!(
            window(&dense),
            config::PLANNER_WINDOW,
            "the planner's default"
        );
        for (scale, want) in [(1, config::PLANNER_WINDOW), (100, 655), (1 << 20, 1)] {
            let out = dir.path().join(format!("s{scale}"));
            synth_sparse(
                &opts(&out),
                Sparse {
                    length_scale: scale,
                },
            )
            .unwrap();
            assert_eq!(window(&out), want, "--length-scale {scale}");
        }
    }

    /// Document seeds are pinned (every synth corpus depends on them): the value the
    /// chain gave before it shared the plan's [`splitmix64`].
    #[test]
    fn document_key_is_pinned() {
        assert_eq!(key(&[1, 2, 3, 4]), 0x5e8b_d0d4_de36_3548);
    }

    #[test]
    fn fill_matches_reference() {
        for dtype in [DType::Uint16, DType::Int32] {
            let mut rng = Pcg64Mcg::seed_from_u64(key(&[7, 1, 2, 3]));
            let mut buf = Vec::new();
            fill_document(&mut buf, dtype, &mut rng, 100, 50000);
            let want = document_tokens(7, 1, 2, 3, 100, 50000);
            let got: Vec<u32> = match dtype {
                DType::Uint16 => buf
                    .chunks(2)
                    .map(|c| u32::from(u16::from_le_bytes([c[0], c[1]])))
                    .collect(),
                _ => buf
                    .chunks(4)
                    .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as u32)
                    .collect(),
            };
            assert_eq!(got, want);
            assert_eq!(*got.last().unwrap(), EOD);
            assert!(got[..99].iter().all(|&t| (FIRST_ID..50000).contains(&t)));
        }
    }
}
