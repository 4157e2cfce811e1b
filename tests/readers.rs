//! `[serve] reader` end to end (issue 15 item 4): the real daemon with each reader
//! (`auto`, `mmap`, `mmap-willneed`, `uring`, `uring-direct`) delivers, compact and expanded,
//! exactly the tokens `millrace explain` says each row holds; a shard truncated under
//! the daemon fails only the ring that reads it, with `ERROR materialize` naming the
//! file, while a job on other shards streams on; a reader the config misnames is
//! refused naming the key, the value and the names allowed. io_uring failing after
//! start (seccomp filters in the daemon) is given up or retried as the error says, and
//! a shard on a filesystem without O_DIRECT (ramfs) is read buffered alone; the rows
//! stay what `explain` says throughout.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{Control, Serve};
use millrace::client::{Client, ClientError, Hello, SlotArrays, SlotLayout};

const SEQ_LEN: u32 = 256;
const ROWS: u32 = 4;
const READERS: [&str; 4] = ["mmap", "mmap-willneed", "uring", "uring-direct"];
/// The readers and `auto` (plain mappings for a corpus this small).
const CHOICES: [&str; 5] = ["auto", "mmap", "mmap-willneed", "uring", "uring-direct"];

/// A daemon started with `reader` on `corpus`, the socket its clients connect to.
struct Daemon {
    serve: Serve,
    socket: PathBuf,
}

impl Control for Daemon {
    fn control_socket(&self) -> &Path {
        &self.socket
    }
}

impl Daemon {
    fn start(dir: &Path, reader: &str) -> Daemon {
        Daemon::start_as(dir, reader, reader, |_| {})
    }

    /// [`Daemon::start`] with its files named `name` (config, socket, log), and `tweak`
    /// applied to its command.
    fn start_as(
        dir: &Path,
        name: &str,
        reader: &str,
        tweak: impl FnOnce(&mut std::process::Command),
    ) -> Daemon {
        let socket = dir.join(format!("{name}.sock"));
        let config = common::write_config(
            dir,
            &format!("{name}.toml"),
            SEQ_LEN,
            ROWS,
            &[
                &common::serve_toml(&socket, 4, 2),
                &format!("reader = {reader:?}"),
            ],
        );
        let mut serve = Serve::spawn(&config, &dir.join(format!("{name}.log")), tweak);
        serve.wait_listening(&socket, Duration::from_secs(30));
        Daemon { serve, socket }
    }

    fn connect(&self, job: &str, layout: SlotLayout, start_step: u64) -> Client {
        let mut h = Hello::new(0, 1, ROWS, 1);
        h.job = job.into();
        h.slot_layout = Some(layout);
        h.start_step = Some(start_step);
        let mut c = Client::connect(&self.socket, &h)
            .unwrap_or_else(|e| panic!("{job}: {e}\n{}", self.serve.log_text()));
        c.set_timeout(Some(Duration::from_secs(30)));
        c
    }

    /// Whether the daemon reads compact slots with io_uring; where the kernel refuses it
    /// the daemon logs why and copies from the mappings (said here, not failed).
    fn reads_with_uring(&self, reader: &str) -> bool {
        let log = self.serve.log_text();
        if log.contains("cannot be used") {
            eprintln!("{reader}: the daemon fell back: {log}");
            return false;
        }
        reader.starts_with("uring") && log.contains("compact slots read with io_uring")
    }
}

/// The row bytes of a compact batch, and its step.
fn compact_rows(b: millrace::client::BatchView<'_>, what: &str) -> (u64, Vec<u8>) {
    let SlotArrays::Compact { rows, .. } = b.arrays else {
        panic!("{what}: a compact job got {:?}", b.arrays);
    };
    (b.step, rows.as_bytes().to_vec())
}

/// Rows of uint16 ids as a compact slot holds them.
fn row_bytes(rows: &[Vec<u16>]) -> Vec<u8> {
    rows.iter()
        .flatten()
        .flat_map(|t| t.to_le_bytes())
        .collect()
}

