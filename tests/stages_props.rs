//! Property tests of stages (`[[plan.stage]]`, issue 17): a stream switching from short
//! rows to long ones (64 -> 512 tokens here, 4096 -> 32768 in the fixed case, rows cut
//! to keep tokens per step about constant) over small corpora with every grouping mode.
//!
//! - Within each epoch every token appears once; what is missing from an epoch in
//!   progress at the switch is exactly what the streams counted as `dropped` (rows of
//!   batch-grouped groups still spanning batches in an earlier window, docs/DESIGN.md
//!   "Stages"), and nothing is missing from any other epoch.
//! - Every batch has its stage's rows and row length, and the mixture stays within one
//!   row of target, in rows of the stage in force, at every step.
//! - A blob taken at any step, either side of the switch (the step before it
//!   included), resumes equal to the uninterrupted stream; seek (plain and from
//!   checkpoints) equals the replay. Cases add concat packing, a bursty domain, a
//!   reseed next to the switch and a third stage soon after it (a window meeting two
//!   switches).
//! - A stage added by a config edit at or after a blob's step keeps the blob; one
//!   before it is refused as a rewrite of its past.

use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use millrace::config::plan::{
    Bursty, DomainSettings, GroupMode, Grouping, Packing, PlanConfig, Reseed, Stage, StageUpsample,
    Upsample,
};
use millrace::corpus::GroupRun;
use millrace::plan::cursor;
use millrace::plan::explain::explain;
use millrace::plan::mix::TICKS;
use millrace::plan::report::Tally;
use millrace::plan::{
    CursorError, DocSource, DomainInput, GlobalBatch, MemCheckpoints, MemShard, Plan, Upsampling,
};
use proptest::prelude::*;
use proptest::test_runner::{Config as PtConfig, RngAlgorithm, RngSeed};
use rand::{Rng, SeedableRng};
use rand_pcg::Pcg64;

/// One domain: shards of (document lengths, group run sizes), and its settings.
struct Dom {
    name: &'static str,
    shards: Vec<(Vec<u32>, Vec<u64>)>,
    settings: DomainSettings,
}

/// Lengths around a row of `short` tokens: short documents, some longer than a short
/// row, a few longer than a long row `long`.
fn lengths(rng: &mut Pcg64, n: usize, short: u32, long: u32) -> Vec<u32> {
    (0..n)
        .map(|_| match rng.gen_range(0..20) {
            0 => 0,
            1..=4 => rng.gen_range(short..long),
            5 => rng.gen_range(long..2 * long),
            _ => rng.gen_range(1..short),
        })
        .collect()
}

fn runs(rng: &mut Pcg64, docs: usize) -> Vec<u64> {
    let mut out = Vec::new();
    let mut left = docs as u64;
    while left > 0 {
        let k = rng.gen_range(1..=5).min(left);
        out.push(k);
        left -= k;
    }
    out
}

/// Three domains: documents one by one, `sequence` groups, `batch` groups.
fn corpus(seed: u64, docs: usize, short: u32, long: u32) -> Vec<Dom> {
    let mut rng = Pcg64::seed_from_u64(seed);
    let grouped = |mode| DomainSettings {
        grouping: Grouping {
            mode,
            ..Grouping::default()
        },
        ..DomainSettings::default()
    };
    let shard = |rng: &mut Pcg64| {
        let l = lengths(rng, docs, short, long);
        let r = runs(rng, docs);
        (l, r)
    };
    vec![
        Dom {
            name: "web",
            shards: vec![shard(&mut rng)],
            settings: DomainSettings::default(),
        },
        Dom {
            name: "code",
            shards: vec![shard(&mut rng), shard(&mut rng)],
            settings: grouped(GroupMode::Sequence),
        },
        Dom {
            name: "books",
            shards: vec![shard(&mut rng)],
            settings: grouped(GroupMode::Batch),
        },
    ]
}

fn inputs(doms: &[Dom]) -> Vec<DomainInput> {
    doms.iter()
        .map(|d| DomainInput {
            name: d.name.to_string(),
            shards: d
                .shards
                .iter()
                .enumerate()
                .map(|(i, (lengths, sizes))| {
                    let mut first = 0;
                    let groups = sizes
                        .iter()
                        .enumerate()
                        .map(|(id, &docs)| {
                            let run = GroupRun {
                                id: id as u64,
                                first_doc: first,
                                docs,
                            };
                            first += docs;
                            run
                        })
                        .collect();
                    let src: Arc<dyn DocSource> = Arc::new(MemShard {
                        lengths: lengths.clone(),
                        groups: Some(groups),
                    });
                    (format!("{}/{i}", d.name), src)
                })
                .collect(),
            settings: d.settings,
        })
        .collect()
}

