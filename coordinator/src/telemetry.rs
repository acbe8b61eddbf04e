//! The spans of a run: one per run, one per attempt (action or compensation),
//! one per parallel group and kind (`reserve execute group`), parent of its
//! steps' attempts, so that siblings read as siblings in a trace,
//! as `tracing` spans with OpenTelemetry's field conventions (`otel.name`,
//! `otel.kind`, `otel.status_code`, `otel.status_description`, the
//! `messaging.*` semantic conventions) plus `orchestrix.*`. The library only
//! emits them; a binary that installs an OpenTelemetry layer exports them.
//!
//! Names follow one rule on both sides of the bus: `{step} {kind}` (`kind`
//! is `execute` or `compensate`) names the operation; the coordinator's span
//! of an attempt adds `attempt {n}` (`process-payment execute attempt 2`),
//! the worker's span for that command is `process-payment execute`.
//!
//! Timing: the layer stamps a span's end at its last *exit*. An attempt's
//! span is entered only around the send (so the bus injects its context),
//! then entered once more, empty, when the attempt ends: its exported
//! interval is the attempt's, from the send to the outcome (or the timeout).

use orchestrix_proto::{CommandKind, RunReport, RunStatus};
use tracing::field::Empty;
use tracing::{Span, info_span};
use uuid::Uuid;

/// How an unknown outcome's error starts (see `machine::unknown`).
const UNKNOWN_PREFIX: &str = "outcome unknown:";

/// The open spans of one run. Kept boxed and only when some subscriber wants
/// them, so a run costs nothing extra when tracing is off.
pub(crate) struct RunSpans {
    run: Span,
    /// False when the sampler left the run out: then no span is made for
    /// it at all (the run's span was only opened to ask the sampler), and
    /// its commands carry a `traceparent` flagged not sampled, so workers
    /// skip theirs too.
    sampled: bool,
    /// Open attempt spans, by step (several while a parallel group runs),
    /// with the group they belong to.
    attempts: Vec<(u32, Option<GroupKey>, Span)>,
    /// Group spans, by group and kind; each ends with its last attempt.
    groups: Vec<(GroupKey, Span)>,
    /// The run's id, formatted once for all its spans.
    run_id: String,
    flow: String,
}

/// A parallel group and the kind of its attempts.
type GroupKey = (String, CommandKind);

/// Stamps a span's end time now: the OpenTelemetry layer takes the last exit
/// as the end, and a span entered only for a send would end at the send.
fn stamp_end(span: &Span) {
    drop(span.enter());
}

/// An attempt's span name: `{step} {kind} attempt {n}`.
pub(crate) fn attempt_name(step: &str, kind: CommandKind, attempt: u32) -> String {
    format!("{step} {} attempt {attempt}", kind.as_str())
}

