//! The corpus writers and readers when something goes wrong: a writer dropped or failing
//! midway leaves no temporary file, a shard no reader would open is refused at `finish`,
//! a raw boundary cache forged to pass its checksum cannot make `doc_lengths_into` hand
//! out lengths past the file (or half a list), and raw caches are not shared by readings
//! with other EOS ids nor by another file renamed over the data, and a `.npy` written by
//! `np.save` is not read as raw tokens header and all. Every file here is
//! written for real; the forged cache is patched by the layout in docs/FORMATS.md, with
//! its checksum recomputed independently.

mod common;

use std::path::Path;
use std::time::{Duration, SystemTime};

use millrace::corpus::groups::GroupsWriter;
use millrace::corpus::{CorpusError, DType, MegatronWriter, RawOptions, RawShard, Shard};

/// The names in `dir`, sorted.
fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn u16_bytes(tokens: &[u16]) -> Vec<u8> {
    tokens.iter().flat_map(|t| t.to_le_bytes()).collect()
}

fn raw_opts(eos: u64) -> RawOptions {
    RawOptions {
        dtype: DType::Uint16,
        eos,
        cache_dir: None,
    }
}

/// Every document of a raw shard, as token values.
fn raw_docs(r: &RawShard) -> Vec<Vec<i64>> {
    (0..r.documents())
        .map(|d| {
            let t = r.doc_tokens(d).unwrap();
            (0..t.len()).map(|i| t.get_i64(i).unwrap()).collect()
        })
        .collect()
}

#[test]
fn a_megatron_writer_dropped_before_finish_leaves_no_temporary_file() {
    let dir = tempfile::tempdir().unwrap();
    let prefix = dir.path().join("web");
    let mut w = MegatronWriter::create(&prefix, DType::Uint16).unwrap();
    w.add_document_bytes(&u16_bytes(&[1, 2, 3])).unwrap();
    assert_eq!(names(dir.path()), ["web.bin.tmp"]);
    drop(w);
    assert_eq!(names(dir.path()), Vec::<String>::new());
}

#[test]
fn a_megatron_writer_without_documents_is_refused_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let prefix = dir.path().join("web");
    let w = MegatronWriter::create(&prefix, DType::Uint16).unwrap();
    let e = w.finish().unwrap_err();
    let msg = e.to_string();
    match &e {
        CorpusError::Invalid { path, .. } => assert_eq!(path, &dir.path().join("web.idx")),
        other => panic!("expected Invalid, got {other:?}"),
    }
    assert!(
        msg.contains("empty shard: no document was written"),
        "{msg}"
    );
    assert_eq!(names(dir.path()), Vec::<String>::new());
    // The same writer with one document finishes, and its reader opens the shard.
    let mut w = MegatronWriter::create(&prefix, DType::Uint16).unwrap();
    w.add_document_bytes(&u16_bytes(&[7])).unwrap();
    w.finish().unwrap();
    assert_eq!(names(dir.path()), ["web.bin", "web.idx"]);
    let s = Shard::open(&prefix, None).unwrap();
    s.validate().unwrap();
    assert_eq!((s.documents(), s.tokens()), (1, 1));
}

#[test]
fn a_groups_writer_that_fails_or_is_dropped_leaves_no_temporary_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("web.groups.npy");
    // Two ids for three documents: refused, and the temporary file goes with it.
    let mut w = GroupsWriter::create(&path, 3).unwrap();
    w.push(0).unwrap();
    w.push(1).unwrap();
    assert_eq!(names(dir.path()), ["web.groups.npy.tmp"]);
    let e = w.finish().unwrap_err().to_string();
    assert!(
        e.contains("groups sidecar got 2 ids for 3 documents"),
        "{e}"
    );
    assert!(e.contains("web.groups.npy.tmp"), "{e}");
    assert_eq!(names(dir.path()), Vec::<String>::new());
    // Dropped before finish.
    let mut w = GroupsWriter::create(&path, 3).unwrap();
    w.push(0).unwrap();
    drop(w);
    assert_eq!(names(dir.path()), Vec::<String>::new());
    // A complete one is renamed into place, with nothing else left.
    let mut w = GroupsWriter::create(&path, 2).unwrap();
    w.push(5).unwrap();
    w.push(5).unwrap();
    assert_eq!(w.finish().unwrap(), path);
    assert_eq!(names(dir.path()), ["web.groups.npy"]);
    let g = millrace::corpus::Groups::open(&path, 2).unwrap();
    assert_eq!(g.runs().len(), 1);
}

