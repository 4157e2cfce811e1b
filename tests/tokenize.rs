//! `millrace tokenize`, end to end through the real binary (and the library where a test
//! needs a setting the CLI does not expose): documents decode back to their text, groups
//! come out contiguous and in order from interleaved input, compressed inputs read the
//! same, bad lines are counted with their file:line, and no failed or killed run leaves a
//! shard that opens.
//!
//! The tokenizer is a byte-level BPE trained here with the tokenizers crate's own
//! trainer, so decoding is exact for any UTF-8 text.

mod common;

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use millrace::corpus::{DType, Shard};
use millrace::tokenize::{self, Eos, TokenizeOptions};
use serde_json::{json, Value};
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{
    AddedToken, DecoderWrapper, NormalizerWrapper, PostProcessorWrapper, PreTokenizerWrapper,
    Tokenizer, TokenizerBuilder, TruncationParams,
};

const EOS: &str = "<|endoftext|>";

/// A small deterministic generator (xorshift), so inputs are the same on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

const WORDS: &[&str] = &[
    "the",
    "data",
    "loader",
    "feeds",
    "tokens",
    "to",
    "every",
    "rank",
    "fn",
    "main",
    "let",
    "mut",
    "return",
    "struct",
    "impl",
    "self",
    "café",
    "naïve",
    "数据",
    "加载",
    "🚀",
    "Grüße",
    "a",
    "of",
    "and",
    "in",
    "x",
    "{",
    "}",
    "(",
    ")",
    ";",
    "=",
    "\"quoted\"",
    "back\\slash",
];

/// A document of `words` words with newlines, tabs and non-ASCII text mixed in.
fn text(rng: &mut Rng, words: usize) -> String {
    let mut t = String::new();
    for i in 0..words {
        if i > 0 {
            t.push(match rng.below(12) {
                0 => '\n',
                1 => '\t',
                _ => ' ',
            });
        }
        t.push_str(WORDS[rng.below(WORDS.len() as u64) as usize]);
    }
    t
}

/// Trains a byte-level BPE on generated text and saves it as `tokenizer.json` in `dir`.
/// With `eos`, `<|endoftext|>` is a special token of it.
fn train_tokenizer(dir: &Path, eos: bool, truncate_to: Option<usize>) -> PathBuf {
    let mut rng = Rng(0x5eed);
    let texts: Vec<String> = (0..400).map(|_| text(&mut rng, 40)).collect();
    let specials = if eos {
        vec![AddedToken::from(EOS, true)]
    } else {
        vec![]
    };
    let mut trainer = BpeTrainerBuilder::new()
        .vocab_size(600)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(specials)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let mut tok = TokenizerBuilder::<
        BPE,
        NormalizerWrapper,
        PreTokenizerWrapper,
        PostProcessorWrapper,
        DecoderWrapper,
    >::new()
    .with_model(BPE::default())
    .with_normalizer(None)
    .with_pre_tokenizer(Some(ByteLevel::default().add_prefix_space(false).into()))
    .with_post_processor(Some(ByteLevel::default().trim_offsets(false).into()))
    .with_decoder(Some(ByteLevel::default().into()))
    .build()
    .unwrap();
    tok.train(&mut trainer, texts.iter()).unwrap();
    if let Some(n) = truncate_to {
        tok.with_truncation(Some(TruncationParams {
            max_length: n,
            ..Default::default()
        }))
        .unwrap();
    }
    let path = dir.join("tokenizer.json");
    tok.save(&path, false).unwrap();
    path
}

/// The shared tokenizer (with EOS), trained once per test process.
fn tokenizer() -> &'static Path {
    static TOK: OnceLock<PathBuf> = OnceLock::new();
    TOK.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap().keep();
        train_tokenizer(&dir, true, None)
    })
}

fn load(path: &Path) -> Tokenizer {
    Tokenizer::from_file(path).unwrap()
}

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_millrace"))
}

/// Runs `millrace tokenize ARGS --tokenizer T --quiet --json` and returns its output.
fn run(tok: &Path, args: &[&str]) -> Output {
    bin()
        .arg("tokenize")
        .args(args)
        .arg("--tokenizer")
        .arg(tok)
        .args(["--quiet", "--json"])
        .output()
        .unwrap()
}

/// Like [`run`], and the run must succeed; returns the JSON summary.
fn run_ok(tok: &Path, args: &[&str]) -> Value {
    let out = run(tok, args);
    assert!(
        out.status.success(),
        "tokenize {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn write_jsonl(path: &Path, rows: &[Value]) {
    let mut body = Vec::new();
    for r in rows {
        serde_json::to_writer(&mut body, r).unwrap();
        body.push(b'\n');
    }
    write_maybe_compressed(path, &body);
}

/// Writes `body` plain, or gzip/zstd-compressed by the file's extension.
fn write_maybe_compressed(path: &Path, body: &[u8]) {
    let name = path.to_string_lossy();
    let bytes = if name.ends_with(".gz") {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(body).unwrap();
        e.finish().unwrap()
    } else if name.ends_with(".zst") {
        zstd::encode_all(body, 3).unwrap()
    } else {
        body.to_vec()
    };
    std::fs::write(path, bytes).unwrap();
}

/// Every document of the shard at `prefix`, decoded; checks each ends with `eos`.
fn decoded(prefix: &Path, tok: &Tokenizer, eos: Option<u32>) -> Vec<String> {
    let shard = Shard::open(prefix, None).unwrap();
    shard.validate().unwrap();
    (0..shard.documents())
        .map(|d| {
            let t = shard.doc_tokens(d).unwrap();
            let mut ids: Vec<u32> = (0..t.len()).map(|i| t.get_i64(i).unwrap() as u32).collect();
            if let Some(eos) = eos {
                assert_eq!(ids.pop(), Some(eos), "document {d} ends with EOS");
            }
            tok.decode(&ids, false).unwrap()
        })
        .collect()
}

fn inspect_ok(prefix: &Path) -> Value {
    let out = bin()
        .args(["inspect", "--json"])
        .arg(prefix)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "inspect {}: {}",
        prefix.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Files in `dir` whose names start with `stem`.
fn outputs(dir: &Path, stem: &str) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(stem))
        .collect();
    v.sort();
    v
}

#[test]
fn round_trip_across_plain_gzip_and_zstd_inputs() {
    let dir = tempfile::tempdir().unwrap();
    let tok_path = tokenizer();
    let tok = load(tok_path);
    let mut rng = Rng(1);
    let mut texts = Vec::new();
    let mut files = Vec::new();
    for (k, name) in ["a.jsonl", "b.jsonl.gz", "c.jsonl.zst"].iter().enumerate() {
        let rows: Vec<Value> = (0..300)
            .map(|i| {
                let n = 1 + rng.below(if i == 0 { 2000 } else { 120 }) as usize;
                let t = text(&mut rng, n);
                texts.push(t.clone());
                json!({"id": format!("{k}-{i}"), "meta": {"nested": [1, 2, {"text": "not me"}]}, "text": t})
            })
            .collect();
        let path = dir.path().join(name);
        write_jsonl(&path, &rows);
        files.push(path);
    }
    let prefix = dir.path().join("out/web-00000");
    let mut args: Vec<&str> = files.iter().map(|p| s(p)).collect();
    args.extend(["--out", s(&prefix)]);
    let summary = run_ok(tok_path, &args);
    let eos = tok.token_to_id(EOS).unwrap();
    assert_eq!(summary["documents"], 900);
    assert_eq!(summary["bad"]["invalid_json"], 0);
    assert_eq!(summary["eos"], eos);
    assert_eq!(summary["dtype"], "uint16");
    assert_eq!(summary["groups"], Value::Null);

    let docs = decoded(&prefix, &tok, Some(eos));
    assert_eq!(
        docs, texts,
        "every document decodes back to its text, in input order"
    );
    let shard = Shard::open(&prefix, None).unwrap();
    assert_eq!(shard.dtype(), DType::Uint16);
    assert_eq!(summary["tokens"], shard.tokens());
    assert!(shard.groups().is_none());
    let report = inspect_ok(&prefix);
    assert_eq!(report["total"]["documents"], 900);
    assert_eq!(
        outputs(&dir.path().join("out"), "web"),
        ["web-00000.bin", "web-00000.idx"],
        "no temporary files are left"
    );

    // The human-readable summary names the numbers too.
    let out = bin()
        .arg("tokenize")
        .args(&args)
        .arg("--tokenizer")
        .arg(tok_path)
        .arg("--quiet")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(text.contains("wrote 900 documents"), "{text}");
    assert!(text.contains("tokens/s"), "{text}");
}

/// A source file of a repository, or a chapter of a book, for the grouping tests.
#[derive(Clone)]
struct Item {
    group: Option<Value>,
    order: Option<Value>,
    text: String,
}

fn grouped_items() -> Vec<Item> {
    let mut rng = Rng(7);
    let mut items = Vec::new();
    let paths = [
        "src/lib.rs",
        "README.md",
        "src/a/mod.rs",
        "Cargo.toml",
        "tests/t.rs",
    ];
    for r in 0..12 {
        for (i, p) in paths.iter().enumerate().take(1 + r % 5) {
            items.push(Item {
                group: Some(json!(format!("org/repo-{r:02}"))),
                order: Some(json!(p)),
                text: format!("// {r} {i}\n{}", text(&mut rng, 20)),
            });
        }
        // A path that appears twice in one repo: ties keep input order.
        if r % 4 == 0 {
            items.push(Item {
                group: Some(json!(format!("org/repo-{r:02}"))),
                order: Some(json!("src/lib.rs")),
                text: format!("duplicate path in {r}: {}", text(&mut rng, 5)),
            });
        }
    }
    // Documents without a group, and one without an order value.
    for i in 0..3 {
        items.push(Item {
            group: None,
            order: None,
            text: format!("loose {i} {}", text(&mut rng, 8)),
        });
    }
    items.push(Item {
        group: Some(json!("org/repo-03")),
        order: None,
        text: "no path".into(),
    });
    // Interleave: a deterministic shuffle.
    for i in (1..items.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        items.swap(i, j);
    }
    items
}

fn rows(items: &[Item], group: &str, order: &str) -> Vec<Value> {
    items
        .iter()
        .map(|it| {
            let mut o = serde_json::Map::new();
            o.insert("text".into(), json!(it.text));
            if let Some(g) = &it.group {
                o.insert(group.into(), g.clone());
            }
            if let Some(v) = &it.order {
                o.insert(order.into(), v.clone());
            }
            Value::Object(o)
        })
        .collect()
}

/// The order the documents must come out in, computed independently of the code under
/// test: documents without a group first (input order), then groups by key, within a
/// group missing order values first, then by order value (numbers numerically), then
/// input order.
fn expected_order(items: &[Item]) -> Vec<(Option<Value>, String)> {
    fn rank(v: &Option<Value>) -> (u8, f64, String) {
        match v {
            None => (0, 0.0, String::new()),
            Some(Value::Number(n)) => (1, n.as_f64().unwrap(), String::new()),
            Some(Value::String(s)) => (2, 0.0, s.clone()),
            Some(other) => panic!("{other}"),
        }
    }
    let mut idx: Vec<usize> = (0..items.len()).collect();
    idx.sort_by(|&a, &b| {
        let (ia, ib) = (&items[a], &items[b]);
        let ga = ia.group.as_ref().map(|_| rank(&ia.group));
        let gb = ib.group.as_ref().map(|_| rank(&ib.group));
        let key_a = (ga.is_some(), if ga.is_none() { a } else { 0 });
        let key_b = (gb.is_some(), if gb.is_none() { b } else { 0 });
        key_a
            .cmp(&key_b)
            .then_with(|| {
                let (x, y) = (ga.unwrap_or_default(), gb.unwrap_or_default());
                x.0.cmp(&y.0)
                    .then(x.1.total_cmp(&y.1))
                    .then_with(|| x.2.cmp(&y.2))
            })
            .then_with(|| {
                let (x, y) = (rank(&ia.order), rank(&ib.order));
                x.0.cmp(&y.0)
                    .then(x.1.total_cmp(&y.1))
                    .then_with(|| x.2.cmp(&y.2))
            })
            .then(a.cmp(&b))
    });
    idx.iter()
        .map(|&i| (items[i].group.clone(), items[i].text.clone()))
        .collect()
}

