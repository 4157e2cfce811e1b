//! Start in time proportional to shards (issue 16, item 1): the identity cache gives the
//! identity a full hash would, and is not trusted once a file behind the shard moved or
//! the cache file is not ours; a corrupt shard that passes the O(1) open checks is no
//! longer refused at start, but at its first read, naming the shard and the document,
//! while `check-config` still refuses it.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use millrace::client::{Client, ClientError, Hello};
use millrace::config::Config;
use millrace::corpus::identity::Miss;
use millrace::corpus::{GroupRun, IdentityCache, Shard};

/// A small corpus with a config whose `[corpus] cache_dir` is `<tmp>/cache`.
fn fixture() -> (common::Corpus, PathBuf, PathBuf) {
    let corpus = common::corpus(200_000, 2, 7, 50_000);
    let cache = corpus.tmp.path().join("cache");
    let socket = corpus.dir.join("d.sock");
    let config = common::write_config(
        &corpus.dir,
        "d.toml",
        64,
        4,
        &[&common::serve_toml(&socket, 4, 2)],
    );
    let mut doc: toml::Table = toml::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    let table = doc.get_mut("corpus").unwrap().as_table_mut().unwrap();
    table.insert("cache_dir".into(), cache.to_str().unwrap().into());
    std::fs::write(&config, toml::to_string(&doc).unwrap()).unwrap();
    (corpus, config, cache)
}

/// Every shard of the config, opened.
fn shards(config: &Path) -> Vec<Shard> {
    let cfg = Config::load(config).unwrap();
    cfg.open_corpus()
        .unwrap()
        .into_iter()
        .flat_map(|(_, s)| s)
        .collect()
}

/// The first shard's prefix (`web`, sorted).
fn first_prefix(dir: &Path) -> PathBuf {
    first_prefix_of(dir, "web")
}

/// The first shard of `domain` (sorted).
fn first_prefix_of(dir: &Path, domain: &str) -> PathBuf {
    let mut idx: Vec<PathBuf> = std::fs::read_dir(dir.join(domain))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "idx"))
        .collect();
    idx.sort();
    idx[0].with_extension("")
}

#[test]
fn a_cache_hit_gives_the_manifest_and_fingerprints_of_a_cold_computation() {
    let (_corpus, config, cache) = fixture();
    let cfg = Config::load(&config).unwrap();
    // Cold: the full pass and full hashes, as before the cache existed.
    let cold = cfg.load_plan_validated().unwrap();
    let cached = IdentityCache::new(Some(&cache));
    for s in shards(&config) {
        let hit = cached.lookup(&s);
        assert_eq!(hit, Ok(s.identity().unwrap()), "{}", s.path().display());
    }
    // Warm, twice (the second start reads only entries).
    for _ in 0..2 {
        let warm = cfg.load_plan().unwrap();
        assert_eq!(warm.plan.fingerprint(), cold.plan.fingerprint());
        assert_eq!(
            warm.plan.legacy_fingerprint(),
            cold.plan.legacy_fingerprint()
        );
    }
    // A start that finds no entries computes and writes them: the same again.
    std::fs::remove_dir_all(&cache).unwrap();
    let fresh = cfg.load_plan().unwrap();
    assert_eq!(fresh.plan.fingerprint(), cold.plan.fingerprint());
    assert!(std::fs::read_dir(cache.join("identity")).unwrap().count() >= 2);
}

