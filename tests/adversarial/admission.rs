//! Adversarial tests: admission (see main.rs). Hostile HELLOs and control requests
//! against a real `millrace serve`: far start steps, a seek abandoned by its client,
//! another job's ring, the ring-memory budget, forged names, and live changes aimed at
//! the end of time. Each test keeps a well-behaved consumer streaming and checks that it
//! still is afterwards.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use millrace::client::{Client, ClientError, Hello};
use millrace::config::plan::MAX_STEP;
use millrace::wire::frame::{encode, kind};
use serde_json::json;

use crate::common::{self, Control, Serve};

const ROWS: u32 = 4;
const TIMEOUT: Duration = Duration::from_secs(30);

/// A small corpus, its config and a daemon on it.
struct Fixture {
    corpus: common::Corpus,
    config: PathBuf,
    socket: PathBuf,
    daemon: Serve,
}

impl Control for Fixture {
    fn control_socket(&self) -> &std::path::Path {
        &self.socket
    }
}

/// A daemon over a 2-domain corpus with `extra` `[serve]` lines.
fn fixture(extra: &str) -> Fixture {
    fixture_with(extra, |_| {})
}

/// [`fixture`] with the daemon's command tweaked (environment, arguments).
fn fixture_with(extra: &str, tweak: impl FnOnce(&mut std::process::Command)) -> Fixture {
    let corpus = common::corpus(300_000, 2, 14, 100_000);
    let socket = corpus.dir.join("s.sock");
    let serve = common::serve_toml(&socket, 4, 1);
    let config = common::write_config(&corpus.dir, "adm.toml", 128, ROWS, &[&serve, extra]);
    let mut daemon = Serve::spawn(&config, &corpus.tmp.path().join("serve.log"), tweak);
    daemon.wait_listening(&socket, Duration::from_secs(30));
    Fixture {
        corpus,
        config,
        socket,
        daemon,
    }
}

fn hello(job: &str) -> Hello {
    let mut h = Hello::whole_slice(0, 1);
    h.job = job.into();
    h
}

fn connect(f: &Fixture, h: &Hello) -> Result<Client, ClientError> {
    let mut c = Client::connect(&f.socket, h)?;
    c.set_timeout(Some(TIMEOUT));
    Ok(c)
}

/// The refusal code and message of a HELLO the daemon must refuse.
fn refused(f: &Fixture, h: &Hello) -> (String, String) {
    match connect(f, h) {
        Err(ClientError::Refused { code, message }) => (code, message),
        Err(e) => panic!("HELLO {h:?}: expected REFUSED, got {e}"),
        Ok(_) => panic!("HELLO {h:?}: expected REFUSED, got WELCOME"),
    }
}

/// A daemon whose `[serve] ring_memory_bytes` holds two and a half rings of `h`'s shape
/// (read from a probe daemon's WELCOME), and that ring's size.
fn room_for_two_and_a_half(h: &Hello) -> (Fixture, u64) {
    let probe = fixture("");
    let ring = connect(&probe, h)
        .expect("probe joins")
        .welcome()
        .ring_bytes;
    drop(probe);
    let f = fixture(&format!("ring_memory_bytes = {}", 2 * ring + ring / 2));
    (f, ring)
}

/// Connects every HELLO of `hellos` at once, each from a thread of its own: what a job's
/// start looks like to the daemon.
fn join_at_once(f: &Fixture, hellos: Vec<Hello>) -> Vec<Result<Client, ClientError>> {
    std::thread::scope(|s| {
        let joins: Vec<_> = (hellos.iter())
            .map(|h| s.spawn(move || connect(f, h)))
            .collect();
        (joins.into_iter())
            .map(|j| j.join().expect("no panic"))
            .collect()
    })
}

/// Reads `n` more steps from `c` and checks they follow on.
fn stream(c: &mut Client, n: u64) {
    for _ in 0..n {
        let want = c.next_step();
        let b = c
            .next_batch()
            .unwrap_or_else(|e| panic!("step {want}: {e}"));
        assert_eq!(b.step, want);
    }
}

