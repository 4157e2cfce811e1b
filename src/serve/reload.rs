//! Live changes from the config file: the watcher, SIGHUP and `ctl reload` re-read it and
//! apply its schedule; CONTROL requests (`set_weights`, `reload`, `status`, `journal`)
//! are answered here too. Only `[plan]` weights and schedule change live: any other
//! change to `[corpus]` or `[plan]` refuses the reload as a whole.

use std::path::PathBuf;

use tracing::{info, warn};

use super::hub::{self, Applied, ChangeError, ChangeRequest, Late, Proposal};
use super::Daemon;
use crate::config::plan::{PlanConfig, SchedulePoint};
use crate::config::serve::LateSetting;
use crate::config::{Config, ConfigError};
use crate::wire::control::{self, Control};
use crate::wire::protocol::Code;
use crate::wire::status::ReloadOutcome;

/// The most bytes of JSON a reply's journal may take: one frame less room for the
/// reply's other fields (a change's message names at most a few schedule points).
const JOURNAL_REPLY_ROOM: usize = crate::wire::MAX_JSON_FRAME - (1 << 20);

/// Where a reload or change can come from; each has its reload counters from the start.
pub(super) const RELOAD_SOURCES: [&str; 5] = ["file", "sighup", "ctl", "client", "cursor"];

/// What a file or SIGHUP reload does with a late change, as `[serve] late_changes` says.
impl LateSetting {
    fn late(self) -> Late {
        match self {
            LateSetting::Refuse => Late::Refuse,
            LateSetting::Next => Late::Next,
        }
    }
}

/// The parts of the config file a reload compares against.
pub(super) struct Running {
    /// `[corpus]`, which a reload may not change.
    corpus: Option<toml::Value>,
    /// `[plan]` without its weights and schedule, which a reload may not change either.
    fixed: PlanConfig,
    /// The file's schedule, the base a reload's first difference is measured from.
    points: Vec<SchedulePoint>,
    /// `[serve]` as the daemon started with it, only to say that changes there need a
    /// restart.
    serve: Option<toml::Table>,
    /// Hash of the file's bytes when last applied or refused, for the watcher.
    seen: Option<u64>,
}

impl Running {
    pub(super) fn of(cfg: &Config, plan: &PlanConfig, hash: u64) -> Running {
        Running {
            corpus: toml::Value::try_from(&cfg.corpus).ok(),
            fixed: fixed_part(plan),
            points: plan.points(),
            serve: cfg.serve.clone(),
            seen: Some(hash),
        }
    }
}

/// Why a reload was refused before anything was applied (the file's own errors, or a
/// change that needs a restart); it reaches the client as an `invalid` ChangeError.
#[derive(Debug, thiserror::Error)]
enum Refused {
    /// The file cannot be read, parsed or planned.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// `[corpus]` changed.
    #[error(
        "{}: [corpus] changed; a reload only changes [plan] weights and schedule \
         (restart the daemon to change the corpus)",
        .0.display()
    )]
    Corpus(PathBuf),
    /// `[plan]` changed beyond weights and schedule: the file, and the keys that did.
    #[error(
        "{}: [plan] {} changed; a reload only changes [plan] weights and schedule (restart \
         the daemon to apply them{})",
        .0.display(),
        .1,
        if .1.contains("`plan.stage`") {
            "; a stage can be added live with `millrace ctl set-stage`"
        } else {
            ""
        }
    )]
    Fixed(PathBuf, String),
    /// `[serve]` holds what the next start would refuse (a ring budget that holds no
    /// ring, a socket path `serve` cannot bind): refused while its author is at hand.
    #[error("{}: {why}; the next start would refuse it", .0.display(), why = .1)]
    Serve(PathBuf, String),
}

