//! What a HELLO and its cursor blob must agree with before a client joins: the batch
//! split and stage shapes the client can be served at ([`Shape`]), a blob journal's live
//! stages, and the steps the jobs connected now were served (a blob's live changes may
//! not rewrite them). Admission (`admission.rs`) runs these checks; the ring a client
//! then joins keeps its [`Shape`] (`join.rs`).

use super::{Hub, State};
use crate::plan::{Plan, Resumed};
use crate::wire::protocol::{Code, Hello, Refusal};

/// What a HELLO asks of the plan, once checked against it.
pub(super) struct Shape {
    /// Rows per step of one dp rank.
    pub(super) rows: u32,
    /// Rows per micro-batch.
    pub(super) mbr: u32,
    /// Every stage's shape for this rank, first to last (the first is the above).
    pub(super) stages: Vec<StageShape>,
    /// The plan's fingerprint as WELCOME spells it.
    pub(super) fingerprint: String,
}

/// One stage's shape for one dp rank.
#[derive(Clone, Copy)]
pub(super) struct StageShape {
    /// First plan step.
    pub(super) step: u64,
    /// Rows per step of the rank.
    pub(super) rows: u32,
    /// Rows per micro-batch.
    pub(super) mbr: u32,
    /// Tokens per row.
    pub(super) seq_len: u32,
}

impl Shape {
    /// Checks the HELLO's batch split and fingerprint against `plan`.
    pub(super) fn check(plan: &Plan, hello: &Hello) -> Result<Shape, Refusal> {
        Shape::check_stages(plan, plan.stages(), hello)
    }

    /// [`Shape::check`] at `stages` (a blob's journal may add some).
    pub(super) fn check_stages(
        plan: &Plan,
        stages: &[crate::plan::Shape],
        hello: &Hello,
    ) -> Result<Shape, Refusal> {
        if stages.len() > 1 && !hello.stages {
            return Err(Refusal::new(
                Code::Protocol,
                format!(
                    "this daemon's plan changes the batch shape at plan step {} \
                     ([[plan.stage]]), and this client does not read per-slot shapes: \
                     use a client of this millrace release (its HELLO says `stages: true`)",
                    stages[1].step
                ),
            ));
        }
        let mut per_stage = Vec::with_capacity(stages.len());
        for (i, st) in stages.iter().enumerate() {
            let g = st.rows;
            // "global_batch_rows 4 of the stage at plan step 30": the value beside its
            // name (it read "... plan step 30 4").
            let which = match i {
                0 => format!("global_batch_rows {g}"),
                _ => format!(
                    "global_batch_rows {g} of the stage at plan step {}",
                    st.step
                ),
            };
            if g % hello.dp_size != 0 {
                return Err(Refusal::new(
                    Code::DpSize,
                    format!("dp_size {} does not divide {which}", hello.dp_size),
                ));
            }
            let rows = g / hello.dp_size;
            // The HELLO's micro_batch_rows is the first stage's; later stages keep the
            // number of micro-batches, so each must split evenly.
            let (mbr, sent) = match (i, hello.micro_batch_rows) {
                (0, Some(m)) => (m, true),
                _ => (rows / hello.micro_batches, false),
            };
            if (mbr as u64) * (hello.micro_batches as u64) != rows as u64 {
                // Name only what the client sent: a micro_batch_rows it left out is the
                // quotient the daemon would have used (0 for 2 micro-batches of 1 row).
                let asked = match sent {
                    true => format!(
                        "micro_batch_rows {mbr} x micro_batches {}",
                        hello.micro_batches
                    ),
                    false => format!(
                        "micro_batches {} does not divide them evenly",
                        hello.micro_batches
                    ),
                };
                return Err(Refusal::new(
                    Code::Layout,
                    format!(
                        "{asked}: {rows} rows per dp rank ({which} / dp_size {})",
                        hello.dp_size
                    ),
                ));
            }
            per_stage.push(StageShape {
                step: st.step,
                rows,
                mbr,
                seq_len: st.seq_len,
            });
        }
        let fingerprint = format!("{:032x}", plan.fingerprint());
        if let Some(want) = &hello.fingerprint {
            if !want.eq_ignore_ascii_case(&fingerprint) {
                return Err(Refusal::new(
                    Code::Fingerprint,
                    format!(
                        "client expects plan fingerprint {}, this daemon serves {fingerprint}",
                        crate::wire::protocol::log_safe(want)
                    ),
                ));
            }
        }
        let first = per_stage[0];
        Ok(Shape {
            rows: first.rows,
            mbr: first.mbr,
            stages: per_stage,
            fingerprint,
        })
    }
}

