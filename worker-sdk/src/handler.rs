use std::any::Any;
use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::FutureExt;
use futures::future::{BoxFuture, CatchUnwind};
use orchestrix_proto::{
    CommandKind, FlowDef, FlowError, OutcomeResult, Payload, StepCommand, StepFailure,
};
use serde::{Serialize, de::DeserializeOwned};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use crate::{StepContext, StepError};

/// What a type-erased handler returns: the encoded output, or the error.
pub type HandlerFuture = BoxFuture<'static, Result<Payload, StepError>>;

type ErasedFn = dyn Fn(StepCommand, Cancel) -> HandlerFuture + Send + Sync;

/// A step handler with its input and output types erased, so handlers of every
/// type can sit in one registry. Made with [`handler`]; cheap to clone.
#[derive(Clone)]
pub struct BoxedHandler(Arc<ErasedFn>);

impl fmt::Debug for BoxedHandler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BoxedHandler")
    }
}

/// Wraps an async function of a [`StepContext<I>`] into a [`BoxedHandler`].
///
/// The run input is decoded into `I` for each attempt (an input that does not
/// decode is a permanent error); the output `O` is encoded into a [`Payload`]
/// that later steps and the report can read.
pub fn handler<I, O, F, Fut>(f: F) -> BoxedHandler
where
    I: DeserializeOwned + Send + 'static,
    O: Serialize + Send + 'static,
    F: Fn(StepContext<I>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<O, StepError>> + Send + 'static,
{
    BoxedHandler(Arc::new(move |cmd: StepCommand, cancel: Cancel| -> HandlerFuture {
        let input = match cmd.input.decode::<I>() {
            Ok(input) => input,
            Err(e) => {
                // The decoder's own words ("invalid type: …, expected …"),
                // without the codec's wrapper, and a hint for the usual cause.
                let why = match &e {
                    orchestrix_proto::CodecError::Malformed { source, .. } => source.to_string(),
                    other => other.to_string(),
                };
                let hint = if cmd.input.is_nil() {
                    " (the run's input is null: was it started without one?)"
                } else {
                    ""
                };
                let err = StepError::permanent(format!("run input does not decode: {why}{hint}"));
                return Box::pin(futures::future::ready(Err(err)));
            }
        };
        let ctx = StepContext {
            input,
            run_id: cmd.run_id,
            command_id: cmd.command_id,
            flow: cmd.flow,
            step: cmd.step,
            attempt: cmd.attempt,
            kind: cmd.kind,
            outputs: cmd.outputs,
            cancel,
        };
        let fut = f(ctx);
        Box::pin(async move {
            let out = fut.await?;
            Payload::encode(&out)
                .map_err(|e| StepError::after_effect(format!("step output does not encode: {e}")))
        })
    }))
}

/// A flow's definition with the handlers of its steps, in step order: what
/// [`crate::WorkerBuilder::flow`] serves and registers. `orchestrix::create`
/// builds flows that turn into one (`Flow` implements `Into<FlowHandlers>`).
#[derive(Clone, Debug)]
pub struct FlowHandlers {
    pub(crate) def: FlowDef,
    pub(crate) handlers: Vec<StepHandlers>,
    pub(crate) error: Option<FlowError>,
}

impl FlowHandlers {
    /// Pairs a definition with one [`StepHandlers`] per step, in order. A
    /// mismatch, or a definition that is not valid, is reported when the
    /// worker starts.
    pub fn new(def: FlowDef, handlers: Vec<StepHandlers>) -> Self {
        let mut error = def.validate().err();
        if error.is_none() && handlers.len() != def.steps.len() {
            error = Some(FlowError::Handlers {
                flow: def.name.to_string(),
                reason: format!("{} steps but {} handlers", def.steps.len(), handlers.len()),
            });
        }
        if error.is_none()
            && let Some(step) = def
                .steps
                .iter()
                .zip(&handlers)
                .find(|(s, h)| s.compensable != h.compensate.is_some())
        {
            error = Some(FlowError::Handlers {
                flow: def.name.to_string(),
                reason: format!(
                    "step `{}` is {}compensable but has {} compensation handler",
                    step.0.name,
                    if step.0.compensable { "" } else { "not " },
                    if step.1.compensate.is_some() { "a" } else { "no" }
                ),
            });
        }
        FlowHandlers { def, handlers, error }
    }

    /// Keeps a known error (a flow built with a bad name, say) for the worker to report.
    pub fn with_error(mut self, error: Option<FlowError>) -> Self {
        if self.error.is_none() {
            self.error = error;
        }
        self
    }

    /// The definition.
    pub fn definition(&self) -> &FlowDef {
        &self.def
    }
}

/// A step's action and, when it has one, its compensation.
#[derive(Clone, Debug)]
pub struct StepHandlers {
    /// Runs the step.
    pub execute: BoxedHandler,
    /// Undoes the step after a later step failed for good.
    pub compensate: Option<BoxedHandler>,
}

impl StepHandlers {
    /// The handler for a command of `kind`.
    pub fn get(&self, kind: CommandKind) -> Option<&BoxedHandler> {
        match kind {
            CommandKind::Execute => Some(&self.execute),
            CommandKind::Compensate => self.compensate.as_ref(),
        }
    }
}

/// Runs one command through `handler` and turns whatever happens into an
/// outcome: the handler's result, a panic (caught and reported as a retryable
/// failure), or the end of the attempt's time: its `timeout` from now, or its
/// absolute `deadline_ms`, whichever comes first. At that point the context's
/// cancellation fires, the handler's future is dropped, and the outcome is a
/// failure marked *maybe done*: the handler may have had its effect. Never
/// panics itself.
pub fn run_command(handler: &BoxedHandler, cmd: StepCommand) -> BoxFuture<'static, OutcomeResult> {
    // Nobody but the handler holds this attempt's cancellation, so it is
    // made only if the handler asks for it, or when the attempt ends early.
    let lazy = Arc::new(OnceLock::new());
    let budget = budget(cmd.timeout, cmd.deadline_ms);
    match start(handler, cmd, Cancel::Lazy(lazy.clone())) {
        Ok(fut) => Box::pin(InProcess {
            fut,
            lazy,
            stop: None,
            budget: budget.map(|(b, why)| Box::new((Box::pin(tokio::time::sleep(b)), why))),
            armed: true,
        }),
        Err(done) => done,
    }
}

