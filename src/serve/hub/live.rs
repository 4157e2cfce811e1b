//! Live mixture changes: a request from any reload route becomes a journal entry, and
//! the new plan is installed into every ring at its published step, all or nothing.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use tracing::{info, warn};

use super::jobplan::JOB_LAG;
use super::{Hub, RingEntry, State};
use crate::config::plan::{SchedulePoint, MAX_STEP};
use crate::plan::journal;
use crate::plan::{Change, CursorError, Plan, Planner};
use crate::wire::protocol::Code;

/// What a live mixture change proposes.
#[derive(Debug, Clone)]
pub enum Proposal {
    /// New raw weights for the named domains; the others keep theirs.
    Weights(BTreeMap<String, f64>),
    /// A stage from `at_step` on (`set_stage`): rows of `seq_len` tokens,
    /// `global_batch_rows` per step, as a `[[plan.stage]]` would say.
    Stage {
        /// Tokens a row trains on.
        seq_len: u32,
        /// Rows per global batch.
        global_batch_rows: u32,
        /// Units per packing window; `None` keeps the one in force.
        best_fit_window: Option<u64>,
        /// Whether `sequence`-grouped domains chain their long groups.
        chain_groups: bool,
    },
    /// The config file's schedule went from `old` to `new`: the new one applies from
    /// their first difference on.
    Schedule {
        /// The schedule last applied from the file.
        old: Vec<SchedulePoint>,
        /// The file's schedule now.
        new: Vec<SchedulePoint>,
    },
}

/// What to do with a change for a step some client may already have received.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Late {
    /// Refuse it, naming the first step that can still change.
    Refuse,
    /// Apply it at the first step that can still change.
    Next,
}

/// One request to change the mixture, from any of the reload routes.
#[derive(Debug, Clone)]
pub struct ChangeRequest {
    /// The weights or schedule.
    pub proposal: Proposal,
    /// Trainer step it takes effect at (weights only; `None` = first changeable).
    pub at_step: Option<u64>,
    /// Late policy.
    pub late: Late,
    /// Route it came by: file, sighup, ctl, client.
    pub source: &'static str,
}

/// An accepted change, for the caller's reply.
#[derive(Debug, Clone)]
pub struct Applied {
    /// The step asked for (or the first changeable one when none was named).
    pub requested_step: Option<u64>,
    /// The trainer step it applies from; `None` when it changed nothing.
    pub applied_step: Option<u64>,
    /// Whether a late change was moved to the first changeable step.
    pub moved: bool,
    /// One line for logs and callers.
    pub message: String,
}

/// A refused change: the old weights stay in force.
#[derive(Debug, Clone)]
pub struct ChangeError {
    /// late, invalid or busy.
    pub code: Code,
    /// What was wrong, naming the field or step.
    pub message: String,
    /// With `late`: the first step a change may still shape.
    pub first_changeable: Option<u64>,
}

