//! The fills in flight and what each is reading, for the stuck-fill watchdog: a read of
//! a shard on a network filesystem (NFS, Lustre, a FUSE mount of an object store) can
//! hang for minutes or for good, and the copy thread with it (in a page fault for the
//! mmap copy, in the io_uring wait otherwise). [`FillWatch::stuck`] names each fill that
//! has taken longer than a bound: job, rank, step, and the shard file and byte range it
//! was reading, so an operator need not attach a debugger to the daemon to learn them.
//! The same watch covers the reads that are not slot copies: the index lookups a step's
//! planning and page hints make under the hub's lock (a hang there stops every rank's
//! publish and every admission) and a client's seek to its start step ([`Doing`]).

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::Source;
use crate::corpus::guard::{self, IndexNote};
use crate::serve::uring::Span;
use crate::wire::status::StuckFill;

/// How long a fill may take before it is reported stuck (a warning, STATUS's
/// `stuck_fills`, /metrics' `millrace_stuck_fills`) unless `[serve] stuck_fill_seconds`
/// says otherwise: a warm copy takes milliseconds and a cold one of a slow disk well
/// under a second.
pub const STUCK_FILL: Duration = Duration::from_secs(30);

/// What watched work does: a slot fill, or a read that is not one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Doing {
    /// Copying a step into a ring's slot.
    Fill,
    /// Work under the hub's lock that reads shard indexes (planning a step and its page
    /// hints, a live change restoring planners): named by what it is.
    Locked(&'static str),
    /// Seeking a new client's planner to its start step (replaying the plan, from a
    /// plan checkpoint where there is one) or restoring it from its cursor, before the
    /// hub's lock: named by what it is.
    Seek(&'static str),
    /// The plan thread planning a job's next steps ahead of its rings, outside the hub's
    /// lock: a read of it that hangs holds the job's planner, so that each of its rings
    /// stops once it reaches the steps not yet planned.
    Ahead,
}

impl Doing {
    /// The watched work in words, and who waits for it.
    fn words(self) -> (&'static str, &'static str) {
        match self {
            Doing::Fill => ("a fill", "the ring's clients wait for this step"),
            Doing::Locked(_) => (
                "work under the hub's lock",
                "every ring's publish and every admission wait for it",
            ),
            Doing::Seek(_) => ("a seek", "the client waits to be admitted"),
            Doing::Ahead => (
                "planning ahead",
                "the job's rings wait for it once they reach the steps it plans",
            ),
        }
    }
}

/// How often a fill that stays stuck is warned about again.
pub const STUCK_REPEAT: Duration = Duration::from_secs(60);

/// What a fill reads, as addresses and file indexes; [`FillWatch::stuck`] turns it
/// into a file and a byte range.
#[derive(Clone, Debug)]
enum Reading {
    /// Nothing yet: the fill is checking its rows or reading a shard's index.
    Starting,
    /// The lookup of document `doc` in the index of `domain`'s shard `shard`.
    Index { domain: u16, shard: u32, doc: u64 },
    /// The mmap copy of `len` bytes at address `addr` of a shard's mapping.
    Mapped { addr: usize, len: usize },
    /// io_uring reads of these spans (files as [`super::Readers::path`] numbers them).
    Uring(Vec<Span>),
}

/// What a fill reads now, kept in atomics: the copy records it once per piece and per
/// index lookup, millions of times a second, where a mutex's lock and unlock cost 9% of
/// the delivered tokens (docs/BENCHMARKS.md, "The stuck-fill watchdog's cost"). Read
/// only for a fill stuck 30 s, whose record no longer moves; a record read while it is
/// written may mix two pieces, which only a fill that is not stuck meets.
#[derive(Default)]
struct Now {
    /// 0 (nothing yet), [`INDEX`], [`MAPPED`] or [`URING`], stored after its fields.
    kind: AtomicU8,
    a: AtomicU64,
    b: AtomicU64,
    c: AtomicU64,
    /// The spans of [`URING`] (once per fill, not per piece).
    spans: Mutex<Vec<Span>>,
}

const INDEX: u8 = 1;
const MAPPED: u8 = 2;
const URING: u8 = 3;

impl Now {
    fn store(&self, kind: u8, a: u64, b: u64, c: u64) {
        self.a.store(a, Ordering::Relaxed);
        self.b.store(b, Ordering::Relaxed);
        self.c.store(c, Ordering::Relaxed);
        self.kind.store(kind, Ordering::Release);
    }

    fn load(&self) -> Reading {
        let kind = self.kind.load(Ordering::Acquire);
        let (a, b, c) = (
            self.a.load(Ordering::Relaxed),
            self.b.load(Ordering::Relaxed),
            self.c.load(Ordering::Relaxed),
        );
        match kind {
            INDEX => Reading::Index {
                domain: a as u16,
                shard: b as u32,
                doc: c,
            },
            MAPPED => Reading::Mapped {
                addr: a as usize,
                len: b as usize,
            },
            URING => Reading::Uring(self.spans.lock().unwrap_or_else(|p| p.into_inner()).clone()),
            _ => Reading::Starting,
        }
    }
}

/// One fill (or other watched work, [`Doing`]) in flight.
struct InFlight {
    doing: Doing,
    job: String,
    dp_rank: u32,
    step: u64,
    since: Instant,
    reading: Now,
    /// The index lookups of work other than a copy (the planner's, noted by the shard).
    index: Arc<IndexNote>,
    /// The thread doing it: a seek's plan-checkpoint reads are noted by thread
    /// ([`crate::plan_cache::in_progress`]).
    thread: std::thread::ThreadId,
    /// When it was last warned about (None: never).
    warned: Mutex<Option<Instant>>,
}

thread_local! {
    /// The fill this thread runs, if a [`FillWatch`] watches it.
    static CURRENT: RefCell<Option<Arc<InFlight>>> = const { RefCell::new(None) };
}

/// Records what this thread's watched fill reads now (nothing when it is not watched).
fn set(kind: u8, a: u64, b: u64, c: u64) {
    CURRENT.with(|cur| {
        if let Some(f) = cur.borrow().as_ref() {
            f.reading.store(kind, a, b, c);
        }
    });
}

/// This thread's fill is about to look document `doc` up in the index of `domain`'s
/// shard `shard`.
pub(super) fn reading_index(domain: u16, shard: u32, doc: u64) {
    set(INDEX, domain.into(), shard.into(), doc);
}

/// This thread's fill is about to copy `bytes` of a shard's mapping.
pub(super) fn reading_mapped(bytes: &[u8]) {
    set(MAPPED, bytes.as_ptr() as u64, bytes.len() as u64, 0);
}

/// This thread's fill is about to read `spans` with io_uring.
pub(super) fn reading_spans(spans: &[Span]) {
    // Only a watched fill pays for the copy of the list.
    CURRENT.with(|c| {
        if let Some(f) = c.borrow().as_ref() {
            *f.reading.spans.lock().unwrap_or_else(|p| p.into_inner()) = spans.to_vec();
            f.reading.store(URING, 0, 0, 0);
        }
    });
}

/// The fills in flight, registered by the materializer threads around each fill.
#[derive(Default)]
pub struct FillWatch {
    fills: Mutex<Vec<Arc<InFlight>>>,
    /// Set by [`FillWatch::stop`]: the watchdog's loop ends.
    stopped: Mutex<bool>,
    wake: Condvar,
}

/// A fill registered with [`FillWatch::begin`]; dropping it ends the watch (and logs the
/// end of a fill that was reported stuck).
pub struct Watched<'a> {
    watch: &'a FillWatch,
    fill: Arc<InFlight>,
    /// This thread's index lookups go to `fill.index` meanwhile.
    _noting: guard::Noting,
}

