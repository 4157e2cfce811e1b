//! Plan checkpoints on disk end to end (issue 16, "seek in bounded time"): `millrace plan
//! --from` and `millrace explain --step` seek from the checkpoints an earlier seek left
//! in the cache directory and print exactly what the plain replay (`--no-checkpoints`)
//! prints; a corrupt checkpoint file is ignored with a warning and replaced. A daemon
//! seeking for a client's `start_step` takes the same path and hands out the same state.

use std::path::{Path, PathBuf};
use std::process::Output;

use serde_json::Value;

mod common;

/// Global batch rows: 1024 makes a checkpoint every 64 plan steps
/// (`plan::CHECKPOINT_ROWS` / rows), so a seek to step 300 leaves four.
const ROWS: u32 = 1024;
const STEP: &str = "300";

/// Runs the binary with the per-user cache pointed at `xdg`, so no test writes to the
/// real one.
fn run(xdg: &Path, args: &[&str]) -> Output {
    common::bin()
        .env("XDG_CACHE_HOME", xdg)
        .env_remove("MILLRACE_LOG")
        .args(args)
        .output()
        .expect("the millrace binary runs")
}

fn ok(xdg: &Path, args: &[&str]) -> (Value, String) {
    let out = run(xdg, args);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "millrace {args:?} failed: {err}");
    let text = String::from_utf8(out.stdout).expect("utf-8 output");
    let v = serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
    (v, err)
}

/// `plan --from 300 --steps 4` in JSON without its timings and memory (which vary).
fn plan_windows(xdg: &Path, config: &str, extra: &[&str]) -> (Value, String) {
    plan_windows_from(xdg, config, STEP, extra)
}

/// [`plan_windows`] from step `from`.
fn plan_windows_from(xdg: &Path, config: &str, from: &str, extra: &[&str]) -> (Value, String) {
    let mut args = vec![
        "plan", "--config", config, "--from", from, "--steps", "4", "--window", "1", "--json",
    ];
    args.extend(extra);
    let (mut v, err) = ok(xdg, &args);
    let o = v.as_object_mut().expect("a JSON object");
    o.remove("timings_ms");
    o.remove("memory_kb");
    (v, err)
}

fn explain(xdg: &Path, config: &str, extra: &[&str]) -> Value {
    let mut args = vec!["explain", "--config", config, "--step", STEP, "--json"];
    args.extend(extra);
    ok(xdg, &args).0
}

/// The checkpoint files under `root`, sorted.
fn checkpoints(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(fps) = std::fs::read_dir(root.join("plan-checkpoints")) else {
        return out;
    };
    for fp in fps.flatten() {
        for f in std::fs::read_dir(fp.path()).unwrap().flatten() {
            out.push(f.path());
        }
    }
    out.sort();
    out
}

/// The corpus's config with `seq_len` 32, [`ROWS`] rows and, with `cache`, `[corpus]
/// cache_dir` set.
fn config(dir: &Path, file: &str, cache: Option<&Path>) -> String {
    config_serving(dir, file, cache, &[])
}

/// [`config`] with `[serve]` lines.
fn config_serving(dir: &Path, file: &str, cache: Option<&Path>, serve: &[&str]) -> String {
    let path = common::write_config(dir, file, 32, ROWS, serve);
    if let Some(cache) = cache {
        let text = std::fs::read_to_string(&path).unwrap();
        let mut doc: toml::Table = toml::from_str(&text).unwrap();
        let corpus = doc.get_mut("corpus").unwrap().as_table_mut().unwrap();
        corpus.insert(
            "cache_dir".into(),
            toml::Value::String(cache.to_str().unwrap().into()),
        );
        std::fs::write(&path, toml::to_string(&doc).unwrap()).unwrap();
    }
    path.to_str().unwrap().to_string()
}