/// Every row's tokens (`seq_len + 1`, padded with `pad`) as `millrace explain --json`
/// describes them, for steps `0..steps` of the one rank, as the shards' uint16 ids.
fn explained(config: &Path, steps: u64, pad: u16) -> Vec<Vec<Vec<u16>>> {
    common::explained_rows(config, 0, steps, (0, 1), i64::from(pad))
        .into_iter()
        .map(|(_, rows)| {
            rows.into_iter()
                .map(|r| r.into_iter().map(|t| t as u16).collect())
                .collect()
        })
        .collect()
}

/// Each reader, compact (the slot's row bytes) and expanded (int32 tokens and labels):
/// 40 steps equal what `explain` says, byte for byte, and the io_uring readers really
/// read with io_uring where the kernel allows it.
#[test]
fn every_reader_delivers_exactly_what_explain_says() {
    let corpus = common::corpus(600_000, 2, 11, 100_000);
    let dir = &corpus.dir;
    const STEPS: u64 = 40;
    let mut want: Option<Vec<Vec<Vec<u16>>>> = None;
    for reader in CHOICES {
        let d = Daemon::start(dir, reader);
        let mut compact = d.connect("c", SlotLayout::Compact, 0);
        let mut expanded = d.connect("e", SlotLayout::Expanded, 0);
        let pad = compact.welcome().pad_token as u16;
        let want = want.get_or_insert_with(|| explained(&dir.join("auto.toml"), STEPS, pad));
        for (step, rows) in want.iter().enumerate() {
            let (at, got) = compact_rows(compact.next_batch().unwrap(), reader);
            assert_eq!(at, step as u64);
            assert!(
                got == row_bytes(rows),
                "{reader}: step {step}: compact rows differ from explain"
            );
            let e = expanded.next_batch().unwrap().expanded();
            let l = SEQ_LEN as usize;
            let tokens: Vec<i64> = rows
                .iter()
                .flat_map(|r| &r[..l])
                .map(|&t| t.into())
                .collect();
            let labels: Vec<i64> = rows
                .iter()
                .flat_map(|r| &r[1..])
                .map(|&t| t.into())
                .collect();
            assert!(e.tokens == tokens, "{reader}: step {step}: expanded tokens");
            assert!(e.labels == labels, "{reader}: step {step}: expanded labels");
        }
        let uring = d.reads_with_uring(reader);
        let fell_back = d.serve.log_text().contains("cannot be used");
        assert!(
            uring == reader.starts_with("uring") || fell_back,
            "{reader}"
        );
        eprintln!("{reader}: {STEPS} steps equal explain (io_uring: {uring})");
    }
}

/// Reads until an ERROR frame and returns (code, message); panics on anything else.
fn first_error(c: &mut Client, limit: usize) -> (String, String) {
    for _ in 0..limit {
        match c.next_batch() {
            Ok(_) => {}
            Err(ClientError::Daemon { code, message }) => return (code, message),
            Err(e) => panic!("expected an ERROR frame, got {e}"),
        }
    }
    panic!("no ERROR within {limit} steps");
}

