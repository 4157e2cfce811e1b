//! Which reader fills compact slots (`[serve] reader`), and the io_uring readers the
//! materializer threads share: one per thread at a time, kept in a pool so each thread
//! reuses a ring whose shard files are already registered. The files are opened once
//! ([`ShardFiles`]) and every ring registers the same descriptors. The io_uring readers
//! themselves are src/serve/uring.rs; docs/DESIGN.md ("Page cache") says why each exists.
//! An error of io_uring itself after start moves it through [`Health`]: a refusal that
//! lasts gives it up for good, one that may pass (memory, descriptors) copies from the
//! mappings for a backoff and tries again.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Instant;

use tracing::{info, warn};

use crate::config::serve::Reader;
use crate::corpus::Shard;
use crate::serve::uring::{data_path, ReadError, ShardFiles, Span, UringOptions, UringReader};

/// The reader compact slots use, resolved at start, and the io_uring readers not in use.
pub struct Readers {
    /// What fills slots: [`Reader::Uring`] or [`Reader::UringDirect`] read with io_uring;
    /// the mmap readers copy from the mappings.
    reader: Reader,
    /// Why the configured reader could not be used, if it could not.
    fallback: Option<String>,
    /// Token files, every domain's shards in plan order.
    paths: Vec<std::path::PathBuf>,
    /// Those files, opened once for every reader of the pool (`None` for the copy).
    files: Option<Arc<ShardFiles>>,
    /// Index in `paths` of each domain's first shard.
    first: Vec<u32>,
    /// Readers not in use by a fill, and how many exist.
    pool: Mutex<Pool>,
    /// Signalled when a reader goes back to the pool (or is dropped).
    returned: Condvar,
    /// What io_uring's failures after start made of it; locked only when a read fails,
    /// or succeeds while `copy_until` is not [`IN_USE`].
    health: Mutex<Health>,
    /// `health` as fills read it, one relaxed load a fill: [`IN_USE`], [`GIVEN_UP`], or
    /// the time (ms on `born`'s clock) from which a fill may try io_uring again.
    copy_until: AtomicU64,
    /// The clock `copy_until` counts on.
    born: Instant,
    /// How long fills copy after each failure in a row, and how many give up.
    backoff: Backoff,
    /// `[serve] page_hints`: whether the mmap copy (configured, or io_uring's fallback)
    /// gets WILLNEED hints and MADV_RANDOM.
    page_hints: bool,
    /// Whether the shard mappings are advised MADV_RANDOM now (else as mapped).
    random: AtomicBool,
    /// Held while the mappings' advice changes, so that two claims do not interleave
    /// their madvise calls and leave the mappings half one way.
    advising: Mutex<()>,
}

/// [`Readers::copy_until`] while io_uring is in use.
const IN_USE: u64 = 0;
/// [`Readers::copy_until`] once io_uring was given up for good.
const GIVEN_UP: u64 = u64::MAX;

/// What errors of io_uring itself after start ([`ReadError::is_io_uring`]) made of it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Health {
    /// In use.
    InUse,
    /// Failed `failures` times in a row for reasons that may pass
    /// ([`ReadError::is_transient`]), the last with `why`: fills copy from the mappings
    /// until `retry_at` (ms on the readers' clock), then one tries io_uring again.
    Retrying {
        failures: u32,
        retry_at: u64,
        why: String,
    },
    /// Given up for good (a refusal that lasts, or [`Backoff::tries`] transient failures
    /// in a row): fills copy from the mappings until restart.
    GivenUp { why: String },
}

/// When io_uring is tried again after failures that may pass: `first_ms` after the
/// first, doubling to `cap_ms`; the `tries`-th failure in a row gives it up for good.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Backoff {
    first_ms: u64,
    cap_ms: u64,
    tries: u32,
}

/// A node's memory squeeze or descriptor shortage usually passes within seconds to
/// minutes: tries at 1, 2, 4 ... 64 s, then every 64 s, give io_uring about five
/// minutes before it is given up.
const BACKOFF: Backoff = Backoff {
    first_ms: 1000,
    cap_ms: 64_000,
    tries: 10,
};

