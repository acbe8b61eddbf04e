use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::future::BoxFuture;
use orchestrix_proto::{CodecError, Payload, RunId, RunReport};
use serde::Serialize;
use tokio::sync::oneshot;
use tokio::time::Instant;
use uuid::Uuid;

use crate::actor::{Control, LiveRuns, RunActor, RunParts};
use crate::bus::{Bus, MemoryBus};
use crate::engine::{Engine, EngineError};
use crate::flow::{Flow, FlowDef, FlowError};
use crate::machine::{Entropy, FlowPlan, Machine};
use crate::record::RunRecord;
use crate::registry::{Pick, RegistryView};
use crate::store::{Created, MemoryStore, Store, StoreError};
use crate::{Hooks, RunOptions};

/// How long a start keeps asking for its run's place in its key's queue
/// (while the store fails over) before it answers without one.
const QUEUE_PATIENCE: Duration = Duration::from_secs(15);

/// A run could not be started or followed. A run that *fails* is not an error:
/// its report says so.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RunError {
    /// No flow of that name is registered.
    #[error("unknown flow `{0}`")]
    UnknownFlow(String),
    /// The flow has no such version.
    #[error("flow `{flow}` has no version `{version}`")]
    UnknownVersion {
        /// The flow.
        flow: String,
        /// The version asked for.
        version: String,
    },
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
    /// An operator's action cannot be applied (the run already finished, say).
    #[error("{0}")]
    Refused(String),
    /// The run is not live in this coordinator (another one runs it, or it
    /// is being taken over).
    #[error("run {0} is not live here")]
    NotLive(RunId),
    /// The run's actor stopped without a report (the engine was shut down).
    #[error("run {0} was lost: the engine stopped before it finished")]
    Lost(RunId),
    /// A run option cannot be used (an empty or oversized key, say).
    #[error("invalid run option: {0}")]
    BadOption(String),
    /// The input does not have the shape the flow's input schema asks for
    /// (see [`crate::Flow::input_schema`]); no run was created.
    #[error("the input does not match flow `{flow}`'s input type: {problems}")]
    InputMismatch {
        /// The flow.
        flow: String,
        /// What does not match, and where (JSON pointers).
        problems: String,
    },
}

/// Longest idempotency or concurrency key, in bytes: keys become store keys
/// and subjects, which NATS bounds.
pub const MAX_KEY_LEN: usize = 256;

fn check_key(what: &str, key: Option<&str>) -> Result<(), RunError> {
    match key {
        Some("") => Err(RunError::BadOption(format!("the {what} is empty"))),
        Some(k) if k.len() > MAX_KEY_LEN => Err(RunError::BadOption(format!(
            "the {what} is {} bytes, over the limit of {MAX_KEY_LEN}",
            k.len()
        ))),
        _ => Ok(()),
    }
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
    /// Flows registered by workers, when following the cluster's registry.
    registry: Option<Arc<RegistryView>>,
    /// Runs whose actor is live in this process.
    live: LiveRuns,
    /// What every run's actor shares: the bus, and the store and index above.
    parts: Arc<RunParts>,
    store: Arc<dyn Store>,
    engine: Option<Engine>,
}