/// Why a new plan could not be put in force: a ring's cursor does not restore under it,
/// or it changes the stages. Nothing changed; the caller refuses the change
/// ([`InstallError::code`]).
#[derive(Debug, thiserror::Error)]
pub(super) enum InstallError {
    /// A stage of the new plan (one a journal stage change added) does not split over
    /// a job's dp ranks or micro-batches.
    #[error("the stage at plan step {step} has {rows} rows per global batch, which job {job:?} cannot split: {why}")]
    Split {
        job: String,
        step: u64,
        rows: u32,
        why: String,
    },
    /// A connected client would misread the new stage's slots: it reads them at
    /// WELCOME's shape (its HELLO lacked `stages: true`).
    #[error("job {job:?} dp_rank {dp_rank} peer {replica:?} does not read per-slot shapes (its HELLO lacks `stages: true`), so it cannot be served the stage at plan step {step}; upgrade that client")]
    Reader {
        job: String,
        dp_rank: u32,
        replica: String,
        step: u64,
    },
    /// A stage of the new plan needs bigger slots than a live ring has.
    #[error("a slot of the stage at plan step {step} ({seq_len} tokens x {rows} rows per dp rank) needs {needed} bytes, and the ring of job {job:?} dp_rank {dp_rank} has slots of {available} bytes; start the daemon with a larger [serve] stage_reserve_tokens (its rings are sized for that many tokens per dp rank per step)")]
    Fit {
        job: String,
        dp_rank: u32,
        step: u64,
        seq_len: u32,
        rows: u32,
        needed: u64,
        available: u64,
    },
    /// A ring without a cursor (every ring holds at least its start's).
    #[error("job {job:?} dp_rank {dp_rank} holds no cursor")]
    NoCursor { job: String, dp_rank: u32 },
    /// A ring's published cursor does not restore under the new plan.
    #[error("job {job:?} dp_rank {dp_rank} at step {step}: {source}")]
    Restore {
        job: String,
        dp_rank: u32,
        step: u64,
        source: CursorError,
    },
    /// Restoring the planners read a shard that shrank under the daemon (now poisoned).
    #[error("{0}")]
    Fault(String),
}

impl InstallError {
    /// The code a refusal carries: a stage the rings cannot serve will never apply
    /// (`invalid`; a blob bringing it is refused `cursor`), a ring's cursor may restore
    /// once it moves on (`busy`).
    pub(super) fn code(&self) -> Code {
        match self {
            InstallError::Split { .. } | InstallError::Fit { .. } | InstallError::Reader { .. } => {
                Code::Invalid
            }
            _ => Code::Busy,
        }
    }
}

impl ChangeError {
    /// A refusal for bad input.
    pub fn invalid(message: impl Into<String>) -> ChangeError {
        ChangeError {
            code: Code::Invalid,
            message: message.into(),
            first_changeable: None,
        }
    }
}

/// The config's schedule points that `plan`'s live changes hide and `before`'s did not,
/// as "39, 40" (their steps): a weights change holds from its step on over the config's
/// later points, so such a point never applies. A point written into the file before a
/// restart, which a blob's change then came back over, was silently not served while
/// `check-config` and `plan` showed it.
///
/// `points` is the file's schedule as last applied ([`State`]'s `file_points`: the
/// file the daemon started with, or its last accepted reload; the plan's config is only
/// the first, so a point a reload added was hidden without a word). Not for a file
/// reload itself, which replaces its later points on purpose.
fn newly_hidden_points(plan: &Plan, before: &Plan, points: &[SchedulePoint]) -> Option<String> {
    hidden_points(plan, points, 1, Some(before))
}

/// The plan steps, from `from` on, of the file's `points` whose weights `plan` does not
/// serve (and, with `before`, that plan did), as a list for a message; `None` if none.
fn hidden_points(
    plan: &Plan,
    points: &[SchedulePoint],
    from: u64,
    before: Option<&Plan>,
) -> Option<String> {
    let names = plan.domain_names();
    let hidden = |p: &Plan, step: u64, want: &[f64]| {
        let got = p.schedule().shares(step);
        got.iter().zip(want).any(|(g, w)| (g - w).abs() > 1e-9)
    };
    let steps: Vec<String> = (points.iter())
        .filter(|p| p.step >= from.max(1))
        .filter_map(|p| {
            let raw: Vec<f64> = (names.iter())
                .map(|n| p.weights.get(*n).copied().unwrap_or(0.0))
                .collect();
            let total: f64 = raw.iter().sum();
            let want: Vec<f64> = raw.iter().map(|w| w / total).collect();
            let news = before.is_none_or(|b| !hidden(b, p.step, &want));
            (hidden(plan, p.step, &want) && news).then(|| p.step.to_string())
        })
        .collect();
    (!steps.is_empty()).then(|| steps.join(", "))
}

