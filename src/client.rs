//! A blocking Rust client of the daemon (docs/PROTOCOL.md): what `millrace consume`,
//! `millrace demo` and `millrace bench` use when they stand in for a trainer rank.
//!
//! One [`Client`] is one trainer rank's connection: it sends HELLO over the unix socket,
//! receives WELCOME with `[ring_fd, ready_fd]` (SCM_RIGHTS), maps the ring read-only and
//! then hands out [`BatchView`]s that borrow the mapped slot, waiting on the eventfd and
//! the socket with `poll`. Everything read from the socket or the ring is bounds-checked
//! against the sizes WELCOME announced and the memfd really has, so a malformed WELCOME
//! or ring is an error, never a panic or a fault.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use crate::corpus::{DType, Tokens};
use crate::wire::{self, Code};

// The wire and ring constants are the daemon's own, so the two sides cannot drift.
pub use crate::serve::ring::monotonic_ns;
use crate::wire::ring::{ring_at, slot_at};
pub use crate::wire::ring::{
    LAYOUT_VERSION as RING_VERSION, MAGIC as RING_MAGIC, SLOT_HEADER as SLOT_HEADER_BYTES,
};
/// Offset of `published` in the ring header (the wire's own).
pub const PUBLISHED_OFFSET: usize = ring_at::PUBLISHED;
pub use crate::wire::{
    decode_hex as from_hex, to_hex, FieldSpec, Hello, Welcome, MAX_FRAME as MAX_FRAME_LEN,
    VERSION as PROTOCOL,
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
    #[error("cannot connect to {path}: {}", crate::ctl::connect_reason(error))]
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
}

impl ClientError {
    /// True when reconnecting later may succeed (the daemon is restarting or busy).
    pub fn is_transient(&self) -> bool {
        match self {
            ClientError::Connect { .. } | ClientError::Disconnected => true,
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

fn io_err(what: &'static str) -> impl FnOnce(std::io::Error) -> ClientError {
    move |source| ClientError::Io { what, source }
}

/// A validated array location: byte offset in the slot, dtype and element count.
#[derive(Debug, Clone, Copy)]
struct Field {
    offset: usize,
    dtype: DType,
    len: usize,
}

impl Field {
    fn bytes(&self) -> usize {
        self.len * self.dtype.size()
    }
}

/// WELCOME turned into checked numbers.
#[derive(Debug, Clone)]
struct Layout {
    slots: u64,
    slot_offset: usize,
    slot_bytes: usize,
    ring_bytes: usize,
    rows: usize,
    seq_len: usize,
    tokens: Field,
    labels: Field,
    loss_mask: Field,
    position_ids: Field,
    cu_seqlens: Field,
    domain: Field,
    row_loss_tokens: Field,
    cursor: Field,
}

fn usize_of(v: u64, what: &str) -> Result<usize, ClientError> {
    usize::try_from(v).map_err(|_| ClientError::Protocol(format!("{what} {v} does not fit")))
}

impl Layout {
    fn from_welcome(w: &Welcome) -> Result<Layout, ClientError> {
        let bad = |m: String| ClientError::Protocol(format!("WELCOME: {m}"));
        if w.protocol != PROTOCOL {
            return Err(bad(format!(
                "protocol {} (this client speaks {PROTOCOL})",
                w.protocol
            )));
        }
        if w.slots == 0 {
            return Err(bad("slots is 0".into()));
        }
        if w.rows == 0 || w.seq_len == 0 {
            return Err(bad(format!("rows {} seq_len {}", w.rows, w.seq_len)));
        }
        let slot_offset = usize_of(w.slot_offset, "slot_offset")?;
        let slot_bytes = usize_of(w.slot_bytes, "slot_bytes")?;
        let ring_bytes = usize_of(w.ring_bytes, "ring_bytes")?;
        if slot_offset < PUBLISHED_OFFSET + 8 || slot_offset % 8 != 0 {
            return Err(bad(format!(
                "slot_offset {slot_offset} overlaps the ring header or is unaligned"
            )));
        }
        if slot_bytes < SLOT_HEADER_BYTES || slot_bytes % 8 != 0 {
            return Err(bad(format!(
                "slot_bytes {slot_bytes} is too small or unaligned"
            )));
        }
        let end = (w.slots as usize)
            .checked_mul(slot_bytes)
            .and_then(|s| s.checked_add(slot_offset));
        if end.is_none_or(|e| e > ring_bytes) {
            return Err(bad(format!(
                "{} slots of {slot_bytes} bytes at {slot_offset} do not fit ring_bytes {ring_bytes}",
                w.slots
            )));
        }
        let rows = w.rows as usize;
        let seq_len = w.seq_len as usize;
        let cells = rows
            .checked_mul(seq_len)
            .ok_or_else(|| bad("rows * seq_len overflows".into()))?;
        let field = |name: &str, want_len: Option<usize>, dtypes: &[DType]| {
            let f = w
                .fields
                .get(name)
                .ok_or_else(|| bad(format!("no field {name:?}")))?;
            let dtype = DType::from_name(&f.dtype)
                .ok_or_else(|| bad(format!("field {name}: unknown dtype {:?}", f.dtype)))?;
            if !dtypes.is_empty() && !dtypes.contains(&dtype) {
                return Err(bad(format!("field {name}: dtype {dtype} is not expected")));
            }
            let mut len = 1usize;
            for &d in &f.shape {
                len = len
                    .checked_mul(usize_of(d, "shape")?)
                    .ok_or_else(|| bad(format!("field {name}: shape overflows")))?;
            }
            if let Some(want) = want_len {
                if len != want {
                    return Err(bad(format!(
                        "field {name}: shape {:?} holds {len} elements, expected {want}",
                        f.shape
                    )));
                }
            }
            let offset = usize_of(f.offset, "offset")?;
            let bytes = len
                .checked_mul(dtype.size())
                .ok_or_else(|| bad(format!("field {name}: size overflows")))?;
            if offset < SLOT_HEADER_BYTES
                || offset % dtype.size() != 0
                || offset.checked_add(bytes).is_none_or(|e| e > slot_bytes)
            {
                return Err(bad(format!(
                    "field {name}: {bytes} bytes at offset {offset} do not fit a {slot_bytes}-byte slot after its {SLOT_HEADER_BYTES}-byte header (or are unaligned)"
                )));
            }
            Ok(Field { offset, dtype, len })
        };
        use DType::*;
        let ints = [Uint8, Int8, Int16, Uint16, Int32, Uint32, Int64];
        let layout = Layout {
            slots: u64::from(w.slots),
            slot_offset,
            slot_bytes,
            ring_bytes,
            rows,
            seq_len,
            tokens: field("tokens", Some(cells), &ints)?,
            labels: field("labels", Some(cells), &ints)?,
            loss_mask: field("loss_mask", Some(cells), &[Uint8])?,
            position_ids: field("position_ids", Some(cells), &ints)?,
            cu_seqlens: field("cu_seqlens", None, &[Int32])?,
            domain: field("domain", Some(rows), &[Int32])?,
            row_loss_tokens: field("row_loss_tokens", Some(rows), &[Int32])?,
            cursor: field("cursor", None, &[Uint8])?,
        };
        if layout.cu_seqlens.len == 0 {
            return Err(bad("cu_seqlens has no room".into()));
        }
        Ok(layout)
    }
}

/// A read-only shared mapping of the ring memfd, unmapped on drop.
struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain process memory; nothing in it is tied to a thread.
unsafe impl Send for Mapping {}

impl Mapping {
    fn new(fd: &OwnedFd, len: usize) -> Result<Mapping, ClientError> {
        // A mapping longer than the file faults (SIGBUS) when touched: check the size.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: fstat writes into `st`, which is a valid stat buffer.
        if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
            return Err(io_err("fstat of the ring fd")(
                std::io::Error::last_os_error(),
            ));
        }
        if (st.st_size as u64) < len as u64 {
            return Err(ClientError::Ring(format!(
                "the ring memfd holds {} bytes but WELCOME says ring_bytes {len}",
                st.st_size
            )));
        }
        if len == 0 {
            return Err(ClientError::Ring("ring_bytes is 0".into()));
        }
        // SAFETY: a fresh read-only shared mapping of a file we own an fd of; the kernel
        // picks the address, and the length was checked against the file's size.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io_err("mmap of the ring")(std::io::Error::last_os_error()));
        }
        let ptr = NonNull::new(p.cast::<u8>())
            .ok_or_else(|| ClientError::Ring("mmap returned a null mapping".into()))?;
        Ok(Mapping { ptr, len })
    }

    /// `len` bytes at `off`; the caller has checked `off + len <= self.len`.
    fn bytes(&self, off: usize, len: usize) -> &[u8] {
        debug_assert!(off + len <= self.len);
        // SAFETY: in bounds (checked by the validated layout) and mapped for our lifetime.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().add(off), len) }
    }

    fn u32_at(&self, off: usize) -> u32 {
        let mut b = [0u8; 4];
        b.copy_from_slice(self.bytes(off, 4));
        u32::from_le_bytes(b)
    }

    fn u64_at(&self, off: usize) -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(self.bytes(off, 8));
        u64::from_le_bytes(b)
    }

