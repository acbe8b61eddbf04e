//! The span tree of runs, as exported through the global tracer provider
//! (the coordinator makes its spans with the OpenTelemetry API on it), to an
//! in-memory exporter installed once for this test binary. Tests run in
//! parallel: each finds its own run by its flow's name, and its run's spans
//! by trace id.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use common::paused;
use opentelemetry::trace::{Link, SpanId, SpanKind, Status, TraceId};
use opentelemetry::{KeyValue, Value};
use opentelemetry_sdk::trace::{
    InMemorySpanExporter, Sampler, SamplingResult, SdkTracerProvider, ShouldSample, SpanData,
};
use orchestrix_coordinator::{RunStatus, create};
use orchestrix_worker::StepError;

/// The flow whose runs [`Split`] samples by trace id, half of them.
const HALF: &str = "half-sampled";

/// Samples every run but those of the flow [`HALF`], which it samples as
/// `OTEL_TRACES_SAMPLER=parentbased_traceidratio` at 0.5 does, counting the
/// attempt spans it is asked about (made at all, exported or not).
#[derive(Debug, Clone)]
struct Split {
    half: Sampler,
    attempts_asked: Arc<AtomicUsize>,
}

impl ShouldSample for Split {
    fn should_sample(
        &self,
        parent: Option<&opentelemetry::Context>,
        trace_id: TraceId,
        name: &str,
        kind: &SpanKind,
        attributes: &[KeyValue],
        links: &[Link],
    ) -> SamplingResult {
        if name.starts_with("half-") && name.contains(" attempt ") {
            self.attempts_asked.fetch_add(1, Ordering::SeqCst);
        }
        if name == format!("{HALF} run") {
            return self.half.should_sample(parent, trace_id, name, kind, attributes, links);
        }
        Sampler::ParentBased(Box::new(Sampler::AlwaysOn))
            .should_sample(parent, trace_id, name, kind, attributes, links)
    }
}

struct Capture {
    provider: SdkTracerProvider,
    exporter: InMemorySpanExporter,
    attempts_asked: Arc<AtomicUsize>,
}

/// The global tracer provider of this binary, installed once.
fn capture() -> &'static Capture {
    static CAPTURE: OnceLock<Capture> = OnceLock::new();
    CAPTURE.get_or_init(|| {
        let exporter = InMemorySpanExporter::default();
        let attempts_asked = Arc::new(AtomicUsize::new(0));
        let half = Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(0.5)));
        let sampler = Split { half, attempts_asked: attempts_asked.clone() };
        let provider = SdkTracerProvider::builder()
            .with_sampler(sampler)
            .with_simple_exporter(exporter.clone())
            .build();
        opentelemetry::global::set_tracer_provider(provider.clone());
        Capture { provider, exporter, attempts_asked }
    })
}

/// Every span of the trace of the (one) run of `flow`, its run span first.
fn trace_of(flow: &str) -> Vec<SpanData> {
    let c = capture();
    c.provider.force_flush().unwrap();
    let spans = c.exporter.get_finished_spans().unwrap();
    let name = format!("{flow} run");
    let run = spans.iter().find(|s| s.name == name).unwrap_or_else(|| panic!("no {name}"));
    let trace = run.span_context.trace_id();
    let mut out = vec![run.clone()];
    out.extend(
        spans.iter().filter(|s| s.span_context.trace_id() == trace && s.name != name).cloned(),
    );
    out
}

fn by_name<'a>(spans: &'a [SpanData], name: &str) -> &'a SpanData {
    spans.iter().find(|s| s.name == name).unwrap_or_else(|| panic!("no span {name}: {spans:?}"))
}

fn parent_name(spans: &[SpanData], s: &SpanData) -> Option<String> {
    spans.iter().find(|p| p.span_context.span_id() == s.parent_span_id).map(|p| p.name.to_string())
}

fn attr<'a>(attrs: &'a [KeyValue], key: &str) -> Option<&'a Value> {
    attrs.iter().find(|kv| kv.key.as_str() == key).map(|kv| &kv.value)
}

