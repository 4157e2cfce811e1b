//! Tests of the materializers' scheduling (`schedule`): which ring a claim serves, and
//! what the watchdog names when a read hangs under the hub's lock (a claim's planning,
//! a live change), in a seek or in the plan thread.

use super::*;
use crate::serve::hub::phase::tests::{entry, peer, plan};
use crate::serve::hub::{Job, PeerCred};

const SLOTS: u32 = 4;

/// A ring that trails its job's most advanced ring by more than [`trails_far`] takes
/// its job's turn, even when another ring of the job is emptier; a trailing ring that
/// is full does not hold the others back; and it never takes another job's turn.
#[test]
fn a_ring_far_behind_its_job_is_filled_first_when_it_can_take_a_step() {
    let plan = plan();
    let far = trails_far(crate::serve::hub::jobplan::job_lag(
        plan.config().global_batch_rows,
    ));
    // A ring whose peer released `step` and that holds `filled` published steps.
    let ring = |step: u64, filled: u64| {
        let mut e = entry(1, false);
        e.join(1, peer("p"));
        for p in e.peers.values_mut() {
            p.released = step;
        }
        e.published = step + filled;
        e.next_fill = step + filled;
        e
    };
    // The rank `pick_ring` picks among `rings` (rank = index) of one job.
    let pick = |rings: Vec<RingEntry>| {
        let mut st = State::new(plan.clone());
        let mut job = Job::new(rings.len() as u32);
        for (r, e) in rings.into_iter().enumerate() {
            job.rings.insert(r as u32, e);
        }
        st.jobs.insert("j".into(), job);
        pick_ring(&st, SLOTS, &[]).map(|(_, r)| r)
    };
    let front = far + 100;
    // Rank 1 trails by `far` (one step filled): the emptiest, rank 0, first.
    assert_eq!(pick(vec![ring(front, 0), ring(99, 1)]), Some(0));
    // By one more: rank 1 first, though rank 0 is emptier.
    assert_eq!(pick(vec![ring(front, 0), ring(98, 1)]), Some(1));
    // Rank 1 far behind but full (its trainer is the bottleneck): rank 0.
    let full = ring(98 - u64::from(SLOTS), SLOTS.into());
    assert_eq!(pick(vec![ring(front, 0), full]), Some(0));
    // A resumed ring still joining its peers (one of two here) does not lead: led by
    // rank 2, rank 1 is not far behind, and the emptiest, rank 2, goes first (led by
    // the joining ring, rank 1 would trail by `far + 1`).
    let mut joining = entry(2, true);
    joining.join(1, peer("p"));
    joining.next_fill = front;
    assert!(!joining.started());
    assert_eq!(pick(vec![joining, ring(98, 1), ring(100, 0)]), Some(2));
    // Across jobs the emptiest ring still decides whose turn it is: job "a"'s
    // laggard (two steps filled) waits for job "b"'s emptier ring, and takes job
    // "a"'s turn once that comes (rank 0 of "a" is then the emptiest).
    let two = |b_filled: u64| {
        let mut st = State::new(plan.clone());
        let mut a = Job::new(2);
        a.rings.insert(0, ring(front, 1));
        a.rings.insert(1, ring(97, 2));
        let mut b = Job::new(1);
        b.rings.insert(0, ring(7, b_filled));
        st.jobs.insert("a".into(), a);
        st.jobs.insert("b".into(), b);
        pick_ring(&st, SLOTS, &[])
    };
    assert_eq!(two(0), Some(("b".into(), 0)));
    assert_eq!(two(3), Some(("a".into(), 1)));
}

