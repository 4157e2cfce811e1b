//! The daemon and the Rust client end to end (issue 4): the real `millrace serve` binary
//! on a synthetic corpus, read through `millrace::client::Client`, every slot compared
//! with what the plan says it must hold (docs/PROTOCOL.md section 4, rebuilt here from
//! the plan's rows and the shards' tokens); resume by cursor, reconnect after a daemon
//! restart, `millrace consume`, a garbage-sending client, `millrace demo`, and release
//! pages (docs/PROTOCOL.md section 5): the same stream as RELEASE frames, a full ring
//! that never stalls, a bad page value that kicks only its peer; and coalesced wakes
//! (`[serve] wake_coalesce_us`): fewer wakes than slots, none held on a full ring; and
//! a TP peer that reconnects before the last one joined does not stand in for it.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{bin, Control, Serve};
use millrace::client::{to_hex, BatchView, Client, ClientError, Hello, SlotLayout};
use millrace::config::{Config, LoadedPlan};
use millrace::plan::{GlobalBatch, Planner};

const SEQ_LEN: u32 = 256;
const ROWS: u32 = 8; // global batch rows: 2 ranks of 4

/// A corpus with its config, in a temp dir that lives as long as this value.
struct Fixture {
    corpus: common::Corpus,
    config: PathBuf,
    socket: PathBuf,
}

/// Writes a 2e6-token, 4-domain corpus (grouped code and books, several shards per
/// domain) and a config with a small geometry and `[serve]` set.
fn fixture(token_dtype: &str) -> Fixture {
    fixture_with(token_dtype, 2, "")
}

