//! One flow definition: workers register versioned flows, coordinators with
//! no flow file serve them, and runs stay on the version they started on.
//! Against real `nats-server` processes, with several worker replicas.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use orchestrix::{Client, Flow, RunOptions, RunStatus, StepContext, StepStatus, Worker, create};
use orchestrix_coordinator::nats::{NatsBusOptions, Node};
use orchestrix_integration_tests::{Ledger, NatsServer, eventually};
use orchestrix_proto::Subjects;
use orchestrix_worker::registry::{Registry, RegistryError};
use orchestrix_worker::{NatsOptions, WorkerError};
use tokio::sync::watch;

const SECS: Duration = Duration::from_secs(1);
const MS: Duration = Duration::from_millis(1);

/// A coordinator with no flows of its own: it serves what workers register.
async fn node(server: &NatsServer) -> Node {
    let conn = NatsOptions::new(server.url()).connect().await.unwrap();
    let bus = NatsBusOptions::default()
        .ack_timeout(500 * MS)
        .heartbeat_timeout(600 * MS)
        .clock_skew(100 * MS)
        .worker_wait(20 * SECS);
    Node::builder().bus_options(bus).takeover_every(500 * MS).start(conn).await.unwrap()
}

async fn client(server: &NatsServer) -> Client {
    let conn = NatsOptions::new(server.url()).connect().await.unwrap();
    Client::new(conn, Subjects::default()).request_timeout(3 * SECS)
}