/// A two-stage config: `short` tokens x `rows` rows, then from `switch` on `long`
/// tokens x `long_rows` rows (an anneal mixture at the same step), chaining long groups
/// there when `chain`.
fn config(
    short: u32,
    rows: u32,
    window: u64,
    (switch, long, long_rows): (u64, u32, u32),
    chain: bool,
) -> PlanConfig {
    staged(
        short,
        rows,
        window,
        (switch, long, long_rows),
        chain,
        Packing::BestFit,
    )
}

/// [`config`] with another packing.
fn staged(
    short: u32,
    rows: u32,
    window: u64,
    (switch, long, long_rows): (u64, u32, u32),
    chain: bool,
    packing: Packing,
) -> PlanConfig {
    let packing = match packing {
        Packing::Concat => "concat",
        Packing::BestFit => "best_fit",
    };
    let point = |step, web: f64| {
        format!(
            "[[schedule]]\nstep = {step}\nweights = {{ web = {web}, code = 0.3, books = 0.2 }}\n"
        )
    };
    let text = format!(
        "seed = 11\nseq_len = {short}\nglobal_batch_rows = {rows}\npacking = \"{packing}\"\n\
         best_fit_window = {window}\n{}{}{}[[stage]]\nstep = {switch}\nseq_len = {long}\n\
         global_batch_rows = {long_rows}\nbest_fit_window = {}\nchain_groups = {chain}\n",
        point(0, 0.5),
        point(switch - 1, 0.5),
        point(switch, 0.2),
        window / 2 + 1,
    );
    parse_plan(&text).expect("a two-stage [plan]")
}

fn build(doms: &[Dom], cfg: PlanConfig) -> Arc<Plan> {
    Arc::new(Plan::new(&inputs(doms), cfg, 7).expect("the plan builds"))
}

/// The uninterrupted stream of `steps` batches, and the cursor before each.
fn run(plan: &Arc<Plan>, steps: u64) -> (Vec<GlobalBatch>, Vec<Vec<u8>>) {
    let mut p = plan.start();
    let mut batches = Vec::new();
    let mut blobs = Vec::new();
    for _ in 0..steps {
        blobs.push(p.cursor());
        batches.push(p.next_batch());
    }
    blobs.push(p.cursor());
    (batches, blobs)
}

/// Token ranges emitted per (shard, document).
type Ranges = HashMap<(u32, u64), Vec<(u64, u64)>>;

/// Every property above, for one plan with its switch at plan step `switch`. Returns
/// the tokens dropped at the switch and the domains that carried units across it.
fn check(doms: &[Dom], plan: &Arc<Plan>, switch: u64, steps: u64, probes: &[u64]) -> (u64, usize) {
    check_with(doms, plan, switch, steps, probes, &|_, _, _, _| 1)
}

/// How many times a document's tokens appear in an epoch: `(domain, epoch, shard,
/// document)`, 1 without upsampling.
type Times<'a> = &'a dyn Fn(usize, u32, u32, u64) -> u64;