impl Backoff {
    /// How long fills copy after the `failures`-th failure in a row.
    fn delay_ms(&self, failures: u32) -> u64 {
        let doubled = self
            .first_ms
            .saturating_mul(1u64 << failures.saturating_sub(1).min(32));
        doubled.min(self.cap_ms)
    }
}

impl Health {
    /// The state after a read failed at `now` with `why` (`transient`:
    /// [`ReadError::is_transient`]); false when nothing changed: a fill already in
    /// flight when an earlier failure started the backoff does not count again.
    fn failed(&mut self, now: u64, transient: bool, why: String, b: &Backoff) -> bool {
        let before = match self {
            Health::GivenUp { .. } => return false,
            Health::Retrying { retry_at, .. } if now < *retry_at => return false,
            Health::Retrying { failures, .. } => *failures,
            Health::InUse => 0,
        };
        let failures = before + 1;
        *self = if !transient {
            Health::GivenUp { why }
        } else if failures >= b.tries {
            Health::GivenUp {
                why: format!("{failures} failures in a row, the last: {why}"),
            }
        } else {
            Health::Retrying {
                failures,
                retry_at: now.saturating_add(b.delay_ms(failures)),
                why,
            }
        };
        true
    }

    /// The state after a read succeeded at `now`: in use again once the backoff ran out
    /// (a read begun before it started proves nothing). The failures it ends, if so.
    fn succeeded(&mut self, now: u64) -> Option<u32> {
        match self {
            Health::Retrying {
                failures, retry_at, ..
            } if now >= *retry_at => {
                let failures = *failures;
                *self = Health::InUse;
                Some(failures)
            }
            _ => None,
        }
    }

    /// [`Readers::copy_until`] for this state.
    fn copy_until(&self) -> u64 {
        match self {
            Health::InUse => IN_USE,
            Health::Retrying { retry_at, .. } => *retry_at,
            Health::GivenUp { .. } => GIVEN_UP,
        }
    }
}

/// The io_uring readers of a [`Readers`].
#[derive(Default)]
struct Pool {
    idle: Vec<UringReader>,
    /// Readers that exist, idle or in use.
    live: usize,
    /// Opening one more failed (RLIMIT_MEMLOCK before Linux 5.12, fds): fills wait for
    /// an idle reader instead, for at most [`READER_WAIT`].
    full: bool,
}

impl std::fmt::Debug for Readers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Readers")
            .field("reader", &self.reader)
            .field("fallback", &self.fallback)
            .field("files", &self.paths.len())
            .finish_non_exhaustive()
    }
}

impl Readers {
    /// The mmap copy, nothing opened: for fills that never read with io_uring.
    pub fn copy(reader: Reader) -> Readers {
        Readers::copy_hinted(reader, true)
    }

    /// [`Readers::copy`] under `[serve] page_hints`: without them the hinted copy is
    /// plain `mmap`, and is named so (a start that fell back from io_uring said
    /// `mmap-willneed` while it gave no hints).
    fn copy_hinted(reader: Reader, page_hints: bool) -> Readers {
        let reader = match reader {
            Reader::Uring | Reader::UringDirect | Reader::MmapWillneed if page_hints => {
                Reader::MmapWillneed
            }
            Reader::Uring | Reader::UringDirect | Reader::MmapWillneed | Reader::Auto => {
                Reader::Mmap
            }
            r => r,
        };
        Readers::new(reader, Vec::new(), None, Vec::new(), page_hints)
    }

    /// Readers of `reader` over the token files `paths` (domain d's first at `first[d]`),
    /// opened as `files`; io_uring in use.
    fn new(
        reader: Reader,
        paths: Vec<std::path::PathBuf>,
        files: Option<Arc<ShardFiles>>,
        first: Vec<u32>,
        page_hints: bool,
    ) -> Readers {
        Readers {
            reader,
            fallback: None,
            paths,
            files,
            first,
            pool: Mutex::default(),
            returned: Condvar::new(),
            health: Mutex::new(Health::InUse),
            copy_until: AtomicU64::new(IN_USE),
            born: Instant::now(),
            backoff: BACKOFF,
            page_hints,
            random: AtomicBool::new(false),
            advising: Mutex::new(()),
        }
    }