impl Drop for Watched<'_> {
    fn drop(&mut self) {
        CURRENT.with(|c| c.borrow_mut().take());
        let (what, _) = self.fill.doing.words();
        self.watch.lock().retain(|f| !Arc::ptr_eq(f, &self.fill));
        let warned = *self.fill.warned.lock().unwrap_or_else(|p| p.into_inner());
        if warned.is_some() {
            tracing::warn!(
                job = %self.fill.job,
                dp_rank = self.fill.dp_rank,
                step = self.fill.step,
                "the stuck {} ended after {:.1} s",
                what.trim_start_matches("a "),
                self.fill.since.elapsed().as_secs_f64()
            );
        }
    }
}

impl FillWatch {
    fn lock(&self) -> MutexGuard<'_, Vec<Arc<InFlight>>> {
        self.fills.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Watches the fill of `step` of ring `dp_rank` of `job` that this thread starts now,
    /// until the returned guard is dropped.
    pub fn begin(&self, job: &str, dp_rank: u32, step: u64) -> Watched<'_> {
        self.begin_as(Doing::Fill, job, dp_rank, step)
    }

    /// Watches work of another kind ([`Doing`]) that this thread starts now for `step`
    /// of ring `dp_rank` of `job` (an empty job: work of no one ring), until the
    /// returned guard is dropped.
    pub fn begin_as(&self, doing: Doing, job: &str, dp_rank: u32, step: u64) -> Watched<'_> {
        let index = Arc::new(IndexNote::default());
        let fill = Arc::new(InFlight {
            doing,
            index: index.clone(),
            thread: std::thread::current().id(),
            job: job.to_string(),
            dp_rank,
            step,
            since: Instant::now(),
            reading: Now::default(),
            warned: Mutex::new(None),
        });
        CURRENT.with(|c| *c.borrow_mut() = Some(fill.clone()));
        self.lock().push(fill.clone());
        Watched {
            watch: self,
            fill,
            _noting: guard::note_index_reads(index),
        }
    }

    /// The fills in flight for longer than `bound`, oldest first, each with the file
    /// and bytes it reads (resolved against `src`).
    pub fn stuck(&self, src: &Source, bound: Duration) -> Vec<StuckFill> {
        self.stuck_fills(src, bound)
            .into_iter()
            .map(|(s, _)| s)
            .collect()
    }

    fn stuck_fills(&self, src: &Source, bound: Duration) -> Vec<(StuckFill, Arc<InFlight>)> {
        let now = Instant::now();
        let fills: Vec<Arc<InFlight>> = self.lock().clone();
        let mut out: Vec<(StuckFill, Arc<InFlight>)> = fills
            .into_iter()
            .filter(|f| now.saturating_duration_since(f.since) > bound)
            .map(|f| {
                let reading = match f.doing {
                    Doing::Fill => describe(src, &f.reading.load()),
                    doing => describe_other(src, doing, &f.index, f.thread),
                };
                let s = StuckFill {
                    job: f.job.clone(),
                    dp_rank: f.dp_rank,
                    step: f.step,
                    seconds: now.saturating_duration_since(f.since).as_secs_f64(),
                    reading,
                };
                (s, f)
            })
            .collect();
        out.sort_by(|a, b| b.0.seconds.total_cmp(&a.0.seconds));
        out
    }

    /// Warns about each fill in flight longer than `bound` (once, then every `repeat`
    /// while it stays stuck); returns how many are stuck.
    pub fn warn_stuck(&self, src: &Source, bound: Duration, repeat: Duration) -> usize {
        let stuck = self.stuck_fills(src, bound);
        let now = Instant::now();
        for (s, f) in &stuck {
            let mut warned = f.warned.lock().unwrap_or_else(|p| p.into_inner());
            if warned.is_some_and(|w| now.saturating_duration_since(w) < repeat) {
                continue;
            }
            *warned = Some(now);
            let (what, waits) = f.doing.words();
            tracing::warn!(
                job = %s.job,
                dp_rank = s.dp_rank,
                step = s.step,
                "{what} has taken {:.0} s and goes on: {}; {waits} (a hung network \
                 filesystem?)",
                s.seconds,
                s.reading
            );
        }
        stuck.len()
    }

    /// Sleeps up to `d`, or until [`FillWatch::stop`]; returns whether stopped.
    pub fn wait(&self, d: Duration) -> bool {
        let stopped = self.stopped.lock().unwrap_or_else(|p| p.into_inner());
        let (stopped, _) = self
            .wake
            .wait_timeout_while(stopped, d, |s| !*s)
            .unwrap_or_else(|p| p.into_inner());
        *stopped
    }

    /// Ends the watchdog's [`FillWatch::wait`].
    pub fn stop(&self) {
        *self.stopped.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.wake.notify_all();
    }
}

