//! Property tests for the deterministic batch planner (`src/plan`): the "Done means"
//! list of issue 3. Every test is deterministic (fixed proptest seeds, no failure
//! persistence, fixed-seed RNGs) and the whole file runs in well under a minute.
//!
//! What each group of tests proves:
//! - `permutation_*`: the epoch shuffle is a bijection for every n in 1..=2000 and has
//!   Spearman |rho| < 3/sqrt(N) for N = 10^3 .. 10^7.
//! - `coverage_*`: within one epoch of a domain every unit and every token is used exactly
//!   once (an upsampled unit exactly `factor` times), concat overlapping rows by exactly
//!   one token; best_fit never cuts a unit that fits a row; grouped units keep reading
//!   order; batch grouping keeps groups in one batch (with the exceptions that really
//!   exist, asserted precisely); the report's tally agrees with an independent count.
//! - `batch_grouping_*` (issue 14): every group of a batch-grouped domain in one batch or
//!   consecutive batches, never above the cap, across epoch ends, checked by
//!   tests/grouping_check (shared with the CLI test), and `plan`'s figures agree.
//! - `resume_*`: restoring a blob and `seek` continue the uninterrupted stream bit for bit,
//!   for every packing x grouping mode with bursty, upsampling, schedules, skips, reseeds.
//! - `seek_checkpoints_*` (issue 16): a seek from stored planner checkpoints equals the
//!   plain replay bit for bit, under schedules, live-change journals, new skips and
//!   reseeds, across epoch ends; corrupt, forged and foreign checkpoints are refused.
//! - `dp_*`: rank slices partition the global batch as [rG/R, (r+1)G/R).
//! - `mixture_*`: cumulative rows within one row of target (sum of nominal ticks, and an
//!   independently computed schedule integral); bursty domains back within one row at
//!   each cycle end with their long-run share.
//! - `cursor_*`: small, versioned, checksummed; refuses other corpora/configs/histories;
//!   no single-byte corruption and no arbitrary input panics or is accepted by mistake.
//! - `config_*`: validation errors name the field.
//! - `determinism_*`: batches depend only on the inputs, and the planner's version pins
//!   them (`PLAN_VERSION`: a change that moves the batches of the golden plans fails
//!   until the version is raised).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use millrace::config::plan::{
    Bursty, DomainSettings, GroupMode, Grouping, Packing, PlanConfig, Reseed, SchedulePoint, Skip,
    Upsample,
};
use millrace::corpus::GroupRun;
use millrace::plan::cursor::{self, CursorData, Fingerprint};
use millrace::plan::mix::{MixState, Mixer, Schedule, StageMix, TICKS};
use millrace::plan::permute::{chained, Permutation, Reshuffle};
use millrace::plan::report::Tally;
use millrace::plan::{
    CarryLevel, CheckpointKey, Checkpoints, CursorError, DocSource, DomainInput, GlobalBatch,
    MemCheckpoints, MemShard, Plan, PlanError, Row, Segment, StreamState, Tail, MAX_TRIES,
};
use proptest::prelude::*;
use proptest::test_runner::{Config as PtConfig, RngAlgorithm, RngSeed, TestRunner};
use rand::{Rng, SeedableRng};
use rand_pcg::Pcg64;

mod grouping_check;

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

fn pt_config(cases: u32, seed: u64) -> PtConfig {
    PtConfig {
        cases,
        failure_persistence: None,
        rng_algorithm: RngAlgorithm::ChaCha,
        rng_seed: RngSeed::Fixed(seed),
        max_shrink_iters: 256,
        ..PtConfig::default()
    }
}

/// One shard: document lengths and the sizes of its group runs (in document order).
#[derive(Debug, Clone)]
struct ShardSpec {
    lengths: Vec<u32>,
    runs: Vec<u64>,
}

impl ShardSpec {
    fn new(lengths: Vec<u32>, sizes: &[u64]) -> ShardSpec {
        // Cut the document list into runs of the given sizes (the last one truncated).
        let mut runs = Vec::new();
        let mut left = lengths.len() as u64;
        let mut i = 0;
        while left > 0 {
            let s = sizes.get(i).copied().unwrap_or(1).clamp(1, left);
            runs.push(s);
            left -= s;
            i += 1;
        }
        ShardSpec { lengths, runs }
    }

    fn group_id(run: usize) -> u64 {
        1000 + 17 * run as u64
    }

    fn groups(&self) -> Vec<GroupRun> {
        let mut first = 0;
        self.runs
            .iter()
            .enumerate()
            .map(|(i, &docs)| {
                let r = GroupRun {
                    id: Self::group_id(i),
                    first_doc: first,
                    docs,
                };
                first += docs;
                r
            })
            .collect()
    }

    fn run_of_doc(&self) -> Vec<usize> {
        let mut out = Vec::with_capacity(self.lengths.len());
        for (i, &docs) in self.runs.iter().enumerate() {
            out.extend(std::iter::repeat_n(i, docs as usize));
        }
        out
    }

    /// (first doc, docs, tokens) per run.
    fn run_info(&self) -> Vec<(u64, u64, u64)> {
        let mut first = 0u64;
        self.runs
            .iter()
            .map(|&docs| {
                let len = (first..first + docs)
                    .map(|d| self.lengths[d as usize] as u64)
                    .sum();
                let r = (first, docs, len);
                first += docs;
                r
            })
            .collect()
    }
}

#[derive(Debug, Clone)]
struct DomSpec {
    name: String,
    shards: Vec<ShardSpec>,
    settings: DomainSettings,
}

impl DomSpec {
    fn tokens(&self) -> u64 {
        self.shards
            .iter()
            .flat_map(|s| s.lengths.iter())
            .map(|&l| l as u64)
            .sum()
    }
}

fn inputs(specs: &[DomSpec]) -> Vec<DomainInput> {
    specs
        .iter()
        .map(|d| DomainInput {
            name: d.name.clone(),
            shards: d
                .shards
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    let src: Arc<dyn DocSource> = Arc::new(MemShard {
                        lengths: s.lengths.clone(),
                        groups: Some(s.groups()),
                    });
                    (format!("{}/shard{i}", d.name), src)
                })
                .collect(),
            settings: d.settings,
        })
        .collect()
}

fn weights_map(w: &[(&str, f64)]) -> BTreeMap<String, f64> {
    w.iter().map(|(n, x)| (n.to_string(), *x)).collect()
}

fn base_config(seq_len: u32, g: u32, packing: Packing, window: u64) -> PlanConfig {
    PlanConfig {
        seed: 0,
        seq_len,
        global_batch_rows: g,
        packing,
        best_fit_window: window,
        eod_token: None,
        pad_token: 0,
        vocab_size: None,
        weights: None,
        schedule: Vec::new(),
        skip: Vec::new(),
        reseed: Vec::new(),
        stage: Vec::new(),
    }
}

/// Why `cfg` over `specs` does not build; `what` names the case when it does.
fn build_error(specs: &[DomSpec], cfg: &PlanConfig, what: &str) -> String {
    match Plan::new(&inputs(specs), cfg.clone(), 0) {
        Ok(_) => panic!("{what} builds"),
        Err(e) => e.to_string(),
    }
}

fn build(specs: &[DomSpec], cfg: PlanConfig) -> Arc<Plan> {
    Arc::new(Plan::new(&inputs(specs), cfg, 0x5eed).expect("plan builds"))
}

fn settings(mode: GroupMode) -> DomainSettings {
    DomainSettings {
        grouping: Grouping {
            mode,
            ..Grouping::default()
        },
        ..DomainSettings::default()
    }
}

/// Lengths with zero-length documents, rows exactly full, one over, and long documents.
fn gen_lengths(rng: &mut Pcg64, n: usize, cap: u32) -> Vec<u32> {
    (0..n)
        .map(|_| match rng.gen_range(0..20) {
            0 => 0,
            1 => cap - 1,
            2 => cap,
            3 => cap + 1,
            4..=7 => rng.gen_range(cap + 1..4 * cap),
            _ => rng.gen_range(1..cap),
        })
        .collect()
}

fn gen_domain(
    rng: &mut Pcg64,
    name: &str,
    shards: usize,
    docs: usize,
    cap: u32,
    settings: DomainSettings,
) -> DomSpec {
    let shards = (0..shards)
        .map(|_| {
            let lengths = gen_lengths(rng, docs, cap);
            let sizes: Vec<u64> = (0..docs).map(|_| rng.gen_range(1..=6)).collect();
            ShardSpec::new(lengths, &sizes)
        })
        .collect();
    let mut d = DomSpec {
        name: name.to_string(),
        shards,
        settings,
    };
    if d.tokens() == 0 {
        d.shards[0] = ShardSpec::new(vec![3], &[1]);
    }
    d
}

fn run_batches(plan: &Arc<Plan>, steps: u64) -> Vec<GlobalBatch> {
    let mut p = plan.start();
    (0..steps).map(|_| p.next_batch()).collect()
}

// ---------------------------------------------------------------------------------------
// 1. Permutation
// ---------------------------------------------------------------------------------------

#[test]
fn permutation_is_a_bijection_for_every_n_up_to_2000() {
    let keys = [0u64, 1, 0xdead_beef, u64::MAX, 0x9e37_79b9_7f4a_7c15];
    let mut seen = Vec::new();
    for n in 1..=2000u64 {
        for &key in &keys {
            let p = Permutation::new(n, key);
            assert_eq!(p.len(), n);
            seen.clear();
            seen.resize(n as usize, false);
            for i in 0..n {
                let j = p.apply(i);
                assert!(j < n, "n {n} key {key:x}: {i} -> {j} out of range");
                assert!(!seen[j as usize], "n {n} key {key:x}: {j} hit twice");
                seen[j as usize] = true;
            }
        }
    }
    // Keys give different permutations (not a fixed order), including for n = 2000.
    let a: Vec<u64> = (0..2000)
        .map(|i| Permutation::new(2000, 1).apply(i))
        .collect();
    let b: Vec<u64> = (0..2000)
        .map(|i| Permutation::new(2000, 2).apply(i))
        .collect();
    assert_ne!(a, b);
    assert!(Permutation::new(0, 5).is_empty());
}

#[test]
fn permutation_reshuffled_tails_stay_bijective() {
    // A reseed chains tail reshuffles on top of the base permutation: still a bijection,
    // and positions before the reshuffle start are untouched.
    for n in [1u64, 2, 7, 64, 100, 1000, 1023] {
        let base = Permutation::new(n, 77);
        let chain = [
            Reshuffle {
                start: n / 3,
                key: 5,
            },
            Reshuffle {
                start: n / 2,
                key: 6,
            },
            Reshuffle {
                start: n + 4,
                key: 7,
            },
        ];
        let mut seen = vec![false; n as usize];
        for i in 0..n {
            let j = chained(&base, &chain, i);
            assert!(!seen[j as usize]);
            seen[j as usize] = true;
            if i < n / 3 {
                assert_eq!(j, base.apply(i));
            }
        }
    }
}

/// Spearman's rho between index i and position perm(i). Both are permutations of
/// 0..n, so rho = 1 - 6 * sum(d^2) / (n (n^2 - 1)), with the sum exact in i128.
fn spearman(p: &Permutation) -> f64 {
    let n = p.len();
    let mut s: i128 = 0;
    for i in 0..n {
        let d = i as i128 - p.apply(i) as i128;
        s += d * d;
    }
    let n = n as f64;
    1.0 - 6.0 * s as f64 / (n * (n * n - 1.0))
}

#[test]
fn permutation_rank_correlation_is_below_3_over_sqrt_n() {
    for (n, keys) in [
        (1_000u64, &[0u64, 1, 2, 3, 0xdead_beef][..]),
        (10_000, &[0, 1, 2, 3][..]),
        (100_000, &[0, 1, 2][..]),
        (1_000_000, &[0, 7][..]),
        (10_000_000, &[42][..]),
    ] {
        for &key in keys {
            let rho = spearman(&Permutation::new(n, key));
            let bound = 3.0 / (n as f64).sqrt();
            assert!(rho.abs() < bound, "N {n} key {key}: rho {rho} >= {bound}");
        }
    }
    // Non-powers of two near the Feistel width boundaries too.
    for n in [1_025u64, 65_537, 1_048_575] {
        let rho = spearman(&Permutation::new(n, 9));
        assert!(rho.abs() < 3.0 / (n as f64).sqrt(), "N {n}: rho {rho}");
    }
}

// ---------------------------------------------------------------------------------------
// 2, 3, 10. Coverage, best_fit never cuts what fits, grouping
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct CoverCase {
    seq_len: u32,
    g: u32,
    packing: Packing,
    window: u64,
    seed: u64,
    domains: Vec<DomSpec>,
    weight_factors: Vec<f64>,
    reseeds: Vec<(u64, u64)>,
}

fn length_strategy(cap: u32) -> impl Strategy<Value = u32> {
    prop_oneof![
        1 => Just(0u32),
        6 => 1..cap,
        1 => Just(cap - 1),
        1 => Just(cap),
        1 => Just(cap + 1),
        3 => (cap + 1)..(4 * cap),
    ]
}

fn shard_strategy(cap: u32) -> impl Strategy<Value = ShardSpec> {
    (
        prop::collection::vec(length_strategy(cap), 0..24),
        prop::collection::vec(1u64..=5, 24),
    )
        .prop_map(|(lengths, sizes)| ShardSpec::new(lengths, &sizes))
}

fn domain_strategy(cap: u32, packing: Packing) -> impl Strategy<Value = DomSpec> {
    let modes = match packing {
        Packing::BestFit => vec![GroupMode::Off, GroupMode::Sequence, GroupMode::Batch],
        Packing::Concat => vec![GroupMode::Off, GroupMode::Sequence],
    };
    (
        prop::collection::vec(shard_strategy(cap), 1..=2),
        prop::sample::select(modes),
        prop::sample::select(vec![0.1, 0.25, 0.5, 1.0]),
        prop::sample::select(vec![0u64, 0, 6]),
        prop::option::weighted(0.35, ((cap / 2) as u64..(3 * cap) as u64, 2u32..=3)),
        prop::option::weighted(0.5, 1u64..=6),
        prop::option::weighted(0.15, 2u32..=3),
    )
        .prop_map(
            move |(shards, mode, max_share, from_step, up, window, bursty)| DomSpec {
                name: String::new(),
                shards,
                settings: DomainSettings {
                    grouping: Grouping {
                        mode,
                        max_share,
                        from_step,
                    },
                    upsample_long: up.map(|(min_tokens, factor)| Upsample { min_tokens, factor }),
                    bursty: bursty.map(|period| Bursty { period }),
                    window,
                },
            },
        )
}

fn cover_case_strategy() -> impl Strategy<Value = CoverCase> {
    (
        16u32..=40,
        prop::sample::select(vec![Packing::BestFit, Packing::Concat]),
    )
        .prop_flat_map(|(seq_len, packing)| {
            let cap = seq_len + 1;
            (
                Just(seq_len),
                Just(packing),
                prop::collection::vec(domain_strategy(cap, packing), 1..=4),
                2u32..=12,
                1u64..=10,
                any::<u64>(),
                prop::collection::vec(1.0f64..3.0, 4),
                prop::collection::vec((1u64..60, any::<u64>()), 0..=2),
            )
        })
        .prop_map(
            |(seq_len, packing, mut domains, g, window, seed, weight_factors, mut reseeds)| {
                for (i, d) in domains.iter_mut().enumerate() {
                    d.name = format!("d{i}");
                    if d.tokens() == 0 {
                        d.shards[0] = ShardSpec::new(vec![5], &[1]);
                    }
                }
                reseeds.sort();
                reseeds.dedup_by_key(|r| r.0);
                CoverCase {
                    seq_len,
                    g,
                    packing,
                    window,
                    seed,
                    domains,
                    weight_factors,
                    reseeds,
                }
            },
        )
}

impl CoverCase {
    fn config(&self) -> PlanConfig {
        let mut cfg = base_config(self.seq_len, self.g, self.packing, self.window);
        cfg.seed = self.seed;
        // Token weights proportional to each domain's size, so epochs advance evenly.
        let w: BTreeMap<String, f64> = self
            .domains
            .iter()
            .zip(&self.weight_factors)
            .map(|(d, f)| (d.name.clone(), d.tokens().max(1) as f64 * f))
            .collect();
        cfg.weights = Some(w);
        cfg.reseed = self
            .reseeds
            .iter()
            .map(|&(step, seed)| Reseed { step, seed })
            .collect();
        cfg
    }
}

/// Per-domain facts the checks need, computed from the spec (never from the plan).
struct DomFacts<'a> {
    spec: &'a DomSpec,
    run_of_doc: Vec<Vec<usize>>,
    runs: Vec<Vec<(u64, u64, u64)>>,
}

impl<'a> DomFacts<'a> {
    fn new(spec: &'a DomSpec) -> Self {
        DomFacts {
            spec,
            run_of_doc: spec.shards.iter().map(|s| s.run_of_doc()).collect(),
            runs: spec.shards.iter().map(|s| s.run_info()).collect(),
        }
    }
    fn doc_len(&self, shard: u32, doc: u64) -> u64 {
        self.spec.shards[shard as usize].lengths[doc as usize] as u64
    }
    fn run(&self, shard: u32, doc: u64) -> (u64, u64, u64) {
        self.runs[shard as usize][self.run_of_doc[shard as usize][doc as usize]]
    }
    /// Times a document appears in one epoch.
    fn mult(&self, grouped: bool, shard: u32, doc: u64) -> u32 {
        match self.spec.settings.upsample_long {
            Some(u) => {
                let len = if grouped {
                    self.run(shard, doc).2
                } else {
                    self.doc_len(shard, doc)
                };
                if len > u.min_tokens {
                    u.factor
                } else {
                    1
                }
            }
            None => 1,
        }
    }
    /// Virtual units of an epoch (each unit once, long ones `factor` times).
    fn virtual_units(&self, grouped: bool) -> u64 {
        let lens: Vec<u64> = if grouped {
            self.runs.iter().flatten().map(|r| r.2).collect()
        } else {
            self.spec
                .shards
                .iter()
                .flat_map(|s| s.lengths.iter().map(|&l| l as u64))
                .collect()
        };
        let long = match self.spec.settings.upsample_long {
            Some(u) => {
                lens.iter().filter(|&&l| l > u.min_tokens).count() as u64 * (u.factor as u64 - 1)
            }
            None => 0,
        };
        lens.len() as u64 + long
    }
    /// Offset of a segment's first token within its group's concatenation.
    fn group_offset(&self, shard: u32, doc: u64, start: u64) -> u64 {
        let (first, _, _) = self.run(shard, doc);
        (first..doc).map(|d| self.doc_len(shard, d)).sum::<u64>() + start
    }
    fn next_nonempty(&self, shard: u32, doc: u64) -> Option<u64> {
        let (first, docs, _) = self.run(shard, doc);
        (doc + 1..first + docs).find(|&d| self.doc_len(shard, d) > 0)
    }
    fn first_nonempty(&self, shard: u32, doc: u64) -> Option<u64> {
        let (first, docs, _) = self.run(shard, doc);
        (first..first + docs).find(|&d| self.doc_len(shard, d) > 0)
    }
    fn last_nonempty(&self, shard: u32, doc: u64) -> Option<u64> {
        let (first, docs, _) = self.run(shard, doc);
        (first..first + docs)
            .rev()
            .find(|&d| self.doc_len(shard, d) > 0)
    }
}

/// Counters of what the coverage properties exercised, so the suite can insist that
/// the interesting situations really occurred.
#[derive(Default, Debug)]
struct Exercised {
    complete_epochs: u64,
    grouped_epochs: u64,
    upsampled_docs: u64,
    long_groups_batch: u64,
    split_batch_groups: u64,
    over_cap_batches: u64,
}

/// Runs a case until every domain has finished at least one epoch, then checks
/// every coverage property. Returns what it exercised.
fn check_cover_case(case: &CoverCase) -> Exercised {
    let mut ex = Exercised::default();
    let cfg = case.config();
    let plan = build(&case.domains, cfg.clone());
    let cap = plan.capacity();
    assert_eq!(cap, case.seq_len + 1);
    let nd = case.domains.len();
    let mut planner = plan.start();
    let mut batches: Vec<GlobalBatch> = Vec::new();
    let mut tally = Tally::new(&plan);
    loop {
        // Two epochs started, and epoch 0 no longer draining (batch grouping's tails).
        let done = (0..nd).all(|d| {
            let s = planner.stream(d).unwrap();
            s.epoch >= 2 && s.tails.iter().all(|t| t.epoch > 0)
        });
        if done {
            break;
        }
        assert!(
            batches.len() < 20_000,
            "domains did not finish two epochs in 20000 steps: {:?}",
            planner.epochs()
        );
        let b = planner.next_batch();
        tally.add(b.clone());
        batches.push(b);
    }
    let steps = batches.len() as u64;

    // Row-level facts, and the tally against an independent count.
    let (mut all_tokens, mut all_rows) = (0u64, 0u64);
    for (t, b) in batches.iter().enumerate() {
        assert_eq!(b.step, t as u64);
        assert_eq!(b.plan_step, t as u64);
        assert_eq!(b.rows.len() as u32, case.g, "step {t}: batch size");
        let mut counts = vec![0u32; nd];
        for r in &b.rows {
            counts[r.domain as usize] += 1;
            assert!(!r.segments.is_empty(), "step {t}: empty row");
            let sum: u32 = r.segments.iter().map(|s| s.len).sum();
            assert_eq!(r.tokens, sum, "step {t}: row tokens");
            assert!(r.tokens <= cap, "step {t}: row over capacity");
            let loss: u32 = r.segments.iter().map(|s| s.len - 1).sum();
            assert_eq!(r.loss_tokens, loss, "step {t}: loss tokens");
            all_tokens += r.tokens as u64;
            all_rows += 1;
        }
        assert_eq!(counts, b.counts, "step {t}: counts match the rows");
    }
    let fig = tally.finish(&planner.epochs());
    assert_eq!(
        fig.duplicates,
        0,
        "tally reports duplicates: packing {:?} modes {:?}",
        case.packing,
        case.domains
            .iter()
            .map(|d| (d.settings.grouping.mode, d.settings.upsample_long))
            .collect::<Vec<_>>()
    );
    let padding = 100.0 * (1.0 - all_tokens as f64 / (all_rows * cap as u64) as f64);
    assert!((fig.padding_pct - padding).abs() < 1e-9);
    let rows_by_domain: Vec<u64> = fig.domains.iter().map(|d| d.rows).collect();
    let mut mine = vec![0u64; nd];
    for b in &batches {
        for (d, &c) in b.counts.iter().enumerate() {
            mine[d] += c as u64;
        }
    }
    assert_eq!(rows_by_domain, mine);

    for (d, spec) in case.domains.iter().enumerate() {
        let facts = DomFacts::new(spec);
        let st = planner.stream(d).unwrap().clone();
        let mode = spec.settings.grouping.mode;
        let from = spec.settings.grouping.from_step;
        let window = spec.settings.window.unwrap_or(case.window);
        // Rows of this domain per epoch, with their step.
        let mut by_epoch: BTreeMap<u32, Vec<(u64, &Row)>> = BTreeMap::new();
        let mut last_epoch = 0;
        for b in &batches {
            for r in b.rows.iter().filter(|r| r.domain as usize == d) {
                by_epoch.entry(r.epoch).or_default().push((b.step, r));
            }
            // Epochs never go backwards within a domain, except in batch grouping: there a
            // window's spanning and waiting groups drain after it (as tails), while a
            // small domain may run through several epochs of short groups meanwhile.
            let es: Vec<u32> = b
                .rows
                .iter()
                .filter(|r| r.domain as usize == d)
                .map(|r| r.epoch)
                .collect();
            if let (Some(&lo), Some(&hi)) = (es.iter().min(), es.iter().max()) {
                assert!(
                    mode == GroupMode::Batch || lo >= last_epoch,
                    "domain {d}: epoch went back at step {} ({es:?} after {last_epoch})",
                    b.step
                );
                last_epoch = hi;
            }
        }
        let grouped_of = |e: u32| -> bool {
            let first = by_epoch[&e][0].0;
            mode != GroupMode::Off && first >= from
        };
        let last_plain = by_epoch.keys().copied().filter(|&e| !grouped_of(e)).max();
        let any_grouped = by_epoch.keys().any(|&e| grouped_of(e));
        assert_eq!(
            *by_epoch.keys().last().unwrap(),
            st.epoch,
            "domain {d}: the stream's epoch is the last one with rows"
        );
        for (&e, rows) in &by_epoch {
            let grouped = grouped_of(e);
            // The epoch current at the end, and the one abandoned when grouping starts,
            // are only partly consumed.
            // So is an epoch whose tail of spanning groups is still draining.
            let complete = e < st.epoch
                && !(any_grouped && Some(e) == last_plain)
                && st.tails.iter().all(|t| t.epoch != e);
            if complete {
                ex.complete_epochs += 1;
                ex.grouped_epochs += grouped as u64;
            }
            check_epoch(
                case, &facts, d, e, grouped, complete, rows, cap, window, &mut ex,
            );
            if grouped {
                check_group_order(&facts, d, e, rows, mode, &batches, cap, &mut ex);
            }
        }
        // Epochs are counted and reported.
        let progress = planner.epochs()[d];
        assert!(progress >= st.epoch as f64 && progress <= st.epoch as f64 + 1.0);
        assert_eq!(
            plan.describe(d)["documents"],
            spec.shards
                .iter()
                .map(|s| s.lengths.len() as u64)
                .sum::<u64>()
        );
    }
    let _ = steps;
    ex
}

