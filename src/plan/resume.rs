//! Resuming from a cursor blob: decoding it once and checking it against this plan
//! (fingerprint, journal, history, structure) before a planner continues from it.
//!
//! [`Plan::resume`] is what a daemon admitting a client calls: it also adopts a blob's
//! newer journal. [`Plan::restore`] is the strict form for a plan whose journal already
//! covers the blob's (a reload re-restoring its rings, tests). Both decode once and share
//! [`Plan::check_cursor`], so each journal rule is written once.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::cursor::{self, CursorData, CursorError, Fingerprint};
use super::journal::{self, Change, Order};
use super::mix::MixState;
use super::planner::Planner;
use super::stream::{Stream, StreamState};
use super::Plan;

/// A cursor blob checked against a plan and turned into a planner: what
/// [`Plan::resume`] gives the daemon's admission.
pub struct Resumed {
    /// The plan the blob's run follows: the plan `resume` was called on, or (when
    /// `adopted`) that plan with the blob's longer journal in force.
    pub plan: Arc<Plan>,
    /// A planner at the blob's position under `plan`; `planner.step()` is the blob's step.
    pub planner: Planner,
    /// Whether `plan` took the blob's journal: the blob carried live changes the plan
    /// `resume` was called on did not have. The caller installs `plan` to keep them.
    pub adopted: bool,
    /// Entries of `plan`'s journal shared with the plan `resume` was called on.
    shared: usize,
}

impl Resumed {
    /// The live changes adopted from the blob, oldest first (empty unless `adopted`).
    pub fn adopted_changes(&self) -> &[Change] {
        if self.adopted {
            &self.plan.journal[self.shared..]
        } else {
            &[]
        }
    }

    /// Refuses ([`CursorError::Served`]) an adopted change that starts before trainer
    /// step `first_changeable`, the first step the daemon has not yet served to anyone,
    /// when it plans a served step differently from `current`, the plan in force:
    /// adopting it would rewrite batches other clients already received. One that plans
    /// every served step as `current` does (the same change already in the config file,
    /// say) is adopted: the order in which a restarted job's ranks reconnect must not
    /// decide whether they resume. The daemon calls this under the lock that orders its
    /// steps, since the answer moves with them.
    pub fn check_served(&self, first_changeable: u64, current: &Plan) -> Result<(), CursorError> {
        let plan_step = self.plan.plan_step_of(first_changeable);
        let safe = self.plan.first_safe_change(plan_step);
        match self.adopted_changes().iter().find(|c| c.at < safe) {
            Some(c) if !self.plan.plans_alike_before(current, safe) => Err(CursorError::Served {
                at: c.at,
                step: first_changeable,
                plan_step,
            }),
            _ => Ok(()),
        }
    }
}

impl Plan {
    /// Decodes and checks a client's cursor blob, once, and gives the planner that
    /// resumes it. The contract the daemon relies on:
    ///
    /// - A blob that does not decode, belongs to another corpus or static config
    ///   ([`CursorError::Fingerprint`]), another history ([`CursorError::History`]) or is
    ///   structurally wrong for this plan is refused, as by [`Plan::restore`].
    /// - Journals: when this plan's journal equals or extends the blob's, the blob
    ///   resumes under this plan (`adopted == false`), unless an extra change of ours
    ///   starts before the blob's step ([`CursorError::JournalRewrites`]). When the blob's
    ///   extends ours, the blob's journal is adopted: `plan` is this plan with it in force
    ///   and `adopted == true`, provided its encoding fits `journal_cap` bytes
    ///   ([`cursor::journal_bytes`]; else [`CursorError::JournalTooLarge`]) and it applies
    ///   to this plan, with what a blob may bring ([`journal::check_carried`]; else
    ///   [`CursorError::JournalInvalid`]). Journals that diverged are
    ///   refused ([`CursorError::JournalDiverged`]).
    /// - Nothing is installed: the caller decides, after its own checks, whether to put
    ///   `plan` in force, and calls [`Resumed::check_served`] first when it does.
    ///
    /// The error's text is what a client is told after "cursor blob refused: ".
    pub fn resume(
        self: &Arc<Self>,
        blob: &[u8],
        journal_cap: usize,
    ) -> Result<Resumed, CursorError> {
        self.resume_with(blob, journal_cap, &|_| Ok(()))
    }

