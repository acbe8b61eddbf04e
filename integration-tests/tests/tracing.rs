//! One saga, one trace: the coordinator's run and attempt spans and the
//! worker's handler spans, across a real NATS server, exported in memory.
//! Alone in its test binary: it installs the global subscriber.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use opentelemetry::trace::{SpanId, Status, TracerProvider as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider};
use orchestrix::{Client, Coordinator, RunOptions, RunStatus, StepContext, StepError, Worker};
use orchestrix_coordinator::flowfile;
use orchestrix_coordinator::nats::{NatsBus, NatsBusOptions, Service};
use orchestrix_integration_tests::NatsServer;
use orchestrix_proto::Subjects;
use orchestrix_worker::NatsOptions;
use tracing::Instrument;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saga_is_one_trace_across_processes() {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder().with_simple_exporter(exporter.clone()).build();
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")))
        .init();

    let server = NatsServer::start();
    let conn = NatsOptions::new(server.url()).connect().await.unwrap();
    let toml = "[[flow]]\nname = \"traced\"\n[[flow.step]]\nname = \"reserve\"\ncompensable = true\n[[flow.step]]\nname = \"charge\"\nretries = 1\nretry_delay_ms = 10\n";
    let bus = NatsBus::start(conn.clone(), NatsBusOptions::default()).await.unwrap();
    let mut b = Coordinator::builder().bus(bus);
    for def in flowfile::parse(toml).unwrap() {
        b = b.flow_def(def);
    }
    let coordinator = b.build().unwrap();
    let worker = Worker::builder()
        .nats(NatsOptions::new(server.url()))
        .flow::<()>("traced", |f| {
            f.step("reserve", |_: StepContext<()>| async { Ok(()) })
                .compensate("reserve", |_| async { Ok(()) })
                .step("charge", |_| async { Err::<(), _>(StepError::retryable("declined")) })
        })
        .start()
        .await
        .unwrap();
    let report = coordinator.run("traced", &(), RunOptions::new()).await.unwrap();
    assert_eq!(report.status, RunStatus::Failed);

    // A traced service starts a run over NATS: the run joins the caller's trace.
    let _service =
        Service::start(coordinator.clone(), conn.clone(), &Subjects::default()).await.unwrap();
    let client = Client::new(conn, Subjects::default());
    let caller = tracing::info_span!("caller", otel.name = "checkout request");
    let from_client =
        client.run("traced", &(), RunOptions::new()).instrument(caller).await.unwrap();
    assert_eq!(from_client.status, RunStatus::Failed);
    worker.shutdown().await;
    // The worker's spans close after its outcome is sent: give them a moment.
    tokio::time::sleep(Duration::from_millis(200)).await;
    provider.force_flush().unwrap();

    let all = exporter.get_finished_spans().unwrap();
    let caller = all.iter().find(|s| s.name == "checkout request").unwrap();
    let joined = all
        .iter()
        .find(|s| s.name == "traced run" && s.parent_span_id == caller.span_context.span_id())
        .expect("the run started through the client is a child of the caller's span");
    assert_eq!(joined.span_context.trace_id(), caller.span_context.trace_id());
    // The rest checks the first run, started in-process with no span around it.
    let first_trace = all
        .iter()
        .find(|s| s.name == "traced run" && s.parent_span_id == SpanId::INVALID)
        .unwrap()
        .span_context
        .trace_id();
    let spans: Vec<_> =
        all.iter().filter(|s| s.span_context.trace_id() == first_trace).cloned().collect();
    let by_name =
        |n: &str| spans.iter().find(|s| s.name == n).unwrap_or_else(|| panic!("no span {n}"));
    let run = by_name("traced run");
    let trace = run.span_context.trace_id();
    assert_eq!(run.parent_span_id, SpanId::INVALID, "the run span is the root");
    assert!(matches!(run.status, Status::Error { .. }));
    assert!(
        spans.iter().all(|s| s.span_context.trace_id() == trace),
        "one trace for the whole saga"
    );

    for (attempt, handled, failed) in [
        ("reserve attempt 1", "reserve execute", false),
        ("charge attempt 1", "charge execute", true),
        ("charge attempt 2", "charge execute", true),
        ("compensate reserve", "reserve compensate", false),
    ] {
        let a = by_name(attempt);
        assert_eq!(a.parent_span_id, run.span_context.span_id(), "{attempt} is a child of the run");
        assert_eq!(matches!(a.status, Status::Error { .. }), failed, "{attempt}: {:?}", a.status);
        // The worker's span for that very command is the attempt's child, across NATS.
        let h = spans
            .iter()
            .find(|s| s.name == handled && s.parent_span_id == a.span_context.span_id())
            .unwrap_or_else(|| panic!("no {handled} span under {attempt}"));
        assert_eq!(matches!(h.status, Status::Error { .. }), failed);
        let attr = |k: &str| {
            h.attributes.iter().find(|kv| kv.key.as_str() == k).map(|kv| kv.value.to_string())
        };
        assert_eq!(attr("messaging.system").as_deref(), Some("nats"));
        assert_eq!(attr("orchestrix.run_id"), Some(report.run_id.to_string()));
    }
    let attempt_attrs = &by_name("charge attempt 2").attributes;
    let get = |k: &str| {
        attempt_attrs.iter().find(|kv| kv.key.as_str() == k).map(|kv| kv.value.to_string())
    };
    assert_eq!(get("orchestrix.attempt").as_deref(), Some("2"));
    assert_eq!(get("orchestrix.kind").as_deref(), Some("execute"));
    assert_eq!(get("messaging.system").as_deref(), Some("nats"));
}
