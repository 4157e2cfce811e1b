//! Memory mappings against the kernel's per-process limit (`vm.max_map_count`, 65530 by
//! default). Every shard is mapped twice (a Megatron shard's `.bin` and `.idx`; a raw
//! file and its boundary cache; a group sidecar only while it is read), so a corpus of
//! about 32,000 shards used the whole limit: the next mmap failed with a bare "Cannot
//! allocate memory", or an allocation of another thread failed and the process aborted
//! with no word about the cause (a review's 33,000-shard corpus, every command). A start
//! now says how many mappings the corpus needs and how to raise the limit, and an ENOMEM
//! from mmap near the limit names it.

use std::path::Path;

/// Mappings kept free of the corpus: each trainer's ring and release page, thread
/// stacks, the allocator's arenas, libraries. A daemon whose corpus left ~1,400 served
/// 715 rings and refused the rest.
pub const MAPPING_RESERVE: u64 = 4096;

/// The kernel's limit on this process's mappings and how many it has now; `None` where
/// /proc cannot tell (then nothing is checked).
pub fn mapping_counts() -> Option<(u64, u64)> {
    let limit = std::fs::read_to_string("/proc/sys/vm/max_map_count").ok()?;
    let limit = limit.trim().parse().ok()?;
    let maps = std::fs::read(Path::new("/proc/self/maps")).ok()?;
    let in_use = maps.iter().filter(|&&b| b == b'\n').count() as u64;
    Some((limit, in_use))
}

/// Why `needed` more mappings (a corpus of `shards` shards) leave fewer than
/// [`MAPPING_RESERVE`] of the limit, if they do.
pub fn mapping_problem(shards: usize, needed: u64) -> Option<String> {
    let (limit, in_use) = mapping_counts()?;
    let want = in_use + needed + MAPPING_RESERVE;
    (want > limit).then(|| {
        format!(
            "its {shards} shards need {needed} memory mappings, and with the {in_use} this \
             process has and {MAPPING_RESERVE} kept for rings and threads that passes the \
             kernel's limit of {limit} (vm.max_map_count): raise it (`sysctl -w \
             vm.max_map_count={}`, and in /etc/sysctl.d to keep it), or merge shards",
            want.next_power_of_two().max(262_144)
        )
    })
}

/// What to add to an ENOMEM of mmap (or memfd) when this process is at its mapping
/// limit, if it is: a bare "Cannot allocate memory" there says nothing about the cause.
pub fn limit_note() -> Option<String> {
    let (limit, in_use) = mapping_counts()?;
    (in_use + 64 >= limit).then(|| {
        format!(
            "this process has {in_use} memory mappings, at the kernel's limit of {limit} \
             (vm.max_map_count; raise it with sysctl)"
        )
    })
}

/// `e` from an mmap, with [`limit_note`] when it is ENOMEM at the limit.
pub fn explain_enomem(e: std::io::Error) -> std::io::Error {
    match (e.raw_os_error(), limit_note()) {
        (Some(libc::ENOMEM), Some(note)) => std::io::Error::new(e.kind(), format!("{e}: {note}")),
        _ => e,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// /proc gives both counts, with room; a corpus needing the whole limit is refused
    /// naming the sysctl and a value that fits; ENOMEM is explained only near the limit.
    #[test]
    fn the_mapping_limit_is_read_and_named() {
        let Some((limit, in_use)) = mapping_counts() else {
            eprintln!("skipped: no /proc/sys/vm/max_map_count");
            return;
        };
        assert!(in_use > 0 && in_use < limit, "{in_use} of {limit}");
        assert_eq!(mapping_problem(10, 20), None);
        let why = mapping_problem(40_000, limit).expect("a corpus of the whole limit");
        assert!(
            why.contains("40000 shards") && why.contains("vm.max_map_count="),
            "{why}"
        );
        let e = explain_enomem(std::io::Error::from_raw_os_error(libc::ENOMEM));
        assert!(!e.to_string().contains("max_map_count"), "{e}");
    }
}
