//! The span tree of runs: asserted with a capturing subscriber on the test's
//! own thread (the actix system runs everything there), and as exported by
//! the OpenTelemetry layer that `orchestrix_worker::telemetry` installs (in memory).

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::paused;
use opentelemetry::trace::{SpanId, SpanKind, Status, TracerProvider as _};
use opentelemetry::{KeyValue, Value};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use orchestrix_coordinator::{RunStatus, create};
use orchestrix_worker::StepError;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};

/// A span's or event's fields: value as text, and the type it was recorded as.
#[derive(Default, Clone, Debug)]
struct Fields(HashMap<String, String>, HashMap<String, &'static str>);

impl Fields {
    fn put(&mut self, field: &Field, value: String, ty: &'static str) {
        self.0.insert(field.name().to_owned(), value);
        self.1.insert(field.name().to_owned(), ty);
    }
}

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.put(field, format!("{value:?}"), "debug");
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, value.to_owned(), "str");
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, value.to_string(), "i64");
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, value.to_string(), "u64");
    }
}

/// A span still open: its fields and its parent's id.
type OpenSpan = (Fields, Option<u64>);
/// A closed span: its name, its parent's name, its fields.
type ClosedSpan = (String, Option<String>, Fields);
/// An event: its parent span's name and its fields (`message` included).
type SeenEvent = (String, Fields);

#[derive(Default, Clone)]
struct Capture {
    open: Arc<Mutex<HashMap<u64, OpenSpan>>>,
    closed: Arc<Mutex<Vec<ClosedSpan>>>,
    events: Arc<Mutex<Vec<SeenEvent>>>,
}

fn otel_name(f: &Fields) -> String {
    f.0.get("otel.name").cloned().unwrap_or_default()
}

impl<S: tracing::Subscriber> Layer<S> for Capture {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, _ctx: Context<'_, S>) {
        let mut f = Fields::default();
        attrs.record(&mut f);
        self.open.lock().unwrap().insert(id.into_u64(), (f, attrs.parent().map(Id::into_u64)));
    }
    fn on_record(&self, id: &Id, values: &Record<'_>, _ctx: Context<'_, S>) {
        if let Some((f, _)) = self.open.lock().unwrap().get_mut(&id.into_u64()) {
            values.record(f);
        }
    }
    fn on_event(&self, event: &tracing::Event<'_>, _ctx: Context<'_, S>) {
        let Some(parent) = event.parent() else { return };
        let open = self.open.lock().unwrap();
        let Some((pf, _)) = open.get(&parent.into_u64()) else { return };
        let mut f = Fields::default();
        event.record(&mut f);
        self.events.lock().unwrap().push((otel_name(pf), f));
    }
    fn on_close(&self, id: Id, _ctx: Context<'_, S>) {
        let open = self.open.lock().unwrap();
        let Some((f, parent)) = open.get(&id.into_u64()).cloned() else { return };
        let parent = parent.and_then(|p| open.get(&p).map(|(pf, _)| otel_name(pf)));
        self.closed.lock().unwrap().push((otel_name(&f), parent, f));
    }
}

/// Nothing to export them: a subscriber without an OpenTelemetry layer sees
/// no attempt span, only each run's span, opened to ask for a sampler and
/// dropped at once with nothing recorded on it.
#[test]
fn without_an_opentelemetry_layer_no_spans_are_made() {
    let capture = Capture::default();
    let subscriber = tracing_subscriber::registry().with(capture.clone());
    tracing::subscriber::with_default(subscriber, || {
        paused(|| async {
            let report = declined_flow().run(()).await.unwrap();
            assert_eq!(report.status, RunStatus::Failed);
        })
    });
    let open = capture.open.lock().unwrap();
    let names: Vec<String> = open.values().map(|(f, _)| otel_name(f)).collect();
    assert_eq!(names, vec!["payment-flow run".to_owned()], "one run, one span");
    let (fields, _) = open.values().next().unwrap();
    assert!(!fields.0.contains_key("orchestrix.run_id"), "nothing recorded on it");
}

/// The quick start's flow, its payment declined twice.
fn declined_flow() -> orchestrix_coordinator::Flow<()> {
    create::<()>("payment-flow")
        .step_with("reserve-stock", |_| async { Ok(()) }, |o| o.compensate(|_| async { Ok(()) }))
        .step_with(
            "process-payment",
            |_| async { Err::<(), _>(StepError::retryable("declined")) },
            |o| o.retries(1).retry_delay(Duration::from_millis(10)),
        )
}

