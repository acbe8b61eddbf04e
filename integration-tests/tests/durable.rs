//! Durable runs: a coordinator killed with SIGKILL at the points that matter
//! is restarted, resumes from JetStream KV, and every step's handler ran once.

#![allow(clippy::unwrap_used)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use orchestrix::{Client, RunOptions, RunStatus, StepContext, StepError, StepStatus, Worker};
use orchestrix_coordinator::jetstream::{JetStreamStore, JetStreamStoreOptions};
use orchestrix_coordinator::nats::{Node, NodeStore};
use orchestrix_coordinator::{NoActors, flowfile};
use orchestrix_integration_tests::{ChildProcess, NatsServer, built, eventually};
use orchestrix_proto::Subjects;
use orchestrix_worker::NatsOptions;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

const SECS: Duration = Duration::from_secs(1);

const FLOW: &str = r#"
[[flow]]
name = "durable"
[[flow.step]]
name = "a"
compensable = true
[[flow.step]]
name = "b"
[[flow.step]]
name = "c"
retries = 2
retry_delay_ms = 1500
[[flow.step]]
name = "d"
"#;

#[derive(Serialize, Deserialize, Clone, Copy)]
struct Input {
    fail: bool,
}

type Journal = Arc<Mutex<Vec<String>>>;

fn count(j: &Journal, line: &str) -> usize {
    j.lock().unwrap().iter().filter(|l| *l == line).count()
}

fn has(j: &Journal, line: &str) -> bool {
    count(j, line) > 0
}

/// A worker for flow `durable`: `b` takes 1 s, `c` fails its first attempt,
/// `d` fails for good when asked to, `a`'s compensation takes 1 s.
async fn worker(server: &NatsServer, j: &Journal) -> Worker {
    let log = |j: &Journal| {
        let j = j.clone();
        move |line: String| j.lock().unwrap().push(line)
    };
    let (la, lu, lb, lc, ld) = (log(j), log(j), log(j), log(j), log(j));
    Worker::builder()
        .nats(NatsOptions::new(server.url()))
        .heartbeat_interval(Duration::from_millis(100))
        .steps::<Input>("durable", move |f| {
            f.step("a", move |_: StepContext<Input>| {
                la("a".into());
                async { Ok(()) }
            })
            .compensate("a", move |_| {
                let lu = lu.clone();
                async move {
                    lu("undo a start".into());
                    tokio::time::sleep(SECS).await;
                    lu("undo a done".into());
                    Ok(())
                }
            })
            .step("b", move |_| {
                let lb = lb.clone();
                async move {
                    lb("b start".into());
                    tokio::time::sleep(SECS).await;
                    lb("b done".into());
                    Ok(())
                }
            })
            .step("c", move |ctx| {
                lc(format!("c #{}", ctx.attempt()));
                async move {
                    if ctx.attempt() == 1 {
                        return Err(StepError::retryable("first try fails"));
                    }
                    Ok(())
                }
            })
            .step("d", move |ctx| {
                ld("d".into());
                async move {
                    if ctx.input.fail {
                        return Err(StepError::permanent("d refuses"));
                    }
                    Ok(())
                }
            })
        })
        .start()
        .await
        .unwrap()
}

struct Cluster {
    server: NatsServer,
    flows: tempfile::NamedTempFile,
    coordinator: Option<ChildProcess>,
    client: Client,
}

impl Cluster {
    async fn start() -> Cluster {
        let server = NatsServer::start();
        let flows = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(flows.path(), FLOW).unwrap();
        let conn = NatsOptions::new(server.url()).connect().await.unwrap();
        let client = Client::new(conn, Subjects::default()).request_timeout(2 * SECS);
        let mut c = Cluster { server, flows, coordinator: None, client };
        c.start_coordinator().await;
        c
    }

