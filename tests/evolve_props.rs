//! Corpus evolution in the plan (issue 20, items 1 and 3): a config that adds a domain
//! from step S resumes the blobs of the run that did not have it, every domain it knew
//! continues its own order exactly, a domain weighted 0 keeps its position, and a blob
//! whose domain changed (shards rewritten, removed, or weighted before the blob's step)
//! is refused naming the domain and the shard. docs/DESIGN.md, "Corpus evolution".

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use millrace::config::plan::{DomainSettings, PlanConfig};
use millrace::plan::cursor::{self, CursorError};
use millrace::plan::permute::{derive_key, Permutation};
use millrace::plan::{DocSource, DomainInput, MemShard, Plan, Planner, Row};
use proptest::prelude::*;

/// A domain: its name and per shard its document lengths.
#[derive(Debug, Clone)]
struct Dom {
    name: &'static str,
    shards: Vec<Vec<u32>>,
    settings: DomainSettings,
}

fn dom(name: &'static str, shards: usize, docs: u32, salt: u32) -> Dom {
    Dom {
        name,
        shards: (0..shards as u32)
            .map(|k| {
                (0..docs)
                    .map(|i| (i * 7 + k * 13 + salt) % 29 + 1)
                    .collect()
            })
            .collect(),
        settings: DomainSettings::default(),
    }
}

fn inputs(doms: &[Dom]) -> Vec<DomainInput> {
    doms.iter()
        .map(|d| DomainInput {
            name: d.name.to_string(),
            shards: d
                .shards
                .iter()
                .enumerate()
                .map(|(k, lengths)| {
                    let src: Arc<dyn DocSource> = Arc::new(MemShard {
                        lengths: lengths.clone(),
                        groups: None,
                    });
                    (format!("{}/{k}", d.name), src)
                })
                .collect(),
            settings: d.settings,
        })
        .collect()
}

/// A plan of `doms` under `seed`, `rows` rows a batch and the TOML `schedule` lines.
fn plan(doms: &[Dom], seed: u64, rows: u32, schedule: &str) -> Arc<Plan> {
    plan_with(doms, seed, rows, schedule, &[])
}

fn plan_with(
    doms: &[Dom],
    seed: u64,
    rows: u32,
    schedule: &str,
    content: &[Vec<u128>],
) -> Arc<Plan> {
    let text = format!("seq_len = 15\nglobal_batch_rows = {rows}\nseed = {seed}\n{schedule}");
    let cfg = PlanConfig::from_table(&toml::from_str(&text).unwrap()).unwrap();
    Arc::new(Plan::with_content(&inputs(doms), cfg, 1, content).unwrap())
}

/// `[[schedule]]` entries: at each `(step, weights)`, a step change (no ramp) after the
/// first.
fn schedule(points: &[(u64, &[(&str, f64)])]) -> String {
    let mut s = String::new();
    for (i, (step, w)) in points.iter().enumerate() {
        let w: Vec<String> = w.iter().map(|(n, x)| format!("{n} = {x:?}")).collect();
        let ramp = if i == 0 { "" } else { "ramp = false\n" };
        s += &format!(
            "[[schedule]]\nstep = {step}\n{ramp}weights = {{ {} }}\n",
            w.join(", ")
        );
    }
    s
}

/// The next batch's rows per domain name, in each domain's stream order (the batch's
/// position shuffle undone: rows are planned domain by domain, then permuted).
fn rows_by_domain(p: &mut Planner) -> (u64, BTreeMap<String, Vec<Row>>) {
    let plan = p.plan().clone();
    let names: Vec<String> = plan.domain_names().iter().map(|n| n.to_string()).collect();
    let b = p.next_batch();
    let perm = Permutation::new(
        b.rows.len() as u64,
        derive_key(&[plan.config().seed, b.plan_step, 5]),
    );
    let mut planned: Vec<Option<Row>> = vec![None; b.rows.len()];
    for (j, row) in b.rows.into_iter().enumerate() {
        planned[perm.apply(j as u64) as usize] = Some(row);
    }
    let mut out: BTreeMap<String, Vec<Row>> = BTreeMap::new();
    for row in planned.into_iter().flatten() {
        out.entry(names[row.domain as usize].clone())
            .or_default()
            .push(row);
    }
    (b.plan_step, out)
}

