//! A coordinator node started on an actix system, as an actix-web service
//! embedding Orchestrix would start it: the node's tasks, the runs it
//! starts and its NATS connection all live on that system's thread.

#![allow(clippy::unwrap_used)]

use std::sync::{Arc, Mutex};
use std::thread::ThreadId;
use std::time::Duration;

use orchestrix_coordinator::Hooks;
use uuid::Uuid;

use orchestrix::{RunOptions, RunStatus, StepContext, StepError, Worker};
use orchestrix_coordinator::flowfile;
use orchestrix_coordinator::nats::{Client, Node, NodeStore};
use orchestrix_integration_tests::NatsServer;
use orchestrix_proto::Subjects;
use orchestrix_worker::NatsOptions;

const FLOW: &str = r#"
[[flow]]
name = "on-actix"
[[flow.step]]
name = "a"
compensable = true
[[flow.step]]
name = "b"
"#;

/// The threads on which runs started.
#[derive(Clone, Default)]
struct Threads(Arc<Mutex<Vec<ThreadId>>>);

impl Hooks for Threads {
    fn on_run_start(&self, _: Uuid, _: &str) {
        self.0.lock().unwrap().push(std::thread::current().id());
    }
}

// Runs started over NATS (a client's request) and in process, a success and
// a rollback, all served by a node that lives on the system's one thread.
#[actix_rt::test]
async fn a_node_started_on_an_actix_system_serves_runs_on_that_thread() {
    let server = NatsServer::start();
    let nats = NatsOptions::new(server.url()).connect().await.unwrap();
    let threads = Threads::default();
    let node = Node::builder()
        .hooks(threads.clone())
        .store(NodeStore::Memory)
        .flows(flowfile::parse(FLOW).unwrap())
        .registry(false)
        .events(false)
        .start(nats.clone())
        .await
        .unwrap();
    let worker = Worker::builder()
        .client(nats.clone())
        .steps::<u32>("on-actix", |f| {
            f.step("a", |_: StepContext<u32>| async { Ok(()) })
                .compensate("a", |_| async { Ok(()) })
                .step("b", |ctx| async move {
                    if ctx.input == 0 {
                        return Err(StepError::permanent("b refuses 0"));
                    }
                    Ok(ctx.input)
                })
        })
        .start()
        .await
        .unwrap();
    let client = Client::new(nats.clone(), Subjects::default());
    let over_nats = |input: u32| {
        let client = client.clone();
        async move {
            let run = client.run("on-actix", &input, RunOptions::new());
            tokio::time::timeout(Duration::from_secs(20), run).await.unwrap().unwrap()
        }
    };
    let completed = over_nats(7).await;
    assert_eq!(completed.status, RunStatus::Completed, "{completed}");
    let refused = over_nats(0).await;
    assert_eq!(refused.status, RunStatus::Failed, "{refused}");
    assert_eq!(refused.step("a").unwrap().status, orchestrix::StepStatus::Compensated);
    let in_process = node.coordinator().run("on-actix", &3u32, RunOptions::new()).await.unwrap();
    assert_eq!(in_process.status, RunStatus::Completed, "{in_process}");
    let here = std::thread::current().id();
    let on = threads.0.lock().unwrap().clone();
    assert_eq!(on, vec![here; 3], "every run's actor on the system's thread");
    worker.shutdown().await;
    node.shutdown().await;
}
