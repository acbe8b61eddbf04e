//! Concurrency limits over NATS, against a real `nats-server` with the
//! JetStream store: one key's runs take turns in arrival order across two
//! coordinator processes, one of them SIGKILLed mid-way; a step's
//! `max_in_flight` holds across 100 concurrent runs and two workers.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use orchestrix::{Client, RunOptions, RunStatus, StepContext, Worker, create};
use orchestrix_coordinator::jetstream::JetStreamStoreOptions;
use orchestrix_coordinator::nats::{NatsBusOptions, Node, NodeStore};
use orchestrix_integration_tests::{ChildProcess, Ledger, NatsServer, built, workers_registered};
use orchestrix_proto::Subjects;
use orchestrix_worker::NatsOptions;

const SECS: Duration = Duration::from_secs(1);
const MS: Duration = Duration::from_millis(1);

async fn client(server: &NatsServer) -> Client {
    let conn = NatsOptions::new(server.url()).connect().await.unwrap();
    Client::new(conn, Subjects::default()).request_timeout(5 * SECS).start_retry_for(30 * SECS)
}

/// Starts `flow`'s worker and waits until a coordinator can run it.
async fn serve(server: &NatsServer, flow: orchestrix::Flow<u32>) -> Worker {
    Worker::builder().nats(NatsOptions::new(server.url())).flow(flow).start().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_keys_runs_take_turns_in_order_across_coordinators_one_killed() {
    let server = NatsServer::start();
    let url = server.url();
    let coordinator = || ChildProcess::spawn(&built("orchestrix"), &["--nats", &url, "serve"]);
    let mut first = coordinator();
    let _second = coordinator();
    let ledger = Ledger::default();
    let l = ledger.clone();
    let flow = create::<u32>("account").step("work", move |ctx: StepContext<u32>| {
        let l = l.clone();
        async move {
            l.log(format!("start {}", ctx.input));
            tokio::time::sleep(MS * 40).await;
            l.log(format!("end {}", ctx.input));
            Ok(())
        }
    });
    let worker = serve(&server, flow).await;
    let c = client(&server).await;
    // Fifty runs on one key, started one after another (each start is
    // answered once the run has its place in the queue), with a key each so
    // a start retried after the kill never makes a second run.
    let mut runs = Vec::new();
    for n in 0..50u32 {
        let opts = RunOptions::new().concurrency_key("account:42").key(format!("limits-{n}"));
        let deadline = tokio::time::Instant::now() + 30 * SECS;
        let id = loop {
            match c.start("account", &n, opts.clone()).await {
                Ok(id) => break id,
                Err(e) => assert!(tokio::time::Instant::now() < deadline, "{e}"),
            }
            tokio::time::sleep(100 * MS).await;
        };
        runs.push(id);
        if n == 10 {
            // The waiting ones are visible as such.
            let filter = orchestrix::ListFilter::new(Some(RunStatus::Queued), None, 100);
            let queued = c.list(filter).await.unwrap();
            assert!(!queued.is_empty(), "no run shows as queued");
            assert!(queued.iter().all(|r| r.flow == "account"));
        }
        if n == 20 {
            // A coordinator dies mid-way: its runs (running or queued) are
            // taken over by the other, in their places.
            first.signal("KILL");
            let _ = first.wait(10 * SECS).await;
        }
    }
    for id in &runs {
        let report = tokio::time::timeout(120 * SECS, c.wait(*id)).await.unwrap().unwrap();
        assert_eq!(report.status, RunStatus::Completed, "{report}");
    }
    let lines = ledger.lines();
    // Never two in flight: every start follows the previous end.
    let mut open = 0;
    for l in &lines {
        if l.starts_with("start") {
            open += 1;
            assert_eq!(open, 1, "two runs of one key at once: {lines:?}");
        } else {
            open -= 1;
        }
    }
    // Each ran once (a worker may not run a step twice for a run taken over
    // mid-step: its outcome is found by asking, not by sending it again),
    // in the order they were started.
    let starts: Vec<u32> =
        lines.iter().filter_map(|l| l.strip_prefix("start ").map(|n| n.parse().unwrap())).collect();
    assert_eq!(starts, (0..50).collect::<Vec<_>>(), "first come, first served");
    worker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_limit_holds_across_runs_and_workers() {
    let server = NatsServer::start();
    let conn = NatsOptions::new(server.url()).connect().await.unwrap();
    let node = Node::builder()
        .bus_options(NatsBusOptions::default())
        .store(NodeStore::JetStream(JetStreamStoreOptions::default()))
        .start(conn)
        .await
        .unwrap();
    // Measured on the worker side, across both workers.
    let (now, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let flow = {
        let (now, most) = (now.clone(), most.clone());
        create::<u32>("fragile").step("prepare", |_| async { Ok(()) }).step_with(
            "call",
            move |_| {
                let (now, most) = (now.clone(), most.clone());
                async move {
                    let at = now.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(at, Ordering::SeqCst);
                    tokio::time::sleep(MS * 20).await;
                    now.fetch_sub(1, Ordering::SeqCst);
                    Ok(())
                }
            },
            |o| o.max_in_flight(2),
        )
    };
    let version = flow.definition().version();
    let workers = [serve(&server, flow.clone()).await, serve(&server, flow).await];
    workers_registered(node.coordinator(), &version, 2).await;
    let c = client(&server).await;
    // A key that cannot be stored is refused at the start, nothing created.
    let empty = RunOptions::new().concurrency_key("");
    let err = c.start("fragile", &0u32, empty).await.unwrap_err();
    assert!(err.to_string().contains("invalid run option: the concurrency key is empty"), "{err}");
    let mut runs = Vec::new();
    for n in 0..100u32 {
        runs.push(c.start("fragile", &n, RunOptions::new()).await.unwrap());
    }
    for id in runs {
        let report = tokio::time::timeout(120 * SECS, c.wait(id)).await.unwrap().unwrap();
        assert_eq!(report.status, RunStatus::Completed, "{report}");
        assert_eq!(report.step("call").unwrap().attempts, 1, "waiting is not failing");
    }
    assert_eq!(most.load(Ordering::SeqCst), 2, "never more than 2 in flight, and 2 reached");
    for w in workers {
        w.shutdown().await;
    }
}
