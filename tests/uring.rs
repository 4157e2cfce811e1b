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

/// Whether thread `tid` of this process is blocked in a system call that is a wait for
/// the read (`futex`, as in a contended allocation, only once `returned`): the number in
/// `/proc/self/task/TID/syscall` ("running" while it runs).
fn waiting(tid: i32, returned: &std::sync::atomic::AtomicBool) -> bool {
    let nr = std::fs::read_to_string(format!("/proc/self/task/{tid}/syscall"))
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<i64>().ok());
    match nr {
        Some(libc::SYS_futex) => returned.load(std::sync::atomic::Ordering::Acquire),
        Some(nr) => nr >= 0,
        None => false,
    }
}

/// Regression: when `io_uring_enter` failed while reads were in the kernel, `read`
/// returned at once, and those reads went on writing into the destination (a ring's
/// slot, or an O_DIRECT bounce buffer) after the fill had failed and the slot or the
/// buffer had been handed on. A read that fails now returns only once no read it
/// submitted can write anything, and a reader whose `io_uring_enter` failed is not used
/// again (entries the kernel did not take are still queued in its ring).
///
/// The read left in the kernel is of a FIFO that holds no byte until the test writes some
/// (the thread reading waits by then); the failure is another span's (one past the end
/// of its file: truncated), `io_uring_enter`'s own (a seccomp filter refuses the calls
/// that only wait, after the one that submitted the reads), or both. The
/// destination as `read` returned it must be what it holds once the FIFO's bytes were
/// taken.
#[test]
fn a_failed_read_returns_only_once_nothing_can_write_into_the_destination() {
    use std::io::Write;
    use std::sync::mpsc;
    let dir = tempfile::tempdir().unwrap();
    let (file, fifo) = (dir.path().join("s.bin"), dir.path().join("fifo"));
    std::fs::write(&file, [7u8; 4096]).unwrap();
    use rustix::fs::{FileType, Mode};
    rustix::fs::mknodat(
        rustix::fs::CWD,
        &fifo,
        FileType::Fifo,
        Mode::RUSR | Mode::WUSR,
        0,
    )
    .unwrap();
    let paths = vec![file.clone(), fifo.clone()];
    let span = |file, offset, dst| Span {
        file,
        offset,
        len: 4096,
        dst,
    };
    // (a span is truncated, io_uring_enter refuses to wait): one, the other, both.
    for (truncated, refuse_waits) in [(true, false), (false, true), (true, true)] {
        let what = format!("truncated {truncated}, io_uring_enter refused {refuse_waits}");
        // Read and write: a FIFO opened so never blocks, and is the writer the reader's
        // own open (read only) would wait for.
        let mut writer = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&fifo)
            .unwrap();
        let Some(mut r) = uring_or_skip(&paths, UringOptions::default()) else {
            return;
        };
        let mut spans = vec![span(0, 0, 0), span(1, 0, 4096)];
        if truncated {
            spans.push(span(0, 4096, 8192));
        }
        let (tid_tx, tid_rx) = mpsc::channel();
        let (taken_tx, taken_rx) = mpsc::channel::<()>();
        let returned = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let returned_in = returned.clone();
        let reader = std::thread::spawn(move || {
            if refuse_waits && !millrace::sys::refuse_io_uring_waits_in_this_thread(libc::EPERM) {
                tid_tx.send(None).unwrap();
                return None;
            }
            let mut dst = vec![0xEEu8; 3 * 4096];
            tid_tx
                .send(Some(rustix::thread::gettid().as_raw_nonzero().get()))
                .unwrap();
            let result = r.read(&spans, &mut dst);
            let at_return = dst.clone();
            returned_in.store(true, std::sync::atomic::Ordering::Release);
            // Until the FIFO's bytes were taken, by this read or by one left in flight.
            taken_rx.recv().unwrap();
            Some((r, result, at_return, dst))
        });
        let Some(tid) = tid_rx.recv().unwrap() else {
            eprintln!("skipping: the kernel refused a seccomp filter");
            return;
        };
        let t0 = std::time::Instant::now();
        while !waiting(tid, &returned) {
            assert!(
                t0.elapsed().as_secs() < 30,
                "{what}: the reader never waited"
            );
            std::thread::yield_now();
        }
        writer.write_all(&[0x5A; 4096]).unwrap();
        while rustix::io::ioctl_fionread(&writer).unwrap() > 0 {
            assert!(
                t0.elapsed().as_secs() < 30,
                "{what}: nothing took the FIFO's bytes"
            );
            std::thread::yield_now();
        }
        taken_tx.send(()).unwrap();
        let (mut r, result, at_return, dst) = reader.join().unwrap().unwrap();
        let e = result.unwrap_err();
        let msg = e.to_string();
        // The first failure is the one reported: the span's (read within the call that
        // submitted it), which names its file.
        if !truncated {
            assert!(
                matches!(&e, ReadError::Ring { source, .. } if source.raw_os_error() == Some(libc::EPERM)),
                "{what}: {msg}"
            );
        } else {
            assert!(
                matches!(&e, ReadError::Truncated { file_len: 4096, .. })
                    && msg.contains(&file.display().to_string()),
                "{what}: {msg}"
            );
        }
        assert!(
            at_return == dst,
            "{what}: the destination changed after read returned {msg}"
        );
        assert!(
            dst[..4096].iter().all(|&b| b == 7) && dst[4096..8192].iter().all(|&b| b == 0x5A),
            "{what}: the reads were not all reaped before read returned"
        );
        // A reader whose io_uring_enter failed is not used again (and says so, whichever
        // error it returned, so that the daemon's pool drops it); one whose span failed is.
        assert_eq!(r.is_broken(), refuse_waits, "{what}");
        let again = r.read(&[span(0, 0, 0)], &mut vec![0u8; 4096]);
        assert_eq!(again.is_err(), refuse_waits, "{what}: {again:?}");
    }
}

