//! The daemon across a stage switch (issue 17, item 2): a real `millrace serve` whose
//! plan changes shape at plan step `S` (`[[plan.stage]]`: 16 rows of 64 tokens, then 4
//! rows of 256), read by 2 dp ranks x 2 TP peers through `millrace::client::Client`.
//! Every peer must get the new shape at exactly step `S`, from the same ring (no
//! reconnect), with the tokens `millrace explain` gives for its rank's slice on both
//! sides; a rank resumed from the blob of a step before or after the switch must
//! continue exactly; a client that does not read per-slot shapes is refused.
//!
//! A stage added live (`millrace ctl set-stage`) to a daemon whose config has none,
//! with `[serve] stage_reserve_tokens`: the client gets the new shape at exactly its
//! step on the same connection, the tokens of a config with that `[[plan.stage]]`, and
//! blobs either side of it resume in a fresh daemon; a stage that does not fit the
//! rings, or does not split over the job's dp ranks, is refused while streaming goes on;
//! a resuming TP peer refused for such a stage after it moved its joining ring back
//! leaves the ring where it was.

mod common;

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::Serve;
use millrace::client::{BatchView, Client, ClientError, Hello, SlotArrays, SlotLayout};
use millrace::wire::{frame, kind};

/// The plan step the long stage starts at.
const S: u64 = 6;
/// Steps each peer streams: both sides of the switch.
const STEPS: u64 = 12;
const DP: u32 = 2;
/// (rows per global batch, seq_len) before and after the switch.
const BEFORE: (u32, u32) = (16, 64);
const AFTER: (u32, u32) = (4, 256);

/// A corpus, its two-stage config and the daemon's socket.
struct Fixture {
    corpus: common::Corpus,
    config: PathBuf,
    socket: PathBuf,
}

fn fixture() -> Fixture {
    fixture_to(AFTER)
}

/// The fixture with the long stage at `after` (rows per global batch, seq_len).
fn fixture_to(after: (u32, u32)) -> Fixture {
    let corpus = common::corpus(600_000, 3, 3, 200_000);
    let socket = corpus.dir.join("s.sock");
    let serve = common::serve_toml(&socket, 4, 2);
    let config = common::write_config(&corpus.dir, "stages.toml", BEFORE.1, BEFORE.0, &[&serve]);
    add_stage(&config, after);
    Fixture {
        corpus,
        config,
        socket,
    }
}

/// Appends a `[[plan.stage]]` at step `S` of `after` (rows per global batch, seq_len).
fn add_stage(config: &Path, after: (u32, u32)) {
    let mut text = std::fs::read_to_string(config).unwrap();
    text += &format!(
        "\n[[plan.stage]]\nstep = {S}\nseq_len = {}\nglobal_batch_rows = {}\n",
        after.1, after.0
    );
    std::fs::write(config, text).unwrap();
}

/// What a peer kept of one step: its shape, its rows' `seq_len + 1` tokens each, and
/// its cursor blob.
#[derive(Debug, Clone, PartialEq)]
struct Got {
    step: u64,
    plan_step: u64,
    rows: u32,
    seq_len: u32,
    tokens: Vec<Vec<i64>>,
    cursor: Vec<u8>,
}

/// The rows of `v` as `seq_len + 1` tokens each: the compact rows as they are, or the
/// expanded inputs with each row's last label appended. A compact slot's `row_bounds`
/// are checked on the way.
fn got(v: &BatchView<'_>) -> Got {
    let (rows, l) = (v.rows as usize, v.seq_len as usize);
    if matches!(v.arrays, SlotArrays::Compact { .. }) {
        // At each stage's own shape, as its header says.
        common::check_row_bounds(v, "stages");
    }
    let tokens = match v.arrays {
        SlotArrays::Compact { rows: ids, .. } => (0..rows)
            .map(|r| {
                (0..=l)
                    .map(|j| ids.get_i64(r * (l + 1) + j).unwrap())
                    .collect()
            })
            .collect(),
        SlotArrays::Expanded { .. } => {
            let e = v.expanded();
            (0..rows)
                .map(|r| {
                    let mut t = e.tokens[r * l..(r + 1) * l].to_vec();
                    t.push(e.labels[(r + 1) * l - 1]);
                    t
                })
                .collect()
        }
    };
    Got {
        step: v.step,
        plan_step: v.plan_step,
        rows: v.rows,
        seq_len: v.seq_len,
        tokens,
        cursor: v.cursor.to_vec(),
    }
}

