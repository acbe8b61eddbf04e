//! Regressions for the faults found at production shape (several worker
//! replicas, several coordinators, a shared JetStream store), one test per
//! finding, each against real `nats-server` processes.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::time::Duration;

use async_nats::jetstream;
use bytes::Bytes;
use futures::StreamExt;
use orchestrix::{Client, ListFilter, RunOptions, RunStatus, StepContext, StepStatus, Worker};
use orchestrix_coordinator::nats::{NatsBusOptions, Node};
use orchestrix_coordinator::record::RunRecord;
use orchestrix_coordinator::{FlowDef, StepDef, flowfile};
use orchestrix_integration_tests::frozen::PayReplica;
use orchestrix_integration_tests::{ChildProcess, Ledger, NatsServer, built, eventually};
use orchestrix_proto::{Ack, Payload, StepCommand, Subjects, decode, encode};
use orchestrix_worker::NatsOptions;
use uuid::Uuid;

const SECS: Duration = Duration::from_secs(1);
const MS: Duration = Duration::from_millis(1);

/// Handler calls, in order, across every worker of a test.
fn bus_options() -> NatsBusOptions {
    NatsBusOptions::default()
        .ack_timeout(500 * MS)
        .heartbeat_timeout(600 * MS)
        .clock_skew(100 * MS)
        .timeout_grace(300 * MS)
        .worker_wait(20 * SECS)
}

/// A coordinator node in this process (the library's composition root):
/// NATS bus with short timeouts, JetStream store, the request service, and
/// the takeover loop every `takeover`.
async fn node_every(server: &NatsServer, flows: Vec<FlowDef>, takeover: Duration) -> Node {
    let conn = NatsOptions::new(server.url()).connect().await.unwrap();
    Node::builder()
        .bus_options(bus_options())
        .flows(flows)
        .takeover_every(takeover)
        .start(conn)
        .await
        .unwrap()
}

async fn node(server: &NatsServer, flows: Vec<FlowDef>) -> Node {
    node_every(server, flows, 500 * MS).await
}

/// A node that looks for orphans only when told to (`recover`).
async fn quiet_node(server: &NatsServer, flows: Vec<FlowDef>) -> Node {
    node_every(server, flows, 3600 * SECS).await
}

fn flows(toml: &str) -> Vec<FlowDef> {
    flowfile::parse(toml).unwrap()
}

async fn client(server: &NatsServer) -> Client {
    let conn = NatsOptions::new(server.url()).connect().await.unwrap();
    Client::new(conn, Subjects::default()).request_timeout(3 * SECS)
}

async fn kv(server: &NatsServer, bucket: &str) -> jetstream::kv::Store {
    let conn = NatsOptions::new(server.url()).connect().await.unwrap();
    jetstream::new(conn).get_key_value(bucket).await.unwrap()
}

fn key_name(key: &str) -> String {
    key.bytes().map(|b| format!("{b:02x}")).collect()
}

/// A run record as a coordinator stores it, owned by `owner`.
fn stored(owner: &str, record: &RunRecord) -> Bytes {
    #[derive(serde::Serialize)]
    struct Stored<'a> {
        owner: &'a str,
        record: &'a RunRecord,
    }
    Bytes::from(rmp_serde::to_vec_named(&Stored { owner, record }).unwrap())
}

/// An idempotency key's value naming `run_id`, with no report yet.
fn key_value(run_id: Uuid) -> Bytes {
    #[derive(serde::Serialize)]
    struct KeyValue {
        run_id: Uuid,
        done: Option<()>,
    }
    Bytes::from(rmp_serde::to_vec_named(&KeyValue { run_id, done: None }).unwrap())
}

fn def(name: &str, steps: &[&str]) -> FlowDef {
    let mut d = FlowDef::new(name);
    for s in steps {
        let mut step = StepDef::new(s);
        step.compensable = true;
        d.steps.push(step);
    }
    d
}

/// An in-process worker serving `flow` with steps that log and return `()`.
async fn simple_worker(server: &NatsServer, flow: &str, steps: &[&str], ledger: &Ledger) -> Worker {
    let mut b = Worker::builder().nats(NatsOptions::new(server.url()));
    let steps: Vec<String> = steps.iter().map(|s| s.to_string()).collect();
    let ledger = ledger.clone();
    b = b.steps::<u32>(flow, move |mut f| {
        for s in &steps {
            let (l1, l2) = (ledger.clone(), ledger.clone());
            f = f
                .step(s, move |ctx: StepContext<u32>| {
                    l1.log(format!("{} {}", ctx.step(), ctx.run_id()));
                    async { Ok(()) }
                })
                .compensate(s, move |ctx| {
                    l2.log(format!("undo {} {}", ctx.step(), ctx.run_id()));
                    async { Ok(()) }
                });
        }
        f
    });
    b.start().await.unwrap()
}

