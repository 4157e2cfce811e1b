//! How a slot's token ids are written: copied or converted into the slot's dtype, and
//! checked against the vocabulary in the same pass (docs/DESIGN.md, "A slot is filled
//! in two passes"). The fill (the parent module) calls these once per span.

use crate::corpus::Tokens;

/// Integer element types a slot may hold tokens in.
pub(super) trait Out: bytemuck::Pod + Ord {
    /// The type's smallest and largest values, as i64 (for the vocabulary check).
    const LO: i64;
    const HI: i64;
    fn from_i64(v: i64) -> Self;
    fn to_i64(self) -> i64;
    /// Whether some id of `ids` is outside `0..limit`.
    fn any_outside(ids: &[Self], limit: u64) -> bool;
    /// Copies `src` into `dst` (same length) and returns whether some id of it is
    /// outside `0..limit`: the check rides in the copy's one pass over the ids
    /// ([`copy_checked`]).
    fn copy_outside(src: &[Self], dst: &mut [Self], limit: u64) -> bool;
}
macro_rules! out {
    ($($t:ident),*) => {$(impl Out for $t {
        const LO: i64 = <$t>::MIN as i64;
        const HI: i64 = <$t>::MAX as i64;
        #[inline(always)] fn from_i64(v: i64) -> Self { v as $t }
        #[inline(always)] fn to_i64(self) -> i64 { self as i64 }
        fn any_outside(ids: &[Self], limit: u64) -> bool {
            out_of_bounds!($t, ids, ids, limit)
        }
        fn copy_outside(src: &[Self], dst: &mut [Self], limit: u64) -> bool {
            out_of_bounds!($t, src, dst, limit)
        }
    })*};
}
// Unsigned ids cannot be negative, so only `id > limit - 1` matters: an OR of saturating
// differences (one `psubusw` per 8 ids on plain x86-64, where an unsigned 16-bit max
// needs SSE4.1). Signed ones take the min and the max. `$src` is folded; when `$dst` is
// another slice, `$src` is copied into it in the same loop ([`copy_checked`]).
macro_rules! out_of_bounds {
    (u8, $src:expr, $dst:expr, $limit:expr) => {
        unsigned_outside::<u8>($src, $dst, $limit, |a, b| a.saturating_sub(b))
    };
    (u16, $src:expr, $dst:expr, $limit:expr) => {
        unsigned_outside::<u16>($src, $dst, $limit, |a, b| a.saturating_sub(b))
    };
    (u32, $src:expr, $dst:expr, $limit:expr) => {
        unsigned_outside::<u32>($src, $dst, $limit, |a, b| a.saturating_sub(b))
    };
    ($t:ty, $src:expr, $dst:expr, $limit:expr) => {
        min_max($src, $dst).is_some_and(|(lo, hi)| lo.to_i64() < 0 || hi.to_i64() as u64 >= $limit)
    };
}
out!(u8, i8, i16, u16, i32, u32, i64);

/// Where a vocabulary fold puts the ids it reads: nowhere (a check of ids already in
/// place), or a slice of the same length (the copy and the check in one pass).
trait Sink<T> {
    /// Folds every id of `src` with `f`, copying them into the sink on the way.
    fn fold<A: Copy>(self, src: &[T], init: A, f: impl Fn(A, T) -> A) -> A;
}
impl<T: Copy> Sink<T> for &[T] {
    #[inline(always)]
    fn fold<A: Copy>(self, src: &[T], init: A, f: impl Fn(A, T) -> A) -> A {
        src.iter().fold(init, |a, &v| f(a, v))
    }
}
impl<T: Copy> Sink<T> for &mut [T] {
    #[inline(always)]
    fn fold<A: Copy>(self, src: &[T], init: A, f: impl Fn(A, T) -> A) -> A {
        copy_checked(src, self, init, f)
    }
}

