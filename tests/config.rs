//! The config file: every mistake is refused with the file and the field named.

use std::path::Path;

use millrace::config::{Config, ConfigError};

mod common;

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(
        text,
        Path::new("/etc/millrace/test.toml"),
        Path::new("/data"),
    )
}

fn err(text: &str) -> String {
    parse(text).unwrap_err().to_string()
}

/// The error `[serve]` of `text` is refused with.
fn serve_err(text: &str) -> String {
    let cfg = parse(text).unwrap();
    let e = millrace::config::serve::ServeConfig::from_config(&cfg).unwrap_err();
    e.to_string()
}

/// `millrace check-config --config config`, passed or not.
fn check_config(config: &Path) -> std::process::Output {
    (common::bin()
        .args(["check-config", "--config"])
        .arg(config)
        .output())
    .expect("running millrace check-config")
}

#[test]
fn a_valid_config_parses_with_defaults() {
    let cfg = parse(
        r#"
        [corpus]
        cache_dir = "cache"
        [[corpus.domain]]
        name = "web"
        shards = ["web/*.idx", "/abs/other"]
        [[corpus.domain]]
        name = "olmo"
        shards = ["olmo"]
        format = "raw"
        raw = { dtype = "uint32", eos = 100257 }
        [plan]
        seed = 1
        "#,
    )
    .unwrap();
    assert_eq!(cfg.corpus.domains.len(), 2);
    assert_eq!(
        cfg.corpus.domains[0].format,
        millrace::corpus::Format::Megatron
    );
    assert_eq!(cfg.resolve_path(Path::new("web")), Path::new("/data/web"));
    assert_eq!(
        cfg.resolve_path(Path::new("/abs/other")),
        Path::new("/abs/other")
    );
    let raw = cfg.raw_options(&cfg.corpus.domains[1]).unwrap();
    assert_eq!(raw.eos, 100257);
    assert_eq!(raw.cache_dir.as_deref(), Some(Path::new("/data/cache")));
    assert!(cfg.plan.is_some());
}

#[test]
fn mistakes_name_the_file_and_the_field() {
    let head = "[corpus]\n";
    let e = err(&format!(
        "{head}[[corpus.domain]]\nname = \"web\"\nshards = [\"a\"]\nweight = 3\n"
    ));
    assert!(e.contains("test.toml") && e.contains("weight"), "{e}");
    assert!(e.contains("line 5") || e.contains("5 |"), "{e}");

    let e = err(head);
    assert!(e.contains("domain"), "{e}");

    let e = err(&format!("{head}domain = []\n"));
    assert!(
        e.contains("corpus.domain") && e.contains("at least one"),
        "{e}"
    );

    // More domains than a cursor blob lists: the run could not resume from its blobs.
    let many = |n: usize| -> String {
        (0..n)
            .map(|k| format!("[[corpus.domain]]\nname = \"d{k}\"\nshards = [\"d{k}\"]\n"))
            .collect()
    };
    let max = millrace::config::MAX_DOMAINS;
    assert!(parse(&format!("{head}{}", many(max))).is_ok());
    let e = err(&format!("{head}{}", many(max + 1)));
    assert!(
        e.contains("test.toml")
            && e.contains("corpus.domain")
            && e.contains(&format!("{} domains; at most {max}", max + 1)),
        "{e}"
    );

    let dup = "[[corpus.domain]]\nname = \"web\"\nshards = [\"a\"]\n";
    let e = err(&format!("{head}{dup}{dup}"));
    assert!(
        e.contains("corpus.domain[1].name") && e.contains("twice"),
        "{e}"
    );

    let e = err(&format!(
        "{head}[[corpus.domain]]\nname = \"we b\"\nshards = [\"a\"]\n"
    ));
    assert!(e.contains("corpus.domain[0].name"), "{e}");

    let e = err(&format!(
        "{head}[[corpus.domain]]\nname = \"w\"\nshards = []\n"
    ));
    assert!(e.contains("corpus.domain[0].shards"), "{e}");

    let e = err(&format!(
        "{head}[[corpus.domain]]\nname = \"w\"\nshards = [\"a\"]\nformat = \"raw\"\n"
    ));
    assert!(
        e.contains("corpus.domain[0].raw") && e.contains("eos"),
        "{e}"
    );

    let e = err(&format!(
        "{head}[[corpus.domain]]\nname = \"w\"\nshards = [\"a\"]\nraw = {{ dtype = \"uint16\", eos = 1 }}\n"
    ));
    assert!(
        e.contains("corpus.domain[0].raw") && e.contains("only format"),
        "{e}"
    );

    let e = err(&format!(
        "{head}[[corpus.domain]]\nname = \"w\"\nshards = [\"a\"]\nformat = \"raw\"\nraw = {{ dtype = \"uint16\", eos = 70000 }}\n"
    ));
    assert!(
        e.contains("corpus.domain[0].raw.eos") && e.contains("70000"),
        "{e}"
    );

    // The example config once paired eos 100257 with vocab_size 50304: check-config
    // passed it, and every ring stopped at its first row.
    let e = err(&format!(
        "{head}[[corpus.domain]]\nname = \"w\"\nshards = [\"a\"]\nformat = \"raw\"\nraw = {{ dtype = \"uint32\", eos = 100257 }}\n[plan]\nvocab_size = 50304\n"
    ));
    assert!(
        e.contains("corpus.domain[0].raw.eos")
            && e.contains("100257 is not below plan.vocab_size = 50304"),
        "{e}"
    );

    let e = err(&format!(
        "{head}[[corpus.domain]]\nname = \"w\"\nshards = [\"a\"]\nformat = \"raw\"\nraw = {{ dtype = \"int64\", eos = 1 }}\n"
    ));
    assert!(e.contains("corpus.domain[0].raw.dtype"), "{e}");

    let e = err(&format!(
        "{head}[[corpus.domain]]\nname = \"w\"\nshards = [\"a\"]\nformat = \"parquet\"\n"
    ));
    assert!(e.contains("parquet"), "{e}");
}

