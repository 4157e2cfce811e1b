//! `millrace top`: a live view of a running daemon, redrawn from a STATUS every interval,
//! with rates taken between two of them.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use millrace::control::{Connection, CtlError};
use millrace::wire::status::{RingStatus, Status};

use super::journal::change_text;
use super::status::{
    draining_line, duration_text, fetch_status, last_reload_line, or, pct, poisoned_lines,
    read_status, stuck_lines,
};
use super::TopArgs;

/// Domains the mixture table shows at most: those with the largest target shares.
const TOP_DOMAINS: usize = 24;

/// Rings the table shows at most: those whose trainers waited longest, then the slowest.
const TOP_RINGS: usize = 32;

/// One ring's line of the frame: its figures and its rates since the previous frame
/// (`None` without one, or for a ring that is new since).
#[derive(Clone, Copy)]
struct RingRow<'a> {
    job: &'a str,
    ring: &'a RingStatus,
    tokens: Option<f64>,
    steps: Option<f64>,
    cons: Option<f64>,
    prod: Option<f64>,
}

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
/// previous one and the seconds between them. Pure, so it is tested on sample statuses;
/// a ring made again since (another serial: its counters started over, and may already
/// be past the old ring's), a restarted daemon or a counter that went backwards shows no
/// rate. Lines are cut to `width` characters.
pub fn render(now: &Status, prev: Option<(&Status, f64)>, width: usize) -> String {
    let width = width.max(40);
    // Rates only between two statuses of one daemon process (pid 0: none reported).
    let prev =
        prev.filter(|(p, dt)| *dt > 0.0 && dt.is_finite() && p.pid == now.pid && now.pid != 0);
    let mut lines: Vec<String> = Vec::new();
    lines.push(format!(
        "millrace {}  pid {}  up {}  fingerprint {}",
        or(&now.version, "-"),
        now.pid,
        duration_text(now.uptime_s),
        or(&now.fingerprint, "-"),
    ));
    lines.push(format!(
        "clients {}  reloads {} (failed {})  first changeable step {}  padding {}  truncation {}",
        now.clients,
        now.reloads,
        now.failed_reloads,
        now.first_changeable_step,
        pct(now.padding_fraction),
        pct(now.truncation_fraction),
    ));
    lines.extend(draining_line(now));
    lines.extend(last_reload_line(now));
    lines.extend(poisoned_lines(now, 1));
    lines.extend(stuck_lines(now));
    lines.push(String::new());
    // As wide as the longest job name (within reason): a longer one shifted its rows.
    let jw = (now.jobs.iter())
        .map(|j| or(&j.job, "-").chars().count())
        .max()
        .unwrap_or(0)
        .clamp(9, 32);
    if now.jobs.is_empty() {
        lines.push("no job is connected".into());
    } else {
        lines.push(format!(
            "{:<jw$} {:>4} {:>8} {:>8} {:>7} {:<12} {:>9} {:>9} {:>5}",
            "job", "rank", "step", "tokens/s", "steps/s", "ring", "cons.wait", "prod.wait", "peers"
        ));
    }
    let rows: Vec<RingRow> = now
        .jobs
        .iter()
        .flat_map(|j| j.rings.iter().map(move |r| (j, r)))
        .map(|(j, r)| {
            let before = prev.and_then(|(p, dt)| {
                p.jobs
                    .iter()
                    .filter(|pj| pj.job == j.job)
                    .flat_map(|pj| &pj.rings)
                    .find(|pr| pr.dp_rank == r.dp_rank && pr.serial == r.serial)
                    .map(|pr| (pr, dt))
            });
            let rate = |field: fn(&RingStatus) -> f64| -> Option<f64> {
                let (pr, dt) = before?;
                let (a, b) = (field(pr), field(r));
                (b >= a).then(|| (b - a) / dt)
            };
            RingRow {
                job: or(&j.job, "-"),
                ring: r,
                tokens: rate(|r| r.tokens_delivered as f64),
                steps: rate(|r| r.released_step as f64),
                cons: rate(|r| r.consumer_wait_s),
                prod: rate(|r| r.producer_wait_s),
            }
        })
        .collect();
    // A daemon of hundreds of rings would scroll the frame away: the rings that most need
    // a look are shown (trainers waiting for data the longest, then those furthest
    // behind), in job and rank order, and the rest summed up in one line.
    let mut shown: Vec<usize> = (0..rows.len()).collect();
    if shown.len() > TOP_RINGS {
        let waited = |i: usize| match prev {
            Some(_) => rows[i].cons.unwrap_or(0.0),
            None => rows[i].ring.consumer_wait_s,
        };
        shown.sort_by(|&a, &b| {
            waited(b)
                .total_cmp(&waited(a))
                .then(rows[a].ring.released_step.cmp(&rows[b].ring.released_step))
                .then(a.cmp(&b))
        });
        shown.truncate(TOP_RINGS);
        shown.sort_unstable();
    }
    let opt = |v: Option<f64>, f: &dyn Fn(f64) -> String| v.map_or("-".into(), f);
    for &i in &shown {
        let RingRow {
            job,
            ring: r,
            tokens,
            steps,
            cons,
            prod,
        } = rows[i];
        let ring = if r.slots > 0 {
            let (o, s) = (r.occupancy, r.slots);
            format!("{} {o}/{s}", bar(o as f64 / f64::from(s), 6))
        } else {
            "-".into()
        };
        lines.push(format!(
            "{:<jw$} {:>4} {:>8} {:>8} {:>7} {:<12} {:>9} {:>9} {:>5}",
            job,
            r.dp_rank,
            r.released_step,
            opt(tokens, &millrace::util::si),
            opt(steps, &|v| format!("{v:.2}")),
            ring,
            opt(cons, &|v| format!("{v:.3}")),
            opt(prod, &|v| format!("{v:.3}")),
            r.peers.len(),
        ));
    }
    let rest: Vec<&RingRow> = (0..rows.len())
        .filter(|i| shown.binary_search(i).is_err())
        .map(|i| &rows[i])
        .collect();
    if !rest.is_empty() {
        let steps = rest.iter().map(|r| r.ring.released_step);
        let (lo, hi) = (steps.clone().min(), steps.max());
        let tokens: Option<f64> = rest.iter().map(|r| r.tokens).sum();
        let waits = rest.iter().filter_map(|r| r.cons);
        let most = waits.fold(None, |m: Option<f64>, w| Some(m.map_or(w, |m| m.max(w))));
        lines.push(format!(
            "{} more rings: steps {}..{}, {} tokens/s, cons.wait at most {} \
             (`millrace status` lists all)",
            rest.len(),
            lo.unwrap_or(0),
            hi.unwrap_or(0),
            opt(tokens, &millrace::util::si),
            opt(most, &|v| format!("{v:.3}")),
        ));
    }
    if !now.jobs.is_empty() {
        lines.push(
            "waits: s/s trainers waited for data (cons) / the daemon for a free slot (prod)".into(),
        );
    }
    if !now.domains.is_empty() {
        lines.push(String::new());
        let name_w = now
            .domains
            .iter()
            .map(|d| or(&d.name, "-").chars().count())
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
        // A run of hundreds of domains would scroll the frame away: the largest targets
        // are shown, in config order, and the rest summed up in one line.
        let mut shown: Vec<usize> = (0..now.domains.len()).collect();
        if shown.len() > TOP_DOMAINS {
            shown.sort_by(|&a, &b| {
                let t = |i: usize| now.domains[i].target_share;
                t(b).total_cmp(&t(a)).then(a.cmp(&b))
            });
            shown.truncate(TOP_DOMAINS);
            shown.sort_unstable();
        }
        for &i in &shown {
            let d = &now.domains[i];
            lines.push(format!(
                "{:<name_w$} {}  {:>6} of {:>6}  epochs {:.4}",
                or(&d.name, "-"),
                bar_with_mark(d.realized_share, d.target_share, bar_w),
                pct(d.realized_share),
                pct(d.target_share),
                d.epochs,
            ));
        }
        let rest: Vec<_> = (0..now.domains.len())
            .filter(|i| shown.binary_search(i).is_err())
            .map(|i| &now.domains[i])
            .collect();
        if !rest.is_empty() {
            let sum = |f: fn(&millrace::wire::status::DomainStatus) -> f64| -> f64 {
                rest.iter().map(|d| f(d)).sum()
            };
            let most = rest
                .iter()
                .map(|d| d.epochs)
                .fold(f64::NEG_INFINITY, f64::max);
            lines.push(format!(
                "{} more domains: {} of {} together, at most {most:.4} epochs \
                 (`millrace status` lists every one)",
                rest.len(),
                pct(sum(|d| d.realized_share)),
                pct(sum(|d| d.target_share)),
            ));
        }
    }
    // The newest change, or that STATUS could not list it: the last entry listed is an
    // older one then.
    match now.newest_change() {
        Some(last) => {
            lines.push(String::new());
            lines.push(format!(
                "last change: from step {} ({}) {}",
                last.at_step,
                or(&last.source, "-"),
                change_text(last)
            ));
        }
        None if now.journal_omitted.is_some() => {
            let n = now.journal_changes;
            lines.push(String::new());
            lines.push(format!(
                "last change too large to show (change {n} of {n}; `millrace ctl journal` \
                 lists it while the journal fits one frame)"
            ));
        }
        None => {}
    }
    let mut out = String::new();
    for l in lines {
        let cut: String = l.chars().take(width).collect();
        out.push_str(cut.trim_end());
        out.push('\n');
    }
    out
}

