//! Small helpers that several commands (and the tests) share: number formatting for
//! tables people read, the count parser every size flag uses (`1e9`, `10G`), the default token dtype, and the child-process harness. They
//! used to live in whichever module first needed them (inspect, ctl, synth, demo), so
//! every other user reached into an unrelated command for them; here they have one home
//! that depends on nothing but the corpus types.

pub mod harness;

use crate::corpus::DType;

/// `12345678` -> `12,345,678`, for tables people read.
pub fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// `1234567` as `1.23M`: rates in a narrow column (the top view, tokenize progress).
pub fn si(v: f64) -> String {
    let a = v.abs();
    if a >= 1e9 {
        format!("{:.2}G", v / 1e9)
    } else if a >= 1e6 {
        format!("{:.2}M", v / 1e6)
    } else if a >= 1e3 {
        format!("{:.1}k", v / 1e3)
    } else {
        format!("{v:.1}")
    }
}

/// Default output dtype for a vocabulary, by Megatron's rule (uint16 below 65,500 ids).
pub fn default_dtype(vocab: u32) -> DType {
    if vocab < 65500 {
        DType::Uint16
    } else {
        DType::Int32
    }
}

/// Parses counts such as `1e9`, `2.5e8`, `10G`, `500M`, `1_000_000`.
pub fn parse_count(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim().replace('_', "");
    let (num, mul) = match t.chars().last() {
        Some('K' | 'k') => (&t[..t.len() - 1], 1e3),
        Some('M' | 'm') => (&t[..t.len() - 1], 1e6),
        Some('G' | 'g' | 'B' | 'b') => (&t[..t.len() - 1], 1e9),
        Some('T' | 't') => (&t[..t.len() - 1], 1e12),
        _ => (t.as_str(), 1.0),
    };
    if let Ok(n) = num.parse::<u64>() {
        return (mul as u64)
            .checked_mul(n)
            .ok_or_else(|| format!("{s:?} is too large"));
    }
    let v: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a count (try 1e9, 500M, 10G)"))?;
    let v = v * mul;
    if !(v.is_finite() && (0.0..1.8e19).contains(&v)) || v.fract() != 0.0 {
        return Err(format!("{s:?} is not a whole, non-negative count"));
    }
    Ok(v as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousands_separators() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(1234567), "1,234,567");
    }

    #[test]
    fn si_prefixes() {
        assert_eq!(si(999.0), "999.0");
        assert_eq!(si(1500.0), "1.5k");
        assert_eq!(si(1_234_567.0), "1.23M");
        assert_eq!(si(2.5e9), "2.50G");
    }

    #[test]
    fn megatron_dtype_rule() {
        assert_eq!(default_dtype(50304), DType::Uint16);
        assert_eq!(default_dtype(65500), DType::Int32);
    }

    #[test]
    fn counts_parse() {
        assert_eq!(parse_count("1e9"), Ok(1_000_000_000));
        assert_eq!(parse_count("2.5e3"), Ok(2500));
        assert_eq!(parse_count("10G"), Ok(10_000_000_000));
        assert_eq!(parse_count("1_000"), Ok(1000));
        assert!(parse_count("1.5").is_err());
        assert!(parse_count("-3").is_err());
        assert!(parse_count("abc").is_err());
    }
}