#[test]
fn a_touched_index_is_recomputed_not_trusted() {
    let (corpus, config, cache) = fixture();
    Config::load(&config).unwrap().load_plan().unwrap();
    let prefix = first_prefix(&corpus.dir);
    let idx = common::with(&prefix, "idx");
    let cache = IdentityCache::new(Some(&cache));
    let before = Shard::open(&prefix, None).unwrap();
    let id = cache.lookup(&before).expect("the start wrote an entry");
    drop(before);

    // Same size and content, another mtime: stale.
    let f = std::fs::File::options().write(true).open(&idx).unwrap();
    f.set_modified(SystemTime::now() + Duration::from_secs(3600))
        .unwrap();
    drop(f);
    let s = Shard::open(&prefix, None).unwrap();
    assert_eq!(cache.lookup(&s), Err(Miss::Stale));
    assert_eq!(
        cache.identity(&s).unwrap(),
        id,
        "same content, same identity"
    );
    assert_eq!(
        cache.lookup(&s),
        Ok(id.clone()),
        "rewritten for the new stamps"
    );
    drop(s);

    // Same size and mtime, one length changed (a valid shard still): the ctime moved, so
    // the entry is stale and the new content gets its own identity.
    let mtime = std::fs::metadata(&idx).unwrap().modified().unwrap();
    let mut bytes = std::fs::read(&idx).unwrap();
    let (a, b) = (34, 38); // lengths[0] and lengths[1] swap: same total, other index
    let (la, lb) = (bytes[a..a + 4].to_vec(), bytes[b..b + 4].to_vec());
    assert_ne!(la, lb, "the test needs two documents of different lengths");
    bytes[a..a + 4].copy_from_slice(&lb);
    bytes[b..b + 4].copy_from_slice(&la);
    // Sequence 1 now starts where the new length 0 ends.
    let pointers_at = 34 + 4 * u64::from_le_bytes(bytes[18..26].try_into().unwrap()) as usize;
    let p1 = i64::from(i32::from_le_bytes(lb.try_into().unwrap())) * 2;
    bytes[pointers_at + 8..pointers_at + 16].copy_from_slice(&p1.to_le_bytes());
    std::fs::write(&idx, &bytes).unwrap();
    let f = std::fs::File::options().write(true).open(&idx).unwrap();
    f.set_modified(mtime).unwrap();
    drop(f);
    let s = Shard::open(&prefix, None).unwrap();
    s.validate().unwrap();
    assert_eq!(cache.lookup(&s), Err(Miss::Stale));
    let changed = cache.identity(&s).unwrap();
    assert_ne!(changed, id);
    assert_eq!(changed, s.identity().unwrap());
}

#[test]
fn a_corrupt_or_foreign_cache_file_is_ignored_and_rewritten() {
    let (corpus, config, cache_dir) = fixture();
    let cfg = Config::load(&config).unwrap();
    let cold = cfg.load_plan().unwrap().plan.fingerprint();
    let cache = IdentityCache::new(Some(&cache_dir));
    let s = Shard::open(&first_prefix(&corpus.dir), None).unwrap();
    let entry = cache.entry_path(&s).unwrap();
    let good = s.identity().unwrap();
    for junk in [
        &b"\x00\xffnot json"[..],
        br#"{"format":"someone-else","version":1}"#,
        br#"{"format":"millrace-identity-cache","version":99,"files":[],"sample":{"offsets":[],"hash":""},"identity":{"name":"x","format":"raw","dtype":"uint8","documents":1,"tokens":1,"index_hash":"0"}}"#,
        b"",
    ] {
        std::fs::write(&entry, junk).unwrap();
        assert!(
            matches!(cache.lookup(&s), Err(Miss::Unreadable(_))),
            "{:?}",
            String::from_utf8_lossy(junk)
        );
        assert_eq!(cfg.load_plan().unwrap().plan.fingerprint(), cold);
        assert_eq!(cache.lookup(&s), Ok(good.clone()), "rewritten");
    }
    // Not a file at all: a FIFO (its read waited for a writer, and the start hung before
    // READY) and a link to /dev/zero (read until memory ran out) are refused at once,
    // named, and replaced by an entry.
    for what in ["fifo", "/dev/zero"] {
        std::fs::remove_file(&entry).unwrap();
        if what == "fifo" {
            let c = std::ffi::CString::new(entry.to_str().unwrap()).unwrap();
            // SAFETY: mkfifo with a valid NUL-terminated path.
            assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        } else {
            std::os::unix::fs::symlink(what, &entry).unwrap();
        }
        match cache.lookup(&s) {
            Err(Miss::Unreadable(why)) => assert!(why.contains("not a regular file"), "{why}"),
            other => panic!("{what}: {other:?}"),
        }
        assert_eq!(cfg.load_plan().unwrap().plan.fingerprint(), cold);
        assert_eq!(cache.lookup(&s), Ok(good.clone()), "{what}: rewritten");
    }
}

