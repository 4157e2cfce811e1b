//! The `.npy` readers and the raw shards' files. Byte 0 picks: (0) a group sidecar
//! (`<prefix>.groups.npy`) of a nine-document Megatron shard, read by `Shard::open`
//! and `Groups::open`; (1) a raw uint16 token file (eos 0; a `.npy` header is refused by
//! name), opened twice (the second open reads the boundary cache the first wrote);
//! (2) the document ends of a raw shard's boundary cache, sealed with the real key and
//! checksum so that only the structural checks judge them. Whatever opens must read
//! every document or refuse it by name.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use millrace::corpus::{groups, DType, Groups, RawOptions, RawShard, Shard};
use millrace_fuzz::{megatron_files, put, scratch, write_seeds_and_exit_if_asked};

/// Where the sidecar target's shard lies (written once).
fn grouped_prefix() -> &'static PathBuf {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| {
        let (idx, bin) = megatron_files(DType::Uint8, 9);
        let prefix = scratch().join("grouped");
        put(&prefix.with_extension("idx"), &idx);
        put(&prefix.with_extension("bin"), &bin);
        prefix
    })
}

fn raw_options() -> RawOptions {
    RawOptions {
        dtype: DType::Uint16,
        eos: 0,
        cache_dir: Some(scratch().join("cache")),
    }
}

/// The fixed raw file of mode 2 and the header of the cache its first open wrote.
fn cached_raw() -> &'static (PathBuf, PathBuf, Vec<u8>) {
    static R: OnceLock<(PathBuf, PathBuf, Vec<u8>)> = OnceLock::new();
    R.get_or_init(|| {
        let path = scratch().join("fixed.u16");
        let tokens: Vec<u8> = [5u16, 6, 0, 7, 0, 8, 9, 10, 0, 11, 0]
            .iter()
            .flat_map(|t| t.to_le_bytes())
            .collect();
        put(&path, &tokens);
        let shard = RawShard::open(&path, &raw_options()).expect("fixed raw shard");
        let cache = shard.cache_path().to_path_buf();
        let bytes = std::fs::read(&cache).expect("cache written");
        let head = bytes[..bytes.len() - 8 * shard.documents() as usize].to_vec();
        (path, cache, head)
    })
}

fn seeds() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for ids in [
        &[1u64, 1, 1, 2, 2, 3, 3, 3, 3][..],
        &[7, 8, 9, 10, 11, 12, 13, 14, 15],
    ] {
        let path = scratch().join("seed.groups.npy");
        groups::write(&path, ids).expect("sidecar");
        let npy = std::fs::read(&path).expect("sidecar");
        out.push([&[0u8][..], &npy].concat());
        out.push([&[1u8][..], &npy].concat());
    }
    let tokens: Vec<u8> = [3u16, 4, 0, 9, 9, 9, 0, 1, 0]
        .iter()
        .flat_map(|t| t.to_le_bytes())
        .collect();
    out.push([&[1u8][..], &tokens].concat());
    let ends: Vec<u8> = [3u64, 5, 9, 11]
        .iter()
        .flat_map(|e| e.to_le_bytes())
        .collect();
    out.push([&[2u8][..], &ends].concat());
    out
}

fn read_all(shard: &RawShard) {
    let valid = shard.validate().is_ok();
    let mut lengths = Vec::new();
    let listed = shard.doc_lengths_into(&mut lengths);
    for d in 0..shard.documents().min(64) {
        let len = shard.doc_len(d);
        let tokens = shard.doc_tokens(d);
        if valid {
            let (Ok(len), Ok(tokens)) = (&len, &tokens) else {
                panic!(
                    "document {d} of a validated raw shard: {len:?} {:?}",
                    tokens.as_ref().err()
                );
            };
            assert_eq!(*len, tokens.len() as u64, "document {d}");
        }
    }
    if valid {
        assert!(listed.is_ok(), "a validated raw shard lists its lengths");
        assert_eq!(lengths.iter().sum::<u64>(), shard.tokens());
    }
}

fuzz_target!(
    init: {
        write_seeds_and_exit_if_asked(seeds);
        grouped_prefix();
        cached_raw();
    },
    |data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    match sel % 3 {
        0 => {
            let prefix = grouped_prefix();
            let sidecar = prefix.with_extension("groups.npy");
            put(&sidecar, rest);
            if let Ok(shard) = Shard::open(prefix, None) {
                let g = shard.groups().expect("a shard with a sidecar has groups");
                let runs = g.runs();
                let docs: u64 = runs.iter().map(|r| r.docs).sum();
                assert_eq!(docs, 9, "runs cover every document: {runs:?}");
                for d in 0..9 {
                    assert!(g.group_of(d).is_some());
                }
            }
            let _ = Groups::open(&sidecar, 9);
        }
        1 => {
            let path = scratch().join("raw.u16");
            put(&path, rest);
            for _ in 0..2 {
                if let Ok(shard) = RawShard::open(&path, &raw_options()) {
                    read_all(&shard);
                }
            }
        }
        _ => {
            let (path, cache, head) = cached_raw();
            let body = &rest[..rest.len() / 8 * 8];
            let mut bytes = head.clone();
            bytes[48..56].copy_from_slice(&((body.len() / 8) as u64).to_le_bytes());
            bytes.extend_from_slice(body);
            let mut h = xxhash_rust::xxh3::Xxh3::new();
            h.update(&bytes[..64]);
            h.update(&bytes[72..]);
            let sum = h.digest();
            bytes[64..72].copy_from_slice(&sum.to_le_bytes());
            put(cache, &bytes);
            if let Ok(shard) = RawShard::open(path, &raw_options()) {
                read_all(&shard);
            }
        }
    }
});
