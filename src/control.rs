//! The client side of CONTROL (docs/PROTOCOL.md, control connections): the connection
//! that `millrace ctl`, `status` and `top`, the bench and the tests open to a running
//! daemon, and the requests they send on it.
//!
//! A control connection opens the daemon's socket and sends CONTROL frames (type 7, a
//! JSON object with `"protocol": 1` and an `op`) instead of HELLO; every one is answered
//! by exactly one CONTROL_REPLY (type 8, a JSON object), in order. Frames are those of
//! docs/PROTOCOL.md: a u32 little-endian length of type byte + payload, the type, the
//! payload. A JSON frame may be longer than the 65536 bytes of the others
//! ([`frame::MAX_JSON_FRAME`]): `status` and `journal` list every domain.
//!
//! Errors: transport failures, REFUSED and ERROR frames and malformed replies are
//! [`CtlError`]s. A well-formed reply with `"ok": false` (a late or invalid change, a busy
//! daemon) is returned as `Ok(reply)`: it is the daemon's answer, and callers show its
//! `code` and `message` ([`Rejection::of`] reads them).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::wire::{self, frame, kind, MAX_JSON_FRAME};

/// Frame type of a control request (the daemon's own constant).
pub const CONTROL: u8 = kind::CONTROL;
/// Frame type of the daemon's answer to one CONTROL frame.
pub const CONTROL_REPLY: u8 = kind::CONTROL_REPLY;
/// Version of the control requests sent here (the `protocol` key): the daemon's own.
pub const PROTOCOL: u32 = wire::VERSION;

/// Why a control request got no reply; always names the socket, so an operator with
/// several daemons knows which one failed.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    /// The socket could not be reached (daemon not running, wrong path, permissions).
    /// The OS error is part of the message and not a `source`, so `{:#}` says it once.
    #[error("cannot connect to {socket}: {}", connect_reason(error))]
    Connect {
        /// The socket path.
        socket: PathBuf,
        /// The OS error.
        error: std::io::Error,
    },
    /// Reading or writing the socket failed (the OS error is in the message, said once).
    #[error("{socket}: {what}: {error}")]
    Io {
        /// The socket path.
        socket: PathBuf,
        /// What was being done.
        what: &'static str,
        /// The OS error.
        error: std::io::Error,
    },
    /// No (whole) reply within the timeout.
    #[error("{socket}: no reply within {} ms", timeout.as_millis())]
    Timeout {
        /// The socket path.
        socket: PathBuf,
        /// The timeout that ran out.
        timeout: Duration,
    },
    /// The socket is in a place another user controls, so whoever listens there may not
    /// be this user's daemon ([`crate::config::serve::check_fallback_socket_dir`]).
    #[error("{0}")]
    Untrusted(String),
    /// The daemon closed the connection without a reply.
    #[error("{socket}: the daemon closed the connection without replying")]
    Disconnected {
        /// The socket path.
        socket: PathBuf,
    },
    /// The daemon refused the connection (REFUSED frame: access control, shutting down).
    #[error("{socket}: the daemon refused the connection ({code}): {message}")]
    Refused {
        /// The socket path.
        socket: PathBuf,
        /// Refusal code.
        code: String,
        /// The daemon's message.
        message: String,
    },
    /// The daemon judged the request malformed and closed (ERROR frame).
    #[error("{socket}: the daemon closed the connection with an error ({code}): {message}")]
    Daemon {
        /// The socket path.
        socket: PathBuf,
        /// Error code.
        code: String,
        /// The daemon's message.
        message: String,
    },
    /// The daemon's bytes do not follow the protocol (not a frame, not a JSON object).
    #[error("{socket}: protocol violation by the daemon: {message}")]
    Protocol {
        /// The socket path.
        socket: PathBuf,
        /// What was wrong.
        message: String,
    },
    /// The request itself cannot be sent (not a JSON object, too large).
    #[error("{socket}: cannot send this request: {message}")]
    Request {
        /// The socket path.
        socket: PathBuf,
        /// What is wrong with it.
        message: String,
    },
}

