//! `millrace ctl` (change the mixture of a running daemon, reload its config, read its
//! change journal), `millrace status` (one snapshot, for people or, with `--json`, for
//! scripts) and `millrace top` (a live view): their flags, and `ctl`'s requests. The
//! connection and the requests themselves are the library's ([`millrace::control`]).

mod journal;
mod status;
mod top;

pub use status::run_status;
pub use top::run_top;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use serde::Deserialize;
use serde_json::Value;

use millrace::control::{
    journal_request, reload_request, request, set_stage_request, set_weights_request, Late,
    Rejection, StageRequest,
};
use millrace::wire::status::JournalEntry;

use journal::{describe_change, render_journal};

/// Parses a number of seconds for the `--timeout`-style flags (fractions allowed).
pub fn parse_secs(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a number of seconds (e.g. 10 or 0.5)"))?;
    if !(v.is_finite() && v > 0.0 && v <= 86_400.0) {
        return Err(format!("{v} s is outside (0, 86400]"));
    }
    Ok(v)
}

/// Parses one `NAME=WEIGHT` argument of `set-weights`; the message names the argument.
/// NaN, infinities and negative weights are refused here, since JSON cannot carry the
/// first two and the daemon would refuse the last.
pub fn parse_weight(arg: &str) -> Result<(String, f64), String> {
    let Some((name, value)) = arg.split_once('=') else {
        return Err(format!(
            "`{arg}` is not NAME=WEIGHT (e.g. web=0.5): there is no '='"
        ));
    };
    let name = name.trim();
    if name.is_empty() {
        return Err(format!("`{arg}` has no domain name before '='"));
    }
    let w: f64 = value
        .trim()
        .parse()
        .map_err(|_| format!("`{arg}`: weight `{value}` is not a number"))?;
    if w.is_nan() {
        return Err(format!("`{arg}`: weight is NaN"));
    }
    if w.is_infinite() {
        return Err(format!("`{arg}`: weight is infinite"));
    }
    if w < 0.0 {
        return Err(format!("`{arg}`: weight {w} is negative"));
    }
    Ok((name.to_string(), w))
}

/// The weights of `set-weights` as a map; a domain named twice is an error.
pub fn weights_map(pairs: &[(String, f64)]) -> Result<BTreeMap<String, f64>, String> {
    let mut out = BTreeMap::new();
    for (name, w) in pairs {
        if out.insert(name.clone(), *w).is_some() {
            return Err(format!("domain `{name}` is given more than once"));
        }
    }
    if out.is_empty() {
        return Err("no weights given (NAME=WEIGHT ...)".into());
    }
    Ok(out)
}

// ------------------------------------------------------------------------ command line

/// Which daemon to talk to: shared by `ctl`, `status` and `top`.
#[derive(clap::Args, Debug, Clone)]
pub struct Target {
    /// The daemon's socket [default: the config's `[serve] socket`, else
    /// $XDG_RUNTIME_DIR/millrace.sock, else /tmp/millrace-UID/millrace.sock].
    #[arg(long, global = true, conflicts_with = "config")]
    pub socket: Option<PathBuf>,
    /// Take the socket from this config file's `[serve] socket` (a mistake elsewhere in
    /// the file is warned of, not refused: the daemon's status says what a reload refused).
    #[arg(long, global = true)]
    pub config: Option<PathBuf>,
    /// Seconds to wait for each reply (every millrace timeout flag is in seconds).
    #[arg(long, global = true, value_name = "SECS", default_value_t = 10.0, value_parser = parse_secs)]
    pub timeout: f64,
    /// The old spelling of --timeout, in milliseconds (kept so scripts keep working).
    #[arg(long, global = true, hide = true, conflicts_with = "timeout")]
    pub timeout_ms: Option<u64>,
}

impl Target {
    /// The socket path: `--socket`, else the config's, else the daemon's default.
    pub fn socket(&self) -> anyhow::Result<PathBuf> {
        if let Some(s) = &self.socket {
            return Ok(s.clone());
        }
        if let Some(path) = &self.config {
            use millrace::config::serve::{socket_of_file, ServeConfig};
            let full = millrace::config::Config::load(path)
                .and_then(|cfg| ServeConfig::from_config(&cfg))
                .map(|serve| serve.socket);
            return match (full, socket_of_file(path)) {
                (Ok(socket), _) => Ok(socket),
                // A mistake elsewhere in the file (one a refused reload names) must not
                // keep the operator from the daemon's status: the socket alone will do.
                (Err(e), Some(socket)) => {
                    eprintln!(
                        "warning: {e}; reaching the daemon at the file's [serve] socket {}",
                        socket.display()
                    );
                    Ok(socket)
                }
                (Err(e), None) => Err(e.into()),
            };
        }
        Ok(millrace::config::serve::default_socket())
    }