#[test]
fn an_unwritable_cache_dir_only_costs_the_full_hash() {
    let (corpus, config, _) = fixture();
    let cold = Config::load(&config).unwrap().load_plan().unwrap();
    // A cache_dir under a regular file cannot be created.
    let blocker = corpus.tmp.path().join("file");
    std::fs::write(&blocker, b"x").unwrap();
    let cache = IdentityCache::new(Some(&blocker.join("cache")));
    assert!(cache.dir().is_none());
    let s = Shard::open(&first_prefix(&corpus.dir), None).unwrap();
    assert_eq!(cache.identity(&s).unwrap(), s.identity().unwrap());
    assert_eq!(cache.lookup(&s), Err(Miss::Absent));
    assert!(cold.plan.fingerprint() != 0);
}

/// Moves the pointer of every `web` document but the first and the last of the first
/// shard past the end of its `.bin`: the O(1) open checks (first pointer, last end, sizes)
/// pass, the full validation and a read of any of those documents fail.
fn corrupt_first_shard(dir: &Path) -> PathBuf {
    let prefix = first_prefix(dir);
    let idx = common::with(&prefix, "idx");
    let mut bytes = std::fs::read(&idx).unwrap();
    let n = u64::from_le_bytes(bytes[18..26].try_into().unwrap()) as usize;
    let bin_len = std::fs::metadata(common::with(&prefix, "bin"))
        .unwrap()
        .len() as i64;
    let pointers_at = 34 + 4 * n;
    for i in 1..n - 1 {
        let at = pointers_at + 8 * i;
        bytes[at..at + 8].copy_from_slice(&bin_len.to_le_bytes());
    }
    std::fs::write(&idx, &bytes).unwrap();
    Shard::open(&prefix, None).expect("the corruption passes open()");
    idx
}

/// Reads as job "x" from step 0 until the daemon sends an ERROR (2,000 steps at most)
/// and returns its code and message.
fn first_error(serve: &common::Serve, socket: &Path) -> (String, String) {
    let mut h = Hello::new(0, 1, 4, 1);
    h.job = "x".into();
    let mut c = Client::connect(socket, &h).unwrap_or_else(|e| panic!("{e}\n{}", serve.log_text()));
    c.set_timeout(Some(Duration::from_secs(20)));
    (0..2000)
        .find_map(|_| match c.next_batch() {
            Ok(_) => None,
            Err(ClientError::Daemon { code, message }) => Some((code, message)),
            Err(e) => panic!("expected an ERROR frame, got {e}"),
        })
        .expect("an ERROR within 2000 steps")
}

#[test]
fn check_config_still_refuses_a_corrupt_shard() {
    let (corpus, config, _) = fixture();
    let idx = corrupt_first_shard(&corpus.dir);
    let err = common::check_config_refusal(&config);
    assert!(err.contains(idx.to_str().unwrap()), "{err}");
    assert!(err.contains("document 1: sequence 1 pointer is"), "{err}");
}

/// `plan` and `explain` read the same unvalidated index the daemon does: a corrupt
/// document they counted as empty must fail the command, naming the shard, instead of
/// showing a plan the daemon cannot serve.
#[test]
fn plan_and_explain_refuse_a_corrupt_shard_naming_it() {
    let (corpus, config, _) = fixture();
    let idx = corrupt_first_shard(&corpus.dir);
    for args in [
        vec!["plan", "--steps", "50"],
        vec!["explain", "--step", "0", "--count", "50"],
    ] {
        let out = common::bin()
            .args(&args)
            .arg("--config")
            .arg(&config)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}: {err}");
        assert!(err.contains(idx.to_str().unwrap()), "{args:?}: {err}");
        assert!(err.contains("check-config"), "{args:?}: {err}");
    }
}

