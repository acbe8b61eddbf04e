//! Logs and trace export for a service: what a worker, the `orchestrix`
//! binary or any service that uses Orchestrix calls once at start. It lives in
//! the worker SDK so that a worker can log and export without depending on
//! the coordinator.
//!
//! Logs go to stderr, filtered by `RUST_LOG` (else the level the caller
//! gives). With the `otlp` feature, spans and metrics also go over OTLP when
//! the standard variables ask for it: `OTEL_EXPORTER_OTLP_ENDPOINT` (both
//! signals), or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` /
//! `OTEL_EXPORTER_OTLP_METRICS_ENDPOINT` (one each); `OTEL_TRACES_EXPORTER=none`
//! / `OTEL_METRICS_EXPORTER=none` turn one off; `OTEL_EXPORTER_OTLP_PROTOCOL`
//! (or the per-signal `OTEL_EXPORTER_OTLP_{TRACES,METRICS}_PROTOCOL`) = `grpc`
//! (default) or `http/protobuf`; `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`.
//! With none of them set, nothing is exported and only logs are written.
//! Without the `otlp` feature, an export asked for is refused with a warning
//! on stderr, and logs are written all the same.
//!
//! A [`Worker`](crate::Worker) started in a process with no subscriber at all
//! installs a minimal one of its own (stderr, `warn`): see
//! [`WorkerBuilder::default_logging`](crate::WorkerBuilder::default_logging).
//!
//! ```no_run
//! # async fn f() {
//! // Inside the tokio runtime; the guard flushes spans when the process ends.
//! let _telemetry = orchestrix_worker::telemetry::init("payment-worker", "info");
//! # }
//! ```

use std::fmt;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::{DefaultVisitor, Writer};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Why [`TelemetryGuard::flush_spans`] did not export everything: the
/// exporter's or the SDK's error, as text (a timeout, a collector that
/// refused or could not be reached).
#[derive(Debug, thiserror::Error)]
#[error("the spans were not all exported: {0}")]
pub struct FlushError(String);

/// Flushes and shuts the exporters down when dropped (on a thread of its
/// own: a gRPC exporter must not be flushed from an async worker thread).
#[must_use = "spans are flushed when the guard is dropped"]
pub struct TelemetryGuard {
    #[cfg(feature = "otlp")]
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
    #[cfg(feature = "otlp")]
    meters: Option<opentelemetry_sdk::metrics::SdkMeterProvider>,
}

impl TelemetryGuard {
    /// Exports the spans ended so far now rather than with their batch,
    /// and waits for the export: before a checkpoint, or before a test or a
    /// measurement reads what was exported. Metrics keep their own
    /// schedule. Without the `otlp` feature, or with no span export, it
    /// does nothing and returns `Ok`.
    ///
    /// # Blocking
    ///
    /// It blocks the calling thread for the export (at most the SDK's
    /// flush timeout, 5 s): call it from a blocking thread
    /// (`tokio::task::spawn_blocking`), never on an async worker thread, where
    /// a gRPC exporter would wait for the very runtime it blocks.
    pub fn flush_spans(&self) -> Result<(), FlushError> {
        #[cfg(feature = "otlp")]
        if let Some(p) = &self.provider {
            return p.force_flush().map_err(|e| FlushError(e.to_string()));
        }
        Ok(())
    }

    fn exporting(&self) -> bool {
        #[cfg(feature = "otlp")]
        return self.provider.is_some() || self.meters.is_some();
        #[cfg(not(feature = "otlp"))]
        false
    }
}

impl fmt::Debug for TelemetryGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TelemetryGuard")
            .field("exporting", &self.exporting())
            .finish_non_exhaustive()
    }
}

#[cfg(feature = "otlp")]
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
/// tokio runtime (the gRPC exporter needs one), before starting a worker;
/// keep the guard until exit. Does nothing if a global subscriber is
/// already installed.
///
/// Spans are exported when `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or
/// `OTEL_EXPORTER_OTLP_ENDPOINT` is set, unless `OTEL_TRACES_EXPORTER=none`;
/// metrics when `OTEL_EXPORTER_OTLP_METRICS_ENDPOINT` or
/// `OTEL_EXPORTER_OTLP_ENDPOINT` is set, unless `OTEL_METRICS_EXPORTER=none`
/// (a traces-only backend such as Jaeger: otherwise every export interval
/// logs an error).
///
/// The log level decides what is logged, not what is exported: with spans
/// exported, the log layer and the OpenTelemetry layer are filtered each on
/// its own. The export takes the log's directives with the default level
/// raised to `info` at least: spans and events at `info` and above are
/// exported whatever the log level, and a directive for a target
/// (`chatty=off`) still holds for both.
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

