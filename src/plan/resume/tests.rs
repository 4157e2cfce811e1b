//! Tests of blob acceptance (`Plan::resume`, `restore`, `restore_alike`, `check_served`).

use std::collections::BTreeMap;

use super::*;
use crate::config::plan::{DomainSettings, PlanConfig};
use crate::plan::{DocSource, DomainInput, MemShard, StreamError, PLAN_VERSION};

/// Two small domains under `weights` (TOML inline table) and `seed`.
fn plan_with(weights: &str, seed: u64) -> Arc<Plan> {
    plan_of(&format!("seed = {seed}\nweights = {weights}"))
}

/// Two small domains under the `[plan]` keys of `mixture` (seq_len and rows fixed).
fn plan_of(mixture: &str) -> Arc<Plan> {
    let text = format!("seq_len = 15\nglobal_batch_rows = 4\n{mixture}");
    let table: toml::Table = toml::from_str(&text).unwrap();
    let cfg = PlanConfig::from_table(&table).unwrap();
    Arc::new(Plan::new(&two_domains(DomainSettings::default()), cfg, 1).unwrap())
}

/// Domains a and b over the same small shard; b with `b` settings.
fn two_domains(b: DomainSettings) -> Vec<DomainInput> {
    [("a", DomainSettings::default()), ("b", b)]
        .iter()
        .map(|(n, settings)| DomainInput {
            name: n.to_string(),
            shards: vec![(
                format!("{n}/0"),
                Arc::new(MemShard {
                    lengths: (1..300u32).map(|i| i * 7 % 23 + 1).collect(),
                    groups: None,
                }) as Arc<dyn DocSource>,
            )],
            settings: *settings,
        })
        .collect()
}

fn plan() -> Arc<Plan> {
    plan_with("{ a = 1.0, b = 1.0 }", 7)
}

/// [`plan`] whose config file makes what `changed(&plan(), 10, 3.0)` does live:
/// from plan step 10, domain a weighs 3.
fn filed() -> Arc<Plan> {
    plan_of(
        "seed = 7\nschedule = [ { step = 0, weights = { a = 1.0, b = 1.0 } }, \
         { step = 10, ramp = false, weights = { a = 3.0, b = 1.0 } } ]",
    )
}

/// `plan` with one live change: from plan step `at`, domain a weighs `a`.
fn changed(plan: &Arc<Plan>, at: u64, a: f64) -> Arc<Plan> {
    let w = BTreeMap::from([("a".to_string(), a)]);
    let change = plan.weights_change(at, &w).unwrap();
    Arc::new(plan.with_journal(vec![change]).unwrap())
}

fn blob_at(plan: &Arc<Plan>, step: u64) -> Vec<u8> {
    plan.seek(step).cursor()
}

fn err(r: Result<Resumed, CursorError>) -> CursorError {
    match r {
        Ok(_) => panic!("the blob was accepted"),
        Err(e) => e,
    }
}

/// A blob of another planner version (layout 10, which only a build of a version
/// other than 1 writes) is refused by resume and by restore (which plan checkpoints
/// go through too), naming both versions, before any other check; this version's blobs stay layout 7
/// to 9, as every build before planner versions wrote them.
#[test]
fn a_blob_of_another_planner_version_is_refused() {
    let plan = plan();
    let blob = blob_at(&plan, 9);
    assert!((7..=9).contains(&u16::from_le_bytes([blob[8], blob[9]])));
    let mut c = cursor::decode(&blob).unwrap();
    assert_eq!(c.plan_version, PLAN_VERSION);
    c.plan_version = PLAN_VERSION + 1;
    let other = cursor::encode(&c);
    assert_eq!(u16::from_le_bytes([other[8], other[9]]), 10);
    assert!(other.len() >= blob.len() + 4); // and layout 9's fields
    assert_eq!(cursor::decode(&other).unwrap(), c);
    let want = CursorError::PlanVersion {
        blob: PLAN_VERSION + 1,
        ours: PLAN_VERSION,
    };
    assert_eq!(err(plan.resume(&other, usize::MAX)), want);
    assert_eq!(plan.restore(&other).err(), Some(want.clone()));
    let text = want.to_string();
    assert!(
        text.contains(&format!("planner version {}", PLAN_VERSION + 1))
            && text.contains(&format!("is version {PLAN_VERSION}")),
        "{text}"
    );
    // A step beyond any run's (only a forged blob has one) is refused before the rest.
    let mut far = cursor::decode(&blob).unwrap();
    far.step = crate::config::plan::MAX_STEP + 1;
    assert!(matches!(
        err(plan.resume(&cursor::encode(&far), usize::MAX)),
        CursorError::Step { .. }
    ));
    // Back at this version, the same data resumes as the original blob does.
    c.plan_version = PLAN_VERSION;
    let same = cursor::encode(&c);
    assert_eq!(same, blob);
    assert_eq!(plan.restore(&same).unwrap().cursor(), blob);
}