/// Polls `f` every 50 ms until it returns true or `limit` passes.
fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Issue 14, item 4: a HELLO with start_step 2^40 made the daemon allocate 4 TB and
/// abort, one with 2^62 panicked on "capacity overflow", and a client that asked for a
/// far step and left kept a thread seeking. Now the far steps are refused with `limit`,
/// an abandoned seek is cancelled (the log says so), and another consumer streams on.
#[test]
fn far_start_steps_are_refused_and_abandoned_seeks_cancelled() {
    let mut f = fixture("");
    let mut good = connect(&f, &hello("good")).expect("good consumer joins");
    stream(&mut good, 5);
    for step in [1u64 << 40, 1 << 62, u64::MAX] {
        let mut h = hello("far");
        h.start_step = Some(step);
        let (code, message) = refused(&f, &h);
        assert_eq!(code, "limit", "{message}");
        assert!(
            message.contains("start_step") && message.contains(&step.to_string()),
            "{message}"
        );
        assert!(
            f.daemon.alive(),
            "the daemon died:\n{}",
            f.daemon.log_text()
        );
        stream(&mut good, 2);
    }
    // The furthest step allowed takes far longer to seek than any test waits: a client
    // asks for it and hangs up. Its seek stops at the next chunk.
    let h = json!({"protocol": millrace::wire::TRAINER_VERSION, "job": "leaver", "dp_rank": 0, "dp_size": 1,
                   "start_step": millrace::config::plan::MAX_STEP});
    for _ in 0..2 {
        let mut s = UnixStream::connect(&f.socket).unwrap();
        s.write_all(&encode(kind::HELLO, h.to_string().as_bytes()))
            .unwrap();
        std::thread::sleep(Duration::from_millis(300));
        drop(s);
    }
    wait_until(
        "both seeks to be cancelled",
        Duration::from_secs(60),
        || f.daemon.log_text().matches("left during admission").count() >= 2,
    );
    stream(&mut good, 8);
    assert!(f.daemon.alive());
    let st = f.status();
    assert!(
        st["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .all(|j| j["job"] != "leaver"),
        "{st}"
    );
}

/// A client that sends more than a frame while its seek runs broke the protocol: it used
/// to be closed without a word and logged as a client that left. It now gets ERROR
/// `protocol` naming the bytes and the limit, as it would after its WELCOME, its seek is
/// cancelled, and the log says why; other clients stream on.
#[test]
fn bytes_past_a_frame_during_admission_get_a_protocol_error() {
    use std::io::Read;
    let mut f = fixture("");
    let mut good = connect(&f, &hello("good")).expect("good consumer joins");
    stream(&mut good, 2);
    let mut s = raw_seeker(&f, "eager", MAX_STEP);
    std::thread::sleep(Duration::from_millis(200));
    let _ = s.write_all(&vec![0u8; 70_000]);
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut back = Vec::new();
    let _ = s.read_to_end(&mut back);
    let (k, v) = crate::connections::first_frame(&back).expect("an ERROR frame");
    assert_eq!(k, kind::ERROR, "{v}");
    assert_eq!(v["code"], "protocol", "{v}");
    let m = v["message"].as_str().unwrap_or_default();
    assert!(
        m.contains("bytes sent before WELCOME") && m.contains("65540"),
        "{m}"
    );
    wait_until("the log to say why", Duration::from_secs(20), || {
        f.daemon
            .log_text()
            .contains("protocol error during admission")
    });
    assert!(!f.daemon.log_text().contains("left during admission"));
    stream(&mut good, 4);
    assert!(f.daemon.alive());
}

/// Every HELLO's admission (a blob restore or a seek) used to take a blocking thread of
/// its own at once: 24 clients asking for far steps and staying connected held 24
/// threads seeking, each with a seek's memory, and a large job's start sends every
/// rank's HELLO together. Now at most `admission_slots` (the cores, 4 to 16) run; the
/// rest wait without a thread, and those whose clients leave never start.
#[test]
fn a_flood_of_seeking_hellos_takes_a_bounded_number_of_threads() {
    let mut f = fixture("");
    let threads = |pid: libc::pid_t| -> usize {
        let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let line = text.lines().find(|l| l.starts_with("Threads:")).unwrap();
        line[8..].trim().parse().unwrap()
    };
    let mut good = connect(&f, &hello("good")).expect("good consumer joins");
    stream(&mut good, 3);
    let before = threads(f.daemon.pid());
    let h = json!({"protocol": millrace::wire::TRAINER_VERSION, "job": "flood", "dp_rank": 0,
                   "dp_size": 1, "start_step": millrace::config::plan::MAX_STEP});
    let flood: Vec<UnixStream> = (0..24)
        .map(|_| {
            let mut s = UnixStream::connect(&f.socket).unwrap();
            s.write_all(&encode(kind::HELLO, h.to_string().as_bytes()))
                .unwrap();
            s
        })
        .collect();
    std::thread::sleep(Duration::from_millis(1500));
    let slots = std::thread::available_parallelism().map_or(4, |n| n.get().clamp(4, 16));
    let during = threads(f.daemon.pid());
    assert!(
        during <= before + slots + 2,
        "24 pending admissions took {} threads (slots {slots})",
        during.saturating_sub(before)
    );
    stream(&mut good, 3);
    drop(flood);
    wait_until(
        "every flood admission to end",
        Duration::from_secs(60),
        || f.daemon.log_text().matches("left during admission").count() >= 24,
    );
    // With the slots free again, a new client is admitted at once.
    let mut next = connect(&f, &hello("next")).expect("a client after the flood joins");
    stream(&mut next, 3);
    assert!(f.daemon.alive());
}

/// Issue 14, item 6: a HELLO naming another job's dp rank with replica "evil" was
/// admitted although the job declared replicas = 1, and the victim's ring stalled until
/// the intruder left. Now a peer past the declared count, or one whose `replicas`
/// disagrees, is refused with `replicas`, and the victim keeps streaming.
#[test]
fn replicas_intrusion_is_refused_and_the_victim_streams_on() {
    let mut f = fixture("");
    let mut victim = connect(&f, &hello("victim")).expect("victim joins");
    stream(&mut victim, 3);
    // The intruder asks for a step the victim's ring still holds, so only the peer count
    // can stop it: the victim's last batch, which it holds until it reads the next (its
    // RELEASE frames cover only the steps before it, however late the daemon reads them;
    // `released_step` from status could be overtaken by a RELEASE still in flight).
    let held = victim.last_step().expect("the victim read steps");
    let mut evil = hello("victim");
    evil.replica = "evil".into();
    evil.start_step = Some(held);
    let (code, message) = refused(&f, &evil);
    assert_eq!(code, "replicas", "{message}");
    assert!(
        message.contains("replicas = 1") && message.contains("\"evil\""),
        "{message}"
    );
    evil.replicas = 2;
    let (code, message) = refused(&f, &evil);
    assert_eq!(code, "replicas", "{message}");
    assert!(message.contains("this client says 2"), "{message}");
    // The victim did not stall: it reads well past its ring's slots.
    stream(&mut victim, 12);

    // A ring of two declared peers takes two, not a third.
    let mut tp = hello("tp");
    tp.replicas = 2;
    let peer = |name: &str| {
        let mut h = tp.clone();
        h.replica = name.into();
        h
    };
    let mut a = connect(&f, &peer("tp0")).expect("tp0 joins");
    let mut b = connect(&f, &peer("tp1")).expect("tp1 joins");
    let (code, message) = refused(&f, &peer("tp2"));
    assert_eq!(code, "replicas", "{message}");
    for _ in 0..6 {
        stream(&mut a, 1);
        stream(&mut b, 1);
    }
    stream(&mut victim, 4);
    assert!(f.daemon.alive());
}

/// Issue 14, item 7: every new job pre-faulted a ring with no total bound, so a stream
/// of HELLOs could exhaust the node. Now `[serve] ring_memory_bytes` caps all rings
/// together: a job past it is refused with `memory`, the jobs inside keep streaming, the
/// budget is in `status`, and a ring that goes frees its share.
#[test]
fn ring_budget_refuses_jobs_past_it() {
    // One ring's size, from a daemon with the default budget.
    let probe = fixture("");
    let c = connect(&probe, &hello("probe")).expect("probe joins");
    let ring = c.welcome().ring_bytes;
    let st = probe.status();
    assert_eq!(st["ring_memory"]["used_bytes"], ring, "{st}");
    assert!(
        st["ring_memory"]["budget_bytes"].as_u64().unwrap() >= ring,
        "{st}"
    );
    drop(c);
    drop(probe);

    let budget = ring + ring / 2;
    let mut f = fixture(&format!("ring_memory_bytes = {budget}"));
    let mut a = connect(&f, &hello("a")).expect("the first job fits");
    stream(&mut a, 3);
    let (code, message) = refused(&f, &hello("b"));
    assert_eq!(code, "memory", "{message}");
    assert!(
        message.contains(&ring.to_string())
            && message.contains(&budget.to_string())
            && message.contains("ring_memory_bytes"),
        "{message}"
    );
    // Many more are refused just the same, and cost nothing.
    for i in 0..20 {
        let (code, _) = refused(&f, &hello(&format!("flood{i}")));
        assert_eq!(code, "memory");
    }
    stream(&mut a, 10);
    let st = f.status();
    assert_eq!(st["ring_memory"]["used_bytes"], ring, "{st}");
    assert_eq!(st["ring_memory"]["budget_bytes"], budget, "{st}");
    // When `a` leaves, its ring's bytes are free for the next job.
    drop(a);
    wait_until("job a to go", Duration::from_secs(10), || {
        f.status()["ring_memory"]["used_bytes"] == 0
    });
    let mut b = connect(&f, &hello("b")).expect("b fits once a has gone");
    stream(&mut b, 3);
    assert!(f.daemon.alive());
}

/// Rings are built and pre-faulted before the hub's lock (so a joining rank does not
/// stall every other rank's publishes), with their bytes reserved against the budget
/// meanwhile. Twelve jobs joining at once where two rings fit: exactly two are admitted,
/// the rings never pass the budget, and once they leave nothing stays reserved (two new
/// jobs fit again).
#[test]
fn jobs_joining_at_once_share_the_ring_budget() {
    let (mut f, ring) = room_for_two_and_a_half(&hello("probe"));
    let outcomes = join_at_once(&f, (0..12).map(|i| hello(&format!("burst{i}"))).collect());
    let mut admitted = Vec::new();
    for o in outcomes {
        match o {
            Ok(c) => admitted.push(c),
            Err(ClientError::Refused { code, message }) => {
                assert_eq!(code, "memory", "{message}")
            }
            Err(e) => panic!("a join failed otherwise: {e}"),
        }
    }
    assert_eq!(admitted.len(), 2, "two rings fit the budget");
    for c in &mut admitted {
        stream(c, 3);
    }
    let st = f.status();
    assert_eq!(st["ring_memory"]["used_bytes"], 2 * ring, "{st}");
    drop(admitted);
    wait_until("the burst's jobs to go", Duration::from_secs(10), || {
        f.status()["ring_memory"]["used_bytes"] == 0
    });
    let mut again: Vec<Client> = (0..2)
        .map(|i| connect(&f, &hello(&format!("after{i}"))).expect("nothing stayed reserved"))
        .collect();
    for c in &mut again {
        stream(c, 3);
    }
    let (code, _) = refused(&f, &hello("third"));
    assert_eq!(code, "memory");
    assert!(f.daemon.alive());
}

/// The TP replicas of one dp rank join at once at every job start. Each used to build
/// and reserve a ring of its own before the lock (none saw the rank's ring yet), so a
/// job whose rings fit the budget had its other ranks refused `memory` now and then
/// (7 of 160 joins in one review's run). Now a rank has one reservation, whichever peer
/// makes it. Budget: two rings and a half; dp_size 2 with 4 replicas a rank, 20 starts.
#[test]
fn tp_replicas_joining_at_once_take_one_ring_of_the_budget() {
    let mut h = Hello::whole_slice(0, 2);
    h.job = "probe".into();
    let (mut f, _) = room_for_two_and_a_half(&h);
    for round in 0..20 {
        let job = format!("tp{round}");
        let hellos = (0..8u32)
            .map(|i| {
                let mut h = Hello::whole_slice(i % 2, 2);
                h.job = job.clone();
                h.replicas = 4;
                h.replica = format!("r{}", i / 2);
                h
            })
            .collect();
        let outcomes = join_at_once(&f, hellos);
        let mut admitted = Vec::new();
        for o in outcomes {
            match o {
                Ok(c) => admitted.push(c),
                Err(e) => panic!("round {round}: a join was refused: {e}"),
            }
        }
        for c in &mut admitted {
            stream(c, 2);
        }
        drop(admitted);
        wait_until("the round's job to go", Duration::from_secs(10), || {
            f.status()["ring_memory"]["used_bytes"] == 0
        });
    }
    assert!(f.daemon.alive());
}

/// Issue 14, item 11: job and replica names went into logs raw, so a newline forged a
/// log line. Now names outside a safe charset are refused, naming the byte.
#[test]
fn names_that_could_forge_log_lines_are_refused() {
    let mut f = fixture("");
    let mut good = connect(&f, &hello("good")).expect("good joins");
    for (job, replica) in [
        ("x\nINFO millrace: forged", "0"),
        ("ok", "r\r\nWARN forged"),
        ("sp ace", "0"),
        ("quote\"", "0"),
    ] {
        let mut h = hello(job);
        h.replica = replica.into();
        let (code, message) = refused(&f, &h);
        assert_eq!(code, "bad_hello", "{message}");
        assert!(message.contains("byte 0x"), "{message}");
    }
    stream(&mut good, 3);
    let log = f.daemon.log_text();
    assert!(
        !log.lines()
            .any(|l| l.starts_with("INFO millrace: forged") || l.starts_with("WARN forged")),
        "{log}"
    );
    assert!(f.daemon.alive());
}

/// Log forging through text the daemon echoes: a HELLO `fingerprint` holding a newline
/// is refused by name (it must be 32 hex digits), and an unknown field whose name holds
/// one is refused with the name escaped; no log line starts with the injected text.
#[test]
fn fingerprints_and_echoed_text_cannot_forge_log_lines() {
    let mut f = fixture("");
    let mut good = connect(&f, &hello("good")).expect("good joins");
    for fp in [
        "x\nWARN forged-fingerprint",
        "0123456789abcdef0123456789abcde\n",
        "ab",
    ] {
        let mut h = hello("fp");
        h.fingerprint = Some(fp.into());
        let (code, message) = refused(&f, &h);
        assert_eq!(code, "bad_hello", "{message}");
        assert!(message.contains("`fingerprint`"), "{message}");
        assert!(message.contains("32 hex digits"), "{message}");
    }
    // serde names an unknown field as sent: the log must escape it.
    let long = "y".repeat(5000);
    for field in ["z\nWARN forged-field", long.as_str()] {
        let h = json!({"protocol": millrace::wire::TRAINER_VERSION, "job": "raw", "dp_rank": 0,
                       "dp_size": 1, field: 1});
        let mut s = UnixStream::connect(&f.socket).unwrap();
        s.write_all(&encode(kind::HELLO, h.to_string().as_bytes()))
            .unwrap();
        let mut reply = Vec::new();
        s.set_read_timeout(Some(TIMEOUT)).unwrap();
        let _ = std::io::Read::read_to_end(&mut s, &mut reply);
        assert!(!reply.is_empty(), "no REFUSED for an unknown field");
    }
    stream(&mut good, 3);
    wait_until("the refusals to be logged", TIMEOUT, || {
        f.daemon.log_text().matches("refused").count() >= 5
    });
    let log = f.daemon.log_text();
    assert!(!log.lines().any(|l| l.starts_with("WARN forged")), "{log}");
    assert!(log.contains("forged-field"), "{log}");
    assert!(
        log.lines().all(|l| !l.contains(&"y".repeat(300))),
        "echoed text is not capped:\n{log}"
    );
    assert!(f.daemon.alive());
}

/// Issue 14, item 11: `set_weights` with at_step = 2^64-1 was accepted (and 256 of them
/// filled the journal). A step more than 2^32 beyond the first changeable one is now
/// refused as `invalid`, the journal stays as it was, and the consumer streams on.
#[test]
fn live_changes_beyond_the_horizon_are_refused() {
    let mut f = fixture("");
    let mut good = connect(&f, &hello("good")).expect("good joins");
    stream(&mut good, 3);
    for at in [u64::MAX, 1 << 40] {
        let r = f.req(json!({"protocol": 1, "op": "set_weights",
                             "weights": {"web": 1.0}, "at_step": at}));
        assert_eq!(r["ok"], false, "{r}");
        assert_eq!(r["code"], "invalid", "{r}");
        assert!(
            r["message"]
                .as_str()
                .unwrap()
                .contains(&format!("at_step {at}")),
            "{r}"
        );
    }
    assert!(f.journal().is_empty());
    let fc = f.status()["first_changeable_step"].as_u64().unwrap();
    let r = f.req(json!({"protocol": 1, "op": "set_weights",
                         "weights": {"web": 1.0}, "at_step": fc + 1000}));
    assert_eq!(r["ok"], true, "{r}");
    stream(&mut good, 5);
    assert!(f.daemon.alive());
}

/// A control connection's view of another daemon's socket, for the second daemon below.
struct At<'a>(&'a std::path::Path);