/// Each reader: `web`'s token files truncated to a page under a live daemon. The job on
/// web stops with `ERROR materialize` naming a web file (the io_uring read's short
/// read, the copy's SIGBUS, or the periodic stat, whichever sees it first); a job on
/// `code` streams on, and the daemon stays up.
#[test]
fn a_truncated_shard_fails_only_its_ring_with_every_reader() {
    // Web alone until step 1000, then code alone: a job from 0 reads no code shard, a
    // job from 1010 no web shard.
    let corpus = common::corpus(200_000, 2, 3, 50_000);
    let dir = &corpus.dir;
    let cfg = dir.join("millrace.toml");
    let text = std::fs::read_to_string(&cfg).unwrap();
    let (head, _) = text.split_once("[[plan.schedule]]").unwrap();
    let schedule = "[[plan.schedule]]\nstep = 0\nweights = { web = 1.0 }\n\n\
                    [[plan.schedule]]\nstep = 1000\nweights = { web = 1.0 }\n\n\
                    [[plan.schedule]]\nstep = 1001\nweights = { code = 1.0 }\n";
    let pristine: Vec<(PathBuf, Vec<u8>)> = std::fs::read_dir(dir.join("web"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "bin"))
        .map(|p| (p.clone(), std::fs::read(&p).unwrap()))
        .collect();
    assert!(!pristine.is_empty());
    for reader in READERS {
        std::fs::write(&cfg, format!("{head}{schedule}")).unwrap();
        for (p, bytes) in &pristine {
            std::fs::write(p, bytes).unwrap();
        }
        let mut d = Daemon::start(dir, reader);
        let mut web = d.connect("web", SlotLayout::Compact, 0);
        let mut code = d.connect("code", SlotLayout::Compact, 1010);
        for _ in 0..10 {
            web.next_batch().unwrap();
            assert!(code.next_batch().unwrap().domain.iter().all(|&x| x == 1));
        }
        for (p, _) in &pristine {
            let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
            f.set_len(4096).unwrap();
        }
        let (code_, message) = first_error(&mut web, 500);
        assert_eq!(code_, "materialize", "{reader}: {message}");
        assert!(
            message.contains("/web/web-0000"),
            "{reader}: the error names no web shard: {message}"
        );
        // The io_uring readers' own error, or the periodic stat's if it came first.
        if d.reads_with_uring(reader) {
            assert!(
                message.contains("reading with io_uring: ") && message.contains("truncated: bytes")
                    || message.contains("changed size"),
                "{reader}: {message}"
            );
        }
        eprintln!("{reader}: {message}");
        for _ in 0..100 {
            let b = code
                .next_batch()
                .unwrap_or_else(|e| panic!("{reader}: the code job stopped: {e}"));
            assert!(b.domain.iter().all(|&x| x == 1));
        }
        assert!(d.serve.alive(), "{reader}: {}", d.serve.log_text());
    }
}

/// Regression: a shard rewritten in place (same size) while the daemon had no client
/// was served to the next client: the workers stat the shards at the top of their loop,
/// before sleeping in the claim, so the first fill after a long idle copied the new
/// bytes. The stat now runs after the claim too; that fill fails naming the file.
#[test]
fn a_shard_rewritten_while_the_daemon_is_idle_is_not_served() {
    let corpus = common::corpus(50_000, 1, 1, 50_000);
    let d = Daemon::start(&corpus.dir, "mmap");
    std::thread::sleep(Duration::from_millis(300));
    for e in std::fs::read_dir(corpus.dir.join("web")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "bin") {
            let len = std::fs::metadata(&p).unwrap().len() as usize;
            std::fs::write(&p, vec![7u8; len]).unwrap();
        }
    }
    // Past the daemon's once-a-second stat, idle all along.
    std::thread::sleep(Duration::from_millis(1500));
    let mut c = d.connect("late", SlotLayout::Compact, 0);
    match c.next_batch() {
        Err(ClientError::Daemon { code, message }) => {
            assert_eq!(code, "materialize", "{message}");
            assert!(message.contains("modified in place"), "{message}");
        }
        Ok(b) => panic!("step {} served from a shard rewritten in place", b.step),
        Err(e) => panic!("{e}"),
    }
}

/// Regression: a sent SIGBUS (`kill -BUS`) was handed to std's stack-overflow handler,
/// which returned without a fault to recur on: the daemon lived on with SIGBUS at its
/// default action and no guard, and the next truncated shard killed it. A sent SIGBUS
/// now ends the daemon as the signal's default action does, as documented.
#[test]
fn a_sent_sigbus_ends_the_daemon_as_its_default_action() {
    use std::os::unix::process::ExitStatusExt;
    let corpus = common::corpus(50_000, 1, 1, 50_000);
    let mut d = Daemon::start(&corpus.dir, "mmap");
    let mut c = d.connect("one", SlotLayout::Compact, 0);
    c.next_batch().unwrap();
    d.serve.signal(libc::SIGBUS);
    let status = d.serve.wait_exit(Duration::from_secs(20));
    assert_eq!(
        status.and_then(|s| s.signal()),
        Some(libc::SIGBUS),
        "{status:?}: {}",
        d.serve.log_text()
    );
}

