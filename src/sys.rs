//! The system layer: the few OS facilities millrace needs that neither std nor rustix
//! offers safely, each `unsafe` justified once, here (docs/DESIGN.md, "One system
//! layer"). Everything else goes through rustix directly at its call site.
//!
//! - [`Shm`]: the ring's shared memory, written by the daemon ([`crate::serve::ring`])
//!   and read by the Rust client ([`crate::client`]). Its three accessors (an atomic word,
//!   a shared byte range, an exclusive byte range) are where the ring's `unsafe` lives.
//! - [`map_file`]: read-only mappings of shards and bench files.
//! - [`advise`] and [`resident_pages`]: page-cache hints and residency (madvise, mincore).
//! - [`prefetch`]: CPU cache hints for bytes the next few instructions will read.
//! - [`has_avx2`] and [`with_avx2`]: the run-time CPU check and dispatch behind the AVX2
//!   loops of the fill's copy and the client's token sums.
//! - [`group_by_name`] and [`group_by_gid`]: the group database (getgrnam_r, getgrgid_r),
//!   which rustix does not wrap.
//! - [`EventFd`]: the per-peer wake-up the daemon signals and the client drains.
//! - [`ReleasePage`]: the per-peer page through which a client releases slots without a
//!   frame, and the memory ordering both sides follow on it.
//! - small safe helpers ([`euid`], [`monotonic_ns`], ...) so callers need no libc.
//! - [`wait_for_io_uring_completions`]: a wait for io_uring completions that does not
//!   enter the ring, for reads left in the kernel when `io_uring_enter` failed.
//! - [`refuse_io_uring_in_this_thread`] and [`refuse_io_uring_waits_in_this_thread`]: the
//!   seccomp filters the tests use to reproduce a kernel that refuses io_uring, and an
//!   `io_uring_enter` that fails while reads are in flight.

use std::ffi::CStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{fence, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use memmap2::{Mmap, MmapOptions, MmapRaw};

/// A shared mapping of a ring memfd: read-write in the daemon, read-only in a client.
///
/// The memory may change under the process at any time (the other side of the ring
/// writes it), so no accessor hands out a reference the compiler could assume stable
/// beyond what the ring protocol guarantees: header words the daemon changes are read
/// and written atomically ([`Shm::atomic_u64`]), a slot is written only by the one
/// thread that claimed it ([`Shm::bytes_mut`]) and read only once published
/// ([`Shm::bytes`]).
pub struct Shm {
    map: MmapRaw,
    /// False for a client's read-only view, which [`Shm::bytes_mut`] refuses.
    writable: bool,
}

impl Shm {
    /// Maps all of `file` read-write and shared, and lets `init` fill it before any other
    /// reference to the mapping exists (the daemon writes the ring header and pre-faults
    /// every page this way).
    pub fn create(file: &File, init: impl FnOnce(&mut [u8])) -> io::Result<Shm> {
        let map = MmapRaw::map_raw(file)?;
        // SAFETY: the mapping was made just above and is `map.len()` bytes long; nothing
        // else in this process can name it yet, so this is its only reference.
        init(unsafe { std::slice::from_raw_parts_mut(map.as_mut_ptr(), map.len()) });
        Ok(Shm {
            map,
            writable: true,
        })
    }

    /// Maps the first `len` bytes of `fd` read-only and shared (a client's view of a
    /// ring). The caller checks `len` against the file's size: touching a page past the
    /// end of the file raises SIGBUS.
    pub fn read_only(fd: &OwnedFd, len: usize) -> io::Result<Shm> {
        let map = MmapOptions::new().len(len).map_raw_read_only(fd)?;
        Ok(Shm {
            map,
            writable: false,
        })
    }

    /// Bytes mapped.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether nothing is mapped (never, for a ring).
    pub fn is_empty(&self) -> bool {
        self.map.len() == 0
    }

    fn check(&self, at: usize, len: usize) {
        assert!(
            at.checked_add(len).is_some_and(|end| end <= self.map.len()),
            "shared memory access {at}+{len} outside a {}-byte mapping",
            self.map.len()
        );
    }

    /// The 8-byte word at `at` (8-aligned, inside the mapping; panics otherwise, as the
    /// offsets are the wire's constants), as an atomic: how `published` and the other
    /// header words both sides touch are read and written.
    pub fn atomic_u64(&self, at: usize) -> &AtomicU64 {
        self.check(at, 8);
        assert!(at % 8 == 0, "atomic word at unaligned offset {at}");
        // SAFETY: in bounds (checked above) of a page-aligned mapping, so 8-aligned; the
        // mapping lives as long as `self`; every access to this word on both sides of
        // the ring is atomic, so the `AtomicU64` view does not race with plain accesses.
        unsafe { &*(self.map.as_ptr().add(at) as *const AtomicU64) }
    }

    /// `len` bytes at `at` (panics outside the mapping; callers validated the layout).
    /// Another process may write these bytes; the ring protocol makes the reader look
    /// only at slots published to it and not yet released, which the daemon leaves alone.
    pub fn bytes(&self, at: usize, len: usize) -> &[u8] {
        self.check(at, len);
        // SAFETY: in bounds (checked above) and mapped for the life of `self`. Within
        // this process a range is written only through `bytes_mut`, whose caller
        // guarantees no other reference to it lives meanwhile.
        unsafe { std::slice::from_raw_parts(self.map.as_ptr().add(at), len) }
    }

    /// `len` bytes at `at`, writable (panics outside the mapping or on a read-only one).
    ///
    /// # Safety
    /// The caller must hold the range exclusively for the life of the slice: no other
    /// reference into it (from `bytes`, `bytes_mut` or an atomic word) may exist in this
    /// process meanwhile. The ring gives each slot to one writer at a time and clients
    /// read it only after it is published (docs/PROTOCOL.md, section 4).
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn bytes_mut(&self, at: usize, len: usize) -> &mut [u8] {
        self.check(at, len);
        assert!(self.writable, "writing a read-only shared mapping");
        std::slice::from_raw_parts_mut(self.map.as_mut_ptr().add(at), len)
    }
}

/// Maps `file` read-only (its first `len` bytes, or all of it). Shards are immutable
/// while served; one truncated anyway raises SIGBUS on the next read of a lost page,
/// which [`crate::corpus::guard`] turns into an error of that read.
pub fn map_file(file: &File, len: Option<usize>) -> io::Result<Mmap> {
    let mut opts = MmapOptions::new();
    if let Some(n) = len {
        opts.len(n);
    }
    // SAFETY: a read-only view; no Rust code writes through it. Its contents change under
    // a reader only if the file is modified or shrunk while mapped: shards are not (they
    // are immutable while served, docs/OPERATIONS.md), and a shrink is handled by the
    // guard.
    unsafe { opts.map(file) }
}

/// Makes a write past RLIMIT_FSIZE fail with EFBIG instead of killing the process with
/// SIGXFSZ: the daemon's cache writes (identity entries, plan checkpoints) are an
/// optimisation, and a file-size limit inherited from a batch scheduler must cost them,
/// not the daemon.
pub fn ignore_file_size_signal() {
    // SAFETY: setting SIGXFSZ to SIG_IGN installs no handler and touches no memory.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
}

/// A page-cache hint for [`advise`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Advice {
    /// MADV_WILLNEED: read these pages ahead now.
    WillNeed,
    /// MADV_RANDOM: fault only the pages touched, no read-ahead.
    Random,
    /// MADV_NORMAL: the kernel's own read-ahead again, undoing `Random`.
    Normal,
    /// MADV_HUGEPAGE: a fault that reads the file reads a 2 MiB folio, which the kernel
    /// then maps with one page-table entry instead of 512.
    HugePage,
}