/// The same from a disk: reads of a cold file (O_DIRECT, and buffered after the file's
/// pages were dropped from the page cache) complete after `io_uring_enter` returned, so a
/// refused wait finds most of them in flight. Each completes, and lands (through its
/// bounce buffer, for O_DIRECT) in the destination, before `read` returns the error.
#[test]
fn reads_from_disk_left_in_flight_by_a_refused_wait_land_before_read_returns() {
    let (dir, mut rng, _, _) = setup(21, 0);
    let path = dir.path().join("cold.bin");
    let bytes: Vec<u8> = (0..32 << 20).map(|_| rng.gen()).collect();
    std::fs::write(&path, &bytes).unwrap();
    let paths = vec![path.clone()];
    // Unaligned pieces at unaligned places: every O_DIRECT read goes through a bounce.
    let mut spans = Vec::new();
    let mut expect = Vec::new();
    for _ in 0..128 {
        let len = rng.gen_range(100_000..250_000u64);
        let offset = rng.gen_range(0..bytes.len() as u64 - len);
        expect.push(0xAB);
        spans.push(Span {
            file: 0,
            offset,
            len,
            dst: expect.len() as u64,
        });
        expect.extend_from_slice(&bytes[offset as usize..(offset + len) as usize]);
    }
    for direct in [false, true] {
        let opts = UringOptions {
            direct,
            ..UringOptions::default()
        };
        let reader = if direct {
            direct_or_skip(&paths, opts)
        } else {
            uring_or_skip(&paths, opts)
        };
        let Some(mut r) = reader else { return };
        let f = std::fs::File::open(&path).unwrap();
        f.sync_all().unwrap();
        rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::DontNeed).unwrap();
        let (spans, len) = (spans.clone(), expect.len());
        let got = std::thread::spawn(move || {
            if !millrace::sys::refuse_io_uring_waits_in_this_thread(libc::EPERM) {
                return None;
            }
            let mut dst = vec![0xABu8; len];
            let result = r.read(&spans, &mut dst);
            Some((result, dst))
        })
        .join()
        .unwrap();
        let Some((result, dst)) = got else {
            eprintln!("skipping: the kernel refused a seccomp filter");
            return;
        };
        match result {
            Err(ReadError::Ring { source, .. }) if source.raw_os_error() == Some(libc::EPERM) => {}
            // Every read completed within the call that submitted them: nothing waited.
            Ok(()) => eprintln!("direct {direct}: no read was left in flight"),
            Err(e) => panic!("direct {direct}: {e}"),
        }
        assert!(
            dst == expect,
            "direct {direct}: read returned before every read it submitted had landed"
        );
    }
}

