//! Packing one window of units into rows: concatenate-and-chunk, or best-fit-decreasing.
//!
//! Pure functions over `(unit, length)` lists. A window is packed on its own, so the
//! cost of a resume is one window and the result never depends on what came before.
//! A row holds `seq_len + 1` tokens (`capacity`): inputs are its first `seq_len`, labels
//! its last `seq_len`.

use crate::config::plan::Packing;

/// A contiguous token range of one unit placed in a row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    /// Unit index within the epoch's unit space (not the virtual, upsampled index).
    pub unit: u64,
    /// First token within the unit.
    pub start: u64,
    /// Tokens.
    pub len: u32,
    /// The piece is its whole unit, packed from a span of the unit's full length: `len`
    /// is the unit's length, so expanding the row need not read it from the shard again.
    /// `false` where that is not known (a carried range, a cut unit).
    pub whole: bool,
}

/// A run of rows that must stay together and in order: a long grouped unit's rows, or a
/// single row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Block {
    /// First row (index into [`Window::rows`]).
    pub first_row: u32,
    /// Rows in the block (at least 1).
    pub rows: u32,
}

/// A packed row: a range of [`Window::pieces`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowPieces {
    /// First piece.
    pub first: u32,
    /// Pieces in the row.
    pub count: u32,
    /// Real (non-padding) tokens.
    pub tokens: u32,
}

/// One packed window: rows made of pieces, and the blocks that the emission order
/// shuffles.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Window {
    /// All pieces, row by row.
    pub pieces: Vec<Piece>,
    /// Rows in packing order.
    pub rows: Vec<RowPieces>,
    /// Blocks, covering `rows` in order.
    pub blocks: Vec<Block>,
}

impl Window {
    /// The pieces of row `r`.
    pub fn row_pieces(&self, r: u32) -> &[Piece] {
        match self.rows.get(r as usize) {
            Some(row) => {
                let a = row.first as usize;
                self.pieces.get(a..a + row.count as usize).unwrap_or(&[])
            }
            None => &[],
        }
    }

    /// Real tokens over all rows.
    pub fn tokens(&self) -> u64 {
        self.rows.iter().map(|r| r.tokens as u64).sum()
    }

    fn push_row(&mut self, pieces: impl IntoIterator<Item = Piece>) -> u32 {
        let first = self.pieces.len() as u32;
        let mut tokens = 0u32;
        for p in pieces {
            tokens += p.len;
            self.pieces.push(p);
        }
        let count = self.pieces.len() as u32 - first;
        self.rows.push(RowPieces {
            first,
            count,
            tokens,
        });
        self.rows.len() as u32 - 1
    }
}

/// A token range of a unit to pack: `(unit, length)` for a whole unit, or `(unit,
/// first token, length)` for the part of one that a stage switch carried
/// (`plan/stage.rs`). Pieces name tokens from the unit's start either way.
pub trait Span: Copy {
    /// Whether a span of this type is always a whole unit (so a piece covering all of
    /// it is [`Piece::whole`]).
    const WHOLE: bool;
    /// The unit.
    fn unit(self) -> u64;
    /// Its first token in the range.
    fn base(self) -> u64;
    /// Tokens in the range.
    fn tokens(self) -> u64;
}

impl Span for (u64, u64) {
    const WHOLE: bool = true;
    fn unit(self) -> u64 {
        self.0
    }
    fn base(self) -> u64 {
        0
    }
    fn tokens(self) -> u64 {
        self.1
    }
}

impl Span for (u64, u64, u64) {
    const WHOLE: bool = false;
    fn unit(self) -> u64 {
        self.0
    }
    fn base(self) -> u64 {
        self.1
    }
    fn tokens(self) -> u64 {
        self.2
    }
}

/// Packs `units` (in window order, `(unit, length)`) into rows of `capacity` tokens.
///
/// `keep_together` (grouping on) makes each unit longer than a row one block: its full
/// rows in order, then a row that starts with its remainder and is topped up with short
/// units. Without it every row is its own block.
pub fn pack<S: Span>(units: &[S], capacity: u32, packing: Packing, keep_together: bool) -> Window {
    pack_with(units, capacity, packing, keep_together, false)
}