    fn spawn_coordinator(&self) -> ChildProcess {
        let url = self.server.url();
        let flows = self.flows.path().to_str().unwrap().to_owned();
        let args = [
            "--nats",
            &url,
            "serve",
            "--store",
            "jetstream",
            "--flows",
            &flows,
            "--heartbeat-timeout",
            "3s",
        ];
        ChildProcess::spawn(&built("orchestrix"), &args)
    }

    async fn start_coordinator(&mut self) {
        self.coordinator = Some(self.spawn_coordinator());
        // Ready when it answers a status request.
        let deadline = tokio::time::Instant::now() + 30 * SECS;
        loop {
            match self.client.status(Uuid::nil().into()).await {
                Err(e) if e.rejection() == Some(orchestrix::Rejection::UnknownRun) => return,
                _ => {}
            }
            assert!(tokio::time::Instant::now() < deadline, "coordinator did not come up");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn kill_and_restart(&mut self) {
        let c = self.coordinator.take().unwrap();
        c.signal("KILL");
        drop(c);
        self.start_coordinator().await;
    }
}

async fn killed_at(point: &str, input: Input) -> (orchestrix::RunReport, Journal) {
    let mut cluster = Cluster::start().await;
    let j = Journal::default();
    let w = worker(&cluster.server, &j).await;
    let run_id = cluster.client.start("durable", &input, RunOptions::new()).await.unwrap();
    let jj = j.clone();
    eventually(30 * SECS, point, || has(&jj, point)).await;
    cluster.kill_and_restart().await;
    let report =
        tokio::time::timeout(60 * SECS, cluster.client.wait(run_id)).await.unwrap().unwrap();
    w.shutdown().await;
    (report, j)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_while_a_step_is_in_flight() {
    let (report, j) = killed_at("b start", Input { fail: false }).await;
    assert_eq!(report.status, RunStatus::Completed, "{report}");
    // The restarted coordinator re-sent b's command; the worker, still at it,
    // answered the new coordinator instead of running it again.
    assert_eq!((count(&j, "a"), count(&j, "b start"), count(&j, "b done")), (1, 1, 1));
    assert_eq!(report.step("b").unwrap().attempts, 1);
    assert_eq!((count(&j, "c #1"), count(&j, "c #2"), count(&j, "d")), (1, 1, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_during_a_retry_delay() {
    let (report, j) = killed_at("c #1", Input { fail: false }).await;
    assert_eq!(report.status, RunStatus::Completed, "{report}");
    assert_eq!((count(&j, "c #1"), count(&j, "c #2"), count(&j, "b start")), (1, 1, 1));
    assert_eq!(report.step("c").unwrap().attempts, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_during_compensation() {
    let (report, j) = killed_at("undo a start", Input { fail: true }).await;
    assert_eq!(report.status, RunStatus::Failed, "{report}");
    assert_eq!(report.step("a").unwrap().status, StepStatus::Compensated);
    assert_eq!((count(&j, "undo a start"), count(&j, "undo a done")), (1, 1));
    assert_eq!(count(&j, "d"), 1);
}

/// A coordinator node in this process on the JetStream store (two share one
/// store): flow `durable` from its definition, no registry, no run events.
async fn coordinator_on(server: &NatsServer) -> Node {
    let conn = NatsOptions::new(server.url()).connect().await.unwrap();
    Node::builder()
        .store(NodeStore::JetStream(JetStreamStoreOptions::default()))
        .flows(flowfile::parse(FLOW).unwrap())
        .registry(false)
        .events(false)
        .start(conn)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_key_on_two_coordinators_runs_once() {
    let server = NatsServer::start();
    let j = Journal::default();
    let w = worker(&server, &j).await;
    let (n1, n2) = (coordinator_on(&server).await, coordinator_on(&server).await);
    let (first, second) = (n1.coordinator(), n2.coordinator());
    let key = || RunOptions::new().key("order:42").ttl(60 * SECS);
    let starts = (0..20).map(|i| {
        let c = if i % 2 == 0 { first.clone() } else { second.clone() };
        async move { c.start("durable", &Input { fail: false }, key()).await.unwrap() }
    });
    let handles = futures::future::join_all(starts).await;
    let id = handles[0].run_id();
    assert!(handles.iter().all(|h| h.run_id() == id));
    assert_eq!(handles.iter().filter(|h| !h.is_duplicate()).count(), 1);
    for h in handles {
        let r = tokio::time::timeout(60 * SECS, h.report()).await.unwrap().unwrap();
        assert_eq!((r.run_id, r.status), (id, RunStatus::Completed));
    }
    assert_eq!(count(&j, "a"), 1, "nothing ran twice");
    // Later, on either coordinator, within the ttl: the same report, no new run.
    let again = second.run("durable", &Input { fail: true }, key()).await.unwrap();
    assert_eq!((again.run_id, again.status), (id, RunStatus::Completed));
    assert_eq!(count(&j, "a"), 1);
    // Finished runs stay queryable from any coordinator.
    assert_eq!(first.status(id).await.unwrap().unwrap().status, RunStatus::Completed);
    w.shutdown().await;
}

/// Handler calls per (run, what), across every worker task.
type Calls = Arc<Mutex<std::collections::HashMap<(Uuid, String), usize>>>;

fn calls_of(c: &Calls, run: Uuid, what: &str) -> usize {
    c.lock().unwrap().get(&(run, what.to_owned())).copied().unwrap_or(0)
}

async fn counting_worker(server: &NatsServer, calls: &Calls) -> Worker {
    let rec = |c: &Calls| {
        let c = c.clone();
        move |run: Uuid, what: String| *c.lock().unwrap().entry((run, what)).or_default() += 1
    };
    let (ra, ru, rb, rc, rd) = (rec(calls), rec(calls), rec(calls), rec(calls), rec(calls));
    Worker::builder()
        .nats(NatsOptions::new(server.url()))
        .heartbeat_interval(Duration::from_millis(100))
        .concurrency(512)
        .steps::<Input>("durable", move |f| {
            f.step("a", move |ctx: StepContext<Input>| {
                ra(ctx.run_id().into(), "a".into());
                async { Ok(()) }
            })
            .compensate("a", move |ctx| {
                ru(ctx.run_id().into(), "undo a".into());
                async { Ok(()) }
            })
            .step("b", move |ctx| {
                rb(ctx.run_id().into(), "b".into());
                async {
                    tokio::time::sleep(Duration::from_millis(700)).await;
                    Ok(())
                }
            })
            .step("c", move |ctx| {
                rc(ctx.run_id().into(), format!("c #{}", ctx.attempt()));
                async move {
                    if ctx.attempt() == 1 {
                        return Err(StepError::retryable("first try fails"));
                    }
                    Ok(())
                }
            })
            .step("d", move |ctx| {
                rd(ctx.run_id().into(), "d".into());
                async move {
                    if ctx.input.fail {
                        return Err(StepError::permanent("d refuses"));
                    }
                    Ok(())
                }
            })
        })
        .start()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_coordinators_one_killed_under_load_lose_nothing() {
    let mut cluster = Cluster::start().await;
    let survivor = cluster.spawn_coordinator();
    let calls = Calls::default();
    let w = counting_worker(&cluster.server, &calls).await;
    let mut runs = Vec::new();
    for i in 0..200u32 {
        let input = Input { fail: i % 4 == 0 };
        let id = cluster.client.start("durable", &input, RunOptions::new()).await.unwrap();
        runs.push((id, input));
    }
    // Mid-load: one coordinator dies for good.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let doomed = cluster.coordinator.take().unwrap();
    doomed.signal("KILL");
    let waits = runs.iter().map(|(id, _)| {
        let client = cluster.client.clone();
        let id = *id;
        async move { tokio::time::timeout(120 * SECS, client.wait(id)).await.unwrap().unwrap() }
    });
    let reports = futures::future::join_all(waits).await;
    let (mut completed, mut failed) = (0, 0);
    for ((id, input), report) in runs.iter().zip(&reports) {
        let id = *id;
        assert_eq!(report.run_id, id);
        if input.fail {
            assert_eq!(report.status, RunStatus::Failed, "{report}");
            assert_eq!(report.step("a").unwrap().status, StepStatus::Compensated);
            assert_eq!(calls_of(&calls, id.into(), "undo a"), 1, "{id}: compensated once");
            failed += 1;
        } else {
            assert_eq!(report.status, RunStatus::Completed, "{report}");
            assert_eq!(calls_of(&calls, id.into(), "undo a"), 0);
            completed += 1;
        }
        for what in ["a", "b", "c #1", "c #2", "d"] {
            assert_eq!(calls_of(&calls, id.into(), what), 1, "{id}: {what} ran once");
        }
    }
    assert_eq!((completed, failed), (150, 50));
    w.shutdown().await;
    drop(survivor);
}

/// The crash that leaves the least behind: the attempt is stored as started,
/// its command never left. Written by hand here, as a dead coordinator would
/// have left it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_before_a_command_was_sent() {
    let server = NatsServer::start();
    let j = Journal::default();
    let w = worker(&server, &j).await;
    let conn = NatsOptions::new(server.url()).connect().await.unwrap();
    // Open the store once so the buckets exist, as the dead coordinator had.
    drop(JetStreamStore::open(conn.clone(), JetStreamStoreOptions::default()).await.unwrap());
    let run_id = write_orphan(&conn).await;

    // The node recovers at start, before it takes anything new.
    let node = coordinator_on(&server).await;
    let c = node.coordinator();
    assert_eq!(node.resumed(), 1, "the orphan is claimed");
    assert_eq!(c.recover().await.unwrap(), 0, "and only once");
    let report = tokio::time::timeout(60 * SECS, c.wait(run_id.into())).await.unwrap().unwrap();
    assert_eq!(report.status, RunStatus::Completed, "{report}");
    assert_eq!((count(&j, "a"), count(&j, "b start"), count(&j, "d")), (1, 1, 1));
    w.shutdown().await;
}

/// Writes, as a coordinator that died would have left it, a run of `FLOW`
/// whose first attempt is stored as started; returns its id.
async fn write_orphan(conn: &async_nats::Client) -> Uuid {
    use orchestrix_coordinator::record::{RunRecord, Transition};
    use orchestrix_proto::{CommandKind, Payload};

    let def = flowfile::parse(FLOW).unwrap().remove(0);
    let run_id = Uuid::now_v7();
    let mut rec = RunRecord::new(
        run_id,
        &def,
        Payload::encode(&Input { fail: false }).unwrap(),
        std::time::SystemTime::now(),
    );
    rec.apply(&Transition::AttemptStarted {
        step: 0,
        kind: CommandKind::Execute,
        attempt: 1,
        command_id: Uuid::new_v4(),
        at: std::time::SystemTime::now(),
    });
    #[derive(Serialize)]
    struct Stored<'a> {
        owner: &'a str,
        record: &'a RunRecord,
    }
    let bytes = rmp_serde::to_vec_named(&Stored { owner: "a-coordinator-that-died", record: &rec })
        .unwrap();
    let kv =
        async_nats::jetstream::new(conn.clone()).get_key_value("orchestrix_runs").await.unwrap();
    kv.put(run_id.to_string(), bytes.into()).await.unwrap();
    run_id
}

/// A scan that claims a run and then fails further on (here: a poisoned
/// record that cannot be set aside, as when the cluster loses its leader in
/// mid-scan) still hands the claimed run over. Before, the claim was dropped
/// with the error and every later scan skipped the run as this coordinator's
/// own: stuck for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scan_that_fails_after_a_claim_still_hands_the_run_over() {
    use orchestrix_coordinator::Store;

    let server = NatsServer::start();
    let conn = NatsOptions::new(server.url()).connect().await.unwrap();
    let store = JetStreamStore::open(conn.clone(), JetStreamStoreOptions::default()).await.unwrap();
    let run_id = write_orphan(&conn).await;
    let js = async_nats::jetstream::new(conn.clone());
    let runs = js.get_key_value("orchestrix_runs").await.unwrap();
    runs.put(Uuid::now_v7().to_string(), "not a record".into()).await.unwrap();
    js.delete_key_value("orchestrix_quarantine").await.unwrap();

    let flows: Arc<[Arc<str>]> = vec![Arc::from("durable")].into();
    let claimed = store
        .claim_orphans(flows.clone(), Arc::new(NoActors))
        .await
        .expect("the claimed run is handed over");
    assert_eq!(claimed.iter().map(|r| r.run_id).collect::<Vec<_>>(), vec![run_id]);
    // Claimed once: the next scan neither hands it out again nor succeeds
    // (the poison is still there), and the run names this coordinator.
    assert!(store.claim_orphans(flows, Arc::new(NoActors)).await.is_err());
}

/// The run journal, at the store: a dead coordinator's journal is fenced
/// and read back before its runs are claimed, the newest record of a run
/// wins over an older copy in the runs bucket, and the old owner can write
/// nothing after the fence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_coordinators_journal_is_fenced_and_its_newest_records_resumed() {
    use orchestrix_coordinator::Store;
    use orchestrix_coordinator::record::{RunRecord, Transition};
    use orchestrix_proto::{CommandKind, Payload};

    let server = NatsServer::start();
    let conn = NatsOptions::new(server.url()).connect().await.unwrap();
    let store = JetStreamStore::open(conn.clone(), JetStreamStoreOptions::default()).await.unwrap();
    let js = async_nats::jetstream::new(conn.clone());
    let def = flowfile::parse(FLOW).unwrap().remove(0);
    let rec = |started: bool| {
        let mut r = RunRecord::new(
            Uuid::from_u128(7),
            &def,
            Payload::encode(&Input { fail: false }).unwrap(),
            std::time::SystemTime::now(),
        );
        if started {
            r.apply(&Transition::AttemptStarted {
                step: 0,
                kind: CommandKind::Execute,
                attempt: 1,
                command_id: Uuid::from_u128(8),
                at: std::time::SystemTime::now(),
            });
        }
        r
    };
    // The runs bucket holds an old copy (not started); the journal of the
    // coordinator that died holds the newest (attempt 1 started).
    #[derive(Serialize)]
    struct Stored<'a> {
        owner: &'a str,
        record: &'a RunRecord,
    }
    let old = rmp_serde::to_vec_named(&Stored { owner: "gone", record: &rec(false) }).unwrap();
    js.get_key_value("orchestrix_runs")
        .await
        .unwrap()
        .put(Uuid::from_u128(7).to_string(), old.into())
        .await
        .unwrap();
    let newest = rmp_serde::to_vec_named(&rec(true)).unwrap();
    let seq =
        js.publish("orchestrix_journal.gone", newest.into()).await.unwrap().await.unwrap().sequence;

    let flows: Arc<[Arc<str>]> = vec![Arc::from("durable")].into();
    let claimed = store.claim_orphans(flows.clone(), Arc::new(NoActors)).await.unwrap();
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].current.len(), 1, "the journal's record, not the bucket's");
    assert_eq!(claimed[0].current[0].command_id, Uuid::from_u128(8));
    // The old owner, back, appends after what it last wrote: refused.
    let mut h = async_nats::HeaderMap::new();
    h.insert("Nats-Expected-Last-Subject-Sequence", seq.to_string().as_str());
    let late = js.publish_with_headers("orchestrix_journal.gone", h, "late".into()).await.unwrap();
    assert!(late.await.is_err(), "the fence stops the old owner");
    // What preceded the fence is gone; the fence stays.
    let stream = js.get_stream("orchestrix_journal").await.unwrap();
    let last = stream.get_last_raw_message_by_subject("orchestrix_journal.gone").await.unwrap();
    assert!(last.headers.get("Orchestrix-Fence").is_some());
    assert!(stream.get_raw_message(seq).await.is_err(), "the dead journal is purged");
    assert!(
        store.claim_orphans(flows, Arc::new(NoActors)).await.unwrap().is_empty(),
        "claimed once"
    );
}

/// Runs that end quickly never touch the runs bucket (their records live in
/// the journal only); a run that stays is copied there within about two
/// checkpoint rounds, and retired from it when it ends; checkpoints purge
/// the journal down to its newest message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quick_runs_stay_in_the_journal_and_long_ones_are_checkpointed() {
    use futures::StreamExt;
    let server = NatsServer::start();
    let j: Journal = Default::default();
    let w = worker(&server, &j).await;
    let quick_worker = Worker::builder()
        .client(NatsOptions::new(server.url()).connect().await.unwrap())
        .steps::<Input>("quick", |f| f.step("only", |_: StepContext<Input>| async { Ok(()) }))
        .start()
        .await
        .unwrap();
    let conn = NatsOptions::new(server.url()).connect().await.unwrap();
    let mut flows = flowfile::parse(FLOW).unwrap();
    flows.extend(
        flowfile::parse("[[flow]]\nname = \"quick\"\n[[flow.step]]\nname = \"only\"\n").unwrap(),
    );
    let node = Node::builder()
        .subjects(Subjects::new("orchestrix").unwrap())
        .store(NodeStore::JetStream(JetStreamStoreOptions::default()))
        .flows(flows)
        .registry(false)
        .start(conn.clone())
        .await
        .unwrap();
    let c = node.coordinator();
    let js = async_nats::jetstream::new(conn.clone());
    let runs = js.get_key_value("orchestrix_runs").await.unwrap();
    let mut changes = runs.watch_all().await.unwrap();
    for i in 0..20 {
        let r = c.run("quick", &Input { fail: i < 0 }, RunOptions::new()).await.unwrap();
        assert_eq!(r.status, RunStatus::Completed, "{r}");
    }
    assert!(
        tokio::time::timeout(3 * SECS, changes.next()).await.is_err(),
        "runs that end within a checkpoint round write nothing to the runs bucket"
    );
    // `b` takes 1 s, `c` waits 1.5 s before its retry: ~3 s in all.
    let handle = c.start("durable", &Input { fail: false }, RunOptions::new()).await.unwrap();
    let id = handle.run_id().to_string();
    let deadline = tokio::time::Instant::now() + 10 * SECS;
    while runs.get(&id).await.unwrap().is_none() {
        assert!(tokio::time::Instant::now() < deadline, "never checkpointed");
        tokio::time::sleep(SECS / 10).await;
    }
    let report = tokio::time::timeout(30 * SECS, handle.report()).await.unwrap().unwrap();
    assert_eq!(report.status, RunStatus::Completed, "{report}");
    assert_eq!((count(&j, "a"), count(&j, "d")), (1, 1));
    let deadline = tokio::time::Instant::now() + 5 * SECS;
    while runs.get(&id).await.unwrap().is_some() {
        assert!(tokio::time::Instant::now() < deadline, "not retired from the bucket");
        tokio::time::sleep(SECS / 10).await;
    }
    let stream = js.get_stream("orchestrix_journal").await.unwrap();
    let deadline = tokio::time::Instant::now() + 10 * SECS;
    loop {
        let mut s = stream.clone();
        if s.info().await.unwrap().state.messages <= 1 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the journal is never purged");
        tokio::time::sleep(SECS / 10).await;
    }
    node.shutdown().await;
    quick_worker.shutdown().await;
    w.shutdown().await;
}

/// A run younger than its first checkpoint is in its coordinator's journal
/// only; a `status` request that another coordinator of the queue group
/// takes is answered all the same (that one asks its peers), and an id no
/// coordinator knows is still `unknown run`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_coordinator_answers_the_status_of_a_run_just_started() {
    let server = NatsServer::start();
    let j = Journal::default();
    let w = worker(&server, &j).await;
    let a = coordinator_on(&server).await;
    let b = coordinator_on(&server).await;
    let conn = NatsOptions::new(server.url()).connect().await.unwrap();
    let client = Client::new(conn, Subjects::default()).request_timeout(2 * SECS);
    // Started on `a` itself: only `a` knows it for its first second.
    let handle = a.coordinator().start("durable", &Input { fail: false }, RunOptions::new());
    let id = handle.await.unwrap().run_id();
    assert!(b.coordinator().status(id).await.unwrap().is_none(), "not in the store yet");
    for _ in 0..10 {
        let s = client.status(id).await.expect("every coordinator answers it");
        assert_eq!(s.status, RunStatus::Running, "{s}");
    }
    let unknown = client.status(Uuid::now_v7().into()).await;
    assert!(unknown.unwrap_err().to_string().contains("unknown run"));
    let report = tokio::time::timeout(30 * SECS, client.wait(id)).await.unwrap().unwrap();
    assert_eq!(report.status, RunStatus::Completed, "{report}");
    a.shutdown().await;
    b.shutdown().await;
    w.shutdown().await;
}

/// A coordinator from before the run journal (its heartbeat is a bare
/// time) must not share a store with journal coordinators: a new one
/// refuses to start beside it, saying what to do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_refuses_to_start_beside_one_without_the_journal() {
    let server = NatsServer::start();
    let conn = NatsOptions::new(server.url()).connect().await.unwrap();
    // The buckets exist (a first coordinator made them), then an older one beats.
    drop(JetStreamStore::open(conn.clone(), JetStreamStoreOptions::default()).await.unwrap());
    let js = async_nats::jetstream::new(conn.clone());
    let beats = js.get_key_value("orchestrix_coordinators").await.unwrap();
    let old = tokio::spawn(async move {
        loop {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_millis()
                .to_string();
            beats.put("an-older-coordinator", now.into()).await.unwrap();
            tokio::time::sleep(SECS / 2).await;
        }
    });
    let refused = JetStreamStore::open(conn.clone(), JetStreamStoreOptions::default()).await;
    let e = refused.expect_err("refused beside an older coordinator").to_string();
    assert!(e.contains("older version") && e.contains("stop every older coordinator"), "{e}");
    // Stopped, and its heartbeat gone: the new one starts.
    old.abort();
    js.get_key_value("orchestrix_coordinators")
        .await
        .unwrap()
        .delete("an-older-coordinator")
        .await
        .unwrap();
    JetStreamStore::open(conn, JetStreamStoreOptions::default()).await.expect("starts");
}

