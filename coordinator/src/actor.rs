//! One actix actor per run: hands each event to the run's [`Machine`], stores
//! the transitions it decides, then carries out the effects it asks for
//! (send a command, arm or drop a timer, notify observers, finish). The actor
//! decides nothing about the saga itself.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use actix::{
    Actor, ActorContext, ActorFutureExt, AsyncContext, Context, Handler, Message, SpawnHandle,
    WrapFuture,
};
use orchestrix_proto::{CommandKind, RunReport, StepCommand};
use tokio::sync::oneshot;
use tokio::time::Instant;
use tracing::{error, warn};
use uuid::Uuid;

use crate::bus::{Bus, BusReply, Dispatched, Liveness, ReplyTo};
use crate::machine::{Decision, Effect, Event, Limits, Machine, Notice};
use crate::record::Transition;
use crate::store::{Pending, Store, StoreError};
use crate::telemetry::{self, RunSpans};
use crate::{Hooks, StepEvent};

/// How long a caller's handle follows a run that another coordinator took
/// over (through the store) before it reports the run lost.
const FOLLOW_TAKEOVER: Duration = Duration::from_secs(600);

/// Kept small: a parked run is mostly its actor (see "Memory" in
/// `docs/benchmarks.md`). What all runs share is behind one pointer, what
/// few runs use is boxed, and the per-command lists are vectors (a run has
/// one command in flight, or a few).
pub(crate) struct RunActor {
    machine: Machine,
    /// The bus, the store and the live-run index.
    parts: Arc<RunParts>,
    /// Liveness timers of the attempts in flight, by command (remote buses only).
    timers: ByCommand<AttemptTimers>,
    /// The in-process handlers running now, by command, to drop on a cancel.
    local: ByCommand<SpawnHandle>,
    /// Boxed so the channel a parked run holds stays small; dropped once
    /// nobody waits on it.
    done: Option<oneshot::Sender<Box<RunReport>>>,
    /// Taken over from the store rather than started here.
    resumed: bool,
    /// An ack is applied to the record but not yet written (see `ACK_WRITE_DELAY`).
    ack_unsaved: bool,
    /// Open spans, when tracing is on.
    spans: Option<Box<RunSpans>>,
    /// How the actor starts, when it neither takes the run's first decision
    /// itself nor resumes the run: boxed, and dropped once carried out.
    opening: Option<Box<Opening>>,
}

enum Opening {
    /// The first decision of a new run, taken before the run was written
    /// and stored with it (see [`Machine::start_decision`]): carried out
    /// when the actor starts.
    Begun(Decision),
    /// Started to resume a failed rollback: the operator's action, then
    /// who is told once the reopened run's first transition is stored.
    Reopen {
        action: Option<orchestrix_proto::OperatorAction>,
        written: Option<oneshot::Sender<()>>,
    },
}

/// What every run actor of a coordinator shares.
pub(crate) struct RunParts {
    pub(crate) bus: Arc<dyn Bus>,
    pub(crate) store: Arc<dyn Store>,
    /// Where operators find the runs live here.
    pub(crate) live: LiveRuns,
    /// The bus's liveness and the payload limit.
    pub(crate) limits: Arc<Limits>,
}

impl RunParts {
    pub(crate) fn new(bus: Arc<dyn Bus>, store: Arc<dyn Store>, live: LiveRuns) -> Arc<Self> {
        let limits = Arc::new(Limits { liveness: bus.liveness(), ..Limits::default() });
        Arc::new(RunParts { bus, store, live, limits })
    }
}

/// A small map by command: a run has one command in flight, or a few, so a
/// vector (grown one at a time) is smaller than a hash map and as quick.
struct ByCommand<T>(Vec<(Uuid, T)>);

impl<T> Default for ByCommand<T> {
    fn default() -> Self {
        ByCommand(Vec::new())
    }
}

impl<T> ByCommand<T> {
    /// The entry of `id`, made with `make` if missing.
    fn entry(&mut self, id: Uuid, make: impl FnOnce() -> T) -> &mut T {
        let i = match self.0.iter().position(|(k, _)| *k == id) {
            Some(i) => i,
            None => {
                self.0.reserve_exact(1);
                self.0.push((id, make()));
                self.0.len() - 1
            }
        };
        &mut self.0[i].1
    }

