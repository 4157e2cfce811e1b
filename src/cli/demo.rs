//! `millrace demo`: the README's first command. It synthesizes a small corpus (unless
//! the directory has one), starts `millrace serve` as a child, streams a few hundred
//! steps to K consumer processes (the Python client when `import millrace, numpy`
//! works, else `millrace consume`), and prints throughput, the realized mixture next to
//! the plan's target, and the provenance of one step. It never leaves a child behind:
//! the daemon and consumers are killed on drop, whatever the error.
//!
//! The child-process helpers it shares with `millrace bench` live in [`millrace::util::harness`].

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use millrace::client::ConsumeSummary;
use millrace::config::Config;
use millrace::plan::explain::{explain, render_explain};
use millrace::plan::report::Tally;
use millrace::util::harness::{
    collect_summary, ensure_corpus, socket_path_in, spawn_rust_consumer, write_config, ChildGuard,
    Daemon,
};

/// What the columns of `millrace explain` mean, printed under the demo's provenance: a
/// first-time reader sees `tokens 4097` with seq_len 4096 and has no way to know why.
pub fn provenance_legend(seq_len: u32) -> String {
    format!(
        "how to read the provenance:\n\
         \x20 row N      the row's index in the global batch; its domain and that domain's epoch\n\
         \x20 tokens     real tokens in the row: a row holds seq_len + 1 = {} (the inputs, plus\n\
         \x20            the label of the last input)\n\
         \x20 pad        padding tokens filling the rest of the row\n\
         \x20 loss       positions the loss counts: predictions that stay inside one document\n\
         \x20 indented   one document piece per line: shard, document index, [a, b) the token\n\
         \x20            range of the document placed here, of n its length (a piece of a long\n\
         \x20            document when b - a < n); group: its repository or book\n",
        u64::from(seq_len) + 1
    )
}

/// Which consumer `millrace demo` runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ConsumerKind {
    /// Python when `python3 -c "import millrace, numpy"` works, else Rust.
    Auto,
    /// `millrace consume` child processes.
    Rust,
    /// The Python client (`python/millrace`).
    Python,
}

/// Arguments of `millrace demo`.
#[derive(clap::Args, Debug, Clone)]
pub struct DemoArgs {
    /// Working directory: corpus, config, socket and daemon log (default: a fresh
    /// directory under $TMPDIR, removed at the end unless --keep).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Steps to stream.
    #[arg(long, default_value_t = 500)]
    pub steps: u64,
    /// Consumer processes (data-parallel ranks).
    #[arg(long, default_value_t = 2)]
    pub consumers: u32,
    /// Keep the working directory.
    #[arg(long)]
    pub keep: bool,
    /// Which consumer to run.
    #[arg(long, value_enum, default_value = "auto")]
    pub consumer: ConsumerKind,
    /// Tokens of the synthetic corpus, when one has to be written.
    #[arg(long, default_value = "5e7", value_parser = millrace::util::parse_count)]
    pub tokens: u64,
}

/// The consumer script for the Python client: prints the same JSON as
/// `millrace consume --json` (the fields the demo reads).
const PY_CONSUMER: &str = r#"
import json, sys, time
import numpy as np
import millrace

sock, rank, size, rows, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
c = millrace.Client(sock, dp_rank=rank, dp_size=size, job="demo-py", micro_batch_rows=rows,
                    micro_batches=1, reconnect_timeout=0)
domains = list(c.domains)
pad = int(c.welcome["pad_token"])
dom_tokens = [0] * len(domains)
tokens = real = 0
first = last = first_tokens = 0
checksum = 0
for i in range(steps):
    b = c.next_batch()
    now = time.monotonic_ns()
    t, lab, mask, dom = b.tokens, b.labels, b.loss_mask, b.domain
    if i == 0:
        first, first_tokens = now, t.size
    last = now
    tokens += t.size
    real += b.real_tokens
    checksum = (checksum + int(t.sum(dtype=np.int64))) & 0x7FFFFFFFFFFFFFFF
    n = t.shape[1]
    for r in range(t.shape[0]):
        # Real tokens of the row: t[0..=n] minus the trailing padding (pad, no loss into it).
        k = n + 1
        while k > 0:
            j = k - 1
            v = t[r, j] if j < n else lab[r, n - 1]
            if v != pad or (j > 0 and mask[r, j - 1] != 0):
                break
            k -= 1
        dom_tokens[int(dom[r])] += k
