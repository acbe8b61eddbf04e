//! Installing logs and trace export in a binary: what `orchestrix`, the
//! example worker and your services call once at start.
//!
//! Spans and metrics (see [`crate::metrics`]) go over OTLP when the standard variables ask for it:
//! `OTEL_EXPORTER_OTLP_ENDPOINT` (both signals), or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` / `OTEL_EXPORTER_OTLP_METRICS_ENDPOINT`
//! (one each); `OTEL_TRACES_EXPORTER=none` / `OTEL_METRICS_EXPORTER=none`
//! turn one off; `OTEL_EXPORTER_OTLP_PROTOCOL` (or the per-signal
//! `OTEL_EXPORTER_OTLP_{TRACES,METRICS}_PROTOCOL`) = `grpc` (default) or
//! `http/protobuf`; `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`. With none
//! of them set, nothing is exported and only logs are written (to stderr,
//! filtered by `RUST_LOG`).

use std::fmt;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Flushes and shuts the exporter down when dropped (on a thread of its own:
/// a gRPC exporter must not be flushed from an async worker thread).
#[must_use = "spans are flushed when the guard is dropped"]
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
    meters: Option<SdkMeterProvider>,
}

impl fmt::Debug for TelemetryGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TelemetryGuard")
            .field("exporting", &self.provider.is_some())
            .finish_non_exhaustive()
    }
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        let (provider, meters) = (self.provider.take(), self.meters.take());
        if provider.is_none() && meters.is_none() {
            return;
        }
        let _ = std::thread::spawn(move || {
            if let Some(p) = provider {
                let _ = p.force_flush();
                let _ = p.shutdown();
            }
            if let Some(m) = meters {
                let _ = m.force_flush();
                let _ = m.shutdown();
            }
        })
        .join();
    }
}

fn set(var: &str) -> bool {
    std::env::var(var).is_ok_and(|s| !s.trim().is_empty())
}

/// `OTEL_{signal}_EXPORTER` says `none`.
fn turned_off(var: &str) -> bool {
    std::env::var(var).is_ok_and(|s| s.split(',').any(|e| e.trim().eq_ignore_ascii_case("none")))
}

/// The protocol of a signal: `OTEL_EXPORTER_OTLP_{signal}_PROTOCOL`, else
/// `OTEL_EXPORTER_OTLP_PROTOCOL`; HTTP when it starts with `http`.
fn http_for(signal_var: &str) -> bool {
    std::env::var(signal_var)
        .ok()
        .filter(|s| !s.trim().is_empty())
        .or_else(|| std::env::var("OTEL_EXPORTER_OTLP_PROTOCOL").ok())
        .unwrap_or_default()
        .trim()
        .starts_with("http")
}

/// Installs logging (stderr, `RUST_LOG`, else `default_level`) and, when the
/// `OTEL_*` variables ask for it, OTLP export of spans and metrics for
/// `service` (unless `OTEL_SERVICE_NAME` names it). Call once, inside a
/// tokio runtime (the gRPC exporter needs one); keep the guard until exit.
///
/// Spans are exported when `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or
/// `OTEL_EXPORTER_OTLP_ENDPOINT` is set, unless `OTEL_TRACES_EXPORTER=none`;
/// metrics when `OTEL_EXPORTER_OTLP_METRICS_ENDPOINT` or
/// `OTEL_EXPORTER_OTLP_ENDPOINT` is set, unless `OTEL_METRICS_EXPORTER=none`
/// (a traces-only backend such as Jaeger: otherwise every export interval
/// logs an error).
pub fn init(service: &str, default_level: &str) -> TelemetryGuard {
    let export = Export::from_env();
    let export = (export.traces || export.metrics).then_some(export);
    init_with(service, default_level, export)
}

