use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use orchestrix_proto::{RunReport, validate_name};
use orchestrix_worker::{
    BoxedHandler, FlowHandlers, StepContext, StepError, StepHandlers, handler,
};
use serde::{Serialize, de::DeserializeOwned};

use crate::{Coordinator, Hooks, RetryPolicy, RunError, RunHandle, RunOptions};
pub use orchestrix_proto::{FlowDef, FlowError, OnExhausted, OnUnknown, StepDef};

/// Options of one step: compensation, retries, timeout.
///
/// ```
/// use std::time::Duration;
/// use orchestrix_coordinator::StepOptions;
///
/// let opts = StepOptions::<()>::new()
///     .retries(3)
///     .retry_delay(Duration::from_millis(1000))
///     .timeout(Duration::from_secs(5));
/// # let _ = opts;
/// ```
#[must_use]
pub struct StepOptions<I> {
    retry: RetryPolicy,
    timeout: Option<Duration>,
    compensate: Option<BoxedHandler>,
    compensation_retry: RetryPolicy,
    compensation_timeout: Option<Duration>,
    on_unknown: OnUnknown,
    on_exhausted: OnExhausted,
    compensation_on_exhausted: OnExhausted,
    pause_timeout: Option<Duration>,
    max_in_flight: Option<u32>,
    _input: PhantomData<fn(I)>,
}

impl<I> Default for StepOptions<I> {
    fn default() -> Self {
        StepOptions {
            retry: RetryPolicy::default(),
            timeout: None,
            compensate: None,
            compensation_retry: RetryPolicy::compensation_default(),
            compensation_timeout: None,
            on_unknown: OnUnknown::MaybeDone,
            on_exhausted: OnExhausted::Rollback,
            compensation_on_exhausted: OnExhausted::Rollback,
            pause_timeout: None,
            max_in_flight: None,
            _input: PhantomData,
        }
    }
}

impl<I> fmt::Debug for StepOptions<I> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StepOptions")
            .field("retry", &self.retry)
            .field("timeout", &self.timeout)
            .field("compensable", &self.compensate.is_some())
            .field("compensation_retry", &self.compensation_retry)
            .finish()
    }
}