    /// The entry of `id`, if any.
    fn get_mut(&mut self, id: Uuid) -> Option<&mut T> {
        self.0.iter_mut().find(|(k, _)| *k == id).map(|(_, v)| v)
    }

    /// Takes the entry of `id` out, if any.
    fn remove(&mut self, id: Uuid) -> Option<T> {
        let i = self.0.iter().position(|(k, _)| *k == id)?;
        let (_, v) = self.0.swap_remove(i);
        if self.0.is_empty() {
            self.0 = Vec::new();
        }
        Some(v)
    }
}

/// An operator's action for a live run; answered once checked (the action
/// itself is stored and carried out like any event).
#[derive(Message)]
#[rtype(result = "Result<(), String>")]
pub(crate) struct Control(pub(crate) orchestrix_proto::OperatorAction);

/// The runs live in this process, by id: where operators' actions go. Weak
/// addresses (a strong one costs a run two allocations): what keeps an actor
/// alive while its run waits with nothing under way is its own keep-alive
/// (see `started`).
#[derive(Clone, Default)]
pub(crate) struct LiveRuns(
    Arc<std::sync::Mutex<std::collections::HashMap<Uuid, actix::WeakAddr<RunActor>>>>,
);

/// The store no longer holds the run for this actor (see
/// [`crate::store::ActorsHere::let_go`]).
#[derive(Message)]
#[rtype(result = "()")]
struct LetGo;

impl crate::store::ActorsHere for LiveRuns {
    fn is_live(&self, run_id: Uuid) -> bool {
        self.lock().get(&run_id).is_some_and(|a| a.upgrade().is_some())
    }

    fn let_go(&self, run_id: Uuid) {
        if let Some(actor) = self.lock().get(&run_id).and_then(actix::WeakAddr::upgrade) {
            actor.do_send(LetGo);
        }
    }
}

impl LiveRuns {
    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<Uuid, actix::WeakAddr<RunActor>>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The run's actor, if the run is live here.
    pub(crate) fn get(&self, run_id: Uuid) -> Option<actix::Recipient<Control>> {
        self.lock().get(&run_id).and_then(actix::WeakAddr::upgrade).map(|a| a.recipient())
    }
}

/// How long an ack may stay unwritten, waiting to go with the attempt's
/// outcome. Bounds the window in which a coordinator and the worker that
/// acked dying together lets a takeover send the attempt again.
const ACK_WRITE_DELAY: Duration = Duration::from_millis(50);

/// Longest wait for one store write before it is tried again.
const STORE_TIMEOUT: Duration = Duration::from_secs(10);

/// An event the actor sends itself, so that handling never re-enters.
#[derive(Message)]
#[rtype(result = "()")]
struct Internal(Event);

impl RunActor {
    pub(crate) fn new(
        machine: Machine,
        parts: Arc<RunParts>,
        done: oneshot::Sender<Box<RunReport>>,
        resumed: bool,
    ) -> Self {
        RunActor {
            machine,
            parts,
            timers: ByCommand::default(),
            local: ByCommand::default(),
            done: Some(done),
            resumed,
            ack_unsaved: false,
            spans: None,
            opening: None,
        }
    }

    /// The actor starts by resuming the failed rollback of a finished run.
    pub(crate) fn reopening(
        mut self,
        action: orchestrix_proto::OperatorAction,
        written: oneshot::Sender<()>,
    ) -> Self {
        self.opening =
            Some(Box::new(Opening::Reopen { action: Some(action), written: Some(written) }));
        self
    }

    /// The run's first decision was taken before the run was created, and
    /// the record created holds it (see [`Machine::start_decision`]).
    pub(crate) fn begun(mut self, decision: Decision) -> Self {
        self.opening = Some(Box::new(Opening::Begun(decision)));
        self
    }

    /// A batch was stored.
    fn stored(&mut self, effects: Vec<Effect>, ctx: &mut Context<Self>) {
        if let Some(Opening::Reopen { written, .. }) = self.opening.as_deref_mut()
            && let Some(tx) = written.take()
        {
            let _ = tx.send(());
            self.opening = None;
        }
        self.carry_out(effects, ctx);
    }

    fn run_id(&self) -> Uuid {
        self.machine.rec.run_id
    }

