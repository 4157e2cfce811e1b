//! The daemon's guards against running out of file descriptors and flooding its log
//! (issue 14 item 8): the RLIMIT_NOFILE check at start, the count of open control
//! connections, the bytes buffered by connections not yet admitted, and rate-limited
//! warnings for events a peer can repeat at will (refused connections, handshake
//! failures, failed accepts).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::{info, warn};

/// Where RLIMIT_NOFILE stood after start-up; reported in `status` as `fd_limit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdLimit {
    /// The soft limit in force (after raising it).
    pub soft: u64,
    /// The hard limit (what an unprivileged process may raise the soft one to).
    pub hard: u64,
    /// The soft limit the daemon found at start.
    pub was: u64,
}

/// The most the soft limit is raised to: a hard limit of "unlimited" or 2^30 must not
/// turn into a table the kernel refuses (fs.nr_open caps it at 2^20 by default).
const RAISE_CAP: u64 = 1 << 20;

/// Reads RLIMIT_NOFILE and raises the soft limit to the hard one (capped at 2^20): the
/// daemon holds one fd per connection plus two per ring, and a distribution's default
/// soft limit of 1024 is reached by a few hundred ranks. Logs what it found and did, and
/// warns when the limit is still below `needed`.
pub fn raise_fd_limit(needed: u64) -> FdLimit {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let rl = getrlimit(Resource::Nofile);
    // `None` is RLIM_INFINITY.
    let (was, hard) = (
        rl.current.unwrap_or(u64::MAX),
        rl.maximum.unwrap_or(u64::MAX),
    );
    let target = hard.min(RAISE_CAP).max(was);
    let mut soft = was;
    if target > was {
        let new = Rlimit {
            current: Some(target),
            maximum: rl.maximum,
        };
        match setrlimit(Resource::Nofile, new) {
            Ok(()) => {
                soft = target;
                info!(
                    was,
                    now = soft,
                    hard,
                    "raised the open-file limit (RLIMIT_NOFILE)"
                );
            }
            Err(e) => warn!(was, hard, "raising RLIMIT_NOFILE failed: {e}"),
        }
    } else {
        info!(soft, hard, "open-file limit (RLIMIT_NOFILE)");
    }
    if soft < needed {
        warn!(
            soft,
            needed,
            "the open-file limit is below what [serve] max_clients and \
             max_control_connections may need; raise LimitNOFILE= in the unit"
        );
    }
    FdLimit { soft, hard, was }
}

/// File descriptors the process has open now (entries of /proc/self/fd), for `status`.
pub fn open_fds() -> Option<u64> {
    std::fs::read_dir("/proc/self/fd")
        .ok()
        .map(|d| d.count().saturating_sub(1) as u64) // less the directory's own fd
}

/// The part of each cap one peer's uid may hold (`[serve] uid_share_percent`): the caps
/// are the daemon's, and one user who may reach the socket (another team on the node, a
/// launcher gone wrong) could otherwise take all of one (every trainer place, control
/// connection, byte before admission or byte of ring memory) and refuse every other
/// user's trainers, the ranks of a running job reconnecting after a restart included.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UidShare {
    /// The peer's uid (SO_PEERCRED).
    pub uid: u32,
    /// The percent of each cap it may hold, 1..=99.
    pub percent: u32,
}

impl UidShare {
    /// The share a peer of `uid` is held to, `None` where none is: a peer without
    /// credentials, a share of 100, and the daemon's own uid and root, who may stop the
    /// daemon anyway (and where everything runs as one user, a share would only shrink
    /// the node).
    pub fn of_peer(uid: Option<u32>, percent: u32, daemon_uid: u32) -> Option<UidShare> {
        let uid = uid?;
        (percent < 100 && uid != 0 && uid != daemon_uid).then_some(UidShare { uid, percent })
    }

    /// This uid's part of `cap` (rounded down, at least 1).
    pub fn of(&self, cap: u64) -> u64 {
        let part = u128::from(cap) * u128::from(self.percent) / 100;
        u64::try_from(part).unwrap_or(u64::MAX).max(1)
    }

    /// [`UidShare::of`] for a count.
    fn of_usize(&self, cap: usize) -> usize {
        usize::try_from(self.of(cap as u64)).unwrap_or(usize::MAX)
    }
}

