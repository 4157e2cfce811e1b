//! `millrace synth`: determinism, exact totals, realistic shapes, and content that an
//! independent generator ([`synth::document_tokens`]) reproduces.

use std::collections::BTreeMap;
use std::path::Path;

use millrace::config::Config;
use millrace::corpus::{DType, Shard};
use millrace::synth::{self, SynthOptions};

fn opts(out: &Path, tokens: u64, threads: usize) -> SynthOptions {
    SynthOptions {
        out: out.to_path_buf(),
        tokens,
        domains: 4,
        vocab: 50304,
        dtype: DType::Uint16,
        seed: 11,
        shard_tokens: 400_000,
        threads,
        progress: false,
    }
}

/// Every file under `dir` with its bytes, for byte-level comparison of two runs.
fn tree(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let rel = p.strip_prefix(dir).unwrap().display().to_string();
                out.insert(rel, std::fs::read(&p).unwrap());
            }
        }
    }
    out
}

#[test]
fn same_seed_same_bytes_whatever_the_thread_count() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    synth::synth(&opts(a.path(), 1_500_000, 1)).unwrap();
    synth::synth(&opts(b.path(), 1_500_000, 3)).unwrap();
    let (ta, tb) = (tree(a.path()), tree(b.path()));
    assert!(ta.len() > 8, "expected several shards, got {:?}", ta.keys());
    assert_eq!(ta, tb);

    let c = tempfile::tempdir().unwrap();
    let mut other = opts(c.path(), 1_500_000, 2);
    other.seed = 12;
    synth::synth(&other).unwrap();
    let tc = tree(c.path());
    assert_ne!(ta.get("web/web-00000.bin"), tc.get("web/web-00000.bin"));
}

#[test]
fn totals_are_exact_and_content_matches_the_reference_generator() {
    let dir = tempfile::tempdir().unwrap();
    let summary = synth::synth(&opts(dir.path(), 2_000_000, 2)).unwrap();
    assert_eq!(summary.tokens, 2_000_000);
    let cfg = Config::load(&summary.config).unwrap();
    // The config says which ids the trainer accepts, so the daemon checks every token.
    assert_eq!(cfg.plan_config().unwrap().vocab_size, Some(50304));
    let corpus = cfg.open_corpus().unwrap();
    let names: Vec<&str> = corpus.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["web", "code", "books", "wiki"]);
    let mut total = 0;
    for (d, (name, shards)) in corpus.iter().enumerate() {
        let sum: u64 = shards.iter().map(Shard::tokens).sum();
        assert_eq!(sum, summary.domains[d].tokens, "domain {name}");
        total += sum;
        for (s, shard) in shards.iter().enumerate() {
            shard.validate().unwrap();
            assert_eq!(shard.path(), synth::shard_prefix(dir.path(), name, s));
            // Every 7th document, regenerated independently.
            for doc in (0..shard.documents()).step_by(7) {
                let len = shard.doc_len(doc).unwrap();
                let want = synth::document_tokens(11, d, s, doc, len, 50304);
                let got = shard.doc_tokens(doc).unwrap();
                let got: Vec<u32> = (0..got.len())
                    .map(|i| got.get_i64(i).unwrap() as u32)
                    .collect();
                assert_eq!(got, want, "{name} shard {s} doc {doc}");
                assert_eq!(*got.last().unwrap(), synth::EOD);
            }
        }
    }
    assert_eq!(total, 2_000_000);
}

#[test]
fn shapes_look_like_pretraining_data() {
    let dir = tempfile::tempdir().unwrap();
    let mut o = opts(dir.path(), 20_000_000, 2);
    o.shard_tokens = 10_000_000;
    synth::synth(&o).unwrap();
    let cfg = Config::load(&dir.path().join("millrace.toml")).unwrap();
    let corpus = cfg.open_corpus().unwrap();
    let lens = |shards: &[Shard]| -> Vec<u64> {
        let mut v: Vec<u64> = shards
            .iter()
            .flat_map(|s| (0..s.documents()).map(move |d| s.doc_len(d).unwrap()))
            .collect();
        v.sort_unstable();
        v
    };
    // web: lognormal body with a median of a few hundred tokens and a long tail.
    let web = lens(&corpus[0].1);
    let median = web[web.len() / 2];
    assert!((150..=600).contains(&median), "web median {median}");
    assert!(
        *web.last().unwrap() >= 65_536,
        "web has no long tail: max {}",
        web.last().unwrap()
    );
    assert!(*web.last().unwrap() <= synth::MAX_DOC);

    // code: every document has a group, repos hold 1..=500 files, groups are contiguous
    // (the reader rejects anything else).
    for shard in &corpus[1].1 {
        let groups = shard.groups().expect("code shards have a sidecar");
        assert!(groups.len() > 10);
        assert!(groups.runs().iter().all(|r| (1..=500).contains(&r.docs)));
        assert_eq!(
            groups.runs().iter().map(|r| r.docs).sum::<u64>(),
            shard.documents()
        );
        assert!(groups.runs().iter().any(|r| r.docs > 1));
    }
    // books: chapters grouped into books of at most ~1M tokens.
    for shard in &corpus[2].1 {
        let groups = shard.groups().expect("book shards have a sidecar");
        for r in groups.runs() {
            let tokens: u64 = (r.first_doc..r.first_doc + r.docs)
                .map(|d| shard.doc_len(d).unwrap())
                .sum();
            assert!(
                tokens <= synth::MAX_DOC + 2,
                "book {} has {tokens} tokens",
                r.id
            );
            assert!(r.docs <= 64);
        }
    }
    // wiki: no groups.
    assert!(corpus[3].1.iter().all(|s| s.groups().is_none()));
}

