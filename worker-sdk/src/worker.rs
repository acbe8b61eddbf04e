//! A worker process: serves step commands from NATS with registered handlers.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use orchestrix_proto::{
    Ack, Acked, Acks, CommandKind, DEFAULT_MAX_MESSAGE_BYTES, Heartbeat, Message, NameError,
    OutcomeResult, StepCancel, StepCommand, StepFailure, StepOutcome, Subjects, WireError,
    WorkerPresence, decode_with_limit, encode, validate_name,
};
use serde::{Serialize, de::DeserializeOwned};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinHandle;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};
use uuid::Uuid;

use crate::registry::{Registry, RegistryError};
use crate::{
    BoxedHandler, CancellationToken, ConnectError, FlowHandlers, NatsOptions, StepContext,
    StepError, handler, run_command_with,
};

/// A worker could not be started.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WorkerError {
    /// NATS could not be reached.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// A subscription was refused.
    #[error("cannot subscribe to {subject}: {source}")]
    Subscribe {
        /// The subject.
        subject: String,
        /// Why.
        #[source]
        source: async_nats::SubscribeError,
    },
    /// A flow, step or prefix name is not valid.
    #[error(transparent)]
    Name(#[from] NameError),
    /// A step was registered twice.
    #[error("step `{step}` of flow `{flow}` has two {kind} handlers")]
    Duplicate {
        /// Flow name.
        flow: String,
        /// Step name.
        step: String,
        /// `execute` or `compensate`.
        kind: &'static str,
    },
    /// Nothing to serve.
    #[error("the worker has no step handlers")]
    NoSteps,
    /// A flow given to [`WorkerBuilder::flow`] is not valid.
    #[error(transparent)]
    Flow(#[from] orchestrix_proto::FlowError),
    /// [`WorkerBuilder::flow_steps`] named a step the flow does not have.
    #[error("flow `{flow}` has no step `{step}`")]
    UnknownStep {
        /// Flow name.
        flow: String,
        /// The step asked for.
        step: String,
    },
    /// The flow registry refused a definition or cannot be reached.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// The NATS user lacks a permission this worker needs.
    #[error("NATS refused this worker: {0}")]
    Permission(String),
}

impl WorkerError {
    /// A permission error, with what to do for the refusal at hand.
    fn refused(violations: String) -> Self {
        let hint = if violations.contains("Subscription to") || violations.contains("$KV.") {
            "this user is not granted the flow: grant it with `orchestrix auth config --grant USER:worker:FLOW,…`"
        } else if violations.contains("$JS.API") {
            "under least privilege a coordinator creates the registry's buckets: start one first"
        } else {
            "see `orchestrix auth config`"
        };
        WorkerError::Permission(format!("{violations} ({hint})"))
    }
}

#[derive(Clone)]
struct Registration {
    flow: String,
    /// The version served; `None`: every version.
    version: Option<Arc<str>>,
    step: String,
    execute: Option<BoxedHandler>,
    compensate: Option<BoxedHandler>,
}

impl Registration {
    fn get(&self, kind: CommandKind) -> Option<&BoxedHandler> {
        match kind {
            CommandKind::Execute => self.execute.as_ref(),
            CommandKind::Compensate => self.compensate.as_ref(),
        }
    }
}

/// The handlers of one flow's steps by name, typed by the flow's input.
/// Built inside [`WorkerBuilder::steps`].
#[must_use]
pub struct WorkerFlow<I> {
    flow: String,
    regs: Vec<Registration>,
    error: Option<WorkerError>,
    _input: PhantomData<fn(I)>,
}

impl<I> fmt::Debug for WorkerFlow<I> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkerFlow")
            .field("flow", &self.flow)
            .field("steps", &self.regs.len())
            .finish()
    }
}

impl<I: DeserializeOwned + Send + 'static> WorkerFlow<I> {
    fn entry(&mut self, step: &str) -> &mut Registration {
        if let Err(e) = validate_name("step", step) {
            self.error.get_or_insert(e.into());
        }
        let i = match self.regs.iter().position(|r| r.step == step) {
            Some(i) => i,
            None => {
                self.regs.push(Registration {
                    flow: self.flow.clone(),
                    version: None,
                    step: step.to_owned(),
                    execute: None,
                    compensate: None,
                });
                self.regs.len() - 1
            }
        };
        &mut self.regs[i]
    }

    /// Serves the action of step `name`.
    pub fn step<O, F, Fut>(self, name: &str, f: F) -> Self
    where
        O: Serialize + Send + 'static,
        F: Fn(StepContext<I>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<O, StepError>> + Send + 'static,
    {
        self.register(name, CommandKind::Execute, handler(f))
    }

    /// Serves the compensation of step `name`.
    pub fn compensate<O, F, Fut>(self, name: &str, f: F) -> Self
    where
        O: Serialize + Send + 'static,
        F: Fn(StepContext<I>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<O, StepError>> + Send + 'static,
    {
        self.register(name, CommandKind::Compensate, handler(f))
    }

    fn register(mut self, name: &str, kind: CommandKind, h: BoxedHandler) -> Self {
        let flow = self.flow.clone();
        let reg = self.entry(name);
        let slot = match kind {
            CommandKind::Execute => &mut reg.execute,
            CommandKind::Compensate => &mut reg.compensate,
        };
        if slot.replace(h).is_some() {
            let dup = WorkerError::Duplicate { flow, step: name.into(), kind: kind.as_str() };
            self.error.get_or_insert(dup);
        }
        self
    }
}

/// Configures and starts a [`Worker`].
#[must_use]
pub struct WorkerBuilder {
    nats: NatsOptions,
    client: Option<async_nats::Client>,
    prefix: String,
    concurrency: usize,
    heartbeat: Duration,
    dedup_window: usize,
    max_message_bytes: usize,
    drain_timeout: Duration,
    regs: Vec<Registration>,
    defs: Vec<orchestrix_proto::FlowDef>,
    registry: bool,
    registry_replicas: usize,
    default_logging: bool,
    error: Option<WorkerError>,
}

impl fmt::Debug for WorkerBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkerBuilder")
            .field("nats", &self.nats.url)
            .field("prefix", &self.prefix)
            .field("concurrency", &self.concurrency)
            .field("steps", &self.regs.len())
            .finish()
    }
}

impl Default for WorkerBuilder {
    fn default() -> Self {
        WorkerBuilder {
            nats: NatsOptions::default(),
            client: None,
            // The same variable the CLI and coordinators read.
            prefix: std::env::var("ORCHESTRIX_PREFIX")
                .ok()
                .filter(|p| !p.is_empty())
                .unwrap_or_else(|| Subjects::DEFAULT_PREFIX.into()),
            concurrency: 64,
            heartbeat: Duration::from_secs(1),
            dedup_window: 10_000,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            drain_timeout: Duration::from_secs(60),
            regs: Vec::new(),
            defs: Vec::new(),
            registry: true,
            registry_replicas: 1,
            default_logging: true,
            error: None,
        }
    }
}

