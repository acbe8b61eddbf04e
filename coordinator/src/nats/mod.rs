//! The distributed home: the NATS bus, the coordinator service that answers
//! run requests, the client that sends them, and [`Node`], which puts a
//! coordinator together over NATS.

mod bus;
mod events;
mod node;
mod service;

pub use bus::{NatsBus, NatsBusOptions};
pub use events::{EventPublisher, camel_case, describe, event_json};
pub use node::{Node, NodeBuilder, NodeError, NodeStore};
pub use orchestrix_client::{Client, ClientError, Rejection};
pub use service::{Service, ServiceError};