    /// [`Plan::resume`], asking `adopt` about a journal it would adopt before building
    /// the plan under it (which packs a window per domain at each stage the journal
    /// adds): a caller's limits on what a blob may bring, such as the shapes its rings
    /// can serve.
    pub fn resume_with(
        self: &Arc<Self>,
        blob: &[u8],
        journal_cap: usize,
        adopt: &dyn Fn(&[Change]) -> Result<(), String>,
    ) -> Result<Resumed, CursorError> {
        let c = self.decode_by_name(blob)?;
        self.check_fingerprint(&c)?;
        if !c.domains.is_empty() {
            // Before adopting a journal: its weights are per blob domain.
            self.map_domains(&c)?;
        }
        let mut plan = self.clone();
        if journal::compare(&self.journal, self.superseded, &c.journal, c.superseded)
            == Order::TheirsAhead
        {
            journal::check_carried(&c.journal, c.superseded, c.plan_step)
                .map_err(|e| CursorError::JournalInvalid(e.into()))?;
            if cursor::journal_bytes(&c.journal, self.domains.len()) > journal_cap {
                return Err(CursorError::JournalTooLarge {
                    changes: c.journal.len(),
                    cap: journal_cap,
                });
            }
            adopt(&c.journal).map_err(CursorError::Unservable)?;
            let adopted = self
                .with_history(c.journal.clone(), c.superseded)
                .map_err(CursorError::JournalInvalid)?;
            plan = Arc::new(adopted);
        }
        let adopted = !Arc::ptr_eq(&plan, self);
        let shared = journal::common_prefix(&self.journal, &plan.journal);
        let planner = plan.check_cursor(c)?;
        Ok(Resumed {
            plan,
            planner,
            adopted,
            shared,
        })
    }

    /// A planner restored from a cursor blob under this plan as it is: a blob whose
    /// journal is ahead of this plan's is refused ([`CursorError::JournalBehind`]), not
    /// adopted (see [`Plan::resume`]).
    pub fn restore(self: &Arc<Self>, blob: &[u8]) -> Result<Planner, CursorError> {
        self.check_cursor(self.decode_by_name(blob)?)
    }

    /// [`Plan::restore`], also when this plan's journal holds a change from before the
    /// cursor's step that plans every step up to it (and the bursty cycles it began) as
    /// the plan the cursor was made under does (this plan's config under the cursor's
    /// own journal): a change adopted from a blob that the config file already makes.
    /// The cursor's journal and history are then judged against that plan. For the
    /// daemon's own ring cursors, which a live change restores under the new plan.
    pub fn restore_alike(self: &Arc<Self>, blob: &[u8]) -> Result<Planner, CursorError> {
        match self.restore(blob) {
            Err(e @ (CursorError::JournalRewrites { .. } | CursorError::History { .. })) => {
                let c = self.decode_by_name(blob)?;
                let Ok(made) = self.with_history(c.journal.clone(), c.superseded) else {
                    return Err(e);
                };
                if !self.plans_alike_before(&made, self.first_safe_change(c.plan_step)) {
                    return Err(e);
                }
                self.check_cursor_as(c, Some(&made)).map_err(|_| e)
            }
            r => r,
        }
    }

    /// A plan checkpoint written under another journal, restored under this plan when
    /// that journal plans every step before it (and the bursty cycles it began) as this
    /// plan does: the daemon writes its checkpoints under its live changes, and one
    /// scheduled far ahead (a `set_stage` at a late step) left every checkpoint before it
    /// unusable to a plan without it (`explain`, `plan --from`, a restarted daemon),
    /// whose seeks then replayed from step 0. `made` caches this plan's config under each
    /// checkpoint journal tried, by the journal digest the checkpoint is named with
    /// (`None`: that journal does not apply here); a name that lies about its journal
    /// fails the journal check against the plan it picks.
    pub(super) fn restore_written_under(
        self: &Arc<Self>,
        blob: &[u8],
        journal: u64,
        made: &mut BTreeMap<u64, Option<Plan>>,
    ) -> Option<Planner> {
        let c = cursor::decode(blob).ok()?;
        self.check_fingerprint(&c).ok()?;
        let made = made
            .entry(journal)
            .or_insert_with(|| self.with_history(c.journal.clone(), c.superseded).ok())
            .as_ref()?;
        if !self.plans_alike_before(made, self.first_safe_change(c.plan_step)) {
            return None;
        }
        self.check_cursor_as(c, Some(made)).ok()
    }

