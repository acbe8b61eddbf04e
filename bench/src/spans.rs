//! The floor under the traced scenarios: what one span costs through the
//! standard Rust stack (`tracing` → `tracing-opentelemetry` → the SDK's batch
//! processor → the OTLP/HTTP exporter), or through the OpenTelemetry API
//! straight to the SDK, with nothing of Orchestrix's run around it.
//! Measured in this process, with the telemetry `--traced` installed: CPU
//! per span, the export thread's included, the sink's (the stand-in for a
//! collector) not.
//!
//! A sampled saga run of three steps makes 7 spans: the coordinator's run
//! span and 3 attempt spans (API), the worker's 3 handler spans (`tracing`).
//! `3 × span-floor-tracing + 4 × span-floor-api` is then about what tracing
//! a run cannot cost less than, whatever Orchestrix does around it (a run's
//! spans are not all shaped alike, and in place they run with colder
//! caches).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use opentelemetry::KeyValue;
use opentelemetry::global::BoxedTracer;
use opentelemetry::trace::{Span as _, SpanKind, Tracer as _};
use orchestrix::proto::TraceParent;
use orchestrix::telemetry::{TelemetryGuard, remote_context};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use crate::{Figure, SINK, cpu_per_run, cpu_seconds};

pub(crate) const SCENARIOS: [&str; 2] = ["span-floor-tracing", "span-floor-api"];

/// Spans between two flushes. The batch processor exports a batch by
/// itself once it holds this many (its default `OTEL_BSP_MAX_EXPORT_BATCH_SIZE`)
/// and drops spans past its queue (`OTEL_BSP_MAX_QUEUE_SIZE`, 2,048 by
/// default): flushing this often, the loop never outruns the export, so no
/// span is dropped, which would cost nothing and flatter the figure.
const BATCH: u64 = 512;

/// Fewer bytes a span than this at the sink means spans were not exported
/// (filtered out, dropped): the figure would measure nothing.
const MIN_BYTES_A_SPAN: u64 = 100;

/// A parent as a step command carries it: sampled, from another process.
fn parent(i: u64) -> opentelemetry::Context {
    let run = uuid::Uuid::from_u64_pair(0x0123_4567_89ab_cdef, i | 1);
    remote_context(&TraceParent::for_run(run, i | 1))
}

/// A span shaped as a worker's handler span: its target, its fields, a
/// remote parent, entered once.
fn tracing_span(i: u64) -> Result<(), String> {
    let (run, command) = (
        uuid::Uuid::from_u64_pair(1, i).hyphenated().to_string(),
        uuid::Uuid::from_u64_pair(2, i).hyphenated().to_string(),
    );
    let span = tracing::info_span!(
        target: "orchestrix_worker::worker",
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
    span.set_parent(parent(i))
        .map_err(|e| format!("the span is not exported ({e}): is RUST_LOG filtering it out?"))?;
    let _entered = span.enter();
    Ok(())
}

/// A span shaped as a coordinator's attempt span, through the API on the
/// global provider.
fn api_span(tracer: &BoxedTracer, i: u64) -> Result<(), String> {
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
        .start_with_context(tracer, &parent(i));
    span.end();
    Ok(())
}

/// Makes spans in batches of [`BATCH`], each batch flushed, for `time`;
/// returns how many.
fn spans_for(
    time: Duration,
    guard: &TelemetryGuard,
    one: &impl Fn(u64) -> Result<(), String>,
) -> Result<u64, String> {
    // At least one batch, however short the time.
    let (start, mut made) = (Instant::now(), 0);
    loop {
        for _ in 0..BATCH {
            one(made)?;
            made += 1;
        }
        guard.flush_spans().map_err(|e| e.to_string())?;
        if start.elapsed() >= time {
            return Ok(made);
        }
    }
}

/// One floor: a warm-up of a fifth of `seconds`, then the measurement.
fn floor(scenario: &'static str, seconds: f64, guard: &TelemetryGuard) -> Result<Figure, String> {
    let tracer = opentelemetry::global::tracer("orchestrix-bench");
    let one = |i| match scenario {
        "span-floor-tracing" => tracing_span(i),
        _ => api_span(&tracer, i),
    };
    let time = Duration::from_secs_f64(seconds);
    spans_for(time / 5, guard, &one)?;
    let (cpu_before, bytes_before) = (cpu_seconds(), SINK.bytes.load(Ordering::Relaxed));
    let start = Instant::now();
    let spans = spans_for(time, guard, &one)?;
    let elapsed = start.elapsed().as_secs_f64();
    let bytes = SINK.bytes.load(Ordering::Relaxed) - bytes_before;
    if bytes < spans * MIN_BYTES_A_SPAN {
        return Err(format!(
            "{scenario}: {spans} spans made but {bytes} bytes exported: they were filtered out or dropped"
        ));
    }
    // This process's CPU but the sink's (`bench`, not `otlp_sink`).
    let (_, by) = cpu_per_run(cpu_before, cpu_seconds(), spans);
    Ok(Figure {
        scenario,
        concurrency: 1,
        runs: spans,
        runs_per_s: spans as f64 / elapsed,
        p50_us: None,
        p99_us: None,
        bytes_per_run: None,
        cpu_us_per_run: by.and_then(|by| by.get("bench").copied()),
        cpu_us_per_run_by: None,
    })
}

/// Each wanted floor, measured on a blocking thread (a flush blocks).
pub(crate) async fn floors(
    seconds: f64,
    guard: &Arc<TelemetryGuard>,
    wanted: &impl Fn(&str) -> bool,
) -> Result<Vec<Figure>, String> {
    let mut out = Vec::new();
    for scenario in SCENARIOS.into_iter().filter(|s| wanted(s)) {
        let guard = guard.clone();
        let figure = tokio::task::spawn_blocking(move || floor(scenario, seconds, &guard))
            .await
            .map_err(|e| format!("{scenario}: {e}"))??;
        out.push(figure);
    }
    Ok(out)
}