/// The raw cache's checksum as docs/FORMATS.md defines it: xxh3-64 of every byte of the
/// file except the eight at offset 64 that hold it.
fn cache_checksum(bytes: &[u8]) -> u64 {
    let mut covered = bytes[..64].to_vec();
    covered.extend_from_slice(&bytes[72..]);
    xxhash_rust::xxh3::xxh3_64(&covered)
}

/// Replaces boundary `d` of the cache at `cache` (the u64 array after the header, whose
/// size is the file size less 8 per document) and re-signs it.
fn forge_boundary(cache: &Path, documents: usize, d: usize, end: u64) {
    let mut b = std::fs::read(cache).unwrap();
    let header = b.len() - 8 * documents;
    assert_eq!(&b[..8], b"MRDOCIX1");
    assert_eq!(
        u64::from_le_bytes(b[48..56].try_into().unwrap()),
        documents as u64
    );
    assert_eq!(
        cache_checksum(&b),
        u64::from_le_bytes(b[64..72].try_into().unwrap())
    );
    b[header + 8 * d..header + 8 * d + 8].copy_from_slice(&end.to_le_bytes());
    let sum = cache_checksum(&b);
    b[64..72].copy_from_slice(&sum.to_le_bytes());
    std::fs::write(cache, &b).unwrap();
}

/// Regression: `doc_lengths_into` checked only that boundaries do not decrease, so a
/// cache (checksummed, but built for what it claims) giving a boundary past the end of
/// the file handed out lengths for tokens that do not exist; and on a decreasing one it
/// returned the error with half the lengths already pushed.
#[test]
fn raw_doc_lengths_refuse_forged_boundaries_and_leave_the_output_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.u16");
    std::fs::write(&path, u16_bytes(&[1, 0, 2, 3, 0, 4])).unwrap();
    let opts = raw_opts(0);
    let r = RawShard::open(&path, &opts).unwrap();
    let cache = r.cache_path().to_path_buf();
    let mut out = vec![42];
    r.doc_lengths_into(&mut out).unwrap();
    assert_eq!(out, [42, 2, 3, 1]);
    drop(r);

    // The last boundary 9 tokens into a 6-token file.
    forge_boundary(&cache, 3, 2, 9);
    let r = RawShard::open(&path, &opts).unwrap();
    assert!(
        !r.cache_rebuilt(),
        "the forged cache is taken: it passes its checksum"
    );
    let mut out = vec![42];
    let e = r.doc_lengths_into(&mut out).unwrap_err();
    assert_eq!(out, [42], "nothing pushed on error");
    let msg = e.to_string();
    assert!(
        matches!(&e, CorpusError::Invalid { path, .. } if *path == cache),
        "{msg}"
    );
    assert!(
        msg.contains("document 2: boundary cache gives tokens 5..9, past the 6 tokens of"),
        "{msg}"
    );
    // The full check says it too.
    assert!(r.validate().is_err());
    drop(r);

    // A boundary before the one ahead of it, after a document that was fine.
    forge_boundary(&cache, 3, 2, 6);
    forge_boundary(&cache, 3, 1, 1);
    let r = RawShard::open(&path, &opts).unwrap();
    assert!(!r.cache_rebuilt());
    let mut out = vec![42];
    let e = r.doc_lengths_into(&mut out).unwrap_err().to_string();
    assert_eq!(out, [42], "the first document's length was not left behind");
    assert!(e.contains("document 1: boundary 1 is before 2"), "{e}");
}

/// Regression: the cache was `<file>.mrdocs` whatever the EOS id, so two domains reading
/// one file with different EOS ids rebuilt it in turn at every open.
#[test]
fn raw_caches_of_two_eos_ids_on_one_file_are_kept_apart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.u16");
    std::fs::write(&path, u16_bytes(&[1, 0, 2, 3, 0, 3])).unwrap();
    let zero = RawShard::open(&path, &raw_opts(0)).unwrap();
    let three = RawShard::open(&path, &raw_opts(3)).unwrap();
    assert!(zero.cache_rebuilt() && three.cache_rebuilt());
    assert_ne!(zero.cache_path(), three.cache_path());
    drop((zero, three));
    for _ in 0..2 {
        let zero = RawShard::open(&path, &raw_opts(0)).unwrap();
        assert!(!zero.cache_rebuilt(), "{}", zero.cache_path().display());
        assert_eq!(raw_docs(&zero), vec![vec![1, 0], vec![2, 3, 0], vec![3]]);
        let three = RawShard::open(&path, &raw_opts(3)).unwrap();
        assert!(!three.cache_rebuilt(), "{}", three.cache_path().display());
        assert_eq!(raw_docs(&three), vec![vec![1, 0, 2, 3], vec![0, 3]]);
    }
    assert_eq!(
        names(dir.path()),
        [
            "t.u16",
            "t.u16.uint16-eos0.mrdocs",
            "t.u16.uint16-eos3.mrdocs"
        ]
    );
}