/// [`fixture`] with `threads` materializer threads and the `[serve]` lines `extra`.
fn fixture_with(token_dtype: &str, threads: u32, extra: &str) -> Fixture {
    let corpus = common::corpus(2_000_000, 4, 5, 300_000);
    let socket = corpus.dir.join("s.sock");
    // A silent client is closed after 1 s instead of the default 10 s.
    let serve = format!(
        "socket = {:?}\nring_slots = 4\nmaterialize_threads = {threads}\nhandshake_timeout_ms = 1000\ntoken_dtype = {token_dtype:?}\n{extra}",
        socket.to_str().unwrap()
    );
    Fixture {
        config: common::write_config(&corpus.dir, "test.toml", SEQ_LEN, ROWS, &[&serve]),
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
    /// Starts `millrace serve --socket <socket>` (a log of its own per start) and waits
    /// up to 60 s for the socket to accept.
    fn serve(&self) -> Serve {
        let log = self.corpus.dir.join(format!(
            "serve-{}.log",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        let mut s = Serve::spawn(&self.config, &log, |cmd| {
            cmd.arg("--socket").arg(&self.socket);
        });
        s.wait_listening(&self.socket, Duration::from_secs(60));
        s
    }
}

/// One row as PROTOCOL.md section 4 defines it, built from the plan and the shards.
#[derive(Debug, Clone, PartialEq)]
struct Expected {
    tokens: Vec<i64>,
    labels: Vec<i64>,
    loss_mask: Vec<u8>,
    position_ids: Vec<i64>,
    /// cu_seqlens entries of this row (relative to the row's start), without the leading 0.
    cu: Vec<i64>,
    domain: i32,
    loss_tokens: i32,
    real: u64,
}

fn expected_row(loaded: &LoadedPlan, row: &millrace::plan::Row, pad: i64) -> Expected {
    let n = SEQ_LEN as usize;
    let mut t: Vec<i64> = Vec::with_capacity(n + 1);
    let mut piece: Vec<usize> = Vec::with_capacity(n + 1);
    let mut starts = Vec::new();
    for (k, s) in row.segments.iter().enumerate() {
        let shard = &loaded.shards[row.domain as usize][s.shard as usize];
        let doc = shard.doc_tokens(s.doc).unwrap();
        starts.push(t.len());
        for i in s.start..s.start + u64::from(s.len) {
            t.push(doc.get_i64(i as usize).unwrap());
            piece.push(k);
        }
    }
    let real = t.len();
    assert_eq!(real as u32, row.tokens);
    if real < n + 1 {
        starts.push(real);
    }
    while t.len() < n + 1 {
        t.push(pad);
        piece.push(usize::MAX);
    }
    let mut position_ids = Vec::with_capacity(n);
    let mut loss_mask = Vec::with_capacity(n);
    let mut start = 0usize;
    for i in 0..n {
        if i == 0 || piece[i] != piece[i - 1] {
            start = i;
        }
        position_ids.push((i - start) as i64);
        loss_mask.push(u8::from(piece[i] == piece[i + 1] && piece[i] != usize::MAX));
    }
    // Ends of pieces that hold an input (a piece starting at position n is label-only).
    let mut cu = Vec::new();
    for (k, &s) in starts.iter().enumerate() {
        if s >= n {
            continue;
        }
        let end = starts.get(k + 1).copied().unwrap_or(n + 1).min(n);
        cu.push(end as i64);
    }
    Expected {
        tokens: t[..n].to_vec(),
        labels: t[1..].to_vec(),
        loss_mask,
        position_ids,
        cu,
        domain: i32::from(row.domain),
        loss_tokens: row.loss_tokens as i32,
        real: real as u64,
    }
}

fn load(f: &Fixture) -> LoadedPlan {
    Config::load(&f.config).unwrap().load_plan().unwrap()
}

/// Checks one received batch against the plan's global batch for `rank` of `ranks`.
fn check(
    loaded: &LoadedPlan,
    v: &BatchView<'_>,
    batch: &GlobalBatch,
    rank: u32,
    ranks: u32,
    cursor: &[u8],
) {
    let pad = v.pad_token;
    let rows = batch.rank_rows(rank, ranks);
    assert_eq!(v.step, batch.step);
    assert_eq!(v.plan_step, batch.plan_step);
    assert_eq!(v.rows as usize, rows.len());
    assert_eq!(v.seq_len, SEQ_LEN);
    let n = SEQ_LEN as usize;
    let mut cu = vec![0i64];
    let mut real = 0u64;
    let mut loss = 0u64;
    // Copied from an expanded slot, derived from a compact one: either way the arrays
    // PROTOCOL.md section 4 defines.
    let x = v.expanded();
    for (r, row) in rows.iter().enumerate() {
        let e = expected_row(loaded, row, pad);
        let span = r * n..(r + 1) * n;
        let at = format!("step {} rank {rank} row {r}", v.step);
        assert_eq!(x.tokens[span.clone()], e.tokens, "tokens of {at}");
        assert_eq!(x.labels[span.clone()], e.labels, "labels of {at}");
        assert_eq!(
            &x.loss_mask[span.clone()],
            &e.loss_mask[..],
            "loss_mask of {at}"
        );
        let pos: Vec<i64> = x.position_ids[span.clone()]
            .iter()
            .map(|&p| p.into())
            .collect();
        assert_eq!(pos, e.position_ids, "position_ids of {at}");
        assert_eq!(v.domain[r], e.domain, "domain of {at}");
        assert_eq!(
            v.row_loss_tokens[r], e.loss_tokens,
            "row_loss_tokens of {at}"
        );
        assert_eq!(
            u64::from(v.row_real_tokens(r)),
            e.real,
            "real tokens of {at}"
        );
        cu.extend(e.cu.iter().map(|c| c + (r * n) as i64));
        real += e.real;
        loss += e.loss_tokens as u64;
    }
    let got_cu: Vec<i64> = x.cu_seqlens.iter().map(|&c| i64::from(c)).collect();
    assert_eq!(got_cu, cu, "cu_seqlens of step {}", v.step);
    assert_eq!(v.cu_len as usize, cu.len());
    let max = cu.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0);
    assert_eq!(
        i64::from(v.max_seqlen),
        max,
        "max_seqlen of step {}",
        v.step
    );
    assert_eq!(v.real_tokens, real, "real_tokens of step {}", v.step);
    assert_eq!(v.loss_tokens, loss, "loss_tokens of step {}", v.step);
    assert_eq!(v.cursor, cursor, "cursor of step {}", v.step);
}

/// The plan's batches and end-of-step cursors for steps `0..steps`.
fn planned(loaded: &LoadedPlan, steps: u64) -> Vec<(GlobalBatch, Vec<u8>)> {
    let mut p: Planner = loaded.plan.start();
    (0..steps)
        .map(|_| {
            let b = p.next_batch();
            (b, p.cursor())
        })
        .collect()
}

fn hello(rank: u32, job: &str) -> Hello {
    let mut h = Hello::new(rank, 2, ROWS / 2, 1);
    h.job = job.into();
    h
}

/// Peer `name` of two (say TP ranks) of dp rank 1 of job "tp".
fn tp_peer(f: &Fixture, name: &str) -> Client {
    let mut h = hello(1, "tp");
    h.replica = name.into();
    h.replicas = 2;
    connect(f, &h)
}

fn connect(f: &Fixture, h: &Hello) -> Client {
    let mut c = Client::connect(&f.socket, h).unwrap_or_else(|e| panic!("connect: {e}"));
    c.set_timeout(Some(Duration::from_secs(60)));
    c
}

#[test]
fn every_row_equals_the_plan_over_two_ranks() {
    // (token_dtype, slot layout): compact slots carry the shards' uint16 whatever
    // token_dtype says (it is the expanded layout's setting).
    for (dtype, layout) in [
        ("int32", SlotLayout::Compact),
        ("int32", SlotLayout::Expanded),
        ("int64", SlotLayout::Expanded),
        ("shard", SlotLayout::Expanded),
    ] {
        let f = fixture(dtype);
        let _serve = f.serve();
        let loaded = load(&f);
        let steps = if dtype == "int32" { 200 } else { 40 };
        let want = planned(&loaded, steps);
        let mut clients: Vec<Client> = (0..2)
            .map(|r| {
                let mut h = hello(r, "rows");
                h.slot_layout = Some(layout);
                connect(&f, &h)
            })
            .collect();
        for (r, c) in clients.iter().enumerate() {
            let w = c.welcome();
            assert_eq!(w.start_step, 0);
            assert_eq!((w.dp_rank, w.dp_size, w.rows), (r as u32, 2, ROWS / 2));
            assert_eq!(w.seq_len, SEQ_LEN);
            assert_eq!(w.fingerprint, format!("{:032x}", loaded.plan.fingerprint()));
            assert_eq!(w.domains, loaded.plan.domain_names());
            assert_eq!(w.slot_layout, layout);
            let compact = layout == SlotLayout::Compact;
            let field = if compact { "rows" } else { "tokens" };
            let want = if compact || dtype == "shard" {
                "uint16"
            } else {
                dtype
            };
            assert_eq!(w.fields[field].dtype, want);
            assert_eq!(w.token_dtype, want);
        }
        // The geometry exercises padding, several pieces per row and cut documents.
        let rows = want.iter().flat_map(|(b, _)| b.rows.iter());
        let padded = rows.clone().filter(|r| r.tokens <= SEQ_LEN).count();
        let multi = rows.clone().filter(|r| r.segments.len() > 2).count();
        eprintln!("{dtype}: {padded} padded rows, {multi} rows of 3+ pieces");
        assert!(
            padded > 0 && multi > 0,
            "{padded} padded rows, {multi} rows of 3+ pieces"
        );
        // Interleave the ranks, one step each, as data-parallel trainers would.
        for (batch, cursor) in &want {
            for (r, c) in clients.iter_mut().enumerate() {
                let v = c
                    .next_batch()
                    .unwrap_or_else(|e| panic!("step {}: {e}", batch.step));
                check(&loaded, &v, batch, r as u32, 2, cursor);
            }
        }
    }
}

/// The same steps read compact and expanded from one daemon (two jobs): every derived
/// array, `max_seqlen`, every count and each row's bounds in `cu_seqlens` equal the
/// expanded slot's, and the compact slot is the smaller. A HELLO of protocol 1 (a client from before compact slots) is
/// refused with `protocol`, naming the version to use, not served garbage.
#[test]
fn compact_slots_derive_exactly_the_expanded_arrays_and_old_clients_are_refused() {
    let f = fixture("int32");
    let _serve = f.serve();
    let open = |job: &str, layout| {
        let mut h = hello(0, job);
        h.slot_layout = Some(layout);
        connect(&f, &h)
    };
    let mut compact = open("c", SlotLayout::Compact);
    let mut expanded = open("e", SlotLayout::Expanded);
    assert!(compact.welcome().slot_bytes < expanded.welcome().slot_bytes);
    for step in 0..120 {
        let c = compact.next_batch().unwrap();
        let e = expanded.next_batch().unwrap();
        assert_eq!(c.step, step);
        assert_eq!(c.expanded(), e.expanded(), "step {step}");
        // The same tokens, other bytes: what a digest hashed says which.
        assert_eq!(c.token_bytes_kind(), "compact uint16 rows");
        assert_eq!(e.token_bytes_kind(), "expanded int32 inputs");
        let head = |v: &BatchView<'_>| {
            (
                v.step,
                v.plan_step,
                v.cu_len,
                v.max_seqlen,
                v.loss_tokens,
                v.real_tokens,
            )
        };
        assert_eq!(head(&c), head(&e), "step {step}");
        assert_eq!(
            (c.domain, c.row_loss_tokens, c.cursor),
            (e.domain, e.row_loss_tokens, e.cursor)
        );
        assert_eq!(c.inputs_sum(), e.inputs_sum());
        for r in 0..c.rows as usize {
            assert_eq!(
                c.row_real_tokens(r),
                e.row_real_tokens(r),
                "step {step} row {r}"
            );
        }
        assert!(c.payload_bytes() * 4 < e.payload_bytes());
        // Each row's bounds in cu_seqlens, as the derived cu_seqlens (equal to the
        // expanded slot's, above) has them.
        common::check_row_bounds(&c, "compact");
    }
    // A peer that asks the other layout of a live ring is refused (`layout`).
    let mut h = hello(0, "c");
    h.replica = "1".into();
    h.slot_layout = Some(SlotLayout::Expanded);
    match Client::connect(&f.socket, &h) {
        Err(ClientError::Refused { code, message }) => {
            assert_eq!(code, "layout", "{message}");
            assert!(
                message.contains("compact") && message.contains("expanded"),
                "{message}"
            );
        }
        Err(e) => panic!("expected REFUSED layout, got {e}"),
        Ok(_) => panic!("expected REFUSED layout, got a WELCOME"),
    }
    let old = br#"{"protocol":1,"job":"old","dp_rank":0,"dp_size":2}"#;
    let mut bytes = ((old.len() + 1) as u32).to_le_bytes().to_vec();
    bytes.push(1); // HELLO
    bytes.extend_from_slice(old);
    let reply = garbage(&f.socket, &bytes);
    let (kind, body) = first_frame(&reply).expect("a REFUSED frame");
    assert_eq!(kind, 3, "REFUSED");
    assert_eq!(body["code"], "protocol", "{body}");
    let msg = body["message"].as_str().unwrap();
    assert!(
        msg.contains("protocol 1") && msg.contains("speaks protocol 2"),
        "{msg}"
    );
}

#[test]
fn resume_from_a_cursor_equals_an_uninterrupted_run() {
    let f = fixture("int32");
    let _serve = f.serve();
    let loaded = load(&f);
    let want = planned(&loaded, 60);
    // A first client reads 25 steps and keeps the cursor of the last.
    let mut c = connect(&f, &hello(1, "resume"));
    for (batch, cursor) in &want[..25] {
        let v = c.next_batch().unwrap();
        check(&loaded, &v, batch, 1, 2, cursor);
    }
    let blob = c.last_cursor().unwrap().to_vec();
    assert_eq!(c.last_step(), Some(24));
    drop(c);
    // A new connection with that blob continues at step 25, bit for bit.
    let mut h = hello(1, "resume");
    h.cursor = Some(to_hex(&blob));
    let mut c = connect(&f, &h);
    assert_eq!(c.welcome().start_step, 25);
    for (batch, cursor) in &want[25..] {
        let v = c.next_batch().unwrap();
        check(&loaded, &v, batch, 1, 2, cursor);
    }
    // start_step without a cursor seeks.
    let mut h = hello(0, "seek");
    h.start_step = Some(40);
    let mut c = connect(&f, &h);
    assert_eq!(c.welcome().start_step, 40);
    for (batch, cursor) in &want[40..50] {
        let v = c.next_batch().unwrap();
        check(&loaded, &v, batch, 0, 2, cursor);
    }
}

#[test]
fn reconnect_after_a_daemon_restart_continues_exactly() {
    let f = fixture("int32");
    let mut serve = f.serve();
    let loaded = load(&f);
    let want = planned(&loaded, 40);
    let mut c = connect(&f, &hello(0, "restart"));
    // Hold two batches back, so the resume point is the last step handed out,
    // not the last released one.
    c.set_hold(2);
    for (batch, cursor) in &want[..15] {
        let v = c.next_batch().unwrap();
        check(&loaded, &v, batch, 0, 2, cursor);
    }
    serve.kill();
    let _ = std::fs::remove_file(&f.socket);
    let mut serve = f.serve();
    let mut reconnects = 0;
    let mut i = 15;
    while i < want.len() {
        match c.next_batch() {
            Ok(v) => {
                check(&loaded, &v, &want[i].0, 0, 2, &want[i].1);
                i += 1;
            }
            Err(e) => {
                assert!(e.is_transient(), "not transient: {e}");
                c.reconnect(Duration::from_secs(60)).unwrap();
                reconnects += 1;
                assert!(reconnects < 3, "reconnected {reconnects} times");
            }
        }
    }
    assert_eq!(reconnects, 1);
    assert!(serve.alive());
}

fn json(out: &std::process::Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

#[test]
fn consume_reports_the_steps_and_resumes_from_its_cursor_file() {
    let f = fixture("int32");
    let _serve = f.serve();
    let saved = f.corpus.dir.join("cursor.hex");
    let sock = f.socket.to_str().unwrap();
    let out = bin()
        .args([
            "consume",
            "--socket",
            sock,
            "--dp-rank",
            "1",
            "--dp-size",
            "2",
        ])
        .args([
            "--micro-batch-rows",
            "2",
            "--micro-batches",
            "2",
            "--steps",
            "50",
        ])
        .args(["--json", "--touch", "--job", "cli", "--save-cursor"])
        .arg(&saved)
        .output()
        .unwrap();
    let v = json(&out);
    assert_eq!(v["steps"], 50);
    assert_eq!(v["first_step"], 0);
    assert_eq!(v["last_step"], 49);
    assert_eq!(v["tokens"], 50 * 4 * u64::from(SEQ_LEN));
    assert_eq!(v["digest"].as_str().unwrap().len(), 16);
    // The corpus is uint16 and the slots compact (the default): the digest says so.
    assert_eq!(v["digest_of"], "compact uint16 rows");
    let shares: u64 = v["domain_tokens"]
        .as_object()
        .unwrap()
        .values()
        .map(|x| x.as_u64().unwrap())
        .sum();
    assert_eq!(shares, v["real_tokens"].as_u64().unwrap());

    // --config derives the micro-batch rows; --cursor-file resumes after step 49.
    let out = bin()
        .args([
            "consume",
            "--socket",
            sock,
            "--dp-rank",
            "1",
            "--dp-size",
            "2",
        ])
        .arg("--config")
        .arg(&f.config)
        .args(["--steps", "10", "--json", "--job", "cli", "--cursor-file"])
        .arg(&saved)
        .output()
        .unwrap();
    let v = json(&out);
    assert_eq!(v["first_step"], 50);
    assert_eq!(v["last_step"], 59);

    // The same 60 steps in one go give the same tokens as the Rust client.
    let loaded = load(&f);
    let want = planned(&loaded, 60);
    let mut c = connect(&f, &hello(1, "cli-check"));
    let mut d = xxhash_rust::xxh3::Xxh3::new();
    for (i, (batch, cursor)) in want.iter().enumerate() {
        let v = c.next_batch().unwrap();
        check(&loaded, &v, batch, 1, 2, cursor);
        if i >= 50 {
            d.update(v.token_bytes());
        }
    }
    let out2 = bin()
        .args([
            "consume",
            "--socket",
            sock,
            "--dp-rank",
            "1",
            "--dp-size",
            "2",
        ])
        // No micro-batch flags: the daemon gives the whole slice as one micro-batch.
        .args(["--steps", "10", "--json", "--job", "cli2"])
        .args(["--start-step", "50"])
        .output()
        .unwrap();
    let v2 = json(&out2);
    assert_eq!(v2["digest"], v["digest"]);
    assert_eq!(
        v2["digest"].as_str().unwrap(),
        format!("{:016x}", d.digest())
    );
    // A --hold past the ring's slots is lowered, and said (it was lowered in silence).
    let out3 = bin()
        .args([
            "consume",
            "--socket",
            sock,
            "--dp-rank",
            "0",
            "--dp-size",
            "2",
        ])
        .args(["--steps", "5", "--hold", "100", "--job", "cli3"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out3.stderr);
    assert!(out3.status.success(), "{err}");
    assert!(
        err.contains("warning: --hold 100: the ring has") && err.contains("batches are held"),
        "{err}"
    );
}

/// Sends raw bytes on a fresh connection and reads until the daemon closes it;
/// returns what it sent back.
fn garbage(socket: &Path, bytes: &[u8]) -> Vec<u8> {
    let mut s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let _ = s.write_all(bytes);
    let mut back = Vec::new();
    match s.read_to_end(&mut back) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("the daemon did not close a connection that sent {bytes:?}: {e}"),
    }
    back
}

/// (type, JSON payload) of the first frame in `b`.
fn first_frame(b: &[u8]) -> Option<(u8, serde_json::Value)> {
    let (kind, payload, _) =
        millrace::wire::frame::split(b, millrace::wire::MAX_JSON_FRAME).ok()??;
    Some((kind, serde_json::from_slice(payload).ok()?))
}

#[test]
fn garbage_is_closed_while_a_good_client_keeps_streaming() {
    let f = fixture("int32");
    let _serve = f.serve();
    let loaded = load(&f);
    let want = planned(&loaded, 130);
    let mut good = connect(&f, &hello(0, "good"));
    let mut i = 0;
    let mut step = |good: &mut Client, n: usize| {
        for _ in 0..n {
            let v = good.next_batch().unwrap();
            check(&loaded, &v, &want[i].0, 0, 2, &want[i].1);
            i += 1;
        }
    };
    step(&mut good, 20);
    let mut cases: Vec<Vec<u8>> = vec![
        vec![0, 0, 0, 0],                              // len 0
        vec![0xff, 0xff, 0xff, 0xff, 1, 2, 3],         // len too large
        vec![2, 0, 0, 0, 99, 0],                       // unknown type
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(), // not a frame at all
        vec![],                                        // silence: no HELLO in time
    ];
    // A RELEASE before HELLO, and a HELLO that is not JSON.
    cases.push(
        [
            9u32.to_le_bytes().to_vec(),
            vec![4],
            7u64.to_le_bytes().to_vec(),
        ]
        .concat(),
    );
    cases.push([5u32.to_le_bytes().to_vec(), vec![1], b"{{{{".to_vec()].concat());
    for (k, bytes) in cases.iter().enumerate() {
        let t0 = Instant::now();
        let back = garbage(&f.socket, bytes);
        eprintln!("case {k} ({:?}): {:?}", t0.elapsed(), first_frame(&back));
        if let Some((t, v)) = first_frame(&back) {
            assert!(t == 3 || t == 5, "case {k}: frame type {t} ({v})");
            assert!(v["code"].is_string(), "case {k}: {v}");
        }
        step(&mut good, 10);
    }
    // A HELLO longer than any cursor blob of this plan could make it (a request of 1 MiB
    // to a 4-domain daemon) is answered by an ERROR naming the daemon's limit, read no
    // further, and the good client goes on.
    let huge = millrace::wire::frame::encode(1, &vec![b' '; 1 << 20]);
    let back = garbage(&f.socket, &huge);
    match first_frame(&back) {
        Some((5, v)) => {
            let m = v["message"].as_str().unwrap_or_default();
            assert!(
                m.starts_with(&format!("frame length {} is outside 1..=", (1 << 20) + 1)),
                "{v}"
            );
            assert!(m.contains("largest cursor blob"), "{v}");
            assert_eq!(v["code"], "protocol", "{v}");
        }
        other => panic!("a 1 MiB HELLO got {other:?}, not ERROR"),
    }
    step(&mut good, 10);
    // Refusals name the problem and leave the good client alone.
    let mut bad = hello(0, "good");
    bad.micro_batch_rows = Some(3);
    match Client::connect(&f.socket, &bad) {
        Err(ClientError::Refused { code, message }) => {
            assert_eq!(code, "layout", "{message}");
        }
        Err(e) => panic!("expected a layout refusal, got {e}"),
        Ok(_) => panic!("expected a layout refusal, got WELCOME"),
    }
    match Client::connect(&f.socket, &hello(0, "good")) {
        Err(ClientError::Refused { code, .. }) => assert_eq!(code, "duplicate"),
        Err(e) => panic!("expected a duplicate refusal, got {e}"),
        Ok(_) => panic!("expected a duplicate refusal, got WELCOME"),
    }
    let mut wrong = hello(1, "fp");
    wrong.fingerprint = Some("0".repeat(32));
    assert!(matches!(
        Client::connect(&f.socket, &wrong),
        Err(ClientError::Refused { code, .. }) if code == "fingerprint"
    ));
    let mut cursor = hello(1, "cur");
    cursor.cursor = Some("00ff".into());
    assert!(matches!(
        Client::connect(&f.socket, &cursor),
        Err(ClientError::Refused { code, .. }) if code == "cursor"
    ));
    step(&mut good, 30);
}

#[test]
fn demo_with_the_rust_consumer_exits_zero() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("demo");
    let out = bin()
        .args([
            "demo",
            "--consumer",
            "rust",
            "--steps",
            "30",
            "--consumers",
            "2",
        ])
        .args(["--tokens", "2e6", "--dir"])
        .arg(&dir)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}\n{text}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("tokens/s"), "{text}");
    assert!(
        text.contains("(equal)"),
        "delivered mixture differs from the plan:\n{text}"
    );
    assert!(text.contains("step 0 (plan step 0)"), "{text}");
    // The provenance's columns are explained, with this config's row length.
    assert!(text.contains("how to read the provenance:"), "{text}");
    assert!(text.contains("a row holds seq_len + 1 = "), "{text}");
    // The daemon is gone: its socket no longer accepts.
    assert!(UnixStream::connect(dir.join("millrace.sock")).is_err());
}

