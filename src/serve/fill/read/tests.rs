//! Tests of the readers (`read`): io_uring fills equal to the copy, the pool's
//! sharing and waits, io_uring's health after failures, and the mappings' advice.

use super::*;
use crate::serve::fill::{
    fill_slot,
    tests::{fill_stuck_then_release, shard_and_job, truncate_and_fill},
    SlotJob, Source,
};
use crate::serve::ring::{Layout, Ring};
use std::time::Duration;

/// [`shard_and_job`]'s shard (ids 7, token 10 is 9) in `dir`, a compact ring of one
/// slot for its job, and that slot as the mmap copy fills it.
fn copied_slot(dir: &Path) -> (Source, SlotJob, Layout, Ring, Vec<u8>) {
    let (src, job, _) = shard_and_job(dir, 7, (10, 9));
    let layout = Layout::compact(1, 64, 1, src.compact_token(), 64);
    let ring = Ring::create("t", layout.clone(), 0).unwrap();
    let copied = {
        let slot = &mut ring.claim(0).unwrap();
        assert_eq!(fill_slot(slot, &layout, &job, &src).unwrap(), 65);
        slot.to_vec()
    };
    (src, job, layout, ring, copied)
}

/// [`copied_slot`] with its source read by io_uring readers (`uring`); `None`
/// (saying why) where the kernel refuses io_uring.
fn uring_slot(dir: &Path) -> Option<(Source, SlotJob, Layout, Ring, Vec<u8>)> {
    let (mut src, job, layout, ring, copied) = copied_slot(dir);
    src.readers = Readers::open(Reader::Uring, &src.shards);
    if let Some(why) = src.readers.fallback() {
        eprintln!("skipped: {why}");
        return None;
    }
    Some((src, job, layout, ring, copied))
}

/// Compact slots filled by each io_uring reader equal the mmap copy's byte for byte;
/// a shard truncated under them fails the fill naming the file and the bytes, and is
/// poisoned so the next fill is refused before reading.
#[test]
fn uring_fills_equal_the_copy_and_a_truncated_shard_is_named_and_poisoned() {
    for reader in [Reader::Uring, Reader::UringDirect] {
        let dir = tempfile::tempdir().unwrap();
        let (mut src, job, layout, ring, copied) = copied_slot(dir.path());
        let slot = &mut ring.claim(0).unwrap();
        src.readers = Readers::open(reader, &src.shards);
        if let Some(why) = src.readers.fallback() {
            // The kernel refuses io_uring here: the copy fills instead (checked above).
            eprintln!("{why}");
            assert!(!src.readers.uring());
            continue;
        }
        assert_eq!(src.readers.reader(), reader);
        assert!(!src.readers.page_hints());
        // Dirty the rows, so only the reader can make them equal again.
        let rows = &layout.fields[0].1;
        slot[rows.offset..rows.offset + rows.bytes].fill(0xee);
        assert_eq!(fill_slot(slot, &layout, &job, &src).unwrap(), 65);
        assert!(slot[..] == copied[..], "{reader:?} differs from the copy");
        // Ids are checked after the read as after the copy, the row's last one too.
        let bad_dir = tempfile::tempdir().unwrap();
        let (mut bad, bad_job, _) = shard_and_job(bad_dir.path(), 7, (64, 1000));
        bad.readers = Readers::open(reader, &bad.shards);
        let e = fill_slot(slot, &layout, &bad_job, &bad)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("token 64 has id 1000, outside vocab_size 1000"),
            "{e}"
        );
        let e = truncate_and_fill(dir.path(), slot, &layout, &job, &src);
        assert!(
            e.contains("row 0: document 3: reading with io_uring: ")
                && e.contains(
                    "s.bin: truncated: bytes 24576..24706 were planned but the file now \
                     ends at byte 4096"
                ),
            "{reader:?}: {e}"
        );
    }
}

