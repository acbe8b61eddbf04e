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
