//! The corpus readers against files written by the independent test writer in
//! `tests/common`: exact round trips for every dtype, one test per validation error
//! (each checking that the message names the file and the precise place at fault),
//! raw arrays and their boundary cache, `resolve`, a corruption sweep that must never
//! panic, and the `inspect` command line.

mod common;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use common::{
    build, dtype_of, value_range, with, write, write_docs, write_groups, write_npy, Code, Doc,
    Index, CODES,
};
use millrace::corpus::{
    resolve, CorpusError, DType, Format, Groups, MegatronShard, MegatronWriter, RawOptions,
    RawShard, Shard, Tokens,
};

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

const U16: Code = CODES[7];

fn values(t: &Tokens<'_>) -> Vec<i64> {
    (0..t.len()).map(|i| t.get_i64(i).unwrap()).collect()
}

fn flat(doc: &Doc) -> Vec<i64> {
    doc.iter().flatten().copied().collect()
}

fn expect_err<T: std::fmt::Debug>(r: Result<T, CorpusError>, what: &str) -> CorpusError {
    match r {
        Ok(v) => panic!("{what}: expected an error, got Ok({v:?})"),
        Err(e) => e,
    }
}

/// Asserts `e` is `Invalid` about `file` and that its message names the file and
/// contains every one of `details`.
#[track_caller]
fn assert_invalid(e: &CorpusError, file: &Path, details: &[&str]) {
    let msg = e.to_string();
    match e {
        CorpusError::Invalid { path, .. } => {
            assert_eq!(path, file, "error is about the wrong file: {msg}")
        }
        other => panic!("expected Invalid about {}, got {other:?}", file.display()),
    }
    assert!(
        msg.contains(&file.display().to_string()),
        "message does not name {}: {msg}",
        file.display()
    );
    for d in details {
        assert!(msg.contains(d), "message lacks {d:?}: {msg}");
    }
}

/// A uint16 shard with sentence splitting: 4 documents, 5 sequences, 11 tokens.
///
/// ```text
/// seq  doc  len  ptr   length at  pointer at
/// 0    0    3    0     34         54
/// 1    1    2    6     38         62
/// 2    1    3    10    42         70
/// 3    2    2    16    46         78
/// 4    3    1    20    50         86
/// document_indices [0, 1, 3, 4, 5] at 94, 102, 110, 118, 126; .idx is 134 bytes,
/// .bin 22 bytes.
/// ```
fn fixture_docs() -> Vec<Doc> {
    vec![
        vec![vec![1, 2, 3]],
        vec![vec![4, 5], vec![6, 7, 8]],
        vec![vec![9, 10]],
        vec![vec![11]],
    ]
}
const FIX_LENGTHS_AT: usize = 34;
const FIX_POINTERS_AT: usize = 54;
const FIX_DOC_INDEX_AT: usize = 94;
const FIX_IDX_LEN: usize = 134;
const FIX_BIN_LEN: usize = 22;

fn fixture() -> (Index, Vec<u8>) {
    let (index, bin) = build(U16, &fixture_docs());
    assert_eq!(index.bytes().len(), FIX_IDX_LEN);
    assert_eq!(bin.len(), FIX_BIN_LEN);
    (index, bin)
}

/// Writes (possibly corrupted) parts under `dir/name` and returns the prefix.
fn put(dir: &Path, name: &str, index: &Index, bin: &[u8]) -> PathBuf {
    let prefix = dir.join(name);
    write(&prefix, index, bin);
    prefix
}

fn open_err(prefix: &Path) -> CorpusError {
    expect_err(Shard::open(prefix, None), &prefix.display().to_string())
}

fn raw_opts(dtype: DType, eos: u64, cache_dir: Option<&Path>) -> RawOptions {
    RawOptions {
        dtype,
        eos,
        cache_dir: cache_dir.map(Path::to_path_buf),
    }
}

fn write_u16(path: &Path, tokens: &[u16]) {
    let b: Vec<u8> = tokens.iter().flat_map(|t| t.to_le_bytes()).collect();
    std::fs::write(path, b).unwrap();
}

fn write_u32(path: &Path, tokens: &[u32]) {
    let b: Vec<u8> = tokens.iter().flat_map(|t| t.to_le_bytes()).collect();
    std::fs::write(path, b).unwrap();
}

/// Every document of a raw shard, as values.
fn raw_docs(r: &RawShard) -> Vec<Vec<i64>> {
    (0..r.documents())
        .map(|d| values(&r.doc_tokens(d).unwrap()))
        .collect()
}

fn mtime(path: &Path) -> SystemTime {
    std::fs::metadata(path).unwrap().modified().unwrap()
}

// ---------------------------------------------------------------------------------------
// Megatron round trips
// ---------------------------------------------------------------------------------------

#[test]
fn megatron_round_trip_every_dtype_code() {
    let dir = tempfile::tempdir().unwrap();
    for code in CODES {
        let (lo, hi) = value_range(code.code);
        let docs: Vec<Doc> = vec![
            // Extremes of the dtype, one sequence.
            vec![vec![lo, hi, 0, 1]],
            // Sentence-split, with an empty sentence in the middle.
            vec![vec![1, 2], vec![], vec![3, 4, 5]],
            // No sequences at all.
            vec![],
            // One sequence of zero tokens.
            vec![vec![]],
            vec![vec![hi - 1, lo + 1], vec![7]],
        ];
        let name = format!("code{}", code.code);
        let prefix = write_docs(dir.path(), &name, code, &docs);
        let shard = Shard::open(&prefix, None).unwrap();
        shard.validate().unwrap();
        let dtype = dtype_of(code.code);
        assert_eq!(shard.dtype(), dtype, "{name}");
        assert_eq!(shard.format(), Format::Megatron);
        assert_eq!(shard.path(), prefix.as_path());
        assert_eq!(shard.documents(), 5, "{name}");
        assert_eq!(shard.sequences(), 1 + 3 + 1 + 2, "{name}");
        assert_eq!(shard.tokens(), 12, "{name}"); // 4 + 5 + 0 + 0 + 3
        assert_eq!(shard.data_bytes(), 12 * code.size as u64, "{name}");
        assert!(shard.groups().is_none());
        for (d, doc) in docs.iter().enumerate() {
            let d = d as u64;
            let want = flat(doc);
            assert_eq!(
                shard.doc_len(d).unwrap(),
                want.len() as u64,
                "{name} doc {d}"
            );
            let t = shard.doc_tokens(d).unwrap();
            assert_eq!(t.dtype(), dtype, "{name} doc {d}");
            assert_eq!(t.len(), want.len(), "{name} doc {d}");
            assert_eq!(t.is_empty(), want.is_empty(), "{name} doc {d}");
            assert_eq!(values(&t), want, "{name} doc {d}");
            assert_eq!(
                t.as_bytes(),
                common::encode(code.code, &want).as_slice(),
                "{name} doc {d}"
            );
        }
        // The reader on its own agrees with the dispatching `Shard`.
        let direct = MegatronShard::open(&prefix).unwrap();
        direct.validate().unwrap();
        assert_eq!(direct.prefix(), prefix.as_path());
        assert_eq!(direct.dtype(), dtype);
        assert_eq!(direct.bin_len(), shard.data_bytes());
        assert_eq!(direct.idx_bytes(), build(code, &docs).0.bytes().as_slice());
        for d in 0..5 {
            assert_eq!(direct.doc_tokens(d).unwrap(), shard.doc_tokens(d).unwrap());
        }
        // Sequence-level view.
        let m = shard.as_megatron().unwrap();
        let lens: Vec<i32> = (0..m.sequences()).map(|i| m.sequence_length(i)).collect();
        assert_eq!(lens, vec![4, 2, 0, 3, 0, 2, 1], "{name}");
        let di: Vec<i64> = (0..=m.documents()).map(|i| m.doc_index(i)).collect();
        assert_eq!(di, vec![0, 1, 4, 4, 5, 7], "{name}");
        assert_eq!(m.idx_path(), with(&prefix, "idx"));
        assert_eq!(m.bin_path(), with(&prefix, "bin"));
        assert!(shard.as_raw().is_none());
    }
}

#[test]
fn megatron_typed_variants_hold_the_stored_values() {
    let dir = tempfile::tempdir().unwrap();
    let p = write_docs(dir.path(), "u16", CODES[7], &[vec![vec![0, 65535, 513]]]);
    let s = Shard::open(&p, None).unwrap();
    match s.doc_tokens(0).unwrap() {
        Tokens::Uint16(v) => assert_eq!(v, &[0u16, 65535, 513]),
        other => panic!("expected uint16 tokens, got {other:?}"),
    }
    let p = write_docs(dir.path(), "i8", CODES[1], &[vec![vec![-128, 127, -1]]]);
    let s = Shard::open(&p, None).unwrap();
    match s.doc_tokens(0).unwrap() {
        Tokens::Int8(v) => assert_eq!(v, &[-128i8, 127, -1]),
        other => panic!("expected int8 tokens, got {other:?}"),
    }
    let p = write_docs(dir.path(), "f32", CODES[6], &[vec![vec![-3, 16777216]]]);
    let s = Shard::open(&p, None).unwrap();
    match s.doc_tokens(0).unwrap() {
        Tokens::Float32(v) => assert_eq!(v, &[-3.0f32, 16777216.0]),
        other => panic!("expected float32 tokens, got {other:?}"),
    }
    let p = write_docs(
        dir.path(),
        "i64",
        CODES[4],
        &[vec![vec![i64::MIN, i64::MAX]]],
    );
    let s = Shard::open(&p, None).unwrap();
    match s.doc_tokens(0).unwrap() {
        Tokens::Int64(v) => assert_eq!(v, &[i64::MIN, i64::MAX]),
        other => panic!("expected int64 tokens, got {other:?}"),
    }
}

#[test]
fn megatron_multimodal_mode_bytes_are_accepted() {
    // megatron-core appends one i8 mode per sequence for multimodal builds.
    let dir = tempfile::tempdir().unwrap();
    let (index, bin) = fixture();
    let prefix = put(dir.path(), "mm", &index, &bin);
    let mut idx = index.bytes();
    idx.extend_from_slice(&[0, 1, 0, 1, 0]);
    std::fs::write(with(&prefix, "idx"), idx).unwrap();
    let s = Shard::open(&prefix, None).unwrap();
    s.validate().unwrap();
    assert_eq!(values(&s.doc_tokens(1).unwrap()), vec![4, 5, 6, 7, 8]);
}

#[test]
fn megatron_writer_matches_the_independent_writer() {
    let dir = tempfile::tempdir().unwrap();
    let docs: Vec<Doc> = vec![vec![vec![5, 6, 7]], vec![vec![]], vec![vec![65535]]];
    let theirs = write_docs(dir.path(), "theirs", U16, &docs);
    let ours = dir.path().join("ours");
    let mut w = MegatronWriter::create(&ours, DType::Uint16).unwrap();
    for d in &docs {
        w.add_document_bytes(&common::encode(8, &flat(d))).unwrap();
    }
    assert_eq!(w.documents(), 3);
    assert_eq!(w.finish().unwrap(), ours);
    for ext in ["idx", "bin"] {
        assert_eq!(
            std::fs::read(with(&ours, ext)).unwrap(),
            std::fs::read(with(&theirs, ext)).unwrap(),
            ".{ext} differs"
        );
    }
    assert!(!with(&ours, "bin.tmp").exists());
    assert!(!with(&ours, "idx.tmp").exists());
}

#[test]
fn doc_index_out_of_range() {
    let dir = tempfile::tempdir().unwrap();
    let (index, bin) = fixture();
    let prefix = put(dir.path(), "s", &index, &bin);
    let s = Shard::open(&prefix, None).unwrap();
    for doc in [4, 5, u64::MAX] {
        let e = expect_err(s.doc_tokens(doc), "doc_tokens");
        match &e {
            CorpusError::DocOutOfRange {
                path,
                doc: d,
                count,
            } => {
                assert_eq!((path.as_path(), *d, *count), (prefix.as_path(), doc, 4));
            }
            other => panic!("expected DocOutOfRange, got {other:?}"),
        }
        let msg = e.to_string();
        assert!(msg.contains(&prefix.display().to_string()), "{msg}");
        assert!(
            msg.contains(&format!(
                "document {doc} out of range (the shard has 4 documents)"
            )),
            "{msg}"
        );
        assert!(matches!(
            s.doc_len(doc),
            Err(CorpusError::DocOutOfRange { count: 4, .. })
        ));
    }
}

