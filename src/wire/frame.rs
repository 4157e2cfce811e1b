//! The frame codec of docs/PROTOCOL.md section 1, written once: a u32 little-endian
//! length of type byte + payload, the type byte, the payload; at most [`MAX_FRAME`]
//! bytes after the length. Fds ride on a frame's first byte as SCM_RIGHTS.
//!
//! Everything that reads or writes a frame goes through here: the daemon's async read
//! path feeds [`parse_frame`] what the socket gave, and the blocking readers of the Rust
//! client, `millrace ctl` and the tests go through [`read_with`], so the header and
//! length rules exist in one place. Decoding is a pure function over bytes so that a
//! property test can throw arbitrary input at it.

use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

/// Bytes of the length prefix in front of every frame.
pub const HEADER: usize = 4;
/// Largest `len` a frame may declare: bounds what one client can make the daemon buffer.
pub const MAX_FRAME: usize = 65536;

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

/// A violation of the framing rules; the connection is closed with this message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// Declared length 0 or above [`MAX_FRAME`].
    #[error("frame length {0} is outside 1..={MAX_FRAME}")]
    Length(u64),
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

/// The `len` a frame header declares, checked against 1..=[`MAX_FRAME`]: the one place
/// the length rule is applied, by every reader.
pub fn body_len(head: [u8; HEADER]) -> Result<usize, ProtocolError> {
    let len = u32::from_le_bytes(head) as usize;
    if len == 0 || len > MAX_FRAME {
        return Err(ProtocolError::Length(len as u64));
    }
    Ok(len)
}

/// One frame of any type, borrowed from a buffer: (type, payload, bytes used).
pub type Split<'a> = (u8, &'a [u8], usize);

/// Splits one frame of any type off the front of `buf`: `Ok(None)` when more bytes are
/// needed, otherwise the frame. Never panics, whatever `buf` holds.
pub fn split(buf: &[u8]) -> Result<Option<Split<'_>>, ProtocolError> {
    let Some(head) = buf.get(..HEADER) else {
        return Ok(None);
    };
    let len = body_len([head[0], head[1], head[2], head[3]])?;
    let Some(body) = buf.get(HEADER..HEADER + len) else {
        return Ok(None);
    };
    Ok(Some((body[0], &body[1..], HEADER + len)))
}

/// Parses one client-to-daemon frame from the front of `buf`: `Ok(None)` when more bytes
/// are needed, otherwise the frame and how many bytes it used. Never panics.
pub fn parse_frame(buf: &[u8]) -> Result<Option<(Frame, usize)>, ProtocolError> {
    let Some((kind, payload, used)) = split(buf)? else {
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
/// [`MAX_FRAME`] (the daemon bounds its replies before encoding).
pub fn encode(kind: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + 1 + payload.len());
    out.extend_from_slice(&(payload.len() as u32 + 1).to_le_bytes());
    out.push(kind);
    out.extend_from_slice(payload);
    out
}

/// Encodes a frame of `kind`, refusing a payload that does not fit [`MAX_FRAME`]: what
/// clients use, since their payloads come from callers.
pub fn encode_checked(kind: u8, payload: &[u8]) -> Result<Vec<u8>, ProtocolError> {
    let len = payload.len() + 1;
    if len > MAX_FRAME {
        return Err(ProtocolError::Length(len as u64));
    }
    Ok(encode(kind, payload))
}

/// Reads one whole frame through `fill`, which fills the whole slice it is given or
/// fails (`inside` is false for the header, true once a frame has begun, so a reader can
/// tell a clean close from one mid-frame); a bad length becomes an `E` through
/// `bad_length`. Returns (type, payload). Every blocking reader is built on this.
pub fn read_with<E>(
    mut fill: impl FnMut(&mut [u8], bool) -> Result<(), E>,
    bad_length: impl FnOnce(ProtocolError) -> E,
) -> Result<(u8, Vec<u8>), E> {
    let mut head = [0u8; HEADER];
    fill(&mut head, false)?;
    let len = body_len(head).map_err(bad_length)?;
    let mut body = vec![0u8; len];
    fill(&mut body, true)?;
    let payload = body.split_off(1);
    Ok((body[0], payload))
}

/// Reads one frame from a blocking reader (tests, stand-in daemons); a bad length is an
/// `InvalidData` error.
pub fn read_from(r: &mut impl Read) -> std::io::Result<(u8, Vec<u8>)> {
    read_with(
        |buf, _| r.read_exact(buf),
        |e| std::io::Error::new(std::io::ErrorKind::InvalidData, e),
    )
}

/// Writes one frame to a blocking writer; an oversized payload is an `InvalidInput` error.
pub fn write_to(w: &mut impl Write, kind: u8, payload: &[u8]) -> std::io::Result<()> {
    let frame = encode_checked(kind, payload)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    w.write_all(&frame)
}

/// Sends `bytes` on the stream socket `fd` with `fds` attached to its first byte.
/// Returns how many bytes went out (the caller writes any rest normally).
pub fn send_with_fds(fd: RawFd, bytes: &[u8], fds: &[RawFd]) -> std::io::Result<usize> {
    let fd_bytes = std::mem::size_of_val(fds);
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE(fd_bytes as u32) } as usize;
    let mut control = vec![0u8; space];
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    // SAFETY: msghdr is plain data; every pointer set below outlives the sendmsg call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
    msg.msg_controllen = space as _;
    // SAFETY: the control buffer is CMSG_SPACE(fd_bytes) long, so the first header and
    // its data fit; we write exactly fd_bytes of fd numbers.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(fd_bytes as u32) as _;
        std::ptr::copy_nonoverlapping(fds.as_ptr() as *const u8, libc::CMSG_DATA(cmsg), fd_bytes);
    }
    // SAFETY: a valid msghdr on a socket fd; MSG_NOSIGNAL turns a dead peer into EPIPE.
    let n = unsafe { libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT) };
    if n < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// One `recvmsg` on the stream socket `fd`, collecting any SCM_RIGHTS fds into `fds`