/// Regression: a row that packs the end of document 2 and the start of document 3,
/// which follow each other in the file, is one joined read; a truncation in document
/// 3's bytes failed the fill blaming document 2 (the first byte of the joined read),
/// whose bytes were all there. The error names the document holding the first byte
/// the file lost.
#[test]
fn a_truncation_inside_a_joined_read_names_the_document_that_lost_bytes() {
    use crate::plan::{Row, Segment};
    for reader in [Reader::Uring, Reader::UringDirect] {
        let dir = tempfile::tempdir().unwrap();
        let (mut src, job, layout, ring, _) = copied_slot(dir.path());
        src.readers = Readers::open(reader, &src.shards);
        if let Some(why) = src.readers.fallback() {
            eprintln!("{why}");
            continue;
        }
        let seg = |doc, start, len| Segment {
            shard: 0,
            doc,
            start,
            len,
            doc_len: 4096,
            group: None,
        };
        // Document d's tokens start at byte 8192 d: tokens 4064.. of document 2 are
        // bytes 24512..24576, tokens ..33 of document 3 bytes 24576..24642.
        let rows = vec![Row::new(0, 0, vec![seg(2, 4064, 32), seg(3, 0, 33)], 65)];
        let job = SlotJob {
            rows: rows.into(),
            ..job
        };
        let slot = &mut ring.claim(0).unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(dir.path().join("s.bin"))
            .unwrap()
            .set_len(24600)
            .unwrap();
        let e = fill_slot(slot, &layout, &job, &src)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("row 0: document 3: reading with io_uring: ")
                && e.contains("truncated: bytes 24512..24642 were planned but the file now ends at byte 24600"),
            "{reader:?}: {e}"
        );
        assert!(src.shards[0][0].poisoned().is_some(), "{reader:?}");
    }
}

/// A token file renamed over between the start's mapping of the shard and the opening
/// of the io_uring readers' descriptors (a start takes minutes on a large corpus, and
/// a rename is the supported way to replace a shard) is another file than the one the
/// plan was made from: the readers refuse it, naming it, and the fill copies from the
/// mapping, which still holds the old file; never the new file's bytes at the old
/// index's offsets.
#[test]
fn a_token_file_renamed_over_before_the_readers_open_is_not_read_with_io_uring() {
    for reader in [Reader::Uring, Reader::UringDirect] {
        let dir = tempfile::tempdir().unwrap();
        let (mut src, job, layout, ring, copied) = copied_slot(dir.path());
        let slot = &mut ring.claim(0).unwrap();
        // Another build of the shard, same size, other ids, renamed over the .bin.
        let other = tempfile::tempdir().unwrap();
        shard_and_job(other.path(), 8, (10, 9));
        std::fs::rename(other.path().join("s.bin"), dir.path().join("s.bin")).unwrap();
        src.readers = Readers::open(reader, &src.shards);
        let rows = &layout.fields[0].1;
        slot[rows.offset..rows.offset + rows.bytes].fill(0xee);
        assert_eq!(fill_slot(slot, &layout, &job, &src).unwrap(), 65);
        assert!(
            slot[..] == copied[..],
            "{reader:?} read the file renamed over the mapped one"
        );
        let why = src.readers.fallback().expect("the readers fell back");
        if why.contains("io_uring is unavailable") {
            eprintln!("{why}");
            continue;
        }
        assert!(!src.readers.uring(), "{why}");
        assert!(
            why.contains(&format!(
                "{}: not the file the shard was opened from",
                dir.path().join("s.bin").display()
            )),
            "{why}"
        );
    }
}

/// [`shard_and_job`]'s shard in `dir` and io_uring readers over it; `None` (saying
/// why) where the kernel refuses io_uring.
fn uring_readers(dir: &Path) -> Option<(Source, Readers)> {
    let (src, _, _) = shard_and_job(dir, 7, (0, 7));
    let readers = Readers::open(Reader::Uring, &src.shards);
    if let Some(why) = readers.fallback() {
        eprintln!("{why}");
        return None;
    }
    Some((src, readers))
}

