//! A worker in a service that set up `tracing-opentelemetry` itself, with a
//! plain layer rather than `orchestrix::telemetry::layer`: each command
//! still has one span, named and kinded as the worker names it, under the
//! coordinator's attempt span. Alone in its test binary: it installs the
//! global subscriber.

#![allow(clippy::unwrap_used)]

mod support;

use opentelemetry::trace::{SpanKind, TracerProvider as _};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider};
use orchestrix::{RunOptions, RunStatus, StepContext, Worker};
use orchestrix_integration_tests::NatsServer;
use orchestrix_worker::NatsOptions;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_layer_exports_one_span_per_command_under_its_attempt() {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder().with_simple_exporter(exporter.clone()).build();
    opentelemetry::global::set_tracer_provider(provider.clone());
    let plain = tracing_opentelemetry::layer().with_tracer(provider.tracer("plain"));
    tracing_subscriber::registry().with(plain).init();

    let server = NatsServer::start();
    let conn = NatsOptions::new(server.url()).connect().await.unwrap();
    let toml = "[[flow]]\nname = \"plain\"\n[[flow.step]]\nname = \"a\"\n";
    let node = support::memory_node(conn.clone(), toml).await;
    let worker = Worker::builder()
        .nats(NatsOptions::new(server.url()))
        .steps::<()>("plain", |f| {
            f.step("a", |_: StepContext<()>| async {
                tracing::info_span!("own work").in_scope(|| ());
                Ok(())
            })
        })
        .start()
        .await
        .unwrap();
    let report = node.coordinator().run("plain", &(), RunOptions::new()).await.unwrap();
    assert_eq!(report.status, RunStatus::Completed, "{report}");
    worker.shutdown().await;
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    provider.force_flush().unwrap();

    let spans = exporter.get_finished_spans().unwrap();
    let names: Vec<&str> = spans.iter().map(|s| s.name.as_ref()).collect();
    let find =
        |n: &str| spans.iter().find(|s| s.name == n).unwrap_or_else(|| panic!("{n}: {names:?}"));
    let attempt = find("a execute attempt 1");
    let handled = find("a execute");
    assert_eq!(handled.span_kind, SpanKind::Consumer);
    assert_eq!(handled.parent_span_id, attempt.span_context.span_id());
    assert_eq!(handled.span_context.trace_id(), attempt.span_context.trace_id());
    assert_eq!(find("own work").parent_span_id, handled.span_context.span_id());
    assert_eq!(names.iter().filter(|n| n.ends_with(" execute")).count(), 1, "{names:?}");
    node.shutdown().await;
}
