//! OTLP export from the real binaries: the `orchestrix` coordinator and the
//! example worker send their spans over OTLP/HTTP to a receiver in this test,
//! and a saga arrives as one trace. And an exporter whose endpoint is down
//! slows nothing down.

#![allow(clippy::unwrap_used)]

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use orchestrix_integration_tests::{ChildProcess, NatsServer, built, free_port};
use prost::Message as _;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

const SECS: Duration = Duration::from_secs(1);

/// A span as received: service, name, trace id, span id, parent id.
#[derive(Debug, Clone)]
struct Got {
    service: String,
    name: String,
    trace: Vec<u8>,
    id: Vec<u8>,
    parent: Vec<u8>,
}

type Metrics = Arc<Mutex<Vec<(String, String)>>>;

/// A minimal OTLP/HTTP receiver on 127.0.0.1: POST /v1/traces and
/// /v1/metrics, protobuf bodies. Metrics are kept as (service, name).
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
                            let mut out = msink.lock().unwrap();
                            for rm in req.resource_metrics {
                                let service = service_name(rm.resource.as_ref());
                                for sm in rm.scope_metrics {
                                    for m in sm.metrics {
                                        out.push((service.clone(), m.name));
                                    }
                                }
                            }
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

/// Keeps the spans of an export request, whichever transport brought it.
fn keep_spans(sink: &Spans, req: ExportTraceServiceRequest) {
    let mut out = sink.lock().unwrap();
    for rs in req.resource_spans {
        let service = service_name(rs.resource.as_ref());
        for ss in rs.scope_spans {
            for s in ss.spans {
                out.push(Got {
                    service: service.clone(),
                    name: s.name,
                    trace: s.trace_id,
                    id: s.span_id,
                    parent: s.parent_span_id,
                });
            }
        }
    }
}

/// Starts the coordinator and the example worker with `env`, then runs the
/// quick start's payment once it is accepted (the coordinator may still be
/// starting) and returns that run's output.
async fn start_and_run(
    url: &str,
    env: &[(&str, &str)],
) -> (ChildProcess, ChildProcess, std::process::Output) {
    let coordinator = ChildProcess::spawn_with_env(
        &built("orchestrix"),
        &["--nats", url, "serve", "--store", "memory", "--flows", &flows()],
        env,
    );
    let worker =
        ChildProcess::spawn_with_env(&built("examples/payment_worker"), &["--nats", url], env);
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

/// Waits until both processes' spans of a run have arrived.
async fn wait_for_trace(sink: &Spans) -> Vec<Got> {
    let deadline = Instant::now() + 30 * SECS;
    loop {
        let spans = sink.lock().unwrap().clone();
        let have = |svc: &str, name: &str| spans.iter().any(|s| s.service == svc && s.name == name);
        if have("orchestrix", "payment-flow run") && have("payment-worker", "send-email execute") {
            return spans;
        }
        assert!(Instant::now() < deadline, "spans not received: {spans:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The run span, an attempt per step under it, and under each attempt the
/// worker's span for that command — from two processes, one trace.
fn assert_one_trace(spans: &[Got]) {
    let run = spans.iter().find(|s| s.name == "payment-flow run").unwrap();
    assert_eq!(run.trace.len(), 16);
    let in_trace: Vec<&Got> = spans.iter().filter(|s| s.trace == run.trace).collect();
    for (attempt, handled) in [
        ("reserve-stock attempt 1", "reserve-stock execute"),
        ("process-payment attempt 1", "process-payment execute"),
        ("send-email attempt 1", "send-email execute"),
    ] {
        let a = in_trace
            .iter()
            .find(|s| s.name == attempt)
            .unwrap_or_else(|| panic!("{attempt}: {in_trace:?}"));
        assert_eq!((a.service.as_str(), &a.parent), ("orchestrix", &run.id));
        let h = in_trace.iter().find(|s| s.name == handled).unwrap_or_else(|| panic!("{handled}"));
        assert_eq!(
            (h.service.as_str(), &h.parent),
            ("payment-worker", &a.id),
            "{handled} under {attempt}"
        );
    }
}

async fn run_payment(url: &str, amount: u32) -> std::process::Output {
    let input = format!(r#"{{"order_id":"o","amount":{amount},"user_id":"u"}}"#);
    let cmd = tokio::process::Command::new(built("orchestrix"))
        .args(["--nats", url, "run", "payment-flow", "--json", "--input", &input])
        .output();
    tokio::time::timeout(60 * SECS, cmd).await.unwrap().unwrap()
}

fn flows() -> String {
    format!("{}/../examples/payment-flow.toml", env!("CARGO_MANIFEST_DIR"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_and_worker_export_one_trace_over_otlp_http() {
    let (port, got, metrics) = receiver().await;
    let endpoint = format!("http://127.0.0.1:{port}");
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ("OTEL_METRIC_EXPORT_INTERVAL", "200"),
    ];
    let server = NatsServer::start();
    let url = server.url();
    let (_coordinator, _worker, out) = start_and_run(&url, &env).await;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let run_id = report["runId"].as_str().unwrap().to_owned();

    // Both processes flush within their batch delay.
    let spans = wait_for_trace(&got).await;
    assert_one_trace(&spans);
    assert!(!run_id.is_empty());
    // And the coordinator's metrics arrive too.
    let deadline = Instant::now() + 30 * SECS;
    loop {
        let m = metrics.lock().unwrap().clone();
        let has = |n: &str| m.iter().any(|(svc, name)| svc == "orchestrix" && name == n);
        if has("orchestrix.runs.finished")
            && has("orchestrix.step.attempts")
            && has("orchestrix.run.duration")
        {
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
        let (coordinator, worker, out) = start_and_run(&url, &env).await;
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

/// An OTLP/gRPC collector: the tonic service from the OTLP protos.
#[derive(Clone, Default)]
struct GrpcSink(Spans);

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_and_worker_export_one_trace_over_otlp_grpc() {
    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceServiceServer;
    let sink = GrpcSink::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let service = TraceServiceServer::new(sink.clone());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let endpoint = format!("http://127.0.0.1:{port}");
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
    ];
    let server = NatsServer::start();
    let url = server.url();
    let (_coordinator, _worker, out) = start_and_run(&url, &env).await;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let spans = wait_for_trace(&sink.0).await;
    assert_one_trace(&spans);
}
