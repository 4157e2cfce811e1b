//! The client's GPU path (issue 15 item 5) against a real daemon on a real socket.
//!
//! Everywhere (CI has no GPU and no libcuda): `consume --device cuda:0` fails with a clear
//! message and no panic, and the same daemon then serves `--device cpu` as before;
//! `bench --gpu` says why it skips and exits 0 without writing a corpus; bad device
//! names are refused; the one range a GPU consumer copies per step
//! (`BatchView::copy_bytes`) holds every array of the slot at its WELCOME offset.
//! With libcuda and a device (the device machine, `scripts/device-run`): the bytes on
//! the device equal the slot's, through the library, `consume --device` and `bench --gpu`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use common::{bin, Serve};
use millrace::client::gpu::{driver_present, Gpu};
use millrace::client::{Client, Hello, SlotLayout};

const SEQ_LEN: u32 = 512;
const ROWS: u32 = 4;

/// A corpus, a config for one rank and a running daemon.
struct Fixture {
    corpus: common::Corpus,
    socket: PathBuf,
    _serve: Serve,
}

fn fixture() -> Fixture {
    let corpus = common::corpus(400_000, 2, 7, 200_000);
    let socket = corpus.dir.join("s.sock");
    let config = common::write_config(
        &corpus.dir,
        "gpu.toml",
        SEQ_LEN,
        ROWS,
        &[&common::serve_toml(&socket, 4, 1)],
    );
    let serve = Serve::start(&config, &socket, &corpus.dir.join("serve.log"));
    Fixture {
        corpus,
        socket,
        _serve: serve,
    }
}

/// `millrace consume` as rank 0 of 1 on `socket`, with `extra` arguments.
fn consume(socket: &Path, extra: &[&str]) -> Output {
    bin()
        .args(["consume", "--dp-rank", "0", "--dp-size", "1", "--socket"])
        .arg(socket)
        .args(extra)
        .output()
        .expect("millrace consume runs")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Whether this machine can run the GPU half (libcuda and device 0); says so when not.
/// Only a machine without CUDA skips: a driver call that fails on a machine with a GPU
/// fails the test, and so does any reason with `MILLRACE_TEST_GPU=required` (what
/// `scripts/device-run` sets), or the device half of a device run "passed" having run
/// nothing (libtest shows a skipped test as `ok`).
fn gpu_here(test: &str) -> bool {
    let required = std::env::var_os("MILLRACE_TEST_GPU").is_some_and(|v| v == "required");
    match Gpu::open(0) {
        Ok(_) => true,
        Err(e) if e.is_unavailable() && !required => {
            eprintln!("{test}: skipped, no CUDA device here ({e})");
            false
        }
        Err(e) => panic!("{test}: cuda:0 cannot be used: {e}"),
    }
}

/// What `Gpu::open` says on a machine without the driver (or a build without CUDA).
fn no_cuda_reason() -> &'static str {
    if cfg!(feature = "cuda") {
        "CUDA driver library not found (libcuda.so)"
    } else {
        "this millrace was built without the `cuda` feature"
    }
}