/// [`check`] with each document appearing `times` times per epoch.
fn check_with(
    doms: &[Dom],
    plan: &Arc<Plan>,
    switch: u64,
    steps: u64,
    probes: &[u64],
    times: Times,
) -> (u64, usize) {
    let (batches, blobs) = run(plan, steps);
    let n = doms.len();
    // Shapes and mixture.
    let mut rows = vec![0i64; n];
    let mut target = vec![0i64; n];
    for b in &batches {
        let (seq, g) = plan.shape_at(b.plan_step);
        let stage = plan
            .stages()
            .iter()
            .rev()
            .find(|s| s.step <= b.plan_step)
            .unwrap();
        assert_eq!((seq, g), (stage.seq_len, stage.rows), "step {}", b.step);
        assert_eq!(b.rows.len(), g as usize, "step {}", b.step);
        for r in &b.rows {
            assert!(
                r.tokens <= seq + 1,
                "step {}: a row of {}",
                b.step,
                r.tokens
            );
            let sum: u32 = r.segments.iter().map(|s| s.len).sum();
            assert_eq!(sum, r.tokens);
        }
        for (d, t) in plan.mixer().nominal(b.plan_step).iter().enumerate() {
            if doms.iter().any(|d| d.settings.bursty.is_some()) {
                break; // a burst takes a cycle's rows at once, the others make room
            }
            target[d] += t;
            rows[d] += b.counts[d] as i64;
            let off = (target[d] - rows[d] * TICKS).abs();
            assert!(
                off <= TICKS,
                "step {}: domain {d} is {:.3} rows off target",
                b.step,
                off as f64 / TICKS as f64
            );
        }
    }
    let end = plan.seek(steps);
    let after = plan.seek(plan.trainer_step_of(switch) + 1);
    let carried = (0..n)
        .filter(|&d| after.stream(d).is_some_and(|s| !s.carry.is_empty()))
        .count();
    let dropped = (0..n)
        .filter_map(|d| end.stream(d))
        .map(|s| s.dropped)
        .sum();
    resumes(plan, &batches, &blobs, steps, probes);
    if plan.config().packing == Packing::Concat {
        return (dropped, carried); // rows share a token at seams: coverage is best_fit's
    }
    // Coverage: token ranges per (domain, epoch, shard, doc), never overlapping.
    let mut seen: HashMap<(u16, u32), Ranges> = HashMap::new();
    for b in &batches {
        for r in &b.rows {
            let e = seen.entry((r.domain, r.epoch)).or_default();
            for s in &r.segments {
                e.entry((s.shard, s.doc))
                    .or_default()
                    .push((s.start, s.start + s.len as u64));
            }
        }
    }
    let at_switches: Vec<_> = plan.stages()[1..]
        .iter()
        .map(|s| plan.seek(plan.trainer_step_of(s.step)))
        .collect();
    for (d, dom) in doms.iter().enumerate() {
        let state = end.stream(d).expect("a stream per domain");
        let open = state
            .tails
            .iter()
            .map(|t| t.epoch)
            .chain([state.epoch])
            .min()
            .unwrap_or(0);
        let switched: Vec<u32> = at_switches
            .iter()
            .filter_map(|p| p.stream(d))
            .flat_map(|s| s.tails.iter().map(|t| t.epoch).chain([s.epoch]))
            .collect();
        let mut missing = 0u64;
        for epoch in 0..open {
            let mut emitted = 0u64;
            let mut want = 0u64;
            for (shard, (lengths, _)) in dom.shards.iter().enumerate() {
                for (doc, &len) in lengths.iter().enumerate() {
                    let k = times(d, epoch, shard as u32, doc as u64);
                    want += k * len as u64;
                    let key = (shard as u32, doc as u64);
                    let Some(r) = seen.get(&(d as u16, epoch)).and_then(|m| m.get(&key)) else {
                        continue;
                    };
                    // Sweep: no token is covered more than `k` times.
                    let mut ev: Vec<(u64, i64)> =
                        r.iter().flat_map(|&(a, b)| [(a, 1), (b, -1)]).collect();
                    ev.sort_unstable();
                    let mut c = 0i64;
                    for (at, step) in ev {
                        c += step;
                        assert!(
                            c <= k as i64,
                            "{}: epoch {epoch} has token {at} of {key:?} {c} times, not {k}",
                            dom.name
                        );
                    }
                    emitted += r.iter().map(|(a, b)| b - a).sum::<u64>();
                }
            }
            let gap = want - emitted;
            if !switched.contains(&epoch) {
                assert_eq!(gap, 0, "{}: epoch {epoch} misses tokens", dom.name);
            }
            missing += gap;
        }
        if switched.iter().all(|&e| e < open) {
            assert_eq!(missing, state.dropped, "{}: dropped tokens", dom.name);
        }
        assert!(open > 1, "{}: too few epochs to check", dom.name);
    }
    (dropped, carried)
}

/// Resume from blobs either side of the switch, and seek, equal the uninterrupted run.
fn resumes(
    plan: &Arc<Plan>,
    batches: &[GlobalBatch],
    blobs: &[Vec<u8>],
    steps: u64,
    probes: &[u64],
) {
    let every = 4;
    let store = MemCheckpoints::new();
    let never = AtomicBool::new(false);
    for blob in blobs {
        let data = cursor::decode(blob).expect("a blob decodes");
        assert_eq!(&cursor::encode(&data), blob, "encode(decode(b)) == b");
    }
    for &t in probes {
        let t = t.min(steps - 3);
        let mut r = plan.restore(&blobs[t as usize]).expect("the blob resumes");
        let mut s = plan.seek(t);
        assert_eq!(s.cursor(), blobs[t as usize], "seek({t}) cursor");
        let mut c = plan
            .seek_checkpointed(t, 3, every, &store, &never)
            .expect("not cancelled");
        for (i, want) in batches[t as usize..t as usize + 3].iter().enumerate() {
            assert_eq!(&r.next_batch(), want, "resumed at {t}, +{i}");
            assert_eq!(&s.next_batch(), want, "seek({t}), +{i}");
            assert_eq!(&c.next_batch(), want, "checkpointed seek({t}), +{i}");
        }
    }
}

fn pt(cases: u32, seed: u64) -> PtConfig {
    PtConfig {
        cases,
        failure_persistence: None,
        rng_algorithm: RngAlgorithm::ChaCha,
        rng_seed: RngSeed::Fixed(seed),
        max_shrink_iters: 64,
        ..PtConfig::default()
    }
}