/// `shop` as `tag` defines it: the given steps, each logging `{tag} {step} {run}`;
/// `b` waits until `gate` opens.
fn shop(
    tag: &'static str,
    steps: &[&'static str],
    ledger: &Ledger,
    gate: watch::Receiver<bool>,
) -> Flow<u32> {
    let mut flow = create::<u32>("shop");
    for step in steps {
        let (ledger, gate) = (ledger.clone(), gate.clone());
        flow = flow.step(step, move |ctx: StepContext<u32>| {
            let (ledger, mut gate) = (ledger.clone(), gate.clone());
            async move {
                ledger.log(format!("{tag} {} {}", ctx.step(), ctx.run_id()));
                if ctx.step() == "b" {
                    let _ = gate.wait_for(|open| *open).await;
                }
                Ok(())
            }
        });
    }
    flow
}

async fn serve(server: &NatsServer, flow: Flow<u32>) -> Worker {
    Worker::builder().nats(NatsOptions::new(server.url())).flow(flow).start().await.unwrap()
}

/// Waits until the coordinator sees `version` of `flow` served by `workers` live workers.
async fn served_by(node: &Node, flow: &str, version: &str, workers: usize) {
    let registry = node.coordinator().registry().unwrap();
    eventually(10 * SECS, "the coordinator to see the workers", || {
        registry.versions().iter().any(|v| {
            &*v.registration.flow.name == flow
                && &*v.registration.version == version
                && v.workers.len() == workers
        })
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_with_no_flows_serves_what_a_worker_registers() {
    let server = NatsServer::start();
    let node = node(&server).await;
    let ledger = Ledger::default();
    let (_open, gate) = watch::channel(true);
    let flow = shop("v1", &["a", "b"], &ledger, gate);
    let version = flow.definition().version();
    let worker = serve(&server, flow.clone()).await;
    served_by(&node, "shop", &version, 1).await;

    let c = client(&server).await;
    let report = c.run("shop", &7u32, RunOptions::new()).await.unwrap();
    assert_eq!(report.status, RunStatus::Completed, "{report}");
    assert_eq!(report.version.as_deref(), Some(&*version));
    assert_eq!(
        ledger.about(report.run_id),
        [format!("v1 a {}", report.run_id), format!("v1 b {}", report.run_id)]
    );

    // The same flow value, run remotely: a typed handle through the client.
    let remote = flow.remote(&c).run(8).await.unwrap();
    assert_eq!(remote.status, RunStatus::Completed, "{remote}");
    assert_eq!(ledger.about(remote.run_id).len(), 2);
    let pinned = flow.remote(&c).version(version.to_string()).run(9).await.unwrap();
    assert_eq!(pinned.version.as_deref(), Some(&*version));
    // Given to a coordinator that sends commands over a bus, its in-process
    // handlers would never run: refused, with what to do instead.
    let err = orchestrix::Coordinator::builder()
        .bus(orchestrix::coordinator::MemoryBus::default())
        .flow(&flow)
        .build()
        .unwrap_err();
    assert!(err.to_string().contains("Worker::builder().flow(flow)"), "{err}");

    // The registry lists the version and the worker serving it.
    let conn = NatsOptions::new(server.url()).connect().await.unwrap();
    let registry = Registry::open(conn, "orchestrix", 1).await.unwrap();
    let regs = registry.registrations().await.unwrap();
    assert_eq!(regs.len(), 1);
    assert_eq!(regs[0].version, version);
    assert_eq!(regs[0].registered_by, worker.id());
    let workers = registry.presences().await.unwrap();
    assert_eq!(workers.len(), 1);
    assert_eq!(workers[0].worker, worker.id());

    // A worker that leaves withdraws its presence: the version has no worker.
    worker.shutdown().await;
    served_by(&node, "shop", &version, 0).await;
    assert!(registry.presences().await.unwrap().is_empty());
    // The very same flow value still runs embedded.
    assert_eq!(flow.run(1).await.unwrap().status, RunStatus::Completed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_upgrade_keeps_each_run_on_its_own_version() {
    let server = NatsServer::start();
    let node = node(&server).await;
    let ledger = Ledger::default();
    let (gate_tx, gate) = watch::channel(false);
    let v1 = shop("v1", &["a", "b", "c"], &ledger, gate.clone());
    let v1_version = v1.definition().version();
    // Two replicas of the old worker.
    let old_1 = serve(&server, v1.clone()).await;
    let old_2 = serve(&server, v1).await;
    served_by(&node, "shop", &v1_version, 2).await;
    let c = client(&server).await;

    // Four runs start on v1 and are held at step b.
    let mut old_runs = Vec::new();
    for i in 0..4u32 {
        old_runs.push(c.start("shop", &i, RunOptions::new()).await.unwrap());
    }
    eventually(10 * SECS, "the v1 runs to reach b", || ledger.starting("v1 b ") == 4).await;

    // The new version comes up: new runs take it.
    let (_open, open) = watch::channel(true);
    let v2 = shop("v2", &["a", "b", "c", "d"], &ledger, open);
    let v2_version = v2.definition().version();
    assert_ne!(v1_version, v2_version);
    let new_worker = serve(&server, v2).await;
    served_by(&node, "shop", &v2_version, 1).await;
    for i in 10..14u32 {
        let report = c.run("shop", &i, RunOptions::new()).await.unwrap();
        assert_eq!(report.status, RunStatus::Completed, "{report}");
        assert_eq!(report.version.as_deref(), Some(&*v2_version));
        let id = report.run_id;
        assert_eq!(
            ledger.about(id),
            ["a", "b", "c", "d"].map(|s| format!("v2 {s} {id}")),
            "a new run runs on v2 only"
        );
    }

    // One old replica is replaced (drained: the commands in hand finish).
    gate_tx.send(true).unwrap();
    old_1.shutdown().await;
    // The old runs finish on v1, on the replica left, never on the v2 worker.
    for id in &old_runs {
        let report = tokio::time::timeout(30 * SECS, c.wait(*id)).await.unwrap().unwrap();
        assert_eq!(report.status, RunStatus::Completed, "{report}");
        assert_eq!(report.version.as_deref(), Some(&*v1_version));
        assert_eq!(ledger.about(*id), ["a", "b", "c"].map(|s| format!("v1 {s} {id}")));
    }
    old_2.shutdown().await;
    served_by(&node, "shop", &v1_version, 0).await;

    // A run pinned to a version with no worker left waits, visibly, then
    // fails cleanly at its deadline.
    let options = RunOptions::new().version(v1_version.to_string()).timeout(3 * SECS);
    let stranded = c.start("shop", &99u32, options).await.unwrap();
    let deadline = tokio::time::Instant::now() + 10 * SECS;
    loop {
        let now = c.status(stranded).await.unwrap();
        if now.steps[0].status == StepStatus::Waiting {
            let note = now.steps[0].waiting.clone().unwrap_or_default();
            assert!(note.contains(&*v1_version), "the wait names the version: {note}");
            break;
        }
        assert_eq!(now.status, RunStatus::Running, "{now}");
        assert!(tokio::time::Instant::now() < deadline, "never shown waiting: {now}");
        tokio::time::sleep(100 * MS).await;
    }
    let report = tokio::time::timeout(30 * SECS, c.wait(stranded)).await.unwrap().unwrap();
    assert_eq!(report.status, RunStatus::Failed, "{report}");
    assert!(ledger.about(stranded).is_empty(), "nothing ran: {:?}", ledger.about(stranded));
    // An unknown version is refused outright.
    let err = c.start("shop", &1u32, RunOptions::new().version("nope")).await.unwrap_err();
    assert!(err.to_string().contains("has no version `nope`"), "{err}");
    new_worker.shutdown().await;
    assert_eq!(ledger.count("never"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conflicting_registration_is_refused() {
    let server = NatsServer::start();
    let ledger = Ledger::default();
    let (_open, gate) = watch::channel(true);
    let one = shop("v1", &["a"], &ledger, gate.clone()).version("release-1");
    let worker = serve(&server, one.clone()).await;
    // The same definition again (another replica): fine.
    let replica = serve(&server, one).await;
    // Another definition under the same label: refused, with the reason.
    let other = shop("v1", &["a", "b"], &ledger, gate).version("release-1");
    let err = Worker::builder()
        .nats(NatsOptions::new(server.url()))
        .flow(other)
        .start()
        .await
        .unwrap_err();
    assert!(
        matches!(&err, WorkerError::Registry(RegistryError::Conflict { version, .. }) if version == "release-1"),
        "{err:?}"
    );
    assert!(err.to_string().contains("already registered with a different definition"), "{err}");
    // A flow that is not valid never reaches the registry.
    let bad = create::<u32>("bad name").step("a", |_ctx| async { Ok(()) });
    let err =
        Worker::builder().nats(NatsOptions::new(server.url())).flow(bad).start().await.unwrap_err();
    assert!(err.to_string().contains("bad name"), "{err}");
    let conn = NatsOptions::new(server.url()).connect().await.unwrap();
    let registry = Registry::open(conn.clone(), "orchestrix", 1).await.unwrap();
    assert_eq!(registry.registrations().await.unwrap().len(), 1);
    // A definition too large for one message is refused with its size,
    // before anything is sent.
    let mut huge = orchestrix::FlowDef::new("huge");
    huge.steps = (0..20_000).map(|i| orchestrix::StepDef::new(&format!("step-{i}"))).collect();
    let err = registry.check(&huge).await.unwrap_err();
    assert!(matches!(err, RegistryError::TooLarge { .. }), "{err}");
    assert!(err.to_string().contains("split it into smaller flows"), "{err}");
    assert!(registry.register(&huge, "test").await.is_err());
    assert_eq!(registry.registrations().await.unwrap().len(), 1);
    // Garbage in the registry (written by something else) is skipped, not fatal:
    // a coordinator starts and serves the good entries.
    let js = async_nats::jetstream::new(conn);
    let flows = js.get_key_value("orchestrix_flows").await.unwrap();
    flows.put("junk.v0", bytes::Bytes::from_static(b"\x00garbage")).await.unwrap();
    assert_eq!(registry.registrations().await.unwrap().len(), 1);
    let node = node(&server).await;
    assert_eq!(node.coordinator().flows(), [std::sync::Arc::from("shop")]);
    let report = client(&server).await.run("shop", &1u32, RunOptions::new()).await.unwrap();
    assert_eq!(report.status, RunStatus::Completed, "{report}");
    worker.shutdown().await;
    replica.shutdown().await;
}

/// A coordinator with no flow file, killed mid-run: the one that takes the
/// runs over finds their version in the registry, and they finish on it even
/// though a newer version is served by then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_taken_over_after_a_coordinator_dies_stays_on_its_version() {
    use orchestrix_integration_tests::{ChildProcess, built};
    let server = NatsServer::start();
    let url = server.url();
    let coordinator = || ChildProcess::spawn(&built("orchestrix"), &["--nats", &url, "serve"]);
    let mut first = coordinator();
    let ledger = Ledger::default();
    let (gate_tx, gate) = watch::channel(false);
    let v1 = shop("v1", &["a", "b", "c"], &ledger, gate);
    let v1_version = v1.definition().version();
    let old = serve(&server, v1).await;
    let c = client(&server).await;
    let mut runs = Vec::new();
    for i in 0..3u32 {
        let deadline = tokio::time::Instant::now() + 30 * SECS;
        let id = loop {
            // The coordinator may not have seen the registration yet.
            match c.start("shop", &i, RunOptions::new()).await {
                Ok(id) => break id,
                Err(e) => assert!(tokio::time::Instant::now() < deadline, "{e}"),
            }
            tokio::time::sleep(100 * MS).await;
        };
        runs.push(id);
    }
    eventually(10 * SECS, "the runs to reach b", || ledger.starting("v1 b ") == 3).await;
    first.signal("KILL");
    let _ = first.wait(10 * SECS).await;
    // A newer version is up before the runs are taken over.
    let (_open, open) = watch::channel(true);
    let new_worker = serve(&server, shop("v2", &["a", "b", "c", "d"], &ledger, open)).await;
    let _second = coordinator();
    gate_tx.send(true).unwrap();
    for id in &runs {
        let report = tokio::time::timeout(30 * SECS, c.wait(*id)).await.unwrap().unwrap();
        assert_eq!(report.status, RunStatus::Completed, "{report}");
        assert_eq!(report.version.as_deref(), Some(&*v1_version));
        let lines = ledger.about(*id);
        assert!(lines.iter().all(|l| l.starts_with("v1 ")), "{lines:?}");
        assert_eq!(ledger.count(&format!("v1 c {id}")), 1, "{lines:?}");
    }
    old.shutdown().await;
    new_worker.shutdown().await;
}

/// A service that serves one step of a new version does not pull new runs
/// onto it before every step of that version has a worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_runs_take_a_version_only_once_every_step_is_served() {
    let server = NatsServer::start();
    let node = node(&server).await;
    let ledger = Ledger::default();
    let (_open, gate) = watch::channel(true);
    let v1 = shop("v1", &["a", "b"], &ledger, gate.clone());
    let v2 = shop("v2", &["a", "b", "c"], &ledger, gate);
    let (v1_version, v2_version) = (v1.definition().version(), v2.definition().version());
    let old = serve(&server, v1).await;
    let part = Worker::builder()
        .nats(NatsOptions::new(server.url()))
        .flow_steps(v2.clone(), &["a"])
        .start()
        .await
        .unwrap();
    let registry = node.coordinator().registry().unwrap();
    eventually(10 * SECS, "the partial worker to be seen", || {
        registry.versions().iter().any(|v| {
            v.registration.version == v2_version
                && v.workers.len() == 1
                && v.unserved.iter().map(|s| s.to_string()).collect::<Vec<_>>() == ["b", "c"]
        })
    })
    .await;
    let c = client(&server).await;
    let r = c.run("shop", &1u32, RunOptions::new()).await.unwrap();
    assert_eq!(r.version.as_deref(), Some(&*v1_version), "still the fully served version");
    assert_eq!(r.status, RunStatus::Completed, "{r}");
    // The rest of v2 comes up: new runs take it.
    let rest = Worker::builder()
        .nats(NatsOptions::new(server.url()))
        .flow_steps(v2, &["b", "c"])
        .start()
        .await
        .unwrap();
    eventually(10 * SECS, "v2 to be fully served", || {
        registry
            .versions()
            .iter()
            .any(|v| v.registration.version == v2_version && v.unserved.is_empty())
    })
    .await;
    let r = c.run("shop", &2u32, RunOptions::new()).await.unwrap();
    assert_eq!(r.version.as_deref(), Some(&*v2_version));
    assert_eq!(r.status, RunStatus::Completed, "{r}");
    // A label that looks like a hash is refused: it could squat a real one.
    let squat = shop("v9", &["a"], &ledger, watch::channel(true).1).version("0123456789abcdef");
    let err = Worker::builder()
        .nats(NatsOptions::new(server.url()))
        .flow(squat)
        .start()
        .await
        .unwrap_err();
    assert!(err.to_string().contains("looks like a definition hash"), "{err}");
    for w in [old, part, rest] {
        w.shutdown().await;
    }
}

#[derive(serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
struct Order {
    id: String,
    amount: u64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_input_of_the_wrong_shape_is_refused_before_a_run_exists() {
    let server = NatsServer::start();
    let node = node(&server).await;
    let ledger = Ledger::default();
    let log = ledger.clone();
    let flow = create::<Order>("order")
        .step("charge", move |ctx: StepContext<Order>| {
            let log = log.clone();
            async move {
                log.log(format!("charge {} {}", ctx.input.id, ctx.input.amount));
                Ok(())
            }
        })
        .input_schema();
    let version = flow.definition().version();
    let worker = Worker::builder().nats(NatsOptions::new(server.url())).flow(flow).start().await;
    let worker = worker.unwrap();
    served_by(&node, "order", &version, 1).await;
    let c = client(&server).await;

    // A string for a number, a missing field, no input at all: refused, with where.
    let wrong = serde_json::json!({ "id": "o-1", "amount": "ten" });
    let err = c.start("order", &wrong, RunOptions::new()).await.unwrap_err();
    assert_eq!(err.rejection(), Some(orchestrix::Rejection::BadInput), "{err}");
    assert!(err.to_string().contains("/amount"), "{err}");
    let err = c.start("order", &serde_json::json!({ "id": "o-2" }), RunOptions::new()).await;
    assert!(err.unwrap_err().to_string().contains("amount"));
    let err = c.start("order", &(), RunOptions::new()).await.unwrap_err();
    assert_eq!(err.rejection(), Some(orchestrix::Rejection::BadInput), "{err}");
    // Over the NATS server's message size: said so, not "no coordinator".
    let huge = "x".repeat(2 * 1024 * 1024);
    let err = c.start("order", &huge, RunOptions::new()).await.unwrap_err();
    assert_eq!(err.rejection(), Some(orchestrix::Rejection::BadInput), "{err}");
    assert!(err.to_string().contains("takes messages of at most"), "{err}");
    // A flow name that is a subject wildcard is refused, not sent.
    let err = c.start(">", &1u32, RunOptions::new()).await.unwrap_err();
    assert_eq!(err.rejection(), Some(orchestrix::Rejection::BadRequest), "{err}");
    // From the CLI too: the reason, and exit code 2 (a usage error).
    let out = tokio::process::Command::new(orchestrix_integration_tests::built("orchestrix"))
        .args(["--nats", &server.url(), "run", "order", "--input", r#"{"id":"o-3","amount":-1}"#])
        .env("NO_COLOR", "1")
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("does not match flow `order`'s input type"), "{stderr}");
    assert!(stderr.contains("/amount"), "{stderr}");

    // The right shape runs; nothing was created for the others.
    let ok = serde_json::json!({ "id": "o-4", "amount": 12 });
    let report = c.run("order", &ok, RunOptions::new()).await.unwrap();
    assert_eq!(report.status, RunStatus::Completed, "{report}");
    assert_eq!(ledger.lines(), ["charge o-4 12"]);
    let runs = c.list(orchestrix::ListFilter::new(None, Some("order".into()), 10)).await.unwrap();
    assert_eq!(runs.len(), 1, "{runs:?}");
    worker.shutdown().await;
}
