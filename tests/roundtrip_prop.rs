//! Property tests: random valid corpora, written by the independent test writer in
//! `tests/common`, read back exactly through the library; random raw token arrays split
//! on a random EOS.

mod common;

use std::path::{Path, PathBuf};

use common::{dtype_of, value_range, with, write_docs, write_npy, Doc, CODES};
use millrace::corpus::{resolve, CorpusError, DType, Format, RawOptions, Shard};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

// ---------------------------------------------------------------------------------------
// Megatron corpora
// ---------------------------------------------------------------------------------------

/// One sequence: a length and a seed its token values are drawn from (values are derived
/// rather than generated one by one, which keeps 64 cases of ~20k tokens fast in debug).
#[derive(Debug, Clone)]
struct SeqSpec {
    len: usize,
    seed: u64,
}

/// Groups as contiguous runs: document d starts a new run when `breaks[d]` (document 0
/// always does); run k gets id `base ^ k` (distinct for distinct k), masked to the
/// non-negative range when the sidecar is int64.
#[derive(Debug, Clone)]
struct GroupSpec {
    breaks: Vec<bool>,
    base: u64,
    signed: bool,
}

#[derive(Debug, Clone)]
struct ShardSpec {
    docs: Vec<Vec<SeqSpec>>,
    groups: Option<GroupSpec>,
}

#[derive(Debug, Clone)]
struct CorpusSpec {
    /// Index into `CODES`.
    code: usize,
    shards: Vec<ShardSpec>,
}

fn seq_spec() -> impl Strategy<Value = SeqSpec> {
    (0usize..=300, any::<u64>()).prop_map(|(len, seed)| SeqSpec { len, seed })
}

fn group_spec() -> impl Strategy<Value = GroupSpec> {
    (
        prop::collection::vec(prop::bool::weighted(0.3), 50),
        any::<u64>(),
        any::<bool>(),
    )
        .prop_map(|(breaks, base, signed)| GroupSpec {
            breaks,
            base,
            signed,
        })
}

fn shard_spec() -> impl Strategy<Value = ShardSpec> {
    (
        prop::collection::vec(prop::collection::vec(seq_spec(), 0..=4), 1..=50),
        prop::option::of(group_spec()),
    )
        .prop_map(|(docs, groups)| ShardSpec { docs, groups })
}

fn corpus_spec() -> impl Strategy<Value = CorpusSpec> {
    (
        0usize..CODES.len(),
        prop::collection::vec(shard_spec(), 1..=4),
    )
        .prop_map(|(code, shards)| CorpusSpec { code, shards })
}