impl Control for At<'_> {
    fn control_socket(&self) -> &std::path::Path {
        self.0
    }
}

/// Issue 14, item 11: 256 `set_weights` filled the journal and locked out every later
/// change until restart, though each one cut off the one before. A change now drops the
/// changes it supersedes (they can shape no step) and only their count is kept: 300
/// changes at one step leave one entry. Blobs stay compatible both ways: a blob from
/// before the changes resumes on the daemon, and a blob carrying the count (layout 4)
/// is adopted by a fresh daemon, which then has the same journal and count.
#[test]
fn superseded_changes_never_fill_the_journal() {
    let f = fixture("");
    let mut good = connect(&f, &hello("good")).expect("good joins");
    stream(&mut good, 2);
    let early = {
        let b = good.next_batch().expect("a step");
        (b.step + 1, b.cursor.to_vec())
    };
    let at = f.status()["first_changeable_step"].as_u64().unwrap() + 100;
    let mut last = 0.0;
    for i in 0..300 {
        last = 0.1 + (i % 7) as f64 * 0.1;
        let r = f.req(json!({"protocol": 1, "op": "set_weights",
                             "weights": {"web": last, "code": 1.0}, "at_step": at}));
        assert_eq!(r["ok"], true, "change {i}: {r}");
    }
    let journal = f.journal();
    assert_eq!(journal.len(), 1, "{journal:?}");
    assert_eq!(journal[0]["at_step"], at, "{journal:?}");
    assert_eq!(
        journal[0]["points"][0]["weights"]["web"], last,
        "{journal:?}"
    );
    let st = f.status();
    assert_eq!(st["journal_superseded"], 299, "{st}");
    // A change at an earlier step drops the later one too.
    let r = f.req(json!({"protocol": 1, "op": "set_weights",
                         "weights": {"web": 2.0}, "at_step": at - 50}));
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(f.journal().len(), 1);
    assert_eq!(f.status()["journal_superseded"], 300);

    // The blob from before every change resumes here (the daemon's journal is ahead).
    let mut h = hello("resume");
    h.cursor = Some(millrace::wire::to_hex(&early.1));
    let mut resumed = connect(&f, &h).expect("a blob from before the changes resumes");
    assert_eq!(resumed.welcome().start_step, early.0);
    stream(&mut resumed, 3);
    drop(resumed);

    // Past the change: the blob now carries the journal and the count.
    let blob = loop {
        let b = good.next_batch().expect("good streams");
        if b.step > at {
            break b.cursor.to_vec();
        }
    };
    // The count of superseded changes travels from layout 5 on; this blob is layout 7,
    // the newest layout a plan without stage changes or per-stage upsampling writes
    // (8 and 9 are written only for those, docs/FORMATS.md).
    const { assert!(millrace::plan::cursor::VERSION >= 7) };
    assert_eq!(
        u16::from_le_bytes([blob[8], blob[9]]),
        7,
        "a blob with superseded changes is layout 7"
    );
    let socket2 = f.corpus.tmp.path().join("s2.sock");
    let mut second = Serve::spawn(&f.config, &f.corpus.tmp.path().join("serve2.log"), |c| {
        c.arg("--socket").arg(&socket2);
    });
    second.wait_listening(&socket2, Duration::from_secs(30));
    let mut h = hello("good");
    h.cursor = Some(millrace::wire::to_hex(&blob));
    let mut c = Client::connect(&socket2, &h).expect("a fresh daemon adopts the blob");
    c.set_timeout(Some(TIMEOUT));
    stream(&mut c, 3);
    let st = At(&socket2).status();
    assert_eq!(st["journal_superseded"], 300, "{st}");
    assert_eq!(st["journal"].as_array().unwrap().len(), 1, "{st}");
    assert_eq!(st["journal"][0]["source"], "cursor", "{st}");
    stream(&mut good, 3);
}