/// An in-process attempt: the handler's future, ended by its budget or by
/// its own token. The token is cancelled (made then, if the handler never
/// asked for it) when the attempt ends any other way than by the handler
/// returning: out of time, dropped (its run was cancelled), or a panic.
/// A small struct rather than an `async` block: a parked run holds it.
struct InProcess {
    fut: Started,
    lazy: Arc<OnceLock<CancellationToken>>,
    /// Waits on the token once the handler has made one.
    stop: Option<Pin<Box<WaitForCancellationFutureOwned>>>,
    /// The attempt's time, and what ends it (boxed: a step without a
    /// budget does not carry its room).
    budget: Option<Box<(Pin<Box<tokio::time::Sleep>>, String)>>,
    /// The token is cancelled when this ends, unless the handler returned.
    armed: bool,
}

impl Future for InProcess {
    type Output = OutcomeResult;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<OutcomeResult> {
        let this = &mut *self;
        if let Poll::Ready(result) = this.fut.poll_unpin(cx) {
            // Only a handler that returned lets its token be: after a panic,
            // the tasks it gave the token to are told.
            this.armed = result.is_err();
            return Poll::Ready(outcome(result));
        }
        if this.stop.is_none()
            && let Some(token) = this.lazy.get()
        {
            this.stop = Some(Box::pin(token.clone().cancelled_owned()));
        }
        if let Some(stop) = &mut this.stop
            && stop.as_mut().poll(cx).is_ready()
        {
            let why = "the attempt was cancelled while its handler ran";
            return Poll::Ready(OutcomeResult::Failed(StepFailure::maybe_done(why)));
        }
        if let Some(budget) = &mut this.budget
            && budget.0.as_mut().poll(cx).is_ready()
        {
            return Poll::Ready(OutcomeResult::Failed(StepFailure::maybe_done(budget.1.clone())));
        }
        Poll::Pending
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        // Made here if the handler has not asked yet: a context kept past
        // the attempt (in a task of the handler's) must read cancelled, and
        // a token asked for later must be the cancelled one.
        if self.armed {
            self.lazy.get_or_init(CancellationToken::new).cancel();
        }
    }
}