/// Token coverage of one epoch of one domain, and the per-row packing rules.
#[allow(clippy::too_many_arguments)]
fn check_epoch(
    case: &CoverCase,
    facts: &DomFacts,
    d: usize,
    e: u32,
    grouped: bool,
    complete: bool,
    rows: &[(u64, &Row)],
    cap: u32,
    window: u64,
    ex: &mut Exercised,
) {
    let ctx = format!("domain {d} epoch {e} (grouped {grouped}, complete {complete})");
    // cover[t]: rows holding token t; label[t]: rows where t is not the row's first token.
    let mut cover: HashMap<(u32, u64), Vec<u32>> = HashMap::new();
    let mut label: HashMap<(u32, u64), Vec<u32>> = HashMap::new();
    let mut nonfull = 0u64;
    for &(step, r) in rows {
        if r.tokens < cap {
            nonfull += 1;
        }
        for (i, s) in r.segments.iter().enumerate() {
            let real = facts.doc_len(s.shard, s.doc);
            assert_eq!(s.doc_len, real, "{ctx} step {step}: doc_len");
            assert!(
                s.len > 0 && s.start + s.len as u64 <= real,
                "{ctx} step {step}: range {s:?}"
            );
            let run = facts.run_of_doc[s.shard as usize][s.doc as usize];
            assert_eq!(s.group, Some(ShardSpec::group_id(run)), "{ctx}: group id");
            let c = cover
                .entry((s.shard, s.doc))
                .or_insert_with(|| vec![0; real as usize]);
            let l = label
                .entry((s.shard, s.doc))
                .or_insert_with(|| vec![0; real as usize]);
            for t in s.start..s.start + s.len as u64 {
                c[t as usize] += 1;
                if !(i == 0 && t == s.start) {
                    l[t as usize] += 1;
                }
            }
            // 3. best_fit cuts only what does not fit a row: documents (or, in grouped
            //    epochs, whole groups) of at most `cap` tokens are never cut, and long
            //    units are cut at multiples of `cap`.
            if case.packing == Packing::BestFit {
                let unit_len = if grouped {
                    facts.run(s.shard, s.doc).2
                } else {
                    real
                };
                let off = if grouped {
                    facts.group_offset(s.shard, s.doc, s.start)
                } else {
                    s.start
                };
                if unit_len <= cap as u64 {
                    assert!(
                        s.start == 0 && s.len as u64 == real,
                        "{ctx} step {step}: a unit that fits was cut: {s:?}"
                    );
                } else if i == 0
                    || !grouped
                    || (r.segments[i - 1].shard, r.segments[i - 1].group) != (s.shard, s.group)
                {
                    assert_eq!(
                        off % cap as u64,
                        0,
                        "{ctx} step {step}: long unit cut off the row grid: {s:?}"
                    );
                }
            }
            // Concat rows are a contiguous stretch of the window's stream.
            if case.packing == Packing::Concat && i + 1 < r.segments.len() {
                let n = &r.segments[i + 1];
                assert!(
                    s.start + s.len as u64 == real && n.start == 0,
                    "{ctx} step {step}: concat row not contiguous: {:?}",
                    r.segments
                );
            }
            // Grouped epochs keep a group's documents together in reading order.
            if grouped && i + 1 < r.segments.len() {
                let n = &r.segments[i + 1];
                if n.shard == s.shard
                    && n.group == s.group
                    && !(n.doc == s.doc && n.start > s.start)
                {
                    let next = facts.next_nonempty(s.shard, s.doc);
                    let wraps = Some(s.doc) == facts.last_nonempty(s.shard, s.doc)
                        && Some(n.doc) == facts.first_nonempty(s.shard, s.doc);
                    assert!(
                        s.start + s.len as u64 == real
                            && n.start == 0
                            && (Some(n.doc) == next || wraps),
                        "{ctx} step {step}: group out of reading order: {:?}",
                        r.segments
                    );
                }
            }
        }
        if case.packing == Packing::Concat && r.tokens < cap {
            let last = r.segments.last().unwrap();
            assert_eq!(
                last.start + last.len as u64,
                last.doc_len,
                "{ctx}: short concat row ends mid-document"
            );
        }
    }
    // 2. Coverage.
    let mut deficit = 0u64; // concat: window starts (tokens that are never a label)
    for (si, shard) in facts.spec.shards.iter().enumerate() {
        for (doc, &len) in shard.lengths.iter().enumerate() {
            let key = (si as u32, doc as u64);
            let m = facts.mult(grouped, si as u32, doc as u64);
            if len == 0 {
                assert!(
                    !cover.contains_key(&key),
                    "{ctx}: a zero-length document was placed"
                );
                continue;
            }
            if m > 1 && complete {
                ex.upsampled_docs += 1;
            }
            let zero = vec![0u32; len as usize];
            let c = cover.get(&key).unwrap_or(&zero);
            let l = label.get(&key).unwrap_or(&zero);
            for t in 0..len as usize {
                match (case.packing, complete) {
                    (Packing::BestFit, true) => assert_eq!(
                        c[t], m,
                        "{ctx}: shard {si} doc {doc} (len {len}) token {t} used {} times, want {m}",
                        c[t]
                    ),
                    (Packing::BestFit, false) => {
                        assert!(
                            c[t] <= m,
                            "{ctx}: shard {si} doc {doc} token {t} used {} > {m} times",
                            c[t]
                        )
                    }
                    (Packing::Concat, true) => {
                        // Every token is a label once per copy, except the first token of
                        // each window's stream (a document start), which is input only;
                        // tokens at row seams are held by two rows.
                        assert!(
                            c[t] >= m && c[t] <= 2 * m,
                            "{ctx}: doc {doc} token {t} held {} times (m {m})",
                            c[t]
                        );
                        // Each copy of a document may start a window (token 0 only).
                        if t == 0 {
                            assert!(
                                l[t] <= m,
                                "{ctx}: doc {doc} token 0 a label {} times (m {m})",
                                l[t]
                            );
                        } else {
                            assert_eq!(
                                l[t], m,
                                "{ctx}: doc {doc} token {t} a label {} times (m {m})",
                                l[t]
                            );
                        }
                        deficit += (m - l[t]) as u64;
                    }
                    (Packing::Concat, false) => {
                        assert!(
                            c[t] <= 2 * m && l[t] <= m,
                            "{ctx}: doc {doc} token {t} over-used"
                        );
                    }
                }
            }
        }
    }
    if case.packing == Packing::Concat && complete {
        // One window start per non-empty window, and only a window's last row is short.
        let windows = facts.virtual_units(grouped).div_ceil(window);
        assert!(
            deficit >= 1 && deficit <= windows,
            "{ctx}: {deficit} window starts for {windows} windows"
        );
        assert!(
            nonfull <= deficit,
            "{ctx}: {nonfull} short rows for {deficit} windows"
        );
    }
}

/// Reading order and batch rules of long groups (those that need more than one row).
#[allow(clippy::too_many_arguments)]
fn check_group_order(
    facts: &DomFacts,
    d: usize,
    e: u32,
    rows: &[(u64, &Row)],
    mode: GroupMode,
    batches: &[GlobalBatch],
    cap: u32,
    ex: &mut Exercised,
) {
    if facts.spec.settings.upsample_long.is_some() {
        return; // copies of a group are indistinguishable: order checks need one copy
    }
    // group -> (step, offset of its first token in the row)
    let mut seen: BTreeMap<(u32, u64), Vec<(u64, u64)>> = BTreeMap::new();
    for &(step, r) in rows {
        let mut in_row = BTreeSet::new();
        for s in &r.segments {
            let key = (s.shard, s.group.unwrap());
            if in_row.insert(key) {
                seen.entry(key)
                    .or_default()
                    .push((step, facts.group_offset(s.shard, s.doc, s.start)));
            }
        }
    }
    let g_rows = batches[0].rows.len() as u64;
    let share = facts.spec.settings.grouping.max_share;
    let group_cap = ((share * g_rows as f64).floor() as u64).max(1);
    for (key, mut occ) in seen {
        let (shard, _) = key;
        // The group's length from the spec.
        let run = facts.runs[shard as usize]
            .iter()
            .enumerate()
            .find(|(i, _)| ShardSpec::group_id(*i) == key.1)
            .map(|(_, r)| *r)
            .unwrap();
        if run.2 <= cap as u64 {
            continue;
        }
        occ.sort();
        // A long group's rows come in reading order across steps.
        for w in occ.windows(2) {
            if w[0].0 < w[1].0 {
                // (<=: a concat row may start with the token the previous row ended on.)
                assert!(
                    w[0].1 <= w[1].1,
                    "domain {d} epoch {e}: group {key:?} out of order across steps: {occ:?}"
                );
            }
        }
        let first = occ[0].0;
        let last = occ.last().unwrap().0;
        if mode == GroupMode::Sequence {
            // Consecutive rows of the domain: every row of the domain in a step strictly
            // between the group's first and last step belongs to it.
            for s in first + 1..last {
                for r in batches[s as usize]
                    .rows
                    .iter()
                    .filter(|r| r.domain as usize == d)
                {
                    assert!(
                        r.epoch != e
                            || r.segments
                                .iter()
                                .any(|x| x.shard == shard && x.group == Some(key.1)),
                        "domain {d} epoch {e}: group {key:?} interrupted at step {s}"
                    );
                }
            }
        }
        if mode == GroupMode::Batch {
            ex.long_groups_batch += 1;
            let steps: BTreeSet<u64> = occ.iter().map(|o| o.0).collect();
            let total = occ.len() as u64;
            let count_first = batches[first as usize].counts[d] as u64;
            if steps.len() > 1 && total <= group_cap.min(count_first) {
                ex.split_batch_groups += 1;
            }
            for s in &steps {
                let here = occ.iter().filter(|o| o.0 == *s).count() as u64;
                if here > group_cap {
                    ex.over_cap_batches += 1;
                }
            }
        }
    }
}