#[test]
fn a_shard_listed_twice_is_refused_and_missing_shards_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let code = common::CODES[7];
    common::write_docs(dir.path(), "x", code, &common::simple_docs(&[3, 4], 60000));
    let path = dir.path().join("m.toml");
    // The corpus of a config of these domain lines fails to open: the error.
    let refusal = |text: &str| {
        std::fs::write(&path, format!("[corpus]\n{text}")).unwrap();
        let cfg = Config::load(&path).unwrap();
        cfg.open_corpus().unwrap_err().to_string()
    };
    let e = refusal(
        "[[corpus.domain]]\nname = \"a\"\nshards = [\"x\"]\n[[corpus.domain]]\nname = \"b\"\nshards = [\"./x.idx\"]\n",
    );
    assert!(
        e.contains("corpus.domain[1].shards")
            && e.contains("listed twice (in domain a and in domain b)"),
        "{e}"
    );
    // Twice in one domain says so once (it read "in domain a and in domain a").
    let e = refusal("[[corpus.domain]]\nname = \"a\"\nshards = [\"x\", \"x.bin\"]\n");
    assert!(
        e.contains("corpus.domain[0].shards") && e.contains("is listed twice in domain a;"),
        "{e}"
    );
    let e = refusal("[[corpus.domain]]\nname = \"a\"\nshards = [\"missing\"]\n");
    assert!(e.contains("domain a") && e.contains("missing.idx"), "{e}");

    let e = Config::load(&dir.path().join("nope.toml"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("nope.toml") && e.contains("cannot read"), "{e}");
}

#[test]
fn a_directory_with_an_orphan_file_is_an_error_not_a_silent_skip() {
    let dir = tempfile::tempdir().unwrap();
    let code = common::CODES[7];
    common::write_docs(dir.path(), "a", code, &common::simple_docs(&[3], 60000));
    common::write_docs(dir.path(), "b", code, &common::simple_docs(&[3], 60000));
    std::fs::remove_file(dir.path().join("b.idx")).unwrap();
    let e = millrace::corpus::resolve(dir.path(), millrace::corpus::Format::Megatron)
        .unwrap_err()
        .to_string();
    assert!(e.contains("b.idx") && e.contains("b.bin"), "{e}");
}

#[test]
fn the_example_config_parses_and_its_plan_validates() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/millrace.example.toml");
    let cfg = Config::load(&path).unwrap();
    let plan = cfg.plan_config().unwrap();
    assert_eq!(plan.seq_len, 8192);
    assert_eq!(plan.schedule.len(), 3);
    let books = &cfg.corpus.domains[2];
    assert_eq!(books.name, "books_zh");
    let s = books.settings;
    assert_eq!(s.grouping.mode, millrace::config::plan::GroupMode::Batch);
    assert_eq!(s.grouping.from_step, 120000);
    assert_eq!(s.upsample_long.map(|u| u.factor), Some(2));
    let serve = millrace::config::serve::ServeConfig::from_config(&cfg).unwrap();
    assert_eq!(serve.socket, Path::new("/run/millrace/millrace.sock"));
    assert_eq!((serve.ring_slots, serve.materialize_threads), (4, 2));
    assert_eq!(serve.token_dtype, "int32");
    assert_eq!(serve.wake_coalesce_us, 300);
    assert_eq!(serve.stuck_fill_seconds, 30);
}