/// The stderr log layer every installer here uses: colours only for a
/// person at a terminal, and never with `NO_COLOR` set.
fn stderr_layer<S>() -> impl tracing_subscriber::Layer<S> + Send + Sync
where
    S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
{
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    log_layer(std::io::stderr, ansi)
}

/// The log layer, writing to `writer`.
///
/// The coordinator's run, attempt and group spans are not `tracing` spans
/// (they are made with the OpenTelemetry API), so they never prefix a log
/// line: the coordinator's lines name their run in their own fields. A
/// handler's span (`orchestrix.handle`) does, to give a handler's own log
/// lines their run, step and attempt, without the fields only a trace needs
/// ([`LogFields`]). Filtered per layer only beside an export (see
/// [`init_with`]): a per-layer filter makes a call site that one layer takes
/// and the other does not ask its filters again each time.
fn log_layer<S, W>(writer: W, ansi: bool) -> impl tracing_subscriber::Layer<S> + Send + Sync
where
    S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    tracing_subscriber::fmt::layer().fmt_fields(LogFields).with_writer(writer).with_ansi(ansi)
}

/// The default field format, without the fields that are there for a trace
/// and say nothing in a log line: `otel.*` (span name, kind, status) and
/// `messaging.*` (what the span's own fields already say). Fewer fields
/// formatted per handler span, too.
#[derive(Debug, Clone, Copy)]
struct LogFields;

impl<'w> tracing_subscriber::fmt::FormatFields<'w> for LogFields {
    fn format_fields<R: tracing_subscriber::field::RecordFields>(
        &self,
        writer: Writer<'w>,
        fields: R,
    ) -> fmt::Result {
        let mut visitor = LogVisitor { writer, is_empty: true, result: Ok(()) };
        fields.record(&mut visitor);
        visitor.result
    }

    /// Appends fields recorded later, separated only if one is shown (a
    /// span's status, recorded when its handler fails, is not).
    fn add_fields(
        &self,
        current: &'w mut tracing_subscriber::fmt::FormattedFields<Self>,
        fields: &tracing::span::Record<'_>,
    ) -> fmt::Result {
        let is_empty = current.fields.is_empty();
        let mut visitor = LogVisitor { writer: current.as_writer(), is_empty, result: Ok(()) };
        fields.record(&mut visitor);
        visitor.result
    }
}

/// Writes the fields a log line shows (see [`LogFields`]) as
/// tracing-subscriber's default format does. Plain strings and numbers
/// are written directly when there are no colours: through the default
/// visitor, each field costs a `write!` of three formatted parts (the
/// name and `=` painted, even in no colour) and a string's `Debug`, which
/// escapes it character by character — most of what a handler's span cost
/// the log layer. Anything else goes through the default visitor.
struct LogVisitor<'w> {
    writer: Writer<'w>,
    /// Nothing written yet: no space before the next field.
    is_empty: bool,
    result: fmt::Result,
}