#[test]
fn a_failed_run_reads_as_a_tree_of_attempts_and_compensations() {
    let capture = Capture::default();
    let provider = SdkTracerProvider::builder().build();
    let subscriber = tracing_subscriber::registry()
        .with(capture.clone())
        .with(orchestrix_worker::telemetry::layer(provider.tracer("test")));
    tracing::subscriber::with_default(subscriber, || {
        paused(|| async {
            let report = declined_flow().run(()).await.unwrap();
            assert_eq!(report.status, RunStatus::Failed);
        })
    });
    let closed = capture.closed.lock().unwrap().clone();
    let tree: Vec<(String, Option<String>, Option<String>)> = closed
        .iter()
        .map(|(n, p, f)| (n.clone(), p.clone(), f.0.get("otel.status_code").cloned()))
        .collect();
    let run = "payment-flow run".to_owned();
    let err = Some("ERROR".to_owned());
    // One naming rule: `{step} {kind}`, plus `attempt {n}` on the coordinator.
    assert_eq!(
        tree,
        [
            ("reserve-stock execute attempt 1".into(), Some(run.clone()), None),
            ("process-payment execute attempt 1".into(), Some(run.clone()), err.clone()),
            ("process-payment execute attempt 2".into(), Some(run.clone()), err.clone()),
            ("reserve-stock compensate attempt 1".into(), Some(run.clone()), None),
            (run.clone(), None, err),
        ]
    );
    let attempt2 = &closed[2].2;
    assert_eq!(attempt2.0["orchestrix.step"], "process-payment");
    assert_eq!(attempt2.0["orchestrix.attempt"], "2");
    assert_eq!(attempt2.1["orchestrix.attempt"], "i64", "a number, not a string");
    assert_eq!(attempt2.0["orchestrix.kind"], "execute");
    // The field tracing-opentelemetry reads as the status message.
    assert_eq!(attempt2.0["otel.status_description"], "declined");
    assert!(!attempt2.0.contains_key("otel.status_message"));
    assert_eq!(attempt2.0["otel.kind"], "internal", "in-process attempts are not messaging");
    assert!(!attempt2.0.contains_key("messaging.system"));
    let run_fields = &closed[4].2;
    assert_eq!(run_fields.0["orchestrix.flow"], "payment-flow");
    assert_eq!(run_fields.0["otel.status_description"], "declined");

    // The retry is an event on the run's span, its numbers as numbers.
    let events = capture.events.lock().unwrap().clone();
    let (on, retry) = events
        .iter()
        .find(|(_, f)| f.0.get("message").is_some_and(|m| m == "retry scheduled"))
        .unwrap();
    assert_eq!(on, &run);
    assert_eq!(retry.0["attempt"], "1");
    assert_eq!(retry.0["delay_ms"], "10");
    assert_eq!((retry.1["attempt"], retry.1["delay_ms"]), ("i64", "i64"));
}

#[test]
fn a_parallel_groups_attempts_are_siblings_under_one_group_span() {
    let capture = Capture::default();
    let provider = SdkTracerProvider::builder().build();
    let subscriber = tracing_subscriber::registry()
        .with(capture.clone())
        .with(orchestrix_worker::telemetry::layer(provider.tracer("test")));
    tracing::subscriber::with_default(subscriber, || {
        paused(|| async {
            let undo =
                |o: orchestrix_coordinator::StepOptions<()>| o.compensate(|_| async { Ok(()) });
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
        })
    });
    let closed = capture.closed.lock().unwrap().clone();
    let parent_of =
        |name: &str| closed.iter().find(|(n, _, _)| n == name).and_then(|(_, p, _)| p.clone());
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
        assert_eq!(parent_of(span), parent, "parent of {span}: {closed:?}");
    }
    let (_, _, group) = closed.iter().find(|(n, _, _)| n == "reserve execute group").unwrap();
    assert_eq!(group.0["orchestrix.group"], "reserve");
}

#[test]
fn an_unknown_outcome_is_an_error_with_its_own_event() {
    let capture = Capture::default();
    let provider = SdkTracerProvider::builder().build();
    let subscriber = tracing_subscriber::registry()
        .with(capture.clone())
        .with(orchestrix_worker::telemetry::layer(provider.tracer("test")));
    tracing::subscriber::with_default(subscriber, || {
        paused(|| async {
            let flow = common::payment_that_times_out("payment-flow");
            let report = flow.run(()).await.unwrap();
            assert_eq!(report.status, RunStatus::Failed);
        })
    });
    let closed = capture.closed.lock().unwrap().clone();
    let (_, _, attempt) =
        closed.iter().find(|(n, _, _)| n == "process-payment execute attempt 1").unwrap();
    assert_eq!(attempt.0["otel.status_code"], "ERROR");
    let message = &attempt.0["otel.status_description"];
    assert!(message.starts_with("outcome unknown:"), "{message}");
    let events = capture.events.lock().unwrap().clone();
    let unknown: Vec<_> = events
        .iter()
        .filter(|(_, f)| f.0.get("message").is_some_and(|m| m == "outcome unknown"))
        .collect();
    assert_eq!(unknown.len(), 1, "{events:?}");
    assert_eq!(unknown[0].0, "process-payment execute attempt 1");
    assert_eq!(unknown[0].1.0["orchestrix.outcome"], "unknown");
    assert_eq!(&unknown[0].1.0["error"], message);
}

