//! `millrace status`: one STATUS of a running daemon, in words or (`--json`) as the daemon
//! wrote it.

use std::fmt::Write as _;
use std::io::Write;
use std::path::Path;

use anyhow::{bail, Context};
use serde::Deserialize;
use serde_json::Value;

use millrace::control::{status_request, Connection};
use millrace::util::thousands;
use millrace::wire::status::Status;

use super::journal::render_journal;
use super::{fail_on_rejection, StatusArgs};

/// Runs `millrace status`.
pub fn run_status(args: StatusArgs) -> anyhow::Result<()> {
    let socket = args.target.socket_to_connect()?;
    let status = fetch_status(&mut Connection::open(&socket, args.target.timeout())?)?;
    let mut out = std::io::stdout().lock();
    if args.json {
        // Verbatim: a script reads what the daemon wrote, fields this release does not
        // know included.
        writeln!(out, "{status}")?;
    } else {
        write!(out, "{}", render_status(&read_status(&status, &socket)?))?;
    }
    Ok(())
}

/// Asks for STATUS on `conn`: the `status` object as the daemon wrote it. An `ok: false`
/// reply is an error here.
pub fn fetch_status(conn: &mut Connection) -> anyhow::Result<Value> {
    let reply = conn.request(&status_request())?;
    fail_on_rejection(&reply)?;
    match reply.get("status") {
        Some(s) if s.is_object() => Ok(s.clone()),
        _ => bail!(
            "{}: the status reply has no `status` object",
            conn.socket().display()
        ),
    }
}

/// The daemon's STATUS object read into the typed [`Status`] that `status` and `top`
/// show. A field it lacks (a daemon one release apart) takes its default; a field of the
/// wrong type is an error that names the socket.
pub fn read_status(status: &Value, socket: &Path) -> anyhow::Result<Status> {
    Status::deserialize(status)
        .with_context(|| format!("{}: the daemon's STATUS does not read", socket.display()))
}

/// A line saying the daemon is stopping, when it is (only a control connection opened
/// before SIGTERM still reaches it: the socket file is gone).
pub fn draining_line(st: &Status) -> Option<String> {
    st.draining.then(|| {
        "DRAINING after SIGTERM: no new slots; it exits once every client released what \
         it holds ([serve] drain_timeout_ms at most)"
            .to_string()
    })
}

/// The last reload's outcome when it was refused (a refused file edit leaves the old
/// weights in force, which nobody should have to find in the log); nothing otherwise.
pub fn last_reload_line(st: &Status) -> Option<String> {
    let last = st.last_reload.as_ref().filter(|l| !l.ok)?;
    let source = or(&last.source, "?");
    let code = last.code.as_deref().unwrap_or("?");
    let message = &last.message;
    Some(format!(
        "LAST RELOAD REFUSED ({source}, {code}): the old weights stay: {message}"
    ))
}

/// Poisoned shards (truncated, rewritten or found corrupt under the daemon: every ring
/// that reads one stops, every new client is refused, until a restart), at most `max`
/// lines and one that counts the rest; nothing when there are none.
pub fn poisoned_lines(st: &Status, max: usize) -> Vec<String> {
    let all = &st.poisoned_shards;
    // A daemon before `poisoned_shards_total` listed every one.
    let total = st.poisoned_shards_total.max(all.len() as u64);
    let mut lines: Vec<String> = all
        .iter()
        .take(max)
        .map(|p| format!("POISONED SHARD {} until a restart: {}", p.shard, p.reason))
        .collect();
    let shown = lines.len() as u64;
    if total > shown {
        lines.push(format!(
            "{} more poisoned shards (`millrace status --json` lists the first {})",
            total - shown,
            all.len()
        ));
    }
    lines
}

/// Fills, seeks and reads under the hub's lock stuck past the watchdog's bound (a read
/// hung on a network filesystem?), one line each, the longest first: the ring waiting,
/// and the file and bytes read; first, whether STATUS was taken without the hub's lock.
pub fn stuck_lines(st: &Status) -> Vec<String> {
    let busy = st.hub_busy.then(|| {
        "HUB BUSY: its lock was not free within 2 s (a read under it hangs, below); the \
         figures that need it are left out"
            .to_string()
    });
    busy.into_iter()
        .chain(st.stuck_fills.iter().map(|f| {
            format!(
                "STUCK FILL job {} rank {} step {} for {}: {}",
                f.job,
                f.dp_rank,
                f.step,
                duration_text(f.seconds),
                f.reading
            )
        }))
        .collect()
}

