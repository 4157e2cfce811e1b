//! The socket's decoders, both ends. Byte 0 picks one: (0) a byte stream cut into
//! frames as the daemon's connection reader does, each HELLO and CONTROL payload then
//! parsed; (1) a HELLO payload, its cursor hex decoded and framed; (2) a CONTROL
//! payload; (3) what a client reads: a REFUSED/ERROR reason, and a WELCOME checked as
//! the client checks it, with a slot header's shape (rows, seq_len, eight field
//! offsets: the 72 bytes after byte 0) checked against it, and a STATUS reply.
#![no_main]

use libfuzzer_sys::fuzz_target;
use millrace::plan::cursor;
use millrace::wire::{self, control::parse_control, frame, protocol, Hello, Reason};
use millrace_fuzz::write_seeds_and_exit_if_asked;

/// A WELCOME as the daemon sends it (the client tests' expanded two-slot ring).
const WELCOME: &str = r#"{"domains":["a"],"dp_rank":0,"dp_size":1,"eod_token":2,
"fields":{"cu_seqlens":{"dtype":"int32","offset":512,"shape":[17]},
"cursor":{"dtype":"uint8","offset":768,"shape":[256]},
"domain":{"dtype":"int32","offset":640,"shape":[2]},
"labels":{"dtype":"int32","offset":320,"shape":[2,8]},
"loss_mask":{"dtype":"uint8","offset":384,"shape":[2,8]},
"position_ids":{"dtype":"int32","offset":448,"shape":[2,8]},
"row_loss_tokens":{"dtype":"int32","offset":704,"shape":[2]},
"tokens":{"dtype":"int32","offset":256,"shape":[2,8]}},
"fingerprint":"00000000000000000000000000000000","micro_batch_rows":2,"micro_batches":1,
"pad_token":0,"protocol":PROTO,"release_page":false,"ring_bytes":12288,"rows":2,
"seq_len":8,"slot_bytes":4096,"slot_layout":"expanded","slot_offset":4096,"slots":2,
"stages":[],"start_step":0,"token_dtype":"int32","vocab_size":null}"#;

const OFFSETS: [u64; 8] = [256, 320, 384, 448, 512, 640, 704, 768];

fn seeds() -> Vec<Vec<u8>> {
    let proto = wire::TRAINER_VERSION;
    let blob = {
        let plans = millrace_fuzz::plans();
        let mut p = plans[2].start();
        for _ in 0..11 {
            p.next_batch();
        }
        p.cursor()
    };
    let hello = serde_json::to_vec(&Hello::new(1, 4, 2, 2)).expect("hello");
    let mut resumed: serde_json::Value = serde_json::from_slice(&hello).expect("json");
    resumed["cursor"] = wire::to_hex(&blob).into();
    resumed["job"] = "job-1".into();
    resumed["fingerprint"] = "0123456789abcdef0123456789abcdef".into();
    let resumed = serde_json::to_vec(&resumed).expect("hello");
    let controls: Vec<Vec<u8>> = [
        r#"{"protocol":1,"op":"status"}"#,
        r#"{"protocol":1,"op":"journal"}"#,
        r#"{"protocol":1,"op":"set_weights","weights":{"web":0.5,"code":0.5},"at_step":100,"late":"next"}"#,
        r#"{"protocol":1,"op":"set_stage","seq_len":4096,"global_batch_rows":64,"at_step":10,"chain_groups":true}"#,
        r#"{"protocol":1,"op":"set_schedule","schedule":[{"step":0,"weights":{"web":1}},{"step":50,"weights":{"web":2}}]}"#,
        r#"{"protocol":1,"op":"reload","source":"client"}"#,
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    let mut out = Vec::new();
    let mut stream = vec![0u8];
    stream.extend(frame::encode(wire::kind::HELLO, &resumed));
    stream.extend(frame::encode(wire::kind::RELEASE, &7u64.to_le_bytes()));
    stream.extend(frame::encode(wire::kind::CONTROL, &controls[2]));
    stream.extend(frame::encode(wire::kind::BYE, &[]));
    out.push(stream);
    for h in [&hello, &resumed] {
        out.push([&[1u8][..], h].concat());
    }
    for c in &controls {
        out.push([&[2u8][..], c].concat());
    }
    let mut client = vec![3u8];
    client.extend(2u32.to_le_bytes());
    client.extend(8u32.to_le_bytes());
    for o in OFFSETS {
        client.extend(o.to_le_bytes());
    }
    client.extend(WELCOME.replace("PROTO", &proto.to_string()).bytes());
    out.push(client);
    let mut refused = vec![3u8];
    refused.extend([0u8; 72]);
    refused.extend(protocol::reason(
        wire::Code::Cursor,
        "cursor blob refused: x",
    ));
    out.push(refused);
    out
}

fn hello(payload: &[u8]) {
    let Ok(h) = Hello::parse(payload) else {
        return;
    };
    if let Ok(Some(blob)) = h.cursor_bytes() {
        let _ = cursor::decode(&blob);
    }
    let _ = serde_json::to_vec(&h);
}

fn control(payload: &[u8]) {
    match parse_control(payload) {
        Ok(c) => {
            let _ = format!("{c:?}");
        }
        Err((op, msg)) => {
            let _ = protocol::log_safe(&op);
            let _ = protocol::log_safe(&msg);
        }
    }
}

fuzz_target!(
    init: {
        write_seeds_and_exit_if_asked(seeds);
    },
    |data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    match sel & 3 {
        0 => {
            // The daemon's reader: the first frame bounded by the HELLO limit, the later
            // ones by MAX_FRAME (docs/PROTOCOL.md section 1).
            let mut buf = rest;
            let mut max = protocol::request_limit(1 << 16);
            loop {
                match frame::parse_frame(buf, max) {
                    Ok(Some((f, used))) => {
                        assert!(used > 0 && used <= buf.len(), "frame used {used} of {}", buf.len());
                        let _ = f.to_string();
                        match f {
                            frame::Frame::Hello(p) => hello(&p),
                            frame::Frame::Control(p) => control(&p),
                            _ => {}
                        }
                        buf = &buf[used..];
                        max = wire::MAX_FRAME;
                    }
                    Ok(None) | Err(_) => break,
                }
            }
            let _ = frame::split(rest, wire::MAX_FRAME);
        }
        1 => hello(rest),
        2 => control(rest),
        _ => {
            if rest.len() < 72 {
                return;
            }
            let (head, payload) = rest.split_at(72);
            let u32_at = |o: usize| u32::from_le_bytes([head[o], head[o + 1], head[o + 2], head[o + 3]]);
            let mut offsets = [0u64; 8];
            for (i, o) in offsets.iter_mut().enumerate() {
                let mut b = [0u8; 8];
                b.copy_from_slice(&head[8 + 8 * i..16 + 8 * i]);
                *o = u64::from_le_bytes(b);
            }
            let _ = millrace::client::check_welcome(payload, &(u32_at(0), u32_at(4), offsets));
            if let Ok(r) = Reason::decode(payload) {
                let _ = protocol::log_safe(&r.message);
            }
            if let Ok(s) = serde_json::from_slice::<wire::status::Status>(payload) {
                let _ = s.newest_change();
            }
        }
    }
});
