//! Live changes against the real `millrace serve` (issue 5, "Done means"): a config file
//! edit picked up by the watcher and a SIGHUP both apply new weights at a future step and
//! the delivered rows follow them exactly; broken and late reloads are refused with the
//! old weights in force (or, with `late_changes = "next"`, moved to the first changeable
//! step); two daemons given the same change deliver the same bytes; a cursor blob taken
//! after a change resumes bit for bit on a fresh daemon, which adopts the blob's journal
//! (and refuses a blob whose journal conflicts with its own); the Prometheus endpoint
//! agrees with the plan and with `status`.
//!
//! Every daemon here serves a 1e6-token, 4-domain synthetic corpus with 8 rows of 256
//! tokens per step and 4 ring slots, so a client that stops reading stalls its ring a few
//! steps ahead and "the first changeable step" is easy to reason about.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Control, Corpus, Serve};
use millrace::client::{Client, ClientError, Hello};
use millrace::config::{Config, LoadedPlan};
use millrace::plan::{Change, Plan};
use millrace::wire::to_hex as hex;
use serde_json::{json, Value};

const SEQ_LEN: u32 = 256;
const ROWS: u32 = 8;
const SLOTS: u64 = 4;
const TIMEOUT: Duration = Duration::from_secs(20);
/// How long a reload, a RELEASE or a metrics refresh may take to show.
const SETTLE: Duration = Duration::from_secs(10);

// ------------------------------------------------------------ fixtures

/// A synthetic corpus in a temp dir; several fixtures (configs, sockets, logs) may share
/// it.
fn corpus() -> Rc<Corpus> {
    Rc::new(common::corpus(1_000_000, 4, 5, 300_000))
}

/// One daemon's config, socket and log over a shared corpus.
struct Fixture {
    /// Keeps the corpus (and its temp dir) alive.
    _corpus: Rc<Corpus>,
    config: PathBuf,
    socket: PathBuf,
    log: PathBuf,
}

/// A fixture on a fresh corpus; `serve` is extra `[serve]` TOML (overrides the defaults
/// here: 4 slots, 2 threads, the watcher off).
fn fixture(serve: &str) -> Fixture {
    fixture_on(&corpus(), "d", serve)
}

/// A fixture named `name` (config `name.toml`, socket `name.sock`, log `name.log`) on
/// `corpus`.
fn fixture_on(corpus: &Rc<Corpus>, name: &str, serve: &str) -> Fixture {
    let dir = &corpus.dir;
    let socket = dir.join(format!("{name}.sock"));
    let config = common::write_config(
        dir,
        &format!("{name}.toml"),
        SEQ_LEN,
        ROWS,
        &[&common::serve_toml(&socket, SLOTS, 2), serve],
    );
    Fixture {
        _corpus: corpus.clone(),
        config,
        socket,
        log: dir.join(format!("{name}.log")),
    }
}

impl Control for Fixture {
    fn control_socket(&self) -> &Path {
        &self.socket
    }
}

impl Fixture {
    /// Starts `millrace serve` on this config.
    fn serve(&self) -> Serve {
        Serve::start(&self.config, &self.socket, &self.log)
    }

    /// The config's domain names, in order.
    fn domain_names(&self) -> Vec<String> {
        let plan = self.load().plan;
        plan.domain_names().iter().map(|n| n.to_string()).collect()
    }

    fn load(&self) -> LoadedPlan {
        Config::load(&self.config)
            .and_then(|c| c.load_plan())
            .unwrap_or_else(|e| panic!("{}: {e}", self.config.display()))
    }

    fn set_weights(&self, weights: &BTreeMap<String, f64>, at_step: u64) -> Value {
        self.req(
            json!({"protocol": 1, "op": "set_weights", "weights": weights,
                        "at_step": at_step, "late": "refuse"}),
        )
    }

    fn hello(&self, job: &str) -> Hello {
        let mut h = Hello::new(0, 1, ROWS, 1);
        h.job = job.into();
        h
    }

    fn connect_with(&self, h: &Hello) -> Result<Client, ClientError> {
        let mut c = Client::connect(&self.socket, h)?;
        c.set_timeout(Some(TIMEOUT));
        Ok(c)
    }

    fn connect(&self, job: &str) -> Client {
        self.connect_with(&self.hello(job))
            .unwrap_or_else(|e| panic!("connect to {}: {e}", self.socket.display()))
    }

    /// Waits until the daemon has dropped `job` (its last client left).
    fn wait_no_job(&self, job: &str) -> Value {
        wait_for(&format!("job {job} to go"), Duration::from_secs(10), || {
            let st = self.status();
            match st["jobs"].as_array() {
                Some(jobs) if jobs.iter().all(|j| j["job"] != job) => Ok(st),
                _ => Err(st.to_string()),
            }
        })
    }

    /// Connects as `job` with the cursor `blob` to `daemon`, and checks that the steps it
    /// then delivers are `want`, tokens, domains and cursors, bit for bit. Returns the
    /// client, still connected.
    fn resume_exactly(&self, daemon: &Serve, job: &str, blob: &[u8], want: &[Step]) -> Client {
        let mut h = self.hello(job);
        h.cursor = Some(hex(blob));
        let mut c = self
            .connect_with(&h)
            .unwrap_or_else(|e| panic!("resume from a blob: {e}\n{}", daemon.log_text()));
        assert_eq!(Some(c.welcome().start_step), want.first().map(|s| s.step));
        let got = read(&mut c, want.len() as u64);
        for (g, w) in got.iter().zip(want) {
            assert_eq!(g.step, w.step);
            assert_eq!(g.domains, w.domains, "step {}", g.step);
            assert!(
                g.tokens == w.tokens,
                "step {}: the resumed stream differs from the first daemon's",
                g.step
            );
            assert_eq!(g.cursor, w.cursor, "step {}: cursor", g.step);
        }
        c
    }

    /// Connects as `job` with the cursor `blob` (`what` it is, for a failure), expecting
    /// `REFUSED cursor` with the daemon's journal as it was; returns the refusal's text.
    fn refused_blob(&self, job: &str, blob: &[u8], what: &str) -> String {
        let before = self.journal();
        let mut h = self.hello(job);
        h.cursor = Some(hex(blob));
        match self.connect_with(&h) {
            Err(ClientError::Refused { code, message }) => {
                assert_eq!(code, "cursor", "{what}: {message}");
                assert_eq!(
                    self.journal(),
                    before,
                    "{what}: the refusal changed the journal"
                );
                message
            }
            Err(e) => panic!("{what}: expected REFUSED cursor, got {e}"),
            Ok(_) => panic!("{what} was admitted; journal {:?}", self.journal()),
        }
    }

    /// The config as a TOML table.
    fn doc(&self) -> toml::Table {
        toml::from_str(&std::fs::read_to_string(&self.config).unwrap()).unwrap()
    }

    /// Replaces the config file atomically (write a sibling, rename over), as editors and
    /// config managers do, so a watcher never sees half a file.
    fn write_config(&self, text: &str) {
        let tmp = self.config.with_extension("toml.tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &self.config).unwrap();
    }

    /// The config's text with `[plan]` given by this schedule (and no `weights`).
    fn schedule_text(&self, schedule: toml::Value) -> String {
        let mut doc = self.doc();
        let plan = doc.get_mut("plan").unwrap().as_table_mut().unwrap();
        plan.remove("weights");
        plan.insert("schedule".into(), schedule);
        toml::to_string(&doc).unwrap()
    }

    /// Writes the config with `[plan]` given by this schedule.
    fn write_schedule(&self, schedule: toml::Value) {
        self.write_config(&self.schedule_text(schedule));
    }
}

/// The schedule "weights `a` until step `f - 1`, `b` from step `f` on": a step change
/// whose first difference from a constant `a` is exactly `f` (a two-point schedule would
/// ramp from step 0 on).
fn step_change(a: &BTreeMap<String, f64>, f: u64, b: &BTreeMap<String, f64>) -> toml::Value {
    assert!(f >= 2);
    let point = |step: u64, w: &BTreeMap<String, f64>| {
        let mut t = toml::Table::new();
        t.insert("step".into(), toml::Value::Integer(step as i64));
        let weights: toml::Table = w
            .iter()
            .map(|(k, v)| (k.clone(), toml::Value::Float(*v)))
            .collect();
        t.insert("weights".into(), toml::Value::Table(weights));
        toml::Value::Table(t)
    };
    toml::Value::Array(vec![point(0, a), point(f - 1, a), point(f, b)])
}

/// The config's (constant) weights.
fn base_weights(loaded: &LoadedPlan) -> BTreeMap<String, f64> {
    let points = loaded.plan.config().points();
    assert_eq!(
        points.len(),
        1,
        "the synthetic config has one schedule point"
    );
    points[0].weights.clone()
}

/// Weights that favour domain `heavy` strongly and leave the last domain out.
fn skewed(loaded: &LoadedPlan, heavy: usize) -> BTreeMap<String, f64> {
    let names = loaded.plan.domain_names();
    names
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let w = if i == heavy {
                8.0
            } else if i + 1 == names.len() {
                0.0
            } else {
                1.0
            };
            (n.to_string(), w)
        })
        .collect()
}

// ------------------------------------------------------------ reading and planning

/// One delivered step.
struct Step {
    step: u64,
    domains: Vec<u16>,
    tokens: Vec<u8>,
    cursor: Vec<u8>,
}

fn read(c: &mut Client, n: u64) -> Vec<Step> {
    (0..n)
        .map(|_| {
            let v = c.next_batch().unwrap_or_else(|e| panic!("next_batch: {e}"));
            Step {
                step: v.step,
                domains: v.domain.iter().map(|&d| d as u16).collect(),
                tokens: v.token_bytes().to_vec(),
                cursor: v.cursor.to_vec(),
            }
        })
        .collect()
}

/// The domain index of every row of steps `0..steps` under `plan`.
fn domains_of(plan: &Arc<Plan>, steps: u64) -> Vec<Vec<u16>> {
    let mut p = plan.start();
    (0..steps)
        .map(|_| p.next_batch().rows.iter().map(|r| r.domain).collect())
        .collect()
}

/// `plan` with `changes` as its journal.
fn with_changes(plan: &Arc<Plan>, changes: Vec<Change>) -> Arc<Plan> {
    Arc::new(plan.with_journal(changes).expect("the journal applies"))
}

/// Every delivered step's rows are the plan's.
fn assert_rows_follow(got: &[Step], want: &[Vec<u16>], what: &str) {
    for s in got {
        let w = want
            .get(s.step as usize)
            .unwrap_or_else(|| panic!("{what}: step {} not planned", s.step));
        assert_eq!(
            &s.domains, w,
            "{what}: step {} delivered domains {:?}, the plan says {:?}",
            s.step, s.domains, w
        );
    }
}

/// `got` delivered the steps of `want`, domains and tokens bit for bit.
fn assert_same_rows(got: &[Step], want: &[Step], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (g, w) in got.iter().zip(want) {
        assert_eq!((g.step, &g.domains), (w.step, &w.domains), "{what}");
        assert!(
            g.tokens == w.tokens,
            "{what}: step {}: tokens differ",
            g.step
        );
    }
}

/// Plans `a` and `b` put different domains somewhere in steps `from..to` (so a test that
/// tells them apart is not vacuous).
fn assert_plans_differ(a: &[Vec<u16>], b: &[Vec<u16>], from: u64, to: u64) {
    assert!(
        (from..to).any(|s| a[s as usize] != b[s as usize]),
        "test setup: the old and new weights give the same rows in steps {from}..{to}"
    );
}

