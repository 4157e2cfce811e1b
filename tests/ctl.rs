//! The control protocol from the client side (issue 5): `millrace ctl`, `millrace
//! status` and `millrace top` against a stand-in daemon (what the commands send and how
//! they report replies), and against the real `millrace serve` on a synthetic corpus
//! (status shape, a change applied at a future step and visible in the journal and in the
//! delivered rows, bad changes refused with the old weights in force, late changes
//! refused or moved with `--late next`, reload).

mod common;

use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{bin, Control, Serve};
use millrace::client::{Client, Hello};
use millrace::config::{Config, LoadedPlan};
use millrace::control::{self, CONTROL, CONTROL_REPLY};
use millrace::wire::frame::{encode as frame, read_from};
use serde_json::{json, Value};

const SEQ_LEN: u32 = 256;
const ROWS: u32 = 8;
const TIMEOUT: Duration = Duration::from_secs(20);

fn run(args: &[&str]) -> Output {
    let out = bin().args(args).output().expect("millrace runs");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !err.contains("panicked"),
        "millrace {args:?} panicked:\n{err}"
    );
    out
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Runs and requires success; returns stdout.
fn ok(args: &[&str]) -> String {
    let o = run(args);
    assert!(
        o.status.success(),
        "millrace {args:?} exited {}:\n{}{}",
        o.status,
        stdout(&o),
        stderr(&o)
    );
    stdout(&o)
}

/// Runs and requires failure; returns stderr.
fn fails(args: &[&str]) -> String {
    let o = run(args);
    assert!(
        !o.status.success(),
        "millrace {args:?} succeeded:\n{}",
        stdout(&o)
    );
    stderr(&o)
}

/// `millrace ctl --socket <socket> set-weights <rest>` as arguments.
fn set_weights_args<'a>(socket: &'a str, rest: &[&'a str]) -> Vec<&'a str> {
    [&["ctl", "--socket", socket, "set-weights"], rest].concat()
}

// ------------------------------------------------------------ a stand-in daemon

/// Answers CONTROL frames with `answer(request)` and records every request it saw.
struct Fake {
    _dir: tempfile::TempDir,
    socket: PathBuf,
    seen: Arc<Mutex<Vec<Value>>>,
}

fn fake(answer: impl Fn(&Value) -> Value + Send + Sync + 'static) -> Fake {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("fake.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let answer = Arc::new(answer);
    let log = seen.clone();
    std::thread::spawn(move || {
        for s in listener.incoming() {
            let Ok(mut s) = s else { return };
            let (answer, log) = (answer.clone(), log.clone());
            std::thread::spawn(move || loop {
                let Ok((k, payload)) = read_from(&mut s) else {
                    return;
                };
                assert_eq!(k, CONTROL, "a control client opens with CONTROL");
                let req: Value = serde_json::from_slice(&payload).unwrap();
                log.lock().unwrap().push(req.clone());
                let reply = answer(&req);
                if s.write_all(&frame(CONTROL_REPLY, reply.to_string().as_bytes()))
                    .is_err()
                {
                    return;
                }
            });
        }
    });
    Fake {
        _dir: dir,
        socket,
        seen,
    }
}

fn sample_status(tokens: u64, step: u64) -> Value {
    json!({
        "version": "0.1.0", "pid": 4242, "uptime_s": 12.5,
        "config": "/etc/millrace/millrace.toml", "socket": "/run/millrace/millrace.sock",
        "fingerprint": "00112233445566778899aabbccddeeff",
        "clients": 2, "reloads": 1, "failed_reloads": 3, "first_changeable_step": step + 4,
        "journal": [],
        "domains": [
            {"name": "web", "target_share": 0.6, "realized_share": 0.5, "epochs": 0.1, "tokens": tokens / 2},
            {"name": "code", "target_share": 0.4, "realized_share": 0.5, "epochs": 0.2, "tokens": tokens / 2}
        ],
        "padding_fraction": 0.01, "truncation_fraction": 0.02,
        "jobs": [{"job": "run-7", "dp_size": 1, "rings": [
            {"dp_rank": 0, "published_step": step + 2, "released_step": step, "slots": 4,
             "occupancy": 2, "peers": [{"replica": "0", "pid": 99, "released_step": step}],
             "tokens_delivered": tokens, "batches_delivered": step,
             "consumer_wait_s": 0.0, "producer_wait_s": step as f64 / 10.0}
        ]}]
    })
}

fn sock(f: &Fake) -> &str {
    f.socket.to_str().unwrap()
}

#[test]
fn set_weights_sends_the_request_and_reports_the_reply_in_words() {
    let f = fake(|req| match req["at_step"].as_u64() {
        Some(5) => json!({"ok": true, "op": "set_weights", "requested_step": 5,
                          "applied_step": 17, "moved": true, "journal": [],
                          "message": "moved to the first step no client has"}),
        Some(6) => json!({"ok": false, "op": "set_weights", "code": "late",
                          "message": "step 6 was delivered", "first_changeable_step": 17}),
        _ => json!({"ok": true, "op": "set_weights", "requested_step": req["at_step"],
                    "applied_step": 100, "moved": false, "journal": [], "message": ""}),
    });
    let text = ok(&set_weights_args(
        sock(&f),
        &["web=0.5", "code=0.25", "--at-step", "100"],
    ));
    assert!(text.contains("applied from step 100"), "{text}");
    let text = ok(&[
        "ctl",
        "set-weights",
        "web=1",
        "--at-step",
        "5",
        "--late",
        "next",
        "--socket",
        sock(&f),
    ]);
    assert!(
        text.contains("step 5 was already handed out; applied from step 17"),
        "{text}"
    );
    let late = set_weights_args(sock(&f), &["web=1", "--at-step", "6"]);
    let err = fails(&late);
    assert!(err.contains("step 6 was delivered"), "{err}");
    assert!(err.contains("17") && err.contains("late"), "{err}");
    // --json prints the reply verbatim and still fails on ok:false.
    let o = run(&[&late[..], &["--json"]].concat());
    assert!(!o.status.success());
    let v: Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(v["first_changeable_step"], 17);
    let seen = f.seen.lock().unwrap().clone();
    assert_eq!(
        seen[0],
        json!({"protocol": 1, "op": "set_weights", "weights": {"web": 0.5, "code": 0.25},
               "at_step": 100, "late": "refuse"})
    );
    assert_eq!(seen[1]["late"], "next");
    assert_eq!(seen.len(), 4);
    // Without --at-step no step is sent: the daemon picks the first changeable one.
    ok(&set_weights_args(sock(&f), &["web=1"]));
    let last = f.seen.lock().unwrap().last().cloned().unwrap();
    assert!(last.get("at_step").is_none(), "{last}");
}

#[test]
fn bad_weight_arguments_are_refused_before_connecting() {
    // The socket does not exist: these must fail on the argument, not the connection.
    for (arg, why) in [
        ("web", "no '='"),
        ("web=abc", "not a number"),
        ("web=NaN", "NaN"),
        ("web=-0.5", "negative"),
    ] {
        let err = fails(&["ctl", "--socket", "/nonexistent/s", "set-weights", arg]);
        assert!(err.contains(arg) && err.contains(why), "{arg}: {err}");
        assert!(!err.contains("cannot connect"), "{arg}: {err}");
    }
    let err = fails(&[
        "ctl",
        "--socket",
        "/nonexistent/s",
        "set-weights",
        "web=1",
        "web=2",
    ]);
    assert!(
        err.contains("`web`") && err.contains("more than once"),
        "{err}"
    );
    // A missing daemon is reported with its socket.
    let err = fails(&["status", "--socket", "/nonexistent/millrace.sock"]);
    assert!(err.contains("/nonexistent/millrace.sock"), "{err}");
}

/// `consume --reconnect-timeout inf` (or `1e30`) panicked in `Duration::from_secs_f64`
/// with a backtrace the moment the daemon went away, and `nan` silently meant 0: both
/// timeouts are now read as 0 up to a year, and anything else is refused naming the flag
/// before a connection is tried.
#[test]
fn consume_timeouts_out_of_range_are_refused_naming_the_flag() {
    let consume = |arg: &str| {
        let rank = ["--dp-rank", "0", "--dp-size", "1"];
        fails(
            &[
                &["consume", "--socket", "/nonexistent/s"][..],
                &rank,
                &[arg],
            ]
            .concat(),
        )
    };
    for flag in ["--timeout", "--reconnect-timeout"] {
        for v in ["inf", "1e30", "nan", "-1", "soon"] {
            let err = consume(&format!("{flag}={v}"));
            assert!(err.contains(flag) && err.contains(v), "{flag} {v}: {err}");
            assert!(!err.contains("cannot connect"), "{flag} {v}: {err}");
        }
        // 0 stays what it meant (no limit, no reconnect): past the flags, to the socket.
        let err = consume(&format!("{flag}=0"));
        assert!(err.contains("cannot connect"), "{flag} 0: {err}");
    }
}

/// A peer that answers every request with an accepted reply for another op (here a
/// STATUS) is no millrace daemon: `ctl set-weights` printed "status: nothing changed" and
/// exited 0, as if the change had been taken. Every ctl request now checks the op.
#[test]
fn a_reply_for_another_op_is_not_taken_for_an_answer() {
    let f = fake(|_| json!({"ok": true, "op": "status", "status": {}}));
    for args in [
        vec!["set-weights", "web=1"],
        vec!["set-stage", "--seq-len", "8", "--global-batch-rows", "8"],
        vec!["reload"],
        vec!["journal"],
    ] {
        let err = fails(&[&["ctl", "--socket", sock(&f)][..], &args].concat());
        assert!(
            err.contains("is for \"status\"") && err.contains("not an answer from a millrace"),
            "{args:?}: {err}"
        );
    }
    // A refusal carries its own op and is reported as the refusal it is.
    let f = fake(|_| json!({"ok": false, "code": "invalid", "message": "no"}));
    let err = fails(&["ctl", "--socket", sock(&f), "reload"]);
    assert!(err.contains("invalid") && err.contains("no"), "{err}");
}

/// `--socket` naming a file or a directory failed with ECONNREFUSED and the words for it,
/// "the socket file is there but no daemon listens on it (a daemon that was killed leaves
/// it behind)": `status --socket /etc/millrace/millrace.toml` told the user to delete
/// their config. It now says what is there.
#[test]
fn a_socket_path_that_is_not_a_socket_is_named_as_what_it_is() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("millrace.toml");
    std::fs::write(&config, "[corpus]\n").unwrap();
    let (c, d) = (config.to_str().unwrap(), dir.path().to_str().unwrap());
    for args in [
        vec!["status", "--socket", c],
        vec!["top", "--socket", c],
        vec!["ctl", "--socket", c, "journal"],
        vec!["ctl", "--socket", c, "reload"],
        vec!["ctl", "--socket", d, "set-weights", "web=1"],
    ] {
        let err = fails(&args);
        let what = if args.contains(&d) {
            "a directory"
        } else {
            "a regular file"
        };
        assert!(
            err.contains(args[2]) && err.contains(what) && err.contains("not a unix socket"),
            "{args:?}: {err}"
        );
        assert!(!err.contains("killed"), "{args:?}: {err}");
    }
    assert!(fails(&["status", "--socket", c]).contains("--config"));
    assert_eq!(std::fs::read_to_string(&config).unwrap(), "[corpus]\n");
}