/// Regression: a rank announced with two replicas whose second never connected (a
/// launcher that started too few TP peers) showed in `status` as a full ring whose
/// producer waited: "the trainer is the bottleneck". It now says which replicas are
/// missing, and counts no producer wait while they are.
#[test]
fn a_ring_waiting_for_a_replica_says_so_and_counts_no_producer_wait() {
    let f = fixture("int32");
    let _serve = f.serve();
    let _a = tp_peer(&f, "a");
    std::thread::sleep(Duration::from_millis(800));
    let st = f.status();
    let ring = &st["jobs"][0]["rings"][0];
    assert_eq!(
        (&ring["joined"], &ring["replicas"]),
        (&1.into(), &2.into()),
        "{ring}"
    );
    assert_eq!(ring["producer_wait_s"].as_f64(), Some(0.0), "{ring}");
    let text = common::status_text(&f.socket);
    assert!(text.contains("a(pid"), "{text}");
    assert!(
        text.contains("waiting for 1 of 2 replicas to join"),
        "{text}"
    );
}

#[test]
fn replicas_of_a_rank_share_its_ring_and_bad_releases_are_errors() {
    let f = fixture("int32");
    let _serve = f.serve();
    let loaded = load(&f);
    let want = planned(&loaded, 30);
    // Two peers (say TP ranks) of dp rank 1 get the same rows.
    let peer = |name: &str| tp_peer(&f, name);
    let mut a = peer("a");
    let mut b = peer("b");
    for (batch, cursor) in &want {
        for c in [&mut a, &mut b] {
            let v = c.next_batch().unwrap();
            check(&loaded, &v, batch, 1, 2, cursor);
        }
    }
    drop((a, b));

    // RELEASE must not decrease: the daemon answers with an ERROR frame and closes. (A
    // client without a release page: with one, a RELEASE frame is only a wake-up.)
    let frames = |job: &str| Hello {
        release_page: false,
        ..hello(0, job)
    };
    let mut c = connect(&f, &frames("release"));
    c.set_hold(3);
    for (batch, cursor) in &want[..4] {
        let v = c.next_batch().unwrap();
        check(&loaded, &v, batch, 0, 2, cursor);
    }
    c.send_frame_unchecked(4, &3u64.to_le_bytes()).unwrap();
    c.send_frame_unchecked(4, &2u64.to_le_bytes()).unwrap();
    let err = (0..8)
        .find_map(|_| c.next_batch().err())
        .expect("a decreasing RELEASE closes the connection");
    assert!(matches!(&err, ClientError::Daemon { .. }), "{err}");
    eprintln!("decreasing RELEASE: {err}");

    // RELEASE past `published` is an error too.
    let mut c = connect(&f, &frames("release2"));
    let _ = c.next_batch().unwrap();
    c.send_frame_unchecked(4, &1_000_000u64.to_le_bytes())
        .unwrap();
    let err = (0..8)
        .find_map(|_| c.next_batch().err())
        .expect("a RELEASE past published closes the connection");
    assert!(matches!(&err, ClientError::Daemon { .. }), "{err}");
    eprintln!("RELEASE past published: {err}");
}

