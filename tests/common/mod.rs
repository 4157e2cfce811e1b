//! Test-side writers, assembled byte by byte from the format descriptions in
//! docs/FORMATS.md and independent of the code under test (which has its own writer);
//! and the daemon fixtures the end-to-end tests share: a synthetic corpus, a config with
//! a small geometry and a `[serve]` table, and a running `millrace serve`.
#![allow(dead_code)]

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use millrace::util::harness::ChildGuard;

/// Megatron dtype code and item size for the test writer.
#[derive(Debug, Clone, Copy)]
pub struct Code {
    pub code: u8,
    pub size: usize,
}

pub const CODES: [Code; 8] = [
    Code { code: 1, size: 1 },
    Code { code: 2, size: 1 },
    Code { code: 3, size: 2 },
    Code { code: 4, size: 4 },
    Code { code: 5, size: 8 },
    Code { code: 6, size: 8 },
    Code { code: 7, size: 4 },
    Code { code: 8, size: 2 },
];

/// Encodes token values (given as i64) in the dtype of `code`.
pub fn encode(code: u8, tokens: &[i64]) -> Vec<u8> {
    let mut out = Vec::new();
    for &t in tokens {
        match code {
            1 => out.push(t as u8),
            2 => out.push(t as i8 as u8),
            3 => out.extend_from_slice(&(t as i16).to_le_bytes()),
            4 => out.extend_from_slice(&(t as i32).to_le_bytes()),
            5 => out.extend_from_slice(&t.to_le_bytes()),
            6 => out.extend_from_slice(&(t as f64).to_le_bytes()),
            7 => out.extend_from_slice(&(t as f32).to_le_bytes()),
            8 => out.extend_from_slice(&(t as u16).to_le_bytes()),
            _ => panic!("test asked for dtype code {code}"),
        }
    }
    out
}

/// A document as a list of sequences (sentence splitting), each a list of token values.
pub type Doc = Vec<Vec<i64>>;

/// The parts of a Megatron index, so tests can corrupt any of them before writing.
#[derive(Debug, Clone)]
pub struct Index {
    pub magic: Vec<u8>,
    pub version: u64,
    pub code: u8,
    pub lengths: Vec<i32>,
    pub pointers: Vec<i64>,
    pub doc_indices: Vec<i64>,
    pub seq_count_override: Option<u64>,
    pub doc_count_override: Option<u64>,
}

impl Index {
    pub fn bytes(&self) -> Vec<u8> {
        let mut b = self.magic.clone();
        b.extend_from_slice(&self.version.to_le_bytes());
        b.push(self.code);
        let s = self.seq_count_override.unwrap_or(self.lengths.len() as u64);
        let d = self
            .doc_count_override
            .unwrap_or(self.doc_indices.len() as u64);
        b.extend_from_slice(&s.to_le_bytes());
        b.extend_from_slice(&d.to_le_bytes());
        for l in &self.lengths {
            b.extend_from_slice(&l.to_le_bytes());
        }
        for p in &self.pointers {
            b.extend_from_slice(&p.to_le_bytes());
        }
        for d in &self.doc_indices {
            b.extend_from_slice(&d.to_le_bytes());
        }
        b
    }
}

/// Builds the index and the bin bytes for `docs` in dtype `code`.
pub fn build(code: Code, docs: &[Doc]) -> (Index, Vec<u8>) {
    let mut bin = Vec::new();
    let mut lengths = Vec::new();
    let mut pointers = Vec::new();
    let mut doc_indices = vec![0i64];
    for doc in docs {
        for seq in doc {
            pointers.push(bin.len() as i64);
            lengths.push(seq.len() as i32);
            bin.extend_from_slice(&encode(code.code, seq));
        }
        doc_indices.push(lengths.len() as i64);
    }
    let index = Index {
        magic: b"MMIDIDX\x00\x00".to_vec(),
        version: 1,
        code: code.code,
        lengths,
        pointers,
        doc_indices,
        seq_count_override: None,
        doc_count_override: None,
    };
    (index, bin)
}