#[test]
fn a_corrupt_shard_starts_and_fails_its_first_read_naming_shard_and_document() {
    let (corpus, config, _) = fixture();
    let idx = corrupt_first_shard(&corpus.dir);
    let socket = corpus.dir.join("d.sock");
    let serve = common::Serve::start(&config, &socket, &corpus.dir.join("d.log"));
    let (code, message) = first_error(&serve, &socket);
    assert_eq!(code, "materialize", "{message}");
    assert!(message.contains(idx.to_str().unwrap()), "{message}");
    assert!(message.contains("document "), "{message}");
    // The background validation counts it, and the log names it.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !serve.log_text().contains("corrupt=1") {
        assert!(std::time::Instant::now() < deadline, "{}", serve.log_text());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        serve.log_text().contains("the shard is poisoned"),
        "{}",
        serve.log_text()
    );
    // The daemon is still up and serving: a new job connects.
    let mut h = Hello::new(0, 1, 4, 1);
    h.job = "y".into();
    Client::connect(&socket, &h).unwrap_or_else(|e| panic!("{e}\n{}", serve.log_text()));
}

/// What the planner reads from a shard that passed open() but not validation: every
/// length is checked as a read of the document would be, a bad one reads as 0 (never
/// more than the tokens that exist, never a panic) and poisons the shard naming the
/// document.
#[test]
fn the_planner_never_reads_an_unvalidated_index_out_of_bounds() {
    use millrace::plan::DocSource;
    let code = common::CODES[3]; // int32
    let docs: Vec<common::Doc> = (0..8)
        .map(|d| vec![vec![d; 3 + d as usize], vec![1; 2]])
        .collect();
    type Corrupt = fn(&mut common::Index);
    let corruptions: [(&str, Corrupt); 4] = [
        ("pointer past the end", |i| i.pointers[5] = 10_000),
        ("negative length", |i| i.lengths[6] = -4),
        ("decreasing document_indices", |i| i.doc_indices[3] = 1),
        ("misaligned pointer", |i| i.pointers[8] += 1),
    ];
    for (what, corrupt) in corruptions {
        let dir = tempfile::tempdir().unwrap();
        let prefix = dir.path().join("s");
        let (mut index, bin) = common::build(code, &docs);
        corrupt(&mut index);
        common::write(&prefix, &index, &bin);
        let shard = Shard::open(&prefix, None).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert!(shard.validate().is_err(), "{what}");
        let total: u64 = (0..shard.documents())
            .map(|d| DocSource::doc_len(&shard, d))
            .inspect(|&l| assert!(l <= shard.tokens(), "{what}: length {l}"))
            .sum();
        let why = shard
            .poisoned()
            .unwrap_or_else(|| panic!("{what}: not poisoned (lengths sum to {total})"));
        assert!(
            why.contains("s.idx") && why.contains("document "),
            "{what}: {why}"
        );
    }
}

/// A daemon on the fixture's socket `d.sock`, once its log says `line` (20 s at most).
fn serve_until_logged(corpus: &common::Corpus, config: &Path, line: &str) -> common::Serve {
    let socket = corpus.dir.join("d.sock");
    let serve = common::Serve::start(config, &socket, &corpus.dir.join("d.log"));
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !serve.log_text().contains(line) {
        assert!(std::time::Instant::now() < deadline, "{}", serve.log_text());
        std::thread::sleep(Duration::from_millis(20));
    }
    serve
}