    /// Resolves `reader` for these shards: an io_uring reader is set up once here, so a
    /// kernel that refuses io_uring (old, seccomp, `io_uring_disabled`) or a filesystem
    /// that refuses O_DIRECT is found at start and logged once. io_uring unavailable: the
    /// mmap copy with hints; O_DIRECT refused: buffered io_uring.
    pub fn open(reader: Reader, shards: &[Vec<Arc<Shard>>]) -> Readers {
        Readers::open_within(reader, shards, None, true)
    }

    /// [`Readers::open`] with at most `spare_fds` descriptors for the shard files (what
    /// the open-file limit leaves beyond the clients' share; `None`: no bound). The
    /// io_uring readers hold one per shard file for the daemon's life, two with O_DIRECT,
    /// so a corpus of tens of thousands of shards under a low `LimitNOFILE=` would leave
    /// clients failing with EMFILE, or fail the open at the limit itself: a reader whose
    /// files do not fit falls back (`uring-direct` to `uring`, then to the mmap copy),
    /// saying how many it needed. `page_hints` is `[serve] page_hints`
    /// ([`Readers::page_hints`]).
    pub fn open_within(
        reader: Reader,
        shards: &[Vec<Arc<Shard>>],
        spare_fds: Option<u64>,
        page_hints: bool,
    ) -> Readers {
        let reader = match reader {
            Reader::Auto => {
                let corpus: u64 = shards.iter().flatten().map(|s| s.data().len() as u64).sum();
                let memory = crate::serve::budget::memory_limit();
                let chosen = auto(corpus, memory);
                info!(
                    corpus_bytes = corpus,
                    memory_bytes = memory,
                    "[serve] reader = \"auto\": {}",
                    chosen.as_str()
                );
                chosen
            }
            r => r,
        };
        if !matches!(reader, Reader::Uring | Reader::UringDirect) {
            return Readers::copy_hinted(reader, page_hints);
        }
        let mut first = Vec::with_capacity(shards.len());
        let mut paths = Vec::new();
        for domain in shards {
            first.push(paths.len() as u32);
            paths.extend(domain.iter().map(|s| data_path(s).to_path_buf()));
        }
        // The files are opened by path, after the shards were mapped (a start can take
        // minutes): each must still be the one mapped, or the plan describes other bytes.
        let mapped: Vec<(u64, u64)> = shards.iter().flatten().map(|s| s.data_file()).collect();
        let mut readers = Readers::new(reader, paths, None, first, page_hints);
        let mut tried = reader;
        let files = readers.paths.len() as u64;
        if let Some(spare) = spare_fds {
            let fds = |r: Reader| files * if r == Reader::UringDirect { 2 } else { 1 };
            let too_many = |r: Reader| {
                format!(
                    "its {files} shard files need {} open descriptors, and the open-file \
                     limit (RLIMIT_NOFILE) leaves {spare} beyond what max_clients and \
                     max_control_connections may need; raise LimitNOFILE= in the unit",
                    fds(r)
                )
            };
            if tried == Reader::UringDirect && fds(tried) > spare {
                readers.fell_back(reader, Reader::Uring, &too_many(tried));
                tried = Reader::Uring;
            }
            if fds(tried) > spare {
                let copy = readers.copy_reader();
                readers.fell_back(reader, copy, &too_many(tried));
                readers.reader = copy;
                return readers;
            }
        }
        loop {
            let opened = ShardFiles::open(&readers.paths, tried == Reader::UringDirect)
                .and_then(|files| files.check_same(mapped.iter().copied()).map(|()| files))
                .and_then(|files| {
                    UringReader::open_with(files.clone(), options(tried)).map(|r| (files, r))
                });
            match opened {
                Ok((files, r)) => {
                    readers.reader = tried;
                    readers.files = Some(files);
                    let pool = readers.pool.get_mut().unwrap_or_else(|p| p.into_inner());
                    pool.idle.push(r);
                    pool.live = 1;
                    break;
                }
                Err(e)
                    if tried == Reader::UringDirect
                        && !e.is_unavailable()
                        && !matches!(e, ReadError::Replaced { .. }) =>
                {
                    readers.fell_back(reader, Reader::Uring, &e);
                    tried = Reader::Uring;
                }
                Err(e) => {
                    let copy = readers.copy_reader();
                    readers.fell_back(reader, copy, &e);
                    readers.reader = copy;
                    break;
                }
            }
        }
        if readers.fallback.is_none() {
            info!(reader = reader.as_str(), "compact slots read with io_uring");
        }
        readers
    }

