//! One actix actor per run: owns the run's [`Machine`], persists each batch of
//! transitions, then acts on it (send commands, arm timers, call hooks).

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
    /// An ack is applied to the record but not yet written (see `ACK_WRITE_DELAY`).
    ack_unsaved: bool,
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
        mut machine: Machine,
        bus: Arc<dyn Bus>,
        store: Arc<dyn Store>,
        done: oneshot::Sender<Box<RunReport>>,
        resumed: bool,
    ) -> Self {
        let liveness = bus.liveness();
        if let Liveness::Remote { worker_wait, .. } = liveness {
            machine.limits.worker_wait = worker_wait;
        }
        RunActor {
            machine,
            bus,
            liveness,
            timers: AttemptTimers::default(),
            store,
            done: Some(done),
            resumed,
            spans: None,
            ack_unsaved: false,
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
        if batch.iter().all(|t| matches!(t, Transition::AttemptAcked { .. })) {
            // Who started the attempt has no effect of its own to come after
            // it (only the silence timer changes); it matters to a coordinator
            // that takes the run over. Written with the next batch (the store
            // keeps whole records), or on its own after a short delay when the
            // step takes longer: one write less for every quick step.
            self.act(batch.clone(), ctx);
            if !self.ack_unsaved {
                self.ack_unsaved = true;
                ctx.run_later(ACK_WRITE_DELAY, move |act, ctx| {
                    if act.ack_unsaved && !act.machine.is_finished() {
                        act.persist(batch, 0, ctx);
                    }
                });
            }
            return;
        }
        self.persist(batch, 0, ctx);
    }

    /// Writes the batch, then acts on it. Nothing else is handled meanwhile, so
    /// the store always holds a transition before its consequences happen.
    fn persist(&mut self, batch: Vec<Transition>, failures: u32, ctx: &mut Context<Self>) {
        // The whole record is written: any ack applied so far goes with it.
        self.ack_unsaved = false;
        match self.store.apply(self.run_id(), &batch, &self.machine.rec) {
            Pending::Ready(Ok(())) => self.act(batch, ctx),
            Pending::Ready(Err(e)) => self.persist_failed(e, batch, failures, ctx),
            Pending::Later(fut) => {
                // A store that never answers must not wedge the run: give up
                // on this write and write again (the store recognises a write
                // of its own that landed meanwhile).
                let bounded = tokio::time::timeout(STORE_TIMEOUT, fut);
                ctx.wait(bounded.into_actor(self).map(move |res, act, ctx| match res {
                    Ok(Ok(())) => act.act(batch, ctx),
                    Ok(Err(e)) => act.persist_failed(e, batch, failures, ctx),
                    Err(_) => {
                        let e = StoreError::Unavailable(format!(
                            "no answer from the store within {STORE_TIMEOUT:?}"
                        ));
                        act.persist_failed(e, batch, failures, ctx)
                    }
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
        if e.is_permanent() {
            self.store_refused(e, ctx);
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
        for t in &batch {
            // Whatever else happened, the attempt being watched is over or replaced.
            if !matches!(t, Transition::AttemptAcked { .. } | Transition::LateOutcome(_)) {
                self.timers.cancel(ctx);
            }
            self.act_on(t, ctx);
        }
    }

    /// The store refused the run's state for good (too large, say): retrying
    /// cannot help. The run ends here, set aside in the store with the reason
    /// (never a loop), and its waiters get a report saying so.
    fn store_refused(&mut self, e: StoreError, ctx: &mut Context<Self>) {
        let reason = format!("the run's state cannot be stored: {e}");
        error!(run_id = %self.run_id(), %reason, "quarantining the run");
        let mut report = self.machine.rec.to_report(self.machine.run_started.elapsed());
        report.status = orchestrix_proto::RunStatus::Quarantined;
        report.error = Some(reason.clone());
        let quarantine = self.store.quarantine(self.run_id(), reason, report.clone());
        ctx.wait(quarantine.into_actor(self).map(move |res, act, ctx| {
            if let Err(e) = res {
                error!(run_id = %act.run_id(), error = %e, "cannot quarantine the run");
            }
            act.bus.run_finished(act.run_id());
            if let Some(done) = act.done.take() {
                let _ = done.send(Box::new(report));
            }
            ctx.stop();
        }));
    }

    fn act_on(&mut self, t: &Transition, ctx: &mut Context<Self>) {
        match t {
            Transition::AttemptStarted { step, kind, attempt, command_id, .. } => {
                let cmd = self.command(*step, *kind, *attempt, *command_id);
                let remote = self.liveness != Liveness::Local;
                if let Some(s) = &mut self.spans {
                    s.attempt_started(&cmd.step, *kind, *attempt, *command_id, remote);
                }
                self.hook(*step, *kind, *attempt, |h, e| match kind {
                    CommandKind::Execute => h.on_step_start(e),
                    CommandKind::Compensate if e.attempt == 1 => h.on_compensation_start(e),
                    CommandKind::Compensate => {}
                });
                self.send(cmd, ctx);
            }
            Transition::Redispatched { command_id, note } => {
                if let Some(s) = &self.spans {
                    s.redispatched(*command_id, note);
                }
                if let Some(c) = self.machine.rec.current.clone() {
                    let cmd = self.command(c.step, c.kind, c.attempt, *command_id);
                    self.send(cmd, ctx);
                }
            }
            Transition::AttemptAcked { command_id, .. } => self.alive(*command_id, ctx),
            Transition::LateOutcome(note) => {
                warn!(run_id = %self.run_id(), command = %note.command_id, outcome = %note.outcome, "late answer for an attempt already given up on: recorded, not applied");
            }
            Transition::RetryScheduled { step, kind, error, retry, unknown } => {
                let (attempt, command_id) = match &self.machine.rec.current {
                    Some(c) => (c.attempt, c.command_id),
                    None => return,
                };
                if let Some(s) = &mut self.spans {
                    s.attempt_ended(Some(error));
                    if let Some(def) = self.machine.plan.def.steps.get(*step as usize) {
                        s.retry(&def.name, attempt, retry.delay.as_millis() as u64);
                    }
                }
                if *unknown {
                    self.hook(*step, *kind, attempt, |h, e| h.on_step_unknown(e, error));
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
            Transition::StepFailed { step, error, maybe_done, .. } => {
                if let Some(s) = &mut self.spans {
                    s.attempt_ended(Some(error));
                }
                let attempt = self.attempts(*step);
                if *maybe_done {
                    self.hook(*step, CommandKind::Execute, attempt, |h, e| {
                        h.on_step_unknown(e, error)
                    });
                }
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
        let (command_id, attempt, kind) = (cmd.command_id, cmd.attempt, cmd.kind);
        let deadline = cmd.deadline_ms;
        // Inside the attempt's span, so the bus can carry its context along.
        let entered = self.spans.as_ref().and_then(|s| s.attempt()).map(|s| s.clone().entered());
        let dispatched = self.bus.dispatch(cmd, &ReplyTo(ctx.address()));
        drop(entered);
        match dispatched {
            Ok(Dispatched::Sent) => self.watch_attempt(command_id, deadline, false, ctx),
            Ok(Dispatched::Local(outcome)) => {
                ctx.spawn(outcome.into_actor(self).map(move |result, act, ctx| {
                    act.handle_event(Event::Outcome { command_id, attempt, kind, result }, ctx)
                }));
            }
            Err(e) => {
                let (retryable, message) = (e.is_retryable(), e.to_string());
                ctx.notify(Internal(Event::DispatchFailed { command_id, retryable, message }));
            }
        }
    }

    /// Picks a run up where its record says it stands (after a coordinator
    /// restart or a takeover). The attempt in flight is not simply sent again
    /// (another replica would run it a second time): every worker of the step
    /// is asked whether it holds the command, and the one that does answers
    /// here. Nobody answering means the command was never started (send it
    /// again) or its worker is gone (an unknown outcome): the record's ack
    /// tells which. A scheduled retry waits out what is left of its delay.
    fn resume(&mut self, ctx: &mut Context<Self>) {
        match self.machine.rec.current.clone() {
            Some(c) if c.retry_at.is_none() => {
                let cmd = self.command(c.step, c.kind, c.attempt, c.command_id);
                let deadline = cmd.deadline_ms;
                match self.bus.inquire(cmd, &ReplyTo(ctx.address())) {
                    Ok(()) => self.watch_attempt(c.command_id, deadline, true, ctx),
                    Err(_) => {
                        ctx.notify(Internal(Event::Unanswered { command_id: c.command_id }));
                    }
                }
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
        self.machine.rec.steps.get(step as usize).map_or(0, |s| s.attempts)
    }

    fn compensation_attempts(&self, step: u32) -> u32 {
        self.machine
            .rec
            .steps
            .get(step as usize)
            .and_then(|s| s.compensation.as_ref())
            .map_or(0, |c| c.attempts)
    }

    fn command(&self, step: u32, kind: CommandKind, attempt: u32, command_id: Uuid) -> StepCommand {
        let def = &self.machine.plan.def;
        let sdef = &def.steps[step as usize];
        let timeout = match kind {
            CommandKind::Execute => sdef.timeout,
            CommandKind::Compensate => sdef.compensation_timeout,
        };
        let rec = &self.machine.rec;
        let now = SystemTime::now();
        let ms = orchestrix_proto::time::unix_ms;
        // A worker may start the command until `start_by` (the ack window), and
        // its handler then has `timeout`: the attempt is over by their sum, or
        // at the run's deadline for an action (a compensation is never cut
        // short by it). Counted from this send, not from when the attempt was
        // decided: a command that waited on an unavailable store, or was sent
        // again because nobody took it, gets its whole budget.
        let ack_window = match self.liveness {
            Liveness::Remote { ack_timeout, .. } => Some(ack_timeout),
            _ => None,
        };
        let start_by_ms = ack_window.map(|a| ms(now + a));
        let step_end = timeout.map(|t| ms(now + ack_window.unwrap_or_default() + t));
        let run_end = match kind {
            CommandKind::Execute => rec.timeout.map(|t| ms(rec.started_at + t)),
            CommandKind::Compensate => None,
        };
        let deadline_ms = match (step_end, run_end) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        StepCommand {
            command_id,
            run_id: self.run_id(),
            flow: def.name.clone(),
            step: sdef.name.clone(),
            step_index: step,
            kind,
            attempt,
            input: rec.input.clone(),
            outputs: self.machine.outputs_for(step as usize, kind),
            timeout,
            start_by_ms,
            deadline_ms,
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
            run_id: self.run_id(),
            flow: &plan.def.name,
            step: &def.name,
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
                let event = Event::Outcome {
                    command_id: o.command_id,
                    attempt: o.attempt,
                    kind: o.kind,
                    result: o.result,
                };
                self.handle_event(event, ctx);
            }
            BusReply::Ack(a) => {
                let acked = self
                    .machine
                    .rec
                    .current
                    .as_ref()
                    .is_some_and(|c| c.command_id == a.command_id && c.acked_by.is_some());
                if acked {
                    self.alive(a.command_id, ctx);
                } else {
                    let event = Event::Acked { command_id: a.command_id, worker: a.worker };
                    self.handle_event(event, ctx);
                }
            }
            BusReply::Heartbeat(h) => self.alive(h.command_id, ctx),
            BusReply::Rejected(e) => {
                if let Some(command_id) = e.command_id {
                    let event = Event::Rejected { command_id, code: e.code, message: e.message };
                    self.handle_event(event, ctx);
                }
            }
            BusReply::DispatchFailed { command_id, message } => {
                let event = Event::DispatchFailed { command_id, retryable: true, message };
                self.handle_event(event, ctx);
            }
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

impl RunActor {
    /// Arms the timers of an attempt sent to a remote worker: the ack window
    /// (or, after a takeover, the inquiry's), and its deadline.
    fn watch_attempt(
        &mut self,
        command_id: Uuid,
        deadline_ms: Option<u64>,
        inquiry: bool,
        ctx: &mut Context<Self>,
    ) {
        let Liveness::Remote { ack_timeout, timeout_grace, clock_skew, .. } = self.liveness else {
            return;
        };
        self.timers.command_id = Some(command_id);
        let event =
            if inquiry { Event::Unanswered { command_id } } else { Event::NotTaken { command_id } };
        self.timers.ack = Some(ctx.notify_later(Internal(event), ack_timeout + clock_skew));
        if let Some(d) = deadline_ms {
            let now = orchestrix_proto::time::unix_ms(SystemTime::now());
            let left = Duration::from_millis(d.saturating_sub(now));
            let reason = "no outcome by the attempt's deadline".to_owned();
            self.timers.deadline = Some(ctx.notify_later(
                Internal(Event::TimedOut { command_id, reason }),
                left + timeout_grace,
            ));
        }
    }

    /// An ack or heartbeat of the attempt in flight: its worker has it; restart
    /// the silence timer.
    fn alive(&mut self, command_id: Uuid, ctx: &mut Context<Self>) {
        let Liveness::Remote { heartbeat_timeout, .. } = self.liveness else { return };
        let Some(cur) = self.machine.rec.current.as_ref() else { return };
        if cur.command_id != command_id || cur.retry_at.is_some() {
            return; // an older attempt's worker
        }
        let worker = cur.acked_by.clone().unwrap_or_default();
        self.timers.command_id = Some(command_id);
        for h in [self.timers.ack.take(), self.timers.silence.take()].into_iter().flatten() {
            ctx.cancel_future(h);
        }
        let reason = format!("worker {worker} went silent: no heartbeat for {heartbeat_timeout:?}");
        self.timers.silence = Some(
            ctx.notify_later(Internal(Event::Silent { command_id, reason }), heartbeat_timeout),
        );
    }
}

impl Handler<Internal> for RunActor {
    type Result = ();

    fn handle(&mut self, Internal(event): Internal, ctx: &mut Context<Self>) {
        self.handle_event(event, ctx);
    }
}
