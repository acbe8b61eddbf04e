//! The spans of a run: one per run, one per attempt (action or compensation),
//! one per parallel group and kind (`reserve execute group`), parent of its
//! steps' attempts, so that siblings read as siblings in a trace. They follow
//! OpenTelemetry's conventions (span kinds, status, the `messaging.*`
//! semantic conventions) plus `orchestrix.*` attributes.
//!
//! They are made with the OpenTelemetry API on the **global tracer
//! provider** (`opentelemetry::global::set_tracer_provider`, which
//! `orchestrix::telemetry::init` calls), not as `tracing` spans: a span is
//! then built once, with its attributes, and handed to the SDK when it ends,
//! without the per-span work of a `tracing` layer (a registry slot, field
//! visitors, enter and exit). Measured on the bench machine: about 1 µs a span
//! against 5 µs through `tracing-opentelemetry`. Log lines stay `tracing`
//! events.
//!
//! Names follow one rule on both sides of the bus: `{step} {kind}` (`kind`
//! is `execute` or `compensate`) names the operation; the coordinator's span
//! of an attempt adds `attempt {n}` (`process-payment execute attempt 2`),
//! the worker's span for that command is `process-payment execute`.
//!
//! Timing: an attempt's span starts when its command is about to be sent and
//! ends with its outcome (or its timeout). A group's span ends with the last
//! of its attempts so far, stamped when the run ends.

use std::sync::Arc;
use std::time::SystemTime;

use opentelemetry::trace::{Span as _, SpanKind, Status, TraceContextExt as _, Tracer as _};
use opentelemetry::{Context, KeyValue, StringValue, Value};
use orchestrix_proto::{CommandKind, RunReport, RunStatus, TraceParent};
use orchestrix_worker::telemetry::remote_context;
use uuid::Uuid;

/// How an unknown outcome's error starts (see `machine::unknown`).
const UNKNOWN_PREFIX: &str = "outcome unknown:";

/// The instrumentation scope of every span Orchestrix makes.
pub(crate) const SCOPE: &str = "orchestrix";

/// The open spans of one run, each held in the context it makes (its
/// children's parent). Boxed, and only when a tracer provider answers with
/// a valid context, so a run costs nothing extra when tracing is off.
pub(crate) struct RunSpans {
    /// The run's span; when the sampler left the run out, a context with
    /// just its (unsampled) span context, carried by its commands.
    run: Context,
    /// Spans are made only when the sampler kept the run.
    sampled: Option<Sampled>,
}

/// What a sampled run holds to make and end its spans.
struct Sampled {
    tracer: opentelemetry::global::BoxedTracer,
    /// Open attempt spans, by step (several while a parallel group runs),
    /// with the group they belong to.
    attempts: Vec<(u32, Option<GroupKey>, Context)>,
    /// Group spans, by group and kind, with the end of their last attempt.
    groups: Vec<(GroupKey, Context, SystemTime)>,
    run_id: StringValue,
    flow: StringValue,
}

/// A parallel group and the kind of its attempts.
type GroupKey = (Arc<str>, CommandKind);

/// An attempt's span name: `{step} {kind} attempt {n}`.
pub(crate) fn attempt_name(step: &str, kind: CommandKind, attempt: u32) -> String {
    // Pieces rather than `format!`: made for every sampled attempt, and the
    // formatting machinery costs several times the copying.
    let kind = kind.as_str();
    let mut digits = itoa::Buffer::new();
    let number = digits.format(attempt);
    let mut name = String::with_capacity(step.len() + kind.len() + 9 + number.len());
    for piece in [step, " ", kind, " attempt ", number] {
        name.push_str(piece);
    }
    name
}

/// A UUID's hyphenated text, shared by the attributes that name it.
fn uuid_text(id: Uuid) -> StringValue {
    let mut buf = Uuid::encode_buffer();
    StringValue::from(Arc::<str>::from(&*id.hyphenated().encode_lower(&mut buf)))
}