#[test]
fn bench_runs_end_to_end_on_a_tiny_corpus() {
    let tmp = tempfile::tempdir().unwrap();
    let report = tmp.path().join("bench.json");
    let out = bin()
        .args([
            "bench",
            "--tokens",
            "2e6",
            "--seq-len",
            "256",
            "--rows",
            "2",
        ])
        .args([
            "--steps",
            "40",
            "--threads",
            "1,2",
            "--repeat",
            "2",
            "--quiet",
        ])
        .arg("--dir")
        .arg(tmp.path().join("corpus"))
        .arg("--json")
        .arg(&report)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("every run delivered the same tokens"),
        "{text}"
    );
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    let runs = v["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2);
    for r in runs {
        assert_eq!(r["steps"], 40);
        assert_eq!(r["tokens"], 2 * 40 * 2 * 256);
        assert_eq!(r["repeats_tokens_per_s"].as_array().unwrap().len(), 2);
        assert!(r["payload_gb_per_s"].as_f64().unwrap() > 0.0, "{r}");
    }
    assert!(v["memcpy_gb_per_s"].as_f64().unwrap() > 0.0);
}

/// The ring of `job` dp rank `rank` in a STATUS object.
fn ring_of(status: &serde_json::Value, job: &str, rank: u64) -> serde_json::Value {
    let jobs = status["jobs"].as_array().expect("status jobs");
    let j = jobs
        .iter()
        .find(|j| j["job"] == job)
        .unwrap_or_else(|| panic!("no job {job} in {status}"));
    let rings = j["rings"].as_array().expect("job rings");
    rings
        .iter()
        .find(|r| r["dp_rank"] == rank)
        .unwrap_or_else(|| panic!("no ring {rank} of {job} in {status}"))
        .clone()
}

