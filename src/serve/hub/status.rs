//! Status: what the hub reports about its rings, peers, mixture and journal for STATUS,
//! `millrace status` and the metrics exporter.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Hub, JobPlan, Published, RingEntry, State};
use crate::plan::Plan;
use crate::wire::status::{
    DomainStatus, JobPlanCounts, JobStatus, JournalEntry, JournalGap, JournalPoint, JournalStage,
    PeerStatus, PoisonedShard, RingMemory, RingStatus, Status, STATUS_JOURNAL_BYTES,
    STATUS_JOURNAL_HEAD, STATUS_JOURNAL_TAIL,
};

impl Hub {
    /// The journal as JOURNAL_ENTRY objects (docs/PROTOCOL.md).
    pub fn journal(&self) -> Vec<JournalEntry> {
        let (plan, sources) = Self::journal_parts(&self.lock());
        Self::journal_of(&plan, &sources)
    }

    /// What [`Hub::journal_of`] needs, taken under the lock: the plan is shared and the
    /// sources are a pointer per change, so the entries (thousands of strings at a full
    /// journal, every second for the exporter) are built after the lock is let go.
    fn journal_parts(st: &State) -> (Arc<Plan>, Vec<&'static str>) {
        (st.plan.clone(), st.sources.clone())
    }