/// `[start, end)` of `bytes` widened to whole pages: what madvise and mincore take.
fn page_span(bytes: &[u8]) -> (usize, usize) {
    let page = page_size();
    let start = bytes.as_ptr() as usize;
    let aligned = start & !(page - 1);
    (aligned, bytes.len() + (start - aligned))
}

/// Gives the kernel a hint about the pages of `bytes` (part of a live file mapping);
/// errors are ignored, as a hint that fails changes nothing.
pub fn advise(bytes: &[u8], advice: Advice) {
    if bytes.is_empty() {
        return;
    }
    let (start, len) = page_span(bytes);
    let advice = match advice {
        Advice::WillNeed => rustix::mm::Advice::WillNeed,
        Advice::Random => rustix::mm::Advice::Random,
        Advice::Normal => rustix::mm::Advice::Normal,
        Advice::HugePage => rustix::mm::Advice::LinuxHugepage,
    };
    // SAFETY: the range is the pages of a live mapping (`bytes` borrows it), rounded
    // down to its first page; WILLNEED, RANDOM and NORMAL change kernel hints only, never the
    // contents or the mapping; HUGEPAGE changes only the size of the folios the page
    // cache reads and of the entries that map them.
    let _ = unsafe { rustix::mm::madvise(start as *mut _, len, advice) };
}

/// Asks the CPU to pull the cache lines of `bytes` (at most its first `max` bytes) into
/// its caches ahead of a read: the fill looks up a hundred index entries at random
/// places of the shards' indexes per slot, and each one otherwise costs a full miss (and
/// a page walk) waiting alone. A hint only: it never faults (not even on a page a truncation
/// removed) and changes nothing but timing. No-op off x86-64.
#[inline]
pub fn prefetch(bytes: &[u8], max: usize) {
    prefetch_items(bytes, max);
}

/// [`prefetch`] of the memory of `items`, whatever their type (at most `max` bytes): the
/// planner hints its packed windows' rows with it. Never reads them.
#[inline]
pub fn prefetch_items<T>(items: &[T], max: usize) {
    #[cfg(target_arch = "x86_64")]
    prefetch_lines::<{ std::arch::x86_64::_MM_HINT_T0 }, T>(items, max);
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (items, max);
}