#[test]
fn int32_for_large_vocabularies_and_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let mut o = opts(dir.path(), 200_000, 2);
    o.vocab = 152_064;
    o.dtype = millrace::util::default_dtype(o.vocab);
    assert_eq!(o.dtype, DType::Int32);
    o.domains = 6;
    let s = synth::synth(&o).unwrap();
    assert_eq!(s.domains.len(), 6);
    assert_eq!(s.domains[4].name, "web2");
    let cfg = Config::load(&s.config).unwrap();
    for (_, shards) in cfg.open_corpus().unwrap() {
        for shard in shards {
            assert_eq!(shard.dtype(), DType::Int32);
            let t = shard.doc_tokens(0).unwrap();
            assert!((0..t.len()).all(|i| (0..152_064).contains(&t.get_i64(i).unwrap())));
        }
    }

    let mut bad = opts(dir.path(), 1000, 1);
    bad.vocab = 100_000;
    let err = synth::synth(&bad).unwrap_err().to_string();
    assert!(err.contains("does not fit uint16"), "{err}");
    bad.vocab = 3;
    let err = synth::synth(&bad).unwrap_err().to_string();
    assert!(err.contains("no ordinary token ids"), "{err}");
    let mut bad = opts(dir.path(), 1000, 1);
    bad.domains = millrace::config::MAX_DOMAINS + 1;
    let err = synth::synth(&bad).unwrap_err().to_string();
    assert!(
        err.contains("4097 domains; a config holds at most 4096"),
        "{err}"
    );
}