/// Each domain's rows over `steps` batches from `p`, as (epoch, segments) in order, and
/// the first plan step each domain had a row.
type Streams = BTreeMap<String, Vec<(u32, Vec<millrace::plan::Segment>)>>;

fn streams(p: &mut Planner, steps: u64) -> (Streams, BTreeMap<String, u64>) {
    let mut out = Streams::new();
    let mut first = BTreeMap::new();
    for _ in 0..steps {
        let (step, by) = rows_by_domain(p);
        for (name, rows) in by {
            first.entry(name.clone()).or_insert(step);
            out.entry(name)
                .or_default()
                .extend(rows.into_iter().map(|r| (r.epoch, r.segments)));
        }
    }
    (out, first)
}

/// One stream is a prefix of the other: the domain's order is the same, however many
/// rows each run gave it.
fn same_order(
    name: &str,
    a: &[(u32, Vec<millrace::plan::Segment>)],
    b: &[(u32, Vec<millrace::plan::Segment>)],
) {
    let n = a.len().min(b.len());
    assert!(n > 0, "domain {name} had no rows");
    assert_eq!(a[..n], b[..n], "domain {name}: its order changed");
}

/// No document starts twice within one epoch of one domain.
fn no_unit_twice(s: &Streams) {
    for (name, rows) in s {
        let mut seen = HashSet::new();
        for (epoch, segs) in rows {
            for seg in segs.iter().filter(|g| g.start == 0) {
                assert!(
                    seen.insert((*epoch, seg.shard, seg.doc)),
                    "domain {name}: document {}/{} twice in epoch {epoch}",
                    seg.shard,
                    seg.doc
                );
            }
        }
    }
}

fn batches(p: &mut Planner, n: u64) -> Vec<millrace::plan::GlobalBatch> {
    (0..n).map(|_| p.next_batch()).collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

    /// Add domain c at step S: a and b keep their order (rows aside), c has rows from S
    /// on only, no document repeats within an epoch, and blobs from before (written by
    /// the run without c) and after the change resume bit for bit; a blob of the run
    /// without c from after S is refused (c would have had rows before it).
    #[test]
    fn add_a_domain_at_step_s(
        seed in 0u64..1000,
        rows in 1u32..6,
        s in 1u64..30,
        before in 0u64..30,
        after in 0u64..20,
        pos in 0usize..3,
        wa in 1u32..4,
        wc in 1u32..4,
    ) {
        let before = before % s;
        let (a, b, c) = (dom("a", 2, 40, 1), dom("b", 1, 60, 5), dom("c", 2, 30, 9));
        let old = plan(
            &[a.clone(), b.clone()],
            seed,
            rows,
            &schedule(&[(0, &[("a", wa as f64), ("b", 1.0)])]),
        );
        let mut doms = vec![a, b];
        doms.insert(pos, c);
        let new = plan(
            &doms,
            seed,
            rows,
            &schedule(&[
                (0, &[("a", wa as f64), ("b", 1.0), ("c", 0.0)]),
                (s, &[("a", 1.0), ("b", 1.0), ("c", wc as f64)]),
            ]),
        );
        let horizon = s + 40;
        let (want, _) = streams(&mut old.start(), horizon);
        let (got, first) = streams(&mut new.start(), horizon);
        for name in ["a", "b"] {
            same_order(name, &want[name], &got[name]);
        }
        prop_assert!(first.get("c").is_some_and(|&f| f >= s), "c at {:?}, S = {s}", first.get("c"));
        no_unit_twice(&got);
        // The old run's blob from before S resumes under the new config as if the new
        // config had run from step 0.
        let blob = old.seek(before).cursor();
        let mut resumed = new.restore(&blob).unwrap();
        let mut fresh = new.seek(before);
        prop_assert_eq!(resumed.cursor(), fresh.cursor());
        prop_assert_eq!(batches(&mut resumed, horizon - before), batches(&mut fresh, horizon - before));
        // The new run's blob from after S resumes bit for bit.
        let blob = new.seek(s + after).cursor();
        let mut resumed = new.restore(&blob).unwrap();
        let mut fresh = new.seek(s + after);
        prop_assert_eq!(batches(&mut resumed, 10), batches(&mut fresh, 10));
        // The old run's blob from after S: c had weight before it.
        let blob = old.seek(s + 1 + after).cursor();
        let refused = new.restore(&blob).err();
        prop_assert!(
            matches!(&refused, Some(CursorError::DomainEarly { domain, .. }) if domain == "c"),
            "{refused:?}"
        );
    }
}

