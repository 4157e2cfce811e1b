//! Every decoder of untrusted bytes against forged input: cursor blobs (a trainer's
//! checkpoint a user may have edited, truncated or mixed up, and the plan checkpoint
//! files a seek reads) mutated byte by byte and re-sealed with a correct length and
//! checksum, so that only the structural checks stand between them and the planner.
//! Each case must be refused or give a planner that keeps producing full batches;
//! none may panic or run away.

use std::sync::Arc;
use std::time::{Duration, Instant};

use millrace::plan::Plan;
use rand::{Rng, SeedableRng};
use rand_pcg::Pcg64;

#[path = "common/blobs.rs"]
mod blobs;
mod common;

use blobs::{plans, seal};

/// Blobs of `plan` at a few steps, including ones past its stage switch and skips.
fn blobs(plan: &Arc<Plan>) -> Vec<Vec<u8>> {
    let mut p = plan.start();
    let mut out = Vec::new();
    for s in 0..24 {
        if s % 3 == 0 || s > 16 {
            out.push(p.cursor());
        }
        p.next_batch();
    }
    out
}

/// One random edit of a blob's body (past its magic and layout).
fn mutate(rng: &mut Pcg64, blob: &[u8]) -> Vec<u8> {
    let mut b = blob.to_vec();
    let body = b.len() - 8;
    for _ in 0..rng.gen_range(1..=3) {
        let at = rng.gen_range(16..body);
        match rng.gen_range(0..8) {
            0 => b[at] ^= 1 << rng.gen_range(0..8),
            1 => b[at] = rng.gen(),
            2 => b[at] = 0xff,
            3 => b[at] = 0,
            4 => {
                // A whole little-endian word set to an extreme.
                let w = rng.gen_range(1..=8).min(body - at);
                let v: u8 = if rng.gen() { 0xff } else { 0 };
                b[at..at + w].fill(v);
                if rng.gen() {
                    b[at + w - 1] = 0x7f;
                }
            }
            5 => {
                // Cut a piece out of the body.
                let n = rng.gen_range(1..=16).min(body - at);
                b.drain(at..at + n);
                return b;
            }
            6 => {
                // Insert random bytes.
                let n = rng.gen_range(1..=16);
                let extra: Vec<u8> = (0..n).map(|_| rng.gen()).collect();
                b.splice(at..at, extra);
                return b;
            }
            _ => b[at] = b[at].wrapping_add(rng.gen_range(1..4)),
        }
    }
    b
}