#[test]
fn cli_synth_then_inspect_reports_exact_totals() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_millrace"))
        .args(["synth", "--tokens", "1e6", "--seed", "3", "--json", "--out"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["tokens"], 1_000_000);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_millrace"))
        .args(["inspect", "--json", "--config"])
        .arg(dir.path().join("millrace.toml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["total"]["tokens"], 1_000_000);
    assert_eq!(report["total"]["documents"], summary["documents"]);
    let groups: u64 = summary["domains"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["groups"].as_u64().unwrap())
        .sum();
    assert_eq!(report["total"]["groups"], groups);
}

#[test]
fn rerun_with_fewer_shards_leaves_no_stale_shard_behind() {
    let dir = tempfile::tempdir().unwrap();
    let mut o = opts(dir.path(), 1_000_000, 2);
    o.shard_tokens = 50_000;
    synth::synth(&o).unwrap();
    assert!(synth::shard_prefix(dir.path(), "web", 9)
        .with_extension("idx")
        .exists());
    o.tokens = 200_000;
    let s = synth::synth(&o).unwrap();
    assert!(!synth::shard_prefix(dir.path(), "web", 9)
        .with_extension("idx")
        .exists());
    let cfg = Config::load(&s.config).unwrap();
    let total: u64 = cfg
        .open_corpus()
        .unwrap()
        .iter()
        .flat_map(|(_, shards)| shards.iter().map(Shard::tokens))
        .sum();
    assert_eq!(total, 200_000);
}

#[test]
fn a_reader_that_closes_the_pipe_early_is_not_an_error() {
    use std::io::Read;
    use std::process::{Command, Stdio};
    let dir = tempfile::tempdir().unwrap();
    synth::synth(&opts(dir.path(), 1_000_000, 2)).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_millrace"))
        .args(["inspect", "--json", "--doc", "0..1000", "--config"])
        .arg(dir.path().join("millrace.toml"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut head = [0u8; 16];
    child.stdout.take().unwrap().read_exact(&mut head).unwrap();
    // stdout is dropped here: the rest of several MB of JSON has nowhere to go.
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "exit {:?}: {stderr}", out.status);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(head.starts_with(b"{\"documents\""));
}

/// Runs the real binary and returns its stdout, failing with its stderr.
fn millrace_ok(args: &[&str]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_millrace"))
        .args(args)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "millrace {args:?}: {stderr}");
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn a_sparse_corpus_has_real_indexes_over_unallocated_bins_and_plans() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("sparse");
    let o = out.to_str().unwrap();
    let args = [
        "synth",
        "--sparse",
        "--length-scale",
        "20",
        "--tokens",
        "2e9",
        "--shard-tokens",
        "1e8",
        "--seed",
        "5",
        "--json",
        "--out",
        o,
    ];
    let summary: serde_json::Value = serde_json::from_str(&millrace_ok(&args)).unwrap();
    assert_eq!(summary["tokens"], 2_000_000_000u64);
    let docs = summary["documents"].as_u64().unwrap();
    // ~17k tokens a document at scale 20 (~870 unscaled): about 10^5, not 2.3 * 10^6.
    assert!((50_000..300_000).contains(&docs), "{docs} documents");

    // Every .bin has its full apparent size and (nearly) no blocks; the .idx is real.
    let (mut apparent, mut allocated, mut bins) = (0u64, 0u64, 0u64);
    let cfg = Config::load(&out.join("millrace.toml")).unwrap();
    for (_, shards) in cfg.open_corpus().unwrap() {
        for shard in &shards {
            shard.validate().unwrap();
            let meta = std::fs::metadata(shard.path().with_extension("bin")).unwrap();
            assert_eq!(meta.len(), shard.tokens() * 2, "{}", shard.path().display());
            apparent += meta.len();
            allocated += meta.blocks() * 512;
            bins += 1;
            let last = shard.doc_tokens(shard.documents() - 1).unwrap();
            assert!((0..last.len()).all(|i| last.get_i64(i) == Some(0)));
        }
    }
    assert_eq!(apparent, 4_000_000_000);
    assert!(bins >= 20, "{bins} shards");
    assert!(
        allocated <= bins * 8192,
        "{allocated} bytes allocated for {apparent} apparent"
    );

    // The tools that read a config take it as it is.
    let cfg_path = out.join("millrace.toml");
    let c = cfg_path.to_str().unwrap();
    let report: serde_json::Value =
        serde_json::from_str(&millrace_ok(&["inspect", "--json", "--config", c])).unwrap();
    assert_eq!(report["total"]["tokens"], 2_000_000_000u64);
    assert_eq!(report["total"]["documents"], docs);
    // synth's uint16 shards travel as uint16 in the default compact slots; the config's
    // token_dtype (int32) is the expanded layout's alone, and the line says which is which.
    let ok = millrace_ok(&["check-config", "--config", c]);
    assert!(
        ok.contains(": ok:")
            && ok.contains("tokens as uint16 in compact slots, int32 in expanded ones"),
        "{ok}"
    );
    let plan: serde_json::Value = serde_json::from_str(&millrace_ok(&[
        "plan", "--config", c, "--steps", "4", "--json",
    ]))
    .unwrap();
    assert!(plan.is_object(), "{plan}");
}

#[test]
fn sparse_at_scale_1_indexes_exactly_the_dense_corpus() {
    let (dense, sparse) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = synth::synth(&opts(dense.path(), 1_500_000, 2)).unwrap();
    let sparse_opts = opts(sparse.path(), 1_500_000, 3);
    let b = synth::synth_sparse(&sparse_opts, synth::Sparse { length_scale: 1 }).unwrap();
    assert_eq!(a.documents, b.documents);
    let (ta, tb) = (tree(dense.path()), tree(sparse.path()));
    let names = |t: &BTreeMap<String, Vec<u8>>| t.keys().cloned().collect::<Vec<_>>();
    assert_eq!(names(&ta), names(&tb));
    for (name, bytes) in &ta {
        if name.ends_with(".idx") || name.ends_with(".groups.npy") {
            assert_eq!(bytes, &tb[name], "{name}");
        } else if name.ends_with(".bin") {
            assert_eq!(bytes.len(), tb[name].len(), "{name}");
            assert!(tb[name].iter().all(|&b| b == 0), "{name} reads as zeros");
        }
    }
    let err = synth::synth_sparse(&sparse_opts, synth::Sparse { length_scale: 0 }).unwrap_err();
    assert!(err.to_string().contains("--length-scale 0"), "{err}");
}

#[test]
fn sparse_documents_mix_with_written_ones_and_read_as_zeros() {
    use millrace::corpus::MegatronWriter;
    let dir = tempfile::tempdir().unwrap();
    let prefix = dir.path().join("mixed");
    let mut w = MegatronWriter::create(&prefix, DType::Uint16).unwrap();
    let le = |t: &[u16]| t.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    w.add_document_bytes(&le(&[7, 8, 9])).unwrap();
    w.add_sparse_document(5).unwrap();
    w.add_document_bytes(&le(&[4, 2])).unwrap();
    w.add_sparse_document(4).unwrap(); // a trailing hole: the length still counts
    assert!(w.add_sparse_document(1 << 31).is_err());
    w.finish().unwrap();
    let shard = Shard::open(&prefix, None).unwrap();
    shard.validate().unwrap();
    assert_eq!(
        std::fs::metadata(dir.path().join("mixed.bin"))
            .unwrap()
            .len(),
        14 * 2
    );
    let doc = |d: u64| {
        let t = shard.doc_tokens(d).unwrap();
        (0..t.len())
            .map(|i| t.get_i64(i).unwrap())
            .collect::<Vec<i64>>()
    };
    assert_eq!(doc(0), [7, 8, 9]);
    assert_eq!(doc(1), [0; 5]);
    assert_eq!(doc(2), [4, 2]);
    assert_eq!(doc(3), [0; 4]);
}

/// `millrace synth --out tiny --tokens 1` exited 0 with a millrace.toml that
/// `check-config` refused (`domain web: tiny/web: the directory holds no megatron
/// shard`): a domain whose share rounded to no token got no shard but a config entry.
/// Such a total is refused, naming `--tokens` and the least that gives every domain a
/// document; at that least (and above it) the corpus passes `check-config`.
#[test]
fn tokens_too_few_for_every_domain_are_refused_naming_the_least() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("tiny");
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_millrace"))
            .args(args)
            .output()
            .unwrap()
    };
    let o = out.to_str().unwrap();
    let refused = run(&["synth", "--out", o, "--tokens", "1"]);
    let stderr = String::from_utf8_lossy(&refused.stderr).into_owned();
    assert!(!refused.status.success(), "{stderr}");
    assert!(
        stderr.contains("--tokens 1 leaves domain web no token")
            && stderr.contains("at least 5 tokens give every domain a document"),
        "{stderr}"
    );
    assert!(!out.join("millrace.toml").exists(), "a config was written");
    millrace_ok(&["synth", "--out", o, "--tokens", "5"]);
    let config = out.join("millrace.toml");
    millrace_ok(&["check-config", "--config", config.to_str().unwrap()]);
    // For other domain counts too: the least named is the first total that works, and
    // every total from there on works.
    for domains in [1, 2, 3, 5, 12] {
        let mut o = opts(&dir.path().join(format!("d{domains}")), 1, 1);
        o.domains = domains;
        let least = match synth::synth(&o) {
            Ok(_) => 1,
            Err(e) => {
                let e = e.to_string();
                assert!(e.contains("--tokens 1 leaves domain"), "{e}");
                let least = e
                    .split("at least ")
                    .nth(1)
                    .and_then(|s| s.split(' ').next());
                least
                    .and_then(|n| n.parse().ok())
                    .unwrap_or_else(|| panic!("{e}"))
            }
        };
        o.tokens = least - 1;
        assert!(least == 1 || synth::synth(&o).is_err(), "{domains} domains");
        for tokens in least..least + 40 {
            o.tokens = tokens;
            let s = synth::synth(&o).unwrap_or_else(|e| panic!("{domains} domains: {e}"));
            assert!(s.domains.iter().all(|d| d.documents > 0), "{tokens}");
        }
        let config = Config::load(&o.out.join("millrace.toml")).unwrap();
        config.open_corpus().unwrap();
    }
}

/// `inspect` cut the total row's label to the shard column's width, so shards named in
/// under 16 characters printed `…ards)` for `total (1 shards)`. The column now fits the
/// label, and every row keeps its columns aligned.
#[test]
fn inspect_prints_the_whole_total_label_beside_short_shard_names() {
    let dir = tempfile::tempdir().unwrap();
    let mut o = opts(dir.path(), 20_000, 1);
    o.domains = 1;
    synth::synth(&o).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_millrace"))
        .current_dir(dir.path())
        .args(["inspect", "web/web-00000"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().take(3).collect();
    assert!(lines[1].starts_with("web/web-00000 "), "{stdout}");
    assert!(lines[2].starts_with("total (1 shards) "), "{stdout}");
    assert!(!stdout.contains('…'), "{stdout}");
    let dtype_at: Vec<Option<usize>> = lines
        .iter()
        .zip(["dtype", "uint16", "uint16"])
        .map(|(l, word)| l.find(&format!(" {word}")))
        .collect();
    assert!(
        dtype_at.iter().all(|&a| a.is_some() && a == dtype_at[0]),
        "columns not aligned: {stdout}"
    );
}