/// A `u64` as an OpenTelemetry integer attribute (`i64`).
fn int(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn kv(key: &'static str, value: impl Into<Value>) -> KeyValue {
    KeyValue::new(key, value)
}

impl RunSpans {
    pub(crate) fn start(
        run_id: Uuid,
        flow: &Arc<str>,
        traceparent: Option<&str>,
    ) -> Option<Box<RunSpans>> {
        let tracer = opentelemetry::global::tracer(SCOPE);
        let parent = traceparent.and_then(TraceParent::parse).map(|tp| remote_context(&tp));
        let parent = parent.unwrap_or_default();
        // The sampler (the standard `OTEL_TRACES_SAMPLER` variables configure
        // the SDK's) decides once per run, here.
        let span = tracer
            .span_builder(format!("{flow} run"))
            .with_kind(SpanKind::Internal)
            .start_with_context(&tracer, &parent);
        // No valid context: no provider installed and no caller's context.
        // Nothing would export the spans: none are made.
        if !span.span_context().is_valid() {
            return None;
        }
        if !(span.is_recording() && span.span_context().is_sampled()) {
            // Left out by the sampler (or recorded only, never exported): no
            // span at all; its commands carry its context, flagged not
            // sampled, so workers skip theirs too. With no provider but a
            // caller's context, that context is passed on as it came.
            let sc = span.span_context().clone();
            return Some(Box::new(RunSpans {
                run: Context::new().with_remote_span_context(sc),
                sampled: None,
            }));
        }
        let (run_id, flow) = (uuid_text(run_id), StringValue::from(flow.clone()));
        let mut span = span;
        span.set_attribute(kv("orchestrix.run_id", run_id.clone()));
        span.set_attribute(kv("orchestrix.flow", flow.clone()));
        Some(Box::new(RunSpans {
            run: Context::new().with_span(span),
            sampled: Some(Sampled {
                tracer,
                attempts: Vec::new(),
                groups: Vec::new(),
                run_id,
                flow,
            }),
        }))
    }

    /// The span of an attempt, child of the run's:
    /// `process-payment execute attempt 2`, `reserve-stock compensate attempt 1`.
    /// Sent over a bus (`remote`), it is a messaging PRODUCER span whose
    /// message id is the command's id; in-process, an INTERNAL one.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn attempt_started(
        &mut self,
        index: u32,
        step: &Arc<str>,
        group: Option<&Arc<str>>,
        kind: CommandKind,
        attempt: u32,
        command_id: Uuid,
        remote: bool,
    ) {
        if self.sampled.is_none() {
            return;
        }
        // A span still open (never the case in a consistent run) ends here.
        self.attempt_ended(index, None);
        let key = group.map(|g| (g.clone(), kind));
        let parent = match group {
            Some(g) => self.group(g, kind),
            None => self.run.clone(),
        };
        let Some(s) = &mut self.sampled else { return };
        let command_id = uuid_text(command_id);
        let mut attributes = Vec::with_capacity(if remote { 11 } else { 7 });
        attributes.extend([
            kv("orchestrix.run_id", s.run_id.clone()),
            kv("orchestrix.flow", s.flow.clone()),
            kv("orchestrix.step", StringValue::from(step.clone())),
            kv("orchestrix.attempt", i64::from(attempt)),
            kv("orchestrix.kind", kind.as_str()),
            kv("orchestrix.command_id", command_id.clone()),
        ]);
        if remote {
            attributes.extend([
                kv("messaging.system", "nats"),
                kv("messaging.operation.type", "send"),
                kv("messaging.operation.name", "publish"),
                kv("messaging.message.id", command_id),
            ]);
        }
        let span = s
            .tracer
            .span_builder(attempt_name(step, kind, attempt))
            .with_kind(if remote { SpanKind::Producer } else { SpanKind::Internal })
            .with_attributes(attributes)
            .start_with_context(&s.tracer, &parent);
        s.attempts.push((index, key, Context::new().with_span(span)));
    }

    /// The context of a parallel group's span for attempts of `kind`,
    /// opened with its first: `reserve execute group`.
    fn group(&mut self, group: &Arc<str>, kind: CommandKind) -> Context {
        let Some(s) = &mut self.sampled else { return self.run.clone() };
        if let Some((_, cx, _)) = s.groups.iter().find(|(k, _, _)| k.0 == *group && k.1 == kind) {
            return cx.clone();
        }
        let span = s
            .tracer
            .span_builder(format!("{group} {} group", kind.as_str()))
            .with_kind(SpanKind::Internal)
            .with_attributes(vec![
                kv("orchestrix.run_id", s.run_id.clone()),
                kv("orchestrix.flow", s.flow.clone()),
                kv("orchestrix.group", StringValue::from(group.clone())),
                kv("orchestrix.kind", kind.as_str()),
            ])
            .start_with_context(&s.tracer, &self.run);
        let cx = Context::new().with_span(span);
        s.groups.push(((group.clone(), kind), cx.clone(), SystemTime::now()));
        cx
    }

    /// Whether the sampler kept this run.
    pub(crate) fn sampled(&self) -> bool {
        self.sampled.is_some()
    }

    /// The context step `index`'s command is sent and its in-process
    /// handler runs in: its attempt's span, else the run's (a run left out:
    /// flagged not sampled, so that spans made under it are left out too).
    pub(crate) fn context(&self, index: u32) -> &Context {
        self.attempt(index).unwrap_or(&self.run)
    }

    /// The context of step `index`'s attempt in flight (a sampled run only).
    pub(crate) fn attempt(&self, index: u32) -> Option<&Context> {
        let s = self.sampled.as_ref()?;
        s.attempts.iter().find(|(i, _, _)| *i == index).map(|(_, _, cx)| cx)
    }

    /// Ends the attempt's span, with an error status when it failed (the
    /// error is the status message; [`attempt_failed`] is its event).
    pub(crate) fn attempt_ended(&mut self, index: u32, error: Option<&str>) {
        let Some(s) = &mut self.sampled else { return };
        let Some(at) = s.attempts.iter().position(|(i, _, _)| *i == index) else { return };
        let (_, key, cx) = s.attempts.swap_remove(at);
        let span = cx.span();
        if let Some(e) = error {
            span.set_status(Status::error(e.to_owned()));
        }
        let now = SystemTime::now();
        span.end_with_timestamp(now);
        // A group's span ends with the last of its attempts (so far).
        if let Some(g) = s.groups.iter_mut().find(|(k, _, _)| Some(k) == key.as_ref()) {
            g.2 = now;
        }
    }

    /// Ends the run's spans, the run's with its status; open attempts and
    /// groups end as they do on drop.
    pub(crate) fn finished(self, report: &RunReport) {
        if self.sampled.is_some() && report.status != RunStatus::Completed {
            let why = report.error.as_deref().unwrap_or(report.status.as_str());
            self.run.span().set_status(Status::error(why.to_owned()));
        }
    }
}

