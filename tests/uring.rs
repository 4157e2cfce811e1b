//! The span readers of src/serve/uring.rs on real shards written by `MegatronWriter`:
//! io_uring (buffered and O_DIRECT) and pread fill a destination byte for byte as the
//! mmap copy does, for random spans of random documents; truncated shards and bad spans
//! fail with errors naming the file and the bytes. Where the kernel refuses io_uring
//! (old kernel, seccomp, `io_uring_disabled`), the io_uring checks assert the refusal is
//! the typed "unavailable" error and that `SpanReader` falls back to pread, and print why;
//! a seccomp filter on one test thread makes that refusal happen on every machine.

use std::path::{Path, PathBuf};

use millrace::corpus::MegatronWriter;
use millrace::corpus::{DType, Shard};
use millrace::plan::Segment;
use millrace::serve::uring::{
    data_path, segment_span, PreadReader, ReadError, ShardFiles, Span, SpanReader, UringOptions,
    UringReader,
};
use rand::{Rng, SeedableRng};
use rand_pcg::Pcg64;

/// Writes `shards` uint16 Megatron shards of random documents (1..6000 tokens) and opens
/// them as the daemon does.
fn shards(dir: &Path, count: usize, rng: &mut Pcg64) -> Vec<Shard> {
    (0..count)
        .map(|i| {
            let prefix = dir.join(format!("s{i}"));
            let mut w = MegatronWriter::create(&prefix, DType::Uint16).unwrap();
            for _ in 0..rng.gen_range(20..60) {
                let n = rng.gen_range(1..6000usize);
                let doc: Vec<u8> = (0..n * 2).map(|_| rng.gen()).collect();
                w.add_document_bytes(&doc).unwrap();
            }
            w.finish().unwrap();
            Shard::open(&prefix, None).unwrap()
        })
        .collect()
}

/// Random segments as a planned step has them (a random piece of a random document),
/// packed one after another into a destination, with the destination the mmap copy
/// fills: the reference every reader must equal.
fn plan(shards: &[Shard], pieces: usize, rng: &mut Pcg64) -> (Vec<Span>, Vec<u8>) {
    let mut spans = Vec::new();
    let mut expect = Vec::new();
    for _ in 0..pieces {
        let file = rng.gen_range(0..shards.len());
        let shard = &shards[file];
        let doc = rng.gen_range(0..shard.documents());
        let doc_len = shard.doc_len(doc).unwrap();
        let start = rng.gen_range(0..doc_len);
        let len = rng.gen_range(1..=doc_len - start) as u32;
        let seg = Segment {
            shard: file as u32,
            doc,
            start,
            len,
            doc_len,
            group: None,
        };
        // An odd gap now and then, so destinations are not block-aligned either.
        expect.resize(expect.len() + rng.gen_range(0..3), 0xAB);
        let span = segment_span(shard, file as u32, &seg, expect.len() as u64)
            .unwrap()
            .unwrap();
        let t = shard.doc_tokens(doc).unwrap();
        let b = t.as_bytes();
        expect.extend_from_slice(&b[start as usize * 2..(start as usize + len as usize) * 2]);
        spans.push(span);
    }
    (spans, expect)
}

/// A temporary directory of `count` random shards, and their token files.
fn setup(seed: u64, count: usize) -> (tempfile::TempDir, Pcg64, Vec<Shard>, Vec<PathBuf>) {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Pcg64::seed_from_u64(seed);
    let shards = shards(dir.path(), count, &mut rng);
    let paths = shards.iter().map(|s| data_path(s).to_path_buf()).collect();
    (dir, rng, shards, paths)
}

/// Reads into a buffer pre-filled like the reference's gaps, so untouched bytes match.
fn fill(read: impl FnOnce(&mut [u8]) -> Result<(), ReadError>, len: usize) -> Vec<u8> {
    let mut dst = vec![0xABu8; len];
    read(&mut dst).unwrap();
    dst
}