impl LogVisitor<'_> {
    /// Whether `field` may be written here rather than by the default
    /// visitor (which writes `message` and `r#` names its own way).
    fn direct(&self, field: &tracing::field::Field) -> bool {
        let name = field.name();
        self.result.is_ok()
            && !self.writer.has_ansi_escapes()
            && name != "message"
            && !name.starts_with("r#")
    }

    /// `name=` and the value: in pieces rather than through `write!`, whose
    /// machinery costs more than the copying.
    fn write(&mut self, field: &tracing::field::Field, value: impl fmt::Display) {
        let space = if self.is_empty { "" } else { " " };
        self.is_empty = false;
        let w = &mut self.writer;
        self.result = w
            .write_str(space)
            .and_then(|()| w.write_str(field.name()))
            .and_then(|()| w.write_char('='))
            .and_then(|()| write!(w, "{value}"));
    }

    /// A [`plain`] string field, as `Debug` quotes it.
    fn write_plain(&mut self, field: &tracing::field::Field, value: &str) {
        let space = if self.is_empty { "" } else { " " };
        self.is_empty = false;
        let w = &mut self.writer;
        self.result = [space, field.name(), "=\"", value, "\""]
            .into_iter()
            .try_for_each(|part| w.write_str(part));
    }

    /// A number or a bool: written here when it may be, else by the
    /// default visitor (`record`).
    fn scalar(
        &mut self,
        field: &tracing::field::Field,
        value: impl fmt::Display,
        record: impl FnOnce(&mut DefaultVisitor<'_>),
    ) {
        if !shown(field) {
            return;
        }
        if self.direct(field) {
            self.write(field, value);
        } else {
            self.delegate(record);
        }
    }

    fn delegate(&mut self, record: impl FnOnce(&mut DefaultVisitor<'_>)) {
        if self.result.is_err() {
            return;
        }
        let mut visitor = DefaultVisitor::new(self.writer.by_ref(), self.is_empty);
        record(&mut visitor);
        self.result = tracing_subscriber::field::VisitOutput::finish(visitor);
        self.is_empty = false;
    }
}

/// Whether `Debug` writes the string unchanged between its quotes.
fn plain(s: &str) -> bool {
    s.bytes().all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\')
}

/// Fields a log line leaves out: those only a trace reads, and the `log`
/// crate's metadata (which the default format prints elsewhere, and its
/// visitor skips).
fn shown(field: &tracing::field::Field) -> bool {
    let name = field.name();
    !(name.starts_with("otel.") || name.starts_with("messaging.") || name.starts_with("log."))
}

impl tracing::field::Visit for LogVisitor<'_> {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn fmt::Debug) {
        if shown(field) {
            self.delegate(|v| v.record_debug(field, value));
        }
    }
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        if !shown(field) {
            return;
        }
        if self.direct(field) && plain(value) {
            self.write_plain(field, value);
        } else {
            self.delegate(|v| v.record_str(field, value));
        }
    }
    fn record_i64(&mut self, field: &tracing::field::Field, value: i64) {
        self.scalar(field, value, |v| v.record_i64(field, value));
    }
    fn record_u64(&mut self, field: &tracing::field::Field, value: u64) {
        self.scalar(field, value, |v| v.record_u64(field, value));
    }
    fn record_bool(&mut self, field: &tracing::field::Field, value: bool) {
        self.scalar(field, value, |v| v.record_bool(field, value));
    }
    fn record_f64(&mut self, field: &tracing::field::Field, value: f64) {
        if shown(field) {
            self.delegate(|v| v.record_f64(field, value));
        }
    }
    fn record_error(
        &mut self,
        field: &tracing::field::Field,
        value: &(dyn std::error::Error + 'static),
    ) {
        if shown(field) {
            self.delegate(|v| v.record_error(field, value));
        }
    }
}

/// The log's filter: [`log_directives`].
fn filter(default_level: &str) -> EnvFilter {
    EnvFilter::new(log_directives(default_level))
}

/// `RUST_LOG` if it is set and valid, else `default_level`.
fn log_directives(default_level: &str) -> String {
    std::env::var(EnvFilter::DEFAULT_ENV)
        .ok()
        .filter(|s| EnvFilter::try_new(s).is_ok())
        .unwrap_or_else(|| default_level.to_owned())
}

/// The export's directives: the log's, with its default level raised to
/// `info` at least. A quiet log level then does not keep spans out of a
/// trace, while a directive for a target still does (`chatty=off` keeps
/// `chatty`'s spans and events out of both).
#[cfg_attr(not(feature = "otlp"), allow(dead_code))]
fn export_directives(log: &str) -> String {
    use tracing_subscriber::filter::LevelFilter;
    let mut level = LevelFilter::INFO;
    let mut targeted = Vec::new();
    for d in log.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        match d.parse::<LevelFilter>() {
            Ok(l) => level = level.max(l),
            Err(_) => targeted.push(d),
        }
    }
    let level = level.to_string().to_ascii_lowercase();
    std::iter::once(level.as_str()).chain(targeted).collect::<Vec<_>>().join(",")
}

