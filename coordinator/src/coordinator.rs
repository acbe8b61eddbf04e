use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::future::BoxFuture;
use orchestrix_proto::{CodecError, Payload, RunReport};
use serde::Serialize;
use tokio::sync::oneshot;
use tokio::time::Instant;
use uuid::Uuid;

use crate::Hooks;
use crate::actor::RunActor;
use crate::bus::{Bus, MemoryBus};
use crate::engine::{Engine, EngineError};
use crate::flow::{Flow, FlowDef, FlowError};
use crate::machine::{Entropy, FlowPlan, Machine};
use crate::record::RunRecord;
use crate::store::{Created, MemoryStore, Store, StoreError};

/// Options of one run.
///
/// ```
/// use std::time::Duration;
/// use orchestrix_coordinator::RunOptions;
///
/// let opts = RunOptions::new().key("payment:order_1").ttl(Duration::from_secs(3600));
/// let same = RunOptions { key: Some("payment:order_1".into()), ttl: Some(Duration::from_secs(3600)), ..Default::default() };
/// assert_eq!(opts, same);
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunOptions {
    /// Idempotency key: while a run with this key is live, or for `ttl` after it
    /// ended, another run with the key returns that run's report instead of
    /// executing anything.
    pub key: Option<String>,
    /// How long the key is remembered after its run ended (default: 24 hours).
    pub ttl: Option<Duration>,
    /// Deadline of the whole run: when it passes, the step in flight fails for
    /// good and the rollback starts (compensations are not cut short).
    pub timeout: Option<Duration>,
    /// W3C `traceparent` of the caller's span: the run's span becomes its
    /// child. When `None`, the span current where `start` is called is used
    /// (if a tracer is installed).
    pub traceparent: Option<String>,
}

impl RunOptions {
    /// No key, no deadline.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the idempotency key.
    #[must_use]
    pub fn key(mut self, key: impl Into<String>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Sets how long the key outlives its run.
    #[must_use]
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }

    /// Sets the run's deadline.
    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }
}

/// A run could not be started or followed. A run that *fails* is not an error:
/// its report says so.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RunError {
    /// No flow of that name is registered.
    #[error("unknown flow `{0}`")]
    UnknownFlow(String),
    /// The flow's definition is invalid.
    #[error("invalid flow: {0}")]
    InvalidFlow(#[from] FlowError),
    /// The input could not be encoded.
    #[error("run input does not encode: {0}")]
    Input(#[from] CodecError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The engine could not be started.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// The run's input is larger than a run can carry.
    #[error(
        "the run's input is {size} bytes, over the limit of {limit} bytes (keep large data in a store and pass a reference)"
    )]
    InputTooLarge {
        /// The input's size.
        size: usize,
        /// The limit ([`crate::DEFAULT_MAX_RUN_PAYLOAD`]).
        limit: usize,
    },
    /// The input is not one well-formed MessagePack value.
    #[error("the run's input is not valid MessagePack: {0}")]
    BadInput(CodecError),
    /// The run's actor stopped without a report (the engine was shut down).
    #[error("run {0} was lost: the engine stopped before it finished")]
    Lost(Uuid),
}

/// Runs flows: owns their definitions, a bus, a store and the engine.
///
/// [`Flow::run`] uses an embedded coordinator; build one yourself to run
/// several flows against one store, or over another bus.
///
/// ```
/// use orchestrix_coordinator::{create, Coordinator, RunOptions, RunStatus};
///
/// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let greet = create::<String>("greet").step("hello", |ctx| async move { Ok(format!("hello {}", ctx.input)) });
/// let coordinator = Coordinator::builder().flow(&greet).build()?;
/// let report = coordinator.run("greet", &"ada".to_string(), RunOptions::new()).await?;
/// assert_eq!(report.status, RunStatus::Completed);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Coordinator {
    inner: Arc<Inner>,
}

struct Inner {
    /// Outcomes for runs not live here, from the bus; drained by the takeover loop.
    unrouted: std::sync::Mutex<Option<tokio::sync::mpsc::Receiver<orchestrix_proto::StepOutcome>>>,
    flows: HashMap<Arc<str>, Arc<FlowPlan>>,
    bus: Arc<dyn Bus>,
    store: Arc<dyn Store>,
    engine: Option<Engine>,
}