/// Readers share the descriptors opened at start: a new one registers them even after
/// the shard file was removed. When no more can be opened (here the kernel refuses
/// io_uring in the thread that asks, as a seccomp profile does), fills wait for one
/// to come back instead of failing; with none left at all, the fill fails naming why.
#[test]
fn fills_share_the_readers_when_no_more_can_be_opened() {
    let dir = tempfile::tempdir().unwrap();
    let Some((_src, readers)) = uring_readers(dir.path()) else {
        return;
    };
    std::fs::remove_file(dir.path().join("s.bin")).unwrap();
    let held = readers.take().unwrap();
    let second = readers.take().expect("a second reader over the open files");
    assert_eq!(readers.lock().live, 2);
    readers.give(second, true);
    let second = readers.take().unwrap();
    std::thread::scope(|s| {
        let waiter = s.spawn(|| {
            if !crate::sys::refuse_io_uring_in_this_thread(libc::EPERM) {
                return None;
            }
            let got = readers.take().map(|r| readers.give(r, true));
            let waited = readers.lock().full;
            // With no reader left, a fill here fails naming io_uring.
            let r = readers.take().unwrap();
            readers.give(r, false);
            readers.give(readers.take().unwrap(), false);
            let e = readers.take().unwrap_err().to_string();
            Some((got, waited, e))
        });
        let t0 = std::time::Instant::now();
        while !readers.lock().full && !waiter.is_finished() {
            assert!(t0.elapsed().as_secs() < 30, "the third fill never waited");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        readers.give(held, true);
        readers.give(second, true);
        match waiter.join().unwrap() {
            None => eprintln!("skipping: the kernel refused a seccomp filter"),
            Some((got, waited, e)) => {
                got.unwrap();
                assert!(waited, "the third fill did not wait for a reader");
                assert!(e.starts_with("io_uring is unavailable"), "{e}");
            }
        }
    });
}

/// Regression: with every io_uring reader in use and no more to be opened, a fill
/// waited for one to come back without a bound, so a reader held by a read that hangs
/// (a network filesystem) stalled every other copy thread and every ring, whatever
/// they read. The fill now waits a bounded time, then copies from the mappings (and
/// io_uring stays in use). Here the one reader is taken and kept, as a hung read keeps
/// it, and the filling thread may not open another (a seccomp filter refuses io_uring
/// in it, as a locked-memory limit would).
#[test]
fn a_fill_does_not_wait_for_good_for_a_reader_a_hung_read_holds() {
    let dir = tempfile::tempdir().unwrap();
    let Some((src, job, layout, ring, copied)) = uring_slot(dir.path()) else {
        return;
    };
    let held = src.readers.take().unwrap();
    let (src, layout, job) = (&src, &layout, &job);
    std::thread::scope(|s| {
        let filler = s.spawn(|| {
            if !crate::sys::refuse_io_uring_in_this_thread(libc::EPERM) {
                return None;
            }
            let slot = &mut ring.claim(0).unwrap();
            let r = fill_slot(slot, layout, job, src).map_err(|e| e.to_string());
            Some((r, slot.to_vec()))
        });
        let t0 = std::time::Instant::now();
        while !filler.is_finished() && t0.elapsed().as_secs() < 30 {
            std::thread::yield_now();
        }
        let in_time = filler.is_finished();
        // Let a filler that waits go, so the scope ends.
        src.readers.give(held, true);
        let got = filler.join().unwrap();
        assert!(
            in_time,
            "the fill still waited for the held reader after 30 s"
        );
        match got {
            None => eprintln!("skipped: the kernel refused a seccomp filter"),
            Some((r, slot)) => {
                assert_eq!(r, Ok(65));
                assert!(slot == copied, "the fill copied from the mappings");
            }
        }
    });
    assert!(src.readers.uring(), "io_uring is still in use");
}

/// Regression: once opening a reader had failed (`full`), a reader dropped later (its
/// ring broken) was never replaced while any other was alive: the pool stayed one
/// reader short for the daemon's life, and two fills at once took turns on the one
/// left. A dropped reader lets the next fill that finds none idle open one.
#[test]
fn a_dropped_reader_is_replaced_after_opening_one_had_failed() {
    let dir = tempfile::tempdir().unwrap();
    let Some((_src, readers)) = uring_readers(dir.path()) else {
        return;
    };
    let (first, second) = (readers.take().unwrap(), readers.take().unwrap());
    std::thread::scope(|s| {
        // A third fill where no reader can be opened waits, and sets `full`.
        let waiter = s.spawn(|| {
            if !crate::sys::refuse_io_uring_in_this_thread(libc::EPERM) {
                return false;
            }
            readers.give(readers.take().unwrap(), true);
            true
        });
        let t0 = std::time::Instant::now();
        while !readers.lock().full && !waiter.is_finished() {
            assert!(t0.elapsed().as_secs() < 30, "the third fill never waited");
            std::thread::yield_now();
        }
        readers.give(second, true);
        if !waiter.join().unwrap() {
            eprintln!("skipping: the kernel refused a seccomp filter");
            return;
        }
        // One reader breaks and is dropped: one idle is left of two.
        readers.give(first, false);
        assert_eq!(readers.lock().live, 1);
        let held = readers.take().unwrap();
        // Two fills at once again: the second gets a reader of its own.
        let other = s.spawn(|| readers.give(readers.take().unwrap(), true));
        let t0 = std::time::Instant::now();
        while readers.lock().live < 2 && t0.elapsed().as_secs() < 30 {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let live = readers.lock().live;
        readers.give(held, true);
        other.join().unwrap();
        assert_eq!(live, 2, "the dropped reader was never replaced");
    });
}

/// Regression: fills waiting for a reader (none idle, no more could be opened) slept
/// on when io_uring was given up for good: readers that break are dropped, the fill
/// that then fails to open one gives io_uring up, and nothing woke the others, whose
/// materializer threads (and their trainers' steps) hung for good. They now return,
/// and their fills copy from the mappings.
#[test]
fn fills_waiting_for_a_reader_return_once_io_uring_is_given_up() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let dir = tempfile::tempdir().unwrap();
    let Some((_src, readers)) = uring_readers(dir.path()) else {
        return;
    };
    let (a, b) = (readers.take().unwrap(), readers.take().unwrap());
    let (done, skipped) = (AtomicUsize::new(0), AtomicUsize::new(0));
    let deadline = |what: &str, t0: std::time::Instant| {
        assert!(t0.elapsed().as_secs() < 30, "{what}");
        std::thread::sleep(std::time::Duration::from_millis(1));
    };
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| {
                // Here no reader can be opened: a fill waits for one given back.
                if !crate::sys::refuse_io_uring_in_this_thread(libc::EPERM) {
                    skipped.fetch_add(1, Ordering::SeqCst);
                } else {
                    let _ = readers.read(&[], &mut [0u8; 16]);
                }
                done.fetch_add(1, Ordering::SeqCst);
            });
        }
        let t0 = std::time::Instant::now();
        while !readers.lock().full && done.load(Ordering::SeqCst) < 2 {
            deadline("no fill waited for a reader", t0);
        }
        // Both readers in use break (an io_uring_enter refused for good).
        readers.give(a, false);
        readers.give(b, false);
        let t0 = std::time::Instant::now();
        while done.load(Ordering::SeqCst) < 2 {
            deadline(
                "a fill waiting for a reader hung after io_uring was given up",
                t0,
            );
        }
    });
    if skipped.load(Ordering::SeqCst) > 0 {
        eprintln!("skipping: the kernel refused a seccomp filter");
        return;
    }
    assert!(readers.fallback().is_some(), "io_uring was given up");
}

