//! Stages added by a live change (the journal, issue 17): a `[[plan.stage]]` that a
//! running daemon takes at a step no client has received yet.
//!
//! - A plan with a journal stage change at step S streams exactly what the same config
//!   with that stage written in `[[plan.stage]]` streams: the same rows at every step
//!   and the same cursor state (streams and mixer), either side of S.
//! - Blobs from before the change (no stage in their journal, layout 7) resume under
//!   the changed plan when taken at or before S, and are refused past S; blobs carrying
//!   the change (layout 8) resume, and a plan without the change adopts their journal.
//! - A real `millrace serve` takes a blob whose journal adds a stage when the stage fits
//!   its live rings (then every client gets the new shape at its step), and refuses one
//!   that does not fit with `cursor`, naming the bytes, while its other clients stream on.

mod common;

use std::sync::Arc;
use std::time::Duration;

use millrace::client::{Client, ClientError, Hello};
use millrace::config::plan::{DomainSettings, GroupMode, Grouping, PlanConfig};
use millrace::corpus::GroupRun;
use millrace::plan::Planner;
use millrace::plan::{cursor, CursorError, DocSource, DomainInput, GlobalBatch, MemShard, Plan};
use proptest::prelude::*;
use proptest::test_runner::{Config as PtConfig, RngSeed};
use rand::{Rng, SeedableRng};
use rand_pcg::Pcg64;

/// Two domains: documents one by one, and `sequence` groups of 1-4 documents; lengths
/// from empty to twice a long row.
fn inputs(seed: u64, docs: usize) -> Vec<DomainInput> {
    let mut rng = Pcg64::seed_from_u64(seed);
    let mut domain = |name: &str, mode: Option<GroupMode>| {
        let lengths: Vec<u32> = (0..docs)
            .map(|_| match rng.gen_range(0..10) {
                0 => 0,
                1..=3 => rng.gen_range(64..512),
                4 => rng.gen_range(512..1024),
                _ => rng.gen_range(1..64),
            })
            .collect();
        let mut groups = Vec::new();
        let mut first = 0;
        while first < docs as u64 {
            let n = rng.gen_range(1..=4).min(docs as u64 - first);
            groups.push(GroupRun {
                id: groups.len() as u64,
                first_doc: first,
                docs: n,
            });
            first += n;
        }
        let src: Arc<dyn DocSource> = Arc::new(MemShard {
            lengths,
            groups: Some(groups),
        });
        let mut settings = DomainSettings::default();
        if let Some(mode) = mode {
            settings.grouping = Grouping {
                mode,
                ..Grouping::default()
            };
        }
        DomainInput {
            name: name.to_string(),
            shards: vec![(format!("{name}/0"), src)],
            settings,
        }
    };
    vec![
        domain("web", None),
        domain("code", Some(GroupMode::Sequence)),
    ]
}

/// A long stage: (step, seq_len, global_batch_rows, best_fit_window, chain_groups).
type St = (u64, u32, u32, u64, bool);

/// 64-token rows x 32, then `stages` in `[[stage]]`.
fn config(stages: &[St]) -> PlanConfig {
    let mut text = "seed = 5\nseq_len = 64\nglobal_batch_rows = 32\nbest_fit_window = 24\n\
                    [[schedule]]\nstep = 0\nweights = { web = 0.6, code = 0.4 }\n"
        .to_string();
    for (step, seq, rows, window, chain) in stages {
        text.push_str(&format!(
            "[[stage]]\nstep = {step}\nseq_len = {seq}\nglobal_batch_rows = {rows}\n\
             best_fit_window = {window}\nchain_groups = {chain}\n"
        ));
    }
    PlanConfig::from_table(&text.parse::<toml::Table>().expect("TOML")).expect("a valid [plan]")
}

/// The plan without stages, with the stage added by a live change at `step`.
fn live(base: &Arc<Plan>, step: u64, chain: bool) -> Arc<Plan> {
    let change = base.stage_change(step, 512, 4, Some(17), chain);
    Arc::new(
        base.with_journal(vec![change])
            .expect("the stage change applies"),
    )
}

