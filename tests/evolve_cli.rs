//! Continual pretraining and evolution reports through the real binary (issue 20, items
//! 4 and 5): an old run's cursor blob (config A, two domains, 30 steps) starts `millrace
//! plan` and `explain` under config B, which adds a domain and weights the old ones as a
//! replay share from step 30. The plan continues at step 30, each old domain where the
//! old run left it, and the report says how much of its current epoch was seen before;
//! `inspect --config` names the step each domain enters.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use millrace::client::to_hex;
use millrace::config::Config;
use millrace::plan::report::{positions, DomainPosition};
use serde_json::Value;

const SEQ_LEN: u32 = 64;
const ROWS: u32 = 8;
/// The old run's last step plus one: the new run's first.
const RESUMED: u64 = 30;

/// Writes `<dir>/<file>`: the corpus config with `[plan]` shaped for the test, the
/// domains `domains` (name, shards) only and `schedule` as `[[plan.schedule]]`.
fn config(dir: &Path, file: &str, domains: &[(&str, &str)], schedule: &str) -> PathBuf {
    let path = common::write_config(dir, file, SEQ_LEN, ROWS, &[]);
    let mut doc: toml::Table = toml::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let list: Vec<toml::Value> = domains
        .iter()
        .map(|(name, shards)| {
            let text = format!("name = {name:?}\nshards = [{shards:?}]\n");
            toml::Value::Table(toml::from_str(&text).unwrap())
        })
        .collect();
    let corpus = doc.get_mut("corpus").unwrap().as_table_mut().unwrap();
    corpus.insert("domain".into(), toml::Value::Array(list));
    let points: toml::Table = toml::from_str(schedule).unwrap();
    let plan = doc.get_mut("plan").unwrap().as_table_mut().unwrap();
    plan.insert("schedule".into(), points["schedule"].clone());
    std::fs::write(&path, toml::to_string(&doc).unwrap()).unwrap();
    path
}

fn run(args: &[&str]) -> Output {
    common::bin()
        .args(args)
        .output()
        .expect("the millrace binary runs")
}