impl WorkerBuilder {
    /// Where NATS is (default: `NATS_URL`, else `nats://127.0.0.1:4222`).
    pub fn nats(mut self, options: NatsOptions) -> Self {
        self.nats = options;
        self
    }

    /// Uses a connection the service already has.
    pub fn client(mut self, client: async_nats::Client) -> Self {
        self.client = Some(client);
        self
    }

    /// Subject prefix; must match the coordinator's (default: `ORCHESTRIX_PREFIX`,
    /// else `orchestrix`).
    pub fn prefix(mut self, prefix: &str) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// Handlers run at once at most (default 64). Commands beyond are
    /// acknowledged and wait, heartbeating, for a free slot.
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n.max(1);
        self
    }

    /// Interval of heartbeats while a command is in hand (default 1 s). The
    /// coordinator gives up on a command after a few missed ones.
    pub fn heartbeat_interval(mut self, every: Duration) -> Self {
        self.heartbeat = every.max(Duration::from_millis(10));
        self
    }

    /// Command ids remembered to answer redeliveries without running again
    /// (default 10,000).
    pub fn dedup_window(mut self, n: usize) -> Self {
        self.dedup_window = n.max(1);
        self
    }

    /// Largest command accepted, in bytes (default 1 MiB).
    pub fn max_message_bytes(mut self, n: usize) -> Self {
        self.max_message_bytes = n;
        self
    }

    /// How long [`Worker::shutdown`] waits for the commands in hand (default 60 s).
    pub fn drain_timeout(mut self, d: Duration) -> Self {
        self.drain_timeout = d;
        self
    }

    /// Serves every step of `flow` (its actions and compensations) and
    /// registers its definition in the cluster's flow registry, so that
    /// coordinators run it with no flow file of their own. The same `Flow`
    /// value runs embedded with `flow.run(input)`:
    ///
    /// ```no_run
    /// # async fn f() -> Result<(), orchestrix_worker::WorkerError> {
    /// use orchestrix_worker::proto::{FlowDef, StepDef};
    /// use orchestrix_worker::{FlowHandlers, StepContext, StepHandlers, Worker, handler};
    ///
    /// // Usually `orchestrix::create::<u32>("double").step("double", ..)`, which
    /// // turns into this: a definition and one handler per step.
    /// let mut def = FlowDef::new("double");
    /// def.steps.push(StepDef::new("double"));
    /// let double = handler(|ctx: StepContext<u32>| async move { Ok(ctx.input * 2) });
    /// let flow = FlowHandlers::new(def, vec![StepHandlers { execute: double, compensate: None }]);
    /// let worker = Worker::builder().flow(flow).start().await?;
    /// worker.run_until_signal().await;
    /// # Ok(()) }
    /// ```
    ///
    /// Runs are pinned to the version they started on (see
    /// [`orchestrix_proto::FlowDef::version`]): this worker gets the commands
    /// of this version only, so a changed flow never receives runs begun on
    /// the old one.
    pub fn flow(self, flow: impl Into<FlowHandlers>) -> Self {
        let flow = flow.into();
        let all: Vec<String> = flow.def.steps.iter().map(|s| s.name.to_string()).collect();
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        self.flow_steps(flow, &all)
    }

    /// Serves only the named steps of `flow`, for a service that owns a part
    /// of it (other services serve the rest). The whole definition is
    /// registered all the same: every part registers the same version.
    pub fn flow_steps(mut self, flow: impl Into<FlowHandlers>, steps: &[&str]) -> Self {
        let flow = flow.into();
        if let Some(e) = flow.error.or_else(|| flow.def.validate().err()) {
            self.error.get_or_insert(e.into());
            return self;
        }
        let version = flow.def.version();
        for step in steps {
            let Some(i) = flow.def.position(step) else {
                self.error.get_or_insert(WorkerError::UnknownStep {
                    flow: flow.def.name.to_string(),
                    step: (*step).to_owned(),
                });
                continue;
            };
            let h = &flow.handlers[i];
            let reg = Registration {
                flow: flow.def.name.to_string(),
                version: Some(version.clone()),
                step: (*step).to_owned(),
                execute: Some(h.execute.clone()),
                compensate: h.compensate.clone(),
            };
            self.add(reg);
        }
        if !self.defs.iter().any(|d| d.name == flow.def.name && d.version() == version) {
            self.defs.push(flow.def);
        }
        self
    }

    /// Serves steps of a flow by name, for **every version** of it, without
    /// registering a definition: for flows whose definition comes from
    /// elsewhere (a TOML file applied with `orchestrix flows apply`, or a
    /// coordinator's own flow file).
    ///
    /// ```no_run
    /// # async fn f() -> Result<(), orchestrix_worker::WorkerError> {
    /// use orchestrix_worker::Worker;
    /// let worker = Worker::builder()
    ///     .steps::<String>("greet", |f| f
    ///         .step("hello", |ctx| async move { Ok(format!("hello {}", ctx.input)) })
    ///         .compensate("hello", |_ctx| async { Ok(()) }))
    ///     .start()
    ///     .await?;
    /// worker.run_until_signal().await;
    /// # Ok(()) }
    /// ```
    pub fn steps<I>(mut self, name: &str, f: impl FnOnce(WorkerFlow<I>) -> WorkerFlow<I>) -> Self
    where
        I: DeserializeOwned + Send + 'static,
    {
        let error = validate_name("flow", name).err().map(WorkerError::from);
        let flow =
            f(WorkerFlow { flow: name.into(), regs: Vec::new(), error, _input: PhantomData });
        if let Some(e) = flow.error {
            self.error.get_or_insert(e);
        }
        for reg in flow.regs {
            self.add(reg);
        }
        self
    }

    fn add(&mut self, reg: Registration) {
        if self
            .regs
            .iter()
            .any(|r| r.flow == reg.flow && r.step == reg.step && r.version == reg.version)
        {
            self.error.get_or_insert(WorkerError::Duplicate {
                flow: reg.flow,
                step: reg.step,
                kind: "step",
            });
        } else {
            self.regs.push(reg);
        }
    }

    /// Whether to use the flow registry (default yes): register the
    /// definitions given to [`Self::flow`] and announce what this worker
    /// serves. Without it, coordinators need the flows in their own flow
    /// files, with identical definitions.
    pub fn registry(mut self, on: bool) -> Self {
        self.registry = on;
        self
    }

    /// Replicas of the registry buckets if this worker is the first to
    /// create them (default 1; coordinators create them with their own
    /// `--replicas` first in a cluster).
    pub fn registry_replicas(mut self, n: usize) -> Self {
        self.registry_replicas = n.max(1);
        self
    }

    /// Whether [`Self::start`] installs a fallback log subscriber when the
    /// process has none (default yes), so that the worker's own errors — a
    /// malformed command, a reply it cannot send, a drain that timed out — are
    /// not lost: stderr, the level from `RUST_LOG`, else `warn`.
    ///
    /// Nothing is installed when a global subscriber is already set, or one
    /// is in force on the calling thread (`tracing::subscriber::with_default`).
    /// Install yours (for instance with [`crate::telemetry::init`]) *before*
    /// starting the worker: a global subscriber can be set only once, so one
    /// installed after the worker's fallback is refused. Pass `false` to keep
    /// the process free of any subscriber the service did not install.
    pub fn default_logging(mut self, on: bool) -> Self {
        self.default_logging = on;
        self
    }

    /// Connects, subscribes to every registered step and starts serving.
    ///
    /// Installs a fallback log subscriber first if the process has none
    /// (see [`Self::default_logging`]).
    pub async fn start(self) -> Result<Worker, WorkerError> {
        if self.default_logging && crate::telemetry::install_fallback() {
            debug!("no tracing subscriber was installed: logging warnings to stderr");
        }
        if let Some(e) = self.error {
            return Err(e);
        }
        if self.regs.is_empty() {
            return Err(WorkerError::NoSteps);
        }
        let subjects = Subjects::new(&self.prefix)?;
        let id = worker_id();
        let client = match self.client {
            Some(c) => c,
            None => self.nats.clone().name(format!("orchestrix-worker {id}")).connect().await?,
        };
        // Definitions first: a conflict stops the worker before it serves anything.
        let registry = if self.registry {
            match Registry::open(client.clone(), subjects.prefix(), self.registry_replicas).await {
                Ok(r) => {
                    for def in &self.defs {
                        let reg = match r.register(def, &id).await {
                            Ok(reg) => reg,
                            Err(e) => {
                                // A refused write times out: say why, if the server said.
                                crate::nats::check_permissions(&client)
                                    .await
                                    .map_err(WorkerError::refused)?;
                                return Err(e.into());
                            }
                        };
                        info!(flow = %def.name, version = %reg.version, "flow registered");
                    }
                    Some(r)
                }
                // Definitions need the registry; serving steps by name does not.
                Err(e) if !self.defs.is_empty() => {
                    crate::nats::check_permissions(&client).await.map_err(WorkerError::refused)?;
                    return Err(e.into());
                }
                Err(e) => {
                    warn!(error = %e, "no flow registry: this worker will not be listed");
                    None
                }
            }
        } else {
            None
        };
        let shared = Arc::new(Shared {
            outbox: Mutex::default(),
            client: client.clone(),
            id: id.clone(),
            dedup: Mutex::new(Dedup::new(self.dedup_window)),
            slots: Arc::new(Semaphore::new(self.concurrency)),
            heartbeat: self.heartbeat,
            max_message_bytes: self.max_message_bytes,
            tracker: TaskTracker::new(),
        });
        let (stop, stopped) = watch::channel(false);
        let mut loops = Vec::new();
        let presence = WorkerPresence {
            worker: id.clone(),
            host: gethostname::gethostname().to_string_lossy().into_owned(),
            started_at_ms: orchestrix_proto::time::unix_ms(std::time::SystemTime::now()),
            flows: crate::registry::served(
                self.regs
                    .iter()
                    .filter(|r| r.execute.is_some())
                    .map(|r| (r.flow.clone(), r.version.clone(), r.step.clone())),
            ),
        };
        for reg in self.regs {
            let subject = match &reg.version {
                Some(v) => subjects.step(&reg.flow, v, &reg.step),
                None => subjects.step_any_version(&reg.flow, &reg.step),
            };
            let group = subjects.step_queue_group(&reg.flow, &reg.step);
            let sub = client
                .queue_subscribe(subject.clone(), group)
                .await
                .map_err(|source| WorkerError::Subscribe { subject: subject.clone(), source })?;
            // Every replica hears inquiries about the step's commands (no
            // queue group): the one that holds a command answers for it.
            let inquiries = subjects.inquiries(&reg.flow, &reg.step);
            let isub = client
                .subscribe(inquiries.clone())
                .await
                .map_err(|source| WorkerError::Subscribe { subject: inquiries, source })?;
            debug!(worker = %id, %subject, "serving step");
            let reg = Arc::new(reg);
            loops.push(tokio::spawn(serve(
                sub,
                reg.clone(),
                shared.clone(),
                Via::Queue,
                stopped.clone(),
            )));
            loops.push(tokio::spawn(serve(
                isub,
                reg,
                shared.clone(),
                Via::Inquiry,
                stopped.clone(),
            )));
        }
        // Subscriptions must be in force at the server before the worker
        // reports ready; one it may not have fails the start, by name.
        if let Err(refused) = crate::nats::check_permissions(&client).await {
            for l in &loops {
                l.abort();
            }
            return Err(WorkerError::refused(refused));
        }
        // Announced once serving, so a coordinator that sees it can use it.
        let announcer = match registry.clone() {
            Some(r) => {
                if let Err(e) = r.announce(&presence).await {
                    warn!(error = %e, "cannot announce this worker in the flow registry");
                }
                let presence = presence.clone();
                Some(tokio::spawn(async move {
                    let mut tick = tokio::time::interval(crate::registry::PRESENCE_EVERY);
                    tick.tick().await;
                    loop {
                        tick.tick().await;
                        if let Err(e) = r.announce(&presence).await {
                            debug!(error = %e, "cannot renew this worker's presence");
                        }
                    }
                }))
            }
            None => None,
        };
        info!(worker = %id, steps = loops.len() / 2, "worker started");
        Ok(Worker {
            id,
            client,
            registry,
            announcer,
            stop,
            loops,
            tracker: shared.tracker.clone(),
            drain_timeout: self.drain_timeout,
        })
    }
}