/// A rank that releases through its page and one that sends RELEASE frames read the same
/// bytes at every step; the paged consumer is slow (its 4-slot ring is full while it
/// works), so the daemon sleeps on its page again and again, and must always be woken
/// (by the client's frame or the backstop): 150 steps, each within the client's 10 s.
#[test]
fn release_pages_stream_what_frames_stream_and_a_full_ring_never_stalls() {
    let f = fixture("int32");
    let _serve = f.serve();
    let loaded = load(&f);
    let want = planned(&loaded, 150);
    let mut paged = connect(&f, &hello(0, "pages"));
    let mut framed = connect(
        &f,
        &Hello {
            release_page: false,
            ..hello(0, "frames")
        },
    );
    assert!(paged.has_release_page() && paged.welcome().release_page);
    assert!(!framed.has_release_page() && !framed.welcome().release_page);
    paged.set_timeout(Some(Duration::from_secs(10)));
    // The longest a wait of the paged client lasted past the publish that ended it: a
    // lost wake-up would show as the client's 1 s poll timeout.
    let mut late = 0u64;
    for (i, (batch, cursor)) in want.iter().enumerate() {
        let (bytes, blob) = {
            let v = paged.next_batch().unwrap();
            late = late.max(v.wake_latency_ns.unwrap_or(0));
            check(&loaded, &v, batch, 0, 2, cursor);
            (v.copy_bytes.to_vec(), v.cursor.to_vec())
        };
        let v = framed.next_batch().unwrap();
        assert_eq!(v.step, batch.step);
        assert!(v.copy_bytes == &bytes[..], "slot bytes of step {i} differ");
        assert_eq!(v.cursor, &blob[..], "cursor of step {i}");
        // The trainer's work: long enough that the daemon refills the ring and sleeps.
        if i % 3 == 0 {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    let status = f.status();
    let pages = ring_of(&status, "pages", 0);
    let frames = ring_of(&status, "frames", 0);
    assert_eq!(pages["peers"][0]["release_page"], true, "{pages}");
    assert_eq!(frames["peers"][0]["release_page"], false, "{frames}");
    // Every release was read: status reads the pages first.
    assert_eq!(pages["released_step"], 149, "{pages}");
    let (by_page, by_frame) = (
        pages["page_releases"].as_u64().unwrap(),
        pages["release_frames"].as_u64().unwrap(),
    );
    assert!(by_page > 0, "{pages}");
    // Frames from the paged client are wake-ups only, sent when it is about to wait on a
    // ring the daemon found full: fewer than the frames client's one per two steps.
    let framed_frames = frames["release_frames"].as_u64().unwrap();
    assert!(
        by_frame < framed_frames,
        "{by_frame} wake-up frames, {framed_frames} frames without a page: {pages}"
    );
    assert_eq!(frames["page_releases"], 0, "{frames}");
    assert!(framed_frames >= 50, "{frames}");
    eprintln!(
        "paged: {by_page} page releases, {by_frame} frames; without a page: \
         {framed_frames} frames for 150 steps"
    );

    // Alone, in bursts: the ring fills while the trainer works, the daemon sleeps on the
    // page, and the trainer drains the ring faster than the backstop, so it finds the
    // daemon waiting when it is about to wait itself and wakes it with a frame.
    drop(framed);
    let want = planned(&loaded, 270);
    for (i, (batch, cursor)) in want.iter().enumerate().skip(150) {
        let v = paged.next_batch().unwrap();
        late = late.max(v.wake_latency_ns.unwrap_or(0));
        check(&loaded, &v, batch, 0, 2, cursor);
        if i % 6 == 0 {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    let pages = ring_of(&f.status(), "pages", 0);
    assert_eq!(pages["released_step"], 269, "{pages}");
    eprintln!("bursts: {pages}; longest wake {late} ns");
    assert!(
        late < 900_000_000,
        "a wait outlived its publish by {late} ns"
    );
}

/// The ERROR a client gets after writing `value` into its release page: the daemon reads
/// the page at the next STATUS (or sooner, in a worker) and kicks the peer.
fn kicked_for(f: &Fixture, c: &mut Client, value: u64) -> (String, String) {
    assert!(c.write_page_unchecked(value));
    let _ = f.status();
    match (0..8).find_map(|_| c.next_batch().err()) {
        Some(ClientError::Daemon { code, message }) => (code, message),
        Some(e) => panic!("expected ERROR protocol, got {e}"),
        None => panic!("a bad release page value {value} was not refused"),
    }
}

/// TP peers of one rank each release through a page of their own and read the plan's
/// rows; a client that writes a value past `published`, or one that goes back, is
/// kicked with ERROR `protocol` naming the value, while the TP peers keep streaming.
#[test]
fn a_bad_release_page_kicks_only_its_peer_and_tp_peers_each_have_a_page() {
    let f = fixture("int32");
    let _serve = f.serve();
    let loaded = load(&f);
    let want = planned(&loaded, 40);
    let peer = |name: &str| tp_peer(&f, name);
    let (mut a, mut b) = (peer("a"), peer("b"));
    let read = |range: std::ops::Range<usize>, a: &mut Client, b: &mut Client| {
        for (batch, cursor) in &want[range] {
            for c in [&mut *a, &mut *b] {
                let v = c.next_batch().unwrap();
                check(&loaded, &v, batch, 1, 2, cursor);
            }
        }
    };
    read(0..15, &mut a, &mut b);
    let ring = ring_of(&f.status(), "tp", 1);
    let peers = ring["peers"].as_array().unwrap();
    assert_eq!(peers.len(), 2, "{ring}");
    assert!(peers.iter().all(|p| p["release_page"] == true), "{ring}");
    assert_eq!(ring["released_step"], 14, "{ring}");

    // Past what the ring published.
    let mut bad = connect(&f, &hello(0, "tp"));
    let _ = bad.next_batch().unwrap();
    let (code, message) = kicked_for(&f, &mut bad, 1_000_000);
    assert_eq!(code, "protocol", "{message}");
    assert!(
        message.contains("release page value 1000000 is outside"),
        "{message}"
    );
    read(15..25, &mut a, &mut b);

    // Back below what it released before.
    let mut back = connect(&f, &hello(0, "tp"));
    for _ in 0..4 {
        let _ = back.next_batch().unwrap();
    }
    let before = ring_of(&f.status(), "tp", 0);
    assert_eq!(before["released_step"], 3, "{before}");
    let (code, message) = kicked_for(&f, &mut back, 1);
    assert_eq!(code, "protocol", "{message}");
    assert!(
        message.contains("release page value 1 is outside 3..="),
        "{message}"
    );
    read(25..40, &mut a, &mut b);
}

/// The `wakes` and `wakes_deferred` counters and `published_step` of a STATUS ring.
fn wake_counts(ring: &serde_json::Value) -> (u64, u64, u64) {
    let n = |k: &str| {
        ring[k]
            .as_u64()
            .unwrap_or_else(|| panic!("no {k} in {ring}"))
    };
    (n("wakes"), n("wakes_deferred"), n("published_step"))
}

/// Coalesced wakes (docs/DESIGN.md, "Coalesced wakes"), with the longest bound (100 ms):
/// two ranks streaming get fewer wakes than slots and every row the plan says; a rank
/// that holds 3 of its 4 slots makes each publish fill its ring, and such a publish
/// wakes at once (no wake held past the first slots); with `wake_coalesce_us = 0` every
/// publish wakes and none is held.
#[test]
fn coalesced_wakes_are_fewer_than_slots_and_a_full_ring_wakes_at_once() {
    let f = fixture_with("int32", 1, "wake_coalesce_us = 100000\n");
    let serve = f.serve();
    let loaded = load(&f);
    let want = planned(&loaded, 120);
    let mut ranks: Vec<Client> = (0..2).map(|r| connect(&f, &hello(r, "co"))).collect();
    let mut late = 0u64;
    for (batch, cursor) in &want {
        for (r, c) in ranks.iter_mut().enumerate() {
            let v = c.next_batch().unwrap();
            late = late.max(v.wake_latency_ns.unwrap_or(0));
            check(&loaded, &v, batch, r as u32, 2, cursor);
        }
    }
    let status = f.status();
    for r in 0..2 {
        let ring = ring_of(&status, "co", r);
        let (wakes, deferred, published) = wake_counts(&ring);
        eprintln!("rank {r}: {wakes} wakes, {deferred} held back, {published} published");
        assert!(published >= 120, "{ring}");
        assert!(deferred >= 1, "no wake was held back: {ring}");
        assert!(
            wakes < published,
            "{wakes} wakes for {published} slots: {ring}"
        );
    }
    eprintln!("longest wake {late} ns");
    drop(ranks);

    // Holding 3 of 4 slots, the trainer's next step is always the last one its ring can
    // take: after the first slots, no publish holds its wake back.
    let mut full = connect(&f, &hello(0, "full"));
    full.set_hold(3);
    let t0 = Instant::now();
    let mut late = 0u64;
    for (batch, cursor) in &want[..60] {
        let v = full.next_batch().unwrap();
        late = late.max(v.wake_latency_ns.unwrap_or(0));
        check(&loaded, &v, batch, 0, 2, cursor);
    }
    let took = t0.elapsed();
    let ring = ring_of(&f.status(), "full", 0);
    let (wakes, deferred, published) = wake_counts(&ring);
    eprintln!("full ring: {wakes} wakes, {deferred} held, {published} published in {took:?}; longest wake {late} ns");
    // Filling the empty ring: slots 0 and 2 may wait for 1 and 3; 3 fills it.
    assert!(
        deferred <= 2,
        "a publish that filled the ring held its wake: {ring}"
    );
    assert!(wakes + 2 >= published, "{ring}");
    drop(full);
    drop(serve);

    // Off: one wake per publish.
    let off = fixture_with("int32", 1, "wake_coalesce_us = 0\n");
    let _serve = off.serve();
    let loaded = load(&off);
    let want = planned(&loaded, 40);
    let mut c = connect(&off, &hello(0, "off"));
    for (batch, cursor) in &want {
        let v = c.next_batch().unwrap();
        check(&loaded, &v, batch, 0, 2, cursor);
    }
    let ring = ring_of(&off.status(), "off", 0);
    let (wakes, deferred, published) = wake_counts(&ring);
    assert_eq!((wakes, deferred), (published, 0), "{ring}");
}

/// A HELLO of peer `name` of three (TP ranks) of dp rank 1 of `job`, releasing by
/// frames, resuming from the blob of step `from` of `want` (none: fresh, step 0).
fn three_tp(job: &str, name: &str, from: Option<u64>, want: &[(GlobalBatch, Vec<u8>)]) -> Hello {
    let mut h = hello(1, job);
    h.replica = name.into();
    h.replicas = 3;
    h.release_page = false;
    h.cursor = from.map(|s| to_hex(&want[s as usize - 1].1));
    h
}

/// Connects `h`, saying what the daemon answered when it refused.
fn admitted(f: &Fixture, h: &Hello) -> Client {
    match Client::connect(&f.socket, h) {
        Ok(mut c) => {
            c.set_timeout(Some(Duration::from_secs(60)));
            c
        }
        Err(e) => panic!("replica {:?} was not admitted: {e}", h.replica),
    }
}

/// Polls STATUS until every peer of `job` dp rank 1 has released `upto`, 20 s at most.
fn wait_released(f: &Fixture, job: &str, upto: u64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let ring = ring_of(&f.status(), job, 1);
        let peers = ring["peers"].as_array().cloned().unwrap_or_default();
        if !peers.is_empty() && peers.iter().all(|p| p["released_step"] == upto) {
            return;
        }
        assert!(Instant::now() < deadline, "never released {upto}: {ring}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Review, item 1 (fresh ring): with replicas = 3, peer "a" reconnecting before "c"
/// joined counted as a third peer, so the ring let "a" and "b" release its first step
/// and "c" was refused step 0 (`peer_position`). Distinct replicas count: the ring
/// holds step 0 until "c" joins, and all three read the same steps.
#[test]
fn a_reconnecting_tp_peer_does_not_stand_in_for_the_last_one() {
    let f = fixture("int32");
    let _serve = f.serve();
    let loaded = load(&f);
    let want = planned(&loaded, 8);
    let peer = |name: &str| admitted(&f, &three_tp("fresh", name, None, &want));
    let (a, mut b) = (peer("a"), peer("b"));
    drop(a);
    f.wait_clients(1);
    let mut a = peer("a");
    for c in [&mut a, &mut b] {
        for (batch, cursor) in &want[..4] {
            check(&loaded, &c.next_batch().unwrap(), batch, 1, 2, cursor);
        }
        c.release(4).unwrap();
    }
    wait_released(&f, "fresh", 4);
    let mut c = peer("c");
    assert_eq!(c.welcome().start_step, 0);
    for (batch, cursor) in &want {
        check(&loaded, &c.next_batch().unwrap(), batch, 1, 2, cursor);
    }
    for p in [&mut a, &mut b] {
        for (batch, cursor) in &want[4..] {
            check(&loaded, &p.next_batch().unwrap(), batch, 1, 2, cursor);
        }
    }
}

/// Review, item 1 (resumed ring): "a" and "b" resume from the blob of step 8 and "a"
/// reconnects; "c", resuming from step 5, was refused (the reconnect had started the
/// ring). It must move the ring back to step 5, as it does without the reconnect, and
/// "a" and "b" read on from step 8 once the ring gets there.
#[test]
fn a_reconnecting_resumed_tp_peer_does_not_start_the_ring() {
    let f = fixture("int32");
    let _serve = f.serve();
    let loaded = load(&f);
    let want = planned(&loaded, 12);
    let peer = |name: &str, from: u64| admitted(&f, &three_tp("resumed", name, Some(from), &want));
    let (a, mut b) = (peer("a", 8), peer("b", 8));
    drop(a);
    f.wait_clients(1);
    let mut a = peer("a", 8);
    let mut c = peer("c", 5);
    assert_eq!(c.welcome().start_step, 5);
    for (batch, cursor) in &want[5..] {
        check(&loaded, &c.next_batch().unwrap(), batch, 1, 2, cursor);
    }
    for p in [&mut a, &mut b] {
        for (batch, cursor) in &want[8..] {
            check(&loaded, &p.next_batch().unwrap(), batch, 1, 2, cursor);
        }
    }
}
