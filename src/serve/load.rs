//! What `millrace serve` loads and checks before it binds: the config, `[serve]`, the
//! shards and plan, the token type, the socket group. `check-config` runs the same steps,
//! validates every shard in full and stops there, so a unit's ExecStartPre fails where
//! `serve` would; `serve` validates in the background after READY
//! ([`validate_in_background`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Result};

use super::access;
use super::fill::describe_fault;
use super::ring::{Layout, TokenType};
use crate::config::serve::{socket_problem, ServeConfig};
use crate::config::Config;
use crate::corpus::Shard;
use crate::wire::SlotLayout;
use tracing::{error, info};

/// Arguments of `millrace check-config`.
#[derive(clap::Args, Debug)]
pub struct CheckArgs {
    /// The config file to check.
    #[arg(long)]
    pub config: PathBuf,
    /// Also read each document's last token and warn where it is not `eod_token`, as
    /// `millrace plan` does. Off by default: it touches one page of `.bin` per document,
    /// which the unit's ExecStartPre must not pay at every start on a large corpus.
    #[arg(long)]
    pub check_eod: bool,
}

/// What `millrace serve` loads before it binds: the config, `[serve]`, the validated
/// shards and plan, and the token type. `check-config` stops here.
pub(super) struct Loaded {
    pub(super) cfg: Config,
    pub(super) hash: u64,
    pub(super) serve: ServeConfig,
    pub(super) plan: Arc<crate::plan::Plan>,
    pub(super) shards: Vec<Vec<Arc<crate::corpus::Shard>>>,
    pub(super) token: TokenType,
}

/// Reads and checks everything `serve` needs before it binds. `validate` adds the full
/// pass over every index (`check-config`); `serve` leaves it to the background check
/// after READY, so that its start grows with shards, not documents.
pub(super) fn load(config: &Path, validate: bool) -> Result<Loaded> {
    use crate::corpus::guard;
    // Guarded from the first mapping on: a shard truncated while the corpus opens (a
    // copy over it with `rsync --inplace` during a restart) faults into zeros here, and
    // the start fails naming it, instead of dying of SIGBUS with nothing in the log.
    guard::protect_every_mapping();
    let mark = guard::zeroed_pages();
    let entered = guard::enter();
    let loaded = load_unguarded(config, validate);
    drop(entered);
    let Some(addr) = guard::fault_since_in(mark, |_| true) else {
        return loaded;
    };
    // The zeros read may have passed for data (an identity hash, lengths): nothing of
    // this load is used.
    let (loaded, failed) = match loaded {
        Ok(l) => (Some(l), String::new()),
        Err(e) => (None, format!(" (the open then failed: {e:#})")),
    };
    let file = loaded.and_then(|l| {
        let shards = l.shards.iter().flatten();
        shards.into_iter().find_map(|s| {
            let hit = s.mappings().into_iter().any(|m| {
                let start = m.as_ptr() as usize;
                (start..start + m.len()).contains(&addr)
            });
            hit.then(|| s.path().display().to_string())
        })
    });
    bail!(
        "{}: {} shrank while the daemon opened the corpus (a read faulted on it); a shard \
         must not be modified in place while it is in use. Start again once it is whole{failed}",
        config.display(),
        file.map_or("a shard file".to_string(), |f| format!("shard {f}"))
    )
}

/// [`load`] without its guard.
fn load_unguarded(config: &Path, validate: bool) -> Result<Loaded> {
    let (cfg, hash) = Config::load_hashed(config)?;
    let serve = ServeConfig::from_config(&cfg)?;
    let loaded = if validate {
        cfg.load_plan_validated()?
    } else {
        cfg.load_plan()?
    };
    if let Some(why) = loaded
        .shards
        .iter()
        .flatten()
        .find_map(|s| s.float_tokens().map(|e| e.to_string()))
    {
        bail!("{}: {why}", cfg.source.display());
    }
    let dtypes: Vec<(String, crate::corpus::DType)> = loaded
        .plan
        .domain_names()
        .iter()
        .zip(&loaded.shards)
        .flat_map(|(n, shards)| shards.iter().map(move |s| (n.to_string(), s.dtype())))
        .collect();
    let token = start_problem(&serve, &dtypes, &loaded.plan)
        .map_err(|why| anyhow::anyhow!("{}: {why}", cfg.source.display()))?;
    Ok(Loaded {
        cfg,
        hash,
        serve,
        plan: loaded.plan,
        shards: loaded.shards,
        token,
    })
}

