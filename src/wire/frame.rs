//! The frame codec of docs/PROTOCOL.md section 1, written once: a u32 little-endian
//! length of type byte + payload, the type byte, the payload; at most [`MAX_FRAME`]
//! bytes after the length, or [`MAX_JSON_FRAME`] for the JSON frames, whose size grows
//! with the plan's domains. Fds ride on a frame's first byte as SCM_RIGHTS.
//!
//! Everything that reads or writes a frame goes through here: the daemon's async read
//! path feeds [`parse_frame`] what the socket gave, and the blocking readers of the Rust
//! client, `millrace ctl` and the tests go through [`read_with`], so the header and
//! length rules exist in one place. Decoding is a pure function over bytes so that a
//! property test can throw arbitrary input at it.

use std::io::{IoSlice, IoSliceMut, Read, Write};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::net::{
    recvmsg, sendmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags,
    SendAncillaryBuffer, SendAncillaryMessage, SendFlags,
};

/// Bytes of the length prefix in front of every frame.
pub const HEADER: usize = 4;
/// Largest `len` of a frame of fixed size (RELEASE, BYE), and all a daemon reads from a
/// trainer once it has its WELCOME: bounds what one client can make the daemon buffer.
pub const MAX_FRAME: usize = 65536;
/// Largest `len` of a JSON frame (HELLO, CONTROL and every frame the daemon sends). A
/// HELLO carries a cursor blob as hex, about 250 bytes per domain, and `status` lists
/// every domain, so a run of a few hundred domains outgrows [`MAX_FRAME`]; the daemon
/// bounds the requests it reads by its own plan (`wire::protocol::request_limit`).
pub const MAX_JSON_FRAME: usize = 1 << 26;

/// Frame type codes.
pub mod kind {
    /// Client's opening message (JSON).
    pub const HELLO: u8 = 1;
    /// Daemon's acceptance (JSON + fds).
    pub const WELCOME: u8 = 2;
    /// Daemon's refusal of a HELLO (JSON).
    pub const REFUSED: u8 = 3;
    /// Client is done with every step below a u64.
    pub const RELEASE: u8 = 4;
    /// Daemon reports a protocol error before closing (JSON).
    pub const ERROR: u8 = 5;
    /// Client says goodbye.
    pub const BYE: u8 = 6;
    /// A control request (JSON), sent instead of HELLO and then any number of times.
    pub const CONTROL: u8 = 7;
    /// The daemon's answer to one CONTROL (JSON).
    pub const CONTROL_REPLY: u8 = 8;
}

/// A decoded client-to-daemon frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// HELLO with its raw JSON payload (parsed by [`crate::wire::Hello::parse`]).
    Hello(Vec<u8>),
    /// RELEASE upto.
    Release(u64),
    /// BYE.
    Bye,
    /// CONTROL with its raw JSON payload.
    Control(Vec<u8>),
}

/// A frame named by its type and size, for messages that say which frame was
/// unexpected: never its payload, which the peer sent and may be megabytes.
impl std::fmt::Display for Frame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Frame::Hello(p) => write!(f, "HELLO ({} payload bytes)", p.len()),
            Frame::Control(p) => write!(f, "CONTROL ({} payload bytes)", p.len()),
            Frame::Release(upto) => write!(f, "RELEASE {upto}"),
            Frame::Bye => f.write_str("BYE"),
        }
    }
}

/// The most a frame of type `kind` may declare when it is sent: [`MAX_JSON_FRAME`] for
/// the JSON types, [`MAX_FRAME`] for the rest.
pub fn limit_of(kind: u8) -> usize {
    match kind {
        kind::RELEASE | kind::BYE => MAX_FRAME,
        _ => MAX_JSON_FRAME,
    }
}

/// A violation of the framing rules; the connection is closed with this message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// Declared length 0 or above what the reader accepts here.
    #[error("frame length {len} is outside 1..={max}")]
    Length {
        /// The declared length.
        len: u64,
        /// The most the reader accepts at this point of the connection.
        max: usize,
    },
    /// A type this side never accepts.
    #[error("unknown or unexpected frame type {0}")]
    Type(u8),
    /// A payload of the wrong size for its type.
    #[error("frame type {kind} carries {len} payload bytes, expected {expected}")]
    Payload {
        /// Frame type.
        kind: u8,
        /// Bytes received.
        len: usize,
        /// Bytes expected.
        expected: usize,
    },
}

