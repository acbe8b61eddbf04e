//! Operating runs over NATS: cancel, against a real `nats-server`, with a
//! real worker that holds the step being cancelled.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use orchestrix::{Client, RunOptions, RunStatus, StepContext, StepStatus, Worker, create};
use orchestrix_coordinator::nats::{NatsBusOptions, Node};
use orchestrix_integration_tests::{Ledger, NatsServer, eventually};
use orchestrix_proto::Subjects;
use orchestrix_worker::NatsOptions;

const SECS: Duration = Duration::from_secs(1);
const MS: Duration = Duration::from_millis(1);

async fn node(server: &NatsServer) -> Node {
    let conn = NatsOptions::new(server.url()).connect().await.unwrap();
    let bus = NatsBusOptions::default().ack_timeout(500 * MS).heartbeat_timeout(2 * SECS);
    Node::builder().bus_options(bus).takeover_every(500 * MS).start(conn).await.unwrap()
}

async fn client(server: &NatsServer) -> Client {
    let conn = NatsOptions::new(server.url()).connect().await.unwrap();
    Client::new(conn, Subjects::default()).request_timeout(3 * SECS)
}

/// `a`, `b` complete; `c` holds until cancelled. Logs `{what} {step} {run}`.
fn shop(ledger: &Ledger) -> orchestrix::Flow<u32> {
    let mut flow = create::<u32>("shop");
    for step in ["a", "b", "c"] {
        let (run, undo) = (ledger.clone(), ledger.clone());
        flow = flow.step_with(
            step,
            move |ctx: StepContext<u32>| {
                let run = run.clone();
                async move {
                    run.log(format!("run {} {}", ctx.step(), ctx.run_id()));
                    if ctx.step() == "c" {
                        struct Dropped(Ledger, String);
                        impl Drop for Dropped {
                            fn drop(&mut self) {
                                self.0.log(format!("dropped c {}", self.1));
                            }
                        }
                        let _guard = Dropped(run.clone(), ctx.run_id().to_string());
                        std::future::pending::<()>().await;
                    }
                    Ok(())
                }
            },
            move |o| {
                o.compensate(move |ctx| {
                    let undo = undo.clone();
                    async move {
                        undo.log(format!("undo {} {}", ctx.step(), ctx.run_id()));
                        Ok(())
                    }
                })
            },
        );
    }
    flow
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_stops_the_workers_handler_and_rolls_back_in_reverse() {
    let server = NatsServer::start();
    let node = node(&server).await;
    let ledger = Ledger::default();
    let flow = shop(&ledger);
    let version = flow.definition().version();
    // Two replicas: the cancel reaches whichever holds the step.
    let w1 = Worker::builder()
        .nats(NatsOptions::new(server.url()))
        .flow(flow.clone())
        .start()
        .await
        .unwrap();
    let w2 =
        Worker::builder().nats(NatsOptions::new(server.url())).flow(flow).start().await.unwrap();
    let registry = node.coordinator().registry().unwrap();
    eventually(10 * SECS, "the workers to register", || {
        registry
            .versions()
            .iter()
            .any(|v| v.registration.version == version && v.workers.len() == 2)
    })
    .await;
    let c = client(&server).await;
    let id = c.start("shop", &1u32, RunOptions::new()).await.unwrap();
    eventually(10 * SECS, "step c to start", || ledger.count(&format!("run c {id}")) == 1).await;

    c.cancel(id, "ops@test", Some("customer asked")).await.unwrap();
    let report = tokio::time::timeout(30 * SECS, c.wait(id)).await.unwrap().unwrap();
    assert_eq!(report.status, RunStatus::Cancelled, "{report}");
    // `c` was started by a worker: it may have acted, so it is compensated too.
    let statuses: Vec<_> = report.steps.iter().map(|s| s.status).collect();
    assert_eq!(statuses, [StepStatus::Compensated; 3], "{report}");
    let undo: Vec<String> = ["c", "b", "a"].iter().map(|s| format!("undo {s} {id}")).collect();
    let log: Vec<String> = ledger.about(id).into_iter().filter(|l| l.starts_with("undo")).collect();
    assert_eq!(log, undo, "reverse order");
    eventually(5 * SECS, "the worker to drop the handler", || {
        ledger.count(&format!("dropped c {id}")) == 1
    })
    .await;
    assert_eq!(report.actions[0].by, "ops@test");
    assert_eq!(report.actions[0].reason.as_deref(), Some("customer asked"));

    // Again: harmless. A finished run that completed: refused. Unknown: refused.
    c.cancel(id, "ops@test", None).await.unwrap();
    let done = create::<u32>("quick").step("x", |_ctx| async { Ok(()) });
    let w3 =
        Worker::builder().nats(NatsOptions::new(server.url())).flow(done).start().await.unwrap();
    let deadline = tokio::time::Instant::now() + 10 * SECS;
    let finished = loop {
        match c.run("quick", &1u32, RunOptions::new()).await {
            Ok(r) => break r,
            Err(e) => assert!(tokio::time::Instant::now() < deadline, "{e}"),
        }
        tokio::time::sleep(100 * MS).await;
    };
    let err = c.cancel(finished.run_id, "ops", None).await.unwrap_err();
    assert!(err.to_string().contains("already finished: completed"), "{err}");
    let err = c.cancel(uuid::Uuid::now_v7(), "ops", None).await.unwrap_err();
    assert!(err.to_string().contains("unknown run"), "{err}");
    for w in [w1, w2, w3] {
        w.shutdown().await;
    }
}