/// Copies `src` into `dst` (the shorter length) while folding every id with `f`: one
/// vector load of the source feeds both the store and the fold, where a `memcpy` then a
/// check of the destination read every span twice (that check, 16 bytes at a time and
/// waiting on the copy's stores, was two thirds of the compact fill's own time). With
/// AVX2 (detected at run time, [`crate::sys::with_avx2`]) the loop goes 32 bytes wide;
/// the build stays baseline x86-64 (16 bytes) and other targets compile the same loop.
#[inline(always)]
fn copy_checked<T: Copy, A: Copy>(src: &[T], dst: &mut [T], init: A, f: impl Fn(A, T) -> A) -> A {
    /// The loop, a function of its own so that `src` and `dst` keep their promise not
    /// to alias: captured by the closure they lost it, and the loop stayed scalar.
    #[inline(always)]
    fn body<T: Copy, A: Copy>(src: &[T], dst: &mut [T], init: A, f: impl Fn(A, T) -> A) -> A {
        let mut acc = init;
        for (d, &v) in dst.iter_mut().zip(src) {
            *d = v;
            acc = f(acc, v);
        }
        acc
    }
    crate::sys::with_avx2(
        #[inline(always)]
        || body(src, dst, init, f),
    )
}

/// [`Out::any_outside`] (`dst` the ids themselves) or [`Out::copy_outside`] (`dst` the
/// slice to copy `src` into) for an unsigned `T`; `sub` is its saturating subtraction.
fn unsigned_outside<T: Out + std::ops::BitOr<Output = T>>(
    src: &[T],
    dst: impl Sink<T>,
    limit: u64,
    sub: impl Fn(T, T) -> T,
) -> bool {
    let zero = T::from_i64(0);
    let Some(max) = limit.checked_sub(1) else {
        dst.fold(src, zero, |a, _| a);
        return !src.is_empty();
    };
    if limit > T::HI as u64 {
        dst.fold(src, zero, |a, _| a);
        return false;
    }
    let max = T::from_i64(max as i64);
    dst.fold(src, zero, |acc, v| acc | sub(v, max)) != zero
}

/// Whether some id a `T` can hold is outside `0..limit`: if not, a span copied in `T`
/// needs no check at all (uint16 shards with a vocabulary of 65536 or more, or none).
pub(super) fn needs_check<T: Out>(limit: u64) -> bool {
    T::LO < 0 || (T::HI as u64) >= limit
}

/// Whether some id of `ids` (already copied into the slot, so in cache) is outside
/// `0..limit` ([`Out::any_outside`]).
pub(super) fn out_of_range<T: Out>(ids: &[T], limit: u64) -> bool {
    T::any_outside(ids, limit)
}

/// Both bounds of `ids` in one fold, which vectorizes (`Iterator::min` and `max` did
/// not: 2x slower), copying them into `dst` on the way when it is a slice ([`Sink`]).
fn min_max<T: Out>(ids: &[T], dst: impl Sink<T>) -> Option<(T, T)> {
    let first = *ids.first()?;
    Some(dst.fold(ids, (first, first), |(lo, hi), v| (lo.min(v), hi.max(v))))
}

/// Converts `src` into `dst` (same length) and, with `CHECK`, returns whether some id
/// was outside `0..limit` (the dtype check at start-up guarantees the values fit `T`).
/// The range check rides in the conversion loop as a running min and max in the stored
/// type (one `pmin`/`pmax` per vector of tokens, vectorized with the conversion) instead
/// of a second pass over the tokens; a per-token compare widened to u64 halved the fill's
/// speed. Without `CHECK` the min and max are dead code and compiled out.
pub(super) fn convert<T: Out, const CHECK: bool>(
    src: Tokens<'_>,
    dst: &mut [T],
    limit: u64,
) -> bool {
    macro_rules! int {
        ($s:expr, $t:ty) => {{
            let (mut lo, mut hi) = (<$t>::MAX, <$t>::MIN);
            for (d, &v) in dst.iter_mut().zip($s) {
                *d = T::from_i64(v as i64);
                if CHECK {
                    lo = lo.min(v);
                    hi = hi.max(v);
                }
            }
            CHECK && !$s.is_empty() && ((lo as i64) < 0 || hi as i64 as u64 >= limit)
        }};
    }
    // Float dtypes are never meant for ids: convert and compare token by token.
    macro_rules! float {
        ($s:expr) => {{
            let mut bad = false;
            for (d, &v) in dst.iter_mut().zip($s) {
                let w = v as i64;
                *d = T::from_i64(w);
                bad |= CHECK && w as u64 >= limit;
            }
            bad
        }};
    }
    match src {
        Tokens::Uint8(s) => int!(s, u8),
        Tokens::Int8(s) => int!(s, i8),
        Tokens::Int16(s) => int!(s, i16),
        Tokens::Uint16(s) => int!(s, u16),
        Tokens::Int32(s) => int!(s, i32),
        Tokens::Uint32(s) => int!(s, u32),
        Tokens::Int64(s) => int!(s, i64),
        Tokens::Float32(s) => float!(s),
        Tokens::Float64(s) => float!(s),
    }
}