/// Regression: the cache key was size, mtime and the first and last 64 KiB, so a copy
/// that kept all three (`cp -p`, `rsync -t` of a file edited in the middle) renamed over
/// the data reused the old boundaries. The inode (and ctime) now tell it is another file.
#[test]
fn raw_cache_is_rebuilt_for_another_file_renamed_over_the_data() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.u16");
    // 200 Ki tokens (400 KiB): the middle is outside both 64 KiB samples.
    let n = 200 << 10;
    let mut tokens = vec![7u16; n];
    tokens[n / 2] = 0;
    tokens[n - 1] = 0;
    std::fs::write(&path, u16_bytes(&tokens)).unwrap();
    let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    common::set_mtime(&path, t);
    let r = RawShard::open(&path, &raw_opts(0)).unwrap();
    assert_eq!(r.documents(), 2);
    drop(r);
    assert!(!RawShard::open(&path, &raw_opts(0)).unwrap().cache_rebuilt());

    // The same size, ends and mtime; an EOS moved in the middle.
    tokens[n / 2] = 7;
    tokens[n / 4] = 0;
    let copy = dir.path().join("t.u16.new");
    std::fs::write(&copy, u16_bytes(&tokens)).unwrap();
    common::set_mtime(&copy, t);
    std::fs::rename(&copy, &path).unwrap();
    let r = RawShard::open(&path, &raw_opts(0)).unwrap();
    assert!(r.cache_rebuilt(), "another inode must not reuse the cache");
    r.validate().unwrap();
    let mut lens = Vec::new();
    r.doc_lengths_into(&mut lens).unwrap();
    assert_eq!(lens, [(n / 4 + 1) as u64, (n - n / 4 - 1) as u64]);
}

/// Shards open in parallel: threads that build the same raw cache at once each write a
/// temporary file of their own, all read the right boundaries, and none is left behind.
#[test]
fn raw_caches_built_by_threads_at_once_leave_no_temporary_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.u16");
    let tokens: Vec<u16> = (0..50_000u32).map(|i| (i % 97) as u16).collect();
    std::fs::write(&path, u16_bytes(&tokens)).unwrap();
    let want: Vec<u64> = {
        let mut ends: Vec<u64> = (0..tokens.len())
            .filter(|&i| tokens[i] == 0)
            .map(|i| i as u64 + 1)
            .collect();
        if ends.last() != Some(&(tokens.len() as u64)) {
            ends.push(tokens.len() as u64);
        }
        let mut prev = 0;
        ends.iter()
            .map(|&e| {
                let l = e - prev;
                prev = e;
                l
            })
            .collect()
    };
    let lens: Vec<Vec<u64>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|_| {
                s.spawn(|| {
                    let r = RawShard::open(&path, &raw_opts(0)).unwrap();
                    let mut v = Vec::new();
                    r.doc_lengths_into(&mut v).unwrap();
                    v
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for l in &lens {
        assert_eq!(l, &want);
    }
    assert_eq!(names(dir.path()), ["t.u16", "t.u16.uint16-eos0.mrdocs"]);
}

/// A raw domain pointed at a file `np.save` wrote (a `.npy` with its numpy header) is
/// refused naming the file and the header, instead of serving the magic, the header dict
/// and its padding as a first document of ids like 20115 that pass most vocabularies.
/// Every version numpy writes is recognised, and a header cut short by the file's end
/// too; a headerless file whose first ids happen to spell the magic without a version is
/// still read as tokens.
#[test]
fn a_raw_file_with_a_numpy_header_is_refused_not_read_as_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tok.npy");
    let tokens = u16_bytes(&[5, 6, 7, 0, 8, 9, 0]);
    common::write_npy(&path, "<u2", "(7,)", &tokens);
    let e = Shard::open(&path, Some(&raw_opts(0)))
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with(&format!(
            "{}: starts with a numpy .npy header",
            path.display()
        )) && e.contains("format version 1.0")
            && e.contains("'descr': '<u2'")
            && e.contains("'shape': (7,)"),
        "{e}"
    );
    assert_eq!(
        names(dir.path()),
        ["tok.npy"],
        "no boundary cache is written"
    );
    // Version 2 (u32 header length), its header claiming more bytes than the file has.
    let mut v2 = b"\x93NUMPY\x02\x00".to_vec();
    v2.extend_from_slice(&1000u32.to_le_bytes());
    v2.extend_from_slice(b"{'descr': '<u2',  ");
    std::fs::write(&path, &v2).unwrap();
    let e = Shard::open(&path, Some(&raw_opts(0)))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("format version 2.0")
            && e.contains("claims 1000 bytes from byte 12, past the end of the 30-byte file"),
        "{e}"
    );
    // Regression: a header of the file's own bytes was echoed whole and raw (a hostile
    // one held megabytes of terminal escapes and forged log lines). Quoted and cut.
    let mut hostile = b"\x93NUMPY\x02\x00".to_vec();
    let text = format!("fake\n\x1b[31mRED\0{}", "A".repeat(100_000));
    hostile.extend_from_slice(&(text.len() as u32).to_le_bytes());
    hostile.extend_from_slice(text.as_bytes());
    std::fs::write(&path, &hostile).unwrap();
    let e = Shard::open(&path, Some(&raw_opts(0)))
        .unwrap_err()
        .to_string();
    assert!(e.len() < 1000, "{} bytes", e.len());
    assert!(
        !e.contains('\n') && !e.contains('\x1b') && !e.contains('\0'),
        "{e}"
    );
    assert!(e.contains("fake\\n\\u{1b}[31mRED"), "{e}");
    // The magic's ids without a version numpy defines: tokens.
    let mut ids = b"\x93NUMPY\x07\x00".to_vec();
    ids.extend_from_slice(&tokens);
    std::fs::write(&path, &ids).unwrap();
    let r = RawShard::open(&path, &raw_opts(0)).unwrap();
    assert_eq!(raw_docs(&r).concat().len(), 4 + 7);
}