/// [`prefetch`] into the second-level cache only (PREFETCHT1), for the copy's spans: a
/// slot's spans are read once, a few pieces after the hint, so they need not sit in the
/// first level, and a hint into it waits for one of the first level's few miss buffers,
/// which the copy's own loads need. On this project's AMD EPYC VM the copy thread of a
/// steady 2 x 8 run at 10^10 tokens took 0.71-0.77 s per 10^9 tokens with it against
/// 0.78-0.93 s with PREFETCHT0, in alternated pairs (docs/BENCHMARKS.md, "The span
/// prefetch into L2").
#[inline]
pub fn prefetch_to_l2(bytes: &[u8], max: usize) {
    #[cfg(target_arch = "x86_64")]
    prefetch_lines::<{ std::arch::x86_64::_MM_HINT_T1 }, u8>(bytes, max);
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (bytes, max);
}

/// Issues a prefetch of hint `HINT` for each cache line of the first `max` bytes of
/// `items`, the first one included when they start inside a line.
#[cfg(target_arch = "x86_64")]
#[inline]
fn prefetch_lines<const HINT: i32, T>(items: &[T], max: usize) {
    let len = std::mem::size_of_val(items).min(max);
    let start = items.as_ptr() as usize;
    let mut line = start & !63;
    while line < start + len {
        // SAFETY: PREFETCH is part of SSE (baseline on x86-64) and, being a hint, does
        // not fault whatever the address; `line` is inside `items`' lines.
        unsafe { std::arch::x86_64::_mm_prefetch::<HINT>(line as *const i8) };
        line += 64;
    }
}

/// Whether the CPU has AVX2, detected once (std caches the CPUID answer): the fill's
/// copy and the client's token sums pick their AVX2-compiled loop with it, so the build
/// stays baseline x86-64. Always false off x86-64.
#[inline]
pub fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Runs `f` compiled for AVX2 when the CPU has it ([`has_avx2`]), else as built: a hot
/// loop inlined into `f` is then vectorized 32 bytes wide
/// on the CPUs that can, while the build stays baseline x86-64. Callers pass an
/// `#[inline(always)]` closure: one that is not inlined stays baseline code, called
/// from the AVX2 function.
#[inline(always)]
pub fn with_avx2<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        /// `f` compiled with AVX2 enabled.
        #[target_feature(enable = "avx2")]
        fn wide<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        if has_avx2() {
            // SAFETY: the CPU supports AVX2 (checked at run time just above).
            return unsafe { wide(f) };
        }
    }
    f()
}