/// The `[serve]` keys that differ between the running table and a reloaded one, as
/// "`a`, `b`" (a key added, removed or changed); `None` when they are the same.
fn serve_changes(running: Option<&toml::Table>, new: Option<&toml::Table>) -> Option<String> {
    let empty = toml::Table::new();
    let (old, new) = (running.unwrap_or(&empty), new.unwrap_or(&empty));
    let keys: std::collections::BTreeSet<&String> = old.keys().chain(new.keys()).collect();
    let changed: Vec<String> = keys
        .into_iter()
        .filter(|k| old.get(*k) != new.get(*k))
        .map(|k| format!("`{k}`"))
        .collect();
    (!changed.is_empty()).then(|| changed.join(", "))
}

/// `[plan]` without its weights and schedule: what a reload may not change.
fn fixed_part(p: &PlanConfig) -> PlanConfig {
    let mut p = p.clone();
    p.weights = None;
    p.schedule.clear();
    p
}

/// The `[plan]` keys that differ between `old` and `new`, as "`plan.seed` (7 -> 8)" for
/// a value and "`plan.stage`" for a table or list: a refused reload names what to undo.
fn plan_changes(old: &PlanConfig, new: &PlanConfig) -> String {
    let table = |p: &PlanConfig| match toml::Value::try_from(p) {
        Ok(toml::Value::Table(t)) => t,
        _ => toml::Table::new(),
    };
    let (old, new) = (table(old), table(new));
    let keys: std::collections::BTreeSet<&String> = old.keys().chain(new.keys()).collect();
    let changed: Vec<String> = (keys.into_iter())
        .filter(|k| old.get(*k) != new.get(*k))
        .map(|k| match (old.get(k), new.get(k)) {
            (Some(a), Some(b)) if !a.is_table() && !a.is_array() => {
                format!("`plan.{k}` ({a} -> {b})")
            }
            _ => format!("`plan.{k}`"),
        })
        .collect();
    match changed.is_empty() {
        true => "settings other than weights and schedule".into(),
        false => changed.join(", "),
    }
}

impl Daemon {
    /// Re-reads the config file and applies its schedule from its first difference with
    /// the one last applied. Anything else that changed in `[corpus]` or `[plan]` refuses
    /// the reload as a whole (it needs a restart), as does a `[serve]` the daemon could not
    /// start with; valid `[serve]` changes are only named, in the log and the reply.
    fn reload_file(&self, source: &'static str) -> Result<hub::Applied, ChangeError> {
        let r = self.reload_file_once(source);
        let unix_s = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let outcome = match &r {
            Ok(a) => ReloadOutcome {
                source: source.to_string(),
                ok: true,
                unix_s,
                code: None,
                message: a.message.clone(),
            },
            Err(e) => ReloadOutcome {
                source: source.to_string(),
                ok: false,
                unix_s,
                code: Some(e.code.as_str().to_string()),
                message: e.message.clone(),
            },
        };
        *self.last_reload.lock().unwrap_or_else(|p| p.into_inner()) = Some(outcome);
        r
    }