#[test]
fn serve_mistakes_name_the_field() {
    let base = "[corpus]\n[[corpus.domain]]\nname = \"web\"\nshards = [\"web\"]\n";
    let cases = [
        ("[serve]\nring_slot = 4", "ring_slot"),
        ("[serve]\nring_slots = 1", "ring_slots"),
        ("[serve]\nmaterialize_threads = 0", "materialize_threads"),
        ("[serve]\nring_slots = \"four\"", "ring_slots"),
        (
            "[serve]\nstage_reserve_tokens = 4294967297",
            "stage_reserve_tokens",
        ),
        ("[serve]\nstage_reserve_tokens = -1", "stage_reserve_tokens"),
        ("[serve]\nwake_coalesce_us = 100001", "wake_coalesce_us"),
        ("[serve]\nwake_coalesce_us = -1", "wake_coalesce_us"),
        ("[serve]\nstuck_fill_seconds = 0", "stuck_fill_seconds"),
        ("[serve]\nstuck_fill_seconds = 86401", "stuck_fill_seconds"),
        ("[serve]\nlive_changes = 0", "live_changes"),
        ("[serve]\nlive_changes = 4097", "live_changes"),
        ("[serve]\nmax_clients = 0", "max_clients"),
        ("[serve]\nmax_clients = 1048577", "max_clients"),
        ("[serve]\nmax_clients = 9223372036854775807", "max_clients"),
        ("[serve]\nhandshake_timeout_ms = 0", "handshake_timeout_ms"),
        ("[serve]\nhandshake_timeout_ms = 99", "handshake_timeout_ms"),
        (
            "[serve]\nhandshake_timeout_ms = 600001",
            "handshake_timeout_ms",
        ),
    ];
    for (extra, field) in cases {
        let text = format!("{base}{extra}");
        let cfg = Config::parse(&text, Path::new("/x/run.toml"), Path::new("/x")).unwrap();
        let err = format!(
            "{:#}",
            millrace::config::serve::ServeConfig::from_config(&cfg).unwrap_err()
        );
        assert!(
            err.contains(field) && err.contains("run.toml"),
            "{extra}: {err}"
        );
    }
    // Relative socket paths resolve against the config's directory.
    let cfg = Config::parse(
        &format!("{base}[serve]\nsocket = \"s.sock\""),
        Path::new("/x/run.toml"),
        Path::new("/x"),
    )
    .unwrap();
    let serve = millrace::config::serve::ServeConfig::from_config(&cfg).unwrap();
    assert_eq!(serve.socket, Path::new("/x/s.sock"));
    assert_eq!(serve.live_changes, 32);
    // The bounds themselves are accepted.
    let cfg = Config::parse(
        &format!("{base}[serve]\nmax_clients = 1048576\nhandshake_timeout_ms = 100"),
        Path::new("/x/run.toml"),
        Path::new("/x"),
    )
    .unwrap();
    let serve = millrace::config::serve::ServeConfig::from_config(&cfg).unwrap();
    assert_eq!(
        (serve.max_clients, serve.handshake_timeout_ms),
        (1_048_576, 100)
    );
    // Room for live changes is bytes of every blob: 4096 changes of 1000 domains (33 MB)
    // cannot travel in a HELLO.
    let domains: String = (0..1000)
        .map(|k| format!("[[corpus.domain]]\nname = \"d{k}\"\nshards = [\"d{k}\"]\n"))
        .collect();
    let cfg = Config::parse(
        &format!("[corpus]\n{domains}[serve]\nlive_changes = 4096\n"),
        Path::new("/x/run.toml"),
        Path::new("/x"),
    )
    .unwrap();
    let err = millrace::config::serve::ServeConfig::from_config(&cfg)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("live_changes") && err.contains("4096 changes of 1000 domains take"),
        "{err}"
    );
}

/// A corpus of two domains, `web` and `code`, for configs whose `[plan]` a test varies.
const TWO_DOMAINS: &str = r#"
        [corpus]
        [[corpus.domain]]
        name = "web"
        shards = ["web"]
        [[corpus.domain]]
        name = "code"
        shards = ["code"]
"#;

