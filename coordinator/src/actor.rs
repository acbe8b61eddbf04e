//! One actix actor per run: owns the run's [`Machine`], persists each batch of
//! transitions, then acts on it (send commands, arm timers, call hooks).

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use actix::{
    Actor, ActorContext, ActorFutureExt, AsyncContext, Context, Handler, Message, SpawnHandle,
    WrapFuture,
};
use orchestrix_proto::{CommandKind, OutcomeResult, RunReport, StepCommand, StepFailure};
use tokio::sync::oneshot;
use tokio::time::Instant;
use tracing::{error, warn};
use uuid::Uuid;

use crate::bus::{Bus, BusReply, Dispatched, Liveness, ReplyTo};
use crate::machine::{Event, Machine};
use crate::record::Transition;
use crate::store::{Pending, Store, StoreError};
use crate::telemetry::RunSpans;
use crate::{Hooks, StepEvent};

pub(crate) struct RunActor {
    machine: Machine,
    bus: Arc<dyn Bus>,
    liveness: Liveness,
    /// Liveness timers of the attempt in flight (remote buses only).
    timers: AttemptTimers,
    store: Arc<dyn Store>,
    /// Boxed so the channel a parked run holds stays small.
    done: Option<oneshot::Sender<Box<RunReport>>>,
    /// Taken over from the store rather than started here.
    resumed: bool,
    /// Open spans, when tracing is on.
    spans: Option<Box<RunSpans>>,
}

/// An event the actor sends itself, so that handling never re-enters.
#[derive(Message)]
#[rtype(result = "()")]
struct Internal(Event);

impl RunActor {
    pub(crate) fn new(
        machine: Machine,
        bus: Arc<dyn Bus>,
        store: Arc<dyn Store>,
        done: oneshot::Sender<Box<RunReport>>,
        resumed: bool,
    ) -> Self {
        let liveness = bus.liveness();
        RunActor {
            machine,
            bus,
            liveness,
            timers: AttemptTimers::default(),
            store,
            done: Some(done),
            resumed,
            spans: None,
        }
    }

    fn run_id(&self) -> Uuid {
        self.machine.rec.run_id
    }

    fn handle_event(&mut self, event: Event, ctx: &mut Context<Self>) {
        // Allocated per event rather than kept: a parked run holds no buffer.
        let mut batch = Vec::new();
        self.machine.handle(event, Instant::now(), SystemTime::now(), &mut batch);
        if batch.is_empty() {
            return;
        }
        self.persist(batch, 0, ctx);
    }

    /// Writes the batch, then acts on it. Nothing else is handled meanwhile, so
    /// the store always holds a transition before its consequences happen.
    fn persist(&mut self, batch: Vec<Transition>, failures: u32, ctx: &mut Context<Self>) {
        match self.store.apply(self.run_id(), &batch, &self.machine.rec) {
            Pending::Ready(Ok(())) => self.act(batch, ctx),
            Pending::Ready(Err(e)) => self.persist_failed(e, batch, failures, ctx),
            Pending::Later(fut) => {
                ctx.wait(fut.into_actor(self).map(move |res, act, ctx| match res {
                    Ok(()) => act.act(batch, ctx),
                    Err(e) => act.persist_failed(e, batch, failures, ctx),
                }));
            }
        }
    }

    fn persist_failed(
        &mut self,
        e: StoreError,
        batch: Vec<Transition>,
        failures: u32,
        ctx: &mut Context<Self>,
    ) {
        if let StoreError::Fenced(_) = e {
            // Another coordinator took the run over while this one was cut
            // off: it is theirs now; stop without acting on anything.
            warn!(run_id = %self.run_id(), "run taken over by another coordinator; letting go");
            ctx.stop();
            return;
        }
        // The run cannot move on before its state is stored: wait and write again.
        let delay = std::time::Duration::from_millis(50 << failures.min(6));
        warn!(run_id = %self.run_id(), error = %e, retry_in = ?delay, "cannot store the run's transition");
        ctx.wait(
            tokio::time::sleep(delay)
                .into_actor(self)
                .map(move |(), act, ctx| act.persist(batch, failures + 1, ctx)),
        );
    }

    fn act(&mut self, batch: Vec<Transition>, ctx: &mut Context<Self>) {
        // Whatever happened, the attempt being watched is over or replaced.
        self.timers.cancel(ctx);
        for t in &batch {
            self.act_on(t, ctx);
        }
    }

