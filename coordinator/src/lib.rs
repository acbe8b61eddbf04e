//! The Orchestrix coordinator: runs sagas.
//!
//! A flow is a named list of steps. Each run of a flow is driven by its own
//! actix actor, which sends one command per step attempt over a [`Bus`], keeps
//! every transition in a [`Store`] before acting on it, retries failed attempts
//! per the step's [`RetryPolicy`], and when a step fails for good compensates
//! the completed steps in reverse order. The caller gets a [`RunReport`].
//!
//! The embedded home (in-memory bus and store) needs no server:
//!
//! ```
//! use std::time::Duration;
//! use orchestrix_coordinator::{create, RunStatus};
//! use orchestrix_worker::StepError;
//!
//! #[derive(serde::Serialize, serde::Deserialize)]
//! struct Order { id: String, amount: u64 }
//!
//! # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let flow = create::<Order>("order")
//!     .step_with("reserve", |_ctx| async { Ok(()) },
//!         |o| o.compensate(|ctx| async move { println!("release {}", ctx.input.id); Ok(()) }))
//!     .step_with("charge", |ctx| async move {
//!         if ctx.input.amount > 1000 { return Err(StepError::permanent("declined")); }
//!         Ok(())
//!     }, |o| o.retries(2).retry_delay(Duration::from_millis(10)));
//!
//! let report = flow.run(Order { id: "o-2".into(), amount: 2000 }).await?;
//! assert_eq!(report.status, RunStatus::Failed);
//! assert_eq!(report.failed_step.as_deref(), Some("charge"));
//! # Ok(()) }
//! ```

mod actor;
pub mod auth;
mod bus;
mod coordinator;
mod engine;
mod flow;
pub mod flowfile;
mod hooks;
pub mod jetstream;
pub mod listing;
mod machine;
pub mod metrics;
pub mod nats;
/// The stored form of a run: for [`Store`] implementations; it may change
/// between releases.
#[doc(hidden)]
pub mod record;
mod registry;
pub mod slots;
mod store;
mod telemetry;
#[cfg(feature = "ui")]
pub mod ui;

pub use bus::{Bus, BusError, BusReply, Dispatched, Liveness, MemoryBus, ReplyTo};
pub use coordinator::{Coordinator, CoordinatorBuilder, MAX_KEY_LEN, RunError, RunHandle};
pub use engine::{Engine, EngineError};
pub use flow::{
    Flow, FlowDef, FlowError, OnExhausted, OnUnknown, Parallel, StepDef, StepOptions, create,
};
pub use hooks::{Hooks, StepEvent};
pub use machine::DEFAULT_MAX_RUN_PAYLOAD;
pub use orchestrix_proto::{
    ListFilter, RetryPolicy, RunOptions, RunReport, RunStatus, StepReport, StepStatus,
};
pub use registry::{FlowVersion, RegistryView};

/// Logs and OTLP export for a binary. Moved to the worker SDK, so that a
/// worker can log without depending on the coordinator: this is
/// [`orchestrix_worker::telemetry`] under its former name, kept for existing
/// callers.
pub use orchestrix_worker::telemetry as observability;
pub use store::{
    ActorsHere, Created, MemoryStore, MemoryStoreOptions, NoActors, Pending, Store, StoreError,
};
