//! Access control on the daemon's socket (issue 5 item 6), against the real `millrace
//! serve` on a synthetic corpus: the socket is mode 0660 and owned by `[serve]
//! socket_group`; an unknown group stops the daemon with the group named; with
//! `allowed_uids` / `allowed_gids` set, a peer that is not listed is refused (REFUSED,
//! code `access`) before any frame is read, trainers and control clients alike, and the
//! daemon's own uid is always let in.
//!
//! The refusal test needs a second identity, so it runs only as root (as uid 65534,
//! "nobody"); as anyone else it fails when `CI` is set (CI runs as root) and otherwise
//! skips with a line on stderr.

mod common;

use std::ffi::CStr;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use common::{bin, skip_unless_root, Serve};
use millrace::control as ctl;
use serde_json::Value;

const TIMEOUT: Duration = Duration::from_secs(20);
/// The unprivileged identity the root-only test connects as.
const NOBODY: u32 = 65534;

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() }
}

fn egid() -> u32 {
    // SAFETY: getegid has no preconditions.
    unsafe { libc::getegid() }
}

/// The primary gid of `uid` from the password database.
fn primary_gid(uid: u32) -> Option<u32> {
    let mut buf = vec![0u8; 1 << 16];
    // SAFETY: an all-zero passwd is a valid value (null pointers).
    let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: all pointers are live locals; buf holds buf.len() writable bytes.
    let rc = unsafe {
        libc::getpwuid_r(
            uid,
            &mut pw,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut result,
        )
    };
    (rc == 0 && !result.is_null()).then_some(pw.pw_gid)
}

/// The name of group `gid`, if the group database has one.
fn group_name(gid: u32) -> Option<String> {
    let mut buf = vec![0u8; 1 << 16];
    // SAFETY: an all-zero group is a valid value (null pointers).
    let mut gr: libc::group = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::group = std::ptr::null_mut();
    // SAFETY: all pointers are live locals; buf holds buf.len() writable bytes.
    let rc = unsafe {
        libc::getgrgid_r(
            gid,
            &mut gr,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut result,
        )
    };
    if rc != 0 || result.is_null() || gr.gr_name.is_null() {
        return None;
    }
    // SAFETY: on success gr_name points at a NUL-terminated string inside buf.
    Some(
        unsafe { CStr::from_ptr(gr.gr_name) }
            .to_string_lossy()
            .into_owned(),
    )
}

/// A corpus and its config, in a temp dir that lives as long as this value.
struct Fixture {
    corpus: common::Corpus,
    config: PathBuf,
    socket: PathBuf,
    log: PathBuf,
}

/// A 300k-token, 2-domain corpus; the config is written by [`Fixture::configure`].
fn fixture() -> Fixture {
    let corpus = common::corpus(300_000, 2, 6, 200_000);
    Fixture {
        config: corpus.dir.join("test.toml"),
        socket: corpus.dir.join("s.sock"),
        log: corpus.dir.join("serve.log"),
        corpus,
    }
}

impl Fixture {
    fn dir(&self) -> &std::path::Path {
        &self.corpus.dir
    }

    fn sock(&self) -> &str {
        self.socket.to_str().unwrap()
    }

    /// Writes the config with a `[serve]` table: the socket, a small geometry, and
    /// `access` (TOML lines: socket_group, allowed_uids, allowed_gids).
    fn configure(&self, access: &str) {
        let serve = common::serve_toml(&self.socket, 2, 1);
        common::write_config(self.dir(), "test.toml", 128, 4, &[&serve, access]);
    }