/// A running worker. Dropping it leaves it running; call [`Worker::shutdown`]
/// (or [`Worker::run_until_signal`]) to drain it.
pub struct Worker {
    id: String,
    client: async_nats::Client,
    registry: Option<Registry>,
    announcer: Option<JoinHandle<()>>,
    stop: watch::Sender<bool>,
    loops: Vec<JoinHandle<()>>,
    tracker: TaskTracker,
    drain_timeout: Duration,
}

impl fmt::Debug for Worker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Worker").field("id", &self.id).finish_non_exhaustive()
    }
}

impl Worker {
    /// Starts configuring a worker.
    pub fn builder() -> WorkerBuilder {
        WorkerBuilder::default()
    }

    /// This worker's identity, as sent in acks and heartbeats.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Commands in hand: running, waiting for a slot, or with their outcome
    /// not yet handed to the client (a batch of them counts once).
    pub fn in_flight(&self) -> usize {
        self.tracker.len()
    }

    /// Drains: stops taking commands, finishes those in hand (their outcomes
    /// are sent), then returns.
    ///
    /// With NATS unreachable the outcomes cannot be sent: after waiting
    /// [`WorkerBuilder::drain_timeout`] for them, the worker gives up and
    /// returns; the coordinator retries those attempts elsewhere.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        if let Some(a) = &self.announcer {
            a.abort();
        }
        if let Some(r) = &self.registry {
            // Bounded: with NATS gone the presence simply expires.
            let _ = tokio::time::timeout(Duration::from_secs(2), r.withdraw(&self.id)).await;
        }
        self.tracker.close();
        let drained = async {
            for l in self.loops {
                let _ = l.await;
            }
            self.tracker.wait().await;
            let _ = self.client.flush().await;
        };
        match tokio::time::timeout(self.drain_timeout, drained).await {
            Ok(()) => info!(worker = %self.id, "worker drained"),
            Err(_) => {
                warn!(worker = %self.id, timeout = ?self.drain_timeout, "drain timed out; outcomes in hand may be lost")
            }
        }
    }

    /// Serves until SIGTERM or ctrl-c, then drains; a second signal during
    /// the drain stops at once (commands in hand are then lost to this
    /// worker: the coordinator treats them as it treats a crash).
    pub async fn run_until_signal(self) {
        wait_for_signal().await;
        let id = self.id.clone();
        info!(worker = %id, "signal received, draining (signal again to stop at once)");
        tokio::select! {
            () = self.shutdown() => {}
            () = wait_for_signal() => warn!(worker = %id, "second signal: stopping without draining"),
        }
    }

    /// Stops at once, like a crash: nothing more is answered. For tests.
    pub fn abort(self) {
        if let Some(a) = &self.announcer {
            a.abort();
        }
        for l in &self.loops {
            l.abort();
        }
        // Handler tasks end with the runtime or are simply never answered;
        // closing the connection makes the worker vanish from NATS.
        let client = self.client.clone();
        tokio::spawn(async move {
            let _ = client.drain().await;
        });
    }
}