/// The admission slots `millrace serve` has on this machine, and the part seeks may take
/// (src/serve/limits.rs).
fn slots() -> (usize, usize) {
    let all = std::thread::available_parallelism().map_or(4, |n| n.get().clamp(4, 16));
    (all, (all / 2).max(1))
}

/// Log lines of seeks the daemon ran to `step` (one per replay, whoever shared it).
fn seeks_to(f: &Fixture, step: u64) -> usize {
    let at = format!("step={step}");
    (f.daemon.log_text().lines())
        .filter(|l| l.contains("seeking a client's start step") && l.ends_with(&at))
        .count()
}

/// A HELLO as raw bytes: a client that asks for `start_step` and reads nothing back.
fn raw_seeker(f: &Fixture, job: &str, step: u64) -> UnixStream {
    let h = json!({"protocol": millrace::wire::TRAINER_VERSION, "job": job, "dp_rank": 0,
                   "dp_size": 1, "start_step": step});
    let mut s = UnixStream::connect(&f.socket).expect("connect");
    s.write_all(&encode(kind::HELLO, h.to_string().as_bytes()))
        .expect("HELLO");
    s
}

/// The first batch `c` reads: its step and the bytes a trainer copies.
fn first_batch(c: &mut Client) -> (u64, Vec<u8>) {
    let b = c.next_batch().expect("a first batch");
    (b.step, b.copy_bytes.to_vec())
}