#[test]
fn plan_mistakes_name_the_field() {
    let base = TWO_DOMAINS;
    let cases = [
        ("[plan]\nseq_len = 0\nglobal_batch_rows = 8\nweights = { web = 1.0 }", "plan.seq_len"),
        ("[plan]\nseq_len = 64\nglobal_batch_rows = 8\nweights = { webb = 1.0 }", "plan.weights.webb"),
        ("[plan]\nseq_len = 64\nglobal_batch_rows = 8\nweights = { web = -1.0 }", "web"),
        ("[plan]\nseq_len = 64\nglobal_batch_rows = 8\nweights = { web = 0.0 }", "all zero"),
        ("[plan]\nseq_len = 64\nglobal_batch_rows = 8\nbogus = 1\nweights = { web = 1.0 }", "bogus"),
        ("[plan]\nseq_len = 64\nglobal_batch_rows = 8\n[[plan.schedule]]\nstep = 5\nweights = { web = 1.0 }\n[[plan.schedule]]\nstep = 5\nweights = { code = 1.0 }", "plan.schedule[1].step"),
        // A skip so far that the first client would replay it for hours (it aborted the
        // daemon before the seek was chunked).
        ("[plan]\nseq_len = 64\nglobal_batch_rows = 8\nweights = { web = 1.0 }\n[[plan.skip]]\nsteps = [0, 1000000000000]", "plan.skip[0].steps"),
    ];
    for (plan, want) in cases {
        let cfg = parse(&format!("{base}\n{plan}")).unwrap();
        let e = cfg.plan_config().unwrap_err().to_string();
        assert!(e.contains(want), "{plan:?}: {e}");
        assert!(e.contains("/etc/millrace/test.toml"), "{e}");
    }
    let batch_concat = format!(
        "{}\n[plan]\nseq_len = 64\nglobal_batch_rows = 8\npacking = \"concat\"\nweights = {{ web = 1.0 }}",
        base.replace("shards = [\"code\"]", "shards = [\"code\"]\ngrouping = { mode = \"batch\" }")
    );
    let e = parse(&batch_concat)
        .unwrap()
        .plan_config()
        .unwrap_err()
        .to_string();
    assert!(e.contains("corpus.domain[1].grouping.mode"), "{e}");
    // More reseeds than a cursor blob lists.
    let reseeds: String = (1..=4097)
        .map(|k| format!("[[plan.reseed]]\nstep = {k}\nseed = {k}\n"))
        .collect();
    let e = parse(&format!(
        "{base}\n[plan]\nseq_len = 64\nglobal_batch_rows = 8\nweights = {{ web = 1.0 }}\n{reseeds}"
    ))
    .unwrap()
    .plan_config()
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("plan.reseed") && e.contains("4097 reseeds; at most 4096"),
        "{e}"
    );
}

