//! The ring-memory budget's default: a share of the memory this daemon may use, read
//! from /proc/meminfo and its cgroup's limit, so an unconfigured daemon cannot be talked
//! into pre-faulting rings until the node (or its unit) runs out of memory.

use std::path::Path;

/// The default budget is this fraction (1/N) of the memory limit: rings are the
/// daemon's only large allocation, and the trainers on the node need the rest.
pub const DEFAULT_SHARE: u64 = 4;
/// The budget when no limit can be read (no /proc): 4 GiB.
pub const FALLBACK: u64 = 4 << 30;

/// `[serve] ring_memory_bytes` when it is not set: [`DEFAULT_SHARE`] of [`memory_limit`].
pub fn default_ring_budget() -> u64 {
    memory_limit().map_or(FALLBACK, |m| m / DEFAULT_SHARE)
}

/// The smaller of the machine's MemTotal and this process's cgroup memory limit
/// (v2 `memory.max`, or v1 `memory.limit_in_bytes`), in bytes.
pub fn memory_limit() -> Option<u64> {
    let total = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| mem_total(&t));
    let cgroup = std::fs::read_to_string("/proc/self/cgroup")
        .ok()
        .and_then(|t| cgroup_limit(&t, Path::new("/sys/fs/cgroup")));
    match (total, cgroup) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// MemTotal from /proc/meminfo text, in bytes.
fn mem_total(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kb.checked_mul(1024)
}

/// The memory limit of the cgroup named in /proc/self/cgroup text, under `root`; `None`
/// when unlimited ("max", or v1's huge sentinel) or unreadable.
fn cgroup_limit(proc_cgroup: &str, root: &Path) -> Option<u64> {
    for line in proc_cgroup.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let rel = path.trim_start_matches('/');
        let file = if controllers.is_empty() {
            root.join(rel).join("memory.max")
        } else if controllers.split(',').any(|c| c == "memory") {
            root.join("memory").join(rel).join("memory.limit_in_bytes")
        } else {
            continue;
        };
        if let Some(v) = std::fs::read_to_string(file)
            .ok()
            .and_then(|t| t.trim().parse::<u64>().ok())
        {
            // cgroup v1 says "unlimited" with a number near 2^63.
            if v < 1 << 60 {
                return Some(v);
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_and_cgroup_limits_are_read() {
        assert_eq!(
            mem_total("MemTotal:       16315520 kB\nMemFree: 1 kB\n"),
            Some(16315520 * 1024)
        );
        assert_eq!(mem_total("MemFree: 1 kB\n"), None);
        let root = tempfile::tempdir().unwrap();
        let unit = root.path().join("system.slice/millrace.service");
        std::fs::create_dir_all(&unit).unwrap();
        std::fs::write(unit.join("memory.max"), "8589934592\n").unwrap();
        assert_eq!(
            cgroup_limit("0::/system.slice/millrace.service\n", root.path()),
            Some(8 << 30)
        );
        std::fs::write(unit.join("memory.max"), "max\n").unwrap();
        assert_eq!(
            cgroup_limit("0::/system.slice/millrace.service\n", root.path()),
            None
        );
        let v1 = root.path().join("memory/user.slice");
        std::fs::create_dir_all(&v1).unwrap();
        std::fs::write(v1.join("memory.limit_in_bytes"), "1073741824\n").unwrap();
        assert_eq!(
            cgroup_limit("4:cpu:/x\n3:memory:/user.slice\n", root.path()),
            Some(1 << 30)
        );
        assert!(default_ring_budget() > 0);
    }
}