/// A `u64` as an OpenTelemetry integer attribute (which is an `i64`: the
/// layer would export a `u64` as a string).
fn int(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl RunSpans {
    pub(crate) fn start(
        run_id: Uuid,
        flow: &str,
        traceparent: Option<&str>,
    ) -> Option<Box<RunSpans>> {
        // Described only once sampled (the name cannot change later).
        let run = info_span!(
            parent: None,
            "orchestrix.run",
            otel.name = %format_args!("{flow} run"),
            otel.kind = "internal",
            orchestrix.run_id = Empty,
            orchestrix.flow = Empty,
            otel.status_code = Empty,
            otel.status_description = Empty,
        );
        if run.is_disabled() {
            return None;
        }
        use opentelemetry::trace::TraceContextExt;
        use tracing_opentelemetry::OpenTelemetrySpanExt;
        if let Some(tp) = traceparent {
            let cx = opentelemetry::global::get_text_map_propagator(|p| p.extract(&OneHeader(tp)));
            let _ = run.set_parent(cx);
        }
        // The sampler decides once per run (the standard `OTEL_TRACES_SAMPLER`
        // variables configure it): an unsampled run costs this one span.
        // No context at all means no OpenTelemetry layer: nothing would
        // export the spans, so none are made (logs do not show them either).
        let cx = run.context();
        let span = cx.span();
        let sc = span.span_context();
        if !sc.is_valid() {
            return None;
        }
        let sampled = sc.is_sampled();
        // Formatted once for all the run's spans; a run left out has none.
        let run_id = if sampled { run_id.to_string() } else { String::new() };
        if sampled {
            run.record("orchestrix.run_id", run_id.as_str());
            run.record("orchestrix.flow", flow);
        }
        Some(Box::new(RunSpans {
            run: if sampled { run } else { Span::none() },
            sampled,
            attempts: Vec::new(),
            groups: Vec::new(),
            run_id,
            flow: if sampled { flow.to_owned() } else { String::new() },
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
        step: &str,
        group: Option<&str>,
        kind: CommandKind,
        attempt: u32,
        command_id: Uuid,
        remote: bool,
    ) {
        if !self.sampled {
            return;
        }
        // A span still open (never the case in a consistent run) ends here.
        self.attempt_ended(index, None);
        let key = group.map(|g| (g.to_owned(), kind));
        let parent = match group {
            Some(g) => self.group_span(g, kind).clone(),
            None => self.run.clone(),
        };
        let name = attempt_name(step, kind, attempt);
        let mut id = Uuid::encode_buffer();
        let command_id: &str = command_id.hyphenated().encode_lower(&mut id);
        // Every field given at creation, as a string where it can be: a
        // `record` after the fact and a `Display` value each cost a trip
        // through the layers' formatting. Sent over a bus, it is a messaging
        // PRODUCER span, and only then has `messaging.*` fields (a `None`
        // records nothing).
        let via_nats = |v: &'static str| remote.then_some(v);
        let span = info_span!(
            parent: &parent,
            "orchestrix.attempt",
            otel.name = name.as_str(),
            otel.kind = if remote { "producer" } else { "internal" },
            orchestrix.run_id = self.run_id.as_str(),
            orchestrix.flow = self.flow.as_str(),
            orchestrix.step = step,
            orchestrix.attempt = i64::from(attempt),
            orchestrix.kind = kind.as_str(),
            orchestrix.command_id = command_id,
            messaging.system = via_nats("nats"),
            messaging.operation.type = via_nats("send"),
            messaging.operation.name = via_nats("publish"),
            messaging.message.id = remote.then_some(command_id),
            otel.status_code = Empty,
            otel.status_description = Empty,
        );
        self.attempts.push((index, key, span));
    }

    /// The span of a parallel group's attempts of `kind`, opened with its
    /// first: `reserve execute group`.
    fn group_span(&mut self, group: &str, kind: CommandKind) -> &Span {
        let key = (group.to_owned(), kind);
        let at = match self.groups.iter().position(|(k, _)| *k == key) {
            Some(i) => i,
            None => {
                let span = info_span!(
                    parent: &self.run,
                    "orchestrix.group",
                    otel.name = %format_args!("{group} {} group", kind.as_str()),
                    otel.kind = "internal",
                    orchestrix.run_id = self.run_id.as_str(),
                    orchestrix.flow = self.flow.as_str(),
                    orchestrix.group = group,
                    orchestrix.kind = kind.as_str(),
                );
                self.groups.push((key, span));
                self.groups.len() - 1
            }
        };
        &self.groups[at].1
    }

    /// Whether the sampler kept this run.
    pub(crate) fn sampled(&self) -> bool {
        self.sampled
    }

    /// The span of step `index`'s attempt in flight.
    pub(crate) fn attempt(&self, index: u32) -> Option<&Span> {
        self.attempts.iter().find(|(i, _, _)| *i == index).map(|(_, _, s)| s)
    }

    /// Ends the attempt's span, with an error status when it failed (the
    /// error is the status message; [`attempt_failed`] is its event).
    pub(crate) fn attempt_ended(&mut self, index: u32, error: Option<&str>) {
        let Some(at) = self.attempts.iter().position(|(i, _, _)| *i == index) else { return };
        let (_, key, span) = self.attempts.swap_remove(at);
        if let Some(e) = error {
            span.record("otel.status_code", "ERROR");
            span.record("otel.status_description", e);
        }
        stamp_end(&span);
        // A group's span ends with the last of its attempts (so far).
        if let Some((_, g)) = self.groups.iter().find(|(k, _)| Some(k) == key.as_ref()) {
            stamp_end(g);
        }
    }

    pub(crate) fn finished(mut self, report: &RunReport) {
        let open: Vec<u32> = self.attempts.iter().map(|(i, _, _)| *i).collect();
        for index in open {
            self.attempt_ended(index, None);
        }
        if report.status != RunStatus::Completed {
            self.run.record("otel.status_code", "ERROR");
            let why = report.error.as_deref().unwrap_or(report.status.as_str());
            self.run.record("otel.status_description", why);
        }
        stamp_end(&self.run);
    }
}

impl Drop for RunSpans {
    /// A run actor that stops without finishing (handed over, quarantined,
    /// shut down) ends its spans where it stopped, not at the last send.
    fn drop(&mut self) {
        for (_, _, span) in self.attempts.drain(..) {
            stamp_end(&span);
        }
    }
}

// The events of a run's attempts: log lines that name their run, step and
// attempt, whether or not spans are made (no exporter, or a level that
// leaves the spans out), and events on the attempt's (or the run's) span
// when there is one.

/// An attempt failed: `attempt failed`, or the warning `outcome unknown` when
/// nobody knows what the attempt did.
pub(crate) fn attempt_failed(
    spans: Option<&RunSpans>,
    run_id: Uuid,
    index: u32,
    (step, kind, attempt): (&str, CommandKind, u32),
    error: &str,
) {
    let parent = spans.and_then(|s| s.attempt(index)).and_then(Span::id);
    let (kind, attempt) = (kind.as_str(), i64::from(attempt));
    if error.starts_with(UNKNOWN_PREFIX) {
        tracing::warn!(
            parent: parent,
            %run_id,
            step,
            kind,
            attempt,
            orchestrix.outcome = "unknown",
            error,
            "outcome unknown"
        );
    } else {
        tracing::info!(parent: parent, %run_id, step, kind, attempt, error, "attempt failed");
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
    let parent = spans.and_then(|s| s.run.id());
    tracing::info!(
        parent: parent,
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
    let parent = spans.and_then(|s| s.attempt(index)).and_then(Span::id);
    tracing::info!(
        parent: parent,
        %run_id,
        %command_id,
        messaging.message.id = %command_id,
        note,
        "command sent again"
    );
}

thread_local! {
    /// Set while a run the sampler left out sends a command.
    static UNSAMPLED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `send` with the "not sampled" mark set when `unsampled`: the bus
/// then flags the command's `traceparent` so.
pub(crate) fn sending<R>(unsampled: bool, send: impl FnOnce() -> R) -> R {
    /// Clears the mark however `send` ends.
    struct Clear;
    impl Drop for Clear {
        fn drop(&mut self) {
            UNSAMPLED.set(false);
        }
    }
    UNSAMPLED.set(unsampled);
    let _clear = Clear;
    send()
}

/// Whether the command being sent belongs to a run the sampler left out.
pub(crate) fn sending_unsampled() -> bool {
    UNSAMPLED.get()
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