/// A reader the daemon does not know is refused at `check-config` (and so at `serve`),
/// naming `[serve]`, the value and the readers there are.
#[test]
fn an_unknown_reader_is_refused_naming_the_choices() {
    let corpus = common::corpus(50_000, 1, 1, 50_000);
    let socket = corpus.dir.join("x.sock");
    let config = common::write_config(
        &corpus.dir,
        "bad.toml",
        SEQ_LEN,
        ROWS,
        &[&common::serve_toml(&socket, 4, 1), "reader = \"io_uring\""],
    );
    let err = common::check_config_refusal(&config);
    for want in ["[serve]", "io_uring", "mmap-willneed", "uring-direct"] {
        assert!(err.contains(want), "{want:?} missing from: {err}");
    }
}

/// Installs, in the process about to exec, a seccomp filter under which system call `nr`
/// fails with EPERM, as a container profile that leaves it out of its allowlist does.
/// Only async-signal-safe calls: it runs between fork and exec.
fn deny_syscall(nr: libc::c_long) -> std::io::Result<()> {
    let (ld_nr, jeq, ret) = (0x20, 0x15, 0x06);
    let op = |code, jf, k| libc::sock_filter { code, jt: 0, jf, k };
    install_filter(&mut [
        op(ld_nr, 0, 0),
        op(jeq, 1, nr as u32),
        op(ret, 0, 0x0005_0000 | libc::EPERM as u32),
        op(ret, 0, 0x7fff_0000),
    ])
}