/// How many of the pages of `bytes` (a live file mapping) are in the page cache, out of
/// how many (mincore); for `millrace bench`'s cold/warm reports.
pub fn resident_pages(bytes: &[u8]) -> io::Result<(u64, u64)> {
    if bytes.is_empty() {
        return Ok((0, 0));
    }
    let (start, len) = page_span(bytes);
    let mut vec = vec![0u8; len.div_ceil(page_size())];
    // SAFETY: the range is the pages of a live mapping (`bytes` borrows it) and `vec`
    // holds one byte per page of it, which is all mincore writes.
    if unsafe { libc::mincore(start as *mut libc::c_void, len, vec.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let resident = vec.iter().filter(|&&b| b & 1 == 1).count() as u64;
    Ok((resident, vec.len() as u64))
}

/// One entry of the group database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    /// The group id.
    pub gid: u32,
    /// The group name.
    pub name: String,
}

/// Which group to look up.
#[derive(Clone, Copy)]
enum GroupKey<'a> {
    Name(&'a CStr),
    Gid(u32),
}

/// The group named `name` (`Ok(None)`: no such group). The error is the lookup's errno;
/// glibc reports "not found" as ENOENT, ESRCH, EBADF or EPERM with some NSS backends,
/// which the caller may treat as `None`.
pub fn group_by_name(name: &CStr) -> io::Result<Option<Group>> {
    group(GroupKey::Name(name))
}

/// The group with id `gid` (`Ok(None)`: none in the database).
pub fn group_by_gid(gid: u32) -> io::Result<Option<Group>> {
    group(GroupKey::Gid(gid))
}

fn group(key: GroupKey<'_>) -> io::Result<Option<Group>> {
    // Large groups (many members) need large buffers; past this the database is broken.
    const MAX_BUF: usize = 64 << 20;
    let mut len = 1024usize;
    loop {
        let mut buf = vec![0u8; len];
        let mut result: *mut libc::group = std::ptr::null_mut();
        // SAFETY: an all-zero `group` is a valid value (null pointers, gid 0). Every
        // pointer passed is valid for the call: `name` is NUL-terminated, `grp` and
        // `result` are live locals, `buf` holds `len` writable bytes. On success with a
        // non-null `result`, `gr_name` points at a NUL-terminated string inside `buf`,
        // which is alive while it is copied out.
        let (rc, entry) = unsafe {
            let mut grp: libc::group = std::mem::zeroed();
            let out = buf.as_mut_ptr().cast::<libc::c_char>();
            let rc = match key {
                GroupKey::Name(name) => {
                    libc::getgrnam_r(name.as_ptr(), &mut grp, out, len, &mut result)
                }
                GroupKey::Gid(gid) => libc::getgrgid_r(gid, &mut grp, out, len, &mut result),
            };
            let entry = (rc == 0 && !result.is_null()).then(|| Group {
                gid: grp.gr_gid,
                name: if grp.gr_name.is_null() {
                    String::new()
                } else {
                    CStr::from_ptr(grp.gr_name).to_string_lossy().into_owned()
                },
            });
            (rc, entry)
        };
        match rc {
            0 => return Ok(entry),
            libc::ERANGE if len < MAX_BUF => len *= 2,
            e => return Err(io::Error::from_raw_os_error(e)),
        }
    }
}

/// An eventfd: the daemon signals a peer's when a slot is published, the client polls
/// and drains it (docs/PROTOCOL.md, section 3).
pub struct EventFd(
    OwnedFd,
    std::sync::atomic::AtomicBool,
    std::sync::OnceLock<String>,
);

impl EventFd {
    /// A fresh non-blocking, close-on-exec eventfd with counter 0.
    pub fn new() -> io::Result<EventFd> {
        use rustix::event::{eventfd, EventfdFlags};
        Ok(EventFd(
            eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)?,
            Default::default(),
            Default::default(),
        ))
    }

    /// Wraps an eventfd received from the daemon.
    pub fn from_fd(fd: OwnedFd) -> EventFd {
        EventFd(fd, Default::default(), Default::default())
    }

    /// Names whose eventfd this is (the first name set stays), for the warning when
    /// [`EventFd::signal`] finds it jammed.
    pub fn name_as(&self, name: String) {
        let _ = self.2.set(name);
    }

    /// The name set by [`EventFd::name_as`] ("an eventfd" without one).
    pub fn name(&self) -> &str {
        self.2.get().map_or("an eventfd", String::as_str)
    }

    /// Adds one to the counter. EAGAIN (the counter saturated) means a wake-up is already
    /// pending, so errors are ignored.
    ///
    /// The client holds the same open file description (SCM_RIGHTS shares it), so it can
    /// clear O_NONBLOCK and fill the counter to its maximum: a plain write then blocked
    /// the daemon's materializer thread until the client read, which it need never do,
    /// and every ring stopped. So a counter that cannot take one more (poll says not
    /// writable) is jammed at once, without a write; one filled between that poll and
    /// the write is cut by [`interruptible_write`] and jammed too. A jammed eventfd (the
    /// client filled it: a wake-up is pending forever) gets no further writes. Returns
    /// true when this call jammed it, for the caller to say so once.
    pub fn signal(&self) -> bool {
        use rustix::event::{poll, PollFd, PollFlags, Timespec};
        use std::sync::atomic::Ordering::Relaxed;
        if self.1.load(Relaxed) {
            return false;
        }
        // Without the poll, a client that jammed each of many connections held a
        // worker 20 ms per connection, and every ring waited meanwhile.
        let mut fds = [PollFd::new(&self.0, PollFlags::OUT)];
        let zero = Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        let full =
            poll(&mut fds, Some(&zero)).is_ok() && !fds[0].revents().contains(PollFlags::OUT);
        if full || interruptible_write(&self.0, &1u64.to_ne_bytes()) == Err(rustix::io::Errno::INTR)
        {
            self.1.store(true, Relaxed);
            return true;
        }
        false
    }

    /// Whether a write had to be interrupted (see [`EventFd::signal`]).
    pub fn jammed(&self) -> bool {
        self.1.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Resets the counter after a wake-up; nothing pending (EAGAIN) or a signal (EINTR)
    /// is not an error.
    pub fn drain(&self) -> io::Result<()> {
        let mut b = [0u8; 8];
        match rustix::io::read(&self.0, &mut b) {
            Ok(_) | Err(rustix::io::Errno::AGAIN | rustix::io::Errno::INTR) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// The descriptor, to pass to a client or to poll.
    pub fn fd(&self) -> &OwnedFd {
        &self.0
    }
}

impl AsFd for EventFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

/// How long [`interruptible_write`] lets a write wait before interrupting it: far longer
/// than a write that does not wait takes (microseconds), so only a blocked one is cut.
const WRITE_WAIT_LIMIT_NS: libc::c_long = 20_000_000;

/// The least of [`WRITE_WAIT_LIMIT_NS`] a write must have left on the thread's timer,
/// else the timer is armed afresh first: a blocked write is cut 5 to 20 ms after it
/// starts, and the timer is set about once per 15 ms of writes, not twice per write (two
/// `timer_settime` calls per wake-up were 2-3% of a copy thread's time).
const WRITE_WAIT_LEAST: Duration = Duration::from_millis(5);

/// The signal that interrupts a blocked write: a real-time one nothing else here uses,
/// handled by a function that does nothing, without SA_RESTART (so the write returns
/// EINTR). Blocked in every thread except around [`interruptible_write`]'s write.
fn interrupt_signal() -> libc::c_int {
    libc::SIGRTMIN() + 5
}

extern "C" fn on_interrupt(_: libc::c_int) {}

/// A timer of this thread's that sends it [`interrupt_signal`], and when it fires
/// (`None`: not armed); deleted with the thread.
struct ThreadTimer(libc::timer_t, std::cell::Cell<Option<Instant>>);

impl Drop for ThreadTimer {
    fn drop(&mut self) {
        // SAFETY: a timer this thread created and nothing else holds.
        unsafe { libc::timer_delete(self.0) };
    }
}

impl ThreadTimer {
    /// This thread's timer, with the signal's handler installed (once per process) and
    /// the signal blocked in this thread; `None` where the OS refused (a plain write is
    /// made then).
    fn new() -> Option<ThreadTimer> {
        static HANDLER: std::sync::Once = std::sync::Once::new();
        let sig = interrupt_signal();
        // SAFETY: sigaction with a handler that does nothing (async-signal-safe), and a
        // timer aimed at this thread; every struct is zeroed and then filled.
        unsafe {
            HANDLER.call_once(|| {
                let mut sa: libc::sigaction = std::mem::zeroed();
                sa.sa_sigaction = on_interrupt as extern "C" fn(libc::c_int) as usize;
                sa.sa_flags = 0;
                libc::sigemptyset(&mut sa.sa_mask);
                libc::sigaction(sig, &sa, std::ptr::null_mut());
            });
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, sig);
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            let mut ev: libc::sigevent = std::mem::zeroed();
            ev.sigev_notify = libc::SIGEV_THREAD_ID;
            ev.sigev_signo = sig;
            ev.sigev_notify_thread_id = libc::gettid();
            let mut t: libc::timer_t = std::mem::zeroed();
            (libc::timer_create(libc::CLOCK_MONOTONIC, &mut ev, &mut t) == 0)
                .then_some(ThreadTimer(t, Default::default()))
        }
    }

    /// Arms the timer [`WRITE_WAIT_LIMIT_NS`] from now unless it fires at least
    /// [`WRITE_WAIT_LEAST`] from now already. One that fires while no write is under way
    /// leaves its signal pending, blocked, until the next write unblocks it: the handler
    /// runs then, before that write starts.
    fn arm(&self) {
        let now = Instant::now();
        let left = self.1.get().map(|at| at.saturating_duration_since(now));
        if left.is_none_or(|l| l < WRITE_WAIT_LEAST) {
            self.set(WRITE_WAIT_LIMIT_NS);
            self.1
                .set(Some(now + Duration::from_nanos(WRITE_WAIT_LIMIT_NS as u64)));
        }
    }

    /// Arms the timer `ns` from now (0 disarms it).
    fn set(&self, ns: libc::c_long) {
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: 0,
                tv_nsec: ns,
            },
        };
        // SAFETY: a timer of this thread's and a valid itimerspec.
        unsafe { libc::timer_settime(self.0, 0, &spec, std::ptr::null_mut()) };
    }
}