// 1. A start that claimed its key but never wrote its run must not leave a key
//    that points at nothing: the next start with the key starts that very run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_left_by_a_failed_start_starts_that_very_run() {
    let server = NatsServer::start();
    let ledger = Ledger::default();
    let _node = node(&server, vec![def("pay", &["reserve", "charge"])]).await;
    let w = simple_worker(&server, "pay", &["reserve", "charge"], &ledger).await;
    // What a start that failed between its two writes leaves behind.
    let ghost = Uuid::now_v7();
    kv(&server, "orchestrix_keys")
        .await
        .create(key_name("order-1"), key_value(ghost))
        .await
        .unwrap();
    let c = client(&server).await;
    let key = RunOptions::new().key("order-1");
    let id = c.start("pay", &1u32, key.clone()).await.unwrap();
    assert_eq!(id, ghost, "the retry resumes the very same run");
    let report = tokio::time::timeout(30 * SECS, c.wait(id)).await.unwrap().unwrap();
    assert_eq!(report.status, RunStatus::Completed, "{report}");
    assert_eq!(ledger.count(&format!("charge {id}")), 1);
    // The same key again: the same run, nothing runs twice.
    assert_eq!(c.start("pay", &1u32, key).await.unwrap(), id);
    assert_eq!(c.status(id).await.unwrap().status, RunStatus::Completed);
    assert_eq!(ledger.count(&format!("charge {id}")), 1);
    w.shutdown().await;
}

const TAKEOVER_FLOW: &str = r#"
[[flow]]
name = "pay"
[[flow.step]]
name = "charge"
compensable = true
[[flow.step]]
name = "notify"
"#;

/// Three replicas of a worker for flow `pay`: `charge` takes `charge_ms`.
async fn replicas(server: &NatsServer, ledger: &Ledger, charge_ms: u64) -> Vec<Worker> {
    replicas_timed(server, ledger, charge_ms, 0).await
}

/// [`replicas`] whose `notify` takes `notify_ms`.
async fn replicas_timed(
    server: &NatsServer,
    ledger: &Ledger,
    charge_ms: u64,
    notify_ms: u64,
) -> Vec<Worker> {
    let shape = PayReplica {
        charge: Duration::from_millis(charge_ms),
        notify: Duration::from_millis(notify_ms),
        heartbeat: 100 * MS,
        undo_notify: false,
    };
    let mut out = Vec::new();
    for i in 0..3 {
        out.push(shape.start(NatsOptions::new(server.url()), ledger, i).await.unwrap());
    }
    out
}

fn spawn_serve(server: &NatsServer, flows: &std::path::Path) -> ChildProcess {
    let url = server.url();
    let flows = flows.to_str().unwrap().to_owned();
    let args = [
        "--nats",
        &url,
        "serve",
        "--store",
        "jetstream",
        "--flows",
        &flows,
        "--ack-timeout",
        "1s",
        "--heartbeat-timeout",
        "2s",
    ];
    ChildProcess::spawn(&built("orchestrix"), &args)
}

async fn ready(c: &Client) {
    let deadline = tokio::time::Instant::now() + 30 * SECS;
    loop {
        if let Err(e) = c.status(Uuid::nil().into()).await
            && e.rejection() == Some(orchestrix::Rejection::UnknownRun)
        {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "coordinator did not come up");
        tokio::time::sleep(50 * MS).await;
    }
}

// 2. After a takeover, the command in flight reaches the replica that holds
//    it (running or done), never another replica that would run it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_takeover_with_three_worker_replicas_runs_each_step_once() {
    let server = NatsServer::start();
    let flows = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(flows.path(), TAKEOVER_FLOW).unwrap();
    let ledger = Ledger::default();
    let workers = replicas(&server, &ledger, 5_000).await;
    let c = client(&server).await;
    let first = spawn_serve(&server, flows.path());
    ready(&c).await;
    let mut ids = Vec::new();
    for i in 0..6 {
        ids.push(c.start("pay", &i, RunOptions::new()).await.unwrap());
    }
    let l = ledger.clone();
    let all_started = ids.clone();
    eventually(30 * SECS, "every charge started", || {
        all_started.iter().all(|id| l.count(&format!("charge {id}")) == 1)
    })
    .await;
    // A client already waiting on the first coordinator, whose answer dies
    // with it, learns of the end soon after, not when its wait (30 s) runs out.
    let waiting = {
        let (c, id) = (c.clone(), ids[0]);
        tokio::spawn(async move {
            let since = tokio::time::Instant::now();
            let report = c.wait(id).await;
            (since.elapsed(), report)
        })
    };
    tokio::time::sleep(300 * MS).await;
    first.signal("KILL");
    drop(first);
    let _second = spawn_serve(&server, flows.path());
    let (took, report) = waiting.await.unwrap();
    assert_eq!(report.unwrap().status, RunStatus::Completed);
    assert!(took < 20 * SECS, "the waiting client had its report after {took:?}");
    for id in &ids {
        let r = tokio::time::timeout(60 * SECS, c.wait(*id)).await.unwrap().unwrap();
        assert_eq!(r.status, RunStatus::Completed, "{r}");
        assert_eq!(r.step("charge").unwrap().attempts, 1);
        assert_eq!(ledger.count(&format!("charge {id}")), 1, "charged once: {r}");
        assert_eq!(ledger.count(&format!("notify {id}")), 1);
    }
    // The runs were spread over the replicas, so a re-send to the queue
    // group would have landed elsewhere.
    let on: Vec<usize> = (0..3).map(|i| ledger.starting(&format!("charge on {i} "))).collect();
    assert_eq!(on.iter().sum::<usize>(), 6, "{on:?}");
    for w in workers {
        w.shutdown().await;
    }
}