/// Resolves on SIGTERM or ctrl-c: what a service waits for before draining.
pub async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// `{host}-{pid}-{tag}`: the host's real name (`gethostname(2)`; shells and
/// systemd do not export `HOSTNAME`), else `HOSTNAME`, else `worker`.
fn worker_id() -> String {
    let host = gethostname::gethostname()
        .into_string()
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()))
        .unwrap_or_else(|| "worker".into());
    let tag = Uuid::new_v4().simple().to_string();
    format!("{host}-{}-{}", std::process::id(), &tag[..6])
}

struct Shared {
    client: async_nats::Client,
    /// Outcomes waiting for the outbox task (see [`Shared::post`]).
    outbox: Mutex<Vec<(async_nats::Subject, Bytes)>>,
    id: String,
    dedup: Mutex<Dedup>,
    slots: Arc<Semaphore>,
    heartbeat: Duration,
    max_message_bytes: usize,
    tracker: TaskTracker,
}

impl Shared {
    async fn send<M: Message>(&self, reply: &async_nats::Subject, msg: &M) {
        self.try_send(reply, msg).await;
    }

    /// Queues an outcome for the worker's outbox task, which hands every
    /// outcome queued by then to the client at once: the handlers of a burst
    /// that finish together answer in one write to the socket rather than
    /// one write (a system call, which on loopback also pays for the
    /// receiving side) each. The task first yields, so that the other tasks
    /// ready to run (handlers finishing) queue theirs before it takes them.
    fn post(self: &Arc<Self>, reply: async_nats::Subject, outcome: Bytes) {
        let first = {
            let mut outbox = self.outbox.lock().unwrap_or_else(|p| p.into_inner());
            outbox.push((reply, outcome));
            outbox.len() == 1
        };
        if first {
            let shared = self.clone();
            self.tracker.spawn(async move {
                tokio::task::yield_now().await;
                let outcomes =
                    std::mem::take(&mut *shared.outbox.lock().unwrap_or_else(|p| p.into_inner()));
                for (reply, outcome) in outcomes {
                    shared.send_raw(&reply, outcome).await;
                }
            });
        }
    }

    /// The de-duplication cache (a panic elsewhere leaves it usable).
    fn dedup(&self) -> std::sync::MutexGuard<'_, Dedup> {
        self.dedup.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn forget(&self, command_id: Uuid) {
        self.dedup().forget(command_id);
    }

    /// Sends a reply; false if it could not be handed to the client
    /// (logged): it does not encode, is over the message limit, or the
    /// client refused it.
    async fn try_send<M: Message>(&self, reply: &async_nats::Subject, msg: &M) -> bool {
        let limit = self.client.max_payload().min(self.max_message_bytes);
        match encode(msg) {
            Ok(bytes) if bytes.len() <= limit => self.send_raw(reply, Bytes::from(bytes)).await,
            Ok(bytes) => {
                warn!(
                    kind = M::KIND,
                    size = bytes.len(),
                    limit,
                    "a reply over the message limit not sent"
                );
                false
            }
            Err(e) => {
                warn!(error = %e, "cannot encode a reply");
                false
            }
        }
    }

    /// Replies carry no headers: the envelope names their kind, and the
    /// coordinator reads it without decoding the body (`peek_kind`).
    /// Hands encoded bytes to the client; false if it refused them (logged).
    async fn send_raw(&self, reply: &async_nats::Subject, bytes: Bytes) -> bool {
        match self.client.publish(reply.clone(), bytes).await {
            Ok(()) => true,
            Err(e) => {
                warn!(error = %e, %reply, "cannot send a reply");
                false
            }
        }
    }
}

/// Where a command's heartbeats and outcome go. A redelivery (from a
/// coordinator that took over the run) moves it to the new coordinator.
type ReplyTarget = Arc<Mutex<async_nats::Subject>>;

fn target(t: &ReplyTarget) -> async_nats::Subject {
    t.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

#[derive(Clone)]
enum Seen {
    /// Admitted with its burst, not acknowledged yet: its ack (or its
    /// refusal) goes out with the burst's, to where it answers by then.
    Admitted(ReplyTarget, CancellationToken),
    /// In hand: where to answer, and how to stop it (a cancel).
    Running(ReplyTarget, CancellationToken),
    Done(Bytes),
    /// Cancelled before this worker started it: never start it.
    Cancelled,
}

/// Command ids seen recently, oldest first out.
struct Dedup {
    map: HashMap<Uuid, Seen, foldhash::fast::RandomState>,
    order: VecDeque<Uuid>,
    cap: usize,
}

impl Dedup {
    fn new(cap: usize) -> Self {
        Dedup { map: HashMap::default(), order: VecDeque::new(), cap }
    }

    /// What was seen of `id` before, if anything. A command seen running now
    /// answers to `reply` (a coordinator that took its run over).
    fn redelivered(&mut self, id: Uuid, reply: &ReplyTarget) -> Option<Seen> {
        let seen = self.map.get(&id)?;
        if let Seen::Admitted(t, _) | Seen::Running(t, _) = seen {
            *t.lock().unwrap_or_else(|p| p.into_inner()) = target(reply);
        }
        Some(seen.clone())
    }

    /// An admitted command's ack went out: it runs.
    fn started(&mut self, id: Uuid) {
        if let Some(seen) = self.map.get_mut(&id)
            && let Seen::Admitted(t, stop) = seen
        {
            *seen = Seen::Running(t.clone(), stop.clone());
        }
    }

    /// Marks `id` admitted, answering to `reply`; false if it was seen already.
    fn begin(&mut self, id: Uuid, reply: &ReplyTarget, stop: &CancellationToken) -> bool {
        if self.map.contains_key(&id) {
            return false;
        }
        self.remember(id, Seen::Admitted(reply.clone(), stop.clone()));
        true
    }

    /// A cancel for `id`: stops it if in hand; otherwise it is never started.
    fn cancel(&mut self, id: Uuid) -> bool {
        match self.map.get(&id) {
            Some(Seen::Admitted(_, stop) | Seen::Running(_, stop)) => {
                stop.cancel();
                true
            }
            Some(_) => false,
            None => {
                self.remember(id, Seen::Cancelled);
                false
            }
        }
    }

    fn remember(&mut self, id: Uuid, seen: Seen) {
        self.map.insert(id, seen);
        self.order.push_back(id);
        while self.order.len() > self.cap {
            if let Some(old) = self.order.pop_front() {
                self.map.remove(&old);
            }
        }
    }

    /// Lets go of a command that was admitted but not started, so that a
    /// re-delivery of it may run.
    fn forget(&mut self, id: Uuid) {
        if matches!(self.map.get(&id), Some(Seen::Admitted(..))) {
            self.map.remove(&id);
        }
    }

    /// A command in hand that will never start (cancelled, or too late):
    /// a copy of it is refused, never run.
    fn finish_unstarted(&mut self, id: Uuid) {
        if let Some(seen) = self.map.get_mut(&id) {
            *seen = Seen::Cancelled;
        }
    }

    fn finish(&mut self, id: Uuid, outcome: Bytes) {
        if let Some(seen) = self.map.get_mut(&id) {
            *seen = Seen::Done(outcome);
        }
    }
}

/// Where a command came from: the step's queue group (run it), or an
/// inquiry from a coordinator that took a run over (answer only if held).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Via {
    Queue,
    Inquiry,
}