/// A review measured: with 8 clients seeking far steps (no blob) and staying connected,
/// every admission slot seeks for hours, and a client resuming from its blob (40 ms on
/// an idle daemon) timed out after 30 s, a `start_step 0` one after 50 s. Now seeks take
/// their own part of the slots: with more far seekers than there are slots, a blob
/// resume and a step-0 start are admitted within seconds and served the bytes an
/// undisturbed consumer read at their steps.
#[test]
fn blob_resumes_and_fresh_starts_are_not_queued_behind_far_seeks() {
    let mut f = fixture("");
    let mut good = connect(&f, &hello("good")).expect("good consumer joins");
    let (mut step0, mut blob, mut step3) = (None, None, None);
    for _ in 0..4 {
        let b = good.next_batch().expect("good streams");
        match b.step {
            0 => step0 = Some(b.copy_bytes.to_vec()),
            2 => blob = Some(b.cursor.to_vec()),
            3 => step3 = Some(b.copy_bytes.to_vec()),
            _ => {}
        }
    }
    let (all, seek) = slots();
    let far: Vec<UnixStream> = (0..all as u64 + 4)
        .map(|i| raw_seeker(&f, &format!("far{i}"), MAX_STEP - i))
        .collect();
    wait_until("every seek slot to seek", Duration::from_secs(10), || {
        (f.daemon.log_text())
            .matches("seeking a client's start step job=far")
            .count()
            >= seek
    });
    let t = Instant::now();
    let mut h = hello("resume");
    h.cursor = blob.as_deref().map(millrace::wire::to_hex);
    let mut resumed = Client::connect_within(&f.socket, &h, Duration::from_secs(10))
        .expect("a blob resume is admitted while far seeks run");
    let resume_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let mut fresh = Client::connect_within(&f.socket, &hello("fresh"), Duration::from_secs(10))
        .expect("a step-0 start is admitted while far seeks run");
    let fresh_s = t.elapsed().as_secs_f64();
    eprintln!(
        "with {} far seekers: blob resume admitted in {resume_s:.3} s, step 0 in {fresh_s:.3} s",
        far.len()
    );
    resumed.set_timeout(Some(TIMEOUT));
    fresh.set_timeout(Some(TIMEOUT));
    assert_eq!(first_batch(&mut resumed), (3, step3.expect("step 3")));
    assert_eq!(first_batch(&mut fresh), (0, step0.expect("step 0")));
    stream(&mut good, 3);
    drop(far);
    wait_until("the far seeks to be cancelled", TIMEOUT, || {
        f.daemon.log_text().matches("left during admission").count() >= all + 4
    });
    assert!(f.daemon.alive());
}

