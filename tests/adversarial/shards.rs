//! Adversarial tests: shards (see main.rs). A shard truncated or rewritten under a live
//! daemon, and token ids outside the vocabulary: the rings that read the bad shard stop
//! with `ERROR materialize` naming it, every other job keeps streaming, and the daemon
//! stays up (issue 14, items 3 and 5).

use std::path::{Path, PathBuf};
use std::time::Duration;

use millrace::client::{Client, ClientError, Hello};

use crate::common::{self, Control, Serve};

const SEQ_LEN: u32 = 64;
const ROWS: u32 = 4;
/// The step from which the schedule switches from `web` alone to `code` alone.
const SWITCH: u64 = 1000;

/// A daemon over a two-domain corpus whose schedule serves only `web` before step
/// [`SWITCH`] and only `code` after it: a job started at 0 reads web shards and no code
/// shard, a job started past the switch the reverse.
struct Split {
    corpus: common::Corpus,
    socket: PathBuf,
    serve: Serve,
}

impl Control for Split {
    fn control_socket(&self) -> &Path {
        &self.socket
    }
}

impl Split {
    /// `patch` may damage the corpus before the daemon starts.
    fn start(patch: impl FnOnce(&Path)) -> Split {
        let corpus = common::corpus(200_000, 2, 3, 50_000);
        let dir = corpus.dir.clone();
        patch(&dir);
        let cfg = dir.join("millrace.toml");
        let text = std::fs::read_to_string(&cfg).unwrap();
        let (head, _) = text.split_once("[[plan.schedule]]").unwrap();
        let schedule = format!(
            "[[plan.schedule]]\nstep = 0\nweights = {{ web = 1.0 }}\n\n\
             [[plan.schedule]]\nstep = {SWITCH}\nweights = {{ web = 1.0 }}\n\n\
             [[plan.schedule]]\nstep = {}\nweights = {{ code = 1.0 }}\n",
            SWITCH + 1
        );
        std::fs::write(&cfg, format!("{head}{schedule}")).unwrap();
        let socket = dir.join("d.sock");
        let config = common::write_config(
            &dir,
            "d.toml",
            SEQ_LEN,
            ROWS,
            &[&common::serve_toml(&socket, 4, 2)],
        );
        let serve = Serve::start(&config, &socket, &dir.join("d.log"));
        Split {
            corpus,
            socket,
            serve,
        }
    }

    fn connect(&self, job: &str, start_step: u64) -> Client {
        let mut h = Hello::new(0, 1, ROWS, 1);
        h.job = job.into();
        h.start_step = Some(start_step);
        let mut c = Client::connect(&self.socket, &h)
            .unwrap_or_else(|e| panic!("{job}: {e}\n{}", self.serve.log_text()));
        c.set_timeout(Some(Duration::from_secs(20)));
        c
    }

    /// The `.bin` files of domain `web`.
    fn web_bins(&self) -> Vec<PathBuf> {
        shard_files(&self.corpus.dir.join("web"), "bin")
    }
}

fn shard_files(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == ext))
        .collect();
    v.sort();
    assert!(!v.is_empty(), "no .{ext} in {}", dir.display());
    v
}

/// Reads `n` steps, checking that every row comes from domain `want` (0 = web, 1 = code).
fn stream(c: &mut Client, n: usize, want: i32, who: &str) {
    for _ in 0..n {
        let b = c
            .next_batch()
            .unwrap_or_else(|e| panic!("{who} stopped streaming: {e}"));
        assert!(
            b.domain.iter().all(|&d| d == want),
            "{who}: step {} has rows of domains {:?}, expected only {want}",
            b.step,
            b.domain
        );
    }
}

/// Reads until the daemon sends an ERROR and returns it. At most `limit` steps, one per
/// `pace`: a job on `web` must not run past [`SWITCH`] (where it would stop reading web)
/// before the daemon notices what the test did to the web shards.
fn until_error(c: &mut Client, limit: usize, pace: Duration) -> (String, String) {
    for _ in 0..limit {
        match c.next_batch() {
            Ok(b) => {
                assert!(b.step < SWITCH, "the job on web reached the switch");
                std::thread::sleep(pace);
            }
            Err(ClientError::Daemon { code, message }) => return (code, message),
            Err(e) => panic!("expected an ERROR frame, got {e}"),
        }
    }
    panic!("no ERROR within {limit} steps");
}