/// The io_uring reader, or `None` after checking that the refusal is the typed
/// "unavailable" error and that `SpanReader` then reads with pread.
fn uring_or_skip(paths: &[PathBuf], opts: UringOptions) -> Option<UringReader> {
    match UringReader::open(paths, opts) {
        Ok(r) => Some(r),
        Err(e) => {
            assert!(e.is_unavailable(), "setup failed for another reason: {e}");
            assert!(e.to_string().starts_with("io_uring is unavailable"), "{e}");
            let fallback = SpanReader::open(paths, opts).unwrap();
            assert!(matches!(fallback, SpanReader::Pread(_, ref why) if *why == e.to_string()));
            eprintln!("skipping the io_uring checks: {e}");
            None
        }
    }
}

/// The O_DIRECT io_uring reader, or `None` where the temp filesystem refuses O_DIRECT
/// (tmpfs, some overlays).
fn direct_or_skip(paths: &[PathBuf], opts: UringOptions) -> Option<UringReader> {
    match UringReader::open(paths, opts) {
        Ok(r) => Some(r),
        Err(ReadError::Open {
            direct: true,
            ref source,
            ..
        }) if source.raw_os_error() == Some(libc::EINVAL) => {
            eprintln!("skipping O_DIRECT: the temp filesystem refuses it");
            None
        }
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn io_uring_buffered_direct_and_pread_equal_the_mmap_copy() {
    let (_dir, mut rng, shards, paths) = setup(15, 3);
    let mut pread = PreadReader::open(&paths).unwrap();
    let mut best = SpanReader::open(&paths, UringOptions::default()).unwrap();
    for round in 0..4 {
        let (spans, expect) = plan(&shards, 64, &mut rng);
        let n = expect.len();
        assert!(
            fill(|d| pread.read(&spans, d), n) == expect,
            "pread, round {round}"
        );
        assert!(
            fill(|d| best.read(&spans, d), n) == expect,
            "best reader, round {round}"
        );
    }
    // Small reads and a shallow queue: spans split into many pieces, slots reused.
    let small = UringOptions {
        depth: 2,
        max_op_bytes: 4096,
        direct: false,
    };
    let Some(mut uring) = uring_or_skip(&paths, small) else {
        return;
    };
    assert!(matches!(best, SpanReader::Uring(_)));
    for round in 0..4 {
        let (spans, expect) = plan(&shards, 64, &mut rng);
        assert!(
            fill(|d| uring.read(&spans, d), expect.len()) == expect,
            "buffered, round {round}"
        );
    }
    // Readers over one set of open files (the daemon's pool): each registers the same
    // descriptors and opens none; reads interleave; the files' mode wins over `direct`.
    let files = ShardFiles::open(&paths, false).unwrap();
    let mut a = UringReader::open_with(files.clone(), small).unwrap();
    let mut b = UringReader::open_with(
        files.clone(),
        UringOptions {
            direct: true,
            ..UringOptions::default()
        },
    )
    .unwrap();
    assert_eq!(std::sync::Arc::strong_count(&files), 3);
    for round in 0..4 {
        let (spans, expect) = plan(&shards, 64, &mut rng);
        let r = if round % 2 == 0 { &mut a } else { &mut b };
        assert!(
            fill(|d| r.read(&spans, d), expect.len()) == expect,
            "shared files, round {round}"
        );
    }
    drop((a, b));
    assert_eq!(std::sync::Arc::strong_count(&files), 1);
    for opts in [
        UringOptions {
            direct: true,
            ..UringOptions::default()
        },
        UringOptions {
            direct: true,
            ..small
        },
    ] {
        let Some(mut direct) = direct_or_skip(&paths, opts) else {
            return;
        };
        for round in 0..4 {
            let (spans, expect) = plan(&shards, 64, &mut rng);
            assert!(
                fill(|d| direct.read(&spans, d), expect.len()) == expect,
                "direct {opts:?}, round {round}"
            );
        }
        // A whole file from byte 0, block-aligned at both ends, into an aligned place of
        // the destination: the read goes straight in, with no bounce.
        let whole = std::fs::read(&paths[0]).unwrap();
        let blocks = whole.len() / 4096 * 4096;
        let mut dst = vec![0u8; blocks + 8192];
        let at = dst.as_ptr().align_offset(4096);
        let span = Span {
            file: 0,
            offset: 0,
            len: blocks as u64,
            dst: at as u64,
        };
        direct.read(&[span], &mut dst).unwrap();
        assert!(dst[at..at + blocks] == whole[..blocks]);
    }
}

#[test]
fn a_span_past_the_end_of_its_file_is_a_truncated_shard_naming_file_and_bytes() {
    let (_dir, _, _, paths) = setup(3, 1);
    let len = std::fs::metadata(&paths[0]).unwrap().len();
    // Spans planned against the shard as it was; then the file loses its last 100 bytes.
    let spans = [
        Span {
            file: 0,
            offset: 0,
            len: 64,
            dst: 0,
        },
        Span {
            file: 0,
            offset: len - 300,
            len: 300,
            dst: 64,
        },
    ];
    let mut readers: Vec<(&str, SpanReader)> = vec![(
        "pread",
        SpanReader::Pread(PreadReader::open(&paths).unwrap(), String::new()),
    )];
    if let Some(r) = uring_or_skip(&paths, UringOptions::default()) {
        readers.push(("uring", SpanReader::Uring(Box::new(r))));
        let direct = UringOptions {
            direct: true,
            ..UringOptions::default()
        };
        if let Ok(r) = UringReader::open(&paths, direct) {
            readers.push(("direct", SpanReader::Uring(Box::new(r))));
        }
    }
    std::fs::OpenOptions::new()
        .write(true)
        .open(&paths[0])
        .unwrap()
        .set_len(len - 100)
        .unwrap();
    for (name, r) in &mut readers {
        let mut dst = vec![0u8; 364];
        let e = r.read(&spans, &mut dst).unwrap_err();
        let msg = e.to_string();
        assert!(
            matches!(e, ReadError::Truncated { file_len, .. } if file_len == len - 100),
            "{name}: {msg}"
        );
        assert!(
            msg.contains(&paths[0].display().to_string()),
            "{name}: {msg}"
        );
        assert!(
            msg.contains(&format!("{}..{len}", len - 300)),
            "{name}: {msg}"
        );
        assert!(
            msg.contains(&format!("ends at byte {}", len - 100)),
            "{name}: {msg}"
        );
        // The first span was read in full before the error.
        assert!(
            dst[..64] == std::fs::read(&paths[0]).unwrap()[..64],
            "{name}"
        );
    }
}

#[test]
fn spans_outside_the_files_or_the_destination_fail_before_any_read() {
    let (dir, _, _, paths) = setup(4, 1);
    let mut readers = vec![SpanReader::Pread(
        PreadReader::open(&paths).unwrap(),
        String::new(),
    )];
    if let Some(r) = uring_or_skip(&paths, UringOptions::default()) {
        readers.push(SpanReader::Uring(Box::new(r)));
    }
    for r in &mut readers {
        let mut dst = vec![0u8; 100];
        let e = r
            .read(
                &[Span {
                    file: 1,
                    offset: 0,
                    len: 10,
                    dst: 0,
                }],
                &mut dst,
            )
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("file index outside the 1 registered"),
            "{e}"
        );
        let e = r
            .read(
                &[Span {
                    file: 0,
                    offset: 0,
                    len: 10,
                    dst: 95,
                }],
                &mut dst,
            )
            .unwrap_err();
        assert!(
            e.to_string().contains("past the 100-byte destination"),
            "{e}"
        );
        let e = r
            .read(
                &[Span {
                    file: 0,
                    offset: u64::MAX,
                    len: 10,
                    dst: 0,
                }],
                &mut dst,
            )
            .unwrap_err();
        assert!(e.to_string().contains("overflows"), "{e}");
        assert!(dst.iter().all(|&b| b == 0));
    }
    let e = PreadReader::open(&[dir.path().join("missing.bin")]).unwrap_err();
    assert!(e.to_string().contains("missing.bin: open"), "{e}");
}

#[test]
fn where_seccomp_refuses_io_uring_the_reader_says_so_and_falls_back_to_pread() {
    let (_dir, mut rng, shards, paths) = setup(5, 2);
    let (spans, expect) = plan(&shards, 32, &mut rng);
    for errno in [libc::ENOSYS, libc::EPERM] {
        let (paths, spans, expect) = (paths.clone(), spans.clone(), expect.clone());
        // A thread of its own: the filter stays with the thread that installed it.
        std::thread::spawn(move || {
            if !millrace::sys::refuse_io_uring_in_this_thread(errno) {
                eprintln!("skipping: the kernel refused a seccomp filter");
                return;
            }
            let e = UringReader::open(&paths, UringOptions::default()).unwrap_err();
            assert!(e.is_unavailable(), "{e}");
            let why = e.to_string();
            assert!(
                why.starts_with("io_uring is unavailable: io_uring_setup: "),
                "{why}"
            );
            assert!(
                why.contains(&std::io::Error::from_raw_os_error(errno).to_string()),
                "{why}"
            );
            let mut r = SpanReader::open(&paths, UringOptions::default()).unwrap();
            assert!(matches!(r, SpanReader::Pread(_, ref w) if *w == why));
            assert!(fill(|d| r.read(&spans, d), expect.len()) == expect);
        })
        .join()
        .unwrap();
    }
}

/// Each of `docs` random documents cut into 1..8 pieces, packed in order one after
/// another, as a group's documents (or a long document's pieces) fill a row: every
/// piece continues the last in the file and in the destination.
fn runs(shards: &[Shard], docs: usize, rng: &mut Pcg64) -> (Vec<Span>, Vec<u8>) {
    let mut spans = Vec::new();
    let mut expect = Vec::new();
    for _ in 0..docs {
        let file = rng.gen_range(0..shards.len());
        let shard = &shards[file];
        let doc = rng.gen_range(0..shard.documents());
        let doc_len = shard.doc_len(doc).unwrap();
        let mut cuts: Vec<u64> = (0..rng.gen_range(0..8))
            .map(|_| rng.gen_range(0..=doc_len))
            .chain([0, doc_len])
            .collect();
        cuts.sort_unstable();
        // A gap before every document, so two documents never continue each other.
        expect.resize(expect.len() + 1, 0xAB);
        for w in cuts.windows(2) {
            let seg = Segment {
                shard: file as u32,
                doc,
                start: w[0],
                len: (w[1] - w[0]) as u32,
                doc_len,
                group: None,
            };
            if let Some(span) = segment_span(shard, file as u32, &seg, expect.len() as u64).unwrap()
            {
                spans.push(span);
            }
            let b = shard.doc_tokens(doc).unwrap().as_bytes();
            expect.extend_from_slice(&b[w[0] as usize * 2..w[1] as usize * 2]);
        }
    }
    (spans, expect)
}

#[test]
fn spans_that_continue_each_other_are_read_as_one() {
    let (_dir, mut rng, shards, paths) = setup(16, 3);
    for direct in [false, true] {
        let opts = UringOptions {
            direct,
            ..UringOptions::default()
        };
        let Some(mut r) = (if direct {
            direct_or_skip(&paths, opts)
        } else {
            uring_or_skip(&paths, opts)
        }) else {
            return;
        };
        for round in 0..4 {
            let (spans, expect) = runs(&shards, 16, &mut rng);
            let before = r.reads();
            assert!(
                fill(|d| r.read(&spans, d), expect.len()) == expect,
                "direct {direct}, round {round}"
            );
            // Documents are under 12 KB, one 128 KiB read each however they were cut.
            assert_eq!(r.reads() - before, 16, "direct {direct}, round {round}");
            assert!(spans.len() > 16, "the pieces were cut");
        }
    }
}