    /// One reload, as [`Daemon::reload_file`] describes; that wrapper records the outcome.
    fn reload_file_once(&self, source: &'static str) -> Result<hub::Applied, ChangeError> {
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        let (cfg, plan) = match self.read_for_reload(&mut running) {
            Ok(x) => x,
            Err(m) => {
                self.hub.reload_failed(source);
                warn!(source, "reload refused, the old weights stay: {m}");
                return Err(ChangeError {
                    code: Code::Invalid,
                    message: m.to_string(),
                    first_changeable: None,
                });
            }
        };
        // Against the [serve] the daemon started with (a reload never applies one), so
        // each reload of a file that still differs says so, in its reply too.
        let serve_note = serve_changes(running.serve.as_ref(), cfg.serve.as_ref()).map(|keys| {
            let note = format!(
                "[serve] {keys} changed in {}; not applied: [serve] settings apply at the \
                 next restart",
                self.config.display()
            );
            warn!(source, "{note}");
            note
        });
        let points = plan.points();
        let r = self
            .hub
            .change(&ChangeRequest {
                proposal: Proposal::Schedule {
                    old: running.points.clone(),
                    new: points.clone(),
                },
                at_step: None,
                late: self.serve.late_changes.late(),
                source,
            })
            .map_err(|mut e| {
                // Say why the edit reaches back that far when a ramp is the reason.
                // (Both are in the schedule's own steps, as its points are.)
                let at = self.hub.plan().points_difference(&running.points, &points);
                let note = at.and_then(|p| crate::config::plan::ramp_note(&points, p));
                if let (Some(note), Code::Late) = (note, e.code) {
                    e.message = format!("{}; {note}", e.message);
                }
                e
            });
        let r = r.map(|mut a| {
            // Say which file was read: `ctl --config OTHER reload` reaches this daemon when
            // OTHER names its socket, and "nothing changed" then hid that OTHER's edits
            // were never read.
            if a.applied_step.is_none() {
                a.message = format!("{}: {}", self.config.display(), a.message);
            }
            if let Some(note) = serve_note {
                a.message = format!("{}; {note}", a.message);
            }
            a
        });
        let r = r.map(|mut a| {
            // A knot the file adds (or drops) on a line the journal does not redraw keeps
            // every weight, so the change applies; but a daemon restarted with this file
            // would record another history and refuse the trainers' blobs after it.
            let plan = self.hub.plan();
            if let Some(k) = plan.restart_knot(&points) {
                let t = plan.trainer_step_of(k);
                let note = format!(
                    "warning: {} and the schedule in force pin the weights at different \
                     steps from trainer step {t} on (a point added or removed there, even \
                     one on the line already in force); a daemon restarted with this file \
                     would refuse the trainers' cursor blobs after step {t}. Keep the \
                     file's points as they were before step {t}, or add points only at \
                     steps not yet published",
                    self.config.display()
                );
                warn!(source, "{note}");
                a.message = format!("{}; {note}", a.message);
            }
            a
        });
        match &r {
            Ok(a) => {
                running.points = points;
                info!(source, "reload: {}", a.message);
            }
            Err(e) => warn!(
                source,
                code = e.code.as_str(),
                "reload refused, the old weights stay: {}",
                e.message
            ),
        }
        r
    }

    /// Reads the config file for a reload and checks that only what a reload may change
    /// did. The file counts as seen whatever comes of it: the watcher does not retry a
    /// refused file.
    fn read_for_reload(&self, running: &mut Running) -> Result<(Config, PlanConfig), Refused> {
        let bytes = Config::read_bytes(&self.config)?;
        // Seen before it is parsed: a file that does not parse is not retried either.
        running.seen = Some(xxhash_rust::xxh3::xxh3_64(&bytes));
        let cfg = Config::from_bytes(&self.config, bytes)?;
        let plan = cfg.plan_config()?;
        // Not applied, but a file whose [serve] the next start would refuse is refused
        // now, while its author is at hand, not at the next restart.
        let serve = crate::config::serve::ServeConfig::from_config(&cfg).map_err(|e| match e {
            // Said as the other [serve] refusals are: the next start would refuse it.
            ConfigError::Invalid { field, what, .. } => {
                Refused::Serve(self.config.clone(), format!("{field}: {what}"))
            }
            e => Refused::Config(e),
        })?;
        if toml::Value::try_from(&cfg.corpus).ok() != running.corpus {
            return Err(Refused::Corpus(self.config.clone()));
        }
        if fixed_part(&plan) != running.fixed {
            let what = plan_changes(&running.fixed, &fixed_part(&plan));
            return Err(Refused::Fixed(self.config.clone(), what));
        }
        // Judged as the next start would judge them (token dtype, pad token, ring budget,
        // socket group: a reload accepted `socket_group = "nosuchgrp"` and the restart
        // failed). Stages are part of what a reload may not change: the plan in force
        // has them. The socket only when the file moves it and `--socket` did not choose
        // it (then the next start does not use the file's); the metrics address only when
        // the file moves it (this daemon holds the one it has).
        let refuse = |why: String| Refused::Serve(self.config.clone(), why);
        super::load::start_problem(&serve, &self.hub.shard_dtypes(), &self.hub.plan())
            .map_err(refuse)?;
        let moved = !self.socket_flag && serve.socket != self.serve.socket;
        if let Some(why) = moved
            .then(|| crate::config::serve::socket_problem(&serve.socket))
            .flatten()
        {
            return Err(refuse(format!("[serve] socket: {why}")));
        }
        // The port this daemon holds is no test: it is free once the daemon stops (a
        // reload that only narrowed "0.0.0.0:9464" to "127.0.0.1:9464" was refused).
        let port = |a: Option<&str>| a.and_then(|a| a.parse::<std::net::SocketAddr>().ok());
        let held = port(self.serve.metrics_addr.as_deref()).map(|a| a.port());
        if let Some(addr) = serve.metrics_addr.as_deref() {
            if held != port(Some(addr)).map(|a| a.port()) {
                if let Err(e) = std::net::TcpListener::bind(addr) {
                    return Err(refuse(format!(
                        "[serve] metrics_addr {addr:?}: cannot listen: {e}"
                    )));
                }
            }
        }
        Ok((cfg, plan))
    }