/// Streams `n` steps with `hello`, keeping each.
fn stream(socket: &Path, hello: &Hello, n: u64) -> Vec<Got> {
    let mut c = Client::connect(socket, hello).unwrap();
    c.set_timeout(Some(Duration::from_secs(60)));
    let out = (0..n).map(|_| got(&c.next_batch().unwrap())).collect();
    out
}

impl Fixture {
    /// A running daemon on the fixture's config, accepting on its socket.
    fn serve(&self) -> Serve {
        let log = self.corpus.dir.join("serve.log");
        let mut serve = Serve::spawn(&self.config, &log, |_| {});
        serve.wait_listening(&self.socket, Duration::from_secs(60));
        serve
    }
}

/// A HELLO of `rank` of the job `job`, peer `replica` of `replicas`.
fn hello(job: &str, rank: u32, replica: &str, replicas: u32) -> Hello {
    Hello {
        job: job.into(),
        replica: replica.into(),
        replicas,
        ..Hello::whole_slice(rank, DP)
    }
}

#[test]
fn two_ranks_of_two_peers_get_the_new_shape_at_the_switch_and_resume_either_side() {
    let f = fixture();
    let mut serve = f.serve();

    // 2 dp ranks x 2 TP peers, each its own thread: one ring per rank, read by both.
    let peers: Vec<(u32, String, std::thread::JoinHandle<Vec<Got>>)> = (0..DP)
        .flat_map(|r| ["tp0", "tp1"].map(|p| (r, p.to_string())))
        .map(|(r, p)| {
            let (socket, h) = (f.socket.clone(), hello("run", r, &p, 2));
            (r, p, std::thread::spawn(move || stream(&socket, &h, STEPS)))
        })
        .collect();
    let mut by_rank: Vec<Vec<Got>> = vec![Vec::new(); DP as usize];
    for (r, p, t) in peers {
        let steps = t.join().unwrap();
        for g in &steps {
            // The new shape at exactly step S, per rank: rows / dp_size.
            let (rows, seq) = if g.step < S { BEFORE } else { AFTER };
            assert_eq!(
                (g.rows, g.seq_len, g.plan_step),
                (rows / DP, seq, g.step),
                "rank {r} {p} step {}",
                g.step
            );
            assert_eq!(g.tokens.len(), (rows / DP) as usize);
        }
        assert_eq!(steps.len() as u64, STEPS);
        match &by_rank[r as usize] {
            first if first.is_empty() => by_rank[r as usize] = steps,
            first => assert_eq!(first, &steps, "the TP peers of rank {r} differ"),
        }
    }
    for r in 0..DP {
        // pad_token = 0 in the synthetic config.
        let want = common::explained_rows(&f.config, 0, STEPS, (r, DP), 0);
        let got = &by_rank[r as usize];
        assert_eq!(want.len(), got.len());
        for (g, (step, rows)) in got.iter().zip(&want) {
            assert_eq!(g.step, *step);
            assert_eq!(
                &g.tokens, rows,
                "rank {r} step {step}: tokens differ from explain"
            );
        }
    }

    // Resume one rank from the blob of the steps around the switch: S - 2 (resumes
    // before it), S - 1 (the step just before it: resumes at its first step), S + 1
    // (resumes after it). Compact and expanded slots alike.
    let rank0 = &by_rank[0];
    for (k, from) in [S - 2, S - 1, S + 1].into_iter().enumerate() {
        for layout in [SlotLayout::Compact, SlotLayout::Expanded] {
            let mut h = hello(&format!("resume{k}{}", layout.as_str()), 0, "0", 1);
            h.cursor = Some(millrace::client::to_hex(&rank0[from as usize].cursor));
            h.slot_layout = Some(layout);
            let n = STEPS - from - 1;
            let again = stream(&f.socket, &h, n);
            assert_eq!(
                again.as_slice(),
                &rank0[from as usize + 1..],
                "rank 0 resumed from the blob of step {from} ({} slots)",
                layout.as_str()
            );
        }
    }

    // A client that does not read per-slot shapes (a HELLO without `stages`, as every
    // client before stages sent) is refused, naming the switch.
    let old = serde_json::to_vec(&hello("old", 0, "0", 1)).unwrap();
    assert!(!String::from_utf8_lossy(&old).contains("stages"));
    let mut sock = UnixStream::connect(&f.socket).unwrap();
    frame::write_to(&mut sock, kind::HELLO, &old).unwrap();
    let (k, body) = frame::read_from(&mut sock).unwrap();
    let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        (k, body["code"].as_str()),
        (kind::REFUSED, Some("protocol")),
        "{body}"
    );
    let message = body["message"].as_str().unwrap();
    assert!(
        message.contains(&format!("at plan step {S}")) && message.contains("stages: true"),
        "{message}"
    );
    serve.kill();
}