/// Polls `probe` until it returns `Ok`; panics with its last `Err` after `limit`.
fn wait_for<T>(what: &str, limit: Duration, mut probe: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        match probe() {
            Ok(v) => return v,
            Err(last) => {
                assert!(
                    Instant::now() < deadline,
                    "{what}: not within {limit:?}; last seen: {last}"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

fn count(st: &Value, key: &str) -> u64 {
    st[key]
        .as_u64()
        .unwrap_or_else(|| panic!("status.{key} is not a count: {st}"))
}

/// Waits until the daemon has counted `reloads` applied and `failed` refused reloads.
fn wait_reloads(f: &Fixture, reloads: u64, failed: u64) -> Value {
    wait_for(
        &format!("status with reloads = {reloads}, failed_reloads = {failed}"),
        SETTLE,
        || {
            let st = f.status();
            if count(&st, "reloads") == reloads && count(&st, "failed_reloads") == failed {
                Ok(st)
            } else {
                Err(format!(
                    "reloads {}, failed_reloads {}, journal {}",
                    st["reloads"], st["failed_reloads"], st["journal"]
                ))
            }
        },
    )
}

/// Waits until the daemon has stopped publishing (every client idle, rings full) and
/// returns its first changeable step.
fn settled_first_changeable(f: &Fixture) -> u64 {
    let mut last = None;
    let mut since = Instant::now();
    wait_for("first_changeable_step to settle", SETTLE, || {
        let now = count(&f.status(), "first_changeable_step");
        if last != Some(now) {
            last = Some(now);
            since = Instant::now();
        }
        if since.elapsed() >= Duration::from_millis(300) {
            Ok(now)
        } else {
            Err(format!("first_changeable_step {now}"))
        }
    })
}

/// A journal entry's curve as plan points, columns in `names` order.
fn entry_points(e: &Value, names: &[&str]) -> Vec<(u64, Vec<f64>)> {
    e["points"]
        .as_array()
        .unwrap_or_else(|| panic!("journal entry without points: {e}"))
        .iter()
        .map(|p| {
            let step = p["step"].as_u64().unwrap_or_else(|| panic!("{e}"));
            let w = names
                .iter()
                .map(|n| p["weights"][*n].as_f64().unwrap_or(0.0))
                .collect();
            (step, w)
        })
        .collect()
}

/// The journal entry `e` has `source`, starts at `at`, and its curve is `want`'s.
fn check_entry(e: &Value, source: &str, at: u64, want: &Change, names: &[&str]) {
    assert_eq!(e["source"], source, "journal entry {e}");
    assert_eq!(e["at_step"], at, "journal entry {e}");
    // No skips in these configs: plan steps are trainer steps.
    assert_eq!(e["plan_step"], at, "journal entry {e}");
    let got = entry_points(e, names);
    assert_eq!(
        got.len(),
        want.points.len(),
        "journal entry {e} vs {want:?}"
    );
    for ((gs, gw), (ws, ww)) in got.iter().zip(&want.points) {
        assert_eq!(gs, ws, "journal entry {e} vs {want:?}");
        for (g, w) in gw.iter().zip(ww) {
            assert!((g - w).abs() < 1e-12, "journal entry {e} vs {want:?}");
        }
    }
}

// ------------------------------------------------------------ reloads

/// Starts a daemon with `serve`, reads 3 steps, rewrites the config with new weights from
/// step `at` on, calls `trigger`, and checks the change lands at `at` from `source`.
fn reload_lands_at_a_future_step(serve: &str, source: &str, trigger: impl Fn(&Serve)) {
    const AT: u64 = 20;
    const STEPS: u64 = 40;
    let f = fixture(serve);
    let d = f.serve();
    let old = f.load();
    let names = old.plan.domain_names();
    let old_rows = domains_of(&old.plan, STEPS);
    let mut c = f.connect(source);
    let early = read(&mut c, 3);
    assert_rows_follow(&early, &old_rows, "before the reload");
    let new_weights = skewed(&old, 0);
    f.write_schedule(step_change(&base_weights(&old), AT, &new_weights));
    trigger(&d);
    let st = wait_reloads(&f, 1, 0);
    let journal = st["journal"].as_array().cloned().unwrap_or_default();
    assert_eq!(journal.len(), 1, "one change: {journal:?}");
    let new = f.load();
    let want_change = old.plan.schedule_change(AT, &new.plan.config().points());
    check_entry(&journal[0], source, AT, &want_change, &names);
    assert_eq!(f.journal(), journal, "ctl journal == status journal");
    // The rows: the old plan's before AT, the new config's plan from AT on (they agree
    // before AT, so the new config's plan is the whole expected stream).
    let new_rows = domains_of(&new.plan, STEPS);
    assert_eq!(old_rows[..AT as usize], new_rows[..AT as usize]);
    assert_plans_differ(&old_rows, &new_rows, AT, STEPS);
    let late = read(&mut c, STEPS - 3);
    assert_eq!(late.last().map(|s| s.step), Some(STEPS - 1));
    assert_rows_follow(
        &late,
        &new_rows,
        &format!("after a {source} reload at {AT}"),
    );
    // The same from the plan with the journaled change.
    let journaled = domains_of(&with_changes(&old.plan, vec![want_change]), STEPS);
    assert_eq!(journaled, new_rows);
}

#[test]
fn file_watch_reload_applies_at_a_future_step() {
    reload_lands_at_a_future_step(
        "watch_config = true\nwatch_interval_ms = 200\n",
        "file",
        |_| {},
    );
}

/// The watcher read a config path replaced by a FIFO with a blocking open (waiting for a
/// writer that never came: no reload, SIGHUP included, ever ran again), and one replaced by
/// an endless file without bound. Now it is refused once as a reload, named in STATUS,
/// the running config stays, and a valid file put back is read again.
#[test]
fn a_config_replaced_by_a_fifo_is_refused_once_and_the_watch_goes_on() {
    let f = fixture("watch_config = true\nwatch_interval_ms = 200\n");
    let mut d = f.serve();
    let good = std::fs::read_to_string(&f.config).unwrap();
    std::fs::remove_file(&f.config).unwrap();
    let c = std::ffi::CString::new(f.config.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    wait_reloads(&f, 0, 1);
    // Recorded just after it is counted: waited for, as below.
    wait_for("the FIFO's refusal recorded", SETTLE, || {
        let last = f.status()["last_reload"].clone();
        let message = last["message"].as_str().unwrap_or_default();
        match last["ok"] == false && message.contains("it is a FIFO, not a regular file") {
            true => Ok(()),
            false => Err(last.to_string()),
        }
    });
    // Refused once, not at every tick.
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(count(&f.status(), "failed_reloads"), 1);
    assert!(d.alive(), "{}", d.log_text());
    std::fs::remove_file(&f.config).unwrap();
    f.write_config(&good);
    wait_reloads(&f, 1, 1);
    // The outcome is recorded just after the reload is counted: waited for, not read in
    // the same look (a CI run read the count with the FIFO's outcome still there).
    wait_for("the good file's reload recorded", SETTLE, || {
        let st = f.status();
        match st["last_reload"]["ok"] == true {
            true => Ok(()),
            false => Err(st["last_reload"].to_string()),
        }
    });
}

#[test]
fn sighup_reload() {
    reload_lands_at_a_future_step("watch_config = false\n", "sighup", |d| {
        d.signal(libc::SIGHUP)
    });
}

#[test]
fn a_broken_config_reload_is_refused_and_old_weights_stay() {
    const AT: u64 = 24;
    const STEPS: u64 = 44;
    let f = fixture("watch_config = false\n");
    let mut d = f.serve();
    let old = f.load();
    let names = old.plan.domain_names();
    let a = base_weights(&old);
    let good_text = std::fs::read_to_string(&f.config).unwrap();
    let old_rows = domains_of(&old.plan, STEPS);
    let mut c = f.connect("broken");
    let mut got = read(&mut c, 3);
    let mut unknown = skewed(&old, 0);
    unknown.insert("no_such_domain".into(), 1.0);
    let mut negative = skewed(&old, 0);
    negative.insert(names[1].to_string(), -1.0);
    let broken = [
        ("malformed TOML", format!("{good_text}\n[plan\n")),
        (
            "unknown domain",
            f.schedule_text(step_change(&a, AT, &unknown)),
        ),
        (
            "negative weight",
            f.schedule_text(step_change(&a, AT, &negative)),
        ),
    ];
    for (i, (what, text)) in broken.iter().enumerate() {
        f.write_config(text);
        d.signal(libc::SIGHUP);
        let st = wait_reloads(&f, 0, i as u64 + 1);
        assert_eq!(
            st["journal"],
            json!([]),
            "{what}: the journal changed: {st}"
        );
        assert!(d.alive(), "{what}: the daemon died:\n{}", d.log_text());
        // The stream is still the old plan's.
        got.extend(read(&mut c, 3));
        assert_rows_follow(&got, &old_rows, &format!("after the refused {what}"));
    }
    let log = d.log_text();
    for (what, needle) in [
        ("unknown domain", "no_such_domain"),
        ("negative weight", "-1"),
    ] {
        assert!(
            log.contains(needle),
            "the log does not name the {what} ({needle}):\n{log}"
        );
    }
    // Fixed: the good change lands, from AT.
    let new_weights = skewed(&old, 1);
    f.write_schedule(step_change(&a, AT, &new_weights));
    d.signal(libc::SIGHUP);
    let st = wait_reloads(&f, 1, 3);
    let journal = st["journal"].as_array().cloned().unwrap_or_default();
    assert_eq!(journal.len(), 1, "{journal:?}");
    let new = f.load();
    let want_change = old.plan.schedule_change(AT, &new.plan.config().points());
    check_entry(&journal[0], "sighup", AT, &want_change, &names);
    let new_rows = domains_of(&new.plan, STEPS);
    assert_plans_differ(&old_rows, &new_rows, AT, STEPS);
    let done = got.last().unwrap().step + 1;
    let rest = read(&mut c, STEPS - done);
    assert_rows_follow(&rest, &new_rows, "after the fixed reload");
}

/// Reads 8 steps as job "late" (its ring then stalls a few steps on), waits for the first
/// changeable step to settle, and writes a step change at `at` (from `old`'s weights to
/// `skewed(old, 0)`) into the config. Returns the client, the steps read and the first
/// changeable step.
fn read_8_then_change_at(f: &Fixture, old: &LoadedPlan, at: u64) -> (Client, Vec<Step>, u64) {
    let mut c = f.connect("late");
    let got = read(&mut c, 8);
    let first = settled_first_changeable(f);
    assert!(
        first >= 8,
        "8 steps were handed out; first_changeable_step {first}"
    );
    f.write_schedule(step_change(&base_weights(old), at, &skewed(old, 0)));
    (c, got, first)
}

#[test]
fn a_late_file_change_is_refused() {
    const LATE: u64 = 2;
    const STEPS: u64 = 30;
    let corpus = corpus();
    // Default late_changes ("refuse"), triggered by SIGHUP.
    {
        let f = fixture_on(&corpus, "refuse", "watch_config = false\n");
        let mut d = f.serve();
        let old = f.load();
        let old_rows = domains_of(&old.plan, STEPS);
        let (mut c, mut got, first) = read_8_then_change_at(&f, &old, LATE);
        d.signal(libc::SIGHUP);
        let st = wait_reloads(&f, 0, 1);
        assert_eq!(st["journal"], json!([]), "{st}");
        assert!(d.alive(), "the daemon died:\n{}", d.log_text());
        // The log says why and names the first step that could still change. The hub
        // counts the refusal (what `wait_reloads` saw) just before the reload path logs
        // it, so the line may land a moment later: look for it within SETTLE.
        let names_it_in = |log: &str| {
            log.lines().any(|l| {
                let lower = l.to_lowercase();
                (lower.contains("late") || lower.contains("refus"))
                    && l.split(|ch: char| !ch.is_ascii_digit())
                        .any(|w| w == first.to_string())
            })
        };
        let deadline = Instant::now() + SETTLE;
        let mut log = d.log_text();
        while !names_it_in(&log) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
            log = d.log_text();
        }
        let names_it = names_it_in(&log);
        assert!(
            names_it,
            "no log line refuses the late change naming first changeable step {first}:\n{log}"
        );
        got.extend(read(&mut c, STEPS - 8));
        assert_rows_follow(&got, &old_rows, "after a refused late change");
    }
    // late_changes = "next", triggered by the file watcher: moved to the first
    // changeable step.
    {
        let f = fixture_on(
            &corpus,
            "next",
            "late_changes = \"next\"\nwatch_config = true\nwatch_interval_ms = 200\n",
        );
        let d = f.serve();
        let old = f.load();
        let names = old.plan.domain_names();
        let old_rows = domains_of(&old.plan, STEPS);
        let (mut c, mut got, first) = read_8_then_change_at(&f, &old, LATE);
        let st = wait_reloads(&f, 1, 0);
        let journal = st["journal"].as_array().cloned().unwrap_or_default();
        assert_eq!(journal.len(), 1, "{st}");
        let new = f.load();
        let want_change = old.plan.schedule_change(first, &new.plan.config().points());
        check_entry(&journal[0], "file", first, &want_change, &names);
        let moved = domains_of(&with_changes(&old.plan, vec![want_change]), STEPS);
        assert_plans_differ(&old_rows, &moved, first, STEPS);
        got.extend(read(&mut c, STEPS - 8));
        assert_rows_follow(
            &got,
            &moved,
            &format!("after a late change moved to {first}"),
        );
        drop(d);
    }
}

// ------------------------------------------------------------ several daemons

#[test]
fn two_daemons_stay_identical_across_a_change() {
    const AT: u64 = 12;
    const STEPS: u64 = 30;
    let corpus = corpus();
    let fs: Vec<Fixture> = ["a", "b", "plain"]
        .iter()
        .map(|n| fixture_on(&corpus, n, "watch_config = false\n"))
        .collect();
    let daemons: Vec<Serve> = fs.iter().map(Fixture::serve).collect();
    let loaded = fs[0].load();
    let mut clients: Vec<Client> = fs.iter().map(|f| f.connect("twin")).collect();
    // The cursor of a step published after the change carries the journal, one published
    // before does not: both daemons must have published the same steps when the change
    // lands. Holding 2 steps, a client releases nothing during the first two, so each
    // ring holds exactly steps 0..slots (a release-page client otherwise releases step 0
    // at once, and a daemon reads its page when it next looks).
    for c in &mut clients {
        c.set_hold(2);
    }
    let mut got: Vec<Vec<Step>> = clients.iter_mut().map(|c| read(c, 2)).collect();
    let weights: BTreeMap<String, f64> = loaded
        .plan
        .domain_names()
        .iter()
        .enumerate()
        .map(|(i, n)| (n.to_string(), if i == 2 { 0.7 } else { 0.1 }))
        .collect();
    for f in &fs[..2] {
        let r = f.set_weights(&weights, AT);
        assert_eq!(r["ok"], true, "{}: {r}", f.socket.display());
        assert_eq!(r["applied_step"], AT, "{r}");
        assert_eq!(r["moved"], false, "{r}");
    }
    assert_eq!(fs[0].journal(), fs[1].journal(), "the two journals differ");
    assert_eq!(fs[2].journal(), Vec::<Value>::new());
    for (c, g) in clients.iter_mut().zip(&mut got) {
        g.extend(read(c, STEPS - 2));
        assert_eq!(g.last().map(|s| s.step), Some(STEPS - 1));
    }
    for (a, b) in got[0].iter().zip(&got[1]) {
        assert_eq!(a.step, b.step);
        assert!(
            a.tokens == b.tokens,
            "step {}: the two daemons given the same change delivered different tokens",
            a.step
        );
        assert_eq!(a.domains, b.domains, "step {}", a.step);
        assert_eq!(a.cursor, b.cursor, "step {}: cursors differ", a.step);
    }
    for (a, p) in got[0].iter().zip(&got[2]) {
        if a.step < AT {
            assert!(
                a.tokens == p.tokens,
                "step {} (before the change) differs from the unchanged daemon",
                a.step
            );
        }
    }
    assert!(
        got[0]
            .iter()
            .zip(&got[2])
            .any(|(a, p)| a.step >= AT && a.tokens != p.tokens),
        "the change at step {AT} changed no delivered token"
    );
    drop(daemons);
}

/// Weights of 0.7 for domain `heavy` and 0.1 for the others.
fn favouring(names: &[String], heavy: usize) -> BTreeMap<String, f64> {
    let w = |i: usize| if i == heavy { 0.7 } else { 0.1 };
    (names.iter().enumerate())
        .map(|(i, n)| (n.clone(), w(i)))
        .collect()
}

/// Runs `job` on a fresh daemon on `f` through step `last`, with a `ctl set-weights`
/// from step `at` sent after its second step (weights favouring domain 1), then stops
/// the daemon: the steps it delivered (each with its cursor blob) and its journal.
fn run_with_a_change(f: &Fixture, job: &str, at: u64, last: u64) -> (Vec<Step>, Vec<Value>) {
    let weights = favouring(&f.domain_names(), 1);
    let a = f.serve();
    let mut c = f.connect(job);
    let mut got = read(&mut c, 2);
    let r = f.set_weights(&weights, at);
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["applied_step"], at, "{r}");
    got.extend(read(&mut c, last + 1 - 2));
    let journal = f.journal();
    assert_eq!(journal.len(), 1, "{journal:?}");
    assert_eq!(journal[0]["source"], "ctl");
    assert!(got.iter().enumerate().all(|(i, s)| s.step == i as u64));
    drop(c);
    drop(a);
    let _ = std::fs::remove_file(&f.socket);
    (got, journal)
}

#[test]
fn resume_after_a_change_is_exact() {
    const AT: u64 = 10;
    const KEEP: u64 = 15;
    const LAST: u64 = 30;
    let f = fixture("watch_config = false\n");
    // Daemon A: the change at AT, then steps 0..=LAST; keep the blob of step KEEP.
    let (a_steps, a_journal) = run_with_a_change(&f, "resume", AT, LAST);
    let blob = a_steps[KEEP as usize].cursor.clone();
    // Daemon B: same config, never told of the change; the blob brings it.
    {
        let b = f.serve();
        assert_eq!(f.journal(), Vec::<Value>::new());
        // A client with the blob that is refused for another reason (its replica is
        // already connected) leaves the daemon's journal alone.
        {
            let mut taken = f.hello("resume");
            taken.replica = "dup".into();
            let _holder = f.connect_with(&taken).expect("a fresh client joins");
            let mut dup = f.hello("resume");
            dup.replica = "dup".into();
            dup.cursor = Some(hex(&blob));
            let refused = f.connect_with(&dup).err().map(|e| e.to_string());
            assert!(
                refused.is_some(),
                "a second client as replica dup was admitted"
            );
            assert_eq!(f.journal(), Vec::<Value>::new(), "{refused:?}");
        }
        let _ = f.wait_no_job("resume");
        let c = f.resume_exactly(&b, "resume", &blob, &a_steps[KEEP as usize + 1..]);
        let journal = f.status()["journal"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        assert_eq!(
            journal.len(),
            1,
            "B adopted no change from the blob: {journal:?}"
        );
        assert_eq!(journal[0]["source"], "cursor", "{journal:?}");
        assert_eq!(journal[0]["at_step"], AT, "{journal:?}");
        assert_eq!(journal[0]["points"], a_journal[0]["points"], "{journal:?}");
        drop(c);
        drop(b);
    }
    let _ = std::fs::remove_file(&f.socket);
    // Daemon C: a different change at AT first; the blob's journal conflicts.
    {
        let c_daemon = f.serve();
        let other = favouring(&f.domain_names(), 3);
        let r = f.set_weights(&other, AT);
        assert_eq!(r["ok"], true, "{r}");
        let what = "a blob whose journal conflicts with the daemon's";
        let message = f.refused_blob("resume", &blob, what);
        let m = message.to_lowercase();
        assert!(
            m.contains("journal") || m.contains("change"),
            "the refusal does not say the journals conflict: {message}\n{}",
            c_daemon.log_text()
        );
    }
}

/// A restarted daemon (journal: the config's) reached first by a blob-less client of
/// another job (an eval job) that reads past the step of the training job's live change:
/// while that job runs, the training job's blob is refused `cursor`, naming the job that
/// holds the journal; once it has left, the blob's journal is adopted and the training
/// job resumes bit for bit. The daemon refused it for good before (its highest published
/// step outlived the job that read it), so the run could not resume without yet another
/// restart. A blob-less client of another job that comes after the training job's rank
/// gets the training job's changes (one journal per daemon), and a blob of the run
/// saved before the change resumes under the adopted journal.
#[test]
fn a_blob_is_adopted_once_the_job_served_under_the_configs_journal_has_left() {
    const AT: u64 = 10;
    const KEEP: u64 = 15;
    const LAST: u64 = 30;
    /// Steps the eval job reads: past AT, and past what the training job publishes.
    const EVAL: u64 = LAST + 2 * SLOTS + 2;
    let f = fixture("watch_config = false\n");
    let (a_steps, a_journal) = run_with_a_change(&f, "train", AT, LAST);
    let blob = a_steps[KEEP as usize].cursor.clone();
    let config_rows = domains_of(&f.load().plan, EVAL);
    let a_rows: Vec<Vec<u16>> = a_steps.iter().map(|s| s.domains.clone()).collect();
    assert_plans_differ(&config_rows, &a_rows, AT, LAST + 1);
    let b = f.serve();
    // The eval job is served past AT under the config's journal.
    let mut eval = f.connect("eval");
    let got = read(&mut eval, EVAL);
    assert_rows_follow(&got, &config_rows, "the eval job before the blob");
    let eval_blob = got[EVAL as usize - 1].cursor.clone();
    let message = f.refused_blob("train", &blob, "a blob rewriting steps a running job read");
    assert!(
        message.contains("\"eval\"") && message.contains("stop that job"),
        "the refusal does not name the job running under the daemon's journal: {message}"
    );
    drop(eval);
    let _ = f.wait_no_job("eval");
    let c = f.resume_exactly(&b, "train", &blob, &a_steps[KEEP as usize + 1..]);
    let journal = f.journal();
    assert_eq!(
        journal.len(),
        1,
        "the blob's journal was not adopted: {journal:?}"
    );
    assert_eq!(journal[0]["source"], "cursor", "{journal:?}");
    assert_eq!(journal[0]["points"], a_journal[0]["points"], "{journal:?}");
    // The steps the eval job read under the replaced journal no longer bound changes.
    let fc = settled_first_changeable(&f);
    assert!(
        fc <= LAST + 1 + SLOTS,
        "the first changeable step is {fc}, past the training job's ring"
    );
    // The eval job's own blob no longer matches the journal in force.
    f.refused_blob("eval", &eval_blob, "a blob of the replaced journal");
    // The reverse order: another job arriving after the training job's rank gets its
    // changes, row for row and byte for byte.
    let mut eval = f.connect("eval");
    let got = read(&mut eval, LAST + 1);
    assert_same_rows(&got, &a_steps, "the eval job after the blob");
    // A blob of the run saved before the change reached the daemon (an older rank's, or
    // an older checkpoint's) resumes under the adopted journal, as the run went on.
    let journal_of = |b: &[u8]| millrace::plan::cursor::decode(b).map(|d| d.journal.len());
    let old = &a_steps[1].cursor;
    assert_eq!(
        (journal_of(old).ok(), journal_of(&blob).ok()),
        (Some(0), Some(1))
    );
    // Its cursors carry the adopted change, which the first daemon's lacked.
    let mut h = f.hello("train-older");
    h.cursor = Some(hex(old));
    let mut older = f.connect_with(&h).expect("the older blob resumes");
    let got = read(&mut older, LAST + 1 - 2);
    assert_same_rows(&got, &a_steps[2..], "the older blob's job");
    assert_eq!(f.journal().len(), 1);
    drop((c, eval, older));
}

/// Ranks restored from blobs on either side of a live change's arrival, the one lacking
/// it first: its ring, not yet past the change's step, is regenerated under the journal
/// the other blob brings, so both follow the run without restart row for row. Past that
/// step, the blob carrying the change waits until that rank has left.
#[test]
fn a_rank_lacking_the_change_follows_the_journal_a_later_rank_brings() {
    const AT: u64 = 10;
    const LAST: u64 = 30;
    let f = fixture("watch_config = false\n");
    let (a_steps, _) = run_with_a_change(&f, "train", AT, LAST);
    let journal_of = |b: &[u8]| millrace::plan::cursor::decode(b).map(|d| d.journal.len());
    let (old, new) = (&a_steps[1].cursor, &a_steps[AT as usize + 2].cursor);
    assert_eq!(
        (journal_of(old).ok(), journal_of(new).ok()),
        (Some(0), Some(1))
    );
    let _d = f.serve();
    let mut h = f.hello("older");
    h.cursor = Some(hex(old));
    let mut older = f.connect_with(&h).expect("the older blob resumes");
    // Its ring fills its slots under the config's journal, short of AT.
    assert!(settled_first_changeable(&f) < AT);
    let mut h = f.hello("newer");
    h.cursor = Some(hex(new));
    let mut newer = f
        .connect_with(&h)
        .expect("the newer blob's journal is adopted");
    assert_eq!(f.journal().len(), 1);
    let got = read(&mut older, LAST - 1);
    assert_same_rows(&got, &a_steps[2..], "the rank that lacked the change");
    let got = read(&mut newer, LAST - AT - 2);
    assert_same_rows(
        &got,
        &a_steps[AT as usize + 3..],
        "the rank that brought it",
    );
    drop((older, newer, _d));
    let _ = std::fs::remove_file(&f.socket);
    // Once the rank lacking it has read past AT, the blob carrying it is refused while
    // that rank is connected; after it left, the blob is adopted (no daemon restart) and
    // the older blob resumes under it. The daemon refused the blob for good before.
    let d = f.serve();
    let mut h = f.hello("older");
    h.cursor = Some(hex(old));
    let mut older = f.connect_with(&h).expect("the older blob resumes");
    let got = read(&mut older, AT + 2);
    assert_eq!(got.last().map(|s| s.step), Some(AT + 3));
    let message = f.refused_blob("newer", new, "a blob rewriting steps a connected rank read");
    assert!(message.contains("\"older\""), "{message}");
    drop(older);
    let _ = f.wait_no_job("older");
    let newer = f.resume_exactly(&d, "newer", new, &a_steps[AT as usize + 3..]);
    let mut h = f.hello("older");
    h.cursor = Some(hex(old));
    let mut older = f.connect_with(&h).expect("the older blob resumes again");
    let got = read(&mut older, LAST - 1);
    assert_same_rows(
        &got,
        &a_steps[2..],
        "the rank that lacked the change, again",
    );
    drop((older, newer));
}

/// The HELLO of rank `rank` of 2 of job "train" (half the rows each), resuming from
/// `blob`: the ranks of the tests of a change one rank's blob lacks.
fn train_rank(rank: u32, blob: &[u8]) -> Hello {
    let mut h = Hello::new(rank, 2, ROWS / 2, 1);
    h.job = "train".into();
    h.cursor = Some(hex(blob));
    h
}

/// Two dp ranks of one job restored from blobs on either side of a live change's
/// arrival, the one lacking it first and read past the change's step: the rank whose
/// blob carries the change is served and the journal adopted; the other rank's ring
/// stops at the change's step (`ERROR cursor`, saying to reconnect), and reconnected
/// from its blob it follows the run with the change, as the rank that brought it does.
/// The rank carrying the change was refused before, with the stale rank connected, and
/// on every restart in which the stale rank came first.
#[test]
fn a_rank_lacking_the_change_stops_when_a_rank_of_its_job_brings_it() {
    const AT: u64 = 10;
    const LAST: u64 = 30;
    const HALF: usize = (ROWS / 2) as usize;
    let f = fixture("watch_config = false\n");
    let (a_steps, _) = run_with_a_change(&f, "train", AT, LAST);
    let (old, new) = (&a_steps[1].cursor, &a_steps[AT as usize + 2].cursor);
    let config_rows = domains_of(&f.load().plan, LAST + 1);
    let a_rows: Vec<Vec<u16>> = a_steps.iter().map(|s| s.domains.clone()).collect();
    let half = |rows: &[u16], rank: usize| rows[rank * HALF..(rank + 1) * HALF].to_vec();
    assert!(
        (AT..AT + 3).any(|s| half(&config_rows[s as usize], 0) != half(&a_rows[s as usize], 0)),
        "test setup: rank 0's rows do not tell the journals apart in steps {AT}..{}",
        AT + 3
    );
    // Each rank's steps are the run's: its half of the rows, and the run's cursor (which
    // carries the change also where the first daemon's, published before it, did not).
    let journal_of = |b: &[u8]| millrace::plan::cursor::decode(b).map(|d| d.journal.len());
    let check = |got: &[Step], rank: usize, want: &[Step], what: &str| {
        assert_eq!(got.len(), want.len(), "{what}");
        for (g, w) in got.iter().zip(want) {
            assert_eq!(g.step, w.step, "{what}");
            assert_eq!(g.domains, half(&w.domains, rank), "{what}: step {}", g.step);
            match journal_of(&w.cursor).ok() {
                Some(1) => assert!(g.cursor == w.cursor, "{what}: step {}: cursor", g.step),
                _ => assert_eq!(
                    journal_of(&g.cursor).ok(),
                    Some(1),
                    "{what}: step {}",
                    g.step
                ),
            }
        }
    };
    let d = f.serve();
    let mut older = f
        .connect_with(&train_rank(0, old))
        .expect("the older blob resumes");
    let got = read(&mut older, AT + 2);
    assert_eq!(got.last().map(|s| s.step), Some(AT + 3));
    for s in &got {
        assert_eq!(s.domains, half(&config_rows[s.step as usize], 0));
    }
    let mut newer = f.connect_with(&train_rank(1, new)).unwrap_or_else(|e| {
        panic!(
            "the rank carrying the change was refused: {e}\n{}",
            d.log_text()
        )
    });
    let journal = f.journal();
    assert_eq!(journal.len(), 1, "{journal:?}");
    assert_eq!(journal[0]["source"], "cursor", "{journal:?}");
    // The stale rank reads no step from AT on: its ring stops, saying why and what to do.
    let why = loop {
        match older.next_batch() {
            Ok(v) => assert!(
                v.step < AT,
                "rank 0 read step {} without the change",
                v.step
            ),
            Err(e) => break e,
        }
    };
    match &why {
        ClientError::Daemon { code, message } => {
            assert_eq!(code, "cursor", "{message}");
            assert!(
                message.contains(&format!("step {AT}")) && message.contains("reconnect"),
                "{message}"
            );
        }
        e => panic!("rank 0 ended with {e}, not ERROR cursor"),
    }
    drop(older);
    let got = read(&mut newer, LAST - AT - 2);
    check(
        &got,
        1,
        &a_steps[AT as usize + 3..],
        "the rank that brought the change",
    );
    // Reconnected from its blob (before the change's step), rank 0 follows it.
    let mut older = wait_for("rank 0 to reconnect", Duration::from_secs(10), || {
        f.connect_with(&train_rank(0, old))
            .map_err(|e| e.to_string())
    });
    let got = read(&mut older, LAST - 1);
    check(
        &got,
        0,
        &a_steps[2..],
        "the rank that lacked the change, reconnected",
    );
    assert_eq!(f.journal().len(), 1);
    drop((older, newer, d));
}

/// The stale rank of the test above, short of the change's step when the other rank
/// brings the change: its ring stops at that step all the same, taking back the steps it
/// published from there, but no step it handed out was wrong, so the error is
/// `StaleRing` (transient), and a reconnect from its last blob reads the run's steps,
/// the change included. It was `Daemon { cursor }`, on which a trainer gives up. The
/// Python client reconnects by itself (tests/python/test_client_faults.py).
#[test]
fn a_stale_rank_short_of_the_change_reconnects_and_follows_it() {
    const AT: u64 = 10;
    const LAST: u64 = 24;
    const HALF: usize = (ROWS / 2) as usize;
    let f = fixture("watch_config = false\n");
    let (a_steps, _) = run_with_a_change(&f, "train", AT, LAST);
    let (old, new) = (&a_steps[1].cursor, &a_steps[AT as usize + 2].cursor);
    let d = f.serve();
    let mut older = f
        .connect_with(&train_rank(0, old))
        .expect("the older blob resumes");
    let got = read(&mut older, AT - 3);
    assert_eq!(got.last().map(|s| s.step), Some(AT - 2));
    // Its ring runs ahead past the change's step, without the change.
    wait_for("rank 0's ring past the change's step", SETTLE, || {
        let st = f.status();
        match st["jobs"][0]["rings"][0]["published_step"].as_u64() {
            Some(p) if p > AT => Ok(()),
            _ => Err(st.to_string()),
        }
    });
    let _newer = f.connect_with(&train_rank(1, new)).unwrap_or_else(|e| {
        panic!(
            "the rank carrying the change was refused: {e}\n{}",
            d.log_text()
        )
    });
    // The step before the change's is still rank 0's to read; then its ring stops.
    assert_eq!(read(&mut older, 1)[0].step, AT - 1);
    let e = match older.next_batch() {
        Err(e) => e,
        Ok(v) => panic!("rank 0 read step {} without the change", v.step),
    };
    match &e {
        ClientError::StaleRing { message } => {
            assert!(message.contains(&format!("step {AT}")), "{message}")
        }
        e => panic!("rank 0 ended with {e}, not a stale ring"),
    }
    assert!(e.is_transient(), "{e}");
    older
        .reconnect(Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("rank 0's reconnect: {e}\n{}", d.log_text()));
    let got = read(&mut older, LAST + 1 - AT);
    for (g, w) in got.iter().zip(&a_steps[AT as usize..]) {
        assert_eq!(g.step, w.step);
        assert_eq!(g.domains, w.domains[..HALF], "step {}", g.step);
    }
    assert_eq!(f.journal().len(), 1);
}

/// A TP peer whose blob carries a live change, arriving at its rank's ring that a peer
/// without a blob started and that was served past the change's step: the change is
/// adopted and that ring stops (`ERROR cursor`); the peer is refused `busy` meanwhile,
/// its retry is served, and the other peer rejoins; both read the run's steps.
#[test]
fn a_tp_peer_bringing_a_change_stops_its_rings_stale_stream_and_is_served_on_retry() {
    const AT: u64 = 10;
    const LAST: u64 = 30;
    let f = fixture("watch_config = false\n");
    let (a_steps, _) = run_with_a_change(&f, "train", AT, LAST);
    let start = AT + 3;
    let new = &a_steps[start as usize - 1].cursor;
    let peer = |replica: &str, blob: Option<&[u8]>| {
        let mut h = f.hello("train");
        h.replicas = 2;
        h.replica = replica.into();
        h.start_step = Some(start);
        h.cursor = blob.map(hex);
        h
    };
    let d = f.serve();
    let mut a = f
        .connect_with(&peer("a", None))
        .expect("a fresh peer starts");
    // Its ring streams at once, past AT, under the config's journal.
    wait_for("the ring to publish", SETTLE, || {
        let st = f.status();
        match st["jobs"][0]["rings"][0]["published_step"].as_u64() {
            Some(p) if p > start => Ok(()),
            _ => Err(st.to_string()),
        }
    });
    match f.connect_with(&peer("b", Some(new))) {
        Err(ClientError::Refused { code, message }) => {
            assert_eq!(code, "busy", "{message}");
            assert!(message.contains("retry"), "{message}");
        }
        Err(e) => panic!("peer b: {e}\n{}", d.log_text()),
        Ok(_) => panic!("peer b joined a ring serving another journal"),
    }
    assert_eq!(f.journal().len(), 1, "the change was not adopted");
    // Peer a handed out no step: a reconnect goes on with the change.
    match a.next_batch().map(|v| v.step) {
        Err(e @ ClientError::StaleRing { .. }) => assert!(e.is_transient(), "{e}"),
        r => panic!("peer a read on: {r:?}"),
    }
    drop(a);
    let mut b = wait_for("peer b's retry", Duration::from_secs(10), || {
        f.connect_with(&peer("b", Some(new)))
            .map_err(|e| e.to_string())
    });
    let mut a = f.connect_with(&peer("a", None)).expect("peer a rejoins");
    // Peers of one ring read in step (a slot is free once both released it).
    for w in &a_steps[start as usize..] {
        for (c, what) in [(&mut a, "peer a"), (&mut b, "peer b")] {
            let g = &read(c, 1)[0];
            assert_eq!((g.step, &g.domains), (w.step, &w.domains), "{what}");
            assert!(g.cursor == w.cursor, "{what}: step {}: cursor", g.step);
        }
    }
    drop((a, b, d));
}

/// A run of 300 domains. Its cursor blobs are longer than a 64 KiB frame holds as hex,
/// its `status` longer than one such frame, and a journal of a fixed 16 KiB held 5
/// `set-weights` of 400 domains and no stage: here a dozen weight changes and a stage are
/// taken live, `status` and `journal` answer, and a blob from after the stage switch
/// resumes bit for bit on a fresh daemon.
#[test]
fn three_hundred_domains_change_live_report_and_resume() {
    const DOMAINS: usize = 300;
    // Every change lies past what the 4-slot ring can have published after 2 reads.
    const FIRST_CHANGE: u64 = 10;
    const STAGE_AT: u64 = 30;
    const KEEP: u64 = 35;
    const LAST: u64 = 40;
    let corpus = Rc::new(common::corpus(3_000_000, DOMAINS, 11, 1_000_000));
    let f = fixture_on(&corpus, "many", "");
    let names = f.domain_names();
    assert_eq!(names.len(), DOMAINS);
    let (a_steps, blob) = {
        let a = f.serve();
        let mut c = f.connect("many");
        let mut got = read(&mut c, 2);
        for k in 0..12 {
            let w: BTreeMap<String, f64> = names
                .iter()
                .enumerate()
                .map(|(i, n)| (n.clone(), if i == k { 50.0 } else { 1.0 }))
                .collect();
            let r = f.set_weights(&w, FIRST_CHANGE + k as u64);
            assert_eq!(r["ok"], true, "set_weights #{k}: {r}");
        }
        let r = f.req(
            json!({"protocol": 1, "op": "set_stage", "seq_len": 2 * SEQ_LEN,
            "global_batch_rows": ROWS / 2, "at_step": STAGE_AT, "late": "refuse"}),
        );
        assert_eq!(r["ok"], true, "set_stage: {r}\n{}", a.log_text());
        let st = f.status();
        assert!(
            st.to_string().len() > millrace::wire::MAX_FRAME,
            "status is no longer than one small frame; the test lost its point"
        );
        assert_eq!(st["journal"].as_array().map(Vec::len), Some(13), "{st}");
        assert_eq!(f.journal().len(), 13);
        got.extend(read(&mut c, LAST + 1 - 2));
        assert_eq!(got[STAGE_AT as usize].domains.len(), ROWS as usize / 2);
        let blob = got[KEEP as usize].cursor.clone();
        assert!(
            2 * blob.len() > millrace::wire::MAX_FRAME,
            "a blob of {} bytes fits a small frame as hex; the test lost its point",
            blob.len()
        );
        drop(c);
        drop(a);
        (got, blob)
    };
    let _ = std::fs::remove_file(&f.socket);
    let b = f.serve();
    let _c = f.resume_exactly(&b, "many", &blob, &a_steps[KEEP as usize + 1..]);
    assert_eq!(f.journal().len(), 13, "B did not adopt the blob's journal");
}

/// A controller that moves the mixture every step for hundreds of steps (online data
/// mixing): the journal held 256 changes whatever the room. With `[serve] live_changes`
/// sized for it, 600 changes are taken and a blob taken after them resumes bit for bit
/// on a fresh daemon; with the default room the daemon refuses, naming why, and keeps
/// the changes it has.
#[test]
fn a_controller_makes_hundreds_of_changes_when_the_room_is_reserved() {
    const CHANGES: u64 = 600;
    const FIRST_CHANGE: u64 = 10;
    let corpus = corpus();
    let names = fixture_on(&corpus, "probe", "").domain_names();
    let weights = |k: u64| -> BTreeMap<String, f64> {
        names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.clone(), 1.0 + ((k as usize + i) % 7) as f64))
            .collect()
    };
    // The default room: refused before the 600th, with the reason, nothing lost.
    {
        let f = fixture_on(&corpus, "small", "");
        let _d = f.serve();
        let mut taken = 0;
        let refusal = (0..CHANGES).find_map(|k| {
            let r = f.set_weights(&weights(k), FIRST_CHANGE + k);
            if r["ok"] == true {
                taken += 1;
                None
            } else {
                Some(r)
            }
        });
        let r = refusal.expect("the default room took 600 changes");
        assert!(
            r["message"]
                .as_str()
                .unwrap_or_default()
                .contains("would outgrow the cursor blob"),
            "{r}"
        );
        assert!(taken > 256, "only {taken} changes fit");
        assert_eq!(f.journal().len(), taken);
    }
    let f = fixture_on(&corpus, "large", "live_changes = 700\n");
    let last = FIRST_CHANGE + CHANGES + 5;
    let (a_steps, blob) = {
        let _a = f.serve();
        for k in 0..CHANGES {
            let r = f.set_weights(&weights(k), FIRST_CHANGE + k);
            assert_eq!(r["ok"], true, "change #{k}: {r}");
        }
        let mut c = f.connect("ctl");
        let got = read(&mut c, last + 1);
        let blob = got[last as usize - 2].cursor.clone();
        (got, blob)
    };
    let _ = std::fs::remove_file(&f.socket);
    let b = f.serve();
    let _c = f.resume_exactly(&b, "ctl", &blob, &a_steps[last as usize - 1..]);
    assert_eq!(
        f.journal().len(),
        CHANGES as usize,
        "B did not adopt the journal"
    );
}

// ------------------------------------------------------------ metrics

/// A port nothing listens on right now.
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// One sample: name, labels, value.
type Sample = (String, BTreeMap<String, String>, f64);

/// GET /metrics (HTTP/1.0, so the body is plain) and parse the text format.
fn scrape(addr: &str) -> Result<Vec<Sample>, String> {
    let body = scrape_text(addr)?;
    let mut out = Vec::new();
    for line in body.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .ok_or_else(|| format!("bad line {line:?}"))?;
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().map_err(|e| format!("{line:?}: {e}"))?,
        };
        let (name, labels) = match series.split_once('{') {
            None => (series.to_string(), BTreeMap::new()),
            Some((name, rest)) => {
                let rest = rest
                    .strip_suffix('}')
                    .ok_or(format!("bad labels {line:?}"))?;
                let mut labels = BTreeMap::new();
                for kv in rest.split(',').filter(|kv| !kv.is_empty()) {
                    let (k, v) = kv.split_once('=').ok_or(format!("bad label {line:?}"))?;
                    labels.insert(k.trim().to_string(), v.trim().trim_matches('"').to_string());
                }
                (name.to_string(), labels)
            }
        };
        out.push((name, labels, value));
    }
    Ok(out)
}