/// 2, 3: every unit and every token exactly once per completed epoch (upsampled units
/// exactly `factor` times), at most once in partial epochs; concat overlaps rows by
/// exactly one token; best_fit never cuts a unit that fits a row; grouped epochs keep
/// reading order. Random corpora (1-4 domains, zero-length and over-long documents,
/// seq_len 16-40, windows 1-10, every grouping mode, upsampling, bursty, reseeds); the
/// cases must really exercise grouping, upsampling and long batch groups.
#[test]
fn coverage_every_token_once_per_epoch() {
    let total = std::cell::RefCell::new(Exercised::default());
    let mut runner = TestRunner::new(pt_config(160, 0x00c0_7e7a));
    runner
        .run(&cover_case_strategy(), |case| {
            let ex = check_cover_case(&case);
            prop_assert!(
                ex.complete_epochs >= 1,
                "no complete epoch exercised: {ex:?}"
            );
            let mut t = total.borrow_mut();
            t.complete_epochs += ex.complete_epochs;
            t.grouped_epochs += ex.grouped_epochs;
            t.upsampled_docs += ex.upsampled_docs;
            t.long_groups_batch += ex.long_groups_batch;
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{e}"));
    let total = total.into_inner();
    eprintln!("coverage exercised: {total:?}");
    assert!(total.complete_epochs > 160, "{total:?}");
    assert!(total.grouped_epochs > 50, "{total:?}");
    assert!(total.upsampled_docs > 100, "{total:?}");
    assert!(total.long_groups_batch > 20, "{total:?}");
}

/// A fixed, larger case per packing x grouping mode, so each mode's coverage is checked
/// on more than a handful of documents whatever the random cases drew.
#[test]
fn coverage_fixed_cases_for_every_mode() {
    let mut rng = Pcg64::seed_from_u64(11);
    for (packing, mode) in [
        (Packing::BestFit, GroupMode::Off),
        (Packing::BestFit, GroupMode::Sequence),
        (Packing::BestFit, GroupMode::Batch),
        (Packing::Concat, GroupMode::Off),
        (Packing::Concat, GroupMode::Sequence),
    ] {
        let cap = 33;
        let mut a = settings(mode);
        a.upsample_long = Some(Upsample {
            min_tokens: 50,
            factor: 2,
        });
        let mut b = settings(mode);
        b.grouping.from_step = 5;
        b.window = Some(7);
        let c = settings(GroupMode::Off);
        let domains = vec![
            gen_domain(&mut rng, "d0", 2, 40, cap, a),
            gen_domain(&mut rng, "d1", 3, 30, cap, b),
            gen_domain(&mut rng, "d2", 1, 50, cap, c),
        ];
        let case = CoverCase {
            seq_len: cap - 1,
            g: 8,
            packing,
            window: 16,
            seed: 99,
            domains,
            weight_factors: vec![1.0, 1.5, 0.7, 1.0],
            reseeds: vec![(9, 3), (40, 4)],
        };
        let ex = check_cover_case(&case);
        assert!(ex.complete_epochs >= 3, "{packing:?} {mode:?}: {ex:?}");
        if mode != GroupMode::Off {
            assert!(ex.grouped_epochs >= 2, "{packing:?} {mode:?}: {ex:?}");
        }
    }
}

// ---------------------------------------------------------------------------------------
// 4. Resume
// ---------------------------------------------------------------------------------------

struct Scenario {
    name: &'static str,
    domains: Vec<DomSpec>,
    cfg: PlanConfig,
}

fn scenarios() -> Vec<Scenario> {
    let mut rng = Pcg64::seed_from_u64(2024);
    let cap = 41;
    let seq = cap - 1;
    let mut out = Vec::new();
    let up = |min, factor| {
        Some(Upsample {
            min_tokens: min,
            factor,
        })
    };

    // best_fit, no grouping, constant weights.
    {
        let domains = vec![
            gen_domain(&mut rng, "web", 2, 60, cap, settings(GroupMode::Off)),
            gen_domain(&mut rng, "code", 1, 40, cap, settings(GroupMode::Off)),
            gen_domain(&mut rng, "wiki", 1, 30, cap, settings(GroupMode::Off)),
        ];
        let mut cfg = base_config(seq, 16, Packing::BestFit, 24);
        cfg.weights = Some(weights_map(&[("web", 0.6), ("code", 0.3), ("wiki", 0.1)]));
        out.push(Scenario {
            name: "best_fit/off",
            domains,
            cfg,
        });
    }
    // best_fit, sequence grouping from step 20, upsampling, ramp + abrupt switch.
    {
        let mut code = settings(GroupMode::Sequence);
        code.grouping.from_step = 20;
        code.upsample_long = up(60, 2);
        let mut books = settings(GroupMode::Sequence);
        books.window = Some(5);
        let domains = vec![
            gen_domain(&mut rng, "web", 2, 50, cap, settings(GroupMode::Off)),
            gen_domain(&mut rng, "code", 2, 40, cap, code),
            gen_domain(&mut rng, "books", 1, 30, cap, books),
        ];
        let mut cfg = base_config(seq, 12, Packing::BestFit, 20);
        cfg.seed = 7;
        cfg.schedule = vec![
            SchedulePoint {
                step: 0,
                weights: weights_map(&[("web", 0.8), ("code", 0.1), ("books", 0.1)]),
            },
            SchedulePoint {
                step: 60,
                weights: weights_map(&[("web", 0.4), ("code", 0.4), ("books", 0.2)]),
            },
            SchedulePoint {
                step: 61,
                weights: weights_map(&[("web", 0.1), ("code", 0.1), ("books", 0.8)]),
            },
        ];
        out.push(Scenario {
            name: "best_fit/sequence+schedule+upsample",
            domains,
            cfg,
        });
    }
    // best_fit, batch grouping with a small cap, a bursty domain, skips and reseeds.
    {
        let mut code = settings(GroupMode::Batch);
        code.grouping.max_share = 0.25;
        let mut wiki = settings(GroupMode::Off);
        wiki.bursty = Some(Bursty { period: 3 });
        let domains = vec![
            gen_domain(&mut rng, "web", 2, 50, cap, settings(GroupMode::Off)),
            gen_domain(&mut rng, "code", 2, 50, cap, code),
            gen_domain(&mut rng, "wiki", 1, 40, cap, wiki),
        ];
        let mut cfg = base_config(seq, 16, Packing::BestFit, 16);
        cfg.seed = 3;
        cfg.weights = Some(weights_map(&[("web", 0.5), ("code", 0.4), ("wiki", 0.1)]));
        cfg.skip = vec![Skip { steps: [10, 14] }, Skip { steps: [40, 40] }];
        cfg.reseed = vec![
            Reseed {
                step: 25,
                seed: 100,
            },
            Reseed {
                step: 70,
                seed: 101,
            },
        ];
        out.push(Scenario {
            name: "best_fit/batch+bursty+skip+reseed",
            domains,
            cfg,
        });
    }
    // concat, no grouping, upsampling, skip + reseed.
    {
        let mut web = settings(GroupMode::Off);
        web.upsample_long = up(45, 3);
        let domains = vec![
            gen_domain(&mut rng, "web", 2, 50, cap, web),
            gen_domain(&mut rng, "code", 1, 40, cap, settings(GroupMode::Off)),
        ];
        let mut cfg = base_config(seq, 8, Packing::Concat, 12);
        cfg.seed = 5;
        cfg.weights = Some(weights_map(&[("web", 0.7), ("code", 0.3)]));
        cfg.skip = vec![Skip { steps: [0, 2] }, Skip { steps: [33, 37] }];
        cfg.reseed = vec![Reseed { step: 50, seed: 9 }];
        out.push(Scenario {
            name: "concat/off+upsample+skip+reseed",
            domains,
            cfg,
        });
    }
    // concat, sequence grouping, bursty, schedule.
    {
        let mut books = settings(GroupMode::Sequence);
        books.bursty = Some(Bursty { period: 4 });
        let domains = vec![
            gen_domain(&mut rng, "web", 2, 50, cap, settings(GroupMode::Off)),
            gen_domain(&mut rng, "code", 2, 40, cap, settings(GroupMode::Sequence)),
            gen_domain(&mut rng, "books", 1, 40, cap, books),
        ];
        let mut cfg = base_config(seq, 20, Packing::Concat, 10);
        cfg.seed = 11;
        cfg.schedule = vec![
            SchedulePoint {
                step: 10,
                weights: weights_map(&[("web", 0.7), ("code", 0.2), ("books", 0.1)]),
            },
            SchedulePoint {
                step: 90,
                weights: weights_map(&[("web", 0.3), ("code", 0.5), ("books", 0.2)]),
            },
        ];
        cfg.reseed = vec![Reseed { step: 30, seed: 1 }];
        out.push(Scenario {
            name: "concat/sequence+bursty+schedule",
            domains,
            cfg,
        });
    }
    // Everything at once: batch + sequence + off, two bursty, upsampling, a schedule
    // with a zero weight, skips and reseeds.
    {
        let mut code = settings(GroupMode::Batch);
        code.grouping.max_share = 0.125;
        code.grouping.from_step = 15;
        code.upsample_long = up(80, 2);
        let mut books = settings(GroupMode::Sequence);
        books.bursty = Some(Bursty { period: 2 });
        let mut wiki = settings(GroupMode::Off);
        wiki.bursty = Some(Bursty { period: 3 });
        wiki.window = Some(3);
        let domains = vec![
            gen_domain(&mut rng, "web", 2, 50, cap, settings(GroupMode::Off)),
            gen_domain(&mut rng, "code", 2, 50, cap, code),
            gen_domain(&mut rng, "books", 1, 30, cap, books),
            gen_domain(&mut rng, "wiki", 1, 30, cap, wiki),
        ];
        let mut cfg = base_config(seq, 24, Packing::BestFit, 20);
        cfg.seed = 13;
        cfg.schedule = vec![
            SchedulePoint {
                step: 0,
                weights: weights_map(&[("web", 0.5), ("code", 0.2), ("books", 0.2), ("wiki", 0.1)]),
            },
            SchedulePoint {
                step: 50,
                weights: weights_map(&[("web", 0.5), ("code", 0.5), ("books", 0.0), ("wiki", 0.1)]),
            },
            SchedulePoint {
                step: 51,
                weights: weights_map(&[("web", 0.3), ("code", 0.3), ("books", 0.3), ("wiki", 0.1)]),
            },
        ];
        cfg.skip = vec![Skip { steps: [5, 6] }, Skip { steps: [60, 70] }];
        cfg.reseed = vec![
            Reseed { step: 20, seed: 77 },
            Reseed { step: 21, seed: 78 },
            Reseed { step: 90, seed: 79 },
        ];
        out.push(Scenario {
            name: "best_fit/mixed",
            domains,
            cfg,
        });
    }
    out
}

fn check_resume(sc: &Scenario, rng: &mut Pcg64) {
    const STEPS: u64 = 130;
    const AHEAD: u64 = 5;
    let plan = build(&sc.domains, sc.cfg.clone());
    let pools: Vec<rayon::ThreadPool> = [1, 3]
        .iter()
        .map(|&n| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(n)
                .build()
                .expect("a thread pool")
        })
        .collect();
    // The plan itself (first windows are found in parallel) is the same on one thread.
    let single = pools[0].install(|| build(&sc.domains, sc.cfg.clone()));
    assert_eq!(
        single.start().next_batch(),
        plan.start().next_batch(),
        "{}: plan built on one thread",
        sc.name
    );
    let mut p = plan.start();
    let mut blobs = Vec::new();
    let mut batches = Vec::new();
    for _ in 0..STEPS + AHEAD {
        blobs.push(p.cursor());
        batches.push(p.next_batch());
    }
    // 50 random steps, plus the edges: the start, right before and after each skipped
    // range, at reseeds, and at grouping switches.
    let mut picks: BTreeSet<u64> = (0..50).map(|_| rng.gen_range(0..STEPS)).collect();
    picks.insert(0);
    for t in 1..STEPS {
        if batches[t as usize - 1].plan_step + 1 != batches[t as usize].plan_step {
            picks.extend([t - 1, t, t + 1]);
        }
    }
    for r in &sc.cfg.reseed {
        for t in 0..STEPS {
            if batches[t as usize].plan_step == r.step {
                picks.extend([t.saturating_sub(1), t, t + 1]);
            }
        }
    }
    for t in picks {
        let want = &batches[t as usize..(t + AHEAD) as usize];
        // (a) restore from the blob taken at t.
        let mut r = plan
            .restore(&blobs[t as usize])
            .unwrap_or_else(|e| panic!("{}: restore at step {t}: {e}", sc.name));
        assert_eq!(r.step(), t);
        assert_eq!(
            r.cursor(),
            blobs[t as usize],
            "{}: blob round trip at {t}",
            sc.name
        );
        for (j, w) in want.iter().enumerate() {
            assert_eq!(
                &r.next_batch(),
                w,
                "{}: restore at {t}, batch {j} differs",
                sc.name
            );
        }
        // (b) seek(t) without a blob.
        let mut s = plan.seek(t);
        assert_eq!(s.step(), t);
        let seek_blob = s.cursor();
        for (j, w) in want.iter().enumerate() {
            assert_eq!(
                &s.next_batch(),
                w,
                "{}: seek to {t}, batch {j} differs",
                sc.name
            );
        }
        // (b') the same seek in chunks of 1, 3 and 7 plan steps (the daemon's seek goes
        // in bounded chunks; a chunk edge must change nothing).
        for chunk in [1, 3, 7] {
            let never = std::sync::atomic::AtomicBool::new(false);
            let mut k = plan
                .seek_chunked(t, chunk, &never)
                .expect("a seek nobody cancels completes");
            assert_eq!(
                k.cursor(),
                seek_blob,
                "{}: seek to {t} in chunks of {chunk}",
                sc.name
            );
            assert_eq!(
                &k.next_batch(),
                &want[0],
                "{}: chunked seek to {t}",
                sc.name
            );
        }
        // (b'') the same seek on 1 and 3 worker threads: domains replay in parallel, and
        // the thread count must change nothing.
        for pool in &pools {
            let k = pool.install(|| plan.seek(t));
            assert_eq!(
                k.cursor(),
                seek_blob,
                "{}: seek to {t} on {} threads",
                sc.name,
                pool.current_num_threads()
            );
        }
        // (c) the seek planner's own blob restores to the same stream.
        let mut c = plan
            .restore(&seek_blob)
            .unwrap_or_else(|e| panic!("{}: {e}", sc.name));
        assert_eq!(
            &c.next_batch(),
            &want[0],
            "{}: restore of a seek blob at {t}",
            sc.name
        );
        // (d) skip_batch moves exactly one batch.
        let mut k = plan.restore(&blobs[t as usize]).unwrap();
        k.skip_batch();
        assert_eq!(&k.next_batch(), &want[1], "{}: skip_batch at {t}", sc.name);
    }
}

#[test]
fn resume_from_blob_and_seek_continue_bit_for_bit() {
    let mut rng = Pcg64::seed_from_u64(50);
    for sc in scenarios() {
        check_resume(&sc, &mut rng);
    }
}

/// What the daemon serves (`next_batch_served`) is `next_batch` without the groups of
/// document units: the same rows, documents, ranges and cursors in every scenario, a
/// group unit's pieces keeping their group, and nothing else left out.
#[test]
fn served_batches_are_the_planned_ones_without_document_groups() {
    let (mut kept, mut dropped) = (0u64, 0u64);
    for sc in scenarios() {
        let plan = build(&sc.domains, sc.cfg.clone());
        let (mut full, mut served) = (plan.start(), plan.start());
        for step in 0..130 {
            let (a, b) = (full.next_batch(), served.next_batch_served());
            let ctx = format!("{} step {step}", sc.name);
            assert_eq!((a.step, a.plan_step), (b.step, b.plan_step), "{ctx}");
            assert_eq!(a.counts, b.counts, "{ctx}");
            assert_eq!(a.rows.len(), b.rows.len(), "{ctx}");
            for (ra, rb) in a.rows.iter().zip(&b.rows) {
                assert_eq!(ra.segments.len(), rb.segments.len(), "{ctx}");
                for (sa, sb) in ra.segments.iter().zip(&rb.segments) {
                    match sb.group {
                        Some(g) => {
                            assert_eq!(sa.group, Some(g), "{ctx}: a kept group changed");
                            kept += 1;
                        }
                        None => dropped += u64::from(sa.group.is_some()),
                    }
                }
                let strip = |r: &Row| Row {
                    segments: (r.segments.iter())
                        .map(|s| Segment { group: None, ..*s })
                        .collect(),
                    ..r.clone()
                };
                assert_eq!(strip(ra), strip(rb), "{ctx}");
            }
            assert_eq!(full.cursor(), served.cursor(), "{ctx}: cursor");
        }
    }
    // The scenarios hold both: grouped domains (group units) and ungrouped ones whose
    // shards have sidecars (document units whose group serving leaves out).
    assert!(
        kept > 100 && dropped > 100,
        "kept {kept}, dropped {dropped}"
    );
}

/// A seek is cancellable between chunks (the daemon cancels the seek of a client that
/// left), and one to any step holds bounded memory: before the chunked seek, a seek to
/// 2^40 allocated 4 TB up front and one to 2^62 panicked with "capacity overflow".
#[test]
fn seek_to_any_step_is_bounded_and_cancellable() {
    use std::sync::atomic::AtomicBool;
    let sc = &scenarios()[0];
    let plan = build(&sc.domains, sc.cfg.clone());
    let cancelled = AtomicBool::new(true);
    for step in [1u64 << 40, 1 << 62, u64::MAX] {
        assert!(
            plan.seek_cancellable(step, &cancelled).is_none(),
            "a cancelled seek to {step} gives up"
        );
    }
    // Cancelled at once, even a seek that would take years returns; not cancelled, a
    // short one completes at the step asked for.
    let never = AtomicBool::new(false);
    let p = plan.seek_cancellable(5, &never).expect("not cancelled");
    assert_eq!(p.step(), 5);
    assert_eq!(p.cursor(), plan.seek(5).cursor());
}

/// A checkpoint taken just before a range that is skipped later (the loss-spike recovery
/// workflow: add `skip = [s, s+k]` and restart from the checkpoint at s) restores, and
/// skips the range.
#[test]
fn resume_blob_from_before_a_newly_added_skip() {
    let sc = &scenarios()[0];
    let plan = build(&sc.domains, sc.cfg.clone());
    let mut p = plan.start();
    for _ in 0..40 {
        p.next_batch();
    }
    let blob = p.cursor();
    let mut edited = sc.cfg.clone();
    edited.skip = vec![Skip { steps: [40, 45] }];
    let plan2 = build(&sc.domains, edited);
    let mut r = plan2
        .restore(&blob)
        .expect("a skip starting at the blob's step is future");
    let b = r.next_batch();
    assert_eq!(b.step, 40);
    assert_eq!(b.plan_step, 46);
    let mut reference = plan.seek(46);
    let want = reference.next_batch();
    assert_eq!(b.rows, want.rows);
    assert_eq!(b.counts, want.counts);
    // And the blob taken on the edited plan right at the skip restores there too.
    let mut q = plan2.start();
    for _ in 0..40 {
        q.next_batch();
    }
    let blob2 = q.cursor();
    let mut r2 = plan2
        .restore(&blob2)
        .expect("blob right before a skipped range");
    assert_eq!(r2.next_batch(), b);
}

/// Skipped steps are planned but never delivered; the delivered batches are those of
/// the unskipped stream at the same plan step.
#[test]
fn resume_skips_drop_exactly_the_skipped_plan_steps() {
    let sc = &scenarios()[2];
    let mut plain = sc.cfg.clone();
    plain.skip.clear();
    let a = run_batches(&build(&sc.domains, sc.cfg.clone()), 80);
    let b = run_batches(&build(&sc.domains, plain), 100);
    let skipped: Vec<u64> = sc
        .cfg
        .skip
        .iter()
        .flat_map(|s| s.steps[0]..=s.steps[1])
        .collect();
    let mut want = b.iter().filter(|x| !skipped.contains(&x.plan_step));
    for (t, x) in a.iter().enumerate() {
        let y = want.next().unwrap();
        assert_eq!(x.step, t as u64);
        assert_eq!(x.plan_step, y.plan_step);
        assert_eq!(x.rows, y.rows);
        assert_eq!(x.counts, y.counts);
    }
}

/// Reseeds change nothing before their step and something after it.
#[test]
fn resume_reseed_changes_only_the_future() {
    let sc = &scenarios()[0];
    let mut re = sc.cfg.clone();
    re.reseed = vec![Reseed {
        step: 30,
        seed: 12345,
    }];
    let a = run_batches(&build(&sc.domains, sc.cfg.clone()), 60);
    let b = run_batches(&build(&sc.domains, re), 60);
    assert_eq!(a[..30], b[..30]);
    assert_ne!(a[30..], b[30..]);
    // Mixture counts are the reseed's business only through the position shuffle.
    for t in 30..60 {
        assert_eq!(a[t].counts, b[t].counts);
    }
}

// ---------------------------------------------------------------------------------------
// 4b. Seeking from checkpoints (issue 16)
// ---------------------------------------------------------------------------------------

/// A [`MemCheckpoints`] that counts the blobs a seek read, so a test knows the
/// checkpoint path was taken and not only the replay from step 0.
#[derive(Default)]
struct Counted {
    inner: MemCheckpoints,
    loads: std::sync::atomic::AtomicUsize,
}

impl Counted {
    fn loads(&self) -> usize {
        self.loads.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Fails `what` if any checkpoint was refused: every one a seek wrote is valid.
    fn assert_none_refused(&self, what: &str) {
        let r = self.inner.refusals();
        assert!(r.is_empty(), "{what}: valid checkpoints refused: {r:?}");
    }
}

impl Checkpoints for Counted {
    fn list(&self) -> Vec<CheckpointKey> {
        self.inner.list()
    }
    fn has(&self, key: &CheckpointKey) -> bool {
        self.inner.has(key)
    }
    fn load(&self, key: &CheckpointKey) -> Option<Vec<u8>> {
        self.loads
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.inner.load(key)
    }
    fn store(&self, key: &CheckpointKey, blob: &[u8]) {
        self.inner.store(key, blob)
    }
    fn refused(&self, key: &CheckpointKey, why: &str) {
        self.inner.refused(key, why)
    }
}

/// Seeks `plan` to `t` through `store` (a checkpoint every `every` plan steps, chunks
/// of `chunk`) and checks it against the plain replay: the same cursor blob and the same
/// next `ahead` batches.
fn check_checkpointed_seek(
    what: &str,
    plan: &Arc<Plan>,
    store: &dyn Checkpoints,
    t: u64,
    every: u64,
    chunk: u64,
    ahead: usize,
) {
    let never = std::sync::atomic::AtomicBool::new(false);
    let mut got = plan
        .seek_checkpointed(t, chunk, every, store, &never)
        .expect("a seek nobody cancels completes");
    let mut want = plan.seek(t);
    assert_eq!(got.step(), t, "{what}: step");
    assert_eq!(
        got.cursor(),
        want.cursor(),
        "{what}: seek to {t} (checkpoint every {every}, chunk {chunk}) left another state"
    );
    for j in 0..ahead {
        assert_eq!(
            got.next_batch(),
            want.next_batch(),
            "{what}: seek to {t}, batch {j} after it differs"
        );
    }
}

/// Seek from checkpoints equals the plain replay, bit for bit, in every scenario
/// (packing x grouping, bursty, upsampling, schedules, skips, reseeds) at random steps
/// taken in random order (so seeks go forward past the last checkpoint and back before
/// it), with random checkpoint intervals and chunk sizes, across epoch ends.
#[test]
fn seek_checkpoints_equal_replay_in_every_scenario() {
    const STEPS: u64 = 150;
    let mut rng = Pcg64::seed_from_u64(160);
    for sc in scenarios() {
        let plan = build(&sc.domains, sc.cfg.clone());
        // Far enough that domains wrap their epochs (and so their tails) in between.
        assert!(
            plan.seek(STEPS).epochs().iter().any(|&e| e > 2.0),
            "{}: no domain passes an epoch end within {STEPS} steps",
            sc.name
        );
        let store = Counted::default();
        let every = [1, 2, 3, 5, 8, 13][rng.gen_range(0..6)];
        let mut picks: Vec<u64> = (0..25).map(|_| rng.gen_range(0..STEPS)).collect();
        picks.extend([0, STEPS, every, every + 1, 2 * every - 1]);
        for s in &sc.cfg.skip {
            picks.extend([
                plan.trainer_step_of(s.steps[0]),
                plan.trainer_step_of(s.steps[1] + 1),
            ]);
        }
        for t in picks {
            let chunk = [1, 3, 64][rng.gen_range(0..3)];
            check_checkpointed_seek(sc.name, &plan, &store, t, every, chunk, 2);
        }
        assert!(
            store.loads() > 0,
            "{}: no seek started from a checkpoint",
            sc.name
        );
        store.assert_none_refused(sc.name);
        // A checkpoint lies at every multiple of `every` up to the farthest seek.
        let held: BTreeSet<u64> = store.inner.list().iter().map(|k| k.plan_step).collect();
        let far = plan.plan_step_of(STEPS);
        assert!(
            (1..=far / every).all(|i| held.contains(&(i * every))),
            "{}: checkpoints {held:?} miss a multiple of {every} up to {far}",
            sc.name
        );
    }
}

/// Checkpoints written under one history stay correct under another: a live change
/// (and a second on top), a newly added skip and a newly added reseed each leave the
/// checkpoints before them usable and make those after them invisible, and a plan
/// without the journal does not take the journal's checkpoints. Every seek equals the
/// plain replay under its own plan. With a checkpoint exactly at a change's step, this
/// failed before checkpoint names covered the bursty lookahead (a bursty domain's cycle
/// that began before the change had taken rows under the old weights).
#[test]
fn seek_checkpoints_survive_live_changes_skips_and_reseeds() {
    const STEPS: u64 = 140;
    let mut rng = Pcg64::seed_from_u64(161);
    let all = scenarios();
    // Every 5: checkpoints fall exactly on the changes (50, 90) and the new skip (100).
    for (sc, every) in [(&all[1], 5), (&all[2], 5), (&all[5], 5), (&all[2], 4)] {
        let base = build(&sc.domains, sc.cfg.clone());
        let names = base.domain_names();
        let store = Counted::default();
        check_checkpointed_seek(sc.name, &base, &store, STEPS, every, 7, 1);
        let w = BTreeMap::from([(names[0].to_string(), 5.0)]);
        let first = base.weights_change(50, &w).expect("a valid change");
        let changed = Arc::new(base.with_journal(vec![first.clone()]).unwrap());
        let w2 = BTreeMap::from([(names[1].to_string(), 0.25)]);
        let second = changed.weights_change(90, &w2).expect("a valid change");
        let twice = Arc::new(base.with_journal(vec![first, second]).unwrap());
        let mut skipped = sc.cfg.clone();
        skipped.skip.push(Skip { steps: [100, 103] });
        skipped.skip.insert(0, Skip { steps: [1, 1] });
        let mut reseeded = sc.cfg.clone();
        reseeded.reseed.push(Reseed {
            step: 33,
            seed: 4242,
        });
        reseeded.reseed.sort_by_key(|r| r.step);
        let variants = [
            ("live change", changed),
            ("two live changes", twice),
            ("no journal again", base.clone()),
            ("new skips", build(&sc.domains, skipped)),
            ("new reseed", build(&sc.domains, reseeded)),
        ];
        for (what, plan) in &variants {
            let before = store.loads();
            for _ in 0..8 {
                let t = rng.gen_range(0..STEPS);
                let what = format!("{} / {what}", sc.name);
                check_checkpointed_seek(&what, plan, &store, t, every, 7, 1);
            }
            assert!(
                store.loads() > before,
                "{} / {what}: the checkpoints before the edit were not used",
                sc.name
            );
        }
        // Only the run without a journal may meet checkpoints it cannot take (the
        // journal's, at steps before its change): those are skipped, never reported.
        store.assert_none_refused(sc.name);
    }
}

/// A corrupt, forged or foreign checkpoint is refused and reported, and the seek falls
/// back to an earlier one or to step 0: never a wrong batch, never an error. More bad
/// entries than a seek tries make it replay from step 0.
#[test]
fn seek_checkpoints_ignore_corrupt_forged_and_foreign_entries() {
    let sc = &scenarios()[0];
    let plan = build(&sc.domains, sc.cfg.clone());
    let every = 3;
    // Foreign: the same corpus under another seed has the same history digests (no
    // schedule, skips or reseeds) but another fingerprint.
    let mut other = sc.cfg.clone();
    other.seed += 1;
    let foreign = build(&sc.domains, other);
    let store = MemCheckpoints::new();
    check_checkpointed_seek("foreign", &foreign, &store, 60, every, 64, 1);
    check_checkpointed_seek("foreign", &plan, &store, 45, every, 64, 2);
    let refusals = store.refusals();
    assert!(
        !refusals.is_empty(),
        "the foreign checkpoints were not tried"
    );
    assert!(
        refusals
            .iter()
            .all(|(_, why)| why.contains("another corpus or plan config")),
        "{refusals:?}"
    );
    assert!(refusals.len() <= MAX_TRIES, "{refusals:?}");

    // Corrupt: one byte flipped in each blob, at a different place each time.
    let store = MemCheckpoints::new();
    check_checkpointed_seek("fill", &plan, &store, 60, every, 64, 0);
    for (i, (key, mut blob)) in store.blobs().into_iter().enumerate() {
        let at = (i * 37) % blob.len();
        blob[at] ^= 0x5a;
        store.put(key, blob);
    }
    check_checkpointed_seek("corrupt", &plan, &store, 59, every, 64, 2);
    assert_eq!(store.refusals().len(), MAX_TRIES, "{:?}", store.refusals());
    // The seek replayed from step 0 and rewrote nothing it found in place; the next
    // seek still refuses the corrupt entries it tries and is still right.
    check_checkpointed_seek("corrupt again", &plan, &store, 30, every, 64, 2);

    // Forged: a valid blob filed under another step, and one under a key whose digests
    // match but whose body is another step's.
    let store = MemCheckpoints::new();
    check_checkpointed_seek("fill", &plan, &store, 30, every, 64, 0);
    let blobs = store.blobs();
    let (k6, b6) = blobs
        .iter()
        .find(|(k, _)| k.plan_step == 6)
        .expect("a checkpoint at plan step 6");
    let late = CheckpointKey {
        plan_step: 27,
        ..*blobs
            .keys()
            .find(|k| k.plan_step == 27)
            .expect("a checkpoint at plan step 27")
    };
    store.put(late, b6.clone());
    // A blob that decodes but is not a cursor at all under a plausible name.
    store.put(
        CheckpointKey {
            plan_step: 24,
            ..*k6
        },
        b"MILLRACE-garbage".to_vec(),
    );
    check_checkpointed_seek("forged", &plan, &store, 29, every, 64, 2);
    let why: Vec<String> = store.refusals().into_iter().map(|(_, w)| w).collect();
    assert!(
        why.iter().any(|w| w.contains("holds plan step 6, not 27")),
        "{why:?}"
    );
}

/// A cancelled checkpointed seek gives up, like the plain one, and leaves behind only
/// valid checkpoints.
#[test]
fn seek_checkpoints_cancel_between_chunks() {
    use std::sync::atomic::AtomicBool;
    let sc = &scenarios()[3];
    let plan = build(&sc.domains, sc.cfg.clone());
    let store = MemCheckpoints::new();
    let cancelled = AtomicBool::new(true);
    for step in [1u64 << 40, u64::MAX] {
        assert!(plan
            .seek_checkpointed(step, 5, 2, &store, &cancelled)
            .is_none());
    }
    check_checkpointed_seek("after cancel", &plan, &store, 70, 2, 5, 2);
    assert!(store.refusals().is_empty());
}

// ---------------------------------------------------------------------------------------
// 5. Data parallel
// ---------------------------------------------------------------------------------------

#[test]
fn dp_rank_slices_partition_the_global_batch() {
    let mut rng = Pcg64::seed_from_u64(5);
    let domains = vec![
        gen_domain(&mut rng, "a", 1, 80, 33, settings(GroupMode::Off)),
        gen_domain(&mut rng, "b", 1, 80, 33, settings(GroupMode::Off)),
    ];
    for g in [1u32, 7, 64, 100, 128, 200] {
        let mut cfg = base_config(32, g, Packing::BestFit, 32);
        cfg.weights = Some(weights_map(&[("a", 1.0), ("b", 1.0)]));
        let plan = build(&domains, cfg);
        let mut rank0_a = 0u64;
        let mut rank0 = 0u64;
        for b in run_batches(&plan, 30) {
            let gg = b.rows.len() as u64;
            for ranks in [1u32, 2, 8, 64] {
                let mut all: Vec<Row> = Vec::new();
                for r in 0..ranks {
                    let rows = b.rank_rows(r, ranks);
                    let (lo, hi) = millrace::plan::rank_range(gg, r, ranks);
                    assert_eq!(lo, r as u64 * gg / ranks as u64);
                    assert_eq!(hi, (r as u64 + 1) * gg / ranks as u64);
                    assert_eq!(rows.len() as u64, hi - lo);
                    assert_eq!(rows, &b.rows[lo as usize..hi as usize]);
                    all.extend_from_slice(rows);
                }
                assert_eq!(all, b.rows, "G {g} R {ranks}");
                if ranks == 2 {
                    rank0 += b.rank_rows(0, 2).len() as u64;
                    rank0_a += b.rank_rows(0, 2).iter().filter(|r| r.domain == 0).count() as u64;
                }
            }
        }
        // Domains interleave across ranks: rank 0 of 2 sees both, about half and half.
        if g >= 64 {
            let f = rank0_a as f64 / rank0 as f64;
            assert!(f > 0.3 && f < 0.7, "G {g}: rank 0 holds {f} of domain a");
        }
    }
}

// ---------------------------------------------------------------------------------------
// 6. Mixture
// ---------------------------------------------------------------------------------------

/// Piecewise-linear interpolation of the config's points, normalised, computed here
/// independently of `mix::Schedule`.
fn my_shares(points: &[(u64, Vec<f64>)], step: u64) -> Vec<f64> {
    let w: Vec<f64> = match points.iter().rposition(|p| p.0 <= step) {
        None => points[0].1.clone(),
        Some(i) if i + 1 == points.len() => points[i].1.clone(),
        Some(i) => {
            let (s0, w0) = &points[i];
            let (s1, w1) = &points[i + 1];
            let t = (step - s0) as f64 / (s1 - s0) as f64;
            w0.iter().zip(w1).map(|(a, b)| a + (b - a) * t).collect()
        }
    };
    let sum: f64 = w.iter().sum();
    w.iter().map(|x| x / sum).collect()
}

/// Walks `steps` plan steps and checks every domain's cumulative rows against the
/// target after every step; returns the worst deviation in rows.
fn mixture_walk(
    points: &[(u64, Vec<f64>)],
    fill: &[f64],
    g: u32,
    steps: u64,
) -> (f64, Option<(u64, usize, f64)>) {
    let n = fill.len();
    let names: Vec<String> = (0..n).map(|i| format!("d{i}")).collect();
    let refs: Vec<&str> = names.iter().map(|s| s.as_str()).collect();
    let sp: Vec<SchedulePoint> = points
        .iter()
        .map(|(s, w)| SchedulePoint {
            step: *s,
            weights: names.iter().cloned().zip(w.iter().copied()).collect(),
        })
        .collect();
    let m = Mixer {
        schedule: Schedule::new(&sp, &refs),
        fill: fill.to_vec(),
        rows: g,
        bursty: vec![None; n],
        stages: Vec::new(),
    };
    let mut st = MixState::new(n);
    let mut nominal = vec![0i64; n];
    let mut integral = vec![0f64; n];
    let mut worst = 0f64;
    let mut first_bad = None;
    for s in 0..steps {
        let c = m.counts(&mut st, s);
        assert_eq!(c.iter().sum::<u32>(), g);
        let nn = m.nominal(s);
        assert_eq!(nn.iter().sum::<i64>(), g as i64 * TICKS);
        // Independent integral: token shares over fill, normalised, times G.
        let ts = my_shares(points, s);
        let rs: Vec<f64> = ts.iter().zip(fill).map(|(w, f)| w / f).collect();
        let rsum: f64 = rs.iter().sum();
        for d in 0..n {
            nominal[d] += nn[d];
            integral[d] += g as f64 * rs[d] / rsum;
            let dev = (st.rows[d] as i64 * TICKS - nominal[d]) as f64 / TICKS as f64;
            assert_eq!(st.deficit[d], nominal[d] - st.rows[d] as i64 * TICKS);
            // The tick-level target agrees with the float integral to rounding.
            assert!((nominal[d] as f64 / TICKS as f64 - integral[d]).abs() < 1e-4 * (s + 1) as f64);
            if dev.abs() > worst {
                worst = dev.abs();
            }
            if dev.abs() > 1.0 && first_bad.is_none() {
                first_bad = Some((s, d, dev));
            }
        }
    }
    (worst, first_bad)
}

fn weights_strategy(n: usize, zeros: bool) -> impl Strategy<Value = Vec<f64>> {
    let w = if zeros {
        prop_oneof![1 => Just(0.0), 3 => 0.001f64..1.0].boxed()
    } else {
        (0.001f64..1.0).boxed()
    };
    prop::collection::vec(w, n).prop_map(|mut v| {
        if v.iter().sum::<f64>() == 0.0 {
            v[0] = 1.0;
        }
        v
    })
}

/// Schedule points (step, weights), fills, batch rows.
type ScheduleCase = (Vec<(u64, Vec<f64>)>, Vec<f64>, u32);

fn schedule_strategy(zeros: bool) -> impl Strategy<Value = ScheduleCase> {
    (1usize..=6, 1usize..=5)
        .prop_flat_map(move |(n, points)| {
            (
                prop::collection::vec(
                    (
                        prop_oneof![Just(1u64), 1u64..40],
                        weights_strategy(n, zeros),
                    ),
                    points,
                ),
                prop::collection::vec(prop_oneof![Just(1.0f64), 0.2f64..1.0], n),
                prop::sample::select(vec![1u32, 2, 3, 5, 7, 64, 1000, 4096]),
                0u64..20,
            )
        })
        .prop_map(|(pts, fill, g, start)| {
            let mut step = start;
            let points = pts
                .into_iter()
                .enumerate()
                .map(|(i, (gap, w))| {
                    if i > 0 {
                        step += gap;
                    }
                    (step, w)
                })
                .collect();
            (points, fill, g)
        })
}

proptest! {
    #![proptest_config(pt_config(256, 0x0000_0b1e))]

    /// Constant weights (zeros allowed), any G: within one row at every step.
    #[test]
    fn mixture_constant_weights_within_one_row(
        (w, fill, g) in (1usize..=8).prop_flat_map(|n| (
            weights_strategy(n, true),
            prop::collection::vec(0.2f64..1.0, n),
            prop::sample::select(vec![1u32, 2, 3, 7, 64, 256, 1000, 4096]),
        ))
    ) {
        let (worst, bad) = mixture_walk(&[(0, w.clone())], &fill, g, 400);
        prop_assert!(bad.is_none(), "weights {w:?} fill {fill:?} G {g}: {bad:?} (worst {worst})");
    }

    /// Multi-point schedules with ramps and abrupt (one-step) switches, every weight
    /// positive: within one row of the scheduled integral at every step.
    #[test]
    fn mixture_positive_schedules_within_one_row((points, fill, g) in schedule_strategy(false)) {
        let end = points.last().unwrap().0 + 100;
        let (worst, bad) = mixture_walk(&points, &fill, g, end);
        prop_assert!(bad.is_none(), "points {points:?} fill {fill:?} G {g}: {bad:?} (worst {worst})");
    }
}

/// KNOWN VIOLATION (reported, not fixed): when a schedule drives some weights to zero
/// (a ramp down to 0, or a switch that drops domains), the greedy largest-remainder
/// mixer can leave a domain slightly more than one row off its target, because domains
/// with zero weight freeze with whatever carried error they had and the live ones must
/// absorb it. Minimal counterexamples are pinned in `mixture_zero_weight_counterexamples`.
/// Run with `--ignored` to see the strict bound fail.
#[test]
#[ignore = "known: one-row bound is exceeded (observed up to 1.13 rows with 8 domains) under schedules with zero weights; see mixture_zero_weight_counterexamples"]
fn mixture_zero_weight_schedules_within_one_row_strict() {
    let mut runner = TestRunner::new(pt_config(2000, 0x0000_2e70));
    runner
        .run(&schedule_strategy(true), |(points, fill, g)| {
            let end = points.last().unwrap().0 + 100;
            let (worst, bad) = mixture_walk(&points, &fill, g, end);
            prop_assert!(
                bad.is_none(),
                "points {points:?} fill {fill:?} G {g}: {bad:?} (worst {worst})"
            );
            Ok(())
        })
        .unwrap();
}

/// The minimal counterexamples to the one-row bound (found by search, fill 1, G = 1),
/// pinned so that a fix of the mixer shows up here. Neither is forced: a brute-force
/// search over all 4^5 row orders finds ones that never give a row to a zero-weight
/// domain and stay within 0.68 (case 1: d c a b b) and 0.63 rows (case 2: a d a b d)
/// of target at every step. The greedy largest remainder is what leaves the bound.
#[test]
fn mixture_zero_weight_counterexamples() {
    // 1. Four domains (a, b, c, d), G = 1. Step 0: a:c:d = 1:2:8; ramp to a:b = 2:5 at
    //    step 3 (c and d ramp down to 0). After step 4, a has 0 rows against a target of
    //    1.000269: 1.000269 rows behind. c and d froze over-served by 0.6 and 0.4 rows.
    let p1 = vec![
        (0u64, vec![1.0, 0.0, 2.0, 8.0]),
        (3, vec![2.0, 5.0, 0.0, 0.0]),
    ];
    let (_, bad) = mixture_walk(&p1, &[1.0; 4], 1, 10);
    let (step, d, dev) = bad.expect("counterexample 1 no longer violates: turn the strict test on");
    assert_eq!((step, d), (4, 0));
    assert!((dev + 1.000_268_6).abs() < 1e-6, "deviation {dev}");
    // 2. a alone at step 0, ramp to b:c:d = 1:1:3 at step 3, then a:d = 3:2 at step 4.
    //    After step 4, a has 3 rows against a target of 1.976623: 1.023377 rows ahead
    //    (b and c froze under-served and may not take rows at weight 0).
    let p2 = vec![
        (0u64, vec![1.0, 0.0, 0.0, 0.0]),
        (3, vec![0.0, 1.0, 1.0, 3.0]),
        (4, vec![3.0, 0.0, 0.0, 2.0]),
    ];
    let (_, bad) = mixture_walk(&p2, &[1.0; 4], 1, 10);
    let (step, d, dev) = bad.expect("counterexample 2 no longer violates: turn the strict test on");
    assert_eq!((step, d), (4, 0));
    assert!((dev - 1.023_376_6).abs() < 1e-6, "deviation {dev}");
}

/// The planner's own bookkeeping (not just the mixer) stays within one row: realized
/// rows per domain against the sum of nominal ticks, through skips, with real fills.
#[test]
fn mixture_planner_rows_match_targets() {
    for sc in scenarios() {
        let plan = build(&sc.domains, sc.cfg.clone());
        if sc.domains.iter().any(|d| d.settings.bursty.is_some()) {
            continue; // bursty plans are checked in mixture_bursty_*
        }
        let n = sc.domains.len();
        let mut p = plan.start();
        let mut nominal = vec![0i64; n];
        let mut plan_step = 0u64;
        for _ in 0..300 {
            let b = p.next_batch();
            // Targets accrue over every planned step, skipped ones included.
            while plan_step <= b.plan_step {
                for (d, x) in plan.mixer().nominal(plan_step).iter().enumerate() {
                    nominal[d] += x;
                }
                plan_step += 1;
            }
            let ms = p.mix_state();
            for (d, &target) in nominal.iter().enumerate() {
                let dev = ms.rows[d] as i64 * TICKS - target;
                assert!(
                    dev.abs() <= TICKS,
                    "{}: step {} domain {d}: {} rows off",
                    sc.name,
                    b.step,
                    dev as f64 / TICKS as f64
                );
            }
        }
    }
}

fn bursty_walk(
    weights: &[f64],
    bursty: &[Option<u32>],
    g: u32,
    steps: u64,
) -> (MixState, Vec<Vec<u32>>, Vec<Vec<i64>>) {
    walk_mixer(&bursty_mixer(weights, bursty, g), weights.len(), steps)
}

/// A mixer of domains `d0..` with fixed `weights`, fill 1, `g` rows, and the periods of
/// `bursty` (phases as `Plan::new` assigns them: the k-th bursty domain gets k % period).
fn bursty_mixer(weights: &[f64], bursty: &[Option<u32>], g: u32) -> Mixer {
    let n = weights.len();
    let names: Vec<String> = (0..n).map(|i| format!("d{i}")).collect();
    let refs: Vec<&str> = names.iter().map(|s| s.as_str()).collect();
    let sp = vec![SchedulePoint {
        step: 0,
        weights: names.iter().cloned().zip(weights.iter().copied()).collect(),
    }];
    let mut k = 0;
    let b: Vec<Option<(u32, u32)>> = bursty
        .iter()
        .map(|p| {
            p.map(|p| {
                let ph = k % p;
                k += 1;
                (p, ph)
            })
        })
        .collect();
    Mixer {
        schedule: Schedule::new(&sp, &refs),
        fill: vec![1.0; n],
        rows: g,
        bursty: b,
        stages: Vec::new(),
    }
}

/// Runs `m` over `steps` steps: the final state, each step's counts and nominal ticks.
fn walk_mixer(m: &Mixer, n: usize, steps: u64) -> (MixState, Vec<Vec<u32>>, Vec<Vec<i64>>) {
    let mut st = MixState::new(n);
    let mut counts = Vec::new();
    let mut nominal = Vec::new();
    for s in 0..steps {
        counts.push(m.counts(&mut st, s));
        nominal.push(m.nominal(s));
    }
    (st, counts, nominal)
}

#[test]
fn mixture_bursty_back_within_one_row_each_cycle() {
    for (weights, bursty, g) in [
        (vec![0.6, 0.3, 0.1], vec![None, None, Some(3)], 30u32),
        (vec![0.6, 0.3, 0.1], vec![None, None, Some(3)], 8),
        (
            vec![0.5, 0.3, 0.1, 0.1],
            vec![None, None, Some(3), Some(2)],
            64,
        ),
        (
            vec![0.7, 0.05, 0.05, 0.2],
            vec![None, Some(4), Some(4), None],
            7,
        ),
        (vec![0.9, 0.03], vec![None, Some(10)], 5),
        (vec![0.4, 0.4, 0.2], vec![None, None, Some(2)], 1000),
    ] {
        let n = weights.len();
        let steps = 600;
        let (st, counts, nominal) = bursty_walk(&weights, &bursty, g, steps);
        let ctx = format!("weights {weights:?} bursty {bursty:?} G {g}");
        let mut k = 0;
        let phases: Vec<Option<(u64, u64)>> = bursty
            .iter()
            .map(|p| {
                p.map(|p| {
                    let r = (p as u64, (k % p) as u64);
                    k += 1;
                    r
                })
            })
            .collect();
        let mut rows = vec![0i64; n];
        let mut target = vec![0i64; n];
        let mut leftover_target = vec![0f64; n];
        let mut all_end_checks = 0;
        for s in 0..steps as usize {
            let left: u32 = g
                - (0..n)
                    .filter(|&d| phases[d].is_some())
                    .map(|d| counts[s][d])
                    .sum::<u32>();
            let wsum: f64 = (0..n)
                .filter(|&d| phases[d].is_none())
                .map(|d| weights[d])
                .sum();
            for d in 0..n {
                rows[d] += counts[s][d] as i64;
                target[d] += nominal[s][d];
                match phases[d] {
                    Some((p, ph)) => {
                        // Rows only at the cycle's first step...
                        if s as u64 % p != ph {
                            assert_eq!(counts[s][d], 0, "{ctx}: bursty d{d} took rows at step {s}");
                        }
                        // ...and back within one row at the cycle's last step.
                        if s as u64 >= ph && (s as u64 + 1) % p == ph {
                            let dev = rows[d] * TICKS - target[d];
                            assert!(
                                dev.abs() <= TICKS,
                                "{ctx}: bursty d{d} {} rows off at cycle end {s}",
                                dev as f64 / TICKS as f64
                            );
                        }
                    }
                    None => {
                        let nd = (rows[d] * TICKS - target[d]) as f64 / TICKS as f64;
                        let all_end = phases
                            .iter()
                            .flatten()
                            .all(|&(p, ph)| s as u64 >= ph && (s as u64 + 1) % p == ph);
                        // Mid-cycle they are off their nominal target by up to the
                        // bursts (100 rows at G 1000), but whenever every bursty domain
                        // has just finished a cycle they are back within one row.
                        if all_end {
                            assert!(
                                nd.abs() <= 1.0,
                                "{ctx}: d{d} {nd} rows off nominal at common cycle end {s}"
                            );
                            all_end_checks += 1;
                        }
                        // The others keep their mixture over what the bursts leave.
                        leftover_target[d] += left as f64 * weights[d] / wsum;
                        let dev = rows[d] as f64 - leftover_target[d];
                        assert!(
                            dev.abs() <= 1.0 + 1e-6,
                            "{ctx}: d{d} {dev} rows off its share of the leftover at step {s}"
                        );
                    }
                }
            }
        }
        // Long-run share: at each bursty domain's last cycle end, its share of all
        // rows so far matches its target share to within one row.
        for d in 0..n {
            let Some((p, ph)) = phases[d] else { continue };
            let end = (0..steps)
                .rev()
                .find(|&s| s >= ph && (s + 1) % p == ph)
                .unwrap();
            let got: u64 = counts[..=end as usize].iter().map(|c| c[d] as u64).sum();
            let want: i64 = nominal[..=end as usize].iter().map(|x| x[d]).sum();
            let total = (end + 1) as f64 * g as f64;
            let err = (got as f64 - want as f64 / TICKS as f64) / total;
            assert!(
                err.abs() <= 1.0 / total,
                "{ctx}: d{d} long-run share off by {err}"
            );
        }
        let _ = st;
        if phases.iter().flatten().count() == 1 {
            assert!(all_end_checks >= 50, "{ctx}");
        }
    }
}

/// Two bursty domains that share a phase and together want more than a whole batch in
/// their burst step cannot both be served: the clamped one falls behind without bound.
/// `Mixer::bursty_shortfall` finds it, so a start warns of it and a live change that
/// brings it is refused (`bursty_shortfall_is_when_the_carried_error_grows`).
#[test]
fn mixture_bursty_overfull_phase_falls_behind() {
    // Three bursty domains of period 2: phases 0, 1, 0; d1 and d3 (0.45 each) both want
    // 9 of 10 rows at even steps.
    let weights = [0.05, 0.45, 0.05, 0.45];
    let bursty = [None, Some(2), Some(2), Some(2)];
    let (st, _, nominal) = bursty_walk(&weights, &bursty, 10, 200);
    let lag: f64 = (nominal.iter().map(|x| x[3]).sum::<i64>() - st.rows[3] as i64 * TICKS) as f64
        / TICKS as f64;
    assert!(
        lag > 100.0,
        "expected the clamped domain to fall far behind, lag {lag}"
    );
    let short = bursty_mixer(&weights, &bursty, 10).bursty_shortfall();
    assert!(
        matches!(&short, Some(s) if s.domain == 3 && s.got < 0.45),
        "{short:?}"
    );
    // Found in review: each alone and each pair fits (a share-times-period sum said
    // 0.991), yet d1, cut short where it meets d2, takes its shortfall at its next start,
    // which falls on d3's: d3 falls behind by 0.0022 batches a step.
    let bursty = [None, Some(3), Some(4), Some(3)];
    let weights = [
        0.4252407723733085,
        0.1535944831780861,
        0.2223430442053288,
        0.2845797261142724,
    ];
    let short = bursty_mixer(&weights, &bursty, 100).bursty_shortfall();
    assert!(matches!(&short, Some(s) if s.domain == 3), "{short:?}");
    // A long period (found in the second review): y (10000) starts every cycle in a step
    // of x (2, served first, taking 0.75 of the batch), so it gets half its 0.5 a cycle.
    // The run must span many of y's cycles to see it (two batches of noise, at most a
    // batch a cycle).
    let bursty = [None, Some(2), Some(3), Some(10_000)];
    let weights = [0.62495, 0.375, 0.0, 0.00005];
    let short = bursty_mixer(&weights, &bursty, 64).bursty_shortfall();
    assert!(
        matches!(&short, Some(s) if s.domain == 3 && s.got < 0.00004),
        "{short:?}"
    );
    // And the other way: the sum said 1.052, yet every error stays bounded.
    let bursty = [None, Some(4), Some(3), Some(2)];
    let weights = [0.8046, 0.3978, 0.4749, 0.5222];
    assert_eq!(
        bursty_mixer(&weights, &bursty, 100).bursty_shortfall(),
        None
    );
}

/// Over random mixtures of bursty and plain domains (periods 2-7, phases as the plan
/// assigns them, some sharing steps, three or more bursty domains carrying shortfalls
/// into each other's steps), `Mixer::bursty_shortfall` agrees with a run of the mixer
/// eight times as long as its own: without a shortfall no domain's carried error grows
/// by more than a thousandth of a batch a step (past two batches) and every error stays
/// short of the cap it would saturate at; with one, the domain it names falls behind, up
/// to that cap.
#[test]
fn bursty_shortfall_is_when_the_carried_error_grows() {
    let (mut short, mut fine) = (0, 0);
    for seed in 0..300u64 {
        let mut rng = Pcg64::seed_from_u64(seed);
        let n = rng.gen_range(2..6);
        let weights: Vec<f64> = (0..n).map(|_| rng.gen_range(0.01..1.0)).collect();
        let bursty: Vec<Option<u32>> = (0..n)
            .map(|d| (d > 0 && rng.gen_range(0..3) > 0).then(|| rng.gen_range(2..8)))
            .collect();
        if bursty.iter().all(Option::is_none) {
            continue;
        }
        let g = [8, 30, 100][rng.gen_range(0..3)];
        let m = bursty_mixer(&weights, &bursty, g);
        let steps = 8 * 8192u64;
        let mut st = MixState::new(n);
        let mut mid = Vec::new();
        let mut largest = vec![0u64; n];
        for step in 0..steps {
            if step == steps / 2 {
                mid = st.deficit.clone();
            }
            m.counts(&mut st, step);
            for (l, e) in largest.iter_mut().zip(&st.deficit) {
                *l = (*l).max(e.unsigned_abs());
            }
        }
        // Rows each domain fell behind over the second half (same point of every cycle:
        // the periods, 2-7, divide steps / 2).
        let grew = |d: usize| (st.deficit[d] - mid[d]) as f64 / TICKS as f64;
        match m.bursty_shortfall() {
            None => {
                fine += 1;
                for (d, &l) in largest.iter().enumerate() {
                    let most = 2.0 * g as f64 + 0.001 * g as f64 * (steps / 2) as f64;
                    assert!(
                        grew(d) <= most,
                        "seed {seed}: d{d} fell {} rows behind",
                        grew(d)
                    );
                    // Such a run never reaches the cap (which leaves it as it was), and a
                    // resume accepts every carried error it has.
                    assert!(l < m.deficit_bound(d), "seed {seed}: d{d} carried {l}");
                }
            }
            Some(s) => {
                short += 1;
                // Behind by more than two batches over the second half, or at the cap
                // its error saturates at (`Mixer::counts`), less the batch it takes at
                // a cycle start.
                let e = st.deficit[s.domain].unsigned_abs();
                let capped = m.deficit_bound(s.domain) - e <= (g as u64 + 1) * TICKS as u64;
                assert!(
                    grew(s.domain) > 2.0 * g as f64 || capped,
                    "seed {seed}: {s:?}, {}",
                    grew(s.domain)
                );
            }
        }
    }
    assert!(short > 30 && fine > 30, "{short} short, {fine} fine");
}

/// A mixture that cannot give a bursty domain its weight is reported with the domain,
/// the step and the share it would get (a start warns of it; a config is not refused,
/// since a run already training under it could only fix it by rewriting its history).
/// A warm-up that overloads it before the weights come down is no shortfall: the
/// domain is repaid.
#[test]
fn an_overweight_bursty_domain_is_reported() {
    let (domains, mut cfg) = web_and_wiki(4, 4, 60, 32, 0.5);
    let plan = build(&domains, cfg.clone());
    let why = plan
        .bursty_shortfall()
        .expect("half the weight at period 4 is short");
    assert!(
        why.contains("domain wiki (bursty, period 4)")
            && why.contains("at most 1/4 of them")
            && why.contains("from plan step 0"),
        "{why}"
    );
    assert!(plan.warnings().contains(&why));
    // Already short: a live change may leave it so or make it less so, not worse.
    let change = |w: f64| {
        let c = (plan.weights_change(50, &BTreeMap::from([("wiki".to_string(), w)]))).unwrap();
        plan.with_journal(vec![c]).unwrap()
    };
    assert!(change(0.9).bursty_shortfall_beyond(&plan).is_some());
    assert_eq!(change(0.45).bursty_shortfall_beyond(&plan), None);
    assert!(change(0.45).bursty_shortfall().is_some());
    assert_eq!(change(0.05).bursty_shortfall(), None);
    cfg.weights = Some(weights_map(&[("web", 0.9), ("wiki", 0.1)]));
    let plan = build(&domains, cfg.clone());
    assert_eq!(plan.bursty_shortfall(), None);
    let heavy = plan
        .weights_change(50, &BTreeMap::from([("wiki".to_string(), 0.9)]))
        .unwrap();
    let why = plan.with_journal(vec![heavy]).unwrap().bursty_shortfall();
    assert!(
        matches!(&why, Some(w) if w.contains("from plan step 50")),
        "{why:?}"
    );
    // All weight on wiki for a warm-up, then a tenth: repaid, no shortfall.
    cfg.weights = None;
    cfg.schedule = vec![
        SchedulePoint {
            step: 0,
            weights: weights_map(&[("web", 0.0), ("wiki", 1.0)]),
        },
        SchedulePoint {
            step: 100,
            weights: weights_map(&[("web", 0.9), ("wiki", 0.1)]),
        },
    ];
    assert_eq!(build(&domains, cfg).bursty_shortfall(), None);
}

/// A plain domain `web` and a bursty `wiki` of `period` (`docs` documents a shard, the
/// generator seeded by `seed`), `g` rows, `wiki` of the weight.
fn web_and_wiki(
    seed: u64,
    period: u32,
    docs: usize,
    g: u32,
    wiki: f64,
) -> (Vec<DomSpec>, PlanConfig) {
    let mut rng = Pcg64::seed_from_u64(seed);
    let mut bursty = settings(GroupMode::Off);
    bursty.bursty = Some(Bursty { period });
    let domains = vec![
        gen_domain(&mut rng, "web", 2, docs, 17, settings(GroupMode::Off)),
        gen_domain(&mut rng, "wiki", 1, docs, 17, bursty),
    ];
    let mut cfg = base_config(16, g, Packing::BestFit, 16);
    cfg.weights = Some(weights_map(&[("web", 1.0 - wiki), ("wiki", wiki)]));
    (domains, cfg)
}

/// A short bursty domain's carried error grows every cycle; the old build refused every
/// blob of this plan from step 14,008 on (from about 26,600 under the journal below,
/// whose larger batch ahead raised its bound; from step 50,055 at 1024 rows), so a run
/// that missed the start's warning could not resume from any checkpoint. Its
/// error now saturates inside what a resume accepts, at the same point of the mixer
/// whether a step is streamed, sought or resumed: blobs at random steps, before and far
/// past that step, under a journal (a heavier weight, then a larger batch) adopted from
/// the blob, resume and continue the stream bit for bit, a plain and a checkpointed seek
/// give the same blob, and the plan without the journal's future stage agrees on every
/// step before that stage.
#[test]
fn resume_a_short_bursty_plan_from_blobs_past_the_old_refusal() {
    // Period 10 at 0.9 of the weight: a tenth of the rows at most, so the error grows by
    // about 0.7 of a batch a step, for good.
    let (domains, cfg) = web_and_wiki(11, 10, 40, 8, 0.9);
    let plan = build(&domains, cfg);
    assert!(plan.bursty_shortfall().is_some());
    let heavier = plan
        .weights_change(12_000, &BTreeMap::from([("wiki".to_string(), 0.95)]))
        .unwrap();
    let weights_only = Arc::new(plan.with_journal(vec![heavier.clone()]).unwrap());
    let wider = weights_only.stage_change(30_000, 16, 16, None, false);
    let live = Arc::new(plan.with_journal(vec![heavier, wider]).unwrap());
    let mut rng = Pcg64::seed_from_u64(7);
    let mut at: Vec<u64> = (0..6).map(|_| rng.gen_range(1..45_000)).collect();
    at.extend([13_000, 20_000, 29_990, 44_000]);
    at.sort_unstable();
    at.dedup();
    let store = MemCheckpoints::new();
    let (mut p, mut q, mut largest) = (live.start(), weights_only.start(), 0u64);
    for &t in &at {
        while p.step() < t {
            p.skip_batch();
            let e = p.mix_state().deficit[1].unsigned_abs();
            largest = largest.max(e);
        }
        if t < 30_000 {
            // The cap counts only the stages so far: the future stage moves nothing.
            while q.step() < t {
                q.skip_batch();
            }
            assert_eq!(q.mix_state(), p.mix_state(), "step {t}");
            assert_eq!(q.stream(1), p.stream(1), "step {t}");
        }
        let blob = p.cursor();
        let mut r = match plan.resume(&blob, 1 << 20) {
            Ok(r) => r,
            Err(e) => panic!("step {t}: the blob is refused: {e}"),
        };
        assert!(r.adopted, "step {t}");
        for k in 0..3 {
            assert_eq!(r.planner.next_batch(), p.next_batch(), "step {t} + {k}");
        }
        if t % 2 == 0 || t > 40_000 {
            let cancel = std::sync::atomic::AtomicBool::new(false);
            let sought = live
                .seek_checkpointed(t, 64, 5_000, &store, &cancel)
                .unwrap();
            assert_eq!(sought.cursor(), blob, "checkpointed seek to {t}");
        }
    }
    assert_eq!(live.seek(at[at.len() - 1] + 3).cursor(), p.cursor());
    // The error did reach the bound (the old build's refusal) and stays within it.
    assert_eq!(largest, 10_001 * 17 * TICKS as u64, "{largest}");
}

/// One mixer case of `mixture_saturation_leaves_in_bound_runs_as_they_were`: a fixed
/// one (DESIGN's 1024-row example, a long ramp off an overload) or a random one, with
/// its ramp and stage.
fn saturation_case(seed: u64) -> Mixer {
    let mut rng = Pcg64::seed_from_u64(seed);
    let (weights, bursty, g): (Vec<f64>, Vec<Option<u32>>, u32) = match seed {
        0 => (vec![0.7, 0.3], vec![None, Some(10)], 1024),
        1 => (vec![0.1, 0.9], vec![None, Some(10)], 64),
        _ => {
            let n = rng.gen_range(2..5);
            let mut w: Vec<f64> = (0..n).map(|_| rng.gen_range(0.01..1.0)).collect();
            let b: Vec<Option<u32>> = (0..n)
                .map(|d| (d > 0 && rng.gen_range(0..3) > 0).then(|| rng.gen_range(2..13)))
                .collect();
            if seed % 2 == 0 {
                // Mostly short: one bursty domain takes most of the weight.
                if let Some(d) = (0..n).rev().find(|&d| b[d].is_some()) {
                    w[d] = 4.0 * w.iter().sum::<f64>();
                }
            }
            (w, b, [8, 64, 1024][rng.gen_range(0..3)])
        }
    };
    let mut m = bursty_mixer(&weights, &bursty, g);
    let n = weights.len();
    if seed == 1 || (seed > 1 && rng.gen_range(0..3) == 0) {
        // A ramp to a mixture every domain gets: an overload repaid afterwards (seed 1:
        // 0.9 down to 0.01 over 40,000 steps, which reaches the cap on the way).
        let end = if seed == 1 {
            40_000
        } else {
            rng.gen_range(1000..20_000)
        };
        let mut late: Vec<f64> = (0..n).map(|_| rng.gen_range(0.01..1.0)).collect();
        late[0] = 10.0 * n as f64;
        if seed == 1 {
            late = vec![0.99, 0.01];
        }
        let names: Vec<String> = (0..n).map(|d| format!("d{d}")).collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let point = |step, w: &[f64]| SchedulePoint {
            step,
            weights: names.iter().cloned().zip(w.iter().copied()).collect(),
        };
        m.schedule = Schedule::new(&[point(0, &weights), point(end, &late)], &refs);
    }
    if seed > 1 && rng.gen_range(0..4) == 0 {
        m.stages.push(StageMix {
            step: rng.gen_range(5000..15_000),
            rows: [g / 2, 2 * g][rng.gen_range(0..2)].max(1),
            fill: vec![1.0; n],
        });
    }
    m
}

/// The saturation is a no-op for every run whose carried errors stay within what a
/// resume accepts of the largest batch so far (10,001 batches for a bursty domain, 4 for
/// a plain one): over 40 mixtures, short ones among them, with ramps and stages, the
/// counts up to the first step any error reaches that bound are those BASE's build
/// (fc81ab0) gave, recorded as a digest, and that step is where BASE first passed it
/// (50,055 for DESIGN's example). From there on every error stays within the bound and
/// every batch is full.
#[test]
fn mixture_saturation_leaves_in_bound_runs_as_they_were() {
    // (seed, first step at the bound or `steps`, digest of the counts up to it).
    const RECORDED: &[(u64, u64, u64)] = &[
        (0, 50_055, 0x12ba438a469c1865),
        (1, 16_467, 0x5db650db6b48d7c5),
        (2, 27_283, 0xc0bf3cfe122e7845),
        (3, 30_000, 0xba7ae617f8cb4681),
        (4, 30_000, 0x502d6ac86d43b2a9),
        (5, 30_000, 0x6bbc1f29b9e26265),
        (6, 30_000, 0x1afbb13ae6442215),
        (7, 30_000, 0xfcba4868bfda99a9),
        (8, 30_000, 0x34ed3a3b5741decb),
        (9, 30_000, 0x6c0553a1b0b38909),
        (10, 15_678, 0x5c3c95423ef89ddd),
        (11, 30_000, 0xfa77c5441f563ddb),
        (12, 17_751, 0x7cd4aadca26b2165),
        (13, 30_000, 0xa6d5c90d72f3cf61),
        (14, 13_715, 0x434640cc751e049d),
        (15, 30_000, 0x4a71049c0e0fedfd),
        (16, 15_158, 0x7e088db88b9cb8cf),
        (17, 30_000, 0xe2034ae0141f1655),
        (18, 30_000, 0x0d1c551bda37c7e9),
        (19, 30_000, 0x9bcce6ffbc1cac5b),
        (20, 30_000, 0xfcba3901ee815e55),
        (21, 30_000, 0x5543624948609f25),
        (22, 24_991, 0x175f7128d71cb53b),
        (23, 30_000, 0xb978630ff6529bb3),
        (24, 16_132, 0x8b429c3237a7187d),
        (25, 30_000, 0xbd6ab988fa227fe1),
        (26, 13_010, 0xb97c7740c3f51361),
        (27, 30_000, 0x4d5de8a149ba9885),
        (28, 17_023, 0xa483ef1b20370d19),
        (29, 22_556, 0x9f2c570d1d42dd4d),
        (30, 30_000, 0xd6e69d60b5b5c32f),
        (31, 30_000, 0x8d5722b18d7bed05),
        (32, 30_000, 0xfee52fb9cfc892f5),
        (33, 30_000, 0x5ae32deffb5951c3),
        (34, 30_000, 0x07b67d7cde8c4ad3),
        (35, 30_000, 0xdd652d1ce18a5f3f),
        (36, 30_000, 0xb737216122d02225),
        (37, 30_000, 0xf297bd3af8c5ea5d),
        (38, 14_023, 0xe6673940d0ccd971),
        (39, 30_000, 0x41e980aad2f4b533),
    ];
    let steps = 60_000u64;
    let mut out = Vec::new();
    for seed in 0..40u64 {
        let m = saturation_case(seed);
        let n = m.fill.len();
        let cap = |d: usize, s: u64| {
            let rows = (m.stages.iter().filter(|st| st.step <= s).map(|st| st.rows))
                .fold(m.rows, u32::max) as u64;
            let batches = if m.bursty[d].is_some() { 10_001 } else { 4 };
            batches * (rows + 1) * TICKS as u64
        };
        let (mut st, mut digest, mut reached) = (MixState::new(n), 0xcbf2_9ce4_8422_2325u64, None);
        let end = [steps, 3 * steps, steps / 2][seed.min(2) as usize];
        for s in 0..end {
            let c = m.counts(&mut st, s);
            if reached.is_none() {
                for &k in &c {
                    digest = (digest ^ k as u64).wrapping_mul(0x0100_0000_01b3);
                }
                if (0..n).any(|d| st.deficit[d].unsigned_abs() >= cap(d, s)) {
                    reached = Some(s);
                }
            } else {
                assert_eq!(c.iter().sum::<u32>(), m.rows_at(s), "seed {seed} step {s}");
                for d in 0..n {
                    assert!(
                        st.deficit[d].unsigned_abs() <= cap(d, s),
                        "seed {seed} d{d} {s}"
                    );
                }
            }
        }
        if seed == 1 {
            // The ramp's overload is repaid once the weight comes down: at most the cap.
            let e = st.deficit[1] as f64 / (TICKS as f64 * 65.0);
            assert!(e.abs() < 2.0, "still owed {e} batches");
        }
        out.push((seed, reached.unwrap_or(end), digest));
    }
    assert_eq!(out, RECORDED);
}

/// At the largest batch (2^20 rows) a bursty domain of period 10,000 with nearly all the
/// weight falls behind by almost a batch, 2^44 ticks, a step: its carried error
/// overflowed i64 near step 525,000 (a panic in a debug build, a wrapped error and
/// nonsense counts in a release one). It now stays within the resume bound, and the
/// domain gets its best: the whole batch at every cycle start.
#[test]
fn mixture_error_never_overflows_at_the_largest_batch() {
    let g = millrace::config::plan::MAX_BATCH_ROWS;
    let m = bursty_mixer(&[0.001, 0.999], &[None, Some(10_000)], g);
    let mut st = MixState::new(2);
    let steps = 560_000u64;
    for s in 0..steps {
        let c = m.counts(&mut st, s);
        if s % 10_000 == 0 {
            assert_eq!(c, [0, g], "step {s}");
        }
    }
    assert_eq!(st.rows[1], steps / 10_000 * g as u64);
    assert_eq!(st.deficit[1].unsigned_abs(), m.deficit_bound(1));
}

// ---------------------------------------------------------------------------------------
// 10. Batch grouping
// ---------------------------------------------------------------------------------------

/// What one batch-grouping run shows, for the assertions below.
#[derive(Default, Debug)]
struct BatchFacts {
    long_groups: u64,
    /// Groups that fit both the cap and the step's rows yet span batches.
    unexplained_splits: u64,
    /// `split_groups` counted by the stream.
    counted_splits: u64,
    /// (step, group, rows) where a group took more than the cap in one batch.
    over_cap: Vec<(u64, u64, u64)>,
    /// ... and whether the domain's packing window ran out in that step.
    over_cap_outside_window_end: u64,
    /// (group, step, rows per step) where a spanning group skipped a batch in which
    /// its domain had rows.
    gaps: Vec<(u64, u64, BTreeMap<u64, u64>)>,
}

fn batch_grouping_run(g: u32, share: f64, window: u64, seed: u64) -> BatchFacts {
    let mut rng = Pcg64::seed_from_u64(seed);
    let cap = 17u32;
    let mut code = settings(GroupMode::Batch);
    code.grouping.max_share = share;
    let code = DomSpec {
        name: "code".into(),
        shards: (0..2)
            .map(|_| {
                let lengths: Vec<u32> = (0..60).map(|_| rng.gen_range(1..40)).collect();
                let sizes: Vec<u64> = (0..60).map(|_| rng.gen_range(1..=8)).collect();
                ShardSpec::new(lengths, &sizes)
            })
            .collect(),
        settings: code,
    };
    let web = gen_domain(&mut rng, "web", 1, 80, cap, settings(GroupMode::Off));
    let case = CoverCase {
        seq_len: cap - 1,
        g,
        packing: Packing::BestFit,
        window,
        seed: g as u64,
        domains: vec![code, web],
        weight_factors: vec![1.0, 1.0, 1.0, 1.0],
        reseeds: vec![],
    };
    let plan = build(&case.domains, case.config());
    let facts = DomFacts::new(&case.domains[0]);
    let units = facts.virtual_units(true);
    let mut p = plan.start();
    let mut batches = Vec::new();
    // Whether the domain's window ran out during each step: the window (or epoch)
    // moved, or every block of the current window has been handed out.
    let mut window_ended = Vec::new();
    for _ in 0..400 {
        let before = p.stream(0).unwrap().clone();
        batches.push(p.next_batch());
        let after = p.stream(0).unwrap();
        let moved = (after.epoch, after.window_start) != (before.epoch, before.window_start);
        let end = (after.window_start + window).min(units);
        let exhausted =
            (p.epochs()[0] - after.epoch as f64 - end as f64 / units as f64).abs() < 1e-9;
        window_ended.push(moved || exhausted);
    }
    let group_cap = ((share * g as f64).floor() as u64).max(1);
    let mut occ: BTreeMap<(u32, u32, u64), BTreeMap<u64, u64>> = BTreeMap::new();
    for b in &batches {
        for r in b.rows.iter().filter(|r| r.domain == 0) {
            let keys: BTreeSet<(u32, u32, u64)> = r
                .segments
                .iter()
                .map(|s| (r.epoch, s.shard, s.group.unwrap()))
                .collect();
            for k in keys {
                *occ.entry(k).or_default().entry(b.step).or_default() += 1;
            }
        }
    }
    let final_epoch = p.stream(0).unwrap().epoch;
    let mut out = BatchFacts {
        counted_splits: p.stream(0).unwrap().split_groups,
        ..BatchFacts::default()
    };
    for ((epoch, shard, gid), per_step) in &occ {
        let run = facts.runs[*shard as usize]
            .iter()
            .enumerate()
            .find(|(i, _)| ShardSpec::group_id(*i) == *gid)
            .map(|(_, r)| *r)
            .unwrap();
        if run.2 <= cap as u64 {
            assert_eq!(per_step.len(), 1, "a short group sits in one row");
            continue;
        }
        out.long_groups += 1;
        let rows: u64 = per_step.values().sum();
        let complete = *epoch < final_epoch;
        if complete {
            assert_eq!(
                rows,
                run.2.div_ceil(cap as u64),
                "a long group takes ceil(len/cap) rows"
            );
        }
        let (&first, _) = per_step.iter().next().unwrap();
        let count_first = batches[first as usize].counts[0] as u64;
        if per_step.len() > 1 && rows <= group_cap.min(count_first) && complete {
            out.unexplained_splits += 1;
        }
        for (&st, &c) in per_step {
            if c > group_cap {
                out.over_cap.push((st, *gid, c));
                if !window_ended[st as usize] {
                    out.over_cap_outside_window_end += 1;
                }
            }
        }
        let steps: Vec<u64> = per_step.keys().copied().collect();
        for w in steps.windows(2) {
            for s in w[0] + 1..w[1] {
                if batches[s as usize].counts[0] > 0 {
                    out.gaps.push((*gid, s, per_step.clone()));
                }
            }
        }
    }
    out
}

const BATCH_CASES: [(u32, f64, u64); 4] =
    [(16, 0.25, 12), (32, 0.5, 40), (8, 1.0, 6), (24, 0.125, 20)];

/// Batch grouping (item 10 of the brief), on corpora where groups longer than a row are the rule. What
/// holds (asserted): a group whose rows fit both the cap and its domain's rows of the
/// step it starts in lands in one batch, except those the stream counts in
/// `split_groups`; a long group takes exactly ceil(len / capacity) rows; no group takes
/// more than the cap in one batch away from window ends. Since issue 14 the cap also
/// holds at window ends, and groups span consecutive batches: asserted in
/// `batch_grouping_spanning_groups_strict`.
#[test]
fn batch_grouping_keeps_groups_in_one_batch() {
    let mut long = 0;
    for (g, share, window) in BATCH_CASES {
        let f = batch_grouping_run(g, share, window, 10 + g as u64);
        eprintln!(
            "G {g} share {share} window {window}: {} long groups, {} split (counted {}), {} over cap, {} gaps",
            f.long_groups,
            f.unexplained_splits,
            f.counted_splits,
            f.over_cap.len(),
            f.gaps.len()
        );
        assert!(
            f.unexplained_splits <= f.counted_splits,
            "G {g} share {share}: {} groups split across batches but only {} counted",
            f.unexplained_splits,
            f.counted_splits
        );
        assert_eq!(
            f.over_cap_outside_window_end, 0,
            "G {g} share {share}: over cap mid-window: {:?}",
            f.over_cap
        );
        long += f.long_groups;
    }
    assert!(long > 200, "{long} long groups exercised");
}

/// Issue 14, item 1: the fixed cases of `batch_grouping_run`, held to the whole promise
/// (no group above the cap in a batch, none skipping a batch of its domain). Before the
/// fix, G 16 share 0.25 window 12 seed 26: group id 1238 took 6 rows at step 18 (its
/// window ran out) and group id 1068 took 1 row at step 0 and none at step 1.
#[test]
fn batch_grouping_spanning_groups_strict() {
    for (g, share, window) in BATCH_CASES {
        let f = batch_grouping_run(g, share, window, 10 + g as u64);
        assert!(
            f.over_cap.is_empty(),
            "G {g} share {share}: over cap {:?}",
            &f.over_cap[..f.over_cap.len().min(5)]
        );
        assert!(
            f.gaps.is_empty(),
            "G {g} share {share}: gaps {:?}",
            &f.gaps[..f.gaps.len().min(3)]
        );
    }
}

/// A batch-grouped domain whose group sizes span one row to many batches: most groups
/// are a few short documents, some a dozen, some 40-150 documents (dozens of rows at 17
/// tokens a row, several batches at any cap), next to an ungrouped domain.
fn spanning_corpus(rng: &mut Pcg64, share: f64) -> Vec<DomSpec> {
    let mut code = settings(GroupMode::Batch);
    code.grouping.max_share = share;
    let shards = (0..2)
        .map(|_| {
            let docs = rng.gen_range(150..400);
            let lengths: Vec<u32> = (0..docs).map(|_| rng.gen_range(1..40)).collect();
            let sizes: Vec<u64> = (0..docs)
                .map(|_| match rng.gen_range(0..10) {
                    0 => rng.gen_range(40..150),
                    1..=3 => rng.gen_range(4..20),
                    _ => rng.gen_range(1..4),
                })
                .collect();
            ShardSpec::new(lengths, &sizes)
        })
        .collect();
    let code = DomSpec {
        name: "code".into(),
        shards,
        settings: code,
    };
    let web = gen_domain(rng, "web", 1, 200, 17, settings(GroupMode::Off));
    vec![code, web]
}

/// Planned batches in the checker's terms, for domain 0.
fn grouping_batches(batches: &[GlobalBatch]) -> Vec<grouping_check::Batch> {
    batches
        .iter()
        .map(|b| grouping_check::Batch {
            step: b.step,
            domain_rows: b.counts[0],
            rows: b
                .rows
                .iter()
                .filter(|r| r.domain == 0)
                .map(|r| {
                    let groups = r
                        .segments
                        .iter()
                        .filter_map(|s| s.group.map(|g| (s.shard.to_string(), g)))
                        .collect();
                    (r.epoch, groups)
                })
                .collect(),
        })
        .collect()
}

/// Plans `steps` batches of a `spanning_corpus` and returns them with the split and
/// over-cap counts `millrace plan` would print (the report's tally, windows of 100).
fn spanning_run(
    g: u32,
    share: f64,
    window: u64,
    weight: f64,
    seed: u64,
    until_epoch: u32,
) -> (Vec<GlobalBatch>, u32, u64, u64) {
    let mut rng = Pcg64::seed_from_u64(seed);
    let domains = spanning_corpus(&mut rng, share);
    let mut cfg = base_config(16, g, Packing::BestFit, window);
    cfg.seed = seed;
    cfg.weights = Some(weights_map(&[("code", weight), ("web", 1.0 - weight)]));
    let plan = build(&domains, cfg);
    let mut p = plan.start();
    let mut batches = Vec::new();
    let mut tally = Tally::new(&plan);
    let (mut split, mut capped) = (0, 0);
    while p.stream(0).map_or(0, |s| s.epoch) < until_epoch && batches.len() < 6000 {
        let b = p.next_batch();
        tally.add(b.clone());
        batches.push(b);
        if batches.len() % 100 == 0 {
            let f = tally.finish(&p.epochs());
            split += f.split_groups;
            capped += f.capped_groups;
        }
    }
    let f = tally.finish(&p.epochs());
    let epoch = p.stream(0).map_or(0, |s| s.epoch);
    (
        batches,
        epoch,
        split + f.split_groups,
        capped + f.capped_groups,
    )
}

/// `millrace plan`'s split and over-cap figures count exactly what the outside checker
/// finds, on a geometry outside the guarantee (a cap of one row and about one row of the
/// domain per step, where a group can miss a batch and the planner says so).
#[test]
fn batch_grouping_report_counts_what_the_checker_sees() {
    let (batches, _, split, capped) = spanning_run(17, 0.05, 44, 0.063, 86740085533021345, 2);
    let r = grouping_check::check(&grouping_batches(&batches), 1);
    assert!(
        !r.gaps.is_empty(),
        "this geometry is expected to split groups"
    );
    assert_eq!(
        split,
        r.gaps.len() as u64,
        "split groups: report vs checker"
    );
    assert_eq!(
        capped,
        r.over_cap.len() as u64,
        "over-cap groups: report vs checker"
    );
}

proptest! {
    #![proptest_config(pt_config(24, 0x0014_0001))]

    /// Issue 14, item 1: across three epoch ends of the grouped domain, every group is
    /// in one batch or in consecutive batches of its domain and never takes more than
    /// the cap (max_share of the global batch) in one; the mixture stays exact (each
    /// batch has exactly the mixer's rows per domain); and `millrace plan`'s figures
    /// (the report's tally) count no split and no over-cap group. The geometry keeps
    /// to what DESIGN.md guarantees: a cap of at least 2 rows and at least 3 rows of
    /// the domain per step (G >= 16, weight >= 0.1).
    #[test]
    fn batch_grouping_spans_consecutive_batches_under_the_cap(
        g in 16u32..64,
        share in prop::sample::select(vec![0.125, 0.25, 0.5, 1.0]),
        window in 2u64..80,
        weight in 0.1f64..0.9,
        seed in any::<u64>(),
    ) {
        let (batches, epoch, split, capped) = spanning_run(g, share, window, weight, seed, 3);
        let cap = ((share * g as f64).floor() as u64).max(1);
        for b in &batches {
            for (d, &n) in b.counts.iter().enumerate() {
                let got = b.rows.iter().filter(|r| r.domain as usize == d).count();
                prop_assert_eq!(got, n as usize, "step {} domain {}", b.step, d);
            }
        }
        prop_assert!(epoch >= 3, "three epoch ends in {} steps", batches.len());
        let r = grouping_check::check(&grouping_batches(&batches), cap);
        prop_assert!(r.over_cap.is_empty(), "{} over cap, first {:?}", r.over_cap.len(), r.over_cap.first());
        prop_assert!(r.gaps.is_empty(), "{} not consecutive, first {:?}", r.gaps.len(), r.gaps.first());
        prop_assert!(r.spanning > 0, "no group spanned batches");
        prop_assert_eq!((split, capped), (0, 0), "the report disagrees with the checker");
    }
}

// ---------------------------------------------------------------------------------------
// 7. Cursor
// ---------------------------------------------------------------------------------------

fn eight_domains() -> (Vec<DomSpec>, PlanConfig) {
    let mut rng = Pcg64::seed_from_u64(8);
    let cap = 33;
    let mut domains = Vec::new();
    let mut w = BTreeMap::new();
    for i in 0..8 {
        let mut s = settings([GroupMode::Off, GroupMode::Sequence, GroupMode::Batch][i % 3]);
        if i == 4 {
            s.bursty = Some(Bursty { period: 3 });
        }
        if i == 5 {
            s.upsample_long = Some(Upsample {
                min_tokens: 40,
                factor: 2,
            });
        }
        domains.push(gen_domain(&mut rng, &format!("dom{i}"), 2, 40, cap, s));
        w.insert(format!("dom{i}"), 1.0 + i as f64);
    }
    let mut cfg = base_config(cap - 1, 64, Packing::BestFit, 32);
    cfg.weights = Some(w);
    cfg.reseed = (1..=6)
        .map(|k| Reseed {
            step: 10 * k,
            seed: k,
        })
        .collect();
    cfg.skip = vec![Skip { steps: [15, 17] }];
    (domains, cfg)
}

/// Rewrites a layout 3 blob without tails as the layout 2 blob an older build wrote: the
/// same bytes less each domain's (zero) tail count, version 2, new length and checksum.
fn as_layout_2(blob: &[u8]) -> Vec<u8> {
    let u16_at = |b: &[u8], at: usize| u16::from_le_bytes([b[at], b[at + 1]]) as usize;
    assert_eq!(u16_at(blob, 8), 3, "written as layout 3");
    let mut out = blob[..58].to_vec();
    let domains = u16_at(blob, 56);
    let mut at = 58;
    for _ in 0..domains {
        let mut end = at + 70;
        for item in [16, 16, 8] {
            end += 2 + item * u16_at(blob, end);
        }
        out.extend_from_slice(&blob[at..end]);
        assert_eq!(
            u16_at(blob, end),
            0,
            "a blob with tails has no layout 2 form"
        );
        at = end + 2;
    }
    out.extend_from_slice(&blob[at..blob.len() - 8]);
    out[8..10].copy_from_slice(&2u16.to_le_bytes());
    let total = (out.len() + 8) as u32;
    out[12..16].copy_from_slice(&total.to_le_bytes());
    let sum = xxhash_rust::xxh3::xxh3_64(&out);
    out.extend_from_slice(&sum.to_le_bytes());
    out
}

/// Issue 14: layout 3 added batch grouping's tails; a layout 2 blob (no tails) still
/// decodes and resumes bit for bit where its state has none (FORMATS.md, Cursor blob).
/// Layout 2 blobs carry the legacy JSON fingerprint (issue 18), so the blob is first
/// written as the layout 3 blob of that build.
#[test]
fn cursor_layout_2_blobs_still_resume() {
    let (domains, cfg) = eight_domains();
    let plan = build(&domains, cfg);
    let mut p = plan.start();
    let (mut resumed, mut with_tails) = (0, 0);
    for _ in 0..80 {
        p.next_batch();
        let blob = p.cursor();
        let mut data = cursor::decode(&blob).unwrap();
        if data.streams.iter().any(|s| !s.tails.is_empty()) {
            with_tails += 1;
            continue;
        }
        data.fingerprint = Fingerprint::LegacyJson(plan.legacy_fingerprint());
        // Layouts before 7 name the corpus by the fingerprint alone.
        data.domains.clear();
        // Layouts before 6 carry the history up to their step only.
        data.lookahead = false;
        data.history = plan.history(data.plan_step);
        let old = as_layout_2(&cursor::encode(&data));
        assert_eq!(cursor::decode(&old).unwrap(), data);
        let mut q = plan.restore(&old).expect("a layout 2 blob resumes");
        let mut r = p.plan().restore(&blob).unwrap();
        for _ in 0..5 {
            assert_eq!(q.next_batch().rows, r.next_batch().rows);
        }
        resumed += 1;
    }
    assert!(
        resumed > 40,
        "{resumed} blobs without tails, {with_tails} with"
    );
}

/// A plan whose batch-grouped `code` domain (cap a quarter of 32 rows) leaves spanning
/// groups draining as tails, with `reseed`.
fn tails_plan(reseed: Vec<Reseed>) -> Arc<Plan> {
    let mut rng = Pcg64::seed_from_u64(14);
    let domains = spanning_corpus(&mut rng, 0.25);
    let mut cfg = base_config(16, 32, Packing::BestFit, 11);
    cfg.weights = Some(weights_map(&[("code", 0.6), ("web", 0.4)]));
    cfg.reseed = reseed;
    build(&domains, cfg)
}

/// Issue 14: a blob taken while spanning groups drain as tails (after window and epoch
/// ends) restores bit for bit: restore, seek and the uninterrupted planner agree.
#[test]
fn resume_with_batch_grouping_tails_is_bit_for_bit() {
    let plan = tails_plan(vec![Reseed { step: 40, seed: 9 }]);
    let mut p = plan.start();
    let all: Vec<GlobalBatch> = (0..310).map(|_| p.next_batch()).collect();
    let mut p = plan.start();
    let mut with_tails = 0;
    for step in 1..300usize {
        p.next_batch();
        if p.stream(0).unwrap().tails.is_empty() {
            continue;
        }
        with_tails += 1;
        if with_tails % 5 != 1 {
            continue;
        }
        let blob = p.cursor();
        let mut q = plan.restore(&blob).expect("restores");
        let mut r = plan.seek(step as u64);
        assert_eq!(r.cursor(), blob, "step {step}: seek reaches the same state");
        for want in &all[step..step + 8] {
            assert_eq!(&q.next_batch(), want, "step {step}: restore");
            assert_eq!(&r.next_batch(), want, "step {step}: seek");
        }
    }
    assert!(with_tails > 20, "{with_tails} steps with tails");
}

/// A blob is only as large as the state a real run has: tails named twice, more tails
/// than groups can span at once, tails in a domain without batch grouping, and a carried
/// error of more than a few batches are forged, and refused before any window is packed
/// for them (each tail is a window packed on resume; a large error made the mixer hand
/// out whole batches a row per scan for thousands of steps). The real blob resumes.
#[test]
fn forged_tails_and_carried_errors_are_refused() {
    let plan = tails_plan(Vec::new());
    let mut p = plan.start();
    while p.stream(0).unwrap().tails.is_empty() {
        p.next_batch();
    }
    let real = cursor::decode(&p.cursor()).unwrap();
    plan.restore(&cursor::encode(&real))
        .expect("the real blob resumes");
    let refused = |c: &CursorData| match plan.restore(&cursor::encode(c)) {
        Ok(_) => panic!("a forged blob resumed"),
        Err(e) => e.to_string(),
    };
    let mut c = real.clone();
    let tail = c.streams[0].tails[0].clone();
    c.streams[0].tails.push(tail.clone());
    assert!(
        refused(&c).contains("two tails of the window"),
        "{}",
        refused(&c)
    );
    let mut c = real.clone();
    let most = millrace::config::plan::group_spans(32, 0.25) as usize;
    for k in 0..most as u64 {
        let mut t = tail.clone();
        t.window_start += 1000 + k; // distinct windows, past any check of their own
        c.streams[0].tails.push(t);
    }
    assert!(
        refused(&c).contains("groups of this domain span"),
        "{}",
        refused(&c)
    );
    let mut c = real.clone();
    c.streams[1].tails.push(tail);
    assert!(refused(&c).contains("at most 0 groups"), "{}", refused(&c));
    let mut c = real.clone();
    c.mix.deficit[1] = -9 * 33 * TICKS; // nine batches given ahead to a plain domain
    assert_eq!(
        refused(&c),
        "cursor is malformed: domain web's mixer carried error is -297 rows, beyond the \
         132 rows a run of this plan reaches"
    );
}

#[test]
fn cursor_is_small_and_round_trips() {
    let (domains, cfg) = eight_domains();
    let plan = build(&domains, cfg);
    let mut p = plan.start();
    let mut largest = 0;
    for _ in 0..120 {
        let blob = p.cursor();
        largest = largest.max(blob.len());
        assert!(blob.len() < 4096, "blob of {} bytes", blob.len());
        let data = cursor::decode(&blob).expect("decodes");
        assert_eq!(cursor::encode(&data), blob, "encode(decode(b)) == b");
        assert_eq!(cursor::decode(&cursor::encode(&data)).unwrap(), data);
        assert_eq!(data.step, p.step());
        assert_eq!(
            data.fingerprint,
            Fingerprint::Settings(plan.settings_fingerprint())
        );
        p.next_batch();
    }
    eprintln!("largest 8-domain blob: {largest} bytes");
}

fn stream_state_strategy() -> impl Strategy<Value = StreamState> {
    let chain = prop::collection::vec(
        (any::<u64>(), any::<u64>()).prop_map(|(start, key)| Reshuffle { start, key }),
        0..4,
    );
    (
        (
            any::<u32>(),
            any::<bool>(),
            any::<u64>(),
            chain.clone(),
            any::<u64>(),
            any::<u32>(),
        ),
        (
            chain.clone(),
            prop::collection::vec((any::<u32>(), any::<u32>()), 0..5),
            any::<u32>(),
            any::<bool>(),
        ),
        (any::<u64>(), any::<u64>(), any::<u64>()),
        prop::collection::vec(
            (
                any::<u32>(),
                any::<bool>(),
                any::<u64>(),
                chain.clone(),
                any::<u64>(),
                prop::collection::vec((any::<u32>(), any::<u32>()), 0..3),
            )
                .prop_map(|t| Tail {
                    epoch: t.0,
                    grouped: t.1,
                    epoch_seed: t.2,
                    pos_chain: t.3,
                    window_start: t.4,
                    pending: t.5,
                    carry: Vec::new(),
                    upsample: Default::default(),
                }),
            0..3,
        ),
        (
            any::<u32>(),
            any::<u64>(),
            prop::collection::vec(
                (
                    any::<u32>(),
                    any::<u32>(),
                    chain.clone(),
                    prop::collection::vec((any::<u32>(), any::<u32>()), 0..3),
                )
                    .prop_map(|l| CarryLevel {
                        stage: l.0,
                        next_block: l.1,
                        block_chain: l.2,
                        pending: l.3,
                    }),
                0..3,
            ),
        ),
    )
        .prop_map(|(a, b, c, tails, stage)| StreamState {
            epoch: a.0,
            grouped: a.1,
            epoch_seed: a.2,
            pos_chain: a.3,
            window_start: a.4,
            next_block: a.5,
            block_chain: b.0,
            pending: b.1,
            reseeds: b.2,
            started: b.3,
            rows: c.0,
            tokens: c.1,
            split_groups: c.2,
            tails,
            stage: stage.0,
            dropped: stage.1,
            carry: stage.2,
            upsample: Default::default(),
        })
}

proptest! {
    #![proptest_config(pt_config(256, 0x000c_0de0))]

    /// decode(encode(x)) == x for arbitrary cursor contents.
    #[test]
    fn cursor_encode_decode_identity(
        fingerprint in any::<u128>(),
        history in any::<u64>(),
        step in any::<u64>(),
        plan_step in any::<u64>(),
        streams in prop::collection::vec((stream_state_strategy(), any::<u64>(), any::<i64>()), 0..6),
        changes in prop::collection::vec((any::<u64>(), prop::collection::vec((any::<u64>(), any::<f64>()), 1..4)), 0..4),
        superseded in prop_oneof![Just(0u64), any::<u64>()],
        legacy in any::<bool>(),
    ) {
        let n = streams.len();
        // Any bit pattern survives, NaN included: the codec stores bits, checks happen later.
        let journal: Vec<millrace::plan::Change> = changes
            .into_iter()
            .map(|(at, pts)| millrace::plan::Change {
                at,
                points: pts.into_iter().map(|(s, w)| (s, vec![w; n])).collect(),
                stage: None,
            })
            .collect();
        let mut mix = MixState::new(streams.len());
        for (d, (_, r, def)) in streams.iter().enumerate() {
            mix.rows[d] = *r;
            mix.deficit[d] = *def;
        }
        let fingerprint = if legacy {
            Fingerprint::LegacyJson(fingerprint)
        } else {
            Fingerprint::Binary(fingerprint)
        };
        let x = CursorData {
            fingerprint,
            history,
            lookahead: !legacy,
            step,
            plan_step,
            mix,
            streams: streams.into_iter().map(|s| s.0).collect(),
            domains: Vec::new(),
            journal,
            superseded,
            plan_version: 1,
        };
        let blob = cursor::encode(&x);
        let back = cursor::decode(&blob).unwrap();
        prop_assert_eq!(&cursor::encode(&back), &blob);
        prop_assert_eq!(back.journal.len(), x.journal.len());
        prop_assert_eq!(back.superseded, superseded);
        prop_assert_eq!(back.fingerprint, fingerprint);
        if !legacy {
            // Layout 6 keeps every field, stage switches' carry levels included.
            prop_assert_eq!(&back.streams, &x.streams);
        }
        // Layout 6 for the binary fingerprint; a legacy one writes the layout its builds
        // wrote (3 while nothing was superseded, else 4).
        let layout = match (legacy, superseded > 0) {
            (false, _) => 6,
            (true, true) => 4,
            (true, false) => 3,
        };
        prop_assert_eq!(blob[8], layout);
    }

    /// Arbitrary bytes never panic and are never accepted.
    #[test]
    fn cursor_arbitrary_bytes_are_refused(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
        let (domains, cfg) = eight_domains();
        let plan = build(&domains[..2], { let mut c = cfg; c.weights = Some(weights_map(&[("dom0", 1.0), ("dom1", 1.0)])); c.reseed.clear(); c.skip.clear(); c });
        prop_assert!(plan.restore(&bytes).is_err());
        let mut with_magic = cursor::MAGIC.to_vec();
        with_magic.extend_from_slice(&bytes);
        prop_assert!(plan.restore(&with_magic).is_err());
    }
}

/// Blobs with forged stream states (re-encoded, so length and checksum are right and
/// only the structural checks stand between them and the planner) never panic or hang:
/// restore refuses them, or the planner it gives keeps producing full batches.
/// (The mixer's carried error is perturbed only within a few batches' worth: a forged
/// deficit of ~2^59 ticks makes the next batch loop for ~2^35 iterations; see report.)
#[test]
fn cursor_forged_state_never_panics() {
    let sc = &scenarios()[5];
    let plan = build(&sc.domains, sc.cfg.clone());
    let g = sc.cfg.global_batch_rows;
    let mut p = plan.start();
    let mut blobs = Vec::new();
    for _ in 0..80 {
        blobs.push(p.cursor());
        p.next_batch();
    }
    let mut rng = Pcg64::seed_from_u64(77);
    let (mut accepted, mut refused) = (0, 0);
    for i in 0..1500 {
        let mut c = cursor::decode(&blobs[i % blobs.len()]).unwrap();
        let d = rng.gen_range(0..c.streams.len());
        let s = &mut c.streams[d];
        let big = |rng: &mut Pcg64| -> u64 {
            match rng.gen_range(0..4) {
                0 => 0,
                1 => rng.gen_range(0..64),
                2 => u64::MAX - rng.gen_range(0..4),
                _ => rng.gen(),
            }
        };
        for _ in 0..rng.gen_range(1..=3) {
            match rng.gen_range(0..14) {
                0 => s.epoch = big(&mut rng) as u32,
                1 => s.grouped = !s.grouped,
                2 => s.started = !s.started,
                3 => s.window_start = big(&mut rng),
                4 => s.next_block = big(&mut rng) as u32,
                5 => s.reseeds = big(&mut rng) as u32,
                6 => s.pending.push((big(&mut rng) as u32, big(&mut rng) as u32)),
                7 => {
                    if let Some(x) = s.pending.first_mut() {
                        x.1 = big(&mut rng) as u32;
                    }
                }
                8 => s.pos_chain.push(Reshuffle {
                    start: big(&mut rng),
                    key: rng.gen(),
                }),
                9 => s.block_chain.push(Reshuffle {
                    start: big(&mut rng),
                    key: rng.gen(),
                }),
                10 => s.epoch_seed = rng.gen(),
                11 => s.tails.push(Tail {
                    epoch: big(&mut rng) as u32,
                    grouped: rng.gen(),
                    epoch_seed: rng.gen(),
                    pos_chain: Vec::new(),
                    window_start: big(&mut rng),
                    pending: vec![(big(&mut rng) as u32, big(&mut rng) as u32)],
                    carry: Vec::new(),
                    upsample: Default::default(),
                }),
                12 => {
                    let t = Tail {
                        pending: vec![(0, 0)],
                        ..Tail::default()
                    };
                    s.tails.push(t);
                }
                _ => {
                    c.mix.deficit[d] += rng.gen_range(-4 * g as i64..=4 * g as i64) * TICKS / 3;
                }
            }
        }
        let b = cursor::encode(&c);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match plan.restore(&b) {
            Ok(mut q) => {
                for _ in 0..3 {
                    assert_eq!(q.next_batch().rows.len() as u32, g);
                }
                true
            }
            Err(_) => false,
        }));
        match r {
            Ok(true) => accepted += 1,
            Ok(false) => refused += 1,
            Err(_) => panic!("forged blob {i} made the planner panic: {:?}", c.streams[d]),
        }
    }
    eprintln!("forged blobs: {accepted} accepted, {refused} refused");
    assert!(refused > 0 && accepted > 0);
}