/// A review measured: the 4 TP peers of one rank each ran the seek to their start step
/// (12 s for four against 3 s for one), and every dp rank of a job replayed the same
/// global step. Now concurrent seeks of one plan to one step share one replay: the
/// daemon logs one seek for a job's 4 dp ranks and one for a rank's 4 TP peers, and
/// each rank gets the bytes its own seek gives (checked against ranks joined one by
/// one, each seeking alone). A peer whose rank's ring exists at its step, started or
/// not, takes its position without a seek.
#[test]
fn concurrent_seeks_of_one_step_run_one_replay() {
    // A cache of its own, empty: every seek replays from step 0 or from checkpoints this
    // daemon wrote, whatever earlier runs left in the user's cache (a warm one made a
    // far step cost milliseconds, a fresh checkout's empty one minutes).
    let cache = tempfile::tempdir().unwrap();
    let mut f = fixture_with("", |c| {
        c.env("XDG_CACHE_HOME", cache.path())
            .env_remove("CACHE_DIRECTORY");
    });
    // A replay of a second or more from an empty cache (about 150,000 steps a second
    // in a debug build), far longer than the ranks' arrival jitter.
    let (dp_step, tp_step) = (300_000u64, 300_001u64);
    let ranks = |job: &str, step: u64| -> Vec<Hello> {
        (0..4u32)
            .map(|r| {
                let mut h = Hello::whole_slice(r, 4);
                h.job = job.into();
                h.start_step = Some(step);
                h
            })
            .collect()
    };
    let t = Instant::now();
    let mut dp: Vec<Client> = (join_at_once(&f, ranks("dp", dp_step)).into_iter())
        .map(|c| c.expect("a dp rank joins"))
        .collect();
    let shared_s = t.elapsed().as_secs_f64();
    assert_eq!(seeks_to(&f, dp_step), 1, "{}", f.daemon.log_text());
    let t = Instant::now();
    let mut alone = Vec::new();
    for h in ranks("alone", dp_step) {
        alone.push(connect(&f, &h).expect("a rank joins alone"));
    }
    eprintln!(
        "4 dp ranks seeking step {dp_step}: {shared_s:.2} s together, {:.2} s one by one",
        t.elapsed().as_secs_f64()
    );
    assert_eq!(seeks_to(&f, dp_step), 5);
    for (a, b) in dp.iter_mut().zip(&mut alone) {
        assert_eq!(first_batch(a), first_batch(b));
    }

    let tp = (0..4)
        .map(|i| {
            let mut h = hello("tp");
            h.replicas = 4;
            h.replica = format!("tp{i}");
            h.start_step = Some(tp_step);
            h
        })
        .collect();
    let mut tp: Vec<Client> = (join_at_once(&f, tp).into_iter())
        .map(|c| c.expect("a TP peer joins"))
        .collect();
    assert_eq!(seeks_to(&f, tp_step), 1, "{}", f.daemon.log_text());
    let first = first_batch(&mut tp[0]);
    assert_eq!(first.0, tp_step);
    for c in &mut tp[1..] {
        assert_eq!(first_batch(c), first);
    }

    // A peer without a blob whose rank's ring was resumed from one and waits for its
    // other peers (it has not started) takes the ring's position: no seek.
    let mut good = connect(&f, &hello("good")).expect("good consumer joins");
    let blob = loop {
        let b = good.next_batch().expect("good streams");
        if b.step == 4 {
            break b.cursor.to_vec();
        }
    };
    let peer = |i: u32| {
        let mut h = hello("joining");
        h.replicas = 2;
        h.replica = format!("r{i}");
        h
    };
    let mut h = peer(0);
    h.cursor = Some(millrace::wire::to_hex(&blob));
    let mut resumed = connect(&f, &h).expect("the blob's peer joins");
    let mut h = peer(1);
    h.start_step = Some(5);
    let mut seeker = connect(&f, &h).expect("the peer without a blob joins");
    assert_eq!(seeks_to(&f, 5), 0, "{}", f.daemon.log_text());
    assert_eq!(first_batch(&mut resumed), first_batch(&mut seeker));
    assert!(f.daemon.alive());
}