/// `steps + 1` batches and the cursor before each.
fn run(plan: &Arc<Plan>, steps: u64) -> (Vec<GlobalBatch>, Vec<Vec<u8>>) {
    let mut p = plan.start();
    (0..=steps)
        .map(|_| {
            let blob = p.cursor();
            (p.next_batch(), blob)
        })
        .unzip()
}

/// A blob's layout version (bytes 8..10).
fn layout(blob: &[u8]) -> u16 {
    u16::from_le_bytes([blob[8], blob[9]])
}

/// The next `n` batches of a resumed planner.
fn next(mut p: Planner, n: usize) -> Vec<GlobalBatch> {
    (0..n).map(|_| p.next_batch()).collect()
}

proptest! {
    #![proptest_config(PtConfig {
        cases: 10,
        failure_persistence: None,
        rng_seed: RngSeed::Fixed(0x57a9e),
        ..PtConfig::default()
    })]

    /// The journal's stage equals the config's: rows and cursor state at every step,
    /// and every blob (either side of the switch, the step before it included) resumes
    /// equal to the uninterrupted stream.
    #[test]
    fn a_journal_stage_equals_the_config_stage(
        seed in any::<u64>(),
        switch in 2u64..20,
        chain in any::<bool>(),
    ) {
        let doms = inputs(seed, 120);
        let staged = Arc::new(Plan::new(&doms, config(&[(switch, 512, 4, 17, chain)]), 1).expect("plan"));
        let base = Arc::new(Plan::new(&doms, config(&[]), 1).expect("plan"));
        let changed = live(&base, switch, chain);
        prop_assert_eq!(changed.stages(), staged.stages());
        let steps = switch + 12;
        let (want, want_blobs) = run(&staged, steps);
        let (got, blobs) = run(&changed, steps);
        for (a, b) in got.iter().zip(&want) {
            prop_assert_eq!(a, b, "step {}", b.step);
        }
        prop_assert_eq!(got[switch as usize].rows.len(), 4);
        prop_assert_eq!(got[switch as usize - 1].rows.len(), 32);
        for (t, (blob, twin)) in blobs.iter().zip(&want_blobs).enumerate() {
            let (c, w) = (cursor::decode(blob).expect("decodes"), cursor::decode(twin).expect("decodes"));
            prop_assert_eq!(&c.streams, &w.streams, "streams at step {}", t);
            prop_assert_eq!(&c.mix.rows, &w.mix.rows, "mixer at step {}", t);
            prop_assert_eq!(c.history, w.history, "history at step {}", t);
            prop_assert_eq!(layout(blob), 8);
            prop_assert_eq!(&cursor::encode(&c), blob, "encode(decode(b)) == b");
        }
        for t in [0, switch - 1, switch, switch + 1, steps - 3] {
            let r = changed.restore(&blobs[t as usize]).expect("the blob resumes");
            prop_assert_eq!(&next(r, 3)[..], &want[t as usize..t as usize + 3], "resumed at {}", t);
            // A daemon without the change adopts the blob's journal.
            let r = base.resume(&blobs[t as usize], 1 << 14).expect("the journal is adopted");
            prop_assert!(r.adopted);
            prop_assert_eq!(r.plan.stages(), staged.stages());
            prop_assert_eq!(&next(r.planner, 3)[..], &want[t as usize..t as usize + 3], "adopted at {}", t);
        }
    }
}

/// A journal stage layers over the config's stages: a later `[[plan.stage]]` gives way
/// to it, an earlier one stays; either way the stream is the config's with those stages.
#[test]
fn a_journal_stage_layers_over_the_config_stages() {
    let doms = inputs(8, 120);
    let plan = |stages: &[St]| Arc::new(Plan::new(&doms, config(stages), 1).expect("plan"));
    let late = plan(&[(30, 512, 4, 17, false)]);
    for (at, want) in [
        (10, plan(&[(10, 256, 8, 17, true)])),
        (35, plan(&[(30, 512, 4, 17, false), (35, 256, 8, 17, true)])),
    ] {
        let change = late.stage_change(at, 256, 8, Some(17), true);
        let changed = Arc::new(late.with_journal(vec![change]).expect("applies"));
        assert_eq!(changed.stages(), want.stages(), "stage at {at}");
        assert_eq!(run(&changed, 45).0, run(&want, 45).0, "stage at {at}");
    }
}