#[test]
fn status_journal_and_top_against_a_stand_in() {
    let calls = Arc::new(Mutex::new(0u64));
    let c = calls.clone();
    let f = fake(move |req| match req["op"].as_str() {
        Some("status") => {
            let mut n = c.lock().unwrap();
            *n += 1;
            // Each status is 10 steps and 1e6 tokens further on.
            json!({"ok": true, "op": "status", "status": sample_status(*n * 1_000_000, *n * 10)})
        }
        Some("journal") => json!({"ok": true, "op": "journal", "journal": [
            {"at_step": 30, "plan_step": 30, "source": "ctl",
             "points": [{"step": 30, "weights": {"web": 1.0}}]}]}),
        Some("reload") => json!({"ok": true, "op": "reload", "requested_step": null,
                                  "applied_step": null, "moved": false, "journal": [],
                                  "message": "the config did not change"}),
        _ => json!({"ok": false, "op": req["op"], "code": "protocol", "message": "?"}),
    });
    // status --json is the STATUS object verbatim.
    let v: Value =
        serde_json::from_str(ok(&["status", "--socket", sock(&f), "--json"]).trim()).unwrap();
    assert_eq!(v, sample_status(1_000_000, 10));
    let text = ok(&["status", "--socket", sock(&f)]);
    assert!(
        text.contains("pid 4242") && text.contains("run-7"),
        "{text}"
    );
    assert!(text.contains("reloads 1 (failed 3)"), "{text}");
    let text = ok(&["ctl", "--socket", sock(&f), "journal"]);
    assert!(
        text.contains("step 30: web=1") && text.contains("ctl"),
        "{text}"
    );
    let j: Value =
        serde_json::from_str(ok(&["ctl", "--socket", sock(&f), "journal", "--json"]).trim())
            .unwrap();
    assert_eq!(j["ok"], true, "{j}");
    assert_eq!(j["op"], "journal", "{j}");
    assert_eq!(j["journal"][0]["at_step"], 30, "{j}");
    let text = ok(&["ctl", "--socket", sock(&f), "reload"]);
    assert!(text.contains("nothing changed"), "{text}");
    // top --once: two statuses an interval apart, one frame, no escapes.
    let t0 = Instant::now();
    let text = ok(&[
        "top",
        "--socket",
        sock(&f),
        "--once",
        "--interval-ms",
        "200",
    ]);
    assert!(t0.elapsed() >= Duration::from_millis(200));
    assert!(!text.contains('\x1b'), "{text:?}");
    assert!(text.contains("pid 4242"), "{text}");
    let ring = text.lines().find(|l| l.starts_with("run-7")).unwrap();
    // 10 steps between the two statuses, ~0.2 s apart: tens of steps/s, not a dash.
    assert!(!ring.contains(" - "), "{ring}");
    assert!(ring.contains("[###...] 2/4"), "{ring}");
    assert!(text.lines().any(|l| l.starts_with("web")), "{text}");
    let seen = f.seen.lock().unwrap().clone();
    assert!(seen.iter().all(|r| r["protocol"] == 1));
}

// ------------------------------------------------------------ the real daemon

/// A corpus with its config, in a temp dir that lives as long as this value.
struct Fixture {
    corpus: common::Corpus,
    config: PathBuf,
    socket: PathBuf,
}

/// A 1e6-token, 4-domain corpus and a config with a small geometry, `[serve]` set and the
/// config watcher off (so that only the requests under test change anything).
fn fixture() -> Fixture {
    fixture_with("")
}

/// As [`fixture`], with `serve` (TOML lines) added to `[serve]`.
fn fixture_with(serve: &str) -> Fixture {
    let corpus = common::corpus(1_000_000, 4, 5, 300_000);
    let socket = corpus.dir.join("s.sock");
    let base = common::serve_toml(&socket, 4, 2);
    Fixture {
        config: common::write_config(&corpus.dir, "test.toml", SEQ_LEN, ROWS, &[&base, serve]),
        socket,
        corpus,
    }
}

impl Control for Fixture {
    fn control_socket(&self) -> &Path {
        &self.socket
    }
}

impl Fixture {
    fn sock(&self) -> &str {
        self.socket.to_str().unwrap()
    }

    /// Starts `millrace serve` on this config (log `serve.log` in the corpus dir).
    fn serve(&self) -> Serve {
        Serve::start(
            &self.config,
            &self.socket,
            &self.corpus.dir.join("serve.log"),
        )
    }

    /// [`Fixture::serve`] for a plan of hundreds to thousands of domains, whose start in a debug build
    /// on a loaded 2-core machine took more than `Serve::start`'s 30 s.
    fn serve_slowly(&self) -> Serve {
        let log = self.corpus.dir.join("serve.log");
        let mut s = Serve::spawn(&self.config, &log, |_| {});
        s.wait_listening(&self.socket, Duration::from_secs(180));
        s
    }

    fn load(&self) -> LoadedPlan {
        Config::load(&self.config).unwrap().load_plan().unwrap()
    }

    /// The plan's domain names.
    fn names(&self) -> Vec<String> {
        let plan = self.load().plan;
        plan.domain_names().iter().map(|n| n.to_string()).collect()
    }

    fn set_weights(&self, weights: Value, at_step: Option<u64>, late: &str) -> Value {
        let mut req = json!({"protocol": 1, "op": "set_weights", "weights": weights, "late": late});
        if let Some(s) = at_step {
            req["at_step"] = json!(s);
        }
        self.req(req)
    }

