//! A 3-node NATS cluster with replicated JetStream: one node killed mid-load loses nothing.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use orchestrix::{RunId, RunOptions, RunStatus, StepContext, Worker};
use orchestrix_coordinator::flowfile;
use orchestrix_coordinator::jetstream::JetStreamStoreOptions;
use orchestrix_coordinator::nats::{NatsBusOptions, Node, NodeStore};
use orchestrix_integration_tests::NatsCluster;
use orchestrix_worker::NatsOptions;

const SECS: Duration = Duration::from_secs(1);

/// A coordinator on the cluster (R3 buckets) serving the flows of `toml`.
/// JetStream needs its meta leader before buckets can be made: retried a while.
async fn node_on(urls: &str, toml: &str) -> Node {
    let conn = NatsOptions::new(urls).connect().await.unwrap();
    let flows = flowfile::parse(toml).unwrap();
    let deadline = tokio::time::Instant::now() + 60 * SECS;
    loop {
        let started = Node::builder()
            .bus_options(NatsBusOptions::default().heartbeat_timeout(5 * SECS))
            .store(NodeStore::JetStream(JetStreamStoreOptions::default().replicas(3)))
            .flows(flows.clone())
            .registry(false)
            .events(false)
            .start(conn.clone())
            .await;
        match started {
            Ok(n) => return n,
            Err(e) => {
                assert!(tokio::time::Instant::now() < deadline, "no JetStream on the cluster: {e}");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_mid_load_loses_nothing() {
    let mut cluster = NatsCluster::start(3);
    let urls = cluster.urls();
    let toml = "[[flow]]\nname = \"c\"\n[[flow.step]]\nname = \"one\"\n[[flow.step]]\nname = \"slow\"\n[[flow.step]]\nname = \"three\"\n";
    let node = node_on(&urls, toml).await;
    let coordinator = node.coordinator();

    let calls: Arc<Mutex<HashMap<(RunId, &'static str), u32>>> = Arc::default();
    let rec = |what: &'static str| {
        let calls = calls.clone();
        move |run: RunId| *calls.lock().unwrap().entry((run, what)).or_default() += 1
    };
    let (r1, r2, r3) = (rec("one"), rec("slow"), rec("three"));
    let worker = Worker::builder()
        .nats(NatsOptions::new(urls))
        .heartbeat_interval(Duration::from_millis(200))
        .steps::<u32>("c", move |f| {
            f.step("one", move |ctx: StepContext<u32>| {
                r1(ctx.run_id());
                async { Ok(()) }
            })
            .step("slow", move |ctx| {
                r2(ctx.run_id());
                async {
                    tokio::time::sleep(Duration::from_millis(1500)).await;
                    Ok(())
                }
            })
            .step("three", move |ctx| {
                r3(ctx.run_id());
                async move { Ok(ctx.input) }
            })
        })
        .start()
        .await
        .unwrap();

    let mut handles = Vec::new();
    for i in 0..50u32 {
        handles.push(coordinator.start("c", &i, RunOptions::new()).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The node the clients first connected to goes down: they move to the others.
    cluster.nodes[0].kill();
    let ids: Vec<RunId> = handles.iter().map(|h| h.run_id()).collect();
    let reports = futures::future::join_all(handles.into_iter().map(|h| async move {
        tokio::time::timeout(120 * SECS, h.report()).await.unwrap().unwrap()
    }))
    .await;
    for (id, r) in ids.iter().zip(&reports) {
        assert_eq!(r.status, RunStatus::Completed, "{r}");
        for what in ["one", "three"] {
            assert_eq!(
                calls.lock().unwrap().get(&(*id, what)).copied(),
                Some(1),
                "{id}: {what} once"
            );
        }
        // `slow` may have been re-sent while its node was down, but the worker
        // ran it once: the redelivery was answered from its cache.
        assert_eq!(calls.lock().unwrap().get(&(*id, "slow")).copied(), Some(1), "{id}: slow once");
        // And the finished run is in the replicated history.
        assert_eq!(coordinator.status(*id).await.unwrap().unwrap().status, RunStatus::Completed);
    }
    worker.shutdown().await;
}

/// Parallel groups and a concurrency key on the 3-node cluster, with two
/// coordinators and two worker replicas, a node killed mid-way: one key's
/// runs still take turns in order, both members of the group run once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keys_queue_and_a_group_survive_a_node_killed() {
    let mut cluster = NatsCluster::start(3);
    let urls = cluster.urls();
    let toml = "[[flow]]\nname = \"k\"\n[[flow.step]]\nname = \"a\"\ngroup = \"g\"\n[[flow.step]]\nname = \"b\"\ngroup = \"g\"\n[[flow.step]]\nname = \"c\"\n";
    let mut nodes = Vec::new();
    for _ in 0..2 {
        nodes.push(node_on(&urls, toml).await);
    }
    let ledger: Arc<Mutex<Vec<String>>> = Arc::default();
    let mut workers = Vec::new();
    for _ in 0..2 {
        let log = |what: &'static str| {
            let ledger = ledger.clone();
            move |ctx: StepContext<u32>| {
                ledger.lock().unwrap().push(format!("{what} {}", ctx.input));
                async {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    Ok(())
                }
            }
        };
        let (a, b, c) = (log("a"), log("b"), log("c"));
        let worker = Worker::builder()
            .nats(NatsOptions::new(urls.clone()))
            .heartbeat_interval(Duration::from_millis(200))
            .steps::<u32>("k", move |f| f.step("a", a).step("b", b).step("c", c))
            .start()
            .await
            .unwrap();
        workers.push(worker);
    }
    let mut handles = Vec::new();
    for i in 0..20u32 {
        let c = nodes[i as usize % 2].coordinator();
        // A start can fail while the cluster fails over: sent again with
        // its idempotency key, as a client does, it never makes two runs.
        let opts = RunOptions::new().concurrency_key("account:1").key(format!("cluster-{i}"));
        let deadline = tokio::time::Instant::now() + 60 * SECS;
        handles.push(loop {
            match c.start("k", &i, opts.clone()).await {
                Ok(h) => break h,
                Err(e) => assert!(tokio::time::Instant::now() < deadline, "{e}"),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        });
        if i == 3 {
            cluster.nodes[0].kill();
        }
    }
    let ids: Vec<RunId> = handles.iter().map(|h| h.run_id()).collect();
    for h in handles {
        let r = tokio::time::timeout(180 * SECS, h.report()).await.unwrap().unwrap();
        assert_eq!(r.status, RunStatus::Completed, "{r}");
    }
    assert_eq!(ids.len(), 20);
    let lines = ledger.lock().unwrap().clone();
    // Each run's steps once, and one run at a time, in the order started:
    // its two group members (in either order), then its last step.
    let mut expect = Vec::new();
    for i in 0..20u32 {
        expect.push(format!("a|b {i}"));
        expect.push(format!("a|b {i}"));
        expect.push(format!("c {i}"));
    }
    let seen: Vec<String> = lines
        .iter()
        .map(|l| match l.split_once(' ') {
            Some(("a" | "b", n)) => format!("a|b {n}"),
            _ => l.clone(),
        })
        .collect();
    assert_eq!(seen, expect, "{lines:?}");
    for w in workers {
        w.shutdown().await;
    }
}

/// Production shape, the fault that once got steps started twice: 3 nodes,
/// 3 `orchestrix serve` coordinators, 3 worker replicas on the other nodes,
/// runs whose steps take seconds. The node the coordinators of the runs
/// are connected to is frozen (SIGSTOP) twice for 8 s: their
/// heartbeats lapse, they are presumed dead and fenced, then come back to
/// find their own runs unheld while those runs' actors still wait on a
/// step. Every run must end, and no step's action may run twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_node_under_every_coordinator_starts_no_step_twice() {
    use orchestrix::Client;
    use orchestrix_integration_tests::{ChildProcess, Ledger, built};
    use orchestrix_proto::Subjects;

    let cluster = NatsCluster::start_monitored(3);
    // The node to freeze leads nothing: not JetStream's meta group (frozen,
    // it would stall every JetStream request until a new one is elected),
    // and, further down, no stream either.
    let deadline = tokio::time::Instant::now() + 60 * SECS;
    let meta = loop {
        if let Some(leader) = cluster.meta_leader(0).await {
            break leader;
        }
        assert!(tokio::time::Instant::now() < deadline, "no JetStream meta leader");
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let frozen = (0..3).find(|i| meta != format!("n{i}")).unwrap();
    let [a, b] = [(frozen + 1) % 3, (frozen + 2) % 3];
    let toml = "[[flow]]\nname = \"pay\"\n[[flow.step]]\nname = \"charge\"\ncompensable = true\n[[flow.step]]\nname = \"notify\"\ncompensable = true\n";
    let flows = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(flows.path(), toml).unwrap();
    let on_frozen = cluster.nodes[frozen].url();
    let others = format!("{},{}", cluster.nodes[a].url(), cluster.nodes[b].url());

    let ledger = Ledger::default();
    let mut workers = Vec::new();
    for i in 0..3 {
        let (l1, l2, l3, l4) = (ledger.clone(), ledger.clone(), ledger.clone(), ledger.clone());
        let deadline = tokio::time::Instant::now() + 60 * SECS;
        let worker = loop {
            let (l1, l2, l3, l4) = (l1.clone(), l2.clone(), l3.clone(), l4.clone());
            let started = Worker::builder()
                .nats(NatsOptions::new(others.clone()))
                .heartbeat_interval(Duration::from_millis(200))
                .steps::<u32>("pay", move |f| {
                    f.step("charge", move |ctx: StepContext<u32>| {
                        l1.log(format!("charge {}", ctx.run_id()));
                        l1.log(format!("charge on {i} {}", ctx.run_id()));
                        async {
                            tokio::time::sleep(Duration::from_millis(1_500)).await;
                            Ok(())
                        }
                    })
                    .compensate("charge", move |ctx| {
                        l2.log(format!("refund {}", ctx.run_id()));
                        async { Ok(()) }
                    })
                    .step("notify", move |ctx| {
                        l3.log(format!("notify {}", ctx.run_id()));
                        l3.log(format!("notify on {i} {}", ctx.run_id()));
                        async {
                            tokio::time::sleep(Duration::from_millis(1_000)).await;
                            Ok(())
                        }
                    })
                    .compensate("notify", move |ctx| {
                        l4.log(format!("unnotify {}", ctx.run_id()));
                        async { Ok(()) }
                    })
                })
                .start()
                .await;
            match started {
                Ok(w) => break w,
                // The registry's bucket needs JetStream's meta leader.
                Err(e) => assert!(tokio::time::Instant::now() < deadline, "{e}"),
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        };
        workers.push(worker);
    }
    // Two coordinators of `pay` on the node to freeze, and a third elsewhere
    // that serves another flow: it stays in touch during the freeze, presumes the
    // other two dead and fences their journals, but does not claim their
    // runs (not its flow). So they come back to find their own runs unheld
    // while those runs' actors still wait on a step.
    let bystander = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(bystander.path(), "[[flow]]\nname = \"other\"\n[[flow.step]]\nname = \"x\"\n")
        .unwrap();
    let serve = |nats: &str, flows: &std::path::Path| {
        let flows = flows.to_str().unwrap();
        let args = [
            "--nats",
            nats,
            "serve",
            "--store",
            "jetstream",
            "--replicas",
            "3",
            "--flows",
            flows,
            "--ack-timeout",
            "1s",
            "--heartbeat-timeout",
            "2s",
        ];
        ChildProcess::spawn_capturing_stderr(&built("orchestrix"), &args, &[], &[])
    };
    let elsewhere = cluster.nodes[a].url();
    let conn = NatsOptions::new(others.clone()).connect().await.unwrap();
    let c = Client::new(conn.clone(), Subjects::default()).request_timeout(3 * SECS);
    let js = async_nats::jetstream::new(conn.clone());
    // The bystander first: it makes the buckets, the others find them.
    let mut coordinators = vec![serve(&elsewhere, bystander.path())];
    heartbeats(&js, 1, &coordinators).await;
    coordinators.push(serve(&on_frozen, flows.path()));
    coordinators.push(serve(&on_frozen, flows.path()));
    heartbeats(&js, 3, &coordinators).await;
    // Every stream led from elsewhere than the node to freeze, so that while it is
    // frozen the rest of the cluster keeps serving them all (heartbeats
    // expire, the bystander fences) rather than electing new leaders first.
    leaders_off(&js, &conn, frozen).await;
    // Rounds of runs started every 150 ms, so that a freeze finds them at
    // every point, each round ending in a freeze, until a freeze got the
    // coordinators fenced (whether the cluster lets the bystander act
    // while a node is frozen is up to the cluster: some rounds it cannot).
    let fences = || {
        coordinators
            .iter()
            .flat_map(|p| p.stderr_lines())
            .filter(|l| l.contains("took this coordinator's runs over"))
            .count()
    };
    let mut ids = Vec::new();
    let mut retried = Vec::new();
    let mut freezes = 0;
    for i in 0..64u32 {
        let deadline = tokio::time::Instant::now() + 30 * SECS;
        ids.push(loop {
            match c.start("pay", &i, RunOptions::new().key(format!("frozen-{i}"))).await {
                Ok(id) => break id,
                Err(e) => {
                    assert!(tokio::time::Instant::now() < deadline, "{e}");
                    retried.push(format!("frozen-{i}: {e}"));
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        });
        tokio::time::sleep(Duration::from_millis(150)).await;
        if i % 12 == 8 {
            if freezes == 6 || fences() > 0 {
                break;
            }
            let pid = cluster.nodes[frozen].pid().unwrap().to_string();
            std::process::Command::new("kill").args(["-STOP", &pid]).status().unwrap();
            tokio::time::sleep(8 * SECS).await;
            std::process::Command::new("kill").args(["-CONT", &pid]).status().unwrap();
            freezes += 1;
        }
    }
    // What happened to a run: the starts that were sent again, the ledger,
    // and what the coordinators said about it (and about fences).
    let story = |id: orchestrix::RunId| {
        let run = id.to_string();
        let logs: Vec<String> = coordinators
            .iter()
            .enumerate()
            .flat_map(|(i, p)| p.stderr_lines().into_iter().map(move |l| format!("c{i}: {l}")))
            .filter(|l| l.contains(&run) || l.contains("took this") || l.contains("fence"))
            .collect();
        format!("starts sent again: {retried:?}\nledger: {:#?}\n{logs:#?}", ledger.about(id))
    };
    for id in &ids {
        let r = match tokio::time::timeout(120 * SECS, c.wait(*id)).await.unwrap() {
            Ok(r) => r,
            Err(e) => panic!("{id}: {e}\n{}", story(*id)),
        };
        assert!(r.status.is_terminal(), "{r}");
        let charged = ledger.count(&format!("charge {id}"));
        let notified = ledger.count(&format!("notify {id}"));
        assert!(charged <= 1, "charge ran {charged} times\n{r}\n{}", story(*id));
        assert!(notified <= 1, "notify ran {notified} times\n{r}\n{}", story(*id));
        if r.status == RunStatus::Completed {
            assert_eq!((charged, notified), (1, 1), "{r}");
        }
    }
    // Late duplicates would come within a few takeover scans.
    tokio::time::sleep(3 * SECS).await;
    for id in &ids {
        assert!(ledger.count(&format!("charge {id}")) <= 1, "{}", story(*id));
        assert!(ledger.count(&format!("notify {id}")) <= 1, "{}", story(*id));
    }
    let logs: Vec<String> = coordinators.iter().flat_map(|p| p.stderr_lines()).collect();
    let said = |what: &str| logs.iter().filter(|l| l.contains(what)).count();
    let fenced = said("took this coordinator's runs over");
    eprintln!(
        "freezes: {freezes}, runs: {}, fenced: {fenced}, actors let go: {}, resumed: {}",
        ids.len(),
        said("letting go"),
        said("resuming a run"),
    );
    // The fault did what it is here for.
    assert!(fenced >= 1, "no coordinator was fenced: {logs:#?}");
    drop(coordinators);
    for w in workers {
        w.shutdown().await;
    }
}

/// Waits until `n` coordinators have a heartbeat.
async fn heartbeats(
    js: &async_nats::jetstream::Context,
    n: usize,
    coordinators: &[orchestrix_integration_tests::ChildProcess],
) {
    use futures::StreamExt;
    // Making the buckets on a fresh cluster may take a while (a coordinator
    // tries again for up to 2 min).
    let deadline = tokio::time::Instant::now() + 150 * SECS;
    loop {
        let beats = match js.get_key_value("orchestrix_coordinators").await {
            Ok(kv) => match kv.keys().await {
                Ok(keys) => keys.filter_map(|k| async { k.ok() }).count().await,
                Err(_) => 0,
            },
            Err(_) => 0,
        };
        if beats >= n {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{beats} of {n} coordinators up: {:?}",
            coordinators.iter().map(|p| p.stderr_lines()).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Moves the leader of every stream off server `node` (JetStream's
/// leader step-down, with another server preferred).
async fn leaders_off(js: &async_nats::jetstream::Context, conn: &async_nats::Client, node: usize) {
    let (node, preferred) = (format!("n{node}"), format!("n{}", (node + 1) % 3));
    use futures::StreamExt;
    let names: Vec<String> = js.stream_names().filter_map(|n| async { n.ok() }).collect().await;
    let deadline = tokio::time::Instant::now() + 60 * SECS;
    for name in names {
        loop {
            let mut stream = js.get_stream(&name).await.unwrap();
            let info = stream.info().await.unwrap();
            let cluster = info.cluster.as_ref().expect("a clustered stream");
            let leader = cluster.leader.clone().unwrap_or_default();
            let current = cluster.replicas.iter().all(|r| r.current);
            if !leader.is_empty() && leader != node && current {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "{name} stays led by {leader}");
            if leader == node {
                let body = format!("{{\"placement\":{{\"preferred\":\"{preferred}\"}}}}");
                let _ = conn
                    .request(format!("$JS.API.STREAM.LEADER.STEPDOWN.{name}"), body.into())
                    .await;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}
