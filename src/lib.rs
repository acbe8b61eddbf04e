//! # Orchestrix
//!
//! Sagas for Rust: a flow of steps with side effects, retried when a dependency
//! fails for a while, and rolled back — the completed steps compensated in
//! reverse order — when a step fails for good. Every run returns a report that
//! makes the execution visible.
//!
//! The same engine runs in-process with no server (the embedded default shown
//! here) or distributed: a coordinator service driving worker processes over NATS.
//! The same `Flow` value does both: `flow.run(input)` here, or
//! `Worker::builder().flow(flow)` in a worker process, which registers the
//! flow's definition with the cluster's coordinators.
//!
//! Features (all on by default): `embedded` (the engine: `create`, `Flow`),
//! `worker` (`Worker`), `client` (`Client`: start and follow runs on a cluster,
//! no engine), `nats` (a coordinator over NATS in this process), `otlp`
//! (OTLP export from [`telemetry`]). A service that only starts runs depends on
//! `orchestrix = { default-features = false, features = ["client"] }`; a
//! worker service on `features = ["worker"]` (add `"otlp"` to export its
//! spans), which leaves the engine and actix out.
//!
//! ```
//! use std::time::Duration;
//! use orchestrix::{create, RunOptions, RunStatus, StepError};
//!
//! #[derive(serde::Serialize, serde::Deserialize)]
//! struct PaymentInput { order_id: String, amount: u64, user_id: String }
//!
//! # #[tokio::main] async fn main() -> Result<(), orchestrix::RunError> {
//! let payment_flow = create::<PaymentInput>("payment-flow")
//!     .step_with("reserve-stock", |ctx| async move {
//!         println!("Reserving stock for order {}", ctx.input.order_id);
//!         Ok(())
//!     }, |o| o.compensate(|ctx| async move {
//!         println!("Releasing stock for order {}", ctx.input.order_id);
//!         Ok(())
//!     }))
//!     .step_with("process-payment", |ctx| async move {
//!         if ctx.input.amount > 1000 {
//!             return Err(StepError::retryable("Payment declined: limit exceeded"));
//!         }
//!         Ok(())
//!     }, |o| o.retries(3).retry_delay(Duration::from_millis(10)))
//!     .step("send-email", |_ctx| async { Ok(()) });
//!
//! let input = PaymentInput { order_id: "order_2".into(), amount: 2000, user_id: "user_B".into() };
//! let report = payment_flow.run_with(input, RunOptions::new().key("payment:order_2")).await?;
//! assert_eq!(report.status, RunStatus::Failed);
//! assert_eq!(report.failed().unwrap().attempts, 4);
//! # Ok(()) }
//! ```

#[cfg(feature = "client")]
pub use orchestrix_client::{Client, ClientError, Rejection, RemoteFlow};
#[cfg(feature = "embedded")]
pub use orchestrix_coordinator::{
    Coordinator, CoordinatorBuilder, Engine, Flow, Hooks, MemoryStore, Parallel, RunError,
    RunHandle, StepEvent, StepOptions, create,
};
// A coordinator over NATS in this process, and its durable store.
#[cfg(feature = "nats")]
pub use orchestrix_coordinator::{
    jetstream::{JetStreamStore, JetStreamStoreOptions},
    nats::{NatsBus, NatsBusOptions, Node, NodeBuilder, NodeStore},
};
pub use orchestrix_proto::{
    CommandId, CommandKind, CompensationReport, ControlAction, EventKind, FlowDef, FlowError,
    IdError, ListFilter, OnExhausted, OnUnknown, OperatorAction, Payload, RetryPolicy, RunEvent,
    RunId, RunOptions, RunReport, RunStatus, StepDef, StepReport, StepStatus,
};
#[cfg(feature = "worker")]
pub use orchestrix_worker::{
    FlowHandlers, ResultExt, StepContext, StepError, Worker, WorkerBuilder, WorkerError,
};
#[cfg(any(feature = "worker", feature = "client"))]
pub use orchestrix_worker::{NatsOptions, redact_url};

/// What most programs need, in one `use orchestrix::prelude::*;`.
///
/// ```
/// use orchestrix::prelude::*;
///
/// # #[tokio::main] async fn main() -> Result<(), RunError> {
/// let flow = create::<u32>("count")
///     .step("check", |ctx: StepContext<u32>| async move {
///         if ctx.input > 10 { Err(StepError::permanent("too many")) } else { Ok(()) }
///     });
/// let report = flow.run(3).await?;
/// assert_eq!(report.status, RunStatus::Completed);
/// let id: RunId = report.run_id.to_string().parse().expect("a run id reads back");
/// assert_eq!(id, report.run_id);
/// # Ok(()) }
/// ```
pub mod prelude {
    #[cfg(feature = "client")]
    pub use crate::{Client, RemoteFlow};
    #[cfg(feature = "embedded")]
    pub use crate::{Coordinator, Flow, RunError, RunHandle, StepOptions, create};
    #[cfg(feature = "worker")]
    pub use crate::{NatsOptions, ResultExt, StepContext, StepError, Worker};
    pub use crate::{RetryPolicy, RunId, RunOptions, RunReport, RunStatus, StepStatus};
}

/// The coordinator: engine, buses, stores, and `nats::Node` (a coordinator over NATS).
#[cfg(feature = "embedded")]
pub use orchestrix_coordinator as coordinator;
/// The wire contract (messages, subjects, codec).
pub use orchestrix_proto as proto;
/// The worker SDK.
#[cfg(feature = "worker")]
pub use orchestrix_worker as worker;
/// Logs and OTLP export for a service: `telemetry::init(service, level)` once
/// at start (export needs the `otlp` feature).
#[cfg(any(feature = "worker", feature = "client"))]
pub use orchestrix_worker::telemetry;