/// The `len` a frame header declares, checked against 1..=`max` (what the reader
/// accepts at this point of the connection): the one place the length rule is applied,
/// by every reader.
pub fn body_len(head: [u8; HEADER], max: usize) -> Result<usize, ProtocolError> {
    let len = u32::from_le_bytes(head) as usize;
    if len == 0 || len > max {
        return Err(ProtocolError::Length {
            len: len as u64,
            max,
        });
    }
    Ok(len)
}

/// One frame of any type, borrowed from a buffer: (type, payload, bytes used).
pub type Split<'a> = (u8, &'a [u8], usize);

/// Splits one frame of any type and at most `max` bytes off the front of `buf`:
/// `Ok(None)` when more bytes are needed, otherwise the frame. Never panics, whatever
/// `buf` holds.
pub fn split(buf: &[u8], max: usize) -> Result<Option<Split<'_>>, ProtocolError> {
    let Some(head) = buf.get(..HEADER) else {
        return Ok(None);
    };
    let len = body_len([head[0], head[1], head[2], head[3]], max)?;
    let Some(body) = buf.get(HEADER..HEADER + len) else {
        return Ok(None);
    };
    Ok(Some((body[0], &body[1..], HEADER + len)))
}

/// Parses one client-to-daemon frame of at most `max` bytes from the front of `buf`:
/// `Ok(None)` when more bytes are needed, otherwise the frame and how many bytes it
/// used. Never panics.
pub fn parse_frame(buf: &[u8], max: usize) -> Result<Option<(Frame, usize)>, ProtocolError> {
    let Some((kind, payload, used)) = split(buf, max)? else {
        return Ok(None);
    };
    let frame = match kind {
        kind::HELLO => Frame::Hello(payload.to_vec()),
        kind::CONTROL => Frame::Control(payload.to_vec()),
        kind::RELEASE => {
            let b: [u8; 8] = payload.try_into().map_err(|_| ProtocolError::Payload {
                kind,
                len: payload.len(),
                expected: 8,
            })?;
            Frame::Release(u64::from_le_bytes(b))
        }
        kind::BYE if payload.is_empty() => Frame::Bye,
        kind::BYE => {
            return Err(ProtocolError::Payload {
                kind,
                len: payload.len(),
                expected: 0,
            })
        }
        other => return Err(ProtocolError::Type(other)),
    };
    Ok(Some((frame, used)))
}

/// Encodes a frame of `kind` around `payload`; the caller has checked that it fits
/// [`limit_of`] its kind (the daemon bounds its replies before encoding).
pub fn encode(kind: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + 1 + payload.len());
    out.extend_from_slice(&(payload.len() as u32 + 1).to_le_bytes());
    out.push(kind);
    out.extend_from_slice(payload);
    out
}

/// Encodes a frame of `kind`, refusing a payload that does not fit [`limit_of`] its
/// kind: what clients use, since their payloads come from callers.
pub fn encode_checked(kind: u8, payload: &[u8]) -> Result<Vec<u8>, ProtocolError> {
    let len = payload.len() + 1;
    let max = limit_of(kind);
    if len > max {
        return Err(ProtocolError::Length {
            len: len as u64,
            max,
        });
    }
    Ok(encode(kind, payload))
}

/// Reads one whole frame of at most `max` bytes through `fill`, which fills the whole
/// slice it is given or fails (`inside` is false for the header, true once a frame has
/// begun, so a reader can tell a clean close from one mid-frame); a bad length becomes
/// an `E` through `bad_length`. Returns (type, payload). Every blocking reader is built
/// on this; clients pass [`MAX_JSON_FRAME`], since the daemon sends JSON frames only.
pub fn read_with<E>(
    mut fill: impl FnMut(&mut [u8], bool) -> Result<(), E>,
    max: usize,
    bad_length: impl FnOnce(ProtocolError) -> E,
) -> Result<(u8, Vec<u8>), E> {
    let mut head = [0u8; HEADER];
    fill(&mut head, false)?;
    let len = body_len(head, max).map_err(bad_length)?;
    let mut body = vec![0u8; len];
    fill(&mut body, true)?;
    let payload = body.split_off(1);
    Ok((body[0], payload))
}

/// Reads one frame of any type, up to [`MAX_JSON_FRAME`], from a blocking reader
/// (tests, stand-in daemons); a bad length is an `InvalidData` error.
pub fn read_from(r: &mut impl Read) -> std::io::Result<(u8, Vec<u8>)> {
    read_with(
        |buf, _| r.read_exact(buf),
        MAX_JSON_FRAME,
        |e| std::io::Error::new(std::io::ErrorKind::InvalidData, e),
    )
}

