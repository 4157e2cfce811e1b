//! `millrace plan` and `millrace explain` end to end: the real binary on a corpus that
//! `millrace synth` writes (issue 3, "Provenance and preview").

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use serde_json::Value;

mod common;
mod grouping_check;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_millrace"))
}

fn run(args: &[&str]) -> Output {
    bin().args(args).output().expect("the millrace binary runs")
}

fn ok(args: &[&str]) -> String {
    let out = run(args);
    assert!(
        out.status.success(),
        "millrace {args:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

/// One small synthetic corpus shared by every test in this file: 2e7 tokens (about 1 s
/// to write). At 2e6 tokens each domain's epoch is a single packing window of a few
/// dozen documents and best_fit pads 1.2-1.7% per 3-step window (1.37% over 30 steps,
/// seed 3); at 2e7 it pads 0.2-0.7%, under the 1%.
fn corpus() -> &'static Path {
    static DIR: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    let (_, dir) = DIR.get_or_init(|| {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("corpus");
        let d = dir.to_str().unwrap();
        ok(&[
            "synth",
            "--out",
            d,
            "--tokens",
            "2e7",
            "--seed",
            "3",
            "--threads",
            "2",
        ]);
        assert!(dir.join("millrace.toml").is_file());
        (tmp, dir)
    });
    dir
}

fn config() -> String {
    corpus().join("millrace.toml").to_str().unwrap().to_string()
}

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

#[test]
fn plan_json_reports_no_duplicates_and_little_padding() {
    let cfg = config();
    let v = json(&ok(&["plan", "--config", &cfg, "--steps", "30", "--json"]));
    let domains = v["domains"].as_array().expect("domains");
    assert!(domains.len() >= 2, "{v}");
    assert_eq!(v["fill"].as_array().unwrap().len(), domains.len());
    assert_eq!(v["fingerprint"].as_str().unwrap().len(), 32);
    let windows = v["windows"].as_array().expect("windows");
    assert!(!windows.is_empty());
    let mut last = None;
    for w in windows {
        assert_eq!(w["duplicates"].as_u64(), Some(0), "window {w}");
        let pad = w["padding_pct"].as_f64().unwrap();
        assert!((0.0..1.0).contains(&pad), "padding {pad}% in {w}");
        let trunc = w["truncation_pct"].as_f64().unwrap();
        assert!(
            trunc.abs() < 1e-9,
            "best_fit truncated documents that fit: {trunc}%"
        );
        let ds = w["domains"].as_array().unwrap();
        assert_eq!(ds.len(), domains.len());
        let share: f64 = ds.iter().map(|d| d["token_share"].as_f64().unwrap()).sum();
        assert!((share - 1.0).abs() < 1e-9, "token shares sum to {share}");
        for d in ds {
            let (got, want) = (
                d["token_share"].as_f64().unwrap(),
                d["target_share"].as_f64().unwrap(),
            );
            assert!(
                (got - want).abs() < 0.05,
                "{}: share {got} vs target {want}",
                d["name"]
            );
        }
        let first = w["first_step"].as_u64().unwrap();
        if let Some(l) = last {
            assert_eq!(first, l + 1, "windows are consecutive");
        }
        last = Some(w["last_step"].as_u64().unwrap());
    }
    assert_eq!(last, Some(29));
    // The human-readable form reports the same windows.
    let text = ok(&["plan", "--config", &cfg, "--steps", "30"]);
    assert!(
        text.contains("duplicates 0") && text.contains("padding"),
        "{text}"
    );
}

#[test]
fn explain_json_is_stable_and_ranks_concatenate() {
    let cfg = config();
    let args = ["explain", "--config", &cfg, "--step", "5", "--json"];
    let a = ok(&args);
    let b = ok(&args);
    assert_eq!(a, b, "explain --json differs between runs");
    let all = json(&a);
    assert_eq!(all["step"].as_u64(), Some(5));
    assert_eq!(all["dp_size"].as_u64(), Some(1));
    let rows = all["rows"].as_array().unwrap().clone();
    let counted: u64 = all["counts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c[1].as_u64().unwrap())
        .sum();
    assert_eq!(rows.len() as u64, counted, "rows vs per-domain counts");
    for (i, r) in rows.iter().enumerate() {
        assert_eq!(r["row"].as_u64(), Some(i as u64));
        let segs = r["segments"].as_array().unwrap();
        assert!(!segs.is_empty());
        let tokens: u64 = segs
            .iter()
            .map(|s| s["end"].as_u64().unwrap() - s["start"].as_u64().unwrap())
            .sum();
        assert_eq!(r["tokens"].as_u64(), Some(tokens));
        for s in segs {
            assert!(s["end"].as_u64() <= s["doc_len"].as_u64());
            assert!(!s["shard"].as_str().unwrap().is_empty());
        }
    }
    let mut joined = Vec::new();
    for r in 0..4 {
        let part = json(&ok(&[
            "explain",
            "--config",
            &cfg,
            "--step",
            "5",
            "--dp-rank",
            &r.to_string(),
            "--dp-size",
            "4",
            "--json",
        ]));
        assert_eq!(part["dp_rank"].as_u64(), Some(r));
        assert_eq!(
            part["counts"], all["counts"],
            "every rank sees the global counts"
        );
        let got = part["rows"].as_array().unwrap();
        let g = rows.len() as u64;
        assert_eq!(got.len() as u64, (r + 1) * g / 4 - r * g / 4);
        joined.extend(got.iter().cloned());
    }
    assert_eq!(
        joined, rows,
        "ranks 0..4 of 4 do not concatenate to the whole batch"
    );
    // Another step gives another batch.
    let other = json(&ok(&["explain", "--config", &cfg, "--step", "6", "--json"]));
    assert_ne!(other["rows"], all["rows"]);
    // A rank outside the data-parallel size is refused.
    let out = run(&[
        "explain",
        "--config",
        &cfg,
        "--step",
        "5",
        "--dp-rank",
        "4",
        "--dp-size",
        "4",
    ]);
    assert!(!out.status.success());
}

#[test]
fn bad_plan_config_names_the_field() {
    let text = std::fs::read_to_string(corpus().join("millrace.toml")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    // An unknown domain in the weights.
    let bad = text.replacen("weights = { ", "weights = { nosuch = 0.5, ", 1);
    assert_ne!(
        bad, text,
        "the synth config has no weights table to edit:\n{text}"
    );
    // Shard paths are relative to the config: keep it next to the corpus.
    let path = corpus().join("bad-weights.toml");
    std::fs::write(&path, &bad).unwrap();
    let out = run(&[
        "plan",
        "--config",
        path.to_str().unwrap(),
        "--steps",
        "3",
        "--json",
    ]);
    std::fs::remove_file(&path).unwrap();
    assert!(
        !out.status.success(),
        "a config with an unknown domain was accepted"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("weights.nosuch"),
        "error does not name the field: {err}"
    );
    assert!(out.stdout.is_empty());
    // A bad seq_len, also through explain.
    let bad = text.replacen("seq_len = 4096", "seq_len = 0", 1);
    assert_ne!(bad, text);
    let path = corpus().join("bad-seq.toml");
    std::fs::write(&path, &bad).unwrap();
    let out = run(&["explain", "--config", path.to_str().unwrap(), "--step", "0"]);
    std::fs::remove_file(&path).unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("plan.seq_len"));
    // A missing config file is an error, not a panic.
    let missing = dir.path().join("nope.toml");
    let out = run(&[
        "plan",
        "--config",
        missing.to_str().unwrap(),
        "--steps",
        "1",
    ]);
    assert!(!out.status.success());
    assert!(!String::from_utf8_lossy(&out.stderr).contains("panicked"));
}

/// The synth config with the issue 14 geometry: `code` batch-grouped with max_share 0.25,
/// 64 rows a batch, code at 60% of the tokens. Written next to the corpus (shard paths are
/// relative to the config) under `name`.
fn grouped_config(name: &str) -> String {
    let text = std::fs::read_to_string(corpus().join("millrace.toml")).unwrap();
    let mut t = text.replacen(
        "shards = [\"code\"]",
        "shards = [\"code\"]\ngrouping = { mode = \"batch\", max_share = 0.25 }",
        1,
    );
    t = t.replacen("global_batch_rows = 256", "global_batch_rows = 64", 1);
    let at = t.find("weights = {").expect("the synth config has weights");
    let end = at + t[at..].find('}').unwrap() + 1;
    t.replace_range(
        at..end,
        "weights = { web = 0.2, code = 0.6, books = 0.1, wiki = 0.1 }",
    );
    assert_ne!(t, text);
    let path = corpus().join(name);
    std::fs::write(&path, t).unwrap();
    path.to_str().unwrap().to_string()
}

/// Issue 14, item 1, end to end: over 300 steps (about a dozen epochs of `code`),
/// `millrace explain --json` shows every code group in one batch or consecutive batches
/// and never above the 16-row cap, and `millrace plan` reports no split and no over-cap
/// group in any window. Before the fix this corpus showed 5 groups in non-consecutive
/// batches and 13 (group, batch) pairs over the cap, and `plan` had no such figures.
#[test]
fn batch_grouping_holds_across_epoch_ends_and_plan_reports_it() {
    let cfg = grouped_config("grouped-batch.toml");
    let text = ok(&[
        "explain", "--config", &cfg, "--step", "0", "--count", "300", "--json",
    ]);
    let mut batches = Vec::new();
    for line in text.lines() {
        let e = json(line);
        let domain_rows = e["counts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c[0] == "code")
            .and_then(|c| c[1].as_u64())
            .expect("code has a count") as u32;
        let rows = e["rows"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["domain"] == "code")
            .map(|r| {
                let groups = r["segments"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter_map(|s| {
                        let g = s["group"].as_u64()?;
                        Some((s["shard"].as_str()?.to_string(), g))
                    })
                    .collect();
                (r["epoch"].as_u64().unwrap() as u32, groups)
            })
            .collect::<Vec<_>>();
        assert_eq!(rows.len() as u32, domain_rows, "code rows vs its count");
        batches.push(grouping_check::Batch {
            step: e["step"].as_u64().unwrap(),
            domain_rows,
            rows,
        });
    }
    assert_eq!(batches.len(), 300);
    let last_epoch = batches
        .iter()
        .flat_map(|b| b.rows.iter().map(|r| r.0))
        .max()
        .unwrap();
    assert!(last_epoch >= 3, "code reached epoch {last_epoch} only");
    let r = grouping_check::check(&batches, 16);
    assert!(
        r.over_cap.is_empty(),
        "{} over the cap, first: {:?}",
        r.over_cap.len(),
        r.over_cap.first()
    );
    assert!(
        r.gaps.is_empty(),
        "{} not in consecutive batches, first: {:?}",
        r.gaps.len(),
        r.gaps.first()
    );
    assert!(
        r.spanning > 100,
        "only {} groups spanned batches",
        r.spanning
    );
    assert_eq!(r.max_rows, 16, "the largest groups take the whole cap");
    // The plan report checks the same promise per window.
    let v = json(&ok(&[
        "plan", "--config", &cfg, "--steps", "300", "--window", "50", "--json",
    ]));
    let windows = v["windows"].as_array().expect("windows");
    assert_eq!(windows.len(), 6);
    for w in windows {
        assert_eq!(w["split_groups"].as_u64(), Some(0), "window {w}");
        assert_eq!(w["capped_groups"].as_u64(), Some(0), "window {w}");
    }
    let human = ok(&["plan", "--config", &cfg, "--steps", "20"]);
    assert!(
        human.contains("split groups 0") && human.contains("over-cap groups 0"),
        "{human}"
    );
}

/// Issue 14, item 2: with `eod_token` set, `millrace plan` counts per domain the documents
/// that do not end with it and names the first (a warning), and says so for a domain where
/// all do; without `eod_token` there is nothing to check. Before the fix `eod_token` was
/// only echoed in WELCOME and `plan` reported nothing.
#[test]
fn plan_counts_documents_without_eod_token() {
    let dir = tempfile::tempdir().unwrap();
    let u16 = common::CODES[7];
    // Documents end with 2 except documents 3 and 7 of `dirty`, and its empty document 8.
    let doc = |i: i64, end: bool| -> common::Doc {
        let mut t: Vec<i64> = (0..20 + i).map(|j| 100 + j).collect();
        if end {
            t.push(2);
        }
        vec![t]
    };
    let clean: Vec<common::Doc> = (0..10).map(|i| doc(i, true)).collect();
    let mut dirty: Vec<common::Doc> = (0..10).map(|i| doc(i, i != 3 && i != 7)).collect();
    dirty[8] = vec![vec![]];
    let clean_p = common::write_docs(dir.path(), "clean", u16, &clean);
    let dirty_p = common::write_docs(dir.path(), "dirty", u16, &dirty);
    let toml = |eod: &str| {
        format!(
            "[corpus]\n[[corpus.domain]]\nname = \"clean\"\nshards = [{:?}]\n\
             [[corpus.domain]]\nname = \"dirty\"\nshards = [{:?}]\n\
             [plan]\nseed = 1\nseq_len = 31\nglobal_batch_rows = 4\npacking = \"best_fit\"\n{eod}\
             weights = {{ clean = 0.5, dirty = 0.5 }}\n",
            clean_p.to_str().unwrap(),
            dirty_p.to_str().unwrap()
        )
    };
    let cfg = dir.path().join("eod.toml");
    std::fs::write(&cfg, toml("eod_token = 2\n")).unwrap();
    let cfg_s = cfg.to_str().unwrap();
    let out = run(&["plan", "--config", cfg_s, "--steps", "2", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = json(&String::from_utf8(out.stdout).unwrap());
    let eod = v["eod"].as_array().expect("an eod section");
    assert_eq!(eod.len(), 2);
    assert_eq!(eod[0]["domain"], "clean");
    assert_eq!(eod[0]["documents"].as_u64(), Some(10));
    assert_eq!(eod[0]["missing"].as_u64(), Some(0));
    assert!(eod[0]["first"].is_null());
    assert_eq!(eod[1]["domain"], "dirty");
    assert_eq!(eod[1]["missing"].as_u64(), Some(3), "{}", eod[1]);
    assert_eq!(eod[1]["first"][0].as_str(), dirty_p.to_str());
    assert_eq!(eod[1]["first"][1].as_u64(), Some(3));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("warning: domain dirty: 3 of 10 documents do not end with eod_token 2")
            && err.contains("document 3"),
        "{err}"
    );
    let human = ok(&["plan", "--config", cfg_s, "--steps", "2"]);
    assert!(
        human.contains("domain clean: all 10 documents end with eod_token 2")
            && human.contains("warning: domain dirty: 3 of 10 documents"),
        "{human}"
    );
    // check-config --check-eod runs the same check and warns the same way (it still
    // passes: a document without EOD is a data-quality finding, not a broken config);
    // plain check-config (the unit's ExecStartPre) reads no tokens.
    let plain = run(&["check-config", "--config", cfg_s]);
    assert!(
        plain.status.success() && !String::from_utf8_lossy(&plain.stderr).contains("eod_token"),
        "{}",
        String::from_utf8_lossy(&plain.stderr)
    );
    let check = run(&["check-config", "--config", cfg_s, "--check-eod"]);
    let check_err = String::from_utf8_lossy(&check.stderr);
    assert!(
        check.status.success()
            && check_err
                .contains("warning: domain dirty: 3 of 10 documents do not end with eod_token 2")
            && !check_err.contains("domain clean"),
        "{check_err}"
    );
    // Without eod_token nothing is checked.
    std::fs::write(&cfg, toml("")).unwrap();
    let v = json(&ok(&["plan", "--config", cfg_s, "--steps", "2", "--json"]));
    assert!(v["eod"].is_null(), "{}", v["eod"]);
}

/// Per-stage upsampling (issue 17): a stage from plan step 3 (64 rows of 8192 tokens)
/// upsamples books x2 over 8192 tokens. `plan` names the switch and the epoch that first
/// used it (begun at or after step 3, the epoch in progress there keeping its own), in
/// JSON and in text, and each domain's current setting; `explain` inside the first
/// epoch shows the setting the next epoch will take.
#[test]
fn plan_reports_a_stages_upsampling_and_when_it_takes_effect() {
    let text = std::fs::read_to_string(corpus().join("millrace.toml")).unwrap();
    let t = text
        + "\n[[plan.stage]]\nstep = 3\nseq_len = 8192\nglobal_batch_rows = 64\n\
           upsample_long = { books = { min_tokens = 8192, factor = 2 } }\n";
    let path = corpus().join("stage-upsample.toml");
    std::fs::write(&path, t).unwrap();
    let cfg = path.to_str().unwrap();
    let v = json(&ok(&["plan", "--config", cfg, "--steps", "100", "--json"]));
    let switches = v["upsampling"].as_array().expect("upsampling switches");
    assert_eq!(switches.len(), 1, "{v}");
    let w = &switches[0];
    assert_eq!(w["domain"], "books");
    assert_eq!(
        (w["stage"].as_u64(), w["stage_step"].as_u64()),
        (Some(1), Some(3))
    );
    assert_eq!(w["upsample"]["min_tokens"], 8192);
    assert_eq!(w["upsample"]["factor"], 2);
    let epoch = w["epoch"]
        .as_u64()
        .expect("an epoch used it within 100 steps");
    let from = w["from_step"].as_u64().expect("begun in the steps planned");
    assert!(epoch >= 1 && from >= 3, "{w}");
    let books = |list: &Value| -> Value {
        let all = list.as_array().expect("positions");
        all.iter()
            .find(|p| p["name"] == "books")
            .expect("books")
            .clone()
    };
    let end = books(&v["end"]);
    assert_eq!(end["upsample"]["factor"], 2, "{end}");
    assert!(books(&v["start"])["upsample"].is_null());
    let text = ok(&["plan", "--config", cfg, "--steps", "100"]);
    let line = format!(
        "upsampling books: x2 over 8192 tokens for epochs beginning from step 3 (stage 1); \
         first used by epoch {epoch}, begun at step {from}"
    );
    assert!(text.contains(&line), "{text}");
    // Inside epoch 0, after the switch: the next epoch takes the stage's setting.
    let e = json(&ok(&["explain", "--config", cfg, "--step", "4", "--json"]));
    let pos = books(&e["domains"]);
    assert_eq!(pos["epoch"], 0);
    assert_eq!(pos["next_upsample"][0], 3, "{pos}");
    assert_eq!(pos["next_upsample"][1]["factor"], 2, "{pos}");
    let e = ok(&["explain", "--config", cfg, "--step", "4"]);
    assert!(
        e.contains("next epoch: upsampling x2 over 8192 tokens (stage from step 3)"),
        "{e}"
    );
}

/// `millrace --version` names the planner version, which a refused cursor blob's
/// message tells the operator to match.
#[test]
fn version_names_the_planner_version() {
    let out = ok(&["--version"]);
    let want = format!("(planner version {})", millrace::plan::PLAN_VERSION);
    assert!(out.trim_end().ends_with(&want), "{out}");
}

/// A step past `MAX_STEP` (2^32, the furthest a HELLO may seek) is refused at once,
/// naming the flag: the planner replays every step before it, so `explain --step
/// 18446744073709551615` ran for ever instead of failing.
#[test]
fn steps_beyond_the_reach_of_a_run_are_refused_at_once() {
    let config = config();
    let cases: [(&[&str], &str); 4] = [
        (&["explain", "--step", "18446744073709551615"], "--step"),
        (
            &["explain", "--step", "4294967296", "--count", "2"],
            "--count",
        ),
        (&["plan", "--from", "4294967297", "--steps", "1"], "--from"),
        (&["plan", "--steps", "18446744073709551615"], "--steps"),
    ];
    for (args, flag) in cases {
        let mut child = bin()
            .args(args)
            .args(["--config", &config])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            if std::time::Instant::now() > deadline {
                child.kill().unwrap();
                child.wait().unwrap();
                panic!("millrace {args:?} still ran after 60 s");
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        let mut err = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
        assert!(!status.success(), "{args:?} passed: {err}");
        assert!(
            err.contains(flag) && err.contains("beyond 4294967296"),
            "{args:?}: {err}"
        );
    }
}

/// Counts of zero are usage errors, refused by name (exit 2), not runs that print
/// nothing: `plan --steps 0`, `explain --count 0`, `consume --steps 0` and `consume
/// --dp-size 0` (which said "--dp-size 0 does not divide global_batch_rows").
#[test]
fn zero_steps_counts_and_sizes_are_usage_errors() {
    let c = config();
    for line in [
        "plan --steps 0",
        "explain --step 3 --count 0",
        "consume --dp-rank 0 --dp-size 1 --steps 0",
        "consume --dp-rank 0 --dp-size 0",
    ] {
        let mut args: Vec<&str> = line.split_whitespace().collect();
        args.splice(1..1, ["--config", c.as_str()]);
        let o = run(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains("invalid value '0'"), "{args:?}: {err}");
    }
}