impl Sampled {
    fn end_groups(mut self) {
        for (_, cx, at) in self.groups.drain(..) {
            cx.span().end_with_timestamp(at);
        }
    }
}

impl Drop for RunSpans {
    /// A run actor that stops without finishing (handed over, quarantined,
    /// shut down) ends its spans where it stopped.
    fn drop(&mut self) {
        // Open attempts end now, and their groups with them.
        let open: Vec<u32> =
            self.sampled.iter().flat_map(|s| s.attempts.iter().map(|a| a.0)).collect();
        for index in open {
            self.attempt_ended(index, None);
        }
        if let Some(s) = self.sampled.take() {
            s.end_groups();
            self.run.span().end();
        }
    }
}

// The events of a run's attempts: log lines that name their run, step and
// attempt, whether or not spans are made, and the same as events on the
// attempt's (or the run's) span when there is one.

/// An attempt failed: `attempt failed`, or the warning `outcome unknown` when
/// nobody knows what the attempt did.
pub(crate) fn attempt_failed(
    spans: Option<&RunSpans>,
    run_id: Uuid,
    index: u32,
    (step, kind, attempt): (&str, CommandKind, u32),
    error: &str,
) {
    let unknown = error.starts_with(UNKNOWN_PREFIX);
    if let Some(cx) = spans.and_then(|s| s.attempt(index)) {
        let mut attributes = vec![
            kv("run_id", run_id.to_string()),
            kv("step", step.to_owned()),
            kv("kind", kind.as_str()),
            kv("attempt", i64::from(attempt)),
            kv("error", error.to_owned()),
        ];
        if unknown {
            attributes.push(kv("orchestrix.outcome", "unknown"));
        }
        let name = if unknown { "outcome unknown" } else { "attempt failed" };
        cx.span().add_event(name, attributes);
    }
    let (kind, attempt) = (kind.as_str(), i64::from(attempt));
    if unknown {
        tracing::warn!(
            %run_id,
            step,
            kind,
            attempt,
            orchestrix.outcome = "unknown",
            error,
            "outcome unknown"
        );
    } else {
        tracing::info!(%run_id, step, kind, attempt, error, "attempt failed");
    }
}

