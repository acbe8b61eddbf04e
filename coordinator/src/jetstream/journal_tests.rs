//! The journal's failure cases, each a sequence of events that once lost a
//! run, let two coordinators drive one, or left one undriven (found in
//! review), against a real nats-server.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Child, Command, Stdio};

use super::*;
use crate::store::Store;

struct Server {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn server(config: Option<&str>) -> Server {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let bin = std::env::var("NATS_SERVER_BIN").unwrap_or_else(|_| "nats-server".into());
    let mut cmd = Command::new(bin);
    cmd.args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"]).arg(dir.path());
    if let Some(config) = config {
        let path = dir.path().join("server.conf");
        std::fs::write(&path, config).unwrap();
        cmd.arg("-c").arg(&path);
    }
    let child = cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(std::time::Instant::now() < deadline, "nats-server did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    Server { child, url: format!("nats://127.0.0.1:{port}"), _dir: dir }
}

async fn open(s: &Server) -> JetStreamStore {
    let conn = async_nats::connect(&s.url).await.unwrap();
    JetStreamStore::open(conn, JetStreamStoreOptions::default()).await.unwrap()
}

fn record() -> Arc<RunRecord> {
    let mut d = crate::FlowDef::new("f");
    d.steps.push(crate::StepDef::new("s"));
    let payload = orchestrix_proto::Payload::nil();
    Arc::new(RunRecord::new(Uuid::now_v7(), &d, payload, SystemTime::now()))
}

fn flows(names: &[&str]) -> Arc<[Arc<str>]> {
    names.iter().map(|n| Arc::from(*n)).collect::<Vec<_>>().into()
}

fn none_here() -> Arc<dyn ActorsHere> {
    Arc::new(crate::store::NoActors)
}

/// `r` moved on: its step's command sent (a new command id each time).
fn started(r: &RunRecord) -> (Arc<RunRecord>, Uuid) {
    let mut moved = r.clone();
    let sent = Uuid::now_v7();
    moved.apply(&crate::record::Transition::AttemptStarted {
        step: 0,
        kind: orchestrix_proto::CommandKind::Execute,
        attempt: 1,
        command_id: sent,
        at: SystemTime::now(),
    });
    (Arc::new(moved), sent)
}

/// A server, a coordinator C holding two runs (R, other) in its journal,
/// and a second coordinator T.
async fn two_runs_two_coordinators()
-> (Server, JetStreamStore, JetStreamStore, Arc<RunRecord>, Arc<RunRecord>) {
    let s = server(None);
    let c = open(&s).await;
    let t = open(&s).await;
    let (r, other) = (record(), record());
    c.inner.create_journaled(&r).await.unwrap();
    c.inner.create_journaled(&other).await.unwrap();
    (s, c, t, r, other)
}

/// The coordinator looks dead to the others (a stall, a partition).
async fn stop_heartbeat(s: &JetStreamStore) {
    s.inner.heartbeat.abort();
    tokio::time::sleep(Duration::from_millis(200)).await;
    s.inner.coordinators.purge(&s.inner.id).await.unwrap();
}

/// A checkpoint round snapshots its due runs, then writes them one by one.
/// If the coordinator obeys a fence in between, the rest of the round must
/// not take a run back: the record the taker restored names this
/// coordinator, and adopting it would let the run's actor append after the
/// fence while the taker drives the run too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fenced_coordinator_does_not_win_a_run_back_through_its_checkpoint() {
    let (_server, c, t, r, other) = two_runs_two_coordinators().await;
    // C stalls; a checkpoint round with R due is under way in it.
    stop_heartbeat(&c).await;
    // T takes C's journal over: fence, then R restored into the runs
    // bucket (under C's name).
    let mut alive = HashMap::new();
    assert!(t.inner.take_journal(&c.inner.id, 2, &mut alive).await.unwrap().is_some());
    // C's writer appends for another run, finds the fence, lets go of
    // every run.
    assert!(matches!(c.inner.append(&other).await, Err(StoreError::Fenced(_))));
    assert_eq!(c.inner.revision(r.run_id), None, "C let go of R");
    // C's checkpoint round goes on with R.
    let written = c.inner.write(&r, false).await;
    // T's next scan claims R (C's heartbeat is still gone).
    let claimed = t.claim_orphans(flows(&["f"]), none_here()).await.unwrap();
    assert!(claimed.iter().any(|x| x.run_id == r.run_id), "T claims R");
    // C must not be able to move R on any more.
    let again = c.inner.append(&r).await;
    assert!(
        matches!(again, Err(StoreError::Fenced(_))),
        "C appended R after T claimed it ({again:?}; checkpoint write after the fence: \
         {written:?}; C's revision of R: {:?}): two coordinators drive R",
        c.inner.revision(r.run_id)
    );
}

/// What precedes a fence is the taker's to read: a taker that stopped half
/// way (its restores timed out, say) reads the subject again at its next
/// scan, so the fenced coordinator must not purge it meanwhile, or a run
/// whose newest record was only there is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fenced_coordinator_does_not_purge_what_its_taker_has_not_read() {
    let s = server(None);
    let c = open(&s).await;
    let t = open(&s).await;
    let (r, other) = (record(), record());
    c.inner.create_journaled(&r).await.unwrap(); // message 1: R's only record
    c.inner.create_journaled(&other).await.unwrap(); // message 2
    stop_heartbeat(&c).await;
    // T's takeover gets as far as the fence, then stops.
    let subject = subject("orchestrix", &c.inner.id);
    let last = last_message(&t.inner.journal, &subject).await.unwrap().unwrap().sequence;
    assert!(t.inner.fence(&subject, last).await.unwrap().is_some());
    // C was only slow: it appends, finds the fence, lets go of its runs,
    // then its checkpoint task runs a round.
    assert!(matches!(c.inner.append(&other).await, Err(StoreError::Fenced(_))));
    c.inner.checkpoint().await;
    // T's next scan finishes the takeover.
    let claimed = t.claim_orphans(flows(&["f"]), none_here()).await.unwrap();
    let ids: Vec<Uuid> = claimed.iter().map(|x| x.run_id).collect();
    let in_kv = t.inner.runs.get(r.run_id.to_string()).await.unwrap().is_some();
    assert!(
        ids.contains(&r.run_id),
        "run R is lost: not claimed ({ids:?}), in the runs bucket: {in_kv}, \
         driven by C: {:?}",
        c.inner.revision(r.run_id)
    );
}