/// What a start refuses in `[serve]` over shards of `dtypes` (domain, dtype) and `plan`:
/// a `token_dtype` that does not hold the ids, a `pad_token` that a slot's dtype cannot
/// hold, a ring budget that holds no ring, a `socket_group` the daemon cannot give the
/// socket to. `serve`, `check-config` and a reload (for the next start) ask it alike, so
/// a reload cannot accept a file the next start refuses. The token type of expanded
/// slots when there is nothing to refuse.
pub(super) fn start_problem(
    serve: &ServeConfig,
    dtypes: &[(String, crate::corpus::DType)],
    plan: &crate::plan::Plan,
) -> Result<TokenType, String> {
    let token = TokenType::choose(&serve.token_dtype, dtypes, plan.config().vocab_size)
        .map_err(|e| format!("[serve] token_dtype: {e}"))?;
    // Padding is written as a token of the slot's dtype: an id it cannot hold was cut to
    // its low bits (pad_token = 70000 in uint16 slots padded with 4464, a real token).
    let pad = plan.config().pad_token;
    let compact = TokenType::compact(dtypes.iter().map(|(_, d)| *d));
    for (out, which) in [
        (token.0, "expanded slots ([serve] token_dtype)"),
        (compact.0, "compact slots (the shards' dtype)"),
    ] {
        if let Some(max) = largest_id(out).filter(|&max| pad > max) {
            return Err(format!(
                "plan.pad_token: {pad} does not fit {out}, the token dtype of {which}; \
                 choose an id the slots can hold (at most {max})"
            ));
        }
    }
    let longest = (plan.stages().iter().map(|s| s.seq_len).max()).unwrap_or(1);
    if let Some(why) = ring_budget_problem(serve, longest, compact) {
        return Err(why);
    }
    if let Some(g) = &serve.socket_group {
        let gid = access::resolve_group(g).map_err(|e| e.to_string())?;
        if let Some(why) = cannot_chown_to(gid) {
            return Err(format!("[serve] socket_group {g:?} (gid {gid}): {why}"));
        }
    }
    Ok(token)
}

/// The largest token id `d` holds; `None` for float dtypes, which hold no ids.
fn largest_id(d: crate::corpus::DType) -> Option<u64> {
    use crate::corpus::DType::*;
    Some(match d {
        Uint8 => u8::MAX.into(),
        Int8 => i8::MAX as u64,
        Int16 => i16::MAX as u64,
        Uint16 => u16::MAX.into(),
        Int32 => i32::MAX as u64,
        Uint32 => u32::MAX.into(),
        Int64 => i64::MAX as u64,
        Float32 | Float64 => return None,
    })
}