/// Writes `<prefix>.idx` and `<prefix>.bin`.
pub fn write(prefix: &Path, index: &Index, bin: &[u8]) {
    std::fs::write(with(prefix, "idx"), index.bytes()).unwrap();
    std::fs::write(with(prefix, "bin"), bin).unwrap();
}

/// Writes a valid shard and returns its prefix.
pub fn write_docs(dir: &Path, name: &str, code: Code, docs: &[Doc]) -> PathBuf {
    let prefix = dir.join(name);
    let (index, bin) = build(code, docs);
    write(&prefix, &index, &bin);
    prefix
}

/// `prefix` + "." + `ext`.
pub fn with(prefix: &Path, ext: &str) -> PathBuf {
    let mut s = prefix.as_os_str().to_owned();
    s.push(".");
    s.push(ext);
    PathBuf::from(s)
}

/// Writes a 1-D .npy file by hand (format version 1.0) with the given descr ('<u8', ...).
pub fn write_npy(path: &Path, descr: &str, shape: &str, data: &[u8]) {
    let mut header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
    let total = 10 + header.len() + 1;
    let pad = (64 - total % 64) % 64;
    header.push_str(&" ".repeat(pad));
    header.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    std::fs::write(path, out).unwrap();
}

/// Writes `<prefix>.groups.npy` with uint64 ids.
pub fn write_groups(prefix: &Path, ids: &[u64]) {
    let data: Vec<u8> = ids.iter().flat_map(|i| i.to_le_bytes()).collect();
    write_npy(
        &with(prefix, "groups.npy"),
        "<u8",
        &format!("({},)", ids.len()),
        &data,
    );
}

/// Simple documents: doc i has `lens[i]` tokens with values i*1000 + j (wrapped into u8 range
/// by the caller's choice of values when needed).
pub fn simple_docs(lens: &[usize], modulo: i64) -> Vec<Doc> {
    lens.iter()
        .enumerate()
        .map(|(i, &n)| {
            vec![(0..n as i64)
                .map(|j| (i as i64 * 1000 + j) % modulo)
                .collect()]
        })
        .collect()
}

/// The millrace binary built by cargo for integration tests.
pub fn bin() -> std::process::Command {
    // MILLRACE_TEST_BIN: a test binary run away from its build (scripts/device-run runs
    // the GPU tests on a machine without cargo) names the millrace beside it.
    match std::env::var_os("MILLRACE_TEST_BIN") {
        Some(path) => std::process::Command::new(path),
        None => std::process::Command::new(env!("CARGO_BIN_EXE_millrace")),
    }
}

/// What `millrace status --socket SOCKET` prints (stdout).
pub fn status_text(socket: &Path) -> String {
    let out = bin()
        .args(["status", "--socket"])
        .arg(socket)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `millrace check-config --config config`, which must fail, and returns its stderr.
pub fn check_config_refusal(config: &Path) -> String {
    let out = bin()
        .args(["check-config", "--config"])
        .arg(config)
        .output()
        .expect("running millrace check-config");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "check-config passed {}: {err}",
        config.display()
    );
    err
}

/// The dtype Megatron assigns to `code`, spelled out independently of the code under test.
pub fn dtype_of(code: u8) -> millrace::corpus::DType {
    use millrace::corpus::DType;
    match code {
        1 => DType::Uint8,
        2 => DType::Int8,
        3 => DType::Int16,
        4 => DType::Int32,
        5 => DType::Int64,
        6 => DType::Float64,
        7 => DType::Float32,
        8 => DType::Uint16,
        _ => panic!("no dtype code {code}"),
    }
}

/// Smallest and largest token values that survive a round trip through `code` exactly
/// (floats: the integers their mantissa represents).
pub fn value_range(code: u8) -> (i64, i64) {
    match code {
        1 => (0, 255),
        2 => (-128, 127),
        3 => (i64::from(i16::MIN), i64::from(i16::MAX)),
        4 => (i64::from(i32::MIN), i64::from(i32::MAX)),
        5 => (i64::MIN, i64::MAX),
        6 => (-(1 << 53), 1 << 53),
        7 => (-(1 << 24), 1 << 24),
        8 => (0, 65535),
        _ => panic!("no dtype code {code}"),
    }
}