/// Coordinators serving different flows share one store. C (flow f) dies;
/// T (flow g only) scans first: it fences C's journal and restores C's run,
/// but does not claim it (not its flow). F (flow f) must still claim it: a
/// live taker that is done (only its fence left) blocks no one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_fenced_by_a_coordinator_of_another_flow_is_taken_over() {
    let s = server(None);
    let c = open(&s).await;
    let t = open(&s).await;
    let f = open(&s).await;
    let r = record();
    c.create(&r).resolve().await.unwrap();
    drop(c);
    tokio::time::sleep(HEARTBEAT_TTL + Duration::from_secs(1)).await;
    assert!(t.claim_orphans(flows(&["g"]), none_here()).await.unwrap().is_empty());
    let mut claimed = Vec::new();
    for _ in 0..5 {
        claimed = f.claim_orphans(flows(&["f"]), none_here()).await.unwrap();
        if !claimed.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert_eq!(
        claimed.iter().map(|x| x.run_id).collect::<Vec<_>>(),
        vec![r.run_id],
        "the run of the dead coordinator is never claimed by the one serving its flow"
    );
}

/// With the permissions `orchestrix auth config` gives the coordinator
/// role, a dead coordinator's journal can be read back (a pull consumer:
/// `$JS.API.CONSUMER.MSG.NEXT.{prefix}_journal.{consumer}`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_takeover_works_with_the_coordinator_roles_permissions() {
    use crate::auth::{Role, User, server_config};
    let users = vec![User::new("coord", Role::Coordinator, vec![]).password("c-pw")];
    let s = server(Some(&server_config("orchestrix", &users)));
    let connect = || async {
        async_nats::ConnectOptions::with_user_and_password("coord".into(), "c-pw".into())
            .custom_inbox_prefix("_INBOX_coord")
            .connect(&s.url)
            .await
            .unwrap()
    };
    let c = JetStreamStore::open(connect().await, JetStreamStoreOptions::default()).await.unwrap();
    let t = JetStreamStore::open(connect().await, JetStreamStoreOptions::default()).await.unwrap();
    let (r1, r2) = (record(), record());
    c.create(&r1).resolve().await.unwrap();
    c.create(&r2).resolve().await.unwrap();
    drop(c);
    tokio::time::sleep(HEARTBEAT_TTL + Duration::from_secs(1)).await;
    let claimed =
        tokio::time::timeout(Duration::from_secs(60), t.claim_orphans(flows(&["f"]), none_here()))
            .await
            .expect("the scan answers")
            .expect("the scan succeeds");
    assert_eq!(claimed.len(), 2, "both runs of the dead coordinator are claimed");
}

