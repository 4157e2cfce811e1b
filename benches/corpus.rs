//! Corpus-layer micro-benchmarks, each next to a physical reference measured in the same
//! run (these machines are shared and noisy, so ratios are what to compare).
//!
//! - `open`: opening one Megatron shard (header and O(1) checks only).
//! - `validate`: the linear pass over an `.idx`, in index bytes per second.
//! - `doc_tokens`: random document access through the mapping.
//! - `raw_scan`: building a raw array's boundary index (EOS scan + cache write).
//! - `memcpy`: the reference, copying the same number of bytes as `raw_scan` reads.
//!
//! Run with `cargo bench --bench corpus`; figures go to docs/BENCHMARKS.md.

use std::hint::black_box;
use std::path::Path;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use millrace::corpus::{DType, RawOptions, Shard};
use millrace::synth::{self, SynthOptions};

fn corpus(dir: &Path) -> std::path::PathBuf {
    synth::synth(&SynthOptions {
        out: dir.to_path_buf(),
        tokens: 50_000_000,
        domains: 1,
        vocab: 50304,
        dtype: DType::Uint16,
        seed: 1,
        shard_tokens: 50_000_000,
        threads: 1,
        progress: false,
    })
    .expect("synth for the benchmark");
    synth::shard_prefix(dir, "web", 0)
}

fn benches(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let prefix = corpus(dir.path());
    let shard = Shard::open(&prefix, None).expect("open");
    let idx_bytes = shard
        .as_megatron()
        .map_or(0, |m| m.idx_bytes().len() as u64);
    let docs = shard.documents();

    let mut g = c.benchmark_group("corpus");
    g.bench_function("open", |b| {
        b.iter(|| Shard::open(black_box(&prefix), None).map(|s| s.documents()))
    });

    g.throughput(Throughput::Bytes(idx_bytes));
    g.bench_function("validate", |b| b.iter(|| shard.validate()));

    g.throughput(Throughput::Elements(1024));
    g.bench_function("doc_tokens_random_1024", |b| {
        b.iter(|| {
            let mut x = 0x9E37_79B9_7F4A_7C15u64;
            let mut sum = 0usize;
            for _ in 0..1024 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                sum += shard.doc_tokens(x % docs).map_or(0, |t| t.len());
            }
            sum
        })
    });

    // A raw file: the same tokens as the Megatron shard, without an index.
    let raw = dir.path().join("tokens.u16");
    std::fs::copy(
        millrace::corpus::megatron::with_suffix(&prefix, "bin"),
        &raw,
    )
    .expect("copy");
    let raw_len = std::fs::metadata(&raw).map_or(0, |m| m.len());
    let cache_dir = dir.path().join("cache");
    let opts = RawOptions {
        dtype: DType::Uint16,
        eos: u64::from(synth::EOD),
        cache_dir: Some(cache_dir.clone()),
    };
    g.throughput(Throughput::Bytes(raw_len));
    g.sample_size(10);
    g.bench_function("raw_scan", |b| {
        b.iter(|| {
            let _ = std::fs::remove_dir_all(&cache_dir);
            Shard::open(&raw, Some(&opts)).map(|s| s.documents())
        })
    });
    let src = std::fs::read(&raw).expect("read");
    let mut dst = vec![0u8; src.len()];
    g.bench_function("memcpy_reference", |b| {
        b.iter(|| {
            dst.copy_from_slice(black_box(&src));
            dst[dst.len() / 2]
        })
    });
    g.finish();
}

criterion_group!(corpus_benches, benches);
criterion_main!(corpus_benches);