#[test]
fn cursor_every_single_byte_corruption_is_refused() {
    let (domains, cfg) = eight_domains();
    let plan = build(&domains, cfg);
    let mut p = plan.start();
    for _ in 0..37 {
        p.next_batch();
    }
    let blob = p.cursor();
    assert!(plan.restore(&blob).is_ok());
    for at in 0..blob.len() {
        for mask in [0x01u8, 0x80, 0xff, 0x5a] {
            let mut b = blob.clone();
            b[at] ^= mask;
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                plan.restore(&b).map(|_| ())
            }));
            match r {
                Ok(res) => assert!(res.is_err(), "byte {at} ^ {mask:#x} was accepted"),
                Err(_) => panic!("byte {at} ^ {mask:#x}: restore panicked"),
            }
        }
    }
    // Truncations and extensions too.
    for len in 0..blob.len() {
        assert!(plan.restore(&blob[..len]).is_err(), "truncated to {len}");
    }
    let mut longer = blob.clone();
    longer.push(0);
    assert!(plan.restore(&longer).is_err());
}

/// A named edit of a plan config.
type ConfigEdit = (&'static str, Box<dyn Fn(&mut PlanConfig)>);

fn blob_at(plan: &Arc<Plan>, step: u64) -> Vec<u8> {
    let mut p = plan.start();
    for _ in 0..step {
        p.next_batch();
    }
    p.cursor()
}

fn is_fingerprint(r: Result<millrace::plan::Planner, CursorError>) -> bool {
    matches!(r, Err(CursorError::Fingerprint { .. }))
}

/// Refused for a domain whose settings or shards changed (cursor layout 7 names the
/// corpus domain by domain).
fn is_domain_changed(r: Result<millrace::plan::Planner, CursorError>) -> bool {
    matches!(r, Err(CursorError::DomainChanged { .. }))
}

#[test]
fn cursor_refuses_other_corpora_and_configs() {
    let sc = &scenarios()[1];
    let plan = build(&sc.domains, sc.cfg.clone());
    let blob = blob_at(&plan, 25);
    assert!(plan.restore(&blob).is_ok());

    // Another shard content (the caller's identity of shard 0 of domain 0).
    let other = Arc::new(
        Plan::with_content(&inputs(&sc.domains), sc.cfg.clone(), 0xbad, &[vec![1]]).unwrap(),
    );
    assert!(is_domain_changed(other.restore(&blob)), "other content");
    // Other document lengths (one more document, or one document longer).
    let mut more = sc.domains.clone();
    more[0].shards[0].lengths.push(7);
    more[0].shards[0].runs.push(1);
    assert!(
        is_domain_changed(build(&more, sc.cfg.clone()).restore(&blob)),
        "one more document"
    );
    let mut longer = sc.domains.clone();
    longer[2].shards[0].lengths[0] += 1;
    assert!(
        is_domain_changed(build(&longer, sc.cfg.clone()).restore(&blob)),
        "a longer document"
    );
    // Another static config.
    let edits: Vec<ConfigEdit> = vec![
        ("seq_len", Box::new(|c: &mut PlanConfig| c.seq_len += 1)),
        ("seed", Box::new(|c: &mut PlanConfig| c.seed ^= 1)),
        (
            "global_batch_rows",
            Box::new(|c: &mut PlanConfig| c.global_batch_rows += 1),
        ),
        (
            "packing",
            Box::new(|c: &mut PlanConfig| c.packing = Packing::Concat),
        ),
        (
            "best_fit_window",
            Box::new(|c: &mut PlanConfig| c.best_fit_window += 1),
        ),
    ];
    for (what, edit) in edits {
        let mut cfg = sc.cfg.clone();
        edit(&mut cfg);
        assert!(
            is_fingerprint(build(&sc.domains, cfg).restore(&blob)),
            "{what}"
        );
    }
    // Other domain settings.
    let mut d = sc.domains.clone();
    d[0].settings.window = Some(3);
    assert!(
        is_domain_changed(build(&d, sc.cfg.clone()).restore(&blob)),
        "domain window"
    );
    // The errors name what happened.
    let e = other.restore(&blob).err().unwrap().to_string();
    assert!(
        e.contains("domain web: shard web/shard0 (#0) changed content"),
        "{e}"
    );
    let mut cfg = sc.cfg.clone();
    cfg.seed ^= 1;
    let e = build(&sc.domains, cfg)
        .restore(&blob)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("another corpus or plan config"), "{e}");
}