/// The transitions of io_uring's [`Health`]: failures that may pass back off
/// 1, 2, 4 s ... to the cap; a fill in flight when a backoff started neither counts
/// as a failure nor ends it; a read after the backoff puts io_uring back in use; the
/// `tries`-th failure in a row, or one refusal that lasts, gives it up for good.
#[test]
fn health_backs_off_on_failures_that_may_pass_and_gives_up_on_lasting_ones() {
    let b = Backoff {
        first_ms: 1000,
        cap_ms: 4000,
        tries: 4,
    };
    let delays: Vec<u64> = (1..=5).map(|n| b.delay_ms(n)).collect();
    assert_eq!(delays, [1000, 2000, 4000, 4000, 4000]);
    assert_eq!(b.delay_ms(u32::MAX), 4000, "no overflow");
    let mut h = Health::InUse;
    assert!(h.failed(10, true, "ENOMEM".into(), &b));
    assert_eq!(h.copy_until(), 1010);
    // A fill in flight before the backoff: neither a failure nor a recovery.
    assert!(!h.failed(500, true, "ENOMEM".into(), &b));
    assert_eq!(h.succeeded(1009), None);
    // The backoff ran out: the next failure counts and doubles it.
    assert!(h.failed(1010, true, "EAGAIN".into(), &b));
    let want = Health::Retrying {
        failures: 2,
        retry_at: 3010,
        why: "EAGAIN".into(),
    };
    assert_eq!(h, want);
    // A read after it: in use again, and the count starts over.
    assert_eq!(h.succeeded(3010), Some(2));
    assert_eq!((h.clone(), h.copy_until()), (Health::InUse, IN_USE));
    assert_eq!(h.succeeded(4000), None);
    let mut t = 5000;
    for failures in 1..4 {
        assert!(h.failed(t, true, "ENOMEM".into(), &b));
        assert!(matches!(h, Health::Retrying { failures: f, .. } if f == failures));
        t = h.copy_until();
    }
    assert!(h.failed(t, true, "ENOMEM".into(), &b));
    let why = "4 failures in a row, the last: ENOMEM".to_string();
    assert_eq!(h, Health::GivenUp { why });
    assert_eq!(h.copy_until(), GIVEN_UP);
    assert!(!h.failed(u64::MAX - 1, true, "x".into(), &b), "for good");
    assert_eq!(h.succeeded(u64::MAX - 1), None);
    // A refusal that lasts gives up at once.
    let mut h = Health::InUse;
    assert!(h.failed(10, false, "EPERM".into(), &b));
    assert_eq!(
        h,
        Health::GivenUp {
            why: "EPERM".into()
        }
    );
}