    /// `changes` accepted changes of the first domain's weight, at steps 100, 101, ...
    fn change_first_weight(&self, changes: u64) {
        let first = self.names()[0].clone();
        for i in 0..changes {
            let r = self.set_weights(
                json!({ &first: 1.0 + (i % 7) as f64 }),
                Some(100 + i),
                "refuse",
            );
            assert_eq!(r["ok"], true, "change {i}: {}", r["message"]);
        }
    }

    fn connect(&self, job: &str) -> Client {
        let mut h = Hello::new(0, 1, ROWS, 1);
        h.job = job.into();
        let mut c = Client::connect(&self.socket, &h).unwrap_or_else(|e| panic!("connect: {e}"));
        c.set_timeout(Some(TIMEOUT));
        c
    }
}

/// The plan's domain index of every row of steps `0..steps` (no change applied).
fn planned_domains(loaded: &LoadedPlan, steps: u64) -> Vec<Vec<u16>> {
    let mut p = loaded.plan.start();
    (0..steps)
        .map(|_| {
            let b = p.next_batch();
            b.rows.iter().map(|r| r.domain).collect()
        })
        .collect()
}

/// Reads `n` steps; returns (step, domain index of each row) and the last cursor.
fn read_steps(c: &mut Client, n: u64) -> (Vec<(u64, Vec<u16>)>, Vec<u8>) {
    let mut out = Vec::new();
    let mut cursor = Vec::new();
    for _ in 0..n {
        let v = c.next_batch().unwrap_or_else(|e| panic!("next_batch: {e}"));
        out.push((v.step, v.domain.iter().map(|&d| d as u16).collect()));
        cursor = v.cursor.to_vec();
    }
    (out, cursor)
}

fn is_u64(v: &Value) -> bool {
    v.as_u64().is_some()
}

fn is_num(v: &Value) -> bool {
    v.as_f64().is_some_and(f64::is_finite)
}

fn check_journal_entry(e: &Value) {
    assert!(is_u64(&e["at_step"]), "{e}");
    assert!(is_u64(&e["plan_step"]), "{e}");
    let source = e["source"].as_str().unwrap_or("");
    assert!(
        ["file", "sighup", "ctl", "client", "cursor"].contains(&source),
        "{e}"
    );
    for p in e["points"].as_array().expect("points") {
        assert!(is_u64(&p["step"]), "{e}");
        assert!(
            p["weights"]
                .as_object()
                .expect("weights")
                .values()
                .all(is_num),
            "{e}"
        );
    }
}