#[test]
fn cursor_history_edits_before_the_step_are_refused_after_accepted() {
    let sc = &scenarios()[5]; // schedule points 0, 50, 51; skips 5..6, 60..70; reseeds 20, 21, 90
    let plan = build(&sc.domains, sc.cfg.clone());
    let step = 40; // trainer step 40 = plan step 42
    let blob = blob_at(&plan, step);
    let plan_step = cursor::decode(&blob).unwrap().plan_step;
    assert_eq!(plan_step, 42);

    let before: Vec<ConfigEdit> = vec![
        (
            "schedule point 0 weights",
            Box::new(|c: &mut PlanConfig| {
                c.schedule[0].weights.insert("web".into(), 0.9);
            }),
        ),
        (
            "schedule point 0 moved",
            Box::new(|c: &mut PlanConfig| c.schedule[0].step = 1),
        ),
        (
            "ramp end that shapes the past",
            Box::new(|c: &mut PlanConfig| {
                c.schedule[1].weights.insert("code".into(), 0.9);
            }),
        ),
        (
            "skip before",
            Box::new(|c: &mut PlanConfig| c.skip[0].steps = [5, 7]),
        ),
        (
            "skip removed",
            Box::new(|c: &mut PlanConfig| {
                c.skip.remove(0);
            }),
        ),
        (
            "skip added",
            Box::new(|c: &mut PlanConfig| c.skip.insert(1, Skip { steps: [30, 31] })),
        ),
        (
            "reseed seed",
            Box::new(|c: &mut PlanConfig| c.reseed[0].seed = 1),
        ),
        (
            "reseed moved",
            Box::new(|c: &mut PlanConfig| c.reseed[1].step = 22),
        ),
        (
            "reseed added",
            Box::new(|c: &mut PlanConfig| c.reseed.insert(0, Reseed { step: 3, seed: 3 })),
        ),
    ];
    for (what, edit) in before {
        let mut cfg = sc.cfg.clone();
        edit(&mut cfg);
        let edited = build(&sc.domains, cfg);
        let r = edited.restore(&blob);
        assert!(
            matches!(r, Err(CursorError::History { .. })),
            "{what}: {:?}",
            r.err()
        );
    }

    let after: Vec<ConfigEdit> = vec![
        (
            "schedule point 51 weights",
            Box::new(|c: &mut PlanConfig| {
                c.schedule[2].weights.insert("web".into(), 0.9);
            }),
        ),
        (
            "schedule point added later",
            Box::new(|c: &mut PlanConfig| {
                c.schedule.push(SchedulePoint {
                    step: 200,
                    weights: weights_map(&[("web", 1.0)]),
                })
            }),
        ),
        (
            "skip after",
            Box::new(|c: &mut PlanConfig| c.skip[1].steps = [61, 75]),
        ),
        (
            "skip added after",
            Box::new(|c: &mut PlanConfig| c.skip.push(Skip { steps: [100, 101] })),
        ),
        (
            "skip added at the step",
            Box::new(|c: &mut PlanConfig| c.skip.insert(1, Skip { steps: [42, 44] })),
        ),
        (
            "reseed after",
            Box::new(|c: &mut PlanConfig| c.reseed[2].seed = 5),
        ),
        (
            "reseed added at the step",
            Box::new(|c: &mut PlanConfig| c.reseed.insert(2, Reseed { step: 42, seed: 8 })),
        ),
    ];
    for (what, edit) in after {
        let mut cfg = sc.cfg.clone();
        edit(&mut cfg);
        let edited = build(&sc.domains, cfg);
        let mut r = edited
            .restore(&blob)
            .unwrap_or_else(|e| panic!("{what}: editing the future was refused: {e}"));
        // The restored planner continues exactly as the edited plan computes it.
        let mut s = edited.seek(step);
        for _ in 0..4 {
            assert_eq!(r.next_batch(), s.next_batch(), "{what}");
        }
    }
}