/// Logs (warn) the config's schedule points that a journal adopted from a blob hides
/// ([`newly_hidden_points`]): `plan` is the plan in force now, `before` the one it
/// replaced, `points` the file's schedule as last applied.
pub(super) fn warn_hidden(plan: &Plan, before: &Plan, points: &[SchedulePoint]) {
    if let Some(steps) = newly_hidden_points(plan, before, points) {
        warn!(
            "the live changes adopted from a cursor blob hold over the config's schedule \
             points at plan steps {steps}: those points are not served (a change holds \
             from its step on); send their weights as live changes to apply them"
        );
    }
}

impl Hub {
    /// Puts `plan` in force: each job's planner is restored under the new plan from the
    /// cursor of its least advanced streaming ring, every ring within [`JOB_LAG`] steps
    /// of it reads the job's batches again from its published step, and any other ring
    /// gets a private planner restored from its own published cursor; everything planned
    /// or copied beyond a ring's published step is dropped and done again. All or
    /// nothing: a cursor that cannot be restored leaves every ring as it was. Runs under
    /// the lock, so no step is published meanwhile.
    pub(super) fn install(&self, st: &mut State, plan: Arc<Plan>) -> Result<(), InstallError> {
        self.install_besides(st, plan, ("", &[]))
    }

    /// [`Hub::install`], leaving alone the rings of job `besides.0` at the dp ranks
    /// `besides.1`, which are about to stop (their stream lacks the new plan's change
    /// past their published step, so none could be restored under it), and failed rings.
    pub(super) fn install_besides(
        &self,
        st: &mut State,
        plan: Arc<Plan>,
        besides: (&str, &[u32]),
    ) -> Result<(), InstallError> {
        // Restoring reads the shards' indexes: guarded, so a shard truncated under the
        // daemon fails this install instead of killing the process, and nothing restored
        // from the zeros it reads is put in force.
        let _guard = crate::corpus::guard::enter();
        let mark = crate::corpus::guard::zeroed_pages();
        if plan.stages() != st.plan.stages() {
            // A journal stage change: every live ring must serve it as it is.
            Self::check_stages(st, plan.stages())?;
        }
        let mut fresh = Vec::new();
        for (name, job) in &st.jobs {
            let restore = |r: u32| -> Result<Planner, InstallError> {
                let e = &job.rings[&r];
                let Some(c) = e.cursors.back() else {
                    return Err(InstallError::NoCursor {
                        job: name.clone(),
                        dp_rank: r,
                    });
                };
                // A change adopted from a blob may start before the cursor yet plan its
                // past alike.
                plan.restore_alike(&c.blob)
                    .map_err(|source| InstallError::Restore {
                        job: name.clone(),
                        dp_rank: r,
                        step: c.step,
                        source,
                    })
            };
            let left = |r: u32, e: &RingEntry| {
                e.failure().is_some() || (name == besides.0 && besides.1.contains(&r))
            };
            // Rings that will be filled again read the job's batches, from the least
            // advanced one's step on, when they are close enough to it.
            let follows = |e: &RingEntry| e.started() && e.failure().is_none();
            let lead = job
                .rings
                .iter()
                .filter(|(&r, e)| follows(e) && !left(r, e))
                .min_by_key(|(&r, e)| (e.published, r))
                .map(|(&r, e)| (r, e.published));
            let job_planner = lead.map(|(r, _)| restore(r)).transpose()?;
            let mut rings = Vec::new();
            for (&r, e) in job.rings.iter().filter(|(&r, e)| !left(r, e)) {
                let reads_job = lead.is_some_and(|(_, low)| {
                    follows(e) && e.published.saturating_sub(low) <= JOB_LAG
                });
                let own = if reads_job { None } else { Some(restore(r)?) };
                rings.push((r, own));
            }
            fresh.push((name.clone(), job_planner, rings));
        }
        if let Some(addr) = self.planning_fault(mark) {
            return Err(InstallError::Fault(
                self.poison_at(addr, "while restoring planners under a new plan"),
            ));
        }
        for (name, job_planner, rings) in fresh {
            let Some(job) = st.jobs.get_mut(&name) else {
                continue;
            };
            job.plan.reset(job_planner, Default::default());
            for (r, own) in rings {
                if let Some(e) = job.rings.get_mut(&r) {
                    e.regenerate_with(own);
                }
            }
        }
        st.plan = plan;
        Ok(())
    }