impl<I: DeserializeOwned + Send + 'static> StepOptions<I> {
    /// Default options: one attempt, no timeout, no compensation.
    pub fn new() -> Self {
        Self::default()
    }

    /// The compensation: run on rollback if this step completed and a later
    /// step failed for good. Its output is ignored.
    pub fn compensate<O, F, Fut>(mut self, f: F) -> Self
    where
        O: Serialize + Send + 'static,
        F: Fn(StepContext<I>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<O, StepError>> + Send + 'static,
    {
        self.compensate = Some(handler(f));
        self
    }

    /// Retries after the first attempt (`retries(3)`: at most 4 attempts).
    pub fn retries(mut self, n: u32) -> Self {
        self.retry.retries = n;
        self
    }

    /// Delay before the first retry (constant unless [`backoff`](Self::backoff) is set).
    pub fn retry_delay(mut self, d: Duration) -> Self {
        self.retry.retry_delay = d;
        self
    }

    /// Multiplies the delay by `factor` after each retry.
    pub fn backoff(mut self, factor: f64) -> Self {
        self.retry = self.retry.backoff(factor);
        self
    }

    /// Caps the delay between retries.
    pub fn max_delay(mut self, d: Duration) -> Self {
        self.retry.max_delay = d;
        self
    }

    /// Spreads each delay randomly by ± this fraction.
    pub fn jitter(mut self, fraction: f64) -> Self {
        self.retry = self.retry.jitter(fraction);
        self
    }

    /// Replaces the whole retry policy of the step's action.
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }

    /// Time budget of each attempt. An attempt past it is stopped (its future
    /// dropped, its context cancelled) and its outcome is *unknown*: see
    /// [`on_unknown`](Self::on_unknown).
    pub fn timeout(mut self, d: Duration) -> Self {
        self.timeout = Some(d);
        self
    }

    /// What an attempt with an unknown outcome (timed out, or its worker went
    /// silent after starting it) means: [`OnUnknown::MaybeDone`] (the default)
    /// or [`OnUnknown::Retry`].
    pub fn on_unknown(mut self, on_unknown: OnUnknown) -> Self {
        self.on_unknown = on_unknown;
        self
    }

    /// The step is idempotent: an attempt with an unknown outcome is simply
    /// retried. Short for `.on_unknown(OnUnknown::Retry)`.
    pub fn idempotent(self) -> Self {
        self.on_unknown(OnUnknown::Retry)
    }

    /// What happens when the retries run out: [`OnExhausted::Rollback`] (the
    /// default) or [`OnExhausted::Pause`] — the run waits, durably, for an
    /// operator to resume it (a fresh budget of attempts) or roll it back.
    pub fn on_exhausted(mut self, then: OnExhausted) -> Self {
        self.on_exhausted = then;
        self
    }

    /// Short for `.on_exhausted(OnExhausted::Pause)`.
    pub fn pause_when_exhausted(self) -> Self {
        self.on_exhausted(OnExhausted::Pause)
    }

    /// The same for the compensation: pause the rollback rather than leave
    /// the step's side effect in place.
    pub fn compensation_on_exhausted(mut self, then: OnExhausted) -> Self {
        self.compensation_on_exhausted = then;
        self
    }

    /// How long a run paused at this step waits for an operator before it
    /// rolls back on its own (default: until an operator acts).
    pub fn pause_timeout(mut self, d: Duration) -> Self {
        self.pause_timeout = Some(d);
        self
    }

    /// Retries of the compensation after its first attempt (its delays stay
    /// those of [`RetryPolicy::compensation_default`]).
    pub fn compensation_retries(mut self, n: u32) -> Self {
        self.compensation_retry.retries = n;
        self
    }

    /// Retry policy of the compensation (default: [`RetryPolicy::compensation_default`]).
    pub fn compensation_retry(mut self, policy: RetryPolicy) -> Self {
        self.compensation_retry = policy;
        self
    }

    /// Time budget of each compensation attempt.
    pub fn compensation_timeout(mut self, d: Duration) -> Self {
        self.compensation_timeout = Some(d);
        self
    }

    /// At most `n` attempts of this step in flight at once, across every run
    /// (and every coordinator sharing the store): a fragile dependency sees
    /// no more. Attempts beyond it wait for a slot, in arrival order, with
    /// the step `waiting`; they do not fail. Compensations are not limited.
    pub fn max_in_flight(mut self, n: u32) -> Self {
        self.max_in_flight = Some(n);
        self
    }
}

/// A flow with its step handlers in this process: what [`create`] builds.
///
/// Cheap to clone; clones share the embedded engine that runs them.
#[must_use]
pub struct Flow<I> {
    pub(crate) def: FlowDef,
    pub(crate) handlers: Vec<StepHandlers>,
    pub(crate) hooks: Vec<Arc<dyn Hooks>>,
    pub(crate) error: Option<FlowError>,
    embedded: Arc<OnceLock<Coordinator>>,
    _input: PhantomData<fn(I)>,
}

impl<I> Clone for Flow<I> {
    fn clone(&self) -> Self {
        Flow {
            def: self.def.clone(),
            handlers: self.handlers.clone(),
            hooks: self.hooks.clone(),
            error: self.error.clone(),
            embedded: self.embedded.clone(),
            _input: PhantomData,
        }
    }
}

impl<I> fmt::Debug for Flow<I> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Flow").field("def", &self.def).field("hooks", &self.hooks.len()).finish()
    }
}