// ---------------------------------------------------------------------------------------
// Megatron validation errors: header and sizes (caught by open)
// ---------------------------------------------------------------------------------------

#[test]
fn error_wrong_magic() {
    let dir = tempfile::tempdir().unwrap();
    let (mut index, bin) = fixture();
    index.magic = b"NOTANIDX!".to_vec();
    let p = put(dir.path(), "s", &index, &bin);
    assert_invalid(
        &open_err(&p),
        &with(&p, "idx"),
        &["bad magic at byte 0", "NOTANIDX!", "not a Megatron index"],
    );
    // A file shorter than the header that is not an index at all says so too.
    std::fs::write(with(&p, "idx"), b"hello").unwrap();
    assert_invalid(
        &open_err(&p),
        &with(&p, "idx"),
        &["bad magic at byte 0", "hello"],
    );
}

#[test]
fn error_unsupported_version() {
    let dir = tempfile::tempdir().unwrap();
    let (mut index, bin) = fixture();
    index.version = 2;
    let p = put(dir.path(), "s", &index, &bin);
    assert_invalid(
        &open_err(&p),
        &with(&p, "idx"),
        &["unsupported index version 2 at byte 9"],
    );
}

#[test]
fn error_unsupported_dtype_code() {
    let dir = tempfile::tempdir().unwrap();
    for code in [0u8, 9, 255] {
        let (mut index, bin) = fixture();
        index.code = code;
        let p = put(dir.path(), &format!("c{code}"), &index, &bin);
        assert_invalid(
            &open_err(&p),
            &with(&p, "idx"),
            &[&format!("unsupported dtype code {code} at byte 17")],
        );
    }
}

#[test]
fn error_idx_truncated_in_the_header() {
    let dir = tempfile::tempdir().unwrap();
    let (index, bin) = fixture();
    let p = put(dir.path(), "s", &index, &bin);
    let full = index.bytes();
    for len in [9usize, 17, 20, 33] {
        std::fs::write(with(&p, "idx"), &full[..len]).unwrap();
        assert_invalid(
            &open_err(&p),
            &with(&p, "idx"),
            &[&format!(
                "truncated index: {len} bytes, shorter than the 34-byte header"
            )],
        );
    }
    std::fs::write(with(&p, "idx"), b"").unwrap();
    assert_invalid(
        &open_err(&p),
        &with(&p, "idx"),
        &["truncated index", "empty (0 bytes)"],
    );
}

#[test]
fn error_idx_truncated_inside_the_arrays() {
    let dir = tempfile::tempdir().unwrap();
    let (index, bin) = fixture();
    let p = put(dir.path(), "s", &index, &bin);
    let full = index.bytes();
    // In the lengths, the pointers and the document indices.
    for len in [
        34usize,
        40,
        FIX_POINTERS_AT + 3,
        FIX_DOC_INDEX_AT + 8,
        FIX_IDX_LEN - 1,
    ] {
        std::fs::write(with(&p, "idx"), &full[..len]).unwrap();
        assert_invalid(
            &open_err(&p),
            &with(&p, "idx"),
            &[&format!(
                "truncated index: {len} bytes, but the header's 5 sequences and 5 document \
                 boundaries need {FIX_IDX_LEN} bytes"
            )],
        );
    }
    // A header whose counts are absurd is a truncation, not an overflow.
    let mut huge = index.clone();
    huge.seq_count_override = Some(u64::MAX);
    huge.doc_count_override = Some(u64::MAX);
    std::fs::write(with(&p, "idx"), huge.bytes()).unwrap();
    assert_invalid(
        &open_err(&p),
        &with(&p, "idx"),
        &[&format!(
            "{} sequences and {} document boundaries",
            u64::MAX,
            u64::MAX
        )],
    );
}

#[test]
fn error_idx_trailing_garbage() {
    let dir = tempfile::tempdir().unwrap();
    let (index, bin) = fixture();
    let p = put(dir.path(), "s", &index, &bin);
    // 5 trailing bytes would be one mode per sequence; 3 and 6 are garbage.
    for extra in [3usize, 6, 100] {
        let mut idx = index.bytes();
        idx.resize(idx.len() + extra, 0xAB);
        std::fs::write(with(&p, "idx"), idx).unwrap();
        assert_invalid(
            &open_err(&p),
            &with(&p, "idx"),
            &[&format!(
                "index has {extra} unexpected trailing bytes after byte {FIX_IDX_LEN}"
            )],
        );
    }
}

#[test]
fn error_bin_shorter_than_the_index_describes() {
    let dir = tempfile::tempdir().unwrap();
    let (index, bin) = fixture();
    let p = put(dir.path(), "s", &index, &bin[..FIX_BIN_LEN - 2]);
    let e = open_err(&p);
    assert_invalid(
        &e,
        &with(&p, "bin"),
        &[
            "bin is 20 bytes",
            &format!("{} describes 22 bytes", with(&p, "idx").display()),
            "the last sequence ends at byte 22",
        ],
    );
    // An empty .bin for a non-empty index.
    std::fs::write(with(&p, "bin"), b"").unwrap();
    assert_invalid(
        &open_err(&p),
        &with(&p, "bin"),
        &["bin is 0 bytes", "describes 22 bytes"],
    );
}

#[test]
fn error_bin_longer_than_the_index_describes() {
    let dir = tempfile::tempdir().unwrap();
    let (index, mut bin) = fixture();
    bin.extend_from_slice(&[0, 0, 0, 0]);
    let p = put(dir.path(), "s", &index, &bin);
    assert_invalid(
        &open_err(&p),
        &with(&p, "bin"),
        &["bin is 26 bytes", "describes 22 bytes"],
    );
}

#[test]
fn error_bin_size_not_a_multiple_of_the_dtype() {
    let dir = tempfile::tempdir().unwrap();
    let (index, mut bin) = fixture();
    bin.push(0);
    let p = put(dir.path(), "s", &index, &bin);
    assert_invalid(
        &open_err(&p),
        &with(&p, "bin"),
        &["bin size 23 bytes is not a multiple of the uint16 item size (2 bytes)"],
    );
    // int64: 8-byte items.
    let (index, mut bin) = build(CODES[4], &[vec![vec![1, 2]]]);
    bin.extend_from_slice(&[0, 0, 0, 0]);
    let p = put(dir.path(), "i64", &index, &bin);
    assert_invalid(
        &open_err(&p),
        &with(&p, "bin"),
        &["bin size 20 bytes is not a multiple of the int64 item size (8 bytes)"],
    );
}

#[test]
fn error_missing_bin_is_an_io_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let (index, bin) = fixture();
    let p = put(dir.path(), "s", &index, &bin);
    std::fs::remove_file(with(&p, "bin")).unwrap();
    let e = open_err(&p);
    match &e {
        CorpusError::Io { path, op, .. } => {
            assert_eq!(path, &with(&p, "bin"));
            assert_eq!(*op, "open");
        }
        other => panic!("expected Io, got {other:?}"),
    }
    assert!(e
        .to_string()
        .contains(&with(&p, "bin").display().to_string()));
}

// ---------------------------------------------------------------------------------------
// Megatron validation errors: pointers and lengths (caught by validate and doc_tokens)
// ---------------------------------------------------------------------------------------

#[test]
fn error_sequence_pointer_out_of_range_in_the_middle() {
    let dir = tempfile::tempdir().unwrap();
    let (mut index, bin) = fixture();
    index.pointers[3] = 1000;
    let p = put(dir.path(), "s", &index, &bin);
    // The O(1) open does not look at middle pointers...
    let s = Shard::open(&p, None).unwrap();
    // ...validate does,
    assert_invalid(
        &expect_err(s.validate(), "validate"),
        &with(&p, "idx"),
        &[
            "sequence 3 pointer is 1000, expected 16",
            &format!("pointer at byte {}", FIX_POINTERS_AT + 8 * 3),
        ],
    );
    // ...and so does reading the document, without validate: its pointer is not where
    // the sequence before it ends.
    let s = Shard::open(&p, None).unwrap();
    assert_invalid(
        &expect_err(s.doc_tokens(2), "doc_tokens(2)"),
        &with(&p, "idx"),
        &["document 2: sequence 3 pointer is 1000, expected 16 (where sequence 2 ends"],
    );
    // Its neighbours disagree with it, and which entry is wrong cannot be told from
    // theirs: they are refused too, never read from where the bad entry says.
    assert_invalid(
        &expect_err(s.doc_tokens(1), "doc_tokens(1)"),
        &with(&p, "idx"),
        &["document 1: its sequences end at byte 16, but sequence 3 after it starts at 1000"],
    );
    assert_invalid(
        &expect_err(s.doc_tokens(3), "doc_tokens(3)"),
        &with(&p, "idx"),
        &["document 3: sequence 4 pointer is 20, expected 1004"],
    );
    // A document that does not touch the bad pointer still reads.
    assert_eq!(values(&s.doc_tokens(0).unwrap()), vec![1, 2, 3]);
}

/// A pointer aimed at another document's bytes, every other field consistent (lengths,
/// `.bin` size, document_indices): reading the document refuses it before the
/// background validation would, where it once served the other document's tokens.
#[test]
fn a_pointer_aimed_at_another_document_is_refused_at_the_read() {
    let dir = tempfile::tempdir().unwrap();
    let (mut index, bin) = fixture();
    // Document 2 (two tokens at byte 16) pointed at document 0's first two (the open
    // checks the last sequence against the `.bin`'s size, so not the last document).
    index.pointers[3] = 0;
    let p = put(dir.path(), "s", &index, &bin);
    let s = Shard::open(&p, None).unwrap();
    assert_invalid(
        &expect_err(s.doc_tokens(2), "doc_tokens(2)"),
        &with(&p, "idx"),
        &["document 2: sequence 3 pointer is 0, expected 16"],
    );
    // The planner's read of its length refuses it too, poisoning the shard by name.
    let s = Shard::open(&p, None).unwrap();
    assert_eq!(s.doc_len_validated(2), 0);
    let why = s.poisoned().expect("poisoned").to_string();
    assert!(
        why.contains("document 2: sequence 3 pointer is 0, expected 16"),
        "{why}"
    );
}

#[test]
fn error_sequence_pointer_not_contiguous_within_a_document() {
    let dir = tempfile::tempdir().unwrap();
    let (mut index, bin) = fixture();
    index.pointers[2] = 8; // overlaps sequence 1
    let p = put(dir.path(), "s", &index, &bin);
    let s = Shard::open(&p, None).unwrap();
    assert_invalid(
        &expect_err(s.validate(), "validate"),
        &with(&p, "idx"),
        &[
            "sequence 2 pointer is 8, expected 10",
            &format!("pointer at byte {}", FIX_POINTERS_AT + 8 * 2),
        ],
    );
    assert_invalid(
        &expect_err(s.doc_tokens(1), "doc_tokens(1)"),
        &with(&p, "idx"),
        &["document 1: sequence 2 pointer is 8, expected 10"],
    );
}

#[test]
fn error_sequence_pointer_misaligned() {
    let dir = tempfile::tempdir().unwrap();
    let (mut index, bin) = fixture();
    index.pointers[3] = 17;
    let p = put(dir.path(), "s", &index, &bin);
    let s = Shard::open(&p, None).unwrap();
    assert_invalid(
        &expect_err(s.validate(), "validate"),
        &with(&p, "idx"),
        &["sequence 3 pointer is 17, expected 16"],
    );
    assert_invalid(
        &expect_err(s.doc_tokens(2), "doc_tokens(2)"),
        &with(&p, "idx"),
        &["document 2: sequence 3 pointer is 17, expected 16"],
    );
}

#[test]
fn error_sequence_pointer_negative() {
    let dir = tempfile::tempdir().unwrap();
    let (mut index, bin) = fixture();
    index.pointers[3] = -16;
    let p = put(dir.path(), "s", &index, &bin);
    let s = Shard::open(&p, None).unwrap();
    assert_invalid(
        &expect_err(s.validate(), "validate"),
        &with(&p, "idx"),
        &["sequence 3 pointer is -16, expected 16"],
    );
    assert_invalid(
        &expect_err(s.doc_tokens(2), "doc_tokens(2)"),
        &with(&p, "idx"),
        &["document 2: sequence 3 pointer is -16, expected 16"],
    );
    // The first pointer is checked at open.
    let (mut index, bin) = fixture();
    index.pointers[0] = 2;
    let p = put(dir.path(), "first", &index, &bin);
    assert_invalid(
        &open_err(&p),
        &with(&p, "idx"),
        &[&format!(
            "sequence 0 pointer is 2, expected 0 (byte {FIX_POINTERS_AT})"
        )],
    );
}