// A run whose coordinator dies before its first checkpoint is known to
// no coordinator until another takes it over (its journal only): a client
// waiting on it, and `orchestrix status`, ride that out rather than answer
// `unknown_run`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_taken_over_before_its_first_checkpoint_is_waited_for_not_unknown() {
    let server = NatsServer::start();
    let flows = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(flows.path(), TAKEOVER_FLOW).unwrap();
    let ledger = Ledger::default();
    let workers = replicas(&server, &ledger, 1_000).await;
    let c = client(&server).await;
    let first = spawn_serve(&server, flows.path());
    ready(&c).await;
    let id = c.start("pay", &7, RunOptions::new()).await.unwrap();
    // At once: its first checkpoint is about a second away.
    first.signal("KILL");
    drop(first);
    let _second = spawn_serve(&server, flows.path());
    ready(&c).await;
    let url = server.url();
    let cli = tokio::process::Command::new(built("orchestrix"))
        .args(["--nats", &url, "status", &id.to_string()])
        .output();
    let (cli, report) = tokio::join!(cli, tokio::time::timeout(60 * SECS, c.wait(id)));
    let cli = cli.unwrap();
    let (out, err) = (String::from_utf8_lossy(&cli.stdout), String::from_utf8_lossy(&cli.stderr));
    assert!(!err.contains("unknown run"), "status gave up:\n{out}\n{err}");
    assert!(out.contains(&id.to_string()), "no report:\n{out}\n{err}");
    let report = report.unwrap().unwrap();
    assert_eq!(report.status, RunStatus::Completed, "{report}");
    assert_eq!(ledger.count(&format!("charge {id}")), 1, "charged once: {report}");
    for w in workers {
        w.shutdown().await;
    }
}

const CRASH_FLOW: &str = r#"
[[flow]]
name = "crash"
[[flow.step]]
name = "a"
compensable = true
[[flow.step]]
name = "b"
compensable = true
retries = 3
retry_delay_ms = 50
"#;

async fn spawn_test_worker(server: &NatsServer, delay_ms: u64) -> ChildProcess {
    spawn_test_worker_with(server, delay_ms, &[]).await
}

async fn spawn_test_worker_with(server: &NatsServer, delay_ms: u64, more: &[&str]) -> ChildProcess {
    let url = server.url();
    let delay = delay_ms.to_string();
    let mut args = vec!["--nats", &url, "--delay-ms", &delay, "--heartbeat-ms", "100"];
    args.extend_from_slice(more);
    let w = ChildProcess::spawn(&built("test_worker"), &args);
    w.wait_for_line("ready", 10 * SECS).await;
    w
}

// 3a. A worker process that dies inside a handler, as the handler starts
//     (before its first await), had already written that command's ack:
//     the coordinator knows the attempt was taken, so the step is not run
//     again by another replica; its outcome is unknown, and it is
//     compensated with the completed steps by the replica that is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_dies_as_its_handler_starts_has_acked_and_the_step_does_not_run_twice() {
    let server = NatsServer::start();
    let node = node(&server, flows(CRASH_FLOW)).await;
    let dying = spawn_test_worker_with(&server, 0, &["--exit-in-b"]).await;
    let run = node.coordinator().start("crash", &5u32, RunOptions::new()).await.unwrap();
    dying.wait_for_line("b-start", 10 * SECS).await;
    let healthy = spawn_test_worker(&server, 0).await;
    let report = tokio::time::timeout(30 * SECS, run.report()).await.unwrap().unwrap();
    assert!(healthy.lines_starting("b-start").is_empty(), "b ran a second time: {report}");
    assert_eq!(report.status, RunStatus::Failed, "{report}");
    let b = report.step("b").unwrap();
    assert_eq!(b.attempts, 1, "{report}");
    assert_eq!(b.status, StepStatus::Compensated, "maybe done, so compensated: {report}");
    assert!(b.error.as_deref().unwrap().starts_with("outcome unknown: worker "), "{report}");
    let undo: Vec<String> = healthy.lines_starting("undo-");
    assert_eq!(undo.len(), 2, "{undo:?}");
    assert!(undo[0].starts_with("undo-b ") && undo[1].starts_with("undo-a "), "{undo:?}");
}