#[test]
fn a_blob_under_the_same_journal_resumes_as_restore_does() {
    let plan = plan();
    let blob = blob_at(&plan, 9);
    let mut r = plan.resume(&blob, 0).unwrap();
    assert!(!r.adopted && Arc::ptr_eq(&r.plan, &plan));
    assert!(r.adopted_changes().is_empty());
    assert!(r.check_served(0, &plan).is_ok());
    assert_eq!(r.planner.step(), 9);
    let mut q = plan.restore(&blob).unwrap();
    for _ in 0..5 {
        assert_eq!(r.planner.next_batch(), q.next_batch());
    }
}

#[test]
fn a_newer_journal_in_the_blob_is_adopted() {
    let fresh = plan();
    let ahead = changed(&fresh, 10, 3.0);
    let mut run = ahead.seek(20);
    let blob = run.cursor();
    let mut r = fresh.resume(&blob, 1 << 14).unwrap();
    assert!(r.adopted);
    assert_eq!(r.plan.journal(), ahead.journal());
    assert_eq!(r.adopted_changes(), ahead.journal());
    assert_eq!(r.plan.fingerprint(), fresh.fingerprint());
    for _ in 0..5 {
        assert_eq!(r.planner.next_batch(), run.next_batch());
    }
    // Step 10 unserved: the change may still land; served: adopting it is refused.
    assert!(r.check_served(10, &fresh).is_ok());
    let e = r.check_served(11, &fresh).unwrap_err();
    assert_eq!(
        e,
        CursorError::Served {
            at: 10,
            step: 11,
            plan_step: 11
        }
    );
    let msg = e.to_string();
    assert!(
        msg.starts_with(
            "it carries a live change from plan step 10 that this daemon does not have, \
             but step 11 (plan step 11) has already been served to other clients without it"
        ) && msg.contains("Resume every rank from the blob that carries the change"),
        "{msg}"
    );
    // Restore does not adopt.
    assert_eq!(
        fresh.restore(&blob).err(),
        Some(CursorError::JournalBehind { blob: 1, ours: 0 })
    );
}

/// The plan state digest leaves out what a node's history adds to its blobs (the
/// journal, its superseded count, the history digest and the layout they pick) and
/// keeps what planning left behind: the same step under a journal that changes
/// nothing gives the same state from different bytes; another step, or another
/// mixture, another state.
#[test]
fn the_plan_state_is_the_blob_without_its_history() {
    let filed = filed();
    let ahead = changed(&filed, 10, 3.0);
    let (with, s1) = ahead.seek(12).cursor_with_state();
    let (without, s2) = filed.seek(12).cursor_with_state();
    assert_ne!(with, without, "the journals differ");
    assert_eq!(s1, s2);
    assert_eq!(with, ahead.seek(12).cursor(), "the same bytes as cursor()");
    let mut c = cursor::decode(&with).unwrap();
    c.superseded = 3;
    c.history ^= 1;
    assert_eq!(cursor::encode_with_state(&c).1, s1);
    assert_ne!(filed.seek(13).cursor_with_state().1, s1);
    assert_ne!(plan().seek(12).cursor_with_state().1, s1);
}