/// Regression: a shard behind a symlink loop, or in a directory its reader may not
/// search, was "no such ... file", which sends a user looking for a typo. The OS's
/// reason is named.
#[test]
fn a_shard_that_cannot_be_reached_names_the_reason_not_absence() {
    let dir = tempfile::tempdir().unwrap();
    let prefix = dir.path().join("loop");
    std::os::unix::fs::symlink("loop.idx", prefix.with_extension("idx")).unwrap();
    std::os::unix::fs::symlink("loop.bin", prefix.with_extension("bin")).unwrap();
    let raw = dir.path().join("raw-loop");
    std::os::unix::fs::symlink("raw-loop", &raw).unwrap();
    for args in [
        vec!["inspect"],
        vec!["inspect", "--format", "raw", "--eos-id", "0"],
    ] {
        let path = if args.len() == 1 { &prefix } else { &raw };
        let out = common::bin().args(&args).arg(path).output().unwrap();
        let e = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{e}");
        assert!(
            e.contains("cannot be read:") && e.contains("symbolic links") && !e.contains("no such"),
            "{e}"
        );
    }
}

/// A Megatron shard `g` of one document in `dir`, and where its group sidecar goes.
fn one_document_shard(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let prefix = dir.join("g");
    let mut w = MegatronWriter::create(&prefix, DType::Uint16).unwrap();
    w.add_document_bytes(&u16_bytes(&[1, 2, 3])).unwrap();
    w.finish().unwrap();
    (prefix, dir.join("g.groups.npy"))
}

/// A group sidecar of twelve bytes whose `.npy` header (format 2) claims 4 GiB of header
/// text is refused naming the file and the claim, before anything allocates the claim:
/// `inspect` runs here with 1 GiB of address space (`ulimit -v`, as batch schedulers and
/// strict overcommit impose), where allocating it aborted the process.
#[test]
fn a_group_sidecar_claiming_a_huge_header_is_refused_before_allocating_it() {
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    let (prefix, side) = one_document_shard(dir.path());
    let mut npy = b"\x93NUMPY\x02\x00".to_vec();
    npy.extend_from_slice(&0xFFFF_FFF0u32.to_le_bytes());
    std::fs::write(&side, &npy).unwrap();
    let mut cmd = common::bin();
    cmd.arg("inspect").arg(&prefix);
    // SAFETY: setrlimit is async-signal-safe and touches only the child.
    unsafe {
        cmd.pre_exec(|| {
            let rl = libc::rlimit {
                rlim_cur: 1 << 30,
                rlim_max: 1 << 30,
            };
            if libc::setrlimit(libc::RLIMIT_AS, &rl) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!(
            "{}: groups sidecar is not a valid .npy file: its header claims 4294967280 bytes \
             from byte 12, past the end of the 12-byte file",
            side.display()
        )),
        "{err}"
    );
}

/// A group sidecar whose `.npy` header gives a shape of several dimensions whose product
/// overflows 64 bits is refused as not one-dimensional, naming the file and the shape.
/// npyz multiplies the dimensions while it parses the header, which panicked in builds
/// with overflow checks (tests, debug) before the shape was looked at.
#[test]
fn a_group_sidecar_whose_shape_overflows_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let (_prefix, side) = one_document_shard(dir.path());
    let mut text =
        b"{'descr': '<u8', 'fortran_order': False, 'shape': (4294967296, 4294967296), }".to_vec();
    while (10 + text.len() + 1) % 64 != 0 {
        text.push(b' ');
    }
    text.push(b'\n');
    let mut npy = b"\x93NUMPY\x01\x00".to_vec();
    npy.extend_from_slice(&(text.len() as u16).to_le_bytes());
    npy.extend_from_slice(&text);
    npy.extend_from_slice(&[0u8; 8]);
    std::fs::write(&side, &npy).unwrap();
    let e = millrace::corpus::Groups::open(&side, 1)
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with(&side.display().to_string())
            && e.contains("expected one dimension")
            && e.contains("4294967296, 4294967296"),
        "{e}"
    );
}