    /// `published`, read with acquire ordering so the slot it covers is visible.
    fn published(&self) -> u64 {
        // SAFETY: offset 64 is inside the mapping (slot_offset > 72 was checked) and
        // 8-aligned (mappings are page-aligned); the daemon writes it atomically.
        let a = unsafe { &*(self.ptr.as_ptr().add(PUBLISHED_OFFSET) as *const AtomicU64) };
        u64::from_le(a.load(Ordering::Acquire))
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what `new` mapped; no borrow outlives `self`.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

/// Writes one frame.
fn send_frame(sock: &mut UnixStream, kind: u8, payload: &[u8]) -> Result<(), ClientError> {
    let buf = wire::frame::encode_checked(kind, payload)
        .map_err(|e| ClientError::Usage(format!("cannot send frame type {kind}: {e}")))?;
    sock.write_all(&buf).map_err(|e| match e.kind() {
        std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset => {
            ClientError::Disconnected
        }
        _ => ClientError::Io {
            what: "sending a frame",
            source: e,
        },
    })
}

/// Reads one whole frame with `recvmsg`; returns (type, payload, fds that came with it).
fn recv_frame(sock: &UnixStream) -> Result<(u8, Vec<u8>, Vec<OwnedFd>), ClientError> {
    let fd = sock.as_raw_fd();
    let mut fds = Vec::new();
    let fill = |buf: &mut [u8], _inside: bool| -> Result<(), ClientError> {
        let mut have = 0;
        while have < buf.len() {
            match wire::frame::recv_with_fds(fd, &mut buf[have..], &mut fds) {
                Ok(0) => return Err(ClientError::Disconnected),
                Ok(n) => have += n,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(ClientError::Timeout(
                        "waiting for a frame from the daemon".into(),
                    ))
                }
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                    return Err(ClientError::Disconnected)
                }
                Err(e) => {
                    return Err(ClientError::Io {
                        what: "receiving a frame",
                        source: e,
                    })
                }
            }
        }
        Ok(())
    };
    let (kind, payload) = wire::frame::read_with(fill, |e| ClientError::Protocol(e.to_string()))?;
    Ok((kind, payload, fds))
}

fn code_message(payload: &[u8], what: &str) -> Result<(String, String), ClientError> {
    wire::Reason::decode(payload)
        .map(|r| (r.code, r.message))
        .map_err(|e| ClientError::Protocol(format!("{what} payload is not {{code, message}}: {e}")))
}

/// The connection of one trainer rank: socket, eventfd and the mapped ring.
pub struct Client {
    path: PathBuf,
    hello: Hello,
    welcome: Welcome,
    layout: Layout,
    sock: UnixStream,
    ready: OwnedFd,
    ring: Mapping,
    /// Next step to hand out.
    consumed: u64,
    /// Every step below this has been released.
    released: u64,
    hold: u64,
    timeout: Option<Duration>,
    last_step: Option<u64>,
    last_cursor: Vec<u8>,
}

/// How long [`Client::connect`] waits out a `duplicate` refusal: a process restarted
/// right after its predecessor died (or a test that drops a client and reconnects) can
/// reach the daemon before it has seen the old connection close. Same as the Python
/// client's `_DUPLICATE_GRACE`.
pub const DUPLICATE_GRACE: Duration = Duration::from_secs(3);

impl Client {
    /// Connects to the daemon at `socket`, sends `hello`, maps the ring of WELCOME. A
    /// `duplicate` refusal is retried every 20 ms for [`DUPLICATE_GRACE`].
    pub fn connect(socket: impl AsRef<Path>, hello: &Hello) -> Result<Client, ClientError> {
        let deadline = Instant::now() + DUPLICATE_GRACE;
        loop {
            match Client::connect_once(socket.as_ref(), hello) {
                Err(ClientError::Refused { code, .. })
                    if code == "duplicate" && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
                r => return r,
            }
        }
    }