    /// Whether every job can serve `plan`'s stages in the rings it has: each stage's
    /// rows split over the job's dp ranks and each ring's micro-batches, and a slot of
    /// each fits the ring's (sized at its creation for the stages then and `[serve]
    /// stage_reserve_tokens`).
    fn check_stages(st: &State, stages: &[crate::plan::Shape]) -> Result<(), InstallError> {
        for (name, job) in &st.jobs {
            for s in stages {
                let split = |why: String| InstallError::Split {
                    job: name.clone(),
                    step: s.step,
                    rows: s.rows,
                    why,
                };
                if s.rows % job.dp_size != 0 {
                    return Err(split(format!("dp_size {} does not divide it", job.dp_size)));
                }
                let rows = s.rows / job.dp_size;
                for (&r, e) in &job.rings {
                    if let Some(p) = e.peers.values().find(|p| !p.stages) {
                        return Err(InstallError::Reader {
                            job: name.clone(),
                            dp_rank: r,
                            replica: p.replica.clone(),
                            step: s.step,
                        });
                    }
                    let m = e.micro.1.max(1);
                    if rows % m != 0 {
                        return Err(split(format!(
                            "dp_rank {r}'s {rows} rows are not a multiple of its \
                             micro_batches {m}"
                        )));
                    }
                    let layout = e.ring.layout();
                    if let Err(needed) = layout.stage(rows, s.seq_len) {
                        return Err(InstallError::Fit {
                            job: name.clone(),
                            dp_rank: r,
                            step: s.step,
                            seq_len: s.seq_len,
                            rows,
                            needed,
                            available: layout.slot_bytes,
                        });
                    }
                }
            }
        }
        Ok(())
    }

    /// Applies a live mixture change, or refuses it as a whole with the old weights still
    /// in force. Counted per source either way.
    pub fn change(&self, req: &ChangeRequest) -> Result<Applied, ChangeError> {
        let mut st = self.lock();
        // Restoring planners reads shard indexes under the lock: watched.
        let doing = crate::serve::fill::Doing::Locked("applying a live change");
        let _watched = self.fills.begin_as(doing, "", 0, 0);
        // A new plan packs stage windows and restores planners from the shards' indexes:
        // guarded like planning (see `install`).
        let guard = crate::corpus::guard::enter();
        let _ = crate::corpus::guard::take_fault();
        let mark = crate::corpus::guard::zeroed_pages();
        let r = self.change_locked(&mut st, req, Instant::now(), mark);
        drop(guard);
        match &r {
            Ok(_) => *st.reloads.entry(req.source).or_default() += 1,
            Err(_) => *st.failed_reloads.entry(req.source).or_default() += 1,
        }
        drop(st);
        self.work.notify_all();
        r
    }

    /// Counts a reload that failed before it reached the hub (a malformed file).
    pub fn reload_failed(&self, source: &'static str) {
        *self.lock().failed_reloads.entry(source).or_default() += 1;
    }