impl fmt::Debug for Coordinator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Coordinator")
            .field("flows", &self.inner.flows.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// Builds a [`Coordinator`].
#[must_use]
#[derive(Default)]
pub struct CoordinatorBuilder {
    flows: Vec<FlowPlan>,
    memory: MemoryBus,
    bus: Option<Arc<dyn Bus>>,
    store: Option<Arc<dyn Store>>,
    engine: Option<Engine>,
    hooks: Vec<Arc<dyn Hooks>>,
    error: Option<FlowError>,
}

impl fmt::Debug for CoordinatorBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CoordinatorBuilder")
            .field("flows", &self.flows.len())
            .finish_non_exhaustive()
    }
}

impl CoordinatorBuilder {
    /// Registers a flow with its in-process handlers and hooks.
    pub fn flow<I>(mut self, flow: &Flow<I>) -> Self
    where
        I: Serialize + serde::de::DeserializeOwned + Send + 'static,
    {
        if let Some(e) = &flow.error {
            self.error.get_or_insert(e.clone());
        }
        self.memory.register(&flow.def.name, flow.handlers.clone());
        self.flows.push(FlowPlan { def: flow.def.clone(), hooks: flow.hooks.clone() });
        self
    }

    /// Registers a flow whose handlers live elsewhere (workers behind the bus).
    pub fn flow_def(mut self, def: FlowDef) -> Self {
        if let Err(e) = def.validate() {
            self.error.get_or_insert(e);
        }
        self.flows.push(FlowPlan { def, hooks: Vec::new() });
        self
    }

    /// Hooks called for the runs of every flow of this coordinator.
    pub fn hooks(mut self, hooks: impl Hooks) -> Self {
        self.hooks.push(Arc::new(hooks));
        self
    }

    /// The bus commands travel on (default: in-process handlers).
    pub fn bus(mut self, bus: impl Bus) -> Self {
        self.bus = Some(Arc::new(bus));
        self
    }

    /// The store runs are kept in (default: [`MemoryStore`]).
    pub fn store(mut self, store: impl Store) -> Self {
        self.store = Some(Arc::new(store));
        self
    }

    /// The engine run actors live on (default: [`Engine::shared`], or the
    /// calling actix arbiter).
    pub fn engine(mut self, engine: Engine) -> Self {
        self.engine = Some(engine);
        self
    }

    /// Builds the coordinator.
    pub fn build(self) -> Result<Coordinator, FlowError> {
        if let Some(e) = self.error {
            return Err(e);
        }
        let mut flows = HashMap::new();
        for mut plan in self.flows {
            plan.hooks.extend(self.hooks.iter().cloned());
            if self.bus.is_none() {
                let have = self.memory.handlers(&plan.def.name).map_or(0, <[_]>::len);
                if have != plan.def.steps.len() {
                    return Err(FlowError::Handlers {
                        flow: plan.def.name.to_string(),
                        reason: "the in-process bus has no handlers for its steps".into(),
                    });
                }
            }
            flows.insert(plan.def.name.clone(), Arc::new(plan));
        }
        let bus = self.bus.unwrap_or_else(|| Arc::new(self.memory));
        let store = self.store.unwrap_or_else(|| Arc::new(MemoryStore::default()));
        let unrouted = std::sync::Mutex::new(bus.take_unrouted());
        Ok(Coordinator {
            inner: Arc::new(Inner { unrouted, flows, bus, store, engine: self.engine }),
        })
    }

    /// Builds an in-process coordinator for flows already validated.
    pub(crate) fn build_embedded(self) -> Coordinator {
        let flows = self.flows.into_iter().map(|p| (p.def.name.clone(), Arc::new(p))).collect();
        let inner = Inner {
            unrouted: std::sync::Mutex::new(None),
            flows,
            bus: Arc::new(self.memory),
            store: Arc::new(MemoryStore::default()),
            engine: self.engine,
        };
        Coordinator { inner: Arc::new(inner) }
    }
}

/// A started run: its id, and a way to wait for its report.
pub struct RunHandle {
    run_id: Uuid,
    duplicate: bool,
    report: BoxFuture<'static, Result<RunReport, RunError>>,
}