/// [`pack`], with `chain` (best_fit, grouping on; a stage's `chain_groups`): units longer
/// than half a row are concatenated in window order into one block of full rows (one
/// unit's end and the next one's start share a row), whose last row is topped up with
/// shorter units. A domain whose units are nearly all that long (books at 131072 tokens)
/// then pads one row per window instead of about one per unit.
pub fn pack_with<S: Span>(
    units: &[S],
    capacity: u32,
    packing: Packing,
    keep_together: bool,
    chain: bool,
) -> Window {
    match packing {
        Packing::Concat => concat(units, capacity, keep_together),
        Packing::BestFit => best_fit(units, capacity, keep_together, chain && keep_together),
    }
}

/// Megatron's concatenate-and-chunk. Row k covers stream tokens `[kL, kL + L + 1)` with
/// `L = capacity - 1`: consecutive rows share one boundary token, so every token is a
/// label exactly once. The window's last row is padded rather than dropped.
fn concat<S: Span>(units: &[S], capacity: u32, keep_together: bool) -> Window {
    let mut w = Window::default();
    let step = (capacity as u64).saturating_sub(1).max(1);
    let total: u64 = units.iter().map(|s| s.tokens()).sum();
    if total == 0 {
        return w;
    }
    // Walk units alongside row starts.
    let mut ui = 0usize; // unit containing the row start
    let mut unit_off = 0u64; // stream offset of units[ui]
    let mut row_start = 0u64;
    let mut row_buf: Vec<Piece> = Vec::new();
    loop {
        let row_end = (row_start + capacity as u64).min(total);
        // Advance ui to the unit containing row_start.
        while ui < units.len() && unit_off + units[ui].tokens() <= row_start {
            unit_off += units[ui].tokens();
            ui += 1;
        }
        row_buf.clear();
        let (mut j, mut off) = (ui, unit_off);
        while j < units.len() && off < row_end {
            let (unit, base, len) = (units[j].unit(), units[j].base(), units[j].tokens());
            let a = row_start.max(off);
            let b = row_end.min(off + len);
            if b > a {
                row_buf.push(Piece {
                    unit,
                    start: base + a - off,
                    len: (b - a) as u32,
                    whole: S::WHOLE && a == off && b == off + len,
                });
            }
            off += len;
            j += 1;
        }
        w.push_row(row_buf.iter().copied());
        if row_end >= total || row_start + step >= total.saturating_sub(1).max(1) {
            break;
        }
        row_start += step;
    }
    let rows = w.rows.len() as u32;
    if keep_together {
        w.blocks.push(Block { first_row: 0, rows });
    } else {
        w.blocks = (0..rows)
            .map(|r| Block {
                first_row: r,
                rows: 1,
            })
            .collect();
    }
    w
}

