//! One trainer rank's connection: the socket (HELLO, WELCOME with its fds, RELEASE,
//! BYE), the ready eventfd it sleeps on, the mapped ring it hands out steps from, and
//! the release page it publishes its releases in.

use std::io::Write;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rustix::event::{poll, PollFd, PollFlags};
use rustix::fs::SealFlags;

use super::batch::{BatchView, SlotArrays};
use super::layout::{check_ring_header, Arrays, Field, Layout, RingView, SlotShape};
use super::{
    frame, io_err, monotonic_ns, to_hex, ClientError, Hello, Welcome, HANDSHAKE_TIMEOUT, PROTOCOL,
    SLOT_HEADER_BYTES,
};
use crate::corpus::Tokens;
use crate::sys::{EventFd, ReleasePage};
use crate::wire::{
    self,
    ring::{slot_at, FIELD_SLOTS},
};

/// Writes one frame.
fn send_frame(sock: &mut UnixStream, kind: u8, payload: &[u8]) -> Result<(), ClientError> {
    let buf = wire::frame::encode_checked(kind, payload)
        .map_err(|e| ClientError::Usage(format!("cannot send frame type {kind}: {e}")))?;
    sock.write_all(&buf).map_err(|e| match e.kind() {
        std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset => {
            ClientError::Disconnected
        }
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => ClientError::Timeout(
            format!("sending frame type {kind}: the daemon does not read its socket"),
        ),
        _ => ClientError::Io {
            what: "sending a frame",
            source: e,
        },
    })
}