#[test]
fn error_negative_sequence_length() {
    let dir = tempfile::tempdir().unwrap();
    let (mut index, bin) = fixture();
    index.lengths[3] = -1;
    let p = put(dir.path(), "s", &index, &bin);
    let s = Shard::open(&p, None).unwrap();
    assert_invalid(
        &expect_err(s.validate(), "validate"),
        &with(&p, "idx"),
        &[&format!(
            "sequence 3 has negative length -1 (byte {})",
            FIX_LENGTHS_AT + 4 * 3
        )],
    );
    assert_invalid(
        &expect_err(s.doc_len(2), "doc_len(2)"),
        &with(&p, "idx"),
        &["document 2: sequence 3 has negative length -1"],
    );
    assert_invalid(
        &expect_err(s.doc_tokens(2), "doc_tokens(2)"),
        &with(&p, "idx"),
        &[&format!(
            "sequence 3 has negative length -1 (byte {})",
            FIX_LENGTHS_AT + 4 * 3
        )],
    );
    // The last sequence's length is checked at open (it fixes the .bin size).
    let (mut index, bin) = fixture();
    index.lengths[4] = i32::MIN;
    let p = put(dir.path(), "last", &index, &bin);
    assert_invalid(
        &open_err(&p),
        &with(&p, "idx"),
        &[&format!(
            "sequence 4 has negative length {} (byte {})",
            i32::MIN,
            FIX_LENGTHS_AT + 4 * 4
        )],
    );
}

// ---------------------------------------------------------------------------------------
// Megatron validation errors: document_indices
// ---------------------------------------------------------------------------------------

#[test]
fn error_document_indices_not_starting_at_zero() {
    let dir = tempfile::tempdir().unwrap();
    let (mut index, bin) = fixture();
    index.doc_indices[0] = 1;
    let p = put(dir.path(), "s", &index, &bin);
    assert_invalid(
        &open_err(&p),
        &with(&p, "idx"),
        &["document_indices[0] is 1, expected 0"],
    );
}

#[test]
fn error_document_indices_not_ending_at_the_sequence_count() {
    let dir = tempfile::tempdir().unwrap();
    for last in [4i64, 6, -1] {
        let (mut index, bin) = fixture();
        index.doc_indices[4] = last;
        let p = put(dir.path(), &format!("s{last}"), &index, &bin);
        assert_invalid(
            &open_err(&p),
            &with(&p, "idx"),
            &[&format!(
                "document_indices ends at {last}, expected the sequence count 5 (document 3"
            )],
        );
    }
}

#[test]
fn error_document_indices_decreasing_in_the_middle() {
    let dir = tempfile::tempdir().unwrap();
    let (mut index, bin) = fixture();
    index.doc_indices = vec![0, 3, 1, 4, 5];
    let p = put(dir.path(), "s", &index, &bin);
    let s = Shard::open(&p, None).unwrap();
    assert_invalid(
        &expect_err(s.validate(), "validate"),
        &with(&p, "idx"),
        &[
            "document 1: document_indices[2] is 1 after 3",
            &format!("byte {}", FIX_DOC_INDEX_AT + 8 * 2),
        ],
    );
    assert_invalid(
        &expect_err(s.doc_tokens(1), "doc_tokens(1)"),
        &with(&p, "idx"),
        &["document 1: document_indices gives sequences 3..1"],
    );
    assert_invalid(
        &expect_err(s.doc_len(1), "doc_len(1)"),
        &with(&p, "idx"),
        &["document 1: document_indices gives sequences 3..1"],
    );
    // Document 0 (sequences 0..3) is still well-formed and reads.
    assert_eq!(
        values(&s.doc_tokens(0).unwrap()),
        vec![1, 2, 3, 4, 5, 6, 7, 8]
    );

    // An entry past the sequence count in the middle.
    let (mut index, bin) = fixture();
    index.doc_indices = vec![0, 1, 9, 4, 5];
    let p = put(dir.path(), "past", &index, &bin);
    let s = Shard::open(&p, None).unwrap();
    assert_invalid(
        &expect_err(s.validate(), "validate"),
        &with(&p, "idx"),
        &[
            "document 1: document_indices[2] is 9 after 1",
            "at most 5",
            &format!("byte {}", FIX_DOC_INDEX_AT + 8 * 2),
        ],
    );
    assert_invalid(
        &expect_err(s.doc_tokens(1), "doc_tokens(1)"),
        &with(&p, "idx"),
        &["document 1: document_indices gives sequences 1..9, outside 0..5"],
    );
}

#[test]
fn error_empty_shard() {
    let dir = tempfile::tempdir().unwrap();
    let (index, bin) = build(U16, &[]);
    assert_eq!(index.doc_indices, vec![0]);
    let p = put(dir.path(), "empty", &index, &bin);
    assert_invalid(
        &open_err(&p),
        &with(&p, "idx"),
        &["empty shard: the index holds no documents"],
    );
    // No document_indices at all, not even the leading 0.
    let mut index = index;
    index.doc_indices.clear();
    let p = put(dir.path(), "none", &index, &bin);
    assert_invalid(
        &open_err(&p),
        &with(&p, "idx"),
        &["document_indices is empty"],
    );
}

#[test]
fn shard_of_only_empty_documents_is_valid() {
    let dir = tempfile::tempdir().unwrap();
    let p = write_docs(dir.path(), "zeros", U16, &[vec![], vec![vec![]], vec![]]);
    let s = Shard::open(&p, None).unwrap();
    s.validate().unwrap();
    assert_eq!((s.documents(), s.sequences(), s.tokens()), (3, 1, 0));
    for d in 0..3 {
        assert_eq!(s.doc_len(d).unwrap(), 0);
        assert!(s.doc_tokens(d).unwrap().is_empty());
    }
}

// ---------------------------------------------------------------------------------------
// Group sidecars
// ---------------------------------------------------------------------------------------

fn groups_fixture(dir: &Path) -> PathBuf {
    let (index, bin) = fixture();
    put(dir, "g", &index, &bin)
}

#[test]
fn groups_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let p = groups_fixture(dir.path());
    write_groups(&p, &[7, 7, u64::MAX, 0]);
    let s = Shard::open(&p, None).unwrap();
    let g = s.groups().expect("sidecar found");
    assert_eq!(g.len(), 3);
    assert!(!g.is_empty());
    let runs: Vec<(u64, u64, u64)> = g
        .runs()
        .iter()
        .map(|r| (r.id, r.first_doc, r.docs))
        .collect();
    assert_eq!(runs, vec![(7, 0, 2), (u64::MAX, 2, 1), (0, 3, 1)]);
    let of: Vec<Option<u64>> = (0..5).map(|d| g.group_of(d)).collect();
    assert_eq!(of, vec![Some(7), Some(7), Some(u64::MAX), Some(0), None]);

    // int64 ids are accepted when non-negative.
    let data: Vec<u8> = [3i64, 3, 3, i64::MAX]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    write_npy(&with(&p, "groups.npy"), "<i8", "(4,)", &data);
    let g = Groups::open(&with(&p, "groups.npy"), 4).unwrap();
    let runs: Vec<(u64, u64, u64)> = g
        .runs()
        .iter()
        .map(|r| (r.id, r.first_doc, r.docs))
        .collect();
    assert_eq!(runs, vec![(3, 0, 3), (i64::MAX as u64, 3, 1)]);
}

fn groups_err(p: &Path) -> CorpusError {
    expect_err(Shard::open(p, None), "open with a bad sidecar")
}

#[test]
fn error_groups_wrong_length() {
    let dir = tempfile::tempdir().unwrap();
    let p = groups_fixture(dir.path());
    write_groups(&p, &[1, 1, 2]);
    assert_invalid(
        &groups_err(&p),
        &with(&p, "groups.npy"),
        &["groups sidecar has 3 entries but the shard has 4 documents"],
    );
    write_groups(&p, &[1, 1, 2, 2, 3]);
    assert_invalid(
        &groups_err(&p),
        &with(&p, "groups.npy"),
        &["groups sidecar has 5 entries but the shard has 4 documents"],
    );
}

#[test]
fn error_groups_not_contiguous() {
    let dir = tempfile::tempdir().unwrap();
    let p = groups_fixture(dir.path());
    write_groups(&p, &[1, 2, 1, 3]);
    assert_invalid(
        &groups_err(&p),
        &with(&p, "groups.npy"),
        &["group 1 is not contiguous: documents 0..1 and again at document 2"],
    );
}

#[test]
fn error_groups_negative_int64_id() {
    let dir = tempfile::tempdir().unwrap();
    let p = groups_fixture(dir.path());
    let data: Vec<u8> = [0i64, 0, -5, 1]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    write_npy(&with(&p, "groups.npy"), "<i8", "(4,)", &data);
    assert_invalid(
        &groups_err(&p),
        &with(&p, "groups.npy"),
        &["group id -5 at document 2 is negative"],
    );
}

#[test]
fn error_groups_wrong_dtype() {
    let dir = tempfile::tempdir().unwrap();
    let p = groups_fixture(dir.path());
    let data: Vec<u8> = [1u32, 1, 2, 2]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    write_npy(&with(&p, "groups.npy"), "<u4", "(4,)", &data);
    assert_invalid(
        &groups_err(&p),
        &with(&p, "groups.npy"),
        &[
            "groups sidecar has dtype",
            "<u4",
            "expected little-endian uint64",
        ],
    );
    // Big-endian uint64 is refused too.
    let data: Vec<u8> = [1u64, 1, 2, 2]
        .iter()
        .flat_map(|v| v.to_be_bytes())
        .collect();
    write_npy(&with(&p, "groups.npy"), ">u8", "(4,)", &data);
    assert_invalid(
        &groups_err(&p),
        &with(&p, "groups.npy"),
        &["groups sidecar has dtype", ">u8"],
    );
}

#[test]
fn error_groups_two_dimensional() {
    let dir = tempfile::tempdir().unwrap();
    let p = groups_fixture(dir.path());
    let data: Vec<u8> = [1u64, 1, 2, 2]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    write_npy(&with(&p, "groups.npy"), "<u8", "(2, 2)", &data);
    assert_invalid(
        &groups_err(&p),
        &with(&p, "groups.npy"),
        &["groups sidecar has shape [2, 2]; expected one dimension"],
    );
}

/// Writes `path` as a version 1.0 `.npy` file whose header text is `dict` (padded as
/// numpy pads it) followed by `data`.
fn write_npy_header(path: &Path, dict: &str, data: &[u8]) {
    let mut header = dict.to_string();
    header.push_str(&" ".repeat((64 - (10 + dict.len() + 1) % 64) % 64));
    header.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend((header.len() as u16).to_le_bytes());
    out.extend(header.as_bytes());
    out.extend(data);
    std::fs::write(path, out).unwrap();
}