    fn handle_event(&mut self, event: Event, ctx: &mut Context<Self>) {
        // Nobody waits for the report any more (the caller let go of its
        // handle): the channel need not be kept.
        if self.done.as_ref().is_some_and(oneshot::Sender::is_closed) {
            self.done = None;
        }
        if !matches!(event, Event::Heartbeat { .. }) {
            tracing::trace!(run_id = %self.run_id(), ?event, "event");
        }
        // Allocated per event rather than kept: a parked run holds no buffer.
        let mut decision = Decision::default();
        self.machine.handle(event, Instant::now(), SystemTime::now(), &mut decision);
        if decision.transitions.is_empty() {
            self.carry_out(decision.effects, ctx);
            return;
        }
        if decision.can_wait_to_be_written() {
            // Written with the next batch (the store keeps whole records), or
            // on its own after a short delay when the step takes longer: one
            // write less for every quick step.
            let Decision { transitions, effects } = decision;
            self.carry_out(effects, ctx);
            if !self.ack_unsaved {
                self.ack_unsaved = true;
                ctx.run_later(ACK_WRITE_DELAY, move |act, ctx| {
                    if act.ack_unsaved && !act.machine.is_finished() {
                        act.persist(transitions, Vec::new(), 0, ctx);
                    }
                });
            }
            return;
        }
        self.persist(decision.transitions, decision.effects, 0, ctx);
    }

    /// Writes the batch, then carries out its effects. Nothing else is handled
    /// meanwhile, so the store always holds a transition before its
    /// consequences happen.
    fn persist(
        &mut self,
        batch: Vec<Transition>,
        effects: Vec<Effect>,
        failures: u32,
        ctx: &mut Context<Self>,
    ) {
        // The whole record is written: any ack applied so far goes with it.
        self.ack_unsaved = false;
        match self.parts.store.apply(self.run_id(), &batch, &self.machine.rec) {
            Pending::Ready(Ok(())) => self.stored(effects, ctx),
            Pending::Ready(Err(e)) => self.persist_failed(e, batch, effects, failures, ctx),
            Pending::Later(fut) => {
                // A store that never answers must not wedge the run: give up
                // on this write and write again (the store recognises a write
                // of its own that landed meanwhile).
                let bounded = tokio::time::timeout(STORE_TIMEOUT, fut);
                ctx.wait(bounded.into_actor(self).map(move |res, act, ctx| match res {
                    Ok(Ok(())) => act.stored(effects, ctx),
                    Ok(Err(e)) => act.persist_failed(e, batch, effects, failures, ctx),
                    Err(_) => {
                        let e = StoreError::Unavailable(format!(
                            "no answer from the store within {STORE_TIMEOUT:?}"
                        ));
                        act.persist_failed(e, batch, effects, failures, ctx)
                    }
                }));
            }
        }
    }

    fn persist_failed(
        &mut self,
        e: StoreError,
        batch: Vec<Transition>,
        effects: Vec<Effect>,
        failures: u32,
        ctx: &mut Context<Self>,
    ) {
        if let StoreError::Fenced(_) = e {
            // Another coordinator took the run over while this one was cut
            // off: it is theirs now; stop without acting on anything.
            warn!(run_id = %self.run_id(), "run taken over by another coordinator; letting go");
            self.let_go(ctx);
            return;
        }
        if e.is_permanent() {
            self.store_refused(e, ctx);
            return;
        }
        // The run cannot move on before its state is stored: wait and write again.
        let delay = Duration::from_millis(50 << failures.min(6));
        warn!(run_id = %self.run_id(), error = %e, retry_in = ?delay, "cannot store the run's transition");
        ctx.wait(
            tokio::time::sleep(delay)
                .into_actor(self)
                .map(move |(), act, ctx| act.persist(batch, effects, failures + 1, ctx)),
        );
    }

