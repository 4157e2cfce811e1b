//! `millrace status`: one STATUS of a running daemon, in words or (`--json`) as the daemon
//! wrote it.

use std::fmt::Write as _;
use std::io::Write;

use anyhow::bail;
use serde_json::Value;

use millrace::control::{status_request, Connection};

use super::journal::{num_or_dash, render_journal};
use super::{fail_on_rejection, StatusArgs};

/// Runs `millrace status`.
pub fn run_status(args: StatusArgs) -> anyhow::Result<()> {
    let socket = args.target.socket()?;
    let status = fetch_status(&mut Connection::open(&socket, args.target.timeout())?)?;
    let mut out = std::io::stdout().lock();
    if args.json {
        writeln!(out, "{status}")?;
    } else {
        write!(out, "{}", render_status(&status))?;
    }
    Ok(())
}

/// Asks for STATUS on `conn`; an `ok: false` reply is an error here.
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

/// The last reload's outcome when it was refused (a refused file edit leaves the old
/// weights in force, which nobody should have to find in the log); nothing otherwise.
pub fn last_reload_line(st: &Value) -> Option<String> {
    let last = st.get("last_reload")?;
    if last.get("ok").and_then(Value::as_bool) != Some(false) {
        return None;
    }
    let source = last.get("source").and_then(Value::as_str).unwrap_or("?");
    let code = last.get("code").and_then(Value::as_str).unwrap_or("?");
    let message = last.get("message").and_then(Value::as_str).unwrap_or("");
    Some(format!(
        "LAST RELOAD REFUSED ({source}, {code}): the old weights stay: {message}"
    ))
}

/// `millrace status` in words: identity, counters, mixture and rings.
pub fn render_status(st: &Value) -> String {
    let mut s = String::new();
    let g = |k: &str| st.get(k);
    let _ = writeln!(
        s,
        "millrace {} pid {} up {}",
        str_or_dash(g("version")),
        num_or_dash(g("pid")),
        duration_text(g("uptime_s").and_then(Value::as_f64))
    );
    let _ = writeln!(s, "config       {}", str_or_dash(g("config")));
    let _ = writeln!(s, "socket       {}", str_or_dash(g("socket")));
    let _ = writeln!(s, "fingerprint  {}", str_or_dash(g("fingerprint")));
    let _ = writeln!(
        s,
        "clients {}  reloads {} (failed {})  first changeable step {}",
        num_or_dash(g("clients")),
        num_or_dash(g("reloads")),
        num_or_dash(g("failed_reloads")),
        num_or_dash(g("first_changeable_step"))
    );
    // Daemons before issue 14 do not report these: no line rather than dashes.
    if let Some(fd) = g("fd_limit") {
        let _ = writeln!(
            s,
            "fds {} open of {} (hard {})  control connections {} of {}",
            num_or_dash(fd.get("open")),
            num_or_dash(fd.get("soft")),
            num_or_dash(fd.get("hard")),
            num_or_dash(g("control_connections").and_then(|c| c.get("open"))),
            num_or_dash(g("control_connections").and_then(|c| c.get("max")))
        );
    }
    if let Some(line) = last_reload_line(st) {
        let _ = writeln!(s, "{line}");
    }
    let _ = writeln!(
        s,
        "padding {}  truncation {}",
        pct_or_dash(g("padding_fraction")),
        pct_or_dash(g("truncation_fraction"))
    );
    // The rings' share of [serve] ring_memory_bytes: a full budget refuses new jobs.
    let mib = |k: &str| {
        g("ring_memory")
            .and_then(|r| r.get(k))
            .and_then(Value::as_u64)
            .map_or("-".into(), |b| format!("{:.1} MiB", b as f64 / 1048576.0))
    };
    let _ = writeln!(
        s,
        "ring memory {} of {}",
        mib("used_bytes"),
        mib("budget_bytes")
    );
    let _ = writeln!(
        s,
        "\ndomain        target  realized      epochs          tokens"
    );
    for d in arr(g("domains")) {
        let _ = writeln!(
            s,
            "{:<12} {:>7} {:>9} {:>11} {:>15}",
            str_or_dash(d.get("name")),
            pct_or_dash(d.get("target_share")),
            pct_or_dash(d.get("realized_share")),
            d.get("epochs")
                .and_then(Value::as_f64)
                .map_or("-".into(), |e| format!("{e:.4}")),
            d.get("tokens")
                .and_then(Value::as_u64)
                .map_or("-".into(), millrace::util::thousands)
        );
    }
    let jobs = arr(g("jobs"));
    if jobs.is_empty() {
        let _ = writeln!(s, "\nno job is connected");
    } else {
        let _ = writeln!(
            s,
            "\n{:<16} {:>4} {:>9} {:>9} {:>5} {:>15} {:>9} {:>9}  peers",
            "job", "rank", "published", "released", "ring", "tokens", "cons.wait", "prod.wait"
        );
    }
    for j in jobs {
        for r in arr(j.get("rings")) {
            let peers: Vec<String> = arr(r.get("peers"))
                .iter()
                .map(|p| {
                    format!(
                        "{}(pid {}, released {})",
                        str_or_dash(p.get("replica")),
                        num_or_dash(p.get("pid")),
                        num_or_dash(p.get("released_step"))
                    )
                })
                .collect();
            let _ = writeln!(
                s,
                "{:<16} {:>4} {:>9} {:>9} {:>5} {:>15} {:>8.2}s {:>8.2}s  {}",
                str_or_dash(j.get("job")),
                num_or_dash(r.get("dp_rank")),
                num_or_dash(r.get("published_step")),
                num_or_dash(r.get("released_step")),
                format!(
                    "{}/{}",
                    num_or_dash(r.get("occupancy")),
                    num_or_dash(r.get("slots"))
                ),
                r.get("tokens_delivered")
                    .and_then(Value::as_u64)
                    .map_or("-".into(), millrace::util::thousands),
                r.get("consumer_wait_s")
                    .and_then(Value::as_f64)
                    .unwrap_or(0.0),
                r.get("producer_wait_s")
                    .and_then(Value::as_f64)
                    .unwrap_or(0.0),
                peers.join(", ")
            );
        }
    }
    let journal = arr(g("journal"));
    if !journal.is_empty() {
        let _ = writeln!(s, "\nchanges in force:");
        s.push_str(&render_journal(journal));
    }
    s
}