/// A retry, on the run's span (`attempt` and `delay_ms` as integers).
pub(crate) fn retry_scheduled(
    spans: Option<&RunSpans>,
    run_id: Uuid,
    step: &str,
    attempt: u32,
    delay_ms: u64,
) {
    if let Some(s) = spans.filter(|s| s.sampled()) {
        s.run.span().add_event(
            "retry scheduled",
            vec![
                kv("run_id", run_id.to_string()),
                kv("step", step.to_owned()),
                kv("attempt", i64::from(attempt)),
                kv("delay_ms", int(delay_ms)),
            ],
        );
    }
    tracing::info!(
        %run_id,
        step,
        attempt = i64::from(attempt),
        delay_ms = int(delay_ms),
        "retry scheduled"
    );
}

/// The attempt's command was sent again under a new id (no worker had
/// taken it): `messaging.message.id` for the trace, `command_id` for logs.
pub(crate) fn command_resent(
    spans: Option<&RunSpans>,
    run_id: Uuid,
    index: u32,
    command_id: Uuid,
    note: &str,
) {
    if let Some(cx) = spans.and_then(|s| s.attempt(index)) {
        let id = command_id.to_string();
        cx.span().add_event(
            "command sent again",
            vec![
                kv("run_id", run_id.to_string()),
                kv("command_id", id.clone()),
                kv("messaging.message.id", id),
                kv("note", note.to_owned()),
            ],
        );
    }
    tracing::info!(%run_id, %command_id, note, "command sent again");
}

/// Runs `send` with `context` (see [`RunSpans::context`]) as the current
/// OpenTelemetry context: a bus reads it to put the command's
/// `traceparent`, and an in-process handler called in `send` makes its
/// spans under it.
pub(crate) fn sending<R>(context: Option<&Context>, send: impl FnOnce() -> R) -> R {
    let _current = context.map(|cx| cx.clone().attach());
    send()
}

/// The `traceparent` of the command being sent, if its run has a trace
/// context (`None`: no tracer, or nothing around the send).
pub(crate) fn sending_traceparent() -> Option<TraceParent> {
    let cx = Context::current();
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| TraceParent {
        trace_id: sc.trace_id().to_bytes(),
        span_id: sc.span_id().to_bytes(),
        sampled: sc.is_sampled(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// No tracer provider installed (this test binary installs none): no
    /// spans, and nothing to carry, unless the caller sent its own context,
    /// which the run's commands then carry as it came.
    #[test]
    fn an_attempt_is_named_by_its_step_kind_and_number() {
        for (n, text) in [(0, "0"), (7, "7"), (10, "10"), (u32::MAX, "4294967295")] {
            let want = format!("pay compensate attempt {text}");
            assert_eq!(attempt_name("pay", CommandKind::Compensate, n), want);
        }
        assert_eq!(uuid_text(Uuid::nil()).as_str(), Uuid::nil().to_string());
    }

    #[test]
    fn without_a_tracer_provider_no_spans_are_made() {
        let flow: Arc<str> = Arc::from("payment-flow");
        assert!(RunSpans::start(Uuid::new_v4(), &flow, None).is_none());
        let caller = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let spans = RunSpans::start(Uuid::new_v4(), &flow, Some(caller)).unwrap();
        assert!(!spans.sampled(), "nothing records its spans");
        let sent = sending(Some(spans.context(0)), sending_traceparent).unwrap();
        assert_eq!(sent.to_header(), caller);
        assert!(sending_traceparent().is_none(), "cleared after the send");
    }
}
