//! Reading planned token spans straight from shard files into a destination buffer (a
//! compact slot) with io_uring READs, and the `pread` reader the daemon falls back to
//! where io_uring is unavailable (issue 15 item 4).
//!
//! A span is a byte range of a shard's token file and the offset where it lands in the
//! destination; one planned step is a list of them. With compact slots the bytes land
//! unchanged, so a READ can fill the slot with no page faults in the daemon and no
//! mapping of the shard's pages. [`UringReader`] registers the shard files once, joins
//! spans that continue each other, splits them into reads of at most `max_op_bytes`,
//! keeps at most `depth` of them in flight, and submits them in batches. With `direct`
//! it reads through `O_DIRECT` descriptors (no page cache, for cold multi-TB corpora): a
//! read whose file offset, length and destination address are all aligned as the file's
//! filesystem requires (`statx` `STATX_DIOALIGN`, else [`DIRECT_ALIGN`]) goes straight
//! into the destination; any other goes through an aligned bounce buffer and is copied
//! out.
//! Buffered descriptors are advised `POSIX_FADV_RANDOM`: the spans are all the plan
//! needs, so readahead around them would only read bytes nobody asked for.
//!
//! Every failure names the file and the byte range; a read that ends early is the
//! truncated-shard error it is, never zeros in a slot. docs/DESIGN.md ("Page cache")
//! has the measurement that decides which reader fills slots by default.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use io_uring::{opcode, types, IoUring, Probe};

use crate::corpus::Shard;
use crate::plan::Segment;

/// Alignment of `O_DIRECT` reads where the filesystem does not report its own (before
/// Linux 6.1): the largest logical block size of common devices, right on every disk.
pub const DIRECT_ALIGN: usize = 4096;

/// The largest `O_DIRECT` alignment a filesystem may ask for and still be used; bounce
/// buffers are sized for it.
const MAX_ALIGN: usize = 1 << 16;

/// The `O_DIRECT` alignment of `f` (offsets, lengths and buffer addresses): what the
/// filesystem reports, so a 512-byte-sector disk reads 512-byte blocks around a short
/// span instead of 4 KiB pages.
fn direct_align(f: &File) -> usize {
    use rustix::fs::{statx, AtFlags, StatxFlags};
    match statx(f, "", AtFlags::EMPTY_PATH, StatxFlags::DIOALIGN) {
        Ok(st) if st.stx_mask & StatxFlags::DIOALIGN.bits() != 0 => {
            let a = (st.stx_dio_offset_align as usize).max(st.stx_dio_mem_align as usize);
            if a.is_power_of_two() && a <= MAX_ALIGN {
                a
            } else {
                DIRECT_ALIGN
            }
        }
        _ => DIRECT_ALIGN,
    }
}

/// One byte range of a registered file and where it lands in the destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    /// Index of the file in the list the reader was opened with.
    pub file: u32,
    /// First byte in the file.
    pub offset: u64,
    /// Bytes.
    pub len: u64,
    /// First byte in the destination.
    pub dst: u64,
}

/// How a [`UringReader`] reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UringOptions {
    /// Most reads in flight at once (the submission queue's size).
    pub depth: u32,
    /// Longest single read; longer spans are split so one document cannot serialize a step.
    pub max_op_bytes: u32,
    /// Read through `O_DIRECT` descriptors, bypassing the page cache.
    pub direct: bool,
}

impl Default for UringOptions {
    fn default() -> Self {
        // Cold short spans want many reads in flight: at depth 64 buffered reads ran at
        // 0.80x the mmap+WILLNEED copy, at 256 at 0.96-1.14x (docs/BENCHMARKS.md). 128 KiB
        // pieces keep O_DIRECT's 256 bounce buffers at 34 MiB.
        UringOptions {
            depth: 256,
            max_op_bytes: 128 << 10,
            direct: false,
        }
    }
}

/// Why spans could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// io_uring cannot be used here (old kernel, seccomp, `io_uring_disabled`); the
    /// caller should fall back to [`PreadReader`] or the mmap copy.
    #[error("io_uring is unavailable: {what}: {source}")]
    Unavailable {
        /// Which step of the setup failed.
        what: &'static str,
        /// The OS error.
        source: io::Error,
    },
    /// A shard file could not be opened.
    #[error("{}: open{}: {source}", path.display(), if *direct { " with O_DIRECT" } else { "" })]
    Open {
        /// The file.
        path: PathBuf,
        /// Whether it was the `O_DIRECT` descriptor.
        direct: bool,
        /// The OS error.
        source: io::Error,
    },
    /// A file opened by path is not the one the shard was opened (and planned) from: it
    /// was renamed over or replaced since, so its bytes are not those the index describes.
    #[error(
        "{}: not the file the shard was opened from (device {}, inode {}; the path now names \
         device {}, inode {}): it was replaced since it was mapped",
        path.display(), mapped.0, mapped.1, now.0, now.1
    )]
    Replaced {
        /// The file.
        path: PathBuf,
        /// Device and inode of the mapped file.
        mapped: (u64, u64),
        /// Device and inode of the file opened by its path.
        now: (u64, u64),
    },
    /// A read failed.
    #[error("{}: read of bytes {offset}..{end}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// First byte of the failed read.
        offset: u64,
        /// One past its last byte.
        end: u64,
        /// The OS error.
        source: io::Error,
    },
    /// The file ended before a planned span did: the shard was truncated.
    #[error(
        "{}: truncated: bytes {offset}..{end} were planned but the file now ends at byte {file_len}",
        path.display()
    )]
    Truncated {
        /// The file.
        path: PathBuf,
        /// First byte of the read that came up short.
        offset: u64,
        /// One past the last byte it needed.
        end: u64,
        /// The file's length now (`u64::MAX` when even `fstat` failed).
        file_len: u64,
    },
    /// A span names no registered file or does not fit the destination.
    #[error("span {index} {span:?}: {what}")]
    BadSpan {
        /// Its position in the list.
        index: usize,
        /// The span.
        span: Span,
        /// What is wrong with it.
        what: String,
    },
    /// Every io_uring reader is in use (no more could be opened) and none came back within
    /// the wait's bound: one may be stuck in a read that hangs (a network filesystem).
    /// The caller copies this fill from the mappings, and io_uring stays in use.
    #[error("no io_uring reader came back within {waited_ms} ms (all {readers} in use)")]
    Busy {
        /// How long the fill waited.
        waited_ms: u64,
        /// The readers that exist, all in use.
        readers: usize,
    },
    /// The ring itself failed (registering files, entering the kernel).
    #[error("io_uring: {what}: {source}")]
    Ring {
        /// What was being done.
        what: &'static str,
        /// The OS error.
        source: io::Error,
    },
}