pub(super) fn arr(v: Option<&Value>) -> &[Value] {
    v.and_then(Value::as_array).map_or(&[], |a| a.as_slice())
}

pub(super) fn str_or_dash(v: Option<&Value>) -> String {
    v.and_then(Value::as_str).unwrap_or("-").to_string()
}

pub(super) fn pct_or_dash(v: Option<&Value>) -> String {
    v.and_then(Value::as_f64)
        .map_or("-".into(), |f| format!("{:.1}%", 100.0 * f))
}

pub(super) fn duration_text(s: Option<f64>) -> String {
    let Some(s) = s.filter(|s| s.is_finite() && *s >= 0.0) else {
        return "-".into();
    };
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
    use serde_json::json;

    /// A STATUS as a daemon with two rings and two domains writes it.
    pub(in crate::cli::ctl) fn sample_status(tokens: u64, released: u64, cwait: f64) -> Value {
        json!({
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
        })
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
    }

    #[test]
    fn a_refused_reload_shows_in_status_and_top() {
        let mut st = sample_status(1000, 57, 0.25);
        st["last_reload"] = json!({"source": "file", "ok": false, "code": "late",
                                   "message": "step 1 may already have been received"});
        let want = "LAST RELOAD REFUSED (file, late): the old weights stay: step 1 may \
                    already have been received";
        assert!(render_status(&st).contains(want), "{}", render_status(&st));
        assert!(render(&st, None, 100).contains(want));
        // An accepted (or no) reload adds no line.
        st["last_reload"] = json!({"source": "ctl", "ok": true, "message": "applied"});
        assert!(!render_status(&st).contains("LAST RELOAD"));
        assert!(!render(&st, None, 100).contains("LAST RELOAD"));
    }
}