fn text(attrs: &[KeyValue], key: &str) -> String {
    match attr(attrs, key) {
        Some(Value::String(s)) => s.to_string(),
        other => panic!("{key} is not a string: {other:?}"),
    }
}

/// The quick start's flow, its payment declined twice.
fn declined_flow(name: &str) -> orchestrix_coordinator::Flow<()> {
    create::<()>(name)
        .step_with("reserve-stock", |_| async { Ok(()) }, |o| o.compensate(|_| async { Ok(()) }))
        .step_with(
            "process-payment",
            |_| async { Err::<(), _>(StepError::retryable("declined")) },
            |o| o.retries(1).retry_delay(Duration::from_millis(10)),
        )
}

#[test]
fn a_failed_run_reads_as_a_tree_of_attempts_and_compensations() {
    capture();
    paused(|| async {
        let report = declined_flow("declined-flow").run(()).await.unwrap();
        assert_eq!(report.status, RunStatus::Failed);
        let spans = trace_of("declined-flow");
        let run = "declined-flow run".to_owned();
        let tree: Vec<(String, Option<String>, Status)> = spans
            .iter()
            .map(|s| (s.name.to_string(), parent_name(&spans, s), s.status.clone()))
            .collect();
        let err = Status::error("declined");
        // One naming rule: `{step} {kind}`, plus `attempt {n}` on the coordinator.
        assert_eq!(
            tree,
            [
                (run.clone(), None, err.clone()),
                ("reserve-stock execute attempt 1".into(), Some(run.clone()), Status::Unset),
                ("process-payment execute attempt 1".into(), Some(run.clone()), err.clone()),
                ("process-payment execute attempt 2".into(), Some(run.clone()), err.clone()),
                ("reserve-stock compensate attempt 1".into(), Some(run.clone()), Status::Unset),
            ]
        );
        let attempt2 = by_name(&spans, "process-payment execute attempt 2");
        let a = &attempt2.attributes;
        assert_eq!(text(a, "orchestrix.step"), "process-payment");
        assert_eq!(attr(a, "orchestrix.attempt"), Some(&Value::I64(2)), "a number, not a string");
        assert_eq!(text(a, "orchestrix.kind"), "execute");
        assert_eq!(text(a, "orchestrix.run_id"), report.run_id.to_string());
        assert_eq!(text(a, "orchestrix.flow"), "declined-flow");
        assert_eq!(attempt2.span_kind, SpanKind::Internal, "in-process attempts are not messaging");
        assert!(attr(a, "messaging.system").is_none());
        // The failure is an event on the attempt, naming its run.
        let failed = attempt2.events.iter().find(|e| e.name == "attempt failed").unwrap();
        assert_eq!(text(&failed.attributes, "error"), "declined");
        assert_eq!(text(&failed.attributes, "run_id"), report.run_id.to_string());
        let run_span = &spans[0];
        assert_eq!(text(&run_span.attributes, "orchestrix.flow"), "declined-flow");
        assert_eq!(run_span.parent_span_id, SpanId::INVALID);

        // The retry is an event on the run's span, its numbers as numbers.
        let retry = run_span.events.iter().find(|e| e.name == "retry scheduled").unwrap();
        assert_eq!(attr(&retry.attributes, "attempt"), Some(&Value::I64(1)));
        assert_eq!(attr(&retry.attributes, "delay_ms"), Some(&Value::I64(10)));
        assert_eq!(text(&retry.attributes, "step"), "process-payment");
    });
}