// ------------------------------------------------------------ daemon fixtures

/// A synthetic corpus in `<temp dir>/c`, with the `millrace.toml` synth writes; the temp
/// dir lives as long as this value.
pub struct Corpus {
    pub tmp: tempfile::TempDir,
    pub dir: PathBuf,
}

/// Synthesizes `tokens` uint16 tokens (vocabulary 50304) over `domains` domains, shards
/// of at most `shard_tokens`, into a fresh temp dir.
pub fn corpus(tokens: u64, domains: usize, seed: u64, shard_tokens: u64) -> Corpus {
    use millrace::synth::{self, SynthOptions};
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("c");
    synth::synth(&SynthOptions {
        out: dir.clone(),
        tokens,
        domains,
        vocab: 50304,
        dtype: millrace::corpus::DType::Uint16,
        seed,
        shard_tokens,
        threads: 2,
        progress: false,
    })
    .unwrap();
    Corpus { tmp, dir }
}

/// The usual `[serve]` lines of a test daemon: `socket`, `ring_slots`,
/// `materialize_threads`, a 2 s handshake timeout and the config watcher off (so that
/// only the requests under test change anything).
pub fn serve_toml(socket: &Path, ring_slots: u64, threads: u64) -> String {
    format!(
        "socket = {:?}\nring_slots = {ring_slots}\nmaterialize_threads = {threads}\nhandshake_timeout_ms = 2000\nwatch_config = false\n",
        socket.to_str().unwrap()
    )
}

/// Writes `<dir>/<file>`: the corpus's `millrace.toml` with `[plan]` `seq_len` and
/// `global_batch_rows` set and a `[serve]` table made of the TOML fragments `serve` (a
/// key in a later fragment overrides the same key in an earlier one). Returns its path.
pub fn write_config(dir: &Path, file: &str, seq_len: u32, rows: u32, serve: &[&str]) -> PathBuf {
    let text = std::fs::read_to_string(dir.join("millrace.toml")).unwrap();
    let mut doc: toml::Table = toml::from_str(&text).unwrap();
    let plan = doc.get_mut("plan").unwrap().as_table_mut().unwrap();
    plan.insert("seq_len".into(), toml::Value::Integer(seq_len.into()));
    plan.insert(
        "global_batch_rows".into(),
        toml::Value::Integer(rows.into()),
    );
    let mut table = toml::Table::new();
    for part in serve {
        let part: toml::Table =
            toml::from_str(part).unwrap_or_else(|e| panic!("test [serve] lines {part:?}: {e}"));
        table.extend(part);
    }
    doc.insert("serve".into(), toml::Value::Table(table));
    let config = dir.join(file);
    std::fs::write(&config, toml::to_string(&doc).unwrap()).unwrap();
    config
}

/// A running `millrace serve --config <config>` with stdout and stderr in a log file;
/// killed and reaped on drop, which then fails the test if the log shows a panic.
pub struct Serve {
    /// The library's kill-on-drop guard, the one `millrace demo` and `bench` use.
    guard: ChildGuard,
    log: PathBuf,
}

impl Serve {
    /// Starts the daemon and waits (30 s at most) until `socket` accepts.
    pub fn start(config: &Path, socket: &Path, log: &Path) -> Serve {
        let mut s = Serve::spawn(config, log, |_| {});
        s.wait_listening(socket, Duration::from_secs(30));
        s
    }

    /// Starts the daemon without waiting for it; `tweak` adds to its command line
    /// (arguments after `--config <config>`, environment).
    pub fn spawn(config: &Path, log: &Path, tweak: impl FnOnce(&mut Command)) -> Serve {
        let out = std::fs::File::create(log).unwrap();
        let mut cmd = bin();
        cmd.args(["serve", "--config"]).arg(config);
        tweak(&mut cmd);
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("millrace serve starts");
        Serve {
            guard: ChildGuard::new(child, "millrace serve"),
            log: log.to_path_buf(),
        }
    }