    /// One connection attempt: HELLO, then WELCOME (mapping the ring) or the refusal.
    fn connect_once(socket: &Path, hello: &Hello) -> Result<Client, ClientError> {
        let path = socket.to_path_buf();
        let mut sock = UnixStream::connect(&path).map_err(|error| ClientError::Connect {
            path: path.clone(),
            error,
        })?;
        sock.set_read_timeout(Some(HANDSHAKE_TIMEOUT))
            .map_err(io_err("setting the socket timeout"))?;
        let payload = serde_json::to_vec(hello)
            .map_err(|e| ClientError::Usage(format!("HELLO does not serialize: {e}")))?;
        match send_frame(&mut sock, frame::HELLO, &payload) {
            // The daemon may have refused the connection (access control) and closed
            // before reading HELLO: its REFUSED frame is still queued, so read it.
            Ok(()) | Err(ClientError::Disconnected) => {}
            Err(e) => return Err(e),
        }
        let (kind, payload, mut fds) = recv_frame(&sock)?;
        match kind {
            frame::WELCOME => {}
            frame::REFUSED => {
                let (code, message) = code_message(&payload, "REFUSED")?;
                return Err(ClientError::Refused { code, message });
            }
            frame::ERROR => {
                let (code, message) = code_message(&payload, "ERROR")?;
                return Err(ClientError::Daemon { code, message });
            }
            k => {
                return Err(ClientError::Protocol(format!(
                    "expected WELCOME, REFUSED or ERROR, got frame type {k}"
                )))
            }
        }
        let welcome: Welcome = serde_json::from_slice(&payload)
            .map_err(|e| ClientError::Protocol(format!("WELCOME is not valid: {e}")))?;
        if fds.len() != 2 {
            return Err(ClientError::Protocol(format!(
                "WELCOME came with {} file descriptors, expected 2 [ring_fd, ready_fd]",
                fds.len()
            )));
        }
        let ready = fds.pop().ok_or(ClientError::Disconnected)?;
        let ring_fd = fds.pop().ok_or(ClientError::Disconnected)?;
        let layout = Layout::from_welcome(&welcome)?;
        let ring = Mapping::new(&ring_fd, layout.ring_bytes)?;
        drop(ring_fd); // the mapping keeps the memfd alive
        check_ring_header(&ring, &layout)?;
        sock.set_read_timeout(Some(Duration::from_secs(5)))
            .map_err(io_err("setting the socket timeout"))?;
        let start = welcome.start_step;
        Ok(Client {
            path,
            hello: hello.clone(),
            welcome,
            layout,
            sock,
            ready,
            ring,
            consumed: start,
            released: start,
            hold: 0,
            timeout: None,
            last_step: None,
            last_cursor: Vec::new(),
        })
    }

    /// What the daemon announced.
    pub fn welcome(&self) -> &Welcome {
        &self.welcome
    }

    /// The HELLO this client sent (reconnects send it again with a cursor).
    pub fn hello(&self) -> &Hello {
        &self.hello
    }

    /// The next step [`Client::next_batch`] will return.
    pub fn next_step(&self) -> u64 {
        self.consumed
    }

    /// The last step handed out, if any.
    pub fn last_step(&self) -> Option<u64> {
        self.last_step
    }

    /// Cursor blob as of the end of the last step handed out: what a checkpoint saves
    /// and what [`Client::reconnect`] resumes from.
    pub fn last_cursor(&self) -> Option<&[u8]> {
        self.last_step.map(|_| self.last_cursor.as_slice())
    }

    /// Keep the last `n` batches unreleased when the next one is requested (for a
    /// trainer whose GPU copies finish later); 0 releases each batch on the next call.
    pub fn set_hold(&mut self, n: u64) {
        self.hold = n.min(self.layout.slots.saturating_sub(1));
    }

    /// How long [`Client::next_batch`] may wait for one batch (`None`: forever).
    pub fn set_timeout(&mut self, t: Option<Duration>) {
        self.timeout = t;
    }

    /// Tells the daemon every step below `upto` is done with (cumulative).
    pub fn release(&mut self, upto: u64) -> Result<(), ClientError> {
        if upto <= self.released {
            return Ok(());
        }
        if upto > self.consumed {
            return Err(ClientError::Usage(format!(
                "release({upto}) passes the steps received (next step {})",
                self.consumed
            )));
        }
        self.send(frame::RELEASE, &upto.to_le_bytes())?;
        self.released = upto;
        Ok(())
    }

    /// Sends a frame; when the daemon has closed the connection, reports the ERROR
    /// frame it left behind (if any) rather than a bare broken pipe.
    fn send(&mut self, kind: u8, payload: &[u8]) -> Result<(), ClientError> {
        match send_frame(&mut self.sock, kind, payload) {
            Err(ClientError::Disconnected) => Err(self.socket_event()),
            r => r,
        }
    }

    /// Sends any frame as is, bypassing this client's checks: for tests of how the
    /// daemon handles protocol violations (a decreasing RELEASE, say).
    pub fn send_frame_unchecked(&mut self, kind: u8, payload: &[u8]) -> Result<(), ClientError> {
        send_frame(&mut self.sock, kind, payload)
    }

    /// Says goodbye (the daemon frees this client's hold on the ring).
    pub fn bye(mut self) -> Result<(), ClientError> {
        send_frame(&mut self.sock, frame::BYE, &[])
    }

    /// The daemon's event on the socket: an ERROR frame or the connection gone.
    fn socket_event(&mut self) -> ClientError {
        match recv_frame(&self.sock) {
            Ok((frame::ERROR, payload, _)) => match code_message(&payload, "ERROR") {
                Ok((code, message)) => ClientError::Daemon { code, message },
                Err(e) => e,
            },
            Ok((k, _, _)) => {
                ClientError::Protocol(format!("unexpected frame type {k} while streaming"))
            }
            Err(e) => e,
        }
    }