/// Starts a flow named `name` whose runs take an input of type `I`.
///
/// ```
/// use orchestrix_coordinator::{create, RunStatus};
///
/// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let flow = create::<u32>("double")
///     .step("check", |ctx| async move {
///         if ctx.input == 0 { return Err(orchestrix_worker::StepError::permanent("zero")); }
///         Ok(())
///     })
///     .step_with("double", |ctx| async move { Ok(ctx.input * 2) },
///         |o| o.compensate(|_ctx| async { Ok(()) }));
///
/// let report = flow.run(21).await?;
/// assert_eq!(report.status, RunStatus::Completed);
/// assert_eq!(report.step("double").unwrap().output.as_ref().unwrap().decode::<u32>()?, 42);
/// # Ok(()) }
/// ```
pub fn create<I>(name: &str) -> Flow<I> {
    let def = FlowDef::new(name);
    let error = validate_name("flow", name).err().map(FlowError::from);
    Flow {
        def,
        handlers: Vec::new(),
        hooks: Vec::new(),
        error,
        embedded: Arc::new(OnceLock::new()),
        _input: PhantomData,
    }
}

impl<I> Flow<I>
where
    I: Serialize + DeserializeOwned + Send + 'static,
{
    /// Appends a step with default options.
    pub fn step<O, F, Fut>(self, name: &str, f: F) -> Self
    where
        O: Serialize + Send + 'static,
        F: Fn(StepContext<I>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<O, StepError>> + Send + 'static,
    {
        self.step_with(name, f, |o| o)
    }

    /// Appends a step with options: compensation, retries, timeout. The options
    /// are set by a closure over [`StepOptions`], so handler contexts get their
    /// input type from the flow:
    ///
    /// ```
    /// # use std::time::Duration;
    /// # let flow = orchestrix_coordinator::create::<String>("f");
    /// let flow = flow.step_with("reserve-stock", |_ctx| async { Ok(()) }, |o| {
    ///     o.compensate(|ctx| async move { println!("release {}", ctx.input); Ok(()) })
    ///         .retries(3)
    ///         .retry_delay(Duration::from_millis(1000))
    /// });
    /// ```
    pub fn step_with<O, F, Fut, C>(mut self, name: &str, f: F, configure: C) -> Self
    where
        O: Serialize + Send + 'static,
        F: Fn(StepContext<I>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<O, StepError>> + Send + 'static,
        C: FnOnce(StepOptions<I>) -> StepOptions<I>,
    {
        let options = configure(StepOptions::default());
        let mut def = StepDef::new(name);
        def.retry = options.retry;
        def.timeout = options.timeout;
        def.compensable = options.compensate.is_some();
        def.compensation_retry = options.compensation_retry;
        def.compensation_timeout = options.compensation_timeout;
        def.on_unknown = options.on_unknown;
        def.on_exhausted = options.on_exhausted;
        def.compensation_on_exhausted = options.compensation_on_exhausted;
        def.pause_timeout = options.pause_timeout;
        def.max_in_flight = options.max_in_flight;
        self.def.steps.push(def);
        self.handlers.push(StepHandlers { execute: handler(f), compensate: options.compensate });
        if self.error.is_none() {
            self.error = self.def.validate().err();
        }
        self.changed()
    }

    /// Appends a parallel group named `group`: the steps added by `build`
    /// run at the same time, once the steps before them completed; the
    /// steps after them start once every one of them completed, and see all
    /// their outputs. When one fails for good, those still running are
    /// stopped, and the rollback compensates the group's completed (and
    /// maybe done) steps at the same time, after the steps that came after
    /// the group and before those that came before it.
    ///
    /// ```
    /// # use orchestrix_coordinator::{create, RunStatus};
    /// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let flow = create::<u32>("order")
    ///     .parallel("reserve", |g| {
    ///         g.step_with("warehouse-a", |_ctx| async { Ok(1) }, |o| o.compensate(|_ctx| async { Ok(()) }))
    ///             .step_with("warehouse-b", |_ctx| async { Ok(2) }, |o| o.compensate(|_ctx| async { Ok(()) }))
    ///     })
    ///     .step("ship", |ctx| async move {
    ///         let a: u32 = ctx.output("warehouse-a")?;
    ///         let b: u32 = ctx.output("warehouse-b")?;
    ///         Ok(a + b)
    ///     });
    /// let report = flow.run(7).await?;
    /// assert_eq!(report.status, RunStatus::Completed);
    /// assert_eq!(report.step("warehouse-b").unwrap().group.as_deref(), Some("reserve"));
    /// # Ok(()) }
    /// ```
    pub fn parallel(self, group: &str, build: impl FnOnce(Parallel<I>) -> Parallel<I>) -> Self {
        let first = self.def.steps.len();
        // The same name right after itself would silently make one group.
        let twice = first > 0 && self.def.steps[first - 1].group.as_deref() == Some(group);
        let Parallel(mut flow) = build(Parallel(self));
        let group_name: Arc<str> = Arc::from(group);
        for step in &mut flow.def.steps[first..] {
            step.group = Some(group_name.clone());
        }
        if flow.error.is_none() {
            let invalid = |reason: String| {
                Some(FlowError::Invalid { flow: flow.def.name.to_string(), reason })
            };
            flow.error = if flow.def.steps.len() == first {
                invalid(format!("parallel group `{group}` has no steps"))
            } else if twice {
                invalid(format!(
                    "parallel group `{group}` follows a group of the same name: use one `.parallel` call, or another name"
                ))
            } else {
                flow.def.validate().err()
            };
        }
        flow.changed()
    }

    /// At most `n` runs with the same concurrency key
    /// ([`RunOptions::concurrency_key`]) run at once (default 1); the others
    /// wait, `queued`, in arrival order. The queue is kept by the store: with
    /// the JetStream store it is shared by every coordinator and survives
    /// them.
    pub fn concurrency_per_key(mut self, n: u32) -> Self {
        self.def.concurrency_per_key = Some(n);
        // Checked alone: the steps may come after it.
        if self.error.is_none() && n == 0 {
            self.error = Some(FlowError::Invalid {
                flow: self.def.name.to_string(),
                reason: "the concurrency limit per key must be at least 1".into(),
            });
        }
        self.changed()
    }

    /// Labels this definition's version (letters, digits, `-`, `_`) instead
    /// of the default hash of the definition. Registering a *different*
    /// definition under a label already registered is refused, so bump the
    /// label with every change.
    pub fn version(mut self, label: &str) -> Self {
        self.def.version = Some(Arc::from(label));
        if self.error.is_none() {
            self.error = validate_name("version", label).err().map(FlowError::from);
        }
        self.changed()
    }

    /// Publishes a JSON Schema of the input type `I` with the flow, so that a
    /// start whose input does not have its shape (a missing field, a string
    /// for a number, no input at all) is refused before a run is created —
    /// also starts from other languages and from `orchestrix run`.
    ///
    /// ```
    /// use orchestrix_coordinator::{create, RunError};
    ///
    /// #[derive(serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
    /// struct Order { id: String, amount: u64 }
    ///
    /// # #[tokio::main] async fn main() {
    /// let flow = create::<Order>("order").step("charge", |_ctx| async { Ok(()) }).input_schema();
    /// let c = orchestrix_coordinator::Coordinator::builder().flow(&flow).build().unwrap();
    /// let wrong = serde_json::json!({ "id": "o-1", "amount": "ten" });
    /// let err = c.run("order", &wrong, Default::default()).await.unwrap_err();
    /// assert!(matches!(err, RunError::InputMismatch { .. }), "{err}");
    /// # }
    /// ```
    pub fn input_schema(mut self) -> Self
    where
        I: schemars::JsonSchema,
    {
        let schema = schemars::schema_for!(I);
        match serde_json::to_string(&schema) {
            Ok(text) => self.def.input_schema = Some(Arc::from(text)),
            Err(e) => {
                if self.error.is_none() {
                    self.error = Some(FlowError::Invalid {
                        flow: self.def.name.to_string(),
                        reason: format!("the input type's schema does not encode: {e}"),
                    });
                }
            }
        }
        self.changed()
    }

    /// Adds hooks, called as runs of this flow progress.
    pub fn hooks(mut self, hooks: impl Hooks) -> Self {
        self.hooks.push(Arc::new(hooks));
        self.changed()
    }

    /// The flow's definition.
    pub fn definition(&self) -> &FlowDef {
        &self.def
    }

    /// Runs the flow on the embedded engine and returns its report.
    ///
    /// A run that fails is not an `Err`: its report says `failed`. `Err` means
    /// the run could not be started or followed (an invalid flow, an input that
    /// does not encode).
    pub async fn run(&self, input: I) -> Result<RunReport, RunError> {
        self.run_with(input, RunOptions::default()).await
    }

    /// Runs the flow with options: an idempotency key and its ttl, a deadline.
    pub async fn run_with(&self, input: I, options: RunOptions) -> Result<RunReport, RunError> {
        let coordinator = self.embedded()?;
        coordinator.run(&self.def.name, &input, options).await
    }

    /// Starts a run on the embedded engine and returns at once with its
    /// handle: its id, its report to wait for, and a way to cancel it.
    pub async fn start(&self, input: I, options: RunOptions) -> Result<RunHandle, RunError> {
        let coordinator = self.embedded()?;
        coordinator.start(&self.def.name, &input, options).await
    }

    /// This flow, run by the coordinators of a cluster through `client`, with
    /// the same calls as here: `flow.remote(&client).run(input)`. Runs take
    /// the newest version live workers serve; to run exactly this
    /// definition, add `.version(flow.definition().version().to_string())`
    /// (its workers must have registered it).
    pub fn remote(&self, client: &orchestrix_client::Client) -> orchestrix_client::RemoteFlow<I> {
        client.flow(&self.def.name)
    }

    /// The in-process coordinator that runs this flow, created at first use.
    pub fn embedded(&self) -> Result<&Coordinator, RunError> {
        // A flow with no steps yet has had nothing checked.
        if let Some(err) = self.error.clone().or_else(|| self.def.validate().err()) {
            return Err(RunError::InvalidFlow(err));
        }
        Ok(self.embedded.get_or_init(|| Coordinator::builder().flow(self).build_embedded()))
    }

    fn changed(mut self) -> Self {
        // A changed flow is another flow: it gets an engine of its own.
        self.embedded = Arc::new(OnceLock::new());
        self
    }
}

/// The steps of a parallel group, as [`Flow::parallel`] builds them.
#[must_use]
pub struct Parallel<I>(Flow<I>);

impl<I> fmt::Debug for Parallel<I> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Parallel").field(&self.0).finish()
    }
}

impl<I> Parallel<I>
where
    I: Serialize + DeserializeOwned + Send + 'static,
{
    /// Adds a step to the group, with default options.
    pub fn step<O, F, Fut>(self, name: &str, f: F) -> Self
    where
        O: Serialize + Send + 'static,
        F: Fn(StepContext<I>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<O, StepError>> + Send + 'static,
    {
        Parallel(self.0.step(name, f))
    }

    /// Adds a step to the group, with options (as [`Flow::step_with`]).
    pub fn step_with<O, F, Fut, C>(self, name: &str, f: F, configure: C) -> Self
    where
        O: Serialize + Send + 'static,
        F: Fn(StepContext<I>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<O, StepError>> + Send + 'static,
        C: FnOnce(StepOptions<I>) -> StepOptions<I>,
    {
        Parallel(self.0.step_with(name, f, configure))
    }
}

impl<I> From<&Flow<I>> for FlowHandlers {
    fn from(flow: &Flow<I>) -> Self {
        FlowHandlers::new(flow.def.clone(), flow.handlers.clone()).with_error(flow.error.clone())
    }
}

impl<I> From<Flow<I>> for FlowHandlers {
    fn from(flow: Flow<I>) -> Self {
        FlowHandlers::from(&flow)
    }
}