#[test]
fn consume_on_cuda_without_the_driver_fails_clearly_and_cpu_still_streams() {
    if driver_present() {
        eprintln!("skipped: libcuda is present here (the GPU tests below cover it)");
        return;
    }
    let f = fixture();
    let out = consume(&f.socket, &["--steps", "3", "--device", "cuda:0"]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(
        err,
        format!("error: --device cuda:0: {}\n", no_cuda_reason())
    );
    assert!(!err.contains("panicked"), "{err}");
    // The daemon is unharmed and `--device cpu` is today's consumer: same tokens as
    // without the flag.
    let digest = |extra: &[&str]| {
        let out = consume(&f.socket, &[&["--steps", "3", "--json"], extra].concat());
        assert!(out.status.success(), "{}", text(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["steps"], 3, "{v}");
        assert!(v.get("device").is_none(), "{v}");
        v["digest"].as_str().unwrap().to_string()
    };
    assert_eq!(digest(&["--device", "cpu"]), digest(&[]));
}

#[test]
fn bench_gpu_skips_without_cuda_before_writing_anything() {
    if driver_present() {
        eprintln!("skipped: libcuda is present here (bench_gpu_on_a_device covers it)");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("corpus");
    let json = tmp.path().join("gpu.json");
    let out = bin()
        .args(["bench", "--gpu", "--dir"])
        .arg(&dir)
        .arg("--json")
        .arg(&json)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let why = format!("cuda:0: {}", no_cuda_reason());
    assert_eq!(text(&out.stdout), format!("bench --gpu skipped: {why}\n"));
    assert!(!dir.exists(), "bench --gpu wrote a corpus it could not use");
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(v["skipped"], why.as_str());
}

#[test]
fn consume_refuses_device_names_that_are_not_cpu_or_cuda_n() {
    for (bad, says) in [
        ("cuda:x", "\"x\" is not a device ordinal"),
        ("tpu:0", "expected \"cpu\" or \"cuda:N\""),
        ("cuda:", "\"\" is not a device ordinal"),
    ] {
        // No daemon needed: the flag is refused before anything connects.
        let out = consume(Path::new("/nonexistent/s.sock"), &["--device", bad]);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{bad}: {err}");
        assert!(
            err.contains(&format!("invalid value '{bad}' for '--device <DEVICE>'")),
            "{err}"
        );
        assert!(err.contains(says), "{bad}: {err}");
    }
}

/// Every array of a slot but the cursor and what lies past it (a compact slot's
/// `row_bounds`, host-side metadata), at its WELCOME offset inside `copy_bytes`: what one
/// host-to-device copy moves is exactly the slot's data, in both layouts.
#[test]
fn copy_bytes_hold_every_array_of_the_slot_at_its_offset() {
    let f = fixture();
    for layout in [SlotLayout::Compact, SlotLayout::Expanded] {
        let mut hello = Hello::whole_slice(0, 1);
        hello.slot_layout = Some(layout);
        hello.job = format!("{layout:?}");
        let mut c = Client::connect(&f.socket, &hello).unwrap();
        let w = c.welcome().clone();
        let cursor = w.fields["cursor"].offset;
        let arrays: Vec<_> = w.fields.iter().filter(|(_, s)| s.offset < cursor).collect();
        let past: Vec<&str> = (w.fields.iter())
            .filter(|(_, s)| s.offset > cursor)
            .map(|(n, _)| n.as_str())
            .collect();
        let want: &[&str] = match layout {
            SlotLayout::Compact => &["row_bounds"],
            SlotLayout::Expanded => &[],
        };
        assert_eq!(past, want, "{layout:?}");
        let lo = arrays.iter().map(|(_, s)| s.offset).min().unwrap() as usize;
        let len = c.copy_len();
        let ring = c.ring_bytes().len();
        assert_eq!(ring as u64, w.ring_bytes);
        for _ in 0..3 {
            let b = c.next_batch().unwrap();
            // copy_len bounds every step's copy, whatever its stage: a slot less its header.
            assert!(b.copy_bytes.len() <= len, "{layout:?}");
            assert_eq!(len, w.slot_bytes as usize - 256, "{layout:?}");
            let at = |name: &str| {
                let off = w.fields[name].offset as usize - lo;
                &b.copy_bytes[off..]
            };
            let starts = |v: &[u8], name: &str| {
                assert_eq!(&at(name)[..v.len()], v, "{layout:?} step {} {name}", b.step);
            };
            starts(bytemuck::cast_slice(b.domain), "domain");
            starts(bytemuck::cast_slice(b.row_loss_tokens), "row_loss_tokens");
            match b.arrays {
                millrace::client::SlotArrays::Compact {
                    rows,
                    doc_starts,
                    row_real_tokens,
                    ..
                } => {
                    starts(rows.as_bytes(), "rows");
                    starts(doc_starts, "doc_starts");
                    starts(bytemuck::cast_slice(row_real_tokens), "row_real_tokens");
                }
                millrace::client::SlotArrays::Expanded {
                    tokens,
                    labels,
                    loss_mask,
                    position_ids,
                    cu_seqlens,
                } => {
                    starts(tokens.as_bytes(), "tokens");
                    starts(labels.as_bytes(), "labels");
                    starts(loss_mask, "loss_mask");
                    starts(position_ids.as_bytes(), "position_ids");
                    starts(bytemuck::cast_slice(cu_seqlens), "cu_seqlens");
                }
            }
            // The copy ends where the last array ends: the cursor is not in it.
            let end = arrays
                .iter()
                .map(|(_, s)| {
                    let size = millrace::corpus::DType::from_name(&s.dtype).unwrap().size();
                    s.offset as usize + size * s.shape.iter().product::<u64>() as usize
                })
                .max()
                .unwrap();
            assert_eq!(lo + b.copy_bytes.len(), end, "{layout:?}");
        }
        c.bye().unwrap();
    }
}

/// `consume --save-cursor` replaces the file by a rename, never rewrites it in place
/// (a consumer killed mid-write would leave a truncated blob and lose its position): a
/// hard link to the old file still holds the old blob whole. A resume loop reading and
/// saving one file continues bit for bit (the steps equal a seek to them).
#[test]
fn consume_saves_its_cursor_by_rename_and_resumes_from_it() {
    let f = fixture();
    let file = f.corpus.dir.join("cursor.hex");
    let file_arg = file.to_str().unwrap();
    let run = |extra: &[&str]| -> serde_json::Value {
        let out = consume(&f.socket, &[&["--steps", "3", "--json"], extra].concat());
        assert!(out.status.success(), "{}", text(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    run(&["--job", "a", "--save-cursor", file_arg]);
    let old = std::fs::read(&file).unwrap();
    let link = f.corpus.dir.join("cursor.old");
    std::fs::hard_link(&file, &link).unwrap();
    let resumed = run(&[
        "--job",
        "b",
        "--cursor-file",
        file_arg,
        "--save-cursor",
        file_arg,
    ]);
    assert_eq!(std::fs::read(&link).unwrap(), old, "rewritten in place");
    let new = std::fs::read(&file).unwrap();
    assert_ne!(new, old);
    assert!(new.ends_with(b"\n") && new.len() == old.len(), "{new:?}");
    let leftovers: Vec<_> = std::fs::read_dir(&f.corpus.dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    let seek = run(&["--job", "c", "--start-step", "3"]);
    assert_eq!(
        (&resumed["first_step"], &resumed["last_step"]),
        (&3.into(), &5.into())
    );
    assert_eq!(resumed["digest"], seek["digest"]);
}

/// A cursor file from another plan (another seq_len over the same corpus) is refused
/// naming the file, not only the daemon's reason: a job resuming many ranks from many
/// files must know which one is wrong.
#[test]
fn consume_names_the_cursor_file_the_daemon_refuses() {
    let f = fixture();
    let file = f.corpus.dir.join("cursor.hex");
    let file_arg = file.to_str().unwrap();
    let out = consume(&f.socket, &["--steps", "2", "--save-cursor", file_arg]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let other_socket = f.corpus.dir.join("other.sock");
    let other = common::write_config(
        &f.corpus.dir,
        "other.toml",
        SEQ_LEN / 2,
        ROWS,
        &[&common::serve_toml(&other_socket, 4, 1)],
    );
    let _serve = Serve::start(&other, &other_socket, &f.corpus.dir.join("other.log"));
    let out = consume(&other_socket, &["--steps", "1", "--cursor-file", file_arg]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.starts_with(&format!("error: --cursor-file {file_arg}: "))
            && err.contains("(cursor)")
            && err.contains("another corpus or plan"),
        "{err}"
    );
}

/// A `--cursor-file` longer than any HELLO can carry (a wrong path: a shard, a device
/// such as `/dev/zero`, which was read until memory ran out) is refused naming the file,
/// before anything connects.
#[test]
fn consume_refuses_a_cursor_file_no_blob_can_fill() {
    let tmp = tempfile::tempdir().unwrap();
    let big = tmp.path().join("shard.bin");
    let f = std::fs::File::create(&big).unwrap();
    f.set_len(millrace::client::MAX_JSON_FRAME_LEN as u64 + 1)
        .unwrap();
    for path in [big.as_path(), Path::new("/dev/zero")] {
        let out = consume(
            Path::new("/nonexistent/s.sock"),
            &["--cursor-file", path.to_str().unwrap()],
        );
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(
            err.contains(&format!("cursor file {} holds more than", path.display()))
                && err.contains("not a cursor blob"),
            "{err}"
        );
    }
}

/// A client holding `slots - 1` batches (a GPU consumer's copies in flight) that
/// reconnects to a daemon restarted with fewer `ring_slots` holds at most the new ring's
/// `slots - 1`: it kept its old hold, never released a slot the daemon needed, and
/// waited until its timeout (`consume --hold 3` then failed "step N was not published").
#[test]
fn a_reconnect_to_a_ring_of_fewer_slots_lowers_the_hold() {
    let corpus = common::corpus(400_000, 2, 7, 200_000);
    let socket = corpus.dir.join("s.sock");
    let config = |name: &str, slots: u64| {
        common::write_config(
            &corpus.dir,
            name,
            SEQ_LEN,
            ROWS,
            &[&common::serve_toml(&socket, slots, 1)],
        )
    };
    let (four, two) = (config("four.toml", 4), config("two.toml", 2));
    let serve = Serve::start(&four, &socket, &corpus.dir.join("four.log"));
    let mut c = Client::connect(&socket, &Hello::whole_slice(0, 1)).unwrap();
    c.set_hold(3);
    c.set_timeout(Some(std::time::Duration::from_secs(5)));
    for _ in 0..5 {
        c.next_batch().unwrap();
    }
    assert_eq!(c.hold(), 3);
    drop(serve); // killed
    let _serve = Serve::start(&two, &socket, &corpus.dir.join("two.log"));
    // The old ring's published steps may still be read; then the socket's close.
    let mut next = 5;
    loop {
        match c.next_batch() {
            Ok(b) if next < 9 => {
                assert_eq!(b.step, next);
                next += 1;
            }
            Ok(b) => panic!("step {} read from a ring of 4 slots holding 3", b.step),
            Err(e) => {
                assert!(e.is_transient(), "{e}");
                break;
            }
        }
    }
    c.reconnect(std::time::Duration::from_secs(30)).unwrap();
    assert_eq!((c.welcome().slots, c.hold()), (2, 1));
    for step in next..next + 10 {
        let b = c
            .next_batch()
            .unwrap_or_else(|e| panic!("step {step}: {e}"));
        assert_eq!(b.step, step);
    }
}

// ---------------------------------------------------------------- with a GPU only

#[cfg(feature = "cuda")]
#[test]
fn device_bytes_equal_the_slot_bytes() {
    if !gpu_here("device_bytes_equal_the_slot_bytes") {
        return;
    }
    use millrace::client::gpu::{DeviceSink, Pinning, RingRegistration};
    let f = fixture();
    let mut c = Client::connect(&f.socket, &Hello::whole_slice(0, 1)).unwrap();
    // By hand: one copy of a slot, read back.
    let gpu = Gpu::open(0).unwrap();
    // SAFETY: `reg` is dropped below, before the client's `bye`.
    let reg = unsafe { RingRegistration::register(&gpu, c.ring_bytes()) };
    assert_eq!(
        reg.pinning(),
        &Pinning::ReadOnly,
        "the read-only flag failed"
    );
    let mut dev = gpu.alloc(c.copy_len()).unwrap();
    let b = c.next_batch().unwrap();
    gpu.copy_async(b.copy_bytes, &mut dev).unwrap();
    assert_eq!(
        gpu.read_back(&dev, b.copy_bytes.len()).unwrap(),
        b.copy_bytes
    );
    drop(reg);
    // Through the sink, two copies in flight, every one read back and compared.
    c.set_hold(1);
    // SAFETY: the sink is dropped before the client's `bye`, and each copy is retired
    // down to the hold (1) before the next `next_batch`.
    let mut sink = unsafe { DeviceSink::new(gpu, &c, 2, true) }.unwrap();
    for _ in 0..20 {
        let b = c.next_batch().unwrap();
        sink.submit(&b, millrace::client::monotonic_ns()).unwrap();
        sink.retire(1).unwrap();
    }
    sink.retire(0).unwrap();
    let fig = sink.figures();
    assert_eq!((fig.copies, fig.verified), (20, 20), "{fig:?}");
    assert_eq!(fig.pinning, Some(Pinning::ReadOnly));
    drop(sink);
    c.bye().unwrap();
}

#[test]
fn consume_on_a_device_reads_back_every_step_and_matches_cpu() {
    if !gpu_here("consume_on_a_device_reads_back_every_step_and_matches_cpu") {
        return;
    }
    let f = fixture();
    let run = |extra: &[&str]| -> serde_json::Value {
        let out = consume(&f.socket, &[&["--steps", "40", "--json"], extra].concat());
        assert!(out.status.success(), "{}", text(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let gpu = run(&["--device", "cuda:0", "--verify-device", "--hold", "1"]);
    let cpu = run(&[]);
    assert_eq!(gpu["digest"], cpu["digest"]);
    assert_eq!(gpu["device"]["copies"], 40, "{gpu}");
    assert_eq!(gpu["device"]["verified"], 40, "{gpu}");
    assert_eq!(gpu["device"]["pinning"], "read_only", "{gpu}");
    let _ = &f.corpus;
}

#[test]
fn bench_gpu_on_a_device() {
    if !gpu_here("bench_gpu_on_a_device") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let json = tmp.path().join("gpu.json");
    let out = bin()
        .args([
            "bench",
            "--gpu",
            "--tokens",
            "2e7",
            "--gpu-steps",
            "50",
            "--dir",
        ])
        .arg(tmp.path().join("corpus"))
        .arg("--json")
        .arg(&json)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(v["pinning"], "read_only", "{v}");
    assert!(!v["sweep"].as_array().unwrap().is_empty(), "{v}");
    assert_eq!(v["step"]["verified"], 8, "{v}");
    assert_eq!(v["step"]["steps"], 50, "{v}");
}

/// A `--gpu-device` or `--device cuda:N` past the devices the driver sees is an error
/// (exit 1) naming the option and the devices there are, before any corpus or socket.
/// `bench --gpu --gpu-device 9` printed "bench --gpu skipped" and exited 0, as on a
/// machine without CUDA, so a device run with a wrong ordinal passed having measured
/// nothing.
#[test]
fn a_device_ordinal_past_the_devices_is_an_error_naming_them() {
    if !gpu_here("a_device_ordinal_past_the_devices_is_an_error_naming_them") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (dir, json) = (tmp.path().join("corpus"), tmp.path().join("gpu.json"));
    let out = bin()
        .args(["bench", "--gpu", "--gpu-device", "999", "--dir"])
        .arg(&dir)
        .arg("--json")
        .arg(&json)
        .output()
        .unwrap();
    let (stdout, err) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(1), "{stdout}{err}");
    assert!(!stdout.contains("skipped"), "{stdout}");
    let says = "--gpu-device 999: no CUDA device 999: the driver sees ";
    assert!(
        err.starts_with(&format!("error: {says}")) && err.contains("cuda:0 ("),
        "{err}"
    );
    assert!(
        !dir.exists(),
        "a corpus was written for a device that is not there"
    );
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert!(v["error"].as_str().unwrap().starts_with(says), "{v}");
    // consume checks the device before it connects: no daemon needed.
    let out = consume(Path::new("/nonexistent/s.sock"), &["--device", "cuda:999"]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.starts_with("error: --device cuda:999: no CUDA device 999: the driver sees ")
            && err.contains("cuda:0 ("),
        "{err}"
    );
}
