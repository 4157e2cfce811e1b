//! `consume`'s unit tests: its digest, its cursor file and its flag checks.

use std::hash::Hasher;

use super::*;

/// `consume`'s streaming digest (twox-hash, AVX2 where the CPU has it) is XXH3-64 of
/// the concatenated token bytes, the value xxhash-rust gives, however the steps cut
/// them: digests stay comparable with earlier runs and docs/BENCHMARKS.md.
#[test]
fn the_streaming_digest_is_xxh3_of_all_the_bytes() {
    let bytes: Vec<u8> = (0..300_000u64)
        .map(|i| (crate::plan::permute::mix64(i) >> 56) as u8)
        .collect();
    for chunk in [1usize, 63, 64, 240, 1024, 4097, 65_536, 300_000] {
        for len in [0usize, 17, 240, 241, 1025, 100_003, 300_000] {
            let mut h = twox_hash::XxHash3_64::new();
            for c in bytes[..len].chunks(chunk) {
                h.write(c);
            }
            assert_eq!(
                h.finish(),
                xxhash_rust::xxh3::xxh3_64(&bytes[..len]),
                "chunks of {chunk}, {len} bytes"
            );
        }
    }
}

/// `--save-cursor` through a link replaces the file it names and keeps the link
/// (renaming over the link replaced it with a plain file); to a character device
/// (`/dev/stdout`, here `/dev/null`) it writes in place, where a temporary file
/// beside it could not be made.
#[test]
fn a_cursor_is_saved_through_links_and_to_devices() {
    let dir = tempfile::tempdir().unwrap();
    let (real, link) = (dir.path().join("real.hex"), dir.path().join("link.hex"));
    std::fs::write(&real, "old\n").unwrap();
    std::os::unix::fs::symlink(&real, &link).unwrap();
    save_cursor_file(&link, &[0xab, 0xcd]).unwrap();
    assert!(std::fs::symlink_metadata(&link).unwrap().is_symlink());
    assert_eq!(std::fs::read_to_string(&real).unwrap(), "abcd\n");
    save_cursor_file(Path::new("/dev/null"), &[1, 2]).unwrap();
    // A new file is made whole.
    let new = dir.path().join("new.hex");
    save_cursor_file(&new, &[7]).unwrap();
    assert_eq!(std::fs::read_to_string(&new).unwrap(), "07\n");
    let files = std::fs::read_dir(dir.path()).unwrap().count();
    assert_eq!(files, 3, "no temporary file left");
}

/// `consume --config C --dp-size 16` against a daemon of `global_batch_rows = 8` sent
/// a HELLO of micro_batch_rows 0 (8 / 16, truncated) and was refused about
/// `replicas`, `micro_batches` and `micro_batch_rows`, none of which the user set.
/// Now a --dp-size or --micro-batches the config's stages cannot split is refused
/// before connecting (nothing reaches the listening socket), naming the flag.
#[test]
fn flags_that_cannot_split_the_configs_steps_are_refused_before_connecting() {
    use clap::Parser as _;
    /// `consume`'s flags as its command line parses them.
    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        args: ConsumeArgs,
    }
    let dir = tempfile::tempdir().unwrap();
    let corpus = dir.path().join("c");
    crate::synth::synth(&crate::synth::SynthOptions {
        out: corpus.clone(),
        tokens: 100_000,
        domains: 2,
        vocab: 50304,
        dtype: crate::corpus::DType::Uint16,
        seed: 1,
        shard_tokens: 1_000_000,
        threads: 1,
        progress: false,
    })
    .unwrap();
    let text = std::fs::read_to_string(corpus.join("millrace.toml")).unwrap();
    let mut doc: toml::Table = toml::from_str(&text).unwrap();
    let plan = doc.get_mut("plan").and_then(|p| p.as_table_mut()).unwrap();
    plan.insert("seq_len".into(), 64.into());
    plan.insert("global_batch_rows".into(), 8.into());
    let stage: toml::Table =
        toml::from_str("step = 10\nseq_len = 128\nglobal_batch_rows = 12").unwrap();
    plan.insert("stage".into(), vec![toml::Value::Table(stage)].into());
    let config = corpus.join("d.toml");
    std::fs::write(&config, toml::to_string(&doc).unwrap()).unwrap();
    let socket = dir.path().join("d.sock");
    let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    listener.set_nonblocking(true).unwrap();
    let cases: [(&[&str], &str); 5] = [
        (
            &["--dp-size", "16"],
            "--dp-size 16 does not divide global_batch_rows 8",
        ),
        (
            &["--dp-size", "4", "--micro-batches", "3"],
            "--micro-batches 3 is more than the 2 rows per dp rank (global_batch_rows 8 / \
             --dp-size 4)",
        ),
        (
            &["--dp-size", "2", "--micro-batches", "3"],
            "--micro-batches 3 does not divide the 4 rows per dp rank",
        ),
        (
            &["--dp-size", "8"],
            "--dp-size 8 does not divide global_batch_rows 12 of the stage at plan step 10",
        ),
        (
            &["--dp-size", "2", "--micro-batches", "0"],
            "--micro-batches 0",
        ),
    ];
    for (flags, want) in cases {
        let mut argv = vec!["consume", "--dp-rank", "0", "--timeout", "2", "--config"];
        argv.push(config.to_str().unwrap());
        argv.extend(["--socket", socket.to_str().unwrap()]);
        argv.extend(flags);
        let args = Cli::try_parse_from(&argv).unwrap().args;
        let e = match consume(&args) {
            Ok(s) => panic!("{flags:?}: consumed {} steps", s.steps),
            Err(e) => format!("{e:#}"),
        };
        assert!(e.contains(want), "{flags:?}: {e}");
        assert!(!e.contains("micro_batch_rows"), "{flags:?}: {e}");
        let accepted = listener.accept();
        assert!(
            matches!(&accepted, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
            "{flags:?}: consume connected before refusing"
        );
    }
    // Flags that split every stage pass the check and reach the socket.
    let argv = [
        "consume",
        "--dp-rank",
        "0",
        "--dp-size",
        "4",
        "--timeout",
        "0.5",
    ];
    let mut argv: Vec<&str> = argv.to_vec();
    argv.extend(["--config", config.to_str().unwrap()]);
    argv.extend(["--socket", socket.to_str().unwrap()]);
    let args = Cli::try_parse_from(&argv).unwrap().args;
    assert!(consume(&args).is_err(), "no daemon answers");
    assert!(listener.accept().is_ok(), "consume connected");
}