/// Regression: io_uring failing after start for want of memory (io_uring_setup's
/// ENOMEM: here a seccomp filter answers it in the filling thread, as a memory squeeze
/// or RLIMIT_MEMLOCK does) gave io_uring up until restart and copied from plain
/// mappings (`reader` `mmap`). Now that fill is copied, byte for byte as the mmap copy
/// does, from mappings with hints (`mmap-willneed`); fills copy until the backoff runs
/// out (they open no ring); then one tries again (failing: the backoff doubles;
/// succeeding: io_uring is in use again); `tries` failures in a row give it up for
/// good. The readers' clock is moved on instead of sleeping.
#[test]
fn io_uring_short_of_memory_is_retried_after_a_backoff_then_given_up() {
    let dir = tempfile::tempdir().unwrap();
    let Some((mut src, job, layout, ring, copied)) = uring_slot(dir.path()) else {
        return;
    };
    src.readers.backoff = Backoff {
        first_ms: 10_000,
        cap_ms: 40_000,
        tries: 3,
    };
    // No reader idle: the next fill sets one up.
    src.readers.give(src.readers.take().unwrap(), false);
    let (ring, layout, job) = (&ring, &layout, &job);
    // A fill (in a thread where io_uring_setup fails with ENOMEM when `squeezed`):
    // its result and slot; `None` where the kernel refuses the seccomp filter.
    let fill = |src: &Source, squeezed: bool| {
        std::thread::scope(|s| {
            s.spawn(|| {
                if squeezed && !crate::sys::refuse_io_uring_in_this_thread(libc::ENOMEM) {
                    return None;
                }
                let slot = &mut ring.claim(0).unwrap();
                let rows = &layout.fields[0].1;
                slot[rows.offset..rows.offset + rows.bytes].fill(0xee);
                let r = fill_slot(slot, layout, job, src).map_err(|e| e.to_string());
                Some((r, slot.to_vec() == copied))
            })
            .join()
            .unwrap()
        })
    };
    // Moves the readers' clock past the retry.
    let wait_out = |r: &mut Readers| {
        let ms = r.retry().map_or(0, |t| t.retry_in_ms) + 1;
        r.born = r.born.checked_sub(Duration::from_millis(ms)).unwrap();
    };
    let Some(got) = fill(&src, true) else {
        eprintln!("skipped: the kernel refused a seccomp filter");
        return;
    };
    assert_eq!(got, (Ok(65), true));
    let retry = src.readers.retry().expect("io_uring waits for a retry");
    assert_eq!((retry.failures, retry.give_up_after), (1, 3));
    assert!(
        retry.retry_in_ms > 9_000 && retry.retry_in_ms <= 10_000,
        "{retry:?}"
    );
    assert!(retry.error.contains("Cannot allocate memory"), "{retry:?}");
    let why = src.readers.fallback().unwrap();
    assert!(
        why.contains(
            "copied from the mappings (as \"mmap-willneed\") until io_uring is tried again in"
        ) && why.contains("io_uring_setup: Cannot allocate memory"),
        "{why}"
    );
    assert_eq!(src.readers.reader(), Reader::MmapWillneed);
    assert!(
        src.readers.page_hints(),
        "the copy hints while io_uring waits"
    );
    // The mappings' advice follows: RANDOM while the copy hints, as mapped before.
    let data = src.shards[0][0].data().as_ptr() as usize;
    let random = |flags: String| flags.split_whitespace().any(|f| f == "rr");
    assert!(
        !random(vm_flags(data)),
        "nothing advised while io_uring read"
    );
    src.readers.advise_access(&src.shards);
    assert!(random(vm_flags(data)), "{}", vm_flags(data));
    // During the backoff a fill copies without trying io_uring: no ring is set up.
    assert_eq!(fill(&src, false), Some((Ok(65), true)));
    assert_eq!(src.readers.lock().live, 0);
    let still = src.readers.retry().unwrap();
    assert_eq!((still.failures, still.error), (1, retry.error));
    // Past it, one fill tries again, fails, and the backoff doubles.
    wait_out(&mut src.readers);
    assert_eq!(fill(&src, true), Some((Ok(65), true)));
    let retry = src.readers.retry().unwrap();
    assert_eq!(retry.failures, 2);
    assert!(retry.retry_in_ms > 19_000, "{retry:?}");
    // Past that, a fill where io_uring can be set up reads with it again.
    wait_out(&mut src.readers);
    assert_eq!(fill(&src, false), Some((Ok(65), true)));
    assert_eq!(src.readers.lock().live, 1, "the fill set a ring up");
    assert_eq!((src.readers.retry(), src.readers.fallback()), (None, None));
    assert_eq!(src.readers.reader(), Reader::Uring);
    assert!(src.readers.uring() && !src.readers.page_hints());
    // Recovered: the mappings read ahead again for the copies that still use them.
    src.readers.advise_access(&src.shards);
    assert!(!random(vm_flags(data)), "{}", vm_flags(data));
    // Three failures in a row give io_uring up for good.
    src.readers.give(src.readers.take().unwrap(), false);
    for _ in 0..3 {
        assert_eq!(fill(&src, true), Some((Ok(65), true)));
        wait_out(&mut src.readers);
    }
    let why = src.readers.fallback().unwrap();
    assert!(
        why.contains("failed after start (3 failures in a row, the last: io_uring is unavailable")
            && why.contains("(as \"mmap-willneed\") until restart"),
        "{why}"
    );
    assert_eq!(src.readers.retry(), None);
    assert_eq!(src.readers.reader(), Reader::MmapWillneed);
    assert!(!src.readers.uring() && src.readers.page_hints());
    src.readers.advise_access(&src.shards);
    assert!(random(vm_flags(data)), "{}", vm_flags(data));
    assert_eq!(fill(&src, false), Some((Ok(65), true)));
    assert_eq!(src.readers.lock().live, 0, "no ring after giving up");
}

