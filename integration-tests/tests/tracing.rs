//! One saga, one trace: the coordinator's run and attempt spans and the
//! worker's handler spans, across a real NATS server, exported in memory.
//! Alone in its test binary: it installs the global subscriber.

#![allow(clippy::unwrap_used)]

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry::Value;
use opentelemetry::trace::{SpanId, SpanKind, Status};
use orchestrix::{Client, RunOptions, RunStatus, StepContext, StepError, Worker};
use orchestrix_integration_tests::NatsServer;
use orchestrix_proto::Subjects;
use orchestrix_worker::NatsOptions;
use tracing::Instrument;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saga_is_one_trace_across_processes() {
    let (provider, exporter) = support::capture_spans();

    let server = NatsServer::start();
    let conn = NatsOptions::new(server.url()).connect().await.unwrap();
    let toml = "[[flow]]\nname = \"traced\"\n[[flow.step]]\nname = \"reserve\"\ncompensable = true\n[[flow.step]]\nname = \"charge\"\nretries = 1\nretry_delay_ms = 10\n";
    // In memory, no run events and no registry: the spans are the run's alone.
    let node = support::memory_node(conn.clone(), toml).await;
    let coordinator = node.coordinator();
    let seen: Arc<Mutex<Vec<Option<String>>>> = Arc::default();
    let seen_by_handler = seen.clone();
    let worker = Worker::builder()
        .nats(NatsOptions::new(server.url()))
        .steps::<()>("traced", |f| {
            f.step("reserve", |_: StepContext<()>| async { Ok(()) })
                .compensate("reserve", |_| async { Ok(()) })
                .step("charge", move |_| {
                    let seen = seen_by_handler.clone();
                    async move {
                        // The handler's own span, a log line outside it, the
                        // context it would pass on, and work it hands to a task.
                        tracing::info_span!("call the bank").in_scope(|| ());
                        tracing::warn!(code = 51, "the bank declined");
                        // What a handler adds to its command's span, the
                        // usual `tracing-opentelemetry` way.
                        let current = tracing::Span::current();
                        tracing_opentelemetry::OpenTelemetrySpanExt::set_attribute(
                            &current, "order.id", "o-1",
                        );
                        seen.lock().unwrap().push(orchestrix_worker::current_traceparent());
                        tokio::spawn(
                            async { tracing::info_span!("audit").in_scope(|| ()) }
                                .in_current_span(),
                        )
                        .await
                        .unwrap();
                        Err::<(), _>(StepError::retryable("declined"))
                    }
                })
        })
        .start()
        .await
        .unwrap();
    let report = coordinator.run("traced", &(), RunOptions::new()).await.unwrap();
    assert_eq!(report.status, RunStatus::Failed);

    // A traced service (the node's) starts a run over NATS: the run joins the caller's trace.
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
    // Each command has one span in the worker: the `tracing` span its
    // handler runs in carries that span, and is not exported beside it.
    assert!(all.iter().all(|s| s.name != "orchestrix.handle"), "a handler span was exported");
    let handled = spans.iter().filter(|s| s.name.ends_with(" execute")).count();
    assert_eq!(handled, 3, "reserve, and charge twice");
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
        ("reserve execute attempt 1", "reserve execute", false),
        ("charge execute attempt 1", "charge execute", true),
        ("charge execute attempt 2", "charge execute", true),
        ("reserve compensate attempt 1", "reserve compensate", false),
    ] {
        let a = by_name(attempt);
        assert_eq!(a.parent_span_id, run.span_context.span_id(), "{attempt} is a child of the run");
        let want = if failed { Status::error("declined") } else { Status::Unset };
        assert_eq!(a.status, want, "{attempt}: the handler's error is the status message");
        // The worker's span for that very command is the attempt's child, across NATS.
        let h = spans
            .iter()
            .find(|s| s.name == handled && s.parent_span_id == a.span_context.span_id())
            .unwrap_or_else(|| panic!("no {handled} span under {attempt}"));
        assert_eq!(h.status, want, "{handled}");
        // The attempt sends the command, the worker's span processes it.
        assert_eq!(
            (a.span_kind.clone(), h.span_kind.clone()),
            (SpanKind::Producer, SpanKind::Consumer)
        );
        assert!(a.start_time <= h.start_time, "{attempt} starts before {handled}");
        let attr = |s: &opentelemetry_sdk::trace::SpanData, k: &str| {
            s.attributes.iter().find(|kv| kv.key.as_str() == k).map(|kv| kv.value.clone())
        };
        let text = |v: Option<Value>| v.map(|v| v.to_string());
        assert_eq!(text(attr(h, "messaging.system")).as_deref(), Some("nats"));
        assert_eq!(text(attr(a, "messaging.system")).as_deref(), Some("nats"));
        assert_eq!(text(attr(a, "messaging.operation.type")).as_deref(), Some("send"));
        assert_eq!(text(attr(h, "messaging.operation.type")).as_deref(), Some("process"));
        let id = text(attr(a, "messaging.message.id")).expect("the command id");
        assert_eq!(text(attr(h, "messaging.message.id")), Some(id.clone()), "one message");
        assert!(uuid::Uuid::parse_str(&id).is_ok(), "{id}");
        let subject = text(attr(h, "messaging.destination.name")).unwrap();
        assert!(subject.starts_with("orchestrix.step.traced."), "{subject}");
        assert_eq!(text(attr(h, "orchestrix.run_id")), Some(report.run_id.to_string()));
        for s in [a, h] {
            assert!(matches!(attr(s, "orchestrix.attempt"), Some(Value::I64(_))), "{}", s.name);
            for noise in ["code.file.path", "thread.id", "thread.name", "target", "busy_ns"] {
                assert!(attr(s, noise).is_none(), "{}: {noise}", s.name);
            }
        }
    }
    // In the worker: the handler's own spans (also in a task it spawned)
    // hang under the command's span, its log line is an event on it, and
    // `current_traceparent()` names it (what a child run started from the
    // handler joins).
    let charge = |n: u32| {
        let a = by_name(&format!("charge execute attempt {n}")).span_context.span_id();
        spans.iter().find(|s| s.name == "charge execute" && s.parent_span_id == a).unwrap()
    };
    let passed_on = seen.lock().unwrap().clone();
    for n in [1, 2] {
        let h = charge(n);
        for own in ["call the bank", "audit"] {
            let under = spans
                .iter()
                .filter(|s| s.name == own && s.parent_span_id == h.span_context.span_id())
                .count();
            assert_eq!(under, 1, "{own}: the handler's span under attempt {n}'s");
        }
        let order = h.attributes.iter().find(|kv| kv.key.as_str() == "order.id");
        assert_eq!(order.map(|kv| kv.value.to_string()).as_deref(), Some("o-1"), "{order:?}");
        let said = h.events.iter().find(|e| e.name == "the bank declined").expect("the log line");
        let get = |k: &str| said.attributes.iter().find(|kv| kv.key.as_str() == k);
        assert_eq!(get("code").map(|kv| &kv.value), Some(&Value::I64(51)));
        let tp = format!("00-{}-{}-01", h.span_context.trace_id(), h.span_context.span_id());
        assert!(passed_on.contains(&Some(tp.clone())), "{tp} not in {passed_on:?}");
    }
    let attempt_attrs = &by_name("charge execute attempt 2").attributes;
    let get = |k: &str| attempt_attrs.iter().find(|kv| kv.key.as_str() == k).map(|kv| &kv.value);
    assert_eq!(get("orchestrix.attempt"), Some(&Value::I64(2)));
    assert_eq!(get("orchestrix.kind").map(Value::to_string).as_deref(), Some("execute"));
    let retry = run.events.iter().find(|e| e.name == "retry scheduled").unwrap();
    let eattr =
        |k: &str| retry.attributes.iter().find(|kv| kv.key.as_str() == k).map(|kv| &kv.value);
    assert_eq!(eattr("attempt"), Some(&Value::I64(1)));
    assert_eq!(eattr("delay_ms"), Some(&Value::I64(10)));
}