/// Checks that the shard at `prefix` holds `items` in the expected order, with a sidecar
/// whose ids are 0, 1, 2, ... in order of appearance, one per group.
fn check_grouped(prefix: &Path, items: &[Item], tok: &Tokenizer, eos: u32) {
    let want = expected_order(items);
    let docs = decoded(prefix, tok, Some(eos));
    let want_texts: Vec<&str> = want.iter().map(|(_, t)| t.as_str()).collect();
    assert_eq!(docs, want_texts, "documents in (group, order, input) order");

    let shard = Shard::open(prefix, None).unwrap();
    let groups = shard.groups().expect("a groups sidecar");
    let mut next = 0u64;
    let mut seen: HashMap<String, u64> = HashMap::new();
    for (d, (g, _)) in want.iter().enumerate() {
        let id = groups.group_of(d as u64).unwrap();
        match g {
            None => {
                assert_eq!(id, next, "document {d} without a group is its own group");
                next += 1;
            }
            Some(g) => {
                let key = g.to_string();
                let expect = *seen.entry(key).or_insert_with(|| {
                    next += 1;
                    next - 1
                });
                assert_eq!(id, expect, "document {d} of group {g}");
            }
        }
    }
    assert_eq!(groups.len() as u64, next);
    // The sidecar is little-endian uint64, as docs/FORMATS.md specifies.
    let raw = std::fs::read(millrace::corpus::megatron::with_suffix(
        prefix,
        "groups.npy",
    ))
    .unwrap();
    assert!(String::from_utf8_lossy(&raw[..128.min(raw.len())]).contains("'<u8'"));
}

#[test]
fn groups_come_out_contiguous_and_in_reading_order() {
    let dir = tempfile::tempdir().unwrap();
    let tok_path = tokenizer();
    let tok = load(tok_path);
    let eos = tok.token_to_id(EOS).unwrap();
    let items = grouped_items();
    let input = dir.path().join("code.jsonl");
    write_jsonl(&input, &rows(&items, "repo", "path"));

    // In memory.
    let a = dir.path().join("a/code");
    let sa = run_ok(
        tok_path,
        &[
            s(&input),
            "--out",
            s(&a),
            "--group-field",
            "repo",
            "--order-field",
            "path",
        ],
    );
    assert_eq!(sa["sort_runs"], 0);
    check_grouped(&a, &items, &tok, eos);
    let report = inspect_ok(&a);
    assert_eq!(report["total"]["groups"], sa["groups"]);

    // With a tiny memory budget the sort spills runs to disk; the output is identical.
    let b = dir.path().join("b/code");
    let sb = run_ok(
        tok_path,
        &[
            s(&input),
            "--out",
            s(&b),
            "--group-field",
            "repo",
            "--order-field",
            "path",
            "--mem-budget",
            "1",
            "--tmp-dir",
            s(&dir.path().join("spill")),
        ],
    );
    assert!(sb["sort_runs"].as_u64().unwrap() > 1, "{sb}");
    for ext in ["bin", "idx", "groups.npy"] {
        let read = |p: &Path| std::fs::read(millrace::corpus::megatron::with_suffix(p, ext));
        assert_eq!(read(&a).unwrap(), read(&b).unwrap(), "{ext}");
    }
    assert!(
        outputs(&dir.path().join("spill"), "").is_empty(),
        "spill and sort files are removed"
    );
    assert_eq!(outputs(&dir.path().join("b"), "code").len(), 3);
}

#[test]
fn numeric_order_fields_sort_numerically() {
    let dir = tempfile::tempdir().unwrap();
    let tok_path = tokenizer();
    let tok = load(tok_path);
    let eos = tok.token_to_id(EOS).unwrap();
    let mut rng = Rng(3);
    let mut items = Vec::new();
    for chapter in [10, 2, 1, 33, 3, 20] {
        for book in [7, 100, 12] {
            items.push(Item {
                group: Some(json!(book)),
                order: Some(json!(chapter)),
                text: format!("book {book} chapter {chapter}: {}", text(&mut rng, 10)),
            });
        }
    }
    let input = dir.path().join("books.jsonl.zst");
    write_jsonl(&input, &rows(&items, "book_id", "chapter"));
    let prefix = dir.path().join("books");
    let summary = run_ok(
        tok_path,
        &[
            s(&input),
            "--out",
            s(&prefix),
            "--group-field",
            "book_id",
            "--order-field",
            "chapter",
        ],
    );
    assert_eq!(summary["groups"], 3);
    check_grouped(&prefix, &items, &tok, eos);
    let docs = decoded(&prefix, &tok, Some(eos));
    assert!(docs[0].starts_with("book 7 chapter 1:"), "{}", docs[0]);
    assert!(docs[1].starts_with("book 7 chapter 2:"), "{}", docs[1]);
    assert!(docs[5].starts_with("book 7 chapter 33:"), "{}", docs[5]);
    assert!(docs[6].starts_with("book 12 chapter 1:"), "{}", docs[6]);
}

/// A file with one bad line of each kind at known line numbers, plus good ones.
fn bad_input(dir: &Path, name: &str) -> (PathBuf, usize) {
    let mut body: Vec<u8> = Vec::new();
    let mut good = 0;
    let lines: Vec<Vec<u8>> = vec![
        br#"{"text": "fine one"}"#.to_vec(),           // 1
        br#"{"text": "fine two"}"#.to_vec(),           // 2
        br#"{"text": "unterminated"#.to_vec(),         // 3 invalid_json
        br#"{"text": "fine three"}"#.to_vec(),         // 4
        br#"{"content": "no text field"}"#.to_vec(),   // 5 missing_field
        b"".to_vec(),                                  // 6 blank
        br#"{"text": 17}"#.to_vec(),                   // 7 wrong_type
        br#"{"text": ""}"#.to_vec(),                   // 8 empty_text
        br#"{"text": "fine four"}"#.to_vec(),          // 9
        b"{\"text\": \"caf\xe9 latin-1\"}".to_vec(),   // 10 non_utf8
        b"   \t".to_vec(),                             // 11 blank
        br#"["text", "an array"]"#.to_vec(),           // 12 invalid_json
        br#"{"text": null}"#.to_vec(),                 // 13 missing_field
        br#"{"text": "trailing"} x"#.to_vec(),         // 14 invalid_json
        br#"{"text": "fine \u00e9 five\r"}"#.to_vec(), // 15
    ];
    for l in &lines {
        body.extend_from_slice(l);
        body.push(b'\n');
        if l.starts_with(b"{\"text\": \"fine") {
            good += 1;
        }
    }
    let path = dir.join(name);
    write_maybe_compressed(&path, &body);
    (path, good)
}

#[test]
fn bad_lines_are_counted_by_kind_with_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let tok_path = tokenizer();
    let (a, good_a) = bad_input(dir.path(), "a.jsonl");
    let (b, good_b) = bad_input(dir.path(), "b.jsonl.gz");
    let prefix = dir.path().join("out");
    let summary = run_ok(tok_path, &[s(&a), s(&b), "--out", s(&prefix)]);
    assert_eq!(summary["documents"], (good_a + good_b) as u64);
    assert_eq!(summary["lines"], 30);
    assert_eq!(summary["blank_lines"], 4);
    let bad = &summary["bad"];
    assert_eq!(bad["invalid_json"], 6);
    assert_eq!(bad["missing_field"], 4);
    assert_eq!(bad["wrong_type"], 2);
    assert_eq!(bad["empty_text"], 2);
    assert_eq!(bad["non_utf8"], 2);
    let first: Vec<(String, u64, String)> = summary["first_bad"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["file"].as_str().unwrap().to_string(),
                b["line"].as_u64().unwrap(),
                b["kind"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let fa = s(&a).to_string();
    let fb = s(&b).to_string();
    assert_eq!(
        first,
        vec![
            (fa.clone(), 3, "invalid_json".into()),
            (fa.clone(), 5, "missing_field".into()),
            (fa.clone(), 7, "wrong_type".into()),
            (fa.clone(), 8, "empty_text".into()),
            (fa.clone(), 10, "non_utf8".into()),
            (fa.clone(), 12, "invalid_json".into()),
            (fa.clone(), 13, "missing_field".into()),
            (fa, 14, "invalid_json".into()),
            (fb.clone(), 3, "invalid_json".into()),
            (fb, 5, "missing_field".into()),
        ]
    );
    let tok = load(tok_path);
    let docs = decoded(&prefix, &tok, tok.token_to_id(EOS));
    assert_eq!(docs[0], "fine one");
    assert_eq!(docs[4], "fine é five\r");

    // The text summary names them as file:line too.
    let out = bin()
        .arg("tokenize")
        .args([s(&a), "--out", s(&prefix), "--quiet", "--tokenizer"])
        .arg(tok_path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("{}:10: non_utf8", s(&a))), "{text}");
}

#[test]
fn max_bad_aborts_and_leaves_no_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let tok_path = tokenizer();
    let (a, _) = bad_input(dir.path(), "a.jsonl");
    let good = dir.path().join("good.jsonl");
    write_jsonl(&good, &[json!({"text": "hello"}), json!({"text": "world"})]);
    let out_dir = dir.path().join("out");
    let prefix = out_dir.join("web");
    // A previous good run at the prefix, grouped so that it has a sidecar too.
    run_ok(
        tok_path,
        &[s(&good), "--out", s(&prefix), "--group-field", "repo"],
    );
    assert_eq!(outputs(&out_dir, "web").len(), 3);

    for grouped in [false, true] {
        let mut args = vec![s(&a), "--out", s(&prefix), "--max-bad", "7"];
        if grouped {
            args.extend(["--group-field", "repo"]);
        }
        let out = run(tok_path, &args);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("8 bad input lines, more than --max-bad 7"),
            "{err}"
        );
        assert!(err.contains(&format!("{}:3: invalid_json", s(&a))), "{err}");
        assert!(
            err.contains(&format!("{}:14: invalid_json", s(&a))),
            "{err}"
        );
        assert!(
            outputs(&out_dir, "web").is_empty(),
            "no outputs, old or temporary: {:?}",
            outputs(&out_dir, "web")
        );
        assert!(Shard::open(&prefix, None).is_err());
    }
    // At the threshold the run succeeds.
    let summary = run_ok(tok_path, &[s(&a), "--out", s(&prefix), "--max-bad", "8"]);
    assert_eq!(summary["documents"], 5);
    assert_eq!(outputs(&out_dir, "web"), ["web.bin", "web.idx"]);

    // Nothing but bad lines: no documents, an error that says what is wrong with them
    // (it used to give only their count), and no outputs.
    let junk = dir.path().join("junk.jsonl");
    std::fs::write(&junk, "not json\n{\"text\": \"\"}\n").unwrap();
    let out = run(tok_path, &[s(&junk), "--out", s(&prefix)]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no documents"), "{err}");
    assert!(err.contains("junk.jsonl:1: invalid_json"), "{err}");
    assert!(err.contains("junk.jsonl:2: empty_text"), "{err}");
    assert!(outputs(&out_dir, "web").is_empty());
    // The usual cause: a misspelt --text-field.
    let out = run(
        tok_path,
        &[s(&a), "--out", s(&prefix), "--text-field", "txet"],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("a.jsonl:1: missing_field: no field \"txet\""),
        "{err}"
    );
}

/// About `mb` MB of JSONL with repo/path fields, for the runs that get killed.
fn big_input(path: &Path, mb: usize) {
    let mut rng = Rng(11);
    let mut body = Vec::with_capacity(mb << 20);
    let mut i = 0;
    while body.len() < mb << 20 {
        let row = json!({"repo": format!("r{}", rng.below(500)), "path": format!("f{i}"), "text": text(&mut rng, 200)});
        serde_json::to_writer(&mut body, &row).unwrap();
        body.push(b'\n');
        i += 1;
    }
    std::fs::write(path, body).unwrap();
}