/// Like [`init`], exporting as `export` says (`None`: no export).
pub fn init_with(service: &str, default_level: &str, export: Option<Export>) -> TelemetryGuard {
    #[cfg(feature = "otlp")]
    {
        use opentelemetry::trace::TracerProvider as _;
        use tracing_subscriber::Layer as _;
        // Trace context travels in `traceparent` headers, W3C style.
        opentelemetry::global::set_text_map_propagator(
            opentelemetry_sdk::propagation::TraceContextPropagator::new(),
        );
        let provider =
            export.as_ref().filter(|e| e.traces).and_then(|e| otlp::provider(service, e));
        let meters = export.as_ref().filter(|e| e.metrics).and_then(|e| otlp::meters(service, e));
        if let Some(m) = &meters {
            // The coordinator's `RunMetrics::global()` records on it.
            opentelemetry::global::set_meter_provider(m.clone());
        }
        if let Some(p) = &provider {
            // The coordinator's run and attempt spans are made on the global
            // provider (the OpenTelemetry API, not `tracing`).
            opentelemetry::global::set_tracer_provider(p.clone());
        }
        let Some(p) = &provider else {
            let registry = tracing_subscriber::registry().with(filter(default_level));
            let _ = registry.with(stderr_layer()).try_init();
            return TelemetryGuard { provider, meters };
        };
        // Each layer filtered on its own: the log level does not decide which
        // spans are exported. Info spans (a worker's handler span, a
        // handler's own) are exported whatever `RUST_LOG` says, and so is
        // anything more verbose that it lets through to the logs; a log line
        // is formatted only when it is written.
        let log = log_directives(default_level);
        let spans =
            EnvFilter::try_new(export_directives(&log)).unwrap_or_else(|_| EnvFilter::new("info"));
        let logs = stderr_layer().with_filter(EnvFilter::new(log));
        let otel = layer(p.tracer("orchestrix")).with_filter(spans);
        let _ = tracing_subscriber::registry().with(logs).with(otel).try_init();
        TelemetryGuard { provider, meters }
    }
    #[cfg(not(feature = "otlp"))]
    {
        let _ = service;
        let registry =
            tracing_subscriber::registry().with(filter(default_level)).with(stderr_layer());
        if export.is_some_and(|e| e.traces || e.metrics) {
            eprintln!("warning: OTLP export disabled: built without the `otlp` feature");
        }
        let _ = registry.try_init();
        TelemetryGuard {}
    }
}

/// Installs the worker's fallback logging (stderr; `RUST_LOG`, else `warn`)
/// when nothing else would see its events: no global subscriber has been set
/// and none is in force on this thread (`tracing::subscriber::with_default`).
/// Returns whether it installed one.
///
/// Unlike [`init`], it leaves the `log` crate's logger alone, so that a
/// service may still install one.
pub(crate) fn install_fallback() -> bool {
    if tracing::dispatcher::has_been_set()
        || !tracing::dispatcher::get_default(|d| d.is::<tracing::subscriber::NoSubscriber>())
    {
        return false;
    }
    let subscriber = tracing_subscriber::registry().with(filter("warn")).with(stderr_layer());
    // Another thread may have won the race: its subscriber stands.
    tracing::subscriber::set_global_default(subscriber).is_ok()
}

/// The OpenTelemetry context a `traceparent` names, as a remote parent:
/// what a step command carries from the coordinator's attempt span (or a
/// run's start request from its caller's span).
pub fn remote_context(tp: &orchestrix_proto::TraceParent) -> opentelemetry::Context {
    use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId};
    let flags = if tp.sampled { TraceFlags::SAMPLED } else { TraceFlags::default() };
    let sc = SpanContext::new(
        TraceId::from_bytes(tp.trace_id),
        SpanId::from_bytes(tp.span_id),
        flags,
        true,
        Default::default(),
    );
    opentelemetry::Context::new().with_remote_span_context(sc)
}

