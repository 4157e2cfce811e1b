//! tokenize, Writing: results back in input order, into the shard or the spill file.

use super::*;

// ---------------------------------------------------------------------------------------
// Writing: results back in input order, into the shard or the spill file.

#[derive(Default)]
pub(super) struct Stats {
    pub(super) lines: u64,
    pub(super) blank: u64,
    pub(super) text_bytes: u64,
    pub(super) documents: u64,
    pub(super) tokens: u64,
    pub(super) bad: BadCounts,
    /// Documents left to the other runs of the job.
    pub(super) elsewhere: u64,
}

pub(super) enum Out {
    Stream(ShardWriter),
    Grouped {
        spill: BufWriter<File>,
        spill_path: PathBuf,
        spill_at: u64,
        sorter: Sorter,
    },
}

pub(super) struct Sink<'a> {
    pub(super) inputs: &'a [PathBuf],
    /// This run's share of a grouped job of several runs: bad lines and groups of
    /// dropped rows that belong to other runs are theirs to count.
    pub(super) share: Option<Share>,
    pub(super) dtype: DType,
    pub(super) max_bad: Option<u64>,
    pub(super) out: Out,
    pub(super) stats: Stats,
    pub(super) first_bad: Vec<BadLine>,
    pub(super) progress: &'a ProgressBar,
    pub(super) started: Instant,
    pub(super) last_tick: Instant,
}

/// Receives processed chunks, puts them back in input order and writes them, returning a
/// slot to the reader for each one written.
pub(super) fn collect(
    done: Receiver<Done>,
    slots: SyncSender<()>,
    sink: &mut Sink<'_>,
) -> Result<()> {
    let mut pending: BTreeMap<u64, Done> = BTreeMap::new();
    let mut next = 0u64;
    for d in done.iter() {
        pending.insert(d.seq, d);
        while let Some(d) = pending.remove(&next) {
            sink.take(d)?;
            next += 1;
            let _ = slots.send(());
        }
    }
    Ok(())
}

impl Sink<'_> {
    pub(super) fn take(&mut self, d: Done) -> Result<()> {
        let path = &self.inputs[d.file];
        if let Some(mut fatal) = d.fatal {
            if let TokenizeError::TokenRange { path: p, .. }
            | TokenizeError::Input { path: p, .. } = &mut fatal
            {
                *p = path.clone();
            }
            return Err(fatal);
        }
        self.stats.lines += d.lines;
        self.stats.blank += d.blank;
        self.stats.text_bytes += d.text_bytes;
        self.stats.elsewhere += d.elsewhere;
        let share = self.share;
        let theirs = |line: u64| share.is_some_and(|s| !s.owns_line(d.file, line));
        for (line, kind, detail) in d.bad {
            // A line's run counts what is wrong with the line itself. A document the
            // tokenizer refuses, or too long for a shard, is found only by the run that
            // owns the document (its group's, in a grouped job), which need not own the
            // line: that run counts it (kept to the line's run, no run counted it).
            let found_by_owner = matches!(kind, BadKind::EncodeFailed | BadKind::TooLong);
            if theirs(line) && !found_by_owner {
                continue;
            }
            self.stats.bad.add(kind);
            if self.first_bad.len() < REPORTED_BAD_LINES {
                self.first_bad.push(BadLine {
                    file: path.clone(),
                    line,
                    kind: kind.name(),
                    detail,
                });
            }
        }
        if let Some(max) = self.max_bad {
            let bad = self.stats.bad.total();
            if bad > max {
                return Err(TokenizeError::TooManyBad {
                    bad,
                    max,
                    first: self.first_bad.clone(),
                });
            }
        }
        let size = self.dtype.size() as u64;
        let mut at = 0usize;
        for doc in &d.docs {
            let len = (doc.ntok * size) as usize;
            let bytes = &d.tokens[at..at + len];
            at += len;
            match &mut self.out {
                Out::Stream(w) => {
                    w.boundary(0)?;
                    w.add(bytes, None)?;
                }
                Out::Grouped {
                    spill,
                    spill_path,
                    spill_at,
                    sorter,
                } => {
                    spill
                        .write_all(bytes)
                        .map_err(io_err(spill_path, "write"))?;
                    let seq = self.stats.documents;
                    let own;
                    let g: &[u8] = match doc.group {
                        Some((a, n)) => &d.keys[a..a + n],
                        None => {
                            let mut k = [0u8; 9];
                            k[1..].copy_from_slice(&seq.to_be_bytes());
                            own = k;
                            &own
                        }
                    };
                    let (oa, on) = doc.order;
                    sorter.push(g, &d.keys[oa..oa + on], seq, *spill_at, doc.ntok)?;
                    *spill_at += len as u64;
                }
            }
            self.stats.documents += 1;
            self.stats.tokens += doc.ntok;
        }
        if let Out::Grouped { sorter, .. } = &mut self.out {
            for &(a, n) in &d.dropped {
                let key = &d.keys[a..a + n];
                if share.is_some_and(|s| !s.owns_group(key)) {
                    continue;
                }
                sorter.push(key, &[], u64::MAX, DROPPED_ROW, 0)?;
            }
        }
        self.progress.set_position(d.stored_end);
        let now = Instant::now();
        if now.duration_since(self.last_tick) >= Duration::from_millis(250) {
            self.last_tick = now;
            let secs = now.duration_since(self.started).as_secs_f64().max(1e-9);
            self.progress.set_message(format!(
                "{} docs/s, {} tok/s, {:.1} MB/s",
                crate::util::si(self.stats.documents as f64 / secs),
                crate::util::si(self.stats.tokens as f64 / secs),
                self.stats.text_bytes as f64 / secs / 1e6
            ));
        }
        Ok(())
    }
}

