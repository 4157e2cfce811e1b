//! One planner per job (issue 15 item 2) and plan checkpoints kept while serving (issue
//! 16 item 2), end to end: real `millrace serve` processes, real sockets. Every rank's
//! rows equal what `millrace explain` lists for its slice; one rank resuming from an old
//! blob, a live weight change and a stalled rank leave every stream exact; the job's
//! window stays within its bound (read from /metrics); and a `plan --from` after the
//! daemon served restores a checkpoint the daemon wrote.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use common::{Control, Serve};
use millrace::client::{to_hex, BatchView, Client, Hello};
use millrace::config::{Config, LoadedPlan};

const SEQ_LEN: u32 = 64;
const RANKS: u32 = 4;
/// Global batch rows: 2 per rank.
const ROWS: u32 = 8;
const SLOTS: u64 = 4;
/// `[serve] prefetch_steps` (the default).
const PREFETCH: u64 = 4;
/// The most batches a job's plan holds at [`BIG_ROWS`]: slots + prefetch, the plan
/// thread's 2^13 rows' worth ahead (at least 32 steps), and 2^15 rows' worth, at least 64
/// (docs/DESIGN.md, "One planner per job").
const KEEP: u64 = SLOTS + PREFETCH + 32 + 64;
/// Global batch rows at which 2^15 rows are 64 batches (the least the window holds):
/// [`KEEP`] batches then, and a stall of a few hundred steps overflows it.
const BIG_ROWS: u32 = 512;

struct Fixture {
    corpus: common::Corpus,
    config: PathBuf,
    socket: PathBuf,
    metrics: String,
    /// Killed with the fixture.
    _serve: Serve,
}

impl Control for Fixture {
    fn control_socket(&self) -> &Path {
        &self.socket
    }
}

/// A 3-domain corpus and a daemon with `rows` global rows, metrics on a free port and
/// `[corpus] cache_dir` in the corpus directory.
fn fixture(seed: u64, rows: u32) -> Fixture {
    // The copy threads plan inline: these tests bound what a claim plans. The plan
    // thread (the default) has a test of its own below.
    fixture_with(seed, rows, "plan_thread = false\n")
}

/// [`fixture`] with the `[serve]` keys of `serve_extra` added.
fn fixture_with(seed: u64, rows: u32, serve_extra: &str) -> Fixture {
    let corpus = common::corpus(1_500_000, 3, seed, 300_000);
    let socket = corpus.dir.join("s.sock");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port();
    let metrics = format!("127.0.0.1:{port}");
    let serve = common::serve_toml(&socket, SLOTS, 2);
    let extra = format!("metrics_addr = {metrics:?}\n{serve_extra}");
    let config = common::write_config(&corpus.dir, "job.toml", SEQ_LEN, rows, &[&serve, &extra]);
    let mut doc: toml::Table = toml::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    let cache = corpus.dir.join("cache");
    doc["corpus"]
        .as_table_mut()
        .unwrap()
        .insert("cache_dir".into(), cache.to_str().unwrap().into());
    std::fs::write(&config, toml::to_string(&doc).unwrap()).unwrap();
    let serve = Serve::start(&config, &socket, &corpus.dir.join("serve.log"));
    Fixture {
        corpus,
        config,
        socket,
        metrics,
        _serve: serve,
    }
}

impl Fixture {
    fn loaded(&self) -> LoadedPlan {
        Config::load(&self.config).unwrap().load_plan().unwrap()
    }

    fn connect(&self, job: &str, rank: u32, replica: &str, cursor: Option<&[u8]>) -> Client {
        let mut h = Hello::whole_slice(rank, RANKS);
        h.job = job.into();
        h.replica = replica.into();
        h.replicas = if replica == "0" { 1 } else { 2 };
        h.cursor = cursor.map(to_hex);
        let mut c = Client::connect(&self.socket, &h).unwrap_or_else(|e| panic!("connect: {e}"));
        c.set_timeout(Some(Duration::from_secs(60)));
        c
    }