impl ReadError {
    /// Whether the error means "io_uring is not available here", the one a caller
    /// answers by falling back rather than failing.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, ReadError::Unavailable { .. })
    }

    /// Whether io_uring itself failed, not a file: the ring could not be set up or
    /// entered ([`ReadError::Unavailable`], [`ReadError::Ring`]), or a read completed with
    /// an error of the kernel's io_uring machinery rather than of the file's bytes
    /// (cancelled, out of memory, an argument or operation it refused). The mappings still
    /// hold those bytes: a caller copies from them instead of failing the fill.
    pub fn is_io_uring(&self) -> bool {
        match self {
            ReadError::Unavailable { .. } | ReadError::Ring { .. } | ReadError::Busy { .. } => true,
            ReadError::Read { source, .. } => matches!(
                source.raw_os_error(),
                Some(
                    libc::ECANCELED
                        | libc::ENOMEM
                        | libc::EINVAL
                        | libc::EOPNOTSUPP
                        | libc::ENOSYS
                        | libc::EFAULT
                        | libc::EBADF
                        | libc::EPERM
                        | libc::EINTR
                        | libc::EAGAIN
                )
            ),
            _ => false,
        }
    }

    /// Whether io_uring failed for a reason that may pass ([`ReadError::is_io_uring`],
    /// but for want of memory or of descriptors, a queue that was full, a read
    /// interrupted or cancelled past its retries): the daemon copies from the mappings
    /// for a while and tries io_uring again, instead of giving it up for good as it does
    /// on a refusal that lasts (EPERM, ENOSYS, EOPNOTSUPP: seccomp, an old kernel).
    pub fn is_transient(&self) -> bool {
        let errno = match self {
            ReadError::Unavailable { source, .. }
            | ReadError::Ring { source, .. }
            | ReadError::Read { source, .. } => source.raw_os_error(),
            _ => None,
        };
        self.is_io_uring()
            && matches!(
                errno,
                Some(
                    libc::ENOMEM
                        | libc::EAGAIN
                        | libc::EBUSY
                        | libc::EINTR
                        | libc::ECANCELED
                        | libc::EMFILE
                        | libc::ENFILE
                        | libc::ENOBUFS
                )
            )
    }

    /// Whether this is a filesystem refusing to open a file with `O_DIRECT` (EINVAL).
    fn direct_refused(&self) -> bool {
        matches!(self, ReadError::Open { direct: true, source, .. }
            if source.raw_os_error() == Some(libc::EINVAL))
    }

    /// The file the error is about, when it is about one.
    pub fn path(&self) -> Option<&Path> {
        match self {
            ReadError::Open { path, .. }
            | ReadError::Replaced { path, .. }
            | ReadError::Read { path, .. }
            | ReadError::Truncated { path, .. } => Some(path),
            _ => None,
        }
    }
}

/// The byte range of `seg` in `shard`'s token file, landing at `dst`: what a compact
/// slot reads for one planned segment. `None` for an empty segment.
pub fn segment_span(
    shard: &Shard,
    file: u32,
    seg: &Segment,
    dst: u64,
) -> crate::corpus::Result<Option<Span>> {
    if seg.len == 0 {
        return Ok(None);
    }
    let tokens = shard.doc_tokens(seg.doc)?;
    let size = tokens.dtype().size() as u64;
    // Both borrow the same mapping of the whole file, so the pointer difference is the
    // document's byte offset in it.
    let doc_at = tokens.as_bytes().as_ptr() as u64 - shard.data().as_ptr() as u64;
    let end = seg.start.saturating_add(seg.len as u64);
    if end > tokens.len() as u64 {
        return Err(crate::corpus::CorpusError::invalid(
            shard.path(),
            format!(
                "document {}: tokens {}..{end} planned, the document has {}",
                seg.doc,
                seg.start,
                tokens.len()
            ),
        ));
    }
    Ok(Some(Span {
        file,
        offset: doc_at + seg.start * size,
        len: seg.len as u64 * size,
        dst,
    }))
}

/// The token file a shard's spans are read from (`.bin`, or the raw file).
pub fn data_path(shard: &Shard) -> &Path {
    match (shard.as_megatron(), shard.as_raw()) {
        (Some(m), _) => m.bin_path(),
        (None, Some(r)) => r.path(),
        (None, None) => shard.path(),
    }
}

