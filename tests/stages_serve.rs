//! The daemon across a stage switch (issue 17, item 2): a real `millrace serve` whose
//! plan changes shape at plan step `S` (`[[plan.stage]]`: 16 rows of 64 tokens, then 4
//! rows of 256), read by 2 dp ranks x 2 TP peers through `millrace::client::Client`.
//! Every peer must get the new shape at exactly step `S`, from the same ring (no
//! reconnect), with the tokens `millrace explain` gives for its rank's slice on both
//! sides; a rank resumed from the blob of a step before or after the switch must
//! continue exactly; a client that does not read per-slot shapes is refused.

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
    let mut text = std::fs::read_to_string(&config).unwrap();
    text += &format!(
        "\n[[plan.stage]]\nstep = {S}\nseq_len = {}\nglobal_batch_rows = {}\n",
        after.1, after.0
    );
    std::fs::write(&config, text).unwrap();
    Fixture {
        corpus,
        config,
        socket,
    }
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
/// expanded inputs with each row's last label appended.
fn got(v: &BatchView<'_>) -> Got {
    let (rows, l) = (v.rows as usize, v.seq_len as usize);
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
                message.contains(&format!("stage at plan step {S} 4")),
                "{message}"
            );
        }
        Err(e) => panic!("expected a dp_size refusal, got {e}"),
        Ok(_) => panic!("dp_size 8 was served a stage of 4 rows"),
    }
    serve.kill();
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