impl Hub {
    /// Refuses a blob journal's live stages before [`Plan::resume_with`] adopts it
    /// (packing a window per domain at each): more than the cursor field has room for
    /// (a few), or shapes the client could not be served at. (Its changes were checked
    /// by the decoder's bounds and `Plan::resume_with`'s own.)
    pub(super) fn check_blob_stages(
        &self,
        seen: &Plan,
        journal: &[crate::plan::Change],
        hello: &Hello,
    ) -> Result<(), String> {
        if journal.iter().all(|c| c.stage.is_none()) {
            return Ok(());
        }
        let domains = seen.domain_names().len();
        for c in journal {
            c.check(domains)
                .map_err(|e| crate::plan::PlanError::from(e).to_string())?;
        }
        if super::journal_room(seen, journal) > self.journal_cap {
            let e = crate::plan::CursorError::JournalTooLarge {
                changes: journal.len(),
                cap: self.journal_cap,
            };
            return Err(e.to_string());
        }
        Shape::check_stages(seen, &seen.stages_with(journal), hello)
            .map(|_| ())
            .map_err(|r| r.to_string())
    }
}

/// The step each ring that still serves has been served to (or a peer waits past), with
/// its job and rank. A failed ring's peers are being disconnected: its steps no longer
/// bind a blob's changes, as a job's that has left do not.
fn live_rings(st: &State) -> impl Iterator<Item = (&str, u32, u64)> {
    (st.jobs.iter())
        .flat_map(|(name, j)| j.rings.iter().map(move |(&r, e)| (name.as_str(), r, e)))
        .filter(|(_, _, e)| e.failure().is_none())
        .map(|(name, r, e)| (name, r, e.published.max(e.ahead_step())))
}

/// The first trainer step no client connected now has been served (or waits past): what
/// a blob's adopted changes may not start before.
pub(super) fn served_live(st: &State) -> u64 {
    live_rings(st).map(|(_, _, s)| s).max().unwrap_or(0)
}

/// Whether the blob `r` of job `job` may be adopted, and the ranks of that job whose
/// rings must stop for it: those that were served steps from its first new change on
/// without it. They resumed from blobs saved before the change reached their daemon
/// (their journal is a prefix of `r`'s, so they are the job's past, not another run),
/// and the job cannot have two streams for one step; no rank can take the served
/// steps back, so the rank that carries the change is served and those rings stop
/// ([`Hub::adopt`] stops them). Refused (naming them) when steps of other jobs bind
/// the change, as before: a daemon serves one journal to all its jobs.
pub(super) fn stale_ranks(st: &State, r: &Resumed, job: &str) -> Result<Vec<u32>, Refusal> {
    let Err(e) = r.check_served(served_live(st), &st.plan) else {
        return Ok(Vec::new());
    };
    let crate::plan::CursorError::Served { at, .. } = e else {
        return Err(refuse_cursor(e.to_string()));
    };
    let from = r.plan.trainer_step_of(at);
    let stale: Vec<u32> = (live_rings(st))
        .filter(|&(name, _, step)| name == job && step > from)
        .map(|(_, rank, _)| rank)
        .collect();
    let rest = (live_rings(st))
        .filter(|(name, rank, _)| *name != job || !stale.contains(rank))
        .map(|(_, _, s)| s)
        .max()
        .unwrap_or(0);
    match r.check_served(rest, &st.plan) {
        Ok(()) if !stale.is_empty() => Ok(stale),
        _ => Err(served_refusal(st, from, job, e)),
    }
}

/// The `cursor` refusal of a blob whose change `e` ([`crate::plan::CursorError::Served`])
/// rewrites steps from trainer step `from` on that jobs connected now received, naming
/// those jobs (`job` is the blob's own) and what lifts it.
fn served_refusal(st: &State, from: u64, job: &str, e: crate::plan::CursorError) -> Refusal {
    let crate::plan::CursorError::Served { at, .. } = e else {
        return refuse_cursor(e.to_string());
    };
    let mut holders: Vec<(&str, u64)> = Vec::new();
    for (name, _, step) in live_rings(st).filter(|&(n, _, s)| s > from && n != job) {
        match holders.iter_mut().find(|(n, _)| *n == name) {
            Some((_, most)) => *most = (*most).max(step),
            None => holders.push((name, step)),
        }
    }
    holders.sort();
    if holders.is_empty() {
        return refuse_cursor(e.to_string());
    }
    let named: Vec<String> = (holders.iter().take(4))
        .map(|(n, s)| {
            format!(
                "\"{}\" (served steps below {s})",
                crate::wire::protocol::log_safe(n)
            )
        })
        .collect();
    let more = match holders.len() {
        n if n > 4 => format!(" and {} more", n - 4),
        _ => String::new(),
    };
    refuse_cursor(format!(
        "it carries a live change from plan step {at} that this daemon does not have, but \
         job {}{more}, connected now, received steps from {from} on without it (a daemon \
         serves one journal to all its jobs): stop that job or let it finish, then \
         reconnect this one; its changes are adopted once no connected job has received \
         the steps they change",
        named.join(", ")
    ))
}

/// A `cursor` refusal.
pub(super) fn refuse_cursor(e: String) -> Refusal {
    Refusal::new(Code::Cursor, format!("cursor blob refused: {e}"))
}
