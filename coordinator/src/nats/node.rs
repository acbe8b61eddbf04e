//! One composition root for a coordinator over NATS: the bus, the store, run
//! events, metrics, recovery and takeover of orphaned runs, and the request
//! service, started in the right order and stopped together.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use orchestrix_proto::Subjects;
use tokio::task::JoinHandle;

use super::{EventPublisher, NatsBus, NatsBusOptions, Service, ServiceError};
use crate::jetstream::{JetStreamStore, JetStreamStoreOptions};
use crate::{BusError, Coordinator, FlowDef, FlowError, Hooks, RunError, StoreError};
use orchestrix_worker::registry::{Registry, RegistryError};

/// A coordinator node could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    /// The NATS bus could not start.
    #[error("cannot start the NATS bus: {0}")]
    Bus(#[from] BusError),
    /// The store could not be opened.
    #[error("cannot open the run store: {0}")]
    Store(#[from] StoreError),
    /// A flow is not valid.
    #[error(transparent)]
    Flow(#[from] FlowError),
    /// Recovering the runs of a previous life failed.
    #[error("cannot recover runs: {0}")]
    Recover(#[from] RunError),
    /// The request service could not subscribe.
    #[error(transparent)]
    Service(#[from] ServiceError),
    /// The flow registry could not be opened.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// The NATS user lacks a permission a coordinator needs.
    #[error("NATS refused this coordinator: {0} (see `orchestrix auth config`)")]
    Permission(String),
}

/// Where a node keeps its runs.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum NodeStore {
    /// NATS JetStream KV: durable, shared by the coordinators on one NATS.
    JetStream(JetStreamStoreOptions),
    /// In this process: lost with it.
    Memory,
}

/// Builds a [`Node`].
///
/// ```no_run
/// # async fn f() -> Result<(), Box<dyn std::error::Error>> {
/// use orchestrix_coordinator::nats::Node;
///
/// let conn = async_nats::connect("nats://127.0.0.1:4222").await?;
/// // Serves every flow that workers register; `.flows(..)` adds flows of its own.
/// let node = Node::builder().start(conn).await?;
/// // … until asked to stop:
/// node.shutdown().await;
/// # Ok(()) }
/// ```
#[must_use]
pub struct NodeBuilder {
    subjects: Subjects,
    bus: NatsBusOptions,
    store: NodeStore,
    flows: Vec<FlowDef>,
    hooks: Vec<Arc<dyn Hooks>>,
    events: bool,
    registry: bool,
    takeover_every: Duration,
}

impl fmt::Debug for NodeBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeBuilder")
            .field("prefix", &self.subjects.prefix())
            .field("store", &self.store)
            .field("flows", &self.flows.len())
            .finish_non_exhaustive()
    }
}

impl Default for NodeBuilder {
    fn default() -> Self {
        NodeBuilder {
            subjects: Subjects::default(),
            bus: NatsBusOptions::default(),
            store: NodeStore::JetStream(JetStreamStoreOptions::default()),
            flows: Vec::new(),
            hooks: Vec::new(),
            events: true,
            registry: true,
            takeover_every: Duration::from_secs(1),
        }
    }
}

impl NodeBuilder {
    /// The subject prefix (also the buckets' prefix).
    pub fn subjects(mut self, subjects: Subjects) -> Self {
        self.subjects = subjects;
        self
    }

    /// Timeouts and limits of the bus (its subjects are set from [`Self::subjects`]).
    pub fn bus_options(mut self, options: NatsBusOptions) -> Self {
        self.bus = options;
        self
    }

    /// Where runs are kept (default: JetStream KV).
    pub fn store(mut self, store: NodeStore) -> Self {
        self.store = store;
        self
    }

    /// A flow to serve.
    pub fn flow_def(mut self, def: FlowDef) -> Self {
        self.flows.push(def);
        self
    }

    /// Flows to serve.
    pub fn flows(mut self, defs: impl IntoIterator<Item = FlowDef>) -> Self {
        self.flows.extend(defs);
        self
    }

    /// Hooks for every run of this node (metrics, logging).
    pub fn hooks(mut self, hooks: impl Hooks) -> Self {
        self.hooks.push(Arc::new(hooks));
        self
    }

    /// Whether run events are published on `{prefix}.events.{run_id}` (default yes).
    pub fn events(mut self, on: bool) -> Self {
        self.events = on;
        self
    }

    /// Whether to serve the flows registered by workers in the cluster's
    /// flow registry (default yes; needs JetStream). Without it the node
    /// serves only the flows given to [`Self::flows`].
    pub fn registry(mut self, on: bool) -> Self {
        self.registry = on;
        self
    }

    /// How often orphaned runs are looked for (default 1 s).
    pub fn takeover_every(mut self, every: Duration) -> Self {
        self.takeover_every = every;
        self
    }

    /// Starts the node on `conn`: bus, store, then the runs of a previous
    /// life (recovered before anything new is accepted), the takeover loop,
    /// and last the request service. Call from within a tokio runtime.
    pub async fn start(self, conn: async_nats::Client) -> Result<Node, NodeError> {
        let started = self.start_on(conn.clone()).await;
        // A refusal shows as a timeout or a missing subscription: name the
        // permission instead, whatever failed.
        if let Err(mut refused) = orchestrix_worker::check_permissions(&conn).await {
            // The most common slip: a user whose replies live under its own
            // prefix, started without it.
            if refused.contains("\"_INBOX.") {
                refused.push_str(
                    "; this user's replies may need their own prefix: --inbox-prefix (or NATS_INBOX_PREFIX), e.g. _INBOX_{user}",
                );
            }
            return Err(NodeError::Permission(refused));
        }
        started
    }

    async fn start_on(self, conn: async_nats::Client) -> Result<Node, NodeError> {
        let bus_options = self.bus.subjects(self.subjects.clone());
        let bus = NatsBus::start(conn.clone(), bus_options).await?;
        let mut builder = Coordinator::builder().bus(bus).registry(self.registry);
        if self.events {
            builder = builder.hooks(EventPublisher::start(conn.clone(), self.subjects.clone()));
        }
        for h in self.hooks {
            builder = builder.hooks(h);
        }
        let mut replicas = 1;
        if let NodeStore::JetStream(options) = self.store {
            let options = options.prefix(self.subjects.prefix());
            replicas = options.replicas;
            // A cluster that is still electing its leaders (every node
            // started at once, say) times requests out for a while: tried
            // again for up to 2 min rather than given up at once. Each try
            // gets further (its timed-out buckets were made all the same),
            // but on a busy 3-node cluster with several coordinators
            // starting together each of the 7 buckets took one 5 s timeout,
            // which 30 s did not cover. Only timeouts: a server without
            // JetStream answers at once and is said at once; a user without
            // the rights times out too (the server drops what it refuses),
            // but its refusals reach this connection: said as soon as one has.
            let give_up = std::time::Instant::now() + Duration::from_secs(120);
            let electing = |e: &StoreError| {
                let text = e.to_string();
                matches!(e, StoreError::Unavailable(_))
                    && (text.contains("timed out") || text.contains("temporarily unavailable"))
                    && orchestrix_worker::permission_violations(&conn).is_empty()
            };
            let store = loop {
                match JetStreamStore::open(conn.clone(), options.clone()).await {
                    Err(e) if electing(&e) && std::time::Instant::now() < give_up => {
                        tracing::warn!(error = %e, "cannot open the run store yet; trying again");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                    opened => break opened?,
                }
            };
            builder = builder.store(store);
        }
        for def in self.flows {
            builder = builder.flow_def(def);
        }
        let coordinator = builder.build()?;
        // The registry is loaded before recovery, so resumed runs find their versions.
        let registry = if self.registry {
            let registry = Registry::open(conn.clone(), self.subjects.prefix(), replicas).await?;
            registry.forbid_rollups().await?;
            Some(coordinator.follow_registry(registry).await?)
        } else {
            None
        };
        let resumed = coordinator.recover().await?;
        let takeover = coordinator.take_over_orphans(self.takeover_every);
        let service = Service::start(coordinator.clone(), conn, &self.subjects).await?;
        Ok(Node { coordinator, service: Some(service), takeover, registry, resumed })
    }
}

/// A running coordinator over NATS (see [`NodeBuilder::start`]).
pub struct Node {
    coordinator: Coordinator,
    service: Option<Service>,
    takeover: JoinHandle<()>,
    registry: Option<JoinHandle<()>>,
    resumed: usize,
}

impl fmt::Debug for Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Node")
            .field("coordinator", &self.coordinator)
            .field("resumed", &self.resumed)
            .finish_non_exhaustive()
    }
}

impl Node {
    /// Starts configuring a node.
    pub fn builder() -> NodeBuilder {
        NodeBuilder::default()
    }

    /// The coordinator, to start and follow runs in this process.
    pub fn coordinator(&self) -> &Coordinator {
        &self.coordinator
    }

    /// Runs of a previous life resumed at start.
    pub fn resumed(&self) -> usize {
        self.resumed
    }

    /// Stops taking requests and looking for orphans. Runs in flight keep
    /// their records: another coordinator (or this one, restarted) resumes
    /// them once this node's heartbeat expires.
    pub async fn shutdown(mut self) {
        self.stop();
        drop(self.service.take());
    }

    fn stop(&mut self) {
        self.takeover.abort();
        if let Some(r) = &self.registry {
            r.abort();
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.stop();
    }
}