#[test]
fn plan_and_explain_seek_from_checkpoints_as_the_replay_does() {
    let c = common::corpus(2_000_000, 3, 16, 1_000_000);
    let xdg = c.tmp.path().join("xdg");
    let cfg = config(&c.dir, "ck.toml", None);
    let root = xdg.join("millrace");

    let (plain, _) = plan_windows(&xdg, &cfg, &["--no-checkpoints"]);
    let plain_explain = explain(&xdg, &cfg, &["--no-checkpoints"]);
    assert!(
        checkpoints(&root).is_empty(),
        "--no-checkpoints wrote {:?}",
        checkpoints(&root)
    );

    // Cold: the seek replays from step 0 and leaves a checkpoint at plan steps 64 ... 256.
    let (cold, err) = plan_windows(&xdg, &cfg, &[]);
    assert_eq!(cold, plain, "cold checkpointed seek");
    assert!(!err.contains("warning"), "{err}");
    let files = checkpoints(&root);
    let names: Vec<String> = files
        .iter()
        .map(|f| f.file_name().unwrap().to_string_lossy()[..16].to_string())
        .collect();
    assert_eq!(
        names,
        [
            "0000000000000040",
            "0000000000000080",
            "00000000000000c0",
            "0000000000000100"
        ],
        "{files:?}"
    );

    // Warm: from the checkpoint at 256, for `plan` and `explain` alike.
    let (warm, err) = plan_windows(&xdg, &cfg, &[]);
    assert_eq!(warm, plain, "warm checkpointed seek");
    assert!(!err.contains("warning"), "{err}");
    assert_eq!(explain(&xdg, &cfg, &[]), plain_explain);

    // Corrupt files are ignored with a warning naming them, removed, and rewritten by
    // the seek that replays past them.
    for f in &files {
        let mut b = std::fs::read(f).unwrap();
        let n = b.len();
        b[n / 2] ^= 0xff;
        std::fs::write(f, b).unwrap();
    }
    let (after, err) = plan_windows(&xdg, &cfg, &[]);
    assert_eq!(after, plain, "seek over corrupt checkpoints");
    assert!(
        err.contains("ignoring plan checkpoint") && err.contains("checksum"),
        "{err}"
    );
    assert_eq!(checkpoints(&root), files, "the corrupt files are replaced");
    let (again, err) = plan_windows(&xdg, &cfg, &[]);
    assert_eq!(again, plain);
    assert!(!err.contains("warning"), "{err}");
}

#[test]
fn checkpoints_go_to_the_configured_cache_dir_and_an_unwritable_one_warns_once() {
    let c = common::corpus(2_000_000, 2, 17, 1_000_000);
    let xdg = c.tmp.path().join("xdg");
    let cache = c.tmp.path().join("cache");
    let cfg = config(&c.dir, "ck.toml", Some(&cache));
    let (plain, _) = plan_windows(&xdg, &cfg, &["--no-checkpoints"]);
    let (v, _) = plan_windows(&xdg, &cfg, &[]);
    assert_eq!(v, plain);
    assert_eq!(checkpoints(&cache).len(), 4);
    assert!(checkpoints(&xdg.join("millrace")).is_empty());

    // A cache_dir that is a file cannot hold checkpoints: one warning, same batches.
    let blocked = c.tmp.path().join("blocked");
    std::fs::write(&blocked, b"not a directory").unwrap();
    let cfg = config(&c.dir, "blocked.toml", Some(&blocked));
    let (v, err) = plan_windows(&xdg, &cfg, &[]);
    assert_eq!(v, plain);
    assert_eq!(
        err.matches("cannot write plan checkpoints").count(),
        1,
        "{err}"
    );
}

/// Every file under `root`, relative to it, sorted.
fn files_under(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            if e.file_type().unwrap().is_dir() {
                dirs.push(e.path());
            } else {
                out.push(e.path().strip_prefix(root).unwrap().to_path_buf());
            }
        }
    }
    out.sort();
    out
}