/// The SIGBUS guard listed the first 1,024 pages it zeroed in the process's life; past
/// them it could no longer tell a lost index page from a `.bin`'s, so every poisoned
/// shard counted as one whose index lost pages (a daemon then refused every new client
/// over a shard whose `.bin` alone shrank), and a fault of any mapping counted as
/// planning's. Here 1,100 small shards lose their index under guarded reads, then
/// another shard its `.bin`: that one's index is still whole, and a fault of its `.bin`
/// is not planning's, as before the count passed 1,024.
#[test]
fn a_shards_lost_pages_are_its_own_past_a_thousand_zeroed_pages() {
    use millrace::corpus::guard;
    let dir = tempfile::tempdir().unwrap();
    let shard = |name: &str, docs: usize, tokens: usize| {
        let prefix = dir.path().join(name);
        let mut w = MegatronWriter::create(&prefix, DType::Uint16).unwrap();
        for _ in 0..docs {
            w.add_document_bytes(&vec![7u8; 2 * tokens]).unwrap();
        }
        w.finish().unwrap();
        let s = Shard::open(&prefix, None).unwrap();
        guard::protect(s.mappings()).unwrap();
        s
    };
    let small: Vec<Shard> = (0..1100).map(|k| shard(&format!("i{k}"), 1, 10)).collect();
    let bin = shard("b", 4, 4096);
    for (k, s) in small.iter().enumerate() {
        let idx = dir.path().join(format!("i{k}.idx"));
        truncate(&idx, 0);
        let _g = guard::enter();
        let _ = std::hint::black_box(s.doc_len_validated(0));
        assert!(
            guard::take_fault().is_some(),
            "{} did not fault",
            idx.display()
        );
    }
    assert!(guard::zeroed_pages() > 1024, "{}", guard::zeroed_pages());
    let mark = guard::zeroed_pages();
    truncate(&dir.path().join("b.bin"), 4096);
    {
        let _g = guard::enter();
        let tokens = bin.doc_tokens(3).unwrap();
        let _ = std::hint::black_box(tokens.as_bytes()[0]);
        assert!(guard::take_fault().is_some(), "b.bin did not fault");
    }
    bin.poison("b.bin shrank".into());
    assert!(!bin.lost_index_pages(), "b lost only .bin pages");
    assert!(small.iter().all(|s| s.lost_index_pages()));
    // Planning reads indexes: the `.bin` page zeroed since `mark` is not planning's.
    assert_eq!(guard::fault_since_in(mark, |a| bin.index_holds(a)), None);
    // A lost index page since the mark is found, past the table's room too.
    let last = small.last().unwrap();
    let before = guard::zeroed_pages();
    truncate(&dir.path().join("b.idx"), 0);
    let found = std::thread::scope(|s| {
        s.spawn(|| {
            let _g = guard::enter();
            let _ = std::hint::black_box(bin.doc_len_validated(1));
            guard::take_fault()
        })
        .join()
        .unwrap()
    });
    assert!(found.is_some(), "b.idx did not fault");
    let ours = guard::fault_since_in(before, |a| bin.index_holds(a) || last.index_holds(a));
    assert!(ours.is_some_and(|a| bin.index_holds(a)), "{ours:?}");
    assert!(bin.lost_index_pages());
}

/// Cuts `file` to `len` bytes in place (same inode), as a shard is truncated under a
/// reader.
fn truncate(file: &Path, len: u64) {
    let f = std::fs::OpenOptions::new().write(true).open(file);
    f.and_then(|f| f.set_len(len))
        .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
}
