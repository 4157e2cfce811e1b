//! Keyed pseudo-random permutations of `[0, n)` in O(1) memory: the epoch shuffle.
//!
//! An alternating Feistel network over the smallest bit width that covers `n`, with
//! cycle-walking to stay inside `[0, n)` (Black & Rogaway, "Ciphers with arbitrary finite
//! domains"). Any index maps in O(rounds) with no table, so a 10^10-document domain costs
//! the same to shuffle as a 10-document one, and a resume can jump straight to any
//! position. The round function is the murmur3/splitmix64 finalizer over the half-block
//! xored with a round key: it avalanches fully, unlike the multiply-add rounds that made
//! other loaders' "shuffles" look like sorted data.

/// Rounds of the network. Six full-avalanche rounds leave no measurable structure
/// (tests/plan_props.rs checks rank correlation up to n = 10^7).
const ROUNDS: usize = 6;

/// A bijection on `[0, n)` chosen by a 64-bit key.
#[derive(Debug, Clone)]
pub struct Permutation {
    n: u64,
    /// Bits of the two halves; they swap roles every round (an alternating, possibly
    /// unbalanced Feistel network), so the block is exactly as wide as `n` needs and the
    /// cycle-walk takes under 2 tries on average.
    bits_a: u32,
    bits_b: u32,
    keys: [u64; ROUNDS],
}

/// The splitmix64 output function: a full 64-bit avalanche used both to derive round
/// keys and as the round function.
#[inline]
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// One full SplitMix64 step (add the golden gamma, then [`mix64`]): turns structured
/// keys into independent seeds. The plan's keys and `millrace synth`'s document seeds
/// both use it, so it is written once, here, where the pure code lives.
#[inline]
pub fn splitmix64(z: u64) -> u64 {
    mix64(z.wrapping_add(0x9e37_79b9_7f4a_7c15))
}

/// Derives a key from a list of words, so that every use of randomness (epoch order,
/// window order, batch positions) is keyed by exactly what it depends on.
pub fn derive_key(words: &[u64]) -> u64 {
    let mut h = 0x6d69_6c6c_7261_6365u64; // "millrace"
    for &w in words {
        h = mix64(h ^ splitmix64(w));
    }
    h
}

/// Hashes a name (a domain) into a key word, so keys follow names rather than the order
/// domains are listed in.
pub fn name_key(name: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64(name.as_bytes())
}

impl Permutation {
    /// The permutation of `[0, n)` selected by `key`. `n = 0` gives an empty permutation.
    pub fn new(n: u64, key: u64) -> Permutation {
        // Smallest width w >= 2 with 2^w >= n.
        let bits = (64 - n.saturating_sub(1).leading_zeros()).max(2);
        let bits_a = bits / 2;
        let bits_b = bits - bits_a;
        let mut keys = [0u64; ROUNDS];
        let mut k = key;
        for slot in keys.iter_mut() {
            k = k.wrapping_add(0x9e37_79b9_7f4a_7c15);
            *slot = mix64(k);
        }
        Permutation {
            n,
            bits_a,
            bits_b,
            keys,
        }
    }

    /// The size of the domain.
    pub fn len(&self) -> u64 {
        self.n
    }

    /// True for the empty permutation.
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// Where `i` goes. `i` must be below `len()`; larger inputs are reduced modulo `len()`
    /// so that a caller bug can never loop forever or panic.
    #[inline]
    pub fn apply(&self, i: u64) -> u64 {
        if self.n <= 1 {
            return 0;
        }
        let mut x = if i < self.n { i } else { i % self.n };
        loop {
            x = self.encrypt(x);
            if x < self.n {
                return x;
            }
        }
    }

    /// [`Permutation::apply`] of every position in `start..end`, appended to `out`, four
    /// at a time: the four networks' rounds are independent, so the CPU overlaps their
    /// multiplies instead of waiting on one chain of them (a window's units are its
    /// consecutive positions). A lane that has left the cycle-walk keeps its value while
    /// the others walk on.
    pub fn apply_range(&self, start: u64, end: u64, out: &mut Vec<u64>) {
        out.reserve(end.saturating_sub(start) as usize);
        let mut i = start;
        if self.n > 1 {
            while end.saturating_sub(i) >= 4 {
                let mut x =
                    [i, i + 1, i + 2, i + 3].map(|v| if v < self.n { v } else { v % self.n });
                let mut done = [false; 4];
                while !done.iter().all(|&d| d) {
                    let y = x.map(|v| self.encrypt(v));
                    for k in 0..4 {
                        if !done[k] {
                            x[k] = y[k];
                            done[k] = y[k] < self.n;
                        }
                    }
                }
                out.extend_from_slice(&x);
                i += 4;
            }
        }
        out.extend((i..end).map(|j| self.apply(j)));
    }

