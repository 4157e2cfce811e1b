//! The `eod_token` check: which documents of each domain do not end with the configured
//! end-of-document id.
//!
//! The planner never reads tokens (src/plan stays pure), and the daemon's copy path must
//! not pay for a per-document check, so this runs at plan/inspect time (`millrace plan`):
//! one read of each document's last token, from the mapped shards. What it protects is
//! the mask rule of docs/DESIGN.md ("Rows"): the EOD token is the last label of its own
//! document, so a document without one teaches the model no end, and the prediction
//! after it (into the next document) is masked either way.

use std::sync::Arc;

use serde::Serialize;

use crate::corpus::{Result, Shard};

/// One domain's result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EodDomain {
    /// Domain name.
    pub domain: String,
    /// Documents checked.
    pub documents: u64,
    /// Documents whose last token is not `eod_token` (empty documents included).
    pub missing: u64,
    /// The first such document: (shard path, document index).
    pub first: Option<(String, u64)>,
}

/// Counts, per domain, the documents that do not end with `eod`. `domains` pairs each
/// domain's name with its shards in config order.
pub fn check(domains: &[(String, Vec<Arc<Shard>>)], eod: u64) -> Result<Vec<EodDomain>> {
    let want = i64::try_from(eod).ok(); // an id past i64 matches no stored token
    let mut out = Vec::with_capacity(domains.len());
    for (name, shards) in domains {
        let mut d = EodDomain {
            domain: name.clone(),
            documents: 0,
            missing: 0,
            first: None,
        };
        for shard in shards {
            for doc in 0..shard.documents() {
                let tokens = shard.doc_tokens(doc)?;
                let last = tokens.len().checked_sub(1).and_then(|i| tokens.get_i64(i));
                d.documents += 1;
                if last.is_none() || last != want {
                    d.missing += 1;
                    if d.first.is_none() {
                        d.first = Some((shard.path().display().to_string(), doc));
                    }
                }
            }
        }
        out.push(d);
    }
    Ok(out)
}

/// Runs [`check`] over a loaded plan's domains when its config sets `eod_token`, so
/// `millrace plan` and `check-config` check the same thing; `None` without the key.
pub fn check_plan(
    plan: &crate::plan::Plan,
    shards: &[Vec<Arc<Shard>>],
) -> Result<Option<(u64, Vec<EodDomain>)>> {
    let Some(eod) = plan.config().eod_token else {
        return Ok(None);
    };
    let domains: Vec<(String, Vec<Arc<Shard>>)> = plan
        .domain_names()
        .iter()
        .map(|n| n.to_string())
        .zip(shards.iter().cloned())
        .collect();
    Ok(Some((eod, check(&domains, eod)?)))
}

/// The warning for a domain whose documents lack the token (`None` when all have it):
/// the count and the first such document, so an operator can look at it.
pub fn warning(d: &EodDomain, eod: u64) -> Option<String> {
    let (shard, doc) = d.first.as_ref()?;
    Some(format!(
        "warning: domain {}: {} of {} documents do not end with eod_token {eod} (first: {shard} document {doc})",
        d.domain,
        crate::util::thousands(d.missing),
        crate::util::thousands(d.documents)
    ))
}

/// One line per domain for humans: a warning naming the count and the first document
/// where documents lack the token, a plain count where all have it.
pub fn render(results: &[EodDomain], eod: u64) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    for d in results {
        match warning(d, eod) {
            Some(w) => {
                let _ = writeln!(s, "{w}");
            }
            None => {
                let _ = writeln!(
                    s,
                    "domain {}: all {} documents end with eod_token {eod}",
                    d.domain,
                    crate::util::thousands(d.documents)
                );
            }
        }
    }
    s
}