/// The first id of `t` outside `0..limit`, with its index: the slow path that words the
/// error once [`convert`] has found one.
pub(super) fn first_out_of_range(t: Tokens<'_>, limit: u64) -> Option<(usize, i64)> {
    (0..t.len()).find_map(|i| {
        let v = t.get_i64(i)?;
        (v as u64 >= limit).then_some((i, v))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// uint32 ids converted into int32 slots (allowed when `vocab_size` is at most 2^31,
    /// `TokenType::choose`): an id at or above the vocabulary, one that would wrap
    /// negative among them, is found on the source value, not the truncated one.
    #[test]
    fn a_uint32_id_past_the_vocabulary_is_found_before_it_wraps_in_int32() {
        let mut dst = [0i32; 3];
        assert!(!convert::<i32, true>(
            Tokens::Uint32(&[5, 100_277, 0]),
            &mut dst,
            100_278
        ));
        assert_eq!(dst, [5, 100_277, 0]);
        assert!(convert::<i32, true>(
            Tokens::Uint32(&[5, 3_000_000_000, 0]),
            &mut dst,
            100_278
        ));
        assert!(convert::<i32, true>(
            Tokens::Uint32(&[1 << 31]),
            &mut dst,
            1 << 31
        ));
        let err = first_out_of_range(Tokens::Uint32(&[7, 3_000_000_000]), 100_278);
        assert_eq!(err, Some((1, 3_000_000_000)));
    }

    /// The fused copy and check ([`Out::copy_outside`]) copies every id and finds an
    /// out-of-range one wherever it lies, at every alignment of source and destination
    /// and every length 0..=70 (the vector loop, its tail, and spans shorter than one
    /// vector); it agrees with the check alone.
    #[test]
    fn the_fused_copy_finds_an_out_of_range_id_at_every_position_and_alignment() {
        fn each<T: Out + std::fmt::Debug>(limit: u64, ok: T, bad: T) {
            let n_align = 32 / std::mem::size_of::<T>();
            for len in 0..=70usize {
                for (a, b) in (0..n_align).map(|a| (a, (a * 3 + 1) % n_align)) {
                    for at in std::iter::once(None).chain((0..len).map(Some)) {
                        let mut src = vec![ok; a + len];
                        let ids = &mut src[a..];
                        for (i, v) in ids.iter_mut().enumerate() {
                            // Distinct in-range ids, so a missed or misplaced copy shows.
                            *v = T::from_i64((i as i64 * 7) % (limit as i64).min(T::HI));
                        }
                        if let Some(at) = at {
                            ids[at] = bad;
                        }
                        let mut dst = vec![ok; b + len + 3];
                        let got = T::copy_outside(ids, &mut dst[b..b + len], limit);
                        assert_eq!(got, at.is_some(), "{len} ids at +{a}/+{b}, bad at {at:?}");
                        assert_eq!(got, out_of_range(ids, limit));
                        assert_eq!(&dst[b..b + len], &*ids, "{len} ids at +{a}/+{b}");
                        assert!(dst[..b].iter().chain(&dst[b + len..]).all(|&v| v == ok));
                    }
                }
            }
        }
        each::<u16>(1000, 3, 1000);
        each::<u16>(1000, 3, u16::MAX);
        each::<u16>(1, 0, 1);
        each::<u8>(200, 3, 255);
        each::<u32>(50304, 3, 50304);
        each::<i16>(1000, 3, -1);
        each::<i32>(50304, 3, i32::MIN);
        each::<i64>(1 << 63, 3, -5);
        // No id fits a vocabulary of 0; a uint16 one fits one of 2^16 or more.
        let mut dst = [0u16; 2];
        assert!(u16::copy_outside(&[0, 0], &mut dst, 0));
        assert!(!u16::copy_outside(&[9, u16::MAX], &mut dst, 1 << 16));
        assert_eq!(dst, [9, u16::MAX]);
        assert!(!u16::copy_outside(&[], &mut [], 0));
    }
}
