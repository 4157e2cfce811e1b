//! tokenize, Reading: input files (plain, gzip, zstd) -> chunks of whole lines, with oversize lines skipped unread.

use super::*;

// ---------------------------------------------------------------------------------------
// Reading: files -> chunks of whole lines.

/// A run of whole lines of one input file.
pub(super) struct Chunk {
    pub(super) seq: u64,
    pub(super) file: usize,
    pub(super) first_line: u64,
    /// Input bytes as stored (compressed) read up to the end of this chunk, over all
    /// files: the progress bar's position once the chunk is written.
    pub(super) stored_end: u64,
    /// The kept lines, back to back with their newlines.
    pub(super) data: Vec<u8>,
    /// Lines longer than the limit, left out of `data`: (index of the line within the
    /// chunk, its length without the newline), in order.
    pub(super) skipped: Vec<(u64, u64)>,
    /// Bytes of the skipped lines, newlines included (they count as read).
    pub(super) skipped_bytes: u64,
}

/// Counts the bytes read from an input as stored, for the progress bar.
pub(super) struct Counting<R> {
    pub(super) inner: R,
    pub(super) count: Arc<AtomicU64>,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

/// Opens an input, decompressing gzip or zstd when its first bytes say so. Buffered, so
/// that lines are cut from the reader's own buffer without a copy per line.
pub(super) fn open_input(path: &Path, count: &Arc<AtomicU64>) -> Result<Box<dyn BufRead + Send>> {
    let file = File::open(path).map_err(io_err(path, "open"))?;
    let mut raw = BufReader::with_capacity(
        1 << 20,
        Counting {
            inner: file,
            count: count.clone(),
        },
    );
    let head = raw.fill_buf().map_err(io_err(path, "read"))?;
    if head.starts_with(&[0x1f, 0x8b]) {
        let d = flate2::bufread::MultiGzDecoder::new(raw);
        Ok(Box::new(BufReader::with_capacity(1 << 20, d)))
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) || zstd_skippable(head) {
        // A skippable frame first (pzstd writes one) is zstd too; the decoder skips it.
        let d = zstd::stream::read::Decoder::with_buffer(raw).map_err(io_err(path, "zstd init"))?;
        Ok(Box::new(BufReader::with_capacity(1 << 20, d)))
    } else {
        Ok(Box::new(raw))
    }
}

/// Whether `head` starts with a zstd skippable frame (magic 0x184D2A50-5F), which
/// `pzstd` puts before its frames: read as plain text, the whole file was dropped as
/// lines of invalid UTF-8.
fn zstd_skippable(head: &[u8]) -> bool {
    head.len() >= 4 && (0x50..=0x5F).contains(&head[0]) && head[1..4] == [0x2A, 0x4D, 0x18]
}

/// What a [`LineCutter`] hands over for one chunk (see [`Chunk`] for the fields).
pub(super) struct Cut {
    pub(super) data: Vec<u8>,
    pub(super) lines: u64,
    pub(super) skipped: Vec<(u64, u64)>,
    pub(super) skipped_bytes: u64,
}

/// Cuts one file's bytes, as they arrive, into chunks of whole lines, leaving out lines
/// longer than the limit as it goes: it holds at most one chunk plus one line of the
/// limit's length, whatever the input (a 100 MB line costs nothing).
pub(super) struct LineCutter {
    pub(super) max_line: usize,
    /// Kept whole lines, then the kept start of the current, unfinished line.
    pub(super) buf: Vec<u8>,
    /// Where the unfinished line starts in `buf`.
    pub(super) line_start: usize,
    /// Bytes seen of the current line once it is known to be too long (none are kept).
    pub(super) skipping: Option<u64>,
    /// Lines finished in this chunk, kept or skipped.
    pub(super) lines: u64,
    pub(super) skipped: Vec<(u64, u64)>,
    pub(super) skipped_bytes: u64,
}

impl LineCutter {
    pub(super) fn new(max_line: usize) -> LineCutter {
        LineCutter {
            max_line,
            buf: Vec::new(),
            line_start: 0,
            skipping: None,
            lines: 0,
            skipped: Vec::new(),
            skipped_bytes: 0,
        }
    }