fn splitmix(x: &mut u64) -> u64 {
    *x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *x;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Token values for one sequence: uniform over the dtype's range, with the two extremes
/// and zero over-represented.
fn seq_values(code: u8, s: &SeqSpec) -> Vec<i64> {
    let (lo, hi) = value_range(code);
    let span = (i128::from(hi) - i128::from(lo) + 1) as u128;
    let mut state = s.seed;
    (0..s.len)
        .map(|_| {
            let r = splitmix(&mut state);
            match r % 16 {
                0 => lo,
                1 => hi,
                2 => 0,
                _ => (i128::from(lo) + (u128::from(splitmix(&mut state)) % span) as i128) as i64,
            }
        })
        .collect()
}

fn materialize(code: u8, spec: &ShardSpec) -> Vec<Doc> {
    spec.docs
        .iter()
        .map(|doc| doc.iter().map(|s| seq_values(code, s)).collect())
        .collect()
}

/// The expected runs `(id, first_doc, docs)` and the ids, one per document.
fn expected_groups(g: &GroupSpec, documents: usize) -> (Vec<(u64, u64, u64)>, Vec<u64>) {
    let mask = if g.signed { i64::MAX as u64 } else { u64::MAX };
    let mut runs: Vec<(u64, u64, u64)> = Vec::new();
    let mut ids = Vec::with_capacity(documents);
    for d in 0..documents {
        if d == 0 || g.breaks[d] {
            let id = (g.base ^ runs.len() as u64) & mask;
            runs.push((id, d as u64, 0));
        }
        let run = runs.last_mut().unwrap();
        run.2 += 1;
        ids.push(run.0);
    }
    (runs, ids)
}

fn write_sidecar(prefix: &Path, g: &GroupSpec, ids: &[u64]) {
    let data: Vec<u8> = ids.iter().flat_map(|i| i.to_le_bytes()).collect();
    let descr = if g.signed { "<i8" } else { "<u8" };
    write_npy(
        &with(prefix, "groups.npy"),
        descr,
        &format!("({},)", ids.len()),
        &data,
    );
}

fn check_corpus(spec: &CorpusSpec) -> Result<(), TestCaseError> {
    let code = CODES[spec.code];
    let dtype = dtype_of(code.code);
    let dir = tempfile::tempdir().unwrap();
    let mut prefixes: Vec<PathBuf> = Vec::new();
    let mut all_docs: Vec<Vec<Doc>> = Vec::new();
    let mut all_groups = Vec::new();
    for (i, s) in spec.shards.iter().enumerate() {
        let docs = materialize(code.code, s);
        let prefix = write_docs(dir.path(), &format!("shard{i}"), code, &docs);
        let groups = s.groups.as_ref().map(|g| {
            let (runs, ids) = expected_groups(g, docs.len());
            write_sidecar(&prefix, g, &ids);
            (runs, ids)
        });
        prefixes.push(prefix);
        all_docs.push(docs);
        all_groups.push(groups);
    }
    prop_assert_eq!(
        resolve(dir.path(), Format::Megatron).unwrap(),
        prefixes.clone()
    );

    for ((prefix, docs), groups) in prefixes.iter().zip(&all_docs).zip(&all_groups) {
        let shard = Shard::open(prefix, None).unwrap();
        shard.validate().unwrap();
        let n = docs.len() as u64;
        let seqs: usize = docs.iter().map(Vec::len).sum();
        let tokens: usize = docs.iter().flatten().map(Vec::len).sum();
        prop_assert_eq!(shard.dtype(), dtype);
        prop_assert_eq!(shard.format(), Format::Megatron);
        prop_assert_eq!(shard.documents(), n);
        prop_assert_eq!(shard.sequences(), seqs as u64);
        prop_assert_eq!(shard.tokens(), tokens as u64);
        prop_assert_eq!(shard.data_bytes(), (tokens * code.size) as u64);

        let m = shard.as_megatron().unwrap();
        let lens: Vec<i32> = (0..m.sequences()).map(|i| m.sequence_length(i)).collect();
        let want_lens: Vec<i32> = docs.iter().flatten().map(|s| s.len() as i32).collect();
        prop_assert_eq!(lens, want_lens);

        for (d, doc) in docs.iter().enumerate() {
            let d = d as u64;
            let want: Vec<i64> = doc.iter().flatten().copied().collect();
            prop_assert_eq!(shard.doc_len(d).unwrap(), want.len() as u64);
            let t = shard.doc_tokens(d).unwrap();
            prop_assert_eq!(t.dtype(), dtype);
            prop_assert_eq!(t.len(), want.len());
            let encoded = common::encode(code.code, &want);
            prop_assert_eq!(t.as_bytes(), encoded.as_slice());
            let got: Vec<i64> = (0..t.len()).map(|i| t.get_i64(i).unwrap()).collect();
            prop_assert_eq!(got, want);
        }
        let oob = matches!(
            shard.doc_tokens(n),
            Err(CorpusError::DocOutOfRange { doc, count, .. }) if doc == n && count == n
        );
        prop_assert!(oob);

        match (groups, shard.groups()) {
            (None, None) => {}
            (Some((runs, ids)), Some(g)) => {
                let got: Vec<(u64, u64, u64)> = g
                    .runs()
                    .iter()
                    .map(|r| (r.id, r.first_doc, r.docs))
                    .collect();
                prop_assert_eq!(&got, runs);
                prop_assert_eq!(g.len(), runs.len());
                for (d, id) in ids.iter().enumerate() {
                    prop_assert_eq!(g.group_of(d as u64), Some(*id));
                }
                prop_assert_eq!(g.group_of(n), None);
            }
            (want, got) => prop_assert!(false, "groups: wanted {want:?}, got {got:?}"),
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Raw arrays
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct RawSpec {
    wide: bool,
    eos_seed: u32,
    /// (value seed, is this token an EOS)
    tokens: Vec<(u32, bool)>,
    cache_dir: bool,
}

fn raw_spec() -> impl Strategy<Value = RawSpec> {
    (
        any::<bool>(),
        any::<u32>(),
        prop::collection::vec((any::<u32>(), prop::bool::weighted(0.08)), 1..2000),
        any::<bool>(),
    )
        .prop_map(|(wide, eos_seed, tokens, cache_dir)| RawSpec {
            wide,
            eos_seed,
            tokens,
            cache_dir,
        })
}

fn check_raw(spec: &RawSpec) -> Result<(), TestCaseError> {
    let modulus: u64 = if spec.wide { 1 << 32 } else { 1 << 16 };
    let eos = u64::from(spec.eos_seed) % modulus;
    let tokens: Vec<u64> = spec
        .tokens
        .iter()
        .map(|&(v, is_eos)| {
            if is_eos {
                eos
            } else {
                let v = u64::from(v) % modulus;
                if v == eos {
                    (v + 1) % modulus
                } else {
                    v
                }
            }
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokens.bin");
    let bytes: Vec<u8> = if spec.wide {
        tokens
            .iter()
            .flat_map(|&t| (t as u32).to_le_bytes())
            .collect()
    } else {
        tokens
            .iter()
            .flat_map(|&t| (t as u16).to_le_bytes())
            .collect()
    };
    std::fs::write(&path, &bytes).unwrap();
    let opts = RawOptions {
        dtype: if spec.wide {
            DType::Uint32
        } else {
            DType::Uint16
        },
        eos,
        cache_dir: spec.cache_dir.then(|| dir.path().join("cache")),
    };

    let eos_count = tokens.iter().filter(|&&t| t == eos).count();
    let ends_with_eos = tokens.last() == Some(&eos);
    let want_docs = eos_count + usize::from(!ends_with_eos);

    for pass in 0..2 {
        let shard = Shard::open(&path, Some(&opts)).unwrap();
        shard.validate().unwrap();
        let raw = shard.as_raw().unwrap();
        prop_assert_eq!(raw.cache_rebuilt(), pass == 0, "pass {}", pass);
        prop_assert_eq!(shard.format(), Format::Raw);
        prop_assert_eq!(shard.dtype(), opts.dtype);
        prop_assert_eq!(shard.tokens(), tokens.len() as u64);
        prop_assert_eq!(shard.documents(), want_docs as u64);
        let n = shard.documents();
        let mut concat: Vec<u64> = Vec::with_capacity(tokens.len());
        for d in 0..n {
            let t = shard.doc_tokens(d).unwrap();
            prop_assert_eq!(t.dtype(), opts.dtype);
            prop_assert_eq!(shard.doc_len(d).unwrap(), t.len() as u64);
            prop_assert!(!t.is_empty(), "document {} is empty", d);
            let vals: Vec<u64> = (0..t.len()).map(|i| t.get_i64(i).unwrap() as u64).collect();
            let last = d + 1 == n;
            // Only the last token may be (and, except for a trailing document, is) EOS.
            let inner_eos = vals[..vals.len() - 1].contains(&eos);
            prop_assert!(!inner_eos, "document {} has an EOS before its end", d);
            let ends = *vals.last().unwrap() == eos;
            prop_assert!(
                ends || (last && !ends_with_eos),
                "document {} lacks its EOS",
                d
            );
            concat.extend(vals);
        }
        prop_assert_eq!(&concat, &tokens);
        let oob = matches!(shard.doc_tokens(n), Err(CorpusError::DocOutOfRange { .. }));
        prop_assert!(oob, "document {} is past the end", n);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 64,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn megatron_corpora_read_back_exactly(spec in corpus_spec()) {
        check_corpus(&spec)?;
    }

    #[test]
    fn raw_arrays_split_on_eos(spec in raw_spec()) {
        check_raw(&spec)?;
    }
}