/// What each bounded uid holds of one cap; a uid holding nothing has no entry.
#[derive(Debug, Default)]
struct ByUid(Mutex<BTreeMap<u32, usize>>);

impl ByUid {
    const fn new() -> ByUid {
        ByUid(Mutex::new(BTreeMap::new()))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u32, usize>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Gives back `n` of what `uid` holds.
    fn give_back(&self, uid: u32, n: usize) {
        let mut map = self.lock();
        if let Some(held) = map.get_mut(&uid) {
            *held = held.saturating_sub(n);
            if *held == 0 {
                map.remove(&uid);
            }
        }
    }
}

/// One queue per bounded uid, of its share of a semaphore's permits: a uid's admissions
/// past its share wait in its own queue rather than in the daemon's (which is first come
/// first served), so the other uids' go on beside them.
#[derive(Debug)]
pub struct UidQueues(Mutex<BTreeMap<u32, Arc<tokio::sync::Semaphore>>>);

/// The queues for seek slots ([`seek_slots`]): a seek to a far step runs for hours, and
/// one uid starting jobs at far steps took every slot, so that the others' seeks waited
/// for hours.
pub static SEEK_QUEUES: UidQueues = UidQueues(Mutex::new(BTreeMap::new()));

impl UidQueues {
    /// The queue of `share`'s uid, with its share of `cap` permits. Queues nobody holds
    /// or waits in are dropped on the way.
    pub fn of(&self, share: UidShare, cap: usize) -> Arc<tokio::sync::Semaphore> {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|_, q| Arc::strong_count(q) > 1);
        let q = map
            .entry(share.uid)
            .or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(share.of_usize(cap))));
        q.clone()
    }
}

/// Counts open control connections against `[serve] max_control_connections`, and each
/// bounded uid's against its share of it.
#[derive(Debug)]
pub struct ControlSlots {
    open: AtomicUsize,
    cap: usize,
    by_uid: ByUid,
}

/// One admitted control connection; dropping it frees its place (and its uid's).
#[derive(Debug)]
pub struct ControlSlot(Arc<ControlSlots>, Option<u32>);

impl Drop for ControlSlot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
        if let Some(uid) = self.1 {
            self.0.by_uid.give_back(uid, 1);
        }
    }
}

/// Why a control connection gets no place: the REFUSED `busy` message, naming the cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ControlFull {
    /// Every place is taken.
    #[error(
        "{cap} control connections are open ([serve] max_control_connections); close one \
         or try again later"
    )]
    All {
        /// `[serve] max_control_connections`.
        cap: usize,
    },
    /// The peer's uid holds its share.
    #[error(
        "uid {uid} holds {held} control connections, its share of the {cap} the daemon \
         allows ([serve] uid_share_percent {percent} of max_control_connections); close \
         one or try again later"
    )]
    Uid {
        /// The peer's uid.
        uid: u32,
        /// Control connections it holds.
        held: usize,
        /// `[serve] uid_share_percent`.
        percent: u32,
        /// `[serve] max_control_connections`.
        cap: usize,
    },
}

impl ControlSlots {
    /// At most `cap` control connections at once.
    pub fn new(cap: usize) -> Arc<ControlSlots> {
        Arc::new(ControlSlots {
            open: AtomicUsize::new(0),
            cap,
            by_uid: ByUid::new(),
        })
    }

    /// A place for one more control connection, within the cap and the share of the
    /// peer's uid, if one bounds it.
    pub fn take(self: &Arc<Self>, share: Option<UidShare>) -> Result<ControlSlot, ControlFull> {
        let mut map = share.map(|_| self.by_uid.lock());
        if let (Some(s), Some(map)) = (share, map.as_deref()) {
            let held = map.get(&s.uid).copied().unwrap_or(0);
            if held >= s.of_usize(self.cap) {
                return Err(ControlFull::Uid {
                    uid: s.uid,
                    held,
                    percent: s.percent,
                    cap: self.cap,
                });
            }
        }
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.cap).then_some(n + 1)
            })
            .map_err(|_| ControlFull::All { cap: self.cap })?;
        if let (Some(s), Some(map)) = (share, map.as_deref_mut()) {
            *map.entry(s.uid).or_insert(0) += 1;
        }
        Ok(ControlSlot(self.clone(), share.map(|s| s.uid)))
    }

    /// Control connections open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// The configured cap.
    pub fn cap(&self) -> usize {
        self.cap
    }
}

