//! A run the sampler leaves out leaves nothing in the trace backend, across
//! processes: not the coordinator's spans, not the worker's, and not the
//! spans a handler makes itself (they inherit "not sampled" from the
//! command). A sampled run beside it shows those spans are exported.
//! Alone in its test binary: it installs the global subscriber.

#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use orchestrix::{RunOptions, RunStatus, StepContext, Worker};
use orchestrix_integration_tests::NatsServer;
use orchestrix_worker::NatsOptions;

/// A caller's trace that its own sampler left out (flags `00`).
const UNSAMPLED_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
/// The trace of a command sent as coordinators older than the command's
/// `traceparent` field sent it: in a header.
const HEADER_TRACE: &str = "0af7651916cd43dd8448eb211c80319c";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_left_out_by_the_sampler_exports_no_span_anywhere() {
    let (provider, exporter) = support::capture_spans();

    let server = NatsServer::start();
    let conn = NatsOptions::new(server.url()).connect().await.unwrap();
    let toml = "[[flow]]\nname = \"sampling\"\n[[flow.step]]\nname = \"charge\"\n";
    let node = support::memory_node(conn.clone(), toml).await;
    let worker = Worker::builder()
        .nats(NatsOptions::new(server.url()))
        .steps::<()>("sampling", |f| {
            f.step("charge", |_: StepContext<()>| async {
                // A handler's own span, as a service would make one, and
                // work it hands to a task with its OpenTelemetry context.
                tracing::info_span!("call the bank").in_scope(|| ());
                let task = async { tracing::info_span!("handed on").in_scope(|| ()) };
                tokio::spawn(opentelemetry::context::FutureExt::with_current_context(task))
                    .await
                    .unwrap();
                Ok(())
            })
        })
        .start()
        .await
        .unwrap();
    // A plain subscriber beside the worker's queue group sees each command.
    let mut commands = conn
        .subscribe(orchestrix_proto::Subjects::default().step_any_version("sampling", "*"))
        .await
        .unwrap();
    conn.flush().await.unwrap();
    let coordinator = node.coordinator();
    let left_out =
        RunOptions::new().traceparent(format!("00-{UNSAMPLED_TRACE}-00f067aa0ba902b7-00"));
    let report = coordinator.run("sampling", &(), left_out).await.unwrap();
    assert_eq!(report.status, RunStatus::Completed);
    let report = coordinator.run("sampling", &(), RunOptions::new()).await.unwrap();
    assert_eq!(report.status, RunStatus::Completed);
    // Neither command has a header to parse: the left-out run's says so in
    // its body, the sampled run's carries its context there.
    let (mut sent, mut last) = (Vec::new(), None);
    for sampled in [Some(false), None] {
        let msg =
            tokio::time::timeout(Duration::from_secs(5), futures::StreamExt::next(&mut commands))
                .await
                .unwrap()
                .unwrap();
        let cmd: orchestrix_proto::StepCommand = orchestrix_proto::decode(&msg.payload).unwrap();
        assert_eq!(cmd.sampled, sampled);
        assert!(msg.headers.is_none(), "{:?}", msg.headers);
        sent.push(cmd.traceparent.clone());
        last = Some((msg.subject, cmd));
    }
    assert_eq!(sent[0], None, "the left-out run's command names no context");
    // A command as an older coordinator sends it, its context in a header,
    // here beside a body value that does not parse (ignored: the header
    // decides).
    let (subject, mut cmd) = last.unwrap();
    (cmd.command_id, cmd.traceparent, cmd.acks) =
        (uuid::Uuid::new_v4(), Some("00-garbage".into()), false);
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(
        orchestrix_proto::headers::TRACEPARENT,
        format!("00-{HEADER_TRACE}-00f067aa0ba902b7-01").as_str(),
    );
    let inbox = conn.new_inbox();
    let mut replies = conn.subscribe(inbox.clone()).await.unwrap();
    let bytes = orchestrix_proto::encode(&cmd).unwrap().into();
    conn.publish_with_reply_and_headers(subject, inbox, headers, bytes).await.unwrap();
    loop {
        let msg =
            tokio::time::timeout(Duration::from_secs(5), futures::StreamExt::next(&mut replies))
                .await
                .unwrap()
                .unwrap();
        if orchestrix_proto::decode::<orchestrix_proto::StepOutcome>(&msg.payload).is_ok() {
            break;
        }
    }
    worker.shutdown().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    provider.force_flush().unwrap();

    let mut all = exporter.get_finished_spans().unwrap();
    // The worker's span of the command with a header is under that context.
    let (by_header, rest): (Vec<_>, Vec<_>) =
        all.into_iter().partition(|s| s.span_context.trace_id().to_string() == HEADER_TRACE);
    all = rest;
    let names: Vec<&str> = by_header.iter().map(|s| s.name.as_ref()).collect();
    assert_eq!(names, ["call the bank", "handed on", "charge execute"], "{names:?}");
    assert_eq!(by_header[2].parent_span_id.to_string(), "00f067aa0ba902b7");
    let names: Vec<&str> = all.iter().map(|s| s.name.as_ref()).collect();
    let left_out: Vec<&str> = all
        .iter()
        .filter(|s| s.span_context.trace_id().to_string() == UNSAMPLED_TRACE)
        .map(|s| s.name.as_ref())
        .collect();
    assert!(left_out.is_empty(), "spans of the unsampled run were exported: {left_out:?}");
    // The sampled run: run, attempt, the worker's span and the handler's own.
    let run = all.iter().find(|s| s.name == "sampling run").expect("the sampled run's span");
    let in_trace: Vec<&str> = all
        .iter()
        .filter(|s| s.span_context.trace_id() == run.span_context.trace_id())
        .map(|s| s.name.as_ref())
        .collect();
    for name in
        ["sampling run", "charge execute attempt 1", "charge execute", "call the bank", "handed on"]
    {
        assert!(in_trace.contains(&name), "{name} missing from {in_trace:?} (all: {names:?})");
    }
    // The sampled command named its attempt's span, which the worker's is under.
    let attempt = all.iter().find(|s| s.name == "charge execute attempt 1").unwrap();
    let sc = &attempt.span_context;
    assert_eq!(sent[1], Some(format!("00-{}-{}-01", sc.trace_id(), sc.span_id())));
    let handled = all.iter().find(|s| s.name == "charge execute").unwrap();
    assert_eq!(handled.parent_span_id, sc.span_id());
    assert_eq!(all.len(), in_trace.len(), "{names:?}");
}