/// Regression: npyz multiplies a header's dimensions while it parses it, which
/// overflowed (a panic, exit 101 from `inspect` and `check-config`) for a shape like
/// (2^32, 2^32). The pre-scan that refuses such a shape first only knew `'shape'`
/// followed by `(`; npyz takes the key in double quotes or with escapes, and a list.
/// The pre-scan now reads the header with npyz's own parser (py_literal).
#[test]
fn a_groups_sidecar_shape_of_two_huge_dimensions_is_refused_however_it_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.groups.npy");
    let huge = "4294967296, 4294967296";
    for dict in [
        format!(r#"{{"descr": "<u8", "fortran_order": False, "shape": ({huge}), }}"#),
        format!("{{'descr': '<u8', 'fortran_order': False, 'shape': [{huge}], }}"),
        format!(r#"{{"descr": "<u8", "fortran_order": False, "shape": [{huge},]}}"#),
        format!(r"{{'descr': '<u8', 'fortran_order': False, '\x73hape': ({huge})}}"),
        format!(r"{{'descr': '<u8', 'fortran_order': False, 'sh\u0061pe': ({huge})}}"),
        format!(r"{{'descr': '<u8', 'fortran_order': False, '\163hape': ({huge})}}"),
        format!(r"{{'shape' : [ {huge} ] , 'fortran_order': False, 'descr': '<u8'}}"),
        // npyz keeps the last of two `shape` keys.
        format!("{{'descr': '<u8', 'fortran_order': False, 'shape': (4,), \"shape\": ({huge})}}"),
    ] {
        write_npy_header(&path, &dict, &[0; 32]);
        let e = expect_err(Groups::open(&path, 4), &dict);
        assert_invalid(
            &e,
            &path,
            &["groups sidecar has shape [4294967296, 4294967296]; expected one dimension"],
        );
    }
    // No dimension at all.
    let dict = "{'descr': '<u8', 'fortran_order': False, 'shape': []}";
    write_npy_header(&path, dict, &[0; 32]);
    let e = expect_err(Groups::open(&path, 4), dict);
    assert_invalid(&e, &path, &["groups sidecar has shape [];"]);
    // A number expression is no Python literal: npyz refuses it (nothing multiplied).
    let dict = "{'descr': '<u8', 'fortran_order': False, 'shape': (4294967295 + 1, 2**32)}";
    write_npy_header(&path, dict, &[0; 32]);
    let e = expect_err(Groups::open(&path, 4), dict);
    assert_invalid(&e, &path, &["groups sidecar is not a valid .npy file"]);
    // One dimension, written in any of those ways, is read.
    for dict in [
        r#"{"descr": "<u8", "fortran_order": False, "shape": [4], }"#,
        r"{'descr': '<u8', 'fortran_order': False, '\x73hape': (4,)}",
        "{'shape': [4,], 'descr': '<u8', 'fortran_order': False}",
    ] {
        write_npy_header(&path, dict, &[0; 32]);
        let g = Groups::open(&path, 4).unwrap_or_else(|e| panic!("{dict}: {e}"));
        assert_eq!(g.len(), 1, "{dict}");
    }
}

#[test]
fn error_groups_truncated_data() {
    let dir = tempfile::tempdir().unwrap();
    let p = groups_fixture(dir.path());
    let data: Vec<u8> = [1u64, 1, 2].iter().flat_map(|v| v.to_le_bytes()).collect();
    write_npy(&with(&p, "groups.npy"), "<u8", "(4,)", &data);
    // The data ends where the file does.
    let end = std::fs::metadata(with(&p, "groups.npy")).unwrap().len();
    assert_eq!(end % 64, 24, "the test writer pads the header to 64 bytes");
    assert_invalid(
        &groups_err(&p),
        &with(&p, "groups.npy"),
        &[&format!(
            "groups sidecar is truncated: 24 data bytes for 4 entries (byte {end})"
        )],
    );
}

/// Regression: bytes after the `n * 8` data bytes of a sidecar were ignored, so a
/// sidecar of another shard (or a corrupt one) could pass as this one's.
#[test]
fn error_groups_trailing_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let p = groups_fixture(dir.path());
    let mut data: Vec<u8> = [1u64, 1, 2, 2]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    // Exactly its 4 entries: accepted.
    write_npy(&with(&p, "groups.npy"), "<u8", "(4,)", &data);
    let s = Shard::open(&p, None).unwrap();
    assert_eq!(s.groups().map(Groups::len), Some(2));
    drop(s);
    data.extend_from_slice(&[0xAB; 3]);
    write_npy(&with(&p, "groups.npy"), "<u8", "(4,)", &data);
    let end = std::fs::metadata(with(&p, "groups.npy")).unwrap().len();
    assert_invalid(
        &groups_err(&p),
        &with(&p, "groups.npy"),
        &[&format!(
            "groups sidecar has 3 unexpected bytes after its 4 entries (from byte {}; the \
             file is {end} bytes)",
            end - 3
        )],
    );
}

#[test]
fn error_groups_not_an_npy() {
    let dir = tempfile::tempdir().unwrap();
    let p = groups_fixture(dir.path());
    for body in [&b"this is not a numpy file at all"[..], b"", b"\x93NUMPY"] {
        std::fs::write(with(&p, "groups.npy"), body).unwrap();
        assert_invalid(
            &groups_err(&p),
            &with(&p, "groups.npy"),
            &["groups sidecar is not a valid .npy file"],
        );
    }
}

// ---------------------------------------------------------------------------------------
// Raw token arrays
// ---------------------------------------------------------------------------------------

#[test]
fn raw_uint16_with_and_without_trailing_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let eos = 0xFFFFu16;
    let cases: [(&[u16], Vec<Vec<i64>>); 4] = [
        (
            &[5, 6, eos, 7, eos, eos],
            vec![vec![5, 6, 65535], vec![7, 65535], vec![65535]],
        ),
        (&[5, 6, eos, 7, 8], vec![vec![5, 6, 65535], vec![7, 8]]),
        (&[1, 2, 3], vec![vec![1, 2, 3]]),
        (&[eos], vec![vec![65535]]),
    ];
    for (i, (tokens, want)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("t{i}.u16"));
        write_u16(&path, tokens);
        let opts = raw_opts(DType::Uint16, u64::from(eos), None);
        let r = RawShard::open(&path, &opts).unwrap();
        r.validate().unwrap();
        assert_eq!(r.dtype(), DType::Uint16);
        assert_eq!(r.eos(), u64::from(eos));
        assert_eq!(r.tokens(), tokens.len() as u64);
        assert_eq!(r.file_len(), 2 * tokens.len() as u64);
        assert_eq!(r.documents(), want.len() as u64, "case {i}");
        assert_eq!(&raw_docs(&r), want, "case {i}");
        for (d, w) in want.iter().enumerate() {
            assert_eq!(r.doc_len(d as u64).unwrap(), w.len() as u64);
            assert!(matches!(r.doc_tokens(d as u64).unwrap(), Tokens::Uint16(_)));
        }
        assert!(matches!(
            r.doc_tokens(want.len() as u64),
            Err(CorpusError::DocOutOfRange { .. })
        ));
    }
}

#[test]
fn raw_uint32_with_and_without_trailing_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let eos = 100_000u32; // above the uint16 range
                          // More than one 64-token chunk, with EOS on both sides of a chunk boundary.
    let mut tokens: Vec<u32> = (0..200).map(|i| i * 7 + 1).collect();
    for &at in &[0usize, 63, 64, 127, 150] {
        tokens[at] = eos;
    }
    let mut with_tail = tokens.clone();
    with_tail.truncate(190);
    let mut ends_eos = tokens.clone();
    ends_eos.push(eos);
    for (name, toks) in [("tail", &with_tail), ("eos", &ends_eos)] {
        let path = dir.path().join(format!("{name}.u32"));
        write_u32(&path, toks);
        let shard =
            Shard::open(&path, Some(&raw_opts(DType::Uint32, u64::from(eos), None))).unwrap();
        shard.validate().unwrap();
        assert_eq!(shard.format(), Format::Raw);
        assert_eq!(shard.dtype(), DType::Uint32);
        assert_eq!(shard.data_bytes(), 4 * toks.len() as u64);
        let mut docs = Vec::new();
        for d in 0..shard.documents() {
            let t = shard.doc_tokens(d).unwrap();
            let Tokens::Uint32(s) = t else {
                panic!("expected uint32 tokens, got {t:?}")
            };
            assert_eq!(shard.doc_len(d).unwrap(), s.len() as u64);
            docs.push(s.to_vec());
        }
        // Split independently: every EOS closes a document.
        let mut want: Vec<Vec<u32>> = Vec::new();
        let mut cur = Vec::new();
        for &t in toks.iter() {
            cur.push(t);
            if t == eos {
                want.push(std::mem::take(&mut cur));
            }
        }
        if !cur.is_empty() {
            want.push(cur);
        }
        assert_eq!(docs, want, "{name}");
        assert_eq!(shard.sequences(), shard.documents());
        assert_eq!(docs.concat(), *toks);
        let trailing = name == "tail";
        assert_eq!(docs.last().unwrap().last() != Some(&eos), trailing);
    }
}

#[test]
fn raw_groups_sidecar_sits_beside_the_file_without_its_extension() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokens.bin");
    write_u16(&path, &[1, 0, 2, 0, 3]);
    let ids = [4u64, 4, 9];
    let data: Vec<u8> = ids.iter().flat_map(|v| v.to_le_bytes()).collect();
    write_npy(&dir.path().join("tokens.groups.npy"), "<u8", "(3,)", &data);
    let s = Shard::open(&path, Some(&raw_opts(DType::Uint16, 0, None))).unwrap();
    let g = s.groups().expect("sidecar");
    assert_eq!(g.len(), 2);
    assert_eq!(
        (0..3).map(|d| g.group_of(d)).collect::<Vec<_>>(),
        vec![Some(4), Some(4), Some(9)]
    );
}

#[test]
fn error_raw_odd_byte_size() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("odd.u16");
    std::fs::write(&path, [1u8, 0, 2]).unwrap();
    let e = expect_err(
        RawShard::open(&path, &raw_opts(DType::Uint16, 0, None)),
        "odd",
    );
    assert_invalid(
        &e,
        &path,
        &["file size 3 bytes is not a multiple of the uint16 item size (2 bytes)"],
    );
    let path = dir.path().join("odd.u32");
    std::fs::write(&path, [0u8; 6]).unwrap();
    let e = expect_err(
        RawShard::open(&path, &raw_opts(DType::Uint32, 0, None)),
        "odd",
    );
    assert_invalid(
        &e,
        &path,
        &["file size 6 bytes is not a multiple of the uint32 item size (4 bytes)"],
    );
}

#[test]
fn error_raw_empty_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("empty.u16");
    std::fs::write(&path, b"").unwrap();
    let e = expect_err(
        Shard::open(&path, Some(&raw_opts(DType::Uint16, 0, None))),
        "empty",
    );
    assert_invalid(&e, &path, &["empty shard: the token file holds no tokens"]);
}

#[test]
fn error_raw_eos_does_not_fit_the_dtype() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.bin");
    write_u16(&path, &[1, 2, 3, 4]);
    let e = expect_err(
        RawShard::open(&path, &raw_opts(DType::Uint16, 65536, None)),
        "eos",
    );
    assert_invalid(&e, &path, &["eos id 65536 does not fit in uint16"]);
    let e = expect_err(
        RawShard::open(&path, &raw_opts(DType::Uint32, 1 << 32, None)),
        "eos",
    );
    assert_invalid(&e, &path, &["eos id 4294967296 does not fit in uint32"]);
    // The largest ids that fit are fine.
    RawShard::open(&path, &raw_opts(DType::Uint16, 65535, None)).unwrap();
}

#[test]
fn error_raw_dtype_other_than_uint16_or_uint32() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.bin");
    write_u16(&path, &[1, 2, 3, 4]);
    let e = expect_err(
        RawShard::open(&path, &raw_opts(DType::Int32, 0, None)),
        "int32",
    );
    assert_invalid(
        &e,
        &path,
        &["raw token arrays are uint16 or uint32, not int32"],
    );
}

#[test]
fn raw_missing_file_is_an_io_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("absent.bin");
    let e = expect_err(
        RawShard::open(&path, &raw_opts(DType::Uint16, 0, None)),
        "absent",
    );
    assert!(matches!(&e, CorpusError::Io { path: p, .. } if *p == path));
    assert!(e.to_string().contains(&path.display().to_string()));
}

// ---------------------------------------------------------------------------------------
// Raw boundary cache
// ---------------------------------------------------------------------------------------

/// A leftover temporary name of the boundary cache (a write killed between its create
/// and its rename) is stepped over, not an error: in a container the daemon is pid 1 at
/// every start, so the same name came back, every start warned "File exists", scanned
/// the file again and never wrote the cache. The shell that execs millrace leaves the
/// name under its own pid, which millrace keeps, with the counter's first value.
#[test]
fn a_leftover_cache_temporary_name_is_stepped_over() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.u16");
    write_u16(&path, &[1, 2, 0, 3, 0, 4]);
    let cache = with(&path, "uint16-eos0.mrdocs");
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg("touch \"$C.tmp$$-0\" && exec \"$M\" \"$@\"")
        .arg("sh")
        .args(["inspect", "--format", "raw", "--eos-id", "0"])
        .arg(&path)
        .env("C", &cache)
        .env("M", common::bin().get_program())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !err.contains("File exists"),
        "{err}"
    );
    assert!(cache.is_file(), "the cache was not written: {err}");
    let again = RawShard::open(&path, &raw_opts(DType::Uint16, 0, None)).unwrap();
    assert!(!again.cache_rebuilt());
}