/// A cache_dir other users can write to (a shared project directory) must not let them
/// choose what the daemon writes: the identity cache and the plan checkpoints are
/// written through temporary names made of the pid and a counter, and a symlink
/// planted under the next one made `millrace plan` overwrite the file it pointed at
/// (any file the daemon's user may write) with a cache entry. The links are planted by
/// the shell that then execs millrace, so they carry its pid.
#[test]
fn links_planted_under_the_cache_temporary_names_are_never_followed() {
    let c = common::corpus(2_000_000, 2, 19, 1_000_000);
    let xdg = c.tmp.path().join("xdg");
    // The names this plan's cache holds, learnt from a run into another cache_dir.
    let learn = c.tmp.path().join("learn");
    let (plain, _) = plan_windows(&xdg, &config(&c.dir, "learn.toml", Some(&learn)), &[]);
    let names = files_under(&learn);
    assert!(names.iter().any(|n| n.starts_with("identity")), "{names:?}");
    assert!(
        names.iter().any(|n| n.starts_with("plan-checkpoints")),
        "{names:?}"
    );

    let cache = c.tmp.path().join("cache");
    let victim = c.tmp.path().join("victim");
    std::fs::write(&victim, b"precious").unwrap();
    let mut script = String::new();
    for name in &names {
        let at = cache.join(name);
        let (dir, file) = (at.parent().unwrap(), at.file_name().unwrap());
        std::fs::create_dir_all(dir).unwrap();
        let (dir, file) = (dir.to_str().unwrap(), file.to_str().unwrap());
        // identity.rs and plan_cache.rs name their temporary files these two ways.
        script.push_str(&format!(
            "for n in 0 1 2 3 4 5; do ln -s \"$V\" '{dir}/{file}.tmp.'$$.$n; \
             ln -s \"$V\" '{dir}/.{file}.'$$.$n.tmp; done\n"
        ));
    }
    script.push_str("exec \"$M\" \"$@\"\n");
    let cfg = config(&c.dir, "shared.toml", Some(&cache));
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(&script)
        .arg("sh")
        .args(["plan", "--config", &cfg, "--from", STEP, "--steps", "4"])
        .args(["--window", "1", "--json"])
        .env("V", &victim)
        .env("M", common::bin().get_program())
        .env("XDG_CACHE_HOME", &xdg)
        .env_remove("MILLRACE_LOG")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert_eq!(
        String::from_utf8_lossy(&std::fs::read(&victim).unwrap()),
        "precious",
        "a cache write followed a planted link"
    );
    // The links were stepped over, not given up on: the cache is whole, and the seek
    // that used it printed what the first one did.
    let written: Vec<PathBuf> = files_under(&cache)
        .into_iter()
        .filter(|n| {
            !std::fs::symlink_metadata(cache.join(n))
                .unwrap()
                .is_symlink()
        })
        .collect();
    assert_eq!(written, names, "{err}");
    let mut v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let o = v.as_object_mut().unwrap();
    o.remove("timings_ms");
    o.remove("memory_kb");
    assert_eq!(v, plain);
}