/// GET /metrics: the body as the exporter wrote it.
fn scrape_text(addr: &str) -> Result<String, String> {
    let mut s = std::net::TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .map_err(|e| e.to_string())?;
    let mut text = String::new();
    s.read_to_string(&mut text).map_err(|e| e.to_string())?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no HTTP header end: {text:?}"))?;
    if !head.starts_with("HTTP/1.") || !head.lines().next().unwrap_or("").contains(" 200") {
        return Err(format!("not 200: {head}"));
    }
    Ok(body.to_string())
}

/// The value of `name` with (at least) these labels, if exposed.
fn metric(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .find(|(n, l, _)| {
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.2)
}

#[test]
fn metrics_endpoint_matches_the_plan() {
    const N: u64 = 40;
    let addr = format!("127.0.0.1:{}", free_port());
    let f = fixture(&format!("metrics_addr = {addr:?}\n"));
    let _d = f.serve();
    let loaded = f.load();
    let names = loaded.plan.domain_names();
    let mut c = f.connect("metrics");
    let _ = read(&mut c, N);
    c.release(N).unwrap();
    // Every step below N released; the ring refills to N + slots and stops.
    let st = wait_for("the release and refill to show in status", SETTLE, || {
        let st = f.status();
        let ring = &st["jobs"][0]["rings"][0];
        let (p, r) = (
            ring["published_step"].as_u64(),
            ring["released_step"].as_u64(),
        );
        if r == Some(N) && p == Some(N + SLOTS) {
            Ok(st)
        } else {
            Err(format!("published {p:?}, released {r:?}: {ring}"))
        }
    });
    let published = N + SLOTS;
    // Offline: every published step's rows. Realized shares are shares of the real
    // (non-padding) tokens published so far, comparable with the targets, which are
    // token shares: the schedule's normalized weights at the next step.
    let mut planner = loaded.plan.start();
    let mut real = vec![0u64; names.len()];
    for _ in 0..published {
        for row in planner.next_batch().rows {
            real[row.domain as usize] += u64::from(row.tokens);
        }
    }
    let rows = planner.mix_state().rows.clone();
    assert_eq!(rows.iter().sum::<u64>(), published * u64::from(ROWS));
    let total: u64 = real.iter().sum();
    let realized: Vec<f64> = real.iter().map(|&t| t as f64 / total as f64).collect();
    let target = loaded.plan.schedule().shares(published);
    let tokens = N * u64::from(ROWS) * u64::from(SEQ_LEN);
    // Faults reported together at the end, so one does not hide the others.
    let mut deferred: Vec<String> = Vec::new();
    // status agrees with the plan.
    let ring = &st["jobs"][0]["rings"][0];
    assert_eq!(
        ring["batches_delivered"], N,
        "batches counted at RELEASE: {ring}"
    );
    assert_eq!(
        ring["tokens_delivered"], tokens,
        "tokens counted at RELEASE ({N} steps x {ROWS} rows x {SEQ_LEN}): {ring}"
    );
    let domains = st["domains"].as_array().unwrap();
    for (i, d) in domains.iter().enumerate() {
        assert_eq!(d["name"], names[i]);
        let (t, r) = (
            d["target_share"].as_f64().unwrap(),
            d["realized_share"].as_f64().unwrap(),
        );
        if (t - target[i]).abs() >= 1e-9 {
            deferred.push(format!(
                "status target_share of {}: {t}, the schedule's normalized weight is {}",
                names[i], target[i]
            ));
        }
        assert!(
            (r - realized[i]).abs() < 1e-9,
            "status realized_share of {}: {r} vs the plan's {} (real tokens {real:?} after {published} steps)",
            names[i],
            realized[i]
        );
        assert_eq!(d["tokens"], real[i], "status tokens of {}: {d}", names[i]);
        if let Some(r) = d.get("rows").and_then(Value::as_u64) {
            assert_eq!(r, rows[i], "status rows of {}: {d}", names[i]);
        }
    }
    // The endpoint, once refreshed (every second), says the same.
    let job = [("job", "metrics"), ("dp_rank", "0")];
    let samples = wait_for("/metrics to agree with the plan", SETTLE, || {
        let s = scrape(&addr)?;
        let mut wrong = Vec::new();
        // The client releases through its page: the daemon read its releases there (one
        // read may cover several steps).
        let pages = metric(&s, "millrace_page_releases_total", &job);
        if !pages.is_some_and(|p| p >= 1.0) {
            wrong.push(format!(
                "millrace_page_releases_total = {pages:?}, want >= 1"
            ));
        }
        let mut check = |what: String, got: Option<f64>, want: f64, tol: f64| {
            if !got.is_some_and(|g| (g - want).abs() <= tol) {
                wrong.push(format!("{what} = {got:?}, want {want}"));
            }
        };
        check(
            "millrace_tokens_delivered_total".into(),
            metric(&s, "millrace_tokens_delivered_total", &job),
            tokens as f64,
            0.0,
        );
        check(
            "millrace_batches_delivered_total".into(),
            metric(&s, "millrace_batches_delivered_total", &job),
            N as f64,
            0.0,
        );
        check(
            "millrace_clients".into(),
            metric(&s, "millrace_clients", &[]),
            1.0,
            0.0,
        );
        // Epoch progress is the job planner's, which plans ahead of the published steps
        // on its own thread: compared with a status read now, once both have settled.
        let now = f.status();
        for (i, n) in names.iter().enumerate() {
            check(
                format!("millrace_domain_epochs{{domain={n}}} (status)"),
                metric(&s, "millrace_domain_epochs", &[("domain", n)]),
                now["domains"][i]["epochs"].as_f64().unwrap_or(-1.0),
                1e-6,
            );
        }
        for (i, n) in names.iter().enumerate() {
            check(
                format!("millrace_domain_realized_share{{domain={n}}}"),
                metric(&s, "millrace_domain_realized_share", &[("domain", n)]),
                realized[i],
                1e-9,
            );
        }
        if wrong.is_empty() {
            Ok(s)
        } else {
            Err(wrong.join("; "))
        }
    });
    for (i, n) in names.iter().enumerate() {
        let t = metric(&samples, "millrace_domain_target_share", &[("domain", n)]);
        if !t.is_some_and(|t| (t - target[i]).abs() < 1e-9) {
            deferred.push(format!(
                "millrace_domain_target_share{{domain={n}}} = {t:?}, the schedule's normalized weight is {}",
                target[i]
            ));
        }
    }
    let has = |samples: &[Sample], name: &str| samples.iter().any(|(n, _, _)| n == name);
    let exposed = |samples: &[Sample]| {
        samples
            .iter()
            .map(|s| s.0.clone())
            .collect::<std::collections::BTreeSet<_>>()
    };
    let materialized = metric(&samples, "millrace_materialize_seconds_count", &[]);
    assert!(
        materialized.is_some_and(|v| v > 0.0),
        "millrace_materialize_seconds_count = {materialized:?}"
    );
    for name in [
        "millrace_step",
        "millrace_ring_occupancy",
        "millrace_ring_slots",
        "millrace_consumer_wait_seconds_total",
        "millrace_producer_wait_seconds_total",
        "millrace_domain_epochs",
        "millrace_padding_fraction",
        "millrace_truncation_fraction",
        "millrace_poisoned_shards",
    ] {
        assert!(
            has(&samples, name),
            "/metrics lacks {name}; it has: {:?}",
            exposed(&samples)
        );
    }
    // The reload counters are there before any reload (at 0), so dashboards and alerts
    // on them work from the start.
    for name in ["millrace_reloads_total", "millrace_reload_failures_total"] {
        if !has(&samples, name) {
            deferred.push(format!(
                "/metrics lacks {name} before the first reload; it has: {:?}",
                exposed(&samples)
            ));
        }
    }
    assert_eq!(
        metric(&samples, "millrace_ring_slots", &[]),
        Some(SLOTS as f64),
        "millrace_ring_slots"
    );
    // One applied and one refused change through the control socket: counted per source.
    let r = f.set_weights(&skewed(&loaded, 0), N + 2 * SLOTS + 10);
    assert_eq!(r["ok"], true, "{r}");
    let mut bad = skewed(&loaded, 0);
    bad.insert("no_such_domain".into(), 1.0);
    let r = f.set_weights(&bad, N + 2 * SLOTS + 10);
    assert_eq!(r["ok"], false, "{r}");
    let ctl_source = [("source", "ctl")];
    wait_for(
        "/metrics to count the ctl change and refusal",
        SETTLE,
        || {
            let s = scrape(&addr)?;
            let got = (
                metric(&s, "millrace_reloads_total", &ctl_source),
                metric(&s, "millrace_reload_failures_total", &ctl_source),
            );
            if got == (Some(1.0), Some(1.0)) {
                Ok(())
            } else {
                Err(format!(
                    "(reloads_total, reload_failures_total){{source=ctl}} = {got:?}"
                ))
            }
        },
    );
    assert!(
        deferred.is_empty(),
        "/metrics and status disagree with the spec:\n{}",
        deferred.join("\n")
    );
    drop(c);
}

/// A ring's (`millrace_batches_delivered_total`, `millrace_tokens_delivered_total`).
fn ring_delivered(s: &[Sample], ring: &[(&str, &str)]) -> (Option<f64>, Option<f64>) {
    (
        metric(s, "millrace_batches_delivered_total", ring),
        metric(s, "millrace_tokens_delivered_total", ring),
    )
}

/// A rank whose trainer comes back (its ring is made again under the same job and rank)
/// while its series are still exported: the counters go on by what the new ring
/// delivers. Set from each ring's own figures they stayed at the old ring's total until
/// the new ring delivered more (the dashboard showed 0 tokens/s for that rank).
#[test]
fn a_returning_ranks_counters_continue_on_metrics() {
    const N: u64 = 30;
    const M: u64 = 6;
    let addr = format!("127.0.0.1:{}", free_port());
    let f = fixture(&format!("metrics_addr = {addr:?}\n"));
    let _d = f.serve();
    let ring = [("job", "again"), ("dp_rank", "0")];
    let job = [("job", "again")];
    let per_step = f64::from(ROWS * SEQ_LEN);
    let delivered = |steps: u64| {
        wait_for(&format!("/metrics to count {steps} steps"), SETTLE, || {
            let s = scrape(&addr)?;
            let got = ring_delivered(&s, &ring);
            let planned = metric(&s, "millrace_job_batches_planned_total", &job);
            match (got, planned) {
                ((Some(b), Some(t)), Some(p))
                    if b == steps as f64 && t == steps as f64 * per_step =>
                {
                    Ok(p)
                }
                _ => Err(format!("(batches, tokens) {got:?}, planned {planned:?}")),
            }
        })
    };
    let mut c = f.connect("again");
    let _ = read(&mut c, N);
    c.release(N).unwrap();
    let planned = delivered(N);
    drop(c);
    f.wait_no_job("again");
    let mut c = f.connect("again");
    let _ = read(&mut c, M);
    c.release(M).unwrap();
    let planned_after = delivered(N + M);
    assert!(
        planned_after >= planned + M as f64,
        "millrace_job_batches_planned_total went from {planned} to {planned_after} while the job's \
         second planner planned at least {M} batches"
    );
    drop(c);
}

/// A trainer that reconnects at once (the same job and rank, from its cursor) gets a new
/// ring under the same labels, and /metrics counts both rings' steps exactly. The
/// exporter samples once a second and told rings apart only by figures going back: the
/// old ring's steps since its last sample were lost, and a new ring already past the old
/// one's figures at the next sample was taken for its growth, and a ring made and gone
/// between two samples was never counted (here /metrics said 12 steps of 60, then the
/// series aged out). The steps a trainer released just before it hung up were lost too
/// when the daemon had not read its release page yet (58 of 60).
#[test]
fn a_ring_remade_between_two_samples_is_counted_exactly_on_metrics() {
    const N: u64 = 12;
    const K: u64 = 8;
    const M: u64 = 40;
    let addr = format!("127.0.0.1:{}", free_port());
    let f = fixture(&format!("metrics_addr = {addr:?}\n"));
    let _d = f.serve();
    let ring = [("job", "quick"), ("dp_rank", "0")];
    let per_step = f64::from(ROWS * SEQ_LEN);
    // Every (batches, tokens) seen, for the message.
    let seen = std::cell::RefCell::new(Vec::new());
    let delivered = |steps: u64| {
        wait_for(&format!("/metrics to count {steps} steps"), SETTLE, || {
            let s = scrape(&addr)?;
            let got = ring_delivered(&s, &ring);
            let mut seen = seen.borrow_mut();
            if seen.last() != Some(&got) {
                seen.push(got);
            }
            match got {
                (Some(b), Some(t)) if b == steps as f64 && t == steps as f64 * per_step => Ok(()),
                _ => Err(format!("(batches, tokens) went {seen:?}")),
            }
        })
    };
    let mut c = f.connect("quick");
    let _ = read(&mut c, N);
    c.release(N).unwrap();
    // An export has just sampled the ring at N steps: the next is about a second away.
    delivered(N);
    let steps = read(&mut c, K);
    c.release(N + K).unwrap();
    drop(c);
    f.wait_no_job("quick");
    let mut h = f.hello("quick");
    h.cursor = Some(hex(&steps[K as usize - 1].cursor));
    let mut c = f.connect_with(&h).unwrap();
    let _ = read(&mut c, M);
    c.release(N + K + M).unwrap();
    drop(c);
    delivered(N + K + M);
}

/// A refused trainer (here a `dp_size` that does not divide the batch) is counted per
/// code in STATUS and on /metrics; it was in the rate-limited log only. With it and a
/// streaming client every metric of docs/OPERATIONS.md's table is exported with its
/// documented type and labels, and config/grafana-millrace.json queries only those,
/// grouped and selected by labels that exist.
#[test]
fn refused_clients_are_counted_and_the_docs_and_dashboard_match_the_metrics() {
    let addr = format!("127.0.0.1:{}", free_port());
    let f = fixture(&format!("metrics_addr = {addr:?}\n"));
    let _d = f.serve();
    let mut c = f.connect("docs");
    let _ = read(&mut c, 3);
    c.release(3).unwrap();
    for _ in 0..2 {
        let mut h = f.hello("refused");
        h.dp_size = 3;
        match f.connect_with(&h) {
            Err(ClientError::Refused { code, .. }) => assert_eq!(code, "dp_size"),
            Err(e) => panic!("want REFUSED dp_size, got {e}"),
            Ok(_) => panic!("dp_size 3 of {ROWS} rows was admitted"),
        }
    }
    assert_eq!(f.status()["refused_by_code"], json!({"dp_size": 2}));
    let code = [("code", "dp_size")];
    wait_for("/metrics to count the refusals", SETTLE, || {
        let got = metric(&scrape(&addr)?, "millrace_refused_connections_total", &code);
        (got == Some(2.0)).then_some(()).ok_or(format!("{got:?}"))
    });
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let ops = std::fs::read_to_string(root.join("docs/OPERATIONS.md")).unwrap();
    // | `name` | type | `label`, `label` | meaning |
    let documented: BTreeMap<String, (String, Vec<String>)> = ops
        .lines()
        .filter_map(|l| {
            l.strip_prefix("| `millrace_")?;
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            let name = cells.get(1)?.trim_matches('`').to_string();
            let kind = cells.get(2)?.split_whitespace().next()?.to_string();
            let labels = cells
                .get(3)?
                .split(", ")
                .map(|x| x.trim_matches('`').to_string());
            Some((name, (kind, labels.filter(|x| !x.is_empty()).collect())))
        })
        .collect();
    assert!(documented.len() >= 20, "{documented:?}");
    let text = wait_for("a scrape with the job's series", SETTLE, || {
        let t = scrape_text(&addr)?;
        t.contains("job=\"docs\"")
            .then_some(t)
            .ok_or("no job series yet".into())
    });
    let samples = scrape(&addr).unwrap();
    for (name, (kind, labels)) in &documented {
        let typed = format!("# TYPE {name} {kind}\n");
        assert!(text.contains(&typed), "/metrics lacks {typed:?}");
        let name = if kind == "histogram" {
            format!("{name}_count")
        } else {
            name.clone()
        };
        let mut want: Vec<&str> = labels.iter().map(String::as_str).collect();
        want.sort_unstable();
        for s in samples.iter().filter(|s| s.0 == name) {
            let got: Vec<&str> = s.1.keys().map(String::as_str).collect();
            assert_eq!(got, want, "labels of {name}");
        }
    }
    let known_labels = [
        "instance", "job", "dp_rank", "domain", "source", "code", "le",
    ];
    let dashboard = std::fs::read_to_string(root.join("config/grafana-millrace.json")).unwrap();
    let v: Value = serde_json::from_str(&dashboard).unwrap();
    let mut exprs = Vec::new();
    let mut stack = vec![&v];
    while let Some(x) = stack.pop() {
        match x {
            Value::Object(m) => {
                exprs.extend(m.get("expr").and_then(Value::as_str));
                stack.extend(m.values());
            }
            Value::Array(a) => stack.extend(a),
            _ => {}
        }
    }
    assert!(exprs.len() >= 10, "{exprs:?}");
    for e in &exprs {
        for (i, _) in e.match_indices("millrace_") {
            let name: String = e[i..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                .collect();
            let base = name.strip_suffix("_bucket").unwrap_or(&name);
            assert!(
                documented.contains_key(base),
                "{e}: {name} is not documented"
            );
        }
        // Labels grouped by (`by (...)`) or selected (`{label=~...}`).
        let mut used: Vec<&str> = Vec::new();
        for part in e.split("by (").skip(1) {
            used.extend(part.split(')').next().unwrap_or("").split(", "));
        }
        for part in e.split('{').skip(1) {
            let sel = part.split('}').next().unwrap_or("");
            used.extend(sel.split(',').filter_map(|kv| kv.split(['=', '!']).next()));
        }
        for l in used {
            assert!(known_labels.contains(&l.trim()), "{e}: label {l:?}");
        }
    }
    drop(c);
}

// ------------------------------------------------------------ graceful shutdown

/// Reads until the daemon ends the stream; returns the steps read and the error.
fn read_to_end(c: &mut Client) -> (Vec<u64>, ClientError) {
    let mut steps = Vec::new();
    loop {
        match c.next_batch() {
            Ok(v) => steps.push(v.step),
            Err(e) => return (steps, e),
        }
    }
}

/// Waits (up to 20 s) for the daemon to exit 0 after SIGTERM; returns the time since `t0`.
fn exits_cleanly(d: &mut Serve, t0: Instant) -> Duration {
    let status = d.wait_exit(Duration::from_secs(20));
    let took = t0.elapsed();
    assert!(
        status.is_some_and(|s| s.success()),
        "{status:?} after SIGTERM:\n{}",
        d.log_text()
    );
    took
}

/// SIGTERM with a trainer that keeps reading: the daemon stops filling, the trainer
/// reads every step already published (contiguous, as planned), releases them, and the
/// daemon exits 0 as soon as nothing is held, long before the bound; the trainer is
/// told `shutdown` (which both clients treat as "reconnect").
#[test]
fn sigterm_lets_a_reading_client_finish_then_exits() {
    let f = fixture("drain_timeout_ms = 20000\n");
    let mut d = f.serve();
    let want = domains_of(&f.load().plan, 40);
    let mut c = f.connect("drain");
    let first = read(&mut c, 3);
    d.signal(libc::SIGTERM);
    let t0 = Instant::now();
    let (steps, err) = read_to_end(&mut c);
    let took = exits_cleanly(&mut d, t0);
    assert!(
        took < Duration::from_secs(10),
        "the drain waited {took:?} for a client that had read everything (bound 20 s)"
    );
    assert!(
        matches!(&err, ClientError::Daemon { code, .. } if code == "shutdown")
            || matches!(err, ClientError::Disconnected),
        "the trainer is told the daemon stops: {err}"
    );
    assert!(err.is_transient(), "{err} must make a client reconnect");
    // Everything published before the signal was still delivered, in order.
    let all: Vec<u64> = first
        .iter()
        .map(|s| s.step)
        .chain(steps.iter().copied())
        .collect();
    assert_eq!(all, (0..all.len() as u64).collect::<Vec<_>>());
    // How many more steps were published depends on when the signal is handled, so
    // only the order is checked here, not the count.
    assert!(all.len() >= 3, "{all:?}");
    assert_eq!(
        first.iter().map(|s| s.domains.clone()).collect::<Vec<_>>(),
        want[..3].to_vec()
    );
    assert!(d.log_text().contains("drained"), "{}", d.log_text());
}

/// SIGTERM with a trainer that holds its slots and stops reading: the daemon waits for
/// it up to `drain_timeout_ms`, then tells it `shutdown` and exits 0.
#[test]
fn sigterm_with_a_stuck_client_exits_at_the_bound() {
    let f = fixture("drain_timeout_ms = 1500\n");
    let mut d = f.serve();
    let mut c = f.connect("stuck");
    let _ = read(&mut c, 2);
    d.signal(libc::SIGTERM);
    let took = exits_cleanly(&mut d, Instant::now());
    assert!(
        took >= Duration::from_millis(1400) && took < Duration::from_secs(10),
        "exited after {took:?}, want about the 1.5 s bound"
    );
    assert!(d.log_text().contains("drain bound"), "{}", d.log_text());
    // The held slots stay readable (the memfd lives while mapped); then the stream ends.
    let (_, err) = read_to_end(&mut c);
    assert!(err.is_transient(), "{err}");

    // A second SIGTERM (or Ctrl-C twice) ends the drain at once, though its bound is a
    // minute: it was swallowed, and the operator waited the whole bound.
    let f = fixture("drain_timeout_ms = 60000\n");
    let mut d = f.serve();
    let mut c = f.connect("stuck");
    let _ = read(&mut c, 2);
    d.signal(libc::SIGTERM);
    wait_for("the drain", Duration::from_secs(10), || {
        let log = d.log_text();
        match log.contains("SIGTERM: draining") {
            true => Ok(()),
            false => Err(log),
        }
    });
    let t0 = Instant::now();
    d.signal(libc::SIGINT);
    let took = exits_cleanly(&mut d, t0);
    assert!(took < Duration::from_secs(10), "exited after {took:?}");
    assert!(
        d.log_text().contains("a second SIGINT: closing"),
        "{}",
        d.log_text()
    );
}

/// A daemon thread held stopped by this test (ptrace), as a read of a hung network
/// filesystem holds a copy thread: it does not run until released. Dropping it lets the
/// thread go (or reaps it, if its process exited meanwhile); drop it before the daemon.
struct Held {
    tid: libc::pid_t,
    reaped: bool,
}

impl Held {
    /// Stops thread `name` of process `pid` while it waits on a futex (idle, holding no
    /// lock of the daemon's), retrying until it is caught there; `None` (saying why)
    /// where this process may not trace its child (a container's seccomp profile).
    fn thread(pid: libc::pid_t, name: &str) -> Option<Held> {
        let tasks = format!("/proc/{pid}/task");
        let tid = std::fs::read_dir(&tasks)
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<libc::pid_t>().ok())
            .find(|t| {
                std::fs::read_to_string(format!("{tasks}/{t}/comm")).is_ok_and(|c| c.trim() == name)
            })
            .unwrap_or_else(|| panic!("no thread {name} in {pid}"));
        let t0 = Instant::now();
        loop {
            // SAFETY: ptrace on a thread of our own child; the status is a valid int.
            unsafe {
                if libc::ptrace(libc::PTRACE_SEIZE, tid, 0, 0) != 0 {
                    let e = std::io::Error::last_os_error();
                    eprintln!("skipped: PTRACE_SEIZE of the daemon's {name}: {e}");
                    return None;
                }
                assert_eq!(libc::ptrace(libc::PTRACE_INTERRUPT, tid, 0, 0), 0);
                let mut st = 0;
                assert_eq!(libc::waitpid(tid, &mut st, libc::__WALL), tid);
            }
            let call = std::fs::read_to_string(format!("{tasks}/{tid}/syscall")).unwrap();
            if call.split_whitespace().next() == Some(&libc::SYS_futex.to_string()) {
                return Some(Held { tid, reaped: false });
            }
            // SAFETY: the thread is in a ptrace stop: detaching resumes it.
            unsafe { libc::ptrace(libc::PTRACE_DETACH, tid, 0, 0) };
            assert!(t0.elapsed() < TIMEOUT, "{name} never waited on a futex");
            std::thread::yield_now();
        }
    }

    /// Reaps the held thread if it was killed (its process exited): until then the
    /// process cannot be reaped.
    fn reap(&mut self) {
        let mut st = 0;
        // SAFETY: waitpid on a thread this thread traces.
        let r = unsafe { libc::waitpid(self.tid, &mut st, libc::__WALL | libc::WNOHANG) };
        if r == self.tid && (libc::WIFEXITED(st) || libc::WIFSIGNALED(st)) {
            self.reaped = true;
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if !self.reaped {
            // SAFETY: detaching a thread this thread traces (an error if it is gone).
            unsafe { libc::ptrace(libc::PTRACE_DETACH, self.tid, 0, 0) };
        }
    }
}

/// SIGTERM while a copy thread and the plan thread are stuck (held stopped, as a read of
/// a hung network filesystem holds them): the daemon drains, waits a bounded time for
/// them, names those that did not stop, and exits 0. It joined them without a bound and
/// so never exited: systemd's TimeoutStopSec had to kill it. Meanwhile the other copy
/// thread alone serves the rings.
#[test]
fn sigterm_with_a_copy_thread_stuck_still_exits() {
    let f = fixture("drain_timeout_ms = 1000\n");
    let mut d = f.serve();
    let Some(mut held) = Held::thread(d.pid(), "millrace-copy-0") else {
        return;
    };
    {
        let mut c = f.connect("one-thread");
        assert_eq!(
            read(&mut c, 12).len(),
            12,
            "the other copy thread serves the ring"
        );
    }
    // The plan thread too (it reads shard indexes, which may hang as well).
    let Some(mut plan) = Held::thread(d.pid(), "millrace-plan") else {
        return;
    };
    d.signal(libc::SIGTERM);
    let t0 = Instant::now();
    let status = loop {
        held.reap();
        plan.reap();
        if let Some(s) = d.exited() {
            break Some(s);
        }
        if t0.elapsed() > Duration::from_secs(60) {
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        status.is_some_and(|s| s.success()),
        "{status:?} 60 s after SIGTERM with a copy thread and the plan thread stuck:\n{}",
        d.log_text()
    );
    let log = d.log_text();
    let named = "threads millrace-copy-0, millrace-plan did not stop within 5000 ms; exiting \
                 without them. Fills in flight: ";
    let Some(at) = log.find(named) else {
        panic!("{log}")
    };
    // No fill was under way; the plan thread may have been stopped while it planned
    // ahead (on a loaded machine it is still catching up), and is then named as such,
    // after how long it has been at it when that is a second or more ("(5 s: the plan
    // thread, ...": a CI run met that form).
    let fills = log[at + named.len()..].lines().next().unwrap_or_default();
    assert!(
        fills == "none" || fills.contains("the plan thread, planning the job's next steps"),
        "{log}"
    );
    drop((held, plan));
}

/// A client of job `job` that read 4 steps, and its last blob decoded, to be forged
/// (encoding it again gives a valid checksum).
fn blob_to_forge(f: &Fixture, job: &str) -> (Client, millrace::plan::cursor::CursorData) {
    let mut c = f.connect(job);
    let got = read(&mut c, 4);
    let data = millrace::plan::cursor::decode(&got[3].cursor).expect("the daemon's blob decodes");
    (c, data)
}

/// A forged blob (its checksum valid) that carries a weights change at plan step 2^64-1,
/// or any step past the farthest a live change may name from the blob's own step, is
/// refused by name: no daemon could have accepted that change while the blob's rank was
/// at its step, and adopting it would sit in every blob of the run (and fill the
/// journal's room). The daemon's journal stays empty and its clients are served.
#[test]
fn a_blob_bringing_a_change_past_any_live_horizon_is_refused() {
    use millrace::plan::cursor;
    let f = fixture("watch_config = false\n");
    let _d = f.serve();
    let (c, mut data) = blob_to_forge(&f, "forge");
    drop(c);
    let _ = f.wait_no_job("forge");
    let w = vec![1.0; f.domain_names().len()];
    for at in [
        u64::MAX,
        data.plan_step + 2 * millrace::config::plan::MAX_STEP + 1,
    ] {
        data.journal = vec![Change {
            at,
            points: vec![(at, w.clone())],
            stage: None,
        }];
        let forged = cursor::encode(&data);
        let what = format!("a blob carrying a change at plan step {at}");
        let message = f.refused_blob("forge", &forged, &what);
        assert!(
            message.contains(&at.to_string()),
            "the refusal does not name the change's step {at}: {message}"
        );
    }
    // The daemon still serves.
    let mut c = f.connect("after");
    assert_eq!(read(&mut c, 2).len(), 2);
}

/// A forged blob claiming more superseded changes than any run makes (u64::MAX) is
/// refused by name. Adopted, it saturated the daemon's count, so its own rings' cursors
/// compared as diverged from its journal and every later live change was refused
/// `busy` for the rest of the daemon's life.
#[test]
fn a_blob_claiming_more_superseded_changes_than_any_run_makes_is_refused() {
    use millrace::plan::cursor;
    let f = fixture("watch_config = false\n");
    let names = f.domain_names();
    let _d = f.serve();
    let (mut a, mut data) = blob_to_forge(&f, "a");
    data.journal = vec![Change {
        at: 100,
        points: vec![(100, vec![1.0; names.len()])],
        stage: None,
    }];
    data.superseded = u64::MAX;
    let what = "a blob claiming u64::MAX superseded changes";
    let message = f.refused_blob("forged", &cursor::encode(&data), what);
    assert!(
        message.contains("superseded") && message.contains(&u64::MAX.to_string()),
        "the refusal does not name the count: {message}"
    );
    // Live changes still apply while the client reads on.
    let _ = read(&mut a, 10);
    let w: BTreeMap<String, f64> = [(names[0].clone(), 3.0)].into();
    let r = f.set_weights(&w, 200);
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(read(&mut a, 3).len(), 3);
}

/// A point written into the config file after a live change (at a later step), read at
/// a restart: the blobs bring the change back and it holds over the file's later points,
/// so the file's point is not served while `check-config` and `plan` show it. That was
/// silent; the daemon now names the hidden points in its log, and a live change that
/// hides points of the file names them in its reply.
#[test]
fn a_change_that_hides_the_files_later_points_says_so() {
    const AT: u64 = 10;
    const KEEP: u64 = 30;
    const FILE_AT: u64 = 40;
    let f = fixture("watch_config = false\n");
    let old = f.load();
    let (blob, reply) = {
        let _a = f.serve();
        let mut c = f.connect("hide");
        let _ = read(&mut c, 2);
        let r = f.set_weights(&skewed(&old, 0), AT);
        assert_eq!(r["ok"], true, "{r}");
        let got = read(&mut c, KEEP - 1);
        (got.last().unwrap().cursor.clone(), r)
    };
    // The file had no later point: nothing hidden, nothing said.
    assert!(
        !reply["message"].as_str().unwrap().contains("holds over"),
        "{reply}"
    );
    let _ = std::fs::remove_file(&f.socket);
    f.write_schedule(step_change(&base_weights(&old), FILE_AT, &skewed(&old, 2)));
    let b = f.serve();
    let mut h = f.hello("hide");
    h.cursor = Some(hex(&blob));
    let mut c = f.connect_with(&h).expect("the blob resumes");
    let _ = read(&mut c, 3);
    let log = b.log_text();
    assert!(
        log.contains(&format!("plan steps {}, {FILE_AT}", FILE_AT - 1))
            && log.contains("not served"),
        "the daemon did not say the file's points are hidden:\n{log}"
    );
    // A reload of that file changes nothing (it is as last applied) and says why the
    // points stay unserved; it said "the schedule in force already matches".
    let r = f.req(millrace::control::reload_request());
    assert_eq!(r["ok"], true, "{r}");
    let m = r["message"].as_str().unwrap();
    assert!(
        m.contains(&format!(
            "plan steps {}, {FILE_AT}, which are not served",
            FILE_AT - 1
        )) && m.contains("set-weights"),
        "{r}"
    );
    // A change that hides them again is not news; one on a daemon whose file still
    // shows them, sent by ctl, says so in its reply.
    let _ = std::fs::remove_file(&f.socket);
    drop(c);
    drop(b);
    let _c = f.serve();
    let mut c = f.connect("fresh");
    let _ = read(&mut c, 2);
    let r = f.set_weights(&skewed(&old, 1), AT);
    assert_eq!(r["ok"], true, "{r}");
    let m = r["message"].as_str().unwrap();
    assert!(
        m.contains(&format!("plan steps {}, {FILE_AT}", FILE_AT - 1)),
        "{r}"
    );
    // A reload replaces the file's later points on purpose: no note.
    f.write_schedule(step_change(
        &base_weights(&old),
        FILE_AT + 10,
        &skewed(&old, 2),
    ));
    let r = f.req(millrace::control::reload_request());
    assert_eq!(r["ok"], true, "{r}");
    assert!(
        !r["message"].as_str().unwrap().contains("holds over"),
        "{r}"
    );
    // The points that reload wrote are the file's now: a change that hides them says
    // so. (It was silent: the daemon compared with the file it started with.)
    let r = f.set_weights(&skewed(&old, 0), AT + 10);
    assert_eq!(r["ok"], true, "{r}");
    let m = r["message"].as_str().unwrap();
    assert!(
        m.contains(&format!("plan steps {}, {}", FILE_AT + 9, FILE_AT + 10)),
        "{r}"
    );
}

/// A run resumed 3 steps before 2^32 (`MAX_STEP`, the furthest step a blob may name) is
/// served its last steps, up to 2^32 - 1, whose cursor names 2^32 and resumes; then its
/// ring stops with `ERROR limit` naming the bound. Before, the daemon went on serving
/// step 2^32 and beyond, whose cursors the same daemon refused as malformed when the
/// trainer came back with them, and a live change then failed `busy` with "cursor is
/// malformed".
#[test]
fn a_run_at_the_last_step_stops_with_a_cursor_that_resumes() {
    use millrace::plan::cursor;
    let max = millrace::config::plan::MAX_STEP;
    let f = fixture("watch_config = false\n");
    let d = f.serve();
    let (c, mut data) = blob_to_forge(&f, "late");
    drop(c);
    let _ = f.wait_no_job("late");
    let back = data.plan_step - data.step;
    data.step = max - 3;
    data.plan_step = max - 3 + back;
    data.history = f.load().plan.cursor_history(data.plan_step);
    let mut h = f.hello("late");
    h.cursor = Some(hex(&cursor::encode(&data)));
    let mut c = f
        .connect_with(&h)
        .unwrap_or_else(|e| panic!("a blob at step {}: {e}", max - 3));
    let got = read(&mut c, 3);
    assert_eq!(got.last().map(|s| s.step), Some(max - 1));
    let last = got[2].cursor.clone();
    let stops = |c: &mut Client| match c.next_batch() {
        Err(ClientError::Daemon { code, message }) => {
            assert_eq!(code, "limit", "{message}");
            assert!(message.contains(&max.to_string()), "{message}");
        }
        Err(e) => panic!("expected ERROR limit past step {}, got {e}", max - 1),
        Ok(v) => panic!(
            "step {} was served; its cursor would name step {}, which no daemon resumes",
            v.step,
            v.step + 1
        ),
    };
    stops(&mut c);
    drop(c);
    let _ = f.wait_no_job("late");
    // The last step's cursor resumes (at 2^32), and the ring stops there again.
    let mut h = f.hello("late");
    h.cursor = Some(hex(&last));
    let mut c = f
        .connect_with(&h)
        .unwrap_or_else(|e| panic!("the cursor of step {} is refused: {e}", max - 1));
    assert_eq!(c.welcome().start_step, max);
    stops(&mut c);
    drop(c);
    // Other jobs are served.
    let mut c = f.connect("after");
    assert_eq!(read(&mut c, 2).len(), 2, "{}", d.log_text());
}

// ------------------------------------------------------------ lifetime

/// The daemon's RSS (kB), open fds, threads and mappings.
fn footprint(pid: libc::pid_t) -> [u64; 4] {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let count = |dir: &str| {
        std::fs::read_dir(format!("/proc/{pid}/{dir}"))
            .unwrap()
            .count() as u64
    };
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    [rss, count("fd"), count("task"), maps.lines().count() as u64]
}

/// Files under `dir`, recursively.
fn files_under(dir: &Path) -> u64 {
    std::fs::read_dir(dir).map_or(0, |rd| {
        rd.flatten()
            .map(|e| match e.path().is_dir() {
                true => files_under(&e.path()),
                false => 1,
            })
            .sum()
    })
}

/// A run's lifetime in miniature: a trainer that reads 2-row steps of 16 tokens,
/// reconnects with its cursor every 1,000 steps and a SIGHUP every 2,000, for 20,000
/// steps (`MILLRACE_LIFETIME_STEPS` for more: 10^6 takes 40 s). From a quarter of the
/// run to its end the daemon's fds, threads and mappings, its STATUS and /metrics, and
/// the cursor blob stay the size they were, its RSS within 8 MiB, its log grows by a
/// few lines per reconnect and reload, and its cache dir by the plan checkpoints
/// (one per 2^15 steps here). Measured at 10^4, 10^5 and 10^6 steps: RSS 31, 35, 35 MB;
/// fds 16; threads 9-11; 99-107 mappings; STATUS 1.8 kB; /metrics 4 kB; 452-byte blobs.
#[test]
fn a_long_run_keeps_the_daemon_flat() {
    let steps: u64 = std::env::var("MILLRACE_LIFETIME_STEPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    const RECONNECT: u64 = 1000;
    let corpus = Rc::new(common::corpus(200_000, 3, 5, 100_000));
    let dir = &corpus.dir;
    let cache = dir.join("cache");
    let port = free_port();
    let socket = dir.join("life.sock");
    let config = common::write_config(
        dir,
        "life.toml",
        16,
        2,
        &[
            &common::serve_toml(&socket, 16, 1),
            &format!("metrics_addr = \"127.0.0.1:{port}\"\n"),
        ],
    );
    let mut doc: toml::Table = toml::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    let c = doc
        .get_mut("corpus")
        .and_then(|c| c.as_table_mut())
        .unwrap();
    c.insert("cache_dir".into(), cache.to_str().unwrap().into());
    std::fs::write(&config, toml::to_string(&doc).unwrap()).unwrap();
    let f = Fixture {
        _corpus: corpus.clone(),
        config,
        socket,
        log: dir.join("life.log"),
    };
    let d = f.serve();
    let addr = format!("127.0.0.1:{port}");
    let mut h = Hello::new(0, 1, 2, 1);
    h.job = "life".into();
    let mut c = f.connect_with(&h).unwrap();
    let mut blob = Vec::new();
    let mut events = 0u64;
    let mut at_quarter = None;
    let measure = |blob: &[u8]| {
        // The exporter samples once a second and a quarter of the run can take less:
        // measured once this ring's series are there (its job's and its rank's).
        let metrics = wait_for("/metrics with the ring's series", SETTLE, || {
            scrape_text(&addr).and_then(|m| {
                let ring = m.contains("job=\"life\"") && m.contains("dp_rank=\"0\"");
                ring.then_some(m)
                    .ok_or_else(|| "no series of the ring yet".to_string())
            })
        });
        (
            footprint(d.pid()),
            f.status().to_string().len(),
            metrics.len(),
            blob.len(),
            d.log_text().len() as u64,
        )
    };
    for s in 0..steps {
        let v = c
            .next_batch()
            .unwrap_or_else(|e| panic!("step {s}: {e}\n{}", d.log_text()));
        assert_eq!(v.step, s);
        blob.clear();
        blob.extend_from_slice(v.cursor);
        if s + 1 == steps / 4 {
            at_quarter = Some((measure(&blob), events));
        }
        if s > 0 && s % RECONNECT == 0 {
            drop(c);
            let _ = f.wait_no_job("life");
            if s % (2 * RECONNECT) == 0 {
                d.signal(libc::SIGHUP);
                events += 1;
            }
            let mut again = h.clone();
            again.cursor = Some(hex(&blob));
            c = f
                .connect_with(&again)
                .unwrap_or_else(|e| panic!("reconnect at step {s}: {e}"));
            events += 1;
        }
    }
    let ((was, status0, metrics0, blob0, log0), events0) = at_quarter.expect("measured");
    let (now, status1, metrics1, blob1, log1) = measure(&blob);
    let what = format!(
        "at step {} then {steps}: {was:?} -> {now:?} (rss kB, fds, threads, maps)",
        steps / 4
    );
    assert!(now[0] <= was[0] + (8 << 10), "RSS grew: {what}");
    assert!(now[1] <= was[1] + 2, "fds grew: {what}");
    assert!(now[2] <= was[2] + 3, "threads grew: {what}");
    assert!(now[3] <= was[3] + 12, "mappings grew: {what}");
    assert!(
        status1 <= status0 + 256,
        "STATUS grew from {status0} to {status1} bytes"
    );
    assert!(
        metrics1 <= metrics0 + 512,
        "/metrics grew from {metrics0} to {metrics1} bytes"
    );
    assert_eq!(blob0, blob1, "the cursor blob grew");
    let per_event = (log1 - log0) / (events - events0).max(1);
    assert!(
        per_event < 1024,
        "{per_event} log bytes per reconnect or reload"
    );
    let checkpoints = steps / (1 << 15) + 1;
    let files = files_under(&cache);
    assert!(files <= checkpoints + 16, "{files} files in the cache dir");
}
