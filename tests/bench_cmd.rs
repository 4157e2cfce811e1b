//! `millrace bench` end to end on a tiny corpus (10^6 tokens): every section of the
//! report is there and consistent. Timings are not checked, only what is deterministic.

use std::process::Command;

use serde_json::Value;

#[test]
fn bench_reports_every_section() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("corpus");
    let json = tmp.path().join("bench.json");
    let out = Command::new(env!("CARGO_BIN_EXE_millrace"))
        .args([
            "bench",
            "--tokens",
            "1e6",
            "--steps",
            "12",
            "--threads",
            "1",
        ])
        .args([
            "--repeat",
            "1",
            "--latency-repeat",
            "1",
            "--ref-bytes",
            "1e6",
        ])
        .args(["--baseline-steps", "4", "--quiet"])
        .args(["--fairness-seconds", "1", "--fairness-ranks", "4"])
        .args(["--ranks", "4", "--versus", "2"])
        // scripts/test's venv, with numpy: the baseline and the versus run then run too.
        .arg("--python")
        .arg(std::env::var_os("MILLRACE_TEST_PYTHON").unwrap_or_else(|| "python3".into()))
        .arg("--dir")
        .arg(&dir)
        .arg("--json")
        .arg(&json)
        .output()
        .expect("the millrace binary runs");
    assert!(
        out.status.success(),
        "millrace bench failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(table.contains("single-thread memcpy"), "{table}");
    assert!(table.contains("| cold | 1 | 12 |"), "{table}");
    assert!(table.contains("| warm | 1 | 12 |"), "{table}");
    let r: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(r["corpus_tokens"], 1_000_000);
    assert_eq!(r["same_tokens"], true);
    let per_run = 12 * 2 * 8 * 4096u64;
    assert_eq!(r["cold"]["tokens"], per_run);
    assert_eq!(r["runs"][0]["tokens"], per_run);
    assert_eq!(r["cold"]["digests"], r["runs"][0]["digests"]);
    assert!(r["references"]["memcpy_gb_per_s"].as_f64().unwrap() > 0.0);
    let steps: Vec<u64> = r["latency"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["step"].as_u64().unwrap())
        .collect();
    // Step 0, the cursor the 12-step cold run saved, and the default seek step.
    assert_eq!(steps, [0, 12, 12]);
    // The fairness run: every ring published steps (their ratio is timing, unchecked).
    let fair = &r["fairness"];
    assert_eq!(fair["ranks"], 4, "{fair}");
    let per_rank = fair["steps"].as_array().unwrap();
    assert_eq!(per_rank.len(), 4, "{fair}");
    assert!(fair["max_steps"].as_u64().unwrap() > 0, "{fair}");
    assert!(table.contains("fairness: 4 free-running ranks"), "{table}");
    // The ranks run: 4 consumers of 8 rows against 2, the same tokens each (6 steps
    // against 12); the 2 consumers' are the streaming runs' tokens.
    let ranks = &r["ranks"];
    assert_eq!(
        (&ranks["base"]["consumers"], &ranks["many"]["consumers"]),
        (&Value::from(2), &Value::from(4)),
        "{ranks}"
    );
    assert_eq!(ranks["base"]["steps"], 12);
    assert_eq!(ranks["many"]["steps"], 6);
    assert_eq!(ranks["base"]["tokens"], per_run);
    assert_eq!(ranks["many"]["tokens"], per_run);
    assert_eq!(ranks["base"]["digests"], r["runs"][0]["digests"]);
    assert_eq!(ranks["many"]["digests"].as_array().unwrap().len(), 4);
    let ratio = ranks["ratio"].as_f64().unwrap();
    let cpu = |side: &str| ranks[side]["daemon_cpu_s_per_1e9_tokens"].as_f64().unwrap();
    // The daemon's CPU is counted in clock ticks: a run this short may take none.
    if cpu("base") > 0.0 {
        let want = cpu("many") / cpu("base");
        assert!((ratio - want).abs() <= 1e-9 * want, "{ranks}");
    }
    assert!(
        table.contains("ranks: 4 consumers against 2, 8 rows each, 1 materializer threads"),
        "{table}"
    );
    assert!(table.contains(&format!(
        "daemon CPU per token, 4 consumers / 2: {ratio:.2}"
    )));
    // The baseline runs where the interpreter has numpy, and says why not elsewhere;
    // scripts/test's venv has it, so there (CI) the baseline and the versus run must run.
    if std::env::var_os("MILLRACE_TEST_PYTHON").is_some() {
        assert!(r["baseline_skipped"].is_null(), "{}", r["baseline_skipped"]);
    }
    match r["baseline_skipped"].as_str() {
        Some(why) => {
            assert!(why.contains("numpy") || why.contains("python"), "{why}");
            assert!(r["versus"].is_null(), "a versus run without the baseline");
        }
        None => {
            let modes: Vec<&str> = r["baseline"]
                .as_array()
                .unwrap()
                .iter()
                .map(|b| b["mode"].as_str().unwrap())
                .collect();
            assert_eq!(modes, ["best", "best", "rows", "nanogpt"]);
            assert_eq!(r["baseline"][1]["tokens"], 4 * 2 * 8 * 4096u64);
            assert_eq!(r["baseline"][2]["tokens"], 4 * 2 * 8 * 4096u64);
            versus_is_consistent(&r, &table, per_run);
        }
    }
}