/// Best-fit-decreasing (Ding et al. 2024) with an O(1) "smallest bin that fits" lookup:
/// a two-level bitset over free capacities and a FIFO of bins per capacity. Bins are
/// intrusive lists over one piece array, so packing a window allocates a handful of
/// vectors, not one per row.
fn best_fit<S: Span>(units: &[S], capacity: u32, keep_together: bool, chain: bool) -> Window {
    let cap = capacity.max(1);
    let c64 = cap as u64;
    let mut w = Window::default();

    // Every piece that goes into a bin: short units, remainders of long ones.
    let mut pieces: Vec<Piece> = Vec::with_capacity(units.len() + units.len() / 8);
    let mut short: Vec<u32> = Vec::with_capacity(units.len());
    // Long grouped units: (unit, first token, full rows, seeded bin or NIL).
    let mut long: Vec<(u64, u64, u64, u32)> = Vec::new();
    // Full pieces of ungrouped long units, in window order.
    let mut full_rows: Vec<Piece> = Vec::new();
    // With `chain`: units over half a row, (unit, first token, tokens), in window order.
    let mut chained: Vec<(u64, u64, u64)> = Vec::new();
    let mut bins = Bins::default();

    for s in units {
        let (unit, base, len) = (s.unit(), s.base(), s.tokens());
        if len == 0 {
            continue;
        }
        let full = len / c64;
        let rem = (len % c64) as u32;
        // Two units over half a row never share one, so unless short units fill the
        // gap each pads its row: chained, they fill rows back to back.
        if chain && len * 2 > c64 {
            chained.push((unit, base, len));
            continue;
        }
        if full > 0 && keep_together {
            let seed = if rem > 0 {
                pieces.push(Piece {
                    unit,
                    start: base + full * c64,
                    len: rem,
                    whole: false,
                });
                let b = bins.open(cap, true);
                bins.put(b, pieces.len() as u32 - 1, rem);
                b
            } else {
                NIL
            };
            long.push((unit, base, full, seed));
            continue;
        }
        for k in 0..full {
            full_rows.push(Piece {
                unit,
                start: base + k * c64,
                len: cap,
                whole: false,
            });
        }
        if rem > 0 {
            pieces.push(Piece {
                unit,
                start: base + full * c64,
                len: rem,
                whole: S::WHOLE && full == 0,
            });
            short.push(pieces.len() as u32 - 1);
        }
    }

    // The chain: full rows cut from the long units in window order; its partial last
    // row seeds a bin that short units top up.
    let mut chain_rows: Vec<Vec<Piece>> = Vec::new();
    let mut chain_seed = NIL;
    let mut row: Vec<Piece> = Vec::new();
    let mut fill = 0u64;
    for &(unit, base, len) in &chained {
        let mut off = 0;
        while off < len {
            let take = (len - off).min(c64 - fill);
            row.push(Piece {
                unit,
                start: base + off,
                len: take as u32,
                whole: S::WHOLE && off == 0 && take == len,
            });
            (off, fill) = (off + take, fill + take);
            if fill == c64 {
                chain_rows.push(std::mem::take(&mut row));
                fill = 0;
            }
        }
    }
    if !row.is_empty() {
        let b = bins.open(cap, true);
        for p in row {
            pieces.push(p);
            bins.put(b, pieces.len() as u32 - 1, p.len);
        }
        chain_seed = b;
    }

    // Counting sort of the short pieces, longest first; stable so ties keep window order.
    let mut starts = vec![0u32; cap as usize + 2];
    for &i in &short {
        starts[pieces[i as usize].len as usize] += 1;
    }
    let mut acc = 0u32;
    for l in (0..=cap as usize).rev() {
        let c = starts[l];
        starts[l] = acc;
        acc += c;
    }
    let mut sorted = vec![0u32; short.len()];
    for &i in &short {
        let s = &mut starts[pieces[i as usize].len as usize];
        sorted[*s as usize] = i;
        *s += 1;
    }

    let mut free = FreeIndex::new(cap);
    for b in 0..bins.free.len() as u32 {
        let f = bins.free[b as usize];
        if f > 0 {
            free.push(f, b);
        }
    }
    for i in sorted {
        let len = pieces[i as usize].len;
        let b = match free.pop_fitting(len) {
            Some((_, b)) => b,
            None => bins.open(cap, false),
        };
        bins.put(b, i, len);
        let f = bins.free[b as usize];
        if f > 0 {
            free.push(f, b);
        }
    }

    // Rows: the chain (one block), long grouped units (each a block), then ungrouped
    // full rows, then the plain bins; the emission order is shuffled later, so this
    // order only fixes ids.
    if !chain_rows.is_empty() || chain_seed != NIL {
        let first_row = w.rows.len() as u32;
        for r in chain_rows {
            w.push_row(r);
        }
        if chain_seed != NIL {
            w.push_row(bins.iter(chain_seed).map(|i| pieces[i as usize]));
        }
        let rows = w.rows.len() as u32 - first_row;
        w.blocks.push(Block { first_row, rows });
    }
    for &(unit, base, full, seed) in &long {
        let first_row = w.rows.len() as u32;
        for k in 0..full {
            w.push_row([Piece {
                unit,
                start: base + k * c64,
                len: cap,
                whole: false,
            }]);
        }
        if seed != NIL {
            w.push_row(bins.iter(seed).map(|i| pieces[i as usize]));
        }
        let rows = w.rows.len() as u32 - first_row;
        w.blocks.push(Block { first_row, rows });
    }
    for p in full_rows {
        let r = w.push_row([p]);
        w.blocks.push(Block {
            first_row: r,
            rows: 1,
        });
    }
    for b in 0..bins.free.len() as u32 {
        if bins.owned[b as usize] {
            continue;
        }
        let r = w.push_row(bins.iter(b).map(|i| pieces[i as usize]));
        w.blocks.push(Block {
            first_row: r,
            rows: 1,
        });
    }
    w
}