#[test]
fn a_parallel_groups_attempts_are_siblings_under_one_group_span() {
    capture();
    paused(|| async {
        let undo = |o: orchestrix_coordinator::StepOptions<()>| o.compensate(|_| async { Ok(()) });
        let flow = create::<()>("order")
            .parallel("reserve", |g| {
                g.step_with("east", |_| async { Ok(()) }, undo).step_with(
                    "west",
                    |_| async { Ok(()) },
                    undo,
                )
            })
            .step("charge", |_| async { Err::<(), _>(StepError::permanent("declined")) });
        let report = flow.run(()).await.unwrap();
        assert_eq!(report.status, RunStatus::Failed);
    });
    let spans = trace_of("order");
    let parent_of = |name: &str| parent_name(&spans, by_name(&spans, name));
    let run = Some("order run".to_owned());
    // Executions under one group span, compensations under another; both
    // groups under the run, the step after the group under the run itself.
    for (span, parent) in [
        ("east execute attempt 1", Some("reserve execute group".to_owned())),
        ("west execute attempt 1", Some("reserve execute group".to_owned())),
        ("east compensate attempt 1", Some("reserve compensate group".to_owned())),
        ("west compensate attempt 1", Some("reserve compensate group".to_owned())),
        ("reserve execute group", run.clone()),
        ("reserve compensate group", run.clone()),
        ("charge execute attempt 1", run.clone()),
    ] {
        assert_eq!(parent_of(span), parent, "parent of {span}: {spans:?}");
    }
    let group = by_name(&spans, "reserve execute group");
    assert_eq!(text(&group.attributes, "orchestrix.group"), "reserve");
    // A group lasts from its first attempt's start to its last one's end.
    let (east, west) =
        (by_name(&spans, "east execute attempt 1"), by_name(&spans, "west execute attempt 1"));
    assert!(group.start_time <= east.start_time.min(west.start_time));
    assert_eq!(group.end_time, east.end_time.max(west.end_time));
    assert_eq!(spans.len(), 8, "{spans:?}");
}

#[test]
fn an_unknown_outcome_is_an_error_with_its_own_event() {
    capture();
    paused(|| async {
        let flow = common::payment_that_times_out("unknown-flow");
        let report = flow.run(()).await.unwrap();
        assert_eq!(report.status, RunStatus::Failed);
    });
    let spans = trace_of("unknown-flow");
    let attempt = by_name(&spans, "process-payment execute attempt 1");
    let Status::Error { description } = &attempt.status else { panic!("{:?}", attempt.status) };
    assert!(description.starts_with("outcome unknown:"), "{description}");
    let unknown: Vec<_> = attempt.events.iter().filter(|e| e.name == "outcome unknown").collect();
    assert_eq!(unknown.len(), 1, "{:?}", attempt.events);
    assert_eq!(text(&unknown[0].attributes, "orchestrix.outcome"), "unknown");
    assert_eq!(text(&unknown[0].attributes, "error"), description.as_ref());
    assert!(attempt.events.iter().all(|e| e.name != "attempt failed"), "one event, not two");
}

/// Attributes a `tracing` layer would add to every span, which these spans
/// must not carry.
const NOISE: [&str; 9] = [
    "code.file.path",
    "code.module.name",
    "code.line.number",
    "thread.id",
    "thread.name",
    "target",
    "busy_ns",
    "idle_ns",
    "level",
];