/// Installs the seccomp `filter` in this process (async-signal-safe).
fn install_filter(filter: &mut [libc::sock_filter]) -> std::io::Result<()> {
    let prog = libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_mut_ptr(),
    };
    // SAFETY: plain prctl calls; the program outlives the call that copies it.
    let ok = unsafe {
        libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0
            && libc::prctl(libc::PR_SET_SECCOMP, libc::SECCOMP_MODE_FILTER, &prog) == 0
    };
    if ok {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Regression: a seccomp profile that allows `io_uring_setup` but not `io_uring_enter`
/// let the reader be set up at start, and then every compact fill failed its ring with
/// `ERROR materialize ... io_uring_enter: Operation not permitted`. Whichever of the
/// three io_uring calls the daemon is refused, it now logs why at start and copies from
/// the mappings, and the rows are still what `explain` says.
#[test]
fn a_daemon_refused_any_io_uring_call_falls_back_to_the_copy() {
    use std::os::unix::process::CommandExt;
    let corpus = common::corpus(200_000, 1, 5, 50_000);
    let dir = &corpus.dir;
    let calls = [
        ("setup", libc::SYS_io_uring_setup),
        ("register", libc::SYS_io_uring_register),
        ("enter", libc::SYS_io_uring_enter),
    ];
    for (name, nr) in calls {
        let d = Daemon::start_as(dir, name, "uring-direct", |c| {
            // SAFETY: the hook only makes prctl calls (async-signal-safe).
            unsafe { c.pre_exec(move || deny_syscall(nr)) };
        });
        let mut c = d.connect("c", SlotLayout::Compact, 0);
        let pad = c.welcome().pad_token as u16;
        let refused = format!("io_uring_{name} refused");
        for (step, rows) in explained(&dir.join(format!("{name}.toml")), 8, pad)
            .iter()
            .enumerate()
        {
            let b = c
                .next_batch()
                .unwrap_or_else(|e| panic!("{refused}: step {step}: {e}"));
            let (_, got) = compact_rows(b, &refused);
            assert!(got == row_bytes(rows), "{refused}: step {step}");
        }
        let log = d.serve.log_text();
        assert!(
            log.contains(
                "[serve] reader = \"uring-direct\" cannot be used (io_uring is unavailable: "
            ) && log.contains("using \"mmap-willneed\""),
            "io_uring_{name} refused: {log}"
        );
        eprintln!(
            "io_uring_{name} refused: {}",
            log.lines()
                .find(|l| l.contains("cannot be used"))
                .unwrap_or("")
        );
    }
}

/// Installs, in the process about to exec, a seccomp filter under which `io_uring_enter`
/// fails with EPERM when it submits more than one entry: the start's check of a fresh
/// ring (one NOP) passes, and every fill's batch of reads is refused, as a refusal that
/// comes only after start and persists. Only async-signal-safe calls.
fn deny_batched_io_uring_enter() -> std::io::Result<()> {
    fail_batched_io_uring_enter(libc::EPERM)
}

/// [`deny_batched_io_uring_enter`], failing with `errno`.
fn fail_batched_io_uring_enter(errno: i32) -> std::io::Result<()> {
    let (ld, jeq, jgt, ret) = (0x20, 0x15, 0x25, 0x06);
    let op = |code, jt, jf, k| libc::sock_filter { code, jt, jf, k };
    install_filter(&mut [
        op(ld, 0, 0, 0),
        op(jeq, 0, 3, libc::SYS_io_uring_enter as u32),
        // The low word of the second argument, to_submit (little-endian).
        op(ld, 0, 0, 24),
        op(jgt, 0, 1, 1),
        op(ret, 0, 0, 0x0005_0000 | errno as u32),
        op(ret, 0, 0, 0x7fff_0000),
    ])
}

/// Regression: an `io_uring_enter` refusal that comes after start and persists failed
/// every compact fill with `ERROR materialize ... io_uring_enter: Operation not
/// permitted`: each fill dropped its broken ring, set up a new one whose one-time check
/// passed, and failed again. The daemon now gives io_uring up for good at the first such
/// failure, logging it once, and copies that fill and every later one from the mappings,
/// with the hints of `mmap-willneed` (plain mappings before, 2-4x slower cold): the rows
/// are what `explain` says.
#[test]
fn an_io_uring_enter_refused_after_start_falls_back_to_the_copy_for_good() {
    use std::os::unix::process::CommandExt;
    let corpus = common::corpus(200_000, 1, 5, 50_000);
    let dir = &corpus.dir;
    for reader in ["uring", "uring-direct"] {
        let name = format!("late-{reader}");
        let d = Daemon::start_as(dir, &name, reader, |c| {
            // SAFETY: the hook only makes prctl calls (async-signal-safe).
            unsafe { c.pre_exec(deny_batched_io_uring_enter) };
        });
        if !d.reads_with_uring(reader) {
            continue;
        }
        let st = d.status();
        assert_eq!(st["reader"], reader, "{st}");
        assert!(st["reader_fallback"].is_null(), "{st}");
        let mut c = d.connect("c", SlotLayout::Compact, 0);
        let pad = c.welcome().pad_token as u16;
        for (step, rows) in explained(&dir.join(format!("{name}.toml")), 16, pad)
            .iter()
            .enumerate()
        {
            let b = c
                .next_batch()
                .unwrap_or_else(|e| panic!("{reader}: step {step}: {e}\n{}", d.serve.log_text()));
            let (_, got) = compact_rows(b, reader);
            assert!(got == row_bytes(rows), "{reader}: step {step}");
        }
        let log = d.serve.log_text();
        let gave_up = format!(
            "[serve] reader = {reader:?} failed after start (io_uring: io_uring_enter: \
             Operation not permitted"
        );
        assert_eq!(log.matches(&gave_up).count(), 1, "{reader}: {log}");
        assert!(
            log.contains("copied from the mappings (as \"mmap-willneed\") until restart"),
            "{reader}: {log}"
        );
        assert!(!log.contains("ERROR"), "{reader}: {log}");
        // The operator sees it in `status` too, not only in the log.
        let st = d.status();
        assert_eq!(st["reader"], "mmap-willneed", "{st}");
        assert!(st["reader_retry"].is_null(), "{st}");
        let why = st["reader_fallback"].as_str().unwrap_or_default();
        assert!(
            why.contains("io_uring_enter: Operation not permitted"),
            "{st}"
        );
    }
}

/// Regression: io_uring failing after start for a reason that may pass (here every
/// fill's batch of reads refused with ENOMEM, as a memory squeeze answers) gave io_uring
/// up until restart at the first failure. Now the daemon copies that fill from the
/// mappings (with hints) and tries io_uring again after 1 s, then 2 s: the log and STATUS
/// (`reader_retry`) say so at each step, the rows are what `explain` says throughout,
/// and no ring fails.
#[test]
fn io_uring_short_of_memory_after_start_is_tried_again_after_a_backoff() {
    use std::os::unix::process::CommandExt;
    let corpus = common::corpus(200_000, 1, 5, 50_000);
    let dir = &corpus.dir;
    let reader = "uring-direct";
    let d = Daemon::start_as(dir, "squeezed", reader, |c| {
        // SAFETY: the hook only makes prctl calls (async-signal-safe).
        unsafe { c.pre_exec(|| fail_batched_io_uring_enter(libc::ENOMEM)) };
    });
    if !d.reads_with_uring(reader) {
        return;
    }
    let mut c = d.connect("c", SlotLayout::Compact, 0);
    let pad = c.welcome().pad_token as u16;
    let want = explained(&dir.join("squeezed.toml"), 48, pad);
    let mut steps = want.iter().enumerate();
    let mut check = |n: usize| {
        for (step, rows) in steps.by_ref().take(n) {
            let b = c
                .next_batch()
                .unwrap_or_else(|e| panic!("step {step}: {e}\n{}", d.serve.log_text()));
            assert!(compact_rows(b, reader).1 == row_bytes(rows), "step {step}");
        }
    };
    check(16);
    let st = d.status();
    assert_eq!(st["reader"], "mmap-willneed", "{st}");
    let retry = &st["reader_retry"];
    // One failure, or more on a machine slow enough to take 1 s over 16 steps.
    assert!(retry["failures"].as_u64().is_some_and(|n| n >= 1), "{st}");
    assert_eq!(retry["give_up_after"], 10, "{st}");
    assert!(retry["retry_in_ms"].as_u64().is_some(), "{st}");
    let error = retry["error"].as_str().unwrap_or_default();
    assert!(error.contains("Cannot allocate memory"), "{st}");
    let why = st["reader_fallback"].as_str().unwrap_or_default();
    assert!(why.contains("until io_uring is tried again in"), "{st}");
    // Past the backoff a fill tries io_uring again, fails, and the backoff doubles.
    std::thread::sleep(Duration::from_millis(1100));
    check(32);
    let st = d.status();
    let failures = st["reader_retry"]["failures"].as_u64();
    assert!(failures.is_some_and(|n| n >= 2), "{st}");
    let log = d.serve.log_text();
    let first = format!(
        "[serve] reader = {reader:?} failed (io_uring: io_uring_enter: Cannot allocate memory \
         (os error 12)); compact slots are copied from the mappings (as \"mmap-willneed\") \
         until io_uring is tried again in 1000 ms (failure 1 in a row; given up after 10)"
    );
    assert_eq!(log.matches(&first).count(), 1, "{log}");
    assert_eq!(
        log.matches("in 2000 ms (failure 2 in a row").count(),
        1,
        "{log}"
    );
    assert!(
        !log.contains("until restart") && !log.contains("ERROR"),
        "{log}"
    );
}

/// The `.bin` token files under `dir`, sorted.
fn token_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|x| x == "bin") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// A hook for the process about to exec: in a mount namespace of its own, `file` is a
/// copy of itself on a ramfs mounted at `ram` (an empty directory), bound over it; ramfs
/// refuses `O_DIRECT` (EINVAL), as FUSE and some network filesystems do. Only system
/// calls on memory prepared before the fork.
fn on_ramfs(file: &Path, ram: &Path) -> impl FnMut() -> std::io::Result<()> + Send + Sync {
    use std::ffi::CString;
    let c = |p: &Path| CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    let (target, mount_at, copy) = (c(file), c(ram), c(&ram.join("shard.bin")));
    let bytes = std::fs::read(file).unwrap();
    move || {
        // SAFETY: system calls on C strings and bytes owned by the closure, in the child.
        unsafe {
            common::mount_in_own_namespace(c"ramfs", &mount_at, None)?;
            let fd = libc::open(copy.as_ptr(), libc::O_WRONLY | libc::O_CREAT, 0o600);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let mut done = 0;
            while done < bytes.len() {
                let n = libc::write(fd, bytes[done..].as_ptr().cast(), bytes.len() - done);
                if n <= 0 {
                    return Err(std::io::Error::last_os_error());
                }
                done += n as usize;
            }
            libc::close(fd);
            let none = std::ptr::null();
            match libc::mount(
                copy.as_ptr(),
                target.as_ptr(),
                none,
                libc::MS_BIND,
                none.cast(),
            ) {
                0 => Ok(()),
                _ => Err(std::io::Error::last_os_error()),
            }
        }
    }
}