/// The OS error of a failed connect, with what it usually means for a millrace socket.
pub(crate) fn connect_reason(e: &std::io::Error) -> String {
    let hint = match e.raw_os_error() {
        Some(libc::ENOENT) => {
            "no such socket: is the daemon running, and is this its [serve] socket? \
             (`millrace check-config --config FILE` prints it)"
        }
        Some(libc::ECONNREFUSED) => {
            "connection refused: the socket file is there but no daemon listens on it \
             (a daemon that was killed leaves it behind)"
        }
        Some(libc::EACCES) => {
            "permission denied: the socket is mode 0660; run as the daemon's user or a \
             member of its [serve] socket_group"
        }
        Some(libc::EAGAIN) | Some(libc::ETIMEDOUT) => {
            "timed out: the daemon did not take the connection within --timeout (its \
             listen backlog is full: is it stuck, or overloaded?)"
        }
        _ => return e.to_string(),
    };
    format!("{hint} ({e})")
}

/// Connects to `socket`, waiting at most `timeout` for a daemon whose listen backlog is
/// full (a blocking unix connect would wait forever): the send timeout bounds connect(2)
/// on a unix socket, which then fails with EAGAIN.
fn connect_within(socket: &Path, timeout: Duration) -> std::io::Result<UnixStream> {
    use rustix::net::{sockopt, AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
    let fd = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::STREAM,
        SocketFlags::CLOEXEC,
        None,
    )?;
    let addr = SocketAddrUnix::new(socket)?;
    sockopt::set_socket_timeout(
        &fd,
        sockopt::Timeout::Send,
        Some(timeout.max(Duration::from_millis(1))),
    )?;
    loop {
        match rustix::net::connect(&fd, &addr) {
            Ok(()) => break,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    // Requests set their own timeouts; leave none from the connect behind.
    sockopt::set_socket_timeout(&fd, sockopt::Timeout::Send, None)?;
    Ok(UnixStream::from(fd))
}

/// One control connection; requests on it are answered in order. Reused by `top` so
/// a live view costs one connection, not one per redraw.
pub struct Connection {
    socket: PathBuf,
    stream: UnixStream,
    timeout: Duration,
    /// Set after an ERROR or REFUSED frame or a broken read: the daemon has closed.
    dead: bool,
}

impl Connection {
    /// Connects to the daemon's socket; `timeout` bounds each later request.
    pub fn open(socket: &Path, timeout: Duration) -> Result<Connection, CtlError> {
        // A control connection sends changes and trusts the replies: not to an impostor
        // in another user's /tmp/millrace-UID (the trainer clients refuse it too).
        crate::config::serve::check_fallback_socket_dir(socket, crate::sys::euid())
            .map_err(CtlError::Untrusted)?;
        let stream = connect_within(socket, timeout).map_err(|error| CtlError::Connect {
            socket: socket.to_path_buf(),
            error,
        })?;
        Ok(Connection {
            socket: socket.to_path_buf(),
            stream,
            timeout: timeout.max(Duration::from_millis(1)),
            dead: false,
        })
    }

    /// The socket this connection talks to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Sends one CONTROL frame and reads its CONTROL_REPLY (see the module doc for what
    /// an `ok: false` reply becomes).
    pub fn request(&mut self, req: &Value) -> Result<Value, CtlError> {
        if self.dead {
            return Err(CtlError::Disconnected {
                socket: self.socket.clone(),
            });
        }
        let frame = encode_request(req).map_err(|message| CtlError::Request {
            socket: self.socket.clone(),
            message,
        })?;
        let deadline = Instant::now() + self.timeout;
        let r = self.exchange(&frame, deadline);
        if r.is_err() {
            self.dead = true;
        }
        r
    }

    fn exchange(&mut self, frame: &[u8], deadline: Instant) -> Result<Value, CtlError> {
        self.stream
            .set_write_timeout(Some(self.timeout))
            .map_err(|source| self.io("setting the socket timeout", source))?;
        if let Err(e) = self.stream.write_all(frame) {
            return Err(match e.kind() {
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => self.timeout(),
                // The daemon may have written REFUSED and closed before reading: read it.
                std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset => {
                    match self.read_frame(deadline) {
                        Ok((k, p)) if k == kind::REFUSED || k == kind::ERROR => {
                            return self.reply(k, &p)
                        }
                        _ => CtlError::Disconnected {
                            socket: self.socket.clone(),
                        },
                    }
                }
                _ => self.io("sending a CONTROL frame", e),
            });
        }
        let (k, payload) = self.read_frame(deadline)?;
        self.reply(k, &payload)
    }

    fn reply(&self, k: u8, payload: &[u8]) -> Result<Value, CtlError> {
        match k {
            CONTROL_REPLY => match serde_json::from_slice::<Value>(payload) {
                Ok(v) if v.is_object() => Ok(v),
                Ok(_) => Err(self.protocol("CONTROL_REPLY is not a JSON object".into())),
                Err(e) => Err(self.protocol(format!("CONTROL_REPLY is not JSON: {e}"))),
            },
            kind::REFUSED => {
                let (code, message) = code_message(payload);
                Err(CtlError::Refused {
                    socket: self.socket.clone(),
                    code,
                    message,
                })
            }
            kind::ERROR => {
                let (code, message) = code_message(payload);
                Err(CtlError::Daemon {
                    socket: self.socket.clone(),
                    code,
                    message,
                })
            }
            other => Err(self.protocol(format!(
                "expected CONTROL_REPLY (type {CONTROL_REPLY}), got frame type {other}"
            ))),
        }
    }

    /// Reads one whole frame before `deadline`: (type, payload).
    fn read_frame(&mut self, deadline: Instant) -> Result<(u8, Vec<u8>), CtlError> {
        let socket = self.socket.clone();
        frame::read_with(
            |buf, inside| self.fill(buf, deadline, inside),
            frame::MAX_JSON_FRAME,
            |e| CtlError::Protocol {
                socket,
                message: e.to_string(),
            },
        )
    }

    fn fill(&mut self, buf: &mut [u8], deadline: Instant, inside: bool) -> Result<(), CtlError> {
        let mut have = 0;
        while have < buf.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(self.timeout());
            }
            self.stream
                .set_read_timeout(Some(left))
                .map_err(|source| self.io("setting the socket timeout", source))?;
            match self.stream.read(&mut buf[have..]) {
                Ok(0) if have == 0 && !inside => {
                    return Err(CtlError::Disconnected {
                        socket: self.socket.clone(),
                    })
                }
                Ok(0) => return Err(self.protocol("the connection closed inside a frame".into())),
                Ok(n) => have += n,
                Err(e) => match e.kind() {
                    std::io::ErrorKind::Interrupted => {}
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                        return Err(self.timeout())
                    }
                    std::io::ErrorKind::ConnectionReset => {
                        return Err(CtlError::Disconnected {
                            socket: self.socket.clone(),
                        })
                    }
                    _ => return Err(self.io("reading the reply", e)),
                },
            }
        }
        Ok(())
    }

    fn io(&self, what: &'static str, source: std::io::Error) -> CtlError {
        CtlError::Io {
            socket: self.socket.clone(),
            what,
            error: source,
        }
    }

    fn timeout(&self) -> CtlError {
        CtlError::Timeout {
            socket: self.socket.clone(),
            timeout: self.timeout,
        }
    }

    fn protocol(&self, message: String) -> CtlError {
        CtlError::Protocol {
            socket: self.socket.clone(),
            message,
        }
    }
}