/// Issue 14, item 5: truncating the shards one job reads under a live daemon used to kill
/// the daemon with SIGBUS (every client of every job cut off). Now that job's ring stops
/// with `ERROR materialize` naming the shard, and a job on other shards keeps streaming.
/// New clients are still served (only a lost index could make a plan wrong): one on the
/// shard stops at its first read of it, naming it, and one on other shards streams. A
/// chaos run found every new client refused, the resumes of ranks that never read the
/// shard included, after a `.bin` of a domain of weight 0 was truncated.
#[test]
fn a_truncated_shard_fails_only_the_rings_that_read_it() {
    let (d, mut y) = truncate_under_a_live_daemon("bin");
    let mut z = d.connect("z", 0);
    let (code, message) = until_error(&mut z, 10, Duration::ZERO);
    assert_eq!(code, "materialize", "{message}");
    assert!(message.contains("web-0000"), "{message}");
    let mut w = d.connect("w", SWITCH + 10);
    stream(&mut w, 50, 1, "w (code), a new job after the truncation");
    stream(&mut y, 50, 1, "y (code) after z and w");
}

/// The same for a truncated `.idx`, which the planner reads too (under the hub lock, and
/// while seeking for a new client): those reads are guarded like the copy. So are those
/// of a live change, which restores every ring's planner (a review found they were not):
/// live changes after the truncation are applied or refused, and the daemon and the
/// other job go on.
#[test]
fn a_truncated_index_fails_only_the_rings_that_read_it() {
    let (mut d, mut y) = truncate_under_a_live_daemon("idx");
    // A new client is refused at once, naming the shard: a start planned over an index
    // that lost pages could plan from zeros (the streaming job y goes on).
    let mut h = Hello::new(0, 1, ROWS, 1);
    h.job = "z".into();
    match Client::connect(&d.socket, &h) {
        Err(ClientError::Refused { code, message }) => {
            assert_eq!(code, "materialize", "{message}");
            assert!(message.contains("web-0000"), "{message}");
            assert!(message.contains("restarted"), "{message}");
        }
        Err(e) => panic!("z: {e}"),
        Ok(_) => panic!("z was served over a lost index"),
    }
    for w in [0.5, 2.0] {
        let weights = std::collections::BTreeMap::from([("code".to_string(), w)]);
        let r = d.req(millrace::control::set_weights_request(
            &weights,
            None,
            millrace::control::Late::Next,
        ));
        assert!(r["ok"] == true || r["code"] == "busy", "{r}");
    }
    stream(&mut y, 50, 1, "y (code) after the live changes");
    assert!(d.serve.alive(), "{}", d.serve.log_text());
}

/// Starts job x on web and job y on code, truncates every web file ending in `ext` to 0
/// bytes, and checks x's ERROR, y's stream and the daemon's health. Returns the daemon
/// and y.
fn truncate_under_a_live_daemon(ext: &str) -> (Split, Client) {
    let mut d = Split::start(|_| {});
    let mut x = d.connect("x", 0);
    let mut y = d.connect("y", SWITCH + 10);
    stream(&mut x, 20, 0, "x (web)");
    stream(&mut y, 20, 1, "y (code)");
    let files = shard_files(&d.corpus.dir.join("web"), ext);
    for f in &files {
        std::fs::OpenOptions::new()
            .write(true)
            .open(f)
            .unwrap()
            .set_len(0)
            .unwrap();
    }
    let (code, message) = until_error(&mut x, 500, Duration::ZERO);
    assert_eq!(code, "materialize", "{message}");
    assert!(
        files
            .iter()
            .any(|f| message.contains(&*f.with_extension("").to_string_lossy())),
        "the error names no truncated shard: {message}"
    );
    eprintln!("x got: {code}: {message}");
    // The other job streams on, the daemon is up, and nothing panicked (Serve's drop).
    stream(&mut y, 300, 1, "y (code) after the truncation");
    assert!(d.serve.alive(), "{}", d.serve.log_text());
    let st = d.status();
    assert!(st["jobs"].as_array().is_some_and(|j| !j.is_empty()), "{st}");
    let poisoned = st["poisoned_shards"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        poisoned.iter().any(|p| p["shard"]
            .as_str()
            .is_some_and(|s| s.contains("web/web-0000"))
            // The read that faulted, or the periodic stat if it came first.
            && p["reason"]
                .as_str()
                .is_some_and(|r| r.contains("SIGBUS") || r.contains("changed size"))),
        "status names no poisoned web shard: {st}"
    );
    (d, y)
}

/// Issue 14, item 5: a shard rewritten in place (same inode, same size, other bytes) was
/// served silently. The periodic stat notices the mtime move, poisons the shard, and the
/// rings that read it stop with an ERROR naming it; the other job keeps streaming.
#[test]
fn a_shard_rewritten_in_place_is_detected() {
    let mut d = Split::start(|_| {});
    let mut x = d.connect("x", 0);
    let mut y = d.connect("y", SWITCH + 10);
    stream(&mut x, 10, 0, "x (web)");
    stream(&mut y, 10, 1, "y (code)");
    for b in d.web_bins() {
        let len = std::fs::metadata(&b).unwrap().len();
        // Same size, other content, same inode, never shorter (so no read faults: only
        // the stat can tell).
        let mut f = std::fs::OpenOptions::new().write(true).open(&b).unwrap();
        std::io::Write::write_all(&mut f, &vec![0x41u8; len as usize]).unwrap();
    }
    // The check runs once a second: 800 steps 10 ms apart leave it 8 s.
    let (code, message) = until_error(&mut x, 800, Duration::from_millis(10));
    assert_eq!(code, "materialize", "{message}");
    assert!(message.contains("modified in place"), "{message}");
    assert!(message.contains("web-0000"), "{message}");
    stream(&mut y, 100, 1, "y (code) after the rewrite");
    assert!(d.serve.alive(), "{}", d.serve.log_text());
}