impl fmt::Debug for RunHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RunHandle")
            .field("run_id", &self.run_id)
            .field("duplicate", &self.duplicate)
            .finish()
    }
}

impl RunHandle {
    /// The run's id.
    pub fn run_id(&self) -> Uuid {
        self.run_id
    }

    /// True when the idempotency key matched an earlier run: nothing new
    /// executes, and the report is that run's.
    pub fn is_duplicate(&self) -> bool {
        self.duplicate
    }

    /// Waits for the run's final report.
    pub async fn report(self) -> Result<RunReport, RunError> {
        self.report.await
    }
}

impl Coordinator {
    /// Starts building a coordinator.
    pub fn builder() -> CoordinatorBuilder {
        CoordinatorBuilder::default()
    }

    /// Names of the registered flows.
    pub fn flows(&self) -> impl Iterator<Item = &str> {
        self.inner.flows.keys().map(|k| &**k)
    }

    /// The definition of a registered flow.
    pub fn flow(&self, name: &str) -> Option<&FlowDef> {
        self.inner.flows.get(name).map(|p| &p.def)
    }

    /// Runs `flow` with `input` and waits for its report.
    pub async fn run<I: Serialize + ?Sized>(
        &self,
        flow: &str,
        input: &I,
        options: RunOptions,
    ) -> Result<RunReport, RunError> {
        self.start(flow, input, options).await?.report().await
    }

    /// Starts a run and returns at once with its handle.
    pub async fn start<I: Serialize + ?Sized>(
        &self,
        flow: &str,
        input: &I,
        options: RunOptions,
    ) -> Result<RunHandle, RunError> {
        // Encoded here: well-formed by construction, so not checked again.
        self.start_encoded(flow, Payload::encode(input)?, options).await
    }

    /// Starts a run whose input is already encoded (from the wire, say): it
    /// must be one well-formed MessagePack value.
    pub async fn start_payload(
        &self,
        flow: &str,
        input: Payload,
        options: RunOptions,
    ) -> Result<RunHandle, RunError> {
        input.validate().map_err(RunError::BadInput)?;
        self.start_encoded(flow, input, options).await
    }

    async fn start_encoded(
        &self,
        flow: &str,
        input: Payload,
        options: RunOptions,
    ) -> Result<RunHandle, RunError> {
        let plan = self
            .inner
            .flows
            .get(flow)
            .ok_or_else(|| RunError::UnknownFlow(flow.to_owned()))?
            .clone();
        let limit = crate::DEFAULT_MAX_RUN_PAYLOAD;
        if input.len() > limit {
            return Err(RunError::InputTooLarge { size: input.len(), limit });
        }
        let run_id = Uuid::now_v7();
        let mut record = RunRecord::new(run_id, &plan.def, input, SystemTime::now());
        record.key = options.key;
        record.ttl = options.ttl;
        record.timeout = options.timeout;
        record.traceparent = options.traceparent.or_else(crate::telemetry::current_traceparent);
        let record = Arc::new(record);

        match self.inner.store.create(&record).resolve().await? {
            Created::Existing { run_id, report: Some(report) } => {
                let report = Box::pin(futures::future::ready(Ok(report)));
                Ok(RunHandle { run_id, duplicate: true, report })
            }
            Created::Existing { run_id, report: None } => {
                let wait = self.inner.store.wait(run_id);
                let report = Box::pin(async move { Ok(wait.await?) });
                Ok(RunHandle { run_id, duplicate: true, report })
            }
            created @ (Created::New | Created::Adopted(_)) => {
                let (record, run_id) = match created {
                    Created::Adopted(r) => {
                        let id = r.run_id;
                        (r, id)
                    }
                    _ => (record, run_id),
                };
                let (tx, rx) = oneshot::channel();
                let (bus, store) = (self.inner.bus.clone(), self.inner.store.clone());
                let engine = match &self.inner.engine {
                    Some(e) => e.clone(),
                    None => Engine::shared()?,
                };
                engine.spawn(move |_| {
                    let machine = Machine::new(plan, record, Instant::now(), Entropy::random());
                    RunActor::new(machine, bus, store, tx, false)
                });
                let report =
                    Box::pin(
                        async move { rx.await.map(|r| *r).map_err(|_| RunError::Lost(run_id)) },
                    );
                Ok(RunHandle { run_id, duplicate: false, report })
            }
        }
    }

