//! A start that upsamples (`upsample_long`) stays O(shards + long units) (issue 16,
//! item 1): each shard's long units are listed once and cached beside its identity entry,
//! and the planner takes the lists instead of reading every document length. The plan is
//! the one a scan of the lengths gives, and a start reads no length outside its first
//! windows.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use millrace::config::Config;
use millrace::corpus::identity::Miss;
use millrace::corpus::{GroupRun, IdentityCache, Listed, LongUnits, Shard};
use millrace::plan::{DocSource, DomainInput, GlobalBatch, MemShard, Plan};
use rand::{Rng, SeedableRng};
use rand_pcg::Pcg64;

/// `[plan]` of both tests: two domains, small windows so that a start reads few lengths.
fn plan_table(seed: u64, window: u64) -> String {
    format!(
        "seed = {seed}\nseq_len = 128\nglobal_batch_rows = 8\nbest_fit_window = {window}\n\
         weights = {{ web = 1.0, code = 1.0 }}\n"
    )
}

/// A domain's shards as a test hands them to the planner.
type Shards = Vec<(String, Arc<dyn DocSource>)>;

fn batches(plan: Plan, steps: u64) -> Vec<GlobalBatch> {
    let plan = Arc::new(plan);
    let mut p = plan.start();
    (0..steps).map(|_| p.next_batch()).collect()
}

/// Random group runs over `docs` documents, 1 to 6 documents each.
fn runs(rng: &mut Pcg64, docs: u64) -> Vec<GroupRun> {
    let mut out = Vec::new();
    let mut first_doc = 0;
    while first_doc < docs {
        let n = rng.gen_range(1..=6).min(docs - first_doc);
        out.push(GroupRun {
            id: out.len() as u64 * 7 + 1,
            first_doc,
            docs: n,
        });
        first_doc += n;
    }
    out
}

/// Random domains, planned from the bare shards (the planner scans the lengths) and from
/// the same shards with their long units listed: the same batches, step for step, over
/// more than an epoch. A list for another threshold is ignored (the planner scans).
#[test]
fn listed_long_units_plan_what_a_scan_plans() {
    let mut rng = Pcg64::seed_from_u64(16);
    for case in 0..24 {
        let mut plain = Vec::new();
        let mut listed = Vec::new();
        let mut toml = String::new();
        for (name, grouped) in [("web", false), ("code", true)] {
            let min_tokens = rng.gen_range(0..500);
            let other_threshold = rng.gen_bool(0.2);
            let (mut a, mut b) = (Vec::new(), Vec::new());
            for s in 0..rng.gen_range(1..=3) {
                let docs = rng.gen_range(1..200u64);
                let lengths: Vec<u32> = (0..docs)
                    .map(|_| match rng.gen_bool(0.1) {
                        true => rng.gen_range(400..2000),
                        false => rng.gen_range(1..300),
                    })
                    .collect();
                let shard = MemShard {
                    lengths,
                    groups: Some(runs(&mut rng, docs)),
                };
                let t = min_tokens + u64::from(other_threshold);
                let long = LongUnits::scan(t, docs, shard.groups.as_deref(), |d| shard.doc_len(d));
                let shard = Arc::new(shard);
                a.push((format!("{name}/{s}"), shard.clone() as Arc<dyn DocSource>));
                let with: Arc<dyn DocSource> = Arc::new(Listed {
                    source: shard,
                    long: vec![long],
                });
                b.push((format!("{name}/{s}"), with));
            }
            let mode = if grouped { "sequence" } else { "off" };
            let from = rng.gen_range(0..40);
            toml += &format!(
                "[[corpus.domain]]\nname = {name:?}\nshards = [\"x\"]\n\
                 grouping = {{ mode = {mode:?}, from_step = {from} }}\n\
                 upsample_long = {{ min_tokens = {min_tokens}, factor = {} }}\n",
                rng.gen_range(2..=4)
            );
            plain.push((name, a));
            listed.push((name, b));
        }
        let text = format!(
            "[corpus]\n{toml}[plan]\n{}",
            plan_table(case, rng.gen_range(2..64))
        );
        let cfg = Config::parse(&text, Path::new("case.toml"), Path::new("/")).unwrap();
        let build = |shards: &[(&str, Shards)]| {
            let inputs: Vec<DomainInput> = shards
                .iter()
                .zip(&cfg.corpus.domains)
                .map(|((name, list), d)| DomainInput {
                    name: name.to_string(),
                    shards: list.clone(),
                    settings: d.settings,
                })
                .collect();
            Plan::new(&inputs, cfg.plan_config().unwrap(), 1).unwrap()
        };
        let (want, got) = (build(&plain), build(&listed));
        for d in 0..2 {
            assert_eq!(want.describe(d), got.describe(d), "case {case}");
        }
        assert_eq!(batches(want, 120), batches(got, 120), "case {case}");
    }
}

/// Lengths of `n` documents, one in 20 longer than 1,000 tokens.
fn lengths(n: usize, salt: usize) -> Vec<usize> {
    (0..n)
        .map(|i| match (i * 7919 + salt) % 20 {
            0 => 1000 + (i * 31) % 700,
            r => 1 + (i * 13 + r * 37) % 400,
        })
        .collect()
}

