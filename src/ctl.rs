//! The client side of the control protocol: `millrace ctl` (change the mixture of a
//! running daemon, reload its config, read its change journal), `millrace status` (one
//! snapshot, for people or, with `--json`, for scripts) and `millrace top` (a live view).
//!
//! A control connection opens the daemon's socket and sends CONTROL frames (type 7, a
//! JSON object with `"protocol": 1` and an `op`) instead of HELLO; every one is answered
//! by exactly one CONTROL_REPLY (type 8, a JSON object), in order. Frames are those of
//! docs/PROTOCOL.md: a u32 little-endian length of type byte + payload, the type, the
//! payload, at most 65536 bytes.
//!
//! Errors: transport failures, REFUSED and ERROR frames and malformed replies are
//! [`CtlError`]s. A well-formed reply with `"ok": false` (a late or invalid change, a busy
//! daemon) is returned as `Ok(reply)`: it is the daemon's answer, and callers show its
//! `code` and `message` ([`Rejection::of`] reads them).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::bail;
use serde_json::{json, Value};

use crate::wire::{self, frame, kind, MAX_FRAME};

/// Frame type of a control request (the daemon's own constant).
pub const CONTROL: u8 = kind::CONTROL;
/// Frame type of the daemon's answer to one CONTROL frame.
pub const CONTROL_REPLY: u8 = kind::CONTROL_REPLY;
/// Version of the control requests sent here (the `protocol` key): the daemon's own.
pub const PROTOCOL: u32 = wire::VERSION;
/// How long the command line waits for a reply unless told otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

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
        _ => return e.to_string(),
    };
    format!("{hint} ({e})")
}