c.close()
secs = (last - first) / 1e9
print(json.dumps({"dp_rank": rank, "steps": steps, "tokens": tokens, "real_tokens": real,
                  "seconds": secs,
                  "tokens_per_s": (tokens - first_tokens) / secs if secs > 0 else 0.0,
                  "first_batch_ns": first, "last_batch_ns": last, "checksum": checksum,
                  "domain_tokens": dict(zip(domains, dom_tokens))}))
"#;

fn python_ok() -> bool {
    Command::new("python3")
        .args(["-c", "import millrace, numpy"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn run_consumers(
    kind: ConsumerKind,
    socket: &Path,
    ranks: u32,
    rows: u32,
    steps: u64,
) -> Result<Vec<ConsumeSummary>> {
    let mut children = Vec::new();
    for r in 0..ranks {
        let g = match kind {
            ConsumerKind::Python => {
                let child = Command::new("python3")
                    .args(["-c", PY_CONSUMER])
                    .arg(socket)
                    .args([r.to_string(), ranks.to_string(), rows.to_string()])
                    .arg(steps.to_string())
                    .stdin(Stdio::null())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .context("starting python3")?;
                ChildGuard::new(child, format!("python consumer {r}"))
            }
            _ => spawn_rust_consumer(socket, r, ranks, rows, steps, &["--job", "demo"])?,
        };
        children.push(g);
    }
    let timeout = Duration::from_secs(600);
    children
        .iter_mut()
        .map(|g| collect_summary(g, timeout, None))
        .collect()
}

/// Makes (or checks) a directory under the shared temp dir whose name others can guess
/// (`millrace-demo-PID`, `millrace-bench-TOKENS`): a new one is made mode 0700; one that
/// is there is reused only if it is a real directory (not a symlink) of this user's, since
/// another user could have made it to feed us a corpus or catch what we write.
pub(crate) fn own_temp_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    match std::fs::symlink_metadata(dir) {
        Ok(meta) => {
            let euid = rustix::process::geteuid().as_raw();
            if meta.file_type().is_symlink() || !meta.is_dir() {
                bail!(
                    "{}: exists and is not a directory (a symlink or a file); refusing to use \
                     it (remove it, or pass --dir)",
                    dir.display()
                );
            }
            if meta.uid() != euid {
                bail!(
                    "{}: is owned by uid {}, not this user (uid {euid}); refusing to use it \
                     (remove it, or pass --dir)",
                    dir.display(),
                    meta.uid()
                );
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => std::fs::DirBuilder::new()
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating {}", dir.display())),
        Err(e) => Err(e).with_context(|| format!("inspecting {}", dir.display())),
    }
}

fn fresh_dir() -> PathBuf {
    std::env::temp_dir().join(format!("millrace-demo-{}", std::process::id()))
}

/// Removes the demo's own directory on drop unless asked to keep it.
struct DirCleanup(Option<PathBuf>);

impl Drop for DirCleanup {
    fn drop(&mut self) {
        if let Some(d) = self.0.take() {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

/// Runs `millrace demo`.
pub fn run(args: DemoArgs) -> Result<()> {
    if args.consumers == 0 || args.steps == 0 {
        bail!("--consumers and --steps must be at least 1");
    }
    let own_dir = args.dir.is_none();
    let dir = args.dir.clone().unwrap_or_else(fresh_dir);
    if own_dir {
        own_temp_dir(&dir)?;
    } else {
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let _cleanup = DirCleanup((own_dir && !args.keep).then(|| dir.clone()));
    let mut out = std::io::stdout().lock();

    let t0 = Instant::now();
    let wrote = ensure_corpus(&dir, args.tokens, false)?;
    if wrote {
        writeln!(
            out,
            "wrote a {} token synthetic corpus to {} in {:.1} s",
            millrace::util::thousands(args.tokens),
            dir.display(),
            t0.elapsed().as_secs_f64()
        )?;
    } else {
        writeln!(out, "using the corpus in {}", dir.display())?;
    }
    let base_cfg = dir.join("millrace.toml");
    let cfg_path = dir.join("demo.toml");
    let socket = socket_path_in(&dir, "millrace.sock");
    let k = args.consumers;
    // A corpus written by this or an earlier demo gets a small geometry so the demo
    // takes seconds; a corpus of the user's keeps its own plan.
    let demo_corpus = wrote || cfg_path.is_file();
    let plan_keys: Vec<(&str, toml::Value)> = if demo_corpus {
        vec![
            ("seq_len", toml::Value::Integer(4096)),
            ("global_batch_rows", toml::Value::Integer(i64::from(8 * k))),
        ]
    } else {
        Vec::new()
    };
    let socket_str = socket.to_string_lossy().to_string();
    write_config(
        &base_cfg,
        &cfg_path,
        &[("socket", toml::Value::String(socket_str))],
        &plan_keys,
    )?;
    let cfg = Config::load(&cfg_path)?;
    let loaded = cfg.load_plan()?;
    let plan = loaded.plan;
    let g = plan.config().global_batch_rows;
    if g % k != 0 {
        bail!(
            "--consumers {k} does not divide global_batch_rows {g} of {}",
            cfg_path.display()
        );
    }
    let rows = g / k;

    let mut daemon = Daemon::start(&cfg_path, &socket, &dir.join("serve.log"))?;
    writeln!(
        out,
        "millrace serve (pid {}) is listening on {}",
        daemon.pid(),
        socket.display()
    )?;
    let kind = match args.consumer {
        ConsumerKind::Auto if python_ok() => ConsumerKind::Python,
        ConsumerKind::Auto => ConsumerKind::Rust,
        k => k,
    };
    let mut kind = kind;
    let summaries = match run_consumers(kind, &socket, k, rows, args.steps) {
        Ok(s) => s,
        Err(e) if args.consumer == ConsumerKind::Auto && kind == ConsumerKind::Python => {
            writeln!(
                out,
                "the Python consumer failed ({e:#}); using millrace consume instead"
            )?;
            kind = ConsumerKind::Rust;
            run_consumers(kind, &socket, k, rows, args.steps)?
        }
        Err(e) => {
            bail!(
                "{e:#}\nthe daemon's log ({}) ends with:\n{}",
                daemon.log.display(),
                daemon.log_tail()
            );
        }
    };
    let status = daemon.stop();

    // Throughput over all consumers, first batch to last.
    let tokens: u64 = summaries.iter().map(|s| s.tokens).sum();
    let secs = millrace::client::span_seconds(&summaries);
    let who = if kind == ConsumerKind::Python {
        "Python client"
    } else {
        "millrace consume"
    };
    writeln!(
        out,
        "\nstreamed {} steps to {k} consumers ({who}, {rows} rows x {} tokens each per step): \
         {} tokens in {secs:.2} s = {:.3e} tokens/s",
        args.steps,
        plan.config().seq_len,
        millrace::util::thousands(tokens),
        if secs > 0.0 {
            tokens as f64 / secs
        } else {
            0.0
        }
    )?;

    // Realized mixture over the streamed steps vs the plan.
    let mut tally = Tally::new(&plan);
    let mut planner = plan.start();
    let mut step0 = None;
    for i in 0..args.steps {
        let b = planner.next_batch();
        if i == 0 {
            step0 = Some(b.clone());
        }
        tally.add(b);
    }
    let window = tally.finish(&planner.epochs());
    let mut delivered = std::collections::BTreeMap::<String, u64>::new();
    for s in &summaries {
        for (d, t) in &s.domain_tokens {
            *delivered.entry(d.clone()).or_default() += t;
        }
    }
    let total: u64 = delivered.values().sum();
    writeln!(
        out,
        "\nmixture over steps 0..{} (share of real tokens):",
        args.steps
    )?;
    writeln!(
        out,
        "    {:<10} {:>10} {:>10} {:>10}",
        "domain", "delivered", "planned", "target"
    )?;
    for d in &window.domains {
        let got = delivered.get(&d.name).copied().unwrap_or(0);
        writeln!(
            out,
            "    {:<10} {:>9.3}% {:>9.3}% {:>9.3}%",
            d.name,
            100.0 * got as f64 / total.max(1) as f64,
            100.0 * d.token_share,
            100.0 * d.target_share
        )?;
    }
    let planned: u64 = window.domains.iter().map(|d| d.tokens).sum();
    writeln!(
        out,
        "    delivered {} real tokens; the plan says {}{}",
        millrace::util::thousands(total),
        millrace::util::thousands(planned),
        if total == planned { " (equal)" } else { "" }
    )?;

    if let Some(b) = step0 {
        let e = explain(&plan, &b, 0, k);
        writeln!(
            out,
            "\nprovenance of step 0, dp rank 0 of {k} (millrace explain --config {} --step 0 --dp-size {k}):",
            cfg_path.display()
        )?;
        write!(out, "{}", render_explain(&e))?;
        write!(out, "{}", provenance_legend(plan.config().seq_len))?;
    }
    match status {
        Some(s) if s.success() => writeln!(out, "\nstopped the daemon (SIGTERM): {s}")?,
        Some(s) => writeln!(out, "\nstopped the daemon: {s}")?,
        None => writeln!(out, "\nthe daemon had already exited")?,
    }
    if !own_dir || args.keep {
        writeln!(out, "kept {}", dir.display())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::own_temp_dir;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    /// demo and bench reuse a fixed directory under /tmp only when it is a real
    /// directory of this user: another user's, a symlink planted there or a file is
    /// refused by name, and a missing one is made private to this user.
    #[test]
    fn a_temp_dir_is_used_only_when_it_is_this_users_own() {
        let tmp = tempfile::tempdir().unwrap();
        let fresh = tmp.path().join("fresh");
        own_temp_dir(&fresh).unwrap();
        let meta = std::fs::metadata(&fresh).unwrap();
        assert!(meta.is_dir());
        assert_eq!(meta.permissions().mode() & 0o777, 0o700);
        own_temp_dir(&fresh).expect("this user's own directory is reused");

        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&fresh, &link).unwrap();
        let file = tmp.path().join("file");
        std::fs::write(&file, b"x").unwrap();
        for planted in [&link, &file] {
            let e = format!("{:#}", own_temp_dir(planted).unwrap_err());
            assert!(e.contains(&planted.display().to_string()), "{e}");
            assert!(e.contains("not a directory"), "{e}");
        }

        let euid = rustix::process::geteuid().as_raw();
        let other = tmp.path().join("other");
        std::fs::create_dir(&other).unwrap();
        // Another user's directory: only root can make one here, so as another user the
        // check runs against a directory root owns, when there is one to see.
        let theirs = if euid == 0 {
            std::os::unix::fs::chown(&other, Some(4242), None).unwrap();
            Some((other.clone(), 4242))
        } else {
            let root = std::path::PathBuf::from("/");
            Some((root, std::fs::metadata("/").unwrap().uid())).filter(|(_, u)| *u != euid)
        };
        if let Some((dir, uid)) = theirs {
            let e = format!("{:#}", own_temp_dir(&dir).unwrap_err());
            assert!(e.contains(&format!("owned by uid {uid}")), "{e}");
            assert!(e.contains(&format!("uid {euid}")), "{e}");
        }
    }
}