proptest! {
    #![proptest_config(pt(16, 0x57a6e))]

    /// 64 x 64 rows, then 512 x 8 rows, over random corpora, windows and switch steps.
    #[test]
    fn a_switch_keeps_epochs_mixture_and_resume(
        corpus_seed in any::<u64>(),
        window in prop_oneof![Just(8u64), Just(24), Just(64)],
        switch in 3u64..25,
        extra in prop::collection::vec(0u64..60, 3),
        chain in any::<bool>(),
        concat in prop::bool::weighted(0.25),
        bursty in prop::bool::weighted(0.3),
        reseed in prop::option::weighted(0.4, -2i64..=2),
        third in prop::option::weighted(0.4, 1u64..8),
    ) {
        let mut doms = corpus(corpus_seed, 60, 64, 512);
        let packing = if concat { Packing::Concat } else { Packing::BestFit };
        if concat {
            doms[2].settings.grouping.mode = GroupMode::Sequence; // batch needs best_fit
        }
        if bursty {
            // books has 0.2 of the weight (0.29 from the switch): a cycle of 2 steps'
            // rows fits one batch (web's 0.5 in 3 would not, and is refused).
            doms[2].settings.bursty = Some(Bursty { period: 2 });
        }
        let mut cfg = staged(64, 64, window, (switch, 512, 8), chain, packing);
        if let Some(r) = reseed {
            // A reseed just before, at or after the switch reshuffles what is carried.
            let step = (switch as i64 + r).max(1) as u64;
            cfg.reseed.push(Reseed { step, seed: 99 });
        }
        if let Some(k) = third {
            // Back to shorter rows soon after: a window can meet two switches.
            cfg.stage.push(Stage {
                step: switch + k,
                seq_len: 128,
                global_batch_rows: 32,
                best_fit_window: None,
                chain_groups: !chain,
                upsample_long: Default::default(),
            });
        }
        let plan = build(&doms, cfg);
        let mut probes = vec![0, switch - 1, switch, switch + 1];
        probes.extend(extra);
        check(&doms, &plan, switch, 60, &probes);
    }
}

/// The shape: 4096-token rows, then 32768 from step 6 with rows cut 8 -> 1.
#[test]
fn a_4096_to_32768_switch() {
    let doms = corpus(3, 8, 4096, 32768);
    let plan = build(&doms, config(4096, 8, 16, (6, 32768, 1), true));
    assert_eq!(plan.shape_at(5), (4096, 8));
    assert_eq!(plan.shape_at(6), (32768, 1));
    assert_eq!(plan.largest_shape(), (32768, 8));
    let (dropped, carried) = check(&doms, &plan, 6, 80, &[0, 5, 6, 7, 20]);
    // The switch did meet windows in progress: units were carried.
    assert!(carried > 0, "carried {carried}, dropped {dropped}");
}

/// A stage is history: added by a config edit at or after a blob's step it is the
/// blob's future (the blob resumes, equal to the edited plan's replay); before it, it
/// rewrites the blob's past and the blob is refused.
#[test]
fn a_stage_added_later_keeps_blobs_before_it() {
    let doms = corpus(5, 60, 64, 512);
    let staged = config(64, 64, 24, (12, 512, 8), false);
    let mut flat = staged.clone();
    flat.stage.clear();
    let flat = build(&doms, flat);
    let staged = build(&doms, staged);
    assert_eq!(flat.fingerprint(), staged.fingerprint());
    for t in [0, 5, 12] {
        let blob = flat.seek(t).cursor();
        let mut r = staged
            .restore(&blob)
            .expect("a blob before the stage resumes");
        let mut s = staged.seek(t);
        for _ in 0..(16 - t) {
            assert_eq!(r.next_batch(), s.next_batch(), "from {t}");
        }
    }
    let blob = flat.seek(13).cursor();
    let refused = staged.restore(&blob);
    assert!(
        matches!(refused, Err(CursorError::History { step: 13, .. })),
        "a stage before the blob's step was accepted"
    );
    // The refusal names stages among what may have been edited.
    if let Err(e) = refused {
        assert!(e.to_string().contains("stages"), "{e}");
    }
}