/// Writes one frame to a blocking writer; an oversized payload is an `InvalidInput` error.
pub fn write_to(w: &mut impl Write, kind: u8, payload: &[u8]) -> std::io::Result<()> {
    let frame = encode_checked(kind, payload)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    w.write_all(&frame)
}

/// Sends `bytes` on the stream socket `sock` with `fds` attached to its first byte
/// (SCM_RIGHTS), without blocking and without SIGPIPE. Returns how many bytes went out
/// (the caller writes any rest normally).
pub fn send_fds(sock: impl AsFd, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> std::io::Result<usize> {
    let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(fds.len()))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(std::io::Error::other("no room for the descriptors"));
    }
    let iov = [IoSlice::new(bytes)];
    let flags = SendFlags::NOSIGNAL | SendFlags::DONTWAIT;
    Ok(sendmsg(sock, &iov, &mut control, flags)?)
}

/// One `recvmsg` on the stream socket `sock`, collecting any SCM_RIGHTS fds into `fds`
/// (close-on-exec); returns the bytes read. `EINTR` is retried here; more descriptors
/// than fit (16) is an error.
pub fn recv_with_fds(
    sock: impl AsFd,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
) -> std::io::Result<usize> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(16))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = loop {
        match recvmsg(&sock, &mut iov, &mut control, RecvFlags::CMSG_CLOEXEC) {
            Err(rustix::io::Errno::INTR) => continue,
            r => break r?,
        }
    };
    for m in control.drain() {
        if let RecvAncillaryMessage::ScmRights(got) = m {
            fds.extend(got);
        }
    }
    if msg.flags.contains(ReturnFlags::CTRUNC) {
        return Err(std::io::Error::other(
            "control data truncated (more descriptors than expected)",
        ));
    }
    Ok(msg.bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn frames_round_trip() {
        let mut buf = encode(kind::RELEASE, &42u64.to_le_bytes());
        buf.extend(encode(kind::BYE, &[]));
        let (f, n) = parse_frame(&buf, MAX_FRAME).unwrap().unwrap();
        assert_eq!(f, Frame::Release(42));
        let (f, m) = parse_frame(&buf[n..], MAX_FRAME).unwrap().unwrap();
        assert_eq!(f, Frame::Bye);
        assert_eq!(n + m, buf.len());
        assert_eq!(parse_frame(&buf[..3], MAX_FRAME).unwrap(), None);
        assert_eq!(parse_frame(&buf[..8], MAX_FRAME).unwrap(), None);
    }

    #[test]
    fn bad_frames_are_named() {
        let p = |b: &[u8]| parse_frame(b, MAX_FRAME);
        assert_eq!(
            p(&[0, 0, 0, 0]),
            Err(ProtocolError::Length {
                len: 0,
                max: MAX_FRAME
            })
        );
        assert_eq!(
            p(&u32::MAX.to_le_bytes()),
            Err(ProtocolError::Length {
                len: u32::MAX as u64,
                max: MAX_FRAME
            })
        );
        assert_eq!(p(&encode(9, b"x")), Err(ProtocolError::Type(9)));
        assert_eq!(
            p(&encode(kind::WELCOME, b"{}")),
            Err(ProtocolError::Type(2))
        );
        assert!(matches!(
            p(&encode(kind::RELEASE, b"abc")),
            Err(ProtocolError::Payload { expected: 8, .. })
        ));
        // A frame is named by its type and size, never by its payload.
        assert_eq!(
            Frame::Hello(vec![b'x'; 60_000]).to_string(),
            "HELLO (60000 payload bytes)"
        );
        assert_eq!(Frame::Release(7).to_string(), "RELEASE 7");
    }

    /// A HELLO longer than [`MAX_FRAME`] (a cursor blob of hundreds of domains) is read
    /// whole where the reader allows it, and refused, naming the limit, where it does not;
    /// a RELEASE may never be that long.
    #[test]
    fn json_frames_may_outgrow_max_frame_where_the_reader_allows() {
        let big = vec![b' '; 3 * MAX_FRAME];
        let wire = encode_checked(kind::HELLO, &big).unwrap();
        let (f, n) = parse_frame(&wire, 4 * MAX_FRAME).unwrap().unwrap();
        assert_eq!((f, n), (Frame::Hello(big.clone()), wire.len()));
        assert_eq!(
            parse_frame(&wire[..HEADER], 2 * MAX_FRAME),
            Err(ProtocolError::Length {
                len: 3 * MAX_FRAME as u64 + 1,
                max: 2 * MAX_FRAME
            })
        );
        let e = parse_frame(&wire, MAX_FRAME).unwrap_err().to_string();
        assert_eq!(
            e,
            format!("frame length {} is outside 1..=65536", 3 * MAX_FRAME + 1)
        );
        assert!(encode_checked(kind::RELEASE, &big).is_err());
        assert!(encode_checked(kind::CONTROL, &vec![b' '; MAX_JSON_FRAME]).is_err());
        assert_eq!(read_from(&mut &wire[..]).unwrap(), (kind::HELLO, big));
    }

    /// The bytes of a frame are fixed by PROTOCOL.md: the codec must not drift from them.
    #[test]
    fn encoding_is_the_documented_bytes() {
        assert_eq!(
            encode(kind::RELEASE, &7u64.to_le_bytes()),
            [9, 0, 0, 0, 4, 7, 0, 0, 0, 0, 0, 0, 0]
        );
        assert_eq!(encode(kind::BYE, &[]), [1, 0, 0, 0, 6]);
        assert_eq!(
            encode_checked(kind::BYE, &[0; MAX_FRAME]),
            Err(ProtocolError::Length {
                len: MAX_FRAME as u64 + 1,
                max: MAX_FRAME
            })
        );
        assert!(encode_checked(kind::CONTROL, &vec![b' '; MAX_JSON_FRAME - 1]).is_ok());
    }

    /// The blocking reader agrees with the byte parser and names a bad length.
    #[test]
    fn blocking_reader_reads_what_encode_wrote() {
        let mut wire = Vec::new();
        write_to(&mut wire, kind::CONTROL_REPLY, b"{\"ok\":true}").unwrap();
        write_to(&mut wire, kind::BYE, &[]).unwrap();
        let mut r = &wire[..];
        assert_eq!(
            read_from(&mut r).unwrap(),
            (kind::CONTROL_REPLY, b"{\"ok\":true}".to_vec())
        );
        assert_eq!(read_from(&mut r).unwrap(), (kind::BYE, vec![]));
        let e = read_from(&mut &[0u8, 0, 0, 0][..]).unwrap_err();
        assert!(e.to_string().contains("frame length 0"), "{e}");
        assert!(write_to(&mut Vec::new(), kind::CONTROL, &vec![0; MAX_JSON_FRAME]).is_err());
    }

    /// Descriptors ride on the first byte and arrive close-on-exec; more than the
    /// receiver has room for is an error, not a silent loss.
    #[test]
    fn fds_travel_with_the_bytes() {
        use std::os::fd::AsFd;
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let f = tempfile::tempfile().unwrap();
        let bytes = encode(kind::BYE, &[]);
        assert_eq!(
            send_fds(&a, &bytes, &[f.as_fd(), b.as_fd()]).unwrap(),
            bytes.len()
        );
        let (mut buf, mut fds) = ([0u8; 16], Vec::new());
        assert_eq!(recv_with_fds(&b, &mut buf, &mut fds).unwrap(), bytes.len());
        assert_eq!(&buf[..bytes.len()], &bytes[..]);
        assert_eq!(fds.len(), 2);
        for fd in &fds {
            let flags = rustix::io::fcntl_getfd(fd).unwrap();
            assert!(flags.contains(rustix::io::FdFlags::CLOEXEC));
        }
        let many = vec![f.as_fd(); 40];
        send_fds(&a, &bytes, &many).unwrap();
        let e = recv_with_fds(&b, &mut buf, &mut fds).unwrap_err();
        assert!(e.to_string().contains("truncated"), "{e}");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4096))]
        /// Frames cut at any point parse as "need more", then whole.
        #[test]
        fn split_frames_wait(upto in any::<u64>(), cut in 0usize..13) {
            let buf = encode(kind::RELEASE, &upto.to_le_bytes());
            let cut = cut.min(buf.len() - 1);
            prop_assert_eq!(parse_frame(&buf[..cut], MAX_FRAME).unwrap(), None);
            prop_assert_eq!(
                parse_frame(&buf, MAX_FRAME).unwrap(),
                Some((Frame::Release(upto), buf.len()))
            );
        }
    }
}
