//! The client against fake daemons: well-formed and malformed WELCOMEs, rings and
//! frames (which the real daemon never sends), and the pure helpers.

use super::layout::{self, Layout};
use super::*;
use crate::corpus::Tokens;

/// A connect error is transient only when the daemon may come back there (no socket
/// file yet, nobody listening, a full backlog); a permission error or a path that is no
/// socket is not, so `reconnect` and `consume --reconnect-timeout` no longer spin on it.
#[test]
fn only_a_daemon_not_there_yet_is_a_transient_connect_error() {
    let connect = |errno| ClientError::Connect {
        path: "/run/millrace/millrace.sock".into(),
        error: std::io::Error::from_raw_os_error(errno),
    };
    for e in [libc::ENOENT, libc::ECONNREFUSED, libc::EAGAIN] {
        assert!(connect(e).is_transient(), "errno {e}");
    }
    for e in [libc::EACCES, libc::ENOTSOCK, libc::ENAMETOOLONG] {
        assert!(!connect(e).is_transient(), "errno {e}");
    }
    // A real one: no socket file yet, as while the daemon restarts (ENOENT).
    let dir = tempfile::tempdir().unwrap();
    let e = match Client::connect(dir.path().join("none.sock"), &Hello::new(0, 1, 2, 1)) {
        Err(e) => e,
        Ok(_) => panic!("connected to nothing"),
    };
    assert!(e.is_transient(), "{e}");
}

#[test]
fn hex_round_trips() {
    let b = [0u8, 1, 0xab, 0xff];
    assert_eq!(to_hex(&b), "0001abff");
    assert_eq!(from_hex("0001ABff"), Some(b.to_vec()));
    assert_eq!(from_hex("0"), None);
    assert_eq!(from_hex("zz"), None);
}

/// A WELCOME field: where an array lies in the slot, its dtype and shape.
fn f(offset: u64, dtype: &str, shape: Vec<u64>) -> FieldSpec {
    FieldSpec {
        offset,
        dtype: dtype.into(),
        shape,
    }
}

fn welcome() -> Welcome {
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
        protocol: PROTOCOL,
        release_page: false,
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
        slot_layout: SlotLayout::Expanded,
        ring_bytes: 3 * 4096,
        fields,
        vocab_size: None,
        stages: Vec::new(),
    }
}

/// The field offsets of `welcome()`'s slot, as its header's table lists them.
const OFFSETS: [u64; 8] = [256, 320, 384, 448, 512, 640, 704, 768];

/// WELCOME's later stages are checked (information only), and a slot is read at the
/// shape and offsets of its header, one that points past the slot refused.
#[test]
fn later_stages_are_checked_and_slots_read_by_their_header() {
    let w = welcome();
    let first = crate::wire::StageSpec {
        fields: w.fields.clone(),
        micro_batch_rows: 2,
        rows: 2,
        seq_len: 8,
        step: 0,
    };
    let mut later = first.clone();
    later.step = 5;
    later.rows = 1;
    later.seq_len = 16;
    later.micro_batch_rows = 1;
    for (name, shape) in [
        ("tokens", vec![1, 16]),
        ("labels", vec![1, 16]),
        ("loss_mask", vec![1, 16]),
        ("position_ids", vec![1, 16]),
        ("domain", vec![1]),
        ("row_loss_tokens", vec![1]),
    ] {
        if let Some(f) = later.fields.get_mut(name) {
            f.shape = shape;
        }
    }
    let staged = Welcome {
        stages: vec![first.clone(), later.clone()],
        ..w.clone()
    };
    let l = Layout::from_welcome(&staged).unwrap();
    assert_eq!((l.rows, l.seq_len), (2, 8));
    // A stage WELCOME never listed (one added live): the header alone places it.
    let s = Layout::of_slot(&w, &(1, 16, OFFSETS)).unwrap();
    assert_eq!(
        (s.rows, s.seq_len, s.cursor.len, s.cursor.offset),
        (1, 16, 256, 768)
    );
    assert!(
        matches!(s.arrays, layout::Arrays::Expanded { cu_seqlens, .. } if cu_seqlens.len == 17)
    );
    let mut past = OFFSETS;
    past[7] = 4000;
    let e = Layout::of_slot(&w, &(1, 16, past)).unwrap_err().to_string();
    assert!(
        e.contains("slot header") && e.contains("field cursor"),
        "{e}"
    );
    // Rows that overrun the next array's offset still fit the slot, but a shape
    // whose arrays end past it does not.
    let e = Layout::of_slot(&w, &(4, 256, OFFSETS))
        .unwrap_err()
        .to_string();
    assert!(e.contains("do not fit a 4096-byte slot"), "{e}");
    let mut past = later.clone();
    if let Some(f) = past.fields.get_mut("cursor") {
        f.offset = 4000;
    }
    let e = Layout::from_welcome(&Welcome {
        stages: vec![first.clone(), past],
        ..w.clone()
    })
    .unwrap_err()
    .to_string();
    assert!(e.contains("field cursor"), "{e}");
    let mut early = later;
    early.step = 0;
    let e = Layout::from_welcome(&Welcome {
        stages: vec![first, early],
        ..w
    })
    .unwrap_err()
    .to_string();
    assert!(e.contains("stage 1 starts at plan step 0"), "{e}");
}