/// The VmFlags line of this process's mapping that holds `addr` (/proc/self/smaps).
fn vm_flags(addr: usize) -> String {
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
    let mut inside = false;
    for line in smaps.lines() {
        let range = line.split_whitespace().next().unwrap_or("");
        if let Some((a, b)) = range.split_once('-') {
            if let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16)) {
                inside = (a..b).contains(&addr);
                continue;
            }
        }
        if inside && line.starts_with("VmFlags:") {
            return line.to_string();
        }
    }
    panic!("no mapping holds {addr:#x}");
}

/// The plain `mmap` copy (and `auto`'s choice of it) advises the token mappings
/// MADV_HUGEPAGE, so its faults read 2 MiB folios that one entry maps; `mmap-willneed`
/// (whose faults must read only their page) and `page_hints = false` do not.
#[test]
fn the_mmap_copy_asks_for_huge_folios_and_no_other_reader_does() {
    if !std::path::Path::new("/sys/kernel/mm/transparent_hugepage").exists() {
        eprintln!("skipped: this kernel has no transparent huge pages");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (src, _, _) = shard_and_job(dir.path(), 7, (0, 7));
    let data = src.shards[0][0].data().as_ptr() as usize;
    let hg = |flags: &str| flags.split_whitespace().any(|f| f == "hg");
    let before = vm_flags(data);
    assert!(!hg(&before), "{before}");
    for (reader, hints) in [(Reader::MmapWillneed, true), (Reader::Mmap, false)] {
        let r = Readers::open_within(reader, &src.shards, None, hints);
        assert!(!r.huge_pages(), "{reader:?}, page_hints {hints}");
    }
    let r = Readers::open_within(Reader::Auto, &src.shards, None, true);
    assert_eq!(r.reader(), Reader::Mmap, "a corpus of bytes fits in memory");
    assert!(r.huge_pages());
    r.advise_huge(&src.shards);
    let after = vm_flags(data);
    assert!(hg(&after), "{after}");
}

/// Without `[serve] page_hints`, io_uring's fallback copies from plain mappings and
/// hints nothing, as `mmap-willneed` then does.
#[test]
fn without_page_hints_the_fallback_copies_from_plain_mappings() {
    let dir = tempfile::tempdir().unwrap();
    let (src, _, _) = shard_and_job(dir.path(), 7, (0, 7));
    let readers = Readers::open_within(Reader::UringDirect, &src.shards, None, false);
    if readers.fallback().is_some() {
        return;
    }
    assert!(!readers.page_hints());
    readers.failed(&ReadError::Ring {
        what: "io_uring_enter",
        source: std::io::Error::from_raw_os_error(libc::EPERM),
    });
    assert_eq!(readers.reader(), Reader::Mmap);
    assert!(!readers.page_hints() && !readers.uring());
}

/// A start that cannot use io_uring (here: no descriptors to spare for its files) falls
/// back to the copy `page_hints` makes, and names it: without hints, plain `mmap`. It
/// said `mmap-willneed` and gave no hints (a review's seccomp-refused io_uring);
/// `reader = "mmap-willneed"` without hints is plain `mmap` too, as documented.
#[test]
fn a_start_falls_back_to_the_copy_page_hints_make_and_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let (src, _, _) = shard_and_job(dir.path(), 7, (0, 7));
    for (hints, copy) in [(true, Reader::MmapWillneed), (false, Reader::Mmap)] {
        for reader in [Reader::Uring, Reader::UringDirect] {
            let r = Readers::open_within(reader, &src.shards, Some(0), hints);
            assert_eq!(r.reader(), copy, "{reader:?}, page_hints {hints}");
            let why = r.fallback().unwrap_or_default();
            assert!(
                why.ends_with(&format!("using {:?}", copy.as_str())),
                "{why}"
            );
            // uring-direct steps down twice: one line says both steps, in order.
            if reader == Reader::UringDirect {
                assert!(
                    why.contains("using \"uring\", which cannot be used either"),
                    "{why}"
                );
            }
        }
        let r = Readers::open_within(Reader::MmapWillneed, &src.shards, None, hints);
        assert_eq!(r.reader(), copy, "page_hints {hints}");
    }
}