    /// One pass of the network over a `bits_a + bits_b`-bit block. The state is
    /// `(hi, lo)` with `lo` of `lb` bits; a round maps it to `(lo, hi ^ F(lo))`, which
    /// swaps the halves' widths, and is invertible because `lo` survives intact.
    #[inline]
    fn encrypt(&self, x: u64) -> u64 {
        let (mut la, mut lb) = (self.bits_a, self.bits_b);
        let mut x = x;
        for &k in &self.keys {
            let lo = x & mask(lb);
            let hi = x >> lb;
            let f = mix64(lo ^ k) & mask(la);
            x = (lo << la) | (hi ^ f);
            std::mem::swap(&mut la, &mut lb);
        }
        x
    }
}

#[inline]
fn mask(bits: u32) -> u64 {
    if bits >= 64 {
        u64::MAX
    } else {
        (1u64 << bits) - 1
    }
}

/// One re-shuffle of the tail of a sequence: positions at or after `start` are permuted
/// again by `key`. A reseed (loss-spike recovery) appends one, which reorders what is
/// left of an epoch without repeating or dropping anything already planned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reshuffle {
    /// First position affected.
    pub start: u64,
    /// Key of the tail permutation.
    pub key: u64,
}

/// Maps position `i` of a sequence of length `n` through every reshuffle of its tail, the
/// latest first, then through `base`. With no reshuffles this is `base.apply(i)`.
pub fn chained(base: &Permutation, chain: &[Reshuffle], i: u64) -> u64 {
    let n = base.len();
    let mut x = i;
    for r in chain.iter().rev() {
        if x >= r.start && r.start < n {
            x = r.start + Permutation::new(n - r.start, r.key).apply(x - r.start);
        }
    }
    base.apply(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Plans (and synth corpora, which share [`splitmix64`]) are pinned: these are the
    /// reference SplitMix64 output for state 0 and the key chain as first written.
    #[test]
    fn hashes_are_pinned() {
        assert_eq!(splitmix64(0), 0xe220_a839_7b1d_cdaf);
        assert_eq!(derive_key(&[1, 2, 3]), 0xa3fa_f38a_e2e7_4ee2);
    }

    #[test]
    fn bijection_small_sizes() {
        for n in 0..300u64 {
            for key in [0u64, 1, 0xdead_beef] {
                let p = Permutation::new(n, key);
                let mut seen = vec![false; n as usize];
                for i in 0..n {
                    let j = p.apply(i);
                    assert!(j < n, "n={n} i={i} -> {j}");
                    assert!(!seen[j as usize], "n={n}: {j} hit twice");
                    seen[j as usize] = true;
                }
            }
        }
    }

    /// The four-lane range gives exactly what one `apply` per position gives, at sizes
    /// where the cycle-walk takes many tries, and with a ragged end.
    #[test]
    fn apply_range_matches_apply() {
        for n in [0u64, 1, 2, 3, 5, 17, 129, 1000, 65537, 1 << 20] {
            for key in [0u64, 9] {
                let p = Permutation::new(n, key);
                for (a, b) in [(0, n), (1, n.min(7)), (n / 3, n)] {
                    let mut got = Vec::new();
                    p.apply_range(a, b, &mut got);
                    let want: Vec<u64> = (a..b).map(|i| p.apply(i)).collect();
                    assert_eq!(got, want, "n={n} key={key} {a}..{b}");
                }
            }
        }
    }

    #[test]
    fn keys_give_different_orders() {
        let a = Permutation::new(1000, 1);
        let b = Permutation::new(1000, 2);
        let same = (0..1000).filter(|&i| a.apply(i) == b.apply(i)).count();
        assert!(same < 10, "{same} fixed agreements");
    }

    #[test]
    fn chain_is_bijective_and_keeps_prefix() {
        let n = 500;
        let base = Permutation::new(n, 7);
        let chain = [
            Reshuffle { start: 100, key: 9 },
            Reshuffle {
                start: 333,
                key: 11,
            },
        ];
        let mut seen = vec![false; n as usize];
        for i in 0..n {
            let j = chained(&base, &chain, i);
            if i < 100 {
                assert_eq!(j, base.apply(i));
            }
            assert!(!seen[j as usize]);
            seen[j as usize] = true;
        }
    }

    #[test]
    fn huge_domain_is_total() {
        let p = Permutation::new(u64::MAX, 3);
        for i in [0, 1, u64::MAX - 1, 1 << 63] {
            assert!(p.apply(i) < u64::MAX);
        }
    }
}