/// The versus run (`--versus 2`): two pairs, each a millrace run of the streaming runs'
/// tokens and a best-form run, with their ratio; the median of two is their mean.
fn versus_is_consistent(r: &Value, table: &str, per_run: u64) {
    let v = &r["versus"];
    let pairs = v["pairs"].as_array().unwrap();
    assert_eq!(pairs.len(), 2, "{v}");
    let f = |x: &Value| x.as_f64().unwrap();
    let mut ratios = Vec::new();
    for p in pairs {
        assert_eq!(p["millrace"]["digests"], r["runs"][0]["digests"], "{p}");
        assert_eq!(p["millrace"]["tokens"], per_run, "{p}");
        assert_eq!(p["baseline"]["mode"], "best", "{p}");
        assert_eq!(p["baseline"]["tokens"], 4 * 2 * 8 * 4096u64, "{p}");
        let want = f(&p["millrace"]["tokens_per_s"]) / f(&p["baseline"]["tokens_per_s"]);
        assert!((f(&p["ratio"]) - want).abs() <= 1e-9 * want, "{p}");
        // The rows form: the same windows, delivered as millrace's slots deliver them.
        assert_eq!(p["rows"]["mode"], "rows", "{p}");
        assert_eq!(p["rows"]["tokens"], 4 * 2 * 8 * 4096u64, "{p}");
        let want = f(&p["millrace"]["tokens_per_s"]) / f(&p["rows"]["tokens_per_s"]);
        assert!((f(&p["rows_ratio"]) - want).abs() <= 1e-9 * want, "{p}");
        ratios.push(f(&p["ratio"]));
    }
    let (lo, hi) = (ratios[0].min(ratios[1]), ratios[0].max(ratios[1]));
    let median = (lo + hi) / 2.0;
    assert!(
        (f(&v["median_ratio"]) - median).abs() <= 1e-9 * median,
        "{v}"
    );
    assert_eq!((f(&v["min_ratio"]), f(&v["max_ratio"])), (lo, hi), "{v}");
    let at_2x = ratios.iter().filter(|&&x| x >= 2.0).count();
    assert_eq!(v["pairs_at_2x"], at_2x, "{v}");
    assert_eq!(v["materialize_threads"], 1, "{v}");
    assert!(
        table.contains("versus: 2 alternated pairs, millrace (1 materializer threads)"),
        "{table}"
    );
    assert!(
        table.contains(&format!(
            "millrace / best form: median {median:.2} ({lo:.2}-{hi:.2}); {at_2x} of 2 pairs"
        )),
        "{table}"
    );
    assert!(
        table.contains("millrace / rows form (the same bytes delivered): median"),
        "{table}"
    );
}

/// Counts of 0 that a later stage of the bench would trip on are refused at once, naming
/// the flag, before a corpus is written: `--steps 0` used to write the corpus, measure
/// the references and fail in the cold run as "consumer 0 failed: no step was read".
#[test]
fn bench_refuses_zero_counts_before_writing_anything() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("corpus");
    for flag in [
        "--steps",
        "--baseline-steps",
        "--gpu-steps",
        "--fairness-ranks",
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_millrace"))
            .args(["bench", "--tokens", "1e6", "--quiet", flag, "0", "--dir"])
            .arg(&dir)
            .output()
            .expect("the millrace binary runs");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{flag}: {err}");
        assert_eq!(err, format!("error: {flag} 0: must be at least 1\n"));
        assert!(!dir.exists(), "{flag}: a corpus was written");
    }
    // One step is no measurement either: a 1-step baseline printed a ratio of 10^20.
    for flag in ["--steps", "--baseline-steps"] {
        let out = Command::new(env!("CARGO_BIN_EXE_millrace"))
            .args(["bench", "--tokens", "1e6", "--quiet", flag, "1", "--dir"])
            .arg(&dir)
            .output()
            .expect("the millrace binary runs");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{flag}: {err}");
        assert!(
            err.starts_with(&format!("error: {flag} 1: must be at least 2")),
            "{err}"
        );
        assert!(!dir.exists(), "{flag}: a corpus was written");
    }
}