#[test]
fn status_json_has_the_documented_shape() {
    let f = fixture();
    let _serve = f.serve();
    let loaded = f.load();
    let names = loaded.plan.domain_names();
    // No job yet: domains are there with zero realized shares.
    let st = f.status();
    assert_eq!(st["jobs"].as_array().map(Vec::len), Some(0), "{st}");
    for d in st["domains"].as_array().unwrap() {
        assert_eq!(d["realized_share"].as_f64(), Some(0.0), "{d}");
        assert_eq!(d["tokens"].as_u64(), Some(0), "{d}");
    }
    let mut c = f.connect("shape");
    let _ = read_steps(&mut c, 6);
    let via_cli: Value =
        serde_json::from_str(ok(&["status", "--socket", f.sock(), "--json"]).trim()).unwrap();
    let via_config: Value = serde_json::from_str(
        ok(&["status", "--config", f.config.to_str().unwrap(), "--json"]).trim(),
    )
    .unwrap();
    // A typo elsewhere in the file (the mistake a refused reload names) does not keep
    // `status --config` from the daemon: it warns and uses the file's socket.
    let typo = f.config.with_file_name("typo.toml");
    let text = std::fs::read_to_string(&f.config)
        .unwrap()
        .replace("[serve]\n", "[serve]\nring_slot = 8\n");
    assert!(text.contains("ring_slot = 8"), "{text}");
    std::fs::write(&typo, text).unwrap();
    let o = run(&["status", "--config", typo.to_str().unwrap(), "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("warning") && stderr(&o).contains("ring_slot"),
        "{}",
        stderr(&o)
    );
    let via_typo: Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(via_typo["pid"], via_cli["pid"]);
    for st in [&via_cli, &via_config] {
        assert_eq!(st["version"], env!("CARGO_PKG_VERSION"));
        assert!(is_u64(&st["pid"]) && is_num(&st["uptime_s"]), "{st}");
        assert!(st["config"].is_string() && st["socket"].is_string(), "{st}");
        assert_eq!(
            st["fingerprint"],
            format!("{:032x}", loaded.plan.fingerprint())
        );
        assert_eq!(st["clients"], 1, "{st}");
        assert_eq!(
            (st["reloads"].as_u64(), st["failed_reloads"].as_u64()),
            (Some(0), Some(0))
        );
        // Six steps were handed out, so none of them can change.
        assert!(st["first_changeable_step"].as_u64().unwrap() >= 6, "{st}");
        assert_eq!(st["journal"], json!([]));
        let domains = st["domains"].as_array().unwrap();
        let got: Vec<&str> = domains
            .iter()
            .map(|d| d["name"].as_str().unwrap())
            .collect();
        assert_eq!(got, names);
        let target: f64 = domains
            .iter()
            .map(|d| d["target_share"].as_f64().unwrap())
            .sum();
        let realized: f64 = domains
            .iter()
            .map(|d| d["realized_share"].as_f64().unwrap())
            .sum();
        assert!((target - 1.0).abs() < 1e-6, "{target}");
        assert!((realized - 1.0).abs() < 1e-6, "{realized}");
        for d in domains {
            assert!(is_num(&d["epochs"]) && is_u64(&d["tokens"]), "{d}");
        }
        assert!(is_num(&st["padding_fraction"]) && is_num(&st["truncation_fraction"]));
        let jobs = st["jobs"].as_array().unwrap();
        assert_eq!(jobs.len(), 1, "{st}");
        assert_eq!(
            (jobs[0]["job"].as_str(), jobs[0]["dp_size"].as_u64()),
            (Some("shape"), Some(1))
        );
        let ring = &jobs[0]["rings"][0];
        assert_eq!(ring["dp_rank"], 0);
        assert_eq!(ring["slots"], 4);
        assert!(ring["occupancy"].as_u64().unwrap() <= 4, "{ring}");
        assert!(ring["published_step"].as_u64().unwrap() >= 6, "{ring}");
        assert!(ring["released_step"].as_u64().unwrap() <= 6, "{ring}");
        // Delivered = released by the rank (the client batches its RELEASEs).
        let released = ring["released_step"].as_u64().unwrap();
        assert!(released >= 1, "{ring}");
        assert_eq!(ring["batches_delivered"].as_u64(), Some(released), "{ring}");
        assert_eq!(
            ring["tokens_delivered"].as_u64(),
            Some(released * u64::from(ROWS) * u64::from(SEQ_LEN)),
            "{ring}"
        );
        assert!(is_num(&ring["consumer_wait_s"]) && is_num(&ring["producer_wait_s"]));
        let peer = &ring["peers"][0];
        assert_eq!(peer["replica"], "0");
        assert_eq!(peer["pid"].as_u64(), Some(u64::from(std::process::id())));
    }
    // The human views name the job.
    let text = ok(&["status", "--socket", f.sock()]);
    assert!(text.contains("shape"), "{text}");
    let text = ok(&[
        "top",
        "--socket",
        f.sock(),
        "--once",
        "--interval-ms",
        "100",
    ]);
    assert!(text.lines().any(|l| l.starts_with("shape")), "{text}");
}

#[test]
fn a_change_at_a_future_step_is_journaled_and_delivered() {
    let f = fixture();
    let _serve = f.serve();
    let loaded = f.load();
    let names = loaded.plan.domain_names();
    let want = planned_domains(&loaded, 20);
    let mut c = f.connect("future");
    let (got, _) = read_steps(&mut c, 2);
    assert_eq!(got[0].1, want[0]);
    // Every row from step 12 on comes from the first domain.
    let zero: Vec<String> = names[1..].iter().map(|n| format!("{n}=0")).collect();
    let first = format!("{}=1", names[0]);
    let mut rest = vec![first.as_str()];
    rest.extend(zero.iter().map(String::as_str));
    rest.extend(["--at-step", "12"]);
    let text = ok(&set_weights_args(f.sock(), &rest));
    assert!(text.contains("applied from step 12"), "{text}");
    let journal = f.journal();
    assert_eq!(journal.len(), 1, "{journal:?}");
    let e = &journal[0];
    check_journal_entry(e);
    assert_eq!(e["at_step"], 12);
    assert_eq!(e["source"], "ctl");
    let w = &e["points"][0]["weights"];
    assert_eq!(w[names[0]].as_f64(), Some(1.0), "{e}");
    for n in &names[1..] {
        assert_eq!(w[*n].as_f64(), Some(0.0), "{e}");
    }
    let st = f.status();
    assert_eq!(st["journal"], json!(journal));
    assert_eq!(st["failed_reloads"], 0);
    let text = ok(&["ctl", "--socket", f.sock(), "journal"]);
    assert!(text.contains("12") && text.contains("ctl"), "{text}");
    // Steps before 12 are the plan's; from 12 on every row is domain 0.
    let (got, _) = read_steps(&mut c, 18);
    for (step, domains) in got {
        if step < 12 {
            assert_eq!(domains, want[step as usize], "step {step}");
        } else {
            assert!(domains.iter().all(|&d| d == 0), "step {step}: {domains:?}");
        }
    }
}

#[test]
fn bad_changes_are_refused_and_the_old_weights_stay() {
    let f = fixture();
    let _serve = f.serve();
    let loaded = f.load();
    let names = loaded.plan.domain_names();
    let want = planned_domains(&loaded, 16);
    let before = f.journal();
    let zeros: serde_json::Map<String, Value> =
        names.iter().map(|n| (n.to_string(), json!(0.0))).collect();
    let mut refused = 0;
    for (what, weights) in [
        ("unknown domain", json!({"no_such_domain": 1.0})),
        ("negative", json!({names[0]: -0.5})),
        ("all zero", Value::Object(zeros)),
    ] {
        let r = f.set_weights(weights, Some(40), "refuse");
        assert_eq!(r["ok"], false, "{what}: {r}");
        assert_eq!(r["code"], "invalid", "{what}: {r}");
        assert_eq!(r["op"], "set_weights", "{what}: {r}");
        assert!(
            !r["message"].as_str().unwrap_or("").is_empty(),
            "{what}: {r}"
        );
        refused += 1;
        assert_eq!(f.journal(), before, "{what}");
        assert_eq!(f.status()["failed_reloads"], refused, "{what}");
    }
    // The command line shows the daemon's reason and exits non-zero.
    let err = fails(&set_weights_args(f.sock(), &["no_such_domain=1"]));
    assert!(
        err.contains("no_such_domain") && err.contains("invalid"),
        "{err}"
    );
    refused += 1;
    // NaN is not JSON: the daemon answers ok:false or an ERROR frame, never applies it.
    let mut s = UnixStream::connect(&f.socket).unwrap();
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    let nan = format!(
        r#"{{"protocol":1,"op":"set_weights","weights":{{"{}":NaN}},"at_step":40}}"#,
        names[0]
    );
    s.write_all(&frame(CONTROL, nan.as_bytes())).unwrap();
    let (k, payload) = read_from(&mut s).unwrap();
    let reply: Value = serde_json::from_slice(&payload).unwrap();
    match k {
        CONTROL_REPLY => assert_eq!(reply["ok"], false, "{reply}"),
        5 => assert_eq!(reply["code"], "protocol", "{reply}"),
        k => panic!("frame type {k} in reply to NaN: {reply}"),
    }
    drop(s);
    assert_eq!(f.journal(), before);
    let st = f.status();
    assert!(st["failed_reloads"].as_u64().unwrap() >= refused, "{st}");
    assert_eq!(st["reloads"], 0, "{st}");
    // The stream is the plan's, row for row.
    let mut c = f.connect("bad");
    let (got, _) = read_steps(&mut c, 16);
    for (step, domains) in got {
        assert_eq!(domains, want[step as usize], "step {step}");
    }
}

/// A change that would leave a bursty domain short of its weight for the rest of the run
/// (it takes a cycle's rows in one step, so at most 1/period of them) is refused with
/// the reason, and the old weights stay; one within bounds is applied.
#[test]
fn a_change_that_overloads_a_bursty_domain_is_refused() {
    let f = fixture();
    let names = f.names();
    // The last domain takes 4 steps' rows in one.
    let text = std::fs::read_to_string(&f.config).unwrap();
    let mut doc: toml::Table = toml::from_str(&text).unwrap();
    let corpus = doc.get_mut("corpus").unwrap().as_table_mut().unwrap();
    let domains = corpus.get_mut("domain").unwrap().as_array_mut().unwrap();
    let last = domains.last_mut().unwrap().as_table_mut().unwrap();
    last.insert(
        "bursty".into(),
        toml::Value::Table(toml::from_str("period = 4").unwrap()),
    );
    std::fs::write(&f.config, toml::to_string(&doc).unwrap()).unwrap();
    let _serve = f.serve();
    let bursty = names.last().unwrap().clone();
    let before = f.journal();
    let mut heavy = serde_json::Map::new();
    for n in &names {
        heavy.insert(n.clone(), json!(if *n == bursty { 0.7 } else { 0.1 }));
    }
    let r = f.set_weights(Value::Object(heavy), Some(40), "refuse");
    assert_eq!(r["ok"], false, "{r}");
    let why = r["message"].as_str().unwrap_or("");
    assert!(
        why.contains(&format!("domain {bursty} (bursty, period 4)"))
            && why.contains("at most 1/4")
            && why.contains("nothing changed"),
        "{r}"
    );
    assert_eq!(f.journal(), before);
    let r = f.set_weights(json!({bursty.clone(): 0.01}), Some(40), "refuse");
    assert_eq!(r["ok"], true, "{r}");
}

#[test]
fn late_changes_are_refused_or_moved_on_request() {
    let f = fixture();
    let _serve = f.serve();
    let loaded = f.load();
    let names = loaded.plan.domain_names();
    let mut c = f.connect("late");
    let _ = read_steps(&mut c, 8);
    let weights = json!({names[0]: 0.9});
    let r = f.set_weights(weights.clone(), Some(3), "refuse");
    assert_eq!(r["ok"], false, "{r}");
    assert_eq!(r["code"], "late", "{r}");
    let first = r["first_changeable_step"]
        .as_u64()
        .expect("first_changeable_step");
    assert!(first >= 8, "{r}");
    assert!(
        r["message"].as_str().unwrap().contains(&first.to_string()),
        "{r}"
    );
    assert_eq!(f.journal(), Vec::<Value>::new());
    // The command line says the same, and exits non-zero.
    let arg = format!("{}=0.9", names[0]);
    let err = fails(&set_weights_args(f.sock(), &[&arg, "--at-step", "3"]));
    assert!(err.contains("late") && err.contains("--late next"), "{err}");
    // With --late next it applies at the first step that can still change, and says so.
    let o = ok(&set_weights_args(
        f.sock(),
        &[&arg, "--at-step", "3", "--late", "next", "--json"],
    ));
    let r: Value = serde_json::from_str(o.trim()).unwrap();
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["moved"], true, "{r}");
    assert_eq!(r["requested_step"], 3, "{r}");
    let applied = r["applied_step"].as_u64().unwrap();
    assert!(applied >= first, "{r}");
    let journal = f.journal();
    assert_eq!(journal.len(), 1, "{journal:?}");
    check_journal_entry(&journal[0]);
    assert_eq!(journal[0]["at_step"], applied);
    assert_eq!(r["journal"], json!(journal), "{r}");
    // The client keeps streaming across the change.
    let (got, _) = read_steps(&mut c, 8);
    assert_eq!(got.first().map(|g| g.0), Some(8));
}