/// A finished run whose checkpointed record cannot be deleted (the runs
/// bucket has no leader, a timeout) stays this coordinator's until the
/// delete succeeds; and should it be let go, the scan finds its end in the
/// history and retires it. Never resumed from its older, live-phase copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_whose_retirement_failed_is_not_resumed() {
    let s = server(None);
    let c = open(&s).await;
    let t = open(&s).await;
    let r = record();
    c.inner.create_journaled(&r).await.unwrap();
    // It lives long enough to be checkpointed.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while c.inner.runs.get(r.run_id.to_string()).await.unwrap().is_none() {
        assert!(std::time::Instant::now() < deadline, "never checkpointed");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The runs bucket refuses writes (sealed here; in life: no leader).
    let js = jetstream::new(async_nats::connect(&s.url).await.unwrap());
    let mut stream = js.get_stream("KV_orchestrix_runs").await.unwrap();
    let mut config = stream.info().await.unwrap().config.clone();
    config.sealed = true;
    js.update_stream(config).await.unwrap();
    let end = || Transition::Finished {
        status: orchestrix_proto::RunStatus::Completed,
        duration: Duration::from_secs(2),
    };
    let mut after = (*r).clone();
    after.apply(&end());
    let after = Arc::new(after);
    // The end is durable once in the journal; the history entry follows,
    // and the record's delete is refused (and retried).
    c.apply(r.run_id, &[end()], &after).resolve().await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while c.inner.history.get(r.run_id.to_string()).await.unwrap().is_none() {
        assert!(std::time::Instant::now() < deadline, "the run's end never reached the history");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(c.inner.runs.get(r.run_id.to_string()).await.unwrap().is_some(), "delete refused");
    // Its coordinator lets go of the finished record (a retirement that
    // is never retried must not hold the journal's purge back)...
    assert!(c.inner.shared.pending(r.run_id).is_none(), "finished record still pending");
    // ...and meanwhile its status is its end, here and on another coordinator
    // (whose read finds the older live copy too), and it is listed once.
    for (who, store) in [("its coordinator", &c), ("another coordinator", &t)] {
        let report = store.report(r.run_id).resolve().await.unwrap().unwrap();
        assert_eq!(report.status, orchestrix_proto::RunStatus::Completed, "{who}: {report}");
        let listed = store.list(crate::ListFilter::new(None, None, 100)).await.unwrap();
        let ours: Vec<_> = listed.iter().filter(|x| x.run_id.as_uuid() == r.run_id).collect();
        assert_eq!(ours.len(), 1, "{who}: listed {} times", ours.len());
        assert_eq!(ours[0].status, orchestrix_proto::RunStatus::Completed, "{who}");
    }
    let resumed = c.claim_orphans(flows(&["f"]), none_here()).await.unwrap();
    assert!(
        !resumed.iter().any(|x| x.run_id == r.run_id),
        "a run that ended is resumed from its checkpoint"
    );
    // Should it ever be let go (its ender gave up, say), the scan retires
    // it rather than resuming it: its end is in the history.
    c.inner.shared.lock().revisions.remove(&r.run_id);
    let resumed = c.claim_orphans(flows(&["f"]), none_here()).await;
    assert!(
        !resumed.iter().flatten().any(|x| x.run_id == r.run_id),
        "a run that ended is resumed from its checkpoint"
    );
}