/// A start is answered once the run, written with its first step's
/// attempt, is stored: while the journal refuses writes the start fails
/// and step `a` never runs; once it takes them again, a start runs through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_the_journal_refuses_sends_nothing() {
    let server = NatsServer::start();
    let j = Journal::default();
    let w = worker(&server, &j).await;
    let node = coordinator_on(&server).await;
    let c = node.coordinator();
    let conn = NatsOptions::new(server.url()).connect().await.unwrap();
    let js = async_nats::jetstream::new(conn);
    let mut stream = js.get_stream("orchestrix_journal").await.unwrap();
    let mut config = stream.info().await.unwrap().config.clone();
    let limit = config.max_message_size;
    config.max_message_size = 16;
    js.update_stream(config.clone()).await.unwrap();

    let started = c.start("durable", &Input { fail: false }, RunOptions::new());
    let err = tokio::time::timeout(30 * SECS, started).await.unwrap().expect_err("a refused start");
    assert!(err.to_string().contains("journal"), "{err}");
    tokio::time::sleep(2 * SECS).await;
    assert_eq!(count(&j, "a"), 0, "step a ran for a run never stored ({err})");
    assert!(c.list(Default::default()).await.unwrap().is_empty());

    config.max_message_size = limit;
    js.update_stream(config).await.unwrap();
    let report = tokio::time::timeout(
        60 * SECS,
        c.run("durable", &Input { fail: false }, RunOptions::new()),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(report.status, RunStatus::Completed, "{report}");
    assert_eq!(count(&j, "a"), 1);
    node.shutdown().await;
    w.shutdown().await;
}
