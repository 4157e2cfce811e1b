//! Corpus evolution end to end (issue 20): a real `millrace serve` streams 50 steps of a
//! two-domain config and the trainer keeps the cursor; the daemon restarts with a third
//! domain and an increment of `web`'s shards (as a domain of its own, docs/DESIGN.md
//! "Corpus evolution"), both weighted from step 60; the saved cursor resumes at step 50,
//! the stream is the new plan's continuation of the old run (cursor bytes equal step by
//! step), no document of the first 50 steps starts again in the same epoch of its
//! domain, and the new domains have rows from step 60 on, never before. The same shards
//! appended to `web`'s own list are refused, naming the domain and the shard.

mod common;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::Serve;
use millrace::client::{to_hex, Client, ClientError, Hello};
use millrace::config::Config;
use millrace::plan::GlobalBatch;

const SEQ_LEN: u32 = 64;
const ROWS: u32 = 8;
/// The step the third domain takes effect from.
const ADDED: u64 = 60;

/// `web`'s first three shards: the old run's; the fourth is the increment.
const WEB: &[&str] = &["web/web-00000", "web/web-00001", "web/web-00002"];
const WEB_ALL: &[&str] = &[
    "web/web-00000",
    "web/web-00001",
    "web/web-00002",
    "web/web-00003",
];

/// Writes `<dir>/<file>`: the corpus config with `[serve]` set, the domains `domains`
/// (name, shards) only, and `schedule` as `[[plan.schedule]]`.
fn config(
    dir: &Path,
    socket: &Path,
    file: &str,
    domains: &[(&str, &[&str])],
    schedule: &str,
) -> PathBuf {
    let serve = common::serve_toml(socket, 4, 2);
    let path = common::write_config(dir, file, SEQ_LEN, ROWS, &[&serve]);
    let mut doc: toml::Table = toml::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let corpus = doc.get_mut("corpus").unwrap().as_table_mut().unwrap();
    let list: Vec<toml::Value> = domains
        .iter()
        .map(|(name, shards)| {
            let text = format!("name = {name:?}\nshards = {shards:?}\n");
            toml::Value::Table(toml::from_str(&text).unwrap())
        })
        .collect();
    corpus.insert("domain".into(), toml::Value::Array(list));
    let plan = doc.get_mut("plan").unwrap().as_table_mut().unwrap();
    let points: toml::Table = toml::from_str(schedule).unwrap();
    plan.insert("schedule".into(), points["schedule"].clone());
    std::fs::write(&path, toml::to_string(&doc).unwrap()).unwrap();
    path
}

fn hello(cursor: Option<&[u8]>) -> Hello {
    let mut h = Hello::new(0, 1, ROWS, 1);
    h.job = "evolve".into();
    h.cursor = cursor.map(to_hex);
    h
}

fn connect(socket: &Path, h: &Hello) -> Client {
    let mut c = Client::connect(socket, h).unwrap_or_else(|e| panic!("connect: {e}"));
    c.set_timeout(Some(Duration::from_secs(60)));
    c
}

/// Document starts of `batches` as (domain name, epoch, shard, document).
fn starts(names: &[&str], batches: &[GlobalBatch]) -> Vec<(String, u32, u32, u64)> {
    let mut out = Vec::new();
    for b in batches {
        for r in &b.rows {
            for s in r.segments.iter().filter(|s| s.start == 0) {
                out.push((
                    names[r.domain as usize].to_string(),
                    r.epoch,
                    s.shard,
                    s.doc,
                ));
            }
        }
    }
    out
}

