//! What `millrace bench` measures of the machine and of a process, outside millrace: the
//! memcpy and disk/page-cache references, page-cache eviction and residency, and the
//! daemon's memory, faults and reads from /proc.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};

use super::report::References;

/// Best-of-`reps` single-thread copy of a `bytes` buffer, in GB/s.
pub fn memcpy_gb_per_s(bytes: usize, reps: usize) -> f64 {
    let src: Vec<u8> = (0..bytes).map(|i| (i * 31 % 251) as u8).collect();
    let mut dst = vec![0u8; bytes];
    dst.copy_from_slice(&src); // fault the pages in before timing
    let mut best = f64::MAX;
    for _ in 0..reps.max(1) {
        let t = Instant::now();
        dst.copy_from_slice(std::hint::black_box(&src));
        std::hint::black_box(&mut dst);
        best = best.min(t.elapsed().as_secs_f64());
    }
    bytes as f64 / best.max(1e-12) / 1e9
}

/// Round trips of one cache line between two threads pinned to the first two CPUs this
/// process may use, in ns (the median of 5 batches of 20,000), or `None` with fewer than
/// two CPUs or when pinning fails. Why: every slot crosses cores three times (plan thread,
/// copy thread, consumer) and the nanoGPT baseline never does, so where a VM's
/// hypervisor happens to place its vCPUs decides millrace's figures and not the
/// baseline's (on the 2-vCPU EPYC VM of docs/BENCHMARKS.md: 74-85 ns when the host put
/// them near each other, 316-478 ns apart). The calling thread's affinity is restored
/// before it returns.
pub(super) fn core_round_trip_ns() -> Option<f64> {
    // Spinning on a CPU that another thread shares waits for its time slices: give up
    // after 2 s (an idle machine takes about 50 ms).
    core_round_trip(20_000, 5, std::time::Duration::from_secs(2))
}

/// [`core_round_trip_ns`] with its sizes: `n_batches` of `trips_per_batch` round trips, given up
/// (`None`) after `limit`.
fn core_round_trip(
    trips_per_batch: u64,
    n_batches: u64,
    limit: std::time::Duration,
) -> Option<f64> {
    use rustix::thread::{sched_getaffinity, sched_setaffinity, CpuSet};
    use std::sync::atomic::{AtomicU64, Ordering};
    let own = sched_getaffinity(None).ok()?;
    let mut cpus = (0..CpuSet::MAX_CPU).filter(|&c| own.is_set(c));
    let (a, b) = (cpus.next()?, cpus.next()?);
    let only = |c: usize| {
        let mut set = CpuSet::new();
        set.set(c);
        set
    };
    // 0: not started, u64::MAX: the partner could not pin or gave up; else the last
    // odd value is ours to answer with the next even one.
    let line = std::sync::Arc::new(AtomicU64::new(0));
    let partner = {
        let line = line.clone();
        std::thread::spawn(move || {
            if sched_setaffinity(None, &only(b)).is_err() {
                line.store(u64::MAX, Ordering::SeqCst);
                return;
            }
            let t = Instant::now();
            let mut want = 1u64;
            while want < 2 * trips_per_batch * n_batches {
                let v = line.load(Ordering::Acquire);
                if v == u64::MAX {
                    return;
                }
                if v == want {
                    line.store(want + 1, Ordering::Release);
                    want += 2;
                } else if t.elapsed() > limit {
                    line.store(u64::MAX, Ordering::SeqCst);
                    return;
                }
                std::hint::spin_loop();
            }
        })
    };
    let mut batches = Vec::new();
    if sched_setaffinity(None, &only(a)).is_ok() {
        let start = Instant::now();
        let mut next = 1u64;
        'batches: for _ in 0..n_batches {
            let t = Instant::now();
            for _ in 0..trips_per_batch {
                // Only over the partner's answer (or the start): never over its give-up.
                if line
                    .compare_exchange(next - 1, next, Ordering::AcqRel, Ordering::Acquire)
                    .is_err()
                {
                    break 'batches;
                }
                loop {
                    let v = line.load(Ordering::Acquire);
                    if v == next + 1 {
                        break;
                    }
                    if v == u64::MAX || start.elapsed() > limit {
                        break 'batches;
                    }
                    std::hint::spin_loop();
                }
                next += 2;
            }
            batches.push(t.elapsed().as_nanos() as f64 / trips_per_batch as f64);
        }
    }
    line.store(u64::MAX, Ordering::SeqCst);
    let _ = partner.join();
    let _ = sched_setaffinity(None, &own);
    if batches.len() as u64 != n_batches {
        return None;
    }
    batches.sort_by(f64::total_cmp);
    batches.get(batches.len() / 2).copied()
}