    /// [`Self::socket`], refused when something other than a socket is there: connect(2)
    /// then fails with ECONNREFUSED, whose usual meaning ("a daemon that was killed left
    /// its socket behind") would send the user to delete a file that may be the config.
    pub fn socket_to_connect(&self) -> anyhow::Result<PathBuf> {
        use std::os::unix::fs::FileTypeExt;
        let socket = self.socket()?;
        if let Ok(meta) = std::fs::metadata(&socket) {
            let ft = meta.file_type();
            if !ft.is_socket() {
                let hint = if socket.extension().is_some_and(|e| e == "toml") {
                    " (a config file? pass it with --config)"
                } else {
                    ""
                };
                bail!(
                    "{}: is {}, not a unix socket: no daemon listens there{hint}",
                    socket.display(),
                    millrace::corpus::file_kind(&ft)
                );
            }
        }
        Ok(socket)
    }

    fn timeout(&self) -> Duration {
        match self.timeout_ms {
            Some(ms) => Duration::from_millis(ms.max(1)),
            None => Duration::from_secs_f64(self.timeout.max(0.001)),
        }
    }
}

/// Arguments of `millrace ctl`.
#[derive(clap::Args, Debug)]
pub struct CtlArgs {
    /// Which daemon.
    #[command(flatten)]
    pub target: Target,
    /// What to ask it.
    #[command(subcommand)]
    pub command: CtlCommand,
}

/// The requests `millrace ctl` sends.
#[derive(clap::Subcommand, Debug)]
pub enum CtlCommand {
    /// Change mixture weights from a step on; domains not named keep theirs.
    SetWeights(SetWeightsArgs),
    /// Add a stage from a step on (a long-context stage, as `[[plan.stage]]` would):
    /// rows of SEQ_LEN tokens, GLOBAL_BATCH_ROWS per step. It must fit the rings'
    /// slots (`[serve] stage_reserve_tokens`).
    SetStage(SetStageArgs),
    /// Re-read the config file (as SIGHUP does) and apply what changed.
    Reload(ReplyArgs),
    /// List the changes in force (the journal that cursor blobs carry).
    Journal(ReplyArgs),
}

/// Arguments of `millrace ctl set-weights`.
#[derive(clap::Args, Debug)]
pub struct SetWeightsArgs {
    /// NAME=WEIGHT pairs, e.g. web=0.5 code=0.3 (token weights, normalised by the daemon).
    #[arg(required = true, value_name = "NAME=WEIGHT", value_parser = parse_weight)]
    pub weights: Vec<(String, f64)>,
    /// When and how to apply it.
    #[command(flatten)]
    pub change: ChangeArgs,
}

