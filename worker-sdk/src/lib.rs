//! The Orchestrix worker SDK: what a service links to run saga steps.
//!
//! A step handler is an async function of a [`StepContext`] that returns an
//! output or a [`StepError`]. The same handler runs in-process (the embedded
//! engine in `orchestrix-coordinator`) or in a worker process that serves step
//! commands over NATS, so code moves between the two unchanged.
//!
//! ```
//! use orchestrix_worker::{handler, StepContext, StepError};
//!
//! #[derive(serde::Deserialize)]
//! struct Order { amount: u64 }
//!
//! let charge = handler(|ctx: StepContext<Order>| async move {
//!     if ctx.input.amount > 1000 {
//!         return Err(StepError::permanent("Payment declined: limit exceeded"));
//!     }
//!     Ok(format!("charged {}", ctx.input.amount))
//! });
//! # let _ = charge;
//! ```
//!
//! [`telemetry`] installs a service's logs (stderr, `RUST_LOG`) and, with the
//! `otlp` feature, exports its spans and metrics over OTLP.

mod context;
mod error;
mod handler;
mod nats;
#[cfg(feature = "otlp")]
mod otlp;
pub mod registry;
pub mod telemetry;
mod worker;

pub use context::StepContext;
pub use error::{ResultExt, StepError};
pub use handler::FlowHandlers;
// Shared with the coordinator's in-process bus and tests: not part of the API.
#[doc(hidden)]
pub use handler::{
    BoxedHandler, HandlerFuture, StepHandlers, handler, run_command, run_command_with,
};
#[doc(hidden)]
pub use nats::sync;
pub use nats::{
    ConnectError, NatsOptions, check_permissions, default_nats_url, permission_violations,
    redact_url, said_once,
};
pub use orchestrix_proto as proto;
pub use tokio_util::sync::CancellationToken;
pub use worker::{Worker, WorkerBuilder, WorkerError, WorkerFlow, wait_for_signal};

/// The current span's context as a `traceparent` value, when a tracer is
/// installed and a span is current.
pub fn current_traceparent() -> Option<String> {
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