/// Two grouped runs at once that share a `--tmp-dir`, writing outputs of the same file
/// name in two directories (`en/code`, `de/code`) with sorts spilled to disk, each write
/// the bytes a run alone writes: their scratch files never collide, and neither removes
/// the other's.
#[test]
fn concurrent_runs_sharing_a_tmp_dir_do_not_touch_each_others_scratch() {
    let dir = tempfile::tempdir().unwrap();
    let tok_path = tokenizer();
    let (en, de) = (dir.path().join("en.jsonl"), dir.path().join("de.jsonl"));
    big_input(&en, 3);
    let mut rng = Rng(5);
    let rows: Vec<Value> = (0..4000)
        .map(|i| json!({"repo": format!("d{}", rng.below(300)), "path": format!("g{i}"), "text": text(&mut rng, 120)}))
        .collect();
    write_jsonl(&de, &rows);
    let tmp = dir.path().join("scratch");
    let args = |input: &Path, out: &Path| -> Vec<String> {
        [
            s(input),
            "--out",
            s(out),
            "--group-field",
            "repo",
            "--order-field",
            "path",
        ]
        .into_iter()
        .chain(["--mem-budget", "1", "--tmp-dir", s(&tmp), "--threads", "1"])
        .map(String::from)
        .collect()
    };
    let spawn = |input: &Path, out: &Path| {
        bin()
            .arg("tokenize")
            .args(args(input, out))
            .arg("--tokenizer")
            .arg(tok_path)
            .args(["--quiet", "--json"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (dir.path().join("en/code"), dir.path().join("de/code"));
    let runs = [spawn(&en, &a), spawn(&de, &b)];
    for r in runs {
        let out = r.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    for (input, out) in [(&en, &a), (&de, &b)] {
        let alone = dir.path().join("alone/code");
        let owned = args(input, &alone);
        run_ok(
            tok_path,
            &owned.iter().map(String::as_str).collect::<Vec<_>>(),
        );
        for ext in ["bin", "idx", "groups.npy"] {
            let read = |p: &Path| std::fs::read(millrace::corpus::megatron::with_suffix(p, ext));
            assert_eq!(
                read(out).unwrap(),
                read(&alone).unwrap(),
                "{} .{ext}",
                out.display()
            );
        }
    }
    assert!(outputs(&tmp, "").is_empty(), "scratch files are removed");
}

/// A one-thread run of `input` into `prefix`, not started yet: for tests that act on a
/// run while it works (stdout dropped, stderr kept).
fn one_thread_run(input: &Path, prefix: &Path, tok: &Path) -> Command {
    let mut cmd = bin();
    cmd.arg("tokenize")
        .arg(input)
        .arg("--out")
        .arg(prefix)
        .args(["--quiet", "--threads", "1", "--tokenizer"])
        .arg(tok)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    cmd
}

#[test]
fn a_killed_run_leaves_no_valid_shard_and_a_rerun_succeeds() {
    let dir = tempfile::tempdir().unwrap();
    let tok_path = tokenizer();
    let input = dir.path().join("big.jsonl");
    big_input(&input, 12);
    let small = dir.path().join("small.jsonl");
    write_jsonl(&small, &[json!({"text": "old output", "repo": "x"})]);
    let out_dir = dir.path().join("out");
    let prefix = out_dir.join("code");

    for grouped in [false, true] {
        // A complete earlier run, which the killed run must not leave looking current.
        run_ok(tok_path, &[s(&small), "--out", s(&prefix)]);
        assert!(Shard::open(&prefix, None).is_ok());

        let mut cmd = one_thread_run(&input, &prefix, tok_path);
        if grouped {
            cmd.args(["--group-field", "repo", "--order-field", "path"]);
        }
        let mut child = cmd.spawn().unwrap();
        // Kill it once it is under way: its temporary output exists (it is created
        // before the first chunk is read), plus a moment to fill write buffers.
        // The spill is named `code.<output directory's hash>.<pid>.spill.tmp`.
        let pid = child.id();
        let growing = || {
            let names = std::fs::read_dir(&out_dir).into_iter().flatten().flatten();
            names
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .any(|n| {
                    if grouped {
                        n.starts_with("code.") && n.ends_with(&format!(".{pid}.spill.tmp"))
                    } else {
                        n == "code.bin.tmp"
                    }
                })
        };
        let t0 = Instant::now();
        while !growing() {
            assert!(
                child.try_wait().unwrap().is_none(),
                "the run finished before it could be killed"
            );
            assert!(t0.elapsed() < Duration::from_secs(60));
            std::thread::sleep(Duration::from_millis(2));
        }
        std::thread::sleep(Duration::from_millis(300));
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run finished before it could be killed"
        );
        child.kill().unwrap(); // SIGKILL: no clean-up code runs
        child.wait().unwrap();

        assert!(
            Shard::open(&prefix, None).is_err(),
            "a killed run leaves no shard that opens (grouped: {grouped})"
        );
        let out = bin().arg("inspect").arg(&prefix).output().unwrap();
        assert!(
            !out.status.success(),
            "inspect refuses what a killed run left"
        );
        assert!(!out_dir.join("code.idx").exists());

        // A rerun (smaller, to keep the test fast) replaces everything.
        let mut args = vec![s(&small), "--out", s(&prefix)];
        if grouped {
            args.extend(["--group-field", "repo"]);
        }
        run_ok(tok_path, &args);
        inspect_ok(&prefix);
        let want: &[&str] = if grouped {
            &["code.bin", "code.groups.npy", "code.idx"]
        } else {
            &["code.bin", "code.idx"]
        };
        assert_eq!(outputs(&out_dir, "code"), want);
    }
}

/// A second run into an output that a first run is writing (holding its lock) is
/// refused at once, naming the output and the lock, and writes nothing; once the lock is
/// released the next run takes the stale file over and leaves none behind. (Without the
/// lock, the second run truncated the first one's
/// `.bin.tmp` and removed its finished shard: the first reported success over a shard
/// that was gone or held the second run's tokens.)
#[test]
fn a_second_run_into_an_output_being_written_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let tok_path = tokenizer();
    let small = dir.path().join("small.jsonl");
    write_jsonl(&small, &[json!({"text": "the other run"})]);
    let prefix = dir.path().join("code");
    // The lock a run writing `code` holds for its whole life (`code.lock`), held here:
    // the kernel's flock is the same whoever takes it, and a run of megabytes in the
    // background would make the test slow and its timing a race.
    let lock_path = dir.path().join("code.lock");
    let held = std::fs::File::create(&lock_path).unwrap();
    rustix::fs::flock(&held, rustix::fs::FlockOperation::NonBlockingLockExclusive).unwrap();
    let second = run(tok_path, &[s(&small), "--out", s(&prefix)]);
    let err = String::from_utf8_lossy(&second.stderr).into_owned();
    assert!(!second.status.success(), "the second run must be refused");
    assert!(
        err.contains("another tokenize run is writing") && err.contains("code.lock"),
        "{err}"
    );
    assert_eq!(
        outputs(dir.path(), "code"),
        ["code.lock"],
        "nothing written"
    );
    // Released (as a run that ends or dies releases it), the stale file is taken over,
    // and the run removes it when done.
    drop(held);
    run_ok(tok_path, &[s(&small), "--out", s(&prefix)]);
    assert_eq!(outputs(dir.path(), "code"), ["code.bin", "code.idx"]);
}

/// An `--out` that names a directory is refused before anything is written, in a
/// single run, a sharded run and `--merge`. (It used to write hidden `data/.bin` and
/// `data/-00000-00000.idx` while looking for them, in `--merge` and a rerun's clean-up,
/// in the directory above: `--merge` failed with "./-00000-00000.idx is missing".)
#[test]
fn an_out_that_names_a_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let tok_path = tokenizer();
    let input = dir.path().join("in.jsonl");
    write_jsonl(&input, &[json!({"text": "one document"})]);
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    for out in [format!("{}/", s(&data)), format!("{}/.", s(&data))] {
        for extra in [&[][..], &["--shard-tokens", "10"][..]] {
            let mut args = vec![s(&input), "--out", out.as_str()];
            args.extend(extra);
            let r = run(tok_path, &args);
            let err = String::from_utf8_lossy(&r.stderr);
            assert!(!r.status.success(), "--out {out} {extra:?} was accepted");
            assert!(
                err.contains("names a directory, not an output prefix"),
                "{err}"
            );
            assert!(err.contains(&format!("{}/NAME", s(&data))), "{err}");
        }
        let merge = bin()
            .args(["tokenize", "--merge", "--out", out.as_str()])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&merge.stderr);
        assert!(
            err.contains("names a directory, not an output prefix"),
            "{err}"
        );
    }
    assert_eq!(
        std::fs::read_dir(&data).unwrap().count(),
        0,
        "nothing written"
    );
    assert_eq!(outputs(dir.path(), ""), ["data", "in.jsonl"]);
}

/// Regression: an `--out` spelt as a file name but naming an existing directory
/// (`data/web` with `data/web/` there) was taken as a prefix: the shard went to
/// `data/web.bin` beside the directory, which a config naming `data/web` never reads.
/// It is refused like `data/web/`, in a single run, a sharded run and `--merge`.
#[test]
fn an_out_that_is_an_existing_directory_without_a_slash_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let tok_path = tokenizer();
    let input = dir.path().join("in.jsonl");
    write_jsonl(&input, &[json!({"text": "one document"})]);
    let data = dir.path().join("data");
    let web = data.join("web");
    std::fs::create_dir_all(&web).unwrap();
    for extra in [&[][..], &["--shard-tokens", "10"][..]] {
        let mut args = vec![s(&input), "--out", s(&web)];
        args.extend(extra);
        let r = run(tok_path, &args);
        let err = String::from_utf8_lossy(&r.stderr);
        assert!(
            !r.status.success(),
            "--out {} {extra:?} was accepted",
            s(&web)
        );
        assert!(
            err.contains("names a directory, not an output prefix")
                && err.contains(&format!("--out {}/NAME", s(&web))),
            "{err}"
        );
    }
    let merge = bin()
        .args(["tokenize", "--merge", "--out"])
        .arg(&web)
        .output()
        .unwrap();
    assert!(!merge.status.success());
    let err = String::from_utf8_lossy(&merge.stderr);
    assert!(
        err.contains("names a directory, not an output prefix"),
        "{err}"
    );
    assert_eq!(outputs(&data, ""), ["web"], "nothing written beside it");
    assert_eq!(std::fs::read_dir(&web).unwrap().count(), 0, "nor in it");
}

/// Regression: the same input file given twice (`in.jsonl ./in.jsonl`) was tokenized
/// twice, silently. It is refused by file, not spelling (a hard link too), naming both,
/// before anything is written.
#[test]
fn an_input_given_twice_is_refused_naming_both_spellings() {
    let dir = tempfile::tempdir().unwrap();
    let tok_path = tokenizer();
    let input = dir.path().join("in.jsonl");
    write_jsonl(
        &input,
        &[json!({"text": "a b c"}), json!({"text": "d e f"})],
    );
    let other = dir.path().join("other.jsonl");
    write_jsonl(&other, &[json!({"text": "g h i"})]);
    let link = dir.path().join("link.jsonl");
    std::fs::hard_link(&input, &link).unwrap();
    let dotted = format!("{}/./in.jsonl", s(dir.path()));
    let out = dir.path().join("out").join("x");
    for (second, extra) in [
        (dotted.as_str(), &[][..]),
        (s(&link), &["--num-shards", "2", "--shard-index", "1"][..]),
    ] {
        let mut args = vec![s(&input), s(&other), second, "--out", s(&out)];
        args.extend(extra);
        let r = run(tok_path, &args);
        let err = String::from_utf8_lossy(&r.stderr);
        assert!(
            !r.status.success(),
            "{second} after {} was accepted",
            s(&input)
        );
        assert!(
            err.contains(&format!(
                "{second}: input 3 is the same file as input 1 ({})",
                s(&input)
            )) && err.contains("tokenized twice"),
            "{err}"
        );
    }
    assert!(!dir.path().join("out").exists(), "nothing written");
    // Two files of the same content are two inputs.
    std::fs::copy(&input, dir.path().join("copy.jsonl")).unwrap();
    let copy = dir.path().join("copy.jsonl");
    let v = run_ok(tok_path, &[s(&input), s(&copy), "--out", s(&out)]);
    assert_eq!(v["documents"], 4);
}