/// `millrace plan`'s figures and `explain` across a switch: each window reports its
/// stage and shape, padding against that shape's rows, and the tokens dropped at the
/// switch; explain names the step's stage and pads rows to its seq_len.
#[test]
fn reports_name_the_stage_and_its_shape() {
    let doms = corpus(9, 60, 64, 512);
    let plan = build(&doms, config(64, 64, 24, (10, 512, 8), false));
    let mut p = plan.start();
    let mut tally = Tally::new(&plan);
    let mut windows = Vec::new();
    let mut real = [0u64; 2];
    for step in 0..20u64 {
        let b = p.next_batch();
        let stage = usize::from(step >= 10);
        real[stage] += b.rows.iter().map(|r| r.tokens as u64).sum::<u64>();
        let e = explain(&plan, &b, 1, 2);
        assert_eq!(e.stage as usize, stage);
        assert_eq!((e.seq_len, e.global_batch_rows), plan.shape_at(b.plan_step));
        for r in &e.rows {
            assert_eq!(r.tokens + r.padding, e.seq_len + 1);
        }
        tally.add(b);
        if step == 9 || step == 19 {
            windows.push(tally.finish_at(&p));
        }
    }
    let dropped: u64 = (0..doms.len())
        .filter_map(|d| p.stream(d))
        .map(|s| s.dropped)
        .sum();
    for (i, w) in windows.iter().enumerate() {
        assert_eq!(w.stage as usize, i);
        let shape = plan.stages()[i];
        assert_eq!((w.seq_len, w.rows_per_batch), (shape.seq_len, shape.rows));
        let capacity = 10 * shape.rows as u64 * (shape.seq_len as u64 + 1);
        let padding = 100.0 * (1.0 - real[i] as f64 / capacity as f64);
        assert!(
            (w.padding_pct - padding).abs() < 1e-9,
            "{} vs {padding}",
            w.padding_pct
        );
        let per_row: f64 = w.by_length.iter().map(|b| b.tokens_per_row).sum();
        let rows = 10.0 * shape.rows as f64;
        assert!((per_row - real[i] as f64 / rows).abs() < 1e-6);
        assert!((0.0..=100.0).contains(&w.single_group_rows_pct));
    }
    assert_eq!(windows[0].dropped_tokens, 0);
    assert_eq!(windows[1].dropped_tokens, dropped);
}

/// config/millrace.example.toml's two-stage recipe parses, validates, and is a stage at
/// the anneal's first step.
#[test]
fn the_example_two_stage_recipe_parses() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/config/millrace.example.toml");
    let text = std::fs::read_to_string(path).expect("the example config");
    let start = text
        .find("# BEGIN two-stage recipe")
        .expect("the recipe's start");
    let end = text
        .find("# END two-stage recipe")
        .expect("the recipe's end");
    let block: String = text[start..end]
        .lines()
        .skip(1)
        .map(|l| l.trim_start_matches('#').trim_start())
        .map(|l| l.replace("[[plan.stage]]", "[[stage]]") + "\n")
        .collect();
    let table: toml::Table =
        format!("seq_len = 8192\nglobal_batch_rows = 512\nweights = {{ a = 1 }}\n{block}")
            .parse()
            .expect("the recipe is TOML");
    let cfg = PlanConfig::from_table(&table).expect("the recipe is a [plan] table");
    let domains = ["a", "code", "books_zh"].map(|n| (n, DomainSettings::default()));
    cfg.validate(&domains).expect("the recipe validates");
    let st = &cfg.stage[0];
    assert_eq!(
        (st.step, st.seq_len, st.global_batch_rows),
        (200000, 65536, 64)
    );
    assert!(st.chain_groups);
    let code = Upsample {
        min_tokens: 32768,
        factor: 2,
    };
    assert_eq!(st.upsample_long["code"], StageUpsample::Long(code));
    assert_eq!(st.upsample_long["books_zh"], StageUpsample::Off);
    // The anneal ramp of the example's schedule starts at the same step.
    assert!(text.contains("step = 200000                  # start of a stage-2 anneal ramp"));
}

/// A forged or stale stage state is refused, naming the domain, never served: a stage
/// not reached at the blob's step, and a carry level past its window's blocks.
#[test]
fn forged_stage_state_is_refused() {
    let doms = corpus(5, 60, 64, 512);
    let plan = build(&doms, config(64, 64, 24, (12, 512, 8), false));
    let before = cursor::decode(&plan.seek(5).cursor()).unwrap();
    let mut c = before.clone();
    c.streams[0].stage = 1;
    assert!(matches!(
        plan.restore(&cursor::encode(&c)),
        Err(CursorError::Stream { .. })
    ));
    let after = cursor::decode(&plan.seek(14).cursor()).unwrap();
    let d = (0..doms.len())
        .find(|&d| !after.streams[d].carry.is_empty())
        .expect("a domain carried units across the switch");
    let mut c = after.clone();
    c.streams[d].carry[0].next_block = u32::MAX;
    let e = plan.restore(&cursor::encode(&c)).err().expect("refused");
    assert!(e.to_string().contains(doms[d].name), "{e}");
    let mut c = after;
    c.streams[d].carry[0].stage = 1;
    assert!(plan.restore(&cursor::encode(&c)).is_err());
}

/// `[plan]` text with HEAD's shape, parsed.
fn parse_plan(text: &str) -> Result<PlanConfig, millrace::config::plan::SettingError> {
    PlanConfig::from_table(&text.parse::<toml::Table>().expect("TOML"))
}

const HEAD: &str = "seq_len = 8\nglobal_batch_rows = 2\n";