/// Sends one request on a fresh connection and returns the reply. `ok: false` replies
/// are `Ok` (read them with [`Rejection::of`]); only a missing or malformed reply is an
/// error.
pub fn request(socket: &Path, req: &Value, timeout: Duration) -> Result<Value, CtlError> {
    Connection::open(socket, timeout)?.request(req)
}

/// The CONTROL frame of `req`, which must be a JSON object that fits one frame.
pub fn encode_request(req: &Value) -> Result<Vec<u8>, String> {
    if !req.is_object() {
        return Err("a control request must be a JSON object".into());
    }
    let payload = serde_json::to_vec(req).map_err(|e| format!("not serializable: {e}"))?;
    frame::encode_checked(CONTROL, &payload).map_err(|_| {
        format!(
            "the request is {} bytes; a frame holds at most {MAX_JSON_FRAME}",
            payload.len() + 1
        )
    })
}

/// The `{code, message}` of a REFUSED or ERROR frame; a payload that is not one is
/// shown whole rather than lost.
fn code_message(payload: &[u8]) -> (String, String) {
    match wire::Reason::decode(payload) {
        Ok(r) => (r.code, r.message),
        Err(_) => ("?".into(), String::from_utf8_lossy(payload).into_owned()),
    }
}

/// An `ok: false` reply, read out of its JSON: what the command line reports.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejection {
    /// The op that was refused.
    pub op: String,
    /// `late`, `invalid`, `protocol` or `busy`.
    pub code: String,
    /// The daemon's explanation.
    pub message: String,
    /// With `late`: the first step a change can still be made at.
    pub first_changeable_step: Option<u64>,
}