    /// Refuses a blob made for another corpus or static config, or by a build whose
    /// planner is another version.
    fn check_fingerprint(&self, c: &CursorData) -> Result<(), CursorError> {
        if c.plan_version != super::PLAN_VERSION {
            return Err(CursorError::PlanVersion {
                blob: c.plan_version,
                ours: super::PLAN_VERSION,
            });
        }
        // Plan steps run ahead of trainer steps by the skipped ranges, which are bounded
        // like steps: twice the bound leaves room for both.
        let max = crate::config::plan::MAX_STEP;
        if c.step > max || c.plan_step > 2 * max {
            return Err(CursorError::Step {
                step: c.step,
                plan_step: c.plan_step,
                max,
            });
        }
        let (blob, ours) = match c.fingerprint {
            Fingerprint::Settings(blob) => (blob, self.settings_fingerprint),
            Fingerprint::Binary(blob) => (blob, self.fingerprint),
            Fingerprint::LegacyJson(blob) => (blob, self.legacy_fingerprint),
        };
        if blob != ours {
            return Err(CursorError::Fingerprint { blob, ours });
        }
        Ok(())
    }

    /// Every check of a decoded blob against this plan (fingerprint, journal, history,
    /// structure), and the planner it gives.
    fn check_cursor(self: &Arc<Self>, c: CursorData) -> Result<Planner, CursorError> {
        self.check_cursor_as(c, None)
    }