    /// Records a step down the chain (`uring-direct`, `uring`, the mmap copy) to `to`,
    /// and warns; a second step extends the first's line instead of contradicting it
    /// (a start logged "using uring", then at once "using mmap-willneed").
    fn fell_back(&mut self, configured: Reader, to: Reader, e: &dyn std::fmt::Display) {
        let why = match self.fallback.take() {
            None => format!(
                "[serve] reader = {:?} cannot be used ({e}); using {:?}",
                configured.as_str(),
                to.as_str()
            ),
            Some(before) => format!(
                "{before}, which cannot be used either ({e}); using {:?}",
                to.as_str()
            ),
        };
        warn!("{why}");
        self.fallback = Some(why);
    }

    /// The reader in use: the configured one, or its fallback; while io_uring is not
    /// in use after start ([`Health`]) the copy it falls back to, `mmap-willneed` (or
    /// `mmap` without `page_hints`).
    pub fn reader(&self) -> Reader {
        match self.copy_until.load(Ordering::Relaxed) {
            IN_USE => self.reader,
            _ => self.copy_reader(),
        }
    }

    /// The copy compact slots fall back to while io_uring is not in use after start: a
    /// cold-path reader's, with the hints that made the copy 2.2-2.6x faster cold than
    /// plain readahead over 2% of a 10^10-token corpus (docs/BENCHMARKS.md, "The cold data
    /// path at 10^10 tokens").
    fn copy_reader(&self) -> Reader {
        match self.page_hints {
            true => Reader::MmapWillneed,
            false => Reader::Mmap,
        }
    }

    /// Why the configured reader is not the one in use, if it is not: unavailable at
    /// start, or io_uring retried after failures that may pass, or given up.
    pub fn fallback(&self) -> Option<String> {
        let health = self.lock_health().clone();
        let now = self.now_ms();
        match health {
            Health::InUse => self.fallback.clone(),
            h => Some(self.describe(&h, now)),
        }
    }

    /// io_uring's retry after failures that may pass, while it waits for one (STATUS
    /// `reader_retry`).
    pub fn retry(&self) -> Option<crate::wire::status::ReaderRetry> {
        match &*self.lock_health() {
            Health::Retrying {
                failures,
                retry_at,
                why,
            } => Some(crate::wire::status::ReaderRetry {
                failures: *failures,
                give_up_after: self.backoff.tries,
                retry_in_ms: retry_at.saturating_sub(self.now_ms()),
                error: why.clone(),
            }),
            _ => None,
        }
    }

    /// The log line and STATUS `reader_fallback` of a state that is not [`Health::InUse`].
    fn describe(&self, h: &Health, now: u64) -> String {
        let (configured, copy) = (self.reader.as_str(), self.copy_reader().as_str());
        match h {
            Health::InUse => format!("[serve] reader = {configured:?} in use"),
            Health::Retrying {
                failures,
                retry_at,
                why,
            } => format!(
                "[serve] reader = {configured:?} failed ({why}); compact slots are copied \
                 from the mappings (as {copy:?}) until io_uring is tried again in {} ms \
                 (failure {failures} in a row; given up after {})",
                retry_at.saturating_sub(now),
                self.backoff.tries
            ),
            Health::GivenUp { why } => format!(
                "[serve] reader = {configured:?} failed after start ({why}); compact slots \
                 are copied from the mappings (as {copy:?}) until restart"
            ),
        }
    }