impl fmt::Debug for Coordinator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Coordinator")
            .field("flows", &self.inner.flows.keys().collect::<Vec<_>>())
            .field("registry", &self.inner.registry)
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
    registry: bool,
    error: Option<FlowError>,
    /// Flows given with in-process handlers (an error over a remote bus).
    with_handlers: Vec<Arc<str>>,
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
        // A flow with no steps yet has had nothing checked.
        if let Some(e) = flow.error.clone().or_else(|| flow.def.validate().err()) {
            self.error.get_or_insert(e);
        }
        self.memory.register(&flow.def.name, flow.handlers.clone());
        self.with_handlers.push(flow.def.name.clone());
        self.flows.push(FlowPlan::new(flow.def.clone(), flow.hooks.clone()));
        self
    }

    /// Serves the flows that workers register in the cluster's flow registry
    /// as well (call [`Coordinator::follow_registry`] once built). Runs take
    /// the newest version with a live worker and stay pinned to it.
    pub fn registry(mut self, on: bool) -> Self {
        self.registry = on;
        self
    }

    /// Registers a flow whose handlers live elsewhere (workers behind the bus).
    pub fn flow_def(mut self, def: FlowDef) -> Self {
        if let Err(e) = def.validate() {
            self.error.get_or_insert(e);
        }
        self.flows.push(FlowPlan::new(def, Vec::new()));
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
        if let (Some(_), Some(flow)) = (&self.bus, self.with_handlers.first()) {
            return Err(FlowError::Handlers {
                flow: flow.to_string(),
                reason: "its step handlers are in this process but the coordinator sends commands over a bus: serve them with `Worker::builder().flow(flow)` and give the coordinator the definition (`flow_def(flow.definition().clone())`) or the registry".into(),
            });
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
        let registry = self.registry.then(|| Arc::new(RegistryView::new(self.hooks.clone())));
        let live = LiveRuns::default();
        let parts = RunParts::new(bus.clone(), store.clone(), live.clone());
        Ok(Coordinator {
            inner: Arc::new(Inner {
                unrouted,
                flows,
                registry,
                live,
                parts,
                store,
                engine: self.engine,
            }),
        })
    }

    /// Builds an in-process coordinator for flows already validated.
    pub(crate) fn build_embedded(self) -> Coordinator {
        let flows = self.flows.into_iter().map(|p| (p.def.name.clone(), Arc::new(p))).collect();
        let (live, bus, store): (_, Arc<dyn Bus>, Arc<dyn Store>) =
            (LiveRuns::default(), Arc::new(self.memory), Arc::new(MemoryStore::default()));
        let inner = Inner {
            unrouted: std::sync::Mutex::new(None),
            flows,
            registry: None,
            parts: RunParts::new(bus.clone(), store.clone(), live.clone()),
            live,
            store,
            engine: self.engine,
        };
        Coordinator { inner: Arc::new(inner) }
    }
}

/// A started run: its id, and a way to wait for its report.
pub struct RunHandle {
    run_id: Uuid,
    duplicate: bool,
    coordinator: Coordinator,
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
    pub fn run_id(&self) -> RunId {
        self.run_id.into()
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

    /// Cancels the run (see [`Coordinator::cancel`]); its report then says
    /// `cancelled`.
    pub async fn cancel(&self, by: &str, reason: Option<&str>) -> Result<(), RunError> {
        self.coordinator.cancel(self.run_id.into(), by, reason).await
    }
}

impl Coordinator {
    /// Starts building a coordinator.
    pub fn builder() -> CoordinatorBuilder {
        CoordinatorBuilder::default()
    }

    /// Names of the flows this coordinator runs: its own and, when it
    /// follows the registry, those registered so far.
    pub fn flows(&self) -> Vec<Arc<str>> {
        let mut names: Vec<Arc<str>> = self.inner.flows.keys().cloned().collect();
        if let Some(r) = &self.inner.registry {
            names.extend(r.names().into_iter().filter(|n| !self.inner.flows.contains_key(n)));
        }
        names.sort();
        names
    }

    /// The definition of a flow: its own, or the newest registered version.
    pub fn flow(&self, name: &str) -> Option<FlowDef> {
        match self.inner.flows.get(name) {
            Some(p) => Some(p.def.clone()),
            None => self.inner.registry.as_ref()?.newest(name),
        }
    }

    /// The registry as this coordinator sees it, if it follows one.
    pub fn registry(&self) -> Option<&RegistryView> {
        self.inner.registry.as_deref()
    }

    /// Whether this coordinator serves the registry's flows (so it takes run
    /// requests for any flow name).
    pub fn follows_registry(&self) -> bool {
        self.inner.registry.is_some()
    }

    /// Loads the cluster's flow registry and follows it from then on (the
    /// returned task; abort it to stop). For a coordinator built with
    /// [`CoordinatorBuilder::registry`]; a no-op task otherwise.
    pub async fn follow_registry(
        &self,
        registry: orchestrix_worker::registry::Registry,
    ) -> Result<tokio::task::JoinHandle<()>, orchestrix_worker::registry::RegistryError> {
        match &self.inner.registry {
            Some(view) => view.follow(registry).await,
            None => Ok(tokio::spawn(async {})),
        }
    }