    /// Stops without acting on anything more: the run is not this actor's
    /// any more (taken over, or to be resumed afresh by this coordinator).
    fn let_go(&mut self, ctx: &mut Context<Self>) {
        // Whoever waits for the run's report here gets it from the store
        // once whoever drives the run now ends it: the run is not lost, only
        // moved. The store may be failing over too: asked again for a while.
        if let Some(done) = self.done.take() {
            let (store, run_id) = (self.parts.store.clone(), self.run_id());
            actix::spawn(async move {
                let give_up = Instant::now() + FOLLOW_TAKEOVER;
                let mut pause = Duration::from_millis(100);
                while !done.is_closed() {
                    match store.wait(run_id).await {
                        Ok(report) => {
                            let _ = done.send(Box::new(report));
                            return;
                        }
                        Err(e) if e.is_permanent() || Instant::now() > give_up => return,
                        Err(_) => tokio::time::sleep(pause).await,
                    }
                    pause = (pause * 2).min(Duration::from_secs(2));
                }
            });
        }
        ctx.stop();
    }

    /// The store refused the run's state for good (too large, say): retrying
    /// cannot help. The run ends here, set aside in the store with the reason
    /// (never a loop), and its waiters get a report saying so.
    fn store_refused(&mut self, e: StoreError, ctx: &mut Context<Self>) {
        let reason = format!("the run's state cannot be stored: {e}");
        error!(run_id = %self.run_id(), %reason, "quarantining the run");
        let report = self.machine.rec.quarantined_report(reason.clone());
        let quarantine = self.parts.store.quarantine(&self.machine.rec, reason);
        ctx.wait(quarantine.into_actor(self).map(move |res, act, ctx| {
            if let Err(e) = res {
                error!(run_id = %act.run_id(), error = %e, "cannot quarantine the run");
            }
            act.parts.bus.run_finished(act.run_id());
            if let Some(done) = act.done.take() {
                let _ = done.send(Box::new(report));
            }
            ctx.stop();
        }));
    }

    /// Carries out what the machine decided, in order.
    fn carry_out(&mut self, effects: Vec<Effect>, ctx: &mut Context<Self>) {
        for effect in effects {
            match effect {
                Effect::Send(cmd) => self.send(cmd, ctx),
                Effect::Inquire(cmd) => {
                    let command_id = cmd.command_id;
                    let trace = self.spans.as_ref().map(|s| s.context(cmd.step_index));
                    let reply = ReplyTo::new(ctx.address());
                    let asked =
                        crate::telemetry::sending(trace, || self.parts.bus.inquire(cmd, &reply));
                    if asked.is_err() {
                        ctx.notify(Internal(Event::Unanswered { command_id }));
                    }
                }
                Effect::Watch { command_id, ack, inquiry, deadline } => {
                    let confirms = self.parts.bus.confirms_inquiries();
                    let timers = self.timers.entry(command_id, AttemptTimers::default);
                    timers.cancel(ctx);
                    if inquiry && confirms {
                        // Opened once the inquiry has reached the server
                        // (`BusReply::Reached`).
                        timers.answers_within = Some(ack);
                    } else {
                        let event = if inquiry {
                            Event::Unanswered { command_id }
                        } else {
                            Event::NotTaken { command_id }
                        };
                        timers.ack = Some(ctx.notify_later(Internal(event), ack));
                    }
                    if let Some(after) = deadline {
                        let reason = "no outcome by the attempt's deadline".to_owned();
                        let event = Event::TimedOut { command_id, reason };
                        timers.deadline = Some(ctx.notify_later(Internal(event), after));
                    }
                }
                Effect::Alive { command_id, within } => {
                    let timers = self.timers.entry(command_id, AttemptTimers::default);
                    timers.answers_within = None;
                    for h in [timers.ack.take(), timers.silence.take()].into_iter().flatten() {
                        ctx.cancel_future(h);
                    }
                    let event = Event::Silent { command_id };
                    timers.silence = Some(ctx.notify_later(Internal(event), within));
                }
                Effect::Unwatch { command_id } => {
                    if let Some(mut timers) = self.timers.remove(command_id) {
                        timers.cancel(ctx);
                    }
                }
                Effect::RetryAfter { command_id, delay } => {
                    ctx.notify_later(Internal(Event::RetryDue { command_id }), delay);
                }
                Effect::RunDeadline { after } => {
                    ctx.notify_later(Internal(Event::DeadlineExceeded), after);
                }
                Effect::PauseDeadline { after } => {
                    ctx.notify_later(Internal(Event::PauseExpired), after);
                }
                Effect::Cancel(cmd) => {
                    // In process: the handler's future is dropped. Remote:
                    // every worker of the step is told.
                    if let Some(handle) = self.local.remove(cmd.command_id) {
                        ctx.cancel_future(handle);
                    }
                    if let Err(e) = self.parts.bus.cancel(&cmd) {
                        warn!(run_id = %self.run_id(), error = %e, "cannot tell the workers to stop a cancelled attempt");
                    }
                }
                Effect::Notify(notice) => self.notify(&notice),
                Effect::Acquire { slot, limit } => self.acquire(slot, limit, ctx),
                Effect::AwaitSlot { slot } => self.await_slot(slot, ctx),
                Effect::Release { slot } => {
                    let (run_id, release) =
                        (self.run_id(), self.parts.store.release(&slot, self.run_id()));
                    ctx.spawn(release.into_actor(self).map(move |res, _, _| {
                        // Whatever is not let go now is when the run ends.
                        if let Err(e) = res {
                            warn!(%run_id, %slot, error = %e, "cannot let go of a slot");
                        }
                    }));
                }
                Effect::Finish { duration } => {
                    self.parts.bus.run_finished(self.run_id());
                    let report = self.machine.rec.to_report(duration);
                    if let Some(s) = self.spans.take() {
                        (*s).finished(&report);
                    }
                    for h in &self.machine.plan.hooks {
                        guard(self.run_id(), || h.on_run_end(&report));
                    }
                    if let Some(done) = self.done.take() {
                        let _ = done.send(Box::new(report));
                    }
                    ctx.stop();
                }
            }
        }
    }