async fn serve(
    mut sub: async_nats::Subscriber,
    reg: Arc<Registration>,
    shared: Arc<Shared>,
    via: Via,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            // A stop is seen before another burst is taken.
            biased;
            _ = stop.changed() => {
                // Stop taking commands; those in hand finish in their tasks.
                let _ = sub.unsubscribe().await;
                break;
            }
            msg = sub.next() => match msg {
                Some(msg) => {
                    // The commands already read with it are taken too, so that
                    // one message acknowledges them all (`step.acks`).
                    let mut burst = vec![msg];
                    let mut ended = false;
                    while burst.len() < MAX_BURST {
                        match futures::FutureExt::now_or_never(sub.next()) {
                            Some(Some(msg)) => burst.push(msg),
                            Some(None) => {
                                ended = true;
                                break;
                            }
                            None => break,
                        }
                    }
                    let mut admitted = Vec::with_capacity(burst.len());
                    for msg in burst {
                        admitted.extend(admit(msg, &reg, &shared, via).await);
                    }
                    let mut ready = acknowledge(admitted, &shared).await;
                    if !ready.is_empty() && !flush_acks(&shared).await {
                        ready = unflushed(ready, &shared);
                    }
                    for a in ready {
                        launch(a, &shared);
                    }
                    if ended {
                        break;
                    }
                }
                None => break,
            },
        }
    }
}

/// How long a burst's handlers wait for its acks to be written out.
const ACK_FLUSH_WAIT: Duration = Duration::from_millis(200);

/// Waits until the acks handed to the client are written to its socket, so
/// that they leave before any handler starts: a worker process that dies in
/// a handler (before the client would have written them otherwise) has
/// still told its coordinator that it took the command, which is then an
/// unknown outcome rather than sent to another replica and run twice.
/// Bounded: with NATS unreachable the acks wait in the client for the
/// reconnection (false).
async fn flush_acks(shared: &Shared) -> bool {
    match tokio::time::timeout(ACK_FLUSH_WAIT, shared.client.flush()).await {
        Ok(Ok(())) => true,
        Ok(Err(e)) => {
            warn!(error = %e, "acks not written out before their handlers start");
            false
        }
        Err(_) => {
            warn!(wait = ?ACK_FLUSH_WAIT, "acks not written out before their handlers start");
            false
        }
    }
}

/// Commands whose acks could not be written out: those whose start-by time
/// passed meanwhile are not started (the coordinator, which may never have
/// had their ack, sends them again elsewhere; if the ack reaches it after
/// all, it sees an attempt that went silent, an unknown outcome, not a step
/// run twice). The others start, their acks queued for the reconnection.
fn unflushed(ready: Vec<Admitted>, shared: &Shared) -> Vec<Admitted> {
    let now = now_ms();
    ready
        .into_iter()
        .filter(|a| match a.cmd.start_by_ms {
            Some(by) if now > by => {
                warn!(command = %a.cmd.command_id, "command not started: its start-by time passed before its ack could be written");
                shared.dedup().finish_unstarted(a.cmd.command_id);
                false
            }
            _ => true,
        })
        .collect()
}

fn now_ms() -> u64 {
    orchestrix_proto::time::unix_ms(std::time::SystemTime::now())
}

/// Why a command may no longer start, if so.
fn expired(cmd: &StepCommand, now: u64) -> Option<String> {
    if let Some(by) = cmd.start_by_ms.filter(|by| now > *by) {
        return Some(format!(
            "command arrived {} ms after its start-by time: not started (the coordinator sends it again)",
            now - by
        ));
    }
    if let Some(d) = cmd.deadline_ms.filter(|d| now >= *d) {
        return Some(format!("command arrived {} ms past its deadline: not started", now - d));
    }
    None
}

/// Commands taken from a subscription at once, at most: what one `step.acks`
/// may carry, and how long other work waits behind a burst.
const MAX_BURST: usize = 64;

/// A command that passed every check and is this worker's to run: it is
/// acknowledged, then launched.
struct Admitted {
    msg: async_nats::Message,
    reply: async_nats::Subject,
    cmd: StepCommand,
    handler: BoxedHandler,
    stop: CancellationToken,
    answer_to: ReplyTarget,
    /// The coordinator reads `step.acks`.
    batch: bool,
}

impl Admitted {
    /// Where this command's ack or refusal goes: its reply subject, and the
    /// one a later copy moved its answers to, if another.
    fn answers(&self) -> Vec<async_nats::Subject> {
        let now = target(&self.answer_to);
        if now == self.reply { vec![now] } else { vec![self.reply.clone(), now] }
    }
}