/// Reads one whole frame with `recvmsg`; returns (type, payload, fds that came with it).
fn recv_frame(sock: &UnixStream) -> Result<(u8, Vec<u8>, Vec<OwnedFd>), ClientError> {
    let mut fds = Vec::new();
    let fill = |buf: &mut [u8], _inside: bool| -> Result<(), ClientError> {
        let mut have = 0;
        while have < buf.len() {
            match wire::frame::recv_with_fds(sock, &mut buf[have..], &mut fds) {
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
    let (kind, payload) = wire::frame::read_with(fill, wire::MAX_JSON_FRAME, |e| {
        ClientError::Protocol(e.to_string())
    })?;
    Ok((kind, payload, fds))
}

fn code_message(payload: &[u8], what: &str) -> Result<(String, String), ClientError> {
    wire::Reason::decode(payload)
        .map(|r| (r.code, r.message))
        .map_err(|e| ClientError::Protocol(format!("{what} payload is not {{code, message}}: {e}")))
}

/// The part of a slot one host-to-device copy moves: from the lowest offset of its
/// arrays to the end of the last, the cursor left out (the trainer keeps it on the host).
/// Every field was checked to fit the slot, so the range does too.
fn copy_span(l: &Layout) -> (usize, usize) {
    let mut fields = vec![l.domain, l.row_loss_tokens];
    match &l.arrays {
        Arrays::Expanded {
            tokens,
            labels,
            loss_mask,
            position_ids,
            cu_seqlens,
        } => fields.extend([*tokens, *labels, *loss_mask, *position_ids, *cu_seqlens]),
        Arrays::Compact {
            rows,
            doc_starts,
            row_real_tokens,
            ..
        } => fields.extend([*rows, *doc_starts, *row_real_tokens]),
    }
    let lo = fields.iter().map(|f| f.offset).min().unwrap_or(0);
    let hi = fields
        .iter()
        .map(|f| f.offset + f.bytes())
        .max()
        .unwrap_or(0);
    (lo, hi)
}

/// A compact slot's `row_bounds` (docs/PROTOCOL.md section 4), checked as the spec asks
/// of a client that reads them: each row's end entry rises, the last is `cu_len - 1`,
/// and each longest piece is in `1..=seq_len`. So a caller may slice `cu_seqlens` with
/// them and never go out of range.
pub(super) fn checked_bounds(
    b: &[i32],
    cu_len: usize,
    seq_len: usize,
    step: u64,
) -> Result<&[i32], ClientError> {
    let mut end = 0i64;
    for (r, pair) in b.chunks_exact(2).enumerate() {
        let (e, m) = (i64::from(pair[0]), i64::from(pair[1]));
        if e <= end || e >= cu_len as i64 || m < 1 || m > seq_len as i64 {
            return Err(ClientError::Ring(format!(
                "step {step}: row_bounds of row {r} ({e}, {m}) do not fit cu_len {cu_len} \
                 and seq_len {seq_len}"
            )));
        }
        end = e;
    }
    if end != cu_len as i64 - 1 {
        return Err(ClientError::Ring(format!(
            "step {step}: row_bounds end at entry {end}, not at cu_len - 1 = {}",
            cu_len - 1
        )));
    }
    Ok(b)
}

/// The connection of one trainer rank: socket, eventfd and the mapped ring.
pub struct Client {
    path: PathBuf,
    hello: Hello,
    welcome: Welcome,
    layout: Layout,
    sock: UnixStream,
    ready: EventFd,
    ring: RingView,
    /// Where releases go instead of RELEASE frames, when the daemon passed one.
    page: Option<ReleasePage>,
    /// Bytes of the longest [`BatchView::copy_bytes`] any slot can have (every array of
    /// a slot lies past its header), whatever stage it holds.
    copy_len: usize,
    /// The layout of the last slot shape read (slot headers of one stage agree), so
    /// a slot is decoded from its header once per stage, not once per step.
    slot: Option<(SlotShape, Layout)>,
    /// Next step to hand out.
    consumed: u64,
    /// Every step below this has been released.
    released: u64,
    hold: u64,
    timeout: Option<Duration>,
    /// How long a connection waits for WELCOME (a seek on a huge corpus takes a while).
    handshake: Duration,
    last_step: Option<u64>,
    last_cursor: Vec<u8>,
    /// Why the connection ended, when a RELEASE found it ended while steps published
    /// before it were still unread: they are handed out first, and this error comes
    /// once none is left (as after a socket event, in `wait_published`).
    gone: Option<ClientError>,
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
        Client::connect_within(socket, hello, HANDSHAKE_TIMEOUT)
    }

    /// [`Client::connect`] waiting up to `handshake` for WELCOME (a far `start_step` on
    /// an empty plan-checkpoint cache takes longer than [`HANDSHAKE_TIMEOUT`]), here and
    /// in [`Client::reconnect`].
    pub fn connect_within(
        socket: impl AsRef<Path>,
        hello: &Hello,
        handshake: Duration,
    ) -> Result<Client, ClientError> {
        let deadline = Instant::now() + DUPLICATE_GRACE;
        loop {
            match Client::connect_once(socket.as_ref(), hello, handshake) {
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
    fn connect_once(
        socket: &Path,
        hello: &Hello,
        handshake: Duration,
    ) -> Result<Client, ClientError> {
        let path = socket.to_path_buf();
        crate::config::serve::check_fallback_socket_dir(&path, crate::sys::euid())
            .map_err(ClientError::Untrusted)?;
        let mut sock = UnixStream::connect(&path).map_err(|error| ClientError::Connect {
            path: path.clone(),
            error,
        })?;
        // Both ways: a HELLO larger than the socket's buffer (a long cursor blob) blocks
        // its write until the daemon reads it, which a stopped daemon never does.
        let limit = Some(handshake.max(Duration::from_millis(1)));
        sock.set_read_timeout(limit)
            .and_then(|()| sock.set_write_timeout(limit))
            .map_err(io_err("setting the socket timeout"))?;
        // This client reads each slot at its stage's layout (`Layout::at`), so it may
        // be served a plan with stages.
        let hello = Hello {
            stages: true,
            ..hello.clone()
        };
        let payload = serde_json::to_vec(&hello)
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
        // The version first: a daemon of another protocol may lay WELCOME out otherwise,
        // and "protocol 1 (this client speaks 2)" is the fault, not a field it lacks.
        #[derive(serde::Deserialize)]
        struct Version {
            protocol: u32,
        }
        if let Ok(Version { protocol }) = serde_json::from_slice::<Version>(&payload) {
            if protocol != PROTOCOL {
                return Err(ClientError::Protocol(format!(
                    "WELCOME: protocol {protocol} (this client speaks {PROTOCOL})"
                )));
            }
        }
        let welcome: Welcome = serde_json::from_slice(&payload)
            .map_err(|e| ClientError::Protocol(format!("WELCOME is not valid: {e}")))?;
        let want = if welcome.release_page { 3 } else { 2 };
        if fds.len() != want || (welcome.release_page && !hello.release_page) {
            return Err(ClientError::Protocol(format!(
                "WELCOME came with {} file descriptors (release_page {}), expected {want} \
                 [ring_fd, ready_fd{}]",
                fds.len(),
                welcome.release_page,
                if hello.release_page { ", page_fd" } else { "" }
            )));
        }
        let page = match welcome.release_page {
            true => {
                let fd = fds.pop().ok_or(ClientError::Disconnected)?;
                // Like the ring (`RingView::map`): a page that could be cut under the
                // mapping would raise SIGBUS at this client's next release.
                let seals = rustix::fs::fcntl_get_seals(&fd).unwrap_or(SealFlags::empty());
                if !seals.contains(SealFlags::SHRINK) {
                    return Err(ClientError::Protocol(format!(
                        "the release page memfd is not sealed against shrinking \
                         (F_SEAL_SHRINK; seals {seals:?})"
                    )));
                }
                Some(ReleasePage::map(&fd).map_err(io_err("mapping the release page"))?)
            }
            false => None,
        };
        let ready = EventFd::from_fd(fds.pop().ok_or(ClientError::Disconnected)?);
        let ring_fd = fds.pop().ok_or(ClientError::Disconnected)?;
        let layout = Layout::from_welcome(&welcome)?;
        let ring = RingView::map(&ring_fd, layout.ring_bytes)?;
        drop(ring_fd); // the mapping keeps the memfd alive
        check_ring_header(&ring, &layout)?;
        let limit = Some(Duration::from_secs(5));
        sock.set_read_timeout(limit)
            .and_then(|()| sock.set_write_timeout(limit))
            .map_err(io_err("setting the socket timeout"))?;
        let start = welcome.start_step;
        // A slot's arrays lie between its header and its end, whatever its stage (one
        // added live too): a buffer of this size takes any step's copy.
        let copy_len = layout.slot_bytes - SLOT_HEADER_BYTES;
        Ok(Client {
            path,
            hello: hello.clone(),
            welcome,
            layout,
            sock,
            ready,
            ring,
            page,
            copy_len,
            slot: None,
            consumed: start,
            released: start,
            hold: 0,
            timeout: None,
            handshake,
            last_step: None,
            last_cursor: Vec::new(),
            gone: None,
        })
    }

    /// What the daemon announced.
    pub fn welcome(&self) -> &Welcome {
        &self.welcome
    }

    /// The whole ring mapping, read-only: what a GPU consumer registers with the CUDA
    /// driver once per connection (src/client/gpu.rs), so that every slot's copy is a
    /// DMA from pinned memory.
    pub fn ring_bytes(&self) -> &[u8] {
        self.ring.bytes(0, self.layout.ring_bytes)
    }

    /// Bytes any step's [`BatchView::copy_bytes`] takes at most (a slot less its
    /// header, so a stage added live fits too): what a GPU consumer's device buffers
    /// hold.
    pub fn copy_len(&self) -> usize {
        self.copy_len
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

    /// The batches [`Client::next_batch`] keeps unreleased: [`Client::set_hold`]'s value,
    /// at most `slots - 1` of the ring (a reconnect to a ring of fewer slots lowers it),
    /// so a caller whose copies read held slots knows how many may stay in flight.
    pub fn hold(&self) -> u64 {
        self.hold
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
        // With a release page a release is a store. A RELEASE frame goes only when the
        // daemon says it waits (it found the ring full) and this client is about to wait
        // for the next step: then the daemon must wake now. While the next step is
        // published the trainer has work, and the daemon's backstop (2 ms) finds the
        // release in the page without a frame (docs/DESIGN.md, "Release pages").
        let frame = match &self.page {
            None => true,
            Some(p) => p.publish(upto) && self.ring.published() <= self.consumed,
        };
        if frame {
            self.send(frame::RELEASE, &upto.to_le_bytes())?;
        }
        self.released = upto;
        Ok(())
    }

    /// Whether releases go through a release page (the daemon passed one).
    pub fn has_release_page(&self) -> bool {
        self.page.is_some()
    }

    /// Stores any value in the release page, bypassing this client's checks: for tests
    /// of how the daemon handles a page that goes back or passes the published steps.
    /// Returns whether there is a page.
    pub fn write_page_unchecked(&self, value: u64) -> bool {
        self.page
            .as_ref()
            .map(|p| p.store_released(value))
            .is_some()
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
                // The ring went back to the change's step (or had not reached it): no
                // step handed out is at or past it while the last one is before it.
                Ok((code, message))
                    if code == wire::Code::Cursor.as_str()
                        && (self.last_step).is_none_or(|s| s < self.ring.published()) =>
                {
                    ClientError::StaleRing { message }
                }
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
            if let Some(e) = self.gone.take() {
                return Err(e);
            }
            waited = true;
            let wait = match deadline {
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(ClientError::Timeout(format!(
                            "step {} was not published within {:?}",
                            self.consumed,
                            self.timeout.unwrap_or_default()
                        )));
                    }
                    left.as_millis().clamp(1, 1000) as i64
                }
                None => 1000,
            };
            let wait = rustix::time::Timespec {
                tv_sec: wait / 1000,
                tv_nsec: wait % 1000 * 1_000_000,
            };
            let mut p = [
                PollFd::new(&self.ready, PollFlags::IN),
                PollFd::new(&self.sock, PollFlags::IN),
            ];
            match poll(&mut p, Some(&wait)) {
                Ok(_) => {}
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(io_err("poll")(e.into())),
            }
            let (ready, sock) = (p[0].revents(), p[1].revents());
            // Steps published before the daemon's ERROR (a ring that stops at its last
            // step publishes that step first) are this client's to read: the socket's
            // news waits until none is left.
            if self.ring.published() > self.consumed {
                return Ok(waited);
            }
            if !sock.is_empty() {
                return Err(self.socket_event());
            }
            if ready.contains(PollFlags::IN) {
                self.ready
                    .drain()
                    .map_err(io_err("reading the ready eventfd"))?;
            } else if !ready.is_empty() {
                return Err(ClientError::Protocol(format!(
                    "ready_fd reports poll events {:#x}",
                    ready.bits()
                )));
            }
        }
    }

    /// Waits for the next step and returns views of its slot. Batches handed out
    /// earlier are released first, except the last [`Client::set_hold`] ones.
    ///
    /// With a release page (HELLO `release_page`, the default) each release is a store
    /// there. Without one, RELEASE frames are batched: while the next step is already
    /// published, finished steps are released only once `(slots - hold) / 2` of them
    /// have piled up, so the daemon wakes once per few steps instead of every step;
    /// before waiting, everything finished is released, so a slow producer is never
    /// starved by a lazy consumer.
    pub fn next_batch(&mut self) -> Result<BatchView<'_>, ClientError> {
        let upto = self.consumed.saturating_sub(self.hold);
        // A release page costs a store per release, so it releases every step.
        let batch = match self.page {
            Some(_) => 1,
            None => (self.layout.slots.saturating_sub(self.hold) / 2).max(1),
        };
        if self.gone.is_none()
            && (upto >= self.released + batch || self.ring.published() <= self.consumed)
        {
            if let Err(e) = self.release(upto) {
                // The daemon went away (or closed after an ERROR) while this client
                // worked. The steps it published before are still this client's to read
                // (docs/PROTOCOL.md, section 1), and TP peers must rejoin a restarted
                // daemon at one step, the ring's published one: a peer whose batched
                // RELEASE met the closed socket and gave up at once would rejoin at its
                // own next step while its twins read on. But an ERROR `protocol` put this
                // peer off a ring that goes on: its slots may be refilled under it.
                let put_off = matches!(&e, ClientError::Daemon { code, .. } if code == "protocol");
                if put_off || self.ring.published() <= self.consumed {
                    return Err(e);
                }
                self.gone = Some(e);
            }
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
        // A plan with stages changes shape at a plan step (one added live too): the slot
        // is read at the shape and offsets its header gives, checked to fit the slot.
        let plan_step = r.u64_at(base + slot_at::PLAN_STEP);
        let rows = r.u32_at(base + slot_at::ROWS);
        let seq_len = r.u32_at(base + slot_at::SEQ_LEN);
        let mut offsets = [0u64; FIELD_SLOTS];
        for (i, o) in offsets.iter_mut().enumerate() {
            *o = r.u64_at(base + slot_at::FIELD_OFFSETS + 8 * i);
        }
        let shape = (rows, seq_len, offsets);
        if self.slot.as_ref().is_none_or(|(k, _)| *k != shape) {
            let decoded = Layout::of_slot(&self.welcome, &shape).map_err(|e| match e {
                ClientError::Protocol(m) => {
                    ClientError::Protocol(format!("step {step} (plan step {plan_step}): {m}"))
                }
                e => e,
            })?;
            self.slot = Some((shape, decoded));
        }
        let Some((_, l)) = &self.slot else {
            return Err(ClientError::Protocol("slot layout not decoded".into()));
        };
        let (rows, seq_len) = (rows as usize, seq_len as usize);
        let cu_len = r.u32_at(base + slot_at::CU_LEN) as usize;
        let cu_cap = match &l.arrays {
            Arrays::Expanded { cu_seqlens, .. } => cu_seqlens.len,
            Arrays::Compact { .. } => l.rows * l.seq_len + 1,
        };
        // Every row ends with an entry of its own, so a slot of `rows` rows has at least
        // `rows + 1`; and `max_seqlen` goes to flash attention as is, so a span no row can
        // hold (or 0) is refused here, as the Python client does, not handed on.
        if cu_len <= rows || cu_len > cu_cap {
            return Err(ClientError::Ring(format!(
                "step {step}: cu_len {cu_len} outside {}..={cu_cap} ({rows} rows of {seq_len})",
                rows + 1
            )));
        }
        let max_seqlen = r.u32_at(base + slot_at::MAX_SEQLEN);
        if max_seqlen == 0 || max_seqlen as usize > seq_len {
            return Err(ClientError::Ring(format!(
                "step {step}: max_seqlen {max_seqlen} is not in 1..={seq_len} (seq_len)"
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
        let span = copy_span(l);
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
        let view = BatchView {
            step,
            plan_step,
            rows: rows as u32,
            seq_len: seq_len as u32,
            cu_len: cu_len as u32,
            max_seqlen,
            loss_tokens: r.u64_at(base + slot_at::LOSS_TOKENS),
            real_tokens: r.u64_at(base + slot_at::REAL_TOKENS),
            publish_ns,
            plan_state: r.u64_at(base + slot_at::PLAN_STATE),
            wake_latency_ns: waited.then(|| wake_ns.saturating_sub(publish_ns)),
            pad_token: self.welcome.pad_token,
            arrays: match &l.arrays {
                Arrays::Expanded {
                    tokens,
                    labels,
                    loss_mask,
                    position_ids,
                    cu_seqlens,
                } => SlotArrays::Expanded {
                    tokens: tokens_of(tokens)?,
                    labels: tokens_of(labels)?,
                    loss_mask: at(loss_mask),
                    position_ids: tokens_of(position_ids)?,
                    cu_seqlens: &i32s(cu_seqlens)?[..cu_len],
                },
                Arrays::Compact {
                    rows,
                    doc_starts,
                    row_real_tokens,
                    row_bounds,
                } => SlotArrays::Compact {
                    rows: tokens_of(rows)?,
                    doc_starts: at(doc_starts),
                    row_real_tokens: i32s(row_real_tokens)?,
                    row_bounds: match row_bounds.as_ref().map(i32s).transpose()? {
                        Some(b) => Some(checked_bounds(b, cu_len, l.seq_len, step)?),
                        None => None,
                    },
                },
            },
            domain: i32s(&l.domain)?,
            row_loss_tokens: i32s(&l.row_loss_tokens)?,
            cursor,
            copy_bytes: r.bytes(base + span.0, span.1 - span.0),
        };
        // Only a step handed out moves the resume point: a slot refused above (a
        // corrupt `row_bounds`, say) left `last_cursor` at its blob while `last_step`
        // stayed behind, so a checkpoint of it resumed one step late, losing the step.
        self.last_cursor.clear();
        self.last_cursor.extend_from_slice(view.cursor);
        self.last_step = Some(step);
        self.consumed = step + 1;
        Ok(view)
    }

    /// Reconnects after the daemon went away, resuming after the last step handed out
    /// (or where this client started, if none was, refused unless the daemon still
    /// plans what the first WELCOME announced), retrying until `timeout`.
    pub fn reconnect(&mut self, timeout: Duration) -> Result<(), ClientError> {
        let mut hello = self.hello.clone();
        if self.last_step.is_some() {
            hello.cursor = Some(to_hex(&self.last_cursor));
            hello.start_step = None;
        } else if hello.cursor.is_none() && hello.fingerprint.is_none() {
            // No blob yet, whose check would refuse another plan: a daemon restarted
            // with another config would serve that plan's steps silently, so the
            // plan of the first WELCOME is pinned.
            hello.fingerprint = Some(self.welcome.fingerprint.clone());
        }
        let deadline = Instant::now() + timeout;
        let mut fresh = loop {
            // Each attempt within what is left of `timeout` (a daemon that takes the
            // connection and never answers must not hold this past it).
            let left = deadline.saturating_duration_since(Instant::now());
            let wait = self.handshake.min(left.max(Duration::from_millis(100)));
            match Client::connect_within(&self.path, &hello, wait) {
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
        // Clamped again: a daemon restarted with fewer `ring_slots` would otherwise never
        // get a slot back while this client holds as many as it has (a hang).
        fresh.set_hold(self.hold);
        fresh.timeout = self.timeout;
        fresh.handshake = self.handshake;
        fresh.last_step = self.last_step;
        fresh.last_cursor = std::mem::take(&mut self.last_cursor);
        fresh.hello = self.hello.clone();
        *self = fresh;
        Ok(())
    }
}