/// Under constant weights, a stage switch planned later (a hold point, then the new
/// weights one step on) leaves the past alone and is accepted; a single new point
/// later turns the past into a ramp towards it and is refused.
#[test]
fn cursor_history_future_stage_switch() {
    let sc = &scenarios()[0];
    let plan = build(&sc.domains, sc.cfg.clone());
    let blob = blob_at(&plan, 40);
    let old = sc.cfg.weights.clone().unwrap();
    let new = weights_map(&[("web", 0.2), ("code", 0.2), ("wiki", 0.6)]);
    let mut switch = sc.cfg.clone();
    switch.weights = None;
    switch.schedule = vec![
        SchedulePoint {
            step: 0,
            weights: old.clone(),
        },
        SchedulePoint {
            step: 99,
            weights: old.clone(),
        },
        SchedulePoint {
            step: 100,
            weights: new.clone(),
        },
    ];
    let edited = build(&sc.domains, switch);
    let mut r = edited
        .restore(&blob)
        .expect("a future stage switch is accepted");
    let mut s = edited.seek(40);
    for _ in 0..70 {
        assert_eq!(r.next_batch(), s.next_batch());
    }
    let mut ramp = sc.cfg.clone();
    ramp.weights = None;
    ramp.schedule = vec![
        SchedulePoint {
            step: 0,
            weights: old,
        },
        SchedulePoint {
            step: 100,
            weights: new,
        },
    ];
    let r = build(&sc.domains, ramp).restore(&blob);
    assert!(
        matches!(r, Err(CursorError::History { .. })),
        "a ramp reaching into the past was accepted"
    );
}