/// Why a start would refuse `serve`'s ring budget, given the plan's longest `seq_len`
/// and the shards' compact token: one below the smallest ring a rank can have (one row
/// of the longest stage, compact slots, no cursor, slots of at least
/// `stage_reserve_tokens` tokens as the daemon sizes them; such a daemon ran and refused
/// every trainer with `memory`). Without `ring_memory_bytes` the budget is the default
/// the daemon computes on this machine. `serve`, `check-config` and a reload's file (the
/// next start's) all judge by it; the socket path they judge with `socket_problem`.
pub(super) fn ring_budget_problem(
    serve: &ServeConfig,
    longest_seq_len: u32,
    compact: TokenType,
) -> Option<String> {
    let (budget, set) = match serve.ring_memory_bytes {
        Some(b) => (b, true),
        None => (super::budget::default_ring_budget(), false),
    };
    let named = if set {
        format!("[serve] ring_memory_bytes: {budget} bytes")
    } else {
        format!(
            "[serve] ring_memory_bytes is not set: its default, {budget} bytes (1/{} of this \
             machine's memory limit),",
            super::budget::DEFAULT_SHARE
        )
    };
    let (hold, leave) = if set {
        ("hold", "leave")
    } else {
        ("holds", "leaves")
    };
    // The ring of a rank with one row of the longest stage, as the hub's admission sizes
    // it (`Layout::staged`, slots of at least `reserve` tokens): no ring is smaller.
    let ring = |reserve: u64| {
        let shapes = [(1, longest_seq_len)];
        let kind = SlotLayout::Compact;
        Layout::staged(kind, &shapes, reserve, serve.ring_slots, compact, 0).ring_bytes
    };
    let reserve = serve.stage_reserve_tokens;
    let (plain, least) = (ring(0), ring(reserve));
    // A trainer user held to a share would be refused every ring the root could have.
    let percent = serve.uid_share_percent;
    let share = super::limits::UidShare { uid: 0, percent }.of(budget);
    let (room, held) = if budget < least {
        (budget, format!("{named} {hold} no ring"))
    } else if percent < 100 && share < least {
        (
            share,
            format!(
                "{named} at uid_share_percent {percent} {leave} each trainer user {share}, \
                 which hold no ring"
            ),
        )
    } else {
        return None;
    };
    let slots = serve.ring_slots;
    if room < plain {
        return Some(format!(
            "{held}: the smallest a rank can have ({slots} slots of one row of \
             {longest_seq_len} tokens) takes {plain}"
        ));
    }
    // The reserve is the cause: the most that leaves a ring within `room`.
    let (mut fits, mut over) = (0, reserve);
    while over - fits > 1 {
        let mid = fits + (over - fits) / 2;
        if ring(mid) <= room {
            fits = mid;
        } else {
            over = mid;
        }
    }
    Some(format!(
        "[serve] stage_reserve_tokens: {reserve} tokens per dp rank per step size every slot \
         for that many, and {held}: the smallest a rank can have ({slots} slots sized for \
         {reserve} tokens) takes {least}; at most {fits} tokens of reserve fit ({plain} bytes \
         without one)"
    ))
}

/// `millrace check-config`: everything `serve` checks before it binds (config, shards,
/// `[serve]`, the socket group, that `metrics_addr` is free), so a unit's ExecStartPre
/// fails with the reason.
pub fn check_config(args: CheckArgs) -> Result<()> {
    let l = load(&args.config, true)?;
    if let Some(addr) = &l.serve.metrics_addr {
        // `serve` exits when it cannot listen there, so the check tries it too (and lets
        // go at once). The daemon this config runs holds it while it serves, and the
        // check runs before it is restarted (an upgrade): that is no fault.
        if let Err(e) = std::net::TcpListener::bind(addr.as_str()) {
            match held_by_the_daemon(&l.serve.socket, addr) {
                Some(pid) => eprintln!(
                    "note: {}: [serve] metrics_addr {addr:?} is in use by the daemon serving \
                     {} now (pid {pid}); it is free once that daemon stops",
                    args.config.display(),
                    l.serve.socket.display()
                ),
                None => bail!(
                    "{}: [serve] metrics_addr {addr:?}: cannot listen: {e} (`serve` would exit)",
                    args.config.display()
                ),
            }
        }
    }
    if let Some(why) = socket_problem(&l.serve.socket) {
        bail!("{}: [serve] socket: {why}", args.config.display());
    }
    for w in l.plan.warnings() {
        eprintln!("warning: {}: {w}", args.config.display());
    }
    let eod = if args.check_eod {
        crate::eod::check_plan(&l.plan, &l.shards)?
    } else {
        None
    };
    if let Some((eod, results)) = eod {
        for w in results.iter().filter_map(|d| crate::eod::warning(d, eod)) {
            eprintln!("{}: {w}", args.config.display());
        }
    }
    let shards: usize = l.shards.iter().map(Vec::len).sum();
    // Compact slots (the default) carry the shards' own dtype; `token_dtype` is the
    // expanded layout's alone, so naming only it misled (uint16 shards "as int32").
    let compact = TokenType::compact(l.shards.iter().flatten().map(|s| s.dtype()));
    println!(
        "{}: ok: {} domains, {} shards, plan fingerprint {:032x}, socket {}, tokens as {} \
         in compact slots, {} in expanded ones",
        args.config.display(),
        l.plan.domain_names().len(),
        shards,
        l.plan.fingerprint(),
        l.serve.socket.display(),
        compact.0.name(),
        l.token.0.name()
    );
    Ok(())
}