/// The least [`pending_cap`] allows: the HELLOs of a node's job start, each in flight
/// at once, fit many times over.
pub const PENDING_MIN: usize = 64 << 20;

/// The most that connections without a WELCOME or control reply yet may buffer all
/// together: each may send one first frame of `request_limit` bytes, and without a bound
/// across connections a peer opening thousands of them, each with a HELLO it never
/// finishes, held `request_limit` bytes per fd (176 MB for 1,500 connections of a
/// 2-domain plan; up to 64 MiB each for a plan of many domains).
pub fn pending_cap(request_limit: usize) -> usize {
    request_limit.saturating_mul(4).max(PENDING_MIN)
}

/// What a connection costs the daemon before its first frame, besides its buffer (its
/// task, its socket's registration; about 3 KB measured): charged to its share from
/// its accept on, so the cap bounds how many connections wait for admission too (16,384
/// idle ones at the least cap), not only their bytes.
pub const CONNECTION_BYTES: usize = 4096;

/// Bytes held by connections before admission (a first frame being read, a HELLO
/// waiting for its admission), counted against one cap spanning them all, and each
/// bounded uid's against its share of it.
#[derive(Debug, Default)]
pub struct PendingBytes {
    held: AtomicUsize,
    by_uid: ByUid,
}

/// The daemon's count of [`PendingBytes`]: one per process, as there is one daemon.
pub static PENDING: PendingBytes = PendingBytes {
    held: AtomicUsize::new(0),
    by_uid: ByUid::new(),
};

/// One connection's share of a [`PendingBytes`]; dropping it gives the share back.
#[derive(Debug)]
pub struct PendingShare<'a> {
    pool: &'a PendingBytes,
    held: usize,
    uid: Option<UidShare>,
}

/// A connection's buffer would take the bytes of all connections before admission (or
/// those of its uid) past their cap (or the uid's share of it); it is refused `busy`
/// and closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PendingFull {
    /// All connections together are at the cap.
    #[error(
        "connections that have not been admitted hold {held} bytes together and this one \
         asks for {wanted} more, past the {cap} bytes the daemon buffers for them; retry"
    )]
    All {
        /// Bytes held by every connection before admission, this one's share included.
        held: usize,
        /// The bytes this connection asked for beyond its share.
        wanted: usize,
        /// The cap.
        cap: usize,
    },
    /// The connections of this one's uid are at its share of the cap.
    #[error(
        "uid {uid}'s connections that have not been admitted hold {held} bytes and this \
         one asks for {wanted} more, past uid {uid}'s share of the {cap} bytes the daemon \
         buffers for them ([serve] uid_share_percent {percent}); retry"
    )]
    Uid {
        /// The peer's uid.
        uid: u32,
        /// Bytes held by its connections before admission, this one's included.
        held: usize,
        /// The bytes this connection asked for beyond its share.
        wanted: usize,
        /// `[serve] uid_share_percent`.
        percent: u32,
        /// The cap of all connections.
        cap: usize,
    },
}

impl PendingBytes {
    /// An empty share of this count, charged to `uid`'s share too when one bounds it.
    pub fn share(&self, uid: Option<UidShare>) -> PendingShare<'_> {
        PendingShare {
            pool: self,
            held: 0,
            uid,
        }
    }

    /// Bytes held by all shares now.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Acquire)
    }

    /// Bytes held by the shares of `uid` now.
    pub fn held_by(&self, uid: u32) -> usize {
        self.by_uid.lock().get(&uid).copied().unwrap_or(0)
    }
}

impl PendingShare<'_> {
    /// Sets this share to `bytes`: shrinking always succeeds, growing only while the
    /// shares together stay within `cap` (and those of its uid within the uid's part).
    pub fn set(&mut self, bytes: usize, cap: usize) -> Result<(), PendingFull> {
        if bytes <= self.held {
            let less = self.held - bytes;
            self.pool.held.fetch_sub(less, Ordering::AcqRel);
            if let Some(s) = self.uid {
                self.pool.by_uid.give_back(s.uid, less);
            }
            self.held = bytes;
            return Ok(());
        }
        let more = bytes - self.held;
        let mut map = self.uid.map(|_| self.pool.by_uid.lock());
        if let (Some(s), Some(map)) = (self.uid, map.as_deref()) {
            let held = map.get(&s.uid).copied().unwrap_or(0);
            if held.saturating_add(more) > s.of_usize(cap) {
                return Err(PendingFull::Uid {
                    uid: s.uid,
                    held,
                    wanted: more,
                    percent: s.percent,
                    cap,
                });
            }
        }
        self.pool
            .held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                n.checked_add(more).filter(|&t| t <= cap)
            })
            .map_err(|n| PendingFull::All {
                held: n,
                wanted: more,
                cap,
            })?;
        if let (Some(s), Some(map)) = (self.uid, map.as_deref_mut()) {
            *map.entry(s.uid).or_insert(0) += more;
        }
        self.held = bytes;
        Ok(())
    }
}