    /// Asks the store for a slot; its answer becomes an event. Other events
    /// (a cancel) are handled meanwhile. An unavailable store is asked again.
    fn acquire(&mut self, slot: String, limit: u32, ctx: &mut Context<Self>) {
        let ask = self.parts.store.acquire(&slot, limit, self.run_id());
        ctx.spawn(ask.into_actor(self).map(move |res, act, ctx| match res {
            Ok(grant) => {
                let granted = grant == crate::slots::Grant::Granted;
                act.handle_event(Event::Slot { slot, granted }, ctx);
            }
            Err(e) if e.is_permanent() => act.store_refused(e, ctx),
            Err(e) => {
                warn!(run_id = %act.run_id(), %slot, error = %e, "cannot ask for a slot; asking again");
                ctx.run_later(Duration::from_secs(1), move |act, ctx| act.acquire(slot, limit, ctx));
            }
        }));
    }

    /// Waits for the store to say the slot is held.
    fn await_slot(&mut self, slot: String, ctx: &mut Context<Self>) {
        let wait = self.parts.store.granted(&slot, self.run_id());
        ctx.spawn(wait.into_actor(self).map(move |res, act, ctx| match res {
            Ok(()) => act.handle_event(Event::Slot { slot, granted: true }, ctx),
            // Neither holding nor waiting (the queue was reset): ask again.
            Err(StoreError::NotFound(_)) => {
                let limit = act.slot_limit(&slot);
                act.acquire(slot, limit, ctx)
            }
            Err(e) => {
                warn!(run_id = %act.run_id(), %slot, error = %e, "cannot wait for a slot; waiting again");
                ctx.run_later(Duration::from_secs(1), move |act, ctx| act.await_slot(slot, ctx));
            }
        }));
    }

    /// The limit of one of the run's slots, from its flow.
    fn slot_limit(&self, slot: &str) -> u32 {
        let def = &self.machine.plan.def;
        def.steps
            .iter()
            .find(|s| crate::slots::step_slot(&def.name, &s.name) == slot)
            .and_then(|s| s.max_in_flight)
            .or(def.concurrency_per_key)
            .unwrap_or(1)
    }