#[test]
fn a_good_layout_validates() {
    let l = Layout::from_welcome(&welcome()).unwrap();
    assert!(matches!(l.arrays, layout::Arrays::Expanded { tokens, .. } if tokens.len == 16));
    assert_eq!(l.cursor.len, 256);
    // The same fields announced as compact are refused: a compact slot has `rows`.
    let mut w = welcome();
    w.slot_layout = SlotLayout::Compact;
    let e = Layout::from_welcome(&w).unwrap_err().to_string();
    assert!(e.contains("no field \"rows\""), "{e}");
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
        Box::new(|w| w.protocol = 1),
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

use crate::sys::EventFd;
use crate::wire::frame::{encode, read_from, send_fds};
use crate::wire::ring::{put_u32, put_u64, ring_at, slot_at};
use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::Duration;

/// A memfd holding `ring`, sized `len`, sealed against resizing as the daemon's rings are.
fn memfd(ring: &[u8], len: usize) -> OwnedFd {
    let fd = unsealed_memfd(ring, len);
    let seals = rustix::fs::SealFlags::SHRINK | rustix::fs::SealFlags::GROW;
    rustix::fs::fcntl_add_seals(&fd, seals).unwrap();
    fd
}

/// [`memfd`] without the seals: one that can be cut under a client's mapping.
fn unsealed_memfd(ring: &[u8], len: usize) -> OwnedFd {
    use rustix::fs::MemfdFlags;
    let flags = MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING;
    let fd = rustix::fs::memfd_create(c"test-ring", flags).unwrap();
    let mut f = std::fs::File::from(fd);
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
    put_u32(slot, slot_at::MAX_SEQLEN, 8);
    put_u32(slot, slot_at::CURSOR_LEN, 4);
    for (i, o) in OFFSETS.iter().enumerate() {
        put_u64(slot, slot_at::FIELD_OFFSETS + 8 * i, *o);
    }
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
        let ev = EventFd::new().unwrap();
        let payload = serde_json::to_vec(&w).unwrap();
        let bytes = encode(frame::WELCOME, &payload);
        let sent = send_fds(&*s, &bytes, &[fd.as_fd(), ev.as_fd()]).unwrap();
        assert_eq!(sent, bytes.len());
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
    assert_eq!((b.step, b.cu_len, b.max_seqlen), (0, 3, 8));
    let e = b.expanded();
    assert_eq!((e.tokens[0], e.tokens[15]), (100, 115));
    assert_eq!(e.cu_seqlens, [0, 8, 16]);
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

    // A ring the daemon could shrink under the mapping (a SIGBUS at the next read of a
    // slot): refused when connecting, not trusted.
    let r = connect_fake(|s| {
        let fd = unsealed_memfd(&ring(0, 1), 3 * 4096);
        let ev = EventFd::new().unwrap();
        let payload = serde_json::to_vec(&welcome()).unwrap();
        let bytes = encode(frame::WELCOME, &payload);
        send_fds(&*s, &bytes, &[fd.as_fd(), ev.as_fd()]).unwrap();
    });
    let e = r.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(e.contains("not sealed against shrinking"), "{e}");
    // The same for a release page (the client stores its releases there).
    let r = connect_fake(|s| {
        let fd = memfd(&ring(0, 1), 3 * 4096);
        let ev = EventFd::new().unwrap();
        let page = unsealed_memfd(&[0; 4096], 4096);
        let mut w = welcome();
        w.release_page = true;
        let bytes = encode(frame::WELCOME, &serde_json::to_vec(&w).unwrap());
        send_fds(&*s, &bytes, &[fd.as_fd(), ev.as_fd(), page.as_fd()]).unwrap();
    });
    let e = r.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(e.contains("release page memfd is not sealed"), "{e}");

    let wrong_step = connect_fake(welcome_with(ring(7, 1), 3 * 4096, |_| {}));
    assert!(matches!(
        wrong_step.unwrap().next_batch(),
        Err(ClientError::Ring(_))
    ));
    let mut big_cu = ring(0, 1);
    put_u32(&mut big_cu[4096..], slot_at::CU_LEN, 1000);
    let r = connect_fake(welcome_with(big_cu, 3 * 4096, |_| {}));
    assert!(matches!(r.unwrap().next_batch(), Err(ClientError::Ring(_))));
    // Header counts no slot of its shape can have: a cu_len that leaves a row without its
    // end entry, a max_seqlen (flash attention's, taken as is) of 0 or past seq_len.
    for (at, v, field) in [
        (slot_at::CU_LEN, 2, "cu_len 2 outside 3..=17"),
        (slot_at::MAX_SEQLEN, 0, "max_seqlen 0 is not in 1..=8"),
        (slot_at::MAX_SEQLEN, 9, "max_seqlen 9 is not in 1..=8"),
    ] {
        let mut bad = ring(0, 1);
        put_u32(&mut bad[4096..], at, v);
        let r = connect_fake(welcome_with(bad, 3 * 4096, |_| {}));
        let e = r.unwrap().next_batch().err();
        assert!(
            matches!(&e, Some(ClientError::Ring(m)) if m.contains(field)),
            "{field}: {e:?}"
        );
    }
    let mut big_cursor = ring(0, 1);
    put_u32(&mut big_cursor[4096..], slot_at::CURSOR_LEN, u32::MAX);
    let r = connect_fake(welcome_with(big_cursor, 3 * 4096, |_| {}));
    assert!(matches!(r.unwrap().next_batch(), Err(ClientError::Ring(_))));
    // A header whose offset table points an array past the slot: a protocol error.
    let mut wild = ring(0, 1);
    put_u64(&mut wild[4096..], slot_at::FIELD_OFFSETS, u64::MAX - 7);
    let r = connect_fake(welcome_with(wild, 3 * 4096, |_| {}));
    let e = r.unwrap().next_batch().err().map(|e| e.to_string());
    assert!(
        e.as_deref().is_some_and(|m| m.contains("field tokens")),
        "{e:?}"
    );
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
    // A WELCOME of another protocol, laid out otherwise (protocol 1 had no
    // `slot_layout`): the version is the error, not the field it lacks.
    let r = connect_fake(|s| {
        let mut w = serde_json::to_value(welcome()).unwrap();
        w["protocol"] = 1.into();
        w.as_object_mut().unwrap().remove("slot_layout");
        let w = serde_json::to_vec(&w).unwrap();
        s.write_all(&encode(frame::WELCOME, &w)).unwrap()
    });
    let e = r.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(e.contains("protocol 1 (this client speaks 2)"), "{e}");
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

/// A step published together with the daemon's ERROR (a ring that stops at its last
/// step publishes it, then errs) is read before the ERROR is raised: the client took
/// the socket's event ahead of the step when both woke the same wait.
#[test]
fn a_step_published_before_an_error_is_read_first() {
    let mut c = connect_fake(|s| {
        let fd = memfd(&ring(0, 0), 3 * 4096);
        let ev = EventFd::new().unwrap();
        let bytes = encode(frame::WELCOME, &serde_json::to_vec(&welcome()).unwrap());
        send_fds(&*s, &bytes, &[fd.as_fd(), ev.as_fd()]).unwrap();
        // The client is waiting for step 0 by now (it would see it at once otherwise).
        std::thread::sleep(Duration::from_millis(200));
        let f = std::fs::File::from(fd);
        std::os::unix::fs::FileExt::write_all_at(
            &f,
            &1u64.to_le_bytes(),
            ring_at::PUBLISHED as u64,
        )
        .unwrap();
        s.write_all(&encode(
            frame::ERROR,
            br#"{"code":"limit","message":"the last step"}"#,
        ))
        .unwrap();
        ev.signal();
        s.shutdown(std::net::Shutdown::Both).unwrap();
    })
    .unwrap();
    c.set_timeout(Some(Duration::from_secs(30)));
    let step = c.next_batch().map(|b| b.step);
    assert_eq!(step.ok(), Some(0), "the published step comes first");
    let e = c.next_batch().err();
    assert!(
        matches!(&e, Some(ClientError::Daemon { code, .. }) if code == "limit"),
        "{e:?}"
    );
}

/// The derivations of a compact slot, on a hand-made one: two rows of 8 inputs (9
/// tokens); row 0 holds a 3-token piece, a 1-token piece, a 5-token piece running into
/// the label-only position; row 1 a 4-token piece, then padding (pad 0).
#[test]
fn compact_rows_derive_the_expanded_arrays() {
    let ids: Vec<i32> = vec![
        10, 11, 12, 20, 30, 31, 32, 33, 34, //
        40, 41, 42, 43, 0, 0, 0, 0, 0,
    ];
    // Starts at 0, 3, 4 (row 0); 0 (row 1); padding's start comes from the count.
    let starts = [0b0001_1001u8, 0, 0b0000_0001, 0];
    let e = derive::from_compact(Tokens::Int32(&ids), &starts, &[9, 4], 2, 8);
    assert_eq!(e.tokens[..8], [10, 11, 12, 20, 30, 31, 32, 33]);
    assert_eq!(e.labels[..8], [11, 12, 20, 30, 31, 32, 33, 34]);
    assert_eq!(
        e.position_ids,
        [0, 1, 2, 0, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3]
    );
    assert_eq!(
        e.loss_mask,
        [1, 1, 0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0]
    );
    assert_eq!(e.cu_seqlens, [0, 3, 4, 8, 12, 16]);
}

/// A compact slot's `row_bounds` are checked when read (PROTOCOL.md section 4): entries
/// that rise to `cu_len - 1` with pieces of `1..=seq_len` pass; any other is an error
/// naming the row, never a slice a caller could take out of range.
#[test]
fn row_bounds_are_checked_against_cu_len_and_seq_len() {
    use super::connection::checked_bounds;
    // Two rows of 8: pieces 3+5 | 8, so cu_seqlens = [0, 3, 8, 16] (cu_len 4).
    let good = [2, 5, 3, 8];
    assert_eq!(checked_bounds(&good, 4, 8, 7).unwrap(), &good);
    for bad in [
        [2, 5, 4, 8],  // past cu_len - 1
        [2, 5, 2, 8],  // does not rise
        [2, 0, 3, 8],  // an empty piece
        [2, 9, 3, 8],  // longer than a row
        [1, 5, 2, 8],  // ends before cu_len - 1
        [-1, 5, 3, 8], // negative
    ] {
        let e = checked_bounds(&bad, 4, 8, 7).unwrap_err().to_string();
        assert!(
            e.contains("step 7") && e.contains("row_bounds"),
            "{bad:?}: {e}"
        );
    }
}

/// A compact ring of two slots of 2 rows of 8, cursors `C0` and `C1`; step 1's
/// `row_bounds` do not rise (a corrupt slot).
fn compact_ring_with_a_bad_second_slot() -> (Welcome, Vec<u8>) {
    let mut fields: BTreeMap<String, FieldSpec> = BTreeMap::new();
    fields.insert("rows".into(), f(256, "int32", vec![2, 9]));
    fields.insert("doc_starts".into(), f(384, "uint8", vec![2, 2]));
    fields.insert("row_real_tokens".into(), f(448, "int32", vec![2]));
    fields.insert("domain".into(), f(512, "int32", vec![2]));
    fields.insert("row_loss_tokens".into(), f(576, "int32", vec![2]));
    fields.insert("cursor".into(), f(640, "uint8", vec![256]));
    fields.insert("row_bounds".into(), f(896, "int32", vec![2, 2]));
    let mut w = welcome();
    w.slot_layout = SlotLayout::Compact;
    w.rows = 2;
    w.seq_len = 8;
    w.micro_batch_rows = 2;
    w.fields = fields;
    let mut r = vec![0u8; 3 * 4096];
    r[..8].copy_from_slice(RING_MAGIC);
    put_u32(&mut r, ring_at::VERSION, 1);
    put_u32(&mut r, ring_at::SLOTS, 2);
    put_u64(&mut r, ring_at::SLOT_BYTES, 4096);
    put_u64(&mut r, ring_at::SLOT_OFFSET, 4096);
    put_u64(&mut r, ring_at::PUBLISHED, 2);
    for step in 0..2u64 {
        let s = 4096 * (1 + step as usize);
        let slot = &mut r[s..s + 4096];
        put_u64(slot, slot_at::STEP, step);
        put_u32(slot, slot_at::ROWS, 2);
        put_u32(slot, slot_at::SEQ_LEN, 8);
        put_u32(slot, slot_at::CU_LEN, 3);
        put_u32(slot, slot_at::MAX_SEQLEN, 8);
        put_u32(slot, slot_at::CURSOR_LEN, 2);
        for (i, o) in [256u64, 384, 448, 512, 576, 640, 896, 0].iter().enumerate() {
            put_u64(slot, slot_at::FIELD_OFFSETS + 8 * i, *o);
        }
        for row in 0..2 {
            slot[448 + 4 * row..452 + 4 * row].copy_from_slice(&8i32.to_le_bytes());
        }
        slot[640..642].copy_from_slice(if step == 0 { b"C0" } else { b"C1" });
        // One document a row: cu_seqlens [0, 8, 16], each row's last entry and longest
        // piece; step 1's do not rise.
        let bounds: [i32; 4] = if step == 0 {
            [1, 8, 2, 8]
        } else {
            [2, 8, 2, 8]
        };
        for (i, v) in bounds.iter().enumerate() {
            slot[896 + 4 * i..900 + 4 * i].copy_from_slice(&v.to_le_bytes());
        }
    }
    (w, r)
}

/// A slot refused after its cursor was read (its `row_bounds` do not fit) left
/// `last_cursor` at that slot's blob while `last_step` stayed at the step before: a
/// trainer that caught the error and saved `last_cursor` resumed one step late, losing
/// the step. The resume point moves only with a step handed out.
#[test]
fn a_refused_slot_does_not_move_the_resume_point() {
    let (w, ring) = compact_ring_with_a_bad_second_slot();
    let mut c = connect_fake(move |s: &mut UnixStream| {
        let fd = memfd(&ring, 3 * 4096);
        let ev = EventFd::new().unwrap();
        let bytes = encode(frame::WELCOME, &serde_json::to_vec(&w).unwrap());
        send_fds(&*s, &bytes, &[fd.as_fd(), ev.as_fd()]).unwrap();
    })
    .unwrap();
    c.set_timeout(Some(Duration::from_millis(200)));
    let b = c.next_batch().unwrap();
    assert_eq!((b.step, b.cursor), (0, &b"C0"[..]));
    let e = c.next_batch().map(|b| b.step).unwrap_err().to_string();
    assert!(e.contains("step 1") && e.contains("row_bounds"), "{e}");
    assert_eq!(c.last_step(), Some(0));
    assert_eq!(c.last_cursor(), Some(&b"C0"[..]));
}

/// Steps published before the daemon went away are read before its end, also when a
/// RELEASE frame is what meets the closed socket. A client that returned that error at
/// once rejoined a restarted daemon at its own next step, while a TP twin whose batched
/// RELEASE did not fall on that step read on from the old mapping: the new ring waited
/// for the twin, and the twin for it in the step's collective.
#[test]
fn a_release_that_meets_the_closed_socket_leaves_the_published_steps_to_read() {
    let mut r = ring(0, 2);
    let (head, second) = r.split_at_mut(2 * 4096);
    second.copy_from_slice(&head[4096..]);
    put_u64(&mut r[2 * 4096..], slot_at::STEP, 1);
    let (closed_tx, closed) = std::sync::mpsc::channel();
    let mut c = connect_fake(move |s: &mut UnixStream| {
        welcome_with(r, 3 * 4096, |_| {})(s);
        s.shutdown(std::net::Shutdown::Both).unwrap();
        closed_tx.send(()).unwrap();
    })
    .unwrap();
    c.set_timeout(Some(Duration::from_secs(5)));
    assert_eq!(c.next_batch().unwrap().step, 0);
    closed.recv().unwrap();
    // This call's RELEASE of step 0 meets the closed socket; step 1 was published.
    assert_eq!(c.next_batch().unwrap().step, 1);
    assert_eq!(c.last_step(), Some(1));
    let e = c.next_batch().map(|b| b.step).unwrap_err();
    assert!(e.is_transient(), "the daemon went: reconnect ({e})");
}

/// A daemon that takes the HELLO and sends nothing (a long seek) holds the client for
/// the handshake it was given, not the default 30 s: `consume --timeout` passes its own.
#[test]
fn a_slow_welcome_waits_as_long_as_the_handshake_given() {
    let (_dir, path) = fake(|_| std::thread::sleep(Duration::from_secs(3)));
    let t = std::time::Instant::now();
    let r = Client::connect_within(&path, &Hello::new(0, 1, 2, 1), Duration::from_millis(200));
    assert!(r.is_err(), "no WELCOME came");
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
}

/// The expanded arrays of rows given as document pieces, built the way the daemon fills
/// an expanded slot (src/serve/fill/mod.rs `fill_typed`), independently of
/// `derive.rs`: per row its tokens `t` (`t.len()` real, at most `seq_len + 1`) and the
/// piece lengths that make them up. Returns the arrays, `cu_len`, `max_seqlen` and each
/// row's `(end entry, longest piece)`.
fn expanded_like_the_daemon(
    rows: &[(Vec<i64>, Vec<usize>)],
    l: usize,
    pad: i64,
) -> (derive::Expanded, usize, i32, Vec<(i32, i32)>) {
    let n = rows.len() * l;
    let mut e = derive::Expanded {
        tokens: vec![pad; n],
        labels: vec![pad; n],
        loss_mask: vec![0; n],
        position_ids: vec![0; n],
        cu_seqlens: vec![0],
    };
    let (mut max_seqlen, mut bounds) = (0usize, Vec::new());
    for (r, (t, pieces)) in rows.iter().enumerate() {
        let base = r * l;
        let (mut p, mut longest) = (0usize, 0usize);
        for &n in pieces {
            let end = (p + n).min(l);
            if end > p {
                e.tokens[base + p..base + end].copy_from_slice(&t[p..end]);
                for (k, v) in e.position_ids[base + p..base + end].iter_mut().enumerate() {
                    *v = k as i32;
                }
            }
            // Label position i holds t[i + 1]: from the input before the piece (the
            // previous piece's last input predicts this piece's first token).
            let (a, b) = (p.saturating_sub(1), (p + n - 1).min(l));
            if b > a {
                e.labels[base + a..base + b].copy_from_slice(&t[a + 1..b + 1]);
            }
            if end > p {
                for i in p..(p + n - 1).min(l) {
                    e.loss_mask[base + i] = 1;
                }
                e.cu_seqlens.push((base + end) as i32);
                longest = longest.max(end - p);
            }
            p += n;
        }
        if p < l {
            for i in p..l {
                e.position_ids[base + i] = (i - p) as i32;
            }
            e.cu_seqlens.push((base + l) as i32);
            longest = longest.max(l - p);
        }
        max_seqlen = max_seqlen.max(longest);
        bounds.push((e.cu_seqlens.len() as i32 - 1, longest as i32));
    }
    let cu_len = e.cu_seqlens.len();
    (e, cu_len, max_seqlen as i32, bounds)
}

proptest::proptest! {
    /// `derive::from_compact` gives exactly the expanded arrays the daemon writes for the
    /// same rows, on random rows of pieces: one-token pieces, a piece starting at the
    /// label-only position, rows cut mid-piece, pad-only rows and padding of one token.
    /// The derived `cu_seqlens` have the header's `cu_len` entries, their longest span is
    /// its `max_seqlen`, and each row's `row_bounds` slice them.
    #[test]
    fn compact_rows_derive_what_the_daemon_expands(
        l in 1usize..20,
        shapes in proptest::collection::vec(
            (proptest::collection::vec(1usize..12, 0..6), 0usize..3), 1..5),
        seed in 0u64..1000,
    ) {
        let (w, pad) = (l + 1, 0i64);
        let sb = w.div_ceil(8);
        let mut next = seed;
        let mut id = || { next = next.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407); 1 + (next >> 40) as i64 % 50_000 };
        let mut rows = Vec::new();
        for (lens, short) in &shapes {
            // Pieces until the row is full; the last one cut to fit (as the packer cuts),
            // and `short` tokens left as padding when the pieces would fill the row.
            let room = w - short.min(&w);
            let (mut pieces, mut p) = (Vec::new(), 0usize);
            for &n in lens {
                if p >= room { break; }
                let n = n.min(room - p);
                pieces.push(n);
                p += n;
            }
            let t: Vec<i64> = (0..p).map(|_| id()).collect();
            rows.push((t, pieces));
        }
        let (want, cu_len, max_seqlen, bounds) = expanded_like_the_daemon(&rows, l, pad);
        // The compact slot of the same rows.
        let mut ids = vec![pad as i32; rows.len() * w];
        let mut starts = vec![0u8; rows.len() * sb];
        let mut real = Vec::new();
        for (r, (t, pieces)) in rows.iter().enumerate() {
            for (j, &v) in t.iter().enumerate() {
                ids[r * w + j] = v as i32;
            }
            let mut p = 0;
            for &n in pieces {
                starts[r * sb + p / 8] |= 1 << (p % 8);
                p += n;
            }
            real.push(p as i32);
        }
        let got = derive::from_compact(Tokens::Int32(&ids), &starts, &real, rows.len(), l);
        proptest::prop_assert_eq!(&got, &want);
        proptest::prop_assert_eq!(got.cu_seqlens.len(), cu_len);
        let spans = got.cu_seqlens.windows(2).map(|p| p[1] - p[0]);
        proptest::prop_assert_eq!(spans.max(), Some(max_seqlen));
        let flat: Vec<i32> = bounds.iter().flat_map(|&(e, m)| [e, m]).collect();
        proptest::prop_assert!(super::connection::checked_bounds(&flat, cu_len, l, 0).is_ok());
    }
}

/// A daemon that takes the connection and never reads it (stopped, or stuck) holds a
/// client whose HELLO is larger than the socket's buffer (a cursor blob of thousands of
/// domains) for the handshake it was given, not forever: the HELLO's write is bounded
/// like WELCOME's read.
#[test]
fn a_daemon_that_never_reads_the_hello_holds_the_client_for_the_handshake_only() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("deaf.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        let (_s, _) = listener.accept().unwrap();
        // Holds the connection unread until the test ends.
        let _ = done_rx.recv();
    });
    let mut hello = Hello::new(0, 1, 2, 1);
    hello.cursor = Some("00".repeat(4 << 20));
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let r = Client::connect_within(&path, &hello, Duration::from_millis(300));
        let _ = tx.send(r.err().map(|e| e.to_string()));
    });
    let got = rx.recv_timeout(Duration::from_secs(20));
    let _ = done_tx.send(());
    let e = got.expect("connect_within still blocked 20 s after a 300 ms handshake");
    assert!(
        e.as_deref().is_some_and(|m| m.contains("timed out")),
        "{e:?}"
    );
}