/// Writes `bytes` to `fd`, waiting at most [`WRITE_WAIT_LIMIT_NS`] (at least
/// [`WRITE_WAIT_LEAST`]) should the file description have been made blocking by another
/// process sharing it: the write is interrupted then and returns EINTR. The interrupting
/// signal is unblocked only around the write, so one that fires late is taken before
/// the next write starts, never by another call of the thread.
fn interruptible_write(fd: &OwnedFd, bytes: &[u8]) -> Result<usize, rustix::io::Errno> {
    thread_local! {
        static TIMER: Option<ThreadTimer> = ThreadTimer::new();
    }
    TIMER.with(|timer| {
        let Some(timer) = timer else {
            return rustix::io::write(fd, bytes);
        };
        // SAFETY: a sigset of one signal, changing only this thread's mask.
        let mask = |how: libc::c_int| unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, interrupt_signal());
            libc::pthread_sigmask(how, &set, std::ptr::null_mut());
        };
        timer.arm();
        mask(libc::SIG_UNBLOCK);
        let r = rustix::io::write(fd, bytes);
        mask(libc::SIG_BLOCK);
        r
    })
}

/// A peer's release page (docs/PROTOCOL.md section 5, layout in
/// [`crate::wire::ring::ReleasePageHeader`]): one shared page, read-write on both sides,
/// that replaces a RELEASE frame per slot with a store.
///
/// The ordering is Dekker's: the client stores `released` then reads `daemon_waiting`,
/// the daemon stores `daemon_waiting` then reads `released`, each with a SeqCst fence
/// between. So at least one of them sees the other's store: either the daemon reads the
/// new `released`, or the client sees `daemon_waiting` and sends a RELEASE frame as the
/// wake-up. `released` is stored with release ordering and loaded with acquire, so the
/// client's reads of a slot happen before the daemon refills it.
pub struct ReleasePage {
    shm: Shm,
}

impl ReleasePage {
    /// A fresh zeroed page (the daemon's side) and its memfd, to pass with WELCOME and
    /// close then (the mapping keeps the page). Sealed against resizing, so that a client
    /// cannot shrink it under the daemon's mapping (which would raise SIGBUS there).
    pub fn create(name: &str) -> io::Result<(ReleasePage, OwnedFd)> {
        use crate::wire::ring::RELEASE_PAGE_BYTES;
        use rustix::fs::{fcntl_add_seals, memfd_create, MemfdFlags, SealFlags};
        let cname = std::ffi::CString::new(format!("millrace-release:{name}"))
            .unwrap_or_else(|_| c"millrace-release".to_owned());
        let fd = memfd_create(&cname, MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING)?;
        let file = File::from(fd);
        file.set_len(RELEASE_PAGE_BYTES as u64)?;
        let shm = Shm::create(&file, |map| map.fill(0))?;
        fcntl_add_seals(&file, SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL)?;
        Ok((ReleasePage { shm }, OwnedFd::from(file)))
    }