/// Two ungrouped domains `a` and `b` of 60 random documents each, from `seed`.
fn ab_domains(seed: u64) -> Vec<DomSpec> {
    let mut rng = Pcg64::seed_from_u64(seed);
    vec![
        gen_domain(&mut rng, "a", 1, 60, 33, settings(GroupMode::Off)),
        gen_domain(&mut rng, "b", 1, 60, 33, settings(GroupMode::Off)),
    ]
}

/// A schedule point of [`ab_domains`]: weights `a` and `b` at `step`.
fn ab_point(step: u64, a: f64, b: f64) -> SchedulePoint {
    SchedulePoint {
        step,
        weights: weights_map(&[("a", a), ("b", b)]),
    }
}

/// Editing a ramp's far end point can leave the share at the blob's last step
/// unchanged and still change every step before it; such an edit must be refused.
#[test]
fn cursor_history_catches_a_reparametrized_ramp() {
    let (domains, point) = (ab_domains(4), ab_point);
    let mut cfg = base_config(32, 4, Packing::BestFit, 16);
    cfg.schedule = vec![point(0, 1.0, 0.0), point(98, 0.0, 1.0)];
    // Same shares at step 49 (0.5, 0.5) and at 0, different shares at every other step
    // of the ramp: a:b at step 49 is (1 - 49/196) : 3 * 49/196 = 0.75 : 0.75.
    let mut edited = cfg.clone();
    edited.schedule = vec![point(0, 1.0, 0.0), point(196, 0.0, 3.0)];
    let plan = build(&domains, cfg);
    let other = build(&domains, edited);
    assert_eq!(
        plan.mixer().schedule.shares(49),
        other.mixer().schedule.shares(49)
    );
    assert_ne!(
        plan.mixer().schedule.shares(25),
        other.mixer().schedule.shares(25)
    );
    let blob = blob_at(&plan, 50);
    let r = other.restore(&blob);
    assert!(
        matches!(r, Err(CursorError::History { .. })),
        "a different past was accepted"
    );
}

/// Regression: a file reload that added a point on the line already in force (step 5,
/// same weights) with a step change at 30 applied from 30, and a daemon restarted with
/// that file then refused every blob after step 5. `Plan::restart_knot` finds that
/// knot (the reload now warns with it), and agrees with what a restart accepts.
#[test]
fn restart_knot_names_the_point_that_a_restarted_daemon_refuses_blobs_over() {
    let (domains, point) = (ab_domains(5), ab_point);
    let mut cfg = base_config(32, 4, Packing::BestFit, 16);
    cfg.schedule = vec![point(0, 1.0, 1.0)];
    let running = build(&domains, cfg.clone());
    let step_change = vec![point(0, 1.0, 1.0), point(29, 1.0, 1.0), point(30, 3.0, 1.0)];
    let on_the_line = [&step_change[..1], &[point(5, 1.0, 1.0)], &step_change[1..]].concat();
    for (file, knot) in [(step_change, None), (on_the_line, Some(5))] {
        let change = running.schedule_change(30, &file);
        let in_force = Arc::new(running.with_journal(vec![change.clone()]).unwrap());
        assert_eq!(in_force.restart_knot(&file), knot);
        // The file before the edit restarts well too: blobs bring the change.
        assert_eq!(in_force.restart_knot(&file[..1]), None);
        let mut edited = cfg.clone();
        edited.schedule = file.clone();
        let restarted = Arc::new(build(&domains, edited).with_journal(vec![change]).unwrap());
        let r = restarted.restore(&blob_at(&in_force, 40));
        match knot {
            None => assert!(r.is_ok(), "{:?}", r.err()),
            Some(_) => assert!(matches!(r, Err(CursorError::History { .. })), "accepted"),
        }
    }
}

/// Regression: a domain of one large group (a book of 20,000 short documents) read
/// 1.0 epochs after its first row in `plan`, `explain` and `status`: progress counted
/// the window's blocks handed out, and the group is one block of hundreds of rows. It
/// now counts rows, so it follows the tokens delivered.
#[test]
fn epoch_progress_of_one_large_group_follows_its_rows() {
    let grouped = DomSpec {
        name: "book".into(),
        shards: vec![ShardSpec::new(vec![3; 20_000], &[20_000])],
        settings: settings(GroupMode::Sequence),
    };
    let total = grouped.tokens() as f64;
    let mut cfg = base_config(32, 4, Packing::BestFit, 16);
    cfg.weights = Some(weights_map(&[("book", 1.0)]));
    let plan = build(&[grouped], cfg);
    let mut p = plan.start();
    let mut delivered = 0u64;
    for step in 1..=40 {
        let b = p.next_batch();
        delivered += b.rows.iter().map(|r| u64::from(r.tokens)).sum::<u64>();
        let (reported, real) = (p.epochs()[0], delivered as f64 / total);
        assert!(
            (reported - real).abs() < 0.01,
            "step {step}: {reported} epochs reported, {real} delivered"
        );
    }
}

/// Regression: progress within a window summed the first blocks in packing order, but
/// blocks go out in a shuffled order. With one large group packed first and many
/// one-row blocks after it, the first steps read most of the epoch as taken. It now
/// sums the blocks actually handed out.
#[test]
fn epoch_progress_counts_the_blocks_handed_out_not_the_first_packed() {
    // One group of 6,000 documents (750 rows) and 1,999 one-document groups (one row
    // each), all in one window, so within-window progress is the epoch's.
    let grouped = DomSpec {
        name: "mixed".into(),
        shards: vec![ShardSpec::new(vec![4; 7_999], &[6_000])],
        settings: settings(GroupMode::Sequence),
    };
    let total = grouped.tokens() as f64;
    let mut cfg = base_config(32, 4, Packing::BestFit, 4096);
    cfg.weights = Some(weights_map(&[("mixed", 1.0)]));
    let plan = build(&[grouped], cfg);
    let mut p = plan.start();
    let mut delivered = 0u64;
    for step in 1..=300 {
        let b = p.next_batch();
        delivered += b.rows.iter().map(|r| u64::from(r.tokens)).sum::<u64>();
        let (reported, real) = (p.epochs()[0], delivered as f64 / total);
        assert!(
            (reported - real).abs() < 0.02,
            "step {step}: {reported} epochs reported, {real} delivered"
        );
    }
}

/// Regression: `plan --steps N` kept every piece it had seen and every batch of its
/// window (8.5 GB at 50,000 steps of 256 rows). Over 400 epochs of a small domain the
/// duplicate check now holds the pieces of the epochs in flight only, and still finds
/// none, as an unbounded check did.
#[test]
fn the_report_forgets_the_pieces_of_epochs_that_are_over() {
    let small = DomSpec {
        name: "small".into(),
        shards: vec![ShardSpec::new(vec![20; 40], &[1])],
        settings: DomainSettings::default(),
    };
    let mut cfg = base_config(32, 4, Packing::BestFit, 8);
    cfg.weights = Some(weights_map(&[("small", 1.0)]));
    let plan = build(&[small], cfg);
    let mut p = plan.start();
    let mut tally = Tally::new(&plan);
    let mut most = 0;
    for _ in 0..4000 {
        tally.add(p.next_batch());
        most = most.max(tally.pieces_tracked());
    }
    assert!(p.epochs()[0] >= 399.0, "{:?}", p.epochs());
    // 40 documents an epoch: a few hundred epochs' worth at most (EPOCH_OVER batches of
    // 4 rows reach about 130 epochs back), never all 16,000.
    assert!(most < 40 * 300, "{most} pieces held");
    assert_eq!(tally.finish(&p.epochs()).duplicates, 0);
}

/// A review found that a bursty domain breaks batch grouping's consecutive batches for
/// its neighbours (81 split groups in 100 steps, none without it): the planner bounds
/// spanning groups by steady rows. Until it handles cycles, `plan`, `check-config` and
/// a start warn, naming both domains; without the bursty one they do not.
#[test]
fn a_bursty_domain_beside_batch_groups_is_warned_about() {
    let mut rng = Pcg64::seed_from_u64(9);
    let mut wiki = settings(GroupMode::Off);
    wiki.bursty = Some(Bursty { period: 3 });
    for bursty in [true, false] {
        let domains = vec![
            gen_domain(&mut rng, "code", 2, 50, 33, settings(GroupMode::Batch)),
            gen_domain(
                &mut rng,
                "wiki",
                1,
                40,
                33,
                if bursty {
                    wiki
                } else {
                    settings(GroupMode::Off)
                },
            ),
        ];
        let mut cfg = base_config(32, 16, Packing::BestFit, 16);
        cfg.weights = Some(weights_map(&[("code", 0.7), ("wiki", 0.3)]));
        let warned = build(&domains, cfg).warnings().into_iter().any(|w| {
            w.starts_with("bursty domain(s) wiki") && w.contains("batch-grouped domain(s) code")
        });
        assert_eq!(warned, bursty);
    }
}

/// A review found that while weights change inside a bursty cycle (a ramp), the other
/// domains drift from their targets for good (85 rows over a 400-step ramp at 1024 rows,
/// period 10): they carry their error against the rows the bursts leave. Until the
/// planner carries it against the target (a planner version), a bursty domain in a
/// schedule whose weights change is warned about; with constant weights it is not.
#[test]
fn a_bursty_domain_in_a_changing_schedule_is_warned_about() {
    let mut rng = Pcg64::seed_from_u64(10);
    let mut wiki = settings(GroupMode::Off);
    wiki.bursty = Some(Bursty { period: 4 });
    let domains = vec![
        gen_domain(&mut rng, "web", 2, 50, 33, settings(GroupMode::Off)),
        gen_domain(&mut rng, "wiki", 1, 40, 33, wiki),
    ];
    // A second point that only rescales the weights (9 to 1 either way) changes nothing.
    for ramp in [true, false] {
        let mut cfg = base_config(32, 16, Packing::BestFit, 16);
        let last = if ramp { [0.6, 0.4] } else { [9.0, 1.0] };
        cfg.schedule = vec![
            SchedulePoint {
                step: 0,
                weights: weights_map(&[("web", 0.9), ("wiki", 0.1)]),
            },
            SchedulePoint {
                step: 100,
                weights: weights_map(&[("web", last[0]), ("wiki", last[1])]),
            },
        ];
        let warned = build(&domains, cfg)
            .warnings()
            .into_iter()
            .any(|w| w.starts_with("bursty domain(s) wiki beside a schedule whose weights change"));
        assert_eq!(warned, ramp);
    }
}

// ---------------------------------------------------------------------------------------
// 8. Config validation
// ---------------------------------------------------------------------------------------

fn two_domains() -> Vec<DomSpec> {
    vec![
        DomSpec {
            name: "web".into(),
            shards: vec![ShardSpec::new(vec![10, 20, 30], &[1, 2])],
            settings: DomainSettings::default(),
        },
        DomSpec {
            name: "code".into(),
            shards: vec![ShardSpec::new(vec![40, 5], &[2])],
            settings: DomainSettings::default(),
        },
    ]
}

fn plan_error(toml_text: &str, domains: &[DomSpec]) -> String {
    let table: toml::Table = toml::from_str(toml_text).expect("test TOML parses");
    let cfg = match PlanConfig::from_table(&table) {
        Ok(c) => c,
        Err(e) => return format!("parse|{}|{e}", e.field),
    };
    match Plan::new(&inputs(domains), cfg, 1) {
        Ok(_) => "ok".into(),
        Err(PlanError::Setting(e)) => format!("setting|{}|{e}", e.field),
        Err(e) => format!("domain|{e}"),
    }
}

#[test]
fn config_errors_name_the_field() {
    let head = "seq_len = 64\nglobal_batch_rows = 8\n";
    let d = two_domains();
    let cases: Vec<(String, &str)> = vec![
        (format!("{head}weights = {{ web = -1.0, code = 1.0 }}"), "setting|plan.weights.web|"),
        (format!("{head}weights = {{ web = nan, code = 1.0 }}"), "setting|plan.weights.web|"),
        (format!("{head}weights = {{ web = inf, code = 1.0 }}"), "setting|plan.weights.web|"),
        (format!("{head}weights = {{ web = 1.0, nosuch = 1.0 }}"), "setting|plan.weights.nosuch|"),
        (format!("{head}weights = {{ web = 0.0, code = 0.0 }}"), "setting|plan.weights|"),
        (format!("{head}weights = {{}}"), "setting|plan.weights|"),
        ("seq_len = 0\nglobal_batch_rows = 8\nweights = { web = 1.0 }".into(), "setting|plan.seq_len|"),
        ("seq_len = 20000000\nglobal_batch_rows = 8\nweights = { web = 1.0 }".into(), "setting|plan.seq_len|"),
        ("seq_len = 64\nglobal_batch_rows = 0\nweights = { web = 1.0 }".into(), "setting|plan.global_batch_rows|"),
        (format!("{head}best_fit_window = 0\nweights = {{ web = 1.0 }}"), "setting|plan.best_fit_window|"),
        (head.to_string(), "setting|plan.schedule|"),
        (
            format!("{head}weights = {{ web = 1.0 }}\n[[schedule]]\nstep = 0\nweights = {{ web = 1.0 }}"),
            "setting|plan.weights|",
        ),
        (
            format!("{head}[[schedule]]\nstep = 10\nweights = {{ web = 1.0 }}\n[[schedule]]\nstep = 10\nweights = {{ code = 1.0 }}"),
            "setting|plan.schedule[1].step|",
        ),
        (
            format!("{head}[[schedule]]\nstep = 10\nweights = {{ web = 1.0 }}\n[[schedule]]\nstep = 5\nweights = {{ code = 1.0 }}"),
            "setting|plan.schedule[1].step|",
        ),
        (
            format!("{head}[[schedule]]\nstep = 0\nweights = {{ web = 1.0 }}\n[[schedule]]\nstep = 5\nweights = {{ code = -2.0 }}"),
            "setting|plan.schedule[1].weights.code|",
        ),
        (
            format!("{head}[[schedule]]\nstep = 0\nweights = {{ web = 1.0 }}\n[[schedule]]\nstep = 5\nweights = {{ typo = 2.0 }}"),
            "setting|plan.schedule[1].weights.typo|",
        ),
        (
            format!("{head}weights = {{ web = 1.0 }}\n[[skip]]\nsteps = [9, 3]"),
            "setting|plan.skip[0].steps|",
        ),
        (
            format!("{head}weights = {{ web = 1.0 }}\n[[skip]]\nsteps = [1, 5]\n[[skip]]\nsteps = [5, 8]"),
            "setting|plan.skip[1].steps|",
        ),
        (
            format!("{head}weights = {{ web = 1.0 }}\n[[reseed]]\nstep = 5\nseed = 1\n[[reseed]]\nstep = 5\nseed = 2"),
            "setting|plan.reseed[1].step|",
        ),
        (format!("{head}weights = {{ web = 1.0 }}\nsequence_length = 3"), "parse|plan|"),
        (format!("{head}weights = {{ web = 1.0 }}\npacking = \"greedy\""), "parse|plan|"),
    ];
    for (text, want) in cases {
        let got = plan_error(&text, &d);
        assert!(
            got.starts_with(want),
            "config\n{text}\ngave {got:?}, want prefix {want:?}"
        );
        // The message itself names the field too.
        if let Some(field) = want.split('|').nth(1) {
            assert!(got.split('|').nth(2).unwrap_or("").contains(field), "{got}");
        }
    }
    // The unknown key is named in the message.
    let got = plan_error(
        &format!("{head}weights = {{ web = 1.0 }}\nsequence_length = 3"),
        &d,
    );
    assert!(got.contains("sequence_length"), "{got}");

    // Per-domain settings.
    let ok = format!("{head}weights = {{ web = 1.0, code = 1.0 }}");
    let with = |f: &dyn Fn(&mut DomainSettings)| {
        let mut d = two_domains();
        f(&mut d[1].settings);
        d
    };
    let domain_cases: Vec<(Vec<DomSpec>, String, &str)> = vec![
        (
            with(&|s| s.grouping.mode = GroupMode::Batch),
            format!("{ok}\npacking = \"concat\""),
            "setting|corpus.domain[1].grouping.mode|",
        ),
        (
            with(&|s| s.grouping.max_share = 0.0),
            ok.clone(),
            "setting|corpus.domain[1].grouping.max_share|",
        ),
        (
            with(&|s| s.grouping.max_share = 1.5),
            ok.clone(),
            "setting|corpus.domain[1].grouping.max_share|",
        ),
        (
            with(&|s| {
                s.upsample_long = Some(Upsample {
                    min_tokens: 5,
                    factor: 1,
                })
            }),
            ok.clone(),
            "setting|corpus.domain[1].upsample_long.factor|",
        ),
        (
            with(&|s| s.bursty = Some(Bursty { period: 1 })),
            ok.clone(),
            "setting|corpus.domain[1].bursty.period|",
        ),
        (
            with(&|s| s.window = Some(0)),
            ok.clone(),
            "setting|corpus.domain[1].window|",
        ),
    ];
    for (domains, text, want) in domain_cases {
        let got = plan_error(&text, &domains);
        assert!(got.starts_with(want), "gave {got:?}, want {want:?}");
    }
    // Batch grouping with best_fit is fine.
    assert_eq!(
        plan_error(&ok, &with(&|s| s.grouping.mode = GroupMode::Batch)),
        "ok"
    );
    // A weighted domain without tokens, and grouping without a sidecar, name the domain.
    let mut empty = two_domains();
    empty[1].shards = vec![ShardSpec::new(vec![0, 0], &[2])];
    let got = plan_error(&ok, &empty);
    assert!(got.starts_with("domain|") && got.contains("code"), "{got}");
    let mut no_groups = inputs(&with(&|s| s.grouping.mode = GroupMode::Sequence));
    no_groups[1].shards[0].1 = Arc::new(MemShard {
        lengths: vec![4, 5],
        groups: None,
    });
    let cfg = PlanConfig::from_table(&toml::from_str(&ok).unwrap()).unwrap();
    match Plan::new(&no_groups, cfg, 1) {
        Err(PlanError::NoSidecar { domain, shard, .. }) => {
            assert_eq!((domain.as_str(), shard.as_str()), ("code", "code/shard0"))
        }
        other => panic!("grouping without groups: {:?}", other.err()),
    }
}

// ---------------------------------------------------------------------------------------
// 9. Determinism
// ---------------------------------------------------------------------------------------

#[test]
fn determinism_independent_builds_and_threads_agree() {
    for sc in scenarios() {
        let reference = run_batches(&build(&sc.domains, sc.cfg.clone()), 60);
        // A second build from freshly cloned inputs, with other shard display names and
        // another manifest: identical batches (only provenance names and the fingerprint
        // may differ).
        let mut renamed = inputs(&sc.domains.clone());
        for d in &mut renamed {
            for (name, _) in &mut d.shards {
                *name = format!("/elsewhere/{name}");
            }
        }
        let plan2 = Arc::new(Plan::new(&renamed, sc.cfg.clone(), 0xfeed).unwrap());
        assert_eq!(run_batches(&plan2, 60), reference, "{}", sc.name);
        // Four threads planning the same steps at once agree with it.
        let plan3 = build(&sc.domains, sc.cfg.clone());
        std::thread::scope(|s| {
            let hs: Vec<_> = (0..4)
                .map(|k| {
                    let plan3 = plan3.clone();
                    s.spawn(move || {
                        let mut p = plan3.seek(10 * k);
                        (10 * k, (0..20).map(|_| p.next_batch()).collect::<Vec<_>>())
                    })
                })
                .collect();
            for h in hs {
                let (from, got) = h.join().unwrap();
                assert_eq!(
                    got[..],
                    reference[from as usize..from as usize + 20],
                    "{}",
                    sc.name
                );
            }
        });
    }
}

#[test]
fn determinism_seed_changes_the_order_not_the_mixture() {
    let sc = &scenarios()[0];
    let a = run_batches(&build(&sc.domains, sc.cfg.clone()), 20);
    let mut cfg = sc.cfg.clone();
    cfg.seed = 1234;
    let b = run_batches(&build(&sc.domains, cfg), 20);
    assert_ne!(a, b);
    // Row counts depend on fill, which is estimated from a seed-dependent window, so
    // only the batch size is seed-independent.
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x.rows.len(), y.rows.len());
    }
}

/// A SplitMix64 stream: the golden scenarios' corpora come from this alone, so no
/// dependency's generator (rand's `gen_range` changed between releases) can move them.
struct Mix64(u64);

impl Mix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A value in `lo..hi`.
    fn below(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo)
    }

    /// `docs` document lengths around a row of `cap` tokens (empty, exactly full, one
    /// over, up to four rows long) in group runs of 1 to 6 documents.
    fn shard(&mut self, docs: usize, cap: u64) -> ShardSpec {
        let lengths = (0..docs)
            .map(|_| match self.below(0, 20) {
                0 => 0,
                1 => cap - 1,
                2 => cap,
                3 => cap + 1,
                4..=7 => self.below(cap + 1, 4 * cap),
                _ => self.below(1, cap),
            } as u32)
            .collect();
        let sizes: Vec<u64> = (0..docs).map(|_| self.below(1, 7)).collect();
        ShardSpec::new(lengths, &sizes)
    }

    fn domain(
        &mut self,
        name: &str,
        shards: usize,
        docs: usize,
        settings: DomainSettings,
    ) -> DomSpec {
        DomSpec {
            name: name.to_string(),
            shards: (0..shards).map(|_| self.shard(docs, 41)).collect(),
            settings,
        }
    }
}