/// Where to export, when not from the `OTEL_*` variables.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Export {
    /// Base URL of the collector; `None`: the exporter's own default/env
    /// (which reads the signal's endpoint variable, then
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`).
    pub endpoint: Option<String>,
    /// Spans over OTLP/HTTP (protobuf) rather than gRPC.
    pub http: bool,
    /// Export spans.
    pub traces: bool,
    /// Export metrics.
    pub metrics: bool,
    /// Metrics over OTLP/HTTP (protobuf) rather than gRPC.
    pub metrics_http: bool,
}

impl Export {
    /// From the `OTEL_*` variables: which signals (an endpoint for it, and
    /// its `OTEL_{TRACES,METRICS}_EXPORTER` not `none`), over which protocol
    /// (`OTEL_EXPORTER_OTLP_{TRACES,METRICS}_PROTOCOL`, else
    /// `OTEL_EXPORTER_OTLP_PROTOCOL`); the endpoints are left to the
    /// exporters, which read them themselves.
    pub fn from_env() -> Self {
        let any = set("OTEL_EXPORTER_OTLP_ENDPOINT");
        Export {
            endpoint: None,
            http: http_for("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"),
            traces: (any || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
                && !turned_off("OTEL_TRACES_EXPORTER"),
            metrics: (any || set("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"))
                && !turned_off("OTEL_METRICS_EXPORTER"),
            metrics_http: http_for("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL"),
        }
    }

    /// OTLP/HTTP to `base`, spans and metrics (`/v1/traces` and `/v1/metrics`
    /// are appended here: an endpoint given in code is used verbatim by the
    /// exporter).
    pub fn http(base: &str) -> Self {
        Export {
            endpoint: Some(base.trim_end_matches('/').to_owned()),
            http: true,
            traces: true,
            metrics: true,
            metrics_http: true,
        }
    }

    /// The same, without metrics (for a traces-only collector).
    pub fn without_metrics(self) -> Self {
        Export { metrics: false, ..self }
    }
}

/// Like [`init`], exporting as `export` says (`None`: no export).
pub fn init_with(service: &str, default_level: &str, export: Option<Export>) -> TelemetryGuard {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    // Colours only for a person at a terminal, and never with NO_COLOR set.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(ansi);
    // Trace context travels in `traceparent` headers, W3C style.
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let provider = export.as_ref().filter(|e| e.traces).and_then(|e| build_provider(service, e));
    let meters = export.as_ref().filter(|e| e.metrics).and_then(|e| build_meters(service, e));
    if let Some(m) = &meters {
        // `RunMetrics::global()` records on it.
        opentelemetry::global::set_meter_provider(m.clone());
    }
    let otel = provider.as_ref().map(|p| layer(p.tracer("orchestrix")));
    let _ = tracing_subscriber::registry().with(filter).with(fmt).with(otel).try_init();
    TelemetryGuard { provider, meters }
}

/// The `tracing` → OpenTelemetry layer as Orchestrix's spans want it: no
/// source locations (`code.*`), thread ids and names (`thread.*`), `target`,
/// or busy/idle timings (`busy_ns`, `idle_ns`) on every span — attributes
/// that say nothing about a run and crowd out the ones that do.
/// A service with its own OpenTelemetry setup can use it too.
pub fn layer<S, T>(tracer: T) -> tracing_opentelemetry::OpenTelemetryLayer<S, T>
where
    S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
    T: opentelemetry::trace::Tracer + 'static,
    T::Span: Send + Sync,
{
    tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_location(false)
        .with_threads(false)
        .with_target(false)
        .with_tracked_inactivity(false)
}

#[cfg(not(feature = "otlp"))]
fn build_meters(_service: &str, _export: &Export) -> Option<SdkMeterProvider> {
    eprintln!("warning: OTLP metrics disabled: built without the `otlp` feature");
    None
}

#[cfg(not(feature = "otlp"))]
fn build_provider(_service: &str, _export: &Export) -> Option<SdkTracerProvider> {
    eprintln!("warning: OTLP export disabled: built without the `otlp` feature");
    None
}

#[cfg(feature = "otlp")]
fn build_meters(service: &str, export: &Export) -> Option<SdkMeterProvider> {
    use opentelemetry_otlp::WithExportConfig;
    let exporter = match (&export.endpoint, export.metrics_http) {
        (Some(base), true) => opentelemetry_otlp::MetricExporter::builder()
            .with_http()
            .with_endpoint(format!("{base}/v1/metrics"))
            .build(),
        (None, true) => opentelemetry_otlp::MetricExporter::builder().with_http().build(),
        (Some(base), false) => {
            opentelemetry_otlp::MetricExporter::builder().with_tonic().with_endpoint(base).build()
        }
        (None, false) => opentelemetry_otlp::MetricExporter::builder().with_tonic().build(),
    };
    let exporter = exporter.map_err(|e| eprintln!("warning: OTLP metrics disabled: {e}")).ok()?;
    let name = std::env::var("OTEL_SERVICE_NAME").unwrap_or_else(|_| service.to_owned());
    let resource = opentelemetry_sdk::Resource::builder().with_service_name(name).build();
    Some(
        SdkMeterProvider::builder()
            .with_periodic_exporter(exporter)
            .with_resource(resource)
            .build(),
    )
}

#[cfg(feature = "otlp")]
fn build_provider(service: &str, export: &Export) -> Option<SdkTracerProvider> {
    use opentelemetry_otlp::WithExportConfig;
    let exporter = match (&export.endpoint, export.http) {
        (Some(base), true) => opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_endpoint(format!("{base}/v1/traces"))
            .build(),
        (None, true) => opentelemetry_otlp::SpanExporter::builder().with_http().build(),
        (Some(base), false) => {
            opentelemetry_otlp::SpanExporter::builder().with_tonic().with_endpoint(base).build()
        }
        (None, false) => opentelemetry_otlp::SpanExporter::builder().with_tonic().build(),
    };
    let exporter = match exporter {
        Ok(e) => e,
        Err(e) => {
            eprintln!("warning: OTLP export disabled: {e}");
            return None;
        }
    };
    let name = std::env::var("OTEL_SERVICE_NAME").unwrap_or_else(|_| service.to_owned());
    let resource = opentelemetry_sdk::Resource::builder().with_service_name(name).build();
    Some(SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource).build())
}