/// A domain weighted 0 from step 20 to 40 keeps its position: from 40 it continues
/// where it stopped, with no document again before its epoch ends; a blob taken while
/// it rests resumes bit for bit.
#[test]
fn a_domain_weighted_zero_keeps_its_position() {
    let doms = [dom("a", 2, 40, 1), dom("b", 1, 60, 5)];
    let steady = plan(&doms, 3, 4, &schedule(&[(0, &[("a", 1.0), ("b", 1.0)])]));
    let resting = plan(
        &doms,
        3,
        4,
        &schedule(&[
            (0, &[("a", 1.0), ("b", 1.0)]),
            (20, &[("a", 0.0), ("b", 1.0)]),
            (40, &[("a", 1.0), ("b", 1.0)]),
        ]),
    );
    let (want, _) = streams(&mut steady.start(), 80);
    let mut p = resting.start();
    let (early, _) = streams(&mut p, 20);
    let (rest, _) = streams(&mut p, 20);
    let (late, _) = streams(&mut p, 40);
    assert!(!rest.contains_key("a"), "a had rows while weighted 0");
    let mut a = early["a"].clone();
    a.extend(late["a"].iter().cloned());
    same_order("a", &want["a"], &a);
    let mut all = early.clone();
    all.get_mut("a").unwrap().extend(late["a"].iter().cloned());
    no_unit_twice(&all);
    let blob = resting.seek(30).cursor();
    let mut r = resting.restore(&blob).unwrap();
    assert_eq!(batches(&mut r, 20), batches(&mut resting.seek(30), 20));
    // The steady run's blob from step 10 resumes under the resting config.
    let mut r = resting.restore(&steady.seek(10).cursor()).unwrap();
    assert_eq!(batches(&mut r, 40), batches(&mut resting.seek(10), 40));
}

fn refusal(plan: &Arc<Plan>, blob: &[u8]) -> CursorError {
    match plan.restore(blob) {
        Ok(_) => panic!("the blob was accepted"),
        Err(e) => e,
    }
}