/// Forged blobs, sealed so only the structural checks judge them, are refused or
/// resume to a planner that keeps producing full batches: no panic, no runaway.
#[test]
fn sealed_mutations_of_cursor_blobs_never_panic() {
    let cases: usize = std::env::var("DECODER_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(600);
    let mut rng = Pcg64::seed_from_u64(0xb10b);
    let (mut accepted, mut refused) = (0, 0);
    let all = plans();
    // Each plan's blobs under their own plan, and the live journal's under the plain
    // plan too, which adopts the blob's journal (a daemon restarted without it).
    let pairs = [(0, 0), (1, 1), (2, 2), (2, 0)];
    for (made, by) in pairs {
        let (made, plan) = (&all[made], &all[by]);
        let base = blobs(made);
        for b in &base {
            assert!(plan.resume(b, 1 << 16).is_ok(), "the real blob resumes");
        }
        for i in 0..cases {
            let b = seal(mutate(&mut rng, &base[i % base.len()]));
            let started = Instant::now();
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let restored = plan.restore(&b).is_ok();
                match plan.resume(&b, 1 << 16) {
                    Ok(r) => {
                        let mut p = r.planner;
                        for _ in 0..3 {
                            let g = p.next_batch();
                            assert!(!g.rows.is_empty());
                        }
                        true
                    }
                    Err(_) => restored,
                }
            }));
            match r {
                Ok(true) => accepted += 1,
                Ok(false) => refused += 1,
                Err(_) => panic!("case {i}: blob {} panicked", hex(&b)),
            }
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "case {i}: blob {} took {:?}",
                hex(&b),
                started.elapsed()
            );
        }
    }
    eprintln!("sealed mutations: {accepted} accepted, {refused} refused");
    assert!(refused > 0);
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A reshuffle chain longer than the plan's reseeds is forged (each reseed adds at most
/// one entry, `Stream::prepare`): every unit of every window walks the chain, so 2000
/// entries in a 32 KB HELLO once made one restore take 41 s (debug build) and the ring's
/// planner as slow for the rest of the epoch. Refused, naming the domain, before any
/// window is packed.
#[test]
fn reshuffle_chains_longer_than_the_reseeds_are_refused() {
    use millrace::plan::cursor;
    use millrace::plan::permute::Reshuffle;
    use millrace::plan::CursorError;
    let plan = plans().swap_remove(0);
    // Past its one reseed (step 12), the real chains hold one entry and resume.
    let mut p = plan.start();
    for _ in 0..20 {
        p.next_batch();
    }
    let real = cursor::decode(&p.cursor()).unwrap();
    assert!(real.streams.iter().any(|s| s.pos_chain.len() == 1));
    assert!(plan.restore(&cursor::encode(&real)).is_ok());
    let forge = |edit: &dyn Fn(&mut millrace::plan::StreamState)| {
        let mut c = real.clone();
        edit(&mut c.streams[0]);
        let started = Instant::now();
        let e = plan.restore(&cursor::encode(&c)).err();
        (e, started.elapsed())
    };
    let long =
        |n: u64| -> Vec<Reshuffle> { (0..n).map(|key| Reshuffle { start: 0, key }).collect() };
    for (what, edit) in [
        (
            "pos_chain",
            Box::new(|s: &mut millrace::plan::StreamState| s.pos_chain = long(2))
                as Box<dyn Fn(&mut _)>,
        ),
        (
            "block_chain",
            Box::new(|s: &mut millrace::plan::StreamState| s.block_chain = long(2)),
        ),
        (
            "long pos_chain",
            Box::new(|s: &mut millrace::plan::StreamState| s.pos_chain = long(1000)),
        ),
    ] {
        let (e, took) = forge(&*edit);
        match e {
            Some(CursorError::Reshuffles { domain, n, most: 1 }) => {
                assert_eq!(domain, "web", "{what}");
                assert!(n >= 2, "{what}: {n}");
            }
            other => panic!("{what}: {other:?}"),
        }
        assert!(
            took < Duration::from_secs(1),
            "{what}: refused after {took:?}"
        );
    }
    let e = forge(&|s| s.pos_chain = long(3)).0.unwrap().to_string();
    assert!(
        e.contains("domain web") && e.contains("3 reshuffles") && e.contains("1 reseed"),
        "{e}"
    );
}

/// A blob cut inside its 16-byte header (a checkpoint file written by a full disk) is
/// named as truncated, not as "not a millrace cursor": its magic is there. Every cut
/// names the byte it ends at or the length it should have.
#[test]
fn a_blob_cut_inside_its_header_is_named_truncated() {
    use millrace::plan::cursor;
    use millrace::plan::CursorError;
    let plan = plans().swap_remove(0);
    let blob = plan.start().cursor();
    for len in 8..16 {
        assert_eq!(
            cursor::decode(&blob[..len]),
            Err(CursorError::Truncated { at: len }),
            "cut at {len}"
        );
    }
    for len in 16..blob.len() {
        assert!(
            matches!(cursor::decode(&blob[..len]), Err(CursorError::Length { got, .. }) if got == len),
            "cut at {len}"
        );
    }
    for bad in [&b""[..], b"MRCURSO", b"XRCURSOR\x07\x00"] {
        assert_eq!(cursor::decode(bad), Err(CursorError::Magic), "{bad:?}");
    }
}

