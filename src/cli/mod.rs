//! The `millrace` command line: the clap definition of every command, the dispatch, and
//! how an error is printed. Each command is a thin layer over the library in its own file
//! here; `serve`, `check-config` and `consume` are the library's own entry points.

mod bench;
mod ctl;
mod demo;
mod inspect;
mod plan;
mod synth;
mod tokenize;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// The release and the planner's version (`millrace::plan::PLAN_VERSION`): a cursor
/// blob resumes only on a build of the planner version that made it.
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (planner version ",
    millrace::plan_version!(),
    ")"
);

/// millrace: feeds tokenized pretraining data to GPU trainers.
#[derive(Parser)]
#[command(version = VERSION, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Validate shards and report documents, tokens, groups and length statistics.
    Inspect(inspect::InspectArgs),
    /// Write a deterministic synthetic corpus and a config for it.
    Synth(synth::SynthArgs),
    /// Plan N steps and report mixture, epochs, padding, truncation, groups, duplicates.
    Plan(plan::PlanArgs),
    /// List the documents behind every row of one step (for one dp rank).
    Explain(plan::ExplainArgs),
    /// Tokenize JSONL text into a Megatron shard, with a groups sidecar when asked.
    Tokenize(tokenize::TokenizeArgs),
    /// Run the daemon: plan batches and stream them to trainer ranks over shared memory.
    Serve(millrace::serve::ServeArgs),
    /// Check a daemon config as `serve` would (shards, [serve], socket group), then exit.
    CheckConfig(millrace::serve::CheckArgs),
    /// Connect to a daemon as one trainer rank and read every token (a built-in consumer).
    Consume(millrace::client::ConsumeArgs),
    /// Synthesize a small corpus, start the daemon, stream to consumers, report, exit.
    Demo(demo::DemoArgs),
    /// Measure delivered tokens/s, latency and CPU cost against this machine's memcpy.
    Bench(bench::BenchArgs),
    /// Change a running daemon's mixture, reload its config, or read its change journal.
    Ctl(ctl::CtlArgs),
    /// Print a running daemon's state (clients, rings, mixture); --json for scripts.
    Status(ctl::StatusArgs),
    /// A live terminal view of a running daemon: steps, rates, rings, stalls, mixture.
    Top(ctl::TopArgs),
}

/// Parses the command line, sets up logging and runs the command: the whole binary.
pub fn main() -> ExitCode {
    // Past a file-size limit (`ulimit -f`, a batch scheduler's) a write fails with EFBIG,
    // which every command reports naming the file, instead of SIGXFSZ killing it without
    // a word: `check-config` as a unit's ExecStartPre, and `plan`, died so mid-cache.
    millrace::sys::ignore_file_size_signal();
    let cli = Cli::parse();
    // The daemon reports its life at info level (journald keeps it); tools stay quiet.
    let default_level = match cli.command {
        Command::Serve(_) | Command::Demo(_) => "info",
        _ => "warn",
    };
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_env("MILLRACE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let log = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        // journald and log files get plain text; a terminal gets colour.
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(filter);
    // journald stamps every line itself (JOURNAL_STREAM is set when stderr goes there).
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        log.without_time().init();
    } else {
        log.init();
    }
    let result = match cli.command {
        Command::Inspect(args) => inspect::run_inspect(args),
        Command::Synth(args) => synth::run_synth(args),
        Command::Tokenize(args) => tokenize::run_tokenize(args),
        Command::Plan(args) => plan::run_plan(args),
        Command::Explain(args) => plan::run_explain(args),
        Command::Serve(args) => millrace::serve::run_cli(args),
        Command::CheckConfig(args) => millrace::serve::check_config(args),
        Command::Consume(args) => millrace::client::run_consume(args),
        Command::Demo(args) => demo::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Ctl(args) => ctl::run_ctl(args),
        Command::Status(args) => ctl::run_status(args),
        Command::Top(args) => ctl::run_top(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // `millrace inspect ... | head` closing the pipe early is not an error.
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", error_text(&e));
            ExitCode::FAILURE
        }
    }
}

/// `e` and its causes joined by ": ", leaving out a cause whose text the message already
/// ends with: many errors quote their source in their own text, and `{:#}` would then say
/// "x: no such file: no such file".
fn error_text(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.is_empty() {
            out = text;
        } else if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
    }
    out
}

/// The command `argv` parses to, or clap's message: for tests of flags' checks.
#[cfg(test)]
fn parse_command<I: AsRef<str>>(argv: impl IntoIterator<Item = I>) -> Result<Command, String> {
    let argv = std::iter::once("millrace".to_string())
        .chain(argv.into_iter().map(|a| a.as_ref().to_string()));
    Cli::try_parse_from(argv)
        .map(|c| c.command)
        .map_err(|e| e.to_string())
}

/// True when `e` is stdout's reader having gone away.
fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}