/// Bins as intrusive lists of piece indices.
#[derive(Default)]
struct Bins {
    head: Vec<u32>,
    tail: Vec<u32>,
    free: Vec<u32>,
    owned: Vec<bool>,
    next: Vec<u32>,
}

impl Bins {
    fn open(&mut self, cap: u32, owned: bool) -> u32 {
        self.head.push(NIL);
        self.tail.push(NIL);
        self.free.push(cap);
        self.owned.push(owned);
        self.head.len() as u32 - 1
    }

    fn put(&mut self, b: u32, piece: u32, len: u32) {
        let (bi, pi) = (b as usize, piece as usize);
        if self.next.len() <= pi {
            self.next.resize(pi + 1, NIL);
        }
        self.next[pi] = NIL;
        if self.head[bi] == NIL {
            self.head[bi] = piece;
        } else {
            let t = self.tail[bi] as usize;
            self.next[t] = piece;
        }
        self.tail[bi] = piece;
        self.free[bi] -= len;
    }

    fn iter(&self, b: u32) -> impl Iterator<Item = u32> + '_ {
        let mut at = self.head[b as usize];
        std::iter::from_fn(move || {
            if at == NIL {
                return None;
            }
            let i = at;
            at = self.next[i as usize];
            Some(i)
        })
    }
}

/// Open bins by free capacity: for each capacity a FIFO (intrusive list) of bins, and a
/// two-level bitset of non-empty capacities so "smallest capacity >= len" is a few word
/// scans even at seq_len 32768.
struct FreeIndex {
    head: Vec<u32>,
    tail: Vec<u32>,
    next: Vec<u32>,
    bits: Vec<u64>,
    summary: Vec<u64>,
}

const NIL: u32 = u32::MAX;

impl FreeIndex {
    fn new(cap: u32) -> FreeIndex {
        let n = cap as usize + 1;
        let words = n.div_ceil(64);
        FreeIndex {
            head: vec![NIL; n],
            tail: vec![NIL; n],
            next: Vec::new(),
            bits: vec![0; words],
            summary: vec![0; words.div_ceil(64)],
        }
    }

    fn push(&mut self, free: u32, bin: u32) {
        let f = free as usize;
        let b = bin as usize;
        if self.next.len() <= b {
            self.next.resize(b + 1, NIL);
        }
        self.next[b] = NIL;
        if self.head[f] == NIL {
            self.head[f] = bin;
            self.bits[f / 64] |= 1 << (f % 64);
            self.summary[f / 4096] |= 1 << ((f / 64) % 64);
        } else {
            let t = self.tail[f] as usize;
            self.next[t] = bin;
        }
        self.tail[f] = bin;
    }

    /// Removes and returns the oldest bin with the smallest free capacity >= `len`.
    fn pop_fitting(&mut self, len: u32) -> Option<(u32, u32)> {
        let f = self.find(len as usize)?;
        let bin = self.head[f];
        let nx = self.next[bin as usize];
        self.head[f] = nx;
        if nx == NIL {
            self.tail[f] = NIL;
            self.bits[f / 64] &= !(1 << (f % 64));
            if self.bits[f / 64] == 0 {
                self.summary[f / 4096] &= !(1 << ((f / 64) % 64));
            }
        }
        Some((f as u32, bin))
    }