/// Under a file-size limit (`ulimit -f`, a batch scheduler's) a cache write fails with
/// EFBIG and is warned about; the command goes on. `check-config`, `plan` and `inspect`
/// died of SIGXFSZ without a word (only `serve` ignored it), and left a partial file.
#[test]
fn a_file_size_limit_fails_the_cache_write_not_the_command() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.u16");
    // 400 documents: a boundary cache of 3.3 KB, past a limit of one 512-byte block.
    let tokens: Vec<u16> = (0..400).flat_map(|i| [i as u16 + 1, 0]).collect();
    write_u16(&path, &tokens);
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg("ulimit -f 1 && exec \"$M\" \"$@\"")
        .arg("sh")
        .args(["inspect", "--format", "raw", "--eos-id", "0"])
        .arg(&path)
        .env("M", common::bin().get_program())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{:?}: {err}", out.status);
    assert!(err.contains("File too large"), "{err}");
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn raw_cache_is_reused_on_the_second_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.u16");
    write_u16(&path, &[1, 2, 0, 3, 0, 4]);
    let opts = raw_opts(DType::Uint16, 0, None);
    let first = RawShard::open(&path, &opts).unwrap();
    assert!(first.cache_rebuilt());
    // Named for the dtype and EOS it was built for.
    assert_eq!(first.cache_path(), with(&path, "uint16-eos0.mrdocs"));
    assert!(first.cache_path().is_file());
    let want = raw_docs(&first);
    assert_eq!(want, vec![vec![1, 2, 0], vec![3, 0], vec![4]]);
    let second = RawShard::open(&path, &opts).unwrap();
    assert!(!second.cache_rebuilt());
    second.validate().unwrap();
    assert_eq!(raw_docs(&second), want);

    // A different EOS is a different index: rebuilt, not reused.
    let other = RawShard::open(&path, &raw_opts(DType::Uint16, 3, None)).unwrap();
    assert!(other.cache_rebuilt());
    assert_eq!(raw_docs(&other), vec![vec![1, 2, 0, 3], vec![0, 4]]);
    // And the same file read as uint32 (a different item size) too.
    let as_u32 = RawShard::open(&path, &raw_opts(DType::Uint32, 0, None)).unwrap();
    assert!(as_u32.cache_rebuilt());
    assert_eq!(as_u32.tokens(), 3);
}

#[test]
fn raw_cache_rebuilt_after_append() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.u16");
    write_u16(&path, &[1, 0, 2, 0]);
    let opts = raw_opts(DType::Uint16, 0, None);
    assert!(RawShard::open(&path, &opts).unwrap().cache_rebuilt());
    assert!(!RawShard::open(&path, &opts).unwrap().cache_rebuilt());
    let before = mtime(&path);
    {
        use std::io::Write;
        let mut f = File::options().append(true).open(&path).unwrap();
        f.write_all(&[3, 0, 0, 0, 9, 0]).unwrap();
    }
    // Keep the old mtime, so that only the size tells the file changed.
    common::set_mtime(&path, before);
    let r = RawShard::open(&path, &opts).unwrap();
    assert!(
        r.cache_rebuilt(),
        "a longer file must not reuse the old cache"
    );
    r.validate().unwrap();
    assert_eq!(
        raw_docs(&r),
        vec![vec![1, 0], vec![2, 0], vec![3, 0], vec![9]]
    );
    assert!(!RawShard::open(&path, &opts).unwrap().cache_rebuilt());
}

#[test]
fn raw_cache_rebuilt_after_same_size_rewrite_with_new_mtime() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.u16");
    write_u16(&path, &[1, 0, 2, 3, 0, 4]);
    let opts = raw_opts(DType::Uint16, 0, None);
    let r = RawShard::open(&path, &opts).unwrap();
    assert_eq!(raw_docs(&r), vec![vec![1, 0], vec![2, 3, 0], vec![4]]);
    drop(r);
    let before = mtime(&path);
    write_u16(&path, &[0, 5, 6, 7, 0, 8]);
    common::set_mtime(&path, before + Duration::from_secs(7));
    let r = RawShard::open(&path, &opts).unwrap();
    assert!(r.cache_rebuilt(), "same size, new mtime must rebuild");
    r.validate().unwrap();
    assert_eq!(raw_docs(&r), vec![vec![0], vec![5, 6, 7, 0], vec![8]]);
    // A sub-second difference counts too.
    write_u16(&path, &[9, 9, 0, 9, 9, 0]);
    common::set_mtime(
        &path,
        before + Duration::from_secs(7) + Duration::from_nanos(1000),
    );
    let r = RawShard::open(&path, &opts).unwrap();
    assert!(
        r.cache_rebuilt(),
        "a nanosecond-level mtime change must rebuild"
    );
    assert_eq!(raw_docs(&r), vec![vec![9, 9, 0], vec![9, 9, 0]]);
}

#[test]
fn raw_cache_rebuilt_after_corruption() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.u16");
    write_u16(&path, &[1, 0, 2, 0, 3, 0, 4]);
    let opts = raw_opts(DType::Uint16, 0, None);
    let r = RawShard::open(&path, &opts).unwrap();
    let want = raw_docs(&r);
    let cache = r.cache_path().to_path_buf();
    drop(r);
    let good = std::fs::read(&cache).unwrap();
    assert_eq!(
        good.len(),
        104 + 8 * 4,
        "104-byte header + one u64 per document"
    );
    // Flip a byte of the body (a boundary): only the checksum can tell.
    let mut bad = good.clone();
    bad[104 + 8] ^= 0x01;
    std::fs::write(&cache, &bad).unwrap();
    let r = RawShard::open(&path, &opts).unwrap();
    assert!(
        r.cache_rebuilt(),
        "a body that fails its checksum must be rebuilt"
    );
    r.validate().unwrap();
    assert_eq!(raw_docs(&r), want);
    drop(r);
    assert_eq!(
        std::fs::read(&cache).unwrap(),
        good,
        "the cache was rewritten"
    );
    assert!(!RawShard::open(&path, &opts).unwrap().cache_rebuilt());
    // Truncated and emptied caches are rebuilt as well.
    for body in [&good[..good.len() - 3], &good[..10], &[][..]] {
        std::fs::write(&cache, body).unwrap();
        let r = RawShard::open(&path, &opts).unwrap();
        assert!(r.cache_rebuilt());
        assert_eq!(raw_docs(&r), want);
    }
}

#[test]
fn raw_cache_every_corruption_is_rebuilt_or_harmless() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.u16");
    write_u16(&path, &[1, 0, 2, 2, 0, 3, 0, 4, 4]);
    let opts = raw_opts(DType::Uint16, 0, None);
    let r = RawShard::open(&path, &opts).unwrap();
    let want = raw_docs(&r);
    let cache = r.cache_path().to_path_buf();
    drop(r);
    let good = std::fs::read(&cache).unwrap();
    for at in 0..good.len() {
        for mask in [0x01u8, 0x10, 0x80, 0xFF] {
            let mut bad = good.clone();
            bad[at] ^= mask;
            std::fs::write(&cache, &bad).unwrap();
            let r = RawShard::open(&path, &opts).unwrap();
            r.validate().unwrap();
            assert_eq!(raw_docs(&r), want, "byte {at} ^ {mask:#x}");
        }
    }
}

/// Regression: a document count with bit 61, 62 or 63 flipped once made
/// `CACHE_HEADER + 8 * count` wrap to the true size; it must be rebuilt instead.
#[test]
fn raw_cache_document_count_overflow_is_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.u16");
    write_u16(&path, &[1, 0, 2, 0]);
    let opts = raw_opts(DType::Uint16, 0, None);
    let cache = RawShard::open(&path, &opts)
        .unwrap()
        .cache_path()
        .to_path_buf();
    let mut bad = std::fs::read(&cache).unwrap();
    bad[55] ^= 0x20; // count += 2^61: 8 * count wraps to the true size
    std::fs::write(&cache, &bad).unwrap();
    let r = RawShard::open(&path, &opts).unwrap();
    assert!(r.cache_rebuilt());
    assert_eq!(r.documents(), 2);
}

#[test]
fn raw_cache_in_cache_dir_vs_next_to_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let cache_dir = dir.path().join("caches").join("nested");
    std::fs::create_dir_all(&data_dir).unwrap();
    let path = data_dir.join("t.u16");
    write_u16(&path, &[1, 0, 2]);

    let opts = raw_opts(DType::Uint16, 0, Some(&cache_dir));
    let r = RawShard::open(&path, &opts).unwrap();
    assert!(r.cache_rebuilt());
    assert!(
        r.cache_path().starts_with(&cache_dir),
        "{}",
        r.cache_path().display()
    );
    assert!(r.cache_path().is_file());
    let name = r
        .cache_path()
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    assert!(
        name.starts_with("t.u16-") && name.ends_with(".mrdocs"),
        "{name}"
    );
    assert!(
        !with(&path, "uint16-eos0.mrdocs").exists(),
        "nothing written next to the data"
    );
    assert!(!RawShard::open(&path, &opts).unwrap().cache_rebuilt());

    // Next to the file: a separate cache, built once.
    let beside = raw_opts(DType::Uint16, 0, None);
    let r = RawShard::open(&path, &beside).unwrap();
    assert!(r.cache_rebuilt());
    assert_eq!(r.cache_path(), with(&path, "uint16-eos0.mrdocs"));
    assert!(!RawShard::open(&path, &beside).unwrap().cache_rebuilt());
    assert_eq!(raw_docs(&r), vec![vec![1, 0], vec![2]]);

    // The cache dir names the file by its canonical path: another spelling of the same
    // file finds the same cache.
    let other = data_dir.join("..").join("data").join(".").join("t.u16");
    let r = RawShard::open(&other, &opts).unwrap();
    assert!(!r.cache_rebuilt(), "{}", r.cache_path().display());
    assert_eq!(raw_docs(&r), vec![vec![1, 0], vec![2]]);
}

#[test]
fn raw_cache_dir_same_name_in_two_directories_does_not_collide() {
    let dir = tempfile::tempdir().unwrap();
    let cache_dir = dir.path().join("cache");
    let a = dir.path().join("a");
    let b = dir.path().join("b");
    std::fs::create_dir_all(&a).unwrap();
    std::fs::create_dir_all(&b).unwrap();
    let pa = a.join("tokens.bin");
    let pb = b.join("tokens.bin");
    // Same size, and the same mtime forced below: only the path can tell them apart.
    write_u16(&pa, &[1, 0, 2, 3]);
    write_u16(&pb, &[4, 5, 0, 6]);
    let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    common::set_mtime(&pa, t);
    common::set_mtime(&pb, t);
    let opts = raw_opts(DType::Uint16, 0, Some(&cache_dir));
    let ra = RawShard::open(&pa, &opts).unwrap();
    let rb = RawShard::open(&pb, &opts).unwrap();
    assert!(ra.cache_rebuilt() && rb.cache_rebuilt());
    assert_ne!(ra.cache_path(), rb.cache_path());
    assert_eq!(raw_docs(&ra), vec![vec![1, 0], vec![2, 3]]);
    assert_eq!(raw_docs(&rb), vec![vec![4, 5, 0], vec![6]]);
    drop((ra, rb));
    let ra = RawShard::open(&pa, &opts).unwrap();
    let rb = RawShard::open(&pb, &opts).unwrap();
    assert!(!ra.cache_rebuilt() && !rb.cache_rebuilt());
    assert_eq!(raw_docs(&ra), vec![vec![1, 0], vec![2, 3]]);
    assert_eq!(raw_docs(&rb), vec![vec![4, 5, 0], vec![6]]);
    let n = std::fs::read_dir(&cache_dir).unwrap().count();
    assert_eq!(n, 2, "one cache per file, no temporaries left");
}

#[test]
fn raw_cache_unwritable_falls_back_to_memory() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.u16");
    write_u16(&path, &[1, 0, 2]);
    // A cache "directory" that is a regular file cannot hold a cache.
    let blocker = dir.path().join("blocker");
    std::fs::write(&blocker, b"x").unwrap();
    let opts = raw_opts(DType::Uint16, 0, Some(&blocker.join("sub")));
    for _ in 0..2 {
        let r = RawShard::open(&path, &opts).unwrap();
        assert!(r.cache_rebuilt(), "nothing cached, so every open scans");
        r.validate().unwrap();
        assert_eq!(raw_docs(&r), vec![vec![1, 0], vec![2]]);
    }
}