/// Acknowledges admitted commands before any of them starts: one `step.acks`
/// per reply subject (one per coordinator) where the coordinator reads them
/// and there are several, else a `step.ack` each. Returns those whose ack
/// was handed to the client. The others are not started and are forgotten,
/// so that a re-delivery may run them: a command whose start-by time or
/// deadline passed while its burst was admitted (answered `expired`), and
/// one whose ack could not be sent.
async fn acknowledge(admitted: Vec<Admitted>, shared: &Shared) -> Vec<Admitted> {
    let now = now_ms();
    let mut ready = Vec::with_capacity(admitted.len());
    for a in admitted {
        if a.stop.is_cancelled() {
            // Cancelled while its burst was admitted: never started.
            debug!(command = %a.cmd.command_id, "cancelled command not started");
            shared.dedup().finish_unstarted(a.cmd.command_id);
            refuse(&a, CANCELLED_NOT_STARTED.to_owned(), shared).await;
            continue;
        }
        match expired(&a.cmd, now) {
            Some(why) => {
                debug!(command = %a.cmd.command_id, %why, "stale command not started");
                shared.forget(a.cmd.command_id);
                refuse(&a, why, shared).await;
            }
            None => ready.push(a),
        }
    }
    // (reply subject, batched, positions in `ready`)
    let mut groups: Vec<(&async_nats::Subject, bool, Vec<usize>)> = Vec::new();
    for (i, a) in ready.iter().enumerate() {
        match groups.iter_mut().find(|(to, batch, _)| a.batch && *batch && **to == a.reply) {
            Some((_, _, members)) => members.push(i),
            None => groups.push((&a.reply, a.batch, vec![i])),
        }
    }
    // About 100 bytes a command: a `step.acks` stays far under the limit.
    let limit = shared.client.max_payload().min(shared.max_message_bytes);
    let per_message = (limit / 256).max(1);
    let mut sent = vec![false; ready.len()];
    for (to, _, members) in groups {
        for chunk in members.chunks(per_message) {
            let ok = match chunk {
                [one] => shared.try_send(to, &ack(&ready[*one].cmd, &shared.id)).await,
                _ => {
                    let commands = chunk.iter().map(|i| acked(&ready[*i].cmd)).collect();
                    shared.try_send(to, &Acks { worker: shared.id.clone(), commands }).await
                }
            };
            for i in chunk {
                sent[*i] = ok;
            }
        }
    }
    let mut started = Vec::with_capacity(ready.len());
    for (a, ok) in ready.into_iter().zip(sent) {
        if ok {
            shared.dedup().started(a.cmd.command_id);
            // A copy that arrived meanwhile moved its answers elsewhere: it
            // is owed the ack too.
            for to in a.answers().iter().skip(1) {
                shared.send(to, &ack(&a.cmd, &shared.id)).await;
            }
            started.push(a);
        } else {
            warn!(command = %a.cmd.command_id, "command not started: its ack could not be sent");
            shared.forget(a.cmd.command_id);
        }
    }
    started
}

/// Why a command of a cancelled run is not started.
const CANCELLED_NOT_STARTED: &str = "the run was cancelled: not started";

/// Tells whoever the admitted command answers to that it will not start
/// (`expired`: the coordinator sends it again, or has given up on it).
async fn refuse(a: &Admitted, why: String, shared: &Shared) {
    let refusal = WireError::about(&a.cmd, WireError::CODE_EXPIRED, why);
    for to in a.answers() {
        shared.send(&to, &refusal).await;
    }
}

/// A command's entry in a `step.acks`.
fn acked(cmd: &StepCommand) -> Acked {
    Acked { command_id: cmd.command_id, run_id: cmd.run_id, attempt: cmd.attempt }
}

/// A command's `step.ack` from this worker.
fn ack(cmd: &StepCommand, worker: &str) -> Ack {
    Ack {
        command_id: cmd.command_id,
        run_id: cmd.run_id,
        attempt: cmd.attempt,
        worker: worker.to_owned(),
    }
}

/// Decodes and checks a command; answers it here if this worker will not
/// run it, else hands it back to be acknowledged and launched.
async fn admit(
    msg: async_nats::Message,
    reg: &Arc<Registration>,
    shared: &Arc<Shared>,
    via: Via,
) -> Option<Admitted> {
    if via == Via::Inquiry
        && orchestrix_proto::peek_kind(&msg.payload).is_ok_and(|(_, k)| k == StepCancel::KIND)
    {
        cancel(&msg, shared);
        return None;
    }
    let Some(reply) = msg.reply.clone() else {
        warn!(subject = %msg.subject, "step command without a reply subject dropped");
        return None;
    };
    let cmd = match decode_with_limit::<StepCommand>(&msg.payload, shared.max_message_bytes) {
        Ok(cmd) => cmd,
        Err(e) if via == Via::Inquiry => {
            // Every replica hears an inquiry: answering it would be noise.
            warn!(subject = %msg.subject, error = %e, "bad inquiry ignored");
            return None;
        }
        Err(e) => {
            warn!(subject = %msg.subject, error = %e, "bad step command rejected");
            let mut err = WireError::malformed(format!("bad step command on {}: {e}", msg.subject));
            if let Some(ids) = orchestrix_proto::decode_ids(
                &msg.payload,
                StepCommand::KIND,
                shared.max_message_bytes,
            ) {
                err.command_id = Some(ids.command_id);
                err.run_id = Some(ids.run_id);
            }
            shared.send(&reply, &err).await;
            return None;
        }
    };
    if *cmd.flow != *reg.flow || *cmd.step != *reg.step {
        let why = format!(
            "command for step `{}` of flow `{}` arrived on the subject of `{}` of `{}`",
            cmd.step, cmd.flow, reg.step, reg.flow
        );
        warn!(%why, "misrouted step command");
        // Nothing ran: an error, not an outcome of an attempt.
        shared.send(&reply, &WireError::about(&cmd, WireError::CODE_NO_HANDLER, why)).await;
        return None;
    }
    let answer_to: ReplyTarget = Arc::new(Mutex::new(reply.clone()));
    // Seen before (on any subject): answer from what this worker holds, never run again.
    let seen = shared.dedup().redelivered(cmd.command_id, &answer_to);
    match seen {
        Some(seen) => {
            answer_copy(seen, &cmd, &reply, shared).await;
            return None;
        }
        None if via == Via::Inquiry => return None, // not ours: another replica may hold it
        None => {}
    }
    if let Some(why) = expired(&cmd, now_ms()) {
        debug!(command = %cmd.command_id, %why, "stale command not started");
        shared.send(&reply, &WireError::about(&cmd, WireError::CODE_EXPIRED, why)).await;
        return None;
    }
    let Some(handler) = reg.get(cmd.kind).cloned() else {
        // An `error` with code `no_handler` (nothing ran): the coordinator
        // fails the attempt for good, as the protocol says.
        let why = format!(
            "worker {} has no {} handler for step `{}` of flow `{}`",
            shared.id,
            cmd.kind.as_str(),
            cmd.step,
            cmd.flow
        );
        warn!(command = %cmd.command_id, %why, "command without a handler refused");
        shared.send(&reply, &WireError::about(&cmd, WireError::CODE_NO_HANDLER, why)).await;
        return None;
    };
    let stop = CancellationToken::new();
    let began = shared.dedup().begin(cmd.command_id, &answer_to, &stop);
    if !began {
        // Raced with another copy of the command: that one runs it.
        let seen = shared.dedup().redelivered(cmd.command_id, &answer_to);
        if let Some(seen) = seen {
            answer_copy(seen, &cmd, &reply, shared).await;
        }
        return None;
    }
    // Said in the command; coordinators older than its `acks` field said
    // it in a header.
    let batch = cmd.acks
        || crate::nats::header(msg.headers.as_ref(), orchestrix_proto::headers::ACKS)
            == Some(orchestrix_proto::headers::ACKS_BATCH);
    Some(Admitted { msg, reply, cmd, handler, stop, answer_to, batch })
}