// 3. A worker frozen after it acked has an unknown outcome: not retried by
//    default (it may have charged), compensated with the completed steps; its
//    answer after it thaws is recorded as late, and it starts nothing stale.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_worker_is_an_unknown_outcome_compensated_and_its_late_answer_recorded() {
    let server = NatsServer::start_with_config("ping_interval: \"250ms\"\nping_max: 2\n");
    let node = node(&server, flows(CRASH_FLOW)).await;
    let frozen = spawn_test_worker(&server, 2_000).await;
    let run = node.coordinator().start("crash", &5u32, RunOptions::new()).await.unwrap();
    let run_id = run.run_id();
    frozen.wait_for_line("b-start", 10 * SECS).await;
    let healthy = spawn_test_worker(&server, 0).await;
    frozen.signal("STOP");
    let report = tokio::time::timeout(30 * SECS, run.report()).await.unwrap().unwrap();
    assert_eq!(report.status, RunStatus::Failed, "{report}");
    let b = report.step("b").unwrap();
    assert_eq!(b.attempts, 1, "an unknown outcome is not retried by default");
    assert_eq!(b.status, StepStatus::Compensated, "maybe done, so compensated: {report}");
    assert!(b.error.as_deref().unwrap().starts_with("outcome unknown: worker "), "{report}");
    assert_eq!(report.step("a").unwrap().status, StepStatus::Compensated);
    // b was compensated before a (reverse order), by the healthy replica.
    let undo: Vec<String> = healthy.lines_starting("undo-");
    assert_eq!(undo.len(), 2, "{undo:?}");
    assert!(undo[0].starts_with("undo-b ") && undo[1].starts_with("undo-a "), "{undo:?}");
    assert!(healthy.lines_starting("b-start").is_empty(), "b never ran twice");
    // Thawed: its handler finishes and answers late; nothing stale starts.
    frozen.signal("CONT");
    frozen.wait_for_line("b-done", 10 * SECS).await;
    let deadline = tokio::time::Instant::now() + 15 * SECS;
    let late = loop {
        let r = node.coordinator().status(run_id).await.unwrap().unwrap();
        if !r.late.is_empty() {
            break r;
        }
        assert!(tokio::time::Instant::now() < deadline, "late answer not recorded: {r}");
        tokio::time::sleep(100 * MS).await;
    };
    assert_eq!(late.status, RunStatus::Failed, "recorded, never applied");
    assert!(late.late[0].contains("completed"), "{:?}", late.late);
    tokio::time::sleep(SECS).await;
    assert_eq!(frozen.lines_starting("b-start").len(), 1);
    assert!(frozen.lines_starting("undo-").is_empty(), "no stale command ran after SIGCONT");
}

// 3a'. The coordinator's own NATS server frozen for seconds while a step
//      runs: the worker's heartbeats stop reaching it, it asks every
//      replica, and no answer can come while the server is frozen. That
//      silence is its own connection's, not the workers': the window for
//      answers opens once the inquiry has reached the server, the worker
//      answers it, and the step completes as if nothing happened (before,
//      it became an unknown outcome and the run was rolled back).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_server_is_not_taken_for_a_silent_worker() {
    let server = NatsServer::start();
    let node = node(&server, flows(CRASH_FLOW)).await;
    let worker = spawn_test_worker(&server, 4_000).await;
    let run = node.coordinator().start("crash", &5u32, RunOptions::new()).await.unwrap();
    worker.wait_for_line("b-start", 10 * SECS).await;
    tokio::time::sleep(300 * MS).await;
    let pid = server.pid().unwrap().to_string();
    let stop = std::process::Command::new("kill").args(["-STOP", &pid]).status().unwrap();
    assert!(stop.success());
    // Five heartbeat timeouts and more: silence, inquiry and its window
    // would all have passed in the dark.
    tokio::time::sleep(3 * SECS).await;
    let cont = std::process::Command::new("kill").args(["-CONT", &pid]).status().unwrap();
    assert!(cont.success());
    let report = tokio::time::timeout(30 * SECS, run.report()).await.unwrap().unwrap();
    assert_eq!(report.status, RunStatus::Completed, "{report}");
    let b = report.step("b").unwrap();
    assert_eq!((b.attempts, b.error.as_deref()), (1, None), "{report}");
    assert_eq!(worker.lines_starting("b-start").len(), 1);
}

