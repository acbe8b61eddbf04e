//! Parallel groups over NATS: a real `nats-server`, a coordinator on
//! JetStream, and two worker replicas of the flow. Members run at the same
//! time on the workers, a member failing stops its siblings there, and the
//! rollback is reverse between stages and concurrent inside a group.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use orchestrix::{
    Client, RunOptions, RunStatus, StepContext, StepError, StepStatus, Worker, create,
};
use orchestrix_coordinator::jetstream::JetStreamStoreOptions;
use orchestrix_coordinator::nats::{NatsBusOptions, Node, NodeStore};
use orchestrix_integration_tests::{Ledger, NatsServer, workers_registered};
use orchestrix_proto::Subjects;
use orchestrix_worker::NatsOptions;
use serde::{Deserialize, Serialize};

const SECS: Duration = Duration::from_secs(1);
const MS: Duration = Duration::from_millis(1);

#[derive(Serialize, Deserialize, Clone, Copy)]
struct Order {
    id: u32,
    /// `card` fails for good (after `wh-slow` has started, and before it ends).
    decline: bool,
}

/// `check`, then group `reserve` (`wh-fast`, `wh-slow`, `card`), then `ship`.
/// Every handler logs `run|done|undo|undone {step} {order}` to the ledger.
fn order_flow(ledger: &Ledger) -> orchestrix::Flow<Order> {
    let handler = |name: &'static str, ms: u32, ledger: Ledger| {
        move |ctx: StepContext<Order>| {
            let ledger = ledger.clone();
            async move {
                let id = ctx.input.id;
                ledger.log(format!("run {name} {id}"));
                if name == "card" && ctx.input.decline {
                    tokio::time::sleep(200 * MS).await;
                    ledger.log(format!("done {name} {id}"));
                    return Err(StepError::permanent("card declined"));
                }
                tokio::time::sleep(MS * ms).await;
                ledger.log(format!("done {name} {id}"));
                Ok(id)
            }
        }
    };
    let undo = |name: &'static str, ledger: Ledger| {
        move |o: orchestrix::StepOptions<Order>| {
            o.compensate(move |ctx: StepContext<Order>| {
                let ledger = ledger.clone();
                async move {
                    let id = ctx.input.id;
                    ledger.log(format!("undo {name} {id}"));
                    tokio::time::sleep(100 * MS).await;
                    ledger.log(format!("undone {name} {id}"));
                    Ok(())
                }
            })
        }
    };
    let l = ledger.clone();
    create::<Order>("order")
        .step_with("check", handler("check", 10, l.clone()), undo("check", l.clone()))
        .parallel("reserve", |g| {
            g.step_with("wh-fast", handler("wh-fast", 50, l.clone()), undo("wh-fast", l.clone()))
                .step_with(
                    "wh-slow",
                    handler("wh-slow", 4000, l.clone()),
                    undo("wh-slow", l.clone()),
                )
                .step_with("card", handler("card", 300, l.clone()), undo("card", l.clone()))
        })
        .step_with("ship", handler("ship", 10, l.clone()), undo("ship", l.clone()))
}

/// Index of `line` in the ledger's lines about order `id`.
fn pos(ledger: &Ledger, line: &str) -> usize {
    let lines = ledger.lines();
    lines.iter().position(|l| l == line).unwrap_or_else(|| panic!("no `{line}` in {lines:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_run_on_several_workers_and_roll_back_in_order() {
    let server = NatsServer::start();
    let conn = NatsOptions::new(server.url()).connect().await.unwrap();
    let bus = NatsBusOptions::default().ack_timeout(500 * MS).heartbeat_timeout(2 * SECS);
    let node = Node::builder()
        .bus_options(bus)
        .store(NodeStore::JetStream(JetStreamStoreOptions::default()))
        .start(conn)
        .await
        .unwrap();
    let ledger = Ledger::default();
    let flow = order_flow(&ledger);
    let version = flow.definition().version();
    let mut workers = Vec::new();
    for _ in 0..2 {
        let w = Worker::builder().nats(NatsOptions::new(server.url())).flow(flow.clone());
        workers.push(w.start().await.unwrap());
    }
    workers_registered(node.coordinator(), &version, 2).await;
    let conn = NatsOptions::new(server.url()).connect().await.unwrap();
    let client = Client::new(conn, Subjects::default()).request_timeout(5 * SECS);

    // Ten orders at once, half declined.
    let mut runs = Vec::new();
    for id in 0..10 {
        let order = Order { id, decline: id % 2 == 1 };
        runs.push((order, client.start("order", &order, RunOptions::new()).await.unwrap()));
    }
    for (order, run) in runs {
        let report = tokio::time::timeout(60 * SECS, client.wait(run)).await.unwrap().unwrap();
        let id = order.id;
        let p = |line: String| pos(&ledger, &line);
        // The group's members all started before any of them ended.
        let lines = ledger.lines();
        let first_end = ["wh-fast", "wh-slow", "card"]
            .iter()
            .filter_map(|s| lines.iter().position(|l| *l == format!("done {s} {id}")))
            .min()
            .unwrap();
        for s in ["wh-fast", "wh-slow", "card"] {
            assert!(p(format!("run {s} {id}")) < first_end, "{s} of {id}");
        }
        if !order.decline {
            assert_eq!(report.status, RunStatus::Completed, "{report}");
            // `ship` waits for the slowest member.
            assert!(p(format!("run ship {id}")) > p(format!("done wh-slow {id}")));
            continue;
        }
        assert_eq!(report.status, RunStatus::Failed, "{report}");
        let status = |n: &str| report.step(n).unwrap().status;
        assert_eq!(status("card"), StepStatus::Failed, "{report}");
        assert_eq!(status("wh-fast"), StepStatus::Compensated, "{report}");
        // Still running when `card` failed: stopped on its worker, maybe
        // done, so compensated too.
        assert_eq!(status("wh-slow"), StepStatus::Compensated, "{report}");
        assert_eq!(status("ship"), StepStatus::NotRun, "{report}");
        assert_eq!(ledger.count(&format!("done wh-slow {id}")), 0, "wh-slow was stopped");
        // Concurrent inside the group, then the stage before it.
        let (fast, slow) = (p(format!("undo wh-fast {id}")), p(format!("undo wh-slow {id}")));
        assert!(
            fast.max(slow)
                < p(format!("undone wh-fast {id}")).min(p(format!("undone wh-slow {id}")))
        );
        let check = p(format!("undo check {id}"));
        assert!(
            check > p(format!("undone wh-fast {id}")) && check > p(format!("undone wh-slow {id}"))
        );
        // Each side effect happened once, on one of the two workers.
        for s in ["check", "wh-fast", "wh-slow", "card"] {
            assert_eq!(ledger.count(&format!("run {s} {id}")), 1, "{s} of {id}");
        }
    }
    for w in workers {
        w.shutdown().await;
    }
}