/// The daemon's seek for a client's `start_step` leaves checkpoints in `[corpus]
/// cache_dir` and starts the next one from them, and the state it hands out (the cursor
/// of the first batch, which records the whole planner) is the plain replay's, cold,
/// warm and over corrupt checkpoints.
#[test]
fn the_daemon_seeks_from_checkpoints_to_the_same_state() {
    use millrace::client::{Client, Hello};
    let c = common::corpus(2_000_000, 3, 18, 1_000_000);
    let cache = c.tmp.path().join("cache");
    let socket = c.dir.join("s.sock");
    let serve = common::serve_toml(&socket, 2, 1);
    let cfg = config_serving(&c.dir, "serve.toml", Some(&cache), &[&serve]);
    let plan = millrace::config::Config::load(Path::new(&cfg))
        .and_then(|c| c.load_plan())
        .expect("the test config plans")
        .plan;
    let mut want = plan.seek(300);
    want.next_batch();
    let want = want.cursor();
    let log = c.dir.join("serve.log");
    let serve = common::Serve::start(Path::new(&cfg), &socket, &log);
    let first_cursor = |job: &str| {
        let mut h = Hello::whole_slice(0, 1);
        h.job = job.into();
        h.start_step = Some(300);
        let mut client = Client::connect(&socket, &h).unwrap_or_else(|e| panic!("connect: {e}"));
        client.set_timeout(Some(std::time::Duration::from_secs(60)));
        assert_eq!(client.welcome().start_step, 300);
        let step = client.next_batch().expect("a first batch").step;
        assert_eq!(step, 300);
        client.last_cursor().expect("a cursor").to_vec()
    };
    assert_eq!(first_cursor("cold"), want, "cold seek in the daemon");
    // The seek wrote the checkpoints at plan steps 64, 128, 192 and 256 before WELCOME;
    // the job's planner may have passed 320 since, and its writer keeps that one off the
    // copy path (a fifth file, or a temporary one, depending on timing): only the seek's
    // are counted.
    let files: Vec<PathBuf> = checkpoints(&cache)
        .into_iter()
        .filter(|f| {
            let name = f.file_name().and_then(|n| n.to_str()).unwrap_or("");
            let step = name.get(..16).and_then(|h| u64::from_str_radix(h, 16).ok());
            step.is_some_and(|s| s <= 300)
        })
        .collect();
    assert_eq!(files.len(), 4, "{files:?}");
    assert_eq!(first_cursor("warm"), want, "warm seek in the daemon");
    for f in &files {
        std::fs::write(f, b"MILLRACE not a checkpoint").unwrap();
    }
    assert_eq!(
        first_cursor("corrupt"),
        want,
        "seek over corrupt checkpoints"
    );
    let text = serve.log_text();
    assert!(text.contains("ignoring plan checkpoint"), "{text}");
    drop(serve);
}