/// [`run_command`] with a cancellation token of the caller's: cancelling it
/// stops the handler the same way its deadline does.
pub fn run_command_with(
    handler: &BoxedHandler,
    cmd: StepCommand,
    cancel: CancellationToken,
) -> BoxFuture<'static, OutcomeResult> {
    let budget = budget(cmd.timeout, cmd.deadline_ms);
    let fut = match start(handler, cmd, Cancel::Token(cancel.clone())) {
        Ok(fut) => fut,
        Err(done) => return done,
    };
    // Two shapes, boxed apart: a step without a budget does not carry the
    // timer's state while it waits.
    match budget {
        None => Box::pin(async move {
            tokio::select! {
                biased;
                result = fut => outcome(result),
                () = cancel.cancelled() => OutcomeResult::Failed(StepFailure::maybe_done("the attempt was cancelled while its handler ran")),
            }
        }),
        Some((budget, why)) => Box::pin(async move {
            let stopped = tokio::select! {
                biased;
                result = tokio::time::timeout(budget, fut) => match result {
                    Ok(result) => return outcome(result),
                    Err(_) => why,
                },
                () = cancel.cancelled() => "the attempt was cancelled while its handler ran".to_owned(),
            };
            cancel.cancel();
            OutcomeResult::Failed(StepFailure::maybe_done(stopped))
        }),
    }
}

/// The handler's future with its panics caught, or the outcome of a handler
/// that panicked before it returned one.
type Started = CatchUnwind<AssertUnwindSafe<HandlerFuture>>;

fn start(
    handler: &BoxedHandler,
    cmd: StepCommand,
    cancel: Cancel,
) -> Result<Started, BoxFuture<'static, OutcomeResult>> {
    // The synchronous part of a handler (before its first await) may panic too.
    match std::panic::catch_unwind(AssertUnwindSafe(|| (handler.0)(cmd, cancel))) {
        Ok(fut) => Ok(AssertUnwindSafe(fut).catch_unwind()),
        Err(panic) => Err(Box::pin(futures::future::ready(panicked(panic)))),
    }
}

/// An attempt's cancellation as its [`StepContext`] holds it: a token the
/// caller cancels, or one made only when the handler asks for it.
#[derive(Clone)]
pub(crate) enum Cancel {
    Token(CancellationToken),
    Lazy(Arc<OnceLock<CancellationToken>>),
}

impl Cancel {
    pub(crate) fn token(&self) -> CancellationToken {
        match self {
            Cancel::Token(t) => t.clone(),
            Cancel::Lazy(cell) => cell.get_or_init(CancellationToken::new).clone(),
        }
    }

    pub(crate) fn is_cancelled(&self) -> bool {
        match self {
            Cancel::Token(t) => t.is_cancelled(),
            Cancel::Lazy(cell) => cell.get().is_some_and(CancellationToken::is_cancelled),
        }
    }
}

/// Time left for an attempt, and what ends it: the relative timeout, cut
/// short by the absolute deadline (read against this host's clock). Within a
/// few milliseconds of each other they are one and the same (the coordinator
/// sets the deadline from the timeout when it sends the command): then the
/// step's timeout is named.
pub(crate) fn budget(
    timeout: Option<Duration>,
    deadline_ms: Option<u64>,
) -> Option<(Duration, String)> {
    let left = deadline_ms.map(|d| {
        let now = orchestrix_proto::time::unix_ms(std::time::SystemTime::now());
        Duration::from_millis(d.saturating_sub(now))
    });
    let timed_out = |t: Duration| format!("step timed out after {t:?}");
    match (timeout, left) {
        (Some(t), Some(l)) if l + Duration::from_millis(250) < t => {
            Some((l, "the attempt reached its deadline (the run's deadline)".to_owned()))
        }
        (Some(t), Some(l)) => Some((t.min(l), timed_out(t))),
        (Some(t), None) => Some((t, timed_out(t))),
        (None, Some(l)) => {
            Some((l, "the attempt reached its deadline (the run's deadline)".to_owned()))
        }
        (None, None) => None,
    }
}

fn outcome(result: Result<Result<Payload, StepError>, Box<dyn Any + Send>>) -> OutcomeResult {
    match result {
        Ok(Ok(output)) => OutcomeResult::Completed { output },
        Ok(Err(err)) => OutcomeResult::Failed(err.into_failure()),
        Err(panic) => panicked(panic),
    }
}

fn panicked(panic: Box<dyn Any + Send>) -> OutcomeResult {
    let what = panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic payload".to_owned());
    OutcomeResult::Failed(StepFailure::new(format!("handler panicked: {what}"), true))
}

#[cfg(test)]
mod tests {
    use orchestrix_proto::StepOutput;
    use uuid::Uuid;