    /// Sends an attempt's command (its watch is a separate effect).
    fn send(&mut self, cmd: StepCommand, ctx: &mut Context<Self>) {
        let (command_id, attempt, kind) = (cmd.command_id, cmd.attempt, cmd.kind);
        tracing::trace!(run_id = %self.run_id(), %command_id, step = cmd.step_index, attempt, ?kind, "sending");
        // The bus carries the attempt's trace context along.
        let step = cmd.step_index;
        let trace = self.spans.as_ref().map(|s| s.context(step));
        let reply = ReplyTo::new(ctx.address());
        let dispatched = crate::telemetry::sending(trace, || self.parts.bus.dispatch(cmd, &reply));
        match dispatched {
            Ok(Dispatched::Sent) => {}
            Ok(Dispatched::Local(outcome)) => {
                // In process, the handler's own spans are made under its
                // attempt's (or, in a run left out, under "not sampled").
                let outcome = match trace {
                    Some(cx) => Box::pin(opentelemetry::context::FutureExt::with_context(
                        outcome,
                        cx.clone(),
                    )),
                    None => outcome,
                };
                let handle = ctx.spawn(outcome.into_actor(self).map(move |result, act, ctx| {
                    act.local.remove(command_id);
                    act.handle_event(Event::Outcome { command_id, attempt, kind, result }, ctx)
                }));
                *self.local.entry(command_id, || handle) = handle;
            }
            Err(e) => {
                let (retryable, message) = (e.is_retryable(), e.to_string());
                ctx.notify(Internal(Event::DispatchFailed { command_id, retryable, message }));
            }
        }
    }

    /// The one notification path: spans and hooks (and through hooks, run
    /// events and metrics) all hear the same notice.
    fn notify(&mut self, notice: &Notice) {
        let remote = self.machine.limits.liveness != Liveness::Local;
        let def = |step: u32| self.machine.plan.def.steps.get(step as usize);
        let name = |step: u32| def(step).map(|s| s.name.clone()).unwrap_or_default();
        let group = |step: u32| def(step).and_then(|s| s.group.clone());
        match notice {
            Notice::AttemptStarted { step, kind, attempt, command_id } => {
                let (step_name, group) = (name(*step), group(*step));
                if let Some(s) = &mut self.spans {
                    let g = group.as_ref();
                    s.attempt_started(*step, &step_name, g, *kind, *attempt, *command_id, remote);
                }
                self.hook(*step, *kind, *attempt, |h, e| match kind {
                    CommandKind::Execute => h.on_step_start(e),
                    CommandKind::Compensate if e.attempt == 1 => h.on_compensation_start(e),
                    CommandKind::Compensate => {}
                });
            }
            Notice::AttemptResumed { step, kind, attempt, command_id } => {
                // Its span on the coordinator that died is gone: this one
                // covers the rest of the attempt (no hook: it did not start now).
                let (step_name, group) = (name(*step), group(*step));
                if let Some(s) = &mut self.spans {
                    let g = group.as_ref();
                    s.attempt_started(*step, &step_name, g, *kind, *attempt, *command_id, remote);
                }
            }
            Notice::Redispatched { command_id, note } => {
                let step = self.machine.rec.current.iter().find(|c| c.command_id == *command_id);
                if let Some(c) = step {
                    let spans = self.spans.as_deref();
                    telemetry::command_resent(spans, self.run_id(), c.step, *command_id, note);
                }
            }
            Notice::Late { command_id, outcome } => {
                warn!(run_id = %self.run_id(), command = %command_id, %outcome, "late answer for an attempt already given up on: recorded, not applied");
            }
            Notice::Retry { step, kind, attempt, error, delay, unknown } => {
                let delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
                let spans = self.spans.as_deref();
                telemetry::retry_scheduled(spans, self.run_id(), &name(*step), *attempt, delay_ms);
                self.attempt_failed(*step, *kind, *attempt, error);
                if *unknown {
                    self.hook(*step, *kind, *attempt, |h, e| h.on_step_unknown(e, error));
                }
                self.hook(*step, *kind, *attempt, |h, e| h.on_step_retry(e, error, *delay));
            }
            Notice::StepCompleted { step, attempt, duration } => {
                if let Some(s) = &mut self.spans {
                    s.attempt_ended(*step, None);
                }
                self.hook(*step, CommandKind::Execute, *attempt, |h, e| {
                    h.on_step_success(e, *duration)
                });
            }
            Notice::StepFailed { step, attempt, error, maybe_done } => {
                self.attempt_failed(*step, CommandKind::Execute, *attempt, error);
                if *maybe_done {
                    self.hook(*step, CommandKind::Execute, *attempt, |h, e| {
                        h.on_step_unknown(e, error)
                    });
                }
                self.hook(*step, CommandKind::Execute, *attempt, |h, e| {
                    h.on_step_failure(e, error)
                });
            }
            Notice::CompensationCompleted { step, attempt, duration } => {
                if let Some(s) = &mut self.spans {
                    s.attempt_ended(*step, None);
                }
                self.hook(*step, CommandKind::Compensate, *attempt, |h, e| {
                    h.on_compensation_success(e, *duration)
                });
            }
            Notice::Paused { step, kind, error } => {
                let attempt = self.machine.rec.steps.get(*step as usize).map_or(0, |s| s.attempts);
                let step_name = name(*step);
                self.attempt_failed(*step, *kind, attempt, error);
                warn!(run_id = %self.run_id(), step = %step_name, %error, "run paused: retries ran out; waiting for an operator");
                self.hook(*step, *kind, attempt, |h, e| h.on_run_paused(e, error));
            }
            Notice::Operator { action, by } => {
                let (run_id, flow) = (self.run_id(), self.machine.plan.def.name.clone());
                for h in &self.machine.plan.hooks {
                    guard(run_id, || h.on_operator_action(run_id, &flow, *action, by));
                }
            }
            Notice::Stopped { step, kind, maybe_done } => {
                let why = if *maybe_done { "stopped (it may have happened)" } else { "stopped" };
                let attempt = (self.machine.rec.current.iter().find(|c| c.step == *step))
                    .map(|c| c.attempt)
                    .or_else(|| self.machine.rec.steps.get(*step as usize).map(|s| s.attempts));
                self.attempt_failed(*step, *kind, attempt.unwrap_or(0), why);
            }
            Notice::Cancelled { by, reason } => {
                let (run_id, flow) = (self.run_id(), self.machine.plan.def.name.clone());
                for h in &self.machine.plan.hooks {
                    guard(run_id, || h.on_run_cancelled(run_id, &flow, by, reason.as_deref()));
                }
            }
            Notice::CompensationFailed { step, attempt, error } => {
                self.attempt_failed(*step, CommandKind::Compensate, *attempt, error);
                self.hook(*step, CommandKind::Compensate, *attempt, |h, e| {
                    h.on_compensation_failure(e, error)
                });
            }
        }
    }