/// A real daemon on a synth corpus of `tokens` tokens in 2 domains (seed `seed`), rows
/// of 128 tokens, 8 a step: the corpus (kept while it runs), its socket and the daemon.
fn daemon(tokens: u64, seed: u64) -> (common::Corpus, std::path::PathBuf, common::Serve) {
    let corpus = common::corpus(tokens, 2, seed, 100_000);
    let socket = corpus.dir.join("s.sock");
    let serve = common::serve_toml(&socket, 4, 1);
    let config = common::write_config(&corpus.dir, "test.toml", 128, 8, &[&serve]);
    let serve = common::Serve::start(&config, &socket, &corpus.dir.join("serve.log"));
    (corpus, socket, serve)
}

/// End to end: a HELLO carrying a blob of this daemon's plan with forged 1000-entry
/// reshuffle chains (re-sealed, 32 KB of hex, within the daemon's request limit) is
/// refused with `cursor`, naming the fault, instead of being admitted after seconds of
/// repacking per domain and planned as slowly from then on; a good client streams on.
#[test]
fn a_hello_with_forged_reshuffle_chains_is_refused_while_a_good_client_streams() {
    use millrace::client::{to_hex, Client, ClientError, Hello};
    use millrace::plan::cursor;
    use millrace::plan::permute::Reshuffle;
    let (_corpus, socket, serve) = daemon(300_000, 7);
    let mut good = Client::connect(&socket, &Hello::whole_slice(0, 1)).unwrap();
    good.set_timeout(Some(Duration::from_secs(30)));
    for _ in 0..5 {
        good.next_batch().unwrap();
    }
    let blob = good.last_cursor().unwrap().to_vec();
    let mut c = cursor::decode(&blob).unwrap();
    for s in &mut c.streams {
        s.pos_chain = (0..1000).map(|key| Reshuffle { start: 0, key }).collect();
    }
    let forged = cursor::encode(&c);
    let mut h = Hello::whole_slice(0, 1);
    h.job = "forged".into();
    h.cursor = Some(to_hex(&forged));
    let started = Instant::now();
    match Client::connect(&socket, &h) {
        Err(ClientError::Refused { code, message }) => {
            assert_eq!(code, "cursor", "{message}");
            assert!(message.contains("1000 reshuffles"), "{message}");
        }
        Err(e) => panic!("expected a cursor refusal, got {e}"),
        Ok(_) => panic!("a blob with forged reshuffle chains was admitted"),
    }
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "refused after {:?}",
        started.elapsed()
    );
    for _ in 0..20 {
        good.next_batch()
            .unwrap_or_else(|e| panic!("{e}\n{}", serve.log_text()));
    }
}

/// Reads one frame from a blocking socket: (type, JSON payload).
fn read_json_frame(s: &mut std::os::unix::net::UnixStream) -> (u8, serde_json::Value) {
    let (kind, payload) = millrace::wire::frame::read_from(s).expect("a frame");
    let v = serde_json::from_slice(&payload).expect("a JSON payload");
    (kind, v)
}

/// A HELLO on a control connection is closed with an ERROR that names the frame by its
/// type and size. It used to echo the frame's payload as a Debug list of bytes (about 5
/// bytes of message per byte sent: a 60 KB HELLO got a 300 KB ERROR back, and a
/// request-sized one of a many-domain plan one past what a frame may carry).
#[test]
fn a_wrong_frame_on_a_control_connection_is_named_not_echoed() {
    use millrace::wire::frame::{encode, kind};
    use std::io::Write;
    let (_corpus, socket, _serve) = daemon(100_000, 3);
    let mut s = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let status = serde_json::to_vec(&millrace::control::status_request()).unwrap();
    s.write_all(&encode(kind::CONTROL, &status)).unwrap();
    let (k, reply) = read_json_frame(&mut s);
    assert_eq!(
        (k, &reply["ok"]),
        (kind::CONTROL_REPLY, &serde_json::json!(true))
    );
    s.write_all(&encode(kind::HELLO, &[b'x'; 60_000])).unwrap();
    let (k, v) = read_json_frame(&mut s);
    assert_eq!(k, kind::ERROR, "{v}");
    assert_eq!(v["code"], "protocol", "{v}");
    let m = v["message"].as_str().unwrap_or_default();
    assert!(m.len() < 200, "an ERROR of {} bytes", m.len());
    assert!(m.contains("HELLO") && m.contains("60000"), "{m}");
}