/// One STATUS on `conn`, typed.
fn fetch(conn: &mut Connection) -> anyhow::Result<Status> {
    read_status(&fetch_status(conn)?, conn.socket())
}

/// One STATUS on the connection kept between frames, else on a new one (kept for the
/// next frame). A kept connection that failed for another reason than a timeout is
/// replaced at once: the daemon closes one idle past `[serve] control_idle_timeout_ms`
/// (60 s), which an interval that long finds closed every time.
fn fetch_kept(
    conn: &mut Option<Connection>,
    socket: &Path,
    timeout: Duration,
) -> anyhow::Result<Status> {
    if let Some(c) = conn.as_mut() {
        match fetch(c) {
            Ok(st) => return Ok(st),
            Err(e) => {
                *conn = None;
                let timed_out = matches!(e.downcast_ref(), Some(CtlError::Timeout { .. }));
                if timed_out {
                    return Err(e);
                }
            }
        }
    }
    let mut c = Connection::open(socket, timeout)?;
    let st = fetch(&mut c)?;
    *conn = Some(c);
    Ok(st)
}

/// Columns of the terminal on stdout, else `$COLUMNS`, else 100.
pub(super) fn terminal_width() -> usize {
    if let Some(cols) = millrace::sys::terminal_columns() {
        return cols;
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
    let socket = args.target.socket_to_connect()?;
    let timeout = args.target.timeout();
    let interval = match args.interval_ms {
        Some(ms) => Duration::from_millis(ms),
        None => Duration::from_secs_f64(args.interval),
    }
    .max(Duration::from_millis(50));
    let mut conn = None;
    let mut prev = (fetch_kept(&mut conn, &socket, timeout)?, Instant::now());
    if args.once {
        std::thread::sleep(interval);
        let now = fetch_kept(&mut conn, &socket, timeout)?;
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
    let mut have_prev = true;
    loop {
        std::thread::sleep(interval);
        let got = fetch_kept(&mut conn, &socket, timeout);
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
    use millrace::wire::status::JournalGap;
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

    /// Hundreds of domains: the largest targets, in config order, and one line for the
    /// rest, so the frame still fits a terminal.
    #[test]
    fn render_shows_the_largest_domains_and_sums_the_rest() {
        let mut now = sample_status(3_000_000, 60, 0.75);
        let template = now.domains[0].clone();
        now.domains = (0..100)
            .map(|k| {
                let mut d = template.clone();
                d.name = format!("d{k:03}");
                // d050..d073 have the largest targets.
                d.target_share = if (50..74).contains(&k) {
                    0.02
                } else {
                    0.52 / 76.0
                };
                d.realized_share = d.target_share;
                d.epochs = k as f64 / 100.0;
                d
            })
            .collect();
        let text = render(&now, None, 120);
        let rows: Vec<&str> = text.lines().filter(|l| l.starts_with("d0")).collect();
        let names: Vec<String> = rows.iter().map(|l| l[..4].to_string()).collect();
        let want: Vec<String> = (50..74).map(|k| format!("d{k:03}")).collect();
        assert_eq!(names, want, "{text}");
        let rest = text
            .lines()
            .find(|l| l.starts_with("76 more domains"))
            .unwrap();
        assert!(rest.contains("52.0% of 52.0% together"), "{rest}");
        assert!(rest.contains("at most 0.9900 epochs"), "{rest}");
    }

    /// A daemon of 1,000 rings: the frame keeps to a terminal's worth of ring lines,
    /// shows the starved and the slowest ranks, and sums up the rest in one line.
    #[test]
    fn render_shows_the_rings_that_need_a_look_and_sums_the_rest() {
        let many = |step: u64, cwait: f64| {
            let mut st = sample_status(1000, step, 0.0);
            let template = st.jobs[0].rings[0].clone();
            st.jobs[0].rings = (0..1000u32)
                .map(|k| {
                    let mut r = template.clone();
                    r.dp_rank = k;
                    r.released_step = if k == 700 { 3 } else { step };
                    r.tokens_delivered = 1000 * r.released_step;
                    r.consumer_wait_s = if k == 400 || k == 901 { cwait } else { 0.0 };
                    r
                })
                .collect();
            st
        };
        let (prev, now) = (many(50, 1.0), many(60, 2.5));
        for frame in [
            render(&now, Some((&prev, 2.0)), 120),
            render(&now, None, 120),
        ] {
            let rings: Vec<u32> = frame
                .lines()
                .filter(|l| l.starts_with("default"))
                .map(|l| l.split_whitespace().nth(1).unwrap().parse().unwrap())
                .collect();
            assert_eq!(rings.len(), TOP_RINGS, "{frame}");
            for k in [400, 700, 901] {
                assert!(rings.contains(&k), "rank {k} not shown: {frame}");
            }
            assert!(rings.windows(2).all(|w| w[0] < w[1]), "{rings:?}");
            let rest = frame
                .lines()
                .find(|l| l.starts_with("968 more rings: steps 60..60"))
                .unwrap_or_else(|| panic!("{frame}"));
            assert!(rest.contains("(`millrace status` lists all)"), "{rest}");
            assert!(frame.lines().count() < 60, "{frame}");
        }
        let frame = render(&now, Some((&prev, 2.0)), 120);
        let rest = frame.lines().find(|l| l.contains("more rings")).unwrap();
        // 968 rings of 10 steps of 1000 tokens in 2 s, none waiting.
        assert!(rest.contains("4.84M tokens/s"), "{rest}");
        assert!(rest.contains("cons.wait at most 0.000"), "{rest}");
    }

    #[test]
    fn render_without_prev_or_across_a_restart_shows_no_rates() {
        let now = sample_status(3_000_000, 60, 0.75);
        let text = render(&now, None, 100);
        let ring0 = text.lines().find(|l| l.starts_with("default")).unwrap();
        assert!(!ring0.contains("M "), "{ring0}");
        assert!(ring0.contains(" - "), "{ring0}");
        let mut other = sample_status(1, 1, 0.0);
        other.pid = 999;
        let text = render(&now, Some((&other, 1.0)), 100);
        assert!(text
            .lines()
            .any(|l| l.starts_with("default") && l.contains(" - ")));
        // A counter that went backwards (a new ring) gives no rate either.
        let later = sample_status(10, 1, 0.0);
        let text = render(&later, Some((&now, 1.0)), 100);
        let ring0 = text.lines().find(|l| l.starts_with("default")).unwrap();
        assert!(ring0.contains(" - "), "{ring0}");
        // Nor does a ring made again whose counters are already past the old one's.
        let mut remade = sample_status(9_000_000, 90, 0.75);
        for r in remade.jobs.iter_mut().flat_map(|j| j.rings.iter_mut()) {
            r.serial += 1;
        }
        let text = render(&remade, Some((&now, 1.0)), 100);
        let ring0 = text.lines().find(|l| l.starts_with("default")).unwrap();
        assert!(ring0.contains(" - ") && !ring0.contains("M "), "{ring0}");
    }

    /// Fields a daemon did not send (read as defaults) and values out of range (a share
    /// above 1, an empty ring, a tiny width) still draw a frame.
    #[test]
    fn render_tolerates_missing_fields_and_odd_values() {
        for v in [
            json!({}),
            json!({"domains": [{}], "journal": [{}]}),
            json!({"jobs": [{"rings": [{"slots": 0, "occupancy": 1}]}]}),
            json!({"domains": [{"name": "web", "realized_share": 7.0, "target_share": -1.0}]}),
        ] {
            let st = read_status(&v, std::path::Path::new("t.sock")).unwrap();
            let text = render(&st, Some((&st, 0.0)), 10);
            assert!(text.contains("millrace"), "{text}");
            assert!(render_status(&st).contains("millrace"));
        }
        let text = render(&Status::default(), None, 80);
        assert!(text.contains("no job is connected"));
    }

    /// When the newest change is too large for STATUS and older ones fit, STATUS lists
    /// the older ones and a gap at the end: `top` showed the last of them as the last
    /// change. It says the newest change is too large to show, and which it is.
    #[test]
    fn top_does_not_show_an_older_change_as_the_last() {
        let mut st = sample_status(1000, 57, 0.25);
        let text = render(&st, None, 200);
        assert!(text.contains("last change: from step 40 (ctl)"), "{text}");
        // Of 5 changes the first and the newest listed.
        st.journal.push(st.journal[0].clone());
        st.journal[1].at_step = 41;
        st.journal_changes = 5;
        st.journal_omitted = Some(JournalGap {
            after: 1,
            changes: 3,
        });
        let text = render(&st, None, 200);
        assert!(text.contains("last change: from step 41 (ctl)"), "{text}");
        // Changes 1 and 2 listed, 3 to 5 (the newest among them) left out.
        st.journal_omitted = Some(JournalGap {
            after: 2,
            changes: 3,
        });
        let text = render(&st, None, 200);
        assert!(!text.contains("last change: from"), "{text}");
        assert!(
            text.contains("last change too large to show (change 5 of 5;"),
            "{text}"
        );
        // None of them listed.
        st.journal.clear();
        st.journal_omitted = Some(JournalGap {
            after: 0,
            changes: 5,
        });
        let text = render(&st, None, 200);
        assert!(
            text.contains("last change too large to show (change 5 of 5;"),
            "{text}"
        );
    }

    /// A stage change (`set-stage`: no schedule points) is shown by what it sets: `top`
    /// showed "last change: from step 200000 (ctl)" and nothing more.
    #[test]
    fn top_shows_a_stage_change_as_the_last() {
        let mut st = sample_status(1000, 57, 0.25);
        st.journal[0].points.clear();
        st.journal[0].stage = Some(millrace::wire::status::JournalStage {
            seq_len: 32768,
            global_batch_rows: 128,
            best_fit_window: 64,
            chain_groups: false,
        });
        let text = render(&st, None, 200);
        assert!(
            text.contains(
                "last change: from step 40 (ctl) stage: 32768 tokens x 128 rows, window 64"
            ),
            "{text}"
        );
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