    fn journal_of(plan: &Plan, sources: &[&'static str]) -> Vec<JournalEntry> {
        Self::journal_range(plan, sources, 0..plan.journal().len())
    }

    /// The JOURNAL_ENTRY objects of the changes at `range` (journal order).
    fn journal_range(
        plan: &Plan,
        sources: &[&'static str],
        range: std::ops::Range<usize>,
    ) -> Vec<JournalEntry> {
        let names = plan.domain_names();
        let journal = plan.journal();
        let sources = sources.iter().chain(std::iter::repeat(&"cursor"));
        journal
            .iter()
            .zip(sources)
            .skip(range.start)
            .take(range.len())
            .map(|(c, src)| JournalEntry {
                at_step: plan.trainer_step_of(c.at),
                plan_step: c.at,
                source: src.to_string(),
                stage: c.stage.map(|s| JournalStage {
                    seq_len: s.seq_len,
                    global_batch_rows: s.rows,
                    best_fit_window: s.window,
                    chain_groups: s.chain_groups,
                }),
                points: c
                    .points
                    .iter()
                    .map(|(step, w)| JournalPoint {
                        step: *step,
                        weights: names
                            .iter()
                            .map(|n| n.to_string())
                            .zip(w.iter().copied())
                            .collect(),
                    })
                    .collect(),
            })
            .collect()
    }

    /// The journal's JOURNAL_ENTRY objects when their JSON takes at most `limit` bytes;
    /// otherwise `None`, found entry by entry without building the rest. A reply that
    /// carried the journal was built whole before its size was checked: at 4,096
    /// changes of 300 domains with 4,096-byte names, gigabytes for every `set_weights`.
    pub fn journal_within(&self, limit: usize) -> Option<Vec<JournalEntry>> {
        let (plan, sources) = Self::journal_parts(&self.lock());
        let mut bytes = 2usize;
        for i in 0..plan.journal().len() {
            let e = Self::journal_range(&plan, &sources, i..i + 1);
            bytes += 1 + json_len(&e).saturating_sub(2);
            if bytes > limit {
                return None;
            }
        }
        Some(Self::journal_of(&plan, &sources))
    }

    /// The journal as STATUS lists it: every change when their JSON fits
    /// [`STATUS_JOURNAL_BYTES`]; else its first [`STATUS_JOURNAL_HEAD`] and last
    /// [`STATUS_JOURNAL_TAIL`] changes, fewer where their JSON would pass it (the newest
    /// and the oldest kept first), and the gap between them. Cut at 20 changes whatever
    /// their size, 25 small `set-weights` (3 KB) listed 20 of them. A whole journal (4,096 changes of 300 domains with 4,096-byte
    /// names: 5 GB as JSON) made STATUS outgrow its frame after 54 changes, so `status`,
    /// `top` and the exporter failed just when an operator needed them; the `journal` op
    /// still lists every change.
    fn status_journal(
        plan: &Plan,
        sources: &[&'static str],
    ) -> (Vec<JournalEntry>, Option<JournalGap>) {
        let journal = plan.journal();
        let n = journal.len();
        // An upper bound on one entry's JSON: its keys, and per point each domain's
        // quoted name, a colon, a float (at most 24 bytes) and a comma.
        let per_point: usize = 64
            + plan
                .domain_names()
                .iter()
                .map(|d| d.len() + 28)
                .sum::<usize>();
        let bytes = |c: &crate::plan::Change| 256 + c.points.len() * per_point;
        // Every change when all of them fit (a journal of small changes is listed whole,
        // up to `live_changes`); only a journal past the budget is cut to its ends.
        let all = journal
            .iter()
            .fold(0usize, |sum, c| sum.saturating_add(bytes(c)));
        if all <= STATUS_JOURNAL_BYTES {
            return (Self::journal_range(plan, sources, 0..n), None);
        }
        let mut budget = STATUS_JOURNAL_BYTES;
        let mut fits = |c: &crate::plan::Change| match budget.checked_sub(bytes(c)) {
            Some(left) => {
                budget = left;
                true
            }
            None => false,
        };
        // The newest change, then the oldest, then more of the newest, then more of the
        // oldest, each while it fits.
        let (mut head, mut tail) = (0, 0);
        for (ends, most) in [
            (0, 1),
            (1, 1),
            (0, STATUS_JOURNAL_TAIL),
            (1, STATUS_JOURNAL_HEAD),
        ] {
            while head + tail < n {
                let next = if ends == 0 { n - 1 - tail } else { head };
                let count = if ends == 0 { &mut tail } else { &mut head };
                if *count >= most || !fits(&journal[next]) {
                    break;
                }
                *count += 1;
            }
        }
        let mut out = Self::journal_range(plan, sources, 0..head);
        out.extend(Self::journal_range(plan, sources, n - tail..n));
        let gap = (head + tail < n).then(|| JournalGap {
            after: head as u64,
            changes: (n - head - tail) as u64,
        });
        (out, gap)
    }

    /// Everything `status` reports that the hub knows (docs/PROTOCOL.md, STATUS); the
    /// daemon adds the process's own fields.
    pub fn status(&self) -> Status {
        self.status_taking(false)
    }

    /// [`Hub::status`] for the exporter: with the last figures of the rings and jobs
    /// gone since its last call (`Status::departed_rings`, `departed_jobs`), taken in
    /// the same look (the first call starts keeping them), and without the journal's
    /// entries, which no metric reads (`journal_changes` still counts them): each
    /// second's export built up to [`STATUS_JOURNAL_BYTES`] of them and dropped them.
    pub fn status_for_export(&self) -> Status {
        self.status_taking(true)
    }

    /// STATUS; `export`: as [`Hub::status_for_export`] takes it.
    fn status_taking(&self, export: bool) -> Status {
        let now = Instant::now();
        let wait = Duration::from_millis(crate::wire::status::STATUS_LOCK_WAIT_MS);
        let Some(mut st) = self.lock_within(wait) else {
            // A read under the lock hangs: say what is stuck without the lock.
            let mut out = Status {
                hub_busy: true,
                ..Status::default()
            };
            self.lock_free_status(&mut out);
            return out;
        };
        let ((plan, sources), mut out, best, delivered) = {
            let gone = match export {
                true => st.departed.replace(Default::default()).unwrap_or_default(),
                false => Default::default(),
            };
            if self.sync_pages(&mut st) {
                self.work.notify_all();
            }
            let mut jobs: Vec<JobStatus> = Vec::new();
            let mut best: Option<Published> = st.retired.1.clone();
            let mut delivered: Vec<u64> = vec![0; st.plan.domain_names().len()];
            for (s, t) in delivered.iter_mut().zip(&st.retired.0) {
                *s += t;
            }
            let mut names: Vec<&String> = st.jobs.keys().collect();
            names.sort();
            for name in names {
                let job = &st.jobs[name];
                let mut ranks: Vec<&u32> = job.rings.keys().collect();
                ranks.sort();
                let rings: Vec<RingStatus> = ranks
                    .into_iter()
                    .map(|r| {
                        let e = &job.rings[r];
                        e.keep_furthest(&job.plan, &mut best);
                        for (s, t) in delivered.iter_mut().zip(&e.stats.domain_tokens) {
                            *s += t;
                        }
                        e.status(*r, self.settings.slots, now)
                    })
                    .collect();
                jobs.push(JobStatus {
                    job: name.clone(),
                    dp_size: job.dp_size,
                    rings,
                    planner: job.plan_counts(),
                });
            }
            let by_source = |m: &BTreeMap<&'static str, u64>| -> BTreeMap<String, u64> {
                m.iter().map(|(k, v)| (k.to_string(), *v)).collect()
            };
            let out = Status {
                clients: st.clients as u64,
                draining: st.draining,
                ring_memory: RingMemory {
                    used_bytes: Self::ring_memory(&st),
                    budget_bytes: self.settings.ring_budget,
                },
                reloads: st.reloads.values().sum::<u64>(),
                failed_reloads: st.failed_reloads.values().sum::<u64>(),
                reloads_by_source: by_source(&st.reloads),
                failed_reloads_by_source: by_source(&st.failed_reloads),
                // The step a change can start at: past the published steps and past a
                // bursty cycle begun before them (what `set-weights` would move to).
                first_changeable_step: st.plan.trainer_step_of(
                    st.plan
                        .first_safe_change(st.plan.plan_step_of(st.first_changeable())),
                ),
                journal_superseded: st.plan.superseded(),
                jobs,
                fingerprint: format!("{:032x}", st.plan.fingerprint()),
                departed_rings: gone.rings,
                departed_jobs: gone.jobs,
                ..Status::default()
            };
            (Self::journal_parts(&st), out, best, delivered)
        };
        out.journal_changes = plan.journal().len() as u64;
        if !export {
            (out.journal, out.journal_omitted) = Self::status_journal(&plan, &sources);
        }
        // Realized: the share of real tokens each domain got in every slot published so
        // far. Target: the token shares the schedule asks for at the most advanced
        // ring's step. Rows come from that ring's published cursor; epochs from its
        // planner (up to `prefetch_steps` ahead of it).
        let names = plan.domain_names();
        let (plan_step, rows, epochs) = match best {
            Some((_, mark, ep)) => (mark.plan_step, mark.rows, ep),
            None => (0, vec![0; names.len()], vec![0.0; names.len()]),
        };
        let total: u64 = delivered.iter().sum();
        let target = plan.schedule().shares(plan_step);
        let row_target = plan.mixer().row_shares(plan_step);
        let corpus = plan.domain_tokens();
        out.domains = names
            .iter()
            .enumerate()
            .map(|(d, n)| DomainStatus {
                name: n.to_string(),
                target_share: target.get(d).copied().unwrap_or(0.0),
                realized_share: if total > 0 {
                    delivered[d] as f64 / total as f64
                } else {
                    0.0
                },
                tokens: delivered[d],
                target_row_share: row_target.get(d).copied().unwrap_or(0.0),
                rows: rows.get(d).copied().unwrap_or(0),
                epochs: epochs.get(d).copied().unwrap_or(0.0),
                corpus_tokens: corpus.get(d).copied().unwrap_or(0),
            })
            .collect();
        let f = *self.fill.lock().unwrap_or_else(|p| p.into_inner());
        out.plan_step = plan_step;
        out.padding_fraction = if f.positions > 0 {
            1.0 - f.real as f64 / f.positions as f64
        } else {
            0.0
        };
        out.truncation_fraction = if f.docs > 0 {
            f.cut as f64 / f.docs as f64
        } else {
            0.0
        };
        self.lock_free_status(&mut out);
        out
    }

    /// The hub's lock, unless another holds it for longer than `wait` (then `None`).
    fn lock_within(&self, wait: Duration) -> Option<std::sync::MutexGuard<'_, State>> {
        let t0 = Instant::now();
        loop {
            match self.state.try_lock() {
                Ok(g) => return Some(g),
                Err(std::sync::TryLockError::Poisoned(p)) => return Some(p.into_inner()),
                Err(std::sync::TryLockError::WouldBlock) if t0.elapsed() >= wait => return None,
                Err(std::sync::TryLockError::WouldBlock) => {
                    std::thread::sleep(Duration::from_millis(1))
                }
            }
        }
    }

    /// The STATUS fields that need no hub lock: poisoned shards, the reader, and the
    /// work the watchdog finds stuck.
    fn lock_free_status(&self, out: &mut Status) {
        // Shards that changed under the daemon: no ring reads them until a restart.
        let mut poisoned = self
            .source
            .shards
            .iter()
            .flatten()
            .filter_map(|s| Some((s, s.poisoned()?)));
        out.poisoned_shards = poisoned
            .by_ref()
            .take(crate::wire::status::STATUS_POISONED_SHARDS)
            .map(|(s, why)| PoisonedShard {
                shard: s.path().display().to_string(),
                reason: why.to_string(),
            })
            .collect();
        out.poisoned_shards_total = (out.poisoned_shards.len() + poisoned.count()) as u64;
        out.reader = self.source.readers.reader().as_str().to_string();
        out.reader_fallback = self.source.readers.fallback();
        out.reader_retry = self.source.readers.retry();
        // Fills in flight past the watchdog's bound: the file and bytes each reads.
        out.stuck_fills = self.stuck_fills(self.settings.stuck_fill);
    }
}

/// The length of `v` as JSON, counted without keeping the text.
fn json_len(v: &impl serde::Serialize) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0 += b.len();
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut c = Count(0);
    // Writing to a counter cannot fail; a value that does not serialize counts as far as
    // it got.
    let _ = serde_json::to_writer(&mut c, v);
    c.0
}