/// A daemon that adopts, by value, a change its config already makes restores every
/// live ring's cursor under the adopted plan: a cursor made under the plan in force
/// past the change's step is accepted (`restore` alone refuses it: the change starts
/// before it) and continues as under that plan; where the change is real, refused.
#[test]
fn a_cursor_restores_under_an_alike_plan_with_an_earlier_change() {
    let filed = filed();
    let ahead = changed(&filed, 10, 3.0);
    let blob = blob_at(&filed, 14);
    assert!(matches!(
        ahead.restore(&blob),
        Err(CursorError::JournalRewrites { at: 10, .. })
    ));
    let mut p = ahead.restore_alike(&blob).unwrap();
    let mut want = filed.seek(14);
    for _ in 0..6 {
        assert_eq!(p.next_batch(), want.next_batch());
    }
    // A later change on top (the cursor's ring published nothing since): the cursor
    // is judged against the plan of its own journal, not the one just replaced.
    let w = BTreeMap::from([("b".to_string(), 2.0)]);
    let later = ahead.weights_change(30, &w).unwrap();
    let mut journal = ahead.journal().to_vec();
    journal.push(later);
    let next = Arc::new(ahead.with_journal(journal).unwrap());
    let mut p = next.restore_alike(&blob).unwrap();
    let mut want = filed.seek(14);
    for _ in 0..6 {
        assert_eq!(p.next_batch(), want.next_batch());
    }
    let bare = plan();
    assert!(matches!(
        changed(&bare, 10, 3.0).restore_alike(&blob_at(&bare, 14)),
        Err(CursorError::JournalRewrites { at: 10, .. })
    ));
}

/// After a restart, ranks of one job may bring blobs of one step with and without a
/// change that starts at that step (one saved before the change reached its ring).
/// Whichever comes first, the other resumes when the change plans nothing served
/// differently: here the config file already says it. When it would (the config
/// does not), it is refused whichever step it is, by value: a change to weights the
/// plan already has at the served steps is adopted.
#[test]
fn an_adopted_change_the_plan_already_makes_is_not_refused_as_served() {
    // The config file holds the change: from plan step 10, a weighs 3.
    let filed = filed();
    let ahead = changed(&filed, 10, 3.0);
    let blob_with = blob_at(&ahead, 10);
    let blob_without = blob_at(&filed, 10);
    assert_eq!(
        ahead.seek(10).next_batch(),
        filed.seek(10).next_batch(),
        "the change repeats the file"
    );
    // Rank without the change first: its ring served step 10, so 11 is the first
    // changeable step; the blob with the change still resumes.
    assert!(filed.resume(&blob_without, 1 << 14).is_ok());
    let r = filed.resume(&blob_with, 1 << 14).unwrap();
    assert!(r.adopted);
    assert!(r.check_served(11, &filed).is_ok());
    assert!(r.check_served(1000, &filed).is_ok());
    // The same change where the file does not have it rewrites a served step.
    let bare = plan();
    let r = bare
        .resume(&blob_at(&changed(&bare, 10, 3.0), 10), 1 << 14)
        .unwrap();
    assert!(matches!(
        r.check_served(11, &bare),
        Err(CursorError::Served { at: 10, .. })
    ));
    assert!(r.check_served(10, &bare).is_ok());
}

#[test]
fn a_journal_too_large_for_the_cap_is_refused() {
    let fresh = plan();
    let blob = blob_at(&changed(&fresh, 10, 3.0), 20);
    let e = err(fresh.resume(&blob, 8));
    assert_eq!(e, CursorError::JournalTooLarge { changes: 1, cap: 8 });
    assert_eq!(
        e.to_string(),
        "its journal of 1 live changes is larger than this daemon's cursor field allows \
         (8 bytes); give the daemon the [serve] live_changes of the run that wrote it"
    );
}

#[test]
fn diverged_journals_are_refused() {
    let fresh = plan();
    let blob = blob_at(&changed(&fresh, 10, 3.0), 20);
    let other = changed(&fresh, 12, 0.5);
    let e = err(other.resume(&blob, 1 << 14));
    assert_eq!(
        e,
        CursorError::JournalDiverged {
            change: 1,
            blob_at: Some(10),
            ours_at: Some(12)
        }
    );
    assert_eq!(
        e.to_string(),
        "its journal of live mixture changes disagrees with this daemon's at change #1 \
         (blob: from plan step 10, daemon: from plan step 12); the blob's run received \
         different changes, and serving it would change its data"
    );
}

#[test]
fn a_change_of_ours_before_the_blob_step_is_refused() {
    let fresh = plan();
    let blob = blob_at(&fresh, 20);
    let e = err(changed(&fresh, 10, 3.0).resume(&blob, 1 << 14));
    assert_eq!(
        e,
        CursorError::JournalRewrites {
            at: 10,
            plan_step: 20
        }
    );
    // One after the blob's step leaves its past alone.
    let r = changed(&fresh, 25, 3.0).resume(&blob, 1 << 14).unwrap();
    assert!(!r.adopted);
}