/// C's heartbeats stop landing (its bucket lost its leader) while C goes
/// on: T fences C's journal and restores C's run under C's name, C obeys
/// the fence, C's scan resumes the run as its own, T's scan claims it. One
/// of them must lose: own-run resumes are compare-and-sets, and a claim
/// fences the owner again first, so C's next append is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_is_not_resumed_by_its_fenced_owner_and_claimed_by_the_taker() {
    let (_server, c, t, r, other) = two_runs_two_coordinators().await;
    stop_heartbeat(&c).await;
    let mut alive = HashMap::new();
    assert!(t.inner.take_journal(&c.inner.id, 2, &mut alive).await.unwrap().is_some());
    assert!(matches!(c.inner.append(&other).await, Err(StoreError::Fenced(_))));
    let by_c = c.claim_orphans(flows(&["f"]), none_here()).await.unwrap();
    let by_t = t.claim_orphans(flows(&["f"]), none_here()).await.unwrap();
    let appended = c.inner.append(&r).await;
    let c_has = by_c.iter().any(|x| x.run_id == r.run_id);
    let t_has = by_t.iter().any(|x| x.run_id == r.run_id);
    assert!(
        !(c_has && t_has) || matches!(appended, Err(StoreError::Fenced(_))),
        "both coordinators took R (C's next append of R: {appended:?})"
    );
}

/// A fence that no taker follows (forged, or its taker died before copying
/// anything): the fenced coordinator lets go of its runs, and puts the ones
/// only its journal held into the runs bucket itself, where its own scan
/// (or a taker's) finds and resumes them. None is lost, none runs twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_lost_to_a_fence_nobody_follows_are_resumed() {
    let s = server(None);
    let c = open(&s).await;
    let (r1, r2, other) = (record(), record(), record());
    c.inner.create_journaled(&r1).await.unwrap();
    c.inner.create_journaled(&r2).await.unwrap();
    let subject = subject("orchestrix", &c.inner.id);
    let last = last_message(&c.inner.journal, &subject).await.unwrap().unwrap().sequence;
    assert!(c.inner.fence(&subject, last).await.unwrap().is_some(), "a fence, and no taker");
    c.inner.shared.lock().revisions.insert(other.run_id, 0);
    assert!(matches!(c.inner.append(&other).await, Err(StoreError::Fenced(_))));
    c.inner.checkpoint().await;
    for r in [&r1, &r2] {
        assert!(c.inner.runs.get(r.run_id.to_string()).await.unwrap().is_some(), "in the bucket");
    }
    let mut resumed: Vec<Uuid> = c
        .claim_orphans(flows(&["f"]), none_here())
        .await
        .unwrap()
        .iter()
        .map(|x| x.run_id)
        .collect();
    resumed.sort();
    let mut expected = vec![r1.run_id, r2.run_id];
    expected.sort();
    assert_eq!(resumed, expected, "both resumed by their own coordinator");
    assert!(c.claim_orphans(flows(&["f"]), none_here()).await.unwrap().is_empty(), "and only once");
    // Its journal is purged again from then on.
    c.inner.append(&r1).await.unwrap();
    c.inner.checkpoint().await;
    let first = c.inner.journal.get_first_raw_message_by_subject(&subject, 0).await.unwrap();
    assert!(first.sequence > last, "purged past the fence: {} <= {last}", first.sequence);
}

/// Garbage on a journal subject whose last token cannot name a coordinator
/// (no heartbeat key can be spelled so) holds up no takeover.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_a_strange_journal_subject_stops_no_takeover() {
    let s = server(None);
    let c = open(&s).await;
    let t = open(&s).await;
    let r = record();
    c.inner.create_journaled(&r).await.unwrap();
    let js = jetstream::new(async_nats::connect(&s.url).await.unwrap());
    js.publish("orchestrix_journal.bad:key", "garbage".into()).await.unwrap().await.unwrap();
    stop_heartbeat(&c).await;
    let claimed = t.claim_orphans(flows(&["f"]), none_here()).await.expect("the scan goes on");
    assert_eq!(claimed.iter().map(|x| x.run_id).collect::<Vec<_>>(), vec![r.run_id]);
}