    /// Takes lines from `data` until the chunk holds `chunk` bytes of whole lines;
    /// returns how many bytes of `data` it took.
    pub(super) fn feed(&mut self, data: &[u8], chunk: usize) -> usize {
        let mut at = 0;
        while at < data.len() && !self.full(chunk) {
            let rest = &data[at..];
            let nl = memchr::memchr(b'\n', rest);
            if let Some(seen) = &mut self.skipping {
                let n = nl.unwrap_or(rest.len());
                *seen += n as u64;
                self.skipped_bytes += n as u64;
                at += n;
                if nl.is_some() {
                    self.skipped_bytes += 1;
                    at += 1;
                    let len = *seen;
                    self.skipping = None;
                    self.skipped.push((self.lines, len));
                    self.lines += 1;
                }
                continue;
            }
            let held = self.buf.len() - self.line_start;
            let room = self.max_line - held;
            match nl {
                Some(i) if i <= room => {
                    self.buf.extend_from_slice(&rest[..=i]);
                    self.line_start = self.buf.len();
                    self.lines += 1;
                    at += i + 1;
                }
                Some(i) => {
                    self.buf.truncate(self.line_start);
                    self.skipped.push((self.lines, (held + i) as u64));
                    self.skipped_bytes += (held + i + 1) as u64;
                    self.lines += 1;
                    at += i + 1;
                }
                None if rest.len() <= room => {
                    self.buf.extend_from_slice(rest);
                    at += rest.len();
                }
                None => {
                    // Too long already, with no end in sight: drop what is held and
                    // count the rest as it streams past.
                    self.buf.truncate(self.line_start);
                    let seen = (held + rest.len()) as u64;
                    self.skipping = Some(seen);
                    self.skipped_bytes += seen;
                    at += rest.len();
                }
            }
        }
        at
    }

    /// Whether the chunk should go: enough whole lines, or many skipped ones.
    pub(super) fn full(&self, chunk: usize) -> bool {
        self.line_start >= chunk || self.skipped.len() >= 1024
    }

    /// Ends the file: an unfinished last line (no newline) is a line too.
    pub(super) fn finish(&mut self) {
        if let Some(len) = self.skipping.take() {
            self.skipped.push((self.lines, len));
            self.lines += 1;
        } else if self.buf.len() > self.line_start {
            self.line_start = self.buf.len();
            self.lines += 1;
        }
    }

    /// Hands over the finished lines (kept and skipped), keeping the unfinished one.
    pub(super) fn take(&mut self) -> Cut {
        let carry = self.buf[self.line_start..].to_vec();
        let mut data = std::mem::replace(&mut self.buf, carry);
        data.truncate(self.line_start);
        self.line_start = 0;
        Cut {
            data,
            lines: std::mem::take(&mut self.lines),
            skipped: std::mem::take(&mut self.skipped),
            skipped_bytes: std::mem::take(&mut self.skipped_bytes),
        }
    }