/// `web` (two shards of 3,000 documents) and `code` (one of 1,500, grouped), both
/// upsampling documents longer than `min_tokens`, in a config with `cache_dir`.
fn upsampling_corpus(dir: &Path, min_tokens: u64) -> PathBuf {
    let code = common::CODES[7];
    for (domain, shards, docs) in [("web", 2, 3000), ("code", 1, 1500)] {
        std::fs::create_dir_all(dir.join(domain)).unwrap();
        for s in 0..shards {
            let lens = lengths(docs, s * 3 + domain.len());
            let prefix = common::write_docs(
                &dir.join(domain),
                &format!("s{s}"),
                code,
                &common::simple_docs(&lens, 60000),
            );
            if domain == "code" {
                let ids: Vec<u64> = (0..docs as u64).map(|d| d / 4).collect();
                common::write_groups(&prefix, &ids);
            }
        }
    }
    let text = format!(
        "[corpus]\ncache_dir = \"cache\"\n\
         [[corpus.domain]]\nname = \"web\"\nshards = [\"web\"]\n\
         upsample_long = {{ min_tokens = {min_tokens}, factor = 3 }}\n\
         [[corpus.domain]]\nname = \"code\"\nshards = [\"code\"]\n\
         grouping = {{ mode = \"sequence\" }}\n\
         upsample_long = {{ min_tokens = {min_tokens}, factor = 2 }}\n\
         [plan]\n{}",
        plan_table(3, 8)
    );
    let config = dir.join("m.toml");
    std::fs::write(&config, text).unwrap();
    config
}

/// The plan of `cfg` from its bare shards: the planner scans every length.
fn scanned_plan(cfg: &Config) -> Plan {
    let inputs: Vec<DomainInput> = cfg
        .open_corpus()
        .unwrap()
        .into_iter()
        .zip(&cfg.corpus.domains)
        .map(|((name, shards), d)| DomainInput {
            name,
            shards: shards
                .into_iter()
                .map(|s| {
                    let name = s.path().display().to_string();
                    (name, Arc::new(s) as Arc<dyn DocSource>)
                })
                .collect(),
            settings: d.settings,
        })
        .collect();
    Plan::new(&inputs, cfg.plan_config().unwrap(), 1).unwrap()
}

/// A start writes each shard's lists beside its entry, the next start reads them, and
/// both plan what the planner's own scan of the same shards plans; a list written for
/// another state of the shard is not taken.
#[test]
fn an_upsampling_start_takes_the_cached_lists_and_plans_what_a_scan_plans() {
    let dir = tempfile::tempdir().unwrap();
    let config = upsampling_corpus(dir.path(), 1000);
    let cfg = Config::load(&config).unwrap();
    let scanned = scanned_plan(&cfg);
    let cache = IdentityCache::new(Some(&dir.path().join("cache")));
    let cold = cfg.load_plan().unwrap();
    let mut listed = 0;
    for s in cold.shards.iter().flatten() {
        let id = s.identity().unwrap();
        let hit = cache
            .lookup_long(s, &id, 1000)
            .expect("the start listed it");
        assert_eq!(hit, LongUnits::of_shard(s, 1000));
        assert_eq!(cache.lookup_long(s, &id, 999), Err(Miss::Absent));
        listed += hit.docs.len() + hit.groups.map_or(0, |g| g.len());
    }
    assert!(listed > 100, "{listed} long units: the test needs some");
    let warm = cfg.load_plan().unwrap();
    for d in 0..2 {
        assert_eq!(scanned.describe(d), warm.plan.describe(d));
        assert!(scanned.describe(d)["long_documents"] > 0);
    }
    let want = batches(scanned, 300);
    let cold = Arc::into_inner(cold.plan).unwrap();
    assert_eq!(batches(cold, 300), want);
    let warm_shards = warm.shards.clone();
    assert_eq!(batches(Arc::into_inner(warm.plan).unwrap(), 300), want);

    // A list of another state of the shard (here: another identity) is stale, and a
    // corrupt one unreadable; the start after either rewrites it.
    let s = &warm_shards[0][0];
    let mut other = s.identity().unwrap();
    other.index_hash = "0000000000000000".into();
    assert_eq!(cache.lookup_long(s, &other, 1000), Err(Miss::Stale));
    let file = cache.entry_path(s).unwrap().with_extension("long-1000");
    let mut bytes = std::fs::read(&file).unwrap();
    let last = bytes.len() - 9;
    bytes[last] ^= 1;
    std::fs::write(&file, &bytes).unwrap();
    let id = s.identity().unwrap();
    assert!(matches!(
        cache.lookup_long(s, &id, 1000),
        Err(Miss::Unreadable(_))
    ));
    drop(warm_shards);
    cfg.load_plan().unwrap();
    let s = Shard::open(&dir.path().join("web/s0"), None).unwrap();
    assert_eq!(
        cache.lookup_long(&s, &id, 1000),
        Ok(LongUnits::of_shard(&s, 1000))
    );
}