impl Rejection {
    /// `Some` when `reply` says `ok: false` (or lacks `ok`, which no good reply does).
    pub fn of(reply: &Value) -> Option<Rejection> {
        if reply.get("ok").and_then(Value::as_bool) == Some(true) {
            return None;
        }
        let s = |k: &str| reply.get(k).and_then(Value::as_str).unwrap_or("");
        Some(Rejection {
            op: s("op").to_string(),
            code: if s("code").is_empty() {
                "?".into()
            } else {
                s("code").into()
            },
            message: s("message").to_string(),
            first_changeable_step: reply.get("first_changeable_step").and_then(Value::as_u64),
        })
    }
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the daemon refused {} ({})", self.op, self.code)?;
        if !self.message.is_empty() {
            write!(f, ": {}", self.message)?;
        }
        if let Some(s) = self.first_changeable_step {
            // The daemon's `late` message names the step already; say it once.
            let step = format!("the first step that can still change is {s}");
            let said = self.message.contains(&step);
            let hint = match (wire::Code::Late == self.code.as_str(), self.op.as_str()) {
                // A file's change has no flag: the config decides where it moves.
                (true, "reload") => Some("[serve] late_changes = \"next\" moves it there"),
                (true, _) => Some("--late next applies it there"),
                _ => None,
            };
            match (said, hint) {
                (false, Some(h)) => write!(f, " ({step}; {h})")?,
                (false, None) => write!(f, " ({step})")?,
                (true, Some(h)) => write!(f, " ({h})")?,
                (true, None) => {}
            }
        }
        Ok(())
    }
}

// ------------------------------------------------------------------------ requests

/// `{"protocol":1,"op":"status"}`.
pub fn status_request() -> Value {
    json!({ "protocol": PROTOCOL, "op": "status" })
}

/// `{"protocol":1,"op":"journal"}`.
pub fn journal_request() -> Value {
    json!({ "protocol": PROTOCOL, "op": "journal" })
}

/// `{"protocol":1,"op":"reload"}`: re-read the config file, as SIGHUP does.
pub fn reload_request() -> Value {
    json!({ "protocol": PROTOCOL, "op": "reload" })
}

/// What to do with a change for a step some client already received.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Late {
    /// Refuse it and name the first step that can still change.
    Refuse,
    /// Apply it at the first step that can still change, and say so.
    Next,
}