    /// Lets other users reach the socket's directory (a tempdir is 0700).
    fn open_path(&self) {
        for d in [self.corpus.tmp.path(), self.dir()] {
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
    }

    fn socket_meta(&self) -> std::fs::Metadata {
        std::fs::metadata(&self.socket).unwrap()
    }

    /// Starts `millrace serve` and waits until the socket accepts.
    fn serve(&self) -> Serve {
        Serve::start(&self.config, &self.socket, &self.log)
    }
}

/// Waits (a few seconds at most) for the daemon's log to contain `what`.
fn log_mentions(s: &Serve, what: &str) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if s.log_text().contains(what) {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs millrace with `args`, as `ids` = (uid, gid) when given, from the fixture's dir.
fn millrace_as(f: &Fixture, ids: Option<(u32, u32)>, args: &[&str]) -> Output {
    let mut cmd = bin();
    cmd.args(args).current_dir(f.dir()).stdin(Stdio::null());
    if let Some((uid, gid)) = ids {
        cmd.uid(uid).gid(gid);
    }
    let out = cmd.output().expect("millrace runs");
    let err = stderr(&out);
    assert!(
        !err.contains("panicked"),
        "millrace {args:?} panicked:\n{err}"
    );
    out
}

fn status_args(f: &Fixture) -> [&str; 4] {
    ["status", "--socket", f.sock(), "--json"]
}

fn consume_args(f: &Fixture) -> [&str; 9] {
    [
        "consume",
        "--socket",
        f.sock(),
        "--dp-rank",
        "0",
        "--dp-size",
        "1",
        "--steps",
        "1",
    ]
}

/// `millrace status --json` succeeded and printed the daemon's status object.
fn assert_status_ok(o: &Output, who: &str) {
    assert!(
        o.status.success(),
        "status as {who} exited {}:\n{}{}",
        o.status,
        stdout(o),
        stderr(o)
    );
    let v: Value = serde_json::from_str(stdout(o).trim())
        .unwrap_or_else(|e| panic!("status --json as {who}: {e}:\n{}", stdout(o)));
    assert!(v["pid"].as_u64().is_some(), "{v}");
}

/// The command failed with a refusal that names the access check and the uid.
fn assert_refused(o: &Output, what: &str, uid: u32) {
    let err = stderr(o);
    assert!(
        !o.status.success(),
        "{what} as uid {uid} succeeded:\n{}{err}",
        stdout(o)
    );
    assert!(err.contains("access"), "{what} as uid {uid}: {err}");
    assert!(
        err.contains(&format!("uid {uid}")),
        "{what}: the refusal names the uid: {err}"
    );
    assert!(err.contains("allowed_uids"), "{what}: {err}");
}

/// A fixture for uid 65534, the name of its primary group and its (uid, gid).
type NobodyFixture = (Fixture, String, Option<(u32, u32)>);

/// A fixture whose socket directory uid 65534 can reach, with the name of that uid's
/// primary group (for `socket_group`) and its (uid, gid).
fn fixture_for_nobody() -> NobodyFixture {
    let gid = primary_gid(NOBODY).unwrap_or(NOBODY);
    let group = group_name(gid).unwrap_or_else(|| gid.to_string());
    let f = fixture();
    f.open_path();
    (f, group, Some((NOBODY, gid)))
}

/// For a test that connects as uid 65534: its fixture, as [`fixture_for_nobody`] makes
/// it, or `None` where the test is skipped (not root).
fn as_second_uid(test: &str) -> Option<NobodyFixture> {
    if skip_unless_root(test, "it connects as a second uid") {
        return None;
    }
    Some(fixture_for_nobody())
}

#[test]
fn unauthorized_uid_is_refused() {
    let Some((f, group, nobody)) = as_second_uid("unauthorized_uid_is_refused") else {
        return;
    };
    let gid = nobody.map_or(NOBODY, |n| n.1);

    // 1. Not listed: refused, whether it asks for status or for batches.
    f.configure(&format!(
        "socket_group = {group:?}\nallowed_uids = [4242]\n"
    ));
    let s = f.serve();
    let meta = f.socket_meta();
    assert_eq!(meta.mode() & 0o777, 0o660, "socket mode {:o}", meta.mode());
    assert_eq!(meta.gid(), gid, "the socket belongs to group {group}");
    let o = millrace_as(&f, nobody, &status_args(&f));
    assert_refused(&o, "status", NOBODY);
    assert!(stdout(&o).trim().is_empty(), "{}", stdout(&o));
    let o = millrace_as(&f, nobody, &consume_args(&f));
    assert_refused(&o, "consume", NOBODY);
    assert!(
        log_mentions(&s, &NOBODY.to_string()),
        "the daemon logs the refused uid {NOBODY}:\n{}",
        s.log_text()
    );
    // The daemon's own uid (root here) is not listed either, and is let in.
    assert_status_ok(&millrace_as(&f, None, &status_args(&f)), "the daemon's uid");
    drop(s);

    // 2. Listed by uid: let in, for status and for batches.
    f.configure(&format!(
        "socket_group = {group:?}\nallowed_uids = [4242, {NOBODY}]\n"
    ));
    let s = f.serve();
    assert_status_ok(&millrace_as(&f, nobody, &status_args(&f)), "uid 65534");
    let o = millrace_as(&f, nobody, &consume_args(&f));
    assert!(
        o.status.success(),
        "consume as a listed uid exited {}:\n{}{}\ndaemon:\n{}",
        o.status,
        stdout(&o),
        stderr(&o),
        s.log_text()
    );
    drop(s);

    // 3. Listed by primary gid only.
    f.configure(&format!(
        "socket_group = {group:?}\nallowed_uids = [4242]\nallowed_gids = [{gid}]\n"
    ));
    let s = f.serve();
    assert_status_ok(&millrace_as(&f, nobody, &status_args(&f)), "gid 65534");
    drop(s);
}

#[test]
fn daemon_uid_is_always_allowed() {
    let me = euid();
    let other = me.wrapping_add(4242);
    let f = fixture();
    f.configure(&format!(
        "allowed_uids = [{other}]\nallowed_gids = [{}]\n",
        egid().wrapping_add(4242)
    ));
    let _s = f.serve();
    assert_status_ok(&millrace_as(&f, None, &status_args(&f)), "the daemon's uid");
    // The library client too, on a control connection of its own.
    let r = ctl::request(&f.socket, &ctl::status_request(), TIMEOUT)
        .unwrap_or_else(|e| panic!("status request: {e}"));
    assert_eq!(r["ok"], true, "{r}");
    // And a trainer.
    let o = millrace_as(&f, None, &consume_args(&f));
    assert!(
        o.status.success(),
        "consume as the daemon's uid exited {}:\n{}{}",
        o.status,
        stdout(&o),
        stderr(&o)
    );
}

/// `millrace ctl --socket S ARGS` as arguments.
fn ctl_args<'a>(f: &'a Fixture, args: &[&'a str]) -> Vec<&'a str> {
    [&["ctl", "--socket", f.sock()], args].concat()
}

/// `[serve] control_uids`: a uid that may connect but is not listed reads status and the
/// journal, and every change it sends (`set-weights`, `reload`, `set-stage`) is refused
/// `access`, naming it, with nothing changed; the daemon's uid and a listed uid change.
#[test]
fn control_uids_let_only_the_listed_uids_change_the_plan() {
    let Some((f, group, nobody)) =
        as_second_uid("control_uids_let_only_the_listed_uids_change_the_plan")
    else {
        return;
    };
    let change = ["set-weights", "web=0.7", "--at-step", "100"];

    // 1. Not in control_uids: it reads, but every change is refused and nothing moves.
    f.configure(&format!(
        "socket_group = {group:?}\ncontrol_uids = [4242]\n"
    ));
    let s = f.serve();
    assert_status_ok(&millrace_as(&f, nobody, &status_args(&f)), "uid 65534");
    let o = millrace_as(&f, nobody, &ctl_args(&f, &["journal"]));
    assert!(o.status.success(), "journal as uid 65534: {}", stderr(&o));
    let journal_before = stdout(&o);
    for args in [
        &change[..],
        &["reload"],
        &[
            "set-stage",
            "--seq-len",
            "256",
            "--global-batch-rows",
            "2",
            "--at-step",
            "100",
        ],
    ] {
        let o = millrace_as(&f, nobody, &ctl_args(&f, args));
        let err = stderr(&o);
        assert!(
            !o.status.success(),
            "{args:?} as uid 65534 succeeded: {}",
            stdout(&o)
        );
        for part in ["access", &format!("uid {NOBODY}"), "control_uids [4242]"] {
            assert!(
                err.contains(part),
                "{args:?}: the refusal says {part:?}: {err}"
            );
        }
    }
    let o = millrace_as(&f, nobody, &ctl_args(&f, &["journal"]));
    assert_eq!(
        stdout(&o),
        journal_before,
        "a refused change changes nothing"
    );
    let v = ctl::request(&f.socket, &ctl::status_request(), TIMEOUT).unwrap();
    // Not a failed change either: it never reached the plan (docs/PROTOCOL.md).
    assert_eq!(
        (&v["status"]["reloads"], &v["status"]["failed_reloads"]),
        (&serde_json::json!(0), &serde_json::json!(0)),
        "{v}"
    );
    assert!(
        log_mentions(
            &s,
            &format!("set_weights refused, nothing changed: uid {NOBODY}")
        ),
        "the daemon logs the refusal:\n{}",
        s.log_text()
    );
    // The daemon's own uid (root here) is not listed either, and may change the plan.
    assert_applied(
        &millrace_as(&f, None, &ctl_args(&f, &change)),
        "the daemon's uid",
    );
    drop(s);

    // 2. Listed: its change is applied.
    f.configure(&format!(
        "socket_group = {group:?}\ncontrol_uids = [4242, {NOBODY}]\n"
    ));
    let _s = f.serve();
    assert_applied(
        &millrace_as(&f, nobody, &ctl_args(&f, &change)),
        "a listed uid",
    );
}

/// A cursor blob's live changes change the plan of every job, and a blob proves nothing
/// about who made them (a uid could run a daemon of its own, change it there and take a
/// blob). So a uid that `control_uids` keeps from changing the plan cannot bring changes
/// in a HELLO either: it is refused `access`, naming the change, and nothing moves. Once
/// an allowed uid applies the same change, the same blob agrees and is admitted.
#[test]
fn a_cursor_blob_brings_no_live_change_past_control_uids() {
    let Some((f, group, nobody)) =
        as_second_uid("a_cursor_blob_brings_no_live_change_past_control_uids")
    else {
        return;
    };
    let change = ["set-weights", "web=0.7", "--at-step", "4"];
    let blob = f.dir().join("blob.hex");
    let blob_arg = blob.to_str().unwrap();

    // 1. A daemon any uid may change: a change from step 4, then a blob of step 7.
    f.configure(&format!("socket_group = {group:?}\n"));
    let s = f.serve();
    let o = millrace_as(&f, None, &ctl_args(&f, &change));
    assert!(o.status.success(), "set-weights: {}", stderr(&o));
    let o = millrace_as(
        &f,
        None,
        &[&consume_args(&f)[..8], &["8", "--save-cursor", blob_arg]].concat(),
    );
    assert!(o.status.success(), "consume: {}", stderr(&o));
    drop(s);

    // 2. A fresh daemon with control_uids: uid 65534's blob is refused and changes nothing.
    f.configure(&format!(
        "socket_group = {group:?}\ncontrol_uids = [4242]\n"
    ));
    let _s = f.serve();
    let resume = [&consume_args(&f)[..], &["--cursor-file", blob_arg]].concat();
    let o = millrace_as(&f, nobody, &resume);
    let err = stderr(&o);
    assert!(!o.status.success(), "resumed as uid 65534: {}", stdout(&o));
    for part in [
        "access",
        "1 live change(s) this daemon lacks (the first: weights from trainer step 4)",
        &format!("uid {NOBODY} may read status"),
        "control_uids [4242]",
        "millrace ctl",
    ] {
        assert!(err.contains(part), "the refusal says {part:?}: {err}");
    }
    let v = ctl::request(&f.socket, &ctl::status_request(), TIMEOUT).unwrap();
    assert_eq!(v["status"]["reloads"], serde_json::json!(0), "{v}");
    let o = millrace_as(&f, None, &ctl_args(&f, &["journal"]));
    assert!(
        !stdout(&o).contains("web"),
        "the journal is still empty: {}",
        stdout(&o)
    );

    // 3. The daemon's uid applies the same change: the same blob now resumes.
    let o = millrace_as(&f, None, &ctl_args(&f, &change));
    assert!(o.status.success(), "set-weights: {}", stderr(&o));
    let o = millrace_as(&f, nobody, &resume);
    assert!(
        o.status.success(),
        "resumed as uid 65534 once the change is in force: {}",
        stderr(&o)
    );
}

/// `millrace ctl set-weights ... --at-step 100` as `who` succeeded and was applied there.
fn assert_applied(o: &Output, who: &str) {
    assert!(o.status.success(), "set-weights as {who}: {}", stderr(o));
    let out = stdout(o);
    assert!(out.contains("applied from step 100"), "as {who}: {out}");
}

/// Runs `millrace serve` on the fixture and expects it to exit (non-zero) on its own;
/// returns its log.
fn serve_fails(f: &Fixture) -> String {
    let mut s = Serve::spawn(&f.config, &f.log, |_| {});
    match s.wait_exit(Duration::from_secs(30)) {
        Some(status) => {
            let text = s.log_text();
            assert!(!status.success(), "millrace serve exited 0:\n{text}");
            assert!(!text.contains("panicked"), "{text}");
            text
        }
        None => panic!("millrace serve kept running:\n{}", s.log_text()),
    }
}

#[test]
fn socket_is_0660_and_its_group_is_checked() {
    let f = fixture();
    // No access settings: mode 0660, our group, open to whoever can open the file.
    f.configure("");
    let s = f.serve();
    let meta = f.socket_meta();
    assert_eq!(meta.mode() & 0o777, 0o660, "socket mode {:o}", meta.mode());
    assert_status_ok(&millrace_as(&f, None, &status_args(&f)), "the daemon's uid");
    drop(s);

    // A group given by number (our own: no privilege needed) owns the socket.
    let mine = egid();
    f.configure(&format!("socket_group = \"{mine}\"\n"));
    let s = f.serve();
    let meta = f.socket_meta();
    assert_eq!(meta.mode() & 0o777, 0o660, "socket mode {:o}", meta.mode());
    assert_eq!(meta.gid(), mine);
    drop(s);

    // An unknown group stops the daemon, naming the group and the setting.
    f.configure("socket_group = \"millrace-no-such-group\"\n");
    let text = serve_fails(&f);
    assert!(text.contains("millrace-no-such-group"), "{text}");
    assert!(text.contains("socket_group"), "{text}");
    assert!(text.contains("no such group"), "{text}");
    // It does not leave a socket anyone could use.
    if f.socket.exists() {
        assert!(UnixStream::connect(&f.socket).is_err());
    }
}

/// A socket path whose hidden staging name (`.NAME.PID` beside it) would pass the 107
/// bytes of a socket address is bound in place, with mode 0660 all the same, and the log
/// says why at info (docs/OPERATIONS.md, "the log says why at info").
#[test]
fn a_socket_path_too_long_to_stage_is_bound_in_place_and_the_log_says_so() {
    let f = fixture();
    let base = f.dir().as_os_str().len() + 1;
    // The path itself is 107 bytes, the most a socket path may have; ".NAME.PID" beside
    // it cannot fit.
    assert!(
        base < 90,
        "the temp dir {} leaves no room",
        f.dir().display()
    );
    let name = "s".repeat(105 - base);
    let socket = f.dir().join(format!("{name}.k"));
    let serve = common::serve_toml(&socket, 2, 1);
    common::write_config(f.dir(), "test.toml", 128, 4, &[&serve]);
    let s = Serve::start(&f.config, &socket, &f.log);
    let meta = std::fs::metadata(&socket).unwrap();
    assert_eq!(meta.mode() & 0o777, 0o660, "socket mode {:o}", meta.mode());
    assert!(
        log_mentions(&s, "binding the socket in place"),
        "{}",
        s.log_text()
    );
    assert!(s.log_text().contains(&name), "{}", s.log_text());
}

/// check-config fails where serve would: a `socket_group` that exists but that the
/// daemon's user cannot give the socket to (not root, not a member) is named, and serve
/// refuses it before binding, leaving no socket behind.
#[test]
fn check_config_refuses_a_group_the_daemon_cannot_chown_to() {
    if skip_unless_root(
        "check_config_refuses_a_group_the_daemon_cannot_chown_to",
        "it runs check-config as a second uid",
    ) {
        return;
    }
    let f = fixture();
    f.configure("socket_group = \"0\"\n");
    f.open_path();
    let config = f.config.to_str().unwrap();
    // nobody (65534) is not in group 0.
    let o = millrace_as(
        &f,
        Some((65534, 65534)),
        &["check-config", "--config", config],
    );
    assert!(!o.status.success(), "{}", stdout(&o));
    let err = stderr(&o);
    assert!(err.contains("socket_group"), "{err}");
    assert!(err.contains("not a member"), "{err}");
    let o = millrace_as(&f, Some((65534, 65534)), &["serve", "--config", config]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("not a member"), "{}", stderr(&o));
    assert!(!f.socket.exists());
    // Root may give the socket to any group: check-config passes.
    let o = millrace_as(&f, None, &["check-config", "--config", config]);
    assert!(o.status.success(), "{}", stderr(&o));
}

/// A socket directory inside a world-writable directory (like `/tmp/millrace-UID`) must
/// be this user's own real directory: a symlink, or one another user made, is refused
/// by name and nothing is bound there.
#[test]
fn a_planted_socket_directory_in_a_shared_dir_is_refused() {
    let f = fixture();
    let shared = f.dir().join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let target = f.dir().join("elsewhere");
    std::fs::create_dir(&target).unwrap();
    std::os::unix::fs::symlink(&target, shared.join("link")).unwrap();
    let serve_with = |socket: &std::path::Path| -> String {
        let serve = common::serve_toml(socket, 2, 1);
        common::write_config(f.dir(), "test.toml", 128, 4, &[&serve]);
        serve_fails(&f)
    };
    let text = serve_with(&shared.join("link").join("s.sock"));
    assert!(text.contains("symlink"), "{text}");
    assert!(text.contains("link"), "{text}");
    assert!(!target.join("s.sock").exists());
    if euid() == 0 {
        let theirs = shared.join("theirs");
        std::fs::create_dir(&theirs).unwrap();
        std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).unwrap();
        let text = serve_with(&theirs.join("s.sock"));
        assert!(text.contains("owned by uid 65534"), "{text}");
        assert!(!theirs.join("s.sock").exists());
    }
    // This user's own directory there is used.
    let mine = shared.join("mine");
    let serve = common::serve_toml(&mine.join("s.sock"), 2, 1);
    common::write_config(f.dir(), "test.toml", 128, 4, &[&serve]);
    let s = Serve::start(&f.config, &mine.join("s.sock"), &f.log);
    assert!(UnixStream::connect(mine.join("s.sock")).is_ok());
    drop(s);
}

/// A job belongs to the uid of its first client. Before, a second user who could reach
/// the socket joined another user's job as one more peer of its rank (and could hold
/// its slots, stalling it), or created a job under the other's name first with another
/// dp_size, so that the owner's own ranks were refused `dp_size`.
#[test]
fn a_job_is_refused_to_clients_of_another_uid() {
    let Some((f, group, nobody)) = as_second_uid("a_job_is_refused_to_clients_of_another_uid")
    else {
        return;
    };
    f.configure(&format!("socket_group = {group:?}\n"));
    let s = f.serve();
    // Root's job "shared" waits for a second peer of rank 0.
    let mut h = millrace::client::Hello::whole_slice(0, 1);
    h.job = "shared".into();
    h.replica = "a".into();
    h.replicas = 2;
    let _owner = millrace::client::Client::connect(&f.socket, &h).expect("root's peer joins");
    let peer = |job: &str, replica: &str, replicas: &str, dp_size: &str| {
        [
            "consume",
            "--socket",
            f.sock(),
            "--job",
            job,
            "--replica",
            replica,
            "--replicas",
            replicas,
            "--dp-rank",
            "0",
            "--dp-size",
            dp_size,
            "--steps",
            "1",
        ]
        .map(String::from)
    };
    let args = peer("shared", "b", "2", "1");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = millrace_as(&f, nobody, &args);
    let err = stderr(&o);
    assert!(
        !o.status.success(),
        "uid {NOBODY} joined root's job:\n{err}"
    );
    assert!(err.contains("access"), "{err}");
    assert!(
        err.contains(&format!(
            "job \"shared\" is run by uid 0, this client is uid {NOBODY}"
        )),
        "{err}"
    );
    // Root's own second peer still joins (and reads step 0).
    let o = millrace_as(&f, None, &args);
    assert!(o.status.success(), "root's second peer: {}", stderr(&o));

    // A job nobody holds is open to whoever comes first, uid 65534 included.
    let args = peer("theirs", "0", "1", "1");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = millrace_as(&f, nobody, &args);
    assert!(o.status.success(), "uid {NOBODY}'s own job: {}", stderr(&o));
    drop(s);
}

/// The ring fd a client gets is read-only, and it cannot be reopened for writing through
/// `/proc/self/fd` by a client of another uid: a memfd is created mode 0777, so that
/// reopen used to succeed, and only F_SEAL_FUTURE_WRITE (Linux 5.1 on) then kept the
/// client from writing into its peers' slots. The client still reads the ring.
#[test]
fn a_ring_fd_cannot_be_reopened_for_writing_by_another_uid() {
    use millrace::wire::frame::{self, kind};
    use std::os::fd::AsRawFd;
    if skip_unless_root(
        "a_ring_fd_cannot_be_reopened_for_writing_by_another_uid",
        "it reopens the ring as a second uid",
    ) {
        return;
    }
    let f = fixture();
    f.open_path();
    f.configure("");
    let _s = f.serve();
    let mut sock = UnixStream::connect(&f.socket).unwrap();
    let hello = serde_json::json!({"protocol": 2, "job": "j", "dp_rank": 0, "dp_size": 1});
    frame::write_to(&mut sock, kind::HELLO, hello.to_string().as_bytes()).unwrap();
    let (mut fds, mut buf) = (Vec::new(), vec![0u8; 1 << 16]);
    let n = frame::recv_with_fds(&sock, &mut buf, &mut fds).unwrap();
    assert!(n > 4 && buf[4] == kind::WELCOME, "{:?}", &buf[..n.min(200)]);
    let ring = fds.first().expect("the ring fd").as_raw_fd();
    let gid = primary_gid(NOBODY).unwrap_or(NOBODY);
    let mut cmd = std::process::Command::new("sh");
    cmd.arg("-c")
        .arg(
            "head -c 8 <&3; if (exec 4<>/proc/self/fd/3) 2>/dev/null; then echo ' reopened'; \
             else echo ' refused'; fi",
        )
        .uid(NOBODY)
        .gid(gid);
    // SAFETY: dup2 and fcntl are async-signal-safe; the fd is open in the parent until
    // the child exits. (dup2 onto itself would keep the close-on-exec flag.)
    unsafe {
        cmd.pre_exec(move || {
            let r = match ring {
                3 => libc::fcntl(3, libc::F_SETFD, 0),
                _ => libc::dup2(ring, 3),
            };
            match r {
                -1 => Err(std::io::Error::last_os_error()),
                _ => Ok(()),
            }
        });
    }
    let out = cmd.output().unwrap();
    assert_eq!(
        stdout(&out),
        format!(
            "{} refused\n",
            String::from_utf8_lossy(millrace::wire::ring::MAGIC)
        ),
        "{}",
        stderr(&out)
    );
}

/// A client on the fallback socket (`/tmp/millrace-UID/millrace.sock`, no
/// `$XDG_RUNTIME_DIR`) refuses a directory another user made there: `/tmp` is
/// world-writable, and uid 65534's `millrace consume` used to send its HELLO to whoever
/// listened in a `/tmp/millrace-65534` made by root, and take its batches.
#[test]
fn a_client_refuses_a_fallback_socket_dir_of_another_user() {
    if skip_unless_root(
        "a_client_refuses_a_fallback_socket_dir_of_another_user",
        "the impostor's directory must belong to a second uid",
    ) {
        return;
    }
    let dir = PathBuf::from(format!("/tmp/millrace-{NOBODY}"));
    if std::fs::symlink_metadata(&dir).is_ok() {
        eprintln!("skipping: {} exists", dir.display());
        return;
    }
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let sock = dir.join("millrace.sock");
    let impostor = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o777)).unwrap();
    impostor.set_nonblocking(true).unwrap();
    let gid = primary_gid(NOBODY).unwrap_or(NOBODY);
    // A trainer's stream, and a control connection (`status`; `ctl` and `top` connect
    // the same way), which sends changes and trusts the replies: both refuse it.
    let runs: Vec<(&str, std::process::Output, bool)> = [
        "consume --dp-rank 0 --dp-size 1 --steps 1 --reconnect-timeout 1",
        "status",
    ]
    .into_iter()
    .map(|args| {
        let out = bin()
            .args(args.split(' '))
            .env_remove("XDG_RUNTIME_DIR")
            .current_dir("/")
            .stdin(Stdio::null())
            .uid(NOBODY)
            .gid(gid)
            .output()
            .unwrap();
        (args, out, impostor.accept().is_ok())
    })
    .collect();
    let _ = std::fs::remove_dir_all(&dir);
    for (args, out, reached) in runs {
        let err = stderr(&out);
        assert!(!out.status.success(), "{args}: {err}");
        assert!(!reached, "{args} connected to the impostor: {err}");
        assert!(
            err.contains(&format!("{} is owned by uid 0", dir.display())),
            "{args}: {err}"
        );
    }
}

