//! A blocking Rust client of the daemon (docs/PROTOCOL.md): what `millrace consume`,
//! `millrace demo` and `millrace bench` use when they stand in for a trainer rank.
//!
//! One [`Client`] is one trainer rank's connection: it sends HELLO over the unix socket,
//! receives WELCOME with `[ring_fd, ready_fd]` (SCM_RIGHTS; and `page_fd` when its HELLO
//! asked for a release page), maps the ring read-only and then hands out [`BatchView`]s
//! that borrow the mapped slot, waiting on the eventfd and the socket with `poll`. Everything read from the socket or the ring is bounds-checked
//! against the sizes WELCOME announced and the memfd really has, so a malformed WELCOME
//! or ring is an error, never a panic or a fault.

//!
//! The files, in the order a batch meets them: [`connection`] (the socket, HELLO and
//! WELCOME, waiting and stepping), `layout` (WELCOME's numbers checked against each
//! other and the mapped ring), [`batch`] (the borrowed view of one step), [`derive`]
//! (a compact slot's labels, positions, mask and `cu_seqlens`, computed),
//! [`consume`] (`millrace consume`: a rank that streams and measures) and [`gpu`] (each
//! slot copied to a CUDA device, `consume --device cuda:N`).

use std::path::PathBuf;
use std::time::Duration;

use crate::wire::Code;

mod batch;
mod connection;
mod consume;
mod derive;
pub mod gpu;
mod layout;
#[cfg(test)]
mod tests;

pub use batch::{BatchView, SlotArrays};
pub use connection::{Client, DUPLICATE_GRACE};
pub use consume::{
    consume, process_cpu_seconds, read_cursor_file, run_consume, span_seconds, ConsumeArgs,
    ConsumeSummary, Latency,
};
pub use derive::Expanded;
#[doc(hidden)]
pub use layout::check_welcome;

// The wire and ring constants are the daemon's own, so the two sides cannot drift.
pub use crate::sys::monotonic_ns;
use crate::wire::ring::ring_at;
pub use crate::wire::ring::{
    LAYOUT_VERSION as RING_VERSION, MAGIC as RING_MAGIC, SLOT_HEADER as SLOT_HEADER_BYTES,
};
/// Offset of `published` in the ring header (the wire's own).
pub const PUBLISHED_OFFSET: usize = ring_at::PUBLISHED;
pub use crate::wire::{
    decode_hex as from_hex, to_hex, FieldSpec, Hello, SlotLayout, Welcome,
    MAX_FRAME as MAX_FRAME_LEN, MAX_JSON_FRAME as MAX_JSON_FRAME_LEN, TRAINER_VERSION as PROTOCOL,
};
/// How long the handshake (HELLO to WELCOME) may take before the client gives up.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// Frame type codes (PROTOCOL.md section 1): the daemon's own table, so the two sides
/// cannot drift apart.
pub use crate::wire::kind as frame;

/// Why the client could not connect or stream; typed so callers can tell a refusal
/// (fix the request) from a vanished daemon (reconnect) from a malformed reply (bug).
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket could not be reached (daemon not running, wrong path, permissions).
    /// The OS error is in the message, not a `source`, so `{:#}` says it once.
    #[error("cannot connect to {path}: {}", crate::control::connect_reason(error))]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        error: std::io::Error,
    },
    /// A system call on the socket, eventfd or memfd failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// The daemon answered REFUSED.
    #[error("the daemon refused the connection ({code}): {message}")]
    Refused {
        /// Refusal code (PROTOCOL.md section 2): `layout`, `cursor`, `busy`, ...
        code: String,
        /// The daemon's message, naming the field and both values.
        message: String,
    },
    /// The daemon sent an ERROR frame and closed the connection.
    #[error("the daemon closed the connection with an error ({code}): {message}")]
    Daemon {
        /// Error code.
        code: String,
        /// The daemon's message.
        message: String,
    },
    /// ERROR `cursor` before this client handed out any step it concerns: a rank of
    /// its job brought a live change this stream lacked, and the ring went back to the
    /// change's step and stopped. A reconnect from the last step handed out goes on
    /// with the change ([`ClientError::is_transient`]); once a step at or past it was
    /// handed out, the error stays [`ClientError::Daemon`].
    #[error("the ring stopped at a live change this stream lacked, before any step of it was handed out; a reconnect goes on with it: {message}")]
    StaleRing {
        /// The daemon's message.
        message: String,
    },
    /// The socket closed without an ERROR frame: the daemon went away.
    #[error("the daemon closed the connection")]
    Disconnected,
    /// A frame or WELCOME that does not follow the protocol.
    #[error("protocol violation by the daemon: {0}")]
    Protocol(String),
    /// The ring or a slot disagrees with WELCOME or with itself.
    #[error("malformed ring: {0}")]
    Ring(String),
    /// Nothing arrived within the configured time.
    #[error("timed out: {0}")]
    Timeout(String),
    /// The caller asked for something the protocol forbids (e.g. releasing an unread step).
    #[error("invalid request: {0}")]
    Usage(String),
    /// The socket is in a place another user controls, so whoever listens there may not
    /// be this user's daemon ([`crate::config::serve::check_fallback_socket_dir`]).
    #[error("{0}")]
    Untrusted(String),
}

impl ClientError {
    /// True when reconnecting later may succeed (the daemon is restarting or busy).
    pub fn is_transient(&self) -> bool {
        match self {
            // Only the errors of a daemon that is not there now (restarting: no socket
            // file yet, or one nobody listens on) and of a full listen backlog: a
            // permission error or a path that is no socket stays what it is, however
            // long the caller retries (the Python client's list, with EAGAIN).
            ClientError::Connect { error, .. } => matches!(
                error.raw_os_error(),
                Some(
                    libc::ENOENT
                        | libc::ECONNREFUSED
                        | libc::ECONNRESET
                        | libc::EPIPE
                        | libc::ECONNABORTED
                        | libc::ENOTCONN
                        | libc::EAGAIN
                )
            ),
            ClientError::Disconnected | ClientError::StaleRing { .. } => true,
            ClientError::Io { source, .. } => matches!(
                source.kind(),
                std::io::ErrorKind::BrokenPipe
                    | std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::ConnectionAborted
                    | std::io::ErrorKind::UnexpectedEof
            ),
            // `duplicate`: the daemon has not yet noticed our previous connection died.
            ClientError::Refused { code, .. } => [Code::Busy, Code::Duplicate]
                .iter()
                .any(|c| c == &code.as_str()),
            ClientError::Daemon { code, .. } => [Code::Shutdown, Code::Busy]
                .iter()
                .any(|c| c == &code.as_str()),
            _ => false,
        }
    }
}

pub(crate) fn io_err(what: &'static str) -> impl FnOnce(std::io::Error) -> ClientError {
    move |source| ClientError::Io { what, source }
}