/// A start that upsamples reads the lengths of its first windows, not of every document:
/// a length made corrupt after the cache was written (in a page the identity does not
/// sample, with the entry's stamps forged to the new file's, as a filesystem that keeps
/// times would show it) is not seen at start. With its list file gone, the start scans
/// the lengths again and finds it, as every start did before the lists were cached.
#[test]
fn an_upsampling_start_reads_no_length_outside_its_first_windows() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let config = upsampling_corpus(dir.path(), 1000);
    let cfg = Config::load(&config).unwrap();
    cfg.load_plan().unwrap();
    let prefix = dir.path().join("web/s1");
    let idx = common::with(&prefix, "idx");
    let cache = IdentityCache::new(Some(&dir.path().join("cache")));
    let entry = cache
        .entry_path(&Shard::open(&prefix, None).unwrap())
        .unwrap();
    let mut json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&entry).unwrap()).unwrap();
    // Forged below: without its checksum, as an entry from before checksums is read.
    json.as_object_mut().unwrap().remove("checksum");
    let sampled: Vec<u64> = json["sample"]["offsets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o.as_u64().unwrap() / 4096)
        .collect();
    // Point a document in an unsampled page past the end of the `.bin`: open()'s O(1)
    // checks pass, a read of its length fails.
    let mut bytes = std::fs::read(&idx).unwrap();
    let n = u64::from_le_bytes(bytes[18..26].try_into().unwrap()) as usize;
    let pointers_at = 34 + 4 * n;
    let doc = (n / 2..n - 1)
        .find(|d| !sampled.contains(&((pointers_at + 8 * d) as u64 / 4096)))
        .unwrap();
    let at = pointers_at + 8 * doc;
    bytes[at..at + 8].copy_from_slice(&(1i64 << 40).to_le_bytes());
    std::fs::write(&idx, &bytes).unwrap();
    let m = std::fs::metadata(&idx).unwrap();
    let stamp = &mut json["files"][0];
    stamp["mtime_ns"] = (i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()))
        .to_string()
        .into();
    stamp["ctime_ns"] = (i128::from(m.ctime()) * 1_000_000_000 + i128::from(m.ctime_nsec()))
        .to_string()
        .into();
    std::fs::write(&entry, serde_json::to_vec(&json).unwrap()).unwrap();

    let start = cfg.load_plan().unwrap();
    let shard = start.shards[0].iter().find(|s| s.path() == prefix).unwrap();
    assert_eq!(shard.poisoned(), None, "document {doc} was read at start");
    drop(start);

    std::fs::remove_file(entry.with_extension("long-1000")).unwrap();
    let start = cfg.load_plan().unwrap();
    let shard = start.shards[0].iter().find(|s| s.path() == prefix).unwrap();
    let why = shard.poisoned().expect("a scan reads every length");
    assert!(why.contains(&format!("document {doc}")), "{why}");
    // A scan that found a corrupt length is not cached: the next start finds it too.
    assert!(!entry.with_extension("long-1000").exists());
}

/// A stage's own threshold (`[[plan.stage]] upsample_long`, issue 17) is listed per
/// shard and cached beside the entry like the domain's: a start lists `web` at both
/// thresholds (and `code`, whose stage turns upsampling off, at its own only), and the
/// cold and warm starts plan what a scan plans, across the switch and into the first
/// epoch that takes the stage's setting.
#[test]
fn a_stages_threshold_is_listed_and_cached_too() {
    let dir = tempfile::tempdir().unwrap();
    let config = upsampling_corpus(dir.path(), 1000);
    let mut text = std::fs::read_to_string(&config).unwrap();
    text += "[[plan.stage]]\nstep = 20\nseq_len = 1024\nglobal_batch_rows = 64\n\
             upsample_long = { web = { min_tokens = 1300, factor = 2 }, code = \"off\" }\n";
    std::fs::write(&config, text).unwrap();
    let cfg = Config::load(&config).unwrap();
    let scanned = Arc::new(scanned_plan(&cfg));
    let cold = cfg.load_plan().unwrap();
    let cache = IdentityCache::new(Some(&dir.path().join("cache")));
    for (d, shards) in cold.shards.iter().enumerate() {
        for s in shards {
            let id = s.identity().unwrap();
            let got = cache.lookup_long(s, &id, 1300);
            if d == 0 {
                assert_eq!(got, Ok(LongUnits::of_shard(s, 1300)));
            } else {
                assert_eq!(got, Err(Miss::Absent));
            }
        }
    }
    let steps = 200;
    let web = scanned.seek(steps).stream(0).unwrap().clone();
    assert!(web.epoch > 0, "the test needs web's next epoch");
    assert_eq!(
        web.upsample,
        millrace::plan::Upsampling::Long(millrace::config::plan::Upsample {
            min_tokens: 1300,
            factor: 2
        })
    );
    let want = batches(Arc::into_inner(scanned).unwrap(), steps);
    assert_eq!(batches(Arc::into_inner(cold.plan).unwrap(), steps), want);
    let warm = cfg.load_plan().unwrap();
    assert_eq!(batches(Arc::into_inner(warm.plan).unwrap(), steps), want);
}