/// Regression: one shard file on a filesystem that refuses `O_DIRECT` (here a ramfs
/// bound over the second of four token files, in the daemon's own mount namespace) made
/// `uring-direct` read the whole corpus through the page cache (`uring`), saying
/// `cannot be used (...: open with O_DIRECT: Invalid argument)`. That file alone is now
/// read buffered, named once in the log; the daemon reads with `uring-direct`, and the
/// rows are what `explain` says.
#[test]
fn a_shard_on_a_filesystem_without_o_direct_is_read_buffered_alone() {
    use std::os::unix::process::CommandExt;
    if common::skip_unless_root(
        "a_shard_on_a_filesystem_without_o_direct_is_read_buffered_alone",
        "mounting a ramfs",
    ) {
        return;
    }
    let corpus = common::corpus(200_000, 1, 5, 50_000);
    let dir = &corpus.dir;
    let files = token_files(dir);
    assert_eq!(files.len(), 4, "{files:?}");
    let ram = corpus.tmp.path().join("ram");
    std::fs::create_dir(&ram).unwrap();
    let reader = "uring-direct";
    let d = Daemon::start_as(dir, "ramfs", reader, |c| {
        // SAFETY: the hook makes system calls only (async-signal-safe).
        unsafe { c.pre_exec(on_ramfs(&files[1], &ram)) };
    });
    let log = d.serve.log_text();
    let refused = log.lines().find(|l| l.contains("cannot be used"));
    // Where the kernel refuses io_uring, or the temp filesystem O_DIRECT for every file,
    // there is nothing to check; a refusal of the ramfs file alone is the regression.
    if refused.is_some_and(|l| {
        l.contains("io_uring is unavailable") || !l.contains(&*files[1].to_string_lossy())
    }) {
        eprintln!("skipping: {log}");
        return;
    }
    assert!(d.reads_with_uring(reader), "{log}");
    let st = d.status();
    assert_eq!(st["reader"], reader, "{st}");
    assert!(st["reader_fallback"].is_null(), "{st}");
    let mut c = d.connect("c", SlotLayout::Compact, 0);
    let pad = c.welcome().pad_token as u16;
    for (step, rows) in explained(&dir.join("ramfs.toml"), 32, pad)
        .iter()
        .enumerate()
    {
        let b = c
            .next_batch()
            .unwrap_or_else(|e| panic!("step {step}: {e}\n{}", d.serve.log_text()));
        assert!(compact_rows(b, reader).1 == row_bytes(rows), "step {step}");
    }
    let log = d.serve.log_text();
    let named = format!(
        "{}: open with O_DIRECT: Invalid argument (os error 22): this shard file is read \
         through the page cache (io_uring without O_DIRECT); the others keep O_DIRECT",
        files[1].display()
    );
    assert_eq!(log.matches(&named).count(), 1, "{log}");
    assert_eq!(
        log.matches("read through the page cache").count(),
        1,
        "{log}"
    );
    assert!(!log.contains("ERROR") && !log.contains("failed"), "{log}");
    assert_eq!(d.status()["reader"], reader);
}