/// What every live change takes: the step, the late policy, the reply's form.
#[derive(clap::Args, Debug)]
pub struct ChangeArgs {
    /// The trainer step the change takes effect at [default: the first that can change].
    #[arg(long)]
    pub at_step: Option<u64>,
    /// When the step was already handed out: refuse, or apply at the next step that can.
    #[arg(long, value_enum, default_value = "refuse")]
    pub late: Late,
    /// Print the daemon's reply as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `millrace ctl set-stage`.
#[derive(clap::Args, Debug)]
pub struct SetStageArgs {
    /// Tokens a row trains on from the step on.
    #[arg(long)]
    pub seq_len: u32,
    /// Rows per global batch from the step on.
    #[arg(long)]
    pub global_batch_rows: u32,
    /// Units per packing window [default: the one in force at the step].
    #[arg(long)]
    pub best_fit_window: Option<u64>,
    /// Chain `sequence`-grouped domains' long groups across rows.
    #[arg(long)]
    pub chain_groups: bool,
    /// When and how to apply it.
    #[command(flatten)]
    pub change: ChangeArgs,
}

/// Arguments of `millrace ctl reload` and `millrace ctl journal`.
#[derive(clap::Args, Debug)]
pub struct ReplyArgs {
    /// Print the daemon's reply as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `millrace status`.
#[derive(clap::Args, Debug)]
pub struct StatusArgs {
    /// Which daemon.
    #[command(flatten)]
    pub target: Target,
    /// Print the daemon's STATUS object as JSON, verbatim (for scripts).
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `millrace top`.
#[derive(clap::Args, Debug)]
pub struct TopArgs {
    /// Which daemon.
    #[command(flatten)]
    pub target: Target,
    /// Seconds between redraws (rates are taken over this interval).
    #[arg(long, value_name = "SECS", default_value_t = 1.0, value_parser = parse_secs)]
    pub interval: f64,
    /// The old spelling of --interval, in milliseconds (kept so scripts keep working).
    #[arg(long, hide = true, conflicts_with = "interval")]
    pub interval_ms: Option<u64>,
    /// Print one frame (two statuses an interval apart, so rates exist) and exit.
    #[arg(long)]
    pub once: bool,
}

/// Sends `req` and returns the reply, refused unless an accepted one answers `req`'s
/// own op: a peer that answered `{"ok":true,"op":"status"}` to `set-weights` was
/// reported as "status: nothing changed" and exit 0, as if the daemon had taken it.
fn answered(socket: &std::path::Path, req: &Value, timeout: Duration) -> anyhow::Result<Value> {
    let reply = request(socket, req, timeout)?;
    let (asked, got) = (&req["op"], reply.get("op"));
    if reply.get("ok") == Some(&Value::Bool(true)) && got != Some(asked) {
        bail!(
            "{}: the reply to {asked} is for {}: not an answer from a millrace daemon",
            socket.display(),
            got.map_or("no op".to_string(), Value::to_string)
        );
    }
    Ok(reply)
}

/// Runs `millrace ctl`.
pub fn run_ctl(args: CtlArgs) -> anyhow::Result<()> {
    let socket = args.target.socket_to_connect()?;
    let timeout = args.target.timeout();
    let ask = |req: &Value| answered(&socket, req, timeout);
    let mut out = std::io::stdout().lock();
    match args.command {
        CtlCommand::SetWeights(a) => {
            let weights = weights_map(&a.weights).map_err(anyhow::Error::msg)?;
            let req = set_weights_request(&weights, a.change.at_step, a.change.late);
            show_change(&mut out, &ask(&req)?, a.change.json)
        }
        CtlCommand::SetStage(a) => {
            let stage = StageRequest {
                seq_len: a.seq_len,
                global_batch_rows: a.global_batch_rows,
                best_fit_window: a.best_fit_window,
                chain_groups: a.chain_groups,
            };
            let req = set_stage_request(&stage, a.change.at_step, a.change.late);
            show_change(&mut out, &ask(&req)?, a.change.json)
        }
        CtlCommand::Reload(a) => show_change(&mut out, &ask(&reload_request())?, a.json),
        CtlCommand::Journal(a) => {
            let reply = ask(&journal_request())?;
            fail_on_rejection(&reply)?;
            if a.json {
                writeln!(out, "{reply}")?;
            } else {
                let entries = match reply.get("journal") {
                    None | Some(Value::Null) => Vec::new(),
                    Some(j) => Vec::<JournalEntry>::deserialize(j).with_context(|| {
                        format!("{}: the daemon's journal does not read", socket.display())
                    })?,
                };
                write!(out, "{}", render_journal(&entries))?;
            }
            Ok(())
        }
    }
}

/// Prints the reply to `set-weights` or `reload` (as JSON, or in words unless refused);
/// a refusal is the command's error.
fn show_change(out: &mut impl Write, reply: &Value, json: bool) -> anyhow::Result<()> {
    if json {
        writeln!(out, "{reply}")?;
    } else if Rejection::of(reply).is_none() {
        write!(out, "{}", describe_change(reply))?;
    }
    fail_on_rejection(reply)
}

/// The daemon's `ok: false` reply as an error; nothing for an accepted one.
fn fail_on_rejection(reply: &Value) -> anyhow::Result<()> {
    match Rejection::of(reply) {
        Some(r) => bail!("{r}"),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn weight_arguments_are_checked_and_named() {
        assert_eq!(parse_weight("web=0.5"), Ok(("web".into(), 0.5)));
        assert_eq!(parse_weight(" code = 1e-1 "), Ok(("code".into(), 0.1)));
        assert_eq!(parse_weight("code=0"), Ok(("code".into(), 0.0)));
        for (arg, want) in [
            ("web", "no '='"),
            ("web:0.5", "no '='"),
            ("=0.5", "no domain name"),
            ("web=abc", "not a number"),
            ("web=", "not a number"),
            ("web=NaN", "NaN"),
            ("web=nan", "NaN"),
            ("web=inf", "infinite"),
            ("web=-0.1", "negative"),
        ] {
            let e = parse_weight(arg).unwrap_err();
            assert!(e.contains(want), "{arg}: {e}");
            assert!(e.contains(&format!("`{arg}`")), "{arg}: {e}");
        }
        let pairs = vec![("web".to_string(), 0.5), ("code".to_string(), 0.3)];
        let m = weights_map(&pairs).unwrap();
        assert_eq!(m.len(), 2);
        let dup = vec![("web".to_string(), 0.5), ("web".to_string(), 0.3)];
        assert!(weights_map(&dup).unwrap_err().contains("`web`"));
        assert!(weights_map(&[]).is_err());
    }

    #[test]
    fn command_line_parses() {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(subcommand)]
            cmd: Cmd,
        }
        #[derive(clap::Subcommand)]
        enum Cmd {
            Ctl(CtlArgs),
            Status(StatusArgs),
            Top(TopArgs),
        }
        let cli = Cli::try_parse_from([
            "m",
            "ctl",
            "--socket",
            "/tmp/s",
            "set-weights",
            "web=0.5",
            "code=0.3",
            "--at-step",
            "100",
            "--late",
            "next",
        ])
        .unwrap();
        let Cmd::Ctl(a) = cli.cmd else { panic!() };
        assert_eq!(a.target.socket().unwrap(), PathBuf::from("/tmp/s"));
        let CtlCommand::SetWeights(w) = a.command else {
            panic!()
        };
        assert_eq!(w.weights.len(), 2);
        assert_eq!((w.change.at_step, w.change.late), (Some(100), Late::Next));
        let req = set_weights_request(
            &weights_map(&w.weights).unwrap(),
            w.change.at_step,
            w.change.late,
        );
        assert_eq!(
            req,
            json!({"protocol": 1, "op": "set_weights", "weights": {"web": 0.5, "code": 0.3},
                   "at_step": 100, "late": "next"})
        );
        let cli = Cli::try_parse_from([
            "m",
            "ctl",
            "set-stage",
            "--seq-len",
            "32768",
            "--global-batch-rows",
            "128",
            "--at-step",
            "200000",
        ])
        .unwrap();
        let Cmd::Ctl(a) = cli.cmd else { panic!() };
        let CtlCommand::SetStage(s) = a.command else {
            panic!()
        };
        let stage = StageRequest {
            seq_len: s.seq_len,
            global_batch_rows: s.global_batch_rows,
            best_fit_window: s.best_fit_window,
            chain_groups: s.chain_groups,
        };
        assert_eq!(
            set_stage_request(&stage, s.change.at_step, s.change.late),
            json!({"protocol": 1, "op": "set_stage", "seq_len": 32768, "global_batch_rows": 128,
                   "chain_groups": false, "at_step": 200000, "late": "refuse"})
        );
        // --socket also after the subcommand; default socket otherwise.
        let cli = Cli::try_parse_from(["m", "ctl", "journal", "--socket", "/x", "--json"]).unwrap();
        let Cmd::Ctl(a) = cli.cmd else { panic!() };
        assert_eq!(a.target.socket().unwrap(), PathBuf::from("/x"));
        let cli = Cli::try_parse_from(["m", "status"]).unwrap();
        let Cmd::Status(a) = cli.cmd else { panic!() };
        assert_eq!(
            a.target.socket().unwrap(),
            millrace::config::serve::default_socket()
        );
        let cli = Cli::try_parse_from(["m", "top", "--once", "--interval-ms", "200"]).unwrap();
        let Cmd::Top(a) = cli.cmd else { panic!() };
        assert!(a.once && a.interval_ms == Some(200));
        let cli = Cli::try_parse_from(["m", "top", "--once", "--interval", "0.2"]).unwrap();
        let Cmd::Top(a) = cli.cmd else { panic!() };
        assert!(a.once && a.interval == 0.2 && a.interval_ms.is_none());
        // Bad weights are refused by the parser, naming the argument.
        let e = Cli::try_parse_from(["m", "ctl", "set-weights", "web=-1"])
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("web=-1") && e.contains("negative"), "{e}");
        let e = Cli::try_parse_from(["m", "ctl", "set-weights", "web=NaN"])
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("web=NaN") && e.contains("NaN"), "{e}");
        assert!(Cli::try_parse_from(["m", "ctl", "set-weights"]).is_err());
        assert!(
            Cli::try_parse_from(["m", "ctl", "--socket", "a", "--config", "b", "reload"]).is_err()
        );
    }

    #[test]
    fn the_socket_comes_from_the_config() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("m.toml");
        std::fs::write(
            &cfg,
            "[corpus]\n[[corpus.domain]]\nname = \"web\"\nshards = [\"web\"]\n\n[serve]\nsocket = \"run/d.sock\"\n",
        )
        .unwrap();
        let t = Target {
            socket: None,
            config: Some(cfg),
            timeout: 0.01,
            timeout_ms: None,
        };
        assert_eq!(t.socket().unwrap(), dir.path().join("run/d.sock"));
    }
}