    /// The plan a new run of `flow` takes.
    fn plan_for_start(&self, flow: &str, version: Option<&str>) -> Result<Arc<FlowPlan>, RunError> {
        if let Some(plan) = self.inner.flows.get(flow)
            && version.is_none_or(|v| v == &*plan.version)
        {
            return Ok(plan.clone());
        }
        let unknown_version =
            |v: &str| RunError::UnknownVersion { flow: flow.into(), version: v.into() };
        match &self.inner.registry {
            Some(r) => r.pick(flow, version).map_err(|p| match (p, version) {
                (Pick::UnknownVersion, Some(v)) => unknown_version(v),
                _ if self.inner.flows.contains_key(flow) => unknown_version(version.unwrap_or("")),
                _ => RunError::UnknownFlow(flow.to_owned()),
            }),
            None => Err(match version {
                Some(v) if self.inner.flows.contains_key(flow) => unknown_version(v),
                _ => RunError::UnknownFlow(flow.to_owned()),
            }),
        }
    }

    /// The plan a resumed run continues on: its own version's.
    fn plan_for_record(&self, rec: &RunRecord) -> Option<Arc<FlowPlan>> {
        let fixed = self.inner.flows.get(&*rec.flow);
        let version = rec.version.as_deref();
        if let Some(plan) = fixed
            && version.is_none_or(|v| v == &*plan.version)
        {
            return Some(plan.clone());
        }
        let registered = match (&self.inner.registry, version) {
            (Some(r), Some(v)) => r.plan(&rec.flow, v),
            _ => None,
        };
        // A flow file edited under a run: the steps are compared before use.
        registered.or_else(|| fixed.cloned())
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
        check_key("idempotency key", options.key.as_deref())?;
        check_key("concurrency key", options.concurrency_key.as_deref())?;
        if options.timeout == Some(Duration::ZERO) {
            return Err(RunError::BadOption(
                "a run timeout of 0 is no time at all; leave it out for none".into(),
            ));
        }
        let max = orchestrix_proto::time::MAX_DURATION;
        for (what, d) in [("run timeout", options.timeout), ("key ttl", options.ttl)] {
            if let Some(d) = d.filter(|d| *d > max) {
                return Err(RunError::BadOption(format!(
                    "a {what} of {d:?} is over the longest allowed, 100 years"
                )));
            }
        }
        let plan = self.plan_for_start(flow, options.version.as_deref())?;
        let limit = crate::DEFAULT_MAX_RUN_PAYLOAD;
        if input.len() > limit {
            return Err(RunError::InputTooLarge { size: input.len(), limit });
        }
        plan.check_input(input.as_bytes()).map_err(|problems| RunError::InputMismatch {
            flow: plan.def.name.to_string(),
            problems,
        })?;
        let run_id = Uuid::now_v7();
        let mut record = RunRecord::new(run_id, &plan.def, input, SystemTime::now());
        record.version = Some(plan.version.clone());
        let traceparent = options.traceparent.or_else(orchestrix_worker::current_traceparent);
        // Most runs have none of these: then the record takes no room for them.
        let rare = options.key.is_some()
            || options.ttl.is_some()
            || options.timeout.is_some()
            || traceparent.is_some();
        if rare {
            let x = record.extras_mut();
            x.key = options.key;
            x.ttl = options.ttl;
            x.timeout = options.timeout;
            x.traceparent = traceparent;
        }
        // A keyed run takes its place in the key's queue before the start is
        // answered, so runs started one after another queue in that order
        // (the record names the slot from the first write: whatever happens
        // next, the run's end lets go of it).
        let key_slot = options.concurrency_key.as_deref().map(|k| {
            let limit = plan.def.concurrency_per_key.unwrap_or(1);
            (crate::slots::key_slot(&plan.def.name, k), limit)
        });
        if let Some((slot, _)) = &key_slot {
            record.extras_mut().slots.push(slot.clone());
            record.status = orchestrix_proto::RunStatus::Queued;
        }
        if options.concurrency_key.is_some() {
            record.extras_mut().concurrency_key = options.concurrency_key;
        }
        let record = Arc::new(record);

        // Room on the engine first: a start that waits for it (the engine
        // is busy with a flood of starts) has created nothing yet.
        let room = self.engine()?.reserve().await;
        // A plain run takes its first decision before it is written, and is
        // written with it: its first step's command goes out once that one
        // write is stored, rather than after a write of the bare run and
        // another of its first transitions (one write a run less, and one
        // round trip less before the first step). A keyed or queued run is
        // written bare: its key or its place in a queue decides first.
        let mut begun = None;
        let plain = key_slot.is_none() && record.extras().key.is_none();
        let record = if plain {
            let limits = self.inner.parts.limits.clone();
            let mut machine =
                Machine::new(plan.clone(), record, limits, Instant::now(), Entropy::random());
            let decision = machine.start_decision(Instant::now(), SystemTime::now());
            let record = machine.rec.clone();
            begun = Some((machine, decision));
            record
        } else {
            record
        };
        match self.inner.store.create(&record).resolve().await? {
            Created::Existing { run_id, report: Some(report) } => {
                let report = Box::pin(futures::future::ready(Ok(*report)));
                Ok(RunHandle { run_id, duplicate: true, coordinator: self.clone(), report })
            }
            Created::Existing { run_id, report: None } => {
                if let Some((slot, _)) = &key_slot {
                    self.placed_in_queue(slot, run_id).await;
                }
                let wait = self.inner.store.wait(run_id);
                let report = Box::pin(async move { Ok(wait.await?) });
                Ok(RunHandle { run_id, duplicate: true, coordinator: self.clone(), report })
            }
            created @ (Created::New | Created::Adopted(_)) => {
                let created_new = matches!(created, Created::New);
                let (record, run_id) = match created {
                    Created::Adopted(r) => {
                        let id = r.run_id;
                        (r, id)
                    }
                    _ => (record, run_id),
                };
                if let Some((slot, limit)) = &key_slot {
                    self.queue(slot, *limit, run_id).await;
                }
                let (tx, rx) = oneshot::channel();
                let parts = self.actor_parts();
                // Only a run this start created: a record a store adopted
                // is started from what the store holds.
                let begun = begun.filter(|_| created_new);
                room.spawn(move |_| match begun {
                    Some((machine, decision)) => {
                        RunActor::new(machine, parts, tx, false).begun(decision)
                    }
                    _ => {
                        let limits = parts.limits.clone();
                        let machine =
                            Machine::new(plan, record, limits, Instant::now(), Entropy::random());
                        RunActor::new(machine, parts, tx, false)
                    }
                });
                let report = Box::pin(async move {
                    rx.await.map(|r| *r).map_err(|_| RunError::Lost(run_id.into()))
                });
                Ok(RunHandle { run_id, duplicate: false, coordinator: self.clone(), report })
            }
        }
    }