    /// An attempt that failed: its log line (an event on its span, when
    /// there is one), then the end of its span.
    fn attempt_failed(&mut self, step: u32, kind: CommandKind, attempt: u32, error: &str) {
        let def = self.machine.plan.def.steps.get(step as usize);
        let name = def.map(|s| s.name.clone()).unwrap_or_default();
        let at = (&*name, kind, attempt);
        telemetry::attempt_failed(self.spans.as_deref(), self.run_id(), step, at, error);
        if let Some(s) = &mut self.spans {
            s.attempt_ended(step, Some(error));
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
        let Some(def) = plan.def.steps.get(step as usize) else { return };
        let event = StepEvent {
            group: def.group.as_deref(),
            run_id: self.run_id().into(),
            flow: &plan.def.name,
            step: &def.name,
            kind,
            attempt,
        };
        for h in &plan.hooks {
            guard(self.run_id(), || call(h.as_ref(), &event));
        }
    }
}

/// Runs a hook; a panic in user code is logged, never allowed to stop the run.
fn guard(run_id: Uuid, f: impl FnOnce()) {
    if std::panic::catch_unwind(AssertUnwindSafe(f)).is_err() {
        error!(%run_id, "a hook panicked; the run goes on");
    }
}

impl Actor for RunActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        let (run_id, flow) = (self.run_id(), self.machine.rec.flow.clone());
        self.spans =
            RunSpans::start(run_id, &flow, self.machine.rec.extras().traceparent.as_deref());
        for h in &self.machine.plan.hooks {
            guard(run_id, || h.on_run_start(run_id, &flow));
        }
        // Actix stops an actor nobody holds an address of once nothing of
        // its own is under way, and a run may wait like that (paused for an
        // operator): it lives until it ends (`ctx.stop()`). A future that
        // never resolves holds no memory (a zero-sized box).
        ctx.spawn(futures::future::pending::<()>().into_actor(self));
        self.parts.live.lock().insert(run_id, ctx.address().downgrade());
        if matches!(self.opening.as_deref(), Some(Opening::Begun(_)))
            && let Some(Opening::Begun(decision)) = self.opening.take().map(|o| *o)
        {
            let Decision { transitions, mut effects } = decision;
            // Its commands count their windows from now, when they leave.
            self.machine.restamp(&mut effects, SystemTime::now());
            // A run that ends in its first decision (nothing to run) ends
            // through the store, like any other.
            if transitions.iter().any(|t| matches!(t, Transition::Finished { .. })) {
                self.persist(transitions, effects, 0, ctx);
            } else {
                self.carry_out(effects, ctx);
            }
            return;
        }
        let action = match self.opening.as_deref_mut() {
            Some(Opening::Reopen { action, .. }) => action.take(),
            _ => None,
        };
        let event = match action {
            Some(action) => Event::Reopen(action),
            None if self.resumed => Event::Resume,
            None => Event::Start,
        };
        self.handle_event(event, ctx);
    }

    fn stopped(&mut self, _ctx: &mut Context<Self>) {
        self.parts.live.lock().remove(&self.run_id());
    }
}