/// A dp_size that divides the first stage's rows but not a later stage's is refused
/// when the client connects, naming the stage, instead of failing at the switch.
#[test]
fn a_dp_size_that_does_not_divide_a_later_stage_is_refused() {
    let f = fixture();
    let mut serve = f.serve();
    // 8 divides 16 (the first stage's rows) but not 4.
    match Client::connect(&f.socket, &Hello::whole_slice(0, 8)) {
        Err(ClientError::Refused { code, message }) => {
            assert_eq!(code, "dp_size", "{message}");
            assert!(
                message.contains(&format!(
                    "dp_size 8 does not divide global_batch_rows 4 of the stage at plan step {S}"
                )),
                "{message}"
            );
        }
        Err(e) => panic!("expected a dp_size refusal, got {e}"),
        Ok(_) => panic!("dp_size 8 was served a stage of 4 rows"),
    }
    serve.kill();
    // `explain` refuses it too, naming the stage, instead of listing for rank 2 the
    // rows of no rank (none: rows [1, 1) of 4) and for rank 3 row 1.
    for step in [0, S] {
        let out = common::bin()
            .args(["explain", "--config"])
            .arg(&f.config)
            .args([
                "--step",
                &step.to_string(),
                "--dp-rank",
                "2",
                "--dp-size",
                "8",
            ])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "step {step}: {err}");
        assert!(
            err.contains(&format!(
                "--dp-size 8 does not divide global_batch_rows 4 of the stage at plan step {S}"
            )),
            "{err}"
        );
    }
}

impl common::Control for Fixture {
    fn control_socket(&self) -> &Path {
        &self.socket
    }
}

/// `status` counts each delivered step's token positions at that step's own stage
/// (rows of the rank x seq_len), not at the first stage's shape: here the long stage
/// has twice the tokens per step, so the two counts differ.
#[test]
fn status_counts_delivered_tokens_at_each_steps_stage() {
    use common::Control;
    const LONG: (u32, u32) = (4, 512);
    let f = fixture_to(LONG);
    let mut serve = f.serve();
    let mut c = Client::connect(&f.socket, &hello("count", 0, "0", 1)).unwrap();
    c.set_timeout(Some(Duration::from_secs(60)));
    for _ in 0..STEPS {
        c.next_batch().unwrap();
    }
    let st = f.status();
    let ring = &st["jobs"][0]["rings"][0];
    let delivered = ring["batches_delivered"].as_u64().unwrap();
    assert!(delivered > S, "steps on both sides of the switch: {ring}");
    let want: u64 = (0..delivered)
        .map(|s| {
            let (rows, seq) = if s < S { BEFORE } else { LONG };
            u64::from(rows / DP) * u64::from(seq)
        })
        .sum();
    assert_eq!(ring["tokens_delivered"].as_u64(), Some(want), "{ring}");
    drop(c);
    serve.kill();
}