/// Regression: after a job rolled back (its rings left at step 12 and came back from the
/// blob of step 2), a change among the replayed steps was refused `late` with "steps
/// below 13 are published", though `status` showed no ring past step 3. The refusal
/// stands (the abandoned run's later checkpoints would no longer resume), and now says
/// why, and what to do.
#[test]
fn a_late_refusal_names_steps_served_only_to_rings_that_left() {
    let f = fixture();
    let _serve = f.serve();
    let first = f.names()[0].clone();
    let weights = json!({ first: 0.9 });
    let mut c = f.connect("rollback");
    let (_, early) = read_steps(&mut c, 3);
    let _ = read_steps(&mut c, 9);
    c.bye().unwrap();
    let mut h = Hello::new(0, 1, ROWS, 1);
    h.job = "rollback".into();
    h.cursor = Some(early.iter().map(|b| format!("{b:02x}")).collect());
    let mut c = Client::connect(&f.socket, &h).unwrap_or_else(|e| panic!("resume: {e}"));
    c.set_timeout(Some(TIMEOUT));
    assert_eq!(c.welcome().start_step, 3);
    let _ = read_steps(&mut c, 1);
    let r = f.set_weights(weights.clone(), Some(11), "refuse");
    assert_eq!(r["code"], "late", "{r}");
    let message = r["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("were published only to rings that have since left")
            && message.contains("restart the daemon"),
        "{r}"
    );
    // A step the connected ring itself has been served is late for that reason alone.
    let r = f.set_weights(weights, Some(1), "refuse");
    assert_eq!(r["code"], "late", "{r}");
    assert!(
        !r["message"]
            .as_str()
            .unwrap_or_default()
            .contains("since left"),
        "{r}"
    );
    assert_eq!(f.journal(), Vec::<Value>::new());
}

#[test]
fn reload_rereads_the_config() {
    let f = fixture();
    let _serve = f.serve();
    let loaded = f.load();
    let names = loaded.plan.domain_names();
    // Nothing changed on disk: nothing applies.
    let r = f.req(control::reload_request());
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["op"], "reload", "{r}");
    assert!(r["applied_step"].is_null(), "{r}");
    assert_eq!(f.journal(), Vec::<Value>::new());
    // New weights on disk: `millrace ctl reload` applies them.
    let text = std::fs::read_to_string(&f.config).unwrap();
    let mut doc: toml::Table = toml::from_str(&text).unwrap();
    let plan = doc.get_mut("plan").unwrap().as_table_mut().unwrap();
    plan.remove("schedule");
    let mut w = toml::Table::new();
    for (i, n) in names.iter().enumerate() {
        w.insert(
            n.to_string(),
            toml::Value::Float(if i == 0 { 3.0 } else { 1.0 }),
        );
    }
    plan.insert("weights".into(), toml::Value::Table(w));
    std::fs::write(&f.config, toml::to_string(&doc).unwrap()).unwrap();
    let text = ok(&["ctl", "--config", f.config.to_str().unwrap(), "reload"]);
    assert!(text.contains("applied from step"), "{text}");
    let journal = f.journal();
    assert_eq!(journal.len(), 1, "{journal:?}");
    check_journal_entry(&journal[0]);
    let st = f.status();
    // The no-op reload above may or may not count; this one does.
    assert!(st["reloads"].as_u64() >= Some(1), "{st}");
    let shares: Vec<f64> = st["domains"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["target_share"].as_f64().unwrap())
        .collect();
    // Target shares are token shares of the new weights 3:1:1:1.
    assert!((shares[0] - 0.5).abs() < 1e-6, "{shares:?}");
    // A seed or a stage is refused naming the key (the refusal used to say only "[plan]
    // settings other than weights and schedule changed"), and a stage names set-stage.
    let good = toml::to_string(&doc).unwrap();
    let mut seeded = doc.clone();
    let plan = seeded.get_mut("plan").unwrap().as_table_mut().unwrap();
    plan.insert("seed".into(), toml::Value::Integer(77));
    std::fs::write(&f.config, toml::to_string(&seeded).unwrap()).unwrap();
    let r = f.req(control::reload_request());
    let message = r["message"].as_str().unwrap_or_default();
    assert_eq!(r["code"], "invalid", "{r}");
    assert!(
        message.contains("[plan] `plan.seed` (") && message.contains("-> 77)"),
        "{r}"
    );
    let staged = format!(
        "{good}\n[[plan.stage]]\nstep = 500\nseq_len = {}\nglobal_batch_rows = {ROWS}\n",
        2 * SEQ_LEN
    );
    std::fs::write(&f.config, staged).unwrap();
    let r = f.req(control::reload_request());
    let message = r["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("`plan.stage`") && message.contains("ctl set-stage"),
        "{r}"
    );
    assert_eq!(f.journal(), journal);
    assert_eq!(f.status()["failed_reloads"], 2);
    // A broken file is refused as a whole, counted, and changes nothing.
    std::fs::write(&f.config, "[plan\n").unwrap();
    let r = f.req(control::reload_request());
    assert_eq!(r["ok"], false, "{r}");
    assert_eq!(r["code"], "invalid", "{r}");
    assert_eq!(f.journal(), journal);
    assert_eq!(f.status()["failed_reloads"], 3);
}

/// `ctl --config B reload` against a daemon started with A (B names A's socket: a copy
/// being edited, another plan for the node) printed "nothing changed" and exit 0, as if
/// B's new weights were already in force; the daemon re-reads A. The reply names A.
#[test]
fn a_reload_names_the_file_the_daemon_read() {
    let f = fixture();
    let _serve = f.serve();
    let names = f.names();
    let mut doc: toml::Table =
        toml::from_str(&std::fs::read_to_string(&f.config).unwrap()).unwrap();
    let plan = doc.get_mut("plan").unwrap().as_table_mut().unwrap();
    plan.remove("schedule");
    let w: toml::Table = (names.iter().enumerate())
        .map(|(i, n)| {
            (
                n.clone(),
                toml::Value::Float(if i == 0 { 3.0 } else { 1.0 }),
            )
        })
        .collect();
    plan.insert("weights".into(), toml::Value::Table(w));
    let other = f.corpus.dir.join("other.toml");
    std::fs::write(&other, toml::to_string(&doc).unwrap()).unwrap();
    let text = ok(&["ctl", "--config", other.to_str().unwrap(), "reload"]);
    assert!(text.contains("nothing changed"), "{text}");
    assert!(
        text.contains(f.config.to_str().unwrap()),
        "the reply does not name the file the daemon read: {text}"
    );
    assert_eq!(f.journal(), Vec::<Value>::new());
}

/// A reload never applies `[serve]`: it said so only in the daemon's log, once (the next
/// reload compared against the edited table), and `ctl reload` printed "applied from step
/// N" as if the edit of `ring_slots` had taken. The reply now names the keys each time.
#[test]
fn a_reload_says_which_serve_keys_wait_for_a_restart() {
    let f = fixture();
    let _serve = f.serve();
    let names = f.names();
    let original: toml::Table =
        toml::from_str(&std::fs::read_to_string(&f.config).unwrap()).unwrap();
    let socket = original["serve"]["socket"].clone();
    let edit_serve = |ring_slots: i64, first_weight: f64, extra: &[(&str, toml::Value)]| {
        let text = std::fs::read_to_string(&f.config).unwrap();
        let mut doc: toml::Table = toml::from_str(&text).unwrap();
        let serve = doc.get_mut("serve").unwrap().as_table_mut().unwrap();
        serve.insert("ring_slots".into(), toml::Value::Integer(ring_slots));
        for key in ["ring_memory_bytes", "socket_group", "metrics_addr"] {
            serve.remove(key);
        }
        serve.insert("socket".into(), socket.clone());
        for (k, v) in extra {
            serve.insert(k.to_string(), v.clone());
        }
        let plan = doc.get_mut("plan").unwrap().as_table_mut().unwrap();
        plan.remove("schedule");
        let w: toml::Table = (names.iter().enumerate())
            .map(|(i, n)| {
                let v = if i == 0 { first_weight } else { 1.0 };
                (n.clone(), toml::Value::Float(v))
            })
            .collect();
        plan.insert("weights".into(), toml::Value::Table(w));
        std::fs::write(&f.config, toml::to_string(&doc).unwrap()).unwrap();
    };
    let edit = |ring_slots: i64, first_weight: f64| edit_serve(ring_slots, first_weight, &[]);
    edit(8, 3.0);
    let text = ok(&["ctl", "--socket", f.sock(), "reload"]);
    assert!(text.contains("reload: applied from step"), "{text}");
    assert!(
        text.contains("[serve] `ring_slots` changed") && text.contains("next restart"),
        "{text}"
    );
    // Still not applied at the next reload: said again, with the weights' change.
    edit(8, 5.0);
    let r = f.req(control::reload_request());
    assert_eq!(r["ok"], true, "{r}");
    assert!(r["applied_step"].is_u64(), "{r}");
    let m = r["message"].as_str().unwrap();
    assert!(m.contains("`ring_slots`"), "{r}");
    // A [serve] the next start would refuse refuses the reload: the weights stay.
    let journal = f.journal();
    edit(1, 7.0);
    let err = fails(&["ctl", "--socket", f.sock(), "reload"]);
    assert!(
        err.contains("refused reload (invalid)")
            && err.contains("[serve] ring_slots: must be 2..=1024; the next start would refuse it"),
        "{err}"
    );
    assert_eq!(f.journal(), journal);
    // So does any [serve] the start refuses past its parsing (the same check): a budget
    // that holds no ring, a socket path that is a directory, a group that does not
    // exist, a metrics address another process listens on (these two were accepted,
    // and the next start failed).
    let dir = f.corpus.tmp.path().to_str().unwrap().to_string();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = taken.local_addr().unwrap().to_string();
    let group = toml::Value::String("millrace-no-such-group".into());
    for (key, value, says) in [
        ("ring_memory_bytes", toml::Value::Integer(1), "hold no ring"),
        ("socket", toml::Value::String(dir), "not a socket"),
        ("socket_group", group, "no such group"),
        ("metrics_addr", toml::Value::String(taken), "cannot listen"),
    ] {
        edit_serve(4, 9.0, &[(key, value)]);
        let err = fails(&["ctl", "--socket", f.sock(), "reload"]);
        assert!(
            err.contains("refused reload (invalid)")
                && err.contains(&format!("[serve] {key}"))
                && err.contains(says)
                && err.contains("the next start would refuse it"),
            "{err}"
        );
        assert_eq!(f.journal(), journal);
    }
    // The file back at the daemon's [serve]: nothing to say.
    edit(4, 5.0);
    let text = ok(&["ctl", "--socket", f.sock(), "reload"]);
    assert!(!text.contains("[serve]"), "{text}");
}