/// Parses a number of seconds for the `--timeout`-style flags (fractions allowed).
pub fn parse_secs(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a number of seconds (e.g. 10 or 0.5)"))?;
    if !(v.is_finite() && v > 0.0 && v <= 86_400.0) {
        return Err(format!("{v} s is outside (0, 86400]"));
    }
    Ok(v)
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
        let stream = UnixStream::connect(socket).map_err(|error| CtlError::Connect {
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
            "the request is {} bytes; a frame holds at most {MAX_FRAME}",
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
            write!(f, " (the first step that can still change is {s}")?;
            if wire::Code::Late == self.code.as_str() {
                write!(f, "; --late next applies it there")?;
            }
            write!(f, ")")?;
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

/// Parses one `NAME=WEIGHT` argument of `set-weights`; the message names the argument.
/// NaN, infinities and negative weights are refused here, since JSON cannot carry the
/// first two and the daemon would refuse the last.
pub fn parse_weight(arg: &str) -> Result<(String, f64), String> {
    let Some((name, value)) = arg.split_once('=') else {
        return Err(format!(
            "`{arg}` is not NAME=WEIGHT (e.g. web=0.5): there is no '='"
        ));
    };
    let name = name.trim();
    if name.is_empty() {
        return Err(format!("`{arg}` has no domain name before '='"));
    }
    let w: f64 = value
        .trim()
        .parse()
        .map_err(|_| format!("`{arg}`: weight `{value}` is not a number"))?;
    if w.is_nan() {
        return Err(format!("`{arg}`: weight is NaN"));
    }
    if w.is_infinite() {
        return Err(format!("`{arg}`: weight is infinite"));
    }
    if w < 0.0 {
        return Err(format!("`{arg}`: weight {w} is negative"));
    }
    Ok((name.to_string(), w))
}

/// The weights of `set-weights` as a map; a domain named twice is an error.
pub fn weights_map(pairs: &[(String, f64)]) -> Result<BTreeMap<String, f64>, String> {
    let mut out = BTreeMap::new();
    for (name, w) in pairs {
        if out.insert(name.clone(), *w).is_some() {
            return Err(format!("domain `{name}` is given more than once"));
        }
    }
    if out.is_empty() {
        return Err("no weights given (NAME=WEIGHT ...)".into());
    }
    Ok(out)
}

// ------------------------------------------------------------------------ command line

/// Which daemon to talk to: shared by `ctl`, `status` and `top`.
#[derive(clap::Args, Debug, Clone)]
pub struct Target {
    /// The daemon's socket [default: the config's `[serve] socket`, else
    /// $XDG_RUNTIME_DIR/millrace.sock, else /tmp/millrace-UID/millrace.sock].
    #[arg(long, global = true, conflicts_with = "config")]
    pub socket: Option<PathBuf>,
    /// Take the socket from this config file's `[serve] socket`.
    #[arg(long, global = true)]
    pub config: Option<PathBuf>,
    /// Seconds to wait for each reply (every millrace timeout flag is in seconds).
    #[arg(long, global = true, value_name = "SECS", default_value_t = 10.0, value_parser = parse_secs)]
    pub timeout: f64,
    /// The old spelling of --timeout, in milliseconds (kept so scripts keep working).
    #[arg(long, global = true, hide = true, conflicts_with = "timeout")]
    pub timeout_ms: Option<u64>,
}

impl Target {
    /// The socket path: `--socket`, else the config's, else the daemon's default.
    pub fn socket(&self) -> anyhow::Result<PathBuf> {
        if let Some(s) = &self.socket {
            return Ok(s.clone());
        }
        if let Some(path) = &self.config {
            let cfg = crate::config::Config::load(path)?;
            let serve = crate::config::serve::ServeConfig::from_config(&cfg)?;
            return Ok(serve.socket);
        }
        Ok(crate::config::serve::default_socket())
    }

    fn timeout(&self) -> Duration {
        match self.timeout_ms {
            Some(ms) => Duration::from_millis(ms.max(1)),
            None => Duration::from_secs_f64(self.timeout.max(0.001)),
        }
    }
}

/// Arguments of `millrace ctl`.
#[derive(clap::Args, Debug)]
pub struct CtlArgs {
    /// Which daemon.
    #[command(flatten)]
    pub target: Target,
    /// What to ask it.
    #[command(subcommand)]
    pub command: CtlCommand,
}

/// The requests `millrace ctl` sends.
#[derive(clap::Subcommand, Debug)]
pub enum CtlCommand {
    /// Change mixture weights from a step on; domains not named keep theirs.
    SetWeights(SetWeightsArgs),
    /// Re-read the config file (as SIGHUP does) and apply what changed.
    Reload(ReplyArgs),
    /// List the changes in force (the journal that cursor blobs carry).
    Journal(ReplyArgs),
}

/// Arguments of `millrace ctl set-weights`.
#[derive(clap::Args, Debug)]
pub struct SetWeightsArgs {
    /// NAME=WEIGHT pairs, e.g. web=0.5 code=0.3 (token weights, normalised by the daemon).
    #[arg(required = true, value_name = "NAME=WEIGHT", value_parser = parse_weight)]
    pub weights: Vec<(String, f64)>,
    /// The trainer step the change takes effect at [default: the first that can change].
    #[arg(long)]
    pub at_step: Option<u64>,
    /// When the step was already handed out: refuse, or apply at the next step that can.
    #[arg(long, value_enum, default_value = "refuse")]
    pub late: Late,
    /// Print the daemon's reply as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `millrace ctl reload` and `millrace ctl journal`.
#[derive(clap::Args, Debug)]
pub struct ReplyArgs {
    /// Print the daemon's reply as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `millrace status`.
#[derive(clap::Args, Debug)]
pub struct StatusArgs {
    /// Which daemon.
    #[command(flatten)]
    pub target: Target,
    /// Print the daemon's STATUS object as JSON, verbatim (for scripts).
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `millrace top`.
#[derive(clap::Args, Debug)]
pub struct TopArgs {
    /// Which daemon.
    #[command(flatten)]
    pub target: Target,
    /// Seconds between redraws (rates are taken over this interval).
    #[arg(long, value_name = "SECS", default_value_t = 1.0, value_parser = parse_secs)]
    pub interval: f64,
    /// The old spelling of --interval, in milliseconds (kept so scripts keep working).
    #[arg(long, hide = true, conflicts_with = "interval")]
    pub interval_ms: Option<u64>,
    /// Print one frame (two statuses an interval apart, so rates exist) and exit.
    #[arg(long)]
    pub once: bool,
}

/// Runs `millrace ctl`.
pub fn run_ctl(args: CtlArgs) -> anyhow::Result<()> {
    let socket = args.target.socket()?;
    let timeout = args.target.timeout();
    let mut out = std::io::stdout().lock();
    match args.command {
        CtlCommand::SetWeights(a) => {
            let weights = weights_map(&a.weights).map_err(anyhow::Error::msg)?;
            let reply = request(
                &socket,
                &set_weights_request(&weights, a.at_step, a.late),
                timeout,
            )?;
            if a.json {
                writeln!(out, "{reply}")?;
            } else if Rejection::of(&reply).is_none() {
                write!(out, "{}", describe_change(&reply))?;
            }
            fail_on_rejection(&reply)
        }
        CtlCommand::Reload(a) => {
            let reply = request(&socket, &reload_request(), timeout)?;
            if a.json {
                writeln!(out, "{reply}")?;
            } else if Rejection::of(&reply).is_none() {
                write!(out, "{}", describe_change(&reply))?;
            }
            fail_on_rejection(&reply)
        }
        CtlCommand::Journal(a) => {
            let reply = request(&socket, &journal_request(), timeout)?;
            fail_on_rejection(&reply)?;
            if a.json {
                writeln!(out, "{}", reply.get("journal").unwrap_or(&Value::Null))?;
            } else {
                let empty = Vec::new();
                let entries = reply
                    .get("journal")
                    .and_then(Value::as_array)
                    .unwrap_or(&empty);
                write!(out, "{}", render_journal(entries))?;
            }
            Ok(())
        }
    }
}

fn fail_on_rejection(reply: &Value) -> anyhow::Result<()> {
    match Rejection::of(reply) {
        Some(r) => bail!("{r}"),
        None => Ok(()),
    }
}

/// The reply to `set_weights` or `reload`, in words.
pub fn describe_change(reply: &Value) -> String {
    let mut s = String::new();
    let op = reply.get("op").and_then(Value::as_str).unwrap_or("change");
    match reply.get("applied_step").and_then(Value::as_u64) {
        None => {
            let _ = writeln!(s, "{op}: nothing changed");
        }
        Some(applied) => {
            let requested = reply.get("requested_step").and_then(Value::as_u64);
            let moved = reply.get("moved").and_then(Value::as_bool) == Some(true);
            match (requested, moved) {
                (Some(r), true) => {
                    let _ = writeln!(
                        s,
                        "{op}: step {r} was already handed out; applied from step {applied} instead"
                    );
                }
                _ => {
                    let _ = writeln!(s, "{op}: applied from step {applied}");
                }
            }
        }
    }
    if let Some(m) = reply.get("message").and_then(Value::as_str) {
        // The daemon's message often restates the step said above; say it once.
        let restated = reply
            .get("applied_step")
            .and_then(Value::as_u64)
            .is_some_and(|a| m.contains(&format!("applied from step {a}")));
        if !m.is_empty() && !restated {
            let _ = writeln!(s, "  {m}");
        }
    }
    s
}

/// The change journal as a table, oldest first.
pub fn render_journal(entries: &[Value]) -> String {
    if entries.is_empty() {
        return "no changes: the config's schedule is in force\n".into();
    }
    let mut s = format!(
        "{:>10} {:>10}  {:<7} points\n",
        "at step", "plan step", "source"
    );
    for e in entries {
        let points: Vec<String> = e
            .get("points")
            .and_then(Value::as_array)
            .map(|ps| ps.iter().map(point_text).collect())
            .unwrap_or_default();
        let _ = writeln!(
            s,
            "{:>10} {:>10}  {:<7} {}",
            num_or_dash(e.get("at_step")),
            num_or_dash(e.get("plan_step")),
            e.get("source").and_then(Value::as_str).unwrap_or("-"),
            points.join("; ")
        );
    }
    s
}

fn point_text(p: &Value) -> String {
    let weights = p
        .get("weights")
        .and_then(Value::as_object)
        .map(|w| {
            w.iter()
                .map(|(k, v)| format!("{k}={}", v.as_f64().map_or("?".into(), trim_float)))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default();
    format!("step {}: {weights}", num_or_dash(p.get("step")))
}

fn trim_float(f: f64) -> String {
    let s = format!("{f:.4}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s.is_empty() || s == "-" {
        "0".into()
    } else {
        s.into()
    }
}

fn num_or_dash(v: Option<&Value>) -> String {
    match v {
        Some(Value::Number(n)) => n.to_string(),
        _ => "-".into(),
    }
}

/// Runs `millrace status`.
pub fn run_status(args: StatusArgs) -> anyhow::Result<()> {
    let socket = args.target.socket()?;
    let status = fetch_status(&mut Connection::open(&socket, args.target.timeout())?)?;
    let mut out = std::io::stdout().lock();
    if args.json {
        writeln!(out, "{status}")?;
    } else {
        write!(out, "{}", render_status(&status))?;
    }
    Ok(())
}

/// Asks for STATUS on `conn`; an `ok: false` reply is an error here.
pub fn fetch_status(conn: &mut Connection) -> anyhow::Result<Value> {
    let reply = conn.request(&status_request())?;
    fail_on_rejection(&reply)?;
    match reply.get("status") {
        Some(s) if s.is_object() => Ok(s.clone()),
        _ => bail!(
            "{}: the status reply has no `status` object",
            conn.socket().display()
        ),
    }
}

/// The last reload's outcome when it was refused (a refused file edit leaves the old
/// weights in force, which nobody should have to find in the log); nothing otherwise.
pub fn last_reload_line(st: &Value) -> Option<String> {
    let last = st.get("last_reload")?;
    if last.get("ok").and_then(Value::as_bool) != Some(false) {
        return None;
    }
    let source = last.get("source").and_then(Value::as_str).unwrap_or("?");
    let code = last.get("code").and_then(Value::as_str).unwrap_or("?");
    let message = last.get("message").and_then(Value::as_str).unwrap_or("");
    Some(format!(
        "LAST RELOAD REFUSED ({source}, {code}): the old weights stay: {message}"
    ))
}

/// `millrace status` in words: identity, counters, mixture and rings.
pub fn render_status(st: &Value) -> String {
    let mut s = String::new();
    let g = |k: &str| st.get(k);
    let _ = writeln!(
        s,
        "millrace {} pid {} up {}",
        str_or_dash(g("version")),
        num_or_dash(g("pid")),
        duration_text(g("uptime_s").and_then(Value::as_f64))
    );
    let _ = writeln!(s, "config       {}", str_or_dash(g("config")));
    let _ = writeln!(s, "socket       {}", str_or_dash(g("socket")));
    let _ = writeln!(s, "fingerprint  {}", str_or_dash(g("fingerprint")));
    let _ = writeln!(
        s,
        "clients {}  reloads {} (failed {})  first changeable step {}",
        num_or_dash(g("clients")),
        num_or_dash(g("reloads")),
        num_or_dash(g("failed_reloads")),
        num_or_dash(g("first_changeable_step"))
    );
    // Daemons before issue 14 do not report these: no line rather than dashes.
    if let Some(fd) = g("fd_limit") {
        let _ = writeln!(
            s,
            "fds {} open of {} (hard {})  control connections {} of {}",
            num_or_dash(fd.get("open")),
            num_or_dash(fd.get("soft")),
            num_or_dash(fd.get("hard")),
            num_or_dash(g("control_connections").and_then(|c| c.get("open"))),
            num_or_dash(g("control_connections").and_then(|c| c.get("max")))
        );
    }
    if let Some(line) = last_reload_line(st) {
        let _ = writeln!(s, "{line}");
    }
    let _ = writeln!(
        s,
        "padding {}  truncation {}",
        pct_or_dash(g("padding_fraction")),
        pct_or_dash(g("truncation_fraction"))
    );
    // The rings' share of [serve] ring_memory_bytes: a full budget refuses new jobs.
    let mib = |k: &str| {
        g("ring_memory")
            .and_then(|r| r.get(k))
            .and_then(Value::as_u64)
            .map_or("-".into(), |b| format!("{:.1} MiB", b as f64 / 1048576.0))
    };
    let _ = writeln!(
        s,
        "ring memory {} of {}",
        mib("used_bytes"),
        mib("budget_bytes")
    );
    let _ = writeln!(
        s,
        "\ndomain        target  realized      epochs          tokens"
    );
    for d in arr(g("domains")) {
        let _ = writeln!(
            s,
            "{:<12} {:>7} {:>9} {:>11} {:>15}",
            str_or_dash(d.get("name")),
            pct_or_dash(d.get("target_share")),
            pct_or_dash(d.get("realized_share")),
            d.get("epochs")
                .and_then(Value::as_f64)
                .map_or("-".into(), |e| format!("{e:.4}")),
            d.get("tokens")
                .and_then(Value::as_u64)
                .map_or("-".into(), crate::util::thousands)
        );
    }
    let jobs = arr(g("jobs"));
    if jobs.is_empty() {
        let _ = writeln!(s, "\nno job is connected");
    } else {
        let _ = writeln!(
            s,
            "\n{:<16} {:>4} {:>9} {:>9} {:>5} {:>15} {:>9} {:>9}  peers",
            "job", "rank", "published", "released", "ring", "tokens", "cons.wait", "prod.wait"
        );
    }
    for j in jobs {
        for r in arr(j.get("rings")) {
            let peers: Vec<String> = arr(r.get("peers"))
                .iter()
                .map(|p| {
                    format!(
                        "{}(pid {}, released {})",
                        str_or_dash(p.get("replica")),
                        num_or_dash(p.get("pid")),
                        num_or_dash(p.get("released_step"))
                    )
                })
                .collect();
            let _ = writeln!(
                s,
                "{:<16} {:>4} {:>9} {:>9} {:>5} {:>15} {:>8.2}s {:>8.2}s  {}",
                str_or_dash(j.get("job")),
                num_or_dash(r.get("dp_rank")),
                num_or_dash(r.get("published_step")),
                num_or_dash(r.get("released_step")),
                format!(
                    "{}/{}",
                    num_or_dash(r.get("occupancy")),
                    num_or_dash(r.get("slots"))
                ),
                r.get("tokens_delivered")
                    .and_then(Value::as_u64)
                    .map_or("-".into(), crate::util::thousands),
                r.get("consumer_wait_s")
                    .and_then(Value::as_f64)
                    .unwrap_or(0.0),
                r.get("producer_wait_s")
                    .and_then(Value::as_f64)
                    .unwrap_or(0.0),
                peers.join(", ")
            );
        }
    }
    let journal = arr(g("journal"));
    if !journal.is_empty() {
        let _ = writeln!(s, "\nchanges in force:");
        s.push_str(&render_journal(journal));
    }
    s
}

fn arr(v: Option<&Value>) -> &[Value] {
    v.and_then(Value::as_array).map_or(&[], |a| a.as_slice())
}

fn str_or_dash(v: Option<&Value>) -> String {
    v.and_then(Value::as_str).unwrap_or("-").to_string()
}

fn pct_or_dash(v: Option<&Value>) -> String {
    v.and_then(Value::as_f64)
        .map_or("-".into(), |f| format!("{:.1}%", 100.0 * f))
}

fn duration_text(s: Option<f64>) -> String {
    let Some(s) = s.filter(|s| s.is_finite() && *s >= 0.0) else {
        return "-".into();
    };
    let t = s as u64;
    match t {
        0..=59 => format!("{s:.1}s"),
        60..=3599 => format!("{}m{:02}s", t / 60, t % 60),
        3600..=86399 => format!("{}h{:02}m", t / 3600, (t % 3600) / 60),
        _ => format!("{}d{:02}h", t / 86400, (t % 86400) / 3600),
    }
}

/// `[###.....]`: `frac` of `width` cells filled (clamped to 0..=1).
fn bar(frac: f64, width: usize) -> String {
    let frac = if frac.is_finite() {
        frac.clamp(0.0, 1.0)
    } else {
        0.0
    };
    let full = ((frac * width as f64).round() as usize).min(width);
    format!("[{}{}]", "#".repeat(full), ".".repeat(width - full))
}

/// Like [`bar`], with a `|` at `mark` (a target) unless a filled cell is there.
fn bar_with_mark(frac: f64, mark: f64, width: usize) -> String {
    let mut cells: Vec<char> = bar(frac, width).chars().collect();
    if mark.is_finite() && width > 0 {
        let at = ((mark.clamp(0.0, 1.0) * width as f64).round() as usize).min(width - 1);
        // cells[0] is '['.
        if cells[at + 1] == '.' {
            cells[at + 1] = '|';
        } else {
            cells[at + 1] = '+';
        }
    }
    cells.into_iter().collect()
}

/// One frame of `millrace top`, from the latest STATUS (`now`) and, for rates, the
/// previous one and the seconds between them. Pure, so it is tested on sample JSON; a
/// missing field shows as `-`, a counter that went backwards (a new ring, a restarted
/// daemon) shows no rate. Lines are cut to `width` characters.
pub fn render(now: &Value, prev: Option<(&Value, f64)>, width: usize) -> String {
    let width = width.max(40);
    let g = |k: &str| now.get(k);
    // Rates only between two statuses of one daemon process.
    let prev = prev.filter(|(p, dt)| {
        *dt > 0.0 && dt.is_finite() && p.get("pid") == now.get("pid") && now.get("pid").is_some()
    });
    let mut lines: Vec<String> = Vec::new();
    lines.push(format!(
        "millrace {}  pid {}  up {}  fingerprint {}",
        str_or_dash(g("version")),
        num_or_dash(g("pid")),
        duration_text(g("uptime_s").and_then(Value::as_f64)),
        str_or_dash(g("fingerprint")),
    ));
    lines.push(format!(
        "clients {}  reloads {} (failed {})  first changeable step {}  padding {}  truncation {}",
        num_or_dash(g("clients")),
        num_or_dash(g("reloads")),
        num_or_dash(g("failed_reloads")),
        num_or_dash(g("first_changeable_step")),
        pct_or_dash(g("padding_fraction")),
        pct_or_dash(g("truncation_fraction")),
    ));
    lines.extend(last_reload_line(now));
    lines.push(String::new());
    let jobs = arr(g("jobs"));
    if jobs.is_empty() {
        lines.push("no job is connected".into());
    } else {
        lines.push(format!(
            "{:<9} {:>4} {:>8} {:>8} {:>7} {:<12} {:>9} {:>9} {:>5}",
            "job", "rank", "step", "tokens/s", "steps/s", "ring", "cons.wait", "prod.wait", "peers"
        ));
    }
    for j in jobs {
        let job = str_or_dash(j.get("job"));
        for r in arr(j.get("rings")) {
            let rank = r.get("dp_rank").and_then(Value::as_u64);
            let before = prev.and_then(|(p, dt)| {
                arr(p.get("jobs"))
                    .iter()
                    .filter(|pj| pj.get("job").and_then(Value::as_str) == Some(job.as_str()))
                    .flat_map(|pj| arr(pj.get("rings")))
                    .find(|pr| pr.get("dp_rank").and_then(Value::as_u64) == rank && rank.is_some())
                    .map(|pr| (pr, dt))
            });
            let rate = |key: &str| -> Option<f64> {
                let (pr, dt) = before?;
                let a = pr.get(key).and_then(Value::as_f64)?;
                let b = r.get(key).and_then(Value::as_f64)?;
                (b >= a).then(|| (b - a) / dt)
            };
            let occ = r.get("occupancy").and_then(Value::as_f64);
            let slots = r.get("slots").and_then(Value::as_f64);
            let ring = match (occ, slots) {
                (Some(o), Some(s)) if s > 0.0 => {
                    format!("{} {}/{}", bar(o / s, 6), o as u64, s as u64)
                }
                _ => "-".into(),
            };
            let opt = |v: Option<f64>, f: &dyn Fn(f64) -> String| v.map_or("-".into(), f);
            lines.push(format!(
                "{:<9} {:>4} {:>8} {:>8} {:>7} {:<12} {:>9} {:>9} {:>5}",
                job,
                num_or_dash(r.get("dp_rank")),
                num_or_dash(r.get("released_step").or(r.get("published_step"))),
                opt(rate("tokens_delivered"), &crate::util::si),
                opt(rate("released_step"), &|v| format!("{v:.2}")),
                ring,
                opt(rate("consumer_wait_s"), &|v| format!("{v:.3}")),
                opt(rate("producer_wait_s"), &|v| format!("{v:.3}")),
                arr(r.get("peers")).len(),
            ));
        }
    }
    if !jobs.is_empty() {
        lines.push(
            "waits: s/s trainers waited for data (cons) / the daemon for a free slot (prod)".into(),
        );
    }
    let domains = arr(g("domains"));
    if !domains.is_empty() {
        lines.push(String::new());
        let name_w = domains
            .iter()
            .map(|d| str_or_dash(d.get("name")).chars().count())
            .max()
            .unwrap_or(1)
            .clamp(6, 20);
        // name, space, bar (w + 2), then "   59.8% of  60.0%  epochs 0.0130" (33).
        let bar_w = width.saturating_sub(name_w + 1 + 2 + 33).clamp(10, 60);
        lines.push(format!(
            "{:<name_w$} {:<bw$}  realized of target (|)",
            "mixture",
            "token shares",
            bw = bar_w + 2
        ));
        for d in domains {
            let realized = d.get("realized_share").and_then(Value::as_f64);
            let target = d.get("target_share").and_then(Value::as_f64);
            lines.push(format!(
                "{:<name_w$} {}  {:>6} of {:>6}  epochs {}",
                str_or_dash(d.get("name")),
                bar_with_mark(realized.unwrap_or(0.0), target.unwrap_or(f64::NAN), bar_w),
                pct_or_dash(d.get("realized_share")),
                pct_or_dash(d.get("target_share")),
                d.get("epochs")
                    .and_then(Value::as_f64)
                    .map_or("-".into(), |e| format!("{e:.4}")),
            ));
        }
    }
    if let Some(last) = arr(g("journal")).last() {
        lines.push(String::new());
        lines.push(format!(
            "last change: from step {} ({}) {}",
            num_or_dash(last.get("at_step")),
            str_or_dash(last.get("source")),
            arr(last.get("points"))
                .iter()
                .map(point_text)
                .collect::<Vec<_>>()
                .join("; ")
        ));
    }
    let mut out = String::new();
    for l in lines {
        let cut: String = l.chars().take(width).collect();
        out.push_str(cut.trim_end());
        out.push('\n');
    }
    out
}

/// Columns of the terminal on stdout, else `$COLUMNS`, else 100.
fn terminal_width() -> usize {
    // SAFETY: TIOCGWINSZ writes a winsize into the struct we pass; nothing else.
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    let ok = unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut ws) } == 0;
    if ok && ws.ws_col > 0 {
        return ws.ws_col as usize;
    }
    std::env::var("COLUMNS")
        .ok()
        .and_then(|c| c.trim().parse().ok())
        .filter(|&c: &usize| c > 0)
        .unwrap_or(100)
}

/// Runs `millrace top`: a redraw every interval until interrupted, or one frame with
/// `--once`. A daemon that goes away is shown as such and reconnected to.
pub fn run_top(args: TopArgs) -> anyhow::Result<()> {
    use std::io::IsTerminal;
    let socket = args.target.socket()?;
    let timeout = args.target.timeout();
    let interval = match args.interval_ms {
        Some(ms) => Duration::from_millis(ms),
        None => Duration::from_secs_f64(args.interval),
    }
    .max(Duration::from_millis(50));
    let mut conn = Connection::open(&socket, timeout)?;
    let mut prev = (fetch_status(&mut conn)?, Instant::now());
    if args.once {
        std::thread::sleep(interval);
        let now = fetch_status(&mut conn)?;
        let dt = prev.1.elapsed().as_secs_f64();
        let frame = render(&now, Some((&prev.0, dt)), terminal_width());
        std::io::stdout().lock().write_all(frame.as_bytes())?;
        return Ok(());
    }
    let tty = std::io::stdout().is_terminal();
    let show = |frame: &str| -> anyhow::Result<()> {
        let mut out = std::io::stdout().lock();
        if tty {
            out.write_all(b"\x1b[2J\x1b[H")?;
        }
        out.write_all(frame.as_bytes())?;
        if !tty {
            out.write_all(b"\n")?;
        }
        out.flush()?;
        Ok(())
    };
    // A first frame at once (without rates), then one per interval.
    show(&render(&prev.0, None, terminal_width()))?;
    let mut conn = Some(conn);
    let mut have_prev = true;
    loop {
        std::thread::sleep(interval);
        let got = match conn.as_mut() {
            Some(c) => fetch_status(c),
            None => Connection::open(&socket, timeout)
                .map_err(anyhow::Error::from)
                .and_then(|mut c| {
                    let st = fetch_status(&mut c);
                    conn = Some(c);
                    st
                }),
        };
        let at = Instant::now();
        let frame = match got {
            Ok(now) => {
                let dt = at.duration_since(prev.1).as_secs_f64();
                let frame = render(&now, have_prev.then_some((&prev.0, dt)), terminal_width());
                prev = (now, at);
                have_prev = true;
                frame
            }
            Err(e) => {
                conn = None;
                have_prev = false;
                format!(
                    "{}: {e:#}\nretrying every {} ms\n",
                    socket.display(),
                    interval.as_millis()
                )
            }
        };
        show(&frame)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    fn sample_status(tokens: u64, released: u64, cwait: f64) -> Value {
        json!({
            "version": "0.1.0", "pid": 123, "uptime_s": 3725.0,
            "config": "/etc/millrace/millrace.toml", "socket": "/run/millrace/millrace.sock",
            "fingerprint": "0123456789abcdef0123456789abcdef",
            "clients": 3, "reloads": 1, "failed_reloads": 0, "first_changeable_step": 57,
            "journal": [{"at_step": 40, "plan_step": 40, "source": "ctl",
                          "points": [{"step": 40, "weights": {"web": 0.5, "code": 0.3}}]}],
            "domains": [
                {"name": "web", "target_share": 0.6, "realized_share": 0.598, "epochs": 0.013, "tokens": 123456},
                {"name": "code", "target_share": 0.4, "realized_share": 0.402, "epochs": 0.02, "tokens": 82000}
            ],
            "padding_fraction": 0.012, "truncation_fraction": 0.03,
            "ring_memory": {"used_bytes": 150994944, "budget_bytes": 4294967296u64},
            "jobs": [{"job": "default", "dp_size": 2, "rings": [
                {"dp_rank": 0, "published_step": released + 3, "released_step": released,
                 "slots": 4, "occupancy": 3,
                 "peers": [{"replica": "0", "pid": 4567, "released_step": released}],
                 "tokens_delivered": tokens, "batches_delivered": released,
                 "consumer_wait_s": cwait, "producer_wait_s": 3.1},
                {"dp_rank": 1, "published_step": 10, "released_step": 8, "slots": 4, "occupancy": 2,
                 "peers": [], "tokens_delivered": 5, "batches_delivered": 8,
                 "consumer_wait_s": 0.0, "producer_wait_s": 0.0}
            ]}]
        })
    }

    #[test]
    fn render_shows_rates_bars_and_mixture() {
        let prev = sample_status(1_000_000, 50, 0.25);
        let now = sample_status(3_000_000, 60, 0.75);
        let text = render(&now, Some((&prev, 2.0)), 120);
        assert!(text.contains("pid 123"), "{text}");
        assert!(text.contains("up 1h02m"), "{text}");
        assert!(text.contains("0123456789abcdef0123456789abcdef"), "{text}");
        assert!(text.contains("clients 3  reloads 1 (failed 0)"), "{text}");
        let ring0 = text
            .lines()
            .find(|l| l.starts_with("default") && l.contains("  0 "))
            .unwrap();
        // 2e6 tokens over 2 s, 10 steps over 2 s, 0.5 s of waiting over 2 s.
        assert!(ring0.contains("1.00M"), "{ring0}");
        assert!(ring0.contains("5.00"), "{ring0}");
        assert!(ring0.contains("0.250"), "{ring0}");
        assert!(ring0.contains("[#####.] 3/4"), "{ring0}");
        // Rank 1's counters did not move: zero rates, not dashes.
        let ring1 = text
            .lines()
            .find(|l| l.starts_with("default") && l.contains("  1 "))
            .unwrap();
        assert!(ring1.contains(" 0.0 "), "{ring1}");
        let web = text.lines().find(|l| l.starts_with("web")).unwrap();
        assert!(web.contains("59.8% of  60.0%"), "{web}");
        assert!(web.contains('#') && web.contains('['), "{web}");
        assert!(text.contains("last change: from step 40 (ctl) step 40: code=0.3 web=0.5"));
        for l in text.lines() {
            assert!(l.chars().count() <= 120, "{l}");
        }
        // No escapes: the caller adds them on a terminal.
        assert!(!text.contains('\x1b'));
    }

    #[test]
    fn render_without_prev_or_across_a_restart_shows_no_rates() {
        let now = sample_status(3_000_000, 60, 0.75);
        let text = render(&now, None, 100);
        let ring0 = text.lines().find(|l| l.starts_with("default")).unwrap();
        assert!(!ring0.contains("M "), "{ring0}");
        assert!(ring0.contains(" - "), "{ring0}");
        let mut other = sample_status(1, 1, 0.0);
        other["pid"] = json!(999);
        let text = render(&now, Some((&other, 1.0)), 100);
        assert!(text
            .lines()
            .any(|l| l.starts_with("default") && l.contains(" - ")));
        // A counter that went backwards (a new ring) gives no rate either.
        let later = sample_status(10, 1, 0.0);
        let text = render(&later, Some((&now, 1.0)), 100);
        let ring0 = text.lines().find(|l| l.starts_with("default")).unwrap();
        assert!(ring0.contains(" - "), "{ring0}");
    }

    #[test]
    fn render_tolerates_missing_and_odd_fields() {
        for v in [
            json!({}),
            json!({"jobs": "x", "domains": [1, {"name": 3}], "journal": [{}]}),
            json!({"jobs": [{"rings": [{"slots": 0, "occupancy": 1}]}], "pid": "x"}),
            json!({"domains": [{"name": "web", "realized_share": 7.0, "target_share": -1.0}]}),
        ] {
            let text = render(&v, Some((&v, 0.0)), 10);
            assert!(text.contains("millrace"), "{text}");
            let _ = render_status(&v);
        }
        let text = render(&json!({"jobs": []}), None, 80);
        assert!(text.contains("no job is connected"));
    }

    #[test]
    fn bars() {
        assert_eq!(bar(0.5, 4), "[##..]");
        assert_eq!(bar(2.0, 3), "[###]");
        assert_eq!(bar(f64::NAN, 2), "[..]");
        assert_eq!(bar_with_mark(0.25, 0.75, 4), "[#..|]");
        assert_eq!(bar_with_mark(0.75, 0.25, 4), "[#+#.]");
        assert_eq!(bar_with_mark(0.0, 1.0, 4), "[...|]");
    }

    #[test]
    fn status_text_names_the_rings_and_domains() {
        let text = render_status(&sample_status(1234567, 57, 0.25));
        assert!(
            text.contains("ring memory 144.0 MiB of 4096.0 MiB"),
            "{text}"
        );
        assert!(text.contains("pid 123"), "{text}");
        assert!(text.contains("first changeable step 57"), "{text}");
        assert!(text.contains("1,234,567"), "{text}");
        assert!(text.contains("0(pid 4567, released 57)"), "{text}");
        assert!(text.contains("web"), "{text}");
        assert!(text.contains("60.0%"), "{text}");
        assert!(text.contains("changes in force"), "{text}");
    }

    #[test]
    fn a_refused_reload_shows_in_status_and_top() {
        let mut st = sample_status(1000, 57, 0.25);
        st["last_reload"] = json!({"source": "file", "ok": false, "code": "late",
                                   "message": "step 1 may already have been received"});
        let want = "LAST RELOAD REFUSED (file, late): the old weights stay: step 1 may \
                    already have been received";
        assert!(render_status(&st).contains(want), "{}", render_status(&st));
        assert!(render(&st, None, 100).contains(want));
        // An accepted (or no) reload adds no line.
        st["last_reload"] = json!({"source": "ctl", "ok": true, "message": "applied"});
        assert!(!render_status(&st).contains("LAST RELOAD"));
        assert!(!render(&st, None, 100).contains("LAST RELOAD"));
    }

    #[test]
    fn a_restated_step_is_said_once() {
        let reply = json!({"ok": true, "op": "set_weights", "applied_step": 51,
                           "requested_step": 51, "moved": false,
                           "message": "applied from step 51"});
        assert_eq!(
            describe_change(&reply),
            "set_weights: applied from step 51\n"
        );
    }

    #[test]
    fn weight_arguments_are_checked_and_named() {
        assert_eq!(parse_weight("web=0.5"), Ok(("web".into(), 0.5)));
        assert_eq!(parse_weight(" code = 1e-1 "), Ok(("code".into(), 0.1)));
        assert_eq!(parse_weight("code=0"), Ok(("code".into(), 0.0)));
        for (arg, want) in [
            ("web", "no '='"),
            ("web:0.5", "no '='"),
            ("=0.5", "no domain name"),
            ("web=abc", "not a number"),
            ("web=", "not a number"),
            ("web=NaN", "NaN"),
            ("web=nan", "NaN"),
            ("web=inf", "infinite"),
            ("web=-0.1", "negative"),
        ] {
            let e = parse_weight(arg).unwrap_err();
            assert!(e.contains(want), "{arg}: {e}");
            assert!(e.contains(&format!("`{arg}`")), "{arg}: {e}");
        }
        let pairs = vec![("web".to_string(), 0.5), ("code".to_string(), 0.3)];
        let m = weights_map(&pairs).unwrap();
        assert_eq!(m.len(), 2);
        let dup = vec![("web".to_string(), 0.5), ("web".to_string(), 0.3)];
        assert!(weights_map(&dup).unwrap_err().contains("`web`"));
        assert!(weights_map(&[]).is_err());
    }

    #[test]
    fn command_line_parses() {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(subcommand)]
            cmd: Cmd,
        }
        #[derive(clap::Subcommand)]
        enum Cmd {
            Ctl(CtlArgs),
            Status(StatusArgs),
            Top(TopArgs),
        }
        let cli = Cli::try_parse_from([
            "m",
            "ctl",
            "--socket",
            "/tmp/s",
            "set-weights",
            "web=0.5",
            "code=0.3",
            "--at-step",
            "100",
            "--late",
            "next",
        ])
        .unwrap();
        let Cmd::Ctl(a) = cli.cmd else { panic!() };
        assert_eq!(a.target.socket().unwrap(), PathBuf::from("/tmp/s"));
        let CtlCommand::SetWeights(w) = a.command else {
            panic!()
        };
        assert_eq!(w.weights.len(), 2);
        assert_eq!((w.at_step, w.late), (Some(100), Late::Next));
        let req = set_weights_request(&weights_map(&w.weights).unwrap(), w.at_step, w.late);
        assert_eq!(
            req,
            json!({"protocol": 1, "op": "set_weights", "weights": {"web": 0.5, "code": 0.3},
                   "at_step": 100, "late": "next"})
        );
        // --socket also after the subcommand; default socket otherwise.
        let cli = Cli::try_parse_from(["m", "ctl", "journal", "--socket", "/x", "--json"]).unwrap();
        let Cmd::Ctl(a) = cli.cmd else { panic!() };
        assert_eq!(a.target.socket().unwrap(), PathBuf::from("/x"));
        let cli = Cli::try_parse_from(["m", "status"]).unwrap();
        let Cmd::Status(a) = cli.cmd else { panic!() };
        assert_eq!(
            a.target.socket().unwrap(),
            crate::config::serve::default_socket()
        );
        let cli = Cli::try_parse_from(["m", "top", "--once", "--interval-ms", "200"]).unwrap();
        let Cmd::Top(a) = cli.cmd else { panic!() };
        assert!(a.once && a.interval_ms == Some(200));
        let cli = Cli::try_parse_from(["m", "top", "--once", "--interval", "0.2"]).unwrap();
        let Cmd::Top(a) = cli.cmd else { panic!() };
        assert!(a.once && a.interval == 0.2 && a.interval_ms.is_none());
        // Bad weights are refused by the parser, naming the argument.
        let e = Cli::try_parse_from(["m", "ctl", "set-weights", "web=-1"])
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("web=-1") && e.contains("negative"), "{e}");
        let e = Cli::try_parse_from(["m", "ctl", "set-weights", "web=NaN"])
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("web=NaN") && e.contains("NaN"), "{e}");
        assert!(Cli::try_parse_from(["m", "ctl", "set-weights"]).is_err());
        assert!(
            Cli::try_parse_from(["m", "ctl", "--socket", "a", "--config", "b", "reload"]).is_err()
        );
    }

    #[test]
    fn the_socket_comes_from_the_config() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("m.toml");
        std::fs::write(
            &cfg,
            "[corpus]\n[[corpus.domain]]\nname = \"web\"\nshards = [\"web\"]\n\n[serve]\nsocket = \"run/d.sock\"\n",
        )
        .unwrap();
        let t = Target {
            socket: None,
            config: Some(cfg),
            timeout: 0.01,
            timeout_ms: None,
        };
        assert_eq!(t.socket().unwrap(), dir.path().join("run/d.sock"));
    }

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
    }

    #[test]
    fn change_replies_in_words() {
        let t = describe_change(
            &json!({"ok": true, "op": "set_weights", "requested_step": 5,
                                         "applied_step": 9, "moved": true, "message": "m"}),
        );
        assert!(
            t.contains("step 5 was already handed out; applied from step 9"),
            "{t}"
        );
        let t = describe_change(&json!({"ok": true, "op": "reload", "requested_step": null,
                                         "applied_step": null, "moved": false, "message": "no change"}));
        assert!(
            t.contains("nothing changed") && t.contains("no change"),
            "{t}"
        );
        let j = render_journal(&[json!({"at_step": 7, "plan_step": 7, "source": "file",
                                         "points": [{"step": 7, "weights": {"web": 1.0}}]})]);
        assert!(j.contains("file") && j.contains("step 7: web=1"), "{j}");
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
                            frame::split(&out),
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

    use crate::wire::frame::encode as frame;

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
        let big = json!({"op": "x".repeat(MAX_FRAME)});
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