/// A shard rewritten in place (same documents and tokens, other content) is refused,
/// naming the domain and the shard; so are other lengths, a removed shard, a removed
/// domain, and a blob's live changes over other domains.
#[test]
fn a_changed_domain_is_refused_naming_it() {
    let doms = [dom("a", 3, 40, 1), dom("b", 1, 60, 5)];
    let w = schedule(&[(0, &[("a", 1.0), ("b", 1.0)])]);
    let ids = vec![vec![11u128, 12, 13], vec![21]];
    let ours = plan_with(&doms, 3, 4, &w, &ids);
    let blob = ours.seek(12).cursor();
    // Content identity of a/1 changed, counts the same.
    let mut other = ids.clone();
    other[0][1] = 99;
    let e = refusal(&plan_with(&doms, 3, 4, &w, &other), &blob);
    assert_eq!(
        e.to_string(),
        "domain a: shard a/1 (#1) changed content since the blob was written, or the \
         domain's grouping was turned on or off (a grouped domain's shards count their \
         .groups.npy sidecars as content); the blob's position in it would name other documents (a changed shard needs a new domain name \
         or a fresh run)"
    );
    // Lengths of b/0 changed.
    let mut longer = doms.clone();
    longer[1].shards[0][3] += 1;
    let e = refusal(&plan_with(&longer, 3, 4, &w, &ids), &blob);
    assert!(
        e.to_string()
            .starts_with("domain b: shard b/0 (#0) changed"),
        "{e}"
    );
    // A shard appended to a running domain (an increment goes in as a domain of its
    // own, docs/DESIGN.md "Corpus evolution").
    let mut more = doms.clone();
    more[0].shards.push(vec![5; 10]);
    let e = refusal(
        &plan_with(&more, 3, 4, &w, &[vec![11, 12, 13, 14], vec![21]]),
        &blob,
    );
    assert!(
        e.to_string().starts_with(
            "domain a: the config lists 4 shards, the blob knew 3: shards added to a running \
             domain (from a/3) are not supported; add them as a new domain"
        ),
        "{e}"
    );
    // The blob's records fit what the daemon's cursor field is told of.
    let c = cursor::decode(&blob).unwrap();
    let records: usize = c
        .domains
        .iter()
        .map(|d| 2 + d.name.len() + 22 + 4 * d.tags.len())
        .sum();
    assert_eq!(ours.cursor_domain_bytes(), records);
    // A shard removed.
    let mut fewer = doms.clone();
    fewer[0].shards.pop();
    let e = refusal(&plan_with(&fewer, 3, 4, &w, &ids[..]), &blob);
    assert!(
        e.to_string()
            .contains("the blob knew 3 shards, the config lists 2"),
        "{e}"
    );
    // The domain removed.
    let only_a = plan_with(&doms[..1], 3, 4, &schedule(&[(0, &[("a", 1.0)])]), &ids);
    assert_eq!(
        refusal(&only_a, &blob),
        CursorError::DomainGone { domain: "b".into() }
    );
    // The same corpus under another seed is another plan.
    let seeded = plan_with(&doms, 4, 4, &w, &ids);
    assert!(matches!(
        refusal(&seeded, &blob),
        CursorError::Fingerprint { .. }
    ));
    // A journal of live changes over two domains, resumed where there are three.
    let change = ours
        .weights_change(5, &BTreeMap::from([("a".to_string(), 3.0)]))
        .unwrap();
    let live = Arc::new(ours.with_journal(vec![change]).unwrap());
    let blob = live.seek(12).cursor();
    let mut three = doms.to_vec();
    three.push(dom("c", 1, 20, 2));
    let w3 = schedule(&[(0, &[("a", 1.0), ("b", 1.0), ("c", 0.0)])]);
    let mut ids3 = ids.clone();
    ids3.push(vec![31]);
    let grown = plan_with(&three, 3, 4, &w3, &ids3);
    // Its weights are mapped by name, the new domain at weight 0 (every later blob of a
    // run carries its changes, so refusing them refused the run any new domain).
    let r = grown
        .resume(&blob, 1 << 14)
        .expect("the journal maps by name");
    assert!(r.adopted);
    assert_eq!(r.plan.journal()[0].points[0].1, [3.0, 1.0, 0.0]);
    // A ramp that gives c weight before the blob's step.
    let blob = plan(&doms, 3, 4, &w).seek(12).cursor();
    let ramp = "[[schedule]]\nstep = 0\nweights = { a = 1.0, b = 1.0, c = 0.0 }\n\
                [[schedule]]\nstep = 40\nweights = { a = 1.0, b = 1.0, c = 1.0 }\n";
    let e = refusal(&plan(&three, 3, 4, ramp), &blob);
    assert!(
        matches!(&e, CursorError::DomainEarly { domain, step: 11, plan_step: 12 } if domain == "c"),
        "{e:?}"
    );
    // The blob records its domains by name.
    let c = cursor::decode(&blob).unwrap();
    let names: Vec<&str> = c.domains.iter().map(|d| d.name.as_str()).collect();
    assert_eq!(names, ["a", "b"]);
}