impl super::Job {
    /// What the job's planner holds and planned, for the exporter's per-job series.
    pub(super) fn plan_counts(&self) -> JobPlanCounts {
        // The batches it holds (at most `jobplan::keep`, whatever a stalled rank does),
        // and the batches planned by the job's planner (of them, by the plan thread
        // outside the lock) and by rings' private planners (about one per step, not one
        // per rank per step).
        JobPlanCounts {
            held: self.plan.held() as u64,
            planned: self.plan.planned,
            private: self.plan.private,
            ahead: self.plan.ahead,
            waits: self.plan.waits,
            serial: self.serial.0,
        }
    }
}

impl RingEntry {
    /// The ring's RING object of STATUS (rank `dp_rank`, `slots` slots) at `now`.
    pub(super) fn status(&self, dp_rank: u32, slots: u32, now: Instant) -> RingStatus {
        let (consumer, producer) = self.stats.waits(now);
        let released = self
            .peers
            .values()
            .map(|p| p.released)
            .min()
            .unwrap_or(self.published);
        let mut peers: Vec<PeerStatus> = self
            .peers
            .values()
            .map(|p| PeerStatus {
                replica: p.replica.clone(),
                pid: p.pid,
                released_step: p.released,
                release_page: p.page.is_some(),
            })
            .collect();
        peers.sort_by(|a, b| a.replica.cmp(&b.replica));
        RingStatus {
            dp_rank,
            published_step: self.published,
            released_step: released,
            slots,
            occupancy: self.published.saturating_sub(released).min(slots as u64),
            peers,
            replicas: self.replicas,
            joined: self.joined.len() as u32,
            tokens_delivered: self.stats.tokens_delivered,
            batches_delivered: self.stats.batches_delivered,
            consumer_wait_s: consumer,
            producer_wait_s: producer,
            release_frames: self.stats.release_frames,
            page_releases: self.stats.page_releases,
            wakes: self.stats.wakes,
            wakes_deferred: self.stats.wakes_deferred,
            serial: self.stats.serial.0,
        }
    }