/// A coordinator that looked dead (a stall) while its run waited on a step
/// finds, at the step's outcome, that another took the run over: its actor
/// lets go, and the caller's handle follows the run to its end through the
/// store instead of reporting it lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callers_handle_follows_its_run_to_the_coordinator_that_took_it_over() {
    use crate::{Coordinator, OnUnknown, RunOptions, RunStatus, create};
    let s = server(None);
    let (c, t) = (open(&s).await, open(&s).await);
    let (entered, release) =
        (Arc::new(tokio::sync::Notify::new()), Arc::new(tokio::sync::Notify::new()));
    let (e, r) = (entered.clone(), release.clone());
    // Here the step waits until told; at the taker it completes at once.
    let held = create::<u32>("f").step_with(
        "s",
        move |_| {
            let (e, r) = (e.clone(), r.clone());
            async move {
                e.notify_one();
                r.notified().await;
                Ok(())
            }
        },
        |o| o.on_unknown(OnUnknown::Retry),
    );
    let quick =
        create::<u32>("f").step_with("s", |_| async { Ok(()) }, |o| o.on_unknown(OnUnknown::Retry));
    let here = Coordinator::builder().flow(&held).store(c.clone()).build().unwrap();
    let handle = here.start("f", &7u32, RunOptions::new()).await.unwrap();
    entered.notified().await;
    // It looks dead; the other coordinator takes its run over and ends it.
    stop_heartbeat(&c).await;
    let taker = Coordinator::builder().flow(&quick).store(t.clone()).build().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while taker.recover().await.unwrap() == 0 {
        assert!(std::time::Instant::now() < deadline, "the taker never claimed the run");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The stalled coordinator's step answers now: its actor is fenced.
    release.notify_one();
    let report = tokio::time::timeout(Duration::from_secs(60), handle.report())
        .await
        .expect("the handle answers")
        .expect("the run is not lost: it moved");
    assert_eq!(report.status, RunStatus::Completed, "{report}");
}

/// A coordinator presumed dead but only cut off obeys a fence, resumes one
/// of its runs and moves it on (a command sent): that progress is in its
/// journal only. A taker that then claims the run must claim that newest
/// record, not the older one in the runs bucket, or it would start the
/// command's step again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_after_the_owner_moved_a_run_on_claims_its_newest_record() {
    let (_server, c, t, r, other) = two_runs_two_coordinators().await;
    stop_heartbeat(&c).await;
    let mut alive = HashMap::new();
    assert!(t.inner.take_journal(&c.inner.id, 3, &mut alive).await.unwrap().is_some());
    assert!(matches!(c.inner.append(&other).await, Err(StoreError::Fenced(_))));
    // C puts what it lost back in the bucket, then resumes R itself.
    c.inner.checkpoint().await;
    let resumed = c.claim_orphans(flows(&["f"]), none_here()).await.unwrap();
    assert!(resumed.iter().any(|x| x.run_id == r.run_id), "C resumes R: {resumed:?}");
    // ... and moves it on: its step's command goes out.
    let (moved, sent) = started(&r);
    c.inner.append(&moved).await.unwrap();
    // T, to which C still looks dead, claims R.
    let claimed = t.claim_orphans(flows(&["f"]), none_here()).await.unwrap();
    let Some(got) = claimed.iter().find(|x| x.run_id == r.run_id) else {
        panic!("T claims R: {claimed:?}")
    };
    assert_eq!(
        got.current.iter().map(|c| c.command_id).collect::<Vec<_>>(),
        [sent],
        "T resumes R where C left it (the command in flight), not from the older record"
    );
    // That record is in the bucket before T decides anything from it: C's
    // journal is fenced, and T, fenced in turn before its first append,
    // would leave the older record to its own taker. (Here the fence put it
    // there; when C appends between T's fence and its claim, the claim
    // does: the `freeze` harness found that case, too narrow to stage here.)
    let entry = t.inner.runs.entry(r.run_id.to_string()).await.unwrap().unwrap();
    let stored: Stored = decode(&entry.value).unwrap();
    assert_eq!(stored.owner, t.inner.id);
    assert_eq!(stored.record.current.iter().map(|c| c.command_id).collect::<Vec<_>>(), [sent]);
    // And C can move R on no more.
    assert!(matches!(c.inner.append(got).await, Err(StoreError::Fenced(_))));
}