    use super::*;

    pub(super) fn cmd(input: Payload, timeout: Option<Duration>) -> StepCommand {
        StepCommand {
            command_id: Uuid::new_v4(),
            run_id: Uuid::new_v4(),
            flow: "f".into(),
            version: "v1".into(),
            step: "s".into(),
            step_index: 0,
            kind: CommandKind::Execute,
            attempt: 2,
            input,
            outputs: vec![StepOutput {
                step: "before".into(),
                output: Payload::encode(&7u8).unwrap(),
            }],
            timeout,
            start_by_ms: None,
            deadline_ms: None,
            acks: false,
            sampled: None,
            traceparent: None,
        }
    }

    #[tokio::test]
    async fn context_carries_input_attempt_and_outputs() {
        let h = handler(|ctx: StepContext<u32>| async move {
            let before: u8 = ctx.output("before")?;
            Ok((ctx.input, ctx.attempt(), before))
        });
        let out = run_command(&h, cmd(Payload::encode(&5u32).unwrap(), None)).await;
        let OutcomeResult::Completed { output } = out else { panic!("{out:?}") };
        assert_eq!(output.decode::<(u32, u32, u8)>().unwrap(), (5, 2, 7));
    }

    #[tokio::test]
    async fn bad_input_is_a_permanent_failure() {
        let h = handler(|_: StepContext<String>| async { Ok(()) });
        let out = run_command(&h, cmd(Payload::encode(&5u32).unwrap(), None)).await;
        let OutcomeResult::Failed(f) = out else { panic!() };
        assert!(!f.retryable);
        assert!(f.message.starts_with("run input does not decode"), "{}", f.message);
        assert!(!f.message.contains("payload"), "{}", f.message);
        let out = run_command(&h, cmd(Payload::nil(), None)).await;
        let OutcomeResult::Failed(f) = out else { panic!() };
        assert!(f.message.ends_with("(the run's input is null: was it started without one?)"));
    }