// 3b. No worker took the command: nobody started it. It waits for a worker
//     and is sent again, without spending an attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_nobody_took_waits_for_a_worker_without_spending_an_attempt() {
    let server = NatsServer::start();
    let node = node(&server, flows(CRASH_FLOW)).await;
    let run = node.coordinator().start("crash", &5u32, RunOptions::new()).await.unwrap();
    tokio::time::sleep(2 * SECS).await;
    let status = node.coordinator().status(run.run_id()).await.unwrap().unwrap();
    let a = status.step("a").unwrap();
    assert_eq!(a.status, StepStatus::Waiting, "{status}");
    assert_eq!(a.error, None, "waiting is not an error: {status}");
    let w = spawn_test_worker(&server, 0).await;
    let report = tokio::time::timeout(30 * SECS, run.report()).await.unwrap().unwrap();
    assert_eq!(report.status, RunStatus::Completed, "{report}");
    assert_eq!(report.step("a").unwrap().attempts, 1);
    assert_eq!(w.lines_starting("a ").len(), 1);
}

/// A worker for flow `big` whose steps return `sizes[i]` bytes.
async fn sized_worker(server: &NatsServer, flow: &str, sizes: &[usize], ledger: &Ledger) -> Worker {
    let sizes = sizes.to_vec();
    let ledger = ledger.clone();
    Worker::builder()
        .nats(NatsOptions::new(server.url()))
        .steps::<u32>(flow, move |mut f| {
            for (i, n) in sizes.iter().copied().enumerate() {
                let name = format!("s{i}");
                let (l1, l2) = (ledger.clone(), ledger.clone());
                f = f
                    .step(&name, move |ctx: StepContext<u32>| {
                        l1.log(format!("{} {}", ctx.step(), ctx.run_id()));
                        async move { Ok(serde_bytes_like(n)) }
                    })
                    .compensate(&name, move |ctx| {
                        l2.log(format!("undo {} {}", ctx.step(), ctx.run_id()));
                        async { Ok(()) }
                    });
            }
            f
        })
        .start()
        .await
        .unwrap()
}

/// `n` bytes of output (a string of `n` ASCII characters).
fn serde_bytes_like(n: usize) -> String {
    "x".repeat(n)
}

// 4. Outputs that together outgrow what a run can hold fail the step that
//    would overflow (as maybe done, so it is compensated): never a loop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_whose_outputs_outgrow_the_limit_fails_and_compensates() {
    let server = NatsServer::start();
    let _node = node(&server, vec![def("big", &["s0", "s1", "s2"])]).await;
    let ledger = Ledger::default();
    let w = sized_worker(&server, "big", &[400_000, 400_000, 400_000], &ledger).await;
    let c = client(&server).await;
    let report = tokio::time::timeout(30 * SECS, c.run("big", &1u32, RunOptions::new()))
        .await
        .expect("the run ends")
        .unwrap();
    assert_eq!(report.status, RunStatus::Failed, "{report}");
    let s1 = report.step("s1").unwrap();
    assert!(s1.error.as_deref().unwrap().contains("over the limit of 786432 bytes"), "{report}");
    assert_eq!(s1.status, StepStatus::Compensated);
    assert_eq!(report.step("s0").unwrap().status, StepStatus::Compensated);
    assert_eq!(report.step("s2").unwrap().status, StepStatus::NotRun);
    w.shutdown().await;
}

// 5. An output over the message limit is a permanent failure, named by the
//    worker, at once: not "no worker took the command".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_output_over_the_message_limit_is_named_by_the_worker() {
    let server = NatsServer::start();
    let _node = node(&server, vec![def("huge", &["s0"])]).await;
    let ledger = Ledger::default();
    let w = sized_worker(&server, "huge", &[2_000_000], &ledger).await;
    let c = client(&server).await;
    let started = std::time::Instant::now();
    let report = tokio::time::timeout(30 * SECS, c.run("huge", &1u32, RunOptions::new()))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(report.status, RunStatus::Failed, "{report}");
    let s0 = report.step("s0").unwrap();
    let err = s0.error.as_deref().unwrap();
    assert!(err.contains("over the 1048576-byte message limit"), "{err}");
    assert_eq!((s0.attempts, s0.status), (1, StepStatus::Compensated));
    assert!(started.elapsed() < 5 * SECS, "reported at once, not after timeouts");
    w.shutdown().await;
}

