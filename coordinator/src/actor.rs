//! One actix actor per run: owns the run's [`Machine`], persists each batch of
//! transitions, then acts on it (send commands, arm timers, call hooks).

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::SystemTime;

use actix::{
    Actor, ActorContext, ActorFutureExt, AsyncContext, Context, Handler, Message, WrapFuture,
};
use orchestrix_proto::{CommandKind, RunReport, StepCommand};
use tokio::sync::oneshot;
use tokio::time::Instant;
use tracing::{error, warn};
use uuid::Uuid;

use crate::bus::{Bus, BusReply, Dispatched, ReplyTo};
use crate::machine::{Event, Machine};
use crate::record::Transition;
use crate::store::{Pending, Store, StoreError};
use crate::{Hooks, StepEvent};

pub(crate) struct RunActor {
    machine: Machine,
    bus: Arc<dyn Bus>,
    store: Arc<dyn Store>,
    /// Boxed so the channel a parked run holds stays small.
    done: Option<oneshot::Sender<Box<RunReport>>>,
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
    ) -> Self {
        RunActor { machine, bus, store, done: Some(done) }
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
        for t in &batch {
            self.act_on(t, ctx);
        }
    }

    fn act_on(&mut self, t: &Transition, ctx: &mut Context<Self>) {
        match t {
            Transition::AttemptStarted { step, kind, attempt, command_id, .. } => {
                let cmd = self.command(*step, *kind, *attempt, *command_id);
                self.hook(*step, *kind, *attempt, |h, e| match kind {
                    CommandKind::Execute => h.on_step_start(e),
                    CommandKind::Compensate if e.attempt == 1 => h.on_compensation_start(e),
                    CommandKind::Compensate => {}
                });
                let command_id = *command_id;
                match self.bus.dispatch(cmd, &ReplyTo(ctx.address())) {
                    Ok(Dispatched::Sent) => {}
                    Ok(Dispatched::Local(outcome)) => {
                        ctx.spawn(outcome.into_actor(self).map(move |result, act, ctx| {
                            act.handle_event(Event::Outcome { command_id, result }, ctx)
                        }));
                    }
                    Err(e) => {
                        let reason = e.to_string();
                        ctx.notify(Internal(Event::AttemptLost { command_id, reason }));
                    }
                }
            }
            Transition::RetryScheduled { step, kind, error, retry } => {
                let (attempt, command_id) = match &self.machine.rec.current {
                    Some(c) => (c.attempt, c.command_id),
                    None => return,
                };
                self.hook(*step, *kind, attempt, |h, e| h.on_step_retry(e, error, retry.delay));
                ctx.notify_later(Internal(Event::RetryDue { command_id }), retry.delay);
            }
            Transition::StepCompleted { step, duration, .. } => {
                let attempt = self.attempts(*step);
                self.hook(*step, CommandKind::Execute, attempt, |h, e| {
                    h.on_step_success(e, *duration)
                });
            }
            Transition::StepFailed { step, error, .. } => {
                let attempt = self.attempts(*step);
                self.hook(*step, CommandKind::Execute, attempt, |h, e| h.on_step_failure(e, error));
            }
            Transition::CompensationCompleted { step, duration } => {
                let attempt = self.compensation_attempts(*step);
                self.hook(*step, CommandKind::Compensate, attempt, |h, e| {
                    h.on_compensation_success(e, *duration)
                });
            }
            Transition::CompensationFailed { step, error, .. } => {
                let attempt = self.compensation_attempts(*step);
                self.hook(*step, CommandKind::Compensate, attempt, |h, e| {
                    h.on_compensation_failure(e, error)
                });
            }
            Transition::Finished { duration, .. } => {
                let report = self.machine.rec.to_report(*duration);
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
        for h in &self.machine.plan.hooks {
            guard(|| h.on_run_start(run_id, &flow));
        }
        if let Some(timeout) = self.machine.rec.timeout {
            ctx.notify_later(Internal(Event::DeadlineExceeded), timeout);
        }
        self.handle_event(Event::Start, ctx);
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
            // Acks and heartbeats only matter to buses that track liveness.
            BusReply::Ack(_) | BusReply::Heartbeat(_) => {}
        }
    }
}

impl Handler<Internal> for RunActor {
    type Result = ();

    fn handle(&mut self, Internal(event): Internal, ctx: &mut Context<Self>) {
        self.handle_event(event, ctx);
    }
}