    /// Waits until step `consumed` is published; returns whether it had to wait.
    fn wait_published(&mut self) -> Result<bool, ClientError> {
        let deadline = self.timeout.map(|t| Instant::now() + t);
        let mut waited = false;
        loop {
            if self.ring.published() > self.consumed {
                return Ok(waited);
            }
            waited = true;
            let ms = match deadline {
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(ClientError::Timeout(format!(
                            "step {} was not published within {:?}",
                            self.consumed,
                            self.timeout.unwrap_or_default()
                        )));
                    }
                    left.as_millis().clamp(1, 1000) as libc::c_int
                }
                None => 1000,
            };
            let mut p = [
                libc::pollfd {
                    fd: self.ready.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: self.sock.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: two valid pollfds.
            let r = unsafe { libc::poll(p.as_mut_ptr(), 2, ms) };
            if r < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(io_err("poll")(e));
            }
            if p[1].revents != 0 {
                return Err(self.socket_event());
            }
            if p[0].revents & libc::POLLIN != 0 {
                let mut b = [0u8; 8];
                // SAFETY: reads 8 bytes into `b`; the eventfd is readable so it won't block.
                let n = unsafe { libc::read(self.ready.as_raw_fd(), b.as_mut_ptr().cast(), 8) };
                if n < 0 {
                    let e = std::io::Error::last_os_error();
                    if !matches!(
                        e.kind(),
                        std::io::ErrorKind::Interrupted | std::io::ErrorKind::WouldBlock
                    ) {
                        return Err(io_err("reading the ready eventfd")(e));
                    }
                }
            } else if p[0].revents != 0 {
                return Err(ClientError::Protocol(format!(
                    "ready_fd reports poll events {:#x}",
                    p[0].revents
                )));
            }
        }
    }

    /// Waits for the next step and returns views of its slot. Batches handed out
    /// earlier are released first, except the last [`Client::set_hold`] ones.
    ///
    /// RELEASE frames are batched: while the next step is already published, finished
    /// steps are released only once `(slots - hold) / 2` of them have piled up, so the
    /// daemon wakes once per few steps instead of every step; before waiting, everything
    /// finished is released, so a slow producer is never starved by a lazy consumer.
    pub fn next_batch(&mut self) -> Result<BatchView<'_>, ClientError> {
        let upto = self.consumed.saturating_sub(self.hold);
        let batch = (self.layout.slots.saturating_sub(self.hold) / 2).max(1);
        if upto >= self.released + batch || self.ring.published() <= self.consumed {
            self.release(upto)?;
        }
        let waited = self.wait_published()?;
        let wake_ns = monotonic_ns();
        let step = self.consumed;
        let l = &self.layout;
        let base = l.slot_offset + ((step % l.slots) as usize) * l.slot_bytes;
        let r = &self.ring;
        let slot_step = r.u64_at(base + slot_at::STEP);
        if slot_step != step {
            return Err(ClientError::Ring(format!(
                "slot {} holds step {slot_step}, expected {step}",
                step % l.slots
            )));
        }
        let rows = r.u32_at(base + slot_at::ROWS) as usize;
        let seq_len = r.u32_at(base + slot_at::SEQ_LEN) as usize;
        if rows != l.rows || seq_len != l.seq_len {
            return Err(ClientError::Ring(format!(
                "step {step}: slot says {rows} rows of {seq_len}, WELCOME {} of {}",
                l.rows, l.seq_len
            )));
        }
        let cu_len = r.u32_at(base + slot_at::CU_LEN) as usize;
        if cu_len == 0 || cu_len > l.cu_seqlens.len {
            return Err(ClientError::Ring(format!(
                "step {step}: cu_len {cu_len} outside 1..={}",
                l.cu_seqlens.len
            )));
        }
        let cursor_len = r.u32_at(base + slot_at::CURSOR_LEN) as usize;
        if cursor_len > l.cursor.len {
            return Err(ClientError::Ring(format!(
                "step {step}: cursor_len {cursor_len} exceeds the field's {} bytes",
                l.cursor.len
            )));
        }
        let publish_ns = r.u64_at(base + slot_at::PUBLISH_NS);
        let at = |f: &Field| r.bytes(base + f.offset, f.bytes());
        let tokens_of = |f: &Field| {
            Tokens::from_bytes(f.dtype, at(f))
                .ok_or_else(|| ClientError::Ring(format!("step {step}: misaligned array")))
        };
        let i32s = |f: &Field| {
            bytemuck::try_cast_slice::<u8, i32>(at(f))
                .map_err(|e| ClientError::Ring(format!("step {step}: int32 array: {e}")))
        };
        let cursor = &at(&l.cursor)[..cursor_len];
        self.last_cursor.clear();
        self.last_cursor.extend_from_slice(cursor);
        let view = BatchView {
            step,
            plan_step: r.u64_at(base + slot_at::PLAN_STEP),
            rows: rows as u32,
            seq_len: seq_len as u32,
            cu_len: cu_len as u32,
            max_seqlen: r.u32_at(base + slot_at::MAX_SEQLEN),
            loss_tokens: r.u64_at(base + slot_at::LOSS_TOKENS),
            real_tokens: r.u64_at(base + slot_at::REAL_TOKENS),
            publish_ns,
            wake_latency_ns: waited.then(|| wake_ns.saturating_sub(publish_ns)),
            pad_token: self.welcome.pad_token,
            tokens: tokens_of(&l.tokens)?,
            labels: tokens_of(&l.labels)?,
            loss_mask: at(&l.loss_mask),
            position_ids: tokens_of(&l.position_ids)?,
            cu_seqlens: &i32s(&l.cu_seqlens)?[..cu_len],
            domain: i32s(&l.domain)?,
            row_loss_tokens: i32s(&l.row_loss_tokens)?,
            cursor,
        };
        self.last_step = Some(step);
        self.consumed = step + 1;
        Ok(view)
    }

    /// Reconnects after the daemon went away, resuming after the last step handed out
    /// (or where this client started, if none was), retrying until `timeout`.
    pub fn reconnect(&mut self, timeout: Duration) -> Result<(), ClientError> {
        let mut hello = self.hello.clone();
        if self.last_step.is_some() {
            hello.cursor = Some(to_hex(&self.last_cursor));
            hello.start_step = None;
        }
        let deadline = Instant::now() + timeout;
        let mut fresh = loop {
            match Client::connect(&self.path, &hello) {
                Ok(c) => break c,
                Err(e) if e.is_transient() && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => return Err(e),
            }
        };
        if fresh.welcome.start_step != self.consumed {
            return Err(ClientError::Protocol(format!(
                "reconnected at step {} but the next step is {}",
                fresh.welcome.start_step, self.consumed
            )));
        }
        fresh.hold = self.hold;
        fresh.timeout = self.timeout;
        fresh.last_step = self.last_step;
        fresh.last_cursor = std::mem::take(&mut self.last_cursor);
        fresh.hello = self.hello.clone();
        *self = fresh;
        Ok(())
    }
}

fn check_ring_header(ring: &Mapping, l: &Layout) -> Result<(), ClientError> {
    let magic = ring.bytes(ring_at::MAGIC, RING_MAGIC.len());
    if magic != RING_MAGIC {
        return Err(ClientError::Ring(format!(
            "magic {magic:02x?}, expected {RING_MAGIC:?}"
        )));
    }
    let version = ring.u32_at(ring_at::VERSION);
    let slots = ring.u32_at(ring_at::SLOTS);
    let slot_bytes = ring.u64_at(ring_at::SLOT_BYTES);
    let slot_offset = ring.u64_at(ring_at::SLOT_OFFSET);
    if version != RING_VERSION
        || u64::from(slots) != l.slots
        || slot_bytes != l.slot_bytes as u64
        || slot_offset != l.slot_offset as u64
    {
        return Err(ClientError::Ring(format!(
            "ring header (version {version}, {slots} slots of {slot_bytes} at {slot_offset}) \
             disagrees with WELCOME ({} slots of {} at {})",
            l.slots, l.slot_bytes, l.slot_offset
        )));
    }
    Ok(())
}

/// One step's data, borrowed from the mapped slot until the next call on the client.
#[derive(Debug, Clone, Copy)]
pub struct BatchView<'a> {
    /// Trainer step.
    pub step: u64,
    /// The unskipped plan step.
    pub plan_step: u64,
    /// Rows.
    pub rows: u32,
    /// Inputs per row.
    pub seq_len: u32,
    /// Entries of `cu_seqlens` in use.
    pub cu_len: u32,
    /// Longest span of `cu_seqlens`.
    pub max_seqlen: u32,
    /// Ones in `loss_mask`.
    pub loss_tokens: u64,
    /// Non-padding tokens over the rows (each row holds `seq_len + 1`).
    pub real_tokens: u64,
    /// `CLOCK_MONOTONIC` ns when the daemon published the slot.
    pub publish_ns: u64,
    /// Publish-to-wake latency, when the client had to wait for this step.
    pub wake_latency_ns: Option<u64>,
    /// The padding id from WELCOME, for [`BatchView::row_real_tokens`].
    pub pad_token: i64,
    /// `[rows, seq_len]` inputs.
    pub tokens: Tokens<'a>,
    /// `[rows, seq_len]` next tokens.
    pub labels: Tokens<'a>,
    /// `[rows, seq_len]` 0/1.
    pub loss_mask: &'a [u8],
    /// `[rows, seq_len]` positions within document pieces.
    pub position_ids: Tokens<'a>,
    /// The `cu_len` entries in use.
    pub cu_seqlens: &'a [i32],
    /// Domain index per row.
    pub domain: &'a [i32],
    /// Loss tokens per row.
    pub row_loss_tokens: &'a [i32],
    /// The cursor blob as of the end of this step.
    pub cursor: &'a [u8],
}