#[test]
fn a_journal_that_does_not_apply_is_refused() {
    let fresh = plan();
    let blob = blob_at(&changed(&fresh, 10, 3.0), 20);
    let mut c = cursor::decode(&blob).unwrap();
    c.journal[0].points[0].1[0] = f64::NAN;
    let e = err(fresh.resume(&cursor::encode(&c), 1 << 14));
    assert!(matches!(e, CursorError::JournalInvalid(_)), "{e:?}");
    assert!(e.to_string().contains("finite"), "{e}");
}

#[test]
fn other_configs_histories_and_bytes_are_refused() {
    let plan = plan();
    let blob = blob_at(&plan, 9);
    let other_seed = plan_with("{ a = 1.0, b = 1.0 }", 8);
    assert!(matches!(
        err(other_seed.resume(&blob, 1 << 14)),
        CursorError::Fingerprint { .. }
    ));
    let other_weights = plan_with("{ a = 1.0, b = 2.0 }", 7);
    assert!(matches!(
        err(other_weights.resume(&blob, 1 << 14)),
        CursorError::History { step: 9, .. }
    ));
    assert!(matches!(
        err(plan.resume(&blob[..blob.len() - 1], 1 << 14)),
        CursorError::Length { .. }
    ));
    let mut flipped = blob.clone();
    flipped[40] ^= 1;
    assert!(matches!(
        err(plan.resume(&flipped, 1 << 14)),
        CursorError::Checksum { .. }
    ));
    assert_eq!(err(plan.resume(b"not a cursor", 0)), CursorError::Magic);
}

#[test]
fn structural_faults_are_typed_and_name_the_domain() {
    let plan = plan();
    let mut c = cursor::decode(&blob_at(&plan, 9)).unwrap();
    c.streams[1].window_start = u64::MAX;
    let e = err(plan.resume(&cursor::encode(&c), 0));
    assert_eq!(
        e,
        CursorError::Stream {
            domain: "b".into(),
            source: StreamError::WindowPastEpoch {
                start: u64::MAX,
                units: 299
            }
        }
    );
    assert!(e
        .to_string()
        .starts_with("cursor is malformed: domain b: window start"));
    // A layout 6 blob with a domain short; in layout 7 a domain missing from the
    // blob is new to it, and b has weight from step 0.
    let mut c = cursor::decode(&blob_at(&plan, 9)).unwrap();
    c.streams.pop();
    c.domains.pop();
    assert_eq!(
        err(plan.resume(&cursor::encode(&c), 0)),
        CursorError::DomainEarly {
            domain: "b".into(),
            step: 0,
            plan_step: 9
        }
    );
    c.fingerprint = Fingerprint::Binary(plan.fingerprint());
    c.domains.clear();
    assert!(matches!(
        err(plan.resume(&cursor::encode(&c), 0)),
        CursorError::Shape {
            domains: 1,
            ours: 2,
            ..
        }
    ));
    let mut c = cursor::decode(&blob_at(&plan, 9)).unwrap();
    c.mix.deficit[1] = i64::MAX;
    assert_eq!(
        err(plan.resume(&cursor::encode(&c), 0)),
        CursorError::Deficit {
            domain: "b".into(),
            rows: i64::MAX / crate::plan::mix::TICKS,
            most: 20,
        }
    );
}

/// `plan()`'s corpus, 16 rows a batch, with domain b bursty (period 4: cycles start at 0, 4, 8, ...)
/// under `schedule` (TOML `[[schedule]]` entries).
fn bursty_plan(schedule: &str) -> Arc<Plan> {
    let text = format!("seq_len = 15\nglobal_batch_rows = 16\nseed = 7\n{schedule}");
    let cfg = PlanConfig::from_table(&toml::from_str(&text).unwrap()).unwrap();
    let bursty = DomainSettings {
        bursty: Some(crate::config::plan::Bursty { period: 4 }),
        ..DomainSettings::default()
    };
    Arc::new(Plan::new(&two_domains(bursty), cfg, 1).unwrap())
}