impl Handler<LetGo> for RunActor {
    type Result = ();

    fn handle(&mut self, _: LetGo, ctx: &mut Context<Self>) {
        warn!(run_id = %self.run_id(), "run lost to a fence while its actor waited; letting go, to be resumed afresh");
        self.let_go(ctx);
    }
}

impl Handler<Control> for RunActor {
    type Result = Result<(), String>;

    fn handle(&mut self, Control(action): Control, ctx: &mut Context<Self>) -> Self::Result {
        if let Some(why) = self.machine.refusal(&action) {
            return Err(why);
        }
        self.handle_event(Event::Control(action), ctx);
        Ok(())
    }
}

impl Handler<BusReply> for RunActor {
    type Result = ();

    fn handle(&mut self, reply: BusReply, ctx: &mut Context<Self>) {
        let event = match reply {
            BusReply::Outcome(o) => {
                if o.run_id != self.run_id() {
                    warn!(run_id = %self.run_id(), other = %o.run_id, "outcome for another run ignored");
                    return;
                }
                Event::Outcome {
                    command_id: o.command_id,
                    attempt: o.attempt,
                    kind: o.kind,
                    result: o.result,
                }
            }
            BusReply::Ack(a) => Event::Acked { command_id: a.command_id, worker: a.worker },
            BusReply::Heartbeat(h) => Event::Heartbeat { command_id: h.command_id },
            BusReply::Rejected(e) => {
                let Some(command_id) = e.command_id else { return };
                Event::Rejected { command_id, code: e.code, message: e.message }
            }
            BusReply::DispatchFailed { command_id, message } => {
                Event::DispatchFailed { command_id, retryable: true, message }
            }
            BusReply::Reached { command_id } => {
                // The window for answers to the inquiry opens, unless one
                // came already (or the attempt is over).
                if let Some(timers) = self.timers.get_mut(command_id)
                    && let Some(within) = timers.answers_within.take()
                {
                    let event = Internal(Event::Unanswered { command_id });
                    timers.ack = Some(ctx.notify_later(event, within));
                }
                return;
            }
        };
        self.handle_event(event, ctx);
    }
}

/// Timers that declare the attempt in flight lost.
#[derive(Default)]
struct AttemptTimers {
    ack: Option<SpawnHandle>,
    silence: Option<SpawnHandle>,
    deadline: Option<SpawnHandle>,
    /// An inquiry's window for answers, to open once it reached the server.
    answers_within: Option<Duration>,
}

impl AttemptTimers {
    fn cancel(&mut self, ctx: &mut Context<RunActor>) {
        self.answers_within = None;
        for h in [self.ack.take(), self.silence.take(), self.deadline.take()].into_iter().flatten()
        {
            ctx.cancel_future(h);
        }
    }
}

impl Handler<Internal> for RunActor {
    type Result = ();

    fn handle(&mut self, Internal(event): Internal, ctx: &mut Context<Self>) {
        self.handle_event(event, ctx);
    }
}

#[cfg(test)]
mod tests {
    /// The actor of a parked run, kept from growing back unnoticed: with
    /// actix's context it makes the run's task, which mimalloc rounds up
    /// to 640 B (see "Memory" in `docs/benchmarks.md`; 64-bit targets).
    #[test]
    #[cfg(target_pointer_width = "64")]
    fn the_actor_stays_small() {
        let size = std::mem::size_of::<super::RunActor>();
        assert!(size <= 200, "{size}");
    }
}