    #[tokio::test]
    async fn an_output_that_does_not_encode_fails_for_good_maybe_done() {
        struct Unencodable;
        impl serde::Serialize for Unencodable {
            fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
                Err(serde::ser::Error::custom("no wire form"))
            }
        }
        let h = handler(|_: StepContext<u32>| async { Ok(Unencodable) });
        let out = run_command(&h, cmd(Payload::encode(&5u32).unwrap(), None)).await;
        let OutcomeResult::Failed(f) = out else { panic!("{out:?}") };
        // The handler ran: its effect may have happened.
        assert!(!f.retryable && f.maybe_done, "{f:?}");
        assert!(f.message.contains("does not encode"), "{}", f.message);
    }

    #[tokio::test]
    async fn panics_become_retryable_failures() {
        let sync_panic =
            handler(|_: StepContext<()>| -> futures::future::Ready<Result<(), StepError>> {
                panic!("before the future")
            });
        let async_panic = handler(|_: StepContext<()>| async {
            if true {
                panic!("inside the future");
            }
            Ok(())
        });
        for (h, msg) in [(sync_panic, "before the future"), (async_panic, "inside the future")] {
            let OutcomeResult::Failed(f) = run_command(&h, cmd(Payload::nil(), None)).await else {
                panic!()
            };
            assert!(f.retryable);
            assert_eq!(f.message, format!("handler panicked: {msg}"));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_handler_past_its_budget_is_dropped_and_fails() {
        let h = handler(|_: StepContext<()>| async {
            tokio::time::sleep(Duration::from_secs(10)).await;
            Ok(())
        });
        let started = tokio::time::Instant::now();
        let out = run_command(&h, cmd(Payload::nil(), Some(Duration::from_millis(250)))).await;
        assert_eq!(started.elapsed(), Duration::from_millis(250));
        let OutcomeResult::Failed(f) = out else { panic!() };
        assert_eq!(f.message, "step timed out after 250ms");
        assert!(f.maybe_done, "a handler stopped midway may have had its effect");
    }

    #[tokio::test(start_paused = true)]
    async fn the_deadline_cancels_the_context_and_drops_the_handler() {
        let seen = Arc::new(std::sync::Mutex::new(None));
        let seen2 = seen.clone();
        let h = handler(move |ctx: StepContext<()>| {
            let seen = seen2.clone();
            async move {
                let stop = ctx.cancellation();
                tokio::spawn(async move {
                    stop.cancelled().await;
                    *seen.lock().unwrap() = Some(tokio::time::Instant::now());
                });
                tokio::time::sleep(Duration::from_secs(10)).await;
                Ok(())
            }
        });
        let started = tokio::time::Instant::now();
        let out = run_command(&h, cmd(Payload::nil(), Some(Duration::from_millis(100)))).await;
        tokio::task::yield_now().await;
        assert!(matches!(out, OutcomeResult::Failed(f) if f.maybe_done));
        let at = seen.lock().unwrap().expect("cancellation fired");
        assert_eq!(at - started, Duration::from_millis(100));
    }

    /// A handler that hands its cancellation to a task of its own, and what
    /// that task saw once the attempt is over.
    fn watched(wait: Duration) -> (BoxedHandler, Arc<std::sync::atomic::AtomicBool>) {
        let fired = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let f = fired.clone();
        let h = handler(move |ctx: StepContext<()>| {
            let (f, stop) = (f.clone(), ctx.cancellation());
            assert!(!ctx.is_cancelled());
            tokio::spawn(async move {
                stop.cancelled().await;
                f.store(true, std::sync::atomic::Ordering::SeqCst);
            });
            async move {
                tokio::time::sleep(wait).await;
                Ok(())
            }
        });
        (h, fired)
    }

    #[tokio::test(start_paused = true)]
    async fn dropping_an_in_process_attempt_cancels_what_its_handler_holds() {
        // The run's actor drops the future of a cancelled run's attempt.
        let (h, fired) = watched(Duration::from_secs(3600));
        let mut fut = run_command(&h, cmd(Payload::nil(), None));
        assert!(futures::poll!(&mut fut).is_pending());
        tokio::task::yield_now().await;
        assert!(!fired.load(std::sync::atomic::Ordering::SeqCst), "not while it runs");
        drop(fut);
        tokio::task::yield_now().await;
        assert!(fired.load(std::sync::atomic::Ordering::SeqCst), "the cleanup task was told");
    }

    #[tokio::test(start_paused = true)]
    async fn a_handler_that_returned_is_not_cancelled_afterwards() {
        for timeout in [None, Some(Duration::from_secs(5))] {
            let (h, fired) = watched(Duration::from_millis(10));
            let out = run_command(&h, cmd(Payload::nil(), timeout)).await;
            assert!(matches!(out, OutcomeResult::Completed { .. }), "{out:?}");
            tokio::time::sleep(Duration::from_secs(10)).await;
            assert!(!fired.load(std::sync::atomic::Ordering::SeqCst), "timeout {timeout:?}");
        }
    }

    /// What a parked in-process attempt holds besides the handler's own
    /// future, kept from growing back unnoticed (see "Memory" in
    /// `docs/benchmarks.md`; 64-bit targets).
    #[test]
    #[cfg(target_pointer_width = "64")]
    fn an_in_process_attempt_stays_small() {
        let h = handler(|_: StepContext<()>| async { Ok(()) });
        let fut = run_command(&h, cmd(Payload::nil(), None));
        assert!(std::mem::size_of_val(&*fut) <= 48, "{}", std::mem::size_of_val(&*fut));
    }

    #[test]
    fn the_budget_is_the_nearer_of_timeout_and_deadline() {
        let now = orchestrix_proto::time::unix_ms(std::time::SystemTime::now());
        assert_eq!(budget(None, None), None);
        let (b, why) = budget(Some(Duration::from_secs(1)), None).unwrap();
        assert_eq!((b, why.as_str()), (Duration::from_secs(1), "step timed out after 1s"));
        let (b, why) = budget(Some(Duration::from_secs(60)), Some(now + 2_000)).unwrap();
        assert!(b <= Duration::from_secs(2) && b > Duration::from_secs(1));
        assert!(why.contains("run's deadline"), "{why}");
        // The deadline set from the timeout itself: the timeout is named.
        let (b, why) = budget(Some(Duration::from_secs(2)), Some(now + 1_990)).unwrap();
        assert!(b <= Duration::from_secs(2));
        assert_eq!(why, "step timed out after 2s");
        assert_eq!(budget(None, Some(now.saturating_sub(5))).unwrap().0, Duration::ZERO);
    }
}

/// How an attempt's cancellation behaves where a handler can see it, in
/// process (`run_command`) and on a worker (`run_command_with`).
#[cfg(test)]
mod cancellation_tests {
    use std::sync::atomic::{AtomicBool, Ordering::SeqCst};

    use super::*;

    fn cmd(timeout: Option<Duration>) -> StepCommand {
        super::tests::cmd(Payload::nil(), timeout)
    }

    /// A handler that hands its whole context to a task of its own, which
    /// looks at it only after the attempt is over (`late` = ask for the
    /// token only then; else only poll `is_cancelled`).
    fn keeps_ctx(late_token: bool) -> (BoxedHandler, Arc<AtomicBool>) {
        let seen = Arc::new(AtomicBool::new(false));
        let s = seen.clone();
        let h = handler(move |ctx: StepContext<()>| {
            let s = s.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(2)).await; // after the attempt ended
                let cancelled = if late_token {
                    tokio::time::timeout(Duration::from_secs(5), ctx.cancellation().cancelled())
                        .await
                        .is_ok()
                } else {
                    ctx.is_cancelled()
                };
                s.store(cancelled, SeqCst);
            });
            async move {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                Ok(())
            }
        });
        (h, seen)
    }

    /// The NATS path (a caller's token) as the reference.
    #[tokio::test(start_paused = true)]
    async fn on_a_worker_a_context_kept_past_the_attempt_reads_cancelled() {
        for late in [true, false] {
            let (h, seen) = keeps_ctx(late);
            let stop = CancellationToken::new();
            let mut fut = run_command_with(&h, cmd(None), stop.clone());
            assert!(futures::poll!(&mut fut).is_pending());
            stop.cancel();
            drop(fut);
            tokio::time::sleep(Duration::from_secs(10)).await;
            assert!(seen.load(SeqCst), "late={late}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_in_process_attempt_leaves_its_kept_context_cancelled() {
        for late in [true, false] {
            let (h, seen) = keeps_ctx(late);
            let mut fut = run_command(&h, cmd(None));
            assert!(futures::poll!(&mut fut).is_pending());
            drop(fut); // the run was cancelled
            tokio::time::sleep(Duration::from_secs(10)).await;
            assert!(
                seen.load(SeqCst),
                "late={late}: the attempt was dropped, but the context says not cancelled"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_timed_out_in_process_attempt_leaves_its_kept_context_cancelled() {
        for late in [true, false] {
            let (h, seen) = keeps_ctx(late);
            let out = run_command(&h, cmd(Some(Duration::from_secs(1)))).await;
            assert!(matches!(out, OutcomeResult::Failed(_)), "{out:?}");
            tokio::time::sleep(Duration::from_secs(10)).await;
            assert!(
                seen.load(SeqCst),
                "late={late}: the attempt timed out, but the context says not cancelled"
            );
        }
    }

    /// A handler that cancels its own token (to stop helpers) and then
    /// finishes: the attempt ends there, as a maybe-done failure, wherever
    /// the step runs.
    #[tokio::test(start_paused = true)]
    async fn a_handler_that_cancels_its_own_token_ends_its_attempt_on_both_paths() {
        let h = handler(|ctx: StepContext<()>| async move {
            ctx.cancellation().cancel();
            tokio::time::sleep(Duration::from_millis(10)).await;
            Ok(())
        });
        for timeout in [None, Some(Duration::from_secs(5))] {
            let local = run_command(&h, cmd(timeout)).await;
            let remote = run_command_with(&h, cmd(timeout), CancellationToken::new()).await;
            for out in [local, remote] {
                let OutcomeResult::Failed(f) = out else { panic!("timeout {timeout:?}: {out:?}") };
                assert!(f.maybe_done && f.message.contains("cancelled"), "{f:?}");
            }
        }
    }

    /// A handler that panics after handing its cancellation to a helper.
    #[tokio::test(start_paused = true)]
    async fn a_panicking_handler_tells_its_helpers() {
        let seen = Arc::new(AtomicBool::new(false));
        let s = seen.clone();
        let h = handler(move |ctx: StepContext<()>| {
            let (s, stop) = (s.clone(), ctx.cancellation());
            tokio::spawn(async move {
                stop.cancelled().await;
                s.store(true, SeqCst);
            });
            async move {
                tokio::time::sleep(Duration::from_millis(10)).await;
                if true {
                    panic!("boom");
                }
                Ok(())
            }
        });
        let out = run_command(&h, cmd(None)).await;
        assert!(matches!(out, OutcomeResult::Failed(_)), "{out:?}");
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(seen.load(SeqCst), "the helper of a panicked attempt was never told");
    }
}