    fn act_on(&mut self, t: &Transition, ctx: &mut Context<Self>) {
        match t {
            Transition::AttemptStarted { step, kind, attempt, command_id, .. } => {
                let cmd = self.command(*step, *kind, *attempt, *command_id);
                let remote = self.liveness != Liveness::Local;
                if let Some(s) = &mut self.spans {
                    s.attempt_started(&cmd.step, *kind, *attempt, remote);
                }
                self.hook(*step, *kind, *attempt, |h, e| match kind {
                    CommandKind::Execute => h.on_step_start(e),
                    CommandKind::Compensate if e.attempt == 1 => h.on_compensation_start(e),
                    CommandKind::Compensate => {}
                });
                self.send(cmd, ctx);
            }
            Transition::RetryScheduled { step, kind, error, retry } => {
                let (attempt, command_id) = match &self.machine.rec.current {
                    Some(c) => (c.attempt, c.command_id),
                    None => return,
                };
                if let Some(s) = &mut self.spans {
                    s.attempt_ended(Some(error));
                    let name = &self.machine.plan.def.steps[*step as usize].name;
                    s.retry(name, attempt, retry.delay.as_millis() as u64);
                }
                self.hook(*step, *kind, attempt, |h, e| h.on_step_retry(e, error, retry.delay));
                ctx.notify_later(Internal(Event::RetryDue { command_id }), retry.delay);
            }
            Transition::StepCompleted { step, duration, .. } => {
                if let Some(s) = &mut self.spans {
                    s.attempt_ended(None);
                }
                let attempt = self.attempts(*step);
                self.hook(*step, CommandKind::Execute, attempt, |h, e| {
                    h.on_step_success(e, *duration)
                });
            }
            Transition::StepFailed { step, error, .. } => {
                if let Some(s) = &mut self.spans {
                    s.attempt_ended(Some(error));
                }
                let attempt = self.attempts(*step);
                self.hook(*step, CommandKind::Execute, attempt, |h, e| h.on_step_failure(e, error));
            }
            Transition::CompensationCompleted { step, duration } => {
                if let Some(s) = &mut self.spans {
                    s.attempt_ended(None);
                }
                let attempt = self.compensation_attempts(*step);
                self.hook(*step, CommandKind::Compensate, attempt, |h, e| {
                    h.on_compensation_success(e, *duration)
                });
            }
            Transition::CompensationFailed { step, error, .. } => {
                if let Some(s) = &mut self.spans {
                    s.attempt_ended(Some(error));
                }
                let attempt = self.compensation_attempts(*step);
                self.hook(*step, CommandKind::Compensate, attempt, |h, e| {
                    h.on_compensation_failure(e, error)
                });
            }
            Transition::Finished { duration, .. } => {
                self.bus.run_finished(self.run_id());
                let report = self.machine.rec.to_report(*duration);
                if let Some(s) = self.spans.take() {
                    (*s).finished(&report);
                }
                for h in &self.machine.plan.hooks {
                    guard(|| h.on_run_end(&report));
                }
                if let Some(done) = self.done.take() {
                    let _ = done.send(Box::new(report));
                }
                ctx.stop();
            }
        }
    }

    /// Sends an attempt's command and watches it.
    fn send(&mut self, cmd: StepCommand, ctx: &mut Context<Self>) {
        let (command_id, step, step_timeout) = (cmd.command_id, cmd.step_index, cmd.timeout);
        // Inside the attempt's span, so the bus can carry its context along.
        let entered = self.spans.as_ref().and_then(|s| s.attempt()).map(|s| s.clone().entered());
        let dispatched = self.bus.dispatch(cmd, &ReplyTo(ctx.address()));
        drop(entered);
        match dispatched {
            Ok(Dispatched::Sent) => self.watch_attempt(command_id, step, step_timeout, ctx),
            Ok(Dispatched::Local(outcome)) => {
                ctx.spawn(outcome.into_actor(self).map(move |result, act, ctx| {
                    act.handle_event(Event::Outcome { command_id, result }, ctx)
                }));
            }
            Err(e) => {
                let failure = StepFailure { message: e.to_string(), retryable: e.is_retryable() };
                let result = OutcomeResult::Failed(failure);
                ctx.notify(Internal(Event::Outcome { command_id, result }));
            }
        }
    }

    /// Picks a run up where its record says it stands (after a coordinator
    /// restart): the attempt in flight is sent again with the same command id,
    /// so a worker that already ran it answers from its cache; a scheduled
    /// retry waits out what is left of its delay.
    fn resume(&mut self, ctx: &mut Context<Self>) {
        match self.machine.rec.current.clone() {
            Some(c) if c.retry_at.is_none() => {
                let cmd = self.command(c.step, c.kind, c.attempt, c.command_id);
                self.send(cmd, ctx);
            }
            Some(c) => {
                let at = c.retry_at.map(|r| r.at).unwrap_or_else(SystemTime::now);
                let left = at.duration_since(SystemTime::now()).unwrap_or_default();
                ctx.notify_later(Internal(Event::RetryDue { command_id: c.command_id }), left);
            }
            None => self.handle_event(Event::Start, ctx),
        }
    }

    fn attempts(&self, step: u32) -> u32 {
        self.machine.rec.steps[step as usize].attempts
    }

    fn compensation_attempts(&self, step: u32) -> u32 {
        self.machine.rec.steps[step as usize].compensation.as_ref().map_or(0, |c| c.attempts)
    }

    fn command(&self, step: u32, kind: CommandKind, attempt: u32, command_id: Uuid) -> StepCommand {
        let def = &self.machine.plan.def;
        let sdef = &def.steps[step as usize];
        StepCommand {
            command_id,
            run_id: self.run_id(),
            flow: def.name.clone(),
            step: sdef.name.clone(),
            step_index: step,
            kind,
            attempt,
            input: self.machine.rec.input.clone(),
            outputs: self.machine.outputs_for(step as usize, kind),
            timeout: match kind {
                CommandKind::Execute => sdef.timeout,
                CommandKind::Compensate => sdef.compensation_timeout,
            },
        }
    }