/// The stdout of a run that must succeed (its stderr in the failure message).
fn ok(args: &[&str]) -> String {
    let out = run(args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "millrace {args:?}: {err}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn refused(args: &[&str]) -> String {
    let out = run(args);
    assert!(!out.status.success(), "millrace {args:?} succeeded");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// Asserts that a reported position is `p` (the fraction to JSON's float precision).
fn same(reported: &Value, p: &DomainPosition) {
    assert_eq!(
        reported["name"].as_str(),
        Some(p.name.as_str()),
        "{reported}"
    );
    assert_eq!(
        reported["epoch"].as_u64(),
        Some(p.epoch.into()),
        "{reported}"
    );
    assert_eq!(reported["rows"].as_u64(), Some(p.rows), "{reported}");
    assert_eq!(
        reported["weighted_from"].as_u64(),
        p.weighted_from,
        "{reported}"
    );
    let f = reported["epoch_fraction"].as_f64().expect("a fraction");
    assert!((f - p.epoch_fraction).abs() < 1e-12, "{reported} vs {p:?}");
}

#[test]
fn an_old_runs_blob_starts_a_new_config_with_a_replay_share() {
    let corpus = common::corpus(600_000, 3, 11, 1_000_000);
    let dir = &corpus.dir;
    let old = [("web", "web"), ("code", "code")];
    let a = config(
        dir,
        "a.toml",
        &old,
        "[[schedule]]\nstep = 0\nweights = { web = 0.6, code = 0.4 }\n",
    );
    // The new run: `books` is new and takes 70%; the old domains are a 30% replay share.
    let b = config(
        dir,
        "b.toml",
        &[("web", "web"), ("code", "code"), ("books", "books")],
        &format!(
            "[[schedule]]\nstep = 0\nweights = {{ web = 0.6, code = 0.4, books = 0.0 }}\n\
             [[schedule]]\nstep = {RESUMED}\nramp = false\n\
             weights = {{ web = 0.2, code = 0.1, books = 0.7 }}\n"
        ),
    );
    // The old run's final blob, as a trainer saves it (hex) and as raw bytes.
    let plan_a = Config::load(&a).unwrap().load_plan().unwrap().plan;
    let old_end = plan_a.seek(RESUMED);
    let blob = old_end.cursor();
    let hex = dir.join("old.cursor");
    std::fs::write(&hex, format!("{}\n", to_hex(&blob))).unwrap();
    let raw = dir.join("old.bin");
    std::fs::write(&raw, &blob).unwrap();
    let seen = positions(&old_end);
    assert!(
        seen.iter()
            .all(|p| p.epoch_fraction > 0.0 && p.epoch_fraction < 1.0),
        "the old run is inside its domains' epochs: {seen:?}"
    );

    let (b_s, hex_s, raw_s) = (
        b.to_str().unwrap(),
        hex.to_str().unwrap(),
        raw.to_str().unwrap(),
    );
    let args = |blob: &str| {
        ok(&[
            "plan",
            "--config",
            b_s,
            "--resume-blob",
            blob,
            "--steps",
            "10",
            "--window",
            "5",
            "--no-checkpoints",
            "--json",
        ])
    };
    let v = json(&args(hex_s));
    // The plan continues at step 30.
    assert_eq!(v["windows"][0]["first_step"].as_u64(), Some(RESUMED), "{v}");
    assert_eq!(v["resumed"]["step"].as_u64(), Some(RESUMED), "{v}");
    // Per domain: the old ones as the old run left them, the new one new.
    let domains = v["resumed"]["domains"].as_array().expect("resumed domains");
    assert_eq!(domains.len(), 3, "{v}");
    for (d, p) in seen.iter().enumerate() {
        let (pos, known) = (&domains[d][0], &domains[d][1]);
        assert_eq!(pos["name"].as_str(), Some(p.name.as_str()));
        assert_eq!(known.as_bool(), Some(true), "{pos}");
        assert_eq!(pos["epoch"].as_u64(), Some(p.epoch.into()), "{pos}");
        assert_eq!(
            pos["epoch_fraction"].as_f64(),
            Some(p.epoch_fraction),
            "{pos}"
        );
        assert_eq!(pos["rows"].as_u64(), Some(p.rows), "{pos}");
    }
    assert_eq!(domains[2][0]["name"].as_str(), Some("books"));
    assert_eq!(domains[2][1].as_bool(), Some(false));
    assert_eq!(domains[2][0]["rows"].as_u64(), Some(0));
    // The new domain enters at step 30, by weight and by rows; the old ones from 0.
    let start = v["start"].as_array().expect("start positions");
    assert_eq!(start[2]["weighted_from"].as_u64(), Some(RESUMED), "{v}");
    assert_eq!(start[0]["weighted_from"].as_u64(), Some(0), "{v}");
    assert_eq!(v["first_rows"][2].as_u64(), Some(RESUMED), "{v}");
    // The old domains continue: after 10 more steps they are further into the same
    // epoch (30% of a batch over 10 steps stays well inside it).
    let end = v["end"].as_array().expect("end positions");
    for (d, p) in seen.iter().enumerate() {
        assert_eq!(end[d]["epoch"].as_u64(), Some(p.epoch.into()), "{v}");
        assert!(
            end[d]["epoch_fraction"].as_f64().unwrap() > p.epoch_fraction,
            "{v}"
        );
    }
    // The library's own resume agrees with the binary's report.
    let plan_b = Config::load(&b).unwrap().load_plan().unwrap().plan;
    let mut resumed = plan_b.resume(&blob, usize::MAX).unwrap().planner;
    for _ in 0..10 {
        resumed.next_batch();
    }
    for (d, p) in positions(&resumed).iter().enumerate() {
        same(&end[d], p);
    }
    // Raw bytes read the same as hex.
    let w = json(&args(raw_s));
    assert_eq!(v["windows"], w["windows"]);
    assert_eq!(v["end"], w["end"]);

    // The text report says what each domain had seen before the new run.
    let text = ok(&[
        "plan",
        "--config",
        b_s,
        "--resume-blob",
        hex_s,
        "--steps",
        "4",
        "--no-checkpoints",
    ]);
    assert!(
        text.contains(&format!("resumed from {hex_s} at step {RESUMED}")),
        "{text}"
    );
    let web = format!(
        "{:.3}% seen before step {RESUMED}",
        100.0 * seen[0].epoch_fraction
    );
    assert!(text.contains(&web), "{text}");
    assert!(
        text.contains("books        new: starts at epoch 0"),
        "{text}"
    );

    // `explain` resumes too, shows the positions before its step, and refuses a step
    // before the blob's.
    let explain = |step: &str| {
        run(&[
            "explain",
            "--config",
            b_s,
            "--resume-blob",
            hex_s,
            "--step",
            step,
            "--json",
            "--no-checkpoints",
        ])
    };
    let out = explain("31");
    assert!(out.status.success(), "{out:?}");
    let e = json(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(e["step"].as_u64(), Some(31), "{e}");
    assert_eq!(e["domains"].as_array().map(Vec::len), Some(3), "{e}");
    assert_eq!(
        e["domains"][2]["weighted_from"].as_u64(),
        Some(RESUMED),
        "{e}"
    );
    let out = explain("29");
    assert!(!out.status.success(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("step 29 is before step 30, where the blob")
            && err.contains("saved at the end of step 29"),
        "{err}"
    );

    // A config that drops an old domain refuses the blob, naming the file and domain.
    let c = config(
        dir,
        "c.toml",
        &[("web", "web"), ("books", "books")],
        "[[schedule]]\nstep = 0\nweights = { web = 0.5, books = 0.5 }\n",
    );
    let err = refused(&[
        "plan",
        "--config",
        c.to_str().unwrap(),
        "--resume-blob",
        hex_s,
        "--steps",
        "2",
        "--no-checkpoints",
    ]);
    assert!(
        err.contains("old.cursor: cursor blob refused") && err.contains("code"),
        "{err}"
    );

    // A file that is no blob is refused, naming it.
    let junk = dir.join("junk.cursor");
    std::fs::write(&junk, "not a cursor\n").unwrap();
    let err = refused(&[
        "plan",
        "--config",
        b_s,
        "--resume-blob",
        junk.to_str().unwrap(),
        "--no-checkpoints",
    ]);
    assert!(
        err.contains("junk.cursor: cursor blob refused: not a millrace cursor"),
        "{err}"
    );

    // `inspect --config` lists each domain's shards and the step it enters.
    let i = json(&ok(&["inspect", "--config", b_s, "--json"]));
    let listed = i["domains"].as_array().expect("inspect domains");
    assert_eq!(listed.len(), 3, "{i}");
    assert_eq!(listed[2]["name"].as_str(), Some("books"));
    assert_eq!(listed[2]["weighted_from"].as_u64(), Some(RESUMED), "{i}");
    assert_eq!(listed[0]["weighted_from"].as_u64(), Some(0), "{i}");
    let books = listed[2]["shards"].as_array().unwrap();
    assert!(
        !books.is_empty() && books.iter().all(|s| s.as_str().unwrap().contains("books")),
        "{i}"
    );
    let text = ok(&["inspect", "--config", b_s]);
    assert!(
        text.contains("books (1 shards, enters at step 30)"),
        "{text}"
    );
}