/// Regression: an io_uring read that failed with an I/O error (EIO: a bad sector, a
/// filesystem's checksum) failed the fill but did not poison the shard, though the
/// mmap copy poisons it on the SIGBUS the same error raises there: every later fill
/// read it again, and new clients of it were admitted. The read here is of
/// `/proc/self/mem` registered in the shard's place, at the span's offset (below any
/// mapping, so the kernel answers EIO); the fill fails naming the file, the bytes and
/// the error, the shard is poisoned, and the next fill is refused before reading.
#[test]
fn a_read_failing_with_eio_poisons_the_shard() {
    let dir = tempfile::tempdir().unwrap();
    let (mut src, job, layout, ring, _) = copied_slot(dir.path());
    src.readers = uring_readers_over(vec!["/proc/self/mem".into()]);
    let slot = &mut ring.claim(0).unwrap();
    let e = match fill_slot(slot, &layout, &job, &src) {
        Err(e) => e.to_string(),
        Ok(_) => {
            // The kernel refuses io_uring here: the fill was copied from the mapping.
            let why = src
                .readers
                .fallback()
                .expect("a read below every mapping failed");
            eprintln!("skipped: {why}");
            return;
        }
    };
    assert!(
        e.contains(
            "row 0: document 3: reading with io_uring: /proc/self/mem: read of bytes \
             24576..24706: Input/output error"
        ) && e.contains("the shard is poisoned until restart"),
        "{e}"
    );
    let why = src.shards[0][0].poisoned().expect("the shard is poisoned");
    assert!(why.contains("Input/output error"), "{why}");
    let again = fill_slot(slot, &layout, &job, &src)
        .unwrap_err()
        .to_string();
    assert!(again.contains("poisoned shard"), "{again}");
}

