//! Planner benchmarks: the permutation (ns per index), the plan in rows/s for every
//! packing and grouping mode, and the cursor (encode, decode, restore, next to the seek
//! a restore saves).
//!
//! Run with `cargo bench --bench plan`. With `MILLRACE_BENCH_CONFIG=<millrace.toml>` it
//! also times building the plan for that corpus, the first global batch, and a seek to
//! `MILLRACE_BENCH_SEEK` (default 10,000) steps.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use millrace::config::plan::{DomainSettings, GroupMode, Grouping, Packing, PlanConfig};
use millrace::corpus::GroupRun;
use millrace::plan::{permute::Permutation, DomainInput, MemShard, Plan};
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, LogNormal};

/// A synthetic domain: lognormal lengths (median 300, heavy tail), groups of 1-64 docs.
fn domain(name: &str, docs: usize, seed: u64, mode: GroupMode) -> DomainInput {
    let mut rng = rand_pcg::Pcg64::seed_from_u64(seed);
    let ln = LogNormal::new(300f64.ln(), 1.2).expect("valid lognormal");
    let lengths: Vec<u32> = (0..docs)
        .map(|_| (ln.sample(&mut rng) as u32).clamp(1, 1 << 20))
        .collect();
    let mut groups = Vec::new();
    let mut first = 0u64;
    while (first as usize) < docs {
        let n = rng.gen_range(1..=64u64).min(docs as u64 - first);
        groups.push(GroupRun {
            id: groups.len() as u64,
            first_doc: first,
            docs: n,
        });
        first += n;
    }
    DomainInput {
        name: name.into(),
        shards: vec![(
            format!("{name}-0"),
            Arc::new(MemShard {
                lengths,
                groups: Some(groups),
            }),
        )],
        settings: DomainSettings {
            grouping: Grouping {
                mode,
                ..Grouping::default()
            },
            ..DomainSettings::default()
        },
    }
}

fn config(packing: Packing, seq_len: u32) -> PlanConfig {
    let weights: BTreeMap<String, f64> = [("a", 0.5), ("b", 0.3), ("c", 0.2)]
        .iter()
        .map(|(n, w)| (n.to_string(), *w))
        .collect();
    PlanConfig {
        seed: 7,
        seq_len,
        global_batch_rows: 512,
        packing,
        best_fit_window: 16384,
        eod_token: Some(2),
        pad_token: 0,
        vocab_size: None,
        weights: Some(weights),
        schedule: Vec::new(),
        skip: Vec::new(),
        reseed: Vec::new(),
        stage: Vec::new(),
    }
}

fn plan(packing: Packing, mode: GroupMode) -> Arc<Plan> {
    let domains = vec![
        domain("a", 400_000, 1, GroupMode::Off),
        domain("b", 200_000, 2, mode),
        domain("c", 100_000, 3, GroupMode::Off),
    ];
    Arc::new(Plan::new(&domains, config(packing, 4096), 1).expect("valid bench plan"))
}

fn bench_permutation(c: &mut Criterion) {
    let mut g = c.benchmark_group("permute");
    for n in [1_000u64, 1_000_000, 100_000_000, 10_000_000_000] {
        let p = Permutation::new(n, 42);
        g.throughput(Throughput::Elements(1024));
        g.bench_function(format!("apply_n{n}"), |b| {
            b.iter(|| {
                let mut acc = 0u64;
                for i in 0..1024u64 {
                    acc ^= p.apply(black_box(i * 977 % n));
                }
                acc
            })
        });
    }
    g.finish();
}

fn bench_plan(c: &mut Criterion) {
    let mut g = c.benchmark_group("plan");
    g.sample_size(10);
    for packing in [Packing::Concat, Packing::BestFit] {
        for mode in [GroupMode::Off, GroupMode::Sequence, GroupMode::Batch] {
            if packing == Packing::Concat && mode == GroupMode::Batch {
                continue; // not a valid combination
            }
            let p = plan(packing, mode);
            let steps = 20u64;
            g.throughput(Throughput::Elements(steps * 512));
            g.bench_function(format!("{packing:?}_{mode:?}_rows"), |b| {
                b.iter_batched(
                    || p.start(),
                    |mut planner| {
                        for _ in 0..steps {
                            black_box(planner.next_batch());
                        }
                    },
                    BatchSize::LargeInput,
                )
            });
        }
    }
    g.finish();
}

fn bench_cursor(c: &mut Criterion) {
    let p = plan(Packing::BestFit, GroupMode::Sequence);
    let mut planner = p.seek(50);
    planner.next_batch();
    let blob = planner.cursor();
    let mut g = c.benchmark_group("cursor");
    g.bench_function("encode", |b| b.iter(|| black_box(planner.cursor())));
    g.bench_function("decode", |b| {
        b.iter(|| black_box(millrace::plan::cursor::decode(&blob)))
    });
    g.bench_function("restore", |b| {
        b.iter(|| black_box(p.restore(&blob).is_ok()))
    });
    // What restoring from the blob saves: replaying the plan up to the same step.
    g.sample_size(10);
    g.bench_function("seek_51", |b| b.iter(|| black_box(p.seek(51).step())));
    g.finish();
    // A figure for docs/BENCHMARKS.md; `cargo test` runs this bench once as a test and
    // should stay quiet there.
    if std::env::args().any(|a| a == "--bench") {
        eprintln!("cursor blob: {} bytes for 3 domains", blob.len());
    }
}

fn bench_corpus(c: &mut Criterion) {
    let Ok(path) = std::env::var("MILLRACE_BENCH_CONFIG") else {
        return;
    };
    let seek: u64 = std::env::var("MILLRACE_BENCH_SEEK")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10_000);
    let cfg = millrace::config::Config::load(std::path::Path::new(&path)).expect("bench config");
    let mut g = c.benchmark_group("corpus_plan");
    g.sample_size(10);
    g.bench_function("load_and_first_batch", |b| {
        b.iter(|| {
            let loaded = cfg.load_plan().expect("plan");
            black_box(loaded.plan.start().next_batch())
        })
    });
    let loaded = cfg.load_plan().expect("plan");
    g.bench_function("first_batch", |b| {
        b.iter(|| black_box(loaded.plan.start().next_batch()))
    });
    g.bench_function(format!("seek_{seek}"), |b| {
        b.iter(|| black_box(loaded.plan.seek(seek).step()))
    });
    g.finish();
}

criterion_group!(
    benches,
    bench_permutation,
    bench_plan,
    bench_cursor,
    bench_corpus
);
criterion_main!(benches);