/// Blobs from before the change (layout 7, no stage in their journal) keep resuming
/// under the changed plan up to the change's step; past it they are refused, since the
/// change would rewrite batches their run received.
#[test]
fn blobs_before_the_change_resume_and_later_ones_are_refused() {
    let doms = inputs(3, 120);
    let base = Arc::new(Plan::new(&doms, config(&[]), 1).expect("plan"));
    let switch = 6;
    let changed = live(&base, switch, false);
    let (want, _) = run(&changed, switch + 6);
    let (_, old) = run(&base, switch + 2);
    for t in 0..=switch {
        let blob = &old[t as usize];
        assert_eq!(layout(blob), 7, "no stage change: the layout stays 7");
        let r = changed
            .restore(blob)
            .expect("a blob up to the change resumes");
        assert_eq!(
            next(r, 3),
            want[t as usize..t as usize + 3],
            "resumed at {t}"
        );
    }
    let e = changed
        .restore(&old[switch as usize + 1])
        .err()
        .expect("a blob past the change is refused");
    assert!(
        matches!(e, CursorError::JournalRewrites { at, .. } if at == switch),
        "{e}"
    );
}

/// A stage change is checked as a whole: a forged blob's stage record of an unknown
/// kind, and a stage whose shape is out of bounds, are refused with what is wrong.
#[test]
fn bad_stage_changes_are_refused() {
    let doms = inputs(4, 40);
    let base = Arc::new(Plan::new(&doms, config(&[]), 1).expect("plan"));
    let e = base
        .with_journal(vec![base.stage_change(5, 0, 4, None, false)])
        .err()
        .expect("seq_len 0 is refused");
    assert_eq!(
        e.to_string(),
        "stage change at plan step 5: seq_len 0 is outside 1..=16777216"
    );
    let e = base
        .with_journal(vec![base.stage_change(0, 128, 4, None, false)])
        .err()
        .expect("step 0 is refused");
    assert!(e.to_string().contains("step must be in 1..="), "{e}");
    // A step of 2^31 tokens: cu_seqlens (int32) would wrap, as for `[[plan.stage]]`.
    let e = base
        .with_journal(vec![base.stage_change(5, 131072, 16384, None, false)])
        .err()
        .expect("2^31 tokens a step are refused");
    assert!(
        e.to_string().starts_with(
            "stage change at plan step 5: global_batch_rows 16384 with seq_len 131072 makes a \
             step of 2147500032 tokens (16384 x 131073)"
        ),
        "{e}"
    );
    // The window defaults to the one in force at the change's step.
    let c = base.stage_change(5, 128, 4, None, false);
    assert_eq!(c.stage.map(|s| s.window), Some(24));
    // A kind byte other than 0 or 1 in a layout 8 blob.
    let changed = live(&base, 5, false);
    let mut c = cursor::decode(&changed.start().cursor()).expect("decodes");
    c.journal.push(c.journal[0].clone());
    let mut blob = cursor::encode(&c);
    // The second change's kind byte sits 18 bytes before the superseded count and sum.
    let at = blob.len() - 8 - 8 - 18;
    assert_eq!(blob[at], 1);
    blob[at] = 7;
    let n = blob.len();
    let sum = xxhash_rust::xxh3::xxh3_64(&blob[..n - 8]);
    blob[n - 8..].copy_from_slice(&sum.to_le_bytes());
    let e = cursor::decode(&blob).expect_err("kind 7 is refused");
    assert_eq!(
        e.to_string(),
        format!("cursor is malformed: the journal's stage record at byte {at} has kind 7 (0 or 1 expected)")
    );
}