/// An input in a compression format tokenize does not decode (xz, bzip2, lz4) is refused
/// by name before anything is touched. (It used to be read as text: the whole file
/// became "invalid UTF-8" bad lines and the run succeeded without it.) The fixtures are
/// what `xz -c`, `bzip2 -c` and `lz4 -c` write for `{"text": "one document"}\n`.
#[test]
fn inputs_compressed_in_formats_it_cannot_read_are_refused_by_name() {
    const XZ: &[u8] = b"\xfd\x37\x7a\x58\x5a\x00\x00\x04\xe6\xd6\xb4\x46\x02\x00\x21\x01\x16\x00\x00\x00\x74\x2f\xe5\xa3\x01\x00\x18\x7b\x22\x74\x65\x78\x74\x22\x3a\x20\x22\x6f\x6e\x65\x20\x64\x6f\x63\x75\x6d\x65\x6e\x74\x22\x7d\x0a\x00\x00\x00\x00\x91\x3e\x1c\x71\x2b\x96\xce\xdc\x00\x01\x31\x19\x59\x1a\xb0\x82\x1f\xb6\xf3\x7d\x01\x00\x00\x00\x00\x04\x59\x5a";
    const BZIP2: &[u8] = b"\x42\x5a\x68\x39\x31\x41\x59\x26\x53\x59\xe9\x11\x24\x1b\x00\x00\x0b\xd9\x80\x00\x10\x50\x00\x00\x10\x0e\x03\x86\x4a\x20\x00\x31\x4c\x00\x01\x46\x9b\x53\x6a\x31\xa8\x9e\x24\x26\x8a\x7a\xa1\x60\xd9\x45\x90\x5b\xf8\xbb\x92\x29\xc2\x84\x87\x48\x89\x20\xd8";
    const LZ4: &[u8] = b"\x04\x22\x4d\x18\x64\x40\xa7\x19\x00\x00\x80\x7b\x22\x74\x65\x78\x74\x22\x3a\x20\x22\x6f\x6e\x65\x20\x64\x6f\x63\x75\x6d\x65\x6e\x74\x22\x7d\x0a\x00\x00\x00\x00\xe6\x84\xc4\x71";
    let dir = tempfile::tempdir().unwrap();
    let tok_path = tokenizer();
    let good = dir.path().join("good.jsonl");
    write_jsonl(&good, &[json!({"text": "fine"})]);
    let prefix = dir.path().join("out");
    run_ok(tok_path, &[s(&good), "--out", s(&prefix)]);
    // `lz4 -l` (the legacy frame) and `xz --format=lzma` of one line of JSON.
    const LZ4_LEGACY: &[u8] = b"\x02\x21\x4c\x18\x1b\x00\x00\x00\xf0\x0a\x7b\x22\x74\x65\x78\x74\x22\x3a\x20\x22\x6f\x6e\x65\x20\x64\x6f\x63\x75\x6d\x65\x6e\x74\x22\x7d\x0a";
    const LZMA: &[u8] = b"\x5d\x00\x00\x80\x00\xff\xff\xff\xff\xff\xff\xff\xff\x00\x3d\x88\x8a\x86\x94\x88\x13\xe0\xf3\x87\x24\xb7\x68\x36\x09\x82\x51\x64\xa2\x70\x15\x86\x4b\x3a\x3a\x35\x8f\xe7\x9b\xe4\x7f\xf9\x9e\xdc\x00";
    for (name, body, format) in [
        ("a.jsonl.xz", XZ, "xz"),
        ("a.jsonl.bz2", BZIP2, "bzip2"),
        ("a.jsonl.lz4", LZ4, "lz4"),
        ("l.jsonl.lz4", LZ4_LEGACY, "lz4 (legacy)"),
        ("a.jsonl.lzma", LZMA, "lzma"),
    ] {
        let input = dir.path().join(name);
        std::fs::write(&input, body).unwrap();
        let r = run(tok_path, &[s(&good), s(&input), "--out", s(&prefix)]);
        let err = String::from_utf8_lossy(&r.stderr);
        assert!(!r.status.success(), "{name} was read as text");
        assert!(
            err.contains(&format!("{name}: is {format}-compressed")),
            "{err}"
        );
        // Refused before anything was touched: the earlier output is still there.
        inspect_ok(&prefix);
    }
}

/// `pzstd` starts its files with a zstd skippable frame (magic 0x184D2A50): such a file
/// was read as plain text and all of it dropped as lines of invalid UTF-8. It is zstd,
/// and reads as the plain file does.
#[test]
fn a_zstd_file_that_starts_with_a_skippable_frame_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let tok_path = tokenizer();
    let tok = load(tok_path);
    let eos = tok.token_to_id(EOS).unwrap();
    let plain = dir.path().join("p.jsonl");
    write_jsonl(
        &plain,
        &[
            json!({"text": "one document"}),
            json!({"text": "and another"}),
        ],
    );
    let mut bytes = vec![0x50, 0x2A, 0x4D, 0x18, 4, 0, 0, 0, 1, 2, 3, 4];
    bytes.extend(zstd::encode_all(&std::fs::read(&plain).unwrap()[..], 3).unwrap());
    let input = dir.path().join("p.zst");
    std::fs::write(&input, bytes).unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    run_ok(tok_path, &[s(&plain), "--out", s(&a)]);
    let summary = run_ok(tok_path, &[s(&input), "--out", s(&b)]);
    assert_eq!(summary["documents"], 2, "{summary}");
    assert_eq!(
        decoded(&b, &tok, Some(eos)),
        vec!["one document".to_string(), "and another".to_string()]
    );
    assert_eq!(decoded(&a, &tok, Some(eos)), decoded(&b, &tok, Some(eos)));
}