impl Drop for PendingShare<'_> {
    fn drop(&mut self) {
        self.pool.held.fetch_sub(self.held, Ordering::AcqRel);
        if let Some(s) = self.uid {
            self.pool.by_uid.give_back(s.uid, self.held);
        }
    }
}

/// The pause of an accept loop after a failed accept (EMFILE, ENFILE, ENOBUFS): the
/// pending connection keeps the listener readable, so accepting again at once spins (the
/// crate's metrics listener did: a core and 466 MB of warnings in 5 s). The pause starts
/// at [`ACCEPT_BACKOFF_MIN`] and doubles to [`ACCEPT_BACKOFF_MAX`] while accepts keep
/// failing. Shared by the trainer socket's loop and the metrics endpoint's.
#[derive(Debug)]
pub struct AcceptPause {
    until: Option<tokio::time::Instant>,
    next: Duration,
}

/// The first pause after a failed accept; each further failure in a row doubles it.
pub const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
/// The longest pause between accepts while they keep failing.
pub const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

impl Default for AcceptPause {
    fn default() -> AcceptPause {
        AcceptPause {
            until: None,
            next: ACCEPT_BACKOFF_MIN,
        }
    }
}

impl AcceptPause {
    /// Whether the loop may accept now.
    pub fn accepting(&self) -> bool {
        self.until.is_none()
    }

    /// An accept succeeded: the next failure pauses for the least again.
    pub fn accepted(&mut self) {
        self.next = ACCEPT_BACKOFF_MIN;
    }

    /// An accept failed: no accepting for the pause it returns (to be logged).
    pub fn failed(&mut self) -> Duration {
        let pause = self.next;
        self.until = Some(tokio::time::Instant::now() + pause);
        self.next = (pause * 2).min(ACCEPT_BACKOFF_MAX);
        pause
    }

    /// Resolves when the pause is over (never while accepting); then call
    /// [`AcceptPause::resume`].
    pub async fn over(&self) {
        match self.until {
            Some(t) => tokio::time::sleep_until(t).await,
            None => std::future::pending::<()>().await,
        }
    }

    /// The pause is over: accepting again.
    pub fn resume(&mut self) {
        self.until = None;
    }
}

/// Lets at most `burst` warnings of one kind through per `window` and counts the rest,
/// so a peer that repeats a refused request (a connect flood from a denied uid wrote
/// 333,080 lines in 25 s) costs a bounded number of log lines. The count of suppressed
/// lines is reported by the next line let through, or by [`Throttle::flush`].
#[derive(Debug)]
pub struct Throttle {
    what: &'static str,
    burst: u32,
    window: Duration,
    state: Mutex<Window>,
}

#[derive(Debug)]
struct Window {
    start: Instant,
    emitted: u32,
    suppressed: u64,
}

impl Throttle {
    /// A throttle for warnings about `what` (named in the suppression summary).
    pub fn new(what: &'static str, burst: u32, window: Duration) -> Throttle {
        Throttle {
            what,
            burst,
            window,
            state: Mutex::new(Window {
                start: Instant::now(),
                emitted: 0,
                suppressed: 0,
            }),
        }
    }

    /// Whether this warning may be logged now; `Some(k)` when it may, with `k` lines
    /// suppressed before it (to be mentioned in it).
    pub fn allow(&self) -> Option<u64> {
        let mut w = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if now.saturating_duration_since(w.start) >= self.window {
            w.start = now;
            w.emitted = 0;
        }
        if w.emitted < self.burst {
            w.emitted += 1;
            Some(std::mem::take(&mut w.suppressed))
        } else {
            w.suppressed += 1;
            None
        }
    }