/// An entry with `ramp = false` is stored as two points (a copy of the previous weights
/// one step before it), and errors and warnings counted those: with three entries an
/// error named `plan.schedule[3]`, and a warning named `plan.schedule[1].weights (step
/// 299)`, a point nobody wrote. Now they name the entry as written, and only those.
#[test]
fn ramp_false_entries_are_named_as_written() {
    let base = TWO_DOMAINS.to_string()
        + r#"
        [plan]
        seq_len = 64
        global_batch_rows = 8
        [[plan.schedule]]
        step = 0
        weights = { web = 1, code = 0 }
        [[plan.schedule]]
        step = 300
        ramp = false
        weights = { web = 1, code = 1 }
    "#;
    let cases = [
        (
            "step = 200\nweights = { web = 1, code = 1 }",
            "plan.schedule[2].step: steps must increase: 200 follows 300",
        ),
        (
            "step = 400\nweights = { web = 1, code = -1 }",
            "plan.schedule[2].weights.code",
        ),
        (
            "step = 400\nramp = false\nweights = { web = 1, cod = 1 }",
            "plan.schedule[2].weights.cod",
        ),
    ];
    for (third, want) in cases {
        let text = format!("{base}\n[[plan.schedule]]\n{third}");
        let e = parse(&text).unwrap().plan_config().unwrap_err().to_string();
        assert!(e.contains(want), "{third:?}: {e}");
        assert!(!e.contains("plan.schedule[3]"), "{third:?}: {e}");
    }
    // Warnings: one per written entry that leaves a domain out, none for the held copies.
    let text = format!(
        "{}\n[[plan.schedule]]\nstep = 400\nramp = false\nweights = {{ web = 1 }}\n\
         [[plan.schedule]]\nstep = 500\nweights = {{ web = 2 }}",
        base.replace("web = 1, code = 0", "web = 1")
    );
    let cfg = parse(&text).unwrap().plan_config().unwrap();
    let warned: Vec<String> = cfg
        .unweighted_warnings(&["web", "code"])
        .iter()
        .map(|w| {
            w.split(" does not name")
                .next()
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    assert_eq!(
        warned,
        [
            "plan.schedule[0].weights (step 0)",
            "plan.schedule[2].weights (step 400)",
            "plan.schedule[3].weights (step 500)",
        ],
    );
}

/// Issue 14, item 11: a TOML parse error put its cause on a continuation line under a
/// drawing of the source line, so a one-line log entry had no cause. Now it is one line
/// with the file, the position and the cause, for syntax and type errors alike.
#[test]
fn toml_errors_fit_one_line_with_their_cause() {
    let e = err("[corpus]\nfoo = \n");
    assert!(!e.contains('\n'), "{e:?}");
    assert!(
        e.starts_with("/etc/millrace/test.toml: ")
            && e.contains("line 2, column 7")
            && e.contains("invalid string"),
        "{e}"
    );
    let e = err("[corpus]\n[[corpus.domain]]\nname = \"w\"\nshards = [1]\n");
    assert!(!e.contains('\n'), "{e:?}");
    assert!(e.contains("line 4") && e.contains("invalid type"), "{e}");
    let base = "[corpus]\n[[corpus.domain]]\nname = \"web\"\nshards = [\"web\"]\n";
    let cfg = parse(&format!("{base}[serve]\nring_slots = \"four\"\n")).unwrap();
    let e = format!(
        "{:#}",
        millrace::config::serve::ServeConfig::from_config(&cfg).unwrap_err()
    );
    assert!(!e.contains('\n'), "{e:?}");
    assert!(
        e.contains("ring_slots") && e.contains("invalid type") && e.contains("(line 6, column 14)"),
        "{e}"
    );
    let cfg = parse(&format!("{base}[plan]\nseq_len = \"x\"\n")).unwrap();
    let e = cfg.plan_config().unwrap_err().to_string();
    assert!(!e.contains('\n'), "{e:?}");
    assert!(
        e.contains("seq_len") && e.contains("invalid type") && e.contains("(line 6, column 11)"),
        "{e}"
    );
    // `[plan]` and `[serve]` are read after the file parsed, and their mistakes still
    // name the line: here the second of two stages.
    let stages = "[plan]\nseq_len = 64\n[[plan.stage]]\nstep = 4\nseq_len = 128\n\
                  global_batch_rows = 4\n[[plan.stage]]\nstep = 8\nseq_len = \"256\"\n\
                  global_batch_rows = 4\n";
    let e = parse(&format!("{base}{stages}"))
        .unwrap()
        .plan_config()
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("stage.seq_len") && e.contains("(line 13, column 11)"),
        "{e}"
    );
}

/// Issue 14, item 3: `[plan] vocab_size` is validated, and so are the pad and eod ids
/// against it (both reach the trainer's embedding).
#[test]
fn vocab_size_is_validated_with_the_ids_it_bounds() {
    let base = "[corpus]\n[[corpus.domain]]\nname = \"web\"\nshards = [\"web\"]\n[plan]\nseq_len = 64\nglobal_batch_rows = 8\nweights = { web = 1.0 }\neod_token = 2\npad_token = 0\n";
    let plan = |extra: &str| parse(&format!("{base}{extra}")).unwrap().plan_config();
    assert_eq!(plan("vocab_size = 50304").unwrap().vocab_size, Some(50304));
    assert_eq!(plan("").unwrap().vocab_size, None);
    for (extra, field, want) in [
        ("vocab_size = 0", "plan.vocab_size", "0 is outside 1..="),
        (
            "vocab_size = 4294967296",
            "plan.vocab_size",
            "4294967296 is outside",
        ),
        (
            "vocab_size = 2",
            "plan.eod_token",
            "2 is not below plan.vocab_size = 2",
        ),
    ] {
        let e = plan(extra).unwrap_err().to_string();
        assert!(e.contains(field) && e.contains(want), "{extra}: {e}");
    }
    let e = parse(&format!(
        "{}vocab_size = 100",
        base.replace("pad_token = 0", "pad_token = 100")
    ))
    .unwrap()
    .plan_config()
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("plan.pad_token") && e.contains("100 is not below plan.vocab_size = 100"),
        "{e}"
    );
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/millrace.example.toml");
    let cfg = Config::load(&example).unwrap();
    assert_eq!(cfg.plan_config().unwrap().vocab_size, Some(50304));
}

/// Issue 18: a domain's planning keys are declared once, in `DomainSettings`, and read
/// from the domain's own table; a mistake in one still names its line and column (serde's
/// `flatten` would have moved every such error to the `[[corpus.domain]]` header).
#[test]
fn domain_planning_keys_are_read_into_settings_and_mistakes_keep_their_line() {
    let head = "[corpus]\n[[corpus.domain]]\nname = \"w\"\nshards = [\"a\"]\n";
    let cfg = parse(&format!(
        "{head}grouping = {{ mode = \"sequence\", from_step = 7 }}\nupsample_long = {{ min_tokens = 3, factor = 2 }}\nbursty = {{ period = 4 }}\nwindow = 9\n"
    ))
    .unwrap();
    let s = cfg.corpus.domains[0].settings;
    assert_eq!(s.grouping.mode, millrace::config::plan::GroupMode::Sequence);
    assert_eq!((s.grouping.from_step, s.grouping.max_share), (7, 0.25));
    assert_eq!(
        s.upsample_long.map(|u| (u.min_tokens, u.factor)),
        Some((3, 2))
    );
    assert_eq!((s.bursty.map(|b| b.period), s.window), (Some(4), Some(9)));
    let plain = parse(head).unwrap().corpus.domains[0].settings;
    assert_eq!(plain, millrace::config::plan::DomainSettings::default());

    for (extra, want) in [
        (
            "window = \"x\"",
            "line 5, column 10: invalid type: string \"x\", expected u64",
        ),
        (
            "grouping = { mode = \"bogus\" }",
            "line 5, column 21: unknown variant `bogus`",
        ),
        (
            "upsample_long = { min_tokens = 5 }",
            "line 5, column 17: missing field `factor`",
        ),
        (
            "bursty = 4",
            "line 5, column 10: invalid type: integer `4`, expected struct Bursty",
        ),
        (
            "weight = 3",
            "line 5, column 1: unknown field `weight`, expected one of `name`, `shards`, \
             `format`, `raw`, `grouping`, `upsample_long`, `bursty`, `window`",
        ),
    ] {
        let e = err(&format!("{head}{extra}\n"));
        assert!(e.contains(want), "{extra}: {e}");
    }
    let e = err("[corpus]\n[[corpus.domain]]\nshards = [\"a\"]\n");
    assert!(e.contains("line 2, column 1: missing field `name`"), "{e}");
}