/// What watched work other than a fill reads, in words: what it is, and the index file
/// and bytes of the lookup it has in progress (its own thread's), else the plan
/// checkpoint file its thread reads or writes, else the lookups of the planning pool's
/// threads (where a seek replays its domains).
fn describe_other(
    src: &Source,
    doing: Doing,
    note: &IndexNote,
    thread: std::thread::ThreadId,
) -> String {
    let what = match doing {
        Doing::Locked(what) => format!("under the hub's lock, {what}"),
        Doing::Seek(what) => what.to_string(),
        Doing::Ahead => "the plan thread, planning the job's next steps".to_string(),
        Doing::Fill => "copying".to_string(),
    };
    let name = |(addr, doc): (usize, u64)| {
        let mut shards = src.shards.iter().flatten();
        match shards.find(|s| std::sync::Arc::as_ptr(s) as usize == addr) {
            Some(s) => format!("the index of {} for document {doc}", s.index_entries(doc)),
            None => format!("a shard index for document {doc}"),
        }
    };
    let reads: Vec<String> = match note.get() {
        Some(r) => vec![name(r)],
        None => match crate::plan_cache::in_progress(thread) {
            Some(file) => return format!("{what}: {file}"),
            None => guard::pool_index_reads().into_iter().map(name).collect(),
        },
    };
    match reads.len() {
        0 => format!("{what}: no shard index lookup in progress"),
        1 => format!("{what}: reading {}", reads[0]),
        _ => format!("{what}: its planning threads read {}", reads.join("; ")),
    }
}