/// `[[plan.stage]]` mistakes name their field (the daemon serves stages:
/// tests/stages_serve.rs).
#[test]
fn stages_are_checked() {
    let two = format!(
        "{HEAD}weights = {{ a = 1 }}\n[[stage]]\nstep = 100\nseq_len = 64\n\
         global_batch_rows = 1\n"
    );
    let p = parse_plan(&two).unwrap();
    assert_eq!(p.stage.len(), 1);
    assert!(p.validate(&[("a", DomainSettings::default())]).is_ok());
    for (text, field) in [
        (
            "step = 0\nseq_len = 8\nglobal_batch_rows = 2",
            "plan.stage[0].step",
        ),
        (
            "step = 5\nseq_len = 0\nglobal_batch_rows = 2",
            "plan.stage[0].seq_len",
        ),
        (
            "step = 5\nseq_len = 8\nglobal_batch_rows = 0",
            "plan.stage[0].global_batch_rows",
        ),
        (
            "step = 5\nseq_len = 8\nglobal_batch_rows = 2\nbest_fit_window = 0",
            "plan.stage[0].best_fit_window",
        ),
    ] {
        let p = parse_plan(&format!("{HEAD}weights = {{ a = 1 }}\n[[stage]]\n{text}\n")).unwrap();
        let e = p.validate(&[("a", DomainSettings::default())]).unwrap_err();
        assert_eq!(e.field, field, "{text}");
    }
    let p = parse_plan(&format!(
        "{two}[[stage]]\nstep = 100\nseq_len = 8\nglobal_batch_rows = 2\n"
    ))
    .unwrap();
    let e = p.validate(&[("a", DomainSettings::default())]).unwrap_err();
    assert_eq!(e.field, "plan.stage[1].step");
    assert!(e.what.contains("steps must increase"), "{e}");
}

/// A step of 2^31 tokens or more (16384 rows of 131072 + 1) is refused by name, at
/// `[plan]` and at a stage: `cu_seqlens` is int32 over a rank's step (and the flattened
/// positions, `seq_len + 1` per row, a client derives it from), and with dp 1 a rank
/// takes it all (its last entries would wrap negative). 16383 rows are accepted.
#[test]
fn a_step_of_2_31_tokens_or_more_is_refused_by_name() {
    let a = [("a", DomainSettings::default())];
    let stage = |rows: u32| {
        format!(
            "{HEAD}weights = {{ a = 1 }}\n[[stage]]\nstep = 10\nseq_len = 4096\n\
             global_batch_rows = 64\n[[stage]]\nstep = 20\nseq_len = 131072\n\
             global_batch_rows = {rows}\n"
        )
    };
    let e = parse_plan(&stage(16384)).unwrap().validate(&a).unwrap_err();
    assert_eq!(e.field, "plan.stage[1].global_batch_rows");
    assert!(
        e.what.contains("2147500032 tokens") && e.what.contains("cu_seqlens"),
        "{e}"
    );
    assert!(parse_plan(&stage(16383)).unwrap().validate(&a).is_ok());
    // 2^31 - 2^17 inputs, but 2^31 tokens with each row's label-only last one.
    let head = "seq_len = 16383\nglobal_batch_rows = 131072\nweights = { a = 1 }\n";
    let e = parse_plan(head).unwrap().validate(&a).unwrap_err();
    assert_eq!(e.field, "plan.global_batch_rows");
    assert!(e.what.contains("2147483648 tokens"), "{e}");
}

/// Per-stage upsampling for a switch: `web` (documents one by one, none of its own)
/// repeats units over `min` tokens 3 times per epoch from the stage on; `code`
/// (sequence groups, x2 over `min` of its own) turns it off.
fn upsampled(doms: &mut [Dom], cfg: &mut PlanConfig, min: u64) {
    let u = |factor| Upsample {
        min_tokens: min,
        factor,
    };
    doms[1].settings.upsample_long = Some(u(2));
    let st = &mut cfg.stage[0];
    st.upsample_long
        .insert("web".into(), StageUpsample::Long(u(3)));
    st.upsample_long.insert("code".into(), StageUpsample::Off);
}

/// The plan step of each (domain, epoch)'s first row: where the epoch began.
fn epoch_starts(batches: &[GlobalBatch]) -> HashMap<(usize, u32), u64> {
    let mut out = HashMap::new();
    for b in batches {
        for r in &b.rows {
            out.entry((r.domain as usize, r.epoch))
                .or_insert(b.plan_step);
        }
    }
    out
}