/// Checks every span against the files and the destination before any read starts, so a
/// bad plan fails whole instead of half-filling a slot.
fn check_spans(spans: &[Span], files: usize, dst_len: usize) -> Result<(), ReadError> {
    for (index, s) in spans.iter().enumerate() {
        let bad = |what: String| ReadError::BadSpan {
            index,
            span: *s,
            what,
        };
        if s.file as usize >= files {
            return Err(bad(format!("file index outside the {files} registered")));
        }
        if s.offset.checked_add(s.len).is_none() {
            return Err(bad("file range overflows".into()));
        }
        match s.dst.checked_add(s.len) {
            Some(e) if e <= dst_len as u64 => {}
            _ => return Err(bad(format!("ends past the {dst_len}-byte destination"))),
        }
    }
    // No two spans may share destination bytes: their reads are in flight together, and
    // a bounced one is copied out by this thread while another may write the same bytes
    // (a fill's spans are distinct row positions; a caller's list might not be).
    // A fill's spans come in row order, their destinations ascending: checked as they
    // come, with no allocation; any other list is sorted first.
    let nonempty = || (0..spans.len()).filter(|&i| spans[i].len > 0);
    let overlap = |i: usize, j: usize| {
        let (a, b) = (&spans[i], &spans[j]);
        (a.dst + a.len > b.dst).then(|| ReadError::BadSpan {
            index: j,
            span: *b,
            what: format!(
                "its destination bytes {}..{} overlap those of span {i} ({}..{})",
                b.dst,
                b.dst + b.len,
                a.dst,
                a.dst + a.len
            ),
        })
    };
    let mut prev: Option<usize> = None;
    let mut sorted = true;
    for j in nonempty() {
        if let Some(i) = prev {
            if spans[i].dst > spans[j].dst {
                sorted = false;
                break;
            }
            if let Some(e) = overlap(i, j) {
                return Err(e);
            }
        }
        prev = Some(j);
    }
    if !sorted {
        let mut order: Vec<usize> = nonempty().collect();
        order.sort_unstable_by_key(|&i| spans[i].dst);
        if let Some(e) = order.windows(2).find_map(|w| overlap(w[0], w[1])) {
            return Err(e);
        }
    }
    Ok(())
}

/// Joins each run of spans where the next starts in the same file at the byte the last
/// ended and lands right after it in the destination: the consecutive documents of a
/// group (a repository, a book) packed into one row, or the pieces of a document. One
/// read instead of several, and with `O_DIRECT` no block read twice at their seam. An
/// error in a joined read names the joined byte range.
fn coalesce(spans: &[Span]) -> Vec<Span> {
    let mut out: Vec<Span> = Vec::with_capacity(spans.len());
    for s in spans.iter().filter(|s| s.len > 0) {
        match out.last_mut() {
            Some(l)
                if l.file == s.file && l.offset + l.len == s.offset && l.dst + l.len == s.dst =>
            {
                l.len += s.len;
            }
            _ => out.push(*s),
        }
    }
    out
}

/// The file's current length for a [`ReadError::Truncated`].
fn file_len(f: &File) -> u64 {
    f.metadata().map(|m| m.len()).unwrap_or(u64::MAX)
}

/// One shard file as the readers hold it.
#[derive(Debug)]
struct SpanFile {
    path: PathBuf,
    file: File,
    direct: Option<File>,
    /// `O_DIRECT` alignment (direct mode only); 0 once the file is read through the page
    /// cache instead: its filesystem refused `O_DIRECT` at open or on a read
    /// ([`ShardFiles::refuse_direct`]). Only ever lowered to 0, so a read built with the
    /// old value is still one the kernel may refuse, never a wrong one.
    align: AtomicUsize,
}