    /// The change under the hub's lock, taken at `locked`: no worker claims or
    /// publishes meanwhile, so its time is every ring's stall (logged when it applies).
    /// `mark` is [`crate::corpus::guard::zeroed_pages`] when it began.
    fn change_locked(
        &self,
        st: &mut State,
        req: &ChangeRequest,
        locked: Instant,
        mark: usize,
    ) -> Result<Applied, ChangeError> {
        if st.draining || st.stopping {
            // Nothing published after now could carry it: it would be lost on restart.
            return Err(ChangeError {
                code: Code::Busy,
                message: "the daemon is stopping; send the change to the next daemon".into(),
                first_changeable: None,
            });
        }
        let plan = st.plan.clone();
        let fc = st.first_changeable();
        let fc_p = plan.plan_step_of(fc);
        let (requested, d) = match &req.proposal {
            Proposal::Weights(_) | Proposal::Stage { .. } => {
                // A daemon nothing has read from since it started does not know where
                // the run is: "the first step that can still change" would be step 0,
                // and a change re-issued after a restart mid-run would rewrite the
                // whole past of every blob the trainers bring back.
                if req.at_step.is_none() && st.watermark == 0 && st.jobs.is_empty() {
                    // What is wrong with the weights themselves is said first.
                    if let Proposal::Weights(w) = &req.proposal {
                        plan.weights_change(0, w)
                            .map_err(|e| ChangeError::invalid(e.to_string()))?;
                    }
                    return Err(ChangeError::invalid(
                        "no trainer has connected since this daemon started, so it does not \
                         know the run's step: give at_step (--at-step S; 0 for a run that \
                         has not begun), or send the change once the trainers are back"
                            .to_string(),
                    ));
                }
                // No step given: the first that can still change, past a bursty cycle
                // begun before `fc` (as `status` reports it), not `fc` itself.
                let t = req
                    .at_step
                    .unwrap_or_else(|| plan.trainer_step_of(plan.first_safe_change(fc_p)));
                // A change far past anything published is a typo or an attack (one at
                // 2^64-1 was accepted before), and would sit in every blob meanwhile.
                let horizon = fc.saturating_add(MAX_STEP);
                if t > horizon {
                    return Err(ChangeError::invalid(format!(
                        "at_step {t} is more than {MAX_STEP} steps beyond the first \
                         changeable step {fc}"
                    )));
                }
                (t, plan.plan_step_of(t))
            }
            Proposal::Schedule { old, new } => match plan.points_difference(old, new) {
                Some(p) => (plan.trainer_step_of(p), p),
                None => {
                    // The file is as last applied, but live changes (one a blob brought
                    // back after a restart included) may hold over its later points:
                    // "already matches" then sent the operator away with them unserved.
                    let from = plan.first_safe_change(fc_p);
                    let message = match hidden_points(&plan, new, from, None) {
                        None => "the schedule in force already matches; nothing changed".into(),
                        Some(steps) => format!(
                            "the file is as last applied, so nothing changed; live changes \
                             (a reload of the file is one, and a restarted daemon adopts \
                             them from cursor blobs) hold over its points at plan steps \
                             {steps}, which are not served: send their weights as live \
                             changes (`millrace ctl set-weights ... --at-step S`) to apply them"
                        ),
                    };
                    return Ok(Applied {
                        requested_step: None,
                        applied_step: None,
                        moved: false,
                        message,
                    });
                }
            },
        };
        // A bursty domain's cycle begun before `fc` was planned from its later steps'
        // weights: a change inside it would rewrite a published step.
        let safe = plan.first_safe_change(fc_p);
        let (d, moved) = if d < safe {
            let first = plan.trainer_step_of(safe);
            match req.late {
                Late::Refuse => {
                    return Err(ChangeError {
                        code: Code::Late,
                        message: format!(
                            "step {requested} may already have been received (steps below \
                             {fc} are published{}{}); the first step that can still change is \
                             {first}",
                            if first > fc {
                                ", and a bursty domain's cycle begun before it runs to this step"
                            } else {
                                ""
                            },
                            departed_note(st, requested, fc),
                        ),
                        first_changeable: Some(first),
                    })
                }
                Late::Next => (safe, true),
            }
        } else {
            (d, false)
        };
        let change: Change = match &req.proposal {
            Proposal::Weights(w) => plan
                .weights_change(d, w)
                .map_err(|e| ChangeError::invalid(e.to_string()))?,
            Proposal::Schedule { new, .. } => plan.schedule_change(d, new),
            Proposal::Stage {
                seq_len,
                global_batch_rows,
                best_fit_window,
                chain_groups,
            } => plan.stage_change(
                d,
                *seq_len,
                *global_batch_rows,
                *best_fit_window,
                *chain_groups,
            ),
        };
        // The change drops the entries it supersedes (at its step or later), so repeated
        // or corrected changes never fill the journal; their count travels in blobs.
        let mut journal = plan.journal().to_vec();
        let dropped = journal::append(&mut journal, change);
        let kept = journal.len() - 1;
        let domains = plan.domain_names().len();
        // Its own bounds first (seq_len, rows, window), as `with_history` words them.
        for c in &journal {
            c.check(domains)
                .map_err(|e| ChangeError::invalid(crate::plan::PlanError::from(e).to_string()))?;
        }
        self.cursor_room(&plan, &journal)
            .map_err(ChangeError::invalid)?;
        // A stage the rings cannot serve is refused before `with_history` packs a window
        // per domain at its shape, which is per-document work under the lock.
        if journal.iter().any(|c| c.stage.is_some()) {
            Self::check_stages(st, &plan.stages_with(&journal)).map_err(|e| ChangeError {
                code: e.code(),
                message: e.to_string(),
                first_changeable: None,
            })?;
        }
        let next = Arc::new(
            plan.with_history(journal, plan.superseded().saturating_add(dropped))
                .map_err(|e| ChangeError::invalid(e.to_string()))?,
        );
        // A change must not leave a bursty domain short for the rest of the run, or
        // shorter than the config already does (that was warned of at start, and a
        // change may still fix it).
        if let Some(why) = next.bursty_shortfall_beyond(&plan) {
            return Err(ChangeError::invalid(format!("{why}; nothing changed")));
        }
        // Stage windows are packed on rayon's threads: their faults count too.
        if let Some(addr) = self.planning_fault(mark) {
            let why = self.poison_at(addr, "while building the plan of a live change");
            return Err(ChangeError {
                code: Code::Busy,
                message: format!("{why}; nothing changed"),
                first_changeable: None,
            });
        }
        let hidden = match req.proposal {
            Proposal::Schedule { .. } => None,
            _ => newly_hidden_points(&next, &plan, &st.file_points),
        };
        self.install(st, next.clone()).map_err(|e| ChangeError {
            code: e.code(),
            message: match e.code() {
                Code::Invalid => e.to_string(),
                _ => format!("regenerating prefetched batches: {e}"),
            },
            first_changeable: None,
        })?;
        st.sources.resize(kept, "cursor");
        st.sources.push(req.source);
        if let Proposal::Schedule { new, .. } = &req.proposal {
            st.file_points = new.clone();
        }
        let applied = next.trainer_step_of(d);
        let message = if moved {
            format!("step {requested} was already published; applied from step {applied}, the first that could still change")
        } else {
            format!("applied from step {applied}")
        };
        let message = match hidden {
            Some(steps) => format!(
                "{message}; it holds over the config's schedule points at plan steps {steps}, \
                 which are not served"
            ),
            None => message,
        };
        info!(
            source = req.source,
            requested,
            applied,
            plan_step = d,
            locked_us = locked.elapsed().as_micros() as u64,
            "live mixture change: {message}"
        );
        Ok(Applied {
            requested_step: Some(requested),
            applied_step: Some(applied),
            moved,
            message,
        })
    }
}

/// Why a `late` refusal binds steps no connected ring has reached: they were published to
/// rings that have since left (a job that rolled back, or trainers that will resume from
/// later checkpoints). A change among them would make those checkpoints' blobs diverge
/// from the daemon's journal, so it stays refused; the note says so, since `status`
/// shows only the connected rings. Empty when the connected rings reach `fc`.
fn departed_note(st: &State, requested: u64, fc: u64) -> String {
    let live = super::shape::served_live(st);
    if live >= fc || requested < live {
        return String::new();
    }
    format!(
        "; steps {live} to {} were published only to rings that have since left or stopped, and their \
         trainers' later checkpoints would no longer resume under this change; after a \
         rollback to before step {requested}, restart the daemon to change the replayed steps",
        fc - 1
    )
}