    /// Waits until `socket` accepts; panics with the log if the daemon exits first or
    /// does not listen within `limit`.
    pub fn wait_listening(&mut self, socket: &Path, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.exited() {
                panic!("millrace serve exited ({status}):\n{}", self.log_text());
            }
            if UnixStream::connect(socket).is_ok() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "millrace serve did not listen:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> libc::pid_t {
        let id = self.guard.id();
        // 0 would make kill(2) signal our whole process group.
        assert_ne!(id, 0, "the daemon was already reaped");
        id as libc::pid_t
    }

    pub fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill(2) on our own child, which is not reaped until drop or `kill`.
        assert_eq!(unsafe { libc::kill(self.pid(), sig) }, 0, "kill({sig})");
    }

    /// The exit status, if the daemon has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.guard.try_wait().unwrap()
    }

    /// Whether the daemon is running (not exited, not killed).
    pub fn alive(&mut self) -> bool {
        matches!(self.guard.try_wait(), Ok(None))
    }

    /// Waits up to `timeout` for the daemon to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(s) = self.exited() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Kills and reaps the daemon (once; later calls do nothing).
    pub fn kill(&mut self) {
        self.guard.kill();
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        self.kill();
        let log = self.log_text();
        if log.contains("panicked") && !std::thread::panicking() {
            panic!("the daemon panicked:\n{log}");
        }
    }
}

/// Control requests (docs/PROTOCOL.md) to a test daemon, 20 s at most each; implemented
/// by the fixtures that know its socket.
pub trait Control {
    fn control_socket(&self) -> &Path;

    /// Sends `req` on a control connection of its own and returns the reply.
    fn req(&self, req: serde_json::Value) -> serde_json::Value {
        millrace::control::request(self.control_socket(), &req, Duration::from_secs(20))
            .unwrap_or_else(|e| panic!("control request {req}: {e}"))
    }

    /// The daemon's STATUS object.
    fn status(&self) -> serde_json::Value {
        let r = self.req(millrace::control::status_request());
        assert_eq!(r["ok"], true, "{r}");
        assert_eq!(r["op"], "status", "{r}");
        r["status"].clone()
    }