/// `millrace status` in words: identity, counters, mixture and rings.
pub fn render_status(st: &Status) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "millrace {} pid {} up {}",
        or(&st.version, "-"),
        st.pid,
        duration_text(st.uptime_s)
    );
    let _ = writeln!(s, "config       {}", or(&st.config, "-"));
    let _ = writeln!(s, "socket       {}", or(&st.socket, "-"));
    let _ = writeln!(s, "fingerprint  {}", or(&st.fingerprint, "-"));
    let _ = writeln!(
        s,
        "clients {}  reloads {} (failed {})  first changeable step {}",
        st.clients, st.reloads, st.failed_reloads, st.first_changeable_step
    );
    // Daemons before issue 14 do not report these (every field reads as its default):
    // no line rather than zeros.
    if st.fd_limit != Default::default() {
        let fd = &st.fd_limit;
        let _ = writeln!(
            s,
            "fds {} open of {} (hard {})  control connections {} of {}",
            fd.open.map_or("-".into(), |n| n.to_string()),
            fd.soft,
            fd.hard,
            st.control_connections.open,
            st.control_connections.max
        );
    }
    for line in draining_line(st).into_iter().chain(last_reload_line(st)) {
        let _ = writeln!(s, "{line}");
    }
    for line in poisoned_lines(st, 16).into_iter().chain(stuck_lines(st)) {
        let _ = writeln!(s, "{line}");
    }
    // Daemons before the field do not report the reader.
    if !st.reader.is_empty() {
        let _ = match &st.reader_fallback {
            Some(why) => writeln!(s, "reader       {} ({why})", st.reader),
            None => writeln!(s, "reader       {}", st.reader),
        };
    }
    // Refused trainers retry or fail on their side; here is where the operator sees them.
    if !st.refused_by_code.is_empty() {
        let by: Vec<String> = st
            .refused_by_code
            .iter()
            .map(|(code, n)| format!("{code} {n}"))
            .collect();
        let _ = writeln!(
            s,
            "refused connections {} ({})",
            st.refused_by_code.values().sum::<u64>(),
            by.join(", ")
        );
    }
    let _ = writeln!(
        s,
        "padding {}  truncation {}",
        pct(st.padding_fraction),
        pct(st.truncation_fraction)
    );
    // The rings' share of [serve] ring_memory_bytes: a full budget refuses new jobs.
    let mib = |b: u64| format!("{:.1} MiB", b as f64 / 1048576.0);
    let _ = writeln!(
        s,
        "ring memory {} of {}",
        mib(st.ring_memory.used_bytes),
        mib(st.ring_memory.budget_bytes)
    );
    // Columns as wide as the longest name (within reason), so that long domain and job
    // names do not shift their rows against the header.
    let width = |names: &mut dyn Iterator<Item = &str>, least: usize| -> usize {
        names
            .map(|n| n.chars().count())
            .max()
            .unwrap_or(0)
            .clamp(least, 48)
    };
    let dw = width(&mut st.domains.iter().map(|d| d.name.as_str()), 12);
    let _ = writeln!(
        s,
        "\n{:<dw$} {:>7} {:>9} {:>11} {:>15}",
        "domain", "target", "realized", "epochs", "tokens"
    );
    for d in &st.domains {
        let _ = writeln!(
            s,
            "{:<dw$} {:>7} {:>9} {:>11} {:>15}",
            or(&d.name, "-"),
            pct(d.target_share),
            pct(d.realized_share),
            format!("{:.4}", d.epochs),
            thousands(d.tokens)
        );
    }
    let jw = width(&mut st.jobs.iter().map(|j| j.job.as_str()), 16);
    if st.jobs.is_empty() {
        let _ = writeln!(s, "\nno job is connected");
    } else {
        let _ = writeln!(
            s,
            "\n{:<jw$} {:>4} {:>9} {:>9} {:>5} {:>15} {:>9} {:>9}  peers",
            "job", "rank", "published", "released", "ring", "tokens", "cons.wait", "prod.wait"
        );
    }
    for j in &st.jobs {
        for r in &j.rings {
            // A full ring whose peers released different steps waits for the one furthest
            // behind (a stopped or slow TP twin): named, since its faster twins only wait.
            let (least, most) = (r.peers.iter().map(|p| p.released_step))
                .fold((u64::MAX, 0), |(a, b), x| (a.min(x), b.max(x)));
            // Only while a faster twin has read every published step: in lock-step
            // training twins a release apart with steps unread are no sign (a false
            // alarm the review saw at one step apart).
            let held =
                r.occupancy >= u64::from(r.slots) && least < most && most >= r.published_step;
            let peers: Vec<String> = r
                .peers
                .iter()
                .map(|p| {
                    format!(
                        "{}(pid {}, released {}){}",
                        or(&p.replica, "-"),
                        p.pid.map_or("-".into(), |n| n.to_string()),
                        p.released_step,
                        if held && p.released_step == least {
                            " HOLDS THE RING"
                        } else {
                            ""
                        }
                    )
                })
                .collect();
            let mut peers = peers.join(", ");
            if r.joined < r.replicas {
                let _ = write!(
                    peers,
                    "; waiting for {} of {} replicas to join",
                    r.replicas - r.joined,
                    r.replicas
                );
            }
            let _ = writeln!(
                s,
                "{:<jw$} {:>4} {:>9} {:>9} {:>5} {:>15} {:>8.2}s {:>8.2}s  {}",
                or(&j.job, "-"),
                r.dp_rank,
                r.published_step,
                r.released_step,
                format!("{}/{}", r.occupancy, r.slots),
                thousands(r.tokens_delivered),
                r.consumer_wait_s,
                r.producer_wait_s,
                peers
            );
        }
    }
    if !st.journal.is_empty() || st.journal_omitted.is_some() {
        let _ = writeln!(s, "\nchanges in force:");
        match st.journal_omitted {
            None => s.push_str(&render_journal(&st.journal)),
            // Not one change fits STATUS: say so, not "no changes" and then a count.
            Some(gap) if st.journal.is_empty() => {
                let _ = writeln!(
                    s,
                    "(all {} changes left out: each is too large to list here; `millrace ctl \
                     journal` lists them while the journal fits one frame)",
                    gap.changes.max(st.journal_changes)
                );
            }
            // The header, the entries before the gap, the gap, the rest (none where the
            // newest change is among those left out).
            Some(gap) => {
                let table = render_journal(&st.journal);
                let at = 1 + gap.after as usize;
                let mut lines = 0;
                for (i, line) in table.lines().enumerate() {
                    if i == at {
                        let _ = writeln!(s, "{:>10} ...", "");
                    }
                    let _ = writeln!(s, "{line}");
                    lines = i + 1;
                }
                if at >= lines {
                    let _ = writeln!(s, "{:>10} ...", "");
                }
                let _ = writeln!(
                    s,
                    "({} of {} changes left out after the first {}{}; `millrace ctl journal` \
                     lists them all)",
                    gap.changes,
                    st.journal_changes,
                    gap.after,
                    if st.newest_change().is_none() {
                        ", the newest among them"
                    } else {
                        ""
                    }
                );
            }
        }
    }
    s
}

