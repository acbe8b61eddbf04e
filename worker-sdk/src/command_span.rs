//! A command's span in a worker, made with the OpenTelemetry API rather than
//! through `tracing-opentelemetry`, and the `tracing` span its handler runs
//! in, which carries it.
//!
//! Through the `tracing` layer, a span with a dozen attributes cost about
//! four times what the same span built once with the API does: every field
//! is visited and copied into an attribute, and every enter, exit and close
//! goes through the layer. The handler still runs in a `tracing` span
//! ([`HANDLE_SPAN`]), so that its log lines name their run and step, and so
//! that what a handler hands to a task with `.in_current_span()` stays in
//! the trace; [`CommandContext`] makes that span carry the command's
//! OpenTelemetry context (current while it is entered) and turns the
//! handler's own events into events on the command's span, as
//! `tracing-opentelemetry` does for its own spans. The OpenTelemetry layer
//! is kept away from that span (see [`crate::telemetry::layer`]), so it is
//! not exported a second time.

use std::cell::RefCell;
use std::sync::{Arc, RwLock};

use opentelemetry::global::BoxedTracer;
use opentelemetry::trace::{Span as _, TraceContextExt as _, Tracer as _};
use opentelemetry::{Context, KeyValue, Value};
use tracing::field::{Field, Visit};
use tracing_subscriber::Layer;
use tracing_subscriber::layer;
use tracing_subscriber::registry::LookupSpan;

/// The `tracing` span a worker runs each command's handler in.
pub(crate) const HANDLE_SPAN: &str = "orchestrix.handle";

/// Whether a span or event is the handler's `tracing` span.
pub(crate) fn is_handle_span(meta: &tracing::Metadata<'_>) -> bool {
    meta.is_span() && meta.name() == HANDLE_SPAN
}

/// The layer that makes [`HANDLE_SPAN`] carry its command's OpenTelemetry
/// context.
pub(crate) struct CommandContext;

/// The tracer workers make their command spans with: the one last given to
/// [`crate::telemetry::layer`] (or `init`).
static TRACER: RwLock<Option<Arc<BoxedTracer>>> = RwLock::new(None);

impl CommandContext {
    /// The layer, its spans made on `tracer`.
    pub(crate) fn new(tracer: BoxedTracer) -> Self {
        *TRACER.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(tracer));
        CommandContext
    }
}

/// The context a handler span carries (in its extensions).
struct Carried(Context);

thread_local! {
    /// The contexts attached while handler spans are entered on this
    /// thread, innermost last (a guard must be dropped where it was made).
    static ENTERED: RefCell<Vec<opentelemetry::ContextGuard>> = const { RefCell::new(Vec::new()) };
}

impl<S> Layer<S> for CommandContext
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        id: &tracing::span::Id,
        ctx: layer::Context<'_, S>,
    ) {
        // Made inside its command's context (see `start`).
        if is_handle_span(attrs.metadata())
            && let Some(span) = ctx.span(id)
        {
            span.extensions_mut().insert(Carried(Context::current()));
        }
    }

    fn on_enter(&self, id: &tracing::span::Id, ctx: layer::Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        if let Some(Carried(cx)) = span.extensions().get::<Carried>() {
            let guard = cx.clone().attach();
            ENTERED.with(|e| e.borrow_mut().push(guard));
        }
    }

    fn on_exit(&self, id: &tracing::span::Id, ctx: layer::Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        if span.extensions().get::<Carried>().is_some() {
            let guard = ENTERED.with(|e| e.borrow_mut().pop());
            drop(guard);
        }
    }

    /// An event right inside a handler span (not inside a span of the
    /// handler's own, which the OpenTelemetry layer takes) becomes an event
    /// on the command's span: `message` its name, `level`, `target` and the
    /// other fields its attributes.
    fn on_event(&self, event: &tracing::Event<'_>, ctx: layer::Context<'_, S>) {
        if event.parent().is_some() {
            return;
        }
        let current = ctx.current_span();
        let Some(span) = current.id().and_then(|id| ctx.span(id)) else { return };
        if !is_handle_span(span.metadata()) {
            return;
        }
        let cx = match span.extensions().get::<Carried>() {
            Some(Carried(cx)) => cx.clone(),
            None => return,
        };
        let otel = cx.span();
        if !otel.is_recording() {
            return;
        }
        let meta = event.metadata();
        let mut fields = EventFields {
            name: None,
            attributes: vec![
                KeyValue::new("level", meta.level().as_str()),
                KeyValue::new("target", Value::String(meta.target().to_owned().into())),
            ],
        };
        event.record(&mut fields);
        let name = fields.name.unwrap_or_else(|| meta.name().to_owned());
        otel.add_event(name, fields.attributes);
    }
}

/// An event's fields as OpenTelemetry attributes (numbers as numbers).
struct EventFields {
    name: Option<String>,
    attributes: Vec<KeyValue>,
}

impl Visit for EventFields {
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.attributes.push(KeyValue::new(field.name(), value));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        match i64::try_from(value) {
            Ok(v) => self.record_i64(field, v),
            Err(_) => self.record_str(field, &value.to_string()),
        }
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.attributes.push(KeyValue::new(field.name(), value));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.attributes.push(KeyValue::new(field.name(), value));
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.name = Some(value.to_owned());
        } else {
            self.attributes.push(KeyValue::new(field.name(), value.to_owned()));
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.record_str(field, &format!("{value:?}"));
    }
}

/// The tracer of the last [`CommandContext`] made: `None` when no
/// [`crate::telemetry::layer`] was (nothing would take the command spans).
pub(crate) fn tracer() -> Option<Arc<BoxedTracer>> {
    TRACER.read().unwrap_or_else(|p| p.into_inner()).clone()
}

/// A command's span, begun on `tracer`: `name`, `kind`, `attributes`, child
/// of `parent`, in a context of its own. `None` when the sampler left it out.
pub(crate) fn start(
    tracer: &BoxedTracer,
    name: String,
    kind: opentelemetry::trace::SpanKind,
    attributes: Vec<KeyValue>,
    parent: &Context,
) -> Option<Context> {
    let builder = opentelemetry::trace::SpanBuilder::from_name(name)
        .with_kind(kind)
        .with_attributes(attributes);
    let span = tracer.build_with_context(builder, parent);
    (span.is_recording() && span.span_context().is_sampled()).then(|| parent.with_span(span))
}