    fn find(&self, from: usize) -> Option<usize> {
        let mut w = from / 64;
        if w >= self.bits.len() {
            return None;
        }
        let m = self.bits[w] & (u64::MAX << (from % 64));
        if m != 0 {
            return Some(w * 64 + m.trailing_zeros() as usize);
        }
        // Next non-empty word via the summary.
        w += 1;
        let mut s = w / 64;
        while s < self.summary.len() {
            let mask = if s == w / 64 {
                u64::MAX.checked_shl((w % 64) as u32).unwrap_or(0)
            } else {
                u64::MAX
            };
            let m = self.summary[s] & mask;
            if m != 0 {
                let word = s * 64 + m.trailing_zeros() as usize;
                let bits = self.bits[word];
                return Some(word * 64 + bits.trailing_zeros() as usize);
            }
            s += 1;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_cover(units: &[(u64, u64)], w: &Window, cap: u32) {
        let mut covered: Vec<Vec<(u64, u64)>> = vec![Vec::new(); units.len()];
        for r in 0..w.rows.len() as u32 {
            let ps = w.row_pieces(r);
            let t: u32 = ps.iter().map(|p| p.len).sum();
            assert!(t <= cap);
            for p in ps {
                covered[p.unit as usize].push((p.start, p.start + p.len as u64));
            }
        }
        for (i, &(_, len)) in units.iter().enumerate() {
            let mut c = covered[i].clone();
            c.sort();
            let mut at = 0;
            for (a, b) in c {
                assert_eq!(a, at, "unit {i}");
                at = b;
            }
            assert_eq!(at, len, "unit {i}");
        }
    }

    #[test]
    fn best_fit_covers_and_never_cuts_short_units() {
        let units: Vec<(u64, u64)> = (0..500u64)
            .map(|i| (i, (i * 7919 % 300) + if i % 50 == 0 { 1000 } else { 1 }))
            .collect();
        for keep in [false, true] {
            let w = pack(&units, 257, Packing::BestFit, keep);
            check_cover(&units, &w, 257);
            for r in 0..w.rows.len() as u32 {
                for p in w.row_pieces(r) {
                    let len = units[p.unit as usize].1;
                    if len <= 257 {
                        assert_eq!((p.start, p.len as u64), (0, len));
                    }
                }
            }
            let blocks: u32 = w.blocks.iter().map(|b| b.rows).sum();
            assert_eq!(blocks as usize, w.rows.len());
        }
    }

    #[test]
    fn chained_long_units_fill_rows_and_cover() {
        // Long units only (books at a long context): without the chain each pads its
        // last row; chained, only the window's last row is partial. Units over half a
        // row but shorter than one are chained too (two never share a row).
        let units: Vec<(u64, u64)> = (0..40u64).map(|i| (i, 130 + i * 37 % 300)).collect();
        let plain = pack(&units, 257, Packing::BestFit, true);
        let chained = pack_with(&units, 257, Packing::BestFit, true, true);
        check_cover(&units, &chained, 257);
        let partial = |w: &Window| w.rows.iter().filter(|r| r.tokens < 257).count();
        assert!(partial(&plain) > 20, "{}", partial(&plain));
        assert_eq!(partial(&chained), 1);
        assert_eq!(chained.blocks.len(), 1);
        // Short units still top up the chain's last row, then fill bins of their own.
        let mut mixed = units.clone();
        mixed.extend((40..400u64).map(|i| (i, 1 + i % 50)));
        let w = pack_with(&mixed, 257, Packing::BestFit, true, true);
        check_cover(&mixed, &w, 257);
        // Ranges with a first token keep it in their pieces.
        let spans = [(7u64, 100u64, 600u64), (8, 0, 10)];
        let w = pack_with(&spans, 257, Packing::BestFit, true, true);
        let first = w.row_pieces(0)[0];
        assert_eq!((first.unit, first.start, first.len), (7, 100, 257));
    }

    #[test]
    fn concat_rows_overlap_by_one_token() {
        let units: Vec<(u64, u64)> = (0..40u64).map(|i| (i, 1 + i * 13 % 97)).collect();
        let total: u64 = units.iter().map(|u| u.1).sum();
        let w = pack(&units, 65, Packing::Concat, false);
        let mut stream = 0u64;
        for r in 0..w.rows.len() as u32 {
            let t = w.rows[r as usize].tokens as u64;
            if r + 1 < w.rows.len() as u32 {
                assert_eq!(t, 65);
            }
            stream += t - 1;
        }
        assert_eq!(stream + 1, total);
    }

    #[test]
    fn free_index_finds_smallest_fitting() {
        let mut f = FreeIndex::new(10000);
        f.push(9000, 1);
        f.push(70, 2);
        f.push(70, 3);
        f.push(5, 4);
        assert_eq!(f.pop_fitting(6), Some((70, 2)));
        assert_eq!(f.pop_fitting(6), Some((70, 3)));
        assert_eq!(f.pop_fitting(6), Some((9000, 1)));
        assert_eq!(f.pop_fitting(6), None);
        assert_eq!(f.pop_fitting(5), Some((5, 4)));
    }
}
