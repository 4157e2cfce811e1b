//! What `millrace serve` loads and checks before it binds: the config, `[serve]`, the
//! validated shards and plan, the token type, the socket group. `check-config` runs the
//! same steps and stops there, so a unit's ExecStartPre fails where `serve` would.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Result};

use super::access;
use super::ring::TokenType;
use crate::config::serve::{socket_problem, ServeConfig};
use crate::config::Config;

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

/// Reads and checks everything `serve` needs before it binds.
pub(super) fn load(config: &Path) -> Result<Loaded> {
    let (cfg, hash) = Config::load_hashed(config)?;
    let serve = ServeConfig::from_config(&cfg)?;
    let loaded = cfg.load_plan()?;
    let dtypes: Vec<(String, crate::corpus::DType)> = loaded
        .plan
        .domain_names()
        .iter()
        .zip(&loaded.shards)
        .flat_map(|(n, shards)| shards.iter().map(move |s| (n.to_string(), s.dtype())))
        .collect();
    let token = TokenType::choose(&serve.token_dtype, &dtypes)
        .map_err(|e| anyhow::anyhow!("{}: [serve] token_dtype: {e}", cfg.source.display()))?;
    if let Some(g) = &serve.socket_group {
        access::resolve_group(g).map_err(|e| anyhow::anyhow!("{}: {e}", cfg.source.display()))?;
    }
    Ok(Loaded {
        cfg,
        hash,
        serve,
        plan: loaded.plan,
        shards: loaded.shards,
        token,
    })
}

/// `millrace check-config`: everything `serve` checks before it binds (config, shards,
/// `[serve]`, the socket group, that `metrics_addr` is free), so a unit's ExecStartPre
/// fails with the reason.
pub fn check_config(args: CheckArgs) -> Result<()> {
    let l = load(&args.config)?;
    if let Some(addr) = &l.serve.metrics_addr {
        // `serve` exits when it cannot listen there, so the check tries it too (and lets
        // go at once).
        std::net::TcpListener::bind(addr.as_str()).map_err(|e| {
            anyhow::anyhow!(
                "{}: [serve] metrics_addr {addr:?}: cannot listen: {e} (`serve` would exit)",
                args.config.display()
            )
        })?;
    }
    if let Some(why) = socket_problem(&l.serve.socket) {
        bail!("{}: [serve] socket: {why}", args.config.display());
    }
    for w in l.plan.config().unweighted_warnings(&l.plan.domain_names()) {
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
    println!(
        "{}: ok: {} domains, {} shards, plan fingerprint {:032x}, socket {}, tokens as {}",
        args.config.display(),
        l.plan.domain_names().len(),
        shards,
        l.plan.fingerprint(),
        l.serve.socket.display(),
        l.token.0.name()
    );
    Ok(())
}
