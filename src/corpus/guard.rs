//! Guarded reads of mapped shards: a SIGBUS raised while a thread reads a shard mapping
//! (the file was truncated under the daemon) becomes an error of that read instead of
//! the death of the process (issue 14, item 5; docs/DESIGN.md, "Shards that change
//! under the daemon").
//!
//! How: [`protect`] registers the address ranges of the shard mappings and installs a
//! SA_SIGINFO SIGBUS handler. A reader marks the code that touches those mappings with
//! [`enter`] (a thread-local depth counter). When a guarded thread faults inside a
//! registered range, the handler maps an anonymous zero page over the faulting page with
//! MAP_FIXED (so the instruction retries and reads zeros), records the address in a
//! thread-local, and returns. The reader polls [`take_fault`] after each read, throws the
//! zeros away and fails with an error naming the shard. Any other SIGBUS (no guard, an
//! address outside every shard, or one sent with kill) restores the previous disposition
//! and recurs, so real bugs still crash as before.
//!
//! The zero page is visible to every thread, but the fault only to the one that took it:
//! another thread that reads the page afterwards gets zeros and no signal. So the handler
//! also records every page it zeroed in a process-wide table, before mapping it, and a
//! copy checks its source against the table ([`zeroed_in`]) before it hands the bytes
//! on (one atomic load while the table is empty, as it is unless a shard shrank). The
//! table lists the first 1,024 pages; each mapping also keeps its own record of the pages
//! zeroed in it ([`zeroed_within`]), so whether a shard's index lost pages does not
//! depend on how many other pages were lost before.
//!
//! The happy path costs two thread-local writes per guarded region and one thread-local
//! read per check: no syscall, no copy.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

thread_local! {
    /// How many guarded regions this thread is inside.
    static DEPTH: Cell<u32> = const { Cell::new(0) };
    /// The first faulting address of a guarded read not yet taken (0: none).
    static FAULT: Cell<usize> = const { Cell::new(0) };
}

/// Registered mappings, newest last. Readers (the handler) load the table and its
/// length; a writer (under [`REGISTER`]) appends in place while the table has room, and
/// when full publishes a table twice the size and leaks the old one, so the handler never
/// reads freed memory and registering costs O(1) amortized: the daemon registers each
/// shard mapping as it is made, and a copied list per registration was quadratic in
/// shards, in time and in leaked copies.
static REGIONS: AtomicPtr<Table> = AtomicPtr::new(std::ptr::null_mut());

/// An append-only table of registered mappings: `slots[..len]` are set, never changed.
struct Table {
    slots: Box<[AtomicPtr<Region>]>,
    len: AtomicUsize,
}