/// A read under the hub's lock that hangs (here the page of the shard's index a
/// worker reads while it claims a step, held by userfaultfd as a hung network
/// filesystem holds it) stopped every publish and admission with nothing naming it,
/// and STATUS waited for the lock with them. Now the watchdog names it (job, rank,
/// step, the index file and bytes), and STATUS answers within its wait, marked
/// `hub_busy`, with it; once the page comes the worker goes on.
#[test]
fn a_read_hung_under_the_hub_lock_is_named_and_status_still_answers() {
    use crate::serve::fill::tests::HeldPage;
    let dir = tempfile::tempdir().unwrap();
    let hub = admitted_hub(dir.path());
    let Some(held) = HeldPage::hold(&hub.source, 0, 0) else {
        return;
    };
    let idx = dir.path().join("s.idx");
    let (stuck, status, waited, warned, went_on) = std::thread::scope(|s| {
        let worker = s.spawn(|| hub.worker());
        let what = "under the hub's lock, planning a step: reading the index";
        let stuck = stuck_reading(&hub, what, || false);
        let t1 = Instant::now();
        let status = hub.status();
        let waited = t1.elapsed();
        let warned = (hub.fills).warn_stuck(&hub.source, Duration::ZERO, STUCK_REPEAT);
        // Released and stopped in any case: the scope ends only once the worker does.
        held.release(&idx);
        let t0 = Instant::now();
        let went_on = loop {
            if !hub.status().hub_busy && hub.stuck_fills(Duration::ZERO).is_empty() {
                break true;
            }
            if t0.elapsed() > Duration::from_secs(30) {
                break false;
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        hub.stop();
        worker.join().unwrap();
        (stuck, status, waited, warned, went_on)
    });
    let what = "under the hub's lock, planning a step";
    the_one_named(&stuck, 0, what, &idx);
    assert!(status.hub_busy, "STATUS took the lock a hung read holds");
    assert!(waited < Duration::from_secs(10), "STATUS took {waited:?}");
    assert_eq!(status.stuck_fills.len(), 1, "{:?}", status.stuck_fills);
    assert_eq!(warned, 1);
    // The page came: the worker went on, and STATUS had the lock again.
    assert!(went_on, "the worker never went on");
}

/// The same for a seek: a client that starts at a far step has its planner replayed
/// there (on the planning pool's threads) before the lock, and a read of that replay
/// that hung was named nowhere. Now the watchdog names the seek (job, rank, start
/// step) and the index bytes its planning thread reads; once the page comes the
/// client is admitted.
#[test]
fn a_seek_hung_in_an_index_read_is_named() {
    use crate::serve::fill::tests::HeldPage;
    use std::sync::atomic::AtomicBool;
    let dir = tempfile::tempdir().unwrap();
    let (hub, mut hello) = one_shard_hub(dir.path());
    hello.start_step = Some(1000);
    let flights = Arc::new(super::super::SeekFlights::default());
    let ticket = hub
        .seek_ticket(&hello, &flights)
        .expect("step 1000 needs a seek");
    let Some(held) = HeldPage::hold(&hub.source, 0, 0) else {
        return;
    };
    let idx = dir.path().join("s.idx");
    let no = AtomicBool::new(false);
    let (stuck, admitted) = std::thread::scope(|s| {
        let admit = s.spawn(|| {
            let r = hub.admit(&hello, PeerCred::default(), &no, Some((&ticket, true)));
            r.map(|a| a.welcome.start_step)
                .map_err(|e| format!("{e:?}"))
        });
        let what = "seeking the client's start step: reading the index";
        let stuck = stuck_reading(&hub, what, || admit.is_finished());
        held.release(&idx);
        (stuck, admit.join().unwrap())
    });
    the_one_named(&stuck, 1000, "seeking the client's start step", &idx);
    assert_eq!(admitted, Ok(1000));
    assert!(hub.stuck_fills(Duration::ZERO).is_empty());
}

/// The same for the plan thread: it plans a job's next steps outside the hub's lock,
/// and a read of that planning that hung held the job's planner with nothing naming
/// it (each ring then stops at the first step not planned). Now the watchdog names
/// it (the job, the first step it plans, the index bytes), and once the page comes
/// the thread checks the planner back in with the steps planned.
#[test]
fn a_plan_thread_hung_in_an_index_read_is_named() {
    use crate::serve::fill::tests::HeldPage;
    let dir = tempfile::tempdir().unwrap();
    let hub = admitted_hub(dir.path());
    let planned = |hub: &Hub| hub.lock().jobs.get("j").map_or(0, |j| j.plan.planned);
    let wait_for = |what: &dyn Fn() -> bool| {
        let t0 = Instant::now();
        while !what() && t0.elapsed() < Duration::from_secs(30) {
            std::thread::sleep(Duration::from_millis(5));
        }
        what()
    };
    let (stuck, warned, before, after) = std::thread::scope(|s| {
        // A worker fills the ring's two slots first, planning inline: the job's
        // planner exists, and the ring is full (nothing releases), so the worker sleeps.
        let worker = s.spawn(|| hub.worker());
        let filled = wait_for(&|| hub.lock().jobs["j"].rings[&0].published == 2);
        let before = planned(&hub);
        let held = HeldPage::hold(&hub.source, 0, 0);
        let thread = held.as_ref().map(|_| s.spawn(|| hub.plan_ahead()));
        let what = "the plan thread, planning the job's next steps: reading the index";
        let stuck = match &thread {
            Some(t) => stuck_reading(&hub, what, || t.is_finished()),
            None => Vec::new(),
        };
        let warned = (hub.fills).warn_stuck(&hub.source, Duration::ZERO, STUCK_REPEAT);
        // Released and stopped in any case: the scope ends only once the threads do.
        if let Some(held) = &held {
            held.release(&dir.path().join("s.idx"));
        }
        let ended = wait_for(&|| hub.stuck_fills(Duration::ZERO).is_empty());
        let after = wait_for(&|| planned(&hub) > before).then(|| planned(&hub));
        hub.stop();
        worker.join().unwrap();
        if let Some(t) = thread {
            t.join().unwrap();
        }
        assert!(filled && ended, "filled {filled}, the watch ended {ended}");
        (held.is_some().then_some(stuck), warned, before, after)
    });
    let Some(stuck) = stuck else {
        return; // no userfaultfd here
    };
    let what = "the plan thread, planning the job's next steps";
    the_one_named(&stuck, before, what, &dir.path().join("s.idx"));
    assert_eq!(warned, 1);
    assert!(
        after.is_some(),
        "the thread planned nothing after {before} steps"
    );
}

/// The same for a live change: it restores the rings' planners and packs the new
/// stage's windows under the hub's lock, reading shard indexes, and a read of it that
/// hung stopped every ring with nothing naming it but "applying a live change". Now
/// the watchdog names the index bytes read, STATUS still answers (`hub_busy`), and
/// once the page comes the change applies at the step asked.
#[test]
fn a_live_change_hung_in_an_index_read_is_named_and_status_still_answers() {
    use crate::serve::fill::tests::HeldPage;
    use crate::serve::hub::{ChangeRequest, Late, Proposal};
    let dir = tempfile::tempdir().unwrap();
    // A client that reads per-slot shapes, so that it may be served a new stage.
    let (hub, mut hello) = one_shard_hub(dir.path());
    hello.stages = true;
    let no = std::sync::atomic::AtomicBool::new(false);
    let admitted = hub.admit(&hello, PeerCred::default(), &no, None);
    assert!(admitted.is_ok(), "{:?}", admitted.err());
    let Some(held) = HeldPage::hold(&hub.source, 0, 0) else {
        return;
    };
    let idx = dir.path().join("s.idx");
    let req = ChangeRequest {
        proposal: Proposal::Stage {
            seq_len: 32,
            global_batch_rows: 2,
            best_fit_window: None,
            chain_groups: false,
        },
        at_step: Some(20),
        late: Late::Refuse,
        source: "ctl",
    };
    let what = "under the hub's lock, applying a live change: ";
    let (stuck, status, waited, warned, applied) = std::thread::scope(|s| {
        let change = s.spawn(|| hub.change(&req));
        let stuck = stuck_reading(&hub, what, || change.is_finished());
        let t0 = Instant::now();
        let status = hub.status();
        let waited = t0.elapsed();
        let warned = (hub.fills).warn_stuck(&hub.source, Duration::ZERO, STUCK_REPEAT);
        // Released in any case: the scope ends only once the change does.
        held.release(&idx);
        (stuck, status, waited, warned, change.join().unwrap())
    });
    assert_eq!(
        stuck.len(),
        1,
        "{stuck:?} {:?}",
        applied.as_ref().map(|a| &a.message).map_err(|e| &e.message)
    );
    let reading = &stuck[0].reading;
    assert!(
        reading.starts_with(what)
            && reading.contains(&format!("index of {} bytes ", idx.display())),
        "{reading}"
    );
    assert!(status.hub_busy, "STATUS took the lock a hung read holds");
    assert!(waited < Duration::from_secs(10), "STATUS took {waited:?}");
    assert_eq!(status.stuck_fills.len(), 1, "{:?}", status.stuck_fills);
    assert_eq!(warned, 1);
    let applied = applied.map_err(|e| e.message).unwrap();
    assert_eq!(applied.applied_step, Some(20), "{}", applied.message);
    assert!(hub.stuck_fills(Duration::ZERO).is_empty());
    assert!(!hub.status().hub_busy);
}

/// A ring that a shard's fault stopped refuses every peer that joins before its last
/// peer has left, naming the fault. A TP peer restarted while its twin's connection was
/// still being torn down was refused `duplicate` (its own name, still joined) or
/// `peer_position` (step 0 against the dead ring's), which named neither the shard nor
/// the fault (the chaos test met it under load at seed 225).
#[test]
fn a_peer_joining_a_ring_a_fault_stopped_is_told_the_fault() {
    use crate::serve::hub::{Failure, NotAdmitted};
    use crate::wire::protocol::Code;
    let dir = tempfile::tempdir().unwrap();
    let (hub, mut hello) = one_shard_hub(dir.path());
    (hello.replica, hello.replicas) = ("tp0".into(), 2);
    let no = std::sync::atomic::AtomicBool::new(false);
    assert!(hub.admit(&hello, PeerCred::default(), &no, None).is_ok());
    let why = "s.bin: read at byte 4096 faulted (SIGBUS)";
    Hub::find(&mut hub.lock(), "j", 0)
        .unwrap()
        .fail(Failure::new(Code::Materialize, why));
    for (replica, who) in [("tp0", "the same name"), ("tp1", "its twin")] {
        let mut late = hello.clone();
        late.replica = replica.into();
        match hub.admit(&late, PeerCred::default(), &no, None) {
            Err(NotAdmitted::Refused(r)) => {
                assert_eq!(r.code, Code::Materialize, "{who}: {}", r.message);
                assert_eq!(
                    r.message,
                    format!("job \"j\" dp_rank 0's ring has stopped: {why}"),
                    "{who}"
                );
            }
            Err(NotAdmitted::Wait) => panic!("{who}: told to wait"),
            Ok(_) => panic!("{who}: admitted to a stopped ring"),
        }
    }
}

/// What the watchdog finds stuck once an entry reading `what...` appears (30 s at
/// most, or until `ended`).
fn stuck_reading(
    hub: &Hub,
    what: &str,
    ended: impl Fn() -> bool,
) -> Vec<crate::wire::status::StuckFill> {
    let t0 = Instant::now();
    let mut stuck = Vec::new();
    while t0.elapsed() < Duration::from_secs(30) && !ended() {
        stuck = hub.stuck_fills(Duration::ZERO);
        if stuck.iter().any(|f| f.reading.starts_with(what)) {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    stuck
}

/// Checks that `stuck` is one entry, of rank 0 of job "j" at `step`, doing `what` and
/// reading the index `idx` (its bytes named).
fn the_one_named(
    stuck: &[crate::wire::status::StuckFill],
    step: u64,
    what: &str,
    idx: &std::path::Path,
) {
    assert_eq!(stuck.len(), 1, "{stuck:?}");
    let f = &stuck[0];
    assert_eq!((f.job.as_str(), f.dp_rank, f.step), ("j", 0, step), "{f:?}");
    let want = format!("{what}: reading the index of {} bytes ", idx.display());
    assert!(f.reading.starts_with(&want), "{}", f.reading);
}

/// [`one_shard_hub`] with its client admitted: the ring made, no worker running.
fn admitted_hub(dir: &std::path::Path) -> Hub {
    let (hub, hello) = one_shard_hub(dir);
    let no = std::sync::atomic::AtomicBool::new(false);
    let admitted = hub.admit(&hello, PeerCred::default(), &no, None);
    assert!(admitted.is_ok(), "{:?}", admitted.err());
    hub
}

/// A hub over [`shard_and_job`]'s one shard (4 documents of 4096 tokens) in `dir`:
/// rows of 64 tokens, 2 a step (an epoch is 126 steps), page hints on, the watchdog's
/// bound zero; and the HELLO of rank 0 of 1 of job "j".
fn one_shard_hub(dir: &std::path::Path) -> (Hub, crate::wire::protocol::Hello) {
    use crate::plan::{DocSource, DomainInput};
    let (src, _, _) = crate::serve::fill::tests::shard_and_job(dir, 7, (0, 7));
    let shard: Arc<dyn DocSource> = src.shards[0][0].clone();
    let input = DomainInput {
        name: "a".into(),
        shards: vec![("a/0".into(), shard)],
        settings: Default::default(),
    };
    let plan = crate::serve::hub::phase::tests::plan_of(input, 64, 2);
    let settings = crate::serve::hub::HubSettings {
        slots: 2,
        prefetch: 0,
        token: crate::serve::ring::TokenType(crate::corpus::DType::Int32),
        max_clients: 8,
        ring_budget: 1 << 30,
        stage_reserve: 0,
        checkpoints: None,
        wake_coalesce: Duration::ZERO,
        live_changes: 4,
        stuck_fill: Duration::ZERO,
    };
    let mut hello = crate::wire::protocol::Hello::new(0, 1, 2, 1);
    hello.job = "j".into();
    (Hub::new(plan, src, settings), hello)
}