#[test]
fn a_domain_added_at_a_step_resumes_the_old_runs_cursor() {
    let corpus = common::corpus(600_000, 3, 11, 100_000);
    let socket = corpus.dir.join("s.sock");
    let a = config(
        &corpus.dir,
        &socket,
        "a.toml",
        &[("web", WEB), ("code", &["code"])],
        "[[schedule]]\nstep = 0\nweights = { web = 0.6, code = 0.4 }\n",
    );
    let b = config(
        &corpus.dir,
        &socket,
        "b.toml",
        &[
            ("web", WEB),
            ("code", &["code"]),
            ("books", &["books"]),
            ("web-2", &["web/web-00003"]),
        ],
        &format!(
            "[[schedule]]\nstep = 0\n\
             weights = {{ web = 0.6, code = 0.4, books = 0.0, web-2 = 0.0 }}\n\
             [[schedule]]\nstep = {ADDED}\nramp = false\n\
             weights = {{ web = 0.4, code = 0.3, books = 0.2, web-2 = 0.1 }}\n"
        ),
    );
    let appended = config(
        &corpus.dir,
        &socket,
        "c.toml",
        &[("web", WEB_ALL), ("code", &["code"])],
        "[[schedule]]\nstep = 0\nweights = { web = 0.6, code = 0.4 }\n",
    );
    let plan_a = Config::load(&a).unwrap().load_plan().unwrap().plan;
    let plan_b = Config::load(&b).unwrap().load_plan().unwrap().plan;
    assert_ne!(
        plan_a.fingerprint(),
        plan_b.fingerprint(),
        "the corpus changed"
    );

    // Config A: 50 steps, the cursor of the last kept.
    let mut planner = plan_a.start();
    let first: Vec<GlobalBatch> = (0..50).map(|_| planner.next_batch()).collect();
    let blob = {
        let _serve = Serve::start(&a, &socket, &corpus.dir.join("a.log"));
        let mut c = connect(&socket, &hello(None));
        for want in &first {
            let v = c.next_batch().unwrap();
            let domains: Vec<i32> = want.rows.iter().map(|r| i32::from(r.domain)).collect();
            assert_eq!(v.domain, &domains[..], "step {}", want.step);
        }
        assert_eq!(c.last_step(), Some(49));
        let blob = c.last_cursor().unwrap().to_vec();
        assert_eq!(blob, planner.cursor(), "the daemon's cursor is the plan's");
        blob
    };

    // Config C, web's fourth shard appended to its list: refused, naming both.
    {
        let _serve = Serve::start(&appended, &socket, &corpus.dir.join("c.log"));
        match Client::connect(&socket, &hello(Some(&blob))) {
            Err(ClientError::Refused { code, message }) => {
                assert_eq!(code, "cursor");
                assert!(
                    message.contains("domain web: the config lists 4 shards, the blob knew 3")
                        && message.contains("web-00003"),
                    "{message}"
                );
            }
            Err(e) => panic!("refused otherwise: {e}"),
            Ok(_) => panic!("a cursor was resumed over shards appended to its domain"),
        }
    }

    // Config B: the same cursor resumes at step 50.
    let _serve = Serve::start(&b, &socket, &corpus.dir.join("b.log"));
    let mut c = connect(&socket, &hello(Some(&blob)));
    assert_eq!(c.welcome().start_step, 50);
    let mut resumed = plan_b
        .restore(&blob)
        .expect("plan B resumes plan A's cursor");
    let index = |name: &str| plan_b.domain_names().iter().position(|n| *n == name);
    let added = [
        index("books").unwrap() as i32,
        index("web-2").unwrap() as i32,
    ];
    let mut later = Vec::new();
    let mut added_from = [None, None];
    for step in 50..100u64 {
        let want = resumed.next_batch();
        let v = c.next_batch().unwrap();
        assert_eq!(v.step, step);
        let domains: Vec<i32> = want.rows.iter().map(|r| i32::from(r.domain)).collect();
        assert_eq!(v.domain, &domains[..], "step {step}");
        assert_eq!(v.cursor, &resumed.cursor()[..], "cursor of step {step}");
        for (d, from) in added.iter().zip(added_from.iter_mut()) {
            if v.domain.contains(d) {
                from.get_or_insert(step);
            }
        }
        later.push(want);
    }
    assert!(
        added_from.iter().all(|f| f.is_some_and(|s| s >= ADDED)),
        "books, web-2 first at {added_from:?}, weighted from {ADDED}"
    );
    // The daemon's stream is plan B's from step 0 (the new domains at weight 0 before 60).
    let mut fresh = plan_b.seek(50);
    for want in &later {
        assert_eq!(&fresh.next_batch(), want, "step {}", want.step);
    }
    // No document of the first 50 steps starts again within its domain's epoch.
    let seen: HashSet<_> = starts(&plan_a.domain_names(), &first).into_iter().collect();
    for doc in starts(&plan_b.domain_names(), &later) {
        assert!(!seen.contains(&doc), "{doc:?} again in the same epoch");
    }
}