/// How many times [`upsampled`]'s settings repeat each document per epoch, derived
/// from the rows alone: an epoch takes the setting in force at the step it began (web:
/// x3 from `switch`, code: its own x2 of long groups before it), every unit once else.
fn upsampled_times(
    doms: &[Dom],
    starts: &HashMap<(usize, u32), u64>,
    switch: u64,
    min: u64,
) -> impl Fn(usize, u32, u32, u64) -> u64 {
    // Per domain and shard, each document's unit length: code's units are its groups.
    let unit_len: Vec<Vec<Vec<u64>>> = doms
        .iter()
        .enumerate()
        .map(|(d, dom)| {
            dom.shards
                .iter()
                .map(|(lengths, sizes)| {
                    if d != 1 {
                        return lengths.iter().map(|&l| l as u64).collect();
                    }
                    let mut out = Vec::new();
                    let mut at = 0usize;
                    for &k in sizes {
                        let docs = &lengths[at..at + k as usize];
                        let len: u64 = docs.iter().map(|&l| l as u64).sum();
                        out.extend(docs.iter().map(|_| len));
                        at += k as usize;
                    }
                    out
                })
                .collect()
        })
        .collect();
    let starts = starts.clone();
    move |d, epoch, shard, doc| {
        let began = starts.get(&(d, epoch)).copied().unwrap_or(0);
        let long = unit_len[d][shard as usize][doc as usize] > min;
        match d {
            0 if began >= switch && long => 3,
            1 if began < switch && long => 2,
            _ => 1,
        }
    }
}

proptest! {
    #![proptest_config(pt(8, 0x0b5a3))]

    /// 64 x 64 rows, then 512 x 8 rows with web upsampled and code's upsampling off:
    /// within each epoch each document appears its epoch's factor times (the setting
    /// of the stage in force when the epoch began), the mixture stays within a row of
    /// target, and blobs either side of the switch resume equal to the replay.
    #[test]
    fn an_upsampling_override_keeps_epochs_mixture_and_resume(
        corpus_seed in any::<u64>(),
        window in prop_oneof![Just(8u64), Just(24)],
        switch in 3u64..25,
        extra in prop::collection::vec(0u64..60, 2),
    ) {
        let mut doms = corpus(corpus_seed, 30, 64, 512);
        let mut cfg = config(64, 64, window, (switch, 512, 8), false);
        upsampled(&mut doms, &mut cfg, 128);
        let plan = build(&doms, cfg);
        let starts = epoch_starts(&run(&plan, 80).0);
        let times = upsampled_times(&doms, &starts, switch, 128);
        let mut probes = vec![0, switch - 1, switch, switch + 1];
        probes.extend(extra);
        check_with(&doms, &plan, switch, 80, &probes, &times);
    }
}

/// The shape with upsampling: 4096-token rows, then 32768 from step 6, web
/// upsampled x3 over 8192 tokens and code's own x2 off from there. The epoch running
/// across the switch keeps its setting to its end and the first one after it takes the
/// stage's; each is checked whole (every unit its factor times), the blobs record it
/// (layout 9 once an epoch uses an override) and resume equal either side.
#[test]
fn upsampling_changes_with_the_first_epoch_after_a_4096_to_32768_switch() {
    let (switch, steps) = (6u64, 120u64);
    let mut doms = corpus(3, 8, 4096, 32768);
    let mut cfg = config(4096, 8, 16, (switch, 32768, 1), true);
    upsampled(&mut doms, &mut cfg, 8192);
    let plan = build(&doms, cfg);
    let (batches, blobs) = run(&plan, steps);
    let starts = epoch_starts(&batches);
    let end = plan.seek(steps);
    let mut probes = vec![0, switch - 1, switch, switch + 1];
    let mut first_new = u64::MAX;
    for d in [0usize, 1] {
        // The epoch in progress at the switch: begun before it, with rows after it.
        let across = (0..)
            .take_while(|&e| starts.get(&(d, e)).is_some_and(|&s| s < switch))
            .last()
            .expect("an epoch before the switch");
        assert!(
            batches[switch as usize..].iter().any(|b| b
                .rows
                .iter()
                .any(|r| r.domain as usize == d && r.epoch == across)),
            "{}: no epoch ran across the switch",
            doms[d].name
        );
        let next = starts[&(d, across + 1)];
        assert!(next >= switch);
        assert!(end.stream(d).unwrap().epoch > across + 1, "too few epochs");
        probes.extend([next - 1, next, next + 1]);
        first_new = first_new.min(next);
        // The plan's own record, in the blob after the new epoch began.
        let state = cursor::decode(&blobs[next as usize + 1]).unwrap().streams[d].clone();
        let want = match d {
            0 => Upsampling::Long(Upsample {
                min_tokens: 8192,
                factor: 3,
            }),
            _ => Upsampling::Off,
        };
        assert_eq!((state.epoch, state.upsample), (across + 1, want));
    }
    assert_eq!(
        blobs[first_new as usize][8], 7,
        "layout before an override is used"
    );
    assert_eq!(blobs[first_new as usize + 1][8], 9, "layout 9 records it");
    let times = upsampled_times(&doms, &starts, switch, 8192);
    check_with(&doms, &plan, switch, steps, &probes, &times);
}