/// (close-on-exec); returns the bytes read. `EINTR` is retried here.
pub fn recv_with_fds(fd: RawFd, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> std::io::Result<usize> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // Room for 16 descriptors, 8-aligned as cmsghdr needs.
    let mut cbuf = [0u64; 16];
    // SAFETY: a zeroed msghdr is a valid empty one; we fill in the buffers below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&cbuf) as _;
    let n = loop {
        // SAFETY: msg points at live buffers of the sizes it states.
        let r = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if r >= 0 {
            break r as usize;
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    };
    // SAFETY: walking the control buffer the kernel filled, with the libc macros.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c);
                let header = data as usize - c as usize;
                let count = ((*c).cmsg_len as usize).saturating_sub(header)
                    / std::mem::size_of::<libc::c_int>();
                for i in 0..count {
                    let raw = std::ptr::read_unaligned((data as *const libc::c_int).add(i));
                    fds.push(OwnedFd::from_raw_fd(raw));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(std::io::Error::other(
            "control data truncated (more descriptors than expected)",
        ));
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn frames_round_trip() {
        let mut buf = encode(kind::RELEASE, &42u64.to_le_bytes());
        buf.extend(encode(kind::BYE, &[]));
        let (f, n) = parse_frame(&buf).unwrap().unwrap();
        assert_eq!(f, Frame::Release(42));
        let (f, m) = parse_frame(&buf[n..]).unwrap().unwrap();
        assert_eq!(f, Frame::Bye);
        assert_eq!(n + m, buf.len());
        assert_eq!(parse_frame(&buf[..3]).unwrap(), None);
        assert_eq!(parse_frame(&buf[..8]).unwrap(), None);
    }

    #[test]
    fn bad_frames_are_named() {
        assert_eq!(parse_frame(&[0, 0, 0, 0]), Err(ProtocolError::Length(0)));
        assert_eq!(
            parse_frame(&u32::MAX.to_le_bytes()),
            Err(ProtocolError::Length(u32::MAX as u64))
        );
        assert_eq!(parse_frame(&encode(9, b"x")), Err(ProtocolError::Type(9)));
        assert_eq!(
            parse_frame(&encode(kind::WELCOME, b"{}")),
            Err(ProtocolError::Type(2))
        );
        assert!(matches!(
            parse_frame(&encode(kind::RELEASE, b"abc")),
            Err(ProtocolError::Payload { expected: 8, .. })
        ));
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
            encode_checked(kind::CONTROL, &vec![b' '; MAX_FRAME]),
            Err(ProtocolError::Length(MAX_FRAME as u64 + 1))
        );
        assert!(encode_checked(kind::CONTROL, &vec![b' '; MAX_FRAME - 1]).is_ok());
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
        assert!(write_to(&mut Vec::new(), kind::CONTROL, &vec![0; MAX_FRAME]).is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4096))]
        /// Frames cut at any point parse as "need more", then whole.
        #[test]
        fn split_frames_wait(upto in any::<u64>(), cut in 0usize..13) {
            let buf = encode(kind::RELEASE, &upto.to_le_bytes());
            let cut = cut.min(buf.len() - 1);
            prop_assert_eq!(parse_frame(&buf[..cut]).unwrap(), None);
            prop_assert_eq!(parse_frame(&buf).unwrap(), Some((Frame::Release(upto), buf.len())));
        }
    }
}
