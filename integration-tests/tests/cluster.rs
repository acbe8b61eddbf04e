//! A 3-node NATS cluster with replicated JetStream: one node killed mid-load loses nothing.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use orchestrix::{RunOptions, RunStatus, StepContext, Worker};
use orchestrix_coordinator::flowfile;
use orchestrix_coordinator::jetstream::JetStreamStoreOptions;
use orchestrix_coordinator::nats::{NatsBusOptions, Node, NodeStore};
use orchestrix_integration_tests::NatsCluster;
use orchestrix_worker::NatsOptions;
use uuid::Uuid;

const SECS: Duration = Duration::from_secs(1);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_mid_load_loses_nothing() {
    let mut cluster = NatsCluster::start(3);
    let urls = cluster.urls();
    let conn = NatsOptions::new(urls.clone()).connect().await.unwrap();
    let toml = "[[flow]]\nname = \"c\"\n[[flow.step]]\nname = \"one\"\n[[flow.step]]\nname = \"slow\"\n[[flow.step]]\nname = \"three\"\n";
    let flows = flowfile::parse(toml).unwrap();
    // JetStream needs its meta leader before buckets can be made: retry a while.
    let deadline = tokio::time::Instant::now() + 60 * SECS;
    let node = loop {
        let started = Node::builder()
            .bus_options(NatsBusOptions::default().heartbeat_timeout(5 * SECS))
            .store(NodeStore::JetStream(JetStreamStoreOptions::default().replicas(3)))
            .flows(flows.clone())
            .registry(false)
            .events(false)
            .start(conn.clone())
            .await;
        match started {
            Ok(n) => break n,
            Err(e) => {
                assert!(tokio::time::Instant::now() < deadline, "no JetStream on the cluster: {e}");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    };
    let coordinator = node.coordinator();

    let calls: Arc<Mutex<HashMap<(Uuid, &'static str), u32>>> = Arc::default();
    let rec = |what: &'static str| {
        let calls = calls.clone();
        move |run: Uuid| *calls.lock().unwrap().entry((run, what)).or_default() += 1
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
    let ids: Vec<Uuid> = handles.iter().map(|h| h.run_id()).collect();
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