/// Connects `n` streams to `socket` as uid `uid` and gid `gid`, from a thread of its own
/// whose effective ids alone change (the raw setresuid/setresgid syscalls act on the
/// calling thread only, where glibc's would change every thread's): SO_PEERCRED names
/// that uid, and this process keeps the streams to read the daemon's replies.
fn connect_as(uid: u32, gid: u32, socket: &std::path::Path, n: usize) -> Vec<UnixStream> {
    let socket = socket.to_path_buf();
    std::thread::spawn(move || {
        let keep = libc::uid_t::MAX; // -1: leave the real and saved ids as they are
                                     // SAFETY: raw syscalls with integer arguments; they change this thread's ids only,
                                     // and the thread ends after connecting.
        unsafe {
            assert_eq!(libc::syscall(libc::SYS_setresgid, keep, gid, keep), 0);
            assert_eq!(libc::syscall(libc::SYS_setresuid, keep, uid, keep), 0);
        }
        (0..n)
            .map(|_| {
                let s = UnixStream::connect(&socket).expect("connect as the second uid");
                s.set_read_timeout(Some(TIMEOUT)).unwrap();
                s
            })
            .collect()
    })
    .join()
    .expect("the connecting thread")
}

/// Sends one frame and reads the reply: its kind and JSON payload (a WELCOME's fds are
/// dropped, its ring with them once the connection closes).
fn ask(sock: &mut UnixStream, kind: u8, payload: &Value) -> (u8, Value) {
    use millrace::wire::frame;
    frame::write_to(sock, kind, payload.to_string().as_bytes()).unwrap();
    let (mut fds, mut buf) = (Vec::new(), vec![0u8; 1 << 16]);
    let n = frame::recv_with_fds(&*sock, &mut buf, &mut fds)
        .unwrap_or_else(|e| panic!("no reply to {payload} within {TIMEOUT:?}: {e}"));
    assert!(n > 5, "a reply frame: {:?}", &buf[..n]);
    let v = serde_json::from_slice(&buf[5..n]).unwrap_or(Value::Null);
    (buf[4], v)
}