/// A config that is not UTF-8 is refused with the offset of the first bad byte (the
/// daemon's reload said so; `Config::load` said only "stream did not contain valid
/// UTF-8"). Both now read the file the same way.
#[test]
fn a_config_that_is_not_utf8_names_the_byte() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, b"[corpus]\n# caf\xe9\n").unwrap();
    let e = Config::load(&path).unwrap_err().to_string();
    assert!(e.contains("bad.toml: not UTF-8 at byte 14"), "{e}");
    let e = Config::load_hashed(&path).unwrap_err().to_string();
    assert!(e.contains("bad.toml: not UTF-8 at byte 14"), "{e}");
}

/// `check-config` promises to fail where `serve` would: `serve` binds over a stale socket
/// only, so a directory or a regular file at the socket path must fail the check too
/// (it passed, and the unit's ExecStart then failed).
#[test]
fn a_socket_path_that_is_not_a_socket_fails_check_config() {
    use millrace::config::serve::socket_problem;
    let c = common::corpus(200_000, 2, 3, 1_000_000);
    let dir = c.dir.join("taken");
    std::fs::create_dir(&dir).unwrap();
    let file = c.dir.join("notes.txt");
    std::fs::write(&file, "keep me").unwrap();
    for (path, kind) in [(&dir, "a directory"), (&file, "a regular file")] {
        let why = socket_problem(path).unwrap_or_else(|| panic!("{} passed", path.display()));
        assert!(why.contains(kind) && why.contains("not a socket"), "{why}");
        let line = format!("socket = {:?}", path.to_str().unwrap());
        let config = common::write_config(&c.dir, "run.toml", 64, 4, &[&line]);
        let err = common::check_config_refusal(&config);
        assert!(
            err.contains("run.toml") && err.contains("[serve] socket") && err.contains(kind),
            "{err}"
        );
    }
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep me");
    // A socket left by a daemon that died is what serve removes: the check passes it.
    let stale = c.dir.join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    assert!(stale.exists());
    assert_eq!(socket_problem(&stale), None);
    // A writable directory on a filesystem that takes no sockets (sysfs: bind fails
    // EPERM even for root) is refused too, as serve would fail; it passed. The probe
    // socket that found out leaves nothing behind in a directory that does take them.
    let why = socket_problem(Path::new("/sys/s.sock")).expect("/sys/s.sock passed");
    assert!(why.contains("/sys"), "{why}");
    let before: Vec<_> = std::fs::read_dir(&c.dir).unwrap().collect();
    assert_eq!(socket_problem(&c.dir.join("ok.sock")), None);
    assert_eq!(std::fs::read_dir(&c.dir).unwrap().count(), before.len());
}

/// A path that is empty or starts with `~` named the config's own directory, or a
/// directory `~` in it (only a shell expands `~`): `cache_dir = "~/cache"` filled
/// `/etc/millrace/~/cache`, `cache_dir = ""` wrote identity and checkpoint files beside
/// the config, and `socket = "~/m.sock"` was bound there. Each is refused, naming the
/// field.
#[test]
fn a_path_that_is_empty_or_starts_with_a_tilde_is_refused_naming_the_field() {
    let domain =
        |shards: &str| format!("[[corpus.domain]]\nname = \"web\"\nshards = [\"a\", {shards}]\n");
    let cases = [
        (
            domain("\"~/tok/web\""),
            "corpus.domain[0].shards[1]: \"~/tok/web\" starts with `~`",
        ),
        (
            domain("\"~alice/tok\""),
            "corpus.domain[0].shards[1]: \"~alice/tok\" starts",
        ),
        (domain("\"\""), "corpus.domain[0].shards[1]: is empty"),
        (
            format!("cache_dir = \"~/.cache/m\"\n{}", domain("\"b\"")),
            "corpus.cache_dir: \"~/",
        ),
        (
            format!("cache_dir = \"\"\n{}", domain("\"b\"")),
            "corpus.cache_dir: is empty",
        ),
    ];
    for (corpus, want) in cases {
        let e = err(&format!("[corpus]\n{corpus}"));
        assert!(e.contains(&format!("test.toml: {want}")), "{want}: {e}");
    }
    for (socket, want) in [
        ("~/m.sock", "\"~/m.sock\" starts with `~`"),
        ("", "is empty"),
    ] {
        let text = format!(
            "[corpus]\n{}[serve]\nsocket = {socket:?}\n",
            domain("\"b\"")
        );
        let e = serve_err(&text);
        assert!(
            e.contains(&format!("test.toml: [serve] socket: {want}")),
            "{e}"
        );
    }
    // Written so that it is meant, a name starting with `~` is a relative path, and "."
    // the config's directory.
    for (dir, at) in [("./~c", "/data/./~c"), (".", "/data/.")] {
        let text = format!("[corpus]\ncache_dir = {dir:?}\n{}", domain("\"x~\""));
        let cfg = parse(&text).unwrap();
        let cache = cfg.resolve_path(cfg.corpus.cache_dir.as_deref().unwrap());
        assert_eq!(cache, Path::new(at));
    }
}