/// An increment of shards enters as a domain of its own from step S (the semantics
/// docs/DESIGN.md "Corpus evolution" decides): over many epochs of both, every unit of
/// each appears exactly once per completed epoch, the old domain's epochs straddling S
/// included, and the increment has no row before S.
#[test]
fn an_increment_covers_each_unit_once_per_epoch() {
    let old = dom("a", 2, 12, 1);
    let mut inc = dom("a-2", 1, 12, 7);
    inc.shards[0].truncate(9);
    let b = dom("b", 1, 40, 5);
    for s in [1u64, 7, 23] {
        let p = plan(
            &[old.clone(), b.clone(), inc.clone()],
            5,
            3,
            &schedule(&[
                (0, &[("a", 1.0), ("b", 1.0), ("a-2", 0.0)]),
                (s, &[("a", 1.0), ("b", 1.0), ("a-2", 0.5)]),
            ]),
        );
        let (got, first) = streams(&mut p.start(), 300);
        assert!(first["a-2"] >= s, "a-2 at {}, S = {s}", first["a-2"]);
        for (name, d) in [("a", &old), ("a-2", &inc)] {
            let units: usize = d.shards.iter().map(Vec::len).sum();
            let mut epochs: BTreeMap<u32, Vec<(u32, u64)>> = BTreeMap::new();
            for (epoch, segs) in &got[name] {
                for g in segs.iter().filter(|g| g.start == 0) {
                    epochs.entry(*epoch).or_default().push((g.shard, g.doc));
                }
            }
            let last = *epochs.keys().last().unwrap();
            assert!(last >= 2, "{name}: only {last} epochs");
            for (epoch, mut seen) in epochs.into_iter().filter(|(e, _)| *e < last) {
                seen.sort_unstable();
                let n = seen.len();
                seen.dedup();
                assert_eq!(
                    (n, seen.len()),
                    (units, units),
                    "{name} epoch {epoch}, S = {s}"
                );
            }
        }
    }
}

/// Bursty domains: one added at the end keeps the others' phases, and a blob of the run
/// without it resumes bit for bit exactly while no cycle of the new domain begun before
/// the blob reaches its step S (a bursty cycle takes its rows at its first step, from
/// the weights of its later ones). Added before a bursty domain, it moves that domain's
/// phase, and the blob is refused naming it.
#[test]
fn a_bursty_domain_added_keeps_the_others_phases() {
    let bursty = |name, period, salt| Dom {
        settings: DomainSettings {
            bursty: Some(millrace::config::plan::Bursty { period }),
            ..DomainSettings::default()
        },
        ..dom(name, 1, 50, salt)
    };
    let (a, b, c) = (bursty("a", 3, 1), dom("b", 2, 40, 5), bursty("c", 2, 9));
    let s = 10;
    let old = plan(
        &[a.clone(), b.clone()],
        2,
        6,
        // a takes 3 steps' rows in one: at most a third of the rows may be its.
        &schedule(&[(0, &[("a", 1.0), ("b", 3.0)])]),
    );
    let w = schedule(&[
        (0, &[("a", 1.0), ("b", 3.0), ("c", 0.0)]),
        (s, &[("a", 1.0), ("b", 3.0), ("c", 1.0)]),
    ]);
    let new = plan(&[a.clone(), b.clone(), c.clone()], 2, 6, &w);
    let mut accepted = 0;
    for t in 0..14 {
        match new.restore(&old.seek(t).cursor()) {
            Ok(mut r) => {
                accepted += 1;
                assert!(t < s, "a blob at {t}, after c's step, was accepted");
                assert_eq!(
                    batches(&mut r, 20),
                    batches(&mut new.seek(t), 20),
                    "t = {t}"
                );
            }
            Err(e) => {
                assert!(t + 2 > s, "a blob at {t} was refused: {e}");
                assert!(
                    matches!(&e, CursorError::DomainEarly { domain, .. } if domain == "c"),
                    "{e:?}"
                );
            }
        }
    }
    assert!(accepted >= s as usize - 1, "{accepted}");
    let first = plan(&[c, a, b], 2, 6, &w);
    let e = refusal(&first, &old.seek(4).cursor());
    assert_eq!(
        e.to_string(),
        "domain a: its settings changed since the blob was written (or its place among the \
         bursty domains); the blob's position in it would name other documents (a changed \
         shard needs a new domain name or a fresh run)"
    );
}