impl Table {
    /// An empty table of `cap` slots, holding the first `len` of `from` (the regions
    /// of the table it replaces).
    fn with(cap: usize, from: &[&'static Region]) -> Table {
        let slots: Box<[AtomicPtr<Region>]> = (0..cap)
            .map(|i| {
                let r = from
                    .get(i)
                    .map_or(std::ptr::null_mut(), |r| *r as *const Region as *mut Region);
                AtomicPtr::new(r)
            })
            .collect();
        Table {
            slots,
            len: AtomicUsize::new(from.len()),
        }
    }
}

/// A registered mapping `[start, end)` and the pages the handler zeroed in it, kept by
/// the mapping itself: [`ZEROED`] lists only the first [`ZEROED_CAP`] pages of the
/// process's life, and past it a mapping's own record still says whether (and since
/// when) it lost pages, so a shard is never judged by another's faults.
struct Region {
    start: usize,
    end: usize,
    /// 1 + the number ([`ZEROED_N`] order) of the last page zeroed here; 0: none.
    last: AtomicUsize,
    /// The last page zeroed here.
    page: AtomicUsize,
}

impl Region {
    fn holds(&self, addr: usize) -> bool {
        (self.start..self.end).contains(&addr)
    }
}
/// Serializes writers of `REGIONS` and the handler installation.
static REGISTER: Mutex<()> = Mutex::new(());
/// The system page size, read once before the handler is installed.
static PAGE: AtomicUsize = AtomicUsize::new(4096);
/// The disposition SIGBUS had before ours, restored for faults that are not ours.
static PREVIOUS: OnceLock<libc::sigaction> = OnceLock::new();
/// Pages the handler zeroed that [`ZEROED`] can list page by page; past this many each
/// mapping's [`Region`] record answers instead.
const ZEROED_CAP: usize = 1024;
/// The pages the handler zeroed (page addresses; 0: an entry not yet written), in the
/// order of [`ZEROED_N`].
static ZEROED: [AtomicUsize; ZEROED_CAP] = [const { AtomicUsize::new(0) }; ZEROED_CAP];
/// How many pages the handler zeroed: entries reserved in [`ZEROED`].
static ZEROED_N: AtomicUsize = AtomicUsize::new(0);

/// Registers `ranges` (shard mappings) as guarded and installs the SIGBUS handler on the
/// first call. Empty ranges are ignored. Ranges stay registered for the life of the
/// process (the handler cannot take a lock to see them go), so register only mappings
/// that live as long: the daemon's shards.
pub fn protect<'a>(ranges: impl IntoIterator<Item = &'a [u8]>) -> std::io::Result<()> {
    let _lock = REGISTER.lock().unwrap_or_else(|p| p.into_inner());
    let fresh: Vec<(usize, usize)> = ranges
        .into_iter()
        .filter(|r| !r.is_empty())
        .map(|r| (r.as_ptr() as usize, r.as_ptr() as usize + r.len()))
        .collect();
    // A new mapping where an old one lost pages has none zeroed (no fault can be taken
    // on it before it is registered).
    let zeroed = ZEROED_N.load(Ordering::Acquire).min(ZEROED_CAP);
    for z in &ZEROED[..zeroed] {
        let p = z.load(Ordering::Acquire);
        if p != 0 && fresh.iter().any(|&(a, b)| (a..b).contains(&p)) {
            z.store(0, Ordering::Release);
        }
    }
    // Newest last, found first: a new mapping where an old one was starts with no page
    // zeroed.
    for (start, end) in fresh {
        let region: &'static Region = Box::leak(Box::new(Region {
            start,
            end,
            last: AtomicUsize::new(0),
            page: AtomicUsize::new(0),
        }));
        // SAFETY: published tables are never freed (see REGIONS).
        let current: Option<&'static Table> = unsafe { REGIONS.load(Ordering::Acquire).as_ref() };
        let table: &'static Table = match current {
            Some(t) if t.len.load(Ordering::Relaxed) < t.slots.len() => t,
            _ => {
                let held: Vec<&'static Region> = regions().collect();
                let next: &'static Table =
                    Box::leak(Box::new(Table::with((held.len() * 2).max(64), &held)));
                REGIONS.store(next as *const Table as *mut Table, Ordering::Release);
                next
            }
        };
        // Only this writer (holding REGISTER) appends, to a slot past `len` that no
        // reader looks at until `len` moves past it.
        let n = table.len.load(Ordering::Relaxed);
        table.slots[n].store(region as *const Region as *mut Region, Ordering::Release);
        table.len.store(n + 1, Ordering::Release);
    }
    if PREVIOUS.get().is_some() {
        return Ok(());
    }
    PAGE.store(crate::sys::page_size(), Ordering::Relaxed);
    // SAFETY: a zeroed sigaction is a valid "no flags, empty mask" value; the handler is
    // an `extern "C"` fn of the SA_SIGINFO signature that does only async-signal-safe
    // work; sigaction writes the previous disposition into `prev`, which we own.
    unsafe {
        let mut act: libc::sigaction = std::mem::zeroed();
        act.sa_sigaction = on_sigbus as *const () as usize;
        act.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
        libc::sigemptyset(&mut act.sa_mask);
        let mut prev: libc::sigaction = std::mem::zeroed();
        if libc::sigaction(libc::SIGBUS, &act, &mut prev) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let _ = PREVIOUS.set(prev);
    }
    Ok(())
}

/// Whether [`protect_if_asked`] registers every shard mapping as it is made.
static PROTECT_AT_MAP: AtomicBool = AtomicBool::new(false);

/// Registers every shard mapping made from now on as guarded, the moment it is mapped:
/// what a daemon asks before it opens its corpus, since a shard truncated while the
/// corpus opens (an `rsync --inplace` during a restart) faulted in the index reads of the
/// open itself, before any mapping was registered, and killed it without a word. Only
/// processes that map each shard once should ask: registrations last for the process.
pub fn protect_every_mapping() {
    PROTECT_AT_MAP.store(true, Ordering::Release);
}