    /// Resumes the live runs that no live coordinator owns (those of a
    /// coordinator that died, this one's previous life included): what a
    /// coordinator does when it starts on a durable store, and then every
    /// second or so ([`Coordinator::take_over_orphans`]). Returns how many.
    /// Several coordinators may call it at once: each run goes to one.
    pub async fn recover(&self) -> Result<usize, RunError> {
        let flows: Arc<[Arc<str>]> = self.inner.flows.keys().cloned().collect();
        let records = self.inner.store.claim_orphans(flows).await?;
        let engine = match &self.inner.engine {
            Some(e) => e.clone(),
            None => Engine::shared()?,
        };
        let mut resumed = 0;
        for record in records {
            let Some(plan) = self.inner.flows.get(&*record.flow).cloned() else {
                continue; // claimed only for flows served here
            };
            if let Some(why) = Machine::mismatch(&plan, &record) {
                // Never index past the flow's end: set it aside for an operator.
                tracing::error!(run_id = %record.run_id, reason = %why, "quarantining a run");
                if let Err(e) = self.inner.store.quarantine(&record, why).await {
                    tracing::warn!(run_id = %record.run_id, error = %e, "cannot quarantine the run");
                }
                continue;
            }
            let (bus, store) = (self.inner.bus.clone(), self.inner.store.clone());
            let (tx, _) = oneshot::channel();
            engine.spawn(move |_| {
                let machine = Machine::resumed(
                    plan,
                    record,
                    Instant::now(),
                    SystemTime::now(),
                    Entropy::random(),
                );
                RunActor::new(machine, bus, store, tx, true)
            });
            resumed += 1;
        }
        Ok(resumed)
    }

    /// Calls [`Coordinator::recover`] every `every`, so runs of a coordinator
    /// that dies are taken over by the live ones. Stops when the handle is dropped
    /// or aborted. Call from within a tokio runtime.
    pub fn take_over_orphans(&self, every: Duration) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        let mut late = self.inner.unrouted.lock().unwrap_or_else(|p| p.into_inner()).take();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let outcome = async {
                    match late.as_mut() {
                        Some(rx) => rx.recv().await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    _ = tick.tick() => match me.recover().await {
                        Ok(0) => {}
                        Ok(n) => tracing::info!(runs = n, "took over runs of a coordinator that died"),
                        Err(e) => tracing::warn!(error = %e, "cannot look for orphaned runs"),
                    },
                    Some(o) = outcome => me.note_late(o).await,
                }
            }
        })
    }

    /// Records an answer that came for a run no longer live here.
    async fn note_late(&self, o: orchestrix_proto::StepOutcome) {
        let note = crate::record::LateNote::new(
            o.command_id,
            o.attempt,
            o.kind,
            &o.result,
            SystemTime::now(),
        );
        match self.inner.store.note_late(o.run_id, note.line()).await {
            Ok(true) => {
                tracing::warn!(run_id = %o.run_id, command = %o.command_id, "late answer recorded in the run's history")
            }
            Ok(false) => {
                tracing::debug!(run_id = %o.run_id, "late answer for a run not kept or still live elsewhere")
            }
            Err(e) => tracing::warn!(run_id = %o.run_id, error = %e, "cannot record a late answer"),
        }
    }

    /// The report of a run so far (`status` is `running` while it is live),
    /// or `None` if the store does not keep it.
    pub async fn status(&self, run_id: Uuid) -> Result<Option<RunReport>, RunError> {
        Ok(self.inner.store.report(run_id).resolve().await?)
    }

    /// Recent runs, newest first (those the store keeps).
    pub async fn list(&self, filter: crate::ListFilter) -> Result<Vec<RunReport>, RunError> {
        Ok(self.inner.store.list(filter).await?)
    }

    /// Waits for the final report of a run started earlier.
    pub async fn wait(&self, run_id: Uuid) -> Result<RunReport, RunError> {
        Ok(self.inner.store.wait(run_id).await?)
    }
}
