//! OTLP export from the real binaries: the `orchestrix` coordinator and the
//! example worker send their spans over OTLP (HTTP and gRPC) to receivers in
//! this test, and a saga arrives as one trace that reads right in a backend:
//! what an on-call engineer sees is asserted here, span by span, for a run
//! that succeeds and one that fails and rolls back (see
//! docs/observability.md). And an exporter whose endpoint is down slows
//! nothing down.

#![allow(clippy::unwrap_used)]

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::metrics::v1::metric::Data;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::status::StatusCode;
use orchestrix_integration_tests::{ChildProcess, NatsServer, built, free_port};
use prost::Message as _;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

const SECS: Duration = Duration::from_secs(1);

/// A span as received: service, name, trace id, span id, parent id, and the
/// whole OTLP span.
#[derive(Debug, Clone)]
struct Got {
    service: String,
    name: String,
    trace: Vec<u8>,
    id: Vec<u8>,
    parent: Vec<u8>,
    span: opentelemetry_proto::tonic::trace::v1::Span,
}

/// Metrics as received: (service, metric).
type Metrics = Arc<Mutex<Vec<(String, opentelemetry_proto::tonic::metrics::v1::Metric)>>>;

/// A minimal OTLP/HTTP receiver on 127.0.0.1: POST /v1/traces and
/// /v1/metrics, protobuf bodies.
async fn receiver() -> (u16, Arc<Mutex<Vec<Got>>>, Metrics) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let got: Arc<Mutex<Vec<Got>>> = Arc::default();
    let metrics: Metrics = Arc::default();
    let (sink, msink) = (got.clone(), metrics.clone());
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (sink, msink) = (sink.clone(), msink.clone());
            tokio::spawn(async move {
                let mut stream = BufReader::new(stream);
                loop {
                    let mut len = 0usize;
                    let mut path = String::new();
                    let mut line = String::new();
                    loop {
                        line.clear();
                        if stream.read_line(&mut line).await.unwrap_or(0) == 0 {
                            return;
                        }
                        if line == "\r\n" {
                            break;
                        }
                        if path.is_empty() {
                            path = line.split_whitespace().nth(1).unwrap_or_default().to_owned();
                        }
                        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                            len = v.trim().parse().unwrap_or(0);
                        }
                    }
                    let mut body = vec![0; len];
                    if stream.read_exact(&mut body).await.is_err() {
                        return;
                    }
                    if path == "/v1/metrics" {
                        if let Ok(req) = ExportMetricsServiceRequest::decode(body.as_slice()) {
                            keep_metrics(&msink, req);
                        }
                    } else if let Ok(req) = ExportTraceServiceRequest::decode(body.as_slice()) {
                        keep_spans(&sink, req);
                    }
                    let ok = b"HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n";
                    if stream.get_mut().write_all(ok).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (port, got, metrics)
}

type Spans = Arc<Mutex<Vec<Got>>>;

/// The `service.name` of an OTLP resource.
fn service_name(resource: Option<&opentelemetry_proto::tonic::resource::v1::Resource>) -> String {
    resource
        .iter()
        .flat_map(|r| &r.attributes)
        .find(|kv| kv.key == "service.name")
        .and_then(|kv| kv.value.as_ref()?.value.clone())
        .map(|v| match v {
            Value::StringValue(s) => s,
            other => format!("{other:?}"),
        })
        .unwrap_or_default()
}

/// Keeps the metrics of an export request, whichever transport brought it.
fn keep_metrics(sink: &Metrics, req: ExportMetricsServiceRequest) {
    let mut out = sink.lock().unwrap();
    for rm in req.resource_metrics {
        let service = service_name(rm.resource.as_ref());
        for sm in rm.scope_metrics {
            for m in sm.metrics {
                out.push((service.clone(), m));
            }
        }
    }
}

/// Keeps the spans of an export request, whichever transport brought it.
fn keep_spans(sink: &Spans, req: ExportTraceServiceRequest) {
    let mut out = sink.lock().unwrap();
    for rs in req.resource_spans {
        let service = service_name(rs.resource.as_ref());
        for ss in rs.scope_spans {
            for s in ss.spans {
                out.push(Got {
                    service: service.clone(),
                    name: s.name.clone(),
                    trace: s.trace_id.clone(),
                    id: s.span_id.clone(),
                    parent: s.parent_span_id.clone(),
                    span: s,
                });
            }
        }
    }
}

/// How long each handler of the example worker takes here: long enough that
/// a span ending at its send (0 ms) cannot pass for one covering its child.
const STEP_MS: u64 = 20;

/// Starts the coordinator (with `env`) and the example worker (with
/// `worker_env`), then runs the quick start's payment once it is accepted
/// (the coordinator may still be starting) and returns that run's output.
async fn start_and_run(
    url: &str,
    env: &[(&str, &str)],
    worker_env: &[(&str, &str)],
) -> (ChildProcess, ChildProcess, std::process::Output) {
    let coordinator = ChildProcess::spawn_with_env(
        &built("orchestrix"),
        &["--nats", url, "serve", "--store", "memory", "--flows", &flows()],
        env,
    );
    let delay = STEP_MS.to_string();
    let worker = ChildProcess::spawn_with_env(
        &built("examples/payment_worker"),
        &["--nats", url, "--step-delay-ms", &delay],
        worker_env,
    );
    worker.wait_for_line("worker ", 30 * SECS).await;
    let mut out = run_payment(url, 50).await;
    for _ in 0..50 {
        if out.status.code() == Some(0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        out = run_payment(url, 50).await;
    }
    (coordinator, worker, out)
}

/// A run's report, as `orchestrix run --json` prints it.
fn report_of(out: &std::process::Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out:?}"))
}

/// An attribute of a span (or event).
fn attr<'a>(attrs: &'a [KeyValue], key: &str) -> Option<&'a Value> {
    attrs.iter().find(|kv| kv.key == key).and_then(|kv| kv.value.as_ref()?.value.as_ref())
}