pub(super) struct GroupedWritten {
    pub(super) groups: u64,
    pub(super) vanished: u64,
    pub(super) runs: usize,
    pub(super) shards: Vec<OutputShard>,
}

/// Pass 2: documents in (group, order, input position) order from the spill file into the
/// shards, with their sidecars; a shard ends only between groups. Each sidecar is renamed
/// before its shard, whose `.idx` is the last file to appear.
pub(super) fn write_grouped(
    mut writer: ShardWriter,
    dtype: DType,
    documents: u64,
    spill: &File,
    spill_path: &Path,
    sorter: Sorter,
    progress: bool,
) -> Result<GroupedWritten> {
    let pb = bar(documents, progress, "writing", "documents in group order");
    let size = dtype.size() as u64;
    let mut buf: Vec<u8> = Vec::new();
    // The key of the group being read, and its id once it has a document (a group whose
    // every row was dropped gets none and is counted as vanished).
    let mut key: Option<Vec<u8>> = None;
    let mut id: Option<u64> = None;
    let mut groups = 0u64;
    let mut vanished = 0u64;
    let mut n = 0u64;
    let runs = sorter.finish(|g, off, ntok| {
        if key.as_deref() != Some(g) {
            if key.is_some() && id.is_none() {
                vanished += 1;
            }
            key = Some(g.to_vec());
            id = None;
        }
        if off == DROPPED_ROW {
            return Ok(());
        }
        let group = match id {
            Some(g) => g,
            None => {
                writer.boundary(groups)?;
                groups += 1;
                *id.insert(groups - 1)
            }
        };
        let len = (ntok * size) as usize;
        buf.resize(len, 0);
        spill
            .read_exact_at(&mut buf, off)
            .map_err(io_err(spill_path, "read"))?;
        writer.add(&buf, Some(group))?;
        n += 1;
        if n % 4096 == 0 {
            pb.set_position(n);
        }
        Ok(())
    })?;
    if key.is_some() && id.is_none() {
        vanished += 1;
    }
    pb.finish_and_clear();
    Ok(GroupedWritten {
        groups,
        vanished,
        runs,
        shards: writer.finish()?,
    })
}