/// The refusal messages among replies (a WELCOME shows as null), for assertions.
fn messages(replies: &[(u8, Value)]) -> Vec<&Value> {
    replies.iter().map(|r| &r.1["message"]).collect()
}

/// A trainer's HELLO for `dp_rank` of `job` (dp_size 4).
fn hello(job: &str, dp_rank: u32) -> Value {
    serde_json::json!({"protocol": 2, "job": job, "dp_rank": dp_rank, "dp_size": 4})
}

/// Sends HELLOs for ranks 0 to 3 of job "theirs" on `socks` (uid 65534's): the first
/// three are welcomed and the fourth refused, at its uid's share; the replies.
fn three_of_four_ranks(socks: &mut [UnixStream]) -> Vec<(u8, Value)> {
    use millrace::wire::frame::kind;
    let replies: Vec<(u8, Value)> = (socks.iter_mut().zip(0..))
        .map(|(sock, r)| ask(sock, kind::HELLO, &hello("theirs", r)))
        .collect();
    let kinds: Vec<u8> = replies.iter().map(|r| r.0).collect();
    let want = [kind::WELCOME, kind::WELCOME, kind::WELCOME, kind::REFUSED];
    assert_eq!(kinds, want, "{:?}", messages(&replies));
    replies
}

/// The caps are the daemon's: before `[serve] uid_share_percent`, one uid that could
/// reach the socket took every trainer place (`max_clients`), every control connection
/// and all of `ring_memory_bytes`, and every other user's trainers (the ranks of a
/// running job reconnecting included) and `millrace status` were refused. Now uid 65534
/// holds 3 of 4 of each (`uid_share_percent = 75`), its next one is refused naming the cap and
/// the uid, and root (the daemon's uid) is still served.
#[test]
fn one_uid_cannot_take_all_of_a_cap() {
    use millrace::wire::frame::kind;
    let Some((f, group, nobody)) = as_second_uid("one_uid_cannot_take_all_of_a_cap") else {
        return;
    };
    let gid = nobody.map_or(NOBODY, |n| n.1);
    let caps = "max_clients = 4\nmax_control_connections = 4\nuid_share_percent = 75";
    f.configure(&format!("socket_group = {group:?}\n{caps}\n"));
    let s = f.serve();
    let mut theirs = connect_as(NOBODY, gid, &f.socket, 8);
    let (trainers, controls) = theirs.split_at_mut(4);
    // uid 65534 asks for every trainer place: ranks 0 to 3 of its job.
    let replies = three_of_four_ranks(trainers);
    let ring_bytes = replies[0].1["ring_bytes"].as_u64().expect("ring_bytes");
    let refusal = &replies[3].1;
    assert_eq!(refusal["code"], "busy", "{refusal}");
    assert_eq!(
        refusal["message"],
        "uid 65534 has 3 clients connected, its share of the 4 the daemon serves ([serve] \
         uid_share_percent 75 of max_clients); the rest are kept for other users"
    );
    // Root's trainer takes the place left.
    let mut args = consume_args(&f).to_vec();
    args.extend(["--reconnect-timeout", "1"]);
    let o = millrace_as(&f, None, &args);
    assert!(o.status.success(), "root's trainer: {}", stderr(&o));

    // The same for control connections: 3 of 4, then `millrace status` as root.
    let status = serde_json::json!({"op": "status"});
    let kinds: Vec<(u8, Value)> = (controls.iter_mut())
        .map(|sock| ask(sock, kind::CONTROL, &status))
        .collect();
    let got: Vec<u8> = kinds.iter().map(|r| r.0).collect();
    assert_eq!(
        got,
        [
            kind::CONTROL_REPLY,
            kind::CONTROL_REPLY,
            kind::CONTROL_REPLY,
            kind::REFUSED
        ],
        "{:?}",
        messages(&kinds)
    );
    let m = kinds[3].1["message"].as_str().unwrap_or_default();
    assert!(
        m.starts_with("uid 65534 holds 3 control connections")
            && m.contains("max_control_connections"),
        "{m}"
    );
    assert_status_ok(&millrace_as(&f, None, &status_args(&f)), "root");
    drop(theirs);
    drop(s);

    // Ring memory: a budget of 4 rings, of which uid 65534 gets 3.
    f.configure(&format!(
        "socket_group = {group:?}\nring_memory_bytes = {}\nuid_share_percent = 75\n",
        4 * ring_bytes
    ));
    let s = f.serve();
    let mut theirs = connect_as(NOBODY, gid, &f.socket, 4);
    let replies = three_of_four_ranks(&mut theirs);
    let refusal = &replies[3].1;
    assert_eq!(refusal["code"], "memory", "{refusal}");
    let m = refusal["message"].as_str().unwrap_or_default();
    assert!(
        m.contains(&format!(
            "uid 65534's rings take {} of its share of {} bytes ([serve] uid_share_percent 75",
            3 * ring_bytes,
            3 * ring_bytes
        )),
        "{m}"
    );
    let o = millrace_as(
        &f,
        None,
        &[
            "consume",
            "--socket",
            f.sock(),
            "--job",
            "mine",
            "--dp-rank",
            "0",
            "--dp-size",
            "4",
            "--steps",
            "1",
            "--reconnect-timeout",
            "1",
        ],
    );
    assert!(o.status.success(), "root's ring: {}", stderr(&o));
    drop(theirs);
    drop(s);
}