    /// Maps the page a WELCOME passed (the client's side), after checking the memfd
    /// holds a whole page (a shorter one would fault when touched).
    pub fn map(fd: &OwnedFd) -> io::Result<ReleasePage> {
        use crate::wire::ring::RELEASE_PAGE_BYTES;
        let size = rustix::fs::fstat(fd)?.st_size;
        if (size as u64) < RELEASE_PAGE_BYTES as u64 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("the release page memfd holds {size} bytes, expected {RELEASE_PAGE_BYTES}"),
            ));
        }
        // Accessed only through `atomic_u64`; the daemon sealed the memfd against
        // shrinking, so the page stays backed.
        let map = MmapOptions::new().len(RELEASE_PAGE_BYTES).map_raw(fd)?;
        Ok(ReleasePage {
            shm: Shm {
                map,
                writable: true,
            },
        })
    }

    fn word(&self, at: usize) -> &AtomicU64 {
        self.shm.atomic_u64(at)
    }

    /// `released` as the client last published it (acquire: the client's reads of the
    /// slots below it happened before).
    pub fn released(&self) -> u64 {
        use crate::wire::ring::page_at;
        u64::from_le(self.word(page_at::RELEASED).load(Ordering::Acquire))
    }

    /// Stores `released` (release ordering): the client's release, or the daemon's
    /// initial value (the peer's start step) before the page is passed.
    pub fn store_released(&self, upto: u64) {
        use crate::wire::ring::page_at;
        self.word(page_at::RELEASED)
            .store(upto.to_le(), Ordering::Release);
    }

    /// The client's release: stores `upto`, then (SeqCst fence) reads `daemon_waiting`.
    /// Returns whether the daemon waits for this peer, so that the client must send a
    /// RELEASE frame to wake it.
    pub fn publish(&self, upto: u64) -> bool {
        use crate::wire::ring::page_at;
        self.store_released(upto);
        fence(Ordering::SeqCst);
        self.word(page_at::DAEMON_WAITING).load(Ordering::Relaxed) != 0
    }

    /// The daemon's side before it sleeps on a full ring: raises `daemon_waiting`, then
    /// (SeqCst fence) reads `released` again; a value past what the daemon knew means
    /// the client released meanwhile and the daemon must not sleep.
    pub fn arm(&self) -> u64 {
        use crate::wire::ring::page_at;
        self.word(page_at::DAEMON_WAITING)
            .store(1u64.to_le(), Ordering::Relaxed);
        fence(Ordering::SeqCst);
        self.released()
    }

    /// Clears `daemon_waiting` once the daemon has seen this peer release again.
    pub fn disarm(&self) {
        use crate::wire::ring::page_at;
        self.word(page_at::DAEMON_WAITING)
            .store(0, Ordering::Relaxed);
    }

    /// Whether `daemon_waiting` is raised (for tests and status).
    pub fn daemon_waiting(&self) -> bool {
        use crate::wire::ring::page_at;
        self.word(page_at::DAEMON_WAITING).load(Ordering::Relaxed) != 0
    }
}

/// The effective uid of this process.
pub fn euid() -> u32 {
    rustix::process::geteuid().as_raw()
}

/// The effective gid of this process.
pub fn egid() -> u32 {
    rustix::process::getegid().as_raw()
}

/// The system page size.
pub fn page_size() -> usize {
    rustix::param::page_size()
}

/// CLOCK_MONOTONIC in nanoseconds: the clock the daemon stamps `publish_ns` with and
/// clients compare it against.
pub fn monotonic_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

/// Puts the calling thread under SCHED_BATCH: it no longer preempts the thread that
/// wakes it, so the plan thread, woken by a copy thread every 20 steps or so, does not take
/// that copy thread's CPU from it (docs/DESIGN.md, "Planning runs on a thread of its
/// own").
pub fn batch_scheduling() -> io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `param` is a valid sched_param for the call's duration; pid 0 is the
    // calling thread.
    let rc = unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &param) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// CPU time (user + system) this process has used, in seconds.
pub fn process_cpu_seconds() -> f64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
    t.tv_sec as f64 + t.tv_nsec as f64 / 1e9
}

/// Columns of the terminal on stdout, if stdout is one.
pub fn terminal_columns() -> Option<usize> {
    let ws = rustix::termios::tcgetwinsize(std::io::stdout()).ok()?;
    (ws.ws_col > 0).then_some(ws.ws_col as usize)
}

/// Whether this process may create entries in (write and search) directory `dir`.
pub fn can_write_dir(dir: &std::path::Path) -> bool {
    use rustix::fs::Access;
    rustix::fs::access(dir, Access::WRITE_OK | Access::EXEC_OK).is_ok()
}