    /// Takes the run's place in its key's queue before its start is
    /// answered, so that runs started one after another queue in that
    /// order, also while the store fails over (asked again for a while).
    async fn queue(&self, slot: &str, limit: u32, run_id: Uuid) {
        let give_up = Instant::now() + QUEUE_PATIENCE;
        let mut pause = Duration::from_millis(50);
        loop {
            match self.inner.store.acquire(slot, limit, run_id).await {
                Ok(_) => return,
                // Its actor asks again: the run goes on, its place in the
                // queue is not kept.
                Err(e) if Instant::now() >= give_up => {
                    tracing::warn!(%run_id, error = %e, "cannot queue the run yet");
                    return;
                }
                Err(e) => tracing::debug!(%run_id, error = %e, "cannot queue the run yet"),
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(1));
        }
    }

    /// A start sent again (its idempotency key names a live run) is
    /// answered once that run has its place in the queue, or has left it:
    /// the first start may still be taking it.
    async fn placed_in_queue(&self, slot: &str, run_id: Uuid) {
        let give_up = Instant::now() + QUEUE_PATIENCE;
        while Instant::now() < give_up {
            if let Ok(true) = self.inner.store.placed(slot, run_id).await {
                return;
            }
            match self.inner.store.report(run_id).resolve().await {
                Ok(Some(r)) if r.status != orchestrix_proto::RunStatus::Queued => return,
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    /// Resumes the live runs that no live coordinator owns (those of a
    /// coordinator that died, this one's previous life included): what a
    /// coordinator does when it starts on a durable store, and then every
    /// second or so ([`Coordinator::take_over_orphans`]). Returns how many.
    /// Several coordinators may call it at once: each run goes to one.
    pub async fn recover(&self) -> Result<usize, RunError> {
        let flows: Arc<[Arc<str>]> = self.flows().into();
        // The engine first: a run claimed and then not resumed would stay
        // this coordinator's, driven by nothing.
        let engine = self.engine()?;
        let here: Arc<dyn crate::store::ActorsHere> = Arc::new(self.inner.live.clone());
        let records = self.inner.store.claim_orphans(flows, here).await?;
        let mut resumed = 0;
        for record in records {
            let Some(plan) = self.plan_for_record(&record) else {
                let why = format!(
                    "version {} of flow `{}` is not known here",
                    record.version.as_deref().unwrap_or("?"),
                    record.flow
                );
                tracing::error!(run_id = %record.run_id, reason = %why, "quarantining a run");
                if let Err(e) = self.inner.store.quarantine(&record, why).await {
                    tracing::warn!(run_id = %record.run_id, error = %e, "cannot quarantine the run");
                }
                continue;
            };
            if let Some(why) = Machine::mismatch(&plan, &record) {
                // Never index past the flow's end: set it aside for an operator.
                tracing::error!(run_id = %record.run_id, reason = %why, "quarantining a run");
                if let Err(e) = self.inner.store.quarantine(&record, why).await {
                    tracing::warn!(run_id = %record.run_id, error = %e, "cannot quarantine the run");
                }
                continue;
            }
            self.resume_here(&engine, plan, record, None);
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
    pub async fn status(&self, run_id: RunId) -> Result<Option<RunReport>, RunError> {
        let run_id = run_id.as_uuid();
        Ok(self.inner.store.report(run_id).resolve().await?)
    }

    /// Recent runs, newest first (those the store keeps).
    pub async fn list(&self, filter: crate::ListFilter) -> Result<Vec<RunReport>, RunError> {
        Ok(self.inner.store.list(filter).await?)
    }

    /// Cancels a run: the attempt in flight is stopped (its handler dropped,
    /// its context's cancellation fired; a worker that may have done it has
    /// the step compensated too), the completed steps are compensated in
    /// reverse, and the run ends `cancelled`, with `by` and `reason` in its
    /// report. Cancelling a finished run is an error ([`RunError::Refused`]);
    /// cancelling twice is harmless.
    pub async fn cancel(
        &self,
        run_id: RunId,
        by: &str,
        reason: Option<&str>,
    ) -> Result<(), RunError> {
        let run_id = run_id.as_uuid();
        let action = orchestrix_proto::OperatorAction {
            action: orchestrix_proto::ControlAction::Cancel,
            by: by.to_owned(),
            reason: reason.map(str::to_owned),
            at: SystemTime::now(),
        };
        self.control(run_id, action).await
    }

    /// Makes a run that ended `compensation_failed` live here again and
    /// resumes its rollback.
    async fn reopen(
        &self,
        run_id: Uuid,
        action: orchestrix_proto::OperatorAction,
    ) -> Result<(), RunError> {
        let record = match self.inner.store.reopen(run_id).await {
            Ok(Some(r)) => r,
            Ok(None) => {
                return Err(RunError::Refused(format!(
                    "run {run_id} cannot be resumed: its state is no longer kept"
                )));
            }
            // Another coordinator reopened it first: it answers.
            Err(StoreError::Fenced(_)) => return Err(RunError::NotLive(run_id.into())),
            Err(e) => return Err(e.into()),
        };
        let Some(plan) = self.plan_for_record(&record) else {
            return Err(RunError::Refused(format!(
                "run {run_id} cannot be resumed here: version {} of flow `{}` is not known",
                record.version.as_deref().unwrap_or("?"),
                record.flow
            )));
        };
        let (written, stored) = oneshot::channel();
        self.resume_here(&self.engine()?, plan, record, Some((action, written)));
        // Answered once the reopened run is stored as live again: a status
        // asked right after the answer never shows the old terminal one.
        let _ = tokio::time::timeout(Duration::from_secs(15), stored).await;
        Ok(())
    }

    /// The engine run actors live on.
    fn engine(&self) -> Result<Engine, RunError> {
        match &self.inner.engine {
            Some(e) => Ok(e.clone()),
            None => Ok(Engine::shared()?),
        }
    }

    /// What every run actor of this coordinator shares.
    fn actor_parts(&self) -> Arc<RunParts> {
        self.inner.parts.clone()
    }

    /// Drives a run read back from the store here: taken over, or reopened
    /// by an operator (`reopen`) to resume its failed rollback. Not paced
    /// like a start: a run claimed from the store must be queued at once,
    /// whatever becomes of the caller (a claimed run nothing drives would
    /// stay this coordinator's).
    fn resume_here(
        &self,
        engine: &Engine,
        plan: Arc<FlowPlan>,
        record: Arc<RunRecord>,
        reopen: Option<(orchestrix_proto::OperatorAction, oneshot::Sender<()>)>,
    ) {
        let parts = self.actor_parts();
        let make = move |_: &mut actix::Context<RunActor>| {
            let machine = Machine::resumed(
                plan,
                record,
                parts.limits.clone(),
                Instant::now(),
                SystemTime::now(),
                Entropy::random(),
            );
            let (tx, _) = oneshot::channel();
            let actor = RunActor::new(machine, parts, tx, true);
            match reopen {
                Some((action, written)) => actor.reopening(action, written),
                None => actor,
            }
        };
        engine.spawn(make);
    }

    /// Resumes a paused run: its paused step (or compensation) is tried again
    /// with a fresh budget of attempts. A run that is not paused is refused.
    pub async fn resume(&self, run_id: RunId, by: &str) -> Result<(), RunError> {
        let run_id = run_id.as_uuid();
        self.control(run_id, operator_action(orchestrix_proto::ControlAction::Resume, by)).await
    }

    /// Rolls a paused run back: its paused step fails for good (a paused
    /// compensation counts as failed) and the rollback goes on.
    pub async fn rollback(&self, run_id: RunId, by: &str) -> Result<(), RunError> {
        let run_id = run_id.as_uuid();
        self.control(run_id, operator_action(orchestrix_proto::ControlAction::Rollback, by)).await
    }

    /// Applies an operator's action to a run live in this process.
    pub(crate) async fn control(
        &self,
        run_id: Uuid,
        mut action: orchestrix_proto::OperatorAction,
    ) -> Result<(), RunError> {
        // Kept in the run's record and printed to terminals: bounded, and
        // no control characters (no forged report lines, no escapes).
        let clean = |s: &str, max: usize| -> String {
            s.chars().filter(|c| !c.is_control()).take(max).collect::<String>().trim().to_owned()
        };
        action.by = clean(&action.by, 128);
        action.reason = action.reason.as_deref().map(|r| clean(r, 1024)).filter(|r| !r.is_empty());
        if action.by.is_empty() {
            return Err(RunError::Refused("an operator's action needs who does it (`by`)".into()));
        }
        let mut actor = self.inner.live.get(run_id);
        if actor.is_none() {
            // Just started: its actor may not be up yet.
            for _ in 0..10 {
                if self.status(run_id.into()).await?.is_none_or(|r| r.status.is_terminal()) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
                actor = self.inner.live.get(run_id);
                if actor.is_some() {
                    break;
                }
            }
        }
        if let Some(actor) = actor {
            match actor.send(Control(action.clone())).await {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(why)) => return Err(RunError::Refused(why)),
                // The actor stopped meanwhile: the run just finished.
                Err(_) => {}
            }
        }
        match self.status(run_id.into()).await? {
            // Cancelling a cancelled run again is harmless.
            Some(r)
                if r.status == orchestrix_proto::RunStatus::Cancelled
                    && action.action == orchestrix_proto::ControlAction::Cancel =>
            {
                Ok(())
            }
            Some(r)
                if r.status == orchestrix_proto::RunStatus::CompensationFailed
                    && action.action == orchestrix_proto::ControlAction::Resume =>
            {
                self.reopen(run_id, action).await
            }
            Some(r) if r.status.is_terminal() => {
                Err(RunError::Refused(format!("run {run_id} already finished: {}", r.status)))
            }
            Some(_) => Err(RunError::NotLive(run_id.into())),
            None => Err(RunError::Store(StoreError::NotFound(run_id))),
        }
    }

    /// Waits for the final report of a run started earlier.
    pub async fn wait(&self, run_id: RunId) -> Result<RunReport, RunError> {
        let run_id = run_id.as_uuid();
        Ok(self.inner.store.wait(run_id).await?)
    }
}

fn operator_action(
    action: orchestrix_proto::ControlAction,
    by: &str,
) -> orchestrix_proto::OperatorAction {
    orchestrix_proto::OperatorAction {
        action,
        by: by.to_owned(),
        reason: None,
        at: SystemTime::now(),
    }
}
