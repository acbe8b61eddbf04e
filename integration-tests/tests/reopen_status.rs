//! A reopened (resumed) failed rollback reads as live while it runs, on
//! every coordinator and through a client: its old history entry (the end
//! it had) does not hide it. The JetStream store keeps both until the run
//! ends again.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use orchestrix::{Client, RunOptions, RunStatus, StepContext, Worker, create};
use orchestrix_coordinator::nats::{NatsBusOptions, Node};
use orchestrix_integration_tests::NatsServer;
use orchestrix_proto::Subjects;
use orchestrix_worker::NatsOptions;

const SECS: Duration = Duration::from_secs(1);
const MS: Duration = Duration::from_millis(1);

async fn node(server: &NatsServer) -> Node {
    let conn = NatsOptions::new(server.url()).connect().await.unwrap();
    let bus = NatsBusOptions::default().ack_timeout(500 * MS).heartbeat_timeout(2 * SECS);
    Node::builder().bus_options(bus).takeover_every(500 * MS).start(conn).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_rollback_does_not_read_as_its_old_end() {
    let server = NatsServer::start();
    let n1 = node(&server).await;
    let n2 = node(&server).await;
    // 0: refund fails; 1: refund takes 8 s then succeeds.
    let mode = Arc::new(AtomicU8::new(0));
    let m = mode.clone();
    let flow = create::<u32>("refund")
        .step_with(
            "charge",
            |_: StepContext<u32>| async { Ok(()) },
            move |o| {
                o.compensation_retry(orchestrix::RetryPolicy::new()).compensate(move |_ctx| {
                    let mode = m.load(Ordering::SeqCst);
                    async move {
                        if mode == 0 {
                            return Err(orchestrix::StepError::retryable("refund API down"));
                        }
                        tokio::time::sleep(8 * SECS).await;
                        Ok(())
                    }
                })
            },
        )
        .step("ship", |_| async { Err::<(), _>(orchestrix::StepError::permanent("no")) });
    let worker =
        Worker::builder().nats(NatsOptions::new(server.url())).flow(flow).start().await.unwrap();
    let conn = NatsOptions::new(server.url()).connect().await.unwrap();
    let c = Client::new(conn, Subjects::default()).request_timeout(3 * SECS);
    let deadline = tokio::time::Instant::now() + 10 * SECS;
    let report = loop {
        match c.run("refund", &1u32, RunOptions::new()).await {
            Ok(r) => break r,
            Err(e) => assert!(tokio::time::Instant::now() < deadline, "{e}"),
        }
        tokio::time::sleep(100 * MS).await;
    };
    let id = report.run_id;
    assert_eq!(report.status, RunStatus::CompensationFailed, "{report}");
    mode.store(1, Ordering::SeqCst);
    c.resume(id, "oncall").await.unwrap();
    let mut seen = Vec::new();
    for _ in 0..25 {
        let a = n1.coordinator().status(id).await.unwrap().map(|r| r.status);
        let b = n2.coordinator().status(id).await.unwrap().map(|r| r.status);
        let l = c.status(id).await.map(|r| r.status).ok();
        seen.push((a, b, l));
        tokio::time::sleep(250 * MS).await;
    }
    // Once the resumed run's record is checkpointed (a second or two),
    // every reader must see it live; the rollback runs 8 s.
    let stale: Vec<_> = seen[12..]
        .iter()
        .filter(|(a, b, l)| [a, b, l].iter().any(|s| **s == Some(RunStatus::CompensationFailed)))
        .collect();
    worker.shutdown().await;
    assert!(stale.is_empty(), "old end read while the resumed rollback runs: {seen:?}");
}