/// CLOCK_MONOTONIC in ns: the clock the consumers and the baseline stamp batches with.
pub(super) fn now_ns() -> u64 {
    millrace::sys::monotonic_ns()
}

/// Every shard-like file (.bin, .idx, .npy) under `dir`.
pub(super) fn shard_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).with_context(|| format!("listing {}", d.display()))? {
            let p = e?.path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            let is_shard = p
                .extension()
                .and_then(|x| x.to_str())
                .is_some_and(|x| matches!(x, "bin" | "idx" | "npy"));
            if is_shard {
                out.push(p);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// One file of token data, as the baseline memmaps it.
#[derive(Debug, Clone)]
pub(super) struct DataFile {
    pub(super) path: PathBuf,
    /// Where the tokens start (0 for a Megatron .bin, the header for .npy).
    pub(super) offset: u64,
    pub(super) bytes: u64,
    pub(super) dtype: millrace::corpus::DType,
}

/// The token-data files of the corpus a config names (opened and closed again).
pub(super) fn data_files(cfg_path: &Path) -> Result<Vec<DataFile>> {
    let cfg = millrace::config::Config::load(cfg_path)?;
    let mut out = Vec::new();
    for (_, shards) in cfg.open_corpus()? {
        for s in shards {
            let bytes = s.data_bytes();
            let (path, offset) = match (s.as_megatron(), s.as_raw()) {
                (Some(m), _) => (m.bin_path().to_path_buf(), 0),
                (None, Some(r)) => (r.path().to_path_buf(), r.file_len().saturating_sub(bytes)),
                (None, None) => continue,
            };
            out.push(DataFile {
                path,
                offset,
                bytes,
                dtype: s.dtype(),
            });
        }
    }
    Ok(out)
}

/// Writes back and drops `files` from the page cache (`fdatasync` first: dirty pages
/// are not dropped).
pub(super) fn evict(files: &[PathBuf]) -> Result<()> {
    for p in files {
        let f = std::fs::File::open(p).with_context(|| format!("opening {}", p.display()))?;
        f.sync_data()
            .with_context(|| format!("fdatasync {}", p.display()))?;
        rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::DontNeed)
            .with_context(|| format!("posix_fadvise(DONTNEED) on {}", p.display()))?;
    }
    Ok(())
}

/// `sync; echo 3 > /proc/sys/vm/drop_caches`; false when not permitted.
pub(super) fn drop_caches() -> bool {
    rustix::fs::sync();
    std::fs::write("/proc/sys/vm/drop_caches", "3\n").is_ok()
}

/// Share of the pages of `files` resident in the page cache (mincore).
pub(super) fn resident_fraction(files: &[PathBuf]) -> Result<f64> {
    let (mut resident, mut total) = (0u64, 0u64);
    for p in files {
        let f = std::fs::File::open(p).with_context(|| format!("opening {}", p.display()))?;
        if f.metadata()?.len() == 0 {
            continue;
        }
        // Never read: mincore only.
        let map = millrace::sys::map_file(&f, None)
            .with_context(|| format!("mapping {}", p.display()))?;
        let (r, t) = millrace::sys::resident_pages(&map)
            .with_context(|| format!("mincore on {}", p.display()))?;
        resident += r;
        total += t;
    }
    Ok(if total == 0 {
        0.0
    } else {
        resident as f64 / total as f64
    })
}

/// Sums a byte range as u64 words: one thread reading every byte once.
pub(super) fn sum_words(bytes: &[u8]) -> u64 {
    let mut acc = [0u64; 4];
    let mut chunks = bytes.chunks_exact(32);
    for c in &mut chunks {
        for (k, a) in acc.iter_mut().enumerate() {
            let mut w = [0u8; 8];
            w.copy_from_slice(&c[8 * k..8 * k + 8]);
            *a = a.wrapping_add(u64::from_le_bytes(w));
        }
    }
    let tail: u64 = chunks.remainder().iter().map(|&b| u64::from(b)).sum();
    acc.iter().fold(tail, |x, y| x.wrapping_add(*y))
}

/// The disk and page-cache references over the first `limit` bytes of the data files.
pub(super) fn references(files: &[DataFile], limit: u64, memcpy: f64) -> Result<References> {
    let mut chosen: Vec<(PathBuf, u64)> = Vec::new();
    let mut left = limit.max(1 << 20);
    for f in files {
        if left == 0 {
            break;
        }
        let n = f.bytes.min(left);
        chosen.push((f.path.clone(), n));
        left -= n;
    }
    let paths: Vec<PathBuf> = chosen.iter().map(|(p, _)| p.clone()).collect();
    evict(&paths)?;
    let resident = resident_fraction(&paths)?;
    let mut buf = vec![0u8; 8 << 20];
    let mut total = 0u64;
    let t = Instant::now();
    for (p, n) in &chosen {
        let mut f = std::fs::File::open(p).with_context(|| format!("opening {}", p.display()))?;
        let mut left = *n;
        while left > 0 {
            let want = (left as usize).min(buf.len());
            let got = f
                .read(&mut buf[..want])
                .with_context(|| format!("reading {}", p.display()))?;
            if got == 0 {
                break;
            }
            left -= got as u64;
            total += got as u64;
        }
    }
    let disk = total as f64 / t.elapsed().as_secs_f64().max(1e-9) / 1e9;
    // Page-cache reads through mappings: first touch (faults) and a second pass.
    let mut maps = Vec::new();
    for (p, n) in &chosen {
        let f = std::fs::File::open(p).with_context(|| format!("opening {}", p.display()))?;
        // Nobody truncates these files during the bench.
        let m = millrace::sys::map_file(&f, Some(*n as usize))
            .with_context(|| format!("mapping {}", p.display()))?;
        maps.push(m);
    }
    let mut sink = 0u64;
    let t = Instant::now();
    for m in &maps {
        sink = sink.wrapping_add(sum_words(m));
    }
    let first = total as f64 / t.elapsed().as_secs_f64().max(1e-9) / 1e9;
    let mut best = f64::MAX;
    for _ in 0..2 {
        let t = Instant::now();
        for m in &maps {
            sink = sink.wrapping_add(sum_words(m));
        }
        best = best.min(t.elapsed().as_secs_f64());
    }
    std::hint::black_box(sink);
    Ok(References {
        memcpy_gb_per_s: memcpy,
        read_bytes: total,
        disk_cold_read_gb_per_s: disk,
        resident_after_evict: resident,
        mmap_first_touch_gb_per_s: first,
        mmap_read_gb_per_s: total as f64 / best.max(1e-9) / 1e9,
        core_round_trip_ns: core_round_trip_ns(),
    })
}

/// Reads every file under `dir` once so the shards are in the page cache; returns bytes.
/// Token files are read through a mapping advised MADV_HUGEPAGE, as the daemon's `mmap`
/// reader faults them ([`millrace::serve::fill::Readers::huge_pages`]): pages not cached
/// yet arrive in 2 MiB folios, so "warm" is the page cache the daemon leaves itself,
/// whatever the host's readahead. Pages already cached keep their folios; each run's
/// report says how many of the daemon's were mapped huge (`daemon_file_pmd_bytes`).
pub(super) fn warm(dir: &Path) -> Result<u64> {
    let mut total = 0u64;
    let mut buf = vec![0u8; 1 << 22];
    let mut sink = 0u8;
    for p in shard_files(dir)? {
        let mut f = std::fs::File::open(&p).with_context(|| format!("opening {}", p.display()))?;
        if p.extension().is_some_and(|x| x == "bin") && f.metadata()?.len() > 0 {
            // SAFETY: a read-only private view of a benchmark corpus nothing truncates
            // while the benchmark runs; only its bytes are read.
            let map = unsafe { memmap2::Mmap::map(&f) }
                .with_context(|| format!("mapping {}", p.display()))?;
            millrace::sys::advise(&map, millrace::sys::Advice::HugePage);
            for page in map.chunks(4096) {
                sink ^= page[0];
            }
            total += map.len() as u64;
            continue;
        }
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            total += n as u64;
        }
    }
    std::hint::black_box(sink);
    Ok(total)
}