    /// Whether there is nothing finished to hand over.
    pub(super) fn is_empty(&self) -> bool {
        self.lines == 0
    }
}

/// The reader thread: every input, in order, cut into chunks of about `chunk` bytes of
/// whole lines by a [`LineCutter`]. Waits for a free slot before each chunk, and stops
/// quietly when the writer has gone (it has its own error to report).
pub(super) fn read_inputs(
    inputs: &[PathBuf],
    chunk: usize,
    max_line: usize,
    work: &SyncSender<Chunk>,
    slots: &Receiver<()>,
    consumed: &Arc<AtomicU64>,
) -> Result<()> {
    let mut seq = 0u64;
    for (file, path) in inputs.iter().enumerate() {
        let mut reader = open_input(path, consumed)?;
        let mut cutter = LineCutter::new(max_line);
        let mut line = 1u64; // first line of the next chunk
        let mut offset = 0u64; // decompressed bytes read
        loop {
            let data = match reader.fill_buf() {
                Ok(d) => d,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    return Err(TokenizeError::Input {
                        path: path.clone(),
                        what: format!(
                        "cannot read past decompressed byte {offset} (in or after line {}): {e}",
                        line + cutter.lines
                    ),
                    })
                }
            };
            let eof = data.is_empty();
            if eof {
                cutter.finish();
            } else {
                let n = cutter.feed(data, chunk);
                reader.consume(n);
                offset += n as u64;
                if !cutter.full(chunk) {
                    continue;
                }
            }
            if !cutter.is_empty() {
                let Cut {
                    data,
                    lines,
                    skipped,
                    skipped_bytes,
                } = cutter.take();
                if slots.recv().is_err() {
                    return Ok(());
                }
                let c = Chunk {
                    seq,
                    file,
                    first_line: line,
                    stored_end: consumed.load(Ordering::Relaxed),
                    data,
                    skipped,
                    skipped_bytes,
                };
                if work.send(c).is_err() {
                    return Ok(());
                }
                seq += 1;
                line += lines;
            }
            if eof {
                break;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `input` to a cutter in `piece`-byte reads, as the reader does, and returns
    /// its chunks (data, lines, skipped) and the most it ever held.
    fn cut(input: &[u8], max_line: usize, chunk: usize, piece: usize) -> (Vec<Cut>, usize) {
        let mut c = LineCutter::new(max_line);
        let mut out = Vec::new();
        let mut most = 0;
        let mut at = 0;
        while at < input.len() {
            let end = (at + piece).min(input.len());
            at += c.feed(&input[at..end], chunk);
            most = most.max(c.buf.capacity());
            if c.full(chunk) {
                out.push(c.take());
            }
        }
        c.finish();
        if !c.is_empty() {
            out.push(c.take());
        }
        (out, most)
    }

    #[test]
    fn a_line_past_the_limit_is_never_held() {
        // 16 MB lines against a 1 MiB limit, read 64 KiB at a time: the cutter never
        // holds more than about the limit plus a chunk (a buffered line would be 16 MB).
        let big = vec![b'x'; 16 << 20];
        let mut input = b"a\n".to_vec();
        input.extend_from_slice(&big);
        input.extend_from_slice(b"\nbb\n");
        input.extend_from_slice(&big);
        let (chunks, most) = cut(&input, 1 << 20, 64 << 10, 64 << 10);
        assert!(most <= 4 << 20, "held {most} bytes");
        let data: Vec<u8> = chunks.iter().flat_map(|c| c.data.clone()).collect();
        assert_eq!(data, b"a\nbb\n");
        let lines: u64 = chunks.iter().map(|c| c.lines).sum();
        assert_eq!(lines, 4);
        // Skipped lines keep their place: line 2 and line 4 (the last, with no newline).
        let mut first = 1;
        let mut skipped = Vec::new();
        for c in &chunks {
            skipped.extend(c.skipped.iter().map(|&(i, len)| (first + i, len)));
            first += c.lines;
        }
        let skipped_bytes: u64 = chunks.iter().map(|c| c.skipped_bytes).sum();
        assert_eq!(
            skipped_bytes,
            2 * (16 << 20) + 1,
            "the newline of line 2 counts"
        );
        assert_eq!(skipped, [(2, 16 << 20), (4, 16 << 20)]);

        // Any read size and chunk size cut the same lines.
        let text = b"one\ntwo two\n\nthree three three\nfour\nxxxxxxxxxxxx\nlast";
        for piece in [1, 2, 5, 64] {
            for chunk in [1, 7, 1000] {
                let (chunks, _) = cut(text, 11, chunk, piece);
                let data: Vec<u8> = chunks.iter().flat_map(|c| c.data.clone()).collect();
                assert_eq!(data, b"one\ntwo two\n\nfour\nlast", "{piece} {chunk}");
                let lines: u64 = chunks.iter().map(|c| c.lines).sum();
                assert_eq!(lines, 7);
            }
        }
    }
}