impl BatchView<'_> {
    /// Bytes of tokens + labels + loss_mask + position_ids: what a trainer copies.
    pub fn payload_bytes(&self) -> u64 {
        (self.tokens.as_bytes().len()
            + self.labels.as_bytes().len()
            + self.loss_mask.len()
            + self.position_ids.as_bytes().len()) as u64
    }

    /// Real (non-padding) tokens of row `r`, out of `seq_len + 1`: the trailing run of
    /// padding is found from the end (padding holds `pad_token` and no loss flows into
    /// it), so only a one-token document piece equal to `pad_token` would be miscounted.
    pub fn row_real_tokens(&self, r: usize) -> u32 {
        let n = self.seq_len as usize;
        if r >= self.rows as usize {
            return 0;
        }
        let base = r * n;
        // t[j] for j in 0..=n: tokens[base + j] for j < n, labels[base + n - 1] for j == n.
        let t = |j: usize| {
            if j < n {
                self.tokens.get_i64(base + j)
            } else {
                self.labels.get_i64(base + n - 1)
            }
        };
        let mut real = n + 1;
        while real > 0 {
            let j = real - 1;
            let is_pad = t(j) == Some(self.pad_token)
                && (j == 0 || self.loss_mask.get(base + j - 1).copied() == Some(0));
            if !is_pad {
                break;
            }
            real -= 1;
        }
        real as u32
    }
}

/// Arguments of `millrace consume`.
#[derive(clap::Args, Debug, Clone)]
pub struct ConsumeArgs {
    /// The daemon's socket [default: --config's `[serve] socket`, else the daemon's
    /// default, as for `status`, `ctl` and `top`].
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// Data-parallel rank.
    #[arg(long)]
    pub dp_rank: u32,
    /// Data-parallel size.
    #[arg(long)]
    pub dp_size: u32,
    /// Job name.
    #[arg(long, default_value = "default")]
    pub job: String,
    /// This client's name among its dp rank's peers.
    #[arg(long, default_value = "0")]
    pub replica: String,
    /// Peers of this dp rank on this node.
    #[arg(long, default_value_t = 1)]
    pub replicas: u32,
    /// Rows per micro-batch (default: global_batch_rows / dp_size / micro_batches from
    /// --config, or without --config the daemon's default, the whole slice).
    #[arg(long)]
    pub micro_batch_rows: Option<u32>,
    /// Micro-batches per step.
    #[arg(long, default_value_t = 1)]
    pub micro_batches: u32,
    /// The run's config: its `[serve] socket` (without --socket) and --micro-batch-rows.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Steps to read.
    #[arg(long, default_value_t = 100)]
    pub steps: u64,
    /// Resume from the cursor in this file (hex text, or the raw blob).
    #[arg(long)]
    pub cursor_file: Option<PathBuf>,
    /// Seek to this step (without a cursor).
    #[arg(long)]
    pub start_step: Option<u64>,
    /// Refuse unless the daemon's plan fingerprint is this.
    #[arg(long)]
    pub fingerprint: Option<String>,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
    /// Write the last step's cursor (hex) here at the end.
    #[arg(long)]
    pub save_cursor: Option<PathBuf>,
    /// When the daemon goes away, reconnect with the last cursor for up to SECS.
    #[arg(long, value_name = "SECS", default_value_t = 0.0)]
    pub reconnect_timeout: f64,
    /// Also read labels, loss_mask and position_ids (every payload byte), as a
    /// trainer's host-to-device copy would.
    #[arg(long)]
    pub touch: bool,
    /// Batches kept unreleased while the next is read.
    #[arg(long, default_value_t = 0)]
    pub hold: u64,
    /// Give up when one batch takes longer than SECS.
    #[arg(long, value_name = "SECS", default_value_t = 120.0)]
    pub timeout: f64,
    /// Print `{"progress": STEPS}` lines on stderr a few times a second (for `bench`).
    #[arg(long, hide = true)]
    pub progress: bool,
}

/// Percentiles of publish-to-wake latency.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Latency {
    /// Batches the client had to wait for (the others were already published).
    pub samples: u64,
    /// Median, microseconds.
    pub p50_us: f64,
    /// 99th percentile, microseconds.
    pub p99_us: f64,
    /// Maximum, microseconds.
    pub max_us: f64,
}

impl Latency {
    /// Summarizes nanosecond samples (sorted in place).
    pub fn from_ns(v: &mut [u64]) -> Latency {
        if v.is_empty() {
            return Latency::default();
        }
        v.sort_unstable();
        let q = |p: f64| {
            let i = ((p * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1;
            v[i] as f64 / 1e3
        };
        Latency {
            samples: v.len() as u64,
            p50_us: q(0.5),
            p99_us: q(0.99),
            max_us: v[v.len() - 1] as f64 / 1e3,
        }
    }
}

/// Seconds from the first consumer's first batch to the last consumer's last: the
/// wall-clock span that throughput over several consumer processes is measured on.
pub fn span_seconds(summaries: &[ConsumeSummary]) -> f64 {
    let first = summaries
        .iter()
        .map(|s| s.first_batch_ns)
        .min()
        .unwrap_or(0);
    let last = summaries.iter().map(|s| s.last_batch_ns).max().unwrap_or(0);
    last.saturating_sub(first) as f64 / 1e9
}

/// What `millrace consume --json` prints; demo and bench read it back (missing fields
/// default, so the Python consumer of `millrace demo` may print a subset).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct ConsumeSummary {
    /// dp rank.
    pub dp_rank: u32,
    /// Plan fingerprint.
    pub fingerprint: String,
    /// First step received.
    pub first_step: u64,
    /// Last step received.
    pub last_step: u64,
    /// Steps received.
    pub steps: u64,
    /// Input positions received (rows * seq_len per step).
    pub tokens: u64,
    /// Non-padding tokens (each row holds seq_len + 1).
    pub real_tokens: u64,
    /// Loss tokens.
    pub loss_tokens: u64,
    /// Bytes of tokens + labels + loss_mask + position_ids received.
    pub payload_bytes: u64,
    /// Seconds from the first batch to the last.
    pub seconds: f64,
    /// Tokens per second over that span (the first batch excluded).
    pub tokens_per_s: f64,
    /// `CLOCK_MONOTONIC` ns at the first batch, to combine several consumers.
    pub first_batch_ns: u64,
    /// `CLOCK_MONOTONIC` ns at the last batch.
    pub last_batch_ns: u64,
    /// Publish-to-wake latency.
    pub wake_latency: Latency,
    /// Raw latency samples in ns, so several consumers' percentiles can be pooled.
    #[serde(default)]
    pub wake_latency_ns: Vec<u64>,
    /// Wrapping sum of every value read (tokens, and with --touch every array).
    pub checksum: i64,
    /// xxh3-64 of all token bytes, in step order.
    pub digest: String,
    /// Real tokens per domain name (for the realized mixture).
    pub domain_tokens: BTreeMap<String, u64>,
    /// Reconnects after the daemon went away.
    pub reconnects: u64,
    /// This consumer process's utime + stime at the end (getrusage).
    pub cpu_seconds: f64,
}

fn sum_tokens(t: &Tokens<'_>) -> i64 {
    fn s<T: Copy + Into<i64>>(v: &[T]) -> i64 {
        v.iter().fold(0i64, |a, &x| a.wrapping_add(x.into()))
    }
    match *t {
        Tokens::Uint8(v) => s(v),
        Tokens::Int8(v) => s(v),
        Tokens::Int16(v) => s(v),
        Tokens::Int32(v) => s(v),
        Tokens::Int64(v) => s(v),
        Tokens::Uint16(v) => s(v),
        Tokens::Uint32(v) => s(v),
        Tokens::Float32(v) => v.iter().fold(0i64, |a, &x| a.wrapping_add(x as i64)),
        Tokens::Float64(v) => v.iter().fold(0i64, |a, &x| a.wrapping_add(x as i64)),
    }
}

/// utime + stime of this process so far, in seconds.
pub fn process_cpu_seconds() -> f64 {
    // SAFETY: a zeroed rusage is valid and getrusage only writes into it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a valid rusage buffer.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return 0.0;
    }
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(ru.ru_utime) + t(ru.ru_stime)
}