/// What only the full pass sees before a read reaches it (two documents whose bytes
/// overlap: a read of either refuses it, one of any other document passes) is found by
/// the daemon's background validation after READY, which poisons the shard: the rings
/// that read it stop naming it.
#[test]
fn the_background_validation_poisons_what_only_the_full_pass_sees() {
    let (corpus, config, _) = fixture();
    let prefix = first_prefix(&corpus.dir);
    let idx = common::with(&prefix, "idx");
    let mut bytes = std::fs::read(&idx).unwrap();
    let n = u64::from_le_bytes(bytes[18..26].try_into().unwrap()) as usize;
    let pointers_at = 34 + 4 * n;
    // Document 2 starts where document 1 does (and is no longer than it).
    let len =
        |b: &[u8], i: usize| i32::from_le_bytes(b[34 + 4 * i..38 + 4 * i].try_into().unwrap());
    let i = (2..n - 1)
        .find(|&i| len(&bytes, i) <= len(&bytes, i - 1))
        .unwrap();
    let prev = bytes[pointers_at + 8 * (i - 1)..pointers_at + 8 * i].to_vec();
    bytes[pointers_at + 8 * i..pointers_at + 8 * i + 8].copy_from_slice(&prev);
    std::fs::write(&idx, &bytes).unwrap();
    let s = Shard::open(&prefix, None).unwrap();
    assert!(
        s.doc_tokens(0).is_ok(),
        "a document away from the overlap reads"
    );
    assert!(
        s.doc_tokens(i as u64).is_err(),
        "the overlapping one does not"
    );
    assert!(s.validate().is_err());
    drop(s);

    let socket = corpus.dir.join("d.sock");
    let serve = serve_until_logged(&corpus, &config, "found by the background validation");
    let (_, message) = first_error(&serve, &socket);
    assert!(message.contains(idx.to_str().unwrap()), "{message}");
    assert!(message.contains("poisoned"), "{message}");
}

/// A raw file's documents depend on the EOS id it is split on: the same bytes read with
/// another EOS are another corpus, and must not get the cached identity.
#[test]
fn a_raw_file_read_with_another_eos_is_recomputed() {
    use millrace::corpus::{DType, RawOptions};
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tokens.u16");
    let tokens: Vec<u8> = [5u16, 1, 7, 2, 9, 9, 1, 3, 2, 4, 1]
        .iter()
        .flat_map(|t| t.to_le_bytes())
        .collect();
    std::fs::write(&file, tokens).unwrap();
    let cache = IdentityCache::new(Some(&dir.path().join("cache")));
    let open = |eos| {
        let opts = RawOptions {
            dtype: DType::Uint16,
            eos,
            cache_dir: Some(dir.path().join("cache")),
        };
        Shard::open(&file, Some(&opts)).unwrap()
    };
    let one = open(1);
    let id1 = cache.identity(&one).unwrap();
    assert_eq!(cache.lookup(&one), Ok(id1.clone()));
    let two = open(2);
    assert_eq!(cache.lookup(&two), Err(Miss::Absent));
    let id2 = cache.identity(&two).unwrap();
    assert_eq!(id2, two.identity().unwrap());
    assert_ne!(id2.index_hash, id1.index_hash);
    // Each reading keeps its own entry: the first's was not rewritten by the second (two
    // configs reading one file each rewrote the one entry at every start).
    assert_ne!(cache.entry_path(&one), cache.entry_path(&two));
    assert_eq!(cache.lookup(&one), Ok(id1));
    assert_eq!(cache.lookup(&two), Ok(id2));
}

// ------------------------------------------------------------ cached group runs

/// The first `code` shard (grouped: synth writes a sidecar beside it).
fn first_code_prefix(dir: &Path) -> PathBuf {
    first_prefix_of(dir, "code")
}