/// The pid of the daemon answering on `socket` when that process holds a listening TCP
/// socket on `addr`'s port (its fds against /proc/net/tcp and tcp6); None otherwise, or
/// when any of it cannot be read.
fn held_by_the_daemon(socket: &Path, addr: &str) -> Option<u32> {
    let port = addr.parse::<std::net::SocketAddr>().ok()?.port();
    let reply = crate::control::request(
        socket,
        &crate::control::status_request(),
        std::time::Duration::from_secs(5),
    )
    .ok()?;
    let pid = u32::try_from(reply["status"]["pid"].as_u64()?).ok()?;
    // Listening sockets on the port: `sl local rem st ... inode`, the port in hex after
    // the address, state 0A for LISTEN.
    let mut listening = std::collections::HashSet::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let on_port = (f.get(1).and_then(|a| a.rsplit_once(':')))
                .and_then(|(_, p)| u16::from_str_radix(p, 16).ok())
                == Some(port);
            if on_port && f.get(3) == Some(&"0A") {
                listening.extend(f.get(9).map(|i| format!("socket:[{i}]")));
            }
        }
    }
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?;
    fds.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .any(|l| listening.contains(l.to_string_lossy().as_ref()))
        .then_some(pid)
}

/// The shards the background pass validates, and the identity cache it records passes in.
pub(super) struct Unchecked {
    shards: Vec<Arc<Shard>>,
    cache: crate::corpus::IdentityCache,
}

impl Unchecked {
    /// Every shard of `l`, with its config's identity cache.
    pub(super) fn of(l: &Loaded) -> Unchecked {
        Unchecked {
            shards: l.shards.iter().flatten().cloned().collect(),
            cache: l.cfg.identity_cache(),
        }
    }
}

/// Validates every shard in full (the linear pass `check-config` makes) on one thread of
/// its own, started after READY so that the first batch never waits for it. A shard that
/// fails is poisoned like one that changed under the daemon: rings that read it stop
/// with ERROR materialize naming it, the others keep serving. A shard that passes gets
/// the planner's and copier's fast paths (one read per document instead of a check),
/// and its identity cache entry records the pass, so that the next start takes those
/// paths from its first window on and does not validate it again (a shard whose entry
/// no longer describes its files is validated again).
pub(super) fn validate_in_background(
    Unchecked { shards, cache }: Unchecked,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("millrace-validate".into())
        .spawn(move || {
            let t0 = std::time::Instant::now();
            let (mut bad, mut trusted) = (0usize, 0usize);
            for shard in &shards {
                if shard.poisoned().is_some() {
                    bad += 1; // already found (while planning) and logged
                    continue;
                }
                if shard.validated_layout().is_some() {
                    // Its identity cache entry says these very files (same inode, size,
                    // mtime, ctime and sampled pages) passed this pass before: reading
                    // gigabytes of index again at every start would find what it found.
                    trusted += 1;
                    continue;
                }
                if let Some(why) = validate_one(shard).or_else(|| record_validated(&cache, shard)) {
                    error!("{why}; rings that read it stop with ERROR materialize");
                    shard.poison(why);
                    bad += 1;
                }
            }
            info!(
                shards = shards.len(),
                corrupt = bad,
                trusted,
                ms = t0.elapsed().as_millis() as u64,
                "background validation of the shards done"
            );
        })
}