/// A group sidecar rewritten between two starts (same documents, same number of groups,
/// other boundaries) changes a grouped domain's units and so its plan. It now changes the
/// shard's content identity: a blob of the old grouping is refused naming the shard, and
/// the checkpoints the old plan left are never restored under the new one (a seek from
/// them was not the plain replay, so nodes with a warm and a cold cache disagreed).
#[test]
fn a_rewritten_group_sidecar_refuses_old_blobs_and_checkpoints() {
    use millrace::config::Config;
    use millrace::plan::{GlobalBatch, Plan, Planner};
    use millrace::plan_cache::CheckpointDir;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    const DOCS: usize = 600;
    /// 60 groups over the documents, each boundary moved by `shift` documents, written
    /// to a new file renamed into place as the writers do.
    fn write_groups(dir: &Path, shift: usize) {
        let ids: Vec<u64> = (0..DOCS)
            .map(|d| (d.saturating_sub(shift) / 10).min(59) as u64)
            .collect();
        let tmp = dir.join("tmp-groups");
        std::fs::create_dir_all(&tmp).unwrap();
        common::write_groups(&tmp.join("code"), &ids);
        std::fs::rename(
            common::with(&tmp.join("code"), "groups.npy"),
            common::with(&dir.join("code"), "groups.npy"),
        )
        .unwrap();
    }
    fn load(path: &Path) -> Arc<Plan> {
        Config::load(path).unwrap().load_plan().unwrap().plan
    }
    fn batches(p: &mut Planner, n: usize) -> Vec<GlobalBatch> {
        (0..n).map(|_| p.next_batch()).collect()
    }

    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let u16 = common::CODES[7];
    let lens: Vec<usize> = (0..DOCS).map(|i| 3 + (i * 7) % 29).collect();
    common::write_docs(dir, "code", u16, &common::simple_docs(&lens, 60000));
    let lens: Vec<usize> = (0..DOCS).map(|i| 5 + (i * 11) % 37).collect();
    common::write_docs(dir, "web", u16, &common::simple_docs(&lens, 60000));
    write_groups(dir, 0);
    let root = dir.join("cache");
    let cfg = dir.join("run.toml");
    std::fs::write(
        &cfg,
        format!(
            "[corpus]\ncache_dir = {:?}\n\n[[corpus.domain]]\nname = \"code\"\nshards = \
             [\"code\"]\ngrouping = {{ mode = \"sequence\" }}\n\n[[corpus.domain]]\nname = \
             \"web\"\nshards = [\"web\"]\n\n[plan]\nseed = 5\nseq_len = 32\n\
             global_batch_rows = 8\nweights = {{ code = 1.0, web = 1.0 }}\n",
            root.display().to_string()
        ),
    )
    .unwrap();
    let cancel = AtomicBool::new(false);

    let old = load(&cfg);
    let store = CheckpointDir::new(&root, &old);
    old.seek_checkpointed(100, 16, 8, &store, &cancel)
        .expect("seek");
    let blob = old.seek(60).cursor();
    assert!(
        load(&cfg).restore(&blob).is_ok(),
        "unchanged: the blob resumes"
    );

    write_groups(dir, 5);
    let new = load(&cfg);
    let (mut a, mut b) = (old.seek(0), new.seek(0));
    assert_ne!(
        batches(&mut a, 100),
        batches(&mut b, 100),
        "the sidecar shapes the plan"
    );
    let e = new
        .restore(&blob)
        .err()
        .expect("a blob of the old grouping is refused");
    assert!(
        e.to_string().contains("domain code")
            && e.to_string()
                .contains("changed content since the blob was written"),
        "{e}"
    );
    let store = CheckpointDir::new(&root, &new);
    let mut from_cache = new
        .seek_checkpointed(100, 16, 8, &store, &cancel)
        .expect("seek");
    let mut plain = new.seek(100);
    assert_eq!(from_cache.cursor(), plain.cursor());
    assert_eq!(batches(&mut from_cache, 20), batches(&mut plain, 20));
    // The ungrouped domain's identity, and so blobs of a corpus without grouping, are
    // what they were: only a grouped domain's sidecar is content.
    assert_eq!(old.fingerprint(), new.fingerprint());
}

/// The plan steps of the checkpoint files under `root`, sorted.
fn checkpoint_steps(root: &Path) -> Vec<u64> {
    let mut steps: Vec<u64> = checkpoints(root)
        .iter()
        .filter_map(|f| {
            let name = f.file_name()?.to_str()?;
            name.ends_with(".ckpt")
                .then(|| u64::from_str_radix(name.get(..16)?, 16).ok())?
        })
        .collect();
    steps.sort_unstable();
    steps
}

/// A cache directory deleted while a daemon serves leaves it the checkpoints it writes
/// after: here one, at plan step 1024. The next seek past it used to read the spacing
/// off that lone file's step and keep one checkpoint in 1024 steps for good (every
/// later seek replaying up to 1024 steps instead of 64); it keeps one every 64 and
/// prints what the plain replay prints.
#[test]
fn a_lone_checkpoint_does_not_make_the_store_sparse() {
    let c = common::corpus(2_000_000, 3, 19, 1_000_000);
    let xdg = c.tmp.path().join("xdg");
    let cache = c.tmp.path().join("cache");
    let cfg = config(&c.dir, "ck.toml", Some(&cache));
    let plan = |from: &str, extra: &[&str]| plan_windows_from(&xdg, &cfg, from, extra).0;
    plan("1024", &[]);
    for f in checkpoints(&cache) {
        if !f.to_string_lossy().contains("/0000000000000400-") {
            std::fs::remove_file(f).unwrap();
        }
    }
    assert_eq!(checkpoint_steps(&cache), [1024]);
    assert_eq!(plan("2000", &[]), plan("2000", &["--no-checkpoints"]));
    let want: Vec<u64> = (1024..=1984).step_by(64).collect();
    assert_eq!(checkpoint_steps(&cache), want);
}