/// Two clients seeking one far step: the second waits for the first's replay, and
/// used to hold a seek slot all the while, so with two seek slots (a machine of up to
/// 4 cores) every other job's seek waited for that one replay (a review measured a
/// seek of step 1000 timing out at 10 s). A waiter lets its seek slot go.
#[test]
fn a_client_waiting_for_a_shared_seek_holds_no_seek_slot() {
    let mut f = fixture("");
    let (_all, seek) = slots();
    let far: Vec<UnixStream> = (0..seek)
        .map(|i| raw_seeker(&f, &format!("far{i}"), MAX_STEP - 1))
        .collect();
    wait_until("the far seek to start", Duration::from_secs(10), || {
        seeks_to(&f, MAX_STEP - 1) >= 1
    });
    // Time for the others to queue on the same seek (were they to hold slots, the
    // near seek below would find none; it passes either way once they do not).
    std::thread::sleep(Duration::from_millis(300));
    let mut h = hello("near");
    h.start_step = Some(1000);
    let t = Instant::now();
    let mut near = Client::connect_within(&f.socket, &h, Duration::from_secs(10))
        .expect("a short seek is admitted beside the far one's waiters");
    eprintln!(
        "seek of step 1000 beside {seek} far seekers: {:.3} s",
        t.elapsed().as_secs_f64()
    );
    assert_eq!(seeks_to(&f, MAX_STEP - 1), 1, "one far replay");
    assert_eq!(near.next_batch().expect("near streams").step, 1000);
    drop(far);
    assert!(f.daemon.alive());
}