/// The group runs a start (`Config::load_plan`) gave the shard at `prefix`.
fn started_runs(config: &Path, prefix: &Path) -> Vec<GroupRun> {
    let loaded = Config::load(config).unwrap().load_plan().unwrap();
    let shard = loaded
        .shards
        .iter()
        .flatten()
        .find(|s| s.path() == prefix)
        .expect("the shard is in the config");
    shard.groups().expect("a grouped shard").runs().to_vec()
}

/// The identity cache entry of `shard`, as JSON without its `checksum`, so that the
/// forgeries below are read:
/// an entry without one (written before checksums) is taken as it is, while an edited
/// entry that kept its checksum is refused (`identity.rs`, `an_entry_edited_in_place_is_not_trusted`).
fn entry_json(cache: &IdentityCache, shard: &Shard) -> (PathBuf, serde_json::Value) {
    let path = cache.entry_path(shard).unwrap();
    let mut json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    assert!(json.as_object_mut().unwrap().remove("checksum").is_some());
    (path, json)
}

/// A runs file as docs/FORMATS.md describes it, and its checksum in hex.
fn runs_file(runs: &[GroupRun]) -> (Vec<u8>, String) {
    let mut out = b"MRRUNS01".to_vec();
    out.extend_from_slice(&(runs.len() as u64).to_le_bytes());
    for r in runs {
        out.extend_from_slice(&r.id.to_le_bytes());
        out.extend_from_slice(&r.docs.to_le_bytes());
    }
    let sum = xxhash_rust::xxh3::xxh3_64(&out);
    out.extend_from_slice(&sum.to_le_bytes());
    (out, format!("{sum:016x}"))
}

/// Rewrites the sidecar of `prefix` in place with the first run's id changed to `id`
/// (same size, still contiguous), puts its mtime back, and returns the new runs.
fn rewrite_first_group_id(prefix: &Path, id: u64) -> Vec<GroupRun> {
    let sidecar = common::with(prefix, "groups.npy");
    let mtime = std::fs::metadata(&sidecar).unwrap().modified().unwrap();
    let mut runs = Shard::open(prefix, None)
        .unwrap()
        .groups()
        .unwrap()
        .runs()
        .to_vec();
    runs[0].id = id;
    let ids: Vec<u64> = runs
        .iter()
        .flat_map(|r| std::iter::repeat_n(r.id, r.docs as usize))
        .collect();
    let before = std::fs::metadata(&sidecar).unwrap().len();
    common::write_groups(prefix, &ids);
    assert_eq!(std::fs::metadata(&sidecar).unwrap().len(), before);
    let f = std::fs::File::options().write(true).open(&sidecar).unwrap();
    f.set_modified(mtime).unwrap();
    runs
}

/// A start takes a grouped shard's runs from the cache (16 bytes per group), not from its
/// sidecar (8 bytes per document): a forged runs file that the entry vouches for is what
/// the plan gets. Before the runs were cached every start read the sidecar in full.
#[test]
fn a_start_takes_group_runs_from_the_cache_not_the_sidecar() {
    let (corpus, config, cache_dir) = fixture();
    let prefix = first_code_prefix(&corpus.dir);
    let sidecar_runs = Shard::open(&prefix, None)
        .unwrap()
        .groups()
        .unwrap()
        .runs()
        .to_vec();
    assert_eq!(started_runs(&config, &prefix), sidecar_runs, "cache miss");
    let cache = IdentityCache::new(Some(&cache_dir));
    let s = Shard::open(&prefix, None).unwrap();
    let cached = cache.lookup_groups(&s).expect("the start cached the runs");
    assert_eq!(cached.runs(), &sidecar_runs[..]);
    assert_eq!(started_runs(&config, &prefix), sidecar_runs, "cache hit");

    // Forge the runs (other ids, same documents) and have the entry vouch for them.
    let forged: Vec<GroupRun> = sidecar_runs
        .iter()
        .map(|r| GroupRun {
            id: r.id + 1_000_000,
            ..*r
        })
        .collect();
    let (bytes, sum) = runs_file(&forged);
    let (entry, mut json) = entry_json(&cache, &s);
    std::fs::write(entry.with_extension("runs"), bytes).unwrap();
    json["groups"]["runs_sum"] = sum.into();
    std::fs::write(&entry, serde_json::to_vec(&json).unwrap()).unwrap();
    assert_eq!(started_runs(&config, &prefix), forged);
}

