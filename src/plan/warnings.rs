//! What a plan warns about without refusing it: configs it honours, but poorly. Domains
//! the weights never name, a bursty domain the final mixture cannot give its weight,
//! batch-grouped domains owed more rows a step than their groups can give, and
//! batch-grouped domains beside a bursty one. A start
//! prints them, `check-config` too, and a live change that makes a bursty shortfall
//! worse is refused for it.

use super::domain::{self, DomainData};
use super::{mix, Plan};
use crate::config::plan::GroupMode;

impl Plan {
    /// What a start prints about this plan without refusing it: domains the weights
    /// never name ([`PlanConfig::unweighted_warnings`]) and a bursty domain the final
    /// mixture cannot give its weight ([`Plan::bursty_shortfall`]).
    pub fn warnings(&self) -> Vec<String> {
        let mut out = self.cfg.unweighted_warnings(&self.domain_names());
        out.extend(self.bursty_shortfall());
        out.extend(self.group_repeats());
        out.extend(self.bursty_beside_batch_groups());
        out.extend(self.bursty_beside_a_changing_schedule());
        out
    }

    /// Bursty domains in a schedule whose weights change: the other domains carry their
    /// error against their share of the rows the bursts leave, so a change inside a
    /// cycle leaves them off their targets for good (a review: 85 rows over a 400-step
    /// ramp at 1024 rows, period 10). docs/DESIGN.md, "Mixture".
    fn bursty_beside_a_changing_schedule(&self) -> Option<String> {
        let bursty: Vec<&str> = (self.domains.iter())
            .filter(|d| d.settings.bursty.is_some())
            .map(|d| d.name.as_str())
            .collect();
        // Shares, not raw weights: a point that only rescales them ({a=0.2,b=0.8} then
        // {a=1,b=4}) changes nothing and was warned about.
        let points = self.cfg.points();
        let names = self.domain_names();
        let shares = |w: &std::collections::BTreeMap<String, f64>| {
            let raw: Vec<f64> = names
                .iter()
                .map(|n| w.get(*n).copied().unwrap_or(0.0))
                .collect();
            let total: f64 = raw.iter().sum();
            raw.into_iter().map(|x| x / total).collect::<Vec<f64>>()
        };
        let changes = points.windows(2).any(|w| {
            let (a, b) = (shares(&w[0].weights), shares(&w[1].weights));
            a.iter().zip(&b).any(|(x, y)| (x - y).abs() > 1e-12)
        });
        if bursty.is_empty() || !changes {
            return None;
        }
        Some(format!(
            "bursty domain(s) {} beside a schedule whose weights change: while weights \
             change inside a bursty cycle the other domains drift from their token targets \
             (about rows-a-burst x change-of-share x (period - 1) / 2 rows) and the drift is \
             not paid back (docs/DESIGN.md, \"Mixture\"); keep the weights constant, or \
             use no bursty domain where the mixture must stay exact",
            bursty.join(", ")
        ))
    }

    /// Batch-grouped domains mixed with a bursty one: at each of its cycles the bursty
    /// domain takes most of a batch, the grouped domain's rows drop from one step to the
    /// next by more than one, and a group spanning batches then misses one (a review's
    /// run: 81 split groups in 100 steps, none without the bursty neighbour). The
    /// planner bounds spanning groups by the domain's rows under steady weights only.
    fn bursty_beside_batch_groups(&self) -> Option<String> {
        let bursty: Vec<&str> = (self.domains.iter())
            .filter(|d| d.settings.bursty.is_some())
            .map(|d| d.name.as_str())
            .collect();
        let grouped: Vec<&str> = (self.domains.iter())
            .filter(|d| d.settings.grouping.mode == GroupMode::Batch)
            .map(|d| d.name.as_str())
            .collect();
        if bursty.is_empty() || grouped.is_empty() {
            return None;
        }
        Some(format!(
            "bursty domain(s) {} take a whole cycle's rows in one step, so batch-grouped \
             domain(s) {} get far fewer rows at that step than at the one before: a group \
             spanning batches then skips one (`split groups` in `millrace plan`); use \
             grouping mode \"sequence\" there, or no bursty domain, where every group's \
             rows must land in consecutive batches",
            bursty.join(", "),
            grouped.join(", ")
        ))
    }