/// Registers `bytes` (a mapping just made) when [`protect_every_mapping`] was asked.
pub(crate) fn protect_if_asked(bytes: &[u8]) {
    if PROTECT_AT_MAP.load(Ordering::Acquire) {
        if let Err(e) = protect([bytes]) {
            tracing::warn!("cannot install the SIGBUS guard ({e}); a shard truncated while read will stop the daemon");
        }
    }
}

/// Marks the calling thread as reading guarded mappings until the value is dropped.
#[must_use = "the guard ends when this value is dropped"]
pub struct Guarded {
    /// Thread-bound: the depth counter is per thread.
    _not_send: std::marker::PhantomData<*const ()>,
}

/// Starts a guarded region on this thread (regions nest).
pub fn enter() -> Guarded {
    DEPTH.with(|d| d.set(d.get() + 1));
    Guarded {
        _not_send: std::marker::PhantomData,
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        DEPTH.with(|d| d.set(d.get().saturating_sub(1)));
    }
}

/// The address of the first guarded read that faulted on this thread since the last
/// call, if any; clears it.
#[inline]
pub fn take_fault() -> Option<usize> {
    let a = FAULT.with(|f| f.replace(0));
    (a != 0).then_some(a)
}

/// What a watched thread looks up in a shard's index now: the record the stuck-fill
/// watchdog reads for work other than a slot copy (planning under the hub's lock, a
/// seek), whose reads happen in the planner's length lookups. Set before a lookup and
/// cleared after it (three relaxed stores while watched, a thread-local load otherwise),
/// so a set note is a lookup in progress; read only once work has been stuck for the
/// watchdog's bound.
#[derive(Debug, Default)]
pub struct IndexNote {
    /// The address of the [`super::Shard`] read (0: no lookup in progress).
    shard: AtomicUsize,
    doc: std::sync::atomic::AtomicU64,
}

impl IndexNote {
    /// The shard (its address) and document of the lookup in progress, if any.
    pub fn get(&self) -> Option<(usize, u64)> {
        let shard = self.shard.load(Ordering::Acquire);
        (shard != 0).then(|| (shard, self.doc.load(Ordering::Relaxed)))
    }
}

thread_local! {
    /// The note this thread's index lookups go to (null: none).
    static NOTE: Cell<*const IndexNote> = const { Cell::new(std::ptr::null()) };
    /// Whether this thread looked for a pool note of its own ([`pool_note`]).
    static POOLED: Cell<bool> = const { Cell::new(false) };
    /// A rayon pool thread's own note, registered in [`POOL_NOTES`] while it lives.
    static POOL_NOTE: std::cell::RefCell<Option<PoolNote>> = const { std::cell::RefCell::new(None) };
    /// The notes of this thread's live [`Noting`]s, oldest first: [`NOTE`] is the last,
    /// or [`BASE`] when there is none.
    static NOTINGS: std::cell::RefCell<Vec<*const IndexNote>> = const { std::cell::RefCell::new(Vec::new()) };
    /// What [`NOTE`] is when no [`Noting`] lives: this pool thread's note, or null.
    static BASE: Cell<*const IndexNote> = const { Cell::new(std::ptr::null()) };
}

/// The notes of the rayon pool threads that looked up an index: a seek replays its
/// domains there, so a seek stuck in a lookup is found among them. One per live pool
/// thread.
static POOL_NOTES: Mutex<Vec<Arc<IndexNote>>> = Mutex::new(Vec::new());

/// A pool thread's note; leaves [`POOL_NOTES`] with its thread.
struct PoolNote(Arc<IndexNote>);

impl Drop for PoolNote {
    fn drop(&mut self) {
        let mut all = POOL_NOTES.lock().unwrap_or_else(|p| p.into_inner());
        all.retain(|n| !Arc::ptr_eq(n, &self.0));
    }
}

/// This thread's index lookups noted in an [`IndexNote`], until dropped.
#[must_use = "the noting ends when this value is dropped"]
pub struct Noting {
    /// Keeps the note alive while [`NOTE`] (or [`NOTINGS`]) points at it.
    note: Arc<IndexNote>,
    /// Not `Send`: it names this thread's notes.
    _thread: std::marker::PhantomData<*const ()>,
}

