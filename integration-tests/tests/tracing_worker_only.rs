//! A worker that traces, under a coordinator that does not: the commands
//! carry no header at all, and the worker's spans for a run share one trace
//! whose id is the run's id (each run its own). Alone in its test binary: it
//! installs the global subscriber (but no global tracer provider, so the
//! coordinator in this process makes no spans).

#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use futures::StreamExt;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider};
use orchestrix::{RunOptions, RunStatus, StepContext, Worker};
use orchestrix_integration_tests::NatsServer;
use orchestrix_proto::Subjects;
use orchestrix_worker::NatsOptions;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untraced_coordinators_runs_are_one_trace_each_in_the_worker() {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder().with_simple_exporter(exporter.clone()).build();
    tracing_subscriber::registry()
        .with(orchestrix_worker::telemetry::layer(provider.tracer("worker")))
        .init();

    let server = NatsServer::start();
    let conn = NatsOptions::new(server.url()).connect().await.unwrap();
    let toml =
        "[[flow]]\nname = \"plain\"\n[[flow.step]]\nname = \"a\"\n[[flow.step]]\nname = \"b\"\n";
    let node = support::memory_node(conn.clone(), toml).await;
    // A plain subscriber beside the workers' queue group sees every command.
    let mut commands =
        conn.subscribe(Subjects::default().step_any_version("plain", "*")).await.unwrap();
    conn.flush().await.unwrap();
    let worker = Worker::builder()
        .nats(NatsOptions::new(server.url()))
        .steps::<u32>("plain", |f| {
            f.step("a", |_: StepContext<u32>| async { Ok(()) }).step("b", |_| async { Ok(()) })
        })
        .start()
        .await
        .unwrap();
    let mut runs = Vec::new();
    for i in 0..2u32 {
        let report = node.coordinator().run("plain", &i, RunOptions::new()).await.unwrap();
        assert_eq!(report.status, RunStatus::Completed, "{report}");
        runs.push(report.run_id);
    }
    for _ in 0..4 {
        let msg =
            tokio::time::timeout(Duration::from_secs(5), commands.next()).await.unwrap().unwrap();
        assert!(msg.headers.is_none(), "an untraced command carries headers: {:?}", msg.headers);
    }
    worker.shutdown().await;
    provider.force_flush().unwrap();

    let spans = exporter.get_finished_spans().unwrap();
    for run in runs {
        let trace = run.as_uuid().simple().to_string();
        let mut names: Vec<String> = spans
            .iter()
            .filter(|s| s.span_context.trace_id().to_string() == trace)
            .map(|s| s.name.to_string())
            .collect();
        names.sort();
        assert_eq!(names, ["a execute", "b execute"], "run {run}: {spans:?}");
    }
    node.shutdown().await;
}