/// Padding is written as a token of the slot's dtype, and an id the dtype cannot hold
/// was cut to its low bits: with uint16 shards (compact slots carry their dtype) and no
/// `vocab_size`, `pad_token = 70000` padded every row with 4464, a real token, while
/// WELCOME announced 70000. `check-config` (and so `serve`) now refuse it.
#[test]
fn a_pad_token_the_slots_cannot_hold_is_refused() {
    let c = common::corpus(200_000, 2, 3, 1_000_000);
    let text = std::fs::read_to_string(c.dir.join("millrace.toml")).unwrap();
    assert!(text.contains("pad_token = 0\n") && text.contains("vocab_size = 50304\n"));
    let write = |pad: u64, serve: &str| {
        let t = text
            .replace("vocab_size = 50304\n", "")
            .replace("pad_token = 0\n", &format!("pad_token = {pad}\n"));
        let path = c.dir.join("pad.toml");
        std::fs::write(&path, format!("{t}\n[serve]\n{serve}\n")).unwrap();
        path
    };
    for (pad, serve, dtype, slots) in [
        (70_000, "", "uint16", "compact slots"),
        (
            2_147_483_648,
            "token_dtype = \"int64\"",
            "uint16",
            "compact slots",
        ),
        (
            2_147_483_648,
            "token_dtype = \"int32\"",
            "int32",
            "expanded slots",
        ),
    ] {
        let err = common::check_config_refusal(&write(pad, serve));
        assert!(
            err.contains("pad.toml: plan.pad_token")
                && err.contains(&format!("{pad} does not fit {dtype}"))
                && err.contains(slots),
            "{pad} {serve}: {err}"
        );
    }
    let out = check_config(&write(65_535, ""));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `ring_memory_bytes` below the smallest ring any rank could have (one row of the
/// longest stage, compact slots) passed `check-config`, and the daemon then refused every
/// trainer with `memory`. Refused at the check, naming the field and the least it takes.
#[test]
fn a_ring_budget_that_holds_no_ring_is_refused() {
    let c = common::corpus(200_000, 2, 3, 1_000_000);
    let check = |budget: u64| {
        let line = format!("ring_memory_bytes = {budget}");
        check_config(&common::write_config(&c.dir, "mem.toml", 4096, 8, &[&line]))
    };
    let out = check(1);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success());
    assert!(
        err.contains("mem.toml: [serve] ring_memory_bytes: 1 bytes hold no ring")
            && err.contains("one row of 4096 tokens"),
        "{err}"
    );
    // The least it names is accepted: the bound refuses only budgets no ring fits.
    let least: u64 = err
        .trim()
        .rsplit(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no size at the end of {err:?}"));
    assert!(least > 4 * 4097 * 2, "{err}");
    let out = check(least);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!check(least - 1).status.success());
    // With trainer users held to a share, the share must hold a ring too: a budget that
    // holds one for root but not for a trainer user passed, and every trainer user was
    // refused `memory` while holding nothing.
    let shared = |budget: u64| {
        let lines = [
            format!("ring_memory_bytes = {budget}"),
            "uid_share_percent = 75".to_string(),
        ];
        let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
        check_config(&common::write_config(&c.dir, "mem.toml", 4096, 8, &lines))
    };
    let out = shared(least);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success());
    assert!(
        err.contains(&format!(
            "mem.toml: [serve] ring_memory_bytes: {least} bytes at uid_share_percent 75 leave \
             each trainer user {}, which hold no ring",
            least * 3 / 4
        )),
        "{err}"
    );
    assert!(shared(least * 4 / 3 + 1).status.success());
}