/// Notes this thread's index lookups ([`noting_index`]) in `note` until the returned
/// value is dropped. Nested notings may be dropped in any order: each leaves the
/// thread's list wherever it is (restoring the one before it, as this once did, pointed
/// NOTE at a freed note when an outer one was dropped first).
pub fn note_index_reads(note: Arc<IndexNote>) -> Noting {
    let p = Arc::as_ptr(&note);
    NOTINGS.with(|s| s.borrow_mut().push(p));
    NOTE.with(|n| n.set(p));
    Noting {
        note,
        _thread: std::marker::PhantomData,
    }
}

impl Drop for Noting {
    fn drop(&mut self) {
        let p = Arc::as_ptr(&self.note);
        let newest = NOTINGS
            .try_with(|s| {
                let mut s = s.borrow_mut();
                if let Some(i) = s.iter().rposition(|&q| q == p) {
                    s.remove(i);
                }
                s.last().copied()
            })
            .ok()
            .flatten();
        let base = BASE.with(|b| b.get());
        NOTE.with(|n| n.set(newest.unwrap_or(base)));
    }
}

/// A note of its own for a rayon pool thread that has none (once per thread).
#[cold]
fn pool_note() -> *const IndexNote {
    POOLED.with(|p| p.set(true));
    if rayon::current_thread_index().is_none() {
        return std::ptr::null();
    }
    let note = Arc::new(IndexNote::default());
    (POOL_NOTES.lock().unwrap_or_else(|p| p.into_inner())).push(note.clone());
    let p = Arc::as_ptr(&note);
    POOL_NOTE.with(|n| *n.borrow_mut() = Some(PoolNote(note)));
    BASE.with(|b| b.set(p));
    NOTE.with(|n| n.set(p));
    p
}

/// Runs `read`, a lookup of document `doc` in the index of the shard at address
/// `shard`, noted for the watchdog where this thread is watched ([`note_index_reads`])
/// or is a rayon pool thread.
#[inline]
pub fn noting_index<T>(shard: usize, doc: u64, read: impl FnOnce() -> T) -> T {
    let mut p = NOTE.with(|n| n.get());
    if p.is_null() && !POOLED.with(|p| p.get()) {
        p = pool_note();
    }
    if p.is_null() {
        return read();
    }
    // SAFETY: NOTE points only at a note held alive for as long: the newest live
    // `Noting` of this thread (each holds its Arc, and its drop takes it out of NOTINGS
    // and points NOTE at the newest left, whatever the order of drops) or this pool
    // thread's `POOL_NOTE` (dropped with the thread, after its last lookup).
    let note = unsafe { &*p };
    note.doc.store(doc, Ordering::Relaxed);
    note.shard.store(shard, Ordering::Release);
    let r = read();
    note.shard.store(0, Ordering::Relaxed);
    r
}

/// The index lookups the rayon pool threads have in progress: (shard address, document).
pub fn pool_index_reads() -> Vec<(usize, u64)> {
    let all = POOL_NOTES.lock().unwrap_or_else(|p| p.into_inner());
    all.iter().filter_map(|n| n.get()).collect()
}

/// Whether the handler zeroed more pages than [`zeroed_in`] can list: a copy that finds
/// none of its pages listed must then also check that its shard was not poisoned.
pub fn zeroed_overflowed() -> bool {
    ZEROED_N.load(Ordering::Acquire) > ZEROED_CAP
}

/// Whether the handler zeroed any page of the registered mapping that holds `bytes`
/// (at any count: the mapping keeps its own record, [`Region`]).
pub fn zeroed_within(bytes: &[u8]) -> bool {
    region_of(bytes.as_ptr() as usize).is_some_and(|r| r.last.load(Ordering::Acquire) != 0)
}

/// How many pages the handler has zeroed so far: a mark for [`fault_since_in`].
pub fn zeroed_pages() -> usize {
    ZEROED_N.load(Ordering::Acquire)
}