/// The stage the live test adds at `S` (rows per global batch, seq_len): 8192 tokens
/// per dp rank per step, 16 times the first stage's 512, so it needs the reserve.
const LIVE: (u32, u32) = (4, 4096);
/// Tokens per dp rank per step the live test's rings reserve: exactly `LIVE`'s.
const RESERVE: u64 = 8192;

/// `millrace ctl --socket SOCKET set-stage ARGS`: (succeeded, stdout + stderr).
fn ctl_set_stage(socket: &Path, args: &[&str]) -> (bool, String) {
    let out = common::bin()
        .args(["ctl", "--socket"])
        .arg(socket)
        .arg("set-stage")
        .args(args)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[test]
fn a_stage_added_live_is_served_at_its_step_and_resumes_in_a_fresh_daemon() {
    use common::Control;
    let corpus = common::corpus(600_000, 3, 3, 200_000);
    let socket = corpus.dir.join("live.sock");
    let plain = common::serve_toml(&socket, 4, 2);
    let reserve = format!("stage_reserve_tokens = {RESERVE}");
    // The daemon's config has no stage; the reference config has the one added live.
    let dir = &corpus.dir;
    let live = common::write_config(dir, "live.toml", BEFORE.1, BEFORE.0, &[&plain, &reserve]);
    let reference = common::write_config(dir, "ref.toml", BEFORE.1, BEFORE.0, &[&plain]);
    add_stage(&reference, LIVE);
    let unreserved = common::write_config(dir, "plain.toml", BEFORE.1, BEFORE.0, &[&plain]);
    let mut f = Fixture {
        corpus,
        config: live,
        socket,
    };
    let mut serve = f.serve();
    let mut c = Client::connect(&f.socket, &hello("run", 0, "0", 1)).unwrap();
    c.set_timeout(Some(Duration::from_secs(60)));
    // One step read and held: nothing at or past S can have been published (4 slots).
    let mut steps = vec![got(&c.next_batch().unwrap())];

    // Refused, and nothing changes: more tokens than the rings have room for (the
    // message names both sizes and the option), rows that dp_size 2 cannot split.
    let at = S.to_string();
    let set = |seq: &str, rows: &str| {
        let args = [
            "--at-step",
            &at,
            "--seq-len",
            seq,
            "--global-batch-rows",
            rows,
        ];
        ctl_set_stage(&f.socket, &args)
    };
    let (ok, text) = set("32768", "4");
    assert!(!ok, "{text}");
    assert!(
        text.contains("invalid")
            && text.contains("needs")
            && text.contains("bytes")
            && text.contains("stage_reserve_tokens"),
        "{text}"
    );
    let (ok, text) = set("64", "3");
    assert!(!ok && text.contains("dp_size 2 does not divide"), "{text}");
    // A client that reads slots at WELCOME's shape (its HELLO lacks `stages`) would
    // misread the new stage: refused while it is connected.
    let old_hello = serde_json::to_vec(&hello("old", 0, "0", 1)).unwrap();
    let mut sock = UnixStream::connect(&f.socket).unwrap();
    frame::write_to(&mut sock, kind::HELLO, &old_hello).unwrap();
    assert_eq!(frame::read_from(&mut sock).unwrap().0, kind::WELCOME);
    let (ok, text) = set(&LIVE.1.to_string(), &LIVE.0.to_string());
    assert!(!ok && text.contains("lacks `stages: true`"), "{text}");
    drop(sock);
    f.wait_clients(1);
    // Accepted: the long stage at S, as the reference config has it.
    let (ok, text) = set(&LIVE.1.to_string(), &LIVE.0.to_string());
    assert!(
        ok && text.contains(&format!("applied from step {S}")),
        "{text}"
    );
    assert!(
        f.journal()[0]["stage"]["seq_len"] == LIVE.1,
        "{:?}",
        f.journal()
    );

    // The same connection streams on, and the new shape comes at exactly step S.
    while steps.len() < STEPS as usize {
        steps.push(got(&c.next_batch().unwrap()));
    }
    drop(c);
    for g in &steps {
        let (rows, seq) = if g.step < S { BEFORE } else { LIVE };
        assert_eq!((g.rows, g.seq_len), (rows / DP, seq), "step {}", g.step);
    }
    let want = common::explained_rows(&reference, 0, STEPS, (0, DP), 0);
    for (g, (step, rows)) in steps.iter().zip(&want) {
        assert_eq!(
            (g.step, &g.tokens),
            (*step, rows),
            "step {step} differs from explain"
        );
    }
    // `explain` of the daemon's own config reads the config alone, so from S on it
    // shows rows the daemon did not serve: it says so, naming the change's step and the
    // way out; before S it has nothing to say.
    // A blob made before the change (step 0's, read before it was sent) is as stale as
    // none; one made after it is not.
    let explain = |step: u64, blob: Option<u64>| {
        let mut cmd = common::bin();
        cmd.args(["explain", "--config"])
            .arg(&f.config)
            .args(["--step", &step.to_string()]);
        if let Some(b) = blob {
            let path = f.corpus.dir.join(format!("blob{b}.hex"));
            std::fs::write(&path, millrace::client::to_hex(&steps[b as usize].cursor)).unwrap();
            cmd.arg("--resume-blob").arg(path);
        }
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    for blob in [None, Some(0)] {
        let text = explain(S, blob);
        assert!(
            text.contains(&format!(
                "1 live change(s), of which this plan lacks the one at step {S}"
            )) && text.contains("--resume-blob"),
            "blob {blob:?}: {text}"
        );
    }
    let text = explain(S - 2, None);
    assert!(!text.contains("live change"), "{text}");
    let text = explain(S + 2, Some(S + 1));
    assert!(!text.contains("live change"), "{text}");
    serve.kill();

    // A fresh daemon on the stage-less config without a reserve. While another job's
    // ring (sized for the config's stage alone) streams, a blob bringing the stage is
    // refused with the fit message; once that job left, blobs from the step before S
    // and after it resume bit for bit, in rings sized for the blob's stages.
    f.config = unreserved;
    let mut serve = f.serve();
    let mut other = Client::connect(&f.socket, &hello("other", 0, "0", 1)).unwrap();
    other.set_timeout(Some(Duration::from_secs(60)));
    other.next_batch().unwrap();
    let resume = |from: u64| {
        let mut h = hello(&format!("resume{from}"), 0, "0", 1);
        h.cursor = Some(millrace::client::to_hex(&steps[from as usize].cursor));
        h
    };
    match Client::connect(&f.socket, &resume(S - 1)) {
        Err(ClientError::Refused { code, message }) => {
            assert_eq!(code, "cursor", "{message}");
            assert!(message.contains("stage_reserve_tokens"), "{message}");
        }
        Err(e) => panic!("expected a cursor refusal, got {e}"),
        Ok(_) => panic!("a blob's stage was served in a ring without room for it"),
    }
    drop(other);
    f.wait_clients(0);
    for from in [S - 1, S + 1] {
        let again = stream(&f.socket, &resume(from), STEPS - from - 1);
        assert_eq!(
            again.as_slice(),
            &steps[from as usize + 1..],
            "resumed after {from}"
        );
    }
    serve.kill();
}

/// A live stage of more rows lets a batch-grouped domain with a one-row cap have more
/// groups spanning batches at once, each state in every cursor blob: past the room the
/// cursor field was sized with at start, it is refused (naming the way out), while the
/// same stage in the config serves, and a stage of fewer rows is taken live.
#[test]
fn a_live_stage_whose_spanning_groups_outgrow_the_cursor_field_is_refused() {
    let corpus = common::corpus(600_000, 3, 3, 200_000);
    let socket = corpus.dir.join("g.sock");
    let serve = common::serve_toml(&socket, 4, 2);
    let reserve = "stage_reserve_tokens = 200000";
    let config = common::write_config(&corpus.dir, "g.toml", 64, 64, &[&serve, reserve]);
    // The code domain in batch grouping with a share of 1/1024: one row per group in a
    // batch of 64 rows, and still one in a batch of 1024.
    let text = std::fs::read_to_string(&config).unwrap();
    let mut doc: toml::Table = toml::from_str(&text).unwrap();
    let domains = doc["corpus"]["domain"].as_array().unwrap().clone();
    let code = domains
        .iter()
        .position(|d| d["name"].as_str() == Some("code"));
    let code = code.expect("the synthetic corpus has a code domain");
    let grouping: toml::Table =
        toml::from_str("mode = \"batch\"\nmax_share = 0.0009765625\n").unwrap();
    let corpus_table = doc.get_mut("corpus").unwrap().as_table_mut().unwrap();
    let list = corpus_table
        .get_mut("domain")
        .unwrap()
        .as_array_mut()
        .unwrap();
    list[code]
        .as_table_mut()
        .unwrap()
        .insert("grouping".into(), toml::Value::Table(grouping));
    std::fs::write(&config, toml::to_string(&doc).unwrap()).unwrap();
    let f = Fixture {
        corpus,
        config,
        socket,
    };
    let mut daemon = f.serve();
    let mut c = Client::connect(&f.socket, &hello("g", 0, "0", 1)).unwrap();
    c.set_timeout(Some(Duration::from_secs(60)));
    c.next_batch().unwrap();
    let set = |rows: &str| {
        let args = [
            "--at-step",
            "40",
            "--seq-len",
            "16",
            "--global-batch-rows",
            rows,
        ];
        ctl_set_stage(&f.socket, &args)
    };
    // 1024 rows: up to 1026 groups spanning, against 66 at start.
    let (ok, text) = set("1024");
    assert!(!ok, "{text}");
    assert!(
        text.contains("span more batches at once than the cursor field was sized for")
            && text.contains("[[plan.stage]]"),
        "{text}"
    );
    // Fewer rows than at start: fewer groups span, and the stage is taken.
    let (ok, text) = set("32");
    assert!(ok && text.contains("applied from step 40"), "{text}");
    for _ in 0..45 {
        c.next_batch().unwrap();
    }
    drop(c);
    daemon.kill();
    // The refused stage, written into the config, serves past its switch.
    add_stage(&f.config, (1024, 16));
    let mut daemon = f.serve();
    let mut c = Client::connect(&f.socket, &hello("g2", 0, "0", 1)).unwrap();
    c.set_timeout(Some(Duration::from_secs(60)));
    let mut last = None;
    for _ in 0..S + 3 {
        last = Some(c.next_batch().unwrap().rows);
    }
    assert_eq!(
        last,
        Some(1024 / DP),
        "the config's stage of 1024 rows is served"
    );
    drop(c);
    daemon.kill();
}

/// Review, item 3: a resuming TP peer that moves its joining ring back and is then
/// refused (its blob's journal brings a stage the rings have no room for: adopting it
/// fails) leaves the ring where it was, at the step its waiting peers resume from; they
/// and the third peer, rejoining with their blob, read on from there, past the refused
/// stage's step. (The ring used to stay at the refused client's step, with that client's
/// planner: it planned the refused stage at its step, and the ring failed there.)
#[test]
fn a_refused_join_that_moved_its_ring_back_leaves_it_where_it_was() {
    use common::Control;
    use millrace::client::to_hex;
    // The live stage's step, past every step served here; where the waiting peers
    // resume; where the refused one does.
    const AT: u64 = 30;
    const START: u64 = 9;
    const EARLY: u64 = 5;
    let corpus = common::corpus(600_000, 3, 3, 200_000);
    let socket = corpus.dir.join("s.sock");
    let plain = common::serve_toml(&socket, 4, 2);
    let reserve = format!("stage_reserve_tokens = {RESERVE}");
    let dir = &corpus.dir;
    let live = common::write_config(dir, "live.toml", BEFORE.1, BEFORE.0, &[&plain, &reserve]);
    let unreserved = common::write_config(dir, "plain.toml", BEFORE.1, BEFORE.0, &[&plain]);
    let mut f = Fixture {
        corpus,
        config: live,
        socket,
    };
    // The blob of step EARLY under a journal with a stage at AT, added before any client.
    let mut serve = f.serve();
    let (at, seq, rows) = (AT.to_string(), LIVE.1.to_string(), LIVE.0.to_string());
    let args = [
        "--at-step",
        &at,
        "--seq-len",
        &seq,
        "--global-batch-rows",
        &rows,
    ];
    let (ok, text) = ctl_set_stage(&f.socket, &args);
    assert!(ok, "{text}");
    let early = stream(&f.socket, &hello("seed", 0, "0", 1), EARLY);
    let early = early.last().map(|g| g.cursor.clone()).unwrap();
    serve.kill();
    // The blob of step START without it, as the plain config plans it.
    let loaded = millrace::config::Config::load(&unreserved)
        .unwrap()
        .load_plan()
        .unwrap();
    let mut planner = loaded.plan.start();
    for _ in 0..START {
        planner.next_batch();
    }
    let blob = planner.cursor();

    // A daemon whose rings have no room for the stage: "a" and "b" wait at START.
    f.config = unreserved.clone();
    let mut serve = f.serve();
    let tp = |name: &str, cursor: &[u8]| Hello {
        cursor: Some(to_hex(cursor)),
        ..hello("run", 0, name, 3)
    };
    let connect = |h: &Hello| {
        let mut c = Client::connect(&f.socket, h)
            .unwrap_or_else(|e| panic!("replica {:?} was not admitted: {e}", h.replica));
        c.set_timeout(Some(Duration::from_secs(60)));
        c
    };
    let mut a = connect(&tp("a", &blob));
    let mut b = connect(&tp("b", &blob));
    // "c" resumes earlier (the ring moves back to it), and its blob's stage is refused.
    match Client::connect(&f.socket, &tp("c", &early)) {
        Err(ClientError::Refused { code, message }) => {
            assert_eq!(code, "cursor", "{message}");
            assert!(message.contains("stage_reserve_tokens"), "{message}");
        }
        Err(e) => panic!("expected a cursor refusal, got {e}"),
        Ok(_) => panic!("a blob's stage was adopted into a ring without room for it"),
    }
    let ring = f.status()["jobs"][0]["rings"][0].clone();
    assert_eq!(
        ring["published_step"], START,
        "the refused client left the ring moved back: {ring}"
    );
    let mut c = connect(&tp("c", &blob));
    assert_eq!(c.welcome().start_step, START);
    let want = common::explained_rows(&f.config, START, AT + 4 - START, (0, DP), 0);
    for (step, rows) in &want {
        for (name, p) in [("a", &mut a), ("b", &mut b), ("c", &mut c)] {
            let g = got(&p.next_batch().unwrap());
            assert_eq!((g.step, &g.tokens), (*step, rows), "{name} at step {step}");
        }
    }
    serve.kill();
}