/// A sidecar rewritten in place with its size and mtime kept: the ctime moved, so the
/// cached runs are stale and the start reads the sidecar again. Where the ctime would
/// not move either (forged here), the sampled pages catch a change on one of them.
#[test]
fn a_sidecar_rewritten_with_its_mtime_put_back_is_read_again() {
    let (corpus, config, cache_dir) = fixture();
    let prefix = first_code_prefix(&corpus.dir);
    Config::load(&config).unwrap().load_plan().unwrap();
    let cache = IdentityCache::new(Some(&cache_dir));

    let changed = rewrite_first_group_id(&prefix, 987_654_321);
    let s = Shard::open(&prefix, None).unwrap();
    assert_eq!(cache.lookup_groups(&s), Err(Miss::Stale));
    assert!(cache.lookup(&s).is_ok(), "the index did not change");
    assert_eq!(started_runs(&config, &prefix), changed);
    let s = Shard::open(&prefix, None).unwrap();
    assert_eq!(cache.lookup_groups(&s).unwrap().runs(), &changed[..]);

    // Again, and forge the entry's sidecar stamps to the new file's, as a filesystem
    // that kept mtime and ctime would: the first page (sampled) holds the changed id.
    let again = rewrite_first_group_id(&prefix, 123_456_789);
    let s = Shard::open(&prefix, None).unwrap();
    let (entry, mut json) = entry_json(&cache, &s);
    let m = std::fs::metadata(common::with(&prefix, "groups.npy")).unwrap();
    let ns = |s: i64, n: i64| (i128::from(s) * 1_000_000_000 + i128::from(n)).to_string();
    {
        use std::os::unix::fs::MetadataExt;
        let file = &mut json["groups"]["file"];
        file["dev"] = m.dev().into();
        file["ino"] = m.ino().into();
        file["size"] = m.size().into();
        file["mtime_ns"] = ns(m.mtime(), m.mtime_nsec()).into();
        file["ctime_ns"] = ns(m.ctime(), m.ctime_nsec()).into();
    }
    std::fs::write(&entry, serde_json::to_vec(&json).unwrap()).unwrap();
    assert_eq!(cache.lookup_groups(&s), Err(Miss::SampleChanged));
    assert_eq!(started_runs(&config, &prefix), again);
}

/// A runs file that is cut short, corrupt or missing is read as a miss: the sidecar is
/// read again and the runs file rewritten.
#[test]
fn a_damaged_runs_file_is_ignored_and_rewritten() {
    let (corpus, config, cache_dir) = fixture();
    let prefix = first_code_prefix(&corpus.dir);
    let want = started_runs(&config, &prefix);
    let cache = IdentityCache::new(Some(&cache_dir));
    let s = Shard::open(&prefix, None).unwrap();
    let runs = cache.entry_path(&s).unwrap().with_extension("runs");
    let good = std::fs::read(&runs).unwrap();
    let mut flipped = good.clone();
    flipped[20] ^= 1;
    for (what, bytes) in [
        ("cut short", Some(good[..good.len() - 3].to_vec())),
        ("a flipped bit", Some(flipped)),
        ("missing", None),
        ("a link to /dev/zero", Some(Vec::new())),
    ] {
        match bytes {
            Some(_) if what.contains("/dev/zero") => {
                std::fs::remove_file(&runs).unwrap();
                std::os::unix::fs::symlink("/dev/zero", &runs).unwrap();
            }
            Some(b) => std::fs::write(&runs, b).unwrap(),
            None => std::fs::remove_file(&runs).unwrap(),
        }
        assert!(cache.lookup_groups(&s).is_err(), "{what}");
        assert_eq!(started_runs(&config, &prefix), want, "{what}");
        assert_eq!(std::fs::read(&runs).unwrap(), good, "{what}: rewritten");
    }
}

