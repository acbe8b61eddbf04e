//! Installing logs and trace export in a binary: what `orchestrix`, the
//! example worker and your services call once at start.
//!
//! Spans and metrics (see [`crate::metrics`]) go over OTLP when the standard variables ask for it:
//! `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`),
//! `OTEL_EXPORTER_OTLP_PROTOCOL` = `grpc` (default) or `http/protobuf`,
//! `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`. With none of them set,
//! nothing is exported and only logs are written (to stderr, filtered by `RUST_LOG`).

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

fn exporting() -> bool {
    ["OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"]
        .iter()
        .any(|v| std::env::var(v).is_ok_and(|s| !s.is_empty()))
}

/// Installs logging (stderr, `RUST_LOG`, else `default_level`) and, when the
/// `OTEL_*` variables ask for it, OTLP span export for `service` (unless
/// `OTEL_SERVICE_NAME` names it). Call once, inside a tokio runtime (the
/// gRPC exporter needs one); keep the guard until exit.
pub fn init(service: &str, default_level: &str) -> TelemetryGuard {
    let export = exporting().then(Export::from_env);
    init_with(service, default_level, export)
}

/// Where to export, when not from the `OTEL_*` variables.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Export {
    /// Base URL of the collector; `None`: the exporter's own default/env.
    pub endpoint: Option<String>,
    /// OTLP over HTTP/protobuf rather than gRPC.
    pub http: bool,
}

impl Export {
    /// From `OTEL_EXPORTER_OTLP_PROTOCOL`, the endpoint left to the exporter
    /// (which reads `OTEL_EXPORTER_OTLP_ENDPOINT` itself).
    pub fn from_env() -> Self {
        let http =
            std::env::var("OTEL_EXPORTER_OTLP_PROTOCOL").unwrap_or_default().starts_with("http");
        Export { endpoint: None, http }
    }

    /// OTLP/HTTP to `base` (`/v1/traces` and `/v1/metrics` are appended here:
    /// an endpoint given in code is used verbatim by the exporter).
    pub fn http(base: &str) -> Self {
        Export { endpoint: Some(base.trim_end_matches('/').to_owned()), http: true }
    }
}

/// Like [`init`], exporting as `export` says (`None`: no export).
pub fn init_with(service: &str, default_level: &str, export: Option<Export>) -> TelemetryGuard {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    // Trace context travels in `traceparent` headers, W3C style.
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let provider = export.as_ref().and_then(|e| build_provider(service, e));
    let meters = export.as_ref().and_then(|e| build_meters(service, e));
    if let Some(m) = &meters {
        // `RunMetrics::global()` records on it.
        opentelemetry::global::set_meter_provider(m.clone());
    }
    let otel = provider
        .as_ref()
        .map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer("orchestrix")));
    let _ = tracing_subscriber::registry().with(filter).with(fmt).with(otel).try_init();
    TelemetryGuard { provider, meters }
}

fn build_meters(service: &str, export: &Export) -> Option<SdkMeterProvider> {
    use opentelemetry_otlp::WithExportConfig;
    let exporter = match (&export.endpoint, export.http) {
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