impl Late {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Late::Refuse => "refuse",
            Late::Next => "next",
        }
    }
}

/// A `set_weights` request; `at_step: None` means the first step that can still change.
pub fn set_weights_request(
    weights: &BTreeMap<String, f64>,
    at_step: Option<u64>,
    late: Late,
) -> Value {
    let mut req = json!({
        "protocol": PROTOCOL,
        "op": "set_weights",
        "weights": weights,
        "late": late.as_str(),
    });
    if let Some(s) = at_step {
        req["at_step"] = json!(s);
    }
    req
}

/// The shape a `set_stage` request puts in force: a `[[plan.stage]]`'s fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StageRequest {
    /// Tokens a row trains on.
    pub seq_len: u32,
    /// Rows per global batch.
    pub global_batch_rows: u32,
    /// Units per packing window; `None` keeps the one in force.
    pub best_fit_window: Option<u64>,
    /// Whether `sequence`-grouped domains chain their long groups.
    pub chain_groups: bool,
}

/// A `set_stage` request (a stage added live); `at_step: None` means the first step
/// that can still change.
pub fn set_stage_request(stage: &StageRequest, at_step: Option<u64>, late: Late) -> Value {
    let mut req = json!({
        "protocol": PROTOCOL,
        "op": "set_stage",
        "seq_len": stage.seq_len,
        "global_batch_rows": stage.global_batch_rows,
        "chain_groups": stage.chain_groups,
        "late": late.as_str(),
    });
    if let Some(w) = stage.best_fit_window {
        req["best_fit_window"] = json!(w);
    }
    if let Some(s) = at_step {
        req["at_step"] = json!(s);
    }
    req
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::frame::encode as frame;
    use std::os::unix::net::UnixListener;

    #[test]
    fn rejections_read_code_message_and_step() {
        let r = Rejection::of(&json!({"ok": false, "op": "set_weights", "code": "late",
                                        "message": "step 3 was delivered", "first_changeable_step": 9}))
        .unwrap();
        assert_eq!(r.code, "late");
        assert_eq!(r.first_changeable_step, Some(9));
        let text = r.to_string();
        assert!(
            text.contains("step 3 was delivered") && text.contains("is 9"),
            "{text}"
        );
        assert!(Rejection::of(&json!({"ok": true})).is_none());
        assert_eq!(Rejection::of(&json!({})).unwrap().code, "?");
        assert!(text.contains("--late next applies it there"), "{text}");
        // The daemon's message names the step: it is said once. A file's late change
        // (reload) has no --late flag: the config's late_changes decides.
        let said = "step 3 may already have been received; the first step that can still \
                    change is 9";
        let r = Rejection::of(&json!({"ok": false, "op": "reload", "code": "late",
                                        "message": said, "first_changeable_step": 9}))
        .unwrap()
        .to_string();
        assert_eq!(r.matches("can still change is 9").count(), 1, "{r}");
        assert!(!r.contains("--late") && r.contains("late_changes"), "{r}");
    }

    /// A daemon stand-in: answers each request frame with `answer(type, payload)`, one
    /// thread per connection; an empty answer, ERROR or REFUSED closes the connection.
    fn fake(
        answer: impl Fn(u8, &[u8]) -> Vec<u8> + Send + Sync + 'static,
    ) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ctl.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let answer = std::sync::Arc::new(answer);
        std::thread::spawn(move || {
            for s in listener.incoming() {
                let Ok(mut s) = s else { return };
                let answer = answer.clone();
                std::thread::spawn(move || {
                    while let Ok((k, payload)) = frame::read_from(&mut s) {
                        let out = answer(k, &payload);
                        // Close after ERROR, REFUSED and malformed frames.
                        let last = !matches!(
                            frame::split(&out, frame::MAX_JSON_FRAME),
                            Ok(Some((k, _, n))) if n == out.len()
                                && ![kind::ERROR, kind::REFUSED].contains(&k)
                        );
                        if out.is_empty() || s.write_all(&out).is_err() || last {
                            break;
                        }
                    }
                });
            }
        });
        (dir, path)
    }

    #[test]
    fn requests_and_replies_over_a_socket() {
        let (_d, path) = fake(|k, p| {
            assert_eq!(k, CONTROL);
            let req: Value = serde_json::from_slice(p).unwrap();
            assert_eq!(req["protocol"], 1);
            match req["op"].as_str().unwrap() {
                "status" => frame(
                    CONTROL_REPLY,
                    json!({"ok": true, "op": "status", "status": {"pid": 1}})
                        .to_string()
                        .as_bytes(),
                ),
                "journal" => frame(
                    CONTROL_REPLY,
                    json!({"ok": false, "op": "journal", "code": "busy", "message": "m"})
                        .to_string()
                        .as_bytes(),
                ),
                "reload" => frame(kind::ERROR, br#"{"code":"protocol","message":"bad"}"#),
                "refuse" => frame(kind::REFUSED, br#"{"code":"uid","message":"uid 5"}"#),
                "junk" => frame(CONTROL_REPLY, b"[1]"),
                "huge" => (u32::MAX).to_le_bytes().to_vec(),
                "short" => vec![9, 0, 0, 0, CONTROL_REPLY, b'{'],
                _ => Vec::new(),
            }
        });
        let t = Duration::from_secs(5);
        let mut c = Connection::open(&path, t).unwrap();
        assert_eq!(c.request(&status_request()).unwrap()["status"]["pid"], 1);
        // Several requests on one connection, answered in order.
        assert_eq!(c.request(&status_request()).unwrap()["ok"], true);
        let r = c.request(&journal_request()).unwrap();
        assert_eq!(Rejection::of(&r).unwrap().code, "busy");
        let e = c.request(&reload_request()).unwrap_err();
        assert!(
            matches!(&e, CtlError::Daemon { code, .. } if code == "protocol"),
            "{e}"
        );
        assert!(e.to_string().contains("ctl.sock"), "{e}");
        // The connection is dead after an ERROR.
        assert!(matches!(
            c.request(&status_request()),
            Err(CtlError::Disconnected { .. })
        ));
        let op = |o: &str| json!({"protocol": 1, "op": o});
        let e = request(&path, &op("refuse"), t).unwrap_err();
        assert!(
            matches!(&e, CtlError::Refused { code, .. } if code == "uid"),
            "{e}"
        );
        let e = request(&path, &op("junk"), t).unwrap_err();
        assert!(matches!(e, CtlError::Protocol { .. }), "{e}");
        let e = request(&path, &op("huge"), t).unwrap_err();
        assert!(e.to_string().contains("frame length"), "{e}");
        let e = request(&path, &op("short"), t).unwrap_err();
        assert!(e.to_string().contains("inside a frame"), "{e}");
        let e = request(&path, &op("close"), t).unwrap_err();
        assert!(matches!(e, CtlError::Disconnected { .. }), "{e}");
        let e = request(&path, &json!([1]), t).unwrap_err();
        assert!(matches!(e, CtlError::Request { .. }), "{e}");
        let big = json!({"op": "x".repeat(MAX_JSON_FRAME)});
        assert!(request(&path, &big, t)
            .unwrap_err()
            .to_string()
            .contains("at most"));
        let e = request(&path.with_extension("nope"), &op("status"), t).unwrap_err();
        assert!(matches!(e, CtlError::Connect { .. }) && e.to_string().contains("ctl.nope"));
    }

    #[test]
    fn a_silent_daemon_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("quiet.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let t0 = Instant::now();
        let e = request(&path, &status_request(), Duration::from_millis(200)).unwrap_err();
        assert!(matches!(e, CtlError::Timeout { .. }), "{e}");
        assert!(t0.elapsed() < Duration::from_secs(5));
        drop(listener);
    }
}