/// Reads a cursor file: hex text, or the raw blob.
pub fn read_cursor_file(path: &Path) -> anyhow::Result<String> {
    let bytes =
        std::fs::read(path).with_context(|| format!("reading cursor file {}", path.display()))?;
    if let Ok(text) = std::str::from_utf8(&bytes) {
        let t = text.trim();
        if !t.is_empty() && from_hex(t).is_some() {
            return Ok(t.to_ascii_lowercase());
        }
    }
    Ok(to_hex(&bytes))
}

/// The socket `consume` connects to: `--socket`, else the config's, else the default.
fn consume_socket(args: &ConsumeArgs) -> anyhow::Result<PathBuf> {
    if let Some(s) = &args.socket {
        return Ok(s.clone());
    }
    if let Some(path) = &args.config {
        let cfg = crate::config::Config::load(path)?;
        return Ok(crate::config::serve::ServeConfig::from_config(&cfg)?.socket);
    }
    Ok(crate::config::serve::default_socket())
}

/// Streams `args.steps` steps as one trainer rank and summarizes them.
pub fn consume(args: &ConsumeArgs) -> anyhow::Result<ConsumeSummary> {
    let micro_batch_rows = match (args.micro_batch_rows, &args.config) {
        (Some(m), _) => Some(m),
        (None, Some(cfg)) => {
            let plan = crate::config::Config::load(cfg)?.plan_config()?;
            let per_rank = plan.global_batch_rows / args.dp_size.max(1);
            Some(per_rank / args.micro_batches.max(1))
        }
        (None, None) => None,
    };
    let mut hello = Hello::whole_slice(args.dp_rank, args.dp_size);
    hello.micro_batch_rows = micro_batch_rows;
    hello.micro_batches = args.micro_batches;
    hello.job = args.job.clone();
    hello.replica = args.replica.clone();
    hello.replicas = args.replicas;
    hello.start_step = args.start_step;
    hello.fingerprint = args.fingerprint.clone();
    if let Some(f) = &args.cursor_file {
        hello.cursor = Some(read_cursor_file(f)?);
    }
    let socket = consume_socket(args)?;
    // The error names the socket itself.
    let mut client = Client::connect(&socket, &hello)?;
    client.set_hold(args.hold);
    if args.timeout > 0.0 {
        client.set_timeout(Some(Duration::from_secs_f64(args.timeout)));
    }
    let domains = client.welcome().domains.clone();
    let mut s = ConsumeSummary {
        dp_rank: args.dp_rank,
        fingerprint: client.welcome().fingerprint.clone(),
        first_step: client.next_step(),
        ..ConsumeSummary::default()
    };
    let mut digest = xxhash_rust::xxh3::Xxh3::new();
    let mut domain_tokens = vec![0u64; domains.len()];
    let mut first_tokens = 0u64;
    let mut received = 0u64;
    let mut last_progress = 0u64;
    while received < args.steps {
        let b = match client.next_batch() {
            Ok(b) => b,
            Err(e) if e.is_transient() && args.reconnect_timeout > 0.0 => {
                tracing::warn!("{e}; reconnecting");
                client
                    .reconnect(Duration::from_secs_f64(args.reconnect_timeout))
                    .context("reconnecting")?;
                s.reconnects += 1;
                continue;
            }
            Err(e) => {
                return Err(
                    anyhow::Error::new(e).context(format!("reading step {}", client.next_step()))
                )
            }
        };
        let now = monotonic_ns();
        if received == 0 {
            s.first_batch_ns = now;
            s.first_step = b.step;
            first_tokens = u64::from(b.rows) * u64::from(b.seq_len);
        }
        s.last_batch_ns = now;
        s.last_step = b.step;
        s.steps += 1;
        s.tokens += b.tokens.len() as u64;
        s.real_tokens += b.real_tokens;
        s.loss_tokens += b.loss_tokens;
        s.payload_bytes += b.payload_bytes();
        digest.update(b.tokens.as_bytes());
        s.checksum = s.checksum.wrapping_add(sum_tokens(&b.tokens));
        if args.touch {
            s.checksum = s
                .checksum
                .wrapping_add(sum_tokens(&b.labels))
                .wrapping_add(sum_tokens(&b.position_ids))
                .wrapping_add(sum_tokens(&Tokens::Uint8(b.loss_mask)));
        }
        if let Some(ns) = b.wake_latency_ns {
            s.wake_latency_ns.push(ns);
        }
        for (r, &d) in b.domain.iter().enumerate() {
            if let Some(slot) = usize::try_from(d)
                .ok()
                .and_then(|d| domain_tokens.get_mut(d))
            {
                *slot += u64::from(b.row_real_tokens(r));
            }
        }
        received += 1;
        if args.progress && now.saturating_sub(last_progress) > 200_000_000 {
            last_progress = now;
            eprintln!("{{\"progress\": {received}}}");
        }
    }
    client.release(client.next_step()).ok();
    s.seconds = s.last_batch_ns.saturating_sub(s.first_batch_ns) as f64 / 1e9;
    s.tokens_per_s = if s.seconds > 0.0 {
        (s.tokens - first_tokens) as f64 / s.seconds
    } else {
        0.0
    };
    s.wake_latency = Latency::from_ns(&mut s.wake_latency_ns.clone());
    s.digest = format!("{:016x}", digest.digest());
    s.cpu_seconds = process_cpu_seconds();
    s.domain_tokens = domains.into_iter().zip(domain_tokens).collect();
    if let Some(path) = &args.save_cursor {
        let blob = client
            .last_cursor()
            .context("no step was read, so there is no cursor to save")?;
        std::fs::write(path, format!("{}\n", to_hex(blob)))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    client.bye().ok();
    Ok(s)
}

/// Runs `millrace consume`.
pub fn run_consume(args: ConsumeArgs) -> anyhow::Result<()> {
    let mut s = consume(&args)?;
    let mut out = std::io::stdout().lock();
    if args.json {
        writeln!(out, "{}", serde_json::to_string(&s)?)?;
    } else {
        s.wake_latency_ns.clear();
        writeln!(
            out,
            "dp rank {}: steps {}..={} ({} steps), {} tokens in {:.3} s = {:.3e} tokens/s; \
             wake latency p50 {:.1} us p99 {:.1} us ({} waits); digest {}; checksum {}",
            s.dp_rank,
            s.first_step,
            s.last_step,
            s.steps,
            s.tokens,
            s.seconds,
            s.tokens_per_s,
            s.wake_latency.p50_us,
            s.wake_latency.p99_us,
            s.wake_latency.samples,
            s.digest,
            s.checksum
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trips() {
        let b = [0u8, 1, 0xab, 0xff];
        assert_eq!(to_hex(&b), "0001abff");
        assert_eq!(from_hex("0001ABff"), Some(b.to_vec()));
        assert_eq!(from_hex("0"), None);
        assert_eq!(from_hex("zz"), None);
    }

    fn welcome() -> Welcome {
        let f = |offset, dtype: &str, shape: Vec<u64>| FieldSpec {
            offset,
            dtype: dtype.into(),
            shape,
        };
        let mut fields = BTreeMap::new();
        fields.insert("tokens".into(), f(256, "int32", vec![2, 8]));
        fields.insert("labels".into(), f(320, "int32", vec![2, 8]));
        fields.insert("loss_mask".into(), f(384, "uint8", vec![2, 8]));
        fields.insert("position_ids".into(), f(448, "int32", vec![2, 8]));
        fields.insert("cu_seqlens".into(), f(512, "int32", vec![17]));
        fields.insert("domain".into(), f(640, "int32", vec![2]));
        fields.insert("row_loss_tokens".into(), f(704, "int32", vec![2]));
        fields.insert("cursor".into(), f(768, "uint8", vec![256]));
        Welcome {
            protocol: 1,
            fingerprint: "0".repeat(32),
            start_step: 0,
            dp_rank: 0,
            dp_size: 1,
            rows: 2,
            seq_len: 8,
            micro_batch_rows: 2,
            micro_batches: 1,
            token_dtype: "int32".into(),
            pad_token: 0,
            eod_token: Some(2),
            domains: vec!["a".into()],
            slots: 2,
            slot_offset: 4096,
            slot_bytes: 4096,
            ring_bytes: 3 * 4096,
            fields,
            vocab_size: None,
        }
    }

    #[test]
    fn a_good_layout_validates() {
        let l = Layout::from_welcome(&welcome()).unwrap();
        assert_eq!(l.tokens.len, 16);
        assert_eq!(l.cursor.len, 256);
    }

    #[test]
    fn malformed_welcomes_are_errors_not_panics() {
        type Edit = Box<dyn Fn(&mut Welcome)>;
        let cases: Vec<Edit> = vec![
            Box::new(|w| w.slots = 0),
            Box::new(|w| w.ring_bytes = 4096),
            Box::new(|w| w.slot_bytes = u64::MAX),
            Box::new(|w| w.slot_offset = 8),
            Box::new(|w| w.fields.get_mut("tokens").unwrap().offset = 4090),
            Box::new(|w| w.fields.get_mut("tokens").unwrap().offset = 0),
            Box::new(|w| w.fields.get_mut("tokens").unwrap().offset = 258),
            Box::new(|w| w.fields.get_mut("tokens").unwrap().shape = vec![u64::MAX, 4]),
            Box::new(|w| w.fields.get_mut("labels").unwrap().dtype = "complex".into()),
            Box::new(|w| w.fields.get_mut("domain").unwrap().shape = vec![3]),
            Box::new(|w| w.fields.get_mut("cu_seqlens").unwrap().dtype = "int64".into()),
            Box::new(|w| {
                w.fields.remove("cursor");
            }),
            Box::new(|w| w.protocol = 2),
        ];
        for (i, c) in cases.iter().enumerate() {
            let mut w = welcome();
            c(&mut w);
            assert!(Layout::from_welcome(&w).is_err(), "case {i} was accepted");
        }
    }

    #[test]
    fn latency_percentiles() {
        let mut v: Vec<u64> = (1..=100).map(|x| x * 1000).collect();
        let l = Latency::from_ns(&mut v);
        assert_eq!(l.samples, 100);
        assert_eq!(l.p50_us, 50.0);
        assert_eq!(l.p99_us, 99.0);
        assert_eq!(Latency::from_ns(&mut []), Latency::default());
    }

    // A fake daemon: enough of the protocol to hand the client malformed rings and
    // frames, which the real daemon never sends.

    use crate::wire::frame::{encode, read_from, send_with_fds};
    use crate::wire::ring::{put_u32, put_u64};
    use std::io::Read as _;
    use std::os::fd::FromRawFd;
    use std::os::unix::net::UnixListener;

    /// A memfd holding `ring`, sized `len`.
    fn memfd(ring: &[u8], len: usize) -> OwnedFd {
        let fd = unsafe { libc::memfd_create(c"test-ring".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        let mut f = unsafe { std::fs::File::from_raw_fd(fd) };
        f.write_all(ring).unwrap();
        f.set_len(len as u64).unwrap();
        OwnedFd::from(f)
    }

    /// A ring that matches `welcome()`, with step `step` in slot 0 and `published`.
    fn ring(step: u64, published: u64) -> Vec<u8> {
        let mut r = vec![0u8; 3 * 4096];
        r[..8].copy_from_slice(RING_MAGIC);
        put_u32(&mut r, ring_at::VERSION, 1);
        put_u32(&mut r, ring_at::SLOTS, 2);
        put_u64(&mut r, ring_at::SLOT_BYTES, 4096);
        put_u64(&mut r, ring_at::SLOT_OFFSET, 4096);
        put_u64(&mut r, ring_at::PUBLISHED, published);
        let s = 4096;
        let slot = &mut r[s..];
        put_u64(slot, slot_at::STEP, step);
        put_u32(slot, slot_at::ROWS, 2);
        put_u32(slot, slot_at::SEQ_LEN, 8);
        put_u32(slot, slot_at::CU_LEN, 3);
        put_u32(slot, slot_at::CURSOR_LEN, 4);
        for i in 0..16u32 {
            let o = s + 256 + 4 * i as usize;
            r[o..o + 4].copy_from_slice(&(i + 100).to_le_bytes());
        }
        for (i, v) in [0i32, 8, 16].iter().enumerate() {
            let o = s + 512 + 4 * i;
            r[o..o + 4].copy_from_slice(&v.to_le_bytes());
        }
        r[s + 768..s + 772].copy_from_slice(b"CURS");
        r
    }

    /// Serves one connection: reads HELLO, then runs `script` on the stream; returns the
    /// socket path (the temp dir lives as long as the returned guard).
    fn fake(script: impl FnOnce(&mut UnixStream) + Send + 'static) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fake.sock");
        let listener = UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let (kind, payload) = read_from(&mut s).unwrap();
            assert_eq!(kind, frame::HELLO);
            let hello: Hello = serde_json::from_slice(&payload).unwrap();
            assert_eq!(hello.dp_size, 1);
            script(&mut s);
            // Stay connected until the client leaves.
            let mut sink = Vec::new();
            let _ = s.read_to_end(&mut sink);
        });
        (dir, path)
    }

    fn welcome_with(
        ring: Vec<u8>,
        len: usize,
        edit: fn(&mut Welcome),
    ) -> impl FnOnce(&mut UnixStream) + Send {
        move |s: &mut UnixStream| {
            let mut w = welcome();
            edit(&mut w);
            let fd = memfd(&ring, len);
            let ev = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
            let payload = serde_json::to_vec(&w).unwrap();
            let bytes = encode(frame::WELCOME, &payload);
            let sent = send_with_fds(s.as_raw_fd(), &bytes, &[fd.as_raw_fd(), ev]).unwrap();
            assert_eq!(sent, bytes.len());
            unsafe { libc::close(ev) };
        }
    }

    fn connect_fake(
        script: impl FnOnce(&mut UnixStream) + Send + 'static,
    ) -> Result<Client, ClientError> {
        let (_dir, path) = fake(script);
        Client::connect(&path, &Hello::new(0, 1, 2, 1))
    }

    #[test]
    fn reads_a_well_formed_slot_and_times_out_waiting_for_the_next() {
        let mut c = connect_fake(welcome_with(ring(0, 1), 3 * 4096, |_| {})).unwrap();
        c.set_timeout(Some(Duration::from_millis(50)));
        let b = c.next_batch().unwrap();
        assert_eq!(b.step, 0);
        assert_eq!(b.tokens.get_i64(0), Some(100));
        assert_eq!(b.tokens.get_i64(15), Some(115));
        assert_eq!(b.cu_seqlens, &[0, 8, 16]);
        assert_eq!(b.cursor, b"CURS");
        assert_eq!(b.payload_bytes(), 16 * 4 * 3 + 16);
        assert_eq!(c.last_cursor(), Some(&b"CURS"[..]));
        assert!(matches!(c.next_batch(), Err(ClientError::Timeout(_))));
        assert!(matches!(c.release(5), Err(ClientError::Usage(_))));
    }

    #[test]
    fn malformed_rings_are_errors_not_faults() {
        let short = connect_fake(welcome_with(ring(0, 1), 4096, |_| {}));
        assert!(
            matches!(short, Err(ClientError::Ring(_))),
            "{:?}",
            short.err()
        );
        let mut bad_magic = ring(0, 1);
        bad_magic[0] = b'X';
        let r = connect_fake(welcome_with(bad_magic, 3 * 4096, |_| {}));
        assert!(matches!(r, Err(ClientError::Ring(_))));
        let r = connect_fake(welcome_with(ring(0, 1), 3 * 4096, |w| w.slots = 1));
        assert!(matches!(r, Err(ClientError::Ring(_))));
        // WELCOME claims more than the memfd holds: mapping it would fault on access.
        let r = connect_fake(welcome_with(ring(0, 1), 3 * 4096, |w| {
            w.ring_bytes = 1 << 40
        }));
        assert!(matches!(r, Err(ClientError::Ring(_))));

        let wrong_step = connect_fake(welcome_with(ring(7, 1), 3 * 4096, |_| {}));
        assert!(matches!(
            wrong_step.unwrap().next_batch(),
            Err(ClientError::Ring(_))
        ));
        let mut big_cu = ring(0, 1);
        put_u32(&mut big_cu[4096..], slot_at::CU_LEN, 1000);
        let r = connect_fake(welcome_with(big_cu, 3 * 4096, |_| {}));
        assert!(matches!(r.unwrap().next_batch(), Err(ClientError::Ring(_))));
        let mut big_cursor = ring(0, 1);
        put_u32(&mut big_cursor[4096..], slot_at::CURSOR_LEN, u32::MAX);
        let r = connect_fake(welcome_with(big_cursor, 3 * 4096, |_| {}));
        assert!(matches!(r.unwrap().next_batch(), Err(ClientError::Ring(_))));
    }

    #[test]
    fn malformed_frames_are_errors() {
        let r = connect_fake(|s| {
            s.write_all(&encode(
                frame::REFUSED,
                br#"{"code":"layout","message":"m"}"#,
            ))
            .unwrap()
        });
        assert!(matches!(r, Err(ClientError::Refused { code, .. }) if code == "layout"));
        let r = connect_fake(|s| s.write_all(&[0, 0, 0, 0]).unwrap());
        assert!(matches!(r, Err(ClientError::Protocol(_))));
        let r = connect_fake(|s| s.write_all(&[0xff, 0xff, 0xff, 0x7f, 2]).unwrap());
        assert!(matches!(r, Err(ClientError::Protocol(_))));
        let r = connect_fake(|s| s.write_all(&encode(frame::WELCOME, b"not json")).unwrap());
        assert!(matches!(r, Err(ClientError::Protocol(_))));
        let r = connect_fake(|s| s.write_all(&encode(9, b"")).unwrap());
        assert!(matches!(r, Err(ClientError::Protocol(_))));
        // WELCOME without its fds.
        let r = connect_fake(|s| {
            let w = serde_json::to_vec(&welcome()).unwrap();
            s.write_all(&encode(frame::WELCOME, &w)).unwrap()
        });
        assert!(matches!(r, Err(ClientError::Protocol(_))));
        // Hung up mid-frame, and right after HELLO.
        let r = connect_fake(|s| {
            s.write_all(&[10, 0, 0, 0, 2]).unwrap();
            s.shutdown(std::net::Shutdown::Both).unwrap();
        });
        assert!(matches!(r, Err(ClientError::Disconnected)));
        let r = connect_fake(|s| s.shutdown(std::net::Shutdown::Both).unwrap());
        assert!(matches!(r, Err(ClientError::Disconnected)));
    }

    #[test]
    fn an_error_frame_while_waiting_is_reported() {
        let mut c = connect_fake(|s| {
            welcome_with(ring(0, 0), 3 * 4096, |_| {})(s);
            std::thread::sleep(Duration::from_millis(50));
            s.write_all(&encode(
                frame::ERROR,
                br#"{"code":"shutdown","message":"bye"}"#,
            ))
            .unwrap();
            s.shutdown(std::net::Shutdown::Both).unwrap();
        })
        .unwrap();
        c.set_timeout(Some(Duration::from_secs(30)));
        let e = c.next_batch().err();
        assert!(
            matches!(&e, Some(ClientError::Daemon { code, .. }) if code == "shutdown"),
            "{e:?}"
        );
        assert!(e.is_some_and(|e| e.is_transient()));
    }
}