/// Regression: one shard file on a filesystem that refuses `O_DIRECT` (EINVAL at open:
/// procfs here, as ramfs, FUSE and some network filesystems answer) failed
/// `ShardFiles::open` for every file, so the daemon read the whole corpus through the
/// page cache. That file alone is now read buffered; the others keep `O_DIRECT` (none of
/// their pages enter the page cache), and every byte is the file's.
#[test]
fn a_file_whose_filesystem_refuses_o_direct_alone_is_read_buffered() {
    let (dir, mut rng, _, _) = setup(23, 0);
    let disk = dir.path().join("cold.bin");
    let bytes: Vec<u8> = (0..4 << 20).map(|_| rng.gen()).collect();
    std::fs::write(&disk, &bytes).unwrap();
    let procfs = PathBuf::from("/proc/version");
    let version = std::fs::read(&procfs).unwrap();
    let paths = vec![disk.clone(), procfs];
    let files = match ShardFiles::open(&paths, true) {
        Ok(f) => f,
        Err(e) => {
            // The temp filesystem refuses O_DIRECT too: every file does, so the error is
            // the refusal, as before.
            assert!(
                e.to_string().contains("open with O_DIRECT") && e.path() == Some(&disk),
                "{e}"
            );
            eprintln!("skipping: {e}");
            return;
        }
    };
    assert!(files.reads_direct(0) && !files.reads_direct(1));
    let opts = UringOptions {
        direct: true,
        ..UringOptions::default()
    };
    let mut r = match UringReader::open_with(files, opts) {
        Ok(r) => r,
        Err(e) => {
            assert!(e.is_unavailable(), "{e}");
            eprintln!("skipping: {e}");
            return;
        }
    };
    let f = std::fs::File::open(&disk).unwrap();
    f.sync_all().unwrap();
    rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::DontNeed).unwrap();
    let mut spans = Vec::new();
    let mut expect = Vec::new();
    for i in 0..64 {
        let (file, src) = if i % 8 == 0 {
            (1, &version)
        } else {
            (0, &bytes)
        };
        let len = rng.gen_range(1..src.len().min(20_000)) as u64;
        let offset = rng.gen_range(0..src.len() as u64 - len);
        expect.push(0xAB);
        spans.push(Span {
            file,
            offset,
            len,
            dst: expect.len() as u64,
        });
        expect.extend_from_slice(&src[offset as usize..(offset + len) as usize]);
    }
    assert!(fill(|d| r.read(&spans, d), expect.len()) == expect);
    let map = millrace::sys::map_file(&f, None).unwrap();
    let (resident, pages) = millrace::sys::resident_pages(&map).unwrap();
    assert_eq!(
        resident, 0,
        "cold.bin was read with O_DIRECT: 0 of its {pages} pages cached"
    );
}

/// Bounce buffers the system will not give (4,096 reads of 1 GiB each, 4 TiB: more than
/// memory and swap, which Linux's overcommit check refuses, as an address-space limit
/// such as systemd's `LimitAS=` refuses far less) give io_uring up with the reason, and
/// `SpanReader::open` falls back to pread. The allocation aborted the daemon before.
#[test]
fn bounce_buffers_that_cannot_be_had_give_io_uring_up() {
    // Where every allocation succeeds (overcommit mode 1), it would be zeroed: skip.
    let mode = std::fs::read_to_string("/proc/sys/vm/overcommit_memory").unwrap_or_default();
    if mode.trim() == "1" {
        eprintln!("skipping: vm.overcommit_memory = 1 gives any allocation");
        return;
    }
    let (_dir, _rng, _shards, paths) = setup(17, 2);
    let opts = UringOptions {
        depth: 4096,
        max_op_bytes: 1 << 30,
        direct: true,
    };
    let e = match UringReader::open(&paths, opts) {
        Ok(_) => panic!("4 TiB of bounce buffers were given"),
        Err(e) => e,
    };
    let text = e.to_string();
    if !text.contains("bounce") {
        // No io_uring here, or a filesystem without O_DIRECT: nothing to allocate.
        eprintln!("skipping: {text}");
        return;
    }
    assert!(e.is_unavailable(), "{text}");
    assert!(
        text.starts_with("io_uring is unavailable: allocating the O_DIRECT bounce buffers: "),
        "{text}"
    );
    let fallback = SpanReader::open(&paths, opts).unwrap();
    assert!(matches!(fallback, SpanReader::Pread(_, ref why) if *why == text));
}