    fn hook(
        &self,
        step: u32,
        kind: CommandKind,
        attempt: u32,
        call: impl Fn(&dyn Hooks, &StepEvent<'_>),
    ) {
        let plan = &self.machine.plan;
        if plan.hooks.is_empty() {
            return;
        }
        let event = StepEvent {
            run_id: self.run_id(),
            flow: &plan.def.name,
            step: &plan.def.steps[step as usize].name,
            kind,
            attempt,
        };
        for h in &plan.hooks {
            guard(|| call(h.as_ref(), &event));
        }
    }
}

/// Runs a hook; a panic in user code is logged, never allowed to stop the run.
fn guard(f: impl FnOnce()) {
    if std::panic::catch_unwind(AssertUnwindSafe(f)).is_err() {
        error!("a hook panicked; the run goes on");
    }
}

impl Actor for RunActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        let (run_id, flow) = (self.run_id(), self.machine.rec.flow.clone());
        self.spans = RunSpans::start(run_id, &flow, self.machine.rec.traceparent.as_deref());
        for h in &self.machine.plan.hooks {
            guard(|| h.on_run_start(run_id, &flow));
        }
        if let Some(timeout) = self.machine.rec.timeout {
            let left = timeout.saturating_sub(self.machine.run_started.elapsed());
            ctx.notify_later(Internal(Event::DeadlineExceeded), left);
        }
        if self.resumed {
            self.resume(ctx);
        } else {
            self.handle_event(Event::Start, ctx);
        }
    }
}

impl Handler<BusReply> for RunActor {
    type Result = ();

    fn handle(&mut self, reply: BusReply, ctx: &mut Context<Self>) {
        match reply {
            BusReply::Outcome(o) => {
                if o.run_id != self.run_id() {
                    warn!(run_id = %self.run_id(), other = %o.run_id, "outcome for another run ignored");
                    return;
                }
                self.handle_event(
                    Event::Outcome { command_id: o.command_id, result: o.result },
                    ctx,
                );
            }
            BusReply::Ack(a) => self.alive(a.command_id, &a.worker, ctx),
            BusReply::Heartbeat(h) => self.alive(h.command_id, &h.worker, ctx),
        }
    }
}

/// Timers that declare the attempt in flight lost.
#[derive(Default)]
struct AttemptTimers {
    command_id: Option<Uuid>,
    ack: Option<SpawnHandle>,
    silence: Option<SpawnHandle>,
    deadline: Option<SpawnHandle>,
}

impl AttemptTimers {
    fn cancel(&mut self, ctx: &mut Context<RunActor>) {
        for h in [self.ack.take(), self.silence.take(), self.deadline.take()].into_iter().flatten()
        {
            ctx.cancel_future(h);
        }
        self.command_id = None;
    }
}

fn lost_after(
    ctx: &mut Context<RunActor>,
    after: Duration,
    command_id: Uuid,
    reason: String,
) -> SpawnHandle {
    ctx.notify_later(Internal(Event::AttemptLost { command_id, reason }), after)
}

impl RunActor {
    /// Arms the ack and deadline timers of an attempt sent to a remote worker.
    fn watch_attempt(
        &mut self,
        command_id: Uuid,
        step: u32,
        timeout: Option<Duration>,
        ctx: &mut Context<Self>,
    ) {
        let Liveness::Remote { ack_timeout, timeout_grace, .. } = self.liveness else { return };
        let def = &self.machine.plan.def;
        let step_name = def.steps[step as usize].name.clone();
        let reason = format!(
            "no worker took the command within {ack_timeout:?}: is a worker serving step `{step_name}` of flow `{}` running?",
            def.name
        );
        self.timers.command_id = Some(command_id);
        self.timers.ack = Some(lost_after(ctx, ack_timeout, command_id, reason));
        if let Some(t) = timeout {
            let reason = format!("step timed out after {t:?} (no outcome from its worker)");
            self.timers.deadline = Some(lost_after(ctx, t + timeout_grace, command_id, reason));
        }
    }

    /// An ack or heartbeat: the worker has the command; restart the silence timer.
    fn alive(&mut self, command_id: Uuid, worker: &str, ctx: &mut Context<Self>) {
        let Liveness::Remote { heartbeat_timeout, .. } = self.liveness else { return };
        if self.timers.command_id != Some(command_id) {
            return; // an older attempt's worker
        }
        for h in [self.timers.ack.take(), self.timers.silence.take()].into_iter().flatten() {
            ctx.cancel_future(h);
        }
        let reason = format!("worker {worker} went silent: no heartbeat for {heartbeat_timeout:?}");
        self.timers.silence = Some(lost_after(ctx, heartbeat_timeout, command_id, reason));
    }
}

impl Handler<Internal> for RunActor {
    type Result = ();

    fn handle(&mut self, Internal(event): Internal, ctx: &mut Context<Self>) {
        self.handle_event(event, ctx);
    }
}