/// A reload that only narrows the metrics address to another interface of the same port
/// ("0.0.0.0:P" to "127.0.0.1:P") is accepted: the port is this daemon's, free once it
/// stops. It was refused as "the next start would refuse it" (a test bind of a port the
/// daemon itself holds).
#[test]
fn a_reload_narrowing_the_metrics_address_is_accepted() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let f = fixture_with(&format!("metrics_addr = \"0.0.0.0:{port}\"\n"));
    let _serve = f.serve();
    let text = std::fs::read_to_string(&f.config).unwrap();
    let narrowed = text.replace(&format!("0.0.0.0:{port}"), &format!("127.0.0.1:{port}"));
    assert_ne!(text, narrowed);
    std::fs::write(&f.config, narrowed).unwrap();
    let text = ok(&["ctl", "--socket", f.sock(), "reload"]);
    assert!(
        text.contains("metrics_addr") && text.contains("next restart"),
        "{text}"
    );
}

/// The watcher reads a file it refused once, not every two intervals: a syntax error is
/// counted one failed reload however long it stays, and the fixed file then applies.
#[test]
fn the_watcher_does_not_retry_a_refused_file() {
    let corpus = common::corpus(1_000_000, 4, 5, 300_000);
    let socket = corpus.dir.join("s.sock");
    let serve = common::serve_toml(&socket, 4, 2).replace(
        "watch_config = false",
        "watch_config = true\nwatch_interval_ms = 100",
    );
    assert!(serve.contains("watch_interval_ms = 100"), "{serve}");
    let f = Fixture {
        config: common::write_config(&corpus.dir, "test.toml", SEQ_LEN, ROWS, &[&serve]),
        socket,
        corpus,
    };
    let d = f.serve();
    let names: Vec<String> = f
        .load()
        .plan
        .domain_names()
        .iter()
        .map(|n| n.to_string())
        .collect();
    let good = std::fs::read_to_string(&f.config).unwrap();
    std::fs::write(&f.config, format!("{good}\n[plan\n")).unwrap();
    let deadline = Instant::now() + TIMEOUT;
    while f.status()["failed_reloads"] != 1 {
        assert!(
            Instant::now() < deadline,
            "no failed reload:\n{}",
            d.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Ten intervals: before the fix each two of them counted another failure.
    std::thread::sleep(Duration::from_millis(1000));
    let st = f.status();
    assert_eq!(st["failed_reloads"], 1, "{st}\n{}", d.log_text());
    // The fixed file (new weights) is applied.
    let mut doc: toml::Table = toml::from_str(&good).unwrap();
    let plan = doc.get_mut("plan").unwrap().as_table_mut().unwrap();
    plan.remove("schedule");
    let mut w = toml::Table::new();
    for (i, n) in names.iter().enumerate() {
        w.insert(
            n.clone(),
            toml::Value::Float(if i == 0 { 3.0 } else { 1.0 }),
        );
    }
    plan.insert("weights".into(), toml::Value::Table(w));
    std::fs::write(&f.config, toml::to_string(&doc).unwrap()).unwrap();
    let deadline = Instant::now() + TIMEOUT;
    while f.journal().is_empty() {
        assert!(
            Instant::now() < deadline,
            "fixed file not applied:\n{}",
            d.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(f.status()["failed_reloads"], 1);
}

/// `--timeout` bounds the connect too: against a socket whose listen backlog is full (a
/// stuck daemon), `status` fails within the timeout and says so, instead of hanging.
#[test]
fn status_times_out_against_a_full_backlog() {
    use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("stuck.sock");
    let listener = rustix::net::socket(AddressFamily::UNIX, SocketType::STREAM, None).unwrap();
    let addr = SocketAddrUnix::new(&path).unwrap();
    rustix::net::bind(&listener, &addr).unwrap();
    rustix::net::listen(&listener, 1).unwrap();
    // Fill the backlog with connections nobody accepts, until one would block.
    let mut held = Vec::new();
    loop {
        let c = rustix::net::socket_with(
            AddressFamily::UNIX,
            SocketType::STREAM,
            SocketFlags::NONBLOCK,
            None,
        )
        .unwrap();
        match rustix::net::connect(&c, &addr) {
            Ok(()) => held.push(c),
            Err(rustix::io::Errno::AGAIN) => break,
            Err(e) => panic!("filling the backlog: {e}"),
        }
        assert!(held.len() < 64, "the backlog never filled");
    }
    let t0 = Instant::now();
    let o = run(&[
        "status",
        "--socket",
        path.to_str().unwrap(),
        "--timeout",
        "1",
    ]);
    let took = t0.elapsed();
    assert!(!o.status.success(), "{}", stdout(&o));
    assert!(took < Duration::from_secs(10), "took {took:?}");
    let err = stderr(&o);
    assert!(err.contains("timed out"), "{err}");
    drop(held);
    drop(listener);
}

/// Whether process `pid` catches SIGHUP (bit 0 of SigCgt in /proc/PID/status).
fn catches_sighup(pid: libc::pid_t) -> bool {
    let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return false;
    };
    text.lines()
        .find_map(|l| l.strip_prefix("SigCgt:"))
        .and_then(|h| u64::from_str_radix(h.trim(), 16).ok())
        .is_some_and(|mask| mask & 1 != 0)
}

/// A SIGHUP while the daemon opens its corpus (before it listens) used to kill it: the
/// handler was installed only after the load. Once the process catches SIGHUP, SIGHUPs
/// every 2 ms until it listens leave it serving.
#[test]
fn sighup_during_start_up_does_not_kill_the_daemon() {
    let f = fixture();
    let mut d = Serve::spawn(&f.config, &f.corpus.dir.join("serve.log"), |_| {});
    let pid = d.pid();
    let deadline = Instant::now() + TIMEOUT;
    while !catches_sighup(pid) {
        assert!(
            d.alive(),
            "exited before catching SIGHUP:\n{}",
            d.log_text()
        );
        assert!(Instant::now() < deadline, "never caught SIGHUP");
        std::thread::sleep(Duration::from_millis(1));
    }
    let mut sent = 0u32;
    while UnixStream::connect(&f.socket).is_err() {
        assert!(
            d.alive(),
            "died after {sent} SIGHUPs during start-up:\n{}",
            d.log_text()
        );
        assert!(
            Instant::now() < deadline,
            "never listened:\n{}",
            d.log_text()
        );
        d.signal(libc::SIGHUP);
        sent += 1;
        std::thread::sleep(Duration::from_millis(2));
    }
    assert!(sent > 0);
    // A few more once it serves, then it still answers and streams.
    for _ in 0..5 {
        d.signal(libc::SIGHUP);
        std::thread::sleep(Duration::from_millis(2));
    }
    let st = f.status();
    assert!(st.is_object(), "{st}");
    let mut c = f.connect("after-hup");
    c.next_batch()
        .unwrap_or_else(|e| panic!("{e}\n{}", d.log_text()));
    assert!(d.alive(), "{}", d.log_text());
}

/// A daemon nothing has read from since it started does not know the run's step. A
/// change without `at_step` used to land at step 0 there, so the change an operator
/// re-issued after a restart mid-run rewrote the past of every blob the trainers then
/// brought back (all refused). Now it is refused, saying to give the step; with one, or
/// once a trainer has connected, it is taken.
#[test]
fn a_change_without_a_step_waits_for_the_run_to_be_known() {
    let f = fixture();
    let _serve = f.serve();
    let names = f.names();
    let before = f.journal();
    let r = f.set_weights(json!({&names[0]: 0.7}), None, "next");
    assert_eq!(r["ok"], false, "{r}");
    assert_eq!(r["code"], "invalid", "{r}");
    let m = r["message"].as_str().unwrap_or("");
    assert!(
        m.contains("does not know the run's step") && m.contains("at_step"),
        "{r}"
    );
    assert_eq!(f.journal(), before);
    // A bad domain is still named first.
    let r = f.set_weights(json!({"no_such_domain": 1.0}), None, "next");
    assert!(
        r["message"]
            .as_str()
            .unwrap_or("")
            .contains("no_such_domain"),
        "{r}"
    );

    let r = f.set_weights(json!({&names[0]: 0.7}), Some(0), "refuse");
    assert_eq!(r["ok"], true, "an explicit step is taken: {r}");
    assert_eq!(r["applied_step"], 0, "{r}");
    let mut c = f.connect("known");
    c.next_batch().unwrap();
    let r = f.set_weights(json!({&names[0]: 0.5}), None, "next");
    assert_eq!(
        r["ok"], true,
        "with a trainer connected the step is known: {r}"
    );
    assert!(r["applied_step"].as_u64().unwrap() >= 1, "{r}");
}

/// `top` at an interval longer than `[serve] control_idle_timeout_ms`: the daemon closes
/// the idle control connection between two frames, and `top` asks again on a new one.
/// It failed instead (`--once` exited with `error: ... (idle)`; the live view drew every
/// other frame as that error and never a rate).
#[test]
fn top_outlasts_the_control_idle_timeout() {
    let f = fixture_with("control_idle_timeout_ms = 300\n");
    let _d = f.serve();
    let _c = f.connect("idle");
    let text = ok(&["top", "--socket", f.sock(), "--once", "--interval", "1"]);
    let ring = text
        .lines()
        .find(|l| l.starts_with("idle"))
        .unwrap_or_else(|| panic!("no ring line:\n{text}"));
    // Rates over the interval: numbers, not the dashes of a frame without a previous one.
    assert!(!ring.contains(" - "), "{ring}");
}

/// `top` across a ring freed and made again between its two statuses: a trainer of job
/// "remade" reads a few steps as dp rank 0 of 2, hangs up, and reconnects as rank 0 of 1
/// (twice the rows a step) to read more. The new ring is not the old one (its serial
/// differs), so its line shows no rate; `top` took the new ring's counters less the old
/// one's as the interval's growth (tokens/s and steps/s of a ring that did not exist at
/// the first status).
#[test]
fn top_shows_no_rate_for_a_ring_remade_between_its_statuses() {
    let f = fixture();
    let _d = f.serve();
    let hello = |dp_size: u32| {
        let mut h = Hello::new(0, dp_size, ROWS / dp_size, 1);
        h.job = "remade".into();
        h
    };
    let mut c = Client::connect(&f.socket, &hello(2)).unwrap();
    c.set_timeout(Some(TIMEOUT));
    read_steps(&mut c, 3);
    let serial = |st: &Value| st["jobs"][0]["rings"][0]["serial"].as_u64();
    let deadline = Instant::now() + TIMEOUT;
    while f.status()["jobs"][0]["rings"][0]["released_step"].as_u64() < Some(2) {
        assert!(Instant::now() < deadline, "rank 0 never released 2 steps");
        std::thread::sleep(Duration::from_millis(20));
    }
    let first = serial(&f.status());
    let top = std::thread::spawn({
        let sock = f.sock().to_string();
        move || ok(&["top", "--socket", &sock, "--once", "--interval", "6"])
    });
    // `top` has taken its first status; the ring goes and comes back within the interval.
    std::thread::sleep(Duration::from_millis(1000));
    drop(c);
    while !f.status()["jobs"].as_array().unwrap().is_empty() {
        assert!(Instant::now() < deadline, "the job never left");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut c = Client::connect(&f.socket, &hello(1)).unwrap();
    c.set_timeout(Some(TIMEOUT));
    read_steps(&mut c, 6);
    let text = top.join().unwrap();
    let ring = text
        .lines()
        .find(|l| l.starts_with("remade"))
        .unwrap_or_else(|| panic!("no ring line:\n{text}"));
    let cols: Vec<&str> = ring.split_whitespace().collect();
    // job, rank, step, tokens/s, steps/s: no rate for a ring new since the first status.
    assert_eq!(cols[3..5], ["-", "-"], "{ring}");
    // STATUS tells the two rings apart.
    let st = f.status();
    assert!(first.is_some() && serial(&st) != first, "{st}");
    drop(c);
}

/// A daemon told to stop, seen on a control connection opened before (as `top` keeps
/// one; the socket file is gone): STATUS says it drains, and `status` and `top` say so.
/// It looked like a daemon serving as usual, stalled.
#[test]
fn a_draining_daemon_says_so_in_status() {
    let f = fixture();
    let mut d = f.serve();
    let mut c = f.connect("drain");
    let _held = read_steps(&mut c, 1);
    let mut conn = control::Connection::open(&f.socket, TIMEOUT).unwrap();
    let ask = |conn: &mut control::Connection| {
        let r = conn.request(&control::status_request()).unwrap();
        assert_eq!(r["ok"], true, "{r}");
        r["status"].clone()
    };
    assert_eq!(ask(&mut conn)["draining"], false);
    d.signal(libc::SIGTERM);
    let deadline = Instant::now() + TIMEOUT;
    let st = loop {
        let st = ask(&mut conn);
        if st["draining"] == true {
            break st;
        }
        assert!(Instant::now() < deadline, "never draining: {st}");
        std::thread::sleep(Duration::from_millis(20));
    };
    // The client still holds its step, so the drain waits for it.
    assert_eq!(st["clients"], 1, "{st}");
    drop(c);
    assert!(d.wait_exit(TIMEOUT).is_some_and(|s| s.success()));
}

/// STATUS lists every change while they fit its 8 MiB: 25 small changes (the default
/// `live_changes` allows 32) are all listed, and `millrace status` leaves none out. It
/// listed the first 4 and the last 16 however small they were, and said 5 changes were
/// left out of a 3 KB journal.
#[test]
fn status_lists_every_change_of_a_small_journal() {
    const CHANGES: u64 = 25;
    let f = fixture();
    let _serve = f.serve();
    f.change_first_weight(CHANGES);
    let st = f.status();
    assert_eq!(st["journal_changes"], CHANGES);
    assert_eq!(
        st["journal_omitted"],
        Value::Null,
        "{}",
        st["journal_omitted"]
    );
    assert_eq!(st["journal"], json!(f.journal()));
    let text = ok(&["status", "--socket", f.sock()]);
    assert!(
        !text.contains("left out") && text.contains(&format!("{:>10}", 100 + CHANGES - 1)),
        "{text}"
    );
}

/// A corpus of `domains` domains (`tokens` in all) whose names are as long as a config
/// takes (4,096 bytes), and a config with `serve` added to `[serve]`.
fn long_named(domains: usize, tokens: u64, serve: &str) -> Fixture {
    let corpus = common::corpus(tokens, domains, 5, 300_000);
    let socket = corpus.dir.join("s.sock");
    let base = common::serve_toml(&socket, 4, 2);
    let config = common::write_config(&corpus.dir, "long.toml", SEQ_LEN, ROWS, &[&base, serve]);
    let long = |n: &str| {
        format!(
            "{n}_{}",
            "x".repeat(millrace::config::MAX_NAME - n.len() - 1)
        )
    };
    let mut doc: toml::Table = toml::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    let corpus_t = doc["corpus"].as_table_mut().unwrap();
    for d in corpus_t["domain"].as_array_mut().unwrap() {
        let name = long(d["name"].as_str().unwrap());
        d.as_table_mut().unwrap().insert("name".into(), name.into());
    }
    let plan = doc["plan"].as_table_mut().unwrap();
    for p in plan["schedule"].as_array_mut().unwrap() {
        let p = p.as_table_mut().unwrap();
        let w: toml::Table = p["weights"]
            .as_table()
            .unwrap()
            .iter()
            .map(|(k, v)| (long(k), v.clone()))
            .collect();
        p.insert("weights".into(), w.into());
    }
    std::fs::write(&config, toml::to_string(&doc).unwrap()).unwrap();
    Fixture {
        corpus,
        config,
        socket,
    }
}

/// STATUS stays within its frame however long the journal is. 300 domains with names at
/// the config's limit (4,096 bytes) make each change 1.2 MB of JSON; STATUS listed every
/// one, so it grew by that per change (15 MB for the 12 here) and passed the 64 MiB
/// frame at 54 changes (of the 4,096 `live_changes` allows: 5 GB): `status`, `top` and
/// the exporter then got `busy`. It lists the journal's ends within 8 MiB and counts the
/// rest.
#[test]
fn status_of_a_long_journal_of_long_names_stays_within_its_frame() {
    use millrace::wire::status::STATUS_JOURNAL_BYTES;
    const DOMAINS: usize = 300;
    const CHANGES: u64 = 12;
    let f = long_named(DOMAINS, 300_000, "live_changes = 4096\n");
    let _serve = f.serve_slowly();
    let first = f.names()[0].clone();
    assert_eq!(first.len(), millrace::config::MAX_NAME);
    let status_bytes = || {
        let r = control::request(&f.socket, &control::status_request(), TIMEOUT).unwrap();
        assert_eq!(r["ok"], true, "STATUS refused: {r}");
        (r.to_string().len(), r["status"].clone())
    };
    let (before, _) = status_bytes();
    f.change_first_weight(CHANGES);
    let (after, st) = status_bytes();
    assert!(
        after <= before + STATUS_JOURNAL_BYTES,
        "STATUS grew from {before} to {after} bytes with {CHANGES} changes"
    );
    assert_eq!(st["journal_changes"], CHANGES, "{}", st["journal_omitted"]);
    let listed = st["journal"].as_array().unwrap();
    let gap = &st["journal_omitted"];
    let after_n = gap["after"].as_u64().unwrap() as usize;
    assert!(after_n >= 1 && listed.len() > after_n, "{gap}");
    assert_eq!(
        listed.len() as u64 + gap["changes"].as_u64().unwrap(),
        CHANGES
    );
    // The oldest change first, the newest last, each whole.
    assert_eq!(listed[0]["at_step"], 100);
    assert_eq!(listed.last().unwrap()["at_step"], 100 + CHANGES - 1);
    assert_eq!(
        listed[after_n]["at_step"],
        100 + CHANGES - (listed.len() - after_n) as u64
    );
    for e in listed {
        check_journal_entry(e);
        assert_eq!(
            e["points"][0]["weights"].as_object().unwrap().len(),
            DOMAINS
        );
    }
    // The human view says what it left out; `ctl journal` still lists every change.
    let text = ok(&["status", "--socket", f.sock()]);
    let said = format!("{} of {CHANGES} changes left out", gap["changes"]);
    assert!(
        text.contains(&said),
        "{}",
        &text[text.len().saturating_sub(2000)..]
    );
    assert_eq!(f.journal().len() as u64, CHANGES);
}

/// The CPU seconds (user and system) process `pid` has used.
fn cpu_seconds(pid: libc::pid_t) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // The fields after the command name, which is in parentheses.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<u64> = (rest.split_whitespace())
        .skip(11)
        .take(2)
        .map(|v| v.parse().unwrap())
        .collect();
    let hz = rustix::param::clock_ticks_per_second() as f64;
    (f[0] + f[1]) as f64 / hz
}

/// What a long journal costs an idle daemon with metrics on (24 live changes of 300
/// domains named at the 4,096-byte limit): each second's export built the journal STATUS
/// lists (7.4 MB as JSON here, up to 8 MiB) and dropped it unread. The figures of
/// BENCHMARKS.md ("What the operator's replies cost at their edges") come from this
/// test (`--nocapture`); its bound only catches a gross cost, /proc's CPU times count in
/// 10 ms ticks. The exact check is the hub's unit test
/// `the_exporters_status_counts_the_journal_without_listing_it`.
#[test]
fn the_exporter_builds_no_journal() {
    const DOMAINS: usize = 300;
    const CHANGES: u64 = 12;
    const IDLE: Duration = Duration::from_secs(10);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port();
    let serve = format!("live_changes = 4096\nmetrics_addr = \"127.0.0.1:{port}\"\n");
    let f = long_named(DOMAINS, 300_000, &serve);
    let d = f.serve_slowly();
    let idle_cpu = || {
        std::thread::sleep(Duration::from_secs(2));
        let before = cpu_seconds(d.pid());
        std::thread::sleep(IDLE);
        (cpu_seconds(d.pid()) - before) / IDLE.as_secs_f64()
    };
    let empty = idle_cpu();
    f.change_first_weight(CHANGES);
    let long = idle_cpu();
    // What each export built and dropped before: the journal STATUS lists.
    let r = control::request(&f.socket, &control::status_request(), TIMEOUT).unwrap();
    let listed = r["status"]["journal"].to_string().len();
    eprintln!(
        "idle daemon with metrics on: {:.1} ms of CPU a second with no journal, {:.1} ms \
         with {CHANGES} changes of {DOMAINS} long-named domains (STATUS lists {listed} \
         bytes of them)",
        empty * 1e3,
        long * 1e3
    );
    assert!(listed > 1 << 20, "STATUS lists {listed} bytes of journal");
    assert!(
        long < empty + 0.02,
        "the daemon spends {:.1} ms of CPU a second with the long journal, {:.1} ms without",
        long * 1e3,
        empty * 1e3
    );
}

/// The daemon's peak resident memory (VmHWM), in kB.
fn peak_kb(pid: libc::pid_t) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// A change whose reply cannot carry the journal (4,096 domains of 4,096-byte names:
/// 17 MB of JSON per change, past the frame at the fourth) says it was applied, and
/// neither it nor `journal` builds the journal first. The daemon built every such reply
/// whole (JSON and its value tree) and then answered "the reply exceeds one frame", as
/// if refused: the twelfth change's 200 MB reply raised its peak memory by 590 MB (190
/// MB now, for the three replies that fit), and at this config's most changes (511)
/// each one would build 8.6 GB of JSON.
#[test]
fn a_change_too_large_to_reply_with_its_journal_says_it_was_applied() {
    const CHANGES: u64 = 12;
    let f = long_named(4096, 4_100_000, "live_changes = 16\n");
    let serve = f.serve_slowly();
    let first = f.names()[0].clone();
    let before = peak_kb(serve.pid());
    let mut busy = 0;
    for i in 0..CHANGES {
        let r = f.set_weights(json!({ &first: 1.0 + i as f64 }), Some(100 + i), "refuse");
        if r["ok"] == false {
            assert_eq!(r["code"], "busy", "change {i}: {r}");
            let message = r["message"].as_str().unwrap();
            assert!(
                message.contains("applied") && message.contains("millrace status"),
                "change {i}: {message}"
            );
            busy += 1;
        }
    }
    assert!(busy >= CHANGES - 4, "{busy} changes answered busy");
    let grew = peak_kb(serve.pid()).saturating_sub(before);
    assert!(
        grew < 350 << 10,
        "the daemon's peak memory grew by {grew} kB"
    );
    let r = f.req(control::journal_request());
    assert_eq!(
        (&r["ok"], &r["code"]),
        (&json!(false), &json!("busy")),
        "{r}"
    );
    let st = f.status();
    assert_eq!(st["journal_changes"], CHANGES);
    assert_eq!(
        st["journal"].as_array().map(Vec::len),
        Some(0),
        "17 MB per entry"
    );
    // In words: every change left out, not "no changes" and then a count.
    let text = ok(&["status", "--socket", f.sock()]);
    let tail = &text[text.len().saturating_sub(2000)..];
    assert!(
        tail.contains(&format!("(all {CHANGES} changes left out")) && !tail.contains("no changes"),
        "{tail}"
    );
}