    /// The value of metric `name` for `job` once /metrics shows one that `ok` accepts
    /// (the exporter refreshes every second); panics after 30 s with what it shows.
    fn metric(&self, name: &str, job: &str, ok: impl Fn(f64) -> bool) -> f64 {
        let series = format!("{name}{{job=\"{job}\"}} ");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let mut text = String::new();
            if let Ok(mut s) = std::net::TcpStream::connect(&self.metrics) {
                let _ = s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n");
                let _ = s.read_to_string(&mut text);
            }
            let v = text.lines().find_map(|l| l.strip_prefix(&series));
            if let Some(v) = v.and_then(|v| v.trim().parse().ok()).filter(|&v| ok(v)) {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "/metrics: no good {series}:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The plan checkpoint files in `[corpus] cache_dir` below plan step 250 (the daemon's
    /// planner may pass 256 meanwhile), sorted.
    fn checkpoint_files(&self) -> Vec<PathBuf> {
        let dir = self.corpus.dir.join("cache").join("plan-checkpoints");
        let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
            .into_iter()
            .flatten()
            .flatten()
            .flat_map(|fp| std::fs::read_dir(fp.path()).unwrap().flatten())
            .map(|e| e.path())
            .filter(|p| {
                let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
                let step = name.get(..16).and_then(|h| u64::from_str_radix(h, 16).ok());
                name.ends_with(".ckpt") && step < Some(250)
            })
            .collect();
        v.sort();
        v
    }

    /// A client of job `job` reading the whole global batch, after it read `steps`.
    fn whole_batches(&self, job: &str, steps: u64) -> Client {
        let mut h = Hello::whole_slice(0, 1);
        h.job = job.into();
        let mut c = Client::connect(&self.socket, &h).unwrap_or_else(|e| panic!("connect: {e}"));
        c.set_timeout(Some(Duration::from_secs(60)));
        for _ in 0..steps {
            c.next_batch().unwrap();
        }
        c
    }

    /// Waits (30 s at most) until the daemon has written `n` [`Fixture::checkpoint_files`].
    fn await_checkpoints(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.checkpoint_files().len() < n {
            let files = self.checkpoint_files();
            assert!(Instant::now() < deadline, "the daemon wrote {files:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `millrace plan --from 250 --steps 3` with `extra` flags, in JSON without its
    /// timings and memory (which vary).
    fn plan_from_250(&self, extra: &[&str]) -> serde_json::Value {
        let mut args = vec!["--from", "250", "--steps", "3", "--window", "1", "--json"];
        args.extend(extra);
        let mut v: serde_json::Value =
            serde_json::from_slice(&self.millrace("plan", &args)).unwrap();
        let o = v.as_object_mut().unwrap();
        o.remove("timings_ms");
        o.remove("memory_kb");
        v
    }

    /// The output of `millrace <cmd> --config <config> <args>`, which must succeed.
    fn millrace(&self, cmd: &str, args: &[&str]) -> Vec<u8> {
        let out = common::bin()
            .env("XDG_CACHE_HOME", self.corpus.tmp.path())
            .args([cmd, "--config"])
            .arg(&self.config)
            .args(args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "millrace {cmd} {args:?}: {err}");
        out.stdout
    }

    /// `millrace explain` of steps `from..from + count` for `rank`: per step, the
    /// rank's rows as the token ids they hold (read from the shards).
    fn explained(
        &self,
        loaded: &LoadedPlan,
        from: u64,
        count: u64,
        rank: u32,
    ) -> Vec<Vec<Vec<i64>>> {
        let [from, count, rank, ranks] =
            [from, count, rank.into(), RANKS.into()].map(|n: u64| n.to_string());
        let out = self.millrace(
            "explain",
            &[
                "--step",
                &from,
                "--count",
                &count,
                "--dp-rank",
                &rank,
                "--dp-size",
                &ranks,
                "--json",
                "--no-checkpoints",
            ],
        );
        let names = loaded.plan.domain_names();
        String::from_utf8(out)
            .unwrap()
            .lines()
            .map(|line| {
                let e: serde_json::Value = serde_json::from_str(line).unwrap();
                let rows = e["rows"].as_array().unwrap();
                rows.iter()
                    .map(|row| row_tokens(loaded, &names, row))
                    .collect()
            })
            .collect()
    }
}

/// The tokens one explained row holds, its segments read from the shards in order.
fn row_tokens(loaded: &LoadedPlan, names: &[&str], row: &serde_json::Value) -> Vec<i64> {
    let d = names.iter().position(|n| *n == row["domain"]).unwrap();
    let mut t = Vec::new();
    for s in row["segments"].as_array().unwrap() {
        let shard = loaded
            .plan
            .shard_names(d)
            .iter()
            .position(|n| *n == s["shard"]);
        let doc = loaded.shards[d][shard.unwrap()]
            .doc_tokens(s["doc"].as_u64().unwrap())
            .unwrap();
        for i in s["start"].as_u64().unwrap()..s["end"].as_u64().unwrap() {
            t.push(doc.get_i64(i as usize).unwrap());
        }
    }
    t
}

/// What a client read at one step: the step, its rows' real tokens, the cursor.
#[derive(Debug, Clone, PartialEq)]
struct Got {
    step: u64,
    rows: Vec<Vec<i64>>,
    cursor: Vec<u8>,
}

fn got(v: &BatchView<'_>) -> Got {
    let n = SEQ_LEN as usize;
    let x = v.expanded();
    let rows = (0..v.rows as usize)
        .map(|r| {
            let real = (v.row_real_tokens(r) as usize).min(n);
            x.tokens[r * n..r * n + real].to_vec()
        })
        .collect();
    Got {
        step: v.step,
        rows,
        cursor: v.cursor.to_vec(),
    }
}

fn read(c: &mut Client, steps: u64) -> Vec<Got> {
    (0..steps)
        .map(|_| got(&c.next_batch().unwrap_or_else(|e| panic!("next_batch: {e}"))))
        .collect()
}

/// Checks `got` (consecutive steps from `from`) against `explain`'s rows for `rank`
/// (cut to a row's `seq_len` inputs) and, unless empty, the plan's cursors.
fn check(got: &[Got], want: &[Vec<Vec<i64>>], cursors: &[Vec<u8>], from: u64, rank: u32) {
    for (i, g) in got.iter().enumerate() {
        let step = from + i as u64;
        assert_eq!(g.step, step, "rank {rank}");
        let rows: Vec<Vec<i64>> = want[step as usize]
            .iter()
            .map(|r| r[..r.len().min(SEQ_LEN as usize)].to_vec())
            .collect();
        assert_eq!(g.rows, rows, "rank {rank} step {step}");
        if !cursors.is_empty() {
            assert_eq!(
                g.cursor, cursors[step as usize],
                "cursor of rank {rank} step {step}"
            );
        }
    }
}

/// Cursors after each of steps `0..steps` of the plan (the same for every rank).
fn cursors(loaded: &LoadedPlan, steps: u64) -> Vec<Vec<u8>> {
    let mut p = loaded.plan.start();
    (0..steps)
        .map(|_| {
            p.next_batch();
            p.cursor()
        })
        .collect()
}

/// 4 dp ranks of 2 TP peers each, free-running on threads of their own: every peer
/// reads exactly its rank's slice of `explain`, and the job's planner planned each step
/// once (not once per rank), none privately.
#[test]
fn four_ranks_of_two_peers_read_their_slices_of_one_plan() {
    const K: u64 = 60;
    let f = fixture(31, ROWS);
    let loaded = f.loaded();
    let cursors = cursors(&loaded, K);
    let threads: Vec<_> = (0..RANKS)
        .flat_map(|r| ["a", "b"].map(|p| (r, p)))
        .map(|(r, p)| {
            let mut c = f.connect("tp", r, p, None);
            std::thread::spawn(move || (r, read(&mut c, K), c))
        })
        .collect();
    let mut by_rank: BTreeMap<u32, Vec<Vec<Got>>> = BTreeMap::new();
    // The clients stay connected (so the job stays) until the figures are read.
    let mut clients = Vec::new();
    for t in threads {
        let (r, g, c) = t.join().unwrap();
        by_rank.entry(r).or_default().push(g);
        clients.push(c);
    }
    for (r, peers) in &by_rank {
        let want = f.explained(&loaded, 0, K, *r);
        for g in peers {
            check(g, &want, &cursors, 0, *r);
        }
    }
    // Each rank's ring is filled up to its slots past what its peers hold, and the job
    // plans `prefetch` steps past the most advanced ring.
    let planned = f.metric("millrace_job_batches_planned_total", "tp", |v| {
        v >= K as f64
    });
    assert!(
        planned <= (K + SLOTS + PREFETCH + 1) as f64,
        "the job planned {planned} batches for {K} steps of {RANKS} ranks"
    );
    let private = f.metric("millrace_private_batches_planned_total", "tp", |_| true);
    assert_eq!(private, 0.0);
    drop(clients);
}

/// With `[serve] plan_thread`, the plan thread plans the job's batches outside the hub's
/// lock: every rank still reads exactly its slice of `explain` with the plan's cursors,
/// each step is planned once, and the thread planned some of them.
#[test]
fn the_plan_thread_plans_each_step_once_and_the_bytes_are_the_plans() {
    const K: u64 = 600;
    const AHEAD: u64 = 512;
    let f = fixture_with(35, ROWS, "plan_thread = true\n");
    let loaded = f.loaded();
    let cursors = cursors(&loaded, K);
    let threads: Vec<_> = (0..RANKS)
        .map(|r| {
            let mut c = f.connect("ahead", r, "0", None);
            std::thread::spawn(move || (r, read(&mut c, K), c))
        })
        .collect();
    let mut clients = Vec::new();
    for t in threads {
        let (r, g, c) = t.join().unwrap();
        check(&g, &f.explained(&loaded, 0, K, r), &cursors, 0, r);
        clients.push(c);
    }
    let planned = f.metric("millrace_job_batches_planned_total", "ahead", |v| {
        v >= K as f64
    });
    // The thread plans 8192 rows, at most 512 steps, beyond a worker's reach
    // (`thread_ahead`, src/serve/hub/ahead.rs): less than K, so planning the steps twice
    // would break the bound.
    assert!(
        planned <= (K + SLOTS + PREFETCH + AHEAD + 1) as f64,
        "the job planned {planned} batches for {K} steps of {RANKS} ranks"
    );
    f.metric("millrace_job_batches_planned_ahead_total", "ahead", |v| {
        v > 0.0
    });
    let private = f.metric("millrace_private_batches_planned_total", "ahead", |_| true);
    assert_eq!(private, 0.0);
    drop(clients);
}

/// Rank 2 goes back to a blob of step 10 while the other ranks stream on: it plans on
/// its own until it is back inside the job's window, and every rank's stream stays
/// exactly the plan's.
#[test]
fn one_rank_resumes_from_an_old_blob_while_the_others_stream() {
    const K: u64 = 160;
    const BACK: u64 = 10;
    const FIRST: u64 = 40;
    let f = Arc::new(fixture(32, ROWS));
    let loaded = f.loaded();
    let cursors = cursors(&loaded, K);
    let barrier = Arc::new(Barrier::new(RANKS as usize));
    let threads: Vec<_> = (0..RANKS)
        .map(|r| {
            let (f, barrier) = (f.clone(), barrier.clone());
            let mut c = f.connect("resume", r, "0", None);
            std::thread::spawn(move || {
                let mut g = read(&mut c, FIRST);
                barrier.wait();
                if r == 2 {
                    let blob = g[BACK as usize - 1].cursor.clone();
                    drop(c);
                    c = f.connect("resume", r, "0", Some(&blob));
                    assert_eq!(c.welcome().start_step, BACK);
                    g = read(&mut c, K - BACK);
                } else {
                    g.extend(read(&mut c, K - FIRST));
                }
                (r, g, c)
            })
        })
        .collect();
    let mut clients = Vec::new();
    for t in threads {
        let (r, g, c) = t.join().unwrap();
        let from = if r == 2 { BACK } else { 0 };
        check(&g, &f.explained(&loaded, 0, K, r), &cursors, from, r);
        clients.push(c);
    }
    // Rank 2 went back behind the job's window, so it planned some steps itself.
    f.metric("millrace_private_batches_planned_total", "resume", |v| {
        v > 0.0
    });
    drop(clients);
}

/// A job that restarts on fewer or more GPUs (a node lost, a node added) resumes from
/// any rank's blob at any dp_size that divides the global batch: a blob names the step
/// of the global batch, not a slice of it. At dp_size 2 and 8, each rank reads exactly
/// the rows the dp_size-4 ranks would have read at those steps, regrouped.
#[test]
fn a_job_resumes_on_fewer_or_more_ranks_from_any_ranks_blob() {
    const BLOB: u64 = 12;
    const MORE: u64 = 20;
    let f = fixture_with(33, ROWS, "");
    let loaded = f.loaded();
    let want: Vec<_> = (0..RANKS)
        .map(|r| f.explained(&loaded, 0, BLOB + MORE, r))
        .collect();
    let mut first = f.connect("elastic", 3, "0", None);
    let blob = read(&mut first, BLOB)[BLOB as usize - 1].cursor.clone();
    drop(first);
    for size in [2u32, 8] {
        let job = format!("elastic{size}");
        let mut clients: Vec<Client> = (0..size)
            .map(|r| {
                let mut h = Hello::whole_slice(r, size);
                h.job = job.clone();
                h.cursor = Some(to_hex(&blob));
                let c = Client::connect(&f.socket, &h).unwrap_or_else(|e| panic!("connect: {e}"));
                assert_eq!(c.welcome().start_step, BLOB, "dp_size {size}");
                c
            })
            .collect();
        let per = (ROWS / size) as usize;
        for step in BLOB..BLOB + MORE {
            // The global batch of `step`, rank by rank of dp_size 4, cut to the inputs.
            let global: Vec<Vec<i64>> = (want.iter())
                .flat_map(|rank| rank[step as usize].iter())
                .map(|row| row[..row.len().min(SEQ_LEN as usize)].to_vec())
                .collect();
            let mut states = std::collections::BTreeSet::new();
            for (r, c) in clients.iter_mut().enumerate() {
                let v = c.next_batch().unwrap_or_else(|e| panic!("next_batch: {e}"));
                states.insert(v.plan_state);
                let g = got(&v);
                assert_eq!(g.step, step);
                assert_eq!(
                    g.rows,
                    global[r * per..(r + 1) * per],
                    "dp_size {size} rank {r} step {step}"
                );
            }
            // Every rank's slot carries the step's plan state, and it is set.
            assert_eq!(states.len(), 1, "dp_size {size} step {step}: {states:?}");
            assert!(!states.contains(&0));
        }
    }
}

/// A weight change while 4 ranks stream applies at the same step for all of them: the
/// steps before the change are the config's, and from it on every rank reads its slice
/// of the global batch the changed plan makes (with the same cursor).
#[test]
fn a_live_weight_change_applies_to_every_rank_at_one_step() {
    const K: u64 = 80;
    const AT: u64 = 40;
    let f = Arc::new(fixture(33, ROWS));
    let loaded = f.loaded();
    let before = cursors(&loaded, 10);
    let barrier = Arc::new(Barrier::new(RANKS as usize + 1));
    let threads: Vec<_> = (0..RANKS)
        .map(|r| {
            let barrier = barrier.clone();
            let mut c = f.connect("live", r, "0", None);
            std::thread::spawn(move || {
                let mut g = read(&mut c, 10);
                barrier.wait();
                barrier.wait();
                g.extend(read(&mut c, K - 10));
                (r, g)
            })
        })
        .collect();
    // The ranks read steps 0..10 (published before the change: the config's cursors),
    // then the change comes at step 40.
    barrier.wait();
    let first = loaded.plan.domain_names()[0].to_string();
    let weights: BTreeMap<String, f64> = [(first, 50.0)].into();
    let r = f.req(millrace::control::set_weights_request(
        &weights,
        Some(AT),
        millrace::control::Late::Refuse,
    ));
    assert_eq!(r["ok"], true, "{r}");
    barrier.wait();
    let got: BTreeMap<u32, Vec<Got>> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    // The plan after the change, from the cursor every rank got at the change's step.
    let blob = &got[&0][AT as usize - 1].cursor;
    let resumed = loaded
        .plan
        .resume(blob, 1 << 20)
        .expect("the daemon's cursor resumes");
    assert!(
        resumed.adopted,
        "the cursor at step {AT} carries the change"
    );
    let mut p = resumed.planner;
    let mut after = Vec::new();
    let mut batches = Vec::new();
    for _ in AT..K {
        batches.push(p.next_batch());
        after.push(p.cursor());
    }
    let mut old = loaded.plan.seek(AT);
    assert!(
        batches.iter().any(|b| b.counts != old.next_batch().counts),
        "the change altered the mixture"
    );
    let names = loaded.plan.domain_names();
    for (r, g) in &got {
        let want = f.explained(&loaded, 0, AT, *r);
        check(&g[..AT as usize], &want, &[], 0, *r);
        assert_eq!(
            g[..10].iter().map(|x| &x.cursor).collect::<Vec<_>>(),
            before[..10].iter().collect::<Vec<_>>()
        );
        for (i, b) in batches.iter().enumerate() {
            let g = &g[AT as usize + i];
            assert_eq!(g.step, b.step);
            assert_eq!(g.cursor, after[i], "cursor of rank {r} step {}", b.step);
            let rows: Vec<Vec<i64>> = millrace::plan::explain::explain(&resumed.plan, b, *r, RANKS)
                .rows
                .iter()
                .map(|row| {
                    let v = serde_json::to_value(row).unwrap();
                    let t = row_tokens(&loaded, &names, &v);
                    t[..t.len().min(SEQ_LEN as usize)].to_vec()
                })
                .collect();
            assert_eq!(g.rows, rows, "rank {r} step {}", b.step);
        }
    }
}

/// A rank that connects and reads nothing while another streams far ahead: the job
/// holds at most its bound of batches (the daemon's memory does not grow with the
/// stall), and the stalled rank, once it reads, gets exactly its slice.
#[test]
fn a_stalled_rank_does_not_grow_the_jobs_window() {
    const K: u64 = 2 * KEEP;
    let f = fixture(34, BIG_ROWS);
    let loaded = f.loaded();
    let cursors = cursors(&loaded, K);
    let mut stalled = f.connect("stall", 1, "0", None);
    let mut c = f.connect("stall", 0, "0", None);
    let g = read(&mut c, K);
    check(&g, &f.explained(&loaded, 0, K, 0), &cursors, 0, 0);
    // Once the exporter has seen the whole run: the job planned past K.
    f.metric("millrace_job_batches_planned_total", "stall", |v| {
        v >= K as f64
    });
    let held = f.metric("millrace_job_batches_held", "stall", |_| true);
    assert!(
        held <= KEEP as f64,
        "the job holds {held} batches, over its bound {KEEP}"
    );
    assert!(held > 0.0);
    let g = read(&mut stalled, 20);
    check(&g, &f.explained(&loaded, 0, 20, 1), &cursors, 0, 1);
    f.metric("millrace_private_batches_planned_total", "stall", |v| {
        v > 0.0
    });
    let s = f.status();
    assert_eq!(
        s["jobs"][0]["rings"].as_array().map(Vec::len),
        Some(2),
        "{s}"
    );
}

/// The daemon leaves a plan checkpoint each time its job planner passes a multiple of
/// the interval (64 plan steps at 1024 rows); `plan --from` on the same cache restores
/// the last one (it writes none of the earlier ones again, which it would if it
/// replayed from step 0) and prints what the plain replay prints.
#[test]
fn plan_from_restores_a_checkpoint_the_daemon_wrote_while_serving() {
    const BIG: u32 = 1024;
    let f = fixture(35, BIG);
    let c = f.whole_batches("ckpt", 200);
    let files = || f.checkpoint_files();
    f.await_checkpoints(3);
    let names = |v: Vec<PathBuf>| -> Vec<String> {
        v.iter()
            .map(|p| p.file_name().unwrap().to_string_lossy()[..16].to_string())
            .collect()
    };
    assert_eq!(
        names(files()),
        ["0000000000000040", "0000000000000080", "00000000000000c0"]
    );
    drop(c);
    // Only the daemon's checkpoint at 192 stays.
    for p in &files()[..2] {
        std::fs::remove_file(p).unwrap();
    }
    let plan = |extra: &[&str]| f.plan_from_250(extra);
    let from_daemon = plan(&[]);
    assert_eq!(
        names(files()),
        ["00000000000000c0"],
        "the seek started from 192"
    );
    assert_eq!(from_daemon, plan(&["--no-checkpoints"]));
}

/// A live change scheduled far ahead (weights from step 100,000) is in the journal of
/// every checkpoint the daemon writes meanwhile. `plan --from` (a plan without the
/// change, as `explain` or a restarted daemon has) skipped them all and replayed from
/// step 0; they plan every step before the change as it does, so it restores the
/// daemon's last one (writing none of its own below it) and prints the plain replay's
/// output.
#[test]
fn plan_from_restores_a_checkpoint_written_under_a_change_ahead() {
    const BIG: u32 = 1024;
    let f = fixture(36, BIG);
    let first = f.loaded().plan.domain_names()[0].to_string();
    let weights: BTreeMap<String, f64> = [(first, 50.0)].into();
    let r = f.req(millrace::control::set_weights_request(
        &weights,
        Some(100_000),
        millrace::control::Late::Refuse,
    ));
    assert_eq!(r["ok"], true, "{r}");
    let c = f.whole_batches("ahead", 200);
    drop(c);
    f.await_checkpoints(3);
    let files = || f.checkpoint_files();
    let daemons = files();
    let plan = |extra: &[&str]| f.plan_from_250(extra);
    let from_daemon = plan(&[]);
    assert_eq!(files(), daemons, "the seek started from the daemon's 192");
    assert_eq!(from_daemon, plan(&["--no-checkpoints"]));
}