/// Why `shard` must not be served, if its full validation fails (or faults: the file
/// shrank under the mapping), guarded as every daemon read of a mapping is.
fn validate_one(shard: &Shard) -> Option<String> {
    match guarded(|| shard.validate()) {
        (Some(addr), _) => Some(describe_fault(
            shard,
            addr,
            "during the background validation",
        )),
        (None, Err(e)) => Some(format!(
            "{e} (found by the background validation); the shard is poisoned until restart"
        )),
        (None, Ok(())) => None,
    }
}

/// Records `shard`'s passed validation in the identity cache, guarded: the record
/// samples pages of the shard's mappings (for a raw file, of its tokens, which the pass
/// itself never reads), and a file that shrank under them since faults there. Why the
/// shard must not be served, when it did.
fn record_validated(cache: &crate::corpus::IdentityCache, shard: &Shard) -> Option<String> {
    guarded(|| cache.record_validated(shard)).0.map(|addr| {
        describe_fault(
            shard,
            addr,
            "while the background validation recorded its pass",
        )
    })
}

/// Runs `read` (which reads shard mappings) guarded against SIGBUS, with the address of
/// the first read that faulted, if one did.
fn guarded<T>(read: impl FnOnce() -> T) -> (Option<usize>, T) {
    let guard = crate::corpus::guard::enter();
    let _ = crate::corpus::guard::take_fault();
    let out = read();
    let fault = crate::corpus::guard::take_fault();
    drop(guard);
    (fault, out)
}

/// Why this process could not give its socket to group `gid` (chown(2) lets an owner
/// give a file only to its own groups, unless it is root); `None` when it can.
fn cannot_chown_to(gid: u32) -> Option<String> {
    if crate::sys::euid() == 0 || crate::sys::egid() == gid {
        return None;
    }
    match rustix::process::getgroups() {
        Ok(groups) if groups.iter().any(|g| g.as_raw() == gid) => None,
        Ok(_) => Some(format!(
            "this user (uid {}) is not a member of the group, so serve could not give the \
             socket to it; run serve as root or as a member of the group (the systemd unit's \
             User= and Group=/SupplementaryGroups=)",
            crate::sys::euid()
        )),
        Err(e) => Some(format!("cannot list this process's groups: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::corpus::{DType, IdentityCache, RawOptions};

    /// A raw file truncated under the daemon before the background pass reached it: the
    /// pass proves only the boundaries, then records the pass in the identity cache,
    /// which samples pages of the token file's mapping. That read faults; it must poison
    /// the shard, naming it, instead of killing the daemon with SIGBUS. A truncated
    /// boundary cache faults in the pass itself, and the report names the cache, not the
    /// tokens.
    #[test]
    fn a_raw_file_truncated_before_the_background_pass_poisons_it_not_the_daemon() {
        for cut_cache in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("tokens.u16");
            let tokens: Vec<u8> = (0..8 * 4096u32)
                .flat_map(|i| ((i % 500) as u16).to_le_bytes())
                .collect();
            std::fs::write(&path, &tokens).unwrap();
            let opts = RawOptions {
                dtype: DType::Uint16,
                eos: 0,
                cache_dir: None,
            };
            let cache = IdentityCache::new(Some(&dir.path().join("cache")));
            let (shard, _) = cache.open(&path, Some(&opts), false).unwrap();
            let shard = Arc::new(shard);
            crate::corpus::guard::protect(shard.mappings()).unwrap();
            let cut = match cut_cache {
                true => shard.as_raw().unwrap().cache_path().to_path_buf(),
                false => path.clone(),
            };
            let file = std::fs::OpenOptions::new().write(true).open(&cut).unwrap();
            file.set_len(0).unwrap();
            let unchecked = Unchecked {
                shards: vec![shard.clone()],
                cache,
            };
            validate_in_background(unchecked).unwrap().join().unwrap();
            let why = shard.poisoned().expect("the shard is poisoned");
            assert!(
                why.starts_with(&format!("{}: read at byte ", cut.display()))
                    && why.contains("SIGBUS"),
                "{why}"
            );
        }
    }
}