/// `text`, or `missing` when it is empty (a field the daemon did not send).
pub(super) fn or<'a>(text: &'a str, missing: &'a str) -> &'a str {
    if text.is_empty() {
        missing
    } else {
        text
    }
}

/// A fraction as a percentage with one decimal.
pub(super) fn pct(f: f64) -> String {
    format!("{:.1}%", 100.0 * f)
}

/// Seconds as `12.3s`, `4m05s`, `1h02m` or `2d03h`; `-` for what is not a duration.
pub(super) fn duration_text(s: f64) -> String {
    if !(s.is_finite() && s >= 0.0) {
        return "-".into();
    }
    let t = s as u64;
    match t {
        0..=59 => format!("{s:.1}s"),
        60..=3599 => format!("{}m{:02}s", t / 60, t % 60),
        3600..=86399 => format!("{}h{:02}m", t / 3600, (t % 3600) / 60),
        _ => format!("{}d{:02}h", t / 86400, (t % 86400) / 3600),
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::super::top::render;
    use super::*;
    use millrace::wire::status::{
        FdLimitStatus, JournalGap, PeerStatus, PoisonedShard, ReloadOutcome,
    };
    use serde_json::json;

    /// A STATUS as a daemon with two rings and two domains writes it, read as `status`
    /// and `top` read it.
    pub(in crate::cli::ctl) fn sample_status(tokens: u64, released: u64, cwait: f64) -> Status {
        let v = json!({
            "version": "0.1.0", "pid": 123, "uptime_s": 3725.0,
            "config": "/etc/millrace/millrace.toml", "socket": "/run/millrace/millrace.sock",
            "fingerprint": "0123456789abcdef0123456789abcdef",
            "clients": 3, "reloads": 1, "failed_reloads": 0, "first_changeable_step": 57,
            "journal": [{"at_step": 40, "plan_step": 40, "source": "ctl",
                          "points": [{"step": 40, "weights": {"web": 0.5, "code": 0.3}}]}],
            "domains": [
                {"name": "web", "target_share": 0.6, "realized_share": 0.598, "epochs": 0.013, "tokens": 123456},
                {"name": "code", "target_share": 0.4, "realized_share": 0.402, "epochs": 0.02, "tokens": 82000}
            ],
            "padding_fraction": 0.012, "truncation_fraction": 0.03,
            "ring_memory": {"used_bytes": 150994944, "budget_bytes": 4294967296u64},
            "jobs": [{"job": "default", "dp_size": 2, "rings": [
                {"dp_rank": 0, "published_step": released + 3, "released_step": released,
                 "slots": 4, "occupancy": 3,
                 "peers": [{"replica": "0", "pid": 4567, "released_step": released}],
                 "tokens_delivered": tokens, "batches_delivered": released,
                 "consumer_wait_s": cwait, "producer_wait_s": 3.1},
                {"dp_rank": 1, "published_step": 10, "released_step": 8, "slots": 4, "occupancy": 2,
                 "peers": [], "tokens_delivered": 5, "batches_delivered": 8,
                 "consumer_wait_s": 0.0, "producer_wait_s": 0.0}
            ]}]
        });
        read_status(&v, Path::new("sample.sock")).unwrap()
    }

    /// A config file edit the daemon refused as late.
    fn refused_file_edit(message: &str) -> ReloadOutcome {
        ReloadOutcome {
            source: "file".into(),
            ok: false,
            code: Some("late".into()),
            message: message.into(),
            unix_s: 0,
        }
    }

    #[test]
    fn status_text_names_the_rings_and_domains() {
        let text = render_status(&sample_status(1234567, 57, 0.25));
        assert!(
            text.contains("ring memory 144.0 MiB of 4096.0 MiB"),
            "{text}"
        );
        assert!(text.contains("pid 123"), "{text}");
        assert!(text.contains("first changeable step 57"), "{text}");
        assert!(text.contains("1,234,567"), "{text}");
        assert!(text.contains("0(pid 4567, released 57)"), "{text}");
        assert!(text.contains("web"), "{text}");
        assert!(text.contains("60.0%"), "{text}");
        assert!(text.contains("changes in force"), "{text}");
        // A daemon that reports no fd figures gets no fd line (not a line of zeros).
        assert!(!text.contains("fds "), "{text}");
        assert!(!text.contains("HOLDS"), "{text}");
        // A full ring of two TP peers, one stopped 4 steps behind: it is named.
        let mut st = sample_status(1234567, 57, 0.25);
        let ring = &mut st.jobs[0].rings[0];
        ring.occupancy = u64::from(ring.slots);
        let twin = |name: &str, released| PeerStatus {
            pid: Some(7),
            release_page: false,
            released_step: released,
            replica: name.into(),
        };
        ring.peers = vec![twin("tp0", 61), twin("tp1", 57)];
        ring.published_step = 61;
        let text = render_status(&st);
        assert!(
            text.contains("tp0(pid 7, released 61), tp1(pid 7, released 57) HOLDS THE RING"),
            "{text}"
        );
        // A twin a release behind while the other still has steps to read holds nothing.
        let ring = &mut st.jobs[0].rings[0];
        ring.published_step = 62;
        ring.peers = vec![twin("tp0", 59), twin("tp1", 58)];
        assert!(!render_status(&st).contains("HOLDS"));
    }

    /// `status` and `top` print, character for character, what they printed when they
    /// read STATUS by string key (golden/*.txt were written by that code from this same
    /// STATUS): reading it through the typed struct changed no output.
    #[test]
    fn status_and_top_text_are_pinned() {
        let mut st = sample_status(1234567, 57, 0.25);
        st.fd_limit = FdLimitStatus {
            at_start: 1024,
            hard: 524288,
            open: Some(17),
            soft: 524288,
        };
        st.control_connections.max = 64;
        st.control_connections.open = 1;
        st.last_reload = Some(refused_file_edit("m"));
        assert_eq!(render_status(&st), include_str!("golden/status.txt"));
        let prev = sample_status(1_000_000, 50, 0.25);
        assert_eq!(
            render(&st, Some((&prev, 2.0)), 120),
            include_str!("golden/top.txt")
        );
        assert_eq!(
            render(&st, None, 80),
            include_str!("golden/top-first-frame.txt")
        );
    }

    /// Missing fields read as defaults (a daemon one release apart); a field of the wrong
    /// type is refused with the socket named, instead of being shown as something else.
    #[test]
    fn status_reads_typed_and_names_the_socket_when_it_cannot() {
        let old = read_status(&json!({"pid": 9, "jobs": []}), Path::new("a.sock")).unwrap();
        assert_eq!((old.pid, old.fd_limit.hard), (9, 0));
        let text = render_status(&old);
        assert!(
            text.contains("pid 9") && text.contains("no job is connected"),
            "{text}"
        );
        assert!(text.contains("config       -"), "{text}");
        for odd in [
            json!({"jobs": "x"}),
            json!({"pid": "x"}),
            json!({"domains": [1]}),
        ] {
            let e = read_status(&odd, Path::new("/run/d.sock")).unwrap_err();
            let text = format!("{e:#}");
            assert!(
                text.contains("/run/d.sock") && text.contains("STATUS"),
                "{text}"
            );
        }
    }

    /// A shard poisoned under the daemon (it stops every ring that reads it and refuses
    /// every new client) is named by `status` and `top`, not only in STATUS's JSON.
    #[test]
    fn poisoned_shards_show_in_status_and_top() {
        let mut st = sample_status(1000, 57, 0.25);
        assert!(!render_status(&st).contains("POISONED"));
        st.poisoned_shards = (0..20)
            .map(|k| PoisonedShard {
                shard: format!("/data/web/web-{k:05}"),
                reason: format!("web-{k:05}.bin: read at byte 85944 faulted (SIGBUS)"),
            })
            .collect();
        let text = render_status(&st);
        let first = "POISONED SHARD /data/web/web-00000 until a restart: web-00000.bin: read at \
                     byte 85944 faulted (SIGBUS)";
        assert!(text.contains(first), "{text}");
        assert_eq!(text.matches("POISONED SHARD").count(), 16, "{text}");
        assert!(text.contains("4 more poisoned shards"), "{text}");
        let frame = render(&st, None, 200);
        assert!(frame.contains(first), "{frame}");
        assert!(frame.contains("19 more poisoned shards"), "{frame}");
        // STATUS lists the first 1,024 of a lost filesystem's shards and counts them all;
        // a daemon before the count listed every one (total 0).
        st.poisoned_shards_total = 100_000;
        let text = render_status(&st);
        assert!(
            text.contains(
                "99984 more poisoned shards (`millrace status --json` lists the first 20)"
            ),
            "{text}"
        );
        st.poisoned_shards_total = 0;
        assert!(render_status(&st).contains("4 more poisoned shards"));
    }

    /// A fill stuck in a read (STATUS's `stuck_fills`) is named by `status` and `top`:
    /// the ring waiting for it, and the file and bytes it reads.
    #[test]
    fn stuck_fills_show_in_status_and_top() {
        let mut st = sample_status(1000, 57, 0.25);
        assert!(!render_status(&st).contains("STUCK"));
        st.stuck_fills = vec![millrace::wire::status::StuckFill {
            job: "pretrain".into(),
            dp_rank: 5,
            step: 1234,
            seconds: 95.0,
            reading: "copying /nfs/web/web-00007.bin bytes 4096..8192 from its mapping".into(),
        }];
        let want = "STUCK FILL job pretrain rank 5 step 1234 for 1m35s: copying \
                    /nfs/web/web-00007.bin bytes 4096..8192 from its mapping";
        let text = render_status(&st);
        assert!(text.contains(want), "{text}");
        let frame = render(&st, None, 200);
        assert!(frame.contains(want), "{frame}");
        // A STATUS taken without the hub's lock (a read under it hangs) says so.
        assert!(!text.contains("HUB BUSY"), "{text}");
        st.hub_busy = true;
        assert!(render_status(&st).contains("HUB BUSY: its lock was not free within 2 s"));
    }

    /// Long domain and job names widen their columns (in `top` too): every row's figures
    /// start where the header's do.
    #[test]
    fn long_names_keep_the_columns_aligned() {
        let mut st = sample_status(1000, 57, 0.25);
        st.domains[1].name = "the_pile_arxiv_2024_dedup".into();
        st.jobs[0].job = "llama-70b-pretrain-run-42".into();
        let text = render_status(&st);
        let col = |line: &str, word: &str| line.find(word).unwrap() + word.len();
        let lines: Vec<&str> = text.lines().collect();
        let head = lines.iter().find(|l| l.starts_with("domain ")).unwrap();
        for row in lines
            .iter()
            .filter(|l| l.starts_with("web") || l.starts_with("the_pile"))
        {
            assert_eq!(col(row, "%"), col(head, "target"), "{head}\n{row}");
        }
        let head = lines.iter().find(|l| l.starts_with("job ")).unwrap();
        let frame = render(&st, None, 200);
        let top: Vec<&str> = frame.lines().collect();
        let top_head = top.iter().find(|l| l.starts_with("job ")).unwrap();
        let top_rows = top.iter().filter(|l| l.starts_with("llama"));
        for row in lines
            .iter()
            .filter(|l| l.starts_with("llama"))
            .chain(top_rows)
        {
            let head = if top.contains(row) { top_head } else { head };
            let rank_end = row
                .split_whitespace()
                .nth(1)
                .map(|r| row.find(&format!(" {r} ")).unwrap() + 1 + r.len());
            assert_eq!(rank_end, Some(col(head, "rank")), "{head}\n{row}");
        }
    }

    /// A journal none of whose changes fits STATUS (each too large) is said to be left
    /// out whole: `status` printed "no changes: the config's schedule is in force" and
    /// then "(12 of 12 changes left out after the first 0 ...)". A gap at the end (the
    /// newest change left out) is marked after the last entry and named.
    #[test]
    fn a_journal_left_out_of_status_is_not_called_empty() {
        let mut st = sample_status(1000, 57, 0.25);
        st.journal.clear();
        st.journal_changes = 12;
        st.journal_omitted = Some(JournalGap {
            after: 0,
            changes: 12,
        });
        let text = render_status(&st);
        assert!(!text.contains("no changes"), "{text}");
        assert!(
            text.contains("changes in force:\n(all 12 changes left out: each is too large"),
            "{text}"
        );
        // Two listed, the five after them (the newest among them) left out.
        st.journal = vec![sample_status(1000, 57, 0.25).journal[0].clone(); 2];
        st.journal_changes = 7;
        st.journal_omitted = Some(JournalGap {
            after: 2,
            changes: 5,
        });
        let text = render_status(&st);
        let tail: Vec<&str> = text.lines().rev().take(2).collect();
        assert_eq!(tail[1].trim(), "...", "{text}");
        assert!(
            tail[0].starts_with("(5 of 7 changes left out after the first 2, the newest among"),
            "{text}"
        );
    }

    #[test]
    fn refused_connections_show_in_status() {
        let mut st = sample_status(1000, 57, 0.25);
        assert!(!render_status(&st).contains("refused connections"));
        st.refused_by_code = [("busy".to_string(), 1), ("dp_size".to_string(), 2)].into();
        let text = render_status(&st);
        assert!(
            text.contains("refused connections 3 (busy 1, dp_size 2)"),
            "{text}"
        );
    }

    #[test]
    fn a_draining_daemon_shows_in_status_and_top() {
        let mut st = sample_status(1000, 57, 0.25);
        assert!(!render_status(&st).contains("DRAINING"));
        assert!(!render(&st, None, 200).contains("DRAINING"));
        st.draining = true;
        assert!(render_status(&st).contains("DRAINING after SIGTERM"));
        assert!(render(&st, None, 200).contains("DRAINING after SIGTERM"));
    }

    #[test]
    fn a_refused_reload_shows_in_status_and_top() {
        let mut st = sample_status(1000, 57, 0.25);
        st.last_reload = Some(refused_file_edit("step 1 may already have been received"));
        let want = "LAST RELOAD REFUSED (file, late): the old weights stay: step 1 may \
                    already have been received";
        assert!(render_status(&st).contains(want), "{}", render_status(&st));
        assert!(render(&st, None, 100).contains(want));
        // An accepted (or no) reload adds no line.
        st.last_reload = Some(ReloadOutcome {
            source: "ctl".into(),
            ok: true,
            message: "applied".into(),
            ..ReloadOutcome::default()
        });
        assert!(!render_status(&st).contains("LAST RELOAD"));
        assert!(!render(&st, None, 100).contains("LAST RELOAD"));
        st.last_reload = None;
        assert!(!render_status(&st).contains("LAST RELOAD"));
    }
}