/// A fill whose read hangs (a network filesystem that stopped answering; here a FIFO
/// registered in the shard's place, holding no byte until the test writes some) is
/// named by the stuck-fill watchdog while it waits: job, rank, step, and the file and
/// bytes it reads. Once the bytes come the fill completes, and the watch forgets it.
#[test]
fn a_fill_hung_in_a_read_is_named_by_the_watchdog_until_it_ends() {
    use crate::plan::{Row, Segment};
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let (mut src, mut job, layout, _, _) = copied_slot(dir.path());
    // Document 0: its bytes are the file's first, which a FIFO reads from anywhere.
    let seg = Segment {
        shard: 0,
        doc: 0,
        start: 0,
        len: 65,
        doc_len: 4096,
        group: None,
    };
    job.rows = vec![Row::new(0, 0, vec![seg], 65)].into();
    let fifo = dir.path().join("fifo");
    let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: mkfifo with a valid C string.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    // Read and write: the readers' own open (read only) then does not wait for a writer.
    let mut writer = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&fifo)
        .unwrap();
    let paths = vec![fifo.clone()];
    if let Err(e) = UringReader::open(&paths, UringOptions::default()) {
        eprintln!("skipped: {e}");
        return;
    }
    src.readers = uring_readers_over(paths);
    let want = format!(
        "reading 1 spans with io_uring from {} bytes 0..130",
        fifo.display()
    );
    // Waits for the io_uring read itself: "reading" alone also matched the index
    // lookup the fill makes just before it (a full run once saw that one).
    let got = fill_stuck_then_release(&src, &job, &layout, "reading 1 spans", || {
        writer.write_all(&[7u8, 0].repeat(65)).unwrap()
    });
    assert_eq!(got, (want, Ok(65)));
}

/// io_uring readers over `paths` in place of a shard's own files (its domain's shard
/// 0 reads `paths[0]`).
fn uring_readers_over(paths: Vec<std::path::PathBuf>) -> Readers {
    let files = ShardFiles::open(&paths, false).unwrap();
    Readers::new(Reader::Uring, paths, Some(files), vec![0], true)
}

/// Shard files that do not fit the descriptors the open-file limit leaves beyond the
/// clients' share are not opened: `uring-direct` (two a file) falls back to `uring`
/// (one), and that to the mmap copy, each saying how many it needed. Judged before
/// opening anything, so nothing depends on whether this kernel allows io_uring.
#[test]
fn readers_whose_files_exceed_the_spare_descriptors_fall_back_saying_so() {
    let dir = tempfile::tempdir().unwrap();
    let (src, _, _) = shard_and_job(dir.path(), 7, (10, 9));
    let r = Readers::open_within(Reader::Uring, &src.shards, Some(0), true);
    assert_eq!(r.reader(), Reader::MmapWillneed);
    let why = r.fallback().unwrap();
    assert!(
        why.contains("its 1 shard files need 1 open descriptors")
            && why.contains("leaves 0 beyond")
            && why.contains("LimitNOFILE="),
        "{why}"
    );
    let r = Readers::open_within(Reader::UringDirect, &src.shards, Some(1), true);
    let why = r.fallback().unwrap();
    assert!(
        why.contains("\"uring\"") && why.contains("need 2 open descriptors"),
        "{why}"
    );
    if !why.contains("io_uring is unavailable") {
        assert_eq!(r.reader(), Reader::Uring, "{why}");
    }
}

/// `auto`: plain mappings while the corpus fits half the memory, O_DIRECT beyond.
#[test]
fn auto_reads_a_corpus_that_fits_from_mappings_and_a_larger_one_directly() {
    let gib = 1u64 << 30;
    assert_eq!(auto(2 * gib, Some(24 * gib)), Reader::Mmap);
    assert_eq!(auto(12 * gib, Some(24 * gib)), Reader::Mmap);
    assert_eq!(auto(12 * gib + 1, Some(24 * gib)), Reader::UringDirect);
    assert_eq!(auto(1 << 42, None), Reader::Mmap);
    let r = Readers::open(Reader::Auto, &[]);
    assert_eq!(r.reader(), Reader::Mmap);
    assert!(!r.page_hints());
}

/// The mmap readers open nothing and hint only as `mmap-willneed`.
#[test]
fn mmap_readers_hint_only_when_asked() {
    let r = Readers::open(Reader::Mmap, &[]);
    assert!(!r.uring() && !r.page_hints());
    let r = Readers::open(Reader::MmapWillneed, &[]);
    assert!(!r.uring() && r.page_hints());
    let r = Readers::open_within(Reader::MmapWillneed, &[], None, false);
    assert!(!r.uring() && !r.page_hints());
}