/// Answers another copy of a command this worker holds or held, never
/// running it again: the outcome it remembers, a refusal if it was
/// cancelled, an ack if it runs. A copy of one still being admitted gets
/// nothing here: its burst's ack (or refusal) goes to where the command
/// answers by then, this copy's reply subject.
async fn answer_copy(seen: Seen, cmd: &StepCommand, reply: &async_nats::Subject, shared: &Shared) {
    match seen {
        Seen::Done(outcome) => {
            debug!(command = %cmd.command_id, "redelivered command answered from the cache");
            shared.send_raw(reply, outcome).await;
        }
        Seen::Cancelled => {
            let why = CANCELLED_NOT_STARTED.to_owned();
            shared.send(reply, &WireError::about(cmd, WireError::CODE_EXPIRED, why)).await;
        }
        // Still at work: ack to whoever asks now; heartbeats and the
        // outcome follow it there.
        Seen::Running(..) => {
            shared.send(reply, &ack(cmd, &shared.id)).await;
        }
        Seen::Admitted(..) => {
            debug!(command = %cmd.command_id, "a copy of a command being admitted: answered with its burst");
        }
    }
}

/// Starts an admitted command's handler in a task of its own. Its ack went
/// out before this: an attempt that was never acked was never started, so
/// the coordinator may send it elsewhere.
fn launch(a: Admitted, shared: &Arc<Shared>) {
    let Admitted { msg, cmd, handler, stop, answer_to, .. } = a;
    let (span, parent) = handler_span(&msg, &cmd, &shared.id);
    let shared = shared.clone();
    let tracker = shared.tracker.clone();
    let run = Box::pin(async move {
        let (command_id, run_id, attempt, kind) =
            (cmd.command_id, cmd.run_id, cmd.attempt, cmd.kind);
        let deadline = cmd.deadline_ms;
        let slots = shared.slots.clone();
        let cancelled = stop.clone();
        let work = async move {
            let _slot = slots.acquire_owned().await;
            if deadline.is_some_and(|d| now_ms() >= d) {
                // Waited for a free slot past the deadline: not started at all.
                let why = "the attempt's deadline passed while it waited for a free handler slot";
                return OutcomeResult::Failed(StepFailure::new(why, true));
            }
            if stop.is_cancelled() {
                // Cancelled after its ack, before it started: dropped.
                let why = "cancelled: the run was cancelled before the handler started";
                return OutcomeResult::Failed(StepFailure::new(why, false));
            }
            run_command_with(&handler, cmd, stop.clone()).await
        };
        tokio::pin!(work);
        // The first beat one interval from now: awaiting an immediate first
        // tick would cost a timer-wheel turn (up to 1 ms) on every command.
        let mut tick = tokio::time::interval_at(
            tokio::time::Instant::now() + shared.heartbeat,
            shared.heartbeat,
        );
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let result = loop {
            tokio::select! {
                // The handler first: one that is done on its first poll
                // never arms the heartbeat timer or the cancellation
                // waiter.
                biased;
                result = &mut work => break result,
                // Cancelled: the handler's future is dropped here (its
                // context's cancellation has fired). It may have acted.
                () = cancelled.cancelled() => {
                    let why = "cancelled: the run was cancelled while the handler ran";
                    break OutcomeResult::Failed(StepFailure { message: why.into(), retryable: false, maybe_done: true });
                }
                _ = tick.tick() => {
                    let hb = Heartbeat { command_id, run_id, attempt, worker: shared.id.clone() };
                    shared.send(&target(&answer_to), &hb).await;
                }
            }
        };
        if let OutcomeResult::Failed(f) = &result {
            let span = tracing::Span::current();
            span.record("otel.status_code", "ERROR");
            span.record("otel.status_description", f.message.as_str());
        }
        let limit = shared.client.max_payload().min(shared.max_message_bytes);
        let outcome = StepOutcome { command_id, run_id, attempt, kind, result };
        let bytes = match encode(&outcome) {
            Ok(bytes) if bytes.len() <= limit => bytes,
            encoded => {
                // The handler ran but its answer cannot travel: a permanent
                // failure, maybe done, named as such (never a silent drop).
                let why = match encoded {
                    Ok(b) => format!(
                        "the step's output makes an outcome of {} bytes, over the {limit}-byte message limit (keep large data in a store and return a reference)",
                        b.len()
                    ),
                    Err(e) => format!("the step's outcome does not encode: {e}"),
                };
                warn!(command = %command_id, %why, "outcome replaced by a failure");
                let span = tracing::Span::current();
                span.record("otel.status_code", "ERROR");
                span.record("otel.status_description", why.as_str());
                let failure = StepFailure { message: why, retryable: false, maybe_done: true };
                let outcome = StepOutcome { result: OutcomeResult::Failed(failure), ..outcome };
                match encode(&outcome) {
                    Ok(b) => b,
                    Err(e) => {
                        warn!(error = %e, "cannot encode an outcome");
                        return;
                    }
                }
            }
        };
        let bytes = Bytes::from(bytes);
        shared.dedup().finish(command_id, bytes.clone());
        shared.post(target(&answer_to), bytes);
    });
    // Boxed: the task then moves a pointer, not the whole future (a few
    // hundred bytes, copied on spawn and again as the task's stage changes).
    let run = InSpan { span, run: Some(run) };
    tracker.spawn(opentelemetry::context::FutureExt::with_context(run, parent));
}

/// A command's future, polled in its handler's span. Unlike
/// `tracing::Instrumented`, it does not enter the span again to drop the
/// future: a finished future is dropped in the poll that finished it, which
/// is in the span already (an enter and an exit cost every layer a lookup).
/// One dropped unfinished (a runtime shutting down) is dropped in the span,
/// so that what it logs then keeps its fields.
struct InSpan<F> {
    span: tracing::Span,
    run: Option<Pin<Box<F>>>,
}

impl<F: Future> Future for InSpan<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<F::Output> {
        let this = self.get_mut();
        let _entered = this.span.enter();
        // Never polled again once finished (a task is not).
        let Some(run) = this.run.as_mut() else { return std::task::Poll::Pending };
        let done = run.as_mut().poll(cx);
        if done.is_ready() {
            this.run = None;
        }
        done
    }
}

impl<F> Drop for InSpan<F> {
    fn drop(&mut self) {
        if let Some(run) = self.run.take() {
            let _entered = self.span.enter();
            drop(run);
        }
    }
}

/// A cancel from the coordinator: stop the command if this worker holds it.
fn cancel(msg: &async_nats::Message, shared: &Arc<Shared>) {
    match decode_with_limit::<StepCancel>(&msg.payload, shared.max_message_bytes) {
        Ok(c) => {
            let stopped = shared.dedup().cancel(c.command_id);
            if stopped {
                info!(command = %c.command_id, run_id = %c.run_id, "command cancelled: handler stopped");
            }
        }
        Err(e) => warn!(subject = %msg.subject, error = %e, "bad step cancel ignored"),
    }
}

