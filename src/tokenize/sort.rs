//! tokenize, The external sort of group records (in memory up to a budget, runs on disk past it).

use super::*;

// ---------------------------------------------------------------------------------------
// The external sort of group records.
//
// A record is `glen u32 | olen u32 | group key | order key | seq u64 | offset u64 |
// tokens u64`, little-endian, the same in memory and in run files. Records compare by
// (group key, order key, seq); seq is unique, so the order is total and deterministic.

/// Group records, sorted in memory up to a budget and in runs on disk past it.
pub(super) struct Sorter {
    pub(super) arena: Vec<u8>,
    pub(super) index: Vec<usize>,
    pub(super) arena_cap: usize,
    pub(super) index_cap: usize,
    pub(super) dir: PathBuf,
    pub(super) stem: String,
    pub(super) runs: Vec<PathBuf>,
    pub(super) made: usize,
    pub(super) buf_bytes: usize,
}

impl Drop for Sorter {
    fn drop(&mut self) {
        for r in &self.runs {
            let _ = std::fs::remove_file(r);
        }
    }
}

pub(super) fn rec_fields(rec: &[u8]) -> (&[u8], &[u8], u64, u64, u64) {
    let gl = u32::from_le_bytes([rec[0], rec[1], rec[2], rec[3]]) as usize;
    let ol = u32::from_le_bytes([rec[4], rec[5], rec[6], rec[7]]) as usize;
    let g = &rec[8..8 + gl];
    let o = &rec[8 + gl..8 + gl + ol];
    let t = 8 + gl + ol;
    let u = |at: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&rec[at..at + 8]);
        u64::from_le_bytes(w)
    };
    (g, o, u(t), u(t + 8), u(t + 16))
}

pub(super) fn rec_cmp(a: &[u8], b: &[u8]) -> CmpOrdering {
    let (ga, oa, sa, _, _) = rec_fields(a);
    let (gb, ob, sb, _, _) = rec_fields(b);
    ga.cmp(gb).then_with(|| oa.cmp(ob)).then(sa.cmp(&sb))
}

pub(super) fn rec_len(rec: &[u8]) -> usize {
    let gl = u32::from_le_bytes([rec[0], rec[1], rec[2], rec[3]]) as usize;
    let ol = u32::from_le_bytes([rec[4], rec[5], rec[6], rec[7]]) as usize;
    8 + gl + ol + 24
}

impl Sorter {
    pub(super) fn new(budget: usize, dir: PathBuf, stem: String) -> Sorter {
        // Reserved, not touched: pages are committed only as records arrive, and the
        // arena never reallocates (so it never holds twice the budget while copying).
        let arena_cap = budget / 8 * 7;
        let index_cap = (budget / 8 / std::mem::size_of::<usize>()).max(1);
        Sorter {
            arena: Vec::new(),
            index: Vec::new(),
            arena_cap,
            index_cap,
            dir,
            stem,
            runs: Vec::new(),
            made: 0,
            buf_bytes: (budget / 4).clamp(64 << 10, 8 << 20),
        }
    }

    pub(super) fn push(&mut self, g: &[u8], o: &[u8], seq: u64, off: u64, ntok: u64) -> Result<()> {
        let len = 8 + g.len() + o.len() + 24;
        if self.arena.len() + len > self.arena_cap || self.index.len() >= self.index_cap {
            self.spill()?;
        }
        if self.arena.capacity() == 0 {
            self.arena.reserve_exact(self.arena_cap.max(len));
            self.index.reserve_exact(self.index_cap);
        }
        self.index.push(self.arena.len());
        self.arena
            .extend_from_slice(&(g.len() as u32).to_le_bytes());
        self.arena
            .extend_from_slice(&(o.len() as u32).to_le_bytes());
        self.arena.extend_from_slice(g);
        self.arena.extend_from_slice(o);
        self.arena.extend_from_slice(&seq.to_le_bytes());
        self.arena.extend_from_slice(&off.to_le_bytes());
        self.arena.extend_from_slice(&ntok.to_le_bytes());
        Ok(())
    }

    pub(super) fn sort_index(&mut self) {
        let arena = &self.arena;
        self.index
            .sort_unstable_by(|&a, &b| rec_cmp(&arena[a..], &arena[b..]));
    }

    pub(super) fn new_run(&mut self) -> Result<(PathBuf, BufWriter<File>)> {
        let path = self
            .dir
            .join(format!("{}.sort-{:05}.tmp", self.stem, self.made));
        self.made += 1;
        let f = File::create(&path).map_err(io_err(&path, "create"))?;
        self.runs.push(path.clone());
        Ok((path, BufWriter::with_capacity(self.buf_bytes, f)))
    }

    /// Writes the in-memory records, sorted, as a new run and empties memory.
    pub(super) fn spill(&mut self) -> Result<()> {
        if self.index.is_empty() {
            return Ok(());
        }
        self.sort_index();
        let (path, mut w) = self.new_run()?;
        for &at in &self.index {
            let rec = &self.arena[at..];
            w.write_all(&rec[..rec_len(rec)])
                .map_err(io_err(&path, "write"))?;
        }
        w.flush().map_err(io_err(&path, "write"))?;
        self.arena.clear();
        self.index.clear();
        Ok(())
    }