    /// Whether the shards get page-cache hints (MADV_RANDOM, MADV_WILLNEED) now: only
    /// when `[serve] page_hints` allows them and slots are copied from the mappings with
    /// hints, as `mmap-willneed` is, or as io_uring's fallback while it is not in use. A
    /// reader that does not read through the mappings must not hint: WILLNEED would read
    /// every span twice under O_DIRECT. One relaxed load: asked once a planned step.
    pub fn page_hints(&self) -> bool {
        self.page_hints
            && match self.reader {
                Reader::MmapWillneed => true,
                Reader::Uring | Reader::UringDirect => {
                    self.copy_until.load(Ordering::Relaxed) != IN_USE
                }
                _ => false,
            }
    }

    /// Whether the shards' mappings are advised MADV_HUGEPAGE: for the plain `mmap`
    /// copy, when `[serve] page_hints` allows it. A fault then reads a 2 MiB folio, which
    /// the kernel maps with one entry: warm at 10^10 tokens, the copy took 6-38% less CPU
    /// per token from PMD-mapped folios than from small ones (docs/BENCHMARKS.md, "Huge
    /// folios and the served rows"). Never for `mmap-willneed`, whose faults must read
    /// only their page.
    pub fn huge_pages(&self) -> bool {
        self.page_hints && self.reader == Reader::Mmap
    }

    /// Advises every shard's token mapping MADV_HUGEPAGE ([`Readers::huge_pages`]),
    /// at start. Pages the page cache already holds keep their folios' size.
    pub fn advise_huge(&self, shards: &[Vec<Arc<Shard>>]) {
        for shard in shards.iter().flatten() {
            crate::sys::advise(shard.data(), crate::sys::Advice::HugePage);
        }
    }

    /// Keeps the shard mappings' read-ahead advice in line with [`Readers::page_hints`]:
    /// MADV_RANDOM while the copy hints (from start for `mmap-willneed`, while io_uring
    /// is not in use for its fallback), so a fault reads its page and WILLNEED supplies
    /// the lookahead the plan knows; back to MADV_NORMAL once io_uring is in use again.
    /// Left RANDOM after a recovery, the copies that still read the mappings (other
    /// layouts, a dtype that widens) faulted one page at a time with no hint: cold, a
    /// read of the disk per 4 KiB. Asked per claim: two relaxed loads when nothing
    /// changes.
    pub fn advise_access(&self, shards: &[Vec<Arc<Shard>>]) {
        if self.random.load(Ordering::Relaxed) == self.page_hints() {
            return;
        }
        let _advising = self.advising.lock().unwrap_or_else(|p| p.into_inner());
        let random = self.page_hints();
        if self.random.load(Ordering::Relaxed) == random {
            return;
        }
        let advice = match random {
            true => crate::sys::Advice::Random,
            false => crate::sys::Advice::Normal,
        };
        for shard in shards.iter().flatten() {
            crate::sys::advise(shard.data(), advice);
        }
        self.random.store(random, Ordering::Relaxed);
    }

    /// Whether compact slots of the shards' dtype are read with io_uring by this fill:
    /// while it is in use, and by one fill at a time once a backoff ran out (the others
    /// copy for [`Backoff::first_ms`] more, or until that fill's read succeeded).
    pub(super) fn uring(&self) -> bool {
        if !matches!(self.reader, Reader::Uring | Reader::UringDirect) {
            return false;
        }
        match self.copy_until.load(Ordering::Relaxed) {
            IN_USE => true,
            GIVEN_UP => false,
            until => {
                let now = self.now_ms();
                now >= until
                    && self
                        .copy_until
                        .compare_exchange(
                            until,
                            now + self.backoff.first_ms,
                            Ordering::Relaxed,
                            Ordering::Relaxed,
                        )
                        .is_ok()
            }
        }
    }