/// Plan checkpoints written under one stage change are not taken for another's at the
/// same step: the journal digest in their names tells the shapes apart, so a daemon's
/// keeper stores each run's and a seek never tries the other's.
#[test]
fn checkpoint_names_tell_stage_changes_apart() {
    let base = Arc::new(Plan::new(&inputs(3, 120), config(&[]), 1).expect("plan"));
    let (a, b) = (live(&base, 6, false), live(&base, 6, true));
    let other = Arc::new(
        (base.with_journal(vec![base.stage_change(6, 256, 4, Some(17), false)])).expect("applies"),
    );
    let digests = [&base, &a, &b, &other].map(|p| p.journal_digest());
    for i in 0..4 {
        for j in i + 1..4 {
            assert_ne!(digests[i], digests[j], "plans {i} and {j}");
        }
    }
    assert_ne!(a.checkpoint_key(4), other.checkpoint_key(4));
}

/// A real daemon refuses a blob carrying a stage change whose slots do not fit its live
/// ring, as a cursor it cannot serve, and its other client keeps streaming; a blob whose
/// stage fits is adopted, and both clients get the new shape at its step.
#[test]
fn the_daemon_adopts_a_blob_stage_that_fits_and_refuses_one_that_does_not() {
    let corpus = common::corpus(300_000, 2, 2, 100_000);
    let socket = corpus.dir.join("s.sock");
    let serve = common::serve_toml(&socket, 4, 2);
    let config = common::write_config(&corpus.dir, "plain.toml", 64, 8, &[&serve]);
    let mut daemon = common::Serve::spawn(&config, &corpus.dir.join("serve.log"), |_| {});
    daemon.wait_listening(&socket, Duration::from_secs(60));
    let timeout = Some(Duration::from_secs(60));
    let mut first = Client::connect(&socket, &Hello::whole_slice(0, 1)).expect("connects");
    first.set_timeout(timeout);
    let (plan_step, blob) = {
        let b = first.next_batch().expect("a batch");
        (b.plan_step, b.cursor.to_vec())
    };
    let at = plan_step + 20;
    let with_stage = |seq_len: u32, job: &str| {
        let mut c = cursor::decode(&blob).expect("the daemon's blob decodes");
        c.journal.push(millrace::plan::Change {
            at,
            points: Vec::new(),
            stage: Some(millrace::plan::StageChange {
                seq_len,
                rows: 2,
                window: 64,
                chain_groups: false,
            }),
        });
        Hello {
            job: job.into(),
            cursor: Some(millrace::client::to_hex(&cursor::encode(&c))),
            ..Hello::whole_slice(0, 1)
        }
    };
    // 2 rows of 8192 per step: far more than the first client's ring (8 rows of 64).
    match Client::connect(&socket, &with_stage(8192, "huge")) {
        Err(ClientError::Refused { code, message }) => {
            assert_eq!(code, "cursor", "{message}");
            let want = format!(
                "a slot of the stage at plan step {at} (8192 tokens x 2 rows per dp rank) needs"
            );
            assert!(
                message.contains(&want) && message.contains("stage_reserve_tokens"),
                "{message}"
            );
        }
        Err(e) => panic!("refused otherwise: {e}"),
        Ok(_) => panic!("a blob adding a stage too big for the rings was served"),
    }
    for _ in 0..3 {
        let b = first
            .next_batch()
            .expect("the first client keeps streaming");
        assert_eq!((b.rows, b.seq_len), (8, 64));
    }
    // 2 rows of 256: the same tokens per step as 8 of 64, so the same slot fits it.
    let mut staged = Client::connect(&socket, &with_stage(256, "staged")).expect("adopted");
    staged.set_timeout(timeout);
    for c in [&mut first, &mut staged] {
        loop {
            let b = c.next_batch().expect("streams across the stage");
            let want = if b.plan_step < at { (8, 64) } else { (2, 256) };
            assert_eq!((b.rows, b.seq_len), want, "plan step {}", b.plan_step);
            if b.plan_step > at {
                break;
            }
        }
    }
}