/// The span of one command in this worker, `{step} {kind}`: a messaging
/// CONSUMER span, child of the coordinator's attempt span (the PRODUCER,
/// `{step} {kind} attempt {n}`) when the command carries its `traceparent`.
/// Numbers are recorded as integers (a `u32` would be exported as a string).
///
/// A command whose run the sampler left out gets no span at all: its
/// handler runs in the command's OpenTelemetry context instead (the second
/// value), so that spans the handler makes inherit "not sampled" from it.
fn handler_span(
    msg: &async_nats::Message,
    cmd: &StepCommand,
    worker: &str,
) -> (tracing::Span, opentelemetry::Context) {
    use tracing::field::Empty;
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    // A coordinator that traces a run sends its context in the command (a
    // run its sampler left out only says `sampled: false`; coordinators
    // older than the field sent a header); one that does not sends none,
    // and the run's spans share a trace named after the run (its id is the
    // trace id), under a parent named after the command.
    // A value that does not parse is ignored, as W3C trace context asks.
    let parse = orchestrix_proto::TraceParent::parse;
    let parent = cmd
        .traceparent
        .as_deref()
        .and_then(parse)
        .or_else(|| {
            crate::nats::header(msg.headers.as_ref(), orchestrix_proto::headers::TRACEPARENT)
                .and_then(parse)
        })
        .or_else(|| {
            let [.., a, b, c, d, e, f, g, h] = *cmd.command_id.as_bytes();
            let span = u64::from_be_bytes([a, b, c, d, e, f, g, h]);
            let tp = orchestrix_proto::TraceParent::for_run(cmd.run_id, span);
            Some(orchestrix_proto::TraceParent { sampled: cmd.sampled != Some(false), ..tp })
        });
    let remote = |tp| crate::telemetry::remote_context(&tp);
    if let Some(tp) = parent.filter(|tp| !tp.sampled) {
        return (tracing::Span::none(), remote(tp));
    }
    if !tracing::level_enabled!(tracing::Level::INFO) {
        // No subscriber takes info spans (the fallback logger takes warnings
        // only): the span is disabled, and what follows would format its
        // fields (a name, two ids) for nothing.
        return (tracing::Span::none(), opentelemetry::Context::new());
    }
    let span = {
        // Strings where they can be: a `Display` value costs a trip
        // through the layers' formatting.
        let kind = cmd.kind.as_str();
        let mut name = String::with_capacity(cmd.step.len() + 1 + kind.len());
        for piece in [&*cmd.step, " ", kind] {
            name.push_str(piece);
        }
        let (mut run_buf, mut command_buf) =
            (uuid::Uuid::encode_buffer(), uuid::Uuid::encode_buffer());
        let run_id: &str = cmd.run_id.hyphenated().encode_lower(&mut run_buf);
        let command_id: &str = cmd.command_id.hyphenated().encode_lower(&mut command_buf);
        tracing::info_span!(
            "orchestrix.handle",
            otel.name = name.as_str(),
            otel.kind = "consumer",
            messaging.system = "nats",
            messaging.operation.type = "process",
            messaging.operation.name = "process",
            messaging.destination.name = msg.subject.as_str(),
            messaging.message.id = command_id,
            orchestrix.run_id = run_id,
            orchestrix.flow = &*cmd.flow,
            orchestrix.step = &*cmd.step,
            orchestrix.attempt = i64::from(cmd.attempt),
            orchestrix.kind = cmd.kind.as_str(),
            orchestrix.command_id = command_id,
            orchestrix.worker = worker,
            otel.status_code = Empty,
            otel.status_description = Empty,
        )
    };
    if !span.is_disabled() {
        // No `traceparent`: a root, whatever the receiving task has current.
        let _ = span.set_parent(parent.map(remote).unwrap_or_default());
    }
    (span, opentelemetry::Context::new())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dedup_remembers_a_bounded_window() {
        let mut d = Dedup::new(2);
        let (a, b, c) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        let first: ReplyTarget = Arc::new(Mutex::new("old.coordinator".into()));
        let second: ReplyTarget = Arc::new(Mutex::new("new.coordinator".into()));
        let stop = CancellationToken::new();
        assert!(d.redelivered(a, &first).is_none());
        assert!(d.begin(a, &first, &stop));
        assert!(!d.begin(a, &first, &stop));
        // A copy while it is admitted moves the answers, and waits for its ack.
        let third: ReplyTarget = Arc::new(Mutex::new("third.coordinator".into()));
        assert!(matches!(d.redelivered(a, &third), Some(Seen::Admitted(..))));
        assert_eq!(target(&first).as_str(), "third.coordinator");
        d.started(a);
        // A redelivery while running moves the answers to the new asker.
        assert!(matches!(d.redelivered(a, &second), Some(Seen::Running(..))));
        assert_eq!(target(&first).as_str(), "new.coordinator");
        d.finish(a, Bytes::from_static(b"x"));
        assert!(matches!(d.redelivered(a, &second), Some(Seen::Done(_))));
        d.begin(b, &first, &stop);
        d.begin(c, &first, &stop); // a falls out
        assert!(d.redelivered(a, &first).is_none());
    }

    #[test]
    fn an_admitted_command_that_is_not_started_is_forgotten_and_may_run_again() {
        let mut d = Dedup::new(10);
        let reply: ReplyTarget = Arc::new(Mutex::new("c".into()));
        let (refused, running) = (Uuid::new_v4(), Uuid::new_v4());
        let stop = CancellationToken::new();
        assert!(d.begin(refused, &reply, &stop));
        d.forget(refused);
        assert!(d.redelivered(refused, &reply).is_none(), "forgotten");
        assert!(d.begin(refused, &reply, &stop), "a re-delivery may run it");
        assert!(d.begin(running, &reply, &stop));
        d.started(running);
        d.forget(running);
        assert!(matches!(d.redelivered(running, &reply), Some(Seen::Running(..))), "started: kept");
    }

    #[test]
    fn a_cancel_stops_the_command_in_hand_or_keeps_it_from_starting() {
        let mut d = Dedup::new(10);
        let reply: ReplyTarget = Arc::new(Mutex::new("c".into()));
        let (held, unseen) = (Uuid::new_v4(), Uuid::new_v4());
        let stop = CancellationToken::new();
        d.begin(held, &reply, &stop);
        assert!(d.cancel(held));
        assert!(stop.is_cancelled());
        assert!(!d.cancel(unseen), "not held here");
        assert!(matches!(d.redelivered(unseen, &reply), Some(Seen::Cancelled)));
        assert!(!d.begin(unseen, &reply, &CancellationToken::new()), "never started");
    }

    #[test]
    fn registration_errors_are_reported_at_start() {
        let b = Worker::builder().steps::<()>("f", |f| {
            f.step("s", |_| async { Ok(()) }).step("s", |_| async { Ok(()) })
        });
        assert!(matches!(b.error, Some(WorkerError::Duplicate { kind: "execute", .. })));
        let b = Worker::builder().steps::<()>("bad name", |f| f);
        assert!(matches!(b.error, Some(WorkerError::Name(_))));
    }
}
