//! `millrace top`: a live view of a running daemon, redrawn from a STATUS every interval,
//! with rates taken between two of them.

use std::io::Write;
use std::time::{Duration, Instant};

use serde_json::Value;

use millrace::control::Connection;

use super::journal::{num_or_dash, point_text};
use super::status::{arr, duration_text, fetch_status, last_reload_line, pct_or_dash, str_or_dash};
use super::TopArgs;

/// `[###.....]`: `frac` of `width` cells filled (clamped to 0..=1).
pub(super) fn bar(frac: f64, width: usize) -> String {
    let frac = if frac.is_finite() {
        frac.clamp(0.0, 1.0)
    } else {
        0.0
    };
    let full = ((frac * width as f64).round() as usize).min(width);
    format!("[{}{}]", "#".repeat(full), ".".repeat(width - full))
}

/// Like [`bar`], with a `|` at `mark` (a target) unless a filled cell is there.
pub(super) fn bar_with_mark(frac: f64, mark: f64, width: usize) -> String {
    let mut cells: Vec<char> = bar(frac, width).chars().collect();
    if mark.is_finite() && width > 0 {
        let at = ((mark.clamp(0.0, 1.0) * width as f64).round() as usize).min(width - 1);
        // cells[0] is '['.
        if cells[at + 1] == '.' {
            cells[at + 1] = '|';
        } else {
            cells[at + 1] = '+';
        }
    }
    cells.into_iter().collect()
}

/// One frame of `millrace top`, from the latest STATUS (`now`) and, for rates, the
/// previous one and the seconds between them. Pure, so it is tested on sample JSON; a
/// missing field shows as `-`, a counter that went backwards (a new ring, a restarted
/// daemon) shows no rate. Lines are cut to `width` characters.
pub fn render(now: &Value, prev: Option<(&Value, f64)>, width: usize) -> String {
    let width = width.max(40);
    let g = |k: &str| now.get(k);
    // Rates only between two statuses of one daemon process.
    let prev = prev.filter(|(p, dt)| {
        *dt > 0.0 && dt.is_finite() && p.get("pid") == now.get("pid") && now.get("pid").is_some()
    });
    let mut lines: Vec<String> = Vec::new();
    lines.push(format!(
        "millrace {}  pid {}  up {}  fingerprint {}",
        str_or_dash(g("version")),
        num_or_dash(g("pid")),
        duration_text(g("uptime_s").and_then(Value::as_f64)),
        str_or_dash(g("fingerprint")),
    ));
    lines.push(format!(
        "clients {}  reloads {} (failed {})  first changeable step {}  padding {}  truncation {}",
        num_or_dash(g("clients")),
        num_or_dash(g("reloads")),
        num_or_dash(g("failed_reloads")),
        num_or_dash(g("first_changeable_step")),
        pct_or_dash(g("padding_fraction")),
        pct_or_dash(g("truncation_fraction")),
    ));
    lines.extend(last_reload_line(now));
    lines.push(String::new());
    let jobs = arr(g("jobs"));
    if jobs.is_empty() {
        lines.push("no job is connected".into());
    } else {
        lines.push(format!(
            "{:<9} {:>4} {:>8} {:>8} {:>7} {:<12} {:>9} {:>9} {:>5}",
            "job", "rank", "step", "tokens/s", "steps/s", "ring", "cons.wait", "prod.wait", "peers"
        ));
    }
    for j in jobs {
        let job = str_or_dash(j.get("job"));
        for r in arr(j.get("rings")) {
            let rank = r.get("dp_rank").and_then(Value::as_u64);
            let before = prev.and_then(|(p, dt)| {
                arr(p.get("jobs"))
                    .iter()
                    .filter(|pj| pj.get("job").and_then(Value::as_str) == Some(job.as_str()))
                    .flat_map(|pj| arr(pj.get("rings")))
                    .find(|pr| pr.get("dp_rank").and_then(Value::as_u64) == rank && rank.is_some())
                    .map(|pr| (pr, dt))
            });
            let rate = |key: &str| -> Option<f64> {
                let (pr, dt) = before?;
                let a = pr.get(key).and_then(Value::as_f64)?;
                let b = r.get(key).and_then(Value::as_f64)?;
                (b >= a).then(|| (b - a) / dt)
            };
            let occ = r.get("occupancy").and_then(Value::as_f64);
            let slots = r.get("slots").and_then(Value::as_f64);
            let ring = match (occ, slots) {
                (Some(o), Some(s)) if s > 0.0 => {
                    format!("{} {}/{}", bar(o / s, 6), o as u64, s as u64)
                }
                _ => "-".into(),
            };
            let opt = |v: Option<f64>, f: &dyn Fn(f64) -> String| v.map_or("-".into(), f);
            lines.push(format!(
                "{:<9} {:>4} {:>8} {:>8} {:>7} {:<12} {:>9} {:>9} {:>5}",
                job,
                num_or_dash(r.get("dp_rank")),
                num_or_dash(r.get("released_step").or(r.get("published_step"))),
                opt(rate("tokens_delivered"), &millrace::util::si),
                opt(rate("released_step"), &|v| format!("{v:.2}")),
                ring,
                opt(rate("consumer_wait_s"), &|v| format!("{v:.3}")),
                opt(rate("producer_wait_s"), &|v| format!("{v:.3}")),
                arr(r.get("peers")).len(),
            ));
        }
    }
    if !jobs.is_empty() {
        lines.push(
            "waits: s/s trainers waited for data (cons) / the daemon for a free slot (prod)".into(),
        );
    }
    let domains = arr(g("domains"));
    if !domains.is_empty() {
        lines.push(String::new());
        let name_w = domains
            .iter()
            .map(|d| str_or_dash(d.get("name")).chars().count())
            .max()
            .unwrap_or(1)
            .clamp(6, 20);
        // name, space, bar (w + 2), then "   59.8% of  60.0%  epochs 0.0130" (33).
        let bar_w = width.saturating_sub(name_w + 1 + 2 + 33).clamp(10, 60);
        lines.push(format!(
            "{:<name_w$} {:<bw$}  realized of target (|)",
            "mixture",
            "token shares",
            bw = bar_w + 2
        ));
        for d in domains {
            let realized = d.get("realized_share").and_then(Value::as_f64);
            let target = d.get("target_share").and_then(Value::as_f64);
            lines.push(format!(
                "{:<name_w$} {}  {:>6} of {:>6}  epochs {}",
                str_or_dash(d.get("name")),
                bar_with_mark(realized.unwrap_or(0.0), target.unwrap_or(f64::NAN), bar_w),
                pct_or_dash(d.get("realized_share")),
                pct_or_dash(d.get("target_share")),
                d.get("epochs")
                    .and_then(Value::as_f64)
                    .map_or("-".into(), |e| format!("{e:.4}")),
            ));
        }
    }
    if let Some(last) = arr(g("journal")).last() {
        lines.push(String::new());
        lines.push(format!(
            "last change: from step {} ({}) {}",
            num_or_dash(last.get("at_step")),
            str_or_dash(last.get("source")),
            arr(last.get("points"))
                .iter()
                .map(point_text)
                .collect::<Vec<_>>()
                .join("; ")
        ));
    }
    let mut out = String::new();
    for l in lines {
        let cut: String = l.chars().take(width).collect();
        out.push_str(cut.trim_end());
        out.push('\n');
    }
    out
}