// 6. Poison: an output that is not a MessagePack `bin` fails its attempt with
//    the reason; a stored record that does not decode is moved aside, and
//    `status` and `list` keep working for every run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_outputs_and_records_are_quarantined() {
    let server = NatsServer::start();
    let node = node(&server, vec![def("poison", &["s0"])]).await;
    // A worker of another language answers with a `str` output.
    let nats = NatsOptions::new(server.url()).connect().await.unwrap();
    let subjects = Subjects::default();
    let mut sub = nats
        .queue_subscribe(
            subjects.step_any_version("poison", "s0"),
            subjects.step_queue_group("poison", "s0"),
        )
        .await
        .unwrap();
    orchestrix_worker::sync(&nats).await;
    let fake = {
        let nats = nats.clone();
        tokio::spawn(async move {
            while let Some(msg) = sub.next().await {
                let Ok(cmd) = decode::<StepCommand>(&msg.payload) else { continue };
                let reply = msg.reply.unwrap();
                let ack = Ack {
                    command_id: cmd.command_id,
                    run_id: cmd.run_id,
                    attempt: cmd.attempt,
                    worker: "fake".into(),
                };
                nats.publish(reply.clone(), Bytes::from(encode(&ack).unwrap())).await.unwrap();
                // Its compensation answers well: only the action's output is bad.
                let answer = if cmd.kind == orchestrix_proto::CommandKind::Compensate {
                    let ok = orchestrix_proto::StepOutcome {
                        command_id: cmd.command_id,
                        run_id: cmd.run_id,
                        attempt: cmd.attempt,
                        kind: cmd.kind,
                        result: orchestrix_proto::OutcomeResult::Completed {
                            output: Payload::nil(),
                        },
                    };
                    Bytes::from(encode(&ok).unwrap())
                } else {
                    str_outcome(&cmd)
                };
                nats.publish(reply, answer).await.unwrap();
            }
        })
    };
    let c = client(&server).await;
    let report = tokio::time::timeout(30 * SECS, c.run("poison", &1u32, RunOptions::new()))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(report.status, RunStatus::Failed, "{report}");
    let err = report.step("s0").unwrap().error.clone().unwrap();
    assert!(err.contains("outcome does not decode") && err.contains("bin"), "{err}");
    // The handler ran: maybe done, so it was compensated.
    assert_eq!(report.step("s0").unwrap().status, StepStatus::Compensated, "{report}");
    fake.abort();
    // A record that does not decode: reported, then moved aside.
    let bad = Uuid::now_v7();
    kv(&server, "orchestrix_runs")
        .await
        .put(bad.to_string(), Bytes::from_static(b"\xc1garbage"))
        .await
        .unwrap();
    let listed = c.list(ListFilter::new(None, None, 50)).await.unwrap();
    assert!(listed.iter().any(|r| r.run_id == report.run_id), "list goes on past poison");
    let l = listed.iter().find(|r| r.run_id == bad).expect("the poison is listed");
    assert_eq!(l.status, RunStatus::Quarantined);
    let deadline = tokio::time::Instant::now() + 10 * SECS;
    while kv(&server, "orchestrix_runs").await.get(bad.to_string()).await.unwrap().is_some() {
        assert!(tokio::time::Instant::now() < deadline, "poison not moved aside");
        tokio::time::sleep(100 * MS).await;
    }
    let s = c.status(bad.into()).await.unwrap();
    assert_eq!(s.status, RunStatus::Quarantined);
    assert!(s.error.unwrap().contains("does not decode"));
    assert!(
        kv(&server, "orchestrix_quarantine").await.get(bad.to_string()).await.unwrap().is_some()
    );
    assert_eq!(
        node.coordinator().status(report.run_id).await.unwrap().unwrap().status,
        RunStatus::Failed
    );
}

/// An outcome whose output is a MessagePack `str`, as a careless encoder writes it.
fn str_outcome(cmd: &StepCommand) -> Bytes {
    #[derive(serde::Serialize)]
    struct Env<'a> {
        v: u16,
        kind: &'a str,
        body: Body<'a>,
    }
    #[derive(serde::Serialize)]
    #[serde(rename_all = "camelCase")]
    struct Body<'a> {
        command_id: String,
        run_id: String,
        attempt: u32,
        kind: &'a str,
        result: HashMap<&'a str, &'a str>,
    }
    // A protocol v2 outcome in every respect but the output's type.
    let result = HashMap::from([("type", "completed"), ("output", "ok")]);
    let body = Body {
        command_id: cmd.command_id.to_string(),
        run_id: cmd.run_id.to_string(),
        attempt: cmd.attempt,
        kind: "execute",
        result,
    };
    let env = Env { v: orchestrix_proto::PROTOCOL_VERSION, kind: "step.outcome", body };
    Bytes::from(rmp_serde::to_vec_named(&env).unwrap())
}

