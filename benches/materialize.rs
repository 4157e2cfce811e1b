//! Materializer benchmark: filling one rank's slot from mapped shards, next to a plain
//! memcpy of the same bytes measured in the same run. Compact slots (the default: the
//! rows' uint16 tokens copied span by span, with and without the vocabulary check) and
//! expanded ones (tokens, labels, loss mask, position ids, cu_seqlens, as int32 and
//! int64), in GB/s of what each slot carries for the trainer.
//!
//! `fill_slot_compact_scattered` fills every rank's slot of successive steps in turn, so
//! that (unlike the others, which cycle 16 slots whose sources stay in the CPU caches)
//! each fill reads spans scattered over the whole corpus, as the daemon does: it
//! measures the index lookups and the first-line misses of each span as well as the copy.
//!
//! Run with `cargo bench --bench materialize`. The corpus is synthesized once into
//! `target/bench-materialize` (2e7 tokens, page cache warm after the first pass);
//! `MILLRACE_BENCH_CONFIG=path/to/millrace.toml` runs it on another (a corpus larger
//! than the last-level cache shows the misses best).

use std::hint::black_box;
use std::path::PathBuf;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use millrace::config::serve::Reader;
use millrace::config::Config;
use millrace::corpus::DType;
use millrace::serve::fill::{fill_slot, RankRows, Readers, SlotJob, Source};
use millrace::serve::ring::{Layout, Ring, TokenType};
use millrace::synth::{synth, SynthOptions};

fn corpus() -> PathBuf {
    if let Some(cfg) = std::env::var_os("MILLRACE_BENCH_CONFIG") {
        return cfg.into();
    }
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench-materialize");
    let cfg = dir.join("millrace.toml");
    if !cfg.exists() {
        synth(&SynthOptions {
            out: dir.clone(),
            tokens: 20_000_000,
            domains: 2,
            vocab: 50304,
            dtype: DType::Uint16,
            seed: 1,
            shard_tokens: 250_000_000,
            threads: 2,
            progress: false,
        })
        .expect("synthesize the bench corpus");
    }
    cfg
}

fn bench(c: &mut Criterion) {
    let cfg = Config::load(&corpus()).expect("bench config");
    let loaded = cfg.load_plan().expect("bench plan");
    let plan_cfg = loaded.plan.config().clone();
    let rows = 8u32;
    let ranks = plan_cfg.global_batch_rows / rows;
    let mut planner = loaded.plan.start();
    let jobs: Vec<SlotJob> = (0..16)
        .map(|_| {
            let b = planner.next_batch();
            SlotJob {
                step: b.step,
                plan_step: b.plan_step,
                seq_len: plan_cfg.seq_len,
                rows: b.rank_rows(0, ranks).to_vec().into(),
                cursor: planner.cursor(),
                plan_state: 0,
            }
        })
        .collect();
    // Every rank's rows of the next steps: about 64 MiB of spans, one pass over them.
    let seq_len = plan_cfg.seq_len;
    let scattered: Vec<SlotJob> = (0..64)
        .flat_map(|_| {
            let b = std::sync::Arc::new(planner.next_batch());
            let cursor = planner.cursor();
            (0..ranks).map(move |r| SlotJob {
                step: b.step,
                plan_step: b.plan_step,
                seq_len,
                rows: RankRows::of(b.clone(), r, ranks),
                cursor: cursor.clone(),
                plan_state: 0,
            })
        })
        .collect();
    let source = Source {
        shards: loaded.shards,
        pad_token: plan_cfg.pad_token,
        vocab_size: plan_cfg.vocab_size,
        readers: Readers::copy(Reader::MmapWillneed),
    };
    let mut g = c.benchmark_group("materialize");
    let seq = plan_cfg.seq_len;
    let mut i = 0usize;
    let mut fill = |g: &mut criterion::BenchmarkGroup<'_, _>,
                    name: String,
                    layout: &Layout,
                    src: &Source,
                    jobs: &[SlotJob]| {
        let ring = Ring::create("bench", layout.clone(), 0).expect("ring");
        g.bench_function(name, |b| {
            b.iter(|| {
                let job = &jobs[i % jobs.len()];
                i += 1;
                let mut slot = ring.claim(job.step).expect("claim");
                black_box(fill_slot(&mut slot, layout, job, src).expect("fill"))
            })
        });
    };
    let memcpy = |g: &mut criterion::BenchmarkGroup<'_, _>, name: String, bytes: u64| {
        let src = vec![1u8; bytes as usize];
        let mut dst = vec![0u8; bytes as usize];
        g.bench_function(name, |b| {
            b.iter(|| {
                dst.copy_from_slice(black_box(&src));
                black_box(&dst);
            })
        });
    };
    // Compact: rows x (seq + 1) uint16 tokens plus a bit per token of document starts.
    let token = source.compact_token();
    let compact = Layout::compact(rows, seq, 2, token, 16384);
    let tokens = rows as u64 * (seq as u64 + 1) * token.0.size() as u64;
    let payload = tokens + (rows as usize * compact.starts_bytes) as u64;
    g.throughput(Throughput::Bytes(payload));
    fill(
        &mut g,
        format!("fill_slot_compact_{}_{rows}x{seq}", token.0),
        &compact,
        &source,
        &jobs,
    );
    fill(
        &mut g,
        format!("fill_slot_compact_{}_scattered", token.0),
        &compact,
        &source,
        &scattered,
    );
    let unchecked = Source {
        shards: source.shards.clone(),
        pad_token: source.pad_token,
        vocab_size: None,
        readers: Readers::copy(Reader::MmapWillneed),
    };
    // uint16 ids cannot be negative: without a vocabulary below 2^16 there is no check.
    fill(
        &mut g,
        format!("fill_slot_compact_{}_no_vocab_check", token.0),
        &compact,
        &unchecked,
        &jobs,
    );
    memcpy(&mut g, "memcpy_reference_compact".into(), payload);
    for (name, dtype) in [("int32", DType::Int32), ("int64", DType::Int64)] {
        let layout = Layout::new(rows, seq, 2, TokenType(dtype), 16384);
        // tokens + labels + loss_mask + position_ids: what a trainer copies to the GPU.
        let payload = rows as u64 * seq as u64 * (2 * dtype.size() as u64 + 1 + 4);
        g.throughput(Throughput::Bytes(payload));
        fill(
            &mut g,
            format!("fill_slot_{name}_{rows}x{seq}"),
            &layout,
            &source,
            &jobs,
        );
        memcpy(&mut g, format!("memcpy_reference_{name}"), payload);
    }
    g.finish();
}

/// The wake-up a publish sends each peer ([`millrace::sys::EventFd::signal`]): its
/// cost per call against a plain eventfd write, drained every 1000 calls as a consumer
/// would (docs/DESIGN.md, "Notification").
fn wake(c: &mut Criterion) {
    use millrace::sys::EventFd;
    let ev = EventFd::new().expect("eventfd");
    let drain = |ev: &EventFd, i: &mut u32| {
        *i += 1;
        if *i % 1000 == 0 {
            let _ = ev.drain();
        }
    };
    let mut g = c.benchmark_group("wake");
    let mut i = 0;
    g.bench_function("signal", |b| {
        b.iter(|| {
            black_box(ev.signal());
            drain(&ev, &mut i);
        })
    });
    g.bench_function("plain write", |b| {
        b.iter(|| {
            black_box(rustix::io::write(ev.fd(), &1u64.to_ne_bytes()).ok());
            drain(&ev, &mut i);
        })
    });
    g.finish();
}

criterion_group!(benches, bench, wake);
criterion_main!(benches);