/// A field of /proc/PID/smaps_rollup in bytes (`FilePmdMapped`: file pages mapped by
/// 2 MiB entries).
pub(super) fn smaps_bytes(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    let line = text.lines().find(|l| l.split(':').next() == Some(field))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// A field of /proc/PID/status in bytes (`VmHWM`, `RssAnon`, ...).
pub(super) fn status_bytes(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = text.lines().find(|l| l.split(':').next() == Some(field))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// (minor, major) page faults of process `pid` so far (/proc/PID/stat fields 10 and 12).
pub(super) fn page_faults(pid: u32) -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state): field 10 is index 7, field 12 index 9.
    Some((f.get(7)?.parse().ok()?, f.get(9)?.parse().ok()?))
}

/// `read_bytes` of /proc/PID/io: bytes the process caused to be read from storage.
pub(super) fn io_read_bytes(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/io")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("read_bytes:"))
        .and_then(|v| v.trim().parse().ok())
}

/// The CPU model name from /proc/cpuinfo, for the report.
pub(super) fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sum_words_reads_every_byte() {
        let v: Vec<u8> = (0..1000u32).map(|i| (i % 251) as u8).collect();
        let words: u64 = v
            .chunks(8)
            .map(|c| {
                let mut w = [0u8; 8];
                w[..c.len()].copy_from_slice(c);
                u64::from_le_bytes(w)
            })
            .fold(0u64, u64::wrapping_add);
        // 1000 = 31 x 32 + 8: the 8-byte tail is summed per byte.
        let tail: u64 = v[992..].iter().map(|&b| u64::from(b)).sum();
        let head = words.wrapping_sub(u64::from_le_bytes(v[992..1000].try_into().unwrap()));
        assert_eq!(sum_words(&v), head.wrapping_add(tail));
    }

    #[test]
    fn own_status_and_io() {
        let pid = std::process::id();
        assert!(status_bytes(pid, "VmHWM").is_some_and(|b| b > 0));
        assert_eq!(status_bytes(pid, "NoSuchField"), None);
        assert!(smaps_bytes(pid, "Rss").is_some_and(|b| b > 0));
        assert!(smaps_bytes(pid, "FilePmdMapped").is_some());
        assert_eq!(smaps_bytes(pid, "NoSuchField"), None);
        // /proc/PID/io needs the same user; present for our own process.
        assert!(io_read_bytes(pid).is_some());
        assert!(page_faults(pid).is_some_and(|(minor, _)| minor > 0));
    }

    /// Two pinned threads really bounce the line (CI has 2 cores), and the caller's
    /// affinity is what it was. Small and with a long limit: other tests share the CPUs.
    #[test]
    fn core_round_trip_is_measured_and_leaves_the_affinity() {
        use rustix::thread::{sched_getaffinity, CpuSet};
        let before = sched_getaffinity(None).unwrap();
        let rtt = core_round_trip(300, 3, std::time::Duration::from_secs(60));
        let after = sched_getaffinity(None).unwrap();
        assert!((0..CpuSet::MAX_CPU).all(|c| before.is_set(c) == after.is_set(c)));
        if before.count() >= 2 {
            let ns = rtt.expect("two CPUs: a round trip is measured");
            assert!(ns > 1.0 && ns < 1e7, "{ns} ns");
        } else {
            assert_eq!(rtt, None);
        }
    }
}