/// Found by the soak harness (`freeze`): a coordinator fenced while a run's
/// newest record was in its journal only keeps that record to put back in
/// the bucket under its own name. If meanwhile it won the run back (claimed
/// it from a taker that moved it on, then was presumed dead in turn), that
/// put must not replace the newer record its claim left: the run would be
/// resumed from before the taker's steps, and run them again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_lost_to_a_fence_is_not_put_back_over_a_newer_one() {
    let (_server, c, t, r, other) = two_runs_two_coordinators().await;
    // C sends R's first command: in its journal only.
    let (first, _) = started(&r);
    c.inner.append(&first).await.unwrap();
    // C stalls; T takes R over and moves it on (a second command).
    stop_heartbeat(&c).await;
    let claimed = t.claim_orphans(flows(&["f"]), none_here()).await.unwrap();
    let Some(taken) = claimed.iter().find(|x| x.run_id == r.run_id) else {
        panic!("T claims R: {claimed:?}")
    };
    let (second, sent) = started(taken);
    t.inner.append(&second).await.unwrap();
    // C meets the fence: R's first record is kept to put back.
    assert!(matches!(c.inner.append(&other).await, Err(StoreError::Fenced(_))));
    assert!(c.inner.shared.orphaned(r.run_id));
    // T stalls in turn; C claims R from it, where T left it.
    stop_heartbeat(&t).await;
    c.inner.shared.forget_cut_off();
    let claimed = c.claim_orphans(flows(&["f"]), none_here()).await.unwrap();
    let Some(back) = claimed.iter().find(|x| x.run_id == r.run_id) else {
        panic!("C claims R back: {claimed:?}")
    };
    assert_eq!(back.current.iter().map(|x| x.command_id).collect::<Vec<_>>(), [sent]);
    // C's checkpoint round puts what it lost back: not over R's newer record.
    c.inner.checkpoint().await;
    let entry = c.inner.runs.entry(r.run_id.to_string()).await.unwrap().unwrap();
    let stored: Stored = decode(&entry.value).unwrap();
    assert_eq!(
        stored.record.current.iter().map(|x| x.command_id).collect::<Vec<_>>(),
        [sent],
        "the bucket holds R as T left it, not C's older copy"
    );
}

/// A coordinator that was cut off (here: it met a fence) takes nobody's
/// runs for a moment: the coordinators cut off with it are coming back
/// too, and taking their runs at once would fence them in turn.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_cut_off_a_moment_ago_takes_no_run_over() {
    let (_server, c, t, _r, other) = two_runs_two_coordinators().await;
    stop_heartbeat(&c).await;
    assert!(t.inner.take_journal(&c.inner.id, 3, &mut HashMap::new()).await.unwrap().is_some());
    assert!(matches!(c.inner.append(&other).await, Err(StoreError::Fenced(_))));
    // T holds a run, and looks dead to C.
    let theirs = record();
    t.inner.create_journaled(&theirs).await.unwrap();
    t.inner.checkpoint().await;
    t.inner.checkpoint().await;
    t.inner.checkpoint().await;
    stop_heartbeat(&t).await;
    let claimed = c.claim_orphans(flows(&["f"]), none_here()).await.unwrap();
    assert!(!claimed.iter().any(|x| x.run_id == theirs.run_id), "C waits: {claimed:?}");
    // Past the grace, a coordinator still silent is dead: its run is taken.
    c.inner.shared.forget_cut_off();
    let claimed = c.claim_orphans(flows(&["f"]), none_here()).await.unwrap();
    assert!(claimed.iter().any(|x| x.run_id == theirs.run_id), "C takes it: {claimed:?}");
}

/// A checkpoint that finds the run's record in its own coordinator's name,
/// newer than the copy it writes (a write of its own from a moment ago that
/// the server took late, or a taker's restore of its journal), does not
/// take that for a takeover: dropping the run then left its newest record
/// in the journal only, and this coordinator's own scan later resumed the
/// run from the bucket's older one (found by `freeze`: notify ran twice).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_behind_its_own_newer_record_keeps_the_run() {
    let (_server, c, _t, r, _other) = two_runs_two_coordinators().await;
    let (first, _) = started(&r);
    c.inner.append(&first).await.unwrap();
    // The bucket gets a newer copy in C's name behind C's back.
    let (newer, sent) = started(&first);
    let key = r.run_id.to_string();
    let value = c.inner.stored(&newer).unwrap();
    c.inner.runs.put(&key, value).await.unwrap();
    // C's checkpoint rounds copy `first` (the journal's): the bucket is ahead.
    for _ in 0..3 {
        c.inner.checkpoint().await;
    }
    assert!(c.inner.revision(r.run_id).is_some(), "the run is still C's");
    let entry = c.inner.runs.entry(&key).await.unwrap().unwrap();
    let stored: Stored = decode(&entry.value).unwrap();
    assert_eq!(stored.record.current.iter().map(|x| x.command_id).collect::<Vec<_>>(), [sent]);
    // And C goes on writing it.
    let (next, _) = started(&newer);
    c.inner.append(&next).await.unwrap();
}