/// Attributes every exported span would carry with the layer's defaults.
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

fn attr<'a>(s: &'a SpanData, key: &str) -> Option<&'a Value> {
    s.attributes.iter().find(|kv| kv.key.as_str() == key).map(|kv: &KeyValue| &kv.value)
}

/// Real time (not the paused clock: the layer stamps spans with the wall
/// clock), each step 30 ms long, exported by `telemetry::layer`.
#[test]
fn exported_attempt_spans_last_as_long_as_their_attempts() {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder().with_simple_exporter(exporter.clone()).build();
    let subscriber = tracing_subscriber::registry()
        .with(orchestrix_worker::telemetry::layer(provider.tracer("test")));
    tracing::subscriber::with_default(subscriber, || {
        actix_rt::System::new().block_on(async {
            let step_time = Duration::from_millis(30);
            let flow = create::<()>("payment-flow")
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
        })
    });
    provider.force_flush().unwrap();
    let spans = exporter.get_finished_spans().unwrap();
    let by_name = |n: &str| {
        spans.iter().find(|s| s.name == n).unwrap_or_else(|| panic!("no span {n}: {spans:?}"))
    };
    let run = by_name("payment-flow run");
    assert_eq!(run.parent_span_id, SpanId::INVALID);
    assert_eq!(run.status, Status::error("Payment declined: limit exceeded"));
    for name in [
        "reserve-stock execute attempt 1",
        "process-payment execute attempt 1",
        "process-payment execute attempt 2",
        "reserve-stock compensate attempt 1",
    ] {
        let a = by_name(name);
        assert_eq!(a.parent_span_id, run.span_context.span_id(), "{name}");
        let took = a.end_time.duration_since(a.start_time).unwrap();
        assert!(took >= Duration::from_millis(30), "{name} lasted {took:?}, its handler 30 ms");
        assert!(
            run.start_time <= a.start_time && a.end_time <= run.end_time,
            "{name} inside the run"
        );
        assert_eq!(a.span_kind, SpanKind::Internal, "{name}: in-process");
        assert!(matches!(attr(a, "orchestrix.attempt"), Some(Value::I64(_))), "{name}");
        let failed = name.starts_with("process-payment");
        let want =
            if failed { Status::error("Payment declined: limit exceeded") } else { Status::Unset };
        assert_eq!(a.status, want, "{name}");
    }
    for s in spans.iter() {
        for key in NOISE {
            assert!(attr(s, key).is_none(), "{}: {key} is noise", s.name);
        }
    }
    let retry = run.events.iter().find(|e| e.name == "retry scheduled").unwrap();
    let eattr = |k: &str| retry.attributes.iter().find(|kv| kv.key.as_str() == k).unwrap();
    assert_eq!(eattr("attempt").value, Value::I64(1));
    assert_eq!(eattr("delay_ms").value, Value::I64(10));
}

/// The sampler decides once per run: with one that samples half the traces
/// (by trace id, as `OTEL_TRACES_SAMPLER=parentbased_traceidratio` does),
/// a run is either exported whole (its run span and every attempt) or not
/// at all, and for a run left out not even the attempts' spans are made.
#[test]
fn a_run_the_sampler_leaves_out_makes_no_attempt_spans() {
    use opentelemetry_sdk::trace::Sampler;
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(0.5))))
        .with_simple_exporter(exporter.clone())
        .build();
    let capture = Capture::default();
    let subscriber = tracing_subscriber::registry()
        .with(capture.clone())
        .with(orchestrix_worker::telemetry::layer(provider.tracer("test")));
    let runs = 40;
    tracing::subscriber::with_default(subscriber, || {
        actix_rt::System::new().block_on(async {
            let flow = create::<()>("sampled")
                .step("one", |_| async { Ok(()) })
                .step("two", |_| async { Ok(()) });
            for _ in 0..runs {
                assert_eq!(flow.run(()).await.unwrap().status, RunStatus::Completed);
            }
        })
    });
    provider.force_flush().unwrap();
    let spans = exporter.get_finished_spans().unwrap();
    let exported_runs = spans.iter().filter(|s| s.name == "sampled run").count();
    let exported_attempts = spans.iter().filter(|s| s.name.contains(" attempt ")).count();
    assert!(0 < exported_runs && exported_runs < runs, "about half: {exported_runs} of {runs}");
    assert_eq!(exported_attempts, 2 * exported_runs, "whole runs or nothing");
    // Made at all (exported or not): attempts of sampled runs only.
    let made =
        capture.closed.lock().unwrap().iter().filter(|(n, _, _)| n.contains(" attempt ")).count();
    assert_eq!(made, exported_attempts, "no attempt span for a run left out");
}
