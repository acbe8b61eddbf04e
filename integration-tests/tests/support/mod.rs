//! Shared by the tracing tests: spans captured in memory through the global
//! subscriber, and a coordinator node whose spans are its runs' alone.

#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider};
use orchestrix_coordinator::flowfile;
use orchestrix_coordinator::nats::{Node, NodeStore};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Installs the global subscriber with an OpenTelemetry layer and the global
/// tracer provider (the SDK's default sampler: parent-based, roots always
/// sampled), both exporting to the returned exporter, and W3C trace context propagation; the provider is
/// returned to be flushed.
pub fn capture_spans() -> (SdkTracerProvider, InMemorySpanExporter) {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder().with_simple_exporter(exporter.clone()).build();
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    opentelemetry::global::set_tracer_provider(provider.clone());
    tracing_subscriber::registry()
        .with(orchestrix_worker::telemetry::layer(provider.tracer("test")))
        .init();
    (provider, exporter)
}

/// A node serving the flows of `toml`, in memory, with no run events and no
/// registry.
pub async fn memory_node(conn: async_nats::Client, toml: &str) -> Node {
    Node::builder()
        .store(NodeStore::Memory)
        .flows(flowfile::parse(toml).unwrap())
        .registry(false)
        .events(false)
        .start(conn)
        .await
        .unwrap()
}