/// `check-config` sized the smallest ring without `[serve] stage_reserve_tokens`, which
/// the daemon sizes every slot for, and judged only a `ring_memory_bytes` that was set:
/// a reserve of 2^24 tokens under a 100 MB budget, or of 2^32 under the default budget,
/// passed, and the daemon refused every trainer `memory`. Refused now, naming the
/// reserve, the budget and the most reserve that fits.
#[test]
fn a_stage_reserve_the_ring_budget_cannot_hold_is_refused() {
    let c = common::corpus(200_000, 2, 3, 1_000_000);
    let check = |lines: &[&str]| {
        let config = common::write_config(&c.dir, "reserve.toml", 16, 4, lines);
        let out = check_config(&config);
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let budget = "ring_memory_bytes = 100000000";
    let (ok, err) = check(&[budget, "stage_reserve_tokens = 16777216"]);
    assert!(!ok, "{err}");
    assert!(
        err.contains(
            "reserve.toml: [serve] stage_reserve_tokens: 16777216 tokens per dp rank per step"
        ) && err.contains("[serve] ring_memory_bytes: 100000000 bytes hold no ring"),
        "{err}"
    );
    // The most it names fits, and one more does not.
    let fits: u64 = err
        .split("at most ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no reserve that fits in {err:?}"));
    assert!(fits > 1 << 20 && fits < 1 << 24, "{err}");
    let (ok, err) = check(&[budget, &format!("stage_reserve_tokens = {fits}")]);
    assert!(ok, "{err}");
    let (ok, err) = check(&[budget, &format!("stage_reserve_tokens = {}", fits + 1)]);
    assert!(!ok && err.contains("stage_reserve_tokens"), "{err}");
    // Without ring_memory_bytes the daemon's default budget is judged: no machine holds
    // 1024 slots of 2^32 tokens.
    let (ok, err) = check(&["ring_slots = 1024", "stage_reserve_tokens = 4294967296"]);
    assert!(!ok, "{err}");
    let default = millrace::serve::budget::default_ring_budget();
    assert!(
        err.contains("[serve] stage_reserve_tokens: 4294967296 tokens")
            && err.contains(&format!(
                "[serve] ring_memory_bytes is not set: its default, {default} bytes"
            )),
        "{err}"
    );
}

/// `check-config` passed socket paths that `serve` then failed to bind: one ending in '/'
/// (`binding /run/m.sock/: No such file or directory`) and one holding a NUL byte (TOML's
/// `\u0000`; the check looked for it in the wrong path). Both now fail the check.
#[test]
fn socket_paths_serve_cannot_bind_fail_the_check() {
    use millrace::config::serve::socket_problem;
    let dir = tempfile::tempdir().unwrap();
    let slash = dir.path().join("m.sock/");
    let slash = Path::new(slash.to_str().unwrap());
    let why = socket_problem(slash).unwrap_or_else(|| panic!("{} passed", slash.display()));
    assert!(why.contains("ends with '/'"), "{why}");
    let nul = dir.path().join("a\0b.sock");
    let why = socket_problem(&nul).unwrap_or_else(|| panic!("{nul:?} passed"));
    assert!(why.contains("NUL byte"), "{why}");
    assert_eq!(socket_problem(&dir.path().join("m.sock")), None);
    // In the config file, the field is named.
    let e = serve_err("[corpus]\n[[corpus.domain]]\nname = \"w\"\nshards = [\"a\"]\n[serve]\nsocket = \"/run/a\\u0000b\"\n");
    assert!(
        e.contains("test.toml: [serve] socket") && e.contains("NUL byte"),
        "{e}"
    );
}

/// The daemon rereads its config on SIGHUP and each watcher tick. A config path replaced
/// by a FIFO hung the read (its open waits for a writer), one replaced by `/dev/zero`
/// grew the daemon without bound, and a huge file was read whole. Each is now refused at
/// once, naming the path and what is there.
#[test]
fn a_config_that_is_no_regular_file_or_too_large_is_refused_at_once() {
    use millrace::config::{Config, MAX_CONFIG_BYTES};
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo.toml");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let huge = dir.path().join("huge.toml");
    std::fs::File::create(&huge)
        .unwrap()
        .set_len(MAX_CONFIG_BYTES + 1)
        .unwrap();
    let cases = [
        (fifo.clone(), "it is a FIFO, not a regular file".to_string()),
        (
            "/dev/zero".into(),
            "it is a character device, not a regular file".to_string(),
        ),
        (
            dir.path().to_path_buf(),
            "it is a directory, not a regular file".to_string(),
        ),
        (
            huge.clone(),
            format!(
                "it is {} bytes, more than a config may be ({MAX_CONFIG_BYTES})",
                MAX_CONFIG_BYTES + 1
            ),
        ),
    ];
    for (path, why) in cases {
        let err = Config::read_bytes(&path).unwrap_err().to_string();
        assert_eq!(
            err,
            format!("{}: cannot read config: {why}", path.display()),
            "{err}"
        );
    }
    std::fs::write(&huge, "x = 1\n").unwrap();
    assert_eq!(Config::read_bytes(&huge).unwrap(), b"x = 1\n");
}