    /// The file watcher's check: reloads when the file's bytes changed since they were
    /// last applied and have stayed the same for one more interval (an editor's partial
    /// write is not applied).
    pub(super) fn watch_tick(&self) {
        // One tick at a time: a tick that finds the previous one still reloading skips.
        let Ok(mut pending) = self.pending.try_lock() else {
            return;
        };
        let bytes = match Config::read_bytes(&self.config) {
            Ok(bytes) => bytes,
            // Mid-rename, or gone for a moment: look again next tick.
            Err(ConfigError::Read { source, .. })
                if source.kind() != std::io::ErrorKind::InvalidData =>
            {
                return
            }
            // A FIFO, a device or a file too large: refused once as a reload (logged, and
            // in STATUS `last_reload`), then seen by what it is, since its contents are
            // never read (without its sizes: a file that keeps growing is refused once).
            Err(e) => {
                let what: String = e
                    .to_string()
                    .chars()
                    .filter(|c| !c.is_ascii_digit())
                    .collect();
                let h = xxhash_rust::xxh3::xxh3_64(what.as_bytes());
                let seen = self.running.lock().unwrap_or_else(|p| p.into_inner()).seen;
                if Some(h) != seen {
                    *pending = None;
                    let _ = self.reload_file("file");
                    self.running.lock().unwrap_or_else(|p| p.into_inner()).seen = Some(h);
                }
                return;
            }
        };
        let h = xxhash_rust::xxh3::xxh3_64(&bytes);
        let seen = self.running.lock().unwrap_or_else(|p| p.into_inner()).seen;
        if Some(h) == seen {
            *pending = None;
            return;
        }
        if *pending == Some(h) {
            *pending = None;
            info!(config = %self.config.display(), "config file changed; reloading");
            let _ = self.reload_file("file");
        } else {
            *pending = Some(h);
        }
    }