    /// Milliseconds on the readers' clock, from 1 ([`IN_USE`] is 0).
    fn now_ms(&self) -> u64 {
        self.born.elapsed().as_millis() as u64 + 1
    }

    fn lock_health(&self) -> MutexGuard<'_, Health> {
        self.health.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Moves io_uring's [`Health`] on after `e`, an error of io_uring itself
    /// ([`ReadError::is_io_uring`]) met after start. A refusal that lasts (a seccomp
    /// profile's, a kernel's) gives it up for good: it would otherwise fail every fill,
    /// each new ring passing its one-time check and then failing. One that may pass
    /// ([`ReadError::is_transient`]: memory, descriptors, a full queue) copies from the
    /// mappings for a backoff, then lets one fill try again; [`Backoff::tries`] of them
    /// in a row give it up too. Each change is logged; the idle readers are closed
    /// (their rings and bounce buffers freed, what a memory squeeze needs).
    fn failed(&self, e: &ReadError) {
        let now = self.now_ms();
        let mut health = self.lock_health();
        if !health.failed(now, e.is_transient(), e.to_string(), &self.backoff) {
            return;
        }
        self.copy_until
            .store(health.copy_until(), Ordering::Relaxed);
        warn!("{}", self.describe(&health, now));
        drop(health);
        let mut pool = self.lock();
        pool.live -= pool.idle.len();
        pool.idle.clear();
        drop(pool);
        // Fills waiting for a reader return too ([`Readers::take`] looks at
        // `copy_until`): once io_uring is given up no reader will come back to wake them,
        // and a waiter left asleep held its materializer thread, and its trainer's step,
        // for good.
        self.returned.notify_all();
    }

    /// A read succeeded while io_uring was not [`IN_USE`]: in use again once the backoff
    /// ran out, logged.
    fn succeeded(&self) {
        let mut health = self.lock_health();
        if let Some(failures) = health.succeeded(self.now_ms()) {
            self.copy_until.store(IN_USE, Ordering::Relaxed);
            info!(
                reader = self.reader.as_str(),
                "compact slots read with io_uring again, after {failures} failures in a row"
            );
        }
    }

    /// The error of a fill that finds io_uring given up.
    fn given_up(&self) -> ReadError {
        ReadError::Unavailable {
            what: "io_uring failed after start",
            source: std::io::Error::other(self.fallback().unwrap_or_default()),
        }
    }

    /// The index in the registered files of `domain`'s shard `shard`.
    pub(super) fn file(&self, domain: u16, shard: u32) -> u32 {
        self.first
            .get(domain as usize)
            .map_or(u32::MAX, |&f| f.saturating_add(shard))
    }

    /// The token file registered as `file`.
    pub(super) fn path(&self, file: u32) -> Option<&Path> {
        self.paths.get(file as usize).map(|p| p.as_path())
    }

    /// Fills `dst` from `spans` with a reader of the pool (a new one when all are in
    /// use by other threads), and puts it back. An error of io_uring itself
    /// ([`ReadError::is_io_uring`]) moves its [`Health`] on ([`Readers::failed`]): the
    /// caller copies the spans from the mappings instead.
    pub(super) fn read(&self, spans: &[Span], dst: &mut [u8]) -> Result<(), ReadError> {
        if self.copy_until.load(Ordering::Relaxed) == GIVEN_UP {
            return Err(self.given_up());
        }
        let result = self.take().and_then(|mut r| {
            let result = r.read(spans, dst);
            // A ring the kernel failed to enter is dropped (its read may have returned a
            // span's error first); any other error left it idle.
            let keep = !r.is_broken() && !matches!(result, Err(ReadError::Ring { .. }));
            self.give(r, keep);
            result
        });
        match &result {
            Ok(()) if self.copy_until.load(Ordering::Relaxed) != IN_USE => self.succeeded(),
            // A reader that did not come back in time is not io_uring failing: this fill
            // alone is copied from the mappings.
            Err(e) if e.is_io_uring() && !matches!(e, ReadError::Busy { .. }) => self.failed(e),
            _ => {}
        }
        result
    }