// ---------------------------------------------------------------------------------------
// Corruption sweep: never panic
// ---------------------------------------------------------------------------------------

/// Opens, validates and reads every document; returns whether validate passed. Whatever
/// the bytes, this must return rather than panic, and a shard that validates must read
/// completely and consistently.
fn exercise(prefix: &Path, what: &str) -> bool {
    let Ok(s) = Shard::open(prefix, None) else {
        return false;
    };
    let valid = s.validate().is_ok();
    let mut sum = 0u64;
    let mut all_ok = true;
    for d in 0..s.documents() {
        let len = s.doc_len(d);
        let toks = s.doc_tokens(d);
        if let (Ok(l), Ok(t)) = (&len, &toks) {
            assert_eq!(*l, t.len() as u64, "{what}: doc {d}");
            sum += l;
        } else {
            all_ok = false;
        }
        if valid {
            assert!(
                len.is_ok() && toks.is_ok(),
                "{what}: validated, doc {d} fails"
            );
        }
    }
    let _ = s.identity();
    // Never panics, validated or not; a failure leaves `lens` empty.
    let mut lens = Vec::new();
    let bulk = s.doc_lengths_into(&mut lens);
    if bulk.is_err() {
        assert!(
            lens.is_empty(),
            "{what}: failed doc_lengths_into left output behind"
        );
    }
    if valid {
        assert!(
            bulk.is_ok(),
            "{what}: validated, doc_lengths_into fails: {bulk:?}"
        );
        let each: Vec<u64> = (0..s.documents()).map(|d| s.doc_len(d).unwrap()).collect();
        assert_eq!(
            lens, each,
            "{what}: doc_lengths_into disagrees with doc_len"
        );
        assert!(all_ok);
        assert_eq!(
            sum,
            s.tokens(),
            "{what}: validated, document lengths != tokens"
        );
    }
    valid
}

#[test]
fn corruption_sweep_never_panics() {
    let dir = tempfile::tempdir().unwrap();
    let docs: Vec<Doc> = vec![
        vec![vec![1, 2, 3]],
        vec![vec![4, 5], vec![], vec![6, 7, 8]],
        vec![],
        vec![vec![9, 10]],
        vec![vec![11]],
    ];
    let prefix = write_docs(dir.path(), "s", U16, &docs);
    let idx_path = with(&prefix, "idx");
    let bin_path = with(&prefix, "bin");
    let idx = std::fs::read(&idx_path).unwrap();
    let bin = std::fs::read(&bin_path).unwrap();
    assert!(exercise(&prefix, "pristine"));
    write_groups(&prefix, &[1, 1, 2, 3, 3]);
    assert!(exercise(&prefix, "pristine with groups"));
    std::fs::remove_file(with(&prefix, "groups.npy")).unwrap();

    let mut cases = 0usize;
    let mut valid = 0usize;
    // What is on disk now, so that each case rewrites only the file it corrupts.
    let mut on_disk = (idx.clone(), bin.clone());
    let mut run = |idx_bytes: &[u8], bin_bytes: &[u8], what: String| {
        if on_disk.0 != idx_bytes {
            std::fs::write(&idx_path, idx_bytes).unwrap();
            on_disk.0 = idx_bytes.to_vec();
        }
        if on_disk.1 != bin_bytes {
            std::fs::write(&bin_path, bin_bytes).unwrap();
            on_disk.1 = bin_bytes.to_vec();
        }
        cases += 1;
        if exercise(&prefix, &what) {
            valid += 1;
        }
    };
    // Every byte of the .idx: single-bit and whole-byte flips.
    for at in 0..idx.len() {
        for mask in [0x01u8, 0x02, 0x10, 0x80, 0xFF] {
            let mut b = idx.clone();
            b[at] ^= mask;
            run(&b, &bin, format!("idx byte {at} ^ {mask:#x}"));
        }
    }
    // Every offset of the .idx overwritten with extreme 8-byte values (clipped at the end).
    let extremes: [u64; 6] = [
        0,
        u64::MAX,
        i64::MAX as u64,
        i64::MIN as u64,
        i32::MAX as u64,
        i32::MIN as u32 as u64,
    ];
    for at in 0..idx.len() {
        for v in extremes {
            let mut b = idx.clone();
            let end = (at + 8).min(b.len());
            b[at..end].copy_from_slice(&v.to_le_bytes()[..end - at]);
            run(&b, &bin, format!("idx bytes {at}.. = {v:#x}"));
        }
    }
    // Every truncation and a few extensions of the .idx.
    for len in 0..idx.len() {
        run(&idx[..len], &bin, format!("idx truncated to {len}"));
    }
    for extra in 1..=12 {
        let mut b = idx.clone();
        b.resize(b.len() + extra, 0x5A);
        run(&b, &bin, format!("idx + {extra} bytes"));
    }
    // The .bin: flips (token values only) and every truncation/extension.
    for at in (0..bin.len()).step_by(3) {
        let mut b = bin.clone();
        b[at] ^= 0xFF;
        run(&idx, &b, format!("bin byte {at} ^ 0xff"));
    }
    for len in 0..bin.len() {
        run(&idx, &bin[..len], format!("bin truncated to {len}"));
    }
    for extra in 1..=9 {
        let mut b = bin.clone();
        b.resize(b.len() + extra, 1);
        run(&idx, &b, format!("bin + {extra} bytes"));
    }
    assert!(cases > 1500, "{cases} cases");
    // The sweep is not vacuous: harmless corruptions (token values, the unused high
    // bytes of small lengths are not among them) still validate.
    assert!(valid > 0 && valid < cases, "{valid} of {cases} validated");
}

/// Regression: a huge document_indices entry in an unvalidated index once overflowed
/// `n * 4` in `doc_lengths_into`; it must be a clean error that leaves `out` untouched.
#[test]
fn doc_lengths_into_unvalidated_huge_document_index_does_not_panic() {
    let dir = tempfile::tempdir().unwrap();
    let (mut index, bin) = fixture();
    index.doc_indices[2] = i64::MAX;
    let p = put(dir.path(), "s", &index, &bin);
    let s = Shard::open(&p, None).unwrap();
    assert!(s.doc_len(1).is_err());
    let mut lens = vec![42];
    let e = expect_err(s.doc_lengths_into(&mut lens), "doc_lengths_into");
    assert_invalid(&e, &with(&p, "idx"), &["document 1"]);
    assert_eq!(lens, vec![42], "a failed call leaves `out` as it was");
}

#[test]
fn doc_lengths_into_matches_doc_len() {
    let dir = tempfile::tempdir().unwrap();
    let (index, bin) = fixture();
    let p = put(dir.path(), "s", &index, &bin);
    let s = Shard::open(&p, None).unwrap();
    let mut lens = vec![99];
    s.doc_lengths_into(&mut lens).unwrap();
    assert_eq!(lens, vec![99, 3, 5, 2, 1], "appends after what is there");
    let z = write_docs(
        dir.path(),
        "z",
        U16,
        &[vec![], vec![vec![], vec![7]], vec![]],
    );
    let z = Shard::open(&z, None).unwrap();
    z.doc_lengths_into(&mut lens).unwrap();
    assert_eq!(lens, vec![99, 3, 5, 2, 1, 0, 1, 0]);
    // A negative length is reported against the document.
    let (mut index, bin) = fixture();
    index.lengths[3] = -1;
    let p = put(dir.path(), "neg", &index, &bin);
    let s = Shard::open(&p, None).unwrap();
    let e = expect_err(s.doc_lengths_into(&mut Vec::new()), "negative");
    assert_invalid(&e, &with(&p, "idx"), &["document 2", "negative length"]);
    // A decreasing document_indices too.
    let (mut index, bin) = fixture();
    index.doc_indices = vec![0, 3, 1, 4, 5];
    let p = put(dir.path(), "dec", &index, &bin);
    let s = Shard::open(&p, None).unwrap();
    let e = expect_err(s.doc_lengths_into(&mut Vec::new()), "decreasing");
    assert_invalid(&e, &with(&p, "idx"), &["document 1", "sequences 3..1"]);
    // Raw shards: lengths including the EOS.
    let raw = dir.path().join("t.u16");
    write_u16(&raw, &[1, 0, 2, 3, 0, 4]);
    let r = Shard::open(&raw, Some(&raw_opts(DType::Uint16, 0, None))).unwrap();
    let mut lens = Vec::new();
    r.doc_lengths_into(&mut lens).unwrap();
    assert_eq!(lens, vec![2, 3, 1]);
}

#[test]
fn corruption_sweep_of_the_groups_sidecar_never_panics() {
    let dir = tempfile::tempdir().unwrap();
    let (index, bin) = fixture();
    let prefix = put(dir.path(), "g", &index, &bin);
    write_groups(&prefix, &[5, 5, 6, 7]);
    let side = with(&prefix, "groups.npy");
    let good = std::fs::read(&side).unwrap();
    let mut opened = 0;
    for at in 0..good.len() {
        for mask in [0x01u8, 0x80, 0xFF] {
            let mut b = good.clone();
            b[at] ^= mask;
            std::fs::write(&side, &b).unwrap();
            if let Ok(s) = Shard::open(&prefix, None) {
                opened += 1;
                let g = s.groups().unwrap();
                let covered: u64 = g.runs().iter().map(|r| r.docs).sum();
                assert_eq!(covered, 4, "byte {at} ^ {mask:#x}");
            }
        }
    }
    for len in 0..good.len() {
        std::fs::write(&side, &good[..len]).unwrap();
        assert!(Shard::open(&prefix, None).is_err(), "truncated to {len}");
    }
    assert!(opened > 0);
}

// ---------------------------------------------------------------------------------------
// resolve
// ---------------------------------------------------------------------------------------

fn not_found(r: Result<Vec<PathBuf>, CorpusError>) -> (PathBuf, String, String) {
    match expect_err(r, "resolve") {
        e @ CorpusError::NotFound { .. } => {
            let msg = e.to_string();
            let CorpusError::NotFound { path, what } = e else {
                unreachable!()
            };
            (path, what, msg)
        }
        other => panic!("expected NotFound, got {other:?}"),
    }
}

fn resolve_dir() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("corpus");
    std::fs::create_dir_all(&root).unwrap();
    for name in ["c", "a", "b.v2"] {
        write_docs(&root, name, U16, &[vec![vec![1, 2]]]);
    }
    // Noise that is not a shard: a sidecar, a text file, a directory named like a .bin.
    write_groups(&root.join("a"), &[1]);
    std::fs::write(root.join("README.txt"), b"hi").unwrap();
    std::fs::create_dir(root.join("sub.bin")).unwrap();
    (dir, root)
}

#[test]
fn resolve_prefix_and_file_paths() {
    let (_dir, root) = resolve_dir();
    let a = root.join("a");
    assert_eq!(resolve(&a, Format::Megatron).unwrap(), vec![a.clone()]);
    assert_eq!(
        resolve(&with(&a, "bin"), Format::Megatron).unwrap(),
        vec![a.clone()]
    );
    assert_eq!(
        resolve(&with(&a, "idx"), Format::Megatron).unwrap(),
        vec![a.clone()]
    );
    // A dot inside the prefix is not an extension.
    let b = root.join("b.v2");
    assert_eq!(resolve(&b, Format::Megatron).unwrap(), vec![b.clone()]);
    assert_eq!(
        resolve(&with(&b, "idx"), Format::Megatron).unwrap(),
        vec![b]
    );
}

#[test]
fn resolve_directory_is_sorted_and_skips_non_shards() {
    let (_dir, root) = resolve_dir();
    let got = resolve(&root, Format::Megatron).unwrap();
    assert_eq!(got, vec![root.join("a"), root.join("b.v2"), root.join("c")]);
    for p in &got {
        Shard::open(p, None).unwrap();
    }
}

#[test]
fn resolve_glob() {
    let (_dir, root) = resolve_dir();
    let all = format!("{}/*.idx", root.display());
    assert_eq!(
        resolve(Path::new(&all), Format::Megatron).unwrap(),
        vec![root.join("a"), root.join("b.v2"), root.join("c")]
    );
    let some = format!("{}/[ac]*", root.display());
    assert_eq!(
        resolve(Path::new(&some), Format::Megatron).unwrap(),
        vec![root.join("a"), root.join("c")]
    );
    let none = format!("{}/zz*", root.display());
    let (path, what, msg) = not_found(resolve(Path::new(&none), Format::Megatron));
    assert_eq!(path, Path::new(&none));
    assert!(
        what.contains("the glob matches no megatron shard"),
        "{what}"
    );
    assert!(msg.contains(&none), "{msg}");
}