/// Blocks until the completion queue of the io_uring whose descriptor `ring` is holds
/// an entry, without `io_uring_enter`: for reads still in the kernel after it refused a
/// wait. A ring's descriptor polls readable while completions are queued, and a thread
/// blocked in `poll` runs the task work that completes reads (a retried one, a FIFO's).
/// At most 100 ms, since a kernel may run that work only on the way back to user space;
/// where even `poll` fails, a short sleep instead. The caller looks at the queue again
/// either way.
pub fn wait_for_io_uring_completions(ring: &impl std::os::fd::AsRawFd) {
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    // SAFETY: the descriptor is the ring's, open for as long as `ring` is borrowed.
    let fd = unsafe { BorrowedFd::borrow_raw(ring.as_raw_fd()) };
    let mut fds = [PollFd::new(&fd, PollFlags::IN)];
    let most = Timespec {
        tv_sec: 0,
        tv_nsec: 100_000_000,
    };
    if let Err(e) = poll(&mut fds, Some(&most)) {
        if e != rustix::io::Errno::INTR {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }
}

/// Makes `io_uring_setup` fail with `errno` in the calling thread and the threads it
/// starts afterwards (a seccomp filter, as a container runtime's profile installs one);
/// false if the kernel refuses the filter. How the tests reproduce a kernel that refuses
/// io_uring; nothing in the daemon calls it.
pub fn refuse_io_uring_in_this_thread(errno: i32) -> bool {
    refuse_in_this_thread(libc::SYS_io_uring_setup, false, errno)
}

/// Makes `io_uring_enter` fail with `errno` in the calling thread (and the threads it
/// starts afterwards) when it submits nothing, i.e. when it only waits for completions:
/// a ring set up and probed before, whose reads are submitted, then fails the wait for
/// them. How the tests reproduce an `io_uring_enter` that fails while reads are in
/// flight; false if the kernel refuses the filter. Nothing in the daemon calls it.
pub fn refuse_io_uring_waits_in_this_thread(errno: i32) -> bool {
    refuse_in_this_thread(libc::SYS_io_uring_enter, true, errno)
}

/// Installs a seccomp filter under which system call `nr` fails with `errno`; with
/// `only_arg1_zero`, only the calls whose second argument's low 32 bits are 0.
fn refuse_in_this_thread(nr: libc::c_long, only_arg1_zero: bool, errno: i32) -> bool {
    const LD_ABS: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS: a word of `seccomp_data`
    const JEQ: u16 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
    const RET: u16 = 0x06; // BPF_RET | BPF_K
    const NR_AT: u32 = 0; // seccomp_data.nr
    const ARG1_AT: u32 = 24; // the low word of seccomp_data.args[1] (little-endian)
    let op = |code, jt, jf, k| libc::sock_filter { code, jt, jf, k };
    let refuse = op(RET, 0, 0, 0x0005_0000 | errno as u32);
    let allow = op(RET, 0, 0, 0x7fff_0000);
    let mut filter = vec![op(LD_ABS, 0, 0, NR_AT)];
    if only_arg1_zero {
        filter.extend([
            op(JEQ, 0, 3, nr as u32),
            op(LD_ABS, 0, 0, ARG1_AT),
            op(JEQ, 0, 1, 0),
        ]);
    } else {
        filter.push(op(JEQ, 0, 1, nr as u32));
    }
    filter.extend([refuse, allow]);
    let prog = libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_mut_ptr(),
    };
    // SAFETY: plain prctl calls; the filter program outlives the call that copies it.
    unsafe {
        libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0
            && libc::prctl(libc::PR_SET_SECCOMP, libc::SECCOMP_MODE_FILTER, &prog) == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both sides of a release page: the client's store is what the daemon reads, the
    /// client sees `daemon_waiting` only while the daemon armed it, and the memfd cannot
    /// be resized (a client shrinking it would fault the daemon).
    #[test]
    fn a_release_page_carries_released_and_daemon_waiting_and_cannot_shrink() {
        let (daemon, fd) = ReleasePage::create("test").unwrap();
        let client = ReleasePage::map(&fd).unwrap();
        daemon.store_released(7);
        assert_eq!(client.released(), 7);
        assert!(!client.publish(9), "the daemon did not arm the page");
        assert_eq!(daemon.released(), 9);
        assert_eq!(daemon.arm(), 9);
        assert!(client.daemon_waiting());
        assert!(client.publish(10), "an armed page asks for a RELEASE frame");
        daemon.disarm();
        assert!(!client.publish(11));
        let file = File::from(fd.try_clone().unwrap());
        assert!(file.set_len(0).is_err(), "the page memfd is sealed");
        assert!(file.set_len(8192).is_err(), "the page memfd is sealed");
        // A memfd smaller than a page is refused before it is mapped.
        let small = rustix::fs::memfd_create("small", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
        let e = ReleasePage::map(&small)
            .err()
            .expect("a 0-byte page is refused");
        assert!(e.to_string().contains("holds 0 bytes"), "{e}");
    }

    #[test]
    fn groups_resolve_both_ways_and_unknown_ones_are_none() {
        let me = egid();
        let by_gid = group_by_gid(me).unwrap();
        if let Some(g) = by_gid {
            assert_eq!(g.gid, me);
            let name = std::ffi::CString::new(g.name.clone()).unwrap();
            assert_eq!(group_by_name(&name).unwrap(), Some(g));
        }
        match group_by_name(c"millrace-no-such-group") {
            Ok(None) => {}
            Err(e) => assert!(
                matches!(
                    e.raw_os_error(),
                    Some(libc::ENOENT | libc::ESRCH | libc::EBADF | libc::EPERM)
                ),
                "{e}"
            ),
            Ok(Some(g)) => panic!("found {g:?}"),
        }
    }

    #[test]
    fn shared_memory_is_seen_through_both_mappings() {
        let file = tempfile::tempfile().unwrap();
        file.set_len(8192).unwrap();
        let shm = Shm::create(&file, |b| b[..4].copy_from_slice(b"ring")).unwrap();
        let ro = Shm::read_only(&OwnedFd::from(file.try_clone().unwrap()), 8192).unwrap();
        assert_eq!(ro.bytes(0, 4), b"ring");
        shm.atomic_u64(64)
            .store(42, std::sync::atomic::Ordering::Release);
        assert_eq!(
            ro.atomic_u64(64).load(std::sync::atomic::Ordering::Acquire),
            42
        );
        assert_eq!(ro.len(), 8192);
        let ro = std::panic::AssertUnwindSafe(&ro);
        assert!(std::panic::catch_unwind(|| ro.bytes(8190, 4).len()).is_err());
        assert!(std::panic::catch_unwind(|| ro.atomic_u64(12).as_ptr() as usize).is_err());
        // SAFETY: nothing else references the range; the call must refuse before writing.
        assert!(std::panic::catch_unwind(|| unsafe { ro.bytes_mut(0, 8) }.len()).is_err());
    }

    #[test]
    fn eventfd_signals_and_drains() {
        let ev = EventFd::new().unwrap();
        ev.drain().unwrap();
        ev.signal();
        ev.signal();
        let mut b = [0u8; 8];
        rustix::io::read(ev.fd(), &mut b).unwrap();
        assert_eq!(u64::from_ne_bytes(b), 2);
        ev.drain().unwrap();
    }

    /// A client that clears O_NONBLOCK on the eventfd it shares with the daemon and fills
    /// its counter cannot hold the thread that signals it: the write is interrupted, the
    /// eventfd is jammed, and later signals return at once.
    #[test]
    fn a_blocking_full_eventfd_does_not_hold_the_signalling_thread() {
        let ev = EventFd::new().unwrap();
        rustix::fs::fcntl_setfl(ev.fd(), rustix::fs::OFlags::empty()).unwrap();
        rustix::io::write(ev.fd(), &(u64::MAX - 1).to_ne_bytes()).unwrap();
        let t0 = std::time::Instant::now();
        ev.signal();
        assert!(ev.jammed());
        ev.signal();
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(5),
            "{:?}",
            t0.elapsed()
        );
        // An eventfd in order is never jammed.
        let ok = EventFd::new().unwrap();
        ok.signal();
        assert!(!ok.jammed());
    }

    /// A full counter is seen without a write, whether the client made the eventfd
    /// blocking or not, and only the call that jams it says so.
    #[test]
    fn a_full_eventfd_is_jammed_by_the_first_signal_that_finds_it_full() {
        for blocking in [false, true] {
            let ev = EventFd::new().unwrap();
            if blocking {
                rustix::fs::fcntl_setfl(ev.fd(), rustix::fs::OFlags::empty()).unwrap();
            }
            rustix::io::write(ev.fd(), &(u64::MAX - 1).to_ne_bytes()).unwrap();
            assert!(ev.signal(), "blocking {blocking}");
            assert!(ev.jammed());
            assert!(!ev.signal(), "said once");
        }
        let ok = EventFd::new().unwrap();
        assert!(!ok.signal());
    }

    /// The thread's timer is armed once for many writes: a write that blocks while it
    /// runs from an earlier write, or after it fired with nothing blocked, is still cut,
    /// and the writes in order between are not.
    #[test]
    fn a_write_that_blocks_is_cut_whenever_the_timer_was_armed() {
        let jam = || {
            let ev = EventFd::new().unwrap();
            rustix::fs::fcntl_setfl(ev.fd(), rustix::fs::OFlags::empty()).unwrap();
            rustix::io::write(ev.fd(), &(u64::MAX - 1).to_ne_bytes()).unwrap();
            ev
        };
        let t0 = std::time::Instant::now();
        let ok = EventFd::new().unwrap();
        for _ in 0..100 {
            ok.signal();
        }
        // The timer armed by the first of those writes still runs.
        let early = jam();
        early.signal();
        // Past the timer's end: its signal is pending until the next write unblocks it.
        std::thread::sleep(Duration::from_millis(50));
        ok.signal();
        let late = jam();
        late.signal();
        assert!(!ok.jammed());
        assert!(early.jammed() && late.jammed());
        assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
        let mut b = [0u8; 8];
        rustix::io::read(ok.fd(), &mut b).unwrap();
        assert_eq!(u64::from_ne_bytes(b), 101, "every write in order landed");
    }
}