// 7. Coordinators serving different flows share one NATS: starts go to one
//    that serves the flow, and orphans to one that serves theirs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinators_serving_different_flows_share_one_nats() {
    let server = NatsServer::start();
    let ledger = Ledger::default();
    let a = quiet_node(&server, vec![def("fa", &["x"])]).await;
    let b = quiet_node(&server, vec![def("fb", &["y"])]).await;
    let wa = simple_worker(&server, "fa", &["x"], &ledger).await;
    let wb = simple_worker(&server, "fb", &["y"], &ledger).await;
    let c = client(&server).await;
    for i in 0..20u32 {
        let flow = if i % 2 == 0 { "fa" } else { "fb" };
        let r = c.run(flow, &i, RunOptions::new()).await.unwrap();
        assert_eq!(r.status, RunStatus::Completed, "{r}");
    }
    // An orphan of flow `fb` (its coordinator died): only `b` may take it.
    let mut rec = RunRecord::new(
        Uuid::now_v7(),
        &def("fb", &["y"]),
        Payload::encode(&7u32).unwrap(),
        std::time::SystemTime::now(),
    );
    rec.extras_mut().key = None;
    kv(&server, "orchestrix_runs")
        .await
        .put(rec.run_id.to_string(), stored("dead", &rec))
        .await
        .unwrap();
    assert_eq!(a.coordinator().recover().await.unwrap(), 0, "not a flow it serves");
    assert_eq!(b.coordinator().recover().await.unwrap(), 1);
    let r = tokio::time::timeout(30 * SECS, c.wait(rec.run_id.into())).await.unwrap().unwrap();
    assert_eq!(r.status, RunStatus::Completed, "{r}");
    assert_eq!(ledger.count(&format!("y {}", rec.run_id)), 1);
    wa.shutdown().await;
    wb.shutdown().await;
}

// A dead coordinator whose heartbeat the server kept past its TTL (a
// nats-server that crashed was seen to bring such keys back) does not keep
// its runs from being taken over: a heartbeat much older than the live
// coordinator's own counts as dead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_heartbeat_kept_past_its_ttl_does_not_keep_a_dead_coordinators_runs() {
    let server = NatsServer::start();
    let ledger = Ledger::default();
    let node = quiet_node(&server, vec![def("fa", &["x"])]).await;
    let w = simple_worker(&server, "fa", &["x"], &ledger).await;
    let c = client(&server).await;
    // A heartbeat with no TTL, as one brought back would be.
    kv(&server, "orchestrix_coordinators").await.put("ghost", "journal 0".into()).await.unwrap();
    let mut rec = RunRecord::new(
        Uuid::now_v7(),
        &def("fa", &["x"]),
        Payload::encode(&7u32).unwrap(),
        std::time::SystemTime::now(),
    );
    rec.extras_mut().key = None;
    kv(&server, "orchestrix_runs")
        .await
        .put(rec.run_id.to_string(), stored("ghost", &rec))
        .await
        .unwrap();
    // Fresh: the ghost counts as alive, and its run is not taken.
    assert_eq!(node.coordinator().recover().await.unwrap(), 0, "taken from a live owner");
    // Still within its TTL (3 s) and the margin (30 s), by the server's
    // clock: a pause of that length must not read as a death.
    tokio::time::sleep(10 * SECS).await;
    assert_eq!(node.coordinator().recover().await.unwrap(), 0, "taken within the margin");
    // Past them.
    tokio::time::sleep(25 * SECS).await;
    assert_eq!(node.coordinator().recover().await.unwrap(), 1, "a dead owner's run was not taken");
    let r = tokio::time::timeout(30 * SECS, c.wait(rec.run_id.into())).await.unwrap().unwrap();
    assert_eq!(r.status, RunStatus::Completed, "{r}");
    assert_eq!(ledger.count(&format!("x {}", rec.run_id)), 1);
    w.shutdown().await;
}

/// A worker's presence kept past its TTL is not listed as live.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_presence_kept_past_its_ttl_is_not_a_live_worker() {
    use orchestrix_proto::WorkerPresence;
    let server = NatsServer::start();
    let ledger = Ledger::default();
    let w = simple_worker(&server, "fa", &["x"], &ledger).await;
    let conn = NatsOptions::new(server.url()).connect().await.unwrap();
    let registry =
        orchestrix_worker::registry::Registry::open(conn, "orchestrix", 1).await.unwrap();
    let live = registry.presences().await.unwrap();
    assert_eq!(live.len(), 1, "{live:?}");
    let ghost = WorkerPresence { worker: "ghost".into(), ..live[0].clone() };
    kv(&server, "orchestrix_workers")
        .await
        .put(orchestrix_worker::registry::worker_key("ghost"), encode(&ghost).unwrap().into())
        .await
        .unwrap();
    let names = |ps: Vec<WorkerPresence>| {
        let mut n: Vec<String> = ps.into_iter().map(|p| p.worker).collect();
        n.sort();
        n
    };
    assert_eq!(names(registry.presences().await.unwrap()).len(), 2, "a fresh entry is live");
    // The ghost's entry ages past its TTL (6 s) and the slack (2 s) beyond
    // the live worker's newest renewal (every 2 s).
    tokio::time::sleep(11 * SECS).await;
    assert_eq!(names(registry.presences().await.unwrap()), vec![live[0].worker.clone()]);
    w.shutdown().await;
}