/// A run that took a live change adds a domain. Every blob after a change carries it
/// for good, and its weights are per blob domain: resumed under a config with a third
/// domain, the blob was refused ("write the mixture into the config and resume from a
/// blob without live changes", which no blob of the run is), so a run that had ever used
/// `set-weights` could never add a source. Now the journal is mapped onto the config's
/// domains by name (the new one at weight 0, as it was), the cursor resumes exactly
/// where the old run was, and a later `set-weights` gives the new domain rows.
#[test]
fn a_run_with_live_changes_adds_a_domain() {
    use common::Control as _;
    const AT: u64 = 10;
    const KEEP: u64 = 30;
    const BOOKS_FROM: u64 = 60;
    let corpus = common::corpus(600_000, 3, 11, 100_000);
    let socket = corpus.dir.join("s.sock");
    let two = "[[schedule]]\nstep = 0\nweights = { web = 0.6, code = 0.4 }\n";
    let a = config(
        &corpus.dir,
        &socket,
        "a.toml",
        &[("web", WEB), ("code", &["code"])],
        two,
    );
    let b = config(
        &corpus.dir,
        &socket,
        "b.toml",
        &[("web", WEB), ("books", &["books"]), ("code", &["code"])],
        "[[schedule]]\nstep = 0\nweights = { web = 0.6, books = 0.0, code = 0.4 }\n",
    );
    struct Sock(PathBuf);
    impl common::Control for Sock {
        fn control_socket(&self) -> &Path {
            &self.0
        }
    }
    let ctl = Sock(socket.clone());
    let set = |w: serde_json::Value, at: u64| {
        let r = ctl.req(serde_json::json!({"protocol": 1, "op": "set_weights",
            "weights": w, "at_step": at, "late": "refuse"}));
        assert_eq!(r["ok"], true, "{r}");
    };
    let (blob, served) = {
        let _serve = Serve::start(&a, &socket, &corpus.dir.join("a.log"));
        let mut c = connect(&socket, &hello(None));
        let _ = c.next_batch().unwrap();
        set(serde_json::json!({"web": 0.9}), AT);
        let mut blob = Vec::new();
        for step in 1..=KEEP {
            let v = c.next_batch().unwrap();
            assert_eq!(v.step, step);
            blob = v.cursor.to_vec();
        }
        let served: Vec<Vec<i32>> = (KEEP + 1..KEEP + 11)
            .map(|_| c.next_batch().unwrap().domain.to_vec())
            .collect();
        (blob, served)
    };
    let _ = std::fs::remove_file(&socket);
    let plan_b = Config::load(&b).unwrap().load_plan().unwrap().plan;
    let resumed = plan_b
        .resume(&blob, usize::MAX)
        .unwrap_or_else(|e| panic!("plan B refused the blob of a run with a live change: {e}"));
    assert!(resumed.adopted);
    let mut want = resumed.planner;
    let books = plan_b
        .domain_names()
        .iter()
        .position(|n| *n == "books")
        .unwrap() as i32;
    let serve = Serve::start(&b, &socket, &corpus.dir.join("b.log"));
    let mut c = match Client::connect(&socket, &hello(Some(&blob))) {
        Ok(c) => c,
        Err(e) => panic!("the daemon refused the blob: {e}\n{}", serve.log_text()),
    };
    c.set_timeout(Some(Duration::from_secs(60)));
    assert_eq!(c.welcome().start_step, KEEP + 1);
    let journal = ctl.journal();
    assert_eq!(journal.len(), 1, "{journal:?}");
    assert_eq!(
        journal[0]["points"][0]["weights"]["books"], 0.0,
        "{journal:?}"
    );
    set(serde_json::json!({"books": 0.5}), BOOKS_FROM);
    let plan_b = std::sync::Arc::new(
        plan_b
            .with_journal(vec![
                resumed.plan.journal()[0].clone(),
                (resumed.plan)
                    .weights_change(BOOKS_FROM, &[("books".to_string(), 0.5)].into())
                    .unwrap(),
            ])
            .unwrap(),
    );
    let mut after = plan_b
        .restore(&blob)
        .expect("the blob restores under both changes");
    let mut books_from = None;
    for step in KEEP + 1..BOOKS_FROM + 10 {
        let v = c.next_batch().unwrap();
        assert_eq!(v.step, step);
        let planned = after.next_batch();
        let domains: Vec<i32> = planned.rows.iter().map(|r| i32::from(r.domain)).collect();
        assert_eq!(v.domain, &domains[..], "step {step}");
        let old = (step < BOOKS_FROM).then(|| want.next_batch());
        // A slot published before the books change carries the journal without it.
        assert!(
            v.cursor == &after.cursor()[..] || old.is_some() && v.cursor == &want.cursor()[..],
            "cursor of step {step}"
        );
        if let Some(old) = old {
            // The old run's stream, the same domains (books renumbers code).
            assert_eq!(old, planned, "step {step}");
            if let Some(s) = served.get((step - KEEP - 1) as usize) {
                let names_a = ["web", "code"];
                let names_b = plan_b.domain_names();
                let a: Vec<&str> = s.iter().map(|&d| names_a[d as usize]).collect();
                let b: Vec<&str> = v.domain.iter().map(|&d| names_b[d as usize]).collect();
                assert_eq!(a, b, "step {step}: the old run served other domains");
            }
        } else if v.domain.contains(&books) {
            books_from.get_or_insert(step);
        }
        assert!(
            step >= BOOKS_FROM || !v.domain.contains(&books),
            "books at {step}"
        );
    }
    assert!(
        books_from.is_some(),
        "books never served after the change at {BOOKS_FROM}"
    );
}
