//! Small helpers that several commands (and the tests) share: number formatting for
//! tables people read, the count parser every size flag uses (`1e9`, `10G`), the default
//! token dtype, the bounded read of a regular file, and the child-process harness. They
//! used to live in whichever module first needed them (inspect, ctl, synth, demo), so
//! every other user reached into an unrelated command for them; here they have one home
//! that depends on nothing but the corpus types.

pub mod harness;

use std::path::Path;

use crate::corpus::DType;

/// The bytes of `path`, which must be a regular file (of at most `max` bytes, when
/// given: the size of the largest `what` there can be, named in the refusal). Opened
/// without blocking and judged by the open file, so that a FIFO (whose open waits for a
/// writer) or a device (`/dev/zero`: endless) under the name of a config, a cache entry
/// or a checkpoint is an error at once, not a read that never returns or never ends:
/// each of those once hung a reload, a seek or a start. Errors of the file's kind or
/// size are `InvalidData` ("it is a FIFO, not a regular file").
pub fn read_regular(path: &Path, max: Option<(u64, &str)>) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let invalid = |what: String| std::io::Error::new(std::io::ErrorKind::InvalidData, what);
    // Non-blocking, so that opening a FIFO does not wait for a writer; it changes
    // nothing for a regular file's reads.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        let what = crate::corpus::file_kind(&meta.file_type());
        return Err(invalid(format!("it is {what}, not a regular file")));
    }
    let (max, what) = max.unwrap_or((u64::MAX, "a file"));
    if meta.len() > max {
        return Err(invalid(format!(
            "it is {} bytes, more than {what} may be ({max})",
            meta.len()
        )));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    // Bounded again: the file may grow between the stat and the read.
    file.take(max.saturating_add(1)).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max {
        return Err(invalid(format!(
            "it grew past {max} bytes while being read"
        )));
    }
    Ok(bytes)
}

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