/// A blob at plan step 6 sits inside the bursty cycle that began at step 4, whose
/// rows were computed from the weights of steps 4-7. An edit at step 7 (in the config
/// or by a live change) rewrites step 4: the blob is refused. Before layout 6 the
/// history covered steps before 6 only and both were accepted, resuming a stream that
/// was neither the old run's nor the new plan's.
#[test]
fn an_edit_inside_a_bursty_cycle_the_blob_began_is_refused() {
    const FLAT: &str = "[[schedule]]\nstep = 0\nweights = { a = 3.0, b = 1.0 }\n";
    let at = |step: u64| {
        format!(
            "{FLAT}[[schedule]]\nstep = {step}\nramp = false\n\
             weights = {{ a = 9.0, b = 1.0 }}\n"
        )
    };
    let old = bursty_plan(FLAT);
    let blob = blob_at(&old, 6);
    let edited = bursty_plan(&at(7));
    // The edit does change what step 4 planned.
    assert_ne!(edited.seek(6).mix_state(), old.seek(6).mix_state());
    assert!(
        matches!(
            edited.restore(&blob),
            Err(CursorError::History { step: 6, .. })
        ),
        "a config edit inside the blob's bursty cycle was accepted"
    );
    let live = changed(&old, 7, 9.0);
    assert!(
        matches!(
            err(live.resume(&blob, 1 << 14)),
            CursorError::History { step: 6, .. }
        ),
        "a live change inside the blob's bursty cycle was accepted"
    );
    // Past the cycle's end the edit is the blob's future.
    let later = bursty_plan(&at(8));
    let mut r = later.restore(&blob).unwrap();
    let mut want = later.seek(6);
    for _ in 0..6 {
        assert_eq!(r.next_batch(), want.next_batch());
    }
    // The first step a change may take once steps before 6 are served is the
    // cycle's end; a blob adopting a change inside it is refused as served.
    assert_eq!(old.first_safe_change(6), 8);
    assert_eq!(old.first_safe_change(4), 4);
    assert_eq!(old.first_safe_change(0), 0);
    let ahead = changed(&old, 7, 9.0);
    let r = old.resume(&blob_at(&ahead, 9), 1 << 14).unwrap();
    assert!(r.adopted);
    assert!(matches!(
        r.check_served(6, &old),
        Err(CursorError::Served { at: 7, .. })
    ));
    assert!(r.check_served(4, &old).is_ok());
    // Layout 6 and 5 blobs (the whole-corpus fingerprint; 5: history up to its
    // step only) still resume as they always did.
    let mut c = cursor::decode(&blob).unwrap();
    c.fingerprint = Fingerprint::Binary(old.fingerprint());
    c.domains.clear();
    let six = cursor::encode(&c);
    assert_eq!(u16::from_le_bytes([six[8], six[9]]), 6);
    let mut r = old.restore(&six).unwrap();
    assert_eq!(r.next_batch(), old.seek(6).next_batch());
    c.lookahead = false;
    c.history = old.history(6);
    let five = cursor::encode(&c);
    assert_eq!(u16::from_le_bytes([five[8], five[9]]), 5);
    let mut r = old.restore(&five).unwrap();
    let mut want = old.seek(6);
    assert_eq!(r.next_batch(), want.next_batch());
}

/// Blobs written by the build before layout 5, by this module's `plan()`: a layout 3
/// blob at step 9, and a layout 4 blob at step 20 under one live change from plan step
/// 10 (a = 3.0) with 2 changes superseded.
const OLD_LAYOUT_3: &[&str] = &[
    "4d52435552534f5203000000e00000000340f9f63ef1e49755349ede56e4cb360377a3f056024fb0",
    "09000000000000000900000000000000020012000000000000000000000000000000000000000001",
    "07000000000000000000000000000000120000000000000012000000000000002001000000000000",
    "00000000000000000000000000000000120000000000000000000000000000000000000000010700",
    "00000000000000000000000000001200000000000000120000000000000020010000000000000000",
    "00000000000000000000000000000000e7f449e15b8af7b7",
];
const OLD_LAYOUT_4: &[&str] = &[
    "4d52435552534f52040000000a0100000340f9f63ef1e49755349ede56e4cb36a09e3f3e175c55f7",
    "14000000000000001400000000000000020032000000000000000000000000000000000000000001",
    "07000000000000000000000000000000320000000000000032000000000000002003000000000000",
    "000000000000000000000000000000001e0000000000000000000000000000000000000000010700",
    "00000000000000000000000000001e000000000000001e00000000000000e0010000000000000000",
    "000000000000000000000000000001000a0000000000000001000a00000000000000000000000000",
    "0840000000000000f03f02000000000000001761214464edc465",
];