    /// Polls `status` until the daemon counts `n` trainer clients (it sees a client
    /// that hung up only when its connection task ends), 20 s at most.
    fn wait_clients(&self, n: u64) {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let st = self.status();
            if st["clients"] == n {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "never {n} clients: {st}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The daemon's journal of applied changes.
    fn journal(&self) -> Vec<serde_json::Value> {
        let r = self.req(millrace::control::journal_request());
        assert_eq!(r["ok"], true, "{r}");
        r["journal"].as_array().cloned().unwrap_or_default()
    }
}

/// Whether a root-only test must skip here: never as root; as anyone else it panics when
/// `CI` is set (CI runs as root, so a skip there means a test that silently never ran),
/// and otherwise says why on stderr and returns true.
pub fn skip_unless_root(test: &str, why: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    if euid == 0 {
        return false;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{test} needs root ({why}) and CI is set, where tests run as root: running as uid \
         {euid} would skip it silently"
    );
    eprintln!("skipping {test} as uid {euid}: needs root ({why}); set CI to make this a failure");
    true
}

/// In the process about to exec (a `pre_exec` hook): a mount namespace of its own, with
/// a fresh `fstype` (mount options `options`) mounted at `target`, which exists; the
/// test's own namespace is left alone. How the tests give the daemon a full disk or a
/// filesystem without O_DIRECT (needs root).
///
/// # Safety
/// Only between fork and exec: system calls on the C strings passed in.
pub unsafe fn mount_in_own_namespace(
    fstype: &std::ffi::CStr,
    target: &std::ffi::CStr,
    options: Option<&std::ffi::CStr>,
) -> std::io::Result<()> {
    let check = |r: libc::c_int| match r {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error()),
    };
    let data = options.map_or(std::ptr::null(), |o| o.as_ptr().cast());
    // SAFETY: the caller runs this in a child between fork and exec; every pointer is a
    // C string that outlives the calls, or null where the call allows it.
    unsafe {
        check(libc::unshare(libc::CLONE_NEWNS))?;
        check(libc::mount(
            c"none".as_ptr(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ))?;
        check(libc::mount(
            fstype.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            data,
        ))
    }
}

/// `millrace explain --json` for steps `start..start + count` of rank `rank.0` of
/// `rank.1`: per step its number and its rows, each the tokens the explanation's
/// segments name, read from the shards through `Shard` and padded with `pad` to the
/// step's own `seq_len + 1` (so stages of different shapes read alike).
pub fn explained_rows(
    config: &Path,
    start: u64,
    count: u64,
    rank: (u32, u32),
    pad: i64,
) -> Vec<(u64, Vec<Vec<i64>>)> {
    let out = bin()
        .args(["explain", "--config"])
        .arg(config)
        .args(["--step", &start.to_string(), "--count", &count.to_string()])
        .args([
            "--dp-rank",
            &rank.0.to_string(),
            "--dp-size",
            &rank.1.to_string(),
        ])
        .arg("--json")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut shards: std::collections::HashMap<String, millrace::corpus::Shard> = Default::default();
    let mut steps = Vec::new();
    for line in String::from_utf8(out.stdout).unwrap().lines() {
        let s: serde_json::Value = serde_json::from_str(line).unwrap();
        let width = s["seq_len"].as_u64().unwrap() as usize + 1;
        let mut rows = Vec::new();
        for row in s["rows"].as_array().unwrap() {
            let mut t = Vec::with_capacity(width);
            for g in row["segments"].as_array().unwrap() {
                let name = g["shard"].as_str().unwrap();
                let shard = shards.entry(name.to_string()).or_insert_with(|| {
                    millrace::corpus::Shard::open(Path::new(name), None).unwrap()
                });
                let doc = shard.doc_tokens(g["doc"].as_u64().unwrap()).unwrap();
                for i in g["start"].as_u64().unwrap()..g["end"].as_u64().unwrap() {
                    t.push(doc.get_i64(i as usize).unwrap());
                }
            }
            t.resize(width, pad);
            rows.push(t);
        }
        steps.push((s["step"].as_u64().unwrap(), rows));
    }
    steps
}

/// Checks a compact slot's `row_bounds` against the `cu_seqlens` its arrays derive to
/// (PROTOCOL.md section 4): per row, the index of the row's end entry and its longest
/// piece. Panics naming the step and row; `what` says which test's slot it is.
pub fn check_row_bounds(v: &millrace::client::BatchView<'_>, what: &str) {
    let millrace::client::SlotArrays::Compact {
        row_bounds: Some(bounds),
        ..
    } = v.arrays
    else {
        panic!("{what}: step {}: a compact slot without row_bounds", v.step);
    };
    let cu = v.expanded().cu_seqlens;
    let l = v.seq_len as i32;
    assert_eq!(bounds.len(), 2 * v.rows as usize, "{what}: step {}", v.step);
    let mut i0 = 0usize;
    for r in 0..v.rows as usize {
        let end = cu.iter().position(|&x| x == (r as i32 + 1) * l).unwrap();
        let longest = cu[i0..=end].windows(2).map(|w| w[1] - w[0]).max();
        assert_eq!(
            (bounds[2 * r], bounds[2 * r + 1]),
            (end as i32, longest.unwrap()),
            "{what}: step {} row {r}",
            v.step
        );
        i0 = end;
    }
    assert_eq!(i0 as u32, v.cu_len - 1, "{what}: step {}", v.step);
}

/// Sets `path`'s mtime to `t` (a copy or rewrite that kept its mtime, as `cp -p` does).
pub fn set_mtime(path: &Path, t: std::time::SystemTime) {
    std::fs::File::options()
        .write(true)
        .open(path)
        .unwrap()
        .set_modified(t)
        .unwrap();
}
