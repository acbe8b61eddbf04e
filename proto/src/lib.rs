//! The Orchestrix wire contract.
//!
//! Everything that crosses a process boundary is defined here: the messages a
//! coordinator and its workers exchange ([`StepCommand`], [`Ack`], [`Heartbeat`],
//! [`StepOutcome`]), the messages a caller exchanges with a coordinator
//! ([`RunRequest`], [`RunReply`], [`RunReport`]), the subject names they travel
//! on ([`Subjects`]), the header names ([`headers`]) and the codec
//! ([`encode`] / [`decode`]): MessagePack with named fields, wrapped in a small
//! envelope that carries the [`PROTOCOL_VERSION`].
//!
//! The crate is pure data: no I/O and no async runtime, so the worker SDK, the
//! coordinator and third-party tooling can share it.
//!
//! ```
//! use orchestrix_proto::{decode, encode, Ack};
//! use uuid::Uuid;
//!
//! let ack = Ack { command_id: Uuid::nil(), run_id: Uuid::nil(), attempt: 1, worker: "w-1".into() };
//! let bytes = encode(&ack).unwrap();
//! let back: Ack = decode(&bytes).unwrap();
//! assert_eq!(back, ack);
//! ```

mod codec;
mod fast;
mod flow;
mod ids;
mod messages;
mod options;
mod payload;
mod report;
mod retry;
mod subject;
mod tagged;
pub mod time;
mod trace;

pub use codec::{
    CodecError, DEFAULT_MAX_MESSAGE_BYTES, MAX_DEPTH, Message, MessageIds, PROTOCOL_VERSION,
    decode, decode_ids, decode_with_limit, encode, from_slice as from_msgpack, peek_kind,
};
pub use flow::{FlowDef, FlowError, OnExhausted, OnUnknown, StepDef};
pub use ids::{CommandId, IdError, RunId, uuid_text};
pub use messages::{
    Ack, Acked, Acks, CommandKind, ControlRequest, EventKind, FlowRegistration, Heartbeat,
    ListRequest, OutcomeResult, RunEvent, RunReply, RunRequest, ServedFlow, StatusRequest,
    StepCancel, StepCommand, StepFailure, StepOutcome, StepOutput, WireError, WorkerPresence,
};
pub use options::{ListFilter, RunOptions};
pub use payload::Payload;
pub use report::{
    CompensationReport, ControlAction, OperatorAction, PauseReport, RunReport, RunStatus,
    StepReport, StepStatus,
};
pub use retry::RetryPolicy;
pub use subject::{MAX_NAME_LEN, NameError, Subjects, validate_name};
pub use trace::TraceParent;

/// Names of the NATS headers Orchestrix sets and reads.
pub mod headers {
    /// W3C trace context of the sender's span, so the receiver's span joins the trace.
    pub const TRACEPARENT: &str = "traceparent";
    /// W3C trace state that accompanies [`TRACEPARENT`].
    pub const TRACESTATE: &str = "tracestate";
    /// The protocol version of the message in the body, for routing without decoding.
    pub const PROTOCOL_VERSION: &str = "Orchestrix-Version";
    /// The message kind of the body (see [`crate::Message::KIND`]).
    pub const MESSAGE_KIND: &str = "Orchestrix-Kind";
    /// On a step command: the sender reads [`crate::Acks`], so a worker may
    /// acknowledge it together with others received at the same time.
    /// Value [`ACKS_BATCH`].
    pub const ACKS: &str = "Orchestrix-Acks";
    /// The value of [`ACKS`].
    pub const ACKS_BATCH: &str = "batch";
}