/// The `tracing` → OpenTelemetry layer as Orchestrix's spans want it: no
/// source locations (`code.*`), thread ids and names (`thread.*`), `target`,
/// or busy/idle timings (`busy_ns`, `idle_ns`) on every span — attributes
/// that say nothing about a run and crowd out the ones that do.
/// A service with its own OpenTelemetry setup can use it too; it must also
/// set the global tracer provider
/// (`opentelemetry::global::set_tracer_provider`), on which the coordinator
/// makes its run and attempt spans ([`init_with`] sets both).
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

#[cfg(feature = "otlp")]
mod otlp {
    use std::time::Duration;

    use opentelemetry_otlp::WithExportConfig;
    use opentelemetry_sdk::Resource;
    use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider};
    use opentelemetry_sdk::trace::{
        BatchConfigBuilder, BatchSpanProcessor, SdkTracerProvider, SpanExporter,
    };

    use super::Export;

    fn resource(service: &str) -> Resource {
        let name = std::env::var("OTEL_SERVICE_NAME").unwrap_or_else(|_| service.to_owned());
        Resource::builder().with_service_name(name).build()
    }

    pub(super) fn meters(service: &str, export: &Export) -> Option<SdkMeterProvider> {
        let builder = opentelemetry_otlp::MetricExporter::builder();
        let timeout = crate::otlp::timeout("METRICS", |name| std::env::var(name).ok());
        let base = export.endpoint.as_deref();
        let exporter = if export.metrics_http {
            let endpoint = base.map(|b| format!("{b}/v1/metrics"));
            configured(builder.with_http(), endpoint, timeout).build()
        } else {
            configured(builder.with_tonic(), base.map(str::to_owned), timeout).build()
        };
        let exporter =
            exporter.map_err(|e| eprintln!("warning: OTLP metrics disabled: {e}")).ok()?;
        // The variable's interval, but 0 (an export loop that never waits,
        // a core spun while the process idles) reads as the default.
        let interval =
            positive_ms("OTEL_METRIC_EXPORT_INTERVAL").unwrap_or(Duration::from_secs(60));
        let reader = PeriodicReader::builder(exporter).with_interval(interval).build();
        Some(
            SdkMeterProvider::builder()
                .with_reader(reader)
                .with_resource(resource(service))
                .build(),
        )
    }

    /// An SDK exporter's builder with the resolved timeout (see
    /// `otlp::timeout`) and, when given, the endpoint (which wins over the
    /// variables).
    fn configured<B: WithExportConfig>(
        builder: B,
        endpoint: Option<String>,
        timeout: Duration,
    ) -> B {
        let builder = builder.with_timeout(timeout);
        match endpoint {
            Some(e) => builder.with_endpoint(e),
            None => builder,
        }
    }

    /// `var`, in milliseconds, when it is a positive number.
    fn positive_ms(var: &str) -> Option<Duration> {
        let ms = std::env::var(var).ok()?.trim().parse::<u64>().ok()?;
        (ms > 0).then(|| Duration::from_millis(ms))
    }

    /// The SDK's batch processor as the `OTEL_BSP_*` variables configure it,
    /// but a schedule delay of 0 (its export loop would never wait, and spin
    /// a core while the process idles) reads as the default, 5 s.
    fn batched(exporter: impl SpanExporter + 'static) -> BatchSpanProcessor {
        let delay = positive_ms("OTEL_BSP_SCHEDULE_DELAY").unwrap_or(Duration::from_secs(5));
        let config = BatchConfigBuilder::default().with_scheduled_delay(delay).build();
        BatchSpanProcessor::builder(exporter).with_batch_config(config).build()
    }

    pub(super) fn provider(service: &str, export: &Export) -> Option<SdkTracerProvider> {
        // Plain OTLP/HTTP goes through Orchestrix's exporter (the same bytes
        // for a fraction of the work, see `otlp.rs`); anything else through
        // the SDK's.
        if let Ok(v) = std::env::var("ORCHESTRIX_OTLP_EXPORTER")
            && !["", "sdk", "orchestrix"].contains(&v.trim().to_ascii_lowercase().as_str())
        {
            eprintln!(
                "warning: ORCHESTRIX_OTLP_EXPORTER={v:?} means nothing (`sdk` or `orchestrix`); using the default"
            );
        }
        let endpoint = export.endpoint.as_ref().map(|base| format!("{base}/v1/traces"));
        let plain =
            export.http.then(|| crate::otlp::Plain::from_env(endpoint.as_deref())).flatten();
        if let Some(plain) = plain {
            match crate::otlp::HttpExporter::new(plain) {
                Ok(exporter) => {
                    return Some(
                        SdkTracerProvider::builder()
                            .with_span_processor(batched(exporter))
                            .with_resource(resource(service))
                            .build(),
                    );
                }
                Err(e) => eprintln!("warning: OTLP export disabled: {e}"),
            }
            return None;
        }
        let builder = opentelemetry_otlp::SpanExporter::builder();
        let timeout = crate::otlp::timeout("TRACES", |name| std::env::var(name).ok());
        let base = export.endpoint.as_deref();
        let exporter = if export.http {
            let endpoint = base.map(|b| format!("{b}/v1/traces"));
            configured(builder.with_http(), endpoint, timeout).build()
        } else {
            configured(builder.with_tonic(), base.map(str::to_owned), timeout).build()
        };
        let exporter =
            exporter.map_err(|e| eprintln!("warning: OTLP export disabled: {e}")).ok()?;
        Some(
            SdkTracerProvider::builder()
                .with_span_processor(batched(exporter))
                .with_resource(resource(service))
                .build(),
        )
    }
}