/// Columns of the terminal on stdout, else `$COLUMNS`, else 100.
pub(super) fn terminal_width() -> usize {
    // SAFETY: TIOCGWINSZ writes a winsize into the struct we pass; nothing else.
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    let ok = unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut ws) } == 0;
    if ok && ws.ws_col > 0 {
        return ws.ws_col as usize;
    }
    std::env::var("COLUMNS")
        .ok()
        .and_then(|c| c.trim().parse().ok())
        .filter(|&c: &usize| c > 0)
        .unwrap_or(100)
}

/// Runs `millrace top`: a redraw every interval until interrupted, or one frame with
/// `--once`. A daemon that goes away is shown as such and reconnected to.
pub fn run_top(args: TopArgs) -> anyhow::Result<()> {
    use std::io::IsTerminal;
    let socket = args.target.socket()?;
    let timeout = args.target.timeout();
    let interval = match args.interval_ms {
        Some(ms) => Duration::from_millis(ms),
        None => Duration::from_secs_f64(args.interval),
    }
    .max(Duration::from_millis(50));
    let mut conn = Connection::open(&socket, timeout)?;
    let mut prev = (fetch_status(&mut conn)?, Instant::now());
    if args.once {
        std::thread::sleep(interval);
        let now = fetch_status(&mut conn)?;
        let dt = prev.1.elapsed().as_secs_f64();
        let frame = render(&now, Some((&prev.0, dt)), terminal_width());
        std::io::stdout().lock().write_all(frame.as_bytes())?;
        return Ok(());
    }
    let tty = std::io::stdout().is_terminal();
    let show = |frame: &str| -> anyhow::Result<()> {
        let mut out = std::io::stdout().lock();
        if tty {
            out.write_all(b"\x1b[2J\x1b[H")?;
        }
        out.write_all(frame.as_bytes())?;
        if !tty {
            out.write_all(b"\n")?;
        }
        out.flush()?;
        Ok(())
    };
    // A first frame at once (without rates), then one per interval.
    show(&render(&prev.0, None, terminal_width()))?;
    let mut conn = Some(conn);
    let mut have_prev = true;
    loop {
        std::thread::sleep(interval);
        let got = match conn.as_mut() {
            Some(c) => fetch_status(c),
            None => Connection::open(&socket, timeout)
                .map_err(anyhow::Error::from)
                .and_then(|mut c| {
                    let st = fetch_status(&mut c);
                    conn = Some(c);
                    st
                }),
        };
        let at = Instant::now();
        let frame = match got {
            Ok(now) => {
                let dt = at.duration_since(prev.1).as_secs_f64();
                let frame = render(&now, have_prev.then_some((&prev.0, dt)), terminal_width());
                prev = (now, at);
                have_prev = true;
                frame
            }
            Err(e) => {
                conn = None;
                have_prev = false;
                format!(
                    "{}: {e:#}\nretrying every {} ms\n",
                    socket.display(),
                    interval.as_millis()
                )
            }
        };
        show(&frame)?;
    }
}