/// A fault of work that ran since `mark` ([`zeroed_pages`]): this thread's own
/// ([`take_fault`], which it clears), or else a page zeroed meanwhile for any thread that
/// `ours` says its work could have read. The second covers work this thread handed to
/// others (rayon's pool, whose threads the daemon keeps guarded); `ours` keeps out the
/// faults of unrelated work at the same time: planning reads only shard indexes, so a
/// page of a `.bin` zeroed meanwhile was a slot copy's (which fails its own ring), and an
/// admission that counted it refused a client that had read nothing of that shard. Past
/// the table's room each mapping's own record answers (its last page zeroed since
/// `mark`), so faults of unrelated work are still kept out.
pub fn fault_since_in(mark: usize, ours: impl Fn(usize) -> bool) -> Option<usize> {
    take_fault().or_else(|| {
        let n = ZEROED_N.load(Ordering::Acquire);
        if n <= mark {
            return None;
        }
        ZEROED[mark.min(ZEROED_CAP)..n.min(ZEROED_CAP)]
            .iter()
            .map(|z| z.load(Ordering::Acquire))
            // 0: an entry another thread's handler reserved and has not written yet; a
            // page of work this thread handed out and joined is written by now.
            .find(|&p| p != 0 && ours(p))
            .or_else(|| {
                // `ours` judges a page by its mapping, so one page of each mapping that
                // lost pages since `mark` answers for all of them.
                (n > ZEROED_CAP).then_some(())?;
                regions().find_map(|r| {
                    let since = r.last.load(Ordering::Acquire) > mark;
                    let p = r.page.load(Ordering::Relaxed);
                    (since && p != 0 && ours(p)).then_some(p)
                })
            })
    })
}

/// Keeps every thread of rayon's global pool guarded for the life of the process, so a
/// shard that shrank faults into zeros there (listed, see [`fault_since_in`]) instead of
/// killing the daemon: planning spreads seeks and stage windows over that pool. Fails
/// when the pool was already built (then those threads stay unguarded).
pub fn guard_rayon_pool() -> Result<(), rayon::ThreadPoolBuildError> {
    rayon::ThreadPoolBuilder::new()
        .start_handler(|_| std::mem::forget(enter()))
        .build_global()
}

/// The address of a page of `bytes` that the handler zeroed for some thread's faulted
/// read, if any: those bytes read as zeros now, without a fault on this thread, so a
/// copy of them must be thrown away like a faulted one.
#[inline]
pub fn zeroed_in(bytes: &[u8]) -> Option<usize> {
    let n = ZEROED_N.load(Ordering::Acquire);
    if n == 0 || bytes.is_empty() {
        return None;
    }
    let (lo, hi) = (
        bytes.as_ptr() as usize,
        bytes.as_ptr() as usize + bytes.len(),
    );
    // Past the table's room the pages listed are some of those zeroed, not all: a copy
    // then also asks whether its shard was poisoned ([`zeroed_overflowed`]), since
    // failing every copy would stop every ring of the daemon over one truncated shard.
    let page = PAGE.load(Ordering::Relaxed);
    ZEROED[..n.min(ZEROED_CAP)]
        .iter()
        .map(|z| z.load(Ordering::Acquire))
        .filter(|&p| p != 0 && p < hi && lo < p + page)
        // Still zeros: a mapping made later at the same address (after the faulted one
        // was unmapped, which a daemon never does but tests do) is not the zero page.
        .find(|&p| {
            let (a, b) = (p.max(lo), (p + page).min(hi));
            bytes[a - lo..b - lo].iter().all(|&x| x == 0)
        })
        .map(|p| p.max(lo))
}

/// The registered mappings. Async-signal-safe: one atomic load.
fn regions() -> impl DoubleEndedIterator<Item = &'static Region> {
    let p = REGIONS.load(Ordering::Acquire);
    // SAFETY: `p` came from `Box::into_raw` in `protect` and published tables are never
    // freed (see REGIONS), so it is valid for the life of the process; the slots below
    // `len` were set before `len` was raised past them (Release/Acquire), and never change.
    let table: Option<&'static Table> = unsafe { p.as_ref() };
    let len = table.map_or(0, |t| t.len.load(Ordering::Acquire));
    (0..len).filter_map(move |i| {
        let r = table?.slots[i].load(Ordering::Acquire);
        // SAFETY: a set slot holds a leaked, never-freed Region.
        unsafe { r.as_ref() }
    })
}

