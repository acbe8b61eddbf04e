//! The spans of a run: one per run, one per attempt (action or compensation),
//! as `tracing` spans with OpenTelemetry's field conventions (`otel.name`,
//! `otel.status_code`, `messaging.system`) plus `orchestrix.*`. The library
//! only emits them; a binary that installs an OpenTelemetry layer exports
//! them.

use orchestrix_proto::{CommandKind, RunReport, RunStatus};
use tracing::field::Empty;
use tracing::{Span, info_span};
use uuid::Uuid;

/// The open spans of one run. Kept boxed and only when some subscriber wants
/// them, so a run costs nothing extra when tracing is off.
pub(crate) struct RunSpans {
    run: Span,
    attempt: Option<Span>,
    run_id: Uuid,
    flow: String,
}

impl RunSpans {
    pub(crate) fn start(
        run_id: Uuid,
        flow: &str,
        traceparent: Option<&str>,
    ) -> Option<Box<RunSpans>> {
        let run = info_span!(
            parent: None,
            "orchestrix.run",
            otel.name = %format_args!("{flow} run"),
            orchestrix.run_id = %run_id,
            orchestrix.flow = %flow,
            otel.status_code = Empty,
            otel.status_message = Empty,
        );
        if run.is_disabled() {
            return None;
        }
        if let Some(tp) = traceparent {
            use tracing_opentelemetry::OpenTelemetrySpanExt;
            let cx = opentelemetry::global::get_text_map_propagator(|p| p.extract(&OneHeader(tp)));
            let _ = run.set_parent(cx);
        }
        Some(Box::new(RunSpans { run, attempt: None, run_id, flow: flow.to_owned() }))
    }

    /// The span of an attempt, child of the run's: `process-payment attempt 2`,
    /// `compensate reserve-stock`.
    pub(crate) fn attempt_started(
        &mut self,
        step: &str,
        kind: CommandKind,
        attempt: u32,
        remote: bool,
    ) {
        let name = match (kind, attempt) {
            (CommandKind::Execute, n) => format!("{step} attempt {n}"),
            (CommandKind::Compensate, 1) => format!("compensate {step}"),
            (CommandKind::Compensate, n) => format!("compensate {step} attempt {n}"),
        };
        let span = info_span!(
            parent: &self.run,
            "orchestrix.attempt",
            otel.name = %name,
            orchestrix.run_id = %self.run_id,
            orchestrix.flow = %self.flow,
            orchestrix.step = %step,
            orchestrix.attempt = attempt,
            orchestrix.kind = kind.as_str(),
            messaging.system = Empty,
            otel.status_code = Empty,
            otel.status_message = Empty,
        );
        if remote {
            span.record("messaging.system", "nats");
        }
        self.attempt = Some(span);
    }

    /// The span of the attempt in flight.
    pub(crate) fn attempt(&self) -> Option<&Span> {
        self.attempt.as_ref()
    }

    /// Ends the attempt's span, with an error status when it failed.
    pub(crate) fn attempt_ended(&mut self, error: Option<&str>) {
        if let Some(span) = self.attempt.take()
            && let Some(e) = error
        {
            span.record("otel.status_code", "ERROR");
            span.record("otel.status_message", e);
            tracing::info!(parent: &span, error = e, "attempt failed");
        }
    }

    /// A retry, as an event on the run's span.
    pub(crate) fn retry(&self, step: &str, attempt: u32, delay_ms: u64) {
        tracing::info!(parent: &self.run, step, attempt, delay_ms, "retry scheduled");
    }

    pub(crate) fn finished(mut self, report: &RunReport) {
        self.attempt_ended(None);
        if report.status != RunStatus::Completed {
            self.run.record("otel.status_code", "ERROR");
            let why = report.error.as_deref().unwrap_or(report.status.as_str());
            self.run.record("otel.status_message", why);
        }
    }
}

/// A carrier holding just a `traceparent` value.
struct OneHeader<'a>(&'a str);

impl opentelemetry::propagation::Extractor for OneHeader<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        (key == "traceparent").then_some(self.0)
    }
    fn keys(&self) -> Vec<&str> {
        vec!["traceparent"]
    }
}

/// The current span's context as a `traceparent` value, when a tracer is
/// installed and a span is current.
pub(crate) fn current_traceparent() -> Option<String> {
    use opentelemetry::trace::TraceContextExt;
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let span = tracing::Span::current();
    if span.is_disabled() {
        return None;
    }
    let cx = span.context();
    if !cx.span().span_context().is_valid() {
        return None;
    }
    let mut out = std::collections::HashMap::new();
    opentelemetry::global::get_text_map_propagator(|p| p.inject_context(&cx, &mut out));
    out.remove("traceparent")
}