/// Each bad line is counted by exactly one run of a job. A line the tokenizer refuses
/// (or too long for a shard) is found only by the run that owns its document, in a
/// grouped job its group's run, while the count kept only the lines of the line's own
/// run: such a line was counted by no run, or by one in N, and a job-wide `--max-bad`
/// could not trip on them.
#[test]
fn lines_the_tokenizer_refuses_are_counted_once_across_a_grouped_jobs_runs() {
    let dir = tempfile::tempdir().unwrap();
    // A word-level tokenizer whose unknown token is not in its vocabulary: it refuses
    // every line with a word it does not know.
    let tok_path = dir.path().join("wl.json");
    let wl = json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [{"id": 0, "content": EOS, "single_word": false, "lstrip": false,
                          "rstrip": false, "normalized": false, "special": true}],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": {EOS: 0, "hello": 1, "world": 2},
                  "unk_token": "[UNK]"}
    });
    std::fs::write(&tok_path, wl.to_string()).unwrap();
    let rows: Vec<Value> = (0..40)
        .map(|i| {
            let text = if i % 3 == 0 {
                "hello zzz"
            } else {
                "hello world"
            };
            json!({"repo": format!("r{}", i % 7), "path": i, "text": text})
        })
        .collect();
    let input = dir.path().join("in.jsonl");
    write_jsonl(&input, &rows);
    let group = ["--group-field", "repo", "--order-field", "path"];
    let mut args = vec![s(&input), "--out"];
    let one = dir.path().join("one");
    args.push(s(&one));
    args.extend(group);
    let want = run_ok(&tok_path, &args)["bad"]["encode_failed"].clone();
    assert_eq!(want, 14);
    let summaries = run_job(
        &tok_path,
        std::slice::from_ref(&input),
        &dir.path().join("job"),
        4,
        &group,
    );
    let got: u64 = summaries
        .iter()
        .map(|r| r["bad"]["encode_failed"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(got, 14, "{summaries:?}");
}

/// Standard base64 with padding, for a SentencePiece charsmap in a tokenizer.json.
fn base64(bytes: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in bytes.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                out.push(ABC[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The shared tokenizer with a `Precompiled` normalizer whose charsmap is `charsmap`.
fn with_precompiled(dir: &Path, name: &str, charsmap: &[u8]) -> PathBuf {
    let mut t: Value = serde_json::from_slice(&std::fs::read(tokenizer()).unwrap()).unwrap();
    t["normalizer"] = json!({"type": "Precompiled", "precompiled_charsmap": base64(charsmap)});
    let path = dir.join(name);
    std::fs::write(&path, serde_json::to_vec(&t).unwrap()).unwrap();
    path
}

/// The tokenizers library panics on some malformed tokenizer files: on loading one whose
/// SentencePiece charsmap does not parse, and on encoding, with one whose charsmap
/// parses but indexes out of bounds for some characters. The first is an error naming
/// the file, the second a bad line, never a crash. (Loading panicked with exit code 101;
/// a panic while encoding killed a worker with its chunk undone, and the run crashed, or
/// with more than a few MB of input hung for ever waiting for that chunk.)
#[test]
fn tokenizer_panics_are_errors_or_bad_lines_never_a_crash_or_a_hang() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    let rows: Vec<Value> = (0..3000)
        .map(|i| match i {
            1234 => json!({"text": "fizz"}),
            _ => json!({"text": format!("alpha beta gamma {i}")}),
        })
        .collect();
    write_jsonl(&input, &rows);
    let prefix = dir.path().join("out");

    // Three bytes: not even the charsmap's length prefix.
    let unreadable = with_precompiled(dir.path(), "unreadable.json", &[0, 0, 0]);
    let r = run(&unreadable, &[s(&input), "--out", s(&prefix)]);
    let err = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.code(), Some(1), "{err}");
    assert!(
        err.contains("unreadable.json: cannot load a HuggingFace tokenizer.json")
            && err.contains("Precompiled normalizer cannot be read"),
        "{err}"
    );

    // A trie of 256 units whose unit for 'z' has a leaf past the end of the array.
    let mut units = vec![0u32; 256];
    units[usize::from(b'z')] = u32::from(b'z') | 1 << 8 | 1000 << 10;
    let mut charsmap = (units.len() as u32 * 4).to_le_bytes().to_vec();
    charsmap.extend(units.iter().flat_map(|u| u.to_le_bytes()));
    let panicky = with_precompiled(dir.path(), "panicky.json", &charsmap);
    let mut child = bin()
        .arg("tokenize")
        .arg(&input)
        .args([
            "--out",
            s(&prefix),
            "--json",
            "--threads",
            "2",
            "--tokenizer",
        ])
        .arg(&panicky)
        .env("RUST_BACKTRACE", "1")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if t0.elapsed() > Duration::from_secs(120) {
            child.kill().unwrap();
            panic!("the run hung");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["documents"], 2999);
    assert_eq!(summary["bad"]["encode_failed"], 1);
    assert_eq!(summary["first_bad"][0]["line"], 1235);
    let detail = summary["first_bad"][0]["detail"].as_str().unwrap();
    assert!(detail.contains("the tokenizer panicked on it"), "{detail}");
    // The panic is the bad line's detail; the hook does not print it (nor a backtrace)
    // besides, once per line that panics.
    assert!(
        !err.contains("panicked at") && !err.contains("stack backtrace"),
        "{err}"
    );
    inspect_ok(&prefix);
}

#[test]
fn thread_count_and_chunking_do_not_change_the_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let tok_path = tokenizer();
    let items = grouped_items();
    let mut all = Vec::new();
    for _ in 0..20 {
        all.extend(items.iter().cloned());
    }
    let input = dir.path().join("in.jsonl");
    write_jsonl(&input, &rows(&all, "repo", "path"));
    // Big enough for several of the CLI's 1 MiB chunks.
    let big = dir.path().join("big.jsonl");
    big_input(&big, 5);

    let read = |p: &Path, ext: &str| {
        std::fs::read(millrace::corpus::megatron::with_suffix(p, ext)).unwrap()
    };
    for grouped in [false, true] {
        let mut first: Option<Vec<Vec<u8>>> = None;
        for (threads, chunk) in [(1, 1usize << 20), (3, 1000), (2, 97)] {
            let prefix = dir.path().join(format!("lib-{grouped}-{threads}"));
            let mut o = TokenizeOptions::new(vec![input.clone()], tok_path.into(), prefix.clone());
            o.threads = threads;
            o.chunk_bytes = chunk;
            if grouped {
                o.group_field = Some("repo".into());
                o.order_field = Some("path".into());
            }
            let summary = tokenize::tokenize(&o).unwrap();
            assert_eq!(summary.documents, all.len() as u64);
            let mut files = vec![read(&prefix, "bin"), read(&prefix, "idx")];
            if grouped {
                files.push(read(&prefix, "groups.npy"));
            }
            match &first {
                None => first = Some(files),
                Some(f) => assert_eq!(f, &files, "threads {threads}, chunk {chunk}"),
            }
        }
        let mut bytes: Option<Vec<u8>> = None;
        for threads in ["1", "2"] {
            let prefix = dir.path().join(format!("cli-{grouped}-{threads}"));
            let mut args = vec![s(&big), "--out", s(&prefix), "--threads", threads];
            if grouped {
                args.extend(["--group-field", "repo", "--order-field", "path"]);
            }
            run_ok(tok_path, &args);
            let mut all = read(&prefix, "bin");
            all.extend(read(&prefix, "idx"));
            if grouped {
                all.extend(read(&prefix, "groups.npy"));
            }
            match &bytes {
                None => bytes = Some(all),
                Some(b) => assert!(b == &all, "--threads {threads} changed the output"),
            }
        }
    }
}

#[test]
fn eos_dtype_and_tokenizer_settings() {
    let dir = tempfile::tempdir().unwrap();
    let tok_path = tokenizer();
    let tok = load(tok_path);
    let eos = tok.token_to_id(EOS).unwrap();
    let mut rng = Rng(5);
    let texts: Vec<String> = (0..50).map(|_| text(&mut rng, 300)).collect();
    let input = dir.path().join("in.jsonl");
    write_jsonl(
        &input,
        &texts.iter().map(|t| json!({"body": t})).collect::<Vec<_>>(),
    );
    let p = |n: &str| dir.path().join(n);

    // --text-field, --no-eos, --eos-token, --eos-id, --dtype int32.
    run_ok(
        tok_path,
        &[
            s(&input),
            "--out",
            s(&p("none")),
            "--text-field",
            "body",
            "--no-eos",
        ],
    );
    assert_eq!(decoded(&p("none"), &tok, None), texts);
    run_ok(
        tok_path,
        &[
            s(&input),
            "--out",
            s(&p("named")),
            "--text-field",
            "body",
            "--eos-token",
            EOS,
        ],
    );
    assert_eq!(decoded(&p("named"), &tok, Some(eos)), texts);
    run_ok(
        tok_path,
        &[
            s(&input),
            "--out",
            s(&p("id")),
            "--text-field",
            "body",
            "--eos-id",
            "5",
        ],
    );
    assert_eq!(decoded(&p("id"), &tok, Some(5)), texts);
    let summary = run_ok(
        tok_path,
        &[
            s(&input),
            "--out",
            s(&p("wide")),
            "--text-field",
            "body",
            "--dtype",
            "int32",
        ],
    );
    assert_eq!(summary["dtype"], "int32");
    assert_eq!(Shard::open(&p("wide"), None).unwrap().dtype(), DType::Int32);
    assert_eq!(decoded(&p("wide"), &tok, Some(eos)), texts);

    // A dtype too small for the vocabulary is refused before anything is written.
    let out = run(
        tok_path,
        &[
            s(&input),
            "--out",
            s(&p("narrow")),
            "--text-field",
            "body",
            "--dtype",
            "uint8",
        ],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("uint8 cannot hold"));
    // The wrong text field: every line is bad, nothing is written.
    let out = run(tok_path, &[s(&input), "--out", s(&p("wrong"))]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no documents"));

    // A tokenizer with no special tokens: no EOS to guess, unless a tokenizer_config.json
    // beside it names one.
    let plain_dir = dir.path().join("plain");
    std::fs::create_dir_all(&plain_dir).unwrap();
    let plain = train_tokenizer(&plain_dir, false, None);
    let out = run(
        &plain,
        &[s(&input), "--out", s(&p("x")), "--text-field", "body"],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--eos-id"));
    let plain_tok = load(&plain);
    let the = plain_tok.token_to_id("the").unwrap();
    std::fs::write(
        plain_dir.join("tokenizer_config.json"),
        json!({"eos_token": {"content": "the"}}).to_string(),
    )
    .unwrap();
    let summary = run_ok(
        &plain,
        &[s(&input), "--out", s(&p("x")), "--text-field", "body"],
    );
    assert_eq!(summary["eos"], the);

    // A tokenizer.json that truncates (to 8 tokens here) must not cut documents.
    let trunc_dir = dir.path().join("trunc");
    std::fs::create_dir_all(&trunc_dir).unwrap();
    let trunc = train_tokenizer(&trunc_dir, true, Some(8));
    run_ok(
        &trunc,
        &[s(&input), "--out", s(&p("t")), "--text-field", "body"],
    );
    let trunc_tok = load(&trunc);
    assert_eq!(
        decoded(&p("t"), &trunc_tok, trunc_tok.token_to_id(EOS)),
        texts
    );

    // Library: an explicit Eos::Id outside the vocabulary is refused.
    let mut o = TokenizeOptions::new(vec![input.clone()], tok_path.into(), p("lib"));
    o.text_field = "body".into();
    o.eos = Eos::Id(1 << 30);
    let err = tokenize::tokenize(&o).unwrap_err().to_string();
    assert!(err.contains("outside the vocabulary"), "{err}");
}

#[test]
fn encode_ids_matches_encode_fast_and_a_bom_is_skipped() {
    let tok = load(tokenizer());
    let mut rng = Rng(9);
    let mut texts: Vec<String> = Vec::new();
    for _ in 0..200 {
        let n = 1 + rng.below(300) as usize;
        texts.push(text(&mut rng, n));
    }
    texts.push(format!("a{EOS}b {EOS}"));
    texts.push("  leading and trailing  \n\n".into());
    texts.push("ünïcödé 😀 \u{0} \u{feff}".into());
    for t in &texts {
        let want = tok
            .encode_fast(t.as_str(), false)
            .unwrap()
            .get_ids()
            .to_vec();
        let mut got = Vec::new();
        tokenize::encode_ids(&tok, t, &mut got).unwrap();
        assert_eq!(got, want, "{t:?}");
    }

    // A UTF-8 byte-order mark at the start of a file is not a bad line.
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("bom.jsonl");
    std::fs::write(
        &input,
        b"\xEF\xBB\xBF{\"text\": \"first\"}\n{\"text\": \"second\"}\n",
    )
    .unwrap();
    let prefix = dir.path().join("bom");
    let summary = run_ok(tokenizer(), &[s(&input), "--out", s(&prefix)]);
    assert_eq!(summary["documents"], 2, "{summary}");
    assert_eq!(
        decoded(&prefix, &tok, tok.token_to_id(EOS)),
        ["first", "second"]
    );
}

/// A JSONL row of `n` bytes (newline excluded) whose text is `fill` repeated.
fn row_of(n: usize, fill: char) -> String {
    let shell = r#"{"text": ""}"#.len();
    let body: String = std::iter::repeat_n(fill, n - shell).collect();
    let row = format!(r#"{{"text": "{body}"}}"#);
    assert_eq!(row.len(), n);
    row
}

#[test]
fn oversize_lines_are_skipped_unread_counted_and_leave_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let tok_path = tokenizer();
    let tok = load(tok_path);
    let mut rng = Rng(21);
    let texts: Vec<String> = (0..40).map(|_| text(&mut rng, 60)).collect();
    let good: Vec<String> = texts
        .iter()
        .map(|t| json!({ "text": t }).to_string())
        .collect();
    // 3 MB lines against a 1 MiB limit: one mid-file, one (without its newline) closing
    // the file. The gzip copy checks the limit applies to decompressed lines.
    let huge = row_of(3_000_000, 'x');
    let mut body = String::new();
    for (i, g) in good.iter().enumerate() {
        if i == 7 {
            body.push_str(&huge);
            body.push('\n');
        }
        body.push_str(g);
        body.push('\n');
    }
    body.push_str(&huge);
    let plain = dir.path().join("big.jsonl");
    let gz = dir.path().join("big.jsonl.gz");
    write_maybe_compressed(&plain, body.as_bytes());
    write_maybe_compressed(&gz, body.as_bytes());
    let clean = dir.path().join("clean.jsonl");
    write_maybe_compressed(&clean, (good.join("\n") + "\n").as_bytes());

    let out_dir = dir.path().join("out");
    let want = out_dir.join("want");
    run_ok(tok_path, &[s(&clean), "--out", s(&want)]);
    let bytes = |p: &Path| {
        let mut b = std::fs::read(millrace::corpus::megatron::with_suffix(p, "bin")).unwrap();
        b.extend(std::fs::read(millrace::corpus::megatron::with_suffix(p, "idx")).unwrap());
        b
    };
    for input in [&plain, &gz] {
        let prefix = out_dir.join("got");
        let summary = run_ok(
            tok_path,
            &[s(input), "--out", s(&prefix), "--max-line-bytes", "1048576"],
        );
        assert_eq!(summary["documents"], good.len() as u64, "{summary}");
        assert_eq!(summary["lines"], good.len() as u64 + 2);
        assert_eq!(summary["bad"]["line_too_long"], 2);
        assert_eq!(
            summary["text_bytes"],
            body.len() as u64,
            "skipped bytes count as read"
        );
        let first = summary["first_bad"].as_array().unwrap();
        assert_eq!(first.len(), 2);
        for (b, line) in first.iter().zip([8, good.len() as u64 + 2]) {
            assert_eq!(b["file"], s(input));
            assert_eq!(b["line"], line);
            assert_eq!(b["kind"], "line_too_long");
            assert_eq!(
                b["detail"],
                "3000000 bytes, more than --max-line-bytes 1048576; skipped unread"
            );
        }
        // The other documents are exactly what a file without the long lines gives.
        assert!(bytes(&prefix) == bytes(&want), "{}", input.display());
        assert_eq!(decoded(&prefix, &tok, tok.token_to_id(EOS)), texts);
        assert_eq!(
            outputs(&out_dir, "got"),
            ["got.bin", "got.idx"],
            "no temporary files are left"
        );
    }

    // Library, tiny chunks and several threads, grouped: the same documents.
    for (threads, chunk) in [(3, 97usize), (1, 1 << 20)] {
        let prefix = out_dir.join(format!("lib{threads}"));
        let mut o = TokenizeOptions::new(vec![plain.clone()], tok_path.into(), prefix.clone());
        o.max_line_bytes = 1 << 20;
        o.threads = threads;
        o.chunk_bytes = chunk;
        let summary = tokenize::tokenize(&o).unwrap();
        assert_eq!(summary.bad.line_too_long, 2);
        assert_eq!(summary.first_bad[0].line, 8);
        assert!(
            bytes(&prefix) == bytes(&want),
            "threads {threads}, chunk {chunk}"
        );
    }

    // The limit is on bytes without the newline: a line of exactly the limit is kept.
    let edge = dir.path().join("edge.jsonl");
    std::fs::write(&edge, format!("{}\n{}\n", row_of(30, 'a'), row_of(31, 'b'))).unwrap();
    let summary = run_ok(
        tok_path,
        &[
            s(&edge),
            "--out",
            s(&out_dir.join("edge")),
            "--max-line-bytes",
            "30",
        ],
    );
    assert_eq!(summary["documents"], 1);
    assert_eq!(summary["first_bad"][0]["line"], 2);
    assert_eq!(summary["first_bad"][0]["kind"], "line_too_long");

    // A run that fails on them (--max-bad) leaves no output and no temporary file.
    let prefix = out_dir.join("fail");
    let out = run(
        tok_path,
        &[
            s(&plain),
            "--out",
            s(&prefix),
            "--max-line-bytes",
            "1M",
            "--max-bad",
            "1",
        ],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("{}:8: line_too_long", s(&plain))),
        "{err}"
    );
    assert!(
        outputs(&out_dir, "fail").is_empty(),
        "{:?}",
        outputs(&out_dir, "fail")
    );
    let out = run(
        tok_path,
        &[s(&plain), "--out", s(&prefix), "--max-line-bytes", "0"],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--max-line-bytes 0"));
}

#[test]
fn groups_left_without_rows_are_reported_not_silently_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let tok_path = tokenizer();
    let tok = load(tok_path);
    // Group g<k>: every third group has only empty rows, every fifth (not a multiple of
    // three) only rows with a null or non-string text; the rest keep one good row among
    // empty ones. Rows without a group are their own groups and never "vanish".
    let mut rows = Vec::new();
    let mut kept = 0u64;
    let mut gone = 0u64;
    for k in 0..120 {
        let g = format!("g{k:03}");
        if k % 3 == 0 {
            rows.push(json!({"repo": g, "text": ""}));
            rows.push(json!({"repo": g, "text": ""}));
            gone += 1;
        } else if k % 5 == 0 {
            rows.push(json!({"repo": g, "text": null}));
            rows.push(json!({"repo": g, "text": 5}));
            gone += 1;
        } else {
            rows.push(json!({"repo": g, "text": ""}));
            rows.push(json!({"repo": g, "text": format!("doc of {g}")}));
            kept += 1;
        }
    }
    rows.push(json!({"text": ""}));
    rows.push(json!({"text": "loose"}));
    let input = dir.path().join("in.jsonl");
    write_jsonl(&input, &rows);
    let prefix = dir.path().join("out");
    let summary = run_ok(
        tok_path,
        &[s(&input), "--out", s(&prefix), "--group-field", "repo"],
    );
    assert_eq!(summary["groups"], kept + 1, "{summary}");
    assert_eq!(summary["vanished_groups"], gone, "{summary}");
    let docs = decoded(&prefix, &tok, tok.token_to_id(EOS));
    assert_eq!(docs.len() as u64, kept + 1);
    assert_eq!(docs[0], "loose");
    assert_eq!(docs[1], "doc of g001");

    // The same through the on-disk sort (a tiny budget spills many runs).
    let mut o = TokenizeOptions::new(vec![input.clone()], tok_path.into(), dir.path().join("lib"));
    o.group_field = Some("repo".into());
    o.mem_budget = 1;
    let lib = tokenize::tokenize(&o).unwrap();
    assert!(lib.sort_runs > 1, "{}", lib.sort_runs);
    assert_eq!(
        (lib.groups, lib.vanished_groups),
        (Some(kept + 1), Some(gone))
    );

    // The report says so in words.
    let out = bin()
        .arg("tokenize")
        .args([
            s(&input),
            "--out",
            s(&prefix),
            "--group-field",
            "repo",
            "--quiet",
        ])
        .arg("--tokenizer")
        .arg(tok_path)
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let groups_file = millrace::corpus::megatron::with_suffix(&prefix, "groups.npy");
    let line = format!(
        "{} groups in {} (0 sorted runs spilled); {gone} more had only empty or bad rows \
         and are not in it\n",
        kept + 1,
        groups_file.display()
    );
    assert!(text.contains(&line), "{text}");
}

#[test]
fn adversarial_lines_are_bad_with_a_reason_never_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let tok_path = tokenizer();
    let deep = "[".repeat(100_000) + &"]".repeat(100_000);
    // (line, kind, words its detail must contain); every line is bad, one good at the end.
    let cases: Vec<(String, &str, &str)> = vec![
        ("17".into(), "invalid_json", "expected a JSON object"),
        (
            r#""just a string""#.into(),
            "invalid_json",
            "expected a JSON object",
        ),
        (
            "{\"text\": \"a\u{1}b\"}".into(),
            "invalid_json",
            "control character",
        ),
        (
            r#"{"text": "\ud800 tail"}"#.into(),
            "invalid_json",
            "hex escape",
        ),
        (
            r#"{"text": "x", "repo": 1e400}"#.into(),
            "invalid_json",
            "number out of range",
        ),
        (
            format!(r#"{{"text": "x", "repo": {deep}}}"#),
            "wrong_type",
            "\"repo\" is an array",
        ),
        (
            format!(r#"{{"text": "x", "skip": {deep}, "repo": ["#),
            "invalid_json",
            "EOF",
        ),
        (
            r#"{"text": ["a"], "repo": "r"}"#.into(),
            "wrong_type",
            "\"text\" is an array",
        ),
        (
            r#"{"text": {"a": 1}}"#.into(),
            "wrong_type",
            "\"text\" is an object",
        ),
        (
            r#"{"text": true}"#.into(),
            "wrong_type",
            "\"text\" is a boolean",
        ),
        (
            r#"{"text": "x", "repo": [1]}"#.into(),
            "wrong_type",
            "\"repo\" is an array",
        ),
        (
            r#"{"text": "x", "repo": "r", "path": false}"#.into(),
            "wrong_type",
            "\"path\" is a boolean",
        ),
        (
            r#"{"txt": "x"}"#.into(),
            "missing_field",
            "no field \"text\"",
        ),
        // Ids past 64 bits would read as doubles, merging distinct groups.
        (
            r#"{"text": "x", "repo": 123456789012345678901234567890}"#.into(),
            "wrong_type",
            "\"repo\" is a number beyond 64-bit integers",
        ),
        (
            r#"{"text": "x", "repo": "r", "path": -9223372036854775809}"#.into(),
            "wrong_type",
            "\"path\" is a number beyond 64-bit integers",
        ),
        (
            b"{\"text\": \"\xff\"}".iter().map(|&b| b as char).collect(),
            "non_utf8",
            "byte 10",
        ),
    ];
    let mut body: Vec<u8> = Vec::new();
    for (line, _, _) in &cases {
        // The non-UTF-8 case is built from chars; write its bytes back as bytes.
        if line.contains('\u{ff}') {
            body.extend(line.chars().map(|c| c as u32 as u8));
        } else {
            body.extend_from_slice(line.as_bytes());
        }
        body.push(b'\n');
    }
    body.extend_from_slice(br#"{"text": "fine", "repo": "r", "path": 1}"#);
    let input = dir.path().join("adv.jsonl");
    std::fs::write(&input, &body).unwrap();
    let prefix = dir.path().join("adv");
    let mut o = TokenizeOptions::new(vec![input.clone()], tok_path.into(), prefix);
    o.group_field = Some("repo".into());
    o.order_field = Some("path".into());
    let summary = tokenize::tokenize(&o).unwrap();
    assert_eq!(summary.documents, 1);
    assert_eq!(summary.bad.total(), cases.len() as u64);
    let mut all = summary.first_bad.clone();
    // Only the first REPORTED_BAD_LINES are listed; the rest are checked by a second
    // run over the tail of the file.
    let skip = tokenize::REPORTED_BAD_LINES;
    let tail = dir.path().join("tail.jsonl");
    let cut = body
        .iter()
        .enumerate()
        .filter(|(_, &b)| b == b'\n')
        .nth(skip - 1)
        .map(|(i, _)| i + 1)
        .unwrap();
    std::fs::write(&tail, &body[cut..]).unwrap();
    o.inputs = vec![tail];
    o.out = dir.path().join("tail");
    let rest = tokenize::tokenize(&o).unwrap();
    all.extend(rest.first_bad.iter().cloned().map(|mut b| {
        b.line += skip as u64;
        b
    }));
    assert_eq!(all.len(), cases.len());
    for (i, ((_, kind, words), got)) in cases.iter().zip(&all).enumerate() {
        assert_eq!(got.line, i as u64 + 1);
        assert_eq!(got.kind, *kind, "line {}: {}", i + 1, got.detail);
        assert!(
            got.detail.contains(words),
            "line {}: {:?} lacks {words:?}",
            i + 1,
            got.detail
        );
    }
}

// ---------------------------------------------------------------------------------------
// Corpus scale: many runs (--num-shards/--shard-index), many shards (--shard-tokens),
// manifests and --merge.

/// Every document of the shard at `prefix` as token ids (EOS included), with its
/// sidecar group id when there is one.
fn shard_docs(prefix: &Path) -> Vec<(Vec<u32>, Option<u64>)> {
    let shard = Shard::open(prefix, None).unwrap();
    shard.validate().unwrap();
    (0..shard.documents())
        .map(|d| {
            let t = shard.doc_tokens(d).unwrap();
            let ids = (0..t.len()).map(|i| t.get_i64(i).unwrap() as u32).collect();
            (ids, shard.groups().map(|g| g.group_of(d).unwrap()))
        })
        .collect()
}

/// Starts `runs` tokenize processes at once (run i of `runs`), waits for all, and
/// returns their summaries in run order.
fn run_job(tok: &Path, inputs: &[PathBuf], out: &Path, runs: u64, extra: &[&str]) -> Vec<Value> {
    let children: Vec<_> = (0..runs)
        .map(|i| {
            bin()
                .arg("tokenize")
                .args(inputs)
                .arg("--tokenizer")
                .arg(tok)
                .arg("--out")
                .arg(out)
                .args([
                    "--num-shards",
                    &runs.to_string(),
                    "--shard-index",
                    &i.to_string(),
                ])
                .args(extra)
                .args(["--quiet", "--json", "--threads", "2"])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    children
        .into_iter()
        .map(|c| {
            let out = c.wait_with_output().unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success(), "run failed: {err}");
            serde_json::from_slice(&out.stdout).unwrap()
        })
        .collect()
}

/// Repositories of 1-4 files and some loose documents, interleaved, as rows with
/// `repo`/`path` fields; returns the rows and each text's repository.
fn repo_rows(repos: usize) -> (Vec<Value>, HashMap<String, Option<String>>) {
    let mut rng = Rng(0xfeed);
    let mut items = Vec::new();
    for r in 0..repos {
        for f in 0..1 + r % 4 {
            let t = format!("// repo {r} file {f}\n{}", text(&mut rng, 10 + f * 7));
            items.push((Some(format!("org/r{r:03}")), Some(format!("src/{f}.rs")), t));
        }
    }
    for i in 0..9 {
        items.push((None, None, format!("loose {i} {}", text(&mut rng, 6))));
    }
    for i in (1..items.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        items.swap(i, j);
    }
    let group_of = items
        .iter()
        .map(|(g, _, t)| (t.clone(), g.clone()))
        .collect();
    let rows = items
        .into_iter()
        .map(|(g, p, t)| match (g, p) {
            (Some(g), Some(p)) => json!({"text": t, "repo": g, "path": p}),
            _ => json!({"text": t}),
        })
        .collect();
    (rows, group_of)
}

#[test]
fn four_runs_write_the_documents_of_one_run_and_no_group_spans_shards() {
    let dir = tempfile::tempdir().unwrap();
    let tok_path = tokenizer();
    let tok = load(tok_path);
    let eos = tok.token_to_id(EOS).unwrap();
    let (rows, group_of) = repo_rows(80);
    let inputs: Vec<PathBuf> = ["a.jsonl", "b.jsonl.gz", "c.jsonl.zst"]
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let p = dir.path().join(name);
            let part: Vec<Value> = rows.iter().skip(i).step_by(3).cloned().collect();
            write_jsonl(&p, &part);
            p
        })
        .collect();
    let ins: Vec<&str> = inputs.iter().map(|p| s(p)).collect();
    let group = ["--group-field", "repo", "--order-field", "path"];

    // One run, one shard: the reference.
    let one = dir.path().join("one");
    let mut args = ins.clone();
    args.extend(["--out", s(&one)]);
    args.extend(group);
    run_ok(tok_path, &args);
    let mut want: Vec<Vec<u32>> = shard_docs(&one).into_iter().map(|(t, _)| t).collect();

    // Four concurrent runs, shards of ~400 tokens.
    let out = dir.path().join("job");
    let mut extra = group.to_vec();
    extra.extend(["--shard-tokens", "400"]);
    let summaries = run_job(tok_path, &inputs, &out, 4, &extra);
    let mut got = Vec::new();
    let mut shard_of_group: HashMap<String, PathBuf> = HashMap::new();
    let mut left_to_others = 0;
    for (i, summary) in summaries.iter().enumerate() {
        assert_eq!(summary["run"], json!([i, 4]));
        left_to_others += summary["other_runs_documents"].as_u64().unwrap();
        let manifest =
            tokenize::read_manifest(&tokenize::run_manifest_path(&out, i as u64)).unwrap();
        assert_eq!(
            manifest.shards.len(),
            summary["shards"].as_array().unwrap().len()
        );
        for (k, s) in manifest.shards.iter().enumerate() {
            let prefix = tokenize::shard_prefix(&out, i as u64, k);
            assert_eq!(dir.path().join(&s.prefix), prefix);
            // Within a shard, a sidecar id stands for exactly one repository.
            let mut id_to_group: HashMap<u64, Option<String>> = HashMap::new();
            for (ids, id) in shard_docs(&prefix) {
                let text = tok.decode(&ids[..ids.len() - 1], false).unwrap();
                assert_eq!(ids.last(), Some(&eos));
                let g = group_of[&text].clone();
                let id = id.expect("a sidecar");
                assert_eq!(id_to_group.entry(id).or_insert_with(|| g.clone()), &g);
                if let Some(g) = g {
                    let first = shard_of_group.entry(g.clone()).or_insert(prefix.clone());
                    assert_eq!(first, &prefix, "group {g} spans shards");
                }
                got.push(ids);
            }
        }
    }
    assert_eq!(shard_of_group.len(), 80, "every repository was written");
    assert!(
        shard_of_group
            .values()
            .collect::<std::collections::HashSet<_>>()
            .len()
            > 4
    );
    // Each run read every document and kept its share: the others' add up to 3 runs.
    assert_eq!(left_to_others, 3 * want.len() as u64);
    want.sort();
    got.sort();
    assert_eq!(got, want, "the same multiset of documents as one run");

    // What run 2 writes depends on nothing but the inputs and options: one thread and a
    // sort spilled to disk write the same bytes.
    let files = |stem: &str| -> Vec<(String, Vec<u8>)> {
        let names = outputs(dir.path(), stem);
        names
            .into_iter()
            .map(|n| (n.clone(), std::fs::read(dir.path().join(&n)).unwrap()))
            .collect()
    };
    let before = files("job-00002");
    let mut args = ins.clone();
    args.extend(["--out", s(&out), "--num-shards", "4", "--shard-index", "2"]);
    args.extend(group);
    args.extend([
        "--shard-tokens",
        "400",
        "--threads",
        "1",
        "--mem-budget",
        "1",
    ]);
    let again = run_ok(tok_path, &args);
    assert!(again["sort_runs"].as_u64().unwrap() > 1, "{again}");
    assert_eq!(files("job-00002"), before);

    // --merge lists every shard; a config over them plans, checks and inspects.
    let merge = bin()
        .args([
            "tokenize",
            "--merge",
            "--num-shards",
            "4",
            "--json",
            "--out",
        ])
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        merge.status.success(),
        "{}",
        String::from_utf8_lossy(&merge.stderr)
    );
    let merged: tokenize::Manifest = serde_json::from_slice(&merge.stdout).unwrap();
    assert_eq!(merged.documents, want.len() as u64);
    assert_eq!(
        merged,
        tokenize::read_manifest(&dir.path().join("job.manifest.json")).unwrap()
    );
    let shards: Vec<String> = merged
        .shards
        .iter()
        .map(|s| format!("{:?}", s.prefix.display().to_string()))
        .collect();
    let cfg = dir.path().join("millrace.toml");
    let socket = dir.path().join("d.sock");
    std::fs::write(
        &cfg,
        format!(
            "[corpus]\n[[corpus.domain]]\nname = \"code\"\nshards = [{}]\n\n[plan]\nseed = 1\n\
             seq_len = 64\nglobal_batch_rows = 4\npacking = \"best_fit\"\neod_token = {eos}\n\
             pad_token = 0\n\n[[plan.schedule]]\nstep = 0\nweights = {{ code = 1.0 }}\n\n\
             [serve]\n{}",
            shards.join(", "),
            common::serve_toml(&socket, 8, 1)
        ),
    )
    .unwrap();
    for args in [
        vec!["plan", "--steps", "3", "--config", s(&cfg)],
        vec!["check-config", "--config", s(&cfg)],
        vec!["inspect", "--json", "--config", s(&cfg)],
    ] {
        let o = bin().args(&args).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{args:?}: {err}");
        assert!(!err.contains("warning"), "{args:?}: {err}");
    }
    // ... and serves: a trainer rank reads three steps of 4 rows of 64 tokens.
    let _serve = common::Serve::start(&cfg, &socket, &dir.path().join("serve.log"));
    let o = bin()
        .args([
            "consume",
            "--socket",
            s(&socket),
            "--dp-rank",
            "0",
            "--dp-size",
            "1",
        ])
        .args(["--steps", "3", "--json"])
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "consume: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["steps"], 3);
    assert_eq!(v["tokens"], 3 * 4 * 64);
}

#[test]
fn ungrouped_runs_split_the_files_and_reruns_replace_their_share() {
    let dir = tempfile::tempdir().unwrap();
    let tok_path = tokenizer();
    let mut rng = Rng(99);
    let inputs: Vec<PathBuf> = (0..5)
        .map(|f| {
            let p = dir.path().join(format!("part-{f}.jsonl"));
            let rows: Vec<Value> = (0..30)
                .map(|i| json!({"text": format!("{f}/{i} {}", text(&mut rng, 12))}))
                .collect();
            write_jsonl(&p, &rows);
            p
        })
        .collect();
    let ins: Vec<&str> = inputs.iter().map(|p| s(p)).collect();
    let one = dir.path().join("one");
    let mut args = ins.clone();
    args.extend(["--out", s(&one)]);
    run_ok(tok_path, &args);
    let mut want: Vec<Vec<u32>> = shard_docs(&one).into_iter().map(|(t, _)| t).collect();

    let out = dir.path().join("web");
    let summaries = run_job(tok_path, &inputs, &out, 4, &["--shard-tokens", "500"]);
    let mut got = Vec::new();
    for (i, summary) in summaries.iter().enumerate() {
        // Run i reads files i, i+4, ...: run 0 two files, the others one.
        assert_eq!(summary["files"], if i == 0 { 2 } else { 1 });
        assert_eq!(summary["other_runs_documents"], 0);
        for s in summary["shards"].as_array().unwrap() {
            let prefix = PathBuf::from(s["prefix"].as_str().unwrap());
            let docs = shard_docs(&prefix);
            assert_eq!(docs.len() as u64, s["documents"].as_u64().unwrap());
            got.extend(docs.into_iter().map(|(t, _)| t));
        }
    }
    assert!(summaries[0]["shards"].as_array().unwrap().len() > 1);
    want.sort();
    got.sort();
    assert_eq!(got, want);

    // A rerun of run 1 (other threads) writes the same bytes and removes what it wrote
    // before that it no longer writes.
    let before: Vec<(String, Vec<u8>)> = outputs(dir.path(), "web-00001")
        .into_iter()
        .map(|n| (n.clone(), std::fs::read(dir.path().join(&n)).unwrap()))
        .collect();
    let stale = dir.path().join("web-00001-00099.idx");
    std::fs::write(&stale, b"old").unwrap();
    let mut args = ins.clone();
    args.extend(["--out", s(&out), "--num-shards", "4", "--shard-index", "1"]);
    args.extend(["--shard-tokens", "500", "--threads", "1"]);
    run_ok(tok_path, &args);
    let after: Vec<(String, Vec<u8>)> = outputs(dir.path(), "web-00001")
        .into_iter()
        .map(|n| (n.clone(), std::fs::read(dir.path().join(&n)).unwrap()))
        .collect();
    assert_eq!(before, after);

    // More runs than files: a run with nothing to do succeeds with an empty manifest.
    let mut args = ins.clone();
    args.extend(["--out", s(&out), "--num-shards", "8", "--shard-index", "6"]);
    let idle = run_ok(tok_path, &args);
    assert_eq!(idle["documents"], 0);
    assert_eq!(idle["shards"], json!([]));
}

#[test]
fn merge_refuses_unfinished_or_mismatched_runs_and_bad_shares_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let tok_path = tokenizer();
    let input = dir.path().join("in.jsonl");
    let mut rng = Rng(5);
    let rows: Vec<Value> = (0..20)
        .map(|_| json!({"text": text(&mut rng, 9)}))
        .collect();
    write_jsonl(&input, &rows);
    let out = dir.path().join("job");
    let merge = |runs: &str| {
        let o = bin()
            .args(["tokenize", "--merge", "--num-shards", runs, "--out"])
            .arg(&out)
            .output()
            .unwrap();
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    let job = |i: &str, extra: &[&str]| {
        let mut a = vec![
            s(&input),
            "--out",
            s(&out),
            "--num-shards",
            "2",
            "--shard-index",
            i,
        ];
        a.extend(extra);
        run(tok_path, &a)
    };
    assert!(job("0", &[]).status.success());
    let (ok, err) = merge("2");
    assert!(!ok);
    assert!(
        err.contains("job-00001.manifest.json") && err.contains("run 1 of 2 has not finished"),
        "{err}"
    );
    // Run 1 with another dtype: not the same job.
    assert!(job("1", &["--dtype", "int32"]).status.success());
    let (ok, err) = merge("2");
    assert!(!ok);
    assert!(
        err.contains("dtype is int32") && err.contains("job-00000.manifest.json"),
        "{err}"
    );
    // Run 1 with another --max-line-bytes: it would keep other lines as documents.
    assert!(job("1", &["--max-line-bytes", "4096"]).status.success());
    let (ok, err) = merge("2");
    assert!(!ok);
    assert!(
        err.contains("max_line_bytes is 4096") && err.contains("job-00000.manifest.json"),
        "{err}"
    );
    assert!(job("1", &[]).status.success());
    let (ok, err) = merge("2");
    assert!(ok, "{err}");
    let text = bin()
        .args(["tokenize", "--merge", "--num-shards", "2", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    // One input file: run 1 of 2 has none, and writes no shard.
    let entry = format!(
        "name = \"job\"\nshards = [{:?}]\n",
        s(&out.with_file_name("job-00000-00000"))
    );
    assert!(text.contains(&entry), "{text}");
    // A manifest from a job of another size does not merge as this one.
    let (ok, err) = merge("3");
    assert!(!ok && err.contains("expected run 0 of 3"), "{err}");
    assert!(
        err.contains("written by run 0 of 2") && !err.contains("Some("),
        "{err}"
    );

    let bad = job("2", &[]);
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        err.contains("--shard-index 2 is not one of the --num-shards 2 runs"),
        "{err}"
    );
    let zero = job("0", &["--shard-tokens", "0"]);
    assert!(String::from_utf8_lossy(&zero.stderr).contains("--shard-tokens 0"));

    // A run that fails after finishing some shards leaves none of them, and no manifest:
    // 20 good rows cut into 50-token shards, then a bad line past --max-bad 0. (A job of
    // one run: run 1 of the job of two is removed first, which it would refuse.)
    for name in outputs(dir.path(), "job-00001") {
        std::fs::remove_file(dir.path().join(name)).unwrap();
    }
    let tail = dir.path().join("tail.jsonl");
    std::fs::write(&tail, b"{not json\n").unwrap();
    assert!(!outputs(dir.path(), "job-00000").is_empty());
    let mut a = vec![
        s(&input),
        s(&tail),
        "--out",
        s(&out),
        "--shard-tokens",
        "50",
    ];
    a.extend(["--max-bad", "0", "--threads", "1"]);
    let failed = run(tok_path, &a);
    assert!(!failed.status.success());
    assert!(String::from_utf8_lossy(&failed.stderr).contains("more than --max-bad 0"));
    assert_eq!(outputs(dir.path(), "job-00000"), Vec::<String>::new());
}

/// Regression: `--merge` compared only the number of inputs, so runs given the same
/// files in another order (a glob expanded otherwise on another node) merged, though
/// file j belongs to run j mod N: one file was tokenized twice and the other never.
/// Each manifest now records a digest of the ordered list (paths as given, sizes), and
/// a manifest without one (from an older millrace) is refused, not trusted.
#[test]
fn merge_refuses_runs_given_other_input_lists() {
    let dir = tempfile::tempdir().unwrap();
    let tok_path = tokenizer();
    let p: Vec<PathBuf> = (1..=2)
        .map(|n| {
            let path = dir.path().join(format!("p{n}.jsonl"));
            let rows: Vec<Value> = (0..10)
                .map(|i| json!({"text": format!("file {n} doc {i}")}))
                .collect();
            write_jsonl(&path, &rows);
            path
        })
        .collect();
    let out = dir.path().join("a");
    let job = |i: &str, inputs: [&Path; 2]| {
        let args = [
            s(inputs[0]),
            s(inputs[1]),
            "--out",
            s(&out),
            "--num-shards",
            "2",
            "--shard-index",
            i,
        ];
        run_ok(tok_path, &args)
    };
    let merge = || {
        let o = bin()
            .args(["tokenize", "--merge", "--num-shards", "2", "--out"])
            .arg(&out)
            .output()
            .unwrap();
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    job("0", [&p[0], &p[1]]);
    job("1", [&p[1], &p[0]]);
    let (ok, err) = merge();
    assert!(!ok, "runs given p1 p2 and p2 p1 merged");
    assert!(
        err.contains("a-00001.manifest.json: run 1's inputs_xxh3 is")
            && err.contains("but run 0's (")
            && err.contains("a-00000.manifest.json")
            && err.contains("other input lists"),
        "{err}"
    );
    assert!(!dir.path().join("a.manifest.json").exists());
    // The same list: merges.
    job("1", [&p[0], &p[1]]);
    let (ok, err) = merge();
    assert!(ok, "{err}");
    let merged = tokenize::read_manifest(&dir.path().join("a.manifest.json")).unwrap();
    assert_eq!(merged.documents, 20);
    let digest = merged.inputs_xxh3.clone().unwrap();
    assert_eq!(digest.len(), 16);
    // A file that changed size between the runs is another list too.
    std::fs::OpenOptions::new()
        .append(true)
        .open(&p[1])
        .unwrap()
        .write_all(b"{\"text\": \"late\"}\n")
        .unwrap();
    job("1", [&p[0], &p[1]]);
    let (ok, err) = merge();
    assert!(!ok && err.contains("inputs_xxh3"), "{err}");
    job("0", [&p[0], &p[1]]);
    let (ok, err) = merge();
    assert!(ok, "{err}");

    // A manifest without the digest (an older millrace's) is refused, naming it.
    let manifest = dir.path().join("a-00001.manifest.json");
    let mut old: Value = serde_json::from_slice(&std::fs::read(&manifest).unwrap()).unwrap();
    old.as_object_mut().unwrap().remove("inputs_xxh3");
    std::fs::write(&manifest, serde_json::to_vec_pretty(&old).unwrap()).unwrap();
    let (ok, err) = merge();
    assert!(!ok, "a manifest without inputs_xxh3 merged");
    assert!(
        err.contains("a-00001.manifest.json: run 1 records no digest of its input list")
            && err.contains("refused"),
        "{err}"
    );
}

/// Regression: a prefix re-tokenized by a job of fewer runs into the same `--out` merged
/// as "5 runs, 5 shards" while runs 5 and 6 of the earlier 7-run job stayed, and a config
/// naming the directory served their documents too (duplicates). `--merge` now refuses
/// any file of the prefix that is not of the job (runs outside it, shards no manifest
/// lists, a single-shard output), naming them; a run of a job refuses to start beside
/// runs at or past its --num-shards, or a single shard, removing nothing of them.
#[test]
fn merge_and_runs_refuse_outputs_of_an_earlier_job_of_more_runs() {
    let dir = tempfile::tempdir().unwrap();
    let tok_path = tokenizer();
    let inputs: Vec<PathBuf> = (0..7)
        .map(|f| {
            let p = dir.path().join(format!("f{f}.jsonl"));
            let rows: Vec<Value> = (0..3)
                .map(|i| json!({"text": format!("file {f} doc {i}")}))
                .collect();
            write_jsonl(&p, &rows);
            p
        })
        .collect();
    let out_dir = dir.path().join("out");
    let out = out_dir.join("m");
    run_job(tok_path, &inputs, &out, 7, &[]);
    let merge = |runs: &str| {
        let o = bin()
            .args(["tokenize", "--merge", "--num-shards", runs, "--out"])
            .arg(&out)
            .output()
            .unwrap();
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    let (ok, err) = merge("7");
    assert!(ok, "{err}");
    let old = outputs(&out_dir, "m-00006");
    assert_eq!(
        old,
        [
            "m-00006-00000.bin",
            "m-00006-00000.idx",
            "m-00006.manifest.json"
        ]
    );

    // Runs of a 5-run job refuse to start beside runs 5 and 6 of the 7-run one.
    let mut args: Vec<&str> = inputs.iter().map(|p| s(p)).collect();
    args.extend(["--out", s(&out), "--num-shards", "5", "--shard-index", "0"]);
    let r = run(tok_path, &args);
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(
        !r.status.success(),
        "a run of 5 started beside runs 5 and 6 of 7"
    );
    assert!(
        err.contains("holds 6 files of this --out that are not of this job of 5 runs")
            && err.contains("m-00005.manifest.json (run 5 of 7)")
            && err.contains("m-00006-00000.idx")
            && err.contains("remove them, then start the run again"),
        "{err}"
    );
    assert_eq!(outputs(&out_dir, "m-00006"), old, "it removed nothing");
    assert!(out_dir.join("m-00000-00000.idx").exists());

    // The reviewer's sequence: the 5 runs written anyway (the leftovers hidden from
    // them, then put back), and --merge with 5 refuses, naming runs 5 and 6.
    let aside = dir.path().join("aside");
    std::fs::create_dir(&aside).unwrap();
    let leftovers: Vec<String> = ["m-00005", "m-00006"]
        .iter()
        .flat_map(|r| outputs(&out_dir, r))
        .collect();
    for n in &leftovers {
        std::fs::rename(out_dir.join(n), aside.join(n)).unwrap();
    }
    run_job(tok_path, &inputs, &out, 5, &[]);
    for n in &leftovers {
        std::fs::rename(aside.join(n), out_dir.join(n)).unwrap();
    }
    let (ok, err) = merge("5");
    assert!(!ok, "merged 5 runs beside runs 5 and 6 of 7");
    assert!(
        err.contains("holds 6 files of this --out that are not of this job of 5 runs")
            && err.contains("m-00005-00000.bin")
            && err.contains("m-00006.manifest.json (run 6 of 7)")
            && err.contains("remove them, then merge again"),
        "{err}"
    );
    // Removed: it merges, 5 runs of the 7 files.
    for n in &leftovers {
        std::fs::remove_file(out_dir.join(n)).unwrap();
    }
    let (ok, err) = merge("5");
    assert!(ok, "{err}");
    let merged = tokenize::read_manifest(&out_dir.join("m.manifest.json")).unwrap();
    assert_eq!((merged.runs, merged.documents), (5, 21));

    // A shard of a run inside the job that its manifest does not list, and a
    // single-shard output of the prefix: refused by --merge, named.
    let stray = out_dir.join("m-00002-00007.idx");
    std::fs::copy(out_dir.join("m-00002-00000.idx"), &stray).unwrap();
    let (ok, err) = merge("5");
    assert!(
        !ok && err.contains("holds 1 file of this --out that is not of this job")
            && err.contains("m-00002-00007.idx"),
        "{err}"
    );
    std::fs::remove_file(&stray).unwrap();
    run_ok(tok_path, &[s(&inputs[0]), "--out", s(&out)]);
    let (ok, err) = merge("5");
    assert!(
        !ok && err.contains("m.bin (a single-shard output)") && err.contains("m.idx"),
        "{err}"
    );
    // Other prefixes in the directory are not this job's business.
    for n in ["m.bin", "m.idx"] {
        std::fs::remove_file(out_dir.join(n)).unwrap();
    }
    std::fs::write(out_dir.join("m-x-00009-00000.idx"), b"x").unwrap();
    std::fs::write(out_dir.join("mm-00009-00000.idx"), b"x").unwrap();
    let (ok, err) = merge("5");
    assert!(ok, "{err}");
}

/// Regression: an unsharded grouped run renames its sidecar into place before the shard's
/// `.idx` is written; when that failed, `<out>.groups.npy` was left behind (and a shard
/// that failed the re-check after its renames stayed whole), though a failed run must
/// leave nothing. Here the `.idx` cannot be written: its temporary name is a directory.
#[test]
fn a_single_shard_run_that_fails_after_renaming_its_sidecar_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let tok_path = tokenizer();
    let input = dir.path().join("in.jsonl");
    let rows: Vec<Value> = (0..6)
        .map(|i| json!({"text": format!("document {i}"), "repo": format!("r{}", i % 2)}))
        .collect();
    write_jsonl(&input, &rows);
    let out_dir = dir.path().join("out");
    let prefix = out_dir.join("web");
    run_ok(
        tok_path,
        &[s(&input), "--out", s(&prefix), "--group-field", "repo"],
    );
    assert_eq!(
        outputs(&out_dir, "web"),
        ["web.bin", "web.groups.npy", "web.idx"]
    );

    std::fs::create_dir(out_dir.join("web.idx.tmp")).unwrap();
    for grouped in [true, false] {
        let mut args = vec![s(&input), "--out", s(&prefix)];
        if grouped {
            args.extend(["--group-field", "repo"]);
        }
        let failed = run(tok_path, &args);
        let err = String::from_utf8_lossy(&failed.stderr);
        assert!(!failed.status.success(), "grouped {grouped}: {err}");
        assert!(err.contains("web.idx.tmp"), "{err}");
        assert_eq!(
            outputs(&out_dir, "web"),
            ["web.idx.tmp"],
            "grouped {grouped}: nothing of the failed run (or the old one) is left"
        );
    }
    std::fs::remove_dir(out_dir.join("web.idx.tmp")).unwrap();
    let summary = run_ok(
        tok_path,
        &[s(&input), "--out", s(&prefix), "--group-field", "repo"],
    );
    assert_eq!(summary["documents"], 6);
    assert_eq!(summary["groups"], 2);
    assert_eq!(shard_docs(&prefix).len(), 6);
}

/// Regression: `--merge` added the runs' document and token counts as the manifests gave
/// them (wrapping on forged values) and never held them against the shards listed.
#[test]
fn merge_refuses_manifest_counts_that_disagree_with_the_shards() {
    let dir = tempfile::tempdir().unwrap();
    let tok_path = tokenizer();
    let mut rng = Rng(17);
    let inputs: Vec<PathBuf> = (0..2)
        .map(|f| {
            let p = dir.path().join(format!("part-{f}.jsonl"));
            let rows: Vec<Value> = (0..12)
                .map(|_| json!({"text": text(&mut rng, 8)}))
                .collect();
            write_jsonl(&p, &rows);
            p
        })
        .collect();
    let out = dir.path().join("job");
    let summaries = run_job(tok_path, &inputs, &out, 2, &[]);
    let total: u64 = summaries
        .iter()
        .map(|m| m["documents"].as_u64().unwrap())
        .sum();
    assert_eq!(total, 24);
    let merge = || {
        let o = bin()
            .args(["tokenize", "--merge", "--num-shards", "2", "--out"])
            .arg(&out)
            .output()
            .unwrap();
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    let (ok, err) = merge();
    assert!(ok, "{err}");
    let merged: Value =
        serde_json::from_slice(&std::fs::read(common::with(&out, "manifest.json")).unwrap())
            .unwrap();
    assert_eq!(merged["documents"], 24);

    let manifest = dir.path().join("job-00001.manifest.json");
    let good: Value = serde_json::from_slice(&std::fs::read(&manifest).unwrap()).unwrap();
    let forge = |edit: &dyn Fn(&mut Value)| {
        let mut m = good.clone();
        edit(&mut m);
        std::fs::write(&manifest, serde_json::to_vec_pretty(&m).unwrap()).unwrap();
        merge()
    };
    // A total that wraps the sum of the runs to a small number.
    let wrap = u64::MAX - 11;
    let (ok, err) = forge(&|m| m["documents"] = json!(wrap));
    assert!(!ok, "a forged total merged");
    assert!(
        err.contains("job-00001.manifest.json")
            && err.contains(&format!("says {wrap} documents"))
            && err.contains("its 1 shards hold 12"),
        "{err}"
    );
    // A shard entry (and the total) that disagree with the shard itself.
    let (ok, err) = forge(&|m| {
        m["shards"][0]["tokens"] = json!(m["shards"][0]["tokens"].as_u64().unwrap() + 1);
        m["tokens"] = json!(m["tokens"].as_u64().unwrap() + 1);
    });
    assert!(!ok, "a forged shard entry merged");
    assert!(
        err.contains("job-00001.manifest.json")
            && err.contains("lists shard job-00001-00000 with 12 documents"),
        "{err}"
    );
    std::fs::write(&manifest, serde_json::to_vec_pretty(&good).unwrap()).unwrap();
    let (ok, err) = merge();
    assert!(ok, "{err}");
}