#[cfg(test)]
mod tests {
    use tracing_subscriber::layer::SubscriberExt;

    /// The export takes the log's directives with the default level raised
    /// to info: a quiet log does not silence a trace, a target's directive does.
    #[test]
    fn the_export_filters_as_the_log_does_but_at_info_at_least() {
        for (log, export) in [
            ("warn", "info"),
            ("off", "info"),
            ("", "info"),
            ("debug", "debug"),
            ("TRACE", "trace"),
            ("info,chatty=off", "info,chatty=off"),
            ("chatty=off", "info,chatty=off"),
            ("warn, my_crate::db=debug ,chatty=error", "info,my_crate::db=debug,chatty=error"),
            ("warn,[handle{step=charge}]=debug", "info,[handle{step=charge}]=debug"),
        ] {
            assert_eq!(super::export_directives(log), export, "{log:?}");
            tracing_subscriber::EnvFilter::try_new(export).unwrap();
        }
    }

    /// Where a test's log layer writes.
    #[derive(Clone, Default)]
    struct Buffer(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap_or_else(|p| p.into_inner()).extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Buffer {
        fn text(&self) -> String {
            String::from_utf8_lossy(&self.0.lock().unwrap_or_else(|p| p.into_inner())).into()
        }
    }

    /// A log line in a handler names its run, step and attempt, and none of
    /// the fields that are there for the trace.
    #[test]
    fn a_handlers_log_lines_carry_its_run_not_the_traces_fields() {
        let out = Buffer::default();
        let writer = {
            let out = out.clone();
            move || out.clone()
        };
        let subscriber = tracing_subscriber::registry().with(super::log_layer(writer, false));
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!(
                target: "orchestrix_worker::worker",
                "orchestrix.handle",
                otel.name = "charge execute",
                otel.kind = "consumer",
                messaging.system = "nats",
                orchestrix.run_id = "5f0c",
                orchestrix.step = "charge",
                orchestrix.attempt = 2i64,
                orchestrix.worker = "host-1-a",
                otel.status_code = tracing::field::Empty,
            );
            let _in = span.enter();
            tracing::warn!(amount = 5, "card declined");
            span.record("otel.status_code", "ERROR");
            tracing::warn!("after the status");
        });
        let text = out.text();
        let first = text.lines().next().unwrap_or_default();
        assert!(
            first.contains(
                "orchestrix.handle{orchestrix.run_id=\"5f0c\" orchestrix.step=\"charge\" orchestrix.attempt=2 orchestrix.worker=\"host-1-a\"}"
            ),
            "{text}"
        );
        assert!(first.contains("card declined amount=5"), "{text}");
        for hidden in ["otel.", "messaging.", "ERROR"] {
            assert!(!text.contains(hidden), "{hidden} in {text}");
        }
        // A field hidden after the fact leaves no stray separator.
        let second = text.lines().nth(1).unwrap_or_default();
        assert!(second.contains("orchestrix.worker=\"host-1-a\"}"), "{text}");
    }

    /// Plain strings take a shorter path than `Debug`: the text is the same
    /// as tracing-subscriber's own formatter writes, for them and for the
    /// strings that need escaping.
    #[test]
    fn shown_fields_read_as_the_default_formatter_writes_them() {
        let values = [
            "",
            "5f0c-11ef",
            "host 1/a:b@c+d_e.f~g'h",
            "say \"hi\"",
            "back\\slash",
            "two\nlines",
            "tab\there",
            "\u{1b}[31mred",
            "caf\u{e9} \u{1f600}",
            "\u{7f}del",
        ];
        for value in values {
            let capture = Capture::default();
            let subscriber = tracing_subscriber::registry().with(capture.clone());
            tracing::subscriber::with_default(subscriber, || {
                let _span = tracing::info_span!(
                    "s",
                    orchestrix.step = value,
                    n = -2i64,
                    big = u64::MAX,
                    yes = true,
                    f = 0.5f64,
                    r#type = value,
                    d = ?value,
                );
                tracing::info!(orchestrix.run_id = value, n = 3i64, "{value}");
            });
            let (ours, theirs) = capture.0.lock().unwrap_or_else(|p| p.into_inner()).clone();
            assert_eq!(ours, theirs, "{value:?}");
            assert!(ours.starts_with("orchestrix.step="), "{ours}");
        }
    }

    /// Formats every new span's fields twice: with the log layer's
    /// formatter, and with tracing-subscriber's default.
    #[derive(Clone, Default)]
    struct Capture(std::sync::Arc<std::sync::Mutex<(String, String)>>);

    impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Capture {
        fn on_new_span(
            &self,
            attrs: &tracing::span::Attributes<'_>,
            _id: &tracing::span::Id,
            _ctx: tracing_subscriber::layer::Context<'_, S>,
        ) {
            self.both(attrs);
        }

        fn on_event(
            &self,
            event: &tracing::Event<'_>,
            _ctx: tracing_subscriber::layer::Context<'_, S>,
        ) {
            self.both(event);
        }
    }

    impl Capture {
        /// Both formats of `fields`.
        fn both<R: tracing_subscriber::field::RecordFields + Copy>(&self, fields: R) {
            use tracing_subscriber::fmt::FormatFields as _;
            use tracing_subscriber::fmt::format::{DefaultFields, Writer};
            let mut both = self.0.lock().unwrap_or_else(|p| p.into_inner());
            let (ours, theirs) = &mut *both;
            assert!(super::LogFields.format_fields(Writer::new(ours), fields).is_ok());
            assert!(DefaultFields::new().format_fields(Writer::new(theirs), fields).is_ok());
            ours.push('|');
            theirs.push('|');
        }
    }

    /// Whole log lines, in colour and without, read the same through the
    /// log layer's field format as through the default one.
    #[test]
    fn log_lines_read_as_the_default_format_writes_them() {
        for ansi in [false, true] {
            let (ours, theirs) = (Buffer::default(), Buffer::default());
            let (o, t) = (ours.clone(), theirs.clone());
            let subscriber = tracing_subscriber::registry()
                .with(
                    tracing_subscriber::fmt::layer()
                        .fmt_fields(super::LogFields)
                        .with_ansi(ansi)
                        .without_time()
                        .with_writer(move || o.clone()),
                )
                .with(
                    tracing_subscriber::fmt::layer()
                        .with_ansi(ansi)
                        .without_time()
                        .with_writer(move || t.clone()),
                );
            tracing::subscriber::with_default(subscriber, || {
                let span = tracing::info_span!(
                    "orchestrix.handle",
                    orchestrix.run_id = "5f0c-11ef",
                    orchestrix.attempt = 2i64,
                    note = "say \"hi\"\n",
                    late = tracing::field::Empty,
                );
                let _in = span.enter();
                tracing::warn!(amount = 5u64, ok = false, "card declined");
                span.record("late", "now");
                tracing::error!(why = "a\u{1b}[31mred", "after");
            });
            assert_eq!(ours.text(), theirs.text(), "ansi: {ansi}");
            assert!(ours.text().contains("card declined"), "{}", ours.text());
        }
    }
}
