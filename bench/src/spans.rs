//! The floor under the traced scenarios: what one span costs through the
//! standard Rust stack (`tracing` → `tracing-opentelemetry` → the SDK's batch
//! processor → the OTLP/HTTP exporter → the sink), or through the
//! OpenTelemetry API straight to the SDK, with nothing of Orchestrix's run
//! around it. Measured in this process, with the telemetry `--traced`
//! installed: CPU per span, the export thread's included.
//!
//! A sampled saga run of three steps makes 7 spans: the coordinator's run
//! span and 3 attempt spans (API), the worker's 3 handler spans (`tracing`).
//! `3 × span-floor-tracing + 4 × span-floor-api` µs is then what tracing a
//! run cannot cost less than, whatever Orchestrix does around it.

use std::time::{Duration, Instant};

use opentelemetry::trace::{Span as _, SpanKind, Tracer as _};
use opentelemetry::{Context, KeyValue};
use orchestrix::proto::TraceParent;
use orchestrix::telemetry::{TelemetryGuard, remote_context};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use crate::{Figure, cpu_per_run, cpu_seconds};

pub(crate) const SCENARIOS: [&str; 2] = ["span-floor-tracing", "span-floor-api"];

/// Spans between two flushes: the batch processor's export batch, so that
/// the loop never outruns the export and spans are never dropped (a dropped
/// span costs nothing and would flatter the figure).
const BATCH: usize = 512;

/// A parent as a step command carries it: sampled, from another process.
fn parent(i: u64) -> Context {
    let run = uuid::Uuid::from_u64_pair(0x0123_4567_89ab_cdef, i | 1);
    remote_context(&TraceParent::for_run(run, i | 1))
}

/// A span shaped as a worker's handler span: the same fields, a remote
/// parent, entered once.
fn tracing_span(i: u64) {
    let (run, command) = (
        uuid::Uuid::from_u64_pair(1, i).hyphenated().to_string(),
        uuid::Uuid::from_u64_pair(2, i).hyphenated().to_string(),
    );
    let span = tracing::info_span!(
        "orchestrix.handle",
        otel.name = "charge execute",
        otel.kind = "consumer",
        messaging.system = "nats",
        messaging.operation.type = "process",
        messaging.operation.name = "process",
        messaging.destination.name = "orchestrix.step.payment.charge",
        messaging.message.id = command.as_str(),
        orchestrix.run_id = run.as_str(),
        orchestrix.flow = "payment",
        orchestrix.step = "charge",
        orchestrix.attempt = 1i64,
        orchestrix.kind = "execute",
        orchestrix.command_id = command.as_str(),
        orchestrix.worker = "bench-worker",
        otel.status_code = tracing::field::Empty,
        otel.status_description = tracing::field::Empty,
    );
    let _ = span.set_parent(parent(i));
    let _entered = span.enter();
}

/// A span shaped as a coordinator's attempt span, through the API on the
/// global provider.
fn api_span(tracer: &opentelemetry::global::BoxedTracer, i: u64) {
    let cx = parent(i);
    let mut span = tracer
        .span_builder("charge execute attempt 1")
        .with_kind(SpanKind::Producer)
        .with_attributes([
            KeyValue::new("messaging.system", "nats"),
            KeyValue::new("messaging.operation.type", "send"),
            KeyValue::new("orchestrix.run_id", uuid::Uuid::from_u64_pair(1, i).to_string()),
            KeyValue::new("orchestrix.flow", "payment"),
            KeyValue::new("orchestrix.step", "charge"),
            KeyValue::new("orchestrix.attempt", 1i64),
        ])
        .start_with_context(tracer, &cx);
    span.end();
}

/// Each wanted floor, measured for `seconds` on a blocking thread.
pub(crate) async fn floors(
    seconds: f64,
    guard: &std::sync::Arc<TelemetryGuard>,
    wanted: &impl Fn(&str) -> bool,
) -> Vec<Figure> {
    let mut out = Vec::new();
    for scenario in SCENARIOS.into_iter().filter(|s| wanted(s)) {
        let span = Duration::from_secs_f64(seconds);
        let guard = guard.clone();
        let figure = tokio::task::spawn_blocking(move || {
            let tracer = opentelemetry::global::tracer("orchestrix-bench");
            let one = |i: u64| match scenario {
                "span-floor-tracing" => tracing_span(i),
                _ => api_span(&tracer, i),
            };
            // Warm-up: a fifth of the time, as the other scenarios.
            let (start, mut i) = (Instant::now(), 0u64);
            while start.elapsed() < span / 5 {
                (0..BATCH as u64).for_each(|_| {
                    one(i);
                    i += 1;
                });
                guard.flush();
            }
            let (cpu_before, start, first) = (cpu_seconds(), Instant::now(), i);
            while start.elapsed() < span {
                (0..BATCH as u64).for_each(|_| {
                    one(i);
                    i += 1;
                });
                guard.flush();
            }
            let elapsed = start.elapsed().as_secs_f64();
            let spans = i - first;
            let (cpu, _) = cpu_per_run(cpu_before, cpu_seconds(), spans);
            Figure {
                scenario,
                concurrency: 1,
                runs: spans,
                runs_per_s: spans as f64 / elapsed,
                p50_us: None,
                p99_us: None,
                bytes_per_run: None,
                cpu_us_per_run: cpu,
                cpu_us_per_run_by: None,
            }
        })
        .await;
        out.extend(figure.ok());
    }
    out
}