// 8. A run whose flow changed under it (steps removed) is moved aside with the
//    reason, never indexed past the flow's end; whoever waits on its key gets
//    that answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_whose_flow_changed_is_quarantined_and_its_key_answered() {
    let server = NatsServer::start();
    let node = quiet_node(&server, vec![def("fa", &["x", "y"])]).await;
    let old = def("fa", &["x", "y", "z"]);
    let mut rec = RunRecord::new(
        Uuid::now_v7(),
        &old,
        Payload::encode(&1u32).unwrap(),
        std::time::SystemTime::now(),
    );
    rec.extras_mut().key = Some("order-8".into());
    rec.current.clear();
    for s in &mut rec.steps[..2] {
        s.status = StepStatus::Completed;
        s.attempts = 1;
        s.output = Some(Payload::nil());
    }
    kv(&server, "orchestrix_keys")
        .await
        .create(key_name("order-8"), key_value(rec.run_id))
        .await
        .unwrap();
    kv(&server, "orchestrix_runs")
        .await
        .put(rec.run_id.to_string(), stored("dead", &rec))
        .await
        .unwrap();
    assert_eq!(node.coordinator().recover().await.unwrap(), 0);
    let c = client(&server).await;
    let s = c.status(rec.run_id.into()).await.unwrap();
    assert_eq!(s.status, RunStatus::Quarantined, "{s}");
    assert!(s.error.as_deref().unwrap().contains("now has [x, y]"), "{s}");
    let id = c.start("fa", &1u32, RunOptions::new().key("order-8")).await.unwrap();
    assert_eq!(id, rec.run_id);
    let r = tokio::time::timeout(10 * SECS, c.wait(id)).await.unwrap().unwrap();
    assert_eq!(r.status, RunStatus::Quarantined);
}

// A coordinator fenced while cut off (a NATS pause made it look dead) loses
// every run it holds, but the actors of runs that wait on a long step live
// on until their next write. When its own takeover scan then finds such a
// run unheld, it must not start a second actor beside the first: the two
// would both act on the step's answers and start the steps after it twice.
// Here the fence is appended by hand (what a taker does), and the next
// start's write makes the coordinator notice it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_lost_to_a_fence_while_its_step_runs_is_resumed_by_one_actor_only() {
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let server = NatsServer::start();
    let ledger = Ledger::default();
    // The step after the long one takes a while too, so that the run is
    // still live when a second actor would act on the charge's answer.
    let workers = replicas_timed(&server, &ledger, 4_000, 1_500).await;
    let node = node(&server, flows(TAKEOVER_FLOW)).await;
    let c = client(&server).await;
    let id = c.start("pay", &1, RunOptions::new()).await.unwrap();
    let l = ledger.clone();
    eventually(10 * SECS, "the charge started", || l.count(&format!("charge {id}")) == 1).await;
    // Its ack written (50 ms later): the actor has nothing more to write
    // until the charge answers.
    tokio::time::sleep(SECS).await;

    let conn = NatsOptions::new(server.url()).connect().await.unwrap();
    // A resume asks the workers who holds the charge in flight.
    let mut inquiries =
        conn.subscribe(Subjects::default().inquiries("pay", "charge")).await.unwrap();
    let js = jetstream::new(conn);
    let stream = js.get_stream("orchestrix_journal").await.unwrap();
    let subjects: Vec<String> = stream
        .info_with_subjects("orchestrix_journal.*")
        .await
        .unwrap()
        .map(|s| s.unwrap().0)
        .collect()
        .await;
    assert_eq!(subjects.len(), 1, "one coordinator, one journal: {subjects:?}");
    let last = stream.get_last_raw_message_by_subject(&subjects[0]).await.unwrap();
    let mut h = async_nats::HeaderMap::new();
    h.insert("Nats-Expected-Last-Subject-Sequence", last.sequence.to_string().as_str());
    h.insert("Orchestrix-Fence", "a-taker");
    js.publish_with_headers(subjects[0].clone(), h, Bytes::new()).await.unwrap().await.unwrap();

    // Its write meets the fence: every run of the coordinator is lost, and
    // its own scans find them unheld.
    let other = c.start("pay", &2, RunOptions::new()).await.unwrap();
    for run in [id, other] {
        let r = tokio::time::timeout(60 * SECS, c.wait(run)).await.unwrap().unwrap();
        assert_eq!(r.status, RunStatus::Completed, "{r}");
        assert_eq!(r.step("charge").unwrap().attempts, 1, "{r}");
    }
    // Late duplicates would come within a few more scans.
    tokio::time::sleep(3 * SECS).await;
    for run in [id, other] {
        assert_eq!(
            ledger.count(&format!("charge {run}")),
            1,
            "charged once: {:?}",
            ledger.about(run)
        );
        assert_eq!(
            ledger.count(&format!("notify {run}")),
            1,
            "notified once: {:?}",
            ledger.about(run)
        );
    }
    let asked =
        tokio::time::timeout(SECS, inquiries.next()).await.expect("the lost run was resumed");
    let cmd: StepCommand = decode(&asked.unwrap().payload).unwrap();
    assert_eq!(cmd.run_id, id.as_uuid());
    drop(node);
    for w in workers {
        w.shutdown().await;
    }
}