/// Seeks (a client without a blob starting past step 0 on a rank with no ring) run in
/// a few admission slots, and one to a far step runs for hours: uid 65534 starting 8
/// jobs at step 2^31 used to take every seek slot, and root's trainer starting at step
/// 50 waited behind them (no WELCOME within 20 s). Now it holds its share of the seek
/// slots, its other seeks wait in its own queue, and root's seek runs beside them.
#[test]
fn one_uid_cannot_take_every_seek_slot() {
    use millrace::wire::frame::kind;
    let Some((f, group, nobody)) = as_second_uid("one_uid_cannot_take_every_seek_slot") else {
        return;
    };
    let gid = nobody.map_or(NOBODY, |n| n.1);
    f.configure(&format!(
        "socket_group = {group:?}\nuid_share_percent = 75\n"
    ));
    let s = f.serve();
    // 8 is the most seek slots a daemon has (half its admission slots, at most 16).
    let mut theirs = connect_as(NOBODY, gid, &f.socket, 8);
    for (sock, r) in theirs.iter_mut().zip(0u64..) {
        let mut h = hello(&format!("theirs{r}"), 0);
        h["dp_size"] = 1.into();
        h["start_step"] = ((1u64 << 31) + r).into();
        millrace::wire::frame::write_to(sock, kind::HELLO, h.to_string().as_bytes()).unwrap();
    }
    // The daemon's seek slots (limits::seek_slots), of which uid 65534 may run 75%:
    // wait until that many of its seeks run.
    let cores = std::thread::available_parallelism().map_or(4, |n| n.get().clamp(4, 16));
    let share = (cores / 2 * 3 / 4).max(1);
    let deadline = Instant::now() + TIMEOUT;
    while s
        .log_text()
        .matches("seeking a client's start step")
        .count()
        < share
    {
        assert!(Instant::now() < deadline, "{}", s.log_text());
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut mine = UnixStream::connect(&f.socket).unwrap();
    mine.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut h = hello("mine", 0);
    h["dp_size"] = 1.into();
    h["start_step"] = 50.into();
    let (k, v) = ask(&mut mine, kind::HELLO, &h);
    assert_eq!(k, kind::WELCOME, "{v}\n{}", s.log_text());
    assert_eq!(v["start_step"], 50, "{v}");
    // Clients of theirs queued behind their share that hang up go at once (fd and bytes
    // before admission with them): they were held until a permit came, hours later, and
    // 12,100 of them refused every new connection of that uid, `status` included.
    let left = |log: &str| log.matches("client left during admission").count();
    let before = left(&s.log_text());
    let mut queued = connect_as(NOBODY, gid, &f.socket, 8);
    for (sock, r) in queued.iter_mut().zip(0u64..) {
        let mut h = hello(&format!("queued{r}"), 0);
        h["dp_size"] = 1.into();
        h["start_step"] = ((1u64 << 31) + 100 + r).into();
        millrace::wire::frame::write_to(sock, kind::HELLO, h.to_string().as_bytes()).unwrap();
    }
    // The daemon reads each HELLO (its bytes come before the hang-up) and queues it.
    drop(queued);
    let deadline = Instant::now() + TIMEOUT;
    while left(&s.log_text()) < before + 8 {
        assert!(Instant::now() < deadline, "{}", s.log_text());
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(theirs);
}

/// Connections before admission share 64 MiB (4 KiB each at the least, so 16,384
/// connections): uid 65534 opening that many idle ones held all of it, and every other
/// user's trainers and `status` were refused `busy` until its handshakes timed out (and
/// again as it reconnected). Now its connections past 48 MiB (12,288) are refused
/// naming its share, and root's `status` is served.
#[test]
fn one_uid_cannot_take_every_byte_before_admission() {
    use millrace::wire::frame::kind;
    let Some((f, group, nobody)) = as_second_uid("one_uid_cannot_take_every_byte_before_admission")
    else {
        return;
    };
    let gid = nobody.map_or(NOBODY, |n| n.1);
    // 16,384 of theirs and a few of ours: raise this process's soft fd limit.
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local.
    unsafe {
        let mut rl: libc::rlimit = std::mem::zeroed();
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl), 0);
        if rl.rlim_max < 17_000 {
            eprintln!(
                "skipping: the hard fd limit {} is below 17,000",
                rl.rlim_max
            );
            return;
        }
        rl.rlim_cur = rl.rlim_cur.max(rl.rlim_max.min(1 << 20));
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &rl), 0);
    }
    f.configure(&format!(
        "socket_group = {group:?}\nuid_share_percent = 75\n"
    ));
    let s = f.serve();
    let per_conn = 4096; // limits::CONNECTION_BYTES
    let all = (64 << 20) / per_conn;
    let theirs = connect_as(NOBODY, gid, &f.socket, all);
    // A quarter of theirs is refused at once (the others wait for their HELLO).
    let mut waiting: Vec<&UnixStream> = theirs.iter().collect();
    let mut refused = Vec::new();
    let deadline = Instant::now() + TIMEOUT;
    while refused.len() < all / 4 && Instant::now() < deadline {
        waiting.retain(|sock| {
            sock.set_nonblocking(true).unwrap();
            let mut buf = [0u8; 4096];
            match std::io::Read::read(&mut &**sock, &mut buf) {
                Ok(n) if n > 5 && buf[4] == kind::REFUSED => {
                    refused.push(String::from_utf8_lossy(&buf[5..n]).into_owned());
                    false
                }
                _ => true,
            }
        });
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(
        refused.len(),
        all / 4,
        "{:?}\n{}",
        refused.first(),
        s.log_text()
    );
    let m: Value = serde_json::from_str(&refused[0]).unwrap();
    assert_eq!(m["code"], "busy", "{m}");
    let text = m["message"].as_str().unwrap_or_default();
    assert!(
        text.starts_with(&format!(
            "uid 65534's connections that have not been admitted hold {} bytes",
            all * 3 / 4 * per_conn
        )) && text.contains("uid_share_percent 75"),
        "{text}"
    );
    assert_status_ok(&millrace_as(&f, None, &status_args(&f)), "root");
    drop(theirs);
}