    /// Logs how many lines were suppressed, if any, once their window has passed; called
    /// periodically so a flood that stops still leaves its count in the log.
    pub fn flush(&self) {
        let mut w = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if w.suppressed > 0 && w.start.elapsed() >= self.window {
            let n = std::mem::take(&mut w.suppressed);
            w.start = Instant::now();
            w.emitted = 0;
            drop(w);
            warn!(
                suppressed = n,
                "{n} more warnings about {} suppressed in the last {} s",
                self.what,
                self.window.as_secs()
            );
        }
    }
}

/// Suffix for a throttled line that follows `k` suppressed ones.
pub fn suppressed_note(k: u64) -> String {
    if k == 0 {
        String::new()
    } else {
        format!(" ({k} similar warnings suppressed before this one)")
    }
}

/// Admissions (blob restores and seeks) that run at once: the cores, from 4 to 16.
/// Each holds a blocking thread and, seeking, tens to hundreds of MB; more at once than
/// the cores only divides them, while a flood of HELLOs (or a large job's start) would
/// take a thread and a seek's memory each.
pub(super) fn admission_slots() -> usize {
    std::thread::available_parallelism().map_or(4, |n| n.get().clamp(4, 16))
}

/// The admission slots seeks may take (half, at least 1): a seek to a far step runs
/// for hours, and with every slot seeking a blob restore (40 ms) or a step-0 start
/// waited for them all. The others take the rest; together they stay within
/// [`admission_slots`].
pub(super) fn seek_slots() -> usize {
    (admission_slots() / 2).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Failed accepts pause 10 ms, then twice as long each time up to 1 s; one success
    /// starts again from 10 ms.
    #[test]
    fn accept_pauses_double_to_a_second_and_reset_on_success() {
        let mut p = AcceptPause::default();
        assert!(p.accepting());
        let ms: Vec<u128> = (0..9).map(|_| p.failed().as_millis()).collect();
        assert_eq!(ms, [10, 20, 40, 80, 160, 320, 640, 1000, 1000]);
        assert!(!p.accepting());
        p.resume();
        p.accepted();
        assert!(p.accepting());
        assert_eq!(p.failed(), ACCEPT_BACKOFF_MIN);
    }

    #[test]
    fn a_throttle_lets_a_burst_through_and_counts_the_rest() {
        let t = Throttle::new("tests", 3, Duration::from_secs(3600));
        assert_eq!(t.allow(), Some(0));
        assert_eq!(t.allow(), Some(0));
        assert_eq!(t.allow(), Some(0));
        for _ in 0..100 {
            assert_eq!(t.allow(), None);
        }
        // A new window reports what the old one suppressed.
        t.state.lock().unwrap().start -= Duration::from_secs(3601);
        assert_eq!(t.allow(), Some(100));
        assert_eq!(t.allow(), Some(0));
    }

    #[test]
    fn control_slots_stop_at_the_cap_and_free_on_drop() {
        let s = ControlSlots::new(2);
        let a = s.take(None).unwrap();
        let b = s.take(None).unwrap();
        assert_eq!(s.take(None).unwrap_err(), ControlFull::All { cap: 2 });
        assert_eq!(s.open(), 2);
        drop(a);
        assert_eq!(s.open(), 1);
        let _c = s.take(None).unwrap();
        drop(b);
        assert_eq!(s.open(), 1);
    }

    /// One uid takes its share of the control connections and no more; another uid, or
    /// one the shares do not bound, takes the rest, and a closed one frees its uid's.
    #[test]
    fn a_uid_takes_its_share_of_control_slots_and_no_more() {
        let s = ControlSlots::new(4);
        let (a, b) = (share(1001, 50), share(1002, 50));
        let a1 = s.take(Some(a)).unwrap();
        let _a2 = s.take(Some(a)).unwrap();
        let e = s.take(Some(a)).unwrap_err();
        assert_eq!(
            e,
            ControlFull::Uid {
                uid: 1001,
                held: 2,
                percent: 50,
                cap: 4
            }
        );
        let text = e.to_string();
        assert!(
            text.starts_with("uid 1001 holds 2 control connections"),
            "{text}"
        );
        assert!(text.contains("max_control_connections"), "{text}");
        let _b1 = s.take(Some(b)).unwrap();
        let _free = s.take(None).unwrap();
        assert_eq!(s.take(Some(b)).unwrap_err(), ControlFull::All { cap: 4 });
        drop(a1);
        let _b2 = s.take(Some(b)).unwrap();
        assert!(s.take(Some(a)).is_err(), "the cap is full again");
    }

    fn share(uid: u32, percent: u32) -> UidShare {
        UidShare { uid, percent }
    }

    #[test]
    fn the_daemon_uid_and_root_are_not_bounded() {
        assert_eq!(
            UidShare::of_peer(Some(1001), 75, 999),
            Some(share(1001, 75))
        );
        assert_eq!(UidShare::of_peer(Some(999), 75, 999), None);
        assert_eq!(UidShare::of_peer(Some(0), 75, 999), None);
        assert_eq!(UidShare::of_peer(None, 75, 999), None);
        assert_eq!(UidShare::of_peer(Some(1001), 100, 999), None);
        assert_eq!(share(1, 75).of(512), 384);
        assert_eq!(share(1, 75).of(1), 1, "at least one");
        assert_eq!(share(1, 99).of(u64::MAX), 18_262_276_632_972_456_098);
    }

    /// A uid's connections before admission stop at its share of the cap while another
    /// uid's still buffer; what a refused growth asked for is not taken.
    #[test]
    fn a_uid_queue_has_its_share_of_the_permits_and_goes_when_unused() {
        let queues = UidQueues(Mutex::new(BTreeMap::new()));
        let q = queues.of(share(7, 75), 4);
        assert_eq!(q.available_permits(), 3);
        let held = q.clone().try_acquire_owned().unwrap();
        drop(q);
        assert_eq!(
            queues.of(share(7, 75), 4).available_permits(),
            2,
            "kept while held"
        );
        drop(held);
        let _other = queues.of(share(8, 75), 4);
        assert_eq!(queues.0.lock().unwrap().len(), 1, "uid 7's queue is gone");
        assert_eq!(
            queues.of(share(7, 50), 1).available_permits(),
            1,
            "at least one"
        );
    }

    #[test]
    fn pending_bytes_of_one_uid_stop_at_its_share() {
        let pool = PendingBytes::default();
        let mut a = pool.share(Some(share(7, 50)));
        let mut a2 = pool.share(Some(share(7, 50)));
        let mut b = pool.share(Some(share(8, 50)));
        a.set(400, 1000).unwrap();
        a2.set(100, 1000).unwrap();
        let e = a2.set(200, 1000).unwrap_err();
        assert_eq!(
            e,
            PendingFull::Uid {
                uid: 7,
                held: 500,
                wanted: 100,
                percent: 50,
                cap: 1000
            }
        );
        assert!(e.to_string().starts_with("uid 7's connections"), "{e}");
        assert_eq!((pool.held(), pool.held_by(7)), (500, 500));
        b.set(500, 1000).unwrap();
        assert_eq!(pool.held_by(8), 500);
        a.set(0, 1000).unwrap();
        a2.set(300, 1000).unwrap();
        assert_eq!((pool.held(), pool.held_by(7)), (800, 300));
        drop(a2);
        drop(b);
        assert_eq!((pool.held(), pool.held_by(7), pool.held_by(8)), (0, 0, 0));
    }

    #[test]
    fn pending_shares_stop_at_the_cap_together_and_free_on_drop() {
        let pool = PendingBytes::default();
        let mut a = pool.share(None);
        let mut b = pool.share(None);
        a.set(600, 1000).unwrap();
        b.set(300, 1000).unwrap();
        let full = b.set(500, 1000).unwrap_err();
        assert_eq!(
            full,
            PendingFull::All {
                held: 900,
                wanted: 200,
                cap: 1000
            }
        );
        assert_eq!(pool.held(), 900, "a refused growth takes nothing");
        a.set(100, 1000).unwrap();
        b.set(500, 1000).unwrap();
        assert_eq!(pool.held(), 600);
        drop(a);
        assert_eq!(pool.held(), 500);
        drop(b);
        assert_eq!(pool.held(), 0);
        assert_eq!(pending_cap(1 << 20), PENDING_MIN);
        assert_eq!(pending_cap(1 << 26), 1 << 28);
    }

    #[test]
    fn the_fd_limit_is_read_and_never_lowered() {
        let l = raise_fd_limit(0);
        assert!(l.soft >= l.was, "{l:?}");
        assert!(l.soft <= l.hard, "{l:?}");
        assert!(open_fds().is_some_and(|n| n > 0));
    }
}