    /// Answers one CONTROL payload from a peer of uid `uid` (`None`: SO_PEERCRED failed),
    /// which a change needs to be allowed by `[serve] control_uids`.
    pub(super) fn control(&self, payload: &[u8], uid: Option<u32>) -> serde_json::Value {
        let req = match control::parse_control(payload) {
            Ok(r) => r,
            Err((op, message)) => {
                return serde_json::json!({"ok": false, "op": op, "code": Code::Protocol, "message": message})
            }
        };
        let change = match &req {
            Control::Status | Control::Journal => None,
            Control::Reload => Some("reload"),
            Control::SetWeights { .. } => Some("set_weights"),
            Control::SetStage { .. } => Some("set_stage"),
        };
        if let Some(op) = change {
            if let Err(e) = self.policy.may_change(uid) {
                // Rate-limited as refused connections are: a peer may ask in a loop.
                if let Some(k) = self.warn_control.allow() {
                    let note = super::limits::suppressed_note(k);
                    warn!(code = "access", "{op} refused, nothing changed: {e}{note}");
                }
                return serde_json::json!({"ok": false, "op": op, "code": Code::Access, "message": e.to_string()});
            }
        }
        let (op, result) = match req {
            Control::Status => {
                return serde_json::json!({"ok": true, "op": "status", "status": self.status()})
            }
            Control::Journal => {
                return match self.hub.journal_within(JOURNAL_REPLY_ROOM) {
                    Some(j) => serde_json::json!({"ok": true, "op": "journal", "journal": j}),
                    None => serde_json::json!({"ok": false, "op": "journal", "code": Code::Busy,
                        "message": format!("the journal takes more than one frame as JSON \
                            ({JOURNAL_REPLY_ROOM} bytes); `millrace status` lists its first \
                            and last changes")}),
                };
            }
            Control::Reload => ("reload", self.reload_file("ctl")),
            Control::SetWeights {
                weights,
                at_step,
                late_next,
                source,
            } => {
                let proposal = Proposal::Weights(weights);
                let r = self.change_logged("set_weights", proposal, at_step, late_next, source);
                ("set_weights", r)
            }
            Control::SetStage {
                seq_len,
                global_batch_rows,
                best_fit_window,
                chain_groups,
                at_step,
                late_next,
                source,
            } => {
                let proposal = Proposal::Stage {
                    seq_len,
                    global_batch_rows,
                    best_fit_window,
                    chain_groups,
                };
                let r = self.change_logged("set_stage", proposal, at_step, late_next, source);
                ("set_stage", r)
            }
        };
        match result {
            Ok(a) => match self.hub.journal_within(JOURNAL_REPLY_ROOM) {
                Some(journal) => serde_json::json!({
                    "ok": true,
                    "op": op,
                    "requested_step": a.requested_step,
                    "applied_step": a.applied_step,
                    "moved": a.moved,
                    "journal": journal,
                    "message": a.message,
                }),
                // Applied: said so, as the reply with the journal cannot be sent.
                None => serde_json::json!({
                    "ok": false,
                    "op": op,
                    "code": Code::Busy,
                    "message": format!(
                        "{} (applied; the reply would not fit one frame with the journal: \
                         `millrace status` lists its first and last changes)",
                        a.message
                    ),
                }),
            },
            Err(e) => {
                let mut v = serde_json::json!({"ok": false, "op": op, "code": e.code, "message": e.message});
                if let Some(fc) = e.first_changeable {
                    v["first_changeable_step"] = serde_json::json!(fc);
                }
                v
            }
        }
    }

    /// Applies a CONTROL change (`op`) through the hub and logs the outcome: accepted
    /// (info) or refused with what stays in force (warn).
    fn change_logged(
        &self,
        op: &'static str,
        proposal: Proposal,
        at_step: Option<u64>,
        late_next: bool,
        source: &'static str,
    ) -> Result<Applied, ChangeError> {
        let r = self.hub.change(&ChangeRequest {
            proposal,
            at_step,
            late: if late_next { Late::Next } else { Late::Refuse },
            source,
        });
        match &r {
            Ok(a) => info!(source, "{op}: {}", a.message),
            Err(e) => warn!(
                source,
                code = e.code.as_str(),
                "{op} refused, nothing changed: {}",
                crate::wire::protocol::log_safe(&e.message)
            ),
        }
        r
    }

    /// SIGHUP: reloads the file, telling systemd (RELOADING=1, then READY=1 with the
    /// outcome) so `systemctl reload` waits for it and shows it.
    pub(super) fn sighup(&self) {
        self.notifier.reloading();
        let line = match self.reload_file("sighup") {
            Ok(a) => format!("reloaded: {}", a.message),
            Err(e) => format!("reload refused ({}): {}", e.code, e.message),
        };
        self.notifier.reloaded(&line);
    }
}