/// A shard that passed the full validation (the daemon's background pass, or
/// `check-config`) has that recorded in its entry, and the next start takes the fast
/// paths at once; an entry that no longer describes the files records nothing.
#[test]
fn a_passed_validation_is_recorded_and_trusted_by_the_next_start() {
    let (corpus, config, cache) = fixture();
    let cfg = Config::load(&config).unwrap();
    let layouts = || -> Vec<Option<bool>> {
        let loaded = cfg.load_plan().unwrap();
        loaded
            .shards
            .iter()
            .flatten()
            .map(|s| s.validated_layout())
            .collect()
    };
    assert!(
        layouts().iter().all(Option::is_none),
        "nothing validated yet"
    );

    drop(serve_until_logged(
        &corpus,
        &config,
        "background validation of the shards done",
    ));
    let after = layouts();
    assert!(after.iter().all(|l| *l == Some(true)), "{after:?}");
    // The next daemon trusts the record instead of reading every index again.
    let again = serve_until_logged(&corpus, &config, "background validation of the shards done");
    let want = format!("corrupt=0 trusted={}", after.len());
    assert!(again.log_text().contains(&want), "{}", again.log_text());
    drop(again);

    // A touched index: its entry is stale, so its validation is not taken.
    let idx = common::with(&first_prefix(&corpus.dir), "idx");
    let f = std::fs::File::options().write(true).open(&idx).unwrap();
    f.set_modified(SystemTime::now() + Duration::from_secs(60))
        .unwrap();
    drop(f);
    let touched = layouts();
    assert_eq!(touched.iter().filter(|l| l.is_none()).count(), 1);

    // check-config records it too.
    std::fs::remove_dir_all(&cache).unwrap();
    cfg.load_plan_validated().unwrap();
    assert!(layouts().iter().all(|l| *l == Some(true)));
}

/// Shard paths are told apart by file, not spelling, with each directory canonicalized
/// once: a shard reached through a linked directory, a `..` or a linked index is the
/// same shard, refused when listed twice, and so is a hard link; a copy is another shard.
#[test]
fn a_shard_listed_twice_under_another_spelling_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("d");
    std::fs::create_dir_all(&d).unwrap();
    let x = common::write_docs(&d, "x", common::CODES[7], &common::simple_docs(&[3, 4], 9));
    std::os::unix::fs::symlink(&d, tmp.path().join("link")).unwrap();
    for ext in ["idx", "bin"] {
        std::os::unix::fs::symlink(common::with(&x, ext), d.join(format!("y.{ext}"))).unwrap();
        std::fs::copy(common::with(&x, ext), d.join(format!("z.{ext}"))).unwrap();
        std::fs::hard_link(common::with(&x, ext), d.join(format!("h.{ext}"))).unwrap();
    }
    let listing = |other: &str| {
        let text = format!(
            "[corpus]\n[[corpus.domain]]\nname = \"a\"\nshards = [\"d/x\"]\n\
             [[corpus.domain]]\nname = \"b\"\nshards = [{other:?}]\n"
        );
        let path = tmp.path().join("m.toml");
        std::fs::write(&path, text).unwrap();
        Config::load(&path).unwrap().open_corpus().map(|_| ())
    };
    for twice in ["link/x", "d/../d/x.bin", "d/y"] {
        let e = listing(twice).unwrap_err().to_string();
        assert!(e.contains("listed twice"), "{twice}: {e}");
    }
    // Regression: a hard link (a `cp -al` snapshot beside its source) was another shard.
    let e = listing("d/h").unwrap_err().to_string();
    assert!(
        e.contains("is the same file as shard") && e.contains("hard link"),
        "{e}"
    );
    listing("d/z").unwrap();
}