/// The plans whose batches pin the planner's version: every packing and grouping mode,
/// bursty domains, upsampling, a schedule with a ramp and a zero weight, skips,
/// reseeds, a `[[plan.stage]]` with chained groups and an upsampling override, and a
/// journal of a weights change and a stage added live.
fn golden_plans() -> Vec<(&'static str, Arc<Plan>)> {
    let mut g = Mix64(2026);
    let seq = 40;
    let up = |min_tokens, factor| Some(Upsample { min_tokens, factor });
    let mut out = Vec::new();
    // best_fit: off, sequence (windowed, bursty), batch (capped, upsampled, late).
    let mut code = settings(GroupMode::Batch);
    code.grouping.max_share = 0.125;
    code.grouping.from_step = 15;
    code.upsample_long = up(80, 2);
    let mut books = settings(GroupMode::Sequence);
    books.bursty = Some(Bursty { period: 2 });
    books.window = Some(4);
    let mut wiki = settings(GroupMode::Off);
    wiki.bursty = Some(Bursty { period: 3 });
    let mixed = vec![
        g.domain("web", 2, 60, settings(GroupMode::Off)),
        g.domain("code", 2, 50, code),
        g.domain("books", 1, 40, books),
        g.domain("wiki", 1, 30, wiki),
    ];
    let mut cfg = base_config(seq, 24, Packing::BestFit, 20);
    cfg.seed = 13;
    let w = |web, code, books, wiki| {
        weights_map(&[
            ("web", web),
            ("code", code),
            ("books", books),
            ("wiki", wiki),
        ])
    };
    cfg.schedule = vec![
        SchedulePoint {
            step: 0,
            weights: w(0.5, 0.2, 0.2, 0.1),
        },
        SchedulePoint {
            step: 30,
            weights: w(0.5, 0.5, 0.0, 0.1),
        },
        SchedulePoint {
            step: 45,
            weights: w(0.3, 0.3, 0.3, 0.1),
        },
    ];
    cfg.skip = vec![Skip { steps: [5, 6] }, Skip { steps: [60, 64] }];
    cfg.reseed = vec![Reseed { step: 20, seed: 77 }, Reseed { step: 90, seed: 79 }];
    out.push(("best_fit/mixed", build(&mixed, cfg.clone())));
    // concat: sequence (bursty) and off (upsampled), a skip and a reseed.
    let mut seqd = settings(GroupMode::Sequence);
    seqd.bursty = Some(Bursty { period: 4 });
    let mut web = settings(GroupMode::Off);
    web.upsample_long = up(60, 3);
    let concat = vec![g.domain("web", 2, 50, web), g.domain("books", 2, 40, seqd)];
    let mut c2 = base_config(seq, 16, Packing::Concat, 16);
    c2.weights = Some(weights_map(&[("web", 0.7), ("books", 0.3)]));
    c2.skip = vec![Skip { steps: [0, 2] }];
    c2.reseed = vec![Reseed { step: 50, seed: 9 }];
    out.push(("concat/sequence+off", build(&concat, c2)));
    // The mixed plan with a long stage at 40 and, live, a weights change at 70 and a
    // stage at 100.
    cfg.stage = vec![millrace::config::plan::Stage {
        step: 40,
        seq_len: 4 * seq,
        global_batch_rows: 6,
        best_fit_window: Some(8),
        chain_groups: true,
        upsample_long: BTreeMap::from([(
            "books".to_string(),
            millrace::config::plan::StageUpsample::Long(Upsample {
                min_tokens: 100,
                factor: 2,
            }),
        )]),
    }];
    let staged = build(&mixed, cfg);
    out.push(("best_fit/mixed+stage", staged.clone()));
    let change = staged
        .weights_change(70, &BTreeMap::from([("wiki".to_string(), 0.4)]))
        .unwrap();
    let stage = staged.stage_change(100, 2 * seq, 12, None, false);
    let live = Arc::new(staged.with_journal(vec![change, stage]).unwrap());
    out.push(("best_fit/mixed+stage+journal", live));
    out
}

/// The batches of `steps` steps of `plan`, in a canonical little-endian encoding, hashed.
fn batches_digest(plan: &Arc<Plan>, steps: u64) -> u64 {
    let mut b = Vec::new();
    let mut put = |v: u64| b.extend_from_slice(&v.to_le_bytes());
    for batch in run_batches(plan, steps) {
        put(batch.step);
        put(batch.plan_step);
        put(batch.rows.len() as u64);
        for row in &batch.rows {
            put(u64::from(row.domain));
            put(u64::from(row.epoch));
            put(u64::from(row.tokens));
            put(row.segments.len() as u64);
            for s in &row.segments {
                put(u64::from(s.shard));
                put(s.doc);
                put(s.start);
                put(u64::from(s.len));
                put(s.doc_len);
                put(s.group.map_or(u64::MAX, |g| g));
            }
        }
    }
    xxhash_rust::xxh3::xxh3_64(&b)
}

/// The planner's version pins its output (src/plan/mod.rs, `PLAN_VERSION`): the
/// batches of the golden plans, over 150 steps each, hash to the values recorded for
/// this version. The values were computed by this planner and recorded, not derived by
/// hand: what the test checks is that they do not move. When a change to the planner
/// moves one, every checkpoint of every run would resume onto other data; raise
/// `PLAN_VERSION` (blobs and plan checkpoints of the old version are then refused, not
/// reinterpreted) and record the new values with the version. A change that moves none
/// keeps the version: the same inputs give the same batches.
#[test]
fn determinism_planner_version_pins_every_scenario() {
    const PINNED: &[(u32, &str, u64)] = &[
        (1, "best_fit/mixed", 0xe23e63fae5b36131),
        (1, "concat/sequence+off", 0x929efa53d6c33e1c),
        (1, "best_fit/mixed+stage", 0x92148ea0d9dcb1ce),
        (1, "best_fit/mixed+stage+journal", 0xa0128c99a82441b4),
    ];
    let version = millrace::plan::PLAN_VERSION;
    let mut moved = Vec::new();
    for (name, plan) in golden_plans() {
        // What the plan exercises in those steps: later epochs of every domain (each
        // reshuffled), groups, and each stage's shape from its step on.
        let batches = run_batches(&plan, 150);
        let rows = |b: &GlobalBatch| b.rows.len();
        for d in 0..plan.domain_names().len() as u16 {
            let epochs = batches
                .iter()
                .flat_map(|b| &b.rows)
                .filter(|r| r.domain == d);
            assert!(
                epochs.map(|r| r.epoch).max() >= Some(1),
                "{name}: domain {d}"
            );
        }
        let grouped = batches
            .iter()
            .flat_map(|b| &b.rows)
            .flat_map(|r| &r.segments);
        assert!(
            grouped.filter(|s| s.group.is_some()).count() > 100,
            "{name}"
        );
        if name.contains("stage") {
            let at = |p: u64| batches.iter().find(|b| b.plan_step >= p).map(rows);
            assert_eq!((at(0), at(40)), (Some(24), Some(6)), "{name}");
        }
        if name.contains("journal") {
            let last = batches.last().map(|b| (b.plan_step, b.rows.len()));
            assert!(
                matches!(last, Some((p, 12)) if p >= 100),
                "{name}: {last:?}"
            );
        }
        let got = batches_digest(&plan, 150);
        let want = PINNED.iter().find(|p| p.0 == version && p.1 == name);
        if want.map(|p| p.2) != Some(got) {
            moved.push(format!("(version {version}, {name:?}, {got:#018x})"));
        }
    }
    assert!(
        moved.is_empty(),
        "the planner's batches differ from those pinned for PLAN_VERSION {version}: {}. \
         If the planner changed on purpose, raise PLAN_VERSION in src/plan/mod.rs and pin \
         these values for the new version (docs/DESIGN.md, \"Planner versions\")",
        moved.join(", ")
    );
}

/// Batch grouping with small caps lets many groups span batches at once, and each is
/// state in every cursor blob. Over random configs (caps down to one row, bursty
/// domains, swinging schedules, stages of other batch sizes) the groups spanning at
/// once stay within `group_spans`, the blob within `Plan::cursor_bound` (what the daemon
/// sizes each slot's cursor field from), and the last blob resumes the same stream.
#[test]
fn grouping_spans_and_blob_stay_within_their_bounds() {
    use millrace::config::plan::{group_spans, Stage};
    let mut closest = 0.0f64;
    for seed in 0..120u64 {
        let mut rng = Pcg64::seed_from_u64(seed);
        let g: u32 = [8, 16, 64, 256, 1024][rng.gen_range(0..5)];
        let share: f64 = [1.0, 0.5, 0.1, 0.03, 0.01, 0.002, 0.0005][rng.gen_range(0..7)];
        let mut code = settings(GroupMode::Batch);
        code.grouping.max_share = share;
        if rng.gen_range(0..3) == 0 {
            code.bursty = Some(Bursty {
                period: rng.gen_range(2..6),
            });
        }
        // Groups of up to `most` documents of 1..40 tokens: many rows each.
        let most = rng.gen_range(1..400u64);
        let n = 6000;
        let lengths: Vec<u32> = (0..n).map(|_| rng.gen_range(1..40)).collect();
        let sizes: Vec<u64> = (0..n).map(|_| rng.gen_range(1..=most)).collect();
        let code = DomSpec {
            name: "code".into(),
            shards: vec![ShardSpec::new(lengths, &sizes)],
            settings: code,
        };
        let web = gen_domain(&mut rng, "web", 1, 200, 17, settings(GroupMode::Off));
        let mut cfg = base_config(16, g, Packing::BestFit, rng.gen_range(1..600));
        let w = rng.gen_range(0.05..1.0);
        let point = |step: u64, code: f64| SchedulePoint {
            step,
            weights: weights_map(&[("code", code), ("web", 1.0 - code)]),
        };
        cfg.schedule = vec![point(0, w), point(30, 1.0), point(60, 0.05), point(90, 1.0)];
        if rng.gen_range(0..2) == 0 {
            cfg.stage.push(Stage {
                step: rng.gen_range(20..100),
                seq_len: 32,
                global_batch_rows: [g / 4, g * 2][rng.gen_range(0..2)].max(1),
                best_fit_window: None,
                chain_groups: false,
                upsample_long: BTreeMap::new(),
            });
        }
        if rng.gen_range(0..2) == 0 {
            cfg.reseed = vec![Reseed { step: 45, seed: 3 }];
        }
        let plan = build(&[code, web], cfg);
        let spans_bound = (plan.stages().iter())
            .map(|st| group_spans(st.rows, share))
            .max()
            .unwrap() as usize;
        let bytes_bound = plan.cursor_bound(plan.stages());
        let mut p = plan.start();
        for _ in 0..150 {
            p.next_batch();
            let st = p.stream(0).unwrap();
            let lists = st.tails.iter().map(|t| &t.pending).chain([&st.pending]);
            let spans = lists.flatten().filter(|b| b.1 > 0).count();
            assert!(
                spans <= spans_bound,
                "seed {seed}: {spans} groups span at step {}, bound {spans_bound}",
                p.step()
            );
            let blob = p.cursor();
            assert!(
                blob.len() <= bytes_bound,
                "seed {seed}: blob of {} bytes at step {}, bound {bytes_bound}",
                blob.len(),
                p.step()
            );
            closest = closest.max(spans as f64 / spans_bound as f64);
        }
        let blob = p.cursor();
        let mut back = plan.restore(&blob).expect("the blob resumes");
        for _ in 0..5 {
            assert_eq!(back.next_batch(), p.next_batch(), "seed {seed}");
        }
    }
    // The bound is reached, not only respected.
    assert!(
        closest > 0.9,
        "groups spanning at once reached {closest} of the bound"
    );
}

/// `group_spans` is not monotone in the rows (its cap is a floor: 24 groups at 256 rows
/// and 0.05, 23 at 1024), so the cursor field is sized with `group_spans_upto`, which
/// bounds it at every batch of at most so many rows; a live stage of fewer rows then
/// never needs more room than the field has.
#[test]
fn group_spans_upto_bounds_every_smaller_batch() {
    use millrace::config::plan::{group_spans, group_spans_upto};
    assert!(group_spans(256, 0.05) > group_spans(1024, 0.05));
    for share in [1.0, 0.5, 0.3, 0.1, 0.05, 0.013, 0.001, 0.0002] {
        let mut most = 0;
        for rows in 1..=5000u32 {
            most = most.max(group_spans(rows, share));
            let upto = group_spans_upto(rows, share);
            assert!(most <= upto, "share {share}, rows {rows}: {most} > {upto}");
        }
    }
}

/// A batch-grouped domain whose cap is so small that more groups could span batches
/// at once than a cursor blob lists is refused at load, naming the field, the stage's
/// batch and the share that would do, and so is a live stage that would get there.
#[test]
fn grouping_too_fine_for_a_blob_is_refused() {
    let mut code = settings(GroupMode::Batch);
    code.grouping.max_share = 1.0 / 8192.0;
    let domains = vec![DomSpec {
        name: "code".into(),
        shards: vec![ShardSpec::new(vec![30; 100], &[10; 10])],
        settings: code,
    }];
    let mut cfg = base_config(16, 8192, Packing::BestFit, 16);
    cfg.weights = Some(weights_map(&[("code", 1.0)]));
    let msg = build_error(&domains, &cfg, "a cap of 1 row in 8192");
    assert!(
        msg.contains("corpus.domain[0].grouping.max_share")
            && msg.contains("8192-row batch")
            && msg.contains("raise max_share to at least"),
        "{msg}"
    );
    // At 4000 rows the same share is within bounds; a live stage of 8192 is not.
    cfg.global_batch_rows = 4000;
    let plan = Arc::new(Plan::new(&inputs(&domains), cfg.clone(), 0).expect("4000 rows build"));
    let stage = plan.stage_change(10, 16, 8192, None, false);
    let Err(e) = plan.with_journal(vec![stage]) else {
        panic!("a live stage of 8192 rows is accepted");
    };
    assert!(e.to_string().contains("8192-row batch"), "{e}");
    // The share the message names is enough.
    cfg.global_batch_rows = 8192;
    let at_least: f64 = msg.rsplit(' ').next().unwrap().parse().unwrap();
    let mut fixed = domains.clone();
    fixed[0].settings.grouping.max_share = at_least;
    Plan::new(&inputs(&fixed), cfg, 0).expect("the named share builds");
}

// ---------------------------------------------------------------------------------------
// Edges of real configs: whole-domain groups, extreme weights
// ---------------------------------------------------------------------------------------

/// A [`MemShard`] that counts the document lengths the planner reads.
struct CountingShard {
    inner: MemShard,
    reads: std::sync::atomic::AtomicU64,
}

impl DocSource for CountingShard {
    fn documents(&self) -> u64 {
        self.inner.documents()
    }
    fn tokens(&self) -> u64 {
        self.inner.tokens()
    }
    fn doc_len(&self, doc: u64) -> u64 {
        self.reads
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.inner.doc_len(doc)
    }
    fn groups(&self) -> Option<&[GroupRun]> {
        self.inner.groups()
    }
}

/// One group holding a whole domain (a repo or a book series as one sequence-grouped
/// unit): its rows are expanded in order, each from where the last stopped, so an epoch
/// reads each document's length a few times (batch grouping packs the group once for
/// each of the epochs spanning batches at once), not once per row before it. Expanding every
/// row from the group's first document made an epoch quadratic: 20,000 documents of 10
/// tokens took 5 s for 347 steps of 64 rows. Every token is still served once, in order.
#[test]
fn edge_one_group_holding_a_whole_domain_expands_in_linear_time() {
    for mode in [GroupMode::Sequence, GroupMode::Batch] {
        let n = 4000u64;
        let lengths: Vec<u32> = (0..n).map(|i| (i % 13) as u32).collect();
        let shard = Arc::new(CountingShard {
            inner: MemShard {
                lengths: lengths.clone(),
                groups: Some(vec![GroupRun {
                    id: 7,
                    first_doc: 0,
                    docs: n,
                }]),
            },
            reads: 0.into(),
        });
        let src: Arc<dyn DocSource> = shard.clone();
        let input = DomainInput {
            name: "repo".into(),
            shards: vec![("repo/shard0".into(), src)],
            settings: settings(mode),
        };
        let mut cfg = base_config(8, 64, Packing::BestFit, 16);
        cfg.weights = Some(weights_map(&[("repo", 1.0)]));
        let plan = Arc::new(Plan::new(&[input], cfg, 0).expect("plan builds"));
        let tokens: u64 = lengths.iter().map(|&l| l as u64).sum();
        let before = shard.reads.load(std::sync::atomic::Ordering::Relaxed);
        let mut p = plan.start();
        let mut segments = Vec::new();
        let mut served = 0u64;
        while served < tokens {
            for row in p.next_batch().rows.iter().filter(|r| r.epoch == 0) {
                for s in &row.segments {
                    assert_eq!(s.doc_len, lengths[s.doc as usize] as u64);
                    assert_eq!(s.group, Some(7));
                    segments.push((s.doc, s.start, s.len as u64));
                    served += s.len as u64;
                }
            }
        }
        // Sorted, the segments tile every document from its first token to its last.
        segments.sort_unstable();
        let mut next = (0u64, 0u64);
        for &(doc, start, len) in &segments {
            while next.0 < n && lengths[next.0 as usize] as u64 == next.1 {
                next = (next.0 + 1, 0);
            }
            assert_eq!((doc, start), next, "{mode:?}: segments tile the documents");
            next.1 += len;
        }
        assert_eq!(served, tokens, "{mode:?}: every token once");
        let reads = shard.reads.load(std::sync::atomic::Ordering::Relaxed) - before;
        assert!(
            reads < 16 * n,
            "{mode:?}: {reads} document lengths read for an epoch of {n} documents ({served} tokens)"
        );
    }
}

/// Weights near `f64::MAX`: each point sums to a finite total (the config's check), but
/// a ramp between two such points can overflow in sum at the steps in between. The
/// shares there must still be the weights' proportions, and the rows follow them within
/// one row. Normalising by a sum that overflowed made every share 0 for 81 of 1000
/// steps, and the mixer handed those rows out by carried error alone: 1942 rows against
/// a target of 2000.
#[test]
fn edge_huge_weights_ramp_keeps_its_shares() {
    let big = f64::MAX;
    let specs = vec![
        DomSpec {
            name: "a".into(),
            shards: vec![ShardSpec::new(vec![5; 100], &[1])],
            settings: DomainSettings::default(),
        },
        DomSpec {
            name: "b".into(),
            shards: vec![ShardSpec::new(vec![5; 100], &[1])],
            settings: DomainSettings::default(),
        },
    ];
    let mut cfg = base_config(8, 4, Packing::BestFit, 16);
    cfg.schedule = vec![
        SchedulePoint {
            step: 0,
            weights: weights_map(&[("a", big), ("b", 0.0)]),
        },
        SchedulePoint {
            step: 1000,
            weights: weights_map(&[("a", 0.0), ("b", big)]),
        },
    ];
    let plan = build(&specs, cfg);
    let mut p = plan.start();
    let mut rows = [0u64; 2];
    let mut target = [0f64; 2];
    for step in 0..1000u64 {
        let shares = plan.schedule().shares(step);
        let t = step as f64 / 1000.0;
        assert!(
            (shares[0] - (1.0 - t)).abs() < 1e-9 && (shares[1] - t).abs() < 1e-9,
            "step {step}: shares {shares:?}"
        );
        let b = p.next_batch();
        // Both domains fill their rows alike, so row shares are token shares.
        for (d, share) in [1.0 - t, t].into_iter().enumerate() {
            rows[d] += b.counts[d] as u64;
            target[d] += share * 4.0;
            assert!(
                (rows[d] as f64 - target[d]).abs() <= 1.0 + 1e-6,
                "step {step}: domain {d} has {} rows against {}",
                rows[d],
                target[d]
            );
        }
    }
}

/// A batch-grouped domain with fewer groups than its rows a step need under the cap
/// (one group of 2000 documents, capped at 3 of 64 rows, owed about 22 rows a step):
/// its next epochs start the same group again while it spans, so one batch holds the
/// same tokens several times (each document 8 times in step 0). The plan warns at
/// start, naming the domain, the field and the share that avoids it; at that share the
/// group spans alone and no token range appears twice in a batch.
#[test]
fn edge_batch_group_fewer_than_a_step_needs_is_warned_about() {
    let run = |share: f64, from_step: u64| {
        let mut a = settings(GroupMode::Batch);
        a.grouping.max_share = share;
        a.grouping.from_step = from_step;
        let specs = vec![
            DomSpec {
                name: "repo".into(),
                shards: vec![ShardSpec::new(vec![20; 2000], &[2000])],
                settings: a,
            },
            DomSpec {
                name: "web".into(),
                shards: vec![ShardSpec::new(vec![9; 1000], &[1])],
                settings: DomainSettings::default(),
            },
        ];
        let mut cfg = base_config(16, 64, Packing::BestFit, 16);
        cfg.weights = Some(weights_map(&[("repo", 1.0), ("web", 1.0)]));
        let plan = build(&specs, cfg);
        let mut repeats = 0;
        for b in run_batches(&plan, 20) {
            let mut seen = BTreeSet::new();
            for r in b.rows.iter().filter(|r| r.domain == 0) {
                for s in &r.segments {
                    repeats += usize::from(!seen.insert((s.doc, s.start)));
                }
            }
        }
        (plan.warnings(), repeats)
    };
    let (warnings, repeats) = run(0.05, 0);
    assert!(repeats > 0, "the repeats the warning is about happen");
    let w: Vec<&String> = warnings
        .iter()
        .filter(|w| w.contains("domain repo"))
        .collect();
    assert_eq!(w.len(), 1, "{warnings:?}");
    assert!(
        w[0].contains("corpus.domain[0]")
            && w[0].contains("each of its 1 groups at 3 of a 64-row batch")
            && w[0].contains("raise grouping.max_share to at least"),
        "{}",
        w[0]
    );
    let share: f64 = w[0]
        .split("at least ")
        .nth(1)
        .and_then(|t| t.split(' ').next())
        .and_then(|t| t.parse().ok())
        .expect("a share");
    let (warnings, repeats) = run(share, 0);
    assert!(warnings.is_empty(), "{warnings:?}");
    assert_eq!(
        repeats, 0,
        "at max_share {share} no token range twice in a batch"
    );
    // Grouping that starts later is judged from its start.
    let (warnings, _) = run(0.05, 5);
    assert!(
        warnings.len() == 1 && warnings[0].contains("at plan step 5 it is owed"),
        "{warnings:?}"
    );
}

/// A plan of more domains than a cursor blob lists is refused when it is built, as the
/// config is (`corpus.domain`, at most `MAX_DOMAINS`): `Plan::new` took up to 65535,
/// and every blob of a 5000-domain plan was then refused with "cursor is malformed:
/// domains: 5000 entries". At the limit, a blob resumes.
#[test]
fn edge_more_domains_than_a_blob_lists_are_refused() {
    let max = millrace::config::MAX_DOMAINS;
    let specs = |n: usize| -> Vec<DomSpec> {
        (0..n)
            .map(|i| DomSpec {
                name: format!("d{i}"),
                shards: vec![ShardSpec::new(vec![3, 5], &[1])],
                settings: DomainSettings::default(),
            })
            .collect()
    };
    let cfg = |n: usize| {
        let mut c = base_config(8, 2, Packing::BestFit, 16);
        c.weights = Some((0..n).map(|i| (format!("d{i}"), 1.0)).collect());
        c
    };
    let msg = build_error(&specs(max + 1), &cfg(max + 1), "one domain past the limit");
    assert!(
        msg.contains(&format!("{} domains; at most {max}", max + 1)),
        "{msg}"
    );
    let plan = build(&specs(max), cfg(max));
    let mut p = plan.start();
    for _ in 0..3 {
        p.next_batch();
    }
    let blob = p.cursor();
    let mut q = plan
        .resume(&blob, 0)
        .expect("a blob at the limit resumes")
        .planner;
    assert_eq!(q.step(), 3);
    assert_eq!(q.next_batch(), p.next_batch());
}

/// A domain of a million empty documents and one of 5 tokens, packed one unit a window
/// (`window = 1`): its rows are a million windows apart, and every batch still has all
/// its rows. The planner gave up after a flat million empty windows and returned short
/// batches (0 or 1 of 2 rows); now only two epochs without a row end the search.
#[test]
fn edge_a_million_empty_documents_still_fill_every_batch() {
    let mut lengths = vec![0u32; 1_100_000];
    lengths.push(5);
    let specs = vec![DomSpec {
        name: "sparse".into(),
        shards: vec![ShardSpec::new(lengths, &[1])],
        settings: DomainSettings {
            window: Some(1),
            ..DomainSettings::default()
        },
    }];
    let mut cfg = base_config(8, 2, Packing::BestFit, 16);
    cfg.weights = Some(weights_map(&[("sparse", 1.0)]));
    let plan = build(&specs, cfg);
    for (step, b) in run_batches(&plan, 2).iter().enumerate() {
        assert_eq!(b.rows.len(), 2, "step {step}");
        for r in &b.rows {
            assert_eq!((r.tokens, r.segments[0].doc), (5, 1_100_000), "step {step}");
        }
    }
}