fn unhex(lines: &[&str]) -> Vec<u8> {
    let s = lines.concat();
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// Checkpoints taken before the binary fingerprint still resume, bit for bit, checked
/// against the legacy JSON fingerprint; the blobs a planner writes now are layout 5.
#[test]
fn blobs_of_layouts_3_and_4_still_resume() {
    let fresh = plan();
    let old = unhex(OLD_LAYOUT_3);
    let c = cursor::decode(&old).unwrap();
    assert_eq!(
        c.fingerprint,
        Fingerprint::LegacyJson(fresh.legacy_fingerprint())
    );
    assert_ne!(fresh.legacy_fingerprint(), fresh.fingerprint());
    let mut r = fresh.resume(&old, 0).unwrap();
    let mut want = fresh.seek(9);
    let now = want.cursor();
    // Layout 8 is written only for a journal holding a stage change, 9 only for an
    // epoch a stage's upsampling override shapes.
    assert_eq!(u16::from_le_bytes([now[8], now[9]]), 7);
    assert_eq!(
        cursor::decode(&now).unwrap().fingerprint,
        Fingerprint::Settings(fresh.settings_fingerprint())
    );
    assert_eq!(r.planner.step(), 9);
    for _ in 0..5 {
        assert_eq!(r.planner.next_batch(), want.next_batch());
    }
    // A legacy blob made for another config is refused, naming the legacy values.
    let other = plan_with("{ a = 1.0, b = 1.0 }", 8);
    assert_eq!(
        err(other.resume(&old, 0)),
        CursorError::Fingerprint {
            blob: fresh.legacy_fingerprint(),
            ours: other.legacy_fingerprint()
        }
    );
    // Layout 4: the journal and its superseded count are adopted from the blob.
    let old = unhex(OLD_LAYOUT_4);
    let mut r = fresh.resume(&old, 1 << 14).unwrap();
    assert!(r.adopted);
    assert_eq!(r.plan.superseded(), 2);
    assert_eq!(r.adopted_changes().len(), 1);
    let ahead = changed(&fresh, 10, 3.0);
    let mut want = ahead.seek(20);
    for _ in 0..5 {
        assert_eq!(r.planner.next_batch(), want.next_batch());
    }
    // Encoding a decoded old blob writes the same bytes again.
    assert_eq!(cursor::encode(&cursor::decode(&old).unwrap()), old);
}

/// Plan checkpoints written under a live change scheduled ahead (weights, or a stage, at
/// plan step 200) serve a seek of the plan without it (`explain`, `plan --from`, a
/// restarted daemon) up to the change: the seek restores the last one before it instead
/// of skipping them all and replaying from step 0, and equals the plain replay, before
/// and across the change's step. Past the change they are not the plan's, and the seek
/// does not use them.
#[test]
fn checkpoints_under_a_change_ahead_serve_a_plan_without_it() {
    use crate::plan::MemCheckpoints;
    use std::sync::atomic::AtomicBool;
    let cancel = AtomicBool::new(false);
    let base = plan();
    let staged = Arc::new(
        base.with_journal(vec![base.stage_change(200, 30, 2, None, false)])
            .unwrap(),
    );
    for live in [changed(&base, 200, 3.0), staged] {
        let store = MemCheckpoints::new();
        live.seek_checkpointed(260, 16, 8, &store, &cancel).unwrap();
        let theirs = store.blobs().len();
        assert_eq!(theirs, 32, "checkpoints at 8, 16, ... 256");
        let mut got = base.seek_checkpointed(150, 16, 8, &store, &cancel).unwrap();
        assert_eq!(
            store.blobs().len(),
            theirs,
            "restored from 144: no checkpoint of its own written"
        );
        assert!(store.refusals().is_empty(), "{:?}", store.refusals());
        let mut plain = base.seek(150);
        assert_eq!(got.cursor(), plain.cursor());
        for _ in 150..230 {
            assert_eq!(got.next_batch(), plain.next_batch());
        }
        // Past the change: from its own checkpoint at 200 at best (it restores the
        // written one there, then writes its own from 208 on).
        let got = base.seek_checkpointed(250, 16, 8, &store, &cancel).unwrap();
        assert_eq!(got.cursor(), base.seek(250).cursor());
        let own = base.journal_digest();
        let mine: Vec<u64> = (store.blobs().into_keys())
            .filter(|k| k.journal == own)
            .map(|k| k.plan_step)
            .collect();
        assert_eq!(mine, (208..=248).step_by(8).collect::<Vec<_>>());
    }
}