/// Opens `paths`, and with `direct` an `O_DIRECT` descriptor beside each; a file whose
/// filesystem refuses `O_DIRECT` (EINVAL: procfs, ramfs, some network filesystems and
/// FUSE mounts) gets none and is read buffered, the refusal returned beside it.
fn open_files(
    paths: &[PathBuf],
    direct: bool,
) -> Result<(Vec<SpanFile>, Vec<ReadError>), ReadError> {
    let mut refused = Vec::new();
    let files = paths
        .iter()
        .map(|p| {
            let open = |flags: i32| {
                std::fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(flags)
                    .open(p)
                    .map_err(|source| ReadError::Open {
                        path: p.clone(),
                        direct: flags != 0,
                        source,
                    })
            };
            let file = open(0)?;
            // The reads are exactly the planned spans, so the kernel's readahead would
            // only read bytes nobody asked for (a cold random read of one page would read
            // four). Advice only; a filesystem that ignores it is still read correctly.
            let _ = rustix::fs::fadvise(&file, 0, None, rustix::fs::Advice::Random);
            let direct = match direct.then(|| open(libc::O_DIRECT)) {
                None => None,
                Some(Ok(f)) => Some(f),
                Some(Err(e)) if e.direct_refused() => {
                    refused.push(e);
                    None
                }
                Some(Err(e)) => return Err(e),
            };
            Ok(SpanFile {
                path: p.clone(),
                file,
                align: AtomicUsize::new(direct.as_ref().map_or(0, direct_align)),
                direct,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((files, refused))
}

/// How many shard files refused `O_DIRECT` are named in the log one by one, at start;
/// past them one line counts the rest (a corpus of thousands on such a filesystem).
const REFUSALS_LOGGED: usize = 16;

/// The shard files the io_uring readers of one daemon read, opened once: every reader
/// registers the same descriptors in its own ring, so a corpus of N shards holds N
/// descriptors (2N with `O_DIRECT`) whatever the number of readers. A reader per
/// materializer thread, each opening its own, held 16,398 for 4,096 shards with 2
/// threads, and a corpus of tens of thousands of shards ran out.
#[derive(Debug)]
pub struct ShardFiles {
    files: Vec<SpanFile>,
    direct: bool,
}

impl ShardFiles {
    /// Opens `paths` (span `file` indexes this list), with an `O_DIRECT` descriptor
    /// beside each buffered one when `direct`. A file whose filesystem refuses `O_DIRECT`
    /// is read buffered, alone, and named in the log; when every file refuses it, the
    /// refusal is the error (the caller reads buffered, saying why once).
    pub fn open(paths: &[PathBuf], direct: bool) -> Result<Arc<ShardFiles>, ReadError> {
        let (files, mut refused) = open_files(paths, direct)?;
        if !files.is_empty() && refused.len() == files.len() {
            return Err(refused.swap_remove(0));
        }
        for e in refused.iter().take(REFUSALS_LOGGED) {
            tracing::warn!(
                "{e}: this shard file is read through the page cache (io_uring without \
                 O_DIRECT); the others keep O_DIRECT"
            );
        }
        if refused.len() > REFUSALS_LOGGED {
            tracing::warn!(
                "{} more shard files refused O_DIRECT and are read through the page cache",
                refused.len() - REFUSALS_LOGGED
            );
        }
        Ok(Arc::new(ShardFiles { files, direct }))
    }

    /// Whether file `file` is read with `O_DIRECT` now: false without `direct`, and for
    /// a file whose filesystem refused it.
    pub fn reads_direct(&self, file: u32) -> bool {
        self.files
            .get(file as usize)
            .is_some_and(|f| f.align.load(Ordering::Relaxed) != 0)
    }

    /// Reads file `file` through the page cache from now on, after its filesystem refused
    /// an `O_DIRECT` read (`error`): the others keep `O_DIRECT`. Logged once, naming the
    /// file; true the first time.
    fn refuse_direct(&self, file: u32, error: &io::Error) -> bool {
        let Some(f) = self.files.get(file as usize) else {
            return false;
        };
        let first = f.align.swap(0, Ordering::Relaxed) != 0;
        if first {
            tracing::warn!(
                "{}: an O_DIRECT read was refused ({error}): this shard file is read through \
                 the page cache (io_uring without O_DIRECT) until restart; the others keep \
                 O_DIRECT",
                f.path.display()
            );
        }
        first
    }

    /// Checks that every descriptor (buffered and `O_DIRECT`) is of the file whose device
    /// and inode `mapped` gives, in the order of the paths: a path opened after its shard
    /// was mapped may name a file renamed over it since, whose bytes the plan (made from
    /// the mapped index) does not describe.
    pub fn check_same(
        &self,
        mapped: impl IntoIterator<Item = (u64, u64)>,
    ) -> Result<(), ReadError> {
        use std::os::unix::fs::MetadataExt;
        for (f, mapped) in self.files.iter().zip(mapped) {
            for file in std::iter::once(&f.file).chain(&f.direct) {
                let m = file.metadata().map_err(|source| ReadError::Open {
                    path: f.path.clone(),
                    direct: false,
                    source,
                })?;
                if (m.dev(), m.ino()) != mapped {
                    return Err(ReadError::Replaced {
                        path: f.path.clone(),
                        mapped,
                        now: (m.dev(), m.ino()),
                    });
                }
            }
        }
        Ok(())
    }
}

/// Reads spans with `pread`: the fallback where io_uring is unavailable, and the
/// reference the benchmark compares io_uring with.
#[derive(Debug)]
pub struct PreadReader {
    files: Vec<SpanFile>,
}

impl PreadReader {
    /// Opens `paths` (span `file` indexes this list).
    pub fn open(paths: &[PathBuf]) -> Result<PreadReader, ReadError> {
        Ok(PreadReader {
            files: open_files(paths, false)?.0,
        })
    }

    /// Fills `dst` from `spans`, one `pread` loop per span.
    pub fn read(&mut self, spans: &[Span], dst: &mut [u8]) -> Result<(), ReadError> {
        check_spans(spans, self.files.len(), dst.len())?;
        for s in spans {
            let f = &self.files[s.file as usize];
            let out = &mut dst[s.dst as usize..(s.dst + s.len) as usize];
            let mut done = 0usize;
            while done < out.len() {
                let at = s.offset + done as u64;
                match f.file.read_at(&mut out[done..], at) {
                    Ok(0) => {
                        return Err(ReadError::Truncated {
                            path: f.path.clone(),
                            offset: s.offset,
                            end: s.offset + s.len,
                            file_len: file_len(&f.file),
                        })
                    }
                    Ok(n) => done += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(source) => {
                        return Err(ReadError::Read {
                            path: f.path.clone(),
                            offset: s.offset,
                            end: s.offset + s.len,
                            source,
                        })
                    }
                }
            }
        }
        Ok(())
    }
}

/// One read in flight: a piece of one span.
#[derive(Debug, Clone, Copy)]
struct Op {
    /// Registered file index (the `O_DIRECT` descriptors follow the buffered ones).
    fixed: u32,
    file: u32,
    /// Next file byte to read, and bytes still to read.
    at: u64,
    left: u32,
    /// Where the bytes go: the destination offset, or (bounced) the position in the
    /// slot's bounce buffer.
    to: usize,
    /// Bounced: the piece's destination offset, and how many bytes of the bounce buffer
    /// to skip (the alignment padding before the piece) and to copy.
    bounce: Option<(usize, usize, usize)>,
    /// The piece's file range, for errors.
    first: u64,
    end: u64,
    /// Completions that came back interrupted (EINTR, EAGAIN) and were read again.
    retries: u8,
    /// The `O_DIRECT` alignment it was built for; 0 for a buffered read.
    align: u32,
}

impl Op {
    /// A buffered read of file bytes `first..end` into the destination at `to`.
    fn buffered(file: u32, first: u64, end: u64, to: usize) -> Op {
        Op {
            fixed: file,
            file,
            at: first,
            left: (end - first) as u32,
            to,
            bounce: None,
            first,
            end,
            retries: 0,
            align: 0,
        }
    }
}

/// Interrupted completions of one read queued again before it fails: NFS and FUSE turn
/// an interrupted read into EINTR, and some kernels complete an O_DIRECT read with
/// EAGAIN when the device queue is full; both are worth another try, forever is not.
const MAX_RETRIES: u8 = 16;

/// Enters the kernel once with a NOP and takes its completion: a seccomp profile that
/// allows `io_uring_setup` and `io_uring_register` but not `io_uring_enter` makes every
/// read fail, so the reader is refused as unavailable (the caller falls back) instead
/// of failing every ring whose slot it fills.
fn enter_once(ring: &mut IoUring) -> Result<(), ReadError> {
    let nop = opcode::Nop::new().build().user_data(u64::MAX);
    // SAFETY: a NOP names no buffer or file.
    if unsafe { ring.submission().push(&nop) }.is_err() {
        return Err(ReadError::Unavailable {
            what: "queueing a NOP on a fresh ring",
            source: io::Error::from_raw_os_error(libc::EBUSY),
        });
    }
    loop {
        match ring.submitter().submit_and_wait(1) {
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            Err(source) => {
                return Err(ReadError::Unavailable {
                    what: "io_uring_enter",
                    source,
                })
            }
            Ok(_) => {}
        }
        if ring.completion().next().is_some() {
            return Ok(());
        }
    }
}

/// Reads spans with io_uring: see the file comment.
pub struct UringReader {
    ring: IoUring,
    files: Arc<ShardFiles>,
    opts: UringOptions,
    /// `depth` aligned bounce buffers of `bounce_len` bytes (direct mode only), starting
    /// `bounce_at` bytes into `bounce_mem`.
    bounce_mem: Vec<u8>,
    bounce_at: usize,
    bounce_len: usize,
    /// Reads submitted since open.
    reads: u64,
    /// The error of an `io_uring_enter` that failed: the ring may hold entries the kernel
    /// did not take, which a later call would submit, so it reads nothing again.
    broken: Option<i32>,
}

impl std::fmt::Debug for UringReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UringReader")
            .field("files", &self.files.files)
            .field("opts", &self.opts)
            .finish_non_exhaustive()
    }
}

impl UringReader {
    /// Sets up a ring of `opts.depth` entries and registers `paths` (span `file` indexes
    /// this list). [`ReadError::Unavailable`] when the kernel refuses io_uring (any of
    /// its three calls) or lacks `IORING_OP_READ` (before 5.6).
    pub fn open(paths: &[PathBuf], opts: UringOptions) -> Result<UringReader, ReadError> {
        UringReader::open_with(ShardFiles::open(paths, opts.direct)?, opts)
    }

    /// [`UringReader::open`] over files already open, shared with other readers: the
    /// ring registers their descriptors and opens none (`opts.direct` is the files').
    pub fn open_with(files: Arc<ShardFiles>, opts: UringOptions) -> Result<UringReader, ReadError> {
        let opts = UringOptions {
            direct: files.direct,
            depth: opts.depth.clamp(1, 4096),
            max_op_bytes: (opts.max_op_bytes.clamp(DIRECT_ALIGN as u32, 1 << 30)
                / DIRECT_ALIGN as u32)
                * DIRECT_ALIGN as u32,
        };
        let mut ring = IoUring::new(opts.depth).map_err(|source| ReadError::Unavailable {
            what: "io_uring_setup",
            source,
        })?;
        let mut probe = Probe::new();
        ring.submitter()
            .register_probe(&mut probe)
            .map_err(|source| ReadError::Unavailable {
                what: "probing the kernel's opcodes",
                source,
            })?;
        if !probe.is_supported(opcode::Read::CODE) {
            return Err(ReadError::Unavailable {
                what: "IORING_OP_READ",
                source: io::Error::from_raw_os_error(libc::EOPNOTSUPP),
            });
        }
        enter_once(&mut ring)?;
        let fds: Vec<i32> = files
            .files
            .iter()
            .map(|f| f.file.as_raw_fd())
            // A file without an `O_DIRECT` descriptor (its filesystem refused one) takes
            // its place with the buffered one, so file i stays at n + i; no read uses it.
            .chain(
                files
                    .files
                    .iter()
                    .filter(|_| files.direct)
                    .map(|f| f.direct.as_ref().unwrap_or(&f.file).as_raw_fd()),
            )
            .collect();
        if !fds.is_empty() {
            ring.submitter()
                .register_files(&fds)
                .map_err(|source| ReadError::Ring {
                    what: "registering the shard files",
                    source,
                })?;
        }
        // A bounced piece spans at most max_op_bytes plus one block of padding each side.
        let bounce_len = if opts.direct {
            let align = files
                .files
                .iter()
                .map(|f| f.align.load(Ordering::Relaxed))
                .max()
                .unwrap_or(DIRECT_ALIGN)
                .max(DIRECT_ALIGN);
            (opts.max_op_bytes as usize + 2 * align).next_multiple_of(align)
        } else {
            0
        };
        // The memory starts on a MAX_ALIGN boundary and bounce_len is a multiple of every
        // file's alignment (all powers of two), so each bounce buffer starts aligned.
        let bytes = bounce_len * opts.depth as usize + MAX_ALIGN;
        let bounce_mem = zeroed(bytes).ok_or_else(|| ReadError::Unavailable {
            what: "allocating the O_DIRECT bounce buffers",
            source: io::Error::from_raw_os_error(libc::ENOMEM),
        })?;
        let bounce_at = bounce_mem.as_ptr().align_offset(MAX_ALIGN);
        Ok(UringReader {
            ring,
            files,
            opts,
            bounce_mem,
            bounce_at,
            bounce_len,
            reads: 0,
            broken: None,
        })
    }

    /// Splits the spans into the reads to submit, after [`coalesce`] joined the ones that
    /// continue each other.
    fn ops(&self, spans: &[Span], dst: &[u8]) -> Vec<Op> {
        let max = self.opts.max_op_bytes as u64;
        let n = self.files.files.len() as u32;
        let mut out = Vec::new();
        for s in &coalesce(spans) {
            let mut done = 0u64;
            while done < s.len {
                let len = (s.len - done).min(max);
                let (first, to) = (s.offset + done, (s.dst + done) as usize);
                done += len;
                let end = first + len;
                let a = match self.opts.direct {
                    true => self.files.files[s.file as usize]
                        .align
                        .load(Ordering::Relaxed),
                    false => 0,
                };
                if a == 0 {
                    out.push(Op::buffered(s.file, first, end, to));
                    continue;
                }
                let a = a as u64;
                let aligned = first % a == 0
                    && len % a == 0
                    && (dst.as_ptr() as usize + to) % a as usize == 0;
                let start = first / a * a;
                let stop = end.div_ceil(a) * a;
                out.push(Op {
                    fixed: n + s.file,
                    file: s.file,
                    at: start,
                    left: (stop - start) as u32,
                    to: if aligned { to } else { 0 },
                    bounce: (!aligned).then_some((to, (first - start) as usize, len as usize)),
                    first,
                    end,
                    retries: 0,
                    align: a as u32,
                });
            }
        }
        out
    }

    /// Whether an `io_uring_enter` failed: such a reader refuses every later read, so an
    /// owner (the daemon's pool) drops it, whichever error its last read returned.
    pub fn is_broken(&self) -> bool {
        self.broken.is_some()
    }

    /// Reads submitted to the kernel since open (pieces of split spans and the rest of
    /// short reads each count; spans joined by [`coalesce`] count once): what the disk is
    /// asked for, so tests and benchmarks can see the joining work.
    pub fn reads(&self) -> u64 {
        self.reads
    }

    /// Fills `dst` from `spans`. Spans should not overlap in `dst` (which bytes win is
    /// then unspecified). On an error every read already submitted has completed before
    /// this returns, so nothing writes into `dst` (or a bounce buffer) afterwards, even
    /// when `io_uring_enter` itself failed; the reader then refuses every later read.
    pub fn read(&mut self, spans: &[Span], dst: &mut [u8]) -> Result<(), ReadError> {
        if let Some(errno) = self.broken {
            return Err(ReadError::Ring {
                what: "an earlier io_uring_enter failed, so the ring is not used again",
                source: io::Error::from_raw_os_error(errno),
            });
        }
        check_spans(spans, self.files.files.len(), dst.len())?;
        let ops = self.ops(spans, dst);
        let depth = self.opts.depth as usize;
        let mut slots: Vec<Option<Op>> = vec![None; depth];
        let mut free: Vec<usize> = (0..depth).rev().collect();
        let mut next = 0usize;
        let mut in_flight = 0usize;
        let mut failed: Option<ReadError> = None;
        loop {
            while failed.is_none() && next < ops.len() {
                let Some(k) = free.pop() else { break };
                next += 1;
                match self.push(k, &ops[next - 1], dst) {
                    Ok(()) => {
                        self.reads += 1;
                        slots[k] = Some(ops[next - 1]);
                        in_flight += 1;
                    }
                    Err(e) => {
                        free.push(k);
                        failed = Some(e);
                    }
                }
            }
            if in_flight == 0 {
                break;
            }
            if self.broken.is_none() {
                match self.ring.submit_and_wait(1) {
                    Ok(_) => {}
                    Err(e)
                        if matches!(
                            e.raw_os_error(),
                            Some(libc::EINTR) | Some(libc::EAGAIN) | Some(libc::EBUSY)
                        ) => {}
                    // Reads an earlier call submitted are still in the kernel, writing into
                    // `dst` or a bounce buffer until they complete: returning now would let
                    // them write into a slot handed on, or into freed memory. Wait for them
                    // without entering the kernel, and never use this ring again.
                    Err(source) => {
                        self.broken = Some(source.raw_os_error().unwrap_or(libc::EIO));
                        failed.get_or_insert(ReadError::Ring {
                            what: "io_uring_enter",
                            source,
                        });
                    }
                }
            }
            if self.broken.is_some() {
                // Entries the kernel did not take stay queued in a ring never entered again:
                // they will not run. Every other read must complete first.
                if in_flight <= self.ring.submission().len() {
                    break;
                }
                crate::sys::wait_for_io_uring_completions(&self.ring);
            }
            let done: Vec<(u64, i32)> = self
                .ring
                .completion()
                .map(|c| (c.user_data(), c.result()))
                .collect();
            for (k, res) in done {
                let k = k as usize;
                let Some(mut op) = slots.get_mut(k).and_then(Option::take) else {
                    continue;
                };
                match self.complete(k, &mut op, res, dst) {
                    Ok(true) => {
                        free.push(k);
                        in_flight -= 1;
                    }
                    Ok(false) if failed.is_none() => {
                        // A short read that made progress, or an interrupted one: read the
                        // rest in the same slot (a bounced piece keeps its bounce buffer).
                        match self.push(k, &op, dst) {
                            Ok(()) => {
                                self.reads += 1;
                                slots[k] = Some(op);
                            }
                            Err(e) => {
                                free.push(k);
                                in_flight -= 1;
                                failed = Some(e);
                            }
                        }
                    }
                    Ok(false) => {
                        free.push(k);
                        in_flight -= 1;
                    }
                    Err(e) => {
                        free.push(k);
                        in_flight -= 1;
                        failed.get_or_insert(e);
                    }
                }
            }
        }
        match failed {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Queues the read of `op` in slot `k` (submitted by the next `submit_and_wait`).
    fn push(&mut self, k: usize, op: &Op, dst: &mut [u8]) -> Result<(), ReadError> {
        let buf = match op.bounce {
            // In range: `ops` built `to` and `left` from a checked span or a bounce slot.
            None => dst[op.to..].as_mut_ptr(),
            Some(_) => {
                let at = self.bounce_at + k * self.bounce_len + op.to;
                self.bounce_mem[at..].as_mut_ptr()
            }
        };
        let sqe = opcode::Read::new(types::Fixed(op.fixed), buf, op.left)
            .offset(op.at)
            .build()
            .user_data(k as u64);
        loop {
            // SAFETY: `buf..buf + left` lies inside `dst` or this slot's bounce buffer;
            // `read` holds both borrowed until every submitted read has completed, and no
            // two reads in flight share bytes (spans are checked, bounce slots are per k).
            if unsafe { self.ring.submission().push(&sqe) }.is_ok() {
                return Ok(());
            }
            // The queue is full of entries not yet handed to the kernel: hand them over.
            self.ring.submit().map_err(|source| ReadError::Ring {
                what: "io_uring_enter",
                source,
            })?;
        }
    }

    /// Accounts a completion; `Ok(true)` when the piece is done, `Ok(false)` when the rest
    /// must be read (after a short read, or a read interrupted by EINTR or EAGAIN, up to
    /// [`MAX_RETRIES`] times).
    fn complete(
        &mut self,
        k: usize,
        op: &mut Op,
        res: i32,
        dst: &mut [u8],
    ) -> Result<bool, ReadError> {
        let f = &self.files.files[op.file as usize];
        if (res == -libc::EINTR || res == -libc::EAGAIN) && op.retries < MAX_RETRIES {
            // Interrupted with nothing read: the same read again (the caller queues it).
            op.retries += 1;
            return Ok(false);
        }
        if res == -libc::EINVAL && op.align != 0 {
            // The filesystem refused this file's O_DIRECT read (it accepted the open, or
            // reports an alignment it does not accept): the file is read buffered from
            // now on, this piece too; the other files keep O_DIRECT.
            self.files
                .refuse_direct(op.file, &io::Error::from_raw_os_error(libc::EINVAL));
            *op = match op.bounce {
                Some((to, _, _)) => Op::buffered(op.file, op.first, op.end, to),
                // Aligned: the bytes read so far are the piece's first, in place.
                None => Op {
                    fixed: op.file,
                    align: 0,
                    ..*op
                },
            };
            return Ok(false);
        }
        if res < 0 {
            return Err(ReadError::Read {
                path: f.path.clone(),
                offset: op.first,
                end: op.end,
                source: io::Error::from_raw_os_error(-res),
            });
        }
        let got = res as u32;
        op.at += got as u64;
        op.left -= got.min(op.left);
        op.to += got as usize;
        let truncated = || ReadError::Truncated {
            path: f.path.clone(),
            offset: op.first,
            end: op.end,
            file_len: file_len(&f.file),
        };
        match op.bounce {
            None if op.left == 0 => Ok(true),
            // Zero bytes: end of file. A direct read that stops off a block boundary
            // also hit the end of the file.
            None if got == 0 || (op.align != 0 && got % op.align != 0) => Err(truncated()),
            None => Ok(false),
            Some((to, skip, len)) => {
                // The aligned read may run past the end of the file; only the piece's
                // own bytes must be there.
                if op.to >= skip + len {
                    let b = self.bounce_at + k * self.bounce_len;
                    dst[to..to + len].copy_from_slice(&self.bounce_mem[b + skip..b + skip + len]);
                    Ok(true)
                } else if got == 0 || got % op.align != 0 || op.left == 0 {
                    Err(truncated())
                } else {
                    Ok(false)
                }
            }
        }
    }
}

/// `len` zeroed bytes, or `None` when the allocator refuses them. An address-space limit
/// (systemd's `LimitAS=`) or the kernel's overcommit check that refuses the bounce
/// buffers' MiBs then gives io_uring up, where `vec!` aborted the daemon; and the memory
/// is taken zeroed in one call, as `vec!` takes it (calloc: a page is touched only by the
/// reads that use it, not all by a memset), not asked for once to check and again to use.
fn zeroed(len: usize) -> Option<Vec<u8>> {
    let layout = std::alloc::Layout::array::<u8>(len).ok()?;
    if len == 0 {
        return Some(Vec::new());
    }
    // SAFETY: the layout's size is not zero (checked above).
    let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
    if ptr.is_null() {
        return None;
    }
    // SAFETY: `ptr` was just allocated by the global allocator with the layout of
    // `[u8; len]`, which is what a `Vec<u8>` of capacity `len` frees with, and all `len`
    // bytes are initialized (zeroed).
    Some(unsafe { Vec::from_raw_parts(ptr, len, len) })
}

/// A span reader: io_uring where the kernel allows it, `pread` where it does not.
#[derive(Debug)]
pub enum SpanReader {
    /// io_uring READs.
    Uring(Box<UringReader>),
    /// `pread`, with why io_uring could not be used.
    Pread(PreadReader, String),
}

impl SpanReader {
    /// io_uring if it can be set up, else `pread` (with the reason, for the log).
    pub fn open(paths: &[PathBuf], opts: UringOptions) -> Result<SpanReader, ReadError> {
        match UringReader::open(paths, opts) {
            Ok(r) => Ok(SpanReader::Uring(Box::new(r))),
            Err(e) if e.is_unavailable() => {
                tracing::warn!("{e}; reading spans with pread");
                Ok(SpanReader::Pread(PreadReader::open(paths)?, e.to_string()))
            }
            Err(e) => Err(e),
        }
    }

    /// Fills `dst` from `spans`.
    pub fn read(&mut self, spans: &[Span], dst: &mut [u8]) -> Result<(), ReadError> {
        match self {
            SpanReader::Uring(r) => r.read(spans, dst),
            SpanReader::Pread(r, _) => r.read(spans, dst),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bounce buffers' memory: zeroed and of the length asked, and a refusal (more
    /// than the address space holds) is `None`, which the open turns into "unavailable"
    /// rather than an abort.
    #[test]
    fn bounce_memory_is_zeroed_or_refused_never_an_abort() {
        assert_eq!(zeroed(0), Some(Vec::new()));
        let m = zeroed(3 << 20).unwrap();
        assert!(m.len() == 3 << 20 && m.capacity() == 3 << 20 && m.iter().all(|&b| b == 0));
        assert_eq!(zeroed(usize::MAX / 2), None, "more than an address space");
        assert_eq!(zeroed(usize::MAX), None, "more than a layout allows");
    }

    /// Spans whose destinations overlap are refused before any read: their reads would
    /// be in flight together, and a bounced one is copied out by this thread while the
    /// kernel may write the same bytes (the SAFETY of the submission relies on it).
    /// Touching ends and empty spans are fine.
    #[test]
    fn spans_that_share_destination_bytes_are_refused() {
        let span = |dst, len| Span {
            file: 0,
            offset: 0,
            len,
            dst,
        };
        assert!(check_spans(&[span(0, 8), span(8, 8), span(4, 0)], 1, 16).is_ok());
        let e = check_spans(&[span(8, 8), span(0, 9)], 1, 16).unwrap_err();
        assert!(matches!(e, ReadError::BadSpan { index: 0, .. }), "{e}");
        let text = e.to_string();
        assert!(
            text.contains("8..16 overlap those of span 1 (0..9)"),
            "{text}"
        );
        // In ascending order, as a fill lists them (checked without sorting).
        let e = check_spans(&[span(0, 9), span(8, 8)], 1, 16).unwrap_err();
        assert!(matches!(e, ReadError::BadSpan { index: 1, .. }), "{e}");
        assert!(e
            .to_string()
            .contains("8..16 overlap those of span 0 (0..9)"));
    }

    /// A completion interrupted by EINTR or EAGAIN is read again, with nothing counted as
    /// read, up to [`MAX_RETRIES`] times; then, and for any other error at once, the read
    /// fails naming the file, its bytes and the error. (The kernel's result is handed in:
    /// an interrupted completion cannot be made on demand.)
    #[test]
    fn an_interrupted_read_is_queued_again_a_failed_one_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.bin");
        std::fs::write(&path, vec![3u8; 8192]).unwrap();
        let mut r = match UringReader::open(std::slice::from_ref(&path), UringOptions::default()) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("skipped: io_uring unavailable here ({e})");
                return;
            }
        };
        let fresh = Op {
            fixed: 0,
            file: 0,
            at: 4096,
            left: 100,
            to: 0,
            bounce: None,
            first: 4096,
            end: 4196,
            retries: 0,
            align: 0,
        };
        let mut dst = vec![0u8; 100];
        let mut op = fresh;
        for res in [-libc::EINTR, -libc::EAGAIN].into_iter().cycle().take(16) {
            assert!(!r.complete(0, &mut op, res, &mut dst).unwrap());
            assert_eq!((op.at, op.left, op.to), (4096, 100, 0), "nothing was read");
        }
        let e = r.complete(0, &mut op, -libc::EINTR, &mut dst).unwrap_err();
        let text = e.to_string();
        assert!(text.contains("s.bin") && text.contains("4096"), "{text}");
        let mut op = fresh;
        assert!(r.complete(0, &mut op, -libc::EIO, &mut dst).is_err());
        // A short read still advances and asks for the rest.
        let mut op = fresh;
        assert!(!r.complete(0, &mut op, 60, &mut dst).unwrap());
        assert_eq!((op.at, op.left, op.to), (4156, 40, 60));
        assert!(r.complete(0, &mut op, 40, &mut dst).unwrap());
    }

    /// `len` random bytes written to `dir/name`, and dropped from the page cache.
    fn cold_file(dir: &Path, name: &str, len: usize, seed: u8) -> (PathBuf, Vec<u8>) {
        let path = dir.join(name);
        let bytes: Vec<u8> = (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 9) as u8)
            .collect();
        std::fs::write(&path, &bytes).unwrap();
        let f = File::open(&path).unwrap();
        f.sync_all().unwrap();
        rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::DontNeed).unwrap();
        (path, bytes)
    }

    /// Pages of `path` in the page cache (mincore on a mapping never touched).
    fn resident(path: &Path) -> u64 {
        let map = crate::sys::map_file(&File::open(path).unwrap(), None).unwrap();
        crate::sys::resident_pages(&map).unwrap().0
    }

    /// Regression: an O_DIRECT read that one file's filesystem refused (EINVAL: an
    /// alignment it does not accept, a filesystem that takes the open but not the read)
    /// failed the fill as an io_uring error, and the daemon gave io_uring up for every
    /// file. Here the file reports a smaller alignment than the disk's (2 bytes), so the
    /// kernel refuses its direct reads (straight into the destination, or into a bounce
    /// buffer, both aligned to 2 bytes only): the refused pieces are read again
    /// through the page cache, every byte lands, the file is read buffered from then on,
    /// and the other file keeps O_DIRECT (none of its pages enter the page cache).
    #[test]
    fn a_file_whose_o_direct_reads_are_refused_is_read_buffered_the_others_direct() {
        let dir = tempfile::tempdir().unwrap();
        let (a, a_bytes) = cold_file(dir.path(), "a.bin", 1 << 20, 1);
        let (b, b_bytes) = cold_file(dir.path(), "b.bin", 1 << 20, 2);
        let files = match ShardFiles::open(&[a.clone(), b.clone()], true) {
            Ok(f) => f,
            Err(e) => {
                eprintln!("skipped: {e}");
                return;
            }
        };
        let opts = UringOptions {
            direct: true,
            ..UringOptions::default()
        };
        let mut r = match UringReader::open_with(files.clone(), opts) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("skipped: {e}");
                return;
            }
        };
        files.files[0].align.store(2, Ordering::Relaxed);
        // Pieces at even and odd offsets and lengths, both files, into any place.
        let mut spans = Vec::new();
        let mut expect = Vec::new();
        for i in 0..64u64 {
            let (file, bytes) = if i % 2 == 0 {
                (0, &a_bytes)
            } else {
                (1, &b_bytes)
            };
            let (offset, len) = (i * 15_000 + i % 4, 3_000 + i % 3);
            expect.push(0xAB);
            spans.push(Span {
                file,
                offset,
                len,
                dst: expect.len() as u64,
            });
            expect.extend_from_slice(&bytes[offset as usize..(offset + len) as usize]);
        }
        for round in 0..2 {
            let mut dst = vec![0xABu8; expect.len()];
            r.read(&spans, &mut dst).unwrap();
            assert!(dst == expect, "round {round}: bytes differ");
            assert!(!files.reads_direct(0), "a.bin is read buffered");
            assert!(files.reads_direct(1), "b.bin keeps O_DIRECT");
        }
        assert!(resident(&a) > 0, "a.bin was read through the page cache");
        assert_eq!(resident(&b), 0, "b.bin was read with O_DIRECT");
    }
}