/// What a fill reads, in words: the shard file and byte range.
fn describe(src: &Source, r: &Reading) -> String {
    match r {
        Reading::Starting => "not yet copying (checking its rows or reading a shard index)".into(),
        Reading::Index { domain, shard, doc } => {
            let path = src
                .shards
                .get(*domain as usize)
                .and_then(|d| d.get(*shard as usize));
            match path {
                Some(s) => format!(
                    "reading the index of {} for document {doc}",
                    s.path().display()
                ),
                None => format!("reading the index of domain {domain}'s shard {shard}"),
            }
        }
        Reading::Mapped { addr, len } => {
            let found = src.shards.iter().flatten().find_map(|s| s.file_at(*addr));
            match found {
                Some((file, at)) => format!(
                    "copying {} bytes {at}..{} from its mapping",
                    file.display(),
                    at + len
                ),
                None => format!("copying {len} bytes from a shard's mapping"),
            }
        }
        Reading::Uring(spans) => {
            let mut files: Vec<(u32, u64, u64)> = Vec::new();
            for s in spans {
                match files.iter_mut().find(|f| f.0 == s.file) {
                    Some(f) => {
                        f.1 = f.1.min(s.offset);
                        f.2 = f.2.max(s.offset + s.len);
                    }
                    None => files.push((s.file, s.offset, s.offset + s.len)),
                }
            }
            let named: Vec<String> = files
                .iter()
                .take(4)
                .map(|&(f, a, b)| {
                    let path = src
                        .readers
                        .path(f)
                        .map_or_else(|| format!("file {f}"), |p| p.display().to_string());
                    format!("{path} bytes {a}..{b}")
                })
                .collect();
            let more = files.len().saturating_sub(4);
            format!(
                "reading {} spans with io_uring from {}{}",
                spans.len(),
                named.join(", "),
                if more > 0 {
                    format!(" and {more} more files")
                } else {
                    String::new()
                }
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A seek is named by the plan checkpoint its own thread reads while no index
    /// lookup is in progress (a `cache_dir` on a network filesystem that stopped
    /// answering), not only as "seeking"; another thread's checkpoint read is not its,
    /// and once the read ends the seek is named as before.
    #[test]
    fn a_seek_in_a_plan_checkpoint_read_is_named_by_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let (src, _, _) = crate::serve::fill::tests::shard_and_job(dir.path(), 7, (10, 9));
        let watch = FillWatch::default();
        let cache = crate::plan_cache::tests::noting_a_read(dir.path(), || {
            let _watched =
                watch.begin_as(Doing::Seek("seeking the client's start step"), "j", 1, 9);
            // Another thread's read, noted while this seek runs: not this seek's.
            std::thread::scope(|s| {
                s.spawn(|| {
                    crate::plan_cache::tests::noting_a_read(&dir.path().join("other"), || {
                        let stuck = watch.stuck(&src, Duration::ZERO);
                        assert_eq!(stuck.len(), 1, "{stuck:?}");
                        stuck[0].reading.clone()
                    })
                })
                .join()
                .unwrap()
            })
        });
        let (file, (_, reading)) = cache;
        assert_eq!(
            reading,
            format!(
                "seeking the client's start step: reading the plan checkpoint {}",
                file.display()
            )
        );
        // Outside the read: named as before, by the planning pool's lookups (other
        // tests may have some in progress) or by none.
        let _watched = watch.begin_as(Doing::Seek("seeking"), "j", 1, 9);
        let stuck = watch.stuck(&src, Duration::ZERO);
        let r = &stuck[0].reading;
        assert!(
            r.starts_with("seeking: ") && !r.contains("plan checkpoint"),
            "{r}"
        );
    }
}
