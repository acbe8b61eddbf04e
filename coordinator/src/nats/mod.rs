//! The distributed home: the NATS bus, the coordinator service that answers
//! run requests, and the client that sends them.

mod bus;
mod client;
mod events;
mod service;

pub use bus::{NatsBus, NatsBusOptions};
pub use client::{Client, ClientError};
pub use events::{EventPublisher, describe};
pub use service::{Service, ServiceError};