/// Issue 14, item 3: an index whose dtype code was changed from uint16 (8) to int16 (3)
/// used to stream negative ids to the trainer. With `vocab_size` (which synth writes) the
/// ring stops with an ERROR naming shard, document and value; the other job streams on.
#[test]
fn an_out_of_vocabulary_id_fails_the_ring_naming_shard_document_and_value() {
    let d = Split::start(|dir| {
        for idx in shard_files(&dir.join("web"), "idx") {
            let mut b = std::fs::read(&idx).unwrap();
            assert_eq!(b[17], 8, "synth writes uint16");
            b[17] = 3;
            std::fs::write(&idx, b).unwrap();
        }
    });
    let mut y = d.connect("y", SWITCH + 10);
    let mut x = d.connect("x", 0);
    let (code, message) = until_error(&mut x, 10, Duration::ZERO);
    assert_eq!(code, "materialize", "{message}");
    assert!(message.contains("web-0000"), "{message}");
    assert!(message.contains(" document "), "{message}");
    assert!(message.contains("has id -"), "{message}");
    assert!(message.contains("outside vocab_size 50304"), "{message}");
    stream(&mut y, 50, 1, "y (code)");
}

/// Issue 18, item 2: the connection chose the ERROR code by the failure's text, and any
/// message that mentioned "checkpoint" went out as `peer_position`. A corpus kept under a
/// `checkpoints/` folder turned every bad shard into a resume-point error. The code is now
/// chosen where the failure happens: a bad shard is `materialize` wherever it lives.
#[test]
fn a_bad_shard_under_a_checkpoints_folder_is_still_materialize() {
    let d = Split::start(|dir| {
        std::fs::rename(dir.join("web"), dir.join("checkpoints")).unwrap();
        let cfg = dir.join("millrace.toml");
        let text = std::fs::read_to_string(&cfg).unwrap();
        assert!(text.contains("shards = [\"web\"]"), "{text}");
        std::fs::write(
            &cfg,
            text.replace("shards = [\"web\"]", "shards = [\"checkpoints\"]"),
        )
        .unwrap();
        for idx in shard_files(&dir.join("checkpoints"), "idx") {
            let mut b = std::fs::read(&idx).unwrap();
            assert_eq!(b[17], 8, "synth writes uint16");
            b[17] = 3;
            std::fs::write(&idx, b).unwrap();
        }
    });
    let mut x = d.connect("x", 0);
    let (code, message) = until_error(&mut x, 10, Duration::ZERO);
    assert!(message.contains("checkpoints/web-0000"), "{message}");
    assert_eq!(code, "materialize", "{message}");
}

/// An int32 shard (what Megatron writes for vocabularies of 65,500 ids or more) whose
/// `.idx` dtype code turned from 4 into 7 (float32, the same item size: every size check
/// passes) is refused at start naming the `.idx`, byte 17 and the code, not with advice
/// to serve `token_dtype = "int64"`, which refuses it in turn: float tokens are no ids.
#[test]
fn a_shard_whose_dtype_code_says_float_is_refused_naming_the_index_byte() {
    use millrace::synth::{self, SynthOptions};
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("c");
    synth::synth(&SynthOptions {
        out: dir.clone(),
        tokens: 20_000,
        domains: 1,
        vocab: 100_000,
        dtype: millrace::corpus::DType::Int32,
        seed: 0,
        shard_tokens: 10_000,
        threads: 1,
        progress: false,
    })
    .unwrap();
    let idx = shard_files(&dir.join("web"), "idx").remove(0);
    let mut b = std::fs::read(&idx).unwrap();
    assert_eq!(b[17], 4, "synth writes int32");
    b[17] = 7;
    std::fs::write(&idx, b).unwrap();
    let socket = dir.join("d.sock");
    for token_dtype in ["int32", "int64"] {
        let config = common::write_config(
            &dir,
            "d.toml",
            SEQ_LEN,
            ROWS,
            &[
                &common::serve_toml(&socket, 4, 2),
                &format!("token_dtype = {token_dtype:?}"),
            ],
        );
        let err = common::check_config_refusal(&config);
        assert!(
            err.contains(&format!(
                "{}: dtype code 7 (float32) at byte 17: token ids are integers",
                idx.display()
            )) && !err.contains("use \"int64\""),
            "{token_dtype}: {err}"
        );
    }
}