    /// Batch-grouped domains whose weights give them more rows a step than their groups
    /// can fill under the cap: with every group spanning at `max_share` of the batch,
    /// the rest of the domain's rows come from its next epochs, which start the same
    /// groups again, so one batch holds the same documents several times (one group of
    /// 2000 documents, capped at 3 of 64 rows and owed 22 a step, put each document in
    /// 8 epochs' rows of step 0). Checked at every schedule knot, stage start and the
    /// domain's `from_step`, where its rows a step peak (row shares are monotone between
    /// them).
    fn group_repeats(&self) -> Vec<String> {
        let batch = |d: &DomainData| d.settings.grouping.mode == GroupMode::Batch;
        if !self.domains.iter().any(batch) {
            return Vec::new();
        }
        let mut at: Vec<u64> = vec![0];
        at.extend(self.mixer.schedule.knots_before(u64::MAX));
        for st in &self.mixer.stages {
            at.extend([st.step.saturating_sub(1), st.step]);
        }
        // Grouping starts at `from_step`: from there on.
        at.extend(self.domains.iter().map(|d| d.settings.grouping.from_step));
        at.sort_unstable();
        at.dedup();
        // Rows a batch and row shares at each of those steps, computed once.
        let peaks: Vec<(u64, u32, Vec<f64>)> = at
            .iter()
            .map(|&step| (step, self.mixer.rows_at(step), self.mixer.row_shares(step)))
            .collect();
        let mut out = Vec::new();
        for (d, dom) in self.domains.iter().enumerate().filter(|(_, d)| batch(d)) {
            let share = dom.settings.grouping.max_share;
            let groups = dom.units(domain::UnitKind::Group);
            let from = dom.settings.grouping.from_step;
            let worst = peaks
                .iter()
                .filter(|p| p.0 >= from)
                .map(|(step, rows, shares)| {
                    let owed = shares[d] * *rows as f64;
                    let room = groups as f64 * crate::config::plan::group_cap(*rows, share) as f64;
                    (owed - room, *step, *rows, owed)
                })
                .max_by(|a, b| a.0.total_cmp(&b.0));
            if let Some((over, step, rows, owed)) = worst.filter(|w| w.0 >= 1.0) {
                let need = (owed / groups.max(1) as f64).ceil() / rows as f64;
                let fix = if need <= 1.0 {
                    format!("raise grouping.max_share to at least {need:.4} or lower its weight")
                } else {
                    "lower its weight: it has fewer groups than a step's rows".to_string()
                };
                out.push(format!(
                    "domain {} (corpus.domain[{d}]): batch grouping caps each of its {groups} \
                     groups at {} of a {rows}-row batch, but at plan step {step} it is \
                     owed about {owed:.0} rows a step, {over:.0} more than its groups can \
                     give: those come from its next epochs, so the same groups appear \
                     several times in one batch: {fix}",
                    dom.name,
                    crate::config::plan::group_cap(rows, share),
                ));
            }
        }
        out
    }

    /// Why the mixture the schedule ends with cannot give a bursty domain its weight
    /// ([`mix::Mixer::bursty_shortfall`]), if it cannot: the domain, the step and the
    /// share it would get. The daemon warns of it at start and refuses a live change
    /// that brings it; a config is not refused for it, since a run that already trains
    /// under it could only fix it by rewriting its history.
    pub fn bursty_shortfall(&self) -> Option<String> {
        self.shortfall_words(self.mixer.bursty_shortfall()?)
    }

    /// Whether this plan leaves a bursty domain shorter than `before` does: one that
    /// was not short, another domain, or the same one losing more of its share. What a
    /// live change is refused for, in words ([`Plan::bursty_shortfall`]); a change to a
    /// plan that is already short may keep it so, or make it less so.
    pub fn bursty_shortfall_beyond(&self, before: &Plan) -> Option<String> {
        let s = self.mixer.bursty_shortfall()?;
        let worse = match before.mixer.bursty_shortfall() {
            None => true,
            Some(b) => b.domain != s.domain || s.share - s.got > b.share - b.got + 1e-9,
        };
        if worse {
            self.shortfall_words(s)
        } else {
            None
        }
    }

    fn shortfall_words(&self, s: mix::Shortfall) -> Option<String> {
        Some(format!(
            "domain {} (bursty, period {}) would get {:.4} of the rows from plan step {} \
             on instead of its {:.4}: it takes a whole cycle's rows in one step, so it can \
             have at most 1/{} of them, and less where bursty domains listed before it \
             start their cycles in the same steps; the rows it falls behind are carried \
             up to 10,001 batches and written off beyond that, so the run keeps its \
             mixture short of the target for good: lower its weight or period",
            self.domains[s.domain].name, s.period, s.got, s.step, s.share, s.period
        ))
    }
}