/// The registered mapping `addr` lies in (the newest, where an old one was mapped over).
fn region_of(addr: usize) -> Option<&'static Region> {
    regions().rev().find(|r| r.holds(addr))
}

/// The SIGBUS handler (see the module docs). Only async-signal-safe work: thread-local
/// cells without destructors, atomics, mmap and sigaction.
extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo to an SA_SIGINFO handler. The MAP_FIXED
    // mapping replaces one page of a registered read-only shard mapping with zeros: no
    // Rust reference assumes its contents beyond the guarded read, whose result the
    // reader discards when it sees the recorded fault. sigaction and raise are
    // async-signal-safe. `PREVIOUS` is stored just after the handler is installed, so a
    // SIGBUS in between finds it empty and falls back to the default disposition.
    unsafe {
        let (addr, code) = ((*info).si_addr() as usize, (*info).si_code);
        let guarded = DEPTH.try_with(|d| d.get() > 0).unwrap_or(false);
        // si_code > 0: raised by the kernel for a memory access (not kill or sigqueue).
        let region = if guarded && code > 0 {
            region_of(addr)
        } else {
            None
        };
        if let Some(region) = region {
            let page = PAGE.load(Ordering::Relaxed);
            let base = addr & !(page - 1);
            // Listed before it is mapped: a thread that reads the zeros finds it listed.
            let i = ZEROED_N.fetch_add(1, Ordering::AcqRel);
            if let Some(slot) = ZEROED.get(i) {
                slot.store(base, Ordering::Release);
            }
            region.page.store(base, Ordering::Relaxed);
            region.last.store(i + 1, Ordering::Release);
            let p = libc::mmap(
                base as *mut libc::c_void,
                page,
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                -1,
                0,
            );
            if p != libc::MAP_FAILED {
                let _ = FAULT.try_with(|f| {
                    if f.get() == 0 {
                        f.set(addr)
                    }
                });
                return;
            }
        }
        // Not ours: put back what was there and let the signal take its course. A memory
        // fault recurs when the instruction retries; a sent signal is raised again and
        // delivered once this handler returns, under the default action (terminate):
        // the previous handler (std's stack-overflow one) returns without recurring on
        // a sent signal, which left the daemon alive with no guard at all, so that the
        // next truncated shard killed it.
        match PREVIOUS.get() {
            Some(prev) if code > 0 => libc::sigaction(sig, prev, std::ptr::null_mut()),
            _ => {
                let mut dfl: libc::sigaction = std::mem::zeroed();
                dfl.sa_sigaction = libc::SIG_DFL;
                libc::sigaction(sig, &dfl, std::ptr::null_mut())
            }
        };
        if code <= 0 {
            libc::raise(sig);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// Registering grows the table in place (O(1) amortized, where each registration
    /// once copied and leaked the whole list): thousands of registrations, one at a
    /// time as the daemon's corpus open makes them, are all found, the newest first.
    #[test]
    fn thousands_of_registrations_are_each_found() {
        let buffer: &'static [u8] = Box::leak(vec![0u8; 5000].into_boxed_slice());
        for i in 0..5000 {
            protect([&buffer[i..i + 1]]).unwrap();
        }
        for i in [0, 63, 64, 65, 2047, 4999] {
            let at = buffer.as_ptr() as usize + i;
            let r = region_of(at).expect("registered");
            assert_eq!((r.start, r.end), (at, at + 1));
        }
        protect([buffer]).unwrap();
        let whole = region_of(buffer.as_ptr() as usize + 10).unwrap();
        assert_eq!(
            whole.end - whole.start,
            5000,
            "the newest registration is found first"
        );
    }

    /// Truncates the file at `path` to `len` bytes, under its mappings.
    fn shrink(path: &std::path::Path, len: u64) {
        let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
        f.set_len(len).unwrap();
    }

    /// Regression: a shard truncated while the daemon opened its corpus faulted in the
    /// open's own index reads, before `Hub::new` registered any mapping, and SIGBUS
    /// killed the daemon with nothing in its log. Asked first, every shard mapping is
    /// guarded from the moment it is made (without it this read kills the test binary).
    #[test]
    fn mappings_made_after_protect_every_mapping_are_guarded_from_their_first_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("early.idx");
        std::fs::write(&path, vec![9u8; 64 * 1024]).unwrap();
        protect_every_mapping();
        let mapped = crate::corpus::map_file(&path).unwrap();
        let bytes = mapped.map.as_ref().unwrap();
        shrink(&path, 4096);
        let mark = zeroed_pages();
        let _g = enter();
        assert_eq!(std::hint::black_box(&bytes[..])[50000], 0);
        assert_eq!(
            fault_since_in(mark, |_| true),
            Some(bytes.as_ptr() as usize + 50000)
        );
    }

    #[test]
    fn a_truncated_mapping_faults_into_an_error_not_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shard.bin");
        let mut f = std::fs::File::create(&path).unwrap();
        f.write_all(&vec![7u8; 64 * 1024]).unwrap();
        drop(f);
        let file = std::fs::File::open(&path).unwrap();
        let map = crate::sys::map_file(&file, None).unwrap();
        protect([&map[..]]).unwrap();
        {
            let _g = enter();
            assert_eq!(map[40000], 7);
            assert_eq!(take_fault(), None);
        }
        shrink(&path, 4096);
        let _g = enter();
        let v = std::hint::black_box(&map[..])[40000];
        let fault = take_fault().expect("the read past the new end faulted");
        assert_eq!(v, 0);
        assert_eq!(fault, map.as_ptr() as usize + 40000);
        assert_eq!(take_fault(), None);
        // Another thread now reads zeros from that page without a fault of its own; the
        // table of zeroed pages says so. The page the file kept is not listed.
        let page = crate::sys::page_size();
        let zeroed = &map[40000 / page * page..][..page];
        std::thread::scope(|t| {
            t.spawn(|| {
                let _g = enter();
                assert_eq!(std::hint::black_box(zeroed)[17], 0);
                assert_eq!(take_fault(), None, "no fault on this thread");
                assert_eq!(zeroed_in(zeroed), Some(zeroed.as_ptr() as usize));
                assert_eq!(zeroed_in(&map[..100]), None);
                assert_eq!(
                    zeroed_in(&map[..4096]),
                    None,
                    "the first page kept its bytes"
                );
                let across = &map[4096 - 8..40000];
                assert!(zeroed_in(across).is_some());
            });
        });
        // A fault of another thread's work since a mark counts only where `ours` says
        // this work could have read it: an admission's planning (an index) is not failed
        // by a copy's fault in a `.bin` at the same time.
        let mark = zeroed_pages();
        let at = 20000 / page * page;
        std::thread::scope(|t| {
            t.spawn(|| {
                let _g = enter();
                assert_eq!(std::hint::black_box(&map[..])[at + 5], 0);
                assert!(take_fault().is_some());
            });
        });
        let page_at = map.as_ptr() as usize + at;
        assert_eq!(fault_since_in(mark, |_| false), None);
        assert_eq!(fault_since_in(mark, |p| p == page_at), Some(page_at));
    }

    /// Notings dropped out of the order they were made in: restoring the note each one
    /// replaced pointed NOTE at the first, already freed, and the next lookup wrote two
    /// words into freed memory. NOTE is now always the newest noting still alive.
    #[test]
    fn notings_dropped_in_any_order_leave_no_dangling_note() {
        // Off the test harness's thread, which rayon or another test may have noted.
        std::thread::spawn(|| {
            let note = || NOTE.with(|n| n.get());
            let (a, b) = (
                Arc::new(IndexNote::default()),
                Arc::new(IndexNote::default()),
            );
            let (pa, pb) = (Arc::as_ptr(&a), Arc::as_ptr(&b));
            let na = note_index_reads(a.clone());
            let nb = note_index_reads(b.clone());
            assert_eq!(note(), pb);
            drop(na); // out of order: the newer one is still noted
            assert_eq!(note(), pb);
            let seen = noting_index(0x1000, 7, || b.get());
            assert_eq!(seen, Some((0x1000, 7)), "the lookup went to the live note");
            assert_eq!(a.get(), None);
            drop(nb);
            assert!(note().is_null(), "no noting left: no note");
            // And in order, nested as watches are.
            let na = note_index_reads(a.clone());
            let nb = note_index_reads(b);
            drop(nb);
            assert_eq!(note(), pa);
            drop(na);
            assert!(note().is_null());
        })
        .join()
        .unwrap();
    }
}