    /// [`Plan::check_cursor`]; with `alike`, a plan that plans the blob's past as this
    /// one does ([`Plan::restore_alike`]), the journal and history are judged against
    /// `alike`'s, the plan the blob was made under.
    fn check_cursor_as(
        self: &Arc<Self>,
        c: CursorData,
        alike: Option<&Plan>,
    ) -> Result<Planner, CursorError> {
        self.check_fingerprint(&c)?;
        let past = alike.unwrap_or(self);
        match journal::compare(&past.journal, past.superseded, &c.journal, c.superseded) {
            Order::Same => {}
            Order::OursAhead => {
                // Later changes are fine as long as they leave the blob's past alone.
                let extra = &past.journal[journal::common_prefix(&past.journal, &c.journal)..];
                if let Some(ch) = extra.iter().find(|ch| ch.at < c.plan_step) {
                    return Err(CursorError::JournalRewrites {
                        at: ch.at,
                        plan_step: c.plan_step,
                    });
                }
            }
            Order::TheirsAhead => {
                return Err(CursorError::JournalBehind {
                    blob: c.journal.len(),
                    ours: past.journal.len(),
                })
            }
            Order::Diverged(i) => {
                return Err(CursorError::JournalDiverged {
                    change: i + 1,
                    blob_at: c.journal.get(i).map(|ch| ch.at),
                    ours_at: past.journal.get(i).map(|ch| ch.at),
                })
            }
        }
        // Layout 7: domains by name; the digest covers the blob's domains in its order.
        let map = match c.fingerprint {
            Fingerprint::Settings(_) => Some(self.map_domains(&c)?),
            _ => None,
        };
        let known: Option<Vec<usize>> = map.as_ref().map(|m| {
            let mut order = vec![0; c.domains.len()];
            for (d, b) in m.iter().enumerate() {
                if let Some(b) = b {
                    order[*b] = d;
                }
            }
            order
        });
        // Layout 6 on: the digest reaches the bursty lookahead, so an edit inside a cycle
        // the blob's run had begun is refused too (layouts before 6 are checked as
        // they were written).
        let ours = if let Some(known) = &known {
            let end = past.first_safe_change_over(c.plan_step, Some(known));
            past.history_over(c.plan_step, end, Some(known))
        } else if c.lookahead {
            past.cursor_history(c.plan_step)
        } else {
            past.history(c.plan_step)
        };
        if c.history != ours {
            return Err(CursorError::History {
                step: c.step,
                blob: c.history,
                ours,
            });
        }
        // The blob's plan step may trail the step's mapping only by skipped steps (a
        // skip that starts where the blob stopped, added before the resume).
        let expected = self.plan_step_of(c.step);
        if (map.is_none() && c.streams.len() != self.domains.len())
            || c.plan_step > expected
            || !self.all_skipped(c.plan_step, expected)
        {
            return Err(CursorError::Shape {
                domains: c.streams.len(),
                step: c.step,
                plan_step: c.plan_step,
                ours: self.domains.len(),
                expected,
            });
        }
        let (mix, streams) = match map {
            None => (c.mix, c.streams),
            Some(map) => remap(&map, c.mix, c.streams),
        };
        // A carried error beyond a few cycles' rows is forged and would make the mixer
        // hand out whole batches a row at a time for thousands of steps: refused.
        if let Some((d, e)) = (mix.deficit.iter().enumerate())
            .find(|(d, e)| e.unsigned_abs() > self.mixer.deficit_bound(*d))
        {
            return Err(CursorError::Deficit {
                domain: self.domains[d].name.clone(),
                rows: e / super::mix::TICKS,
                most: self.mixer.deficit_bound(d) / super::mix::TICKS as u64,
            });
        }
        // Each reseed adds at most one reshuffle to a chain (`Stream::prepare`), and every
        // unit of a window walks its chain: a longer one is forged, and would make the
        // checks below and the planner after them thousands of times slower.
        let most = self.reseeds.len();
        for (d, s) in streams.iter().enumerate() {
            let n = [s.pos_chain.len(), s.block_chain.len()]
                .into_iter()
                .chain(s.tails.iter().map(|t| t.pos_chain.len()))
                .chain(
                    s.tails
                        .iter()
                        .flat_map(|t| &t.carry)
                        .map(|c| c.block_chain.len()),
                )
                .chain(s.carry.iter().map(|c| c.block_chain.len()))
                .max()
                .unwrap_or(0);
            if n > most {
                return Err(CursorError::Reshuffles {
                    domain: self.domains[d].name.clone(),
                    n,
                    most,
                });
            }
        }
        let mut p = Planner {
            plan: self.clone(),
            step: c.step,
            plan_step: c.plan_step,
            mix,
            streams: streams.into_iter().map(Stream::new).collect(),
        };
        // Structural checks that need the packed window.
        let stage_now = self.stage_at(c.plan_step);
        for (d, s) in p.streams.iter_mut().enumerate() {
            s.check(
                &self.domains[d],
                &self.geometries,
                stage_now,
                self.max_tails(d),
            )
            .map_err(|source| CursorError::Stream {
                domain: self.domains[d].name.clone(),
                source,
            })?;
        }
        Ok(p)
    }
}

/// The blob's mixer and stream states in this plan's domain order: a domain new to the
/// blob starts where weight 0 so far leaves it (no rows, no carried error, epoch 0).
fn remap(
    map: &[Option<usize>],
    mix: MixState,
    streams: Vec<StreamState>,
) -> (MixState, Vec<StreamState>) {
    let mut out = MixState::new(map.len());
    let mut slots: Vec<Option<StreamState>> = streams.into_iter().map(Some).collect();
    let mut states = Vec::with_capacity(map.len());
    for (d, b) in map.iter().enumerate() {
        match b {
            Some(b) => {
                out.rows[d] = mix.rows.get(*b).copied().unwrap_or(0);
                out.deficit[d] = mix.deficit.get(*b).copied().unwrap_or(0);
                states.push(slots.get_mut(*b).and_then(Option::take).unwrap_or_default());
            }
            None => states.push(StreamState::default()),
        }
    }
    (out, states)
}

#[cfg(test)]
mod tests;