fn str_attr(attrs: &[KeyValue], key: &str) -> Option<String> {
    match attr(attrs, key)? {
        Value::StringValue(s) => Some(s.clone()),
        other => panic!("{key} is not a string: {other:?}"),
    }
}

/// An integer attribute: anything else (a number as a string) fails.
fn int_attr(attrs: &[KeyValue], key: &str) -> i64 {
    match attr(attrs, key) {
        Some(Value::IntValue(n)) => *n,
        other => panic!("{key} is not an integer: {other:?}"),
    }
}

/// The spans of the run `run_id` once both processes' spans have arrived:
/// (coordinator span, worker span under it) for each name pair of `expect`.
async fn wait_for_run(sink: &Spans, run_id: &str, expect: &[(&str, &str)]) -> Vec<Got> {
    let deadline = Instant::now() + 30 * SECS;
    loop {
        let spans = sink.lock().unwrap().clone();
        let run = spans.iter().find(|s| {
            s.name == "payment-flow run"
                && str_attr(&s.span.attributes, "orchestrix.run_id").as_deref() == Some(run_id)
        });
        if let Some(run) = run {
            let trace: Vec<Got> = spans.iter().filter(|s| s.trace == run.trace).cloned().collect();
            let have = |svc: &str, n: &str| trace.iter().any(|s| s.service == svc && s.name == n);
            if expect.iter().all(|(a, h)| have("orchestrix", a) && have("payment-worker", h)) {
                return trace;
            }
        }
        assert!(Instant::now() < deadline, "spans of {run_id} not received: {spans:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

const SUCCEEDED: [(&str, &str); 3] = [
    ("reserve-stock execute attempt 1", "reserve-stock execute"),
    ("process-payment execute attempt 1", "process-payment execute"),
    ("send-email execute attempt 1", "send-email execute"),
];

const FAILED: [(&str, &str); 6] = [
    ("reserve-stock execute attempt 1", "reserve-stock execute"),
    ("process-payment execute attempt 1", "process-payment execute"),
    ("process-payment execute attempt 2", "process-payment execute"),
    ("process-payment execute attempt 3", "process-payment execute"),
    ("process-payment execute attempt 4", "process-payment execute"),
    ("reserve-stock compensate attempt 1", "reserve-stock compensate"),
];

/// What the handler of process-payment says when it declines.
const DECLINED: &str = "Payment declined: limit exceeded";

/// Span attributes that say nothing about a run (the layer's defaults).
const NOISE: [&str; 8] = [
    "code.file.path",
    "code.module.name",
    "code.line.number",
    "thread.id",
    "thread.name",
    "target",
    "busy_ns",
    "idle_ns",
];

/// A run's trace as an on-call engineer reads it in a backend: one trace,
/// the run span at its root, a PRODUCER span per attempt and compensation
/// under it, the worker's CONSUMER span for that very command under each,
/// every interval covering its children's, failures with the handler's
/// error as status message, numbers as numbers, no noise attributes.
fn assert_reads_right(trace: &[Got], run_id: &str, expect: &[(&str, &str)], failed: bool) {
    let run = trace.iter().find(|s| s.name == "payment-flow run").unwrap();
    assert_eq!(run.trace.len(), 16);
    assert!(run.parent.is_empty(), "the run span is the root");
    assert_eq!(run.service, "orchestrix");
    assert_eq!(run.span.kind, SpanKind::Internal as i32);
    let status = |g: &Got| {
        let st = g.span.status.clone().unwrap_or_default();
        (st.code, st.message)
    };
    let ok = (StatusCode::Unset as i32, String::new());
    let declined = (StatusCode::Error as i32, DECLINED.to_owned());
    assert_eq!(status(run), if failed { declined.clone() } else { ok.clone() }, "the run");

    // Every span but the root hangs under a span of the trace, and inside it.
    // The worker's span ends once its answer is published, which the
    // coordinator may receive a hair earlier: 2 ms of slack across processes.
    for s in trace {
        assert!(
            s.span.end_time_unix_nano >= s.span.start_time_unix_nano,
            "{}: ends before it starts",
            s.name
        );
        if s.parent.is_empty() {
            assert_eq!(s.id, run.id, "one root: {}", s.name);
            continue;
        }
        let p = trace
            .iter()
            .find(|p| p.id == s.parent)
            .unwrap_or_else(|| panic!("{}: its parent is not in the trace", s.name));
        let slack = if p.service == s.service { 0 } else { 2_000_000 };
        assert!(
            p.span.start_time_unix_nano <= s.span.start_time_unix_nano
                && s.span.end_time_unix_nano <= p.span.end_time_unix_nano + slack,
            "{} [{} ms] is not inside {} [{} ms]",
            s.name,
            (s.span.end_time_unix_nano - s.span.start_time_unix_nano) / 1_000_000,
            p.name,
            (p.span.end_time_unix_nano - p.span.start_time_unix_nano) / 1_000_000,
        );
        for key in NOISE {
            assert!(attr(&s.span.attributes, key).is_none(), "{}: {key} is noise", s.name);
        }
        assert_eq!(str_attr(&s.span.attributes, "orchestrix.run_id").as_deref(), Some(run_id));
    }

    for (attempt, handled) in expect {
        let a = trace
            .iter()
            .find(|s| s.name == *attempt)
            .unwrap_or_else(|| panic!("{attempt}: {trace:?}"));
        assert_eq!((a.service.as_str(), &a.parent), ("orchestrix", &run.id), "{attempt}");
        let h = trace
            .iter()
            .find(|s| s.name == *handled && s.parent == a.id)
            .unwrap_or_else(|| panic!("no {handled} under {attempt}"));
        assert_eq!(h.service, "payment-worker");
        // The attempt lasts from its send to its outcome: at least its handler.
        let took = a.span.end_time_unix_nano - a.span.start_time_unix_nano;
        assert!(
            took >= STEP_MS * 1_000_000,
            "{attempt} lasted {took} ns, its handler {STEP_MS} ms"
        );
        // Messaging: the coordinator produces the command, the worker consumes it.
        assert_eq!(a.span.kind, SpanKind::Producer as i32, "{attempt}");
        assert_eq!(h.span.kind, SpanKind::Consumer as i32, "{handled}");
        let (aa, ha) = (&a.span.attributes, &h.span.attributes);
        assert_eq!(str_attr(aa, "messaging.system").as_deref(), Some("nats"));
        assert_eq!(str_attr(ha, "messaging.system").as_deref(), Some("nats"));
        assert_eq!(str_attr(aa, "messaging.operation.type").as_deref(), Some("send"));
        assert_eq!(str_attr(ha, "messaging.operation.type").as_deref(), Some("process"));
        let message = str_attr(aa, "messaging.message.id").unwrap();
        assert_eq!(str_attr(ha, "messaging.message.id"), Some(message), "{handled}: same command");
        let (step, kind) = handled.split_once(' ').unwrap();
        let subject = str_attr(ha, "messaging.destination.name").unwrap();
        // `{prefix}.step.{flow}.{version}.{step}`: the run's version routes it.
        let parts: Vec<&str> = subject.split('.').collect();
        assert_eq!((parts.len(), parts[..3].join(".")), (5, "orchestrix.step.payment-flow".into()));
        assert_eq!((parts[3].len(), parts[4]), (16, step), "{subject}");
        for attrs in [aa, ha] {
            assert_eq!(str_attr(attrs, "orchestrix.step").as_deref(), Some(step));
            assert_eq!(str_attr(attrs, "orchestrix.kind").as_deref(), Some(kind));
            let n: i64 = attempt.rsplit(' ').next().unwrap().parse().unwrap();
            assert_eq!(int_attr(attrs, "orchestrix.attempt"), n, "{attempt}");
        }
        let worker = str_attr(ha, "orchestrix.worker").unwrap();
        assert!(!worker.starts_with("worker-"), "the worker id names its host: {worker}");
        // A declined payment: the handler's message on both spans.
        let want = if step == "process-payment" && failed { &declined } else { &ok };
        assert_eq!(&status(a), want, "{attempt}");
        assert_eq!(&status(h), want, "{handled}");
    }

    // Retries are events on the run span, their numbers as numbers.
    let retries: Vec<_> = run.span.events.iter().filter(|e| e.name == "retry scheduled").collect();
    assert_eq!(retries.len(), if failed { 3 } else { 0 });
    for (i, e) in retries.iter().enumerate() {
        assert_eq!(str_attr(&e.attributes, "step").as_deref(), Some("process-payment"));
        assert_eq!(int_attr(&e.attributes, "attempt"), i as i64 + 1);
        assert_eq!(int_attr(&e.attributes, "delay_ms"), 1000);
    }
}

/// Runs a payment that succeeds and one that fails (and rolls back), and
/// asserts both traces as received by `sink`.
async fn assert_both_runs(url: &str, first: &std::process::Output, sink: &Spans) {
    assert_eq!(first.status.code(), Some(0), "{first:?}");
    let ok = report_of(first);
    assert_eq!(ok["status"], "completed");
    let ok_id = ok["runId"].as_str().unwrap().to_owned();
    let declined = run_payment(url, 5000).await;
    let failed = report_of(&declined);
    assert_eq!(failed["status"], "failed", "{declined:?}");
    let failed_id = failed["runId"].as_str().unwrap().to_owned();
    let trace = wait_for_run(sink, &ok_id, &SUCCEEDED).await;
    assert_reads_right(&trace, &ok_id, &SUCCEEDED, false);
    let trace = wait_for_run(sink, &failed_id, &FAILED).await;
    assert_reads_right(&trace, &failed_id, &FAILED, true);
}

async fn run_payment(url: &str, amount: u32) -> std::process::Output {
    let input = format!(r#"{{"orderId":"o","amount":{amount},"userId":"u"}}"#);
    let cmd = tokio::process::Command::new(built("orchestrix"))
        .args(["--nats", url, "run", "payment-flow", "--json", "--input", &input])
        .output();
    tokio::time::timeout(60 * SECS, cmd).await.unwrap().unwrap()
}

fn flows() -> String {
    format!("{}/../examples/payment-flow.toml", env!("CARGO_MANIFEST_DIR"))
}

/// The bucket that `v` seconds fall in, with these upper bounds.
fn bucket(bounds: &[f64], v: f64) -> usize {
    bounds.iter().position(|b| v <= *b).unwrap_or(bounds.len())
}

/// The coordinator's duration histograms: seconds, with buckets that tell
/// 1 ms, 10 ms, 100 ms and 1 s apart, and the steps (20 ms each here) not
/// all in the first bucket.
fn assert_duration_histograms(
    metrics: &[(String, opentelemetry_proto::tonic::metrics::v1::Metric)],
) {
    for name in ["orchestrix.step.duration", "orchestrix.run.duration"] {
        let (_, m) = metrics
            .iter()
            .rev()
            .find(|(svc, m)| svc == "orchestrix" && m.name == name)
            .unwrap_or_else(|| panic!("no {name}"));
        assert_eq!(m.unit, "s", "{name}");
        let Some(Data::Histogram(h)) = &m.data else { panic!("{name} is not a histogram") };
        assert!(!h.data_points.is_empty(), "{name}");
        for dp in &h.data_points {
            let b = &dp.explicit_bounds;
            let at: Vec<usize> = [0.001, 0.01, 0.1, 1.0].iter().map(|v| bucket(b, *v)).collect();
            assert!(
                at.windows(2).all(|w| w[0] < w[1]),
                "{name}: buckets {b:?} put 1 ms, 10 ms, 100 ms, 1 s in {at:?}"
            );
            let above_first: u64 = dp.bucket_counts.iter().skip(1).sum();
            assert!(
                above_first > 0,
                "{name}: every observation in the first bucket {:?}",
                dp.bucket_counts
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_and_worker_export_runs_that_read_right_over_otlp_http() {
    let (port, got, metrics) = receiver().await;
    let endpoint = format!("http://127.0.0.1:{port}");
    let (traces, metrics_at) = (format!("{endpoint}/v1/traces"), format!("{endpoint}/v1/metrics"));
    // The signal-specific endpoints (no OTEL_EXPORTER_OTLP_ENDPOINT).
    let env = [
        ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", traces.as_str()),
        ("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", metrics_at.as_str()),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ("OTEL_METRIC_EXPORT_INTERVAL", "200"),
    ];
    let server = NatsServer::start();
    let url = server.url();
    let (_coordinator, _worker, out) = start_and_run(&url, &env, &env).await;
    assert_both_runs(&url, &out, &got).await;

    // And the coordinator's metrics arrive too, with usable histograms.
    let deadline = Instant::now() + 30 * SECS;
    loop {
        let m = metrics.lock().unwrap().clone();
        let has = |n: &str| m.iter().any(|(svc, metric)| svc == "orchestrix" && metric.name == n);
        if has("orchestrix.runs.finished")
            && has("orchestrix.step.attempts")
            && has("orchestrix.run.duration")
            && has("orchestrix.step.duration")
        {
            // Cumulative: the latest export has both runs.
            tokio::time::sleep(Duration::from_millis(500)).await;
            assert_duration_histograms(&metrics.lock().unwrap());
            break;
        }
        assert!(Instant::now() < deadline, "metrics not received: {m:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exporter_whose_endpoint_is_down_slows_nothing() {
    let down = format!("http://127.0.0.1:{}", free_port());
    let server = NatsServer::start();
    let url = server.url();
    for protocol in ["grpc", "http/protobuf"] {
        let env = [
            ("OTEL_EXPORTER_OTLP_ENDPOINT", down.as_str()),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", protocol),
        ];
        let (coordinator, worker, out) = start_and_run(&url, &env, &env).await;
        assert_eq!(out.status.code(), Some(0), "{protocol}: {out:?}");
        // Ten more runs, each well under a second: export failures stay off the path.
        let started = Instant::now();
        for _ in 0..10 {
            assert_eq!(run_payment(&url, 50).await.status.code(), Some(0));
        }
        assert!(started.elapsed() < 20 * SECS, "{protocol}: {:?} for 10 runs", started.elapsed());
        drop((coordinator, worker));
    }
}

/// An OTLP/gRPC collector: the tonic services from the OTLP protos. Traces
/// are kept; metrics requests are only counted (a traces-only backend, such
/// as Jaeger, has no metrics service at all).
#[derive(Clone, Default)]
struct GrpcSink(Spans, Arc<Mutex<usize>>);

#[tonic::async_trait]
impl opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceService
    for GrpcSink
{
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<
        tonic::Response<
            opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse,
        >,
        tonic::Status,
    > {
        keep_spans(&self.0, request.into_inner());
        Ok(tonic::Response::new(Default::default()))
    }
}

#[tonic::async_trait]
impl opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::MetricsService
    for GrpcSink
{
    async fn export(
        &self,
        _request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<
        tonic::Response<
            opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceResponse,
        >,
        tonic::Status,
    > {
        *self.1.lock().unwrap() += 1;
        Ok(tonic::Response::new(Default::default()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_and_worker_export_runs_that_read_right_over_otlp_grpc() {
    use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::MetricsServiceServer;
    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceServiceServer;
    let sink = GrpcSink::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(sink.clone()))
            .add_service(MetricsServiceServer::new(sink.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let endpoint = format!("http://127.0.0.1:{port}");
    // As deploy/docker-compose.yml wires Jaeger: traces only.
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ("OTEL_METRICS_EXPORTER", "none"),
        ("OTEL_METRIC_EXPORT_INTERVAL", "100"),
    ];
    let server = NatsServer::start();
    let url = server.url();
    let (_coordinator, _worker, out) = start_and_run(&url, &env, &env).await;
    assert_both_runs(&url, &out, &sink.0).await;
    // Many export intervals later, not one metrics request was made.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(*sink.1.lock().unwrap(), 0, "OTEL_METRICS_EXPORTER=none still sent metrics");
}