/// A reconnection before the first batch (no cursor blob) carried the HELLO's
/// `start_step` alone, so a daemon restarted with another plan served that plan's steps
/// silently. It now pins the fingerprint of the first WELCOME: the daemon's `fingerprint`
/// refusal, as the real daemon answers a HELLO whose fingerprint is not its own.
#[test]
fn a_reconnect_before_the_first_batch_pins_the_first_plan() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("replan.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        // The first daemon: WELCOME (plan "a..a") with nothing published, then gone.
        let (mut s, _) = listener.accept().unwrap();
        read_from(&mut s).unwrap();
        welcome_with(ring(0, 0), 3 * 4096, |w| w.fingerprint = "a".repeat(32))(&mut s);
        drop(s);
        // The restarted daemon, with plan "b..b".
        let (mut s, _) = listener.accept().unwrap();
        let (_, payload) = read_from(&mut s).unwrap();
        let hello: Hello = serde_json::from_slice(&payload).unwrap();
        match hello.fingerprint.as_deref() {
            Some(f) if f != "b".repeat(32) => s
                .write_all(&encode(
                    frame::REFUSED,
                    br#"{"code":"fingerprint","message":"not this plan"}"#,
                ))
                .unwrap(),
            _ => welcome_with(ring(0, 1), 3 * 4096, |w| w.fingerprint = "b".repeat(32))(&mut s),
        }
        tx.send(hello).unwrap();
        let _ = s.read_to_end(&mut Vec::new());
    });
    let mut c = Client::connect(&path, &Hello::new(0, 1, 2, 1)).unwrap();
    let r = c.reconnect(Duration::from_secs(10));
    let hello = rx.recv_timeout(Duration::from_secs(20)).unwrap();
    assert_eq!(hello.fingerprint, Some("a".repeat(32)));
    assert_eq!(hello.cursor, None);
    assert!(
        matches!(&r, Err(ClientError::Refused { code, .. }) if code == "fingerprint"),
        "{r:?}"
    );
}