    /// Returns a reader taken with [`Readers::take`] (or drops it), waking a waiter.
    fn give(&self, r: UringReader, keep: bool) {
        let mut pool = self.lock();
        if keep && self.copy_until.load(Ordering::Relaxed) != GIVEN_UP {
            pool.idle.push(r);
        } else {
            // Its ring and buffers are gone: one more may open now, as one failed to when
            // `full` was set.
            pool.live -= 1;
            pool.full = false;
        }
        drop(pool);
        self.returned.notify_one();
    }

    fn lock(&self) -> MutexGuard<'_, Pool> {
        self.pool.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// An idle reader, a new one, or (when no more can be opened) the next one returned
    /// within [`READER_WAIT`]: a reader held by a read that hangs (a network filesystem)
    /// must not stall every other fill, whatever it reads. Past the bound,
    /// [`ReadError::Busy`]: the fill copies from the mappings.
    fn take(&self) -> Result<UringReader, ReadError> {
        let since = std::time::Instant::now();
        let mut pool = self.lock();
        loop {
            if self.copy_until.load(Ordering::Relaxed) == GIVEN_UP {
                return Err(self.given_up());
            }
            if let Some(r) = pool.idle.pop() {
                return Ok(r);
            }
            if !pool.full || pool.live == 0 {
                drop(pool);
                // Only `Readers::open` makes io_uring readers, and it keeps their files.
                let opened = match &self.files {
                    Some(files) => UringReader::open_with(files.clone(), options(self.reader)),
                    None => Err(ReadError::Unavailable {
                        what: "no io_uring reader was set up for these shards",
                        source: std::io::ErrorKind::Unsupported.into(),
                    }),
                };
                pool = self.lock();
                match opened {
                    Ok(r) => {
                        pool.live += 1;
                        return Ok(r);
                    }
                    Err(e) if pool.live == 0 => return Err(e),
                    Err(e) => {
                        if !pool.full {
                            warn!(
                                "{e}: the materializer threads share {} io_uring readers",
                                pool.live
                            );
                        }
                        pool.full = true;
                        continue;
                    }
                }
            }
            let left = READER_WAIT.saturating_sub(since.elapsed());
            if left.is_zero() {
                return Err(ReadError::Busy {
                    waited_ms: READER_WAIT.as_millis() as u64,
                    readers: pool.live,
                });
            }
            pool = (self.returned.wait_timeout(pool, left))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

/// How long a fill waits for an io_uring reader when all are in use and no more can be
/// opened, before it copies from the mappings instead: a read takes milliseconds, and
/// one that hangs must not hold every other fill.
const READER_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// What `reader = "auto"` reads a corpus of `corpus` token bytes with, on a machine
/// (or unit) of `memory` bytes: the copy from plain mappings when the corpus fits in half
/// of it (the trainers and the rings need the rest), O_DIRECT io_uring when it does not,
/// and the copy when the memory is unknown. Warm, and cold when a run reads most of the
/// corpus, plain mappings cost the least; cold on a corpus the page cache cannot hold,
/// O_DIRECT reads the fewest bytes on the least CPU (docs/DESIGN.md, "Page cache").
pub fn auto(corpus: u64, memory: Option<u64>) -> Reader {
    match memory {
        Some(m) if corpus > m / 2 => Reader::UringDirect,
        _ => Reader::Mmap,
    }
}

/// The io_uring options of `reader`: the defaults the standalone benchmark chose
/// (docs/BENCHMARKS.md, "Reads straight into the ring"), direct or not.
fn options(reader: Reader) -> UringOptions {
    UringOptions {
        direct: reader == Reader::UringDirect,
        ..UringOptions::default()
    }
}

#[cfg(test)]
mod tests;
