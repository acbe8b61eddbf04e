//! What one span costs to make and hand to the SDK, the two ways Orchestrix
//! makes spans: through `tracing` and the `tracing-opentelemetry` layer (the
//! worker's command spans), and with the OpenTelemetry API directly (the
//! coordinator's run and attempt spans). An attempt-like span each time: ten
//! attributes, the batch processor, an exporter that drops the batches (so
//! the figure is the producing side; the OTLP encoding comes on top, on the
//! export thread).
//!
//! `cargo run --release -p orchestrix-bench --example span_cost`

use std::time::Instant;

use opentelemetry::KeyValue;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry::trace::{Span as _, SpanKind, TraceContextExt as _, Tracer as _};
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use tracing_subscriber::layer::SubscriberExt as _;

/// Drops every batch.
#[derive(Debug)]
struct Discard;

impl SpanExporter for Discard {
    async fn export(&self, batch: Vec<SpanData>) -> opentelemetry_sdk::error::OTelSdkResult {
        drop(std::hint::black_box(batch));
        Ok(())
    }
}

const SPANS: u32 = 200_000;

fn main() {
    let run_id = uuid::Uuid::new_v4().to_string();
    let command_id = uuid::Uuid::new_v4().to_string();
    for round in 1..=3 {
        let provider = SdkTracerProvider::builder().with_batch_exporter(Discard).build();
        let layer = orchestrix::telemetry::layer(provider.tracer("orchestrix"));
        let through_tracing =
            tracing::subscriber::with_default(tracing_subscriber::registry().with(layer), || {
                let root = tracing::info_span!("root", otel.name = "flow run");
                let started = Instant::now();
                for i in 0..SPANS {
                    let name = format!("step execute attempt {}", i % 3);
                    let span = tracing::info_span!(
                        parent: &root,
                        "orchestrix.attempt",
                        otel.name = name.as_str(),
                        otel.kind = "producer",
                        orchestrix.run_id = run_id.as_str(),
                        orchestrix.flow = "flow",
                        orchestrix.step = "step",
                        orchestrix.attempt = 1i64,
                        orchestrix.kind = "execute",
                        orchestrix.command_id = command_id.as_str(),
                        messaging.system = "nats",
                        messaging.operation.type = "send",
                        messaging.operation.name = "publish",
                        messaging.message.id = command_id.as_str(),
                    );
                    drop(span.enter());
                    drop(span);
                }
                started.elapsed()
            });
        let _ = provider.shutdown();

        let provider = SdkTracerProvider::builder().with_batch_exporter(Discard).build();
        let tracer = provider.tracer("orchestrix");
        let run = opentelemetry::Context::new().with_span(tracer.start("flow run"));
        let run_value = opentelemetry::StringValue::from(run_id.clone());
        let command = opentelemetry::StringValue::from(command_id.clone());
        let started = Instant::now();
        for i in 0..SPANS {
            let attributes = vec![
                KeyValue::new("orchestrix.run_id", run_value.clone()),
                KeyValue::new("orchestrix.flow", "flow"),
                KeyValue::new("orchestrix.step", "step"),
                KeyValue::new("orchestrix.attempt", 1i64),
                KeyValue::new("orchestrix.kind", "execute"),
                KeyValue::new("orchestrix.command_id", command.clone()),
                KeyValue::new("messaging.system", "nats"),
                KeyValue::new("messaging.operation.type", "send"),
                KeyValue::new("messaging.operation.name", "publish"),
                KeyValue::new("messaging.message.id", command.clone()),
            ];
            let mut span = tracer
                .span_builder(format!("step execute attempt {}", i % 3))
                .with_kind(SpanKind::Producer)
                .with_attributes(attributes)
                .start_with_context(&tracer, &run);
            span.end();
        }
        let direct = started.elapsed();
        let _ = provider.shutdown();

        let per = |d: std::time::Duration| d.as_nanos() as f64 / f64::from(SPANS);
        println!(
            "round {round}: through tracing-opentelemetry {:>6.0} ns a span, OpenTelemetry API {:>6.0} ns a span",
            per(through_tracing),
            per(direct)
        );
    }
}