/// A stage's upsampling is history: changing it keeps blobs before the stage's step
/// and refuses those after; a blob naming a setting no stage gives is refused.
#[test]
fn an_upsampling_override_is_history() {
    let mut doms = corpus(5, 60, 64, 512);
    let mut cfg = config(64, 64, 24, (12, 512, 8), false);
    upsampled(&mut doms, &mut cfg, 128);
    let plan = build(&doms, cfg.clone());
    let mut edited = cfg;
    edited.stage[0].upsample_long.insert(
        "web".into(),
        StageUpsample::Long(Upsample {
            min_tokens: 128,
            factor: 2,
        }),
    );
    let edited = build(&doms, edited);
    assert_eq!(plan.fingerprint(), edited.fingerprint());
    let blob = plan.seek(12).cursor();
    let mut r = edited
        .restore(&blob)
        .expect("a blob before the stage resumes");
    let mut s = edited.seek(12);
    for _ in 0..20 {
        assert_eq!(r.next_batch(), s.next_batch());
    }
    assert!(matches!(
        edited.restore(&plan.seek(13).cursor()),
        Err(CursorError::History { step: 13, .. })
    ));
    let mut c = cursor::decode(&plan.seek(40).cursor()).unwrap();
    c.streams[0].upsample = Upsampling::Long(Upsample {
        min_tokens: 128,
        factor: 7,
    });
    let e = plan.restore(&cursor::encode(&c)).err().expect("refused");
    assert!(
        e.to_string().contains("web") && e.to_string().contains("x7"),
        "{e}"
    );
}

/// `[[plan.stage]] upsample_long` mistakes name the stage, the domain and the field.
#[test]
fn stage_upsampling_is_checked() {
    let head = format!(
        "{HEAD}weights = {{ a = 1 }}\n[[stage]]\nstep = 100\nseq_len = 64\nglobal_batch_rows = 1\n"
    );
    let ok = parse_plan(&format!(
        "{head}upsample_long = {{ a = {{ min_tokens = 10, factor = 1 }} }}\n"
    ))
    .unwrap();
    assert!(ok.validate(&[("a", DomainSettings::default())]).is_ok());
    let p = parse_plan(&format!("{head}upsample_long = {{ b = \"off\" }}\n")).unwrap();
    let e = p.validate(&[("a", DomainSettings::default())]).unwrap_err();
    assert_eq!(e.field, "plan.stage[0].upsample_long.b");
    assert!(
        e.what.contains("step 100") && e.what.contains("no such domain b"),
        "{e}"
    );
    let p = parse_plan(&format!(
        "{head}upsample_long = {{ a = {{ min_tokens = 10, factor = 0 }} }}\n"
    ))
    .unwrap();
    let e = p.validate(&[("a", DomainSettings::default())]).unwrap_err();
    assert_eq!(e.field, "plan.stage[0].upsample_long.a.factor");
    for bad in ["\"on\"", "{ min_tokens = 10 }", "3"] {
        let text = format!("{head}upsample_long = {{ a = {bad} }}\n");
        let table: toml::Table = text.parse().expect("TOML");
        let e = PlanConfig::from_table(&table).expect_err(bad);
        let e = e.to_string();
        assert!(
            e.contains("\"off\" or { min_tokens, factor }") || e.contains("factor"),
            "{bad}: {e}"
        );
    }
}

/// Layout 9's upsampling records round-trip (the stream's and a tail's), and one of an
/// unknown kind is refused naming its byte.
#[test]
fn upsampling_records_round_trip_and_a_bad_kind_is_refused() {
    let mut doms = corpus(5, 60, 64, 512);
    let mut cfg = config(64, 64, 24, (12, 512, 8), false);
    upsampled(&mut doms, &mut cfg, 128);
    let plan = build(&doms, cfg);
    let mut c = cursor::decode(&plan.seek(40).cursor()).unwrap();
    let long = Upsampling::Long(Upsample {
        min_tokens: 128,
        factor: 3,
    });
    let last = c.streams.len() - 1;
    c.streams[last].upsample = long;
    c.streams[0].tails.push(millrace::plan::Tail {
        upsample: Upsampling::Off,
        pending: vec![(0, 1)],
        ..Default::default()
    });
    c.journal.clear();
    let blob = cursor::encode(&c);
    assert_eq!(blob[8], 9);
    assert_eq!(cursor::decode(&blob).unwrap(), c);
    // The last stream's record sits before the journal count and the superseded count.
    let mut bad = blob.clone();
    let at = bad.len() - 8 - 8 - 2 - 13;
    assert_eq!(bad[at], 2);
    bad[at] = 5;
    let n = bad.len();
    let sum = xxhash_rust::xxh3::xxh3_64(&bad[..n - 8]);
    bad[n - 8..].copy_from_slice(&sum.to_le_bytes());
    assert_eq!(
        cursor::decode(&bad),
        Err(CursorError::UpsampleKind { at, kind: 5 })
    );
}