#[cfg(test)]
mod tests {
    use super::super::status::render_status;
    use super::super::status::tests::sample_status;
    use super::*;
    use serde_json::json;

    #[test]
    fn render_shows_rates_bars_and_mixture() {
        let prev = sample_status(1_000_000, 50, 0.25);
        let now = sample_status(3_000_000, 60, 0.75);
        let text = render(&now, Some((&prev, 2.0)), 120);
        assert!(text.contains("pid 123"), "{text}");
        assert!(text.contains("up 1h02m"), "{text}");
        assert!(text.contains("0123456789abcdef0123456789abcdef"), "{text}");
        assert!(text.contains("clients 3  reloads 1 (failed 0)"), "{text}");
        let ring0 = text
            .lines()
            .find(|l| l.starts_with("default") && l.contains("  0 "))
            .unwrap();
        // 2e6 tokens over 2 s, 10 steps over 2 s, 0.5 s of waiting over 2 s.
        assert!(ring0.contains("1.00M"), "{ring0}");
        assert!(ring0.contains("5.00"), "{ring0}");
        assert!(ring0.contains("0.250"), "{ring0}");
        assert!(ring0.contains("[#####.] 3/4"), "{ring0}");
        // Rank 1's counters did not move: zero rates, not dashes.
        let ring1 = text
            .lines()
            .find(|l| l.starts_with("default") && l.contains("  1 "))
            .unwrap();
        assert!(ring1.contains(" 0.0 "), "{ring1}");
        let web = text.lines().find(|l| l.starts_with("web")).unwrap();
        assert!(web.contains("59.8% of  60.0%"), "{web}");
        assert!(web.contains('#') && web.contains('['), "{web}");
        assert!(text.contains("last change: from step 40 (ctl) step 40: code=0.3 web=0.5"));
        for l in text.lines() {
            assert!(l.chars().count() <= 120, "{l}");
        }
        // No escapes: the caller adds them on a terminal.
        assert!(!text.contains('\x1b'));
    }

    #[test]
    fn render_without_prev_or_across_a_restart_shows_no_rates() {
        let now = sample_status(3_000_000, 60, 0.75);
        let text = render(&now, None, 100);
        let ring0 = text.lines().find(|l| l.starts_with("default")).unwrap();
        assert!(!ring0.contains("M "), "{ring0}");
        assert!(ring0.contains(" - "), "{ring0}");
        let mut other = sample_status(1, 1, 0.0);
        other["pid"] = json!(999);
        let text = render(&now, Some((&other, 1.0)), 100);
        assert!(text
            .lines()
            .any(|l| l.starts_with("default") && l.contains(" - ")));
        // A counter that went backwards (a new ring) gives no rate either.
        let later = sample_status(10, 1, 0.0);
        let text = render(&later, Some((&now, 1.0)), 100);
        let ring0 = text.lines().find(|l| l.starts_with("default")).unwrap();
        assert!(ring0.contains(" - "), "{ring0}");
    }

    #[test]
    fn render_tolerates_missing_and_odd_fields() {
        for v in [
            json!({}),
            json!({"jobs": "x", "domains": [1, {"name": 3}], "journal": [{}]}),
            json!({"jobs": [{"rings": [{"slots": 0, "occupancy": 1}]}], "pid": "x"}),
            json!({"domains": [{"name": "web", "realized_share": 7.0, "target_share": -1.0}]}),
        ] {
            let text = render(&v, Some((&v, 0.0)), 10);
            assert!(text.contains("millrace"), "{text}");
            let _ = render_status(&v);
        }
        let text = render(&json!({"jobs": []}), None, 80);
        assert!(text.contains("no job is connected"));
    }

    #[test]
    fn bars() {
        assert_eq!(bar(0.5, 4), "[##..]");
        assert_eq!(bar(2.0, 3), "[###]");
        assert_eq!(bar(f64::NAN, 2), "[..]");
        assert_eq!(bar_with_mark(0.25, 0.75, 4), "[#..|]");
        assert_eq!(bar_with_mark(0.75, 0.25, 4), "[#+#.]");
        assert_eq!(bar_with_mark(0.0, 1.0, 4), "[...|]");
    }
}