/// Real time (not the paused clock: spans are stamped with the wall clock),
/// each step 30 ms long.
#[test]
fn exported_attempt_spans_last_as_long_as_their_attempts() {
    capture();
    actix_rt::System::new().block_on(async {
        let step_time = Duration::from_millis(30);
        let flow = create::<()>("timed-flow")
            .step_with(
                "reserve-stock",
                move |_| async move {
                    tokio::time::sleep(step_time).await;
                    Ok(())
                },
                |o| {
                    o.compensate(move |_| async move {
                        tokio::time::sleep(step_time).await;
                        Ok(())
                    })
                },
            )
            .step_with(
                "process-payment",
                move |_| async move {
                    tokio::time::sleep(step_time).await;
                    Err::<(), _>(StepError::retryable("Payment declined: limit exceeded"))
                },
                |o| o.retries(1).retry_delay(Duration::from_millis(10)),
            );
        let report = flow.run(()).await.unwrap();
        assert_eq!(report.status, RunStatus::Failed);
    });
    let spans = trace_of("timed-flow");
    let run = &spans[0];
    assert_eq!(run.status, Status::error("Payment declined: limit exceeded"));
    let attempts = [
        "reserve-stock execute attempt 1",
        "process-payment execute attempt 1",
        "process-payment execute attempt 2",
        "reserve-stock compensate attempt 1",
    ];
    for name in attempts {
        let a = by_name(&spans, name);
        assert_eq!(a.parent_span_id, run.span_context.span_id(), "{name}");
        let took = a.end_time.duration_since(a.start_time).unwrap();
        assert!(took >= Duration::from_millis(30), "{name} lasted {took:?}, its handler 30 ms");
        assert!(
            run.start_time <= a.start_time && a.end_time <= run.end_time,
            "{name} inside the run"
        );
        let failed = name.starts_with("process-payment");
        let want =
            if failed { Status::error("Payment declined: limit exceeded") } else { Status::Unset };
        assert_eq!(a.status, want, "{name}");
    }
    // Attempts follow each other: a retry delay lies between them.
    for pair in attempts.windows(2) {
        let (a, b) = (by_name(&spans, pair[0]), by_name(&spans, pair[1]));
        assert!(a.end_time <= b.start_time, "{} ends before {} starts", pair[0], pair[1]);
    }
    for s in &spans {
        for key in NOISE {
            assert!(attr(&s.attributes, key).is_none(), "{}: {key} is noise", s.name);
        }
        assert_eq!(s.instrumentation_scope.name(), "orchestrix", "{}", s.name);
    }
}

/// An in-process handler's own spans are children of its attempt's.
#[test]
fn an_in_process_handlers_spans_hang_under_its_attempt() {
    use opentelemetry::trace::{Tracer as _, TracerProvider as _};
    capture();
    paused(|| async {
        let flow = create::<()>("nested-flow").step("charge", |_| async {
            let tracer = opentelemetry::global::tracer_provider().tracer("handler");
            tracer.in_span("call the bank", |_| ());
            Ok(())
        });
        assert_eq!(flow.run(()).await.unwrap().status, RunStatus::Completed);
    });
    let spans = trace_of("nested-flow");
    let bank = by_name(&spans, "call the bank");
    assert_eq!(parent_name(&spans, bank).as_deref(), Some("charge execute attempt 1"));
}

/// The sampler decides once per run: with one that samples half the traces
/// (by trace id, as `OTEL_TRACES_SAMPLER=parentbased_traceidratio` does),
/// a run is either exported whole (its run span and every attempt) or not
/// at all, and for a run left out not even the attempts' spans are made.
#[test]
fn a_run_the_sampler_leaves_out_makes_no_attempt_spans() {
    let c = capture();
    let runs = 40;
    actix_rt::System::new().block_on(async {
        let flow = create::<()>(HALF)
            .step("half-one", |_| async {
                // A handler's own span: left out with its run.
                use opentelemetry::trace::{Tracer as _, TracerProvider as _};
                let tracer = opentelemetry::global::tracer_provider().tracer("handler");
                tracer.in_span("half-inner", |_| ());
                Ok(())
            })
            .step("half-two", |_| async { Ok(()) });
        for _ in 0..runs {
            assert_eq!(flow.run(()).await.unwrap().status, RunStatus::Completed);
        }
    });
    c.provider.force_flush().unwrap();
    let spans = c.exporter.get_finished_spans().unwrap();
    let exported_runs = spans.iter().filter(|s| s.name == format!("{HALF} run")).count();
    let exported_attempts = spans
        .iter()
        .filter(|s| s.name.starts_with("half-") && s.name.contains(" attempt "))
        .count();
    assert!(0 < exported_runs && exported_runs < runs, "about half: {exported_runs} of {runs}");
    assert_eq!(exported_attempts, 2 * exported_runs, "whole runs or nothing");
    let inner = spans.iter().filter(|s| s.name == "half-inner").count();
    assert_eq!(inner, exported_runs, "a handler's spans are left out with its run");
    // Made at all (exported or not): attempts of sampled runs only.
    let made = c.attempts_asked.load(Ordering::SeqCst);
    assert_eq!(made, exported_attempts, "no attempt span for a run left out");
}