/// A real path holding `[`, `?` or `*` (a run directory `run[1]`) was always read as a
/// glob, which matched nothing (`run[1]` matches `run1`): `inspect 'br/run[1]/web-00000'`
/// failed with "the glob matches no megatron shard". A path that exists as written is
/// that path; a glob that matches nothing and holds `[` says how to escape it.
#[test]
fn resolve_a_real_path_with_glob_characters_as_written() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run[1]");
    std::fs::create_dir_all(&run).unwrap();
    write_docs(&run, "web-00000", U16, &[vec![vec![1, 2]]]);
    let raw = dir.path().join("tokens?*.u16");
    write_u16(&raw, &[1, 0, 2, 0]);
    let web = run.join("web-00000");
    for arg in [
        web.clone(),
        with(&web, "idx"),
        with(&web, "bin"),
        run.clone(),
    ] {
        let got = resolve(&arg, Format::Megatron).unwrap_or_else(|e| panic!("{arg:?}: {e}"));
        assert_eq!(got, vec![web.clone()], "{}", arg.display());
    }
    assert_eq!(resolve(&raw, Format::Raw).unwrap(), vec![raw.clone()]);
    Shard::open(&web, None).unwrap();
    // As a glob, `[` needs escaping; unescaped, the error says so.
    let escaped = format!("{}/run[[]1]/*", dir.path().display());
    assert_eq!(
        resolve(Path::new(&escaped), Format::Megatron).unwrap(),
        vec![web.clone()]
    );
    let missing = dir.path().join("run[2]").join("web-00000");
    let (path, what, _) = not_found(resolve(&missing, Format::Megatron));
    assert_eq!(path, missing);
    assert!(
        what.contains("the glob matches no megatron shard; `[` is a glob character")
            && what.contains("write it as `[[]`"),
        "{what}"
    );
    // A glob without `[` gets no such note.
    let none = format!("{}/zz*", dir.path().display());
    let (_, what, _) = not_found(resolve(Path::new(&none), Format::Megatron));
    assert!(!what.contains("[[]"), "{what}");
}

#[test]
fn resolve_missing_bin() {
    let (_dir, root) = resolve_dir();
    let lonely = root.join("lonely");
    std::fs::write(with(&lonely, "idx"), b"x").unwrap();
    for arg in [lonely.clone(), with(&lonely, "idx"), with(&lonely, "bin")] {
        let (path, what, msg) = not_found(resolve(&arg, Format::Megatron));
        assert_eq!(path, with(&lonely, "bin"));
        assert!(what.contains("no such data file"), "{what}");
        assert!(
            msg.contains(&with(&lonely, "bin").display().to_string()),
            "{msg}"
        );
    }
    // In a directory or a glob, an incomplete pair is an error too, not a silent skip.
    let glob = format!("{}/*", root.display());
    for arg in [root.clone(), PathBuf::from(glob)] {
        let (path, what, _) = not_found(resolve(&arg, Format::Megatron));
        assert_eq!(path, with(&lonely, "bin"), "{}", arg.display());
        assert!(what.contains("lonely.idx has no data file"), "{what}");
    }
}

#[test]
fn resolve_missing_idx() {
    let (_dir, root) = resolve_dir();
    let orphan = root.join("orphan");
    std::fs::write(with(&orphan, "bin"), [0u8; 4]).unwrap();
    for arg in [orphan.clone(), with(&orphan, "bin")] {
        let (path, what, msg) = not_found(resolve(&arg, Format::Megatron));
        assert_eq!(path, with(&orphan, "idx"));
        assert!(what.contains("no such index file"), "{what}");
        assert!(msg.contains(&orphan.display().to_string()), "{msg}");
    }
    let (path, what, _) = not_found(resolve(&root, Format::Megatron));
    assert_eq!(path, with(&orphan, "idx"));
    assert!(what.contains("orphan.bin has no index"), "{what}");
}

#[test]
fn resolve_missing_path() {
    let (_dir, root) = resolve_dir();
    let nope = root.join("nope");
    let (path, what, msg) = not_found(resolve(&nope, Format::Megatron));
    assert_eq!(path, with(&nope, "idx"));
    assert!(what.contains("no such index file"), "{what}");
    assert!(msg.contains(&nope.display().to_string()), "{msg}");
    // A directory without shards.
    let empty = root.join("empty");
    std::fs::create_dir(&empty).unwrap();
    let (path, what, _) = not_found(resolve(&empty, Format::Megatron));
    assert_eq!(path, empty);
    assert!(
        what.contains("the directory holds no megatron shard"),
        "{what}"
    );
    // Raw files.
    let (path, what, msg) = not_found(resolve(&root.join("nope.u16"), Format::Raw));
    assert_eq!(path, root.join("nope.u16"));
    assert!(what.contains("no such token file"), "{what}");
    assert!(msg.contains("nope.u16"), "{msg}");
}

/// Issue 14, item 11: a device or FIFO named as a shard is reported as what it is, not
/// as missing, and opening one never blocks (a FIFO) or maps a device.
#[test]
fn a_shard_that_is_not_a_regular_file_is_named_as_such() {
    let err = resolve(Path::new("/dev/zero"), Format::Raw).unwrap_err();
    let msg = err.to_string();
    assert!(msg.starts_with("/dev/zero: "), "{msg}");
    assert!(
        msg.contains("is a character device, not a regular file"),
        "{msg}"
    );
    assert!(!msg.contains("no such"), "{msg}");
    let err = RawShard::open(Path::new("/dev/zero"), &raw_opts(DType::Uint16, 0, None))
        .unwrap_err()
        .to_string();
    assert!(err.contains("/dev/zero: is a character device"), "{err}");
    // A FIFO as a Megatron .bin: refused at once instead of blocking in open(2).
    let dir = tempfile::tempdir().unwrap();
    let prefix = write_docs(dir.path(), "s", U16, &[vec![vec![1, 2, 3]]]);
    let bin = with(&prefix, "bin");
    std::fs::remove_file(&bin).unwrap();
    let c = std::ffi::CString::new(bin.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo with a valid C string.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let err = millrace::corpus::Shard::open(&prefix, None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("is a FIFO, not a regular file"), "{err}");
    assert!(err.contains(&bin.display().to_string()), "{err}");
}

#[test]
fn resolve_raw_directory_skips_caches_and_sidecars() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    write_u16(&root.join("b.u16"), &[1, 0]);
    write_u16(&root.join("a.u16"), &[2, 0]);
    let opts = raw_opts(DType::Uint16, 0, None);
    // Opening writes caches next to the data; they must not look like shards.
    RawShard::open(&root.join("a.u16"), &opts).unwrap();
    RawShard::open(&root.join("b.u16"), &opts).unwrap();
    write_npy(&root.join("a.groups.npy"), "<u8", "(1,)", &[0; 8]);
    std::fs::write(root.join(".hidden"), b"x").unwrap();
    std::fs::write(root.join("c.u16.tmp123"), b"xx").unwrap();
    std::fs::create_dir(root.join("subdir")).unwrap();
    assert!(root.join("a.u16.uint16-eos0.mrdocs").exists());
    assert_eq!(
        resolve(root, Format::Raw).unwrap(),
        vec![root.join("a.u16"), root.join("b.u16")]
    );
    assert_eq!(
        resolve(&root.join("b.u16"), Format::Raw).unwrap(),
        vec![root.join("b.u16")]
    );
}

/// A README, a config or a manifest in a raw domain's directory was read as tokens (its
/// bytes are valid uint16 ids): a file whose extension is not a token file's is an
/// error naming it, and a glob still picks what it names.
#[test]
fn resolve_raw_directory_refuses_a_file_that_is_no_token_file() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    write_u16(&root.join("a.npy"), &[2, 0]);
    write_u16(&root.join("train"), &[3, 0]);
    assert_eq!(
        resolve(root, Format::Raw).unwrap(),
        vec![root.join("a.npy"), root.join("train")]
    );
    std::fs::write(root.join("README.md"), b"# the corpus\n").unwrap();
    let err = resolve(root, Format::Raw).unwrap_err().to_string();
    assert!(err.contains("README.md"), "{err}");
    assert!(err.contains("extension .md is not a token file's"), "{err}");
    assert_eq!(
        resolve(&root.join("*.npy"), Format::Raw).unwrap(),
        vec![root.join("a.npy")]
    );
}

/// A dangling symbolic link among a directory's shards or a glob's matches (a link farm
/// whose target file system went away) was left out silently, moving the mixture,
/// while naming it was an error: it is an error naming the link.
#[test]
fn resolve_refuses_a_dangling_link_among_shards() {
    let (dir, root) = resolve_dir();
    let gone = dir.path().join("gone");
    std::os::unix::fs::symlink(gone.join("z.idx"), root.join("z.idx")).unwrap();
    std::os::unix::fs::symlink(gone.join("z.bin"), root.join("z.bin")).unwrap();
    for arg in [root.clone(), root.join("*.idx")] {
        let err = resolve(&arg, Format::Megatron).unwrap_err().to_string();
        assert!(err.contains("z."), "{}: {err}", arg.display());
        assert!(err.contains("a dangling link?"), "{}: {err}", arg.display());
    }
    // A raw directory too, and a link to a device is named as one.
    let raw = tempfile::tempdir().unwrap();
    write_u16(&raw.path().join("a.u16"), &[2, 0]);
    std::os::unix::fs::symlink("/dev/zero", raw.path().join("b.u16")).unwrap();
    let err = resolve(raw.path(), Format::Raw).unwrap_err().to_string();
    assert!(
        err.contains("b.u16") && err.contains("a character device"),
        "{err}"
    );
}

// ---------------------------------------------------------------------------------------
// The command line
// ---------------------------------------------------------------------------------------

fn run_cli(args: &[&std::ffi::OsStr]) -> (bool, String, String) {
    let out = common::bin().args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn cli_corpus() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("corpus");
    std::fs::create_dir(&root).unwrap();
    // a: 2 documents, 3 sequences, 6 tokens; b: 3 documents, 3 sequences, 4 tokens.
    let a = write_docs(
        &root,
        "a",
        U16,
        &[vec![vec![1, 2], vec![3]], vec![vec![4, 5, 6]]],
    );
    write_groups(&a, &[10, 11]);
    write_docs(
        &root,
        "b",
        U16,
        &[vec![vec![7]], vec![vec![]], vec![vec![8, 9, 65535]]],
    );
    (dir, root)
}

/// `inspect --config` "exits 0 only if every shard is valid", and operators are sent to
/// it to check a shard: one whose dtype code turned from int32 (4) into float32 (7)
/// passed it, while `check-config` and the daemon refused it.
#[test]
fn cli_inspect_refuses_float_tokens_as_check_config_does() {
    let dir = tempfile::tempdir().unwrap();
    // An int32 shard (code 4) whose code byte became 7: the same item size, so every
    // size check and the linear validation pass.
    let f = write_docs(
        dir.path(),
        "f",
        CODES[3],
        &[vec![vec![1, 2]], vec![vec![3]]],
    );
    let idx = with(&f, "idx");
    let mut bytes = std::fs::read(&idx).unwrap();
    assert_eq!(bytes[17], 4);
    bytes[17] = 7;
    std::fs::write(&idx, &bytes).unwrap();
    let config = dir.path().join("run.toml");
    std::fs::write(
        &config,
        "[corpus]\n[[corpus.domain]]\nname = \"f\"\nshards = [\"f\"]\n",
    )
    .unwrap();
    let (ok, out, err) = run_cli(&["inspect".as_ref(), "--config".as_ref(), config.as_os_str()]);
    assert!(!ok, "inspect --config passed a float32 shard: {out}");
    assert!(
        err.contains("f.idx") && err.contains("dtype code 7 (float32) at byte 17"),
        "{err}"
    );
    // Named alone, it is a valid Megatron file, shown with a warning.
    let (ok, out, err) = run_cli(&["inspect".as_ref(), f.as_os_str()]);
    assert!(ok, "{err}");
    assert!(out.contains("float32"), "{out}");
    assert!(
        err.contains("warning:") && err.contains("check-config and the daemon refuse it"),
        "{err}"
    );
}