    /// Calls `f(group key, spill offset, tokens)` for every record in sorted order and
    /// returns how many runs went to disk.
    pub(super) fn finish(
        mut self,
        mut f: impl FnMut(&[u8], u64, u64) -> Result<()>,
    ) -> Result<usize> {
        if self.runs.is_empty() {
            self.sort_index();
            for &at in &self.index {
                let (g, _, _, off, ntok) = rec_fields(&self.arena[at..]);
                f(g, off, ntok)?;
            }
            return Ok(0);
        }
        self.spill()?;
        self.arena = Vec::new();
        self.index = Vec::new();
        let spilled = self.runs.len();
        // Merge in passes of at most MERGE_FAN_IN runs, so open files stay bounded.
        while self.runs.len() > MERGE_FAN_IN {
            let batch: Vec<PathBuf> = self.runs.drain(..MERGE_FAN_IN).collect();
            let (path, mut w) = self.new_run()?;
            merge(&batch, self.buf_bytes / MERGE_FAN_IN, |rec| {
                w.write_all(rec).map_err(io_err(&path, "write"))
            })?;
            w.flush().map_err(io_err(&path, "write"))?;
            for r in &batch {
                let _ = std::fs::remove_file(r);
            }
        }
        let runs = self.runs.clone();
        merge(&runs, self.buf_bytes / runs.len().max(1), |rec| {
            let (g, _, _, off, ntok) = rec_fields(rec);
            f(g, off, ntok)
        })?;
        Ok(spilled)
    }
}

/// One run file being merged, with its current record.
pub(super) struct RunHead {
    pub(super) rec: Vec<u8>,
    pub(super) run: usize,
}

impl PartialEq for RunHead {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == CmpOrdering::Equal
    }
}
impl Eq for RunHead {}
impl PartialOrd for RunHead {
    fn partial_cmp(&self, other: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(other))
    }
}
impl Ord for RunHead {
    // Reversed: BinaryHeap is a max-heap and the merge wants the smallest record.
    fn cmp(&self, other: &Self) -> CmpOrdering {
        rec_cmp(&other.rec, &self.rec)
    }
}

/// Reads the next record of a run into `rec`; `false` at the end of the run.
pub(super) fn read_rec(r: &mut BufReader<File>, rec: &mut Vec<u8>, path: &Path) -> Result<bool> {
    let mut head = [0u8; 8];
    match r.read_exact(&mut head) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(false),
        Err(e) => return Err(io_err(path, "read")(e)),
    }
    let gl = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
    let ol = u32::from_le_bytes([head[4], head[5], head[6], head[7]]) as usize;
    rec.clear();
    rec.extend_from_slice(&head);
    rec.resize(8 + gl + ol + 24, 0);
    r.read_exact(&mut rec[8..]).map_err(io_err(path, "read"))?;
    Ok(true)
}

/// K-way merge of sorted runs, calling `out` on each record in order.
pub(super) fn merge(
    runs: &[PathBuf],
    buf_bytes: usize,
    mut out: impl FnMut(&[u8]) -> Result<()>,
) -> Result<()> {
    let mut readers = Vec::with_capacity(runs.len());
    let mut heap = BinaryHeap::with_capacity(runs.len());
    for (i, path) in runs.iter().enumerate() {
        let f = File::open(path).map_err(io_err(path, "open"))?;
        let mut r = BufReader::with_capacity(buf_bytes.max(16 << 10), f);
        let mut rec = Vec::new();
        if read_rec(&mut r, &mut rec, path)? {
            heap.push(RunHead { rec, run: i });
        }
        readers.push(r);
    }
    while let Some(mut head) = heap.pop() {
        out(&head.rec)?;
        let i = head.run;
        if read_rec(&mut readers[i], &mut head.rec, &runs[i])? {
            heap.push(head);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sorter_merges_runs_in_order() {
        let dir = std::env::temp_dir().join(format!("millrace-sort-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut s = Sorter::new(4096, dir.clone(), "t".into());
        let n = 2000u64;
        for seq in 0..n {
            let g = format!("g{}", (seq * 7919) % 37);
            s.push(g.as_bytes(), &[0], seq, seq, 1).unwrap();
        }
        assert!(s.runs.len() > 1);
        let mut got = Vec::new();
        let runs = s
            .finish(|g, off, _| {
                got.push((g.to_vec(), off));
                Ok(())
            })
            .unwrap();
        assert!(runs > 1);
        let mut want: Vec<(Vec<u8>, u64)> = (0..n)
            .map(|seq| (format!("g{}", (seq * 7919) % 37).into_bytes(), seq))
            .collect();
        want.sort();
        assert_eq!(got, want);
        let left = std::fs::read_dir(&dir).unwrap().count();
        assert_eq!(left, 0, "run files are removed");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