    /// Replaces `best` with this ring's last published cursor when that is further on:
    /// `status` reports the mixture at the most advanced ring, with the epochs of the
    /// planner that planned it (its own, else its job's).
    pub(super) fn keep_furthest(&self, job: &JobPlan, best: &mut Option<Published>) {
        if let Some(c) = self.cursors.back() {
            if best.as_ref().is_none_or(|b| c.step > b.0) {
                let epochs = match &self.own {
                    Some(o) => o.planner.epochs(),
                    None => job.epochs(),
                };
                *best = Some((c.step, c.mark.clone(), epochs));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::phase::tests::plan;
    use super::super::{Hub, HubSettings};
    use crate::config::serve::Reader;
    use crate::corpus::DType;
    use crate::plan::Change;
    use crate::serve::fill::{Readers, Source};
    use crate::serve::ring::TokenType;

    /// A hub over the one-domain test plan with `changes` live weight changes.
    fn hub(changes: u64) -> Hub {
        let journal = (0..changes)
            .map(|i| Change {
                at: 10 + i,
                points: vec![(10 + i, vec![1.0 + i as f64])],
                stage: None,
            })
            .collect();
        let plan = plan()
            .with_journal(journal)
            .expect("weights of the one domain");
        let source = Source {
            shards: vec![Vec::new()],
            pad_token: 0,
            vocab_size: None,
            readers: Readers::copy(Reader::Mmap),
        };
        let settings = HubSettings {
            slots: 4,
            prefetch: 2,
            token: TokenType(DType::Int32),
            max_clients: 4,
            ring_budget: 1 << 30,
            stage_reserve: 0,
            checkpoints: None,
            wake_coalesce: Duration::ZERO,
            live_changes: 32,
            stuck_fill: Duration::from_secs(30),
        };
        Hub::new(std::sync::Arc::new(plan), source, settings)
    }

    /// The exporter's STATUS counts the journal but lists none of it: no metric reads
    /// an entry. It listed every change STATUS does (up to 8 MiB of them, each second).
    #[test]
    fn the_exporters_status_counts_the_journal_without_listing_it() {
        let hub = hub(3);
        let full = hub.status();
        assert_eq!((full.journal_changes, full.journal.len()), (3, 3));
        let export = hub.status_for_export();
        assert_eq!(export.journal_changes, 3);
        assert!(
            export.journal.is_empty() && export.journal_omitted.is_none(),
            "the exporter's STATUS lists {} changes",
            export.journal.len()
        );
    }
}