#[test]
fn cli_inspect_valid_directory() {
    let (_dir, root) = cli_corpus();
    let (ok, out, err) = run_cli(&["inspect".as_ref(), root.as_os_str()]);
    assert!(ok, "stderr: {err}");
    assert!(out.contains("total (2 shards)"), "{out}");
    assert!(out.contains(&root.join("a").display().to_string()), "{out}");

    let (ok, out, err) = run_cli(&["inspect".as_ref(), "--json".as_ref(), root.as_os_str()]);
    assert!(ok, "stderr: {err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let t = &v["total"];
    assert_eq!(t["shards"], 2);
    assert_eq!(t["documents"], 5);
    assert_eq!(t["sequences"], 6);
    assert_eq!(t["tokens"], 10);
    assert_eq!(t["bytes"], 20);
    assert_eq!(t["groups"], 2);
    assert_eq!(t["lengths"]["min"], 0);
    assert_eq!(t["lengths"]["max"], 3);
    let shards = v["shards"].as_array().unwrap();
    assert_eq!(shards.len(), 2);
    assert_eq!(shards[0]["path"], root.join("a").display().to_string());
    assert_eq!(shards[0]["documents"], 2);
    assert_eq!(shards[0]["dtype"], "uint16");
    assert_eq!(shards[0]["format"], "megatron");
    assert_eq!(shards[1]["tokens"], 4);
    assert_eq!(shards[1]["groups"], serde_json::Value::Null);
    let hist: u64 = t["histogram"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["count"].as_u64().unwrap())
        .sum();
    assert_eq!(hist, 5);
}

#[test]
fn cli_inspect_corrupt_shard_fails_cleanly() {
    let (_dir, root) = cli_corpus();
    // Bad at open: unsupported version.
    let (mut index, bin) = fixture();
    index.version = 3;
    let bad = put(&root, "bad", &index, &bin);
    let (ok, out, err) = run_cli(&["inspect".as_ref(), root.as_os_str()]);
    assert!(!ok, "stdout: {out}");
    assert!(
        err.contains(&with(&bad, "idx").display().to_string()),
        "{err}"
    );
    assert!(
        err.contains("unsupported index version 3 at byte 9"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");

    // Opens fine, fails the full validation that inspect runs.
    let (mut index, bin) = fixture();
    index.pointers[3] = 1000;
    put(&root, "bad", &index, &bin);
    let (ok, _, err) = run_cli(&["inspect".as_ref(), "--json".as_ref(), root.as_os_str()]);
    assert!(!ok);
    assert!(
        err.contains(&with(&bad, "idx").display().to_string()),
        "{err}"
    );
    assert!(
        err.contains("sequence 3 pointer is 1000, expected 16"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");

    // A missing path.
    let nope = root.join("nope");
    let (ok, _, err) = run_cli(&["inspect".as_ref(), nope.as_os_str()]);
    assert!(!ok);
    assert!(err.contains(&nope.display().to_string()), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn cli_inspect_doc_range_json() {
    let (_dir, root) = cli_corpus();
    let (ok, out, err) = run_cli(&[
        "inspect".as_ref(),
        root.as_os_str(),
        "--doc".as_ref(),
        "1..3".as_ref(),
        "--json".as_ref(),
    ]);
    assert!(ok, "stderr: {err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let docs = v["documents"].as_array().unwrap();
    assert_eq!(docs.len(), 2);
    // Document 1 is a's second; document 2 is b's first (the range crosses shards).
    assert_eq!(docs[0]["index"], 1);
    assert_eq!(docs[0]["local_index"], 1);
    assert_eq!(docs[0]["shard"], root.join("a").display().to_string());
    assert_eq!(docs[0]["group"], 11);
    assert_eq!(docs[0]["tokens"], serde_json::json!([4, 5, 6]));
    assert_eq!(docs[1]["index"], 2);
    assert_eq!(docs[1]["local_index"], 0);
    assert_eq!(docs[1]["shard"], root.join("b").display().to_string());
    assert_eq!(docs[1]["group"], serde_json::Value::Null);
    assert_eq!(docs[1]["tokens"], serde_json::json!([7]));

    // Past the end: a clear error.
    let (ok, _, err) = run_cli(&[
        "inspect".as_ref(),
        root.as_os_str(),
        "--doc".as_ref(),
        "4..6".as_ref(),
    ]);
    assert!(!ok);
    assert!(
        err.contains("--doc 4..6 is outside the 5 documents"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn cli_inspect_raw_needs_eos() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.u16");
    write_u16(&path, &[1, 2, 0, 3]);
    let (ok, _, err) = run_cli(&[
        "inspect".as_ref(),
        "--format".as_ref(),
        "raw".as_ref(),
        path.as_os_str(),
    ]);
    assert!(!ok);
    assert!(err.contains("--format raw needs --eos"), "{err}");
    assert!(!err.contains("panicked"), "{err}");

    let (ok, out, err) = run_cli(&[
        "inspect".as_ref(),
        "--format".as_ref(),
        "raw".as_ref(),
        "--eos".as_ref(),
        "0".as_ref(),
        "--json".as_ref(),
        path.as_os_str(),
    ]);
    assert!(ok, "stderr: {err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["total"]["documents"], 2);
    assert_eq!(v["total"]["tokens"], 4);
    assert_eq!(v["shards"][0]["format"], "raw");

    // Raw-only flags on a Megatron inspect are refused rather than ignored.
    let (_d, prefix) = cli_corpus();
    let (ok, _, err) = run_cli(&[
        "inspect".as_ref(),
        "--dtype".as_ref(),
        "uint32".as_ref(),
        prefix.as_os_str(),
    ]);
    assert!(!ok);
    assert!(err.contains("add --format raw"), "{err}");
}

#[test]
fn raw_cache_rebuilt_after_a_same_size_rewrite_that_kept_its_mtime() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.u16");
    write_u16(&path, &[1, 0, 2, 2, 0]);
    let opts = raw_opts(DType::Uint16, 0, None);
    assert!(RawShard::open(&path, &opts).unwrap().cache_rebuilt());
    let mtime = std::fs::metadata(&path).unwrap().modified().unwrap();
    write_u16(&path, &[1, 1, 0, 2, 0]);
    std::fs::File::options()
        .write(true)
        .open(&path)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    let r = RawShard::open(&path, &opts).unwrap();
    assert!(r.cache_rebuilt(), "same size and mtime, different content");
    assert_eq!(raw_docs(&r), vec![vec![1, 1, 0], vec![2, 0]]);
}

#[test]
fn identity_follows_content_not_mount_path() {
    let dir = tempfile::tempdir().unwrap();
    let docs = common::simple_docs(&[5, 9, 2], 60000);
    let a = write_docs(&dir.path().join(""), "x", U16, &docs);
    let other = dir.path().join("mnt2");
    std::fs::create_dir(&other).unwrap();
    let b = write_docs(&other, "x", U16, &docs);
    let ia = Shard::open(&a, None).unwrap().identity().unwrap();
    let ib = Shard::open(&b, None).unwrap().identity().unwrap();
    assert_eq!(ia, ib, "same shard mounted at two paths");
    assert_eq!((ia.documents, ia.tokens, ia.name.as_str()), (3, 16, "x"));

    let c = write_docs(&other, "y", U16, &common::simple_docs(&[5, 9, 3], 60000));
    let ic = Shard::open(&c, None).unwrap().identity().unwrap();
    assert_ne!(
        ia.index_hash, ic.index_hash,
        "a different index hashes differently"
    );
}

/// Found by the fuzzer (tests/fuzz, target `megatron`): a shard that opens (its O(1)
/// checks pass) but whose every document is corrupt, planned before its validation has
/// run (a daemon plans at start and validates in the background). Each document reads
/// as 0 tokens and poisons the shard, so the domain's windows are all empty; the stream
/// searched a million of them for rows at every step, re-reading every length each
/// time (more than 50 s for one step of a 9-document shard under the fuzzer). It now
/// gives up after two epochs of empty windows, and the shard's poison names the
/// document at fault.
#[test]
fn an_unvalidated_shard_of_corrupt_documents_plans_without_spinning() {
    use millrace::config::plan::{DomainSettings, Packing, PlanConfig};
    use millrace::plan::{DocSource, DomainInput, Plan};
    use std::sync::Arc;

    let dir = tempfile::tempdir().unwrap();
    let prefix = dir.path().join("corrupt");
    // Minimized from the fuzzer's input: uint8, 2 sequences of 3 and 4 tokens at 0 and
    // 3, document_indices [0, 7, 2]: both ends right, both documents out of order.
    let mut idx = b"MMIDIDX\0\0".to_vec();
    idx.extend(1u64.to_le_bytes()); // version
    idx.push(1); // dtype code: uint8
    idx.extend(2u64.to_le_bytes()); // sequences
    idx.extend(3u64.to_le_bytes()); // document_indices entries
    for len in [3i32, 4] {
        idx.extend(len.to_le_bytes());
    }
    for ptr in [0i64, 3] {
        idx.extend(ptr.to_le_bytes());
    }
    for d in [0i64, 7, 2] {
        idx.extend(d.to_le_bytes());
    }
    std::fs::write(with(&prefix, "idx"), &idx).unwrap();
    std::fs::write(with(&prefix, "bin"), [1u8, 2, 3, 4, 5, 6, 7]).unwrap();
    let shard = Arc::new(Shard::open(&prefix, None).expect("the O(1) checks pass"));
    assert!(
        shard.validate().is_err(),
        "the full pass sees the corruption"
    );

    let src: Arc<dyn DocSource> = shard.clone();
    let inputs = [DomainInput {
        name: "d".into(),
        shards: vec![("d/corrupt".into(), src)],
        settings: DomainSettings::default(),
    }];
    let cfg = PlanConfig {
        seed: 1,
        seq_len: 16,
        global_batch_rows: 4,
        packing: Packing::BestFit,
        best_fit_window: 8,
        eod_token: None,
        pad_token: 0,
        vocab_size: None,
        weights: Some([("d".to_string(), 1.0)].into()),
        schedule: Vec::new(),
        skip: Vec::new(),
        reseed: Vec::new(),
        stage: Vec::new(),
    };
    let plan = Arc::new(Plan::new(&inputs, cfg, 1).expect("the plan builds"));
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut p = plan.start();
        let rows: Vec<usize> = (0..3).map(|_| p.next_batch().rows.len()).collect();
        let _ = tx.send((rows, p.stream(0).map(|s| s.epoch)));
    });
    let (rows, epoch) = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("three steps planned within 60 s");
    // Nothing to give: no rows, and a step searched at most 2 * units + 2 empty windows
    // (here each window is a whole epoch of the 2 documents): 3,000,000 epochs before.
    assert_eq!(rows, vec![0, 0, 0]);
    let epoch = epoch.expect("one stream");
    assert!(
        epoch <= 3 * 6,
        "the stream searched {epoch} epochs of empty windows"
    );
    let why = shard
        .poisoned()
        .expect("a corrupt document poisons the shard");
    assert!(why.contains("corrupt.idx: document "), "{why}");
    assert!(why.contains("document_indices gives sequences"), "{why}");
}

/// Found by the fuzzer (tests/fuzz, target `npy`): a group sidecar whose header nests
/// `{` 53 deep (a 250-byte file) held `Groups::open` past the fuzzer's 5 s limit, and a
/// daemon's start with it, in npyz's header parser (py_literal, a backtracking PEG
/// parser). A sidecar's header is a dict holding a shape tuple, so nesting past that
/// is refused before the parser sees it, naming the byte.
#[test]
fn a_groups_sidecar_header_nested_deep_is_refused_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.groups.npy");
    // Minimized from the fuzzer's input: a version 1.0 header of 30 nested `{`.
    let mut text = b"{'descr': '<u8', 'fortran_order': False, 'shape': (3,), 'x': ".to_vec();
    text.extend([b'{'; 30]);
    text.push(b'\n');
    let mut npy = b"\x93NUMPY\x01\x00".to_vec();
    npy.extend((text.len() as u16).to_le_bytes());
    npy.extend(&text);
    npy.extend([0u8; 24]);
    std::fs::write(&path, &npy).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let p = path.clone();
    std::thread::spawn(move || {
        let _ = tx.send(Groups::open(&p, 3).map(|_| ()));
    });
    let r = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the sidecar is judged within 30 s");
    let e = expect_err(r, "a header nested 31 deep");
    assert_invalid(&e, &path, &["header", "nests", "byte 73"]);
}
